//! `nembo demo failover`: Nembo's main trick, on this machine, in under a
//! minute. Three coordinators, two "clouds" selling spot H100s (the local
//! provider, and a simulated cloud whose nodes are real agents too), a
//! managed training job that counts steps and checkpoints them, and a
//! preemption notice served by the node's metadata service in AWS's format.
//! It prints the timeline and checks that no step before the last
//! checkpoint was lost.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nembo_proto::client::Client;
use nembo_proto::v1 as pb;

use crate::connect;
use crate::jobs::ms;

const STEPS: u32 = 60;

/// The job: counts steps, checkpoints every 5 and when the notice's signal
/// arrives, and resumes from the checkpoint.
fn task(store: &Path) -> String {
    format!(
        r#"name: demo-train
resources:
  accelerators: H100:1
  use_spot: true
  job_recovery: EAGER_NEXT_REGION
checkpoint: {{store: "file://{store}", path: /ckpt, interval: 2}}
envs: {{STEPS: "{STEPS}"}}
run: |
  ckpt="$NEMBO_CHECKPOINT_DIR/step"
  step=0; [ -f "$ckpt" ] && step=$(cat "$ckpt")
  echo "attempt $NEMBO_ATTEMPT starts at step $step"
  trap 'echo $step > "$ckpt"; echo "checkpointed step $step on the notice"; exit 143' USR1
  while [ "$step" -lt "$STEPS" ]; do
    step=$((step+1)); echo "step $step"
    [ $((step % 5)) -eq 0 ] && echo $step > "$ckpt"
    sleep 0.15
  done
  echo $step > "$ckpt"
  echo "done at step $step"
"#,
        store = store.display()
    )
}

/// Cloud A: the local provider, one region selling spot H100s at $0.80/h
/// (the other region is dear). Cloud B: a simulated cloud at $1.20/h.
const PROVIDERS: &str = "local:\n  simulate: true\n  gpu_hourly: {H100: 2.0}\n  spot_factor: 0.4\n  regions:\n    eu-west: {price_factor: 4.0}\n";
const SIM_CLOUD: &str = r#"{"regions": [{"name": "sim-eu"}],
 "instance_types": [{"name": "sim-h100-1", "accelerator": "H100", "accelerator_count": 1,
                     "cpus": 24, "memory_gb": 240, "price": 3.0, "spot_price": 1.2}],
 "agents": true}"#;

pub(crate) struct Clock(pub(crate) Instant);

impl Clock {
    pub(crate) fn line(&self, what: &str) {
        println!("  +{:>5.1}s  {what}", self.0.elapsed().as_secs_f64());
    }
    fn at(&self, unix_ms: i64, t0_unix_ms: i64, what: &str) {
        let s = (unix_ms - t0_unix_ms) as f64 / 1000.0;
        println!("  +{s:>5.1}s  {what}");
    }
}

/// Runs the demo; exits non-zero if the check fails.
pub async fn failover() -> Result<i32> {
    in_own_dir("demo", run).await
}

/// Runs a demo in a directory of its own under the Nembo home: removed if
/// it passes, kept (and named) for its logs if not.
pub(crate) async fn in_own_dir<F, Fut>(prefix: &str, demo: F) -> Result<i32>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<i32>>,
{
    let home = connect::nembo_home()?;
    let dir = home.join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = demo(dir.clone()).await;
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("(logs kept in {})", dir.display());
    }
    result
}

async fn run(dir: PathBuf) -> Result<i32> {
    let dir = dir.as_path();
    let started = Instant::now();
    let providers = dir.join("providers.yaml");
    std::fs::write(&providers, PROVIDERS)?;
    let sim = dir.join("sim-cloud.json");
    std::fs::write(&sim, SIM_CLOUD)?;
    let store = dir.join("checkpoints");
    println!("Nembo failover demo: 3 coordinators; clouds local (spot H100 $0.80/h) and sim (spot H100 $1.20/h)");
    let extra: Vec<String> = [
        "--providers",
        providers.to_str().unwrap_or_default(),
        "--sim-cloud",
        sim.to_str().unwrap_or_default(),
        "--heartbeat-ms",
        "500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let info = connect::start_cluster_in(&dir.join("cluster"), 3, &extra).await?;
    let cluster = Cluster {
        pids: info.pids.clone(),
    };
    let client = connect::connect_info(&info).await?;
    let clock = Clock(Instant::now());
    let t0 = nembo_proto::clock::now_ms();
    clock.line(&format!(
        "cluster up ({} coordinators, {:.1} s)",
        info.pids.len(),
        started.elapsed().as_secs_f64()
    ));

    let submit = pb::SubmitJobRequest {
        task: Some(pb::submit_job_request::Task::TaskYaml(task(&store))),
        idempotency_key: format!("demo-{}", std::process::id()),
        env_overrides: Default::default(),
        managed: true,
        uploads: Default::default(),
        ..Default::default()
    };
    let id = connect::call(
        &client,
        submit,
        |mut c, r| async move { c.submit_job(r).await },
    )
    .await?
    .job_id;
    clock.line(&format!(
        "managed spot job {id} submitted: {STEPS} steps, checkpoint every 5 steps and on the notice"
    ));

    let first = wait_job(&client, &id, "attempt 1 to run", |j| {
        j.attempts.first().is_some_and(|a| a.start_time.is_some())
    })
    .await?;
    let node1 = first.attempts[0].node_ids[0].clone();
    let n1 = node(&client, &node1).await?;
    clock.line(&format!(
        "attempt 1 running on {node1} ({}/{}, spot ${:.2}/h)",
        n1.provider, n1.region, n1.hourly_price
    ));
    // Let it make progress, then the cloud takes the VM back.
    wait_log(&client, &id, "step 12").await?;
    let notice_at = nembo_proto::clock::now_ms();
    let req = pb::InjectPreemptionRequest {
        node_id: node1.clone(),
        format: pb::NoticeFormat::Aws as i32,
        warning: Some(nembo_proto::clock::duration(30_000)),
    };
    connect::call(&client, req, |mut c, r| async move {
        c.inject_preemption(r).await
    })
    .await?;
    clock.at(
        notice_at,
        t0,
        &format!(
            "AWS spot interruption notice served on {node1}'s metadata endpoint (VM goes in 30 s)"
        ),
    );

    let done = wait_job(&client, &id, "the job to finish", |j| {
        j.state == pb::JobState::Succeeded as i32 || j.state == pb::JobState::Failed as i32
    })
    .await?;
    let m = done.managed.clone().unwrap_or_default();
    let event = |prefix: &str| {
        m.events
            .iter()
            .find(|e| e.what.starts_with(prefix) && ms(&e.time) >= notice_at)
    };
    let aware = event("preemption notice").context("no notice event")?;
    clock.at(
        ms(&aware.time),
        t0,
        &format!("coordinators aware: {}", aware.what),
    );
    if let Some(e) = event("replacement requested") {
        clock.at(ms(&e.time), t0, &e.what);
    }
    let synced = newest_manifest_of(&store, &id, 1).context("attempt 1 left no checkpoint")?;
    clock.at(
        synced.1,
        t0,
        &format!("checkpoint synced by attempt 1 (sync {})", synced.0),
    );
    let second = done.attempts.get(1).context("no second attempt")?;
    let n2 = node(&client, &second.node_ids[0]).await?;
    clock.at(
        ms(&second.start_time),
        t0,
        &format!(
            "attempt 2 running on {} ({}/{}, spot ${:.2}/h)",
            n2.node_id, n2.provider, n2.region, n2.hourly_price
        ),
    );
    clock.at(
        ms(&done.end_time),
        t0,
        &format!("completed: {}", crate::jobs::state_name(done.state)),
    );

    let logs = logs(&client, &id).await?;
    let saved = find_number(&logs, "checkpointed step ");
    let resumed = find_number(&logs, "attempt 2 starts at step ");
    let finished = logs.contains(&format!("done at step {STEPS}"));
    println!();
    let ok = done.state == pb::JobState::Succeeded as i32
        && n2.provider != n1.provider
        && saved.is_some()
        && saved == resumed
        && finished;
    match (saved, resumed) {
        (Some(s), Some(r)) => println!(
            "Checked: the job checkpointed step {s} on the notice and attempt 2 resumed at step {r} in cloud '{}': {} step before the last checkpoint was lost; {} attempts, never two at once.",
            n2.provider,
            if s == r { "no" } else { "a" },
            done.attempts.len()
        ),
        _ => println!("Checked: the checkpoint or the resume is missing from the log:\n{logs}"),
    }
    println!(
        "Notice to replacement requested: {} ms. Total {:.1} s.",
        event("replacement requested").map_or(-1, |e| ms(&e.time) - notice_at),
        started.elapsed().as_secs_f64()
    );
    cluster.stop(&client).await;
    if !ok {
        bail!("the failover demo's check failed");
    }
    Ok(0)
}

/// Stops the demo's nodes and coordinators, however the demo ends.
pub(crate) struct Cluster {
    pub(crate) pids: Vec<u32>,
}

impl Cluster {
    pub(crate) async fn stop(&self, client: &Client) {
        let req = pb::DownRequest {
            node_ids: Vec::new(),
            all: true,
        };
        let _ = connect::call(client, req, |mut c, r| async move { c.down(r).await }).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

async fn wait_job(
    client: &Client,
    id: &str,
    what: &str,
    done: impl Fn(&pb::Job) -> bool,
) -> Result<pb::Job> {
    let deadline = Instant::now() + Duration::from_secs(80);
    loop {
        let j = connect::get_job(client, id).await?;
        if done(&j) {
            return Ok(j);
        }
        if Instant::now() > deadline {
            bail!(
                "timed out waiting for {what}: job is {}: {}",
                crate::jobs::state_name(j.state),
                j.message
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn node(client: &Client, id: &str) -> Result<pb::Node> {
    let nodes = connect::list_nodes(client).await?;
    nodes
        .into_iter()
        .find(|n| n.node_id == id)
        .with_context(|| format!("no node {id}"))
}

async fn logs(client: &Client, id: &str) -> Result<String> {
    use tokio_stream::StreamExt;
    let req = pb::StreamLogsRequest {
        job_id: id.to_string(),
        follow: false,
    };
    let mut s = connect::call(
        client,
        req,
        |mut c, r| async move { c.stream_logs(r).await },
    )
    .await?;
    let mut out = Vec::new();
    while let Some(chunk) = s.next().await {
        out.extend(chunk?.data);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn wait_log(client: &Client, id: &str, text: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !logs(client, id).await?.contains(text) {
        if Instant::now() > deadline {
            bail!("timed out waiting for '{text}' in the job's output");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn find_number(logs: &str, prefix: &str) -> Option<u32> {
    logs.lines().find_map(|l| {
        l.strip_prefix(prefix)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// The newest complete checkpoint attempt `epoch` wrote: (sync number, unix ms).
fn newest_manifest_of(store: &Path, id: &str, epoch: u32) -> Option<(u32, i64)> {
    let dir: PathBuf = store.join(format!("job-{id}/manifests"));
    let prefix = format!("{epoch:010}-");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    names.sort();
    let last = names.last()?;
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(last)).ok()?).ok()?;
    Some((m["seq"].as_u64()? as u32, m["at_ms"].as_i64()?))
}
