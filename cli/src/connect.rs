//! Finding and reaching a coordinator. With nothing configured, the CLI
//! uses (and if needed starts) the local coordinator under `~/.nembo`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
pub use nembo_proto::api_info::ApiInfo;
use nembo_proto::client::{connect, Client};
use nembo_proto::v1 as pb;

/// Whether a local coordinator (or any member of a local cluster) runs.
fn alive(info: &ApiInfo) -> bool {
    pid_alive(info.pid) || info.pids.iter().any(|p| pid_alive(*p))
}

/// `$NEMBO_HOME`, else `$HOME/.nembo`.
pub fn nembo_home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("NEMBO_HOME") {
        return Ok(h.into());
    }
    let home = std::env::var_os("HOME").context("neither NEMBO_HOME nor HOME is set")?;
    Ok(Path::new(&home).join(".nembo"))
}

/// The local coordinator's data dir.
pub fn local_data_dir() -> Result<PathBuf> {
    Ok(nembo_home()?.join("coordinator"))
}

/// A coordinator named by the environment, if any.
fn configured() -> Result<Option<ApiInfo>> {
    if let Some(p) = std::env::var_os("NEMBO_API_INFO") {
        let bytes =
            std::fs::read(&p).with_context(|| format!("read {}", Path::new(&p).display()))?;
        return Ok(Some(
            serde_json::from_slice(&bytes).context("parse NEMBO_API_INFO")?,
        ));
    }
    if let Ok(endpoint) = std::env::var("NEMBO_ENDPOINT") {
        let ca = std::env::var("NEMBO_CA_CERT")
            .context("NEMBO_ENDPOINT is set; set NEMBO_CA_CERT too")?;
        let token = std::env::var("NEMBO_TOKEN_FILE")
            .context("NEMBO_ENDPOINT is set; set NEMBO_TOKEN_FILE too")?;
        let endpoints: Vec<String> = endpoint.split(',').map(|s| s.trim().to_string()).collect();
        return Ok(Some(ApiInfo {
            endpoint: endpoints[0].clone(),
            ca_cert_path: ca,
            token_path: token,
            pid: 0,
            endpoints,
            pids: Vec::new(),
            metrics_url: std::env::var("NEMBO_METRICS_URL").unwrap_or_default(),
            metrics_urls: Vec::new(),
        }));
    }
    Ok(None)
}

/// Whether process `pid` runs. A zombie does not: a coordinator killed a
/// moment ago (or in a container without an init to reap it) is dead.
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    // /proc/<pid>/stat: "pid (comm) state ..."; comm may hold spaces.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => true, // no /proc: trust the signal
    }
}

/// The local cluster's directory (`local up --coordinators N`, N > 1).
pub fn local_cluster_dir() -> Result<PathBuf> {
    Ok(nembo_home()?.join("cluster"))
}

/// The running local coordinator(s): a local cluster if one runs, else
/// the single local coordinator, if its process is alive.
pub fn running_local() -> Result<Option<ApiInfo>> {
    for path in [
        local_cluster_dir()?.join("api.json"),
        local_data_dir()?.join("api.json"),
    ] {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let info: ApiInfo =
            serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?;
        if alive(&info) {
            return Ok(Some(info));
        }
    }
    Ok(None)
}

fn find_bin(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return p.into();
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Starts `nembo-coordinator` with `args` in the background, in its own
/// process group (Ctrl-C on `nembo launch` must not stop it), logging to
/// `log_path`. Returns its pid.
fn spawn_coordinator(args: &[String], log_path: &Path) -> Result<u32> {
    let bin = find_bin("nembo-coordinator", "NEMBO_COORDINATOR_BIN");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "cannot start {} (build it with `cargo build`, or set NEMBO_COORDINATOR_BIN)",
            bin.display()
        )
    })?;
    let pid = child.id();
    // Reap it if it exits early; it outlives us otherwise.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}

fn startup_failure(what: &str, log_path: &Path) -> anyhow::Error {
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    anyhow::anyhow!(
        "{what} did not start (log: {}):\n{}",
        log_path.display(),
        why_it_stopped(&log)
    )
}

/// What a coordinator's log says about why it stopped: its last error with
/// the causes under it, without the backtrace `RUST_BACKTRACE` adds; else
/// its last lines.
pub fn why_it_stopped(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    if let Some(start) = lines.iter().rposition(|l| l.starts_with("Error: ")) {
        return lines[start..]
            .iter()
            .take_while(|l| !l.starts_with("Stack backtrace:"))
            .copied()
            .collect::<Vec<_>>()
            .join("\n")
            .trim_end()
            .to_string();
    }
    let tail: Vec<&str> = lines
        .iter()
        .rev()
        .filter(|l| !is_backtrace_frame(l))
        .take(10)
        .copied()
        .collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

fn is_backtrace_frame(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("at ")
        || t.split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// Starts the local coordinator in the background and waits until it serves.
pub async fn start_local(quiet: bool) -> Result<ApiInfo> {
    let dir = local_data_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    if !quiet {
        eprintln!("Starting a local coordinator in {} ...", dir.display());
    }
    let log_path = dir.join("coordinator.log");
    let pid = spawn_coordinator(&["--data-dir".into(), dir.display().to_string()], &log_path)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let path = dir.join("api.json");
        if let Some(info) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<ApiInfo>(&b).ok())
        {
            if info.pid == pid && connect_info(&info).await.is_ok() {
                return Ok(info);
            }
        }
        if !pid_alive(pid) || std::time::Instant::now() > deadline {
            return Err(startup_failure("the local coordinator", &log_path));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a local cluster of `n` coordinators on loopback (one Raft member
/// each, shared CA, tokens and node dirs) and waits until it has a leader.
pub async fn start_local_cluster(n: u64) -> Result<ApiInfo> {
    start_cluster_in(&local_cluster_dir()?, n, &[]).await
}

/// Starts a cluster of `n` coordinators in `dir`, each with `extra` flags.
pub async fn start_cluster_in(dir: &Path, n: u64, extra: &[String]) -> Result<ApiInfo> {
    let dir = dir.to_path_buf();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // Keep the members' addresses across restarts when we can: running
    // agents know them.
    let previous: Option<ApiInfo> = std::fs::read(dir.join("api.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut urls: Vec<String> = previous
        .map(|p| p.endpoints)
        .filter(|e| e.len() as u64 == n)
        .unwrap_or_default();
    if urls.is_empty() {
        for _ in 0..n {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            urls.push(format!("https://127.0.0.1:{}", l.local_addr()?.port()));
        }
    }
    eprintln!(
        "Starting a local cluster of {n} coordinators in {} ...",
        dir.display()
    );
    let mut pids = Vec::new();
    for id in 1..=urls.len() {
        pids.push(spawn_member(&dir, &urls, id, extra)?);
    }
    let mut info = ApiInfo {
        endpoint: urls[0].clone(),
        ca_cert_path: dir.join("tls").join("ca.pem").display().to_string(),
        token_path: dir.join("token").display().to_string(),
        pid: pids[0],
        endpoints: urls,
        pids,
        metrics_url: String::new(),
        metrics_urls: Vec::new(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if std::time::Instant::now() > deadline || !alive(&info) {
            return Err(startup_failure(
                "the local cluster",
                &dir.join("member-1.log"),
            ));
        }
        if let Ok(mut c) = connect_info(&info).await {
            if let Ok(s) = c
                .get_cluster_status(nembo_proto::v1::GetClusterStatusRequest {})
                .await
            {
                if s.into_inner().status.is_some_and(|s| s.leader_id != 0) {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each member wrote its own api.json (with its metrics URL) by now.
    info.metrics_urls = (1..=info.endpoints.len())
        .filter_map(|id| {
            let member = dir.join(format!("member-{id}")).join("api.json");
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(member).ok()?).ok()?;
            Some(v["metrics_url"].as_str()?.to_string())
        })
        .collect();
    info.metrics_url = info.metrics_urls.first().cloned().unwrap_or_default();
    std::fs::write(dir.join("api.json"), serde_json::to_vec_pretty(&info)?)?;
    Ok(info)
}

/// Starts member `id` (from 1) of the local cluster in `dir` whose members
/// are at `urls`, over its own disk; returns its pid.
fn spawn_member(dir: &Path, urls: &[String], id: usize, extra: &[String]) -> Result<u32> {
    let mut args = vec![
        "--data-dir".to_string(),
        dir.join(format!("member-{id}")).display().to_string(),
        "--member-id".into(),
        id.to_string(),
        "--listen".into(),
        urls[id - 1].trim_start_matches("https://").to_string(),
        "--cluster-dir".into(),
        dir.display().to_string(),
        "--nodes-dir".into(),
        dir.join("nodes").display().to_string(),
    ];
    for (i, u) in urls.iter().enumerate() {
        args.extend(["--member".to_string(), format!("{}={u}", i + 1)]);
    }
    args.extend(extra.iter().cloned());
    spawn_coordinator(&args, &dir.join(format!("member-{id}.log")))
}

/// Starts again, from their disks, the members of the running local
/// cluster whose processes are gone; returns their ids.
pub fn restart_dead_members() -> Result<Vec<usize>> {
    let dir = local_cluster_dir()?;
    let path = dir.join("api.json");
    let mut info: ApiInfo = serde_json::from_slice(&std::fs::read(&path)?)?;
    let mut restarted = Vec::new();
    for id in 1..=info.pids.len() {
        if !pid_alive(info.pids[id - 1]) {
            info.pids[id - 1] = spawn_member(&dir, &info.endpoints, id, &[])?;
            restarted.push(id);
        }
    }
    if !restarted.is_empty() {
        info.pid = info.pids[0];
        std::fs::write(&path, serde_json::to_vec_pretty(&info)?)?;
    }
    Ok(restarted)
}

/// Where the API is: the environment's coordinator, else the local one
/// (started if `start` and not running).
pub async fn resolve(start: bool) -> Result<ApiInfo> {
    if let Some(info) = configured()? {
        return Ok(info);
    }
    if let Some(info) = running_local()? {
        return Ok(info);
    }
    if !start {
        bail!("no local coordinator is running; start one with `nembo local up`");
    }
    start_local(false).await
}

pub(crate) async fn connect_info(info: &ApiInfo) -> Result<Client> {
    let ca = std::fs::read(&info.ca_cert_path)
        .with_context(|| format!("read CA {}", info.ca_cert_path))?;
    // A user's own token (`nembo admin users create`) instead of the
    // cluster's, for the same coordinators.
    let token_path = std::env::var("NEMBO_TOKEN_FILE").unwrap_or_else(|_| info.token_path.clone());
    let token = read_token(Path::new(&token_path))?;
    if info.endpoints.len() > 1 {
        return Ok(nembo_proto::client::connect_any(
            &info.endpoints,
            &ca,
            &token,
        )?);
    }
    Ok(connect(&info.endpoint, &ca, &token).await?)
}

/// [`nembo_proto::client::call`], with errors the CLI can report.
pub async fn call<T, R, F, Fut>(client: &Client, req: R, f: F) -> Result<T>
where
    R: Clone,
    F: Fn(Client, R) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    Ok(nembo_proto::client::call(client, req, f).await?)
}

/// One job (retrying while the cluster answers UNAVAILABLE).
pub async fn get_job(client: &Client, job_id: &str) -> Result<pb::Job> {
    let req = pb::GetJobRequest {
        job_id: job_id.to_string(),
    };
    let r = call(client, req, |mut c, r| async move { c.get_job(r).await }).await?;
    r.job
        .context("the coordinator answered GetJob without a job")
}

/// Every node.
pub async fn list_nodes(client: &Client) -> Result<Vec<pb::Node>> {
    all_pages(|page_token| {
        let req = pb::ListNodesRequest {
            page_token,
            ..Default::default()
        };
        async move {
            let r = call(client, req, |mut c, r| async move { c.list_nodes(r).await }).await?;
            Ok((r.nodes, r.next_page_token))
        }
    })
    .await
}

/// Every item of a paginated list: `page(token)` fetches one page and
/// returns its items with the next page's token (the CLI's errors).
pub async fn all_pages<T, F, Fut>(page: F) -> Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String)>>,
{
    nembo_proto::client::all_pages(page).await
}

fn read_token(path: &Path) -> Result<String> {
    nembo_proto::client::read_secret(path).context("read token")
}

/// A connected client, starting the local coordinator if nothing is configured.
pub async fn client() -> Result<Client> {
    let info = resolve(true).await?;
    connect_info(&info).await
}
