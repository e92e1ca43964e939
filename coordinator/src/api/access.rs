//! Who may do what: the caller's identity, users and their tokens, join
//! tokens for agents, and the audit trail.

use nembo_domain::access::{AccessCommand, JoinToken, Role};
use nembo_domain::state::Command;
use nembo_proto::clock::now_ms;
use nembo_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::gate::{audited, principal, ROOT, USER_TOKEN_PREFIX};
use super::propose_change;
use crate::agents::enroll::JOIN_TOKEN_PREFIX;
use crate::context::Ctx;
use crate::error::CoordinatorError;

pub async fn who_am_i(
    _ctx: &Ctx,
    request: Request<pb::WhoAmIRequest>,
) -> Result<Response<pb::WhoAmIResponse>, Status> {
    let who = principal(&request)?;
    Ok(Response::new(pb::WhoAmIResponse {
        user: who.name,
        role: who.role.as_str().into(),
    }))
}

pub async fn create_user(
    ctx: &Ctx,
    request: Request<pb::CreateUserRequest>,
) -> Result<Response<pb::CreateUserResponse>, Status> {
    let req = request.into_inner();
    let name = req.name.trim().to_string();
    if name.is_empty()
        || name.len() > 64
        || name == ROOT
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
    let (token, token_id, token_sha256) = new_token(USER_TOKEN_PREFIX, '_');
    propose_change(
        ctx,
        Command::Access(AccessCommand::CreateUser {
            name: name.clone(),
            role,
            token_id,
            token_sha256,
            at_ms: now_ms(),
        }),
    )
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

pub async fn list_users(
    ctx: &Ctx,
    _request: Request<pb::ListUsersRequest>,
) -> Result<Response<pb::ListUsersResponse>, Status> {
    let view = ctx.raft.view();
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

pub async fn revoke_user(
    ctx: &Ctx,
    request: Request<pb::RevokeUserRequest>,
) -> Result<Response<pb::RevokeUserResponse>, Status> {
    let name = request.into_inner().name;
    propose_change(
        ctx,
        Command::Access(AccessCommand::RevokeUser {
            name: name.clone(),
            at_ms: now_ms(),
        }),
    )
    .await?;
    Ok(audited(pb::RevokeUserResponse {}, format!("user {name}")))
}

pub async fn create_join_token(
    ctx: &Ctx,
    request: Request<pb::CreateJoinTokenRequest>,
) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
    let who = principal(&request)?;
    let req = request.into_inner();
    let ttl_s = if req.ttl_s == 0 { 3600 } else { req.ttl_s };
    if ttl_s > 30 * 24 * 3600 {
        return Err(CoordinatorError::InvalidArgument("ttl_s: at most 30 days".into()).into());
    }
    let uses = if req.uses == 0 { 1 } else { req.uses };
    let node = (!req.node_id.is_empty()).then(|| req.node_id.clone());
    if let Some(n) = &node {
        let view = ctx.raft.view();
        match view.state.nodes.get(n) {
            None => return Err(CoordinatorError::NotFound(format!("node_id: no node {n}")).into()),
            Some(found) if found.revoked_at_ms.is_some() || found.state.is_final() => {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "node_id: node {n} is revoked or gone"
                ))
                .into())
            }
            Some(_) => {}
        }
    }
    let (token, id, sha256) = new_token(JOIN_TOKEN_PREFIX, '.');
    let now = now_ms();
    let expires = now + i64::from(ttl_s) * 1000;
    propose_change(
        ctx,
        Command::Access(AccessCommand::CreateJoinToken {
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
        }),
    )
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

pub async fn list_join_tokens(
    ctx: &Ctx,
    _request: Request<pb::ListJoinTokensRequest>,
) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
    let view = ctx.raft.view();
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

pub async fn revoke_join_token(
    ctx: &Ctx,
    request: Request<pb::RevokeJoinTokenRequest>,
) -> Result<Response<pb::RevokeJoinTokenResponse>, Status> {
    let id = request.into_inner().id;
    propose_change(
        ctx,
        Command::Access(AccessCommand::RevokeJoinToken {
            id: id.clone(),
            at_ms: now_ms(),
        }),
    )
    .await?;
    Ok(audited(
        pb::RevokeJoinTokenResponse {},
        format!("join token {id}"),
    ))
}

pub async fn get_audit_log(
    ctx: &Ctx,
    request: Request<pb::GetAuditLogRequest>,
) -> Result<Response<pb::AuditLog>, Status> {
    let limit = match request.get_ref().limit {
        0 => 100,
        n => n as usize,
    };
    let view = ctx.raft.view();
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

/// `<prefix><id><sep><secret>` with fresh random halves, and the secret's digest.
fn new_token(prefix: &str, sep: char) -> (String, String, String) {
    let id = crate::identity::tls::random_token()[..16].to_string();
    let secret = crate::identity::tls::random_token();
    let digest = crate::identity::tls::sha256_hex(secret.as_bytes());
    (format!("{prefix}{id}{sep}{secret}"), id, digest)
}
