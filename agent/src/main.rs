//! `nembo-agent`: the per-node agent.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use nembo_agent::{run, AgentConfig};
use nembo_proto::v1 as pb;

/// Nembo node agent.
#[derive(Parser, Debug)]
#[command(name = "nembo-agent", version)]
struct Args {
    /// Coordinator URLs, comma-separated, e.g. https://10.0.0.2:7443.
    #[arg(
        long,
        env = "NEMBO_COORDINATOR",
        value_delimiter = ',',
        required_unless_present_any = ["probe_gpus", "inventory"]
    )]
    coordinator: Vec<String>,
    /// Cluster CA certificate.
    #[arg(long, env = "NEMBO_CA_CERT", required_unless_present_any = ["probe_gpus", "inventory"])]
    ca_cert: Option<PathBuf>,
    /// File holding a one-time join token (must be 0600): traded, with a
    /// key made here, for this node's certificate, then deleted. Not needed
    /// while the certificate saved in the work dir is valid.
    #[arg(long, env = "NEMBO_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// This node's id, for a node a provider launched; a machine joining on
    /// its own leaves it out and is named by the coordinators.
    #[arg(long, env = "NEMBO_NODE_ID")]
    node_id: Option<String>,
    /// Work directory for jobs and their logs.
    #[arg(long, env = "NEMBO_WORK_DIR", required_unless_present_any = ["probe_gpus", "inventory"])]
    work_dir: Option<PathBuf>,
    /// Address other nodes reach this one at.
    #[arg(long, default_value = "127.0.0.1")]
    address: String,
    /// Where the world reaches this node, if not at --address (a cloud VM's
    /// public IP): where its jobs' ports are shown.
    #[arg(long, default_value = "")]
    public_address: String,
    /// Declared accelerators, e.g. H100:8 (default: the GPUs NVML finds).
    #[arg(long, default_value = "")]
    accelerators: String,
    /// NVML library to load (default: libnvidia-ml.so.1).
    #[arg(long, env = "NEMBO_NVML_LIB")]
    nvml_lib: Option<PathBuf>,
    /// Print this node's GPUs and one reading of each as JSON, then exit.
    #[arg(long)]
    probe_gpus: bool,
    /// Print this machine's GPUs as JSON (no readings), then exit.
    #[arg(long)]
    inventory: bool,
    /// This node's accelerators are simulated (the local provider's
    /// `simulate: true`): jobs are told so (`NEMBO_SIMULATED=1`) and get no
    /// GPU of their own.
    #[arg(long)]
    simulated: bool,
    /// Declared vCPUs.
    #[arg(long, default_value_t = 2.0)]
    cpus: f64,
    /// Declared memory in GB.
    #[arg(long, default_value_t = 8.0)]
    memory_gb: f64,
    /// Heartbeat period (ms) until the coordinator sets one.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// How often to read the GPUs (ms).
    #[arg(long, env = "NEMBO_GPU_SAMPLE_MS", default_value_t = 1000)]
    gpu_sample_ms: u64,
    /// Watch AWS's instance metadata (IMDSv2) at this base URL for spot
    /// interruption notices (on EC2: http://169.254.169.254).
    #[arg(long, env = "AWS_EC2_METADATA_SERVICE_ENDPOINT")]
    aws_metadata_url: Option<String>,
    /// Watch GCP's metadata server at this base URL (on GCE:
    /// http://metadata.google.internal/computeMetadata/v1).
    #[arg(long)]
    gcp_metadata_url: Option<String>,
    /// Watch Azure Scheduled Events at this base URL (on Azure:
    /// http://169.254.169.254/metadata).
    #[arg(long)]
    azure_metadata_url: Option<String>,
    /// This VM's name in Azure events (default: every event counts).
    #[arg(long)]
    azure_vm_name: Option<String>,
    /// How often AWS and Azure metadata are polled (ms); GCP's are hanging GETs.
    /// Twice a second: a notice then reaches the coordinators (and takes a
    /// service's replica out of its load balancers) within half a second.
    #[arg(long, default_value_t = 500)]
    preemption_poll_ms: u64,
    /// Root tasks' checkpoint paths here instead of at / (nodes that share
    /// a machine, as the local provider's do).
    #[arg(long)]
    checkpoint_root: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
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
    if a.probe_gpus {
        let probe = nembo_agent::gpu::probe(a.nvml_lib.as_deref());
        println!("{}", serde_json::to_string_pretty(&probe)?);
        return Ok(());
    }
    if a.inventory {
        let inventory = nembo_agent::gpu::inventory(a.nvml_lib.as_deref());
        println!("{}", serde_json::to_string_pretty(&inventory)?);
        return Ok(());
    }
    let mut accelerators = nembo_agent::supervisor::parse_accelerators(&a.accelerators)
        .map_err(anyhow::Error::msg)
        .context("--accelerators")?;
    let mut gpu_indices = Vec::new();
    let telemetry = match nembo_agent::gpu::Gpus::open(a.nvml_lib.as_deref()) {
        Ok(g) => {
            if accelerators.is_empty() {
                accelerators = g.accelerators();
            }
            if !a.simulated {
                gpu_indices = g.inventory().iter().map(|gpu| gpu.index).collect();
            }
            let interval = Duration::from_millis(a.gpu_sample_ms.max(100));
            let work_dir = a.work_dir.clone().unwrap_or_default();
            nembo_agent::telemetry::start(g, interval, work_dir)
        }
        Err(e) => {
            tracing::info!(reason = %e, "NVML not available: this node reports no GPUs");
            nembo_agent::telemetry::Telemetry::none()
        }
    };
    let cfg = AgentConfig {
        coordinators: a.coordinator,
        ca_cert: a.ca_cert.context("--ca-cert")?,
        join_token_file: a.join_token_file,
        node_id: a.node_id,
        work_dir: a.work_dir.context("--work-dir")?,
        address: a.address,
        public_address: a.public_address,
        resources: pb::NodeResources {
            accelerators,
            cpus: a.cpus,
            memory_gb: a.memory_gb,
        },
        heartbeat: Duration::from_millis(a.heartbeat_ms.max(50)),
        telemetry,
        watch: nembo_agent::preempt::WatchConfig {
            aws: a.aws_metadata_url,
            gcp: a.gcp_metadata_url,
            azure: a.azure_metadata_url,
            azure_vm_name: a.azure_vm_name,
            poll: Duration::from_millis(a.preemption_poll_ms.max(100)),
        },
        jobs: nembo_agent::supervisor::NodeSetup {
            checkpoint_root: a.checkpoint_root,
            simulated: a.simulated,
            gpu_indices,
            container_engine: {
                let engine = nembo_agent::container::Engine::detect();
                tracing::info!(engine = ?engine, "container engine");
                engine
            },
        },
    };
    // A small agent: two worker threads are plenty for one session and a few jobs.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(cfg) => r.context("agent stopped"),
            // Jobs run in their own process groups and are left running:
            // a restarted agent re-adopts them.
            _ = term.recv() => { tracing::info!("SIGTERM: exiting, jobs keep running"); Ok(()) }
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}
