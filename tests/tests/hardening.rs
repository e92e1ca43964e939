//! What an attacker and a careless operator broke (issue 14), each as it
//! was reproduced, kept as a regression test.

use std::time::{Duration, Instant};

use nembo_proto::v1 as pb;
use nembo_tests::{alive, wait_for, Coordinator};
use tonic::Code;

/// A task that nests 100 000 flow sequences: the parser used to take 43 s
/// over it on a runtime worker, starving every other caller and the agents'
/// heartbeats.
fn nesting_bomb() -> String {
    format!("run: x\nenvs: {}", "[".repeat(100_000))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_task_is_refused_at_once_and_starves_no_one() {
    let c = Coordinator::start(&[]).await;
    let job = c.submit("name: survivor\nrun: sleep 60\n").await;
    c.wait_state(&job, pb::JobState::Running, Duration::from_secs(30))
        .await;
    let user = c.cli(&["admin", "users", "create", "mallory", "--role", "user"]);
    assert!(user.status.success());
    let token = String::from_utf8_lossy(&user.stdout).trim().to_string();
    let term_before = c.cluster_status().await.term;

    // Two attackers, two submissions each, at once; meanwhile another
    // client keeps asking for the cluster's status.
    let mut attacks = Vec::new();
    for _ in 0..2 {
        let mut as_mallory = c.client_with_token(&token).await;
        attacks.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            for _ in 0..2 {
                let started = Instant::now();
                let r = as_mallory
                    .submit_job(pb::SubmitJobRequest {
                        task: Some(pb::submit_job_request::Task::TaskYaml(nesting_bomb())),
                        ..Default::default()
                    })
                    .await;
                codes.push((
                    r.map(|_| Code::Ok).unwrap_or_else(|s| s.code()),
                    started.elapsed(),
                ));
            }
            codes
        }));
    }
    let mut slowest = Duration::ZERO;
    let mut other = c.client().await;
    for _ in 0..20 {
        let started = Instant::now();
        other
            .get_cluster_status(pb::GetClusterStatusRequest {})
            .await
            .expect("another caller is answered");
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for attack in attacks {
        for (code, took) in attack.await.unwrap() {
            assert_eq!(code, Code::InvalidArgument);
            assert!(took < Duration::from_secs(5), "refused after {took:?}");
        }
    }
    // Generous for a slow CI machine: the starved coordinator answered
    // nobody for 43 s.
    assert!(
        slowest < Duration::from_secs(1),
        "another caller waited {slowest:?}"
    );
    let running = c
        .wait_state(&job, pb::JobState::Running, Duration::from_secs(1))
        .await;
    assert!(running.message.is_empty(), "{running:?}");
    let status = c.cluster_status().await;
    assert_eq!(status.term, term_before, "no election happened");
}

/// Restarts of a coordinator whose state lives in a long log tail (no
/// snapshot since): an agent reconnecting while the log was replayed was
/// told its node did not exist, and quit for good, orphaning its job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_while_the_log_replays_never_retire_a_live_agent() {
    const PENDING: usize = 10_000;
    let restarts: usize = std::env::var("NEMBO_TEST_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let mut c = Coordinator::start(&["--max-nodes", "1", "--snapshot-every", "10000000"]).await;
    let gpu_job = "resources: {accelerators: H100:1}\nrun: sleep 600\n";
    let first = c.submit(gpu_job).await;
    c.wait_state(&first, pb::JobState::Running, Duration::from_secs(30))
        .await;
    // Jobs that wait for the one node: entries the log must replay.
    let mut writers = Vec::new();
    for w in 0..8 {
        let client = c.client().await;
        writers.push(tokio::spawn(async move {
            for i in (w..PENDING).step_by(8) {
                let mut client = client.clone();
                client
                    .submit_job(pb::SubmitJobRequest {
                        task: Some(pb::submit_job_request::Task::TaskYaml(gpu_job.into())),
                        idempotency_key: format!("pending-{i}"),
                        ..Default::default()
                    })
                    .await
                    .expect("submit");
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    // Release the node: the next job gets a new one, made at the log's end,
    // after every entry above.
    let down = c.cli(&["down", "--all"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let second = "2";
    let job = c
        .wait_state(second, pb::JobState::Running, Duration::from_secs(60))
        .await;
    let node = job.node_ids[0].clone();
    let agent = c.agent_pid(&node);
    for round in 0..restarts {
        c.restart().await;
        // The agent reconnects within a second or two of the restart.
        wait_for(
            &format!("round {round}: {node} back"),
            Duration::from_secs(30),
            || async {
                let nodes = c.try_nodes().await?;
                nodes
                    .iter()
                    .any(|n| n.node_id == node && n.state == pb::NodeState::Ready as i32)
                    .then_some(())
            },
        )
        .await;
        assert!(alive(agent), "round {round}: the agent of {node} quit");
    }
    let job = c
        .wait_state(second, pb::JobState::Running, Duration::from_secs(5))
        .await;
    assert_eq!(job.attempts.len(), 1, "{job:?}");
}

/// Bytes that are not UTF-8 where the API expects a string are the
/// caller's mistake (INVALID_ARGUMENT), not a server fault (INTERNAL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_is_not_utf8_is_an_invalid_argument() {
    /// SubmitJobRequest's `task_yaml` (field 1) as raw bytes.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawSubmit {
        #[prost(bytes = "vec", tag = "1")]
        task_yaml: Vec<u8>,
    }
    let c = Coordinator::start(&["--max-nodes", "0"]).await;
    let channel = nembo_proto::client::endpoint(&c.endpoint(), &c.ca())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(RawSubmit {
        task_yaml: b"run: echo \xff\xfe".to_vec(),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", c.token()).parse().unwrap(),
    );
    let path = "/nembo.v1.CoordinatorService/SubmitJob".parse().unwrap();
    let err = grpc
        .unary::<_, pb::SubmitJobResponse, _>(req, path, tonic_prost::ProstCodec::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(c.jobs().await.is_empty());
}

/// An enrolling machine proves nothing with a key off the P-256 curve, and
/// cannot declare absurd resources; neither spends its join token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_refuses_keys_off_the_curve_and_absurd_resources() {
    use nembo_proto::agent::v1 as apb;
    let c = Coordinator::start(&[]).await;
    let zero = c.cli(&["admin", "tokens", "create", "--uses", "0"]);
    assert!(!zero.status.success(), "--uses 0 was accepted");
    let out = c.cli(&["admin", "tokens", "create", "--uses", "1"]);
    assert!(out.status.success());
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut enrollment = nembo_proto::client::connect_enrollment(&c.endpoint(), &c.ca())
        .await
        .unwrap();
    let mut off_curve = vec![7u8; 65];
    off_curve[0] = 4;
    let good_key = rcgen::KeyPair::generate()
        .unwrap()
        .public_key_raw()
        .to_vec();
    let shape = |accelerators: &[(&str, f64)], cpus: f64, memory_gb: f64| pb::NodeResources {
        accelerators: accelerators
            .iter()
            .map(|(k, n)| (k.to_string(), *n))
            .collect(),
        cpus,
        memory_gb,
    };
    let attempts = [
        (off_curve, shape(&[], 4.0, 16.0), "public_key"),
        (
            good_key.clone(),
            shape(&[("H100", 1e12)], 4.0, 16.0),
            "resources.accelerators",
        ),
        (good_key.clone(), shape(&[], 1e308, 16.0), "resources.cpus"),
        (
            good_key.clone(),
            shape(&[], 4.0, -5.0),
            "resources.memory_gb",
        ),
        (
            good_key.clone(),
            shape(&[], f64::NAN, 16.0),
            "resources.cpus",
        ),
        (
            good_key.clone(),
            shape(&[("H\u{1b}[2J", 1.0)], 4.0, 16.0),
            "resources.accelerators",
        ),
    ];
    for (public_key, resources, field) in attempts {
        let err = enrollment
            .enroll(apb::EnrollRequest {
                join_token: token.clone(),
                public_key,
                hostname: "box".into(),
                resources: Some(resources.clone()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{resources:?}: {err:?}");
        assert!(err.message().starts_with(field), "{err:?}");
    }
    // The token was not spent by any of them.
    let ok = enrollment
        .enroll(apb::EnrollRequest {
            join_token: token,
            public_key: good_key,
            hostname: "box".into(),
            resources: Some(shape(&[("H100", 2.0)], 8.0, 64.0)),
            ..Default::default()
        })
        .await
        .expect("a sane enrollment");
    assert!(ok.into_inner().certificate.is_some());
}

/// A job's name is the user's to choose; the admin reading `nembo queue`
/// sees its control characters escaped, not obeyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_show_control_characters_escaped() {
    let c = Coordinator::start(&["--max-nodes", "0"]).await;
    c.submit("name: \"evil\\e[2J\\nFAKE  ROW\\a\"\nrun: x\n")
        .await;
    let out = c.cli(&["queue"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text:?}"
    );
    assert!(text.contains("evil\\x1b[2J\\nFAKE  ROW\\x07"), "{text}");
    assert_eq!(text.lines().count(), 2, "one header, one job: {text}");
}

/// Sockets that never finish a TLS handshake (silent, or half a
/// ClientHello) used to stay open for ever, until the coordinator ran out of
/// files; now each is dropped at the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_a_handshake_are_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = Coordinator::start(&["--tls-handshake-timeout-ms", "500"]).await;
    let addr = c.endpoint().trim_start_matches("https://").to_string();
    let mut sockets = Vec::new();
    for i in 0..60 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        if i % 2 == 1 {
            // A TLS record header announcing a ClientHello, and no more.
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
                .await
                .unwrap();
        }
        sockets.push(s);
    }
    let mut waiting = tokio::task::JoinSet::new();
    for mut s in sockets {
        waiting.spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // an alert, then the close
                }
            }
        });
    }
    let all_closed = tokio::time::timeout(Duration::from_secs(10), async {
        while waiting.join_next().await.is_some() {}
    })
    .await;
    assert!(
        all_closed.is_ok(),
        "{} of 60 sockets still open after 10 s",
        waiting.len()
    );
    // A real client is served as ever.
    assert_eq!(c.jobs().await.len(), 0);
}

/// A log chunk the coordinator could not store (it was out of files, in
/// the attack) used to turn every later chunk into a "log gap" for as long as
/// the session lasted; now the session is ended and the agent resends from
/// the coordinator's offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_lost_to_a_failed_write_is_sent_again() {
    let c = Coordinator::start(&[]).await;
    let job = c
        .submit("run: for i in $(seq 1 100); do echo line-$i; sleep 0.05; done\n")
        .await;
    c.wait_state(&job, pb::JobState::Running, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    // For a second, the job's log cannot be opened (a directory stands in
    // its place, which even root cannot append to).
    let log = c.dir.path().join(format!("logs/{job}/1.0.log"));
    let aside = log.with_extension("aside");
    std::fs::rename(&log, &aside).unwrap();
    std::fs::create_dir(&log).unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    std::fs::remove_dir(&log).unwrap();
    std::fs::rename(&aside, &log).unwrap();
    c.wait_state(&job, pb::JobState::Succeeded, Duration::from_secs(60))
        .await;
    let logs = c.logs(&job).await;
    let expected: String = (1..=100).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(logs, expected, "the output has a hole");
}

/// 10 000 refused calls by one viewer used to fill the 10 000-record audit
/// trail and push out every record of a change. Refusals now have a ring
/// of their own and a budget per caller; refused reads are recorded too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_neither_erases_the_audit_trail_nor_goes_unthrottled() {
    let c = Coordinator::start(&["--max-nodes", "0", "--sim-provider"]).await;
    let token_of = |name: &str, role: &str| {
        let out = c.cli(&["admin", "users", "create", name, "--role", role]);
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (alice, bob, vera) = (
        token_of("alice", "user"),
        token_of("bob", "user"),
        token_of("vera", "viewer"),
    );
    let job = c
        .client_with_token(&alice)
        .await
        .submit_job(pb::SubmitJobRequest {
            task: Some(pb::submit_job_request::Task::TaskYaml("run: x\n".into())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    // A refused read is recorded.
    let err = c
        .client_with_token(&bob)
        .await
        .get_job(pb::GetJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let started = Instant::now();
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let mut as_vera = c.client_with_token(&vera).await;
        flood.spawn(async move {
            let mut codes = Vec::new();
            for _ in 0..500 {
                let r = as_vera
                    .submit_job(pb::SubmitJobRequest {
                        task: Some(pb::submit_job_request::Task::TaskYaml("run: x\n".into())),
                        ..Default::default()
                    })
                    .await;
                codes.push(r.map(|_| Code::Ok).unwrap_or_else(|s| s.code()));
            }
            codes
        });
    }
    let mut codes = Vec::new();
    while let Some(r) = flood.join_next().await {
        codes.extend(r.unwrap());
    }
    let took = started.elapsed().as_secs_f64();
    let denied = codes
        .iter()
        .filter(|c| **c == Code::PermissionDenied)
        .count();
    let throttled = codes
        .iter()
        .filter(|c| **c == Code::ResourceExhausted)
        .count();
    assert_eq!(denied + throttled, codes.len(), "{codes:?}");
    assert!(
        throttled > 0,
        "3 000 refusals in {took:.1} s were never throttled"
    );

    let records = nembo_tests::audit_trail(&c.client().await, 1000).await;
    for user in ["alice", "bob", "vera"] {
        assert!(
            records
                .iter()
                .any(|r| r.call == "CreateUser" && r.target.starts_with(&format!("user {user}"))),
            "the record of {user}'s creation is gone"
        );
    }
    assert!(records
        .iter()
        .any(|r| r.who == "bob" && r.call == "GetJob" && r.result == "PermissionDenied"));
    let recorded = records.iter().filter(|r| r.who == "vera").count();
    // The burst of 100 and 10 a second, with room for a slow machine.
    let allowed = 100.0 + 10.0 * (took + 2.0);
    assert!(
        (recorded as f64) <= allowed,
        "{recorded} of vera's refusals recorded in {took:.1} s"
    );
    assert_eq!(recorded, denied, "every refusal answered is recorded");
}

/// 320 sockets that never finished a handshake used up a coordinator whose
/// file limit was 300. Connections in their handshake now have a fixed
/// number of slots; the rest wait in the kernel's backlog, not in the
/// coordinator's files, and a real client gets through as slots free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_in_their_handshake_are_capped() {
    let c = Coordinator::start(&[
        "--tls-handshake-timeout-ms",
        "500",
        "--handshake-slots",
        "20",
    ])
    .await;
    let pid = c.pid();
    let sockets_held = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
            })
            .count()
    };
    let before = sockets_held();
    let addr = c.endpoint().trim_start_matches("https://").to_string();
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = sockets_held();
    assert!(
        during <= before + 20 + 5,
        "200 silent sockets made the coordinator hold {during} sockets (it held {before})"
    );
    // A real client gets through as slots free, while the others wait.
    let answered = tokio::time::timeout(Duration::from_secs(30), c.client()).await;
    assert!(answered.is_ok(), "no slot for a real client in 30 s");
    drop(silent);
}

/// `workdir: ../../../../../..` resolved to `/`, `/proc/self/root/..` was
/// taken as given, and the node began to copy the whole machine (the
/// cluster's root token and CA key included). Now a workdir is a directory
/// of the user's, of bounded size, and its size is reported at launch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workdir_is_never_the_machine_a_home_or_the_coordinators_files() {
    let c = Coordinator::start(&[]).await;
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let inside = c.dir.path().join("logs");
    for w in [
        "/".to_string(),
        "/proc/self/root/..".into(),
        "/tmp/../".into(),
        home,
        c.dir.path().display().to_string(),
        inside.display().to_string(),
        "relative/dir".into(),
    ] {
        let err = c
            .client()
            .await
            .submit_job(pb::SubmitJobRequest {
                task: Some(pb::submit_job_request::Task::TaskYaml(format!(
                    "workdir: {w}\nrun: ls\n"
                ))),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{w}: {err:?}");
        assert!(err.message().starts_with("workdir:"), "{w}: {err:?}");
    }
    // Through the CLI, a relative path that climbs to `/` is refused too.
    let task = c.dir.path().join("climb.yaml");
    std::fs::write(&task, "workdir: ../../../../../../../../..\nrun: ls\n").unwrap();
    let out = c.cli(&["launch", "-d", task.to_str().unwrap()]);
    assert!(!out.status.success(), "a workdir of / was launched");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("workdir"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A real project directory runs, and its size is said at launch.
    let project = tempfile::tempdir().unwrap();
    std::fs::write(project.path().join("train.py"), "print('hi')\n").unwrap();
    let ok = c.dir.path().join("ok.yaml");
    std::fs::write(
        &ok,
        format!("workdir: {}\nrun: cat train.py\n", project.path().display()),
    )
    .unwrap();
    let out = c.cli(&["launch", ok.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("print('hi')"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 files"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Past the size limit (a 3 GiB sparse file), the node refuses to copy it.
    let big = tempfile::tempdir().unwrap();
    std::fs::File::create(big.path().join("weights.bin"))
        .unwrap()
        .set_len(3 << 30)
        .unwrap();
    let job = c
        .submit(&format!("workdir: {}\nrun: ls\n", big.path().display()))
        .await;
    let failed = c
        .wait_state(&job, pb::JobState::Failed, Duration::from_secs(30))
        .await;
    assert!(failed.message.contains("the limit is"), "{failed:?}");
}

/// At ENOSPC the Raft member stopped and the process stayed up answering
/// UNAVAILABLE, even after space was freed. Now it exits saying why, and a
/// restart once there is room loses nothing it acknowledged. Needs root (a
/// small tmpfs under the Raft log); skipped, and said so, without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_the_coordinator_exit_and_a_restart_loses_nothing() {
    let mut c = Coordinator::start(&["--max-nodes", "0"]).await;
    let raft = c.dir.path().join("raft");
    let saved = c.dir.path().join("raft.saved");
    c.kill9();
    std::fs::rename(&raft, &saved).unwrap();
    std::fs::create_dir(&raft).unwrap();
    let mount = |args: &[&str]| {
        std::process::Command::new("mount")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !mount(&[
        "-t",
        "tmpfs",
        "-o",
        "size=6m",
        "tmpfs",
        raft.to_str().unwrap(),
    ]) {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // Lazily: a process of the test may still hold a file there.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(raft.clone());
    let copied = std::process::Command::new("cp")
        .args([
            "-a",
            &format!("{}/.", saved.display()),
            raft.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(copied.success());
    c.restart().await;

    // Fill the disk with submissions until the coordinator gives up.
    let padding = "x".repeat(8000);
    let mut acked = Vec::new();
    let started = Instant::now();
    let mut client = c.client().await;
    while started.elapsed() < Duration::from_secs(60) && c.exited().is_none() {
        let r = client
            .submit_job(pb::SubmitJobRequest {
                task: Some(pb::submit_job_request::Task::TaskYaml(format!(
                    "run: echo {padding}\n"
                ))),
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => acked.push(r.into_inner().job_id),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let status = wait_for("the coordinator to exit", Duration::from_secs(30), || {
        let s = c.exited();
        async move { s }
    })
    .await;
    assert!(!status.success(), "{status:?}");
    let log = std::fs::read_to_string(c.dir.path().join("coordinator.log")).unwrap();
    assert!(log.contains("storage failure"), "{log}");
    assert!(
        !acked.is_empty(),
        "nothing was written before the disk filled"
    );

    // Room again: the restarted member has everything it acknowledged.
    assert!(mount(&["-o", "remount,size=256m", raft.to_str().unwrap()]));
    c.restart().await;
    let jobs: std::collections::BTreeSet<String> =
        c.jobs().await.into_iter().map(|j| j.job_id).collect();
    for id in &acked {
        assert!(jobs.contains(id), "job {id} was acknowledged and is gone");
    }
    c.submit("run: echo again\n").await;
    c.kill9();
}

/// `nembo` run with its own home, as a user would run it.
fn nembo_at(home: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(nembo_tests::bin("nembo"))
        .args(args)
        .env("NEMBO_HOME", home)
        .env("NEMBO_AGENT_BIN", nembo_tests::bin("nembo-agent"))
        .env(
            "NEMBO_COORDINATOR_BIN",
            nembo_tests::bin("nembo-coordinator"),
        )
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// After a member of a local cluster died, `local up` said "already
/// running" and left it dead, and `local status` did not say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_up_brings_back_a_dead_member_and_status_shows_each_members_health() {
    let home = tempfile::tempdir().unwrap();
    let nembo = |args: &[&str]| nembo_at(home.path(), args, &[]);
    let up = nembo(&["local", "up", "--coordinators", "3"]);
    assert!(up.status.success(), "{up:?}");
    let pids = || -> Vec<i32> {
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(home.path().join("cluster/api.json")).unwrap())
                .unwrap();
        info["pids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_i64().unwrap() as i32)
            .collect()
    };
    let before = pids();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before[1]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = nembo(&["local", "status"]);
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(
        text.contains("gone") && text.contains("A member is down"),
        "{text}"
    );
    let again = nembo(&["local", "up", "--coordinators", "3"]);
    assert!(again.status.success(), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("Restarted member(s) [2]"),
        "{again:?}"
    );
    let after = pids();
    assert_ne!(after[1], before[1]);
    assert!(alive(after[1]));
    wait_for(
        "every member answering",
        Duration::from_secs(20),
        || async {
            let s = nembo(&["local", "status", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&s.stdout).ok()?;
            v["members"]
                .as_array()?
                .iter()
                .all(|m| m["process"] == true && m["answers"] == true)
                .then_some(())
        },
    )
    .await;
    let down = nembo(&["local", "down"]);
    assert!(down.status.success(), "{down:?}");
    assert!(after.iter().all(|p| !alive(*p)));
}

/// A coordinator that refused to start (here: a providers.yaml it cannot
/// read) was reported with the last lines of its log, which were backtrace
/// frames when RUST_BACKTRACE was set. Now the error itself is shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_cannot_start_says_why() {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("coordinator");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("providers.yaml"),
        "local: [this is: not, a mapping\n",
    )
    .unwrap();
    let up = nembo_at(home.path(), &["local", "up"], &[("RUST_BACKTRACE", "1")]);
    assert!(!up.status.success());
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(err.contains("providers.yaml"), "{err}");
    assert!(
        !err.contains("Stack backtrace") && !err.contains(" at /"),
        "{err}"
    );
    let down = nembo_at(home.path(), &["local", "down"], &[]);
    assert!(down.status.success(), "{down:?}");
}

/// `--env K=V` for a K the task does not declare was kept as a plain env
/// and echoed by GetJob and the dry run: such a value is where tokens go.
/// It now reaches the job as a secret; a declared env stays an env.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeclared_env_from_the_command_line_is_kept_secret() {
    let c = Coordinator::start(&[]).await;
    let task = c.dir.path().join("env.yaml");
    std::fs::write(
        &task,
        "envs: {DECLARED: null}\nrun: echo token-len=${#HF_TOKEN} declared=$DECLARED\n",
    )
    .unwrap();
    let t = task.to_str().unwrap();
    let secret = "hf_s3cr3tValue";
    let env = format!("HF_TOKEN={secret}");
    let dry = c.cli(&[
        "launch",
        "--dry-run",
        "--json",
        "--env",
        &env,
        "--env",
        "DECLARED=shown",
        t,
    ]);
    assert!(dry.status.success(), "{dry:?}");
    let shown = String::from_utf8_lossy(&dry.stdout);
    assert!(!shown.contains(secret), "the dry run echoes it: {shown}");
    assert!(shown.contains("shown"), "{shown}");
    let run = c.cli(&["launch", "--env", &env, "--env", "DECLARED=shown", t]);
    assert!(run.status.success(), "{run:?}");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        out.contains(&format!("token-len={} declared=shown", secret.len())),
        "{out}"
    );
    let job = c.jobs().await.pop().unwrap();
    let spec = job.spec.unwrap();
    assert_eq!(spec.envs.get("DECLARED").map(String::as_str), Some("shown"));
    assert_eq!(
        spec.secrets.get("HF_TOKEN").map(String::as_str),
        Some("<redacted>")
    );
    assert!(!format!("{spec:?}").contains(secret));
}

/// Local jobs run as the coordinators' own Unix user: a `user` token's job
/// there read the cluster's root token and CA key, and became an admin.
/// Only admins' jobs go to the local provider; a non-admin's task goes to
/// another provider, or is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_job_never_runs_where_it_could_read_the_clusters_keys() {
    let c = Coordinator::start(&[]).await;
    let made = c.cli(&["admin", "users", "create", "mallory", "--role", "user"]);
    assert!(made.status.success());
    let token_file = c.dir.path().join("mallory.token");
    nembo_tests::write_private(&token_file, String::from_utf8_lossy(&made.stdout).trim());
    let token_path = c.info["token_path"].as_str().unwrap().to_string();
    let task = c.dir.path().join("steal.yaml");
    std::fs::write(&task, format!("run: cat {token_path}\n")).unwrap();
    let as_mallory = |args: &[&str]| {
        std::process::Command::new(nembo_tests::bin("nembo"))
            .args(args)
            .env("NEMBO_API_INFO", c.dir.path().join("api.json"))
            .env("NEMBO_HOME", c.dir.path().join("cli-home"))
            .env("NEMBO_TOKEN_FILE", &token_file)
            .output()
            .unwrap()
    };
    let task = task.to_str().unwrap();
    for args in [
        vec!["launch", task, "--detach"],
        vec!["launch", task, "--dry-run"],
    ] {
        let out = as_mallory(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            stderr.contains("only admins may run jobs on the local provider")
                && stderr.contains("nembo check"),
            "{args:?}: {stderr}"
        );
    }
    assert!(c.jobs().await.is_empty(), "no job was created");
    assert!(c.nodes().await.is_empty(), "no node was launched");
    let refused = nembo_tests::audit_trail(&c.client().await, 1000)
        .await
        .into_iter()
        .any(|r| r.who == "mallory" && r.call == "SubmitJob" && r.result == "PermissionDenied");
    assert!(refused, "the refusal is in the audit trail");

    // With another provider enabled, the same task is placed there, never
    // on the local machine; an admin's still may use it.
    let c = Coordinator::start(&["--sim-provider"]).await;
    let made = c.cli(&["admin", "users", "create", "mallory", "--role", "user"]);
    let mut user = c
        .client_with_token(String::from_utf8_lossy(&made.stdout).trim())
        .await;
    let dry = |yaml: &str| pb::DryRunRequest {
        task: Some(pb::dry_run_request::Task::TaskYaml(yaml.into())),
        ..Default::default()
    };
    let plan = user
        .dry_run(dry("run: cat /etc/hostname\n"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plan.placement.unwrap().provider, "sim");
    assert!(
        plan.candidates.iter().all(|o| o.provider != "local"),
        "{:?}",
        plan.candidates
    );
    let pinned = user
        .dry_run(dry("run: x\nresources: {infra: local}\n"))
        .await;
    assert_eq!(pinned.unwrap_err().code(), Code::PermissionDenied);
    let admin = c
        .client()
        .await
        .dry_run(dry("run: x\nresources: {infra: local}\n"))
        .await;
    assert_eq!(
        admin.unwrap().into_inner().placement.unwrap().provider,
        "local"
    );
}

/// What Raft answers member `from` presenting `cert`/`key` to member `to`:
/// a stream with one empty batch, so nothing reaches Raft itself.
async fn raft_stream_as(
    cluster: &nembo_tests::Cluster,
    to: u64,
    from: u64,
    cert: &[u8],
    key: &[u8],
) -> Code {
    use nembo_proto::raft::v1 as rpb;
    let channel = nembo_proto::client::endpoint_with_identity(
        &cluster.urls[to as usize - 1],
        &cluster.ca(),
        Some((cert, key)),
    )
    .unwrap()
    .connect()
    .await
    .unwrap();
    let batch = rpb::StreamRequest {
        from,
        messages: vec![],
    };
    let mut client = rpb::raft_peer_service_client::RaftPeerServiceClient::new(channel);
    match client.stream(tokio_stream::iter([batch])).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn member_cert(cluster: &nembo_tests::Cluster, id: u64) -> (Vec<u8>, Vec<u8>) {
    let tls = cluster.member_dir(id).join("tls");
    (
        std::fs::read(tls.join("server.pem")).unwrap(),
        std::fs::read(tls.join("server.key")).unwrap(),
    )
}

/// Member certificates were valid from 1975 to 4096, and after the
/// documented rotation (delete `server.*`, restart) the old one still
/// spoke Raft. Now each lives a bounded time and renews itself, and the
/// state holds each member's current one: an earlier one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_or_renewed_member_certificate_no_longer_speaks_raft() {
    let mut cluster =
        nembo_tests::Cluster::start(3, &["--max-nodes", "0", "--member-cert-life-s", "30"]).await;
    let leader = cluster.leader().await;
    let rotated = (1..=3).find(|id| *id != leader).unwrap();
    let (old_cert, old_key) = member_cert(&cluster, rotated);
    assert_eq!(
        raft_stream_as(&cluster, leader, rotated, &old_cert, &old_key).await,
        Code::Ok
    );

    // The documented rotation.
    cluster.kill9(rotated);
    let tls = cluster.member_dir(rotated).join("tls");
    std::fs::remove_file(tls.join("server.pem")).unwrap();
    std::fs::remove_file(tls.join("server.key")).unwrap();
    cluster.restart(rotated);
    wait_for(
        "the rotated certificate to be refused",
        Duration::from_secs(20),
        || async {
            let code = raft_stream_as(&cluster, leader, rotated, &old_cert, &old_key).await;
            (code == Code::PermissionDenied).then_some(())
        },
    )
    .await;
    let (new_cert, new_key) = member_cert(&cluster, rotated);
    assert_ne!(new_cert, old_cert);
    assert_eq!(
        raft_stream_as(&cluster, leader, rotated, &new_cert, &new_key).await,
        Code::Ok
    );
    // Every member refuses it, not only the leader.
    let other = (1..=3).find(|id| *id != leader && *id != rotated).unwrap();
    wait_for(
        "every member to refuse it",
        Duration::from_secs(10),
        || async {
            let code = raft_stream_as(&cluster, other, rotated, &old_cert, &old_key).await;
            (code == Code::PermissionDenied).then_some(())
        },
    )
    .await;

    // Renewal: with a 30 s life each member replaces its certificate with
    // 10 s left, and the cluster goes on committing through it.
    let (before, before_key) = member_cert(&cluster, leader);
    wait_for(
        "the leader to renew its certificate",
        Duration::from_secs(40),
        || async { (member_cert(&cluster, leader).0 != before).then_some(()) },
    )
    .await;
    let client = cluster.client();
    for i in 0..3 {
        let job = pb::SubmitJobRequest {
            task: Some(pb::submit_job_request::Task::TaskYaml(format!(
                "run: echo {i}\n"
            ))),
            ..Default::default()
        };
        nembo_proto::client::call(
            &client,
            job,
            |mut c, r| async move { c.submit_job(r).await },
        )
        .await
        .expect("a write commits after the renewal");
    }
    let target = cluster
        .status(cluster.leader().await)
        .await
        .unwrap()
        .commit_index;
    for id in 1..=3 {
        cluster
            .wait_applied(id, target, "every member to apply it")
            .await;
    }
    let to = (1..=3).find(|id| *id != leader).unwrap();
    wait_for(
        "the certificate it renewed away to be refused",
        Duration::from_secs(10),
        || async {
            let code = raft_stream_as(&cluster, to, leader, &before, &before_key).await;
            (code == Code::PermissionDenied).then_some(())
        },
    )
    .await;
}

/// The process group of attempt `attempt` of job `job`, wherever it runs.
fn attempt_pid(c: &Coordinator, job: &str, attempt: u32) -> Option<i32> {
    let nodes = std::fs::read_dir(c.dir.path().join("nodes")).ok()?;
    nodes.flatten().find_map(|n| {
        let pid = n.path().join(format!("jobs/{job}-{attempt}/pid"));
        std::fs::read_to_string(pid).ok()?.trim().parse().ok()
    })
}

/// A node cut off from the coordinators kept running its managed job's
/// attempt while the majority declared the node lost and started the job
/// again elsewhere: two attempts of one job at once (the fault suite saw
/// it with real network namespaces). Now an agent that hears nothing from
/// a leader for its contact lease (half the node TTL) stops the attempts
/// that would be replaced, before its node can be declared lost; a plain
/// job, which nothing replaces, runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_stops_what_would_be_replaced_before_its_node_is_lost() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let c = Coordinator::start(&["--node-ttl-ms", "6000"]).await;
    let managed = c
        .client()
        .await
        .submit_job(pb::SubmitJobRequest {
            task: Some(pb::submit_job_request::Task::TaskYaml(
                "run: sleep 600\n".into(),
            )),
            managed: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let plain = c.submit("run: sleep 600\n").await;
    for job in [&managed, &plain] {
        c.wait_state(job, pb::JobState::Running, Duration::from_secs(30))
            .await;
    }
    let first = wait_for(
        "the managed attempt's process",
        Duration::from_secs(10),
        || async { attempt_pid(&c, &managed, 1) },
    )
    .await;
    let plain_pid = attempt_pid(&c, &plain, 1).expect("the plain job's process");

    // Not a word from the coordinator for 5 s: past the 3 s lease and the
    // 1.5 s stop grace, short of the 6 s node TTL.
    let coordinator = Pid::from_raw(c.pid() as i32);
    kill(coordinator, Signal::SIGSTOP).unwrap();
    tokio::time::sleep(Duration::from_millis(5000)).await;
    let managed_alive = alive(first);
    let plain_alive = alive(plain_pid);
    kill(coordinator, Signal::SIGCONT).unwrap();
    assert!(
        !managed_alive,
        "the managed attempt outlived the contact lease"
    );
    assert!(plain_alive, "a plain job runs through a coordinator outage");

    // The job recovers: a second attempt runs, and the first reported why
    // it ended.
    let job = wait_for(
        "the managed job's second attempt",
        Duration::from_secs(30),
        || async {
            let job = c
                .wait_state(&managed, pb::JobState::Running, Duration::from_secs(30))
                .await;
            (job.attempts.len() == 2).then_some(job)
        },
    )
    .await;
    assert!(
        job.attempts[0]
            .message
            .contains("no word from a coordinator"),
        "{:?}",
        job.attempts[0]
    );
    let plain_job = c
        .wait_state(&plain, pb::JobState::Running, Duration::from_secs(5))
        .await;
    assert_eq!(plain_job.attempts.len(), 1);
    assert!(alive(plain_pid));

    // A frozen agent cannot stop anything: the attempt's own watchdog does,
    // once the agent's contact file is older than the lease.
    let second = wait_for(
        "the second attempt's process",
        Duration::from_secs(10),
        || async { attempt_pid(&c, &managed, 2) },
    )
    .await;
    let node = job.attempts[1].node_ids[0].clone();
    let agent = Pid::from_raw(c.agent_pid(&node));
    kill(agent, Signal::SIGSTOP).unwrap();
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let second_alive = alive(second);
    kill(agent, Signal::SIGCONT).unwrap();
    assert!(
        !second_alive,
        "the attempt outlived its frozen agent's lease"
    );
    let job = wait_for("a third attempt", Duration::from_secs(30), || async {
        let job = c
            .wait_state(&managed, pb::JobState::Running, Duration::from_secs(30))
            .await;
        (job.attempts.len() == 3).then_some(job)
    })
    .await;
    assert!(
        job.attempts[1].message.contains("watchdog"),
        "{:?}",
        job.attempts[1]
    );
}

/// The hour-long soak replaced a node by killing its agent with -9 and
/// deleting its directory: the attempt's watchdog found no contact file and
/// waited for one for ever, so the attempt ran on beside the one the
/// coordinators started elsewhere (two live attempts of one job). A contact
/// file that was there and is gone now stops the attempt at once, and so
/// does one that names another node (the new node's agent, in the same
/// directory, wrote its own before the watchdog looked: the next soak).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_whose_agent_directory_is_wiped_stops_itself() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    // A long TTL and lease: what stops the attempt is the vanished file,
    // not a stale one.
    let c = Coordinator::start(&["--node-ttl-ms", "60000"]).await;
    let managed = c
        .client()
        .await
        .submit_job(pb::SubmitJobRequest {
            task: Some(pb::submit_job_request::Task::TaskYaml(
                "run: sleep 600\n".into(),
            )),
            managed: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let job = c
        .wait_state(&managed, pb::JobState::Running, Duration::from_secs(30))
        .await;
    let pid = wait_for(
        "the managed attempt's process",
        Duration::from_secs(10),
        || async { attempt_pid(&c, &managed, 1) },
    )
    .await;
    let node_dir = c.dir.path().join("nodes").join(&job.node_ids[0]);
    let contact = node_dir.join("contact");
    wait_for(
        "the agent's contact file",
        Duration::from_secs(10),
        || async { contact.exists().then_some(()) },
    )
    .await;
    // Let the watchdog see the file at least once (it looks every 500 ms;
    // a slow machine gets a few looks).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    kill(
        Pid::from_raw(c.agent_pid(&job.node_ids[0])),
        Signal::SIGKILL,
    )
    .unwrap();
    std::fs::remove_file(&contact).unwrap();
    // A new node's agent in the same directory writes its own at once,
    // before the watchdog could see the gap (the soak's second case).
    std::fs::write(&contact, "60000 node-99\n").unwrap();
    wait_for(
        "the attempt to stop without its agent",
        Duration::from_secs(10),
        || async { (!alive(pid)).then_some(()) },
    )
    .await;
}
