//! GPUs without a GPU: the real agent loads the fake `libnvidia-ml.so.1`
//! (built from tests/fake-nvml/fake_nvml.c) through nvml-wrapper, exactly as
//! it loads NVIDIA's, and reports what the test wrote into the fake's file.

use std::path::Path;
use std::process::Command;

use std::time::Duration;

use nembo_proto::v1 as pb;
use nembo_tests::{bin, http_get, wait_for, Coordinator, FakeGpus, FAKE_NVML};
use serde_json::Value;

fn probe(values: &Path) -> Value {
    let out = Command::new(bin("nembo-agent"))
        .args(["--probe-gpus", "--nvml-lib", FAKE_NVML])
        .env("NEMBO_FAKE_NVML", values)
        .output()
        .expect("run nembo-agent --probe-gpus");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("probe JSON")
}

#[test]
fn the_agent_reads_every_metric_of_eight_gpus_and_skips_unsupported_ones() {
    let fake = FakeGpus::new(
        "gpus 8\nname NVIDIA H100 80GB HBM3\nfb_total 85899345920\nfb_used 1073741824\n\
         util 40\nutil.3 97\nmem_util 12\ntemp 45\npower_mw 312500\npower_limit_mw 700000\n\
         energy_mj 5000\nsm_clock 1980\nmem_clock 2619\nthrottle 4\npcie_rx 100\npcie_tx 200\n\
         ecc_uncorrected.5 2\nprocs.1 2\nunsupported.7 temp power nvlink retired\n\
         nvlink_rx_kib 5000\nnvlink_tx_kib 7000\nretired_sbe.2 3\nretired_dbe.2 1\n\
         retired_pending.2 1\n",
    );
    let p = probe(&fake.values);
    assert_eq!(p["nvml_error"], Value::Null);
    assert_eq!(p["driver_version"], "580.00-fake");
    let gpus = p["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 8);
    assert!(gpus.iter().all(|g| g["model"] == "H100"), "{gpus:?}");
    assert_eq!(gpus[2]["pci_bus_id"], "00000000:12:00.0");
    let s = p["samples"].as_array().unwrap();
    assert_eq!(s[0]["gpu_util_percent"], 40);
    assert_eq!(s[3]["gpu_util_percent"], 97);
    assert_eq!(s[0]["fb_used_bytes"], 1073741824u64);
    assert_eq!(s[0]["fb_free_bytes"], 85899345920u64 - 1073741824);
    assert_eq!(s[0]["power_w"], 312.5);
    assert_eq!(s[0]["throttle_reasons"], 4);
    assert_eq!(s[5]["ecc_uncorrected"], 2);
    assert_eq!(s[1]["processes"], 2);
    assert_eq!(s[0]["nvlink_rx_kib"], 5000);
    assert_eq!(s[0]["nvlink_tx_kib"], 7000);
    assert_eq!(s[2]["retired_pages_sbe"], 3);
    assert_eq!(s[2]["retired_pages_dbe"], 1);
    assert_eq!(s[2]["retired_pages_pending"], true);
    assert_eq!(s[0]["retired_pages_pending"], false);
    assert_eq!(s[7]["nvlink_rx_kib"], Value::Null);
    assert_eq!(s[7]["retired_pages_sbe"], Value::Null);
    // What a board does not support is absent, not an error.
    assert_eq!(s[7]["temperature_c"], Value::Null);
    assert_eq!(s[7]["power_w"], Value::Null);
    assert_eq!(s[7]["gpu_util_percent"], 40);
}

/// GPU 0 and 2 have GPM (Hopper), GPU 1 has not (Ampere); GPU 2's driver
/// cannot measure its tensor pipes. NVML answers percentages.
const GPM_AND_NOT: &str = "gpus 3\nname NVIDIA H100 80GB HBM3\nname.1 NVIDIA A100-SXM4-80GB\n\
     util 40\ngpm 1\ngpm.1 0\ngpm_gr 62.5\ngpm_sm 25\ngpm_tensor 12.5\ngpm_sm.2 50\n\
     unsupported.2 tensor_active\n";

#[test]
fn gpm_profiling_metrics_are_ratios_where_the_board_has_gpm_and_absent_where_not() {
    let fake = FakeGpus::new(GPM_AND_NOT);
    let p = probe(&fake.values);
    let s = p["samples"].as_array().unwrap();
    assert_eq!(s[0]["gr_engine_active"], 0.625);
    assert_eq!(s[0]["sm_active"], 0.25);
    assert_eq!(s[0]["tensor_active"], 0.125);
    // No GPM: the metrics are absent, the rest is there.
    assert_eq!(s[1]["gr_engine_active"], Value::Null);
    assert_eq!(s[1]["sm_active"], Value::Null);
    assert_eq!(s[1]["tensor_active"], Value::Null);
    assert_eq!(s[1]["gpu_util_percent"], 40);
    // One metric the driver cannot give leaves the others.
    assert_eq!(s[2]["sm_active"], 0.5);
    assert_eq!(s[2]["gr_engine_active"], 0.625);
    assert_eq!(s[2]["tensor_active"], Value::Null);
    assert_eq!(s[2]["gpu_util_percent"], 40);
    assert!(p["gpm_us"].as_u64().is_some(), "{p}");
}

#[test]
fn without_the_library_the_agent_reports_no_gpus() {
    let out = Command::new(bin("nembo-agent"))
        .args([
            "--probe-gpus",
            "--nvml-lib",
            "/nonexistent/libnvidia-ml.so.1",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(p["nvml_error"].as_str().is_some());
    assert_eq!(p["gpus"].as_array().unwrap().len(), 0);
}

const EIGHT_H100: &str = "gpus 8\nname NVIDIA H100 80GB HBM3\nfb_total 85899345920\n\
     fb_used 1073741824\nutil 40\nutil.2 77\ntemp 45\npower_mw 312500\n\
     nvlink_rx_kib 1000\nnvlink_tx_kib 2000\nretired_sbe.4 2\nunsupported.7 nvlink retired\n";

async fn fleet(c: &Coordinator, filter: pb::GpuFilter) -> Vec<pb::GpuMetrics> {
    let req = pb::GetFleetMetricsRequest {
        filter: Some(filter),
    };
    c.client()
        .await
        .get_fleet_metrics(req)
        .await
        .expect("GetFleetMetrics")
        .into_inner()
        .gpus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_gpus_show_up_live_in_the_fleet_view_and_in_nembo_gpus() {
    let fake = FakeGpus::new(EIGHT_H100);
    // The local provider's agents inherit NEMBO_NVML_LIB from the coordinator.
    let c = Coordinator::start_with_env(&[], &fake.env()).await;
    let job = c.submit("name: train\nrun: sleep 30\n").await;
    c.wait_state(&job, pb::JobState::Running, Duration::from_secs(20))
        .await;
    let gpus = wait_for("8 GPUs with readings", Duration::from_secs(10), || async {
        let g = fleet(&c, Default::default()).await;
        (g.len() == 8 && g.iter().all(|g| g.latest.is_some())).then_some(g)
    })
    .await;
    for g in &gpus {
        let id = g.identity.as_ref().unwrap();
        assert_eq!(id.model, "H100");
        assert_eq!(g.node_id, "node-1");
        assert_eq!(g.provider, "local");
        assert!(!g.region.is_empty());
        assert_eq!(g.job_ids, vec![job.clone()], "the job running there");
        assert_eq!(g.driver_version, "580.00-fake");
    }
    let util = |gs: &[pb::GpuMetrics], i: u32| {
        gs.iter()
            .find(|g| g.identity.as_ref().unwrap().index == i)
            .and_then(|g| g.latest.as_ref()?.gpu_util_percent)
    };
    assert_eq!(util(&gpus, 2), Some(77));
    assert_eq!(util(&gpus, 0), Some(40));

    // Live: the next samples carry what the GPU reports now.
    fake.set(&format!("{EIGHT_H100}util.2 12\n"));
    wait_for("the new reading", Duration::from_secs(5), || async {
        (util(&fleet(&c, Default::default()).await, 2) == Some(12)).then_some(())
    })
    .await;

    // The live stream: one update per interval, carrying new readings.
    let mut stream = c
        .client()
        .await
        .watch_fleet_metrics(pb::WatchFleetMetricsRequest {
            filter: Some(pb::GpuFilter {
                node_id: "node-1".into(),
                ..Default::default()
            }),
            interval: Some(nembo_proto::clock::duration(200)),
        })
        .await
        .expect("WatchFleetMetrics")
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first update");
    assert_eq!(first.gpus.len(), 8);
    fake.set(&format!("{EIGHT_H100}util.2 55\n"));
    tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(m) = stream.message().await.unwrap() {
            if util(&m.gpus, 2) == Some(55) {
                return;
            }
        }
    })
    .await
    .expect("the stream carried the new reading");
    drop(stream);
    fake.set(&format!("{EIGHT_H100}util.2 12\n"));
    wait_for(
        "the reading to settle back",
        Duration::from_secs(5),
        || async { (util(&fleet(&c, Default::default()).await, 2) == Some(12)).then_some(()) },
    )
    .await;

    // Filters.
    let none = fleet(
        &c,
        pb::GpuFilter {
            model: "A100".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(none.is_empty());
    let by_job = fleet(
        &c,
        pb::GpuFilter {
            job_id: job.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_job.len(), 8);

    // The CLI, as JSON and as a table.
    let out = c.cli(&["gpus", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = v["gpus"].as_array().unwrap();
    assert_eq!(listed.len(), 8);
    assert_eq!(listed[2]["gpu_util_percent"], 12);
    assert_eq!(listed[0]["power_w"], 312.5);
    let out = c.cli(&["gpus"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.lines().next().unwrap().starts_with("NODE"), "{table}");
    assert_eq!(
        table.lines().filter(|l| l.starts_with("node-1")).count(),
        8,
        "{table}"
    );
    assert!(table.contains("77%") || table.contains("12%"), "{table}");

    // Prometheus: dcgm-exporter's names and labels, plus Nembo's.
    let out = c.cli(&["api", "info", "--json"]);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    let url = info["metrics_url"].as_str().unwrap().to_string();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/metrics"),
        "{url}"
    );
    let text = get_metrics(&url);
    let line = text
        .lines()
        .find(|l| l.starts_with("DCGM_FI_DEV_GPU_UTIL{gpu=\"2\""))
        .unwrap_or_else(|| panic!("no GPU 2 utilisation in\n{text}"));
    for label in [
        "UUID=\"GPU-fa4e0000-0000-4000-8000-000000000002\"",
        "modelName=\"NVIDIA H100 80GB HBM3\"",
        "Hostname=\"node-1\"",
        "node=\"node-1\"",
        "provider=\"local\"",
        "pci_bus_id=\"",
        "DCGM_FI_DRIVER_VERSION=\"",
    ] {
        assert!(line.contains(label), "{label} missing from {line}");
    }
    // Not `job`: Prometheus would rename it `exported_job`.
    assert!(
        !line.contains(" job=\"") && !line.contains(",job=\""),
        "{line}"
    );
    assert!(line.contains(&format!("nembo_job=\"{job}\"")), "{line}");
    assert!(line.ends_with(" 12"), "{line}");
    let fb_used = text
        .lines()
        .filter(|l| l.starts_with("DCGM_FI_DEV_FB_USED{"))
        .count();
    assert_eq!(fb_used, 8);
    assert!(text.contains("DCGM_FI_DEV_POWER_USAGE{"));
    // Counters that do not move: NVLink idle. GPU 7 has no NVLink at all.
    let nvlink: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("DCGM_FI_PROF_NVLINK_RX_BYTES{"))
        .collect();
    assert_eq!(nvlink.len(), 7, "{nvlink:?}");
    assert!(nvlink.iter().all(|l| l.ends_with(" 0")), "{nvlink:?}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("DCGM_FI_DEV_RETIRED_SBE{gpu=\"4\"") && l.ends_with(" 2")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l == "nembo_raft_is_leader 1"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l == "nembo_jobs{state=\"running\"} 1"),
        "{text}"
    );
    assert!(text.contains("nembo_agent_heartbeat_delay_seconds_count "));
    // raft-engine's own series, which it registers but nobody served.
    assert!(
        text.lines()
            .any(|l| l.starts_with("raft_engine_write_duration_seconds_count")),
        "{text}"
    );
    check_exposition(&text);
}

/// A coordinator whose agents sample every 100 ms, so that the slow
/// readings of every 10th sweep (GPM intervals, the process list) come each
/// second, and a job running on its node.
async fn running_with_fast_sweeps(fake: &FakeGpus) -> (Coordinator, String) {
    let mut env = fake.env();
    env.push(("NEMBO_GPU_SAMPLE_MS", "100".into()));
    let c = Coordinator::start_with_env(&[], &env).await;
    let job = c.submit("name: train\nrun: sleep 30\n").await;
    c.wait_state(&job, pb::JobState::Running, Duration::from_secs(20))
        .await;
    (c, job)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpm_metrics_reach_the_fleet_view_and_metrics_as_dcgm_profiling_fields() {
    let fake = FakeGpus::new(GPM_AND_NOT);
    let (c, job) = running_with_fast_sweeps(&fake).await;
    let latest = |gs: &[pb::GpuMetrics], i: u32| {
        gs.iter()
            .find(|g| g.identity.as_ref().unwrap().index == i)
            .and_then(|g| g.latest.clone())
    };
    let gpm = |t: &pb::GpuTelemetry| (t.gr_engine_active, t.sm_active, t.tensor_active);
    let gpus = wait_for("GPU 0's GPM metrics", Duration::from_secs(10), || async {
        let g = fleet(&c, Default::default()).await;
        let ready = g.len() == 3 && latest(&g, 0).is_some_and(|t| t.sm_active.is_some());
        ready.then_some(g)
    })
    .await;
    let t0 = latest(&gpus, 0).unwrap();
    assert_eq!(gpm(&t0), (Some(0.625), Some(0.25), Some(0.125)));
    let t1 = latest(&gpus, 1).expect("GPU 1 reports");
    assert_eq!(gpm(&t1), (None, None, None), "no GPM, no profiling metrics");
    assert_eq!(t1.gpu_util_percent, Some(40));
    let t2 = wait_for("GPU 2's GPM metrics", Duration::from_secs(5), || async {
        latest(&fleet(&c, Default::default()).await, 2).filter(|t| t.sm_active.is_some())
    })
    .await;
    assert_eq!(gpm(&t2), (Some(0.625), Some(0.5), None));

    // Each interval is measured afresh.
    fake.set(&format!("{GPM_AND_NOT}gpm_sm.0 75\n"));
    wait_for("the next GPM interval", Duration::from_secs(5), || async {
        let t = latest(&fleet(&c, Default::default()).await, 0)?;
        (t.sm_active == Some(0.75)).then_some(())
    })
    .await;

    // /metrics: dcgm-exporter's profiling fields, its HELP, the GPU labels,
    // and only for the GPUs that have them.
    let out = c.cli(&["api", "info", "--json"]);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = get_metrics(info["metrics_url"].as_str().unwrap());
    for (name, help, gpu0, gpu2) in [
        (
            "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
            "Ratio of time the graphics engine is active.",
            "0.625",
            Some("0.625"),
        ),
        (
            "DCGM_FI_PROF_SM_ACTIVE",
            "The ratio of cycles an SM has at least 1 warp assigned.",
            "0.75",
            Some("0.5"),
        ),
        (
            "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
            "Ratio of cycles the tensor (HMMA) pipe is active.",
            "0.125",
            None,
        ),
    ] {
        assert!(
            text.contains(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n")),
            "{name}'s header in\n{text}"
        );
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .collect();
        let on = |gpu: u32| {
            series
                .iter()
                .find(|l| l.starts_with(&format!("{name}{{gpu=\"{gpu}\",")))
        };
        let line = on(0).unwrap_or_else(|| panic!("no {name} for GPU 0 in {series:?}"));
        for label in [
            "UUID=\"GPU-fa4e0000-0000-4000-8000-000000000000\"",
            "pci_bus_id=\"00000000:10:00.0\"",
            "modelName=\"NVIDIA H100 80GB HBM3\"",
            "Hostname=\"node-1\"",
            "DCGM_FI_DRIVER_VERSION=\"580.00-fake\"",
        ] {
            assert!(line.contains(label), "{label} missing from {line}");
        }
        assert!(line.contains(&format!("nembo_job=\"{job}\"")), "{line}");
        assert!(line.ends_with(&format!(" {gpu0}")), "{line}");
        assert_eq!(on(1), None, "GPU 1 has no GPM: {series:?}");
        match gpu2 {
            Some(v) => assert!(
                on(2).is_some_and(|l| l.ends_with(&format!(" {v}"))),
                "{series:?}"
            ),
            None => assert_eq!(on(2), None, "{series:?}"),
        }
        assert_eq!(series.len(), 1 + usize::from(gpu2.is_some()), "{series:?}");
    }
    check_exposition(&text);
    // `nembo gpus --json` carries them too, null where the board has no GPM.
    let out = c.cli(&["gpus", "--json"]);
    let gpus: Value = serde_json::from_slice(&out.stdout).unwrap();
    let by_index = |i: u64| {
        gpus["gpus"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["index"] == i)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_index(0)["sm_active"], 0.75, "{gpus}");
    assert_eq!(by_index(0)["tensor_active"], 0.125, "{gpus}");
    assert_eq!(by_index(1)["sm_active"], Value::Null, "{gpus}");
}

/// GETs /metrics: a 200 in Prometheus' text format; the body.
fn get_metrics(url: &str) -> String {
    let (head, body) = http_get(url).expect("an answer from /metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body
}

/// The exposition parses with the Prometheus Python client and, where
/// promtool is installed (CI installs it), `promtool check metrics` finds
/// nothing but its style lint against dcgm-exporter's own camelCase label
/// `modelName`, which is kept on purpose: dashboards built for
/// dcgm-exporter select on it.
fn check_exposition(text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, text).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/check_metrics.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the Python parser refused /metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let Ok(out) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
    {
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let other_problems: Vec<&str> = report
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| {
                !(l.starts_with("DCGM_FI_")
                    && l.ends_with("label names should be written in 'snake_case' not 'camelCase'"))
            })
            // raft-engine's own gauges (`raft_engine_log_file_count`, ...)
            // keep the names its dashboards know, lint or not.
            .filter(|l| {
                !(l.starts_with("raft_engine_") && l.ends_with("should not have \"_count\" suffix"))
            })
            .collect();
        assert!(
            other_problems.is_empty(),
            "promtool check metrics:\n{report}"
        );
        // The one camelCase label is modelName.
        let camel: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| Some(l.split_once('{')?.1.split_once('}')?.0))
            .flat_map(|labels| labels.split("\",").filter_map(|kv| kv.split_once('=')))
            .map(|(k, _)| k.trim_start_matches(','))
            .filter(|k| {
                k.as_bytes()
                    .windows(2)
                    .any(|w| w[0].is_ascii_lowercase() && w[1].is_ascii_uppercase())
            })
            .collect();
        assert_eq!(camel.into_iter().collect::<Vec<_>>(), vec!["modelName"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_xid_makes_the_node_unhealthy_and_no_new_job_lands_on_it() {
    let fake = FakeGpus::new(EIGHT_H100);
    // One node at most: a job that cannot use it must wait, not move.
    let hook_out = fake.dir().join("hook.txt");
    let hook = format!(
        "echo \"$NEMBO_NODE_ID|$NEMBO_UNHEALTHY_REASON|$NEMBO_JOB_IDS\" >> {}",
        hook_out.display()
    );
    let c =
        Coordinator::start_with_env(&["--max-nodes", "1", "--on-unhealthy", &hook], &fake.env())
            .await;
    let running = c.submit("name: long\nrun: sleep 60\n").await;
    c.wait_state(&running, pb::JobState::Running, Duration::from_secs(20))
        .await;
    wait_for("GPU readings", Duration::from_secs(10), || async {
        (fleet(&c, Default::default()).await.len() == 8).then_some(())
    })
    .await;

    // The driver reports XID 79 (fallen off the bus) on GPU 3.
    let injected = std::time::Instant::now();
    fake.set(&format!("{EIGHT_H100}xid 3 79\n"));
    let reason = wait_for(
        "node-1 to turn unhealthy",
        Duration::from_secs(10),
        || async {
            let nodes = c.try_nodes().await?;
            let n = nodes.into_iter().find(|n| n.node_id == "node-1")?;
            (!n.unhealthy_reason.is_empty()).then_some(n.unhealthy_reason)
        },
    )
    .await;
    eprintln!("XID 79 -> node unhealthy in {:?}", injected.elapsed());
    assert_eq!(reason, "GPU 3 reported critical XID 79");
    let xid = fleet(&c, Default::default())
        .await
        .into_iter()
        .find(|g| g.identity.as_ref().unwrap().index == 3)
        .and_then(|g| g.latest?.last_xid);
    assert_eq!(xid, Some(79), "the fleet view carries the XID");
    let ran = wait_for("the on-unhealthy hook", Duration::from_secs(5), || async {
        std::fs::read_to_string(&hook_out).ok()
    })
    .await;
    assert_eq!(
        ran,
        format!("node-1|GPU 3 reported critical XID 79|{running}\n"),
        "the hook ran once, with the node, the reason and its jobs"
    );

    // New work does not land there; what runs there keeps running.
    let waiting = c.submit("name: next\nrun: echo hi\n").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let job = c
        .client()
        .await
        .get_job(pb::GetJobRequest {
            job_id: waiting.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(job.state, pb::JobState::Pending as i32, "{job:?}");
    let job = c
        .client()
        .await
        .get_job(pb::GetJobRequest { job_id: running })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(job.state, pb::JobState::Running as i32);
    let out = c.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("node-1")).unwrap_or("");
    assert!(
        line.contains("UNHEALTHY") && line.contains("critical XID 79"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_process_is_mapped_to_its_job() {
    let fake = FakeGpus::new(EIGHT_H100);
    let (c, job) = running_with_fast_sweeps(&fake).await;
    // The driver reports the job's process (its group leader) on GPU 1 and
    // an unrelated process on GPU 2.
    let pgid = std::fs::read_to_string(
        c.dir
            .path()
            .join("nodes/node-1/jobs")
            .join(format!("{job}-1"))
            .join("pid"),
    )
    .expect("the job's process group")
    .trim()
    .to_string();
    fake.set(&format!(
        "{EIGHT_H100}pids.1 {pgid}\npids.2 {}\n",
        std::process::id()
    ));
    let jobs_on = |gs: &[pb::GpuMetrics], i: u32| {
        gs.iter()
            .find(|g| g.identity.as_ref().unwrap().index == i)
            .and_then(|g| g.latest.clone())
            .map(|t| (t.processes, t.job_ids))
    };
    let (procs, jobs) = wait_for(
        "GPU 1's process mapped to the job",
        Duration::from_secs(10),
        || async {
            let g = fleet(&c, Default::default()).await;
            jobs_on(&g, 1).filter(|(_, j)| !j.is_empty())
        },
    )
    .await;
    assert_eq!(procs, Some(1));
    assert_eq!(jobs, vec![job.clone()]);
    let g = fleet(&c, Default::default()).await;
    assert_eq!(
        jobs_on(&g, 2),
        Some((Some(1), Vec::new())),
        "a process that is not a job's maps to nothing"
    );
    assert_eq!(jobs_on(&g, 0), Some((Some(0), Vec::new())));

    // The history the leader keeps: every sample so far, oldest first.
    let mut client = c.client().await;
    let history = |index: u32, minutes: bool| pb::GetGpuHistoryRequest {
        node_id: "node-1".into(),
        index,
        minutes,
    };
    let points = client
        .get_gpu_history(history(0, false))
        .await
        .unwrap()
        .into_inner()
        .points;
    assert!(points.len() >= 5, "{} points", points.len());
    assert!(points
        .iter()
        .all(|p| p.gpu_util_percent == 40 && p.power_w == 312));
    assert!(points
        .windows(2)
        .all(|w| nembo_tests::ms(&w[0].time) <= nembo_tests::ms(&w[1].time)));
    let minutes = client.get_gpu_history(history(0, true)).await.unwrap();
    assert!(
        minutes.into_inner().points.len() <= 1,
        "no minute is complete yet"
    );
    let missing = client.get_gpu_history(history(9, false)).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
}
