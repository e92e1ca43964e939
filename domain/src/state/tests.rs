use super::*;
use crate::task::parse_task_yaml;

fn spec(y: &str) -> TaskSpec {
    parse_task_yaml(y, &Default::default()).unwrap()
}

pub(crate) fn offering(gpus: f64) -> Offering {
    let mut r = Resources {
        cpus: 8.0,
        memory_gb: 32.0,
        ..Default::default()
    };
    if gpus > 0.0 {
        r.accelerators.insert("H100".into(), gpus);
    }
    Offering {
        provider: "local".into(),
        region: "us-east".into(),
        instance_type: "t".into(),
        resources: r,
        hourly_price: 0.0,
        spot_price: None,
        zone: None,
        runs_as_coordinator_user: false,
        simulated: false,
        fixed_machines: None,
        disk_gb_max: None,
        opens_ports: false,
        ports_per_node: false,
        custom_images: false,
        can_stop: false,
    }
}

fn submit(s: &mut State, y: &str, key: Option<&str>) -> JobId {
    match s.apply(&Command::SubmitJob {
        spec: spec(y),
        idempotency_key: key.map(Into::into),
        owner: String::new(),
        at_ms: 1,
    }) {
        Outcome::Job { job_id, .. } => job_id,
        o => panic!("{o:?}"),
    }
}

fn ready_node(s: &mut State, job: JobId, gpus: f64) -> String {
    let Outcome::Nodes(ids) = s.apply(&Command::ProvisionNodes {
        job_id: job,
        offering: offering(gpus),
        count: 1,
        spot: false,
        at_ms: 2,
    }) else {
        panic!()
    };
    s.apply(&Command::NodeUp {
        node_id: ids[0].clone(),
        address: "127.0.0.1".into(),
        public_address: String::new(),
        at_ms: 3,
    });
    ids[0].clone()
}

#[test]
fn job_lifecycle_to_success() {
    let mut s = State::default();
    let j = submit(&mut s, "run: echo", None);
    assert_eq!(s.jobs[&j].state, JobState::Pending);
    let n = ready_node(&mut s, j, 0.0);
    assert_eq!(s.jobs[&j].state, JobState::Provisioning);
    assert_eq!(
        s.apply(&Command::AssignJob {
            job_id: j,
            node_ids: vec![n.clone()],
            candidate: 0,
            at_ms: 4
        }),
        Outcome::Applied
    );
    s.apply(&Command::RankStarted {
        job_id: j,
        attempt: 1,
        rank: 0,
        at_ms: 5,
    });
    assert_eq!(s.jobs[&j].state, JobState::Running);
    s.apply(&Command::RankEnded {
        job_id: j,
        attempt: 1,
        rank: 0,
        outcome: RankOutcome::Exited(0),
        at_ms: 6,
    });
    let job = &s.jobs[&j];
    assert_eq!(
        (job.state, job.exit_code, job.ended_at_ms),
        (JobState::Succeeded, Some(0), Some(6))
    );
    assert_eq!(s.jobs_on(&n), Vec::<JobId>::new());
}

#[test]
fn failing_rank_fails_job_with_its_exit_code() {
    let mut s = State::default();
    let j = submit(&mut s, "run: exit 3", None);
    let n = ready_node(&mut s, j, 0.0);
    s.apply(&Command::AssignJob {
        job_id: j,
        node_ids: vec![n],
        candidate: 0,
        at_ms: 4,
    });
    s.apply(&Command::RankEnded {
        job_id: j,
        attempt: 1,
        rank: 0,
        outcome: RankOutcome::SetupFailed(3),
        at_ms: 6,
    });
    assert_eq!(s.jobs[&j].state, JobState::FailedSetup);
    assert_eq!(s.jobs[&j].exit_code, Some(3));
}

#[test]
fn idempotency_key_returns_the_same_job() {
    let mut s = State::default();
    let a = submit(&mut s, "run: a", Some("k"));
    let before = s.clone();
    let out = s.apply(&Command::SubmitJob {
        spec: spec("run: b"),
        idempotency_key: Some("k".into()),
        owner: String::new(),
        at_ms: 9,
    });
    assert_eq!(
        out,
        Outcome::Job {
            job_id: a,
            existing: true
        }
    );
    assert_eq!(s, before);
}

#[test]
fn a_node_is_never_booked_twice() {
    let mut s = State::default();
    let y = "resources: {accelerators: H100:8}\nrun: x";
    let j1 = submit(&mut s, y, None);
    let j2 = submit(&mut s, y, None);
    let n = ready_node(&mut s, j1, 8.0);
    assert_eq!(
        s.apply(&Command::AssignJob {
            job_id: j1,
            node_ids: vec![n.clone()],
            candidate: 0,
            at_ms: 4
        }),
        Outcome::Applied
    );
    let out = s.apply(&Command::AssignJob {
        job_id: j2,
        node_ids: vec![n.clone()],
        candidate: 0,
        at_ms: 4,
    });
    assert!(
        matches!(out, Outcome::Rejected(Rejection::Conflict(_))),
        "{out:?}"
    );
    assert_eq!(s.jobs[&j2].state, JobState::Pending);
    // Once j1 ends the node is free again.
    s.apply(&Command::CancelJob {
        job_id: j1,
        at_ms: 5,
    });
    assert!(
        !s.free_on(&n).fits(&s.jobs[&j1].attempts[0].demand),
        "held until the rank stops"
    );
    s.apply(&Command::RankEnded {
        job_id: j1,
        attempt: 1,
        rank: 0,
        outcome: RankOutcome::Cancelled,
        at_ms: 6,
    });
    assert_eq!(s.jobs[&j1].state, JobState::Cancelled);
    assert_eq!(
        s.apply(&Command::AssignJob {
            job_id: j2,
            node_ids: vec![n],
            candidate: 0,
            at_ms: 7
        }),
        Outcome::Applied
    );
}

#[test]
fn lost_node_fails_its_jobs() {
    let mut s = State::default();
    let j = submit(&mut s, "run: x", None);
    let n = ready_node(&mut s, j, 0.0);
    s.apply(&Command::AssignJob {
        job_id: j,
        node_ids: vec![n.clone()],
        candidate: 0,
        at_ms: 4,
    });
    s.apply(&Command::NodeLost {
        node_id: n.clone(),
        message: "no heartbeat".into(),
        at_ms: 5,
    });
    assert_eq!(s.jobs[&j].state, JobState::Failed);
    assert!(s.jobs[&j].message.contains("lost"));
    assert_eq!(s.nodes[&n].state, NodeState::Lost);
    // The agent coming back makes the node usable again.
    s.apply(&Command::NodeUp {
        node_id: n.clone(),
        address: "a".into(),
        public_address: String::new(),
        at_ms: 6,
    });
    assert_eq!(s.nodes[&n].state, NodeState::Ready);
}

fn enroll(s: &mut State, via: Enrollment, node: Option<&str>, at_ms: i64) -> Outcome {
    s.apply(&Command::EnrollNode {
        via,
        node_id: node.map(Into::into),
        hostname: "box".into(),
        resources: Resources {
            cpus: 8.0,
            ..Default::default()
        },
        key_sha256: format!("key-{at_ms}"),
        at_ms,
    })
}

#[test]
fn a_node_token_enrolls_its_node_once_and_a_join_token_makes_a_manual_node() {
    let mut s = State::default();
    let j = submit(&mut s, "run: x", None);
    let n = ready_node(&mut s, j, 0.0);
    assert_eq!(
        enroll(&mut s, Enrollment::NodeToken, Some(&n), 10),
        Outcome::Nodes(vec![n.clone()])
    );
    assert_eq!(s.nodes[&n].enrolled_key.as_deref(), Some("key-10"));
    let again = enroll(&mut s, Enrollment::NodeToken, Some(&n), 11);
    assert_eq!(again, conflict("join token already used"));
    assert_eq!(s.nodes[&n].enrolled_key.as_deref(), Some("key-10"));
    assert!(matches!(
        enroll(&mut s, Enrollment::NodeToken, None, 12),
        Outcome::Rejected(_)
    ));
    // An admin's token: a new manual node, named by the state.
    s.apply(&Command::Access(
        crate::access::AccessCommand::CreateJoinToken {
            token: crate::access::JoinToken {
                id: "t".into(),
                sha256: "h".into(),
                description: String::new(),
                created_by: "root".into(),
                created_at_ms: 0,
                expires_at_ms: 100,
                uses_left: 2,
                revoked_at_ms: None,
                nodes: Vec::new(),
                node: None,
            },
        },
    ));
    let via = || Enrollment::JoinToken { id: "t".into() };
    // A token for new nodes cannot take over an existing one.
    assert!(matches!(
        enroll(&mut s, via(), Some(&n), 19),
        Outcome::Rejected(_)
    ));
    assert_eq!(s.nodes[&n].enrolled_key.as_deref(), Some("key-10"));
    let Outcome::Nodes(ids) = enroll(&mut s, via(), None, 20) else {
        panic!("not enrolled")
    };
    let manual = &s.nodes[&ids[0]];
    assert_eq!(manual.provider, MANUAL_PROVIDER);
    assert_eq!(manual.resources.cpus, 8.0);
    assert_ne!(ids[0], n);
    let seq = s.last_node_seq;
    s.access.join_tokens.get_mut("t").unwrap().uses_left = 0;
    assert_eq!(
        enroll(&mut s, via(), None, 21),
        conflict("join token already used")
    );
    assert_eq!(s.last_node_seq, seq, "a refused enrollment makes no node");
    // A token made for the node re-enrolls it, with a new key.
    let mut for_node = s.access.join_tokens["t"].clone();
    for_node.id = "r".into();
    for_node.uses_left = 1;
    for_node.node = Some(n.clone());
    s.apply(&Command::Access(
        crate::access::AccessCommand::CreateJoinToken { token: for_node },
    ));
    let again = enroll(
        &mut s,
        Enrollment::JoinToken { id: "r".into() },
        Some(&n),
        22,
    );
    assert_eq!(again, Outcome::Nodes(vec![n.clone()]));
    assert_eq!(s.nodes[&n].enrolled_key.as_deref(), Some("key-22"));
}

#[test]
fn a_revoked_node_loses_its_ranks_and_cannot_enroll_again() {
    let mut s = State::default();
    let j = submit(&mut s, "run: x", None);
    let n = ready_node(&mut s, j, 0.0);
    s.apply(&Command::AssignJob {
        job_id: j,
        node_ids: vec![n.clone()],
        candidate: 0,
        at_ms: 4,
    });
    assert_eq!(
        s.apply(&Command::RevokeNode {
            node_id: n.clone(),
            at_ms: 5,
        }),
        Outcome::Applied
    );
    assert_eq!(s.nodes[&n].revoked_at_ms, Some(5));
    assert_eq!(s.nodes[&n].state, NodeState::Terminating);
    assert_eq!(s.jobs[&j].state, JobState::Failed);
    assert!(s.jobs[&j].message.contains("revoked"));
    assert!(s.jobs_on(&n).is_empty());
    assert_eq!(
        enroll(&mut s, Enrollment::NodeToken, Some(&n), 6),
        conflict(format!("node {n} is revoked"))
    );
}

#[test]
fn an_audited_change_is_applied_and_recorded_with_its_result_in_one_step() {
    let mut s = State::default();
    let record = crate::access::AuditRecord {
        at_ms: 1,
        who: "alice".into(),
        role: Some(crate::access::Role::User),
        call: "SubmitJob".into(),
        target: String::new(),
        result: String::new(),
    };
    let out = s.apply(&Command::Audited {
        command: Box::new(Command::SubmitJob {
            spec: spec("run: x"),
            idempotency_key: None,
            owner: "alice".into(),
            at_ms: 1,
        }),
        record: record.clone(),
    });
    let Outcome::Job { job_id, .. } = out else {
        panic!("{out:?}")
    };
    assert_eq!(s.queued_jobs().count(), 1, "the indexes saw the job");
    let out = s.apply(&Command::Audited {
        command: Box::new(Command::CancelJob {
            job_id: 99,
            at_ms: 2,
        }),
        record: crate::access::AuditRecord {
            call: "CancelJob".into(),
            target: "job 99".into(),
            ..record
        },
    });
    assert!(matches!(out, Outcome::Rejected(_)));
    let trail: Vec<(String, String)> = s
        .access
        .audit
        .iter()
        .chain(s.access.refusals.iter())
        .map(|r| (r.target.clone(), r.result.clone()))
        .collect();
    assert_eq!(
        trail,
        vec![
            (format!("job {job_id}"), "ok".to_string()),
            ("job 99".to_string(), "NotFound".to_string())
        ]
    );
}

#[test]
fn unknown_ids_are_rejections_that_change_nothing() {
    let mut s = State::default();
    let before = s.clone();
    assert_eq!(
        s.apply(&Command::CancelJob {
            job_id: 7,
            at_ms: 1
        }),
        Outcome::Rejected(Rejection::NoSuchJob(7))
    );
    assert!(matches!(
        s.apply(&Command::NodeUp {
            node_id: "x".into(),
            address: "".into(),
            public_address: String::new(),
            at_ms: 1
        }),
        Outcome::Rejected(_)
    ));
    assert!(matches!(
        s.apply(&Command::TerminateNodes {
            node_ids: vec!["x".into()],
            at_ms: 1
        }),
        Outcome::Rejected(_)
    ));
    assert_eq!(s, before);
}

#[test]
fn apply_is_deterministic() {
    let cmds = {
        let mut s = State::default();
        let j = submit(&mut s, "run: x", None);
        vec![
            Command::SubmitJob {
                spec: spec("run: x"),
                idempotency_key: None,
                owner: String::new(),
                at_ms: 1,
            },
            Command::ProvisionNodes {
                job_id: j,
                offering: offering(0.0),
                count: 1,
                spot: false,
                at_ms: 2,
            },
            Command::NodeUp {
                node_id: "node-1".into(),
                address: "a".into(),
                public_address: String::new(),
                at_ms: 3,
            },
            Command::AssignJob {
                job_id: j,
                node_ids: vec!["node-1".into()],
                candidate: 0,
                at_ms: 4,
            },
        ]
    };
    let run = || {
        let mut s = State::default();
        for c in &cmds {
            s.apply(c);
        }
        serde_json::to_string(&s).unwrap()
    };
    assert_eq!(run(), run());
}

#[test]
fn waiting_jobs_are_placed_by_priority_then_age() {
    let mut s = State::default();
    let plain = submit(&mut s, "run: a", None);
    let low = submit(&mut s, "resources: {priority: 10}\nrun: b", None);
    let urgent = submit(&mut s, "resources: {priority: 900}\nrun: c", None);
    let also_plain = submit(&mut s, "resources: {priority: 500}\nrun: d", None);
    let order = |s: &State| s.queued_jobs().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(order(&s), vec![urgent, plain, also_plain, low]);
    // Out of the queue when placed or cancelled, whatever its priority.
    ready_node(&mut s, urgent, 0.0);
    s.apply(&Command::CancelJob {
        job_id: low,
        at_ms: 9,
    });
    assert_eq!(order(&s), vec![plain, also_plain]);
    let back: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(order(&back), order(&s), "rebuilt on load in the same order");
}

#[test]
fn a_stored_state_comes_back_with_its_indexes() {
    let mut s = State::default();
    let queued = submit(&mut s, "run: x", None);
    let placed = submit(&mut s, "run: y", None);
    ready_node(&mut s, placed, 0.0);
    let ended = submit(&mut s, "run: z", None);
    s.apply(&Command::CancelJob {
        job_id: ended,
        at_ms: 9,
    });
    let back: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s, "indexes are rebuilt exactly as apply keeps them");
    let ids = |it: Vec<&Job>| it.iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(ids(back.queued_jobs().collect()), vec![queued]);
    assert_eq!(ids(back.placed_jobs().collect()), vec![placed]);
    assert_eq!(ids(back.active_jobs().collect()), vec![queued, placed]);
}
