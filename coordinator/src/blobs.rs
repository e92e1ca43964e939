//! File contents that clients upload for their tasks' local file mounts and
//! workdirs, kept by BLAKE3 digest under `<data dir>/blobs/ab/abcdef...` (not in
//! Raft: a blob is checked against its name whenever it is read, and a
//! missing one fails the attempt's setup with a clear message). A blob is
//! written to a temp file, checked, then renamed into place, so a reader
//! never sees part of one; an upload is made durable once, at its end
//! ([`BlobStore::sync`]), not with a flush per file.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::path::PathBuf;

use nembo_proto::files::{is_digest, Hasher, Manifest};

/// Why a blob could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// Not a digest, or the content does not hash to it.
    #[error("{0}")]
    Invalid(String),
    /// Not here.
    #[error("blob {0} is not held by this coordinator")]
    Missing(String),
    /// Keeping it would eat into the room the Raft log needs.
    #[error("{0}")]
    NoRoom(String),
    /// The disk failed.
    #[error("blob store: {0}")]
    Io(#[from] std::io::Error),
}

/// Free space uploads never take: a twentieth of the disk, at least
/// `RESERVE_MIN` and at most `RESERVE_MAX` (the log compacts at 64 MiB and
/// a snapshot is the size of the state: gigabytes are plenty).
const RESERVE_MIN: u64 = 2 << 30;
const RESERVE_MAX: u64 = 10 << 30;

/// Refuses `size` more bytes where `free` of `total` are free, if that
/// would leave less than the reserve.
fn room_for(size: u64, free: u64, total: u64) -> Result<(), BlobError> {
    let reserve = RESERVE_MIN.max((total / 20).min(RESERVE_MAX));
    if free.saturating_sub(size) < reserve {
        return Err(BlobError::NoRoom(format!(
            "no room for {size} more bytes of uploads: the coordinators keep {} GiB free for \
             their log ({} GiB free now); ship data sets through a bucket",
            reserve >> 30,
            free >> 30
        )));
    }
    Ok(())
}

/// The blobs of one coordinator.
pub struct BlobStore {
    dir: PathBuf,
    /// Bytes announced by uploads still in progress: counted against the
    /// reserve, so that concurrent uploads cannot overrun it together.
    reserved: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// A blob being received.
pub struct Incoming {
    digest: String,
    size: u64,
    written: u64,
    hasher: Hasher,
    file: fs::File,
    tmp: PathBuf,
    path: PathBuf,
    /// Its announced size, counted as reserved until it is done.
    _claim: Claim,
}

/// Bytes an upload in progress holds in the reservation.
struct Claim {
    reserved: std::sync::Arc<std::sync::atomic::AtomicU64>,
    size: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.reserved
            .fetch_sub(self.size, std::sync::atomic::Ordering::SeqCst);
    }
}

impl BlobStore {
    /// Blobs live under `dir`.
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            reserved: Default::default(),
        })
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(&digest[..2]).join(digest)
    }

    /// Where a blob `has` found is kept (`digest` must be one).
    pub fn path_of(&self, digest: &str) -> PathBuf {
        self.path(digest)
    }

    /// Whether the blob is here.
    pub fn has(&self, digest: &str) -> bool {
        is_digest(digest) && self.path(digest).is_file()
    }

    /// Whether the blob is here, marking it used now: a client that finds
    /// it here will not upload it, so it must outlive the next collection.
    pub fn has_fresh(&self, digest: &str) -> bool {
        if !is_digest(digest) {
            return false;
        }
        fs::File::options()
            .write(true)
            .open(self.path(digest))
            .and_then(|f| f.set_modified(std::time::SystemTime::now()))
            .is_ok()
    }

    /// Deletes every blob not in `keep` that was not uploaded or asked
    /// about for `idle`; returns how many went. Blobs of jobs that have not
    /// ended are always in `keep` ([`referenced`]).
    pub fn collect(&self, keep: &BTreeSet<String>, idle: std::time::Duration) -> usize {
        let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) else {
            return 0;
        };
        let mut gone = 0;
        for shard in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            for blob in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
                let name = blob.file_name().to_string_lossy().into_owned();
                if keep.contains(&name) {
                    continue;
                }
                let age = blob
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|t| now.saturating_sub(t));
                // Temp files of an upload in progress are young; old ones are litter.
                if age.is_some_and(|a| a >= idle) && fs::remove_file(blob.path()).is_ok() {
                    gone += 1;
                }
            }
        }
        gone
    }

    /// Every blob the jobs that have not ended ship: their manifests and the
    /// files those list.
    pub fn referenced(&self, state: &nembo_domain::state::State) -> BTreeSet<String> {
        let mut keep = BTreeSet::new();
        for job in state.jobs.values().filter(|j| !j.state.is_terminal()) {
            let manifests = job
                .spec
                .workdir_manifest
                .iter()
                .map(String::as_str)
                .chain(job.spec.file_mounts.values().filter_map(|m| m.local()?.1));
            for d in manifests {
                keep.insert(d.to_string());
                if let Ok(m) = self.manifest(d) {
                    keep.extend(m.files().map(|(_, _, f)| f.to_string()));
                }
            }
        }
        keep
    }

    /// Starts receiving a blob of `size` bytes named `digest`. Refused when
    /// it would leave the disk with less than its reserve free: uploads must
    /// never fill the disk the Raft log is on (a member whose log cannot
    /// grow stops).
    pub fn begin(&self, digest: &str, size: u64) -> Result<Incoming, BlobError> {
        if !is_digest(digest) {
            return Err(BlobError::Invalid(format!("'{digest}' is not a digest")));
        }
        use std::sync::atomic::Ordering;
        let pending = self.reserved.fetch_add(size, Ordering::SeqCst);
        let claim = Claim {
            reserved: self.reserved.clone(),
            size,
        };
        if let Ok(st) = nix::sys::statvfs::statvfs(&self.dir) {
            let block = st.fragment_size();
            room_for(
                size.saturating_add(pending),
                st.blocks_available() * block,
                st.blocks() * block,
            )?;
        }
        let path = self.path(digest);
        fs::create_dir_all(path.parent().unwrap_or(&self.dir))?;
        let tmp = path.with_extension(format!("tmp{}", rand_suffix()));
        Ok(Incoming {
            digest: digest.to_string(),
            size,
            written: 0,
            hasher: Hasher::default(),
            file: fs::File::create(&tmp)?,
            tmp,
            path,
            _claim: claim,
        })
    }

    /// Makes the blobs of one upload durable: a few are flushed one by one
    /// with their directories; many at once take one `syncfs`, where a flush
    /// each would cost seconds. (A `syncfs` also flushes whatever else the
    /// filesystem holds dirty, which made a one-file re-sync wait on the
    /// writes of everything else on the machine.)
    pub fn sync(&self, written: &[PathBuf]) -> Result<(), BlobError> {
        const FEW: usize = 32;
        if written.len() > FEW {
            let dir = fs::File::open(&self.dir)?;
            return nix::unistd::syncfs(&dir).map_err(|e| BlobError::Io(e.into()));
        }
        let mut dirs = BTreeSet::new();
        for path in written {
            fs::File::open(path)?.sync_all()?;
            if let Some(d) = path.parent() {
                dirs.insert(d.to_path_buf());
            }
        }
        for d in dirs {
            fs::File::open(d)?.sync_all()?;
        }
        Ok(())
    }

    /// A blob's content, opened for reading.
    pub fn open(&self, digest: &str) -> Result<fs::File, BlobError> {
        if !is_digest(digest) {
            return Err(BlobError::Invalid(format!("'{digest}' is not a digest")));
        }
        fs::File::open(self.path(digest)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => BlobError::Missing(digest.to_string()),
            _ => BlobError::Io(e),
        })
    }

    /// A manifest blob, read, checked against its name and decoded.
    pub fn manifest(&self, digest: &str) -> Result<Manifest, BlobError> {
        let file = self.open(digest)?;
        let len = file.metadata()?.len();
        if len > nembo_proto::files::MAX_MANIFEST_BYTES {
            return Err(BlobError::Invalid(format!(
                "manifest {digest} is {len} bytes; the limit is {}",
                nembo_proto::files::MAX_MANIFEST_BYTES
            )));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(len).read_to_end(&mut bytes)?;
        if nembo_proto::files::digest(&bytes) != digest {
            return Err(BlobError::Invalid(format!(
                "blob {digest} does not match its name"
            )));
        }
        Manifest::decode(&bytes).map_err(BlobError::Invalid)
    }

    /// The blobs `manifest` lists that are not here, or not of the size it
    /// claims for them (the sizes are what the limits are checked on).
    pub fn missing_of(&self, manifest: &Manifest) -> BTreeSet<String> {
        manifest
            .files()
            .filter(|(_, size, d)| {
                !is_digest(d)
                    || fs::metadata(self.path(d)).map_or(true, |m| !m.is_file() || m.len() != *size)
            })
            .map(|(_, _, d)| d.to_string())
            .collect()
    }
}

impl Incoming {
    /// Appends a piece; refuses more bytes than announced.
    pub fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        self.written += data.len() as u64;
        if self.written > self.size {
            return Err(BlobError::Invalid(format!(
                "blob {}: more than the {} bytes announced",
                self.digest, self.size
            )));
        }
        self.hasher.update(data);
        self.file.write_all(data)?;
        Ok(())
    }

    /// Checks the content against its name and keeps it; returns its size
    /// and where it is kept (to be made durable with [`BlobStore::sync`]).
    pub fn finish(mut self) -> Result<(u64, PathBuf), BlobError> {
        let got = std::mem::take(&mut self.hasher).finish();
        if got != self.digest || self.written != self.size {
            let _ = fs::remove_file(&self.tmp);
            return Err(BlobError::Invalid(format!(
                "blob {}: received {} bytes hashing to {got}, announced {} bytes",
                self.digest, self.written, self.size
            )));
        }
        fs::rename(&self.tmp, &self.path)?;
        Ok((self.written, self.path.clone()))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Unfinished (the client went away): leave nothing behind. After
        // `finish` the temp file has been renamed and is gone already.
        let _ = fs::remove_file(&self.tmp);
    }
}

fn rand_suffix() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_is_kept_only_if_it_hashes_to_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().to_path_buf()).unwrap();
        let d = nembo_proto::files::digest(b"hello");
        let mut bad = store.begin(&d, 5).unwrap();
        bad.write(b"hellx").unwrap();
        assert!(bad.finish().is_err());
        assert!(!store.has(&d));
        let mut over = store.begin(&d, 2).unwrap();
        assert!(over.write(b"hello").is_err());
        drop(over);
        let mut good = store.begin(&d, 5).unwrap();
        good.write(b"hel").unwrap();
        good.write(b"lo").unwrap();
        assert_eq!(good.finish().unwrap().0, 5);
        assert!(store.has(&d));
        assert!(store.begin("../../etc", 1).is_err());
        assert!(matches!(
            store.open(&"0".repeat(64)),
            Err(BlobError::Missing(_))
        ));
        // Nothing half-written is left.
        let left: Vec<_> = walk(dir.path());
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn uploads_never_take_the_reserve_the_log_needs() {
        const GIB: u64 = 1 << 30;
        // 100 GiB disk: the reserve is 5 GiB; 1 TiB: capped at 10 GiB.
        assert!(room_for(GIB, 20 * GIB, 100 * GIB).is_ok());
        assert!(matches!(
            room_for(16 * GIB, 20 * GIB, 100 * GIB),
            Err(BlobError::NoRoom(_))
        ));
        assert!(room_for(GIB, 12 * GIB, 1024 * GIB).is_ok());
        assert!(room_for(3 * GIB, 12 * GIB, 1024 * GIB).is_err());
        // A small disk keeps at least 2 GiB.
        assert!(room_for(GIB, 2 * GIB, 8 * GIB).is_err());
        assert!(room_for(GIB, 4 * GIB, 8 * GIB).is_ok());
    }

    #[test]
    fn collection_keeps_what_jobs_ship_and_what_was_asked_for_lately() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().to_path_buf()).unwrap();
        let put = |data: &[u8]| {
            let d = nembo_proto::files::digest(data);
            let mut b = store.begin(&d, data.len() as u64).unwrap();
            b.write(data).unwrap();
            b.finish().unwrap();
            d
        };
        let (kept, idle) = (put(b"kept"), put(b"idle"));
        let keep: BTreeSet<String> = [kept.clone()].into();
        // Young blobs stay whatever references them.
        assert_eq!(
            store.collect(&keep, std::time::Duration::from_secs(3600)),
            0
        );
        assert_eq!(store.collect(&keep, std::time::Duration::ZERO), 1);
        assert!(store.has(&kept) && !store.has(&idle));
        assert!(store.has_fresh(&kept));
        assert!(!store.has_fresh(&idle));
    }

    fn walk(p: &std::path::Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(p).unwrap().flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }
}
