//! `bench_serve`: `nembo serve`'s load balancer, measured, beside nginx as a
//! reverse proxy to the same replica.
//!
//! - Added latency and throughput: one service of one replica (this binary
//!   in `--replica` mode: a hyper HTTP/1.1 server answering `GET /` at once
//!   with a short body), loaded at 1, 64 and 256 keep-alive HTTP/1.1
//!   connections straight at the replica, through Nembo's load balancer,
//!   and through nginx (Debian's package) proxying to the replica's own
//!   endpoint. `--seconds` (default 5) per run after 1 s of warm-up, the
//!   targets interleaved, `--rounds` (default 3) rounds, medians reported.
//!   Added latency: the proxy's p50 / p99 minus the replica's own at the
//!   same concurrency, in the same round.
//! - `serve up` to the first READY replica, on a fresh coordinator (its
//!   local node provisioned for it) and again once that node is warm.
//! - Preemption: a service of two spot replicas, a notice served to one
//!   replica's node (`--preempt-rounds`, default 5), requests through the
//!   load balancer at about 200/s all along: notice -> the replica shows
//!   PREEMPTED in ListServices, and notice -> the last request the
//!   preempted replica answered (it keeps answering until its node goes).
//!   `--notice aws|gcp|azure` (default aws): the notice's format.
//!
//! The load generator, the coordinator, the replica and nginx share this
//! machine's cores.
//!
//! `cargo build --release -p nembo-coordinator -p nembo-agent -p nembo-cli -p nembo-tests --bins && target/release/bench_serve`

use std::convert::Infallible;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use nembo_proto::client::Client;
use nembo_proto::v1 as pb;
use nembo_tests::{cli_arg, percentile, service, Coordinator};
use serde_json::{json, Value};

const CONCURRENCY: [usize; 3] = [1, 64, 256];
const TARGETS: [&str; 3] = ["direct", "nembo", "nginx"];

/// Two simulated regions with spot capacity: replicas of 2 vCPUs each get
/// a node of their own.
const SPOT_PROVIDERS: &str = "local:\n  simulate: true\n  spot_factor: 0.4\n";

fn main() {
    if std::env::args().any(|a| a == "--replica") {
        replica();
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench());
}

/// The replica: `GET /` (any path) answers `replica <id>` at once.
fn replica() {
    let port: u16 = std::env::var("NEMBO_SERVICE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .expect("NEMBO_SERVICE_PORT");
    let id = std::env::var("SKYPILOT_SERVE_REPLICA_ID").unwrap_or_else(|_| "0".into());
    let body = Bytes::from(format!("replica {id}\n"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the replica's port");
        eprintln!("replica {id} listening on 127.0.0.1:{port}");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

/// A service task whose replica is this binary.
fn task(replicas: u32, resources: &str) -> String {
    let me = std::env::current_exe().expect("current exe");
    format!(
        "name: bench\nresources:\n  ports: 8080\n{resources}service:\n  readiness_probe:\n    path: /\n    \
         endpoint_probe_interval_seconds: 1\n    timeout_seconds: 2\n  replicas: {replicas}\n\
         run: exec {} --replica\n",
        me.display()
    )
}

/// Polls every 20 ms until `n` replicas of `name` are READY.
async fn ready(client: &Client, name: &str, n: usize, limit: Duration) -> pb::Service {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = service(client, name).await {
            if s.replicas.iter().filter(|r| r.status == "READY").count() >= n {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?} waiting for {n} READY replicas of {name}: {s:?}"
            );
        }
        assert!(Instant::now() < deadline, "no service {name}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `ServeUp`, then the time to `n` READY replicas (s).
async fn serve_up(client: &Client, name: &str, yaml: String, n: usize) -> (pb::Service, f64) {
    let t0 = Instant::now();
    client
        .clone()
        .serve_up(pb::ServeUpRequest {
            name: name.into(),
            task_yaml: yaml,
            ..Default::default()
        })
        .await
        .expect("ServeUp");
    let s = ready(client, name, n, Duration::from_secs(120)).await;
    (s, t0.elapsed().as_secs_f64())
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: &str) -> Result<Sender, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One GET over `sender`: (status, body), or an error.
async fn get(sender: &mut Sender, host: &str) -> Result<(u16, Bytes), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let req = http::Request::get("/")
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), async {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    })
    .await
    .map_err(|_| "timed out".to_string())??;
    Ok(resp)
}

/// One load run's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

/// `conns` connections to `addr`, each sending GETs one after another for
/// `warmup` + `secs`; only requests started after the warm-up count.
async fn load(addr: &str, conns: usize, warmup: Duration, secs: Duration) -> (Run, Vec<String>) {
    let start = Instant::now();
    let from = start + warmup;
    let until = from + secs;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let addr = addr.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<f64> = Vec::with_capacity(4096);
            let mut errors: Vec<String> = Vec::new();
            let mut sender: Option<Sender> = None;
            while Instant::now() < until {
                if sender.as_ref().is_none_or(|s| s.is_closed()) {
                    match connect(&addr).await {
                        Ok(s) => sender = Some(s),
                        Err(e) => {
                            if Instant::now() >= from {
                                errors.push(format!("connect: {e}"));
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let s = sender.as_mut().expect("sender");
                let t0 = Instant::now();
                let r = get(s, &addr).await;
                let dt = t0.elapsed().as_secs_f64() * 1e3;
                let counts = t0 >= from && t0 < until;
                match r {
                    Ok((200, _)) if counts => lat.push(dt),
                    Ok((200, _)) => {}
                    Ok((code, body)) => {
                        if counts {
                            errors
                                .push(format!("{code} {}", String::from_utf8_lossy(&body).trim()));
                        }
                    }
                    Err(e) => {
                        // Counted either way; labelled when the server had
                        // closed the connection (a keep-alive limit).
                        if counts && !s.is_closed() {
                            errors.push(e);
                        } else if counts {
                            errors.push(format!("closed: {e}"));
                        }
                        sender = None;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        let (l, e) = t.await.expect("load task");
        lat.extend(l);
        errors.extend(e);
    }
    let run = Run {
        rps: lat.len() as f64 / secs.as_secs_f64(),
        p50_ms: percentile(&mut lat, 0.5),
        p99_ms: percentile(&mut lat, 0.99),
        errors: errors.len() as u64,
    };
    (run, errors)
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    l.local_addr().expect("addr").port()
}

/// nginx as a reverse proxy, in a process and a temp dir of its own.
struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
    addr: String,
    version: String,
}

impl Drop for Nginx {
    /// SIGTERM, so the master takes its workers with it (SIGKILL would
    /// leave them running, and loading the next benchmark's CPUs).
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_bin() -> Option<(PathBuf, String)> {
    for p in ["nginx", "/usr/sbin/nginx"] {
        if let Ok(out) = Command::new(p).arg("-v").output() {
            let v = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Some((PathBuf::from(p), v));
        }
    }
    None
}

fn start_nginx(upstream: &str) -> Result<Nginx, String> {
    let (bin, version) = match nginx_bin() {
        Some(b) => b,
        None => {
            eprintln!("nginx is missing: apt-get install -y nginx");
            let ok = Command::new("apt-get")
                .args(["install", "-y", "nginx"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            match nginx_bin() {
                Some(b) if ok => b,
                _ => return Err("nginx could not be installed".into()),
            }
        }
    };
    let dir = tempfile::Builder::new()
        .prefix("bench-nginx")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let d = dir.path().display();
    let port = free_port();
    let conf = format!(
        "worker_processes auto;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
           access_log off;\n\
           client_body_temp_path {d}/body;\n\
           proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n\
           uwsgi_temp_path {d}/uwsgi;\n\
           scgi_temp_path {d}/scgi;\n\
           keepalive_requests 1000000;\n\
           upstream replica {{\n\
             server {upstream};\n\
             keepalive 64;\n\
             keepalive_requests 1000000;\n\
           }}\n\
           server {{\n\
             listen 127.0.0.1:{port};\n\
             location / {{\n\
               proxy_pass http://replica;\n\
               proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\";\n\
               proxy_buffering off;\n\
             }}\n\
           }}\n\
         }}\n"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    let child = Command::new(&bin)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir.path())
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("start nginx: {e}"))?;
    let addr = format!("127.0.0.1:{port}");
    let mut n = Nginx {
        child,
        _dir: dir,
        addr: addr.clone(),
        version,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        if let Ok(Some(st)) = n.child.try_wait() {
            return Err(format!("nginx exited: {st}"));
        }
        if Instant::now() > deadline {
            return Err("nginx did not listen".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(n)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    percentile(&mut v, 0.5)
}

fn summary(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    json!({
        "median": percentile(&mut s, 0.5),
        "max": percentile(&mut s, 1.0),
        "min": percentile(&mut s, 0.0),
        "all": v,
    })
}

/// Sends GETs through `addr` over one keep-alive connection, one every
/// `every`, until `stop`: (sent at, answer or error) each.
type Log = Arc<Mutex<Vec<(Instant, Result<(u16, String), String>)>>>;

fn steady_load(
    addr: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> (Log, tokio::task::JoinHandle<()>) {
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let task = tokio::spawn(async move {
        let mut sender: Option<Sender> = None;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let at = Instant::now();
            if sender.as_ref().is_none_or(|s| s.is_closed()) {
                match connect(&addr).await {
                    Ok(s) => sender = Some(s),
                    Err(e) => {
                        l.lock().unwrap().push((at, Err(format!("connect: {e}"))));
                        continue;
                    }
                }
            }
            let r = get(sender.as_mut().expect("sender"), &addr)
                .await
                .map(|(code, body)| (code, String::from_utf8_lossy(&body).trim().to_string()));
            if r.is_err() {
                sender = None;
            }
            l.lock().unwrap().push((at, r));
        }
    });
    (log, task)
}

async fn bench() {
    let rounds = cli_arg("--rounds", 3) as usize;
    let secs = Duration::from_secs(cli_arg("--seconds", 5));
    let preempt_rounds = cli_arg("--preempt-rounds", 5) as usize;
    let warmup = Duration::from_secs(1);
    // The notice's cloud format: the agent polls AWS's and Azure's metadata
    // (every second by default) and holds a hanging GET on GCP's.
    let args: Vec<String> = std::env::args().collect();
    let notice = args
        .iter()
        .position(|a| a == "--notice")
        .and_then(|i| args.get(i + 1))
        .map_or("aws", String::as_str)
        .to_string();
    let notice_format = match notice.as_str() {
        "gcp" => pb::NoticeFormat::Gcp,
        "azure" => pb::NoticeFormat::Azure,
        _ => pb::NoticeFormat::Aws,
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());

    // --- Serve up, and the load balancer under load ---
    let c = Coordinator::start(&[]).await;
    let client = c.client().await;
    let (s, cold_ready_s) = serve_up(&client, "lb", task(1, ""), 1).await;
    let replica = s
        .replicas
        .iter()
        .find(|r| r.status == "READY")
        .expect("a READY replica")
        .clone();
    let direct = replica.endpoint.clone();
    let lb = s.endpoints.first().expect("an endpoint").clone();
    eprintln!(
        "service lb: READY in {cold_ready_s:.2} s; replica {} at {direct} on {}; load balancer {lb}",
        replica.replica_id, replica.node_id
    );
    let nginx = match start_nginx(&direct) {
        Ok(n) => Some(n),
        Err(e) => {
            eprintln!("no nginx anchor: {e}; Nembo alone");
            None
        }
    };
    let nginx_version = nginx.as_ref().map(|n| n.version.clone());
    let mut addrs = vec![("direct", direct.clone()), ("nembo", lb.clone())];
    if let Some(n) = &nginx {
        addrs.push(("nginx", n.addr.clone()));
    }
    // runs[target][concurrency] = one Run per round.
    let mut runs: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); CONCURRENCY.len()]; TARGETS.len()];
    let mut error_samples: Vec<String> = Vec::new();
    for round in 0..rounds {
        for (ci, &conns) in CONCURRENCY.iter().enumerate() {
            // Rotate the order from round to round.
            for k in 0..addrs.len() {
                let (name, addr) = &addrs[(k + round) % addrs.len()];
                let ti = TARGETS.iter().position(|t| t == name).expect("target");
                let (run, errors) = load(addr, conns, warmup, secs).await;
                eprintln!(
                    "round {} {name:>6} x{conns:<3}: {:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms  errors {}",
                    round + 1,
                    run.rps,
                    run.p50_ms,
                    run.p99_ms,
                    run.errors
                );
                for e in errors.iter().take(3) {
                    error_samples.push(format!("{name} x{conns} round {}: {e}", round + 1));
                }
                runs[ti][ci].push(run);
            }
        }
    }
    drop(nginx);

    // The warm node: the service goes down and another comes up.
    client
        .clone()
        .serve_down(pb::ServeDownRequest { name: "lb".into() })
        .await
        .expect("ServeDown");
    let deadline = Instant::now() + Duration::from_secs(60);
    while service(&client, "lb").await.is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nodes_before = c.nodes().await.len();
    let (s, warm_ready_s) = serve_up(&client, "warm", task(1, ""), 1).await;
    let warm_node = s
        .replicas
        .iter()
        .find(|r| r.status == "READY")
        .map(|r| r.node_id.clone())
        .unwrap_or_default();
    let same_node = warm_node == replica.node_id;
    eprintln!(
        "service warm: READY in {warm_ready_s:.2} s on {warm_node} (same node: {same_node}, nodes before: {nodes_before})"
    );
    drop(client);
    drop(c);

    // --- Preemption ---
    let dir = tempfile::tempdir().expect("tempdir");
    let providers = dir.path().join("providers.yaml");
    std::fs::write(&providers, SPOT_PROVIDERS).expect("providers");
    let c = Coordinator::start(&["--providers", providers.to_str().expect("path")]).await;
    let client = c.client().await;
    let (s, spot_ready_s) = serve_up(
        &client,
        "spot",
        task(2, "  cpus: 2\n  use_spot: true\n  infra: local\n"),
        2,
    )
    .await;
    let lb = s.endpoints.first().expect("an endpoint").clone();
    eprintln!("service spot: 2 READY in {spot_ready_s:.2} s");
    let stop = Arc::new(AtomicBool::new(false));
    let (log, load_task) = steady_load(lb.clone(), Duration::from_millis(5), stop.clone());
    let (mut listed_ms, mut left_ms, mut replaced_s) = (Vec::new(), Vec::new(), Vec::new());
    let mut preempt_errors = 0usize;
    let mut preempt_rows = Vec::new();
    for round in 0..preempt_rounds {
        let s = ready(&client, "spot", 2, Duration::from_secs(120)).await;
        let victim = s
            .replicas
            .iter()
            .find(|r| r.status == "READY")
            .expect("READY")
            .clone();
        // The agent polls AWS's and Azure's metadata every second, and the
        // rounds would otherwise fall at one phase of that poll (each node's
        // agent starts a fixed time after the notice before): the notices
        // are spread evenly over a second.
        let spread = 1000 * round as u64 / preempt_rounds as u64;
        tokio::time::sleep(Duration::from_millis(1000 + spread)).await;
        let before = log.lock().unwrap().len();
        let noticed = Instant::now();
        client
            .clone()
            .inject_preemption(pb::InjectPreemptionRequest {
                node_id: victim.node_id.clone(),
                format: notice_format as i32,
                warning: Some(nembo_proto::clock::duration(20_000)),
            })
            .await
            .expect("InjectPreemption");
        let listed = loop {
            let s = service(&client, "spot").await.expect("service");
            if s.replicas
                .iter()
                .any(|r| r.replica_id == victim.replica_id && r.status == "PREEMPTED")
            {
                break noticed.elapsed();
            }
            assert!(
                noticed.elapsed() < Duration::from_secs(30),
                "replica {} never PREEMPTED: {s:?}",
                victim.replica_id
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // Traffic for a while after, to see none reach the victim.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let body = format!("replica {}", victim.replica_id);
        let (last, errors, after) = {
            let log = log.lock().unwrap();
            let last = log[before..]
                .iter()
                .filter(|(_, r)| matches!(r, Ok((200, b)) if *b == body))
                .map(|(at, _)| at.saturating_duration_since(noticed).as_secs_f64() * 1e3)
                .fold(0.0f64, f64::max);
            let errors: Vec<String> = log[before..]
                .iter()
                .filter_map(|(_, r)| match r {
                    Ok((200, _)) => None,
                    Ok((code, b)) => Some(format!("{code} {b}")),
                    Err(e) => Some(e.clone()),
                })
                .collect();
            (last, errors, log.len() - before)
        };
        for e in errors.iter().take(3) {
            error_samples.push(format!("preempt round {}: {e}", round + 1));
        }
        preempt_errors += errors.len();
        let t_listed = listed.as_secs_f64() * 1e3;
        eprintln!(
            "preempt round {}: replica {} on {}: PREEMPTED listed after {t_listed:.0} ms, \
             last answer sent {last:.0} ms after the notice; {after} requests, {} errors",
            round + 1,
            victim.replica_id,
            victim.node_id,
            errors.len()
        );
        // The replacement's READY, from the notice.
        ready(&client, "spot", 2, Duration::from_secs(120)).await;
        let repl = noticed.elapsed().as_secs_f64();
        listed_ms.push(t_listed);
        left_ms.push(last);
        replaced_s.push(repl);
        preempt_rows.push((
            round + 1,
            victim.replica_id,
            t_listed,
            last,
            repl,
            errors.len(),
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = load_task.await;
    let total_requests = log.lock().unwrap().len();
    drop(client);
    drop(c);

    // --- Report ---
    let med = |ti: usize, ci: usize, f: fn(&Run) -> f64| -> f64 {
        median(&runs[ti][ci].iter().map(f).collect::<Vec<_>>())
    };
    // Added latency, per round, then the median.
    let added = |ti: usize, ci: usize, f: fn(&Run) -> f64| -> f64 {
        let v: Vec<f64> = runs[ti][ci]
            .iter()
            .zip(&runs[0][ci])
            .map(|(p, d)| f(p) - f(d))
            .collect();
        median(&v)
    };
    let has_nginx = nginx_version.is_some();
    let mut load_json = serde_json::Map::new();
    for (ti, t) in TARGETS.iter().enumerate() {
        if ti == 2 && !has_nginx {
            continue;
        }
        let mut per = serde_json::Map::new();
        for (ci, conns) in CONCURRENCY.iter().enumerate() {
            let mut o = json!({
                "rps": med(ti, ci, |r| r.rps),
                "p50_ms": med(ti, ci, |r| r.p50_ms),
                "p99_ms": med(ti, ci, |r| r.p99_ms),
                "errors": runs[ti][ci].iter().map(|r| r.errors).sum::<u64>(),
                "rounds_rps": runs[ti][ci].iter().map(|r| r.rps).collect::<Vec<_>>(),
                "rounds_p99_ms": runs[ti][ci].iter().map(|r| r.p99_ms).collect::<Vec<_>>(),
            });
            if ti > 0 {
                o["added_p50_ms"] = json!(added(ti, ci, |r| r.p50_ms));
                o["added_p99_ms"] = json!(added(ti, ci, |r| r.p99_ms));
            }
            per.insert(conns.to_string(), o);
        }
        load_json.insert(t.to_string(), Value::Object(per));
    }
    let out = json!({
        "cpus": cpus,
        "rounds": rounds,
        "seconds": secs.as_secs(),
        "nginx": nginx_version,
        "load": load_json,
        "serve_up_to_ready_s": {
            "fresh_coordinator": cold_ready_s,
            "warm_node": warm_ready_s,
            "warm_same_node": same_node,
            "spot_two_replicas": spot_ready_s,
        },
        "preemption": {
            "rounds": preempt_rounds,
            "notice_format": notice,
            "notice_to_listed_preempted_ms": summary(&listed_ms),
            "notice_to_last_request_answered_ms": summary(&left_ms),
            "notice_to_replacement_ready_s": summary(&replaced_s),
            "requests": total_requests,
            "errors": preempt_errors,
        },
        "error_samples": error_samples,
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));

    println!();
    println!(
        "load generator, coordinator, replica and nginx share this machine's {cpus} cores; \
         medians of {rounds} rounds of {} s",
        secs.as_secs()
    );
    println!(
        "{:<7} {:>5} {:>10} {:>9} {:>9} {:>11} {:>11} {:>7}",
        "target", "conns", "req/s", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms", "errors"
    );
    for (ci, conns) in CONCURRENCY.iter().enumerate() {
        for (ti, t) in TARGETS.iter().enumerate() {
            if ti == 2 && !has_nginx {
                continue;
            }
            let (a50, a99) = if ti == 0 {
                ("".to_string(), "".to_string())
            } else {
                (
                    format!("{:.3}", added(ti, ci, |r| r.p50_ms)),
                    format!("{:.3}", added(ti, ci, |r| r.p99_ms)),
                )
            };
            println!(
                "{:<7} {:>5} {:>10.0} {:>9.3} {:>9.3} {:>11} {:>11} {:>7}",
                t,
                conns,
                med(ti, ci, |r| r.rps),
                med(ti, ci, |r| r.p50_ms),
                med(ti, ci, |r| r.p99_ms),
                a50,
                a99,
                runs[ti][ci].iter().map(|r| r.errors).sum::<u64>()
            );
        }
    }
    if has_nginx {
        println!();
        println!(
            "{:>5} {:>16} {:>22}",
            "conns", "rps nembo/nginx", "+p99 nembo/nginx"
        );
        for (ci, conns) in CONCURRENCY.iter().enumerate() {
            println!(
                "{:>5} {:>16.2} {:>22.2}",
                conns,
                med(1, ci, |r| r.rps) / med(2, ci, |r| r.rps),
                added(1, ci, |r| r.p99_ms) / added(2, ci, |r| r.p99_ms)
            );
        }
    }
    println!();
    println!(
        "serve up -> first READY: fresh coordinator {cold_ready_s:.2} s, warm node {warm_ready_s:.2} s \
         (same node: {same_node}); 2 spot replicas {spot_ready_s:.2} s"
    );
    println!(
        "preemption notices in {notice}'s format, requests through the load balancer every 5 ms"
    );
    println!("round  replica  notice->PREEMPTED ms  notice->last answer ms  notice->replacement READY s  errors");
    for r in &preempt_rows {
        println!(
            "{:>5}  {:>7}  {:>20.0}  {:>22.0}  {:>27.2}  {:>6}",
            r.0, r.1, r.2, r.3, r.4, r.5
        );
    }
    println!(
        "median / max: PREEMPTED {:.0} / {:.0} ms, last answer {:.0} / {:.0} ms",
        median(&listed_ms),
        listed_ms.iter().copied().fold(0.0, f64::max),
        median(&left_ms),
        left_ms.iter().copied().fold(0.0, f64::max)
    );
}
