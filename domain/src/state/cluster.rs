//! Clusters: named groups of nodes that tasks are launched and executed on
//! (SkyPilot's `launch -c NAME`, `exec NAME`), stopped and started, and
//! stopped or torn down by autostop once idle. The commands of the cluster
//! family: stop, start, down, autostop settings and autostop itself.
//!
//! Idleness is decided here, from replicated state and the time a command
//! carries: the leader's scheduler proposes [`Command::AutostopCluster`]
//! when [`State::autostop_due`] says so, and apply asks the same question
//! again at the command's time, so a new leader neither loses nor repeats
//! the decision.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{conflict, end_job, Command, JobState, NodeState, Outcome, Rejection, State};
use crate::task::{Autostop, AutostopSetting, TaskSpec, WaitFor};

/// A named cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// `[a-zA-Z]([-_.a-zA-Z0-9]*[a-zA-Z0-9])?`, as SkyPilot's.
    pub name: String,
    /// The user who created it; only they (or an admin) use it.
    pub owner: String,
    /// Its nodes, the head (rank 0) first. A node of a fixed machine (the
    /// local provider's own machine) may be listed by several clusters;
    /// any other node belongs to this one alone ([`super::Node::cluster`]).
    pub node_ids: Vec<String>,
    /// How many nodes it has (the launching task's `num_nodes`).
    pub num_nodes: u32,
    /// The resources it was launched for, as the launching task gave them
    /// (for `nembo status`).
    pub resources: String,
    /// When it was created.
    pub created_at_ms: i64,
    /// Stop (or down) after this long idle; none: stays up.
    pub autostop: Option<Autostop>,
    /// Start of the current idle period: the last submission, job end,
    /// autostop setting, start or shell session end.
    pub last_active_ms: i64,
    /// `nembo ssh` sessions open on it now.
    #[serde(default)]
    pub ssh_sessions: u32,
    /// A stop was asked (by a user or by autostop); `start` clears it.
    pub stopped: bool,
    /// The job running its autostop hook for the current idle period: not
    /// activity, and once it ends (or its timeout passes) the stop goes on.
    #[serde(default)]
    pub autostop_hook: Option<super::JobId>,
    /// Why it is in its state.
    pub message: String,
}

/// What a user sees of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterStatus {
    /// Being provisioned, started or stopped.
    Init,
    /// Every node is up.
    Up,
    /// Every node is stopped (disks kept).
    Stopped,
}

/// Whether `name` is a valid cluster name (SkyPilot's rule, at most 63
/// characters, and not a node id, which `down` also takes).
pub fn check_cluster_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let ok_inner = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    let valid = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphabetic()
        && bytes.iter().all(ok_inner)
        && bytes[bytes.len() - 1].is_ascii_alphanumeric();
    if !valid {
        return Err(format!(
            "cluster name '{name}': expected a letter, then letters, digits, '-', '_' or '.', \
             ending in a letter or digit, at most 63 characters"
        ));
    }
    let node_like = name
        .strip_prefix("node-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if node_like {
        return Err(format!(
            "cluster name '{name}' is reserved: node-N names nodes"
        ));
    }
    Ok(())
}

impl State {
    /// The cluster's nodes that still exist, head first.
    pub fn cluster_nodes<'a>(&'a self, c: &'a Cluster) -> impl Iterator<Item = &'a super::Node> {
        c.node_ids
            .iter()
            .filter_map(|id| self.nodes.get(id))
            .filter(|n| !n.state.is_final())
    }

    /// The cluster's nodes that are its alone (not a shared fixed machine):
    /// the ones a stop, a start or a down acts on.
    pub fn cluster_own_nodes<'a>(
        &'a self,
        c: &'a Cluster,
    ) -> impl Iterator<Item = &'a super::Node> {
        self.cluster_nodes(c)
            .filter(move |n| n.cluster.as_deref() == Some(c.name.as_str()))
    }

    /// The ids of [`Self::cluster_own_nodes`].
    fn own_node_ids(&self, c: &Cluster) -> Vec<String> {
        self.cluster_own_nodes(c).map(|n| n.id.clone()).collect()
    }

    /// INIT, UP or STOPPED, from its nodes.
    pub fn cluster_status(&self, c: &Cluster) -> ClusterStatus {
        if c.stopped {
            let all_stopped = self
                .cluster_own_nodes(c)
                .all(|n| n.state == NodeState::Stopped);
            return if all_stopped {
                ClusterStatus::Stopped
            } else {
                ClusterStatus::Init
            };
        }
        let nodes: Vec<_> = self.cluster_nodes(c).collect();
        if !nodes.is_empty()
            && nodes.len() >= c.num_nodes as usize
            && nodes.iter().all(|n| n.state == NodeState::Ready)
        {
            ClusterStatus::Up
        } else {
            ClusterStatus::Init
        }
    }

    /// Jobs of cluster `name` that are not finished, oldest first.
    pub fn cluster_active_jobs<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = &'a super::Job> + 'a {
        self.active_jobs()
            .filter(move |j| j.spec.cluster.as_ref().is_some_and(|t| t.name == name))
    }

    /// Whether the cluster's autostop window has passed at `now_ms`: it is
    /// up, and for the whole window no job was pending or running on it
    /// (and, for `jobs_and_ssh`, no shell session was open). With
    /// `wait_for: none` the window runs from the last reset whatever runs.
    pub fn autostop_due(&self, c: &Cluster, now_ms: i64) -> bool {
        let Some(a) = &c.autostop else { return false };
        if c.stopped || self.cluster_nodes(c).next().is_none() {
            return false;
        }
        let working = || {
            self.cluster_active_jobs(&c.name)
                .any(|j| Some(j.id) != c.autostop_hook)
        };
        let busy = match a.wait_for {
            WaitFor::None => false,
            WaitFor::Jobs => working(),
            WaitFor::JobsAndSsh => c.ssh_sessions > 0 || working(),
        };
        if busy || now_ms - c.last_active_ms < (a.idle_s as i64).saturating_mul(1000) {
            return false;
        }
        // A hook that runs holds the stop back, up to its timeout.
        match c.autostop_hook.and_then(|id| self.jobs.get(&id)) {
            Some(hook) if a.hook.is_some() && !hook.state.is_terminal() => {
                now_ms - hook.submitted_at_ms >= (a.hook_timeout_s as i64).saturating_mul(1000)
            }
            _ => true,
        }
    }

    /// Whether `spec` can run on cluster `c` as it is: SkyPilot's
    /// `check_resources_fit_cluster` (cpus, memory and disk size are not
    /// compared). The error names what differs.
    pub fn fits_cluster(&self, c: &Cluster, spec: &TaskSpec) -> Result<(), String> {
        if spec.num_nodes > c.num_nodes {
            return Err(format!(
                "the task needs {} nodes; cluster {} has {}",
                spec.num_nodes, c.name, c.num_nodes
            ));
        }
        let Some(head) = self.cluster_nodes(c).next() else {
            return Ok(()); // still being provisioned for its first task
        };
        let fits = |cand: &crate::task::ResourceCandidate| {
            crate::optimizer::place_matches(
                cand,
                &head.provider,
                &head.region,
                head.zone.as_deref(),
                &head.instance_type,
            ) && cand.accelerator.as_ref().is_none_or(|a| {
                head.resources
                    .accelerators
                    .get(&a.name)
                    .is_some_and(|have| *have + 1e-9 >= a.count)
            }) && (!cand.use_spot || head.spot)
                && cand
                    .disk_tier
                    .is_none_or(|t| head.disk_tier.is_none_or(|h| h >= t))
                && (cand.image_id.is_empty() || cand.image_for(&head.region) == head.image_id)
        };
        if spec.resources.candidates.iter().any(fits) {
            return Ok(());
        }
        let requested: Vec<String> = spec
            .resources
            .candidates
            .iter()
            .map(crate::task::ResourceCandidate::summary)
            .collect();
        Err(format!(
            "requested resources do not match the existing cluster. Requested: {}. \
             Existing: {} x {}/{}/{}{}{}. To fix: specify a new cluster name, or down the \
             existing cluster first",
            requested.join(" or "),
            c.num_nodes,
            head.provider,
            head.region,
            head.instance_type,
            if head.resources.accelerators.is_empty() {
                String::new()
            } else {
                let accs: Vec<String> = head
                    .resources
                    .accelerators
                    .iter()
                    .map(|(k, v)| format!("{k}:{v}"))
                    .collect();
                format!(" ({})", accs.join(", "))
            },
            if head.spot { " [spot]" } else { "" },
        ))
    }

    /// Whether `node` may run a job of `cluster` (none: a job of no
    /// cluster). A cluster's jobs run on its nodes; while it has none, its
    /// first task may go to a shared fixed machine. A node of a cluster
    /// runs that cluster's jobs only.
    pub fn node_serves(&self, node: &super::Node, cluster: Option<&str>) -> Result<(), String> {
        match (cluster, &node.cluster) {
            (None, None) => Ok(()),
            (None, Some(c)) => Err(format!("node {} belongs to cluster {c}", node.id)),
            (Some(name), _) => {
                let Some(c) = self.clusters.get(name) else {
                    return Err(format!("cluster {name} not found"));
                };
                if c.stopped {
                    return Err(format!("cluster {name} is stopped"));
                }
                let listed = self.cluster_nodes(c).any(|n| n.id == node.id);
                let fresh = self.cluster_nodes(c).next().is_none();
                if listed || (fresh && node.fixed_machine && node.cluster.is_none()) {
                    Ok(())
                } else {
                    Err(format!("node {} is not in cluster {name}", node.id))
                }
            }
        }
    }

    /// The part of a submission that concerns its cluster, before the job
    /// is made: creates the cluster for a launch, restarts a stopped one,
    /// checks the task fits, and counts the submission as activity.
    pub(super) fn submit_to_cluster(
        &mut self,
        spec: &TaskSpec,
        owner: &str,
        at_ms: i64,
    ) -> Result<(), Outcome> {
        let Some(target) = &spec.cluster else {
            return Ok(());
        };
        if let Err(e) = check_cluster_name(&target.name) {
            return Err(conflict(e));
        }
        let Some(c) = self.clusters.get(&target.name) else {
            if target.exec {
                return Err(Outcome::Rejected(Rejection::NoSuchCluster(
                    target.name.clone(),
                )));
            }
            self.clusters.insert(
                target.name.clone(),
                Cluster {
                    name: target.name.clone(),
                    owner: owner.to_string(),
                    node_ids: Vec::new(),
                    num_nodes: spec.num_nodes,
                    resources: spec
                        .resources
                        .candidates
                        .iter()
                        .map(crate::task::ResourceCandidate::summary)
                        .collect::<Vec<_>>()
                        .join(" or "),
                    created_at_ms: at_ms,
                    autostop: spec.autostop.as_ref().and_then(AutostopSetting::enabled),
                    last_active_ms: at_ms,
                    ssh_sessions: 0,
                    stopped: false,
                    autostop_hook: None,
                    message: String::new(),
                },
            );
            return Ok(());
        };
        // Only its owner, or an admin (the API marks a non-admin's task
        // `keep_off_coordinator_user`), runs tasks on a cluster.
        if c.owner != owner && spec.keep_off_coordinator_user {
            return Err(conflict(format!(
                "cluster {} belongs to {}",
                c.name, c.owner
            )));
        }
        if let Err(e) = self.fits_cluster(c, spec) {
            return Err(conflict(e));
        }
        if c.stopped {
            if target.exec {
                return Err(conflict(format!(
                    "cluster {} is stopped; `nembo start {}` first (or `nembo launch -c {}` to \
                     start it and run the task)",
                    c.name, c.name, c.name
                )));
            }
            if let Outcome::Rejected(r) = self.start_cluster(&target.name, at_ms) {
                return Err(Outcome::Rejected(r));
            }
        }
        let Some(c) = self.clusters.get_mut(&target.name) else {
            return Ok(());
        };
        // The last setting wins, as SkyPilot's `launch -i` does.
        if let Some(setting) = &spec.autostop {
            c.autostop = setting.enabled();
        }
        c.last_active_ms = c.last_active_ms.max(at_ms);
        // New work: the next idle period runs the hook again.
        c.autostop_hook = None;
        Ok(())
    }

    /// A job left the active set: its cluster's idle period starts at its end.
    pub(super) fn note_cluster_job_ended(
        &mut self,
        job: super::JobId,
        spec: &TaskSpec,
        ended_at_ms: Option<i64>,
    ) {
        let (Some(t), Some(at)) = (&spec.cluster, ended_at_ms) else {
            return;
        };
        let Some(c) = self.clusters.get(&t.name) else {
            return;
        };
        // A cluster that never got a machine (nothing could host its task,
        // or every launch failed) goes with its last task, as SkyPilot
        // forgets a cluster it could not provision.
        let never_up = !c.stopped
            && c.node_ids.iter().all(|n| {
                self.nodes
                    .get(n)
                    .is_none_or(|n| n.state == NodeState::Failed)
            });
        let others = self.cluster_active_jobs(&t.name).any(|j| j.id != job);
        if never_up && !others {
            self.clusters.remove(&t.name);
            return;
        }
        if let Some(c) = self.clusters.get_mut(&t.name) {
            // The hook's own end is not activity: the stop it came before goes on.
            if c.autostop_hook != Some(job) {
                c.last_active_ms = c.last_active_ms.max(at);
            }
        }
    }

    /// Ends the cluster's unfinished jobs with `msg`.
    fn cancel_cluster_jobs(&mut self, name: &str, msg: &str, at_ms: i64) -> Vec<super::JobId> {
        let ids: Vec<super::JobId> = self
            .cluster_active_jobs(name)
            .filter(|j| !j.state.is_terminal())
            .map(|j| j.id)
            .collect();
        for id in &ids {
            if let Some(job) = self.jobs.get_mut(id).map(Arc::make_mut) {
                end_job(job, JobState::Cancelled, None, msg, at_ms);
            }
        }
        ids
    }

    /// Why the cluster's own nodes cannot be stopped, if one cannot.
    fn why_not_stoppable(&self, c: &Cluster) -> Option<String> {
        let own: Vec<&super::Node> = self.cluster_own_nodes(c).collect();
        // What can never work first; what waiting fixes last.
        for n in &own {
            if n.spot && !n.stoppable {
                return Some(format!(
                    "node {} runs on spot capacity, which {} cannot stop (only terminate); \
                     use `nembo down {}`",
                    n.id, n.provider, c.name
                ));
            }
            if !n.stoppable {
                return Some(format!(
                    "provider {} cannot stop its machines (node {}); use `nembo down {}`",
                    n.provider, n.id, c.name
                ));
            }
        }
        own.iter()
            .find(|n| n.state == NodeState::Provisioning)
            .map(|n| format!("node {} is still being provisioned", n.id))
    }

    pub(super) fn stop_cluster(&mut self, name: &str, why: &str, at_ms: i64) -> Outcome {
        let Some(c) = self.clusters.get(name) else {
            return Outcome::Rejected(Rejection::NoSuchCluster(name.to_string()));
        };
        if c.stopped {
            return Outcome::Applied;
        }
        if let Some(why) = self.why_not_stoppable(c) {
            return conflict(format!("cannot stop cluster {name}: {why}"));
        }
        let own = self.own_node_ids(c);
        let touched = self.cancel_cluster_jobs(name, &format!("cluster {name} stopped"), at_ms);
        for id in touched {
            self.reindex(id);
        }
        for id in own {
            if let Some(n) = self.nodes.get_mut(&id) {
                if matches!(
                    n.state,
                    NodeState::Ready | NodeState::Lost | NodeState::Starting
                ) {
                    n.state = NodeState::Stopping;
                    n.message = format!("stopping: {why}");
                }
            }
        }
        if let Some(c) = self.clusters.get_mut(name) {
            c.stopped = true;
            c.autostop_hook = None;
            c.message = why.to_string();
        }
        Outcome::Applied
    }

    pub(super) fn start_cluster(&mut self, name: &str, at_ms: i64) -> Outcome {
        let Some(c) = self.clusters.get(name) else {
            return Outcome::Rejected(Rejection::NoSuchCluster(name.to_string()));
        };
        if !c.stopped {
            return Outcome::Applied;
        }
        let own = self.own_node_ids(c);
        if let Some(n) = own
            .iter()
            .filter_map(|id| self.nodes.get(id))
            .find(|n| n.state == NodeState::Stopping)
        {
            return conflict(format!(
                "cluster {name} is still stopping (node {}); start it once it is STOPPED",
                n.id
            ));
        }
        for id in own {
            if let Some(n) = self.nodes.get_mut(&id) {
                if n.state == NodeState::Stopped {
                    n.state = NodeState::Starting;
                    n.message = "starting".into();
                    if let Some(since) = n.stopped_since_ms.take() {
                        n.stopped_ms += (at_ms - since).max(0);
                    }
                }
            }
        }
        if let Some(c) = self.clusters.get_mut(name) {
            c.stopped = false;
            c.autostop_hook = None;
            c.message.clear();
            c.last_active_ms = c.last_active_ms.max(at_ms);
        }
        Outcome::Applied
    }

    pub(super) fn down_cluster(&mut self, name: &str, at_ms: i64) -> Outcome {
        let Some(c) = self.clusters.get(name) else {
            return Outcome::Rejected(Rejection::NoSuchCluster(name.to_string()));
        };
        let own = self.own_node_ids(c);
        let touched = self.cancel_cluster_jobs(name, &format!("cluster {name} torn down"), at_ms);
        for id in touched {
            self.reindex(id);
        }
        self.clusters.remove(name);
        if own.is_empty() {
            return Outcome::Applied;
        }
        self.terminate_nodes(&own, at_ms)
    }

    pub(super) fn set_autostop(
        &mut self,
        name: &str,
        autostop: &Option<Autostop>,
        at_ms: i64,
    ) -> Outcome {
        let Some(c) = self.clusters.get_mut(name) else {
            return Outcome::Rejected(Rejection::NoSuchCluster(name.to_string()));
        };
        c.autostop = autostop.clone();
        c.last_active_ms = c.last_active_ms.max(at_ms);
        Outcome::Applied
    }

    pub(super) fn autostop_cluster(&mut self, name: &str, at_ms: i64) -> Outcome {
        let Some(c) = self.clusters.get(name) else {
            return Outcome::Rejected(Rejection::NoSuchCluster(name.to_string()));
        };
        if !self.autostop_due(c, at_ms) {
            return conflict(format!(
                "cluster {name} is not idle for its autostop window"
            ));
        }
        let Some(a) = c.autostop.clone() else {
            return Outcome::Applied;
        };
        // SkyPilot's autostop hook: run first, on the head node, as a job
        // of the cluster's own; the stop comes once it ends or times out.
        if let (Some(hook), None) = (&a.hook, c.autostop_hook) {
            let (owner, last_active) = (c.owner.clone(), c.last_active_ms);
            let mut spec = TaskSpec {
                name: Some("autostop-hook".into()),
                num_nodes: 1,
                run: Some(hook.clone()),
                cluster: Some(crate::task::ClusterTarget {
                    name: name.to_string(),
                    exec: true,
                }),
                ..Default::default()
            };
            // Any resources: it runs on the head, whatever that is.
            spec.resources
                .candidates
                .push(crate::task::ResourceCandidate::default());
            let outcome = self.submit_job(&spec, None, &owner, at_ms);
            if let (Outcome::Job { job_id, .. }, Some(c)) = (&outcome, self.clusters.get_mut(name))
            {
                c.autostop_hook = Some(*job_id);
                // Submitting it was not activity.
                c.last_active_ms = last_active;
            }
            return outcome;
        }
        let why = format!("autostop: idle for {}", a.window());
        if a.down || self.why_not_stoppable(c).is_some() {
            return self.down_cluster(name, at_ms);
        }
        self.stop_cluster(name, &why, at_ms)
    }

    pub(super) fn node_stopped(&mut self, node_id: &str, at_ms: i64) -> Outcome {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return Outcome::Rejected(Rejection::NoSuchNode(node_id.to_string()));
        };
        if node.state != NodeState::Stopping {
            return conflict(format!("node {node_id} is {:?}, not stopping", node.state));
        }
        node.state = NodeState::Stopped;
        node.stopped_since_ms = Some(at_ms);
        node.message = "stopped".into();
        self.fail_ranks_on(node_id, &format!("node {node_id} stopped"), at_ms);
        Outcome::Applied
    }

    pub(super) fn ssh_session(&mut self, name: &str, open: bool, at_ms: i64) -> Outcome {
        let Some(c) = self.clusters.get_mut(name) else {
            return Outcome::Rejected(Rejection::NoSuchCluster(name.to_string()));
        };
        if open {
            c.ssh_sessions += 1;
        } else {
            c.ssh_sessions = c.ssh_sessions.saturating_sub(1);
        }
        c.last_active_ms = c.last_active_ms.max(at_ms);
        Outcome::Applied
    }
}

/// The commands of the cluster family, dispatched from `apply_inner`.
impl State {
    pub(super) fn apply_cluster(&mut self, cmd: &Command) -> Outcome {
        match cmd {
            Command::StopCluster { name, at_ms } => {
                self.stop_cluster(name, "stopped by user", *at_ms)
            }
            Command::StartCluster { name, at_ms } => self.start_cluster(name, *at_ms),
            Command::DownCluster { name, at_ms } => self.down_cluster(name, *at_ms),
            Command::SetAutostop {
                name,
                autostop,
                at_ms,
            } => self.set_autostop(name, autostop, *at_ms),
            Command::AutostopCluster { name, at_ms } => self.autostop_cluster(name, *at_ms),
            Command::NodeStopped { node_id, at_ms } => self.node_stopped(node_id, *at_ms),
            Command::SshSession { name, open, at_ms } => self.ssh_session(name, *open, *at_ms),
            _ => Outcome::Applied,
        }
    }
}
