//! Services (`nembo serve`): up, update, list, down. A user acts on their
//! own services; an admin on any. What runs them is `crate::serve`.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Unbounded};

use nembo_domain::state::{Command, Service, ServiceCommand, State, UpdateMode};
use nembo_domain::task::TaskSpec;
use nembo_proto::clock::now_ms;
use nembo_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::gate::{audited, principal, Principal};
use super::jobs::{self, Submission};
use super::paging::PageRequest;
use super::{convert, propose_change};
use crate::context::Ctx;
use crate::error::CoordinatorError;

/// The task of a serve call, parsed and checked as a submission is; it
/// must have a `service:` section.
async fn parse_service_task(
    ctx: &Ctx,
    who: &Principal,
    task_yaml: String,
    env_overrides: BTreeMap<String, String>,
    uploads: BTreeMap<String, String>,
) -> Result<TaskSpec, CoordinatorError> {
    let req = pb::SubmitJobRequest {
        task: Some(pb::submit_job_request::Task::TaskYaml(task_yaml)),
        env_overrides,
        uploads,
        ..Default::default()
    };
    let spec = jobs::parse_request(ctx, who, &req, Submission::Service).await?;
    Ok(jobs::sealed(ctx, spec))
}

/// Whether `name` can name a service: SkyPilot's cluster-name rule.
fn check_name(name: &str) -> Result<(), CoordinatorError> {
    nembo_domain::state::check_cluster_name(name).map_err(|e| {
        CoordinatorError::InvalidArgument(format!("name: {}", e.replacen("cluster", "service", 1)))
    })
}

pub async fn serve_up(
    ctx: &Ctx,
    request: Request<pb::ServeUpRequest>,
) -> Result<Response<pb::ServeUpResponse>, Status> {
    let who = principal(&request)?;
    let req = request.into_inner();
    let name = if req.name.is_empty() {
        format!(
            "nembo-service-{:04x}",
            (now_ms() as u64 ^ u64::from(std::process::id())) & 0xffff
        )
    } else {
        req.name.clone()
    };
    check_name(&name)?;
    let spec = parse_service_task(ctx, &who, req.task_yaml, req.env_overrides, req.uploads).await?;
    let state = ctx.raft.view().state.clone();
    if state.services.contains_key(&name) {
        return Err(CoordinatorError::AlreadyExists(format!(
            "service {name} exists; change it with `nembo serve update {name} TASK`"
        ))
        .into());
    }
    let taken: Vec<u16> = state.services.values().map(|s| s.lb_port).collect();
    let Some(lb_port) = ctx.serve.ports.clone().find(|p| !taken.contains(p)) else {
        return Err(CoordinatorError::Exhausted(format!(
            "every load balancer port ({}-{}) is a service's; take one down, or start the \
             coordinators with a wider --lb-ports",
            ctx.serve.ports.start(),
            ctx.serve.ports.end()
        ))
        .into());
    };
    let cmd = Command::Service(ServiceCommand::Up {
        name: name.clone(),
        spec,
        owner: who.name.clone(),
        lb_port,
        at_ms: now_ms(),
    });
    propose_change(ctx, cmd).await?;
    let service = current(ctx, &name);
    Ok(audited(
        pb::ServeUpResponse { service },
        format!("service {name}"),
    ))
}

pub async fn serve_update(
    ctx: &Ctx,
    request: Request<pb::ServeUpdateRequest>,
) -> Result<Response<pb::ServeUpdateResponse>, Status> {
    let who = principal(&request)?;
    let req = request.into_inner();
    owned(&ctx.raft.view().state, &who, &req.name)?;
    let mode = match pb::UpdateMode::try_from(req.mode) {
        Ok(pb::UpdateMode::Unspecified | pb::UpdateMode::Rolling) => UpdateMode::Rolling,
        Ok(pb::UpdateMode::BlueGreen) => UpdateMode::BlueGreen,
        Err(_) => {
            return Err(CoordinatorError::InvalidArgument(format!(
                "mode: unknown value {}",
                req.mode
            ))
            .into())
        }
    };
    let spec = parse_service_task(ctx, &who, req.task_yaml, req.env_overrides, req.uploads).await?;
    let cmd = Command::Service(ServiceCommand::Update {
        name: req.name.clone(),
        spec,
        mode,
        at_ms: now_ms(),
    });
    propose_change(ctx, cmd).await?;
    let service = current(ctx, &req.name);
    Ok(audited(
        pb::ServeUpdateResponse { service },
        format!("service {}", req.name),
    ))
}

pub async fn list_services(
    ctx: &Ctx,
    request: Request<pb::ListServicesRequest>,
) -> Result<Response<pb::ListServicesResponse>, Status> {
    let req = request.into_inner();
    let page = PageRequest::<String>::new("services", req.page_size, &req.page_token)?;
    let view = ctx.raft.view();
    let after = page.after.clone().map_or(Unbounded, Excluded);
    let services = view
        .state
        .services
        .range((after, Unbounded))
        .filter(|(name, _)| req.names.is_empty() || req.names.contains(name))
        .map(|(name, s)| (name.clone(), to_proto(ctx, &view.state, &view.members, s)));
    let (services, next_page_token) = page.take(services);
    Ok(Response::new(pb::ListServicesResponse {
        services,
        next_page_token,
    }))
}

pub async fn serve_down(
    ctx: &Ctx,
    request: Request<pb::ServeDownRequest>,
) -> Result<Response<pb::ServeDownResponse>, Status> {
    let who = principal(&request)?;
    let name = request.into_inner().name;
    owned(&ctx.raft.view().state, &who, &name)?;
    let cmd = Command::Service(ServiceCommand::Down {
        name: name.clone(),
        at_ms: now_ms(),
    });
    propose_change(ctx, cmd).await?;
    Ok(audited(pb::ServeDownResponse {}, format!("service {name}")))
}

/// The service `name`, if the caller may act on it.
fn owned<'a>(state: &'a State, who: &Principal, name: &str) -> Result<&'a Service, Status> {
    let Some(s) = state.services.get(name) else {
        return Err(CoordinatorError::NotFound(format!("service {name} not found")).into());
    };
    if !who.owns(&s.owner) {
        return Err(CoordinatorError::PermissionDenied(format!(
            "service {name} belongs to {}",
            s.owner
        ))
        .into());
    }
    Ok(s)
}

fn current(ctx: &Ctx, name: &str) -> Option<pb::Service> {
    let view = ctx.raft.view();
    view.state
        .services
        .get(name)
        .map(|s| to_proto(ctx, &view.state, &view.members, s))
}

fn to_proto(
    ctx: &Ctx,
    state: &State,
    members: &std::collections::BTreeMap<u64, String>,
    s: &Service,
) -> pb::Service {
    let endpoints = crate::serve::endpoints(members, s.lb_port);
    let qps = ctx.serve.total_qps(&s.name, now_ms() / 1000);
    convert::service_to_proto(state, s, endpoints, qps)
}
