//! `nembo gpus`: one table of every GPU in the fleet, from the leader's
//! in-memory telemetry (one reading per GPU per heartbeat).

use std::time::Duration;

use anyhow::Result;
use nembo_proto::v1 as pb;
use serde_json::json;

use crate::{connect, table};

/// Prints the fleet once, or live with `watch` (a stream from the
/// coordinator, one update a second).
pub async fn gpus(
    as_json: bool,
    watch: bool,
    node: Option<String>,
    model: Option<String>,
) -> Result<()> {
    let c = connect::client().await?;
    let filter = pb::GpuFilter {
        node_id: node.unwrap_or_default(),
        model: model.unwrap_or_default(),
        job_id: String::new(),
    };
    let show = |gpus: &[pb::GpuMetrics]| -> Result<()> {
        if as_json {
            let gpus: Vec<_> = gpus.iter().map(gpu_json).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({ "gpus": gpus }))?
            );
        } else {
            if watch {
                print!("\x1b[2J\x1b[H"); // clear the terminal, cursor home
            }
            print_table(gpus);
        }
        Ok(())
    };
    if !watch {
        let req = pb::GetFleetMetricsRequest {
            filter: Some(filter),
        };
        let fleet = connect::call(
            &c,
            req,
            |mut c, r| async move { c.get_fleet_metrics(r).await },
        )
        .await?;
        return show(&fleet.gpus);
    }
    // Reopened if it breaks: the member it went through may have died.
    let watch_req = pb::WatchFleetMetricsRequest {
        filter: Some(filter),
        interval: Some(nembo_proto::clock::duration(1000)),
    };
    loop {
        let stream = connect::call(&c, watch_req.clone(), |mut c, r| async move {
            c.watch_fleet_metrics(r).await
        })
        .await;
        if let Ok(mut stream) = stream {
            while let Ok(Some(fleet)) = stream.message().await {
                show(&fleet.gpus)?;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn print_table(gpus: &[pb::GpuMetrics]) {
    if gpus.is_empty() {
        println!("No GPUs reported (nodes report them once NVML is found).");
        return;
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = gpus
        .iter()
        .map(|g| {
            let id = g.identity.clone().unwrap_or_default();
            let t = g.latest.clone().unwrap_or_default();
            let mem = match (t.fb_used_bytes, t.fb_free_bytes) {
                (Some(u), Some(f)) => format!("{:.1}/{:.1} GiB", gib(u), gib(u + f)),
                _ => "-".into(),
            };
            vec![
                g.node_id.clone(),
                format!("{}/{}", g.provider, g.region),
                id.index.to_string(),
                table::simulated(id.model.clone(), g.node_simulated),
                opt(t.gpu_util_percent.map(|u| format!("{u}%"))),
                mem,
                opt(t.temperature_c.map(|c| format!("{c}C"))),
                opt(t.power_mw.map(|p| format!("{:.0}W", f64::from(p) / 1000.0))),
                if g.job_ids.is_empty() {
                    "-".into()
                } else {
                    g.job_ids.join(",")
                },
            ]
        })
        .collect();
    table::print(
        &[
            "NODE", "INFRA", "GPU", "MODEL", "UTIL", "MEMORY", "TEMP", "POWER", "JOBS",
        ],
        &rows,
    );
    if gpus.iter().any(|g| g.node_simulated) {
        println!(
            "\n{}: the node declares simulated GPUs; these readings are of the GPUs NVML \
             finds on the machine under it.",
            table::SIMULATED
        );
    }
}

fn gpu_json(g: &pb::GpuMetrics) -> serde_json::Value {
    let id = g.identity.clone().unwrap_or_default();
    let t = g.latest.clone().unwrap_or_default();
    json!({
        "node_id": g.node_id,
        "provider": g.provider,
        "region": g.region,
        "job_ids": g.job_ids,
        "index": id.index,
        "name": id.name,
        "model": id.model,
        "uuid": id.uuid,
        "pci_bus_id": id.pci_bus_id,
        "driver_version": g.driver_version,
        "node_simulated": g.node_simulated,
        "age_ms": nembo_proto::clock::millis(g.age.as_ref()).unwrap_or(0),
        "sampled_at_unix_ms": nembo_proto::clock::unix_ms(t.sample_time.as_ref()),
        "gpu_util_percent": t.gpu_util_percent,
        "mem_util_percent": t.mem_util_percent,
        "fb_used_bytes": t.fb_used_bytes,
        "fb_free_bytes": t.fb_free_bytes,
        "temperature_c": t.temperature_c,
        "power_w": t.power_mw.map(|p| f64::from(p) / 1000.0),
        "power_limit_w": t.power_limit_mw.map(|p| f64::from(p) / 1000.0),
        "energy_mj": t.energy_mj,
        "sm_clock_mhz": t.sm_clock_mhz,
        "mem_clock_mhz": t.mem_clock_mhz,
        "throttle_reasons": t.throttle_reasons,
        "pcie_rx_kib_s": t.pcie_rx_kib_s,
        "pcie_tx_kib_s": t.pcie_tx_kib_s,
        "ecc_corrected": t.ecc_corrected,
        "ecc_uncorrected": t.ecc_uncorrected,
        "nvlink_rx_bytes_s": t.nvlink_rx_bytes_s,
        "nvlink_tx_bytes_s": t.nvlink_tx_bytes_s,
        "retired_pages_sbe": t.retired_pages_sbe,
        "retired_pages_dbe": t.retired_pages_dbe,
        "retired_pages_pending": t.retired_pages_pending,
        "gr_engine_active": t.gr_engine_active,
        "sm_active": t.sm_active,
        "tensor_active": t.tensor_active,
        "processes": t.processes,
        "gpu_job_ids": t.job_ids,
    })
}
