//! The launch line, as SkyPilot users type it: flags that override the
//! task file's fields exactly as `sky launch`'s do (every resource
//! candidate of `any_of`/`ordered` included), and an inline command in
//! place of a task file. The result is YAML the coordinators check like
//! any other, so a field Nembo cannot honour is refused by name.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use yaml_serde::{Mapping, Value};

/// Flags that override the task's fields.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct Overrides {
    /// Accelerators, e.g. `H100:8` (`none`: no accelerator).
    #[arg(long, value_name = "TYPE[:N]")]
    pub gpus: Option<String>,
    /// Where: `cloud[/region[/zone]]`, e.g. `aws/us-east-1`.
    #[arg(long, conflicts_with_all = ["cloud", "region", "zone"])]
    pub infra: Option<String>,
    /// The cloud (older form of --infra).
    #[arg(long)]
    pub cloud: Option<String>,
    /// The region (older form of --infra).
    #[arg(long)]
    pub region: Option<String>,
    /// The zone (older form of --infra).
    #[arg(long)]
    pub zone: Option<String>,
    /// Nodes to run on, as a gang.
    #[arg(long)]
    pub num_nodes: Option<u32>,
    /// vCPUs per node, e.g. `8` or `8+`.
    #[arg(long)]
    pub cpus: Option<String>,
    /// Memory per node in GB, e.g. `32+` or `4x`.
    #[arg(long)]
    pub memory: Option<String>,
    /// A provider's instance type.
    #[arg(short = 't', long)]
    pub instance_type: Option<String>,
    /// Spot capacity.
    #[arg(long, overrides_with = "no_use_spot")]
    pub use_spot: bool,
    /// On-demand capacity.
    #[arg(long, overrides_with = "use_spot")]
    pub no_use_spot: bool,
    /// Disk size per node in GB.
    #[arg(long)]
    pub disk_size: Option<String>,
    /// Disk tier: low, medium, high, ultra or best.
    #[arg(long)]
    pub disk_tier: Option<String>,
    /// Ports to open: `8888`, `8000-8010`, `80,443` (repeatable).
    #[arg(long, value_delimiter = ',')]
    pub ports: Vec<String>,
    /// VM image, or `docker:<image>`.
    #[arg(long)]
    pub image_id: Option<String>,
    /// The workdir (overrides the task's).
    #[arg(long, conflicts_with = "git_url")]
    pub workdir: Option<PathBuf>,
    /// A git repository as the workdir (`workdir: {url}`), cloned by each node.
    #[arg(long)]
    pub git_url: Option<String>,
    /// The branch, tag or commit of the git workdir (`workdir: {ref}`).
    #[arg(long)]
    pub git_ref: Option<String>,
    /// A dotenv file of env vars; `--env` wins over it.
    #[arg(long, value_name = "FILE")]
    pub env_file: Option<PathBuf>,
    /// A secret (`NAME=VALUE`, or `NAME` to pass this shell's value): the
    /// job gets it; nothing shows it back.
    #[arg(long = "secret", value_name = "NAME[=VALUE]", value_parser = crate::parse_env_arg)]
    pub secrets: Vec<(String, String)>,
    /// Answer yes to every question (Nembo asks none: accepted for scripts
    /// written for SkyPilot).
    #[arg(short = 'y', long)]
    pub yes: bool,
}

/// A task file's text, or an inline command's task.
pub fn entrypoint(arg: &str) -> Result<(String, Option<PathBuf>)> {
    let path = Path::new(arg);
    let looks_like_file = arg.ends_with(".yaml") || arg.ends_with(".yml") || path.is_file();
    if looks_like_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        return Ok((text, Some(path.to_path_buf())));
    }
    // `sky launch 'python train.py'`: the command is the task's `run`.
    let mut m = Mapping::new();
    m.insert("run".into(), arg.into());
    Ok((yaml_serde::to_string(&Value::Mapping(m))?, None))
}

impl Overrides {
    /// Env vars from `--env-file`, to be overridden by `--env`.
    pub fn env_file_vars(&self) -> Result<Vec<(String, String)>> {
        let Some(f) = &self.env_file else {
            return Ok(Vec::new());
        };
        let iter =
            dotenvy::from_path_iter(f).with_context(|| format!("--env-file {}", f.display()))?;
        iter.map(|r| r.with_context(|| format!("--env-file {}", f.display())))
            .collect()
    }

    /// Applies the flags to the task's top-level mapping.
    pub fn apply(&self, task: &mut Mapping) -> Result<()> {
        let mut res: Vec<(&str, Option<Value>)> = Vec::new();
        if let Some(g) = &self.gpus {
            let none = g.eq_ignore_ascii_case("none");
            res.push(("accelerators", (!none).then(|| g.as_str().into())));
        }
        if let Some(i) = &self.infra {
            // The whole place: what the task said of cloud, region or zone goes.
            for k in ["cloud", "region", "zone"] {
                res.push((k, None));
            }
            res.push(("infra", Some(i.as_str().into())));
        }
        for (k, v) in [
            ("cloud", &self.cloud),
            ("region", &self.region),
            ("zone", &self.zone),
            ("cpus", &self.cpus),
            ("memory", &self.memory),
            ("instance_type", &self.instance_type),
            ("disk_size", &self.disk_size),
            ("disk_tier", &self.disk_tier),
            ("image_id", &self.image_id),
        ] {
            if let Some(v) = v {
                if matches!(k, "cloud" | "region" | "zone") {
                    res.push(("infra", None));
                }
                res.push((k, Some(v.as_str().into())));
            }
        }
        if self.use_spot || self.no_use_spot {
            res.push(("use_spot", Some(Value::Bool(self.use_spot))));
        }
        if !self.ports.is_empty() {
            let ports: Vec<Value> = self.ports.iter().map(|p| p.trim().into()).collect();
            res.push(("ports", Some(Value::Sequence(ports))));
        }
        if !res.is_empty() {
            let resources = match task.get_mut("resources") {
                Some(Value::Mapping(m)) => m,
                Some(Value::Null) | None => {
                    task.insert("resources".into(), Value::Mapping(Mapping::new()));
                    match task.get_mut("resources") {
                        Some(Value::Mapping(m)) => m,
                        _ => unreachable!("just inserted"),
                    }
                }
                Some(_) => bail!("resources: expected a mapping to apply the flags to"),
            };
            set_all(resources, &res);
            // Every alternative gets them too, as SkyPilot overrides each.
            for list in ["any_of", "ordered"] {
                if let Some(Value::Sequence(cands)) = resources.get_mut(list) {
                    for c in cands.iter_mut() {
                        if let Value::Mapping(c) = c {
                            let present: Vec<(&str, Option<Value>)> = res
                                .iter()
                                .filter(|(k, _)| c.contains_key(*k) || is_place(k))
                                .cloned()
                                .collect();
                            set_all(c, &present);
                        }
                    }
                }
            }
        }
        if let Some(n) = self.num_nodes {
            task.insert("num_nodes".into(), Value::Number(n.into()));
        }
        if let Some(w) = &self.workdir {
            task.insert("workdir".into(), w.display().to_string().into());
        }
        if let Some(url) = &self.git_url {
            let mut git = Mapping::new();
            git.insert("url".into(), url.clone().into());
            task.insert("workdir".into(), Value::Mapping(git));
        }
        if let Some(r) = &self.git_ref {
            match task.get_mut("workdir") {
                Some(Value::Mapping(git)) => {
                    git.insert("ref".into(), r.clone().into());
                }
                _ => bail!("--git-ref needs a git workdir: give --git-url, or workdir: {{url}} in the task"),
            }
        }
        if !self.secrets.is_empty() {
            let secrets = match task.get_mut("secrets") {
                Some(Value::Mapping(m)) => m,
                _ => {
                    task.insert("secrets".into(), Value::Mapping(Mapping::new()));
                    match task.get_mut("secrets") {
                        Some(Value::Mapping(m)) => m,
                        _ => unreachable!("just inserted"),
                    }
                }
            };
            for (k, v) in &self.secrets {
                secrets.insert(k.as_str().into(), v.as_str().into());
            }
        }
        Ok(())
    }
}

/// A key whose override must reach every alternative even where the
/// alternative does not name it: an alternative's own place would win.
fn is_place(k: &str) -> bool {
    matches!(k, "infra" | "cloud" | "region" | "zone")
}

fn set_all(m: &mut Mapping, kv: &[(&str, Option<Value>)]) {
    for (k, v) in kv {
        match v {
            Some(v) => {
                m.insert((*k).into(), v.clone());
            }
            None => {
                m.remove(*k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(yaml: &str, o: Overrides) -> Value {
        let Value::Mapping(mut m) = yaml_serde::from_str(yaml).unwrap() else {
            panic!()
        };
        o.apply(&mut m).unwrap();
        Value::Mapping(m)
    }

    #[test]
    fn git_flags_make_or_pin_a_git_workdir() {
        let v = apply(
            "workdir: .\nrun: x\n",
            Overrides {
                git_url: Some("https://github.com/o/r.git".into()),
                git_ref: Some("v2".into()),
                ..Default::default()
            },
        );
        assert_eq!(v["workdir"]["url"], "https://github.com/o/r.git");
        assert_eq!(v["workdir"]["ref"], "v2");
        let v = apply(
            "workdir: {url: 'https://github.com/o/r.git', ref: main}\n",
            Overrides {
                git_ref: Some("abc123".into()),
                ..Default::default()
            },
        );
        assert_eq!(v["workdir"]["ref"], "abc123");
        let Value::Mapping(mut m) = yaml_serde::from_str("workdir: .\n").unwrap() else {
            panic!()
        };
        let e = Overrides {
            git_ref: Some("v1".into()),
            ..Default::default()
        }
        .apply(&mut m)
        .unwrap_err();
        assert!(e.to_string().contains("--git-url"), "{e}");
    }

    #[test]
    fn flags_override_the_file_and_every_alternative() {
        let v = apply(
            "resources:\n  accelerators: A100:8\n  infra: gcp\n  any_of:\n    - {infra: aws/us-east-1}\n    - {accelerators: L4:1}\n",
            Overrides {
                gpus: Some("H100:8".into()),
                infra: Some("aws/us-west-2".into()),
                use_spot: true,
                num_nodes: Some(2),
                ports: vec!["8888".into()],
                ..Default::default()
            },
        );
        let r = &v["resources"];
        assert_eq!(r["accelerators"], "H100:8");
        assert_eq!(r["infra"], "aws/us-west-2");
        assert_eq!(r["use_spot"], true);
        assert_eq!(r["any_of"][0]["infra"], "aws/us-west-2");
        assert_eq!(r["any_of"][1]["accelerators"], "H100:8");
        assert_eq!(r["any_of"][1]["infra"], "aws/us-west-2");
        assert_eq!(v["num_nodes"], 2);
        assert_eq!(r["ports"][0], "8888");
    }

    #[test]
    fn none_drops_the_accelerators_and_cloud_replaces_infra() {
        let v = apply(
            "resources: {accelerators: H100:8, infra: aws/us-east-1}\n",
            Overrides {
                gpus: Some("none".into()),
                cloud: Some("local".into()),
                ..Default::default()
            },
        );
        assert_eq!(v["resources"].get("accelerators"), None);
        assert_eq!(v["resources"].get("infra"), None);
        assert_eq!(v["resources"]["cloud"], "local");
    }

    #[test]
    fn an_inline_command_is_the_tasks_run() {
        let (text, file) = entrypoint("echo hi from $SKYPILOT_NODE_RANK").unwrap();
        assert!(file.is_none());
        let v: Value = yaml_serde::from_str(&text).unwrap();
        assert_eq!(v["run"], "echo hi from $SKYPILOT_NODE_RANK");
        assert!(entrypoint("missing.yaml").is_err());
    }
}
