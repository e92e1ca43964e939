//! Agent enrollment: a join token and a public key in, a short-lived client
//! certificate bound to the node out; and its renewal over mutual TLS.
//!
//! Two kinds of join token are accepted. A node token (`node.<id>.<mac>`)
//! is what the coordinator hands a node it launched: it names that node and
//! is good for its first enrollment only. An admin's join token
//! (`nembo-join.<id>.<secret>`, `nembo admin tokens create`) has a lifetime
//! and a number of uses kept in the Raft state; an agent enrolling with one
//! and no node id becomes a new `manual` node. Spending a token is a Raft
//! command, so two agents racing for the last use cannot both win.

use std::sync::Arc;
use std::time::SystemTime;

use nembo_domain::state::{Command, Enrollment, NodeState, Outcome, Resources, State};
use nembo_proto::agent::v1 as apb;
use nembo_proto::agent::v1::enrollment_service_server::EnrollmentService as EnrollmentRpc;
use nembo_proto::v1 as pb;
use tonic::{Code, Request, Response, Status};

use crate::context::Ctx;
use crate::identity::issuer::Issued;
use crate::identity::tls;

/// Prefix of an admin's join tokens.
pub const JOIN_TOKEN_PREFIX: &str = "nembo-join.";

/// Who is on the other end of an agent connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentCaller {
    /// A certificate issued to this node.
    Node(String),
    /// The cluster's agent token: admitted only for a simulated cloud's
    /// record-only nodes (load generators), never for a real machine.
    Simulated,
}

/// The join token id `token` proves, if its secret matches the state's.
fn admin_token_id(token: &str, access: &nembo_domain::access::Access) -> Option<String> {
    let (id, secret) = token.strip_prefix(JOIN_TOKEN_PREFIX)?.split_once('.')?;
    let stored = access.join_tokens.get(id)?;
    tls::token_matches(&tls::sha256_hex(secret.as_bytes()), &stored.sha256).then(|| id.to_string())
}

fn issue(ctx: &Ctx, node_id: &str, public_key: &[u8]) -> Result<apb::NodeCertificate, Status> {
    let Some(issuer) = &ctx.issuer else {
        return Err(Status::failed_precondition(
            "this coordinator has no cluster CA key, so it cannot issue certificates",
        ));
    };
    let Issued {
        pem,
        not_before_ms,
        not_after_ms,
    } = issuer
        .sign_node(node_id, public_key, SystemTime::now(), ctx.agent_cert_ttl)
        .map_err(|e| match e {
            crate::identity::issuer::IdentityError::BadKey => {
                Status::invalid_argument(e.to_string())
            }
            other => Status::internal(other.to_string()),
        })?;
    Ok(apb::NodeCertificate {
        node_id: node_id.to_string(),
        certificate_pem: pem,
        not_before_unix_ms: not_before_ms,
        not_after_unix_ms: not_after_ms,
    })
}

/// What a machine enrolling as a new node may declare: the scheduler and
/// every table trust these numbers, so absurd ones are refused here.
fn declared_resources(r: pb::NodeResources) -> Result<Resources, Status> {
    const MAX_GPUS: f64 = 64.0;
    const MAX_CPUS: f64 = 4096.0;
    const MAX_MEMORY_GB: f64 = 64.0 * 1024.0;
    let within = |v: f64, max: f64| v.is_finite() && (0.0..=max).contains(&v);
    if r.accelerators.len() > 8 {
        return Err(Status::invalid_argument(
            "resources.accelerators: at most 8 kinds",
        ));
    }
    for (name, count) in &r.accelerators {
        let well_named = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !well_named || !within(*count, MAX_GPUS) {
            return Err(Status::invalid_argument(format!(
                "resources.accelerators: '{}:{count}' must be a name of letters, digits, '-', '_' or '.' and a count from 0 to {MAX_GPUS}",
                name.escape_default()
            )));
        }
    }
    if !within(r.cpus, MAX_CPUS) {
        return Err(Status::invalid_argument(format!(
            "resources.cpus: {} must be from 0 to {MAX_CPUS}",
            r.cpus
        )));
    }
    if !within(r.memory_gb, MAX_MEMORY_GB) {
        return Err(Status::invalid_argument(format!(
            "resources.memory_gb: {} must be from 0 to {MAX_MEMORY_GB}",
            r.memory_gb
        )));
    }
    Ok(Resources {
        accelerators: r.accelerators,
        cpus: r.cpus,
        memory_gb: r.memory_gb,
    })
}

/// Serves `nembo.agent.v1.EnrollmentService`.
pub struct EnrollmentService {
    ctx: Arc<Ctx>,
}

impl EnrollmentService {
    /// The service over `ctx`.
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl EnrollmentRpc for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<apb::EnrollRequest>,
    ) -> Result<Response<apb::EnrollResponse>, Status> {
        let ctx = &self.ctx;
        ctx.require_leader()?;
        let req = request.into_inner();
        let view = ctx.raft.view();
        let (via, who) =
            if let Some(node) = tls::node_token_owner(&ctx.join_secret, &req.join_token) {
                if req.node_id != node {
                    return Err(Status::permission_denied(format!(
                        "this join token is for node {node}"
                    )));
                }
                (Enrollment::NodeToken, format!("node token of {node}"))
            } else if let Some(id) = admin_token_id(&req.join_token, &view.state.access) {
                (
                    Enrollment::JoinToken { id: id.clone() },
                    format!("join token {id}"),
                )
            } else {
                tracing::warn!(node = %req.node_id, "enrollment refused: invalid join token");
                return Err(Status::unauthenticated("invalid join token"));
            };
        if !crate::identity::issuer::on_p256(&req.public_key) {
            return Err(Status::invalid_argument(
                "public_key: must be an uncompressed point on the ECDSA P-256 curve (65 bytes)",
            ));
        }
        let resources = declared_resources(req.resources.unwrap_or_default())?;
        let out = ctx
            .raft
            .propose(Command::EnrollNode {
                via,
                node_id: (!req.node_id.is_empty()).then(|| req.node_id.clone()),
                hostname: req.hostname.chars().take(64).collect(),
                resources,
                key_sha256: tls::sha256_hex(&req.public_key),
                at_ms: nembo_proto::clock::now_ms(),
            })
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let node_id = match out {
            Outcome::Nodes(ids) if ids.len() == 1 => ids[0].clone(),
            Outcome::Rejected(r) => {
                tracing::warn!(%who, reason = %r, "enrollment refused");
                crate::api::gate::record(
                    ctx,
                    &who,
                    None,
                    "Enroll",
                    req.node_id,
                    Code::PermissionDenied,
                )
                .await;
                return Err(Status::permission_denied(r.to_string()));
            }
            other => return Err(Status::internal(format!("unexpected outcome {other:?}"))),
        };
        let answer = issue(ctx, &node_id, &req.public_key)?;
        tracing::info!(node = %node_id, %who, "agent enrolled");
        crate::api::gate::record(
            ctx,
            &who,
            None,
            "Enroll",
            format!("node {node_id}"),
            Code::Ok,
        )
        .await;
        Ok(Response::new(apb::EnrollResponse {
            certificate: Some(answer),
        }))
    }
}

/// Refuses an agent speaking for `node_id` unless the node is known, not
/// revoked, not ended, and in none of the `also_refused` states.
pub fn agent_may_speak_for(
    state: &State,
    node_id: &str,
    also_refused: &[NodeState],
) -> Result<(), Status> {
    match state.nodes.get(node_id) {
        None => Err(Status::not_found(format!("node {node_id} is not known"))),
        Some(n) if n.revoked_at_ms.is_some() => Err(Status::permission_denied(format!(
            "node {node_id} is revoked"
        ))),
        Some(n) if n.state.is_final() || also_refused.contains(&n.state) => Err(
            Status::failed_precondition(format!("node {node_id} is {:?}", n.state)),
        ),
        Some(_) => Ok(()),
    }
}

/// `AgentService.Renew`: a new certificate for the node the caller's names.
pub async fn renew(
    ctx: &Ctx,
    request: Request<apb::RenewRequest>,
) -> Result<Response<apb::RenewResponse>, Status> {
    let Some(AgentCaller::Node(node_id)) = request.extensions().get::<AgentCaller>().cloned()
    else {
        return Err(Status::unauthenticated(
            "renewal needs the node's current certificate",
        ));
    };
    ctx.require_leader()?;
    let view = ctx.raft.view();
    agent_may_speak_for(&view.state, &node_id, &[])?;
    let certificate = issue(ctx, &node_id, &request.get_ref().public_key)?;
    tracing::info!(node = %node_id, "agent certificate renewed");
    Ok(Response::new(apb::RenewResponse {
        certificate: Some(certificate),
    }))
}
