//! Named clusters: list them, stop, start, tear down, set autostop. A
//! user acts on their own clusters; an admin on any.

use std::ops::Bound::{Excluded, Unbounded};

use nembo_domain::state::{Cluster, Command, State};
use nembo_proto::clock::now_ms;
use nembo_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::gate::{audited, principal, Principal};
use super::paging::PageRequest;
use super::{convert, propose_change};
use crate::context::Ctx;
use crate::error::CoordinatorError;

pub async fn list_clusters(
    ctx: &Ctx,
    request: Request<pb::ListClustersRequest>,
) -> Result<Response<pb::ListClustersResponse>, Status> {
    let req = request.into_inner();
    let page = PageRequest::<String>::new("clusters", req.page_size, &req.page_token)?;
    let view = ctx.raft.view();
    let now = now_ms();
    let after = page.after.clone().map_or(Unbounded, Excluded);
    let clusters = view
        .state
        .clusters
        .range((after, Unbounded))
        .filter(|(name, _)| req.names.is_empty() || req.names.contains(name))
        .map(|(name, c)| (name.clone(), convert::cluster_to_proto(&view.state, c, now)));
    let (mut clusters, next_page_token) = page.take(clusters);
    if req.refresh {
        for c in &mut clusters {
            c.provider_view = provider_view(ctx, &view.state, &c.node_ids).await;
        }
    }
    Ok(Response::new(pb::ListClustersResponse {
        clusters,
        next_page_token,
    }))
}

/// What each node's provider says it holds for it, beside what the
/// coordinators think: `node-3 (Ready): aws says running (i-0abc)`.
async fn provider_view(ctx: &Ctx, state: &State, node_ids: &[String]) -> Vec<String> {
    let mut lines = Vec::new();
    for id in node_ids {
        let Some(n) = state.nodes.get(id) else {
            continue;
        };
        let said = match ctx.providers.get(&n.provider) {
            None => format!("provider {} is not configured here", n.provider),
            Some(p) => match p.describe(id).await {
                Ok(Some(i)) if i.instance_id.is_empty() => {
                    format!("{} says {}", n.provider, i.state)
                }
                Ok(Some(i)) => format!("{} says {} ({})", n.provider, i.state, i.instance_id),
                Ok(None) => format!("{} holds no machine for it", n.provider),
                Err(e) => format!("{} did not answer: {e}", n.provider),
            },
        };
        lines.push(format!("{id} ({:?}): {said}", n.state));
    }
    lines
}

/// The cluster `name`, if the caller may act on it.
pub(super) fn owned<'a>(
    state: &'a State,
    who: &Principal,
    name: &str,
) -> Result<&'a Cluster, Status> {
    let Some(c) = state.clusters.get(name) else {
        return Err(CoordinatorError::NotFound(format!("cluster {name} not found")).into());
    };
    if !who.owns(&c.owner) {
        return Err(CoordinatorError::PermissionDenied(format!(
            "cluster {name} belongs to {}",
            c.owner
        ))
        .into());
    }
    Ok(c)
}

/// Proposes `cmd` about a cluster the caller owns, and answers with the
/// cluster as it is after.
async fn change(
    ctx: &Ctx,
    who: &Principal,
    name: &str,
    cmd: Command,
) -> Result<Option<pb::Cluster>, Status> {
    owned(&ctx.raft.view().state, who, name)?;
    propose_change(ctx, cmd).await?;
    let view = ctx.raft.view();
    let now = now_ms();
    Ok(view
        .state
        .clusters
        .get(name)
        .map(|c| convert::cluster_to_proto(&view.state, c, now)))
}

pub async fn stop_cluster(
    ctx: &Ctx,
    request: Request<pb::StopClusterRequest>,
) -> Result<Response<pb::StopClusterResponse>, Status> {
    let who = principal(&request)?;
    let name = request.into_inner().name;
    let cmd = Command::StopCluster {
        name: name.clone(),
        at_ms: now_ms(),
    };
    let cluster = change(ctx, &who, &name, cmd).await?;
    Ok(audited(
        pb::StopClusterResponse { cluster },
        format!("cluster {name}"),
    ))
}

pub async fn start_cluster(
    ctx: &Ctx,
    request: Request<pb::StartClusterRequest>,
) -> Result<Response<pb::StartClusterResponse>, Status> {
    let who = principal(&request)?;
    let name = request.into_inner().name;
    let cmd = Command::StartCluster {
        name: name.clone(),
        at_ms: now_ms(),
    };
    let cluster = change(ctx, &who, &name, cmd).await?;
    Ok(audited(
        pb::StartClusterResponse { cluster },
        format!("cluster {name}"),
    ))
}

pub async fn down_cluster(
    ctx: &Ctx,
    request: Request<pb::DownClusterRequest>,
) -> Result<Response<pb::DownClusterResponse>, Status> {
    let who = principal(&request)?;
    let name = request.into_inner().name;
    let node_ids = {
        let view = ctx.raft.view();
        let c = owned(&view.state, &who, &name)?;
        view.state
            .cluster_own_nodes(c)
            .map(|n| n.id.clone())
            .collect()
    };
    let cmd = Command::DownCluster {
        name: name.clone(),
        at_ms: now_ms(),
    };
    change(ctx, &who, &name, cmd).await?;
    Ok(audited(
        pb::DownClusterResponse { node_ids },
        format!("cluster {name}"),
    ))
}

pub async fn set_autostop(
    ctx: &Ctx,
    request: Request<pb::SetAutostopRequest>,
) -> Result<Response<pb::SetAutostopResponse>, Status> {
    let who = principal(&request)?;
    let req = request.into_inner();
    let setting = req.autostop.ok_or_else(|| {
        CoordinatorError::InvalidArgument("autostop: give a setting (disabled cancels)".into())
    })?;
    let autostop = convert::autostop_from_proto(&setting, "autostop")
        .map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))?
        .enabled();
    let cmd = Command::SetAutostop {
        name: req.name.clone(),
        autostop,
        at_ms: now_ms(),
    };
    let cluster = change(ctx, &who, &req.name, cmd).await?;
    Ok(audited(
        pb::SetAutostopResponse { cluster },
        format!("cluster {}", req.name),
    ))
}
