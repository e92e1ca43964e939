//! `local up|down|status`, `down`, `api info`.

use std::time::Duration;

use anyhow::Result;
use nembo_proto::v1 as pb;
use serde_json::json;

use crate::connect;
use crate::jobs::{node_json, node_state};
use crate::table;

/// `local up [--coordinators N]`.
pub async fn up(coordinators: u64) -> Result<()> {
    let info = match connect::running_local()? {
        // A member of a local cluster that died is brought back from its
        // disk, not left dead behind an "already running".
        Some(info) if info.pids.len() > 1 => {
            let restarted = connect::restart_dead_members()?;
            if restarted.is_empty() {
                println!("The local cluster is already running.");
            } else {
                println!(
                    "Restarted member(s) {restarted:?} of the local cluster from their disks."
                );
            }
            connect::running_local()?.unwrap_or(info)
        }
        Some(info) => {
            if answers(&info).await {
                println!("The local coordinator is already running.");
            } else {
                anyhow::bail!(
                    "the local coordinator (pid {}) runs but does not answer at {}; `nembo local down` stops it",
                    info.pid,
                    info.endpoint
                );
            }
            info
        }
        None if coordinators > 1 => connect::start_local_cluster(coordinators).await?,
        None => connect::start_local(false).await?,
    };
    if info.endpoints.len() > 1 {
        println!(
            "Local cluster: {} (pids {:?})",
            info.endpoints.join(", "),
            info.pids
        );
    } else {
        println!("Local coordinator: {} (pid {})", info.endpoint, info.pid);
    }
    Ok(())
}

/// One member of a local cluster, as seen from outside.
struct MemberHealth {
    id: usize,
    url: String,
    pid: u32,
    process: bool,
    answers: bool,
    leader: bool,
}

/// Each member's process and whether it answers (by itself, not through
/// another member), with the role it reports.
async fn member_health(info: &nembo_proto::api_info::ApiInfo) -> Vec<MemberHealth> {
    let mut out = Vec::new();
    for (i, (url, pid)) in info.endpoints.iter().zip(&info.pids).enumerate() {
        let alone = nembo_proto::api_info::ApiInfo {
            endpoint: url.clone(),
            endpoints: vec![url.clone()],
            ..info.clone()
        };
        let status = tokio::time::timeout(Duration::from_secs(3), async {
            let mut c = connect::connect_info(&alone).await.ok()?;
            c.get_cluster_status(pb::GetClusterStatusRequest {})
                .await
                .ok()?
                .into_inner()
                .status
        })
        .await
        .ok()
        .flatten();
        out.push(MemberHealth {
            id: i + 1,
            url: url.clone(),
            pid: *pid,
            process: connect::pid_alive(*pid),
            answers: status.is_some(),
            leader: status.is_some_and(|s| s.leader_id == (i + 1) as u64),
        });
    }
    out
}

/// Whether the coordinator at `info` answers within a few seconds.
async fn answers(info: &nembo_proto::api_info::ApiInfo) -> bool {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut c = connect::connect_info(info).await.ok()?;
        c.get_cluster_status(pb::GetClusterStatusRequest {})
            .await
            .ok()
    })
    .await
    .ok()
    .flatten()
    .is_some()
}

/// `down NODE...` / `down --all`: release nodes.
pub async fn down(nodes: Vec<String>, all: bool) -> Result<()> {
    let mut c = connect::client().await?;
    let req = pb::DownRequest {
        node_ids: nodes,
        all,
    };
    let r = connect::call(&c, req, |mut c, r| async move { c.down(r).await }).await?;
    if r.node_ids.is_empty() {
        println!("No nodes to release.");
        return Ok(());
    }
    println!("Releasing {}.", r.node_ids.join(", "));
    wait_terminated(&mut c, &r.node_ids, Duration::from_secs(30)).await
}

pub(crate) async fn wait_terminated(
    c: &mut nembo_proto::client::Client,
    ids: &[String],
    limit: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let nodes = connect::list_nodes(c).await?;
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
    // A coordinator that cannot release its nodes (its disk failed, say)
    // is still stopped: `local down` stops whatever runs, in any state.
    if let Err(e) = down(Vec::new(), true).await {
        eprintln!("warning: could not release the nodes first ({e:#}); stopping the coordinator(s) anyway");
    }
    let pids: Vec<u32> = if info.pids.is_empty() {
        vec![info.pid]
    } else {
        info.pids.clone()
    };
    for p in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*p as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    for round in 0..150 {
        if round == 100 {
            // Ten seconds of SIGTERM were not enough: no more asking.
            for p in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*p as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if !pids.iter().any(|p| connect::pid_alive(*p)) {
            let dir = if info.pids.is_empty() {
                connect::local_data_dir()?
            } else {
                connect::local_cluster_dir()?
            };
            println!("Stopped (state kept in {}).", dir.display());
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the coordinator(s) {pids:?} did not stop")
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
    let members = member_health(&info).await;
    let c = connect::client().await?;
    let status = cluster_status(&c).await?;
    let nodes = connect::list_nodes(&c).await?;
    if as_json {
        let v = json!({
            "running": true,
            "endpoint": info.endpoint,
            "pid": info.pid,
            "members": members.iter().map(|m| json!({
                "id": m.id, "url": m.url, "pid": m.pid, "process": m.process,
                "answers": m.answers, "leader": m.leader,
            })).collect::<Vec<_>>(),
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
    if members.len() > 1 {
        let rows: Vec<Vec<String>> = members
            .iter()
            .map(|m| {
                vec![
                    m.id.to_string(),
                    m.url.clone(),
                    m.pid.to_string(),
                    if m.process { "running" } else { "gone" }.into(),
                    match (m.answers, m.leader) {
                        (false, _) => "no answer".into(),
                        (true, true) => "leader".into(),
                        (true, false) => "follower".into(),
                    },
                ]
            })
            .collect();
        table::print(&["MEMBER", "URL", "PID", "PROCESS", "ROLE"], &rows);
        if members.iter().any(|m| !m.process || !m.answers) {
            println!("A member is down: `nembo local up` brings it back from its disk.");
        }
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .filter(|n| n.state != pb::NodeState::Terminated as i32)
        .map(|n| {
            vec![
                n.node_id.clone(),
                node_state(n.state),
                n.region.clone(),
                n.instance_type.clone(),
                table::ago(nembo_proto::clock::unix_ms(n.create_time.as_ref())),
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
        let mut v = json!({
            "endpoint": info.endpoint,
            "ca_cert_path": info.ca_cert_path,
            "token_path": info.token_path,
            "metrics_url": info.metrics_url,
        });
        if !info.metrics_urls.is_empty() {
            v["metrics_urls"] = json!(info.metrics_urls);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("endpoint:     {}", info.endpoint);
        println!("ca_cert_path: {}", info.ca_cert_path);
        println!("token_path:   {}", info.token_path);
        println!("metrics_url:  {}", info.metrics_url);
    }
    Ok(())
}

/// A membership change.
pub enum MemberOp {
    /// Add (learner, catch up, promote).
    Add(u64, String),
    /// Remove.
    Remove(u64),
    /// Hand leadership over.
    TransferLeader(u64),
}

/// `admin members list|add|remove|transfer-leader`.
pub async fn members(op: Option<MemberOp>, as_json: bool) -> Result<()> {
    let c = connect::client().await?;
    let status = match op {
        None => cluster_status(&c).await?,
        Some(MemberOp::Add(id, url)) => {
            eprintln!(
                "Adding member {id} as a learner; it becomes a voter once it has caught up ..."
            );
            let req = pb::AddMemberRequest { id, url };
            connect::call(&c, req, |mut c, r| async move { c.add_member(r).await })
                .await?
                .status
                .unwrap_or_default()
        }
        Some(MemberOp::Remove(id)) => {
            let req = pb::RemoveMemberRequest { id };
            connect::call(&c, req, |mut c, r| async move { c.remove_member(r).await })
                .await?
                .status
                .unwrap_or_default()
        }
        Some(MemberOp::TransferLeader(id)) => {
            let req = pb::TransferLeaderRequest { id };
            connect::call(
                &c,
                req,
                |mut c, r| async move { c.transfer_leader(r).await },
            )
            .await?
            .status
            .unwrap_or_default()
        }
    };
    if as_json {
        let v = json!({
            "leader_id": status.leader_id,
            "term": status.term,
            "commit_index": status.commit_index,
            "applied_index": status.applied_index,
            "members": status.members.iter().map(|m| json!({
                "id": m.id, "url": m.address, "leader": m.is_leader, "learner": m.is_learner,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = status
        .members
        .iter()
        .map(|m| {
            let role = if m.is_leader {
                "leader"
            } else if m.is_learner {
                "learner"
            } else {
                "voter"
            };
            vec![m.id.to_string(), role.to_string(), m.address.clone()]
        })
        .collect();
    table::print(&["ID", "ROLE", "URL"], &rows);
    println!(
        "term {}, commit {}, applied {}",
        status.term, status.commit_index, status.applied_index
    );
    Ok(())
}

/// The cluster as the answering member sees it.
async fn cluster_status(c: &nembo_proto::client::Client) -> Result<pb::ClusterStatus> {
    let r = connect::call(c, pb::GetClusterStatusRequest {}, |mut c, r| async move {
        c.get_cluster_status(r).await
    })
    .await?;
    Ok(r.status.unwrap_or_default())
}

/// `nembo local preempt NODE`: the node's metadata service announces its
/// preemption; its agent reads it like a cloud's notice.
pub async fn preempt(node: &str, format: &str, in_ms: u32) -> Result<()> {
    let c = connect::client().await?;
    let notice = match format {
        "aws" => pb::NoticeFormat::Aws,
        "gcp" => pb::NoticeFormat::Gcp,
        "azure" => pb::NoticeFormat::Azure,
        other => anyhow::bail!("--format {other}: expected aws, gcp or azure"),
    };
    let req = pb::InjectPreemptionRequest {
        node_id: node.to_string(),
        format: notice as i32,
        warning: (in_ms > 0).then(|| nembo_proto::clock::duration(i64::from(in_ms))),
    };
    let r = connect::call(
        &c,
        req,
        |mut c, r| async move { c.inject_preemption(r).await },
    )
    .await?;
    let deadline = nembo_proto::clock::unix_ms(r.deadline.as_ref());
    let left = (deadline - nembo_proto::clock::now_ms()).max(0);
    println!(
        "{node}: {format} preemption notice served; the node goes in {:.0} s",
        left as f64 / 1000.0
    );
    Ok(())
}
