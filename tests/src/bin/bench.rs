//! `bench`: Nembo's benchmarks. Prints a table, then one JSON document.
//!
//! 1. Launch to first log line: the real `nembo launch` CLI against a warm
//!    coordinator on the local provider, with a warm idle node and with a
//!    node provisioned for the job.
//! 2. Committed `SubmitJob`/s with fsync at 1, 16 and 64 concurrent
//!    clients (over ceil(N/10) HTTP/2 connections, as the etcd anchor was
//!    measured), p50 and p99 at the client.
//!
//! Build with `cargo build --release --workspace` and run
//! `target/release/bench [--launches N] [--seconds S]`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nembo_proto::v1 as pb;
use nembo_tests::{bin, cli_arg, percentile, Coordinator};
use serde_json::json;

/// Runs `nembo launch` and returns ms until its first stdout line.
fn launch_once(c: &Coordinator, task: &std::path::Path) -> f64 {
    let start = Instant::now();
    let mut child = Command::new(bin("nembo"))
        // A warm cluster, as `sky launch -c` again.
        .args(["launch", "-c", "bench"])
        .arg(task)
        .env("NEMBO_API_INFO", c.dir.path().join("api.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nembo launch");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let out = child.wait_with_output().expect("wait");
    assert!(
        line.trim() == "first-line" && out.status.success(),
        "unexpected output {line:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ms
}

async fn down_all(c: &Coordinator) {
    let mut client = c.client().await;
    client
        .down(pb::DownRequest {
            node_ids: vec![],
            all: true,
        })
        .await
        .expect("down");
    loop {
        let nodes = client
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .expect("nodes")
            .into_inner()
            .nodes;
        if nodes
            .iter()
            .all(|n| n.state == pb::NodeState::Terminated as i32)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn summary(mut v: Vec<f64>) -> serde_json::Value {
    json!({
        "n": v.len(),
        "p50_ms": percentile(&mut v, 0.5),
        "p99_ms": percentile(&mut v, 0.99),
        "min_ms": percentile(&mut v, 0.0),
        "max_ms": percentile(&mut v, 1.0),
    })
}

async fn submit_load(c: &Coordinator, clients: usize, seconds: u64) -> serde_json::Value {
    let conns = clients.div_ceil(10);
    let mut channels = Vec::new();
    for _ in 0..conns {
        channels.push(c.client().await);
    }
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let mut client = channels[i % conns].clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            loop {
                let t = Instant::now();
                if t >= start + warmup + measure {
                    break;
                }
                client
                    .submit_job(pb::SubmitJobRequest {
                        task: Some(pb::submit_job_request::Task::TaskYaml(format!(
                            "name: bench-{i}-{n}\nrun: echo {n}\n"
                        ))),
                        idempotency_key: format!("bench-{clients}-{i}-{n}"),
                        ..Default::default()
                    })
                    .await
                    .expect("submit");
                n += 1;
                if t >= start + warmup {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    let per_sec = all.len() as f64 / measure.as_secs_f64();
    let mut s = summary(all);
    s["clients"] = json!(clients);
    s["connections"] = json!(conns);
    s["per_sec"] = json!(per_sec.round());
    s
}

#[tokio::main]
async fn main() {
    let launches = cli_arg("--launches", 20) as usize;
    let skip_launch = std::env::args().any(|a| a == "--no-launch");
    let seconds = cli_arg("--seconds", 5);

    let c = Coordinator::start(&[]).await;
    let task = c.dir.path().join("first-line.yaml");
    std::fs::write(&task, "run: echo first-line\n").expect("task");
    // Warm the coordinator (and the page cache for the binaries).
    if !skip_launch {
        launch_once(&c, &task);
    }
    let launches = if skip_launch { 0 } else { launches };
    let warm: Vec<f64> = (0..launches).map(|_| launch_once(&c, &task)).collect();
    let mut cold = Vec::new();
    for _ in 0..launches.div_ceil(2) {
        down_all(&c).await;
        cold.push(launch_once(&c, &task));
    }
    drop(c);

    // Jobs stay pending (no nodes allowed), so this measures the API and the
    // durable Raft commit, not the provider.
    let c = Coordinator::start(&["--max-nodes", "0"]).await;
    let mut submits = Vec::new();
    let levels: Vec<usize> = std::env::var("BENCH_LEVELS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 64]);
    for clients in levels {
        submits.push(submit_load(&c, clients, seconds).await);
    }

    let warm = summary(warm);
    let cold = summary(cold);
    println!("Launch to first log line (nembo launch CLI, local provider, warm coordinator)");
    println!(
        "{:<28} {:>5} {:>9} {:>9} {:>9}",
        "case", "n", "p50 ms", "p99 ms", "max ms"
    );
    for (name, s) in [
        ("idle node ready", &warm),
        ("node provisioned for job", &cold),
    ] {
        println!(
            "{:<28} {:>5} {:>9.1} {:>9.1} {:>9.1}",
            name,
            s["n"].as_u64().unwrap_or(0),
            s["p50_ms"].as_f64().unwrap_or(0.0),
            s["p99_ms"].as_f64().unwrap_or(0.0),
            s["max_ms"].as_f64().unwrap_or(0.0)
        );
    }
    println!("target: < 300 ms; dstack users report 10-15 s [anchors.md, published]");
    println!();
    println!("Committed SubmitJob/s (raft-engine, fsync per batch, single voter)");
    println!(
        "{:>8} {:>6} {:>10} {:>9} {:>9}   {:>22}",
        "clients", "conns", "per sec", "p50 ms", "p99 ms", "etcd 3-member anchor"
    );
    let etcd = [
        (1, "1248/s p99 1.28"),
        (16, "5383/s p99 6.78"),
        (64, "10593/s p99 14.5"),
    ];
    for s in &submits {
        let anchor = etcd
            .iter()
            .find(|(n, _)| Some(*n) == s["clients"].as_u64())
            .map_or("-", |(_, a)| *a);
        println!(
            "{:>8} {:>6} {:>10.0} {:>9.2} {:>9.2}   {:>22}",
            s["clients"].as_u64().unwrap_or(0),
            s["connections"].as_u64().unwrap_or(0),
            s["per_sec"].as_f64().unwrap_or(0.0),
            s["p50_ms"].as_f64().unwrap_or(0.0),
            s["p99_ms"].as_f64().unwrap_or(0.0),
            anchor
        );
    }
    println!();
    let doc = json!({
        "launch_first_log_line": { "idle_node": warm, "new_node": cold },
        "submit_job": submits,
        "anchors": {
            "etcd_3_members_put_per_sec": { "1": 1248, "16": 5383, "64": 10593 },
            "note": "etcd figures are from anchors.md (3 members, same machine class), not measured in this run",
        },
    });
    println!("{}", serde_json::to_string(&doc).unwrap_or_default());
}
