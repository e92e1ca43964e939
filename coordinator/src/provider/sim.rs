//! The simulated cloud: a node is only a record; no machine and no process
//! is started. Whoever speaks the agent protocol as that node (a load
//! generator, a test) brings it up. For tests and benchmarks at scale;
//! `nembo-coordinator --sim-provider` enables it beside the local provider,
//! and tasks reach it with `infra: sim`.

use std::collections::BTreeMap;

use nembo_domain::state::{Offering, Resources};

use super::{BoxFuture, LaunchRequest, Provider, ProviderError};

/// Agents as records, launched instantly.
pub struct SimProvider;

impl Provider for SimProvider {
    fn name(&self) -> &str {
        "sim"
    }

    fn offerings(&self) -> Vec<Offering> {
        let shape = |gpus: f64, cpus: f64| {
            let mut accelerators = BTreeMap::new();
            if gpus > 0.0 {
                accelerators.insert("H100".to_string(), gpus);
            }
            Resources {
                accelerators,
                cpus,
                memory_gb: cpus * 8.0,
            }
        };
        [("sim-cpu-2", 0.0, 2.0), ("sim-h100-8", 8.0, 192.0)]
            .into_iter()
            .map(|(t, g, c)| Offering {
                provider: "sim".into(),
                region: "sim-1".into(),
                instance_type: t.into(),
                resources: shape(g, c),
                hourly_price: 0.0,
                spot_price: None,
            })
            .collect()
    }

    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<String, ProviderError>> {
        Box::pin(async move { Ok(format!("sim-{}", req.node_id)) })
    }

    fn terminate<'a>(
        &'a self,
        _node_id: &'a str,
        _term: u64,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async { Ok(()) })
    }
}
