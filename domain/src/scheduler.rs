//! Placement: a pure function from (state, offerings, now) to the commands
//! the leader should propose. `State::apply` re-checks every assignment, so
//! a plan computed on a stale snapshot can be rejected but never double-books.

use std::collections::BTreeMap;

use crate::optimizer::{blocked_matches, node_matches, offering_matches, rank};
use crate::state::{Command, Job, JobState, NodeState, Offering, Resources, State};
use crate::task::{ResourceCandidate, TaskSpec};

/// Where a job would go.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// On nodes that exist and have room, rank order.
    Existing {
        /// Candidate index used.
        candidate: usize,
        /// Nodes.
        node_ids: Vec<String>,
    },
    /// On new nodes of this offering.
    Provision {
        /// Candidate index used.
        candidate: usize,
        /// What to launch.
        offering: Offering,
        /// On spot capacity.
        spot: bool,
        /// How many.
        count: u32,
    },
}

/// What one planning round has already promised, so that later jobs in the
/// same round see it.
#[derive(Debug, Default)]
pub struct Round {
    /// Resources promised per node.
    pub taken: BTreeMap<String, Resources>,
    /// Reserved nodes whose reservation this round turns into an assignment.
    pub released: std::collections::BTreeSet<String>,
}

impl Round {
    fn take(&mut self, node: &str, demand: &Resources) {
        let t = self.taken.entry(node.to_string()).or_default();
        *t = t.plus(demand);
    }
}

/// Where `spec` would go now: on existing nodes with room (every candidate
/// is tried there first, since idle capacity costs nothing more), else on
/// new ones in the optimizer's best place that is not blocked.
pub fn place(
    state: &State,
    spec: &TaskSpec,
    offerings: &[Offering],
    round: &Round,
    now_ms: i64,
) -> Option<Placement> {
    place_avoiding(state, spec, offerings, round, now_ms, &[])
}

/// [`place`], staying out of the (provider, region) pairs in `avoid`.
fn place_avoiding(
    state: &State,
    spec: &TaskSpec,
    offerings: &[Offering],
    round: &Round,
    now_ms: i64,
    avoid: &[(String, String)],
) -> Option<Placement> {
    let kept_off;
    let (offerings, avoid) = if spec.keep_off_coordinator_user {
        kept_off = without_coordinator_user(offerings, avoid);
        (&kept_off.0[..], &kept_off.1[..])
    } else {
        (offerings, avoid)
    };
    let cluster = spec.cluster.as_ref().map(|t| t.name.as_str());
    // A cluster's jobs go to its nodes; only its first task provisions them,
    // as many as the cluster has.
    let mut count = spec.num_nodes;
    if let Some(name) = cluster {
        let c = state.clusters.get(name)?;
        if c.stopped {
            return None;
        }
        let provisioning = state.placed_jobs().any(|j| {
            j.spec.cluster.as_ref().is_some_and(|t| t.name == name) && !j.reserved_nodes.is_empty()
        });
        if state.cluster_nodes(c).next().is_some() || provisioning {
            return (0..spec.resources.candidates.len()).find_map(|i| {
                existing_nodes(state, spec, i, round, avoid).map(|nodes| Placement::Existing {
                    candidate: i,
                    node_ids: nodes,
                })
            });
        }
        count = c.num_nodes.max(spec.num_nodes);
    }
    let mut ranked: Option<Vec<crate::optimizer::Choice<'_>>> = None;
    let mut best_new = |candidate: Option<usize>| {
        let choices = ranked.get_or_insert_with(|| rank(spec, offerings, &state.blocked, now_ms));
        choices
            .iter()
            .find(|c| candidate.is_none_or(|i| c.candidate == i))
            .map(|c| Placement::Provision {
                candidate: c.candidate,
                offering: c.offering.clone(),
                spot: c.spot,
                count,
            })
    };
    for i in 0..spec.resources.candidates.len() {
        if let Some(nodes) = existing_nodes(state, spec, i, round, avoid) {
            return Some(Placement::Existing {
                candidate: i,
                node_ids: nodes,
            });
        }
        if spec.resources.ordered {
            if let Some(p) = best_new(Some(i)) {
                return Some(p);
            }
        }
    }
    best_new(None)
}

/// The offerings a non-admin's job may use, and `avoid` grown by every
/// place whose nodes run jobs as the coordinators' Unix user, so that no
/// existing node there is chosen either.
fn without_coordinator_user(
    offerings: &[Offering],
    avoid: &[(String, String)],
) -> (Vec<Offering>, Vec<(String, String)>) {
    let mut avoid = avoid.to_vec();
    let mut kept = Vec::with_capacity(offerings.len());
    for o in offerings {
        if o.runs_as_coordinator_user {
            avoid.push((o.provider.clone(), o.region.clone()));
        } else {
            kept.push(o.clone());
        }
    }
    (kept, avoid)
}

fn existing_nodes(
    state: &State,
    spec: &TaskSpec,
    candidate: usize,
    round: &Round,
    avoid: &[(String, String)],
) -> Option<Vec<String>> {
    let c = &spec.resources.candidates[candidate];
    let mut chosen = Vec::new();
    let cluster = spec.cluster.as_ref().map(|t| t.name.as_str());
    // A cluster's nodes in rank order, head first; otherwise every node.
    let listed: Option<Vec<&crate::state::Node>> = cluster
        .and_then(|name| state.clusters.get(name))
        .map(|cl| state.cluster_nodes(cl).collect())
        .filter(|v: &Vec<_>| !v.is_empty());
    let nodes: Box<dyn Iterator<Item = &crate::state::Node>> = match listed {
        Some(v) => Box::new(v.into_iter()),
        None => Box::new(state.nodes.values()),
    };
    for node in nodes {
        if state.node_serves(node, cluster).is_err() {
            continue;
        }
        let reserved = state.reserved_by(&node.id).is_some() && !round.released.contains(&node.id);
        let usable = node.state == NodeState::Ready
            && node.unhealthy.is_none()
            && node.preemption.is_none()
            && !avoid
                .iter()
                .any(|(p, r)| *p == node.provider && *r == node.region);
        if !usable || !node_matches(c, node) || reserved {
            continue;
        }
        // One replica of a service per machine: they all serve on its port.
        if spec.replica.is_some() && state.holds_other_replica(node) {
            continue;
        }
        // The node must also be a shape this candidate accepts (its whole size).
        let shape = Offering {
            provider: node.provider.clone(),
            region: node.region.clone(),
            instance_type: node.instance_type.clone(),
            resources: node.resources.clone(),
            hourly_price: node.hourly_price,
            spot_price: None,
            zone: node.zone.clone(),
            runs_as_coordinator_user: false,
            simulated: false,
            fixed_machines: None,
            disk_gb_max: None,
            opens_ports: false,
            ports_per_node: false,
            custom_images: false,
            can_stop: false,
        };
        let shape_ok = node.fixed_machine
            || match &c.accelerator {
                Some(a) => {
                    node.resources
                        .accelerators
                        .get(&a.name)
                        .copied()
                        .unwrap_or(0.0)
                        >= a.count
                }
                None => {
                    offering_matches(
                        &ResourceCandidate {
                            use_spot: false,
                            ..c.clone()
                        },
                        &shape,
                    ) || (c.cpus.is_none() && c.memory.is_none())
                }
            };
        if !shape_ok {
            continue;
        }
        let demand = State::demand(spec, candidate, &node.resources);
        let mut free = state.free_on(&node.id);
        if let Some(t) = round.taken.get(&node.id) {
            free = free.minus(t);
        }
        if free.fits(&demand) {
            chosen.push(node.id.clone());
            if chosen.len() == spec.num_nodes as usize {
                return Some(chosen);
            }
        }
    }
    None
}

/// Operator limits the scheduler respects.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Most nodes that may exist (not terminated or failed) at once.
    pub max_nodes: u32,
    /// A node of no cluster (a managed job's, or a shared fixed machine no
    /// running cluster lists) idle this long is released, ms.
    pub pool_idle_ms: i64,
}

/// Five minutes: long enough for the next job of a burst to reuse a node,
/// short enough that a forgotten one costs little.
pub const POOL_IDLE_MS: i64 = 5 * 60 * 1000;

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_nodes: 64,
            pool_idle_ms: POOL_IDLE_MS,
        }
    }
}

/// Clusters idle past their autostop window, and nodes of no cluster idle
/// past the pool's: what autostop and the pool's reaper propose now.
fn idle_commands(state: &State, policy: Policy, now_ms: i64, out: &mut Vec<Command>) {
    for c in state.clusters.values() {
        if state.autostop_due(c, now_ms) {
            out.push(Command::AutostopCluster {
                name: c.name.clone(),
                at_ms: now_ms,
            });
        }
    }
    let held: std::collections::BTreeSet<&str> = state
        .clusters
        .values()
        .filter(|c| !c.stopped)
        .flat_map(|c| c.node_ids.iter().map(String::as_str))
        .collect();
    let idle: Vec<String> = state
        .nodes
        .values()
        .filter(|n| {
            n.state == NodeState::Ready
                && n.cluster.is_none()
                && n.provider != crate::state::MANUAL_PROVIDER
                && !held.contains(n.id.as_str())
                && n.last_busy_ms
                    .or(n.launched_at_ms)
                    .is_some_and(|t| now_ms - t >= policy.pool_idle_ms)
                && state.reserved_by(&n.id).is_none()
                && state.jobs_on(&n.id).is_empty()
        })
        .map(|n| n.id.clone())
        .collect();
    if !idle.is_empty() {
        out.push(Command::TerminateNodes {
            node_ids: idle,
            at_ms: now_ms,
        });
    }
}

/// The commands that move waiting jobs forward: assignments onto nodes with
/// room, and provisioning intents where nothing fits. Oldest job first.
pub fn plan(state: &State, offerings: &[Offering], policy: Policy, now_ms: i64) -> Vec<Command> {
    let mut out = Vec::new();
    idle_commands(state, policy, now_ms, &mut out);
    // A node whose cloud's deadline has passed is gone, whether or not its
    // heartbeats have stopped yet: its ranks are lost and it is released.
    for n in state.nodes.values() {
        let due = n
            .preemption
            .as_ref()
            .is_some_and(|p| p.deadline_ms <= now_ms);
        if due && n.state == NodeState::Ready {
            out.push(Command::NodeLost {
                node_id: n.id.clone(),
                message: "preempted: the cloud's deadline passed".into(),
                at_ms: now_ms,
            });
            out.push(Command::TerminateNodes {
                node_ids: vec![n.id.clone()],
                at_ms: now_ms,
            });
        }
    }
    let mut round = Round::default();
    let mut fixed = FixedRoom::new(state, offerings);
    let mut live_nodes = state.nodes.values().filter(|n| !n.state.is_final()).count() as u64;
    // Jobs whose provisioned nodes are up come first: those nodes are theirs.
    for job in state.placed_jobs().filter(|j| {
        matches!(j.state, JobState::Provisioning | JobState::Recovering)
            && !j.reserved_nodes.is_empty()
    }) {
        // A recovering job's old attempt must be gone first: never two at once.
        let old_runs = job.attempt_holding_ranks().is_some();
        let ready = !old_runs
            && job.reserved_nodes.iter().all(|n| {
                state
                    .nodes
                    .get(n)
                    .is_some_and(|n| n.state == NodeState::Ready)
            });
        if ready {
            let candidate = candidate_for_nodes(state, &job.spec, &job.reserved_nodes);
            for n in &job.reserved_nodes {
                round.released.insert(n.clone());
                round.take(
                    n,
                    &State::demand(&job.spec, candidate, &state.nodes[n].resources),
                );
            }
            out.push(Command::AssignJob {
                job_id: job.id,
                node_ids: job.reserved_nodes.clone(),
                candidate,
                at_ms: now_ms,
            });
        }
    }
    // With no node to place on and no room to provision, a backlog of pending
    // jobs cannot move: do not scan it on every state change.
    let any_ready = state.nodes.values().any(|n| n.state == NodeState::Ready);
    if !any_ready && live_nodes >= u64::from(policy.max_nodes) {
        return out;
    }
    for job in state.queued_jobs() {
        // At the node cap only existing nodes can help: skip ranking offerings.
        let room = live_nodes + u64::from(job.spec.num_nodes) <= u64::from(policy.max_nodes);
        let offerings = if room {
            fixed.open(job.spec.num_nodes)
        } else {
            &[]
        };
        // A recovering job whose old attempt still runs can only have a
        // node provisioned now; an idle node is taken once the attempt ends.
        let old_runs = job.attempt_holding_ranks().is_some();
        match place_job(state, job, offerings, &round, now_ms) {
            Some(Placement::Existing { .. }) if old_runs => {}
            Some(Placement::Existing {
                candidate,
                node_ids,
            }) => {
                for n in &node_ids {
                    round.take(
                        n,
                        &State::demand(&job.spec, candidate, &state.nodes[n].resources),
                    );
                }
                out.push(Command::AssignJob {
                    job_id: job.id,
                    node_ids,
                    candidate,
                    at_ms: now_ms,
                });
            }
            Some(Placement::Provision {
                offering,
                count,
                spot,
                ..
            }) => {
                if live_nodes + u64::from(count) > u64::from(policy.max_nodes) {
                    continue;
                }
                live_nodes += u64::from(count);
                fixed.spend(&offering, count);
                out.push(Command::ProvisionNodes {
                    job_id: job.id,
                    offering,
                    count,
                    spot,
                    at_ms: now_ms,
                });
            }
            // Nowhere to go only because every fitting place refused
            // capacity or quota lately: fail now, naming them, rather than
            // wait silently (SkyPilot's ResourcesUnavailableError). A managed
            // job waits instead: blocks expire, and it is tried again.
            None if room && job.managed.is_none() => {
                let blocked = blocked_matches(&job.spec, offerings, &state.blocked, now_ms);
                if !blocked.is_empty() {
                    let tried: Vec<String> = blocked
                        .iter()
                        .map(|(place, why)| format!("{place} ({why})"))
                        .collect();
                    out.push(Command::JobUnplaceable {
                        job_id: job.id,
                        message: format!(
                            "no capacity in any place that fits: {}",
                            tried.join("; ")
                        ),
                        at_ms: now_ms,
                    });
                }
            }
            None => {}
        }
    }
    out
}

/// How many more nodes each place of fixed machines can have this round,
/// and the offerings still open to a job of some size: a place whose
/// machines are all up is left out, so its jobs wait for room there.
struct FixedRoom<'a> {
    all: &'a [Offering],
    /// (provider, region) -> nodes it may still have.
    left: BTreeMap<(String, String), u32>,
    /// The open offerings for jobs of this many nodes, until `spend`.
    open: Option<(u32, Vec<Offering>)>,
}

impl<'a> FixedRoom<'a> {
    fn new(state: &State, all: &'a [Offering]) -> Self {
        let mut left = BTreeMap::new();
        for o in all {
            if let Some(m) = o.fixed_machines {
                left.insert((o.provider.clone(), o.region.clone()), m);
            }
        }
        if !left.is_empty() {
            for n in state.nodes.values().filter(|n| !n.state.is_final()) {
                if let Some(l) = left.get_mut(&(n.provider.clone(), n.region.clone())) {
                    *l = l.saturating_sub(1);
                }
            }
        }
        Self {
            all,
            left,
            open: None,
        }
    }

    /// The offerings a job of `nodes` nodes may provision.
    fn open(&mut self, nodes: u32) -> &[Offering] {
        if self.left.values().all(|l| *l >= nodes) {
            return self.all;
        }
        if self.open.as_ref().is_none_or(|(n, _)| *n != nodes) {
            let left = &self.left;
            let open = self
                .all
                .iter()
                .filter(|o| {
                    o.fixed_machines.is_none()
                        || left
                            .get(&(o.provider.clone(), o.region.clone()))
                            .is_some_and(|l| *l >= nodes)
                })
                .cloned()
                .collect();
            self.open = Some((nodes, open));
        }
        self.open.as_ref().map_or(&[], |(_, o)| &o[..])
    }

    fn spend(&mut self, o: &Offering, count: u32) {
        if let Some(l) = self.left.get_mut(&(o.provider.clone(), o.region.clone())) {
            *l = l.saturating_sub(count);
            self.open = None;
        }
    }
}

/// Places a job; a managed job recovering under EAGER_NEXT_REGION stays out
/// of the preempted region when anywhere else fits, and goes back to it
/// only when nothing else does (SkyPilot's order).
fn place_job(
    state: &State,
    job: &Job,
    offerings: &[Offering],
    round: &Round,
    now_ms: i64,
) -> Option<Placement> {
    let mut avoid: Vec<(String, String)> = job
        .managed
        .as_ref()
        .map(|m| {
            m.avoided(now_ms)
                .map(|a| (a.provider.clone(), a.region.clone()))
                .collect()
        })
        .unwrap_or_default();
    // A service's replica replacing a preempted one, likewise.
    if let Some(tag) = &job.spec.replica {
        avoid.extend(tag.avoid.iter().cloned());
    }
    if !avoid.is_empty() {
        let elsewhere: Vec<Offering> = offerings
            .iter()
            .filter(|o| {
                !avoid
                    .iter()
                    .any(|(p, r)| *p == o.provider && *r == o.region)
            })
            .cloned()
            .collect();
        if let Some(p) = place_avoiding(state, &job.spec, &elsewhere, round, now_ms, &avoid) {
            return Some(p);
        }
    }
    place(state, &job.spec, offerings, round, now_ms)
}

/// The candidate that provisioned nodes were chosen for.
fn candidate_for_nodes(state: &State, spec: &TaskSpec, nodes: &[String]) -> usize {
    let Some(node) = nodes.first().and_then(|n| state.nodes.get(n)) else {
        return 0;
    };
    let shape = Offering {
        provider: node.provider.clone(),
        region: node.region.clone(),
        instance_type: node.instance_type.clone(),
        resources: node.resources.clone(),
        hourly_price: node.hourly_price,
        spot_price: Some(node.hourly_price),
        zone: node.zone.clone(),
        runs_as_coordinator_user: false,
        simulated: false,
        fixed_machines: None,
        disk_gb_max: None,
        opens_ports: false,
        ports_per_node: false,
        custom_images: false,
        can_stop: false,
    };
    spec.resources
        .candidates
        .iter()
        .position(|c| offering_matches(c, &shape))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::{check_feasible, rank};
    use crate::state::{LaunchFailure, Outcome, RankOutcome, BLOCK_COOLDOWN_MS};
    use crate::task::parse_task_yaml;

    fn ranked(t: &TaskSpec) -> Vec<Offering> {
        rank(t, &offerings(), &BTreeMap::new(), 0)
            .into_iter()
            .map(|c| c.offering.clone())
            .collect()
    }

    fn offerings() -> Vec<Offering> {
        let mk = |region: &str, t: &str, gpu: Option<(&str, f64)>, cpus: f64, price: f64| {
            let mut r = Resources {
                cpus,
                memory_gb: cpus * 4.0,
                ..Default::default()
            };
            if let Some((g, n)) = gpu {
                r.accelerators.insert(g.into(), n);
            }
            Offering {
                provider: "local".into(),
                region: region.into(),
                instance_type: t.into(),
                resources: r,
                hourly_price: price,
                spot_price: None,
                zone: None,
                runs_as_coordinator_user: false,
                simulated: false,
                fixed_machines: None,
                disk_gb_max: None,
                opens_ports: false,
                ports_per_node: false,
                custom_images: false,
                can_stop: false,
            }
        };
        vec![
            mk("us-east", "cpu-2", None, 2.0, 0.1),
            mk("us-east", "cpu-8", None, 8.0, 0.4),
            mk("us-east", "h100-8", Some(("H100", 8.0)), 192.0, 30.0),
            mk("eu-west", "h100-8", Some(("H100", 8.0)), 192.0, 25.0),
            mk("us-east", "a100-8", Some(("A100", 8.0)), 96.0, 15.0),
        ]
    }

    fn spec(y: &str) -> TaskSpec {
        parse_task_yaml(y, &Default::default()).unwrap()
    }

    #[test]
    fn cheapest_fitting_offering_is_provisioned() {
        let mut s = State::default();
        s.apply(&Command::SubmitJob {
            spec: spec("resources: {accelerators: H100:8}"),
            idempotency_key: None,
            owner: String::new(),
            at_ms: 0,
        });
        let p = plan(&s, &offerings(), Policy::default(), 1);
        let [Command::ProvisionNodes {
            offering, count: 1, ..
        }] = p.as_slice()
        else {
            panic!("{p:?}")
        };
        assert_eq!(
            (offering.region.as_str(), offering.instance_type.as_str()),
            ("eu-west", "h100-8")
        );
    }

    #[test]
    fn ordered_preference_beats_price() {
        let t = spec("resources: {accelerators: ['H100:8', 'A100:8']}");
        assert_eq!(ranked(&t)[0].instance_type, "h100-8");
        let t = spec("resources: {accelerators: {H100: 8, A100: 8}}");
        assert_eq!(ranked(&t)[0].instance_type, "a100-8");
    }

    #[test]
    fn pinned_region_and_cpu_constraints_are_honoured() {
        let t = spec("resources: {accelerators: H100:8, infra: local/us-east}");
        assert_eq!(ranked(&t)[0].region, "us-east");
        let t = spec("resources: {cpus: 4+}");
        assert_eq!(ranked(&t)[0].instance_type, "cpu-8");
        let t = spec("resources: {max_hourly_cost: 20, accelerators: H100:8}");
        assert!(ranked(&t).is_empty());
    }

    /// A state holding job 1, submitted at 0.
    fn submitted(yaml: &str) -> State {
        let mut s = State::default();
        s.apply(&Command::SubmitJob {
            spec: spec(yaml),
            idempotency_key: None,
            owner: String::new(),
            at_ms: 0,
        });
        s
    }

    /// Plans at `now`, applies the one provisioning intent it must give,
    /// returns the nodes it created.
    fn provision(s: &mut State, now: i64) -> Vec<String> {
        let p = plan(s, &offerings(), Policy::default(), now);
        let [cmd @ Command::ProvisionNodes { .. }] = p.as_slice() else {
            panic!("{p:?}")
        };
        let Outcome::Nodes(nodes) = s.apply(cmd) else {
            panic!()
        };
        nodes
    }

    fn launch_failed(node_id: &str, message: &str, failure: LaunchFailure, at_ms: i64) -> Command {
        Command::NodeLaunchFailed {
            node_id: node_id.into(),
            message: message.into(),
            failure,
            at_ms,
        }
    }

    /// The job walks the places cheapest first; each capacity refusal
    /// blocks that place for the cool-down; with none left it fails naming
    /// them all; after the cool-down the places are tried again.
    #[test]
    fn capacity_errors_move_the_job_on_and_end_it_when_nothing_is_left() {
        let mut s = submitted("resources: {accelerators: H100:8}");
        let mut tried = Vec::new();
        for now in [1, 2] {
            let nodes = provision(&mut s, now);
            tried.push(s.nodes[&nodes[0]].region.clone());
            s.apply(&launch_failed(
                &nodes[0],
                "InsufficientInstanceCapacity",
                LaunchFailure::Capacity,
                now,
            ));
            let job = &s.jobs[&1];
            assert_eq!(job.state, JobState::Pending, "{}", job.message);
            assert!(job.message.contains("trying the next candidate"));
        }
        assert_eq!(tried, ["eu-west", "us-east"], "cheapest first");
        let job = &s.jobs[&1];
        assert_eq!(job.provision_tries.len(), 2);
        assert_eq!(
            job.provision_tries[0].place,
            "local/eu-west/h100-8".to_string()
        );
        assert_eq!(
            job.provision_tries[0].outcome,
            "InsufficientInstanceCapacity"
        );
        // Nothing left: the job fails, naming both places.
        let p = plan(&s, &offerings(), Policy::default(), 3);
        let [cmd @ Command::JobUnplaceable { message, .. }] = p.as_slice() else {
            panic!("{p:?}")
        };
        assert!(
            message.contains("local/eu-west/h100-8") && message.contains("local/us-east/h100-8")
        );
        // A later job, after the cool-down, gets the cheapest place again.
        let later = BLOCK_COOLDOWN_MS + 10;
        s.apply(cmd);
        assert_eq!(s.jobs[&1].state, JobState::Failed);
        s.apply(&Command::SubmitJob {
            spec: spec("resources: {accelerators: H100:8}"),
            idempotency_key: None,
            owner: String::new(),
            at_ms: later,
        });
        let p = plan(&s, &offerings(), Policy::default(), later);
        assert!(
            matches!(p.as_slice(), [Command::ProvisionNodes { offering, .. }] if offering.region == "eu-west"),
            "{p:?}"
        );
    }

    /// A launch that fails for any other reason (auth, bad request) fails
    /// the job and blocks nothing.
    #[test]
    fn other_launch_errors_fail_the_job() {
        let mut s = submitted("resources: {accelerators: H100:8}");
        let nodes = provision(&mut s, 1);
        s.apply(&launch_failed(
            &nodes[0],
            "AuthFailure",
            LaunchFailure::Other,
            2,
        ));
        assert_eq!(s.jobs[&1].state, JobState::Failed);
        assert!(s.blocked.is_empty());
    }

    /// A multi-node job whose second node hits a capacity error lets go of
    /// the first rather than pay for it idle.
    #[test]
    fn a_gang_that_hits_capacity_releases_its_other_nodes() {
        let mut s = submitted("num_nodes: 2\nresources: {accelerators: H100:8}");
        let nodes = provision(&mut s, 1);
        s.apply(&launch_failed(
            &nodes[1],
            "no capacity",
            LaunchFailure::Capacity,
            2,
        ));
        assert_eq!(s.nodes[&nodes[0]].state, NodeState::Terminating);
        assert_eq!(s.jobs[&1].state, JobState::Pending);
        assert!(s.jobs[&1].reserved_nodes.is_empty());
    }

    #[test]
    fn infeasible_tasks_name_the_field() {
        let e = check_feasible(&spec("resources: {infra: aws}"), &offerings()).unwrap_err();
        assert_eq!(e.path, "resources.infra");
        let e =
            check_feasible(&spec("resources: {accelerators: TPU-v5}"), &offerings()).unwrap_err();
        assert_eq!(e.path, "resources.accelerators");
        let e = check_feasible(&spec("resources: {use_spot: true}"), &offerings()).unwrap_err();
        assert_eq!(e.path, "resources.use_spot");
        check_feasible(&spec("run: x"), &offerings()).unwrap();
    }

    #[test]
    fn idle_nodes_are_reused_and_never_over_committed() {
        let mut s = State::default();
        let y = "resources: {accelerators: H100:4}";
        let Outcome::Job { job_id: j1, .. } = s.apply(&Command::SubmitJob {
            spec: spec(y),
            idempotency_key: None,
            owner: String::new(),
            at_ms: 0,
        }) else {
            panic!()
        };
        let mut off = offerings();
        off.retain(|o| o.instance_type == "h100-8" && o.region == "us-east");
        off[0].resources.accelerators.insert("H100".into(), 4.0);
        let p = plan(&s, &off, Policy::default(), 1);
        for c in &p {
            s.apply(c);
        }
        s.apply(&Command::NodeUp {
            node_id: "node-1".into(),
            address: "a".into(),
            public_address: String::new(),
            at_ms: 2,
        });
        for c in plan(&s, &off, Policy::default(), 3) {
            assert_eq!(s.apply(&c), Outcome::Applied);
        }
        assert_eq!(s.jobs[&j1].state, JobState::Starting);
        // Two more jobs: the node is full, so both need new nodes; neither lands on node-1.
        for _ in 0..2 {
            s.apply(&Command::SubmitJob {
                spec: spec(y),
                idempotency_key: None,
                owner: String::new(),
                at_ms: 4,
            });
        }
        let p = plan(&s, &off, Policy::default(), 5);
        assert_eq!(p.len(), 2);
        assert!(
            p.iter()
                .all(|c| matches!(c, Command::ProvisionNodes { .. })),
            "{p:?}"
        );
    }

    /// A job on a node that runs jobs as the coordinators' Unix user can
    /// read the cluster's keys: a non-admin's job is never placed there,
    /// neither on an idle node with room nor on a new one.
    #[test]
    fn a_non_admins_job_never_lands_where_jobs_run_as_the_coordinator() {
        let mut off = offerings();
        off.retain(|o| o.instance_type == "cpu-2" || o.instance_type == "cpu-8");
        off[0].runs_as_coordinator_user = true;
        off[1].provider = "aws".into();
        let submit = |s: &mut State, keep_off: bool, at_ms: i64| {
            let mut t = spec("resources: {cpus: 1+}");
            t.keep_off_coordinator_user = keep_off;
            s.apply(&Command::SubmitJob {
                spec: t,
                idempotency_key: None,
                owner: String::new(),
                at_ms,
            });
        };
        let mut s = State::default();
        submit(&mut s, false, 0);
        let first = plan(&s, &off, Policy::default(), 1);
        assert!(
            matches!(&first[..], [Command::ProvisionNodes { offering, .. }] if offering.provider == "local"),
            "{first:?}"
        );
        for c in &first {
            s.apply(c);
        }
        up(&mut s, "node-1", 2);
        for c in plan(&s, &off, Policy::default(), 3) {
            assert_eq!(s.apply(&c), Outcome::Applied);
        }
        // node-1 has a CPU to spare: an admin's job may share it, a
        // non-admin's goes to a machine of its own elsewhere.
        submit(&mut s, true, 4);
        let p = plan(&s, &off, Policy::default(), 5);
        assert!(
            matches!(&p[..], [Command::ProvisionNodes { offering, .. }] if offering.provider == "aws"),
            "{p:?}"
        );
        let mut admin = s.clone();
        submit(&mut admin, false, 4);
        let p = plan(&admin, &off, Policy::default(), 5);
        assert!(
            p.iter().any(
                |c| matches!(c, Command::AssignJob { node_ids, .. } if node_ids == &["node-1"])
            ),
            "{p:?}"
        );
        // With nothing but such offerings, it is not placed at all.
        off.truncate(1);
        assert!(place(
            &s,
            &s.jobs.values().next_back().unwrap().spec,
            &off,
            &Round::default(),
            6
        )
        .is_none());
    }

    #[test]
    fn two_jobs_share_a_node_only_when_both_fit() {
        let mut s = State::default();
        let y = "resources: {accelerators: H100:0.5}";
        for _ in 0..3 {
            s.apply(&Command::SubmitJob {
                spec: spec(y),
                idempotency_key: None,
                owner: String::new(),
                at_ms: 0,
            });
        }
        let mut off = offerings();
        off.retain(|o| o.instance_type == "h100-8" && o.region == "us-east");
        off[0].resources.accelerators.insert("H100".into(), 1.0);
        s.apply(&Command::ProvisionNodes {
            job_id: 1,
            offering: off[0].clone(),
            count: 1,
            spot: false,
            at_ms: 1,
        });
        s.apply(&Command::NodeUp {
            node_id: "node-1".into(),
            address: "a".into(),
            public_address: String::new(),
            at_ms: 2,
        });
        let p = plan(&s, &off, Policy::default(), 3);
        let assigned: Vec<_> = p
            .iter()
            .filter(|c| matches!(c, Command::AssignJob { .. }))
            .collect();
        assert_eq!(assigned.len(), 2, "{p:?}");
        for c in &p {
            assert!(!matches!(s.apply(c), Outcome::Rejected(_)));
        }
        assert!(s.free_on("node-1").accelerators["H100"].abs() < 1e-9);
    }

    #[test]
    fn max_nodes_caps_provisioning() {
        let mut s = State::default();
        for _ in 0..3 {
            s.apply(&Command::SubmitJob {
                spec: spec("run: x"),
                idempotency_key: None,
                owner: String::new(),
                at_ms: 0,
            });
        }
        let p = plan(
            &s,
            &offerings(),
            Policy {
                max_nodes: 2,
                ..Policy::default()
            },
            1,
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(plan(
            &s,
            &offerings(),
            Policy {
                max_nodes: 0,
                ..Policy::default()
            },
            1
        )
        .is_empty());
    }

    // ---- managed jobs -------------------------------------------------

    fn managed(yaml: &str) -> State {
        let mut t = spec(yaml);
        t.managed = true;
        let mut s = State::default();
        s.apply(&Command::SubmitJob {
            spec: t,
            idempotency_key: None,
            owner: String::new(),
            at_ms: 0,
        });
        s
    }

    fn up(s: &mut State, node: &str, at_ms: i64) {
        let out = s.apply(&Command::NodeUp {
            node_id: node.into(),
            address: "10.0.0.1".into(),
            public_address: String::new(),
            at_ms,
        });
        assert_eq!(out, Outcome::Applied, "{out:?}");
    }

    /// Plans and applies everything, returning the commands.
    fn step(s: &mut State, now: i64) -> Vec<Command> {
        let p = plan(s, &offerings(), Policy::default(), now);
        for c in &p {
            s.apply(c);
        }
        check_never_two_attempts(s);
        p
    }

    /// The fencing invariant: at most one attempt of a job holds ranks.
    fn check_never_two_attempts(s: &State) {
        for j in s.jobs.values() {
            let holding = j.attempts.iter().filter(|a| a.holds_any()).count();
            assert!(
                holding <= 1,
                "job {} has {holding} attempts holding ranks",
                j.id
            );
        }
    }

    fn start_ranks(s: &mut State, attempt: u32, ranks: u32, at_ms: i64) {
        for rank in 0..ranks {
            s.apply(&Command::RankStarted {
                job_id: 1,
                attempt,
                rank,
                at_ms,
            });
        }
    }

    /// Submitted, provisioned, up and running: returns the first node.
    fn running_managed(yaml: &str) -> (State, Vec<String>) {
        let mut s = managed(yaml);
        let nodes = provision(&mut s, 1);
        for n in &nodes {
            up(&mut s, n, 2);
        }
        step(&mut s, 3);
        assert_eq!(s.jobs[&1].attempts.len(), 1);
        start_ranks(&mut s, 1, nodes.len() as u32, 4);
        assert_eq!(s.jobs[&1].state, JobState::Running);
        (s, nodes)
    }

    fn preempt(node: &str, at_ms: i64) -> Command {
        Command::NodePreempted {
            node_id: node.into(),
            kind: "aws:terminate".into(),
            deadline_ms: at_ms + 120_000,
            at_ms,
        }
    }

    /// `job_recovery: none`: a notice provisions nothing, and the job
    /// fails with its node instead of starting again.
    #[test]
    fn with_job_recovery_none_a_preempted_managed_job_fails() {
        let (mut s, old) = running_managed("resources: {accelerators: H100:8, job_recovery: none}");
        s.apply(&preempt(&old[0], 10));
        assert_eq!(s.jobs[&1].state, JobState::Running);
        assert!(
            !step(&mut s, 11)
                .iter()
                .any(|c| matches!(c, Command::ProvisionNodes { .. })),
            "no replacement"
        );
        s.apply(&Command::RankEnded {
            job_id: 1,
            attempt: 1,
            rank: 0,
            outcome: RankOutcome::Lost("node lost".into()),
            at_ms: 30,
        });
        assert_eq!(s.jobs[&1].state, JobState::Failed);
        step(&mut s, 31);
        assert_eq!(s.jobs[&1].attempts.len(), 1, "not started again");
    }

    /// The notice makes the job RECOVERING while its attempt still runs;
    /// the replacement is provisioned at once, in another region
    /// (EAGER_NEXT_REGION); the new attempt starts only once the old one
    /// has ended, and the recovery uses no error budget.
    #[test]
    fn a_notice_provisions_the_replacement_elsewhere_at_once_and_starts_it_after_the_old_attempt() {
        let (mut s, old) = running_managed("resources: {accelerators: H100:8}");
        assert_eq!(s.nodes[&old[0]].region, "eu-west", "cheapest first");
        s.apply(&preempt(&old[0], 10));
        let job = &s.jobs[&1];
        assert_eq!(job.state, JobState::Recovering);
        assert!(
            job.attempts[0].state == JobState::Running,
            "the old attempt keeps running"
        );
        let p = step(&mut s, 11);
        let [Command::ProvisionNodes { offering, .. }] = p.as_slice() else {
            panic!("{p:?}")
        };
        assert_eq!(
            offering.region, "us-east",
            "the preempted region is avoided"
        );
        let new = s.jobs[&1].reserved_nodes.clone();
        up(&mut s, &new[0], 20);
        assert!(
            !step(&mut s, 21)
                .iter()
                .any(|c| matches!(c, Command::AssignJob { .. })),
            "no new attempt while the old one runs"
        );
        // The old attempt ends (the job was told to checkpoint and exited).
        s.apply(&Command::RankEnded {
            job_id: 1,
            attempt: 1,
            rank: 0,
            outcome: RankOutcome::Exited(143),
            at_ms: 30,
        });
        assert_eq!(s.jobs[&1].state, JobState::Recovering);
        let p = step(&mut s, 31);
        assert!(
            matches!(p.as_slice(), [Command::AssignJob { node_ids, .. }] if *node_ids == new),
            "{p:?}"
        );
        start_ranks(&mut s, 2, 1, 32);
        let job = &s.jobs[&1];
        assert_eq!(job.state, JobState::Running);
        let m = job.managed.as_ref().unwrap();
        assert_eq!((m.recoveries, m.restarts_on_errors), (1, 0));
        let events: Vec<&str> = m.events.iter().map(|e| e.what.as_str()).collect();
        assert!(
            events.iter().any(|e| e.starts_with("preemption notice")),
            "{events:?}"
        );
        assert!(events
            .iter()
            .any(|e| e.starts_with("replacement requested")));
        assert!(events.last().unwrap().starts_with("attempt 2 running"));
        // A node under notice takes no new work.
        assert!(s.nodes[&old[0]].preemption.is_some());
    }

    /// FAILOVER stays in the region when it can; past the deadline the
    /// node is lost and released even if its heartbeats go on.
    #[test]
    fn failover_keeps_the_region_and_a_passed_deadline_loses_the_node() {
        let (mut s, old) =
            running_managed("resources: {accelerators: H100:8, job_recovery: FAILOVER}");
        s.apply(&preempt(&old[0], 10));
        let p = step(&mut s, 11);
        let [Command::ProvisionNodes { offering, .. }] = p.as_slice() else {
            panic!("{p:?}")
        };
        assert_eq!(offering.region, "eu-west");
        let p = step(&mut s, 10 + 120_000);
        assert!(
            matches!(
                p.as_slice(),
                [Command::NodeLost { .. }, Command::TerminateNodes { .. }]
            ),
            "{p:?}"
        );
        assert_eq!(s.nodes[&old[0]].state, NodeState::Terminating);
        let a = &s.jobs[&1].attempts[0];
        assert!(a.state.is_terminal() && !a.holds(0));
        assert_eq!(s.jobs[&1].state, JobState::Recovering);
    }

    /// Errors use max_restarts_on_errors; listed exit codes never do; a
    /// job that exits 0 under a notice has simply finished.
    #[test]
    fn restarts_on_errors_are_bounded_and_recover_on_exit_codes_are_free() {
        let ended = |s: &mut State, attempt: u32, code: i32| {
            s.apply(&Command::RankEnded {
                job_id: 1,
                attempt,
                rank: 0,
                outcome: RankOutcome::Exited(code),
                at_ms: 100 + i64::from(attempt),
            });
        };
        let (mut s, _) = running_managed(
            "resources: {accelerators: H100:8, job_recovery: {max_restarts_on_errors: 1, recover_on_exit_codes: [75]}}",
        );
        ended(&mut s, 1, 75);
        assert_eq!(s.jobs[&1].state, JobState::Recovering);
        step(&mut s, 200); // back on the idle node
        start_ranks(&mut s, 2, 1, 201);
        ended(&mut s, 2, 1);
        assert_eq!(
            s.jobs[&1].state,
            JobState::Recovering,
            "{}",
            s.jobs[&1].message
        );
        assert!(s.jobs[&1].message.contains("restart 1 of 1"));
        step(&mut s, 300);
        start_ranks(&mut s, 3, 1, 301);
        ended(&mut s, 3, 1);
        assert_eq!(s.jobs[&1].state, JobState::Failed);
        assert_eq!(s.jobs[&1].attempts.len(), 3);

        let (mut s, old) = running_managed("resources: {accelerators: H100:8}");
        s.apply(&preempt(&old[0], 10));
        ended(&mut s, 1, 0);
        assert_eq!(s.jobs[&1].state, JobState::Succeeded);
        // Unmanaged jobs are not recovered.
        let mut s = submitted("resources: {accelerators: H100:8}");
        let n = provision(&mut s, 1);
        up(&mut s, &n[0], 2);
        step(&mut s, 3);
        s.apply(&Command::NodeLost {
            node_id: n[0].clone(),
            message: "gone".into(),
            at_ms: 4,
        });
        assert_eq!(s.jobs[&1].state, JobState::Failed);
    }

    /// One node of a gang preempted: the whole gang is recovered together,
    /// and the surviving rank's attempt is over (its agent is told to stop).
    #[test]
    fn a_gang_recovers_together() {
        let (mut s, old) = running_managed(
            "num_nodes: 2\nresources: {accelerators: H100:8, job_recovery: FAILOVER}",
        );
        s.apply(&Command::NodeLost {
            node_id: old[1].clone(),
            message: "heartbeats stopped".into(),
            at_ms: 10,
        });
        let job = &s.jobs[&1];
        assert_eq!(job.state, JobState::Recovering);
        assert!(job.attempts[0].state.is_terminal());
        assert!(
            job.attempts[0].holds(0),
            "rank 0 must still be stopped by its agent"
        );
        // The replacement gang is provisioned but not started while rank 0 holds.
        let p = step(&mut s, 11);
        assert!(
            matches!(p.as_slice(), [Command::ProvisionNodes { count: 2, .. }]),
            "{p:?}"
        );
        for n in s.jobs[&1].reserved_nodes.clone() {
            up(&mut s, &n, 12);
        }
        assert!(!step(&mut s, 13)
            .iter()
            .any(|c| matches!(c, Command::AssignJob { .. })));
        s.apply(&Command::RankEnded {
            job_id: 1,
            attempt: 1,
            rank: 0,
            outcome: RankOutcome::Cancelled,
            at_ms: 14,
        });
        let p = step(&mut s, 15);
        assert!(matches!(p.as_slice(), [Command::AssignJob { .. }]), "{p:?}");
        assert_eq!(s.jobs[&1].managed.as_ref().unwrap().recoveries, 1);
    }

    /// A GPU turning unhealthy (critical XID) ends the managed job's
    /// attempt at once and places the next one on a healthy node.
    #[test]
    fn an_unhealthy_node_moves_a_managed_job_off_it() {
        let (mut s, old) = running_managed("resources: {accelerators: H100:8}");
        s.apply(&Command::NodeUnhealthy {
            node_id: old[0].clone(),
            reason: "GPU 3 reported critical XID 79".into(),
            at_ms: 10,
        });
        let job = &s.jobs[&1];
        assert_eq!(job.state, JobState::Recovering, "{}", job.message);
        assert!(job.attempts[0].state.is_terminal() && job.attempts[0].holds(0));
        // Its rank is stopped (the agent reports it), then a new node is used.
        s.apply(&Command::RankEnded {
            job_id: 1,
            attempt: 1,
            rank: 0,
            outcome: RankOutcome::Cancelled,
            at_ms: 11,
        });
        let p = step(&mut s, 12);
        assert!(
            matches!(p.as_slice(), [Command::ProvisionNodes { .. }]),
            "{p:?}: never the unhealthy node"
        );
        let new = s.jobs[&1].reserved_nodes.clone();
        up(&mut s, &new[0], 13);
        let p = step(&mut s, 14);
        assert!(
            matches!(p.as_slice(), [Command::AssignJob { node_ids, .. }] if *node_ids == new),
            "{p:?}"
        );
    }

    /// The local provider's real machine: one node with all it has.
    fn workstation() -> Vec<Offering> {
        let mut resources = Resources {
            cpus: 31.0,
            memory_gb: 120.0,
            ..Default::default()
        };
        resources.accelerators.insert("H100".into(), 8.0);
        vec![Offering {
            provider: "local".into(),
            region: "host".into(),
            instance_type: "host-8xH100".into(),
            resources,
            hourly_price: 0.0,
            spot_price: None,
            zone: None,
            runs_as_coordinator_user: true,
            simulated: false,
            fixed_machines: Some(1),
            disk_gb_max: None,
            opens_ports: false,
            ports_per_node: false,
            custom_images: false,
            can_stop: false,
        }]
    }

    fn submit(s: &mut State, yaml: &str) {
        s.apply(&Command::SubmitJob {
            spec: spec(yaml),
            idempotency_key: None,
            owner: String::new(),
            at_ms: 0,
        });
    }

    /// A machine that exists takes any job that fits in it, not only jobs
    /// of its exact shape; once it is up, later jobs share it, and a job
    /// that finds it full waits for room rather than launching a second
    /// copy of the same machine or failing.
    #[test]
    fn jobs_share_a_fixed_machine_and_wait_for_room_on_it() {
        let machine = workstation();
        let mut s = State::default();
        submit(&mut s, "resources: {accelerators: H100:4}");
        let p = plan(&s, &machine, Policy::default(), 1);
        let [Command::ProvisionNodes { count: 1, .. }] = p.as_slice() else {
            panic!("{p:?}")
        };
        for c in &p {
            s.apply(c);
        }
        // Before the machine's node is up, a second job does not launch another.
        submit(&mut s, "resources: {accelerators: H100:4}");
        submit(&mut s, "resources: {cpus: 2}");
        submit(&mut s, "resources: {accelerators: H100:1}");
        assert!(plan(&s, &machine, Policy::default(), 2)
            .iter()
            .all(|c| !matches!(c, Command::ProvisionNodes { .. })));
        up(&mut s, "node-1", 3);
        let mut placed = Vec::new();
        for c in plan(&s, &machine, Policy::default(), 4) {
            match &c {
                Command::AssignJob {
                    job_id, node_ids, ..
                } => {
                    assert_eq!(node_ids, &vec!["node-1".to_string()]);
                    placed.push(*job_id);
                }
                other => panic!("only assignments, got {other:?}"),
            }
            s.apply(&c);
        }
        // H100:4 + H100:4 + the CPU job fit; H100:1 finds no GPU left and waits.
        assert_eq!(placed.len(), 3, "{placed:?}");
        let waiting = s
            .jobs
            .values()
            .find(|j| !placed.contains(&j.id) && j.state == JobState::Pending);
        assert!(waiting.is_some(), "{:?}", s.jobs);
        assert!(plan(&s, &machine, Policy::default(), 5).is_empty());
    }

    #[test]
    fn a_job_wider_than_the_fixed_machines_is_refused_at_submit() {
        let t = spec("resources: {accelerators: H100:1}\nnum_nodes: 2");
        assert!(check_feasible(&t, &workstation()).is_err());
        let t = spec("resources: {accelerators: H100:16}");
        assert!(check_feasible(&t, &workstation()).is_err());
        let t = spec("resources: {accelerators: H100:8, cpus: 16, memory: 64}");
        assert!(check_feasible(&t, &workstation()).is_ok());
    }
}
