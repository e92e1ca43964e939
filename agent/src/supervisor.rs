//! The job supervisor: the single owner of every job on this node.
//!
//! A job attempt lives in `jobs/<job>-<attempt>/` under the work dir:
//! `setup.sh`, `run.sh`, `job.sh` (the wrapper), `output.log`, `pid` (the
//! process group), `result` (written by the wrapper: `setup N` or `run N`),
//! `stop` (a stop was requested) and `ended.json` (the final report). Jobs
//! run in their own process group and outlive the agent, so an agent restart
//! re-adopts running jobs from these files instead of losing or re-running
//! them.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nembo_proto::agent::v1 as apb;
use nembo_proto::clock::now_ms;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::checkpoint::Checkpoints;

/// A job attempt on this node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobKey {
    pub job_id: String,
    /// Attempt number.
    pub attempt: u32,
}

impl JobKey {
    fn dir_name(&self) -> String {
        format!("{}-{}", self.job_id, self.attempt)
    }
}

/// What the session needs to know about one job: its latest report, where
/// its output is, and a flag that flips to the final log size when it ends.
#[derive(Debug, Clone)]
pub struct JobView {
    /// Latest state.
    pub report: apb::JobReport,
    /// The output file.
    pub log_path: PathBuf,
    /// `Some(final size)` once the job has ended.
    pub ended: watch::Receiver<Option<u64>>,
}

/// What this node gives every job besides its task.
#[derive(Debug, Clone, Default)]
pub struct NodeSetup {
    /// A task's checkpoint path is taken below this root when one is given
    /// (nodes sharing one machine keep their own directories).
    pub checkpoint_root: Option<PathBuf>,
    /// The node's accelerators are simulated: jobs see `NEMBO_SIMULATED=1`.
    pub simulated: bool,
    /// The node's real GPUs (NVML indices): each job is given as many as it
    /// holds, and only those (`CUDA_VISIBLE_DEVICES`). Empty: no GPU to give.
    pub gpu_indices: Vec<u32>,
    /// The engine that runs jobs with a container image, if the node has one.
    pub container_engine: Option<crate::container::Engine>,
}

/// What the supervisor tells the session.
#[derive(Debug)]
pub enum Event {
    /// A job changed phase.
    Report(JobView),
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    job_id: String,
    attempt: u32,
    rank: u32,
    started_at_ms: i64,
    #[serde(default)]
    checkpoint: Option<CkptMeta>,
    /// The coordinators replace this attempt elsewhere if the node is lost.
    #[serde(default)]
    replaced_if_lost: bool,
    /// The GPUs given to it (`CUDA_VISIBLE_DEVICES`); none on a node
    /// without real GPUs. Kept here so that a restarted agent does not give
    /// them to another job.
    #[serde(default)]
    gpu_indices: Option<Vec<u32>>,
}

/// A job's checkpoint settings, as this node applies them.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CkptMeta {
    store: String,
    /// The directory on this node (`NEMBO_CHECKPOINT_DIR`).
    dir: PathBuf,
    interval_s: u32,
    signal: String,
    /// The job's `AWS_*` variables, for an S3 store. In memory only: never
    /// written to the job's directory (a re-adopted job syncs with the
    /// agent's own environment).
    #[serde(skip)]
    store_env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ended {
    phase: i32,
    exit_code: Option<i32>,
    message: String,
    at_ms: i64,
    log_bytes: u64,
}

struct Entry {
    meta: Meta,
    dir: PathBuf,
    pgid: Option<i32>,
    ended: Option<Ended>,
    ended_tx: watch::Sender<Option<u64>>,
    /// Serialises this job's checkpoint syncs.
    sync_lock: Arc<tokio::sync::Mutex<()>>,
    /// The process has exited and its last checkpoint is being synced.
    final_sync: bool,
    /// The process has exited and its storage mounts are being unmounted.
    unmounting: bool,
    /// Buckets to delete when the job ends (`persistent: false`).
    ephemeral: Option<Ephemeral>,
}

/// A job's `persistent: false` buckets, with rclone's environment. In
/// memory only: it holds the job's keys.
struct Ephemeral {
    buckets: Vec<String>,
    env: Vec<(String, String)>,
}

impl Entry {
    fn view(&self) -> JobView {
        let report = match &self.ended {
            Some(e) => apb::JobReport {
                job_id: self.meta.job_id.clone(),
                attempt: self.meta.attempt,
                rank: self.meta.rank,
                phase: e.phase,
                exit_code: e.exit_code,
                message: e.message.clone(),
                at_unix_ms: e.at_ms,
                log_bytes: e.log_bytes,
            },
            None => apb::JobReport {
                job_id: self.meta.job_id.clone(),
                attempt: self.meta.attempt,
                rank: self.meta.rank,
                phase: apb::JobPhase::Started as i32,
                exit_code: None,
                message: String::new(),
                at_unix_ms: self.meta.started_at_ms,
                log_bytes: 0,
            },
        };
        JobView {
            report,
            log_path: self.dir.join("output.log"),
            ended: self.ended_tx.subscribe(),
        }
    }
}

enum Msg {
    Run(Box<apb::RunJob>),
    Stop(apb::StopJob),
    Snapshot(oneshot::Sender<Vec<JobView>>),
    Exited(JobKey, Option<std::process::ExitStatus>),
    /// Its files are in place and its checkpoint restored (or it failed,
    /// with the phase to report): start the process.
    Prepared(Box<apb::RunJob>, Result<(), (apb::JobPhase, String)>),
    /// The session's newest channel to the coordinators.
    Fetcher(nembo_proto::client::AgentTlsClient),
    /// The final checkpoint sync after an exit is done.
    Synced(JobKey, Option<std::process::ExitStatus>),
    Notice(crate::preempt::Notice, oneshot::Sender<()>),
    StopReplaceable(Duration, String),
}

/// Handle to the supervisor task.
#[derive(Clone)]
pub struct Supervisor {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Supervisor {
    /// Starts the supervisor over `work_dir`, re-adopting jobs found there.
    pub fn start(
        work_dir: PathBuf,
        node: NodeSetup,
    ) -> (Supervisor, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let mut owner = Owner {
            jobs_dir: work_dir.join("jobs"),
            jobs: HashMap::new(),
            events: ev_tx,
            me: tx.clone(),
            node,
            fetcher: watch::channel(None).0,
        };
        tokio::spawn(async move {
            owner.recover();
            owner.run(rx).await;
        });
        (Supervisor { tx }, ev_rx)
    }

    /// Starts a job unless this attempt is already known.
    pub fn run(&self, job: apb::RunJob) {
        let _ = self.tx.send(Msg::Run(Box::new(job)));
    }

    /// The channel a new session opened: files are fetched over it.
    pub fn set_fetcher(&self, client: nembo_proto::client::AgentTlsClient) {
        let _ = self.tx.send(Msg::Fetcher(client));
    }

    /// Stops a job: SIGTERM to its group, SIGKILL after the grace.
    pub fn stop(&self, stop: apb::StopJob) {
        let _ = self.tx.send(Msg::Stop(stop));
    }

    /// A preemption notice: each running job finds the deadline in
    /// `NEMBO_PREEMPTION_FILE` and gets its checkpoint signal. Resolves once
    /// those jobs have ended and synced their checkpoints, or after 25 s.
    pub async fn notice(&self, n: crate::preempt::Notice) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Notice(n, tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Stops every running attempt the coordinators would replace if this
    /// node were lost, saying `why` in its end report: SIGTERM, then
    /// SIGKILL after `grace`.
    pub fn stop_replaceable(&self, grace: Duration, why: String) {
        let _ = self.tx.send(Msg::StopReplaceable(grace, why));
    }

    /// Every known job.
    pub async fn snapshot(&self) -> Vec<JobView> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Snapshot(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

struct Owner {
    jobs_dir: PathBuf,
    jobs: HashMap<JobKey, Entry>,
    events: mpsc::UnboundedSender<Event>,
    me: mpsc::UnboundedSender<Msg>,
    node: NodeSetup,
    /// The session's newest channel to the coordinators, for fetching files.
    fetcher: watch::Sender<Option<nembo_proto::client::AgentTlsClient>>,
}

fn group_alive(pgid: i32) -> bool {
    killpg(Pid::from_raw(pgid), None).is_ok()
}

fn read_json<T: for<'de> Deserialize<'de>>(p: &Path) -> Option<T> {
    serde_json::from_slice(&fs::read(p).ok()?).ok()
}

fn write_json(p: &Path, v: &impl Serialize) -> std::io::Result<()> {
    let tmp = p.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec(v)?)?;
    fs::rename(tmp, p)
}

fn log_size(dir: &Path) -> u64 {
    fs::metadata(dir.join("output.log"))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// The file the agent renews at each word from a leader, holding its
/// contact lease in ms (see `lease`): each replaceable attempt's watchdog,
/// in its wrapper script, stops the attempt when the file grows older than
/// the lease, should the agent be frozen or dead.
pub fn contact_file(work_dir: &Path) -> PathBuf {
    work_dir.join("contact")
}

const WRAPPER: &str = r#"#!/bin/bash
# Written by nembo-agent: runs setup, then run, and records which ended how.
job_dir="$(cd "$(dirname "$0")" && pwd)"
# The checkpoint signal goes to the whole group: it is for the job, not for
# this wrapper (a handler, not an ignore, so the job keeps the default).
trap ':' USR1 USR2
container=
# The watchdog (below) ends with the wrapper: a re-adopted job is over
# when its process group is empty, so nothing of it may outlive the job.
finish() {
  [ -n "$watchdog" ] && kill "$watchdog" 2>/dev/null
  [ -n "$container" ] && "$engine" rm --force "$container" >/dev/null 2>&1
  echo "$1 $2" > "$job_dir/result.tmp" && mv "$job_dir/result.tmp" "$job_dir/result"; exit "$2"
}
cd "$job_dir/work" || finish setup 1
if [ -n "$NEMBO_WORKDIR_SOURCE" ]; then
  cp -a "$NEMBO_WORKDIR_SOURCE/." . || { echo "nembo: cannot copy workdir $NEMBO_WORKDIR_SOURCE" >&2; finish setup 1; }
fi
start_watchdog() {
  [ -n "$NEMBO_CONTACT_FILE" ] || return 0
  # An attempt the coordinators would replace must not outlive its agent's
  # contact with them. The agent stops it itself; this covers an agent that
  # is frozen or dead. The agent renews the file while a leader speaks to it
  # and writes its lease (ms) and node id in it. Once seen, a vanished file
  # is as stale as an old one: the agent's directory is gone (a node
  # replaced or wiped), so nothing renews it. So is a file that names
  # another node: a new node's agent in the same directory, which does not
  # speak for this attempt (a restarted agent is the same node, and
  # re-adopts it).
  (
    stop() {
      echo "stopped by its watchdog: $1" > "$job_dir/lost"
      [ -n "$container" ] && "$engine" rm --force "$container" >/dev/null 2>&1
      kill -TERM -- -$$; sleep 1; kill -KILL -- -$$; exit
    }
    node=
    while sleep 0.5; do
      kill -0 $$ 2>/dev/null || exit 0
      if ! seen=$(stat -c %Y "$NEMBO_CONTACT_FILE" 2>/dev/null); then
        [ -n "$node" ] && stop "its agent's contact file $NEMBO_CONTACT_FILE is gone"
        continue
      fi
      read -r lease_ms now_node < "$NEMBO_CONTACT_FILE" 2>/dev/null || continue
      [ -n "$now_node" ] || continue
      [ -z "$node" ] && node=$now_node
      [ "$now_node" = "$node" ] || stop "its agent's contact file now speaks for $now_node, not $node"
      [ "${lease_ms:-0}" -gt 0 ] 2>/dev/null || continue
      if [ $(( ($(date +%s) - seen) * 1000 )) -gt "$lease_ms" ]; then
        stop "its agent heard no coordinator for over $((lease_ms / 1000)) s"
      fi
    done
  ) &
  watchdog=$!
}
if [ -s "$job_dir/container.args" ]; then
  # Setup and run are one process tree in the container: this wrapper waits
  # for it, and the engine passes the group's signals on to it.
  trap ':' TERM INT HUP
  mapfile -d '' -t argv < "$job_dir/container.args"
  engine="${argv[0]}"
  container="$NEMBO_CONTAINER_NAME"
  start_watchdog
  if [ -n "$SKYPILOT_DOCKER_USERNAME$SKYPILOT_DOCKER_PASSWORD" ]; then
    printf '%s' "$SKYPILOT_DOCKER_PASSWORD" | "$engine" login --username "$SKYPILOT_DOCKER_USERNAME" --password-stdin "$SKYPILOT_DOCKER_SERVER" >/dev/null \
      || { echo "nembo: cannot log in to the registry $SKYPILOT_DOCKER_SERVER as $SKYPILOT_DOCKER_USERNAME" >&2; finish setup 1; }
  fi
  "${argv[@]}"; rc=$?
  if read -r phase code < "$job_dir/container.result" 2>/dev/null; then
    finish "$phase" "$code"
  fi
  echo "nembo: the container did not run ($engine exited with $rc); see above" >&2
  finish setup "$rc"
fi
if [ -s "$job_dir/setup.sh" ]; then
  bash "$job_dir/setup.sh"; rc=$?
  [ "$rc" -eq 0 ] || finish setup "$rc"
fi
start_watchdog
bash "$job_dir/run.sh"; rc=$?
finish run "$rc"
"#;

impl Owner {
    /// Re-adopts jobs left by an earlier agent process.
    fn recover(&mut self) {
        let Ok(entries) = fs::read_dir(&self.jobs_dir) else {
            return;
        };
        for e in entries.flatten() {
            let dir = e.path();
            let Some(meta) = read_json::<Meta>(&dir.join("meta.json")) else {
                continue;
            };
            let key = JobKey {
                job_id: meta.job_id.clone(),
                attempt: meta.attempt,
            };
            let pgid = fs::read_to_string(dir.join("pid"))
                .ok()
                .and_then(|s| s.trim().parse().ok());
            let ended = read_json::<Ended>(&dir.join("ended.json"));
            let (ended_tx, _) = watch::channel(ended.as_ref().map(|e| e.log_bytes));
            let entry = Entry {
                meta,
                dir: dir.clone(),
                pgid,
                ended,
                ended_tx,
                sync_lock: Default::default(),
                final_sync: false,
                unmounting: false,
                ephemeral: None,
            };
            let running = entry.ended.is_none();
            self.jobs.insert(key.clone(), entry);
            if running {
                match pgid.filter(|p| group_alive(*p)) {
                    Some(pgid) => {
                        tracing::info!(job = %key.job_id, attempt = key.attempt, pgid, "re-adopted running job");
                        self.start_periodic_sync(&key);
                        self.watch_adopted(key, pgid);
                    }
                    None => self.finish(&key, None),
                }
            }
        }
    }

    async fn run(&mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Run(job) => self.start(*job),
                Msg::Stop(s) => self.stop(s),
                Msg::Snapshot(reply) => {
                    let mut v: Vec<JobView> = self.jobs.values().map(Entry::view).collect();
                    v.sort_by(|a, b| {
                        (&a.report.job_id, a.report.attempt)
                            .cmp(&(&b.report.job_id, b.report.attempt))
                    });
                    let _ = reply.send(v);
                }
                Msg::Exited(key, status) => self.exited(key, status),
                Msg::Synced(key, status) => self.finish(&key, status),
                Msg::Prepared(job, result) => self.prepared(*job, result),
                Msg::Fetcher(client) => {
                    self.fetcher.send_replace(Some(client));
                }
                Msg::Notice(n, done) => self.notice(n, done),
                Msg::StopReplaceable(grace, why) => self.stop_replaceable(grace, &why),
            }
        }
    }

    fn emit(&self, key: &JobKey) {
        if let Some(e) = self.jobs.get(key) {
            let _ = self.events.send(Event::Report(e.view()));
        }
    }

    fn start(&mut self, job: apb::RunJob) {
        let key = JobKey {
            job_id: job.job_id.clone(),
            attempt: job.attempt,
        };
        if self.jobs.contains_key(&key) {
            return; // a repeat after a reconnect: never run an attempt twice
        }
        // A newer attempt of the job has been here: this order is stale.
        if let Some(newer) = self
            .jobs
            .keys()
            .filter(|k| k.job_id == key.job_id && k.attempt > key.attempt)
            .map(|k| k.attempt)
            .max()
        {
            tracing::warn!(job = %key.job_id, attempt = key.attempt, newer, "RunJob for a stale attempt refused");
            return;
        }
        let dir = self.jobs_dir.join(key.dir_name());
        let checkpoint = job.checkpoint.as_ref().map(|c| CkptMeta {
            store: c.store.clone(),
            dir: match &self.node.checkpoint_root {
                Some(root) => root.join(c.path.trim_start_matches('/')),
                None => PathBuf::from(&c.path),
            },
            interval_s: c.interval_s.max(1),
            signal: c.signal.clone(),
            store_env: job
                .env
                .iter()
                .filter(|(k, _)| k.starts_with("AWS_"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        });
        let meta = Meta {
            job_id: job.job_id.clone(),
            attempt: job.attempt,
            rank: job.rank,
            started_at_ms: now_ms(),
            checkpoint: checkpoint.clone(),
            replaced_if_lost: job.replaced_if_lost,
            gpu_indices: self.give_gpus(job.gpus),
        };
        let (ended_tx, _) = watch::channel(None);
        self.jobs.insert(
            key.clone(),
            Entry {
                meta,
                dir: dir.clone(),
                pgid: None,
                ended: None,
                ended_tx,
                sync_lock: Default::default(),
                final_sync: false,
                unmounting: false,
                ephemeral: {
                    let buckets: Vec<String> = job
                        .file_mounts
                        .iter()
                        .filter(|m| m.delete_at_end && job.rank == 0)
                        .map(|m| m.bucket.clone())
                        .collect();
                    (!buckets.is_empty()).then(|| {
                        let env = job.env.clone().into_iter().collect();
                        Ephemeral {
                            buckets,
                            env: crate::storage::rclone_env(&env),
                        }
                    })
                },
            },
        );
        let stage = crate::stagein::StageIn {
            job_id: job.job_id.clone(),
            mounts: job.file_mounts.clone(),
            workdir_manifest: (!job.workdir_manifest.is_empty())
                .then(|| job.workdir_manifest.clone()),
            workdir_git: (!job.workdir_git_url.is_empty())
                .then(|| (job.workdir_git_url.clone(), job.workdir_git_ref.clone())),
            work: dir.join("work"),
            records: self.jobs_dir.with_file_name("synced"),
            env: job.env.clone().into_iter().collect(),
            log: dir.join("output.log"),
        };
        if stage.is_empty() && checkpoint.is_none() {
            return self.launch(job);
        }
        // Its progress lines go to its output from the start.
        if let Err(e) = fs::create_dir_all(&stage.work) {
            tracing::warn!(job = %job.job_id, error = %e, "cannot create the job's work dir");
        }
        // Files in first, then the newest checkpoint of an earlier attempt.
        let fetcher = self.fetcher.subscribe();
        let me = self.me.clone();
        tokio::spawn(async move {
            let result = async {
                if !stage.is_empty() {
                    stage
                        .run(fetcher)
                        .await
                        .map_err(|e| (apb::JobPhase::SetupFailed, e))?;
                }
                if let Some(c) = checkpoint {
                    restore(&c, &job.job_id, job.attempt).await.map_err(|e| {
                        (
                            apb::JobPhase::FailedToStart,
                            format!("checkpoint restore: {e}"),
                        )
                    })?;
                }
                Ok(())
            }
            .await;
            let _ = me.send(Msg::Prepared(Box::new(job), result));
        });
    }

    /// The GPUs a new job of `count` GPUs gets: ones no running job holds,
    /// lowest first. The coordinators never book more GPUs than the node
    /// has, so sharing happens only for fractional requests (rounded up)
    /// that found every GPU taken; those share the least-held ones.
    fn give_gpus(&self, count: u32) -> Option<Vec<u32>> {
        if self.node.gpu_indices.is_empty() || self.node.simulated {
            return None;
        }
        let mut held: BTreeMap<u32, usize> =
            self.node.gpu_indices.iter().map(|i| (*i, 0)).collect();
        for e in self.jobs.values().filter(|e| e.ended.is_none()) {
            for i in e.meta.gpu_indices.iter().flatten() {
                if let Some(n) = held.get_mut(i) {
                    *n += 1;
                }
            }
        }
        let mut order: Vec<(usize, u32)> = held.into_iter().map(|(i, n)| (n, i)).collect();
        order.sort_unstable();
        let mut given: Vec<u32> = order
            .into_iter()
            .take(count as usize)
            .map(|(_, i)| i)
            .collect();
        given.sort_unstable();
        Some(given)
    }

    fn prepared(&mut self, job: apb::RunJob, result: Result<(), (apb::JobPhase, String)>) {
        let key = JobKey {
            job_id: job.job_id.clone(),
            attempt: job.attempt,
        };
        match result {
            Ok(()) => self.launch(job),
            Err((phase, e)) => {
                tracing::warn!(job = %key.job_id, error = %e, "job not prepared");
                self.record_end(&key, phase, None, e);
            }
        }
    }

    fn launch(&mut self, job: apb::RunJob) {
        let key = JobKey {
            job_id: job.job_id.clone(),
            attempt: job.attempt,
        };
        let dir = self.jobs_dir.join(key.dir_name());
        if self.jobs.get(&key).is_none_or(|e| e.ended.is_some()) {
            return; // stopped while its checkpoint was being restored
        }
        match self.spawn(&dir, &job) {
            Ok(pgid) => {
                if let Some(e) = self.jobs.get_mut(&key) {
                    e.pgid = Some(pgid);
                }
                tracing::info!(job = %key.job_id, attempt = key.attempt, rank = job.rank, pgid, "job started");
                self.start_periodic_sync(&key);
                self.emit(&key);
            }
            Err(err) => {
                tracing::warn!(job = %key.job_id, error = %err, "job failed to start");
                self.record_end(&key, apb::JobPhase::FailedToStart, None, err.to_string());
            }
        }
    }

    /// The container an attempt with an image runs in: what it shares with
    /// the node, and the variables `cmd` sets, passed by name.
    fn container_run(
        &self,
        dir: &Path,
        job: &apb::RunJob,
        checkpoint_dir: Option<PathBuf>,
        cmd: &tokio::process::Command,
    ) -> std::io::Result<crate::container::ContainerRun> {
        let engine = self.node.container_engine.ok_or_else(|| {
            std::io::Error::other(format!(
                "resources.image_id: docker:{} needs docker or podman on the node, and this \
                 node has neither (install one; NEMBO_CONTAINER_ENGINE names it)",
                job.container_image
            ))
        })?;
        let job_dir = std::path::absolute(dir)?;
        let work = job_dir.join("work");
        let mut shared: Vec<PathBuf> = checkpoint_dir.into_iter().collect();
        // What lands below the work dir is shared with the job's directory.
        shared.extend(
            job.file_mounts
                .iter()
                .map(|m| {
                    crate::stagein::destination(
                        &m.destination,
                        job.env.get("HOME").map(String::as_str),
                        &work,
                    )
                })
                .filter(|p| !p.starts_with(&work)),
        );
        // The wrapper's own settings stay outside.
        const OUTSIDE: [&str; 3] = [
            "NEMBO_CONTACT_FILE",
            "NEMBO_WORKDIR_SOURCE",
            "NEMBO_CONTAINER_NAME",
        ];
        let env_names = cmd
            .as_std()
            .get_envs()
            .filter_map(|(k, v)| v.and(k.to_str()))
            .filter(|k| !OUTSIDE.contains(k))
            .map(str::to_string)
            .collect();
        let gpus = self
            .jobs
            .get(&JobKey {
                job_id: job.job_id.clone(),
                attempt: job.attempt,
            })
            .is_some_and(|e| e.meta.gpu_indices.as_ref().is_some_and(|g| !g.is_empty()));
        if gpus && engine == crate::container::Engine::Podman && !crate::container::has_nvidia_cdi()
        {
            return Err(std::io::Error::other(
                "resources.image_id: podman gives a container the node's GPUs through NVIDIA's \
                 CDI spec, and this node has none (nvidia-ctk cdi generate \
                 --output=/etc/cdi/nvidia.yaml makes it)",
            ));
        }
        Ok(crate::container::ContainerRun {
            engine,
            image: job.container_image.clone(),
            name: crate::container::name(&job_dir, &job.job_id, job.attempt, job.rank),
            job_dir,
            shared,
            env_names,
            gpus,
            run_options: job.container_run_options.clone(),
            host: crate::container::Host::probe(),
        })
    }

    fn spawn(&mut self, dir: &Path, job: &apb::RunJob) -> std::io::Result<i32> {
        if !job.workdir.is_empty() {
            let (files, bytes) = nembo_proto::workdir::size(Path::new(&job.workdir))?;
            tracing::info!(job = %job.job_id, workdir = %job.workdir, files, bytes, "copying the workdir");
        }
        fs::create_dir_all(dir.join("work"))?;
        if let Some(e) = self.jobs.get(&JobKey {
            job_id: job.job_id.clone(),
            attempt: job.attempt,
        }) {
            write_json(&dir.join("meta.json"), &e.meta)?;
        }
        let script = |name: &str, body: &str| -> std::io::Result<()> {
            let p = dir.join(name);
            fs::write(&p, body)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700))
        };
        script("setup.sh", &job.setup)?;
        script("run.sh", &job.run)?;
        script("job.sh", WRAPPER)?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("output.log"))?;
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(dir.join("job.sh"))
            .current_dir(dir)
            .envs(&job.env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0)
            .kill_on_drop(false);
        if !job.workdir.is_empty() {
            cmd.env("NEMBO_WORKDIR_SOURCE", &job.workdir);
        }
        cmd.env("NEMBO_JOB_DIR", dir);
        if self.node.simulated {
            cmd.env("NEMBO_SIMULATED", "1");
        }
        let gpus = self.jobs.get(&JobKey {
            job_id: job.job_id.clone(),
            attempt: job.attempt,
        });
        if let Some(given) = gpus.and_then(|e| e.meta.gpu_indices.as_ref()) {
            let list: Vec<String> = given.iter().map(u32::to_string).collect();
            // A job without a GPU request sees none, as under SkyPilot's Ray.
            cmd.env("CUDA_VISIBLE_DEVICES", list.join(","));
        }
        if job.replaced_if_lost {
            let work_dir = self.jobs_dir.parent().unwrap_or(&self.jobs_dir);
            cmd.env("NEMBO_CONTACT_FILE", contact_file(work_dir));
        }
        cmd.env("NEMBO_PREEMPTION_FILE", dir.join("preemption.json"));
        let checkpoint_dir = self
            .jobs
            .get(&JobKey {
                job_id: job.job_id.clone(),
                attempt: job.attempt,
            })
            .and_then(|e| e.meta.checkpoint.as_ref())
            .map(|c| c.dir.clone());
        if let Some(c) = &checkpoint_dir {
            fs::create_dir_all(c)?;
            cmd.env("NEMBO_CHECKPOINT_DIR", c);
        }
        if !job.container_image.is_empty() {
            let run = self.container_run(dir, job, checkpoint_dir, &cmd)?;
            script("container.sh", crate::container::DRIVER)?;
            let mut args = run.argv().join("\0");
            args.push('\0');
            fs::write(dir.join("container.args"), args)?;
            fs::write(dir.join(crate::container::NAME_FILE), &run.name)?;
            cmd.env("NEMBO_CONTAINER_NAME", &run.name);
        }
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0) as i32;
        fs::write(dir.join("pid"), pid.to_string())?;
        let key = JobKey {
            job_id: job.job_id.clone(),
            attempt: job.attempt,
        };
        let me = self.me.clone();
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let _ = me.send(Msg::Exited(key, status));
        });
        Ok(pid)
    }

    /// A job this process did not start: poll its process group.
    fn watch_adopted(&self, key: JobKey, pgid: i32) {
        let me = self.me.clone();
        tokio::spawn(async move {
            while group_alive(pgid) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let _ = me.send(Msg::Exited(key, None));
        });
    }

    fn stop(&mut self, s: apb::StopJob) {
        let key = JobKey {
            job_id: s.job_id.clone(),
            attempt: s.attempt,
        };
        let Some(entry) = self.jobs.get(&key) else {
            // Never started here: nothing to stop, but the coordinator must
            // hear that the rank is over so its resources are freed.
            let (ended_tx, _) = watch::channel(None);
            let dir = self.jobs_dir.join(key.dir_name());
            self.jobs.insert(
                key.clone(),
                Entry {
                    meta: Meta {
                        job_id: s.job_id.clone(),
                        attempt: s.attempt,
                        rank: 0,
                        started_at_ms: now_ms(),
                        checkpoint: None,
                        replaced_if_lost: false,
                        gpu_indices: None,
                    },
                    dir,
                    pgid: None,
                    ended: None,
                    ended_tx,
                    sync_lock: Default::default(),
                    final_sync: false,
                    unmounting: false,
                    ephemeral: None,
                },
            );
            self.record_end(
                &key,
                apb::JobPhase::Cancelled,
                None,
                "cancelled before it started".into(),
            );
            return;
        };
        if entry.ended.is_some() {
            self.emit(&key);
            return;
        }
        let _ = fs::write(entry.dir.join("stop"), b"");
        let Some(pgid) = entry.pgid else { return };
        tracing::info!(job = %key.job_id, pgid, grace_ms = s.grace_ms, "stopping job");
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
        let grace = Duration::from_millis(u64::from(s.grace_ms));
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + grace;
            while tokio::time::Instant::now() < deadline && group_alive(pgid) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if group_alive(pgid) {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
        });
    }

    fn stop_replaceable(&mut self, grace: Duration, why: &str) {
        let running: Vec<JobKey> = self
            .jobs
            .iter()
            .filter(|(_, e)| e.meta.replaced_if_lost && e.ended.is_none() && e.pgid.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for key in running {
            tracing::warn!(job = %key.job_id, attempt = key.attempt, "{why}");
            // Reported as lost, not cancelled: a managed job recovers. (Its
            // watchdog may have said so first, while this agent was frozen.)
            if let Some(e) = self.jobs.get(&key).filter(|e| !e.dir.join("lost").exists()) {
                let _ = fs::write(e.dir.join("lost"), why);
            }
            self.stop(apb::StopJob {
                job_id: key.job_id,
                attempt: key.attempt,
                grace_ms: grace.as_millis() as u32,
                term: 0,
            });
        }
    }

    /// The job's main process is gone: sync its last checkpoint first, so
    /// that the next attempt, started once this end is reported, finds it.
    fn exited(&mut self, key: JobKey, status: Option<std::process::ExitStatus>) {
        let Some(entry) = self.jobs.get_mut(&key) else {
            return;
        };
        // Its buckets first: a cached mount uploads what it holds as it is
        // unmounted, and the next attempt may start as soon as this one is
        // reported over.
        if !entry.unmounting
            && entry.ended.is_none()
            && entry.dir.join(crate::storage::MOUNTS_FILE).exists()
        {
            entry.unmounting = true;
            let (dir, pgid, me) = (entry.dir.clone(), entry.pgid, self.me.clone());
            tokio::spawn(async move {
                // Nothing of the job may still hold them.
                if let Some(pgid) = pgid {
                    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                }
                crate::storage::unmount_all(&dir).await;
                let _ = me.send(Msg::Exited(key, status));
            });
            return;
        }
        let Some(c) = entry
            .meta
            .checkpoint
            .clone()
            .filter(|_| !entry.final_sync && entry.ended.is_none())
        else {
            return self.finish(&key, status);
        };
        entry.final_sync = true;
        let lock = entry.sync_lock.clone();
        let me = self.me.clone();
        tokio::spawn(async move {
            sync_now(&c, &key, &lock, "final").await;
            let _ = me.send(Msg::Synced(key, status));
        });
    }

    /// Syncs a job's checkpoint every interval while it runs.
    fn start_periodic_sync(&self, key: &JobKey) {
        let Some(e) = self.jobs.get(key) else { return };
        let Some(c) = e.meta.checkpoint.clone() else {
            return;
        };
        let (lock, mut ended) = (e.sync_lock.clone(), e.ended_tx.subscribe());
        let key = key.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(u64::from(c.interval_s))) => {}
                    _ = ended.changed() => return,
                }
                if ended.borrow().is_some() {
                    return;
                }
                sync_now(&c, &key, &lock, "periodic").await;
            }
        });
    }

    fn notice(&mut self, n: crate::preempt::Notice, done: oneshot::Sender<()>) {
        let mut waits = Vec::new();
        for (key, e) in &self.jobs {
            let (Some(pgid), None) = (e.pgid, &e.ended) else {
                continue;
            };
            let file = serde_json::json!({
                "kind": n.kind,
                "deadline_unix_ms": n.deadline_ms,
                "advisory": n.advisory,
            });
            if let Err(err) = write_json(&e.dir.join("preemption.json"), &file) {
                tracing::warn!(job = %key.job_id, error = %err, "cannot write the preemption file");
            }
            let signal = e
                .meta
                .checkpoint
                .as_ref()
                .map(|c| c.signal.as_str())
                .unwrap_or("SIGUSR1")
                .parse::<Signal>()
                .unwrap_or(Signal::SIGUSR1);
            tracing::warn!(job = %key.job_id, attempt = key.attempt, kind = %n.kind, ?signal, "preemption notice: telling the job");
            let _ = killpg(Pid::from_raw(pgid), signal);
            // Catch what it saves on the signal even if it keeps running.
            if let Some(c) = e.meta.checkpoint.clone() {
                let (lock, key) = (e.sync_lock.clone(), key.clone());
                let ended = e.ended_tx.subscribe();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    if ended.borrow().is_none() {
                        sync_now(&c, &key, &lock, "on notice").await;
                    }
                });
            }
            waits.push(e.ended_tx.subscribe());
        }
        tokio::spawn(async move {
            let all_ended = async {
                for mut w in waits {
                    let _ = w.wait_for(|v| v.is_some()).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(25), all_ended).await;
            let _ = done.send(());
        });
    }

    /// The job's main process is gone: work out how it ended.
    fn finish(&mut self, key: &JobKey, status: Option<std::process::ExitStatus>) {
        let Some(entry) = self.jobs.get(key) else {
            return;
        };
        if entry.ended.is_some() {
            return;
        }
        let dir = entry.dir.clone();
        let stopped = dir.join("stop").exists();
        let lost = fs::read_to_string(dir.join("lost")).ok();
        let result = fs::read_to_string(dir.join("result")).ok();
        let parsed = result.as_deref().and_then(|r| {
            let mut it = r.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse::<i32>().ok()?))
        });
        // Whatever the job left running in its group goes with it.
        if let Some(pgid) = entry.pgid {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        // And its container, should the wrapper have been killed before it.
        if let (Some(engine), Ok(name)) = (
            self.node.container_engine,
            fs::read_to_string(dir.join(crate::container::NAME_FILE)),
        ) {
            tokio::spawn(async move { crate::container::remove(engine, &name).await });
        }
        let (phase, code, message) = if let Some(why) = lost {
            (apb::JobPhase::Lost, None, why)
        } else if stopped {
            (
                apb::JobPhase::Cancelled,
                None,
                "stopped on request".to_string(),
            )
        } else {
            match (parsed, status.and_then(|s| s.signal())) {
                (Some((which, rc)), _) if which == "setup" && rc != 0 => (
                    apb::JobPhase::SetupFailed,
                    Some(rc),
                    format!("setup exited with {rc}"),
                ),
                (Some((_, rc)), _) => (apb::JobPhase::Exited, Some(rc), String::new()),
                (None, Some(sig)) => (
                    apb::JobPhase::Exited,
                    Some(128 + sig),
                    format!("killed by signal {sig}"),
                ),
                (None, None) => (
                    apb::JobPhase::Lost,
                    None,
                    "the job's processes vanished without an exit status".to_string(),
                ),
            }
        };
        self.record_end(key, phase, code, message);
    }

    fn record_end(
        &mut self,
        key: &JobKey,
        phase: apb::JobPhase,
        code: Option<i32>,
        message: String,
    ) {
        let Some(entry) = self.jobs.get_mut(key) else {
            return;
        };
        // A job that ends before it ran (a later mount failed, a stop) may
        // have mounted buckets already.
        let mounted = entry
            .dir
            .join(crate::storage::MOUNTS_FILE)
            .exists()
            .then(|| entry.dir.clone());
        // `persistent: false` buckets go with the job: now, unless a managed
        // job's attempt failed or was lost, when another attempt needs them.
        let over =
            phase == apb::JobPhase::Cancelled || phase == apb::JobPhase::Exited && code == Some(0);
        let may_run_again = entry.meta.replaced_if_lost && !over;
        let ephemeral = entry.ephemeral.take().filter(|_| !may_run_again);
        if mounted.is_some() || ephemeral.is_some() {
            tokio::spawn(async move {
                if let Some(dir) = mounted {
                    crate::storage::unmount_all(&dir).await;
                }
                if let Some(Ephemeral { buckets, env }) = ephemeral {
                    for b in buckets {
                        match crate::storage::rclone(
                            &["purge".into(), crate::storage::remote(&b)],
                            &env,
                        )
                        .await
                        {
                            Ok(()) => {
                                tracing::info!(bucket = %b, "bucket deleted (persistent: false)")
                            }
                            Err(e) => tracing::warn!(bucket = %b, error = %e, "bucket not deleted"),
                        }
                    }
                }
            });
        }
        let ended = Ended {
            phase: phase as i32,
            exit_code: code,
            message,
            at_ms: now_ms(),
            log_bytes: log_size(&entry.dir),
        };
        let _ = fs::create_dir_all(&entry.dir);
        let _ = write_json(&entry.dir.join("meta.json"), &entry.meta);
        if let Err(e) = write_json(&entry.dir.join("ended.json"), &ended) {
            tracing::warn!(error = %e, "cannot record job end");
        }
        tracing::info!(job = %key.job_id, attempt = key.attempt, phase = ?phase, code = ?code, "job ended");
        entry.ended_tx.send_replace(Some(ended.log_bytes));
        entry.ended = Some(ended);
        self.emit(key);
    }
}

async fn restore(c: &CkptMeta, job_id: &str, attempt: u32) -> Result<(), String> {
    let store = Checkpoints::open(&c.store, job_id, &c.store_env).map_err(|e| e.to_string())?;
    match store.restore(&c.dir, attempt).await {
        Ok(Some(m)) => {
            tracing::info!(
                job = job_id,
                attempt,
                from_attempt = m.epoch,
                seq = m.seq,
                files = m.files.len(),
                "checkpoint restored"
            );
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

async fn sync_now(c: &CkptMeta, key: &JobKey, lock: &tokio::sync::Mutex<()>, why: &str) {
    let _one_at_a_time = lock.lock().await;
    let result = async {
        let store = Checkpoints::open(&c.store, &key.job_id, &c.store_env)?;
        store.sync_next(&c.dir, key.attempt).await
    }
    .await;
    match result {
        Ok(Some(m)) => {
            tracing::info!(job = %key.job_id, attempt = key.attempt, seq = m.seq, files = m.files.len(), why, "checkpoint synced")
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(job = %key.job_id, attempt = key.attempt, error = %e, why, "checkpoint sync failed")
        }
    }
}

/// Accelerators as given on the command line: `H100:8,A100:1`.
pub fn parse_accelerators(s: &str) -> Result<BTreeMap<String, f64>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, count) = part.split_once(':').unwrap_or((part, "1"));
        let n: f64 = count
            .parse()
            .map_err(|_| format!("'{part}': count must be a number"))?;
        if !(n.is_finite() && n > 0.0) {
            return Err(format!("'{part}': count must be positive"));
        }
        out.insert(name.to_string(), n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, setup: &str, run: &str) -> apb::RunJob {
        apb::RunJob {
            job_id: id.into(),
            attempt: 1,
            setup: setup.into(),
            run: run.into(),
            env: [("GREETING".to_string(), "hi".to_string())].into(),
            ..Default::default()
        }
    }

    async fn ended(ev: &mut mpsc::UnboundedReceiver<Event>, id: &str) -> JobView {
        loop {
            let Some(Event::Report(v)) = ev.recv().await else {
                panic!("supervisor stopped")
            };
            if v.report.job_id == id && v.report.phase != apb::JobPhase::Started as i32 {
                return v;
            }
        }
    }

    #[tokio::test]
    async fn setup_then_run_with_env_and_exit_codes() {
        let d = tempfile::tempdir().unwrap();
        let (sup, mut ev) = Supervisor::start(d.path().to_path_buf(), NodeSetup::default());
        sup.run(job("1", "echo setting-up", "echo $GREETING; exit 3"));
        let v = ended(&mut ev, "1").await;
        assert_eq!(v.report.phase, apb::JobPhase::Exited as i32);
        assert_eq!(v.report.exit_code, Some(3));
        let log = fs::read_to_string(&v.log_path).unwrap();
        assert_eq!(log, "setting-up\nhi\n");
        assert_eq!(v.report.log_bytes, log.len() as u64);

        sup.run(job("2", "exit 5", "echo never"));
        let v = ended(&mut ev, "2").await;
        assert_eq!(v.report.phase, apb::JobPhase::SetupFailed as i32);
        assert_eq!(v.report.exit_code, Some(5));
        assert!(!fs::read_to_string(&v.log_path).unwrap().contains("never"));

        // A repeated RunJob for a known attempt does nothing.
        sup.run(job("1", "", "echo again"));
        let snap = sup.snapshot().await;
        assert_eq!(snap.len(), 2);
        assert_eq!(
            fs::read_to_string(&snap[0].log_path).unwrap(),
            "setting-up\nhi\n"
        );
    }

    #[tokio::test]
    async fn stopping_an_unknown_attempt_reports_it_cancelled() {
        let d = tempfile::tempdir().unwrap();
        let (sup, mut ev) = Supervisor::start(d.path().to_path_buf(), NodeSetup::default());
        sup.stop(apb::StopJob {
            job_id: "9".into(),
            attempt: 1,
            grace_ms: 10,
            term: 1,
        });
        let v = ended(&mut ev, "9").await;
        assert_eq!(v.report.phase, apb::JobPhase::Cancelled as i32);
    }

    #[test]
    fn accelerator_flags() {
        let a = parse_accelerators("H100:8, A100").unwrap();
        assert_eq!(a["H100"], 8.0);
        assert_eq!(a["A100"], 1.0);
        assert!(parse_accelerators("H100:-1").is_err());
        assert!(parse_accelerators("").unwrap().is_empty());
    }
}
