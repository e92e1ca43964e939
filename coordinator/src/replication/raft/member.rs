//! The member itself: the raft-rs node, its durable store and the state
//! machine, owned by one thread (or, driven, by the simulation). The
//! Ready loop follows raft-notes §2: send leader messages, apply committed
//! entries, persist entries + HardState (fsync), send persisted messages,
//! advance, apply what the light ready committed.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Instant;

use nembo_domain::state::{Command, Outcome, State};
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message};
use raft::prelude::RawNode;
use raft::StateRole;
use tokio::sync::{oneshot, watch};

use super::store::{NemboStorage, RaftStore};
use super::{
    ClusterView, Input, ProposeError, RaftConfig, Reply, SnapshotChannel, StorageError, Transport,
    SNAPSHOT_LOG_BYTES,
};

pub(super) struct Member {
    pub(super) node: RawNode<NemboStorage>,
    pub(super) store: RaftStore,
    pub(super) state: State,
    pub(super) applied: u64,
    /// Proposals waiting to be applied: index -> (term, reply).
    pub(super) pending: HashMap<u64, (u64, Reply)>,
    /// Read-index requests waiting for their ReadState: context -> reply.
    pub(super) reads: HashMap<u64, oneshot::Sender<u64>>,
    pub(super) next_read: u64,
    /// Replies held until the view that contains their effect is published.
    pub(super) replies: Vec<(Reply, Result<Outcome, ProposeError>)>,
    /// Where background snapshot writes report back (threaded members; a
    /// driven member snapshots inline, keeping simulations deterministic).
    pub(super) snapshots: Option<SnapshotChannel>,
    /// A background snapshot write is under way.
    pub(super) snapshotting: bool,
    /// A snapshot was asked for (compaction, a new member) and not yet begun.
    pub(super) snapshot_due: bool,
    /// Explicit compactions waiting for a snapshot at least at this index.
    pub(super) compact_waiters: Vec<(u64, oneshot::Sender<Result<(), String>>)>,
    /// Bytes of entries applied since the last snapshot began.
    pub(super) log_bytes: u64,
    /// Whether this member led at the end of the last Ready.
    pub(super) leading: bool,
    /// Whether anything applied since the last publish changed the state.
    pub(super) dirty: bool,
    /// Member URLs, as of the last applied conf change.
    pub(super) members: BTreeMap<u64, String>,
    pub(super) transport: Box<dyn Transport>,
    pub(super) view_tx: watch::Sender<Arc<ClusterView>>,
    pub(super) cfg: RaftConfig,
}

impl Member {
    pub(super) fn run(&mut self, rx: mpsc::Receiver<Input>) {
        let mut last_tick = Instant::now();
        // A lone voter's campaign is ready to process before any input arrives.
        if let Err(e) = self.on_ready() {
            tracing::error!(error = %e, "raft storage failed at start");
            return;
        }
        loop {
            let wait = self.cfg.tick.saturating_sub(last_tick.elapsed());
            match rx.recv_timeout(wait) {
                Ok(input) => {
                    self.handle(input);
                    // Batch everything queued into one Ready (one fsync).
                    while let Ok(more) = rx.try_recv() {
                        self.handle(more);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if let Err(e) = self
                .finish_background_snapshot()
                .and_then(|()| self.maybe_snapshot())
            {
                tracing::error!(error = %e, "raft storage failed; member stopping");
                break;
            }
            if last_tick.elapsed() >= self.cfg.tick {
                self.node.tick();
                last_tick = Instant::now();
            }
            if let Err(e) = self.on_ready() {
                // Any storage failure leaves raft inoperable: stop, loudly.
                tracing::error!(error = %e, "raft storage failed; member stopping");
                break;
            }
        }
        for (_, (_, reply)) in self.pending.drain() {
            let _ = reply.send(Err(ProposeError::Stopped));
        }
    }

    pub(super) fn handle(&mut self, input: Input) {
        match input {
            Input::Step(mut msg) => {
                // A member restarted without its disk is still counted by the
                // leader as holding what it had; the leader's heartbeat then
                // names a commit index beyond our log, which raft-rs treats
                // as fatal. We can only ever commit what we hold, so clamp.
                // (Such a member must still be replaced - removed, then added
                // back empty with --join - since it forgot its votes.)
                if msg.get_msg_type() == raft::eraftpb::MessageType::MsgHeartbeat {
                    msg.commit = msg.commit.min(self.node.raft.raft_log.last_index());
                }
                // A member that joined with no configuration must start from
                // the leader's snapshot: replaying entries from an empty
                // configuration would apply conf changes to nothing.
                let unconfigured = {
                    let conf = self.node.raft.prs().conf();
                    conf.voters().ids().iter().next().is_none() && conf.learners().is_empty()
                };
                if unconfigured && msg.get_msg_type() == raft::eraftpb::MessageType::MsgAppend {
                    return;
                }
                if let Err(e) = self.node.step(*msg) {
                    tracing::debug!(error = %e, "raft message ignored");
                }
            }
            Input::Unreachable(id) => self.node.report_unreachable(id),
            Input::ConfChange(cc, reply) => {
                if self.node.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(ProposeError::NotLeader {
                        leader: self.node.raft.leader_id,
                    }));
                    return;
                }
                let before = self.node.raft.raft_log.last_index();
                match self.node.propose_conf_change(vec![], *cc) {
                    Ok(()) if self.node.raft.raft_log.last_index() > before => {
                        let index = self.node.raft.raft_log.last_index();
                        self.pending.insert(index, (self.node.raft.term, reply));
                    }
                    // e.g. a change while another is still pending
                    _ => {
                        let _ = reply.send(Ok(Outcome::Rejected(
                            nembo_domain::state::Rejection::Conflict(
                                "membership change refused (another one is in progress?)".into(),
                            ),
                        )));
                    }
                }
            }
            Input::TransferLeader(to) => self.node.transfer_leader(to),
            Input::Progress(id, reply) => {
                let last = self.node.raft.raft_log.last_index();
                let matched = self.node.raft.prs().get(id).map(|p| (p.matched, last));
                let _ = reply.send(matched.filter(|_| self.node.raft.state == StateRole::Leader));
            }
            Input::Compact(reply) => {
                if self.applied <= self.store.snapshot_index() {
                    let _ = reply.send(Ok(())); // nothing applied since the last one
                } else if self.snapshots.is_none() {
                    let result = self
                        .store
                        .snapshot(&self.state, &self.members, self.applied)
                        .map_err(|e| e.to_string());
                    let _ = reply.send(result);
                } else {
                    // Answered once a snapshot at least this recent is durable.
                    self.compact_waiters.push((self.applied, reply));
                    self.snapshot_due = true;
                }
            }
            Input::ReadIndex(reply) => {
                self.next_read += 1;
                self.reads.insert(self.next_read, reply);
                self.node.read_index(self.next_read.to_be_bytes().to_vec());
            }
            Input::SnapshotDone { to, ok } => {
                let status = if ok {
                    raft::SnapshotStatus::Finish
                } else {
                    raft::SnapshotStatus::Failure
                };
                self.node.report_snapshot(to, status);
            }
            Input::Propose(cmd, reply) => {
                if self.node.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(ProposeError::NotLeader {
                        leader: self.node.raft.leader_id,
                    }));
                    return;
                }
                let data = match serde_json::to_vec(&cmd) {
                    Ok(d) => d,
                    Err(_) => {
                        let _ = reply.send(Err(ProposeError::Dropped));
                        return;
                    }
                };
                let before = self.node.raft.raft_log.last_index();
                match self.node.propose(vec![], data) {
                    Ok(()) if self.node.raft.raft_log.last_index() > before => {
                        let index = self.node.raft.raft_log.last_index();
                        self.pending.insert(index, (self.node.raft.term, reply));
                    }
                    _ => {
                        let _ = reply.send(Err(ProposeError::Dropped));
                    }
                }
            }
        }
    }

    pub(super) fn on_ready(&mut self) -> Result<(), StorageError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();
        self.send(ready.take_messages());
        for rs in ready.take_read_states() {
            let ctx = <[u8; 8]>::try_from(rs.request_ctx.as_slice()).map(u64::from_be_bytes);
            if let Some(reply) = ctx.ok().and_then(|c| self.reads.remove(&c)) {
                let _ = reply.send(rs.index);
            }
        }
        if !ready.snapshot().is_empty() {
            // We were too far behind the leader's compacted log: take its state whole.
            let snap = ready.snapshot().clone();
            let (state, members) = self.store.install_snapshot(&snap)?;
            self.state = state;
            if !members.is_empty() {
                self.members = members;
                self.transport.set_members(&self.members);
            }
            self.applied = snap.get_metadata().index;
            self.dirty = true;
            tracing::info!(index = self.applied, "installed snapshot from the leader");
        }
        self.apply(ready.take_committed_entries())?;
        self.store
            .append(ready.entries(), ready.hs(), ready.must_sync())?;
        self.send(ready.take_persisted_messages());
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.store.set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.node.advance_apply();

        // Leadership may have been lost here or in `handle` (a message
        // with a higher term): either way, what it was waiting for is moot.
        let leading = self.node.raft.state == StateRole::Leader;
        if self.leading && !leading {
            for (_, (_, reply)) in self.pending.drain() {
                let _ = reply.send(Err(ProposeError::Dropped));
            }
            self.reads.clear(); // their callers time out and retry elsewhere
        }
        self.leading = leading;
        self.maybe_snapshot()?;
        self.publish();
        for (reply, result) in self.replies.drain(..) {
            let _ = reply.send(result);
        }
        Ok(())
    }

    /// Snapshots when the log has grown by count or by size, or when asked.
    fn maybe_snapshot(&mut self) -> Result<(), StorageError> {
        let due = self.snapshot_due
            || self.applied >= self.store.snapshot_index() + self.cfg.snapshot_every
            || self.log_bytes >= SNAPSHOT_LOG_BYTES.max(self.store.snapshot_bytes());
        if due && !self.snapshotting && self.applied > self.store.snapshot_index() {
            self.snapshot_due = false;
            self.log_bytes = 0;
            self.take_snapshot()?;
        }
        Ok(())
    }

    /// Snapshots the state and compacts the log. Encoding and writing a
    /// large state takes a while (about 0.3 s for 150k jobs), so a threaded
    /// member does it on a helper thread while the Ready loop goes on; the
    /// log is compacted when the file is durable.
    fn take_snapshot(&mut self) -> Result<(), StorageError> {
        let Some((done, _)) = &self.snapshots else {
            return self
                .store
                .snapshot(&self.state, &self.members, self.applied);
        };
        let pending = self
            .store
            .begin_snapshot(&self.state, &self.members, self.applied)?;
        let done = done.clone();
        self.snapshotting = true;
        std::thread::Builder::new()
            .name(format!("snapshot-{}", pending.index()))
            .spawn(move || {
                // Serving comes first: under load the snapshot yields the
                // CPU to the Raft and gRPC threads (nice about 10) rather
                // than adding its encoding time to their tail latency.
                let background = thread_priority::ThreadPriorityValue::try_from(25u8)
                    .map(thread_priority::ThreadPriority::Crossplatform);
                if let Ok(p) = background {
                    let _ = thread_priority::set_current_thread_priority(p);
                }
                let _ = done.send(pending.write());
            })
            .map_err(|e| StorageError(format!("spawn snapshot thread: {e}")))?;
        Ok(())
    }

    fn finish_background_snapshot(&mut self) -> Result<(), StorageError> {
        let Some((_, written)) = &self.snapshots else {
            return Ok(());
        };
        let Ok(result) = written.try_recv() else {
            return Ok(());
        };
        self.snapshotting = false;
        let finished = result.and_then(|w| self.store.finish_snapshot(w));
        let done = self.store.snapshot_index();
        let waiters = std::mem::take(&mut self.compact_waiters);
        for (wanted, reply) in waiters {
            match &finished {
                Err(e) => {
                    let _ = reply.send(Err(e.to_string()));
                }
                Ok(()) if wanted <= done => {
                    let _ = reply.send(Ok(()));
                }
                Ok(()) => {
                    self.compact_waiters.push((wanted, reply));
                    self.snapshot_due = true;
                }
            }
        }
        finished?;
        self.maybe_snapshot()?;
        self.publish();
        Ok(())
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            self.transport.send(m);
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), StorageError> {
        for entry in entries {
            self.applied = entry.index;
            self.log_bytes += entry.data.len() as u64;
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    if entry.data.is_empty() {
                        continue; // a new leader's empty entry
                    }
                    let outcome = match serde_json::from_slice::<Command>(&entry.data) {
                        Ok(cmd) => {
                            let outcome = self.state.apply(&cmd);
                            self.dirty |= !matches!(outcome, Outcome::Rejected(_));
                            outcome
                        }
                        Err(e) => {
                            // Written by a newer version? Skipping keeps replicas equal.
                            tracing::error!(index = entry.index, error = %e, "undecodable command skipped");
                            continue;
                        }
                    };
                    if let Some((term, reply)) = self.pending.remove(&entry.index) {
                        let result = if term == entry.term {
                            Ok(outcome)
                        } else {
                            Err(ProposeError::Dropped)
                        };
                        self.replies.push((reply, result));
                    }
                }
                EntryType::EntryConfChange => {
                    // We only ever propose V2 changes; a V1 entry carries no URL.
                    let cc = ConfChange::parse_from_bytes(&entry.data)
                        .map_err(|e| StorageError(e.to_string()))?;
                    let cs = self
                        .node
                        .apply_conf_change(&cc)
                        .map_err(|e| StorageError(e.to_string()))?;
                    self.store.set_conf_state(&cs, &self.members)?;
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&entry.data)
                        .map_err(|e| StorageError(e.to_string()))?;
                    let cs = self
                        .node
                        .apply_conf_change(&cc)
                        .map_err(|e| StorageError(e.to_string()))?;
                    let url = serde_json::from_slice::<serde_json::Value>(&cc.context)
                        .ok()
                        .and_then(|v| v["url"].as_str().map(str::to_string));
                    for ch in &cc.changes {
                        match ch.get_change_type() {
                            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                                if let Some(u) = &url {
                                    self.members.insert(ch.node_id, u.clone());
                                }
                                // A new member starts from a snapshot that
                                // names it (it ignores appends until then):
                                // every member takes one, so that whichever
                                // leads next can send it.
                                self.snapshot_due = true;
                            }
                            ConfChangeType::RemoveNode => {
                                self.members.remove(&ch.node_id);
                                if ch.node_id == self.cfg.id {
                                    tracing::warn!("this member was removed from the cluster");
                                }
                            }
                        }
                    }
                    self.store.set_conf_state(&cs, &self.members)?;
                    self.transport.set_members(&self.members);
                    self.dirty = true;
                    tracing::info!(voters = ?cs.voters, learners = ?cs.learners, "membership changed");
                    if let Some((term, reply)) = self.pending.remove(&entry.index) {
                        let result = if term == entry.term {
                            Ok(Outcome::Applied)
                        } else {
                            Err(ProposeError::Dropped)
                        };
                        self.replies.push((reply, result));
                    }
                }
            }
        }
        Ok(())
    }

    fn publish(&mut self) {
        let old = self.view_tx.borrow().clone();
        let raft = &self.node.raft;
        let changed = old.applied != self.applied
            || old.leader_id != raft.leader_id
            || old.term != raft.term
            || old.commit != raft.raft_log.committed
            || old.snapshot_index != self.store.snapshot_index();
        if !changed {
            return;
        }
        // Readers compare state pointers to skip work when nothing changed
        // (e.g. a batch of rejected commands).
        let state = if self.dirty {
            Arc::new(self.state.clone())
        } else {
            old.state.clone()
        };
        self.dirty = false;
        self.view_tx.send_replace(Arc::new(ClusterView {
            state,
            id: self.cfg.id,
            leader_id: raft.leader_id,
            term: raft.term,
            commit: raft.raft_log.committed,
            applied: self.applied,
            snapshot_index: self.store.snapshot_index(),
            voters: raft.prs().conf().voters().ids().iter().collect(),
            learners: raft.prs().conf().learners().iter().copied().collect(),
            members: self.members.clone(),
        }));
    }
}
