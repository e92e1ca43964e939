//! `bench_provision`: provisioning throughput and capacity failover with
//! the simulated cloud. 20 regions sell the same 1 x H100 machine; the 10
//! cheapest have no capacity. `--tasks` (default 1 000) single-GPU tasks
//! are submitted at once to a coordinator; measured: the time until every
//! task has a launched instance, and the provider calls it took (every
//! RunInstances call, refusals included). Prints a table, then JSON.
//!
//! For comparison, SkyPilot's launch-time failover as `skypilot-compat.md`
//! describes it keeps its blocked set per launch, so each launch walks the
//! full regions itself: (full regions + 1) calls per task. That figure is
//! computed from the described behaviour, not measured.
//!
//! `cargo build --release --workspace && target/release/bench_provision`

use std::time::{Duration, Instant};

use nembo_proto::v1 as pb;
use nembo_tests::{cli_arg, Coordinator};
use serde_json::json;

const REGIONS: usize = 20;
const FULL: usize = 10;

#[tokio::main]
async fn main() {
    let tasks = cli_arg("--tasks", 1000) as usize;
    let regions: Vec<String> = (1..=REGIONS)
        .map(|i| {
            // The full regions are the cheapest: the worst case for failover.
            let capacity = if i <= FULL { r#", "capacity": 0"# } else { "" };
            format!(
                r#"{{"name": "r{i:02}", "price_factor": {}{capacity}}}"#,
                1.0 + i as f64 / 100.0
            )
        })
        .collect();
    let cloud = format!(
        r#"{{"seed": 1, "regions": [{}], "instance_types": [{{"name": "sim-h100-1",
            "accelerator": "H100", "accelerator_count": 1, "cpus": 24, "memory_gb": 240,
            "price": 2.0}}]}}"#,
        regions.join(",")
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cloud.json");
    std::fs::write(&path, cloud).expect("cloud file");
    let max_nodes = (tasks * 2).to_string();
    let c = Coordinator::start(&[
        "--sim-cloud",
        path.to_str().unwrap(),
        "--max-nodes",
        &max_nodes,
        "--provision-timeout-ms",
        "3600000",
        "--reconcile-ms",
        "3600000",
    ])
    .await;
    let mut client = c.client().await;
    let t0 = Instant::now();
    for i in 0..tasks {
        client
            .submit_job(pb::SubmitJobRequest {
                task: Some(pb::submit_job_request::Task::TaskYaml(format!(
                    "name: t{i}\nresources: {{accelerators: H100:1, infra: sim}}\nrun: x\n"
                ))),
                ..Default::default()
            })
            .await
            .expect("submit");
    }
    let submitted = t0.elapsed().as_secs_f64();
    let launched = loop {
        let nodes = client
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .expect("nodes")
            .into_inner()
            .nodes;
        let n = nodes.iter().filter(|n| !n.instance_id.is_empty()).count();
        if n >= tasks {
            break nodes;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            panic!("only {n} of {tasks} launched after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let placed_s = t0.elapsed().as_secs_f64();
    let jobs = nembo_tests::all_jobs(&client).await.expect("jobs");
    let calls: u32 = jobs
        .iter()
        .flat_map(|j| &j.provision_tries)
        .map(|t| t.count)
        .sum();
    let refused = jobs
        .iter()
        .flat_map(|j| &j.provision_tries)
        .filter(|t| t.outcome.starts_with("no capacity"))
        .count();
    let in_full = launched
        .iter()
        .filter(|n| !n.instance_id.is_empty())
        .filter(|n| n.region.as_str() <= "r10")
        .count();
    assert_eq!(in_full, 0, "no node may land in a full region");
    let skypilot_calls = tasks * (FULL + 1);
    println!(
        "Provisioning: {tasks} single-GPU tasks, {REGIONS} regions ({FULL} cheapest out of capacity), sim provider"
    );
    println!(
        "{:>14} {:>10} {:>14} {:>10} {:>22}",
        "all placed s", "tasks/s", "provider calls", "refusals", "SkyPilot model calls"
    );
    println!(
        "{:>14.2} {:>10.0} {:>14} {:>10} {:>22}",
        placed_s,
        tasks as f64 / placed_s,
        calls,
        refused,
        skypilot_calls
    );
    println!(
        "{}",
        json!({
            "tasks": tasks,
            "regions": REGIONS,
            "full_regions": FULL,
            "submit_s": submitted,
            "all_placed_s": placed_s,
            "provider_calls": calls,
            "capacity_refusals": refused,
            "skypilot_model_calls": skypilot_calls,
        })
    );
}
