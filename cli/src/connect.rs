//! Finding and reaching a coordinator. With nothing configured, the CLI
//! uses (and if needed starts) the local coordinator under `~/.nembo`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nembo_proto::client::{connect, Client};
use serde::{Deserialize, Serialize};

/// What a client needs: the same shape the coordinator writes to `api.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiInfo {
    /// `https://host:port`.
    pub endpoint: String,
    /// CA to trust.
    pub ca_cert_path: String,
    /// Bearer token file.
    pub token_path: String,
    /// Coordinator pid (local only).
    #[serde(default)]
    pub pid: u32,
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
        return Ok(Some(ApiInfo {
            endpoint,
            ca_cert_path: ca,
            token_path: token,
            pid: 0,
        }));
    }
    Ok(None)
}

pub fn pid_alive(pid: u32) -> bool {
    pid != 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// The local coordinator's `api.json`, if its process is alive.
pub fn running_local() -> Result<Option<ApiInfo>> {
    let path = local_data_dir()?.join("api.json");
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(None);
    };
    let info: ApiInfo =
        serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?;
    Ok(pid_alive(info.pid).then_some(info))
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

/// Starts the local coordinator in the background and waits until it serves.
pub async fn start_local(quiet: bool) -> Result<ApiInfo> {
    let dir = local_data_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let bin = find_bin("nembo-coordinator", "NEMBO_COORDINATOR_BIN");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("coordinator.log"))?;
    if !quiet {
        eprintln!("Starting a local coordinator in {} ...", dir.display());
    }
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("--data-dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    // Its own process group: Ctrl-C on `nembo launch` must not stop the coordinator.
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
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(info) = running_local()? {
            if info.pid == pid && connect_info(&info).await.is_ok() {
                return Ok(info);
            }
        }
        if !pid_alive(pid) || std::time::Instant::now() > deadline {
            let tail = std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(10).collect();
            bail!(
                "the local coordinator did not start; last lines of {}:\n{}",
                dir.join("coordinator.log").display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

async fn connect_info(info: &ApiInfo) -> Result<Client> {
    let ca = std::fs::read(&info.ca_cert_path)
        .with_context(|| format!("read CA {}", info.ca_cert_path))?;
    let token = read_token(Path::new(&info.token_path))?;
    Ok(connect(&info.endpoint, &ca, &token).await?)
}

fn read_token(path: &Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("read token {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} is readable by other users; run chmod 600 on it",
            path.display()
        );
    }
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

/// A connected client, starting the local coordinator if nothing is configured.
pub async fn client() -> Result<Client> {
    let info = resolve(true).await?;
    connect_info(&info).await
}
