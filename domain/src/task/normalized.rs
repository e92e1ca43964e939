//! The task shown back as YAML: normalised (every alternative spelt out as a
//! candidate) and with secret values redacted.

use yaml_serde::Value;

use super::{fmt_num, ReplicaPolicy, ServiceSpec, TaskSpec};

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
            let mut put = |k: &str, v: Value| {
                m.insert(Value::String(k.into()), v);
            };
            let s = Value::String;
            if !c.infra.is_any() {
                put("infra", s(c.infra.to_string()));
            }
            if let Some(a) = &c.accelerator {
                put("accelerators", s(a.to_string()));
            }
            if let Some(q) = &c.cpus {
                put("cpus", s(q.to_string()));
            }
            if let Some(q) = &c.memory {
                put("memory", s(q.to_string()));
            }
            if let Some(t) = &c.instance_type {
                put("instance_type", s(t.clone()));
            }
            if c.use_spot {
                put("use_spot", Value::Bool(true));
            }
            if let Some(x) = c.max_hourly_cost {
                put("max_hourly_cost", s(fmt_num(x)));
            }
            if !c.ports.is_empty() {
                // One port or range as a scalar, several as a list (SkyPilot's forms).
                let mut ports: Vec<Value> = c.ports.iter().map(|p| s(p.to_string())).collect();
                put(
                    "ports",
                    match ports.len() {
                        1 => ports.remove(0),
                        _ => Value::Sequence(ports),
                    },
                );
            }
            if let Some(gb) = c.disk_size_gb {
                put("disk_size", s(gb.to_string()));
            }
            if let Some(t) = c.disk_tier {
                put("disk_tier", s(t.as_str().into()));
            }
            match &c.docker_image {
                Some(img) if c.image_id.is_empty() => put("image_id", s(format!("docker:{img}"))),
                Some(img) => put("image_id.docker", s(img.clone())),
                None => {}
            }
            match c.image_id.get("*") {
                Some(img) if c.image_id.len() == 1 => put("image_id", s(img.clone())),
                _ => {
                    for (region, img) in &c.image_id {
                        put(&format!("image_id.{region}"), s(img.clone()));
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
    if let Some(svc) = &redacted.service {
        put("service", service_yaml(svc));
    }
    if let Some(s) = &redacted.setup {
        put("setup", Value::String(s.clone()));
    }
    if let Some(s) = &redacted.run {
        put("run", Value::String(s.clone()));
    }
    yaml_serde::to_string(&Value::Mapping(root)).unwrap_or_default()
}

/// `service:` in SkyPilot's form, every value spelt out.
fn service_yaml(svc: &ServiceSpec) -> Value {
    fn map(entries: Vec<(&str, Value)>) -> Value {
        Value::Mapping(
            entries
                .into_iter()
                .map(|(k, v)| (Value::String(k.into()), v))
                .collect(),
        )
    }
    let n = |x: u32| Value::Number(x.into());
    let p = &svc.readiness_probe;
    let mut probe = vec![("path", Value::String(p.path.clone()))];
    if let Some(d) = &p.post_data {
        probe.push(("post_data", Value::String(d.clone())));
    }
    if !p.headers.is_empty() {
        probe.push((
            "headers",
            Value::Mapping(
                p.headers
                    .iter()
                    .map(|(k, v)| (Value::String(k.clone()), Value::String(v.clone())))
                    .collect(),
            ),
        ));
    }
    probe.extend([
        ("initial_delay_seconds", n(p.initial_delay_s)),
        ("timeout_seconds", n(p.timeout_s)),
        ("endpoint_probe_interval_seconds", n(p.interval_s)),
        (
            "consecutive_failure_threshold_timeout",
            n(p.failure_timeout_s),
        ),
    ]);
    let r = &svc.replica_policy;
    let mut out = vec![("readiness_probe", map(probe))];
    if *r == ReplicaPolicy::fixed(r.min_replicas) {
        out.push(("replicas", n(r.min_replicas)));
    } else {
        let mut policy = vec![
            ("min_replicas", n(r.min_replicas)),
            ("max_replicas", n(r.max_replicas)),
        ];
        if let Some(q) = r.target_qps_per_replica {
            policy.push(("target_qps_per_replica", Value::Number(q.into())));
        }
        policy.extend([
            ("num_overprovision", n(r.num_overprovision)),
            ("upscale_delay_seconds", n(r.upscale_delay_s)),
            ("downscale_delay_seconds", n(r.downscale_delay_s)),
            (
                "base_ondemand_fallback_replicas",
                n(r.base_ondemand_fallback_replicas),
            ),
            (
                "dynamic_ondemand_fallback",
                Value::Bool(r.dynamic_ondemand_fallback),
            ),
        ]);
        out.push(("replica_policy", map(policy)));
    }
    out.push((
        "load_balancing_policy",
        Value::String(svc.load_balancing_policy.as_str().into()),
    ));
    out.push(("ports", Value::Number(svc.port.into())));
    if let Some(t) = &svc.tls {
        out.push((
            "tls",
            map(vec![
                ("keyfile", Value::String(t.keyfile.clone())),
                ("certfile", Value::String(t.certfile.clone())),
            ]),
        ));
    }
    out.push((
        "load_balancer",
        map(vec![("stream_timeout_seconds", n(svc.stream_timeout_s))]),
    ));
    map(out)
}
