//! The replicated state machine: cluster state, the commands that change it,
//! and [`State::apply`].
//!
//! Determinism rules (as Nomad's FSM): apply reads no clock and no randomness.
//! Every timestamp comes inside the command; ids are either carried in the
//! command or drawn from counters kept in the state. Rejections are outcomes,
//! never panics, so a bad command cannot stop the log. Times (`*_ms`) are
//! Unix milliseconds, as the commands carried them.
//!
//! [`State::apply`] dispatches each command to a method beside the model types
//! it changes: `job.rs` (submit, cancel, assign, ranks), `node.rs` (provision,
//! launch, liveness, terminate), `managed.rs` (preemption and recovery of
//! managed jobs), `enrollment.rs` (enroll, revoke, access). [`Command`] itself
//! is in `command.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::task::TaskSpec;

mod cluster;
mod command;
mod enrollment;
mod job;
mod managed;
mod node;
mod service;

pub use cluster::*;
pub use command::*;
pub use enrollment::*;
pub use job::*;
pub use managed::*;
pub use node::*;
pub use service::*;

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// It took effect, or there was nothing left to do: most commands that
    /// repeat one already applied answer this rather than a rejection.
    Applied,
    /// Applied; a job was created or found by its idempotency key.
    Job {
        /// The new job, or the one its key found.
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
            Rejection::NoSuchJob(_) | Rejection::NoSuchNode(_) | Rejection::NoSuchCluster(_) => {
                "NotFound"
            }
            Rejection::Conflict(_) => "FailedPrecondition",
        }
    }
}

/// Why a command changed nothing.
// Each variant's #[error] message is its documentation.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("job {0} not found")]
    NoSuchJob(JobId),
    #[error("node {0} not found")]
    NoSuchNode(String),
    #[error("cluster {0} not found")]
    NoSuchCluster(String),
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
    /// Named clusters by name.
    #[serde(default)]
    pub clusters: BTreeMap<String, Cluster>,
    /// Services (`nembo serve`) by name.
    #[serde(default)]
    pub services: BTreeMap<String, Service>,
    /// Derived from `jobs` (rebuilt on load, never stored): PENDING jobs,
    /// which the scheduler scans.
    #[serde(skip)]
    queued: imbl::OrdSet<(std::cmp::Reverse<u16>, JobId)>,
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
    #[serde(default)]
    clusters: BTreeMap<String, Cluster>,
    #[serde(default)]
    services: BTreeMap<String, Service>,
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
            clusters: d.clusters,
            services: d.services,
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

    /// PENDING jobs, higher `resources.priority` first, then oldest first.
    pub fn queued_jobs(&self) -> impl Iterator<Item = &Job> + '_ {
        self.queued
            .iter()
            .filter_map(|(_, id)| self.jobs.get(id).map(|j| &**j))
    }

    /// Active jobs that hold or reserve a node, oldest first.
    pub fn placed_jobs(&self) -> impl Iterator<Item = &Job> + '_ {
        self.placed
            .iter()
            .filter_map(|id| self.jobs.get(id).map(|j| &**j))
    }

    fn priority_of(&self, id: JobId) -> u16 {
        self.jobs
            .get(&id)
            .and_then(|j| j.spec.priority)
            .unwrap_or(crate::task::DEFAULT_PRIORITY)
    }

    /// Puts job `id` in the indexes its current state calls for.
    fn reindex(&mut self, id: JobId) {
        if let Some(j) = self.jobs.get(&id).filter(|j| j.spec.cluster.is_some()) {
            let ended = self.active.contains(&id)
                && j.state.is_terminal()
                && j.attempt_holding_ranks().is_none();
            if ended {
                let j = j.clone();
                self.note_cluster_job_ended(id, &j.spec, j.ended_at_ms);
            }
        }
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
        for (set, member) in [(&mut self.active, live), (&mut self.placed, placed)] {
            if member {
                set.insert(id);
            } else {
                set.remove(&id);
            }
        }
        // A job's priority never changes (and jobs are never removed), so
        // its key is found again.
        let key = (std::cmp::Reverse(self.priority_of(id)), id);
        if queued {
            self.queued.insert(key);
        } else {
            self.queued.remove(&key);
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
            Command::NodeStopped { node_id, .. } => self.jobs_on_or_reserving(node_id),
            Command::StopCluster { name, .. }
            | Command::DownCluster { name, .. }
            | Command::AutostopCluster { name, .. } => self.cluster_jobs_touched(name),
            Command::CancelJob { job_id, .. }
            | Command::ProvisionNodes { job_id, .. }
            | Command::AssignJob { job_id, .. }
            | Command::RankStarted { job_id, .. }
            | Command::RankEnded { job_id, .. }
            | Command::JobUnplaceable { job_id, .. } => vec![*job_id],
            Command::Service(c) => self.service_jobs(c.service()),
            Command::SubmitJob { .. }
            | Command::NodeLaunched { .. }
            | Command::NodeUp { .. }
            | Command::EnrollNode { .. }
            | Command::Access(_)
            | Command::StartCluster { .. }
            | Command::SetAutostop { .. }
            | Command::SshSession { .. }
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

    /// Jobs a cluster-wide command can end: its active jobs, and those on
    /// or reserving its nodes.
    fn cluster_jobs_touched(&self, name: &str) -> Vec<JobId> {
        let mut v: Vec<JobId> = self.cluster_active_jobs(name).map(|j| j.id).collect();
        if let Some(c) = self.clusters.get(name) {
            for n in &c.node_ids {
                v.extend(self.jobs_on_or_reserving(n));
            }
        }
        v
    }

    fn jobs_on_or_reserving(&self, node_id: &str) -> Vec<JobId> {
        let mut v = self.jobs_on(node_id);
        v.extend(self.reserved_by(node_id));
        v
    }

    /// One command, by family: each arm calls the method that applies it.
    fn apply_inner(&mut self, cmd: &Command) -> Outcome {
        match cmd {
            Command::SubmitJob {
                spec,
                idempotency_key,
                owner,
                at_ms,
            } => self.submit_job(spec, idempotency_key.as_deref(), owner, *at_ms),
            Command::CancelJob { job_id, at_ms } => self.cancel_job(*job_id, *at_ms),
            Command::ProvisionNodes {
                job_id,
                offering,
                count,
                spot,
                at_ms,
            } => self.provision_nodes(*job_id, offering, *count, *spot, *at_ms),
            Command::NodeLaunched {
                node_id,
                instance_id,
                at_ms,
            } => self.node_launched(node_id, instance_id, *at_ms),
            Command::NodeLaunchFailed {
                node_id,
                message,
                failure,
                at_ms,
            } => self.node_launch_failed(node_id, message, *failure, *at_ms),
            Command::JobUnplaceable {
                job_id,
                message,
                at_ms,
            } => self.job_unplaceable(*job_id, message, *at_ms),
            Command::NodeUp {
                node_id,
                address,
                public_address,
                at_ms: _,
            } => self.node_up(node_id, address, public_address),
            Command::NodeLost {
                node_id,
                message,
                at_ms,
            } => self.node_lost(node_id, message, *at_ms),
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
            } => self.node_unhealthy(node_id, reason, *at_ms),
            Command::AssignJob {
                job_id,
                node_ids,
                candidate,
                at_ms,
            } => self.assign_job(*job_id, node_ids, *candidate, *at_ms),
            Command::RankStarted {
                job_id,
                attempt,
                rank,
                at_ms,
            } => self.rank_started(*job_id, *attempt, *rank, *at_ms),
            Command::RankEnded {
                job_id,
                attempt,
                rank,
                outcome,
                at_ms,
            } => self.rank_ended(*job_id, *attempt, *rank, outcome, *at_ms),
            Command::TerminateNodes { node_ids, at_ms } => self.terminate_nodes(node_ids, *at_ms),
            Command::NodeTerminated { node_id, at_ms } => self.node_terminated(node_id, *at_ms),
            Command::EnrollNode {
                via,
                node_id,
                hostname,
                resources,
                key_sha256,
                at_ms,
            } => self.enroll_node(
                via,
                node_id.as_deref(),
                hostname,
                resources,
                key_sha256,
                *at_ms,
            ),
            Command::RevokeNode { node_id, at_ms } => self.revoke_node(node_id, *at_ms),
            // Handled in apply, before the indexes are touched.
            Command::Audited { command, .. } => self.apply_inner(command),
            Command::Access(c) => self.apply_access(c),
            Command::StopCluster { .. }
            | Command::StartCluster { .. }
            | Command::DownCluster { .. }
            | Command::SetAutostop { .. }
            | Command::AutostopCluster { .. }
            | Command::NodeStopped { .. }
            | Command::SshSession { .. } => self.apply_cluster(cmd),
            Command::Service(c) => self.apply_service(c),
        }
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

#[cfg(test)]
pub(crate) mod tests;
