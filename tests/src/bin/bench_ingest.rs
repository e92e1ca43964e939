//! `bench_ingest`: coordinator telemetry ingest. A 3-member cluster with the
//! simulated cloud provisions N nodes (one gang job, `infra: sim`); this
//! process then speaks the agent protocol for every one of them: a hello
//! with 8 GPUs, then a heartbeat carrying 8 GPU readings every second
//! (agents come up `--ramp` per second, default 1000). Measured on the leader over
//! `--seconds` after a warm-up: CPU (from /proc), RSS growth per GPU, and the
//! heartbeat delay histogram from its /metrics. Prints a table, then JSON.
//!
//! Build with `cargo build --release --workspace` and run
//! `target/release/bench_ingest [--agents N] [--seconds S] [--ramp PER_SECOND]`.

use std::time::{Duration, Instant};

use nembo_proto::agent::v1 as apb;
use nembo_proto::agent::v1::session_request::Msg as AgentMsg;
use nembo_proto::clock::now_ms;
use nembo_proto::v1 as pb;
use nembo_tests::{cli_arg, http_get, proc_usage, wait_for, Cluster};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const GPUS: u32 = 8;
const SESSIONS_PER_CONNECTION: usize = 100;

/// Cumulative heartbeat-delay buckets (le seconds -> count) from /metrics.
fn delay_buckets(metrics_url: &str) -> Vec<(f64, f64)> {
    let Some((_, body)) = http_get(metrics_url) else {
        return Vec::new();
    };
    body.lines()
        .filter_map(|l| l.strip_prefix("nembo_agent_heartbeat_delay_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, v) = l.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v.trim().parse().ok()?))
        })
        .collect()
}

/// The smallest bucket bound holding `q` of the observations between two
/// scrapes.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .zip(before.iter().chain(std::iter::repeat(&(0.0, 0.0))))
        .map(|((le, a), (_, b))| (*le, a - b))
        .collect();
    let total = delta.last().map(|d| d.1).unwrap_or(0.0);
    delta
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map(|(le, _)| *le)
        .unwrap_or(f64::NAN)
}

async fn agent(
    client: nembo_proto::client::AgentClient,
    node_id: String,
    offset: Duration,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    let gpus = (0..GPUS)
        .map(|i| pb::GpuIdentity {
            index: i,
            name: "NVIDIA H100 80GB HBM3".into(),
            model: "H100".into(),
            uuid: format!("GPU-{node_id}-{i}"),
            pci_bus_id: format!("00000000:{:02X}:00.0", 0x10 + i),
            memory_total_bytes: 85_899_345_920,
            mig_enabled: false,
        })
        .collect();
    let hello = apb::Hello {
        public_address: String::new(),
        node_id: node_id.clone(),
        hostname: node_id.clone(),
        address: "127.0.0.1".into(),
        resources: None,
        jobs: Vec::new(),
        agent_version: "bench".into(),
        gpus,
        driver_version: "bench".into(),
        cuda_version: String::new(),
    };
    tx.send(apb::SessionRequest {
        msg: Some(AgentMsg::Hello(hello)),
    })
    .await
    .map_err(|_| tonic::Status::cancelled("closed"))?;
    let mut c = client;
    let mut inbound = c.session(ReceiverStream::new(rx)).await?.into_inner();
    // Drain whatever the coordinator sends (welcome, RunJob) and ignore it.
    tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for seq in 1u64.. {
        tick.tick().await;
        let now = now_ms();
        let readings = (0..GPUS)
            .map(|i| {
                let v = ((seq + u64::from(i)) % 100) as u32;
                pb::GpuTelemetry {
                    index: i,
                    sample_time: nembo_proto::clock::timestamp(now),
                    gpu_util_percent: Some(v),
                    mem_util_percent: Some(v / 2),
                    fb_used_bytes: Some(u64::from(v) << 28),
                    fb_free_bytes: Some(85_899_345_920 - (u64::from(v) << 28)),
                    temperature_c: Some(40 + v / 5),
                    power_mw: Some(200_000 + v * 5000),
                    power_limit_mw: Some(700_000),
                    energy_mj: Some(seq * 300_000),
                    sm_clock_mhz: Some(1980),
                    mem_clock_mhz: Some(2619),
                    throttle_reasons: Some(0),
                    ecc_corrected: Some(0),
                    ecc_uncorrected: Some(0),
                    ..Default::default()
                }
            })
            .collect();
        let hb = apb::Heartbeat {
            seq,
            sent_at_unix_ms: now,
            gpus: readings,
        };
        if tx
            .send(apb::SessionRequest {
                msg: Some(AgentMsg::Heartbeat(hb)),
            })
            .await
            .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let n = cli_arg("--agents", 1000) as usize;
    let seconds = cli_arg("--seconds", 30);
    let max_nodes = (n + 10).to_string();
    let cluster = Cluster::start(
        3,
        &[
            "--sim-provider",
            "--max-nodes",
            &max_nodes,
            "--heartbeat-ms",
            "1000",
        ],
    )
    .await;
    let leader = cluster.leader().await;
    let client = cluster.client();
    // Gangs of at most 1000 nodes (a task may ask for up to 1024).
    let mut c = client.clone();
    for (i, first) in (0..n).step_by(1000).enumerate() {
        let size = (n - first).min(1000);
        let task = format!(
            "name: fleet-{i}\nnum_nodes: {size}\nresources: {{infra: sim, accelerators: H100:8}}\nrun: sleep 100000\n"
        );
        c.submit_job(pb::SubmitJobRequest {
            task: Some(pb::submit_job_request::Task::TaskYaml(task)),
            ..Default::default()
        })
        .await
        .expect("submit a fleet job");
    }
    wait_for(
        "the nodes to be provisioned",
        Duration::from_secs(120),
        || {
            let mut c = client.clone();
            async move {
                let nodes = c
                    .list_nodes(pb::ListNodesRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .nodes;
                (nodes.len() >= n).then_some(())
            }
        },
    )
    .await;
    let leader_pid = cluster.pid(leader).expect("leader pid");
    let info: serde_json::Value = serde_json::from_slice(
        &std::fs::read(cluster.member_dir(leader).join("api.json")).expect("api.json"),
    )
    .expect("api.json");
    // The control-plane series only: the full /metrics of 80 000 GPUs is
    // about a million series.
    let metrics_url = format!(
        "{}/control",
        info["metrics_url"].as_str().unwrap_or_default()
    );
    let (rss_before, _) = proc_usage(leader_pid);

    let url = cluster.urls[leader as usize - 1].clone();
    let ca = cluster.ca();
    let token = std::fs::read_to_string(cluster.root.path().join("agent-token"))
        .expect("agent token")
        .trim()
        .to_string();
    let mut conns = Vec::new();
    for _ in 0..n.div_ceil(SESSIONS_PER_CONNECTION) {
        conns.push(
            nembo_proto::client::connect_agent(&url, &ca, &token)
                .await
                .expect("agent connection"),
        );
    }
    let started = Instant::now();
    let failed: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    // Agents come up at --ramp per second (default 1000), as a fleet's
    // nodes do when they boot; heartbeats then run at 1 Hz each.
    let ramp = cli_arg("--ramp", 1000).max(1);
    for i in 0..n {
        if i > 0 && (i as u64).is_multiple_of(ramp) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let client = conns[i / SESSIONS_PER_CONNECTION].clone();
        let offset = Duration::from_micros(((i as u64 % ramp) * 1_000_000) / ramp);
        let failed = failed.clone();
        tokio::spawn(async move {
            if let Err(e) = agent(client, format!("node-{}", i + 1), offset).await {
                failed
                    .lock()
                    .unwrap()
                    .push(format!("node-{}: {}", i + 1, e.message()));
            }
        });
    }
    // Warm-up: every session open and heartbeating.
    let warmup = Duration::from_secs(10);
    tokio::time::sleep(warmup).await;
    let before = delay_buckets(&metrics_url);
    let (_, cpu0) = proc_usage(leader_pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let wall = t0.elapsed().as_secs_f64();
    let failures = failed.lock().unwrap().clone();
    if !failures.is_empty() {
        eprintln!(
            "{} sessions failed, e.g. {:?}",
            failures.len(),
            &failures[..failures.len().min(3)]
        );
    }
    let (rss_after, cpu1) = proc_usage(leader_pid);
    let after = delay_buckets(&metrics_url);
    let count =
        after.last().map(|a| a.1).unwrap_or(0.0) - before.last().map(|b| b.1).unwrap_or(0.0);
    let cpu = (cpu1 - cpu0) / wall * 100.0;
    let p50 = quantile(&before, &after, 0.5) * 1000.0;
    let p99 = quantile(&before, &after, 0.99) * 1000.0;
    let gpus = n as f64 * f64::from(GPUS);
    let per_gpu_kib = (rss_after as f64 - rss_before as f64) / gpus;
    println!(
        "Coordinator ingest: {n} simulated agents x {GPUS} GPUs at 1 Hz, 3 members, {seconds} s measured"
    );
    println!(
        "{:>8} {:>12} {:>14} {:>16} {:>16} {:>16}",
        "agents",
        "GPU rows/s",
        "heartbeats/s",
        "hb delay p50 ms",
        "hb delay p99 ms",
        "leader CPU %"
    );
    println!(
        "{:>8} {:>12.0} {:>14.0} {:>16} {:>16} {:>16.1}",
        n,
        count / wall * f64::from(GPUS),
        count / wall,
        format!("<= {p50}"),
        format!("<= {p99}"),
        cpu
    );
    println!(
        "leader RSS {:.1} MiB -> {:.1} MiB: {:.1} KiB per GPU (sessions and telemetry)",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        per_gpu_kib
    );
    println!(
        "{}",
        json!({
            "agents": n,
            "gpus": gpus,
            "seconds": seconds,
            "heartbeats_per_s": count / wall,
            "gpu_samples_per_s": count / wall * f64::from(GPUS),
            "heartbeat_delay_p50_ms_at_most": p50,
            "heartbeat_delay_p99_ms_at_most": p99,
            "leader_cpu_percent": cpu,
            "leader_rss_mib_before": rss_before as f64 / 1024.0,
            "leader_rss_mib_after": rss_after as f64 / 1024.0,
            "rss_kib_per_gpu": per_gpu_kib,
            "setup_s": started.elapsed().as_secs_f64() - wall,
        })
    );
}
