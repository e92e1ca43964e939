//! The leader's service loop: probes every running replica on its probe's
//! interval, feeds the autoscaler the request rate, and proposes what
//! [`nembo_domain::serve::plan`] decides. Starts on gaining leadership and
//! stops on losing it; a new leader's probes start afresh.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Bytes;
use nembo_domain::serve::{next_target, plan, replica_endpoint, Hysteresis, ProbeSummary, Probes};
use nembo_domain::state::{Command, JobState, ReplicaPhase, ServiceCommand, State};
use nembo_domain::task::ReadinessProbe;
use nembo_proto::clock::now_ms;
use nembo_proto::http::HttpClient;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::context::Ctx;

/// How often the loop looks again with no state change.
const TICK: Duration = Duration::from_millis(100);

/// The longest wait between probes of a replica not READY yet.
const FIRST_PROBES_EVERY: Duration = Duration::from_millis(500);

/// A replica's probing, as this leader has done it.
struct Probing {
    summary: ProbeSummary,
    last_sent: Instant,
    in_flight: bool,
}

type ReplicaKey = (String, u32);

pub async fn run(ctx: Arc<Ctx>) {
    let mut views = ctx.raft.subscribe();
    let mut probing: HashMap<ReplicaKey, Probing> = HashMap::new();
    let mut memory: HashMap<String, Hysteresis> = HashMap::new();
    let mut clients: HashMap<u32, HttpClient> = HashMap::new();
    let mut probes_out: JoinSet<(ReplicaKey, bool)> = JoinSet::new();
    loop {
        let view = views.borrow_and_update().clone();
        let state = &view.state;
        let now = now_ms();
        start_probes(state, &mut probing, &mut clients, &mut probes_out);
        let mut commands = Vec::new();
        for service in state.services.values() {
            let Some(policy) = service
                .newest()
                .and_then(|t| t.service.as_ref())
                .map(|s| &s.replica_policy)
            else {
                continue;
            };
            let qps = ctx.serve.total_qps(&service.name, now / 1000);
            let mem = memory.entry(service.name.clone()).or_default();
            let target = next_target(policy, service.target, qps, mem, now);
            if target != service.target {
                tracing::info!(service = %service.name, from = service.target, to = target, qps, "autoscaler");
                commands.push(Command::Service(ServiceCommand::SetTarget {
                    name: service.name.clone(),
                    target,
                    at_ms: now,
                }));
            }
        }
        memory.retain(|name, _| state.services.contains_key(name));
        let seen: Probes = probing
            .iter()
            .map(|(k, p)| (k.clone(), p.summary))
            .collect();
        commands.extend(plan(state, &seen, now));
        // Worked out only when a replica is to be added.
        let mut ports_taken: Option<HashSet<u16>> = None;
        for mut cmd in commands {
            if let Command::Service(ServiceCommand::AddReplica {
                name,
                replica_id,
                shared_host_port,
                ..
            }) = &mut cmd
            {
                let taken = ports_taken.get_or_insert_with(|| {
                    state
                        .services
                        .values()
                        .flat_map(|s| s.replicas.values())
                        .filter(|r| r.is_live())
                        .map(|r| r.shared_host_port)
                        .collect()
                });
                match free_port(taken) {
                    Some(p) => {
                        *shared_host_port = p;
                        taken.insert(p);
                    }
                    None => {
                        tracing::warn!(service = %name, "no free port for a replica");
                        continue;
                    }
                }
                tracing::info!(service = %name, replica = *replica_id, "adding a replica");
            }
            ctx.propose_quietly(cmd).await;
        }
        tokio::select! {
            changed = views.changed() => if changed.is_err() { return },
            Some(Ok((key, ok))) = probes_out.join_next() => {
                if let Some(p) = probing.get_mut(&key) {
                    p.in_flight = false;
                    p.summary = if ok {
                        ProbeSummary { ok: true, failing_since_ms: None }
                    } else {
                        ProbeSummary {
                            ok: false,
                            failing_since_ms: Some(p.summary.failing_since_ms.unwrap_or_else(now_ms)),
                        }
                    };
                }
            }
            () = tokio::time::sleep(TICK) => {}
        }
    }
}

/// Sends the probes that are due: one at a time per running replica,
/// every `endpoint_probe_interval_seconds`.
fn start_probes(
    state: &State,
    probing: &mut HashMap<ReplicaKey, Probing>,
    clients: &mut HashMap<u32, HttpClient>,
    out: &mut JoinSet<(ReplicaKey, bool)>,
) {
    let mut live: HashSet<ReplicaKey> = HashSet::new();
    for service in state.services.values() {
        for r in service.replicas.values().filter(|r| r.is_live()) {
            let running = state
                .jobs
                .get(&r.job_id)
                .is_some_and(|j| j.state == JobState::Running);
            let (Some(endpoint), Some(probe)) = (
                replica_endpoint(state, service, r).filter(|_| running),
                service
                    .versions
                    .get(&r.version)
                    .and_then(|t| t.service.as_ref())
                    .map(|s| &s.readiness_probe),
            ) else {
                continue;
            };
            let key = (service.name.clone(), r.id);
            live.insert(key.clone());
            // Until its first pass, a replica is probed at least twice a
            // second: it turns READY as soon as it answers, not up to an
            // interval later.
            let mut interval = Duration::from_secs(probe.interval_s.into());
            if r.phase == ReplicaPhase::Starting {
                interval = interval.min(FIRST_PROBES_EVERY);
            }
            let p = probing.entry(key.clone()).or_insert(Probing {
                summary: ProbeSummary {
                    ok: false,
                    failing_since_ms: None,
                },
                last_sent: Instant::now() - interval,
                in_flight: false,
            });
            if p.in_flight || p.last_sent.elapsed() < interval {
                continue;
            }
            p.in_flight = true;
            p.last_sent = Instant::now();
            let client = clients
                .entry(probe.timeout_s)
                .or_insert_with(|| HttpClient::new(Duration::from_secs(probe.timeout_s.into())))
                .clone();
            let req = probe_request(&endpoint, probe);
            out.spawn(async move {
                let ok = match req {
                    Some(req) => client.send(req).await.is_ok_and(|r| r.status == 200),
                    None => false,
                };
                (key, ok)
            });
        }
    }
    probing.retain(|k, _| live.contains(k));
}

/// SkyServe's probe: GET the path, or POST `post_data` as JSON; plain HTTP.
fn probe_request(endpoint: &str, probe: &ReadinessProbe) -> Option<Request<Bytes>> {
    let mut b = Request::builder().uri(format!("http://{endpoint}{}", probe.path));
    for (k, v) in &probe.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    match &probe.post_data {
        Some(data) => b
            .method("POST")
            .header("content-type", "application/json")
            .body(Bytes::from(data.clone())),
        None => b.method("GET").body(Bytes::new()),
    }
    .ok()
}

/// A port nothing on this host listens on and no replica holds: where a
/// replica on a shared host serves. The leader runs beside the local
/// nodes, so its host is theirs.
fn free_port(taken: &HashSet<u16>) -> Option<u16> {
    for _ in 0..16 {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .ok()?
            .local_addr()
            .ok()?
            .port();
        if !taken.contains(&port) {
            return Some(port);
        }
    }
    None
}
