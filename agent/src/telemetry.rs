//! The GPU sampler: one OS thread owns NVML (its calls take a driver-wide
//! lock and may block), reads every GPU each interval, and publishes the
//! newest readings for the session to put on its next heartbeat.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nembo_proto::v1 as pb;
use tokio::sync::watch;

use crate::gpu::{GpuSample, Gpus};
use nembo_proto::clock::now_ms;

/// Full sweeps (PCIe, processes, GPM) happen once per this many samples.
/// GPM's profiling metrics are means over the time between two full
/// sweeps (10 s at 1 Hz): the intervals join up, so nothing is missed, and
/// the cadence is still finer than dcgm-exporter's default 30 s collection.
const SLOW_EVERY: u32 = 10;

/// What the session reports about the node's GPUs.
#[derive(Clone, Debug)]
pub struct Telemetry {
    /// Identity of every GPU, sent once in the hello.
    pub gpus: Vec<pb::GpuIdentity>,
    pub driver_version: String,
    /// CUDA version the driver supports.
    pub cuda_version: String,
    /// The newest sample of every GPU.
    pub latest: watch::Receiver<Arc<Vec<pb::GpuTelemetry>>>,
    /// Changes when something must be reported at once (an XID): the
    /// session then sends a heartbeat without waiting for its period.
    pub urgent: watch::Receiver<u64>,
}

impl Telemetry {
    /// No GPUs: nothing to report.
    pub fn none() -> Telemetry {
        Telemetry {
            gpus: Vec::new(),
            driver_version: String::new(),
            cuda_version: String::new(),
            latest: watch::channel(Arc::new(Vec::new())).1,
            urgent: watch::channel(0).1,
        }
    }
}

/// Per GPU index: (last critical XID, XIDs seen since the agent started).
type Xids = Arc<Mutex<BTreeMap<u32, (u64, u64)>>>;
type Readings = Arc<watch::Sender<Arc<Vec<pb::GpuTelemetry>>>>;

/// Starts sampling `gpus` every `interval` on a thread of its own, and
/// watching for XIDs on another (NVML's event wait blocks).
pub fn start(gpus: Gpus, interval: Duration, work_dir: PathBuf) -> Telemetry {
    let gpus = Arc::new(gpus);
    let identity = gpus
        .inventory()
        .into_iter()
        .map(|g| pb::GpuIdentity {
            index: g.index,
            name: g.name,
            model: g.model,
            uuid: g.uuid.unwrap_or_default(),
            pci_bus_id: g.pci_bus_id.unwrap_or_default(),
            memory_total_bytes: g.memory_total_bytes.unwrap_or(0),
            mig_enabled: g.mig_mode == Some(1),
        })
        .collect();
    let driver_version = gpus.driver_version().unwrap_or_default();
    let cuda_version = gpus.cuda_version().unwrap_or_default();
    let (tx, rx) = watch::channel(Arc::new(Vec::new()));
    let tx: Readings = Arc::new(tx);
    let (urgent_tx, urgent) = watch::channel(0u64);
    let xids: Xids = Arc::default();
    let (g, t, x) = (gpus.clone(), tx.clone(), xids.clone());
    let sampler = std::thread::Builder::new()
        .name("gpu-sampler".into())
        .spawn(move || sample_loop(&g, interval, &t, &x, &work_dir));
    let watcher = std::thread::Builder::new()
        .name("gpu-xids".into())
        .spawn(move || {
            gpus.watch_xids(|index, xid| {
                tracing::warn!(gpu = index, xid, "GPU reported a critical XID");
                let count = {
                    let mut all = xids.lock().unwrap_or_else(|p| p.into_inner());
                    let e = all.entry(index).or_insert((0, 0));
                    *e = (xid, e.1 + 1);
                    e.1
                };
                tx.send_modify(|readings| {
                    let mut now = readings.as_ref().clone();
                    for r in now.iter_mut().filter(|r| r.index == index) {
                        r.last_xid = Some(xid);
                        r.xid_count = count;
                    }
                    *readings = Arc::new(now);
                });
                urgent_tx.send_modify(|n| *n += 1);
                !urgent_tx.is_closed()
            })
        });
    if let Err(e) = sampler.and(watcher) {
        tracing::warn!(error = %e, "could not start GPU telemetry threads");
    }
    Telemetry {
        gpus: identity,
        driver_version,
        cuda_version,
        latest: rx,
        urgent,
    }
}

fn sample_loop(gpus: &Gpus, interval: Duration, tx: &Readings, xids: &Xids, work_dir: &Path) {
    let mut slow_values: Vec<GpuSample> = Vec::new();
    let mut nvlink = NvlinkRates::default();
    let mut jobs_by_gpu: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let mut gpm = gpus.gpm();
    if !gpm.gpus().is_empty() {
        tracing::info!(gpus = ?gpm.gpus(), "GPM profiling metrics every {SLOW_EVERY} samples");
    }
    for sweep in 0u32.. {
        let started = std::time::Instant::now();
        let slow = sweep % SLOW_EVERY == 0;
        let mut samples = gpus.sample_some(slow);
        if slow {
            gpm.update(&mut samples);
            slow_values = samples.clone();
            let groups = job_process_groups(work_dir);
            jobs_by_gpu = samples
                .iter()
                .map(|s| (s.index, jobs_of(&s.process_pids, &groups)))
                .collect();
        } else {
            // Between full sweeps, carry the slow metrics forward.
            for (s, old) in samples.iter_mut().zip(&slow_values) {
                s.pcie_rx_kib_s = old.pcie_rx_kib_s;
                s.pcie_tx_kib_s = old.pcie_tx_kib_s;
                s.processes = old.processes;
                s.retired_pages_sbe = old.retired_pages_sbe;
                s.retired_pages_dbe = old.retired_pages_dbe;
                s.retired_pages_pending = old.retired_pages_pending;
                s.gr_engine_active = old.gr_engine_active;
                s.sm_active = old.sm_active;
                s.tensor_active = old.tensor_active;
            }
        }
        let at = now_ms();
        let mut readings: Vec<pb::GpuTelemetry> = samples.iter().map(|s| to_proto(s, at)).collect();
        for (r, s) in readings.iter_mut().zip(&samples) {
            (r.nvlink_rx_bytes_s, r.nvlink_tx_bytes_s) = nvlink.update(s, started);
        }
        for r in &mut readings {
            r.job_ids = jobs_by_gpu.get(&r.index).cloned().unwrap_or_default();
            if let Some((last, count)) =
                xids.lock().unwrap_or_else(|p| p.into_inner()).get(&r.index)
            {
                r.last_xid = Some(*last);
                r.xid_count = *count;
            }
        }
        if tx.send(Arc::new(readings)).is_err() {
            return; // the agent is gone
        }
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
}

/// NVML gives NVLink traffic as counters; the fleet wants rates. Keeps each
/// GPU's previous counters to turn them into bytes per second.
#[derive(Default)]
struct NvlinkRates {
    last: BTreeMap<u32, (std::time::Instant, u64, u64)>,
}

impl NvlinkRates {
    fn update(&mut self, s: &GpuSample, at: std::time::Instant) -> (Option<u64>, Option<u64>) {
        let (Some(rx), Some(tx)) = (s.nvlink_rx_kib, s.nvlink_tx_kib) else {
            self.last.remove(&s.index);
            return (None, None);
        };
        let Some((then, rx0, tx0)) = self.last.insert(s.index, (at, rx, tx)) else {
            return (None, None); // a rate needs two readings
        };
        let secs = at.duration_since(then).as_secs_f64();
        if secs <= 0.0 {
            return (None, None);
        }
        // A counter that went backwards was reset (driver reload): no rate this time.
        let rate = |now: u64, before: u64| {
            now.checked_sub(before)
                .map(|kib| (kib as f64 * 1024.0 / secs).round() as u64)
        };
        (rate(rx, rx0), rate(tx, tx0))
    }
}

fn to_proto(s: &GpuSample, at: i64) -> pb::GpuTelemetry {
    let mw = |w: Option<f64>| w.map(|w| (w * 1000.0).round() as u32);
    pb::GpuTelemetry {
        index: s.index,
        sample_time: nembo_proto::clock::timestamp(at),
        gpu_util_percent: s.gpu_util_percent,
        mem_util_percent: s.mem_util_percent,
        fb_used_bytes: s.fb_used_bytes,
        fb_free_bytes: s.fb_free_bytes,
        temperature_c: s.temperature_c,
        power_mw: mw(s.power_w),
        power_limit_mw: mw(s.power_limit_w),
        energy_mj: s.energy_mj,
        sm_clock_mhz: s.sm_clock_mhz,
        mem_clock_mhz: s.mem_clock_mhz,
        throttle_reasons: s.throttle_reasons,
        pcie_rx_kib_s: s.pcie_rx_kib_s,
        pcie_tx_kib_s: s.pcie_tx_kib_s,
        ecc_corrected: s.ecc_corrected,
        ecc_uncorrected: s.ecc_uncorrected,
        processes: s.processes,
        last_xid: None,
        xid_count: 0,
        lost: s.lost,
        job_ids: Vec::new(),
        nvlink_rx_bytes_s: None,
        nvlink_tx_bytes_s: None,
        retired_pages_sbe: s.retired_pages_sbe,
        retired_pages_dbe: s.retired_pages_dbe,
        retired_pages_pending: s.retired_pages_pending,
        gr_engine_active: s.gr_engine_active,
        sm_active: s.sm_active,
        tensor_active: s.tensor_active,
    }
}

/// Process group -> job id, from the job dirs (`jobs/<job>-<attempt>/pid`
/// holds the group the supervisor started the job in).
fn job_process_groups(work_dir: &Path) -> BTreeMap<u32, String> {
    let Ok(dirs) = std::fs::read_dir(work_dir.join("jobs")) else {
        return BTreeMap::new();
    };
    dirs.flatten()
        .filter_map(|d| {
            let name = d.file_name().to_string_lossy().into_owned();
            let job = name.rsplit_once('-')?.0.to_string();
            let pgid = std::fs::read_to_string(d.path().join("pid")).ok()?;
            Some((pgid.trim().parse().ok()?, job))
        })
        .collect()
}

/// The jobs whose process groups hold any of `pids`, sorted, once each.
fn jobs_of(pids: &[u32], groups: &BTreeMap<u32, String>) -> Vec<String> {
    let mut jobs: Vec<String> = pids
        .iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After the parenthesised name: state, ppid, pgrp.
            let pgrp: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(2)?
                .parse()
                .ok()?;
            groups.get(&pgrp).cloned()
        })
        .collect();
    jobs.sort();
    jobs.dedup();
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvlink_counters_become_byte_rates() {
        let mut rates = NvlinkRates::default();
        let t0 = std::time::Instant::now();
        let sample = |rx, tx| GpuSample {
            index: 1,
            nvlink_rx_kib: Some(rx),
            nvlink_tx_kib: Some(tx),
            ..Default::default()
        };
        assert_eq!(rates.update(&sample(100, 100), t0), (None, None));
        let t1 = t0 + Duration::from_millis(500);
        // 1024 KiB received and 512 KiB sent in half a second.
        assert_eq!(
            rates.update(&sample(1124, 612), t1),
            (Some(2 * 1024 * 1024), Some(1024 * 1024))
        );
        // A reset counter gives no rate rather than a huge one.
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(rates.update(&sample(5, 700), t2), (None, Some(88 * 1024)));
        // A board without NVLink has none.
        let none = GpuSample {
            index: 1,
            ..Default::default()
        };
        assert_eq!(rates.update(&none, t2), (None, None));
    }
}
