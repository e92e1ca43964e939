//! Job output held by the coordinator: one file per (job, attempt, rank),
//! appended from the agents' log stream. Output is not cluster state and
//! never goes through Raft; the node keeps the original.
//!
//! Appends carry the byte offset in the node's file, so a chunk resent after
//! a reconnect is written once, and a reader always sees a prefix of the
//! node's file.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use tokio::sync::watch;

/// One log: a rank of an attempt of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LogKey {
    pub job: u64,
    /// Attempt number.
    pub attempt: u32,
    pub rank: u32,
}

#[derive(Debug, Default, Clone, Copy)]
struct LogMeta {
    size: u64,
    final_size: Option<u64>,
}

/// Log files plus a change counter readers can wait on.
pub struct LogStore {
    dir: PathBuf,
    // A std mutex: held only for metadata lookups and one small file append,
    // never across an await.
    meta: Mutex<HashMap<LogKey, LogMeta>>,
    version: watch::Sender<u64>,
}

impl LogStore {
    /// Logs live under `dir`.
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            meta: Mutex::new(HashMap::new()),
            version: watch::channel(0).0,
        })
    }

    fn path(&self, k: LogKey) -> PathBuf {
        self.dir
            .join(k.job.to_string())
            .join(format!("{}.{}.log", k.attempt, k.rank))
    }

    fn meta_of(&self, map: &mut HashMap<LogKey, LogMeta>, k: LogKey) -> LogMeta {
        *map.entry(k).or_insert_with(|| LogMeta {
            size: fs::metadata(self.path(k)).map(|m| m.len()).unwrap_or(0),
            final_size: None,
        })
    }

    /// Bytes held for `k`.
    pub fn size(&self, k: LogKey) -> u64 {
        let mut map = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        self.meta_of(&mut map, k).size
    }

    /// Appends the part of `data` (which starts at `offset` in the node's
    /// file) that is new. A gap (offset past the end) is refused.
    pub fn append(&self, k: LogKey, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut map = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let mut m = self.meta_of(&mut map, k);
        if offset > m.size {
            return Err(std::io::Error::other(format!(
                "log gap for job {} rank {}: have {} bytes, got offset {offset}",
                k.job, k.rank, m.size
            )));
        }
        let skip = (m.size - offset) as usize;
        if skip >= data.len() {
            return Ok(());
        }
        let path = self.path(k);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        f.write_all(&data[skip..])?;
        m.size += (data.len() - skip) as u64;
        map.insert(k, m);
        drop(map);
        self.version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Records the node's final size for `k` (its job ended there).
    pub fn set_final(&self, k: LogKey, size: u64) {
        let mut map = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let mut m = self.meta_of(&mut map, k);
        m.final_size = Some(size);
        map.insert(k, m);
        drop(map);
        self.version.send_modify(|v| *v += 1);
    }

    /// Whether everything the node wrote for `k` has arrived.
    pub fn is_complete(&self, k: LogKey) -> bool {
        let mut map = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let m = self.meta_of(&mut map, k);
        m.final_size.is_some_and(|f| m.size >= f)
    }

    /// Up to `max` bytes of `k` from `from`.
    pub fn read(&self, k: LogKey, from: u64, max: usize) -> std::io::Result<Vec<u8>> {
        let mut f = match fs::File::open(self.path(k)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(from))?;
        let mut buf = Vec::with_capacity(max.min(64 * 1024));
        f.take(max as u64).read_to_end(&mut buf)?;
        Ok(buf)
    }

    /// Wakes on every append.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resent_chunks_are_written_once_and_gaps_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = LogStore::new(d.path().into()).unwrap();
        let k = LogKey {
            job: 1,
            attempt: 1,
            rank: 0,
        };
        s.append(k, 0, b"hello ").unwrap();
        s.append(k, 0, b"hello wor").unwrap();
        s.append(k, 6, b"world\n").unwrap();
        assert_eq!(s.read(k, 0, 100).unwrap(), b"hello world\n");
        assert!(s.append(k, 100, b"x").is_err());
        assert!(!s.is_complete(k));
        s.set_final(k, 12);
        assert!(s.is_complete(k));
        // A new store over the same directory picks up the size from disk.
        let s2 = LogStore::new(d.path().into()).unwrap();
        assert_eq!(s2.size(k), 12);
    }
}
