//! The Nembo node agent: one small process per node. It keeps one session
//! with the coordinators, runs jobs (setup, then run) in their own process
//! groups, ships their output, and survives both its own restarts and
//! coordinator outages without losing or re-running a job.
//!
//! It links no Raft and no provider code: its only dependency on the
//! coordinator side is the `nembo-proto` contract.

pub mod checkpoint;
pub mod container;
pub mod fence;
pub mod gpu;
pub mod identity;
pub mod lease;
pub mod preempt;
mod s3;
pub mod session;
pub mod shell;
pub mod stagein;
pub mod storage;
pub mod supervisor;
pub mod telemetry;

pub use session::{AgentConfig, AgentError};

/// How long before a preemption deadline the attempts the coordinators would
/// replace are stopped (each has a second of grace within it).
const STOP_BEFORE_DEADLINE_MS: i64 = 2_000;

/// The coordinators count a preempted node gone at its deadline and start
/// what it ran elsewhere, so nothing they would replace may still run here
/// by then: not even an attempt placed here as the notice came, which was
/// never told (two live attempts of one job, found by the hour-long soak).
/// A notice without a deadline is taken as 30 s, as the coordinators take it.
fn stop_by_the_deadline(jobs: &supervisor::Supervisor, n: &preempt::Notice) {
    let now = nembo_proto::clock::now_ms();
    let deadline = if n.deadline_ms > 0 {
        n.deadline_ms
    } else {
        now + 30_000
    };
    let wait = u64::try_from(deadline - STOP_BEFORE_DEADLINE_MS - now).unwrap_or(0);
    let (jobs, kind) = (jobs.clone(), n.kind.clone());
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
        jobs.stop_replaceable(
            std::time::Duration::from_secs(1),
            format!(
                "stopped: the node's preemption deadline ({kind}) is here, and the \
                 coordinators start this job elsewhere"
            ),
        );
    });
}

/// Runs the agent until the coordinator retires the node.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    std::fs::create_dir_all(cfg.work_dir.join("jobs"))
        .map_err(|e| AgentError::Setup(format!("{}: {e}", cfg.work_dir.display())))?;
    let (sup, events) = supervisor::Supervisor::start(cfg.work_dir.clone(), cfg.jobs.clone());
    // The newest notice: every session reports it (again) to the coordinators.
    let (notice_tx, notice_rx) = tokio::sync::watch::channel(None);
    let mut notices = preempt::start(cfg.watch.clone());
    let jobs = sup.clone();
    let azure = cfg.watch.azure.clone();
    tokio::spawn(async move {
        while let Some(n) = notices.recv().await {
            tracing::warn!(kind = %n.kind, deadline = n.deadline_ms, advisory = n.advisory, "preemption notice");
            notice_tx.send_replace(Some(n.clone()));
            if n.advisory {
                continue;
            }
            stop_by_the_deadline(&jobs, &n);
            // Jobs checkpoint and exit; Azure hears that the VM may go.
            jobs.notice(n.clone()).await;
            if let (Some(base), Some(id)) = (&azure, &n.azure_event) {
                preempt::ack_azure(base, id).await;
            }
        }
    });
    let (contact_tx, contact_rx) = tokio::sync::watch::channel(None);
    tokio::spawn(lease::enforce(
        contact_rx,
        sup.clone(),
        cfg.work_dir.clone(),
    ));
    session::run(cfg, sup, events, notice_rx, contact_tx).await
}
