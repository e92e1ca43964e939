//! File contents that clients upload for their tasks' local file mounts and
//! workdirs, kept by BLAKE3 digest under `<data dir>/blobs/ab/abcdef...` (not in
//! Raft: a blob is checked against its name whenever it is read, and a
//! missing one fails the attempt's setup with a clear message). A blob is
//! written to a temp file, checked, then renamed into place, so a reader
//! never sees part of one; an upload is made durable once, at its end
//! ([`BlobStore::sync`]), not with a flush per file.
//!
//! Small blobs that come whole, many to a message, are kept together in one
//! pack file per message (`blobs/packs/<id>.pack`, indexed in memory and
//! rescanned at start): creating ten thousand small files cost the
//! coordinator more than their bytes did.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nembo_proto::files::{is_digest, Hasher, Manifest};
use nembo_proto::v1::WholeBlob;

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
#[derive(Clone)]
pub struct BlobStore {
    dir: PathBuf,
    /// Blobs kept in packs, by digest.
    packed: Arc<Mutex<HashMap<String, Packed>>>,
    /// Uploads announced and not over, by id.
    announced: Arc<Mutex<HashMap<String, Announcement>>>,
    /// Bytes announced by uploads still in progress: counted against the
    /// reserve, so that concurrent uploads cannot overrun it together.
    reserved: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// An upload announced by a client that will submit a job naming its
/// blobs before they are all here.
struct Announcement {
    digests: std::collections::HashSet<String>,
    /// Lapses then unless an upload carries it.
    lapses: Instant,
    carried: bool,
}

/// An announcement no upload takes up lapses after this.
pub const ANNOUNCE_LAPSE: Duration = Duration::from_secs(60);

/// Most digests all announcements may hold at once (about 100 MB): a
/// client announcing without uploading cannot grow the coordinator.
pub const MAX_ANNOUNCED: usize = 1_000_000;

/// Keeps an announcement while its upload runs; it goes with this.
pub struct Carrying {
    announced: Arc<Mutex<HashMap<String, Announcement>>>,
    id: String,
}

impl Drop for Carrying {
    fn drop(&mut self) {
        lock(&self.announced).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a packed blob is.
#[derive(Clone, Copy, Debug)]
struct Packed {
    pack: u64,
    offset: u64,
    len: u64,
}

/// A pack starts with this; then, per blob: its digest (64 hex bytes), its
/// length (u64, little-endian), its bytes.
const PACK_MAGIC: &[u8; 8] = b"NEMBOPK1";
const PACK_HEADER: u64 = 64 + 8;

/// A blob opened for reading: its bytes, and how many there are.
pub type BlobReader = std::io::Take<fs::File>;

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
        fs::create_dir_all(dir.join(PACKS))?;
        let store = Self {
            dir,
            packed: Default::default(),
            announced: Default::default(),
            reserved: Default::default(),
        };
        let mut index = HashMap::new();
        for entry in fs::read_dir(store.dir.join(PACKS))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_suffix(".pack")
                .and_then(|h| u64::from_str_radix(h, 16).ok())
            else {
                continue;
            };
            // A pack cut short (a crash before its upload was acknowledged)
            // keeps what it holds whole; every read is checked anyway.
            if let Err(e) = scan_pack(&entry.path(), id, &mut index) {
                tracing::warn!(pack = %entry.path().display(), error = %e, "pack read in part");
            }
        }
        *store.index() = index;
        Ok(store)
    }

    fn index(&self) -> std::sync::MutexGuard<'_, HashMap<String, Packed>> {
        lock(&self.packed)
    }

    /// Notes that `digests` are about to be uploaded; returns the upload's id.
    /// `None` when the announcements not yet over hold
    /// [`MAX_ANNOUNCED`] digests already: the client then uploads
    /// everything before it submits, as with an older coordinator.
    pub fn announce(&self, digests: Vec<String>) -> Option<String> {
        let id = format!("{:016x}", rand_suffix());
        let mut announced = lock(&self.announced);
        let now = Instant::now();
        announced.retain(|_, a| a.carried || a.lapses > now);
        let held: usize = announced.values().map(|a| a.digests.len()).sum();
        if held + digests.len() > MAX_ANNOUNCED {
            return None;
        }
        announced.insert(
            id.clone(),
            Announcement {
                digests: digests.into_iter().collect(),
                lapses: now + ANNOUNCE_LAPSE,
                carried: false,
            },
        );
        Some(id)
    }

    /// The upload announced as `id` is running: its announcement lasts
    /// until the returned guard goes. `None` if it lapsed or never was.
    pub fn carry(&self, id: &str) -> Option<Carrying> {
        let mut announced = lock(&self.announced);
        let a = announced
            .get_mut(id)
            .filter(|a| a.carried || a.lapses > Instant::now())?;
        a.carried = true;
        Some(Carrying {
            announced: self.announced.clone(),
            id: id.to_string(),
        })
    }

    /// Whether an upload that is announced or running will bring `digest`.
    pub fn is_coming(&self, digest: &str) -> bool {
        let now = Instant::now();
        lock(&self.announced)
            .values()
            .any(|a| (a.carried || a.lapses > now) && a.digests.contains(digest))
    }

    /// Waits while `digest` is not here but an upload will bring it;
    /// returns whether it is here. (For blocking threads.)
    pub fn wait_for(&self, digest: &str) -> bool {
        loop {
            if self.has(digest) {
                return true;
            }
            if !self.is_coming(digest) {
                // It may have landed just as its upload ended.
                return self.has(digest);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(&digest[..2]).join(digest)
    }

    fn pack_path(&self, pack: u64) -> PathBuf {
        self.dir.join(PACKS).join(format!("{pack:016x}.pack"))
    }

    /// Its size, if it is here.
    fn size_of(&self, digest: &str) -> Option<u64> {
        if !is_digest(digest) {
            return None;
        }
        if let Some(p) = self.index().get(digest) {
            return Some(p.len);
        }
        fs::metadata(self.path(digest))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }

    /// Whether the blob is here.
    pub fn has(&self, digest: &str) -> bool {
        self.size_of(digest).is_some()
    }

    /// Whether the blob is here, marking it used now: a client that finds
    /// it here will not upload it, so it must outlive the next collection.
    pub fn has_fresh(&self, digest: &str) -> bool {
        self.missing_marking_fresh(vec![digest.to_string()])
            .is_empty()
    }

    /// Of `digests`, those not here; the others are marked used now, as
    /// [`BlobStore::has_fresh`] does, each pack once however many of its
    /// blobs are asked about (a relaunch asks about all of them).
    pub fn missing_marking_fresh(&self, digests: Vec<String>) -> Vec<String> {
        let touch = |path: PathBuf| {
            fs::File::options()
                .write(true)
                .open(path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()))
                .is_ok()
        };
        let mut packs: HashMap<u64, bool> = HashMap::new();
        digests
            .into_iter()
            .filter(|d| {
                if !is_digest(d) {
                    return true;
                }
                let packed = self.index().get(d).copied();
                let here = match packed {
                    Some(p) => *packs
                        .entry(p.pack)
                        .or_insert_with(|| touch(self.pack_path(p.pack))),
                    None => touch(self.path(d)),
                };
                !here
            })
            .collect()
    }

    /// Deletes every blob not in `keep` that was not uploaded or asked
    /// about for `idle`; returns how many went. Blobs of jobs that have not
    /// ended are always in `keep` ([`referenced`]).
    pub fn collect(&self, keep: &BTreeSet<String>, idle: std::time::Duration) -> usize {
        let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) else {
            return 0;
        };
        let mut gone = self.collect_packs(keep, idle, now);
        for shard in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if shard.file_name() == PACKS {
                continue;
            }
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

    /// Deletes every pack none of whose blobs is in `keep` and none asked
    /// about for `idle`; returns how many blobs went.
    fn collect_packs(
        &self,
        keep: &BTreeSet<String>,
        idle: std::time::Duration,
        now: std::time::Duration,
    ) -> usize {
        let mut blobs_of: HashMap<u64, Vec<String>> = HashMap::new();
        for (digest, p) in self.index().iter() {
            blobs_of.entry(p.pack).or_default().push(digest.clone());
        }
        let mut gone = 0;
        for (pack, digests) in blobs_of {
            if digests.iter().any(|d| keep.contains(d)) {
                continue;
            }
            let path = self.pack_path(pack);
            let age = fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|t| now.saturating_sub(t));
            if age.is_some_and(|a| a >= idle) {
                let mut index = self.index();
                // Out of the index first: a reader never finds a blob whose
                // pack is going.
                for d in &digests {
                    index.remove(d);
                }
                drop(index);
                if fs::remove_file(&path).is_ok() {
                    gone += digests.len();
                }
            }
        }
        // Temp packs of an upload that died.
        for entry in fs::read_dir(self.dir.join(PACKS))
            .into_iter()
            .flatten()
            .flatten()
        {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .is_some_and(|t| now.saturating_sub(t) >= idle);
            if old && entry.file_name().to_string_lossy().contains(".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
        gone
    }

    /// Every blob the jobs that have not ended ship: their manifests and the
    /// files those list.
    pub fn referenced(&self, state: &nembo_domain::state::State) -> BTreeSet<String> {
        let mut keep = BTreeSet::new();
        // A service's versions launch replicas long after their upload.
        let specs = state
            .jobs
            .values()
            .filter(|j| !j.state.is_terminal())
            .map(|j| &j.spec)
            .chain(state.services.values().flat_map(|s| s.versions.values()));
        for spec in specs {
            let manifests = spec
                .workdir_manifest
                .iter()
                .map(String::as_str)
                .chain(spec.file_mounts.values().filter_map(|m| m.local()?.1));
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
        let claim = self.claim(size)?;
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

    /// Counts `size` bytes in progress against the reserve, or refuses them.
    fn claim(&self, size: u64) -> Result<Claim, BlobError> {
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
        Ok(claim)
    }

    /// Keeps small blobs that came whole, in one new pack, each only if it
    /// hashes to its name (the room is checked once for them all). Returns
    /// their bytes and the pack, to be made durable with [`BlobStore::sync`].
    pub fn put_whole(&self, blobs: &[WholeBlob]) -> Result<(u64, PathBuf), BlobError> {
        let size = blobs.iter().map(|b| b.data.len() as u64).sum();
        let _claim = self.claim(size)?;
        for blob in blobs {
            if !is_digest(&blob.digest) {
                return Err(BlobError::Invalid(format!(
                    "'{}' is not a digest",
                    blob.digest
                )));
            }
            let got = nembo_proto::files::digest(&blob.data);
            if got != blob.digest {
                return Err(BlobError::Invalid(format!(
                    "blob {}: received {} bytes hashing to {got}",
                    blob.digest,
                    blob.data.len()
                )));
            }
        }
        let pack = rand_suffix();
        let path = self.pack_path(pack);
        let tmp = path.with_extension(format!("tmp{}", rand_suffix()));
        let mut bytes = Vec::with_capacity(size as usize + blobs.len() * PACK_HEADER as usize + 8);
        bytes.extend_from_slice(PACK_MAGIC);
        let mut placed = Vec::with_capacity(blobs.len());
        for blob in blobs {
            bytes.extend_from_slice(blob.digest.as_bytes());
            bytes.extend_from_slice(&(blob.data.len() as u64).to_le_bytes());
            placed.push((
                blob.digest.clone(),
                Packed {
                    pack,
                    offset: bytes.len() as u64,
                    len: blob.data.len() as u64,
                },
            ));
            bytes.extend_from_slice(&blob.data);
        }
        if let Err(e) = fs::write(&tmp, &bytes).and_then(|()| fs::rename(&tmp, &path)) {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
        self.index().extend(placed);
        Ok((size, path))
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

    /// A blob's content, opened for reading, and its size.
    pub fn open(&self, digest: &str) -> Result<(BlobReader, u64), BlobError> {
        if !is_digest(digest) {
            return Err(BlobError::Invalid(format!("'{digest}' is not a digest")));
        }
        let missing = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::NotFound => BlobError::Missing(digest.to_string()),
            _ => BlobError::Io(e),
        };
        let packed = self.index().get(digest).copied();
        if let Some(p) = packed {
            let mut file = fs::File::open(self.pack_path(p.pack)).map_err(missing)?;
            file.seek(SeekFrom::Start(p.offset))?;
            return Ok((file.take(p.len), p.len));
        }
        let file = fs::File::open(self.path(digest)).map_err(missing)?;
        let len = file.metadata()?.len();
        Ok((file.take(len), len))
    }

    /// A manifest blob, read, checked against its name and decoded.
    pub fn manifest(&self, digest: &str) -> Result<Manifest, BlobError> {
        let (mut file, len) = self.open(digest)?;
        if len > nembo_proto::files::MAX_MANIFEST_BYTES {
            return Err(BlobError::Invalid(format!(
                "manifest {digest} is {len} bytes; the limit is {}",
                nembo_proto::files::MAX_MANIFEST_BYTES
            )));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.read_to_end(&mut bytes)?;
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
            .filter(|(_, size, d)| self.size_of(d) != Some(*size))
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

/// Where packs are kept, under the store's directory.
const PACKS: &str = "packs";

/// Adds what the pack at `path` holds to `index`.
fn scan_pack(path: &Path, pack: u64, index: &mut HashMap<String, Packed>) -> std::io::Result<()> {
    let mut file = std::io::BufReader::new(fs::File::open(path)?);
    let total = file.get_ref().metadata()?.len();
    let mut magic = [0u8; 8];
    file.read_exact(&mut magic)?;
    if &magic != PACK_MAGIC {
        return Err(std::io::Error::other("not a pack"));
    }
    let mut at = magic.len() as u64;
    let mut header = [0u8; PACK_HEADER as usize];
    while at + PACK_HEADER <= total {
        file.read_exact(&mut header)?;
        let digest = std::str::from_utf8(&header[..64]).unwrap_or_default();
        let mut len = [0u8; 8];
        len.copy_from_slice(&header[64..]);
        let len = u64::from_le_bytes(len);
        let offset = at + PACK_HEADER;
        if !is_digest(digest) || offset + len > total {
            return Err(std::io::Error::other(format!("cut short at byte {at}")));
        }
        index.insert(digest.to_string(), Packed { pack, offset, len });
        file.seek_relative(len as i64)?;
        at = offset + len;
    }
    Ok(())
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
    fn whole_blobs_are_kept_only_if_each_hashes_to_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().to_path_buf()).unwrap();
        let blob = |data: &[u8]| WholeBlob {
            digest: nembo_proto::files::digest(data),
            data: data.to_vec(),
        };
        let (a, b) = (blob(b"alpha"), blob(b"beta"));
        let (bytes, _pack) = store.put_whole(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(bytes, 9);
        assert!(store.has(&a.digest) && store.has(&b.digest));
        let mut forged = blob(b"gamma");
        forged.data = b"gammx".to_vec();
        assert!(matches!(
            store.put_whole(&[forged.clone()]),
            Err(BlobError::Invalid(_))
        ));
        assert!(!store.has(&forged.digest));
        let mut escape = blob(b"x");
        escape.digest = "../../etc/passwd".into();
        assert!(store.put_whole(&[escape]).is_err());
        assert_eq!(
            walk(dir.path()).len(),
            1,
            "one pack; nothing half-written is left"
        );
        let (mut r, len) = store.open(&b.digest).unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!((got, len), (b"beta".to_vec(), 4));

        // A restarted coordinator finds them again; a pack cut short keeps
        // what it holds whole.
        let pack = walk(dir.path()).pop().unwrap();
        let full = fs::read(&pack).unwrap();
        fs::write(&pack, &full[..full.len() - 2]).unwrap();
        let again = BlobStore::new(dir.path().to_path_buf()).unwrap();
        assert!(again.has(&a.digest), "the first blob is whole");
        assert!(!again.has(&b.digest), "the second was cut short");
    }

    #[test]
    fn announcements_are_bounded_and_end_with_their_upload() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().to_path_buf()).unwrap();
        let d = nembo_proto::files::digest(b"coming");
        let id = store.announce(vec![d.clone()]).expect("room");
        assert!(store.is_coming(&d));
        let carrying = store.carry(&id).expect("announced");
        drop(carrying);
        assert!(!store.is_coming(&d), "gone with its upload");
        assert!(store.carry(&id).is_none());
        // Past the bound, no announcement: the client uploads first.
        let many: Vec<String> = (0..MAX_ANNOUNCED).map(|i| format!("{i:064x}")).collect();
        assert!(store.announce(many).is_some());
        assert!(store.announce(vec![d.clone()]).is_none());
        assert!(!store.is_coming(&d));
    }

    #[test]
    fn a_pack_goes_when_none_of_its_blobs_is_kept_or_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().to_path_buf()).unwrap();
        let blob = |data: &[u8]| WholeBlob {
            digest: nembo_proto::files::digest(data),
            data: data.to_vec(),
        };
        let (a, b, c) = (blob(b"a"), blob(b"b"), blob(b"c"));
        store.put_whole(&[a.clone(), b.clone()]).unwrap();
        store.put_whole(std::slice::from_ref(&c)).unwrap();
        let keep: BTreeSet<String> = [a.digest.clone()].into();
        assert_eq!(
            store.collect(&keep, std::time::Duration::from_secs(3600)),
            0
        );
        // The pack that holds a kept blob stays whole; the other goes.
        assert_eq!(store.collect(&keep, std::time::Duration::ZERO), 1);
        assert!(store.has(&a.digest) && store.has(&b.digest) && !store.has(&c.digest));
        assert!(store.has_fresh(&b.digest));
        assert_eq!(walk(dir.path()).len(), 1);
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
