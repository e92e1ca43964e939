//! raft-rs logs through slog; this drain hands its records to `tracing`
//! (target `raft`), so elections and refused messages show up in the
//! coordinator's log with everything else instead of being discarded.

use std::fmt;

/// A slog drain that emits each record as a `tracing` event.
pub struct TracingDrain;

/// The raft-rs logger of member `id`.
pub fn logger(id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("member" => id))
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        // Formatted only if the event is enabled: raft-rs logs at debug on
        // every message, and that must cost nothing when filtered out.
        let line = Line { record, values };
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{line}"),
            slog::Level::Warning => tracing::warn!(target: "raft", "{line}"),
            slog::Level::Info => tracing::info!(target: "raft", "{line}"),
            slog::Level::Debug => tracing::debug!(target: "raft", "{line}"),
            slog::Level::Trace => tracing::trace!(target: "raft", "{line}"),
        }
        Ok(())
    }
}

struct Line<'a> {
    record: &'a slog::Record<'a>,
    values: &'a slog::OwnedKVList,
}

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use slog::KV as _;
        write!(f, "{}", self.record.msg())?;
        let mut kv = KeyValues(f);
        let _ = self.record.kv().serialize(self.record, &mut kv);
        let _ = self.values.serialize(self.record, &mut kv);
        Ok(())
    }
}

struct KeyValues<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl slog::Serializer for KeyValues<'_, '_> {
    fn emit_arguments(&mut self, key: slog::Key, val: &fmt::Arguments) -> slog::Result {
        write!(self.0, " {key}={val}").map_err(|_| slog::Error::Fmt(fmt::Error))
    }
}
