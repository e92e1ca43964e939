//! Wiring: credentials, listener, Raft member, services and control loops.
//! [`run`] is the one entry point, used by `main.rs` and by tests alike.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nembo_domain::scheduler::Policy;
use nembo_domain::state::{Command, JobId, Offering, State};
use nembo_proto::client::Client;
use nembo_proto::v1::agent_service_server::AgentServiceServer;
use nembo_proto::v1::coordinator_server::CoordinatorServer;
use nembo_proto::v1::enrollment_server::EnrollmentServer;
use nembo_proto::v1::raft_peer_server::RaftPeerServer;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};

use crate::agent_service::Agents;
use crate::api::Api;
use crate::control::{self, LoopConfig};
use crate::enroll::{AgentCaller, EnrollmentService};
use crate::error::CoordinatorError;
use crate::fleet::Fleet;
use crate::gate::Gate;
use crate::logs::LogStore;
use crate::metrics::DelayHistogram;
use crate::provider::bootstrap::Bootstrap;
use crate::provider::local::LocalConfig;
use crate::provider::{Provider, ProviderContext, ProvidersFile};
use crate::raft::{self, RaftConfig, RaftHandle};
use crate::tls;

/// Request metadata that allows a read from any member's own state.
pub const STALE_READ_KEY: &str = "nembo-stale";

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
    /// Longest a public API call may take (membership changes: at least 60 s).
    pub request_timeout: Duration,
}

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
            sim_cloud: None,
            agent_bin: None,
            hosts: Vec::new(),
            members: BTreeMap::new(),
            cluster_dir: None,
            nodes_dir: None,
            join: false,
            providers_file: None,
            agent_cert_ttl: Duration::from_secs(24 * 3600),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// What clients need to reach this coordinator; written to `api.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiInfo {
    /// `https://host:port`.
    pub endpoint: String,
    /// CA to trust.
    pub ca_cert_path: String,
    /// Bearer token file (0600).
    pub token_path: String,
    /// Coordinator process id.
    pub pid: u32,
    /// Prometheus endpoint (`http://host:port/metrics`), if served.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub metrics_url: String,
}

/// Shared by the services and loops of one coordinator.
pub struct Ctx {
    /// The Raft member.
    pub raft: RaftHandle,
    /// Job output.
    pub logs: LogStore,
    /// Providers by name.
    pub providers: BTreeMap<String, Arc<dyn Provider>>,
    /// Every provider's offerings.
    pub offerings: Vec<Offering>,
    /// Seals task secrets before they are proposed; opens them for agents.
    pub secrets: crate::sealed::SecretBox,
    /// Signs agent certificates (none: this member has no CA key).
    pub issuer: Option<crate::identity::Issuer>,
    /// The secret node tokens are derived from.
    pub join_secret: Arc<str>,
    /// Lifetime of agent certificates.
    pub agent_cert_ttl: Duration,
    /// Providers that providers.yaml leaves off, and how to enable them.
    pub providers_not_enabled: Vec<(&'static str, &'static str)>,
    /// Where refreshed catalogs are written.
    pub catalog_dir: PathBuf,
    /// Heartbeat period given to agents.
    pub heartbeat_ms: u32,
    /// Grace for stopping jobs.
    pub stop_grace_ms: u32,
    /// GPU telemetry of the nodes whose sessions this member holds.
    pub fleet: Fleet,
    /// Agent heartbeat delays, for `/metrics`.
    pub heartbeat_delay: DelayHistogram,
    /// Shell command run (on the leader) when a node turns unhealthy.
    pub on_unhealthy: Option<String>,
    /// Ranks by node for the newest state, shared by every agent session.
    ranks: std::sync::Mutex<Option<(Arc<State>, RanksByNode)>>,
    /// In-process subscribers to nodes turning unhealthy (leader only).
    pub node_health: tokio::sync::broadcast::Sender<crate::control::NodeUnhealthy>,
    heartbeats: mpsc::Sender<String>,
    /// How this member reaches the leader to forward a request.
    forward: Forwarder,
}

/// How a follower reaches the current leader: one channel, kept while the
/// leader stays the same.
struct Forwarder {
    ca: Vec<u8>,
    /// Sent only where a forwarded request carries no caller's token.
    token: nembo_proto::client::BearerToken,
    channel: tokio::sync::Mutex<Option<(u64, tonic::transport::Channel)>>,
}

/// node id -> (job, rank) of every current attempt's rank placed there.
pub type RanksByNode = Arc<HashMap<String, Vec<(JobId, usize)>>>;

impl Ctx {
    /// Where each job's current ranks are, for `state`: built once per
    /// state version (O(ranks)) instead of once per agent session (which
    /// made every commit cost sessions x ranks).
    pub fn ranks_by_node(&self, state: &Arc<State>) -> RanksByNode {
        let mut cached = self.ranks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, r)) = cached.as_ref() {
            if Arc::ptr_eq(s, state) {
                return r.clone();
            }
        }
        let mut by_node: HashMap<String, Vec<(JobId, usize)>> = HashMap::new();
        for job in state.placed_jobs() {
            if let Some(a) = job.current_attempt() {
                for (rank, node) in a.node_ids.iter().enumerate() {
                    by_node
                        .entry(node.clone())
                        .or_default()
                        .push((job.id, rank));
                }
            }
        }
        let r = Arc::new(by_node);
        *cached = Some((state.clone(), r.clone()));
        r
    }

    /// Resets a node's liveness timer. Never blocks: a full mailbox means
    /// the timer was reset moments ago.
    pub fn heartbeat(&self, node_id: &str) {
        let _ = self.heartbeats.try_send(node_id.to_string());
    }

    /// `None` when this member leads; otherwise a client of the leader, to
    /// which followers forward every call, so that any member serves any
    /// client and reads are as fresh as the leader's.
    pub async fn leader(&self) -> Result<Option<Client>, Status> {
        Ok(self
            .leader_channel()
            .await?
            .map(|channel| nembo_proto::client::client(channel, self.forward.token.clone())))
    }

    /// `None` when this member leads; otherwise a channel to the leader, kept
    /// while the leader stays the same: under the client of [`Self::leader`],
    /// and for handing a request on untouched.
    pub async fn leader_channel(&self) -> Result<Option<tonic::transport::Channel>, Status> {
        let view = self.raft.view();
        if view.is_leader() {
            return Ok(None);
        }
        let leader = view.leader_id;
        let Some(url) = view.members.get(&leader).cloned() else {
            return Err(Status::unavailable("no leader elected yet; retry shortly"));
        };
        let mut cached = self.forward.channel.lock().await;
        if let Some((id, c)) = &*cached {
            if *id == leader {
                return Ok(Some(c.clone()));
            }
        }
        let unreachable =
            |e: String| Status::unavailable(format!("leader {leader} unreachable: {e}"));
        let channel = nembo_proto::client::endpoint(&url, &self.forward.ca)
            .map_err(|e| unreachable(e.to_string()))?
            .connect()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        *cached = Some((leader, channel.clone()));
        Ok(Some(channel))
    }

    /// Where a read is served. Default: linearizable, so the leader serves
    /// it after confirming its leadership with a quorum (read index) and a
    /// follower forwards it. With `nembo-stale: true` in the request
    /// metadata, any member answers at once from its own applied state.
    pub async fn read_route<T>(&self, req: &tonic::Request<T>) -> Result<Option<Client>, Status> {
        let stale = req
            .metadata()
            .get(STALE_READ_KEY)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "true" || v == "1");
        if stale {
            return Ok(None);
        }
        // A read changes nothing, so it is always safe to try again: when
        // leadership moves while we confirm it (an old leader back from a
        // partition learns it was deposed), follow the new leader instead
        // of failing the client.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut views = self.raft.subscribe();
        loop {
            let failure = match self.leader().await {
                Ok(Some(client)) => return Ok(Some(client)),
                Ok(None) => match self.raft.read_index().await {
                    Ok(()) => return Ok(None),
                    Err(e) => Status::unavailable(format!(
                        "leadership could not be confirmed for a linearizable read ({e}); retry"
                    )),
                },
                Err(status) => status,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(failure);
            }
            let _ = tokio::time::timeout_at(deadline, views.changed()).await;
        }
    }

    /// The leader's URL, for redirecting agents.
    pub fn leader_url(&self) -> Option<String> {
        let view = self.raft.view();
        view.members.get(&view.leader_id).cloned()
    }

    /// Proposes a command whose failure only needs logging (loops retry on
    /// the next state change).
    pub async fn propose_quietly(&self, cmd: Command) {
        match self.raft.propose(cmd).await {
            Ok(nembo_domain::state::Outcome::Rejected(r)) => {
                tracing::debug!(reason = %r, "command rejected")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "proposal failed"),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    listen: SocketAddr,
}

/// Agents prove themselves with the certificate they enrolled for (the TLS
/// layer checked it against the cluster CA; here: that it is an agent's).
/// The cluster's agent token is taken only where a simulated cloud's
/// record-only nodes exist, and only for those nodes (checked at hello).
#[derive(Clone)]
struct AgentAuth {
    simulated: Option<Arc<str>>,
}

impl tonic::service::Interceptor for AgentAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(certs) = req.peer_certs() {
            let Some(node) = certs.first().and_then(crate::identity::node_of) else {
                return Err(Status::unauthenticated(
                    "the certificate presented is not an agent's",
                ));
            };
            req.extensions_mut().insert(AgentCaller::Node(node));
            return Ok(req);
        }
        if let (Some(expected), Some(token)) = (
            &self.simulated,
            crate::gate::bearer(req.metadata().as_ref()),
        ) {
            if tls::token_matches(token, expected) {
                req.extensions_mut().insert(AgentCaller::Simulated);
                return Ok(req);
            }
        }
        Err(Status::unauthenticated(
            "agents connect with the certificate they enrolled for (nembo-agent --join-token-file)",
        ))
    }
}

fn startup(what: &str) -> impl FnOnce(std::io::Error) -> CoordinatorError + '_ {
    move |e| CoordinatorError::Internal(format!("{what}: {e}"))
}

/// This cluster's id: a digest of its CA, so two clusters sharing one cloud
/// account never take each other's instances for their own.
fn cluster_id(ca_pem: &[u8]) -> String {
    tls::sha256_hex(ca_pem)[..16].to_string()
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

/// The CA that signs agent certificates, if this member holds its key.
fn load_issuer(
    ca_pem: &[u8],
    ca_key: &Path,
) -> Result<Option<crate::identity::Issuer>, CoordinatorError> {
    if !ca_key.exists() {
        tracing::warn!(path = %ca_key.display(), "no cluster CA key: agents cannot enroll through this member");
        return Ok(None);
    }
    let key = tls::read_secret(ca_key).map_err(|e| CoordinatorError::Internal(e.to_string()))?;
    crate::identity::Issuer::load(&String::from_utf8_lossy(ca_pem), &key)
        .map(Some)
        .map_err(|e| CoordinatorError::Internal(format!("cluster CA: {e}")))
}

/// Streams and requests in flight on one client connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// Runs a coordinator until `shutdown` resolves.
pub async fn run(
    cfg: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let dir = &cfg.data_dir;
    std::fs::create_dir_all(dir).map_err(startup("data dir"))?;
    // Job output and state may hold secrets: the data dir is the owner's alone.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(startup("data dir permissions"))?;
    let cluster_dir = cfg.cluster_dir.clone().unwrap_or_else(|| dir.clone());
    let creds = tls::ensure(&cluster_dir, dir, cfg.member_id, &cfg.hosts)
        .map_err(|e| CoordinatorError::Internal(e.to_string()))?;
    let client_token: Arc<str> = tls::read_secret(&creds.token)
        .map_err(|e| CoordinatorError::Internal(e.to_string()))?
        .into();
    let agent_token: Arc<str> = tls::read_secret(&creds.agent_token)
        .map_err(|e| CoordinatorError::Internal(e.to_string()))?
        .into();

    let persisted_path = dir.join("coordinator.json");
    let persisted: Option<Persisted> = std::fs::read(&persisted_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let listen = cfg
        .listen
        .or(persisted.map(|p| p.listen))
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(startup(&format!("listen on {listen}")))?;
    let addr = listener.local_addr().map_err(startup("listener"))?;
    std::fs::write(
        &persisted_path,
        serde_json::to_vec(&Persisted { listen: addr }).unwrap_or_default(),
    )
    .map_err(startup("coordinator.json"))?;
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    let endpoint = format!("https://{host}:{}", addr.port());

    let mut members = cfg.members.clone();
    members
        .entry(cfg.member_id)
        .or_insert_with(|| endpoint.clone());
    let ca_pem = std::fs::read(&creds.ca_cert).map_err(startup("CA certificate"))?;
    let cert = std::fs::read(&creds.server_cert).map_err(startup("server certificate"))?;
    // Through the same check as tokens: a key others can read is refused.
    let key = tls::read_secret(&creds.server_key)
        .map_err(|e| CoordinatorError::Internal(e.to_string()))?
        .into_bytes();

    let raft_cell = Arc::new(std::sync::OnceLock::new());
    // Even a single member gets a peer transport: members can be added later.
    let tls = crate::peer::PeerTls {
        ca: ca_pem.clone(),
        cert: cert.clone(),
        key: key.clone(),
    };
    let transport = Box::new(crate::peer::start(cfg.member_id, tls, raft_cell.clone()));
    let (raft, _raft_thread) = raft::start(
        RaftConfig {
            id: cfg.member_id,
            // A joining member starts with no configuration: it learns the
            // cluster's from the leader's snapshot once it is added.
            voters: if cfg.join {
                Vec::new()
            } else {
                members.keys().copied().collect()
            },
            members: members.clone(),
            dir: dir.join("raft"),
            tick: cfg.tick,
            snapshot_every: cfg.snapshot_every,
        },
        transport,
    )?;
    let _ = raft_cell.set(raft.clone());

    if members.len() == 1 && !cfg.join {
        // Serve once there is a leader, so the first request is not refused.
        let mut views = raft.subscribe();
        let _ = tokio::time::timeout(cfg.tick * 30, views.wait_for(|v| v.leader_id != 0)).await;
    }

    let providers_path = cfg
        .providers_file
        .clone()
        .or_else(|| Some(cluster_dir.join("providers.yaml")).filter(|p| p.is_file()));
    let providers_file = match &providers_path {
        Some(path) => ProvidersFile::load(path).map_err(CoordinatorError::Internal)?,
        None => ProvidersFile::default(),
    };
    let endpoints: Vec<String> = members.values().cloned().collect();
    let bootstrap = Bootstrap {
        coordinators: if providers_file.bootstrap.coordinators.is_empty() {
            endpoints.clone()
        } else {
            providers_file.bootstrap.coordinators.clone()
        },
        ca_pem: String::from_utf8_lossy(&ca_pem).into_owned(),
        agent_token: agent_token.clone(),
        agent_url: providers_file
            .bootstrap
            .agent_url
            .clone()
            .unwrap_or_else(crate::provider::bootstrap::default_agent_url),
        agent_sha256: providers_file.bootstrap.agent_sha256.clone(),
        heartbeat_ms: cfg.heartbeat_ms,
    };
    let providers = crate::provider::build(
        &providers_file,
        ProviderContext {
            local: LocalConfig {
                nodes_dir: cfg.nodes_dir.clone().unwrap_or_else(|| dir.join("nodes")),
                agent_bin: find_agent_bin(cfg.agent_bin.as_deref()),
                endpoints,
                ca_cert: creds.ca_cert.clone(),
                join_secret: agent_token.clone(),
                heartbeat_ms: cfg.heartbeat_ms,
                settings: Default::default(),
            },
            cluster: cluster_id(&ca_pem),
            bootstrap,
            catalog_dir: cluster_dir.join("catalog"),
            sim: cfg.sim_cloud.clone(),
        },
    )
    .map_err(|e| {
        CoordinatorError::Internal(match &providers_path {
            Some(p) => format!("{}: {e}", p.display()),
            None => e,
        })
    })?;
    let offerings = providers.values().flat_map(|p| p.offerings()).collect();

    let (hb_tx, hb_rx) = mpsc::channel(4096);
    let ctx = Arc::new(Ctx {
        raft,
        logs: LogStore::new(dir.join("logs")).map_err(startup("logs dir"))?,
        providers,
        offerings,
        providers_not_enabled: crate::provider::not_enabled(&providers_file),
        secrets: crate::sealed::SecretBox::from_hex(
            &tls::read_secret(&creds.secrets_key)
                .map_err(|e| CoordinatorError::Internal(e.to_string()))?,
        )
        .map_err(|e| CoordinatorError::Internal(format!("{}: {e}", creds.secrets_key.display())))?,
        catalog_dir: cluster_dir.join("catalog"),
        issuer: load_issuer(&ca_pem, &creds.ca_key)?,
        join_secret: agent_token.clone(),
        agent_cert_ttl: cfg.agent_cert_ttl,
        heartbeat_ms: cfg.heartbeat_ms,
        stop_grace_ms: cfg.stop_grace_ms,
        fleet: Fleet::start(),
        heartbeat_delay: DelayHistogram::default(),
        on_unhealthy: cfg.on_unhealthy.clone(),
        node_health: tokio::sync::broadcast::channel(64).0,
        ranks: std::sync::Mutex::new(None),
        heartbeats: hb_tx,
        forward: Forwarder {
            ca: ca_pem.clone(),
            token: nembo_proto::client::BearerToken::new(&client_token).map_err(|e| {
                CoordinatorError::Internal(format!("{}: {e}", creds.token.display()))
            })?,
            channel: tokio::sync::Mutex::new(None),
        },
    });
    tokio::spawn(control::supervise(
        ctx.clone(),
        LoopConfig {
            policy: Policy {
                max_nodes: cfg.max_nodes,
            },
            node_ttl: cfg.node_ttl,
            provision_timeout: cfg.provision_timeout,
            reconcile_every: cfg.reconcile_every,
        },
        hb_rx,
    ));

    // Both reflection versions: grpcurl speaks v1, grpcio's Python client v1alpha.
    // Reflection is open without a token: it reveals the public schema only.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nembo_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordinatorError::Internal(format!("reflection: {e}")))?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nembo_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| CoordinatorError::Internal(format!("reflection: {e}")))?;
    let api = Gate::new(
        CoordinatorServer::new(Api::new(ctx.clone())).max_decoding_message_size(8 * 1024 * 1024),
        ctx.clone(),
        client_token,
        cfg.request_timeout,
    );
    let agents = AgentServiceServer::new(Agents::new(ctx.clone()))
        .max_decoding_message_size(8 * 1024 * 1024);
    let enrollment = EnrollmentServer::new(EnrollmentService::new(ctx.clone()))
        .max_decoding_message_size(64 * 1024);
    let simulated = ctx
        .providers
        .values()
        .any(|p| p.records_only())
        .then(|| agent_token.clone());
    let peers = RaftPeerServer::new(crate::peer::PeerService::new(ctx.raft.clone()))
        .max_decoding_message_size(crate::peer::MAX_PEER_MESSAGE);

    let metrics_url = match cfg.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(startup("metrics listener"))?;
            let url = format!(
                "http://{}/metrics",
                listener.local_addr().map_err(startup("metrics listener"))?
            );
            tokio::spawn(crate::metrics::serve(listener, ctx.clone()));
            url
        }
        None => String::new(),
    };
    let info = ApiInfo {
        endpoint: endpoint.clone(),
        ca_cert_path: creds.ca_cert.display().to_string(),
        token_path: creds.token.display().to_string(),
        pid: std::process::id(),
        metrics_url,
    };
    std::fs::write(
        dir.join("api.json"),
        serde_json::to_vec_pretty(&info).unwrap_or_default(),
    )
    .map_err(startup("api.json"))?;
    tracing::info!(%endpoint, data_dir = %dir.display(), "coordinator serving");

    Server::builder()
        .tls_config(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(cert, key))
                // Members and agents prove themselves with certificates
                // (checked against the CA here, and for what they name by
                // each service); clients use tokens and present none.
                .client_ca_root(Certificate::from_pem(&ca_pem))
                .client_auth_optional(true),
        )
        .map_err(|e| CoordinatorError::Internal(format!("tls: {e}")))?
        .tcp_nodelay(true)
        // One client cannot take the coordinator for itself: each connection
        // gets at most this many streams and requests in flight (more wait),
        // and a peer that stops answering pings is dropped.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(api)
        .add_service(InterceptedService::new(agents, AgentAuth { simulated }))
        .add_service(enrollment)
        .add_service(peers)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(|e| CoordinatorError::Internal(format!("server: {e}")))
}
