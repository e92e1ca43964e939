//! Managed jobs (`nembo jobs launch`): what the coordinators track to recover
//! them, preemption notices, and the recovery decisions.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Job, JobState, Outcome, RankOutcome, Rejection, State, BLOCK_COOLDOWN_MS};
use crate::task::RecoveryStrategy;

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
// Undocumented fields are named for what they hold.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Avoid {
    pub provider: String,
    pub region: String,
    /// Past it the region is fair game again; expired entries are dropped
    /// at the job's next preemption.
    pub until_ms: i64,
}

/// A cloud's warning that a node is about to go.
// Undocumented fields are named for what they hold.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    pub node_id: String,
    /// What the cloud said (`aws:terminate`, `gcp:preempted`, `azure:Preempt`).
    pub kind: String,
    /// When the node goes.
    pub deadline_ms: i64,
    /// When the coordinators learnt of it.
    pub at_ms: i64,
}

/// One line of a managed job's timeline.
// Undocumented fields are named for what they hold.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub at_ms: i64,
    /// What happened, in prose.
    pub what: String,
}

impl Managed {
    pub(super) fn event(&mut self, at_ms: i64, what: String) {
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

impl State {
    pub(super) fn node_preempted(
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
            if strategy == RecoveryStrategy::None {
                // Nothing is provisioned ahead: the job ends with its node.
                m.event(
                    at_ms,
                    format!("preemption notice on {node_id} ({kind}); job_recovery is none"),
                );
                continue;
            }
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
}

/// Whether a managed job's failed attempt is recovered, and why; `None`:
/// the job fails. A preemption (a notice, a lost node) always recovers and
/// uses no budget; an exit code in `recover_on_exit_codes` neither; other
/// failures use `max_restarts_on_errors`.
pub(super) fn recovery_after(job: &mut Job, outcome: &RankOutcome) -> Option<String> {
    let policy = job.spec.recovery.clone().unwrap_or_default();
    let m = job.managed.as_mut()?;
    let preempted = m.notice.is_some() || matches!(outcome, RankOutcome::Lost(_));
    if preempted && policy.strategy == RecoveryStrategy::None {
        return None;
    }
    if preempted {
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
pub(super) fn recover(job: &mut Job, msg: &str, at_ms: i64) {
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
