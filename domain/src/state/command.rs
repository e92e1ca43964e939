//! [`Command`]: every change to the replicated state. Its serde form is the
//! Raft log's and the snapshots' on-disk format: variants and fields are
//! only ever added, with `#[serde(default)]`.

use serde::{Deserialize, Serialize};

use super::{Enrollment, JobId, LaunchFailure, Offering, RankOutcome, Resources};
use crate::task::TaskSpec;

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
