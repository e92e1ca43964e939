//! The Raft member: a raft-rs `RawNode` driven by one dedicated OS thread
//! that owns the node, the durable store and the state machine.
//!
//! Callers talk to it through a channel ([`RaftHandle::propose`]) and read
//! the applied state from a `watch` channel; nothing else touches the state.
//! The member and its Ready loop are in `member.rs`.

mod logger;
mod member;
mod store;

use member::Member;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use nembo_domain::state::{Command, Outcome, State};
use raft::eraftpb::{ConfChangeV2, Message};
use raft::prelude::RawNode;
use raft::StateRole;
use tokio::sync::{oneshot, watch};

pub use store::{NemboStorage, PendingSnapshot, RaftStore, WrittenSnapshot};

/// How a member is set up.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// This member's id (non-zero).
    pub id: u64,
    /// Voters of a fresh cluster (ignored once the store has a configuration);
    /// empty for a member that joins an existing cluster.
    pub voters: Vec<u64>,
    /// Member URLs known at start (this one included); conf changes update them.
    pub members: BTreeMap<u64, String>,
    /// Data directory for the log and snapshots.
    pub dir: PathBuf,
    /// Raft tick; heartbeat every tick, election after 6-10 silent ticks.
    pub tick: Duration,
    /// Snapshot the state machine and compact the log every this many
    /// entries (or sooner, once the entries since the last snapshot reach
    /// [`SNAPSHOT_LOG_BYTES`]).
    pub snapshot_every: u64,
}

/// What readers see: the applied state and where Raft stands.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// State machine as of `applied`.
    pub state: Arc<State>,
    /// This member.
    pub id: u64,
    /// Current leader (0 = unknown).
    pub leader_id: u64,
    /// Current term.
    pub term: u64,
    /// Highest committed index.
    pub commit: u64,
    /// Highest applied index.
    pub applied: u64,
    /// Index of the newest snapshot.
    pub snapshot_index: u64,
    /// Voting members.
    pub voters: Vec<u64>,
    /// Learners (receive the log, do not vote).
    pub learners: Vec<u64>,
    /// URLs of the members, by id.
    pub members: BTreeMap<u64, String>,
}

impl ClusterView {
    /// Whether this member leads.
    pub fn is_leader(&self) -> bool {
        self.leader_id == self.id
    }
}

/// Why a proposal was not applied.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// Only the leader takes proposals.
    #[error("not the leader (leader is {leader})")]
    NotLeader {
        /// Known leader, 0 if none.
        leader: u64,
    },
    /// Leadership changed before the entry committed; its fate is unknown.
    #[error("proposal dropped by a leadership change; retry with the same idempotency key")]
    Dropped,
    /// The member has stopped.
    #[error("raft member stopped")]
    Stopped,
}

/// The member's durable storage (log, snapshots) or its thread failed: the
/// member cannot go on.
#[derive(Debug, thiserror::Error)]
#[error("storage: {0}")]
pub struct StorageError(pub String);

/// Compaction by size: snapshot once the entries applied since the last
/// snapshot add up to this many bytes, however few they are - or to the
/// size of the last snapshot, if larger: writing the whole state then costs
/// no more than writing the log did, and the log on disk stays within the
/// state's size.
pub const SNAPSHOT_LOG_BYTES: u64 = 64 * 1024 * 1024;

type Reply = oneshot::Sender<Result<Outcome, ProposeError>>;
type SnapshotChannel = (
    mpsc::Sender<Result<WrittenSnapshot, StorageError>>,
    mpsc::Receiver<Result<WrittenSnapshot, StorageError>>,
);

/// Carries raft messages to other members. Called on the Raft thread: it
/// must queue, never block.
pub trait Transport: Send + 'static {
    /// Queues `msg` for `msg.to`.
    fn send(&self, msg: Message);
    /// The members (this one included) and their URLs changed.
    fn set_members(&self, _members: &BTreeMap<u64, String>) {}
}

enum Input {
    Propose(Box<Command>, Reply),
    ConfChange(Box<ConfChangeV2>, Reply),
    TransferLeader(u64),
    /// How far a member's log matches the leader's: (matched, leader's last index).
    Progress(u64, oneshot::Sender<Option<(u64, u64)>>),
    /// Snapshot and compact now.
    Compact(oneshot::Sender<Result<(), String>>),
    ReadIndex(oneshot::Sender<u64>),
    Step(Box<Message>),
    Unreachable(u64),
    SnapshotDone {
        to: u64,
        ok: bool,
    },
}

/// Handle to a running member. Cheap to clone.
#[derive(Clone)]
pub struct RaftHandle {
    tx: mpsc::Sender<Input>,
    view: watch::Receiver<Arc<ClusterView>>,
}

impl RaftHandle {
    /// Proposes a command; resolves once it is committed, durable and applied.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Propose(Box::new(cmd), tx))
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Waits until this member may serve a linearizable read: the leader
    /// confirms with a quorum that it still leads (Raft's read index) and
    /// has applied up to the commit index it had when asked. Fails on a
    /// follower, and times out when no leadership can be confirmed (a new
    /// leader that has not committed in its term drops the request).
    pub async fn read_index(&self) -> Result<(), ProposeError> {
        let view = self.view();
        if !view.is_leader() {
            return Err(ProposeError::NotLeader {
                leader: view.leader_id,
            });
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::ReadIndex(tx))
            .map_err(|_| ProposeError::Stopped)?;
        let index = tokio::time::timeout(Duration::from_secs(2), rx)
            .await
            .map_err(|_| ProposeError::Dropped)?
            .map_err(|_| ProposeError::Dropped)?;
        let mut views = self.view.clone();
        tokio::time::timeout(
            Duration::from_secs(2),
            views.wait_for(|v| v.applied >= index),
        )
        .await
        .map_err(|_| ProposeError::Dropped)?
        .map_err(|_| ProposeError::Stopped)?;
        Ok(())
    }

    /// Proposes a membership change; resolves once it is applied. Adds carry
    /// the new member's URL as the change's context (JSON `{"url": ...}`).
    pub async fn change_membership(&self, cc: ConfChangeV2) -> Result<Outcome, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::ConfChange(Box::new(cc), tx))
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Asks the leader to hand leadership to `to`.
    pub fn transfer_leader(&self, to: u64) {
        let _ = self.tx.send(Input::TransferLeader(to));
    }

    /// On the leader: (matched index of member `id`, leader's last index).
    pub async fn progress(&self, id: u64) -> Option<(u64, u64)> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Input::Progress(id, tx)).ok()?;
        rx.await.ok().flatten()
    }

    /// Snapshots the state and compacts the log now (so that a member added
    /// next starts from a snapshot that carries the configuration).
    pub async fn compact(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Compact(tx))
            .map_err(|_| "raft member stopped".to_string())?;
        rx.await.map_err(|_| "raft member stopped".to_string())?
    }

    /// Feeds a message from another member.
    pub fn step(&self, msg: Message) {
        let _ = self.tx.send(Input::Step(Box::new(msg)));
    }

    /// Tells Raft that a member could not be reached.
    pub fn report_unreachable(&self, id: u64) {
        let _ = self.tx.send(Input::Unreachable(id));
    }

    /// Tells Raft whether a snapshot reached a member.
    pub fn report_snapshot(&self, to: u64, ok: bool) {
        let _ = self.tx.send(Input::SnapshotDone { to, ok });
    }

    /// The latest applied view.
    pub fn view(&self) -> Arc<ClusterView> {
        self.view.borrow().clone()
    }

    /// A receiver that wakes on every new view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.view.clone()
    }
}

/// Opens the store, recovers the state and starts the member's thread.
pub fn start(
    cfg: RaftConfig,
    transport: Box<dyn Transport>,
) -> Result<(RaftHandle, std::thread::JoinHandle<()>), StorageError> {
    // At a 100 ms tick: heartbeats every 100 ms, elections after a random
    // 0.6-1.0 s of silence (etcd: 1-2 s). The spread keeps split votes rare;
    // the low end bounds failover (measured in BENCHMARKS.md).
    let (mut member, view) = open_member(cfg.clone(), transport, 6..10)?;
    let (snapshots_tx, snapshots_rx) = mpsc::channel();
    member.snapshots = Some((snapshots_tx, snapshots_rx));
    let (tx, rx) = mpsc::channel();
    let join = std::thread::Builder::new()
        .name(format!("raft-{}", cfg.id))
        .spawn(move || member.run(rx))
        .map_err(|e| StorageError(format!("spawn raft thread: {e}")))?;
    Ok((RaftHandle { tx, view }, join))
}

/// Recovers a member from its store. `election` is the range (in ticks)
/// raft-rs draws each election timeout from.
fn open_member(
    cfg: RaftConfig,
    transport: Box<dyn Transport>,
    election: std::ops::Range<usize>,
) -> Result<(Member, watch::Receiver<Arc<ClusterView>>), StorageError> {
    let recovered = RaftStore::open(&cfg.dir, &cfg.voters)?;
    let raft_cfg = raft::Config {
        id: cfg.id,
        election_tick: election.start,
        min_election_tick: election.start,
        max_election_tick: election.end,
        heartbeat_tick: 1,
        applied: recovered.applied,
        pre_vote: true,
        check_quorum: true,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        ..Default::default()
    };
    raft_cfg
        .validate()
        .map_err(|e| StorageError(format!("raft config: {e}")))?;
    let logger = logger::logger(cfg.id);
    let mut node = RawNode::new(&raft_cfg, recovered.store.storage(), &logger)
        .map_err(|e| StorageError(format!("raft: {e}")))?;
    let voters = node
        .raft
        .prs()
        .conf()
        .voters()
        .ids()
        .iter()
        .collect::<Vec<_>>();
    if voters == [cfg.id] {
        // A lone voter need not wait out an election timeout to lead.
        let _ = node.campaign();
    }
    let state = recovered.state;
    let members = if recovered.members.is_empty() {
        cfg.members.clone()
    } else {
        recovered.members
    };
    transport.set_members(&members);
    let learners = node.raft.prs().conf().learners().iter().copied().collect();
    let view = Arc::new(ClusterView {
        state: Arc::new(state.clone()),
        id: cfg.id,
        leader_id: node.raft.leader_id,
        term: node.raft.term,
        commit: node.raft.raft_log.committed,
        applied: recovered.applied,
        snapshot_index: recovered.store.snapshot_index(),
        voters,
        learners,
        members: members.clone(),
    });
    let (view_tx, view_rx) = watch::channel(view);
    let member = Member {
        node,
        store: recovered.store,
        state,
        applied: recovered.applied,
        pending: HashMap::new(),
        replies: Vec::new(),
        reads: HashMap::new(),
        next_read: 0,
        snapshots: None,
        snapshotting: false,
        snapshot_due: false,
        compact_waiters: Vec::new(),
        log_bytes: 0,
        leading: false,
        dirty: false,
        members,
        transport,
        view_tx,
        cfg,
    };
    Ok((member, view_rx))
}

/// A member with no thread and no clock: its owner feeds every input and
/// decides when time passes. The deterministic cluster simulation drives
/// members this way, so that a seed replays the same run. Election timeouts
/// are fixed (`election_ticks`) rather than drawn at random; the driver's
/// seeded choice of whom to tick supplies the randomness.
pub struct DrivenMember {
    member: Member,
    view: watch::Receiver<Arc<ClusterView>>,
}

impl DrivenMember {
    /// Recovers the member from `cfg.dir`.
    pub fn open(
        cfg: RaftConfig,
        transport: Box<dyn Transport>,
        election_ticks: usize,
    ) -> Result<Self, StorageError> {
        let (member, view) = open_member(cfg, transport, election_ticks..election_ticks + 1)?;
        Ok(DrivenMember { member, view })
    }

    /// One Raft tick.
    pub fn tick(&mut self) {
        self.member.node.tick();
    }

    /// A message from another member.
    pub fn step(&mut self, msg: Message) {
        self.member.handle(Input::Step(Box::new(msg)));
    }

    /// Proposes `cmd`. On the leader, returns the log index it was given
    /// and where its outcome will arrive.
    pub fn propose(
        &mut self,
        cmd: Command,
    ) -> Result<(u64, oneshot::Receiver<Result<Outcome, ProposeError>>), ProposeError> {
        let (tx, mut rx) = oneshot::channel();
        self.member.handle(Input::Propose(Box::new(cmd), tx));
        match rx.try_recv() {
            Ok(Err(e)) => Err(e),
            Ok(Ok(_)) => unreachable!("a proposal is never answered before it is applied"),
            Err(_) => Ok((self.member.node.raft.raft_log.last_index(), rx)),
        }
    }

    /// Asks for a read index; the answer arrives once a quorum confirmed.
    pub fn read_index(&mut self) -> oneshot::Receiver<u64> {
        let (tx, rx) = oneshot::channel();
        self.member.handle(Input::ReadIndex(tx));
        rx
    }

    /// Proposes a membership change.
    pub fn change_membership(
        &mut self,
        cc: ConfChangeV2,
    ) -> oneshot::Receiver<Result<Outcome, ProposeError>> {
        let (tx, rx) = oneshot::channel();
        self.member.handle(Input::ConfChange(Box::new(cc), tx));
        rx
    }

    /// Processes whatever Raft has ready: persist (fsync), send, apply.
    pub fn process_ready(&mut self) -> Result<(), StorageError> {
        self.member.on_ready()
    }

    /// Snapshots the state and compacts the log now.
    pub fn compact(&mut self) -> Result<(), String> {
        let (tx, mut rx) = oneshot::channel();
        self.member.handle(Input::Compact(tx));
        rx.try_recv().map_err(|e| e.to_string())?
    }

    /// Whether a snapshot sent to `to` arrived.
    pub fn report_snapshot(&mut self, to: u64, ok: bool) {
        self.member.handle(Input::SnapshotDone { to, ok });
    }

    /// Whether Raft's role is leader right now (the view may lag a step).
    pub fn is_leader(&self) -> bool {
        self.member.node.raft.state == StateRole::Leader
    }

    /// Current term.
    pub fn term(&self) -> u64 {
        self.member.node.raft.term
    }

    /// The latest published view.
    pub fn view(&self) -> Arc<ClusterView> {
        self.view.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member with no peers.
    struct NoPeers;

    impl Transport for NoPeers {
        fn send(&self, msg: Message) {
            panic!("a lone member sent a raft message to {}", msg.to);
        }
    }
    use nembo_domain::task::parse_task_yaml;

    fn submit(name: &str) -> Command {
        Command::SubmitJob {
            spec: parse_task_yaml(&format!("name: {name}\nrun: echo"), &Default::default())
                .unwrap(),
            idempotency_key: Some(name.to_string()),
            owner: String::new(),
            at_ms: 1,
        }
    }

    fn cfg(dir: &std::path::Path) -> RaftConfig {
        RaftConfig {
            id: 1,
            voters: vec![1],
            members: BTreeMap::new(),
            dir: dir.to_path_buf(),
            tick: Duration::from_millis(10),
            snapshot_every: 4,
        }
    }

    #[tokio::test]
    async fn acknowledged_commands_survive_restart_through_snapshots() {
        let d = tempfile::tempdir().unwrap();
        let (h, thread) = start(cfg(d.path()), Box::new(NoPeers)).unwrap();
        let mut rx = h.subscribe();
        rx.wait_for(|v| v.is_leader()).await.unwrap();
        for i in 0..11 {
            let out = h.propose(submit(&format!("j{i}"))).await.unwrap();
            assert_eq!(
                out,
                Outcome::Job {
                    job_id: i + 1,
                    existing: false
                }
            );
        }
        // Snapshots are written in the background: wait for one past 8.
        let before = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|v| v.snapshot_index >= 8),
        )
        .await
        .expect("snapshots were taken")
        .unwrap()
        .clone();
        drop((h, rx));
        thread.join().unwrap();

        let (h, _thread) = start(cfg(d.path()), Box::new(NoPeers)).unwrap();
        let mut rx = h.subscribe();
        let after = rx
            .wait_for(|v| v.applied >= before.applied)
            .await
            .unwrap()
            .clone();
        assert_eq!(*after.state, *before.state);
        // Idempotency keys came back with the state.
        let out = h.propose(submit("j3")).await.unwrap();
        assert_eq!(
            out,
            Outcome::Job {
                job_id: 4,
                existing: true
            }
        );
    }
}
