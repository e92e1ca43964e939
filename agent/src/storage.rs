//! Storage objects: a task's bucket made if it names one, a local source
//! uploaded into it, then the bucket mounted with FUSE (MOUNT,
//! MOUNT_CACHED) or copied in (COPY). rclone does all of it, as SkyPilot's
//! MOUNT_CACHED does (its MOUNT uses goofys on x86; rclone without a cache
//! gives the same semantics: reads streamed, a file uploaded as it is
//! written and complete when closed, no random writes).
//!
//! Credentials are the job's own `AWS_*` variables (the task's secrets), or
//! the node's instance role when it has none, never the agent's
//! environment: rclone runs with only those and `PATH`.
//!
//! A mount's rclone runs in a process group of its own, so that it outlives
//! an agent restart with the job it serves; `<job dir>/fuse-mounts` lists
//! each (pid, mount point, log), and the job's end waits for a cached mount
//! to upload what it holds (rclone's own report: "to upload 0, uploading
//! 0"; rclone does not upload pending files when it quits), then unmounts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nembo_proto::agent::v1 as apb;
use nix::sys::signal::Signal;

/// The file listing a job's FUSE mounts.
pub const MOUNTS_FILE: &str = "fuse-mounts";
/// How long a mount may take to appear.
const MOUNT_WAIT: Duration = Duration::from_secs(30);
/// How long an unmount may take to upload what a cached mount holds.
const FLUSH_WAIT: Duration = Duration::from_secs(600);

/// The rclone remote that the environment below defines.
const REMOTE: &str = "nembo";

/// rclone's environment for the job's buckets: an S3 remote from the job's
/// `AWS_*` variables (or the instance role), an R2 remote from its `R2_*`
/// ones (and `CLOUDFLARE_ACCOUNT_ID`), and nothing of the agent's.
pub fn rclone_env(job_env: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        ),
        ("RCLONE_CONFIG_NEMBO_TYPE".into(), "s3".into()),
        ("RCLONE_CONFIG_NEMBO_ENV_AUTH".into(), "true".into()),
    ];
    let endpoint = job_env
        .get("AWS_ENDPOINT_URL_S3")
        .or_else(|| job_env.get("AWS_ENDPOINT_URL"));
    match endpoint {
        Some(e) => {
            env.push(("RCLONE_CONFIG_NEMBO_PROVIDER".into(), "Other".into()));
            env.push(("RCLONE_CONFIG_NEMBO_ENDPOINT".into(), e.clone()));
        }
        None => env.push(("RCLONE_CONFIG_NEMBO_PROVIDER".into(), "AWS".into())),
    }
    if let Some(r) = job_env
        .get("AWS_REGION")
        .or_else(|| job_env.get("AWS_DEFAULT_REGION"))
    {
        env.push(("RCLONE_CONFIG_NEMBO_REGION".into(), r.clone()));
    }
    for (k, v) in job_env {
        if k.starts_with("AWS_") && k != "AWS_CA_BUNDLE" {
            env.push((k.clone(), v.clone()));
        }
    }
    // R2 speaks S3 at the account's endpoint, region `auto`.
    let r2_endpoint = job_env.get("R2_ENDPOINT_URL").cloned().or_else(|| {
        job_env
            .get("CLOUDFLARE_ACCOUNT_ID")
            .map(|a| format!("https://{a}.r2.cloudflarestorage.com"))
    });
    if let Some(endpoint) = r2_endpoint {
        for (k, v) in [
            ("TYPE", "s3".to_string()),
            ("PROVIDER", "Cloudflare".to_string()),
            ("REGION", "auto".to_string()),
            ("ENDPOINT", endpoint),
            (
                "ACCESS_KEY_ID",
                job_env.get("R2_ACCESS_KEY_ID").cloned().unwrap_or_default(),
            ),
            (
                "SECRET_ACCESS_KEY",
                job_env
                    .get("R2_SECRET_ACCESS_KEY")
                    .cloned()
                    .unwrap_or_default(),
            ),
        ] {
            env.push((format!("RCLONE_CONFIG_{R2_REMOTE_ENV}_{k}"), v));
        }
    }
    env
}

/// The R2 remote, as rclone's environment names it.
const R2_REMOTE_ENV: &str = "NEMBOR2";

/// `nembo:<bucket>` for `s3://<bucket>`, `nembor2:<bucket>` for `r2://<bucket>`.
pub fn remote(bucket_uri: &str) -> String {
    if let Some(b) = bucket_uri.strip_prefix("r2://") {
        return format!(
            "{}:{}",
            R2_REMOTE_ENV.to_ascii_lowercase(),
            b.trim_end_matches('/')
        );
    }
    format!(
        "{REMOTE}:{}",
        bucket_uri.trim_start_matches("s3://").trim_end_matches('/')
    )
}

/// The task's MOUNT_CACHED knobs the agent passes to rclone (SkyPilot's
/// `config.mount_cached` keys); anything else is dropped, whatever the
/// coordinators sent.
const KNOBS: &[&str] = &[
    "transfers",
    "buffer_size",
    "vfs_cache_max_size",
    "vfs_cache_max_age",
    "vfs_read_ahead",
    "vfs_read_chunk_size",
    "vfs_read_chunk_streams",
    "vfs_write_back",
];

/// The rclone flags of the task's knobs, in a stable order.
fn knob_flags(options: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = options
        .iter()
        .filter(|(k, v)| KNOBS.contains(&k.as_str()) && !v.starts_with('-'))
        .map(|(k, v)| (format!("--{}", k.replace('_', "-")), v.clone()))
        .collect();
    v.sort();
    v
}

/// rclone's arguments for mounting `bucket` at `dst` in `mode`, with the
/// task's MOUNT_CACHED knobs (`options`) over SkyPilot's flags.
pub fn mount_args(
    bucket: &str,
    dst: &Path,
    mode: apb::StorageMode,
    read_only: bool,
    options: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "mount".into(),
        remote(bucket),
        dst.display().to_string(),
        "--allow-non-empty".into(),
    ];
    match mode {
        apb::StorageMode::MountCached => {
            // SkyPilot's MOUNT_CACHED flags.
            let mut flags: Vec<(String, Option<String>)> = [
                ("--vfs-cache-mode", Some("full")),
                ("--dir-cache-time", Some("10s")),
                ("--vfs-cache-poll-interval", Some("5s")),
                ("--vfs-fast-fingerprint", None),
                ("--vfs-cache-max-size", Some("10G")),
                ("--vfs-write-back", Some("1s")),
            ]
            .into_iter()
            .map(|(f, v)| (f.to_string(), v.map(String::from)))
            .collect();
            for (flag, value) in knob_flags(options) {
                match flags.iter_mut().find(|(f, _)| *f == flag) {
                    Some(slot) => slot.1 = Some(value),
                    None => flags.push((flag, Some(value))),
                }
            }
            for (flag, value) in flags {
                a.push(flag);
                a.extend(value);
            }
        }
        // Streamed, as goofys: a file is in the bucket when closed.
        _ => a.extend(["--vfs-cache-mode", "off", "--dir-cache-time", "5s"].map(String::from)),
    }
    // INFO: the cache's periodic report says what is left to upload.
    a.push("-v".into());
    if read_only {
        a.push("--read-only".into());
    }
    a
}

/// Runs rclone to its end; the error is its last lines.
pub async fn rclone(args: &[String], env: &[(String, String)]) -> Result<(), String> {
    let out = tokio::process::Command::new("rclone")
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                "needs rclone on the node (install rclone and fuse3)".to_string()
            }
            _ => format!("rclone: {e}"),
        })?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = err.lines().rev().take(3).collect();
    Err(format!(
        "rclone {} failed: {}",
        args.first().map_or("", String::as_str),
        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
    ))
}

/// Of `flags`, those `rclone mount` does not know here (none when its help
/// cannot be read).
async fn rclone_lacks(flags: &[(String, String)]) -> Vec<String> {
    static HELP: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    if flags.is_empty() {
        return Vec::new();
    }
    let help = HELP
        .get_or_init(|| async {
            // The mount's own flags, and the global ones (`--transfers`).
            let mut text = String::new();
            for args in [&["mount", "--help"][..], &["help", "flags"][..]] {
                if let Ok(o) = tokio::process::Command::new("rclone")
                    .args(args)
                    .stdin(Stdio::null())
                    .output()
                    .await
                {
                    text.push_str(&String::from_utf8_lossy(&o.stdout));
                }
            }
            text
        })
        .await;
    if help.is_empty() {
        return Vec::new();
    }
    flags
        .iter()
        .filter(|(f, _)| !help.contains(&format!("{f} ")))
        .map(|(f, _)| f.clone())
        .collect()
}

/// Mounts `bucket` at `dst`, recording it in `job_dir`'s [`MOUNTS_FILE`].
pub async fn mount(
    bucket: &str,
    dst: &Path,
    mode: apb::StorageMode,
    read_only: bool,
    options: &BTreeMap<String, String>,
    env: &[(String, String)],
    job_dir: &Path,
) -> Result<Vec<String>, String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("needs FUSE on the node (/dev/fuse is missing)".into());
    }
    // A mount left by an attempt that died with its agent goes first.
    if is_mounted(dst) {
        unmount_path(dst).await;
    }
    std::fs::create_dir_all(dst).map_err(|e| format!("{}: {e}", dst.display()))?;
    let log = job_dir.join(format!(
        "rclone-{}.log",
        dst.display().to_string().replace('/', "_")
    ));
    let mut args = mount_args(bucket, dst, mode, read_only, options);
    // A knob this rclone does not know (an older one than SkyPilot's
    // 1.68) is left out and named, rather than failing the mount.
    let lacking = rclone_lacks(&knob_flags(options)).await;
    for flag in &lacking {
        if let Some(i) = args.iter().position(|a| a == flag) {
            args.drain(i..(i + 2).min(args.len()));
        }
    }
    args.extend(["--log-file".into(), log.display().to_string()]);
    let mut cmd = tokio::process::Command::new("rclone");
    cmd.args(&args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            "needs rclone on the node (install rclone and fuse3)".to_string()
        }
        _ => format!("rclone: {e}"),
    })?;
    let pid = child.id().unwrap_or(0);
    let deadline = tokio::time::Instant::now() + MOUNT_WAIT;
    loop {
        if is_mounted(dst) {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let why = std::fs::read_to_string(&log).unwrap_or_default();
            let last = why.lines().last().unwrap_or_default().to_string();
            return Err(format!("rclone mount exited ({status}): {last}"));
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.start_kill();
            return Err(format!(
                "rclone mount: not mounted after {} s",
                MOUNT_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Reaped by whoever waits; the pid is what the end of the job waits on.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(job_dir.join(MOUNTS_FILE))
        .map_err(|e| format!("{MOUNTS_FILE}: {e}"))?;
    let cached = u8::from(mode == apb::StorageMode::MountCached);
    writeln!(f, "{pid} {cached} {} {}", log.display(), dst.display())
        .map_err(|e| format!("{MOUNTS_FILE}: {e}"))?;
    Ok(lacking)
}

/// Whether something is mounted at `path` (from /proc/self/mountinfo).
fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.display().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m.replace("\\040", " ") == want)
}

async fn unmount_path(dst: &Path) {
    let quiet = |program: &str, args: &[&str]| {
        let mut c = tokio::process::Command::new(program);
        c.args(args)
            .arg(dst)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let ok = quiet("fusermount3", &["-u"])
        .status()
        .await
        .is_ok_and(|s| s.success())
        || quiet("fusermount", &["-u"])
            .status()
            .await
            .is_ok_and(|s| s.success());
    if !ok {
        // Busy or its rclone gone: detach it lazily.
        let _ = quiet("umount", &["-l"]).status().await;
    }
}

/// Unmounts every FUSE mount of a job and waits for each rclone to exit
/// (a cached mount uploads what it holds first).
pub async fn unmount_all(job_dir: &Path) {
    let Ok(list) = std::fs::read_to_string(job_dir.join(MOUNTS_FILE)) else {
        return;
    };
    for line in list.lines() {
        let mut words = line.splitn(4, ' ');
        let (Some(pid), Some(cached), Some(log), Some(dst)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let dst = PathBuf::from(dst);
        if cached == "1" {
            flushed(Path::new(log)).await;
        }
        unmount_path(&dst).await;
        let pid: i32 = pid.parse().unwrap_or(0);
        // Its uploads are done (a cached mount reported so above; an
        // uncached one wrote through on close), and it is unmounted. rclone
        // 1.60 sometimes lingers for minutes after a lazy unmount: end it.
        for signal in [None, Some(Signal::SIGTERM), Some(Signal::SIGKILL)] {
            if let Some(s) = signal.filter(|_| running(pid)) {
                tracing::info!(mount = %dst.display(), pid, signal = %s, "rclone still running after its unmount");
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), s);
            }
            let deadline = tokio::time::Instant::now() + RCLONE_EXIT_WAIT;
            while running(pid) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tracing::info!(mount = %dst.display(), "storage unmounted");
    }
    let _ = std::fs::remove_file(job_dir.join(MOUNTS_FILE));
}

/// Waits until a cached mount reports nothing left to upload, in a report
/// made after this call began (at most [`FLUSH_WAIT`]).
async fn flushed(log: &Path) {
    let seen = std::fs::read_to_string(log).map_or(0, |l| l.len());
    let deadline = tokio::time::Instant::now() + FLUSH_WAIT;
    while tokio::time::Instant::now() < deadline {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text
            .get(seen..)
            .is_some_and(|new| new.contains("to upload 0, uploading 0"))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tracing::warn!(log = %log.display(), "a cached mount did not finish uploading in time");
}

/// How long an unmounted rclone gets to exit before it is signalled.
const RCLONE_EXIT_WAIT: Duration = Duration::from_secs(5);

fn running(pid: i32) -> bool {
    pid > 0
        && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_s_keys_and_endpoint_make_the_remote_and_nothing_else_leaks() {
        let mut job = BTreeMap::new();
        job.insert("AWS_ACCESS_KEY_ID".to_string(), "AKIA".to_string());
        job.insert("AWS_SECRET_ACCESS_KEY".to_string(), "s".to_string());
        job.insert(
            "AWS_ENDPOINT_URL".to_string(),
            "http://127.0.0.1:9".to_string(),
        );
        job.insert("AWS_CA_BUNDLE".to_string(), "/x.pem".to_string());
        job.insert("HF_TOKEN".to_string(), "hf".to_string());
        let env: BTreeMap<String, String> = rclone_env(&job).into_iter().collect();
        assert_eq!(env["RCLONE_CONFIG_NEMBO_PROVIDER"], "Other");
        assert_eq!(env["RCLONE_CONFIG_NEMBO_ENDPOINT"], "http://127.0.0.1:9");
        assert_eq!(env["AWS_ACCESS_KEY_ID"], "AKIA");
        assert!(!env.contains_key("HF_TOKEN") && !env.contains_key("AWS_CA_BUNDLE"));
        let plain: BTreeMap<String, String> = rclone_env(&BTreeMap::new()).into_iter().collect();
        assert_eq!(plain["RCLONE_CONFIG_NEMBO_PROVIDER"], "AWS");
        assert_eq!(plain["RCLONE_CONFIG_NEMBO_ENV_AUTH"], "true");
        assert!(!plain.contains_key("RCLONE_CONFIG_NEMBOR2_TYPE"));
        let r2_job: BTreeMap<String, String> = [
            ("CLOUDFLARE_ACCOUNT_ID", "acct"),
            ("R2_ACCESS_KEY_ID", "k"),
            ("R2_SECRET_ACCESS_KEY", "s"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let r2: BTreeMap<String, String> = rclone_env(&r2_job).into_iter().collect();
        assert_eq!(r2["RCLONE_CONFIG_NEMBOR2_PROVIDER"], "Cloudflare");
        assert_eq!(
            r2["RCLONE_CONFIG_NEMBOR2_ENDPOINT"],
            "https://acct.r2.cloudflarestorage.com"
        );
        assert_eq!(r2["RCLONE_CONFIG_NEMBOR2_ACCESS_KEY_ID"], "k");
        assert_eq!(remote("r2://ckpt"), "nembor2:ckpt");
        assert_eq!(remote("s3://ckpt/"), "nembo:ckpt");
    }

    #[test]
    fn cached_mounts_use_skypilot_s_flags_and_read_only_is_kept() {
        let a = mount_args(
            "s3://ckpt",
            Path::new("/ckpt"),
            apb::StorageMode::MountCached,
            true,
            &BTreeMap::new(),
        );
        assert_eq!(&a[..3], ["mount", "nembo:ckpt", "/ckpt"]);
        for f in ["full", "--vfs-fast-fingerprint", "--read-only", "10G"] {
            assert!(a.contains(&f.to_string()), "{f} in {a:?}");
        }
        let m = mount_args(
            "s3://ckpt",
            Path::new("/ckpt"),
            apb::StorageMode::Mount,
            false,
            &BTreeMap::new(),
        );
        assert!(m.contains(&"off".to_string()) && !m.contains(&"--read-only".to_string()));
        // The task's knobs replace SkyPilot's defaults or add flags; a key
        // that is not a knob, or a value that looks like a flag, is dropped.
        let knobs: BTreeMap<String, String> = [
            ("vfs_cache_max_size", "50G"),
            ("transfers", "8"),
            ("config", "/etc/evil.conf"),
            ("buffer_size", "--rc"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let t = mount_args(
            "s3://ckpt",
            Path::new("/ckpt"),
            apb::StorageMode::MountCached,
            false,
            &knobs,
        )
        .join(" ");
        assert!(
            t.contains("--vfs-cache-max-size 50G --vfs-write-back 1s --transfers 8"),
            "{t}"
        );
        assert!(
            !t.contains("10G") && !t.contains("evil") && !t.contains("--rc"),
            "{t}"
        );
    }
}
