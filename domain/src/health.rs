//! When a GPU's readings make its node unhealthy. Pure: the leader's
//! session for the node feeds it each reading and proposes
//! `Command::NodeUnhealthy` with the reason it returns.

/// XIDs after which a GPU must not take new work (NVIDIA's XID catalogue):
/// 48 double-bit ECC, 63/64 row remapping recorded/failed, 74 NVLink,
/// 79 fallen off the bus, 92 high single-bit ECC rate, 94/95 contained /
/// uncontained ECC.
pub const CRITICAL_XIDS: &[u64] = &[48, 63, 64, 74, 79, 92, 94, 95];

/// What one reading says about a GPU's health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuReading {
    /// NVML index.
    pub index: u32,
    /// XIDs the agent has seen on it.
    pub xid_count: u64,
    /// The last of them.
    pub last_xid: Option<u64>,
    /// Uncorrected ECC errors since the driver loaded.
    pub ecc_uncorrected: Option<u64>,
    /// Fallen off the bus.
    pub lost: bool,
    /// Pages wait for a GPU reset to retire.
    pub retired_pages_pending: bool,
}

/// Why `now` makes the node unhealthy, if it does. `xids_seen` is the XID
/// count of the previous reading of this GPU (0 for the first).
pub fn gpu_problem(now: &GpuReading, xids_seen: u64) -> Option<String> {
    let gpu = now.index;
    if now.lost {
        return Some(format!("GPU {gpu} has fallen off the bus"));
    }
    if now.xid_count > xids_seen {
        if let Some(xid) = now.last_xid.filter(|x| CRITICAL_XIDS.contains(x)) {
            return Some(format!("GPU {gpu} reported critical XID {xid}"));
        }
    }
    if let Some(n) = now.ecc_uncorrected.filter(|n| *n > 0) {
        return Some(format!("GPU {gpu} has {n} uncorrectable ECC errors"));
    }
    // NVIDIA's guidance: drain and reset; until then the bad pages stay mapped.
    now.retired_pages_pending
        .then(|| format!("GPU {gpu} has memory pages pending retirement (needs a GPU reset)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn critical_xids_ecc_and_lost_gpus_are_problems_others_are_not() {
        let ok = GpuReading {
            index: 3,
            ..Default::default()
        };
        assert_eq!(gpu_problem(&ok, 0), None);
        let xid79 = GpuReading {
            xid_count: 1,
            last_xid: Some(79),
            ..ok
        };
        assert_eq!(
            gpu_problem(&xid79, 0).as_deref(),
            Some("GPU 3 reported critical XID 79")
        );
        // Already counted: not news (the node was marked when it was).
        assert_eq!(gpu_problem(&xid79, 1), None);
        // XID 13 (graphics engine exception) is an application error.
        let xid13 = GpuReading {
            xid_count: 2,
            last_xid: Some(13),
            ..ok
        };
        assert_eq!(gpu_problem(&xid13, 1), None);
        let ecc = GpuReading {
            ecc_uncorrected: Some(2),
            ..ok
        };
        assert!(gpu_problem(&ecc, 0)
            .unwrap()
            .contains("2 uncorrectable ECC"));
        let pending = GpuReading {
            retired_pages_pending: true,
            ..ok
        };
        assert!(gpu_problem(&pending, 0)
            .unwrap()
            .contains("pending retirement"));
        let lost = GpuReading { lost: true, ..ok };
        assert!(gpu_problem(&lost, 0)
            .unwrap()
            .contains("fallen off the bus"));
    }
}
