//! `nembo launch` as SkyPilot users type it: an inline command, and flags
//! that override the task file (every alternative included), checked like
//! the file itself.

use std::process::Output;

use nembo_tests::Coordinator;
use serde_json::Value;

fn out(o: &Output) -> (bool, String, String) {
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_command_with_env_file_env_and_secret_runs() {
    let c = Coordinator::start(&[]).await;
    let d = tempfile::tempdir().unwrap();
    let env_file = d.path().join("run.env");
    std::fs::write(&env_file, "A=from-file\nB=\"two words\"\n").unwrap();
    let (ok, stdout, stderr) = out(&c.cli(&[
        "launch",
        "echo A=$A B=$B S=$S",
        "--env-file",
        env_file.to_str().unwrap(),
        "--env",
        "A=from-flag",
        "--secret",
        "S=hunter2",
        "-y",
    ]));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("A=from-flag B=two words S=hunter2"),
        "{stdout}"
    );
    // A secret given on the line is never shown back.
    let (ok, stdout, stderr) =
        out(&c.cli(&["launch", "--dry-run", "echo $S", "--secret", "S=hunter2"]));
    assert!(ok, "{stderr}");
    assert!(!stdout.contains("hunter2"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_override_the_task_file_and_unsupported_ones_are_refused_by_name() {
    let c = Coordinator::start(&[]).await;
    let d = tempfile::tempdir().unwrap();
    let task = d.path().join("t.yaml");
    std::fs::write(
        &task,
        "resources:\n  accelerators: A100:8\n  any_of:\n    - infra: local/us-east\n    - infra: local/eu-west\nrun: nvidia-smi\n",
    )
    .unwrap();
    let dry = |extra: &[&str]| {
        let mut args = vec!["launch", "--dry-run", "--json", task.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = out(&c.cli(&args));
        assert!(ok, "{stderr}");
        serde_json::from_str::<Value>(&stdout).unwrap()
    };
    let v = dry(&[
        "--gpus",
        "H100:4",
        "--infra",
        "local/eu-west",
        "--num-nodes",
        "2",
    ]);
    let first = &v["candidates"][0];
    assert_eq!(first["accelerator"], "H100", "{v}");
    assert_eq!(first["accelerator_count"], 4.0, "{v}");
    assert_eq!(first["region"], "eu-west", "{v}");
    assert!(
        v["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["region"] == "eu-west"),
        "every alternative got the place: {v}"
    );
    assert_eq!(v["task"]["num_nodes"], 2, "{v}");
    let v = dry(&["--gpus", "none", "--cpus", "4+"]);
    assert!(v["candidates"][0]["accelerator"].is_null(), "{v}");

    let v = dry(&[
        "--ports",
        "8888,9000-9001",
        "--disk-size",
        "1",
        "--disk-tier",
        "high",
    ]);
    let first = &v["task"]["resources"]["any_of"][0];
    // Several ports are written back as a list, which SkyPilot's parser
    // (and Nembo's) reads again as they were.
    assert_eq!(
        first["ports"],
        serde_json::json!(["8888", "9000-9001"]),
        "{v}"
    );
    assert_eq!(first["disk_size"], "1", "{v}");
    assert_eq!(first["disk_tier"], "high", "{v}");
    let v = dry(&["--image-id", "docker:ubuntu:22.04"]);
    assert_eq!(
        v["task"]["resources"]["any_of"][0]["image_id"], "docker:ubuntu:22.04",
        "{v}"
    );
    let (ok, _, stderr) = out(&c.cli(&[
        "launch",
        task.to_str().unwrap(),
        "--image-id",
        "docker:--privileged",
    ]));
    assert!(!ok);
    assert!(
        stderr.contains("resources.image_id") && stderr.contains("not a container image"),
        "{stderr}"
    );
    let (ok, _, stderr) = out(&c.cli(&["launch", "true", "--infra", "local", "--cloud", "local"]));
    assert!(!ok && stderr.contains("--infra"), "{stderr}");
    assert!(c.jobs().await.is_empty());
}
