//! Storage objects against moto's S3 with the machine's real rclone and
//! FUSE: a named bucket is made, a local source uploaded into it, then
//! mounted (MOUNT, and MOUNT_CACHED, whose writes are in the bucket once the
//! job is over). Where this machine has no rclone or no FUSE, each test says
//! so and stops (the argv and environment are unit-tested in
//! `nembo_agent::storage`).

use std::path::Path;
use std::time::Duration;

use nembo_proto::v1 as pb;
use nembo_tests::{Coordinator, Moto};

fn fuse_or_why() -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("no /dev/fuse".into());
    }
    for tool in ["rclone", "fusermount3"] {
        let found = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok();
        if !found {
            return Err(format!("{tool} is not installed"));
        }
    }
    Ok(())
}

fn objects(endpoint: &str, bucket: &str) -> Vec<String> {
    let v = Moto::helper(&["objects", endpoint, bucket]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_bucket_is_made_filled_from_a_local_source_and_mounted() {
    if let Err(why) = fuse_or_why() {
        eprintln!("SKIPPED: FUSE mounts cannot run on this machine: {why}");
        return;
    }
    let moto = Moto::start(&[]).await;
    let endpoint = moto.endpoint.clone();
    let c = Coordinator::start(&[]).await;
    let src = c.dir.path().join("ckpt-src");
    std::fs::create_dir_all(src.join("step-0")).unwrap();
    std::fs::write(src.join("step-0/weights.txt"), "initial weights\n").unwrap();
    let pid = std::process::id();
    let (ckpt, cache) = (
        format!("/tmp/nembo-st-{pid}/ckpt"),
        format!("/tmp/nembo-st-{pid}/cache"),
    );
    let (ckpt_bucket, cache_bucket) = (format!("nembo-ckpt-{pid}"), format!("nembo-cache-{pid}"));
    let scratch = format!("/tmp/nembo-st-{pid}/scratch");
    let scratch_bucket = format!("nembo-scratch-{pid}");
    let task = c.dir.path().join("task.yaml");
    std::fs::write(
        &task,
        format!(
            r#"file_mounts:
  {ckpt}:
    name: {ckpt_bucket}
    source: {src}
  {cache}:
    name: {cache_bucket}
    mode: MOUNT_CACHED
    type: MODEL_CHECKPOINT_RW
    config: {{mount_cached: {{transfers: 2, vfs_cache_max_size: 1G}}}}
  {scratch}:
    name: {scratch_bucket}
    persistent: false
envs: {{AWS_ENDPOINT_URL: "{endpoint}", AWS_DEFAULT_REGION: us-east-1}}
secrets: {{AWS_ACCESS_KEY_ID: testing, AWS_SECRET_ACCESS_KEY: testing}}
run: |
  cat {ckpt}/step-0/weights.txt
  echo trained > {ckpt}/step-1.txt
  echo cached result > {cache}/result.txt
  echo temporary > {scratch}/tmp.txt
  grep -q " {ckpt} fuse" /proc/mounts && echo "{ckpt} is a FUSE mount"
  for p in /proc/[0-9]*; do tr '\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep "rclone mount" | grep "{cache} " | sed 's/^/rclone: /'
"#,
            src = src.display()
        ),
    )
    .unwrap();
    let out = c.cli(&["launch", task.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("initial weights"), "{stdout}");
    // The cached mount got the task's knobs over SkyPilot's defaults and its
    // preset's; a knob this rclone lacks is left out, and said so.
    let rclone = stdout
        .lines()
        .find(|l| l.starts_with("rclone: "))
        .unwrap_or_else(|| panic!("no rclone line: {stdout}"));
    for flag in [
        "--transfers 2",
        "--vfs-cache-max-size 1G",
        "--vfs-read-chunk-size 32M",
    ] {
        assert!(rclone.contains(flag), "{flag}: {rclone}");
    }
    assert!(!rclone.contains("10G"), "{rclone}");
    assert!(
        rclone.contains("--vfs-read-chunk-streams 16")
            || stdout.contains("left out --vfs-read-chunk-streams"),
        "{rclone}\n{stdout}"
    );
    assert!(
        stdout.contains(&format!("{ckpt} is a FUSE mount")),
        "{stdout}"
    );
    let job = c.jobs().await.pop().unwrap();
    assert_eq!(job.state(), pb::JobState::Succeeded);
    // The local source went into the bucket, and the job's writes too; the
    // cached mount's write was uploaded before the job was reported over.
    let mut keys = objects(&endpoint, &ckpt_bucket);
    keys.sort();
    assert_eq!(keys, ["step-0/weights.txt", "step-1.txt"]);
    assert_eq!(objects(&endpoint, &cache_bucket), ["result.txt"]);
    // `persistent: false`: gone with the job; the others stay.
    let gone = nembo_tests::wait_for(
        "the scratch bucket to go",
        Duration::from_secs(20),
        || async {
            let all = Moto::helper(&["buckets", &endpoint]);
            let names: Vec<&str> = all
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|b| b.as_str())
                .collect();
            (!names.contains(&scratch_bucket.as_str())).then_some(names.len())
        },
    )
    .await;
    assert!(gone >= 2, "the persistent buckets stay");
    // Unmounted with the job.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&ckpt) && !mounts.contains(&cache),
        "{mounts}"
    );

    // A second job mounts the same bucket and sees the first one's output.
    std::fs::write(
        &task,
        format!(
            r#"file_mounts:
  {ckpt}: {{source: "s3://{ckpt_bucket}", mode: MOUNT, config: {{mount: {{read_only: true}}}}}}
envs: {{AWS_ENDPOINT_URL: "{endpoint}", AWS_DEFAULT_REGION: us-east-1}}
secrets: {{AWS_ACCESS_KEY_ID: testing, AWS_SECRET_ACCESS_KEY: testing}}
run: |
  cat {ckpt}/step-1.txt
  echo more > {ckpt}/step-2.txt || echo read-only as asked
"#
        ),
    )
    .unwrap();
    let out = c.cli(&["launch", task.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("trained"), "{stdout}");
    assert!(stdout.contains("read-only as asked"), "{stdout}");
    let _ = std::fs::remove_dir_all(format!("/tmp/nembo-st-{pid}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_cannot_be_reached_fails_setup_naming_the_mount() {
    if let Err(why) = fuse_or_why() {
        eprintln!("SKIPPED: FUSE mounts cannot run on this machine: {why}");
        return;
    }
    let moto = Moto::start(&[]).await;
    let c = Coordinator::start(&[]).await;
    let dst = format!("/tmp/nembo-st-missing-{}", std::process::id());
    let id = c
        .submit(&format!(
            "file_mounts:\n  {dst}: {{source: s3://no-such-bucket-here}}\nenvs: {{AWS_ENDPOINT_URL: \"{}\", AWS_DEFAULT_REGION: us-east-1}}\nsecrets: {{AWS_ACCESS_KEY_ID: testing, AWS_SECRET_ACCESS_KEY: testing}}\nrun: echo ran\n",
            moto.endpoint
        ))
        .await;
    let job = c
        .wait_state(&id, pb::JobState::FailedSetup, Duration::from_secs(90))
        .await;
    assert!(
        job.message.contains(&format!("file_mounts.{dst}")),
        "{}",
        job.message
    );
    assert!(!c.logs(&id).await.contains("ran"));
}

/// `store: r2`: the bucket is made and mounted at the R2 endpoint the job's
/// secrets name (here moto, standing in for R2's S3 API), not at AWS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r2_bucket_is_made_and_mounted_with_the_jobs_r2_credentials() {
    if let Err(why) = fuse_or_why() {
        eprintln!("SKIPPED: FUSE mounts cannot run on this machine: {why}");
        return;
    }
    let moto = Moto::start(&[]).await;
    let endpoint = moto.endpoint.clone();
    let c = Coordinator::start(&[]).await;
    let src = c.dir.path().join("weights");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("w.txt"), "r2 weights\n").unwrap();
    let pid = std::process::id();
    let (dst, bucket) = (format!("/tmp/nembo-r2-{pid}/w"), format!("nembo-r2-{pid}"));
    let task = c.dir.path().join("r2.yaml");
    std::fs::write(
        &task,
        format!(
            r#"file_mounts:
  {dst}: {{name: {bucket}, store: r2, source: {src}, mode: MOUNT}}
secrets: {{R2_ENDPOINT_URL: "{endpoint}", R2_ACCESS_KEY_ID: testing, R2_SECRET_ACCESS_KEY: testing}}
run: |
  cat {dst}/w.txt
  echo from-the-job > {dst}/out.txt
"#,
            src = src.display()
        ),
    )
    .unwrap();
    let out = c.cli(&["launch", task.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains("r2 weights"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut keys = objects(&endpoint, &bucket);
    keys.sort();
    assert_eq!(keys, ["out.txt", "w.txt"]);
}
