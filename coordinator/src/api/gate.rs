//! The one door of the public API, in front of every `nembo.v1.CoordinatorService`
//! call: who is calling (bearer token), where the call is served ([`route`]:
//! a follower hands every call that needs the leader to it, before any
//! handler runs), may their role make this call (one table,
//! [`required_role`], so no call can forget to check), how long the call
//! may take, and the audit record of every call that changes something.
//! Which jobs a user may touch is checked by the handlers, on the leader,
//! against the job's owner.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use nembo_domain::access::{Access, AccessCommand, AuditRecord, Role};
use nembo_domain::state::Command;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::api::forward::{pass_on, Forwarder, Hop};
use crate::context::Ctx;
use crate::identity::tls::{bearer, sha256_hex, token_matches};
use nembo_proto::clock::now_ms;

/// The caller of an API request, put in its extensions by the gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// User name; `root` for the cluster's own token.
    pub name: String,
    pub role: Role,
}

impl Principal {
    /// Whether it may see and act on jobs owned by `owner`.
    pub fn owns(&self, owner: &str) -> bool {
        self.role == Role::Admin || self.name == owner
    }
}

/// Name of the holder of the cluster's own token.
pub const ROOT: &str = "root";

/// The least role each call needs. A call not listed (one added later and
/// forgotten here) is for admins only.
pub fn required_role(call: &str) -> Role {
    match call {
        "GetJob" | "ListJobs" | "ListNodes" | "GetClusterStatus" | "GetFleetMetrics"
        | "WatchFleetMetrics" | "GetGpuHistory" | "ListOfferings" | "GetCostReport" | "WhoAmI"
        | "ListClusters" | "ListServices" => Role::Viewer,
        // A cluster's own calls also check that the caller owns it (or is an admin).
        "SubmitJob" | "DryRun" | "CancelJob" | "StreamLogs" | "CheckProviders"
        | "FindMissingBlobs" | "PutBlobs" | "StopCluster" | "StartCluster" | "DownCluster"
        | "SetAutostop" | "Shell" | "ServeUp" | "ServeUpdate" | "ServeDown" => Role::User,
        _ => Role::Admin,
    }
}

/// Calls that change something: each one is recorded in the audit trail.
pub fn mutating(call: &str) -> bool {
    matches!(
        call,
        "SubmitJob"
            | "CancelJob"
            | "Down"
            | "AddMember"
            | "RemoveMember"
            | "TransferLeader"
            | "RefreshCatalog"
            | "InjectPreemption"
            | "CreateUser"
            | "RevokeUser"
            | "CreateJoinToken"
            | "RevokeJoinToken"
            | "RevokeNode"
            | "StopCluster"
            | "StartCluster"
            | "DownCluster"
            | "SetAutostop"
            | "Shell"
            | "ServeUp"
            | "ServeUpdate"
            | "ServeDown"
    )
}

/// Where a call is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// By whichever member got it, from what every member holds alike (its
    /// configuration, its own view of the cluster, the caller's identity).
    AnyMember,
    /// By the leader, once it has confirmed its leadership with a quorum;
    /// by any member from its own applied state when the caller asks for a
    /// stale read (`nembo-stale: true`).
    Read,
    /// By the leader: every change, and what only the leader holds (the
    /// agents' sessions, so their telemetry and job output).
    Leader,
}

/// Where each call is served. A call not listed goes to the leader.
pub fn route(call: &str) -> Route {
    match call {
        "GetClusterStatus" | "WhoAmI" | "ListOfferings" | "CheckProviders" => Route::AnyMember,
        "DryRun" | "GetJob" | "ListJobs" | "ListNodes" | "GetCostReport" | "ListUsers"
        | "ListJoinTokens" | "GetAuditLog" | "ListClusters" => Route::Read,
        _ => Route::Leader,
    }
}

/// Request metadata that allows a read from any member's own state.
pub const STALE_READ_KEY: &str = "nembo-stale";

fn stale_read_asked(headers: &http::HeaderMap) -> bool {
    headers
        .get(STALE_READ_KEY)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "true" || v == "1")
}

/// Prefix of user tokens: `nembo_<id>_<secret>`.
pub const USER_TOKEN_PREFIX: &str = "nembo_";

/// Who holds `token`, if anyone.
pub fn authenticate(token: &str, root: &str, access: &Access) -> Option<Principal> {
    if token_matches(token, root) {
        return Some(Principal {
            name: ROOT.into(),
            role: Role::Admin,
        });
    }
    let (id, secret) = token.strip_prefix(USER_TOKEN_PREFIX)?.split_once('_')?;
    let user = access.user_by_token_id(id)?;
    token_matches(&sha256_hex(secret.as_bytes()), &user.token_sha256).then(|| Principal {
        name: user.name.clone(),
        role: user.role,
    })
}

/// Response metadata of a call whose audit record went into the same Raft
/// entry as its change (`Command::Audited`): the gate records nothing more.
pub const AUDITED_HEADER: &str = "nembo-audited";

/// The audit record of `who` making `call`, for `Command::Audited` (apply
/// fills in the result, and the target of a new job).
pub fn audit_record(who: &Principal, call: &str, target: String) -> AuditRecord {
    AuditRecord {
        at_ms: now_ms(),
        who: who.name.clone(),
        role: Some(who.role),
        call: call.into(),
        target,
        result: String::new(),
    }
}

/// Marks a response or a refusal as already audited.
pub fn mark_audited(metadata: &mut tonic::metadata::MetadataMap) {
    metadata.insert(
        AUDITED_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
}

/// What a handled call named or made, for its audit record: handlers put it
/// in their response's extensions ([`audited`]).
#[derive(Debug, Clone)]
pub struct AuditTarget(pub String);

/// A response carrying its audit target.
pub fn audited<T>(message: T, target: impl Into<String>) -> tonic::Response<T> {
    let mut r = tonic::Response::new(message);
    r.extensions_mut().insert(AuditTarget(target.into()));
    r
}

/// Records a call in the replicated audit trail. Only the leader does: a
/// follower forwards the calls it admits, and the leader's gate records
/// them; a follower's refusals are only in its log.
pub async fn record(
    ctx: &Ctx,
    who: &str,
    role: Option<Role>,
    call: &str,
    target: String,
    code: Code,
) {
    if !ctx.raft.view().is_leader() {
        return;
    }
    let record = AuditRecord {
        at_ms: now_ms(),
        who: who.to_string(),
        role,
        call: call.to_string(),
        target,
        result: if code == Code::Ok {
            "ok".into()
        } else {
            format!("{code:?}")
        },
    };
    if let Err(e) = ctx
        .raft
        .propose(Command::Access(AccessCommand::Audit(record)))
        .await
    {
        tracing::warn!(call, who, error = %e, "audit record not stored");
    }
}

/// A request that does not decode (a string that is not UTF-8, a field of
/// the wrong wire type) is the caller's mistake: INVALID_ARGUMENT, not the
/// INTERNAL that tonic's codec answers, which reads as a server fault.
fn undecodable_is_invalid_argument(resp: &mut http::Response<Body>) {
    let undecodable = grpc_code(resp) == Code::Internal
        && resp
            .headers()
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| {
                m.starts_with("failed%20to%20decode%20Protobuf")
                    || m.starts_with("failed to decode Protobuf")
            });
    if undecodable {
        resp.headers_mut().insert(
            "grpc-status",
            http::HeaderValue::from(Code::InvalidArgument as i32),
        );
    }
}

fn grpc_code(resp: &http::Response<Body>) -> Code {
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from)
}

/// Wraps the Coordinator service.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    ctx: Arc<Ctx>,
    root: Arc<str>,
    timeout: Duration,
    forward: Arc<Forwarder>,
    refusals: Arc<RefusalBudget>,
}

impl<S> Gate<S> {
    /// `inner` behind the gate; calls end DEADLINE_EXCEEDED after `timeout`
    /// (membership changes get longer: they wait for a new member to catch
    /// up). `ca_pem` is trusted when reaching the leader.
    pub fn new(
        inner: S,
        ctx: Arc<Ctx>,
        root: Arc<str>,
        timeout: Duration,
        ca_pem: Vec<u8>,
    ) -> Self {
        Self {
            inner,
            ctx,
            root,
            timeout,
            forward: Arc::new(Forwarder::new(ca_pem)),
            refusals: Arc::new(RefusalBudget::default()),
        }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> tower_service::Service<http::Request<Body>> for Gate<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_string();
        let (ctx, root, forward) = (self.ctx.clone(), self.root.clone(), self.forward.clone());
        let refusals = self.refusals.clone();
        let limit = match call.as_str() {
            "AddMember" | "RemoveMember" => self.timeout.max(Duration::from_secs(60)),
            // An upload lasts as long as its bytes take; the handler gives
            // up on one that stalls (`api::blobs::PIECE_IDLE`).
            "PutBlobs" => Duration::from_secs(24 * 3600),
            _ => self.timeout,
        };
        Box::pin(async move {
            let who = bearer(req.headers())
                .and_then(|t| authenticate(t, &root, &ctx.raft.view().state.access));
            let Some(who) = who else {
                tracing::warn!(call, "refused: missing or invalid bearer token");
                return Ok(Status::unauthenticated("missing or invalid bearer token").into_http());
            };
            let route = route(&call);
            let served_here = match route {
                Route::AnyMember => true,
                Route::Read => stale_read_asked(req.headers()),
                Route::Leader => false,
            };
            let answer = async move {
                if !served_here {
                    match forward.find_leader(&ctx.raft, route == Route::Read).await {
                        Ok(Hop::Here) => {}
                        Ok(Hop::Leader(channel)) => {
                            return within(limit, &call, pass_on(channel, req)).await
                        }
                        Err(status) => return status.into_http(),
                    }
                }
                // Admins may do everything already; the budget keeps users
                // and viewers from flooding the log with their refusals.
                let budgeted = who.role != Role::Admin;
                if budgeted && refusals.exhausted(&who.name) {
                    tracing::warn!(call, who = %who.name, "refused: too many refused calls");
                    return Status::resource_exhausted(format!(
                        "{} made too many refused calls; slow down",
                        who.name
                    ))
                    .into_http();
                }
                let need = required_role(&call);
                if who.role < need {
                    // A follower hands a refused call to the leader as it
                    // came, so that the refusal is recorded there.
                    if let Ok(Some(channel)) = forward.leader_channel(&ctx.raft).await {
                        return pass_on(channel, req).await;
                    }
                    let status = Status::permission_denied(format!(
                        "{call} needs the {} role; {} has {}",
                        need.as_str(),
                        who.name,
                        who.role.as_str()
                    ));
                    tracing::warn!(call, who = %who.name, role = who.role.as_str(), "refused: role");
                    if budgeted {
                        refusals.spend(&who.name);
                    }
                    record(
                        &ctx,
                        &who.name,
                        Some(who.role),
                        &call,
                        String::new(),
                        status.code(),
                    )
                    .await;
                    return status.into_http();
                }
                req.extensions_mut().insert(who.clone());
                let served = async {
                    match inner.call(req).await {
                        Ok(resp) => resp,
                        Err(never) => match never {},
                    }
                };
                let mut resp = within(limit, &call, served).await;
                undecodable_is_invalid_argument(&mut resp);
                let code = grpc_code(&resp);
                if budgeted
                    && is_refusal(code)
                    && (mutating(&call) || code == Code::PermissionDenied)
                {
                    refusals.spend(&who.name);
                }
                // Every change is recorded, and every refusal: a read
                // refused for want of rights too.
                let recorded_here = (mutating(&call) || code == Code::PermissionDenied)
                    && !resp.headers().contains_key(AUDITED_HEADER);
                if recorded_here {
                    let target = resp
                        .extensions()
                        .get::<AuditTarget>()
                        .map(|t| t.0.clone())
                        .unwrap_or_default();
                    record(&ctx, &who.name, Some(who.role), &call, target, code).await;
                }
                resp
            };
            Ok(answer.await)
        })
    }
}

/// A call the caller got wrong or was not allowed to make (not one the
/// cluster failed: those say nothing about the caller).
fn is_refusal(code: Code) -> bool {
    !matches!(
        code,
        Code::Ok
            | Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
    )
}

/// How many refused calls each caller may make: a burst, then a steady
/// rate. Past it the caller is answered RESOURCE_EXHAUSTED and nothing is
/// recorded: each recorded refusal is a Raft write, and a flood of them
/// (10 000 by one viewer in 6 s) must not load the log.
pub struct RefusalBudget {
    // A plain mutex: held for a few arithmetic operations, never across an
    // await, and each call takes it at most twice.
    per_caller: std::sync::Mutex<std::collections::HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: tokio::time::Instant,
}

/// Refused calls a caller may make at once.
const REFUSAL_BURST: f64 = 100.0;
/// And then per second.
const REFUSALS_PER_SECOND: f64 = 10.0;

impl Default for RefusalBudget {
    fn default() -> Self {
        Self {
            per_caller: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl RefusalBudget {
    fn with_bucket<T>(&self, who: &str, f: impl FnOnce(&mut Bucket) -> T) -> T {
        let mut map = self.per_caller.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        let bucket = map.entry(who.to_string()).or_insert(Bucket {
            tokens: REFUSAL_BURST,
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * REFUSALS_PER_SECOND;
        bucket.tokens = (bucket.tokens + refill).min(REFUSAL_BURST);
        bucket.at = now;
        f(bucket)
    }

    /// Whether `who` has used up its refused calls for now.
    fn exhausted(&self, who: &str) -> bool {
        self.with_bucket(who, |b| b.tokens < 1.0)
    }

    /// Counts one refused call of `who`.
    fn spend(&self, who: &str) {
        self.with_bucket(who, |b| b.tokens = (b.tokens - 1.0).max(0.0));
    }
}

/// The answer of `call`, or DEADLINE_EXCEEDED once it took `limit`. A
/// stream is answered once its handler returns it: the stream runs on.
async fn within(
    limit: Duration,
    call: &str,
    answer: impl Future<Output = http::Response<Body>>,
) -> http::Response<Body> {
    tokio::time::timeout(limit, answer)
        .await
        .unwrap_or_else(|_| {
            Status::deadline_exceeded(format!("{call} took longer than {limit:?}")).into_http()
        })
}

/// The caller, as the gate found it.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no caller identity"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nembo_domain::access::User;

    #[test]
    fn tokens_resolve_to_their_holder_only() {
        let mut access = Access::default();
        access.users.insert(
            "alice".into(),
            User {
                name: "alice".into(),
                role: Role::User,
                token_id: "a1".into(),
                token_sha256: sha256_hex(b"s3cret"),
                created_at_ms: 0,
                revoked_at_ms: None,
            },
        );
        let root = "r00t";
        assert_eq!(
            authenticate("r00t", root, &access).unwrap().role,
            Role::Admin
        );
        let alice = authenticate("nembo_a1_s3cret", root, &access).unwrap();
        assert_eq!((alice.name.as_str(), alice.role), ("alice", Role::User));
        assert!(authenticate("nembo_a1_wrong", root, &access).is_none());
        assert!(authenticate("nembo_a2_s3cret", root, &access).is_none());
        assert!(authenticate("", root, &access).is_none());
        access.users.get_mut("alice").unwrap().revoked_at_ms = Some(1);
        assert!(authenticate("nembo_a1_s3cret", root, &access).is_none());
    }

    #[test]
    fn unknown_calls_are_for_admins_and_reads_for_viewers() {
        assert_eq!(required_role("SomethingNew"), Role::Admin);
        assert_eq!(required_role("ListJobs"), Role::Viewer);
        assert_eq!(required_role("SubmitJob"), Role::User);
        assert_eq!(required_role("GetAuditLog"), Role::Admin);
        assert!(mutating("SubmitJob") && !mutating("GetJob"));
        assert_eq!(route("SubmitJob"), Route::Leader);
        assert_eq!(route("SomethingNew"), Route::Leader);
        assert_eq!(route("GetJob"), Route::Read);
    }
}
