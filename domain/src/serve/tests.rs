//! Tests of the serving decisions: a State driven through [`plan`] the way
//! the leader's service loop drives it (each planned command applied, the
//! AddReplica ports filled in, jobs placed and started, probe results fed
//! in, time advanced), checked against SkyServe's behaviour as a user sees
//! it (`serve status`, the load balancer's replica set).

use super::*;
use crate::state::{Outcome, RankOutcome};
use crate::task::{parse_task_yaml, TaskSpec};

const SVC: &str = "svc";

/// Two fixed replicas, a short probe window.
const BASIC: &str = "resources: {ports: 8080}
run: python serve.py
service:
  readiness_probe: {path: /health, initial_delay_seconds: 10, consecutive_failure_threshold_timeout: 5}
  replicas: 2
";

/// The same service, a new version (another `run`).
const BASIC_V2: &str = "resources: {ports: 8080}
run: python serve.py --v2
service:
  readiness_probe: {path: /health, initial_delay_seconds: 10, consecutive_failure_threshold_timeout: 5}
  replicas: 2
";

fn spec(y: &str) -> TaskSpec {
    parse_task_yaml(y, &Default::default()).unwrap()
}

/// The leader's service loop, by hand.
struct Sim {
    s: State,
    probes: Probes,
    now: i64,
    next_port: u16,
}

impl Sim {
    fn up(yaml: &str) -> Sim {
        let mut s = State::default();
        let out = s.apply(&Command::Service(ServiceCommand::Up {
            name: SVC.into(),
            spec: spec(yaml),
            owner: "alice".into(),
            lb_port: 30001,
            at_ms: 1_000,
        }));
        assert_eq!(out, Outcome::Applied);
        Sim {
            s,
            probes: Probes::new(),
            now: 1_000,
            next_port: 40001,
        }
    }

    fn svc(&self) -> &Service {
        &self.s.services[SVC]
    }

    fn replica(&self, id: u32) -> &Replica {
        &self.svc().replicas[&id]
    }

    fn status(&self, id: u32) -> &'static str {
        replica_status(&self.s, self.replica(id)).as_str()
    }

    fn serving(&self) -> Vec<(u32, String)> {
        serving_replicas(&self.s, self.svc())
    }

    fn serving_ids(&self) -> Vec<u32> {
        self.serving().into_iter().map(|(id, _)| id).collect()
    }

    fn plan(&self) -> Vec<ServiceCommand> {
        plan(&self.s, &self.probes, self.now)
            .into_iter()
            .map(|c| match c {
                Command::Service(c) => c,
                other => panic!("the planner made a non-service command: {other:?}"),
            })
            .collect()
    }

    /// Applies commands as the loop does: AddReplica gets a free port.
    fn apply(&mut self, cmds: &[ServiceCommand]) {
        for c in cmds {
            let mut c = c.clone();
            if let ServiceCommand::AddReplica {
                shared_host_port, ..
            } = &mut c
            {
                assert_eq!(*shared_host_port, 0, "the loop fills the port");
                *shared_host_port = self.next_port;
                self.next_port += 1;
            }
            let out = self.s.apply(&Command::Service(c.clone()));
            assert!(!matches!(out, Outcome::Rejected(_)), "{c:?}: {out:?}");
        }
    }

    /// One turn of the loop: plan, apply, and what was planned.
    fn step(&mut self) -> Vec<ServiceCommand> {
        let cmds = self.plan();
        self.apply(&cmds);
        cmds
    }

    /// Turns of the loop at the same time until it has nothing to do;
    /// every command planned on the way.
    fn settle(&mut self) -> Vec<ServiceCommand> {
        let mut all = Vec::new();
        for _ in 0..10 {
            let cmds = self.step();
            if cmds.is_empty() {
                return all;
            }
            all.extend(cmds);
        }
        panic!("the loop never settles: {all:?}");
    }

    fn advance(&mut self, ms: i64) {
        self.now += ms;
    }

    fn cmd(&mut self, c: Command) {
        let out = self.s.apply(&c);
        assert!(!matches!(out, Outcome::Rejected(_)), "{c:?}: {out:?}");
    }

    /// Provisions a node for the replica's job at `address`; returns it.
    fn provision(&mut self, id: u32, address: &str, public_address: &str) -> String {
        let job_id = self.replica(id).job_id;
        let spot = self.replica(id).spot;
        let Outcome::Nodes(ids) = self.s.apply(&Command::ProvisionNodes {
            job_id,
            // A CPU node: 8 vCPUs, 32 GB.
            offering: crate::state::tests::offering(0.0),
            count: 1,
            spot,
            at_ms: self.now,
        }) else {
            panic!("not provisioned")
        };
        self.cmd(Command::NodeUp {
            node_id: ids[0].clone(),
            address: address.into(),
            public_address: public_address.into(),
            at_ms: self.now,
        });
        ids[0].clone()
    }

    /// Places the replica's job on a node at `address` and starts it.
    fn run_at(&mut self, id: u32, address: &str, public_address: &str) -> String {
        let node = self.provision(id, address, public_address);
        let job_id = self.replica(id).job_id;
        self.cmd(Command::AssignJob {
            job_id,
            node_ids: vec![node.clone()],
            candidate: 0,
            at_ms: self.now,
        });
        self.cmd(Command::RankStarted {
            job_id,
            attempt: 1,
            rank: 0,
            at_ms: self.now,
        });
        assert_eq!(self.s.jobs[&job_id].state, JobState::Running);
        node
    }

    fn run(&mut self, id: u32) -> String {
        self.run_at(id, "127.0.0.1", "")
    }

    /// The prober's newest result: a failure keeps the run's start.
    fn probe(&mut self, id: u32, ok: bool) {
        let key = (SVC.to_string(), id);
        let since = match (ok, self.probes.get(&key)) {
            (true, _) => None,
            (false, Some(p)) if p.failing_since_ms.is_some() => p.failing_since_ms,
            (false, _) => Some(self.now),
        };
        self.probes.insert(
            key,
            ProbeSummary {
                ok,
                failing_since_ms: since,
            },
        );
    }

    /// Runs replicas and makes them READY.
    fn make_ready(&mut self, ids: &[u32]) {
        for &id in ids {
            if self.s.jobs[&self.replica(id).job_id].state != JobState::Running {
                self.run(id);
            }
            self.probe(id, true);
        }
        self.settle();
        for &id in ids {
            assert_eq!(self.status(id), "READY", "replica {id}");
        }
    }

    /// Replicas not ended and not draining, by id.
    fn active(&self) -> Vec<u32> {
        self.svc()
            .replicas
            .values()
            .filter(|r| matches!(r.phase, ReplicaPhase::Starting | ReplicaPhase::Ready))
            .map(|r| r.id)
            .collect()
    }
}

/// (replica id, version, spot) of each AddReplica.
fn adds(cmds: &[ServiceCommand]) -> Vec<(u32, u32, bool)> {
    cmds.iter()
        .filter_map(|c| match c {
            ServiceCommand::AddReplica {
                replica_id,
                version,
                spot,
                ..
            } => Some((*replica_id, *version, *spot)),
            _ => None,
        })
        .collect()
}

/// (replica id, end, drain until) of each Retire.
fn retires(cmds: &[ServiceCommand]) -> Vec<(u32, ReplicaEnd, Option<i64>)> {
    cmds.iter()
        .filter_map(|c| match c {
            ServiceCommand::Retire {
                replica_id,
                end,
                drain_until_ms,
                ..
            } => Some((*replica_id, *end, *drain_until_ms)),
            _ => None,
        })
        .collect()
}

/// (replica id, ready) of each Probed.
fn probed(cmds: &[ServiceCommand]) -> Vec<(u32, bool)> {
    cmds.iter()
        .filter_map(|c| match c {
            ServiceCommand::Probed {
                replica_id, ready, ..
            } => Some((*replica_id, *ready)),
            _ => None,
        })
        .collect()
}

// 1. Replicas up to the count, once.

#[test]
fn new_service_gets_its_replicas_once() {
    let mut sim = Sim::up(BASIC);
    assert_eq!(sim.svc().target, 2);
    assert_eq!(service_status(&sim.s, sim.svc()), "REPLICA_INIT");
    let cmds = sim.step();
    assert_eq!(adds(&cmds), vec![(1, 1, false), (2, 1, false)]);
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    for c in &cmds {
        let ServiceCommand::AddReplica {
            shared_host_port,
            at_ms,
            ..
        } = c
        else {
            unreachable!()
        };
        assert_eq!((*shared_host_port, *at_ms), (0, sim.now));
    }
    assert_eq!(sim.replica(1).shared_host_port, 40001);
    assert_eq!(sim.replica(2).shared_host_port, 40002);
    assert_eq!(sim.svc().last_replica_id, 2);
    // Each replica is a job named <service>-<id>, pending.
    let job = &sim.s.jobs[&sim.replica(2).job_id];
    assert_eq!(job.spec.name.as_deref(), Some("svc-2"));
    assert_eq!(sim.status(1), "PENDING");
    assert_eq!(sim.status(2), "PENDING");
    // Planning again adds nothing, now and later, placed or not.
    assert_eq!(sim.plan(), vec![]);
    sim.advance(60_000);
    assert_eq!(sim.plan(), vec![]);
    sim.provision(1, "127.0.0.1", "");
    assert_eq!(sim.status(1), "PROVISIONING");
    sim.run(2);
    assert_eq!(sim.status(2), "STARTING");
    assert_eq!(sim.plan(), vec![]);
    assert_eq!(service_status(&sim.s, sim.svc()), "REPLICA_INIT");
}

#[test]
fn a_stale_add_replica_is_refused() {
    let mut sim = Sim::up(BASIC);
    let cmds = sim.plan();
    sim.apply(&cmds);
    // The same decision applied twice: id 1 is no longer the next one.
    let mut again = cmds[0].clone();
    if let ServiceCommand::AddReplica {
        shared_host_port, ..
    } = &mut again
    {
        *shared_host_port = 40100;
    }
    let out = sim.s.apply(&Command::Service(again));
    assert!(matches!(out, Outcome::Rejected(_)), "{out:?}");
    assert_eq!(sim.svc().replicas.len(), 2);
}

// 2. READY, serving, endpoints.

#[test]
fn passing_probe_makes_a_replica_ready_and_serving() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.run(1);
    // Replica 2 has not started: a probe result for it is not acted on.
    sim.probe(1, true);
    sim.probe(2, true);
    sim.advance(1_000);
    let cmds = sim.step();
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(
        cmds[0],
        ServiceCommand::Probed {
            name: SVC.into(),
            replica_id: 1,
            ready: true,
            at_ms: sim.now,
        }
    );
    assert_eq!(sim.status(1), "READY");
    assert_eq!(sim.replica(1).ready_at_ms, Some(sim.now));
    assert_eq!(sim.status(2), "PENDING");
    assert_eq!(sim.serving(), vec![(1, "127.0.0.1:40001".to_string())]);
    assert_eq!(service_status(&sim.s, sim.svc()), "READY");
    // Nothing more to decide while it keeps passing.
    sim.advance(10_000);
    assert_eq!(sim.plan(), vec![]);
    sim.run(2);
    let cmds = sim.step();
    assert_eq!(probed(&cmds), vec![(2, true)]);
    assert_eq!(
        sim.serving(),
        vec![
            (1, "127.0.0.1:40001".to_string()),
            (2, "127.0.0.1:40002".to_string())
        ]
    );
}

#[test]
fn replica_port_is_the_shared_one_only_on_a_shared_host() {
    assert_eq!(replica_port("127.0.0.1", 8080, 40001), 40001);
    assert_eq!(replica_port("127.0.0.2", 8080, 40001), 40001);
    assert_eq!(replica_port("::1", 8080, 40001), 40001);
    assert_eq!(replica_port("localhost", 8080, 40001), 40001);
    assert_eq!(replica_port("10.0.0.5", 8080, 40001), 8080);
    assert_eq!(replica_port("2001:db8::5", 8080, 40001), 8080);
}

#[test]
fn replica_endpoint_by_node_address() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.apply(&[ServiceCommand::SetTarget {
        name: SVC.into(),
        target: 4,
        at_ms: sim.now,
    }]);
    sim.step();
    assert_eq!(sim.svc().replicas.len(), 4);
    // Unplaced: no endpoint.
    assert_eq!(replica_endpoint(&sim.s, sim.svc(), sim.replica(1)), None);
    sim.run_at(1, "10.0.0.5", "");
    sim.run_at(2, "127.0.0.1", "");
    sim.run_at(3, "10.0.0.6", "203.0.113.9");
    sim.run_at(4, "::1", "");
    let ep = |sim: &Sim, id| replica_endpoint(&sim.s, sim.svc(), sim.replica(id));
    assert_eq!(ep(&sim, 1).as_deref(), Some("10.0.0.5:8080"));
    assert_eq!(ep(&sim, 2).as_deref(), Some("127.0.0.1:40002"));
    assert_eq!(ep(&sim, 3).as_deref(), Some("203.0.113.9:8080"));
    assert_eq!(ep(&sim, 4).as_deref(), Some("[::1]:40004"));
    sim.make_ready(&[1, 2, 3, 4]);
    assert_eq!(
        sim.serving(),
        vec![
            (1, "10.0.0.5:8080".to_string()),
            (2, "127.0.0.1:40002".to_string()),
            (3, "203.0.113.9:8080".to_string()),
            (4, "[::1]:40004".to_string()),
        ]
    );
}

// 3. NOT_READY and FAILED_PROBING.

#[test]
fn failing_ready_replica_goes_not_ready_then_failed_probing_and_is_replaced() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.make_ready(&[1, 2]);
    sim.advance(10_000);
    sim.probe(1, false);
    let cmds = sim.step();
    assert_eq!(probed(&cmds), vec![(1, false)]);
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(sim.status(1), "NOT_READY");
    assert_eq!(sim.serving_ids(), vec![2]);
    assert_eq!(service_status(&sim.s, sim.svc()), "READY");
    // Within the failure window: no more decisions, no replacement yet.
    sim.advance(4_000);
    sim.probe(1, false);
    assert_eq!(sim.plan(), vec![]);
    // consecutive_failure_threshold_timeout (5 s) of failures: it fails,
    // with no drain, and a replacement comes in the same plan.
    sim.advance(1_000);
    sim.probe(1, false);
    let cmds = sim.step();
    assert_eq!(retires(&cmds), vec![(1, ReplicaEnd::FailedProbing, None)]);
    assert_eq!(adds(&cmds), vec![(3, 1, false)]);
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    assert_eq!(sim.status(1), "FAILED_PROBING");
    assert_eq!(sim.replica(1).ended_at_ms, Some(sim.now));
    let job = &sim.s.jobs[&sim.replica(1).job_id];
    assert_eq!(job.state, JobState::Cancelled, "its job is stopped");
    assert_eq!(sim.status(3), "PENDING");
    assert!(!stopped_scaling(sim.svc()), "the version was READY");
    assert_eq!(sim.serving_ids(), vec![2]);
    assert_eq!(sim.plan(), vec![]);
}

#[test]
fn one_passing_probe_brings_a_not_ready_replica_back() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.make_ready(&[1, 2]);
    sim.probe(1, false);
    sim.step();
    assert_eq!(sim.status(1), "NOT_READY");
    sim.advance(4_000);
    sim.probe(1, true);
    let cmds = sim.step();
    assert_eq!(probed(&cmds), vec![(1, true)]);
    assert_eq!(sim.status(1), "READY");
    assert_eq!(sim.serving_ids(), vec![1, 2]);
    // A new run of failures starts the window afresh.
    sim.advance(2_000);
    sim.probe(1, false);
    sim.step();
    assert_eq!(sim.status(1), "NOT_READY");
    sim.advance(4_000);
    assert_eq!(sim.plan(), vec![], "4 s of the new run, not 10 s");
}

// 4. FAILED_INITIAL_DELAY and stopped scaling.

#[test]
fn never_ready_replica_fails_initial_delay_and_scaling_stops() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.run(1);
    sim.run(2);
    sim.probe(1, false);
    sim.probe(2, false);
    sim.advance(9_000);
    sim.probe(1, false);
    sim.probe(2, false);
    assert_eq!(sim.plan(), vec![], "within initial_delay_seconds");
    sim.advance(1_000);
    let cmds = sim.step();
    assert_eq!(
        retires(&cmds),
        vec![
            (1, ReplicaEnd::FailedInitialDelay, None),
            (2, ReplicaEnd::FailedInitialDelay, None)
        ]
    );
    assert_eq!(sim.status(1), "FAILED_INITIAL_DELAY");
    assert_eq!(sim.status(2), "FAILED_INITIAL_DELAY");
    assert!(sim.replica(1).message.contains("initial_delay_seconds"));
    assert!(stopped_scaling(sim.svc()));
    assert_eq!(service_status(&sim.s, sim.svc()), "FAILED");
    // From here on nothing is launched again.
    sim.advance(60_000);
    let cmds = sim.plan();
    assert_eq!(adds(&cmds), vec![], "{cmds:?}");
}

#[test]
fn one_failed_replica_of_a_never_ready_version_stops_scaling() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.run(1);
    sim.probe(1, false);
    sim.advance(10_000);
    sim.step();
    assert_eq!(sim.status(1), "FAILED_INITIAL_DELAY");
    assert!(stopped_scaling(sim.svc()));
    assert_eq!(service_status(&sim.s, sim.svc()), "FAILED");
    sim.advance(1_000);
    assert_eq!(adds(&sim.plan()), vec![]);
    // The other replica turning READY lifts it: the version works, and
    // the failed one is replaced (by now, if not before).
    sim.make_ready(&[2]);
    assert!(!stopped_scaling(sim.svc()));
    assert_eq!(service_status(&sim.s, sim.svc()), "READY");
    assert_eq!(sim.active(), vec![2, 3]);
}

#[test]
fn no_replacement_in_the_plan_that_fails_a_never_ready_version() {
    // Initial delay.
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.run(1);
    sim.run(2);
    sim.probe(1, false);
    sim.probe(2, false);
    sim.advance(10_000);
    let cmds = sim.plan();
    assert_eq!(retires(&cmds).len(), 2, "{cmds:?}");
    assert_eq!(adds(&cmds), vec![], "SkyServe stops scaling: {cmds:?}");
    // Its job failing (setup, #4349's case).
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.run(1);
    let job_id = sim.replica(1).job_id;
    sim.cmd(Command::RankEnded {
        job_id,
        attempt: 1,
        rank: 0,
        outcome: RankOutcome::SetupFailed(1),
        at_ms: sim.now,
    });
    let cmds = sim.plan();
    assert_eq!(retires(&cmds), vec![(1, ReplicaEnd::Failed, None)]);
    assert_eq!(adds(&cmds), vec![], "SkyServe stops scaling: {cmds:?}");
}

// 5. A replica's job ending by itself.

#[test]
fn replica_whose_job_fails_is_retired_failed_and_replaced() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.make_ready(&[1, 2]);
    sim.advance(5_000);
    let job_id = sim.replica(1).job_id;
    sim.cmd(Command::RankEnded {
        job_id,
        attempt: 1,
        rank: 0,
        outcome: RankOutcome::Exited(1),
        at_ms: sim.now,
    });
    let cmds = sim.step();
    assert_eq!(retires(&cmds), vec![(1, ReplicaEnd::Failed, None)]);
    assert_eq!(adds(&cmds), vec![(3, 1, false)]);
    assert_eq!(sim.status(1), "FAILED");
    assert!(
        sim.replica(1).message.contains("its job ended"),
        "{}",
        sim.replica(1).message
    );
    assert_eq!(
        sim.s.jobs[&job_id].state,
        JobState::Failed,
        "kept as it ended"
    );
    assert!(!stopped_scaling(sim.svc()));
    assert_eq!(sim.plan(), vec![]);
}

#[test]
fn a_replica_whose_run_exits_0_is_replaced_without_stopping_the_service() {
    // SkyServe: a `run` that exits 0 is not a failure.
    let mut sim = Sim::up(BASIC);
    sim.step();
    let job_id = sim.replica(1).job_id;
    sim.make_ready(&[1, 2]);
    sim.cmd(Command::RankEnded {
        job_id,
        attempt: 1,
        rank: 0,
        outcome: RankOutcome::Exited(0),
        at_ms: sim.now,
    });
    let cmds = sim.step();
    assert_eq!(retires(&cmds), vec![(1, ReplicaEnd::ScaledDown, None)]);
    assert_eq!(adds(&cmds), vec![(3, 1, false)]);
    assert_eq!(sim.status(1), "TERMINATED");
    assert_eq!(sim.replica(1).message, "its run exited 0");
    assert!(!stopped_scaling(sim.svc()));
}

#[test]
fn replica_whose_job_is_lost_with_its_noticed_node_ends_preempted() {
    // The notice, and the job ending before the loop saw either; the job
    // still holds its rank when it ends (cancelled on the node).
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.make_ready(&[1, 2]);
    let node = sim.s.jobs[&sim.replica(1).job_id].attempts[0].node_ids[0].clone();
    sim.cmd(Command::NodePreempted {
        node_id: node,
        kind: "aws:terminate".into(),
        deadline_ms: sim.now + 120_000,
        at_ms: sim.now,
    });
    let job_id = sim.replica(1).job_id;
    sim.cmd(Command::CancelJob {
        job_id,
        at_ms: sim.now,
    });
    let cmds = sim.step();
    assert_eq!(retires(&cmds), vec![(1, ReplicaEnd::Preempted, None)]);
    assert_eq!(adds(&cmds), vec![(3, 1, false)]);
    assert_eq!(sim.status(1), "PREEMPTED");
}

#[test]
fn replica_on_a_reclaimed_noticed_node_ends_preempted() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.make_ready(&[1, 2]);
    let node = sim.s.jobs[&sim.replica(1).job_id].attempts[0].node_ids[0].clone();
    sim.cmd(Command::NodePreempted {
        node_id: node.clone(),
        kind: "gcp:preempted".into(),
        deadline_ms: sim.now + 30_000,
        at_ms: sim.now,
    });
    // The cloud takes the node before the loop's next turn.
    sim.cmd(Command::NodeTerminated {
        node_id: node,
        at_ms: sim.now + 1_000,
    });
    sim.advance(2_000);
    assert!(sim.s.jobs[&sim.replica(1).job_id].state.is_terminal());
    let cmds = sim.step();
    assert_eq!(retires(&cmds), vec![(1, ReplicaEnd::Preempted, None)]);
    assert_eq!(sim.status(1), "PREEMPTED");
}

#[test]
fn preemption_of_a_never_ready_replica_does_not_stop_scaling() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    let node = sim.run(1);
    sim.cmd(Command::NodePreempted {
        node_id: node.clone(),
        kind: "aws:terminate".into(),
        deadline_ms: sim.now + 1_000,
        at_ms: sim.now,
    });
    sim.cmd(Command::NodeTerminated {
        node_id: node,
        at_ms: sim.now + 1_000,
    });
    sim.advance(2_000);
    sim.step();
    assert!(!stopped_scaling(sim.svc()));
    assert_ne!(service_status(&sim.s, sim.svc()), "FAILED");
}

// 6. Preemption notices.

#[test]
fn preemption_notice_takes_a_replica_out_at_once_and_drains_it_until_the_deadline() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.make_ready(&[1, 2]);
    let node = sim.s.jobs[&sim.replica(1).job_id].attempts[0].node_ids[0].clone();
    let deadline = sim.now + 120_000;
    sim.cmd(Command::NodePreempted {
        node_id: node,
        kind: "aws:terminate".into(),
        deadline_ms: deadline,
        at_ms: sim.now,
    });
    // Same state, no command from the loop yet: out of the balancers.
    assert_eq!(sim.serving_ids(), vec![2]);
    assert_eq!(sim.status(1), "PREEMPTED");
    sim.advance(1_000);
    let cmds = sim.step();
    assert_eq!(
        retires(&cmds),
        vec![(1, ReplicaEnd::Preempted, Some(deadline))]
    );
    assert_eq!(adds(&cmds), vec![(3, 1, false)]);
    assert_eq!(
        sim.replica(1).phase,
        ReplicaPhase::Draining {
            until_ms: deadline,
            end: ReplicaEnd::Preempted
        }
    );
    assert_eq!(sim.status(1), "PREEMPTED");
    assert!(!sim.s.jobs[&sim.replica(1).job_id].state.is_terminal());
    assert_eq!(sim.serving_ids(), vec![2]);
    // While it drains: nothing new, no second replacement.
    sim.advance(60_000);
    assert_eq!(sim.plan(), vec![]);
    // At the deadline it ends.
    sim.now = deadline;
    let cmds = sim.step();
    assert_eq!(retires(&cmds), vec![(1, ReplicaEnd::Preempted, None)]);
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(sim.status(1), "PREEMPTED");
    assert_eq!(
        sim.replica(1).phase,
        ReplicaPhase::Ended(ReplicaEnd::Preempted)
    );
    assert!(!stopped_scaling(sim.svc()));
    assert_eq!(sim.plan(), vec![]);
}

#[test]
fn draining_replica_whose_job_ends_early_ends_then() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.make_ready(&[1, 2]);
    let node = sim.s.jobs[&sim.replica(1).job_id].attempts[0].node_ids[0].clone();
    sim.cmd(Command::NodePreempted {
        node_id: node.clone(),
        kind: "aws:terminate".into(),
        deadline_ms: sim.now + 120_000,
        at_ms: sim.now,
    });
    sim.step();
    sim.advance(30_000);
    sim.cmd(Command::NodeTerminated {
        node_id: node,
        at_ms: sim.now,
    });
    let cmds = sim.step();
    assert_eq!(retires(&cmds), vec![(1, ReplicaEnd::Preempted, None)]);
    assert_eq!(sim.status(1), "PREEMPTED");
    assert_eq!(sim.replica(1).ended_at_ms, Some(sim.now));
}

// 7. Rolling update.

fn update(sim: &mut Sim, yaml: &str, mode: UpdateMode) {
    sim.apply(&[ServiceCommand::Update {
        name: SVC.into(),
        spec: spec(yaml),
        mode,
        at_ms: sim.now,
    }]);
}

#[test]
fn rolling_update_retires_old_replicas_only_as_new_ones_turn_ready() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.make_ready(&[1, 2]);
    sim.advance(1_000);
    update(&mut sim, BASIC_V2, UpdateMode::Rolling);
    assert_eq!(sim.svc().version, 2);
    let cmds = sim.settle();
    assert_eq!(adds(&cmds), vec![(3, 2, false), (4, 2, false)]);
    assert_eq!(retires(&cmds), vec![], "no new replica is READY yet");
    sim.run(3);
    sim.run(4);
    assert_eq!(sim.plan(), vec![]);
    assert_eq!(sim.serving_ids(), vec![1, 2]);
    // One new READY: every version serves, and exactly one old one goes.
    sim.advance(1_000);
    sim.probe(3, true);
    let cmds = sim.step();
    assert_eq!(probed(&cmds), vec![(3, true)]);
    assert_eq!(sim.serving_ids(), vec![1, 2, 3]);
    let drain_until = sim.now + 120_000;
    let cmds = sim.settle();
    assert_eq!(
        retires(&cmds),
        vec![(1, ReplicaEnd::ScaledDown, Some(drain_until))]
    );
    assert_eq!(adds(&cmds), vec![]);
    assert_eq!(sim.status(1), "SHUTTING_DOWN");
    assert_eq!(sim.status(2), "READY");
    assert_eq!(sim.serving_ids(), vec![2, 3]);
    assert!(sim.replica(1).message.contains("version 2"));
    // Later turns keep it so.
    sim.advance(10_000);
    assert_eq!(sim.plan(), vec![]);
    // Both new READY: the other old one goes too.
    sim.probe(4, true);
    let cmds = sim.step();
    assert_eq!(probed(&cmds), vec![(4, true)]);
    assert_eq!(sim.serving_ids(), vec![2, 3, 4]);
    let drain_until2 = sim.now + 120_000;
    let cmds = sim.settle();
    assert_eq!(
        retires(&cmds),
        vec![(2, ReplicaEnd::ScaledDown, Some(drain_until2))]
    );
    assert_eq!(sim.serving_ids(), vec![3, 4]);
    // Drains end on time: TERMINATED.
    sim.now = drain_until;
    let cmds = sim.step();
    assert_eq!(retires(&cmds), vec![(1, ReplicaEnd::ScaledDown, None)]);
    assert_eq!(sim.status(1), "TERMINATED");
    assert_eq!(
        sim.s.jobs[&sim.replica(1).job_id].state,
        JobState::Cancelled
    );
    sim.now = drain_until2;
    sim.step();
    assert_eq!(sim.status(2), "TERMINATED");
    assert_eq!(sim.active(), vec![3, 4]);
    assert_eq!(sim.plan(), vec![]);
}

#[test]
fn rolling_update_retires_old_replicas_earliest_stage_first() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    // Replica 1 READY, replica 2 still starting.
    sim.make_ready(&[1]);
    sim.run(2);
    update(&mut sim, BASIC_V2, UpdateMode::Rolling);
    sim.settle();
    sim.run(3);
    sim.probe(3, true);
    let cmds = sim.settle();
    assert_eq!(probed(&cmds), vec![(3, true)]);
    // The one still starting goes first, with nothing to drain.
    assert_eq!(retires(&cmds), vec![(2, ReplicaEnd::ScaledDown, None)]);
    assert_eq!(sim.status(2), "TERMINATED");
    assert_eq!(sim.serving_ids(), vec![1, 3]);
}

// 8. Blue-green update.

#[test]
fn blue_green_switches_when_the_new_version_has_min_replicas_ready() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.make_ready(&[1, 2]);
    update(&mut sim, BASIC_V2, UpdateMode::BlueGreen);
    let cmds = sim.settle();
    assert_eq!(adds(&cmds), vec![(3, 2, false), (4, 2, false)]);
    sim.run(3);
    sim.run(4);
    // One new READY (min_replicas is 2): the old version serves alone.
    sim.advance(1_000);
    sim.probe(3, true);
    let cmds = sim.settle();
    assert_eq!(probed(&cmds), vec![(3, true)]);
    assert_eq!(retires(&cmds), vec![]);
    assert_eq!(sim.status(3), "READY");
    assert_eq!(sim.serving_ids(), vec![1, 2]);
    assert_eq!(service_status(&sim.s, sim.svc()), "READY");
    // Both READY: only the new version serves, and every old one goes.
    sim.advance(1_000);
    sim.probe(4, true);
    let cmds = sim.step();
    assert_eq!(probed(&cmds), vec![(4, true)]);
    assert_eq!(sim.serving_ids(), vec![3, 4], "the switch is at once");
    let until = sim.now + 120_000;
    let cmds = sim.settle();
    assert_eq!(
        retires(&cmds),
        vec![
            (1, ReplicaEnd::ScaledDown, Some(until)),
            (2, ReplicaEnd::ScaledDown, Some(until))
        ]
    );
    assert_eq!(sim.status(1), "SHUTTING_DOWN");
    assert_eq!(sim.status(2), "SHUTTING_DOWN");
    assert_eq!(sim.serving_ids(), vec![3, 4]);
}

#[test]
fn blue_green_serves_the_new_version_when_no_old_replica_is_ready() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    sim.make_ready(&[1, 2]);
    update(&mut sim, BASIC_V2, UpdateMode::BlueGreen);
    sim.settle();
    sim.make_ready(&[3]);
    // The old replicas stop passing their probes.
    sim.probe(1, false);
    sim.probe(2, false);
    sim.step();
    assert_eq!(sim.status(1), "NOT_READY");
    assert_eq!(sim.serving_ids(), vec![3]);
}

// 9. Scale-down order.

const AUTOSCALED: &str = "resources: {ports: 8080}
run: python serve.py
service:
  readiness_probe: /health
  replica_policy: {min_replicas: 1, max_replicas: 4, target_qps_per_replica: 2}
";

#[test]
fn scale_down_retires_earlier_stages_before_ready_ones() {
    let mut sim = Sim::up(AUTOSCALED);
    assert_eq!(sim.svc().target, 1);
    sim.apply(&[ServiceCommand::SetTarget {
        name: SVC.into(),
        target: 4,
        at_ms: sim.now,
    }]);
    let cmds = sim.step();
    assert_eq!(adds(&cmds).len(), 4);
    // 1 READY, 2 starting, 3 provisioning, 4 pending.
    sim.make_ready(&[1]);
    sim.run(2);
    sim.provision(3, "127.0.0.1", "");
    assert_eq!(
        (1..=4).map(|i| sim.status(i)).collect::<Vec<_>>(),
        vec!["READY", "STARTING", "PROVISIONING", "PENDING"]
    );
    let set = |sim: &mut Sim, target| {
        sim.apply(&[ServiceCommand::SetTarget {
            name: SVC.into(),
            target,
            at_ms: sim.now,
        }])
    };
    set(&mut sim, 3);
    let cmds = sim.step();
    assert_eq!(retires(&cmds), vec![(4, ReplicaEnd::ScaledDown, None)]);
    assert_eq!(adds(&cmds), vec![]);
    set(&mut sim, 2);
    let cmds = sim.step();
    assert_eq!(retires(&cmds), vec![(3, ReplicaEnd::ScaledDown, None)]);
    set(&mut sim, 1);
    let cmds = sim.step();
    assert_eq!(retires(&cmds), vec![(2, ReplicaEnd::ScaledDown, None)]);
    assert_eq!(sim.status(4), "TERMINATED");
    assert_eq!(sim.status(1), "READY");
    assert_eq!(sim.active(), vec![1]);
    assert_eq!(sim.plan(), vec![]);
}

#[test]
fn scale_down_of_ready_replicas_drains_the_oldest_first() {
    let mut sim = Sim::up(AUTOSCALED);
    sim.apply(&[ServiceCommand::SetTarget {
        name: SVC.into(),
        target: 3,
        at_ms: sim.now,
    }]);
    sim.step();
    sim.make_ready(&[1, 2, 3]);
    sim.apply(&[ServiceCommand::SetTarget {
        name: SVC.into(),
        target: 1,
        at_ms: sim.now,
    }]);
    let until = sim.now + 120_000;
    let cmds = sim.settle();
    assert_eq!(
        retires(&cmds),
        vec![
            (1, ReplicaEnd::ScaledDown, Some(until)),
            (2, ReplicaEnd::ScaledDown, Some(until))
        ]
    );
    assert_eq!(sim.serving_ids(), vec![3]);
    assert!(sim.replica(1).message.contains("scaled down"));
    // Scaled to zero: NO_REPLICA once nothing serves.
    sim.apply(&[ServiceCommand::SetTarget {
        name: SVC.into(),
        target: 0,
        at_ms: sim.now,
    }]);
    sim.settle();
    assert_eq!(sim.serving_ids(), Vec::<u32>::new());
    assert_eq!(service_status(&sim.s, sim.svc()), "NO_REPLICA");
}

// 10. Spot with on-demand fallback.

const SPOT_BASE: &str = "resources: {use_spot: true, ports: 8080}
run: python serve.py
service:
  readiness_probe: /health
  replica_policy: {min_replicas: 2, max_replicas: 4, target_qps_per_replica: 1, base_ondemand_fallback_replicas: 1}
";

const SPOT_DYNAMIC: &str = "resources: {use_spot: true, ports: 8080}
run: python serve.py
service:
  readiness_probe: /health
  replica_policy: {min_replicas: 2, max_replicas: 4, target_qps_per_replica: 1, base_ondemand_fallback_replicas: 1, dynamic_ondemand_fallback: true}
";

#[test]
fn spot_target_keeps_base_on_demand_replicas() {
    let mut sim = Sim::up(SPOT_BASE);
    let cmds = sim.step();
    assert_eq!(adds(&cmds), vec![(1, 1, true), (2, 1, false)]);
    // The replicas' jobs ask for spot, or not.
    let spot_of = |sim: &Sim, id| {
        sim.s.jobs[&sim.replica(id).job_id]
            .spec
            .resources
            .candidates
            .iter()
            .all(|c| c.use_spot)
    };
    assert!(spot_of(&sim, 1));
    assert!(!spot_of(&sim, 2));
    // Without dynamic fallback a spot replica not READY is not covered.
    sim.make_ready(&[2]);
    assert_eq!(sim.plan(), vec![]);
}

#[test]
fn dynamic_fallback_covers_spot_replicas_not_ready_then_retires_the_surplus() {
    let mut sim = Sim::up(SPOT_DYNAMIC);
    let cmds = sim.step();
    assert_eq!(
        adds(&cmds),
        vec![(1, 1, true), (2, 1, false), (3, 1, false)]
    );
    assert_eq!(sim.plan(), vec![]);
    sim.make_ready(&[2, 3]);
    sim.run(1);
    assert_eq!(sim.plan(), vec![], "spot replica 1 is not READY yet");
    // The spot replica READY: one on-demand replica is surplus.
    sim.probe(1, true);
    let cmds = sim.step();
    assert_eq!(probed(&cmds), vec![(1, true)]);
    let until = sim.now + 120_000;
    let cmds = sim.settle();
    assert_eq!(
        retires(&cmds),
        vec![(2, ReplicaEnd::ScaledDown, Some(until))]
    );
    assert_eq!(adds(&cmds), vec![]);
    assert_eq!(sim.active(), vec![1, 3]);
    assert_eq!(sim.serving_ids(), vec![1, 3]);
    // The spot replica preempted: on-demand stands in again.
    let node = sim.s.jobs[&sim.replica(1).job_id].attempts[0].node_ids[0].clone();
    sim.cmd(Command::NodePreempted {
        node_id: node,
        kind: "aws:terminate".into(),
        deadline_ms: sim.now + 120_000,
        at_ms: sim.now,
    });
    let cmds = sim.step();
    assert_eq!(retires(&cmds)[0].0, 1);
    // A spot replacement, and an on-demand one while it is not READY.
    assert_eq!(adds(&cmds), vec![(4, 1, true), (5, 1, false)]);
}

// 11. The autoscaler's rule.

fn qps_policy() -> ReplicaPolicy {
    ReplicaPolicy {
        min_replicas: 1,
        max_replicas: 5,
        target_qps_per_replica: Some(2.0),
        upscale_delay_s: 300,
        downscale_delay_s: 1200,
        ..ReplicaPolicy::fixed(1)
    }
}

#[test]
fn fixed_policy_keeps_min() {
    let p = ReplicaPolicy::fixed(3);
    let mut h = Hysteresis::default();
    assert_eq!(next_target(&p, 3, 1000.0, &mut h, 0), 3);
    assert_eq!(next_target(&p, 1, 0.0, &mut h, 0), 3);
    assert_eq!(h, Hysteresis::default());
}

#[test]
fn scale_up_waits_for_upscale_delay() {
    let p = qps_policy();
    let mut h = Hysteresis::default();
    // 6 qps at 2 per replica: 3 wanted.
    assert_eq!(next_target(&p, 1, 6.0, &mut h, 0), 1);
    assert_eq!(h.higher_since_ms, Some(0));
    assert_eq!(next_target(&p, 1, 6.0, &mut h, 299_999), 1);
    assert_eq!(next_target(&p, 1, 5.0, &mut h, 300_000), 3, "ceil(5/2)");
    assert_eq!(h, Hysteresis::default());
}

#[test]
fn scale_down_waits_for_downscale_delay() {
    let p = qps_policy();
    let mut h = Hysteresis::default();
    assert_eq!(next_target(&p, 4, 0.0, &mut h, 0), 4);
    assert_eq!(h.lower_since_ms, Some(0));
    assert_eq!(next_target(&p, 4, 0.0, &mut h, 1_199_999), 4);
    assert_eq!(
        next_target(&p, 4, 0.0, &mut h, 1_200_000),
        1,
        "clamped to min"
    );
    assert_eq!(h, Hysteresis::default());
}

#[test]
fn scale_from_zero_is_at_once() {
    let p = ReplicaPolicy {
        min_replicas: 0,
        ..qps_policy()
    };
    let mut h = Hysteresis::default();
    assert_eq!(next_target(&p, 0, 0.0, &mut h, 0), 0);
    assert_eq!(next_target(&p, 0, 0.1, &mut h, 1), 1);
    assert_eq!(next_target(&p, 0, 7.0, &mut h, 2), 4);
}

#[test]
fn target_is_clamped_to_min_and_max() {
    let p = qps_policy();
    let mut h = Hysteresis::default();
    assert_eq!(next_target(&p, 1, 1_000.0, &mut h, 0), 1);
    assert_eq!(next_target(&p, 1, 1_000.0, &mut h, 300_000), 5);
    let mut h = Hysteresis::default();
    assert_eq!(next_target(&p, 1, 0.0, &mut h, 0), 1, "min: nothing lower");
    assert_eq!(h, Hysteresis::default());
}

#[test]
fn a_reading_equal_to_the_current_target_resets_both_timers() {
    let p = qps_policy();
    let mut h = Hysteresis::default();
    assert_eq!(next_target(&p, 2, 6.0, &mut h, 0), 2);
    // 4 qps: 2 wanted, as now.
    assert_eq!(next_target(&p, 2, 4.0, &mut h, 100_000), 2);
    assert_eq!(h, Hysteresis::default());
    assert_eq!(
        next_target(&p, 2, 6.0, &mut h, 300_000),
        2,
        "timer restarted"
    );
    assert_eq!(next_target(&p, 2, 6.0, &mut h, 599_999), 2);
    assert_eq!(next_target(&p, 2, 6.0, &mut h, 600_000), 3);
    // Down as well.
    let mut h = Hysteresis::default();
    assert_eq!(next_target(&p, 2, 0.0, &mut h, 0), 2);
    assert_eq!(next_target(&p, 2, 3.0, &mut h, 600_000), 2);
    assert_eq!(next_target(&p, 2, 0.0, &mut h, 1_200_000), 2);
    assert_eq!(next_target(&p, 2, 0.0, &mut h, 2_400_000), 1);
}

#[test]
fn the_opposite_direction_resets_the_other_timer() {
    let p = qps_policy();
    let mut h = Hysteresis::default();
    assert_eq!(next_target(&p, 2, 6.0, &mut h, 0), 2);
    assert_eq!(next_target(&p, 2, 0.0, &mut h, 100_000), 2);
    assert_eq!(h.higher_since_ms, None);
    assert_eq!(h.lower_since_ms, Some(100_000));
    assert_eq!(next_target(&p, 2, 6.0, &mut h, 300_000), 2);
    assert_eq!(h.lower_since_ms, None);
    assert_eq!(next_target(&p, 2, 6.0, &mut h, 600_000), 3);
}

// 12. Drain length.

fn with_stream_timeout(t: Option<u32>) -> crate::task::ServiceSpec {
    let lb = t.map_or(String::new(), |t| {
        format!("  load_balancer: {{stream_timeout_seconds: {t}}}\n")
    });
    let y = format!("resources: {{ports: 8080}}\nrun: x\nservice:\n  replicas: 1\n{lb}");
    spec(&y).service.unwrap()
}

#[test]
fn drain_is_the_stream_timeout_up_to_120_s() {
    assert_eq!(drain_ms(&with_stream_timeout(None)), 120_000);
    assert_eq!(drain_ms(&with_stream_timeout(Some(30))), 30_000);
    assert_eq!(drain_ms(&with_stream_timeout(Some(120))), 120_000);
    assert_eq!(drain_ms(&with_stream_timeout(Some(600))), 120_000);
}

#[test]
fn scale_down_drains_for_the_services_drain_length() {
    let y = "resources: {ports: 8080}
run: python serve.py
service:
  readiness_probe: /health
  replica_policy: {min_replicas: 1, max_replicas: 4, target_qps_per_replica: 2}
  load_balancer: {stream_timeout_seconds: 30}
";
    let mut sim = Sim::up(y);
    sim.apply(&[ServiceCommand::SetTarget {
        name: SVC.into(),
        target: 2,
        at_ms: sim.now,
    }]);
    sim.step();
    sim.make_ready(&[1, 2]);
    sim.apply(&[ServiceCommand::SetTarget {
        name: SVC.into(),
        target: 1,
        at_ms: sim.now,
    }]);
    let cmds = sim.step();
    assert_eq!(
        retires(&cmds),
        vec![(1, ReplicaEnd::ScaledDown, Some(sim.now + 30_000))]
    );
    sim.advance(29_999);
    assert_eq!(sim.plan(), vec![]);
    sim.advance(1);
    let cmds = sim.step();
    assert_eq!(retires(&cmds), vec![(1, ReplicaEnd::ScaledDown, None)]);
    assert_eq!(sim.status(1), "TERMINATED");
}

#[test]
fn two_replicas_never_share_a_machine_of_their_own_but_share_a_local_host() {
    let mut sim = Sim::up(BASIC);
    sim.step();
    // Replica 1 on a VM of its own (not the loopback).
    let vm = sim.run_at(1, "10.0.0.7", "");
    // Replica 2 may not join it there: both would listen on the service's port.
    let second = sim.replica(2).job_id;
    let refused = sim.s.apply(&Command::AssignJob {
        job_id: second,
        node_ids: vec![vm.clone()],
        candidate: 0,
        at_ms: sim.now,
    });
    assert!(
        matches!(&refused, Outcome::Rejected(r) if r.to_string().contains("already runs a service replica")),
        "{refused:?}"
    );
    // On a local node (a host replicas share), they may: each has a port
    // of its own there.
    let mut sim = Sim::up(BASIC);
    sim.step();
    let local = sim.run(1);
    let second = sim.replica(2).job_id;
    let placed = sim.s.apply(&Command::AssignJob {
        job_id: second,
        node_ids: vec![local],
        candidate: 0,
        at_ms: sim.now,
    });
    assert_eq!(placed, Outcome::Applied);
    assert_ne!(
        sim.replica(1).shared_host_port,
        sim.replica(2).shared_host_port
    );
}
