//! Real faults for the fault suite (`scripts/faults`): coordinators and
//! agents in network namespaces of their own, joined by a bridge, with
//! links cut by blackhole routes (one way or both) and slowed by `tc netem`
//! where the kernel has it; and a coordinator whose `fsync` fails, through
//! an LD_PRELOAD shim. Everything here needs root.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nembo_proto::client::Client;
use nembo_proto::v1 as pb;

use crate::bin;

/// Runs a command, failing with its stderr.
pub fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Hosts on a bridge, each in its own network namespace `<prefix><name>`
/// with address `<subnet>.<11 + index>`. Prefix and subnet come from the
/// process id, so that two runs (a soak and a test) never meet.
pub struct Net {
    hosts: Vec<String>,
    cuts: Mutex<BTreeSet<(String, String)>>,
    prefix: String,
    subnet: String,
}

fn prefix() -> String {
    format!("nf{}-", std::process::id() % 90 + 10)
}

impl Net {
    /// Why the suite cannot run here, if it cannot.
    pub fn unavailable() -> Option<String> {
        if run(&["id", "-u"]).map(|u| u.trim() == "0") != Ok(true) {
            return Some("needs root (network namespaces)".into());
        }
        let probe = &format!("{}probe", prefix());
        let _ = run(&["ip", "netns", "del", probe]);
        match run(&["ip", "netns", "add", probe]) {
            Ok(_) => {
                let _ = run(&["ip", "netns", "del", probe]);
                None
            }
            Err(e) => Some(format!("cannot make a network namespace: {e}")),
        }
    }

    /// Whether `tc netem` works here (a kernel module containers often lack).
    pub fn has_netem() -> bool {
        let ns = &format!("{}netem", prefix());
        let _ = run(&["ip", "netns", "add", ns]);
        let ok = run(&[
            "tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
        ])
        .is_ok();
        let _ = run(&["ip", "netns", "del", ns]);
        ok
    }

    /// Brings the bridge and the hosts up (after clearing a previous run's).
    pub fn up(hosts: &[&str]) -> Result<Net, String> {
        let n = std::process::id() % 90 + 10;
        let net = Net {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            cuts: Mutex::default(),
            prefix: prefix(),
            subnet: format!("10.89.{n}"),
        };
        net.clear();
        let bridge = net.bridge();
        run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}.1/24", net.subnet),
            "dev",
            &bridge,
        ])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        for h in hosts {
            let ns = net.ns(h);
            run(&["ip", "netns", "add", &ns])?;
            run(&[
                "ip", "link", "add", &ns, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            run(&["ip", "link", "set", &ns, "master", &bridge, "up"])?;
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.ip(h)),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    /// `host`'s namespace (and the name of its link on the bridge).
    fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    fn clear(&self) {
        if let Ok(list) = run(&["ip", "netns", "list"]) {
            for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
                if ns.starts_with(&self.prefix) {
                    // A process left inside keeps the namespace (and its
                    // link) alive after its name is gone.
                    for pid in run(&["ip", "netns", "pids", ns])
                        .unwrap_or_default()
                        .split_whitespace()
                    {
                        if let Ok(pid) = pid.parse() {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                    }
                    let _ = run(&["ip", "netns", "del", ns]);
                }
            }
        }
        if let Ok(links) = run(&["ip", "-o", "link", "show"]) {
            for name in links.lines().filter_map(|l| l.split(": ").nth(1)) {
                let name = name.split('@').next().unwrap_or(name);
                if name.starts_with(&self.prefix) {
                    let _ = run(&["ip", "link", "del", name]);
                }
            }
        }
    }

    /// The bridge's own address (this process's end of the network).
    pub fn bridge_ip(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// A host's address.
    pub fn ip(&self, host: &str) -> String {
        let i = self
            .hosts
            .iter()
            .position(|h| h == host)
            .expect("known host");
        format!("{}.{}", self.subnet, 11 + i)
    }

    /// A command run inside `host`'s namespace.
    pub fn command(&self, host: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)]).arg(program);
        c
    }

    /// Packets from `from` to `to` are dropped (one way).
    pub fn cut(&self, from: &str, to: &str) {
        let ns = self.ns(from);
        let _ = run(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "blackhole",
            &format!("{}/32", self.ip(to)),
        ]);
        self.cuts.lock().unwrap().insert((from.into(), to.into()));
    }

    /// `a` and `b` cannot reach each other.
    pub fn partition(&self, a: &str, b: &str) {
        self.cut(a, b);
        self.cut(b, a);
    }

    /// Every cut mended.
    pub fn heal(&self) {
        for (from, to) in std::mem::take(&mut *self.cuts.lock().unwrap()) {
            let ns = self.ns(&from);
            let _ = run(&[
                "ip",
                "-n",
                &ns,
                "route",
                "del",
                "blackhole",
                &format!("{}/32", self.ip(&to)),
            ]);
        }
    }

    /// Whether `nft` works here (for loss where netem does not).
    pub fn has_nft() -> bool {
        let ns = &format!("{}nft", prefix());
        let _ = run(&["ip", "netns", "add", ns]);
        let ok = run(&[
            "ip", "netns", "exec", ns, "nft", "add", "table", "inet", "probe",
        ])
        .is_ok();
        let _ = run(&["ip", "netns", "del", ns]);
        ok
    }

    /// Drops `percent` % of the packets `host` sends, at random, with
    /// nftables (0: none again). Loss without netem's added latency.
    pub fn loss(&self, host: &str, percent: u32) -> Result<(), String> {
        let ns = self.ns(host);
        let nft = |args: &[&str]| {
            let mut a = vec!["ip", "netns", "exec", &ns, "nft"];
            a.extend_from_slice(args);
            run(&a)
        };
        let _ = nft(&["delete", "table", "inet", "nembo_loss"]);
        if percent == 0 {
            return Ok(());
        }
        nft(&["add", "table", "inet", "nembo_loss"])?;
        nft(&[
            "add",
            "chain",
            "inet",
            "nembo_loss",
            "out",
            "{ type filter hook output priority 0; }",
        ])?;
        let p = percent.to_string();
        nft(&[
            "add",
            "rule",
            "inet",
            "nembo_loss",
            "out",
            "oifname",
            "eth0",
            "numgen",
            "random",
            "mod",
            "100",
            "<",
            &p,
            "drop",
        ])
        .map(|_| ())
    }

    /// `netem` on `host`'s link (`None`: removed).
    pub fn netem(&self, host: &str, spec: Option<&str>) -> Result<(), String> {
        let ns = self.ns(host);
        match spec {
            Some(spec) => {
                let mut args = vec![
                    "tc", "-n", &ns, "qdisc", "replace", "dev", "eth0", "root", "netem",
                ];
                args.extend(spec.split_whitespace());
                run(&args).map(|_| ())
            }
            None => run(&["tc", "-n", &ns, "qdisc", "del", "dev", "eth0", "root"]).map(|_| ()),
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Three coordinators (hosts `c1`..`c3`) sharing `root` as cluster dir.
pub struct Members<'a> {
    pub net: &'a Net,
    pub root: PathBuf,
    pub procs: Vec<Option<Child>>,
    pub extra: Vec<String>,
    /// Environment for every start (an LD_PRELOAD shim).
    pub env: Vec<(String, String)>,
}

impl<'a> Members<'a> {
    /// Starts `n` members, with `env` added to their environment.
    pub fn start(
        net: &'a Net,
        root: &Path,
        n: usize,
        extra: &[&str],
        env: Vec<(String, String)>,
    ) -> Members<'a> {
        let mut m = Members {
            net,
            root: root.to_path_buf(),
            procs: (0..n).map(|_| None).collect(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env,
        };
        let (k, v) = crate::SIMULATE_GPUS;
        m.env.push((k.into(), v.into()));
        for id in 1..=n as u64 {
            m.spawn(id);
        }
        m
    }

    /// Member `id`'s URL.
    pub fn url(&self, id: u64) -> String {
        format!("https://{}:7000", self.net.ip(&format!("c{id}")))
    }

    /// Every member's URL.
    pub fn urls(&self) -> Vec<String> {
        (1..=self.procs.len() as u64)
            .map(|id| self.url(id))
            .collect()
    }

    /// Member `id`'s data dir.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join(format!("member-{id}"))
    }

    /// Starts member `id` from its data dir.
    pub fn spawn(&mut self, id: u64) {
        let host = format!("c{id}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(format!("member-{id}.log")))
            .expect("log");
        let ip = self.net.ip(&host);
        let mut cmd = self.net.command(&host, &bin("nembo-coordinator"));
        cmd.arg("--data-dir")
            .arg(self.dir(id))
            .args(["--member-id", &id.to_string()])
            .args(["--listen", &format!("{ip}:7000"), "--host", &ip])
            .arg("--cluster-dir")
            .arg(&self.root)
            .args(&self.extra);
        for i in 1..=self.procs.len() as u64 {
            cmd.args(["--member", &format!("{i}={}", self.url(i))]);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start member");
        self.procs[id as usize - 1] = Some(child);
    }

    /// kill -9.
    pub fn kill9(&mut self, id: u64) {
        if let Some(mut c) = self.procs[id as usize - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether member `id` has exited by itself, and how.
    pub fn exited(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        self.procs[id as usize - 1]
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Its pid.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.procs[id as usize - 1].as_ref().map(Child::id)
    }

    /// The cluster's token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.root.join("token"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// The cluster's CA.
    pub fn ca(&self) -> Vec<u8> {
        std::fs::read(self.root.join("tls/ca.pem")).unwrap_or_default()
    }

    /// A client over every member.
    pub fn client(&self) -> Client {
        nembo_proto::client::connect_any(&self.urls(), &self.ca(), &self.token()).expect("client")
    }

    /// The leader most members name, once one does.
    pub async fn leader(&self, limit: Duration) -> Option<u64> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            let mut votes = std::collections::BTreeMap::new();
            for id in 1..=self.procs.len() as u64 {
                if let Some(s) = self.status(id).await {
                    if s.leader_id != 0 {
                        *votes.entry(s.leader_id).or_insert(0) += 1;
                    }
                }
            }
            if let Some((&l, _)) = votes.iter().find(|(_, n)| **n * 2 > self.procs.len()) {
                return Some(l);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Member `id`'s own view.
    pub async fn status(&self, id: u64) -> Option<pb::ClusterStatus> {
        let mut c = nembo_proto::client::connect(&self.url(id), &self.ca(), &self.token())
            .await
            .ok()?;
        let mut req = tonic::Request::new(pb::GetClusterStatusRequest {});
        req.set_timeout(Duration::from_millis(500));
        c.get_cluster_status(req).await.ok()?.into_inner().status
    }
}

impl Drop for Members<'_> {
    fn drop(&mut self) {
        for id in 1..=self.procs.len() as u64 {
            self.kill9(id);
        }
    }
}

/// An LD_PRELOAD library whose `fsync`, `fdatasync` and `sync_file_range`
/// fail with EIO while the file `flag` exists; built with the system's cc.
pub fn failing_fsync_shim(dir: &Path) -> Result<PathBuf, String> {
    let src = dir.join("failfsync.c");
    let lib = dir.join("libfailfsync.so");
    std::fs::write(
        &src,
        r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
#include <fcntl.h>
static int failing(void) {
    const char *flag = getenv("NEMBO_FAIL_FSYNC_FLAG");
    return flag && access(flag, F_OK) == 0;
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    if (failing()) { errno = EIO; return -1; }
    return real(fd);
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    if (failing()) { errno = EIO; return -1; }
    return real(fd);
}
int sync_file_range(int fd, off_t off, off_t n, unsigned int flags) {
    static int (*real)(int, off_t, off_t, unsigned int);
    if (!real) real = dlsym(RTLD_NEXT, "sync_file_range");
    if (failing()) { errno = EIO; return -1; }
    return real(fd, off, n, flags);
}
"#,
    )
    .map_err(|e| e.to_string())?;
    run(&[
        "cc",
        "-shared",
        "-fPIC",
        "-O2",
        "-o",
        lib.to_str().unwrap(),
        src.to_str().unwrap(),
        "-ldl",
    ])?;
    Ok(lib)
}

/// SIGKILL to every process whose command line mentions `needle` (the jobs
/// an agent left in process groups of their own).
pub fn kill_mentioning(needle: &str) {
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
