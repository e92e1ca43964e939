//! `nembo`: the command-line interface.

mod admin;
mod catalog;
mod clusters;
mod connect;
mod demo;
mod demo_serve;
mod gpus;
mod jobs;
mod local;
mod overrides;
mod serve;
mod ssh;
mod status;
mod table;
mod upload;

use std::collections::BTreeMap;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Run AI jobs on GPUs anywhere with one command.
#[derive(Parser, Debug)]
#[command(name = "nembo", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// `nembo catalog …`.
#[derive(Subcommand, Debug)]
enum CatalogCmd {
    /// Rebuild a provider's catalog from its API (seeweb: GET /plans); the
    /// coordinators use it from their next start.
    Refresh {
        /// Provider (`seeweb`).
        provider: String,
        /// Also write the CSV here (e.g. catalog/seeweb.csv in a checkout).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

/// `nembo jobs …`: managed jobs, recovered across preemptions and failures.
#[derive(Subcommand, Debug)]
enum JobsCmd {
    /// Launch a managed job: the coordinators move it to new nodes when its
    /// nodes are preempted (per `resources.job_recovery`), resuming from its
    /// checkpoint.
    Launch(Box<jobs::LaunchArgs>),
    /// Managed jobs: state, attempts, recoveries, latest event.
    Queue {
        /// Machine-readable output (with each job's events).
        #[arg(long)]
        json: bool,
    },
    /// A managed job's output, across all its attempts.
    Logs {
        /// Job id.
        job: String,
        /// Keep following until the job ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Cancel managed jobs.
    Cancel {
        /// Job ids.
        #[arg(required = true)]
        jobs: Vec<String>,
    },
}

/// `nembo demo …`.
#[derive(Subcommand, Debug)]
enum DemoCmd {
    /// Spot failover: 3 coordinators, two local clouds, a managed training
    /// job, a preemption notice; prints the timeline and checks no step
    /// before the last checkpoint was lost.
    Failover,
    /// Serving: 3 coordinators with a load balancer each, a service on
    /// simulated spot nodes, load that scales it up, a preemption notice
    /// and a rolling update; counts failed requests and checks them.
    Serve,
}

/// `nembo exec NAME TASK`.
#[derive(clap::Args, Debug)]
struct ExecArgs {
    /// The cluster (it must exist and be up).
    #[arg(value_name = "CLUSTER")]
    target: String,
    #[command(flatten)]
    launch: jobs::LaunchArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Launch a task (SkyPilot YAML) on a cluster (`-c NAME`: created, or
    /// reused if it exists); streams its output and exits with its exit code.
    Launch(Box<jobs::LaunchArgs>),
    /// Run a task or a command on an existing cluster, skipping `setup`
    /// (`sky exec`); `workdir` and file mounts are synced first.
    Exec(Box<ExecArgs>),
    /// Stop clusters: their machines stop, disks kept, billing paused;
    /// running jobs are cancelled.
    Stop {
        /// Cluster names.
        #[arg(required = true)]
        clusters: Vec<String>,
        /// Do not ask for confirmation.
        #[arg(short, long)]
        yes: bool,
    },
    /// A shell on a cluster's node (`-- COMMAND` runs one command), over
    /// the node agent's own session: no inbound port, no keys. For ssh,
    /// scp and VS Code, `--proxy` is a ProxyCommand (see README).
    Ssh {
        /// The cluster.
        cluster: String,
        /// Which node (0: the head).
        #[arg(long, default_value_t = 0)]
        node: u32,
        /// Carry the bytes of a TCP connection to this port on the node
        /// (22 when given alone), for ssh's ProxyCommand.
        #[arg(long, num_args = 0..=1, default_missing_value = "22", value_name = "PORT")]
        proxy: Option<u16>,
        /// A terminal even for a command (ssh -t).
        #[arg(short = 't')]
        tty: bool,
        /// The command, after `--`.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Start stopped clusters again; their job queue resumes.
    Start {
        /// Cluster names.
        #[arg(required = true)]
        clusters: Vec<String>,
        /// Autostop after this many idle minutes (or 90s, 2h).
        #[arg(short = 'i', long = "idle-minutes-to-autostop")]
        idle: Option<String>,
        /// Tear down rather than stop when idle (needs -i).
        #[arg(long, requires = "idle")]
        down: bool,
    },
    /// Stop (or tear down) clusters once idle for a while.
    Autostop {
        /// Cluster names.
        #[arg(required = true)]
        clusters: Vec<String>,
        /// Idle minutes (default 5), or a window: 90s, 2h.
        #[arg(short = 'i', long = "idle-minutes", conflicts_with = "cancel")]
        idle: Option<String>,
        /// Tear down rather than stop.
        #[arg(long, conflicts_with = "cancel")]
        down: bool,
        /// What keeps a cluster from being idle.
        #[arg(long, value_parser = ["jobs_and_ssh", "jobs", "none"], conflicts_with = "cancel")]
        wait_for: Option<String>,
        /// Cancel autostop.
        #[arg(long)]
        cancel: bool,
    },
    /// Services: replicas behind a load balancer on every coordinator,
    /// with readiness probes, autoscaling and rolling updates (`sky serve`).
    Serve {
        #[command(subcommand)]
        command: Box<serve::ServeCmd>,
    },
    /// Managed jobs.
    Jobs {
        #[command(subcommand)]
        command: JobsCmd,
    },
    /// Demonstrations that run on this machine.
    Demo {
        #[command(subcommand)]
        command: DemoCmd,
    },
    /// Clusters, nodes and jobs; `status NAME...`: those clusters.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Answer from whichever coordinator responds, possibly slightly
        /// behind, instead of a linearizable read through the leader.
        #[arg(long)]
        stale: bool,
        /// Print `PORT: HOST:PORT` for every port the job (or the
        /// cluster's newest job) opens (`sky status --endpoints`).
        #[arg(long, requires = "names")]
        endpoints: bool,
        /// Print `HOST:PORT` for this one port of the job.
        #[arg(
            long,
            value_name = "PORT",
            requires = "names",
            conflicts_with = "endpoints"
        )]
        endpoint: Option<u16>,
        /// Clusters to show; with --endpoints or --endpoint, one job id or cluster.
        names: Vec<String>,
        /// Also ask each node's provider what it holds for it (the
        /// coordinators' own view is kept current by the agents' sessions).
        #[arg(long)]
        refresh: bool,
    },
    /// Every GPU in the fleet: utilisation, memory, temperature, power, job.
    Gpus {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Redraw every second until interrupted.
        #[arg(long)]
        watch: bool,
        /// Only this node's GPUs.
        #[arg(long)]
        node: Option<String>,
        /// Only this model (`H100`).
        #[arg(long)]
        model: Option<String>,
    },
    /// GPU offerings and prices across enabled providers, cheapest first.
    ShowGpus {
        /// `H100` or `H100:8`.
        accelerator: Option<String>,
        /// Only this provider.
        #[arg(long)]
        cloud: Option<String>,
        /// Spot offerings, priced and sorted by the spot price.
        #[arg(long)]
        spot: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Whether each provider's credentials work, and why not.
    Check {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Provider catalogs.
    Catalog {
        #[command(subcommand)]
        command: CatalogCmd,
    },
    /// What each node and job has cost so far (catalog price x run time).
    CostReport {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The job queue (of one cluster, if named).
    Queue {
        /// The cluster.
        cluster: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// See `status --stale`.
        #[arg(long)]
        stale: bool,
    },
    /// A job's output.
    Logs {
        /// Job id.
        job: String,
        /// Keep streaming until the job ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Cancel jobs: `cancel NAME JOB...`, `cancel NAME -a`, or `cancel JOB...`.
    Cancel {
        /// A cluster then job ids, or job ids alone.
        #[arg(required = true)]
        args: Vec<String>,
        /// Every unfinished job of the cluster.
        #[arg(short, long)]
        all: bool,
    },
    /// Tear down clusters (or release `node-N` nodes); their jobs are cancelled.
    Down {
        /// Cluster names or node ids.
        #[arg(required_unless_present = "all")]
        names: Vec<String>,
        /// Every cluster (and, for an admin, every node).
        #[arg(short, long, conflicts_with = "names")]
        all: bool,
        /// Do not ask for confirmation.
        #[arg(short, long)]
        yes: bool,
    },
    /// How to reach the API.
    Api {
        #[command(subcommand)]
        command: ApiCmd,
    },
    /// The local coordinator under ~/.nembo.
    Local {
        #[command(subcommand)]
        command: LocalCmd,
    },
    /// The user the token in use belongs to, and its role.
    Whoami,
    /// Cluster administration.
    Admin {
        #[command(subcommand)]
        command: AdminCmd,
    },
}

#[derive(Subcommand, Debug)]
enum AdminCmd {
    /// Coordinator membership.
    Members {
        #[command(subcommand)]
        command: MembersCmd,
    },
    /// API users and their roles (admin, user, viewer).
    Users {
        #[command(subcommand)]
        command: UsersCmd,
    },
    /// One-time join tokens that let a machine's agent enroll.
    Tokens {
        #[command(subcommand)]
        command: TokensCmd,
    },
    /// Nodes.
    Nodes {
        #[command(subcommand)]
        command: NodesCmd,
    },
    /// Every call that changed something or was refused, newest last.
    Audit {
        /// How many records.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum UsersCmd {
    /// Create a user; its token is printed once, on stdout.
    Create {
        /// Name (owns the jobs it submits).
        name: String,
        /// viewer (reads status and metrics), user (runs and manages its
        /// own jobs) or admin (everything).
        #[arg(long, default_value = "user", value_parser = ["viewer", "user", "admin"])]
        role: String,
    },
    /// List users.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a user's token (create the user again for a new one).
    Revoke {
        /// Name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum TokensCmd {
    /// Create a join token; it is printed once, on stdout.
    Create {
        /// How long it may be used (30m, 1h, 3600).
        #[arg(long, default_value = "1h", value_parser = parse_duration_ms)]
        ttl: u32,
        /// How many agents may enroll with it (at least 1).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
        /// Re-enroll this existing node (its agent was down past its
        /// certificate's end; run it with --node-id NODE). Without it, the
        /// token makes new nodes only.
        #[arg(long)]
        node: Option<String>,
    },
    /// List join tokens with their uses left and the nodes they enrolled.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a join token.
    Revoke {
        /// Token id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum NodesCmd {
    /// Cut a node off: its session ends, its certificate is refused and
    /// cannot be renewed, its jobs' ranks are lost (managed jobs recover
    /// elsewhere) and it is terminated.
    Revoke {
        /// Node id.
        node: String,
    },
}

#[derive(Subcommand, Debug)]
enum MembersCmd {
    /// Members, their roles and the Raft position.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Add a member (started with `nembo-coordinator --join`): it joins as a
    /// learner, catches up, then becomes a voter.
    Add {
        /// New member id.
        id: u64,
        /// Its https:// URL.
        url: String,
    },
    /// Remove a member.
    Remove {
        /// Member id.
        id: u64,
    },
    /// Hand leadership to another voter (before maintenance).
    TransferLeader {
        /// Member id.
        id: u64,
    },
}

#[derive(Subcommand, Debug)]
enum ApiCmd {
    /// Endpoint, CA certificate and token paths.
    Info {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum LocalCmd {
    /// Start the local coordinator (if it is not running).
    Up {
        /// Run a cluster of this many coordinators (3 or 5 tolerate 1 or 2 failures).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=7))]
        coordinators: u64,
    },
    /// Release every local node and stop the local coordinator.
    Down,
    /// Whether the local coordinator runs, and its nodes.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Make a local or simulated node's metadata service announce its
    /// preemption, as a cloud would: its agent reads the notice.
    Preempt {
        /// Node id.
        node: String,
        /// The cloud's notice format.
        #[arg(long, default_value = "aws", value_parser = ["aws", "gcp", "azure"])]
        format: String,
        /// Warning before the node goes (30s, 2m, 1500ms).
        #[arg(long = "in", default_value = "30s", value_parser = parse_duration_ms)]
        in_ms: u32,
    },
}

/// `30s`, `2m`, `1h`, `1500ms`, `45` (seconds).
fn parse_duration_ms(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let (n, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s, 1000)
    };
    n.trim()
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|ms| *ms > 0)
        .ok_or_else(|| format!("'{s}' is not a duration like 30s, 2m or 1500ms"))
}

/// Parses `NAME=VALUE`.
pub(crate) fn parse_env_arg(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        // A bare name passes this shell's value, as SkyPilot's `--env NAME` does.
        None => std::env::var(s)
            .map(|v| (s.to_string(), v))
            .map_err(|_| format!("'{s}' is not NAME=VALUE, and {s} is not set here")),
    }
}

/// `--env` values, later ones winning.
pub fn env_map(v: &[(String, String)]) -> BTreeMap<String, String> {
    v.iter().cloned().collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("error: {} ({:?})", s.message(), s.code()),
                None => eprintln!("error: {e:#}"),
            }
            1
        }
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Cmd::Launch(a) => jobs::launch(*a, jobs::Mode::Launch).await,
        Cmd::Exec(a) => {
            let ExecArgs { target, mut launch } = *a;
            launch.set_cluster(target);
            jobs::launch(launch, jobs::Mode::Exec).await
        }
        Cmd::Stop { clusters, yes } => clusters::stop(&clusters, yes).await.map(|()| 0),
        Cmd::Start {
            clusters,
            idle,
            down,
        } => {
            clusters::start(&clusters).await?;
            if idle.is_some() {
                clusters::autostop(&clusters, idle, down, None, false).await?;
            }
            Ok(0)
        }
        Cmd::Ssh {
            cluster,
            node,
            proxy,
            tty,
            command,
        } => ssh::ssh(&cluster, node, proxy, tty, &command).await,
        Cmd::Autostop {
            clusters,
            idle,
            down,
            wait_for,
            cancel,
        } => clusters::autostop(&clusters, idle, down, wait_for, cancel)
            .await
            .map(|()| 0),
        Cmd::Demo {
            command: DemoCmd::Failover,
        } => demo::failover().await,
        Cmd::Demo {
            command: DemoCmd::Serve,
        } => demo_serve::serve().await,
        Cmd::Serve { command } => serve::run(*command).await,
        Cmd::Jobs { command } => match command {
            JobsCmd::Launch(a) => jobs::launch(*a, jobs::Mode::Managed).await,
            JobsCmd::Queue { json } => jobs::managed_queue(json).await.map(|()| 0),
            JobsCmd::Logs { job, follow } => jobs::logs(&job, follow).await.map(|()| 0),
            JobsCmd::Cancel { jobs } => jobs::cancel(&jobs).await.map(|()| 0),
        },
        Cmd::Status {
            names,
            endpoint,
            endpoints,
            ..
        } if endpoints || endpoint.is_some() => {
            let [name] = names.as_slice() else {
                anyhow::bail!("--endpoints takes one job id or cluster");
            };
            jobs::endpoints(name, endpoint).await.map(|()| 0)
        }
        Cmd::Status {
            json,
            stale,
            names,
            refresh,
            ..
        } => {
            let view = status::View {
                json,
                with_nodes: true,
                stale,
                refresh,
            };
            status::status(view, &names).await.map(|()| 0)
        }
        Cmd::Queue {
            cluster,
            json,
            stale,
        } => {
            let view = status::View {
                json,
                with_nodes: false,
                stale,
                refresh: false,
            };
            status::status(view, cluster.as_slice()).await.map(|()| 0)
        }
        Cmd::Gpus {
            json,
            watch,
            node,
            model,
        } => gpus::gpus(json, watch, node, model).await.map(|()| 0),
        Cmd::ShowGpus {
            accelerator,
            cloud,
            spot,
            json,
        } => catalog::show_gpus(accelerator, cloud, spot, json)
            .await
            .map(|()| 0),
        Cmd::Check { json } => catalog::check(json).await,
        Cmd::Catalog {
            command: CatalogCmd::Refresh { provider, out },
        } => catalog::refresh(&provider, out.as_deref())
            .await
            .map(|()| 0),
        Cmd::CostReport { json } => catalog::cost_report(json).await.map(|()| 0),
        Cmd::Logs { job, follow } => jobs::logs(&job, follow).await.map(|()| 0),
        Cmd::Cancel { args, all } => {
            // Cluster names start with a letter; job ids are numbers.
            let named = args
                .first()
                .is_some_and(|a| a.starts_with(|c: char| c.is_ascii_alphabetic()));
            if named {
                clusters::cancel(&args[0], &args[1..], all).await
            } else if all {
                anyhow::bail!("-a cancels a cluster's jobs: `nembo cancel NAME -a`")
            } else {
                jobs::cancel(&args).await
            }
            .map(|()| 0)
        }
        Cmd::Down { names, all, yes } => clusters::down(names, all, yes).await.map(|()| 0),
        Cmd::Api {
            command: ApiCmd::Info { json },
        } => local::api_info(json).await.map(|()| 0),
        Cmd::Admin {
            command: AdminCmd::Members { command },
        } => match command {
            MembersCmd::List { json } => local::members(None, json).await.map(|()| 0),
            MembersCmd::Add { id, url } => {
                local::members(Some(local::MemberOp::Add(id, url)), false)
                    .await
                    .map(|()| 0)
            }
            MembersCmd::Remove { id } => local::members(Some(local::MemberOp::Remove(id)), false)
                .await
                .map(|()| 0),
            MembersCmd::TransferLeader { id } => {
                local::members(Some(local::MemberOp::TransferLeader(id)), false)
                    .await
                    .map(|()| 0)
            }
        },
        Cmd::Admin {
            command: AdminCmd::Users { command },
        } => match command {
            UsersCmd::Create { name, role } => admin::user_create(&name, &role).await,
            UsersCmd::List { json } => admin::user_list(json).await,
            UsersCmd::Revoke { name } => admin::user_revoke(&name).await,
        }
        .map(|()| 0),
        Cmd::Admin {
            command: AdminCmd::Tokens { command },
        } => match command {
            TokensCmd::Create {
                ttl,
                uses,
                description,
                node,
            } => admin::token_create(ttl, uses, &description, node.as_deref()).await,
            TokensCmd::List { json } => admin::token_list(json).await,
            TokensCmd::Revoke { id } => admin::token_revoke(&id).await,
        }
        .map(|()| 0),
        Cmd::Admin {
            command:
                AdminCmd::Nodes {
                    command: NodesCmd::Revoke { node },
                },
        } => admin::node_revoke(&node).await.map(|()| 0),
        Cmd::Admin {
            command: AdminCmd::Audit { limit, json },
        } => admin::audit(limit, json).await.map(|()| 0),
        Cmd::Whoami => admin::whoami().await.map(|()| 0),
        Cmd::Local { command } => match command {
            LocalCmd::Up { coordinators } => local::up(coordinators).await.map(|()| 0),
            LocalCmd::Down => local::local_down().await.map(|()| 0),
            LocalCmd::Status { json } => local::local_status(json).await.map(|()| 0),
            LocalCmd::Preempt {
                node,
                format,
                in_ms,
            } => local::preempt(&node, &format, in_ms).await.map(|()| 0),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env_arg("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(parse_env_arg("nope").is_err());
    }
}
