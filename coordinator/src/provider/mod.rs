//! Cloud providers: where nodes come from. Each provider is one file that
//! implements [`Provider`]; the leader's provisioner is the only caller.

pub mod local;
pub mod sim;

use std::future::Future;
use std::pin::Pin;

use nembo_domain::state::{Offering, Resources};

/// A boxed future, so the trait stays object-safe without a macro crate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchRequest {
    /// Node id the agent must enroll with.
    pub node_id: String,
    /// Region.
    pub region: String,
    /// Instance type.
    pub instance_type: String,
    /// What the node declares.
    pub resources: Resources,
    /// Raft term of the leader asking: a fencing token. A provider refuses
    /// a call about a node from a leader older than the last one that
    /// acted on it.
    pub term: u64,
}

/// Provider failures, by what the provisioner should do about them.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The request can never succeed as written.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Worth retrying.
    #[error("transient: {0}")]
    Transient(String),
    /// A newer leader has acted on this node: the caller is deposed.
    #[error("fenced: {0}")]
    Fenced(String),
}

/// A source of nodes.
pub trait Provider: Send + Sync {
    /// Name used in `infra` (`local`, `aws`).
    fn name(&self) -> &str;
    /// Every shape it can launch, with prices.
    fn offerings(&self) -> Vec<Offering>;
    /// Launches a node; returns the provider's instance id. Idempotent per node id.
    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<String, ProviderError>>;
    /// Terminates a node and everything on it, for a leader of `term`. Idempotent.
    fn terminate<'a>(
        &'a self,
        node_id: &'a str,
        term: u64,
    ) -> BoxFuture<'a, Result<(), ProviderError>>;
}
