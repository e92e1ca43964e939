//! What can be bought and what it cost: offerings, provider checks, catalog
//! refreshes and the cost report.

use nembo_proto::clock::{now_ms, timestamp};
use nembo_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::convert;
use super::gate::audited;
use super::paging::PageRequest;
use crate::context::Ctx;

pub async fn list_offerings(
    ctx: &Ctx,
    request: Request<pb::ListOfferingsRequest>,
) -> Result<Response<pb::ListOfferingsResponse>, Status> {
    let req = request.into_inner();
    let page = PageRequest::<usize>::new("offerings", req.page_size, &req.page_token)?;
    let want_gpu = (!req.accelerator.is_empty()).then(|| req.accelerator.to_ascii_lowercase());
    let mut offerings: Vec<&nembo_domain::state::Offering> = ctx
        .offerings
        .iter()
        .filter(|o| req.cloud.is_empty() || o.provider == req.cloud)
        .filter(|o| !req.spot || o.spot_price.is_some())
        .filter(|o| match &want_gpu {
            None => !o.resources.accelerators.is_empty(),
            Some(g) => o.resources.accelerators.iter().any(|(k, n)| {
                k.to_ascii_lowercase() == *g
                    && (req.accelerator_count <= 0.0 || *n == req.accelerator_count)
            }),
        })
        .collect();
    offerings.sort_by(|a, b| {
        a.price(req.spot)
            .total_cmp(&b.price(req.spot))
            .then_with(|| (&a.provider, &a.region).cmp(&(&b.provider, &b.region)))
    });
    // Keyed by position: a member's offerings are fixed while it runs.
    let start = page.after.map_or(0, |last| last + 1);
    let (offerings, next_page_token) = page.take(
        offerings
            .into_iter()
            .enumerate()
            .skip(start)
            .map(|(i, o)| (i, convert::offering_to_proto(o))),
    );
    Ok(Response::new(pb::ListOfferingsResponse {
        offerings,
        next_page_token,
    }))
}

pub async fn check_providers(
    ctx: &Ctx,
    _request: Request<pb::CheckProvidersRequest>,
) -> Result<Response<pb::CheckProvidersResponse>, Status> {
    let mut providers = Vec::new();
    for (name, p) in &ctx.providers {
        let answer = tokio::time::timeout(std::time::Duration::from_secs(20), p.check()).await;
        let (ok, message) = match answer {
            Ok(Ok(m)) => (true, m),
            Ok(Err(e)) => (false, e.to_string()),
            Err(_) => (false, "no answer within 20 s".to_string()),
        };
        providers.push(pb::ProviderCheck {
            provider: name.clone(),
            ok,
            message,
        });
    }
    providers.extend(
        ctx.providers_not_enabled
            .iter()
            .map(|(name, why)| pb::ProviderCheck {
                provider: name.to_string(),
                ok: false,
                message: why.to_string(),
            }),
    );
    Ok(Response::new(pb::CheckProvidersResponse { providers }))
}

pub async fn refresh_catalog(
    ctx: &Ctx,
    request: Request<pb::RefreshCatalogRequest>,
) -> Result<Response<pb::RefreshCatalogResponse>, Status> {
    let name = request.into_inner().provider;
    let provider = ctx.providers.get(&name).ok_or_else(|| {
        Status::invalid_argument(format!("provider: '{name}' is not enabled here"))
    })?;
    let offerings = provider
        .refresh_catalog()
        .await
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    if offerings.is_empty() {
        return Err(Status::failed_precondition(format!(
            "{name} listed no GPU offerings; the catalog is left as it was"
        )));
    }
    let csv = crate::provider::catalog::render(
        &[
            format!("source: {name}'s API, fetched by `nembo catalog refresh {name}`"),
            format!("date: {} (unix ms)", now_ms()),
            "prices: per hour, as the API answered (Seeweb: EUR)".into(),
        ],
        &offerings,
    );
    let path = ctx.catalog_dir.join(format!("{name}.csv"));
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&ctx.catalog_dir)?;
        let tmp = path.with_extension("csv.tmp");
        std::fs::write(&tmp, &csv)?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
    Ok(audited(
        pb::RefreshCatalogResponse {
            path: path.display().to_string(),
            offerings: offerings.len() as u32,
            csv,
        },
        format!("catalog {}", path.display()),
    ))
}

pub async fn get_cost_report(
    ctx: &Ctx,
    _request: Request<pb::GetCostReportRequest>,
) -> Result<Response<pb::GetCostReportResponse>, Status> {
    let view = ctx.raft.view();
    let now = now_ms();
    let report = nembo_domain::cost::report(&view.state, now);
    let nodes = report
        .nodes
        .iter()
        .filter_map(|c| {
            let n = view.state.nodes.get(&c.node_id)?;
            Some(pb::NodeCost {
                node_id: n.id.clone(),
                provider: n.provider.clone(),
                region: n.region.clone(),
                instance_type: n.instance_type.clone(),
                spot: n.spot,
                hourly_price: n.hourly_price,
                state: convert::node_state(n.state) as i32,
                hours: c.hours,
                cost: c.cost,
                cluster: c.cluster.clone().unwrap_or_default(),
            })
        })
        .collect();
    let jobs = report
        .jobs
        .iter()
        .filter_map(|c| {
            let j = view.state.jobs.get(&c.job_id)?;
            Some(pb::JobCost {
                job_id: j.id.to_string(),
                name: j.name().to_string(),
                state: convert::job_state(j.state) as i32,
                node_hours: c.node_hours,
                cost: c.cost,
            })
        })
        .collect();
    Ok(Response::new(pb::GetCostReportResponse {
        nodes,
        jobs,
        total: report.total,
        time: timestamp(now),
    }))
}
