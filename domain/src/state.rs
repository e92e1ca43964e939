//! The replicated state machine: cluster state, the commands that change it,
//! and [`State::apply`].
//!
//! Determinism rules (as Nomad's FSM): apply reads no clock and no randomness.
//! Every timestamp comes inside the command; ids are either carried in the
//! command or drawn from counters kept in the state. Rejections are outcomes,
//! never panics, so a bad command cannot stop the log.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::task::{RecoveryStrategy, TaskSpec};

/// Job id: a counter, shown as a decimal string.
pub type JobId = u64;

/// Resources of a node, or what a job needs on one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Resources {
    /// Accelerator model -> count.
    pub accelerators: BTreeMap<String, f64>,
    /// vCPUs.
    pub cpus: f64,
    /// GB.
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

/// Life of a job, as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Waiting for a place.
    Pending,
    /// Nodes are being provisioned for it.
    Provisioning,
    /// Assigned; the agents are starting it.
    Starting,
    /// Every rank has started.
    Running,
    /// Being moved to new nodes (managed jobs).
    Recovering,
    /// Every rank exited 0.
    Succeeded,
    /// A rank failed, or its node was lost.
    Failed,
    /// `setup` failed on a rank.
    FailedSetup,
    /// Cancelled by a user or by `down`.
    Cancelled,
}

impl JobState {
    /// No further transitions.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::FailedSetup | JobState::Cancelled
        )
    }
}

/// How one rank of an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RankOutcome {
    /// `run` exited (0 = success).
    Exited(i32),
    /// `setup` exited non-zero.
    SetupFailed(i32),
    /// The agent could not start it.
    FailedToStart(String),
    /// Stopped on request.
    Cancelled,
    /// Its process or node vanished.
    Lost(String),
}

/// Progress of one rank of an attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RankStatus {
    /// The agent reported it started.
    pub started: bool,
    /// How it ended, once it has.
    pub outcome: Option<RankOutcome>,
}

/// One try at running a job on a set of nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based.
    pub number: u32,
    /// Rank order.
    pub node_ids: Vec<String>,
    /// Index of the resource candidate it was placed by.
    pub candidate: usize,
    /// What it needs on each node.
    pub demand: Resources,
    /// One per rank.
    pub ranks: Vec<RankStatus>,
    /// This attempt's own state.
    pub state: JobState,
    /// When it was assigned.
    pub assigned_at_ms: i64,
    /// When every rank had started.
    pub started_at_ms: Option<i64>,
    /// When it ended.
    pub ended_at_ms: Option<i64>,
    /// Exit code that decided its end.
    pub exit_code: Option<i32>,
    /// Why it ended, if not plain success.
    pub message: String,
}

impl Attempt {
    /// Ranks still holding resources on their nodes.
    pub fn holds(&self, rank: usize) -> bool {
        self.ranks.get(rank).is_some_and(|r| r.outcome.is_none())
    }

    /// Some rank still holds resources: the attempt is not over on its nodes.
    pub fn holds_any(&self) -> bool {
        (0..self.ranks.len()).any(|r| self.holds(r))
    }
}

/// A submitted task and its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Id.
    pub id: JobId,
    /// The normalised task (with secrets: state is internal).
    pub spec: TaskSpec,
    /// Current state.
    pub state: JobState,
    /// Client-chosen key for safe retries.
    pub idempotency_key: Option<String>,
    /// The user who submitted it (`root`: the cluster's own token).
    #[serde(default)]
    pub owner: String,
    /// Submission time.
    pub submitted_at_ms: i64,
    /// When it first ran.
    pub started_at_ms: Option<i64>,
    /// When it reached a terminal state.
    pub ended_at_ms: Option<i64>,
    /// Exit code once ended.
    pub exit_code: Option<i32>,
    /// Why it is in its state.
    pub message: String,
    /// Tries, oldest first.
    pub attempts: Vec<Attempt>,
    /// Nodes provisioned for this job and not yet assigned.
    pub reserved_nodes: Vec<String>,
    /// Every place provisioning was tried, oldest first.
    #[serde(default)]
    pub provision_tries: Vec<ProvisionTry>,
    /// Recovery bookkeeping of a managed job.
    #[serde(default)]
    pub managed: Option<Managed>,
}

/// What the coordinators track to recover a managed job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Managed {
    /// Restarts after errors so far (bounded by `max_restarts_on_errors`).
    pub restarts_on_errors: u32,
    /// Recoveries from preemption or node loss so far (unbounded).
    pub recoveries: u32,
    /// Regions this job stays out of for a while after a preemption there
    /// (EAGER_NEXT_REGION).
    pub avoid: Vec<Avoid>,
    /// The preemption notice the current attempt is running under.
    pub notice: Option<Notice>,
    /// What happened, oldest first (the newest [`MAX_EVENTS`]).
    pub events: Vec<JobEvent>,
}

/// Most events kept per managed job.
pub const MAX_EVENTS: usize = 64;

/// A region a managed job avoids until a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Avoid {
    /// Provider.
    pub provider: String,
    /// Region.
    pub region: String,
    /// Until then.
    pub until_ms: i64,
}

/// A cloud's warning that a node is about to go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    /// The node.
    pub node_id: String,
    /// What the cloud said (`aws:terminate`, `gcp:preempted`, `azure:Preempt`).
    pub kind: String,
    /// When the node goes.
    pub deadline_ms: i64,
    /// When the coordinators learnt of it.
    pub at_ms: i64,
}

/// One line of a managed job's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// When.
    pub at_ms: i64,
    /// What, in prose.
    pub what: String,
}

impl Managed {
    fn event(&mut self, at_ms: i64, what: String) {
        if self.events.len() >= MAX_EVENTS {
            self.events.remove(0);
        }
        self.events.push(JobEvent { at_ms, what });
    }

    /// The (provider, region) pairs avoided at `now_ms`.
    pub fn avoided(&self, now_ms: i64) -> impl Iterator<Item = &Avoid> + '_ {
        self.avoid.iter().filter(move |a| a.until_ms > now_ms)
    }
}

impl Job {
    /// The newest attempt.
    pub fn current_attempt(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    /// The attempt still holding ranks on its nodes, if any (at most one:
    /// a new attempt is only assigned once the old one has let go).
    pub fn attempt_holding_ranks(&self) -> Option<&Attempt> {
        self.attempts.iter().find(|a| a.holds_any())
    }

    /// Display name.
    pub fn name(&self) -> &str {
        self.spec.name.as_deref().unwrap_or("")
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
    /// Gone.
    Terminated,
    /// The provider could not launch it.
    Failed,
}

impl NodeState {
    /// Gone for good.
    pub fn is_final(self) -> bool {
        matches!(self, NodeState::Terminated | NodeState::Failed)
    }
}

/// A machine with an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// `node-N`.
    pub id: String,
    /// Current state.
    pub state: NodeState,
    /// Provider that owns it.
    pub provider: String,
    /// Provider region.
    pub region: String,
    /// Provider instance type.
    pub instance_type: String,
    /// What it has.
    pub resources: Resources,
    /// Price per hour.
    pub hourly_price: f64,
    /// Address the agent reported (used for `*_NODE_IPS`).
    pub address: String,
    /// The provider's id for it, once launched.
    pub instance_id: Option<String>,
    /// Creation time.
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
}

/// Provider name of nodes that joined on their own with an admin's join
/// token (`nembo-agent --join-token-file`): machines Nembo did not launch
/// and cannot stop; `down` only forgets them.
pub const MANUAL_PROVIDER: &str = "manual";

/// How an agent proved it may enroll.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Enrollment {
    /// The token the coordinator made for a node it launched (checked by
    /// the coordinator; one enrollment per node).
    NodeToken,
    /// An admin's join token (its secret checked by the coordinator).
    JoinToken {
        /// Token id.
        id: String,
    },
}

/// A provider's machine shape in a region, with its price.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offering {
    /// Provider name.
    pub provider: String,
    /// Region.
    pub region: String,
    /// Instance type name.
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Block {
    /// Skipped until then.
    pub until_ms: i64,
    /// What the provider said.
    pub reason: String,
}

/// One provisioning try of a job, as the user sees it in the launch progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvisionTry {
    /// `provider/region[/zone]/instance_type[/spot]`.
    pub place: String,
    /// Price per node per hour.
    pub hourly_price: f64,
    /// How many nodes.
    pub count: u32,
    /// When it was asked for.
    pub at_ms: i64,
    /// How it ended: empty while in flight, `launched`, or the error.
    pub outcome: String,
}

/// A state change. Each carries its own time (`at_ms`, Unix ms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// A new job, PENDING.
    SubmitJob {
        /// The validated task.
        spec: TaskSpec,
        /// Same key, same job.
        idempotency_key: Option<String>,
        /// Who submits it.
        #[serde(default)]
        owner: String,
        /// Time.
        at_ms: i64,
    },
    /// Cancel a job; its ranks are stopped by their agents.
    CancelJob {
        /// Job.
        job_id: JobId,
        /// Time.
        at_ms: i64,
    },
    /// Record the intent to provision nodes for a job (before the provider call).
    ProvisionNodes {
        /// Job the nodes are for.
        job_id: JobId,
        /// Shape and place.
        offering: Offering,
        /// How many.
        count: u32,
        /// On spot capacity.
        #[serde(default)]
        spot: bool,
        /// Time.
        at_ms: i64,
    },
    /// The provider launched a node.
    NodeLaunched {
        /// Node.
        node_id: String,
        /// Provider's id.
        instance_id: String,
        /// Time.
        at_ms: i64,
    },
    /// The provider could not launch a node.
    NodeLaunchFailed {
        /// Node.
        node_id: String,
        /// Why.
        message: String,
        /// What kind of failure: capacity and quota send the job on to
        /// its next candidate, anything else fails it.
        #[serde(default)]
        failure: LaunchFailure,
        /// Time.
        at_ms: i64,
    },
    /// Every place that could host a pending job is blocked: it fails with
    /// the list (the scheduler proposes this; apply re-checks nothing but
    /// that the job still waits).
    JobUnplaceable {
        /// Job.
        job_id: JobId,
        /// Why, naming the blocked places.
        message: String,
        /// Time.
        at_ms: i64,
    },
    /// A node's agent enrolled (or came back).
    NodeUp {
        /// Node.
        node_id: String,
        /// Its address.
        address: String,
        /// Time.
        at_ms: i64,
    },
    /// A node's heartbeats stopped past the TTL.
    NodeLost {
        /// Node.
        node_id: String,
        /// Why.
        message: String,
        /// Time.
        at_ms: i64,
    },
    /// The node's cloud announced it will reclaim the node (the agent read
    /// the notice): it takes no new work, and the managed jobs on it start
    /// recovering at once, while it still runs.
    NodePreempted {
        /// Node.
        node_id: String,
        /// What the cloud said.
        kind: String,
        /// When the node goes.
        deadline_ms: i64,
        /// Time.
        at_ms: i64,
    },
    /// A GPU of the node failed (critical XID, uncorrectable ECC, off the
    /// bus): it takes no new work. Running jobs are left to their owners.
    NodeUnhealthy {
        /// Node.
        node_id: String,
        /// Why, for `nembo status`.
        reason: String,
        /// Time.
        at_ms: i64,
    },
    /// Place a job on nodes (rank order); starts a new attempt.
    AssignJob {
        /// Job.
        job_id: JobId,
        /// Nodes, rank order.
        node_ids: Vec<String>,
        /// Resource candidate used.
        candidate: usize,
        /// Time.
        at_ms: i64,
    },
    /// A rank started on its node.
    RankStarted {
        /// Job.
        job_id: JobId,
        /// Attempt number.
        attempt: u32,
        /// Rank.
        rank: u32,
        /// Time.
        at_ms: i64,
    },
    /// A rank ended.
    RankEnded {
        /// Job.
        job_id: JobId,
        /// Attempt number.
        attempt: u32,
        /// Rank.
        rank: u32,
        /// How.
        outcome: RankOutcome,
        /// Time.
        at_ms: i64,
    },
    /// Release nodes (`down`): their jobs are cancelled.
    TerminateNodes {
        /// Nodes.
        node_ids: Vec<String>,
        /// Time.
        at_ms: i64,
    },
    /// The provider confirmed a node is gone.
    NodeTerminated {
        /// Node.
        node_id: String,
        /// Time.
        at_ms: i64,
    },
    /// An agent traded a join token and a public key for a certificate.
    EnrollNode {
        /// Which token.
        via: Enrollment,
        /// The node it claims (a launched node), or none: a new manual node.
        node_id: Option<String>,
        /// Its host name (a manual node's instance type).
        hostname: String,
        /// What it has (a manual node's resources).
        resources: Resources,
        /// SHA-256 of its public key, hex.
        key_sha256: String,
        /// Time.
        at_ms: i64,
    },
    /// An admin cut a node off: its certificates are refused, its ranks
    /// are lost (managed jobs recover elsewhere) and it is terminated.
    RevokeNode {
        /// Node.
        node_id: String,
        /// Time.
        at_ms: i64,
    },
    /// Users, join tokens, audit records.
    Access(crate::access::AccessCommand),
    /// A client's change and its audit record, in one entry: applied, then
    /// recorded with its result (and the job it made, if it made one).
    Audited {
        /// The change.
        command: Box<Command>,
        /// Who asked, and for what; `result` is filled in by apply.
        record: crate::access::AuditRecord,
    },
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied.
    Applied,
    /// Applied; a job was created or found by its idempotency key.
    Job {
        /// Its id.
        job_id: JobId,
        /// Found by key rather than created.
        existing: bool,
    },
    /// Applied; these nodes were created.
    Nodes(Vec<String>),
    /// Nothing changed: the command no longer fits the state.
    Rejected(Rejection),
}

impl Rejection {
    /// The gRPC code name the API answers it with, for the audit trail.
    pub fn code_name(&self) -> &'static str {
        match self {
            Rejection::NoSuchJob(_) | Rejection::NoSuchNode(_) => "NotFound",
            Rejection::Conflict(_) => "FailedPrecondition",
        }
    }
}

/// Why a command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// No such job.
    #[error("job {0} not found")]
    NoSuchJob(JobId),
    /// No such node.
    #[error("node {0} not found")]
    NoSuchNode(String),
    /// The command is stale or does not fit (e.g. a node already taken).
    #[error("{0}")]
    Conflict(String),
}

/// The whole replicated state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(from = "StateOnDisk")]
pub struct State {
    /// All jobs by id. A persistent map of shared jobs: cloning the state
    /// to publish it after every apply batch is O(1), not O(jobs).
    pub jobs: imbl::OrdMap<JobId, Arc<Job>>,
    /// All nodes by id.
    pub nodes: BTreeMap<String, Node>,
    /// idempotency key -> job.
    pub idempotency: imbl::OrdMap<String, JobId>,
    /// Derived (rebuilt on load, never stored): jobs that are not finished
    /// or still hold a rank on a node.
    #[serde(skip)]
    pub active: imbl::OrdSet<JobId>,
    /// Last job id handed out.
    pub last_job_id: JobId,
    /// Last node number handed out.
    pub last_node_seq: u64,
    /// Places skipped after capacity or quota errors, by [`place_key`].
    /// Entries past their time are ignored and dropped on the next block.
    #[serde(default)]
    pub blocked: BTreeMap<String, Block>,
    /// Users, join tokens and the audit trail.
    #[serde(default)]
    pub access: crate::access::Access,
    /// Derived from `jobs` (rebuilt on load, never stored): PENDING jobs,
    /// which the scheduler scans.
    #[serde(skip)]
    queued: imbl::OrdSet<JobId>,
    /// Derived: active jobs that hold or reserve a node, which resource
    /// accounting scans. A backlog of queued jobs costs neither anything.
    #[serde(skip)]
    placed: imbl::OrdSet<JobId>,
}

/// [`State`] as stored: everything but the derived indexes.
#[derive(Deserialize)]
struct StateOnDisk {
    jobs: imbl::OrdMap<JobId, Arc<Job>>,
    nodes: BTreeMap<String, Node>,
    idempotency: imbl::OrdMap<String, JobId>,
    last_job_id: JobId,
    last_node_seq: u64,
    #[serde(default)]
    blocked: BTreeMap<String, Block>,
    #[serde(default)]
    access: crate::access::Access,
}

impl From<StateOnDisk> for State {
    fn from(d: StateOnDisk) -> State {
        let mut s = State {
            jobs: d.jobs,
            nodes: d.nodes,
            idempotency: d.idempotency,
            active: imbl::OrdSet::new(),
            last_job_id: d.last_job_id,
            last_node_seq: d.last_node_seq,
            blocked: d.blocked,
            access: d.access,
            queued: imbl::OrdSet::new(),
            placed: imbl::OrdSet::new(),
        };
        for id in s.jobs.keys().copied().collect::<Vec<_>>() {
            s.reindex(id);
        }
        s
    }
}

fn conflict(msg: impl Into<String>) -> Outcome {
    Outcome::Rejected(Rejection::Conflict(msg.into()))
}

impl State {
    /// What a job's candidate needs on each node.
    pub fn demand(spec: &TaskSpec, candidate: usize, node: &Resources) -> Resources {
        let mut r = Resources::default();
        if let Some(c) = spec.resources.candidates.get(candidate) {
            if let Some(a) = &c.accelerator {
                r.accelerators.insert(a.name.clone(), a.count);
            }
            // Like SkyPilot's job queue: a CPU-only task without a request holds half a vCPU.
            r.cpus = c
                .cpus
                .map_or(if c.accelerator.is_some() { 0.0 } else { 0.5 }, |q| q.value);
            r.memory_gb = c.memory.map_or(0.0, |m| {
                m.gb_for(if r.cpus > 0.0 { r.cpus } else { node.cpus })
            });
        }
        r
    }

    /// What is left on a node after every rank that still holds it.
    pub fn free_on(&self, node_id: &str) -> Resources {
        let Some(node) = self.nodes.get(node_id) else {
            return Resources::default();
        };
        let mut free = node.resources.clone();
        for job in self.placed_jobs() {
            for a in &job.attempts {
                for (rank, n) in a.node_ids.iter().enumerate() {
                    if n == node_id && a.holds(rank) {
                        free = free.minus(&a.demand);
                    }
                }
            }
        }
        free
    }

    /// Jobs with a rank still holding `node_id`.
    pub fn jobs_on(&self, node_id: &str) -> Vec<JobId> {
        self.placed_jobs()
            .filter(|j| {
                j.attempts.iter().any(|a| {
                    a.node_ids
                        .iter()
                        .enumerate()
                        .any(|(r, n)| n == node_id && a.holds(r))
                })
            })
            .map(|j| j.id)
            .collect()
    }

    /// Node reserved for a job still waiting for it, if any.
    pub fn reserved_by(&self, node_id: &str) -> Option<JobId> {
        self.placed_jobs()
            .find(|j| !j.state.is_terminal() && j.reserved_nodes.iter().any(|n| n == node_id))
            .map(|j| j.id)
    }

    /// Jobs not finished, or still holding a rank, oldest first.
    pub fn active_jobs(&self) -> impl Iterator<Item = &Job> + '_ {
        self.active
            .iter()
            .filter_map(|id| self.jobs.get(id).map(|j| &**j))
    }

    /// PENDING jobs, oldest first.
    pub fn queued_jobs(&self) -> impl Iterator<Item = &Job> + '_ {
        self.queued
            .iter()
            .filter_map(|id| self.jobs.get(id).map(|j| &**j))
    }

    /// Active jobs that hold or reserve a node, oldest first.
    pub fn placed_jobs(&self) -> impl Iterator<Item = &Job> + '_ {
        self.placed
            .iter()
            .filter_map(|id| self.jobs.get(id).map(|j| &**j))
    }

    /// Puts job `id` in the indexes its current state calls for.
    fn reindex(&mut self, id: JobId) {
        let (live, queued, placed) = match self.jobs.get(&id) {
            None => (false, false, false),
            Some(j) => {
                let holds = j.attempt_holding_ranks().is_some();
                let live = !j.state.is_terminal() || holds;
                let queued = j.state == JobState::Pending
                    || (j.state == JobState::Recovering && j.reserved_nodes.is_empty());
                let placed =
                    live && (j.state != JobState::Pending || holds || !j.reserved_nodes.is_empty());
                (live, queued, placed)
            }
        };
        for (set, member) in [
            (&mut self.active, live),
            (&mut self.queued, queued),
            (&mut self.placed, placed),
        ] {
            if member {
                set.insert(id);
            } else {
                set.remove(&id);
            }
        }
    }

    /// Applies one committed command. Deterministic; never panics on any input.
    pub fn apply(&mut self, cmd: &Command) -> Outcome {
        if let Command::Audited { command, record } = cmd {
            let outcome = self.apply(command);
            let mut record = record.clone();
            if let (Outcome::Job { job_id, .. }, true) = (&outcome, record.target.is_empty()) {
                record.target = format!("job {job_id}");
            }
            record.result = match &outcome {
                Outcome::Rejected(r) => r.code_name().into(),
                _ => "ok".into(),
            };
            let _ = self
                .access
                .apply(&crate::access::AccessCommand::Audit(record));
            return outcome;
        }
        // Jobs a node-level command can end, found before it changes them.
        let mut touched: Vec<JobId> = match cmd {
            Command::NodeLost { node_id, .. }
            | Command::RevokeNode { node_id, .. }
            | Command::NodeUnhealthy { node_id, .. }
            | Command::NodePreempted { node_id, .. }
            | Command::NodeTerminated { node_id, .. }
            | Command::NodeLaunchFailed { node_id, .. } => self.jobs_on_or_reserving(node_id),
            Command::TerminateNodes { node_ids, .. } => node_ids
                .iter()
                .flat_map(|n| self.jobs_on_or_reserving(n))
                .collect(),
            Command::CancelJob { job_id, .. }
            | Command::ProvisionNodes { job_id, .. }
            | Command::AssignJob { job_id, .. }
            | Command::RankStarted { job_id, .. }
            | Command::RankEnded { job_id, .. }
            | Command::JobUnplaceable { job_id, .. } => vec![*job_id],
            Command::SubmitJob { .. }
            | Command::NodeLaunched { .. }
            | Command::NodeUp { .. }
            | Command::EnrollNode { .. }
            | Command::Access(_)
            | Command::Audited { .. } => Vec::new(),
        };
        let outcome = self.apply_inner(cmd);
        if let Outcome::Job { job_id, .. } = outcome {
            touched.push(job_id);
        }
        for id in touched {
            self.reindex(id);
        }
        outcome
    }

    fn jobs_on_or_reserving(&self, node_id: &str) -> Vec<JobId> {
        let mut v = self.jobs_on(node_id);
        v.extend(self.reserved_by(node_id));
        v
    }

    fn apply_inner(&mut self, cmd: &Command) -> Outcome {
        match cmd {
            Command::SubmitJob {
                spec,
                idempotency_key,
                owner,
                at_ms,
            } => {
                if let Some(key) = idempotency_key {
                    if let Some(id) = self.idempotency.get(key) {
                        return Outcome::Job {
                            job_id: *id,
                            existing: true,
                        };
                    }
                }
                self.last_job_id += 1;
                let id = self.last_job_id;
                self.jobs.insert(
                    id,
                    Arc::new(Job {
                        id,
                        spec: spec.clone(),
                        state: JobState::Pending,
                        idempotency_key: idempotency_key.clone(),
                        owner: owner.clone(),
                        submitted_at_ms: *at_ms,
                        started_at_ms: None,
                        ended_at_ms: None,
                        exit_code: None,
                        message: String::new(),
                        attempts: Vec::new(),
                        reserved_nodes: Vec::new(),
                        provision_tries: Vec::new(),
                        managed: spec.managed.then(Managed::default),
                    }),
                );
                if let Some(key) = idempotency_key {
                    self.idempotency.insert(key.clone(), id);
                }
                Outcome::Job {
                    job_id: id,
                    existing: false,
                }
            }
            Command::CancelJob { job_id, at_ms } => {
                let Some(job) = self.jobs.get_mut(job_id).map(Arc::make_mut) else {
                    return Outcome::Rejected(Rejection::NoSuchJob(*job_id));
                };
                if job.state.is_terminal() {
                    return Outcome::Applied;
                }
                end_job(job, JobState::Cancelled, None, "cancelled by user", *at_ms);
                Outcome::Applied
            }
            Command::ProvisionNodes {
                job_id,
                offering,
                count,
                spot,
                at_ms,
            } => {
                let Some(job) = self.jobs.get(job_id) else {
                    return Outcome::Rejected(Rejection::NoSuchJob(*job_id));
                };
                let recovering = job.state == JobState::Recovering;
                if !(job.state == JobState::Pending || recovering) || !job.reserved_nodes.is_empty()
                {
                    return conflict(format!("job {job_id} is not waiting for a place"));
                }
                let mut ids = Vec::new();
                for _ in 0..*count {
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
                            hourly_price: offering.price(*spot),
                            address: String::new(),
                            instance_id: None,
                            created_at_ms: *at_ms,
                            message: String::new(),
                            unhealthy: None,
                            zone: offering.zone.clone(),
                            spot: *spot,
                            launched_at_ms: None,
                            ended_at_ms: None,
                            preemption: None,
                            enrolled_key: None,
                            revoked_at_ms: None,
                        },
                    );
                    ids.push(id);
                }
                if let Some(job) = self.jobs.get_mut(job_id).map(Arc::make_mut) {
                    // A recovering job stays RECOVERING: its old attempt may still run.
                    if !recovering {
                        job.state = JobState::Provisioning;
                    }
                    job.reserved_nodes = ids.clone();
                    let place = offering.place_key(*spot);
                    job.message = format!(
                        "provisioning {count} x {place} at {:.2}/h each",
                        offering.price(*spot)
                    );
                    if let Some(m) = job.managed.as_mut() {
                        let what = if recovering {
                            "replacement requested"
                        } else {
                            "nodes requested"
                        };
                        m.event(*at_ms, format!("{what}: {count} x {place}"));
                    }
                    job.provision_tries.push(ProvisionTry {
                        place,
                        hourly_price: offering.price(*spot),
                        count: *count,
                        at_ms: *at_ms,
                        outcome: String::new(),
                    });
                }
                Outcome::Nodes(ids)
            }
            Command::NodeLaunched {
                node_id,
                instance_id,
                at_ms,
            } => {
                let Some(node) = self.nodes.get_mut(node_id) else {
                    return Outcome::Rejected(Rejection::NoSuchNode(node_id.clone()));
                };
                node.instance_id = Some(instance_id.clone());
                node.launched_at_ms.get_or_insert(*at_ms);
                Outcome::Applied
            }
            Command::NodeLaunchFailed {
                node_id,
                message,
                failure,
                at_ms,
            } => {
                let Some(node) = self.nodes.get_mut(node_id) else {
                    return Outcome::Rejected(Rejection::NoSuchNode(node_id.clone()));
                };
                if node.state.is_final() {
                    return Outcome::Applied;
                }
                node.state = NodeState::Failed;
                node.message = message.clone();
                node.ended_at_ms = Some(*at_ms);
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
                let next_candidate = *failure != LaunchFailure::Other || managed;
                if next_candidate {
                    self.blocked.retain(|_, b| b.until_ms > *at_ms);
                    self.blocked.insert(
                        place.clone(),
                        Block {
                            until_ms: at_ms + BLOCK_COOLDOWN_MS,
                            reason: message.clone(),
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
                    t.outcome = message.clone();
                }
                if !next_candidate {
                    let msg = format!("provisioning {node_id} failed: {message}");
                    end_job(job, JobState::Failed, None, &msg, *at_ms);
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
            Command::JobUnplaceable {
                job_id,
                message,
                at_ms,
            } => {
                let Some(job) = self.jobs.get_mut(job_id).map(Arc::make_mut) else {
                    return Outcome::Rejected(Rejection::NoSuchJob(*job_id));
                };
                if job.state != JobState::Pending {
                    return conflict(format!("job {job_id} is not pending"));
                }
                end_job(job, JobState::Failed, None, message, *at_ms);
                Outcome::Applied
            }
            Command::NodeUp {
                node_id,
                address,
                at_ms: _,
            } => {
                let Some(node) = self.nodes.get_mut(node_id) else {
                    return Outcome::Rejected(Rejection::NoSuchNode(node_id.clone()));
                };
                match node.state {
                    NodeState::Provisioning | NodeState::Lost | NodeState::Ready => {
                        node.state = NodeState::Ready;
                        node.address = address.clone();
                        node.message.clear();
                        Outcome::Applied
                    }
                    s => conflict(format!("node {node_id} is {s:?}")),
                }
            }
            Command::NodeLost {
                node_id,
                message,
                at_ms,
            } => {
                let Some(node) = self.nodes.get_mut(node_id) else {
                    return Outcome::Rejected(Rejection::NoSuchNode(node_id.clone()));
                };
                if node.state != NodeState::Ready {
                    return conflict(format!("node {node_id} is not ready"));
                }
                node.state = NodeState::Lost;
                node.message = message.clone();
                let msg = format!("node {node_id} lost: {message}");
                self.fail_ranks_on(node_id, &msg, *at_ms);
                Outcome::Applied
            }
            Command::NodePreempted {
                node_id,
                kind,
                deadline_ms,
                at_ms,
            } => self.node_preempted(node_id, kind, *deadline_ms, *at_ms),
            Command::NodeUnhealthy {
                node_id,
                reason,
                at_ms,
            } => {
                let Some(node) = self.nodes.get_mut(node_id) else {
                    return Outcome::Rejected(Rejection::NoSuchNode(node_id.clone()));
                };
                if node.state.is_final() {
                    return conflict(format!("node {node_id} is {:?}", node.state));
                }
                if node.unhealthy.is_some() {
                    return Outcome::Applied;
                }
                node.unhealthy = Some(reason.clone());
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
                            *at_ms,
                        );
                    }
                }
                Outcome::Applied
            }
            Command::AssignJob {
                job_id,
                node_ids,
                candidate,
                at_ms,
            } => self.assign(*job_id, node_ids, *candidate, *at_ms),
            Command::RankStarted {
                job_id,
                attempt,
                rank,
                at_ms,
            } => {
                let Some(job) = self.jobs.get_mut(job_id).map(Arc::make_mut) else {
                    return Outcome::Rejected(Rejection::NoSuchJob(*job_id));
                };
                let terminal = job.state.is_terminal();
                let Some(a) = job.attempts.iter_mut().find(|a| a.number == *attempt) else {
                    return conflict(format!("job {job_id} has no attempt {attempt}"));
                };
                let Some(r) = a.ranks.get_mut(*rank as usize) else {
                    return conflict(format!("job {job_id} attempt {attempt} has no rank {rank}"));
                };
                if r.started {
                    return Outcome::Applied;
                }
                r.started = true;
                if !terminal && a.ranks.iter().all(|r| r.started) && a.state == JobState::Starting {
                    a.state = JobState::Running;
                    a.started_at_ms = Some(*at_ms);
                    job.state = JobState::Running;
                    job.started_at_ms.get_or_insert(*at_ms);
                    job.message.clear();
                    let number = a.number;
                    let nodes = a.node_ids.join(", ");
                    if let Some(m) = job.managed.as_mut() {
                        m.event(*at_ms, format!("attempt {number} running on {nodes}"));
                    }
                }
                Outcome::Applied
            }
            Command::RankEnded {
                job_id,
                attempt,
                rank,
                outcome,
                at_ms,
            } => self.rank_ended(*job_id, *attempt, *rank, outcome, *at_ms),
            Command::TerminateNodes { node_ids, at_ms } => {
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
                                end_job(job, JobState::Cancelled, None, &msg, *at_ms);
                            }
                        }
                    }
                    if let Some(job_id) = self.reserved_by(id) {
                        if let Some(job) = self.jobs.get_mut(&job_id).map(Arc::make_mut) {
                            end_job(job, JobState::Cancelled, None, &msg, *at_ms);
                        }
                    }
                }
                Outcome::Applied
            }
            Command::NodeTerminated { node_id, at_ms } => {
                let Some(node) = self.nodes.get_mut(node_id) else {
                    return Outcome::Rejected(Rejection::NoSuchNode(node_id.clone()));
                };
                node.state = NodeState::Terminated;
                node.ended_at_ms.get_or_insert(*at_ms);
                let msg = format!("node {node_id} terminated");
                self.fail_ranks_on(node_id, &msg, *at_ms);
                Outcome::Applied
            }
            Command::EnrollNode {
                via,
                node_id,
                hostname,
                resources,
                key_sha256,
                at_ms,
            } => self.enroll(
                via,
                node_id.as_deref(),
                hostname,
                resources,
                key_sha256,
                *at_ms,
            ),
            Command::RevokeNode { node_id, at_ms } => {
                let Some(node) = self.nodes.get_mut(node_id) else {
                    return Outcome::Rejected(Rejection::NoSuchNode(node_id.clone()));
                };
                node.revoked_at_ms.get_or_insert(*at_ms);
                if !node.state.is_final() {
                    node.state = NodeState::Terminating;
                    node.message = "revoked by an admin".into();
                }
                let msg = format!("node {node_id} revoked");
                self.fail_ranks_on(node_id, &msg, *at_ms);
                Outcome::Applied
            }
            // Handled in apply, before the indexes are touched.
            Command::Audited { command, .. } => self.apply_inner(command),
            Command::Access(c) => match self.access.apply(c) {
                Ok(()) => Outcome::Applied,
                Err(why) => conflict(why),
            },
        }
    }

    fn assign(
        &mut self,
        job_id: JobId,
        node_ids: &[String],
        candidate: usize,
        at_ms: i64,
    ) -> Outcome {
        let Some(job) = self.jobs.get(&job_id) else {
            return Outcome::Rejected(Rejection::NoSuchJob(job_id));
        };
        if !matches!(
            job.state,
            JobState::Pending | JobState::Provisioning | JobState::Recovering
        ) {
            return conflict(format!(
                "job {job_id} is {:?}, not waiting for nodes",
                job.state
            ));
        }
        // Never two attempts at once: the old one must have let go of every rank.
        if let Some(old) = job.attempt_holding_ranks() {
            return conflict(format!("job {job_id}: attempt {} still runs", old.number));
        }
        if node_ids.len() != job.spec.num_nodes as usize {
            return conflict(format!(
                "job {job_id} needs {} nodes, got {}",
                job.spec.num_nodes,
                node_ids.len()
            ));
        }
        if candidate >= job.spec.resources.candidates.len() {
            return conflict(format!("job {job_id} has no candidate {candidate}"));
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut demand = Resources::default();
        for id in node_ids {
            if !seen.insert(id) {
                return conflict(format!("node {id} given twice"));
            }
            let Some(node) = self.nodes.get(id) else {
                return Outcome::Rejected(Rejection::NoSuchNode(id.clone()));
            };
            if node.state != NodeState::Ready {
                return conflict(format!("node {id} is not ready"));
            }
            if let Some(why) = &node.unhealthy {
                return conflict(format!("node {id} is unhealthy: {why}"));
            }
            if let Some(other) = self.reserved_by(id) {
                if other != job_id {
                    return conflict(format!("node {id} is reserved for job {other}"));
                }
            }
            demand = Self::demand(&job.spec, candidate, &node.resources);
            if !self.free_on(id).fits(&demand) {
                return conflict(format!("node {id} has no room for job {job_id}"));
            }
        }
        let Some(job) = self.jobs.get_mut(&job_id).map(Arc::make_mut) else {
            return Outcome::Rejected(Rejection::NoSuchJob(job_id));
        };
        let number = job.attempts.len() as u32 + 1;
        job.attempts.push(Attempt {
            number,
            node_ids: node_ids.to_vec(),
            candidate,
            demand,
            ranks: vec![RankStatus::default(); node_ids.len()],
            state: JobState::Starting,
            assigned_at_ms: at_ms,
            started_at_ms: None,
            ended_at_ms: None,
            exit_code: None,
            message: String::new(),
        });
        job.state = JobState::Starting;
        job.reserved_nodes.clear();
        job.message.clear();
        if let Some(m) = job.managed.as_mut() {
            m.event(
                at_ms,
                format!("attempt {number} assigned to {}", node_ids.join(", ")),
            );
        }
        Outcome::Applied
    }

    fn node_preempted(
        &mut self,
        node_id: &str,
        kind: &str,
        deadline_ms: i64,
        at_ms: i64,
    ) -> Outcome {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return Outcome::Rejected(Rejection::NoSuchNode(node_id.to_string()));
        };
        if node.state.is_final() || node.preemption.is_some() {
            return Outcome::Applied;
        }
        let notice = Notice {
            node_id: node_id.to_string(),
            kind: kind.to_string(),
            deadline_ms,
            at_ms,
        };
        node.preemption = Some(notice.clone());
        node.message = format!("preemption notice ({kind}): goes at {deadline_ms}");
        let (provider, region) = (node.provider.clone(), node.region.clone());
        for job_id in self.jobs_on(node_id) {
            let Some(job) = self.jobs.get_mut(&job_id).map(Arc::make_mut) else {
                continue;
            };
            let strategy = job
                .spec
                .recovery
                .as_ref()
                .map(|r| r.strategy)
                .unwrap_or_default();
            let running = job.attempts.last().is_some_and(|a| !a.state.is_terminal());
            let Some(m) = job.managed.as_mut().filter(|_| running) else {
                continue;
            };
            m.notice = Some(notice.clone());
            m.event(at_ms, format!("preemption notice on {node_id} ({kind})"));
            if strategy == RecoveryStrategy::EagerNextRegion {
                m.avoid.retain(|a| a.until_ms > at_ms);
                m.avoid.push(Avoid {
                    provider: provider.clone(),
                    region: region.clone(),
                    until_ms: at_ms + BLOCK_COOLDOWN_MS,
                });
            }
            // RECOVERING while the old attempt still runs: the scheduler
            // provisions the replacement now, and starts it once the old
            // attempt has let go.
            job.state = JobState::Recovering;
            job.message = format!("preemption notice on {node_id}: provisioning a replacement");
        }
        Outcome::Applied
    }

    fn rank_ended(
        &mut self,
        job_id: JobId,
        attempt: u32,
        rank: u32,
        outcome: &RankOutcome,
        at_ms: i64,
    ) -> Outcome {
        let Some(job) = self.jobs.get_mut(&job_id).map(Arc::make_mut) else {
            return Outcome::Rejected(Rejection::NoSuchJob(job_id));
        };
        let is_current = job.attempts.last().is_some_and(|a| a.number == attempt);
        let Some(a) = job.attempts.iter_mut().find(|a| a.number == attempt) else {
            return conflict(format!("job {job_id} has no attempt {attempt}"));
        };
        let node = a.node_ids.get(rank as usize).cloned().unwrap_or_default();
        let Some(r) = a.ranks.get_mut(rank as usize) else {
            return conflict(format!("job {job_id} attempt {attempt} has no rank {rank}"));
        };
        if r.outcome.is_some() {
            return Outcome::Applied;
        }
        r.outcome = Some(outcome.clone());
        let all_ended = a.ranks.iter().all(|r| r.outcome.is_some());
        let all_ok = a
            .ranks
            .iter()
            .all(|r| r.outcome == Some(RankOutcome::Exited(0)));
        let failure = match outcome {
            RankOutcome::Exited(0) | RankOutcome::Cancelled => None,
            RankOutcome::Exited(c) => Some((
                JobState::Failed,
                Some(*c),
                format!("rank {rank} on {node} exited with {c}"),
            )),
            RankOutcome::SetupFailed(c) => Some((
                JobState::FailedSetup,
                Some(*c),
                format!("setup on rank {rank} ({node}) exited with {c}"),
            )),
            RankOutcome::FailedToStart(m) => Some((
                JobState::Failed,
                None,
                format!("rank {rank} on {node} failed to start: {m}"),
            )),
            RankOutcome::Lost(m) => Some((JobState::Failed, None, format!("rank {rank}: {m}"))),
        };
        if a.state.is_terminal() || !is_current {
            return Outcome::Applied;
        }
        if let (Some((state, code, msg)), Some(_)) = (&failure, &job.managed) {
            match recovery_after(job, outcome) {
                Some(why) => recover(job, &format!("{msg}; {why}"), at_ms),
                None => end_job(job, *state, *code, msg, at_ms),
            }
        } else if let Some((state, code, msg)) = failure {
            end_job(job, state, code, &msg, at_ms);
        } else if all_ended && all_ok {
            end_job(job, JobState::Succeeded, Some(0), "", at_ms);
        } else if all_ended {
            end_job(job, JobState::Cancelled, None, "stopped", at_ms);
        }
        Outcome::Applied
    }

    fn enroll(
        &mut self,
        via: &Enrollment,
        node_id: Option<&str>,
        hostname: &str,
        resources: &Resources,
        key_sha256: &str,
        at_ms: i64,
    ) -> Outcome {
        let id = match node_id {
            Some(id) => {
                let Some(node) = self.nodes.get(id) else {
                    return Outcome::Rejected(Rejection::NoSuchNode(id.to_string()));
                };
                if node.revoked_at_ms.is_some() {
                    return conflict(format!("node {id} is revoked"));
                }
                if node.state.is_final() || node.state == NodeState::Terminating {
                    return conflict(format!("node {id} is {:?}", node.state));
                }
                // A node token is good for the node's first enrollment only;
                // an admin's join token may re-enroll a node whose
                // certificate ran out.
                if *via == Enrollment::NodeToken && node.enrolled_key.is_some() {
                    return conflict("join token already used");
                }
                id.to_string()
            }
            None => {
                if *via == Enrollment::NodeToken {
                    return conflict("a node token names its node");
                }
                format!("node-{}", self.last_node_seq + 1)
            }
        };
        if let Enrollment::JoinToken { id: token } = via {
            // A leaked admin token must not make its holder an existing
            // node (and hand it that node's jobs and secrets).
            match self.access.join_tokens.get(token).map(|t| &t.node) {
                Some(Some(bound)) if node_id != Some(bound.as_str()) => {
                    return conflict(format!("this join token is for node {bound}"))
                }
                Some(None) if node_id.is_some() => {
                    return conflict(
                        "this join token makes a new node; re-enrolling an existing one takes a token made for it (--node)",
                    )
                }
                _ => {}
            }
            if let Err(why) = self.access.spend_join_token(token, &id, at_ms) {
                return conflict(why);
            }
        }
        if node_id.is_none() {
            self.last_node_seq += 1;
            self.nodes.insert(
                id.clone(),
                Node {
                    id: id.clone(),
                    state: NodeState::Provisioning,
                    provider: MANUAL_PROVIDER.into(),
                    region: MANUAL_PROVIDER.into(),
                    instance_type: hostname.to_string(),
                    resources: resources.clone(),
                    hourly_price: 0.0,
                    address: String::new(),
                    instance_id: Some(hostname.to_string()),
                    created_at_ms: at_ms,
                    message: "enrolled with a join token".into(),
                    unhealthy: None,
                    zone: None,
                    spot: false,
                    launched_at_ms: Some(at_ms),
                    ended_at_ms: None,
                    preemption: None,
                    enrolled_key: None,
                    revoked_at_ms: None,
                },
            );
        }
        if let Some(node) = self.nodes.get_mut(&id) {
            node.enrolled_key = Some(key_sha256.to_string());
        }
        Outcome::Nodes(vec![id])
    }

    fn fail_ranks_on(&mut self, node_id: &str, msg: &str, at_ms: i64) {
        for job_id in self.jobs_on(node_id) {
            let ranks: Vec<(u32, u32)> = self.jobs[&job_id]
                .attempts
                .iter()
                .flat_map(|a| {
                    a.node_ids
                        .iter()
                        .enumerate()
                        .filter(|(r, n)| *n == node_id && a.holds(*r))
                        .map(move |(r, _)| (a.number, r as u32))
                })
                .collect();
            for (attempt, rank) in ranks {
                self.rank_ended(
                    job_id,
                    attempt,
                    rank,
                    &RankOutcome::Lost(msg.to_string()),
                    at_ms,
                );
            }
        }
    }
}

fn end_job(job: &mut Job, state: JobState, exit_code: Option<i32>, msg: &str, at_ms: i64) {
    job.state = state;
    job.exit_code = exit_code;
    job.ended_at_ms = Some(at_ms);
    job.message = msg.to_string();
    job.reserved_nodes.clear();
    if let Some(a) = job.attempts.last_mut() {
        if !a.state.is_terminal() {
            a.state = state;
            a.exit_code = exit_code;
            a.ended_at_ms = Some(at_ms);
            a.message = msg.to_string();
        }
    }
}

/// Whether a managed job's failed attempt is recovered, and why; `None`:
/// the job fails. A preemption (a notice, a lost node) always recovers and
/// uses no budget; an exit code in `recover_on_exit_codes` neither; other
/// failures use `max_restarts_on_errors`.
fn recovery_after(job: &mut Job, outcome: &RankOutcome) -> Option<String> {
    let policy = job.spec.recovery.clone().unwrap_or_default();
    let m = job.managed.as_mut()?;
    if m.notice.is_some() || matches!(outcome, RankOutcome::Lost(_)) {
        m.recoveries += 1;
        return Some("recovering from the preemption".into());
    }
    let code = match outcome {
        RankOutcome::Exited(c) | RankOutcome::SetupFailed(c) => Some(*c),
        _ => None,
    };
    if code.is_some_and(|c| policy.recover_on_exit_codes.contains(&c)) {
        return Some(format!(
            "exit code {} is in recover_on_exit_codes: restarting",
            code.unwrap_or_default()
        ));
    }
    if m.restarts_on_errors < policy.max_restarts_on_errors {
        m.restarts_on_errors += 1;
        return Some(format!(
            "restart {} of {} (max_restarts_on_errors)",
            m.restarts_on_errors, policy.max_restarts_on_errors
        ));
    }
    None
}

/// Ends the current attempt and sends the job back for a new place.
fn recover(job: &mut Job, msg: &str, at_ms: i64) {
    if let Some(a) = job.attempts.last_mut() {
        if !a.state.is_terminal() {
            a.state = JobState::Failed;
            a.ended_at_ms = Some(at_ms);
            a.message = msg.to_string();
        }
    }
    job.state = JobState::Recovering;
    job.message = msg.to_string();
    if let Some(m) = job.managed.as_mut() {
        m.notice = None;
        let n = job.attempts.last().map_or(0, |a| a.number);
        m.event(at_ms, format!("attempt {n} ended: {msg}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::parse_task_yaml;

    fn spec(y: &str) -> TaskSpec {
        parse_task_yaml(y, &Default::default()).unwrap()
    }

    fn offering(gpus: f64) -> Offering {
        let mut r = Resources {
            cpus: 8.0,
            memory_gb: 32.0,
            ..Default::default()
        };
        if gpus > 0.0 {
            r.accelerators.insert("H100".into(), gpus);
        }
        Offering {
            provider: "local".into(),
            region: "us-east".into(),
            instance_type: "t".into(),
            resources: r,
            hourly_price: 0.0,
            spot_price: None,
            zone: None,
        }
    }

    fn submit(s: &mut State, y: &str, key: Option<&str>) -> JobId {
        match s.apply(&Command::SubmitJob {
            spec: spec(y),
            idempotency_key: key.map(Into::into),
            owner: String::new(),
            at_ms: 1,
        }) {
            Outcome::Job { job_id, .. } => job_id,
            o => panic!("{o:?}"),
        }
    }

    fn ready_node(s: &mut State, job: JobId, gpus: f64) -> String {
        let Outcome::Nodes(ids) = s.apply(&Command::ProvisionNodes {
            job_id: job,
            offering: offering(gpus),
            count: 1,
            spot: false,
            at_ms: 2,
        }) else {
            panic!()
        };
        s.apply(&Command::NodeUp {
            node_id: ids[0].clone(),
            address: "127.0.0.1".into(),
            at_ms: 3,
        });
        ids[0].clone()
    }

    #[test]
    fn job_lifecycle_to_success() {
        let mut s = State::default();
        let j = submit(&mut s, "run: echo", None);
        assert_eq!(s.jobs[&j].state, JobState::Pending);
        let n = ready_node(&mut s, j, 0.0);
        assert_eq!(s.jobs[&j].state, JobState::Provisioning);
        assert_eq!(
            s.apply(&Command::AssignJob {
                job_id: j,
                node_ids: vec![n.clone()],
                candidate: 0,
                at_ms: 4
            }),
            Outcome::Applied
        );
        s.apply(&Command::RankStarted {
            job_id: j,
            attempt: 1,
            rank: 0,
            at_ms: 5,
        });
        assert_eq!(s.jobs[&j].state, JobState::Running);
        s.apply(&Command::RankEnded {
            job_id: j,
            attempt: 1,
            rank: 0,
            outcome: RankOutcome::Exited(0),
            at_ms: 6,
        });
        let job = &s.jobs[&j];
        assert_eq!(
            (job.state, job.exit_code, job.ended_at_ms),
            (JobState::Succeeded, Some(0), Some(6))
        );
        assert_eq!(s.jobs_on(&n), Vec::<JobId>::new());
    }

    #[test]
    fn failing_rank_fails_job_with_its_exit_code() {
        let mut s = State::default();
        let j = submit(&mut s, "run: exit 3", None);
        let n = ready_node(&mut s, j, 0.0);
        s.apply(&Command::AssignJob {
            job_id: j,
            node_ids: vec![n],
            candidate: 0,
            at_ms: 4,
        });
        s.apply(&Command::RankEnded {
            job_id: j,
            attempt: 1,
            rank: 0,
            outcome: RankOutcome::SetupFailed(3),
            at_ms: 6,
        });
        assert_eq!(s.jobs[&j].state, JobState::FailedSetup);
        assert_eq!(s.jobs[&j].exit_code, Some(3));
    }

    #[test]
    fn idempotency_key_returns_the_same_job() {
        let mut s = State::default();
        let a = submit(&mut s, "run: a", Some("k"));
        let before = s.clone();
        let out = s.apply(&Command::SubmitJob {
            spec: spec("run: b"),
            idempotency_key: Some("k".into()),
            owner: String::new(),
            at_ms: 9,
        });
        assert_eq!(
            out,
            Outcome::Job {
                job_id: a,
                existing: true
            }
        );
        assert_eq!(s, before);
    }

    #[test]
    fn a_node_is_never_booked_twice() {
        let mut s = State::default();
        let y = "resources: {accelerators: H100:8}\nrun: x";
        let j1 = submit(&mut s, y, None);
        let j2 = submit(&mut s, y, None);
        let n = ready_node(&mut s, j1, 8.0);
        assert_eq!(
            s.apply(&Command::AssignJob {
                job_id: j1,
                node_ids: vec![n.clone()],
                candidate: 0,
                at_ms: 4
            }),
            Outcome::Applied
        );
        let out = s.apply(&Command::AssignJob {
            job_id: j2,
            node_ids: vec![n.clone()],
            candidate: 0,
            at_ms: 4,
        });
        assert!(
            matches!(out, Outcome::Rejected(Rejection::Conflict(_))),
            "{out:?}"
        );
        assert_eq!(s.jobs[&j2].state, JobState::Pending);
        // Once j1 ends the node is free again.
        s.apply(&Command::CancelJob {
            job_id: j1,
            at_ms: 5,
        });
        assert!(
            !s.free_on(&n).fits(&s.jobs[&j1].attempts[0].demand),
            "held until the rank stops"
        );
        s.apply(&Command::RankEnded {
            job_id: j1,
            attempt: 1,
            rank: 0,
            outcome: RankOutcome::Cancelled,
            at_ms: 6,
        });
        assert_eq!(s.jobs[&j1].state, JobState::Cancelled);
        assert_eq!(
            s.apply(&Command::AssignJob {
                job_id: j2,
                node_ids: vec![n],
                candidate: 0,
                at_ms: 7
            }),
            Outcome::Applied
        );
    }

    #[test]
    fn lost_node_fails_its_jobs() {
        let mut s = State::default();
        let j = submit(&mut s, "run: x", None);
        let n = ready_node(&mut s, j, 0.0);
        s.apply(&Command::AssignJob {
            job_id: j,
            node_ids: vec![n.clone()],
            candidate: 0,
            at_ms: 4,
        });
        s.apply(&Command::NodeLost {
            node_id: n.clone(),
            message: "no heartbeat".into(),
            at_ms: 5,
        });
        assert_eq!(s.jobs[&j].state, JobState::Failed);
        assert!(s.jobs[&j].message.contains("lost"));
        assert_eq!(s.nodes[&n].state, NodeState::Lost);
        // The agent coming back makes the node usable again.
        s.apply(&Command::NodeUp {
            node_id: n.clone(),
            address: "a".into(),
            at_ms: 6,
        });
        assert_eq!(s.nodes[&n].state, NodeState::Ready);
    }

    fn enroll(s: &mut State, via: Enrollment, node: Option<&str>, at_ms: i64) -> Outcome {
        s.apply(&Command::EnrollNode {
            via,
            node_id: node.map(Into::into),
            hostname: "box".into(),
            resources: Resources {
                cpus: 8.0,
                ..Default::default()
            },
            key_sha256: format!("key-{at_ms}"),
            at_ms,
        })
    }

    #[test]
    fn a_node_token_enrolls_its_node_once_and_a_join_token_makes_a_manual_node() {
        let mut s = State::default();
        let j = submit(&mut s, "run: x", None);
        let n = ready_node(&mut s, j, 0.0);
        assert_eq!(
            enroll(&mut s, Enrollment::NodeToken, Some(&n), 10),
            Outcome::Nodes(vec![n.clone()])
        );
        assert_eq!(s.nodes[&n].enrolled_key.as_deref(), Some("key-10"));
        let again = enroll(&mut s, Enrollment::NodeToken, Some(&n), 11);
        assert_eq!(again, conflict("join token already used"));
        assert_eq!(s.nodes[&n].enrolled_key.as_deref(), Some("key-10"));
        assert!(matches!(
            enroll(&mut s, Enrollment::NodeToken, None, 12),
            Outcome::Rejected(_)
        ));
        // An admin's token: a new manual node, named by the state.
        s.apply(&Command::Access(
            crate::access::AccessCommand::CreateJoinToken {
                token: crate::access::JoinToken {
                    id: "t".into(),
                    sha256: "h".into(),
                    description: String::new(),
                    created_by: "root".into(),
                    created_at_ms: 0,
                    expires_at_ms: 100,
                    uses_left: 2,
                    revoked_at_ms: None,
                    nodes: Vec::new(),
                    node: None,
                },
            },
        ));
        let via = || Enrollment::JoinToken { id: "t".into() };
        // A token for new nodes cannot take over an existing one.
        assert!(matches!(
            enroll(&mut s, via(), Some(&n), 19),
            Outcome::Rejected(_)
        ));
        assert_eq!(s.nodes[&n].enrolled_key.as_deref(), Some("key-10"));
        let Outcome::Nodes(ids) = enroll(&mut s, via(), None, 20) else {
            panic!("not enrolled")
        };
        let manual = &s.nodes[&ids[0]];
        assert_eq!(manual.provider, MANUAL_PROVIDER);
        assert_eq!(manual.resources.cpus, 8.0);
        assert_ne!(ids[0], n);
        let seq = s.last_node_seq;
        s.access.join_tokens.get_mut("t").unwrap().uses_left = 0;
        assert_eq!(
            enroll(&mut s, via(), None, 21),
            conflict("join token already used")
        );
        assert_eq!(s.last_node_seq, seq, "a refused enrollment makes no node");
        // A token made for the node re-enrolls it, with a new key.
        let mut for_node = s.access.join_tokens["t"].clone();
        for_node.id = "r".into();
        for_node.uses_left = 1;
        for_node.node = Some(n.clone());
        s.apply(&Command::Access(
            crate::access::AccessCommand::CreateJoinToken { token: for_node },
        ));
        let again = enroll(
            &mut s,
            Enrollment::JoinToken { id: "r".into() },
            Some(&n),
            22,
        );
        assert_eq!(again, Outcome::Nodes(vec![n.clone()]));
        assert_eq!(s.nodes[&n].enrolled_key.as_deref(), Some("key-22"));
    }

    #[test]
    fn a_revoked_node_loses_its_ranks_and_cannot_enroll_again() {
        let mut s = State::default();
        let j = submit(&mut s, "run: x", None);
        let n = ready_node(&mut s, j, 0.0);
        s.apply(&Command::AssignJob {
            job_id: j,
            node_ids: vec![n.clone()],
            candidate: 0,
            at_ms: 4,
        });
        assert_eq!(
            s.apply(&Command::RevokeNode {
                node_id: n.clone(),
                at_ms: 5,
            }),
            Outcome::Applied
        );
        assert_eq!(s.nodes[&n].revoked_at_ms, Some(5));
        assert_eq!(s.nodes[&n].state, NodeState::Terminating);
        assert_eq!(s.jobs[&j].state, JobState::Failed);
        assert!(s.jobs[&j].message.contains("revoked"));
        assert!(s.jobs_on(&n).is_empty());
        assert_eq!(
            enroll(&mut s, Enrollment::NodeToken, Some(&n), 6),
            conflict(format!("node {n} is revoked"))
        );
    }

    #[test]
    fn an_audited_change_is_applied_and_recorded_with_its_result_in_one_step() {
        let mut s = State::default();
        let record = crate::access::AuditRecord {
            at_ms: 1,
            who: "alice".into(),
            role: Some(crate::access::Role::User),
            call: "SubmitJob".into(),
            target: String::new(),
            result: String::new(),
        };
        let out = s.apply(&Command::Audited {
            command: Box::new(Command::SubmitJob {
                spec: spec("run: x"),
                idempotency_key: None,
                owner: "alice".into(),
                at_ms: 1,
            }),
            record: record.clone(),
        });
        let Outcome::Job { job_id, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!(s.queued_jobs().count(), 1, "the indexes saw the job");
        let out = s.apply(&Command::Audited {
            command: Box::new(Command::CancelJob {
                job_id: 99,
                at_ms: 2,
            }),
            record: crate::access::AuditRecord {
                call: "CancelJob".into(),
                target: "job 99".into(),
                ..record
            },
        });
        assert!(matches!(out, Outcome::Rejected(_)));
        let trail: Vec<(String, String)> = s
            .access
            .audit
            .iter()
            .map(|r| (r.target.clone(), r.result.clone()))
            .collect();
        assert_eq!(
            trail,
            vec![
                (format!("job {job_id}"), "ok".to_string()),
                ("job 99".to_string(), "NotFound".to_string())
            ]
        );
    }

    #[test]
    fn unknown_ids_are_rejections_that_change_nothing() {
        let mut s = State::default();
        let before = s.clone();
        assert_eq!(
            s.apply(&Command::CancelJob {
                job_id: 7,
                at_ms: 1
            }),
            Outcome::Rejected(Rejection::NoSuchJob(7))
        );
        assert!(matches!(
            s.apply(&Command::NodeUp {
                node_id: "x".into(),
                address: "".into(),
                at_ms: 1
            }),
            Outcome::Rejected(_)
        ));
        assert!(matches!(
            s.apply(&Command::TerminateNodes {
                node_ids: vec!["x".into()],
                at_ms: 1
            }),
            Outcome::Rejected(_)
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn apply_is_deterministic() {
        let cmds = {
            let mut s = State::default();
            let j = submit(&mut s, "run: x", None);
            vec![
                Command::SubmitJob {
                    spec: spec("run: x"),
                    idempotency_key: None,
                    owner: String::new(),
                    at_ms: 1,
                },
                Command::ProvisionNodes {
                    job_id: j,
                    offering: offering(0.0),
                    count: 1,
                    spot: false,
                    at_ms: 2,
                },
                Command::NodeUp {
                    node_id: "node-1".into(),
                    address: "a".into(),
                    at_ms: 3,
                },
                Command::AssignJob {
                    job_id: j,
                    node_ids: vec!["node-1".into()],
                    candidate: 0,
                    at_ms: 4,
                },
            ]
        };
        let run = || {
            let mut s = State::default();
            for c in &cmds {
                s.apply(c);
            }
            serde_json::to_string(&s).unwrap()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn a_stored_state_comes_back_with_its_indexes() {
        let mut s = State::default();
        let queued = submit(&mut s, "run: x", None);
        let placed = submit(&mut s, "run: y", None);
        ready_node(&mut s, placed, 0.0);
        let ended = submit(&mut s, "run: z", None);
        s.apply(&Command::CancelJob {
            job_id: ended,
            at_ms: 9,
        });
        let back: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s, "indexes are rebuilt exactly as apply keeps them");
        let ids = |it: Vec<&Job>| it.iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(ids(back.queued_jobs().collect()), vec![queued]);
        assert_eq!(ids(back.placed_jobs().collect()), vec![placed]);
        assert_eq!(ids(back.active_jobs().collect()), vec![queued, placed]);
    }
}
