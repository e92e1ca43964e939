//! A job whose task names `image_id: docker:<image>` runs its `setup` and
//! `run` inside that image, with docker or podman, whichever the node has.
//!
//! One container per attempt and rank, started by the job's wrapper and
//! removed when the attempt ends, so that what `setup` installs is there for
//! `run` (as in SkyPilot, where both run in the one container). Inside it a
//! small driver ([`DRIVER`]) runs the two scripts in their own process group
//! and passes on every signal the engine forwards (cancel, checkpoint), so a
//! job in a container sees what a job on the node sees.
//!
//! What the container shares with the node: the host network (ports as on
//! the node, like SkyPilot's `--net=host`), the job's directory, its
//! checkpoint directory and every absolute file mount, each at the same
//! path; the job's environment, passed by name (values never reach an argv,
//! where `ps` would show them); and the node's GPUs (`--gpus all` for
//! docker, CDI's `nvidia.com/gpu=all` for podman) when the job holds real
//! ones, with `CUDA_VISIBLE_DEVICES` choosing among them as on the node.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A container engine on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Docker, with a running daemon.
    Docker,
    /// Podman (daemonless).
    Podman,
}

impl Engine {
    /// The engine's command.
    pub fn program(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }

    /// The engine this node uses: `NEMBO_CONTAINER_ENGINE` (`docker`,
    /// `podman` or `none`) if set; else docker when its daemon answers, else
    /// podman when installed.
    pub fn detect() -> Option<Engine> {
        match std::env::var("NEMBO_CONTAINER_ENGINE").ok().as_deref() {
            Some("docker") => return Some(Engine::Docker),
            Some("podman") => return Some(Engine::Podman),
            Some("none") => return None,
            _ => {}
        }
        if succeeds("docker", &["info", "--format", "{{.ID}}"]) {
            Some(Engine::Docker)
        } else if succeeds("podman", &["--version"]) {
            Some(Engine::Podman)
        } else {
            None
        }
    }
}

/// Runs a short command to its end (at most 10 s), saying whether it worked.
fn succeeds(program: &str, args: &[&str]) -> bool {
    let Ok(mut child) = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    for _ in 0..100 {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => return false,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// What the node is like, for the engine's flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Host {
    /// `RLIMIT_NOFILE` (soft, hard): given to the container as the job
    /// would have it on the node (engines raise it to values an unprivileged
    /// sandbox may refuse).
    pub nofile: (u64, u64),
    /// `RLIMIT_NPROC` (soft, hard), likewise.
    pub nproc: (u64, u64),
    /// The node mixes cgroup v1 controllers with a v2 hierarchy (hybrid),
    /// which crun, podman's default runtime, refuses; runc is used then.
    pub hybrid_cgroups_with_runc: bool,
    /// `/dev/shm` for the container, MiB: SkyPilot's min(⅓ of available
    /// memory, 200 GB), since PyTorch's data loaders need more than the
    /// engines' 64 MiB.
    pub shm_mib: u64,
}

impl Host {
    /// This node, as it is now.
    pub fn probe() -> Host {
        use nix::sys::resource::{getrlimit, Resource};
        let limit = |r| getrlimit(r).unwrap_or((1024, 1024));
        // Hybrid: a v2 hierarchy mounted beside the v1 controllers.
        let hybrid = Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists();
        let runc = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("runc").is_file()));
        // No more processes than there are PIDs: what podman's monitor is
        // held to, and a container's limit may not exceed its monitor's.
        let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        let (soft, hard) = limit(Resource::RLIMIT_NPROC);
        Host {
            nofile: limit(Resource::RLIMIT_NOFILE),
            nproc: (soft.min(pid_max), hard.min(pid_max)),
            hybrid_cgroups_with_runc: hybrid && runc,
            shm_mib: shm_mib(),
        }
    }
}

fn shm_mib() -> u64 {
    let available_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    (available_kib / 3 / 1024).clamp(64, 200 * 1024)
}

/// One attempt's container, as the wrapper starts it.
#[derive(Debug, Clone)]
pub struct ContainerRun {
    /// The engine.
    pub engine: Engine,
    /// The image, registry prefixed.
    pub image: String,
    /// The container's name ([`name`]).
    pub name: String,
    /// The job's directory (its scripts, work dir and output).
    pub job_dir: PathBuf,
    /// Other directories shared at the same path (checkpoint, file mounts).
    pub shared: Vec<PathBuf>,
    /// Variables passed by name from the wrapper's environment.
    pub env_names: Vec<String>,
    /// The job holds real GPUs.
    pub gpus: bool,
    /// The task's own flags (`config.docker.run_options`), after Nembo's.
    pub run_options: Vec<String>,
    /// The node.
    pub host: Host,
}

/// The container of one rank of one attempt, whose files are in `job_dir`:
/// unique on the machine, which may hold agents of several clusters with
/// the same job ids (hence the directory's digest), and a name the engines
/// accept (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`). Kept in the job's directory
/// ([`NAME_FILE`]), which is what removes it later.
pub fn name(job_dir: &Path, job_id: &str, attempt: u32, rank: u32) -> String {
    let job: String = job_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    // FNV-1a: short, and the same in every build.
    let place = job_dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("nembo-{job}-{attempt}-{rank}-{:08x}", place as u32)
}

/// The file in a job's directory that names its container.
pub const NAME_FILE: &str = "container.name";

impl ContainerRun {
    /// The engine's argv (program first), running [`DRIVER`] from the job
    /// directory in the image.
    pub fn argv(&self) -> Vec<String> {
        let mut a: Vec<String> = [self.engine.program(), "run", "--rm", "--name"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(self.name.clone());
        if self.engine == Engine::Podman && self.host.hybrid_cgroups_with_runc {
            a.extend(["--runtime".into(), "runc".into()]);
        }
        a.extend([
            "--network".into(),
            "host".into(),
            "--label".into(),
            format!("dev.nembo.container={}", self.name),
            "--ulimit".into(),
            format!("nofile={}:{}", self.host.nofile.0, self.host.nofile.1),
            "--ulimit".into(),
            format!("nproc={}:{}", self.host.nproc.0, self.host.nproc.1),
            format!("--shm-size={}m", self.host.shm_mib),
            "--env".into(),
            "LC_ALL=C.UTF-8".into(),
            "--env".into(),
            "LANG=C.UTF-8".into(),
        ]);
        if self.gpus {
            match self.engine {
                Engine::Docker => a.extend(["--gpus".into(), "all".into()]),
                Engine::Podman => a.extend(["--device".into(), "nvidia.com/gpu=all".into()]),
            }
        }
        for name in &self.env_names {
            // By name: the engine takes the value from its own environment.
            a.extend(["--env".into(), name.clone()]);
        }
        let mut shared = vec![self.job_dir.clone()];
        shared.extend(self.shared.iter().cloned());
        for dir in shared {
            let d = dir.display();
            a.extend(["--volume".into(), format!("{d}:{d}")]);
        }
        a.extend(self.run_options.iter().cloned());
        a.extend([
            "--workdir".into(),
            self.job_dir.join("work").display().to_string(),
            "--entrypoint".into(),
            "bash".into(),
            self.image.clone(),
            self.job_dir.join("container.sh").display().to_string(),
        ]);
        a
    }
}

/// Runs inside the container: `setup`, then `run`, each in its own process
/// group, passing on the signals the engine forwards to this PID 1; records
/// which phase ended how in `container.result`, for the wrapper outside.
pub const DRIVER: &str = r#"#!/bin/bash
# Written by nembo-agent: runs setup, then run, inside the job's container.
# Bash alone: an image need not have coreutils. $0 is an absolute path.
job_dir="${0%/*}"
child=
pass() { [ -n "$child" ] && kill -"$1" -- -"$child" 2>/dev/null; }
for s in TERM INT HUP USR1 USR2; do trap "pass $s" "$s"; done
phase() {
  set -m; bash "$job_dir/$1.sh" & child=$!; set +m
  # A passed-on signal ends `wait` early: wait again until the phase ends.
  while wait "$child"; rc=$?; kill -0 "$child" 2>/dev/null; do :; done
  wait "$child" 2>/dev/null; rc=$?
  child=
  return "$rc"
}
done_with() { echo "$1 $2" > "$job_dir/container.result"; exit "$2"; }
cd "$job_dir/work" || done_with setup 1
if [ -s "$job_dir/setup.sh" ]; then
  phase setup; rc=$?
  [ "$rc" -eq 0 ] || done_with setup "$rc"
fi
phase run; rc=$?
done_with run "$rc"
"#;

/// Whether the node has NVIDIA's CDI spec (what `nvidia.com/gpu=all` names),
/// in either directory CDI reads.
pub fn has_nvidia_cdi() -> bool {
    ["/etc/cdi", "/var/run/cdi"].iter().any(|dir| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("nvidia"))
        })
    })
}

/// Removes an attempt's container, whatever its state (the wrapper's own
/// `--rm` covers a container that ended; this covers a wrapper killed first).
pub async fn remove(engine: Engine, name: &str) {
    let _ = tokio::process::Command::new(engine.program())
        .args(["rm", "--force", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(engine: Engine, gpus: bool, hybrid: bool) -> ContainerRun {
        ContainerRun {
            engine,
            image: "registry.example.com/team/trainer:3".into(),
            name: name(Path::new("/var/lib/nembo/jobs/j-7-2"), "j-7", 2, 1),
            job_dir: "/var/lib/nembo/jobs/j-7-2".into(),
            shared: vec!["/ckpt".into(), "/data".into()],
            env_names: vec!["HF_TOKEN".into(), "NEMBO_NODE_RANK".into()],
            gpus,
            run_options: vec!["--cap-add".into(), "SYS_PTRACE".into()],
            host: Host {
                nofile: (1024, 4096),
                nproc: (512, 1024),
                hybrid_cgroups_with_runc: hybrid,
                shm_mib: 8192,
            },
        }
    }

    fn pairs(argv: &[String]) -> Vec<(String, String)> {
        argv.windows(2)
            .map(|w| (w[0].clone(), w[1].clone()))
            .collect()
    }

    #[test]
    fn the_argv_shares_the_job_directory_network_and_environment_by_name() {
        let argv = run(Engine::Podman, false, false).argv();
        assert_eq!(&argv[..4], ["podman", "run", "--rm", "--name"]);
        assert!(argv[4].starts_with("nembo-j-7-2-1-"), "{}", argv[4]);
        let p = pairs(&argv);
        for (flag, value) in [
            ("--network", "host"),
            (
                "--volume",
                "/var/lib/nembo/jobs/j-7-2:/var/lib/nembo/jobs/j-7-2",
            ),
            ("--volume", "/ckpt:/ckpt"),
            ("--volume", "/data:/data"),
            ("--env", "HF_TOKEN"),
            ("--env", "NEMBO_NODE_RANK"),
            ("--ulimit", "nofile=1024:4096"),
            ("--ulimit", "nproc=512:1024"),
            ("--workdir", "/var/lib/nembo/jobs/j-7-2/work"),
            ("--entrypoint", "bash"),
        ] {
            assert!(
                p.contains(&(flag.into(), value.into())),
                "{flag} {value} missing from {argv:?}"
            );
        }
        assert!(argv.contains(&"--shm-size=8192m".to_string()));
        assert!(p.contains(&("--cap-add".into(), "SYS_PTRACE".into())));
        // The image, then the driver, last: nothing after them is a flag.
        assert_eq!(
            &argv[argv.len() - 2..],
            [
                "registry.example.com/team/trainer:3",
                "/var/lib/nembo/jobs/j-7-2/container.sh"
            ]
        );
        assert!(!argv
            .iter()
            .any(|a| a.contains("--gpus") || a.contains("nvidia")));
        assert!(!argv.contains(&"--runtime".to_string()));
    }

    #[test]
    fn gpus_pass_through_as_each_engine_spells_it() {
        let docker = pairs(&run(Engine::Docker, true, false).argv());
        assert!(docker.contains(&("--gpus".into(), "all".into())));
        let podman = pairs(&run(Engine::Podman, true, false).argv());
        assert!(podman.contains(&("--device".into(), "nvidia.com/gpu=all".into())));
    }

    #[test]
    fn podman_on_hybrid_cgroups_uses_runc_and_docker_keeps_its_own() {
        let podman = pairs(&run(Engine::Podman, false, true).argv());
        assert!(podman.contains(&("--runtime".into(), "runc".into())));
        let docker = run(Engine::Docker, false, true).argv();
        assert!(!docker.contains(&"--runtime".to_string()));
    }

    #[test]
    fn names_are_what_engines_accept_and_differ_between_clusters() {
        let a = name(Path::new("/a/jobs/1-1"), "j 1/../x", 3, 0);
        assert!(a.starts_with("nembo-j_1_.._x-3-0-"), "{a}");
        assert_eq!(a, name(Path::new("/a/jobs/1-1"), "j 1/../x", 3, 0));
        assert_ne!(a, name(Path::new("/b/jobs/1-1"), "j 1/../x", 3, 0));
    }
}
