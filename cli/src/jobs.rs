//! launch, status/queue, logs, cancel.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nembo_proto::client::Client;
use nembo_proto::v1 as pb;
use serde_json::{json, Value};
use tokio_stream::StreamExt;

use crate::connect;
use crate::table;

/// `nembo launch`.
#[derive(clap::Args, Debug)]
pub struct LaunchArgs {
    /// Task file (SkyPilot YAML), or a command to run (`'python train.py'`).
    task: String,
    /// Submit and return at once, printing the job id.
    #[arg(short, long)]
    detach: bool,
    /// Show the normalised task and where it would run; launch nothing.
    #[arg(long)]
    dry_run: bool,
    /// Machine-readable output (with --dry-run or --detach).
    #[arg(long)]
    json: bool,
    /// Set an env var of the task (fills `NAME: null` entries); `NAME`
    /// alone passes this shell's value.
    #[arg(long = "env", value_name = "NAME[=VALUE]", value_parser = crate::parse_env_arg)]
    envs: Vec<(String, String)>,
    /// Override the task's name.
    #[arg(short, long)]
    name: Option<String>,
    /// Retrying with the same key never creates a second job.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// The cluster to create, or to run on if it exists (started again if
    /// stopped). Without it, a new cluster with a made-up name.
    #[arg(short = 'c', long = "cluster", value_name = "NAME")]
    cluster: Option<String>,
    /// Autostop the cluster after this many idle minutes (`30`, or `90s`,
    /// `2h`); overrides the task's `resources.autostop`.
    #[arg(short = 'i', long = "idle-minutes-to-autostop", value_name = "MINUTES")]
    idle_minutes: Option<String>,
    /// Tear the cluster down rather than stop it when idle (alone: after 1
    /// idle minute, as SkyPilot's `--down`).
    #[arg(long)]
    down: bool,
    /// What keeps the cluster from being idle: jobs_and_ssh (default),
    /// jobs, or none (a hard limit).
    #[arg(long, value_parser = ["jobs_and_ssh", "jobs", "none"])]
    wait_for: Option<String>,
    /// Skip the task's `setup` (as `sky launch --no-setup`).
    #[arg(long)]
    no_setup: bool,
    #[command(flatten)]
    overrides: crate::overrides::Overrides,
}

impl LaunchArgs {
    /// Runs on this cluster (`nembo exec NAME`).
    pub fn set_cluster(&mut self, name: String) {
        self.cluster = Some(name);
    }

    /// The autostop the launch line asks for, if it asks for one.
    fn autostop(&self) -> Result<Option<pb::AutostopSetting>> {
        if self.idle_minutes.is_none() && !self.down && self.wait_for.is_none() {
            return Ok(None);
        }
        let idle_seconds = match &self.idle_minutes {
            Some(w) => nembo_domain::task::Autostop::parse_window(w)
                .with_context(|| format!("-i {w}: expected minutes (30), or 90s, 2h, 1d"))?,
            None if self.down => 60,
            None => bail!("--wait-for needs -i MINUTES"),
        };
        Ok(Some(pb::AutostopSetting {
            disabled: false,
            idle_seconds,
            down: self.down,
            wait_for: self.wait_for.clone().unwrap_or_default(),
        }))
    }
}

/// Where a launch runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// `nembo launch`: on a cluster (named, or made up).
    Launch,
    /// `nembo exec NAME`: on an existing cluster, skipping setup.
    Exec,
    /// `nembo jobs launch`: a managed job, wherever there is room.
    Managed,
}

/// Reads the task (a file, or an inline command), applies the launch
/// line's overrides and `--name`, and makes a relative `workdir` absolute
/// (relative to the current directory, as SkyPilot does).
fn read_task(a: &LaunchArgs) -> Result<String> {
    prepare_task(&a.task, &a.overrides, a.no_setup, a.name.as_deref())
}

/// The task file (or inline command) `task`, with the launch line's
/// overrides applied and its workdir resolved.
pub(crate) fn prepare_task(
    task: &str,
    overrides: &crate::overrides::Overrides,
    no_setup: bool,
    name: Option<&str>,
) -> Result<String> {
    let (text, _) = crate::overrides::entrypoint(task)?;
    let Ok(yaml_serde::Value::Mapping(mut map)) = yaml_serde::from_str::<yaml_serde::Value>(&text)
    else {
        return Ok(text); // let the coordinator report what is wrong with it
    };
    overrides.apply(&mut map)?;
    if no_setup {
        map.remove("setup");
    }
    if let Some(yaml_serde::Value::String(w)) = map.get("workdir") {
        // Where it really is (`../..`, links and `/proc/self/root` resolved),
        // so the coordinator judges the directory that would be copied.
        let p = PathBuf::from(w);
        let abs = if p.is_absolute() {
            p
        } else {
            std::env::current_dir()?.join(p)
        };
        let real = abs
            .canonicalize()
            .with_context(|| format!("workdir {}", abs.display()))?;
        if !real.is_dir() {
            anyhow::bail!("workdir {} is not a directory", real.display());
        }
        map.insert("workdir".into(), real.display().to_string().into());
    }
    if let Some(n) = name {
        map.insert("name".into(), n.into());
    }
    Ok(yaml_serde::to_string(&yaml_serde::Value::Mapping(map))?)
}

/// `RUNNING`, `SUCCEEDED`, ... (the wire name without its prefix).
pub(crate) fn state_name(v: i32) -> String {
    pb::JobState::try_from(v)
        .map(|s| s.as_str_name().trim_start_matches("JOB_STATE_").to_string())
        .unwrap_or_else(|_| v.to_string())
}

/// Unix ms of a wire time (0: unset).
pub(crate) fn ms(t: &Option<nembo_proto::prost_types::Timestamp>) -> i64 {
    nembo_proto::clock::unix_ms(t.as_ref())
}

/// Every job, in full (tasks redacted as the caller may see them).
pub(crate) async fn all_jobs(c: &Client, stale: bool) -> Result<Vec<pb::Job>> {
    jobs_of(c, "", stale).await
}

/// Every job of one cluster.
pub(crate) async fn cluster_jobs(c: &Client, cluster: &str) -> Result<Vec<pb::Job>> {
    jobs_of(c, cluster, false).await
}

/// Every job (of `cluster`, if not empty), in full.
pub(crate) async fn jobs_of(c: &Client, cluster: &str, stale: bool) -> Result<Vec<pb::Job>> {
    connect::all_pages(|page_token| {
        let req = pb::ListJobsRequest {
            page_token,
            view: pb::JobView::Full as i32,
            cluster: cluster.to_string(),
            ..Default::default()
        };
        async move {
            let r = connect::call(c, req, |mut c, r| async move {
                c.list_jobs(read_request(r, stale)).await
            })
            .await?;
            Ok((r.jobs, r.next_page_token))
        }
    })
    .await
}

pub(crate) fn is_terminal(v: i32) -> bool {
    matches!(
        pb::JobState::try_from(v),
        Ok(pb::JobState::Succeeded
            | pb::JobState::Failed
            | pb::JobState::FailedSetup
            | pb::JobState::Cancelled)
    )
}

fn fresh_key() -> String {
    format!(
        "cli-{}-{}",
        std::process::id(),
        nembo_proto::clock::now_ms()
    )
}

/// Launches; returns the job's exit code. A managed job is recovered by
/// the coordinators across preemptions (`nembo jobs launch`).
pub async fn launch(a: LaunchArgs, mode: Mode) -> Result<i32> {
    let managed = mode == Mode::Managed;
    let task_yaml = read_task(&a)?;
    let mut envs = a.overrides.env_file_vars()?;
    envs.extend(a.envs.iter().cloned());
    let envs = crate::env_map(&envs);
    // Refuse a task that cannot be accepted before reading its local sources.
    let spec = nembo_domain::task::parse_task_yaml(&task_yaml, &envs)?;
    let sources = crate::upload::local_sources(&spec)?;
    let mut client = connect::client().await?;
    if a.dry_run {
        let req = pb::DryRunRequest {
            task: Some(pb::dry_run_request::Task::TaskYaml(task_yaml)),
            env_overrides: envs,
            managed,
            uploads: Default::default(),
        };
        let r = connect::call(&client, req, |mut c, r| async move { c.dry_run(r).await }).await?;
        print_dry_run(&r, a.json);
        return Ok(0);
    }
    let cluster_mode = match mode {
        Mode::Launch => pb::ClusterMode::Launch,
        Mode::Exec => pb::ClusterMode::Exec,
        Mode::Managed => pb::ClusterMode::Unspecified,
    };
    let shipped = crate::upload::ship(&client, &sources).await?;
    let req = pb::SubmitJobRequest {
        task: Some(pb::submit_job_request::Task::TaskYaml(task_yaml)),
        idempotency_key: a.idempotency_key.clone().unwrap_or_else(fresh_key),
        env_overrides: envs,
        managed,
        uploads: shipped.uploads.into_iter().collect(),
        cluster: a.cluster.clone().unwrap_or_default(),
        cluster_mode: cluster_mode as i32,
        autostop: a.autostop()?,
    };
    let submitted = connect::call(
        &client,
        req,
        |mut c, r| async move { c.submit_job(r).await },
    )
    .await;
    let submitted = match (submitted, &shipped.rest) {
        (Ok(s), _) => s,
        (Err(e), rest) => {
            // Its announcement goes with it: nothing waits for these files.
            if let Some(rest) = rest {
                rest.abort();
            }
            return Err(e);
        }
    };
    let job_id = submitted.job_id;
    // The files still uploading: the job's nodes wait for them. If the
    // upload fails, the job is cancelled rather than left to fail its setup.
    let upload = shipped.rest.map(|rest| {
        let (client, job_id) = (client.clone(), job_id.clone());
        tokio::spawn(async move {
            let failed = match rest.await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e,
                Err(e) => anyhow::anyhow!("upload: {e}"),
            };
            let req = pb::CancelJobRequest {
                job_id: job_id.clone(),
            };
            let _ = connect::call(
                &client,
                req,
                |mut c, r| async move { c.cancel_job(r).await },
            )
            .await;
            Err(failed.context(format!(
                "job {job_id} was cancelled: its files did not upload"
            )))
        })
    });
    if !submitted.cluster.is_empty() && !a.detach && a.cluster.is_none() {
        eprintln!(
            "Cluster {} (run more on it with `nembo exec {} TASK`).",
            submitted.cluster, submitted.cluster
        );
    }
    if a.detach {
        // Detached, the client still sees its upload through.
        if let Some(upload) = upload {
            upload.await.context("upload")??;
        }
        if a.json {
            println!("{}", json!({ "job_id": job_id }));
        } else {
            println!("{job_id}");
        }
        return Ok(0);
    }
    eprintln!("Job {job_id} submitted.");
    let progress = tokio::spawn(show_progress(client.clone(), job_id.clone(), managed));
    let result = stream_output(&mut client, &job_id, true).await;
    // Let it print what happened since its last poll (a failover that took
    // less than a poll), then stop it.
    let mut progress = progress;
    if tokio::time::timeout(Duration::from_secs(2), &mut progress)
        .await
        .is_err()
    {
        progress.abort();
    }
    if let Some(upload) = upload {
        upload.await.context("upload")??;
    }
    result?;
    let job = wait_terminal(&mut client, &job_id).await?;
    let took = if job.start_time.is_some() {
        format!(
            " after {}",
            table::duration(ms(&job.end_time) - ms(&job.start_time))
        )
    } else {
        String::new()
    };
    let code = job.exit_code;
    let msg = if job.message.is_empty() {
        String::new()
    } else {
        format!(": {}", job.message)
    };
    eprintln!(
        "Job {job_id} {}{}{took}{msg}",
        state_name(job.state),
        code.map(|c| format!(" (exit code {c})"))
            .unwrap_or_default()
    );
    Ok(match pb::JobState::try_from(job.state) {
        Ok(pb::JobState::Succeeded) => 0,
        _ => code.filter(|c| *c != 0).unwrap_or(1),
    })
}

async fn wait_terminal(client: &mut Client, job_id: &str) -> Result<pb::Job> {
    for _ in 0..600 {
        let job = connect::get_job(client, job_id).await?;
        if is_terminal(job.state) {
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("job {job_id} did not reach a final state")
}

/// Prints each state change until the job runs, or for a managed job until
/// it ends (to stderr: stdout is the job's).
async fn show_progress(client: Client, job_id: String, managed: bool) {
    let mut last = (0, String::new());
    // Each provisioning try, once when asked for and once when answered,
    // however quickly the state moved between two polls.
    let mut tries_shown: Vec<(String, bool)> = Vec::new();
    loop {
        let Ok(job) = connect::get_job(&client, &job_id).await else {
            return;
        };
        for (i, t) in job.provision_tries.iter().enumerate() {
            if i == tries_shown.len() {
                eprintln!(
                    "  trying {} x {} at ${:.2}/h each",
                    t.count, t.place, t.hourly_price
                );
                tries_shown.push((t.place.clone(), false));
            }
            if !t.outcome.is_empty() && !tries_shown[i].1 {
                eprintln!("  {}: {}", t.place, t.outcome);
                tries_shown[i].1 = true;
            }
        }
        let now = (job.state, job.message.clone());
        if now != last {
            let mut line = format!("  {}", state_name(job.state));
            if !job.node_ids.is_empty() {
                line.push_str(&format!(" on {}", job.node_ids.join(", ")));
            }
            if !job.message.is_empty() && !is_terminal(job.state) {
                line.push_str(&format!(": {}", job.message));
            }
            eprintln!("{line}");
            last = now;
        }
        if (job.state == pb::JobState::Running as i32 && !managed) || is_terminal(job.state) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Copies a job's output to stdout; ranks other than 0 get a `(rank N)`
/// prefix. If the coordinator serving the stream goes away (a leader
/// change), the stream is reopened and what was already printed is skipped.
async fn stream_output(client: &mut Client, job_id: &str, follow: bool) -> Result<()> {
    let mut partial: BTreeMap<(u32, u32), Vec<u8>> = BTreeMap::new();
    let mut printed: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    let stdout = std::io::stdout();
    let req = pb::StreamLogsRequest {
        job_id: job_id.to_string(),
        follow,
    };
    let mut reopen_until = std::time::Instant::now() + Duration::from_secs(30);
    'reopen: loop {
        let mut stream = connect::call(client, req.clone(), |mut c, r| async move {
            c.stream_logs(r).await
        })
        .await?;
        let mut seen: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(s)
                    if std::time::Instant::now() < reopen_until
                        && matches!(
                            s.code(),
                            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
                        ) =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'reopen;
                }
                Err(s) => return Err(s.into()),
            };
            reopen_until = std::time::Instant::now() + Duration::from_secs(30);
            let key = (chunk.attempt, chunk.rank);
            let before = seen.entry(key).or_insert(0);
            let done = printed.entry(key).or_insert(0);
            let skip = (*done).saturating_sub(*before).min(chunk.data.len() as u64) as usize;
            *before += chunk.data.len() as u64;
            let data = &chunk.data[skip..];
            *done += data.len() as u64;
            let mut out = stdout.lock();
            if chunk.rank == 0 {
                out.write_all(data)?;
            } else {
                let buf = partial.entry(key).or_default();
                buf.extend_from_slice(data);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    write!(out, "(rank {}) ", chunk.rank)?;
                    out.write_all(&line)?;
                }
            }
            out.flush()?;
        }
        break;
    }
    let mut out = stdout.lock();
    for ((_, rank), rest) in partial {
        if !rest.is_empty() {
            write!(out, "(rank {rank}) ")?;
            out.write_all(&rest)?;
            writeln!(out)?;
        }
    }
    out.flush()?;
    Ok(())
}

fn print_dry_run(r: &pb::DryRunResponse, as_json: bool) {
    let p = r.placement.clone().unwrap_or_default();
    if as_json {
        let v = json!({
            "task": yaml_serde::from_str::<Value>(&r.normalized_yaml).unwrap_or(Value::Null),
            "placement": {
                "candidate_index": p.candidate_index,
                "existing_node_ids": p.existing_node_ids,
                "provider": p.provider,
                "region": p.region,
                "instance_type": p.instance_type,
                "hourly_price": p.hourly_price,
                "new_nodes": p.new_nodes,
                "summary": p.summary,
            },
            "candidates": r.candidates.iter().map(crate::catalog::offering_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!("Task, as Nembo understands it:\n");
        for l in r.normalized_yaml.lines() {
            println!("  {l}");
        }
        if !r.candidates.is_empty() {
            println!("\nCandidates, best first:\n");
            let egress = r.candidates.iter().any(|c| c.egress_cost > 0.0);
            let rows: Vec<Vec<String>> = r
                .candidates
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let chosen = p.existing_node_ids.is_empty() && i == 0 && r.placement.is_some();
                    vec![
                        if chosen { "->".into() } else { String::new() },
                        c.provider.clone(),
                        table::region_cell(c),
                        c.instance_type.clone(),
                        table::simulated(
                            table::gpus_cell(&c.accelerator, c.accelerator_count),
                            c.simulated,
                        ),
                        if c.spot { "spot" } else { "on-demand" }.into(),
                        format!("${:.2}", c.node_price),
                        format!("${:.2}", c.hourly_cost),
                    ]
                    .into_iter()
                    .chain(egress.then(|| format!("${:.2}", c.egress_cost)))
                    .collect()
                })
                .collect();
            let mut header = vec![
                "",
                "PROVIDER",
                "REGION",
                "INSTANCE",
                "GPUS",
                "MARKET",
                "$/H/NODE",
                "$/H TOTAL",
            ];
            if egress {
                // Ranked by an hour of the nodes plus this, as SkyPilot does.
                header.push("EGRESS $");
            }
            crate::table::print(&header, &rows);
            table::explain_simulated(r.candidates.iter().any(|c| c.simulated));
        }
        if r.placement.is_some() {
            println!("\nWould run {}.", p.summary);
        } else {
            println!("\nNo capacity right now; the job would wait.");
        }
        println!("(dry run: nothing was launched)");
    }
}

/// A job as JSON (for --json).
pub fn job_json(j: &pb::Job) -> Value {
    json!({
        "job_id": j.job_id,
        "name": j.name,
        "state": state_name(j.state),
        "exit_code": j.exit_code,
        "submitted_at_unix_ms": ms(&j.submit_time),
        "started_at_unix_ms": ms(&j.start_time),
        "ended_at_unix_ms": ms(&j.end_time),
        "node_ids": j.node_ids,
        "cluster": j.cluster,
        "message": j.message,
        "managed": j.managed.as_ref().map(|m| json!({
            "recoveries": m.recoveries,
            "restarts_on_errors": m.restarts_on_errors,
            "notice_node_id": m.notice_node_id,
            "notice_deadline_unix_ms": ms(&m.notice_deadline),
            "events": m.events.iter().map(|e| json!({"at_unix_ms": ms(&e.time), "what": e.what})).collect::<Vec<_>>(),
        })),
        "attempts": j.attempts.iter().map(|a| json!({
            "attempt": a.attempt,
            "node_ids": a.node_ids,
            "state": state_name(a.state),
            "exit_code": a.exit_code,
            "message": a.message,
        })).collect::<Vec<_>>(),
    })
}

/// A node as JSON (for --json).
pub fn node_json(n: &pb::Node) -> Value {
    let res = |r: &Option<pb::NodeResources>| {
        let r = r.clone().unwrap_or_default();
        json!({ "accelerators": r.accelerators, "cpus": r.cpus, "memory_gb": r.memory_gb })
    };
    json!({
        "node_id": n.node_id,
        "state": node_state(n.state),
        "provider": n.provider,
        "region": n.region,
        "instance_type": n.instance_type,
        "resources": res(&n.resources),
        "free": res(&n.free),
        "job_ids": n.job_ids,
        "hourly_price": n.hourly_price,
        "message": n.message,
        "unhealthy_reason": (!n.unhealthy_reason.is_empty()).then_some(&n.unhealthy_reason),
        "simulated": n.simulated,
    })
}

pub fn node_state(v: i32) -> String {
    pb::NodeState::try_from(v)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("NODE_STATE_")
                .to_string()
        })
        .unwrap_or_else(|_| v.to_string())
}

pub(crate) fn accels(r: &Option<pb::NodeResources>) -> String {
    let r = r.clone().unwrap_or_default();
    let v: Vec<String> = r
        .accelerators
        .iter()
        .map(|(k, n)| format!("{k}:{}", nembo_domain::task::fmt_num(*n)))
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// A read request, marked as allowed to be stale if asked.
pub(crate) fn read_request<T>(r: T, stale: bool) -> tonic::Request<T> {
    let mut req = tonic::Request::new(r);
    if stale {
        req.metadata_mut().insert(
            "nembo-stale",
            tonic::metadata::MetadataValue::from_static("true"),
        );
    }
    req
}

/// `status` (nodes and jobs) or `queue` (jobs).
/// `nembo status --endpoints JOB` / `--endpoint PORT JOB`: where the job's
/// ports are reached (its first node's address, as `sky status` gives the
/// head's).
pub async fn endpoints(job_id: &str, only: Option<u16>) -> Result<()> {
    let c = connect::client().await?;
    let req = pb::GetJobRequest {
        job_id: job_id.to_string(),
    };
    let job = connect::call(&c, req, |mut c, r| async move { c.get_job(r).await })
        .await?
        .job
        .context("no job in the answer")?;
    let mut ports: Vec<u16> = Vec::new();
    for cand in job
        .spec
        .iter()
        .flat_map(|s| s.resources.iter())
        .flat_map(|r| &r.candidates)
    {
        for p in &cand.ports {
            let (a, b) = p.split_once('-').unwrap_or((p, p));
            if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>()) {
                ports.extend(a..=b);
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    if ports.is_empty() {
        bail!("job {job_id} opens no ports (give `resources.ports`, or --ports at launch)");
    }
    let Some(head) = job.node_ids.first() else {
        bail!("job {job_id} has no node yet ({})", state_name(job.state));
    };
    let nodes = connect::all_pages(|page_token| {
        let req = pb::ListNodesRequest {
            page_token,
            ..Default::default()
        };
        let c = &c;
        async move {
            let r = connect::call(c, req, |mut c, r| async move { c.list_nodes(r).await }).await?;
            Ok((r.nodes, r.next_page_token))
        }
    })
    .await?;
    // The world's way in where the node has one (a cloud VM's public IP).
    let host = nodes
        .iter()
        .find(|n| &n.node_id == head)
        .map(|n| {
            if n.public_address.is_empty() {
                n.address.clone()
            } else {
                n.public_address.clone()
            }
        })
        .filter(|a| !a.is_empty())
        .with_context(|| format!("node {head} has reported no address yet"))?;
    match only {
        Some(p) if !ports.contains(&p) => bail!(
            "job {job_id} does not open port {p} (it opens {})",
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(p) => println!("{host}:{p}"),
        None => {
            for p in ports {
                println!("{p}: {host}:{p}");
            }
        }
    }
    Ok(())
}

pub(crate) fn print_jobs(jobs: &[pb::Job], as_json: bool) -> Result<()> {
    if as_json {
        let v = json!({ "jobs": jobs.iter().map(job_json).collect::<Vec<_>>() });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .rev()
        .map(|j| {
            let end = if j.end_time.is_some() {
                ms(&j.end_time)
            } else {
                nembo_proto::clock::now_ms()
            };
            vec![
                j.job_id.clone(),
                if j.name.is_empty() {
                    "-".into()
                } else {
                    j.name.clone()
                },
                state_name(j.state),
                table::ago(ms(&j.submit_time)),
                if j.start_time.is_some() {
                    table::duration(end - ms(&j.start_time))
                } else {
                    "-".into()
                },
                if j.node_ids.is_empty() {
                    "-".into()
                } else {
                    j.node_ids.join(",")
                },
                j.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                j.message.clone(),
            ]
        })
        .collect();
    table::print(
        &[
            "ID",
            "NAME",
            "STATE",
            "SUBMITTED",
            "DURATION",
            "NODES",
            "EXIT",
            "MESSAGE",
        ],
        &rows,
    );
    Ok(())
}

/// `logs [-f] JOB`.
pub async fn logs(job: &str, follow: bool) -> Result<()> {
    let mut c = connect::client().await?;
    stream_output(&mut c, job, follow).await
}

/// `cancel JOB...`.
pub async fn cancel(jobs: &[String]) -> Result<()> {
    let c = connect::client().await?;
    for j in jobs {
        let req = pb::CancelJobRequest { job_id: j.clone() };
        let r = connect::call(&c, req, |mut c, r| async move { c.cancel_job(r).await })
            .await
            .with_context(|| format!("cancel job {j}"))?;
        println!("Job {j}: {}", state_name(r.state));
    }
    Ok(())
}

/// `nembo jobs queue`: managed jobs with their recoveries and latest event.
pub async fn managed_queue(as_json: bool) -> Result<()> {
    let c = connect::client().await?;
    let jobs: Vec<pb::Job> = all_jobs(&c, false)
        .await?
        .into_iter()
        .filter(|j| j.managed.is_some())
        .collect();
    if as_json {
        let v = json!({ "jobs": jobs.iter().map(job_json).collect::<Vec<_>>() });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .rev()
        .map(|j| {
            let m = j.managed.clone().unwrap_or_default();
            vec![
                j.job_id.clone(),
                if j.name.is_empty() {
                    "-".into()
                } else {
                    j.name.clone()
                },
                state_name(j.state),
                table::ago(ms(&j.submit_time)),
                j.attempts.len().to_string(),
                m.recoveries.to_string(),
                if j.node_ids.is_empty() {
                    "-".into()
                } else {
                    j.node_ids.join(",")
                },
                m.events.last().map(|e| e.what.clone()).unwrap_or_default(),
            ]
        })
        .collect();
    table::print(
        &[
            "ID",
            "NAME",
            "STATE",
            "SUBMITTED",
            "ATTEMPTS",
            "RECOVERIES",
            "NODES",
            "LAST EVENT",
        ],
        &rows,
    );
    Ok(())
}
