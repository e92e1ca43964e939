//! Nodes: their model, what providers offer, where launches failed, and the
//! commands of the node family (provision, launched, launch failed, up,
//! lost, unhealthy, terminate, terminated).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{conflict, end_job, recover, JobId, JobState, Notice, Outcome, Rejection, State};

/// Resources of a node, or what a job needs on one.
// Undocumented fields are named for what they hold.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Resources {
    /// Canonical accelerator model (`H100`) -> count; fractions share a GPU.
    pub accelerators: BTreeMap<String, f64>,
    /// vCPUs.
    pub cpus: f64,
    pub memory_gb: f64,
}

impl Resources {
    /// Whether `need` fits in `self`.
    pub fn fits(&self, need: &Resources) -> bool {
        const EPS: f64 = 1e-9;
        need.accelerators
            .iter()
            .all(|(k, n)| self.accelerators.get(k).copied().unwrap_or(0.0) + EPS >= *n)
            && self.cpus + EPS >= need.cpus
            && self.memory_gb + EPS >= need.memory_gb
    }

    /// `self + other`, element-wise.
    pub fn plus(&self, other: &Resources) -> Resources {
        let mut out = self.clone();
        for (k, n) in &other.accelerators {
            *out.accelerators.entry(k.clone()).or_insert(0.0) += n;
        }
        out.cpus += other.cpus;
        out.memory_gb += other.memory_gb;
        out
    }

    /// `self - other`, element-wise.
    pub fn minus(&self, other: &Resources) -> Resources {
        let mut out = self.clone();
        for (k, n) in &other.accelerators {
            *out.accelerators.entry(k.clone()).or_insert(0.0) -= n;
        }
        out.cpus -= other.cpus;
        out.memory_gb -= other.memory_gb;
        out
    }
}

/// Life of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Asked of a provider; its agent has not enrolled yet.
    Provisioning,
    /// Its agent is connected (or within its heartbeat TTL).
    Ready,
    /// Heartbeats stopped past the TTL.
    Lost,
    /// `down` asked for it to go.
    Terminating,
    /// The provider confirmed it is gone.
    Terminated,
    /// The provider could not launch it.
    Failed,
    /// Its cluster is stopping: the provider is asked to stop it (disk kept).
    Stopping,
    /// Stopped (disk kept, not billed).
    Stopped,
    /// Its cluster is starting: the provider is asked to start it, and its
    /// agent comes back with its identity.
    Starting,
}

impl NodeState {
    /// Gone for good.
    pub fn is_final(self) -> bool {
        matches!(self, NodeState::Terminated | NodeState::Failed)
    }
}

/// A machine with an agent.
// Undocumented fields are named for what they hold.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// `node-N`.
    pub id: String,
    pub state: NodeState,
    /// Provider that launched it, or
    /// [`MANUAL_PROVIDER`](super::MANUAL_PROVIDER) for a node that joined
    /// with an admin's join token (its region too).
    pub provider: String,
    pub region: String,
    /// Provider instance type; a manual node's host name.
    pub instance_type: String,
    pub resources: Resources,
    /// Price per hour of the capacity it runs on (spot or on demand); 0 for
    /// a manual node.
    pub hourly_price: f64,
    /// Address the agent reported (used for `*_NODE_IPS`).
    pub address: String,
    /// The provider's id for it, once launched.
    pub instance_id: Option<String>,
    /// When it was asked of a provider, or enrolled as a manual node.
    pub created_at_ms: i64,
    /// Why it is in its state.
    pub message: String,
    /// Why it takes no new work, if a GPU made it unhealthy.
    #[serde(default)]
    pub unhealthy: Option<String>,
    /// Zone, where the provider has zones.
    #[serde(default)]
    pub zone: Option<String>,
    /// Spot (preemptible) capacity, billed at the spot price.
    #[serde(default)]
    pub spot: bool,
    /// When the provider reported it launched: billing starts.
    #[serde(default)]
    pub launched_at_ms: Option<i64>,
    /// When it was terminated or failed: billing stops.
    #[serde(default)]
    pub ended_at_ms: Option<i64>,
    /// The cloud's notice that it is about to go: it takes no new work.
    #[serde(default)]
    pub preemption: Option<Notice>,
    /// SHA-256 (hex) of the public key its agent enrolled with: a node
    /// token admits one enrollment only.
    #[serde(default)]
    pub enrolled_key: Option<String>,
    /// When an admin revoked it: its certificates are refused from then on.
    #[serde(default)]
    pub revoked_at_ms: Option<i64>,
    /// Its GPUs are simulated ([`Offering::simulated`]).
    #[serde(default)]
    pub simulated: bool,
    /// It is one of an offering's fixed machines
    /// ([`Offering::fixed_machines`]): any job that fits may share it.
    #[serde(default)]
    pub fixed_machine: bool,
    /// Its disk, GB, when it was chosen (`disk_size`) or is known.
    #[serde(default)]
    pub disk_gb: Option<u64>,
    /// Its disk's tier, when one was asked for.
    #[serde(default)]
    pub disk_tier: Option<crate::task::DiskTier>,
    /// A job's `ports` are reachable on it ([`Offering::opens_ports`]).
    #[serde(default)]
    pub ports_open: bool,
    /// Where the world reaches it, when that differs from `address` (a
    /// cloud VM's public IP).
    #[serde(default)]
    pub public_address: String,
    /// Only these ports are, where the provider opens them per node at
    /// launch ([`Offering::ports_per_node`]); none: every port.
    #[serde(default)]
    pub opened_ports: Option<Vec<crate::task::PortRange>>,
    /// The VM image it was booted from, when the task named one.
    #[serde(default)]
    pub image_id: Option<String>,
    /// The cluster it belongs to alone; none for a node of no cluster, or
    /// a fixed machine that clusters share.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Its provider can stop it and start it again, keeping its disk.
    #[serde(default)]
    pub stoppable: bool,
    /// Time spent stopped before the current stop, ms: not billed.
    #[serde(default)]
    pub stopped_ms: i64,
    /// When its current stop began.
    #[serde(default)]
    pub stopped_since_ms: Option<i64>,
    /// When it last had a job assigned or a rank end: a node of no cluster
    /// idle long enough is released.
    #[serde(default)]
    pub last_busy_ms: Option<i64>,
}

/// A provider's machine shape in a region, with its price.
// Undocumented fields are named for what they hold.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offering {
    pub provider: String,
    pub region: String,
    pub instance_type: String,
    /// What one instance has.
    pub resources: Resources,
    /// On-demand price per hour.
    pub hourly_price: f64,
    /// Spot price per hour, where spot exists.
    pub spot_price: Option<f64>,
    /// Zone, where the provider prices by zone.
    #[serde(default)]
    pub zone: Option<String>,
    /// Its nodes run jobs as the coordinators' own Unix user (the local
    /// provider), where a job can read the cluster's token and CA key:
    /// only admins' jobs are placed there.
    #[serde(default)]
    pub runs_as_coordinator_user: bool,
    /// Its GPUs do not exist: a local or simulated shape for tests and
    /// demos. Marked wherever it is shown, and its nodes tell jobs so.
    #[serde(default)]
    pub simulated: bool,
    /// Machines that exist rather than instances bought per job (the local
    /// provider's real machine): at most this many nodes at once, each
    /// taking any job that fits in what it has, as a SkyPilot cluster does.
    /// When they are all up, jobs wait for room on them rather than fail.
    #[serde(default)]
    pub fixed_machines: Option<u32>,
    /// The largest disk its nodes can be given, GB (`disk_size`); none: its
    /// disk comes with the shape and cannot be chosen.
    #[serde(default)]
    pub disk_gb_max: Option<u64>,
    /// A job's `ports` are reachable on its nodes.
    #[serde(default)]
    pub opens_ports: bool,
    /// Only the ports asked for at launch are opened, per node (an AWS
    /// security group): a node serves later jobs only within those.
    #[serde(default)]
    pub ports_per_node: bool,
    /// Its nodes can boot a VM image the task names (`image_id`).
    #[serde(default)]
    pub custom_images: bool,
    /// Its on-demand nodes can be stopped and started again, disk kept
    /// (spot ones never: AWS and Azure refuse).
    #[serde(default)]
    pub can_stop: bool,
}

impl Offering {
    /// The price per hour of one instance, on spot or on demand.
    pub fn price(&self, spot: bool) -> f64 {
        if spot {
            self.spot_price.unwrap_or(self.hourly_price)
        } else {
            self.hourly_price
        }
    }

    /// The place this offering is launched in, as the blocked set keys it.
    pub fn place_key(&self, spot: bool) -> String {
        place_key(
            &self.provider,
            &self.region,
            self.zone.as_deref(),
            &self.instance_type,
            spot,
        )
    }
}

/// `provider/region[/zone]/instance_type[/spot]`: what a capacity or quota
/// error rules out for a while. Spot and on-demand capacity are separate
/// pools at every cloud, so they are blocked separately.
pub fn place_key(
    provider: &str,
    region: &str,
    zone: Option<&str>,
    instance_type: &str,
    spot: bool,
) -> String {
    let mut k = String::new();
    place_key_into(&mut k, provider, region, zone, instance_type, spot);
    k
}

/// [`place_key`] into a reused buffer (the optimizer builds one per offering).
pub fn place_key_into(
    k: &mut String,
    provider: &str,
    region: &str,
    zone: Option<&str>,
    instance_type: &str,
    spot: bool,
) {
    k.clear();
    for part in [Some(provider), Some(region), zone, Some(instance_type)]
        .into_iter()
        .flatten()
    {
        if !k.is_empty() {
            k.push('/');
        }
        k.push_str(part);
    }
    if spot {
        k.push_str("/spot");
    }
}

/// Why a provider could not launch a node, as far as placement cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum LaunchFailure {
    /// The place has no capacity now: try the next candidate.
    Capacity,
    /// The account's quota is used up there: try the next candidate.
    Quota,
    /// Anything else (auth, invalid request, retries exhausted): the job fails.
    #[default]
    Other,
}

/// How long a place that answered "no capacity" or "no quota" is skipped.
/// Ten minutes: long enough for a launch to walk every other candidate,
/// short enough that capacity coming back is used the same hour.
pub const BLOCK_COOLDOWN_MS: i64 = 10 * 60 * 1000;

/// A place ruled out until `until_ms`.
// Undocumented fields are named for what they hold.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Block {
    pub until_ms: i64,
    /// What the provider said.
    pub reason: String,
}

/// One provisioning try of a job, as the user sees it in the launch progress.
// Undocumented fields are named for what they hold.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvisionTry {
    /// `provider/region[/zone]/instance_type[/spot]`.
    pub place: String,
    /// Price per node per hour.
    pub hourly_price: f64,
    pub count: u32,
    /// When it was asked for.
    pub at_ms: i64,
    /// How it ended: empty while in flight, `launched`, or the error.
    pub outcome: String,
}

impl State {
    pub(super) fn provision_nodes(
        &mut self,
        job_id: JobId,
        offering: &Offering,
        count: u32,
        spot: bool,
        at_ms: i64,
    ) -> Outcome {
        let Some(job) = self.jobs.get(&job_id) else {
            return Outcome::Rejected(Rejection::NoSuchJob(job_id));
        };
        let recovering = job.state == JobState::Recovering;
        // The disk the nodes get is the one the candidate they are for asks.
        let candidate = job
            .spec
            .resources
            .candidates
            .iter()
            .find(|c| crate::optimizer::offering_matches(c, offering))
            .cloned();
        let disk = candidate.as_ref();
        if !(job.state == JobState::Pending || recovering) || !job.reserved_nodes.is_empty() {
            return conflict(format!("job {job_id} is not waiting for a place"));
        }
        // A cluster's first task provisions its nodes, which are then the
        // cluster's alone.
        let cluster = job.spec.cluster.as_ref().map(|t| t.name.clone());
        if let Some(name) = &cluster {
            match self.clusters.get(name) {
                None => return conflict(format!("cluster {name} is gone")),
                Some(c) if self.cluster_nodes(c).next().is_some() => {
                    return conflict(format!("cluster {name} has its nodes already"))
                }
                Some(_) => {}
            }
        }
        let mut ids = Vec::new();
        for _ in 0..count {
            self.last_node_seq += 1;
            let id = format!("node-{}", self.last_node_seq);
            self.nodes.insert(
                id.clone(),
                Node {
                    id: id.clone(),
                    state: NodeState::Provisioning,
                    provider: offering.provider.clone(),
                    region: offering.region.clone(),
                    instance_type: offering.instance_type.clone(),
                    resources: offering.resources.clone(),
                    hourly_price: offering.price(spot),
                    address: String::new(),
                    public_address: String::new(),
                    instance_id: None,
                    created_at_ms: at_ms,
                    message: String::new(),
                    unhealthy: None,
                    zone: offering.zone.clone(),
                    spot,
                    launched_at_ms: None,
                    ended_at_ms: None,
                    preemption: None,
                    enrolled_key: None,
                    revoked_at_ms: None,
                    simulated: offering.simulated,
                    fixed_machine: offering.fixed_machines.is_some(),
                    disk_gb: match offering.fixed_machines {
                        Some(_) => offering.disk_gb_max,
                        None => disk.and_then(|c| c.disk_size_gb),
                    },
                    disk_tier: disk.and_then(|c| c.disk_tier),
                    ports_open: offering.opens_ports,
                    opened_ports: offering
                        .ports_per_node
                        .then(|| disk.map(|c| c.ports.clone()).unwrap_or_default()),
                    image_id: disk.and_then(|c| c.image_for(&offering.region)),
                    // A fixed machine is shared by every cluster on it.
                    cluster: cluster
                        .clone()
                        .filter(|_| offering.fixed_machines.is_none()),
                    stoppable: offering.can_stop && !spot,
                    stopped_ms: 0,
                    stopped_since_ms: None,
                    last_busy_ms: None,
                },
            );
            ids.push(id);
        }
        if let Some(c) = cluster.as_ref().and_then(|n| self.clusters.get_mut(n)) {
            c.node_ids = ids.clone();
        }
        if let Some(job) = self.jobs.get_mut(&job_id).map(Arc::make_mut) {
            // A recovering job stays RECOVERING: its old attempt may still run.
            if !recovering {
                job.state = JobState::Provisioning;
            }
            job.reserved_nodes = ids.clone();
            let place = offering.place_key(spot);
            job.message = format!(
                "provisioning {count} x {place} at {:.2}/h each",
                offering.price(spot)
            );
            if let Some(m) = job.managed.as_mut() {
                let what = if recovering {
                    "replacement requested"
                } else {
                    "nodes requested"
                };
                m.event(at_ms, format!("{what}: {count} x {place}"));
            }
            job.provision_tries.push(ProvisionTry {
                place,
                hourly_price: offering.price(spot),
                count,
                at_ms,
                outcome: String::new(),
            });
        }
        Outcome::Nodes(ids)
    }

    pub(super) fn node_launched(
        &mut self,
        node_id: &str,
        instance_id: &str,
        at_ms: i64,
    ) -> Outcome {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return Outcome::Rejected(Rejection::NoSuchNode(node_id.to_string()));
        };
        node.instance_id = Some(instance_id.to_string());
        node.launched_at_ms.get_or_insert(at_ms);
        Outcome::Applied
    }

    pub(super) fn node_launch_failed(
        &mut self,
        node_id: &str,
        message: &str,
        failure: LaunchFailure,
        at_ms: i64,
    ) -> Outcome {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return Outcome::Rejected(Rejection::NoSuchNode(node_id.to_string()));
        };
        if node.state.is_final() {
            return Outcome::Applied;
        }
        node.state = NodeState::Failed;
        node.message = message.to_string();
        node.ended_at_ms = Some(at_ms);
        let place = place_key(
            &node.provider,
            &node.region,
            node.zone.as_deref(),
            &node.instance_type,
            node.spot,
        );
        let managed = self
            .reserved_by(node_id)
            .and_then(|j| self.jobs.get(&j))
            .is_some_and(|j| j.managed.is_some());
        // A managed job never gives up on a launch failure: the place
        // is blocked and the job moves on (SkyPilot retries forever).
        let next_candidate = failure != LaunchFailure::Other || managed;
        if next_candidate {
            self.blocked.retain(|_, b| b.until_ms > at_ms);
            self.blocked.insert(
                place.clone(),
                Block {
                    until_ms: at_ms + BLOCK_COOLDOWN_MS,
                    reason: message.to_string(),
                },
            );
        }
        let Some(job_id) = self.reserved_by(node_id) else {
            return Outcome::Applied;
        };
        let Some(job) = self.jobs.get_mut(&job_id).map(Arc::make_mut) else {
            return Outcome::Applied;
        };
        if let Some(t) = job.provision_tries.last_mut().filter(|t| t.place == place) {
            t.outcome = message.to_string();
        }
        if !next_candidate {
            let msg = format!("provisioning {node_id} failed: {message}");
            end_job(job, JobState::Failed, None, &msg, at_ms);
            return Outcome::Applied;
        }
        // Gang placement: the job moves on as a whole, so the rest of
        // its nodes in the blocked place are let go (not paid for idle).
        let others: Vec<String> = std::mem::take(&mut job.reserved_nodes)
            .into_iter()
            .filter(|n| n != node_id)
            .collect();
        if job.state != JobState::Recovering {
            job.state = JobState::Pending;
        }
        job.message = format!("{place}: {message}; trying the next candidate");
        for other in others {
            if let Some(n) = self.nodes.get_mut(&other).filter(|n| !n.state.is_final()) {
                n.state = NodeState::Terminating;
                n.message = format!("released: {place} was blocked");
            }
        }
        Outcome::Applied
    }

    pub(super) fn node_up(&mut self, node_id: &str, address: &str, public: &str) -> Outcome {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return Outcome::Rejected(Rejection::NoSuchNode(node_id.to_string()));
        };
        match node.state {
            NodeState::Provisioning | NodeState::Lost | NodeState::Ready | NodeState::Starting => {
                node.state = NodeState::Ready;
                node.address = address.to_string();
                node.public_address = public.to_string();
                node.message.clear();
                Outcome::Applied
            }
            s => conflict(format!("node {node_id} is {s:?}")),
        }
    }

    pub(super) fn node_lost(&mut self, node_id: &str, message: &str, at_ms: i64) -> Outcome {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return Outcome::Rejected(Rejection::NoSuchNode(node_id.to_string()));
        };
        if node.state != NodeState::Ready {
            return conflict(format!("node {node_id} is not ready"));
        }
        node.state = NodeState::Lost;
        node.message = message.to_string();
        let msg = format!("node {node_id} lost: {message}");
        self.fail_ranks_on(node_id, &msg, at_ms);
        Outcome::Applied
    }

    pub(super) fn node_unhealthy(&mut self, node_id: &str, reason: &str, at_ms: i64) -> Outcome {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return Outcome::Rejected(Rejection::NoSuchNode(node_id.to_string()));
        };
        if node.state.is_final() {
            return conflict(format!("node {node_id} is {:?}", node.state));
        }
        if node.unhealthy.is_some() {
            return Outcome::Applied;
        }
        node.unhealthy = Some(reason.to_string());
        // Managed jobs leave a broken GPU at once: the attempt ends
        // (its ranks are stopped, checkpointing on the way out) and
        // a new one is placed on a healthy node.
        for job_id in self.jobs_on(node_id) {
            let Some(job) = self.jobs.get_mut(&job_id).map(Arc::make_mut) else {
                continue;
            };
            let running = job.attempts.last().is_some_and(|a| !a.state.is_terminal());
            if let Some(m) = job.managed.as_mut().filter(|_| running) {
                m.recoveries += 1;
                recover(
                    job,
                    &format!("node {node_id} unhealthy: {reason}; recovering"),
                    at_ms,
                );
            }
        }
        Outcome::Applied
    }

    pub(super) fn terminate_nodes(&mut self, node_ids: &[String], at_ms: i64) -> Outcome {
        for id in node_ids {
            if !self.nodes.contains_key(id) {
                return Outcome::Rejected(Rejection::NoSuchNode(id.clone()));
            }
        }
        for id in node_ids {
            if let Some(n) = self.nodes.get_mut(id) {
                if n.state.is_final() {
                    continue;
                }
                n.state = NodeState::Terminating;
                n.message = "released by down".into();
            }
            let msg = format!("node {id} released by down");
            for job_id in self.jobs_on(id) {
                if let Some(job) = self.jobs.get_mut(&job_id).map(Arc::make_mut) {
                    if !job.state.is_terminal() {
                        end_job(job, JobState::Cancelled, None, &msg, at_ms);
                    }
                }
            }
            if let Some(job_id) = self.reserved_by(id) {
                if let Some(job) = self.jobs.get_mut(&job_id).map(Arc::make_mut) {
                    end_job(job, JobState::Cancelled, None, &msg, at_ms);
                }
            }
        }
        Outcome::Applied
    }

    pub(super) fn node_terminated(&mut self, node_id: &str, at_ms: i64) -> Outcome {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return Outcome::Rejected(Rejection::NoSuchNode(node_id.to_string()));
        };
        node.state = NodeState::Terminated;
        node.ended_at_ms.get_or_insert(at_ms);
        if let Some(since) = node.stopped_since_ms.take() {
            node.stopped_ms += (at_ms - since).max(0);
        }
        let msg = format!("node {node_id} terminated");
        self.fail_ranks_on(node_id, &msg, at_ms);
        Outcome::Applied
    }
}
