//! End-to-end behaviour a user notices, with the real binaries.

use std::time::Duration;

use nembo_proto::agent::v1 as apb;
use nembo_proto::v1 as pb;
use nembo_tests::{alive, ms, wait_for, Coordinator};
use tonic::Code;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// A task that records each run in `runs`, then waits for the file `go`
/// before printing `finished`.
fn gated_task(dir: &std::path::Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let (go, runs) = (dir.join("go"), dir.join("runs"));
    let yaml = format!(
        "run: |\n  echo run >> {runs}\n  while [ ! -f {go} ]; do sleep 0.05; done\n  echo finished\n",
        runs = runs.display(),
        go = go.display()
    );
    (yaml, go, runs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_streams_logs_and_succeeds_with_skypilot_env() {
    let c = Coordinator::start(&[]).await;
    let task = c.dir.path().join("task.yaml");
    std::fs::write(
        &task,
        "name: hi\nenvs: {GREETING: hello}\nsetup: echo setup-ran\nrun: |\n  echo \"$GREETING job=$NEMBO_JOB_ID rank=$SKYPILOT_NODE_RANK nodes=$SKYPILOT_NUM_NODES ips=$NEMBO_NODE_IPS attempt=$NEMBO_ATTEMPT\"\n  echo \"task=$SKYPILOT_TASK_ID\"\n  echo to-stderr >&2\n",
    )
    .unwrap();
    let out = c.cli(&["launch", task.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "launch failed: {out:?}");
    assert!(stdout.contains("setup-ran"), "{stdout}");
    assert!(
        stdout.contains("hello job=1 rank=0 nodes=1 ips=127.0.0.1 attempt=1"),
        "{stdout}"
    );
    assert!(stdout.contains("task=sky-"), "{stdout}");
    assert!(
        stdout.contains("to-stderr"),
        "stderr of the job is part of its log: {stdout}"
    );
    let mut client = c.client().await;
    let job = client
        .get_job(pb::GetJobRequest { job_id: "1".into() })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(job.state, pb::JobState::Succeeded as i32);
    assert_eq!(job.exit_code, Some(0));
    assert_eq!(job.attempts.len(), 1);
    assert!(ms(&job.end_time) >= ms(&job.start_time) && ms(&job.start_time) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_job_reports_its_exit_code() {
    let c = Coordinator::start(&[]).await;
    let task = c.dir.path().join("fail.yaml");
    std::fs::write(&task, "run: |\n  echo about to fail\n  exit 7\n").unwrap();
    let out = c.cli(&["launch", task.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("about to fail"));
    let job = c.wait_state("1", pb::JobState::Failed, SECS(5)).await;
    assert_eq!(job.exit_code, Some(7));
    assert!(job.message.contains("exited with 7"), "{}", job.message);

    let id = c.submit("setup: exit 4\nrun: echo never-runs").await;
    let job = c.wait_state(&id, pb::JobState::FailedSetup, SECS(10)).await;
    assert_eq!(job.exit_code, Some(4));
    assert!(!c.logs(&id).await.contains("never-runs"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_streams_output_while_the_job_runs() {
    use tokio_stream::StreamExt;
    let c = Coordinator::start(&[]).await;
    let go = c.dir.path().join("go");
    let id = c
        .submit(&format!(
            "run: |\n  echo first-line\n  while [ ! -f {} ]; do sleep 0.05; done\n  echo last-line\n",
            go.display()
        ))
        .await;
    let mut stream = c
        .client()
        .await
        .stream_logs(pb::StreamLogsRequest {
            job_id: id.clone(),
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(SECS(15), stream.next())
        .await
        .expect("first chunk")
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&first.data),
        "first-line\n",
        "output arrives before the job ends"
    );
    std::fs::write(&go, "").unwrap();
    let mut rest = Vec::new();
    while let Some(chunk) = tokio::time::timeout(SECS(15), stream.next())
        .await
        .expect("stream ends")
    {
        rest.extend(chunk.unwrap().data);
    }
    assert_eq!(
        String::from_utf8_lossy(&rest),
        "last-line\n",
        "after first-line, with job {id}"
    );
    c.wait_state(&id, pb::JobState::Succeeded, SECS(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_whole_process_tree() {
    let c = Coordinator::start(&[]).await;
    let pids = c.dir.path().join("pids");
    let id = c
        .submit(&format!(
            "run: |\n  sleep 300 &\n  echo $! >> {p}\n  (sleep 301; true) &\n  echo $! >> {p}\n  trap '' TERM\n  wait\n",
            p = pids.display()
        ))
        .await;
    c.wait_state(&id, pb::JobState::Running, SECS(15)).await;
    let children: Vec<i32> = wait_for("job to write its child pids", SECS(10), || {
        let pids = pids.clone();
        async move {
            let s = std::fs::read_to_string(&pids).ok()?;
            let v: Vec<i32> = s.lines().filter_map(|l| l.trim().parse().ok()).collect();
            (v.len() == 2).then_some(v)
        }
    })
    .await;
    assert!(children.iter().all(|p| alive(*p)));
    let r = c
        .client()
        .await
        .cancel_job(pb::CancelJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::JobState::Cancelled as i32);
    // The script ignores SIGTERM, so this also proves the SIGKILL escalation.
    wait_for("every process of the job to be gone", SECS(15), || {
        let gone = children.iter().all(|p| !alive(*p));
        async move { gone.then_some(()) }
    })
    .await;
    // The rank is over, so the node is free for the next job.
    let next = c.submit("run: echo next").await;
    c.wait_state(&next, pb::JobState::Succeeded, SECS(15)).await;
    let mut client = c.client().await;
    let nodes = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 1, "the idle node was reused: {nodes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_kill9_loses_nothing_and_the_running_job_reconciles() {
    let mut c = Coordinator::start(&[]).await;
    let dir = c.dir.path().to_path_buf();
    let (yaml, go, runs) = gated_task(&dir);
    let id = c.submit(&yaml).await;
    c.wait_state(&id, pb::JobState::Running, SECS(15)).await;
    let mut client = c.client().await;
    let queued = client
        .submit_job(pb::SubmitJobRequest {
            task: Some(pb::submit_job_request::Task::TaskYaml(
                "resources: {infra: local/eu-west}\nrun: echo queued-ran".into(),
            )),
            idempotency_key: "acked-before-crash".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;

    c.kill9();
    // The job keeps running while the coordinator is down, and finishes.
    std::fs::write(&go, "").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.restart().await;

    let job = c.wait_state(&id, pb::JobState::Succeeded, SECS(20)).await;
    assert_eq!(job.exit_code, Some(0));
    assert!(c.logs(&id).await.contains("finished"));
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap().lines().count(),
        1,
        "ran exactly once"
    );
    c.wait_state(&queued, pb::JobState::Succeeded, SECS(20))
        .await;
    // The acknowledged idempotency key survived too.
    let again = c
        .client()
        .await
        .submit_job(pb::SubmitJobRequest {
            task: Some(pb::submit_job_request::Task::TaskYaml(
                "run: echo other".into(),
            )),
            idempotency_key: "acked-before-crash".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.job_id, queued);
    assert!(again.existing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_snapshot_compaction_and_kill9() {
    // Every 3 entries a snapshot; max-nodes 0 keeps jobs pending, so the
    // log holds nothing but the submissions.
    let mut c = Coordinator::start(&["--snapshot-every", "3", "--max-nodes", "0"]).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(c.submit(&format!("name: j{i}\nrun: echo {i}")).await);
    }
    let before = c.cluster_status().await;
    assert!(before.snapshot_index >= 9, "{before:?}");
    c.kill9();
    c.restart().await;
    let jobs = c.jobs().await;
    let names: Vec<String> = jobs.iter().map(|j| j.name.clone()).collect();
    assert_eq!(names, (0..10).map(|i| format!("j{i}")).collect::<Vec<_>>());
    let after = c.cluster_status().await;
    assert!(after.applied_index >= before.applied_index);
    assert_eq!(after.leader_id, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_readopts_the_running_job() {
    readopted_job_ends_once(false).await;
}

/// A managed attempt has a watchdog beside it (the contact lease); it must
/// end with the attempt, or a re-adopted attempt, known by its process
/// group, would never be seen to end (found by the hour-long soak).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_readopts_a_managed_attempt_and_sees_it_end() {
    readopted_job_ends_once(true).await;
}

async fn readopted_job_ends_once(managed: bool) {
    let c = Coordinator::start(&[]).await;
    let dir = c.dir.path().to_path_buf();
    let (yaml, go, runs) = gated_task(&dir);
    let id = c
        .client()
        .await
        .submit_job(pb::SubmitJobRequest {
            task: Some(pb::submit_job_request::Task::TaskYaml(yaml.clone())),
            managed,
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    let job = c.wait_state(&id, pb::JobState::Running, SECS(15)).await;
    let node = job.node_ids[0].clone();
    let pid = c.agent_pid(&node);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Started again the way systemd would restart it.
    let mut agent = std::process::Command::new(&args[0])
        .args(&args[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(
        dir.join("nodes").join(&node).join("agent.pid"),
        agent.id().to_string(),
    )
    .unwrap();
    std::fs::write(&go, "").unwrap();
    let job = c.wait_state(&id, pb::JobState::Succeeded, SECS(20)).await;
    assert_eq!(job.attempts.len(), 1);
    assert!(c.logs(&id).await.contains("finished"));
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap().lines().count(),
        1,
        "ran exactly once"
    );
    let _ = agent.kill();
    let _ = agent.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_heartbeats_stop_is_lost_and_its_job_fails() {
    let c = Coordinator::start(&["--node-ttl-ms", "1500"]).await;
    let id = c.submit("run: sleep 300").await;
    let job = c.wait_state(&id, pb::JobState::Running, SECS(15)).await;
    let pid = c.agent_pid(&job.node_ids[0]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let job = c.wait_state(&id, pb::JobState::Failed, SECS(15)).await;
    assert!(job.message.contains("lost"), "{}", job.message);
    let mut client = c.client().await;
    let nodes = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes[0].state, pb::NodeState::Lost as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_idempotency_key_returns_the_same_job() {
    let c = Coordinator::start(&["--max-nodes", "0"]).await;
    let mut client = c.client().await;
    let req = |yaml: &str| pb::SubmitJobRequest {
        task: Some(pb::submit_job_request::Task::TaskYaml(yaml.into())),
        idempotency_key: "k-1".into(),
        ..Default::default()
    };
    let a = client
        .submit_job(req("run: echo a"))
        .await
        .unwrap()
        .into_inner();
    let b = client
        .submit_job(req("run: echo b"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.job_id, b.job_id);
    assert!(!a.existing && b.existing);
    let jobs = client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_valid_token_are_refused() {
    let c = Coordinator::start(&[]).await;
    for token in ["wrong".to_string(), c.agent_token(), String::new()] {
        let mut client = nembo_proto::client::connect(&c.endpoint(), &c.ca(), &token)
            .await
            .unwrap();
        let err = client
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "token {token:?}");
        let err = client
            .submit_job(pb::SubmitJobRequest {
                task: Some(pb::submit_job_request::Task::TaskYaml("run: echo".into())),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    // Neither the client token nor the cluster's agent token opens the
    // agent protocol: agents need a certificate (the agent token admits
    // only a simulated cloud's record-only nodes, and none exist here).
    for token in [c.token(), c.agent_token()] {
        let mut agent = nembo_proto::client::connect_agent(&c.endpoint(), &c.ca(), &token)
            .await
            .unwrap();
        let hello = apb::SessionRequest {
            msg: Some(apb::session_request::Msg::Hello(apb::Hello {
                node_id: "node-1".into(),
                ..Default::default()
            })),
        };
        let err = agent
            .session(tokio_stream::iter(vec![hello]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    // And a client that does not trust the cluster CA cannot connect at all.
    let other = Coordinator::start(&[]).await;
    let res = nembo_proto::client::connect(&c.endpoint(), &other.ca(), &c.token()).await;
    assert!(
        res.is_err(),
        "TLS must reject a server not signed by the trusted CA"
    );
    let mut client = c.client().await;
    assert!(client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let c = Coordinator::start(&[]).await;
    let mut client = c.client().await;
    // GetClusterStatus reads this member's counters without a read index; a
    // linearizable read first makes sure the new leader's own empty entry is
    // applied, so it is not counted as a write made by the bad requests.
    client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap();
    let before = client
        .get_cluster_status(pb::GetClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let audited_before = client
        .get_audit_log(pb::GetAuditLogRequest {
            page_size: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records
        .len() as u64;
    let cases: Vec<(String, Code, &str)> = vec![
        (
            "run: [unclosed".into(),
            Code::InvalidArgument,
            "task: invalid YAML",
        ),
        (
            "nmae: typo\nrun: x".into(),
            Code::InvalidArgument,
            "nmae: unknown field (did you mean 'name'?)",
        ),
        (
            "resources: {accelerators: 'H100:-1'}".into(),
            Code::InvalidArgument,
            "resources.accelerators",
        ),
        (
            "resources: {accelerators: 'H100:abc'}".into(),
            Code::InvalidArgument,
            "resources.accelerators",
        ),
        ("num_nodes: 0".into(), Code::InvalidArgument, "num_nodes"),
        (
            "resources: {infra: aws}".into(),
            Code::InvalidArgument,
            "resources.infra: cloud 'aws' is not enabled",
        ),
        (
            "file_mounts: {/d: {name: b, mode: MOUNT}}".into(),
            Code::InvalidArgument,
            "file_mounts./d.name: 'b' is not an S3 bucket name",
        ),
        (
            format!("run: echo {}", "x".repeat(300 * 1024)),
            Code::ResourceExhausted,
            "limit",
        ),
        (
            format!("run: echo {}", "x".repeat(6 * 1024 * 1024)),
            Code::ResourceExhausted,
            "limit",
        ),
    ];
    for (yaml, code, needle) in cases {
        let err = client
            .submit_job(pb::SubmitJobRequest {
                task: Some(pb::submit_job_request::Task::TaskYaml(yaml.clone())),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            code,
            "{}: {}",
            &yaml[..yaml.len().min(40)],
            err.message()
        );
        assert!(
            err.message().contains(needle),
            "{:?} lacks {needle:?}",
            err.message()
        );
    }
    let bad_spec = pb::TaskSpec {
        run: "echo".into(),
        resources: Some(pb::ResourceRequest {
            candidates: vec![pb::ResourceCandidate {
                accelerator: "H100:zero".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = client
        .submit_job(pb::SubmitJobRequest {
            task: Some(pb::submit_job_request::Task::Spec(bad_spec)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("spec.resources.candidates[0].accelerator:"),
        "{}",
        err.message()
    );
    let err = client
        .get_job(pb::GetJobRequest {
            job_id: "999".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .cancel_job(pb::CancelJobRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let after = client
        .get_cluster_status(pb::GetClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    // Each refused change is in the audit trail; nothing else was written.
    let audited = client
        .get_audit_log(pb::GetAuditLogRequest {
            page_size: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(audited
        .iter()
        .any(|r| r.call == "SubmitJob" && r.result == "InvalidArgument"));
    assert_eq!(
        after.applied_index - before.applied_index,
        audited.len() as u64 - audited_before,
        "nothing but audit records was written"
    );
    assert!(client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
        .is_empty());
    // The CLI shows the same message and fails.
    let task = c.dir.path().join("bad.yaml");
    std::fs::write(&task, "resources: {accelerators: 'H100:abc'}\n").unwrap();
    let out = c.cli(&["launch", task.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("resources.accelerators"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_places_without_launching() {
    let c = Coordinator::start(&[]).await;
    let task = c.dir.path().join("gpu.yaml");
    std::fs::write(&task, "resources: {accelerators: {H100: 8}, infra: local/eu-west}\nsecrets: {TOKEN: s3cr3t}\nrun: nvidia-smi\n").unwrap();
    let out = c.cli(&["launch", "--dry-run", "--json", task.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["placement"]["instance_type"], "local-h100-8");
    assert_eq!(v["placement"]["region"], "eu-west");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("s3cr3t"),
        "secrets are never shown"
    );
    let mut client = c.client().await;
    assert!(client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
        .is_empty());
    assert!(client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_node_job_runs_every_rank_and_down_releases_the_nodes() {
    let c = Coordinator::start(&[]).await;
    let id = c
        .submit("num_nodes: 2\nresources: {accelerators: A100:2}\nrun: echo rank=$SKYPILOT_NODE_RANK gpus=$SKYPILOT_NUM_GPUS_PER_NODE")
        .await;
    let job = c.wait_state(&id, pb::JobState::Succeeded, SECS(20)).await;
    assert_eq!(job.node_ids.len(), 2);
    let logs = c.logs(&id).await;
    assert!(
        logs.contains("rank=0 gpus=2") && logs.contains("rank=1 gpus=2"),
        "{logs}"
    );
    let pids: Vec<i32> = job.node_ids.iter().map(|n| c.agent_pid(n)).collect();
    let out = c.cli(&["down", "--all"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("agents to exit", SECS(10), || {
        let gone = pids.iter().all(|p| !alive(*p));
        async move { gone.then_some(()) }
    })
    .await;
    let mut client = c.client().await;
    let nodes = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert!(
        nodes
            .iter()
            .all(|n| n.state == pb::NodeState::Terminated as i32),
        "{nodes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_using_only_reflection_runs_a_job() {
    let c = Coordinator::start(&[]).await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/reflection_client.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(c.dir.path().join("api.json"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python client failed (deps: pip install -r tests/python/requirements.txt): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCEEDED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_structured_spec_runs_like_yaml_and_secrets_stay_hidden() {
    let c = Coordinator::start(&[]).await;
    let mut client = c.client().await;
    let spec = pb::TaskSpec {
        name: "structured".into(),
        run: "echo token-length=${#API_KEY} mode=$MODE".into(),
        envs: [("MODE".to_string(), "fast".to_string())].into(),
        secrets: [("API_KEY".to_string(), "s3cr3t-value".to_string())].into(),
        resources: Some(pb::ResourceRequest {
            candidates: vec![pb::ResourceCandidate {
                infra: "local/eu-west".into(),
                accelerator: "L4:1".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = client
        .submit_job(pb::SubmitJobRequest {
            task: Some(pb::submit_job_request::Task::Spec(spec)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let job = c.wait_state(&id, pb::JobState::Succeeded, SECS(20)).await;
    assert!(c.logs(&id).await.contains("token-length=12 mode=fast"));
    let shown = format!("{job:?}");
    assert!(
        !shown.contains("s3cr3t-value"),
        "GetJob must not return secret values"
    );
    assert!(shown.contains("<redacted>"));
    let nodes = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes[0].region, "eu-west");
    assert_eq!(nodes[0].instance_type, "local-l4-1");
}

/// Lists come in pages (AIP-158): a page token continues where the last
/// page ended, even after the list grew; ListJobs gives summaries unless
/// asked for the full job; a token of another list is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_come_in_pages_and_jobs_as_summaries_unless_asked_for_in_full() {
    // No nodes: the jobs stay pending and the list stays put.
    let c = Coordinator::start(&["--max-nodes", "0"]).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(c.submit(&format!("name: paged-{i}\nrun: echo {i}")).await);
    }
    let mut client = c.client().await;
    let page = |page_token: String, view: pb::JobView| pb::ListJobsRequest {
        page_size: 2,
        page_token,
        view: view as i32,
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = client
            .list_jobs(page(token, pb::JobView::Unspecified))
            .await
            .unwrap()
            .into_inner();
        assert!(r.jobs.len() <= 2);
        assert!(
            r.jobs
                .iter()
                .all(|j| j.spec.is_none() && j.attempts.is_empty()),
            "the default view is a summary"
        );
        assert!(r.jobs.iter().all(|j| j.submit_time.is_some()));
        seen.extend(r.jobs.into_iter().map(|j| j.job_id));
        pages += 1;
        if pages == 1 {
            // A job submitted between pages shows up on a later page once.
            ids.push(c.submit("name: late\nrun: echo late").await);
        }
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(seen, ids, "every job once, oldest first");
    assert_eq!(pages, 3);
    let full = client
        .list_jobs(page(String::new(), pb::JobView::Full))
        .await
        .unwrap()
        .into_inner();
    assert!(full.jobs.iter().all(|j| j.spec.is_some()), "{full:?}");

    // The audit trail, newest first, page after page, never twice.
    let records = nembo_tests::audit_trail(&client, 4).await;
    let submits = records.iter().filter(|r| r.call == "SubmitJob").count();
    assert_eq!(submits, 6, "{records:?}");
    assert!(records.windows(2).all(|w| ms(&w[0].time) >= ms(&w[1].time)));
    assert_eq!(records[0].target, format!("job {}", ids.last().unwrap()));

    // A token is good for its own list only, and a negative size is refused.
    let jobs_token = client
        .list_jobs(page(String::new(), pb::JobView::Unspecified))
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    let err = client
        .list_nodes(pb::ListNodesRequest {
            page_token: jobs_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("page_token"), "{err:?}");
    let err = client
        .list_users(pb::ListUsersRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
