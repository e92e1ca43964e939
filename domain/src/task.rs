//! The task model: SkyPilot-format task YAML parsed into a normalised
//! [`TaskSpec`], with errors that name the offending field path.
//!
//! Parsing is strict, like SkyPilot's JSON-Schema validation: unknown keys are
//! rejected, and a known key whose feature no provider supports yet is
//! rejected too, with "not supported yet", rather than silently ignored.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use yaml_serde::Value;

/// A task that cannot be accepted, and where in the task the problem is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SpecError {
    /// Dotted field path, e.g. `resources.accelerators`; `task` for the whole document.
    pub path: String,
    /// What is wrong, in lowercase prose.
    pub message: String,
}

impl SpecError {
    /// An error at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

type Result<T> = std::result::Result<T, SpecError>;

/// Most nodes one task may ask for.
pub const MAX_NUM_NODES: u32 = 1024;

/// A normalised task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TaskSpec {
    /// Display name.
    pub name: Option<String>,
    /// Nodes, all placed together or not at all.
    pub num_nodes: u32,
    /// Local directory copied into the job's work dir before `setup`.
    pub workdir: Option<String>,
    /// Run once per node before `run`.
    pub setup: Option<String>,
    /// Run on every node.
    pub run: Option<String>,
    /// Environment given to setup and run.
    pub envs: BTreeMap<String, String>,
    /// Like `envs`, but never shown or returned.
    pub secrets: BTreeMap<String, String>,
    /// What each node needs.
    pub resources: ResourceRequest,
    /// `resources.job_recovery`: how a managed job recovers (SkyPilot's
    /// semantics); only `nembo jobs launch` honours it.
    #[serde(default)]
    pub recovery: Option<JobRecovery>,
    /// `checkpoint` (a Nembo extension): a directory synced to object
    /// storage, restored before each attempt.
    #[serde(default)]
    pub checkpoint: Option<Checkpoint>,
    /// A managed job (`nembo jobs launch`): the coordinators recover it
    /// from preemptions and, per `recovery`, from failures. Set by the API,
    /// never by the YAML.
    #[serde(default)]
    pub managed: bool,
}

/// Where a managed job goes after a preemption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum RecoveryStrategy {
    /// Anywhere but the preempted region first (SkyPilot's default).
    #[default]
    EagerNextRegion,
    /// The same region first, then anywhere.
    Failover,
}

/// `resources.job_recovery`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct JobRecovery {
    /// Where to go after a preemption.
    pub strategy: RecoveryStrategy,
    /// Restarts after a non-zero exit (not a preemption); default 0.
    pub max_restarts_on_errors: u32,
    /// Exit codes that always restart, without using the budget.
    pub recover_on_exit_codes: Vec<i32>,
}

/// `checkpoint:` — `{store: s3://bucket/prefix | file:///dir, path: /ckpt,
/// interval: 60s, signal: SIGUSR1}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Object store URL: `s3://bucket/prefix` or `file:///dir` (gs://, az:// later).
    pub store: String,
    /// The directory on the node (absolute), `NEMBO_CHECKPOINT_DIR`.
    pub path: String,
    /// Sync period, seconds.
    pub interval_s: u32,
    /// Signal sent to the job on a preemption notice.
    pub signal: String,
}

/// Alternatives for the shape of each node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ResourceRequest {
    /// At least one. Each is a complete alternative.
    pub candidates: Vec<ResourceCandidate>,
    /// Try in the written order (`ordered`, accelerator lists) rather than cheapest first.
    pub ordered: bool,
    /// User labels, carried for display.
    pub labels: BTreeMap<String, String>,
}

/// One complete alternative for a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ResourceCandidate {
    /// Where: cloud / region / zone, each optional.
    pub infra: Infra,
    /// GPU model and count per node.
    pub accelerator: Option<Accelerator>,
    /// vCPUs per node.
    pub cpus: Option<Quantity>,
    /// Memory per node.
    pub memory: Option<Memory>,
    /// A provider's instance type name.
    pub instance_type: Option<String>,
    /// Spot capacity rather than on-demand.
    pub use_spot: bool,
    /// Upper bound on the price of one node, per hour.
    pub max_hourly_cost: Option<f64>,
}

/// Where a node may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Infra {
    /// Provider name, lowercase (`local`, `aws`).
    pub cloud: Option<String>,
    /// Region name.
    pub region: Option<String>,
    /// Zone name.
    pub zone: Option<String>,
}

impl Infra {
    /// Parses `cloud[/region[/zone]]`, with `*` as a wildcard at any level.
    pub fn parse(s: &str, path: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self::default());
        }
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(SpecError::new(
                path,
                format!("'{s}' is not of the form cloud, cloud/region or cloud/region/zone"),
            ));
        }
        let part = |i: usize| parts.get(i).filter(|p| **p != "*").map(|p| p.to_string());
        Ok(Self {
            cloud: part(0).map(|c| c.to_ascii_lowercase()),
            region: part(1),
            zone: part(2),
        })
    }

    /// True when nothing is pinned.
    pub fn is_any(&self) -> bool {
        self.cloud.is_none() && self.region.is_none() && self.zone.is_none()
    }
}

impl fmt::Display for Infra {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            return Ok(());
        }
        let star = |p: &Option<String>| p.clone().unwrap_or_else(|| "*".to_string());
        write!(f, "{}", star(&self.cloud))?;
        if self.region.is_some() || self.zone.is_some() {
            write!(f, "/{}", star(&self.region))?;
        }
        if let Some(z) = &self.zone {
            write!(f, "/{z}")?;
        }
        Ok(())
    }
}

/// A GPU model and how many of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accelerator {
    /// Canonical model name (`H100`, `A100-80GB`).
    pub name: String,
    /// Positive; fractions share a GPU.
    pub count: f64,
}

impl Accelerator {
    /// Parses `NAME` or `NAME:COUNT`.
    pub fn parse(s: &str, path: &str) -> Result<Self> {
        let s = s.trim();
        let (name, count) = match s.split_once(':') {
            Some((n, c)) => (n.trim(), parse_count(c.trim(), path)?),
            None => (s, 1.0),
        };
        Ok(Self {
            name: canonical_accelerator(name, path)?,
            count,
        })
    }
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, fmt_num(self.count))
    }
}

/// A count that is either exact or a lower bound (`8` vs `8+`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantity {
    /// The number.
    pub value: f64,
    /// `N+`: at least N.
    pub at_least: bool,
}

impl Quantity {
    /// Parses `N` or `N+`; N must be positive.
    pub fn parse(s: &str, path: &str) -> Result<Self> {
        let s = s.trim();
        let (num, at_least) = match s.strip_suffix('+') {
            Some(n) => (n.trim(), true),
            None => (s, false),
        };
        let value = parse_positive(num, path)?;
        Ok(Self { value, at_least })
    }

    /// Whether `have` satisfies this request.
    pub fn admits(&self, have: f64) -> bool {
        if self.at_least {
            have >= self.value
        } else {
            (have - self.value).abs() < 1e-9
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}",
            fmt_num(self.value),
            if self.at_least { "+" } else { "" }
        )
    }
}

/// Memory: GB, or GB per vCPU (`4x`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    /// GB, or GB per vCPU when `per_cpu`.
    pub quantity: Quantity,
    /// `Nx`: N GB for each vCPU.
    pub per_cpu: bool,
}

impl Memory {
    /// Parses `32`, `32+`, `4x` or `4x+`.
    pub fn parse(s: &str, path: &str) -> Result<Self> {
        let s = s.trim();
        let (body, plus) = match s.strip_suffix('+') {
            Some(b) => (b.trim(), "+"),
            None => (s, ""),
        };
        let (body, per_cpu) = match body.strip_suffix(['x', 'X']) {
            Some(b) => (b.trim(), true),
            None => (body, false),
        };
        let body = body
            .strip_suffix("GB")
            .or_else(|| body.strip_suffix("gb"))
            .unwrap_or(body)
            .trim();
        Ok(Self {
            quantity: Quantity::parse(&format!("{body}{plus}"), path)?,
            per_cpu,
        })
    }

    /// GB this request needs on a node with `cpus` vCPUs.
    pub fn gb_for(&self, cpus: f64) -> f64 {
        if self.per_cpu {
            self.quantity.value * cpus
        } else {
            self.quantity.value
        }
    }

    /// Whether a node with `cpus` vCPUs and `gb` GB satisfies this request.
    pub fn admits(&self, cpus: f64, gb: f64) -> bool {
        let want = Quantity {
            value: self.gb_for(cpus),
            at_least: self.quantity.at_least,
        };
        want.admits(gb)
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", fmt_num(self.quantity.value))?;
        if self.per_cpu {
            write!(f, "x")?;
        }
        if self.quantity.at_least {
            write!(f, "+")?;
        }
        Ok(())
    }
}

/// Formats a number without a trailing `.0`.
pub fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn parse_positive(s: &str, path: &str) -> Result<f64> {
    let v: f64 = s
        .parse()
        .map_err(|_| SpecError::new(path, format!("'{s}' is not a number")))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(SpecError::new(
            path,
            format!("must be a positive number, got '{s}'"),
        ));
    }
    Ok(v)
}

fn parse_count(s: &str, path: &str) -> Result<f64> {
    let v = parse_positive(s, path)
        .map_err(|e| SpecError::new(path, format!("accelerator count {}", e.message)))?;
    if v > 1.0 && v.fract() != 0.0 {
        return Err(SpecError::new(
            path,
            format!("accelerator count above 1 must be a whole number, got '{s}'"),
        ));
    }
    Ok(v)
}

/// Accelerator names Nembo knows, in their canonical spelling.
pub const KNOWN_ACCELERATORS: &[&str] = &[
    "A10",
    "A10G",
    "A100",
    "A100-80GB",
    "B200",
    "GB200",
    "H100",
    "H100-MEGA",
    "H200",
    "L4",
    "L40",
    "L40S",
    "MI300X",
    "T4",
    "V100",
    "V100-32GB",
    "RTX6000",
    "RTX4090",
    "RTXPRO6000",
];

fn canonical_accelerator(name: &str, path: &str) -> Result<String> {
    if name.is_empty() {
        return Err(SpecError::new(path, "accelerator name is empty"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(SpecError::new(
            path,
            format!("'{name}' is not an accelerator name (letters, digits, '-' and '_' only)"),
        ));
    }
    Ok(KNOWN_ACCELERATORS
        .iter()
        .find(|k| k.eq_ignore_ascii_case(name))
        .map(|k| k.to_string())
        .unwrap_or_else(|| name.to_string()))
}

const TOP_LEVEL_SUPPORTED: &[&str] = &[
    "name",
    "workdir",
    "num_nodes",
    "resources",
    "envs",
    "secrets",
    "setup",
    "run",
    "checkpoint",
];
const TOP_LEVEL_NOT_YET: &[&str] = &[
    "file_mounts",
    "service",
    "config",
    "volumes",
    "pool",
    "managed_secrets",
    "event_callback",
    "inputs",
    "outputs",
];
const RESOURCE_SUPPORTED: &[&str] = &[
    "infra",
    "cloud",
    "region",
    "zone",
    "accelerators",
    "cpus",
    "memory",
    "instance_type",
    "use_spot",
    "labels",
    "max_hourly_cost",
    "any_of",
    "ordered",
    "job_recovery",
];
const RESOURCE_NOT_YET: &[&str] = &[
    "disk_size",
    "disk_tier",
    "network_tier",
    "ports",
    "image_id",
    "autostop",
    "priority",
    "volumes",
    "accelerator_args",
    "local_disk",
];

/// Parses a SkyPilot-format task. `env_overrides` are `--env NAME=VALUE`
/// values: they fill envs declared as null and may add new ones.
pub fn parse_task_yaml(yaml: &str, env_overrides: &BTreeMap<String, String>) -> Result<TaskSpec> {
    let mut docs = Vec::new();
    for doc in yaml_serde::Deserializer::from_str(yaml) {
        let v = Value::deserialize(doc)
            .map_err(|e| SpecError::new("task", format!("invalid YAML: {e}")))?;
        docs.push(v);
    }
    let root = match docs.len() {
        0 => Value::Mapping(Default::default()),
        1 => docs.pop().unwrap_or(Value::Null),
        n => {
            return Err(SpecError::new(
                "task",
                format!("found {n} YAML documents; multi-task pipelines are not supported yet"),
            ))
        }
    };
    let root = match root {
        Value::Null => Value::Mapping(Default::default()),
        v => v,
    };
    let map = as_map(&root, "task")?;
    check_keys(map, "", TOP_LEVEL_SUPPORTED, TOP_LEVEL_NOT_YET)?;

    let mut spec = TaskSpec {
        num_nodes: 1,
        ..Default::default()
    };
    for (k, v) in map {
        let key = key_str(k, "task")?;
        match key {
            "name" => spec.name = opt_string(v, "name")?,
            "workdir" => spec.workdir = parse_workdir(v)?,
            "num_nodes" => spec.num_nodes = parse_num_nodes(v)?,
            "setup" => spec.setup = opt_string(v, "setup")?,
            "run" => spec.run = opt_string(v, "run")?,
            "envs" => spec.envs = parse_env_map(v, "envs")?.into_iter().collect_envs(),
            "secrets" => spec.secrets = parse_env_map(v, "secrets")?.into_iter().collect_envs(),
            "resources" => {
                spec.resources = parse_resources(v)?;
                spec.recovery = match v.as_mapping().and_then(|m| m.get("job_recovery")) {
                    Some(r) => parse_job_recovery(r)?,
                    None => None,
                };
            }
            "checkpoint" => spec.checkpoint = parse_checkpoint(v)?,
            _ => {}
        }
    }
    // Nulls must be filled from the command line; an override may also add a name.
    let mut declared = parse_env_nulls(map.get("envs"), "envs");
    declared.extend(parse_env_nulls(map.get("secrets"), "secrets"));
    for (name, value) in env_overrides {
        check_env_name(name, &format!("envs.{name}"))?;
        if spec.secrets.contains_key(name) || declared.get(name) == Some(&"secrets") {
            spec.secrets.insert(name.clone(), value.clone());
        } else {
            spec.envs.insert(name.clone(), value.clone());
        }
    }
    for (name, section) in declared {
        let filled = spec.envs.contains_key(&name) || spec.secrets.contains_key(&name);
        if !filled {
            return Err(SpecError::new(
                format!("{section}.{name}"),
                format!("no value given; pass --env {name}=VALUE"),
            ));
        }
    }
    if spec.resources.candidates.is_empty() {
        spec.resources.candidates.push(ResourceCandidate::default());
    }
    validate(&spec)?;
    Ok(spec)
}

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
    if spec.resources.candidates.is_empty() {
        return Err(SpecError::new("resources", "needs at least one candidate"));
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

trait CollectEnvs {
    fn collect_envs(self) -> BTreeMap<String, String>;
}

impl<I: Iterator<Item = (String, Option<String>)>> CollectEnvs for I {
    fn collect_envs(self) -> BTreeMap<String, String> {
        self.filter_map(|(k, v)| v.map(|v| (k, v))).collect()
    }
}

fn as_map<'a>(v: &'a Value, path: &str) -> Result<&'a yaml_serde::Mapping> {
    v.as_mapping()
        .ok_or_else(|| SpecError::new(path, format!("expected a mapping, got {}", kind(v))))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn key_str<'a>(k: &'a Value, path: &str) -> Result<&'a str> {
    k.as_str()
        .ok_or_else(|| SpecError::new(path, format!("keys must be strings, got {}", kind(k))))
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn check_keys(
    map: &yaml_serde::Mapping,
    prefix: &str,
    supported: &[&str],
    not_yet: &[&str],
) -> Result<()> {
    for k in map.keys() {
        let key = key_str(k, if prefix.is_empty() { "task" } else { prefix })?;
        if supported.contains(&key) {
            continue;
        }
        let path = join(prefix, key);
        if not_yet.contains(&key) {
            return Err(SpecError::new(
                path,
                "is valid SkyPilot but not supported by Nembo yet; remove it to run this task",
            ));
        }
        let hint = match key {
            "spot_recovery" => " (did you mean 'job_recovery'?)".to_string(),
            _ => did_you_mean(key, supported)
                .map_or(String::new(), |s| format!(" (did you mean '{s}'?)")),
        };
        return Err(SpecError::new(path, format!("unknown field{hint}")));
    }
    Ok(())
}

fn did_you_mean<'a>(key: &str, options: &[&'a str]) -> Option<&'a str> {
    options
        .iter()
        .map(|o| (edit_distance(key, o), *o))
        .filter(|(d, o)| *d <= 2.max(o.len() / 4))
        .min()
        .map(|(_, o)| o)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn scalar_string(v: &Value, path: &str) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(SpecError::new(
            path,
            format!("expected a string, got {}", kind(other)),
        )),
    }
}

fn opt_string(v: &Value, path: &str) -> Result<Option<String>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => Err(SpecError::new(
            path,
            format!("expected a string, got {}", kind(other)),
        )),
    }
}

fn parse_workdir(v: &Value) -> Result<Option<String>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Mapping(_) => Err(SpecError::new(
            "workdir",
            "a git workdir ({url, ref}) is not supported by Nembo yet; use a local path",
        )),
        other => Err(SpecError::new(
            "workdir",
            format!("expected a path, got {}", kind(other)),
        )),
    }
}

fn parse_num_nodes(v: &Value) -> Result<u32> {
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

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        Value::Number(n) => n.to_string(),
        other => kind(other).to_string(),
    }
}

fn check_env_name(name: &str, path: &str) -> Result<()> {
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

fn parse_env_map(v: &Value, section: &str) -> Result<Vec<(String, Option<String>)>> {
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

fn parse_env_nulls(v: Option<&Value>, section: &'static str) -> BTreeMap<String, &'static str> {
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

/// The fields of one `resources` block (or one `any_of`/`ordered` entry),
/// before accelerators are expanded into candidates.
#[derive(Default, Clone)]
struct PartialResources {
    infra: Option<Infra>,
    accelerators: Option<Vec<Accelerator>>,
    accelerators_ordered: bool,
    cpus: Option<Quantity>,
    memory: Option<Memory>,
    instance_type: Option<String>,
    use_spot: Option<bool>,
    max_hourly_cost: Option<f64>,
}

impl PartialResources {
    fn overlay(&self, over: &PartialResources) -> PartialResources {
        PartialResources {
            infra: over.infra.clone().or_else(|| self.infra.clone()),
            accelerators: over
                .accelerators
                .clone()
                .or_else(|| self.accelerators.clone()),
            accelerators_ordered: if over.accelerators.is_some() {
                over.accelerators_ordered
            } else {
                self.accelerators_ordered
            },
            cpus: over.cpus.or(self.cpus),
            memory: over.memory.or(self.memory),
            instance_type: over
                .instance_type
                .clone()
                .or_else(|| self.instance_type.clone()),
            use_spot: over.use_spot.or(self.use_spot),
            max_hourly_cost: over.max_hourly_cost.or(self.max_hourly_cost),
        }
    }

    fn expand(&self) -> Vec<ResourceCandidate> {
        let base = ResourceCandidate {
            infra: self.infra.clone().unwrap_or_default(),
            accelerator: None,
            cpus: self.cpus,
            memory: self.memory,
            instance_type: self.instance_type.clone(),
            use_spot: self.use_spot.unwrap_or(false),
            max_hourly_cost: self.max_hourly_cost,
        };
        match &self.accelerators {
            None => vec![base],
            Some(accs) => accs
                .iter()
                .map(|a| ResourceCandidate {
                    accelerator: Some(a.clone()),
                    ..base.clone()
                })
                .collect(),
        }
    }
}

fn parse_job_recovery(v: &Value) -> Result<Option<JobRecovery>> {
    const PATH: &str = "resources.job_recovery";
    let strategy = |v: &Value, path: &str| -> Result<RecoveryStrategy> {
        match v.as_str().map(|s| s.to_ascii_uppercase()).as_deref() {
            Some("EAGER_NEXT_REGION") => Ok(RecoveryStrategy::EagerNextRegion),
            Some("FAILOVER") => Ok(RecoveryStrategy::Failover),
            _ => Err(SpecError::new(
                path,
                format!("expected EAGER_NEXT_REGION or FAILOVER, got {}", show(v)),
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

fn parse_checkpoint(v: &Value) -> Result<Option<Checkpoint>> {
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

/// What a checkpoint setting must be, however it arrived.
fn check_checkpoint(c: &Checkpoint) -> Result<()> {
    if ["gs://", "az://"].iter().any(|p| c.store.starts_with(p)) {
        return Err(SpecError::new(
            "checkpoint.store",
            format!(
                "'{}': gs:// and az:// checkpoint stores are not supported by Nembo yet; use s3://bucket/prefix or file:///dir",
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

fn parse_resources(v: &Value) -> Result<ResourceRequest> {
    if v.is_null() {
        return Ok(ResourceRequest::default());
    }
    let map = as_map(v, "resources")?;
    check_keys(map, "resources", RESOURCE_SUPPORTED, RESOURCE_NOT_YET)?;
    let base = parse_partial(map, "resources")?;
    let mut labels = BTreeMap::new();
    if let Some(l) = map.get("labels") {
        if !l.is_null() {
            for (k, val) in as_map(l, "resources.labels")? {
                let key = key_str(k, "resources.labels")?;
                labels.insert(
                    key.to_string(),
                    scalar_string(val, &format!("resources.labels.{key}"))?,
                );
            }
        }
    }
    let any_of = map.get("any_of");
    let ordered = map.get("ordered");
    if any_of.is_some() && ordered.is_some() {
        return Err(SpecError::new(
            "resources",
            "'any_of' and 'ordered' cannot both be given",
        ));
    }
    let (list, list_name) = match (any_of, ordered) {
        (Some(l), _) => (Some(l), "any_of"),
        (_, Some(l)) => (Some(l), "ordered"),
        _ => (None, ""),
    };
    let mut candidates = Vec::new();
    let mut is_ordered = base.accelerators_ordered;
    match list {
        None => candidates.extend(base.expand()),
        Some(list) => {
            let path = format!("resources.{list_name}");
            let items = list.as_sequence().ok_or_else(|| {
                SpecError::new(&path, format!("expected a list, got {}", kind(list)))
            })?;
            if items.is_empty() {
                return Err(SpecError::new(&path, "must not be empty"));
            }
            if list_name == "ordered" {
                is_ordered = true;
                if base.accelerators.as_ref().is_some_and(|a| a.len() > 1) {
                    return Err(SpecError::new(
                        "resources.accelerators",
                        "several accelerators cannot be combined with 'ordered'",
                    ));
                }
            }
            for (i, item) in items.iter().enumerate() {
                let ipath = format!("{path}[{i}]");
                let imap = as_map(item, &ipath)?;
                let nested: Vec<&str> = RESOURCE_SUPPORTED
                    .iter()
                    .copied()
                    .filter(|k| !matches!(*k, "any_of" | "ordered" | "labels" | "job_recovery"))
                    .collect();
                check_keys(imap, &ipath, &nested, RESOURCE_NOT_YET)?;
                let over = parse_partial(imap, &ipath)?;
                candidates.extend(base.overlay(&over).expand());
            }
        }
    }
    Ok(ResourceRequest {
        candidates,
        ordered: is_ordered,
        labels,
    })
}

fn parse_partial(map: &yaml_serde::Mapping, prefix: &str) -> Result<PartialResources> {
    let mut p = PartialResources::default();
    let field = |k: &str| join(prefix, k);
    let has_infra = map.contains_key("infra");
    for legacy in ["cloud", "region", "zone"] {
        if has_infra && map.contains_key(legacy) {
            return Err(SpecError::new(
                field(legacy),
                "cannot be combined with 'infra'; use infra: cloud/region/zone",
            ));
        }
    }
    if let Some(v) = map.get("infra") {
        if let Some(s) = opt_string(v, &field("infra"))? {
            p.infra = Some(Infra::parse(&s, &field("infra"))?);
        }
    } else {
        let get = |k: &str| -> Result<Option<String>> {
            match map.get(k) {
                Some(v) => opt_string(v, &field(k)),
                None => Ok(None),
            }
        };
        let (cloud, region, zone) = (get("cloud")?, get("region")?, get("zone")?);
        if cloud.is_some() || region.is_some() || zone.is_some() {
            p.infra = Some(Infra {
                cloud: cloud.map(|c| c.to_ascii_lowercase()),
                region,
                zone,
            });
        }
    }
    if let Some(v) = map.get("accelerators") {
        let (accs, ordered) = parse_accelerators(v, &field("accelerators"))?;
        if !accs.is_empty() {
            p.accelerators = Some(accs);
            p.accelerators_ordered = ordered;
        }
    }
    if let Some(v) = map.get("cpus") {
        if !v.is_null() {
            p.cpus = Some(Quantity::parse(
                &scalar_string(v, &field("cpus"))?,
                &field("cpus"),
            )?);
        }
    }
    if let Some(v) = map.get("memory") {
        if !v.is_null() {
            p.memory = Some(Memory::parse(
                &scalar_string(v, &field("memory"))?,
                &field("memory"),
            )?);
        }
    }
    if let Some(v) = map.get("instance_type") {
        p.instance_type = opt_string(v, &field("instance_type"))?;
    }
    if let Some(v) = map.get("use_spot") {
        p.use_spot = match v {
            Value::Null => None,
            Value::Bool(b) => Some(*b),
            other => {
                return Err(SpecError::new(
                    field("use_spot"),
                    format!("expected true or false, got {}", show(other)),
                ))
            }
        };
    }
    if let Some(v) = map.get("max_hourly_cost") {
        if !v.is_null() {
            let s = scalar_string(v, &field("max_hourly_cost"))?;
            p.max_hourly_cost = Some(parse_positive(&s, &field("max_hourly_cost"))?);
        }
    }
    Ok(p)
}

/// Every accelerator form SkyPilot accepts: `H100`, `H100:8`, `{H100: 8}`,
/// `{L4: 1, A10G: 1}` (any of them), `[H100:8, A100:8]` (in that order).
/// Returns the alternatives and whether their order is a preference.
fn parse_accelerators(v: &Value, path: &str) -> Result<(Vec<Accelerator>, bool)> {
    match v {
        Value::Null => Ok((Vec::new(), false)),
        Value::String(s) => {
            let s = s.trim();
            // SkyPilot also accepts the set/dict forms written as strings.
            if s.starts_with('{') || s.starts_with('[') {
                let inner: Value = yaml_serde::from_str(s)
                    .map_err(|e| SpecError::new(path, format!("cannot parse '{s}': {e}")))?;
                return parse_accelerators(&inner, path);
            }
            Ok((vec![Accelerator::parse(s, path)?], false))
        }
        Value::Mapping(m) => {
            if m.is_empty() {
                return Err(SpecError::new(path, "must not be empty"));
            }
            let mut out = Vec::new();
            for (k, c) in m {
                let name = scalar_string(k, path)?;
                let count = match c {
                    Value::Null => 1.0,
                    other => parse_count(&scalar_string(other, path)?, path)?,
                };
                out.push(Accelerator {
                    name: canonical_accelerator(&name, path)?,
                    count,
                });
            }
            Ok((out, false))
        }
        Value::Sequence(items) => {
            if items.is_empty() {
                return Err(SpecError::new(path, "must not be empty"));
            }
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let ipath = format!("{path}[{i}]");
                let (accs, _) = parse_accelerators(item, &ipath)?;
                out.extend(accs);
            }
            Ok((out, true))
        }
        other => Err(SpecError::new(
            path,
            format!(
                "expected 'NAME', 'NAME:COUNT', a mapping or a list, got {}",
                show(other)
            ),
        )),
    }
}

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
    put("resources", Value::Mapping(res));
    if let Some(w) = &redacted.workdir {
        put("workdir", Value::String(w.clone()));
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

/// Shown in place of a secret's value.
pub const REDACTED: &str = "<redacted>";

impl TaskSpec {
    /// The same task with every secret value replaced by [`REDACTED`].
    pub fn redacted(&self) -> TaskSpec {
        let mut s = self.clone();
        for v in s.secrets.values_mut() {
            *v = REDACTED.to_string();
        }
        s
    }

    /// GPUs per node that the chosen candidate asks for, rounded up.
    pub fn gpus_per_node(&self, candidate: usize) -> u32 {
        self.resources
            .candidates
            .get(candidate)
            .and_then(|c| c.accelerator.as_ref())
            .map_or(0, |a| a.count.ceil() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<TaskSpec> {
        parse_task_yaml(y, &BTreeMap::new())
    }

    fn err(y: &str) -> SpecError {
        parse(y).expect_err("should be rejected")
    }

    #[test]
    fn minimal_task_defaults_to_one_node_and_any_resources() {
        let s = parse("run: echo hi\n").unwrap();
        assert_eq!(s.num_nodes, 1);
        assert_eq!(s.run.as_deref(), Some("echo hi"));
        assert_eq!(s.resources.candidates, vec![ResourceCandidate::default()]);
    }

    #[test]
    fn accelerator_forms() {
        let one = |y: &str| parse(y).unwrap().resources.candidates;
        let a = |n: &str, c: f64| {
            Some(Accelerator {
                name: n.into(),
                count: c,
            })
        };
        assert_eq!(
            one("resources: {accelerators: H100}")[0].accelerator,
            a("H100", 1.0)
        );
        assert_eq!(
            one("resources: {accelerators: 'h100:8'}")[0].accelerator,
            a("H100", 8.0)
        );
        assert_eq!(
            one("resources: {accelerators: {H100: 8}}")[0].accelerator,
            a("H100", 8.0)
        );
        assert_eq!(
            one("resources: {accelerators: 'A100:0.5'}")[0].accelerator,
            a("A100", 0.5)
        );
        let any = parse("resources: {accelerators: {L4: 1, A10G: 1}}").unwrap();
        assert!(!any.resources.ordered);
        assert_eq!(any.resources.candidates.len(), 2);
        let ord = parse("resources: {accelerators: ['H100:8', 'A100:8']}").unwrap();
        assert!(ord.resources.ordered);
        assert_eq!(ord.resources.candidates[1].accelerator, a("A100", 8.0));
        assert_eq!(
            one("resources: {accelerators: '{H100: 2}'}")[0].accelerator,
            a("H100", 2.0)
        );
    }

    #[test]
    fn bad_accelerators_name_the_field() {
        for y in [
            "resources: {accelerators: 'H100:-1'}",
            "resources: {accelerators: 'H100:abc'}",
            "resources: {accelerators: 'H100:0'}",
            "resources: {accelerators: 'H100:1.5'}",
            "resources: {accelerators: {H100: -2}}",
            "resources: {accelerators: 'H 100'}",
            "resources: {accelerators: []}",
        ] {
            let e = err(y);
            assert_eq!(e.path, "resources.accelerators", "{y}: {e}");
        }
        assert!(err("resources: {accelerators: 'H100:-1'}")
            .message
            .contains("positive"));
        assert!(err("resources: {accelerators: 'H100:abc'}")
            .message
            .contains("not a number"));
    }

    #[test]
    fn num_nodes_must_be_positive() {
        assert_eq!(err("num_nodes: 0").path, "num_nodes");
        assert_eq!(err("num_nodes: -3").path, "num_nodes");
        assert_eq!(err("num_nodes: two").path, "num_nodes");
        assert_eq!(parse("num_nodes: 4").unwrap().num_nodes, 4);
    }

    #[test]
    fn unknown_fields_are_rejected_with_a_hint() {
        let e = err("nmae: x");
        assert_eq!(e.path, "nmae");
        assert!(e.message.contains("did you mean 'name'"), "{e}");
        let e = err("resources: {acelerators: H100}");
        assert_eq!(e.path, "resources.acelerators");
        assert!(e.message.contains("accelerators"));
        let e = err("resources: {spot_recovery: FAILOVER}");
        assert!(e.message.contains("job_recovery"));
        let e = err("resources: {any_of: [{infra: local, bogus: 1}]}");
        assert_eq!(e.path, "resources.any_of[0].bogus");
    }

    #[test]
    fn known_but_unsupported_fields_are_rejected_not_ignored() {
        let e = err("file_mounts: {/data: s3://b}");
        assert_eq!(e.path, "file_mounts");
        assert!(e.message.contains("not supported"));
        let e = err("resources: {ports: 8080}");
        assert_eq!(e.path, "resources.ports");
        assert_eq!(err("workdir: {url: https://x/y.git}").path, "workdir");
    }

    #[test]
    fn malformed_yaml_is_an_error_not_a_panic() {
        let e = err("run: [unclosed");
        assert_eq!(e.path, "task");
        assert!(e.message.contains("invalid YAML"));
        assert_eq!(err("- just\n- a list").path, "task");
        assert!(err("name: a\n---\nname: b").message.contains("documents"));
    }

    #[test]
    fn null_envs_must_come_from_the_command_line() {
        let y = "envs: {EPOCHS: 3, HF_TOKEN: null}\nrun: x";
        let e = err(y);
        assert_eq!(e.path, "envs.HF_TOKEN");
        let mut o = BTreeMap::new();
        o.insert("HF_TOKEN".to_string(), "t0k".to_string());
        let s = parse_task_yaml(y, &o).unwrap();
        assert_eq!(s.envs["EPOCHS"], "3");
        assert_eq!(s.envs["HF_TOKEN"], "t0k");
        assert_eq!(err("envs: {1BAD: x}").path, "envs.1BAD");
    }

    #[test]
    fn cpus_memory_and_infra() {
        let c = &parse("resources: {cpus: 8+, memory: 4x, infra: local/us-east}")
            .unwrap()
            .resources
            .candidates[0];
        assert_eq!(
            c.cpus,
            Some(Quantity {
                value: 8.0,
                at_least: true
            })
        );
        assert!(c.memory.unwrap().per_cpu);
        assert_eq!(c.infra.cloud.as_deref(), Some("local"));
        assert_eq!(c.infra.region.as_deref(), Some("us-east"));
        assert_eq!(err("resources: {cpus: -1}").path, "resources.cpus");
        assert_eq!(err("resources: {memory: lots}").path, "resources.memory");
        assert_eq!(err("resources: {infra: a/b/c/d}").path, "resources.infra");
        assert_eq!(
            err("resources: {infra: local, cloud: aws}").path,
            "resources.cloud"
        );
        let legacy = parse("resources: {cloud: AWS, region: us-east-1}").unwrap();
        assert_eq!(
            legacy.resources.candidates[0].infra.cloud.as_deref(),
            Some("aws")
        );
    }

    #[test]
    fn any_of_overrides_base_fields() {
        let s = parse(
            "resources:\n  accelerators: {H100: 8}\n  use_spot: true\n  any_of:\n    - infra: aws/us-east-1\n    - infra: aws/us-west-2\n      use_spot: false\n",
        )
        .unwrap();
        let c = &s.resources.candidates;
        assert_eq!(c.len(), 2);
        assert!(c[0].use_spot && !c[1].use_spot);
        assert_eq!(c[1].accelerator.as_ref().unwrap().count, 8.0);
        assert_eq!(err("resources: {any_of: [], }").path, "resources.any_of");
    }

    #[test]
    fn secrets_are_redacted_in_normalized_yaml() {
        let s = parse("secrets: {KEY: hunter2}\nrun: echo").unwrap();
        assert_eq!(s.secrets["KEY"], "hunter2");
        let y = to_normalized_yaml(&s);
        assert!(!y.contains("hunter2"), "{y}");
        assert!(y.contains(REDACTED));
        let back = parse(&y.replace(REDACTED, "x")).unwrap();
        assert_eq!(back.num_nodes, 1);
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn shipped_examples_parse() {
        let none = BTreeMap::new();
        let hello = parse_task_yaml(include_str!("../../examples/hello.yaml"), &none).unwrap();
        assert_eq!(hello.name.as_deref(), Some("hello"));
        let train = parse_task_yaml(include_str!("../../examples/gpu-train.yaml"), &none).unwrap();
        assert_eq!(train.num_nodes, 2);
        assert_eq!(train.gpus_per_node(0), 8);
        let any = parse_task_yaml(include_str!("../../examples/any-gpu.yaml"), &none).unwrap();
        assert_eq!(any.resources.candidates.len(), 3);
        let y = include_str!("../../examples/needs-token.yaml");
        assert_eq!(parse_task_yaml(y, &none).unwrap_err().path, "envs.HF_TOKEN");
        let mut o = BTreeMap::new();
        o.insert("HF_TOKEN".to_string(), "hf_x".to_string());
        assert_eq!(parse_task_yaml(y, &o).unwrap().envs["HF_TOKEN"], "hf_x");
    }

    #[test]
    fn skypilot_reference_task_parses() {
        // The example from skypilot-compat.md, minus file_mounts, which
        // Nembo rejects as not supported yet.
        let y = "name: llama-ft\nnum_nodes: 2\nresources:\n  accelerators: {H100: 8}\n  use_spot: true\n  any_of:\n    - infra: aws/us-east-1\n    - infra: aws/us-west-2\n      use_spot: false\nenvs: {EPOCHS: \"3\", HF_TOKEN: null}\nsetup: pip install -r requirements.txt\nrun: torchrun train.py\n";
        let mut o = BTreeMap::new();
        o.insert("HF_TOKEN".to_string(), "t".to_string());
        let s = parse_task_yaml(y, &o).unwrap();
        assert_eq!(s.resources.candidates.len(), 2);
        assert_eq!(
            s.resources.candidates[0].infra.region.as_deref(),
            Some("us-east-1")
        );
        let with_recovery = y.replace(
            "  use_spot: true\n",
            "  use_spot: true\n  job_recovery: {strategy: EAGER_NEXT_REGION, max_restarts_on_errors: 2, recover_on_exit_codes: [75]}\n",
        );
        let r = parse_task_yaml(&with_recovery, &o)
            .unwrap()
            .recovery
            .unwrap();
        assert_eq!(r.strategy, RecoveryStrategy::EagerNextRegion);
        assert_eq!(
            (r.max_restarts_on_errors, r.recover_on_exit_codes),
            (2, vec![75])
        );
    }

    #[test]
    fn job_recovery_and_checkpoint_are_checked_field_by_field() {
        let ok = |y: &str| parse_task_yaml(y, &BTreeMap::new()).unwrap();
        assert_eq!(
            ok("resources: {job_recovery: failover}")
                .recovery
                .unwrap()
                .strategy,
            RecoveryStrategy::Failover
        );
        let r = ok("resources: {job_recovery: {recover_on_exit_codes: 3}}")
            .recovery
            .unwrap();
        assert_eq!(r.recover_on_exit_codes, vec![3]);
        for (y, path) in [
            (
                "resources: {job_recovery: SOMETIMES}",
                "resources.job_recovery",
            ),
            (
                "resources: {job_recovery: {strategy: X}}",
                "resources.job_recovery.strategy",
            ),
            (
                "resources: {job_recovery: {max_restarts_on_errors: -1}}",
                "resources.job_recovery.max_restarts_on_errors",
            ),
            (
                "resources: {job_recovery: {recover_on_exit_codes: [300]}}",
                "resources.job_recovery.recover_on_exit_codes",
            ),
            (
                "resources: {job_recovery: {retries: 1}}",
                "resources.job_recovery.retries",
            ),
            (
                "resources: {any_of: [{job_recovery: FAILOVER}]}",
                "resources.any_of[0].job_recovery",
            ),
            ("checkpoint: {path: /ckpt}", "checkpoint.store"),
            (
                "checkpoint: {store: http://x, path: /ckpt}",
                "checkpoint.store",
            ),
            ("checkpoint: {store: file:///b/p}", "checkpoint.path"),
            (
                "checkpoint: {store: gs://b/p, path: /c}",
                "checkpoint.store",
            ),
            (
                "checkpoint: {store: file:///b/p, path: ckpt}",
                "checkpoint.path",
            ),
            (
                "checkpoint: {store: file:///b/p, path: /c, interval: soon}",
                "checkpoint.interval",
            ),
            (
                "checkpoint: {store: file:///b/p, path: /c, signal: SIGKILL}",
                "checkpoint.signal",
            ),
            (
                "checkpoint: {store: file:///b/p, path: /c, every: 1}",
                "checkpoint.every",
            ),
        ] {
            let e = parse_task_yaml(y, &BTreeMap::new()).unwrap_err();
            assert_eq!(e.path, path, "{y}");
        }
        let c = ok(
            "checkpoint: {store: file:///bucket/run1/, path: /ckpt/, interval: 2m, signal: usr2}",
        )
        .checkpoint
        .unwrap();
        assert_eq!(
            (
                c.store.as_str(),
                c.path.as_str(),
                c.interval_s,
                c.signal.as_str()
            ),
            ("file:///bucket/run1", "/ckpt", 120, "SIGUSR2")
        );
        assert_eq!(
            ok("checkpoint: {store: s3://bucket/run, path: /c}")
                .checkpoint
                .unwrap()
                .interval_s,
            60
        );
    }
}
