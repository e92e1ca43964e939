//! The wall clock, read in one place. Commands carry the time they were
//! proposed at (`at_ms`), read here by the proposer, so that applying them
//! stays deterministic.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds (0 for a clock set before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
