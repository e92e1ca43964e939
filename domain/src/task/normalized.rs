//! The task shown back as YAML: normalised (every alternative spelt out as a
//! candidate) and with secret values redacted.

use yaml_serde::Value;

use super::{fmt_num, TaskSpec};

/// The task as YAML, normalised, with secret values redacted.
pub fn to_normalized_yaml(spec: &TaskSpec) -> String {
    let redacted = spec.redacted();
    let mut root = yaml_serde::Mapping::new();
    let mut put = |k: &str, v: Value| {
        root.insert(Value::String(k.to_string()), v);
    };
    if let Some(n) = &redacted.name {
        put("name", Value::String(n.clone()));
    }
    put("num_nodes", Value::Number(redacted.num_nodes.into()));
    let cands: Vec<Value> = redacted
        .resources
        .candidates
        .iter()
        .map(|c| {
            let mut m = yaml_serde::Mapping::new();
            let mut put = |k: &str, v: String| {
                m.insert(Value::String(k.into()), Value::String(v));
            };
            if !c.infra.is_any() {
                put("infra", c.infra.to_string());
            }
            if let Some(a) = &c.accelerator {
                put("accelerators", a.to_string());
            }
            if let Some(q) = &c.cpus {
                put("cpus", q.to_string());
            }
            if let Some(q) = &c.memory {
                put("memory", q.to_string());
            }
            if let Some(t) = &c.instance_type {
                put("instance_type", t.clone());
            }
            if c.use_spot {
                put("use_spot", "true".into());
            }
            if let Some(x) = c.max_hourly_cost {
                put("max_hourly_cost", fmt_num(x));
            }
            if !c.ports.is_empty() {
                let ports: Vec<String> = c.ports.iter().map(ToString::to_string).collect();
                put("ports", ports.join(","));
            }
            if let Some(gb) = c.disk_size_gb {
                put("disk_size", gb.to_string());
            }
            if let Some(t) = c.disk_tier {
                put("disk_tier", t.as_str().into());
            }
            match &c.docker_image {
                Some(img) if c.image_id.is_empty() => put("image_id", format!("docker:{img}")),
                Some(img) => put("image_id.docker", img.clone()),
                None => {}
            }
            match c.image_id.get("*") {
                Some(img) if c.image_id.len() == 1 => put("image_id", img.clone()),
                _ => {
                    for (region, img) in &c.image_id {
                        put(&format!("image_id.{region}"), img.clone());
                    }
                }
            }
            Value::Mapping(m)
        })
        .collect();
    let mut res = yaml_serde::Mapping::new();
    res.insert(
        Value::String(
            if redacted.resources.ordered {
                "ordered"
            } else {
                "any_of"
            }
            .into(),
        ),
        Value::Sequence(cands),
    );
    if !redacted.resources.labels.is_empty() {
        res.insert(
            Value::String("labels".into()),
            yaml_serde::to_value(&redacted.resources.labels).unwrap_or(Value::Null),
        );
    }
    if let Some(p) = redacted.priority {
        res.insert(Value::String("priority".into()), Value::Number(p.into()));
    }
    put("resources", Value::Mapping(res));
    for (key, data) in [("inputs", &redacted.inputs), ("outputs", &redacted.outputs)] {
        if let Some(d) = data {
            let mut m = yaml_serde::Mapping::new();
            let gb = if d.size_gb.fract() == 0.0 && d.size_gb < 1e15 {
                (d.size_gb as i64).into()
            } else {
                d.size_gb.into()
            };
            m.insert(Value::String(d.uri.clone()), Value::Number(gb));
            put(key, Value::Mapping(m));
        }
    }
    if let Some(w) = &redacted.workdir {
        put("workdir", Value::String(w.clone()));
    }
    if let Some(g) = &redacted.workdir_git {
        let mut m = yaml_serde::Mapping::new();
        m.insert(Value::String("url".into()), Value::String(g.url.clone()));
        if let Some(r) = &g.git_ref {
            m.insert(Value::String("ref".into()), Value::String(r.clone()));
        }
        put("workdir", Value::Mapping(m));
    }
    if !redacted.docker_run_options.is_empty() {
        let opts = redacted
            .docker_run_options
            .iter()
            .map(|o| Value::String(o.clone()))
            .collect();
        let mut docker = yaml_serde::Mapping::new();
        docker.insert(Value::String("run_options".into()), Value::Sequence(opts));
        let mut config = yaml_serde::Mapping::new();
        config.insert(Value::String("docker".into()), Value::Mapping(docker));
        put("config", Value::Mapping(config));
    }
    if !redacted.file_mounts.is_empty() {
        let mut mounts = yaml_serde::Mapping::new();
        for (dst, src) in &redacted.file_mounts {
            let src = match src {
                crate::task::MountSource::Local { path, .. } => Value::String(path.clone()),
                crate::task::MountSource::Uri(uri) => Value::String(uri.clone()),
                crate::task::MountSource::Storage(s) => {
                    let mut m = yaml_serde::Mapping::new();
                    let mut put = |k: &str, v: Value| {
                        m.insert(Value::String(k.into()), v);
                    };
                    let bucket = s.bucket.trim_start_matches("s3://").to_string();
                    match &s.local {
                        Some((path, _)) => {
                            put("name", Value::String(bucket));
                            put("source", Value::String(path.clone()));
                        }
                        None if s.create => put("name", Value::String(bucket)),
                        None => put("source", Value::String(s.bucket.clone())),
                    }
                    put("store", Value::String("s3".into()));
                    put("mode", Value::String(s.mode.as_str().into()));
                    if s.read_only {
                        put("read_only", Value::Bool(true));
                    }
                    Value::Mapping(m)
                }
            };
            mounts.insert(Value::String(dst.clone()), src);
        }
        put("file_mounts", Value::Mapping(mounts));
    }
    for (k, m) in [("envs", &redacted.envs), ("secrets", &redacted.secrets)] {
        if !m.is_empty() {
            put(k, yaml_serde::to_value(m).unwrap_or(Value::Null));
        }
    }
    if let Some(s) = &redacted.setup {
        put("setup", Value::String(s.clone()));
    }
    if let Some(s) = &redacted.run {
        put("run", Value::String(s.clone()));
    }
    yaml_serde::to_string(&Value::Mapping(root)).unwrap_or_default()
}
