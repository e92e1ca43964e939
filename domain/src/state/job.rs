//! Jobs: their model, and the commands of the job family (submit, cancel,
//! assign, rank started and ended, unplaceable).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    conflict, recover, recovery_after, Managed, NodeState, Outcome, ProvisionTry, Rejection,
    Resources, State,
};
use crate::task::TaskSpec;

/// Job id: a counter, shown as a decimal string.
pub type JobId = u64;

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
    /// Its files could not be put in place before `setup` (a file mount,
    /// the workdir): counted as a failed setup, with why.
    DataInFailed(String),
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
// Undocumented fields are named for what they hold.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based, in the order attempts were assigned.
    pub number: u32,
    /// One per rank: rank `i` runs on `node_ids[i]`.
    pub node_ids: Vec<String>,
    /// Index of the resource candidate it was placed by.
    pub candidate: usize,
    /// What it needs on each node.
    pub demand: Resources,
    /// One per rank.
    pub ranks: Vec<RankStatus>,
    /// Its own state: an old attempt keeps how it ended while the job
    /// moves on to the next.
    pub state: JobState,
    pub assigned_at_ms: i64,
    /// When every rank had started.
    pub started_at_ms: Option<i64>,
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
// Undocumented fields are named for what they hold.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    /// The normalised task (with secrets: state is internal).
    pub spec: TaskSpec,
    pub state: JobState,
    /// Client-chosen key for safe retries.
    pub idempotency_key: Option<String>,
    /// The user who submitted it (`root`: the cluster's own token).
    #[serde(default)]
    pub owner: String,
    pub submitted_at_ms: i64,
    /// When an attempt first had every rank started; kept across recoveries.
    pub started_at_ms: Option<i64>,
    /// When it reached a terminal state.
    pub ended_at_ms: Option<i64>,
    /// The exit code that decided its end; `None` when no process did
    /// (cancelled, lost, unplaceable, failed to start).
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

impl State {
    pub(super) fn submit_job(
        &mut self,
        spec: &TaskSpec,
        idempotency_key: Option<&str>,
        owner: &str,
        at_ms: i64,
    ) -> Outcome {
        if let Some(key) = idempotency_key {
            if let Some(id) = self.idempotency.get(key) {
                return Outcome::Job {
                    job_id: *id,
                    existing: true,
                };
            }
        }
        if let Err(refused) = self.submit_to_cluster(spec, owner, at_ms) {
            return refused;
        }
        self.last_job_id += 1;
        let id = self.last_job_id;
        self.jobs.insert(
            id,
            Arc::new(Job {
                id,
                spec: spec.clone(),
                state: JobState::Pending,
                idempotency_key: idempotency_key.map(str::to_string),
                owner: owner.to_string(),
                submitted_at_ms: at_ms,
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
            self.idempotency.insert(key.to_string(), id);
        }
        Outcome::Job {
            job_id: id,
            existing: false,
        }
    }

    pub(super) fn cancel_job(&mut self, job_id: JobId, at_ms: i64) -> Outcome {
        let Some(job) = self.jobs.get_mut(&job_id).map(Arc::make_mut) else {
            return Outcome::Rejected(Rejection::NoSuchJob(job_id));
        };
        if job.state.is_terminal() {
            return Outcome::Applied;
        }
        end_job(job, JobState::Cancelled, None, "cancelled by user", at_ms);
        Outcome::Applied
    }

    pub(super) fn assign_job(
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
            if let Err(why) = self.node_serves(node, job.spec.cluster.as_ref().map(|t| &*t.name)) {
                return conflict(why);
            }
            if job.spec.replica.is_some() && self.holds_other_replica(node) {
                return conflict(format!(
                    "node {id} already runs a service replica, on the service's port"
                ));
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
        let cluster = job.spec.cluster.as_ref().map(|t| t.name.clone());
        for id in node_ids {
            if let Some(n) = self.nodes.get_mut(id) {
                n.last_busy_ms = Some(at_ms);
            }
        }
        // A cluster placed on a shared fixed machine lists it from its first task.
        if let Some(name) = cluster {
            let fresh = self
                .clusters
                .get(&name)
                .is_some_and(|c| self.cluster_nodes(c).next().is_none());
            if let Some(c) = self.clusters.get_mut(&name).filter(|_| fresh) {
                c.node_ids = node_ids.to_vec();
            }
        }
        let Some(job) = self.jobs.get_mut(&job_id).map(Arc::make_mut) else {
            return Outcome::Applied;
        };
        if let Some(m) = job.managed.as_mut() {
            m.event(
                at_ms,
                format!("attempt {number} assigned to {}", node_ids.join(", ")),
            );
        }
        Outcome::Applied
    }

    pub(super) fn rank_started(
        &mut self,
        job_id: JobId,
        attempt: u32,
        rank: u32,
        at_ms: i64,
    ) -> Outcome {
        let Some(job) = self.jobs.get_mut(&job_id).map(Arc::make_mut) else {
            return Outcome::Rejected(Rejection::NoSuchJob(job_id));
        };
        let terminal = job.state.is_terminal();
        let Some(a) = job.attempts.iter_mut().find(|a| a.number == attempt) else {
            return conflict(format!("job {job_id} has no attempt {attempt}"));
        };
        let Some(r) = a.ranks.get_mut(rank as usize) else {
            return conflict(format!("job {job_id} attempt {attempt} has no rank {rank}"));
        };
        if r.started {
            return Outcome::Applied;
        }
        r.started = true;
        if !terminal && a.ranks.iter().all(|r| r.started) && a.state == JobState::Starting {
            a.state = JobState::Running;
            a.started_at_ms = Some(at_ms);
            job.state = JobState::Running;
            job.started_at_ms.get_or_insert(at_ms);
            job.message.clear();
            let number = a.number;
            let nodes = a.node_ids.join(", ");
            if let Some(m) = job.managed.as_mut() {
                m.event(at_ms, format!("attempt {number} running on {nodes}"));
            }
        }
        Outcome::Applied
    }

    pub(super) fn rank_ended(
        &mut self,
        job_id: JobId,
        attempt: u32,
        rank: u32,
        outcome: &RankOutcome,
        at_ms: i64,
    ) -> Outcome {
        let busy_node = self
            .jobs
            .get(&job_id)
            .and_then(|j| j.attempts.iter().find(|a| a.number == attempt))
            .and_then(|a| a.node_ids.get(rank as usize).cloned());
        if let Some(n) = busy_node.and_then(|id| self.nodes.get_mut(&id)) {
            n.last_busy_ms = Some(n.last_busy_ms.unwrap_or(at_ms).max(at_ms));
        }
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
            RankOutcome::DataInFailed(m) => Some((
                JobState::FailedSetup,
                None,
                format!("setup on rank {rank} ({node}): {m}"),
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

    pub(super) fn job_unplaceable(&mut self, job_id: JobId, message: &str, at_ms: i64) -> Outcome {
        let Some(job) = self.jobs.get_mut(&job_id).map(Arc::make_mut) else {
            return Outcome::Rejected(Rejection::NoSuchJob(job_id));
        };
        if job.state != JobState::Pending {
            return conflict(format!("job {job_id} is not pending"));
        }
        end_job(job, JobState::Failed, None, message, at_ms);
        Outcome::Applied
    }
}

pub(super) fn end_job(
    job: &mut Job,
    state: JobState,
    exit_code: Option<i32>,
    msg: &str,
    at_ms: i64,
) {
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

impl State {
    /// A service replica holds a rank on `node`, and the node is a machine
    /// of its own: a second replica there would want the same port
    /// (replicas on a host that nodes share get a port each).
    pub(crate) fn holds_other_replica(&self, node: &super::Node) -> bool {
        !crate::serve::shares_host(&node.address)
            && self
                .jobs_on(&node.id)
                .iter()
                .any(|j| self.jobs.get(j).is_some_and(|j| j.spec.replica.is_some()))
    }
}
