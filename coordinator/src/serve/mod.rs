//! Serving: a load balancer for every service on every coordinator
//! (`lb.rs`), and the leader's service loop (`controller.rs`) that probes
//! replicas, scales them and replaces the ones that fail. The replicas and
//! their states are replicated; request counts are not (telemetry, like
//! GPU readings): each coordinator counts what its load balancers take,
//! and the leader adds them up.

pub mod controller;
pub mod lb;
pub mod report;

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The window request rates are measured over (SkyServe's).
pub const QPS_WINDOW_S: i64 = 60;

/// Serving's part of the coordinator's context.
pub struct Serving {
    /// Where the load balancers listen: the API listener's address.
    pub bind_ip: IpAddr,
    /// Ports services' load balancers are given, one each.
    pub ports: RangeInclusive<u16>,
    /// Requests this coordinator's load balancers took, per service.
    pub load: Load,
    /// The other members' request rates, as they last reported them.
    pub reported: Reported,
}

/// (member, service) -> (requests per second, when heard, Unix s).
pub type Reported = Arc<Mutex<HashMap<(u64, String), (f64, i64)>>>;

/// A member's report counts this long.
const REPORT_FRESH_S: i64 = 10;

impl Serving {
    /// Requests per second at every coordinator's load balancer for
    /// `service`: this one's own, and the others' fresh reports.
    pub fn total_qps(&self, service: &str, now_s: i64) -> f64 {
        let reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        let others: f64 = reported
            .iter()
            .filter(|((_, s), (_, at))| s == service && now_s - at <= REPORT_FRESH_S)
            .map(|(_, (qps, _))| qps)
            .sum();
        self.load.qps(service, now_s) + others
    }
}

/// Request counts per service, in one-second buckets over the last minute.
#[derive(Default)]
pub struct Load {
    services: Mutex<HashMap<String, Arc<RequestCounter>>>,
}

impl Load {
    /// The counter of `service`, made on first use.
    pub fn counter(&self, service: &str) -> Arc<RequestCounter> {
        let mut map = self.services.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(service.to_string()).or_default().clone()
    }

    /// Requests per second over the last minute, for `service`.
    pub fn qps(&self, service: &str, now_s: i64) -> f64 {
        let map = self.services.lock().unwrap_or_else(|e| e.into_inner());
        map.get(service).map_or(0.0, |c| c.qps(now_s))
    }

    /// Forgets services no longer served.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut map = self.services.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|name, _| keep(name));
    }
}

/// Requests counted in a ring of one-second buckets.
pub struct RequestCounter {
    counts: [AtomicU64; QPS_WINDOW_S as usize],
    seconds: [AtomicI64; QPS_WINDOW_S as usize],
}

impl Default for RequestCounter {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            seconds: std::array::from_fn(|_| AtomicI64::new(i64::MIN)),
        }
    }
}

impl RequestCounter {
    /// One request, at `now_s` (Unix seconds).
    pub fn record(&self, now_s: i64) {
        let i = now_s.rem_euclid(QPS_WINDOW_S) as usize;
        // The bucket's second moves on: the first request of the new
        // second resets it. A race between two such requests loses at
        // most a count, which a rate over a minute does not notice.
        if self.seconds[i].swap(now_s, Ordering::AcqRel) != now_s {
            self.counts[i].store(0, Ordering::Release);
        }
        self.counts[i].fetch_add(1, Ordering::AcqRel);
    }

    /// Requests per second over the minute before `now_s`.
    pub fn qps(&self, now_s: i64) -> f64 {
        let total: u64 = (0..QPS_WINDOW_S as usize)
            .filter(|i| {
                let s = self.seconds[*i].load(Ordering::Acquire);
                s > now_s - QPS_WINDOW_S && s <= now_s
            })
            .map(|i| self.counts[i].load(Ordering::Acquire))
            .sum();
        total as f64 / QPS_WINDOW_S as f64
    }
}

/// `host:port` of a service's load balancer on each coordinator, from the
/// members' URLs (members sharing a host share its port).
pub fn endpoints(members: &std::collections::BTreeMap<u64, String>, port: u16) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for url in members.values() {
        let Ok(uri) = url.parse::<http::Uri>() else {
            continue;
        };
        let Some(host) = uri.host() else { continue };
        let e = format!("{host}:{port}");
        if !out.contains(&e) {
            out.push(e);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qps_counts_the_last_minute_only() {
        let c = RequestCounter::default();
        for _ in 0..120 {
            c.record(1_000);
        }
        c.record(1_030);
        assert_eq!(c.qps(1_030), 121.0 / 60.0);
        // A minute on, the first second's requests have left the window.
        assert_eq!(c.qps(1_060), 1.0 / 60.0);
        // The ring's slot is reused a minute later, reset first.
        c.record(1_060);
        assert_eq!(c.qps(1_060), 2.0 / 60.0);
        assert_eq!(c.qps(1_200), 0.0);
    }

    #[test]
    fn endpoints_are_one_per_host() {
        let members = [
            (1, "https://10.0.0.1:7000".to_string()),
            (2, "https://10.0.0.2:7000".to_string()),
            (3, "https://10.0.0.2:7001".to_string()),
        ]
        .into();
        assert_eq!(
            endpoints(&members, 30001),
            vec!["10.0.0.1:30001", "10.0.0.2:30001"]
        );
    }
}
