//! `bench_preempt`: spot failover, measured. `--rounds` (default 20)
//! managed jobs on the local provider, each preempted once by a notice in
//! AWS, GCP or Azure format (in turn), served by the node's metadata
//! endpoint and read by the agent's real watchers. Per round:
//!
//! - notice -> coordinator aware: from the moment the notice is served to
//!   the coordinators recording it (Raft);
//! - notice -> replacement requested: to the provisioning intent for the
//!   replacement node (in the other region);
//! - old attempt gone -> new attempt running: from the end of the preempted
//!   attempt (it checkpointed on the signal and exited) to the next attempt
//!   having started on its node, checkpoint restored. The replacement node
//!   is provisioned during the notice, so no boot time is in this figure
//!   unless the node was not up yet (reported separately);
//! - work lost: steps the old attempt had done past the checkpoint the new
//!   one resumed from.
//!
//! `cargo build --release --workspace && target/release/bench_preempt`

use std::time::Duration;

use nembo_proto::v1 as pb;
use nembo_tests::{cli_arg, ms, percentile, wait_for, Coordinator};
use serde_json::json;

const PROVIDERS: &str = "local:\n  simulate: true\n  gpu_hourly: {H100: 2.0}\n  spot_factor: 0.4\n  regions:\n    eu-west: {price_factor: 1.5}\n";

fn task(store: &str) -> String {
    format!(
        r#"name: bench
resources: {{accelerators: H100:1, use_spot: true, infra: local}}
checkpoint: {{store: "file://{store}", path: /ckpt, interval: 5}}
run: |
  ckpt="$NEMBO_CHECKPOINT_DIR/step"
  step=0; [ -f "$ckpt" ] && step=$(cat "$ckpt")
  echo "resumed at $step"
  trap 'echo $step > "$ckpt"; echo "last step $step"; exit 143' USR1
  while true; do step=$((step+1)); [ $((step % 20)) -eq 0 ] && echo $step > "$ckpt"; sleep 0.05; done
"#
    )
}

fn number_after(logs: &str, prefix: &str, nth: usize) -> Option<i64> {
    logs.lines()
        .filter_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
        .nth(nth)
}

#[tokio::main]
async fn main() {
    let rounds = cli_arg("--rounds", 20) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let providers = dir.path().join("providers.yaml");
    std::fs::write(&providers, PROVIDERS).expect("providers");
    let store = dir.path().join("store");
    let c = Coordinator::start(&[
        "--providers",
        providers.to_str().unwrap(),
        "--max-nodes",
        "256",
    ])
    .await;
    let mut client = c.client().await;
    let (mut aware, mut requested, mut restart, mut lost) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut rows = Vec::new();
    for round in 0..rounds {
        let format = ["aws", "gcp", "azure"][round % 3];
        let id = client
            .submit_job(pb::SubmitJobRequest {
                task: Some(pb::submit_job_request::Task::TaskYaml(task(
                    store.to_str().unwrap(),
                ))),
                idempotency_key: format!("bench-{round}"),
                env_overrides: Default::default(),
                managed: true,
                uploads: Default::default(),
                ..Default::default()
            })
            .await
            .expect("submit")
            .into_inner()
            .job_id;
        let first = wait_for("attempt 1 running", Duration::from_secs(60), || async {
            let j = c.jobs().await.into_iter().find(|j| j.job_id == id)?;
            (j.state == pb::JobState::Running as i32).then_some(j)
        })
        .await;
        // Let it run and checkpoint periodically for a moment.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let node = first.node_ids[0].clone();
        let notice_at = nembo_proto::clock::now_ms();
        client
            .inject_preemption(pb::InjectPreemptionRequest {
                node_id: node.clone(),
                format: notice_format(format) as i32,
                warning: Some(nembo_proto::clock::duration(5_000)),
            })
            .await
            .expect("inject");
        let job = wait_for("attempt 2 running", Duration::from_secs(60), || async {
            let j = c.jobs().await.into_iter().find(|j| j.job_id == id)?;
            j.attempts.get(1).filter(|a| a.start_time.is_some())?;
            Some(j)
        })
        .await;
        let m = job.managed.clone().expect("managed");
        // The first event after the notice with one of these prefixes.
        let at = |prefixes: &[&str]| {
            m.events
                .iter()
                .find(|e| {
                    ms(&e.time) >= notice_at && prefixes.iter().any(|p| e.what.starts_with(p))
                })
                .map(|e| ms(&e.time))
                .unwrap_or_else(|| panic!("no {prefixes:?} in {:?}", m.events))
        };
        let a1_end = ms(&job.attempts[0].end_time);
        let a2_run = ms(&job.attempts[1].start_time);
        // Attempt 2's first line may still be on its way from the agent.
        let logs = wait_for("attempt 2's output", Duration::from_secs(10), || async {
            let logs = c.logs_so_far(&id).await;
            number_after(&logs, "resumed at ", 1).map(|_| logs)
        })
        .await;
        let last = number_after(&logs, "last step ", 0).unwrap_or(-1);
        let resumed = number_after(&logs, "resumed at ", 1).unwrap_or(-1);
        let row = (
            format,
            (at(&["preemption notice"]) - notice_at) as f64,
            // An idle node already up may be the replacement: then it is
            // chosen when the old attempt lets go.
            (at(&["replacement requested", "attempt 2 assigned"]) - notice_at) as f64,
            (a2_run - a1_end) as f64,
            (last - resumed) as f64,
        );
        if row.4 != 0.0 {
            // Work was lost: show why, from the preempted node's agent.
            let log = std::fs::read_to_string(c.dir.path().join(format!("nodes/{node}/agent.log")))
                .unwrap_or_default();
            for l in log
                .lines()
                .filter(|l| l.contains("checkpoint") || l.contains("WARN"))
            {
                eprintln!("  {node}: {l}");
            }
            eprintln!(
                "  logs: {}",
                logs.lines()
                    .filter(|l| l.starts_with("resumed") || l.starts_with("last"))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
        aware.push(row.1);
        requested.push(row.2);
        restart.push(row.3);
        lost.push(row.4);
        rows.push(row);
        client
            .cancel_job(pb::CancelJobRequest { job_id: id.clone() })
            .await
            .expect("cancel");
    }
    println!("round  format  notice->aware ms  notice->replacement ms  old gone->new running ms  steps lost");
    for (i, r) in rows.iter().enumerate() {
        println!(
            "{:>5}  {:<6}  {:>16.0}  {:>22.0}  {:>24.0}  {:>10.0}",
            i + 1,
            r.0,
            r.1,
            r.2,
            r.3,
            r.4
        );
    }
    let summary = |v: &mut Vec<f64>| json!({"median": percentile(v, 0.5), "p95": percentile(v, 0.95), "max": percentile(v, 1.0)});
    let out = json!({
        "rounds": rounds,
        "notice_to_aware_ms": summary(&mut aware),
        "notice_to_replacement_requested_ms": summary(&mut requested),
        "old_gone_to_new_running_ms": summary(&mut restart),
        "steps_lost": summary(&mut lost),
        "steps_lost_total": lost.iter().sum::<f64>(),
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}

fn notice_format(name: &str) -> pb::NoticeFormat {
    match name {
        "gcp" => pb::NoticeFormat::Gcp,
        "azure" => pb::NoticeFormat::Azure,
        _ => pb::NoticeFormat::Aws,
    }
}
