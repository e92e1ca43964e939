//! `nembo serve`: services (SkyServe's `sky serve`): up, status, update,
//! logs, down.

use anyhow::{bail, Context, Result};
use nembo_proto::client::Client;
use nembo_proto::v1 as pb;

use crate::connect;
use crate::table;

/// `nembo serve …`.
#[derive(clap::Subcommand, Debug)]
pub enum ServeCmd {
    /// Bring up a service: a task with a `service:` section; its replicas
    /// serve behind a load balancer on every coordinator. Prints the endpoint.
    Up(Box<UpArgs>),
    /// Services, their replicas (state, infra, spot), load and endpoints.
    Status {
        /// Only these services.
        names: Vec<String>,
        /// Print the endpoint of the one service named, and nothing else.
        #[arg(long)]
        endpoint: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Roll out a new version of a service's task.
    Update(Box<UpdateArgs>),
    /// A replica's output (setup and run).
    Logs {
        /// The service.
        name: String,
        /// The replica id (`serve status`); default: the oldest live one.
        replica: Option<u32>,
        /// The load balancers' own log.
        #[arg(long)]
        load_balancer: bool,
        /// Print what is there and exit, rather than follow.
        #[arg(long)]
        no_follow: bool,
    },
    /// Take services down: their replicas stop and their endpoints close.
    Down {
        /// The services.
        names: Vec<String>,
        /// Every service you may take down.
        #[arg(short, long)]
        all: bool,
        /// Do not ask.
        #[arg(short, long)]
        yes: bool,
    },
}

/// `serve up`.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// The service's name (default: `nembo-service-<4 hex>`).
    #[arg(short = 'n', long = "service-name")]
    name: Option<String>,
    #[command(flatten)]
    task: TaskArgs,
}

/// `serve update`.
#[derive(clap::Args, Debug)]
pub struct UpdateArgs {
    /// The service.
    name: String,
    #[command(flatten)]
    task: TaskArgs,
    /// rolling: old replicas go as new ones turn READY; blue_green: the
    /// new version takes all traffic once `min_replicas` are READY.
    #[arg(long, default_value = "rolling", value_parser = ["rolling", "blue_green"])]
    mode: String,
}

/// The task of `serve up` and `serve update`, as `launch` takes it.
#[derive(clap::Args, Debug)]
pub struct TaskArgs {
    /// Task file (SkyPilot YAML) with a `service:` section.
    task: String,
    /// Set an env var of the task; `NAME` alone passes this shell's value.
    #[arg(long = "env", value_name = "NAME[=VALUE]", value_parser = crate::parse_env_arg)]
    envs: Vec<(String, String)>,
    #[command(flatten)]
    overrides: crate::overrides::Overrides,
}

/// The task, its env overrides and its uploaded sources. The caller must
/// see `rest` through: replicas wait for the files it brings.
struct Prepared {
    yaml: String,
    envs: std::collections::BTreeMap<String, String>,
    shipped: crate::upload::Shipped,
}

async fn prepare(client: &Client, t: &TaskArgs) -> Result<Prepared> {
    let yaml = crate::jobs::prepare_task(&t.task, &t.overrides, false, None)?;
    let mut envs = t.overrides.env_file_vars()?;
    envs.extend(t.envs.iter().cloned());
    let envs = crate::env_map(&envs);
    let spec = nembo_domain::task::parse_task_yaml(&yaml, &envs)?;
    if spec.service.is_none() {
        bail!(
            "{}: the task has no `service:` section; give it one (at least a readiness_probe), \
             or run it as a job with `nembo launch`",
            t.task
        );
    }
    let sources = crate::upload::local_sources(&spec)?;
    let shipped = crate::upload::ship(client, &sources).await?;
    Ok(Prepared {
        yaml,
        envs,
        shipped,
    })
}

/// The upload behind a serve call, seen through once the call was
/// taken; abandoned (its announcement lapses) if the call was refused.
async fn settle_upload<T>(shipped: crate::upload::Shipped, call: Result<T>) -> Result<T> {
    match (call, shipped.rest) {
        (Err(e), Some(rest)) => {
            rest.abort();
            Err(e)
        }
        (Err(e), None) => Err(e),
        (Ok(r), Some(rest)) => {
            rest.await.context("upload")??;
            Ok(r)
        }
        (Ok(r), None) => Ok(r),
    }
}

pub async fn run(cmd: ServeCmd) -> Result<i32> {
    match cmd {
        ServeCmd::Up(a) => up(*a).await,
        ServeCmd::Status {
            names,
            endpoint,
            json,
        } => status(&names, endpoint, json).await,
        ServeCmd::Update(a) => update(&a.name, &a.task, &a.mode).await,
        ServeCmd::Logs {
            name,
            replica,
            load_balancer,
            no_follow,
        } => logs(&name, replica, load_balancer, !no_follow).await,
        ServeCmd::Down { names, all, yes } => down(names, all, yes).await,
    }
    .map(|()| 0)
}

fn endpoint_url(s: &pb::Service) -> String {
    let scheme = if s.tls { "https" } else { "http" };
    match s.endpoints.first() {
        Some(e) => format!("{scheme}://{e}"),
        None => String::new(),
    }
}

async fn up(a: UpArgs) -> Result<()> {
    let client = connect::client().await?;
    let p = prepare(&client, &a.task).await?;
    let req = pb::ServeUpRequest {
        name: a.name.clone().unwrap_or_default(),
        task_yaml: p.yaml,
        env_overrides: p.envs.into_iter().collect(),
        uploads: p.shipped.uploads.clone().into_iter().collect(),
    };
    let r = connect::call(&client, req, |mut c, r| async move { c.serve_up(r).await }).await;
    let r = settle_upload(p.shipped, r).await?;
    let s = r
        .service
        .context("the coordinator answered without the service")?;
    println!("Service {} is up (version {}).", s.name, s.version);
    println!("Endpoint: {}", endpoint_url(&s));
    if s.endpoints.len() > 1 {
        println!("Every coordinator serves it: {}", s.endpoints.join(", "));
    }
    println!(
        "Replicas are starting; watch them with `nembo serve status {}`, then try \
         `curl {}`.",
        s.name,
        endpoint_url(&s)
    );
    Ok(())
}

async fn update(name: &str, t: &TaskArgs, mode: &str) -> Result<()> {
    let client = connect::client().await?;
    let p = prepare(&client, t).await?;
    let mode = match mode {
        "blue_green" => pb::UpdateMode::BlueGreen,
        _ => pb::UpdateMode::Rolling,
    };
    let req = pb::ServeUpdateRequest {
        name: name.to_string(),
        task_yaml: p.yaml,
        env_overrides: p.envs.into_iter().collect(),
        uploads: p.shipped.uploads.clone().into_iter().collect(),
        mode: mode as i32,
    };
    let r = connect::call(
        &client,
        req,
        |mut c, r| async move { c.serve_update(r).await },
    )
    .await;
    let r = settle_upload(p.shipped, r).await?;
    let s = r
        .service
        .context("the coordinator answered without the service")?;
    println!(
        "Service {} is updating to version {} ({}).",
        s.name,
        s.version,
        if mode == pb::UpdateMode::BlueGreen {
            "blue-green: the new version takes all traffic once enough of it is READY"
        } else {
            "rolling: old replicas go as new ones turn READY"
        }
    );
    Ok(())
}

async fn list(client: &Client, names: &[String]) -> Result<Vec<pb::Service>> {
    connect::all_pages(|page_token| {
        let req = pb::ListServicesRequest {
            names: names.to_vec(),
            page_token,
            ..Default::default()
        };
        async move {
            let r = connect::call(
                client,
                req,
                |mut c, r| async move { c.list_services(r).await },
            )
            .await?;
            Ok((r.services, r.next_page_token))
        }
    })
    .await
}

async fn status(names: &[String], endpoint: bool, json: bool) -> Result<()> {
    let client = connect::client().await?;
    let services = list(&client, names).await?;
    for n in names {
        if !services.iter().any(|s| &s.name == n) {
            bail!("service {n} not found");
        }
    }
    if endpoint {
        let [s] = services.as_slice() else {
            bail!("--endpoint takes one service name");
        };
        println!("{}", endpoint_url(s));
        return Ok(());
    }
    if json {
        let v: Vec<serde_json::Value> = services.iter().map(service_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if services.is_empty() {
        println!("No services. Bring one up with `nembo serve up TASK.yaml`.");
        return Ok(());
    }
    println!("Services");
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            let ready = s.replicas.iter().filter(|r| r.status == "READY").count();
            vec![
                s.name.clone(),
                s.version.to_string(),
                table::ago(nembo_proto::clock::unix_ms(s.create_time.as_ref())),
                s.status.clone(),
                format!("{ready}/{}", s.target_replicas),
                format!("{:.2}", s.qps),
                endpoint_url(s),
            ]
        })
        .collect();
    table::print(
        &[
            "NAME", "VERSION", "UPTIME", "STATUS", "REPLICAS", "QPS", "ENDPOINT",
        ],
        &rows,
    );
    println!("\nService Replicas");
    let rows: Vec<Vec<String>> = services
        .iter()
        .flat_map(|s| {
            s.replicas.iter().map(move |r| {
                vec![
                    s.name.clone(),
                    r.replica_id.to_string(),
                    r.version.to_string(),
                    r.job_id.clone(),
                    if r.endpoint.is_empty() {
                        "-".into()
                    } else {
                        r.endpoint.clone()
                    },
                    if r.infra.is_empty() {
                        "-".into()
                    } else {
                        r.infra.clone()
                    },
                    if r.spot { "spot" } else { "on-demand" }.into(),
                    r.status.clone(),
                    table::visible(&r.message),
                ]
            })
        })
        .collect();
    table::print(
        &[
            "SERVICE", "ID", "VERSION", "JOB", "ENDPOINT", "INFRA", "CAPACITY", "STATUS", "MESSAGE",
        ],
        &rows,
    );
    Ok(())
}

fn service_json(s: &pb::Service) -> serde_json::Value {
    serde_json::json!({
        "name": s.name,
        "owner": s.owner,
        "status": s.status,
        "version": s.version,
        "endpoint": endpoint_url(s),
        "endpoints": s.endpoints,
        "target_replicas": s.target_replicas,
        "qps": s.qps,
        "replicas": s.replicas.iter().map(|r| serde_json::json!({
            "replica_id": r.replica_id,
            "version": r.version,
            "job_id": r.job_id,
            "status": r.status,
            "endpoint": r.endpoint,
            "infra": r.infra,
            "spot": r.spot,
            "message": r.message,
        })).collect::<Vec<_>>(),
    })
}

async fn logs(name: &str, replica: Option<u32>, load_balancer: bool, follow: bool) -> Result<()> {
    if load_balancer {
        bail!(
            "the load balancers run inside the coordinators and log there (their \
             `coordinator.log`, `nembo api info` shows where); a replica's output is \
             `nembo serve logs {name} REPLICA`"
        );
    }
    let client = connect::client().await?;
    let services = list(&client, &[name.to_string()]).await?;
    let Some(s) = services.first() else {
        bail!("service {name} not found");
    };
    let live =
        |r: &&pb::ServiceReplica| !r.status.starts_with("FAILED") && r.status != "TERMINATED";
    let r = match replica {
        Some(id) => s
            .replicas
            .iter()
            .find(|r| r.replica_id == id)
            .with_context(|| {
                format!("service {name} has no replica {id} (see `nembo serve status {name}`)")
            })?,
        None => {
            let r = s
                .replicas
                .iter()
                .find(live)
                .or_else(|| s.replicas.last())
                .with_context(|| format!("service {name} has no replicas yet"))?;
            eprintln!("Replica {} (job {}):", r.replica_id, r.job_id);
            r
        }
    };
    crate::jobs::logs(&r.job_id, follow).await
}

async fn down(names: Vec<String>, all: bool, yes: bool) -> Result<()> {
    let client = connect::client().await?;
    let names = if all {
        if !names.is_empty() {
            bail!("give service names or --all, not both");
        }
        list(&client, &[])
            .await?
            .into_iter()
            .map(|s| s.name)
            .collect()
    } else {
        names
    };
    if names.is_empty() {
        bail!("name the services to take down (or --all)");
    }
    if !crate::clusters::confirm(&format!("Taking down service(s) {}", names.join(", ")), yes)? {
        bail!("aborted");
    }
    for name in &names {
        let req = pb::ServeDownRequest { name: name.clone() };
        connect::call(
            &client,
            req,
            |mut c, r| async move { c.serve_down(r).await },
        )
        .await?;
        println!("Service {name} is down: its replicas are stopping.");
    }
    Ok(())
}
