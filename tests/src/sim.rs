//! A deterministic, in-process simulation of a coordinator cluster.
//!
//! Each member is the real Raft member ([`DrivenMember`]: raft-rs, the
//! raft-engine store with real fsyncs in a temp dir, the real state machine)
//! without its thread and clock. The simulation owns time and the network:
//! every step it takes one seeded random action (deliver, drop, duplicate or
//! reorder a message, tick a member, start a client operation, crash or
//! restart a member, cut or heal links) and then checks the invariants:
//!
//! - at most one leader per term;
//! - equal state at equal applied index, on every member;
//! - no acknowledged write missing from any member that applied past it.
//!
//! Clients record a history ([`History`]) that is checked for
//! linearizability at the end. The same seed replays the same run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nembo_coordinator::replication::raft::{DrivenMember, ProposeError, RaftConfig, Transport};
use nembo_domain::state::{Command, JobState, Outcome, Rejection, State};
use nembo_domain::task::parse_task_yaml;
use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2, Message, MessageType};
use tokio::sync::oneshot::{self, error::TryRecvError};

use crate::history::{History, Op, Ret};

/// Ticks without a heartbeat before a follower campaigns.
const ELECTION_TICKS: usize = 10;
/// A read whose read index never comes (a new leader that has not yet
/// committed in its term drops it) is given up after this many steps.
const READ_PATIENCE: u64 = 400;

/// splitmix64: small, seedable, good enough to pick actions.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// How hostile the network and the machines are.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Percent of messages lost.
    pub drop: u64,
    /// Percent of messages delivered twice.
    pub duplicate: u64,
    /// Steps per thousand that crash or restart a member.
    pub crash: u64,
    /// Steps per thousand that cut or heal links.
    pub partition: u64,
}

impl Faults {
    /// No faults: used to let the cluster settle.
    pub const NONE: Faults = Faults {
        drop: 0,
        duplicate: 0,
        crash: 0,
        partition: 0,
    };
}

struct Outbox(Arc<Mutex<Vec<Message>>>);

impl Transport for Outbox {
    fn send(&self, msg: Message) {
        self.0.lock().unwrap().push(msg);
    }
}

struct Node {
    dir: PathBuf,
    voters: Vec<u64>,
    member: Option<DrivenMember>,
    outbox: Arc<Mutex<Vec<Message>>>,
    /// Applied index up to which acknowledged writes were checked.
    checked: u64,
}

type Reply = oneshot::Receiver<Result<Outcome, ProposeError>>;

enum Pending {
    Write {
        node: u64,
        index: u64,
        op: Op,
        rx: Reply,
    },
    ReadIndex {
        node: u64,
        since: u64,
        rx: oneshot::Receiver<u64>,
    },
    ReadApplied {
        node: u64,
        index: u64,
    },
}

struct Client {
    thread: u64,
    pending: Option<Pending>,
    /// A write whose fate is unknown (its member lost leadership or died)
    /// is retried until it is answered, as the CLI does: a submit with the
    /// same idempotency key, a cancel as it is (cancelling twice is
    /// harmless). It stays one operation in the history.
    retry: Option<Op>,
}

/// The simulated cluster.
pub struct Sim {
    rng: Rng,
    _root: tempfile::TempDir,
    nodes: BTreeMap<u64, Node>,
    /// Messages on the wire, in no particular order.
    wire: Vec<Message>,
    /// Directed links that lose everything: (from, to).
    cut: BTreeSet<(u64, u64)>,
    clients: Vec<Client>,
    /// What the clients saw.
    pub history: History,
    leaders: BTreeMap<u64, u64>,
    states: BTreeMap<u64, Arc<State>>,
    /// Acknowledged writes: (log index, what must be visible from it on).
    acked: Vec<(u64, Op, Ret)>,
    next_key: u64,
    /// Steps taken.
    pub now: u64,
    snapshot_every: u64,
}

fn job_table(state: &State) -> BTreeMap<u64, (String, bool)> {
    state
        .jobs
        .values()
        .map(|j| {
            (
                j.id,
                (
                    j.idempotency_key.clone().unwrap_or_default(),
                    j.state == JobState::Cancelled,
                ),
            )
        })
        .collect()
}

impl Sim {
    /// `members` voters (ids 1..=members) with `clients` clients.
    pub fn new(seed: u64, members: u64, clients: usize, snapshot_every: u64) -> Sim {
        let root = tempfile::tempdir().expect("temp dir");
        let voters: Vec<u64> = (1..=members).collect();
        let mut sim = Sim {
            rng: Rng::new(seed),
            nodes: BTreeMap::new(),
            wire: Vec::new(),
            cut: BTreeSet::new(),
            clients: Vec::new(),
            history: History::default(),
            leaders: BTreeMap::new(),
            states: BTreeMap::new(),
            acked: Vec::new(),
            next_key: 0,
            now: 0,
            snapshot_every,
            _root: root,
        };
        for id in voters.clone() {
            sim.add_node(id, voters.clone());
        }
        for _ in 0..clients {
            let thread = sim.history.thread();
            sim.clients.push(Client {
                thread,
                pending: None,
                retry: None,
            });
        }
        sim
    }

    fn add_node(&mut self, id: u64, voters: Vec<u64>) {
        let dir = self._root.path().join(format!("m{id}"));
        self.nodes.insert(
            id,
            Node {
                dir,
                voters,
                member: None,
                outbox: Arc::default(),
                checked: 0,
            },
        );
        self.start(id);
    }

    fn start(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("known member");
        let cfg = RaftConfig {
            id,
            voters: node.voters.clone(),
            members: BTreeMap::new(),
            dir: node.dir.clone(),
            tick: std::time::Duration::from_millis(100),
            snapshot_every: self.snapshot_every,
        };
        let member = DrivenMember::open(cfg, Box::new(Outbox(node.outbox.clone())), ELECTION_TICKS)
            .unwrap_or_else(|e| panic!("member {id} failed to open its store: {e}"));
        node.member = Some(member);
        node.checked = 0;
    }

    /// Crashes member `id`: its thread of control and everything in memory
    /// are gone, its disk stays (raft-engine fsynced what it acknowledged).
    pub fn crash(&mut self, id: u64) {
        if let Some(node) = self.nodes.get_mut(&id) {
            node.member = None;
            node.outbox.lock().unwrap().clear();
        }
    }

    /// Restarts a crashed member from its disk.
    pub fn restart(&mut self, id: u64) {
        if self.nodes[&id].member.is_none() {
            self.start(id);
        }
    }

    /// Members that are up.
    pub fn up(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.member.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    fn member(&mut self, id: u64) -> Option<&mut DrivenMember> {
        self.nodes.get_mut(&id).and_then(|n| n.member.as_mut())
    }

    /// The member that believes it leads with the highest term, if any.
    pub fn leader(&self) -> Option<u64> {
        self.nodes
            .iter()
            .filter_map(|(id, n)| n.member.as_ref().map(|m| (id, m)))
            .filter(|(_, m)| m.is_leader())
            .max_by_key(|(_, m)| m.term())
            .map(|(id, _)| *id)
    }

    /// Cuts every link to and from `id`.
    pub fn isolate(&mut self, id: u64) {
        for other in self.nodes.keys().copied().collect::<Vec<_>>() {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// One random step under `faults`, then the invariants.
    pub fn step(&mut self, faults: Faults) {
        self.now += 1;
        let roll = self.rng.below(1000) as u64;
        if roll < faults.crash {
            self.random_crash_or_restart();
        } else if roll < faults.crash + faults.partition {
            self.random_partition();
        } else {
            match self.rng.below(10) {
                0..=4 => self.deliver(faults),
                5..=7 => {
                    let up = self.up();
                    if !up.is_empty() {
                        let id = up[self.rng.below(up.len())];
                        self.member(id).unwrap().tick();
                    }
                }
                _ => self.client_action(false),
            }
        }
        self.process_all();
        self.poll_clients();
        self.check_invariants();
    }

    fn random_crash_or_restart(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        let id = ids[self.rng.below(ids.len())];
        if self.nodes[&id].member.is_some() {
            // Keep a majority up most of the time, but not always.
            let down = ids.len() - self.up().len();
            if down == 0 || self.rng.chance(20) {
                self.crash(id);
            }
        } else {
            self.restart(id);
        }
    }

    fn random_partition(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        match self.rng.below(3) {
            0 => self.heal(),
            1 => {
                let id = ids[self.rng.below(ids.len())];
                self.isolate(id);
            }
            _ => {
                // One direction only: the nastiest kind for leases and votes.
                let a = ids[self.rng.below(ids.len())];
                let b = ids[self.rng.below(ids.len())];
                if a != b {
                    self.cut.insert((a, b));
                }
            }
        }
    }

    fn deliver(&mut self, faults: Faults) {
        if self.wire.is_empty() {
            return;
        }
        // Picking any message, not the oldest, reorders and delays.
        let i = self.rng.below(self.wire.len());
        let msg = if self.rng.chance(faults.duplicate) {
            self.wire[i].clone()
        } else {
            self.wire.swap_remove(i)
        };
        let (from, to) = (msg.from, msg.to);
        let lost = self.cut.contains(&(from, to)) || self.rng.chance(faults.drop);
        let is_snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
        let delivered = !lost && self.member(to).is_some();
        if delivered {
            self.member(to).unwrap().step(msg);
        }
        if is_snapshot {
            if let Some(sender) = self.member(from) {
                sender.report_snapshot(to, delivered);
            }
        }
    }

    fn client_action(&mut self, retries_only: bool) {
        let idle: Vec<usize> = (0..self.clients.len())
            .filter(|c| self.clients[*c].pending.is_none())
            .filter(|c| !retries_only || self.clients[*c].retry.is_some())
            .collect();
        let up = self.up();
        if idle.is_empty() || up.is_empty() {
            return;
        }
        let c = idle[self.rng.below(idle.len())];
        // Clients mostly find the leader (the real ones follow hints); some
        // ask whoever they reach and get refused.
        let node = match self.leader() {
            Some(l) if self.rng.chance(85) => l,
            _ => up[self.rng.below(up.len())],
        };
        let known_jobs = self.acked.len() as u64 + 2;
        let retry = self.clients[c].retry.is_some();
        let op = if let Some(op) = self.clients[c].retry.clone() {
            op
        } else {
            match self.rng.below(10) {
                0..=5 => {
                    self.next_key += 1;
                    Op::Submit(format!("k{}", self.next_key))
                }
                6 | 7 => Op::Cancel(1 + self.rng.below(known_jobs as usize) as u64),
                _ => Op::Read,
            }
        };
        let thread = self.clients[c].thread;
        if !retry {
            self.history.invoke(thread, op.clone());
        }
        let now = self.now;
        let member = self.member(node).unwrap();
        let pending = match &op {
            Op::Read => Some(Pending::ReadIndex {
                node,
                since: now,
                rx: member.read_index(),
            }),
            Op::Submit(_) | Op::Cancel(_) => {
                let cmd = match &op {
                    Op::Submit(key) => Command::SubmitJob {
                        spec: parse_task_yaml(
                            &format!("name: {key}\nrun: echo"),
                            &Default::default(),
                        )
                        .expect("valid task"),
                        idempotency_key: Some(key.clone()),
                        owner: String::new(),
                        at_ms: now as i64,
                    },
                    Op::Cancel(job_id) => Command::CancelJob {
                        job_id: *job_id,
                        at_ms: now as i64,
                    },
                    Op::Read => unreachable!("reads take a read index"),
                };
                member.propose(cmd).ok().map(|(index, rx)| Pending::Write {
                    node,
                    index,
                    op: op.clone(),
                    rx,
                })
            }
        };
        if pending.is_none() && !retry {
            // Refused before it was proposed (not the leader): no effect.
            self.history.forget(thread);
        }
        self.clients[c].pending = pending;
    }

    fn process_all(&mut self) {
        for (id, node) in self.nodes.iter_mut() {
            if let Some(m) = node.member.as_mut() {
                m.process_ready()
                    .unwrap_or_else(|e| panic!("member {id}: storage failed: {e}"));
            }
            self.wire.append(&mut node.outbox.lock().unwrap());
        }
    }

    fn poll_clients(&mut self) {
        for c in 0..self.clients.len() {
            let Some(pending) = self.clients[c].pending.take() else {
                continue;
            };
            let thread = self.clients[c].thread;
            self.clients[c].pending = match pending {
                Pending::Write {
                    node,
                    index,
                    op,
                    mut rx,
                } => match rx.try_recv() {
                    Err(TryRecvError::Empty) => Some(Pending::Write {
                        node,
                        index,
                        op,
                        rx,
                    }),
                    Ok(Ok(outcome)) => {
                        let ret = match (&op, outcome) {
                            (Op::Submit(_), Outcome::Job { job_id, existing }) => Ret::Submitted {
                                id: job_id,
                                existing,
                            },
                            (Op::Cancel(_), Outcome::Applied) => Ret::Cancelled(true),
                            (Op::Cancel(_), Outcome::Rejected(Rejection::NoSuchJob(_))) => {
                                Ret::Cancelled(false)
                            }
                            (op, other) => panic!("{op:?} answered {other:?}"),
                        };
                        if self.clients[c].retry.take().is_some() {
                            self.history.ret_after_retry(thread, ret.clone());
                        } else {
                            self.history.ret(thread, ret.clone());
                        }
                        self.acked.push((index, op, ret));
                        None
                    }
                    // Dropped by a leader change, or its member crashed:
                    // the entry may still commit. Retry it.
                    Ok(Err(_)) | Err(TryRecvError::Closed) => {
                        self.clients[c].retry = Some(op);
                        None
                    }
                },
                Pending::ReadIndex {
                    node,
                    since,
                    mut rx,
                } => match rx.try_recv() {
                    Ok(index) => Some(Pending::ReadApplied { node, index }),
                    Err(TryRecvError::Empty) if self.now - since < READ_PATIENCE => {
                        Some(Pending::ReadIndex { node, since, rx })
                    }
                    Err(_) => {
                        self.history.forget(thread);
                        None
                    }
                },
                Pending::ReadApplied { node, index } => match self.member(node) {
                    None => {
                        self.history.forget(thread);
                        None
                    }
                    Some(m) => {
                        let view = m.view();
                        if view.applied >= index {
                            self.history.ret(thread, Ret::Jobs(job_table(&view.state)));
                            None
                        } else {
                            Some(Pending::ReadApplied { node, index })
                        }
                    }
                },
            };
        }
    }

    fn check_invariants(&mut self) {
        for (id, node) in self.nodes.iter_mut() {
            let Some(m) = node.member.as_ref() else {
                continue;
            };
            if m.is_leader() {
                let first = *self.leaders.entry(m.term()).or_insert(*id);
                assert_eq!(
                    first,
                    *id,
                    "step {}: members {first} and {id} both lead term {}",
                    self.now,
                    m.term()
                );
            }
            let view = m.view();
            if view.applied == 0 {
                continue;
            }
            match self.states.get(&view.applied) {
                Some(seen) if !Arc::ptr_eq(seen, &view.state) => assert!(
                    **seen == *view.state,
                    "step {}: member {id} has a different state at applied index {}",
                    self.now,
                    view.applied
                ),
                Some(_) => {}
                None => {
                    self.states.insert(view.applied, view.state.clone());
                }
            }
            if view.applied < node.checked {
                node.checked = 0;
            }
            let table = job_table(&view.state);
            for (index, op, ret) in &self.acked {
                if *index <= node.checked || *index > view.applied {
                    continue;
                }
                let present = match (op, ret) {
                    (Op::Submit(key), Ret::Submitted { id: job, .. }) => {
                        table.get(job).is_some_and(|(k, _)| k == key)
                    }
                    (Op::Cancel(job), Ret::Cancelled(true)) => {
                        table.get(job).is_some_and(|(_, cancelled)| *cancelled)
                    }
                    _ => true,
                };
                assert!(
                    present,
                    "step {}: acknowledged {op:?} -> {ret:?} (index {index}) missing on member {id} at applied {}",
                    self.now, view.applied
                );
            }
            node.checked = view.applied;
        }
    }

    /// Heals every link, restarts every member and runs fault-free (clients
    /// only finish their retries) until every client is idle and every
    /// member has applied the same index.
    pub fn settle(&mut self, max_steps: u64) {
        self.heal();
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            self.restart(id);
        }
        for _ in 0..max_steps {
            let quiet = self
                .clients
                .iter()
                .all(|c| c.pending.is_none() && c.retry.is_none());
            let applied: BTreeSet<u64> = self
                .nodes
                .values()
                .filter_map(|n| n.member.as_ref())
                .map(|m| m.view().applied)
                .collect();
            let commits: BTreeSet<u64> = self
                .nodes
                .values()
                .filter_map(|n| n.member.as_ref())
                .map(|m| m.view().commit)
                .collect();
            if quiet && applied.len() == 1 && commits == applied && self.leader().is_some() {
                return;
            }
            self.step_quietly();
        }
        let members: Vec<String> = self
            .nodes
            .iter()
            .map(|(id, n)| match &n.member {
                Some(m) => {
                    let v = m.view();
                    format!(
                        "{id}: term {} leader {} commit {} applied {} voters {:?}",
                        m.term(),
                        v.leader_id,
                        v.commit,
                        v.applied,
                        v.voters
                    )
                }
                None => format!("{id}: down"),
            })
            .collect();
        let busy = self.clients.iter().filter(|c| c.pending.is_some()).count();
        panic!(
            "the cluster did not settle within {max_steps} steps ({busy} clients busy):\n{}",
            members.join("\n")
        );
    }

    /// A fault-free step with no new client operations.
    fn step_quietly(&mut self) {
        self.now += 1;
        if self.rng.chance(10) {
            self.client_action(true);
        } else if self.rng.chance(60) {
            self.deliver(Faults::NONE);
        } else {
            let up = self.up();
            let id = up[self.rng.below(up.len())];
            self.member(id).unwrap().tick();
        }
        self.process_all();
        self.poll_clients();
        self.check_invariants();
    }

    /// Final checks once settled: all members equal, every acknowledged write
    /// present everywhere, the history linearizable. Returns the number of
    /// jobs.
    pub fn final_check(&mut self) -> usize {
        let views: Vec<_> = self
            .nodes
            .iter()
            .filter_map(|(id, n)| n.member.as_ref().map(|m| (*id, m.view())))
            .collect();
        for (id, v) in &views[1..] {
            assert!(
                *v.state == *views[0].1.state,
                "member {id} differs from member {} after settling",
                views[0].0
            );
        }
        for node in self.nodes.values_mut() {
            node.checked = 0;
        }
        self.check_invariants();
        self.history
            .check_linearizable()
            .unwrap_or_else(|e| panic!("{e}"));
        views[0].1.state.jobs.len()
    }

    /// Proposes a membership change on the leader and runs fault-free until
    /// it is applied there.
    pub fn change_membership(&mut self, change: ConfChangeType, id: u64) {
        let leader = self.leader().expect("a leader");
        let mut single = ConfChangeSingle::default();
        single.set_change_type(change);
        single.node_id = id;
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        let mut rx = self.member(leader).unwrap().change_membership(cc);
        for _ in 0..5_000 {
            match rx.try_recv() {
                Err(TryRecvError::Empty) => self.step_quietly(),
                Ok(Ok(Outcome::Applied)) => return,
                other => panic!("membership change {change:?} {id}: {other:?}"),
            }
        }
        panic!("membership change {change:?} {id} did not apply");
    }

    /// Replaces member `old`, whose disk is lost, by a new member `new`
    /// that starts empty: remove `old`, add `new` as a learner, wait until it
    /// has caught up (from a snapshot when the log was compacted), promote it.
    pub fn replace_lost_member(&mut self, old: u64, new: u64) {
        self.crash(old);
        std::fs::remove_dir_all(&self.nodes[&old].dir).ok();
        self.nodes.remove(&old);
        self.change_membership(ConfChangeType::RemoveNode, old);
        // A joiner starts with no configuration; the leader's snapshot gives it one.
        self.add_node(new, Vec::new());
        self.change_membership(ConfChangeType::AddLearnerNode, new);
        // As `nembo admin members add` does: the new member starts from a
        // snapshot that names it in the configuration.
        let leader = self.leader().expect("a leader");
        self.member(leader)
            .unwrap()
            .compact()
            .expect("compaction on the leader");
        let mut caught_up = false;
        for _ in 0..20_000 {
            let leader_applied = self
                .leader()
                .and_then(|l| self.nodes[&l].member.as_ref())
                .map(|m| m.view().applied);
            let learner_applied = self.nodes[&new].member.as_ref().map(|m| m.view().applied);
            if leader_applied.is_some() && learner_applied >= leader_applied {
                caught_up = true;
                break;
            }
            self.step_quietly();
        }
        assert!(caught_up, "member {new} never caught up");
        self.change_membership(ConfChangeType::AddNode, new);
    }

    /// Voters as the member `id` sees them.
    pub fn voters(&self, id: u64) -> Vec<u64> {
        self.nodes[&id]
            .member
            .as_ref()
            .map(|m| m.view().voters.clone())
            .unwrap_or_default()
    }

    /// Highest term seen.
    pub fn terms(&self) -> usize {
        self.leaders.len()
    }
}
