//! `local up|down|status`, `down`, `api info`.

use std::time::Duration;

use anyhow::{Context, Result};
use nembo_proto::v1 as pb;
use serde_json::json;

use crate::connect;
use crate::jobs::{node_json, node_state};
use crate::table;

/// `local up`.
pub async fn up() -> Result<()> {
    let info = match connect::running_local()? {
        Some(info) => {
            println!("The local coordinator is already running.");
            info
        }
        None => connect::start_local(false).await?,
    };
    println!("Local coordinator: {} (pid {})", info.endpoint, info.pid);
    Ok(())
}

/// `down NODE...` / `down --all`: release nodes.
pub async fn down(nodes: Vec<String>, all: bool) -> Result<()> {
    let mut c = connect::client().await?;
    let r = c
        .down(pb::DownRequest {
            node_ids: nodes,
            all,
        })
        .await?
        .into_inner();
    if r.node_ids.is_empty() {
        println!("No nodes to release.");
        return Ok(());
    }
    println!("Releasing {}.", r.node_ids.join(", "));
    wait_terminated(&mut c, &r.node_ids, Duration::from_secs(30)).await
}

async fn wait_terminated(
    c: &mut nembo_proto::client::Client,
    ids: &[String],
    limit: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let nodes = c
            .list_nodes(pb::ListNodesRequest {})
            .await?
            .into_inner()
            .nodes;
        let left: Vec<&pb::Node> = nodes
            .iter()
            .filter(|n| ids.contains(&n.node_id))
            .filter(|n| {
                !matches!(
                    pb::NodeState::try_from(n.state),
                    Ok(pb::NodeState::Terminated | pb::NodeState::Failed)
                )
            })
            .collect();
        if left.is_empty() {
            println!("Released.");
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "still terminating: {}",
                left.iter()
                    .map(|n| n.node_id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `local down`: release every node, then stop the coordinator.
pub async fn local_down() -> Result<()> {
    let Some(info) = connect::running_local()? else {
        println!("The local coordinator is not running.");
        return Ok(());
    };
    down(Vec::new(), true).await?;
    let pid = nix::unistd::Pid::from_raw(info.pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
        .context("stop the coordinator")?;
    for _ in 0..100 {
        if !connect::pid_alive(info.pid) {
            println!(
                "Local coordinator stopped (state kept in {}).",
                connect::local_data_dir()?.display()
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the coordinator (pid {}) did not stop", info.pid)
}

/// `local status`.
pub async fn local_status(as_json: bool) -> Result<()> {
    let Some(info) = connect::running_local()? else {
        if as_json {
            println!("{}", json!({ "running": false }));
        } else {
            println!("The local coordinator is not running.");
        }
        return Ok(());
    };
    let mut c = connect::client().await?;
    let status = c
        .get_cluster_status(pb::GetClusterStatusRequest {})
        .await?
        .into_inner();
    let nodes = c
        .list_nodes(pb::ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    if as_json {
        let v = json!({
            "running": true,
            "endpoint": info.endpoint,
            "pid": info.pid,
            "term": status.term,
            "leader_id": status.leader_id,
            "commit_index": status.commit_index,
            "applied_index": status.applied_index,
            "nodes": nodes.iter().map(node_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "Local coordinator running at {} (pid {}); raft term {}, applied index {}.",
        info.endpoint, info.pid, status.term, status.applied_index
    );
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .filter(|n| n.state != pb::NodeState::Terminated as i32)
        .map(|n| {
            vec![
                n.node_id.clone(),
                node_state(n.state),
                n.region.clone(),
                n.instance_type.clone(),
                table::ago(n.created_at_unix_ms),
            ]
        })
        .collect();
    if !rows.is_empty() {
        table::print(&["NODE", "STATE", "REGION", "TYPE", "CREATED"], &rows);
    }
    Ok(())
}

/// `api info`.
pub async fn api_info(as_json: bool) -> Result<()> {
    let info = connect::resolve(true).await?;
    if as_json {
        let v = json!({
            "endpoint": info.endpoint,
            "ca_cert_path": info.ca_cert_path,
            "token_path": info.token_path,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("endpoint:     {}", info.endpoint);
        println!("ca_cert_path: {}", info.ca_cert_path);
        println!("token_path:   {}", info.token_path);
    }
    Ok(())
}
