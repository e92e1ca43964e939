//! `api.json`: what a client needs to reach a coordinator. The coordinator
//! writes it into its data dir; the CLI reads it (or builds one from the
//! environment, or for a local cluster).

use serde::{Deserialize, Serialize};

/// Where the API is and how to trust and authenticate to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiInfo {
    /// `https://host:port`.
    pub endpoint: String,
    /// CA certificate (PEM) to trust.
    pub ca_cert_path: String,
    /// Bearer token file (0600).
    pub token_path: String,
    /// The coordinator's process id (local coordinators only).
    #[serde(default)]
    pub pid: u32,
    /// Every member's URL, for a cluster; calls go to any that answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Every member's process id, for a local cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<u32>,
    /// Prometheus endpoint (`http://host:port/metrics`) of the (first) member.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub metrics_url: String,
    /// Every member's Prometheus endpoint, for a cluster (scrape them all:
    /// GPU series come from the leader).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics_urls: Vec<String>,
}
