//! Checkpoint sync: a job's checkpoint directory copied to object storage
//! (object_store), and restored before the job's next attempt.
//!
//! Layout under the task's store, per job:
//!
//! ```text
//! <store>/job-<id>/data/<epoch>-<seq>-<nonce>/<f>  the files of one sync
//! <store>/job-<id>/manifests/<epoch>-<seq>.json   written last, create-only
//! ```
//!
//! A sync is complete only once its manifest exists. The epoch is the
//! attempt number, which Raft makes monotonic per job. A sync first checks
//! that no manifest of a newer epoch exists and refuses if one does, and a
//! manifest is written with `PutMode::Create`, so a stale attempt can never
//! overwrite or follow a newer one. Restore takes the newest manifest of an
//! older epoch.
//!
//! Files are never held whole: checkpoints are often far larger than the
//! agent's memory budget (and than S3's 5 GiB single PUT). A file is read
//! in parts and sent as a multipart upload, at most [`IN_FLIGHT`] parts
//! uploading while the next is read, and restored in ranges of
//! [`RANGE`] bytes.

use std::collections::VecDeque;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::path::Path as ObjPath;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;

/// Why a sync or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The store URL is not one this agent can use.
    #[error("checkpoint store '{0}': {1}")]
    Store(String, String),
    /// A newer attempt has checkpointed: this one is stale.
    #[error("attempt {mine} is stale: attempt {newer} has already checkpointed")]
    Stale { mine: u32, newer: u32 },
    /// Object store.
    #[error("object store: {0}")]
    Object(#[from] object_store::Error),
    /// Local files.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A stored file is not the size its manifest gives.
    #[error("{key}: the manifest says {manifest} bytes, the store holds {stored}")]
    Size {
        /// The object.
        key: String,
        /// Its size in the manifest.
        manifest: u64,
        /// Its size in the store.
        stored: u64,
    },
}

/// Smallest upload part, and the largest file put in one request. S3
/// wants parts of 5 MiB or more (all but the last), and R2 parts of one
/// size, which [`part_size`] keeps.
const PART: usize = 8 << 20;

/// S3's most parts in one upload.
const MAX_PARTS: u64 = 10_000;

/// Parts uploading at once; one more is being read meanwhile, so a sync
/// holds at most `IN_FLIGHT + 1` parts in memory.
const IN_FLIGHT: usize = 2;

/// Bytes fetched per ranged read on restore.
const RANGE: u64 = 8 << 20;

/// The part size for a file of `len` bytes: [`PART`], grown (in whole MiB)
/// so that the file fits in 9 000 parts, which leaves it a tenth to grow
/// while it is read before S3's 10 000 would be passed. 8 MiB parts up to
/// about 70 GiB; 5 TiB, S3's largest object, takes 611 MiB parts.
fn part_size(len: u64) -> usize {
    let fit = len.div_ceil(MAX_PARTS / 10 * 9);
    let size = fit.max(PART as u64).next_multiple_of(1 << 20);
    usize::try_from(size).unwrap_or(usize::MAX)
}

/// What one complete sync holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Attempt that wrote it.
    pub epoch: u32,
    /// Its sync number within the attempt.
    pub seq: u32,
    /// Files, relative to the checkpoint directory, with sizes.
    pub files: Vec<(String, u64)>,
    /// Where under `data/` they are: unique per sync, so that a retried
    /// sync never rewrites files a manifest already names.
    pub data: String,
    /// When (unix ms).
    pub at_ms: i64,
}

impl Manifest {
    fn name(epoch: u32, seq: u32) -> String {
        format!("{epoch:010}-{seq:06}")
    }
}

/// One job's checkpoints in its store.
pub struct Checkpoints {
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
}

impl Checkpoints {
    /// Opens `url` (`file:///dir` or `s3://bucket/prefix`) for job `job_id`;
    /// an S3 store takes its settings from the job's `AWS_*` variables.
    pub fn open(
        url: &str,
        job_id: &str,
        job_env: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, CheckpointError> {
        let bad = |m: &str| CheckpointError::Store(url.to_string(), m.to_string());
        let (store, base): (Arc<dyn ObjectStore>, String) =
            if let Some(dir) = url.strip_prefix("file://") {
                std::fs::create_dir_all(dir).map_err(|e| bad(&e.to_string()))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| bad(&e.to_string()))?;
                (Arc::new(fs), String::new())
            } else if url.starts_with("s3://") {
                crate::s3::open(url, job_env).map_err(|e| bad(&e))?
            } else {
                return Err(bad(
                    "only file:// and s3:// stores are supported by this agent",
                ));
            };
        let prefix = if base.is_empty() {
            format!("job-{job_id}")
        } else {
            format!("{base}/job-{job_id}")
        };
        Ok(Self {
            store,
            prefix: ObjPath::from(prefix),
        })
    }

    /// Every complete checkpoint, oldest first.
    pub async fn manifests(&self) -> Result<Vec<(u32, u32)>, CheckpointError> {
        let mut out = Vec::new();
        let mut list = self
            .store
            .list(Some(&self.prefix.clone().join("manifests")));
        while let Some(meta) = list.next().await {
            let meta = meta?;
            let Some(name) = meta
                .location
                .filename()
                .and_then(|f| f.strip_suffix(".json"))
            else {
                continue;
            };
            if let Some((e, s)) = name.split_once('-') {
                if let (Ok(e), Ok(s)) = (e.parse(), s.parse()) {
                    out.push((e, s));
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Uploads `dir` as sync `seq` of attempt `epoch`; the manifest is
    /// written last. Refuses if a newer attempt has checkpointed.
    pub async fn sync(
        &self,
        dir: &Path,
        epoch: u32,
        seq: u32,
    ) -> Result<Manifest, CheckpointError> {
        refuse_if_stale(&self.manifests().await?, epoch)?;
        self.upload(walk(dir)?, epoch, seq).await
    }

    /// Syncs `dir` as the next sync of attempt `epoch`; nothing when the
    /// directory holds no file yet.
    pub async fn sync_next(
        &self,
        dir: &Path,
        epoch: u32,
    ) -> Result<Option<Manifest>, CheckpointError> {
        let files = walk(dir)?;
        if files.is_empty() {
            return Ok(None);
        }
        let existing = self.manifests().await?;
        refuse_if_stale(&existing, epoch)?;
        let seq = existing
            .iter()
            .filter(|(e, _)| *e == epoch)
            .map(|(_, s)| s + 1)
            .max()
            .unwrap_or(1);
        self.upload(files, epoch, seq).await.map(Some)
    }

    /// Puts `files` as sync `seq` of attempt `epoch`, the manifest last.
    async fn upload(
        &self,
        files: Vec<(String, PathBuf)>,
        epoch: u32,
        seq: u32,
    ) -> Result<Manifest, CheckpointError> {
        let name = Manifest::name(epoch, seq);
        let data_name = format!("{name}-{:08x}", nembo_proto::client::random_u32());
        let data = self.prefix.clone().join("data").join(data_name.as_str());
        let mut uploaded = Vec::new();
        let buffers = Buffers::default();
        for (rel, abs) in files {
            let mut key = data.clone();
            for part in rel.split('/') {
                key = key.join(part);
            }
            let file = tokio::fs::File::open(&abs).await?.into_std().await;
            let len = file.metadata()?.len();
            // What was read, not what the directory listing said: the job
            // may still be writing.
            let sent = put_reader(self.store.as_ref(), &key, file, len, &buffers).await?;
            uploaded.push((rel, sent));
        }
        let manifest = Manifest {
            epoch,
            seq,
            files: uploaded,
            data: data_name,
            at_ms: nembo_proto::clock::now_ms(),
        };
        // Checked again now that the data is up: what remains is a race only
        // with an attempt of the same or an older epoch, which Raft has
        // already ended; Create makes a manifest name impossible to reuse.
        refuse_if_stale(&self.manifests().await?, epoch)?;
        let body = serde_json::to_vec(&manifest).map_err(std::io::Error::other)?;
        self.store
            .put_opts(
                &self
                    .prefix
                    .clone()
                    .join("manifests")
                    .join(format!("{name}.json")),
                PutPayload::from(body),
                PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                },
            )
            .await?;
        Ok(manifest)
    }

    /// Restores into `dir` the newest checkpoint of an attempt before
    /// `epoch`; `None` when there is none. Either way `dir` then holds
    /// exactly that checkpoint: whatever an earlier job left on this node
    /// is gone. A directory Nembo did not create is never emptied.
    pub async fn restore(
        &self,
        dir: &Path,
        epoch: u32,
    ) -> Result<Option<Manifest>, CheckpointError> {
        reset_dir(dir)?;
        let Some(&(e, s)) = self
            .manifests()
            .await?
            .iter()
            .rev()
            .find(|(e, _)| *e < epoch)
        else {
            return Ok(None);
        };
        let name = Manifest::name(e, s);
        let raw = self
            .store
            .get(
                &self
                    .prefix
                    .clone()
                    .join("manifests")
                    .join(format!("{name}.json")),
            )
            .await?
            .bytes()
            .await?;
        let manifest: Manifest = serde_json::from_slice(&raw).map_err(std::io::Error::other)?;
        let data = self
            .prefix
            .clone()
            .join("data")
            .join(manifest.data.as_str());
        for (rel, len) in &manifest.files {
            if rel.split('/').any(|p| p == ".." || p.is_empty()) {
                continue; // never write outside the directory
            }
            let mut key = data.clone();
            for part in rel.split('/') {
                key = key.join(part);
            }
            let target = dir.join(rel);
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            self.get_file(&key, &target, *len).await?;
        }
        Ok(Some(manifest))
    }

    /// Copies object `key` (of `len` bytes, says the manifest) to `target`
    /// in ranged reads of [`RANGE`] bytes, the next fetched while the one
    /// before is written.
    ///
    /// Why ranges rather than one streaming GET: on S3 the request goes
    /// through nembo-proto's HTTP client (s3.rs), which reads every answer
    /// whole, up to 32 MiB, within one 30 s deadline, so a streamed GET
    /// would be buffered entirely and fail past 32 MiB. Ranges keep every
    /// answer to 8 MiB, each one retried on its own by object_store. The
    /// cost, a request per 8 MiB, is small beside the transfer. A local
    /// store hands over its open file instead, copied by the kernel
    /// (`copy_file_range`) without passing through the agent's memory. The
    /// data objects of a sync are never rewritten (a unique directory per
    /// sync), so ranges read at different times make one consistent file.
    async fn get_file(
        &self,
        key: &ObjPath,
        target: &Path,
        len: u64,
    ) -> Result<(), CheckpointError> {
        get_object(&self.store, key, target, len).await
    }
}

/// Writes object `key` (`len` bytes, as its manifest or listing says) to
/// `target`, in ranges of [`RANGE`] bytes: the agent never holds more than
/// two ranges of it.
pub async fn get_object(
    store: &Arc<dyn ObjectStore>,
    key: &ObjPath,
    target: &Path,
    len: u64,
) -> Result<(), CheckpointError> {
    {
        let stored = store.head(key).await?.size;
        if stored != len {
            return Err(CheckpointError::Size {
                key: key.to_string(),
                manifest: len,
                stored,
            });
        }
        let span = |start: u64| start..(start + RANGE).min(len);
        let fetch = |range: std::ops::Range<u64>| {
            let (store, key) = (store.clone(), key.clone());
            let options = object_store::GetOptions {
                range: Some(range.into()),
                ..Default::default()
            };
            tokio::spawn(async move { store.get_opts(&key, options).await })
        };
        let mut out = tokio::fs::File::create(target).await?.into_std().await;
        let mut next = (len > 0).then(|| fetch(span(0)));
        let mut at = 0;
        let result = async {
            while let Some(pending) = next.take() {
                let range = span(at);
                let got = pending.await.map_err(std::io::Error::other)??;
                if got.range != range {
                    return Err(CheckpointError::Io(std::io::Error::other(format!(
                        "{key}: asked for bytes {range:?}, got {:?}",
                        got.range
                    ))));
                }
                at = range.end;
                if at < len {
                    next = Some(fetch(span(at)));
                }
                let mut wrote = 0;
                match got.payload {
                    object_store::GetResultPayload::File(mut file, _) => {
                        let n = range.end - range.start;
                        (out, wrote) = tokio::task::spawn_blocking(move || {
                            file.seek(std::io::SeekFrom::Start(range.start))?;
                            let copied = std::io::copy(&mut file.take(n), &mut out)?;
                            Ok::<_, std::io::Error>((out, copied))
                        })
                        .await
                        .map_err(std::io::Error::other)??;
                    }
                    object_store::GetResultPayload::Stream(mut chunks) => {
                        while let Some(chunk) = chunks.next().await {
                            let chunk = chunk?;
                            wrote += chunk.len() as u64;
                            out = tokio::task::spawn_blocking(move || {
                                out.write_all(&chunk).map(|()| out)
                            })
                            .await
                            .map_err(std::io::Error::other)??;
                        }
                    }
                }
                if wrote != range.end - range.start {
                    return Err(CheckpointError::Io(std::io::Error::other(format!(
                        "{key}: asked for bytes {range:?}, got {wrote}"
                    ))));
                }
            }
            Ok(())
        }
        .await;
        if let Some(pending) = next {
            pending.abort(); // a write failed: the next range is not wanted
        }
        result
    }
}

/// Uploads what `src` holds (about `len` bytes) to `key`, returning how
/// many bytes it sent: one put if it fits in a part, else a multipart
/// upload with at most [`IN_FLIGHT`] parts uploading while the next is
/// read. A failed multipart upload is aborted, so S3 keeps no orphan parts.
async fn put_reader<R: Read + Send + 'static>(
    store: &dyn ObjectStore,
    key: &ObjPath,
    src: R,
    len: u64,
    buffers: &Buffers,
) -> Result<u64, CheckpointError> {
    let part = part_size(len);
    let (mut src, first) = read_part(src, buffers.take(part, len), part).await?;
    if first.len() < part {
        let sent = first.len() as u64;
        store.put(key, buffers.payload(first)).await?;
        return Ok(sent);
    }
    let mut upload = store.put_multipart(key).await?;
    let mut uploading = VecDeque::new();
    let result = async {
        let mut chunk = first;
        let mut sent = 0u64;
        loop {
            sent += chunk.len() as u64;
            let payload = buffers.payload(chunk);
            uploading.push_back(tokio::spawn(upload.put_part(payload)));
            while uploading.len() > IN_FLIGHT {
                if let Some(oldest) = uploading.pop_front() {
                    oldest.await.map_err(std::io::Error::other)??;
                }
            }
            let buf = buffers.take(part, len.saturating_sub(sent));
            let (rest, next) = read_part(src, buf, part).await?;
            src = rest;
            if next.is_empty() {
                break;
            }
            chunk = next;
        }
        while let Some(oldest) = uploading.pop_front() {
            oldest.await.map_err(std::io::Error::other)??;
        }
        upload.complete().await?;
        Ok::<_, CheckpointError>(sent)
    }
    .await;
    if result.is_err() {
        for p in uploading {
            p.abort();
        }
        if let Err(e) = upload.abort().await {
            tracing::warn!(key = %key, error = %e, "could not abort a failed multipart upload");
        }
    }
    result
}

/// Reads `n` bytes from `src` into `buf`, fewer only at its end, on a
/// blocking thread.
async fn read_part<R: Read + Send + 'static>(
    mut src: R,
    mut buf: Vec<u8>,
    n: usize,
) -> std::io::Result<(R, Vec<u8>)> {
    tokio::task::spawn_blocking(move || {
        (&mut src).take(n as u64).read_to_end(&mut buf)?;
        Ok((src, buf))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// The part buffers of one sync, each back here once the store has let go
/// of it, and reused for the next part.
///
/// Why not a fresh buffer per part: glibc's malloc raises its mmap
/// threshold to the size of the first large block freed, so later 8 MiB
/// blocks come from per-thread arenas, where freed ones stay resident; with
/// parts allocated and freed on whichever threads run them, a 2 GiB sync
/// took the agent to 130 MiB. Reused buffers keep it to the few in flight.
#[derive(Clone, Default)]
struct Buffers(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl Buffers {
    /// An empty buffer for up to `part` bytes, sized for `hint` (the bytes
    /// expected), so that a small file takes a small one.
    fn take(&self, part: usize, hint: u64) -> Vec<u8> {
        let want = usize::try_from(hint).map_or(part, |h| h.min(part));
        let mut buf = self
            .0
            .lock()
            .ok()
            .and_then(|mut free| free.pop())
            .unwrap_or_default();
        buf.clear();
        buf.reserve(want);
        buf
    }

    /// `buf` as a payload that gives it back when the store drops it.
    fn payload(&self, buf: Vec<u8>) -> PutPayload {
        let lent = Lent {
            buf,
            home: self.clone(),
        };
        PutPayload::from(bytes::Bytes::from_owner(lent))
    }
}

/// A buffer lent to the store.
struct Lent {
    buf: Vec<u8>,
    home: Buffers,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Ok(mut free) = self.home.0.lock() {
            // More than in flight means a store held one longer: let it go.
            if free.len() <= IN_FLIGHT {
                free.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

/// Refuses attempt `epoch` once a newer attempt has a complete checkpoint.
fn refuse_if_stale(existing: &[(u32, u32)], epoch: u32) -> Result<(), CheckpointError> {
    match existing.last() {
        Some(&(newer, _)) if newer > epoch => Err(CheckpointError::Stale { mine: epoch, newer }),
        _ => Ok(()),
    }
}

/// Marks a directory as Nembo's to empty.
const MARKER: &str = ".nembo-checkpoint";

/// Empties `dir` (creating it, with the marker, if missing). Refuses a
/// non-empty directory without the marker: it is not Nembo's to delete.
fn reset_dir(dir: &Path) -> Result<(), CheckpointError> {
    if dir.join(MARKER).is_file() {
        std::fs::remove_dir_all(dir)?;
    } else if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(CheckpointError::Store(
            dir.display().to_string(),
            "checkpoint.path exists and holds files Nembo did not put there; choose an empty or new directory".into(),
        ));
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(MARKER), b"")?;
    Ok(())
}

/// Every regular file under `dir`, with its path relative to it.
fn walk(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries.flatten() {
            let ty = e.file_type()?;
            let p = e.path();
            if ty.is_dir() {
                stack.push(p);
            } else if ty.is_file() && e.file_name() != MARKER {
                if let Ok(rel) = p.strip_prefix(dir) {
                    out.push((rel.to_string_lossy().into_owned(), p));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that differ all along (xorshift), so a misplaced part shows.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn digest(p: &Path) -> Vec<u8> {
        let bytes = std::fs::read(p).unwrap();
        ring::digest::digest(&ring::digest::SHA256, &bytes)
            .as_ref()
            .to_vec()
    }

    #[test]
    fn parts_fit_s3s_limits_up_to_its_largest_object() {
        assert_eq!(part_size(0), PART);
        assert_eq!(part_size(40 << 20), PART);
        assert_eq!(part_size(60 << 30), PART);
        for len in [70u64 << 30, 1 << 40, 5 << 40] {
            let p = part_size(len) as u64;
            assert!(
                p.next_multiple_of(1 << 20) == p && p <= 5 << 30,
                "{len}: {p}"
            );
            // A tenth of growth while it is read still fits.
            assert!((len + len / 10).div_ceil(p) <= MAX_PARTS, "{len}: {p}");
        }
    }

    /// Files larger than a part go up in parts and come back identical,
    /// beside small, empty and nested ones and one of exactly one part.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_files_sync_in_parts_and_restore_identical() {
        let store = tempfile::tempdir().unwrap();
        let url = format!("file://{}", store.path().display());
        let c = Checkpoints::open(&url, "9", &Default::default()).unwrap();
        let work = tempfile::tempdir().unwrap();
        let dir = work.path().join("ckpt");
        std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
        let files: Vec<(&str, Vec<u8>)> = vec![
            ("model.bin", noise((40 << 20) + 12_345, 7)),
            ("sub/deeper/one-part.bin", noise(PART, 11)),
            ("sub/opt.bin", noise(PART - 1, 13)),
            ("step", b"1200".to_vec()),
            ("empty", Vec::new()),
        ];
        for (rel, bytes) in &files {
            std::fs::write(dir.join(rel), bytes).unwrap();
        }
        let m = c.sync(&dir, 1, 1).await.unwrap();
        let mut want: Vec<(String, u64)> = files
            .iter()
            .map(|(r, b)| (r.to_string(), b.len() as u64))
            .collect();
        want.sort();
        assert_eq!(m.files, want);
        // No staged part or temporary file is left beside the objects.
        let mut stored = Vec::new();
        let mut stack = vec![store.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    stored.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        stored.sort();
        assert_eq!(
            stored,
            [
                "0000000001-000001.json",
                "empty",
                "model.bin",
                "one-part.bin",
                "opt.bin",
                "step"
            ]
        );

        let back = work.path().join("back");
        let r = c.restore(&back, 2).await.unwrap().unwrap();
        assert_eq!(r, m);
        for (rel, bytes) in &files {
            let got = back.join(rel);
            assert_eq!(std::fs::metadata(&got).unwrap().len(), bytes.len() as u64);
            assert_eq!(digest(&got), digest(&dir.join(rel)), "{rel}");
        }

        // A stored file that is not what its manifest says is refused.
        let data = store.path().join("job-9/data").join(&m.data);
        std::fs::write(data.join("model.bin"), b"short").unwrap();
        let err = c.restore(&back, 2).await.unwrap_err();
        assert!(
            matches!(err, CheckpointError::Size { manifest, stored: 5, .. } if manifest == (40 << 20) + 12_345),
            "{err:?}"
        );
    }

    /// A file whose read fails midway leaves nothing behind: the multipart
    /// upload is aborted.
    #[tokio::test]
    async fn a_failed_upload_is_aborted() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("disk gone"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let store = tempfile::tempdir().unwrap();
        let fs = object_store::local::LocalFileSystem::new_with_prefix(store.path()).unwrap();
        let key = ObjPath::from("data/big");
        let err = put_reader(
            &fs,
            &key,
            Failing(3 * PART + 5),
            4 * PART as u64,
            &Buffers::default(),
        )
        .await;
        assert!(matches!(err, Err(CheckpointError::Io(_))), "{err:?}");
        assert!(fs.head(&key).await.is_err());
        let left: Vec<_> = std::fs::read_dir(store.path().join("data"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn restore_takes_the_newest_older_epoch_and_a_stale_attempt_cannot_write() {
        let store = tempfile::tempdir().unwrap();
        let url = format!("file://{}", store.path().display());
        let c = Checkpoints::open(&url, "7", &Default::default()).unwrap();
        let work = tempfile::tempdir().unwrap();
        let dir = work.path().join("ckpt");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("step"), "10").unwrap();
        std::fs::write(dir.join("sub/w.bin"), [1u8, 2, 3]).unwrap();
        c.sync(&dir, 1, 1).await.unwrap();
        std::fs::write(dir.join("step"), "20").unwrap();
        c.sync(&dir, 1, 2).await.unwrap();
        assert_eq!(c.manifests().await.unwrap(), vec![(1, 1), (1, 2)]);

        // Attempt 2 starts from attempt 1's newest sync.
        let dir2 = work.path().join("ckpt2");
        let m = c.restore(&dir2, 2).await.unwrap().unwrap();
        assert_eq!((m.epoch, m.seq), (1, 2));
        assert_eq!(std::fs::read_to_string(dir2.join("step")).unwrap(), "20");
        assert_eq!(std::fs::read(dir2.join("sub/w.bin")).unwrap(), [1, 2, 3]);
        std::fs::write(dir2.join("step"), "30").unwrap();
        c.sync(&dir2, 2, 1).await.unwrap();

        // Attempt 1 resurfacing cannot write over it.
        let stale = c.sync(&dir, 1, 3).await;
        assert!(
            matches!(stale, Err(CheckpointError::Stale { mine: 1, newer: 2 })),
            "{stale:?}"
        );
        // A manifest name is never reused.
        assert!(c.sync(&dir2, 2, 1).await.is_err());
        // A first attempt starts empty.
        assert!(Checkpoints::open(&url, "8", &Default::default())
            .unwrap()
            .restore(&dir2, 1)
            .await
            .unwrap()
            .is_none());
        assert!(Checkpoints::open("gs://b/p", "1", &Default::default()).is_err());
        // A directory Nembo did not create is never emptied.
        let foreign = work.path().join("home");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
        assert!(c.restore(&foreign, 3).await.is_err());
        assert_eq!(
            std::fs::read_to_string(foreign.join("notes.txt")).unwrap(),
            "mine"
        );
    }
}
