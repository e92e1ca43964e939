//! `bench_cluster`: a 3-member Nembo cluster against a 3-member etcd on the
//! same machine, in one run. Prints a table, then one JSON document.
//!
//! 1. Committed writes/s with fsync at 1, 16, 64 and 256 clients
//!    (ceil(N/10) HTTP/2 connections, to the leader): Nembo `SubmitJob`
//!    against etcd `Put` with 8-byte keys and 256-byte values.
//! 2. Leader failover: kill -9 the leader, then a write every 10 ms (1 s
//!    timeout) through the survivors; time from the kill to the first
//!    success. The member is restarted between trials.
//!
//! Needs `etcd` on PATH (Debian: `apt-get install etcd-server`); without it
//! only Nembo is measured. Build with `cargo build --release --workspace`,
//! run `target/release/bench_cluster [--seconds S] [--trials N]`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nembo_proto::v1 as pb;
use nembo_tests::{cli_arg, percentile, Cluster};
use serde_json::json;
use tonic::transport::Channel;

/// etcd's `KV/Put`, declared by hand: only the fields we send.
#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {}

async fn etcd_put(ch: Channel, key: Vec<u8>, value: Vec<u8>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<PutRequest, PutResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put");
    grpc.unary(tonic::Request::new(PutRequest { key, value }), path, codec)
        .await
        .map(|_| ())
}

/// One write to whichever system is measured.
#[derive(Clone)]
enum Writer {
    Nembo(nembo_proto::client::Client),
    Etcd(Channel),
}

impl Writer {
    async fn write(&self, n: u64, client: usize) -> Result<(), tonic::Status> {
        match self {
            Writer::Nembo(c) => c
                .clone()
                .submit_job(pb::SubmitJobRequest {
                    task: Some(pb::submit_job_request::Task::TaskYaml(format!(
                        "run: echo {n}\n"
                    ))),
                    idempotency_key: format!("b-{client}-{n}-{}", std::process::id()),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            Writer::Etcd(ch) => {
                let key =
                    format!("{:08}", (client as u64 * 1_000_003 + n) % 100_000_000).into_bytes();
                etcd_put(ch.clone(), key, vec![b'x'; 256]).await
            }
        }
    }
}

async fn load(writers: Vec<Writer>, clients: usize, seconds: u64) -> serde_json::Value {
    let start = Instant::now();
    let warmup = Duration::from_secs(1);
    let end = start + warmup + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let w = writers[i % writers.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while Instant::now() < end {
                let t = Instant::now();
                if w.write(n, i).await.is_ok() && t >= start + warmup {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                n += 1;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let per_sec = all.len() as f64 / seconds as f64;
    json!({
        "clients": clients,
        "connections": writers.len(),
        "per_sec": per_sec.round(),
        "p50_ms": percentile(&mut all, 0.5),
        "p99_ms": percentile(&mut all, 0.99),
    })
}

// ---------------------------------------------------------------- etcd

struct Etcd {
    dir: tempfile::TempDir,
    clients: Vec<String>,
    procs: Vec<Option<Child>>,
    cluster: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Etcd {
    fn start() -> Option<Etcd> {
        Command::new("etcd").arg("--version").output().ok()?;
        let dir = tempfile::tempdir().ok()?;
        let peers: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let clients: Vec<String> = (0..3)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let cluster = (0..3)
            .map(|i| format!("e{i}=http://127.0.0.1:{}", peers[i]))
            .collect::<Vec<_>>()
            .join(",");
        let mut e = Etcd {
            dir,
            clients,
            procs: (0..3).map(|_| None).collect(),
            cluster,
        };
        for (i, peer) in peers.into_iter().enumerate() {
            e.spawn(i, peer, "new");
        }
        Some(e)
    }

    fn spawn(&mut self, i: usize, peer: u16, state: &str) {
        let child = Command::new("etcd")
            .args(["--name", &format!("e{i}")])
            .args([
                "--data-dir",
                &self.dir.path().join(format!("e{i}")).display().to_string(),
            ])
            .args([
                "--listen-client-urls",
                &self.clients[i],
                "--advertise-client-urls",
                &self.clients[i],
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &self.cluster,
                "--initial-cluster-state",
                state,
            ])
            .args([
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                "--log-level",
                "error",
            ])
            .env("ETCD_UNSUPPORTED_ARCH", "")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd");
        self.procs[i] = Some(child);
    }

    fn peer_port(&self, i: usize) -> u16 {
        self.cluster
            .split(',')
            .nth(i)
            .and_then(|s| s.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    /// Index of the leader, from `etcdctl endpoint status`.
    fn leader(&self) -> Option<usize> {
        let live: Vec<String> = (0..3)
            .filter(|i| self.procs[*i].is_some())
            .map(|i| self.clients[i].clone())
            .collect();
        let out = Command::new("etcdctl")
            .args([
                "--endpoints",
                &live.join(","),
                "endpoint",
                "status",
                "-w",
                "json",
            ])
            .env("ETCDCTL_API", "3")
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        for s in v.as_array()? {
            let (leader, me) = (&s["Status"]["leader"], &s["Status"]["header"]["member_id"]);
            if leader == me {
                let ep = s["Endpoint"].as_str()?;
                return self.clients.iter().position(|c| c == ep);
            }
        }
        None
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }
}

async fn etcd_channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .expect("url")
        .connect_lazy()
}

async fn wait_until<F: FnMut() -> bool>(mut f: F, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Time from `kill` to the first write that succeeds through `survivors`:
/// a write starts every 10 ms (each with a 1 s timeout, not waiting for the
/// ones before it, which may hang on a member that has no leader yet).
async fn time_to_first_write(survivors: &[Writer]) -> f64 {
    let t0 = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<f64>(1);
    let mut n = 0u64;
    loop {
        let w = survivors[n as usize % survivors.len()].clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let attempt =
                tokio::time::timeout(Duration::from_secs(1), w.write(1_000_000 + n, 999)).await;
            if matches!(attempt, Ok(Ok(()))) {
                let _ = tx.try_send(t0.elapsed().as_secs_f64() * 1000.0);
            }
        });
        n += 1;
        tokio::select! {
            Some(ms) = rx.recv() => return ms,
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
        if t0.elapsed() > Duration::from_secs(30) {
            return f64::NAN;
        }
    }
}

#[tokio::main]
async fn main() {
    let only_catchup = std::env::args().any(|a| a == "--only-catchup");
    let seconds = cli_arg("--seconds", 5);
    let trials = if only_catchup {
        0
    } else {
        cli_arg("--trials", 15) as usize
    };
    let levels = [1usize, 16, 64, 256];
    let mut doc = json!({});

    // Nembo, three members, writes to the leader.
    let mut cluster = Cluster::start(3, &["--max-nodes", "0"]).await;
    let leader = cluster.leader().await;
    let mut nembo_rows = Vec::new();
    for &clients in levels.iter().filter(|_| !only_catchup) {
        let mut writers = Vec::new();
        for _ in 0..clients.div_ceil(10) {
            writers.push(Writer::Nembo(
                cluster.member_client(leader).await.expect("leader client"),
            ));
        }
        nembo_rows.push(load(writers, clients, seconds).await);
    }
    let mut nembo_failover = Vec::new();
    for _ in 0..trials {
        let leader = cluster.leader().await;
        let mut survivors = Vec::new();
        for id in (1..=3).filter(|id| *id != leader) {
            survivors.push(Writer::Nembo(
                cluster.member_client(id).await.expect("client"),
            ));
        }
        cluster.kill9(leader);
        nembo_failover.push(time_to_first_write(&survivors).await);
        cluster.restart(leader);
        let target = cluster
            .status(cluster.leader().await)
            .await
            .map(|s| s.applied_index)
            .unwrap_or(0);
        for _ in 0..200 {
            if cluster
                .status(leader)
                .await
                .is_some_and(|s| s.applied_index >= target)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Snapshot catch-up: a member restarted with an empty disk, `jobs` jobs
    // in the state (submitted 256 at a time).
    let jobs = cli_arg("--catchup-jobs", 100_000);
    let leader = cluster.leader().await;
    let writer = cluster.member_client(leader).await.expect("leader client");
    let target_jobs = jobs as usize;
    let mut submitted = 0usize;
    while submitted < target_jobs {
        let batch: Vec<_> = (submitted..(submitted + 256).min(target_jobs))
            .map(|n| {
                let w = Writer::Nembo(writer.clone());
                tokio::spawn(async move { w.write(n as u64, 7_000_000).await.is_ok() })
            })
            .collect();
        for t in batch {
            if t.await.unwrap_or(false) {
                submitted += 1;
            }
        }
    }
    // A new, empty member joins (as a replacement for a lost disk would):
    // learner, snapshot, promotion.
    let joiner = cluster.spawn_joiner();
    let url = cluster.urls[joiner as usize - 1].clone();
    let t0 = Instant::now();
    let added = nembo_proto::client::call(
        &writer,
        pb::AddMemberRequest { id: joiner, url },
        |mut c, r| async move { c.add_member(r).await },
    )
    .await;
    let catchup_ms = if added.is_ok() {
        t0.elapsed().as_secs_f64() * 1000.0
    } else {
        eprintln!("add member failed: {added:?}");
        f64::NAN
    };
    let snapshot_bytes = std::fs::metadata(
        cluster
            .member_dir(leader)
            .join("raft")
            .join("snapshot.json"),
    )
    .map(|m| m.len())
    .unwrap_or(0);
    doc["snapshot_catchup"] = json!({
        "jobs": submitted,
        "ms_to_add_a_member": catchup_ms,
        "leader_snapshot_bytes": snapshot_bytes,
    });
    drop(cluster);

    // etcd, three members, same machine, same run.
    let mut etcd_rows = Vec::new();
    let mut etcd_failover = Vec::new();
    if let Some(mut etcd) = Etcd::start().filter(|_| !only_catchup) {
        let ok = wait_until(|| etcd.leader().is_some(), Duration::from_secs(20)).await;
        if ok {
            let li = etcd.leader().unwrap_or(0);
            for &clients in &levels {
                let mut writers = Vec::new();
                for _ in 0..clients.div_ceil(10) {
                    writers.push(Writer::Etcd(etcd_channel(&etcd.clients[li]).await));
                }
                etcd_rows.push(load(writers, clients, seconds).await);
            }
            for _ in 0..trials {
                let Some(li) = etcd.leader() else { break };
                let mut survivors = Vec::new();
                for i in (0..3).filter(|i| *i != li) {
                    survivors.push(Writer::Etcd(etcd_channel(&etcd.clients[i]).await));
                }
                etcd.kill(li);
                etcd_failover.push(time_to_first_write(&survivors).await);
                let peer = etcd.peer_port(li);
                etcd.spawn(li, peer, "existing");
                wait_until(|| etcd.leader().is_some(), Duration::from_secs(20)).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    } else {
        eprintln!("etcd not found: install etcd-server to compare");
    }

    println!("Committed writes/s with fsync, 3 members on 127.0.0.1, writes to the leader");
    println!(
        "{:>8} {:>6} | {:>9} {:>8} {:>8} | {:>9} {:>8} {:>8}",
        "clients", "conns", "nembo/s", "p50 ms", "p99 ms", "etcd/s", "p50 ms", "p99 ms"
    );
    for (i, n) in nembo_rows.iter().enumerate() {
        let e = etcd_rows.get(i).cloned().unwrap_or(json!({}));
        let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>8} {:>6} | {:>9.0} {:>8.2} {:>8.2} | {:>9.0} {:>8.2} {:>8.2}",
            f(n, "clients"),
            f(n, "connections"),
            f(n, "per_sec"),
            f(n, "p50_ms"),
            f(n, "p99_ms"),
            f(&e, "per_sec"),
            f(&e, "p50_ms"),
            f(&e, "p99_ms")
        );
    }
    let summarize = |v: &mut Vec<f64>| {
        let min = percentile(v, 0.0);
        json!({ "trials_ms": v.clone(), "min_ms": min, "median_ms": percentile(v, 0.5), "max_ms": percentile(v, 1.0) })
    };
    let nf = summarize(&mut nembo_failover);
    let ef = summarize(&mut etcd_failover);
    println!();
    println!(
        "Leader failover: kill -9, then time to the first successful write through a survivor"
    );
    for (name, s) in [("nembo", &nf), ("etcd", &ef)] {
        println!(
            "{:<6} trials {:>2}  min {:>7.0} ms  median {:>7.0} ms  max {:>7.0} ms",
            name,
            s["trials_ms"].as_array().map_or(0, |a| a.len()),
            s["min_ms"].as_f64().unwrap_or(f64::NAN),
            s["median_ms"].as_f64().unwrap_or(f64::NAN),
            s["max_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!(
        "Snapshot catch-up: a new member added (learner, snapshot, promotion) with {} jobs in the state: {:.0} ms (leader's snapshot file {} bytes)",
        doc["snapshot_catchup"]["jobs"],
        doc["snapshot_catchup"]["ms_to_add_a_member"].as_f64().unwrap_or(f64::NAN),
        doc["snapshot_catchup"]["leader_snapshot_bytes"]
    );
    doc["nembo_writes"] = json!(nembo_rows);
    doc["etcd_writes"] = json!(etcd_rows);
    doc["nembo_failover"] = nf;
    doc["etcd_failover"] = ef;
    println!();
    println!("{doc}");
}
