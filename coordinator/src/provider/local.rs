//! The local provider, Nembo's embedded default: a node is a `nembo-agent`
//! process on this machine with its own work dir.
//!
//! By default it offers what the machine really has, as one fixed machine
//! (region `host`): its GPUs as NVML reports them, its vCPUs and memory
//! less the coordinator's reserve. Jobs share that one node, and wait for
//! room on it.
//!
//! Asked to simulate (`local: {simulate: true}`, `--simulate-gpus`), it
//! offers made-up shapes (`H100:8`, ...) in two regions instead, so that
//! scheduling by accelerator and failover can be tested and shown without
//! hardware. Those offerings and their nodes are marked simulated
//! everywhere, and their jobs see `NEMBO_SIMULATED=1`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nembo_domain::state::{Offering, Resources};
use nembo_domain::task::fmt_num;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::{BoxFuture, Instance, LaunchRequest, Provider, ProviderError};

/// The coordinator's variables a local agent inherits: the basics of a
/// process environment, and the agent's own settings.
const AGENT_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "RUST_BACKTRACE",
    "NEMBO_LOG",
    "NEMBO_NVML_LIB",
    "NEMBO_FAKE_NVML",
    "NEMBO_GPU_SAMPLE_MS",
    // The container engine, as the user set it up (rootless podman needs
    // its runtime dir; docker may be remote).
    "NEMBO_CONTAINER_ENGINE",
    "XDG_RUNTIME_DIR",
    "DOCKER_HOST",
    "CONTAINER_HOST",
    "CONTAINERS_CONF",
];

/// Regions the local provider simulates.
pub const REGIONS: &[&str] = &["us-east", "eu-west"];

/// The one region of the real machine.
pub const HOST_REGION: &str = "host";

/// GPU models the local provider simulates, with vCPUs and GB per GPU.
const GPU_SHAPES: &[(&str, f64, f64)] = &[
    ("H100", 24.0, 240.0),
    ("H200", 24.0, 240.0),
    ("A100", 12.0, 140.0),
    ("A100-80GB", 12.0, 140.0),
    ("L4", 8.0, 32.0),
    ("A10G", 8.0, 32.0),
    ("T4", 4.0, 16.0),
];

/// How the local provider offers this machine (`local:` in providers.yaml).
/// By default: the real machine, free. With `simulate: true`, made-up
/// shapes whose prices and capacity can be declared, so the optimizer and
/// capacity failover can be shown on one machine.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSettings {
    /// Offer simulated GPU shapes instead of what the machine has: for
    /// tests, benchmarks and demos. Their GPUs do not exist.
    #[serde(default)]
    pub simulate: bool,
    /// Price per GPU-hour by model (`H100: 2.0`); unlisted models are free.
    #[serde(default)]
    pub gpu_hourly: BTreeMap<String, f64>,
    /// Price per vCPU-hour.
    #[serde(default)]
    pub cpu_hourly: f64,
    /// Spot price as a fraction of the on-demand price; none: no spot.
    pub spot_factor: Option<f64>,
    /// Per region: a price factor and the most nodes alive at once.
    #[serde(default)]
    pub regions: BTreeMap<String, LocalRegion>,
}

/// One local region's declared limits.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalRegion {
    /// Multiplies every price in the region.
    #[serde(default = "one")]
    pub price_factor: f64,
    /// Most nodes alive at once; 0: every launch fails for capacity.
    pub capacity: Option<u32>,
}

fn one() -> f64 {
    1.0
}

impl LocalSettings {
    /// Refuses unknown regions and negative prices, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if !self.simulate {
            if let Some(r) = self.regions.keys().next() {
                return Err(format!(
                    "local.regions.{r}: the real machine is one place ({HOST_REGION}); \
                     regions are simulated only with `simulate: true`"
                ));
            }
            if self.spot_factor.is_some() {
                return Err("local.spot_factor: this machine has no spot market; \
                            spot is simulated only with `simulate: true`"
                    .into());
            }
        }
        for r in self.regions.keys() {
            if !REGIONS.contains(&r.as_str()) {
                return Err(format!(
                    "local.regions.{r}: no such local region (have {})",
                    REGIONS.join(", ")
                ));
            }
        }
        let price_ok = |p: f64| p.is_finite() && p >= 0.0;
        let negative = self.gpu_hourly.iter().find(|(_, p)| !price_ok(**p));
        if let Some((gpu, _)) = negative {
            return Err(format!("local.gpu_hourly.{gpu}: must be 0 or more"));
        }
        if !price_ok(self.cpu_hourly) || self.spot_factor.is_some_and(|f| !price_ok(f) || f == 0.0)
        {
            return Err("local.cpu_hourly and local.spot_factor must be positive".into());
        }
        Ok(())
    }
}

/// How agents are started.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Parent of every node's work dir.
    pub nodes_dir: PathBuf,
    /// The `nembo-agent` binary.
    pub agent_bin: PathBuf,
    /// Every coordinator's URL; agents find the leader among them.
    pub endpoints: Vec<String>,
    /// CA certificate the agents trust.
    pub ca_cert: PathBuf,
    /// The cluster secret node tokens are derived from
    /// ([`crate::identity::tls::node_token`]): each agent gets its node's, once.
    pub join_secret: std::sync::Arc<str>,
    /// Heartbeat period handed to agents.
    pub heartbeat_ms: u32,
    /// Declared prices and capacity.
    pub settings: LocalSettings,
    /// What this machine has (none when simulating).
    pub machine: Option<super::machine::Machine>,
}

/// Agents as local processes.
pub struct LocalProvider {
    cfg: LocalConfig,
    /// The nodes' metadata service (AWS, GCP and Azure formats), started
    /// with the first node.
    metadata: tokio::sync::OnceCell<String>,
    /// Held from the capacity check until the agent's pid is written, so
    /// concurrent launches cannot both take a region's last place.
    launching: tokio::sync::Mutex<()>,
}

impl LocalProvider {
    /// A provider that starts agents as configured.
    pub fn new(cfg: LocalConfig) -> Self {
        Self {
            cfg,
            launching: tokio::sync::Mutex::new(()),
            metadata: tokio::sync::OnceCell::new(),
        }
    }

    /// What it offers: the real machine, or the simulated shapes; a task's
    /// disk can be as large as `disk_gb` (the free space under the nodes'
    /// dir), and its ports are on 127.0.0.1.
    pub fn catalog(
        settings: &LocalSettings,
        machine: Option<&super::machine::Machine>,
        disk_gb: Option<u64>,
    ) -> Vec<Offering> {
        let mut all = match machine {
            Some(m) if !settings.simulate => vec![Self::host_offering(settings, m)],
            _ => Self::simulated_catalog(settings),
        };
        for o in &mut all {
            o.disk_gb_max = disk_gb;
            o.opens_ports = true;
        }
        all
    }

    /// The real machine, as one fixed machine that jobs share.
    fn host_offering(settings: &LocalSettings, machine: &super::machine::Machine) -> Offering {
        let resources = machine.resources();
        Offering {
            provider: "local".into(),
            region: HOST_REGION.into(),
            instance_type: machine.instance_type(),
            hourly_price: price(settings, &resources),
            resources,
            spot_price: None,
            zone: None,
            runs_as_coordinator_user: true,
            simulated: false,
            fixed_machines: Some(1),
            disk_gb_max: None,
            opens_ports: false,
            ports_per_node: false,
            custom_images: false,
            can_stop: true,
        }
    }

    /// Every simulated shape in every region, at the declared prices.
    fn simulated_catalog(settings: &LocalSettings) -> Vec<Offering> {
        let mut shapes: Vec<(String, Resources)> = Vec::new();
        for cpus in [2.0, 4.0, 8.0, 16.0, 32.0] {
            shapes.push((
                format!("local-cpu-{}", fmt_num(cpus)),
                Resources {
                    accelerators: BTreeMap::new(),
                    cpus,
                    memory_gb: cpus * 4.0,
                },
            ));
        }
        for (gpu, cpus, mem) in GPU_SHAPES {
            for n in [1.0, 2.0, 4.0, 8.0] {
                let mut acc = BTreeMap::new();
                acc.insert(gpu.to_string(), n);
                shapes.push((
                    format!("local-{}-{}", gpu.to_ascii_lowercase(), fmt_num(n)),
                    Resources {
                        accelerators: acc,
                        cpus: cpus * n,
                        memory_gb: mem * n,
                    },
                ));
            }
        }
        REGIONS
            .iter()
            .flat_map(|region| {
                let factor = settings
                    .regions
                    .get(*region)
                    .map_or(1.0, |r| r.price_factor);
                shapes.iter().map(move |(t, r)| {
                    let price = price(settings, r) * factor;
                    Offering {
                        provider: "local".into(),
                        region: region.to_string(),
                        instance_type: t.clone(),
                        resources: r.clone(),
                        hourly_price: price,
                        spot_price: settings.spot_factor.map(|f| price * f),
                        zone: None,
                        runs_as_coordinator_user: true,
                        simulated: true,
                        fixed_machines: None,
                        disk_gb_max: None,
                        opens_ports: false,
                        ports_per_node: false,
                        custom_images: false,
                        can_stop: true,
                    }
                })
            })
            .collect()
    }

    /// Refuses a launch past the region's declared capacity; the real
    /// machine holds one node.
    fn check_capacity(&self, region: &str) -> Result<(), ProviderError> {
        let declared = if self.simulating() {
            self.cfg
                .settings
                .regions
                .get(region)
                .and_then(|r| r.capacity)
        } else {
            Some(1)
        };
        let Some(cap) = declared else {
            return Ok(());
        };
        let alive = fs::read_dir(&self.cfg.nodes_dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| {
                        fs::read_to_string(e.path().join("region")).is_ok_and(|r| r == region)
                            && read_pid(&e.path().join("agent.pid")).is_some_and(alive)
                    })
                    .count()
            })
            .unwrap_or(0);
        if alive >= cap as usize {
            return Err(ProviderError::Capacity(format!(
                "local region {region} is full ({alive} of {cap} nodes)"
            )));
        }
        Ok(())
    }

    fn node_dir(&self, node_id: &str) -> PathBuf {
        self.cfg.nodes_dir.join(node_id)
    }

    fn simulating(&self) -> bool {
        self.cfg.settings.simulate || self.cfg.machine.is_none()
    }
}

/// A shape's price per hour at the declared GPU and vCPU prices.
fn price(settings: &LocalSettings, r: &Resources) -> f64 {
    let gpus: f64 = r
        .accelerators
        .iter()
        .map(|(gpu, n)| n * settings.gpu_hourly.get(gpu).copied().unwrap_or(0.0))
        .sum();
    gpus + r.cpus * settings.cpu_hourly
}

/// The node's "instance tag" naming the newest leader term that acted on
/// it (`<node dir>/provider-term`): calls from older leaders are refused,
/// as a cloud refuses a request whose precondition no longer holds.
/// Coordinators on one machine share node dirs; the check and the write
/// are not one atomic step, which is acceptable for processes that can
/// only race within one election timeout.
fn fence(dir: &Path, term: u64) -> Result<(), ProviderError> {
    let path = dir.join("provider-term");
    let newest: u64 = fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if term < newest {
        return Err(ProviderError::Fenced(format!(
            "a leader of term {newest} has acted on this node; this call is from term {term}"
        )));
    }
    if term > newest {
        let tmp = dir.join("provider-term.tmp");
        fs::write(&tmp, term.to_string())
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| ProviderError::Transient(format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

fn accelerator_arg(r: &Resources) -> Option<String> {
    let parts: Vec<String> = r
        .accelerators
        .iter()
        .map(|(k, n)| format!("{k}:{}", fmt_num(*n)))
        .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

impl Provider for LocalProvider {
    fn name(&self) -> &str {
        "local"
    }

    fn offerings(&self) -> Vec<Offering> {
        let disk = super::machine::disk_free_gb(&self.cfg.nodes_dir);
        Self::catalog(&self.cfg.settings, self.cfg.machine.as_ref(), disk)
    }

    fn infeasible_note(&self) -> Option<String> {
        match &self.cfg.machine {
            Some(m) if !self.cfg.settings.simulate => Some(m.summary()),
            _ => None,
        }
    }

    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<String, ProviderError>> {
        Box::pin(async move {
            let dir = self.node_dir(&req.node_id);
            fs::create_dir_all(&dir)
                .map_err(|e| ProviderError::InvalidRequest(format!("{}: {e}", dir.display())))?;
            fence(&dir, req.term)?;
            let pid_file = dir.join("agent.pid");
            if let Some(pid) = read_pid(&pid_file).filter(|p| alive(*p)) {
                return Ok(format!("pid-{pid}"));
            }
            let _launching = self.launching.lock().await;
            self.check_capacity(&req.region)?;
            fs::write(dir.join("region"), &req.region)
                .map_err(|e| ProviderError::Transient(e.to_string()))?;
            let log = fs::File::create(dir.join("agent.log"))
                .map_err(|e| ProviderError::Transient(e.to_string()))?;
            let log2 = log
                .try_clone()
                .map_err(|e| ProviderError::Transient(e.to_string()))?;
            let metadata = self
                .metadata
                .get_or_try_init(|| super::metadata::start(self.cfg.nodes_dir.clone()))
                .await
                .map_err(|e| ProviderError::Transient(format!("metadata service: {e}")))?;
            let node_meta = format!("{metadata}/{}", req.node_id);
            // The agent trades this for its certificate and deletes it.
            let join_token = dir.join("join-token");
            crate::identity::tls::write_secret(
                &join_token,
                crate::identity::tls::node_token(&self.cfg.join_secret, &req.node_id).as_bytes(),
            )
            .map_err(|e| ProviderError::Transient(e.to_string()))?;
            let mut cmd = tokio::process::Command::new(&self.cfg.agent_bin);
            cmd.arg("--aws-metadata-url")
                .arg(format!("{node_meta}/aws"))
                .arg("--gcp-metadata-url")
                .arg(format!("{node_meta}/gcp"))
                .arg("--azure-metadata-url")
                .arg(format!("{node_meta}/azure"))
                .arg("--azure-vm-name")
                .arg(&req.node_id)
                // Nodes share this machine: each keeps its checkpoint dirs in its own dir.
                .arg("--checkpoint-root")
                .arg(dir.join("root"))
                .arg("--coordinator")
                .arg(self.cfg.endpoints.join(","))
                .arg("--ca-cert")
                .arg(&self.cfg.ca_cert)
                .arg("--join-token-file")
                .arg(&join_token)
                .arg("--node-id")
                .arg(&req.node_id)
                .arg("--work-dir")
                .arg(&dir)
                .arg("--cpus")
                .arg(fmt_num(req.resources.cpus))
                .arg("--memory-gb")
                .arg(fmt_num(req.resources.memory_gb))
                .arg("--heartbeat-ms")
                .arg(self.cfg.heartbeat_ms.to_string());
            // The real machine's agent declares the GPUs NVML shows it;
            // a simulated node's are made up, and its jobs are told so.
            if self.simulating() {
                cmd.arg("--simulated");
                if let Some(a) = accelerator_arg(&req.resources) {
                    cmd.arg("--accelerators").arg(a);
                }
            }
            // A node gets nothing of the coordinator's environment but what an
            // agent needs: provider credentials (AWS_*, SEEWEB_API_TOKEN) stay
            // with the coordinators, and jobs never see them.
            cmd.env_clear()
                .envs(std::env::vars().filter(|(k, _)| AGENT_ENV.contains(&k.as_str())));
            // Its own process group: a coordinator crash or Ctrl-C must not take nodes down.
            cmd.process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(log2))
                .kill_on_drop(false);
            let mut child = cmd.spawn().map_err(|e| {
                ProviderError::InvalidRequest(format!(
                    "cannot start {}: {e}",
                    self.cfg.agent_bin.display()
                ))
            })?;
            let pid = child.id().unwrap_or(0) as i32;
            fs::write(&pid_file, pid.to_string())
                .map_err(|e| ProviderError::Transient(e.to_string()))?;
            // Reap it when it exits, so no zombie is left behind.
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            tracing::info!(node = %req.node_id, pid, region = %req.region, instance_type = %req.instance_type, "local node started");
            Ok(format!("pid-{pid}"))
        })
    }

    fn list_owned(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move {
            let entries = match fs::read_dir(&self.cfg.nodes_dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(ProviderError::Transient(e.to_string())),
            };
            Ok(entries
                .flatten()
                .filter_map(|e| {
                    let pid = read_pid(&e.path().join("agent.pid")).filter(|p| alive(*p))?;
                    Some(Instance {
                        instance_id: format!("pid-{pid}"),
                        node_id: e.file_name().to_string_lossy().into_owned(),
                        live: true,
                        state: "running".into(),
                    })
                })
                .collect())
        })
    }

    /// A node whose agent is gone but whose directory stays is stopped
    /// (or was lost); with no directory, there is nothing.
    fn describe<'a>(
        &'a self,
        node_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Instance>, ProviderError>> {
        Box::pin(async move {
            let dir = self.node_dir(node_id);
            if !dir.is_dir() {
                return Ok(None);
            }
            let pid = read_pid(&dir.join("agent.pid")).filter(|p| alive(*p));
            Ok(Some(Instance {
                instance_id: pid.map_or_else(String::new, |p| format!("pid-{p}")),
                node_id: node_id.to_string(),
                live: pid.is_some(),
                state: if pid.is_some() {
                    "running"
                } else {
                    "stopped (no agent; its directory is kept)"
                }
                .into(),
            }))
        })
    }

    fn inject_notice<'a>(
        &'a self,
        node_id: &'a str,
        format: &'a str,
        deadline_ms: i64,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            if !matches!(format, "aws" | "gcp" | "azure") {
                return Err(ProviderError::InvalidRequest(format!(
                    "format '{format}': expected aws, gcp or azure"
                )));
            }
            let dir = self.node_dir(node_id);
            if !dir.is_dir() {
                return Err(ProviderError::InvalidRequest(format!(
                    "no local node {node_id}"
                )));
            }
            let notice = super::metadata::InjectedNotice {
                format: format.to_string(),
                deadline_ms,
            };
            let path = super::metadata::notice_path(&dir);
            let tmp = path.with_extension("tmp");
            fs::write(&tmp, serde_json::to_vec(&notice).unwrap_or_default())
                .and_then(|()| fs::rename(&tmp, &path))
                .map_err(|e| ProviderError::Transient(e.to_string()))
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<String, ProviderError>> {
        Box::pin(async move {
            if !self.cfg.agent_bin.is_file() {
                return Err(ProviderError::InvalidRequest(format!(
                    "agent binary {} not found (set NEMBO_AGENT_BIN)",
                    self.cfg.agent_bin.display()
                )));
            }
            let offers = match &self.cfg.machine {
                Some(m) if !self.cfg.settings.simulate => {
                    format!("offers this machine: {}", m.describe())
                }
                _ => "offers SIMULATED shapes (simulate: true): their GPUs do not exist".into(),
            };
            Ok(format!(
                "agents run as processes on this machine ({}); {offers}",
                self.cfg.agent_bin.display()
            ))
        })
    }

    fn terminate<'a>(
        &'a self,
        node_id: &'a str,
        term: u64,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.halt(node_id, term))
    }

    /// A local node stops as a VM does: its jobs and its agent end, its
    /// directory (identity, job dirs, checkpoints) stays for `start`.
    fn stop<'a>(&'a self, node_id: &'a str, term: u64) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.halt(node_id, term))
    }

    fn start(&self, req: LaunchRequest) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move { self.launch(req).await.map(|_| ()) })
    }
}

impl LocalProvider {
    /// Ends a node's jobs and agent, for a leader of `term`; the node's
    /// directory stays. Terminating a local node and stopping one do the
    /// same here: what differs is whether the coordinators keep it.
    async fn halt(&self, node_id: &str, term: u64) -> Result<(), ProviderError> {
        let dir = self.node_dir(node_id);
        if dir.is_dir() {
            fence(&dir, term)?;
        }
        // A VM going away takes its jobs with it: kill every job's process group.
        if let Ok(entries) = fs::read_dir(dir.join("jobs")) {
            for e in entries.flatten() {
                if let Some(pgid) = read_pid(&e.path().join("pid")) {
                    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                }
            }
        }
        if let Some(pid) = read_pid(&dir.join("agent.pid")) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            for _ in 0..40 {
                if !alive(pid) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if alive(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _ = fs::remove_file(dir.join("agent.pid"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_has_two_regions_and_gpu_shapes() {
        let simulate = LocalSettings {
            simulate: true,
            ..Default::default()
        };
        let c = LocalProvider::catalog(&simulate, None, Some(100));
        assert!(REGIONS.len() >= 2);
        for r in REGIONS {
            assert!(c.iter().any(|o| o.region == *r
                && o.instance_type == "local-h100-8"
                && o.resources.accelerators["H100"] == 8.0));
        }
    }

    #[tokio::test]
    async fn a_deposed_leader_cannot_touch_a_node_a_newer_leader_acted_on() {
        let dir = tempfile::tempdir().unwrap();
        let p = LocalProvider::new(LocalConfig {
            nodes_dir: dir.path().to_path_buf(),
            agent_bin: "/nonexistent/nembo-agent".into(),
            endpoints: vec![],
            ca_cert: "/nonexistent/ca.pem".into(),
            join_secret: "secret".into(),
            heartbeat_ms: 1000,
            settings: LocalSettings::default(),
            machine: None,
        });
        fs::create_dir_all(dir.path().join("node-1")).unwrap();
        p.terminate("node-1", 7).await.unwrap();
        let stale = p.terminate("node-1", 6).await;
        assert!(matches!(stale, Err(ProviderError::Fenced(_))), "{stale:?}");
        let launch = p
            .launch(LaunchRequest {
                node_id: "node-1".into(),
                region: "us-east".into(),
                zone: None,
                instance_type: "local-cpu-2".into(),
                resources: Resources::default(),
                spot: false,
                disk_gb: None,
                disk_tier: None,
                image_id: None,
                ports: Vec::new(),
                term: 5,
            })
            .await;
        assert!(
            matches!(launch, Err(ProviderError::Fenced(_))),
            "{launch:?}"
        );
        // The same or a newer leader may.
        p.terminate("node-1", 7).await.unwrap();
        p.terminate("node-1", 8).await.unwrap();
    }
}
