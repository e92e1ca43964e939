//! The agent protocol: one bidirectional session per agent.
//!
//! Each session is the single owner of what its agent is told. It watches
//! the applied state and sends `RunJob` for attempts placed on its node and
//! `StopJob` for ranks whose job has ended, each at most once per session;
//! the agent ignores repeats, so a reconnect never runs a job twice. Agent
//! reports become Raft commands; heartbeats only reset the liveness timer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use nembo_domain::health::{gpu_problem, GpuReading};
use nembo_domain::state::{Command, Job, JobState, NodeState, RankOutcome, State};
use nembo_domain::task::{MountSource, StorageMode};
use nembo_proto::agent::v1 as apb;
use nembo_proto::agent::v1::agent_service_server::AgentService;
use nembo_proto::agent::v1::session_request::Msg as AgentMsg;
use nembo_proto::agent::v1::session_response::Msg as CoordMsg;
use nembo_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::agents::enroll::AgentCaller;
use crate::context::Ctx;
use crate::logs::LogKey;
use crate::replication::raft::ClusterView;
use nembo_proto::clock::now_ms;

/// Serves agent sessions.
pub struct Agents {
    ctx: Arc<Ctx>,
}

impl Agents {
    /// The service over `ctx`.
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl AgentService for Agents {
    type SessionStream = ReceiverStream<Result<apb::SessionResponse, Status>>;
    type FetchBlobsStream = ReceiverStream<Result<apb::FetchBlobsResponse, Status>>;

    async fn fetch_blobs(
        &self,
        request: Request<apb::FetchBlobsRequest>,
    ) -> Result<Response<Self::FetchBlobsStream>, Status> {
        crate::agents::files::fetch_blobs(&self.ctx, request).await
    }

    async fn renew(
        &self,
        request: Request<apb::RenewRequest>,
    ) -> Result<Response<apb::RenewResponse>, Status> {
        crate::agents::enroll::renew(&self.ctx, request).await
    }

    async fn session(
        &self,
        request: Request<Streaming<apb::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let caller = request.extensions().get::<AgentCaller>().cloned();
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(apb::SessionRequest {
                msg: Some(AgentMsg::Hello(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("the first message must be hello")),
        };
        let view = self.ctx.raft.view();
        let node = view.state.nodes.get(&hello.node_id);
        match &caller {
            Some(AgentCaller::Node(n)) if *n == hello.node_id => {}
            Some(AgentCaller::Node(n)) => {
                return Err(Status::permission_denied(format!(
                    "this certificate is for node {n}, not {}",
                    hello.node_id
                )))
            }
            Some(AgentCaller::Simulated)
                if node.is_some_and(|n| {
                    self.ctx
                        .providers
                        .get(&n.provider)
                        .is_some_and(|p| p.records_only())
                }) => {}
            _ => {
                return Err(Status::permission_denied(format!(
                    "node {} must connect with its own certificate",
                    hello.node_id
                )))
            }
        }
        // A node on its way out takes no new session.
        crate::agents::enroll::agent_may_speak_for(
            &view.state,
            &hello.node_id,
            &[NodeState::Terminating],
        )?;
        // Agents talk to the leader only; tell this one where it is.
        self.ctx.require_leader()?;
        let (tx, rx) = mpsc::channel(256);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let node = hello.node_id.clone();
            if let Err(e) = run_session(ctx, hello, inbound, tx.clone()).await {
                tracing::info!(node = %node, error = %e, "agent session ended");
                // The agent learns why (a revoked node stops retrying).
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// This session as the route to its node's shells, withdrawn when the
/// session ends however it ends.
struct ShellRoute {
    ctx: Arc<Ctx>,
    node: String,
    outbox: crate::agents::shells::AgentOutbox,
}

impl ShellRoute {
    fn new(ctx: &Arc<Ctx>, node: &str, tx: &crate::agents::shells::AgentOutbox) -> Self {
        ctx.shells.agent_connected(node, tx.clone());
        Self {
            ctx: ctx.clone(),
            node: node.to_string(),
            outbox: tx.clone(),
        }
    }
}

impl Drop for ShellRoute {
    fn drop(&mut self) {
        self.ctx.shells.agent_gone(&self.node, &self.outbox);
    }
}

async fn run_session(
    ctx: Arc<Ctx>,
    hello: apb::Hello,
    mut inbound: Streaming<apb::SessionRequest>,
    tx: mpsc::Sender<Result<apb::SessionResponse, Status>>,
) -> Result<(), Status> {
    let node_id = hello.node_id.clone();
    ctx.heartbeat(&node_id);
    ctx.fleet
        .hello(&node_id, hello.gpus.clone(), hello.driver_version.clone())
        .await;
    let view = ctx.raft.view();
    let needs_up = view.state.nodes.get(&node_id).is_some_and(|n| {
        n.state != NodeState::Ready
            || n.address != hello.address
            || n.public_address != hello.public_address
    });
    if needs_up {
        ctx.propose_quietly(Command::NodeUp {
            node_id: node_id.clone(),
            address: hello.address.clone(),
            public_address: hello.public_address.clone(),
            at_ms: now_ms(),
        })
        .await;
    }
    for report in &hello.jobs {
        handle_report(&ctx, &node_id, report).await;
    }
    let view = ctx.raft.view();
    let welcome = apb::Welcome {
        node_id: node_id.clone(),
        heartbeat_interval_ms: ctx.heartbeat_ms,
        log_offsets: log_offsets(&ctx, &view.state, &node_id),
        term: view.term,
        contact_lease_ms: ctx.contact_lease_ms,
    };
    send(&tx, CoordMsg::Welcome(welcome)).await?;
    tracing::info!(node = %node_id, jobs = hello.jobs.len(), "agent session open");
    // An attempt that resurfaces (a node back from a partition, after its
    // ranks were declared lost and the job moved on) is killed at once:
    // never two attempts of a job running.
    for r in &hello.jobs {
        if r.phase != apb::JobPhase::Started as i32 {
            continue;
        }
        let stale = r
            .job_id
            .parse::<u64>()
            .ok()
            .and_then(|id| view.state.jobs.get(&id))
            .is_none_or(|job| {
                job.attempts
                    .iter()
                    .find(|a| a.number == r.attempt)
                    .and_then(|a| a.ranks.get(r.rank as usize))
                    .is_none_or(|rank| rank.outcome.is_some())
            });
        if stale {
            tracing::warn!(node = %node_id, job = %r.job_id, attempt = r.attempt, "stopping an attempt that resurfaced after it was given up");
            send(
                &tx,
                CoordMsg::StopJob(apb::StopJob {
                    job_id: r.job_id.clone(),
                    attempt: r.attempt,
                    grace_ms: 0,
                    term: view.term,
                }),
            )
            .await?;
        }
    }

    // Shell sessions reach this node through this session while it lasts.
    let _route = ShellRoute::new(&ctx, &node_id, &tx);
    let mut views = ctx.raft.subscribe();
    // Per GPU: XIDs already accounted for.
    let mut xids_seen: HashMap<u32, u64> = HashMap::new();
    let mut sent_run: HashSet<(u64, u32)> = HashSet::new();
    let mut sent_stop: HashSet<(u64, u32)> = HashSet::new();
    dispatch(&ctx, &view, &node_id, &tx, &mut sent_run, &mut sent_stop).await?;
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let Some(msg) = msg? else { return Ok(()) };
                match msg.msg {
                    Some(AgentMsg::Heartbeat(hb)) => {
                        ctx.heartbeat(&node_id);
                        // The agent's contact lease runs from this answer.
                        send(&tx, CoordMsg::HeartbeatAck(apb::HeartbeatAck { seq: hb.seq })).await?;
                        ctx.heartbeat_delay.observe_ms(now_ms() - hb.sent_at_unix_ms);
                        check_gpu_health(&ctx, &node_id, &hb.gpus, &mut xids_seen).await;
                        ctx.fleet.readings(&node_id, hb.gpus, now_ms());
                    }
                    Some(AgentMsg::JobReport(r)) => {
                        ctx.heartbeat(&node_id);
                        handle_report(&ctx, &node_id, &r).await;
                    }
                    Some(AgentMsg::Log(l)) => {
                        let Ok(job) = l.job_id.parse() else { continue };
                        let key = LogKey { job, attempt: l.attempt, rank: l.rank };
                        if let Err(e) = ctx.logs.append(key, l.offset, &l.data) {
                            // The agent sends on from its own offset: a chunk
                            // lost here (no file could be opened, say) would
                            // turn every later one into a gap. A new session
                            // tells it where this member's copy ends.
                            tracing::warn!(node = %node_id, error = %e, "log chunk refused; ending the session to resync");
                            return Err(Status::unavailable(format!(
                                "log chunk refused ({e}); reconnect to resume from the coordinator's offsets"
                            )));
                        }
                    }
                    Some(AgentMsg::Preemption(p)) => {
                        ctx.heartbeat(&node_id);
                        handle_notice(&ctx, &node_id, &p).await;
                    }
                    Some(AgentMsg::ShellOutput(out)) => ctx.shells.deliver(out).await,
                    Some(AgentMsg::Hello(_)) | None => {
                        return Err(Status::invalid_argument("unexpected message"));
                    }
                }
            }
            changed = views.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let view = views.borrow_and_update().clone();
                if !view.is_leader() {
                    return Err(Status::unavailable("leadership lost"));
                }
                if view.state.nodes.get(&node_id).is_some_and(|n| n.revoked_at_ms.is_some()) {
                    ctx.fleet.forget(&node_id).await;
                    return Err(Status::permission_denied(format!("node {node_id} is revoked")));
                }
                let node_gone = view.state.nodes.get(&node_id).is_none_or(|n| n.state.is_final());
                if node_gone {
                    ctx.fleet.forget(&node_id).await;
                    return Ok(());
                }
                dispatch(&ctx, &view, &node_id, &tx, &mut sent_run, &mut sent_stop).await?;
                // Every session wakes on every commit; with thousands of
                // agents, looking once per short window instead keeps the
                // leader's CPU for Raft while a fleet comes up.
                tokio::time::sleep(SESSION_COALESCE).await;
            }
        }
    }
}

/// Marks the node unhealthy (a Raft write, so every member and every later
/// leader knows) when a reading shows a critical XID, uncorrectable ECC
/// errors or a GPU off the bus.
async fn check_gpu_health(
    ctx: &Ctx,
    node_id: &str,
    gpus: &[pb::GpuTelemetry],
    xids_seen: &mut HashMap<u32, u64>,
) {
    for g in gpus {
        let reading = GpuReading {
            index: g.index,
            xid_count: g.xid_count,
            last_xid: g.last_xid,
            ecc_uncorrected: g.ecc_uncorrected,
            lost: g.lost,
            retired_pages_pending: g.retired_pages_pending.unwrap_or(false),
        };
        let seen = xids_seen.insert(g.index, g.xid_count).unwrap_or(0);
        let Some(reason) = gpu_problem(&reading, seen) else {
            continue;
        };
        let healthy = ctx
            .raft
            .view()
            .state
            .nodes
            .get(node_id)
            .is_some_and(|n| n.unhealthy.is_none());
        if healthy {
            tracing::warn!(node = %node_id, %reason, "node unhealthy");
            ctx.propose_quietly(Command::NodeUnhealthy {
                node_id: node_id.to_string(),
                reason,
                at_ms: now_ms(),
            })
            .await;
        }
    }
}

async fn send(
    tx: &mpsc::Sender<Result<apb::SessionResponse, Status>>,
    msg: CoordMsg,
) -> Result<(), Status> {
    tx.send(Ok(apb::SessionResponse { msg: Some(msg) }))
        .await
        .map_err(|_| Status::cancelled("agent went away"))
}

fn log_offsets(ctx: &Ctx, state: &State, node_id: &str) -> Vec<apb::LogOffset> {
    let mut out = Vec::new();
    for job in state.jobs.values() {
        for a in &job.attempts {
            for (rank, n) in a.node_ids.iter().enumerate() {
                if n == node_id {
                    let key = LogKey {
                        job: job.id,
                        attempt: a.number,
                        rank: rank as u32,
                    };
                    out.push(apb::LogOffset {
                        job_id: job.id.to_string(),
                        attempt: a.number,
                        rank: rank as u32,
                        offset: ctx.logs.size(key),
                    });
                }
            }
        }
    }
    out
}

/// A session looks at the state at most once per this window.
const SESSION_COALESCE: std::time::Duration = std::time::Duration::from_millis(5);

/// Tells the agent what the state says it should run or stop.
async fn dispatch(
    ctx: &Ctx,
    view: &ClusterView,
    node_id: &str,
    tx: &mpsc::Sender<Result<apb::SessionResponse, Status>>,
    sent_run: &mut HashSet<(u64, u32)>,
    sent_stop: &mut HashSet<(u64, u32)>,
) -> Result<(), Status> {
    let ranks = ctx.ranks_by_node(&view.state);
    for &(job_id, rank) in ranks.get(node_id).map(Vec::as_slice).unwrap_or_default() {
        let Some(job) = view.state.jobs.get(&job_id) else {
            continue;
        };
        let Some(a) = job.current_attempt() else {
            continue;
        };
        let r = &a.ranks[rank];
        if r.outcome.is_some() {
            continue;
        }
        let key = (job.id, a.number);
        // The job is over, or this attempt is (a managed job recovering):
        // its ranks still running must stop.
        if job.state.is_terminal() || a.state.is_terminal() {
            if sent_stop.insert(key) {
                send(
                    tx,
                    CoordMsg::StopJob(apb::StopJob {
                        job_id: job.id.to_string(),
                        attempt: a.number,
                        grace_ms: ctx.stop_grace_ms,
                        term: view.term,
                    }),
                )
                .await?;
            }
        } else if !r.started
            && matches!(job.state, JobState::Starting | JobState::Running)
            && sent_run.insert(key)
        {
            send(
                tx,
                CoordMsg::RunJob(run_job(&view.state, job, rank, view.term, &ctx.secrets)),
            )
            .await?;
        }
    }
    Ok(())
}

/// The `RunJob` for one rank: the task plus every variable SkyPilot scripts expect.
fn run_job(
    state: &State,
    job: &Job,
    rank: usize,
    term: u64,
    secrets: &crate::identity::sealed::SecretBox,
) -> apb::RunJob {
    let a = job
        .current_attempt()
        .expect("dispatch checks for an attempt");
    let ips: Vec<String> = a
        .node_ids
        .iter()
        .map(|n| {
            state
                .nodes
                .get(n)
                .map(|n| n.address.clone())
                .unwrap_or_default()
        })
        .collect();
    let gpu_count = job.spec.gpus_per_node(a.candidate);
    let gpus = gpu_count.to_string();
    let num_nodes = a.node_ids.len().to_string();
    let node = state.nodes.get(&a.node_ids[rank]);
    let cluster = "nembo";
    let task_id = format!("sky-{}_{cluster}_{}", job.submitted_at_ms, job.id);
    let cluster_info = serde_json::json!({
        "cluster_name": cluster,
        "cloud": node.map(|n| n.provider.clone()).unwrap_or_default(),
        "region": node.map(|n| n.region.clone()).unwrap_or_default(),
        "zone": serde_json::Value::Null,
    })
    .to_string();
    let mut env: BTreeMap<String, String> = job.spec.envs.clone();
    for (name, sealed) in &job.spec.secrets {
        match secrets.open(name, sealed) {
            Ok(value) => {
                env.insert(name.clone(), value);
            }
            // Never the value: only that it could not be opened.
            Err(e) => tracing::error!(job = job.id, secret = %name, error = %e, "secret left out"),
        }
    }
    let node_ips = ips.join("\n");
    for (k, v) in [
        ("NEMBO_JOB_ID", job.id.to_string()),
        ("NEMBO_NODE_RANK", rank.to_string()),
        ("NEMBO_NUM_NODES", num_nodes.clone()),
        ("NEMBO_NODE_IPS", node_ips.clone()),
        ("NEMBO_ATTEMPT", a.number.to_string()),
        ("NEMBO_NUM_GPUS_PER_NODE", gpus.clone()),
        ("SKYPILOT_NODE_RANK", rank.to_string()),
        ("SKYPILOT_NODE_IPS", node_ips.clone()),
        ("SKYPILOT_NUM_NODES", num_nodes.clone()),
        ("SKYPILOT_NUM_GPUS_PER_NODE", gpus.clone()),
        ("SKYPILOT_SETUP_NODE_RANK", rank.to_string()),
        ("SKYPILOT_SETUP_NODE_IPS", node_ips),
        ("SKYPILOT_SETUP_NUM_GPUS_PER_NODE", gpus),
        ("SKYPILOT_TASK_ID", task_id),
        ("SKYPILOT_CLUSTER_INFO", cluster_info),
        ("SKYPILOT_USER", "nembo".to_string()),
    ] {
        env.insert(k.to_string(), v);
    }
    if let (Some(tag), Some(svc), Some(node)) = (&job.spec.replica, &job.spec.service, node) {
        let port = nembo_domain::serve::replica_port(&node.address, svc.port, tag.shared_host_port);
        env.insert("NEMBO_SERVICE_PORT".into(), port.to_string());
        env.insert(
            "SKYPILOT_SERVE_REPLICA_ID".into(),
            tag.replica_id.to_string(),
        );
        env.insert("NEMBO_SERVICE".into(), tag.service.clone());
    }
    apb::RunJob {
        job_id: job.id.to_string(),
        attempt: a.number,
        rank: rank as u32,
        num_nodes: a.node_ids.len() as u32,
        node_ips: ips,
        name: job.name().to_string(),
        setup: job.spec.setup.clone().unwrap_or_default(),
        run: job.spec.run.clone().unwrap_or_default(),
        // An uploaded workdir is fetched; only a local one is copied by path.
        workdir: match &job.spec.workdir_manifest {
            Some(_) => String::new(),
            None => job.spec.workdir.clone().unwrap_or_default(),
        },
        term,
        checkpoint: job.spec.checkpoint.as_ref().map(|c| apb::CheckpointSpec {
            store: c.store.clone(),
            path: c.path.clone(),
            interval_s: c.interval_s,
            signal: c.signal.clone(),
        }),
        gpus: gpu_count,
        file_mounts: job
            .spec
            .file_mounts
            .iter()
            .map(|(dst, src)| file_mount(dst, src))
            .collect(),
        workdir_manifest: job.spec.workdir_manifest.clone().unwrap_or_default(),
        replaced_if_lost: job.managed.is_some(),
        container_image: job
            .spec
            .container_image(a.candidate, &env)
            .unwrap_or_default(),
        container_run_options: job.spec.docker_run_options.clone(),
        workdir_git_url: job
            .spec
            .workdir_git
            .as_ref()
            .map(|g| g.url.clone())
            .unwrap_or_default(),
        workdir_git_ref: job
            .spec
            .workdir_git
            .as_ref()
            .and_then(|g| g.git_ref.clone())
            .unwrap_or_default(),
        env,
    }
}

fn file_mount(dst: &str, src: &MountSource) -> apb::FileMount {
    let manifest =
        |m: Option<&str>| apb::file_mount::Source::Manifest(m.unwrap_or_default().into());
    let mut out = apb::FileMount {
        destination: dst.to_string(),
        ..Default::default()
    };
    match src {
        MountSource::Local { manifest: m, .. } => out.source = Some(manifest(m.as_deref())),
        MountSource::Uri(uri) => out.source = Some(apb::file_mount::Source::Uri(uri.clone())),
        MountSource::Storage(st) => {
            out.source = st.local.as_ref().map(|(_, m)| manifest(m.as_deref()));
            out.bucket = st.bucket.clone();
            out.create_bucket = st.create;
            out.read_only = st.read_only;
            out.rclone_options = st.rclone.clone().into_iter().collect();
            out.delete_at_end = st.ephemeral;
            out.set_mode(match st.mode {
                StorageMode::Mount => apb::StorageMode::Mount,
                StorageMode::MountCached => apb::StorageMode::MountCached,
                StorageMode::Copy => apb::StorageMode::Copy,
            });
        }
    }
    out
}

/// A node's cloud announced it is taking the node back. An advisory one
/// (AWS rebalance) is only logged: the agent checkpoints on it.
async fn handle_notice(ctx: &Ctx, node_id: &str, p: &apb::PreemptionNotice) {
    tracing::warn!(node = node_id, kind = %p.kind, deadline = p.deadline_unix_ms, advisory = p.advisory, "preemption notice");
    if p.advisory {
        return;
    }
    let now = now_ms();
    // No deadline given: assume the shortest warning a cloud gives (GCP spot, 30 s).
    let deadline_ms = if p.deadline_unix_ms > 0 {
        p.deadline_unix_ms
    } else {
        now + 30_000
    };
    ctx.propose_quietly(Command::NodePreempted {
        node_id: node_id.to_string(),
        kind: p.kind.chars().take(64).collect(),
        deadline_ms,
        at_ms: now,
    })
    .await;
}

/// Turns an agent's report into Raft commands. Reports are idempotent:
/// applying one twice changes nothing the second time.
async fn handle_report(ctx: &Ctx, node_id: &str, r: &apb::JobReport) {
    let Ok(job_id) = r.job_id.parse::<u64>() else {
        return;
    };
    let view = ctx.raft.view();
    let Some(job) = view.state.jobs.get(&job_id) else {
        return;
    };
    let Some(a) = job.attempts.iter().find(|a| a.number == r.attempt) else {
        return;
    };
    // A node holds at most one rank of an attempt, and may only report on it.
    let Some(rank) = a.node_ids.iter().position(|n| n == node_id) else {
        tracing::warn!(node = %node_id, job = job_id, "report for a job this node does not hold");
        return;
    };
    let rank = rank as u32;
    let phase = apb::JobPhase::try_from(r.phase).unwrap_or(apb::JobPhase::Unspecified);
    let code = r.exit_code.unwrap_or(-1);
    let outcome = match phase {
        apb::JobPhase::Started => None,
        apb::JobPhase::Exited => Some(RankOutcome::Exited(code)),
        // No exit code: the setup never ran, its files could not be put in place.
        apb::JobPhase::SetupFailed if r.exit_code.is_none() => {
            Some(RankOutcome::DataInFailed(r.message.clone()))
        }
        apb::JobPhase::SetupFailed => Some(RankOutcome::SetupFailed(code)),
        apb::JobPhase::FailedToStart => Some(RankOutcome::FailedToStart(r.message.clone())),
        apb::JobPhase::Cancelled => Some(RankOutcome::Cancelled),
        apb::JobPhase::Lost => Some(RankOutcome::Lost(r.message.clone())),
        apb::JobPhase::Unspecified => return,
    };
    let at_ms = if r.at_unix_ms > 0 {
        r.at_unix_ms
    } else {
        now_ms()
    };
    let rank_state = &a.ranks[rank as usize];
    let ran = !matches!(phase, apb::JobPhase::FailedToStart | apb::JobPhase::Lost);
    if ran && !rank_state.started {
        ctx.propose_quietly(Command::RankStarted {
            job_id,
            attempt: r.attempt,
            rank,
            at_ms,
        })
        .await;
    }
    if let Some(outcome) = outcome {
        ctx.logs.set_final(
            LogKey {
                job: job_id,
                attempt: r.attempt,
                rank,
            },
            r.log_bytes,
        );
        if rank_state.outcome.is_none() {
            ctx.propose_quietly(Command::RankEnded {
                job_id,
                attempt: r.attempt,
                rank,
                outcome,
                at_ms,
            })
            .await;
        }
    }
}
