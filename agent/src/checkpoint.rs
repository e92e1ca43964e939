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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
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
        for (rel, abs) in files {
            let bytes = tokio::fs::read(&abs).await?;
            let len = bytes.len() as u64;
            let mut key = data.clone();
            for part in rel.split('/') {
                key = key.join(part);
            }
            self.store.put(&key, PutPayload::from(bytes)).await?;
            uploaded.push((rel, len));
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
        for (rel, _) in &manifest.files {
            if rel.split('/').any(|p| p == ".." || p.is_empty()) {
                continue; // never write outside the directory
            }
            let mut key = data.clone();
            for part in rel.split('/') {
                key = key.join(part);
            }
            let bytes = self.store.get(&key).await?.bytes().await?;
            let target = dir.join(rel);
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            tokio::fs::write(target, bytes).await?;
        }
        Ok(Some(manifest))
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
