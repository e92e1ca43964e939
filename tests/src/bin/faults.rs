//! The fault suite (issue 14), with real faults: coordinators and agents in
//! network namespaces of their own, cut apart by routes and slowed by netem;
//! a coordinator whose disk fills up and one whose fsync fails; and a churn
//! soak. Needs root. Prints a table and, last, one JSON line.
//!
//! `faults [--skip-net] [--skip-disk] [--soak SECONDS]`
//!
//! What is checked, every time:
//! - the clients' histories are linearizable (`nembo_tests::history`);
//! - every write a client saw acknowledged is in the state afterwards;
//! - never two live attempts of one job (each attempt's process marks
//!   itself in a shared directory; a watcher looks ten times a second);
//! - agents follow the majority: after each fault, every agent's node is
//!   ready again on the leader.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nembo_proto::client::{call, Client};
use nembo_proto::v1 as pb;
use nembo_tests::faults::{failing_fsync_shim, Members, Net};
use nembo_tests::history::{client_loop, submit_req, History, Op, Ret};
use nembo_tests::{alive, bin, proc_usage};
use serde_json::{json, Value};

const MEMBER_FLAGS: &[&str] = &[
    "--max-nodes",
    "0",
    "--heartbeat-ms",
    "300",
    "--node-ttl-ms",
    "6000",
    "--stop-grace-ms",
    "1000",
];

/// Writes acknowledged to a client, and the longest it waited for one.
#[derive(Default)]
struct Probe {
    acked: BTreeMap<String, String>,
    /// (when the gap ended, its length).
    gaps: Vec<(Instant, Duration)>,
    attempted_after: Option<Instant>,
    acked_after_flag: usize,
}

/// Submits one job every 100 ms under a fresh idempotency key, retrying
/// each until it is acknowledged (the key makes that safe).
/// Its submissions go into `history` too, where there is one: reads see them.
async fn probe(
    client: Client,
    prefix: String,
    log: Arc<Mutex<Probe>>,
    stop: Arc<AtomicBool>,
    history: Option<Arc<Mutex<History>>>,
    pause: Duration,
) {
    let mut last_ok = Instant::now();
    let mut i = 0u64;
    let thread = history.as_ref().map(|h| h.lock().unwrap().thread());
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let key = format!("{prefix}-{i}");
        let invoked = Instant::now();
        if let (Some(h), Some(t)) = (&history, thread) {
            h.lock().unwrap().invoke(t, Op::Submit(key.clone()));
        }
        let mut retried = false;
        while !stop.load(Ordering::Relaxed) || (retried && history.is_some()) {
            let mut c = client.clone();
            let mut req = tonic::Request::new(submit_req(&key));
            req.set_timeout(Duration::from_secs(1));
            match c.submit_job(req).await {
                Ok(r) => {
                    let now = Instant::now();
                    let r = r.into_inner();
                    if let (Some(h), Some(t)) = (&history, thread) {
                        let ret = Ret::Submitted {
                            id: r.job_id.parse().unwrap_or(0),
                            existing: r.existing,
                        };
                        let mut h = h.lock().unwrap();
                        if retried {
                            h.ret_after_retry(t, ret);
                        } else {
                            h.ret(t, ret);
                        }
                    }
                    let mut l = log.lock().unwrap();
                    l.acked.insert(key.clone(), r.job_id);
                    l.gaps.push((now, now - last_ok));
                    if l.attempted_after.is_some_and(|f| invoked > f) {
                        l.acked_after_flag += 1;
                    }
                    last_ok = now;
                    break;
                }
                Err(_) => {
                    retried = true;
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// Every job in full, page by page (the state holds far more than a page).
async fn every_job(client: &Client) -> Result<Vec<pb::Job>, String> {
    nembo_proto::client::all_pages(|page_token| {
        let client = client.clone();
        async move {
            // Full: the idempotency key is there; small pages, since
            // some tasks are 200 KiB.
            let req = pb::ListJobsRequest {
                page_size: 50,
                page_token,
                view: pb::JobView::Full as i32,
                ..Default::default()
            };
            let r = call(&client, req, |mut c, r| async move { c.list_jobs(r).await }).await?;
            Ok::<_, tonic::Status>((r.jobs, r.next_page_token))
        }
    })
    .await
    .map_err(|e| format!("the jobs could not be listed: {e}"))
}

/// Acknowledged writes missing from the state (or under another id).
async fn lost_writes(
    client: &Client,
    acked: &BTreeMap<String, String>,
) -> Result<Vec<String>, String> {
    let jobs = every_job(client).await?;
    let by_key: BTreeMap<String, String> = jobs
        .into_iter()
        .map(|j| (j.idempotency_key, j.job_id))
        .collect();
    Ok(acked
        .iter()
        .filter(|(k, id)| by_key.get(*k) != Some(id))
        .map(|(k, _)| k.clone())
        .collect())
}

/// Watches `live` (one file per running attempt, `<job>-<attempt>`
/// holding its pid) for two live attempts of one job at once.
fn watch_attempts(live: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let mut by_job: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for e in std::fs::read_dir(&live).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid: i32 = std::fs::read_to_string(e.path())
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                if pid > 0 && alive(pid) {
                    if let Some((job, attempt)) = name.rsplit_once('-') {
                        by_job.entry(job.into()).or_default().push(attempt.into());
                    }
                }
            }
            for (job, attempts) in by_job {
                if attempts.len() > 1 {
                    let v = format!(
                        "job {job}: attempts {} live at once",
                        attempts.join(" and ")
                    );
                    if !seen.contains(&v) {
                        eprintln!("VIOLATION {v}");
                        seen.push(v);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        seen
    })
}

/// A managed job that runs `secs` seconds on an agent and marks itself live.
fn managed_job(live: &Path, name: &str, secs: u32) -> pb::SubmitJobRequest {
    let yaml = format!(
        "name: {name}\nresources: {{cpus: 1+}}\nrun: |\n  f={live}/$NEMBO_JOB_ID-$NEMBO_ATTEMPT\n  echo $$ > $f\n  trap 'rm -f $f' EXIT\n  for i in $(seq 1 {secs}); do sleep 1; done\n",
        live = live.display()
    );
    pb::SubmitJobRequest {
        task: Some(pb::submit_job_request::Task::TaskYaml(yaml)),
        managed: true,
        idempotency_key: name.into(),
        ..Default::default()
    }
}

struct Agents {
    procs: Vec<(String, Child)>,
    root: PathBuf,
    /// The join token (uses for every node the run makes).
    token: String,
    /// Base URL of a metadata service answering as AWS's, per agent host.
    metadata: Option<String>,
}

impl Agents {
    async fn start(net: &Net, m: &Members<'_>, hosts: &[&str], metadata: Option<String>) -> Agents {
        let client = m.client();
        let req = pb::CreateJoinTokenRequest {
            uses: 100,
            ..Default::default()
        };
        let token = call(&client, req, |mut c, r| async move {
            c.create_join_token(r).await
        })
        .await
        .expect("join token")
        .token;
        let mut a = Agents {
            procs: Vec::new(),
            root: m.root.clone(),
            token,
            metadata,
        };
        for h in hosts {
            a.spawn(net, m, h);
        }
        a
    }

    fn spawn(&mut self, net: &Net, m: &Members<'_>, host: &str) {
        // An agent removes the token file once it has enrolled: each host
        // has its own (two agents starting at once sharing one raced, one
        // deleting it before the other had read it), and a fresh node
        // (after a preemption) needs it again.
        let token_file = self.root.join(format!("join-token-{host}"));
        if !token_file.exists() {
            nembo_tests::write_private(&token_file, &self.token);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(format!("agent-{host}.log")))
            .expect("log");
        let mut cmd = net.command(host, &bin("nembo-agent"));
        for url in m.urls() {
            cmd.args(["--coordinator", &url]);
        }
        if let Some(base) = &self.metadata {
            cmd.args(["--aws-metadata-url", &format!("{base}/{host}/aws")]);
            cmd.args(["--preemption-poll-ms", "500"]);
        }
        let child = cmd
            .arg("--ca-cert")
            .arg(m.root.join("tls/ca.pem"))
            .arg("--join-token-file")
            .arg(&token_file)
            .arg("--work-dir")
            .arg(self.root.join(format!("agent-{host}")))
            .args([
                "--address",
                &net.ip(host),
                "--cpus",
                "4",
                "--heartbeat-ms",
                "300",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start agent");
        self.procs.retain(|(h, _)| h != host);
        self.procs.push((host.to_string(), child));
    }

    fn kill9(&mut self, host: &str) {
        for (h, c) in &mut self.procs {
            if h == host {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for (_, c) in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Their jobs run in process groups of their own.
        nembo_tests::faults::kill_mentioning(&self.root.join("agent-").display().to_string());
    }
}

/// Waits until the leader sees `n` ready nodes; how long that took.
async fn agents_ready(client: &Client, n: usize, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        let mut c = client.clone();
        let mut req = tonic::Request::new(pb::ListNodesRequest {
            page_size: 1000,
            ..Default::default()
        });
        req.set_timeout(Duration::from_secs(1));
        if let Ok(r) = c.list_nodes(req).await {
            let ready = r
                .into_inner()
                .nodes
                .iter()
                .filter(|n| n.state == pb::NodeState::Ready as i32)
                .count();
            if ready >= n {
                return Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn longest_gap(probe: &Mutex<Probe>, from: Instant, to: Instant) -> u128 {
    probe
        .lock()
        .unwrap()
        .gaps
        .iter()
        .filter(|(at, _)| *at >= from && *at <= to)
        .map(|(_, g)| g.as_millis())
        .max()
        .unwrap_or(0)
}

struct Row {
    fault: String,
    result: String,
}

/// Records a fault's longest client wait and how soon agents were back.
fn scenario(
    rows: &mut Vec<Row>,
    out: &mut serde_json::Map<String, Value>,
    name: &str,
    from: Instant,
    ready: Option<Duration>,
    probe_log: &Mutex<Probe>,
) {
    let gap = longest_gap(probe_log, from, Instant::now());
    let agents = match ready {
        Some(d) => format!("agents ready again in {} ms", d.as_millis()),
        None => "AGENTS NOT BACK".into(),
    };
    out.insert(
        name.into(),
        json!({"longest_unavailable_ms": gap, "agents_back_ms": ready.map(|d| d.as_millis())}),
    );
    rows.push(Row {
        fault: name.into(),
        result: format!("longest client wait {gap} ms; {agents}"),
    });
}

/// A run's directory, and in it the one where attempts mark themselves
/// live (see [`watch_attempts`]).
fn scratch(prefix: &str) -> Result<(tempfile::TempDir, PathBuf), String> {
    let root = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| e.to_string())?;
    let live = root.path().join("live");
    std::fs::create_dir_all(&live).map_err(|e| e.to_string())?;
    Ok((root, live))
}

async fn net_suite(
    rows: &mut Vec<Row>,
    out: &mut serde_json::Map<String, Value>,
) -> Result<(), String> {
    let net = Net::up(&["c1", "c2", "c3", "a1", "a2"])?;
    let netem = Net::has_netem();
    let (root, live) = scratch("nembo-faults")?;
    let mut m = Members::start(&net, root.path(), 3, MEMBER_FLAGS, Vec::new());
    let mut leader = m.leader(Duration::from_secs(30)).await.ok_or("no leader")?;
    let client = m.client();
    let mut agents = Agents::start(&net, &m, &["a1", "a2"], None).await;
    agents_ready(&client, 2, Duration::from_secs(30))
        .await
        .ok_or("agents never joined")?;

    // The long managed jobs are the history's first four operations (ids
    // 1 to 4, which its clients do not cancel), so its reads add up.
    let history: Arc<Mutex<History>> = Arc::default();
    let first = history.lock().unwrap().thread();
    for i in 0..4 {
        let name = format!("long-{i}");
        history
            .lock()
            .unwrap()
            .invoke(first, Op::Submit(name.clone()));
        let req = managed_job(&live, &name, 600);
        let r = call(
            &client,
            req,
            |mut c, r| async move { c.submit_job(r).await },
        )
        .await
        .map_err(|e| e.to_string())?;
        let ret = Ret::Submitted {
            id: r.job_id.parse().unwrap_or(0),
            existing: r.existing,
        };
        history.lock().unwrap().ret_after_retry(first, ret);
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Slow enough that the job table stays within one page of reads.
    let clients: Vec<_> = (0..3)
        .map(|me| {
            let pause = Duration::from_millis(400);
            tokio::spawn(client_loop(
                m.client(),
                history.clone(),
                me,
                stop.clone(),
                pause,
                5,
            ))
        })
        .collect();
    let probe_log: Arc<Mutex<Probe>> = Arc::default();
    let prober = tokio::spawn(probe(
        m.client(),
        "p".into(),
        probe_log.clone(),
        stop.clone(),
        Some(history.clone()),
        Duration::from_millis(250),
    ));
    let watch_stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_attempts(live.clone(), watch_stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settle = || tokio::time::sleep(Duration::from_secs(4));
    let peers = |l: u64| {
        (1..=3u64)
            .filter(move |id| *id != l)
            .map(|id| format!("c{id}"))
    };

    // 1. The leader partitioned from the other members and the agents.
    let t = Instant::now();
    let l = format!("c{leader}");
    for p in peers(leader).chain(["a1".into(), "a2".into()]) {
        net.partition(&l, &p);
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    net.heal();
    let ready = agents_ready(&client, 2, Duration::from_secs(30)).await;
    settle().await;
    scenario(rows, out, "partitioned leader (6 s)", t, ready, &probe_log);

    // 2. One way: the leader's packets to the others are dropped, theirs
    // still reach it.
    leader = m.leader(Duration::from_secs(30)).await.ok_or("no leader")?;
    let t = Instant::now();
    let l = format!("c{leader}");
    for p in peers(leader) {
        net.cut(&l, &p);
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    net.heal();
    let ready = agents_ready(&client, 2, Duration::from_secs(30)).await;
    settle().await;
    scenario(
        rows,
        out,
        "one-way cut, leader to members (6 s)",
        t,
        ready,
        &probe_log,
    );

    // 3. A flapping link: a follower cut from the others every other half second.
    leader = m.leader(Duration::from_secs(30)).await.ok_or("no leader")?;
    let follower = format!("c{}", (1..=3).find(|id| *id != leader).unwrap());
    let t = Instant::now();
    for _ in 0..10 {
        for p in ["c1", "c2", "c3"].into_iter().filter(|p| *p != follower) {
            net.partition(&follower, p);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        net.heal();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ready = agents_ready(&client, 2, Duration::from_secs(30)).await;
    settle().await;
    scenario(
        rows,
        out,
        "flapping follower link (10 x 0.5 s)",
        t,
        ready,
        &probe_log,
    );

    // 4. 200 ms latency and 5% loss on every link, where netem exists.
    if netem {
        let t = Instant::now();
        for h in ["c1", "c2", "c3", "a1", "a2"] {
            net.netem(h, Some("delay 200ms loss 5%"))?;
        }
        tokio::time::sleep(Duration::from_secs(15)).await;
        for h in ["c1", "c2", "c3", "a1", "a2"] {
            let _ = net.netem(h, None);
        }
        let ready = agents_ready(&client, 2, Duration::from_secs(30)).await;
        settle().await;
        scenario(
            rows,
            out,
            "200 ms latency + 5% loss everywhere (15 s)",
            t,
            ready,
            &probe_log,
        );
    } else {
        rows.push(Row {
            fault: "200 ms latency".into(),
            result: "NOT RUN: this kernel has no sch_netem".into(),
        });
        out.insert(
            "netem".into(),
            json!("not run: no sch_netem in this kernel"),
        );
        if Net::has_nft() {
            let t = Instant::now();
            for h in ["c1", "c2", "c3", "a1", "a2"] {
                net.loss(h, 5)?;
            }
            tokio::time::sleep(Duration::from_secs(15)).await;
            for h in ["c1", "c2", "c3", "a1", "a2"] {
                let _ = net.loss(h, 0);
            }
            let ready = agents_ready(&client, 2, Duration::from_secs(30)).await;
            settle().await;
            scenario(
                rows,
                out,
                "5% loss on every link, nftables (15 s)",
                t,
                ready,
                &probe_log,
            );
        }
    }

    // 5. An agent cut off from every coordinator for longer than a node
    // lives without heartbeats: its managed jobs recover elsewhere, and its
    // own attempts must not go on beside the new ones.
    let busy = busiest_agent(root.path());
    let t = Instant::now();
    for c in ["c1", "c2", "c3"] {
        net.partition(&busy, c);
    }
    tokio::time::sleep(Duration::from_secs(12)).await;
    net.heal();
    let ready = agents_ready(&client, 2, Duration::from_secs(30)).await;
    settle().await;
    scenario(
        rows,
        out,
        "agent cut from every coordinator (12 s)",
        t,
        ready,
        &probe_log,
    );

    // 6. kill -9 of the leader and of an agent, both brought back.
    leader = m.leader(Duration::from_secs(30)).await.ok_or("no leader")?;
    let t = Instant::now();
    m.kill9(leader);
    agents.kill9("a2");
    tokio::time::sleep(Duration::from_secs(3)).await;
    m.spawn(leader);
    agents.spawn(&net, &m, "a2");
    let ready = agents_ready(&client, 2, Duration::from_secs(30)).await;
    settle().await;
    scenario(
        rows,
        out,
        "kill -9 leader and an agent, restarted",
        t,
        ready,
        &probe_log,
    );

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(30), c).await;
    }
    let _ = prober.await;
    watch_stop.store(true, Ordering::Relaxed);
    let doubles = watcher.join().unwrap_or_default();
    let history = history.lock().unwrap().clone();
    let linearizable = history.check_linearizable();
    if let Err(e) = &linearizable {
        let path = std::env::temp_dir().join("nembo-faults-history.txt");
        let _ = std::fs::write(&path, e);
        eprintln!("not linearizable; the history is in {}", path.display());
    }
    let acked = probe_log.lock().unwrap().acked.clone();
    let lost = lost_writes(&client, &acked).await?;
    let attempts = attempts_of(&client).await;
    out.insert(
        "net_checks".into(),
        json!({
            "history_ops": history.completed(),
            "linearizable": linearizable.is_ok(),
            "acked_writes": acked.len(),
            "acked_writes_lost": lost.len(),
            "double_live_attempts": doubles,
            "managed_attempts": attempts,
        }),
    );
    rows.push(Row {
        fault: "checks after all of the above".into(),
        result: format!(
            "history of {} ops {}; {} acked writes, {} lost; {} double live attempts; managed attempts {:?}",
            history.completed(),
            if linearizable.is_ok() { "linearizable" } else { "NOT LINEARIZABLE" },
            acked.len(),
            lost.len(),
            doubles.len(),
            attempts
        ),
    });
    drop(agents);
    drop(m);
    if std::env::var_os("NEMBO_FAULTS_KEEP").is_some() {
        eprintln!("keeping {}", root.keep().display());
    }
    Ok(())
}

/// The agent running the most job processes now.
fn busiest_agent(root: &Path) -> String {
    let running = |host: &str| {
        std::fs::read_dir(root.join(format!("agent-{host}/jobs")))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|j| {
                std::fs::read_to_string(j.path().join("pid"))
                    .ok()
                    .and_then(|p| p.trim().parse().ok())
                    .is_some_and(alive)
            })
            .count()
    };
    if running("a2") > running("a1") {
        "a2"
    } else {
        "a1"
    }
    .to_string()
}

/// Attempts per managed job, by name.
async fn attempts_of(client: &Client) -> BTreeMap<String, usize> {
    every_job(client)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|j| j.managed.is_some())
        .map(|j| (j.name, j.attempts.len()))
        .collect()
}

/// A single coordinator whose disk fills up, then one whose fsync fails.
async fn disk_suite(
    rows: &mut Vec<Row>,
    out: &mut serde_json::Map<String, Value>,
) -> Result<(), String> {
    let net = Net::up(&["c1"])?;
    let root = tempfile::Builder::new()
        .prefix("nembo-faults-disk")
        .tempdir()
        .map_err(|e| e.to_string())?;

    // Disk full: the member's data dir on an 8 MiB tmpfs.
    let data = root.path().join("member-1");
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    nembo_tests::faults::run(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "size=8m",
        "tmpfs",
        data.to_str().unwrap(),
    ])?;
    let mut m = Members::start(&net, root.path(), 1, MEMBER_FLAGS, Vec::new());
    m.leader(Duration::from_secs(30)).await.ok_or("no leader")?;
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Probe>> = Arc::default();
    let filler = tokio::spawn(probe(
        m.client(),
        "full".into(),
        log.clone(),
        stop.clone(),
        None,
        Duration::from_millis(100),
    ));
    // Large tasks fill the disk quickly.
    let client = m.client();
    let big = "#".repeat(200 * 1024);
    let mut acked_big = BTreeMap::new();
    let started = Instant::now();
    let mut exit = None;
    for i in 0.. {
        if let Some(e) = m.exited(1) {
            exit = Some(e);
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
        let key = format!("big-{i}");
        let req = pb::SubmitJobRequest {
            task: Some(pb::submit_job_request::Task::TaskYaml(format!(
                "name: {key}\nresources: {{accelerators: H100:8}}\nrun: |\n  {big}\n"
            ))),
            idempotency_key: key.clone(),
            ..Default::default()
        };
        let mut c = client.clone();
        let mut r = tonic::Request::new(req);
        r.set_timeout(Duration::from_secs(2));
        if let Ok(r) = c.submit_job(r).await {
            acked_big.insert(key, r.into_inner().job_id);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = filler.await;
    let exited = exit.is_some();
    m.kill9(1);
    nembo_tests::faults::run(&["mount", "-o", "remount,size=256m", data.to_str().unwrap()])?;
    m.spawn(1);
    m.leader(Duration::from_secs(30))
        .await
        .ok_or("no leader after the disk was freed")?;
    let mut acked = log.lock().unwrap().acked.clone();
    acked.extend(acked_big);
    let lost = lost_writes(&m.client(), &acked).await?;
    out.insert("disk_full".into(), json!({"member_exited": exited, "acked_writes": acked.len(), "acked_writes_lost": lost.len()}));
    rows.push(Row {
        fault: "disk full (8 MiB tmpfs), then freed".into(),
        result: format!(
            "member {}; {} acked writes, {} lost after restart",
            if exited {
                "exited with the reason"
            } else {
                "DID NOT EXIT"
            },
            acked.len(),
            lost.len()
        ),
    });
    drop(m);
    let _ = nembo_tests::faults::run(&["umount", data.to_str().unwrap()]);
    // The fsync member gets a log of its own.
    let _ = std::fs::rename(
        root.path().join("member-1.log"),
        root.path().join("member-1-disk-full.log"),
    );

    // fsync fails (EIO) from a moment on.
    let _ = std::fs::remove_dir_all(&data);
    let shim = failing_fsync_shim(root.path())?;
    let flag = root.path().join("fail-fsync");
    let env = vec![
        ("LD_PRELOAD".into(), shim.display().to_string()),
        ("NEMBO_FAIL_FSYNC_FLAG".into(), flag.display().to_string()),
    ];
    let mut m = Members::start(&net, root.path(), 1, MEMBER_FLAGS, env);
    m.leader(Duration::from_secs(30)).await.ok_or("no leader")?;
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Probe>> = Arc::default();
    let writer = tokio::spawn(probe(
        m.client(),
        "fsync".into(),
        log.clone(),
        stop.clone(),
        None,
        Duration::from_millis(50),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    std::fs::write(&flag, "").map_err(|e| e.to_string())?;
    let flagged = Instant::now();
    log.lock().unwrap().attempted_after = Some(flagged + Duration::from_millis(200));
    let mut exited = false;
    while flagged.elapsed() < Duration::from_secs(10) {
        if m.exited(1).is_some() {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = std::fs::remove_file(&flag);
    let _ = writer.await;
    m.kill9(1);
    m.env.clear();
    m.spawn(1);
    m.leader(Duration::from_secs(30))
        .await
        .ok_or("no leader after fsync came back")?;
    let (acked, after) = {
        let l = log.lock().unwrap();
        (l.acked.clone(), l.acked_after_flag)
    };
    let why = std::fs::read_to_string(root.path().join("member-1.log"))
        .unwrap_or_default()
        .lines()
        .skip_while(|l| !l.contains("storage failed") && !l.contains("panicked"))
        .take(3)
        .map(|l| {
            l.split_once("Z ")
                .map_or(l, |(_, rest)| rest)
                .trim()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(" / ");
    out.insert("fsync_exit_reason".into(), json!(why));
    let lost = lost_writes(&m.client(), &acked).await?;
    out.insert("fsync_fails".into(), json!({"member_exited": exited, "acked_after_failure": after, "acked_writes": acked.len(), "acked_writes_lost": lost.len()}));
    rows.push(Row {
        fault: "fsync fails with EIO (LD_PRELOAD)".into(),
        result: format!(
            "member {}; {} writes acked after fsync began failing; {} acked writes, {} lost after restart",
            if exited { "exited with the reason" } else { "DID NOT EXIT" },
            after,
            acked.len(),
            lost.len()
        ),
    });
    Ok(())
}

/// Everything at once, for `secs`: managed jobs, member and agent kills
/// and restarts, partitions that come and go, and clients writing.
async fn soak(
    secs: u64,
    rows: &mut Vec<Row>,
    out: &mut serde_json::Map<String, Value>,
) -> Result<(), String> {
    let net = Net::up(&["c1", "c2", "c3", "a1", "a2"])?;
    let netem = Net::has_netem();
    let (mut root, live) = scratch("nembo-soak")?;
    // NEMBO_FAULTS_KEEP=1 keeps the members' and agents' dirs and logs.
    if std::env::var_os("NEMBO_FAULTS_KEEP").is_some() {
        root.disable_cleanup(true);
        eprintln!("soak: keeping {}", root.path().display());
    }
    let mut m = Members::start(&net, root.path(), 3, MEMBER_FLAGS, Vec::new());
    m.leader(Duration::from_secs(30)).await.ok_or("no leader")?;
    let client = m.client();
    // Spot notices in AWS's format, from a metadata service on the bridge.
    let notices = root.path().join("metadata");
    let listener = tokio::net::TcpListener::bind((net.bridge_ip(), 0))
        .await
        .map_err(|e| e.to_string())?;
    let metadata = nembo_coordinator::provider::metadata::serve(listener, notices.clone())
        .map_err(|e| e.to_string())?;
    let mut agents = Agents::start(&net, &m, &["a1", "a2"], Some(metadata)).await;
    agents_ready(&client, 2, Duration::from_secs(30))
        .await
        .ok_or("agents never joined")?;
    let lossy = netem || Net::has_nft();
    for h in ["c1", "c2", "c3", "a1", "a2"] {
        if netem {
            net.netem(h, Some("loss 1%"))?;
        } else if lossy {
            net.loss(h, 1)?;
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let probe_log: Arc<Mutex<Probe>> = Arc::default();
    let prober = tokio::spawn(probe(
        m.client(),
        "s".into(),
        probe_log.clone(),
        stop.clone(),
        None,
        Duration::from_millis(250),
    ));
    let watcher = watch_attempts(live.clone(), stop.clone());
    let started = Instant::now();
    let mut peak: BTreeMap<String, u64> = BTreeMap::new();
    let mut submitted = 0u32;
    let mut step = 0u64;
    let mut preemptions = 0u32;
    while started.elapsed() < Duration::from_secs(secs) {
        step += 1;
        // A new managed job every 5 s, 20 to 60 s of work each.
        let req = managed_job(
            &live,
            &format!("soak-{submitted}"),
            20 + (submitted * 7) % 40,
        );
        // One try with a deadline: the loop keeps its pace through faults
        // (the name is the idempotency key; a failed try is made again).
        let mut c = client.clone();
        let mut req = tonic::Request::new(req);
        req.set_timeout(Duration::from_secs(3));
        if c.submit_job(req).await.is_ok() {
            submitted += 1;
        }
        eprintln!(
            "soak: {:>5} s, step {step}, {submitted} jobs submitted",
            started.elapsed().as_secs()
        );
        match step % 12 {
            3 => {
                let id = 1 + (step / 12) % 3;
                m.kill9(id);
                tokio::time::sleep(Duration::from_secs(2)).await;
                m.spawn(id);
            }
            6 => {
                let a = if (step / 12).is_multiple_of(2) {
                    "a1"
                } else {
                    "a2"
                };
                agents.kill9(a);
                tokio::time::sleep(Duration::from_secs(2)).await;
                agents.spawn(&net, &m, a);
            }
            0 => {
                // A spot notice: the node goes in 10 s. Its agent is then
                // replaced by a fresh node, as a cloud would.
                let a = if (step / 12).is_multiple_of(2) {
                    "a2"
                } else {
                    "a1"
                };
                let notice = notices.join(a).join("preempt.json");
                let _ = std::fs::create_dir_all(notices.join(a));
                let deadline = nembo_proto::clock::now_ms() + 10_000;
                let _ = std::fs::write(
                    &notice,
                    json!({"format": "aws", "deadline_ms": deadline}).to_string(),
                );
                preemptions += 1;
                tokio::time::sleep(Duration::from_secs(12)).await;
                agents.kill9(a);
                let _ = std::fs::remove_file(&notice);
                let _ = std::fs::remove_dir_all(root.path().join(format!("agent-{a}")));
                agents.spawn(&net, &m, a);
            }
            9 => {
                if let Some(l) = m.leader(Duration::from_secs(5)).await {
                    for p in (1..=3).filter(|id| *id != l) {
                        net.partition(&format!("c{l}"), &format!("c{p}"));
                    }
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    net.heal();
                }
            }
            _ => {}
        }
        for id in 1..=3u64 {
            if let Some(pid) = m.pid(id) {
                let e = peak.entry(format!("coordinator {id}")).or_default();
                *e = (*e).max(proc_usage(pid).0);
            }
        }
        for (h, c) in &agents.procs {
            let e = peak.entry(format!("agent {h}")).or_default();
            *e = (*e).max(proc_usage(c.id()).0);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    // Let the last jobs finish. Two agents of 2 vCPUs hold four jobs at a
    // time, and a job of 20 to 60 s comes every 5 s, so a queue builds over
    // the run: wait until every managed job has ended (at most 15 minutes),
    // so that what did not complete is work lost, not work still queued.
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(900) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let Ok(jobs) = every_job(&client).await else {
            continue;
        };
        let open = jobs
            .iter()
            .filter(|j| j.managed.is_some())
            .filter(|j| {
                !matches!(
                    pb::JobState::try_from(j.state),
                    Ok(pb::JobState::Succeeded
                        | pb::JobState::Failed
                        | pb::JobState::FailedSetup
                        | pb::JobState::Cancelled)
                )
            })
            .count();
        eprintln!("soak: draining, {open} managed jobs still open");
        if open == 0 {
            break;
        }
    }
    let drained_s = drain.elapsed().as_secs();
    stop.store(true, Ordering::Relaxed);
    let _ = prober.await;
    let doubles = watcher.join().unwrap_or_default();
    let acked = probe_log.lock().unwrap().acked.clone();
    let lost = lost_writes(&client, &acked).await?;
    let gap = longest_gap(&probe_log, started, Instant::now());
    let jobs = every_job(&client).await?;
    let managed: Vec<&pb::Job> = jobs.iter().filter(|j| j.managed.is_some()).collect();
    let done = managed
        .iter()
        .filter(|j| j.state == pb::JobState::Succeeded as i32)
        .count();
    let failed: Vec<String> = managed
        .iter()
        .filter(|j| j.state == pb::JobState::Failed as i32)
        .map(|j| format!("{} {}", j.name, j.message))
        .collect();
    let attempts: usize = managed.iter().map(|j| j.attempts.len()).sum();
    // Work lost: managed jobs that did not complete (none should fail,
    // and the last ones had two minutes to end).
    let unfinished = managed.len() - done;
    let not_done: Vec<String> = managed
        .iter()
        .filter(|j| j.state != pb::JobState::Succeeded as i32)
        .map(|j| {
            let state = pb::JobState::try_from(j.state).map_or("?", |s| s.as_str_name());
            format!(
                "{} {state} after {} attempts: {}",
                j.name,
                j.attempts.len(),
                j.message
            )
        })
        .collect();
    out.insert(
        "soak".into(),
        json!({
            "seconds": secs,
            "drain_seconds": drained_s,
            "loss_1pct": lossy,
            "preemption_notices": preemptions,
            "managed_jobs": managed.len(),
            "completed": done,
            "failed": failed,
            "lost_work_jobs": unfinished,
            "not_completed": not_done,
            "attempts": attempts,
            "acked_writes": acked.len(),
            "acked_writes_lost": lost.len(),
            "double_live_attempts": doubles,
            "peak_rss_kib": peak,
            "longest_unavailable_ms": gap,
        }),
    );
    rows.push(Row {
        fault: format!("churn soak ({secs} s{})", if lossy { ", 1% loss" } else { ", no loss: neither netem nor nft here" }),
        result: format!(
            "{} managed jobs, {done} completed, {} failed, {unfinished} not completed after a {drained_s} s drain (lost work), {attempts} attempts, {preemptions} spot notices; {} acked writes, {} lost; {} double live attempts; longest client wait {gap} ms; peak RSS KiB {peak:?}",
            managed.len(),
            failed.len(),
            acked.len(),
            lost.len(),
            doubles.len()
        ),
    });
    drop(agents);
    drop(m);
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let has = |f: &str| args.iter().any(|a| a == f);
    let soak_secs = args
        .iter()
        .position(|a| a == "--soak")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse::<u64>().ok());
    if let Some(why) = Net::unavailable() {
        println!("{}", json!({"skipped": why}));
        eprintln!("fault suite not run: {why}");
        std::process::exit(2);
    }
    let mut rows = Vec::new();
    let mut out = serde_json::Map::new();
    let mut failed = Vec::new();
    if !has("--skip-net") {
        if let Err(e) = net_suite(&mut rows, &mut out).await {
            failed.push(format!("net: {e}"));
        }
    }
    if !has("--skip-disk") {
        if let Err(e) = disk_suite(&mut rows, &mut out).await {
            failed.push(format!("disk: {e}"));
        }
    }
    if let Some(secs) = soak_secs {
        if let Err(e) = soak(secs, &mut rows, &mut out).await {
            failed.push(format!("soak: {e}"));
        }
    }
    println!("| fault | result |\n|---|---|");
    for r in &rows {
        println!("| {} | {} |", r.fault, r.result);
    }
    out.insert("errors".into(), json!(failed));
    println!("{}", Value::Object(out));
    if !failed.is_empty() {
        eprintln!("{failed:?}");
        std::process::exit(1);
    }
}
