//! Managed jobs end to end: a real coordinator, real agents on the local
//! provider, the real CLI. A preemption notice is served by the node's
//! metadata service in AWS, GCP or Azure format and read by the agent's
//! real watchers; the job checkpoints on the signal, the replacement is
//! provisioned in the other region, and the next attempt resumes from the
//! checkpoint.

use std::time::Duration;

use nembo_proto::v1 as pb;
use nembo_tests::{wait_for, Coordinator};
use serde_json::Value;

/// Two local regions, us-east the cheaper; spot GPUs.
const PROVIDERS: &str = "local:\n  simulate: true\n  gpu_hourly: {H100: 2.0}\n  spot_factor: 0.4\n  regions:\n    eu-west: {price_factor: 1.5}\n";

/// Counts steps, checkpoints every 5 and on SIGUSR1 (then exits, as a
/// trainer told to stop would), resumes from the checkpoint.
fn train_task(store: &str, target: u32) -> String {
    format!(
        r#"name: train
resources: {{accelerators: H100:1, use_spot: true, infra: local}}
checkpoint: {{store: "file://{store}", path: /ckpt, interval: 1}}
envs: {{TARGET: "{target}"}}
run: |
  ckpt="$NEMBO_CHECKPOINT_DIR/step"
  step=0; [ -f "$ckpt" ] && step=$(cat "$ckpt")
  echo "attempt $NEMBO_ATTEMPT starts at step $step"
  trap 'echo $step > "$ckpt"; echo "checkpointed step $step on notice $(cat $NEMBO_PREEMPTION_FILE)"; exit 143' USR1
  while [ "$step" -lt "$TARGET" ]; do
    step=$((step+1)); echo "step $step"
    [ $((step % 5)) -eq 0 ] && echo $step > "$ckpt"
    sleep 0.1
  done
  echo $step > "$ckpt"
  echo "done at step $step"
"#
    )
}

async fn start() -> (Coordinator, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("providers.yaml");
    std::fs::write(&path, PROVIDERS).unwrap();
    let c = Coordinator::start(&[
        "--providers",
        path.to_str().unwrap(),
        "--node-ttl-ms",
        "3000",
    ])
    .await;
    (c, dir)
}

fn submit_managed(c: &Coordinator, dir: &std::path::Path, yaml: &str) -> String {
    let task = dir.join(format!("task-{}.yaml", rand_suffix()));
    std::fs::write(&task, yaml).unwrap();
    let out = c.cli(&["jobs", "launch", "-d", task.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn job(c: &Coordinator, id: &str) -> pb::Job {
    c.jobs().await.into_iter().find(|j| j.job_id == id).unwrap()
}

/// Waits until the job runs attempt `n` and its log shows `text`.
async fn running(c: &Coordinator, id: &str, n: usize, text: &str) -> pb::Job {
    wait_for(
        &format!("attempt {n} running with '{text}'"),
        Duration::from_secs(60),
        || async {
            let j = job(c, id).await;
            // It may have finished since: attempt n started is enough.
            let ran = j
                .attempts
                .get(n - 1)
                .is_some_and(|a| a.state != pb::JobState::Starting as i32);
            (ran && c.logs_so_far(id).await.contains(text)).then_some(j)
        },
    )
    .await
}

/// The step the job saved when the notice's signal came.
fn saved_step(logs: &str) -> Option<u32> {
    logs.lines().find_map(|l| {
        l.strip_prefix("checkpointed step ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// The newest checkpoint's step in the store, if any.
fn newest_manifest(store: &std::path::Path, id: &str) -> Option<(u32, u32)> {
    let dir = store.join(format!("job-{id}/manifests"));
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let last = names.last()?.trim_end_matches(".json").to_string();
    let (e, s) = last.split_once('-')?;
    Some((e.parse().ok()?, s.parse().ok()?))
}

/// One recovery per notice format, each checked for what a user would
/// notice: the job moved to the other region at once, resumed from its
/// checkpoint, lost no step before it, and finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_notice_format_leads_to_a_recovery_from_the_checkpoint_in_the_other_region() {
    let (c, dir) = start().await;
    let store = dir.path().join("store");
    for format in ["aws", "gcp", "azure"] {
        let id = submit_managed(&c, dir.path(), &train_task(store.to_str().unwrap(), 40));
        let first = running(&c, &id, 1, "step 8").await;
        let node = first.node_ids[0].clone();
        let region = |n: &str, nodes: &[pb::Node]| {
            nodes
                .iter()
                .find(|x| x.node_id == n)
                .unwrap()
                .region
                .clone()
        };
        let nodes = c.nodes().await;
        let old_region = region(&node, &nodes);
        let out = c.cli(&["local", "preempt", &node, "--format", format, "--in", "20s"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let second = running(&c, &id, 2, "attempt 2 starts").await;
        let nodes = c.nodes().await;
        assert_ne!(
            region(&second.node_ids[0], &nodes),
            old_region,
            "{format}: EAGER_NEXT_REGION"
        );
        let done = c
            .wait_state(&id, pb::JobState::Succeeded, Duration::from_secs(60))
            .await;
        let logs = c.logs(&id).await;
        assert!(
            logs.contains(&format!("\"kind\":\"{format}:")),
            "{format}: the job saw the notice: {logs}"
        );
        let saved = saved_step(&logs)
            .unwrap_or_else(|| panic!("{format}: no checkpoint on the notice: {logs}"));
        let resumed: u32 = logs
            .lines()
            .find_map(|l| l.strip_prefix("attempt 2 starts at step ")?.parse().ok())
            .unwrap();
        assert_eq!(
            resumed, saved,
            "{format}: no step before the last checkpoint was lost"
        );
        assert!(logs.contains("done at step 40"));
        let m = done.managed.clone().unwrap();
        assert_eq!(m.recoveries, 1, "{format}");
        let events: Vec<&str> = m.events.iter().map(|e| e.what.as_str()).collect();
        assert!(
            events.iter().any(|e| e.starts_with("preemption notice")),
            "{events:?}"
        );
        assert!(
            events
                .iter()
                .any(|e| e.starts_with("replacement requested")),
            "{events:?}"
        );
        // The job's own queue view.
        let q: Value = serde_json::from_slice(&c.cli(&["jobs", "queue", "--json"]).stdout).unwrap();
        assert!(q["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["job_id"] == id.as_str()));
        // The preempted node is released once its deadline passes (or its
        // attempt ended and nothing else wants it).
        assert!(newest_manifest(&store, &id).is_some_and(|(e, _)| e == 2));
    }
}

/// A node whose heartbeats stop (frozen, partitioned) is lost: the job
/// recovers on another node. When the old node comes back, its attempt is
/// killed on reconnect, and it cannot write a checkpoint over the newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_loss_recovers_and_the_resurfacing_attempt_is_fenced() {
    use nix::sys::signal::{kill, killpg, Signal};
    use nix::unistd::Pid;
    let (c, dir) = start().await;
    let store = dir.path().join("store");
    let id = submit_managed(&c, dir.path(), &train_task(store.to_str().unwrap(), 60));
    let first = running(&c, &id, 1, "step 8").await;
    let node = first.node_ids[0].clone();
    let agent = c.agent_pid(&node);
    // Freeze the whole "VM": the agent and the job's process group.
    let job_pgid: i32 = wait_for("the job's pid", Duration::from_secs(10), || async {
        let p = c.dir.path().join(format!("nodes/{node}/jobs/{id}-1/pid"));
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    })
    .await;
    let agent_frozen = kill(Pid::from_raw(agent), Signal::SIGSTOP);
    let job_frozen = killpg(Pid::from_raw(job_pgid), Signal::SIGSTOP);
    assert!(
        agent_frozen.is_ok() && job_frozen.is_ok(),
        "{agent_frozen:?} {job_frozen:?}: agent {agent}, pgid {job_pgid}, {:?}",
        job(&c, &id).await
    );

    let second = running(&c, &id, 2, "attempt 2 starts").await;
    assert_ne!(second.node_ids[0], node);
    let a1 = &second.attempts[0];
    assert!(a1.message.contains("lost"), "{}", a1.message);
    // Let attempt 2 checkpoint, then thaw the old node.
    wait_for(
        "attempt 2 to checkpoint",
        Duration::from_secs(30),
        || async { newest_manifest(&store, &id).filter(|(e, _)| *e == 2) },
    )
    .await;
    killpg(Pid::from_raw(job_pgid), Signal::SIGCONT).unwrap();
    kill(Pid::from_raw(agent), Signal::SIGCONT).unwrap();
    // The resurfaced attempt is stopped on reconnect.
    wait_for(
        "the old attempt to be killed",
        Duration::from_secs(30),
        || async { (!nembo_tests::alive(job_pgid)).then_some(()) },
    )
    .await;
    let done = c
        .wait_state(&id, pb::JobState::Succeeded, Duration::from_secs(60))
        .await;
    assert_eq!(done.attempts.len(), 2);
    // Never a checkpoint of attempt 1 after one of attempt 2.
    let names: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(store.join(format!("job-{id}/manifests")))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort_by_key(|n| {
            let p = store.join(format!("job-{id}/manifests/{n}"));
            let m: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            m["at_ms"].as_i64().unwrap()
        });
        v
    };
    let epochs: Vec<u32> = names.iter().map(|n| n[..10].parse().unwrap()).collect();
    assert!(
        epochs.windows(2).all(|w| w[0] <= w[1]),
        "manifests by time: {names:?}"
    );
}

/// The README's demo, as a user runs it: exit 0, the timeline, the check.
#[test]
fn the_failover_demo_runs_and_checks_itself() {
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(nembo_tests::bin("nembo"))
        .args(["demo", "failover"])
        .env("NEMBO_HOME", home.path())
        .env_remove("NEMBO_API_INFO")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "AWS spot interruption notice served",
        "coordinators aware: preemption notice",
        "replacement requested: 1 x sim/",
        "checkpoint synced by attempt 1",
        "attempt 2 running on",
        "completed: SUCCEEDED",
        "no step before the last checkpoint was lost",
    ] {
        assert!(text.contains(line), "missing '{line}' in:\n{text}");
    }
}

/// Checkpoints in S3 (moto, the real wire format through object_store):
/// a preempted job resumes from what it saved there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_in_s3_carry_a_job_across_a_preemption() {
    let moto = nembo_tests::Moto::start(&[]).await;
    let endpoint = moto.endpoint.clone();
    let moto_cmd = nembo_tests::Moto::helper;
    moto_cmd(&["bucket", &endpoint, "ckpts"]);
    let dir = tempfile::tempdir().unwrap();
    let providers = dir.path().join("providers.yaml");
    std::fs::write(&providers, PROVIDERS).unwrap();
    let c = Coordinator::start(&["--providers", providers.to_str().unwrap()]).await;
    // The store's settings are the job's own (envs, and secrets for the
    // keys): the coordinators' environment never reaches a node.
    // Attempt 1 also saves 12 MiB of weights, more than one upload part
    // (8 MiB): they go up as a multipart upload and come back in two
    // ranged reads. Written aside and moved in, so no sync sees them half
    // written, the digest after the weights.
    let weights = r#"  echo "attempt $NEMBO_ATTEMPT starts at step $step"
  d="$NEMBO_CHECKPOINT_DIR"
  if [ "$NEMBO_ATTEMPT" = 1 ]; then
    mkdir -p "$d/.new" && head -c 12582912 /dev/urandom > "$d/.new/w.bin"
    (cd "$d/.new" && sha256sum w.bin > w.sha) && mv "$d/.new/w.bin" "$d/.new/w.sha" "$d/"
  else
    (cd "$d" && sha256sum -c w.sha) && echo "12 MiB of weights restored intact"
  fi
"#;
    let yaml = train_task("PLACEHOLDER", 40)
        .replace(
            "  echo \"attempt $NEMBO_ATTEMPT starts at step $step\"\n",
            weights,
        )
        .replace("interval: 1", "interval: 2")
        .replace("\"file://PLACEHOLDER\"", "s3://ckpts/run1")
        .replace(
            "envs: {TARGET: \"40\"}",
            &format!(
                "envs: {{TARGET: \"40\", AWS_ENDPOINT_URL: \"{endpoint}\", AWS_ALLOW_HTTP: \"true\", AWS_DEFAULT_REGION: us-east-1}}\nsecrets: {{AWS_ACCESS_KEY_ID: testing, AWS_SECRET_ACCESS_KEY: testing}}"
            ),
        );
    assert!(yaml.contains("AWS_ENDPOINT_URL"), "{yaml}");
    let id = submit_managed(&c, dir.path(), &yaml);
    let first = running(&c, &id, 1, "step 8").await;
    let out = c.cli(&["local", "preempt", &first.node_ids[0], "--format", "gcp"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = c
        .wait_state(&id, pb::JobState::Succeeded, Duration::from_secs(60))
        .await;
    assert_eq!(done.attempts.len(), 2);
    let logs = c.logs(&id).await;
    let saved = saved_step(&logs).unwrap_or_else(|| panic!("{logs}"));
    assert!(
        logs.contains(&format!("attempt 2 starts at step {saved}")),
        "{logs}"
    );
    assert!(logs.contains("12 MiB of weights restored intact"), "{logs}");
    let keys = moto_cmd(&["objects", &endpoint, "ckpts"]);
    let keys: Vec<&str> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k.as_str())
        .collect();
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&format!("run1/job-{id}/manifests/0000000001-"))),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&format!("run1/job-{id}/manifests/0000000002-"))),
        "{keys:?}"
    );
    // The weights went up in two parts (S3 gives a multipart upload's
    // object the ETag `<digest>-<parts>`), the small files in one PUT.
    let etags = moto_cmd(&["etags", &endpoint, "ckpts"]);
    let etags = etags.as_object().unwrap();
    let weights: Vec<&str> = etags
        .iter()
        .filter(|(k, _)| k.ends_with("/w.bin"))
        .filter_map(|(_, e)| e.as_str())
        .collect();
    assert!(
        !weights.is_empty() && weights.iter().all(|e| e.ends_with("-2")),
        "{etags:?}"
    );
    assert!(
        etags
            .iter()
            .filter(|(k, _)| k.ends_with("/step"))
            .all(|(_, e)| !e.as_str().unwrap_or("-").contains('-')),
        "{etags:?}"
    );
}

/// The agent's peak resident memory (VmHWM) in bytes.
fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib << 10
}

/// A 2 GiB checkpoint file (sparse, so the test writes nothing) is synced
/// by the real agent and restored for the next attempt while the agent
/// stays under 64 MB: files go up in parts and come back in ranges, never
/// whole (which would also pass S3's 5 GiB limit on one PUT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2_gib_checkpoint_syncs_and_restores_with_the_agent_under_64_mb() {
    const SIZE: u64 = 2 << 30;
    let began = std::time::Instant::now();
    let (c, dir) = start().await;
    let store = dir.path().join("store");
    // Attempt 1 saves the file and fails; attempt 2 (a restart on error)
    // finds it restored, and removes it so its own final sync is empty.
    let yaml = format!(
        r#"name: big
resources: {{accelerators: H100:1, infra: local, job_recovery: {{max_restarts_on_errors: 1}}}}
checkpoint: {{store: "file://{}", path: /ckpt, interval: 3600}}
run: |
  f="$NEMBO_CHECKPOINT_DIR/weights.bin"
  if [ "$NEMBO_ATTEMPT" = 1 ]; then truncate -s {SIZE} "$f"; exit 3; fi
  echo "restored $(stat -c %s "$f") bytes"
  rm "$f"
"#,
        store.display()
    );
    let id = submit_managed(&c, dir.path(), &yaml);
    let done = c
        .wait_state(&id, pb::JobState::Succeeded, Duration::from_secs(90))
        .await;
    let took = began.elapsed();
    assert_eq!(done.attempts.len(), 2, "{:?}", done.attempts);
    let logs = c.logs(&id).await;
    assert!(logs.contains(&format!("restored {SIZE} bytes")), "{logs}");
    // The stored copy is whole.
    let data = store.join(format!("job-{id}/data"));
    let syncs: Vec<_> = std::fs::read_dir(&data).unwrap().flatten().collect();
    assert_eq!(syncs.len(), 1, "{syncs:?}");
    let stored = std::fs::metadata(syncs[0].path().join("weights.bin")).unwrap();
    assert_eq!(stored.len(), SIZE);
    for node in c.nodes().await {
        let peak = peak_rss(c.agent_pid(&node.node_id));
        eprintln!(
            "{}: agent peak RSS {:.1} MiB; job done after {took:?}",
            node.node_id,
            peak as f64 / f64::from(1 << 20)
        );
        assert!(
            peak < 64_000_000,
            "{}: the agent peaked at {peak} bytes",
            node.node_id
        );
    }
}

/// The cluster harness: the leader is cut off (SIGSTOP) while a managed
/// job runs. The new leader finds the node silent, recovers the job on a
/// new node, and when the old leader and the old attempt come back, the
/// attempt is killed and its checkpoints are refused: the coordinators
/// never see two attempts running, and no older checkpoint follows a newer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_and_its_attempt_are_fenced_by_the_new_leader() {
    let dir = tempfile::tempdir().unwrap();
    let providers = dir.path().join("providers.yaml");
    std::fs::write(&providers, PROVIDERS).unwrap();
    let store = dir.path().join("store");
    let cl = nembo_tests::Cluster::start(
        3,
        &[
            "--providers",
            providers.to_str().unwrap(),
            "--node-ttl-ms",
            "3000",
        ],
    )
    .await;
    let api = cl.api_info();
    let task = dir.path().join("train.yaml");
    std::fs::write(&task, train_task(store.to_str().unwrap(), 100)).unwrap();
    let out = std::process::Command::new(nembo_tests::bin("nembo"))
        .args(["jobs", "launch", "-d", task.to_str().unwrap()])
        .env("NEMBO_API_INFO", &api)
        .env("NEMBO_HOME", dir.path().join("home"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // A call that lands on the frozen member would wait forever: give up
    // after a moment and ask again (the next try may go elsewhere).
    let jobs = || async {
        let mut c = cl.client();
        let call = c.list_jobs(pb::ListJobsRequest {
            view: pb::JobView::Full as i32,
            ..Default::default()
        });
        tokio::time::timeout(Duration::from_secs(2), call)
            .await
            .ok()?
            .ok()
            .map(|r| r.into_inner().jobs)
    };
    let first = wait_for("attempt 1 running", Duration::from_secs(60), || async {
        jobs()
            .await?
            .into_iter()
            .find(|j| j.job_id == id && j.state == pb::JobState::Running as i32)
    })
    .await;
    let node = first.node_ids[0].clone();
    let pid_file = cl.root.path().join(format!("nodes/{node}/jobs/{id}-1/pid"));
    let pgid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The leader and the node both freeze. (With the leader alone frozen,
    // the agent finds the new leader within a second and its attempt just
    // runs on: nothing to fence.) The node is lost and the job moves; the
    // old attempt's watchdog stops it once the frozen agent's contact file
    // is older than the lease, and fencing keeps whatever it did until then
    // from counting.
    let old_leader = cl.leader().await;
    let agent: i32 =
        std::fs::read_to_string(cl.root.path().join(format!("nodes/{node}/agent.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let signal = |s| nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), s).unwrap();
    cl.pause(old_leader);
    signal(nix::sys::signal::Signal::SIGSTOP);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let second = loop {
        let j = jobs()
            .await
            .and_then(|j| j.into_iter().find(|j| j.job_id == id));
        if let Some(j) = j.filter(|j| j.attempts.get(1).is_some_and(|a| a.start_time.is_some())) {
            break j;
        }
        if std::time::Instant::now() > deadline {
            let mut why = String::new();
            for entry in std::fs::read_dir(cl.root.path()).unwrap().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".log") {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    for l in text.lines().filter(|l| {
                        !l.contains(" INFO ") || l.contains("node") || l.contains("leader")
                    }) {
                        why.push_str(&format!("{name}: {l}\n"));
                    }
                }
            }
            panic!("no attempt 2 after 60 s (old leader {old_leader}):\n{why}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        nembo_tests::ms(&second.attempts[0].end_time)
            <= nembo_tests::ms(&second.attempts[1].start_time)
    );
    // Attempt 2 checkpoints; then the old leader and the node come back,
    // and the old attempt must be gone.
    wait_for(
        "attempt 2 to checkpoint",
        Duration::from_secs(30),
        || async { newest_manifest(&store, &id).filter(|(e, _)| *e == 2) },
    )
    .await;
    signal(nix::sys::signal::Signal::SIGCONT);
    cl.resume(old_leader);
    wait_for(
        "the resurfaced attempt to be killed",
        Duration::from_secs(30),
        || async { (!nembo_tests::alive(pgid)).then_some(()) },
    )
    .await;
    let done = wait_for("the job to finish", Duration::from_secs(60), || async {
        jobs()
            .await?
            .into_iter()
            .find(|j| j.job_id == id && j.state == pb::JobState::Succeeded as i32)
    })
    .await;
    assert_eq!(done.attempts.len(), 2, "{:?}", done.attempts);
    let mut manifests: Vec<(i64, u32)> =
        std::fs::read_dir(store.join(format!("job-{id}/manifests")))
            .unwrap()
            .flatten()
            .map(|e| {
                let m: Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
                (
                    m["at_ms"].as_i64().unwrap(),
                    m["epoch"].as_u64().unwrap() as u32,
                )
            })
            .collect();
    manifests.sort();
    assert!(
        manifests.windows(2).all(|w| w[0].1 <= w[1].1),
        "an older attempt checkpointed after a newer one: {manifests:?}"
    );
    // Release the nodes: their agents would outlive the cluster.
    let mut c = cl.client();
    let down = c.down(pb::DownRequest {
        node_ids: Vec::new(),
        all: true,
    });
    let _ = tokio::time::timeout(Duration::from_secs(5), down).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// The coordinators count a preempted node gone at its deadline and start
/// the job elsewhere. An attempt that does not exit on the checkpoint
/// signal (or was placed on the node as the notice came, and never heard
/// it: the hour-long soak's case) must be gone by then, or two attempts of
/// one job run at once until the cloud takes the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_ignores_the_notice_is_stopped_before_the_deadline() {
    let (c, dir) = start().await;
    let pid_file = dir.path().join("attempt-1.pid");
    let id = submit_managed(
        &c,
        dir.path(),
        &format!(
            "resources: {{accelerators: H100:1, use_spot: true, infra: local}}\nrun: |\n  trap 'echo told, staying' USR1\n  if [ \"$NEMBO_ATTEMPT\" = 1 ]; then echo $$ > {pid}; fi\n  echo attempt $NEMBO_ATTEMPT up\n  while :; do sleep 0.2; done\n",
            pid = pid_file.display()
        ),
    );
    let first = running(&c, &id, 1, "attempt 1 up").await;
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let noticed = std::time::Instant::now();
    let out = c.cli(&[
        "local",
        "preempt",
        &first.node_ids[0],
        "--format",
        "aws",
        "--in",
        "8s",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "the job to hear the notice",
        Duration::from_secs(8),
        || async {
            c.logs_so_far(&id)
                .await
                .contains("told, staying")
                .then_some(())
        },
    )
    .await;
    // It stays past the signal; it is stopped before the deadline.
    wait_for(
        "attempt 1 to be stopped",
        Duration::from_secs(8),
        || async { (!nembo_tests::alive(pid)).then_some(()) },
    )
    .await;
    assert!(
        noticed.elapsed() < Duration::from_millis(7_900),
        "stopped only after the deadline: {:?}",
        noticed.elapsed()
    );
    let second = running(&c, &id, 2, "attempt 2 up").await;
    assert!(
        second.attempts[0].message.contains("deadline"),
        "{:?}",
        second.attempts[0]
    );
    c.cli(&["cancel", &id]);
}
