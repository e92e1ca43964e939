//! `bench_sync`: data in, beside rsync. In one run:
//!
//! 1. A 1 GB directory of mixed files (4 x 128 MiB, 200 x 2 MiB, 10 000
//!    files of 1-16 KiB; incompressible) is shipped to a local node with
//!    `nembo launch` (`file_mounts` to an absolute path), then again after
//!    one small file changed; and the same twice with `rsync -a` over ssh
//!    to 127.0.0.1 (a real sshd on loopback), the anchor.
//! 2. A 1 GiB object is copied from moto S3 by the agent (`s3://` file
//!    mount), beside boto3's `download_file` of the same object from the
//!    same moto (the anchor: moto, a Python server, bounds both); the
//!    agent's peak RSS (VmHWM) is read after.
//!
//! Nembo's times are the whole `nembo launch` (hashing, upload, the job's
//! placement on the idle node, the agent's fetch, a `true` run), measured
//! from outside as a user would. Step 1 runs `--rounds` times (default 3),
//! each on a newly written tree, rsync then Nembo; the table gives the
//! medians (this VM's disk makes single runs vary by 2x). Prints a table,
//! then one JSON document.
//!
//! Build with `cargo build --release --workspace`, then
//! `target/release/bench_sync [--mb 1024] [--rounds 3] [--verbose]` (`--verbose` shows
//! what each command printed: the upload's and the placement's own times).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nembo_proto::v1 as pb;
use nembo_tests::{cli_arg, wait_for, Coordinator, Moto};
use serde_json::json;

/// xorshift64*: incompressible bytes, quickly.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn file(path: &Path, len: usize, noise: &mut Noise) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; len.min(4 << 20)];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        noise.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
}

/// The mixed tree; returns its size in bytes.
fn make_tree(root: &Path, scale: f64, seed: u64) -> u64 {
    let mut noise = Noise(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut total = 0u64;
    let mut add = |p: PathBuf, len: usize, noise: &mut Noise| {
        file(&p, len, noise);
        total += len as u64;
    };
    for i in 0..4 {
        add(
            root.join(format!("weights/shard-{i}.bin")),
            (128.0 * scale) as usize * (1 << 20),
            &mut noise,
        );
    }
    for i in 0..200 {
        add(
            root.join(format!("data/part-{i:03}.parquet")),
            (2.0 * scale * (1 << 20) as f64) as usize,
            &mut noise,
        );
    }
    for i in 0..10_000 {
        let len = 1024 * (1 + (i * 7919) % 16);
        add(
            root.join(format!("src/m{:02}/f{i}.py", i % 100)),
            len,
            &mut noise,
        );
    }
    total
}

fn timed(what: &str, cmd: &mut Command) -> f64 {
    let t = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if std::env::args().any(|a| a == "--verbose") {
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
    t.elapsed().as_secs_f64()
}

struct Sshd(std::process::Child);

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real sshd on loopback with a throwaway key; returns it, its port and
/// the ssh command rsync should use.
async fn sshd(dir: &Path) -> (Sshd, String) {
    for key in ["host_key", "id"] {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join(key))
            .status()
            .unwrap();
        assert!(st.success());
    }
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             PermitRootLogin prohibit-password\nStrictModes no\nPidFile {d}/sshd.pid\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let _ = std::fs::create_dir_all("/run/sshd");
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stderr(Stdio::null())
        .spawn()
        .expect("/usr/sbin/sshd (apt install openssh-server)");
    wait_for("sshd", Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .await;
    let ssh = format!(
        "ssh -p {port} -i {}/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        dir.display()
    );
    (Sshd(child), ssh)
}

#[tokio::main]
async fn main() {
    let mb = cli_arg("--mb", 1024) as f64;
    let scale = mb / 1024.0;
    let scratch = tempfile::Builder::new()
        .prefix("bench-sync")
        .tempdir()
        .unwrap();
    let s = scratch.path();
    let rounds = cli_arg("--rounds", 3).max(1);
    let files = 4 + 200 + 10_000;
    let (_sshd, ssh) = sshd(s).await;
    // Nembo's local node is started once: the timings are the sync's, not
    // a boot's, and each round's tree is new content to its blob store.
    let c = Coordinator::start(&["--heartbeat-ms", "1000"]).await;
    let warm = c.submit("run: 'true'\n").await;
    c.wait_state(&warm, pb::JobState::Succeeded, Duration::from_secs(60))
        .await;
    // (first, unchanged, one changed) per round, per tool.
    let mut rsync_runs: Vec<[f64; 3]> = Vec::new();
    let mut nembo_runs: Vec<[f64; 3]> = Vec::new();
    let mut bytes = 0;
    for round in 0..rounds {
        // A new tree each round (new bytes, so nothing is cached anywhere
        // but the page cache, as for a user's fresh checkpoint).
        let tree = s.join("tree");
        let _ = std::fs::remove_dir_all(&tree);
        bytes = make_tree(&tree, scale, round);
        let changed = tree.join("src/m42/f42.py");
        eprintln!(
            "round {}: {files} files, {:.2} GB",
            round + 1,
            bytes as f64 / 1e9
        );
        let _ = Command::new("sync").status();

        // rsync -a over ssh to this machine.
        let rsync_dst = s.join("rsync-dst");
        let _ = std::fs::remove_dir_all(&rsync_dst);
        let rsync = || {
            let mut c = Command::new("rsync");
            c.args(["-a", "-e", &ssh])
                .arg(format!("{}/", tree.display()))
                .arg(format!("127.0.0.1:{}/", rsync_dst.display()));
            c
        };
        let first = timed("rsync", &mut rsync());
        let nochange = timed("rsync", &mut rsync());
        std::fs::write(&changed, "changed for rsync\n").unwrap();
        let again = timed("rsync", &mut rsync());
        rsync_runs.push([first, nochange, again]);
        let _ = std::fs::remove_dir_all(&rsync_dst);
        let _ = Command::new("sync").status();

        // Nembo: the same tree to an absolute path on the local node.
        let nembo_dst = s.join("nembo-dst");
        let _ = std::fs::remove_dir_all(&nembo_dst);
        let task = s.join("sync.yaml");
        std::fs::write(
            &task,
            format!(
                "file_mounts:\n  {}: {}\nrun: 'true'\n",
                nembo_dst.display(),
                tree.display()
            ),
        )
        .unwrap();
        let launch = || {
            let mut cmd = Command::new(nembo_tests::bin("nembo"));
            // The same cluster each time, as a user re-launches on a warm one.
            cmd.args(["launch", "-c", "sync"])
                .arg(&task)
                .env("NEMBO_API_INFO", c.dir.path().join("api.json"))
                .env("NEMBO_HOME", s.join("cli-home"));
            cmd
        };
        std::fs::write(&changed, "original\n").unwrap();
        let first = timed("nembo launch", &mut launch());
        let nochange = timed("nembo launch", &mut launch());
        std::fs::write(&changed, "changed for nembo\n").unwrap();
        let again = timed("nembo launch", &mut launch());
        nembo_runs.push([first, nochange, again]);
        let same = Command::new("diff")
            .args(["-r", "-q"])
            .arg(&tree)
            .arg(&nembo_dst)
            .status()
            .unwrap()
            .success();
        assert!(same, "the node's copy differs from the source");
        let _ = std::fs::remove_dir_all(&nembo_dst);
    }
    let median = |runs: &[[f64; 3]], k: usize| {
        let mut v: Vec<f64> = runs.iter().map(|r| r[k]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (rsync_first, rsync_nochange, rsync_again) = (
        median(&rsync_runs, 0),
        median(&rsync_runs, 1),
        median(&rsync_runs, 2),
    );
    let (nembo_first, nembo_nochange, nembo_again) = (
        median(&nembo_runs, 0),
        median(&nembo_runs, 1),
        median(&nembo_runs, 2),
    );

    // 1 GiB from S3 (moto) by the agent, streamed.
    let moto = Moto::start(&[]).await;
    Moto::helper(&["bucket", &moto.endpoint, "bench"]);
    let object = s.join("object.bin");
    file(
        &object,
        (1024.0 * scale) as usize * (1 << 20),
        &mut Noise(7),
    );
    Moto::helper(&[
        "put",
        &moto.endpoint,
        "bench",
        "ds/object.bin",
        object.to_str().unwrap(),
    ]);
    let copy_dst = s.join("s3-dst");
    let t = Instant::now();
    let job = c
        .submit(&format!(
            "file_mounts:\n  {}: s3://bench/ds\nenvs: {{AWS_ENDPOINT_URL: \"{}\", AWS_ALLOW_HTTP: \"true\", AWS_DEFAULT_REGION: us-east-1}}\n\
             secrets: {{AWS_ACCESS_KEY_ID: testing, AWS_SECRET_ACCESS_KEY: testing}}\nrun: 'true'\n",
            copy_dst.display(),
            moto.endpoint
        ))
        .await;
    let done = c
        .wait_state(&job, pb::JobState::Succeeded, Duration::from_secs(600))
        .await;
    let s3_secs = t.elapsed().as_secs_f64();
    let agent = c.agent_pid(&done.node_ids[0]);
    let status = std::fs::read_to_string(format!("/proc/{agent}/status")).unwrap();
    let hwm_mb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0;
    let copied = std::fs::metadata(copy_dst.join("object.bin"))
        .unwrap()
        .len();
    assert_eq!(copied, std::fs::metadata(&object).unwrap().len());
    let t = Instant::now();
    let boto3_dst = s.join("boto3.bin");
    Moto::helper(&[
        "get",
        &moto.endpoint,
        "bench",
        "ds/object.bin",
        boto3_dst.to_str().unwrap(),
    ]);
    let boto3_secs = t.elapsed().as_secs_f64();

    println!("medians of {rounds} rounds, each on a new tree; every round's first syncs:");
    for (n, r) in nembo_runs.iter().zip(&rsync_runs) {
        println!(
            "  nembo {:.2} s, rsync {:.2} s, ratio {:.2}",
            n[0],
            r[0],
            n[0] / r[0]
        );
    }
    println!("{:<44} {:>10} {:>10} {:>8}", "", "nembo", "rsync", "ratio");
    for (what, n, r) in [
        ("first sync (s)", nembo_first, rsync_first),
        ("again, nothing changed (s)", nembo_nochange, rsync_nochange),
        ("again, one file changed (s)", nembo_again, rsync_again),
    ] {
        println!("{what:<44} {n:>10.2} {r:>10.2} {:>8.2}", n / r);
    }
    println!(
        "{:<44} {:>10.1} {:>10.1} {:>8.2}",
        format!(
            "S3 COPY of {:.2} GB (s; anchor: boto3)",
            copied as f64 / 1e9
        ),
        s3_secs,
        boto3_secs,
        s3_secs / boto3_secs
    );
    println!(
        "{:<44} {:>10.1}",
        "agent peak RSS during the whole run (MB)", hwm_mb
    );
    println!(
        "{}",
        json!({
            "tree": {"files": files, "bytes": bytes},
            "rounds": {"nembo": nembo_runs, "rsync_ssh": rsync_runs},
            "nembo": {"first_s": nembo_first, "unchanged_s": nembo_nochange, "one_changed_s": nembo_again},
            "rsync_ssh": {"first_s": rsync_first, "unchanged_s": rsync_nochange, "one_changed_s": rsync_again},
            "s3_copy": {"bytes": copied, "seconds": s3_secs, "boto3_seconds": boto3_secs},
            "agent_vmhwm_mb": hwm_mb,
        })
    );
}
