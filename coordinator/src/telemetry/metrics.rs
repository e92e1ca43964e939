//! Prometheus `/metrics` on each coordinator (plain HTTP, loopback by
//! default). GPU series use dcgm-exporter's names and labels, so existing
//! Grafana dashboards work unchanged, plus Nembo's own labels (node,
//! provider, region, nembo_job); control-plane series describe Raft, jobs, nodes
//! and agent heartbeats. GPU series come from the leader, which holds the
//! agents' sessions: scrape every member.

use std::fmt::Write as _;
use std::sync::Arc;

use nembo_domain::state::{JobState, NodeState};
use nembo_proto::v1 as pb;

use crate::context::Ctx;
use crate::telemetry::fleet::LabelCache;

/// Serves `GET /metrics` (everything) and `GET /metrics/control` (the
/// control plane only: small enough to scrape often however large the
/// fleet; a fleet of 80 000 GPUs makes `/metrics` about a million series)
/// on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, ctx: Arc<Ctx>) {
    let route = |gpus: bool| {
        let ctx = ctx.clone();
        axum::routing::get(move || {
            let ctx = ctx.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(&ctx, gpus).await,
                )
            }
        })
    };
    let app = axum::Router::new()
        .route("/metrics", route(true))
        .route("/metrics/control", route(false));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics listener failed");
    }
}

/// The exposition; GPU series only with `gpus`.
pub async fn render(ctx: &Ctx, gpus: bool) -> String {
    let mut out = String::new();
    let view = ctx.raft.view();
    let fleet = if gpus {
        ctx.fleet.snapshot().await
    } else {
        Vec::new()
    };

    // GPU series, dcgm-exporter style.
    type Field = fn(&pb::GpuTelemetry) -> Option<f64>;
    let fields: [(&str, &str, Field); 24] = [
        ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", |t| {
            t.gpu_util_percent.map(f64::from)
        }),
        (
            "DCGM_FI_DEV_MEM_COPY_UTIL",
            "Memory utilization (in %).",
            |t| t.mem_util_percent.map(f64::from),
        ),
        (
            "DCGM_FI_DEV_FB_USED",
            "Framebuffer memory used (in MiB).",
            |t| t.fb_used_bytes.map(|b| (b >> 20) as f64),
        ),
        (
            "DCGM_FI_DEV_FB_FREE",
            "Framebuffer memory free (in MiB).",
            |t| t.fb_free_bytes.map(|b| (b >> 20) as f64),
        ),
        ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", |t| {
            t.temperature_c.map(f64::from)
        }),
        ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", |t| {
            t.power_mw.map(|p| f64::from(p) / 1000.0)
        }),
        (
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            "Total energy consumption since boot (in mJ).",
            |t| t.energy_mj.map(|e| e as f64),
        ),
        (
            "DCGM_FI_DEV_SM_CLOCK",
            "SM clock frequency (in MHz).",
            |t| t.sm_clock_mhz.map(f64::from),
        ),
        (
            "DCGM_FI_DEV_MEM_CLOCK",
            "Memory clock frequency (in MHz).",
            |t| t.mem_clock_mhz.map(f64::from),
        ),
        (
            "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
            "Current clock throttle reasons (bitmask).",
            |t| t.throttle_reasons.map(|r| r as f64),
        ),
        (
            "DCGM_FI_DEV_XID_ERRORS",
            "Value of the last XID error encountered.",
            |t| Some(t.last_xid.unwrap_or(0) as f64),
        ),
        (
            "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
            "Total number of single-bit volatile ECC errors.",
            |t| t.ecc_corrected.map(|e| e as f64),
        ),
        (
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
            "Total number of double-bit volatile ECC errors.",
            |t| t.ecc_uncorrected.map(|e| e as f64),
        ),
        (
            "DCGM_FI_DEV_POWER_MGMT_LIMIT",
            "Power management limit (in W).",
            |t| t.power_limit_mw.map(|p| f64::from(p) / 1000.0),
        ),
        (
            "DCGM_FI_PROF_PCIE_RX_BYTES",
            "The rate of data received over the PCIe bus (in B/s).",
            |t| t.pcie_rx_kib_s.map(|k| f64::from(k) * 1024.0),
        ),
        (
            "DCGM_FI_PROF_PCIE_TX_BYTES",
            "The rate of data transmitted over the PCIe bus (in B/s).",
            |t| t.pcie_tx_kib_s.map(|k| f64::from(k) * 1024.0),
        ),
        (
            "DCGM_FI_PROF_NVLINK_RX_BYTES",
            "The rate of data received over NVLink, all links (in B/s).",
            |t| t.nvlink_rx_bytes_s.map(|b| b as f64),
        ),
        (
            "DCGM_FI_PROF_NVLINK_TX_BYTES",
            "The rate of data transmitted over NVLink, all links (in B/s).",
            |t| t.nvlink_tx_bytes_s.map(|b| b as f64),
        ),
        (
            "DCGM_FI_DEV_RETIRED_SBE",
            "Total number of retired pages due to single-bit errors.",
            |t| t.retired_pages_sbe.map(f64::from),
        ),
        (
            "DCGM_FI_DEV_RETIRED_DBE",
            "Total number of retired pages due to double-bit errors.",
            |t| t.retired_pages_dbe.map(f64::from),
        ),
        (
            "DCGM_FI_DEV_RETIRED_PENDING",
            "Whether pages are pending retirement (1) or not (0).",
            |t| t.retired_pages_pending.map(|p| f64::from(u8::from(p))),
        ),
        // Profiling fields: boards with GPM (Hopper and newer) only.
        (
            "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
            "Ratio of time the graphics engine is active.",
            |t| t.gr_engine_active,
        ),
        (
            "DCGM_FI_PROF_SM_ACTIVE",
            "The ratio of cycles an SM has at least 1 warp assigned.",
            |t| t.sm_active,
        ),
        (
            "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
            "Ratio of cycles the tensor (HMMA) pipe is active.",
            |t| t.tensor_active,
        ),
    ];
    let mut nodes = LabelCache::default();
    let labelled: Vec<(String, &pb::GpuTelemetry)> = fleet
        .iter()
        .filter_map(|(node, g)| {
            let t = g.latest.as_ref()?;
            let n = nodes.get(&view.state, node);
            // The jobs using this GPU when the agent could tell (by
            // process); else every job with a rank on the node.
            let jobs = if t.job_ids.is_empty() {
                &n.jobs
            } else {
                &t.job_ids
            };
            let id = &g.identity;
            let labels = [
                ("gpu", id.index.to_string()),
                ("UUID", id.uuid.clone()),
                ("pci_bus_id", id.pci_bus_id.clone()),
                ("device", format!("nvidia{}", id.index)),
                ("modelName", id.name.clone()),
                ("Hostname", node.clone()),
                ("node", node.clone()),
                ("provider", n.provider.clone()),
                ("region", n.region.clone()),
                ("DCGM_FI_DRIVER_VERSION", g.driver_version.clone()),
                // Not `job`: Prometheus sets that to the scrape job and would
                // rename ours to `exported_job`.
                ("nembo_job", jobs.join(",")),
            ];
            Some((label_set(&labels), t))
        })
        .collect();
    for (name, help, field) in fields {
        let values: Vec<(&String, f64)> = labelled
            .iter()
            .filter_map(|(l, t)| field(t).map(|v| (l, v)))
            .collect();
        if values.is_empty() {
            continue;
        }
        header(&mut out, name, help, "gauge");
        for (labels, v) in values {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    }

    // Control plane.
    let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
        header(out, name, help, "gauge");
        let _ = writeln!(out, "{name} {v}");
    };
    gauge(
        &mut out,
        "nembo_raft_term",
        "Current Raft term.",
        view.term as f64,
    );
    gauge(
        &mut out,
        "nembo_raft_commit_index",
        "Highest committed Raft index.",
        view.commit as f64,
    );
    gauge(
        &mut out,
        "nembo_raft_applied_index",
        "Highest applied Raft index.",
        view.applied as f64,
    );
    gauge(
        &mut out,
        "nembo_raft_is_leader",
        "1 if this member leads.",
        f64::from(u8::from(view.is_leader())),
    );
    gauge(
        &mut out,
        "nembo_raft_leader_id",
        "Member id of the current leader (0: none known).",
        view.leader_id as f64,
    );
    header(&mut out, "nembo_jobs", "Jobs by state.", "gauge");
    for (state, n) in count_by(view.state.jobs.values().map(|j| job_state(j.state))) {
        let _ = writeln!(out, "nembo_jobs{{state=\"{state}\"}} {n}");
    }
    header(&mut out, "nembo_nodes", "Nodes by state.", "gauge");
    for (state, n) in count_by(view.state.nodes.values().map(|n| node_state(n.state))) {
        let _ = writeln!(out, "nembo_nodes{{state=\"{state}\"}} {n}");
    }
    gauge(
        &mut out,
        "nembo_nodes_unhealthy",
        "Nodes a GPU made unhealthy (they take no new work).",
        view.state
            .nodes
            .values()
            .filter(|n| n.unhealthy.is_some() && !n.state.is_final())
            .count() as f64,
    );
    if gpus {
        gauge(
            &mut out,
            "nembo_fleet_gpus",
            "GPUs reporting telemetry to this member.",
            fleet.len() as f64,
        );
    }
    ctx.heartbeat_delay.render(&mut out);
    raft_engine_series(&mut out);
    out
}

/// raft-engine's own series (write and sync latencies, log sizes, ...),
/// which it registers in the process's default Prometheus registry.
fn raft_engine_series(out: &mut String) {
    use prometheus::Encoder as _;
    let mut text = Vec::new();
    if prometheus::TextEncoder::new()
        .encode(&prometheus::gather(), &mut text)
        .is_ok()
    {
        out.push_str(&String::from_utf8_lossy(&text));
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn label_set(labels: &[(&str, String)]) -> String {
    let body: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", body.join(","))
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn count_by(
    items: impl Iterator<Item = &'static str>,
) -> std::collections::BTreeMap<&'static str, u64> {
    let mut m = std::collections::BTreeMap::new();
    for i in items {
        *m.entry(i).or_insert(0) += 1;
    }
    m
}

fn job_state(s: JobState) -> &'static str {
    match s {
        JobState::Pending => "pending",
        JobState::Provisioning => "provisioning",
        JobState::Starting => "starting",
        JobState::Running => "running",
        JobState::Recovering => "recovering",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::FailedSetup => "failed_setup",
        JobState::Cancelled => "cancelled",
    }
}

fn node_state(s: NodeState) -> &'static str {
    match s {
        NodeState::Provisioning => "provisioning",
        NodeState::Ready => "ready",
        NodeState::Lost => "lost",
        NodeState::Terminating => "terminating",
        NodeState::Terminated => "terminated",
        NodeState::Failed => "failed",
        NodeState::Stopping => "stopping",
        NodeState::Stopped => "stopped",
        NodeState::Starting => "starting",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(
            label_set(&[("gpu", "0".into()), ("modelName", "X \"Y\"".into())]),
            r#"{gpu="0",modelName="X \"Y\""}"#
        );
    }
}
