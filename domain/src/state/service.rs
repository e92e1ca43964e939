//! Services (`nembo serve`): their replicated model and the commands of the
//! service family. Each replica is a job; the leader's service loop decides
//! (with [`crate::serve`]) and every decision lands here as a command.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{conflict, end_job, JobId, JobState, Outcome, Rejection, State};
use crate::task::{ReplicaTag, TaskSpec};

/// Ended replicas kept per service for `serve status`, newest first.
pub const ENDED_REPLICAS_KEPT: usize = 20;

/// A service: versions of its task and the replicas serving them.
// Undocumented fields are named for what they hold.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    /// The user who brought it up; only they (or an admin) change it.
    pub owner: String,
    pub created_at_ms: i64,
    /// The port its load balancer listens on, on every coordinator.
    pub lb_port: u16,
    /// The task of each version (from 1); the newest is `version`.
    pub versions: BTreeMap<u32, TaskSpec>,
    pub version: u32,
    /// How the newest version replaces the older ones.
    pub update_mode: UpdateMode,
    /// Replicas the autoscaler wants (before `num_overprovision`).
    pub target: u32,
    pub replicas: BTreeMap<u32, Replica>,
    /// The last replica id handed out.
    pub last_replica_id: u32,
}

/// `serve update --mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum UpdateMode {
    /// Old replicas go as new ones turn READY; every version with READY
    /// replicas serves meanwhile.
    #[default]
    Rolling,
    /// Only the newest version serves once it has `min_replicas` READY;
    /// the old ones go then, all at once.
    BlueGreen,
}

/// One replica: a job serving one version of the service.
// Undocumented fields are named for what they hold.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replica {
    /// From 1, in the order replicas were made (`SKYPILOT_SERVE_REPLICA_ID`).
    pub id: u32,
    pub version: u32,
    pub job_id: JobId,
    /// On spot capacity.
    pub spot: bool,
    /// Its port on a host shared with other replicas ([`ReplicaTag`]).
    pub shared_host_port: u16,
    pub phase: ReplicaPhase,
    pub created_at_ms: i64,
    /// When its probe first passed.
    pub ready_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
    /// Why it ended or drains.
    pub message: String,
}

/// Where a replica is in its life, as far as serving goes (its job says
/// the rest: pending, provisioning, starting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaPhase {
    /// Not READY yet: its job is on its way or its probe has not passed.
    Starting,
    /// Its probe passes: it takes traffic.
    Ready,
    /// Its probe passed before and fails now: out of the load balancer.
    NotReady,
    /// Out of the load balancer, finishing what it serves until `until_ms`,
    /// then it ends as `end`.
    Draining {
        /// Its job is stopped then.
        until_ms: i64,
        /// How it ends.
        end: ReplicaEnd,
    },
    /// Its job is stopped or ended.
    Ended(ReplicaEnd),
}

/// How a replica ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaEnd {
    /// Its job failed (setup, run, or its node).
    Failed,
    /// Never ready within `initial_delay_seconds`.
    FailedInitialDelay,
    /// Not ready for `consecutive_failure_threshold_timeout`.
    FailedProbing,
    /// Its spot node was reclaimed.
    Preempted,
    /// Not needed: fewer replicas wanted, or an older version replaced.
    ScaledDown,
}

impl ReplicaEnd {
    /// As `serve status` shows it (SkyServe's names).
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaEnd::Failed => "FAILED",
            ReplicaEnd::FailedInitialDelay => "FAILED_INITIAL_DELAY",
            ReplicaEnd::FailedProbing => "FAILED_PROBING",
            ReplicaEnd::Preempted => "PREEMPTED",
            ReplicaEnd::ScaledDown => "TERMINATED",
        }
    }

    /// Caused by the replica's own code or image (not by capacity or
    /// scaling): a version that fails this way before it was ever ready
    /// is not launched again.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            ReplicaEnd::Failed | ReplicaEnd::FailedInitialDelay | ReplicaEnd::FailedProbing
        )
    }
}

impl Replica {
    /// Still running, or draining.
    pub fn is_live(&self) -> bool {
        !matches!(self.phase, ReplicaPhase::Ended(_))
    }
}

/// Changes to services.
// Undocumented fields are named for what they hold.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServiceCommand {
    /// `serve up`: a new service at version 1, wanting `min_replicas`.
    Up {
        name: String,
        /// The validated task, with its `service:` section.
        spec: TaskSpec,
        owner: String,
        lb_port: u16,
        at_ms: i64,
    },
    /// `serve update`: a new version.
    Update {
        name: String,
        spec: TaskSpec,
        mode: UpdateMode,
        at_ms: i64,
    },
    /// `serve down`: its replicas' jobs are cancelled and it is gone.
    Down { name: String, at_ms: i64 },
    /// The autoscaler's new target.
    SetTarget {
        name: String,
        target: u32,
        at_ms: i64,
    },
    /// A new replica of `version`: its job is submitted.
    AddReplica {
        name: String,
        /// Must be the next id: a stale decision is refused.
        replica_id: u32,
        version: u32,
        spot: bool,
        shared_host_port: u16,
        /// (provider, region) pairs to stay out of if anywhere else fits.
        #[serde(default)]
        avoid: Vec<(String, String)>,
        at_ms: i64,
    },
    /// Its probe passed (`ready`) or failed where it had passed.
    Probed {
        name: String,
        replica_id: u32,
        ready: bool,
        at_ms: i64,
    },
    /// Take a replica out: drain until `drain_until_ms` first, if given,
    /// else stop its job now.
    Retire {
        name: String,
        replica_id: u32,
        end: ReplicaEnd,
        drain_until_ms: Option<i64>,
        message: String,
        at_ms: i64,
    },
}

impl ServiceCommand {
    /// The service it is about.
    pub fn service(&self) -> &str {
        match self {
            ServiceCommand::Up { name, .. }
            | ServiceCommand::Update { name, .. }
            | ServiceCommand::Down { name, .. }
            | ServiceCommand::SetTarget { name, .. }
            | ServiceCommand::AddReplica { name, .. }
            | ServiceCommand::Probed { name, .. }
            | ServiceCommand::Retire { name, .. } => name,
        }
    }
}

impl State {
    /// Jobs a service command can submit or end.
    pub(super) fn service_jobs(&self, name: &str) -> Vec<JobId> {
        self.services
            .get(name)
            .map(|s| s.replicas.values().map(|r| r.job_id).collect())
            .unwrap_or_default()
    }

    pub(super) fn apply_service(&mut self, cmd: &ServiceCommand) -> Outcome {
        let name = cmd.service();
        if let ServiceCommand::Up {
            spec,
            owner,
            lb_port,
            at_ms,
            ..
        } = cmd
        {
            if self.services.contains_key(name) {
                return conflict(format!("service {name} already exists"));
            }
            if let Some(other) = self.services.values().find(|s| s.lb_port == *lb_port) {
                return conflict(format!(
                    "port {lb_port} is service {}'s load balancer",
                    other.name
                ));
            }
            let Some(svc) = &spec.service else {
                return conflict("the task has no `service:` section");
            };
            self.services.insert(
                name.to_string(),
                Service {
                    name: name.to_string(),
                    owner: owner.clone(),
                    created_at_ms: *at_ms,
                    lb_port: *lb_port,
                    versions: BTreeMap::from([(1, spec.clone())]),
                    version: 1,
                    update_mode: UpdateMode::Rolling,
                    target: svc.replica_policy.min_replicas,
                    replicas: BTreeMap::new(),
                    last_replica_id: 0,
                },
            );
            return Outcome::Applied;
        }
        let Some(service) = self.services.get(name) else {
            return conflict(format!("service {name} not found"));
        };
        match cmd {
            ServiceCommand::Up { .. } => Outcome::Applied,
            ServiceCommand::Update { spec, mode, .. } => {
                let Some(svc) = &spec.service else {
                    return conflict("the task has no `service:` section");
                };
                let target = svc.replica_policy.min_replicas;
                let s = self.service_mut(name);
                s.version = s.version.saturating_add(1);
                let v = s.version;
                s.versions.insert(v, spec.clone());
                s.update_mode = *mode;
                // Not `clamp`: it panics on a policy whose max is below its
                // min, and apply must not panic on any command.
                s.target = s.target.min(svc.replica_policy.max_replicas).max(target);
                // Versions no live replica runs are not needed again.
                let running: Vec<u32> = s
                    .replicas
                    .values()
                    .filter(|r| r.is_live())
                    .map(|r| r.version)
                    .collect();
                s.versions.retain(|k, _| *k == v || running.contains(k));
                Outcome::Applied
            }
            ServiceCommand::Down { at_ms, .. } => {
                let jobs = self.service_jobs(name);
                for id in jobs {
                    if let Some(job) = self.jobs.get_mut(&id).map(Arc::make_mut) {
                        if !job.state.is_terminal() {
                            end_job(
                                job,
                                JobState::Cancelled,
                                None,
                                &format!("service {name} taken down"),
                                *at_ms,
                            );
                        }
                    }
                }
                self.services.remove(name);
                Outcome::Applied
            }
            ServiceCommand::SetTarget { target, .. } => {
                self.service_mut(name).target = *target;
                Outcome::Applied
            }
            ServiceCommand::AddReplica {
                replica_id,
                version,
                spot,
                shared_host_port,
                avoid,
                at_ms,
                ..
            } => {
                if Some(*replica_id) != service.last_replica_id.checked_add(1) {
                    return conflict(format!(
                        "service {name}: replica {replica_id} is not the next one"
                    ));
                }
                let Some(mut spec) = service.versions.get(version).cloned() else {
                    return conflict(format!("service {name} has no version {version}"));
                };
                let taken = self.services.values().flat_map(|s| s.replicas.values());
                if taken
                    .filter(|r| r.is_live())
                    .any(|r| r.shared_host_port == *shared_host_port)
                {
                    return conflict(format!("port {shared_host_port} is another replica's"));
                }
                spec.name = Some(format!("{name}-{replica_id}"));
                for c in &mut spec.resources.candidates {
                    c.use_spot = *spot;
                }
                spec.replica = Some(ReplicaTag {
                    service: name.to_string(),
                    replica_id: *replica_id,
                    shared_host_port: *shared_host_port,
                    avoid: avoid.clone(),
                });
                let owner = service.owner.clone();
                let outcome = self.submit_job(&spec, None, &owner, *at_ms);
                let Outcome::Job { job_id, .. } = outcome else {
                    return outcome;
                };
                let s = self.service_mut(name);
                s.last_replica_id = *replica_id;
                s.replicas.insert(
                    *replica_id,
                    Replica {
                        id: *replica_id,
                        version: *version,
                        job_id,
                        spot: *spot,
                        shared_host_port: *shared_host_port,
                        phase: ReplicaPhase::Starting,
                        created_at_ms: *at_ms,
                        ready_at_ms: None,
                        ended_at_ms: None,
                        message: String::new(),
                    },
                );
                outcome
            }
            ServiceCommand::Probed {
                replica_id,
                ready,
                at_ms,
                ..
            } => {
                let Some(r) = self.service_mut(name).replicas.get_mut(replica_id) else {
                    return conflict(format!("service {name} has no replica {replica_id}"));
                };
                r.phase = match (r.phase, ready) {
                    (ReplicaPhase::Starting | ReplicaPhase::NotReady, true) => {
                        r.ready_at_ms.get_or_insert(*at_ms);
                        ReplicaPhase::Ready
                    }
                    (ReplicaPhase::Ready, false) => ReplicaPhase::NotReady,
                    (phase, _) => phase,
                };
                Outcome::Applied
            }
            ServiceCommand::Retire {
                replica_id,
                end,
                drain_until_ms,
                message,
                at_ms,
                ..
            } => {
                let Some(r) = service.replicas.get(replica_id) else {
                    return Outcome::Rejected(Rejection::Conflict(format!(
                        "service {name} has no replica {replica_id}"
                    )));
                };
                if !r.is_live() {
                    return Outcome::Applied;
                }
                let job_id = r.job_id;
                if let Some(until_ms) = drain_until_ms.filter(|u| u > at_ms) {
                    let r = self.replica_mut(name, *replica_id);
                    if !matches!(r.phase, ReplicaPhase::Draining { .. }) {
                        r.phase = ReplicaPhase::Draining {
                            until_ms,
                            end: *end,
                        };
                        r.message = message.clone();
                    }
                    return Outcome::Applied;
                }
                if let Some(job) = self.jobs.get_mut(&job_id).map(Arc::make_mut) {
                    if !job.state.is_terminal() {
                        end_job(job, JobState::Cancelled, None, message, *at_ms);
                    }
                }
                let r = self.replica_mut(name, *replica_id);
                r.phase = ReplicaPhase::Ended(*end);
                r.ended_at_ms = Some(*at_ms);
                if !message.is_empty() {
                    r.message = message.clone();
                }
                self.service_mut(name).forget_old_replicas();
                Outcome::Applied
            }
        }
    }

    fn service_mut(&mut self, name: &str) -> &mut Service {
        self.services.get_mut(name).expect("checked by the caller")
    }

    fn replica_mut(&mut self, name: &str, id: u32) -> &mut Replica {
        self.service_mut(name)
            .replicas
            .get_mut(&id)
            .expect("checked by the caller")
    }
}

impl Service {
    /// The newest version's task.
    pub fn newest(&self) -> Option<&TaskSpec> {
        self.versions.get(&self.version)
    }

    /// Keeps the newest [`ENDED_REPLICAS_KEPT`] ended replicas.
    fn forget_old_replicas(&mut self) {
        let ended: Vec<u32> = self
            .replicas
            .values()
            .filter(|r| !r.is_live())
            .map(|r| r.id)
            .collect();
        let drop = ended.len().saturating_sub(ENDED_REPLICAS_KEPT);
        for id in ended.into_iter().take(drop) {
            self.replicas.remove(&id);
        }
    }
}
