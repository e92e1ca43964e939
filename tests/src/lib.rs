//! Test harness: real `nembo-coordinator`, `nembo-agent` and `nembo`
//! binaries on 127.0.0.1, real TLS, real processes, each test in its own
//! temporary data dir.
//!
//! The binaries are taken from the target dir this test runs from; build
//! them first (`cargo build --workspace`, as the README's test command does).

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

/// Whether a process exists.
pub fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// One coordinator process over a temporary data dir.
pub struct Coordinator {
    /// Its data dir (kept across restarts).
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    args: Vec<String>,
    /// Its `api.json`.
    pub info: Value,
}

impl Coordinator {
    /// Starts one with fast test timings plus `extra` flags.
    pub async fn start(extra: &[&str]) -> Coordinator {
        let dir = tempfile::Builder::new()
            .prefix("nembo-test")
            .tempdir()
            .expect("tempdir");
        let mut args: Vec<String> = vec![
            "--heartbeat-ms".into(),
            "200".into(),
            "--stop-grace-ms".into(),
            "1000".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut c = Coordinator {
            dir,
            child: None,
            args,
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
        connect(&self.endpoint(), &self.ca(), &self.token())
            .await
            .expect("connect")
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
                    .into_inner();
                (j.state == state as i32).then_some(j)
            }
        })
        .await
    }

    /// All of a job's output (waits for the job to end).
    pub async fn logs(&self, job_id: &str) -> String {
        use tokio_stream::StreamExt;
        let mut s = self
            .client()
            .await
            .stream_logs(pb::StreamLogsRequest {
                job_id: job_id.into(),
                follow: true,
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
        if std::env::var_os("NEMBO_TEST_KEEP").is_some() {
            eprintln!("keeping {}", self.dir.path().display());
            let kept = tempfile::Builder::new()
                .prefix("nembo-test")
                .tempdir()
                .expect("tempdir");
            let dir = std::mem::replace(&mut self.dir, kept);
            let _ = dir.keep();
        }
        // Take the local nodes and their jobs down with the test.
        if let Ok(nodes) = std::fs::read_dir(self.dir.path().join("nodes")) {
            for n in nodes.flatten() {
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
    }
}

fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}
