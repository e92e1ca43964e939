//! `image_id: docker:<image>` with the machine's real podman (or docker):
//! setup and run execute in the image, see the job's files and variables,
//! and hear a cancel. No registry is reachable from test machines, so the
//! image is built here, from this machine's own bash and coreutils. Where
//! this machine cannot run containers at all, each test says why and stops
//! (the argv is unit-tested in `nembo_agent::container`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nembo_agent::container::{ContainerRun, Engine, Host, DRIVER};
use nembo_proto::v1 as pb;
use nembo_tests::{wait_for, Coordinator};

const IMAGE: &str = "localhost/nembo-test-rootfs:1";

/// The engine, with the test image in it, or why containers cannot run here.
fn ready() -> Result<Engine, String> {
    static READY: std::sync::OnceLock<Result<Engine, String>> = std::sync::OnceLock::new();
    READY.get_or_init(prepare).clone()
}

fn prepare() -> Result<Engine, String> {
    let engine = Engine::detect().ok_or("neither docker nor podman is installed")?;
    let program = engine.program();
    let has_image = Command::new(program)
        .args(["image", "inspect", IMAGE])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_image {
        let dir = tempfile::tempdir().unwrap();
        let tar = dir.path().join("rootfs.tar");
        build_rootfs(&dir.path().join("root"), &tar)?;
        let out = Command::new(program)
            .args(["import", tar.to_str().unwrap(), IMAGE])
            .output()
            .map_err(|e| format!("{program} import: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{program} import failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    // Run it the way the agent will, so that a machine that cannot (no
    // user namespaces, no runtime) is told apart from a Nembo bug.
    let job = tempfile::tempdir().unwrap();
    std::fs::create_dir(job.path().join("work")).unwrap();
    std::fs::write(job.path().join("container.sh"), DRIVER).unwrap();
    std::fs::write(job.path().join("run.sh"), "true\n").unwrap();
    let argv = ContainerRun {
        engine,
        image: IMAGE.into(),
        name: format!("nembo-probe-{}", std::process::id()),
        job_dir: job.path().to_path_buf(),
        shared: Vec::new(),
        env_names: Vec::new(),
        gpus: false,
        run_options: Vec::new(),
        host: Host::probe(),
    }
    .argv();
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| format!("{program} run: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} cannot run a container on this machine: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(engine)
}

/// A root filesystem of this machine's bash and a few tools, with their
/// libraries, and a file that says which image it is.
fn build_rootfs(root: &Path, tar: &Path) -> Result<(), String> {
    let mut files: Vec<PathBuf> = Vec::new();
    for tool in ["bash", "sleep", "cat", "ls", "id", "env", "mkdir", "rm"] {
        let path = which(tool).ok_or(format!("{tool} is not on this machine"))?;
        files.push(path.clone());
        let ldd = Command::new("ldd")
            .arg(&path)
            .output()
            .map_err(|e| format!("ldd: {e}"))?;
        for word in String::from_utf8_lossy(&ldd.stdout).split_whitespace() {
            if word.starts_with('/') {
                files.push(word.into());
            }
        }
    }
    for f in &files {
        let dst = root.join(f.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        // Followed: the libraries are usually symlinks into the same dir.
        std::fs::copy(f, &dst).map_err(|e| format!("{}: {e}", f.display()))?;
    }
    for d in ["tmp", "proc", "sys", "dev", "etc", "opt", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("etc/nembo-test-image"), "yes\n").unwrap();
    let ok = Command::new("tar")
        .args([
            "-C",
            root.to_str().unwrap(),
            "-cf",
            tar.to_str().unwrap(),
            ".",
        ])
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(()).ok_or("tar failed".into())
}

fn which(tool: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .map(|p| p.canonicalize().unwrap_or(p))
}

macro_rules! engine_or_skip {
    () => {
        match ready() {
            Ok(e) => e,
            Err(why) => {
                eprintln!("SKIPPED: containers cannot run on this machine: {why}");
                return;
            }
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_in_its_container_image_with_its_files_and_environment() {
    let engine = engine_or_skip!();
    let c = Coordinator::start(&[]).await;
    let data = c.dir.path().join("data-src");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("hello.txt"), "hello from a file mount\n").unwrap();
    let mounted = c.dir.path().join("mounted");
    let marker = "/opt/nembo-setup-marker";
    let yaml = format!(
        r#"resources: {{image_id: 'docker:{IMAGE}'}}
config: {{docker: {{run_options: ['--env FROM_RUN_OPTIONS=yes']}}}}
file_mounts: {{{mounted}: {data}}}
envs: {{GREETING: hi}}
secrets: {{TOKEN: s3cr3t}}
setup: echo from-setup > {marker}
run: |
  cat /etc/nembo-test-image
  echo setup-left=$(cat {marker})
  cat {mounted}/hello.txt
  echo greeting=$GREETING token=$TOKEN rank=$SKYPILOT_NODE_RANK job=$NEMBO_JOB_ID
  echo pwd=$PWD
  echo run_options=$FROM_RUN_OPTIONS
"#,
        mounted = mounted.display(),
        data = data.display(),
    );
    // Through the CLI, which uploads the local source.
    let task = c.dir.path().join("task.yaml");
    std::fs::write(&task, yaml).unwrap();
    let out = c.cli(&["launch", task.to_str().unwrap()]);
    let logs = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{logs}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = c.jobs().await.pop().expect("the job");
    let id = job.job_id.clone();
    assert_eq!(job.state(), pb::JobState::Succeeded);
    assert!(logs.contains("yes\n"), "ran in the image: {logs}");
    assert!(
        logs.contains("setup-left=from-setup"),
        "setup and run share one container: {logs}"
    );
    assert!(logs.contains("hello from a file mount"), "{logs}");
    assert!(
        logs.contains(&format!("greeting=hi token=s3cr3t rank=0 job={id}")),
        "{logs}"
    );
    assert!(logs.contains("/work"), "runs in the job's work dir: {logs}");
    assert!(logs.contains("run_options=yes"), "{logs}");
    assert!(
        !Path::new(marker).exists(),
        "setup wrote into the container, not onto the node"
    );
    // The container went with the attempt.
    let job_dir = job_dir(&c, &job.node_ids[0], &id);
    assert!(!container_left(engine, &job_dir));
    // The secret went by name, never on the engine's command line.
    let args = std::fs::read_to_string(job_dir.join("container.args")).unwrap();
    assert!(args.contains("TOKEN") && !args.contains("s3cr3t"), "{args}");
}

fn job_dir(c: &Coordinator, node: &str, job: &str) -> PathBuf {
    c.dir
        .path()
        .join("nodes")
        .join(node)
        .join("jobs")
        .join(format!("{job}-1"))
}

/// The attempt's container is still there (running or not).
fn container_left(engine: Engine, job_dir: &Path) -> bool {
    let name = std::fs::read_to_string(job_dir.join(nembo_agent::container::NAME_FILE))
        .expect("the container's name");
    let left = Command::new(engine.program())
        .args(["ps", "-a", "-q", "--filter", &format!("name={name}")])
        .output()
        .unwrap();
    !String::from_utf8_lossy(&left.stdout).trim().is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_job_inside_its_container_and_removes_it() {
    let engine = engine_or_skip!();
    let c = Coordinator::start(&[]).await;
    let id = c
        .submit(&format!(
            r#"resources: {{image_id: 'docker:{IMAGE}'}}
run: |
  trap 'echo the job heard TERM; exit 7' TERM
  echo ready
  while :; do sleep 0.2; done
"#
        ))
        .await;
    let job = c
        .wait_state(&id, pb::JobState::Running, Duration::from_secs(120))
        .await;
    wait_for("the job to start", Duration::from_secs(60), || async {
        c.logs_so_far(&id).await.contains("ready").then_some(())
    })
    .await;
    let out = c.cli(&["cancel", &id]);
    assert!(out.status.success());
    c.wait_state(&id, pb::JobState::Cancelled, Duration::from_secs(60))
        .await;
    let logs = wait_for("the job's last words", Duration::from_secs(20), || async {
        let l = c.logs(&id).await;
        l.contains("heard TERM").then_some(l)
    })
    .await;
    assert!(logs.contains("the job heard TERM"), "{logs}");
    let dir = job_dir(&c, &job.node_ids[0], &id);
    wait_for("the container to go", Duration::from_secs(20), || async {
        (!container_left(engine, &dir)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_an_engine_fails_the_attempt_naming_the_image() {
    let c = Coordinator::start_with_env(&[], &[("NEMBO_CONTAINER_ENGINE", "none")]).await;
    let id = c
        .submit("resources: {image_id: 'docker:ubuntu:22.04'}\nrun: echo never\n")
        .await;
    let job = wait_for("the attempt to fail", Duration::from_secs(60), || async {
        let jobs = c.jobs().await;
        let job = jobs.into_iter().find(|j| j.job_id == id)?;
        (job.state() == pb::JobState::Failed || job.state() == pb::JobState::FailedSetup)
            .then_some(job)
    })
    .await;
    assert!(
        job.message.contains("docker:ubuntu:22.04") && job.message.contains("neither"),
        "{}",
        job.message
    );
    assert!(!c.logs(&id).await.contains("never"));
}
