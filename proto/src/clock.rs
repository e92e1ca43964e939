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

/// A wire timestamp of unix ms; `None` for 0, which the state uses for
/// "not yet".
pub fn timestamp(ms: i64) -> Option<prost_types::Timestamp> {
    (ms != 0).then(|| prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

/// Unix ms of a wire timestamp; 0 when absent.
pub fn unix_ms(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map_or(0, |t| {
        t.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(t.nanos) / 1_000_000)
    })
}

/// A wire duration of `ms` milliseconds.
pub fn duration(ms: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Milliseconds of a wire duration; `None` when absent. Negative and
/// out-of-range durations come back as they are, for the caller to refuse.
pub fn millis(d: Option<&prost_types::Duration>) -> Option<i64> {
    d.map(|d| {
        d.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(d.nanos) / 1_000_000)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_times_round_trip_to_the_millisecond() {
        for ms in [1, 999, 1_767_636_120_123, -1_500] {
            assert_eq!(unix_ms(timestamp(ms).as_ref()), ms);
            assert_eq!(millis(Some(&duration(ms))), Some(ms));
        }
        assert_eq!(timestamp(0), None);
        assert_eq!(unix_ms(None), 0);
        assert_eq!(millis(None), None);
    }
}
