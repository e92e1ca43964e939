//! `nembo-coordinator`: runs one coordinator until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

// The write path allocates and frees many small buffers on every request
// (gRPC frames, commands, entries); glibc's malloc was a fifth of the CPU
// under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use nembo_coordinator::provider::sim::SimCloud;
use nembo_coordinator::{run, CoordinatorConfig};

/// Nembo coordinator.
#[derive(Parser, Debug)]
#[command(name = "nembo-coordinator", version, subcommand_negates_reqs = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Data directory: Raft log, snapshots, credentials, logs, node dirs.
    #[arg(long, env = "NEMBO_DATA_DIR", required = true)]
    data_dir: Option<PathBuf>,
    /// Listen address (default: the last one used, else 127.0.0.1 on a free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Prometheus /metrics address, plain HTTP (`none` to disable). The
    /// default keeps it on loopback; its URL is in api.json.
    #[arg(long, default_value = "127.0.0.1:0")]
    metrics_listen: String,
    /// Raft member id.
    #[arg(long, default_value_t = 1)]
    member_id: u64,
    /// Agents send a heartbeat this often (ms).
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u32,
    /// A node whose heartbeats stop for this long is lost (ms).
    #[arg(long, default_value_t = 10_000)]
    node_ttl_ms: u64,
    /// A launched node whose agent has not enrolled by then has failed (ms).
    #[arg(long, default_value_t = 120_000)]
    provision_timeout_ms: u64,
    /// How often the leader lists every provider's instances and
    /// terminates those no node wants (ms); a leak lives at most two periods.
    #[arg(long, default_value_t = 30_000)]
    reconcile_ms: u64,
    /// Grace between SIGTERM and SIGKILL when stopping a job (ms).
    #[arg(long, default_value_t = 5000)]
    stop_grace_ms: u32,
    /// Most nodes that may exist at once.
    #[arg(long, default_value_t = 64)]
    max_nodes: u32,
    /// Shell command the leader runs when a GPU makes a node unhealthy, with
    /// NEMBO_NODE_ID, NEMBO_UNHEALTHY_REASON and NEMBO_JOB_IDS set.
    #[arg(long)]
    on_unhealthy: Option<String>,
    /// Autostop of a cluster whose task sets none: idle minutes (`60`), a
    /// window (`90s`, `2h`), or `off`.
    #[arg(long, default_value = "60m")]
    autostop_default: String,
    /// A node of no cluster (a managed job's) idle this long is released (ms).
    #[arg(long, default_value_t = nembo_domain::scheduler::POOL_IDLE_MS as u64)]
    pool_idle_ms: u64,
    /// The local provider offers simulated GPU shapes (H100:8, ... in two
    /// regions) instead of what this machine has, as `local: {simulate:
    /// true}` in providers.yaml does: for tests, benchmarks and demos. Their
    /// GPUs do not exist; they are marked simulated wherever shown.
    #[arg(long, env = "NEMBO_SIMULATE_GPUS", value_parser = clap::builder::BoolishValueParser::new())]
    simulate_gpus: bool,
    /// Also offer a small simulated cloud (`infra: sim`) whose nodes are
    /// records only: load generators speak the agent protocol for them.
    #[arg(long)]
    sim_provider: bool,
    /// Also offer the simulated cloud this JSON file describes (regions,
    /// prices, capacity, quota, API failures, real agents or not; see
    /// coordinator/src/provider/sim.rs).
    #[arg(long, value_name = "FILE")]
    sim_cloud: Option<PathBuf>,
    /// Snapshot the state and compact the log every this many entries
    /// (etcd's default), or once they reach 64 MiB.
    #[arg(long, default_value_t = 100_000)]
    snapshot_every: u64,
    /// The nembo-agent binary the local provider starts.
    #[arg(long, env = "NEMBO_AGENT_BIN")]
    agent_bin: Option<PathBuf>,
    /// Extra host names or IPs for the serving certificate.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// A cluster member as ID=URL (repeat for each, this one included).
    /// None: a single-member cluster.
    #[arg(long = "member", value_parser = parse_member)]
    members: Vec<(u64, String)>,
    /// Directory with the cluster CA and tokens shared by all members
    /// (default: the data dir).
    #[arg(long)]
    cluster_dir: Option<PathBuf>,
    /// Parent of the local provider's node dirs (default: <data dir>/nodes).
    #[arg(long)]
    nodes_dir: Option<PathBuf>,
    /// Providers beyond local (aws, seeweb, ssh), local prices and
    /// capacity, and cloud VM bootstrap: see README "Providers". Default:
    /// <cluster dir>/providers.yaml if it exists.
    #[arg(long, env = "NEMBO_PROVIDERS", value_name = "FILE")]
    providers: Option<PathBuf>,
    /// Start empty and wait to be added to an existing cluster
    /// (`nembo admin members add ID URL`); --member names the cluster.
    #[arg(long)]
    join: bool,
    /// Lifetime of the client certificates agents enroll for (seconds);
    /// agents renew at two thirds of it.
    #[arg(long, default_value_t = 24 * 3600)]
    agent_cert_ttl_s: u64,
    /// Lifetime of this member's own certificate (seconds); it renews
    /// itself with a third left. Default 30 days.
    #[arg(long, default_value_t = 30 * 24 * 3600)]
    member_cert_life_s: u64,
    /// Longest a public API call may take (seconds).
    #[arg(long, default_value_t = 30)]
    request_timeout_s: u64,
    /// A connection that has not finished its TLS handshake by then is
    /// dropped (milliseconds).
    #[arg(long, default_value_t = 10_000)]
    tls_handshake_timeout_ms: u64,
    /// Connections that may be in their TLS handshake at once; more wait.
    #[arg(long, default_value_t = 1024)]
    handshake_slots: usize,
    /// Ports for services' load balancers (`nembo serve up`), one per
    /// service, on every member: FIRST-LAST.
    #[arg(long, value_name = "FIRST-LAST", default_value = "30001-30100", value_parser = parse_port_range)]
    lb_ports: std::ops::RangeInclusive<u16>,
}

fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let port = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("'{p}': {e}"));
    let (a, b) = (port(a)?, port(b)?);
    if a == 0 || b < a {
        return Err(format!("'{s}': give FIRST-LAST, 1 <= FIRST <= LAST"));
    }
    Ok(a..=b)
}

#[derive(clap::Subcommand, Debug)]
enum Sub {
    /// Create the cluster's CA, tokens and secrets key (or install an
    /// existing CA) in a cluster dir, before the first start. A coordinator
    /// started without it creates them itself.
    Init {
        /// Where the cluster's credentials go (a coordinator's --cluster-dir,
        /// or its --data-dir).
        #[arg(long)]
        cluster_dir: PathBuf,
        /// An existing CA certificate (PEM) to use instead of a new one.
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// Its private key (PEM; the file must be 0600).
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<PathBuf>,
    },
}

fn parse_member(s: &str) -> Result<(u64, String), String> {
    let (id, url) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not ID=URL"))?;
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| format!("member id '{id}' is not a number"))?;
    if id == 0 {
        return Err("member ids start at 1".into());
    }
    if !url.starts_with("https://") {
        return Err(format!("member {id}: '{url}' must be an https:// URL"));
    }
    Ok((id, url.trim().to_string()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NEMBO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: log files stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let a = Args::parse();
    raise_file_limit();
    if let Some(Sub::Init {
        cluster_dir,
        ca_cert,
        ca_key,
    }) = &a.command
    {
        let ca = ca_cert.as_deref().zip(ca_key.as_deref());
        let written = nembo_coordinator::identity::tls::init(cluster_dir, ca)?;
        if written.is_empty() {
            println!("{}: already initialised", cluster_dir.display());
        }
        for path in written {
            println!("created {}", path.display());
        }
        return Ok(());
    }
    let data_dir = a.data_dir.clone().context("--data-dir")?;
    let cfg = CoordinatorConfig {
        listen: a.listen,
        metrics_listen: match a.metrics_listen.as_str() {
            "none" => None,
            addr => Some(addr.parse().context("--metrics-listen")?),
        },
        member_id: a.member_id,
        heartbeat_ms: a.heartbeat_ms,
        node_ttl: Duration::from_millis(a.node_ttl_ms),
        provision_timeout: Duration::from_millis(a.provision_timeout_ms),
        reconcile_every: Duration::from_millis(a.reconcile_ms.max(100)),
        stop_grace_ms: a.stop_grace_ms,
        max_nodes: a.max_nodes,
        on_unhealthy: a.on_unhealthy,
        default_autostop: match a.autostop_default.as_str() {
            "off" | "none" | "false" => None,
            w => Some(nembo_domain::task::Autostop::after(
                nembo_domain::task::Autostop::parse_window(w)
                    .context("--autostop-default: expected minutes, 90s, 2h or off")?,
            )),
        },
        pool_idle: Duration::from_millis(a.pool_idle_ms),
        simulate_gpus: a.simulate_gpus,
        sim_cloud: match (&a.sim_cloud, a.sim_provider) {
            (Some(path), _) => Some(SimCloud::load(path).map_err(anyhow::Error::msg)?),
            (None, true) => Some(SimCloud::default_cloud()),
            (None, false) => None,
        },
        snapshot_every: a.snapshot_every.max(1),
        agent_bin: a.agent_bin,
        hosts: a.hosts,
        members: a.members.into_iter().collect(),
        cluster_dir: a.cluster_dir,
        nodes_dir: a.nodes_dir,
        join: a.join,
        providers_file: a.providers,
        agent_cert_ttl: Duration::from_secs(a.agent_cert_ttl_s.max(10)),
        member_cert_life: Duration::from_secs(a.member_cert_life_s.max(10)),
        request_timeout: Duration::from_secs(a.request_timeout_s.max(1)),
        tls_handshake_timeout: Duration::from_millis(a.tls_handshake_timeout_ms.max(100)),
        handshake_slots: a.handshake_slots,
        lb_ports: a.lb_ports,
        ..CoordinatorConfig::new(data_dir.clone())
    };
    let pid_file = data_dir.join("coordinator.pid");
    std::fs::create_dir_all(&data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    std::fs::write(&pid_file, std::process::id().to_string()).context("write pid file")?;
    let grace_pid_file = pid_file.clone();
    let shutdown = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        // Graceful shutdown waits for open calls, and peer and agent streams
        // never end on their own: give them a moment, then go.
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            let _ = std::fs::remove_file(&grace_pid_file);
            std::process::exit(0);
        });
    };
    let result = run(cfg, shutdown).await;
    let _ = std::fs::remove_file(&pid_file);
    result.context("coordinator failed")
}

/// Raises the soft limit on open files to the hard one: every client,
/// agent and peer connection is a file, and a default soft limit of 1 024
/// is easy to reach (log appends then fail too).
fn raise_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "could not raise the open-file limit");
            }
        }
    }
}
