//! Data in, as SkyPilot tasks ask for it: local `file_mounts` and the
//! `workdir` shipped content-addressed through the coordinators (only what
//! changed moves), bucket URIs copied by the agent from S3 (moto, the real
//! wire format) without holding an object in memory, and every bad input
//! refused with the field named.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use nembo_proto::v1 as pb;
use nembo_tests::{Coordinator, Moto};

fn ok(out: &Output) -> (String, String) {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    (stdout, stderr)
}

fn write(path: &Path, body: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mounts_and_the_workdir_arrive_whole_and_a_relaunch_sends_only_what_changed() {
    let c = Coordinator::start(&[]).await;
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    // The workdir has a .skyignore: it alone decides (its .gitignore is not read).
    let src = root.join("src");
    write(&src.join("train.sh"), "echo training\n", 0o755);
    write(&src.join("lib/util.txt"), "util\n", 0o600);
    write(&src.join("secret.txt"), "do not ship\n", 0o644);
    write(&src.join("cache/blob"), "cached\n", 0o644);
    write(
        &src.join("keep.txt"),
        "kept: .gitignore is not read\n",
        0o644,
    );
    write(&src.join(".skyignore"), "secret.txt\ncache/\n", 0o644);
    write(&src.join(".gitignore"), "keep.txt\n", 0o644);
    std::os::unix::fs::symlink("lib/util.txt", src.join("util-link")).unwrap();
    // A data dir without .skyignore: its .gitignore files apply, each from
    // its own directory down.
    let data = root.join("data");
    write(&data.join("a.csv"), "1,2\n", 0o644);
    write(&data.join("scratch.tmp"), "no\n", 0o644);
    write(&data.join("deep/b.csv"), "3,4\n", 0o644);
    write(&data.join("deep/local.bin"), "no\n", 0o644);
    write(&data.join(".gitignore"), "*.tmp\n", 0o644);
    write(&data.join("deep/.gitignore"), "local.bin\n", 0o644);
    write(&root.join("config.json"), "{\"lr\": 0.1}\n", 0o640);
    // An absolute destination outlives the job, so a relaunch finds it in place.
    let out_dir = root.join("node-side");
    let task = root.join("task.yaml");
    let run = r#"stat -c '%n %a' train.sh lib/util.txt
readlink util-link
for f in secret.txt cache/blob; do [ -e "$f" ] && echo "LEAKED $f"; done
cat keep.txt
cat datasets/a.csv datasets/deep/b.csv
for f in datasets/scratch.tmp datasets/deep/local.bin; do [ -e "$f" ] && echo "LEAKED $f"; done
cat "$CONFIG"; stat -c '%a' "$CONFIG"
"#;
    std::fs::write(
        &task,
        format!(
            "workdir: {src}\nfile_mounts:\n  datasets: {data}\n  {cfg}: {root}/config.json\n\
             envs: {{CONFIG: {cfg}}}\nrun: |\n{}",
            run.lines().map(|l| format!("  {l}\n")).collect::<String>(),
            src = src.display(),
            data = data.display(),
            root = root.display(),
            cfg = out_dir.join("config.json").display(),
        ),
    )
    .unwrap();
    let (stdout, stderr) = ok(&c.cli(&["launch", "-c", "fm", task.to_str().unwrap()]));
    assert!(!stdout.contains("LEAKED"), "{stdout}");
    for line in [
        "train.sh 755",
        "lib/util.txt 600",
        "lib/util.txt",
        "kept: .gitignore is not read",
        "1,2",
        "3,4",
        "{\"lr\": 0.1}",
        "640",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "no line {line:?} in\n{stdout}"
        );
    }
    assert!(stderr.contains("Uploaded"), "{stderr}");

    // Again, unchanged: nothing is uploaded, nothing is fetched for the
    // absolute destination.
    let (stdout, stderr) = ok(&c.cli(&["launch", "-c", "fm", task.to_str().unwrap()]));
    assert!(stderr.contains("Uploaded nothing"), "{stderr}");
    assert!(
        stdout.contains("0 files (0 B)") && stdout.contains("1 unchanged"),
        "{stdout}"
    );

    // One file changed: that one content goes up, and the job sees it.
    write(&data.join("a.csv"), "5,6\n", 0o644);
    let (stdout, stderr) = ok(&c.cli(&["launch", "-c", "fm", task.to_str().unwrap()]));
    assert!(stderr.contains("Uploaded 1 new or changed"), "{stderr}");
    assert!(stdout.lines().any(|l| l == "5,6"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_small_files_arrive() {
    let c = Coordinator::start(&[]).await;
    let d = tempfile::tempdir().unwrap();
    let many = d.path().join("many");
    for i in 0..10_000 {
        let sub = many.join(format!("d{:02}", i % 50));
        if i < 50 {
            std::fs::create_dir_all(&sub).unwrap();
        }
        std::fs::write(sub.join(format!("f{i}.txt")), format!("file {i}\n")).unwrap();
    }
    let task = d.path().join("task.yaml");
    std::fs::write(
        &task,
        format!(
            "file_mounts:\n  many: {}\nrun: |\n  find many -type f | wc -l\n  cat many/d07/f9957.txt\n",
            many.display()
        ),
    )
    .unwrap();
    let (stdout, _) = ok(&c.cli(&["launch", task.to_str().unwrap()]));
    assert!(stdout.lines().any(|l| l.trim() == "10000"), "{stdout}");
    assert!(stdout.contains("file 9957"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_prefix_is_copied_streamed_and_a_missing_one_fails_setup_naming_it() {
    let moto = Moto::start(&[]).await;
    let endpoint = moto.endpoint.clone();
    Moto::helper(&["bucket", &endpoint, "datasets"]);
    let d = tempfile::tempdir().unwrap();
    // 200 MB of data that does not compress, and a small file beside it.
    let big = d.path().join("big.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&big).unwrap();
        let mut block = vec![0u8; 1 << 20];
        for i in 0..200u32 {
            for (j, b) in block.iter_mut().enumerate() {
                *b = (j as u32).wrapping_mul(2_654_435_761).wrapping_add(i) as u8;
            }
            f.write_all(&block).unwrap();
        }
    }
    let digest = sha256_file(&big);
    Moto::helper(&[
        "put",
        &endpoint,
        "datasets",
        "train/big.bin",
        big.to_str().unwrap(),
    ]);
    let small = d.path().join("small.txt");
    std::fs::write(&small, "small\n").unwrap();
    Moto::helper(&[
        "put",
        &endpoint,
        "datasets",
        "train/meta/small.txt",
        small.to_str().unwrap(),
    ]);

    let c = Coordinator::start(&[]).await;
    let store_env = format!(
        "envs: {{AWS_ENDPOINT_URL: \"{endpoint}\", AWS_ALLOW_HTTP: \"true\", AWS_DEFAULT_REGION: us-east-1}}\n\
         secrets: {{AWS_ACCESS_KEY_ID: testing, AWS_SECRET_ACCESS_KEY: testing}}\n"
    );
    let job = c
        .submit(&format!(
            "file_mounts:\n  /tmp/nembo-fm-{pid}/train: s3://datasets/train\n  /tmp/nembo-fm-{pid}/one.txt: s3://datasets/train/meta/small.txt\n{store_env}\
             run: |\n  sha256sum /tmp/nembo-fm-{pid}/train/big.bin\n  cat /tmp/nembo-fm-{pid}/train/meta/small.txt\n  echo one: $(cat /tmp/nembo-fm-{pid}/one.txt)\n  rm -rf /tmp/nembo-fm-{pid}\n",
            pid = std::process::id()
        ))
        .await;
    let done = c
        .wait_state(&job, pb::JobState::Succeeded, Duration::from_secs(120))
        .await;
    let logs = c.logs(&done.job_id).await;
    assert!(logs.contains(&digest), "{logs}");
    assert!(logs.contains("small"), "{logs}");
    assert!(
        logs.contains("one: small"),
        "a URI naming one object is that file: {logs}"
    );
    assert!(logs.contains("2 objects"), "progress is reported: {logs}");
    // The agent streamed it: its peak memory stayed far below the object.
    let node = &done.node_ids[0];
    let status = std::fs::read_to_string(format!("/proc/{}/status", c.agent_pid(node))).unwrap();
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(
        hwm_kb < 64 * 1024,
        "agent peak RSS {hwm_kb} kB for a 200 MB copy"
    );

    // Cloudflare R2 is S3's API at the account's endpoint (moto here), with
    // the job's R2_* keys; without them the setup says which it needs.
    let r2 = c
        .submit(&format!(
            "file_mounts:\n  small.txt: r2://datasets/train/meta/small.txt\nsecrets: {{R2_ENDPOINT_URL: \"{endpoint}\", R2_ACCESS_KEY_ID: testing, R2_SECRET_ACCESS_KEY: testing}}\nrun: echo r2 says $(cat small.txt)\n"
        ))
        .await;
    c.wait_state(&r2, pb::JobState::Succeeded, Duration::from_secs(60))
        .await;
    assert!(c.logs(&r2).await.contains("r2 says small"));
    let keyless = c
        .submit("file_mounts:\n  small.txt: r2://datasets/train/meta/small.txt\nrun: echo ran\n")
        .await;
    let failed = c
        .wait_state(&keyless, pb::JobState::FailedSetup, Duration::from_secs(60))
        .await;
    assert!(
        failed.message.contains("CLOUDFLARE_ACCOUNT_ID"),
        "{}",
        failed.message
    );

    // A prefix that does not exist fails the setup, naming the mount and why.
    let missing = c
        .submit(&format!(
            "file_mounts:\n  /tmp/nembo-never: s3://datasets/nothing-here\n{store_env}run: echo ran\n"
        ))
        .await;
    let failed = c
        .wait_state(&missing, pb::JobState::FailedSetup, Duration::from_secs(60))
        .await;
    assert!(
        failed.message.contains("file_mounts./tmp/nembo-never")
            && failed.message.contains("no such object or prefix"),
        "{}",
        failed.message
    );
    assert!(!c.logs(&missing).await.contains("ran"));
}

fn sha256_file(p: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sources_are_refused_before_anything_is_queued() {
    let c = Coordinator::start(&[]).await;
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let launch = |yaml: &str| {
        let task = root.join("t.yaml");
        std::fs::write(&task, yaml).unwrap();
        c.cli(&["launch", "-d", task.to_str().unwrap()])
    };
    let refused = |out: Output, says: &[&str]| {
        assert!(!out.status.success(), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        for s in says {
            assert!(err.contains(s), "{s:?} not in {err}");
        }
    };
    // A link out of the source (absolute, or climbing past its root).
    let leaky = root.join("leaky");
    write(&leaky.join("ok.txt"), "ok\n", 0o644);
    std::os::unix::fs::symlink("/etc/passwd", leaky.join("passwd")).unwrap();
    refused(
        launch(&format!(
            "file_mounts:\n  x: {}\nrun: 'true'\n",
            leaky.display()
        )),
        &["passwd", "outside the source"],
    );
    std::fs::remove_file(leaky.join("passwd")).unwrap();
    std::os::unix::fs::symlink("../../x", leaky.join("up")).unwrap();
    refused(
        launch(&format!("workdir: {}\nrun: 'true'\n", leaky.display())),
        &["up", "outside the source"],
    );
    refused(
        launch("file_mounts:\n  x: /proc/self/root\nrun: 'true'\n"),
        &["file_mounts.x", "root directory"],
    );
    refused(
        launch("file_mounts:\n  x: /nonexistent/nembo/source\nrun: 'true'\n"),
        &["/nonexistent/nembo/source", "does not exist locally"],
    );
    refused(
        launch("file_mounts:\n  /data/: ~/x\nrun: 'true'\n"),
        &["file_mounts./data/", "slash"],
    );
    refused(
        launch("file_mounts:\n  /data: gs://bucket/x\nrun: 'true'\n"),
        &["file_mounts./data", "gs://", "no provider"],
    );

    // A client that skips the upload, or names content never uploaded.
    let mut client = c.client().await;
    let submit = |uploads: Vec<(&str, &str)>| pb::SubmitJobRequest {
        task: Some(pb::submit_job_request::Task::TaskYaml(
            "file_mounts:\n  /d: /home/someone/data\nrun: 'true'\n".into(),
        )),
        uploads: uploads
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let e = client.submit_job(submit(vec![])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("file_mounts./d") && e.message().contains("not uploaded"),
        "{}",
        e.message()
    );
    let never = "0".repeat(64);
    let e = client
        .submit_job(submit(vec![("/home/someone/data", &never)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("file_mounts./d"), "{}", e.message());

    // Content that does not hash to its name is not kept.
    let claimed = nembo_proto::files::digest(b"the real thing");
    let pieces = vec![pb::PutBlobsRequest {
        digest: claimed.clone(),
        size: 5,
        data: b"forge".to_vec(),
        last: true,
        ..Default::default()
    }];
    let e = client
        .put_blobs(tokio_stream::iter(pieces))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    // The same, sent whole among honest small blobs.
    let honest = b"honest".to_vec();
    let whole = vec![pb::PutBlobsRequest {
        whole: vec![
            pb::WholeBlob {
                digest: nembo_proto::files::digest(&honest),
                data: honest,
            },
            pb::WholeBlob {
                digest: claimed.clone(),
                data: b"forge".to_vec(),
            },
        ],
        ..Default::default()
    }];
    let e = client
        .put_blobs(tokio_stream::iter(whole))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains(&claimed), "{}", e.message());
    let missing = client
        .find_missing_blobs(pb::FindMissingBlobsRequest {
            digests: vec![claimed.clone()],
            announce: false,
        })
        .await
        .unwrap()
        .into_inner()
        .missing;
    assert_eq!(missing, vec![claimed]);
    assert!(c.jobs().await.is_empty(), "nothing was queued");
}

/// In a cluster, an upload made through a follower is served by the
/// leader (the gate forwards the client stream whole), which is where the
/// agents fetch from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_uploaded_through_a_follower_reach_the_job() {
    let cl = nembo_tests::Cluster::start(3, &[]).await;
    let leader = cl.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let mut client = cl.member_client(follower).await.expect("follower");
    let content = b"shipped through a follower\n".to_vec();
    let (file_digest, manifest_digest, manifest) = single_file(&content);
    // One small blob whole, the other in pieces, as the CLI sends them.
    let pieces = vec![
        pb::PutBlobsRequest {
            whole: vec![pb::WholeBlob {
                digest: file_digest.clone(),
                data: content,
            }],
            ..Default::default()
        },
        pb::PutBlobsRequest {
            digest: manifest_digest.clone(),
            size: manifest.len() as u64,
            data: manifest,
            last: true,
            ..Default::default()
        },
    ];
    let put = client
        .put_blobs(tokio_stream::iter(pieces))
        .await
        .expect("PutBlobs through a follower")
        .into_inner();
    assert_eq!(put.blobs, 2);
    let job = client
        .submit_job(pb::SubmitJobRequest {
            task: Some(pb::submit_job_request::Task::TaskYaml(
                "file_mounts: {note.txt: /somewhere/note.txt}\nrun: cat note.txt\n".into(),
            )),
            uploads: [("/somewhere/note.txt".to_string(), manifest_digest)]
                .into_iter()
                .collect(),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    let logs = wait_for_output(&cl, &job).await;
    assert!(logs.contains("shipped through a follower"), "{logs}");
}

/// A one-file source as the CLI describes it: the file's digest, its
/// manifest's digest, and the manifest.
fn single_file(content: &[u8]) -> (String, String, Vec<u8>) {
    let file_digest = nembo_proto::files::digest(content);
    let manifest = nembo_proto::files::Manifest {
        single_file: true,
        entries: vec![nembo_proto::files::Entry {
            path: String::new(),
            mode: 0o644,
            kind: nembo_proto::files::Kind::File {
                size: content.len() as u64,
                digest: file_digest.clone(),
            },
        }],
    }
    .encode();
    (file_digest, nembo_proto::files::digest(&manifest), manifest)
}

async fn wait_for_output(cl: &nembo_tests::Cluster, job: &str) -> String {
    nembo_tests::wait_for("the job to succeed", Duration::from_secs(60), || async {
        let j = cl
            .client()
            .get_job(pb::GetJobRequest {
                job_id: job.to_string(),
            })
            .await
            .ok()?
            .into_inner()
            .job?;
        (j.state == pb::JobState::Succeeded as i32).then_some(())
    })
    .await;
    let mut stream = cl
        .client()
        .stream_logs(pb::StreamLogsRequest {
            job_id: job.to_string(),
            ..Default::default()
        })
        .await
        .expect("logs")
        .into_inner();
    let mut out = String::new();
    use tokio_stream::StreamExt;
    while let Some(Ok(chunk)) = stream.next().await {
        out.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    out
}

/// A git workdir (`{url, ref}`) is cloned by the node at that ref, before
/// setup; a ref that does not exist fails the setup naming the workdir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_workdir_is_cloned_at_its_ref() {
    let c = Coordinator::start(&[]).await;
    let repo = c.dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@e",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(&repo)
            .output()
            .expect("git");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&["init", "--quiet"]);
    std::fs::write(repo.join("train.py"), "print('v1')\n").unwrap();
    git(&["add", "."]);
    git(&["commit", "--quiet", "-m", "v1"]);
    git(&["tag", "v1"]);
    std::fs::write(repo.join("train.py"), "print('v2')\n").unwrap();
    git(&["commit", "--quiet", "-am", "v2"]);
    let url = format!("file://{}", repo.display());
    let job = c
        .submit(&format!(
            "workdir: {{url: '{url}', ref: v1}}\nsetup: test -f train.py\nrun: cat train.py\n"
        ))
        .await;
    c.wait_state(&job, pb::JobState::Succeeded, Duration::from_secs(60))
        .await;
    let logs = c.logs(&job).await;
    assert!(
        logs.contains("print('v1')") && !logs.contains("v2"),
        "{logs}"
    );
    assert!(logs.contains("cloned"), "{logs}");
    let head = c
        .submit(&format!("workdir: {{url: '{url}'}}\nrun: cat train.py\n"))
        .await;
    c.wait_state(&head, pb::JobState::Succeeded, Duration::from_secs(60))
        .await;
    assert!(c.logs(&head).await.contains("print('v2')"));
    let missing = c
        .submit(&format!(
            "workdir: {{url: '{url}', ref: no-such-tag}}\nrun: echo ran\n"
        ))
        .await;
    let failed = c
        .wait_state(&missing, pb::JobState::FailedSetup, Duration::from_secs(60))
        .await;
    assert!(
        failed.message.contains("workdir") && failed.message.contains("no-such-tag"),
        "{}",
        failed.message
    );
}

/// A client that announces its upload may submit the job before the files
/// are all there (the upload overlaps scheduling and provisioning): the
/// node waits for them while the upload runs, and gets them; an upload
/// that ends without them fails the job's setup naming why, and nothing
/// waits for ever. Without an announcement, missing files are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_may_be_submitted_while_its_announced_upload_runs() {
    let c = Coordinator::start(&[]).await;
    let mut client = c.client().await;
    let put_manifest = |digest: String, manifest: Vec<u8>| pb::PutBlobsRequest {
        digest,
        size: manifest.len() as u64,
        data: manifest,
        last: true,
        ..Default::default()
    };
    let submit = |manifest_digest: String| pb::SubmitJobRequest {
        task: Some(pb::submit_job_request::Task::TaskYaml(
            "file_mounts: {note.txt: /here/note.txt}\nrun: cat note.txt\n".into(),
        )),
        uploads: [("/here/note.txt".to_string(), manifest_digest)]
            .into_iter()
            .collect(),
        ..Default::default()
    };

    // Not announced: refused, as before.
    let content = b"arrives after the job was queued\n".to_vec();
    let (file_digest, manifest_digest, manifest) = single_file(&content);
    client
        .put_blobs(tokio_stream::iter(vec![put_manifest(
            manifest_digest.clone(),
            manifest.clone(),
        )]))
        .await
        .expect("manifest");
    let e = client
        .submit_job(submit(manifest_digest.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());

    // Announced: accepted; the node waits, then gets the file.
    let found = client
        .find_missing_blobs(pb::FindMissingBlobsRequest {
            digests: vec![file_digest.clone()],
            announce: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.missing, vec![file_digest.clone()]);
    assert!(!found.upload_id.is_empty());
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut uploader = client.clone();
    let upload = tokio::spawn(async move {
        uploader
            .put_blobs(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tx.send(pb::PutBlobsRequest {
        upload_id: found.upload_id.clone(),
        whole: vec![],
        ..Default::default()
    })
    .await
    .unwrap();
    let job = client
        .submit_job(submit(manifest_digest.clone()))
        .await
        .expect("accepted while its upload runs")
        .into_inner()
        .job_id;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waiting = client
        .get_job(pb::GetJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert!(
        !matches!(
            pb::JobState::try_from(waiting.state),
            Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::FailedSetup)
        ),
        "the node waits for the file: {waiting:?}"
    );
    tx.send(pb::PutBlobsRequest {
        whole: vec![pb::WholeBlob {
            digest: file_digest.clone(),
            data: content,
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    drop(tx);
    upload.await.unwrap().expect("upload");
    c.wait_state(&job, pb::JobState::Succeeded, Duration::from_secs(60))
        .await;
    let out = c.logs(&job).await;
    assert!(out.contains("arrives after the job was queued"), "{out}");

    // An announced upload that stops without its file: the setup fails.
    let (file_digest, manifest_digest, manifest) = single_file(b"never sent\n");
    client
        .put_blobs(tokio_stream::iter(vec![put_manifest(
            manifest_digest.clone(),
            manifest,
        )]))
        .await
        .expect("manifest");
    let found = client
        .find_missing_blobs(pb::FindMissingBlobsRequest {
            digests: vec![file_digest.clone()],
            announce: true,
        })
        .await
        .unwrap()
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut uploader = client.clone();
    let upload = tokio::spawn(async move {
        uploader
            .put_blobs(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tx.send(pb::PutBlobsRequest {
        upload_id: found.upload_id,
        ..Default::default()
    })
    .await
    .unwrap();
    let job = client
        .submit_job(submit(manifest_digest))
        .await
        .expect("accepted while its upload runs")
        .into_inner()
        .job_id;
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(tx);
    let _ = upload.await;
    let failed = c
        .wait_state(&job, pb::JobState::FailedSetup, Duration::from_secs(60))
        .await;
    assert!(
        failed.message.contains(&file_digest) && failed.message.contains("upload ended"),
        "{}",
        failed.message
    );
}
