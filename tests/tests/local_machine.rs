//! The local provider tells the truth: by default it offers the machine as
//! it is (its GPUs as NVML reports them, its vCPUs and memory), and
//! simulated shapes only when asked, marked wherever they are shown. The
//! "machine" here is the fake NVML library with eight H100s, or no NVML.

use std::time::Duration;

use nembo_proto::v1 as pb;
use nembo_tests::{Coordinator, FakeGpus};
use serde_json::Value;

const EIGHT_H100: &str = "gpus 8\nname NVIDIA H100 80GB HBM3\nfb_total 85899345920\nutil 10\n";

/// No NVML at all, whatever the test machine has.
const NO_NVML: [(&str, &str); 1] = [("NEMBO_NVML_LIB", "/nonexistent/libnvidia-ml.so.1")];

fn json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn text(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One line per variable, as the job saw it (`-` when unset).
const SHOW_ENV: &str = "echo \"CUDA=${CUDA_VISIBLE_DEVICES--} SIM=${NEMBO_SIMULATED--}\"";

fn task(resources: &str, run: &str) -> String {
    format!("resources: {resources}\nrun: |\n  {run}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_jobs_run_on_the_gpus_nvml_reports_and_each_gets_only_its_own() {
    let fake = FakeGpus::new(EIGHT_H100);
    let c = Coordinator::start_over_machine(&[], &fake.env()).await;

    // show-gpus lists exactly what the library reports: one machine of 8 H100s.
    let offers = json(&c.cli(&["show-gpus", "--cloud", "local", "--json"]));
    let offers = offers["offerings"].as_array().unwrap();
    assert_eq!(offers.len(), 1, "{offers:?}");
    let host = &offers[0];
    assert_eq!(host["accelerator"], "H100");
    assert_eq!(host["accelerator_count"], 8.0);
    assert_eq!(host["instance_type"], "host-8xH100-80GB");
    assert_eq!(host["region"], "host");
    assert_eq!(host["hourly_price"], 0.0);
    assert_eq!(host["simulated"], false);
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    assert!(
        host["cpus"].as_f64().unwrap() < cpus,
        "a reserve is kept: {host}"
    );
    let table = text(&c.cli(&["show-gpus", "H100"]));
    assert!(table.contains("host-8xH100-80GB"), "{table}");
    assert!(!table.contains("simulated"), "{table}");

    // Two jobs of 4 GPUs share the one machine, each with its own 4 GPUs;
    // a job of 1 GPU asked for while they run waits for room.
    let hold = format!("{SHOW_ENV}; sleep 6");
    let a = c.submit(&task("{accelerators: H100:4}", &hold)).await;
    let b = c.submit(&task("{accelerators: H100:4}", &hold)).await;
    for j in [&a, &b] {
        c.wait_state(j, pb::JobState::Running, Duration::from_secs(60))
            .await;
    }
    let one = c.submit(&task("{accelerators: H100:1}", SHOW_ENV)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waiting = c
        .wait_state(&one, pb::JobState::Pending, Duration::from_secs(5))
        .await;
    assert!(waiting.node_ids.is_empty());
    let nodes: Vec<pb::Node> = c.nodes().await;
    assert_eq!(nodes.len(), 1, "one machine, one node: {nodes:?}");
    assert!(!nodes[0].simulated);
    assert_eq!(
        nodes[0].resources.as_ref().unwrap().accelerators["H100"],
        8.0
    );

    let seen = |log: String| {
        log.lines()
            .find_map(|l| l.strip_prefix("CUDA="))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no CUDA= line in {log:?}"))
    };
    let gpus_of = |line: &str| -> Vec<u32> {
        let list = line.split(' ').next().unwrap();
        list.split(',').map(|i| i.parse().unwrap()).collect()
    };
    let (la, lb) = (seen(c.logs(&a).await), seen(c.logs(&b).await));
    assert!(
        la.ends_with("SIM=-") && lb.ends_with("SIM=-"),
        "{la} / {lb}"
    );
    let (ga, gb) = (gpus_of(&la), gpus_of(&lb));
    assert_eq!((ga.len(), gb.len()), (4, 4), "{la} / {lb}");
    assert!(
        ga.iter().all(|g| !gb.contains(g)),
        "shared GPUs: {la} / {lb}"
    );
    // Once they end, the waiting job runs, on one GPU.
    let l1 = seen(c.logs(&one).await);
    assert_eq!(gpus_of(&l1).len(), 1, "{l1}");
    let j = c
        .wait_state(&one, pb::JobState::Succeeded, Duration::from_secs(30))
        .await;
    assert_eq!(j.node_ids, vec![nodes[0].node_id.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_gpu_a_gpu_task_is_refused_and_a_cpu_task_still_runs() {
    let c = Coordinator::start_over_machine(&[], &NO_NVML).await;
    let err = c
        .client()
        .await
        .submit_job(pb::SubmitJobRequest {
            task: Some(pb::submit_job_request::Task::TaskYaml(task(
                "{accelerators: H100:8}",
                "nvidia-smi",
            ))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "resources.accelerators: no enabled provider offers H100:8 (this machine has no GPU; \
         enable a cloud in providers.yaml, see `nembo check`)"
    );
    assert!(c.jobs().await.is_empty(), "nothing was queued");
    let shown = text(&c.cli(&["show-gpus", "H100"]));
    assert!(
        shown.contains("No enabled provider offers that: enable a cloud"),
        "{shown}"
    );
    let check = text(&c.cli(&["check"]));
    assert!(check.contains("no GPU"), "{check}");

    let hello = c
        .submit(&task("{cpus: 1}", "echo hello from $(hostname)"))
        .await;
    let j = c
        .wait_state(&hello, pb::JobState::Succeeded, Duration::from_secs(60))
        .await;
    assert!(c.logs(&j.job_id).await.contains("hello from"));
    let node = &c.nodes().await[0];
    assert_eq!(node.instance_type, "host-cpu");
    assert!(!node.simulated);

    // Clusters on this machine share it: a plain launch, then a named one,
    // then exec, stop and start, all on the machine's one node.
    for args in [
        &["launch", "echo on-the-machine"][..],
        &["launch", "-c", "dev", "echo named"],
        &["exec", "dev", "echo exec"],
        &["stop", "dev", "-y"],
        &["start", "dev"],
        &["exec", "dev", "echo after-start"],
    ] {
        let out = c.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(c.nodes().await.len(), 1, "one machine, one node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_shapes_only_when_asked_and_marked_wherever_shown() {
    // No simulate flag and no NVML: nothing pretends to have a GPU.
    let providers = tempfile::tempdir().unwrap();
    let file = providers.path().join("providers.yaml");
    std::fs::write(&file, "local:\n  simulate: true\n").unwrap();
    let c =
        Coordinator::start_over_machine(&["--providers", file.to_str().unwrap()], &NO_NVML).await;

    let offers = json(&c.cli(&["show-gpus", "H100:8", "--json"]));
    let offers = offers["offerings"].as_array().unwrap();
    assert!(!offers.is_empty());
    assert!(offers.iter().all(|o| o["simulated"] == true), "{offers:?}");
    let table = text(&c.cli(&["show-gpus", "H100:8"]));
    assert!(table.contains("H100:8 (simulated)"), "{table}");
    assert!(table.contains("their GPUs do not exist"), "{table}");

    let t = task("{accelerators: H100:8}", SHOW_ENV);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.yaml");
    std::fs::write(&path, &t).unwrap();
    let dry = text(&c.cli(&["launch", "--dry-run", path.to_str().unwrap()]));
    assert!(dry.contains("H100:8 (simulated)"), "{dry}");

    let job = c.submit(&t).await;
    let log = c.logs(&job).await;
    assert!(log.contains("CUDA=- SIM=1"), "{log}");
    let status = text(&c.cli(&["status"]));
    assert!(status.contains("H100:8 (simulated)"), "{status}");
    let nodes = c.nodes().await;
    assert!(nodes.iter().all(|n| n.simulated), "{nodes:?}");
    let check = text(&c.cli(&["check"]));
    assert!(check.contains("SIMULATED"), "{check}");

    // A real-machine setting that only makes sense when simulating is refused.
    std::fs::write(&file, "local:\n  spot_factor: 0.5\n").unwrap();
    let out = std::process::Command::new(nembo_tests::bin("nembo-coordinator"))
        .args(["--data-dir", dir.path().join("d").to_str().unwrap()])
        .args(["--providers", file.to_str().unwrap()])
        .envs(NO_NVML)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("local.spot_factor"), "{err}");
}

/// The README's first command, as a newcomer runs it: no configuration, a
/// machine without a GPU, the coordinator started in the background.
#[test]
fn the_readme_hello_task_runs_on_the_machine_with_no_configuration() {
    let home = tempfile::tempdir().unwrap();
    let nembo = |args: &[&str]| {
        std::process::Command::new(nembo_tests::bin("nembo"))
            .args(args)
            .env("NEMBO_HOME", home.path())
            .env("NEMBO_AGENT_BIN", nembo_tests::bin("nembo-agent"))
            .env(
                "NEMBO_COORDINATOR_BIN",
                nembo_tests::bin("nembo-coordinator"),
            )
            .env_remove("NEMBO_API_INFO")
            .env_remove(nembo_tests::SIMULATE_GPUS.0)
            .envs(NO_NVML)
            .output()
            .unwrap()
    };
    let hello = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/hello.yaml");
    let out = nembo(&["launch", hello]);
    let _ = nembo(&["local", "down"]);
    let stdout = text(&out);
    assert!(stdout.contains("hello from Nembo job"), "{stdout}");
    assert!(stdout.contains("done"), "{stdout}");
}
