//! `service:`: SkyServe's serving section (replicas behind the
//! coordinators' load balancer), with SkyServe's defaults.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use yaml_serde::Value;

use super::yaml::{as_map, check_keys, key_str, kind, scalar_string, show};
use super::{PortRange, ResourceRequest, Result, SpecError};

/// A validated `service:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// `readiness_probe`: what makes a replica READY.
    pub readiness_probe: ReadinessProbe,
    /// How many replicas, fixed or scaled on load.
    pub replica_policy: ReplicaPolicy,
    /// `load_balancing_policy`.
    pub load_balancing_policy: LoadBalancingPolicy,
    /// The port each replica serves on (`service.ports`, else the one port
    /// of `resources.ports`).
    pub port: u16,
    /// `tls`: the load balancer serves HTTPS with these files (paths on the
    /// coordinators).
    pub tls: Option<ServiceTls>,
    /// `load_balancer.stream_timeout_seconds`: the longest a proxied
    /// response may stream.
    pub stream_timeout_s: u32,
}

/// `readiness_probe`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadinessProbe {
    /// Starts with `/`; `/` when the task gives none.
    pub path: String,
    /// `post_data`: the probe POSTs this JSON (compact) instead of a GET.
    pub post_data: Option<String>,
    /// `headers`, sent with each probe.
    pub headers: BTreeMap<String, String>,
    /// `initial_delay_seconds` (1200): a replica never ready fails once its
    /// probes have failed this long.
    pub initial_delay_s: u32,
    /// `timeout_seconds` (15): one probe's limit.
    pub timeout_s: u32,
    /// `endpoint_probe_interval_seconds` (10).
    pub interval_s: u32,
    /// `consecutive_failure_threshold_timeout` (180 s): a replica that was
    /// ready fails once its probes have failed this long in a row.
    pub failure_timeout_s: u32,
}

/// `replicas` or `replica_policy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaPolicy {
    /// `min_replicas` (`replicas`: the fixed count).
    pub min_replicas: u32,
    /// `max_replicas` (defaults to min).
    pub max_replicas: u32,
    /// `target_qps_per_replica`: autoscaling on load when set.
    pub target_qps_per_replica: Option<f64>,
    /// `num_overprovision`: added on top of the target.
    pub num_overprovision: u32,
    /// `upscale_delay_seconds` (300).
    pub upscale_delay_s: u32,
    /// `downscale_delay_seconds` (1200).
    pub downscale_delay_s: u32,
    /// `base_ondemand_fallback_replicas`: on-demand replicas always kept
    /// among the target (spot tasks only).
    pub base_ondemand_fallback_replicas: u32,
    /// `dynamic_ondemand_fallback`: on-demand replicas stand in for spot
    /// ones that are not READY (spot tasks only).
    pub dynamic_ondemand_fallback: bool,
}

/// `load_balancing_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum LoadBalancingPolicy {
    /// Cycles through the ready replicas.
    RoundRobin,
    /// The fewest requests in flight (SkyServe's default).
    #[default]
    LeastLoad,
}

/// `service.tls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceTls {
    /// `keyfile`.
    pub keyfile: String,
    /// `certfile`.
    pub certfile: String,
}

/// Most replicas a service may ask for (`replicas`, `min_replicas`,
/// `max_replicas`, `num_overprovision`, `base_ondemand_fallback_replicas`).
pub const MAX_SERVICE_REPLICAS: u32 = 100;

/// The longest any of the section's durations may be, in seconds (a day).
pub const MAX_SERVICE_SECONDS: u32 = 86_400;

impl Default for ReadinessProbe {
    /// SkyServe's probe: `GET /`, with its timings.
    fn default() -> Self {
        ReadinessProbe {
            path: "/".into(),
            post_data: None,
            headers: BTreeMap::new(),
            initial_delay_s: 1200,
            timeout_s: 15,
            interval_s: 10,
            failure_timeout_s: 180,
        }
    }
}

impl ReplicaPolicy {
    /// `replicas: n`: a fixed count, with SkyServe's other defaults.
    pub fn fixed(n: u32) -> Self {
        ReplicaPolicy {
            min_replicas: n,
            max_replicas: n,
            target_qps_per_replica: None,
            num_overprovision: 0,
            upscale_delay_s: 300,
            downscale_delay_s: 1200,
            base_ondemand_fallback_replicas: 0,
            dynamic_ondemand_fallback: false,
        }
    }

    /// Whether the count scales with load (`target_qps_per_replica` set).
    pub fn autoscales(&self) -> bool {
        self.target_qps_per_replica.is_some()
    }
}

impl LoadBalancingPolicy {
    /// As SkyServe spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadBalancingPolicy::RoundRobin => "round_robin",
            LoadBalancingPolicy::LeastLoad => "least_load",
        }
    }
}

const SERVICE_SUPPORTED: &[&str] = &[
    "readiness_probe",
    "replicas",
    "replica_policy",
    "load_balancing_policy",
    "ports",
    "tls",
    "load_balancer",
];

const PROBE_SUPPORTED: &[&str] = &[
    "path",
    "post_data",
    "headers",
    "initial_delay_seconds",
    "timeout_seconds",
    "endpoint_probe_interval_seconds",
    "consecutive_failure_threshold_timeout",
];

const POLICY_SUPPORTED: &[&str] = &[
    "min_replicas",
    "max_replicas",
    "target_qps_per_replica",
    "num_overprovision",
    "upscale_delay_seconds",
    "downscale_delay_seconds",
    "base_ondemand_fallback_replicas",
    "dynamic_ondemand_fallback",
];

const POLICY_REFUSED: &[(&str, &str)] = &[(
    "spot_placer",
    "Nembo places replacement replicas by its own EAGER_NEXT_REGION rule (the next region \
     after a preemption), not by a spot placer; drop `spot_placer`",
)];

const INSTANCE_AWARE: &str = "SkyServe's instance_aware_least_load policy (QPS per accelerator \
    type), and Nembo has no instance-aware policy";

/// `service:` (SkyServe's section), with SkyServe's defaults, checked
/// against the task's `resources`: the replicas' port must be known (and
/// is added to every candidate's `ports` when `service.ports` names one
/// they do not open), spot and on-demand candidates cannot mix, and the
/// on-demand fallback options need `use_spot: true`.
pub(super) fn parse_service(v: &Value, resources: &mut ResourceRequest) -> Result<ServiceSpec> {
    const P: &str = "service";
    let empty = yaml_serde::Mapping::new();
    let map = match v {
        Value::Null => &empty,
        other => as_map(other, P)?,
    };
    check_keys(map, P, SERVICE_SUPPORTED, &[])?;
    let get = |k: &str| map.get(k).filter(|v| !v.is_null());

    let readiness_probe = match get("readiness_probe") {
        None => ReadinessProbe::default(),
        Some(p) => parse_probe(p)?,
    };

    let replica_policy = match (get("replicas"), get("replica_policy")) {
        (Some(_), Some(_)) => {
            return Err(SpecError::new(
                "service.replicas",
                "give either `replicas` (a fixed count) or `replica_policy`, not both",
            ))
        }
        (Some(n), None) => {
            let n = count(n, "service.replicas", 1)?;
            ReplicaPolicy::fixed(n)
        }
        (None, Some(p)) => parse_policy(p)?,
        (None, None) => ReplicaPolicy::fixed(1),
    };
    check_spot(&replica_policy, resources)?;

    let load_balancing_policy = match get("load_balancing_policy") {
        None => LoadBalancingPolicy::default(),
        Some(Value::String(s)) => match s.trim() {
            "round_robin" => LoadBalancingPolicy::RoundRobin,
            "least_load" => LoadBalancingPolicy::LeastLoad,
            "instance_aware_least_load" => {
                return Err(SpecError::new(
                    "service.load_balancing_policy",
                    format!(
                    "'instance_aware_least_load' is valid SkyPilot, but it is {INSTANCE_AWARE}; \
                         use least_load or round_robin"
                ),
                ))
            }
            other => {
                return Err(SpecError::new(
                    "service.load_balancing_policy",
                    format!("unknown policy '{other}' (expected round_robin or least_load)"),
                ))
            }
        },
        Some(other) => {
            return Err(SpecError::new(
                "service.load_balancing_policy",
                format!("expected round_robin or least_load, got {}", kind(other)),
            ))
        }
    };

    let port = match get("ports") {
        Some(p) => {
            let port = match p {
                Value::Number(n) => n.as_u64().filter(|n| (1..=65_535).contains(n)),
                _ => None,
            }
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| {
                SpecError::new(
                    "service.ports",
                    format!("expected one port from 1 to 65535, got {}", show(p)),
                )
            })?;
            open_port(resources, port);
            port
        }
        None => resource_port(resources)?,
    };

    let tls = match get("tls") {
        None => None,
        Some(t) => {
            let m = as_map(t, "service.tls")?;
            check_keys(m, "service.tls", &["keyfile", "certfile"], &[])?;
            let file = |k: &str| -> Result<String> {
                let path = format!("service.tls.{k}");
                match m.get(k) {
                    Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
                    None | Some(Value::Null) => Err(SpecError::new(
                        path,
                        "required: TLS needs both keyfile and certfile",
                    )),
                    Some(other) => Err(SpecError::new(
                        path,
                        format!("expected a file path, got {}", show(other)),
                    )),
                }
            };
            Some(ServiceTls {
                keyfile: file("keyfile")?,
                certfile: file("certfile")?,
            })
        }
    };

    let stream_timeout_s = match get("load_balancer") {
        None => 120,
        Some(lb) => {
            let m = as_map(lb, "service.load_balancer")?;
            check_keys(m, "service.load_balancer", &["stream_timeout_seconds"], &[])?;
            match m.get("stream_timeout_seconds").filter(|v| !v.is_null()) {
                None => 120,
                Some(s) => seconds(s, "service.load_balancer.stream_timeout_seconds", 1)?,
            }
        }
    };

    Ok(ServiceSpec {
        readiness_probe,
        replica_policy,
        load_balancing_policy,
        port,
        tls,
        stream_timeout_s,
    })
}

/// `readiness_probe`: a path, or `{path, post_data, headers, timings}`.
fn parse_probe(v: &Value) -> Result<ReadinessProbe> {
    const P: &str = "service.readiness_probe";
    let mut probe = ReadinessProbe::default();
    let m = match v {
        Value::String(s) => {
            probe.path = probe_path(s, P)?;
            return Ok(probe);
        }
        Value::Mapping(m) => m,
        other => {
            return Err(SpecError::new(
                P,
                format!("expected a path or a mapping, got {}", kind(other)),
            ))
        }
    };
    check_keys(m, P, PROBE_SUPPORTED, &[])?;
    let get = |k: &str| m.get(k).filter(|v| !v.is_null());
    probe.path = match get("path") {
        Some(Value::String(s)) => probe_path(s, &format!("{P}.path"))?,
        Some(other) => {
            return Err(SpecError::new(
                format!("{P}.path"),
                format!("expected a path starting with '/', got {}", show(other)),
            ))
        }
        None => {
            return Err(SpecError::new(
                format!("{P}.path"),
                "required: the path the probe requests, e.g. '/health'",
            ))
        }
    };
    if let Some(d) = get("post_data") {
        probe.post_data = Some(post_data(d)?);
    }
    if let Some(h) = get("headers") {
        let hp = format!("{P}.headers");
        for (k, val) in as_map(h, &hp)? {
            let name = key_str(k, &hp)?;
            let path = format!("{hp}.{name}");
            let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if name.is_empty() || name.len() > 256 || !name.chars().all(token) {
                return Err(SpecError::new(path, "is not an HTTP header name"));
            }
            let value = scalar_string(val, &path)?;
            if value.len() > 8192 || value.chars().any(|c| c == '\r' || c == '\n' || c == '\0') {
                return Err(SpecError::new(
                    path,
                    "a header value is one line of at most 8192 bytes",
                ));
            }
            probe.headers.insert(name.to_string(), value);
        }
        if probe.headers.len() > 64 {
            return Err(SpecError::new(hp, "at most 64 headers"));
        }
    }
    for (key, min, field) in [
        ("initial_delay_seconds", 0, &mut probe.initial_delay_s),
        ("timeout_seconds", 1, &mut probe.timeout_s),
        ("endpoint_probe_interval_seconds", 1, &mut probe.interval_s),
        (
            "consecutive_failure_threshold_timeout",
            1,
            &mut probe.failure_timeout_s,
        ),
    ] {
        if let Some(s) = get(key) {
            *field = seconds(s, &format!("{P}.{key}"), min)?;
        }
    }
    Ok(probe)
}

fn probe_path(s: &str, path: &str) -> Result<String> {
    let s = s.trim();
    if !s.starts_with('/') {
        return Err(SpecError::new(
            path,
            format!("'{s}': the probe's path must start with '/' (e.g. '/health')"),
        ));
    }
    if s.len() > 2048 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SpecError::new(
            path,
            "a URL path of at most 2048 characters, without spaces",
        ));
    }
    Ok(s.to_string())
}

/// `post_data`: a JSON string, or YAML data; kept as compact JSON.
fn post_data(v: &Value) -> Result<String> {
    const P: &str = "service.readiness_probe.post_data";
    let json: serde_json::Value = match v {
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| SpecError::new(P, format!("is not valid JSON: {e}")))?,
        Value::Mapping(_) | Value::Sequence(_) => serde_json::to_value(v)
            .map_err(|e| SpecError::new(P, format!("cannot be sent as JSON: {e}")))?,
        other => {
            return Err(SpecError::new(
                P,
                format!("expected a JSON string or a mapping, got {}", kind(other)),
            ))
        }
    };
    let body = json.to_string();
    if body.len() > 65_536 {
        return Err(SpecError::new(P, "at most 64 KiB of JSON"));
    }
    Ok(body)
}

/// `replica_policy`.
fn parse_policy(v: &Value) -> Result<ReplicaPolicy> {
    const P: &str = "service.replica_policy";
    let m = as_map(v, P)?;
    check_keys(m, P, POLICY_SUPPORTED, POLICY_REFUSED)?;
    let get = |k: &str| m.get(k).filter(|v| !v.is_null());
    let field = |k: &str| format!("{P}.{k}");
    let mut policy = ReplicaPolicy::fixed(0);
    policy.min_replicas = match get("min_replicas") {
        Some(n) => count(n, &field("min_replicas"), 0)?,
        None => {
            return Err(SpecError::new(
                field("min_replicas"),
                "required in replica_policy (or give `replicas: N` for a fixed count)",
            ))
        }
    };
    let max_given = get("max_replicas")
        .map(|n| count(n, &field("max_replicas"), 0))
        .transpose()?;
    policy.max_replicas = max_given.unwrap_or(policy.min_replicas);
    policy.target_qps_per_replica = match get("target_qps_per_replica") {
        None => None,
        Some(Value::Mapping(_)) => {
            return Err(SpecError::new(
                field("target_qps_per_replica"),
                format!(
                    "a QPS per accelerator type is {INSTANCE_AWARE}; give one number, \
                     the QPS each replica should serve"
                ),
            ))
        }
        Some(q) => Some(
            match q {
                Value::Number(n) => n.as_f64().filter(|x| x.is_finite() && *x > 0.0),
                _ => None,
            }
            .ok_or_else(|| {
                SpecError::new(
                    field("target_qps_per_replica"),
                    format!("expected a positive number, got {}", show(q)),
                )
            })?,
        ),
    };
    if let Some(n) = get("num_overprovision") {
        policy.num_overprovision = count(n, &field("num_overprovision"), 0)?;
    }
    if let Some(s) = get("upscale_delay_seconds") {
        policy.upscale_delay_s = seconds(s, &field("upscale_delay_seconds"), 0)?;
    }
    if let Some(s) = get("downscale_delay_seconds") {
        policy.downscale_delay_s = seconds(s, &field("downscale_delay_seconds"), 0)?;
    }
    if let Some(n) = get("base_ondemand_fallback_replicas") {
        policy.base_ondemand_fallback_replicas =
            count(n, &field("base_ondemand_fallback_replicas"), 0)?;
    }
    if let Some(b) = get("dynamic_ondemand_fallback") {
        policy.dynamic_ondemand_fallback = b.as_bool().ok_or_else(|| {
            SpecError::new(
                field("dynamic_ondemand_fallback"),
                format!("expected true or false, got {}", show(b)),
            )
        })?;
    }

    let (min, max) = (policy.min_replicas, policy.max_replicas);
    if max < min {
        return Err(SpecError::new(
            field("max_replicas"),
            format!("must be at least min_replicas ({min}), got {max}"),
        ));
    }
    if policy.autoscales() && max_given.is_none() {
        return Err(SpecError::new(
            field("max_replicas"),
            "required with target_qps_per_replica: the autoscaler needs an upper bound",
        ));
    }
    if !policy.autoscales() && min != max {
        return Err(SpecError::new(
            field("target_qps_per_replica"),
            format!(
                "min_replicas ({min}) and max_replicas ({max}) differ, and scaling between \
                 them needs target_qps_per_replica; set it, or make them equal"
            ),
        ));
    }
    if max == 0 {
        return Err(if policy.autoscales() {
            SpecError::new(
                field("max_replicas"),
                "must be at least 1: the service scales up from zero to it",
            )
        } else {
            SpecError::new(
                field("min_replicas"),
                "0 replicas serve nothing: give at least 1, or scale from zero with \
                 target_qps_per_replica and max_replicas of at least 1",
            )
        });
    }
    Ok(policy)
}

/// Spot replicas: candidates all spot or all on-demand, and the on-demand
/// fallback only for spot ones.
fn check_spot(policy: &ReplicaPolicy, resources: &ResourceRequest) -> Result<()> {
    let spot = resources.candidates.iter().filter(|c| c.use_spot).count();
    if spot > 0 && spot < resources.candidates.len() {
        return Err(SpecError::new(
            "resources.use_spot",
            "a service's candidates are all spot or all on-demand, and these mix both; \
             for on-demand replicas beside spot ones, use replica_policy's \
             base_ondemand_fallback_replicas or dynamic_ondemand_fallback with use_spot: true",
        ));
    }
    let fallback = if policy.base_ondemand_fallback_replicas > 0 {
        Some("base_ondemand_fallback_replicas")
    } else if policy.dynamic_ondemand_fallback {
        Some("dynamic_ondemand_fallback")
    } else {
        None
    };
    if let (Some(f), 0) = (fallback, spot) {
        return Err(SpecError::new(
            format!("service.replica_policy.{f}"),
            "on-demand fallback is for spot replicas, and the task's resources do not set \
             use_spot: true",
        ));
    }
    Ok(())
}

/// Opens `port` on every candidate that does not already.
fn open_port(resources: &mut ResourceRequest, port: u16) {
    let one = PortRange {
        start: port,
        end: port,
    };
    for c in &mut resources.candidates {
        if PortRange::all_within(&[one], &c.ports) {
            continue;
        }
        c.ports.push(one);
        c.ports.sort();
        let mut merged: Vec<PortRange> = Vec::new();
        for r in c.ports.drain(..) {
            match merged.last_mut() {
                Some(last) if u32::from(r.start) <= u32::from(last.end) + 1 => {
                    last.end = last.end.max(r.end);
                }
                _ => merged.push(r),
            }
        }
        c.ports = merged;
    }
}

/// Without `service.ports`: the one port every candidate opens.
fn resource_port(resources: &ResourceRequest) -> Result<u16> {
    const P: &str = "service.ports";
    let mut found: Option<u16> = None;
    for c in &resources.candidates {
        let port = match c.ports.as_slice() {
            [] => {
                return Err(SpecError::new(
                    P,
                    "the replicas' port is not known: set service.ports, or open exactly one \
                     port in resources.ports",
                ))
            }
            [r] if r.start == r.end => r.start,
            several => {
                let shown: Vec<String> = several.iter().map(ToString::to_string).collect();
                return Err(SpecError::new(
                    P,
                    format!(
                        "resources.ports opens {}, not one port: set service.ports to the \
                         one the replicas serve on",
                        shown.join(",")
                    ),
                ));
            }
        };
        match found {
            Some(f) if f != port => {
                return Err(SpecError::new(
                    P,
                    format!(
                        "the candidates open different ports ({f} and {port}): set \
                         service.ports, or open the same port in each"
                    ),
                ))
            }
            _ => found = Some(port),
        }
    }
    found.ok_or_else(|| {
        SpecError::new(
            P,
            "the replicas' port is not known: set service.ports, or open exactly one port in \
             resources.ports",
        )
    })
}

/// A replica count from `min` to [`MAX_SERVICE_REPLICAS`].
fn count(v: &Value, path: &str, min: u32) -> Result<u32> {
    let n = match v {
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
    .ok_or_else(|| {
        SpecError::new(
            path,
            format!("expected a whole number of replicas, got {}", show(v)),
        )
    })?;
    if n < i64::from(min) {
        return Err(SpecError::new(
            path,
            format!("must be at least {min}, got {n}"),
        ));
    }
    if n > i64::from(MAX_SERVICE_REPLICAS) {
        return Err(SpecError::new(
            path,
            format!(
                "must be at most {MAX_SERVICE_REPLICAS} (Nembo's cap on a service's replicas), \
                 got {n}"
            ),
        ));
    }
    Ok(n as u32)
}

/// Whole seconds from `min` to [`MAX_SERVICE_SECONDS`].
fn seconds(v: &Value, path: &str, min: u32) -> Result<u32> {
    let n = match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|x| x.fract() == 0.0 && x.abs() < 1e15)
                .map(|x| x as i64)
        }),
        _ => None,
    }
    .ok_or_else(|| SpecError::new(path, format!("expected whole seconds, got {}", show(v))))?;
    if n < i64::from(min) || n > i64::from(MAX_SERVICE_SECONDS) {
        return Err(SpecError::new(
            path,
            format!("must be from {min} to {MAX_SERVICE_SECONDS} seconds (a day), got {n}"),
        ));
    }
    Ok(n as u32)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::{parse_task_yaml, PortRange, SpecError, TaskSpec};
    use super::*;

    fn parse(y: &str) -> TaskSpec {
        parse_task_yaml(y, &BTreeMap::new()).unwrap_or_else(|e| panic!("{e}\n{y}"))
    }

    fn service(y: &str) -> ServiceSpec {
        parse(y).service.expect("a service")
    }

    fn err(y: &str) -> SpecError {
        match parse_task_yaml(y, &BTreeMap::new()) {
            Ok(s) => panic!("accepted: {:?}\n{y}", s.service),
            Err(e) => e,
        }
    }

    /// `err` at `path`, its message holding each of `words`.
    fn refused(y: &str, path: &str, words: &[&str]) {
        let e = err(y);
        assert_eq!(e.path, path, "{e}\n{y}");
        for w in words {
            assert!(e.message.contains(w), "'{w}' not in: {e}");
        }
    }

    const ONE_PORT: &str = "resources: {ports: 8080}\n";

    #[test]
    fn the_skypilot_docs_example_parses_whole() {
        let y = r#"
service:
  readiness_probe:
    path: /v1/chat/completions
    post_data:
      model: meta-llama/Meta-Llama-3-8B-Instruct
      messages:
        - role: user
          content: Hello! What is your name?
      max_tokens: 1
    headers:
      Authorization: Bearer $TOKEN
    initial_delay_seconds: 1800
    timeout_seconds: 30
  replica_policy:
    min_replicas: 2
    max_replicas: 10
    target_qps_per_replica: 2.5
    upscale_delay_seconds: 60
    downscale_delay_seconds: 600
  load_balancing_policy: round_robin
  ports: 8081
  tls: {keyfile: ~/certs/key.pem, certfile: ~/certs/cert.pem}
  load_balancer: {stream_timeout_seconds: 600}
resources:
  accelerators: {L4: 1, A10G: 1}
  ports: 8081
run: vllm serve meta-llama/Meta-Llama-3-8B-Instruct --port 8081
"#;
        let s = service(y);
        // Compact JSON (compared as JSON: key order is serde_json's).
        let body = s.readiness_probe.post_data.clone().unwrap_or_default();
        assert!(!body.contains(": ") && !body.contains('\n'), "{body}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).ok(),
            Some(serde_json::json!({
                "model": "meta-llama/Meta-Llama-3-8B-Instruct",
                "messages": [{"role": "user", "content": "Hello! What is your name?"}],
                "max_tokens": 1,
            }))
        );
        assert_eq!(
            s.readiness_probe,
            ReadinessProbe {
                path: "/v1/chat/completions".into(),
                post_data: Some(body),
                headers: [("Authorization".to_string(), "Bearer $TOKEN".to_string())].into(),
                initial_delay_s: 1800,
                timeout_s: 30,
                interval_s: 10,
                failure_timeout_s: 180,
            }
        );
        assert_eq!(
            s.replica_policy,
            ReplicaPolicy {
                min_replicas: 2,
                max_replicas: 10,
                target_qps_per_replica: Some(2.5),
                num_overprovision: 0,
                upscale_delay_s: 60,
                downscale_delay_s: 600,
                base_ondemand_fallback_replicas: 0,
                dynamic_ondemand_fallback: false,
            }
        );
        assert!(s.replica_policy.autoscales());
        assert_eq!(s.load_balancing_policy, LoadBalancingPolicy::RoundRobin);
        assert_eq!(s.port, 8081);
        assert_eq!(
            s.tls,
            Some(ServiceTls {
                keyfile: "~/certs/key.pem".into(),
                certfile: "~/certs/cert.pem".into(),
            })
        );
        assert_eq!(s.stream_timeout_s, 600);
    }

    #[test]
    fn skyserves_defaults_fill_what_the_section_leaves_out() {
        let s = service(&format!("service: {{}}\n{ONE_PORT}"));
        assert_eq!(s.readiness_probe, ReadinessProbe::default());
        assert_eq!(s.readiness_probe.path, "/");
        assert_eq!(
            (
                s.readiness_probe.initial_delay_s,
                s.readiness_probe.timeout_s,
                s.readiness_probe.interval_s,
                s.readiness_probe.failure_timeout_s
            ),
            (1200, 15, 10, 180)
        );
        assert_eq!(s.replica_policy, ReplicaPolicy::fixed(1));
        assert_eq!(
            (
                s.replica_policy.upscale_delay_s,
                s.replica_policy.downscale_delay_s
            ),
            (300, 1200)
        );
        assert_eq!(s.load_balancing_policy, LoadBalancingPolicy::LeastLoad);
        assert_eq!(
            (s.port, s.tls.clone(), s.stream_timeout_s),
            (8080, None, 120)
        );

        // The short forms.
        let s = service(&format!(
            "service: {{readiness_probe: /health, replicas: 3}}\n{ONE_PORT}"
        ));
        assert_eq!(s.readiness_probe.path, "/health");
        assert_eq!(s.replica_policy, ReplicaPolicy::fixed(3));
        // A policy's max defaults to its min.
        let s = service(&format!(
            "service: {{replica_policy: {{min_replicas: 2}}}}\n{ONE_PORT}"
        ));
        assert_eq!(
            (s.replica_policy.min_replicas, s.replica_policy.max_replicas),
            (2, 2)
        );
        // post_data as a JSON string is kept compact.
        let s = service(&format!(
            "service:\n  readiness_probe:\n    path: /\n    post_data: '{{ \"a\" : [1, 2] }}'\n{ONE_PORT}"
        ));
        assert_eq!(
            s.readiness_probe.post_data.as_deref(),
            Some(r#"{"a":[1,2]}"#)
        );
        // Scaling from zero.
        let s = service(&format!(
            "service: {{replica_policy: {{min_replicas: 0, max_replicas: 3, target_qps_per_replica: 1}}}}\n{ONE_PORT}"
        ));
        assert_eq!(s.replica_policy.min_replicas, 0);
        // No section (or an empty one) is no service, as in SkyPilot.
        assert_eq!(parse("run: x").service, None);
        assert_eq!(parse("service:\nrun: x").service, None);
    }

    #[test]
    fn replica_counts_are_checked_against_each_other() {
        let p = |policy: &str| format!("service: {{replica_policy: {policy}}}\n{ONE_PORT}");
        refused(
            &p("{min_replicas: 3, max_replicas: 2, target_qps_per_replica: 1}"),
            "service.replica_policy.max_replicas",
            &["at least min_replicas (3)", "got 2"],
        );
        refused(
            &p("{min_replicas: 1, target_qps_per_replica: 1}"),
            "service.replica_policy.max_replicas",
            &["required with target_qps_per_replica"],
        );
        refused(
            &p("{min_replicas: 1, max_replicas: 3}"),
            "service.replica_policy.target_qps_per_replica",
            &["min_replicas (1) and max_replicas (3) differ"],
        );
        refused(
            &p("{min_replicas: 0}"),
            "service.replica_policy.min_replicas",
            &["0 replicas serve nothing"],
        );
        refused(
            &p("{min_replicas: 0, max_replicas: 0, target_qps_per_replica: 1}"),
            "service.replica_policy.max_replicas",
            &["at least 1"],
        );
        refused(
            &p("{max_replicas: 2}"),
            "service.replica_policy.min_replicas",
            &["required"],
        );
        refused(
            &p("{min_replicas: 1, max_replicas: 101, target_qps_per_replica: 1}"),
            "service.replica_policy.max_replicas",
            &["at most 100"],
        );
        refused(
            &p("{min_replicas: -1}"),
            "service.replica_policy.min_replicas",
            &["at least 0"],
        );
        refused(
            &p("{min_replicas: 1, max_replicas: 2, target_qps_per_replica: 0}"),
            "service.replica_policy.target_qps_per_replica",
            &["positive number"],
        );
        refused(
            &p("{min_replicas: 1, max_replicas: 2, target_qps_per_replica: {H100: 5}}"),
            "service.replica_policy.target_qps_per_replica",
            &["instance_aware_least_load", "no instance-aware policy"],
        );
        refused(
            &p("{min_replicas: 1, spot_placer: dynamic_fallback}"),
            "service.replica_policy.spot_placer",
            &["EAGER_NEXT_REGION"],
        );
        refused(
            &format!("service: {{replicas: 0}}\n{ONE_PORT}"),
            "service.replicas",
            &["at least 1"],
        );
        refused(
            &format!("service: {{replicas: 500}}\n{ONE_PORT}"),
            "service.replicas",
            &["at most 100", "got 500"],
        );
        refused(
            &format!("service: {{replicas: 2, replica_policy: {{min_replicas: 2}}}}\n{ONE_PORT}"),
            "service.replicas",
            &["not both"],
        );
    }

    #[test]
    fn spot_options_need_spot_candidates_and_no_job_recovery() {
        let fallback =
            "service: {replica_policy: {min_replicas: 1, base_ondemand_fallback_replicas: 1}}\n";
        refused(
            &format!("{fallback}{ONE_PORT}"),
            "service.replica_policy.base_ondemand_fallback_replicas",
            &["use_spot: true"],
        );
        let s = service(&format!(
            "{fallback}resources: {{ports: 8080, use_spot: true}}"
        ));
        assert_eq!(s.replica_policy.base_ondemand_fallback_replicas, 1);
        refused(
            &format!(
                "service: {{replica_policy: {{min_replicas: 1, dynamic_ondemand_fallback: true}}}}\n{ONE_PORT}"
            ),
            "service.replica_policy.dynamic_ondemand_fallback",
            &["use_spot: true"],
        );
        refused(
            "service: {}\nresources: {ports: 8080, any_of: [{use_spot: true}, {use_spot: false}]}",
            "resources.use_spot",
            &["all spot or all on-demand"],
        );
        refused(
            "service: {}\nresources: {ports: 8080, job_recovery: EAGER_NEXT_REGION}",
            "resources.job_recovery",
            &["replaced by the service itself"],
        );
    }

    #[test]
    fn the_probe_is_a_path_from_slash_with_bounded_timings() {
        let probe = |p: &str| format!("service: {{readiness_probe: {p}}}\n{ONE_PORT}");
        refused(
            &probe("health"),
            "service.readiness_probe",
            &["must start with '/'"],
        );
        refused(
            &probe("{timeout_seconds: 5}"),
            "service.readiness_probe.path",
            &["required"],
        );
        refused(
            &probe("{path: v1}"),
            "service.readiness_probe.path",
            &["must start with '/'"],
        );
        refused(
            &probe("{path: /, post_data: '{not json'}"),
            "service.readiness_probe.post_data",
            &["not valid JSON"],
        );
        refused(
            &probe("{path: /, timeout_seconds: 0}"),
            "service.readiness_probe.timeout_seconds",
            &["from 1 to 86400"],
        );
        refused(
            &probe("{path: /, endpoint_probe_interval_seconds: 0}"),
            "service.readiness_probe.endpoint_probe_interval_seconds",
            &["from 1"],
        );
        refused(
            &probe("{path: /, initial_delay_seconds: 100000}"),
            "service.readiness_probe.initial_delay_seconds",
            &["86400", "got 100000"],
        );
        refused(
            &probe("{path: /, timeout_seconds: 1.5}"),
            "service.readiness_probe.timeout_seconds",
            &["whole seconds"],
        );
        refused(
            &probe("{path: /, headers: {'Bad Name': x}}"),
            "service.readiness_probe.headers.Bad Name",
            &["header name"],
        );
        let s = service(&probe("{path: /, initial_delay_seconds: 0}"));
        assert_eq!(s.readiness_probe.initial_delay_s, 0);
        refused(
            &format!("service: {{load_balancer: {{stream_timeout_seconds: 0}}}}\n{ONE_PORT}"),
            "service.load_balancer.stream_timeout_seconds",
            &["from 1"],
        );
    }

    #[test]
    fn load_balancing_policy_and_tls() {
        let lb = |p: &str| format!("service: {{load_balancing_policy: {p}}}\n{ONE_PORT}");
        assert_eq!(
            service(&lb("least_load")).load_balancing_policy,
            LoadBalancingPolicy::LeastLoad
        );
        refused(
            &lb("instance_aware_least_load"),
            "service.load_balancing_policy",
            &["no instance-aware policy", "least_load or round_robin"],
        );
        refused(
            &lb("random"),
            "service.load_balancing_policy",
            &["'random'", "round_robin or least_load"],
        );
        refused(
            &format!("service: {{tls: {{keyfile: k.pem}}}}\n{ONE_PORT}"),
            "service.tls.certfile",
            &["required"],
        );
        refused(
            &format!("service: {{tls: {{keyfile: k.pem, certfile: c.pem, ca: x}}}}\n{ONE_PORT}"),
            "service.tls.ca",
            &["unknown field"],
        );
    }

    #[test]
    fn the_replicas_port_is_service_ports_or_the_one_resource_port() {
        let ports = |t: &TaskSpec| -> Vec<Vec<PortRange>> {
            t.resources
                .candidates
                .iter()
                .map(|c| c.ports.clone())
                .collect()
        };
        let one = |p: u16| PortRange { start: p, end: p };
        // service.ports is opened on every candidate that lacks it.
        let t = parse(
            "service: {ports: 8080}\nresources: {any_of: [{ports: 22}, {ports: '8000-9000'}]}",
        );
        assert_eq!(t.service.as_ref().map(|s| s.port), Some(8080));
        assert_eq!(
            ports(&t),
            [
                vec![one(22), one(8080)],
                vec![PortRange {
                    start: 8000,
                    end: 9000
                }]
            ]
        );
        let t = parse("service: {ports: 8080}\nresources: {ports: 8081}");
        assert_eq!(
            ports(&t),
            [vec![PortRange {
                start: 8080,
                end: 8081
            }]]
        );
        let t = parse("service: {ports: 9000}");
        assert_eq!(ports(&t), [vec![one(9000)]]);
        // Unset: the one port every candidate opens.
        let t = parse("service: {}\nresources: {ports: 8080, any_of: [{cpus: 2}, {cpus: 4}]}");
        assert_eq!(t.service.map(|s| s.port), Some(8080));
        refused(
            "service: {}\nrun: x",
            "service.ports",
            &["set service.ports", "exactly one"],
        );
        refused(
            "service: {}\nresources: {ports: [8080, 8082]}",
            "service.ports",
            &["8080,8082", "not one port"],
        );
        refused(
            "service: {}\nresources: {ports: '8000-8010'}",
            "service.ports",
            &["8000-8010"],
        );
        refused(
            "service: {}\nresources: {any_of: [{ports: 8080}, {ports: 8081}]}",
            "service.ports",
            &["different ports (8080 and 8081)"],
        );
        refused(
            "service: {ports: 70000}",
            "service.ports",
            &["1 to 65535", "70000"],
        );
    }

    #[test]
    fn unknown_keys_are_refused_by_their_path() {
        refused(
            &format!("service: {{replica_polcy: {{min_replicas: 1}}}}\n{ONE_PORT}"),
            "service.replica_polcy",
            &["unknown field", "did you mean 'replica_policy'"],
        );
        refused(
            &format!("service: {{readiness_probe: {{path: /, timeout: 5}}}}\n{ONE_PORT}"),
            "service.readiness_probe.timeout",
            &["unknown field"],
        );
        refused(
            &format!(
                "service: {{replica_policy: {{min_replicas: 1, max_replica: 1}}}}\n{ONE_PORT}"
            ),
            "service.replica_policy.max_replica",
            &["did you mean 'max_replicas'"],
        );
        refused(
            &format!("service: {{load_balancer: {{timeout: 5}}}}\n{ONE_PORT}"),
            "service.load_balancer.timeout",
            &["unknown field"],
        );
        refused("service: 3", "service", &["expected a mapping"]);
    }
}
