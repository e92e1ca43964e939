//! The fleet view: every GPU's newest reading and its recent history, in
//! memory on the coordinator that holds the agents' sessions (the leader).
//! Telemetry never goes through Raft: a new leader starts empty and fills
//! up from the next heartbeats, a second later.
//!
//! One owner task holds the [`FleetStore`]; sessions send it readings
//! without waiting (a full mailbox drops a reading: telemetry is lossy by
//! design, heartbeats must never stall), queries get a snapshot back.
//!
//! Memory budget per GPU: the identity (~200 B), the newest reading (~150 B),
//! 15 minutes at full resolution (900 points at 1 Hz) and 24 hours of
//! one-minute points (1 440), each point 16 bytes: about 38 KiB per GPU, so
//! 80 000 GPUs fit in about 3 GiB and 8 000 in 300 MiB.

use std::collections::{BTreeMap, VecDeque};

use nembo_proto::clock::unix_ms;
use nembo_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};

/// Full-resolution history kept per GPU.
pub const RECENT_POINTS: usize = 900;
/// One-minute points kept per GPU.
pub const MINUTE_POINTS: usize = 1_440;
const MINUTE_MS: i64 = 60_000;
const MAILBOX: usize = 16_384;

/// One reading, compressed for history: what dashboards plot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Point {
    /// Seconds since the Unix epoch.
    pub at_s: u32,
    /// GPU utilisation, percent.
    pub util: u8,
    /// Memory utilisation, percent.
    pub mem_util: u8,
    /// Temperature, °C.
    pub temp_c: u8,
    /// Flags: bit 0 = the reading had an uncorrected ECC count > 0.
    pub flags: u8,
    /// Power, watts.
    pub power_w: u16,
    /// Framebuffer in use, MiB.
    pub fb_used_mib: u32,
}

impl Point {
    fn of(t: &pb::GpuTelemetry) -> Point {
        let pct = |v: Option<u32>| v.unwrap_or(0).min(255) as u8;
        Point {
            at_s: (unix_ms(t.sample_time.as_ref()) / 1000).clamp(0, i64::from(u32::MAX)) as u32,
            util: pct(t.gpu_util_percent),
            mem_util: pct(t.mem_util_percent),
            temp_c: pct(t.temperature_c),
            flags: u8::from(t.ecc_uncorrected.unwrap_or(0) > 0),
            power_w: (t.power_mw.unwrap_or(0) / 1000).min(u32::from(u16::MAX)) as u16,
            fb_used_mib: (t.fb_used_bytes.unwrap_or(0) >> 20).min(u64::from(u32::MAX)) as u32,
        }
    }
}

/// Sums of the points of the minute being filled.
#[derive(Debug, Default, Clone)]
struct MinuteSum {
    minute: i64,
    n: u32,
    util: u32,
    mem_util: u32,
    temp_c: u32,
    power_w: u32,
    fb_used_mib: u64,
    flags: u8,
}

impl MinuteSum {
    fn add(&mut self, p: &Point) {
        self.n += 1;
        self.util += u32::from(p.util);
        self.mem_util += u32::from(p.mem_util);
        self.temp_c += u32::from(p.temp_c);
        self.power_w += u32::from(p.power_w);
        self.fb_used_mib += u64::from(p.fb_used_mib);
        self.flags |= p.flags;
    }

    fn mean(&self) -> Point {
        let n = self.n.max(1);
        Point {
            at_s: (self.minute * MINUTE_MS / 1000) as u32,
            util: (self.util / n) as u8,
            mem_util: (self.mem_util / n) as u8,
            temp_c: (self.temp_c / n) as u8,
            flags: self.flags,
            power_w: (self.power_w / n) as u16,
            fb_used_mib: (self.fb_used_mib / u64::from(n)) as u32,
        }
    }
}

/// Everything known about one GPU.
#[derive(Debug, Clone, Default)]
pub struct GpuRecord {
    /// Identity from the agent's hello.
    pub identity: pb::GpuIdentity,
    /// Driver version of its node.
    pub driver_version: String,
    /// Newest reading.
    pub latest: Option<pb::GpuTelemetry>,
    /// When the newest reading arrived (coordinator clock).
    pub received_at_ms: i64,
    /// Full-resolution points, oldest first.
    pub recent: VecDeque<Point>,
    /// One-minute means, oldest first.
    pub minutes: VecDeque<Point>,
    minute: MinuteSum,
}

/// The whole fleet, by (node, GPU index). Deterministic: times come in.
#[derive(Debug, Default)]
pub struct FleetStore {
    gpus: BTreeMap<(String, u32), GpuRecord>,
}

impl FleetStore {
    /// A node (re)introduced its GPUs: keep what matches, drop the rest.
    pub fn hello(&mut self, node: &str, gpus: &[pb::GpuIdentity], driver_version: &str) {
        self.forget(node);
        for g in gpus {
            self.gpus.insert(
                (node.to_string(), g.index),
                GpuRecord {
                    identity: g.clone(),
                    driver_version: driver_version.to_string(),
                    ..Default::default()
                },
            );
        }
    }

    /// Readings from `node`'s heartbeat, received at `now_ms`.
    pub fn record(&mut self, node: &str, readings: &[pb::GpuTelemetry], now_ms: i64) {
        for t in readings {
            let Some(rec) = self.gpus.get_mut(&(node.to_string(), t.index)) else {
                continue; // not in its hello: ignore rather than invent an identity
            };
            if rec
                .latest
                .as_ref()
                .is_some_and(|l| l.sample_time == t.sample_time)
            {
                // The same sample again (an XID sent at once amends it):
                // newest fields, no second history point.
                rec.latest = Some(t.clone());
                rec.received_at_ms = now_ms;
                continue;
            }
            let p = Point::of(t);
            rec.recent.push_back(p);
            if rec.recent.len() > RECENT_POINTS {
                rec.recent.pop_front();
            }
            let minute = unix_ms(t.sample_time.as_ref()).div_euclid(MINUTE_MS);
            if rec.minute.n > 0 && rec.minute.minute != minute {
                rec.minutes.push_back(rec.minute.mean());
                if rec.minutes.len() > MINUTE_POINTS {
                    rec.minutes.pop_front();
                }
                rec.minute = MinuteSum::default();
            }
            rec.minute.minute = minute;
            rec.minute.add(&p);
            rec.latest = Some(t.clone());
            rec.received_at_ms = now_ms;
        }
    }

    /// The node is gone (terminated or lost).
    pub fn forget(&mut self, node: &str) {
        self.gpus.retain(|(n, _), _| n != node);
    }

    /// One GPU's points, oldest first: full resolution, or minute means.
    pub fn history(&self, node: &str, index: u32, minutes: bool) -> Option<Vec<Point>> {
        let rec = self.gpus.get(&(node.to_string(), index))?;
        let points = if minutes { &rec.minutes } else { &rec.recent };
        Some(points.iter().copied().collect())
    }

    /// Every GPU, by node then index.
    pub fn gpus(&self) -> impl Iterator<Item = (&str, &GpuRecord)> {
        self.gpus.iter().map(|((n, _), r)| (n.as_str(), r))
    }
}

/// Where a node is and what runs there, as GPU series carry it.
#[derive(Debug, Clone, Default)]
pub struct NodeLabels {
    pub provider: String,
    pub region: String,
    /// The node's accelerators are simulated.
    pub simulated: bool,
    /// Jobs with a rank holding the node.
    pub jobs: Vec<String>,
}

/// Labels for the GPUs of every node, each node looked up once (a node has
/// several GPUs; `jobs_on` scans the placed jobs).
#[derive(Default)]
pub struct LabelCache(BTreeMap<String, NodeLabels>);

impl LabelCache {
    /// `node`'s labels in `state`.
    pub fn get(&mut self, state: &nembo_domain::state::State, node: &str) -> &NodeLabels {
        self.0.entry(node.to_string()).or_insert_with(|| {
            let n = state.nodes.get(node);
            NodeLabels {
                provider: n.map(|n| n.provider.clone()).unwrap_or_default(),
                region: n.map(|n| n.region.clone()).unwrap_or_default(),
                simulated: n.is_some_and(|n| n.simulated),
                jobs: state
                    .jobs_on(node)
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            }
        })
    }
}

enum FleetMsg {
    Hello {
        node: String,
        gpus: Vec<pb::GpuIdentity>,
        driver_version: String,
    },
    Readings {
        node: String,
        readings: Vec<pb::GpuTelemetry>,
        now_ms: i64,
    },
    Forget(String),
    Snapshot(oneshot::Sender<Vec<(String, GpuRecord)>>),
    History {
        node: String,
        index: u32,
        minutes: bool,
        reply: oneshot::Sender<Option<Vec<Point>>>,
    },
}

/// Mailbox of the fleet's owner task. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    tx: mpsc::Sender<FleetMsg>,
}

impl Fleet {
    /// Starts the owner task (call within a Tokio runtime).
    pub fn start() -> Fleet {
        let (tx, mut rx) = mpsc::channel(MAILBOX);
        tokio::spawn(async move {
            let mut store = FleetStore::default();
            while let Some(msg) = rx.recv().await {
                match msg {
                    FleetMsg::Hello {
                        node,
                        gpus,
                        driver_version,
                    } => store.hello(&node, &gpus, &driver_version),
                    FleetMsg::Readings {
                        node,
                        readings,
                        now_ms,
                    } => store.record(&node, &readings, now_ms),
                    FleetMsg::Forget(node) => store.forget(&node),
                    FleetMsg::Snapshot(reply) => {
                        let all = store
                            .gpus()
                            .map(|(n, r)| {
                                // History stays with the owner: a snapshot
                                // carries the newest reading only.
                                let light = GpuRecord {
                                    identity: r.identity.clone(),
                                    driver_version: r.driver_version.clone(),
                                    latest: r.latest.clone(),
                                    received_at_ms: r.received_at_ms,
                                    ..Default::default()
                                };
                                (n.to_string(), light)
                            })
                            .collect();
                        let _ = reply.send(all);
                    }
                    FleetMsg::History {
                        node,
                        index,
                        minutes,
                        reply,
                    } => {
                        let _ = reply.send(store.history(&node, index, minutes));
                    }
                }
            }
        });
        Fleet { tx }
    }

    /// A node's hello (waits for room: rare and must not be lost).
    pub async fn hello(&self, node: &str, gpus: Vec<pb::GpuIdentity>, driver_version: String) {
        let _ = self
            .tx
            .send(FleetMsg::Hello {
                node: node.to_string(),
                gpus,
                driver_version,
            })
            .await;
    }

    /// A heartbeat's readings; dropped when the owner is behind.
    pub fn readings(&self, node: &str, readings: Vec<pb::GpuTelemetry>, now_ms: i64) {
        if readings.is_empty() {
            return;
        }
        let _ = self.tx.try_send(FleetMsg::Readings {
            node: node.to_string(),
            readings,
            now_ms,
        });
    }

    /// Forgets a node's GPUs.
    pub async fn forget(&self, node: &str) {
        let _ = self.tx.send(FleetMsg::Forget(node.to_string())).await;
    }

    /// One GPU's history (None: no such GPU).
    pub async fn history(&self, node: &str, index: u32, minutes: bool) -> Option<Vec<Point>> {
        let (reply, rx) = oneshot::channel();
        let msg = FleetMsg::History {
            node: node.to_string(),
            index,
            minutes,
            reply,
        };
        self.tx.send(msg).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Every GPU with its newest reading.
    pub async fn snapshot(&self) -> Vec<(String, GpuRecord)> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(FleetMsg::Snapshot(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(i: u32) -> pb::GpuIdentity {
        pb::GpuIdentity {
            index: i,
            model: "H100".into(),
            ..Default::default()
        }
    }

    fn reading(i: u32, at_ms: i64, util: u32) -> pb::GpuTelemetry {
        pb::GpuTelemetry {
            index: i,
            sample_time: nembo_proto::clock::timestamp(at_ms),
            gpu_util_percent: Some(util),
            power_mw: Some(300_000),
            ..Default::default()
        }
    }

    #[test]
    fn history_is_bounded_and_downsampled_by_minute() {
        let mut f = FleetStore::default();
        f.hello("node-1", &[ident(0)], "580");
        // 20 minutes at 1 Hz, utilisation = the minute number.
        for s in 0..1200i64 {
            f.record("node-1", &[reading(0, s * 1000, (s / 60) as u32)], s * 1000);
        }
        let (_, rec) = f.gpus().next().unwrap();
        assert_eq!(
            rec.recent.len(),
            RECENT_POINTS,
            "15 minutes at full resolution"
        );
        assert_eq!(rec.recent.back().unwrap().util, 19);
        assert_eq!(rec.minutes.len(), 19, "one point per completed minute");
        assert_eq!(rec.minutes[7].util, 7);
        assert_eq!(rec.minutes[7].power_w, 300);
        assert_eq!(rec.latest.as_ref().unwrap().gpu_util_percent, Some(19));
    }

    #[test]
    fn unknown_gpus_and_repeated_samples_are_ignored_and_nodes_forgotten() {
        let mut f = FleetStore::default();
        f.hello("node-1", &[ident(0)], "580");
        f.record("node-1", &[reading(0, 1000, 5), reading(9, 1000, 5)], 1000);
        f.record("node-1", &[reading(0, 1000, 5)], 2000);
        f.record("node-2", &[reading(0, 1000, 5)], 2000);
        let all: Vec<_> = f.gpus().collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1.recent.len(), 1);
        assert_eq!(all[0].1.received_at_ms, 2000);
        f.forget("node-1");
        assert_eq!(f.gpus().count(), 0);
    }

    #[test]
    fn a_history_point_is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Point>(), 16);
    }
}
