//! The coordinators themselves: status, adding and removing members, and
//! moving the leadership.

use std::time::Duration;

use nembo_domain::access::AccessCommand;
use nembo_domain::state::{Command, Outcome};
use nembo_proto::clock::now_ms;
use nembo_proto::v1 as pb;
use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};
use tonic::{Request, Response, Status};

use super::gate::audited;
use super::rejection;
use crate::context::Ctx;
use crate::error::CoordinatorError;
use crate::replication::raft::ProposeError;

/// How long a new member may take to catch up before it is promoted.
const MEMBER_CATCH_UP: Duration = Duration::from_secs(30);

pub async fn get_cluster_status(
    ctx: &Ctx,
    _request: Request<pb::GetClusterStatusRequest>,
) -> Result<Response<pb::GetClusterStatusResponse>, Status> {
    Ok(Response::new(pb::GetClusterStatusResponse {
        status: Some(cluster_status(ctx)),
    }))
}

pub async fn add_member(
    ctx: &Ctx,
    request: Request<pb::AddMemberRequest>,
) -> Result<Response<pb::AddMemberResponse>, Status> {
    let req = request.into_inner();
    if req.id == 0 {
        return Err(CoordinatorError::InvalidArgument("id: member ids start at 1".into()).into());
    }
    if !req.url.starts_with("https://") {
        return Err(CoordinatorError::InvalidArgument(format!(
            "url: '{}' must be an https:// URL",
            req.url
        ))
        .into());
    }
    let view = ctx.raft.view();
    if view.voters.contains(&req.id) {
        return Err(CoordinatorError::FailedPrecondition(format!(
            "member {} is already a voter",
            req.id
        ))
        .into());
    }
    let context = serde_json::json!({ "url": req.url })
        .to_string()
        .into_bytes();
    if !view.learners.contains(&req.id) {
        change(ctx, ConfChangeType::AddLearnerNode, req.id, context.clone()).await?;
        // Then compact, so the new member starts from a snapshot that
        // carries a configuration naming it (raft-rs refuses one that
        // does not) and everything it has never seen.
        ctx.raft
            .compact()
            .await
            .map_err(CoordinatorError::Storage)?;
    }
    // Promote only once the learner holds the log: a voter that lags
    // would weaken the quorum.
    let deadline = tokio::time::Instant::now() + MEMBER_CATCH_UP;
    loop {
        match ctx.raft.progress(req.id).await {
            Some((matched, last)) if matched >= last => break,
            None => return Err(CoordinatorError::Propose(ProposeError::Dropped).into()),
            _ if tokio::time::Instant::now() > deadline => {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "member {} did not catch up within {}s; it stays a learner (is it running with --join?)",
                    req.id,
                    MEMBER_CATCH_UP.as_secs()
                ))
                .into())
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    change(ctx, ConfChangeType::AddNode, req.id, context).await?;
    let status = Some(cluster_status(ctx));
    Ok(audited(
        pb::AddMemberResponse { status },
        format!("member {}", req.id),
    ))
}

pub async fn remove_member(
    ctx: &Ctx,
    request: Request<pb::RemoveMemberRequest>,
) -> Result<Response<pb::RemoveMemberResponse>, Status> {
    let id = request.into_inner().id;
    let view = ctx.raft.view();
    if !view.voters.contains(&id) && !view.learners.contains(&id) {
        return Err(CoordinatorError::NotFound(format!("member {id} not found")).into());
    }
    if id == view.id {
        return Err(CoordinatorError::FailedPrecondition(
            "this member leads: transfer leadership first (nembo admin members transfer-leader)"
                .into(),
        )
        .into());
    }
    if view.voters == [id] {
        return Err(
            CoordinatorError::FailedPrecondition("cannot remove the last voter".into()).into(),
        );
    }
    change(ctx, ConfChangeType::RemoveNode, id, Vec::new()).await?;
    // Its certificates stay valid until they expire: the state says that
    // none of them speaks for a member any more. Certificates start a
    // minute before they are issued (clock skew), in whole seconds, so one
    // issued from now on, for the member rejoining under its id, is still
    // taken (and so is one issued in the minute before it left).
    ctx.raft
        .propose(Command::Access(AccessCommand::RetireMember {
            member_id: id,
            at_ms: now_ms() / 1000 * 1000 - 61_000,
        }))
        .await
        .map_err(CoordinatorError::from)?;
    let status = Some(cluster_status(ctx));
    Ok(audited(
        pb::RemoveMemberResponse { status },
        format!("member {id}"),
    ))
}

pub async fn transfer_leader(
    ctx: &Ctx,
    request: Request<pb::TransferLeaderRequest>,
) -> Result<Response<pb::TransferLeaderResponse>, Status> {
    let id = request.into_inner().id;
    if !ctx.raft.view().voters.contains(&id) {
        return Err(CoordinatorError::NotFound(format!("voter {id} not found")).into());
    }
    ctx.raft.transfer_leader(id);
    let mut views = ctx.raft.subscribe();
    let moved = tokio::time::timeout(
        Duration::from_secs(5),
        views.wait_for(|v| v.leader_id == id),
    )
    .await;
    if !matches!(moved, Ok(Ok(_))) {
        return Err(Status::unavailable(format!(
            "leadership did not move to {id}; retry"
        )));
    }
    let status = Some(cluster_status(ctx));
    Ok(audited(
        pb::TransferLeaderResponse { status },
        format!("member {id}"),
    ))
}

fn cluster_status(ctx: &Ctx) -> pb::ClusterStatus {
    let v = ctx.raft.view();
    let member = |id: &u64, is_learner: bool| pb::Member {
        id: *id,
        address: v.members.get(id).cloned().unwrap_or_default(),
        is_leader: *id == v.leader_id,
        is_learner,
    };
    pb::ClusterStatus {
        members: v
            .voters
            .iter()
            .map(|id| member(id, false))
            .chain(v.learners.iter().map(|id| member(id, true)))
            .collect(),
        leader_id: v.leader_id,
        term: v.term,
        commit_index: v.commit,
        applied_index: v.applied,
        snapshot_index: v.snapshot_index,
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// One single-step membership change (never a joint configuration).
async fn change(
    ctx: &Ctx,
    kind: ConfChangeType,
    id: u64,
    context: Vec<u8>,
) -> Result<(), CoordinatorError> {
    let mut single = ConfChangeSingle::default();
    single.set_change_type(kind);
    single.node_id = id;
    let mut cc = ConfChangeV2::default();
    cc.set_changes(vec![single].into());
    cc.context = context.into();
    match ctx.raft.change_membership(cc).await? {
        Outcome::Rejected(r) => Err(rejection(r)),
        _ => Ok(()),
    }
}
