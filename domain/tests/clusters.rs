//! Named clusters in the pure core: launch -c, exec, stop/start, autostop,
//! and the release of idle nodes of no cluster. Time is carried by the
//! commands, so each test steps a clock by hand.

use std::collections::BTreeMap;

use nembo_domain::cost;
use nembo_domain::scheduler::{plan, Policy};
use nembo_domain::state::{
    ClusterStatus, Command, JobState, NodeState, Offering, Outcome, RankOutcome, Rejection,
    Resources, State,
};
use nembo_domain::task::{parse_task_yaml, ClusterTarget, TaskSpec};

const MIN: i64 = 60_000;

fn offerings() -> Vec<Offering> {
    let mk = |t: &str, gpus: f64, price: f64, spot: Option<f64>| Offering {
        provider: "local".into(),
        region: "us-east".into(),
        instance_type: t.into(),
        resources: Resources {
            accelerators: if gpus > 0.0 {
                BTreeMap::from([("H100".to_string(), gpus)])
            } else {
                BTreeMap::new()
            },
            cpus: 8.0,
            memory_gb: 32.0,
        },
        hourly_price: price,
        spot_price: spot,
        zone: None,
        runs_as_coordinator_user: false,
        simulated: true,
        fixed_machines: None,
        disk_gb_max: None,
        opens_ports: false,
        ports_per_node: false,
        custom_images: false,
        can_stop: true,
    };
    vec![
        mk("cpu-8", 0.0, 0.5, Some(0.2)),
        mk("h100-2", 2.0, 6.0, Some(2.0)),
    ]
}

fn task(yaml: &str, cluster: &str, exec: bool) -> TaskSpec {
    let mut t = parse_task_yaml(yaml, &Default::default()).unwrap();
    t.cluster = Some(ClusterTarget {
        name: cluster.into(),
        exec,
    });
    t
}

fn submit(s: &mut State, spec: TaskSpec, at_ms: i64) -> Outcome {
    s.apply(&Command::SubmitJob {
        spec,
        idempotency_key: None,
        owner: "alice".into(),
        at_ms,
    })
}

fn job_id(o: &Outcome) -> u64 {
    match o {
        Outcome::Job { job_id, .. } => *job_id,
        other => panic!("expected a job, got {other:?}"),
    }
}

/// Plans at `now` and applies the plan; then plays the provider and the
/// agents: launched nodes come up, stopping nodes stop, starting nodes come
/// back, started ranks run. Returns the planned commands.
fn step(s: &mut State, now: i64) -> Vec<Command> {
    let mut p = plan(s, &offerings(), Policy::default(), now);
    for c in &p {
        s.apply(c);
    }
    play_provider(s, now);
    // Nodes that came up now take the jobs they were provisioned for.
    let assigned = plan(s, &offerings(), Policy::default(), now);
    for c in &assigned {
        s.apply(c);
    }
    p.extend(assigned);
    play_agents(s, now);
    p
}

fn play_provider(s: &mut State, now: i64) {
    let nodes: Vec<(String, NodeState, bool)> = s
        .nodes
        .values()
        .map(|n| (n.id.clone(), n.state, n.instance_id.is_some()))
        .collect();
    for (id, state, launched) in nodes {
        let cmds = match state {
            NodeState::Provisioning if !launched => vec![
                Command::NodeLaunched {
                    node_id: id.clone(),
                    instance_id: format!("i-{id}"),
                    at_ms: now,
                },
                up(&id, now),
            ],
            NodeState::Starting => vec![up(&id, now)],
            NodeState::Stopping if s.jobs_on(&id).is_empty() => vec![Command::NodeStopped {
                node_id: id.clone(),
                at_ms: now,
            }],
            NodeState::Terminating => vec![Command::NodeTerminated {
                node_id: id.clone(),
                at_ms: now,
            }],
            _ => vec![],
        };
        for c in cmds {
            s.apply(&c);
        }
    }
}

fn play_agents(s: &mut State, now: i64) {
    let starting: Vec<(u64, u32, usize)> = s
        .active_jobs()
        .filter_map(|j| j.attempts.last().map(|a| (j.id, a)))
        .filter(|(_, a)| a.state == JobState::Starting)
        .map(|(id, a)| (id, a.number, a.node_ids.len()))
        .collect();
    for (id, attempt, ranks) in starting {
        for rank in 0..ranks as u32 {
            s.apply(&Command::RankStarted {
                job_id: id,
                attempt,
                rank,
                at_ms: now,
            });
        }
    }
}

fn up(id: &str, now: i64) -> Command {
    Command::NodeUp {
        node_id: id.into(),
        address: "10.0.0.1".into(),
        public_address: String::new(),
        at_ms: now,
    }
}

fn finish(s: &mut State, job: u64, now: i64) {
    let a = s.jobs[&job].attempts.last().unwrap().clone();
    for rank in 0..a.node_ids.len() as u32 {
        s.apply(&Command::RankEnded {
            job_id: job,
            attempt: a.number,
            rank,
            outcome: RankOutcome::Exited(0),
            at_ms: now,
        });
    }
    assert_eq!(s.jobs[&job].state, JobState::Succeeded);
}

fn status(s: &State, name: &str) -> ClusterStatus {
    s.cluster_status(&s.clusters[name])
}

#[test]
fn launch_creates_the_cluster_and_exec_reuses_its_nodes() {
    let mut s = State::default();
    let j1 = job_id(&submit(
        &mut s,
        task(
            "num_nodes: 2\nresources: {accelerators: H100:2}",
            "dev",
            false,
        ),
        0,
    ));
    step(&mut s, 1);
    step(&mut s, 2);
    let c = &s.clusters["dev"];
    assert_eq!(c.node_ids.len(), 2);
    assert_eq!(status(&s, "dev"), ClusterStatus::Up);
    for id in &c.node_ids {
        assert_eq!(s.nodes[id].cluster.as_deref(), Some("dev"));
    }
    assert_eq!(s.jobs[&j1].state, JobState::Running);
    let nodes_before = s.nodes.len();

    // Three execs while the first job runs: they queue for its GPUs, then
    // share the nodes, head first.
    let execs: Vec<u64> = (0..3)
        .map(|i| {
            job_id(&submit(
                &mut s,
                task("resources: {accelerators: H100:1}", "dev", true),
                10 + i,
            ))
        })
        .collect();
    step(&mut s, 20);
    assert_eq!(s.nodes.len(), nodes_before, "exec never provisions");
    assert!(execs.iter().all(|j| s.jobs[j].state == JobState::Pending));
    finish(&mut s, j1, 30);
    step(&mut s, 31);
    step(&mut s, 32);
    let on = |j: &u64| s.jobs[j].attempts[0].node_ids[0].clone();
    let c = &s.clusters["dev"];
    assert_eq!(
        execs.iter().map(on).collect::<Vec<_>>(),
        vec![
            c.node_ids[0].clone(),
            c.node_ids[0].clone(),
            c.node_ids[1].clone()
        ]
    );
    assert_eq!(s.nodes.len(), nodes_before, "exec never provisions");

    // A job of no cluster never lands on the cluster's nodes.
    submit(
        &mut s,
        parse_task_yaml("resources: {accelerators: H100:2}", &Default::default()).unwrap(),
        40,
    );
    let p = step(&mut s, 41);
    assert!(
        p.iter()
            .any(|c| matches!(c, Command::ProvisionNodes { .. })),
        "{p:?}"
    );
}

#[test]
fn a_task_that_does_not_fit_the_cluster_is_refused_naming_what_differs() {
    let mut s = State::default();
    submit(
        &mut s,
        task("resources: {accelerators: H100:2}", "dev", false),
        0,
    );
    step(&mut s, 1);
    step(&mut s, 2);
    let out = submit(
        &mut s,
        task("resources: {accelerators: H100:4}", "dev", true),
        3,
    );
    let Outcome::Rejected(Rejection::Conflict(msg)) = out else {
        panic!("{out:?}")
    };
    assert!(msg.contains("Requested: H100:4"), "{msg}");
    assert!(msg.contains("h100-2"), "{msg}");
    let out = submit(
        &mut s,
        task("num_nodes: 2\nresources: {cpus: 2+}", "dev", true),
        3,
    );
    assert!(
        matches!(&out, Outcome::Rejected(Rejection::Conflict(m)) if m.contains("needs 2 nodes")),
        "{out:?}"
    );
    let out = submit(&mut s, task("run: echo hi", "nope", true), 3);
    assert_eq!(
        out,
        Outcome::Rejected(Rejection::NoSuchCluster("nope".into()))
    );
    let bad = submit(&mut s, task("run: echo hi", "node-3", false), 3);
    assert!(matches!(bad, Outcome::Rejected(_)), "{bad:?}");
}

#[test]
fn stop_and_start_keep_the_nodes_and_bill_only_the_running_time() {
    let mut s = State::default();
    let j = job_id(&submit(
        &mut s,
        task("resources: {accelerators: H100:2}", "dev", false),
        0,
    ));
    step(&mut s, 0);
    let node = s.clusters["dev"].node_ids[0].clone();
    assert_eq!(s.jobs[&j].state, JobState::Running);

    // Stopping cancels the running job; the node stops once its rank ended.
    assert_eq!(
        s.apply(&Command::StopCluster {
            name: "dev".into(),
            at_ms: 60 * MIN,
        }),
        Outcome::Applied
    );
    assert_eq!(s.jobs[&j].state, JobState::Cancelled);
    assert_eq!(s.nodes[&node].state, NodeState::Stopping);
    assert_eq!(status(&s, "dev"), ClusterStatus::Init);
    s.apply(&Command::RankEnded {
        job_id: j,
        attempt: 1,
        rank: 0,
        outcome: RankOutcome::Cancelled,
        at_ms: 60 * MIN,
    });
    step(&mut s, 60 * MIN);
    assert_eq!(status(&s, "dev"), ClusterStatus::Stopped);

    // exec on a stopped cluster is refused; nothing is queued.
    let out = submit(&mut s, task("run: echo hi", "dev", true), 61 * MIN);
    assert!(
        matches!(&out, Outcome::Rejected(Rejection::Conflict(m)) if m.contains("stopped")),
        "{out:?}"
    );

    // Two hours stopped cost nothing.
    let at = |s: &State, t| {
        cost::report(s, t)
            .nodes
            .iter()
            .find(|n| n.node_id == node)
            .unwrap()
            .hours
    };
    assert!(
        (at(&s, 180 * MIN) - 1.0).abs() < 1e-9,
        "{}",
        at(&s, 180 * MIN)
    );

    // `launch -c` on a stopped cluster starts it in place and runs there.
    let j2 = job_id(&submit(
        &mut s,
        task("resources: {accelerators: H100:2}", "dev", false),
        180 * MIN,
    ));
    assert_eq!(s.nodes[&node].state, NodeState::Starting);
    step(&mut s, 181 * MIN);
    step(&mut s, 181 * MIN);
    assert_eq!(status(&s, "dev"), ClusterStatus::Up);
    assert_eq!(s.jobs[&j2].state, JobState::Running);
    assert_eq!(s.jobs[&j2].attempts[0].node_ids, vec![node.clone()]);
    // Billed: the first hour, then from the start on.
    assert!(
        (at(&s, 240 * MIN) - 2.0).abs() < 1e-6,
        "{}",
        at(&s, 240 * MIN)
    );
}

#[test]
fn spot_clusters_cannot_be_stopped() {
    let mut s = State::default();
    submit(
        &mut s,
        task(
            "resources: {accelerators: H100:2, use_spot: true}",
            "cheap",
            false,
        ),
        0,
    );
    step(&mut s, 0);
    let out = s.apply(&Command::StopCluster {
        name: "cheap".into(),
        at_ms: 1,
    });
    let Outcome::Rejected(Rejection::Conflict(msg)) = out else {
        panic!("{out:?}")
    };
    assert!(
        msg.contains("spot") && msg.contains("nembo down cheap"),
        "{msg}"
    );
}

/// The countdown starts when the last job ends; a job running keeps the
/// cluster up; autostop stops, autodown tears down; a decision proposed by
/// one leader and applied after another's changes nothing twice.
#[test]
fn autostop_counts_from_the_last_job_and_stops_or_downs() {
    let mut s = State::default();
    let j = job_id(&submit(
        &mut s,
        task(
            "resources: {accelerators: H100:2, autostop: {idle_minutes: 10}}",
            "dev",
            false,
        ),
        0,
    ));
    let d = job_id(&submit(
        &mut s,
        task(
            "resources: {cpus: 2+, autostop: {idle_minutes: 10, down: true}}",
            "batch",
            false,
        ),
        0,
    ));
    step(&mut s, 0);
    // Running for an hour: never idle.
    for t in [10, 30, 59] {
        let p = step(&mut s, t * MIN);
        assert!(
            !p.iter()
                .any(|c| matches!(c, Command::AutostopCluster { .. })),
            "{p:?}"
        );
    }
    finish(&mut s, j, 60 * MIN);
    finish(&mut s, d, 60 * MIN);
    let p = step(&mut s, 69 * MIN);
    assert!(
        !p.iter()
            .any(|c| matches!(c, Command::AutostopCluster { .. })),
        "{p:?}"
    );
    // A decision made on a stale view is refused by apply at its own time.
    let early = s.apply(&Command::AutostopCluster {
        name: "dev".into(),
        at_ms: 69 * MIN,
    });
    assert!(matches!(early, Outcome::Rejected(_)), "{early:?}");
    let p = step(&mut s, 70 * MIN);
    let stops: Vec<&str> = p
        .iter()
        .filter_map(|c| match c {
            Command::AutostopCluster { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(stops, vec!["batch", "dev"]);
    step(&mut s, 70 * MIN);
    assert_eq!(status(&s, "dev"), ClusterStatus::Stopped);
    assert!(
        !s.clusters.contains_key("batch"),
        "autodown forgets the cluster"
    );
    assert!(s
        .nodes
        .values()
        .filter(|n| n.cluster.as_deref() == Some("batch"))
        .all(|n| n.state == NodeState::Terminated));
    // The same decision again (a new leader re-proposing) changes nothing.
    let again = s.apply(&Command::AutostopCluster {
        name: "dev".into(),
        at_ms: 71 * MIN,
    });
    assert!(matches!(again, Outcome::Rejected(_)), "{again:?}");
}

/// SkyPilot's autostop hook: when the window passes, the hook runs first
/// on the cluster as a job of its own; the stop comes once it ends, or
/// once its timeout passes (the hook is then cancelled). Its own end is
/// not activity, and new work makes the next idle period run it again.
#[test]
fn an_autostop_hook_runs_before_the_stop_up_to_its_timeout() {
    let mut s = State::default();
    let yaml =
        "resources: {cpus: 2+, autostop: {idle_minutes: 10, hook: 'git push', hook_timeout: 300}}";
    let j = job_id(&submit(&mut s, task(yaml, "dev", false), 0));
    step(&mut s, 0);
    finish(&mut s, j, MIN);
    let autostops = |p: &[Command]| {
        p.iter()
            .filter(|c| matches!(c, Command::AutostopCluster { .. }))
            .count()
    };
    // The window passes: the hook is queued on the cluster, which stays up.
    let p = step(&mut s, 11 * MIN);
    assert_eq!(autostops(&p), 1, "{p:?}");
    let hook = s.clusters["dev"].autostop_hook.expect("the hook job");
    assert_eq!(s.jobs[&hook].spec.run.as_deref(), Some("git push"));
    assert_eq!(s.jobs[&hook].state, JobState::Running, "placed on the head");
    assert_eq!(status(&s, "dev"), ClusterStatus::Up);
    // While it runs, nothing more is proposed.
    assert_eq!(autostops(&step(&mut s, 12 * MIN)), 0);
    finish(&mut s, hook, 13 * MIN);
    // Its end is not activity: the stop goes on at once.
    let p = step(&mut s, 13 * MIN);
    assert_eq!(autostops(&p), 1, "{p:?}");
    step(&mut s, 13 * MIN);
    assert_eq!(status(&s, "dev"), ClusterStatus::Stopped);

    // Started again and given work: the next idle period runs the hook
    // again; this time it hangs, and the stop comes at its timeout.
    s.apply(&Command::StartCluster {
        name: "dev".into(),
        at_ms: 20 * MIN,
    });
    step(&mut s, 20 * MIN);
    let k = job_id(&submit(&mut s, task("run: x", "dev", true), 21 * MIN));
    step(&mut s, 21 * MIN);
    finish(&mut s, k, 22 * MIN);
    assert_eq!(autostops(&step(&mut s, 32 * MIN)), 1);
    let hung = s.clusters["dev"].autostop_hook.expect("a new hook job");
    assert_ne!(hung, hook);
    assert_eq!(
        autostops(&step(&mut s, 36 * MIN)),
        0,
        "within its 5 minutes"
    );
    assert_eq!(autostops(&step(&mut s, 37 * MIN)), 1, "its timeout passed");
    assert_eq!(s.jobs[&hung].state, JobState::Cancelled);
    // The agent stops the hook's process; then the node stops.
    let attempt = s.jobs[&hung].attempts.last().unwrap().number;
    s.apply(&Command::RankEnded {
        job_id: hung,
        attempt,
        rank: 0,
        outcome: RankOutcome::Cancelled,
        at_ms: 37 * MIN,
    });
    step(&mut s, 37 * MIN);
    assert_eq!(status(&s, "dev"), ClusterStatus::Stopped);
    // Bad forms name the field.
    for (y, path) in [
        (
            "resources: {autostop: {hook: ''}}",
            "resources.autostop.hook",
        ),
        (
            "resources: {autostop: {hook: [a]}}",
            "resources.autostop.hook",
        ),
        (
            "resources: {autostop: {hook: x, hook_timeout: 0}}",
            "resources.autostop.hook_timeout",
        ),
        (
            "resources: {autostop: {hook_timeout: soon}}",
            "resources.autostop.hook_timeout",
        ),
    ] {
        assert_eq!(
            parse_task_yaml(y, &Default::default()).unwrap_err().path,
            path,
            "{y}"
        );
    }
}

#[test]
fn autostop_forms_and_the_last_setting_wins() {
    let parse = |y: &str| parse_task_yaml(y, &Default::default());
    let a = |y: &str| parse(y).unwrap().autostop.unwrap().enabled();
    assert_eq!(a("resources: {autostop: true}").unwrap().idle_s, 300);
    assert_eq!(a("resources: {autostop: 30}").unwrap().idle_s, 1800);
    assert_eq!(a("resources: {autostop: 2h}").unwrap().idle_s, 7200);
    assert_eq!(a("resources: {autostop: 0}").unwrap().idle_s, 60);
    assert!(a("resources: {autostop: false}").is_none());
    let full = a("resources: {autostop: {idle_minutes: 5, down: true, wait_for: none}}").unwrap();
    assert!(full.down);
    assert_eq!(full.wait_for.as_str(), "none");
    let e = parse("resources: {autostop: {idle_minutes: 5, wait_for: forever}}").unwrap_err();
    assert_eq!(e.path, "resources.autostop.wait_for");
    let e = parse("resources: {autostop: {idel_minutes: 5}}").unwrap_err();
    assert!(e.message.contains("did you mean 'idle_minutes'"), "{e}");
    let e = parse("resources: {autostop: 5x}").unwrap_err();
    assert_eq!(e.path, "resources.autostop");

    let mut s = State::default();
    submit(
        &mut s,
        task("resources: {cpus: 2+, autostop: 10}", "dev", false),
        0,
    );
    submit(
        &mut s,
        task("resources: {cpus: 2+, autostop: false}", "dev", false),
        1,
    );
    assert!(s.clusters["dev"].autostop.is_none());
    s.apply(&Command::SetAutostop {
        name: "dev".into(),
        autostop: a("resources: {autostop: 1}"),
        at_ms: 2,
    });
    assert_eq!(s.clusters["dev"].autostop.as_ref().unwrap().idle_s, 60);
}

#[test]
fn ssh_sessions_keep_a_cluster_up_unless_it_waits_for_jobs_only() {
    for (wait_for, stops) in [("jobs_and_ssh", false), ("jobs", true)] {
        let mut s = State::default();
        let j = job_id(&submit(
            &mut s,
            task(
                &format!(
                    "resources: {{cpus: 2+, autostop: {{idle_minutes: 1, wait_for: {wait_for}}}}}"
                ),
                "dev",
                false,
            ),
            0,
        ));
        step(&mut s, 0);
        s.apply(&Command::SshSession {
            name: "dev".into(),
            open: true,
            at_ms: 0,
        });
        finish(&mut s, j, 0);
        let p = step(&mut s, 5 * MIN);
        assert_eq!(
            p.iter()
                .any(|c| matches!(c, Command::AutostopCluster { .. })),
            stops,
            "{wait_for}: {p:?}"
        );
    }
}

#[test]
fn idle_nodes_of_no_cluster_are_released_and_cluster_nodes_are_not() {
    let mut s = State::default();
    let pool = s.apply(&Command::SubmitJob {
        spec: parse_task_yaml("resources: {cpus: 2+}", &Default::default()).unwrap(),
        idempotency_key: None,
        owner: "alice".into(),
        at_ms: 0,
    });
    let pool = job_id(&pool);
    let named = job_id(&submit(
        &mut s,
        task("resources: {cpus: 2+, autostop: false}", "dev", false),
        0,
    ));
    step(&mut s, 0);
    finish(&mut s, pool, MIN);
    finish(&mut s, named, MIN);
    step(&mut s, 5 * MIN);
    assert!(s.nodes.values().all(|n| n.state == NodeState::Ready));
    step(&mut s, 6 * MIN);
    for n in s.nodes.values() {
        let expect = if n.cluster.is_some() {
            NodeState::Ready
        } else {
            NodeState::Terminated
        };
        assert_eq!(n.state, expect, "{}", n.id);
    }
}

#[test]
fn down_cancels_the_jobs_and_releases_the_nodes() {
    let mut s = State::default();
    let j = job_id(&submit(
        &mut s,
        task("resources: {cpus: 2+}", "dev", false),
        0,
    ));
    step(&mut s, 0);
    s.apply(&Command::DownCluster {
        name: "dev".into(),
        at_ms: 5,
    });
    assert_eq!(s.jobs[&j].state, JobState::Cancelled);
    assert!(s.clusters.is_empty());
    step(&mut s, 6);
    assert!(s.nodes.values().all(|n| n.state == NodeState::Terminated));
}

#[test]
fn only_the_owner_or_an_admin_runs_on_a_cluster() {
    let mut s = State::default();
    submit(&mut s, task("resources: {cpus: 2+}", "dev", false), 0);
    let mut bob = task("run: echo hi", "dev", true);
    bob.keep_off_coordinator_user = true; // not an admin
    let out = s.apply(&Command::SubmitJob {
        spec: bob.clone(),
        idempotency_key: None,
        owner: "bob".into(),
        at_ms: 1,
    });
    assert!(
        matches!(&out, Outcome::Rejected(Rejection::Conflict(m)) if m.contains("belongs to alice")),
        "{out:?}"
    );
    bob.keep_off_coordinator_user = false; // an admin
    let out = s.apply(&Command::SubmitJob {
        spec: bob,
        idempotency_key: None,
        owner: "ada".into(),
        at_ms: 2,
    });
    assert!(matches!(out, Outcome::Job { .. }), "{out:?}");
}

/// The local provider's own machine (a fixed machine) is shared: a second
/// cluster lists the same node rather than waiting for a second machine.
#[test]
fn clusters_share_a_fixed_machine() {
    let mut machine = offerings();
    for o in &mut machine {
        o.fixed_machines = Some(1);
    }
    machine.truncate(1);
    let mut s = State::default();
    let step_on = |s: &mut State, now: i64| {
        for _ in 0..2 {
            let p = plan(s, &machine, Policy::default(), now);
            for c in &p {
                s.apply(c);
            }
            play_provider(s, now);
        }
        play_agents(s, now);
    };
    let a = job_id(&submit(&mut s, task("run: echo a", "one", false), 0));
    step_on(&mut s, 1);
    assert_eq!(s.jobs[&a].state, JobState::Running);
    let b = job_id(&submit(&mut s, task("run: echo b", "two", false), 2));
    step_on(&mut s, 3);
    assert_eq!(s.jobs[&b].state, JobState::Running, "{:?}", s.jobs[&b]);
    assert_eq!(s.clusters["two"].node_ids, s.clusters["one"].node_ids);
    assert_eq!(s.nodes.len(), 1);
}

/// A cluster whose task nothing can place, or whose every launch failed,
/// is forgotten with that task; one that ran keeps its record.
#[test]
fn a_cluster_that_never_got_a_machine_goes_with_its_task() {
    let mut s = State::default();
    let j = job_id(&submit(
        &mut s,
        task("resources: {cpus: 2+}", "nowhere", false),
        0,
    ));
    s.apply(&Command::CancelJob {
        job_id: j,
        at_ms: 1,
    });
    assert!(!s.clusters.contains_key("nowhere"));

    let j = job_id(&submit(
        &mut s,
        task("resources: {cpus: 2+}", "failed", false),
        2,
    ));
    let p = plan(&s, &offerings(), Policy::default(), 3);
    for c in &p {
        s.apply(c);
    }
    let node = s.clusters["failed"].node_ids[0].clone();
    s.apply(&Command::NodeLaunchFailed {
        node_id: node,
        message: "quota".into(),
        failure: nembo_domain::state::LaunchFailure::Other,
        at_ms: 4,
    });
    assert!(s.jobs[&j].state.is_terminal());
    assert!(!s.clusters.contains_key("failed"));

    let j = job_id(&submit(
        &mut s,
        task("resources: {cpus: 2+}", "ran", false),
        5,
    ));
    step(&mut s, 6);
    finish(&mut s, j, 7);
    assert!(s.clusters.contains_key("ran"));
}
