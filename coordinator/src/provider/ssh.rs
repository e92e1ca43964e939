//! Existing hosts over SSH: each configured host is one offering (its
//! instance type is the host's name), holding one node at a time. Launch
//! streams `nembo-agent` to the host (only when its checksum differs),
//! writes the CA and a node token there (0600), and starts the agent
//! detached in its own session; terminate kills it and its jobs. The
//! system `ssh` is used, so `~/.ssh/config`, agents and jump hosts
//! work as the user expects.

use std::path::PathBuf;
use std::process::Stdio;

use nembo_domain::state::{Offering, Resources};
use nembo_domain::task::fmt_num;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::bootstrap::Bootstrap;
use super::{BoxFuture, Instance, LaunchRequest, Provider, ProviderError};

/// Settings from `ssh:` in providers.yaml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshSettings {
    /// The pool.
    pub hosts: Vec<SshHost>,
    /// Where on each host Nembo keeps the agent and node dirs.
    #[serde(default = "default_remote_dir")]
    pub remote_dir: String,
    /// known_hosts file (default: ssh's own). New hosts are accepted on
    /// first contact and must keep their key afterwards.
    pub known_hosts: Option<PathBuf>,
    /// The agent binary to copy (default: the one the local provider uses).
    pub agent_bin: Option<PathBuf>,
}

fn default_remote_dir() -> String {
    ".nembo-agent".into()
}

/// One host of the pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshHost {
    /// Name used as the instance type (default: the address).
    pub name: Option<String>,
    /// Address or ssh_config alias.
    pub host: String,
    /// Port (default: ssh's).
    pub port: Option<u16>,
    /// Login (default: ssh's).
    pub user: Option<String>,
    /// Private key (default: ssh's).
    pub identity_file: Option<PathBuf>,
    /// Region label, for `infra: ssh/<region>` (default `pool`).
    #[serde(default = "default_region")]
    pub region: String,
    /// Declared GPUs, e.g. `H100:8` (default: the agent asks NVML).
    #[serde(default)]
    pub accelerators: String,
    /// Declared vCPUs.
    pub cpus: f64,
    /// Declared memory, GB.
    pub memory_gb: f64,
    /// What an hour of it costs you, if anything.
    #[serde(default)]
    pub hourly_price: f64,
}

fn default_region() -> String {
    "pool".into()
}

impl SshHost {
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.host)
    }
}

/// The SSH pool provider.
pub struct SshProvider {
    settings: SshSettings,
    agent_bin: PathBuf,
    bootstrap: Bootstrap,
}

impl SshProvider {
    /// A provider over the configured hosts; `default_agent_bin` is copied
    /// unless the settings name another.
    pub fn new(
        settings: SshSettings,
        default_agent_bin: PathBuf,
        bootstrap: Bootstrap,
    ) -> Result<Self, String> {
        for (i, h) in settings.hosts.iter().enumerate() {
            nembo_agent_accelerators(&h.accelerators)
                .map_err(|e| format!("ssh.hosts[{i}].accelerators: {e}"))?;
            if settings.hosts[..i].iter().any(|o| o.name() == h.name()) {
                return Err(format!(
                    "ssh.hosts[{i}]: the name '{}' is used twice",
                    h.name()
                ));
            }
        }
        if settings.remote_dir.contains('\'') {
            return Err("ssh.remote_dir: must not contain a quote".into());
        }
        Ok(Self {
            agent_bin: settings.agent_bin.clone().unwrap_or(default_agent_bin),
            settings,
            bootstrap,
        })
    }

    fn host(&self, name: &str) -> Result<&SshHost, ProviderError> {
        self.settings
            .hosts
            .iter()
            .find(|h| h.name() == name)
            .ok_or_else(|| ProviderError::InvalidRequest(format!("no ssh host named '{name}'")))
    }

    fn base_args(&self, h: &SshHost, port_flag: &str) -> Vec<String> {
        let mut a = vec![
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=accept-new".into(),
            "-o".into(),
            "ConnectTimeout=10".into(),
        ];
        if let Some(k) = &self.settings.known_hosts {
            a.push("-o".into());
            a.push(format!("UserKnownHostsFile={}", k.display()));
        }
        if let Some(p) = h.port {
            a.push(port_flag.into());
            a.push(p.to_string());
        }
        if let Some(i) = &h.identity_file {
            a.push("-i".into());
            a.push(i.display().to_string());
        }
        a
    }

    fn target(h: &SshHost) -> String {
        match &h.user {
            Some(u) => format!("{u}@{}", h.host),
            None => h.host.clone(),
        }
    }

    /// Runs a shell command on the host, feeding `stdin`; its stdout.
    async fn run(&self, h: &SshHost, script: &str, stdin: &[u8]) -> Result<String, ProviderError> {
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args(self.base_args(h, "-p"))
            .arg(Self::target(h))
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| ProviderError::InvalidRequest(format!("cannot run ssh: {e}")))?;
        if let Some(mut input) = child.stdin.take() {
            input
                .write_all(stdin)
                .await
                .map_err(|e| ProviderError::Transient(format!("ssh {}: {e}", h.name())))?;
        }
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(120),
            child.wait_with_output(),
        )
        .await
        .map_err(|_| ProviderError::Transient(format!("ssh {}: timed out", h.name())))?
        .map_err(|e| ProviderError::Transient(format!("ssh {}: {e}", h.name())))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        // 255 is ssh's own failure (unreachable, refused key); anything else is the script's.
        Err(match out.status.code() {
            Some(255) if err.contains("Permission denied") => {
                ProviderError::Auth(format!("ssh {}: {err}", h.name()))
            }
            Some(255) => ProviderError::Transient(format!("ssh {}: {err}", h.name())),
            Some(3) => ProviderError::Capacity(format!("ssh host {} is busy: {err}", h.name())),
            _ => ProviderError::InvalidRequest(format!("ssh {}: {err}", h.name())),
        })
    }

    async fn copy_agent(&self, h: &SshHost, dir: &str) -> Result<(), ProviderError> {
        let local = tokio::fs::read(&self.agent_bin).await.map_err(|e| {
            ProviderError::InvalidRequest(format!("agent binary {}: {e}", self.agent_bin.display()))
        })?;
        let sum = crate::identity::tls::sha256_hex(&local);
        let remote = self
            .run(
                h,
                &format!("sha256sum '{dir}/nembo-agent' 2>/dev/null || true"),
                b"",
            )
            .await?;
        if remote.split_whitespace().next() == Some(sum.as_str()) {
            return Ok(());
        }
        // Streamed over ssh rather than scp: scp needs the SFTP subsystem,
        // which minimal sshd setups leave out.
        self.run(h, &format!("cat > '{dir}/nembo-agent.new'"), &local)
            .await?;
        self.run(
            h,
            &format!("chmod 755 '{dir}/nembo-agent.new' && mv '{dir}/nembo-agent.new' '{dir}/nembo-agent'"),
            b"",
        )
        .await
        .map(drop)
    }
}

/// Checks an accelerator declaration the way the agent reads it.
fn nembo_agent_accelerators(s: &str) -> Result<(), String> {
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, n) = part.split_once(':').unwrap_or((part, "1"));
        if name.is_empty() || n.parse::<f64>().map_or(true, |n| n <= 0.0) {
            return Err(format!("'{part}' is not NAME[:COUNT]"));
        }
    }
    Ok(())
}

/// A node id is safe to put in a quoted shell word and a path.
fn safe_id(id: &str) -> Result<&str, ProviderError> {
    if !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !id.starts_with('.')
    {
        Ok(id)
    } else {
        Err(ProviderError::InvalidRequest(format!(
            "node id '{id}' is not path-safe"
        )))
    }
}

impl Provider for SshProvider {
    fn name(&self) -> &str {
        "ssh"
    }

    fn offerings(&self) -> Vec<Offering> {
        self.settings
            .hosts
            .iter()
            .map(|h| {
                let mut accelerators = std::collections::BTreeMap::new();
                for part in h
                    .accelerators
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                {
                    let (name, n) = part.split_once(':').unwrap_or((part, "1"));
                    accelerators.insert(name.to_string(), n.parse().unwrap_or(1.0));
                }
                Offering {
                    provider: "ssh".into(),
                    region: h.region.clone(),
                    instance_type: h.name().to_string(),
                    resources: Resources {
                        accelerators,
                        cpus: h.cpus,
                        memory_gb: h.memory_gb,
                    },
                    hourly_price: h.hourly_price,
                    spot_price: None,
                    zone: None,
                    runs_as_coordinator_user: false,
                    simulated: false,
                    fixed_machines: None,
                    disk_gb_max: None,
                    opens_ports: false,
                    ports_per_node: false,
                    custom_images: false,
                    can_stop: false,
                }
            })
            .collect()
    }

    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<String, ProviderError>> {
        Box::pin(async move {
            let h = self.host(&req.instance_type)?;
            let node = safe_id(&req.node_id)?;
            let dir = &self.settings.remote_dir;
            self.run(
                h,
                &format!("mkdir -p '{dir}/nodes' && chmod 700 '{dir}'"),
                b"",
            )
            .await?;
            // One node per host: another live node's lease makes this host busy (exit 3).
            let claim = format!(
                r#"set -e
cd '{dir}'
if [ -f lease ] && [ "$(cat lease)" != '{node}' ]; then
  other=$(cat lease)
  if [ -f "nodes/$other/agent.pid" ] && kill -0 "$(cat "nodes/$other/agent.pid")" 2>/dev/null; then
    echo "held by node $other" >&2; exit 3
  fi
fi
printf '%s' '{node}' > lease
mkdir -p 'nodes/{node}'
if [ -f 'nodes/{node}/agent.pid' ] && kill -0 "$(cat 'nodes/{node}/agent.pid')" 2>/dev/null; then
  echo "running $(cat 'nodes/{node}/agent.pid')"
fi"#
            );
            let out = self.run(h, &claim, b"").await?;
            if let Some(pid) = out.trim().strip_prefix("running ") {
                return Ok(format!("{}:{pid}", h.name()));
            }
            self.copy_agent(h, dir).await?;
            let token = crate::identity::tls::node_token(&self.bootstrap.agent_token, node);
            self.run(
                h,
                &format!("umask 077 && cat > '{dir}/nodes/{node}/ca.pem'"),
                self.bootstrap.ca_pem.as_bytes(),
            )
            .await?;
            self.run(
                h,
                &format!("umask 077 && cat > '{dir}/nodes/{node}/join-token'"),
                token.as_bytes(),
            )
            .await?;
            let mut args = format!(
                "--coordinator '{}' --ca-cert \"$PWD/ca.pem\" --join-token-file \"$PWD/join-token\" --node-id '{node}' --work-dir \"$PWD\" --cpus {} --memory-gb {} --heartbeat-ms {}",
                self.bootstrap.coordinators.join(","),
                fmt_num(req.resources.cpus),
                fmt_num(req.resources.memory_gb),
                self.bootstrap.heartbeat_ms,
            );
            if !h.accelerators.is_empty() {
                args.push_str(&format!(" --accelerators '{}'", h.accelerators));
            }
            // setsid: its own session, so the ssh session ending does not
            // end it. Only the agent goes to the background, with every fd
            // redirected, or ssh would wait for it to exit.
            let start = format!(
                "cd '{dir}/nodes/{node}' || exit 1\nsetsid ../../nembo-agent {args} > agent.log 2>&1 < /dev/null &\necho $! > agent.pid\ncat agent.pid"
            );
            let pid = self.run(h, &start, b"").await?;
            tracing::info!(
                node,
                host = h.name(),
                pid = pid.trim(),
                "agent started over ssh"
            );
            Ok(format!("{}:{}", h.name(), pid.trim()))
        })
    }

    fn list_owned(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move {
            let dir = &self.settings.remote_dir;
            let list = format!(
                r#"cd '{dir}/nodes' 2>/dev/null || exit 0
for n in *; do
  [ -f "$n/agent.pid" ] && kill -0 "$(cat "$n/agent.pid")" 2>/dev/null && echo "$n $(cat "$n/agent.pid")"
done; true"#
            );
            let mut all = Vec::new();
            for h in &self.settings.hosts {
                for line in self.run(h, &list, b"").await?.lines() {
                    if let Some((node, pid)) = line.split_once(' ') {
                        all.push(Instance {
                            instance_id: format!("{}:{pid}", h.name()),
                            node_id: node.to_string(),
                            live: true,
                            state: "running".into(),
                        });
                    }
                }
            }
            Ok(all)
        })
    }

    fn terminate<'a>(
        &'a self,
        node_id: &'a str,
        _term: u64,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let node = safe_id(node_id)?;
            let dir = &self.settings.remote_dir;
            // The agent leads its own session: signal the whole group, and
            // each job's group, as a VM going away would.
            let kill = format!(
                r#"cd '{dir}/nodes/{node}' 2>/dev/null || exit 0
for f in jobs/*/pid; do [ -f "$f" ] && kill -KILL -"$(cat "$f")" 2>/dev/null; done
if [ -f agent.pid ]; then
  p=$(cat agent.pid)
  kill -TERM -"$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null
  for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -"$p" 2>/dev/null || true
  rm -f agent.pid
fi
cd ../.. && [ "$(cat lease 2>/dev/null)" = '{node}' ] && rm -f lease; true"#
            );
            for h in &self.settings.hosts {
                self.run(h, &kill, b"").await?;
            }
            Ok(())
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<String, ProviderError>> {
        Box::pin(async move {
            let mut ok = Vec::new();
            let mut failed = Vec::new();
            for h in &self.settings.hosts {
                match self.run(h, "true", b"").await {
                    Ok(_) => ok.push(h.name().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            if ok.is_empty() {
                return Err(ProviderError::Auth(format!(
                    "no host reachable: {}",
                    failed.join("; ")
                )));
            }
            Ok(format!(
                "{} of {} hosts reachable ({}){}",
                ok.len(),
                self.settings.hosts.len(),
                ok.join(", "),
                if failed.is_empty() {
                    String::new()
                } else {
                    format!("; {}", failed.join("; "))
                }
            ))
        })
    }
}
