//! Control loops. The scheduler and the provisioner run only on the leader:
//! they start on gaining leadership and are aborted on losing it. Liveness
//! runs everywhere (it must hear heartbeats to have timers to re-arm) but
//! acts only while leading.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use nembo_domain::scheduler::{plan, Policy};
use nembo_domain::state::{Command, LaunchFailure, Node, NodeState, State};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::context::Ctx;
use crate::provider::{LaunchRequest, ProviderError};
use nembo_proto::clock::now_ms;

/// The scheduler plans at most once per this window.
const SCHEDULE_COALESCE: Duration = Duration::from_millis(5);

/// How often the leader looks for nodes that turned unhealthy.
const HEALTH_CHECK: Duration = Duration::from_millis(100);

/// A node a GPU made unhealthy, as the hooks hear of it.
#[derive(Debug, Clone)]
pub struct NodeUnhealthy {
    pub node_id: String,
    pub reason: String,
    /// Jobs with a rank on it.
    pub job_ids: Vec<u64>,
}

/// Tunables of the control loops.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    /// Scheduler limits.
    pub policy: Policy,
    /// A node whose heartbeats stop this long is lost.
    pub node_ttl: Duration,
    /// A launched node whose agent has not enrolled by then failed.
    pub provision_timeout: Duration,
    /// How often the leader looks for instances no node wants (leaks).
    pub reconcile_every: Duration,
}

/// Runs the liveness owner and starts/stops the leader-only loops as
/// leadership comes and goes. Returns when the Raft member stops.
pub async fn supervise(ctx: Arc<Ctx>, cfg: LoopConfig, heartbeats: mpsc::Receiver<String>) {
    tokio::spawn(liveness(ctx.clone(), cfg, heartbeats));
    let mut views = ctx.raft.subscribe();
    let mut leader_loops: Option<JoinSet<()>> = None;
    loop {
        let leading = views.borrow_and_update().is_leader();
        if leading && leader_loops.is_none() {
            tracing::info!(
                term = ctx.raft.view().term,
                "gained leadership; starting control loops"
            );
            let mut set = JoinSet::new();
            set.spawn(scheduler(ctx.clone(), cfg.policy));
            set.spawn(provisioner(ctx.clone()));
            set.spawn(health_hooks(ctx.clone()));
            set.spawn(reconcile(ctx.clone(), cfg.reconcile_every));
            set.spawn(crate::serve::controller::run(ctx.clone()));
            leader_loops = Some(set);
        } else if !leading && leader_loops.is_some() {
            tracing::info!("lost leadership; stopping control loops");
            leader_loops = None; // dropping the JoinSet aborts them
        }
        if views.changed().await.is_err() {
            return;
        }
    }
}

/// Places pending jobs: proposes the pure planner's commands whenever the
/// state changes.
async fn scheduler(ctx: Arc<Ctx>, policy: Policy) {
    let mut views = ctx.raft.subscribe();
    let mut planned: Option<Arc<State>> = None;
    loop {
        let view = views.borrow_and_update().clone();
        if planned
            .as_ref()
            .is_none_or(|p| !Arc::ptr_eq(p, &view.state))
        {
            planned = Some(view.state.clone());
            for cmd in plan(&view.state, &ctx.offerings, policy, now_ms()) {
                ctx.propose_quietly(cmd).await;
            }
            // Under a stream of submissions the state changes every few
            // milliseconds; planning once per short window instead of once
            // per change keeps a long queue from costing O(queue) per commit.
            tokio::time::sleep(SCHEDULE_COALESCE).await;
        }
        // Time alone changes plans too: a preemption deadline passes, a
        // block expires for a waiting managed job.
        tokio::select! {
            changed = views.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(REPLAN_EVERY) => planned = None,
        }
    }
}

/// How often the scheduler plans again with no state change.
const REPLAN_EVERY: Duration = Duration::from_secs(1);

/// Calls providers for nodes the state wants launched or terminated. The
/// intent is already committed (ProvisionNodes / TerminateNodes); the result
/// is committed after the call.
async fn provisioner(ctx: Arc<Ctx>) {
    let mut views = ctx.raft.subscribe();
    let mut inflight: HashSet<String> = HashSet::new();
    // Nodes this leader has started: their agents come back on their own.
    let mut started: HashSet<String> = HashSet::new();
    let mut calls: JoinSet<String> = JoinSet::new();
    loop {
        let view = views.borrow_and_update().clone();
        started.retain(|id| {
            view.state
                .nodes
                .get(id)
                .is_some_and(|n| n.state == NodeState::Starting)
        });
        for node in view.state.nodes.values() {
            let wanted = match node.state {
                NodeState::Provisioning => node.instance_id.is_none(),
                NodeState::Terminating => true,
                // A VM stops once its jobs have let go of it.
                NodeState::Stopping => view.state.jobs_on(&node.id).is_empty(),
                NodeState::Starting => !started.contains(&node.id),
                _ => false,
            };
            if wanted && inflight.insert(node.id.clone()) {
                if node.state == NodeState::Starting {
                    started.insert(node.id.clone());
                }
                calls.spawn(provider_call(ctx.clone(), node.clone(), view.term));
            }
        }
        tokio::select! {
            changed = views.changed() => if changed.is_err() { return },
            Some(done) = calls.join_next() => {
                if let Ok(id) = done {
                    inflight.remove(&id);
                }
            }
        }
    }
}

async fn provider_call(ctx: Arc<Ctx>, node: Node, term: u64) -> String {
    if node.provider == nembo_domain::state::MANUAL_PROVIDER && node.state == NodeState::Terminating
    {
        // A machine that joined on its own: Nembo cannot stop it, only
        // forget it (its agent is retired when its session sees this).
        ctx.propose_quietly(Command::NodeTerminated {
            node_id: node.id.clone(),
            at_ms: now_ms(),
        })
        .await;
        return node.id;
    }
    let Some(provider) = ctx.providers.get(&node.provider).cloned() else {
        ctx.propose_quietly(Command::NodeLaunchFailed {
            node_id: node.id.clone(),
            message: format!("provider '{}' is not configured", node.provider),
            failure: LaunchFailure::Other,
            at_ms: now_ms(),
        })
        .await;
        return node.id;
    };
    let mut backoff = Duration::from_millis(200);
    let request = LaunchRequest {
        node_id: node.id.clone(),
        region: node.region.clone(),
        zone: node.zone.clone(),
        instance_type: node.instance_type.clone(),
        resources: node.resources.clone(),
        spot: node.spot,
        disk_gb: node.disk_gb.filter(|_| !node.fixed_machine),
        disk_tier: node.disk_tier,
        image_id: node.image_id.clone(),
        ports: node.opened_ports.clone().unwrap_or_default(),
        term,
    };
    for attempt in 1..=5 {
        let result = match node.state {
            NodeState::Terminating => provider
                .terminate(&node.id, term)
                .await
                .map(|()| String::new()),
            NodeState::Stopping => provider.stop(&node.id, term).await.map(|()| String::new()),
            NodeState::Starting => provider
                .start(request.clone())
                .await
                .map(|()| String::new()),
            _ => provider.launch(request.clone()).await,
        };
        let cmd = match (result, node.state) {
            (Ok(_), NodeState::Terminating) => Command::NodeTerminated {
                node_id: node.id.clone(),
                at_ms: now_ms(),
            },
            (Ok(_), NodeState::Stopping) => Command::NodeStopped {
                node_id: node.id.clone(),
                at_ms: now_ms(),
            },
            // Its agent's session brings it back (NodeUp).
            (Ok(_), NodeState::Starting) => return node.id,
            (Ok(instance_id), _) => Command::NodeLaunched {
                node_id: node.id.clone(),
                instance_id,
                at_ms: now_ms(),
            },
            (Err(ProviderError::Transient(e)), _) if attempt < 5 => {
                tracing::warn!(node = %node.id, error = %e, attempt, "provider call failed; retrying");
                tokio::time::sleep(backoff + nembo_proto::client::jitter(backoff / 2)).await;
                backoff *= 2;
                continue;
            }
            (Err(ProviderError::Fenced(e)), _) => {
                // A newer leader owns this node now; leave it to that one.
                tracing::warn!(node = %node.id, error = %e, "provider call fenced off");
                return node.id;
            }
            (Err(e), NodeState::Terminating | NodeState::Stopping | NodeState::Starting) => {
                tracing::error!(node = %node.id, state = ?node.state, error = %e, "provider call failed");
                return node.id;
            }
            (Err(e), _) => {
                tracing::warn!(node = %node.id, provider = %node.provider, region = %node.region, instance_type = %node.instance_type, error = %e, "launch failed");
                Command::NodeLaunchFailed {
                    node_id: node.id.clone(),
                    message: e.to_string(),
                    failure: e.launch_failure(),
                    at_ms: now_ms(),
                }
            }
        };
        ctx.propose_quietly(cmd).await;
        break;
    }
    node.id
}

/// Finds instances that no live node wants, and terminates them: what a
/// deposed or crashed leader launched after its node was given up (a launch
/// that outlived its timeout, a node failed while its call was in flight).
/// An instance is a leak only when seen twice in a row, a full period
/// apart, so a launch racing its own record is never mistaken for one.
async fn reconcile(ctx: Arc<Ctx>, every: Duration) {
    let mut suspects: HashSet<(String, String)> = HashSet::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut now_suspect = HashSet::new();
        for (name, provider) in &ctx.providers {
            let owned = match provider.list_owned().await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(provider = %name, error = %e, "cannot list instances");
                    continue;
                }
            };
            let view = ctx.raft.view();
            for inst in owned.into_iter().filter(|i| i.live) {
                let wanted = view
                    .state
                    .nodes
                    .get(&inst.node_id)
                    .is_some_and(|n| n.provider == *name && !n.state.is_final());
                if wanted {
                    continue;
                }
                let key = (name.clone(), inst.node_id.clone());
                if suspects.contains(&key) {
                    tracing::warn!(provider = %name, node = %inst.node_id, instance = %inst.instance_id, "terminating an instance no node wants");
                    if let Err(e) = provider.terminate(&inst.node_id, view.term).await {
                        tracing::warn!(node = %inst.node_id, error = %e, "could not terminate leaked instance");
                        now_suspect.insert(key);
                    }
                } else {
                    now_suspect.insert(key);
                }
            }
        }
        suspects = now_suspect;
    }
}

/// Heartbeat timers, Nomad-style: a heartbeat only resets an in-memory
/// deadline; a Raft write happens only when a deadline passes.
async fn liveness(ctx: Arc<Ctx>, cfg: LoopConfig, mut heartbeats: mpsc::Receiver<String>) {
    let ttl = cfg.node_ttl;
    let mut deadlines: HashMap<String, Instant> = HashMap::new();
    let mut leading = false;
    let mut tick =
        tokio::time::interval((ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)));
    loop {
        tokio::select! {
            hb = heartbeats.recv() => {
                let Some(node) = hb else { return };
                deadlines.insert(node, Instant::now() + ttl);
            }
            _ = tick.tick() => {
                let view = ctx.raft.view();
                if !view.is_leader() {
                    leading = false;
                    continue;
                }
                let now = Instant::now();
                if !leading {
                    // A new leader gives every node a full TTL before judging it.
                    for d in deadlines.values_mut() {
                        *d = (*d).max(now + ttl);
                    }
                    leading = true;
                }
                for node in view.state.nodes.values() {
                    match node.state {
                        NodeState::Ready => {
                            let d = *deadlines.entry(node.id.clone()).or_insert(now + ttl);
                            if d <= now {
                                deadlines.remove(&node.id);
                                ctx.propose_quietly(Command::NodeLost {
                                    node_id: node.id.clone(),
                                    message: format!("no heartbeat for {:.1}s", ttl.as_secs_f64()),
                                    at_ms: now_ms(),
                                })
                                .await;
                            }
                        }
                        NodeState::Provisioning if node.instance_id.is_some() => {
                            let age = now_ms() - node.created_at_ms;
                            if age > cfg.provision_timeout.as_millis() as i64 {
                                ctx.propose_quietly(Command::NodeLaunchFailed {
                                    failure: LaunchFailure::Other,
                                    node_id: node.id.clone(),
                                    message: format!(
                                        "agent did not enroll within {}s",
                                        cfg.provision_timeout.as_secs()
                                    ),
                                    at_ms: now_ms(),
                                })
                                .await;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Tells the operator's `--on-unhealthy` command about every node that turns unhealthy while
/// this member leads. Nodes already unhealthy when leadership was gained
/// were announced by the leader that saw them turn.
async fn health_hooks(ctx: Arc<Ctx>) {
    let unhealthy = |state: &State| -> HashSet<String> {
        state
            .nodes
            .values()
            .filter(|n| n.unhealthy.is_some())
            .map(|n| n.id.clone())
            .collect()
    };
    let mut views = ctx.raft.subscribe();
    let mut known = unhealthy(&views.borrow_and_update().state);
    loop {
        if views.changed().await.is_err() {
            return;
        }
        let view = views.borrow_and_update().clone();
        for id in unhealthy(&view.state) {
            if !known.insert(id.clone()) {
                continue;
            }
            let event = NodeUnhealthy {
                reason: view.state.nodes[&id].unhealthy.clone().unwrap_or_default(),
                job_ids: view.state.jobs_on(&id),
                node_id: id,
            };
            if let Some(cmd) = &ctx.on_unhealthy {
                run_hook(cmd, &event).await;
            }
        }
        tokio::time::sleep(HEALTH_CHECK).await;
    }
}

async fn run_hook(cmd: &str, e: &NodeUnhealthy) {
    let jobs: Vec<String> = e.job_ids.iter().map(ToString::to_string).collect();
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("NEMBO_NODE_ID", &e.node_id)
        .env("NEMBO_UNHEALTHY_REASON", &e.reason)
        .env("NEMBO_JOB_IDS", jobs.join(","))
        .stdin(std::process::Stdio::null())
        .status()
        .await;
    match status {
        Ok(s) if s.success() => tracing::info!(node = %e.node_id, "on-unhealthy hook ran"),
        Ok(s) => tracing::warn!(node = %e.node_id, status = %s, "on-unhealthy hook failed"),
        Err(err) => {
            tracing::warn!(node = %e.node_id, error = %err, "on-unhealthy hook did not start")
        }
    }
}
