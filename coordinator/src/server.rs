//! Wiring: credentials, listener, Raft member, services and control loops.
//! [`run`] is the one entry point, used by `main.rs` and by tests alike.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nembo_domain::scheduler::Policy;
use nembo_proto::agent::v1::agent_service_server::AgentServiceServer;
use nembo_proto::agent::v1::enrollment_service_server::EnrollmentServiceServer;
use nembo_proto::api_info::ApiInfo;
use nembo_proto::raft::v1::raft_peer_service_server::RaftPeerServiceServer;
use nembo_proto::v1::coordinator_service_server::CoordinatorServiceServer;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::{Request, Status};

use crate::agents::enroll::{AgentCaller, EnrollmentService};
use crate::agents::session::Agents;
use crate::api::gate::Gate;
use crate::api::Api;
use crate::config::{find_agent_bin, CoordinatorConfig};
use crate::context::{Ctx, RanksCache};
use crate::control::{self, LoopConfig};
use crate::error::CoordinatorError;
use crate::identity::member::{self, MemberCertConfig};
use crate::identity::tls;
use crate::logs::LogStore;
use crate::provider::bootstrap::Bootstrap;
use crate::provider::local::LocalConfig;
use crate::provider::{ProviderContext, ProvidersFile};
use crate::replication::raft::{self, RaftConfig};
use crate::telemetry::fleet::Fleet;
use crate::telemetry::heartbeats::DelayHistogram;

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
            let Some(node) = certs.first().and_then(crate::identity::issuer::node_of) else {
                return Err(Status::unauthenticated(
                    "the certificate presented is not an agent's",
                ));
            };
            req.extensions_mut().insert(AgentCaller::Node(node));
            return Ok(req);
        }
        if let (Some(expected), Some(token)) =
            (&self.simulated, tls::bearer(req.metadata().as_ref()))
        {
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

/// How often a member looks for uploads no job needs any more.
const BLOB_COLLECT_EVERY: Duration = Duration::from_secs(600);
/// How long an upload no running job ships is kept (a relaunch within a
/// day sends nothing again).
const BLOB_IDLE: Duration = Duration::from_secs(24 * 3600);

/// Every member collects its own blob store: uploads are not in Raft, and
/// each member keeps what it was sent.
async fn collect_blobs(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(BLOB_COLLECT_EVERY);
    loop {
        tick.tick().await;
        let state = ctx.raft.view().state.clone();
        let store = ctx.clone();
        let gone = tokio::task::spawn_blocking(move || {
            let keep = store.blobs.referenced(&state);
            store.blobs.collect(&keep, BLOB_IDLE)
        })
        .await
        .unwrap_or(0);
        if gone > 0 {
            tracing::info!(blobs = gone, "deleted uploads no job ships any more");
        }
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

/// The CA that signs agent certificates, if this member holds its key.
fn load_issuer(
    ca_pem: &[u8],
    ca_key: &Path,
) -> Result<Option<crate::identity::issuer::Issuer>, CoordinatorError> {
    if !ca_key.exists() {
        tracing::warn!(path = %ca_key.display(), "no cluster CA key: agents cannot enroll through this member");
        return Ok(None);
    }
    let key = tls::read_secret(ca_key).map_err(|e| CoordinatorError::Internal(e.to_string()))?;
    crate::identity::issuer::Issuer::load(&String::from_utf8_lossy(ca_pem), &key)
        .map(Some)
        .map_err(|e| CoordinatorError::Internal(format!("cluster CA: {e}")))
}

/// Waits until the member has applied every entry it had committed when it
/// started (its snapshot is already in: the rest is the log's tail).
async fn replay(raft: &raft::RaftHandle) {
    let mut views = raft.subscribe();
    let committed = views.borrow().commit;
    let started = tokio::time::Instant::now();
    loop {
        let applied = views.borrow_and_update().applied;
        if applied >= committed {
            break;
        }
        // A long replay says so, so that a slow start is not taken for a hang.
        match tokio::time::timeout(Duration::from_secs(5), views.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return, // the member stopped; serving will fail loudly
            Err(_) => tracing::info!(applied, committed, "replaying the log before serving"),
        }
    }
    if started.elapsed() > Duration::from_secs(1) {
        tracing::info!(
            committed,
            took_ms = started.elapsed().as_millis() as u64,
            "log replayed"
        );
    }
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
    let creds =
        tls::ensure(&cluster_dir, dir).map_err(|e| CoordinatorError::Internal(e.to_string()))?;
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
    let issuer = load_issuer(&ca_pem, &creds.ca_key)?.map(Arc::new);
    let member_cert = MemberCertConfig {
        member_id: cfg.member_id,
        hosts: cfg.hosts.clone(),
        life: cfg.member_cert_life,
        cert_path: creds.server_cert.clone(),
        key_path: creds.server_key.clone(),
    };
    let identity = member::load_or_issue(&member_cert, issuer.as_deref())
        .map_err(|e| CoordinatorError::Internal(format!("member certificate: {e}")))?;
    let (identity_tx, identity_rx) = tokio::sync::watch::channel(Arc::new(identity));
    let server_tls = member::server_config(&ca_pem, identity_rx.clone())
        .map_err(|e| CoordinatorError::Internal(format!("tls: {e}")))?;

    let raft_cell = Arc::new(std::sync::OnceLock::new());
    // Even a single member gets a peer transport: members can be added later.
    let tls = crate::replication::peer::PeerTls {
        ca: ca_pem.clone(),
        identity: identity_rx,
    };
    let load_tls = tls.clone();
    let transport = Box::new(crate::replication::peer::start(
        cfg.member_id,
        tls,
        raft_cell.clone(),
    ));
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
    let (seen_tx, seen_rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(
        member::Renewal {
            cfg: member_cert,
            issuer: issuer.clone(),
            identity: identity_tx,
            raft: raft.clone(),
            seen: seen_rx,
        }
        .run(),
    );
    // Nothing is served, to agents or clients, before this member has applied
    // everything it had committed: an agent answered from the snapshot alone
    // was told its node (made in the log's tail) did not exist.
    replay(&raft).await;

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
                machine: None,
            },
            cluster: cluster_id(&ca_pem),
            bootstrap,
            catalog_dir: cluster_dir.join("catalog"),
            sim: cfg.sim_cloud.clone(),
            simulate_gpus: cfg.simulate_gpus,
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
        blobs: crate::blobs::BlobStore::new(dir.join("blobs")).map_err(startup("blobs dir"))?,
        providers,
        offerings,
        providers_not_enabled: crate::provider::not_enabled(&providers_file),
        secrets: crate::identity::sealed::SecretBox::from_hex(
            &tls::read_secret(&creds.secrets_key)
                .map_err(|e| CoordinatorError::Internal(e.to_string()))?,
        )
        .map_err(|e| CoordinatorError::Internal(format!("{}: {e}", creds.secrets_key.display())))?,
        catalog_dir: cluster_dir.join("catalog"),
        own_dirs: vec![
            dir.clone(),
            cluster_dir.clone(),
            cfg.nodes_dir.clone().unwrap_or_else(|| dir.join("nodes")),
        ],
        issuer,
        join_secret: agent_token.clone(),
        agent_cert_ttl: cfg.agent_cert_ttl,
        heartbeat_ms: cfg.heartbeat_ms,
        contact_lease_ms: (cfg.node_ttl.as_millis() / 2).min(u128::from(u32::MAX)) as u32,
        stop_grace_ms: cfg.stop_grace_ms,
        fleet: Fleet::start(),
        heartbeat_delay: DelayHistogram::default(),
        on_unhealthy: cfg.on_unhealthy.clone(),
        default_autostop: cfg.default_autostop.clone(),
        ranks: RanksCache::default(),
        shells: Default::default(),
        heartbeats: hb_tx,
        serve: crate::serve::Serving {
            bind_ip: addr.ip(),
            ports: cfg.lb_ports.clone(),
            load: Default::default(),
            reported: Default::default(),
        },
        blocking_slots: Arc::new(tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        )),
    });
    tokio::spawn(control::supervise(
        ctx.clone(),
        LoopConfig {
            policy: Policy {
                max_nodes: cfg.max_nodes,
                pool_idle_ms: cfg.pool_idle.as_millis() as i64,
            },
            node_ttl: cfg.node_ttl,
            provision_timeout: cfg.provision_timeout,
            reconcile_every: cfg.reconcile_every,
        },
        hb_rx,
    ));
    tokio::spawn(collect_blobs(ctx.clone()));
    tokio::spawn(crate::serve::lb::run(ctx.clone()));
    tokio::spawn(crate::serve::report::report_load(ctx.clone(), load_tls));

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
        CoordinatorServiceServer::new(Api::new(ctx.clone()))
            .max_decoding_message_size(8 * 1024 * 1024),
        ctx.clone(),
        client_token,
        cfg.request_timeout,
        ca_pem.clone(),
    );
    let agents = AgentServiceServer::new(Agents::new(ctx.clone()))
        .max_decoding_message_size(8 * 1024 * 1024);
    let enrollment = EnrollmentServiceServer::new(EnrollmentService::new(ctx.clone()))
        .max_decoding_message_size(64 * 1024);
    let simulated = ctx
        .providers
        .values()
        .any(|p| p.records_only())
        .then(|| agent_token.clone());
    let peers = RaftPeerServiceServer::new(crate::replication::peer::PeerService::new(
        ctx.raft.clone(),
        seen_tx,
        ctx.serve.reported.clone(),
    ))
    .max_decoding_message_size(crate::replication::peer::MAX_PEER_MESSAGE);

    let metrics_url = match cfg.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(startup("metrics listener"))?;
            let url = format!(
                "http://{}/metrics",
                listener.local_addr().map_err(startup("metrics listener"))?
            );
            tokio::spawn(crate::telemetry::metrics::serve(listener, ctx.clone()));
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
        ..Default::default()
    };
    std::fs::write(
        dir.join("api.json"),
        serde_json::to_vec_pretty(&info).unwrap_or_default(),
    )
    .map_err(startup("api.json"))?;
    tracing::info!(%endpoint, data_dir = %dir.display(), "coordinator serving");

    let serve = Server::builder()
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
            // TLS is the listener's: members and agents prove themselves
            // with certificates (checked against the CA there, and for what
            // they name by each service); clients use tokens and present none.
            crate::listener::accept(
                listener,
                server_tls,
                cfg.tls_handshake_timeout,
                cfg.handshake_slots,
            ),
            shutdown,
        );
    // A member whose storage failed (a full or failing disk) stops; the
    // process must not stay up answering UNAVAILABLE for ever. It exits with
    // the reason, so that a supervisor restarts it once the disk is fixed.
    let mut raft_views = ctx.raft.subscribe();
    let raft_stopped = async move { while raft_views.changed().await.is_ok() {} };
    tokio::select! {
        served = serve => served.map_err(|e| CoordinatorError::Internal(format!("server: {e}"))),
        () = raft_stopped => Err(CoordinatorError::Storage(
            "the Raft member stopped after a storage failure (a full or failing disk?); \
             exiting so that this member can be restarted once the disk is fixed"
                .into(),
        )),
    }
}
