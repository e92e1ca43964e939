//! Providers, the optimizer and capacity failover, end to end: a real
//! coordinator, the simulated cloud with real agents, the real CLI.

use std::time::Duration;

use nembo_proto::v1 as pb;
use nembo_tests::{wait_for, Coordinator};
use serde_json::Value;

/// Six regions selling the same 1 x H100 machine; the five cheapest have no
/// capacity. Region r6 is the dearest and the only one that can launch.
const SIX_REGIONS: &str = r#"{
  "seed": 7,
  "regions": [
    {"name": "r1", "price_factor": 1.0, "capacity": 0},
    {"name": "r2", "price_factor": 1.1, "capacity": 0},
    {"name": "r3", "price_factor": 1.2, "capacity": 0},
    {"name": "r4", "price_factor": 1.3, "capacity": 0},
    {"name": "r5", "price_factor": 1.4, "capacity": 0},
    {"name": "r6", "price_factor": 2.0}
  ],
  "instance_types": [
    {"name": "sim-h100-1", "accelerator": "H100", "accelerator_count": 1,
     "cpus": 24, "memory_gb": 240, "price": 2.0, "spot_price": 0.8}
  ],
  "agents": true
}"#;

/// A coordinator offering `cloud` beside the local provider (the file's
/// dir is returned: it must outlive nothing but the start).
async fn start(cloud: &str) -> (Coordinator, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.json");
    std::fs::write(&path, cloud).unwrap();
    let path = path.to_str().unwrap().to_string();
    let c = Coordinator::start(&["--sim-cloud", &path, "--reconcile-ms", "300"]).await;
    (c, dir)
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_fails_over_across_five_full_regions_to_the_sixth_and_runs() {
    let (c, _cloud) = start(SIX_REGIONS).await;
    let task = c.dir.path().join("train.yaml");
    std::fs::write(
        &task,
        "name: train\nresources: {accelerators: H100:1, infra: sim}\nrun: echo trained on $SKYPILOT_NUM_GPUS_PER_NODE gpu\n",
    )
    .unwrap();

    // The dry run ranks the six places cheapest first and picks r1.
    let out = c.cli(&["launch", "--dry-run", "--json", task.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let regions: Vec<&str> = v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["region"].as_str().unwrap())
        .collect();
    assert_eq!(regions, ["r1", "r2", "r3", "r4", "r5", "r6"]);
    assert_eq!(v["placement"]["region"], "r1");
    assert_eq!(v["placement"]["hourly_price"], 2.0);
    let table = stdout(&c.cli(&["launch", "--dry-run", task.to_str().unwrap()]));
    assert!(
        table.contains("PROVIDER") && table.contains("-> "),
        "{table}"
    );

    // The launch walks r1..r5 (each refuses), runs in r6, and says so.
    let out = c.cli(&["launch", task.to_str().unwrap()]);
    let progress = stderr(&out);
    assert!(out.status.success(), "{progress}");
    assert!(
        stdout(&out).contains("trained on 1 gpu"),
        "{}",
        stdout(&out)
    );
    for r in ["r1", "r2", "r3", "r4", "r5"] {
        let place = format!("sim/{r}/sim-h100-1");
        assert!(
            progress.contains(&format!("trying 1 x {place}")),
            "{r} not tried:\n{progress}"
        );
        assert!(
            progress.contains(&format!("{place}: no capacity")),
            "{r} refusal not shown:\n{progress}"
        );
    }
    assert!(
        progress.contains("trying 1 x sim/r6/sim-h100-1 at $4.00/h"),
        "{progress}"
    );
    let jobs = c.jobs().await;
    let job = &jobs[0];
    assert_eq!(job.state, pb::JobState::Succeeded as i32);
    let tried: Vec<&str> = job
        .provision_tries
        .iter()
        .map(|t| t.place.as_str())
        .collect();
    assert_eq!(tried.len(), 6, "{tried:?}");
    assert_eq!(tried[5], "sim/r6/sim-h100-1");
    let nodes = c.nodes().await;
    let ran = nodes.iter().find(|n| n.node_id == job.node_ids[0]).unwrap();
    assert_eq!(ran.region, "r6");
    assert_eq!(ran.hourly_price, 4.0);

    // show-gpus: every sim H100 offering, cheapest first, spot priced.
    let out = c.cli(&["show-gpus", "H100:1", "--cloud", "sim", "--spot", "--json"]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let spot: Vec<f64> = v["offerings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["spot_price"].as_f64().unwrap())
        .collect();
    assert_eq!(spot.len(), 6);
    assert!(spot.windows(2).all(|w| w[0] <= w[1]), "{spot:?}");
    let table = stdout(&c.cli(&["show-gpus", "H100"]));
    assert!(table.lines().next().unwrap().starts_with("GPUS"), "{table}");
    assert!(
        table.contains("sim-h100-1") && table.contains("local-h100-8"),
        "{table}"
    );

    // check: both providers usable; those providers.yaml leaves off say how to enable them.
    let out = c.cli(&["check", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let ok: Vec<(&str, bool)> = v["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["provider"].as_str().unwrap(), p["ok"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        ok,
        [
            ("local", true),
            ("sim", true),
            ("aws", false),
            ("seeweb", false),
            ("ssh", false)
        ]
    );
    assert!(v["providers"][2]["message"]
        .as_str()
        .unwrap()
        .contains("providers.yaml"));

    // cost-report: the r6 node is billed at $4/h for the time it has run.
    let out = c.cli(&["cost-report", "--json"]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let billed = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == ran.node_id.as_str())
        .unwrap_or_else(|| panic!("{v}"))
        .clone();
    assert_eq!(billed["hourly_price"], 4.0);
    assert!(billed["cost"].as_f64().unwrap() > 0.0, "{billed}");
    assert!(v["jobs"][0]["cost"].as_f64().unwrap() > 0.0, "{v}");
    // The five refused launches cost nothing.
    assert_eq!(v["nodes"].as_array().unwrap().len(), 1, "{v}");

    // down: the provider terminates the instance; status shows it gone.
    let out = c.cli(&["down", &ran.node_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(
        "the node to be terminated",
        Duration::from_secs(10),
        || async {
            let nodes = c.try_nodes().await?;
            nodes
                .iter()
                .any(|n| n.node_id == ran.node_id && n.state == pb::NodeState::Terminated as i32)
                .then_some(())
        },
    )
    .await;
    let agent_pid = c
        .dir
        .path()
        .join("nodes")
        .join(&ran.node_id)
        .join("agent.pid");
    assert!(!agent_pid.exists(), "the node's agent is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_place_full_the_job_fails_naming_them() {
    let (c, _cloud) = start(&SIX_REGIONS.replace(
        r#"{"name": "r6", "price_factor": 2.0}"#,
        r#"{"name": "r6", "price_factor": 2.0, "capacity": 0}"#,
    ))
    .await;
    let job = c
        .submit("resources: {accelerators: H100:1, infra: sim}\nrun: echo never\n")
        .await;
    let j = c
        .wait_state(&job, pb::JobState::Failed, Duration::from_secs(20))
        .await;
    assert!(
        j.message.starts_with("no capacity in any place that fits"),
        "{}",
        j.message
    );
    for r in ["r1", "r6"] {
        assert!(
            j.message.contains(&format!("sim/{r}/sim-h100-1")),
            "{}",
            j.message
        );
    }
    assert_eq!(j.provision_tries.len(), 6);
    // The dry run now shows no candidate: every place is cooling down.
    let r = c
        .client()
        .await
        .dry_run(pb::DryRunRequest {
            task: Some(pb::dry_run_request::Task::TaskYaml(
                "resources: {accelerators: H100:1, infra: sim}\nrun: x\n".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.candidates.is_empty(), "{:?}", r.candidates);
    assert!(r.placement.is_none());
}

/// A launch whose agent never enrolls is given up after the provision
/// timeout; the instance it left at the provider is found and terminated
/// by the leader's reconciler within two periods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_no_node_wants_is_terminated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.json");
    std::fs::write(
        &path,
        SIX_REGIONS
            .replace(r#""agents": true"#, r#""agents": false"#)
            .replace(r#", "capacity": 0"#, ""),
    )
    .unwrap();
    let c = Coordinator::start(&[
        "--sim-cloud",
        path.to_str().unwrap(),
        "--reconcile-ms",
        "300",
        "--provision-timeout-ms",
        "500",
    ])
    .await;
    let job = c
        .submit("resources: {accelerators: H100:1, infra: sim}\nrun: echo x\n")
        .await;
    let j = c
        .wait_state(&job, pb::JobState::Failed, Duration::from_secs(20))
        .await;
    assert!(j.message.contains("did not enroll"), "{}", j.message);
    let held = |c: &Coordinator| {
        let out = c.cli(&["check", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["providers"][1]["message"].as_str().unwrap().to_string()
    };
    let failed_at = std::time::Instant::now();
    wait_for(
        "the leaked instance to be terminated",
        Duration::from_secs(5),
        || async { held(&c).contains(" 0 instances held").then_some(()) },
    )
    .await;
    assert!(failed_at.elapsed() < Duration::from_secs(3));
}
