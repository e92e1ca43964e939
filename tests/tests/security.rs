//! Secrets kept secret (issue 7, first part): a task secret reaches the
//! job's environment, and is found nowhere else: not in API answers, not in
//! the dry run, not in the Raft log or snapshots, not in any log file.

use std::time::Duration;

use nembo_proto::v1 as pb;
use nembo_tests::{files_holding, Coordinator};

const SECRET: &str = "s3cr3t-Value-7f2b9c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_reaches_the_job_and_nowhere_else() {
    // Snapshot often, so the state is written out as a snapshot too.
    let c = Coordinator::start(&["--snapshot-every", "3"]).await;
    // The job checks the value reversed, so that the task itself never
    // holds the secret.
    let reversed: String = SECRET.chars().rev().collect();
    let yaml = format!(
        "name: sec\nsecrets: {{API_KEY: {SECRET}}}\nrun: |\n  [ \"$(printf %s \"$API_KEY\" | rev)\" = \"{reversed}\" ] && echo secret-ok\n"
    );
    let task = c.dir.path().join("sec.yaml");
    std::fs::write(&task, &yaml).unwrap();
    let dry = c.cli(&["launch", "--dry-run", "--json", task.to_str().unwrap()]);
    assert!(dry.status.success());
    let shown = String::from_utf8_lossy(&dry.stdout);
    assert!(
        !shown.contains(SECRET),
        "the dry run shows the secret: {shown}"
    );
    let id = c.submit(&yaml).await;
    let job = c
        .wait_state(&id, pb::JobState::Succeeded, Duration::from_secs(30))
        .await;
    assert!(
        !format!("{job:?}").contains(SECRET),
        "GetJob returns the secret"
    );
    let logs = c.logs(&id).await;
    assert!(
        logs.contains("secret-ok"),
        "the job did not get the secret: {logs}"
    );
    // A few more writes, so a snapshot is taken after the job ran.
    for _ in 0..4 {
        c.submit("run: 'true'\n").await;
    }
    std::fs::remove_file(&task).unwrap();
    let snapshots = files_holding(c.dir.path(), b"\"SubmitJob\"").len()
        + files_holding(c.dir.path(), b"\"last_job_id\"").len();
    assert!(snapshots > 0, "no snapshot or log entry found to search");
    let leaks = files_holding(c.dir.path(), SECRET.as_bytes());
    assert!(leaks.is_empty(), "the secret is in plain text in {leaks:?}");
}

/// Every binary refuses a token or key file that others can read, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_key_files_readable_by_others_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Coordinator::start(&[]).await;
    let token = c.dir.path().join("token");
    let key = c.dir.path().join("tls/server.key");
    for f in [
        &token,
        &key,
        &c.dir.path().join("agent-token"),
        &c.dir.path().join("secrets-key"),
    ] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", f.display());
    }
    // The CLI.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = c.cli(&["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("readable by other users"));
    // The agent.
    let out = std::process::Command::new(nembo_tests::bin("nembo-agent"))
        .args([
            "--coordinator",
            &c.endpoint(),
            "--node-id",
            "node-x",
            "--ca-cert",
        ])
        .arg(c.dir.path().join("tls/ca.pem"))
        .arg("--join-token-file")
        .arg(&token)
        .arg("--work-dir")
        .arg(c.dir.path().join("agent-x"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("readable by other users"));
    // The agent's own key, made at enrollment: exposed, the agent stops
    // rather than use it (or quietly enroll again).
    let work = c.dir.path().join("agent-y");
    std::fs::create_dir_all(work.join("identity")).unwrap();
    std::fs::write(
        work.join("identity/node.json"),
        r#"{"node_id":"node-y","not_before_ms":0,"not_after_ms":99999999999999}"#,
    )
    .unwrap();
    std::fs::write(work.join("identity/node.pem"), "cert").unwrap();
    std::fs::write(work.join("identity/node.key"), "key").unwrap();
    std::fs::set_permissions(
        work.join("identity/node.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = std::process::Command::new(nembo_tests::bin("nembo-agent"))
        .args(["--coordinator", &c.endpoint(), "--ca-cert"])
        .arg(c.dir.path().join("tls/ca.pem"))
        .arg("--work-dir")
        .arg(&work)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("readable by other users") && err.contains("node.key"),
        "{err}"
    );
    // The coordinator, at its next start: the token, then its TLS key.
    c.kill9();
    for exposed in [&token, &key] {
        std::fs::set_permissions(exposed, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = std::process::Command::new(nembo_tests::bin("nembo-coordinator"))
            .arg("--data-dir")
            .arg(c.dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "started with {} readable",
            exposed.display()
        );
        assert!(
            err.contains("readable by other users") && err.contains(&exposed.display().to_string()),
            "{err}"
        );
        std::fs::set_permissions(exposed, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// One client holding hundreds of log streams open on its connection gets
/// at most the per-connection limit of them (the rest wait), and another
/// client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_streams_is_limited_and_does_not_starve_another() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let c = Coordinator::start(&[]).await;
    let id = c.submit("run: sleep 30\n").await;
    let greedy = c.client().await;
    let opened = Arc::new(AtomicUsize::new(0));
    let mut held = Vec::new();
    for _ in 0..300 {
        let mut g = greedy.clone();
        let (id, opened) = (id.clone(), opened.clone());
        held.push(tokio::spawn(async move {
            let req = pb::StreamLogsRequest {
                job_id: id,
                follow: true,
            };
            if let Ok(s) = g.stream_logs(req).await {
                opened.fetch_add(1, Ordering::SeqCst);
                let mut s = s.into_inner();
                while let Some(Ok(_)) = tokio_stream::StreamExt::next(&mut s).await {}
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = opened.load(Ordering::SeqCst);
    assert!(
        n > 0 && n <= 128,
        "{n} streams opened on one connection; the limit is 128"
    );
    let mut other = c.client().await;
    let status = tokio::time::timeout(
        Duration::from_secs(5),
        other.get_cluster_status(pb::GetClusterStatusRequest {}),
    )
    .await;
    assert!(
        matches!(status, Ok(Ok(_))),
        "another client was not served: {status:?}"
    );
    for h in held {
        h.abort();
    }
}

/// Provider credentials live with the coordinators only: a local node's
/// agent, and the jobs it runs, never see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_credentials_never_reach_agents_or_jobs() {
    let env = [
        ("AWS_SECRET_ACCESS_KEY", "coordinator-only-aws-secret"),
        ("SEEWEB_API_TOKEN", "coordinator-only-seeweb-token"),
    ];
    let c = Coordinator::start_with_env(&[], &env).await;
    let id = c.submit("run: env\n").await;
    let job = c
        .wait_state(&id, pb::JobState::Succeeded, Duration::from_secs(30))
        .await;
    let logs = c.logs(&id).await;
    assert!(logs.contains("NEMBO_JOB_ID="), "{logs}");
    assert!(
        !logs.contains("coordinator-only"),
        "a job saw provider credentials: {logs}"
    );
    let pid = c.agent_pid(&job.node_ids[0]);
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        !environ.contains("coordinator-only"),
        "the agent holds provider credentials"
    );
}

/// A call that would hang holds the coordinator no longer than the request
/// timeout: moving leadership to a frozen member waits for an answer that
/// never comes, and is cut off after 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_hangs_ends_at_the_request_timeout() {
    let cluster = nembo_tests::Cluster::start(3, &["--request-timeout-s", "1"]).await;
    let leader = cluster.leader().await;
    let frozen = (1..=3).find(|id| *id != leader).unwrap();
    cluster.pause(frozen);
    let mut client = cluster.member_client(leader).await.unwrap();
    let started = std::time::Instant::now();
    let err = client
        .transfer_leader(pb::TransferLeaderRequest { id: frozen })
        .await
        .unwrap_err();
    let took = started.elapsed();
    cluster.resume(frozen);
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(
        took < Duration::from_secs(4),
        "the call took {took:?}, not about the 1 s timeout"
    );
}
