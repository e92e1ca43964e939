//! The simulated cloud, for tests and benchmarks at scale: regions, prices,
//! capacity limits, quota, capacity errors, boot delays and API failures,
//! all from a JSON file (`nembo-coordinator --sim-cloud FILE`) and a seed.
//!
//! By default a node is only a record: whoever speaks the agent protocol as
//! that node (a load generator, a test) brings it up. With `"agents": true`
//! each launched node also gets a real `nembo-agent` process, through the
//! local provider, so a job placed in the simulated cloud really runs.
//! `--sim-provider` alone enables a small default cloud without agents.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use nembo_domain::state::{Offering, Resources};
use serde::Deserialize;

use super::local::LocalProvider;
use super::{BoxFuture, Instance, LaunchRequest, Provider, ProviderError};

/// The largest disk a simulated instance is given, GB.
const SIM_DISK_GB_MAX: u64 = 65_536;

/// A simulated cloud, as written in its JSON file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimCloud {
    /// Seeds the API failures, so a run replays.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Regions, each with its own prices and limits.
    pub regions: Vec<SimRegion>,
    /// Machine shapes offered in every region.
    pub instance_types: Vec<SimInstanceType>,
    /// How long a launch call takes (ms).
    #[serde(default)]
    pub launch_ms: u64,
    /// Percent of API calls that fail with a transient error.
    #[serde(default)]
    pub api_failure_percent: u8,
    /// Start a real agent for each launched node.
    #[serde(default)]
    pub agents: bool,
}

fn default_seed() -> u64 {
    1
}

/// One region of the simulated cloud.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimRegion {
    /// Name (`sim-r01`).
    pub name: String,
    /// Multiplies every price in the region.
    #[serde(default = "one")]
    pub price_factor: f64,
    /// Most instances alive at once in the region; none: unlimited. 0: every
    /// launch there fails for capacity.
    #[serde(default)]
    pub capacity: Option<u32>,
    /// Most vCPUs alive at once in the region (the account's quota).
    #[serde(default)]
    pub quota_vcpus: Option<f64>,
}

fn one() -> f64 {
    1.0
}

/// One machine shape.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimInstanceType {
    /// Name (`sim-h100-1`).
    pub name: String,
    /// GPU model, if any.
    #[serde(default)]
    pub accelerator: Option<String>,
    /// GPUs per instance.
    #[serde(default)]
    pub accelerator_count: f64,
    /// vCPUs.
    pub cpus: f64,
    /// Memory, GB.
    pub memory_gb: f64,
    /// On-demand price per hour.
    pub price: f64,
    /// Spot price per hour, if spot is offered.
    #[serde(default)]
    pub spot_price: Option<f64>,
}

impl SimCloud {
    /// The cloud `--sim-provider` offers with no file: one region, unlimited,
    /// a CPU shape and an 8 x H100 shape, records only.
    pub fn default_cloud() -> SimCloud {
        SimCloud {
            seed: 1,
            regions: vec![SimRegion {
                name: "sim-1".into(),
                price_factor: 1.0,
                capacity: None,
                quota_vcpus: None,
            }],
            instance_types: vec![
                SimInstanceType {
                    name: "sim-cpu-2".into(),
                    accelerator: None,
                    accelerator_count: 0.0,
                    cpus: 2.0,
                    memory_gb: 16.0,
                    price: 0.1,
                    spot_price: Some(0.03),
                },
                SimInstanceType {
                    name: "sim-h100-8".into(),
                    accelerator: Some("H100".into()),
                    accelerator_count: 8.0,
                    cpus: 192.0,
                    memory_gb: 1536.0,
                    price: 24.0,
                    spot_price: Some(9.6),
                },
            ],
            launch_ms: 0,
            api_failure_percent: 0,
            agents: false,
        }
    }

    /// Reads and checks a cloud file.
    pub fn load(path: &Path) -> Result<SimCloud, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let cloud: SimCloud =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if cloud.regions.is_empty() || cloud.instance_types.is_empty() {
            return Err(format!(
                "{}: a simulated cloud needs at least one region and one instance type",
                path.display()
            ));
        }
        Ok(cloud)
    }
}

/// An instance the simulated cloud holds.
#[derive(Debug, Clone)]
struct SimInstance {
    instance_id: String,
    region: String,
    cpus: f64,
    /// Newest leader term that acted on it.
    term: u64,
}

struct Books {
    /// By node id.
    instances: BTreeMap<String, SimInstance>,
    next_id: u64,
    rng: u64,
}

/// The simulated cloud as a provider.
pub struct SimProvider {
    cloud: SimCloud,
    books: Mutex<Books>,
    agents: Option<LocalProvider>,
}

impl SimProvider {
    /// A provider for `cloud`; `agents` starts real agents when the cloud asks for them.
    pub fn new(cloud: SimCloud, agents: Option<LocalProvider>) -> SimProvider {
        let agents = agents.filter(|_| cloud.agents);
        SimProvider {
            books: Mutex::new(Books {
                instances: BTreeMap::new(),
                next_id: 0,
                rng: cloud.seed.max(1),
            }),
            cloud,
            agents,
        }
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides, from the seed, whether a call fails.
    fn api_call(&self, what: &str) -> Result<(), ProviderError> {
        let mut b = self.books();
        // xorshift64: the same seed fails the same calls.
        b.rng ^= b.rng << 13;
        b.rng ^= b.rng >> 7;
        b.rng ^= b.rng << 17;
        if b.rng % 100 < u64::from(self.cloud.api_failure_percent) {
            return Err(ProviderError::Transient(format!(
                "{what}: simulated API failure (503)"
            )));
        }
        Ok(())
    }

    /// Admits a launch against the region's capacity and quota, booking it.
    fn admit(&self, req: &LaunchRequest) -> Result<String, ProviderError> {
        let region = self
            .cloud
            .regions
            .iter()
            .find(|r| r.name == req.region)
            .ok_or_else(|| {
                ProviderError::InvalidRequest(format!("sim has no region '{}'", req.region))
            })?;
        if !self
            .cloud
            .instance_types
            .iter()
            .any(|t| t.name == req.instance_type)
        {
            return Err(ProviderError::InvalidRequest(format!(
                "sim has no instance type '{}'",
                req.instance_type
            )));
        }
        let mut b = self.books();
        if let Some(i) = b.instances.get_mut(&req.node_id) {
            if req.term < i.term {
                return Err(fenced(i.term, req.term));
            }
            i.term = req.term;
            return Ok(i.instance_id.clone()); // idempotent per node id
        }
        let in_region = b.instances.values().filter(|i| i.region == req.region);
        let (count, vcpus) = in_region.fold((0u32, 0.0), |(n, c), i| (n + 1, c + i.cpus));
        if region.capacity.is_some_and(|cap| count >= cap) {
            return Err(ProviderError::Capacity(format!(
                "InsufficientInstanceCapacity: no {} capacity in {}",
                req.instance_type, req.region
            )));
        }
        if region
            .quota_vcpus
            .is_some_and(|q| vcpus + req.resources.cpus > q)
        {
            return Err(ProviderError::Quota(format!(
                "VcpuLimitExceeded: {} vCPUs quota in {}",
                region.quota_vcpus.unwrap_or(0.0),
                req.region
            )));
        }
        b.next_id += 1;
        let instance_id = format!("sim-{:08x}", b.next_id);
        b.instances.insert(
            req.node_id.clone(),
            SimInstance {
                instance_id: instance_id.clone(),
                region: req.region.clone(),
                cpus: req.resources.cpus,
                term: req.term,
            },
        );
        Ok(instance_id)
    }
}

fn fenced(newest: u64, term: u64) -> ProviderError {
    ProviderError::Fenced(format!(
        "a leader of term {newest} has acted on this instance; this call is from term {term}"
    ))
}

impl Provider for SimProvider {
    fn records_only(&self) -> bool {
        self.agents.is_none()
    }

    fn name(&self) -> &str {
        "sim"
    }

    fn offerings(&self) -> Vec<Offering> {
        let mut out = Vec::new();
        for r in &self.cloud.regions {
            for t in &self.cloud.instance_types {
                let mut accelerators = BTreeMap::new();
                if let Some(a) = &t.accelerator {
                    accelerators.insert(a.clone(), t.accelerator_count);
                }
                out.push(Offering {
                    provider: "sim".into(),
                    region: r.name.clone(),
                    zone: None,
                    // Its agents, where it starts any, are local processes.
                    runs_as_coordinator_user: self.agents.is_some(),
                    simulated: true,
                    fixed_machines: None,
                    // A cloud-like shape: disks of any size, ports opened.
                    disk_gb_max: Some(SIM_DISK_GB_MAX),
                    opens_ports: true,
                    ports_per_node: false,
                    custom_images: false,
                    can_stop: false,
                    instance_type: t.name.clone(),
                    resources: Resources {
                        accelerators,
                        cpus: t.cpus,
                        memory_gb: t.memory_gb,
                    },
                    hourly_price: t.price * r.price_factor,
                    spot_price: t.spot_price.map(|p| p * r.price_factor),
                });
            }
        }
        out
    }

    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<String, ProviderError>> {
        Box::pin(async move {
            if self.cloud.launch_ms > 0 {
                tokio::time::sleep(Duration::from_millis(self.cloud.launch_ms)).await;
            }
            self.api_call("RunInstances")?;
            let instance_id = self.admit(&req)?;
            if let Some(local) = &self.agents {
                if let Err(e) = local.launch(req.clone()).await {
                    self.books().instances.remove(&req.node_id);
                    return Err(e);
                }
            }
            Ok(instance_id)
        })
    }

    fn list_owned(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move {
            self.api_call("DescribeInstances")?;
            Ok(self
                .books()
                .instances
                .iter()
                .map(|(node, i)| Instance {
                    instance_id: i.instance_id.clone(),
                    node_id: node.clone(),
                    live: true,
                    state: "running".into(),
                })
                .collect())
        })
    }

    fn terminate<'a>(
        &'a self,
        node_id: &'a str,
        term: u64,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            self.api_call("TerminateInstances")?;
            {
                let mut b = self.books();
                if let Some(i) = b.instances.get(node_id) {
                    if term < i.term {
                        return Err(fenced(i.term, term));
                    }
                }
                b.instances.remove(node_id);
            }
            if let Some(local) = &self.agents {
                local.terminate(node_id, term).await?;
            }
            Ok(())
        })
    }

    fn inject_notice<'a>(
        &'a self,
        node_id: &'a str,
        format: &'a str,
        deadline_ms: i64,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            match &self.agents {
                Some(local) => local.inject_notice(node_id, format, deadline_ms).await,
                None => Err(ProviderError::InvalidRequest(
                    "this simulated cloud runs no agents: nothing would read the notice".into(),
                )),
            }
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<String, ProviderError>> {
        Box::pin(async move {
            Ok(format!(
                "simulated cloud: {} regions, {} instance types, {} instances held{}",
                self.cloud.regions.len(),
                self.cloud.instance_types.len(),
                self.books().instances.len(),
                if self.agents.is_some() {
                    ", real agents"
                } else {
                    ", records only"
                }
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cloud(json: &str) -> SimProvider {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.json");
        std::fs::write(&path, json).unwrap();
        SimProvider::new(SimCloud::load(&path).unwrap(), None)
    }

    fn req(node: &str, region: &str, term: u64) -> LaunchRequest {
        LaunchRequest {
            node_id: node.into(),
            region: region.into(),
            zone: None,
            instance_type: "h1".into(),
            resources: Resources {
                cpus: 8.0,
                ..Default::default()
            },
            spot: false,
            disk_gb: None,
            disk_tier: None,
            image_id: None,
            ports: Vec::new(),
            term,
        }
    }

    #[tokio::test]
    async fn capacity_quota_and_idempotence_are_enforced_per_region() {
        let p = cloud(
            r#"{"regions": [{"name": "full", "capacity": 0},
                            {"name": "one", "capacity": 1},
                            {"name": "q", "quota_vcpus": 12},
                            {"name": "dear", "price_factor": 2}],
                "instance_types": [{"name": "h1", "accelerator": "H100", "accelerator_count": 1,
                                    "cpus": 8, "memory_gb": 64, "price": 2.5, "spot_price": 1}]}"#,
        );
        let prices: Vec<f64> = p.offerings().iter().map(|o| o.hourly_price).collect();
        assert_eq!(prices, [2.5, 2.5, 2.5, 5.0]);
        let full = p.launch(req("node-1", "full", 1)).await;
        assert!(matches!(full, Err(ProviderError::Capacity(_))), "{full:?}");
        let a = p.launch(req("node-2", "one", 1)).await.unwrap();
        assert_eq!(p.launch(req("node-2", "one", 1)).await.unwrap(), a);
        let second = p.launch(req("node-3", "one", 1)).await;
        assert!(matches!(second, Err(ProviderError::Capacity(_))));
        p.launch(req("node-4", "q", 1)).await.unwrap();
        let over = p.launch(req("node-5", "q", 1)).await;
        assert!(matches!(over, Err(ProviderError::Quota(_))), "{over:?}");
        let owned: Vec<String> = p
            .list_owned()
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.node_id)
            .collect();
        assert_eq!(owned, ["node-2", "node-4"]);
        // Terminating frees capacity; an older leader cannot.
        assert!(matches!(
            p.terminate("node-2", 0).await,
            Err(ProviderError::Fenced(_))
        ));
        p.terminate("node-2", 1).await.unwrap();
        p.launch(req("node-3", "one", 1)).await.unwrap();
    }

    #[tokio::test]
    async fn api_failures_follow_the_seed() {
        let json = r#"{"seed": 42, "api_failure_percent": 50, "regions": [{"name": "r"}],
            "instance_types": [{"name": "h1", "cpus": 1, "memory_gb": 1, "price": 1}]}"#;
        let outcomes = |p: SimProvider| async move {
            let mut v = Vec::new();
            for i in 0..20 {
                v.push(p.launch(req(&format!("n{i}"), "r", 1)).await.is_ok());
            }
            v
        };
        let a = outcomes(cloud(json)).await;
        let b = outcomes(cloud(json)).await;
        assert_eq!(a, b, "the same seed fails the same calls");
        assert!(a.iter().any(|ok| *ok) && a.iter().any(|ok| !ok), "{a:?}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(
            &path,
            r#"{"regions": [{"name": "r", "capacty": 1}], "instance_types": []}"#,
        )
        .unwrap();
        let e = SimCloud::load(&path).unwrap_err();
        assert!(e.contains("capacty"), "{e}");
    }
}
