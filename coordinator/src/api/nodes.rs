//! Nodes: list them, take them down, revoke one, and (for tests and drills)
//! make a provider send a node a preemption notice.

use std::ops::Bound::{Excluded, Unbounded};

use nembo_domain::state::Command;
use nembo_proto::clock::{millis, now_ms, timestamp};
use nembo_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::gate::audited;
use super::paging::PageRequest;
use super::{convert, propose_change};
use crate::context::Ctx;
use crate::error::CoordinatorError;

pub async fn list_nodes(
    ctx: &Ctx,
    request: Request<pb::ListNodesRequest>,
) -> Result<Response<pb::ListNodesResponse>, Status> {
    let req = request.into_inner();
    let page = PageRequest::<String>::new("nodes", req.page_size, &req.page_token)?;
    let view = ctx.raft.view();
    let after = page.after.clone().map_or(Unbounded, Excluded);
    let nodes = view.state.nodes.range((after, Unbounded));
    let (nodes, next_page_token) =
        page.take(nodes.map(|(id, n)| (id.clone(), convert::node_to_proto(&view.state, n))));
    Ok(Response::new(pb::ListNodesResponse {
        nodes,
        next_page_token,
    }))
}

pub async fn down(
    ctx: &Ctx,
    request: Request<pb::DownRequest>,
) -> Result<Response<pb::DownResponse>, Status> {
    let req = request.into_inner();
    let view = ctx.raft.view();
    let node_ids: Vec<String> = if req.all {
        view.state
            .nodes
            .values()
            .filter(|n| !n.state.is_final())
            .map(|n| n.id.clone())
            .collect()
    } else {
        if req.node_ids.is_empty() {
            return Err(CoordinatorError::InvalidArgument(
                "node_ids: name at least one node, or set all".into(),
            )
            .into());
        }
        req.node_ids
    };
    if node_ids.is_empty() {
        return Ok(Response::new(pb::DownResponse { node_ids }));
    }
    propose_change(
        ctx,
        Command::TerminateNodes {
            node_ids: node_ids.clone(),
            at_ms: now_ms(),
        },
    )
    .await?;
    let target = format!("nodes {}", node_ids.join(","));
    Ok(audited(pb::DownResponse { node_ids }, target))
}

pub async fn revoke_node(
    ctx: &Ctx,
    request: Request<pb::RevokeNodeRequest>,
) -> Result<Response<pb::RevokeNodeResponse>, Status> {
    let node_id = request.into_inner().node_id;
    propose_change(
        ctx,
        Command::RevokeNode {
            node_id: node_id.clone(),
            at_ms: now_ms(),
        },
    )
    .await?;
    Ok(audited(
        pb::RevokeNodeResponse {},
        format!("node {node_id}"),
    ))
}

pub async fn inject_preemption(
    ctx: &Ctx,
    request: Request<pb::InjectPreemptionRequest>,
) -> Result<Response<pb::InjectPreemptionResponse>, Status> {
    let r = request.into_inner();
    let view = ctx.raft.view();
    let node = view
        .state
        .nodes
        .get(&r.node_id)
        .ok_or_else(|| Status::not_found(format!("node_id: no node {}", r.node_id)))?;
    if node.state.is_final() {
        return Err(Status::failed_precondition(format!(
            "node {} is {:?}",
            r.node_id, node.state
        )));
    }
    let provider = ctx.providers.get(&node.provider).ok_or_else(|| {
        Status::failed_precondition(format!("provider '{}' is not configured", node.provider))
    })?;
    let format = match pb::NoticeFormat::try_from(r.format) {
        Ok(pb::NoticeFormat::Unspecified | pb::NoticeFormat::Aws) => "aws",
        Ok(pb::NoticeFormat::Gcp) => "gcp",
        Ok(pb::NoticeFormat::Azure) => "azure",
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "format: {} is not a NoticeFormat",
                r.format
            )))
        }
    };
    let lead = match millis(r.warning.as_ref()) {
        None | Some(0) => 30_000,
        Some(ms) if !(0..=24 * 3600 * 1000).contains(&ms) => {
            return Err(Status::invalid_argument(format!(
                "warning: {ms} ms is not between 0 and 24 h"
            )))
        }
        Some(ms) => ms,
    };
    let deadline = now_ms() + lead;
    provider
        .inject_notice(&r.node_id, format, deadline)
        .await
        .map_err(|e| match e {
            crate::provider::ProviderError::InvalidRequest(m) => Status::invalid_argument(m),
            other => Status::unavailable(other.to_string()),
        })?;
    Ok(audited(
        pb::InjectPreemptionResponse {
            deadline: timestamp(deadline),
        },
        format!("node {}", r.node_id),
    ))
}
