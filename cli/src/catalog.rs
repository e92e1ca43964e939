//! Prices and spend: `show-gpus`, `check`, `cost-report`.

use anyhow::{Context, Result};
use nembo_proto::v1 as pb;
use serde_json::{json, Value};

use crate::connect;
use crate::table;

/// An offering as JSON.
pub fn offering_json(o: &pb::Offering) -> Value {
    json!({
        "provider": o.provider,
        "region": o.region,
        "zone": (!o.zone.is_empty()).then_some(&o.zone),
        "instance_type": o.instance_type,
        "accelerator": (!o.accelerator.is_empty()).then_some(&o.accelerator),
        "accelerator_count": o.accelerator_count,
        "cpus": o.cpus,
        "memory_gb": o.memory_gb,
        "hourly_price": o.hourly_price,
        "spot_price": o.spot_price,
        "spot": o.spot,
        "node_price": o.node_price,
        "hourly_cost": o.hourly_cost,
        "egress_cost": o.egress_cost,
        "simulated": o.simulated,
    })
}

/// `nembo show-gpus [H100[:8]] [--cloud X] [--spot]`.
pub async fn show_gpus(
    filter: Option<String>,
    cloud: Option<String>,
    spot: bool,
    as_json: bool,
) -> Result<()> {
    let (accelerator, accelerator_count) = match filter.as_deref() {
        None => (String::new(), 0.0),
        Some(f) => match f.split_once(':') {
            Some((name, n)) => (
                name.to_string(),
                n.parse::<f64>().ok().filter(|n| *n > 0.0).ok_or_else(|| {
                    anyhow::anyhow!("'{f}': the count after ':' must be a positive number")
                })?,
            ),
            None => (f.to_string(), 0.0),
        },
    };
    let client = connect::client().await?;
    let req = pb::ListOfferingsRequest {
        accelerator,
        accelerator_count,
        cloud: cloud.unwrap_or_default(),
        spot,
        ..Default::default()
    };
    let offerings = connect::all_pages(|page_token| {
        let req = pb::ListOfferingsRequest {
            page_token,
            ..req.clone()
        };
        let client = client.clone();
        async move {
            let r = connect::call(
                &client,
                req,
                |mut c, r| async move { c.list_offerings(r).await },
            )
            .await?;
            Ok((r.offerings, r.next_page_token))
        }
    })
    .await?;
    if as_json {
        let v: Vec<Value> = offerings.iter().map(offering_json).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "offerings": v }))?
        );
        return Ok(());
    }
    if offerings.is_empty() {
        println!(
            "No enabled provider offers {}: enable a cloud in providers.yaml (see `nembo check`).",
            if filter.is_some() { "that" } else { "a GPU" }
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = offerings
        .iter()
        .map(|o| {
            vec![
                table::simulated(
                    table::gpus_cell(&o.accelerator, o.accelerator_count),
                    o.simulated,
                ),
                o.provider.clone(),
                table::region_cell(o),
                o.instance_type.clone(),
                format!("{}", o.cpus),
                format!("{}", o.memory_gb),
                format!("${:.2}", o.hourly_price),
                o.spot_price
                    .map(|p| format!("${p:.2}"))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table::print(
        &[
            "GPUS", "PROVIDER", "REGION", "INSTANCE", "VCPUS", "MEM_GB", "$/H", "SPOT $/H",
        ],
        &rows,
    );
    table::explain_simulated(offerings.iter().any(|o| o.simulated));
    Ok(())
}

/// `nembo check`: exits non-zero when no provider is usable.
pub async fn check(as_json: bool) -> Result<i32> {
    let client = connect::client().await?;
    let r = connect::call(
        &client,
        pb::CheckProvidersRequest {},
        |mut c, r| async move { c.check_providers(r).await },
    )
    .await?;
    if as_json {
        let v: Vec<Value> = r
            .providers
            .iter()
            .map(|p| json!({"provider": p.provider, "ok": p.ok, "message": p.message}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "providers": v }))?
        );
    } else {
        for p in &r.providers {
            let mark = if p.ok { "enabled " } else { "disabled" };
            println!("  {mark}  {:<8} {}", p.provider, p.message);
        }
    }
    Ok(if r.providers.iter().any(|p| p.ok) {
        0
    } else {
        1
    })
}

/// `nembo catalog refresh PROVIDER`.
pub async fn refresh(provider: &str, out: Option<&std::path::Path>) -> Result<()> {
    let client = connect::client().await?;
    let r = connect::call(
        &client,
        pb::RefreshCatalogRequest {
            provider: provider.to_string(),
        },
        |mut c, r| async move { c.refresh_catalog(r).await },
    )
    .await?;
    println!(
        "{} offerings written to {} (used from the coordinators' next start)",
        r.offerings, r.path
    );
    if let Some(out) = out {
        std::fs::write(out, &r.csv).with_context(|| format!("write {}", out.display()))?;
        println!("and to {}", out.display());
    }
    Ok(())
}

/// `nembo cost-report`.
pub async fn cost_report(as_json: bool) -> Result<()> {
    let client = connect::client().await?;
    let r = connect::call(
        &client,
        pb::GetCostReportRequest {},
        |mut c, r| async move { c.get_cost_report(r).await },
    )
    .await?;
    if as_json {
        let nodes: Vec<Value> = r
            .nodes
            .iter()
            .map(|n| {
                json!({"node_id": n.node_id, "provider": n.provider, "region": n.region,
                       "instance_type": n.instance_type, "spot": n.spot,
                       "hourly_price": n.hourly_price, "hours": n.hours, "cost": n.cost,
                       "cluster": n.cluster})
            })
            .collect();
        let jobs: Vec<Value> = r
            .jobs
            .iter()
            .map(|j| json!({"job_id": j.job_id, "name": j.name, "node_hours": j.node_hours, "cost": j.cost}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"nodes": nodes, "jobs": jobs, "total": r.total}))?
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = r
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.node_id.clone(),
                if n.cluster.is_empty() {
                    "-".into()
                } else {
                    n.cluster.clone()
                },
                format!("{}/{}", n.provider, n.region),
                n.instance_type.clone(),
                if n.spot { "spot" } else { "on-demand" }.into(),
                format!("${:.2}", n.hourly_price),
                format!("{:.2}", n.hours),
                format!("${:.2}", n.cost),
            ]
        })
        .collect();
    table::print(
        &[
            "NODE", "CLUSTER", "WHERE", "INSTANCE", "MARKET", "$/H", "HOURS", "COST",
        ],
        &rows,
    );
    println!();
    let rows: Vec<Vec<String>> = r
        .jobs
        .iter()
        .map(|j| {
            vec![
                j.job_id.clone(),
                j.name.clone(),
                format!("{:.2}", j.node_hours),
                format!("${:.2}", j.cost),
            ]
        })
        .collect();
    table::print(&["JOB", "NAME", "NODE-HOURS", "COST"], &rows);
    println!("\nTotal: ${:.2}", r.total);
    Ok(())
}
