//! Fencing: the agent takes orders only from the newest leader it has heard.
//!
//! Every order a coordinator sends (the session's welcome, `RunJob`,
//! `StopJob`) carries the Raft term of the leader that sent it. A leader cut
//! off by a partition may still believe it leads for up to an election
//! timeout; once this agent has heard from a leader of a higher term, orders
//! from the older one are refused. The highest term is kept on disk, so a
//! restarted agent stays fenced.

use std::io::Write;
use std::path::{Path, PathBuf};

/// An order from a leader older than one already obeyed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("order from a leader of term {term}, but a leader of term {newest} has spoken since")]
pub struct Stale {
    /// The order's term.
    pub term: u64,
    /// The newest term seen.
    pub newest: u64,
}

/// The newest leader term seen, persisted in `<work dir>/fence-term`.
#[derive(Debug)]
pub struct Fence {
    path: PathBuf,
    newest: u64,
}

impl Fence {
    /// Loads the newest term seen (0 when none was).
    pub fn open(work_dir: &Path) -> std::io::Result<Fence> {
        let path = work_dir.join("fence-term");
        let newest = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok(Fence { path, newest })
    }

    /// The newest term seen.
    pub fn newest(&self) -> u64 {
        self.newest
    }

    /// Admits an order from a leader of `term`, remembering a newer term
    /// durably before it is acted on.
    pub fn admit(&mut self, term: u64) -> Result<(), Stale> {
        if term < self.newest {
            return Err(Stale {
                term,
                newest: self.newest,
            });
        }
        if term > self.newest {
            if let Err(e) = self.persist(term) {
                // Still fenced in memory; only a restart could forget it.
                tracing::warn!(error = %e, "could not persist the fencing term");
            }
            self.newest = term;
        }
        Ok(())
    }

    fn persist(&self, term: u64) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(term.to_string().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_leaders_are_refused_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut fence = Fence::open(dir.path()).unwrap();
        fence.admit(3).unwrap();
        fence.admit(3).unwrap();
        fence.admit(5).unwrap();
        assert_eq!(fence.admit(4), Err(Stale { term: 4, newest: 5 }));
        let mut again = Fence::open(dir.path()).unwrap();
        assert_eq!(again.newest(), 5);
        assert!(again.admit(4).is_err());
        again.admit(6).unwrap();
    }
}
