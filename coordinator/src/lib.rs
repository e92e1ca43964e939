//! The Nembo coordinator: cluster state in a raft-rs log on durable storage,
//! the public gRPC API, the agent protocol, the leader-only control loops
//! and the providers that supply nodes. ARCHITECTURE.md maps the rooms.

pub mod agents;
pub mod api;
pub mod blobs;
pub mod config;
pub mod context;
pub mod control;
pub mod error;
pub mod identity;
pub mod listener;
pub mod logs;
pub mod provider;
pub mod replication;
pub mod serve;
pub mod server;
pub mod telemetry;

pub use config::CoordinatorConfig;
pub use server::run;
