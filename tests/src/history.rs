//! Client histories and their linearizability check.
//!
//! Clients record what they invoked and what came back; the check searches
//! for one sequential order of the operations that respects real time (an
//! operation that returned before another was invoked comes first) and in
//! which a plain, single-copy job table ([`JobTable`]) answers exactly what
//! the clients saw.
//!
//! The search is Wing and Gong's, with Lowe's memoization of (operations
//! linearized so far, table state), as in Knossos and Porcupine. We first
//! used stateright's `LinearizabilityTester`, which has no memoization: a
//! simulated history with 50 completed operations and 12 of unknown fate
//! took it 180 s; this one checks thousands in well under a second.
//!
//! An operation whose fate is unknown (the client gave up: its member died or
//! lost leadership) has no return: it may be placed anywhere after its
//! invocation, or left out. Its client continues under a new thread id.
//! Operations known to have had no effect (refused before being proposed, a
//! read that never got an answer) are forgotten.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nembo_proto::client::Client;
use nembo_proto::v1 as pb;

/// What a client asks of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Submit a job under an idempotency key.
    Submit(String),
    /// Cancel a job by id.
    Cancel(u64),
    /// List every job.
    Read,
}

/// What comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ret {
    /// The job's id, and whether the key named an existing job.
    Submitted {
        /// Job id.
        id: u64,
        /// Found by key rather than created.
        existing: bool,
    },
    /// Cancel answered: whether the job existed.
    Cancelled(bool),
    /// Every job: id -> (key, cancelled).
    Jobs(BTreeMap<u64, (String, bool)>),
}

/// The sequential specification: one job table, no replication. Ids are
/// handed out 1, 2, 3... in submission order, as the replicated state does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct JobTable {
    jobs: BTreeMap<u64, (String, bool)>,
    by_key: BTreeMap<String, u64>,
}

impl JobTable {
    /// Applies `op` and returns what the table answers.
    pub fn invoke(&mut self, op: &Op) -> Ret {
        match op {
            Op::Submit(key) => {
                if let Some(id) = self.by_key.get(key) {
                    return Ret::Submitted {
                        id: *id,
                        existing: true,
                    };
                }
                let id = self.jobs.len() as u64 + 1;
                self.jobs.insert(id, (key.clone(), false));
                self.by_key.insert(key.clone(), id);
                Ret::Submitted {
                    id,
                    existing: false,
                }
            }
            Op::Cancel(id) => match self.jobs.get_mut(id) {
                Some(job) => {
                    job.1 = true;
                    Ret::Cancelled(true)
                }
                None => Ret::Cancelled(false),
            },
            Op::Read => Ret::Jobs(self.jobs.clone()),
        }
    }
}

#[derive(Debug, Clone)]
enum Event {
    Invoke(u64, Op),
    Return(u64, Ret),
    /// Returned after the client retried it (same idempotency key): whether
    /// the job was `existing` depends on the client's own earlier attempt.
    ReturnAfterRetry(u64, Ret),
}

/// A recorded history. Thread ids are the recorder's: one per client until
/// that client abandons an operation, then a fresh one.
#[derive(Debug, Default, Clone)]
pub struct History {
    events: Vec<Event>,
    in_flight: BTreeMap<u64, Op>,
    next_thread: u64,
    abandoned: BTreeSet<u64>,
}

impl History {
    /// A new thread id for a client.
    pub fn thread(&mut self) -> u64 {
        self.next_thread += 1;
        self.next_thread
    }

    /// `thread` invoked `op`.
    pub fn invoke(&mut self, thread: u64, op: Op) {
        assert!(
            self.in_flight.insert(thread, op.clone()).is_none(),
            "thread {thread} already has an operation in flight"
        );
        self.events.push(Event::Invoke(thread, op));
    }

    /// `thread`'s operation returned `ret`.
    pub fn ret(&mut self, thread: u64, ret: Ret) {
        self.in_flight
            .remove(&thread)
            .expect("a return without an invocation");
        self.events.push(Event::Return(thread, ret));
    }

    /// `thread`'s operation returned `ret` after the client retried it
    /// with the same idempotency key because an earlier attempt's fate was
    /// unknown: one logical operation from the first invocation to now.
    pub fn ret_after_retry(&mut self, thread: u64, ret: Ret) {
        self.in_flight
            .remove(&thread)
            .expect("a return without an invocation");
        self.events.push(Event::ReturnAfterRetry(thread, ret));
    }

    /// `thread`'s operation certainly had no effect (refused before it was
    /// proposed, or a read that was never answered): forget it.
    pub fn forget(&mut self, thread: u64) {
        self.in_flight.remove(&thread);
        if let Some(i) = self
            .events
            .iter()
            .rposition(|e| matches!(e, Event::Invoke(t, _) if *t == thread))
        {
            self.events.remove(i);
        }
    }

    /// `thread`'s operation may or may not have taken effect; the client
    /// must go on with a new thread id (returned).
    pub fn abandon(&mut self, thread: u64) -> u64 {
        self.in_flight.remove(&thread);
        self.abandoned.insert(thread);
        self.thread()
    }

    /// Completed operations.
    pub fn completed(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::Return(..) | Event::ReturnAfterRetry(..)))
            .count()
    }

    /// Operations whose fate was unknown at some point: abandoned, or
    /// answered only after a retry.
    pub fn unknown(&self) -> usize {
        self.abandoned.len()
            + self
                .events
                .iter()
                .filter(|e| matches!(e, Event::ReturnAfterRetry(..)))
                .count()
    }

    /// Checks the history; on failure, says why with the history attached.
    pub fn check_linearizable(&self) -> Result<(), String> {
        if linearizable(&self.events) {
            Ok(())
        } else {
            Err(format!(
                "history of {} events is not linearizable:\n{}",
                self.events.len(),
                self.events
                    .iter()
                    .map(|e| format!("  {e:?}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ))
        }
    }
}

/// One operation: what was asked, what came back (None: unknown fate).
struct Operation {
    op: Op,
    ret: Option<Ret>,
    retried: bool,
}

impl Operation {
    /// Whether the table's `answer` is what the client saw.
    fn fits(&self, answer: &Ret) -> bool {
        match (&self.ret, answer) {
            (None, _) => true,
            (Some(Ret::Submitted { id, .. }), Ret::Submitted { id: table_id, .. })
                if self.retried =>
            {
                id == table_id
            }
            (Some(ret), answer) => ret == answer,
        }
    }
}

/// Wing & Gong's search over the history as a linked list of call and
/// return entries. Linearizing an operation lifts its call and return out
/// of the list; meeting a return whose call is still in the list means the
/// current order cannot work, so the search backtracks. Operations of
/// unknown fate return after everything else and may stay unlinearized.
fn linearizable(events: &[Event]) -> bool {
    // Entries: 0 is the head sentinel; then one per call and per return.
    let mut ops: Vec<Operation> = Vec::new();
    let mut open: BTreeMap<u64, usize> = BTreeMap::new();
    // (operation, is_call) in time order.
    let mut order: Vec<(usize, bool)> = Vec::new();
    for e in events {
        match e {
            Event::Invoke(t, op) => {
                open.insert(*t, ops.len());
                order.push((ops.len(), true));
                ops.push(Operation {
                    op: op.clone(),
                    ret: None,
                    retried: false,
                });
            }
            Event::Return(t, ret) | Event::ReturnAfterRetry(t, ret) => {
                let i = open.remove(t).expect("return without a call");
                ops[i].ret = Some(ret.clone());
                ops[i].retried = matches!(e, Event::ReturnAfterRetry(..));
                order.push((i, false));
            }
        }
    }
    for i in open.into_values() {
        order.push((i, false));
    }
    let n = order.len();
    let mut next: Vec<usize> = (1..=n + 1).collect(); // n + 1 = end
    let mut prev: Vec<usize> = (0..=n).map(|i| i.saturating_sub(1)).collect();
    let entry = |k: usize| order[k - 1]; // list position k >= 1
    let mut ret_pos = vec![0; ops.len()];
    for (k, (op, is_call)) in order.iter().enumerate() {
        if !is_call {
            ret_pos[*op] = k + 1;
        }
    }
    let unknown = ops.iter().filter(|o| o.ret.is_none()).count();
    let known = ops.len() - unknown;

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut linearized_known = 0;
    let mut cache: HashSet<(Vec<u64>, JobTable)> = HashSet::new();
    let mut state = JobTable::default();
    // (call position, state before it)
    let mut stack: Vec<(usize, JobTable)> = Vec::new();
    let lift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, k: usize| {
        let (p, nx) = (prev[k], next[k]);
        next[p] = nx;
        if nx <= n {
            prev[nx] = p;
        }
    };
    let unlift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, k: usize| {
        let (p, nx) = (prev[k], next[k]);
        next[p] = k;
        if nx <= n {
            prev[nx] = k;
        }
    };
    let mut k = next[0];
    loop {
        if linearized_known == known {
            return true; // what remains is of unknown fate: may never have happened
        }
        if k > n {
            // Only unknown operations' entries remain past here; cannot happen
            // while known operations are unlinearized (their returns come first).
            return false;
        }
        let (op_index, is_call) = entry(k);
        if is_call {
            let op = &ops[op_index];
            let mut after = state.clone();
            let answer = after.invoke(&op.op);
            if op.fits(&answer) {
                let mut set = linearized.clone();
                set[op_index / 64] |= 1 << (op_index % 64);
                if cache.insert((set.clone(), after.clone())) {
                    stack.push((k, std::mem::replace(&mut state, after)));
                    linearized = set;
                    if op.ret.is_some() {
                        linearized_known += 1;
                    }
                    lift(&mut next, &mut prev, k);
                    lift(&mut next, &mut prev, ret_pos[op_index]);
                    k = next[0];
                    continue;
                }
            }
            k = next[k];
        } else {
            // A return whose call is still pending: backtrack.
            let Some((call, before)) = stack.pop() else {
                return false;
            };
            let (op_index, _) = entry(call);
            state = before;
            linearized[op_index / 64] &= !(1 << (op_index % 64));
            if ops[op_index].ret.is_some() {
                linearized_known -= 1;
            }
            unlift(&mut next, &mut prev, ret_pos[op_index]);
            unlift(&mut next, &mut prev, call);
            k = next[call];
        }
    }
}

/// A job submission under idempotency key `key`. It asks for a machine
/// that only a provider offers, so with provisioning off (`--max-nodes 0`)
/// it waits in the queue: histories are about the job table, and nodes
/// that agents bring stay free for the jobs a test means to run.
pub fn submit_req(key: &str) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        task: Some(pb::submit_job_request::Task::TaskYaml(format!(
            "name: {key}\nresources: {{accelerators: H100:8}}\nrun: echo {key}\n"
        ))),
        idempotency_key: key.to_string(),
        ..Default::default()
    }
}

/// Every job in full (with its idempotency key), in one page of up to
/// 1000: a history's reads must see the whole table at once, so its
/// clients keep it smaller than that.
pub fn full_list() -> pb::ListJobsRequest {
    pb::ListJobsRequest {
        view: pb::JobView::Full as i32,
        page_size: 1000,
        ..Default::default()
    }
}

/// One client of a history: submits (three in five), cancels and reads
/// (one in five each) through `client` until `stop`, recording every
/// invocation and what came back. It cancels ids from `cancel_from` on
/// (jobs below are a test's own), and rests `pause` between operations.
pub async fn client_loop(
    client: Client,
    history: Arc<Mutex<History>>,
    me: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    pause: Duration,
    cancel_from: u64,
) {
    let thread = history.lock().unwrap().thread();
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        let seen = history.lock().unwrap().completed() as u64 + 2;
        let op = match i % 5 {
            0..=2 => Op::Submit(format!("c{me}-{i}")),
            3 => Op::Cancel(cancel_from + (i * 7 + me as u64) % seen),
            _ => Op::Read,
        };
        history.lock().unwrap().invoke(thread, op.clone());
        let mut c = client.clone();
        match op {
            Op::Submit(_) => {
                let key = match &op {
                    Op::Submit(k) => k.clone(),
                    _ => unreachable!(),
                };
                let mut retried = false;
                let ret = loop {
                    match c.submit_job(timed(submit_req(&key))).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            break Ret::Submitted {
                                id: r.job_id.parse().unwrap(),
                                existing: r.existing,
                            };
                        }
                        // Its fate is unknown: the key makes retrying safe.
                        Err(_) => {
                            retried = true;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                };
                let mut h = history.lock().unwrap();
                if retried {
                    h.ret_after_retry(thread, ret);
                } else {
                    h.ret(thread, ret);
                }
            }
            Op::Cancel(id) => {
                let req = pb::CancelJobRequest {
                    job_id: id.to_string(),
                };
                let ret = loop {
                    match c.cancel_job(timed(req.clone())).await {
                        Ok(_) => break Ret::Cancelled(true),
                        Err(s) if s.code() == tonic::Code::NotFound => break Ret::Cancelled(false),
                        // Cancelling twice is harmless: retry.
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                };
                history.lock().unwrap().ret(thread, ret);
            }
            Op::Read => {
                let req = timed(full_list());
                match c.list_jobs(req).await {
                    Ok(r) => {
                        let jobs = r
                            .into_inner()
                            .jobs
                            .into_iter()
                            .map(|j| {
                                let cancelled = j.state == pb::JobState::Cancelled as i32;
                                (j.job_id.parse().unwrap(), (j.idempotency_key, cancelled))
                            })
                            .collect();
                        history.lock().unwrap().ret(thread, Ret::Jobs(jobs));
                    }
                    // A read that failed had no effect.
                    Err(_) => history.lock().unwrap().forget(thread),
                }
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// A request that gives up after 2 s: a paused member holds requests, and
/// a user would give up on it too.
fn timed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(Duration::from_secs(2));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(list: &[(u64, &str, bool)]) -> Ret {
        Ret::Jobs(
            list.iter()
                .map(|(id, k, c)| (*id, (k.to_string(), *c)))
                .collect(),
        )
    }

    #[test]
    fn concurrent_submits_may_take_either_order() {
        let mut h = History::default();
        let (a, b) = (h.thread(), h.thread());
        h.invoke(a, Op::Submit("x".into()));
        h.invoke(b, Op::Submit("y".into()));
        h.ret(
            b,
            Ret::Submitted {
                id: 1,
                existing: false,
            },
        );
        h.ret(
            a,
            Ret::Submitted {
                id: 2,
                existing: false,
            },
        );
        h.check_linearizable().unwrap();
    }

    #[test]
    fn a_stale_read_is_caught() {
        let mut h = History::default();
        let (a, b) = (h.thread(), h.thread());
        h.invoke(a, Op::Submit("x".into()));
        h.ret(
            a,
            Ret::Submitted {
                id: 1,
                existing: false,
            },
        );
        // Invoked after the submit returned, yet does not see it.
        h.invoke(b, Op::Read);
        h.ret(b, jobs(&[]));
        assert!(h.check_linearizable().is_err());
    }

    #[test]
    fn a_lost_acknowledged_cancel_is_caught() {
        let mut h = History::default();
        let a = h.thread();
        h.invoke(a, Op::Submit("x".into()));
        h.ret(
            a,
            Ret::Submitted {
                id: 1,
                existing: false,
            },
        );
        h.invoke(a, Op::Cancel(1));
        h.ret(a, Ret::Cancelled(true));
        h.invoke(a, Op::Read);
        h.ret(a, jobs(&[(1, "x", false)]));
        assert!(h.check_linearizable().is_err());
    }

    #[test]
    fn an_abandoned_submit_may_or_may_not_have_happened() {
        for seen in [false, true] {
            let mut h = History::default();
            let a = h.thread();
            h.invoke(a, Op::Submit("x".into()));
            let a = h.abandon(a);
            h.invoke(a, Op::Read);
            h.ret(
                a,
                if seen {
                    jobs(&[(1, "x", false)])
                } else {
                    jobs(&[])
                },
            );
            h.check_linearizable().unwrap();
        }
    }

    #[test]
    fn a_read_concurrent_with_a_submit_may_or_may_not_see_it() {
        for seen in [false, true] {
            let mut h = History::default();
            let (a, b) = (h.thread(), h.thread());
            h.invoke(a, Op::Submit("x".into()));
            h.invoke(b, Op::Read);
            h.ret(
                b,
                if seen {
                    jobs(&[(1, "x", false)])
                } else {
                    jobs(&[])
                },
            );
            h.ret(
                a,
                Ret::Submitted {
                    id: 1,
                    existing: false,
                },
            );
            h.check_linearizable().unwrap();
        }
    }

    #[test]
    fn a_write_seen_before_it_was_invoked_is_caught() {
        let mut h = History::default();
        let (a, b) = (h.thread(), h.thread());
        h.invoke(b, Op::Read);
        h.ret(b, jobs(&[(1, "x", false)]));
        h.invoke(a, Op::Submit("x".into()));
        h.abandon(a);
        assert!(h.check_linearizable().is_err());
    }

    #[test]
    fn a_doubled_submit_is_caught() {
        let mut h = History::default();
        let a = h.thread();
        h.invoke(a, Op::Submit("x".into()));
        let a = h.abandon(a);
        h.invoke(a, Op::Submit("x".into()));
        h.ret(
            a,
            Ret::Submitted {
                id: 1,
                existing: true,
            },
        );
        h.invoke(a, Op::Read);
        h.ret(a, jobs(&[(1, "x", false), (2, "x", false)]));
        assert!(h.check_linearizable().is_err());
    }
}
