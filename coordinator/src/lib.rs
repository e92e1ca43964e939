//! The Nembo coordinator: cluster state in a raft-rs log on durable storage,
//! the public gRPC API, the agent protocol, the leader-only control loops
//! and the providers that supply nodes.

pub mod agent_service;
pub mod api;
pub mod control;
pub mod convert;
pub mod enroll;
pub mod error;
pub mod fleet;
pub mod gate;
pub mod identity;
pub mod logs;
pub mod metrics;
pub mod peer;
pub mod provider;
pub mod raft;
pub mod sealed;
pub mod server;
pub mod tls;

pub use server::{run, ApiInfo, CoordinatorConfig};
