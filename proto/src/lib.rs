//! Nembo's gRPC contract, generated at build time from `proto/nembo/**.proto`
//! by protox (no system `protoc`): the public API (`nembo.v1`), the agent
//! protocol (`nembo.agent.v1`) and the Raft transport (`nembo.raft.v1`).
#![allow(missing_docs, clippy::all)]

/// The public API: package `nembo.v1`.
pub mod v1 {
    tonic::include_proto!("nembo.v1");
}

/// The agents' protocol, internal to a cluster: package `nembo.agent.v1`.
pub mod agent {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("nembo.agent.v1");
    }
}

/// The members' Raft transport, internal to a cluster: package `nembo.raft.v1`.
pub mod raft {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("nembo.raft.v1");
    }
}

/// Encoded `FileDescriptorSet` of the whole API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/nembo_descriptor.bin"));

/// Largest task (YAML or structured) a coordinator accepts, in bytes.
pub const MAX_TASK_BYTES: usize = 256 * 1024;

/// Metadata key of the leader's URL on a follower's refusal of an agent.
pub const LEADER_URL_KEY: &str = "nembo-leader-url";

/// The well-known types (Timestamp, Duration) the generated code uses.
pub use prost_types;

pub mod api_info;
pub mod client;
pub mod clock;
pub mod files;
pub mod http;
pub mod workdir;

/// A dry run is checked exactly as the submission it stands for.
impl From<v1::DryRunRequest> for v1::SubmitJobRequest {
    fn from(r: v1::DryRunRequest) -> Self {
        use v1::{dry_run_request, submit_job_request};
        v1::SubmitJobRequest {
            task: r.task.map(|t| match t {
                dry_run_request::Task::TaskYaml(y) => submit_job_request::Task::TaskYaml(y),
                dry_run_request::Task::Spec(s) => submit_job_request::Task::Spec(s),
            }),
            idempotency_key: String::new(),
            env_overrides: r.env_overrides,
            managed: r.managed,
            uploads: r.uploads,
            ..Default::default()
        }
    }
}
