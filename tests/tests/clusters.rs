//! Named clusters end to end, as a SkyPilot user works: `launch -c`, a few
//! `exec`s, `stop`, `start`, `down`, autostop and autodown, on real
//! coordinators and real agent processes (the local provider's simulated
//! shapes, priced so that the cost report has something to count).

use std::process::Output;
use std::time::Duration;

use nembo_proto::v1 as pb;
use nembo_tests::{wait_for, Cluster, Coordinator};
use serde_json::Value;

const PROVIDERS: &str = "local:\n  simulate: true\n  cpu_hourly: 36.0\n";

fn out(o: &Output) -> (bool, String, String) {
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

async fn start(extra: &[&str]) -> (Coordinator, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("providers.yaml");
    std::fs::write(&path, PROVIDERS).unwrap();
    let mut args = vec!["--providers", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let c = Coordinator::start(&args).await;
    (c, dir)
}

fn cluster_json(c: &Coordinator, name: &str) -> Option<Value> {
    let (ok, stdout, _) = out(&c.cli(&["status", name, "--json"]));
    if !ok {
        return None;
    }
    let v: Value = serde_json::from_str(&stdout).ok()?;
    v["clusters"].as_array()?.first().cloned()
}

fn cluster_state(c: &Coordinator, name: &str) -> Option<String> {
    cluster_json(c, name).map(|v| v["state"].as_str().unwrap_or_default().to_string())
}

fn cost(c: &Coordinator, name: &str) -> f64 {
    cluster_json(c, name).unwrap()["cost"].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_exec_stop_start_and_down_a_named_cluster() {
    let (c, dir) = start(&[]).await;
    let task = dir.path().join("task.yaml");
    std::fs::write(
        &task,
        "resources: {cpus: 2+}\nsetup: echo SETUP-RAN\nrun: echo rank=$SKYPILOT_NODE_RANK nodes=$SKYPILOT_NUM_NODES\n",
    )
    .unwrap();
    let task = task.to_str().unwrap();
    let (ok, stdout, stderr) = out(&c.cli(&["launch", "-c", "dev", task]));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("SETUP-RAN") && stdout.contains("rank=0 nodes=1"),
        "{stdout}"
    );
    let v = cluster_json(&c, "dev").expect("dev listed");
    assert_eq!(v["state"], "UP", "{v}");
    let node = v["node_ids"][0].as_str().unwrap().to_string();

    // Three execs: same node, no setup, in order.
    for i in 0..3 {
        let (ok, stdout, stderr) = out(&c.cli(&["exec", "dev", task]));
        assert!(ok, "exec {i}: {stderr}");
        assert!(stdout.contains("rank=0"), "{stdout}");
        assert!(!stdout.contains("SETUP-RAN"), "exec skips setup: {stdout}");
        let (ok, stdout, _) = out(&c.cli(&["exec", "dev", "echo inline-$SKYPILOT_NODE_RANK"]));
        assert!(ok && stdout.contains("inline-0"), "{stdout}");
    }
    let nodes: Vec<pb::Node> = c.nodes().await;
    assert_eq!(nodes.len(), 1, "exec never provisions: {nodes:?}");
    // launch on the existing cluster runs setup again, unless told not to.
    let (ok, stdout, stderr) = out(&c.cli(&["launch", "-c", "dev", "--no-setup", task]));
    assert!(
        ok && !stdout.contains("SETUP-RAN") && stdout.contains("rank=0"),
        "{stdout}{stderr}"
    );
    let (_, queue, _) = out(&c.cli(&["queue", "dev", "--json"]));
    let q: Value = serde_json::from_str(&queue).unwrap();
    assert_eq!(q["jobs"].as_array().unwrap().len(), 8, "{queue}");

    // A task that does not fit is refused, naming the difference.
    let (ok, _, stderr) = out(&c.cli(&["exec", "dev", "--gpus", "H100:8", "nvidia-smi"]));
    assert!(
        !ok && stderr.contains("do not match the existing cluster"),
        "{stderr}"
    );

    // Stop: the agent process ends, the node dir stays, billing pauses.
    let pid = c.agent_pid(&node);
    let (ok, _, stderr) = out(&c.cli(&["stop", "dev", "-y"]));
    assert!(ok, "{stderr}");
    assert_eq!(cluster_state(&c, "dev").as_deref(), Some("STOPPED"));
    assert!(
        !nembo_tests::alive(pid),
        "the agent of a stopped node is gone"
    );
    let stopped_cost = cost(&c, "dev");
    assert!(stopped_cost > 0.0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        cost(&c, "dev"),
        stopped_cost,
        "a stopped cluster costs nothing more"
    );
    let (ok, _, stderr) = out(&c.cli(&["exec", "dev", "true"]));
    assert!(!ok && stderr.contains("is stopped"), "{stderr}");
    // --refresh asks the provider: the node's agent is gone, its directory kept.
    let (ok, stdout, _) = out(&c.cli(&["status", "dev", "--refresh", "--json"]));
    assert!(
        ok && stdout.contains("local says stopped (no agent"),
        "{stdout}"
    );

    // Start: the same node comes back with its identity; exec works again.
    let (ok, _, stderr) = out(&c.cli(&["start", "dev"]));
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr) = out(&c.cli(&["exec", "dev", "echo back-on-$SKYPILOT_NODE_RANK"]));
    assert!(ok && stdout.contains("back-on-0"), "{stdout}{stderr}");
    assert_eq!(
        cluster_json(&c, "dev").unwrap()["node_ids"][0].as_str(),
        Some(node.as_str())
    );
    assert!(cost(&c, "dev") > stopped_cost, "billing resumed");

    // autostop from the command line, then cancelled.
    let (ok, stdout, stderr) = out(&c.cli(&["autostop", "dev", "-i", "90s", "--down"]));
    assert!(ok && stdout.contains("90s (down)"), "{stdout}{stderr}");
    let a = &cluster_json(&c, "dev").unwrap()["autostop"];
    assert_eq!(
        (a["idle_seconds"].as_u64(), a["down"].as_bool()),
        (Some(90), Some(true))
    );
    let (ok, _, stderr) = out(&c.cli(&["autostop", "dev", "--cancel"]));
    assert!(ok, "{stderr}");
    assert!(cluster_json(&c, "dev").unwrap()["autostop"].is_null());

    // The cost report names the cluster.
    let (ok, stdout, _) = out(&c.cli(&["cost-report", "--json"]));
    assert!(ok && stdout.contains("\"cluster\": \"dev\""), "{stdout}");

    // Down: gone, its node terminated.
    let (ok, _, stderr) = out(&c.cli(&["down", "dev", "-y"]));
    assert!(ok, "{stderr}");
    assert!(cluster_json(&c, "dev").is_none());
    let n = c.nodes().await;
    assert!(
        n.iter()
            .all(|n| n.state == pb::NodeState::Terminated as i32),
        "{n:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_without_a_name_makes_one_up_and_viewers_cannot_touch_clusters() {
    let (c, _dir) = start(&[]).await;
    let (ok, _, stderr) = out(&c.cli(&["launch", "echo hi"]));
    assert!(ok, "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("Cluster nembo-"))
        .unwrap_or_else(|| panic!("{stderr}"));
    let name = line
        .trim_start_matches("Cluster ")
        .split_whitespace()
        .next()
        .unwrap();
    assert!(name.ends_with("-root"), "{name}");
    assert_eq!(cluster_state(&c, name).as_deref(), Some("UP"));
    // The coordinators' default autostop applies: an hour.
    assert_eq!(
        cluster_json(&c, name).unwrap()["autostop"]["idle_seconds"],
        3600
    );

    let out_ = c.cli(&["admin", "users", "create", "vera", "--role", "viewer"]);
    let viewer = String::from_utf8_lossy(&out_.stdout).trim().to_string();
    let mut client = c.client_with_token(&viewer).await;
    let e = client
        .stop_cluster(pb::StopClusterRequest { name: name.into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let listed = client
        .list_clusters(pb::ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.clusters.len(), 1);

    // A user's `down -a` tears down its own clusters only (it has none here).
    let u = c.cli(&["admin", "users", "create", "ulla", "--role", "user"]);
    let token = c.dir.path().join("ulla-token");
    nembo_tests::write_private(&token, String::from_utf8_lossy(&u.stdout).trim());
    let out = std::process::Command::new(nembo_tests::bin("nembo"))
        .args(["down", "-a", "-y"])
        .env("NEMBO_API_INFO", c.dir.path().join("api.json"))
        .env("NEMBO_HOME", c.dir.path().join("cli-home"))
        .env("NEMBO_TOKEN_FILE", &token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        cluster_state(&c, name).as_deref(),
        Some("UP"),
        "root's cluster stays"
    );
}

/// Autostop after the last job, autodown, and a cluster a running job keeps
/// up; all counted from replicated state, so a leader killed during the
/// countdown changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autostop_and_autodown_survive_a_leader_crash() {
    let mut cl = Cluster::start(3, &["--heartbeat-ms", "200"]).await;
    let mut client = cl.client();
    let submit = |name: &str, run: &str, idle_s: u64, down: bool| pb::SubmitJobRequest {
        task: Some(pb::submit_job_request::Task::TaskYaml(format!(
            "resources: {{cpus: 2+}}\nrun: {run}\n"
        ))),
        idempotency_key: format!("as-{name}"),
        cluster: name.into(),
        cluster_mode: pb::ClusterMode::Launch as i32,
        autostop: Some(pb::AutostopSetting {
            disabled: false,
            idle_seconds: idle_s,
            down,
            wait_for: String::new(),
        }),
        ..Default::default()
    };
    for (name, run, idle, down) in [
        ("idle", "echo hi", 4, false),
        ("gone", "echo hi", 4, true),
        ("busy", "sleep 12", 2, false),
    ] {
        client
            .submit_job(submit(name, run, idle, down))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let states = |client: &mut nembo_proto::client::Client| {
        let mut client = client.clone();
        async move {
            let r = client
                .list_clusters(pb::ListClustersRequest::default())
                .await
                .ok()?
                .into_inner();
            Some(
                r.clusters
                    .into_iter()
                    .map(|c| (c.name, c.state))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )
        }
    };
    let up = pb::ClusterState::Up as i32;
    wait_for("three clusters up", Duration::from_secs(30), || {
        let mut client = client.clone();
        async move {
            let s = states(&mut client).await?;
            (s.len() == 3 && s.values().all(|v| *v == up)).then_some(())
        }
    })
    .await;
    // Mid-countdown, the leader dies.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let leader = cl.leader().await;
    cl.kill9(leader);
    client = cl.client();
    let stopped = pb::ClusterState::Stopped as i32;
    let s = wait_for(
        "idle stopped and gone torn down",
        Duration::from_secs(40),
        || {
            let mut client = client.clone();
            async move {
                let s = states(&mut client).await?;
                (s.get("idle") == Some(&stopped) && !s.contains_key("gone")).then_some(s)
            }
        },
    )
    .await;
    // The busy cluster is still up while its job runs (12 s).
    assert_eq!(s.get("busy"), Some(&up), "{s:?}");
    wait_for(
        "busy stopped after its job",
        Duration::from_secs(40),
        || {
            let mut client = client.clone();
            async move {
                let s = states(&mut client).await?;
                (s.get("busy") == Some(&stopped)).then_some(())
            }
        },
    )
    .await;
}

/// SkyPilot's autostop hook runs on the cluster, for real, before the stop:
/// a task whose hook writes a file leaves it written once the cluster is
/// STOPPED, and the hook shows in the cluster's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autostop_hook_runs_on_the_cluster_before_it_stops() {
    let (c, dir) = start(&[]).await;
    let marker = dir.path().join("hook-ran");
    let task = dir.path().join("task.yaml");
    std::fs::write(
        &task,
        format!(
            "resources:\n  cpus: 2+\n  autostop:\n    idle_minutes: 2s\n    hook: echo pushed > {}\n    hook_timeout: 60\nrun: echo work\n",
            marker.display()
        ),
    )
    .unwrap();
    let (ok, stdout, stderr) = out(&c.cli(&["launch", "-c", "hooked", task.to_str().unwrap()]));
    assert!(ok && stdout.contains("work"), "{stdout}{stderr}");
    wait_for("the cluster stopped", Duration::from_secs(60), || {
        let state = cluster_state(&c, "hooked");
        async move { (state.as_deref() == Some("STOPPED")).then_some(()) }
    })
    .await;
    let written = std::fs::read_to_string(&marker).expect("the hook ran");
    assert_eq!(written.trim(), "pushed");
    let (ok, queue, stderr) = out(&c.cli(&["queue", "hooked"]));
    assert!(ok && queue.contains("autostop-hook"), "{queue}{stderr}");
}

/// A node stopped past its certificate's end comes back all the same: its
/// agent trades the node token its provider writes at start for a new
/// certificate, for the key it already had (and only that key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_certificate_ran_out_while_stopped_starts_again() {
    let (c, _dir) = start(&["--agent-cert-ttl-s", "10"]).await;
    let (ok, _, stderr) = out(&c.cli(&["launch", "-c", "dev", "echo first"]));
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = out(&c.cli(&["stop", "dev", "-y"]));
    assert!(ok, "{stderr}");
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (ok, _, stderr) = out(&c.cli(&["start", "dev"]));
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr) = out(&c.cli(&["exec", "dev", "echo after-expiry"]));
    assert!(ok && stdout.contains("after-expiry"), "{stdout}{stderr}");
    let node = cluster_json(&c, "dev").unwrap()["node_ids"][0]
        .as_str()
        .unwrap()
        .to_string();
    let log =
        std::fs::read_to_string(c.dir.path().join("nodes").join(&node).join("agent.log")).unwrap();
    // The restarted agent's log (a new one at each start): it enrolled again.
    assert!(log.contains("enrolled node="), "{log}");
}
