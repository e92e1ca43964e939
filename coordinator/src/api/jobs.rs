//! Jobs: submit (and dry-run), read, list, cancel, and follow their output.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::Arc;
use std::time::Duration;

use nembo_domain::access::Role;
use nembo_domain::optimizer;
use nembo_domain::scheduler::{self, Placement, Round};
use nembo_domain::state::{Command, JobId, Offering, Outcome, RankOutcome};
use nembo_domain::task::{self, SpecError, TaskSpec};
use nembo_proto::clock::now_ms;
use nembo_proto::v1 as pb;
use nembo_proto::MAX_TASK_BYTES;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert;
use super::gate::{audit_record, mark_audited, principal, Principal};
use super::paging::PageRequest;
use super::rejection;
use crate::context::Ctx;
use crate::error::CoordinatorError;
use crate::logs::LogKey;

/// How long a follower of a finished job's logs waits for output still in
/// flight from a node whose final log size never arrived.
const LOG_DRAIN_GRACE: Duration = Duration::from_secs(10);
const LOG_CHUNK: usize = 64 * 1024;
const MAX_IDEMPOTENCY_KEY: usize = 256;

/// The stream of a job's output.
pub type LogStream = ReceiverStream<Result<pb::StreamLogsResponse, Status>>;

pub async fn submit_job(
    ctx: &Ctx,
    request: Request<pb::SubmitJobRequest>,
) -> Result<Response<pb::SubmitJobResponse>, Status> {
    let who = principal(&request)?;
    let req = request.into_inner();
    let spec = parse_request(ctx, &who, &req, Submission::Job).await?;
    let key = (!req.idempotency_key.is_empty()).then(|| req.idempotency_key.clone());
    // The job and its audit record in one entry: auditing costs the
    // hot path no second commit.
    let out = ctx
        .raft
        .propose(Command::Audited {
            command: Box::new(Command::SubmitJob {
                spec: sealed(ctx, spec),
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
            let cluster = view_cluster(ctx, job_id);
            let mut r = Response::new(pb::SubmitJobResponse {
                job_id: job_id.to_string(),
                existing,
                cluster,
            });
            mark_audited(r.metadata_mut());
            Ok(r)
        }
        Outcome::Rejected(r) => {
            let mut status: Status = rejection(r).into();
            mark_audited(status.metadata_mut());
            Err(status)
        }
        other => Err(CoordinatorError::Internal(format!("unexpected outcome {other:?}")).into()),
    }
}

/// The cluster job `id` runs on, as the state holds it now.
fn view_cluster(ctx: &Ctx, id: JobId) -> String {
    ctx.raft
        .view()
        .state
        .jobs
        .get(&id)
        .and_then(|j| j.spec.cluster.as_ref().map(|c| c.name.clone()))
        .unwrap_or_default()
}

pub async fn dry_run(
    ctx: &Ctx,
    request: Request<pb::DryRunRequest>,
) -> Result<Response<pb::DryRunResponse>, Status> {
    let who = principal(&request)?;
    let spec = parse_request(ctx, &who, &request.into_inner().into(), Submission::DryRun).await?;
    let offerings = offerings_for(ctx, &spec);
    let view = ctx.raft.view();
    let now = now_ms();
    let candidates = optimizer::rank(&spec, &offerings, &view.state.blocked, now)
        .iter()
        .take(10)
        .map(convert::choice_to_proto)
        .collect();
    let placement =
        scheduler::place(&view.state, &spec, &offerings, &Round::default(), now).map(|p| match p {
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

pub async fn get_job(
    ctx: &Ctx,
    request: Request<pb::GetJobRequest>,
) -> Result<Response<pb::GetJobResponse>, Status> {
    let who = principal(&request)?;
    let id = parse_job_id(&request.get_ref().job_id)?;
    let view = ctx.raft.view();
    let job = view
        .state
        .jobs
        .get(&id)
        .ok_or_else(|| CoordinatorError::NotFound(format!("job {id} not found")))?;
    // Viewers read every job's status; users only their own.
    if who.role != Role::Viewer {
        check_owner(&who, id, &job.owner)?;
    }
    Ok(Response::new(pb::GetJobResponse {
        job: Some(job_for(&who, job)),
    }))
}

pub async fn list_jobs(
    ctx: &Ctx,
    request: Request<pb::ListJobsRequest>,
) -> Result<Response<pb::ListJobsResponse>, Status> {
    let who = principal(&request)?;
    let req = request.into_inner();
    let page = PageRequest::<JobId>::new("jobs", req.page_size, &req.page_token)?;
    let filter: Vec<_> = req
        .states
        .iter()
        .filter_map(|s| convert::job_state_from_proto(*s))
        .collect();
    let full = req.view == pb::JobView::Full as i32;
    let view = ctx.raft.view();
    let after = page.after.map_or(Unbounded, Excluded);
    let jobs = view
        .state
        .jobs
        .range((after, Unbounded))
        .filter(|(_, j)| filter.is_empty() || filter.contains(&j.state))
        .filter(|(_, j)| who.role != Role::User || who.owns(&j.owner))
        .filter(|(_, j)| {
            req.cluster.is_empty()
                || j.spec
                    .cluster
                    .as_ref()
                    .is_some_and(|c| c.name == req.cluster)
        })
        .map(|(id, j)| {
            let job = if full {
                job_for(&who, j)
            } else {
                convert::job_summary(j)
            };
            (*id, job)
        });
    let (jobs, next_page_token) = page.take(jobs);
    Ok(Response::new(pb::ListJobsResponse {
        jobs,
        next_page_token,
    }))
}

pub async fn cancel_job(
    ctx: &Ctx,
    request: Request<pb::CancelJobRequest>,
) -> Result<Response<pb::CancelJobResponse>, Status> {
    let who = principal(&request)?;
    let id = parse_job_id(&request.get_ref().job_id)?;
    if let Some(job) = ctx.raft.view().state.jobs.get(&id) {
        check_owner(&who, id, &job.owner)?;
    }
    let out = ctx
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
    let state = ctx
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

pub async fn stream_logs(
    ctx: &Arc<Ctx>,
    request: Request<pb::StreamLogsRequest>,
) -> Result<Response<LogStream>, Status> {
    let who = principal(&request)?;
    let req = request.into_inner();
    let id = parse_job_id(&req.job_id)?;
    match ctx.raft.view().state.jobs.get(&id) {
        None => return Err(CoordinatorError::NotFound(format!("job {id} not found")).into()),
        Some(job) => check_owner(&who, id, &job.owner)?,
    }
    let (tx, rx) = mpsc::channel(16);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        if let Err(e) = send_logs(ctx, id, req.follow, &tx).await {
            let _ = tx.send(Err(Status::internal(e.to_string()))).await;
        }
    });
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// The spec with every secret sealed: the Raft log and snapshots never
/// hold a secret in plain text.
pub(super) fn sealed(ctx: &Ctx, mut spec: TaskSpec) -> TaskSpec {
    for (name, value) in spec.secrets.iter_mut() {
        *value = ctx.secrets.seal(name, value);
    }
    spec
}

/// What a task is submitted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Submission {
    /// A job (`SubmitJob`): a task with `service:` is refused.
    Job,
    /// A service's version (`ServeUp`, `ServeUpdate`): `service:` is required.
    Service,
    /// `DryRun`: either; its local sources need not be uploaded.
    DryRun,
}

pub(super) async fn parse_request(
    ctx: &Ctx,
    who: &Principal,
    req: &pb::SubmitJobRequest,
    kind: Submission,
) -> Result<TaskSpec, CoordinatorError> {
    let dry_run = kind == Submission::DryRun;
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
            let (yaml, overrides) = (y.clone(), overrides.clone());
            ctx.off_runtime(move || task::parse_task_yaml(&yaml, &overrides))
                .await??
        }
        Some(pb::submit_job_request::Task::Spec(s)) => convert::spec_from_proto(s, &overrides)?,
        None => {
            return Err(CoordinatorError::InvalidArgument(
                "task: give task_yaml or spec".into(),
            ))
        }
    };
    // Whether it is a job or a service at all, before where it could run.
    match (kind, spec.service.is_some()) {
        (Submission::Job, true) => {
            return Err(CoordinatorError::InvalidArgument(
                "service: the task is a service; bring it up with `nembo serve up TASK` \
                 (or drop `service:` to run it as a job)"
                    .into(),
            ))
        }
        (Submission::Service, false) => {
            return Err(CoordinatorError::InvalidArgument(
                "service: the task has no `service:` section; give it one (at least a \
                 readiness_probe), or run it as a job with `nembo launch`"
                    .into(),
            ))
        }
        _ => {}
    }
    attach_uploads(ctx, &mut spec, &req.uploads, dry_run)?;
    if let (Some(w), None) = (&spec.workdir, &spec.workdir_manifest) {
        check_workdir(w, &ctx.own_dirs)?;
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
    spec.keep_off_coordinator_user = who.role != Role::Admin;
    target_cluster(ctx, who, req, &mut spec)?;
    // On a cluster that exists, the question is whether the task fits it,
    // which apply answers (naming what differs), not whether a new machine could.
    let on_existing = spec
        .cluster
        .as_ref()
        .is_some_and(|t| ctx.raft.view().state.clusters.contains_key(&t.name));
    if on_existing {
        return Ok(spec);
    }
    if let Err(e) = optimizer::check_feasible(&spec, &offerings_for(ctx, &spec)) {
        if spec.keep_off_coordinator_user
            && optimizer::check_feasible(&spec, &ctx.offerings).is_ok()
        {
            return Err(CoordinatorError::PermissionDenied(
                LOCAL_IS_FOR_ADMINS.replace("{role}", who.role.as_str()),
            ));
        }
        return Err(infeasible(ctx, e).into());
    }
    Ok(spec)
}

/// Ties the task to its named cluster (`launch -c`, `exec`): the name,
/// made up when a launch gives none; `exec` skips `setup`, as `sky exec`
/// does; the autostop from the launch line, else the task's, else, for a
/// new cluster, the coordinators' default.
fn target_cluster(
    ctx: &Ctx,
    who: &Principal,
    req: &pb::SubmitJobRequest,
    spec: &mut TaskSpec,
) -> Result<(), CoordinatorError> {
    let invalid = |m: String| CoordinatorError::InvalidArgument(m);
    let mode = pb::ClusterMode::try_from(req.cluster_mode)
        .map_err(|_| invalid(format!("cluster_mode: unknown value {}", req.cluster_mode)))?;
    if let Some(a) = &req.autostop {
        spec.autostop = Some(convert::autostop_from_proto(a, "autostop")?);
    }
    let exec = match mode {
        pb::ClusterMode::Unspecified => {
            if !req.cluster.is_empty() {
                return Err(invalid(
                    "cluster_mode: say how the cluster is used (launch or exec)".into(),
                ));
            }
            if spec.autostop.is_some() {
                return Err(invalid(
                    "resources.autostop: only clusters autostop (a managed job's nodes are \
                     released when it ends); launch it with `nembo launch`"
                        .into(),
                ));
            }
            return Ok(());
        }
        _ if req.managed => {
            return Err(invalid(
                "cluster: a managed job makes its own nodes and moves between them; \
                 launch it without -c"
                    .into(),
            ))
        }
        pb::ClusterMode::Launch => false,
        pb::ClusterMode::Exec => true,
    };
    let name = if req.cluster.is_empty() && !exec {
        generated_cluster_name(&who.name, &req.idempotency_key)
    } else {
        req.cluster.clone()
    };
    if name.is_empty() {
        return Err(invalid("cluster: exec needs the cluster's name".into()));
    }
    nembo_domain::state::check_cluster_name(&name).map_err(|e| invalid(format!("cluster: {e}")))?;
    if exec {
        spec.setup = None;
    } else if spec.autostop.is_none() && !ctx.raft.view().state.clusters.contains_key(&name) {
        spec.autostop = ctx.default_autostop.clone().map(task::AutostopSetting::On);
    }
    spec.cluster = Some(task::ClusterTarget { name, exec });
    Ok(())
}

/// `nembo-<4 hex>-<user>`, as SkyPilot's `sky-<4 hex>-<user>`: the same
/// for a retried submission (same idempotency key).
fn generated_cluster_name(user: &str, key: &str) -> String {
    let seed = if key.is_empty() {
        let mut b = [0u8; 16];
        let _ = getrandom::getrandom(&mut b);
        b.to_vec()
    } else {
        key.as_bytes().to_vec()
    };
    let hex = crate::identity::tls::sha256_hex(&seed);
    let user: String = user
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(40)
        .collect::<String>()
        .to_ascii_lowercase();
    if user.is_empty() {
        format!("nembo-{}", &hex[..4])
    } else {
        format!("nembo-{}-{user}", &hex[..4])
    }
}

/// A task nothing can host: say what this machine has, and how to reach
/// beyond it.
fn infeasible(ctx: &Ctx, e: SpecError) -> SpecError {
    let mut notes: Vec<String> = ctx
        .providers
        .values()
        .filter_map(|p| p.infeasible_note())
        .collect();
    notes.push("enable a cloud in providers.yaml, see `nembo check`".into());
    e.noted(&notes.join("; "))
}

/// Ties each local source the task names to the manifest its client
/// uploaded, and checks that the manifest and every file it lists are here
/// and within the limits, so that a task is accepted only if its nodes can
/// fetch everything it ships. A dry run may leave sources unuploaded (it
/// ships nothing); what it does name is checked.
fn attach_uploads(
    ctx: &Ctx,
    spec: &mut TaskSpec,
    uploads: &BTreeMap<String, String>,
    dry_run: bool,
) -> Result<(), CoordinatorError> {
    use nembo_proto::files::{MAX_BYTES, MAX_ENTRIES};
    let (mut entries, mut bytes) = (0usize, 0u64);
    let mut check = |field: &str, source: &str| -> Result<String, CoordinatorError> {
        let refuse = |why: String| {
            CoordinatorError::InvalidArgument(format!("{field}: local source '{source}': {why}"))
        };
        let digest = uploads.get(source).ok_or_else(|| {
            refuse("not uploaded (the nembo CLI uploads local sources before it submits)".into())
        })?;
        let manifest = ctx
            .blobs
            .manifest(digest)
            .map_err(|e| refuse(e.to_string()))?;
        // What an upload in progress will bring counts: the job's nodes wait for it.
        let mut missing = ctx.blobs.missing_of(&manifest);
        // (In this order: an upload's announcement goes only once what it
        // brought is here.)
        missing.retain(|d| !ctx.blobs.is_coming(d) && !ctx.blobs.has(d));
        if let Some(first) = missing.first() {
            return Err(refuse(format!(
                "{} of its files were not uploaded (first: {first})",
                missing.len()
            )));
        }
        entries += manifest.entries.len();
        bytes += manifest.bytes();
        if entries > MAX_ENTRIES || bytes > MAX_BYTES {
            return Err(refuse(format!(
                "the task ships {entries} entries and {bytes} bytes in all; the limit is \
                 {MAX_ENTRIES} entries and {} GiB (put data sets in a bucket)",
                MAX_BYTES >> 30
            )));
        }
        Ok(digest.clone())
    };
    if let Some(w) = spec.workdir.clone() {
        if uploads.contains_key(&w) {
            spec.workdir_manifest = Some(check("workdir", &w)?);
        }
    }
    for (dst, source) in spec.file_mounts.iter_mut() {
        if let Some((path, _)) = source.local() {
            if dry_run && !uploads.contains_key(path) {
                continue;
            }
            let digest = check(&format!("file_mounts.{dst}"), path)?;
            source.set_manifest(digest);
        }
    }
    Ok(())
}

/// Why a non-admin's task that only the local provider could host is refused.
const LOCAL_IS_FOR_ADMINS: &str = "only admins may run jobs on the local provider: its jobs \
run as the coordinators' own Unix user and could read the cluster's token and CA key, so a \
{role} token would become an admin's (see SECURITY.md, 'Local jobs'); ask an admin to \
run it, or enable a cloud provider (see `nembo check`)";

/// The offerings this task may be placed on: a non-admin's never include
/// those that run jobs as the coordinators' Unix user.
fn offerings_for<'a>(ctx: &'a Ctx, spec: &TaskSpec) -> std::borrow::Cow<'a, [Offering]> {
    if spec.keep_off_coordinator_user {
        ctx.offerings
            .iter()
            .filter(|o| !o.runs_as_coordinator_user)
            .cloned()
            .collect::<Vec<_>>()
            .into()
    } else {
        ctx.offerings[..].into()
    }
}

/// A workdir is copied whole onto the node: it must be a directory a user
/// means to ship, not the machine, a home, or the coordinator's own files
/// (`workdir: ../../../../..` resolved to `/`, and the copy would have
/// carried the cluster's root token and CA key).
fn check_workdir(w: &str, own_dirs: &[std::path::PathBuf]) -> Result<(), CoordinatorError> {
    use std::path::{Component, Path};
    let refuse = |why: String| Err(CoordinatorError::InvalidArgument(format!("workdir: {why}")));
    let path = Path::new(w);
    if !path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return refuse(format!(
            "'{w}' must be an absolute path without . or .. (the CLI resolves relative ones)"
        ));
    }
    // Where the path really leads on this host (`/proc/self/root/..` is `/`).
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if real == Path::new("/") {
        return refuse(format!(
            "'{w}' is the root directory: it would copy the whole machine"
        ));
    }
    if ["/proc", "/sys", "/dev"]
        .iter()
        .any(|p| real.starts_with(p))
    {
        return refuse(format!("'{w}' is a system directory, not files to ship"));
    }
    if std::env::var_os("HOME").is_some_and(|h| real == Path::new(&h)) {
        return refuse(format!(
            "'{w}' is a home directory itself; name the project's directory"
        ));
    }
    for own in own_dirs {
        let own = std::fs::canonicalize(own).unwrap_or_else(|_| own.clone());
        if own.starts_with(&real) || real.starts_with(&own) {
            return refuse(format!(
                "'{w}' holds or is inside the coordinator's own files ({}), which hold its credentials",
                own.display()
            ));
        }
    }
    Ok(())
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

/// Sends everything held for the job's attempts and ranks, in order; with
/// `follow`, keeps going until the job has ended and all its output is in.
async fn send_logs(
    ctx: Arc<Ctx>,
    job_id: JobId,
    follow: bool,
    tx: &mpsc::Sender<Result<pb::StreamLogsResponse, Status>>,
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
                    let chunk = pb::StreamLogsResponse {
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
