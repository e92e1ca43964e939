//! Serving decisions, pure: where a replica listens, which replicas the load
//! balancers send traffic to, what `serve status` shows, and [`plan`], the
//! leader's service loop's decisions from the state, the newest probe
//! results and the time. The autoscaler's rule is [`next_target`].

use std::collections::BTreeMap;

use crate::state::{
    Command, JobState, Replica, ReplicaEnd, ReplicaPhase, Service, ServiceCommand, State,
    UpdateMode,
};
use crate::task::ReplicaPolicy;

/// How long replacements stay out of a region where a replica was preempted.
pub const AVOID_PREEMPTED_MS: i64 = 600_000;

/// How long a replica scaled down or replaced finishes its requests:
/// SkyServe's 120 s, or less where the service's load balancer cuts
/// responses sooner (`load_balancer.stream_timeout_seconds`), since no
/// request can outlast that.
pub fn drain_ms(spec: &crate::task::ServiceSpec) -> i64 {
    i64::from(spec.stream_timeout_s.min(120)) * 1000
}

/// A replica's probes, as the leader's prober last saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSummary {
    /// The newest probe passed.
    pub ok: bool,
    /// When the current run of failed probes began.
    pub failing_since_ms: Option<i64>,
}

/// Probe results by (service, replica id).
pub type Probes = BTreeMap<(String, u32), ProbeSummary>;

/// What `serve status` shows for a replica (SkyServe's states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaStatus {
    /// Its job waits for a place.
    Pending,
    /// Its node is being provisioned.
    Provisioning,
    /// Its job started; its probe has not passed yet.
    Starting,
    /// Taking traffic.
    Ready,
    /// Its probe failed after passing.
    NotReady,
    /// Draining, then stopped.
    ShuttingDown,
    /// Its node's cloud announced it will reclaim it.
    Preempted,
    /// It ended, and why.
    Ended(ReplicaEnd),
}

impl ReplicaStatus {
    /// As SkyServe spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaStatus::Pending => "PENDING",
            ReplicaStatus::Provisioning => "PROVISIONING",
            ReplicaStatus::Starting => "STARTING",
            ReplicaStatus::Ready => "READY",
            ReplicaStatus::NotReady => "NOT_READY",
            ReplicaStatus::ShuttingDown => "SHUTTING_DOWN",
            ReplicaStatus::Preempted => "PREEMPTED",
            ReplicaStatus::Ended(e) => e.as_str(),
        }
    }
}

/// The node a replica's job runs on (its first rank's), if placed.
fn replica_node<'a>(state: &'a State, r: &Replica) -> Option<&'a crate::state::Node> {
    let job = state.jobs.get(&r.job_id)?;
    let attempt = job.attempt_holding_ranks()?;
    state.nodes.get(attempt.node_ids.first()?)
}

/// Several nodes on one host: local nodes, all on the loopback.
pub fn shares_host(address: &str) -> bool {
    address.starts_with("127.") || address == "::1" || address == "localhost"
}

/// The port a replica's job listens on (`NEMBO_SERVICE_PORT`): its own
/// on a host that replicas share, else the service's.
pub fn replica_port(node_address: &str, service_port: u16, shared_host_port: u16) -> u16 {
    if shares_host(node_address) {
        shared_host_port
    } else {
        service_port
    }
}

/// `host:port` where the coordinators reach a placed replica.
pub fn replica_endpoint(state: &State, service: &Service, r: &Replica) -> Option<String> {
    let node = replica_node(state, r)?;
    let port = service.versions.get(&r.version)?.service.as_ref()?.port;
    let host = if node.public_address.is_empty() {
        &node.address
    } else {
        &node.public_address
    };
    if host.is_empty() {
        return None;
    }
    let port = replica_port(&node.address, port, r.shared_host_port);
    Some(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// The node a replica's job was last placed on (its newest attempt's first
/// rank), even once the job let go of it: where it ran, for `serve status`
/// and for what its node's cloud did to it.
pub fn last_node<'a>(state: &'a State, r: &Replica) -> Option<&'a crate::state::Node> {
    let attempt = state.jobs.get(&r.job_id)?.current_attempt()?;
    state.nodes.get(attempt.node_ids.first()?)
}

/// Its node's cloud said it will reclaim it. (Its last node: a node
/// reclaimed before the loop ran ends its job first.)
fn noticed(state: &State, r: &Replica) -> bool {
    last_node(state, r).is_some_and(|n| n.preemption.is_some())
}

/// What `serve status` shows for a replica.
pub fn replica_status(state: &State, r: &Replica) -> ReplicaStatus {
    match r.phase {
        ReplicaPhase::Ended(end) => return ReplicaStatus::Ended(end),
        ReplicaPhase::Draining {
            end: ReplicaEnd::Preempted,
            ..
        } => return ReplicaStatus::Preempted,
        ReplicaPhase::Draining { .. } => return ReplicaStatus::ShuttingDown,
        _ if noticed(state, r) => return ReplicaStatus::Preempted,
        ReplicaPhase::Ready => return ReplicaStatus::Ready,
        ReplicaPhase::NotReady => return ReplicaStatus::NotReady,
        ReplicaPhase::Starting => {}
    }
    match state.jobs.get(&r.job_id).map(|j| j.state) {
        Some(JobState::Pending) | None => ReplicaStatus::Pending,
        Some(JobState::Provisioning) => ReplicaStatus::Provisioning,
        _ => ReplicaStatus::Starting,
    }
}

/// The replicas the load balancers send traffic to, with their endpoints:
/// READY ones of the versions that serve (every version in a rolling
/// update; in a blue-green one, the newest once it has `min_replicas`
/// READY, the older ones until then).
pub fn serving_replicas(state: &State, service: &Service) -> Vec<(u32, String)> {
    let ready = |r: &&Replica| r.phase == ReplicaPhase::Ready && !noticed(state, r);
    let newest_ready = service
        .replicas
        .values()
        .filter(ready)
        .filter(|r| r.version == service.version)
        .count() as u32;
    let min = service
        .newest()
        .and_then(|t| t.service.as_ref())
        .map_or(1, |s| s.replica_policy.min_replicas.max(1));
    let serves = |version: u32| match service.update_mode {
        UpdateMode::Rolling => true,
        UpdateMode::BlueGreen if newest_ready >= min => version == service.version,
        UpdateMode::BlueGreen => version != service.version,
    };
    let mut out: Vec<(u32, String)> = service
        .replicas
        .values()
        .filter(ready)
        .filter(|r| serves(r.version))
        .filter_map(|r| Some((r.id, replica_endpoint(state, service, r)?)))
        .collect();
    // A blue-green update whose old version has no READY replica left
    // serves the new one's.
    if out.is_empty() && service.update_mode == UpdateMode::BlueGreen {
        out = service
            .replicas
            .values()
            .filter(ready)
            .filter_map(|r| Some((r.id, replica_endpoint(state, service, r)?)))
            .collect();
    }
    out
}

/// A service's state, as SkyServe names them.
pub fn service_status(state: &State, service: &Service) -> &'static str {
    if !serving_replicas(state, service).is_empty() {
        return "READY";
    }
    if stopped_scaling(service) {
        return "FAILED";
    }
    if service.target == 0 {
        return "NO_REPLICA";
    }
    "REPLICA_INIT"
}

/// SkyServe's rule: a newest version that was never READY and whose
/// replica failed by its own doing is not launched again (its code is
/// broken; relaunching would loop).
pub fn stopped_scaling(service: &Service) -> bool {
    let newest = service
        .replicas
        .values()
        .filter(|r| r.version == service.version);
    let mut ever_ready = false;
    let mut failed = false;
    for r in newest {
        ever_ready |= r.ready_at_ms.is_some();
        failed |= matches!(r.phase, ReplicaPhase::Ended(e) if e.is_failure());
    }
    failed && !ever_ready
}

/// Earlier stages go first when replicas are scaled down (SkyServe's
/// order: stage, then version, then id).
fn retire_order(state: &State, r: &Replica) -> (u8, u32, u32) {
    let stage = match replica_status(state, r) {
        ReplicaStatus::Pending => 0,
        ReplicaStatus::Provisioning => 1,
        ReplicaStatus::Starting => 2,
        ReplicaStatus::NotReady => 3,
        _ => 4,
    };
    (stage, r.version, r.id)
}

/// The service loop's decisions: probe transitions, failures, drains that
/// are over, replicas to add (with `shared_host_port: 0`, which the loop
/// fills with a free port) and replicas to retire.
pub fn plan(state: &State, probes: &Probes, now_ms: i64) -> Vec<Command> {
    let mut out = Vec::new();
    for service in state.services.values() {
        plan_service(state, service, probes, now_ms, &mut out);
    }
    out.into_iter().map(Command::Service).collect()
}

fn plan_service(
    state: &State,
    service: &Service,
    probes: &Probes,
    now_ms: i64,
    out: &mut Vec<ServiceCommand>,
) {
    let name = &service.name;
    let retire = |r: &Replica, end: ReplicaEnd, drain: Option<i64>, message: String| {
        ServiceCommand::Retire {
            name: name.clone(),
            replica_id: r.id,
            end,
            drain_until_ms: drain,
            message,
            at_ms: now_ms,
        }
    };
    // Replicas out of the count from here on: retiring now, or already.
    let mut leaving: Vec<u32> = Vec::new();
    for r in service.replicas.values().filter(|r| r.is_live()) {
        let Some(spec) = service.versions.get(&r.version) else {
            continue;
        };
        let Some(svc) = spec.service.as_ref() else {
            continue;
        };
        let probe = &svc.readiness_probe;
        let job = state.jobs.get(&r.job_id);
        if let ReplicaPhase::Draining { until_ms, end } = r.phase {
            leaving.push(r.id);
            if until_ms <= now_ms || job.is_none_or(|j| j.state.is_terminal()) {
                out.push(retire(r, end, None, r.message.clone()));
            }
            continue;
        }
        if let Some(job) = job.filter(|j| j.state.is_terminal()) {
            leaving.push(r.id);
            let (end, why) = if noticed(state, r) {
                (
                    ReplicaEnd::Preempted,
                    format!("its node was reclaimed: {}", job.message),
                )
            } else if job.state == JobState::Succeeded {
                // SkyServe's rule: a `run` that exits 0 is not a failure;
                // the replica is replaced.
                (ReplicaEnd::ScaledDown, "its run exited 0".to_string())
            } else {
                (
                    ReplicaEnd::Failed,
                    format!("its job ended: {}", job.message),
                )
            };
            out.push(retire(r, end, None, why));
            continue;
        }
        if let Some(node) = replica_node(state, r) {
            if let Some(notice) = &node.preemption {
                leaving.push(r.id);
                out.push(retire(
                    r,
                    ReplicaEnd::Preempted,
                    Some(notice.deadline_ms),
                    format!("{} notice for node {}", notice.kind, node.id),
                ));
                continue;
            }
        }
        let running = job.is_some_and(|j| j.state == JobState::Running);
        let Some(seen) = probes.get(&(name.clone(), r.id)).filter(|_| running) else {
            continue;
        };
        let failing_for = seen.failing_since_ms.map_or(0, |t| now_ms - t);
        match (r.phase, seen.ok) {
            // A transition into or out of READY.
            (ReplicaPhase::Starting | ReplicaPhase::NotReady, true)
            | (ReplicaPhase::Ready, false) => out.push(ServiceCommand::Probed {
                name: name.clone(),
                replica_id: r.id,
                ready: seen.ok,
                at_ms: now_ms,
            }),
            (ReplicaPhase::Starting, false)
                if failing_for >= i64::from(probe.initial_delay_s) * 1000 =>
            {
                leaving.push(r.id);
                out.push(retire(
                    r,
                    ReplicaEnd::FailedInitialDelay,
                    None,
                    format!(
                        "not ready within initial_delay_seconds ({} s)",
                        probe.initial_delay_s
                    ),
                ));
            }
            (ReplicaPhase::NotReady, false)
                if failing_for >= i64::from(probe.failure_timeout_s) * 1000 =>
            {
                leaving.push(r.id);
                out.push(retire(
                    r,
                    ReplicaEnd::FailedProbing,
                    None,
                    format!("its probe failed for {} s in a row", failing_for / 1000),
                ));
            }
            _ => {}
        }
    }
    // A newest version never READY whose replica fails in this very plan
    // stops scaling now, not one plan later.
    let failing_now = out.iter().any(|c| {
        matches!(c, ServiceCommand::Retire { replica_id, end, name: n, .. }
            if n == name && end.is_failure()
                && service.replicas.get(replica_id).is_some_and(|r| r.version == service.version))
    });
    let never_ready = service
        .replicas
        .values()
        .filter(|r| r.version == service.version)
        .all(|r| r.ready_at_ms.is_none());
    let stopped = stopped_scaling(service) || (failing_now && never_ready);
    scale(state, service, &leaving, stopped, now_ms, out);
}

/// Adds and retires replicas so the newest version has its target, spot
/// and on-demand as the fallback rules say, and older versions go as the
/// update mode says.
fn scale(
    state: &State,
    service: &Service,
    leaving: &[u32],
    stopped: bool,
    now_ms: i64,
    out: &mut Vec<ServiceCommand>,
) {
    let Some(spec) = service.newest() else {
        return;
    };
    let Some(svc) = spec.service.as_ref() else {
        return;
    };
    let policy = &svc.replica_policy;
    let target = service.target.saturating_add(policy.num_overprovision);
    let staying = |r: &&Replica| r.is_live() && !leaving.contains(&r.id);
    let newest: Vec<&Replica> = service
        .replicas
        .values()
        .filter(staying)
        .filter(|r| r.version == service.version)
        .collect();
    let spot_task = spec.resources.candidates.iter().any(|c| c.use_spot);
    let (spot_target, ondemand_target) = if spot_task {
        let spot = target.saturating_sub(policy.base_ondemand_fallback_replicas);
        let ready_spot = newest
            .iter()
            .filter(|r| r.spot && r.phase == ReplicaPhase::Ready)
            .count() as u32;
        let dynamic = if policy.dynamic_ondemand_fallback {
            spot.saturating_sub(ready_spot)
        } else {
            0
        };
        (spot, (target - spot).saturating_add(dynamic).min(target))
    } else {
        (0, target)
    };
    // EAGER_NEXT_REGION: replacements stay out of the regions where the
    // service's replicas were preempted within the last ten minutes.
    let mut avoid: Vec<(String, String)> = Vec::new();
    for r in service.replicas.values() {
        let preempted = match r.phase {
            ReplicaPhase::Draining {
                end: ReplicaEnd::Preempted,
                ..
            } => true,
            ReplicaPhase::Ended(ReplicaEnd::Preempted) => r
                .ended_at_ms
                .is_some_and(|t| now_ms - t < AVOID_PREEMPTED_MS),
            ReplicaPhase::Ended(_) => false,
            // Noticed in this very plan.
            _ => noticed(state, r),
        };
        if let (true, Some(n)) = (preempted, last_node(state, r)) {
            let place = (n.provider.clone(), n.region.clone());
            if !avoid.contains(&place) {
                avoid.push(place);
            }
        }
    }
    let mut next_id = service.last_replica_id;
    let mut retiring: Vec<&Replica> = Vec::new();
    for (spot, want) in [(true, spot_target), (false, ondemand_target)] {
        let mut have: Vec<&Replica> = newest.iter().copied().filter(|r| r.spot == spot).collect();
        // Bounded as the spec is, whatever a state says.
        let missing = (want as usize)
            .saturating_sub(have.len())
            .min(crate::task::MAX_SERVICE_REPLICAS as usize);
        if missing > 0 && !stopped {
            for _ in 0..missing {
                next_id = next_id.saturating_add(1);
                out.push(ServiceCommand::AddReplica {
                    name: service.name.clone(),
                    replica_id: next_id,
                    version: service.version,
                    spot,
                    shared_host_port: 0,
                    avoid: avoid.clone(),
                    at_ms: now_ms,
                });
            }
        }
        let excess = have.len().saturating_sub(want as usize);
        have.sort_by_key(|r| retire_order(state, r));
        retiring.extend(have.into_iter().take(excess));
    }
    // Older versions: rolling keeps as many as the newest still lacks
    // READY; blue-green keeps them all until the newest serves.
    let newest_ready = newest
        .iter()
        .filter(|r| r.phase == ReplicaPhase::Ready)
        .count() as u32;
    let mut old: Vec<&Replica> = service
        .replicas
        .values()
        .filter(staying)
        .filter(|r| r.version != service.version)
        .collect();
    let keep = match service.update_mode {
        UpdateMode::Rolling => target.saturating_sub(newest_ready) as usize,
        UpdateMode::BlueGreen if newest_ready >= policy.min_replicas.max(1) => 0,
        UpdateMode::BlueGreen => old.len(),
    };
    old.sort_by_key(|r| retire_order(state, r));
    let excess = old.len().saturating_sub(keep);
    retiring.extend(old.into_iter().take(excess));
    for r in retiring {
        // Never READY: nothing to drain.
        let drain_for = service
            .versions
            .get(&r.version)
            .and_then(|t| t.service.as_ref())
            .map_or(120_000, drain_ms);
        let drain = (r.phase == ReplicaPhase::Ready).then_some(now_ms + drain_for);
        out.push(ServiceCommand::Retire {
            name: service.name.clone(),
            replica_id: r.id,
            end: ReplicaEnd::ScaledDown,
            drain_until_ms: drain,
            message: if r.version == service.version {
                "scaled down".into()
            } else {
                format!("replaced by version {}", service.version)
            },
            at_ms: now_ms,
        });
    }
}

/// The autoscaler's memory between decisions (the leader's, not
/// replicated: a new leader starts its delays afresh).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hysteresis {
    /// Since when the wanted count has stayed above the target.
    pub higher_since_ms: Option<i64>,
    /// Since when it has stayed below.
    pub lower_since_ms: Option<i64>,
}

/// SkyServe's rule: the replicas the load wants are `ceil(qps / target
/// qps)` within `[min, max]`; the target moves up once that has been
/// higher for `upscale_delay_seconds`, down once lower for
/// `downscale_delay_seconds`, and from zero at once. A fixed policy keeps
/// `min`. `qps` is the request rate over the last minute, every
/// coordinator's load balancer together.
pub fn next_target(
    policy: &ReplicaPolicy,
    current: u32,
    qps: f64,
    memory: &mut Hysteresis,
    now_ms: i64,
) -> u32 {
    let Some(per_replica) = policy.target_qps_per_replica else {
        return policy.min_replicas;
    };
    let wanted = ((qps / per_replica).ceil().max(0.0) as u32)
        .min(policy.max_replicas)
        .max(policy.min_replicas);
    if wanted > current {
        memory.lower_since_ms = None;
        let since = *memory.higher_since_ms.get_or_insert(now_ms);
        if current == 0 || now_ms - since >= i64::from(policy.upscale_delay_s) * 1000 {
            memory.higher_since_ms = None;
            return wanted;
        }
    } else if wanted < current {
        memory.higher_since_ms = None;
        let since = *memory.lower_since_ms.get_or_insert(now_ms);
        if now_ms - since >= i64::from(policy.downscale_delay_s) * 1000 {
            memory.lower_since_ms = None;
            return wanted;
        }
    } else {
        *memory = Hysteresis::default();
    }
    current
}

#[cfg(test)]
mod tests;
