//! Who may do what: the caller's identity, users and their tokens, join
//! tokens for agents, and the audit trail.

use std::ops::Bound::{Excluded, Unbounded};

use nembo_domain::access::{AccessCommand, AuditRecord, JoinToken};
use nembo_domain::state::Command;
use nembo_proto::clock::{millis, now_ms, timestamp};
use nembo_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::convert;
use super::gate::{audited, principal, ROOT, USER_TOKEN_PREFIX};
use super::paging::PageRequest;
use super::propose_change;
use crate::agents::enroll::JOIN_TOKEN_PREFIX;
use crate::context::Ctx;
use crate::error::CoordinatorError;

/// The longest a join token may live.
const MAX_JOIN_TOKEN_TTL_S: i64 = 30 * 24 * 3600;

pub async fn who_am_i(
    _ctx: &Ctx,
    request: Request<pb::WhoAmIRequest>,
) -> Result<Response<pb::WhoAmIResponse>, Status> {
    let who = principal(&request)?;
    Ok(Response::new(pb::WhoAmIResponse {
        user: who.name,
        role: convert::role(Some(who.role)) as i32,
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
    let role = convert::role_from_proto(req.role).ok_or_else(|| {
        CoordinatorError::InvalidArgument(format!(
            "role: {} is not one of ROLE_VIEWER, ROLE_USER, ROLE_ADMIN",
            req.role
        ))
    })?;
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
            role: convert::role(Some(role)) as i32,
            token,
        },
        format!("user {name} ({})", role.as_str()),
    ))
}

pub async fn list_users(
    ctx: &Ctx,
    request: Request<pb::ListUsersRequest>,
) -> Result<Response<pb::ListUsersResponse>, Status> {
    let req = request.into_inner();
    let page = PageRequest::<String>::new("users", req.page_size, &req.page_token)?;
    let view = ctx.raft.view();
    let after = page.after.clone().map_or(Unbounded, Excluded);
    let (users, next_page_token) = page.take(
        view.state
            .access
            .users
            .range((after, Unbounded))
            .map(|(name, u)| {
                let user = pb::User {
                    name: u.name.clone(),
                    role: convert::role(Some(u.role)) as i32,
                    token_id: u.token_id.clone(),
                    create_time: timestamp(u.created_at_ms),
                    revoke_time: u.revoked_at_ms.and_then(timestamp),
                };
                (name.clone(), user)
            }),
    );
    Ok(Response::new(pb::ListUsersResponse {
        users,
        next_page_token,
    }))
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
    let ttl_s = match millis(req.ttl.as_ref()) {
        None => 3600,
        Some(ms) if ms < 1000 => {
            return Err(CoordinatorError::InvalidArgument(format!(
                "ttl: at least 1 s (got {ms} ms)"
            ))
            .into())
        }
        Some(ms) if ms > MAX_JOIN_TOKEN_TTL_S * 1000 => {
            return Err(CoordinatorError::InvalidArgument("ttl: at most 30 days".into()).into())
        }
        Some(ms) => ms / 1000,
    };
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
    let expires = now + ttl_s * 1000;
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
            expire_time: timestamp(expires),
        },
        match &node {
            Some(n) => format!("join token {id} (node {n}, uses {uses}, ttl {ttl_s}s)"),
            None => format!("join token {id} (uses {uses}, ttl {ttl_s}s)"),
        },
    ))
}

pub async fn list_join_tokens(
    ctx: &Ctx,
    request: Request<pb::ListJoinTokensRequest>,
) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
    let req = request.into_inner();
    let page = PageRequest::<String>::new("join_tokens", req.page_size, &req.page_token)?;
    let view = ctx.raft.view();
    let after = page.after.clone().map_or(Unbounded, Excluded);
    let tokens = view.state.access.join_tokens.range((after, Unbounded));
    let (tokens, next_page_token) = page.take(tokens.map(|(id, t)| {
        let token = pb::JoinToken {
            id: t.id.clone(),
            description: t.description.clone(),
            created_by: t.created_by.clone(),
            create_time: timestamp(t.created_at_ms),
            expire_time: timestamp(t.expires_at_ms),
            uses_left: t.uses_left,
            revoke_time: t.revoked_at_ms.and_then(timestamp),
            node_ids: t.nodes.clone(),
            for_node_id: t.node.clone().unwrap_or_default(),
        };
        (id.clone(), token)
    }));
    Ok(Response::new(pb::ListJoinTokensResponse {
        tokens,
        next_page_token,
    }))
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
) -> Result<Response<pb::GetAuditLogResponse>, Status> {
    let req = request.into_inner();
    let page = PageRequest::<AuditKey>::new("audit", req.page_size, &req.page_token)?;
    let view = ctx.raft.view();
    let access = &view.state.access;
    // Changes and refusals are kept apart (refusals cannot push changes
    // out) and read together, newest first.
    let mut all = keyed(0, access.audit_dropped, access.audit.iter());
    all.extend(keyed(1, access.refusals_dropped, access.refusals.iter()));
    all.retain(|(k, _)| page.after.as_ref().is_none_or(|after| k < after));
    all.sort_unstable_by_key(|(key, _)| std::cmp::Reverse(*key));
    let (records, next_page_token) = page.take(all.into_iter().map(|(key, r)| {
        let record = pb::AuditRecord {
            time: timestamp(r.at_ms),
            who: r.who.clone(),
            role: convert::role(r.role) as i32,
            call: r.call.clone(),
            target: r.target.clone(),
            result: r.result.clone(),
        };
        (key, record)
    }));
    Ok(Response::new(pb::GetAuditLogResponse {
        records,
        next_page_token,
    }))
}

/// Where an audit record stands, newest last: its time, then its ring
/// (changes, refusals) and its fixed position there. A page token holds
/// the last one sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AuditKey {
    at_ms: i64,
    ring: u8,
    position: u64,
}

/// The records of one ring with their keys.
fn keyed<'a>(
    ring: u8,
    dropped: u64,
    records: impl Iterator<Item = &'a AuditRecord>,
) -> Vec<(AuditKey, &'a AuditRecord)> {
    records
        .enumerate()
        .map(|(i, r)| {
            let position = dropped + i as u64;
            (
                AuditKey {
                    at_ms: r.at_ms,
                    ring,
                    position,
                },
                r,
            )
        })
        .collect()
}

impl std::fmt::Display for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.at_ms, self.ring, self.position)
    }
}

impl std::str::FromStr for AuditKey {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let mut parts = s.split('.');
        let mut next = || parts.next().ok_or(());
        let key = AuditKey {
            at_ms: next()?.parse().map_err(|_| ())?,
            ring: next()?.parse().map_err(|_| ())?,
            position: next()?.parse().map_err(|_| ())?,
        };
        Ok(key)
    }
}

/// `<prefix><id><sep><secret>` with fresh random halves, and the secret's digest.
fn new_token(prefix: &str, sep: char) -> (String, String, String) {
    let id = crate::identity::tls::random_token()[..16].to_string();
    let secret = crate::identity::tls::random_token();
    let digest = crate::identity::tls::sha256_hex(secret.as_bytes());
    (format!("{prefix}{id}{sep}{secret}"), id, digest)
}
