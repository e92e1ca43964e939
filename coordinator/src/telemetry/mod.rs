//! What the fleet reports: GPU telemetry held by the leader (fleet), agent
//! heartbeat delays, and the Prometheus endpoint that serves both with the
//! control plane's own series (metrics).

pub mod fleet;
pub mod heartbeats;
pub mod metrics;
