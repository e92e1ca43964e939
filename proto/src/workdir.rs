//! A task's workdir, measured before it is copied: the CLI reports its size
//! at launch and the agent refuses one past the limits before copying.

use std::path::Path;

/// The most a workdir may hold: it is copied whole before every attempt.
/// Data belongs in a bucket or a file mount.
pub const WORKDIR_MAX_BYTES: u64 = 2 << 30;
/// And the most entries (files, directories, links).
pub const WORKDIR_MAX_FILES: u64 = 100_000;

/// The entries and bytes under `src` (links not followed), refused as soon
/// as either passes its limit, so a mistaken `/` is found out in moments.
pub fn size(src: &Path) -> std::io::Result<(u64, u64)> {
    let too_big = |what: String| {
        std::io::Error::other(format!(
            "workdir {}: {what}; the limit is {WORKDIR_MAX_FILES} entries and {} GiB (put data in a bucket or a file mount)",
            src.display(),
            WORKDIR_MAX_BYTES >> 30
        ))
    };
    if !std::fs::symlink_metadata(src)?.is_dir() {
        return Err(std::io::Error::other(format!(
            "workdir {} is not a directory",
            src.display()
        )));
    }
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut todo = vec![src.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            files += 1;
            bytes += meta.len();
            if files > WORKDIR_MAX_FILES {
                return Err(too_big(format!("more than {WORKDIR_MAX_FILES} entries")));
            }
            if bytes > WORKDIR_MAX_BYTES {
                return Err(too_big(format!(
                    "more than {} GiB",
                    WORKDIR_MAX_BYTES >> 30
                )));
            }
            if meta.is_dir() {
                todo.push(entry.path());
            }
        }
    }
    Ok((files, bytes))
}
