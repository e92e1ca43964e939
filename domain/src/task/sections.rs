//! The top-level sections other than `resources`: `workdir`, `num_nodes`,
//! `envs` and `secrets`, `resources.job_recovery` and `checkpoint`.

use std::collections::BTreeMap;

use yaml_serde::Value;

use super::validation::{check_checkpoint, check_env_name};
use super::yaml::{as_map, check_keys, key_str, kind, scalar_string, show};
use super::{
    Autostop, AutostopSetting, Checkpoint, GitWorkdir, JobRecovery, RecoveryStrategy, Result,
    SpecError, WaitFor, MAX_NUM_NODES,
};

pub(super) trait CollectEnvs {
    fn collect_envs(self) -> BTreeMap<String, String>;
}

impl<I: Iterator<Item = (String, Option<String>)>> CollectEnvs for I {
    fn collect_envs(self) -> BTreeMap<String, String> {
        self.filter_map(|(k, v)| v.map(|v| (k, v))).collect()
    }
}

/// `workdir`: a local path, or a git repository (`{url, ref}`) that each
/// node clones (private ones with the `GIT_TOKEN` or `GIT_SSH_KEY_PATH`
/// secret, as SkyPilot's).
pub(super) fn parse_workdir(v: &Value) -> Result<(Option<String>, Option<GitWorkdir>)> {
    match v {
        Value::Null => Ok((None, None)),
        Value::String(s) if s.trim().is_empty() => Ok((None, None)),
        Value::String(s) => Ok((Some(s.clone()), None)),
        Value::Mapping(m) => {
            check_keys(m, "workdir", &["url", "ref"], &[])?;
            let url = match m.get("url") {
                Some(Value::String(s)) => s.trim().to_string(),
                Some(other) => {
                    return Err(SpecError::new(
                        "workdir.url",
                        format!("expected a git URL, got {}", kind(other)),
                    ))
                }
                None => return Err(SpecError::new("workdir.url", "a git workdir needs its url")),
            };
            let scp_like = url.starts_with("git@") && url.contains(':');
            let scheme_ok = ["https://", "ssh://", "file://"]
                .iter()
                .any(|p| url.starts_with(p));
            if !(scheme_ok || scp_like) || url.chars().any(char::is_whitespace) || url.len() > 2048
            {
                return Err(SpecError::new(
                    "workdir.url",
                    format!(
                        "'{}': expected an https://, ssh://, git@host:path or file:// URL",
                        url.chars().take(80).collect::<String>()
                    ),
                ));
            }
            let git_ref = match m.get("ref") {
                None | Some(Value::Null) => None,
                Some(r) => {
                    let r = scalar_string(r, "workdir.ref")?.trim().to_string();
                    let ok = |c: char| c.is_ascii_alphanumeric() || "._-/+@".contains(c);
                    if r.is_empty() || r.starts_with('-') || r.len() > 256 || !r.chars().all(ok) {
                        return Err(SpecError::new(
                            "workdir.ref",
                            format!("'{r}' is not a branch, tag or commit"),
                        ));
                    }
                    Some(r)
                }
            };
            Ok((None, Some(GitWorkdir { url, git_ref })))
        }
        other => Err(SpecError::new(
            "workdir",
            format!("expected a path, got {}", kind(other)),
        )),
    }
}

/// `inputs` / `outputs`: one `URI: size in GB` entry, the URI a bucket's.
pub(super) fn parse_data_location(v: &Value, path: &str) -> Result<Option<super::DataLocation>> {
    if v.is_null() {
        return Ok(None);
    }
    let m = as_map(v, path)?;
    if m.len() != 1 {
        return Err(SpecError::new(
            path,
            format!(
                "give one `URI: size in GB` entry (SkyPilot takes one), got {}",
                m.len()
            ),
        ));
    }
    let Some((k, size)) = m.iter().next() else {
        return Ok(None);
    };
    let uri = key_str(k, path)?.trim().to_string();
    let entry = format!("{path}.{uri}");
    let location = super::DataLocation {
        uri: uri.clone(),
        size_gb: match size {
            Value::Number(n) => n.as_f64().filter(|g| g.is_finite() && *g >= 0.0),
            _ => None,
        }
        .ok_or_else(|| {
            SpecError::new(
                &entry,
                format!(
                    "expected its size in GB, a number from 0 up, got {}",
                    show(size)
                ),
            )
        })?,
    };
    if location.cloud().is_none() {
        return Err(SpecError::new(
            entry,
            "expected a bucket URI (s3://, gs://, az://, r2://, cos:// or oci://)",
        ));
    }
    Ok(Some(location))
}

/// `resources.priority`: a whole number from 0 to 1000.
pub(super) fn parse_priority(v: &Value) -> Result<u16> {
    const PATH: &str = "resources.priority";
    let n = match v {
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
    .ok_or_else(|| {
        SpecError::new(
            PATH,
            format!("expected a whole number from 0 to 1000, got {}", show(v)),
        )
    })?;
    u16::try_from(n)
        .ok()
        .filter(|n| *n <= super::MAX_PRIORITY)
        .ok_or_else(|| SpecError::new(PATH, format!("must be from 0 to 1000, got {n}")))
}

pub(super) fn parse_num_nodes(v: &Value) -> Result<u32> {
    let n = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    }
    .ok_or_else(|| {
        SpecError::new(
            "num_nodes",
            format!("expected a whole number, got {}", show(v)),
        )
    })?;
    if n < 1 {
        return Err(SpecError::new(
            "num_nodes",
            format!("must be at least 1, got {n}"),
        ));
    }
    u32::try_from(n)
        .ok()
        .filter(|n| *n <= MAX_NUM_NODES)
        .ok_or_else(|| {
            SpecError::new(
                "num_nodes",
                format!("must be at most {MAX_NUM_NODES}, got {n}"),
            )
        })
}

pub(super) fn parse_env_map(v: &Value, section: &str) -> Result<Vec<(String, Option<String>)>> {
    if v.is_null() {
        return Ok(Vec::new());
    }
    let map = as_map(v, section)?;
    let mut out = Vec::new();
    for (k, val) in map {
        let name = key_str(k, section)?;
        let path = format!("{section}.{name}");
        check_env_name(name, &path)?;
        let value = match val {
            Value::Null => None,
            other => Some(scalar_string(other, &path)?),
        };
        out.push((name.to_string(), value));
    }
    Ok(out)
}

pub(super) fn parse_env_nulls(
    v: Option<&Value>,
    section: &'static str,
) -> BTreeMap<String, &'static str> {
    let mut out = BTreeMap::new();
    if let Some(Value::Mapping(m)) = v {
        for (k, val) in m {
            if val.is_null() {
                if let Some(name) = k.as_str() {
                    out.insert(name.to_string(), section);
                }
            }
        }
    }
    out
}

pub(super) fn parse_job_recovery(v: &Value) -> Result<Option<JobRecovery>> {
    const PATH: &str = "resources.job_recovery";
    let strategy = |v: &Value, path: &str| -> Result<RecoveryStrategy> {
        match v.as_str().map(|s| s.to_ascii_uppercase()).as_deref() {
            Some("EAGER_NEXT_REGION") => Ok(RecoveryStrategy::EagerNextRegion),
            Some("FAILOVER") => Ok(RecoveryStrategy::Failover),
            Some("NONE") => Ok(RecoveryStrategy::None),
            _ => Err(SpecError::new(
                path,
                format!(
                    "expected EAGER_NEXT_REGION, FAILOVER or none, got {}",
                    show(v)
                ),
            )),
        }
    };
    match v {
        Value::Null => Ok(None),
        Value::String(_) => Ok(Some(JobRecovery {
            strategy: strategy(v, PATH)?,
            ..Default::default()
        })),
        Value::Mapping(m) => {
            check_keys(
                m,
                PATH,
                &[
                    "strategy",
                    "max_restarts_on_errors",
                    "recover_on_exit_codes",
                ],
                &[],
            )?;
            let mut r = JobRecovery::default();
            if let Some(s) = m.get("strategy").filter(|s| !s.is_null()) {
                r.strategy = strategy(s, &format!("{PATH}.strategy"))?;
            }
            if let Some(n) = m.get("max_restarts_on_errors").filter(|s| !s.is_null()) {
                r.max_restarts_on_errors = n
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        SpecError::new(
                            format!("{PATH}.max_restarts_on_errors"),
                            format!("expected a whole number >= 0, got {}", show(n)),
                        )
                    })?;
            }
            if let Some(codes) = m.get("recover_on_exit_codes").filter(|s| !s.is_null()) {
                let path = format!("{PATH}.recover_on_exit_codes");
                let list: Vec<&Value> = match codes {
                    Value::Sequence(s) => s.iter().collect(),
                    one => vec![one],
                };
                for c in list {
                    let code = c
                        .as_i64()
                        .filter(|c| (0..=255).contains(c))
                        .ok_or_else(|| {
                            SpecError::new(
                                &path,
                                format!("expected exit codes 0..255, got {}", show(c)),
                            )
                        })?;
                    r.recover_on_exit_codes.push(code as i32);
                }
            }
            Ok(Some(r))
        }
        other => Err(SpecError::new(
            PATH,
            format!("expected a strategy or a mapping, got {}", kind(other)),
        )),
    }
}

/// `resources.autostop`: `false`, `true` (5 minutes, as SkyPilot's docs
/// say), minutes, a window string (`30m`, `2h`), or `{idle_minutes, down,
/// wait_for}`. Any mapping turns it on.
pub(super) fn parse_autostop(v: &Value, path: &str) -> Result<Option<AutostopSetting>> {
    const DEFAULT_IDLE_S: u64 = 5 * 60;
    let window = |v: &Value, path: &str| -> Result<u64> {
        let text = match v {
            Value::Number(n) if n.as_u64().is_some() => n.to_string(),
            Value::String(s) => s.clone(),
            other => {
                return Err(SpecError::new(
                    path,
                    format!(
                        "expected minutes (e.g. 30) or a window (30m, 2h), got {}",
                        show(other)
                    ),
                ))
            }
        };
        Autostop::parse_window(&text).ok_or_else(|| {
            SpecError::new(
                path,
                format!("expected minutes (e.g. 30) or a window (30s, 30m, 2h, 1d), got '{text}'"),
            )
        })
    };
    let on = |idle_s| Some(AutostopSetting::On(Autostop::after(idle_s)));
    match v {
        Value::Null => Ok(None),
        Value::Bool(false) => Ok(Some(AutostopSetting::Off)),
        Value::Bool(true) => Ok(on(DEFAULT_IDLE_S)),
        Value::Number(_) | Value::String(_) => Ok(on(window(v, path)?)),
        Value::Mapping(m) => {
            check_keys(
                m,
                path,
                &["idle_minutes", "down", "wait_for", "hook", "hook_timeout"],
                &[],
            )?;
            let mut a = Autostop::after(DEFAULT_IDLE_S);
            if let Some(h) = m.get("hook").filter(|v| !v.is_null()) {
                let p = format!("{path}.hook");
                let hook = h
                    .as_str()
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| {
                        SpecError::new(&p, format!("expected a script, got {}", show(h)))
                    })?;
                a.hook = Some(hook.to_string());
            }
            if let Some(t) = m.get("hook_timeout").filter(|v| !v.is_null()) {
                let p = format!("{path}.hook_timeout");
                a.hook_timeout_s = t.as_u64().filter(|s| *s >= 1).ok_or_else(|| {
                    SpecError::new(
                        &p,
                        format!("expected whole seconds, 1 or more, got {}", show(t)),
                    )
                })?;
            }
            if let Some(i) = m.get("idle_minutes").filter(|v| !v.is_null()) {
                a.idle_s = window(i, &format!("{path}.idle_minutes"))?;
            }
            if let Some(d) = m.get("down").filter(|v| !v.is_null()) {
                a.down = d.as_bool().ok_or_else(|| {
                    SpecError::new(
                        format!("{path}.down"),
                        format!("expected true or false, got {}", show(d)),
                    )
                })?;
            }
            if let Some(w) = m.get("wait_for").filter(|v| !v.is_null()) {
                let p = format!("{path}.wait_for");
                a.wait_for = w.as_str().and_then(WaitFor::parse).ok_or_else(|| {
                    SpecError::new(
                        &p,
                        format!("expected jobs_and_ssh, jobs or none, got {}", show(w)),
                    )
                })?;
            }
            Ok(Some(AutostopSetting::On(a)))
        }
        other => Err(SpecError::new(
            path,
            format!(
                "expected true, false, minutes or a mapping, got {}",
                kind(other)
            ),
        )),
    }
}

pub(super) fn parse_checkpoint(v: &Value) -> Result<Option<Checkpoint>> {
    if v.is_null() {
        return Ok(None);
    }
    let m = as_map(v, "checkpoint")?;
    check_keys(
        m,
        "checkpoint",
        &["store", "path", "interval", "signal"],
        &[],
    )?;
    let store = m
        .get("store")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            SpecError::new(
                "checkpoint.store",
                "required: s3://bucket/prefix or file:///dir",
            )
        })?;
    let path = m
        .get("path")
        .and_then(Value::as_str)
        .ok_or_else(|| SpecError::new("checkpoint.path", "required: the directory on the node"))?;
    let interval_s = match m.get("interval") {
        None | Some(Value::Null) => 60,
        Some(i) => parse_duration_s(i).ok_or_else(|| {
            SpecError::new(
                "checkpoint.interval",
                format!("expected seconds (60, 60s, 5m), got {}", show(i)),
            )
        })?,
    };
    let signal = match m.get("signal") {
        None | Some(Value::Null) => "SIGUSR1".to_string(),
        Some(s) => {
            let name = s.as_str().unwrap_or_default().to_ascii_uppercase();
            if name.starts_with("SIG") {
                name
            } else {
                format!("SIG{name}")
            }
        }
    };
    let c = Checkpoint {
        store: store.trim_end_matches('/').to_string(),
        path: path.trim_end_matches('/').to_string(),
        interval_s,
        signal,
    };
    check_checkpoint(&c)?;
    Ok(Some(c))
}

fn parse_duration_s(v: &Value) -> Option<u32> {
    let (num, unit) = match v {
        Value::Number(n) => (n.as_u64()?, 1),
        Value::String(s) => {
            let s = s.trim();
            let (n, mult) = match s.char_indices().last()? {
                (i, 's') => (&s[..i], 1),
                (i, 'm') => (&s[..i], 60),
                (i, 'h') => (&s[..i], 3600),
                _ => (s, 1),
            };
            (n.trim().parse().ok()?, mult)
        }
        _ => return None,
    };
    u32::try_from(num * unit).ok().filter(|s| *s > 0)
}
