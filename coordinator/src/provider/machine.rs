//! What this machine really has, for the local provider's default
//! offering: its vCPUs and memory (less a reserve for the coordinator),
//! and its GPUs as NVML reports them. The GPUs are read by running
//! `nembo-agent --inventory`, the agent's own NVML code, so the coordinator
//! links no NVML and sees exactly what its agents will.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nembo_domain::state::Resources;
use nembo_domain::task::fmt_num;

/// vCPUs kept for the coordinator (and the agent) on a machine with more
/// than two; half a vCPU on smaller ones.
const RESERVED_CPUS: f64 = 1.0;
/// GB of memory kept for the coordinator, at most a quarter of the machine.
const RESERVED_MEMORY_GB: f64 = 2.0;
/// The agent is given this long to list the GPUs (a wedged driver must not
/// stop the coordinator from starting).
const INVENTORY_TIMEOUT: Duration = Duration::from_secs(15);

/// One model of GPU on this machine.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuModel {
    /// The scheduler's name (`H100`).
    pub model: String,
    /// How many.
    pub count: u32,
    /// Memory of each, GB (the smallest if they differ), as NVML reports it.
    pub memory_gb: Option<f64>,
}

/// This machine, as jobs may use it.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// vCPUs for jobs.
    pub cpus: f64,
    /// Memory for jobs, GB.
    pub memory_gb: f64,
    /// Its GPUs by model.
    pub gpus: Vec<GpuModel>,
    /// Why no GPU was found, when none was.
    pub no_gpu_because: Option<String>,
}

#[derive(serde::Deserialize)]
struct Inventory {
    nvml_error: Option<String>,
    #[serde(default)]
    gpus: Vec<InventoryGpu>,
}

#[derive(serde::Deserialize)]
struct InventoryGpu {
    model: String,
    memory_total_bytes: Option<u64>,
}

impl Machine {
    /// Reads this machine: `/proc/meminfo`, the CPUs this process may use,
    /// and the agent's NVML inventory.
    pub fn probe(agent_bin: &Path) -> Machine {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let memory_gb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| mem_total_gb(&m))
            .unwrap_or(0.0);
        let (gpus, no_gpu_because) = match run_inventory(agent_bin) {
            Ok(inv) => {
                let gpus = group(&inv.gpus);
                let why = gpus.is_empty().then(|| {
                    inv.nvml_error
                        .unwrap_or_else(|| "NVML found no GPU".to_string())
                });
                (gpus, why)
            }
            Err(why) => (Vec::new(), Some(why)),
        };
        Machine::with_reserve(cpus, memory_gb, gpus, no_gpu_because)
    }

    /// A machine of `cpus` and `memory_gb` in all, less what the
    /// coordinator keeps.
    pub fn with_reserve(
        cpus: f64,
        memory_gb: f64,
        gpus: Vec<GpuModel>,
        no_gpu_because: Option<String>,
    ) -> Machine {
        let cpu_reserve = if cpus > 2.0 { RESERVED_CPUS } else { 0.5 };
        let memory_reserve = RESERVED_MEMORY_GB.min(memory_gb / 4.0);
        Machine {
            cpus: (cpus - cpu_reserve).max(0.5),
            // Tenths of a GB: a figure people can read and compare.
            memory_gb: ((memory_gb - memory_reserve) * 10.0).floor() / 10.0,
            gpus,
            no_gpu_because,
        }
    }

    /// What jobs may use, as a node's resources.
    pub fn resources(&self) -> Resources {
        Resources {
            accelerators: self
                .gpus
                .iter()
                .map(|g| (g.model.clone(), f64::from(g.count)))
                .collect(),
            cpus: self.cpus,
            memory_gb: self.memory_gb,
        }
    }

    /// The instance type its node is listed as: `host-8xH100-80GB`,
    /// `host-cpu` without a GPU.
    pub fn instance_type(&self) -> String {
        if self.gpus.is_empty() {
            return "host-cpu".into();
        }
        let mut name = String::from("host");
        for g in &self.gpus {
            let _ = write!(name, "-{}x{}", g.count, g.model);
            if let Some(gb) = g.memory_gb {
                let _ = write!(name, "-{}GB", gb.round());
            }
        }
        name
    }

    /// The machine in a few words, for messages: "this machine has no GPU"
    /// or "this machine has 8x H100 (80 GB)".
    pub fn summary(&self) -> String {
        if self.gpus.is_empty() {
            return "this machine has no GPU".into();
        }
        let gpus: Vec<String> = self
            .gpus
            .iter()
            .map(|g| match g.memory_gb {
                Some(gb) => format!("{}x {} ({} GB)", g.count, g.model, gb.round()),
                None => format!("{}x {}", g.count, g.model),
            })
            .collect();
        format!("this machine has {}", gpus.join(" and "))
    }

    /// What `nembo check` says of it.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} vCPUs and {} GB for jobs; ",
            fmt_num(self.cpus),
            fmt_num(self.memory_gb)
        );
        match &self.no_gpu_because {
            Some(why) if self.gpus.is_empty() => {
                let _ = write!(s, "no GPU ({why})");
            }
            _ => s.push_str(&self.summary().replace("this machine has ", "GPUs: ")),
        }
        s
    }
}

/// Free space for jobs' files where the local nodes keep them, GB: the
/// largest disk a local node can offer a task's `disk_size`.
pub fn disk_free_gb(dir: &Path) -> Option<u64> {
    let mut probe = dir.to_path_buf();
    // The nodes dir may not exist yet: ask about its nearest ancestor.
    while !probe.exists() {
        probe = probe.parent()?.to_path_buf();
    }
    let st = nix::sys::statvfs::statvfs(&probe).ok()?;
    let bytes = st.blocks_available() as u64 * st.fragment_size() as u64;
    Some(bytes >> 30)
}

fn mem_total_gb(meminfo: &str) -> Option<f64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

fn group(gpus: &[InventoryGpu]) -> Vec<GpuModel> {
    let mut by_model: BTreeMap<&str, GpuModel> = BTreeMap::new();
    for g in gpus {
        // GiB, as NVIDIA names its boards (an "80GB" H100 has 80 GiB).
        let gb = g.memory_total_bytes.map(|b| b as f64 / (1u64 << 30) as f64);
        let entry = by_model.entry(&g.model).or_insert(GpuModel {
            model: g.model.clone(),
            count: 0,
            memory_gb: gb,
        });
        entry.count += 1;
        entry.memory_gb = match (entry.memory_gb, gb) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    by_model.into_values().collect()
}

fn run_inventory(agent_bin: &Path) -> Result<Inventory, String> {
    let what = format!("{} --inventory", agent_bin.display());
    let mut child = Command::new(agent_bin)
        .arg("--inventory")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() < INVENTORY_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what}: no answer in {INVENTORY_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{what}: {}", out.status));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_grouped_by_model_and_named_in_the_instance_type() {
        let inv = [
            ("H100", 85_899_345_920u64),
            ("H100", 85_899_345_920),
            ("T4", 16_106_127_360),
        ]
        .map(|(m, b)| InventoryGpu {
            model: m.into(),
            memory_total_bytes: Some(b),
        });
        let m = Machine::with_reserve(32.0, 128.0, group(&inv), None);
        assert_eq!(m.instance_type(), "host-2xH100-80GB-1xT4-15GB");
        assert_eq!(m.resources().accelerators["H100"], 2.0);
        assert_eq!((m.cpus, m.memory_gb), (31.0, 126.0));
        assert_eq!(
            m.summary(),
            "this machine has 2x H100 (80 GB) and 1x T4 (15 GB)"
        );
    }

    #[test]
    fn a_small_machine_keeps_a_smaller_reserve() {
        let m = Machine::with_reserve(2.0, 4.0, Vec::new(), Some("no NVML".into()));
        assert_eq!((m.cpus, m.memory_gb), (1.5, 3.0));
        assert_eq!(m.instance_type(), "host-cpu");
        assert_eq!(m.summary(), "this machine has no GPU");
        assert!(
            m.describe().contains("no GPU (no NVML)"),
            "{}",
            m.describe()
        );
    }

    #[test]
    fn mem_total_is_read_in_gib() {
        let gb = mem_total_gb("MemTotal:       16777216 kB\nMemFree: 1 kB\n").unwrap();
        assert_eq!(gb, 16.0);
    }
}
