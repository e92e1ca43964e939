//! How late agent heartbeats arrive: a lock-free histogram that every
//! agent session writes and `/metrics` reads.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (seconds) of the heartbeat-delay histogram's buckets.
const DELAY_BUCKETS: [f64; 9] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

const NAME: &str = "nembo_agent_heartbeat_delay_seconds";

/// Agent heartbeat delays (agent clock to coordinator clock: on one host,
/// transport and queueing time).
#[derive(Debug, Default)]
pub struct DelayHistogram {
    buckets: [AtomicU64; DELAY_BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl DelayHistogram {
    /// Records one delay.
    pub fn observe_ms(&self, ms: i64) {
        let s = ms.max(0) as f64 / 1000.0;
        for (i, bound) in DELAY_BUCKETS.iter().enumerate() {
            if s <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(ms.max(0) as u64 * 1000, Ordering::Relaxed);
    }

    /// Appends the histogram in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {NAME} Delay from an agent sending a heartbeat to this member receiving it.\n# TYPE {NAME} histogram"
        );
        for (i, bound) in DELAY_BUCKETS.iter().enumerate() {
            let n = self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{NAME}_bucket{{le=\"{bound}\"}} {n}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{NAME}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{NAME}_sum {sum}");
        let _ = writeln!(out, "{NAME}_count {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_counts_into_every_bucket_at_or_above() {
        let h = DelayHistogram::default();
        h.observe_ms(3);
        h.observe_ms(200);
        assert_eq!(h.buckets[0].load(Ordering::Relaxed), 0); // 1 ms
        assert_eq!(h.buckets[1].load(Ordering::Relaxed), 1); // 5 ms
        assert_eq!(h.buckets[6].load(Ordering::Relaxed), 2); // 250 ms
        assert_eq!(h.count.load(Ordering::Relaxed), 2);
    }
}
