//! Durable Raft storage: raft-engine holds the log, HardState and ConfState;
//! the state machine is snapshotted to `snapshot.json` (written to a temp
//! file, fsynced, renamed, directory fsynced) and the log compacted behind it.
//!
//! raft-rs reads through its `Storage` trait; we serve it from a `MemStorage`
//! mirror that is only ever written after the same data is durable in
//! raft-engine, and rebuilt from raft-engine at start.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::StorageError;
use nembo_domain::state::State;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::Storage;
use raft_engine::{Command as EngineCommand, Engine, LogBatch, MessageExt};
use serde::{Deserialize, Serialize};

/// The single Raft group this coordinator runs.
const GROUP: u64 = 1;
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
const KEY_MEMBERS: &[u8] = b"members";
const SNAPSHOT_FILE: &str = "snapshot.json";

/// Tells raft-engine how to index raft-rs entries.
#[derive(Clone)]
pub struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;
    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// The state machine on disk, as of `index`.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    index: u64,
    term: u64,
    voters: Vec<u64>,
    learners: Vec<u64>,
    /// Member URLs as of `index` (conf changes carry them).
    #[serde(default)]
    members: BTreeMap<u64, String>,
    state: State,
}

/// A snapshot captured on the Raft thread, not yet encoded or written.
pub struct PendingSnapshot {
    file: SnapshotFile,
    conf_state: ConfState,
    dir: PathBuf,
    /// Size of the previous snapshot: encoding into a buffer of about the
    /// right size spares copying and page faults while it grows.
    size_hint: u64,
}

/// A snapshot durable in its temp file, not yet the current one.
pub struct WrittenSnapshot {
    file: SnapshotFile,
    conf_state: ConfState,
    bytes: Vec<u8>,
    tmp: PathBuf,
}

impl PendingSnapshot {
    /// Its index.
    pub fn index(&self) -> u64 {
        self.file.index
    }

    /// Encodes and writes it to a temp file of its own, fsynced. The costly
    /// part of a snapshot (tens of MB for 100k jobs), so callers run it off
    /// the Raft thread.
    pub fn write(self) -> Result<WrittenSnapshot, StorageError> {
        let mut bytes = Vec::with_capacity((self.size_hint + self.size_hint / 8) as usize);
        serde_json::to_writer(&mut bytes, &self.file).map_err(storage_err)?;
        let tmp = self
            .dir
            .join(format!("{SNAPSHOT_FILE}.{}.tmp", self.file.index));
        let mut f = fs::File::create(&tmp).map_err(storage_err)?;
        f.write_all(&bytes).map_err(storage_err)?;
        f.sync_all().map_err(storage_err)?;
        Ok(WrittenSnapshot {
            file: self.file,
            conf_state: self.conf_state,
            bytes,
            tmp,
        })
    }
}

/// What raft-rs reads: the in-memory mirror of the log, plus the newest
/// state-machine snapshot *with its data*, which is what a follower behind
/// the compacted log is sent. (`MemStorage` alone would send metadata only.)
#[derive(Clone)]
pub struct NemboStorage {
    mem: MemStorage,
    latest: Arc<Mutex<Option<Snapshot>>>,
}

impl Storage for NemboStorage {
    fn initial_state(&self) -> raft::Result<raft::RaftState> {
        self.mem.initial_state()
    }
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: raft::GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }
    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }
    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }
    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        match &*self.latest.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(s) if s.get_metadata().index >= request_index => Ok(s.clone()),
            _ => Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            )),
        }
    }
}

/// Log, hard state and snapshots of one member.
pub struct RaftStore {
    engine: Arc<Engine>,
    storage: NemboStorage,
    mem: MemStorage,
    dir: PathBuf,
    snapshot_index: u64,
    snapshot_bytes: u64,
}

/// What a member recovers at start.
pub struct Recovered {
    /// The storage, ready for `RawNode::new`.
    pub store: RaftStore,
    /// State machine as of `applied`.
    pub state: State,
    /// Index the state machine reflects; pass as `Config::applied`.
    pub applied: u64,
    /// Member URLs last persisted (empty on a fresh store).
    pub members: BTreeMap<u64, String>,
}

fn storage_err(e: impl std::fmt::Display) -> StorageError {
    StorageError(e.to_string())
}

impl RaftStore {
    /// Opens (or creates) the store in `dir`. A fresh store starts with
    /// `initial_voters` as its configuration.
    pub fn open(dir: &Path, initial_voters: &[u64]) -> Result<Recovered, StorageError> {
        fs::create_dir_all(dir).map_err(storage_err)?;
        let cfg = raft_engine::Config {
            dir: dir.join("raft-log").to_string_lossy().into_owned(),
            target_file_size: raft_engine::ReadableSize::mb(16),
            purge_threshold: raft_engine::ReadableSize::mb(64),
            ..Default::default()
        };
        let engine = Arc::new(Engine::open(cfg).map_err(storage_err)?);
        let mem = MemStorage::new();

        let mut latest = None;
        let (state, applied, mut conf, mut members) = match read_snapshot(dir)? {
            Some((s, bytes)) => {
                let snap = to_raft_snapshot(&s, bytes);
                mem.wl().apply_snapshot(snap.clone()).map_err(storage_err)?;
                latest = Some(snap);
                let cs = ConfState {
                    voters: s.voters,
                    learners: s.learners,
                    ..Default::default()
                };
                (s.state, s.index, Some(cs), s.members)
            }
            None => (State::default(), 0, None, BTreeMap::new()),
        };
        if let Some(bytes) = engine.get(GROUP, KEY_MEMBERS) {
            members = serde_json::from_slice(&bytes).map_err(storage_err)?;
        }

        if let (Some(first), Some(last)) = (engine.first_index(GROUP), engine.last_index(GROUP)) {
            let from = first.max(applied + 1);
            if from <= last {
                let mut entries = Vec::new();
                engine
                    .fetch_entries_to::<EntryExt>(GROUP, from, last + 1, None, &mut entries)
                    .map_err(storage_err)?;
                mem.wl().append(&entries).map_err(storage_err)?;
            }
        }
        if let Some(cs) = engine
            .get_message::<ConfState>(GROUP, KEY_CONF_STATE)
            .map_err(storage_err)?
        {
            conf = Some(cs);
        }
        let conf = conf.unwrap_or_else(|| ConfState {
            voters: initial_voters.to_vec(),
            ..Default::default()
        });
        mem.wl().set_conf_state(conf);
        if let Some(mut hs) = engine
            .get_message::<HardState>(GROUP, KEY_HARD_STATE)
            .map_err(storage_err)?
        {
            hs.commit = hs.commit.max(applied);
            mem.wl().set_hardstate(hs);
        }
        let snapshot_bytes = latest.as_ref().map_or(0, |s| s.data.len() as u64);
        Ok(Recovered {
            store: RaftStore {
                engine,
                storage: NemboStorage {
                    mem: mem.clone(),
                    latest: Arc::new(Mutex::new(latest)),
                },
                mem,
                dir: dir.to_path_buf(),
                snapshot_index: applied,
                snapshot_bytes,
            },
            state,
            applied,
            members,
        })
    }

    /// The `Storage` raft-rs reads.
    pub fn storage(&self) -> NemboStorage {
        self.storage.clone()
    }

    /// Index of the newest snapshot.
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot_index
    }

    /// Size of the newest snapshot, encoded.
    pub fn snapshot_bytes(&self) -> u64 {
        self.snapshot_bytes
    }

    /// Appends entries and hard state in one batch; with `sync`, fsyncs
    /// before returning. Only then is the in-memory mirror updated.
    pub fn append(
        &self,
        entries: &[Entry],
        hs: Option<&HardState>,
        sync: bool,
    ) -> Result<(), StorageError> {
        let mut batch = LogBatch::default();
        if !entries.is_empty() {
            batch
                .add_entries::<EntryExt>(GROUP, entries)
                .map_err(storage_err)?;
        }
        if let Some(hs) = hs {
            batch
                .put_message(GROUP, KEY_HARD_STATE.to_vec(), hs)
                .map_err(storage_err)?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.engine.write(&mut batch, sync).map_err(storage_err)?;
        let mut w = self.mem.wl();
        if !entries.is_empty() {
            w.append(entries).map_err(storage_err)?;
        }
        if let Some(hs) = hs {
            w.set_hardstate(hs.clone());
        }
        Ok(())
    }

    /// Records a new commit index (not fsynced: a lost commit index is
    /// recomputed by Raft, a lost entry is not).
    pub fn set_commit(&self, commit: u64) -> Result<(), StorageError> {
        let mut hs = self.mem.initial_state().map_err(storage_err)?.hard_state;
        if hs.commit >= commit {
            return Ok(());
        }
        hs.commit = commit;
        self.append(&[], Some(&hs), false)
    }

    /// Persists the configuration and member URLs after a conf change.
    pub fn set_conf_state(
        &self,
        cs: &ConfState,
        members: &BTreeMap<u64, String>,
    ) -> Result<(), StorageError> {
        let mut batch = LogBatch::default();
        batch
            .put_message(GROUP, KEY_CONF_STATE.to_vec(), cs)
            .map_err(storage_err)?;
        batch
            .put(
                GROUP,
                KEY_MEMBERS.to_vec(),
                serde_json::to_vec(members).map_err(storage_err)?,
            )
            .map_err(storage_err)?;
        self.engine.write(&mut batch, true).map_err(storage_err)?;
        self.mem.wl().set_conf_state(cs.clone());
        Ok(())
    }

    /// Writes the state machine as of `index` durably, then drops the log
    /// before it, all on this thread.
    pub fn snapshot(
        &mut self,
        state: &State,
        members: &BTreeMap<u64, String>,
        index: u64,
    ) -> Result<(), StorageError> {
        let written = self.begin_snapshot(state, members, index)?.write()?;
        self.finish_snapshot(written)
    }

    /// Captures the state as of `index` for [`PendingSnapshot::write`],
    /// which may run on another thread (the state is a persistent map:
    /// capturing it copies nothing).
    pub fn begin_snapshot(
        &self,
        state: &State,
        members: &BTreeMap<u64, String>,
        index: u64,
    ) -> Result<PendingSnapshot, StorageError> {
        let term = self.mem.term(index).map_err(storage_err)?;
        let cs = self.mem.initial_state().map_err(storage_err)?.conf_state;
        Ok(PendingSnapshot {
            file: SnapshotFile {
                index,
                term,
                voters: cs.voters.clone(),
                learners: cs.learners.clone(),
                members: members.clone(),
                state: state.clone(),
            },
            conf_state: cs,
            dir: self.dir.clone(),
            size_hint: self.snapshot_bytes,
        })
    }

    /// Makes a written snapshot the current one and compacts the log behind
    /// it, unless a newer snapshot (one installed from the leader, or an
    /// explicit compaction) overtook it meanwhile.
    pub fn finish_snapshot(&mut self, written: WrittenSnapshot) -> Result<(), StorageError> {
        let WrittenSnapshot {
            file,
            conf_state: cs,
            bytes,
            tmp,
        } = written;
        let (index, term) = (file.index, file.term);
        let snapshot_len = bytes.len() as u64;
        if index <= self.snapshot_index {
            let _ = fs::remove_file(&tmp);
            return Ok(());
        }
        fs::rename(&tmp, self.dir.join(SNAPSHOT_FILE)).map_err(storage_err)?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(storage_err)?;
        *self
            .storage
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(to_raft_snapshot(&file, bytes));
        self.snapshot_bytes = snapshot_len;
        self.engine.compact_to(GROUP, index + 1);
        // Compact the in-memory log through `index` itself. MemStorage's
        // `compact` would leave its snapshot index behind (and derive a last
        // index of 0 from an empty log), so rebase it on the snapshot and put
        // back what follows. A member added later then starts from the
        // snapshot, which carries the configuration it has never seen.
        let last = self.mem.last_index().map_err(storage_err)?;
        let rest = if last > index {
            self.mem
                .entries(
                    index + 1,
                    last + 1,
                    None,
                    raft::GetEntriesContext::empty(false),
                )
                .map_err(storage_err)?
        } else {
            Vec::new()
        };
        let mut meta_only = Snapshot::default();
        let md = meta_only.mut_metadata();
        md.index = index;
        md.term = term;
        md.set_conf_state(cs);
        let first = self.mem.first_index().map_err(storage_err)?;
        // A conf change may have been applied since the snapshot was begun.
        let conf_now = self.mem.initial_state().map_err(storage_err)?.conf_state;
        let mut w = self.mem.wl();
        let hs = w.hard_state().clone();
        if first <= index {
            w.apply_snapshot(meta_only).map_err(storage_err)?;
            w.set_hardstate(hs);
            w.set_conf_state(conf_now);
            if !rest.is_empty() {
                w.append(&rest).map_err(storage_err)?;
            }
        }
        drop(w);
        self.engine.purge_expired_files().map_err(storage_err)?;
        self.snapshot_index = index;
        Ok(())
    }

    /// Installs a snapshot received from the leader: it replaces the state
    /// machine and the whole log. Returns the state and member URLs it carries.
    pub fn install_snapshot(
        &mut self,
        snap: &Snapshot,
    ) -> Result<(State, BTreeMap<u64, String>), StorageError> {
        let file: SnapshotFile = serde_json::from_slice(&snap.data)
            .map_err(|e| storage_err(format!("snapshot from leader: {e}")))?;
        self.write_snapshot_file(&snap.data)?;
        let md = snap.get_metadata();
        let mut hs = self.mem.initial_state().map_err(storage_err)?.hard_state;
        hs.commit = hs.commit.max(md.index);
        let mut batch = LogBatch::default();
        batch.add_command(GROUP, EngineCommand::Clean);
        batch
            .put_message(GROUP, KEY_HARD_STATE.to_vec(), &hs)
            .map_err(storage_err)?;
        batch
            .put_message(GROUP, KEY_CONF_STATE.to_vec(), md.get_conf_state())
            .map_err(storage_err)?;
        batch
            .put(
                GROUP,
                KEY_MEMBERS.to_vec(),
                serde_json::to_vec(&file.members).map_err(storage_err)?,
            )
            .map_err(storage_err)?;
        self.engine.write(&mut batch, true).map_err(storage_err)?;
        let mut w = self.mem.wl();
        w.apply_snapshot(snap.clone()).map_err(storage_err)?;
        w.set_hardstate(hs);
        drop(w);
        *self
            .storage
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(snap.clone());
        self.snapshot_index = md.index;
        self.snapshot_bytes = snap.data.len() as u64;
        Ok((file.state, file.members))
    }

    fn write_snapshot_file(&self, bytes: &[u8]) -> Result<(), StorageError> {
        let tmp = self.dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        {
            let mut f = fs::File::create(&tmp).map_err(storage_err)?;
            f.write_all(bytes).map_err(storage_err)?;
            f.sync_all().map_err(storage_err)?;
        }
        fs::rename(&tmp, self.dir.join(SNAPSHOT_FILE)).map_err(storage_err)?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(storage_err)
    }
}

/// A raft-rs snapshot whose data is `bytes`, the encoded [`SnapshotFile`] `s`.
fn to_raft_snapshot(s: &SnapshotFile, bytes: Vec<u8>) -> Snapshot {
    let mut snap = Snapshot {
        data: bytes.into(),
        ..Default::default()
    };
    let md = snap.mut_metadata();
    md.index = s.index;
    md.term = s.term;
    md.mut_conf_state().voters = s.voters.clone();
    md.mut_conf_state().learners = s.learners.clone();
    snap
}

fn read_snapshot(dir: &Path) -> Result<Option<(SnapshotFile, Vec<u8>)>, StorageError> {
    let path = dir.join(SNAPSHOT_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(|f| Some((f, bytes)))
            .map_err(|e| storage_err(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(storage_err(e)),
    }
}
