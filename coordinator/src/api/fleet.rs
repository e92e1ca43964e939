//! GPU telemetry of the fleet: the newest readings, a live stream of them,
//! and one GPU's history.

use std::sync::Arc;
use std::time::Duration;

use nembo_proto::clock::{duration, millis, now_ms, timestamp};
use nembo_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::context::Ctx;
use crate::error::CoordinatorError;
use crate::telemetry::fleet::LabelCache;

/// The stream of fleet readings.
pub type FleetStream = ReceiverStream<Result<pb::WatchFleetMetricsResponse, Status>>;

pub async fn get_fleet_metrics(
    ctx: &Ctx,
    request: Request<pb::GetFleetMetricsRequest>,
) -> Result<Response<pb::GetFleetMetricsResponse>, Status> {
    let filter = request.into_inner().filter.unwrap_or_default();
    Ok(Response::new(pb::GetFleetMetricsResponse {
        gpus: fleet_metrics(ctx, &filter).await,
    }))
}

pub async fn watch_fleet_metrics(
    ctx: &Arc<Ctx>,
    request: Request<pb::WatchFleetMetricsRequest>,
) -> Result<Response<FleetStream>, Status> {
    let req = request.into_inner();
    let filter = req.filter.unwrap_or_default();
    let interval = match millis(req.interval.as_ref()) {
        None | Some(0) => Duration::from_secs(1),
        Some(ms) if ms < 0 => {
            return Err(
                CoordinatorError::InvalidArgument(format!("interval: {ms} ms is negative")).into(),
            )
        }
        Some(ms) => Duration::from_millis(ms.max(100) as u64),
    };
    let (tx, rx) = mpsc::channel(4);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Telemetry follows the agents to the new leader: a deposed one
            // ends the stream, and the client reopens it (at the leader).
            if !ctx.raft.view().is_leader() {
                let moved = Status::unavailable("leadership moved; reopen the stream");
                let _ = tx.send(Err(moved)).await;
                return;
            }
            let gpus = fleet_metrics(&ctx, &filter).await;
            if tx
                .send(Ok(pb::WatchFleetMetricsResponse { gpus }))
                .await
                .is_err()
            {
                return; // the client went away
            }
        }
    });
    Ok(Response::new(ReceiverStream::new(rx)))
}

pub async fn get_gpu_history(
    ctx: &Ctx,
    request: Request<pb::GetGpuHistoryRequest>,
) -> Result<Response<pb::GetGpuHistoryResponse>, Status> {
    let req = request.into_inner();
    let points = ctx
        .fleet
        .history(&req.node_id, req.index, req.minutes)
        .await
        .ok_or_else(|| {
            CoordinatorError::NotFound(format!(
                "node_id/index: no GPU {} reporting on node {:?}",
                req.index, req.node_id
            ))
        })?;
    let points = points
        .into_iter()
        .map(|p| pb::GpuPoint {
            time: timestamp(i64::from(p.at_s) * 1000),
            gpu_util_percent: u32::from(p.util),
            mem_util_percent: u32::from(p.mem_util),
            temperature_c: u32::from(p.temp_c),
            power_w: u32::from(p.power_w),
            fb_used_mib: u64::from(p.fb_used_mib),
            ecc_uncorrected: p.flags & 1 != 0,
        })
        .collect();
    Ok(Response::new(pb::GetGpuHistoryResponse { points }))
}

/// Every GPU with labels, filtered. Served by the leader, which holds the
/// agents' sessions and so their telemetry.
async fn fleet_metrics(ctx: &Ctx, req: &pb::GpuFilter) -> Vec<pb::GpuMetrics> {
    let view = ctx.raft.view();
    let now = now_ms();
    let mut nodes = LabelCache::default();
    ctx.fleet
        .snapshot()
        .await
        .into_iter()
        .filter(|(node, _)| req.node_id.is_empty() || *node == req.node_id)
        .filter(|(_, g)| req.model.is_empty() || g.identity.model == req.model)
        .map(|(node, g)| {
            let n = nodes.get(&view.state, &node).clone();
            pb::GpuMetrics {
                provider: n.provider,
                region: n.region,
                job_ids: n.jobs,
                identity: Some(g.identity),
                age: g
                    .latest
                    .as_ref()
                    .map(|_| duration((now - g.received_at_ms).max(0))),
                latest: g.latest,
                driver_version: g.driver_version,
                node_simulated: n.simulated,
                node_id: node,
            }
        })
        .filter(|g| req.job_id.is_empty() || g.job_ids.contains(&req.job_id))
        .collect()
}
