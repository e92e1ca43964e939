//! The public `nembo.v1.CoordinatorService`, one module per resource, as
//! Nomad splits its endpoints. Every handler runs where the gate sent it
//! (the leader, except for the calls any member answers: [`gate::route`]),
//! so none of them forwards anything.

pub mod access;
pub mod blobs;
pub mod catalog;
pub mod clusters;
pub mod convert;
pub mod fleet;
pub mod forward;
pub mod gate;
pub mod jobs;
pub mod members;
pub mod nodes;
pub mod paging;
pub mod services;
pub mod shell;

use std::sync::Arc;

use nembo_domain::state::{Command, Outcome, Rejection};
use nembo_proto::v1 as pb;
use nembo_proto::v1::coordinator_service_server::CoordinatorService;
use tonic::{Request, Response, Status};

use crate::context::Ctx;
use crate::error::CoordinatorError;

/// Serves the public API from the coordinator's context.
pub struct Api {
    ctx: Arc<Ctx>,
}

impl Api {
    /// The service over `ctx`.
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Self { ctx }
    }
}

fn rejection(r: Rejection) -> CoordinatorError {
    match r {
        Rejection::NoSuchJob(_) | Rejection::NoSuchNode(_) | Rejection::NoSuchCluster(_) => {
            CoordinatorError::NotFound(r.to_string())
        }
        Rejection::Conflict(m) => CoordinatorError::FailedPrecondition(m),
    }
}

/// Proposes `cmd`; a command the state rejects is an error.
async fn propose_change(ctx: &Ctx, cmd: Command) -> Result<(), CoordinatorError> {
    match ctx.raft.propose(cmd).await? {
        Outcome::Rejected(r) => Err(rejection(r)),
        _ => Ok(()),
    }
}

#[tonic::async_trait]
impl CoordinatorService for Api {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        jobs::submit_job(&self.ctx, request).await
    }

    async fn find_missing_blobs(
        &self,
        request: Request<pb::FindMissingBlobsRequest>,
    ) -> Result<Response<pb::FindMissingBlobsResponse>, Status> {
        blobs::find_missing_blobs(&self.ctx, request).await
    }

    async fn put_blobs(
        &self,
        request: Request<tonic::Streaming<pb::PutBlobsRequest>>,
    ) -> Result<Response<pb::PutBlobsResponse>, Status> {
        blobs::put_blobs(&self.ctx, request).await
    }

    async fn dry_run(
        &self,
        request: Request<pb::DryRunRequest>,
    ) -> Result<Response<pb::DryRunResponse>, Status> {
        jobs::dry_run(&self.ctx, request).await
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        jobs::get_job(&self.ctx, request).await
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        jobs::list_jobs(&self.ctx, request).await
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        jobs::cancel_job(&self.ctx, request).await
    }

    type StreamLogsStream = jobs::LogStream;

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        jobs::stream_logs(&self.ctx, request).await
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        nodes::list_nodes(&self.ctx, request).await
    }

    async fn down(
        &self,
        request: Request<pb::DownRequest>,
    ) -> Result<Response<pb::DownResponse>, Status> {
        nodes::down(&self.ctx, request).await
    }

    async fn list_clusters(
        &self,
        request: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        clusters::list_clusters(&self.ctx, request).await
    }

    async fn stop_cluster(
        &self,
        request: Request<pb::StopClusterRequest>,
    ) -> Result<Response<pb::StopClusterResponse>, Status> {
        clusters::stop_cluster(&self.ctx, request).await
    }

    async fn start_cluster(
        &self,
        request: Request<pb::StartClusterRequest>,
    ) -> Result<Response<pb::StartClusterResponse>, Status> {
        clusters::start_cluster(&self.ctx, request).await
    }

    async fn down_cluster(
        &self,
        request: Request<pb::DownClusterRequest>,
    ) -> Result<Response<pb::DownClusterResponse>, Status> {
        clusters::down_cluster(&self.ctx, request).await
    }

    async fn set_autostop(
        &self,
        request: Request<pb::SetAutostopRequest>,
    ) -> Result<Response<pb::SetAutostopResponse>, Status> {
        clusters::set_autostop(&self.ctx, request).await
    }

    type ShellStream = shell::ShellStream;

    async fn shell(
        &self,
        request: Request<tonic::Streaming<pb::ShellRequest>>,
    ) -> Result<Response<Self::ShellStream>, Status> {
        shell::shell(&self.ctx, request).await
    }

    async fn revoke_node(
        &self,
        request: Request<pb::RevokeNodeRequest>,
    ) -> Result<Response<pb::RevokeNodeResponse>, Status> {
        nodes::revoke_node(&self.ctx, request).await
    }

    async fn inject_preemption(
        &self,
        request: Request<pb::InjectPreemptionRequest>,
    ) -> Result<Response<pb::InjectPreemptionResponse>, Status> {
        nodes::inject_preemption(&self.ctx, request).await
    }

    async fn get_fleet_metrics(
        &self,
        request: Request<pb::GetFleetMetricsRequest>,
    ) -> Result<Response<pb::GetFleetMetricsResponse>, Status> {
        fleet::get_fleet_metrics(&self.ctx, request).await
    }

    type WatchFleetMetricsStream = fleet::FleetStream;

    async fn watch_fleet_metrics(
        &self,
        request: Request<pb::WatchFleetMetricsRequest>,
    ) -> Result<Response<Self::WatchFleetMetricsStream>, Status> {
        fleet::watch_fleet_metrics(&self.ctx, request).await
    }

    async fn get_gpu_history(
        &self,
        request: Request<pb::GetGpuHistoryRequest>,
    ) -> Result<Response<pb::GetGpuHistoryResponse>, Status> {
        fleet::get_gpu_history(&self.ctx, request).await
    }

    async fn list_offerings(
        &self,
        request: Request<pb::ListOfferingsRequest>,
    ) -> Result<Response<pb::ListOfferingsResponse>, Status> {
        catalog::list_offerings(&self.ctx, request).await
    }

    async fn check_providers(
        &self,
        request: Request<pb::CheckProvidersRequest>,
    ) -> Result<Response<pb::CheckProvidersResponse>, Status> {
        catalog::check_providers(&self.ctx, request).await
    }

    async fn refresh_catalog(
        &self,
        request: Request<pb::RefreshCatalogRequest>,
    ) -> Result<Response<pb::RefreshCatalogResponse>, Status> {
        catalog::refresh_catalog(&self.ctx, request).await
    }

    async fn get_cost_report(
        &self,
        request: Request<pb::GetCostReportRequest>,
    ) -> Result<Response<pb::GetCostReportResponse>, Status> {
        catalog::get_cost_report(&self.ctx, request).await
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        access::who_am_i(&self.ctx, request).await
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        access::create_user(&self.ctx, request).await
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        access::list_users(&self.ctx, request).await
    }

    async fn revoke_user(
        &self,
        request: Request<pb::RevokeUserRequest>,
    ) -> Result<Response<pb::RevokeUserResponse>, Status> {
        access::revoke_user(&self.ctx, request).await
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        access::create_join_token(&self.ctx, request).await
    }

    async fn list_join_tokens(
        &self,
        request: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
        access::list_join_tokens(&self.ctx, request).await
    }

    async fn revoke_join_token(
        &self,
        request: Request<pb::RevokeJoinTokenRequest>,
    ) -> Result<Response<pb::RevokeJoinTokenResponse>, Status> {
        access::revoke_join_token(&self.ctx, request).await
    }

    async fn get_audit_log(
        &self,
        request: Request<pb::GetAuditLogRequest>,
    ) -> Result<Response<pb::GetAuditLogResponse>, Status> {
        access::get_audit_log(&self.ctx, request).await
    }

    async fn serve_up(
        &self,
        request: Request<pb::ServeUpRequest>,
    ) -> Result<Response<pb::ServeUpResponse>, Status> {
        services::serve_up(&self.ctx, request).await
    }

    async fn serve_update(
        &self,
        request: Request<pb::ServeUpdateRequest>,
    ) -> Result<Response<pb::ServeUpdateResponse>, Status> {
        services::serve_update(&self.ctx, request).await
    }

    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        services::list_services(&self.ctx, request).await
    }

    async fn serve_down(
        &self,
        request: Request<pb::ServeDownRequest>,
    ) -> Result<Response<pb::ServeDownResponse>, Status> {
        services::serve_down(&self.ctx, request).await
    }

    async fn get_cluster_status(
        &self,
        request: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Response<pb::GetClusterStatusResponse>, Status> {
        members::get_cluster_status(&self.ctx, request).await
    }

    async fn add_member(
        &self,
        request: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::AddMemberResponse>, Status> {
        members::add_member(&self.ctx, request).await
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        members::remove_member(&self.ctx, request).await
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        members::transfer_leader(&self.ctx, request).await
    }
}
