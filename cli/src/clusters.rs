//! Named clusters: status, stop, start, down, autostop, and cancel on one.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nembo_proto::client::Client;
use nembo_proto::v1 as pb;
use serde_json::{json, Value};

use crate::connect;
use crate::table;

/// `UP`, `INIT`, `STOPPED`.
pub fn state_name(v: i32) -> String {
    pb::ClusterState::try_from(v)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("CLUSTER_STATE_")
                .to_string()
        })
        .unwrap_or_else(|_| v.to_string())
}

/// `30m`, `30m (down)`, `-`.
fn autostop_cell(a: &Option<pb::AutostopSetting>) -> String {
    match a {
        Some(a) if !a.disabled => {
            let window = if a.idle_seconds.is_multiple_of(60) {
                format!("{}m", a.idle_seconds / 60)
            } else {
                format!("{}s", a.idle_seconds)
            };
            let mut cell = window;
            if a.down {
                cell.push_str(" (down)");
            }
            if !a.wait_for.is_empty() && a.wait_for != "jobs_and_ssh" {
                cell.push_str(&format!(" [{}]", a.wait_for));
            }
            cell
        }
        _ => "-".into(),
    }
}

/// Every cluster (or those named), by name.
pub async fn list(c: &Client, names: &[String], stale: bool) -> Result<Vec<pb::Cluster>> {
    list_refreshed(c, names, stale, false).await
}

/// The same; with `refresh`, with what each node's provider says it holds.
pub async fn list_refreshed(
    c: &Client,
    names: &[String],
    stale: bool,
    refresh: bool,
) -> Result<Vec<pb::Cluster>> {
    connect::all_pages(|page_token| {
        let req = pb::ListClustersRequest {
            names: names.to_vec(),
            page_token,
            refresh,
            ..Default::default()
        };
        async move {
            let r = connect::call(c, req, |mut c, r| async move {
                c.list_clusters(crate::jobs::read_request(r, stale)).await
            })
            .await?;
            Ok((r.clusters, r.next_page_token))
        }
    })
    .await
}

/// A cluster as JSON.
pub fn cluster_json(c: &pb::Cluster) -> Value {
    json!({
        "name": c.name,
        "owner": c.owner,
        "state": state_name(c.state),
        "node_ids": c.node_ids,
        "num_nodes": c.num_nodes,
        "resources": c.resources,
        "infra": c.infra,
        "instance_type": c.instance_type,
        "launched_at_unix_ms": crate::jobs::ms(&c.launch_time),
        "autostop": c.autostop.as_ref().filter(|a| !a.disabled).map(|a| json!({
            "idle_seconds": a.idle_seconds,
            "down": a.down,
            "wait_for": if a.wait_for.is_empty() { "jobs_and_ssh" } else { a.wait_for.as_str() },
        })),
        "cost": c.cost,
        "hourly_price": c.hourly_price,
        "spot": c.spot,
        "active_jobs": c.active_jobs,
        "ssh_sessions": c.ssh_sessions,
        "message": c.message,
        "provider_view": c.provider_view,
    })
}

/// The clusters table of `nembo status`.
pub fn print_table(clusters: &[pb::Cluster]) {
    let rows: Vec<Vec<String>> = clusters
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                if c.infra.is_empty() {
                    "-".into()
                } else {
                    c.infra.clone()
                },
                format!(
                    "{}x {}{}",
                    c.num_nodes,
                    if c.instance_type.is_empty() {
                        c.resources.clone()
                    } else {
                        format!("{} ({})", c.instance_type, c.resources)
                    },
                    if c.spot { " [spot]" } else { "" }
                ),
                state_name(c.state),
                table::ago(crate::jobs::ms(&c.launch_time)),
                autostop_cell(&c.autostop),
                c.active_jobs.to_string(),
                format!("${:.2}", c.cost),
                c.message.clone(),
            ]
        })
        .collect();
    table::print(
        &[
            "NAME",
            "INFRA",
            "RESOURCES",
            "STATUS",
            "LAUNCHED",
            "AUTOSTOP",
            "JOBS",
            "COST",
            "MESSAGE",
        ],
        &rows,
    );
    for c in clusters.iter().filter(|c| !c.provider_view.is_empty()) {
        println!("\n{} (--refresh):", c.name);
        for l in &c.provider_view {
            println!("  {l}");
        }
    }
}

/// Asks "Proceed? [y/N]" on a terminal; elsewhere (a script) proceeds.
pub(crate) fn confirm(what: &str, yes: bool) -> Result<bool> {
    if yes || !std::io::stdin().is_terminal() {
        return Ok(true);
    }
    eprint!("{what}. Proceed? [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

/// Waits until every named cluster is in `want` (or gone, for `None`).
async fn wait_for(c: &Client, names: &[String], want: Option<pb::ClusterState>) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let now = list(c, names, false).await?;
        let done = match want {
            None => now.is_empty(),
            Some(s) => now.iter().all(|c| c.state == s as i32) && now.len() == names.len(),
        };
        if done {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "still waiting: {}",
                now.iter()
                    .map(|c| format!("{} is {}", c.name, state_name(c.state)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `nembo stop NAME...`.
pub async fn stop(names: &[String], yes: bool) -> Result<()> {
    let c = connect::client().await?;
    if !confirm(
        &format!(
            "Stopping {} (their running jobs are cancelled)",
            names.join(", ")
        ),
        yes,
    )? {
        bail!("aborted");
    }
    for name in names {
        let req = pb::StopClusterRequest { name: name.clone() };
        connect::call(&c, req, |mut c, r| async move { c.stop_cluster(r).await })
            .await
            .with_context(|| format!("stop {name}"))?;
        eprintln!("Stopping cluster {name}...");
    }
    wait_for(&c, names, Some(pb::ClusterState::Stopped)).await?;
    eprintln!(
        "Stopped: {} (disks kept; `nembo start` brings them back).",
        names.join(", ")
    );
    Ok(())
}

/// `nembo start NAME...`.
pub async fn start(names: &[String]) -> Result<()> {
    let c = connect::client().await?;
    for name in names {
        let req = pb::StartClusterRequest { name: name.clone() };
        connect::call(&c, req, |mut c, r| async move { c.start_cluster(r).await })
            .await
            .with_context(|| format!("start {name}"))?;
        eprintln!("Starting cluster {name}...");
    }
    wait_for(&c, names, Some(pb::ClusterState::Up)).await?;
    eprintln!("Up: {}.", names.join(", "));
    Ok(())
}

/// `nembo down NAME... | -a`: clusters are torn down; a `node-N` name
/// releases that node, as before clusters existed.
pub async fn down(names: Vec<String>, all: bool, yes: bool) -> Result<()> {
    let c = connect::client().await?;
    let known = list(&c, &[], false).await?;
    let (clusters, nodes): (Vec<String>, Vec<String>) = if all {
        // Every cluster the caller may tear down: all of them for an admin,
        // its own for a user (everyone can see every cluster).
        let me = connect::call(&c, pb::WhoAmIRequest {}, |mut c, r| async move {
            c.who_am_i(r).await
        })
        .await?;
        let admin = me.role == pb::Role::Admin as i32;
        (
            known
                .iter()
                .filter(|k| admin || k.owner == me.user)
                .map(|k| k.name.clone())
                .collect(),
            Vec::new(),
        )
    } else {
        names
            .into_iter()
            .partition(|n| known.iter().any(|c| c.name == *n) || !n.starts_with("node-"))
    };
    if !clusters.is_empty() {
        if !confirm(&format!("Tearing down {}", clusters.join(", ")), yes)? {
            bail!("aborted");
        }
        let mut released = Vec::new();
        for name in &clusters {
            let req = pb::DownClusterRequest { name: name.clone() };
            let r = connect::call(&c, req, |mut c, r| async move { c.down_cluster(r).await })
                .await
                .with_context(|| format!("down {name}"))?;
            released.extend(r.node_ids);
            eprintln!("Tearing down cluster {name}...");
        }
        wait_for(&c, &clusters, None).await?;
        let mut client = c.clone();
        crate::local::wait_terminated(&mut client, &released, Duration::from_secs(60)).await?;
        eprintln!("Terminated: {}.", clusters.join(", "));
    }
    if all || !nodes.is_empty() {
        match crate::local::down(nodes, all).await {
            // `-a` from a user who may not release other nodes: their
            // clusters are down, which is what they asked.
            Err(e) if all && is_permission_denied(&e) => {}
            other => other?,
        }
    }
    Ok(())
}

fn is_permission_denied(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tonic::Status>()
        .is_some_and(|s| s.code() == tonic::Code::PermissionDenied)
}

/// `nembo autostop NAME... -i N [--down] [--wait-for W] | --cancel`.
pub async fn autostop(
    names: &[String],
    idle: Option<String>,
    down: bool,
    wait_for: Option<String>,
    cancel: bool,
) -> Result<()> {
    let c = connect::client().await?;
    let setting = if cancel {
        pb::AutostopSetting {
            disabled: true,
            ..Default::default()
        }
    } else {
        // SkyPilot's `sky autostop` defaults to 5 minutes.
        let w = idle.unwrap_or_else(|| "5".into());
        pb::AutostopSetting {
            disabled: false,
            idle_seconds: nembo_domain::task::Autostop::parse_window(&w)
                .with_context(|| format!("-i {w}: expected minutes (30), or 90s, 2h"))?,
            down,
            wait_for: wait_for.unwrap_or_default(),
        }
    };
    for name in names {
        let req = pb::SetAutostopRequest {
            name: name.clone(),
            autostop: Some(setting.clone()),
        };
        let r = connect::call(&c, req, |mut c, r| async move { c.set_autostop(r).await })
            .await
            .with_context(|| format!("autostop {name}"))?;
        let cell = r
            .cluster
            .map(|c| autostop_cell(&c.autostop))
            .unwrap_or_default();
        if cancel {
            println!("{name}: autostop cancelled");
        } else {
            println!("{name}: autostop {cell}");
        }
    }
    Ok(())
}

/// `nembo cancel NAME JOB... | NAME -a`.
pub async fn cancel(cluster: &str, jobs: &[String], all: bool) -> Result<()> {
    let c = connect::client().await?;
    let ids: Vec<String> = if all {
        crate::jobs::cluster_jobs(&c, cluster)
            .await?
            .into_iter()
            .filter(|j| !crate::jobs::is_terminal(j.state))
            .map(|j| j.job_id)
            .collect()
    } else {
        let on: Vec<String> = crate::jobs::cluster_jobs(&c, cluster)
            .await?
            .into_iter()
            .map(|j| j.job_id)
            .collect();
        if let Some(j) = jobs.iter().find(|j| !on.contains(j)) {
            bail!("job {j} is not on cluster {cluster}");
        }
        jobs.to_vec()
    };
    if ids.is_empty() {
        println!("No jobs to cancel on {cluster}.");
        return Ok(());
    }
    crate::jobs::cancel(&ids).await
}
