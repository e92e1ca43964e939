//! `bench_agent`: the agent's footprint with 8 GPUs sampled at 1 Hz, beside
//! Debian's `prometheus-node-exporter` scraped at 1 Hz, in one run.
//!
//! The GPUs are the fake NVML library's (the agent loads it through the same
//! code as the real one; readings change every second). A warm-up minute is
//! not counted; then RSS and CPU time of both processes are read from /proc
//! over `--seconds` (default 300). Prints a table, then one JSON document.
//!
//! Build with `cargo build --release --workspace` and run
//! `target/release/bench_agent [--seconds S]`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nembo_proto::v1 as pb;
use nembo_tests::{cli_arg, http_get, proc_usage as usage, wait_for, Coordinator, FakeGpus};
use serde_json::json;

fn write_gpus(fake: &FakeGpus, second: u64) {
    // Values move every second, as a busy GPU's do.
    let mut s = String::from(
        "gpus 8\nname NVIDIA H100 80GB HBM3\nfb_total 85899345920\npower_limit_mw 700000\n\
         sm_clock 1980\nmem_clock 2619\npcie_rx 1000\npcie_tx 2000\n",
    );
    for g in 0..8 {
        let v = (second * 7 + g * 13) % 100;
        s.push_str(&format!(
            "util.{g} {v}\nmem_util.{g} {}\ntemp.{g} {}\npower_mw.{g} {}\nfb_used.{g} {}\nenergy_mj.{g} {}\n",
            v / 2,
            40 + v / 5,
            200_000 + v * 5000,
            (v + 1) << 28,
            second * 300_000
        ));
    }
    fake.set(&s);
}

#[tokio::main]
async fn main() {
    let seconds = cli_arg("--seconds", 300);
    let fake = FakeGpus::new("");
    write_gpus(&fake, 0);
    // Production's heartbeat period, not the tests' faster one.
    let c = Coordinator::start_with_env(&["--heartbeat-ms", "1000"], &fake.env()).await;
    // A job makes the local provider start a node (one agent).
    let job = c.submit("name: idle\nrun: sleep 100000\n").await;
    c.wait_state(&job, pb::JobState::Running, Duration::from_secs(30))
        .await;
    let agent = c.agent_pid("node-1") as u32;
    wait_for("8 GPUs reporting", Duration::from_secs(20), || async {
        let n = c
            .client()
            .await
            .get_fleet_metrics(pb::GetFleetMetricsRequest::default())
            .await
            .ok()?
            .into_inner()
            .gpus
            .len();
        (n == 8).then_some(())
    })
    .await;

    // node-exporter, scraped at 1 Hz by this process.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let mut exporter = Command::new("prometheus-node-exporter")
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok();
    let exporter_pid = exporter.as_ref().map(|c| c.id());
    if exporter.is_none() {
        eprintln!(
            "prometheus-node-exporter not found (Debian: prometheus-node-exporter): agent only"
        );
    }
    let scrape = move || {
        let _ = http_get(&format!("http://127.0.0.1:{port}/metrics"));
    };

    // Warm-up minute, then measure.
    let warmup = 60.min(seconds / 5);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut second = 0u64;
    let mut begin = None;
    let mut rss_agent = Vec::new();
    let mut rss_exporter = Vec::new();
    let start = Instant::now();
    while second < warmup + seconds {
        tick.tick().await;
        second += 1;
        write_gpus(&fake, second);
        if exporter_pid.is_some() {
            tokio::task::spawn_blocking(scrape).await.ok();
        }
        if second == warmup {
            begin = Some((
                Instant::now(),
                usage(agent).1,
                exporter_pid.map(|p| usage(p).1).unwrap_or(0.0),
            ));
        }
        if second > warmup {
            rss_agent.push(usage(agent).0);
            if let Some(p) = exporter_pid {
                rss_exporter.push(usage(p).0);
            }
        }
    }
    let (t0, cpu_agent0, cpu_exp0) = begin.expect("measured");
    let wall = t0.elapsed().as_secs_f64();
    let cpu_agent = (usage(agent).1 - cpu_agent0) / wall * 100.0;
    let cpu_exporter = exporter_pid.map(|p| (usage(p).1 - cpu_exp0) / wall * 100.0);
    let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0) as f64 / 1024.0;
    let last = |v: &[u64]| v.last().copied().unwrap_or(0) as f64 / 1024.0;
    println!(
        "Agent footprint: 8 GPUs sampled at 1 Hz, {seconds} s measured after a {warmup} s warm-up"
    );
    println!(
        "{:<28} {:>12} {:>12} {:>16}",
        "process", "RSS MiB", "max RSS MiB", "CPU % of a core"
    );
    println!(
        "{:<28} {:>12.1} {:>12.1} {:>16.3}",
        "nembo-agent",
        last(&rss_agent),
        max(&rss_agent),
        cpu_agent
    );
    if let Some(cpu) = cpu_exporter {
        println!(
            "{:<28} {:>12.1} {:>12.1} {:>16.3}",
            "prometheus-node-exporter",
            last(&rss_exporter),
            max(&rss_exporter),
            cpu
        );
    }
    println!(
        "{}",
        json!({
            "seconds": seconds,
            "wall_s": start.elapsed().as_secs_f64(),
            "agent": { "rss_mib": last(&rss_agent), "max_rss_mib": max(&rss_agent), "cpu_percent": cpu_agent },
            "node_exporter": exporter_pid.map(|_| json!({
                "rss_mib": last(&rss_exporter), "max_rss_mib": max(&rss_exporter), "cpu_percent": cpu_exporter,
            })),
        })
    );
    if let Some(e) = exporter.as_mut() {
        let _ = e.kill();
        let _ = e.wait();
    }
}
