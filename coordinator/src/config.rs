//! What a coordinator is started with.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A cluster launched without an autostop setting stops after an idle
/// hour (or is torn down, where its machines cannot stop): a forgotten
/// cluster costs at most an hour. `autostop: false` keeps one up.
pub const DEFAULT_AUTOSTOP_S: u64 = 60 * 60;

/// Everything a coordinator is started with.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// State, log, credentials and node work dirs.
    pub data_dir: PathBuf,
    /// Listen address; default: the one used last time, else 127.0.0.1:0.
    pub listen: Option<SocketAddr>,
    /// Prometheus `/metrics` (plain HTTP); None: no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    /// Raft member id.
    pub member_id: u64,
    /// Raft tick.
    pub tick: Duration,
    /// Snapshot every this many entries.
    pub snapshot_every: u64,
    /// Agents heartbeat this often.
    pub heartbeat_ms: u32,
    /// A node is lost after this long without a heartbeat.
    pub node_ttl: Duration,
    /// A node whose agent has not enrolled by then failed.
    pub provision_timeout: Duration,
    /// How often the leader looks for leaked instances.
    pub reconcile_every: Duration,
    /// SIGTERM-to-SIGKILL grace when stopping a job.
    pub stop_grace_ms: u32,
    /// Most nodes at once.
    pub max_nodes: u32,
    /// Shell command the leader runs when a node turns unhealthy.
    pub on_unhealthy: Option<String>,
    /// Autostop of a new cluster whose task sets none.
    pub default_autostop: Option<nembo_domain::task::Autostop>,
    /// A node of no cluster idle this long is released.
    pub pool_idle: Duration,
    /// The local provider offers simulated GPU shapes instead of this
    /// machine: for tests, benchmarks and demos.
    pub simulate_gpus: bool,
    /// Also offer a simulated cloud (`infra: sim`): for tests and benchmarks.
    pub sim_cloud: Option<crate::provider::sim::SimCloud>,
    /// `nembo-agent` for the local provider.
    pub agent_bin: Option<PathBuf>,
    /// Extra names for the serving certificate.
    pub hosts: Vec<String>,
    /// Every member of the cluster (this one included) by id, with its URL.
    /// Empty: a single-member cluster.
    pub members: BTreeMap<u64, String>,
    /// Where the cluster CA and tokens live (shared by all members);
    /// default: the data dir.
    pub cluster_dir: Option<PathBuf>,
    /// Parent of the local provider's node dirs (shared by all members of a
    /// local cluster, so any leader can terminate any node); default:
    /// `<data dir>/nodes`.
    pub nodes_dir: Option<PathBuf>,
    /// Start with no configuration, to be added to an existing cluster
    /// (`nembo admin members add`).
    pub join: bool,
    /// providers.yaml; default: `<cluster dir>/providers.yaml` if it exists.
    pub providers_file: Option<PathBuf>,
    /// Lifetime of the client certificates agents enroll for; they renew
    /// at two thirds of it.
    pub agent_cert_ttl: Duration,
    /// Lifetime of the member's own certificate; renewed with a third left.
    pub member_cert_life: Duration,
    /// Longest a public API call may take (membership changes: at least 60 s).
    pub request_timeout: Duration,
    /// A connection that has not finished its TLS handshake by then is
    /// dropped: sockets that send nothing must not hold files for ever.
    pub tls_handshake_timeout: Duration,
    /// Connections that may be in their handshake (not yet authenticated)
    /// at once; more wait in the kernel's backlog.
    pub handshake_slots: usize,
    /// Ports given to services' load balancers, one each, on every member.
    pub lb_ports: std::ops::RangeInclusive<u16>,
}

/// SkyServe's load balancer ports, 30001-30020, widened to a hundred.
pub const DEFAULT_LB_PORTS: std::ops::RangeInclusive<u16> = 30001..=30100;

impl CoordinatorConfig {
    /// Defaults for a coordinator in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            listen: None,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            member_id: 1,
            tick: Duration::from_millis(100),
            snapshot_every: 100_000,
            heartbeat_ms: 1000,
            node_ttl: Duration::from_secs(10),
            provision_timeout: Duration::from_secs(120),
            reconcile_every: Duration::from_secs(30),
            stop_grace_ms: 5000,
            max_nodes: 64,
            on_unhealthy: None,
            default_autostop: Some(nembo_domain::task::Autostop::after(DEFAULT_AUTOSTOP_S)),
            pool_idle: Duration::from_millis(nembo_domain::scheduler::POOL_IDLE_MS as u64),
            simulate_gpus: false,
            sim_cloud: None,
            agent_bin: None,
            hosts: Vec::new(),
            members: BTreeMap::new(),
            cluster_dir: None,
            nodes_dir: None,
            join: false,
            providers_file: None,
            agent_cert_ttl: Duration::from_secs(24 * 3600),
            member_cert_life: crate::identity::member::DEFAULT_LIFE,
            request_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            handshake_slots: 1024,
            lb_ports: DEFAULT_LB_PORTS,
        }
    }
}

/// Finds `nembo-agent`: flag, `NEMBO_AGENT_BIN`, next to this binary, PATH.
pub fn find_agent_bin(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("NEMBO_AGENT_BIN") {
        return p.into();
    }
    if let Some(sibling) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("nembo-agent")))
        .filter(|p| p.is_file())
    {
        return sibling;
    }
    PathBuf::from("nembo-agent")
}
