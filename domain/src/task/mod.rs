//! The task model: SkyPilot-format task YAML parsed into a normalised
//! [`TaskSpec`], with errors that name the offending field path.
//!
//! Parsing is strict, like SkyPilot's JSON-Schema validation: unknown keys are
//! rejected, and a known key whose feature no provider supports yet is
//! rejected too, with "not supported yet", rather than silently ignored.
//!
//! [`parse_task_yaml`] reads the document here; each part has its own file:
//! `values.rs` (infra, accelerators, counts, memory), `resources.rs` (the
//! `resources` block and its `any_of`/`ordered` alternatives), `sections.rs`
//! (workdir, num_nodes, envs, job_recovery, checkpoint), `yaml.rs` (reading
//! YAML values and checking keys), `validation.rs` (invariants however a
//! spec was built) and `normalized.rs` (the normalised YAML shown back).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use yaml_serde::Value;

mod depth;
mod mounts;
mod normalized;
mod resources;
mod sections;
mod service;
mod validation;
mod values;
mod yaml;

pub use normalized::*;
pub use service::*;
pub use validation::*;
pub use values::*;

pub use resources::container_image;

/// `resources.priority` when a task does not give one (SkyPilot's).
pub const DEFAULT_PRIORITY: u16 = 500;
/// The highest `resources.priority`.
pub const MAX_PRIORITY: u16 = 1000;
use resources::parse_resources;
use sections::{
    parse_autostop, parse_checkpoint, parse_data_location, parse_env_map, parse_env_nulls,
    parse_job_recovery, parse_num_nodes, parse_priority, parse_workdir, CollectEnvs,
};
use yaml::{as_map, check_keys, key_str, opt_string, scalar_string};

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

    /// The same error with `note` in its closing parentheses.
    pub fn noted(mut self, note: &str) -> Self {
        self.message = match self.message.strip_suffix(')') {
            Some(open) => format!("{open}; {note})"),
            None => format!("{} ({note})", self.message),
        };
        self
    }
}

type Result<T> = std::result::Result<T, SpecError>;

/// Most nodes one task may ask for.
pub const MAX_NUM_NODES: u32 = 1024;

/// A normalised task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TaskSpec {
    /// For display only (not unique); at most 256 bytes.
    pub name: Option<String>,
    /// Nodes, all placed together or not at all.
    pub num_nodes: u32,
    /// Local directory copied into the job's work dir before `setup`.
    pub workdir: Option<String>,
    /// The workdir's manifest digest, once the client uploaded it
    /// ([`nembo_proto`'s `files`]); without one, the agent copies `workdir`
    /// from its own machine (the local provider only).
    #[serde(default)]
    pub workdir_manifest: Option<String>,
    /// A git workdir (`workdir: {url, ref}`): cloned by each node.
    #[serde(default)]
    pub workdir_git: Option<GitWorkdir>,
    /// `file_mounts`: what is copied where on every node before `setup`.
    #[serde(default)]
    pub file_mounts: BTreeMap<String, MountSource>,
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
    /// Submitted by a caller who is not an admin: never placed where jobs
    /// run as the coordinators' Unix user (see
    /// [`Offering::runs_as_coordinator_user`](crate::state::Offering)).
    /// Set by the API, never by the YAML.
    #[serde(default)]
    pub keep_off_coordinator_user: bool,
    /// Extra flags for the container engine (`config.docker.run_options`).
    #[serde(default)]
    pub docker_run_options: Vec<String>,
    /// `resources.autostop`: none when the task does not say.
    #[serde(default)]
    pub autostop: Option<AutostopSetting>,
    /// `inputs`: where the task reads its data, and how much (SkyPilot's
    /// optimizer hint): a place in another cloud pays that cloud's egress.
    #[serde(default)]
    pub inputs: Option<DataLocation>,
    /// `outputs`: where the task writes its results, and how much: a place
    /// in another cloud pays its own egress.
    #[serde(default)]
    pub outputs: Option<DataLocation>,
    /// `resources.priority`, 0 to 1000: of the jobs waiting for a place,
    /// higher ones are placed first (SkyPilot's managed-job priority);
    /// none: [`DEFAULT_PRIORITY`].
    #[serde(default)]
    pub priority: Option<u16>,
    /// The named cluster it runs on (`launch -c`, `exec`). Set by the API,
    /// never by the YAML; none: anywhere with room (managed jobs).
    #[serde(default)]
    pub cluster: Option<ClusterTarget>,
    /// `service:`: the task is a service's replica (`nembo serve up`);
    /// `nembo launch` refuses it.
    #[serde(default)]
    pub service: Option<ServiceSpec>,
    /// Set by the coordinators, never by the YAML: the job is this
    /// replica of a service.
    #[serde(default)]
    pub replica: Option<ReplicaTag>,
}

/// Which service replica a job is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaTag {
    /// The service's name.
    pub service: String,
    /// The replica's id in it (from 1).
    pub replica_id: u32,
    /// The port it serves on where it shares its host with other replicas
    /// (local nodes, all on 127.0.0.1); elsewhere the service's port.
    pub shared_host_port: u16,
    /// (provider, region) pairs where replicas of the service were just
    /// preempted: placed elsewhere when anywhere else fits
    /// (EAGER_NEXT_REGION).
    #[serde(default)]
    pub avoid: Vec<(String, String)>,
}

/// The cluster a task was sent to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterTarget {
    /// Its name.
    pub name: String,
    /// `exec`: the cluster must exist (and be up); else `launch`, which
    /// creates it or starts it again.
    pub exec: bool,
}

/// `resources.autostop` as written: off (`false`), or on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AutostopSetting {
    /// `false`: no autostop (and an existing setting is cancelled).
    Off,
    /// Any other form.
    On(Autostop),
}

impl Autostop {
    /// `30m`, `90s`: the window as a user reads it.
    pub fn window(&self) -> String {
        if self.idle_s.is_multiple_of(60) {
            format!("{}m", self.idle_s / 60)
        } else {
            format!("{}s", self.idle_s)
        }
    }

    /// Parses an idle window: minutes (`30`), or a number with a unit
    /// (`s`, `m`, `h`, `d`, `w`; SkyPilot has all but `s`). Zero is one
    /// minute, as SkyPilot's launch makes it.
    pub fn parse_window(s: &str) -> Option<u64> {
        let s = s.trim();
        let (digits, unit) = match s.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
            _ => (s, 'm'),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = digits.parse().ok()?;
        let per = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return None,
        };
        let secs = n.checked_mul(per)?;
        // A year is past any idle window anyone means.
        (secs <= 366 * 86_400).then_some(if secs == 0 { 60 } else { secs })
    }
}

impl AutostopSetting {
    /// The setting a cluster keeps.
    pub fn enabled(&self) -> Option<Autostop> {
        match self {
            AutostopSetting::Off => None,
            AutostopSetting::On(a) => Some(a.clone()),
        }
    }
}

impl Autostop {
    /// Stop after `idle_s` idle seconds, waiting for jobs and ssh sessions,
    /// with no hook.
    pub fn after(idle_s: u64) -> Autostop {
        Autostop {
            idle_s,
            down: false,
            wait_for: WaitFor::default(),
            hook: None,
            hook_timeout_s: DEFAULT_HOOK_TIMEOUT_S,
        }
    }
}

/// Stop (or tear down) a cluster once it has been idle this long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Autostop {
    /// Idle seconds before it acts (SkyPilot counts minutes; the YAML and
    /// `-i` take minutes, and Nembo also takes `30s`).
    pub idle_s: u64,
    /// Tear down (terminate) rather than stop.
    pub down: bool,
    /// What counts as activity.
    pub wait_for: WaitFor,
    /// `hook`: a script run on the head node (in the job directory, as a
    /// job of the cluster's owner) before it stops or goes down.
    #[serde(default)]
    pub hook: Option<String>,
    /// `hook_timeout`, seconds: the stop goes on once the hook has run
    /// this long.
    #[serde(default = "default_hook_timeout")]
    pub hook_timeout_s: u64,
}

/// `autostop.hook_timeout` when not given, seconds.
pub const DEFAULT_HOOK_TIMEOUT_S: u64 = 3600;

fn default_hook_timeout() -> u64 {
    DEFAULT_HOOK_TIMEOUT_S
}

/// `autostop.wait_for`: what keeps a cluster from being idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum WaitFor {
    /// Jobs and `nembo ssh` sessions (SkyPilot's default).
    #[default]
    JobsAndSsh,
    /// Jobs only.
    Jobs,
    /// Nothing: a hard limit from the last reset, even while jobs run.
    None,
}

impl WaitFor {
    /// SkyPilot's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitFor::JobsAndSsh => "jobs_and_ssh",
            WaitFor::Jobs => "jobs",
            WaitFor::None => "none",
        }
    }

    /// Parses SkyPilot's spelling.
    pub fn parse(s: &str) -> Option<WaitFor> {
        match s {
            "jobs_and_ssh" => Some(WaitFor::JobsAndSsh),
            "jobs" => Some(WaitFor::Jobs),
            "none" => Some(WaitFor::None),
            _ => None,
        }
    }
}

/// Where a managed job goes after a preemption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum RecoveryStrategy {
    /// Anywhere but the preempted region first (SkyPilot's default).
    #[default]
    EagerNextRegion,
    /// The same region first, then anywhere.
    Failover,
    /// None: a preemption fails the job (`job_recovery: none`); restarts on
    /// errors still follow `max_restarts_on_errors`.
    None,
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

/// `inputs` or `outputs`: `{URI: size in GB}`, one entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataLocation {
    /// A bucket URI (`s3://`, `gs://`, `az://`, `r2://`, ...).
    pub uri: String,
    /// Its estimated size, GB.
    pub size_gb: f64,
}

impl DataLocation {
    /// The cloud that holds it, by its URI's scheme (none: not a cloud's).
    pub fn cloud(&self) -> Option<&'static str> {
        match self.uri.split_once("://")?.0 {
            "s3" => Some("aws"),
            "gs" => Some("gcp"),
            "az" => Some("azure"),
            "r2" => Some("cloudflare"),
            "cos" => Some("ibm"),
            "oci" => Some("oci"),
            _ => None,
        }
    }
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
    /// TCP ports the job serves on, reachable on every node.
    #[serde(default)]
    pub ports: Vec<PortRange>,
    /// Size of each node's disk, GB (the provider's default when unset).
    #[serde(default)]
    pub disk_size_gb: Option<u64>,
    /// Performance tier of that disk.
    #[serde(default)]
    pub disk_tier: Option<DiskTier>,
    /// VM image by region (`*`: every region), when the task names one.
    #[serde(default)]
    pub image_id: BTreeMap<String, String>,
    /// Container image `setup` and `run` execute in (`image_id:
    /// docker:<image>`), as written (the registry login's server is
    /// prefixed when the job starts).
    #[serde(default)]
    pub docker_image: Option<String>,
}

impl ResourceCandidate {
    /// `aws/us-east-1 H100:8 cpus=8+ [spot]`: what it asks, in a few words.
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        if !self.infra.is_any() {
            parts.push(self.infra.to_string());
        }
        if let Some(t) = &self.instance_type {
            parts.push(t.clone());
        }
        if let Some(a) = &self.accelerator {
            parts.push(a.to_string());
        }
        if let Some(c) = &self.cpus {
            parts.push(format!("cpus={c}"));
        }
        if let Some(m) = &self.memory {
            parts.push(format!("memory={m}"));
        }
        if self.use_spot {
            parts.push("[spot]".into());
        }
        if parts.is_empty() {
            "any".into()
        } else {
            parts.join(" ")
        }
    }

    /// The VM image this candidate asks for in `region`, if any.
    pub fn image_for(&self, region: &str) -> Option<String> {
        self.image_id
            .get(region)
            .or_else(|| self.image_id.get("*"))
            .cloned()
    }
}

/// SkyPilot's git workdir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitWorkdir {
    /// `https://`, `ssh://`, `git@host:path` or `file://`.
    pub url: String,
    /// A branch, tag or commit; none: the default branch.
    pub git_ref: Option<String>,
}

/// Where a file mount's content comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MountSource {
    /// A file or directory on the launching machine, uploaded by the client:
    /// the path as written, and the manifest's digest once uploaded.
    Local {
        /// As the task names it (`~/data`, `./src`).
        path: String,
        /// SHA-256 of its manifest, once uploaded.
        manifest: Option<String>,
    },
    /// A bucket prefix or object (`s3://b/p`, `https://...`), copied by the
    /// agent (SkyPilot's COPY mode for a URI string).
    Uri(String),
    /// A storage object that names its bucket, mounts one, or both.
    Storage(StorageMount),
}

/// A storage object (`{name, source, store, mode}`), as the node fulfils it:
/// the bucket made if the task named it, a local source uploaded into it,
/// then the bucket mounted (FUSE) or copied in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageMount {
    /// The whole bucket, `s3://name` or `r2://name` (`store: r2`).
    pub bucket: String,
    /// The task named it (`name`): made if it does not exist.
    pub create: bool,
    /// A local file or directory to upload into it first: the path as
    /// written, and its manifest's digest once the client uploaded it.
    pub local: Option<(String, Option<String>)>,
    /// How the node sees it.
    pub mode: StorageMode,
    /// Mounted read-only (`config.mount.read_only`, `config.mount_cached.read_only`).
    pub read_only: bool,
    /// MOUNT_CACHED's rclone knobs, by SkyPilot's key (`transfers`,
    /// `vfs_cache_max_size`, ...): from the `type` preset, then `config.mount_cached`.
    #[serde(default)]
    pub rclone: BTreeMap<String, String>,
    /// `persistent: false`: the bucket goes with the job.
    #[serde(default)]
    pub ephemeral: bool,
}

/// SkyPilot's storage modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageMode {
    /// FUSE, streamed: reads fetched on use, a file uploaded on close.
    Mount,
    /// FUSE with a local cache and asynchronous upload.
    MountCached,
    /// Copied onto the node before setup; writes stay there.
    Copy,
}

impl StorageMode {
    /// As SkyPilot spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageMode::Mount => "MOUNT",
            StorageMode::MountCached => "MOUNT_CACHED",
            StorageMode::Copy => "COPY",
        }
    }
}

impl MountSource {
    /// The local path the client uploads, and its manifest once uploaded.
    pub fn local(&self) -> Option<(&str, Option<&str>)> {
        match self {
            MountSource::Local { path, manifest } => Some((path, manifest.as_deref())),
            MountSource::Storage(StorageMount {
                local: Some((path, manifest)),
                ..
            }) => Some((path, manifest.as_deref())),
            _ => None,
        }
    }

    /// Records the uploaded local source's manifest.
    pub fn set_manifest(&mut self, digest: String) {
        match self {
            MountSource::Local { manifest, .. }
            | MountSource::Storage(StorageMount {
                local: Some((_, manifest)),
                ..
            }) => *manifest = Some(digest),
            _ => {}
        }
    }
}

const TOP_LEVEL_SUPPORTED: &[&str] = &[
    "name",
    "workdir",
    "file_mounts",
    "num_nodes",
    "resources",
    "envs",
    "secrets",
    "setup",
    "run",
    "checkpoint",
    "config",
    "inputs",
    "outputs",
    "service",
];
/// SkyPilot's fields Nembo refuses, and why.
const TOP_LEVEL_REFUSED: &[(&str, &str)] = &[
    ("volumes", VOLUMES_NEED),
    (
        "pool",
        "a pool of workers is made with `sky jobs pool apply`, not launched as a task; \
         Nembo has no pools yet",
    ),
    (
        "managed_secrets",
        "Nembo has no managed secrets yet; give them in `secrets` or with `--secret`",
    ),
    (
        "event_callback",
        "SkyPilot runs it on its jobs controller at each status change, and Nembo runs no \
         user code on its coordinators; follow the job with `nembo logs` or `nembo jobs queue` \
         instead",
    ),
];

/// Why `volumes` cannot be honoured (top level and in `resources`).
pub(super) const VOLUMES_NEED: &str = "SkyPilot's volumes are GCP persistent disks and local \
    SSDs, Kubernetes volumes or RunPod network volumes, and Nembo has no GCP, Kubernetes or \
    RunPod provider yet; ship data through `file_mounts` or a bucket";

/// Parses a SkyPilot-format task. `env_overrides` are `--env NAME=VALUE`
/// values: they fill envs declared as null and may add new ones, which are
/// kept as secrets (the job gets them; nothing shows them back).
pub fn parse_task_yaml(yaml: &str, env_overrides: &BTreeMap<String, String>) -> Result<TaskSpec> {
    depth::check_flow_depth(yaml)?;
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
    check_keys(map, "", TOP_LEVEL_SUPPORTED, TOP_LEVEL_REFUSED)?;

    let mut spec = TaskSpec {
        num_nodes: 1,
        ..Default::default()
    };
    for (k, v) in map {
        let key = key_str(k, "task")?;
        match key {
            "name" => spec.name = opt_string(v, "name")?,
            "workdir" => (spec.workdir, spec.workdir_git) = parse_workdir(v)?,
            // After the envs: `$NAME` in it is theirs (below).
            "file_mounts" => {}
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
                spec.autostop = match v.as_mapping().and_then(|m| m.get("autostop")) {
                    Some(a) => parse_autostop(a, "resources.autostop")?,
                    None => None,
                };
                spec.priority = match v.as_mapping().and_then(|m| m.get("priority")) {
                    Some(p) => Some(parse_priority(p)?),
                    None => None,
                };
            }
            "checkpoint" => spec.checkpoint = parse_checkpoint(v)?,
            "inputs" => spec.inputs = parse_data_location(v, "inputs")?,
            "outputs" => spec.outputs = parse_data_location(v, "outputs")?,
            "config" => spec.docker_run_options = parse_config(v)?,
            // After the resources: it checks them and opens its port there (below).
            "service" => {}
            _ => {}
        }
    }
    // Nulls must be filled from the command line; an override may also add a name.
    let mut declared = parse_env_nulls(map.get("envs"), "envs");
    declared.extend(parse_env_nulls(map.get("secrets"), "secrets"));
    for (name, value) in env_overrides {
        check_env_name(name, &format!("envs.{name}"))?;
        // A name the task does not declare is kept as a secret: sealed at
        // rest and never shown back. Command lines are where tokens are
        // passed (`--env HF_TOKEN=...`), and nothing says this one is not.
        let undeclared = !spec.envs.contains_key(name) && !declared.contains_key(name);
        if undeclared || spec.secrets.contains_key(name) || declared.get(name) == Some(&"secrets") {
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
    if let Some(v) = map.get("file_mounts") {
        spec.file_mounts = mounts::parse_file_mounts(&mounts::substitute_envs(v, &spec.envs))?;
    }
    // `service:` empty or null is no service, as in SkyPilot.
    if let Some(v) = map.get("service").filter(|v| !v.is_null()) {
        let job_recovery = map
            .get("resources")
            .and_then(Value::as_mapping)
            .and_then(|r| r.get("job_recovery"))
            .filter(|r| !r.is_null());
        if job_recovery.is_some() {
            return Err(SpecError::new(
                "resources.job_recovery",
                "a service's replicas are replaced by the service itself (SkyServe refuses \
                 job_recovery too); drop it",
            ));
        }
        spec.service = Some(service::parse_service(v, &mut spec.resources)?);
    }
    validate(&spec)?;
    Ok(spec)
}

/// The registry login's server is prefixed to a container image unless the
/// name already starts with it (SkyPilot's rule).
pub fn registry_image(image: &str, server: Option<&str>) -> String {
    match server.map(|s| s.trim().trim_end_matches('/')) {
        Some(server) if !server.is_empty() && !image.starts_with(server) => {
            format!("{server}/{image}")
        }
        _ => image.to_string(),
    }
}

/// The task's `config:` (SkyPilot's per-task config overrides): what Nembo
/// honours is `docker.run_options`, extra flags for the container engine
/// (a list, or one string of them, split on whitespace). Every other key is
/// refused by its path, naming what it configures.
fn parse_config(v: &Value) -> Result<Vec<String>> {
    if v.is_null() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (k, inner) in as_map(v, "config")? {
        let k = key_str(k, "config")?;
        let path = format!("config.{k}");
        if k != "docker" {
            let why = match k {
                "kubernetes" | "gcp" | "azure" | "lambda" | "runpod" | "nebius" | "oci" | "ibm"
                | "vast" | "fluidstack" | "paperspace" | "do" | "cudo" | "scp" => {
                    "configures infrastructure Nembo has no provider for"
                }
                _ => "is valid SkyPilot config but not honoured by Nembo (only docker.run_options is)",
            };
            return Err(SpecError::new(path, why));
        }
        for (dk, opts) in as_map(inner, &path)? {
            let dk = key_str(dk, &path)?;
            let p = format!("{path}.{dk}");
            if dk != "run_options" {
                return Err(SpecError::new(p, "unknown docker config (run_options)"));
            }
            let items: Vec<&Value> = match opts {
                Value::Sequence(s) => s.iter().collect(),
                Value::Null => Vec::new(),
                other => vec![other],
            };
            for item in items {
                let s = scalar_string(item, &p)?;
                out.extend(s.split_whitespace().map(str::to_string));
            }
        }
    }
    if out.len() > 64 || out.iter().any(|o| o.len() > 1024) {
        return Err(SpecError::new(
            "config.docker.run_options",
            "at most 64 options of 1024 characters each",
        ));
    }
    Ok(out)
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

    /// The container image the chosen candidate runs in, as the engine pulls
    /// it, given the job's environment (secrets opened).
    pub fn container_image(
        &self,
        candidate: usize,
        env: &BTreeMap<String, String>,
    ) -> Option<String> {
        let image = self
            .resources
            .candidates
            .get(candidate)?
            .docker_image
            .as_deref()?;
        Some(registry_image(
            image,
            env.get(DOCKER_LOGIN[2]).map(String::as_str),
        ))
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
mod tests;

#[cfg(test)]
mod example_tests;
