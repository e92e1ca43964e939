//! [`Command`]: every change to the replicated state. Its serde form is the
//! Raft log's and the snapshots' on-disk format: entries already written
//! must keep decoding, so a new field takes `#[serde(default)]`.

use serde::{Deserialize, Serialize};

use super::{Enrollment, JobId, LaunchFailure, Offering, RankOutcome, Resources};
use crate::task::TaskSpec;

/// A state change. Each carries its own time (`at_ms`, Unix ms).
// Fields left undocumented are named for what they hold: the job or node
// the command is about (`job_id`, `node_id`, `node_ids`) and `at_ms`.
// A submission carries its whole task, inline: commands are encoded into
// the log once and applied once, and boxing the task would change nothing
// the log holds.
#[allow(missing_docs, clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// A new job, PENDING.
    SubmitJob {
        /// The validated task.
        spec: TaskSpec,
        /// Same key, same job.
        idempotency_key: Option<String>,
        /// The submitting user's name (`root`: the cluster's own token).
        #[serde(default)]
        owner: String,
        at_ms: i64,
    },
    /// Cancel a job; its ranks are stopped by their agents.
    CancelJob { job_id: JobId, at_ms: i64 },
    /// Record the intent to provision nodes for a job (before the provider call).
    ProvisionNodes {
        /// Job the nodes are for.
        job_id: JobId,
        /// What to launch and where; the nodes take its price.
        offering: Offering,
        /// Nodes to create, all reserved for the job.
        count: u32,
        /// On spot capacity.
        #[serde(default)]
        spot: bool,
        at_ms: i64,
    },
    /// The provider launched a node.
    NodeLaunched {
        node_id: String,
        /// The provider's id for the machine.
        instance_id: String,
        at_ms: i64,
    },
    /// The provider could not launch a node.
    NodeLaunchFailed {
        node_id: String,
        /// The provider's error: the node's message and, when its place is
        /// blocked, the reason.
        message: String,
        /// What kind of failure: capacity and quota send the job on to
        /// its next candidate, anything else fails it.
        #[serde(default)]
        failure: LaunchFailure,
        at_ms: i64,
    },
    /// Every place that could host a pending job is blocked: it fails with
    /// the list (the scheduler proposes this; apply re-checks nothing but
    /// that the job still waits).
    JobUnplaceable {
        job_id: JobId,
        /// Why, naming the blocked places.
        message: String,
        at_ms: i64,
    },
    /// A node's agent enrolled (or came back).
    NodeUp {
        node_id: String,
        address: String,
        /// Where the world reaches it, when that differs (a cloud VM's
        /// public IP): its ports' endpoints.
        #[serde(default)]
        public_address: String,
        at_ms: i64,
    },
    /// A node's heartbeats stopped past the TTL.
    NodeLost {
        node_id: String,
        /// Why, for the node and, as `node N lost: why`, its jobs.
        message: String,
        at_ms: i64,
    },
    /// The node's cloud announced it will reclaim the node (the agent read
    /// the notice): it takes no new work, and the managed jobs on it start
    /// recovering at once, while it still runs.
    NodePreempted {
        node_id: String,
        /// What the cloud said (`aws:terminate`, `gcp:preempted`, `azure:Preempt`).
        kind: String,
        /// When the node goes.
        deadline_ms: i64,
        at_ms: i64,
    },
    /// A GPU of the node failed (critical XID, uncorrectable ECC, off the
    /// bus): it takes no new work. Running jobs are left to their owners.
    NodeUnhealthy {
        node_id: String,
        /// Why, for `nembo status`.
        reason: String,
        at_ms: i64,
    },
    /// Place a job on nodes (rank order); starts a new attempt.
    AssignJob {
        job_id: JobId,
        /// One per rank, in rank order: rank `i` runs on `node_ids[i]`.
        node_ids: Vec<String>,
        /// Index into the task's `resources.candidates` the nodes were
        /// chosen for: it sets what each rank holds on its node.
        candidate: usize,
        at_ms: i64,
    },
    /// A rank started on its node.
    RankStarted {
        job_id: JobId,
        /// The [`Attempt::number`](super::Attempt::number) it belongs to.
        attempt: u32,
        /// Index into that attempt's `node_ids`.
        rank: u32,
        at_ms: i64,
    },
    /// A rank ended.
    RankEnded {
        job_id: JobId,
        /// The [`Attempt::number`](super::Attempt::number) it belongs to: an
        /// old attempt's rank is recorded but decides nothing.
        attempt: u32,
        /// Index into that attempt's `node_ids`.
        rank: u32,
        outcome: RankOutcome,
        at_ms: i64,
    },
    /// Release nodes (`down`): their jobs are cancelled.
    TerminateNodes { node_ids: Vec<String>, at_ms: i64 },
    /// The provider confirmed a node is gone.
    NodeTerminated { node_id: String, at_ms: i64 },
    /// An agent traded a join token and a public key for a certificate.
    EnrollNode {
        /// The kind of token it presented (the coordinator checked its secret).
        via: Enrollment,
        /// The node it claims (a launched node), or none: a new manual node.
        node_id: Option<String>,
        /// Its host name (a manual node's instance type).
        hostname: String,
        /// What it has (a manual node's resources).
        resources: Resources,
        /// SHA-256 of its public key, hex.
        key_sha256: String,
        at_ms: i64,
    },
    /// An admin cut a node off: its certificates are refused, its ranks
    /// are lost (managed jobs recover elsewhere) and it is terminated.
    RevokeNode { node_id: String, at_ms: i64 },
    /// Stop a cluster's nodes, keeping their disks; its jobs are cancelled.
    StopCluster { name: String, at_ms: i64 },
    /// Start a stopped cluster's nodes again.
    StartCluster { name: String, at_ms: i64 },
    /// Tear a cluster down: its jobs are cancelled, its nodes terminated.
    DownCluster { name: String, at_ms: i64 },
    /// Set (or, with none, cancel) a cluster's autostop.
    SetAutostop {
        name: String,
        autostop: Option<crate::task::Autostop>,
        at_ms: i64,
    },
    /// The leader found the cluster idle past its autostop window: apply
    /// checks that again at `at_ms`, then stops or tears it down.
    AutostopCluster { name: String, at_ms: i64 },
    /// The provider stopped a node (its `Stopping` intent was committed).
    NodeStopped { node_id: String, at_ms: i64 },
    /// A `nembo ssh` session on the cluster opened or closed.
    SshSession {
        name: String,
        open: bool,
        at_ms: i64,
    },
    /// Services and their replicas.
    Service(super::ServiceCommand),
    /// Users, join tokens, audit records.
    Access(crate::access::AccessCommand),
    /// A client's change and its audit record, in one entry: applied, then
    /// recorded with its result (and the job it made, if it made one).
    Audited {
        /// The client's command, applied as if it came alone.
        command: Box<Command>,
        /// Who asked, and for what; `result` is filled in by apply.
        record: crate::access::AuditRecord,
    },
}
