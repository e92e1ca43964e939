//! Three coordinator processes on loopback: crashes, lost quorum, catch-up.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nembo_proto::client::{call, Client};
use nembo_proto::v1 as pb;
use nembo_tests::history::{client_loop, full_list, submit_req, History};
use nembo_tests::{wait_for, Cluster};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Submits through any member, retrying while the cluster is unavailable.
async fn submit(c: &Client, key: &str) -> Result<String, tonic::Status> {
    call(c, submit_req(key), |mut c, r| async move {
        c.submit_job(r).await
    })
    .await
    .map(|r| r.job_id)
}

/// Adds member `id` (started with --join) at its URL; its status once promoted.
async fn add_member(cluster: &Cluster, client: &Client, id: u64) -> pb::ClusterStatus {
    let req = pb::AddMemberRequest {
        id,
        url: cluster.urls[id as usize - 1].clone(),
    };
    call(client, req, |mut c, r| async move { c.add_member(r).await })
        .await
        .unwrap()
        .status
        .unwrap()
}

async fn all_jobs(c: &Client) -> Vec<pb::Job> {
    let r = call(
        c,
        full_list(),
        |mut c, r| async move { c.list_jobs(r).await },
    )
    .await
    .unwrap();
    assert!(r.next_page_token.is_empty(), "more jobs than one page");
    r.jobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_load_loses_no_acknowledged_submit() {
    // max-nodes 0: jobs stay pending; this is about the control plane.
    let mut cluster = Cluster::start(3, &["--max-nodes", "0"]).await;
    let client = cluster.client();
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("k{i}");
                // Retry the same key until it is acknowledged: its fate may be
                // unknown across the leader change, the key makes it safe.
                loop {
                    match submit(&client, &key).await {
                        Ok(id) => {
                            acked.lock().unwrap().insert(key.clone(), id);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                i += 1;
            }
        })
    };
    wait_for("some acknowledged submits", SECS(20), || {
        let n = acked.lock().unwrap().len();
        async move { (n >= 30).then_some(()) }
    })
    .await;
    let old = cluster.leader().await;
    cluster.kill9(old);
    let before_kill = acked.lock().unwrap().len();
    wait_for("submits to resume through the survivors", SECS(20), || {
        let n = acked.lock().unwrap().len();
        async move { (n >= before_kill + 30).then_some(()) }
    })
    .await;
    let new = cluster.leader().await;
    assert_ne!(new, old);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();

    let acked = acked.lock().unwrap().clone();
    let jobs = all_jobs(&cluster.client()).await;
    let by_key: BTreeMap<String, String> = jobs
        .iter()
        .map(|j| (j.idempotency_key.clone(), j.job_id.clone()))
        .collect();
    assert_eq!(
        by_key.len(),
        jobs.len(),
        "one job per key: a retried submit never doubled"
    );
    for (key, id) in &acked {
        assert_eq!(
            by_key.get(key),
            Some(id),
            "acknowledged {key} -> job {id} is missing"
        );
    }

    // The killed member comes back from its disk and catches up.
    cluster.restart(old);
    let leader_applied = cluster.status(new).await.unwrap().applied_index;
    cluster
        .wait_applied(old, leader_applied, "the restarted member to catch up")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_partition_cannot_commit_and_the_old_leaders_clients_are_redirected() {
    let cluster = Cluster::start(3, &["--max-nodes", "0"]).await;
    let client = cluster.client();
    submit(&client, "before").await.unwrap();
    let leader = cluster.leader().await;
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    // Cut the leader off from both followers: it is a minority of one.
    cluster.pause(others[0]);
    cluster.pause(others[1]);
    let mut lone = cluster.member_client(leader).await.unwrap();
    let attempt = tokio::time::timeout(SECS(4), lone.submit_job(submit_req("lonely"))).await;
    assert!(
        !matches!(attempt, Ok(Ok(_))),
        "a single member of three must not acknowledge a write"
    );
    // Heal; the key is safe to retry whatever became of the first attempt.
    cluster.resume(others[0]);
    cluster.resume(others[1]);
    let id = wait_for("a write to commit with a majority", SECS(20), || {
        let c = client.clone();
        async move { submit(&c, "lonely").await.ok() }
    })
    .await;
    let jobs = all_jobs(&client).await;
    assert_eq!(
        jobs.iter()
            .filter(|j| j.idempotency_key == "lonely")
            .count(),
        1
    );
    assert!(jobs.iter().any(|j| j.job_id == id));

    // Now the other way round: the leader is cut off, the majority elects a
    // new one and takes writes, then the old leader comes back believing it
    // still leads. Its clients are redirected: their writes land on the new
    // leader, and their reads are not stale.
    let old = cluster.leader().await;
    let mut old_client = cluster.member_client(old).await.unwrap();
    cluster.pause(old);
    let new = wait_for("the majority to elect a new leader", SECS(20), || {
        let c = &cluster;
        async move {
            for id in (1..=3).filter(|id| *id != old) {
                let s = c.status(id).await?;
                if s.leader_id != 0 && s.leader_id != old {
                    return Some(s.leader_id);
                }
            }
            None
        }
    })
    .await;
    let during = submit(&client, "while-cut-off").await.unwrap();
    cluster.resume(old);
    let read = old_client
        .list_jobs(full_list())
        .await
        .expect("a read through the old leader");
    assert!(
        read.into_inner().jobs.iter().any(|j| j.job_id == during),
        "a read through the old leader saw the write made while it was cut off"
    );
    let after = old_client
        .submit_job(submit_req("through-the-old-leader"))
        .await
        .expect("a write through the old leader is redirected")
        .into_inner()
        .job_id;
    let s = cluster.status(new).await.unwrap();
    assert_eq!(s.leader_id, new, "the new leader kept its place");
    assert!(all_jobs(&client).await.iter().any(|j| j.job_id == after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_the_compacted_log_catches_up_from_a_snapshot() {
    let mut cluster = Cluster::start(3, &["--max-nodes", "0", "--snapshot-every", "5"]).await;
    let client = cluster.client();
    for i in 0..20 {
        submit(&client, &format!("s{i}")).await.unwrap();
    }
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    cluster.kill9(follower);
    for i in 20..30 {
        submit(&client, &format!("s{i}")).await.unwrap();
    }
    let target = cluster.status(leader).await.unwrap();
    assert!(
        target.snapshot_index > 0,
        "the leader compacted its log: {target:?}"
    );
    // Its log ends before the leader's first entry: only a snapshot helps.
    cluster.restart(follower);
    let caught_up = cluster
        .wait_applied(
            follower,
            target.applied_index,
            "the lagging member to catch up",
        )
        .await;
    assert!(
        caught_up.snapshot_index > 0,
        "it caught up through a snapshot: {caught_up:?}"
    );
    // And it serves: writes through it land (forwarded to the leader).
    let via = cluster.member_client(follower).await.unwrap();
    submit(&via, "after").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_lost_its_disk_rejoins_empty_and_catches_up_from_a_snapshot() {
    let mut cluster = Cluster::start(3, &["--max-nodes", "0", "--snapshot-every", "40"]).await;
    let client = cluster.client();
    // 200 KiB scripts: the state (about 17 MiB) is larger than any one peer
    // message may be, so the snapshot can only arrive in chunks.
    let filler = "#".repeat(200 * 1024);
    for i in 0..85 {
        let key = format!("d{i}");
        let req = pb::SubmitJobRequest {
            task: Some(pb::submit_job_request::Task::TaskYaml(format!(
                "name: {key}\nrun: |\n  echo {key}\n  {filler}\n"
            ))),
            idempotency_key: key,
            ..Default::default()
        };
        call(
            &client,
            req,
            |mut c, r| async move { c.submit_job(r).await },
        )
        .await
        .unwrap();
    }
    let leader = cluster.leader().await;
    let lost = (1..=3).find(|id| *id != leader).unwrap();
    // Its disk is gone. It forgot its votes, so it may not simply come back
    // as the voter it was: remove it, start it empty waiting to be added
    // (--join), add it again. It starts from the leader's snapshot.
    cluster.kill9(lost);
    let req = pb::RemoveMemberRequest { id: lost };
    call(
        &client,
        req,
        |mut c, r| async move { c.remove_member(r).await },
    )
    .await
    .unwrap()
    .status
    .unwrap();
    for i in 85..90 {
        submit(&client, &format!("d{i}")).await.unwrap();
    }
    cluster.restart_empty_as_joiner(lost);
    let status = add_member(&cluster, &client, lost).await;
    assert!(
        status.members.iter().any(|m| m.id == lost && !m.is_learner),
        "{status:?}"
    );
    let target = cluster.status(cluster.leader().await).await.unwrap();
    let back = cluster
        .wait_applied(lost, target.applied_index, "the emptied member to catch up")
        .await;
    assert!(
        back.snapshot_index > 0,
        "it started from a snapshot: {back:?}"
    );
    let log = std::fs::read_to_string(cluster.root.path().join(format!("member-{lost}.log")))
        .unwrap_or_default();
    let received: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("received snapshot"))
        .filter_map(|l| {
            l.split("bytes=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        received
            .iter()
            .any(|b| *b > nembo_coordinator::replication::peer::MAX_PEER_MESSAGE as u64),
        "a snapshot larger than one peer message arrived (in chunks): {received:?}"
    );
    // It holds every job, and can lead.
    let req = pb::TransferLeaderRequest { id: lost };
    let status = call(&client, req, |mut c, r| async move {
        c.transfer_leader(r).await
    })
    .await
    .unwrap()
    .status
    .unwrap();
    assert_eq!(status.leader_id, lost);
    let mut via = cluster.member_client(lost).await.unwrap();
    let jobs = via.list_jobs(full_list()).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.len(), 90);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_carries_on_when_the_leader_dies() {
    let mut cluster = Cluster::start(3, &[]).await;
    let task = cluster.root.path().join("long.yaml");
    std::fs::write(
        &task,
        "run: |\n  for i in 1 2 3 4 5 6; do echo tick $i; sleep 0.4; done\n",
    )
    .unwrap();
    let api = cluster.api_info();
    let launch = std::process::Command::new(nembo_tests::bin("nembo"))
        .arg("launch")
        .arg(&task)
        .env("NEMBO_API_INFO", &api)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let client = cluster.client();
    wait_for("the job to run", SECS(20), || {
        let c = client.clone();
        async move {
            let req = pb::GetJobRequest { job_id: "1".into() };
            let j = call(&c, req, |mut c, r| async move { c.get_job(r).await })
                .await
                .ok()?
                .job?;
            (j.state == pb::JobState::Running as i32).then_some(())
        }
    })
    .await;
    let leader = cluster.leader().await;
    cluster.kill9(leader);
    let out = tokio::task::spawn_blocking(move || launch.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ticks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("tick")).collect();
    assert_eq!(
        ticks,
        ["tick 1", "tick 2", "tick 3", "tick 4", "tick 5", "tick 6"],
        "{stdout}"
    );
    // `nembo status` answers through the survivors.
    let status = std::process::Command::new(nembo_tests::bin("nembo"))
        .arg("status")
        .env("NEMBO_API_INFO", &api)
        .output()
        .unwrap();
    assert!(status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("SUCCEEDED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_linearizable_by_default_and_stale_on_request() {
    let mut cluster = Cluster::start(3, &["--max-nodes", "0"]).await;
    let leader = cluster.leader().await;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    // A write through one follower is seen at once through the other.
    let mut a = cluster.member_client(followers[0]).await.unwrap();
    let mut b = cluster.member_client(followers[1]).await.unwrap();
    for i in 0..5 {
        let id = a
            .submit_job(submit_req(&format!("r{i}")))
            .await
            .unwrap()
            .into_inner()
            .job_id;
        let job = b
            .get_job(pb::GetJobRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        assert_eq!(job.job_id, id);
    }
    // Without a majority no member can prove its reads are current...
    cluster.kill9(followers[0]);
    cluster.kill9(followers[1]);
    let mut lone = cluster.member_client(leader).await.unwrap();
    let fresh = tokio::time::timeout(SECS(6), lone.list_jobs(full_list())).await;
    assert!(
        !matches!(fresh, Ok(Ok(_))),
        "a linearizable read needs a quorum"
    );
    // ...but a stale read is answered from the member's own state.
    let mut req = tonic::Request::new(full_list());
    req.metadata_mut().insert(
        "nembo-stale",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let jobs = lone.list_jobs(req).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_is_replaced_through_add_and_remove() {
    let mut cluster = Cluster::start(3, &["--max-nodes", "0"]).await;
    let client = cluster.client();
    for i in 0..10 {
        submit(&client, &format!("m{i}")).await.unwrap();
    }
    // A fourth member joins: learner, catches up from a snapshot, promoted.
    let new = cluster.spawn_joiner();
    let status = add_member(&cluster, &client, new).await;
    let voters: Vec<u64> = status
        .members
        .iter()
        .filter(|m| !m.is_learner)
        .map(|m| m.id)
        .collect();
    assert_eq!(voters.len(), 4, "{status:?}");
    assert!(voters.contains(&new));
    // Retire member 1, handing leadership over first if it leads.
    let old = 1;
    if cluster.leader().await == old {
        let req = pb::TransferLeaderRequest { id: 2 };
        call(&client, req, |mut c, r| async move {
            c.transfer_leader(r).await
        })
        .await
        .unwrap();
    }
    let req = pb::RemoveMemberRequest { id: old };
    let status = call(
        &client,
        req,
        |mut c, r| async move { c.remove_member(r).await },
    )
    .await
    .unwrap()
    .status
    .unwrap();
    assert!(status.members.iter().all(|m| m.id != old), "{status:?}");
    cluster.kill9(old);
    // The cluster of 2, 3 and the new member commits, and the new member
    // holds everything.
    for i in 10..15 {
        submit(&client, &format!("m{i}")).await.unwrap();
    }
    let mut via_new = cluster.member_client(new).await.unwrap();
    let mut req = tonic::Request::new(full_list());
    req.metadata_mut().insert(
        "nembo-stale",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    wait_for("the new member to hold every job", SECS(10), || {
        let mut c = via_new.clone();
        async move {
            let mut req = tonic::Request::new(full_list());
            req.metadata_mut().insert(
                "nembo-stale",
                tonic::metadata::MetadataValue::from_static("true"),
            );
            let n = c.list_jobs(req).await.ok()?.into_inner().jobs.len();
            (n == 15).then_some(())
        }
    })
    .await;
    // And it can lead: the others step aside.
    let req = pb::TransferLeaderRequest { id: new };
    let status = call(&client, req, |mut c, r| async move {
        c.transfer_leader(r).await
    })
    .await
    .unwrap()
    .status
    .unwrap();
    assert_eq!(status.leader_id, new);
    assert!(via_new.list_jobs(full_list()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_up_with_three_coordinators_launches_and_local_down_stops_everything() {
    let home = tempfile::tempdir().unwrap();
    let nembo = |args: &[&str]| {
        std::process::Command::new(nembo_tests::bin("nembo"))
            .args(args)
            .env("NEMBO_HOME", home.path())
            .env("NEMBO_AGENT_BIN", nembo_tests::bin("nembo-agent"))
            .env(
                "NEMBO_COORDINATOR_BIN",
                nembo_tests::bin("nembo-coordinator"),
            )
            .output()
            .unwrap()
    };
    let up = nembo(&["local", "up", "--coordinators", "3"]);
    assert!(up.status.success(), "{up:?}");
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.path().join("cluster/api.json")).unwrap())
            .unwrap();
    let pids: Vec<i32> = info["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_i64().unwrap() as i32)
        .collect();
    assert_eq!(pids.len(), 3);
    let task = home.path().join("t.yaml");
    std::fs::write(&task, "run: echo from-the-cluster\n").unwrap();
    let launch = nembo(&["launch", task.to_str().unwrap()]);
    assert!(launch.status.success(), "{launch:?}");
    assert!(String::from_utf8_lossy(&launch.stdout).contains("from-the-cluster"));
    let members = nembo(&["admin", "members", "list"]);
    assert_eq!(
        String::from_utf8_lossy(&members.stdout)
            .matches("https://")
            .count(),
        3
    );
    let down = nembo(&["local", "down"]);
    assert!(down.status.success(), "{down:?}");
    wait_for("every coordinator to exit", SECS(10), || {
        let gone = pids.iter().all(|p| !nembo_tests::alive(*p));
        async move { gone.then_some(()) }
    })
    .await;
}

/// One client of the linearizability test: submits (retried with the same
/// key until answered), cancels and reads, each recorded in `history`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_histories_stay_linearizable_across_kills_and_partitions() {
    let mut cluster = Cluster::start(3, &["--max-nodes", "0"]).await;
    let history: Arc<Mutex<History>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|me| {
            // Two clients over every member, two pinned to one member each
            // (they reach the leader only through forwarding).
            let client = if me < 2 {
                cluster.client()
            } else {
                nembo_proto::client::connect_any(
                    &cluster.urls[me - 1..me],
                    &cluster.ca(),
                    &cluster.token(),
                )
                .unwrap()
            };
            // Rests keep the history small enough to search, big enough to matter.
            tokio::spawn(client_loop(
                client,
                history.clone(),
                me,
                stop.clone(),
                Duration::from_millis(20),
                1,
            ))
        })
        .collect();
    let settle = || tokio::time::sleep(Duration::from_millis(1500));
    settle().await;
    // kill -9 the leader, bring it back from its disk.
    let leader = cluster.leader().await;
    cluster.kill9(leader);
    settle().await;
    cluster.restart(leader);
    settle().await;
    // Partition the (new) leader away, then heal.
    let leader = cluster.leader().await;
    cluster.pause(leader);
    settle().await;
    cluster.resume(leader);
    settle().await;
    // Partition a follower away, then heal.
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    cluster.pause(follower);
    settle().await;
    cluster.resume(follower);
    settle().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        tokio::time::timeout(SECS(30), c)
            .await
            .expect("every client finished its last operation")
            .unwrap();
    }
    let history = history.lock().unwrap().clone();
    eprintln!(
        "{} completed operations, {} answered only after a retry",
        history.completed(),
        history.unknown()
    );
    assert!(history.completed() > 50, "too little happened to judge");
    history
        .check_linearizable()
        .unwrap_or_else(|e| panic!("{e}"));
}
