//! Local files shipped to nodes (`file_mounts` with a local source, and
//! `workdir`), content-addressed: the client uploads each distinct file
//! once (PutBlobs, keyed by its BLAKE3 digest) plus a manifest naming every entry,
//! and agents fetch what they do not already hold (FetchBlobs). A relaunch
//! or a second node moves only what changed.
//!
//! The manifest is the contract between the three: the client writes it,
//! the coordinators check it before a task is accepted, the agent follows
//! it. Its checks are the same on every side.
//!
//! Every byte shipped is hashed three times (by the client to name it, by
//! the coordinators and the agent to check it): BLAKE3 does that several
//! times faster than SHA-256 on CPUs without SHA extensions.

use serde::{Deserialize, Serialize};

/// The most entries (files, directories, links) one task may ship, over
/// its workdir and every local file mount.
pub const MAX_ENTRIES: usize = 100_000;
/// The most bytes one task may ship that way. Data sets belong in a bucket.
pub const MAX_BYTES: u64 = 20 << 30;
/// The largest manifest (about 100 000 entries with long paths).
pub const MAX_MANIFEST_BYTES: u64 = 32 << 20;
/// The longest path of an entry.
pub const MAX_PATH_BYTES: usize = 4096;

/// Size of one piece of a blob on the wire.
pub const PIECE_BYTES: usize = 2 << 20;

/// Blobs up to this size travel whole, many to a message
/// ([`WholeBatch`]): for ten thousand small files, a message and a
/// round of channel hand-offs each cost more than their bytes.
pub const WHOLE_MAX: u64 = 256 << 10;

/// Small blobs gathered into messages of at most [`PIECE_BYTES`].
#[derive(Default)]
pub struct WholeBatch {
    blobs: Vec<crate::v1::WholeBlob>,
    bytes: usize,
}

impl WholeBatch {
    /// Adds a blob (at most [`WHOLE_MAX`] bytes); returns the batch so far,
    /// to be sent, when this one would not fit in it.
    pub fn push(&mut self, digest: String, data: Vec<u8>) -> Option<Vec<crate::v1::WholeBlob>> {
        let full = (self.bytes + data.len() > PIECE_BYTES)
            .then(|| self.take())
            .flatten();
        self.bytes += data.len();
        self.blobs.push(crate::v1::WholeBlob { digest, data });
        full
    }

    /// What is gathered, if anything; the batch is left empty.
    pub fn take(&mut self) -> Option<Vec<crate::v1::WholeBlob>> {
        self.bytes = 0;
        (!self.blobs.is_empty()).then(|| std::mem::take(&mut self.blobs))
    }
}

/// What a local source holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The source was one file: `entries` is that file alone, at path "".
    #[serde(default)]
    pub single_file: bool,
    /// Every entry, parents before children.
    pub entries: Vec<Entry>,
}

/// One entry, by its path below the source (`/`-separated, relative).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    /// Unix permission bits.
    pub mode: u32,
    #[serde(flatten)]
    pub kind: Kind,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Kind {
    Dir,
    /// A regular file: its size and BLAKE3 digest.
    File {
        size: u64,
        digest: String,
    },
    /// A symbolic link, copied as a link (as rsync -a does).
    Symlink {
        target: String,
    },
}

impl Manifest {
    /// Canonical bytes: the manifest is a blob like any other.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads and checks a manifest.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
        m.check()?;
        Ok(m)
    }

    /// Bytes of every file (saturating: a forged size cannot wrap past
    /// the limit).
    pub fn bytes(&self) -> u64 {
        self.files()
            .fold(0u64, |sum, (_, size, _)| sum.saturating_add(size))
    }

    /// Every file: (path, size, digest).
    pub fn files(&self) -> impl Iterator<Item = (&str, u64, &str)> {
        self.entries.iter().filter_map(|e| match &e.kind {
            Kind::File { size, digest } => Some((e.path.as_str(), *size, digest.as_str())),
            _ => None,
        })
    }

    /// Refuses what would write outside the destination or is not what it
    /// claims: absolute paths, `..`, links that point outside the source,
    /// bad digests, and more than the limits.
    pub fn check(&self) -> Result<(), String> {
        if self.entries.len() > MAX_ENTRIES {
            return Err(format!(
                "{} entries; the limit is {MAX_ENTRIES}",
                self.entries.len()
            ));
        }
        if self.bytes() > MAX_BYTES {
            return Err(format!(
                "{} bytes; the limit is {} GiB (put data sets in a bucket)",
                self.bytes(),
                MAX_BYTES >> 30
            ));
        }
        if self.single_file
            && !(self.entries.len() == 1
                && self.entries[0].path.is_empty()
                && matches!(self.entries[0].kind, Kind::File { .. }))
        {
            return Err("a single-file manifest must hold one file at path \"\"".into());
        }
        let links: std::collections::BTreeSet<&str> = self
            .entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::Symlink { .. }))
            .map(|e| e.path.as_str())
            .collect();
        for e in &self.entries {
            if e.path.len() > MAX_PATH_BYTES {
                return Err(format!(
                    "an entry's path is longer than {MAX_PATH_BYTES} bytes"
                ));
            }
            // Nothing is written through a link: an entry below one could
            // land anywhere the link leads.
            if below_a_link(&e.path, &links) {
                return Err(format!(
                    "entry '{}' lies below a link of the source",
                    e.path
                ));
            }
            if !(self.single_file || is_relative_inside(&e.path)) {
                return Err(format!(
                    "entry '{}': not a relative path inside the source",
                    e.path
                ));
            }
            match &e.kind {
                Kind::File { digest, .. } if !is_digest(digest) => {
                    return Err(format!("entry '{}': '{digest}' is not a digest", e.path));
                }
                Kind::Symlink { target } if !link_stays_inside(&e.path, target, &links) => {
                    return Err(format!(
                        "entry '{}': the link points to '{target}', outside the source",
                        e.path
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Reads until `buf` is full or the reader ends: one piece of a blob.
pub fn read_full(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Whether `s` is a digest: 64 lowercase hex digits.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The digest (BLAKE3, 256 bits) of `bytes`, lowercase hex.
pub fn digest(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// A digest computed piece by piece.
#[derive(Default)]
pub struct Hasher(blake3::Hasher);

impl Hasher {
    /// Adds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest, lowercase hex.
    pub fn finish(self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

/// A non-empty relative path with no `.`, `..` or empty component.
fn is_relative_inside(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
}

/// Whether a proper ancestor of `path` is one of the `links`.
fn below_a_link(path: &str, links: &std::collections::BTreeSet<&str>) -> bool {
    path.match_indices('/')
        .any(|(i, _)| links.contains(&path[..i]))
}

/// Whether a link at `path` pointing to `target` resolves inside the
/// source: what `..` climbs stays below the root, and the way does not
/// pass through another link (whose own target would make `..` mean
/// something else than it reads).
fn link_stays_inside(path: &str, target: &str, links: &std::collections::BTreeSet<&str>) -> bool {
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return false;
    }
    let mut at: Vec<&str> = path.split('/').collect();
    at.pop();
    let parts: Vec<&str> = target.split('/').collect();
    for (i, c) in parts.iter().enumerate() {
        match *c {
            "" | "." => {}
            ".." => {
                if at.pop().is_none() {
                    return false;
                }
            }
            name => {
                at.push(name);
                let more = parts[i + 1..].iter().any(|p| !p.is_empty() && *p != ".");
                if more && links.contains(at.join("/").as_str()) {
                    return false;
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_blobs_are_gathered_into_messages_of_at_most_a_piece() {
        let mut batch = WholeBatch::default();
        let mut sent = Vec::new();
        for i in 0..100u32 {
            if let Some(full) = batch.push(format!("{i}"), vec![0u8; 100 << 10]) {
                sent.push(full);
            }
        }
        sent.extend(batch.take());
        assert!(batch.take().is_none(), "taking empties it");
        let counts: Vec<usize> = sent.iter().map(Vec::len).collect();
        assert_eq!(counts.iter().sum::<usize>(), 100, "none lost: {counts:?}");
        for m in &sent {
            let bytes: usize = m.iter().map(|b| b.data.len()).sum();
            assert!(bytes <= PIECE_BYTES, "{bytes}");
        }
        assert_eq!(counts[0], 20, "2 MiB holds twenty 100 KiB blobs");
    }

    fn file(path: &str) -> Entry {
        Entry {
            path: path.into(),
            mode: 0o644,
            kind: Kind::File {
                size: 3,
                digest: digest(b"abc"),
            },
        }
    }

    fn link(path: &str, target: &str) -> Entry {
        Entry {
            path: path.into(),
            mode: 0o777,
            kind: Kind::Symlink {
                target: target.into(),
            },
        }
    }

    fn check(entries: Vec<Entry>) -> Result<(), String> {
        Manifest {
            single_file: false,
            entries,
        }
        .check()
    }

    #[test]
    fn paths_and_links_must_stay_inside_the_source() {
        assert!(check(vec![file("a/b.txt"), link("a/l", "../a/b.txt")]).is_ok());
        for bad in ["../x", "/etc/passwd", "a/../../x", "a//b", "./a", ""] {
            assert!(check(vec![file(bad)]).is_err(), "{bad}");
        }
        for bad in ["/etc/passwd", "../../x", "../.."] {
            assert!(check(vec![link("a/l", bad)]).is_err(), "{bad}");
        }
        // A chain: `a/up -> ..` is the root, so `b -> a/up/..` would be the
        // destination's parent; and nothing is written below a link.
        assert!(check(vec![link("a/up", ".."), link("b", "a/up/..")]).is_err());
        assert!(check(vec![link("a/up", ".."), link("b", "a/up")]).is_ok());
        assert!(check(vec![link("d", "."), file("d/x")]).is_err());
        let mut huge = file("x");
        huge.kind = Kind::File {
            size: u64::MAX,
            digest: digest(b"abc"),
        };
        assert!(
            check(vec![huge.clone(), huge]).is_err(),
            "sizes do not wrap"
        );
        let mut bad_digest = file("x");
        bad_digest.kind = Kind::File {
            size: 1,
            digest: "ABC".into(),
        };
        assert!(check(vec![bad_digest]).is_err());
    }

    #[test]
    fn a_manifest_round_trips_and_counts_its_bytes() {
        let m = Manifest {
            single_file: false,
            entries: vec![
                Entry {
                    path: "d".into(),
                    mode: 0o755,
                    kind: Kind::Dir,
                },
                file("d/f"),
            ],
        };
        let back = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.bytes(), 3);
        // BLAKE3's published test vector for "abc".
        assert_eq!(
            digest(b"abc"),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }
}
