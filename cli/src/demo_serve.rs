//! `nembo demo serve`: a service on this machine, in under a minute. Three
//! coordinators, each with a load balancer; `examples/serve-local.yaml` on
//! simulated spot nodes; load that makes it scale up; a preemption notice
//! on one replica's node; and a rolling update to v2. It counts every
//! request that failed and checks the traffic moved as it should.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nembo_proto::client::Client;
use nembo_proto::http::HttpClient;
use nembo_proto::v1 as pb;

use crate::connect;

/// The example, on simulated spot capacity, with the delays cut to fit a
/// minute.
fn task(version: &str) -> String {
    include_str!("../../examples/serve-local.yaml")
        .replace(
            "  cpus: 0.5+\n",
            "  cpus: 2\n  use_spot: true\n  infra: local\n",
        )
        .replace(
            "endpoint_probe_interval_seconds: 2",
            "endpoint_probe_interval_seconds: 1",
        )
        .replace("upscale_delay_seconds: 5", "upscale_delay_seconds: 2")
        .replace("max_replicas: 3", "max_replicas: 2")
        .replace("VERSION: v1", &format!("VERSION: {version}"))
}

const PROVIDERS: &str = "local:\n  simulate: true\n  spot_factor: 0.4\n";

/// What the load generator saw.
#[derive(Default)]
struct Traffic {
    sent: u64,
    failed: Vec<String>,
    /// (when, version, replica) of each answer.
    answers: Vec<(Instant, String, String)>,
}

pub async fn serve() -> Result<i32> {
    crate::demo::in_own_dir("demo-serve", run).await
}

async fn run(dir: std::path::PathBuf) -> Result<i32> {
    let started = Instant::now();
    let providers = dir.join("providers.yaml");
    std::fs::write(&providers, PROVIDERS)?;
    let lb_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    println!("Nembo serving demo: 3 coordinators, a load balancer on each, spot replicas on this machine");
    let extra: Vec<String> = [
        "--providers",
        providers.to_str().unwrap_or_default(),
        "--heartbeat-ms",
        "500",
        "--lb-ports",
        &format!("{lb_port}-{lb_port}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let info = connect::start_cluster_in(&dir.join("cluster"), 3, &extra).await?;
    let cluster = crate::demo::Cluster {
        pids: info.pids.clone(),
    };
    let client = connect::connect_info(&info).await?;
    let clock = crate::demo::Clock(Instant::now());
    let line = |what: &str| clock.line(what);
    line(&format!(
        "cluster up ({} coordinators, {:.1} s)",
        info.pids.len(),
        started.elapsed().as_secs_f64()
    ));

    let req = pb::ServeUpRequest {
        name: "chat".into(),
        task_yaml: task("v1"),
        ..Default::default()
    };
    let s = connect::call(&client, req, |mut c, r| async move { c.serve_up(r).await })
        .await?
        .service
        .context("no service")?;
    let endpoint = format!("http://{}", s.endpoints.first().context("no endpoint")?);
    line(&format!(
        "service chat up: endpoint {endpoint} (one port, three coordinators)"
    ));
    let s = wait(&client, "a READY replica", |s| ready(s) >= 1).await?;
    line(&format!("replica 1 READY on {}", s.replicas[0].infra));

    // Load: one client, request after request, each answer streamed back
    // word by word: about 10 a second here, five times what one replica
    // is meant to take.
    let traffic = Arc::new(Mutex::new(Traffic::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(generate(endpoint.clone(), traffic.clone(), stop.clone()));
    line("load on: one client, back to back (target: 2 requests/s per replica)");
    let s = wait(&client, "a second READY replica", |s| ready(s) >= 2).await?;
    line(&format!(
        "scaled up: {} READY replicas, {:.1} requests/s counted across the coordinators",
        ready(&s),
        s.qps
    ));

    // The cloud takes one replica's VM back.
    let victim = s
        .replicas
        .iter()
        .find(|r| r.status == "READY")
        .context("no READY replica")?
        .clone();
    let noticed = Instant::now();
    let req = pb::InjectPreemptionRequest {
        node_id: victim.node_id.clone(),
        format: pb::NoticeFormat::Aws as i32,
        warning: Some(nembo_proto::clock::duration(20_000)),
    };
    connect::call(&client, req, |mut c, r| async move {
        c.inject_preemption(r).await
    })
    .await?;
    line(&format!(
        "AWS spot notice on {} (replica {}'s node; it goes in 20 s)",
        victim.node_id, victim.replica_id
    ));
    wait(&client, "the replica to leave", |s| {
        s.replicas
            .iter()
            .any(|r| r.replica_id == victim.replica_id && r.status == "PREEMPTED")
    })
    .await?;
    let left = noticed.elapsed();
    line(&format!(
        "replica {} out of every load balancer {:.2} s after the notice; a replacement is on its way",
        victim.replica_id,
        left.as_secs_f64()
    ));
    let s = wait(&client, "the replacement to be READY", |s| {
        s.replicas
            .iter()
            .any(|r| r.replica_id > victim.replica_id.max(2) && r.status == "READY")
    })
    .await?;
    let replacement = s
        .replicas
        .iter()
        .filter(|r| r.status == "READY")
        .max_by_key(|r| r.replica_id)
        .context("no replacement")?;
    line(&format!(
        "replacement replica {} READY on {} (the notice's region was {})",
        replacement.replica_id, replacement.infra, victim.infra
    ));

    // A rolling update: v2 replicas come up, v1 ones go as they turn READY.
    let req = pb::ServeUpdateRequest {
        name: "chat".into(),
        task_yaml: task("v2"),
        mode: pb::UpdateMode::Rolling as i32,
        ..Default::default()
    };
    let update_at = Instant::now();
    connect::call(
        &client,
        req,
        |mut c, r| async move { c.serve_update(r).await },
    )
    .await?;
    line("rolling update to v2 started");
    let switched = loop {
        let all_v2 = {
            let t = traffic.lock().unwrap_or_else(|e| e.into_inner());
            let recent: Vec<&(Instant, String, String)> = t.answers.iter().rev().take(30).collect();
            recent.len() == 30 && recent.iter().all(|(at, v, _)| v == "v2" && *at > update_at)
        };
        if all_v2 {
            break Instant::now();
        }
        if update_at.elapsed() > Duration::from_secs(45) {
            bail!("the answers never switched to v2");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    line(&format!(
        "every answer now from v2 ({:.1} s after the update)",
        (switched - update_at).as_secs_f64()
    ));
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;

    let (sent, failed, late) = {
        let t = traffic.lock().unwrap_or_else(|e| e.into_inner());
        let victim_tag = victim.replica_id.to_string();
        let late = t
            .answers
            .iter()
            .filter(|(at, v, r)| {
                *at > noticed + left + Duration::from_millis(500) && v == "v1" && *r == victim_tag
            })
            .count();
        (t.sent, t.failed.clone(), late)
    };
    println!();
    println!(
        "Checked: {sent} requests, {} failed; the preempted replica answered {late} after leaving; scaled to 2; v1 -> v2 with no failed request. Total {:.1} s.",
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    for f in failed.iter().take(5) {
        println!("  failed: {f}");
    }
    let ok = failed.is_empty() && late == 0;
    let req = pb::ServeDownRequest {
        name: "chat".into(),
    };
    let _ = connect::call(
        &client,
        req,
        |mut c, r| async move { c.serve_down(r).await },
    )
    .await;
    cluster.stop(&client).await;
    if !ok {
        bail!("the serving demo's check failed");
    }
    Ok(0)
}

fn ready(s: &pb::Service) -> usize {
    s.replicas.iter().filter(|r| r.status == "READY").count()
}

async fn wait(
    client: &Client,
    what: &str,
    done: impl Fn(&pb::Service) -> bool,
) -> Result<pb::Service> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let req = pb::ListServicesRequest {
            names: vec!["chat".into()],
            ..Default::default()
        };
        let r = connect::call(
            client,
            req,
            |mut c, r| async move { c.list_services(r).await },
        )
        .await?;
        if let Some(s) = r.services.into_iter().next() {
            if done(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}: {s:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends requests until `stop`, noting each answer's version and replica.
async fn generate(endpoint: String, traffic: Arc<Mutex<Traffic>>, stop: Arc<AtomicBool>) {
    let http = HttpClient::new(Duration::from_secs(10));
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let req = http::Request::get(format!("{endpoint}/ask?q=question-{n}"))
            .body(hyper::body::Bytes::new())
            .expect("request");
        let answer = http.send(req).await;
        {
            let mut t = traffic.lock().unwrap_or_else(|e| e.into_inner());
            t.sent += 1;
            match answer {
                Ok(r) if r.status == 200 => {
                    let text = r.text();
                    let mut words = text.split_whitespace();
                    let version = words.next().unwrap_or_default().to_string();
                    let replica = words.nth(1).unwrap_or_default().to_string();
                    t.answers.push((Instant::now(), version, replica));
                }
                Ok(r) => t.failed.push(format!("{} {}", r.status, r.text().trim())),
                Err(e) => t.failed.push(e.to_string()),
            }
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}
