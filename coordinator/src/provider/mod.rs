//! Cloud providers: where nodes come from. Each provider is one file that
//! implements [`Provider`]; the leader's provisioner is the only caller.
//!
//! Every instance a provider launches is tagged with the node id (the
//! "attempt": a node id is never reused), so a new leader can find what an
//! old one launched: adopt it if the node still wants it, terminate it if
//! not (`control::reconcile`).

pub mod aws;
pub mod bootstrap;
pub mod catalog;
pub mod http;
pub mod local;
pub mod machine;
pub mod metadata;
pub mod seeweb;
pub mod sim;
pub mod ssh;

use std::future::Future;
use std::pin::Pin;

use nembo_domain::state::{LaunchFailure, Offering, Resources};

/// A boxed future, so the trait stays object-safe without a macro crate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchRequest {
    /// Node id the agent must enroll with; the instance is tagged with it.
    pub node_id: String,
    pub region: String,
    /// Zone, where the offering named one.
    pub zone: Option<String>,
    pub instance_type: String,
    /// What the node declares.
    pub resources: Resources,
    /// Spot capacity rather than on-demand.
    pub spot: bool,
    /// The disk the task asked for (`disk_size`, GB), if it chose one.
    pub disk_gb: Option<u64>,
    /// Its tier (`disk_tier`), if it chose one.
    pub disk_tier: Option<nembo_domain::task::DiskTier>,
    /// The VM image the task named for this region (`image_id`), if any.
    pub image_id: Option<String>,
    /// TCP ports to open to the world on this node, where the provider
    /// opens them per node ([`nembo_domain::state::Offering::ports_per_node`]).
    pub ports: Vec<nembo_domain::task::PortRange>,
    /// Raft term of the leader asking: a fencing token. A provider refuses
    /// a call about a node from a leader older than the last one that
    /// acted on it.
    pub term: u64,
}

/// An instance a provider holds for this cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The provider's id.
    pub instance_id: String,
    /// The node it was launched for (its tag).
    pub node_id: String,
    /// Still running or starting (false: stopping or gone).
    pub live: bool,
    /// The provider's own word for its state (`running`, `stopped`,
    /// `Booted`, ...), for `nembo status --refresh`.
    pub state: String,
}

/// Provider failures, by what the provisioner should do about them.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// No capacity for this shape in this place now: try the next candidate.
    #[error("no capacity: {0}")]
    Capacity(String),
    /// The account's quota is exhausted there: try the next candidate.
    #[error("quota exceeded: {0}")]
    Quota(String),
    /// Credentials are missing or refused.
    #[error("not authorized: {0}")]
    Auth(String),
    /// The request can never succeed as written.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Worth retrying with backoff.
    #[error("transient: {0}")]
    Transient(String),
    /// A newer leader has acted on this node: the caller is deposed.
    #[error("fenced: {0}")]
    Fenced(String),
}

impl ProviderError {
    /// What a failed launch means for placement.
    pub fn launch_failure(&self) -> LaunchFailure {
        match self {
            ProviderError::Capacity(_) => LaunchFailure::Capacity,
            ProviderError::Quota(_) => LaunchFailure::Quota,
            _ => LaunchFailure::Other,
        }
    }
}

/// A source of nodes.
pub trait Provider: Send + Sync {
    /// Name used in `infra` (`local`, `aws`).
    fn name(&self) -> &str;
    /// Every shape it can launch, with prices.
    fn offerings(&self) -> Vec<Offering>;

    /// What this provider is in a few words, added to the message of a
    /// task nothing can host ("this machine has no GPU").
    fn infeasible_note(&self) -> Option<String> {
        None
    }

    /// Its nodes are records that no real agent runs on (a simulated cloud
    /// for load tests), so their sessions may use the cluster's agent token
    /// instead of a node certificate.
    fn records_only(&self) -> bool {
        false
    }
    /// Launches a node; returns the provider's instance id. Idempotent per node id.
    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<String, ProviderError>>;
    /// Every instance this cluster holds at the provider (found by tag).
    fn list_owned(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>>;
    /// The instance a node has at the provider now, if any (found by tag).
    fn describe<'a>(
        &'a self,
        node_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Instance>, ProviderError>> {
        Box::pin(async move {
            let all = self.list_owned().await?;
            Ok(all.into_iter().find(|i| i.node_id == node_id))
        })
    }
    /// Terminates a node and everything on it, for a leader of `term`. Idempotent.
    fn terminate<'a>(
        &'a self,
        node_id: &'a str,
        term: u64,
    ) -> BoxFuture<'a, Result<(), ProviderError>>;
    /// Stops a node's machine, keeping its disk, for a leader of `term`
    /// (only for offerings with `can_stop`). Idempotent.
    fn stop<'a>(&'a self, node_id: &'a str, term: u64) -> BoxFuture<'a, Result<(), ProviderError>> {
        let _ = (node_id, term);
        Box::pin(async move {
            Err(ProviderError::InvalidRequest(format!(
                "provider '{}' cannot stop machines",
                self.name()
            )))
        })
    }
    /// Starts a stopped node's machine again; its agent comes back with its
    /// identity. Idempotent.
    fn start(&self, req: LaunchRequest) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move {
            Err(ProviderError::InvalidRequest(format!(
                "provider '{}' cannot start machines (node {})",
                self.name(),
                req.node_id
            )))
        })
    }
    /// Whether the provider can be used as configured (credentials work),
    /// and what it answered: for `nembo check`.
    fn check(&self) -> BoxFuture<'_, Result<String, ProviderError>>;
    /// Makes a node's metadata service announce its preemption in a
    /// cloud's format (`aws`, `gcp`, `azure`), as due at `deadline_ms`:
    /// `nembo local preempt`. Only simulated providers can.
    fn inject_notice<'a>(
        &'a self,
        node_id: &'a str,
        format: &'a str,
        deadline_ms: i64,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        let _ = (node_id, format, deadline_ms);
        Box::pin(async move {
            Err(ProviderError::InvalidRequest(format!(
                "provider '{}' cannot simulate a preemption notice",
                self.name()
            )))
        })
    }
    /// The offerings the provider's API lists now, for `nembo catalog
    /// refresh`; providers with a fixed catalog have nothing to fetch.
    fn refresh_catalog(&self) -> BoxFuture<'_, Result<Vec<Offering>, ProviderError>> {
        Box::pin(async move {
            Err(ProviderError::InvalidRequest(format!(
                "provider '{}' has no catalog API to refresh from",
                self.name()
            )))
        })
    }
}

/// `providers.yaml`: which providers beyond `local` this cluster uses, and
/// how. A section's presence enables its provider.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvidersFile {
    /// How cloud VMs install and reach the agent.
    #[serde(default)]
    pub bootstrap: bootstrap::BootstrapSettings,
    /// Prices and capacity the local provider declares.
    #[serde(default)]
    pub local: local::LocalSettings,
    /// AWS EC2.
    pub aws: Option<aws::AwsSettings>,
    /// Seeweb ECS.
    pub seeweb: Option<seeweb::SeewebSettings>,
    /// Existing hosts over SSH.
    pub ssh: Option<ssh::SshSettings>,
}

impl ProvidersFile {
    /// Reads and checks the file; unknown fields are refused by name.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        yaml_serde::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// What building the providers takes besides providers.yaml.
pub struct ProviderContext {
    /// How the local provider starts agents (prices and capacity are
    /// replaced by providers.yaml's).
    pub local: local::LocalConfig,
    /// This cluster's id, the tag that tells its instances from others'.
    pub cluster: String,
    /// First-boot settings for cloud VMs.
    pub bootstrap: bootstrap::Bootstrap,
    /// Refreshed catalogs (`<cluster dir>/catalog`).
    pub catalog_dir: std::path::PathBuf,
    /// The simulated cloud, if asked for.
    pub sim: Option<sim::SimCloud>,
    /// The local provider offers simulated shapes instead of this machine
    /// (`--simulate-gpus`, as `local: {simulate: true}` does).
    pub simulate_gpus: bool,
}

/// Every configured provider by name; `local` is always there.
pub fn build(
    file: &ProvidersFile,
    cx: ProviderContext,
) -> Result<std::collections::BTreeMap<String, std::sync::Arc<dyn Provider>>, String> {
    use std::sync::Arc;
    let catalog_dir = Some(cx.catalog_dir.as_path());
    let mut settings = file.local.clone();
    settings.simulate |= cx.simulate_gpus;
    settings.validate()?;
    let machine = (!settings.simulate).then(|| machine::Machine::probe(&cx.local.agent_bin));
    let local_cfg = local::LocalConfig {
        settings,
        machine,
        ..cx.local
    };
    let mut all: Vec<Arc<dyn Provider>> =
        vec![Arc::new(local::LocalProvider::new(local_cfg.clone()))];
    if let Some(cloud) = cx.sim {
        // The simulated cloud's nodes are local agents with simulated shapes.
        let simulated = local::LocalConfig {
            settings: local::LocalSettings {
                simulate: true,
                ..local_cfg.settings.clone()
            },
            machine: None,
            ..local_cfg.clone()
        };
        all.push(Arc::new(sim::SimProvider::new(
            cloud,
            Some(local::LocalProvider::new(simulated)),
        )));
    }
    if let Some(s) = &file.aws {
        let rows = catalog::load("aws", catalog_dir, catalog::AWS)?;
        all.push(Arc::new(aws::AwsProvider::new(
            s.clone(),
            cx.cluster.clone(),
            rows,
            cx.bootstrap.clone(),
        )));
    }
    if let Some(s) = &file.seeweb {
        let rows = catalog::load("seeweb", catalog_dir, catalog::SEEWEB)?;
        all.push(Arc::new(seeweb::SeewebProvider::new(
            s.clone(),
            cx.cluster.clone(),
            rows,
            cx.bootstrap.clone(),
        )));
    }
    if let Some(s) = &file.ssh {
        all.push(Arc::new(ssh::SshProvider::new(
            s.clone(),
            local_cfg.agent_bin.clone(),
            cx.bootstrap.clone(),
        )?));
    }
    Ok(all.into_iter().map(|p| (p.name().to_string(), p)).collect())
}

/// Providers Nembo has that providers.yaml does not enable, for `nembo check`.
pub fn not_enabled(file: &ProvidersFile) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    if file.aws.is_none() {
        out.push((
            "aws",
            "not enabled: add an `aws:` section to providers.yaml",
        ));
    }
    if file.seeweb.is_none() {
        out.push((
            "seeweb",
            "not enabled: add a `seeweb:` section to providers.yaml",
        ));
    }
    if file.ssh.is_none() {
        out.push((
            "ssh",
            "not enabled: add an `ssh:` section with hosts to providers.yaml",
        ));
    }
    out
}
