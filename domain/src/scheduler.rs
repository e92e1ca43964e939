//! Placement: a pure function from (state, offerings, now) to the commands
//! the leader should propose. `State::apply` re-checks every assignment, so
//! a plan computed on a stale snapshot can be rejected but never double-books.

use std::collections::BTreeMap;

use crate::state::{Command, JobState, NodeState, Offering, Resources, State};
use crate::task::{ResourceCandidate, SpecError, TaskSpec};

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
        /// How many.
        count: u32,
    },
}

/// Whether a candidate's `infra` and `instance_type` admit this place and type.
fn place_matches(c: &ResourceCandidate, provider: &str, region: &str, instance_type: &str) -> bool {
    c.infra.cloud.as_deref().is_none_or(|x| x == provider)
        && c.infra.region.as_deref().is_none_or(|x| x == region)
        && c.instance_type
            .as_deref()
            .is_none_or(|x| x == instance_type)
}

/// Whether an offering can host a candidate: shape, place and price.
pub fn offering_matches(c: &ResourceCandidate, o: &Offering) -> bool {
    if !place_matches(c, &o.provider, &o.region, &o.instance_type) {
        return false;
    }
    if c.use_spot && o.spot_price.is_none() {
        return false;
    }
    let gpus: f64 = o.resources.accelerators.values().sum();
    let has = |name: &str| o.resources.accelerators.get(name).copied().unwrap_or(0.0);
    match &c.accelerator {
        // Like SkyPilot: an instance carries exactly the GPUs asked for (fractions round up).
        Some(a) if has(&a.name) != a.count.ceil() => return false,
        // A CPU task does not take a GPU machine unless its type is named.
        None if c.instance_type.is_none() && gpus > 0.0 => return false,
        _ => {}
    }
    if let Some(q) = &c.cpus {
        if !q.admits(o.resources.cpus) {
            return false;
        }
    }
    if let Some(m) = &c.memory {
        if !m.admits(o.resources.cpus, o.resources.memory_gb) {
            return false;
        }
    }
    if let Some(max) = c.max_hourly_cost {
        if price_of(c, o) > max {
            return false;
        }
    }
    true
}

fn price_of(c: &ResourceCandidate, o: &Offering) -> f64 {
    if c.use_spot {
        o.spot_price.unwrap_or(o.hourly_price)
    } else {
        o.hourly_price
    }
}

/// Whether an existing node can take one rank of a candidate.
fn node_matches(c: &ResourceCandidate, node: &crate::state::Node) -> bool {
    place_matches(c, &node.provider, &node.region, &node.instance_type)
        && c.max_hourly_cost.is_none_or(|max| node.hourly_price <= max)
}

/// The cheapest offering for each candidate, in the order the task prefers.
pub fn ranked_offerings(spec: &TaskSpec, offerings: &[Offering]) -> Vec<(usize, Offering)> {
    let mut out: Vec<(usize, Offering)> = Vec::new();
    for (i, c) in spec.resources.candidates.iter().enumerate() {
        let best = offerings
            .iter()
            .filter(|o| offering_matches(c, o))
            .min_by(|a, b| {
                cost_key(c, a)
                    .partial_cmp(&cost_key(c, b))
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
        if let Some(o) = best {
            out.push((i, o.clone()));
        }
    }
    if !spec.resources.ordered {
        out.sort_by(|(ia, a), (ib, b)| {
            let ka = cost_key(&spec.resources.candidates[*ia], a);
            let kb = cost_key(&spec.resources.candidates[*ib], b);
            ka.partial_cmp(&kb)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(ia.cmp(ib))
        });
    }
    out
}

/// Price first; among equal prices the smallest machine.
fn cost_key(c: &ResourceCandidate, o: &Offering) -> (f64, f64, f64, f64) {
    (
        price_of(c, o),
        o.resources.accelerators.values().sum(),
        o.resources.cpus,
        o.resources.memory_gb,
    )
}

/// Checks that some offering could ever host the task, naming the field
/// that rules everything out.
pub fn check_feasible(spec: &TaskSpec, offerings: &[Offering]) -> Result<(), SpecError> {
    if !ranked_offerings(spec, offerings).is_empty() {
        return Ok(());
    }
    let c = &spec.resources.candidates[0];
    let providers: std::collections::BTreeSet<&str> =
        offerings.iter().map(|o| o.provider.as_str()).collect();
    let list = |v: Vec<String>| v.join(", ");
    if let Some(cloud) = &c.infra.cloud {
        if !providers.contains(cloud.as_str()) {
            return Err(SpecError::new(
                "resources.infra",
                format!(
                    "cloud '{cloud}' is not enabled (enabled: {})",
                    list(providers.iter().map(|s| s.to_string()).collect())
                ),
            ));
        }
        if let Some(r) = &c.infra.region {
            if !offerings
                .iter()
                .any(|o| &o.provider == cloud && &o.region == r)
            {
                let mut regions: Vec<String> = offerings
                    .iter()
                    .filter(|o| &o.provider == cloud)
                    .map(|o| o.region.clone())
                    .collect();
                regions.dedup();
                return Err(SpecError::new(
                    "resources.infra",
                    format!("{cloud} has no region '{r}' (regions: {})", list(regions)),
                ));
            }
        }
    }
    if c.use_spot && offerings.iter().all(|o| o.spot_price.is_none()) {
        return Err(SpecError::new(
            "resources.use_spot",
            "no enabled provider offers spot capacity",
        ));
    }
    if let Some(a) = &c.accelerator {
        let mut names: Vec<String> = offerings
            .iter()
            .flat_map(|o| o.resources.accelerators.keys().cloned())
            .collect();
        names.sort();
        names.dedup();
        if !names.contains(&a.name) {
            return Err(SpecError::new(
                "resources.accelerators",
                format!(
                    "no enabled provider offers '{}' (offered: {})",
                    a.name,
                    list(names)
                ),
            ));
        }
        return Err(SpecError::new(
            "resources.accelerators",
            format!("no instance offers {a} with the requested cpus, memory, place and price"),
        ));
    }
    if let Some(t) = &c.instance_type {
        if !offerings.iter().any(|o| &o.instance_type == t) {
            return Err(SpecError::new(
                "resources.instance_type",
                format!("no enabled provider has instance type '{t}'"),
            ));
        }
    }
    Err(SpecError::new(
        "resources",
        "no instance of any enabled provider satisfies these resources",
    ))
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
/// new ones.
pub fn place(
    state: &State,
    spec: &TaskSpec,
    offerings: &[Offering],
    round: &Round,
) -> Option<Placement> {
    for i in 0..spec.resources.candidates.len() {
        if let Some(nodes) = existing_nodes(state, spec, i, round) {
            return Some(Placement::Existing {
                candidate: i,
                node_ids: nodes,
            });
        }
        if spec.resources.ordered {
            if let Some((_, o)) = ranked_offerings(spec, offerings)
                .into_iter()
                .find(|(c, _)| *c == i)
            {
                return Some(Placement::Provision {
                    candidate: i,
                    offering: o,
                    count: spec.num_nodes,
                });
            }
        }
    }
    ranked_offerings(spec, offerings)
        .into_iter()
        .next()
        .map(|(candidate, offering)| Placement::Provision {
            candidate,
            offering,
            count: spec.num_nodes,
        })
}

fn existing_nodes(
    state: &State,
    spec: &TaskSpec,
    candidate: usize,
    round: &Round,
) -> Option<Vec<String>> {
    let c = &spec.resources.candidates[candidate];
    let mut chosen = Vec::new();
    for node in state.nodes.values() {
        let reserved = state.reserved_by(&node.id).is_some() && !round.released.contains(&node.id);
        let usable = node.state == NodeState::Ready && node.unhealthy.is_none();
        if !usable || !node_matches(c, node) || reserved {
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
        };
        let shape_ok = match &c.accelerator {
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
}

impl Default for Policy {
    fn default() -> Self {
        Self { max_nodes: 64 }
    }
}

/// The commands that move waiting jobs forward: assignments onto nodes with
/// room, and provisioning intents where nothing fits. Oldest job first.
pub fn plan(state: &State, offerings: &[Offering], policy: Policy, now_ms: i64) -> Vec<Command> {
    let mut out = Vec::new();
    let mut round = Round::default();
    let mut live_nodes = state.nodes.values().filter(|n| !n.state.is_final()).count() as u64;
    // Jobs whose provisioned nodes are up come first: those nodes are theirs.
    for job in state
        .placed_jobs()
        .filter(|j| j.state == JobState::Provisioning)
    {
        let ready = !job.reserved_nodes.is_empty()
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
        let offerings = if room { offerings } else { &[] };
        match place(state, &job.spec, offerings, &round) {
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
                offering, count, ..
            }) => {
                if live_nodes + u64::from(count) > u64::from(policy.max_nodes) {
                    continue;
                }
                live_nodes += u64::from(count);
                out.push(Command::ProvisionNodes {
                    job_id: job.id,
                    offering,
                    count,
                    at_ms: now_ms,
                });
            }
            None => {}
        }
    }
    out
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
    use crate::state::Outcome;
    use crate::task::parse_task_yaml;

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
        let r = ranked_offerings(&t, &offerings());
        assert_eq!(r[0].1.instance_type, "h100-8");
        let t = spec("resources: {accelerators: {H100: 8, A100: 8}}");
        assert_eq!(
            ranked_offerings(&t, &offerings())[0].1.instance_type,
            "a100-8"
        );
    }

    #[test]
    fn pinned_region_and_cpu_constraints_are_honoured() {
        let t = spec("resources: {accelerators: H100:8, infra: local/us-east}");
        assert_eq!(ranked_offerings(&t, &offerings())[0].1.region, "us-east");
        let t = spec("resources: {cpus: 4+}");
        assert_eq!(
            ranked_offerings(&t, &offerings())[0].1.instance_type,
            "cpu-8"
        );
        let t = spec("resources: {max_hourly_cost: 20, accelerators: H100:8}");
        assert!(ranked_offerings(&t, &offerings()).is_empty());
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

    #[test]
    fn two_jobs_share_a_node_only_when_both_fit() {
        let mut s = State::default();
        let y = "resources: {accelerators: H100:0.5}";
        for _ in 0..3 {
            s.apply(&Command::SubmitJob {
                spec: spec(y),
                idempotency_key: None,
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
            at_ms: 1,
        });
        s.apply(&Command::NodeUp {
            node_id: "node-1".into(),
            address: "a".into(),
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
                at_ms: 0,
            });
        }
        let p = plan(&s, &offerings(), Policy { max_nodes: 2 }, 1);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(plan(&s, &offerings(), Policy { max_nodes: 0 }, 1).is_empty());
    }
}
