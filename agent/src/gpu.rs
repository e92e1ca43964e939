//! GPUs through NVML, loaded at run time (`libnvidia-ml.so.1`), so the agent
//! runs on machines without NVIDIA libraries and reports zero GPUs there.
//!
//! Every metric is optional: a board that does not support one (MIG, older
//! parts) simply lacks it. NVML calls take a driver-wide lock, so callers
//! should sample from a blocking thread, not from the async runtime.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, PcieUtilCounter, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::gpm::gpm_metrics_get;
use nvml_wrapper::{GpmSample, Nvml};
use nvml_wrapper_sys::bindings::{field_id, nvmlFieldValue_t, NvmlLib};
use serde::Serialize;

/// What does not change while the node runs.
#[derive(Debug, Clone, Serialize)]
pub struct GpuInfo {
    /// NVML index.
    pub index: u32,
    /// Board name as NVML reports it (`NVIDIA H200`).
    pub name: String,
    /// The scheduler's name for it (`H200`).
    pub model: String,
    /// `GPU-…`.
    pub uuid: Option<String>,
    pub pci_bus_id: Option<String>,
    /// Framebuffer size.
    pub memory_total_bytes: Option<u64>,
    /// MIG mode (1 = enabled), where supported.
    pub mig_mode: Option<u32>,
}

/// One reading of one GPU.
#[derive(Debug, Clone, Serialize, Default)]
pub struct GpuSample {
    /// NVML index.
    pub index: u32,
    /// Percent of time a kernel ran.
    pub gpu_util_percent: Option<u32>,
    /// Percent of time memory was read or written.
    pub mem_util_percent: Option<u32>,
    /// Framebuffer in use.
    pub fb_used_bytes: Option<u64>,
    /// Framebuffer free.
    pub fb_free_bytes: Option<u64>,
    /// Framebuffer size.
    pub fb_total_bytes: Option<u64>,
    /// Core temperature.
    pub temperature_c: Option<u32>,
    /// Power draw.
    pub power_w: Option<f64>,
    /// Enforced power limit.
    pub power_limit_w: Option<f64>,
    /// Energy since the driver loaded.
    pub energy_mj: Option<u64>,
    /// SM clock.
    pub sm_clock_mhz: Option<u32>,
    /// Memory clock.
    pub mem_clock_mhz: Option<u32>,
    /// NVML throttle-reason bits.
    pub throttle_reasons: Option<u64>,
    /// PCIe receive.
    pub pcie_rx_kib_s: Option<u32>,
    /// PCIe transmit.
    pub pcie_tx_kib_s: Option<u32>,
    /// Corrected ECC errors since the driver loaded.
    pub ecc_corrected: Option<u64>,
    /// Uncorrected ECC errors since the driver loaded.
    pub ecc_uncorrected: Option<u64>,
    /// NVLink data received, KiB since the driver loaded, all links.
    pub nvlink_rx_kib: Option<u64>,
    /// NVLink data sent, likewise.
    pub nvlink_tx_kib: Option<u64>,
    /// Pages retired after repeated single-bit ECC errors.
    pub retired_pages_sbe: Option<u32>,
    /// Pages retired after a double-bit ECC error.
    pub retired_pages_dbe: Option<u32>,
    /// Pages waiting for a GPU reset to retire.
    pub retired_pages_pending: Option<bool>,
    /// Compute processes on it.
    pub processes: Option<u32>,
    /// Their process ids.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub process_pids: Vec<u32>,
    /// Fraction of time the graphics/compute engine was active over the
    /// last GPM interval, 0..1 (DCGM_FI_PROF_GR_ENGINE_ACTIVE); GPM boards.
    pub gr_engine_active: Option<f64>,
    /// Fraction of time an SM had at least one warp assigned, averaged
    /// over the SMs (DCGM_FI_PROF_SM_ACTIVE), likewise.
    pub sm_active: Option<f64>,
    /// Fraction of time the tensor pipes were active
    /// (DCGM_FI_PROF_PIPE_TENSOR_ACTIVE), likewise.
    pub tensor_active: Option<f64>,
    /// The GPU has fallen off the bus (NVML answers GPU_IS_LOST).
    pub lost: bool,
}

/// An open NVML.
pub struct Gpus {
    nvml: Nvml,
    /// The same library, for the one call nvml-wrapper cannot make: field
    /// values scoped to all NVLinks at once (it always asks for link 0).
    raw: Option<NvmlLib>,
}

/// Where NVML is looked for when no path is given.
const DEFAULT_LIBS: &[&str] = &["libnvidia-ml.so.1", "libnvidia-ml.so"];

impl Gpus {
    /// Loads NVML from `lib` (else the usual names). The error says why
    /// there are no GPUs; it is not a failure of the agent.
    pub fn open(lib: Option<&Path>) -> Result<Gpus, String> {
        let candidates: Vec<&OsStr> = match lib {
            Some(p) => vec![p.as_os_str()],
            None => DEFAULT_LIBS.iter().map(OsStr::new).collect(),
        };
        let mut last = String::new();
        for path in candidates {
            match Nvml::builder().lib_path(path).init() {
                // SAFETY: loading the library NVML already loaded only
                // resolves its symbols; nothing runs at load time.
                Ok(nvml) => {
                    #[allow(unsafe_code)]
                    let raw = unsafe { NvmlLib::new(path) }.ok();
                    return Ok(Gpus { nvml, raw });
                }
                Err(e) => last = format!("{}: {e}", path.to_string_lossy()),
            }
        }
        Err(last)
    }

    /// Driver version string.
    pub fn driver_version(&self) -> Option<String> {
        self.nvml.sys_driver_version().ok()
    }

    /// CUDA version the driver supports, as `13.0`.
    pub fn cuda_version(&self) -> Option<String> {
        self.nvml.sys_cuda_driver_version().ok().map(|v| {
            format!(
                "{}.{}",
                nvml_wrapper::cuda_driver_version_major(v),
                nvml_wrapper::cuda_driver_version_minor(v)
            )
        })
    }

    /// Identity of every GPU.
    pub fn inventory(&self) -> Vec<GpuInfo> {
        let n = self.nvml.device_count().unwrap_or(0);
        (0..n)
            .filter_map(|i| {
                let d = self.nvml.device_by_index(i).ok()?;
                let name = d.name().unwrap_or_default();
                Some(GpuInfo {
                    index: i,
                    model: canonical_model(&name),
                    name,
                    uuid: d.uuid().ok(),
                    pci_bus_id: d.pci_info().ok().map(|p| p.bus_id),
                    memory_total_bytes: d.memory_info().ok().map(|m| m.total),
                    mig_mode: d.mig_mode().ok().map(|m| m.current),
                })
            })
            .collect()
    }

    /// One reading of every GPU, every metric.
    pub fn sample(&self) -> Vec<GpuSample> {
        self.sample_some(true)
    }

    /// One reading of every GPU. Without `slow`, the metrics that cost
    /// milliseconds (PCIe throughput samples a ~20 ms window per direction;
    /// the process list walks the driver's tables) are left out.
    pub fn sample_some(&self, slow: bool) -> Vec<GpuSample> {
        let n = self.nvml.device_count().unwrap_or(0);
        (0..n)
            .filter_map(|i| {
                let d = match self.nvml.device_by_index(i) {
                    Ok(d) => d,
                    Err(NvmlError::GpuLost) => {
                        return Some(GpuSample {
                            index: i,
                            lost: true,
                            ..Default::default()
                        })
                    }
                    Err(_) => return None,
                };
                let procs = slow.then(|| d.running_compute_processes().ok()).flatten();
                let (nvlink_rx_kib, nvlink_tx_kib) = self.nvlink_kib(&d);
                let retired = |cause| {
                    slow.then(|| d.retired_pages(cause).ok().map(|p| p.len() as u32))
                        .flatten()
                };
                let util = d.utilization_rates();
                let lost = matches!(util, Err(NvmlError::GpuLost));
                let util = util.ok();
                let mem = d.memory_info().ok();
                Some(GpuSample {
                    index: i,
                    lost,
                    gpu_util_percent: util.as_ref().map(|u| u.gpu),
                    mem_util_percent: util.as_ref().map(|u| u.memory),
                    fb_used_bytes: mem.as_ref().map(|m| m.used),
                    fb_free_bytes: mem.as_ref().map(|m| m.free),
                    fb_total_bytes: mem.as_ref().map(|m| m.total),
                    temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
                    power_w: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
                    power_limit_w: d
                        .enforced_power_limit()
                        .ok()
                        .map(|mw| f64::from(mw) / 1000.0),
                    energy_mj: d.total_energy_consumption().ok(),
                    sm_clock_mhz: d.clock_info(Clock::SM).ok(),
                    mem_clock_mhz: d.clock_info(Clock::Memory).ok(),
                    throttle_reasons: d.current_throttle_reasons().ok().map(|r| r.bits()),
                    pcie_rx_kib_s: slow
                        .then(|| d.pcie_throughput(PcieUtilCounter::Receive).ok())
                        .flatten(),
                    pcie_tx_kib_s: slow
                        .then(|| d.pcie_throughput(PcieUtilCounter::Send).ok())
                        .flatten(),
                    ecc_corrected: d
                        .total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
                        .ok(),
                    ecc_uncorrected: d
                        .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                        .ok(),
                    nvlink_rx_kib,
                    nvlink_tx_kib,
                    retired_pages_sbe: retired(RetirementCause::MultipleSingleBitEccErrors),
                    retired_pages_dbe: retired(RetirementCause::DoubleBitEccError),
                    retired_pages_pending: slow
                        .then(|| d.are_pages_pending_retired().ok())
                        .flatten(),
                    processes: procs.as_ref().map(|p| p.len() as u32),
                    process_pids: procs
                        .map(|p| p.iter().map(|p| p.pid).collect())
                        .unwrap_or_default(),
                    // Means over an interval: `Gpm::update` sets them.
                    gr_engine_active: None,
                    sm_active: None,
                    tensor_active: None,
                })
            })
            .collect()
    }

    /// NVLink data counters (rx, tx) summed over every link, where the
    /// board has NVLink. One driver call for both.
    #[allow(unsafe_code)]
    fn nvlink_kib(&self, d: &nvml_wrapper::Device<'_>) -> (Option<u64>, Option<u64>) {
        let Some(get) = self
            .raw
            .as_ref()
            .and_then(|l| l.nvmlDeviceGetFieldValues.as_ref().ok())
        else {
            return (None, None);
        };
        // SAFETY: an all-zero nvmlFieldValue_t is a valid value (plain
        // integers and a union of numbers).
        let mut fields: [nvmlFieldValue_t; 2] = unsafe { std::mem::zeroed() };
        fields[0].fieldId = field_id::NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX;
        fields[1].fieldId = field_id::NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX;
        for f in &mut fields {
            f.scopeId = u32::MAX; // every link
        }
        // SAFETY: the handle belongs to this library and outlives the call;
        // the array holds exactly the count passed.
        let status = unsafe { get(d.handle(), fields.len() as i32, fields.as_mut_ptr()) };
        if status != 0 {
            return (None, None);
        }
        // SAFETY: valueType says which union member the driver wrote.
        let value = |f: &nvmlFieldValue_t| {
            (f.nvmlReturn == 0).then(|| unsafe {
                match f.valueType {
                    1 => u64::from(f.value.uiVal),
                    2 => f.value.ulVal,
                    3 => f.value.ullVal,
                    _ => u64::MAX,
                }
            })
        };
        let pick = |f| value(f).filter(|v| *v != u64::MAX);
        (pick(&fields[0]), pick(&fields[1]))
    }

    /// GPM sampling state for the GPUs that support it (asked once, here).
    pub fn gpm(&self) -> Gpm<'_> {
        let last = (0..self.nvml.device_count().unwrap_or(0))
            .filter(|&i| {
                self.nvml
                    .device_by_index(i)
                    .and_then(|d| d.gpm_support())
                    .unwrap_or(false)
            })
            .map(|i| (i, None))
            .collect();
        Gpm {
            nvml: &self.nvml,
            last,
        }
    }

    /// Blocks, calling `on_xid(gpu index, xid)` for every critical XID the
    /// driver reports, until it returns false. Returns at once when no GPU
    /// supports events.
    pub fn watch_xids(&self, mut on_xid: impl FnMut(u32, u64) -> bool) {
        let Ok(mut set) = self.nvml.create_event_set() else {
            return;
        };
        let mut registered = 0;
        for i in 0..self.nvml.device_count().unwrap_or(0) {
            let Ok(d) = self.nvml.device_by_index(i) else {
                continue;
            };
            let supported = d
                .supported_event_types()
                .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
            if !supported {
                continue;
            }
            // A failed registration consumes the set: stop there rather
            // than watch a set in an undefined state.
            match d.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(s) => {
                    set = s;
                    registered += 1;
                }
                Err(e) => {
                    tracing::warn!(gpu = i, error = %e.error, "cannot watch XIDs");
                    return;
                }
            }
        }
        if registered == 0 {
            return;
        }
        loop {
            match set.wait(1000) {
                Ok(ev) => {
                    let index = ev.device.index().unwrap_or(u32::MAX);
                    let xid = match ev.event_data {
                        Some(nvml_wrapper::enums::event::XidError::Value(v)) => v,
                        _ => 0,
                    };
                    if !on_xid(index, xid) {
                        return;
                    }
                }
                Err(NvmlError::Timeout) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "XID event wait failed; XIDs are no longer watched");
                    return;
                }
            }
        }
    }

    /// Accelerators to declare: scheduler model name -> count.
    pub fn accelerators(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for g in self.inventory() {
            *out.entry(g.model).or_insert(0.0) += 1.0;
        }
        out
    }
}

/// The GPM metrics read, in the order `Gpm::update` stores them.
const GPM_METRICS: [GpmMetricId; 3] = [
    GpmMetricId::GraphicsUtil,
    GpmMetricId::SmUtil,
    GpmMetricId::AnyTensorUtil,
];

/// GPM (GPU Performance Monitoring; Hopper and newer): DCGM's profiling
/// fields, which NVML computes as means over the interval between two
/// samples of a GPU. Each `update` closes the interval the previous one
/// opened and opens the next, so the intervals follow one another without
/// a gap: a slow cadence costs time resolution, never coverage. One sample
/// per GPM GPU is held between updates; boards without GPM hold nothing
/// and cost nothing.
pub struct Gpm<'a> {
    nvml: &'a Nvml,
    /// GPU index -> its newest sample, for every GPU that supports GPM.
    last: BTreeMap<u32, Option<GpmSample<'a>>>,
}

impl Gpm<'_> {
    /// The GPUs that support GPM.
    pub fn gpus(&self) -> Vec<u32> {
        self.last.keys().copied().collect()
    }

    /// Samples every GPM GPU among `samples` and sets their profiling
    /// metrics to the means since the previous update. None on the first
    /// update, or when either sample failed (a failure is not reported: the
    /// metric is simply absent, and the next update starts afresh).
    pub fn update(&mut self, samples: &mut [GpuSample]) {
        for s in samples {
            let Some(last) = self.last.get_mut(&s.index) else {
                continue;
            };
            let now = self
                .nvml
                .device_by_index(s.index)
                .and_then(|d| d.gpm_sample())
                .ok();
            let means = match (last.as_ref(), now.as_ref()) {
                (Some(before), Some(now)) => {
                    gpm_metrics_get(self.nvml, before, now, &GPM_METRICS).ok()
                }
                _ => None,
            };
            // The older sample is freed here; the newer opens the next interval.
            *last = now;
            let Some(means) = means else {
                continue;
            };
            let ratio = |i: usize| {
                means
                    .get(i)?
                    .as_ref()
                    .ok()
                    .and_then(|m| percent_to_ratio(m.value))
            };
            s.gr_engine_active = ratio(0);
            s.sm_active = ratio(1);
            s.tensor_active = ratio(2);
        }
    }
}

/// NVML's GPM utilisations are percentages (0..100); DCGM's profiling
/// fields, and so dashboards built on them, are ratios (0..1). Rounding can
/// take a percentage a hair past its bounds: clamped. Not a number: none.
pub fn percent_to_ratio(percent: f64) -> Option<f64> {
    percent
        .is_finite()
        .then(|| (percent / 100.0).clamp(0.0, 1.0))
}

/// What `nembo-agent --probe-gpus` prints.
#[derive(Debug, Serialize)]
pub struct Probe {
    /// Why NVML did not load, if it did not.
    pub nvml_error: Option<String>,
    pub driver_version: Option<String>,
    /// CUDA version the driver supports.
    pub cuda_version: Option<String>,
    /// Identity.
    pub gpus: Vec<GpuInfo>,
    /// One reading.
    pub samples: Vec<GpuSample>,
    /// What one full sweep (every metric of every GPU) took, in µs; median of 20.
    pub sweep_us: Option<u64>,
    /// What one GPM update (a sample and the metrics of every GPM GPU)
    /// took, in µs; absent without GPM GPUs.
    pub gpm_us: Option<u64>,
}

/// What `nembo-agent --inventory` prints: the GPUs, without readings
/// (quick enough for a coordinator to ask at startup).
#[derive(Debug, Serialize)]
pub struct Inventory {
    /// Why NVML did not load, if it did not.
    pub nvml_error: Option<String>,
    pub driver_version: Option<String>,
    pub gpus: Vec<GpuInfo>,
}

/// Loads NVML and lists the GPUs.
pub fn inventory(lib: Option<&Path>) -> Inventory {
    match Gpus::open(lib) {
        Err(e) => Inventory {
            nvml_error: Some(e),
            driver_version: None,
            gpus: Vec::new(),
        },
        Ok(g) => Inventory {
            nvml_error: None,
            driver_version: g.driver_version(),
            gpus: g.inventory(),
        },
    }
}

/// Loads NVML and takes one inventory and one sample.
pub fn probe(lib: Option<&Path>) -> Probe {
    match Gpus::open(lib) {
        Err(e) => Probe {
            nvml_error: Some(e),
            driver_version: None,
            cuda_version: None,
            gpus: Vec::new(),
            samples: Vec::new(),
            sweep_us: None,
            gpm_us: None,
        },
        Ok(g) => {
            // GPM metrics are means over an interval: open it before the
            // sweeps, close it after them (and at least 100 ms later).
            let mut gpm = g.gpm();
            let opened = Instant::now();
            gpm.update(&mut g.sample_some(false));
            let mut sweeps: Vec<u64> = (0..20)
                .map(|_| {
                    let t = Instant::now();
                    let _ = g.sample();
                    t.elapsed().as_micros() as u64
                })
                .collect();
            sweeps.sort_unstable();
            let mut samples = g.sample();
            std::thread::sleep(Duration::from_millis(100).saturating_sub(opened.elapsed()));
            let t = Instant::now();
            gpm.update(&mut samples);
            let gpm_us = (!gpm.gpus().is_empty()).then(|| t.elapsed().as_micros() as u64);
            Probe {
                nvml_error: None,
                driver_version: g.driver_version(),
                cuda_version: g.cuda_version(),
                gpus: g.inventory(),
                samples,
                sweep_us: sweeps.get(sweeps.len() / 2).copied(),
                gpm_us,
            }
        }
    }
}

/// The scheduler's name for an NVML board name: `NVIDIA H100 80GB HBM3` ->
/// `H100`, `NVIDIA A100-SXM4-80GB` -> `A100-80GB`, `Tesla T4` -> `T4`.
pub fn canonical_model(name: &str) -> String {
    const KNOWN: &[&str] = &[
        "GB200", "B200", "H200", "H100", "A100", "L40S", "L40", "L4", "A10G", "A10", "T4", "V100",
        "MI300X", "RTX4090", "RTX6000",
    ];
    let upper = name.to_ascii_uppercase();
    let tokens: Vec<&str> = upper
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .collect();
    for k in KNOWN {
        if tokens.contains(k) {
            if *k == "A100" && tokens.contains(&"80GB") {
                return "A100-80GB".into();
            }
            if *k == "V100" && tokens.contains(&"32GB") {
                return "V100-32GB".into();
            }
            return k.to_string();
        }
    }
    tokens
        .into_iter()
        .filter(|t| *t != "NVIDIA" && *t != "TESLA" && *t != "GEFORCE")
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_names_map_to_scheduler_names() {
        assert_eq!(canonical_model("NVIDIA H100 80GB HBM3"), "H100");
        assert_eq!(canonical_model("NVIDIA H200"), "H200");
        assert_eq!(canonical_model("NVIDIA A100-SXM4-80GB"), "A100-80GB");
        assert_eq!(canonical_model("NVIDIA A100-SXM4-40GB"), "A100");
        assert_eq!(canonical_model("Tesla T4"), "T4");
        assert_eq!(canonical_model("NVIDIA L40S"), "L40S");
        assert_eq!(canonical_model("NVIDIA L4"), "L4");
        assert_eq!(canonical_model("NVIDIA A10G"), "A10G");
        assert_eq!(canonical_model("NVIDIA RTX A6000"), "RTX-A6000");
    }

    #[test]
    fn gpm_percentages_become_dcgm_ratios() {
        assert_eq!(percent_to_ratio(62.5), Some(0.625));
        assert_eq!(percent_to_ratio(0.0), Some(0.0));
        assert_eq!(percent_to_ratio(100.0), Some(1.0));
        // Rounding past the bounds is clamped, not reported as >100%.
        assert_eq!(percent_to_ratio(100.3), Some(1.0));
        assert_eq!(percent_to_ratio(-0.01), Some(0.0));
        assert_eq!(percent_to_ratio(f64::NAN), None);
        assert_eq!(percent_to_ratio(f64::INFINITY), None);
    }

    #[test]
    fn a_missing_library_means_no_gpus_not_a_failure() {
        let p = probe(Some(Path::new("/nonexistent/libnvidia-ml.so.1")));
        assert!(p.nvml_error.is_some());
        assert!(p.gpus.is_empty());
    }
}
