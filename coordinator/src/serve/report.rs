//! A follower's load balancer request rates, sent to the leader for its
//! autoscaler (telemetry: never through Raft).

use std::sync::Arc;

/// How often a member reports its load balancers' rates to the leader.
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Sends this member's request rates to the leader while it follows (the
/// leader counts its own).
pub async fn report_load(
    ctx: Arc<crate::context::Ctx>,
    mut tls: crate::replication::peer::PeerTls,
) {
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let view = ctx.raft.view();
        if view.is_leader() || view.leader_id == 0 || view.state.services.is_empty() {
            continue;
        }
        let Some(url) = view.members.get(&view.leader_id) else {
            continue;
        };
        let now_s = nembo_proto::clock::now_ms() / 1000;
        let qps = view
            .state
            .services
            .keys()
            .map(|name| (name.clone(), ctx.serve.load.qps(name, now_s)))
            .collect();
        let req = nembo_proto::raft::v1::ReportLoadRequest { from: view.id, qps };
        match tls.client(url) {
            Ok(mut c) => {
                let sent = tokio::time::timeout(REPORT_EVERY, c.report_load(req)).await;
                if let Ok(Err(e)) = sent {
                    tracing::debug!(leader = view.leader_id, error = %e, "load report");
                }
            }
            Err(e) => tracing::debug!(leader = view.leader_id, error = %e, "load report"),
        }
    }
}
