//! The context every service and loop of one coordinator shares: the Raft
//! member, providers, logs, telemetry and credentials. Owners with their
//! own mailboxes (the Raft thread, the fleet, the liveness loop) sit behind
//! it; what is here is read-mostly.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nembo_domain::state::{Command, JobId, Offering, State};
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::CoordinatorError;
use crate::identity::issuer::Issuer;
use crate::identity::sealed::SecretBox;
use crate::logs::LogStore;
use crate::provider::Provider;
use crate::replication::raft::RaftHandle;
use crate::telemetry::fleet::Fleet;
use crate::telemetry::heartbeats::DelayHistogram;

/// Shared by the services and loops of one coordinator.
pub struct Ctx {
    /// The Raft member.
    pub raft: RaftHandle,
    /// Job output.
    pub logs: LogStore,
    /// Uploaded file contents (local file mounts, workdirs).
    pub blobs: crate::blobs::BlobStore,
    /// Providers by name.
    pub providers: BTreeMap<String, Arc<dyn Provider>>,
    /// Every provider's offerings.
    pub offerings: Vec<Offering>,
    /// Seals task secrets before they are proposed; opens them for agents.
    pub secrets: SecretBox,
    /// Signs agent certificates (none: this member has no CA key).
    pub issuer: Option<Arc<Issuer>>,
    /// The secret node tokens are derived from.
    pub join_secret: Arc<str>,
    /// Lifetime of agent certificates.
    pub agent_cert_ttl: Duration,
    /// Providers that providers.yaml leaves off, and how to enable them.
    pub providers_not_enabled: Vec<(&'static str, &'static str)>,
    /// Where refreshed catalogs are written.
    pub catalog_dir: PathBuf,
    /// Directories no task's workdir may be, hold or be inside: the
    /// coordinator's data, the cluster's credentials, the nodes' dirs.
    pub own_dirs: Vec<PathBuf>,
    /// Heartbeat period given to agents.
    pub heartbeat_ms: u32,
    /// How long an agent may hear nothing from a leader before it stops
    /// the attempts that would be replaced elsewhere: half the node TTL, so
    /// they are over before its node can be declared lost.
    pub contact_lease_ms: u32,
    /// Grace for stopping jobs.
    pub stop_grace_ms: u32,
    /// GPU telemetry of the nodes whose sessions this member holds.
    pub fleet: Fleet,
    /// Agent heartbeat delays, for `/metrics`.
    pub heartbeat_delay: DelayHistogram,
    /// Shell command run (on the leader) when a node turns unhealthy.
    pub on_unhealthy: Option<String>,
    /// Autostop given to a new cluster whose task sets none (none: clusters
    /// stay up until stopped).
    pub default_autostop: Option<nembo_domain::task::Autostop>,
    /// Ranks by node for the newest state, shared by every agent session.
    pub(crate) ranks: RanksCache,
    /// Shell sessions and the agent sessions they ride on.
    pub shells: crate::agents::shells::ShellRoutes,
    /// The liveness loop's mailbox ([`Ctx::heartbeat`]).
    pub(crate) heartbeats: mpsc::Sender<String>,
    /// Load balancers' addresses and request counts.
    pub serve: crate::serve::Serving,
    /// Slots for work kept off the runtime's workers ([`Ctx::off_runtime`]).
    pub(crate) blocking_slots: Arc<tokio::sync::Semaphore>,
}

/// The newest state's [`RanksByNode`], built once per state version.
#[derive(Default)]
pub(crate) struct RanksCache(std::sync::Mutex<Option<(Arc<State>, RanksByNode)>>);

/// node id -> (job, rank) of every current attempt's rank placed there.
pub type RanksByNode = Arc<HashMap<String, Vec<(JobId, usize)>>>;

impl Ctx {
    /// Where each job's current ranks are, for `state`: built once per
    /// state version (O(ranks)) instead of once per agent session (which
    /// made every commit cost sessions x ranks).
    pub fn ranks_by_node(&self, state: &Arc<State>) -> RanksByNode {
        let mut cached = self.ranks.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, r)) = cached.as_ref() {
            if Arc::ptr_eq(s, state) {
                return r.clone();
            }
        }
        let mut by_node: HashMap<String, Vec<(JobId, usize)>> = HashMap::new();
        for job in state.placed_jobs() {
            if let Some(a) = job.current_attempt() {
                for (rank, node) in a.node_ids.iter().enumerate() {
                    by_node
                        .entry(node.clone())
                        .or_default()
                        .push((job.id, rank));
                }
            }
        }
        let r = Arc::new(by_node);
        *cached = Some((state.clone(), r.clone()));
        r
    }

    /// Resets a node's liveness timer. Never blocks: a full mailbox means
    /// the timer was reset moments ago.
    pub fn heartbeat(&self, node_id: &str) {
        let _ = self.heartbeats.try_send(node_id.to_string());
    }

    /// Runs `work` (parsing a client's task, say) on a blocking thread, at
    /// most one per core at once: however costly a request is, the runtime's
    /// workers stay free for heartbeats, Raft traffic and other callers. The
    /// caller's deadline still applies: a call that times out stops waiting.
    pub async fn off_runtime<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, CoordinatorError> {
        let slot = self
            .blocking_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| CoordinatorError::Internal("shutting down".into()))?;
        // The slot goes with the work, not with the waiting caller: work
        // whose caller gave up still holds its slot until it is done.
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            work()
        })
        .await
        .map_err(|e| CoordinatorError::Internal(format!("blocking work failed: {e}")))
    }

    /// Agents talk to the leader alone (their sessions carry its orders,
    /// enrollment spends tokens): a follower refuses them, naming the
    /// leader's URL so that they reconnect there at once.
    pub fn require_leader(&self) -> Result<(), Status> {
        let view = self.raft.view();
        if view.is_leader() {
            return Ok(());
        }
        let mut status = Status::unavailable("not the leader");
        if let Some(url) = view.members.get(&view.leader_id) {
            if let Ok(v) = url.parse() {
                status.metadata_mut().insert(nembo_proto::LEADER_URL_KEY, v);
            }
        }
        Err(status)
    }

    /// Proposes a command whose failure only needs logging (loops retry on
    /// the next state change).
    pub async fn propose_quietly(&self, cmd: Command) {
        match self.raft.propose(cmd).await {
            Ok(nembo_domain::state::Outcome::Rejected(r)) => {
                tracing::debug!(reason = %r, "command rejected")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "proposal failed"),
        }
    }
}
