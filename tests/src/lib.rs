//! Test harness: real `nembo-coordinator`, `nembo-agent` and `nembo`
//! binaries on 127.0.0.1, real TLS, real processes, each test in its own
//! temporary data dir.
//!
//! The binaries are taken from the target dir this test runs from; build
//! them first (`cargo build --workspace`, as the README's test command does).

pub mod faults;
pub mod history;
pub mod sim;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nembo_proto::client::{connect, Client};
use nembo_proto::v1 as pb;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The target dir's binaries.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // Tests run from target/<profile>/deps/, the bench from target/<profile>/.
    let here = exe.parent().expect("exe dir");
    let p = [here, here.parent().unwrap_or(here)]
        .iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| here.join(name));
    assert!(
        p.is_file(),
        "{} is missing: build the binaries first with `cargo build --workspace`",
        p.display()
    );
    p
}

/// `--name N` from the command line of a bench binary, else `default`.
pub fn cli_arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (0..=1) of `v` (sorted in place); NaN when empty.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Polls `f` until it returns `Some`, or panics after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (RSS in KiB, CPU seconds used so far) of a process, from /proc.
pub fn proc_usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    (rss, ticks as f64 / 100.0)
}

/// GET `http://host:port/path` over plain HTTP/1.1: (status line and
/// headers, body), or None when nothing answered.
pub fn http_get(url: &str) -> Option<(String, String)> {
    use std::io::{Read, Write};
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host).ok()?;
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    Some((head.to_string(), body.to_string()))
}

/// The fake `libnvidia-ml.so.1` built by this crate's build script.
pub const FAKE_NVML: &str = env!("NEMBO_FAKE_NVML_LIB");

/// Values for the fake NVML library, in a file of their own that a test may
/// rewrite at any time (the agent sees the change on its next sample).
pub struct FakeGpus {
    dir: tempfile::TempDir,
    /// The value file (tests/fake-nvml/fake_nvml.c describes its format).
    pub values: PathBuf,
}

impl FakeGpus {
    /// Starts with `values`.
    pub fn new(values: &str) -> FakeGpus {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nvml.txt");
        std::fs::write(&path, values).expect("fake NVML values");
        FakeGpus { dir, values: path }
    }

    /// Replaces the values.
    pub fn set(&self, values: &str) {
        std::fs::write(&self.values, values).expect("fake NVML values");
    }

    /// A scratch dir beside the values, removed with them.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The environment under which agents load these GPUs; a coordinator
    /// started with it passes it on to the agents it starts.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("NEMBO_NVML_LIB", FAKE_NVML.to_string()),
            ("NEMBO_FAKE_NVML", self.values.display().to_string()),
        ]
    }
}

/// Whether a process runs (a zombie does not).
pub fn alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped by whoever inherited it) is dead.
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X")
    });
    !zombie && kill(Pid::from_raw(pid), None).is_ok()
}

/// Writes a token or key file as the binaries want it: 0600.
pub fn write_private(path: &Path, data: &str) {
    std::fs::write(path, data).expect("write");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod 600");
}

/// Every file under `dir` that holds `needle`.
pub fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                found.push(p.display().to_string());
            }
        }
    }
    found
}

/// A load balancer port of its own for a test's coordinators (`--lb-ports`):
/// tests run side by side, and members on one host share their services'
/// ports (SO_REUSEPORT), so two tests' services must never be given one.
pub fn free_lb_ports() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    let port = l.local_addr().expect("addr").port();
    format!("{port}-{port}")
}

/// One coordinator process over a temporary data dir.
pub struct Coordinator {
    /// Its data dir (kept across restarts).
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Its `api.json`.
    pub info: Value,
}

/// Coordinators the tests start offer the local provider's simulated GPU
/// shapes (as `--simulate-gpus` does) unless a test asks for the machine
/// itself: tests must not depend on the machine they run on.
pub const SIMULATE_GPUS: (&str, &str) = ("NEMBO_SIMULATE_GPUS", "1");

impl Coordinator {
    /// Starts one with fast test timings plus `extra` flags.
    pub async fn start(extra: &[&str]) -> Coordinator {
        Self::start_with_env::<&str, &str>(extra, &[]).await
    }

    /// Same, with extra environment (which the agents it starts inherit).
    pub async fn start_with_env<K: AsRef<str>, V: AsRef<str>>(
        extra: &[&str],
        env: &[(K, V)],
    ) -> Coordinator {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
            .collect();
        env.push((SIMULATE_GPUS.0.into(), SIMULATE_GPUS.1.into()));
        Self::start_over_machine(extra, &env).await
    }

    /// Starts one whose local provider offers this machine as it is (its
    /// GPUs as NVML reports them, with `env`'s NVML library), as a user's
    /// coordinator does by default.
    pub async fn start_over_machine<K: AsRef<str>, V: AsRef<str>>(
        extra: &[&str],
        env: &[(K, V)],
    ) -> Coordinator {
        let dir = tempfile::Builder::new()
            .prefix("nembo-test")
            .tempdir()
            .expect("tempdir");
        let mut args: Vec<String> = Vec::new();
        for (flag, fast) in [("--heartbeat-ms", "200"), ("--stop-grace-ms", "1000")] {
            if !extra.contains(&flag) {
                args.extend([flag.to_string(), fast.to_string()]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        if !extra.contains(&"--lb-ports") {
            args.extend(["--lb-ports".to_string(), free_lb_ports()]);
        }
        let mut c = Coordinator {
            dir,
            child: None,
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
                .collect(),
            info: Value::Null,
        };
        c.spawn().await;
        c
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("coordinator.log"))
            .expect("log");
        let child = Command::new(bin("nembo-coordinator"))
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(&self.args)
            .env("NEMBO_AGENT_BIN", bin("nembo-agent"))
            .env("NEMBO_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start nembo-coordinator");
        let pid = child.id();
        self.child = Some(child);
        let path = self.dir.path().join("api.json");
        self.info = wait_for("coordinator api.json", Duration::from_secs(20), || {
            let path = path.clone();
            async move {
                let v: Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
                (v["pid"].as_u64() == Some(u64::from(pid))).then_some(v)
            }
        })
        .await;
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        self.info["endpoint"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The CA certificate.
    /// The coordinator's process id.
    pub fn pid(&self) -> u32 {
        self.info["pid"].as_u64().unwrap_or_default() as u32
    }

    pub fn ca(&self) -> Vec<u8> {
        std::fs::read(self.info["ca_cert_path"].as_str().unwrap_or_default()).expect("ca")
    }

    /// The client token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.info["token_path"].as_str().unwrap_or_default())
            .expect("token")
            .trim()
            .to_string()
    }

    /// The agent join token.
    pub fn agent_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent-token"))
            .expect("agent token")
            .trim()
            .to_string()
    }

    /// An authenticated client.
    pub async fn client(&self) -> Client {
        self.client_with_token(&self.token()).await
    }

    /// The cluster as this coordinator sees it.
    pub async fn cluster_status(&self) -> pb::ClusterStatus {
        self.client()
            .await
            .get_cluster_status(pb::GetClusterStatusRequest {})
            .await
            .expect("GetClusterStatus")
            .into_inner()
            .status
            .expect("a status")
    }

    /// A client presenting `token` (a user's, say).
    pub async fn client_with_token(&self, token: &str) -> Client {
        connect(&self.endpoint(), &self.ca(), token)
            .await
            .expect("connect")
    }

    /// Every node, or `None` while the coordinator does not answer (for
    /// `wait_for` loops).
    pub async fn try_nodes(&self) -> Option<Vec<pb::Node>> {
        let client = self.client().await;
        nembo_proto::client::all_pages(|page_token| {
            let mut client = client.clone();
            async move {
                let req = pb::ListNodesRequest {
                    page_token,
                    ..Default::default()
                };
                let r = client.list_nodes(req).await?.into_inner();
                Ok::<_, tonic::Status>((r.nodes, r.next_page_token))
            }
        })
        .await
        .ok()
    }

    /// Every node.
    pub async fn nodes(&self) -> Vec<pb::Node> {
        self.try_nodes().await.expect("ListNodes")
    }

    /// Every job.
    pub async fn jobs(&self) -> Vec<pb::Job> {
        all_jobs(&self.client().await).await.expect("ListJobs")
    }

    /// Runs the CLI against this coordinator.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("nembo"))
            .args(args)
            .env("NEMBO_API_INFO", self.dir.path().join("api.json"))
            .env("NEMBO_HOME", self.dir.path().join("cli-home"))
            .output()
            .expect("run nembo")
    }

    /// The coordinator's exit status, once it has exited by itself.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again over the same data dir (and port).
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// The pid of a node's agent.
    pub fn agent_pid(&self, node: &str) -> i32 {
        std::fs::read_to_string(self.dir.path().join("nodes").join(node).join("agent.pid"))
            .expect("agent.pid")
            .trim()
            .parse()
            .expect("pid")
    }

    /// Submits a task and returns its id.
    pub async fn submit(&self, yaml: &str) -> String {
        self.client()
            .await
            .submit_job(pb::SubmitJobRequest {
                task: Some(pb::submit_job_request::Task::TaskYaml(yaml.into())),
                ..Default::default()
            })
            .await
            .expect("submit")
            .into_inner()
            .job_id
    }

    /// Waits until the job is in `state`.
    pub async fn wait_state(&self, job_id: &str, state: pb::JobState, limit: Duration) -> pb::Job {
        let c = self.client().await;
        wait_for(&format!("job {job_id} to be {state:?}"), limit, || {
            let mut c = c.clone();
            async move {
                let j = c
                    .get_job(pb::GetJobRequest {
                        job_id: job_id.into(),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .job?;
                (j.state == state as i32).then_some(j)
            }
        })
        .await
    }

    /// All of a job's output (waits for the job to end).
    pub async fn logs(&self, job_id: &str) -> String {
        self.read_logs(job_id, true).await
    }

    /// A job's output so far, without waiting for it to end.
    pub async fn logs_so_far(&self, job_id: &str) -> String {
        self.read_logs(job_id, false).await
    }

    async fn read_logs(&self, job_id: &str, follow: bool) -> String {
        use tokio_stream::StreamExt;
        let mut s = self
            .client()
            .await
            .stream_logs(pb::StreamLogsRequest {
                job_id: job_id.into(),
                follow,
            })
            .await
            .expect("logs")
            .into_inner();
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend(c.expect("chunk").data);
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill9();
        let nodes = self.dir.path().join("nodes");
        tear_down(&mut self.dir, &nodes, "nembo-test");
    }
}

/// Takes the local nodes under `nodes` (agents and their jobs' process
/// groups) down with the test, then keeps `dir` for inspection when
/// `NEMBO_TEST_KEEP` is set (it is removed on drop otherwise).
fn tear_down(dir: &mut tempfile::TempDir, nodes: &Path, prefix: &str) {
    if let Ok(entries) = std::fs::read_dir(nodes) {
        for n in entries.flatten() {
            if let Ok(jobs) = std::fs::read_dir(n.path().join("jobs")) {
                for j in jobs.flatten() {
                    if let Some(pgid) = read_pid(&j.path().join("pid")) {
                        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                    }
                }
            }
            if let Some(pid) = read_pid(&n.path().join("agent.pid")) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    if std::env::var_os("NEMBO_TEST_KEEP").is_some() {
        eprintln!("keeping {}", dir.path().display());
        let fresh = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("tempdir");
        let _ = std::mem::replace(dir, fresh).keep();
    }
}

fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// A cluster of coordinator processes on loopback, sharing a CA, tokens
/// and node dirs, as `nembo local up --coordinators N` runs them.
pub struct Cluster {
    /// Cluster dir: CA, tokens, `member-<id>/` data dirs, `nodes/`.
    pub root: tempfile::TempDir,
    /// Member URLs by id - 1.
    pub urls: Vec<String>,
    children: Vec<Option<Child>>,
    extra: Vec<String>,
}

impl Cluster {
    /// Starts `n` members with fast test timings plus `extra` flags, and
    /// waits until they agree on a leader.
    pub async fn start(n: usize, extra: &[&str]) -> Cluster {
        let root = tempfile::Builder::new()
            .prefix("nembo-cluster")
            .tempdir()
            .expect("tempdir");
        let urls = (0..n)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
                format!("https://127.0.0.1:{}", l.local_addr().expect("addr").port())
            })
            .collect();
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if !extra.iter().any(|e| e == "--lb-ports") {
            extra.extend(["--lb-ports".to_string(), free_lb_ports()]);
        }
        let mut c = Cluster {
            root,
            urls,
            children: (0..n).map(|_| None).collect(),
            extra,
        };
        for id in 1..=n as u64 {
            c.spawn(id);
        }
        c.leader().await;
        c
    }

    /// A member's data dir.
    pub fn member_dir(&self, id: u64) -> PathBuf {
        self.root.path().join(format!("member-{id}"))
    }

    /// Starts a new member that waits to be added (`--join`); returns its id.
    pub fn spawn_joiner(&mut self) -> u64 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        self.urls.push(format!(
            "https://127.0.0.1:{}",
            l.local_addr().expect("addr").port()
        ));
        drop(l);
        self.children.push(None);
        let id = self.urls.len() as u64;
        self.extra.push("--join".into());
        self.spawn(id);
        self.extra.pop();
        id
    }

    fn spawn(&mut self, id: u64) {
        let dir = self.member_dir(id);
        std::fs::create_dir_all(&dir).expect("member dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join(format!("member-{id}.log")))
            .expect("log");
        let mut cmd = Command::new(bin("nembo-coordinator"));
        cmd.arg("--data-dir")
            .arg(&dir)
            .arg("--member-id")
            .arg(id.to_string())
            .arg("--listen")
            .arg(self.urls[id as usize - 1].trim_start_matches("https://"))
            .arg("--cluster-dir")
            .arg(self.root.path())
            .arg("--nodes-dir")
            .arg(self.root.path().join("nodes"))
            .args(&self.extra);
        for (flag, fast) in [("--heartbeat-ms", "200"), ("--stop-grace-ms", "1000")] {
            if !self.extra.iter().any(|e| e == flag) {
                cmd.args([flag, fast]);
            }
        }
        for (i, u) in self.urls.iter().enumerate() {
            cmd.arg("--member").arg(format!("{}={u}", i + 1));
        }
        let child = cmd
            .env("NEMBO_AGENT_BIN", bin("nembo-agent"))
            .env(SIMULATE_GPUS.0, SIMULATE_GPUS.1)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start member");
        self.children[id as usize - 1] = Some(child);
    }

    /// CA certificate.
    pub fn ca(&self) -> Vec<u8> {
        wait_file(&self.root.path().join("tls").join("ca.pem"))
    }

    /// Client token.
    pub fn token(&self) -> String {
        String::from_utf8_lossy(&wait_file(&self.root.path().join("token")))
            .trim()
            .to_string()
    }

    /// A client of one member (no failover: for reading that member's view).
    pub async fn member_client(&self, id: u64) -> Option<Client> {
        connect(&self.urls[id as usize - 1], &self.ca(), &self.token())
            .await
            .ok()
    }

    /// A client over every member, as the CLI makes for a cluster.
    pub fn client(&self) -> Client {
        nembo_proto::client::connect_any(&self.urls, &self.ca(), &self.token()).expect("client")
    }

    /// Waits until a running member reports a leader, and returns its id.
    pub async fn leader(&self) -> u64 {
        wait_for("a leader", Duration::from_secs(20), || async {
            for id in 1..=self.urls.len() as u64 {
                if self.children[id as usize - 1].is_none() {
                    continue;
                }
                if let Some(mut c) = self.member_client(id).await {
                    if let Ok(s) = c.get_cluster_status(pb::GetClusterStatusRequest {}).await {
                        let s = s.into_inner().status.unwrap_or_default();
                        let live =
                            s.leader_id != 0 && self.children[s.leader_id as usize - 1].is_some();
                        if live {
                            return Some(s.leader_id);
                        }
                    }
                }
            }
            None
        })
        .await
    }

    /// Waits until member `id` has applied `index`; returns its status.
    pub async fn wait_applied(&self, id: u64, index: u64, what: &str) -> pb::ClusterStatus {
        wait_for(what, Duration::from_secs(20), || async move {
            let s = self.status(id).await?;
            (s.applied_index >= index).then_some(s)
        })
        .await
    }

    /// A member's own view of Raft.
    pub async fn status(&self, id: u64) -> Option<pb::ClusterStatus> {
        let mut c = self.member_client(id).await?;
        c.get_cluster_status(pb::GetClusterStatusRequest {})
            .await
            .ok()
            .and_then(|r| r.into_inner().status)
    }

    /// A running member's process id.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.children[id as usize - 1].as_ref().map(Child::id)
    }

    /// SIGKILL one member.
    pub fn kill9(&mut self, id: u64) {
        if let Some(mut c) = self.children[id as usize - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP one member: to the others it is cut off by a partition; to
    /// itself, no time passes until [`Cluster::resume`].
    pub fn pause(&self, id: u64) {
        self.signal(id, Signal::SIGSTOP);
    }

    /// SIGCONT a paused member: the partition heals.
    pub fn resume(&self, id: u64) {
        self.signal(id, Signal::SIGCONT);
    }

    fn signal(&self, id: u64, sig: Signal) {
        if let Some(c) = &self.children[id as usize - 1] {
            let _ = kill(Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// Starts a member that lost its disk with an empty data dir, waiting
    /// to be added back (`--join`), as the replacement procedure says.
    pub fn restart_empty_as_joiner(&mut self, id: u64) {
        self.kill9(id);
        let _ = std::fs::remove_dir_all(self.member_dir(id));
        self.extra.push("--join".into());
        self.spawn(id);
        self.extra.pop();
    }

    /// Starts a killed member again from its data dir.
    pub fn restart(&mut self, id: u64) {
        self.kill9(id);
        self.spawn(id);
    }

    /// An `api.json` for the CLI naming every member.
    pub fn api_info(&self) -> PathBuf {
        let path = self.root.path().join("api.json");
        let v = serde_json::json!({
            "endpoint": self.urls[0],
            "endpoints": self.urls,
            "ca_cert_path": self.root.path().join("tls").join("ca.pem"),
            "token_path": self.root.path().join("token"),
        });
        std::fs::write(&path, v.to_string()).expect("api.json");
        path
    }
}

fn wait_file(p: &Path) -> Vec<u8> {
    for _ in 0..200 {
        if let Ok(b) = std::fs::read(p) {
            if !b.is_empty() {
                return b;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} never appeared", p.display())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in 1..=self.children.len() as u64 {
            self.kill9(id);
        }
        let nodes = self.root.path().join("nodes");
        tear_down(&mut self.root, &nodes, "nembo-cluster");
    }
}

/// A moto server (`python3 -m moto.server`) on a free loopback port, killed
/// on drop: EC2 and S3 in their real wire formats.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl Moto {
    /// Starts one; `env` goes to the server (INITIAL_NO_AUTH_ACTION_COUNT
    /// turns signature checking on).
    pub async fn start(env: &[(&str, &str)]) -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (pip install 'moto[server]')");
        wait_for("moto", Duration::from_secs(30), || async {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .await;
        Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Runs tests/fakes/moto_ec2.py with `args`; its JSON answer.
    pub fn helper(args: &[&str]) -> Value {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fakes/moto_ec2.py");
        let out = Command::new("python3")
            .arg(script)
            .args(args)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("moto_ec2.py prints JSON")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Unix ms of a wire time (0: unset).
pub fn ms(t: &Option<nembo_proto::prost_types::Timestamp>) -> i64 {
    nembo_proto::clock::unix_ms(t.as_ref())
}

/// The whole audit trail, newest first, read in pages of `page_size`.
pub async fn audit_trail(
    client: &nembo_proto::client::Client,
    page_size: i32,
) -> Vec<pb::AuditRecord> {
    nembo_proto::client::all_pages(|page_token| {
        let mut client = client.clone();
        async move {
            let req = pb::GetAuditLogRequest {
                page_size,
                page_token,
            };
            let r = client.get_audit_log(req).await?.into_inner();
            Ok::<_, tonic::Status>((r.records, r.next_page_token))
        }
    })
    .await
    .expect("GetAuditLog")
}

/// The service `name`, or `None` while it does not exist (or the
/// coordinators do not answer): for `wait_for` loops.
pub async fn service(client: &Client, name: &str) -> Option<pb::Service> {
    let req = pb::ListServicesRequest {
        names: vec![name.into()],
        ..Default::default()
    };
    client
        .clone()
        .list_services(req)
        .await
        .ok()?
        .into_inner()
        .services
        .pop()
}

/// Every job in full (task, attempts, tries), through `client`; `None` if
/// a page could not be read.
pub async fn all_jobs(client: &nembo_proto::client::Client) -> Option<Vec<pb::Job>> {
    nembo_proto::client::all_pages(|page_token| {
        let mut client = client.clone();
        async move {
            let req = pb::ListJobsRequest {
                page_token,
                view: pb::JobView::Full as i32,
                page_size: 1000,
                ..Default::default()
            };
            let r = client.list_jobs(req).await?.into_inner();
            Ok::<_, tonic::Status>((r.jobs, r.next_page_token))
        }
    })
    .await
    .ok()
}

/// A real sshd on a free loopback port, with its own host key and one
/// client key (`id`) it accepts for the current user; killed on drop.
pub struct LoopbackSshd {
    /// Its files: `id` (the client key), `sshd.log`, `known_hosts`.
    pub dir: tempfile::TempDir,
    /// Its port.
    pub port: u16,
    /// The user it lets in.
    pub user: String,
    child: Child,
}

impl LoopbackSshd {
    /// Starts it and waits until it accepts connections.
    pub async fn start() -> LoopbackSshd {
        let sshd_bin = Path::new("/usr/sbin/sshd");
        assert!(
            sshd_bin.is_file(),
            "this test needs openssh-server (scripts/test installs it with apt when run as root)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        for key in ["host_key", "id"] {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(p.join(key))
                .status()
                .expect("ssh-keygen");
            assert!(st.success());
        }
        std::fs::copy(p.join("id.pub"), p.join("authorized_keys")).expect("authorized_keys");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        std::fs::write(
            p.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\nAuthorizedKeysFile {dir}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\nStrictModes no\nPidFile {dir}/sshd.pid\nSubsystem sftp internal-sftp\n",
                dir = p.display()
            ),
        )
        .expect("sshd_config");
        let _ = std::fs::create_dir_all("/run/sshd");
        let child = Command::new(sshd_bin)
            .args(["-D", "-e", "-f"])
            .arg(p.join("sshd_config"))
            .stderr(std::fs::File::create(p.join("sshd.log")).expect("sshd.log"))
            .spawn()
            .expect("start sshd");
        wait_for("sshd", Duration::from_secs(10), || async {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .await;
        let user = String::from_utf8(
            Command::new("id")
                .arg("-un")
                .output()
                .expect("id -un")
                .stdout,
        )
        .expect("user name")
        .trim()
        .to_string();
        LoopbackSshd {
            dir,
            port,
            user,
            child,
        }
    }

    /// `ssh` options that use its key and trust its host key on first use.
    pub fn ssh_options(&self) -> Vec<String> {
        let p = self.dir.path();
        vec![
            "-i".into(),
            p.join("id").display().to_string(),
            "-o".into(),
            format!("UserKnownHostsFile={}", p.join("known_hosts").display()),
            "-o".into(),
            "StrictHostKeyChecking=accept-new".into(),
            "-o".into(),
            "BatchMode=yes".into(),
        ]
    }
}

impl Drop for LoopbackSshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
