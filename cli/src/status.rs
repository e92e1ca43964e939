//! `nembo status` (clusters, nodes and jobs) and `nembo queue`.

use anyhow::{bail, Result};
use nembo_proto::client::Client;
use nembo_proto::v1 as pb;
use serde_json::json;

use crate::connect;
use crate::jobs::{
    accels, all_jobs, job_json, jobs_of, node_json, node_state, print_jobs, read_request,
};
use crate::table;

/// What `status` and `queue` show.
pub struct View {
    /// Machine-readable output.
    pub json: bool,
    /// Clusters and nodes too (`status`), or jobs only (`queue`).
    pub with_nodes: bool,
    /// From the contacted member's own state.
    pub stale: bool,
    /// Ask the providers what they hold (`--refresh`).
    pub refresh: bool,
}

pub async fn status(view: View, clusters_named: &[String]) -> Result<()> {
    let View {
        json: as_json,
        with_nodes,
        stale,
        refresh,
    } = view;
    let c = connect::client().await?;
    if with_nodes {
        let clusters = crate::clusters::list_refreshed(&c, clusters_named, stale, refresh).await?;
        if let Some(missing) = clusters_named
            .iter()
            .find(|n| !clusters.iter().any(|c| c.name == **n))
        {
            bail!("cluster {missing} not found");
        }
        if !clusters_named.is_empty() {
            if as_json {
                let v = json!({ "clusters": clusters.iter().map(crate::clusters::cluster_json).collect::<Vec<_>>() });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                crate::clusters::print_table(&clusters);
            }
            return Ok(());
        }
        return status_all(&c, as_json, stale, clusters).await;
    }
    let cluster = clusters_named.first().map_or("", |s| s.as_str());
    let jobs = jobs_of(&c, cluster, stale).await?;
    print_jobs(&jobs, as_json)
}

async fn status_all(
    c: &Client,
    as_json: bool,
    stale: bool,
    clusters: Vec<pb::Cluster>,
) -> Result<()> {
    let with_nodes = true;
    let jobs = all_jobs(c, stale).await?;
    let c = c.clone();
    let nodes = if with_nodes {
        connect::all_pages(|page_token| {
            let req = pb::ListNodesRequest {
                page_token,
                ..Default::default()
            };
            let c = &c;
            async move {
                let r = connect::call(c, req, |mut c, r| async move {
                    c.list_nodes(read_request(r, stale)).await
                })
                .await?;
                Ok((r.nodes, r.next_page_token))
            }
        })
        .await?
    } else {
        Vec::new()
    };
    if as_json {
        let mut v = json!({ "jobs": jobs.iter().map(job_json).collect::<Vec<_>>() });
        if with_nodes {
            v["nodes"] = nodes.iter().map(node_json).collect();
            v["clusters"] = clusters.iter().map(crate::clusters::cluster_json).collect();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if with_nodes {
        println!("Clusters");
        crate::clusters::print_table(&clusters);
        println!("\nNodes");
        let rows: Vec<Vec<String>> = nodes
            .iter()
            .filter(|n| n.state != pb::NodeState::Terminated as i32)
            .map(|n| {
                let r = n.resources.clone().unwrap_or_default();
                // An unhealthy node shows why: it takes no new work.
                let (state, message) = if n.unhealthy_reason.is_empty() {
                    (node_state(n.state), n.message.clone())
                } else {
                    (
                        format!("{} (UNHEALTHY)", node_state(n.state)),
                        n.unhealthy_reason.clone(),
                    )
                };
                vec![
                    n.node_id.clone(),
                    state,
                    format!("{}/{}", n.provider, n.region),
                    n.instance_type.clone(),
                    table::simulated(accels(&n.resources), n.simulated),
                    format!("{}", nembo_domain::task::fmt_num(r.cpus)),
                    if n.job_ids.is_empty() {
                        "-".into()
                    } else {
                        n.job_ids.join(",")
                    },
                    message,
                ]
            })
            .collect();
        table::print(
            &[
                "NODE", "STATE", "INFRA", "TYPE", "GPUS", "CPUS", "JOBS", "MESSAGE",
            ],
            &rows,
        );
        table::explain_simulated(
            nodes
                .iter()
                .any(|n| n.simulated && n.state != pb::NodeState::Terminated as i32),
        );
        println!("\nJobs");
    }
    print_jobs(&jobs, false)
}
