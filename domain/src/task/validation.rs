//! Invariants a [`TaskSpec`] must hold however it was built (YAML or
//! structured), and the checks the parser shares with them.

use super::{Checkpoint, Result, SpecError, TaskSpec, MAX_NUM_NODES};

/// Checks invariants that hold however a spec was built (YAML or structured).
pub fn validate(spec: &TaskSpec) -> Result<()> {
    if spec.num_nodes == 0 {
        return Err(SpecError::new("num_nodes", "must be at least 1, got 0"));
    }
    if spec.num_nodes > MAX_NUM_NODES {
        return Err(SpecError::new(
            "num_nodes",
            format!("must be at most {MAX_NUM_NODES}, got {}", spec.num_nodes),
        ));
    }
    if let Some(name) = &spec.name {
        if name.len() > 256 {
            return Err(SpecError::new("name", "must be at most 256 characters"));
        }
    }
    for (section, map) in [("envs", &spec.envs), ("secrets", &spec.secrets)] {
        for name in map.keys() {
            check_env_name(name, &format!("{section}.{name}"))?;
        }
    }
    if (spec.workdir.is_some() || spec.workdir_git.is_some())
        && spec.file_mounts.contains_key("~/sky_workdir")
    {
        return Err(SpecError::new(
            "file_mounts.~/sky_workdir",
            "the workdir lands there: mount elsewhere, or drop `workdir`",
        ));
    }
    if spec.resources.candidates.is_empty() {
        return Err(SpecError::new("resources", "needs at least one candidate"));
    }
    check_registry_login(spec)?;
    if !spec.docker_run_options.is_empty()
        && spec
            .resources
            .candidates
            .iter()
            .all(|c| c.docker_image.is_none())
    {
        return Err(SpecError::new(
            "config.docker.run_options",
            "applies to a container, and the task names no `image_id: docker:<image>`",
        ));
    }
    if let Some(c) = &spec.checkpoint {
        check_checkpoint(c)?;
    }
    if let Some(r) = &spec.recovery {
        if let Some(c) = r
            .recover_on_exit_codes
            .iter()
            .find(|c| !(0..=255).contains(*c))
        {
            return Err(SpecError::new(
                "job_recovery.recover_on_exit_codes",
                format!("exit codes are 0..255, got {c}"),
            ));
        }
    }
    for (i, c) in spec.resources.candidates.iter().enumerate() {
        let path = if spec.resources.candidates.len() == 1 {
            "resources".to_string()
        } else {
            format!("resources.candidates[{i}]")
        };
        if let Some(a) = &c.accelerator {
            if !(a.count.is_finite() && a.count > 0.0) {
                return Err(SpecError::new(
                    format!("{path}.accelerators"),
                    "accelerator count must be a positive number",
                ));
            }
        }
        if let Some(m) = c.max_hourly_cost {
            if !(m.is_finite() && m > 0.0) {
                return Err(SpecError::new(
                    format!("{path}.max_hourly_cost"),
                    "must be a positive number",
                ));
            }
        }
    }
    Ok(())
}

/// SkyPilot's registry login: `SKYPILOT_DOCKER_USERNAME`, `_PASSWORD` and
/// `_SERVER`, all three together in `envs` or together in `secrets`.
fn check_registry_login(spec: &TaskSpec) -> Result<()> {
    let given = |map: &std::collections::BTreeMap<String, String>| {
        DOCKER_LOGIN
            .iter()
            .filter(|n| map.contains_key(**n))
            .count()
    };
    let (in_envs, in_secrets) = (given(&spec.envs), given(&spec.secrets));
    match (in_envs, in_secrets) {
        (0, 0) | (3, 0) | (0, 3) => Ok(()),
        (e, s) => {
            let (section, map) = if e >= s {
                ("envs", &spec.envs)
            } else {
                ("secrets", &spec.secrets)
            };
            let missing = DOCKER_LOGIN
                .iter()
                .find(|n| !map.contains_key(**n))
                .unwrap_or(&DOCKER_LOGIN[0]);
            Err(SpecError::new(
                format!("{section}.{missing}"),
                "SKYPILOT_DOCKER_USERNAME, SKYPILOT_DOCKER_PASSWORD and SKYPILOT_DOCKER_SERVER \
                 must be given together, all in `envs` or all in `secrets` (not split across both)",
            ))
        }
    }
}

/// The names of a private registry's login, as SkyPilot spells them.
pub const DOCKER_LOGIN: [&str; 3] = [
    "SKYPILOT_DOCKER_USERNAME",
    "SKYPILOT_DOCKER_PASSWORD",
    "SKYPILOT_DOCKER_SERVER",
];

pub(super) fn check_env_name(name: &str, path: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            path,
            "names must match ^[a-zA-Z_][a-zA-Z0-9_]*$",
        ))
    }
}

/// What a checkpoint setting must be, however it arrived.
pub(super) fn check_checkpoint(c: &Checkpoint) -> Result<()> {
    if ["gs://", "az://"].iter().any(|p| c.store.starts_with(p)) {
        return Err(SpecError::new(
            "checkpoint.store",
            format!(
                "'{}': gs:// and az:// are GCP's and Azure's stores, and Nembo has no provider for \
                 either yet; use s3://bucket/prefix or file:///dir",
                c.store
            ),
        ));
    }
    let ok = ["s3://", "file:///"]
        .iter()
        .any(|p| c.store.starts_with(p) && c.store.len() > p.len());
    if !ok {
        return Err(SpecError::new(
            "checkpoint.store",
            format!("'{}' is not s3://bucket/prefix or file:///dir", c.store),
        ));
    }
    if !c.path.starts_with('/') || c.path.split('/').any(|p| p == "..") || c.path == "/" {
        return Err(SpecError::new(
            "checkpoint.path",
            format!("'{}' must be an absolute path below / without '..'", c.path),
        ));
    }
    if !SIGNALS.contains(&c.signal.as_str()) {
        return Err(SpecError::new(
            "checkpoint.signal",
            format!("expected one of {}, got '{}'", SIGNALS.join(", "), c.signal),
        ));
    }
    if c.interval_s == 0 {
        return Err(SpecError::new(
            "checkpoint.interval",
            "must be at least 1 s",
        ));
    }
    Ok(())
}

/// Signals a job may ask to be sent on a preemption notice.
pub const SIGNALS: &[&str] = &[
    "SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP", "SIGCONT",
];
