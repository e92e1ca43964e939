//! `nembo admin users|tokens|nodes|audit`: who may use the cluster, and
//! what they did.

use anyhow::{Context, Result};
use nembo_proto::v1 as pb;
use serde_json::json;

use crate::connect;
use crate::table;

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
        role: role.into(),
    };
    let r = c.clone().create_user(req).await?.into_inner();
    eprintln!(
        "user {} ({}) created; its token is below and is not shown again:",
        r.name, r.role
    );
    println!("{}", r.token);
    Ok(())
}

/// Lists users.
pub async fn user_list(as_json: bool) -> Result<()> {
    let c = connect::client().await?;
    let r = connect::call(&c, pb::ListUsersRequest {}, |mut c, r| async move {
        c.list_users(r).await
    })
    .await?;
    if as_json {
        let v: Vec<_> = r
            .users
            .iter()
            .map(|u| json!({"name": u.name, "role": u.role, "token_id": u.token_id, "created_unix_ms": u.created_unix_ms, "revoked_unix_ms": u.revoked_unix_ms}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = r
        .users
        .iter()
        .map(|u| {
            vec![
                u.name.clone(),
                u.role.clone(),
                u.token_id.clone(),
                stamp(u.created_unix_ms),
                if u.revoked_unix_ms > 0 {
                    format!("revoked {}", stamp(u.revoked_unix_ms))
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
        ttl_s: (ttl_ms / 1000).max(1),
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
        r.expires_unix_ms,
        table::duration(r.expires_unix_ms - nembo_proto::clock::now_ms()),
        node.map(|n| format!(" --node-id {n}")).unwrap_or_default()
    );
    println!("{}", r.token);
    Ok(())
}

/// Lists join tokens.
pub async fn token_list(as_json: bool) -> Result<()> {
    let c = connect::client().await?;
    let r = connect::call(&c, pb::ListJoinTokensRequest {}, |mut c, r| async move {
        c.list_join_tokens(r).await
    })
    .await?;
    if as_json {
        let v: Vec<_> = r
            .tokens
            .iter()
            .map(|t| json!({"id": t.id, "description": t.description, "created_by": t.created_by, "created_unix_ms": t.created_unix_ms, "expires_unix_ms": t.expires_unix_ms, "uses_left": t.uses_left, "revoked_unix_ms": t.revoked_unix_ms, "node_ids": t.node_ids, "for_node_id": t.for_node_id}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let now = nembo_proto::clock::now_ms();
    let rows: Vec<Vec<String>> = r
        .tokens
        .iter()
        .map(|t| {
            let status = if t.revoked_unix_ms > 0 {
                "revoked".to_string()
            } else if now >= t.expires_unix_ms {
                "expired".to_string()
            } else if t.uses_left == 0 {
                "used".to_string()
            } else {
                format!(
                    "{} left, expires in {}",
                    t.uses_left,
                    table::duration(t.expires_unix_ms - now)
                )
            };
            vec![
                t.id.clone(),
                t.created_by.clone(),
                stamp(t.created_unix_ms),
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

/// Prints the newest audit records.
pub async fn audit(limit: u32, as_json: bool) -> Result<()> {
    let c = connect::client().await?;
    let r = connect::call(
        &c,
        pb::GetAuditLogRequest { limit },
        |mut c, r| async move { c.get_audit_log(r).await },
    )
    .await
    .context("read the audit log")?;
    if as_json {
        let v: Vec<_> = r
            .records
            .iter()
            .map(|a| json!({"at_unix_ms": a.at_unix_ms, "who": a.who, "role": a.role, "call": a.call, "target": a.target, "result": a.result}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = r
        .records
        .iter()
        .map(|a| {
            vec![
                a.at_unix_ms.to_string(),
                a.who.clone(),
                a.role.clone(),
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
    println!("{} ({})", r.user, r.role);
    Ok(())
}
