//! Local sources of a task (its `workdir` and local `file_mounts`), shipped
//! before it is submitted: each is described by a manifest (every entry,
//! each file by its BLAKE3 digest), and only the contents the cluster lacks are
//! sent (FindMissingBlobs, then PutBlobs). Ignore files apply as in
//! SkyPilot: `.skyignore` at the source's root if there is one (in every
//! directory below it too), else `.gitignore` and `.git/info/exclude`.
//!
//! Hashes are cached per file (`~/.nembo/hashes.json`, keyed by path, size,
//! mtime and inode), so a relaunch reads only what changed.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nembo_proto::client::Client;
use nembo_proto::files::{
    Entry, Hasher, Kind, Manifest, WholeBatch, MAX_BYTES, MAX_ENTRIES, PIECE_BYTES, WHOLE_MAX,
};
use nembo_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::connect;

/// A local source named by the task, ready to ship.
pub struct Source {
    /// As the task names it (the key of `uploads`).
    pub named: String,
    /// Where it is.
    pub path: PathBuf,
    /// What it holds.
    pub manifest: Manifest,
    /// Its files on disk by content: digest -> (a path holding it, size).
    files: BTreeMap<String, (PathBuf, u64)>,
}

/// The local sources of a task (as parsed: `$VAR`s expanded), with their
/// manifests.
pub fn local_sources(spec: &nembo_domain::task::TaskSpec) -> Result<Vec<Source>> {
    // (field, source as named)
    let mut named: Vec<(String, String)> = Vec::new();
    if let Some(w) = &spec.workdir {
        named.push(("workdir".into(), w.clone()));
    }
    for (dst, src) in &spec.file_mounts {
        if let Some((path, _)) = src.local() {
            named.push((format!("file_mounts.{dst}"), path.to_string()));
        }
    }
    let mut cache = HashCache::load();
    let mut out: Vec<Source> = Vec::new();
    let (mut entries, mut bytes) = (0usize, 0u64);
    for (field, n) in named {
        if out.iter().any(|s| s.named == n) {
            continue;
        }
        let path = resolve(&n)?;
        refuse_whole_machine(&field, &n, &path)?;
        let source = describe(&n, &path, &mut cache)?;
        entries += source.manifest.entries.len();
        bytes += source.manifest.bytes();
        if entries > MAX_ENTRIES || bytes > MAX_BYTES {
            bail!(
                "the task's local sources hold {entries} entries and {:.1} GB; the limit is \
                 {MAX_ENTRIES} entries and {} GiB (put data sets in a bucket, or list what to \
                 leave out in .skyignore)",
                bytes as f64 / 1e9,
                MAX_BYTES >> 30
            );
        }
        out.push(source);
    }
    cache.save();
    Ok(out)
}

/// A source that is the machine or a home rather than a project: shipping
/// it is always a mistake (and `/` would carry every key on the machine).
fn refuse_whole_machine(field: &str, named: &str, path: &Path) -> Result<()> {
    let real = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if real == Path::new("/") {
        bail!("{field}: '{named}' is the root directory: it would ship the whole machine");
    }
    if ["/proc", "/sys", "/dev"]
        .iter()
        .any(|p| real.starts_with(p))
    {
        bail!("{field}: '{named}' is a system directory, not files to ship");
    }
    if std::env::var_os("HOME").is_some_and(|h| real == Path::new(&h)) {
        bail!("{field}: '{named}' is a home directory itself; name the project's directory");
    }
    Ok(())
}

/// `~/x` from the home, a relative path from the current directory.
fn resolve(named: &str) -> Result<PathBuf> {
    let p = match named.strip_prefix("~/") {
        Some(rest) => {
            let home = std::env::var_os("HOME").context("HOME is not set")?;
            PathBuf::from(home).join(rest)
        }
        None if named == "~" => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?),
        None => {
            let p = PathBuf::from(named);
            if p.is_absolute() {
                p
            } else {
                std::env::current_dir()?.join(p)
            }
        }
    };
    if std::fs::symlink_metadata(&p).is_err() {
        bail!("file mount source {} does not exist locally", p.display());
    }
    Ok(p)
}

fn describe(named: &str, path: &Path, cache: &mut HashCache) -> Result<Source> {
    let meta = std::fs::metadata(path).with_context(|| path.display().to_string())?;
    let mut files = BTreeMap::new();
    let mut entries = Vec::new();
    let mut to_digest = Vec::new();
    if meta.is_file() {
        let digest = cache.digest(path, &meta)?;
        files.insert(digest.clone(), (path.to_path_buf(), meta.len()));
        entries.push(Entry {
            path: String::new(),
            mode: meta.permissions().mode() & 0o7777,
            kind: Kind::File {
                size: meta.len(),
                digest,
            },
        });
        let manifest = Manifest {
            single_file: true,
            entries,
        };
        return Ok(Source {
            named: named.to_string(),
            path: path.to_path_buf(),
            manifest,
            files,
        });
    }
    let mut walk = ignore::WalkBuilder::new(path);
    walk.hidden(false)
        .parents(false)
        .ignore(false)
        .git_global(false)
        .follow_links(false)
        .sort_by_file_name(|a, b| a.cmp(b));
    if path.join(".skyignore").is_file() {
        walk.git_ignore(false)
            .git_exclude(false)
            .add_custom_ignore_filename(".skyignore");
    } else {
        walk.git_ignore(true).git_exclude(true).require_git(false);
    }
    for item in walk.build() {
        let item = item.with_context(|| format!("reading {}", path.display()))?;
        if item.depth() == 0 {
            continue;
        }
        let rel = item
            .path()
            .strip_prefix(path)
            .unwrap_or(item.path())
            .to_str()
            .with_context(|| format!("{}: not UTF-8", item.path().display()))?
            .to_string();
        let meta = std::fs::symlink_metadata(item.path())
            .with_context(|| item.path().display().to_string())?;
        let mode = meta.permissions().mode() & 0o7777;
        let kind = if meta.is_dir() {
            Kind::Dir
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(item.path())?;
            Kind::Symlink {
                target: target
                    .to_str()
                    .with_context(|| format!("{}: link not UTF-8", item.path().display()))?
                    .to_string(),
            }
        } else if meta.is_file() {
            // Digested below, all at once.
            to_digest.push((entries.len(), item.path().to_path_buf(), meta.clone()));
            Kind::File {
                size: meta.len(),
                digest: String::new(),
            }
        } else {
            eprintln!(
                "(skipping {}: not a file, directory or link)",
                item.path().display()
            );
            continue;
        };
        entries.push(Entry {
            path: rel,
            mode,
            kind,
        });
        if entries.len() > MAX_ENTRIES {
            bail!(
                "{}: more than {MAX_ENTRIES} entries (list what to leave out in .skyignore)",
                path.display()
            );
        }
    }
    let digests = cache.digest_all(&to_digest)?;
    for ((at, path, meta), digest) in to_digest.into_iter().zip(digests) {
        files
            .entry(digest.clone())
            .or_insert_with(|| (path, meta.len()));
        if let Kind::File { digest: d, .. } = &mut entries[at].kind {
            *d = digest;
        }
    }
    let manifest = Manifest {
        single_file: false,
        entries,
    };
    manifest
        .check()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(Source {
        named: named.to_string(),
        path: path.to_path_buf(),
        manifest,
        files,
    })
}

/// What [`ship`] did: `uploads` for the submission, and the upload of the
/// files, when it goes on while the job is submitted and scheduled.
pub struct Shipped {
    /// Source as named -> its manifest's digest.
    pub uploads: HashMap<String, String>,
    /// The files' upload, announced to the coordinators: the job may be
    /// submitted before it ends (its nodes wait for what it brings), and
    /// the client must see it through.
    pub rest: Option<tokio::task::JoinHandle<Result<()>>>,
}

/// Sends what the cluster lacks. The manifests go first; where the
/// coordinators wait for announced uploads, the files then go on in the
/// background (`rest`), so that the upload overlaps the job's scheduling,
/// provisioning and the node's own fetch.
pub async fn ship(client: &Client, sources: &[Source]) -> Result<Shipped> {
    let mut uploads = HashMap::new();
    if sources.is_empty() {
        return Ok(Shipped {
            uploads,
            rest: None,
        });
    }
    // Every blob: each manifest, and every file, by digest.
    let mut blobs: BTreeMap<String, Blob> = BTreeMap::new();
    for s in sources {
        let bytes = s.manifest.encode();
        let digest = nembo_proto::files::digest(&bytes);
        uploads.insert(s.named.clone(), digest.clone());
        blobs.insert(digest, Blob::Bytes(bytes));
        for (d, (path, size)) in &s.files {
            blobs
                .entry(d.clone())
                .or_insert_with(|| Blob::File(path.clone(), *size));
        }
    }
    let req = pb::FindMissingBlobsRequest {
        digests: blobs.keys().cloned().collect(),
        announce: true,
    };
    let found = connect::call(client, req, |mut c, r| async move {
        c.find_missing_blobs(r).await
    })
    .await?;
    let (files, bytes): (usize, u64) = sources.iter().fold((0, 0), |(f, b), s| {
        (f + s.manifest.files().count(), b + s.manifest.bytes())
    });
    let todo: Vec<(String, Blob)> = found
        .missing
        .into_iter()
        .filter_map(|d| blobs.remove(&d).map(|b| (d, b)))
        .collect();
    for s in sources {
        eprintln!(
            "Local source {} ({}): {} files, {:.1} MB.",
            s.named,
            s.path.display(),
            s.manifest.files().count(),
            s.manifest.bytes() as f64 / 1e6
        );
    }
    if todo.is_empty() {
        eprintln!(
            "Uploaded nothing: the cluster holds all {files} files ({:.1} MB).",
            bytes as f64 / 1e6
        );
        return Ok(Shipped {
            uploads,
            rest: None,
        });
    }
    let upload = Upload {
        client: client.clone(),
        takes_whole: found.takes_whole_blobs,
        of_files: files,
    };
    if found.upload_id.is_empty() {
        upload.send(todo, String::new()).await?;
        return Ok(Shipped {
            uploads,
            rest: None,
        });
    }
    let (manifests, contents): (Vec<_>, Vec<_>) = todo
        .into_iter()
        .partition(|(_, b)| matches!(b, Blob::Bytes(_)));
    if !manifests.is_empty() {
        upload.quiet().send(manifests, String::new()).await?;
    }
    let id = found.upload_id;
    let rest = tokio::spawn(async move { upload.send(contents, id).await });
    Ok(Shipped {
        uploads,
        rest: Some(rest),
    })
}

/// One PutBlobs: where to, and what to say.
struct Upload {
    client: Client,
    takes_whole: bool,
    /// The sources' files in all, for the summary line (0: no lines).
    of_files: usize,
}

impl Upload {
    fn quiet(&self) -> Upload {
        Upload {
            client: self.client.clone(),
            takes_whole: self.takes_whole,
            of_files: 0,
        }
    }

    /// Sends `todo`, carrying the announced upload `upload_id` if any.
    async fn send(self, todo: Vec<(String, Blob)>, upload_id: String) -> Result<()> {
        let say = self.of_files > 0;
        let takes_whole = self.takes_whole;
        let started = Instant::now();
        let count = todo.len();
        let send_bytes: u64 = todo.iter().map(|(_, b)| b.size()).sum();
        let new_files = todo
            .iter()
            .filter(|(_, b)| matches!(b, Blob::File(..)))
            .count();
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::PutBlobsRequest>(4);
        let reader = tokio::task::spawn_blocking(move || -> Result<()> {
            let mut sent = 0u64;
            let mut said = Instant::now();
            let mut small = WholeBatch::default();
            let mut upload_id = Some(upload_id);
            let mut put = |mut piece: pb::PutBlobsRequest| {
                piece.upload_id = upload_id.take().unwrap_or_default();
                tx.blocking_send(piece)
                    .map_err(|_| anyhow::anyhow!("the upload was cut off"))
            };
            for (i, (digest, blob)) in todo.into_iter().enumerate() {
                if say && said.elapsed().as_secs_f64() >= 1.0 {
                    said = Instant::now();
                    eprintln!(
                        "  uploading: {}/{count} files, {:.1}/{:.1} MB, {:.1} MB/s",
                        i,
                        sent as f64 / 1e6,
                        send_bytes as f64 / 1e6,
                        sent as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-3)
                    );
                }
                let size = blob.size();
                if let (true, Blob::File(path, _)) = (takes_whole && size <= WHOLE_MAX, &blob) {
                    let data = std::fs::read(path).with_context(|| path.display().to_string())?;
                    if data.len() as u64 != size {
                        bail!("{} changed while it was uploaded", path.display());
                    }
                    sent += size;
                    if let Some(whole) = small.push(digest, data) {
                        put(pb::PutBlobsRequest {
                            whole,
                            ..Default::default()
                        })?;
                    }
                    continue;
                }
                // Whatever small blobs are gathered go first: a message holds
                // either those or a piece.
                if let Some(whole) = small.take() {
                    put(pb::PutBlobsRequest {
                        whole,
                        ..Default::default()
                    })?;
                }
                let mut first = true;
                let mut send = |data: Vec<u8>, last: bool| -> Result<()> {
                    sent += data.len() as u64;
                    let piece = pb::PutBlobsRequest {
                        digest: if first { digest.clone() } else { String::new() },
                        size: if first { size } else { 0 },
                        data,
                        last,
                        ..Default::default()
                    };
                    first = false;
                    put(piece)
                };
                match blob {
                    // A manifest of many entries is larger than one message.
                    Blob::Bytes(b) => {
                        let mut pieces = b.chunks(PIECE_BYTES).peekable();
                        if pieces.peek().is_none() {
                            send(Vec::new(), true)?;
                        }
                        while let Some(p) = pieces.next() {
                            send(p.to_vec(), pieces.peek().is_none())?;
                        }
                    }
                    Blob::File(path, _) => {
                        let mut f = std::fs::File::open(&path)
                            .with_context(|| path.display().to_string())?;
                        let mut done = 0u64;
                        loop {
                            // Sized to what is left: a small file costs a small buffer.
                            let want = (size.saturating_sub(done)).min(PIECE_BYTES as u64) as usize;
                            let mut buf = vec![0u8; want];
                            let n = nembo_proto::files::read_full(&mut f, &mut buf)?;
                            buf.truncate(n);
                            done += n as u64;
                            let last = done >= size || n == 0;
                            send(buf, last)?;
                            if last {
                                break;
                            }
                        }
                        if done != size || f.read(&mut [0u8; 1])? != 0 {
                            bail!("{} changed while it was uploaded", path.display());
                        }
                    }
                }
            }
            if let Some(whole) = small.take() {
                put(pb::PutBlobsRequest {
                    whole,
                    ..Default::default()
                })?;
            }
            Ok(())
        });
        let mut c = self.client.clone();
        let put = c
            .put_blobs(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        // The coordinators' answer says why an upload stopped, when they stopped it.
        let put = put
            .map_err(|s| anyhow::anyhow!("upload: {}", s.message()))?
            .into_inner();
        reader.await.context("upload reader")??;
        if say {
            eprintln!(
                "Uploaded {new_files} new or changed contents of {} files ({:.1} MB, {} blobs) in {:.1} s.",
                self.of_files,
                put.bytes as f64 / 1e6,
                put.blobs,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }
}

enum Blob {
    Bytes(Vec<u8>),
    File(PathBuf, u64),
}

impl Blob {
    fn size(&self) -> u64 {
        match self {
            Blob::Bytes(b) => b.len() as u64,
            Blob::File(_, s) => *s,
        }
    }
}

/// The digest of the file at `path`, read through `buf`.
fn hash_file(path: &Path, len: u64, buf: &mut Vec<u8>) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut h = Hasher::default();
    // Sized to the file, and kept between files: ten thousand small files
    // must not cost ten thousand megabyte buffers.
    buf.resize((len as usize).clamp(4096, 1 << 20), 0);
    loop {
        match f.read(buf)? {
            0 => break,
            n => h.update(&buf[..n]),
        }
    }
    Ok(h.finish())
}

/// What [`nembo_proto::files::digest`] computes.
const DIGEST: &str = "blake3";

/// Digests of files already read, by where they are and how they look.
#[derive(Default, Serialize, Deserialize)]
struct HashCache {
    /// The digest the cache holds: a cache of another is dropped whole.
    #[serde(default)]
    algorithm: String,
    #[serde(default)]
    files: HashMap<PathBuf, (u64, i64, u64, String)>,
    #[serde(skip)]
    path: Option<PathBuf>,
    #[serde(skip)]
    changed: bool,
}

impl HashCache {
    fn load() -> HashCache {
        let path = connect::nembo_home().ok().map(|h| h.join("hashes.json"));
        let mut cache: HashCache = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<HashCache>(&b).ok())
            .filter(|c| c.algorithm == DIGEST)
            .unwrap_or_default();
        cache.algorithm = DIGEST.into();
        cache.path = path;
        cache
    }

    fn digest(&mut self, path: &Path, meta: &std::fs::Metadata) -> Result<String> {
        let item = (0, path.to_path_buf(), meta.clone());
        Ok(self.digest_all(std::slice::from_ref(&item))?.remove(0))
    }

    /// The digests of `files` (anything, path, how it looked), in order:
    /// from the cache where it still holds, else read, on every core.
    fn digest_all<T: Sync>(
        &mut self,
        files: &[(T, PathBuf, std::fs::Metadata)],
    ) -> Result<Vec<String>> {
        let stamp = |meta: &std::fs::Metadata| {
            (
                meta.len(),
                meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
                meta.ino(),
            )
        };
        let mut out: Vec<Option<String>> = files
            .iter()
            .map(|(_, path, meta)| {
                self.files
                    .get(path)
                    .filter(|(size, mtime, ino, _)| (*size, *mtime, *ino) == stamp(meta))
                    .map(|(.., d)| d.clone())
            })
            .collect();
        let todo: Vec<usize> = (0..files.len()).filter(|i| out[*i].is_none()).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8)
            .min(todo.len().max(1));
        let read: Vec<Vec<(usize, Result<String>)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        let mut buf = Vec::new();
                        loop {
                            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&i) = todo.get(k) else {
                                return done;
                            };
                            let (_, path, meta) = &files[i];
                            done.push((i, hash_file(path, meta.len(), &mut buf)));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        for (i, d) in read.into_iter().flatten() {
            let d = d?;
            let (_, path, meta) = &files[i];
            let (size, mtime, ino) = stamp(meta);
            self.files
                .insert(path.clone(), (size, mtime, ino, d.clone()));
            self.changed = true;
            out[i] = Some(d);
        }
        out.into_iter()
            .map(|d| d.context("a file was not digested"))
            .collect()
    }

    fn save(&mut self) {
        let Some(path) = self.path.clone() else {
            return;
        };
        if !self.changed {
            return;
        }
        // Files that are gone are forgotten, so the cache follows the tree.
        self.files.retain(|p, _| p.exists());
        let path = &path;
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, serde_json::to_vec(self).unwrap_or_default()).is_ok() {
            let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600));
            let _ = std::fs::rename(&tmp, path);
        }
    }
}
