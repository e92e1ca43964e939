//! The agent's session with the coordinators: connect over TLS with the join
//! token, say hello with every job this node knows, then heartbeat, ship
//! logs and carry out what the coordinator asks. On any break: reconnect
//! with capped exponential backoff and do it all again; the hello carries
//! the full picture, so nothing sent while disconnected is needed.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use nembo_proto::agent::v1 as apb;
use nembo_proto::agent::v1::session_request::Msg as AgentMsg;
use nembo_proto::agent::v1::session_response::Msg as CoordMsg;
use nembo_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::fence::Fence;
use crate::identity::Identity;
use crate::lease::Contact;
use crate::preempt::Notice;
use crate::supervisor::{Event, JobKey, JobView, Supervisor};
use crate::telemetry::Telemetry;
use nembo_proto::clock::now_ms;
use nembo_proto::LEADER_URL_KEY;

/// How the agent reaches its coordinator and describes its node.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Every coordinator's URL (`https://127.0.0.1:7443`); the session goes
    /// to whichever leads.
    pub coordinators: Vec<String>,
    /// CA certificate to trust.
    pub ca_cert: PathBuf,
    /// One-time join token file (0600): a node token from the coordinator
    /// that launched this node, or an admin's (`nembo admin tokens
    /// create`). Spent, then deleted, when the node has no certificate.
    pub join_token_file: Option<PathBuf>,
    /// This node's id, as the provider named it; none for a machine joining
    /// on its own with an admin's token (the coordinators name it).
    pub node_id: Option<String>,
    /// Where jobs live.
    pub work_dir: PathBuf,
    /// Address other nodes reach this one at.
    pub address: String,
    /// Where the world reaches it, if not at `address` (its ports' endpoints).
    pub public_address: String,
    /// Declared resources.
    pub resources: pb::NodeResources,
    /// Heartbeat period until the coordinator says otherwise.
    pub heartbeat: Duration,
    /// The node's GPUs and their newest readings.
    pub telemetry: Telemetry,
    /// The cloud metadata services to watch for preemption notices.
    pub watch: crate::preempt::WatchConfig,
    /// What jobs on this node are given besides their task.
    pub jobs: crate::supervisor::NodeSetup,
}

/// Why the agent should stop trying.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The coordinator says this node is gone or unknown.
    #[error("node retired by the coordinator: {0}")]
    Retired(String),
    /// Local setup failed.
    #[error("{0}")]
    Setup(String),
    /// The coordinators refused this node's credentials (a join token used,
    /// expired or revoked; the node revoked).
    #[error("refused by the coordinators: {0}")]
    Refused(String),
}

enum SessionEnd {
    Retry(String),
    Redirect(String),
    /// The certificate is due for renewal: reconnect to the same member.
    Renew,
    Fatal(AgentError),
}

const LOG_CHUNK: usize = 64 * 1024;
/// How long a coordinator has to connect, open the session and welcome us.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(5);
const LOG_POLL: Duration = Duration::from_millis(25);
/// Slowest log polling, reached after a quiet stretch.
const LOG_POLL_IDLE: Duration = Duration::from_millis(250);

/// Runs sessions until the coordinator retires the node.
pub async fn run(
    cfg: AgentConfig,
    sup: Supervisor,
    mut events: mpsc::UnboundedReceiver<Event>,
    mut notices: watch::Receiver<Option<Notice>>,
    contact: watch::Sender<Option<Contact>>,
) -> Result<(), AgentError> {
    let ca = std::fs::read(&cfg.ca_cert)
        .map_err(|e| AgentError::Setup(format!("{}: {e}", cfg.ca_cert.display())))?;
    if cfg.coordinators.is_empty() {
        return Err(AgentError::Setup("no coordinator given".into()));
    }
    let mut fence = Fence::open(&cfg.work_dir)
        .map_err(|e| AgentError::Setup(format!("{}: {e}", cfg.work_dir.display())))?;
    let mut backoff = Duration::from_millis(100);
    let mut target = 0usize;
    let mut url = cfg.coordinators[0].clone();
    let mut identity = Identity::load(&cfg.work_dir)
        .map_err(AgentError::Setup)?
        .filter(|i| cfg.node_id.as_ref().is_none_or(|n| *n == i.node_id));
    loop {
        let end = match ensure_identity(&cfg, &url, &ca, &mut identity).await {
            Ok(id) => {
                session(
                    &cfg,
                    &id,
                    &url,
                    &ca,
                    &sup,
                    &mut events,
                    &mut fence,
                    &mut notices,
                    &contact,
                )
                .await
            }
            Err(end) => end,
        };
        match end {
            SessionEnd::Fatal(e) => return Err(e),
            SessionEnd::Redirect(leader) => {
                // A follower named the leader: go there at once.
                tracing::info!(leader = %leader, "redirected to the leader");
                url = leader;
                backoff = Duration::from_millis(100);
                // Two members may name each other while an election settles.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            SessionEnd::Renew => {
                backoff = Duration::from_millis(100);
                continue;
            }
            SessionEnd::Retry(why) => {
                tracing::warn!(coordinator = %url, reason = %why, retry_in_ms = backoff.as_millis() as u64, "session ended; reconnecting");
                // Try the next coordinator: the one we had may be down.
                target = (target + 1) % cfg.coordinators.len();
                url = cfg.coordinators[target].clone();
            }
        }
        // Jitter keeps a fleet from reconnecting in lockstep after an outage.
        tokio::time::sleep(backoff + nembo_proto::client::jitter(backoff / 2)).await;
        // Capped low: after a leader change the agent must find the new
        // leader within about a second, and each try is one cheap handshake.
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// The certificate a coordinator answered with; an answer without one is
/// a coordinator's bug, tried again elsewhere.
fn certificate_in(
    certificate: Option<apb::NodeCertificate>,
    url: &str,
) -> Result<apb::NodeCertificate, SessionEnd> {
    certificate.ok_or_else(|| SessionEnd::Retry(format!("{url} answered without a certificate")))
}

/// A certificate that is good for now: the saved one, renewed when due, or
/// a new one for the join token.
async fn ensure_identity(
    cfg: &AgentConfig,
    url: &str,
    ca: &[u8],
    saved: &mut Option<Identity>,
) -> Result<Identity, SessionEnd> {
    let now = now_ms();
    if let Some(id) = saved.as_ref().filter(|i| !i.expired(now)) {
        if now < id.renew_at_ms() {
            return Ok(id.clone());
        }
        // A follower names the leader: renew there.
        let renewed = match renew(cfg, url, ca, id).await {
            Err(SessionEnd::Redirect(leader)) => renew(cfg, &leader, ca, id).await,
            other => other,
        };
        match renewed {
            Ok(new) => {
                tracing::info!(node = %new.node_id, valid_until_ms = new.not_after_ms, "certificate renewed");
                *saved = Some(new.clone());
                return Ok(new);
            }
            Err(SessionEnd::Fatal(e)) => return Err(SessionEnd::Fatal(e)),
            // Still valid: use it, and try again at the next connection.
            Err(other) => {
                if let SessionEnd::Retry(why) | SessionEnd::Redirect(why) = &other {
                    tracing::warn!(reason = %why, "certificate renewal failed; keeping the current one");
                }
                return Ok(id.clone());
            }
        }
    }
    let new = enroll(cfg, url, ca, saved.as_ref()).await?;
    tracing::info!(node = %new.node_id, valid_until_ms = new.not_after_ms, "enrolled");
    *saved = Some(new.clone());
    Ok(new)
}

/// A member that took too long: try another.
fn no_answer(url: &str) -> impl FnOnce(tokio::time::error::Elapsed) -> SessionEnd + '_ {
    move |_| SessionEnd::Retry(format!("{url}: no answer within {ESTABLISH_TIMEOUT:?}"))
}

/// What a refusal (of an enrollment, a renewal or a session) means for the
/// agent: follow the leader, stop (credentials refused), or try again.
fn refused(s: &tonic::Status, url: &str) -> SessionEnd {
    if let Some(leader) = s
        .metadata()
        .get(LEADER_URL_KEY)
        .and_then(|v| v.to_str().ok())
    {
        if leader != url {
            return SessionEnd::Redirect(leader.to_string());
        }
    }
    match s.code() {
        Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument => {
            SessionEnd::Fatal(AgentError::Refused(s.message().to_string()))
        }
        _ => SessionEnd::Retry(format!("{}: {}", s.code(), s.message())),
    }
}

/// Trades the join token for a certificate: for a new key, or for the key
/// of `expired`, the identity this node already had.
async fn enroll(
    cfg: &AgentConfig,
    url: &str,
    ca: &[u8],
    expired: Option<&Identity>,
) -> Result<Identity, SessionEnd> {
    let Some(token_file) = &cfg.join_token_file else {
        return Err(SessionEnd::Fatal(AgentError::Setup(
            "this node has no valid certificate and no join token: start it with --join-token-file (nembo admin tokens create)".into(),
        )));
    };
    let token = read_token(token_file).map_err(|e| {
        SessionEnd::Fatal(AgentError::Setup(format!(
            "{e} (a join token is spent at the first enrollment; an expired certificate needs a new one: nembo admin tokens create)"
        )))
    })?;
    let kept = expired.and_then(|id| {
        crate::identity::public_key_of(&id.key_pem)
            .ok()
            .map(|public| (id.key_pem.clone(), public))
    });
    let (key_pem, public_key) = match kept {
        Some(k) => k,
        None => crate::identity::new_key().map_err(|e| SessionEnd::Fatal(AgentError::Setup(e)))?,
    };
    let mut client = tokio::time::timeout(
        ESTABLISH_TIMEOUT,
        nembo_proto::client::connect_enrollment(url, ca),
    )
    .await
    .map_err(no_answer(url))?
    .map_err(|e| SessionEnd::Retry(e.to_string()))?;
    let req = apb::EnrollRequest {
        join_token: token,
        node_id: cfg.node_id.clone().unwrap_or_default(),
        public_key,
        hostname: hostname(),
        resources: Some(cfg.resources.clone()),
    };
    let answer = tokio::time::timeout(ESTABLISH_TIMEOUT, client.enroll(req))
        .await
        .map_err(no_answer(url))?
        .map_err(|s| refused(&s, url))?
        .into_inner();
    let id = Identity::issued(key_pem, certificate_in(answer.certificate, url)?);
    id.save(&cfg.work_dir).map_err(|e| {
        SessionEnd::Fatal(AgentError::Setup(format!(
            "{}: {e}",
            cfg.work_dir.display()
        )))
    })?;
    // Spent: nobody should find it on this machine later.
    let _ = std::fs::remove_file(token_file);
    Ok(id)
}

async fn renew(
    cfg: &AgentConfig,
    url: &str,
    ca: &[u8],
    current: &Identity,
) -> Result<Identity, SessionEnd> {
    let (key_pem, public_key) =
        crate::identity::new_key().map_err(|e| SessionEnd::Fatal(AgentError::Setup(e)))?;
    let mut client = tokio::time::timeout(
        ESTABLISH_TIMEOUT,
        nembo_proto::client::connect_agent_tls(url, ca, &current.cert_pem, &current.key_pem),
    )
    .await
    .map_err(no_answer(url))?
    .map_err(|e| SessionEnd::Retry(e.to_string()))?;
    let answer = tokio::time::timeout(
        ESTABLISH_TIMEOUT,
        client.renew(apb::RenewRequest { public_key }),
    )
    .await
    .map_err(no_answer(url))?
    .map_err(|s| refused(&s, url))?
    .into_inner();
    let id = Identity::issued(key_pem, certificate_in(answer.certificate, url)?);
    id.save(&cfg.work_dir)
        .map_err(|e| SessionEnd::Retry(format!("{}: {e}", cfg.work_dir.display())))?;
    Ok(id)
}

#[allow(clippy::too_many_arguments)]
async fn session(
    cfg: &AgentConfig,
    identity: &Identity,
    url: &str,
    ca: &[u8],
    sup: &Supervisor,
    events: &mut mpsc::UnboundedReceiver<Event>,
    fence: &mut Fence,
    notices: &mut watch::Receiver<Option<Notice>>,
    contact: &watch::Sender<Option<Contact>>,
) -> SessionEnd {
    // A coordinator that accepts the connection but never answers (a frozen
    // or partitioned process) must not hold the agent: give each member a
    // few seconds to welcome it, then try the next.
    let deadline = tokio::time::Instant::now() + ESTABLISH_TIMEOUT;
    let silent = || SessionEnd::Retry(format!("{url}: no welcome within {ESTABLISH_TIMEOUT:?}"));
    let mut client = match tokio::time::timeout_at(
        deadline,
        nembo_proto::client::connect_agent_tls(url, ca, &identity.cert_pem, &identity.key_pem),
    )
    .await
    {
        Err(_) => return silent(),
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return SessionEnd::Retry(e.to_string()),
    };
    // Jobs fetch their files over this member's channel from now on.
    sup.set_fetcher(client.clone());
    // The hello below supersedes anything queued while disconnected.
    while events.try_recv().is_ok() {}
    let jobs = sup.snapshot().await;
    let (out, out_rx) = mpsc::channel::<apb::SessionRequest>(1024);
    let hello = apb::Hello {
        node_id: identity.node_id.clone(),
        hostname: hostname(),
        address: cfg.address.clone(),
        public_address: cfg.public_address.clone(),
        resources: Some(cfg.resources.clone()),
        jobs: jobs.iter().map(|j| j.report.clone()).collect(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        gpus: cfg.telemetry.gpus.clone(),
        driver_version: cfg.telemetry.driver_version.clone(),
        cuda_version: cfg.telemetry.cuda_version.clone(),
    };
    let _ = out.send(msg(AgentMsg::Hello(hello))).await;
    let opened = tokio::time::timeout_at(deadline, client.session(ReceiverStream::new(out_rx)));
    let Ok(opened) = opened.await else {
        return silent();
    };
    let mut inbound = match opened {
        Ok(r) => r.into_inner(),
        // A node that has ended is retired for good; one the coordinator does
        // not know is not: a coordinator still replaying its log, or one
        // restored from an older disk, must never make a live agent quit
        // (only a revocation or the node's end may).
        Err(s) if s.code() == Code::FailedPrecondition => {
            return SessionEnd::Fatal(AgentError::Retired(s.message().to_string()))
        }
        Err(s) if s.code() == Code::NotFound => {
            return SessionEnd::Retry(format!(
                "{url} does not know this node yet: {}",
                s.message()
            ))
        }
        Err(s) => return refused(&s, url),
    };
    let Ok(first) = tokio::time::timeout_at(deadline, inbound.message()).await else {
        return silent();
    };
    let welcome = match first {
        Ok(Some(apb::SessionResponse {
            msg: Some(CoordMsg::Welcome(w)),
        })) => w,
        Ok(_) => return SessionEnd::Retry("no welcome".into()),
        Err(s) => return SessionEnd::Retry(s.to_string()),
    };
    if let Err(stale) = fence.admit(welcome.term) {
        // A deposed leader that does not know it yet: find the new one.
        return SessionEnd::Retry(stale.to_string());
    }
    let lease = Duration::from_millis(u64::from(welcome.contact_lease_ms));
    let heard = || {
        let now = tokio::time::Instant::now();
        contact.send_replace(Some(Contact {
            at: now,
            lease,
            node_id: identity.node_id.clone(),
        }));
        now
    };
    let mut heard_at = heard();
    tracing::info!(node = %identity.node_id, coordinator = %url, jobs = jobs.len(), "session open");
    // Reconnect with a renewed certificate once it is due; after a failed
    // renewal, try again in a while rather than at once.
    let now = now_ms();
    let renew_in = if identity.renew_at_ms() > now {
        identity.renew_at_ms() - now
    } else {
        ((identity.not_after_ms - now) / 4).clamp(1000, 30_000)
    };
    let renew_in = Duration::from_millis(renew_in as u64);
    let renewal = tokio::time::sleep(renew_in);
    tokio::pin!(renewal);
    let offsets: BTreeMap<(String, u32), u64> = welcome
        .log_offsets
        .iter()
        .map(|o| ((o.job_id.clone(), o.attempt), o.offset))
        .collect();
    let mut tailers = JoinSet::new();
    let mut tailing: HashSet<JobKey> = HashSet::new();
    for job in jobs {
        let from = offsets
            .get(&(job.report.job_id.clone(), job.report.attempt))
            .copied()
            .unwrap_or(0);
        start_tailer(&mut tailers, &mut tailing, job, from, out.clone());
    }
    let period = match welcome.heartbeat_interval_ms {
        0 => cfg.heartbeat,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let mut heartbeat = tokio::time::interval(period);
    // A leader that gives leases answers every heartbeat: silence means the
    // connection is dead (a partition drops packets, it closes nothing), so
    // look for the new leader well within the lease.
    // (A coordinator that gives no lease sends no answers either: then
    // silence means nothing, and its branch below is off. Its deadline is
    // still computed, so it must not overflow.)
    let silence = if lease.is_zero() {
        Duration::from_secs(24 * 3600)
    } else {
        (period * 3).max(Duration::from_millis(500)).min(lease / 2)
    };
    let mut urgent = cfg.telemetry.urgent.clone();
    urgent.mark_unchanged();
    let mut seq = 0u64;
    let mut shells = crate::shell::Shells::new(out.clone());
    // A notice heard while disconnected is reported first thing.
    notices.mark_changed();
    loop {
        let beat = tokio::select! {
            Ok(()) = notices.changed() => {
                let n = notices.borrow_and_update().clone();
                if let Some(n) = n {
                    let m = apb::PreemptionNotice {
                        kind: n.kind,
                        deadline_unix_ms: n.deadline_ms,
                        advisory: n.advisory,
                    };
                    if out.send(msg(AgentMsg::Preemption(m))).await.is_err() {
                        return SessionEnd::Retry("send failed".into());
                    }
                }
                false
            }
            () = tokio::time::sleep_until(heard_at + silence), if !lease.is_zero() => {
                return SessionEnd::Retry(format!("no word from {url} for {} ms", silence.as_millis()));
            }
            m = inbound.message() => {
                if matches!(m, Ok(Some(_))) {
                    heard_at = heard();
                }
                match m {
                Ok(Some(apb::SessionResponse { msg: Some(CoordMsg::RunJob(r)) })) => {
                    if let Err(end) = admit(fence, r.term, "RunJob", &r.job_id) {
                        return end;
                    }
                    sup.run(r);
                    false
                }
                Ok(Some(apb::SessionResponse { msg: Some(CoordMsg::StopJob(s)) })) => {
                    if let Err(end) = admit(fence, s.term, "StopJob", &s.job_id) {
                        return end;
                    }
                    sup.stop(s);
                    false
                }
                Ok(Some(apb::SessionResponse { msg: Some(CoordMsg::Shell(o)) })) => {
                    if let Err(end) = admit(fence, o.term, "Shell", "") {
                        return end;
                    }
                    shells.order(o);
                    false
                }
                Ok(Some(_)) => false,
                Ok(None) => return SessionEnd::Retry("coordinator closed the session".into()),
                Err(s) if s.code() == Code::PermissionDenied => {
                    return SessionEnd::Fatal(AgentError::Refused(s.message().to_string()))
                }
                Err(s) => return SessionEnd::Retry(s.to_string()),
            }},
            () = &mut renewal => return SessionEnd::Renew,
            ev = events.recv() => {
                let Some(Event::Report(view)) = ev else { return SessionEnd::Fatal(AgentError::Setup("supervisor stopped".into())) };
                if out.send(msg(AgentMsg::JobReport(view.report.clone()))).await.is_err() {
                    return SessionEnd::Retry("send failed".into());
                }
                start_tailer(&mut tailers, &mut tailing, view, 0, out.clone());
                false
            }
            // An XID: report it now rather than at the next period.
            Ok(()) = urgent.changed() => true,
            _ = heartbeat.tick() => true,
        };
        if beat {
            seq += 1;
            let gpus = cfg.telemetry.latest.borrow().as_ref().clone();
            let hb = apb::Heartbeat {
                seq,
                sent_at_unix_ms: now_ms(),
                gpus,
            };
            if out.send(msg(AgentMsg::Heartbeat(hb))).await.is_err() {
                return SessionEnd::Retry("send failed".into());
            }
        }
    }
}

/// Refuses (and logs) an order from a leader older than one already heard:
/// the session is with a deposed leader, so it ends and the agent looks for
/// the new one.
fn admit(fence: &mut Fence, term: u64, order: &str, job_id: &str) -> Result<(), SessionEnd> {
    fence.admit(term).map_err(|stale| {
        tracing::warn!(job = %job_id, reason = %stale, "{order} refused");
        SessionEnd::Retry(stale.to_string())
    })
}

fn msg(m: AgentMsg) -> apb::SessionRequest {
    apb::SessionRequest { msg: Some(m) }
}

fn read_token(path: &std::path::Path) -> Result<String, AgentError> {
    nembo_proto::client::read_secret(path).map_err(|e| AgentError::Setup(e.to_string()))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn start_tailer(
    set: &mut JoinSet<()>,
    tailing: &mut HashSet<JobKey>,
    job: JobView,
    from: u64,
    out: mpsc::Sender<apb::SessionRequest>,
) {
    let key = JobKey {
        job_id: job.report.job_id.clone(),
        attempt: job.report.attempt,
    };
    if !tailing.insert(key) {
        return;
    }
    set.spawn(tail(job, from, out));
}

/// Ships a job's output file from `offset` until the job has ended and
/// everything it wrote has been sent.
async fn tail(mut job: JobView, mut offset: u64, out: mpsc::Sender<apb::SessionRequest>) {
    let mut buf = vec![0u8; LOG_CHUNK];
    // Poll fast while output flows (a launch shows its first line within
    // tens of ms); back off while a job is quiet, so that a node of
    // long-running jobs costs next to nothing between their lines.
    let mut poll = LOG_POLL;
    loop {
        let final_size = *job.ended.borrow_and_update();
        let n = read_at(&job.log_path, offset, &mut buf).unwrap_or(0);
        if n > 0 {
            let chunk = apb::JobLog {
                job_id: job.report.job_id.clone(),
                attempt: job.report.attempt,
                rank: job.report.rank,
                offset,
                data: buf[..n].to_vec(),
            };
            if out.send(msg(AgentMsg::Log(chunk))).await.is_err() {
                return;
            }
            offset += n as u64;
            poll = LOG_POLL;
            continue;
        }
        if final_size.is_some_and(|f| offset >= f) {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = job.ended.changed() => {}
        }
        poll = (poll * 2).min(LOG_POLL_IDLE);
    }
}

fn read_at(path: &std::path::Path, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    f.read(buf)
}
