//! `nembo admin users|tokens|nodes|audit`: who may use the cluster, and
//! what they did.

use anyhow::{Context, Result};
use nembo_proto::v1 as pb;
use serde_json::json;

use crate::connect;
use crate::jobs::ms;
use crate::table;

/// `viewer`, `user`, `admin` (and `agent` in the audit trail).
fn role_name(role: i32) -> &'static str {
    match pb::Role::try_from(role) {
        Ok(pb::Role::Viewer) => "viewer",
        Ok(pb::Role::User) => "user",
        Ok(pb::Role::Admin) => "admin",
        Ok(pb::Role::Agent) => "agent",
        _ => "?",
    }
}

fn role_from_name(role: &str) -> Result<pb::Role> {
    Ok(match role {
        "viewer" => pb::Role::Viewer,
        "user" => pb::Role::User,
        "admin" => pb::Role::Admin,
        other => anyhow::bail!("role '{other}' is not one of viewer, user, admin"),
    })
}

fn stamp(ms: i64) -> String {
    if ms <= 0 {
        "-".into()
    } else {
        table::ago(ms)
    }
}

/// Creates a user and prints its token once (to stdout alone, so it can be
/// piped into a 0600 file; the rest goes to stderr).
pub async fn user_create(name: &str, role: &str) -> Result<()> {
    let c = connect::client().await?;
    let req = pb::CreateUserRequest {
        name: name.into(),
        role: role_from_name(role)? as i32,
    };
    let r = c.clone().create_user(req).await?.into_inner();
    eprintln!(
        "user {} ({}) created; its token is below and is not shown again:",
        r.name,
        role_name(r.role)
    );
    println!("{}", r.token);
    Ok(())
}

/// Lists users.
pub async fn user_list(as_json: bool) -> Result<()> {
    let c = connect::client().await?;
    let users = connect::all_pages(|page_token| {
        let req = pb::ListUsersRequest {
            page_token,
            ..Default::default()
        };
        let c = c.clone();
        async move {
            let r = connect::call(&c, req, |mut c, r| async move { c.list_users(r).await }).await?;
            Ok((r.users, r.next_page_token))
        }
    })
    .await?;
    if as_json {
        let v: Vec<_> = users
            .iter()
            .map(|u| json!({"name": u.name, "role": role_name(u.role), "token_id": u.token_id, "created_unix_ms": ms(&u.create_time), "revoked_unix_ms": ms(&u.revoke_time)}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = users
        .iter()
        .map(|u| {
            vec![
                u.name.clone(),
                role_name(u.role).into(),
                u.token_id.clone(),
                stamp(ms(&u.create_time)),
                if u.revoke_time.is_some() {
                    format!("revoked {}", stamp(ms(&u.revoke_time)))
                } else {
                    "active".into()
                },
            ]
        })
        .collect();
    table::print(&["NAME", "ROLE", "TOKEN ID", "CREATED", "STATUS"], &rows);
    Ok(())
}

/// Revokes a user's token.
pub async fn user_revoke(name: &str) -> Result<()> {
    let c = connect::client().await?;
    let req = pb::RevokeUserRequest { name: name.into() };
    c.clone().revoke_user(req).await?;
    println!("user {name}: token revoked");
    Ok(())
}

/// Creates a join token and prints it once (stdout alone).
pub async fn token_create(
    ttl_ms: u32,
    uses: u32,
    description: &str,
    node: Option<&str>,
) -> Result<()> {
    let c = connect::client().await?;
    let req = pb::CreateJoinTokenRequest {
        ttl: Some(nembo_proto::clock::duration(i64::from(ttl_ms.max(1000)))),
        uses,
        description: description.into(),
        node_id: node.unwrap_or_default().into(),
    };
    let r = c.clone().create_join_token(req).await?.into_inner();
    eprintln!(
        "join token {} for {} enrollment(s), valid until {} ({}); it is not shown again.\n\
         On the machine: write it to a 0600 file and run\n  \
         nembo-agent --coordinator URL --ca-cert ca.pem --join-token-file FILE --work-dir DIR{}",
        r.id,
        uses.max(1),
        ms(&r.expire_time),
        table::duration(ms(&r.expire_time) - nembo_proto::clock::now_ms()),
        node.map(|n| format!(" --node-id {n}")).unwrap_or_default()
    );
    println!("{}", r.token);
    Ok(())
}

/// Lists join tokens.
pub async fn token_list(as_json: bool) -> Result<()> {
    let c = connect::client().await?;
    let tokens = connect::all_pages(|page_token| {
        let req = pb::ListJoinTokensRequest {
            page_token,
            ..Default::default()
        };
        let c = c.clone();
        async move {
            let r = connect::call(
                &c,
                req,
                |mut c, r| async move { c.list_join_tokens(r).await },
            )
            .await?;
            Ok((r.tokens, r.next_page_token))
        }
    })
    .await?;
    if as_json {
        let v: Vec<_> = tokens
            .iter()
            .map(|t| json!({"id": t.id, "description": t.description, "created_by": t.created_by, "created_unix_ms": ms(&t.create_time), "expires_unix_ms": ms(&t.expire_time), "uses_left": t.uses_left, "revoked_unix_ms": ms(&t.revoke_time), "node_ids": t.node_ids, "for_node_id": t.for_node_id}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let now = nembo_proto::clock::now_ms();
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            let status = if t.revoke_time.is_some() {
                "revoked".to_string()
            } else if now >= ms(&t.expire_time) {
                "expired".to_string()
            } else if t.uses_left == 0 {
                "used".to_string()
            } else {
                format!(
                    "{} left, expires in {}",
                    t.uses_left,
                    table::duration(ms(&t.expire_time) - now)
                )
            };
            vec![
                t.id.clone(),
                t.created_by.clone(),
                stamp(ms(&t.create_time)),
                status,
                t.node_ids.join(","),
                t.description.clone(),
            ]
        })
        .collect();
    table::print(
        &["ID", "BY", "CREATED", "STATUS", "NODES", "DESCRIPTION"],
        &rows,
    );
    Ok(())
}

/// Revokes a join token.
pub async fn token_revoke(id: &str) -> Result<()> {
    let c = connect::client().await?;
    c.clone()
        .revoke_join_token(pb::RevokeJoinTokenRequest { id: id.into() })
        .await?;
    println!("join token {id} revoked");
    Ok(())
}

/// Revokes a node.
pub async fn node_revoke(node: &str) -> Result<()> {
    let c = connect::client().await?;
    c.clone()
        .revoke_node(pb::RevokeNodeRequest {
            node_id: node.into(),
        })
        .await?;
    println!("node {node} revoked: its certificates are refused and it is being terminated");
    Ok(())
}

/// Prints the newest `limit` audit records, oldest of them first.
pub async fn audit(limit: u32, as_json: bool) -> Result<()> {
    let c = connect::client().await?;
    let limit = if limit == 0 { 100 } else { limit as usize };
    let mut records = Vec::new();
    let mut page_token = String::new();
    while records.len() < limit {
        let req = pb::GetAuditLogRequest {
            page_size: (limit - records.len()).min(1000) as i32,
            page_token,
        };
        let r = connect::call(&c, req, |mut c, r| async move { c.get_audit_log(r).await })
            .await
            .context("read the audit log")?;
        records.extend(r.records);
        if r.next_page_token.is_empty() {
            break;
        }
        page_token = r.next_page_token;
    }
    // Pages come newest first; a log reads oldest first.
    records.reverse();
    if as_json {
        let v: Vec<_> = records
            .iter()
            .map(|a| json!({"at_unix_ms": ms(&a.time), "who": a.who, "role": role_name(a.role), "call": a.call, "target": a.target, "result": a.result}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|a| {
            vec![
                ms(&a.time).to_string(),
                a.who.clone(),
                role_name(a.role).into(),
                a.call.clone(),
                a.target.clone(),
                a.result.clone(),
            ]
        })
        .collect();
    table::print(
        &["AT (UNIX MS)", "WHO", "ROLE", "CALL", "TARGET", "RESULT"],
        &rows,
    );
    Ok(())
}

/// Who the token in use belongs to.
pub async fn whoami() -> Result<()> {
    let c = connect::client().await?;
    let r = connect::call(&c, pb::WhoAmIRequest {}, |mut c, r| async move {
        c.who_am_i(r).await
    })
    .await?;
    println!("{} ({})", r.user, role_name(r.role));
    Ok(())
}
