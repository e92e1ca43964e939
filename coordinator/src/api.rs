//! The public `nembo.v1.Coordinator` service.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nembo_domain::optimizer;
use nembo_domain::scheduler::{self, Placement, Round};
use nembo_domain::state::{Command, JobId, Outcome, RankOutcome, Rejection};
use nembo_domain::task::{self, TaskSpec};
use nembo_proto::v1 as pb;
use nembo_proto::v1::coordinator_server::Coordinator;
use nembo_proto::MAX_TASK_BYTES;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::error::CoordinatorError;
use crate::fleet::LabelCache;
use crate::gate::{audit_record, audited, mark_audited, on_behalf, principal, Principal};
use crate::logs::LogKey;
use crate::raft::ProposeError;
use crate::server::Ctx;
use nembo_domain::access::{AccessCommand, JoinToken, Role};
use nembo_proto::clock::now_ms;
use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};

/// How long a follower of a finished job's logs waits for output still in
/// flight from a node whose final log size never arrived.
const LOG_DRAIN_GRACE: Duration = Duration::from_secs(10);
const LOG_CHUNK: usize = 64 * 1024;
const MAX_IDEMPOTENCY_KEY: usize = 256;
/// How long a new member may take to catch up before it is promoted.
const MEMBER_CATCH_UP: Duration = Duration::from_secs(30);

/// Serves the public API from the coordinator's context.
pub struct Api {
    ctx: Arc<Ctx>,
}

impl Api {
    /// The service over `ctx`.
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Self { ctx }
    }

    fn cluster_status(&self) -> pb::ClusterStatus {
        let v = self.ctx.raft.view();
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
        &self,
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
        match self.ctx.raft.change_membership(cc).await? {
            Outcome::Rejected(r) => Err(rejection(r)),
            _ => Ok(()),
        }
    }

    /// The spec with every secret sealed: the Raft log and snapshots never
    /// hold a secret in plain text.
    fn sealed(&self, mut spec: TaskSpec) -> TaskSpec {
        for (name, value) in spec.secrets.iter_mut() {
            *value = self.ctx.secrets.seal(name, value);
        }
        spec
    }

    fn parse_request(&self, req: &pb::SubmitJobRequest) -> Result<TaskSpec, CoordinatorError> {
        let overrides: BTreeMap<String, String> = req.env_overrides.clone();
        let size = prost::Message::encoded_len(req);
        if size > MAX_TASK_BYTES {
            return Err(CoordinatorError::TooLarge(format!(
                "task is {size} bytes; the limit is {MAX_TASK_BYTES}"
            )));
        }
        if req.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(CoordinatorError::InvalidArgument(format!(
                "idempotency_key: must be at most {MAX_IDEMPOTENCY_KEY} bytes"
            )));
        }
        let mut spec = match &req.task {
            Some(pb::submit_job_request::Task::TaskYaml(y)) => {
                task::parse_task_yaml(y, &overrides)?
            }
            Some(pb::submit_job_request::Task::Spec(s)) => convert::spec_from_proto(s, &overrides)?,
            None => {
                return Err(CoordinatorError::InvalidArgument(
                    "task: give task_yaml or spec".into(),
                ))
            }
        };
        if let Some(w) = &spec.workdir {
            if !w.starts_with('/') {
                return Err(CoordinatorError::InvalidArgument(format!(
                    "workdir: '{w}' must be an absolute path (the CLI resolves relative ones)"
                )));
            }
        }
        // job_recovery only means something to a managed job: say so
        // rather than ignore it.
        if spec.recovery.is_some() && !req.managed {
            return Err(CoordinatorError::InvalidArgument(
                "resources.job_recovery: only managed jobs recover; launch with `nembo jobs launch`"
                    .into(),
            ));
        }
        spec.managed = req.managed;
        optimizer::check_feasible(&spec, &self.ctx.offerings)?;
        Ok(spec)
    }
}

/// A forwarded call whose connection to the leader broke says nothing about
/// the call: report it as UNAVAILABLE, which clients retry.
fn forwarded<T>(r: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
    r.map_err(|s| match s.code() {
        tonic::Code::Unknown | tonic::Code::Cancelled
            if s.message().contains("transport") || s.message().contains("canceled") =>
        {
            Status::unavailable(format!(
                "lost the connection to the leader: {}",
                s.message()
            ))
        }
        _ => s,
    })
}

fn parse_job_id(s: &str) -> Result<JobId, CoordinatorError> {
    s.trim()
        .parse()
        .map_err(|_| CoordinatorError::NotFound(format!("job '{s}' not found")))
}

/// A job as `who` may see it: a viewer reads the status of others' jobs,
/// not what they run (commands, environment, idempotency key).
fn job_for(who: &Principal, job: &nembo_domain::state::Job) -> pb::Job {
    let mut out = convert::job_to_proto(job);
    if !who.owns(&job.owner) {
        out.spec = None;
        out.idempotency_key.clear();
    }
    out
}

/// Users act on their own jobs only; admins on all.
fn check_owner(who: &Principal, id: JobId, owner: &str) -> Result<(), CoordinatorError> {
    if who.owns(owner) {
        Ok(())
    } else {
        Err(CoordinatorError::PermissionDenied(format!(
            "job {id} belongs to another user"
        )))
    }
}

/// `<prefix><id><sep><secret>` with fresh random halves, and the secret's digest.
fn new_token(prefix: &str, sep: char) -> (String, String, String) {
    let id = crate::tls::random_token()[..16].to_string();
    let secret = crate::tls::random_token();
    let digest = crate::tls::sha256_hex(secret.as_bytes());
    (format!("{prefix}{id}{sep}{secret}"), id, digest)
}

fn rejection(r: Rejection) -> CoordinatorError {
    match r {
        Rejection::NoSuchJob(_) | Rejection::NoSuchNode(_) => {
            CoordinatorError::NotFound(r.to_string())
        }
        Rejection::Conflict(m) => CoordinatorError::FailedPrecondition(m),
    }
}

#[tonic::async_trait]
impl Coordinator for Api {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        if let Some(mut leader) = self.ctx.leader().await? {
            return forwarded(leader.submit_job(on_behalf(request)).await);
        }
        let who = principal(&request)?;
        let req = request.into_inner();
        let spec = self.parse_request(&req)?;
        let key = (!req.idempotency_key.is_empty()).then(|| req.idempotency_key.clone());
        // The job and its audit record in one entry: auditing costs the
        // hot path no second commit.
        let out = self
            .ctx
            .raft
            .propose(Command::Audited {
                command: Box::new(Command::SubmitJob {
                    spec: self.sealed(spec),
                    idempotency_key: key,
                    owner: who.name.clone(),
                    at_ms: now_ms(),
                }),
                record: audit_record(&who, "SubmitJob", String::new()),
            })
            .await
            .map_err(CoordinatorError::from)?;
        match out {
            Outcome::Job { job_id, existing } => {
                let mut r = Response::new(pb::SubmitJobResponse {
                    job_id: job_id.to_string(),
                    existing,
                });
                mark_audited(r.metadata_mut());
                Ok(r)
            }
            Outcome::Rejected(r) => {
                let mut status: Status = rejection(r).into();
                mark_audited(status.metadata_mut());
                Err(status)
            }
            other => {
                Err(CoordinatorError::Internal(format!("unexpected outcome {other:?}")).into())
            }
        }
    }

    async fn dry_run(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::DryRunResponse>, Status> {
        if let Some(mut leader) = self.ctx.read_route(&request).await? {
            return forwarded(leader.dry_run(on_behalf(request)).await);
        }
        let spec = self.parse_request(request.get_ref())?;
        let view = self.ctx.raft.view();
        let now = now_ms();
        let candidates = optimizer::rank(&spec, &self.ctx.offerings, &view.state.blocked, now)
            .iter()
            .take(10)
            .map(convert::choice_to_proto)
            .collect();
        let placement = scheduler::place(
            &view.state,
            &spec,
            &self.ctx.offerings,
            &Round::default(),
            now,
        )
        .map(|p| match p {
            Placement::Existing {
                candidate,
                node_ids,
            } => pb::Placement {
                candidate_index: candidate as u32,
                summary: format!("on existing node(s) {}", node_ids.join(", ")),
                existing_node_ids: node_ids,
                ..Default::default()
            },
            Placement::Provision {
                candidate,
                offering,
                count,
                spot,
            } => pb::Placement {
                candidate_index: candidate as u32,
                summary: format!(
                    "{count} new {} node(s) in {} at ${:.2}/h each",
                    offering.instance_type,
                    offering.place_key(spot),
                    offering.price(spot)
                ),
                existing_node_ids: vec![],
                hourly_price: offering.price(spot),
                provider: offering.provider,
                region: offering.region,
                instance_type: offering.instance_type,
                new_nodes: count,
            },
        });
        Ok(Response::new(pb::DryRunResponse {
            normalized_yaml: task::to_normalized_yaml(&spec),
            spec: Some(convert::spec_to_proto(&spec)),
            placement,
            candidates,
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        if let Some(mut leader) = self.ctx.read_route(&request).await? {
            return forwarded(leader.get_job(on_behalf(request)).await);
        }
        let who = principal(&request)?;
        let id = parse_job_id(&request.get_ref().job_id)?;
        let view = self.ctx.raft.view();
        let job = view
            .state
            .jobs
            .get(&id)
            .ok_or_else(|| CoordinatorError::NotFound(format!("job {id} not found")))?;
        // Viewers read every job's status; users only their own.
        if who.role != Role::Viewer {
            check_owner(&who, id, &job.owner)?;
        }
        Ok(Response::new(job_for(&who, job)))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        if let Some(mut leader) = self.ctx.read_route(&request).await? {
            return forwarded(leader.list_jobs(on_behalf(request)).await);
        }
        let who = principal(&request)?;
        let filter: Vec<_> = request
            .get_ref()
            .states
            .iter()
            .filter_map(|s| convert::job_state_from_proto(*s))
            .collect();
        let view = self.ctx.raft.view();
        let jobs = view
            .state
            .jobs
            .values()
            .filter(|j| filter.is_empty() || filter.contains(&j.state))
            .filter(|j| who.role != Role::User || who.owns(&j.owner))
            .map(|j| job_for(&who, j))
            .collect();
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        if let Some(mut leader) = self.ctx.leader().await? {
            return forwarded(leader.cancel_job(on_behalf(request)).await);
        }
        let who = principal(&request)?;
        let id = parse_job_id(&request.get_ref().job_id)?;
        if let Some(job) = self.ctx.raft.view().state.jobs.get(&id) {
            check_owner(&who, id, &job.owner)?;
        }
        let out = self
            .ctx
            .raft
            .propose(Command::Audited {
                command: Box::new(Command::CancelJob {
                    job_id: id,
                    at_ms: now_ms(),
                }),
                record: audit_record(&who, "CancelJob", format!("job {id}")),
            })
            .await
            .map_err(CoordinatorError::from)?;
        if let Outcome::Rejected(r) = out {
            let mut status: Status = rejection(r).into();
            mark_audited(status.metadata_mut());
            return Err(status);
        }
        let state = self
            .ctx
            .raft
            .view()
            .state
            .jobs
            .get(&id)
            .map(|j| convert::job_state(j.state))
            .unwrap_or(pb::JobState::Unspecified);
        let mut r = Response::new(pb::CancelJobResponse {
            state: state as i32,
        });
        mark_audited(r.metadata_mut());
        Ok(r)
    }

    type StreamLogsStream = ReceiverStream<Result<pb::LogChunk, Status>>;

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        if let Some(mut leader) = self.ctx.leader().await? {
            let mut upstream = leader.stream_logs(on_behalf(request)).await?.into_inner();
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(async move {
                use tokio_stream::StreamExt;
                while let Some(item) = upstream.next().await {
                    if tx.send(item).await.is_err() {
                        return;
                    }
                }
            });
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        let who = principal(&request)?;
        let req = request.into_inner();
        let id = parse_job_id(&req.job_id)?;
        match self.ctx.raft.view().state.jobs.get(&id) {
            None => return Err(CoordinatorError::NotFound(format!("job {id} not found")).into()),
            Some(job) => check_owner(&who, id, &job.owner)?,
        }
        let (tx, rx) = mpsc::channel(16);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = stream_logs(ctx, id, req.follow, &tx).await {
                let _ = tx.send(Err(Status::internal(e.to_string()))).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        if let Some(mut leader) = self.ctx.read_route(&request).await? {
            return forwarded(leader.list_nodes(on_behalf(request)).await);
        }
        let view = self.ctx.raft.view();
        let nodes = view
            .state
            .nodes
            .values()
            .map(|n| convert::node_to_proto(&view.state, n))
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn get_fleet_metrics(
        &self,
        request: Request<pb::GetFleetMetricsRequest>,
    ) -> Result<Response<pb::FleetMetrics>, Status> {
        fleet_metrics(&self.ctx, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_offerings(
        &self,
        request: Request<pb::ListOfferingsRequest>,
    ) -> Result<Response<pb::ListOfferingsResponse>, Status> {
        let req = request.into_inner();
        let want_gpu = (!req.accelerator.is_empty()).then(|| req.accelerator.to_ascii_lowercase());
        let mut offerings: Vec<&nembo_domain::state::Offering> = self
            .ctx
            .offerings
            .iter()
            .filter(|o| req.cloud.is_empty() || o.provider == req.cloud)
            .filter(|o| !req.spot || o.spot_price.is_some())
            .filter(|o| match &want_gpu {
                None => !o.resources.accelerators.is_empty(),
                Some(g) => o.resources.accelerators.iter().any(|(k, n)| {
                    k.to_ascii_lowercase() == *g
                        && (req.accelerator_count <= 0.0 || *n == req.accelerator_count)
                }),
            })
            .collect();
        offerings.sort_by(|a, b| {
            a.price(req.spot)
                .total_cmp(&b.price(req.spot))
                .then_with(|| (&a.provider, &a.region).cmp(&(&b.provider, &b.region)))
        });
        Ok(Response::new(pb::ListOfferingsResponse {
            offerings: offerings
                .into_iter()
                .map(convert::offering_to_proto)
                .collect(),
        }))
    }

    async fn check_providers(
        &self,
        _request: Request<pb::CheckProvidersRequest>,
    ) -> Result<Response<pb::CheckProvidersResponse>, Status> {
        let mut providers = Vec::new();
        for (name, p) in &self.ctx.providers {
            let answer = tokio::time::timeout(std::time::Duration::from_secs(20), p.check()).await;
            let (ok, message) = match answer {
                Ok(Ok(m)) => (true, m),
                Ok(Err(e)) => (false, e.to_string()),
                Err(_) => (false, "no answer within 20 s".to_string()),
            };
            providers.push(pb::ProviderCheck {
                provider: name.clone(),
                ok,
                message,
            });
        }
        providers.extend(self.ctx.providers_not_enabled.iter().map(|(name, why)| {
            pb::ProviderCheck {
                provider: name.to_string(),
                ok: false,
                message: why.to_string(),
            }
        }));
        Ok(Response::new(pb::CheckProvidersResponse { providers }))
    }

    async fn inject_preemption(
        &self,
        request: Request<pb::InjectPreemptionRequest>,
    ) -> Result<Response<pb::InjectPreemptionResponse>, Status> {
        // On the leader, like every change, so that its gate records it.
        if let Some(mut leader) = self.ctx.leader().await? {
            return forwarded(leader.inject_preemption(on_behalf(request)).await);
        }
        let r = request.into_inner();
        let view = self.ctx.raft.view();
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
        let provider = self.ctx.providers.get(&node.provider).ok_or_else(|| {
            Status::failed_precondition(format!("provider '{}' is not configured", node.provider))
        })?;
        let format = if r.format.is_empty() {
            "aws"
        } else {
            r.format.as_str()
        };
        let lead = if r.in_ms == 0 {
            30_000
        } else {
            i64::from(r.in_ms)
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
                deadline_unix_ms: deadline,
            },
            format!("node {}", r.node_id),
        ))
    }

    async fn refresh_catalog(
        &self,
        request: Request<pb::RefreshCatalogRequest>,
    ) -> Result<Response<pb::RefreshCatalogResponse>, Status> {
        if let Some(mut leader) = self.ctx.leader().await? {
            return forwarded(leader.refresh_catalog(on_behalf(request)).await);
        }
        let name = request.into_inner().provider;
        let provider = self.ctx.providers.get(&name).ok_or_else(|| {
            Status::invalid_argument(format!("provider: '{name}' is not enabled here"))
        })?;
        let offerings = provider
            .refresh_catalog()
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        if offerings.is_empty() {
            return Err(Status::failed_precondition(format!(
                "{name} listed no GPU offerings; the catalog is left as it was"
            )));
        }
        let csv = crate::provider::catalog::render(
            &[
                format!("source: {name}'s API, fetched by `nembo catalog refresh {name}`"),
                format!("date: {} (unix ms)", now_ms()),
                "prices: per hour, as the API answered (Seeweb: EUR)".into(),
            ],
            &offerings,
        );
        let path = self.ctx.catalog_dir.join(format!("{name}.csv"));
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.ctx.catalog_dir)?;
            let tmp = path.with_extension("csv.tmp");
            std::fs::write(&tmp, &csv)?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
        Ok(audited(
            pb::RefreshCatalogResponse {
                path: path.display().to_string(),
                offerings: offerings.len() as u32,
                csv,
            },
            format!("catalog {}", path.display()),
        ))
    }

    async fn get_cost_report(
        &self,
        request: Request<pb::GetCostReportRequest>,
    ) -> Result<Response<pb::CostReport>, Status> {
        if let Some(mut leader) = self.ctx.read_route(&request).await? {
            return forwarded(leader.get_cost_report(on_behalf(request)).await);
        }
        let view = self.ctx.raft.view();
        let now = now_ms();
        let report = nembo_domain::cost::report(&view.state, now);
        let nodes = report
            .nodes
            .iter()
            .filter_map(|c| {
                let n = view.state.nodes.get(&c.node_id)?;
                Some(pb::NodeCost {
                    node_id: n.id.clone(),
                    provider: n.provider.clone(),
                    region: n.region.clone(),
                    instance_type: n.instance_type.clone(),
                    spot: n.spot,
                    hourly_price: n.hourly_price,
                    state: convert::node_state(n.state) as i32,
                    hours: c.hours,
                    cost: c.cost,
                })
            })
            .collect();
        let jobs = report
            .jobs
            .iter()
            .filter_map(|c| {
                let j = view.state.jobs.get(&c.job_id)?;
                Some(pb::JobCost {
                    job_id: j.id.to_string(),
                    name: j.name().to_string(),
                    state: convert::job_state(j.state) as i32,
                    node_hours: c.node_hours,
                    cost: c.cost,
                })
            })
            .collect();
        Ok(Response::new(pb::CostReport {
            nodes,
            jobs,
            total: report.total,
            at_unix_ms: now,
        }))
    }

    async fn get_gpu_history(
        &self,
        request: Request<pb::GetGpuHistoryRequest>,
    ) -> Result<Response<pb::GpuHistory>, Status> {
        if let Some(mut leader) = self.ctx.leader().await? {
            return forwarded(leader.get_gpu_history(on_behalf(request)).await);
        }
        let req = request.into_inner();
        let points = self
            .ctx
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
                at_unix_ms: i64::from(p.at_s) * 1000,
                gpu_util_percent: u32::from(p.util),
                mem_util_percent: u32::from(p.mem_util),
                temperature_c: u32::from(p.temp_c),
                power_w: u32::from(p.power_w),
                fb_used_mib: u64::from(p.fb_used_mib),
                ecc_uncorrected: p.flags & 1 != 0,
            })
            .collect();
        Ok(Response::new(pb::GpuHistory { points }))
    }

    type WatchFleetMetricsStream = ReceiverStream<Result<pb::FleetMetrics, Status>>;

    async fn watch_fleet_metrics(
        &self,
        request: Request<pb::WatchFleetMetricsRequest>,
    ) -> Result<Response<Self::WatchFleetMetricsStream>, Status> {
        let req = request.into_inner();
        let filter = req.filter.unwrap_or_default();
        let interval = Duration::from_millis(u64::from(match req.interval_ms {
            0 => 1000,
            ms => ms.max(100),
        }));
        let (tx, rx) = mpsc::channel(4);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Each round asks whoever leads now, so the stream survives
                // a leader change; a round that fails is skipped, not fatal.
                let Ok(m) = fleet_metrics(&ctx, filter.clone()).await else {
                    if tx.is_closed() {
                        return;
                    }
                    continue;
                };
                if tx.send(Ok(m)).await.is_err() {
                    return; // the client went away
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn down(
        &self,
        request: Request<pb::DownRequest>,
    ) -> Result<Response<pb::DownResponse>, Status> {
        if let Some(mut leader) = self.ctx.leader().await? {
            return forwarded(leader.down(on_behalf(request)).await);
        }
        let req = request.into_inner();
        let view = self.ctx.raft.view();
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
        self.propose_change(Command::TerminateNodes {
            node_ids: node_ids.clone(),
            at_ms: now_ms(),
        })
        .await?;
        let target = format!("nodes {}", node_ids.join(","));
        Ok(audited(pb::DownResponse { node_ids }, target))
    }

    async fn get_cluster_status(
        &self,
        _request: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        Ok(Response::new(self.cluster_status()))
    }

    async fn add_member(
        &self,
        request: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        if let Some(mut leader) = self.ctx.leader().await? {
            return forwarded(leader.add_member(on_behalf(request)).await);
        }
        let req = request.into_inner();
        if req.id == 0 {
            return Err(
                CoordinatorError::InvalidArgument("id: member ids start at 1".into()).into(),
            );
        }
        if !req.url.starts_with("https://") {
            return Err(CoordinatorError::InvalidArgument(format!(
                "url: '{}' must be an https:// URL",
                req.url
            ))
            .into());
        }
        let view = self.ctx.raft.view();
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
            self.change(ConfChangeType::AddLearnerNode, req.id, context.clone())
                .await?;
            // Then compact, so the new member starts from a snapshot that
            // carries a configuration naming it (raft-rs refuses one that
            // does not) and everything it has never seen.
            self.ctx
                .raft
                .compact()
                .await
                .map_err(CoordinatorError::Storage)?;
        }
        // Promote only once the learner holds the log: a voter that lags
        // would weaken the quorum.
        let deadline = tokio::time::Instant::now() + MEMBER_CATCH_UP;
        loop {
            match self.ctx.raft.progress(req.id).await {
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
        self.change(ConfChangeType::AddNode, req.id, context)
            .await?;
        Ok(audited(self.cluster_status(), format!("member {}", req.id)))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        if let Some(mut leader) = self.ctx.leader().await? {
            return forwarded(leader.remove_member(on_behalf(request)).await);
        }
        let id = request.into_inner().id;
        let view = self.ctx.raft.view();
        if !view.voters.contains(&id) && !view.learners.contains(&id) {
            return Err(CoordinatorError::NotFound(format!("member {id} not found")).into());
        }
        if id == view.id {
            return Err(CoordinatorError::FailedPrecondition(
                "this member leads: transfer leadership first (nembo admin members transfer-leader)".into(),
            )
            .into());
        }
        if view.voters == [id] {
            return Err(CoordinatorError::FailedPrecondition(
                "cannot remove the last voter".into(),
            )
            .into());
        }
        self.change(ConfChangeType::RemoveNode, id, Vec::new())
            .await?;
        Ok(audited(self.cluster_status(), format!("member {id}")))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        if let Some(mut leader) = self.ctx.leader().await? {
            return forwarded(leader.transfer_leader(on_behalf(request)).await);
        }
        let id = request.into_inner().id;
        if !self.ctx.raft.view().voters.contains(&id) {
            return Err(CoordinatorError::NotFound(format!("voter {id} not found")).into());
        }
        self.ctx.raft.transfer_leader(id);
        let mut views = self.ctx.raft.subscribe();
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
        Ok(audited(self.cluster_status(), format!("member {id}")))
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let who = principal(&request)?;
        Ok(Response::new(pb::WhoAmIResponse {
            user: who.name,
            role: who.role.as_str().into(),
        }))
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        if let Some(mut leader) = self.ctx.leader().await? {
            return forwarded(leader.create_user(on_behalf(request)).await);
        }
        let req = request.into_inner();
        let name = req.name.trim().to_string();
        if name.is_empty()
            || name.len() > 64
            || name == crate::gate::ROOT
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
        {
            return Err(CoordinatorError::InvalidArgument(format!(
                "name: '{name}' must be 1 to 64 letters, digits, '-', '_', '.' or '@', and not root"
            ))
            .into());
        }
        let role: Role = req
            .role
            .parse()
            .map_err(|e| CoordinatorError::InvalidArgument(format!("role: {e}")))?;
        let (token, token_id, token_sha256) = new_token(crate::gate::USER_TOKEN_PREFIX, '_');
        self.propose_change(Command::Access(AccessCommand::CreateUser {
            name: name.clone(),
            role,
            token_id,
            token_sha256,
            at_ms: now_ms(),
        }))
        .await?;
        Ok(audited(
            pb::CreateUserResponse {
                name: name.clone(),
                role: role.as_str().into(),
                token,
            },
            format!("user {name} ({})", role.as_str()),
        ))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        if let Some(mut leader) = self.ctx.read_route(&request).await? {
            return forwarded(leader.list_users(on_behalf(request)).await);
        }
        let view = self.ctx.raft.view();
        let users = view
            .state
            .access
            .users
            .values()
            .map(|u| pb::User {
                name: u.name.clone(),
                role: u.role.as_str().into(),
                token_id: u.token_id.clone(),
                created_unix_ms: u.created_at_ms,
                revoked_unix_ms: u.revoked_at_ms.unwrap_or(0),
            })
            .collect();
        Ok(Response::new(pb::ListUsersResponse { users }))
    }

    async fn revoke_user(
        &self,
        request: Request<pb::RevokeUserRequest>,
    ) -> Result<Response<pb::RevokeUserResponse>, Status> {
        if let Some(mut leader) = self.ctx.leader().await? {
            return forwarded(leader.revoke_user(on_behalf(request)).await);
        }
        let name = request.into_inner().name;
        self.propose_change(Command::Access(AccessCommand::RevokeUser {
            name: name.clone(),
            at_ms: now_ms(),
        }))
        .await?;
        Ok(audited(pb::RevokeUserResponse {}, format!("user {name}")))
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        if let Some(mut leader) = self.ctx.leader().await? {
            return forwarded(leader.create_join_token(on_behalf(request)).await);
        }
        let who = principal(&request)?;
        let req = request.into_inner();
        let ttl_s = if req.ttl_s == 0 { 3600 } else { req.ttl_s };
        if ttl_s > 30 * 24 * 3600 {
            return Err(CoordinatorError::InvalidArgument("ttl_s: at most 30 days".into()).into());
        }
        let uses = if req.uses == 0 { 1 } else { req.uses };
        let node = (!req.node_id.is_empty()).then(|| req.node_id.clone());
        if let Some(n) = &node {
            let view = self.ctx.raft.view();
            match view.state.nodes.get(n) {
                None => {
                    return Err(CoordinatorError::NotFound(format!("node_id: no node {n}")).into())
                }
                Some(found) if found.revoked_at_ms.is_some() || found.state.is_final() => {
                    return Err(CoordinatorError::FailedPrecondition(format!(
                        "node_id: node {n} is revoked or gone"
                    ))
                    .into())
                }
                Some(_) => {}
            }
        }
        let (token, id, sha256) = new_token(crate::enroll::JOIN_TOKEN_PREFIX, '.');
        let now = now_ms();
        let expires = now + i64::from(ttl_s) * 1000;
        self.propose_change(Command::Access(AccessCommand::CreateJoinToken {
            token: JoinToken {
                id: id.clone(),
                sha256,
                description: req.description.chars().take(200).collect(),
                created_by: who.name,
                created_at_ms: now,
                expires_at_ms: expires,
                uses_left: uses,
                revoked_at_ms: None,
                nodes: Vec::new(),
                node: node.clone(),
            },
        }))
        .await?;
        Ok(audited(
            pb::CreateJoinTokenResponse {
                id: id.clone(),
                token,
                expires_unix_ms: expires,
            },
            match &node {
                Some(n) => format!("join token {id} (node {n}, uses {uses}, ttl {ttl_s}s)"),
                None => format!("join token {id} (uses {uses}, ttl {ttl_s}s)"),
            },
        ))
    }

    async fn list_join_tokens(
        &self,
        request: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
        if let Some(mut leader) = self.ctx.read_route(&request).await? {
            return forwarded(leader.list_join_tokens(on_behalf(request)).await);
        }
        let view = self.ctx.raft.view();
        let tokens = view
            .state
            .access
            .join_tokens
            .values()
            .map(|t| pb::JoinToken {
                id: t.id.clone(),
                description: t.description.clone(),
                created_by: t.created_by.clone(),
                created_unix_ms: t.created_at_ms,
                expires_unix_ms: t.expires_at_ms,
                uses_left: t.uses_left,
                revoked_unix_ms: t.revoked_at_ms.unwrap_or(0),
                node_ids: t.nodes.clone(),
                for_node_id: t.node.clone().unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::ListJoinTokensResponse { tokens }))
    }

    async fn revoke_join_token(
        &self,
        request: Request<pb::RevokeJoinTokenRequest>,
    ) -> Result<Response<pb::RevokeJoinTokenResponse>, Status> {
        if let Some(mut leader) = self.ctx.leader().await? {
            return forwarded(leader.revoke_join_token(on_behalf(request)).await);
        }
        let id = request.into_inner().id;
        self.propose_change(Command::Access(AccessCommand::RevokeJoinToken {
            id: id.clone(),
            at_ms: now_ms(),
        }))
        .await?;
        Ok(audited(
            pb::RevokeJoinTokenResponse {},
            format!("join token {id}"),
        ))
    }

    async fn revoke_node(
        &self,
        request: Request<pb::RevokeNodeRequest>,
    ) -> Result<Response<pb::RevokeNodeResponse>, Status> {
        if let Some(mut leader) = self.ctx.leader().await? {
            return forwarded(leader.revoke_node(on_behalf(request)).await);
        }
        let node_id = request.into_inner().node_id;
        self.propose_change(Command::RevokeNode {
            node_id: node_id.clone(),
            at_ms: now_ms(),
        })
        .await?;
        Ok(audited(
            pb::RevokeNodeResponse {},
            format!("node {node_id}"),
        ))
    }

    async fn get_audit_log(
        &self,
        request: Request<pb::GetAuditLogRequest>,
    ) -> Result<Response<pb::AuditLog>, Status> {
        if let Some(mut leader) = self.ctx.read_route(&request).await? {
            return forwarded(leader.get_audit_log(on_behalf(request)).await);
        }
        let limit = match request.get_ref().limit {
            0 => 100,
            n => n as usize,
        };
        let view = self.ctx.raft.view();
        let audit = &view.state.access.audit;
        let records = audit
            .iter()
            .skip(audit.len().saturating_sub(limit))
            .map(|r| pb::AuditRecord {
                at_unix_ms: r.at_ms,
                who: r.who.clone(),
                role: r
                    .role
                    .map(|r| r.as_str().to_string())
                    .unwrap_or_else(|| "agent".into()),
                call: r.call.clone(),
                target: r.target.clone(),
                result: r.result.clone(),
            })
            .collect();
        Ok(Response::new(pb::AuditLog { records }))
    }
}

impl Api {
    /// Proposes `cmd`; a command the state rejects is an error.
    async fn propose_change(&self, cmd: Command) -> Result<(), CoordinatorError> {
        match self.ctx.raft.propose(cmd).await? {
            Outcome::Rejected(r) => Err(rejection(r)),
            _ => Ok(()),
        }
    }
}

/// Sends everything held for the job's attempts and ranks, in order; with
/// `follow`, keeps going until the job has ended and all its output is in.
async fn stream_logs(
    ctx: Arc<Ctx>,
    job_id: JobId,
    follow: bool,
    tx: &mpsc::Sender<Result<pb::LogChunk, Status>>,
) -> std::io::Result<()> {
    let mut cursors: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    let mut log_changes = ctx.logs.subscribe();
    let mut views = ctx.raft.subscribe();
    let mut ended_since: Option<tokio::time::Instant> = None;
    loop {
        let view = ctx.raft.view();
        let Some(job) = view.state.jobs.get(&job_id) else {
            return Ok(());
        };
        let mut complete = true;
        for a in &job.attempts {
            for rank in 0..a.node_ids.len() as u32 {
                let key = LogKey {
                    job: job_id,
                    attempt: a.number,
                    rank,
                };
                // Completeness is judged before reading, so that a chunk
                // landing between the read and the check is never skipped.
                let gone = matches!(
                    a.ranks[rank as usize].outcome,
                    Some(RankOutcome::Lost(_) | RankOutcome::FailedToStart(_))
                );
                complete &= gone || ctx.logs.is_complete(key);
                let cursor = cursors.entry((a.number, rank)).or_insert(0);
                loop {
                    let data = ctx.logs.read(key, *cursor, LOG_CHUNK)?;
                    if data.is_empty() {
                        break;
                    }
                    *cursor += data.len() as u64;
                    let chunk = pb::LogChunk {
                        data,
                        rank,
                        attempt: a.number,
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        if !follow {
            return Ok(());
        }
        if job.state.is_terminal() {
            let since = *ended_since.get_or_insert_with(tokio::time::Instant::now);
            if complete || since.elapsed() >= LOG_DRAIN_GRACE {
                return Ok(());
            }
        }
        tokio::select! {
            _ = log_changes.changed() => {}
            _ = views.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tx.closed() => return Ok(()),
        }
    }
}

/// Every GPU with labels, filtered. The leader holds the agents' sessions,
/// so it alone has telemetry: a follower asks it.
async fn fleet_metrics(
    ctx: &Ctx,
    req: pb::GetFleetMetricsRequest,
) -> Result<pb::FleetMetrics, Status> {
    if let Some(mut leader) = ctx.leader().await? {
        return forwarded(leader.get_fleet_metrics(req).await).map(Response::into_inner);
    }
    let view = ctx.raft.view();
    let now = now_ms();
    let mut nodes = LabelCache::default();
    let gpus = ctx
        .fleet
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
                age_ms: g
                    .latest
                    .as_ref()
                    .map_or(0, |_| (now - g.received_at_ms).max(0) as u64),
                latest: g.latest,
                driver_version: g.driver_version,
                node_id: node,
            }
        })
        .filter(|g| req.job_id.is_empty() || g.job_ids.contains(&req.job_id))
        .collect();
    Ok(pb::FleetMetrics { gpus })
}
