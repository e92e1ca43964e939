//! Cloud providers: where nodes come from. Each provider is one file that
//! implements [`Provider`]; the leader's provisioner is the only caller.
//!
//! Every instance a provider launches is tagged with the node id (the
//! "attempt": a node id is never reused), so a new leader can find what an
//! old one launched: adopt it if the node still wants it, terminate it if
//! not (`control::reconcile`).

pub mod local;
pub mod sim;

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
    /// Region.
    pub region: String,
    /// Zone, where the offering named one.
    pub zone: Option<String>,
    /// Instance type.
    pub instance_type: String,
    /// What the node declares.
    pub resources: Resources,
    /// Spot capacity rather than on-demand.
    pub spot: bool,
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
    /// Launches a node; returns the provider's instance id. Idempotent per node id.
    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<String, ProviderError>>;
    /// Every instance this cluster holds at the provider (found by tag).
    fn list_owned(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>>;
    /// Terminates a node and everything on it, for a leader of `term`. Idempotent.
    fn terminate<'a>(
        &'a self,
        node_id: &'a str,
        term: u64,
    ) -> BoxFuture<'a, Result<(), ProviderError>>;
    /// Whether the provider can be used as configured (credentials work),
    /// and what it answered: for `nembo check`.
    fn check(&self) -> BoxFuture<'_, Result<String, ProviderError>>;
}
