//! The Nembo node agent: one small process per node. It keeps one session
//! with the coordinators, runs jobs (setup, then run) in their own process
//! groups, ships their output, and survives both its own restarts and
//! coordinator outages without losing or re-running a job.
//!
//! It links no Raft and no provider code: its only dependency on the
//! coordinator side is the `nembo-proto` contract.

pub mod fence;
pub mod gpu;
pub mod session;
pub mod supervisor;
pub mod telemetry;

pub use session::{AgentConfig, AgentError};

/// Runs the agent until the coordinator retires the node.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    std::fs::create_dir_all(cfg.work_dir.join("jobs"))
        .map_err(|e| AgentError::Setup(format!("{}: {e}", cfg.work_dir.display())))?;
    let (sup, events) = supervisor::Supervisor::start(cfg.work_dir.clone());
    session::run(cfg, sup, events).await
}
