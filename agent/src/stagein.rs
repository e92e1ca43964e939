//! Data in, before `setup`: a job's uploaded workdir and local file mounts
//! (content-addressed, fetched from the coordinators over the agent's own
//! mTLS channel) and its bucket URIs (copied with object_store or HTTPS
//! ranges). Nothing is held whole in memory: blobs arrive in 4 MiB pieces
//! and objects in 8 MiB ranges, each written straight to its file.
//!
//! Like rsync without `--delete`, what is there already and unchanged is
//! kept: a record per destination (`<work dir>/synced/<id>.json`) says
//! which content each file got, and a file whose size and mtime still
//! match is not fetched again. Progress lines go to the job's output, so
//! the launching CLI shows them.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nembo_proto::agent::v1 as apb;
use nembo_proto::client::AgentTlsClient;
use nembo_proto::files::{Hasher, Kind, Manifest};
use object_store::{ObjectStore as _, ObjectStoreExt as _};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_stream::StreamExt;

/// Most digests asked in one FetchBlobs.
const BATCH: usize = 5_000;
/// How often a transfer reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long to wait for a coordinator connection before giving up.
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// What one job needs in place before it starts.
pub struct StageIn {
    /// The job (the coordinators hand blobs only for their own jobs).
    pub job_id: String,
    /// `file_mounts`, in order.
    pub mounts: Vec<apb::FileMount>,
    /// The uploaded workdir's manifest, if any: it lands in `work`.
    pub workdir_manifest: Option<String>,
    /// A git workdir (url, ref; "" = the default branch), cloned into `work`.
    pub workdir_git: Option<(String, String)>,
    /// The job's work dir (relative destinations, the workdir).
    pub work: PathBuf,
    /// Where records of what was synced are kept (`<agent work dir>/synced`).
    pub records: PathBuf,
    /// The job's environment: `AWS_*` for buckets, `HOME` for `~/`.
    pub env: BTreeMap<String, String>,
    /// The job's output, where progress is written.
    pub log: PathBuf,
}

/// Where a mount lands on the node: `~/...` below the job's `HOME` (else the
/// agent's), an absolute path as it is, anything else below `work`.
pub fn destination(d: &str, job_home: Option<&str>, work: &Path) -> PathBuf {
    if let Some(rest) = d.strip_prefix("~/") {
        let home = job_home
            .map(str::to_string)
            .or_else(|| std::env::var("HOME").ok())
            .unwrap_or_else(|| "/".into());
        return Path::new(&home).join(rest);
    }
    work.join(d)
}

/// The newest channel to the coordinators, kept by the session.
pub type Fetcher = watch::Receiver<Option<AgentTlsClient>>;

impl StageIn {
    /// Whether there is anything to do.
    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty() && self.workdir_manifest.is_none() && self.workdir_git.is_none()
    }

    /// Puts everything in place; the error names the mount and the cause.
    pub async fn run(&self, fetcher: Fetcher) -> Result<(), String> {
        if let Some((url, git_ref)) = &self.workdir_git {
            self.git_clone(url, git_ref)
                .await
                .map_err(|e| format!("workdir: {e}"))?;
        }
        if let Some(m) = &self.workdir_manifest {
            self.manifest_mount("workdir", m, &self.work, &fetcher)
                .await
                .map_err(|e| format!("workdir: {e}"))?;
        }
        for m in &self.mounts {
            let dst = self.destination(&m.destination);
            let what = format!("file_mounts.{}", m.destination);
            let result = match &m.source {
                _ if !m.bucket.is_empty() => self.storage_mount(&what, m, &dst, &fetcher).await,
                Some(apb::file_mount::Source::Manifest(d)) => {
                    self.manifest_mount(&what, d, &dst, &fetcher).await
                }
                Some(apb::file_mount::Source::Uri(uri)) => self.uri_mount(&what, uri, &dst).await,
                None => Err("no source".into()),
            };
            result.map_err(|e| format!("{what}: {e}"))?;
        }
        Ok(())
    }

    /// A storage object: its bucket made if the task named it, a local
    /// source uploaded into it (only what changed: the files are kept on the
    /// node, like any upload, and rclone sends what the bucket lacks), then
    /// mounted or copied in.
    async fn storage_mount(
        &self,
        what: &str,
        m: &apb::FileMount,
        dst: &Path,
        fetcher: &Fetcher,
    ) -> Result<(), String> {
        use crate::storage;
        let env = storage::rclone_env(&self.env);
        let remote = storage::remote(&m.bucket);
        if m.create_bucket {
            storage::rclone(&["mkdir".into(), remote.clone()], &env).await?;
        } else {
            // A mount of a bucket that is not there would look empty.
            storage::rclone(
                &[
                    "lsf".into(),
                    "--max-depth".into(),
                    "1".into(),
                    "--dirs-only".into(),
                    remote.clone(),
                ],
                &env,
            )
            .await
            .map_err(|e| format!("{} cannot be read: {e}", m.bucket))?;
        }
        if let Some(apb::file_mount::Source::Manifest(d)) = &m.source {
            let agent_dir = self.records.parent().unwrap_or(&self.records);
            let staged = agent_dir.join("storage").join(m.bucket.replace("://", "/"));
            self.manifest_mount(what, d, &staged, fetcher).await?;
            let started = Instant::now();
            storage::rclone(
                &["copy".into(), staged.display().to_string(), remote.clone()],
                &env,
            )
            .await?;
            self.say(&format!(
                "{what}: uploaded into {} in {:.1} s",
                m.bucket,
                started.elapsed().as_secs_f64()
            ));
        }
        let job_dir = self.log.parent().unwrap_or(&self.work);
        match m.mode() {
            apb::StorageMode::Copy | apb::StorageMode::Unspecified => {
                let started = Instant::now();
                storage::rclone(&["copy".into(), remote, dst.display().to_string()], &env).await?;
                self.say(&format!(
                    "{what}: copied {} in {:.1} s",
                    m.bucket,
                    started.elapsed().as_secs_f64()
                ));
            }
            mode => {
                let left_out = storage::mount(
                    &m.bucket,
                    dst,
                    mode,
                    m.read_only,
                    &m.rclone_options,
                    &env,
                    job_dir,
                )
                .await?;
                self.say(&format!(
                    "{what}: {} mounted ({}{})",
                    m.bucket,
                    if mode == apb::StorageMode::MountCached {
                        "MOUNT_CACHED"
                    } else {
                        "MOUNT"
                    },
                    if m.read_only { ", read-only" } else { "" }
                ));
                if !left_out.is_empty() {
                    self.say(&format!(
                        "{what}: left out {} (this node's rclone does not have them)",
                        left_out.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }

    /// Clones a git workdir into `work`, at `git_ref` if given. A private
    /// repository's credentials are the job's `GIT_TOKEN` (https, given to
    /// git through its environment, never an argv) or `GIT_SSH_KEY_PATH`.
    async fn git_clone(&self, url: &str, git_ref: &str) -> Result<(), String> {
        let started = Instant::now();
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
            ),
            ("GIT_TERMINAL_PROMPT".into(), "0".into()),
        ];
        if let Some(home) = self
            .env
            .get("HOME")
            .cloned()
            .or_else(|| std::env::var("HOME").ok())
        {
            env.push(("HOME".into(), home));
        }
        if let Some(token) = self
            .env
            .get("GIT_TOKEN")
            .filter(|_| url.starts_with("https://"))
        {
            use base64::Engine as _;
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
            env.extend([
                ("GIT_CONFIG_COUNT".into(), "1".into()),
                ("GIT_CONFIG_KEY_0".into(), "http.extraHeader".into()),
                (
                    "GIT_CONFIG_VALUE_0".into(),
                    format!("Authorization: Basic {basic}"),
                ),
            ]);
        }
        if let Some(key) = self.env.get("GIT_SSH_KEY_PATH") {
            env.push((
                "GIT_SSH_COMMAND".into(),
                format!(
                    "ssh -i '{}' -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new",
                    key.replace('\'', "")
                ),
            ));
        }
        let git = |args: Vec<String>| {
            let env = env.clone();
            async move {
                let out = tokio::process::Command::new("git")
                    .args(&args)
                    .env_clear()
                    .envs(env)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .await
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::NotFound => "needs git on the node".to_string(),
                        _ => format!("git: {e}"),
                    })?;
                if out.status.success() {
                    return Ok(());
                }
                let err = String::from_utf8_lossy(&out.stderr);
                Err(format!(
                    "git {} failed: {}",
                    args.iter()
                        .find(|a| !a.starts_with('-'))
                        .map_or("", String::as_str),
                    err.lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .unwrap_or_default()
                        .trim()
                ))
            }
        };
        let work = self.work.display().to_string();
        git(vec![
            "clone".into(),
            "--quiet".into(),
            "--".into(),
            url.into(),
            work.clone(),
        ])
        .await?;
        if !git_ref.is_empty() {
            git(vec![
                "-C".into(),
                work,
                "checkout".into(),
                "--quiet".into(),
                "--detach".into(),
                git_ref.into(),
                "--".into(),
            ])
            .await?;
        }
        self.say(&format!(
            "workdir: cloned {url}{} in {:.1} s",
            if git_ref.is_empty() {
                String::new()
            } else {
                format!(" at {git_ref}")
            },
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// Absolute, `~/...` (the job's HOME), or below the work dir.
    fn destination(&self, d: &str) -> PathBuf {
        destination(d, self.env.get("HOME").map(String::as_str), &self.work)
    }

    fn say(&self, line: &str) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
        {
            let _ = writeln!(f, "nembo: {line}");
        }
    }

    async fn manifest_mount(
        &self,
        what: &str,
        digest: &str,
        dst: &Path,
        fetcher: &Fetcher,
    ) -> Result<(), String> {
        let client = client(fetcher).await?;
        let manifest = self.fetch_manifest(client.clone(), digest).await?;
        let record_path = self.records.join(format!(
            "{}.json",
            nembo_proto::files::digest(dst.as_os_str().as_encoded_bytes())
        ));
        let mut record: Record = std::fs::read(&record_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let target = |rel: &str| {
            if manifest.single_file {
                dst.to_path_buf()
            } else {
                dst.join(rel)
            }
        };
        let root = if manifest.single_file {
            dst.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            dst.to_path_buf()
        };
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        // Directories and links first; files that are not already in place
        // are gathered by content (one fetch for identical files).
        let mut wanted: BTreeMap<String, Vec<(PathBuf, u32)>> = BTreeMap::new();
        let mut kept = 0usize;
        for e in &manifest.entries {
            let path = target(&e.path);
            match &e.kind {
                Kind::Dir => {
                    std::fs::create_dir_all(&path)
                        .and_then(|()| {
                            std::fs::set_permissions(
                                &path,
                                std::fs::Permissions::from_mode(e.mode | 0o700),
                            )
                        })
                        .map_err(|err| format!("{}: {err}", path.display()))?;
                }
                Kind::Symlink { target } => {
                    if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_dir()) {
                        let _ = std::fs::remove_file(&path);
                    }
                    std::os::unix::fs::symlink(target, &path)
                        .map_err(|err| format!("{}: {err}", path.display()))?;
                }
                Kind::File { digest, .. } => {
                    if record.unchanged_path(&path, digest) {
                        kept += 1;
                        let _ = std::fs::set_permissions(
                            &path,
                            std::fs::Permissions::from_mode(e.mode),
                        );
                        continue;
                    }
                    wanted
                        .entry(digest.clone())
                        .or_default()
                        .push((path, e.mode));
                }
            }
        }
        let files: usize = wanted.values().map(Vec::len).sum();
        let bytes: u64 = manifest
            .entries
            .iter()
            .filter_map(|e| match &e.kind {
                Kind::File { size, digest } if wanted.contains_key(digest) => Some(*size),
                _ => None,
            })
            .sum();
        let started = Instant::now();
        let mut progress = Progress::new(what, files, bytes);
        let digests: Vec<String> = wanted.keys().cloned().collect();
        for batch in digests.chunks(BATCH) {
            let mut c = client.clone();
            let req = apb::FetchBlobsRequest {
                job_id: self.job_id.clone(),
                digests: batch.to_vec(),
                takes_whole_blobs: true,
            };
            let mut stream = c
                .fetch_blobs(req)
                .await
                .map_err(|s| s.message().to_string())?
                .into_inner();
            let mut open: Option<Writing> = None;
            while let Some(piece) = stream.next().await {
                let piece = piece.map_err(|s| s.message().to_string())?;
                if !piece.whole.is_empty() && open.is_some() {
                    return Err("whole blobs sent inside another blob's pieces".into());
                }
                for blob in piece.whole {
                    let places = wanted
                        .get(&blob.digest)
                        .ok_or_else(|| format!("sent blob {} not asked for", blob.digest))?;
                    let mut w = Writing::start(&blob.digest, &places[0].0)?;
                    w.write(&blob.data)?;
                    progress.bytes(blob.data.len() as u64, |l| self.say(l));
                    w.finish(places, &mut record)?;
                    progress.files(places.len());
                }
                if piece.digest.is_empty() {
                    continue;
                }
                let w = match open.as_mut() {
                    Some(w) if w.digest == piece.digest => w,
                    _ => {
                        let places = wanted
                            .get(&piece.digest)
                            .ok_or_else(|| format!("sent blob {} not asked for", piece.digest))?;
                        open.insert(Writing::start(&piece.digest, &places[0].0)?)
                    }
                };
                w.write(&piece.data)?;
                progress.bytes(piece.data.len() as u64, |l| self.say(l));
                if piece.last {
                    let done = open.take().ok_or("no blob open")?;
                    let places = &wanted[&done.digest];
                    done.finish(places, &mut record)?;
                    progress.files(places.len());
                }
            }
        }
        for (digest, places) in &wanted {
            for (path, _) in places {
                if !record.unchanged_path(path, digest) {
                    return Err(format!("{}: not sent by the coordinators", path.display()));
                }
            }
        }
        record.save(&record_path);
        self.say(&format!(
            "{what}: {} files ({}) in {:.1} s, {kept} unchanged",
            files,
            human(bytes),
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    async fn fetch_manifest(
        &self,
        mut c: AgentTlsClient,
        digest: &str,
    ) -> Result<Manifest, String> {
        let mut stream = c
            .fetch_blobs(apb::FetchBlobsRequest {
                job_id: self.job_id.clone(),
                digests: vec![digest.to_string()],
                // Read as one stream of pieces, however small.
                takes_whole_blobs: false,
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|s| s.message().to_string())?;
            bytes.extend_from_slice(&piece.data);
            if bytes.len() as u64 > nembo_proto::files::MAX_MANIFEST_BYTES {
                return Err("manifest too large".into());
            }
        }
        if nembo_proto::files::digest(&bytes) != digest {
            return Err(format!("manifest {digest}: content does not match"));
        }
        Manifest::decode(&bytes)
    }

    async fn uri_mount(&self, what: &str, uri: &str, dst: &Path) -> Result<(), String> {
        if uri.starts_with("s3://") || uri.starts_with("r2://") {
            self.s3_mount(what, uri, dst).await
        } else {
            self.https_mount(what, uri, dst).await
        }
    }

    /// Every object under the prefix, copied below `dst`; a URI naming one
    /// object is copied to `dst` itself.
    async fn s3_mount(&self, what: &str, uri: &str, dst: &Path) -> Result<(), String> {
        let (store, prefix) = crate::s3::open(uri, &self.env)?;
        let prefix_path = object_store::path::Path::from(prefix.as_str());
        let mut objects = Vec::new();
        // A URI naming one object: listing treats the prefix as a directory.
        if !prefix.is_empty() {
            if let Ok(one) = store.head(&prefix_path).await {
                objects.push(one);
            }
        }
        let mut listing = store.list(Some(&prefix_path));
        while let Some(o) = listing.next().await {
            let o = o.map_err(|e| format!("{uri}: {e}"))?;
            objects.push(o);
        }
        if objects.is_empty() {
            return Err(format!("{uri}: no such object or prefix"));
        }
        let single = objects.len() == 1 && objects[0].location == prefix_path;
        let bytes: u64 = objects.iter().map(|o| o.size).sum();
        let started = Instant::now();
        let mut progress = Progress::new(what, objects.len(), bytes);
        for o in &objects {
            let target = if single {
                dst.to_path_buf()
            } else {
                let rel = o
                    .location
                    .as_ref()
                    .strip_prefix(prefix.as_str())
                    .unwrap_or(o.location.as_ref())
                    .trim_start_matches('/');
                if rel
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == "..")
                {
                    return Err(format!(
                        "{uri}: object key '{}' cannot be a path",
                        o.location
                    ));
                }
                dst.join(rel)
            };
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("{}: {e}", parent.display()))?;
            }
            let tmp = tmp_beside(&target);
            crate::checkpoint::get_object(&store, &o.location, &tmp, o.size)
                .await
                .map_err(|e| format!("{}: {e}", o.location))?;
            std::fs::rename(&tmp, &target).map_err(|e| format!("{}: {e}", target.display()))?;
            progress.bytes(o.size, |l| self.say(l));
            progress.files(1);
        }
        self.say(&format!(
            "{what}: {} objects ({}) from {uri} in {:.1} s",
            objects.len(),
            human(bytes),
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// One file over HTTPS, read in ranges when the server allows them.
    async fn https_mount(&self, what: &str, uri: &str, dst: &Path) -> Result<(), String> {
        const RANGE: u64 = 8 << 20;
        let client = nembo_proto::http::HttpClient::default();
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let tmp = tmp_beside(dst);
        let mut out = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let started = Instant::now();
        let mut at = 0u64;
        loop {
            let req = http::Request::get(uri)
                .header(
                    http::header::RANGE,
                    format!("bytes={at}-{}", at + RANGE - 1),
                )
                .body(bytes::Bytes::new())
                .map_err(|e| e.to_string())?;
            let resp = client.send(req).await.map_err(|e| e.to_string())?;
            match resp.status {
                206 => {}
                200 if at == 0 => {
                    out.write_all(&resp.body).map_err(|e| e.to_string())?;
                    at = resp.body.len() as u64;
                    break;
                }
                416 if at > 0 => break,
                s => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(format!("{uri}: HTTP {s}"));
                }
            }
            out.write_all(&resp.body).map_err(|e| e.to_string())?;
            at += resp.body.len() as u64;
            if (resp.body.len() as u64) < RANGE {
                break;
            }
        }
        out.sync_data().map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, dst).map_err(|e| format!("{}: {e}", dst.display()))?;
        self.say(&format!(
            "{what}: {} from {uri} in {:.1} s",
            human(at),
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }
}

async fn client(fetcher: &Fetcher) -> Result<AgentTlsClient, String> {
    let mut f = fetcher.clone();
    let got = tokio::time::timeout(CONNECT_WAIT, f.wait_for(Option::is_some))
        .await
        .map_err(|_| "no connection to a coordinator to fetch files from".to_string())?
        .map_err(|_| "the agent is stopping".to_string())?;
    got.clone().ok_or_else(|| "no connection".into())
}

fn tmp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.nembo-part"))
}

/// One blob being written to its first place.
struct Writing {
    digest: String,
    hasher: Hasher,
    file: std::fs::File,
    tmp: PathBuf,
}

impl Writing {
    /// The file's directory exists: a manifest lists parents first.
    fn start(digest: &str, path: &Path) -> Result<Writing, String> {
        let tmp = tmp_beside(path);
        let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        Ok(Writing {
            digest: digest.to_string(),
            hasher: Hasher::default(),
            file,
            tmp,
        })
    }

    fn write(&mut self, data: &[u8]) -> Result<(), String> {
        self.hasher.update(data);
        self.file
            .write_all(data)
            .map_err(|e| format!("{}: {e}", self.tmp.display()))
    }

    /// Checks the content, puts it at every place that wants it, and
    /// notes each in `record`.
    fn finish(self, places: &[(PathBuf, u32)], record: &mut Record) -> Result<(), String> {
        let got = self.hasher.finish();
        if got != self.digest {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(format!(
                "{}: content hashes to {got}, not {}",
                places[0].0.display(),
                self.digest
            ));
        }
        let (first, mode) = &places[0];
        // Through the open file, not its path again: with ten thousand
        // small files every lookup counts. A rename keeps the mtime.
        let meta = self
            .file
            .set_permissions(std::fs::Permissions::from_mode(*mode))
            .and_then(|()| self.file.metadata())
            .and_then(|meta| std::fs::rename(&self.tmp, first).map(|()| meta))
            .map_err(|e| format!("{}: {e}", first.display()))?;
        record.set(first, &self.digest, &meta);
        // Beside, then renamed in: a link left at the place is replaced,
        // never written through.
        for (path, mode) in &places[1..] {
            let tmp = tmp_beside(path);
            let meta = std::fs::copy(first, &tmp)
                .and_then(|_| {
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(*mode))
                })
                .and_then(|()| std::fs::symlink_metadata(&tmp))
                .and_then(|meta| std::fs::rename(&tmp, path).map(|()| meta))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            record.set(path, &self.digest, &meta);
        }
        Ok(())
    }
}

/// What a destination's files last received: path -> content, size, mtime.
#[derive(Default, Serialize, Deserialize)]
struct Record {
    files: HashMap<PathBuf, (String, u64, i128)>,
}

impl Record {
    fn stamp(path: &Path) -> Option<(u64, i128)> {
        Self::stamp_of(&std::fs::symlink_metadata(path).ok()?)
    }

    fn stamp_of(m: &std::fs::Metadata) -> Option<(u64, i128)> {
        if !m.is_file() {
            return None;
        }
        let mtime = m
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_nanos() as i128;
        Some((m.len(), mtime))
    }

    /// The file at `path` still holds `digest`, untouched since it was written.
    fn unchanged_path(&self, path: &Path, digest: &str) -> bool {
        match (self.files.get(path), Self::stamp(path)) {
            (Some((d, size, mtime)), Some((s, m))) => d == digest && *size == s && *mtime == m,
            _ => false,
        }
    }

    /// `path` now holds `digest`, and looks like `meta`.
    fn set(&mut self, path: &Path, digest: &str, meta: &std::fs::Metadata) {
        if let Some((size, mtime)) = Self::stamp_of(meta) {
            self.files
                .insert(path.to_path_buf(), (digest.to_string(), size, mtime));
        }
    }

    fn save(&self, path: &Path) {
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, serde_json::to_vec(self).unwrap_or_default()).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

/// Progress lines, at most one a second.
struct Progress<'a> {
    what: &'a str,
    files: (usize, usize),
    bytes: (u64, u64),
    started: Instant,
    said: Instant,
}

impl<'a> Progress<'a> {
    fn new(what: &'a str, files: usize, bytes: u64) -> Self {
        let now = Instant::now();
        Progress {
            what,
            files: (0, files),
            bytes: (0, bytes),
            started: now,
            said: now,
        }
    }

    fn files(&mut self, n: usize) {
        self.files.0 += n;
    }

    fn bytes(&mut self, n: u64, say: impl FnOnce(&str)) {
        self.bytes.0 += n;
        if self.said.elapsed() >= PROGRESS_EVERY {
            self.said = Instant::now();
            let rate = self.bytes.0 as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
            say(&format!(
                "{}: {}/{} files, {}/{}, {}/s",
                self.what,
                self.files.0,
                self.files.1,
                human(self.bytes.0),
                human(self.bytes.1),
                human(rate as u64)
            ));
        }
    }
}

/// `1.5 GB`, `12.0 MB`, `300 B`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}
