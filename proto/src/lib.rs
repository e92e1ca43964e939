//! Nembo's gRPC contract, package `nembo.v1`, generated at build time from
//! `proto/nembo/v1/*.proto` by protox (no system `protoc`).
#![allow(missing_docs, clippy::all)]

/// Generated messages and services of package `nembo.v1`.
pub mod v1 {
    tonic::include_proto!("nembo.v1");
}

/// Encoded `FileDescriptorSet` of the whole API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/nembo_descriptor.bin"));

/// Largest task (YAML or structured) a coordinator accepts, in bytes.
pub const MAX_TASK_BYTES: usize = 256 * 1024;

/// Metadata key of the leader's URL on a follower's refusal of an agent.
pub const LEADER_URL_KEY: &str = "nembo-leader-url";

pub mod api_info;
pub mod client;
pub mod clock;
pub mod http;
