//! `file_mounts`: what is copied onto every node before `setup`, with
//! SkyPilot's meaning. A string value is a local path (uploaded by the
//! client) or a bucket / object URI (copied by the agent); a storage object
//! (`{name, source, store, mode}`) names, fills and mounts or copies a bucket.

use std::collections::BTreeMap;

use yaml_serde::Value;

use super::yaml::{as_map, key_str, kind};
use super::{MountSource, Result, SpecError, StorageMode, StorageMount};

/// Most entries in `file_mounts`.
pub const MAX_FILE_MOUNTS: usize = 256;

/// Stores SkyPilot knows whose cloud Nembo has no provider for: a URI
/// scheme, a `store:` name, and whose they are.
const STORES_ELSEWHERE: &[(&str, &str, &str)] = &[
    ("gs", "gcs", "Google Cloud Storage (GCP)"),
    ("az", "azure", "Azure Blob Storage"),
    ("cos", "ibm", "IBM Cloud Object Storage"),
    ("oci", "oci", "OCI Object Storage"),
    ("nebius", "nebius", "Nebius Object Storage"),
    ("cw", "coreweave", "CoreWeave Object Storage"),
    ("vastdata", "vastdata", "VAST Data"),
    ("hf", "hf", "the Hugging Face Hub"),
];

/// Why a store of another cloud is refused.
fn elsewhere(whose: &str) -> String {
    format!(
        "is a bucket of {whose}, and Nembo has no provider for it yet; Nembo's buckets are \
         s3:// and r2:// (and https:// to copy from)"
    )
}

pub(super) fn parse_file_mounts(v: &Value) -> Result<BTreeMap<String, MountSource>> {
    if v.is_null() {
        return Ok(BTreeMap::new());
    }
    let map = as_map(v, "file_mounts")?;
    if map.len() > MAX_FILE_MOUNTS {
        return Err(SpecError::new(
            "file_mounts",
            format!("{} entries; the limit is {MAX_FILE_MOUNTS}", map.len()),
        ));
    }
    let mut out = BTreeMap::new();
    for (k, val) in map {
        let dst = key_str(k, "file_mounts")?;
        let path = format!("file_mounts.{dst}");
        check_destination(dst, &path)?;
        let source = match val {
            Value::String(s) => parse_source(s.trim(), &path)?,
            Value::Mapping(m) => parse_storage(m, &path)?,
            other => {
                return Err(SpecError::new(
                    path,
                    format!("expected a local path or a bucket URI, got {}", kind(other)),
                ))
            }
        };
        out.insert(dst.to_string(), source);
    }
    Ok(out)
}

/// `$NAME` and `${NAME}` replaced by the task's `envs` in every string of
/// `file_mounts`, keys and storage fields alike (SkyPilot does this: a
/// bucket's `name` and `store` are often `$VARS`); an unknown name is left
/// as written. Secrets are never put into paths.
pub(super) fn substitute_envs(v: &Value, envs: &BTreeMap<String, String>) -> Value {
    match v {
        _ if envs.is_empty() => v.clone(),
        Value::String(s) => Value::String(expand(s, envs)),
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .map(|(k, v)| (substitute_envs(k, envs), substitute_envs(v, envs)))
                .collect(),
        ),
        Value::Sequence(items) => {
            Value::Sequence(items.iter().map(|i| substitute_envs(i, envs)).collect())
        }
        other => other.clone(),
    }
}

fn expand(s: &str, envs: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, used) = match after.strip_prefix('{') {
            Some(inner) => match inner.find('}') {
                Some(end) => (&inner[..end], end + 2),
                None => ("", 0),
            },
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        match envs.get(name).filter(|_| !name.is_empty()) {
            Some(v) => {
                out.push_str(v);
                rest = &after[used..];
            }
            None => {
                out.push('$');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A storage object: `{source: s3://b/p, mode: COPY}` is a URI string by
/// another name; a `name` makes (if need be) the bucket `s3://name` and
/// uploads a local `source` into it; MOUNT (the default) and MOUNT_CACHED
/// mount the whole bucket on the node with FUSE.
fn parse_storage(m: &yaml_serde::Mapping, path: &str) -> Result<MountSource> {
    const FIELDS: &[&str] = &[
        "name",
        "source",
        "store",
        "mode",
        "persistent",
        "type",
        "config",
    ];
    for k in m.keys() {
        let k = key_str(k, path)?;
        if !FIELDS.contains(&k) {
            return Err(SpecError::new(
                format!("{path}.{k}"),
                format!("unknown storage field (fields: {})", FIELDS.join(", ")),
            ));
        }
    }
    let field = |k: &str| format!("{path}.{k}");
    let text = |k: &str| -> Result<Option<String>> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
            Some(other) => Err(SpecError::new(
                field(k),
                format!("expected a string, got {}", kind(other)),
            )),
        }
    };
    let mut mode = match text("mode")?.map(|s| s.to_ascii_uppercase()).as_deref() {
        None | Some("MOUNT") => StorageMode::Mount,
        Some("MOUNT_CACHED") => StorageMode::MountCached,
        Some("COPY") => StorageMode::Copy,
        Some(other) => {
            return Err(SpecError::new(
                field("mode"),
                format!("'{other}': expected MOUNT, COPY or MOUNT_CACHED"),
            ))
        }
    };
    let mut read_only = false;
    let mut rclone = BTreeMap::new();
    if let Some(t) = text("type")? {
        // SkyPilot's presets: read-ahead streams and chunks for the reads,
        // more transfers for the writes.
        let (preset_ro, preset): (bool, &[(&str, &str)]) = match t.to_ascii_uppercase().as_str() {
            "MODEL_CHECKPOINT_RO" => (true, &[("vfs_read_chunk_streams", "16"), ("vfs_read_chunk_size", "32M")]),
            "MODEL_CHECKPOINT_RW" => (
                false,
                &[("vfs_read_chunk_streams", "16"), ("vfs_read_chunk_size", "32M"), ("transfers", "8")],
            ),
            "DATASET_RO" => (true, &[("vfs_read_chunk_streams", "0"), ("vfs_read_chunk_size", "8M")]),
            "DATASET_RW" => (
                false,
                &[("vfs_read_chunk_streams", "0"), ("vfs_read_chunk_size", "8M"), ("transfers", "16")],
            ),
            _ => {
                return Err(SpecError::new(
                    field("type"),
                    format!("'{t}': expected MODEL_CHECKPOINT_RO, MODEL_CHECKPOINT_RW, DATASET_RO or DATASET_RW"),
                ))
            }
        };
        rclone.extend(preset.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        if m.get("mode").is_some_and(|v| !v.is_null()) && mode != StorageMode::MountCached {
            return Err(SpecError::new(
                field("type"),
                "is a MOUNT_CACHED preset; drop `mode` or make it MOUNT_CACHED",
            ));
        }
        mode = StorageMode::MountCached;
        read_only = preset_ro;
    }
    if let Some(cfg) = m.get("config").filter(|v| !v.is_null()) {
        let (ro, knobs) = parse_storage_config(cfg, &field("config"))?;
        read_only |= ro;
        if !knobs.is_empty() && mode != StorageMode::MountCached {
            return Err(SpecError::new(
                field("config.mount_cached"),
                format!("tunes MOUNT_CACHED, and this storage is {}", mode.as_str()),
            ));
        }
        // What the task sets wins over its `type` preset.
        rclone.extend(knobs);
    }
    let ephemeral = match m.get("persistent") {
        None | Some(Value::Null) | Some(Value::Bool(true)) => false,
        Some(Value::Bool(false)) => true,
        Some(other) => {
            return Err(SpecError::new(
                field("persistent"),
                format!("expected true or false, got {}", kind(other)),
            ))
        }
    };
    let scheme = match text("store")?.as_deref() {
        None | Some("s3") => "s3",
        Some("r2") => "r2",
        Some(store) => {
            let why = match STORES_ELSEWHERE.iter().find(|(_, name, _)| *name == store) {
                Some((.., whose)) => elsewhere(whose),
                None => "is not a store SkyPilot knows (s3, r2, gcs, azure, ...)".into(),
            };
            return Err(SpecError::new(field("store"), format!("'{store}' {why}")));
        }
    };
    let source = match m.get("source") {
        Some(Value::String(s)) => Some(s.trim().to_string()),
        None | Some(Value::Null) => None,
        Some(_) => {
            return Err(SpecError::new(
                field("source"),
                "a list of local sources is valid SkyPilot but not supported by Nembo yet; \
                 give one directory",
            ))
        }
    };
    let name = text("name")?;
    match (source, name) {
        (Some(uri), name) if uri.contains("://") => {
            if name.is_some() {
                return Err(SpecError::new(
                    field("name"),
                    "is not allowed with a bucket URI as `source` (SkyPilot's rule)",
                ));
            }
            if ephemeral {
                return Err(SpecError::new(
                    field("persistent"),
                    "false deletes a bucket the task names (`name`), never one given as `source`",
                ));
            }
            let parsed = parse_source(&uri, &field("source"))?;
            if mode == StorageMode::Copy {
                return Ok(parsed);
            }
            let whole = ["s3://", "r2://"].into_iter().find_map(|p| {
                uri.strip_prefix(p)
                    .filter(|rest| !rest.contains('/'))
                    .map(|b| format!("{p}{b}"))
            });
            match whole {
                Some(bucket) => Ok(MountSource::Storage(StorageMount {
                    bucket,
                    create: false,
                    local: None,
                    mode,
                    read_only,
                    rclone,
                    ephemeral: false,
                })),
                None => Err(SpecError::new(
                    field("source"),
                    format!(
                        "'{uri}': only a whole s3:// or r2:// bucket can be mounted ({}); copy a prefix \
                         with `mode: COPY`",
                        mode.as_str()
                    ),
                )),
            }
        }
        (_, None) => Err(SpecError::new(
            field("name"),
            "a storage object with a local `source`, or with none, needs the `name` of its bucket",
        )),
        (local, Some(name)) => {
            check_bucket_name(&name, &field("name"))?;
            Ok(MountSource::Storage(StorageMount {
                bucket: format!("{scheme}://{name}"),
                create: true,
                local: local.map(|p| (p, None)),
                mode,
                read_only,
                rclone,
                ephemeral,
            }))
        }
    }
}

/// What a `config.mount_cached` key that is an rclone flag takes.
enum Knob {
    /// A whole number, at least this.
    Count(u32),
    /// A size: `^\d+[BKMGTP]?$`.
    Size,
    /// A duration: `90s`, `1h30m`, `500ms`; a bare number is seconds.
    Duration,
}

/// SkyPilot's `config.mount_cached` keys that are rclone flags
/// (`--transfers`, `--vfs-cache-max-size`, ...).
const RCLONE_KNOBS: &[(&str, Knob)] = &[
    ("transfers", Knob::Count(1)),
    ("buffer_size", Knob::Size),
    ("vfs_cache_max_size", Knob::Size),
    ("vfs_cache_max_age", Knob::Duration),
    ("vfs_read_ahead", Knob::Size),
    ("vfs_read_chunk_size", Knob::Size),
    ("vfs_read_chunk_streams", Knob::Count(0)),
    ("vfs_write_back", Knob::Duration),
];

fn knob_value(knob: &Knob, v: &Value, path: &str) -> Result<String> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_string(),
        other => {
            return Err(SpecError::new(
                path,
                format!("expected a number or a string, got {}", kind(other)),
            ))
        }
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let ok = match knob {
        Knob::Count(min) => text.parse::<u32>().is_ok_and(|n| n >= *min),
        Knob::Size => {
            let body = text
                .strip_suffix(['B', 'K', 'M', 'G', 'T', 'P'])
                .unwrap_or(&text);
            digits(body)
        }
        Knob::Duration => {
            digits(&text) || {
                // Runs of digits, each with its unit.
                let mut rest = text.as_str();
                let mut any = false;
                while !rest.is_empty() {
                    let n = rest.bytes().take_while(u8::is_ascii_digit).count();
                    let unit = ["ms", "s", "m", "h", "d"]
                        .into_iter()
                        .find(|u| rest[n..].starts_with(u));
                    match unit {
                        Some(u) if n > 0 => {
                            rest = &rest[n + u.len()..];
                            any = true;
                        }
                        _ => {
                            any = false;
                            break;
                        }
                    }
                }
                any
            }
        }
    };
    if !ok {
        let want = match knob {
            Knob::Count(0) => "a whole number".to_string(),
            Knob::Count(min) => format!("a whole number, {min} or more"),
            Knob::Size => "a size such as 64M or 10G".into(),
            Knob::Duration => "a duration such as 5s, 1h or 1h30m".into(),
        };
        return Err(SpecError::new(
            path,
            format!("expected {want}, got '{text}'"),
        ));
    }
    Ok(text)
}

/// `config: {mount: {read_only}, mount_cached: {read_only, transfers, ...}}`:
/// whether the mount is read-only, and MOUNT_CACHED's rclone knobs.
fn parse_storage_config(v: &Value, path: &str) -> Result<(bool, BTreeMap<String, String>)> {
    let mut read_only = false;
    let mut knobs = BTreeMap::new();
    for (k, inner) in as_map(v, path)? {
        let k = key_str(k, path)?;
        let p = format!("{path}.{k}");
        if k != "mount" && k != "mount_cached" {
            return Err(SpecError::new(
                p,
                "unknown storage config (mount, mount_cached)",
            ));
        }
        for (ik, iv) in as_map(inner, &p)? {
            let ik = key_str(ik, &p)?;
            let knob = RCLONE_KNOBS.iter().find(|(name, _)| *name == ik);
            match (ik, iv, knob) {
                ("read_only", Value::Bool(b), _) => read_only |= *b,
                ("read_only", other, _) => {
                    return Err(SpecError::new(
                        format!("{p}.read_only"),
                        format!("expected true or false, got {}", kind(other)),
                    ))
                }
                (_, v, Some((name, knob))) if k == "mount_cached" => {
                    knobs.insert(name.to_string(), knob_value(knob, v, &format!("{p}.{ik}"))?);
                }
                _ => {
                    let known: Vec<&str> = if k == "mount_cached" {
                        std::iter::once("read_only")
                            .chain(RCLONE_KNOBS.iter().map(|(n, _)| *n))
                            .collect()
                    } else {
                        vec!["read_only"]
                    };
                    return Err(SpecError::new(
                        format!("{p}.{ik}"),
                        format!("unknown field (fields: {})", known.join(", ")),
                    ));
                }
            }
        }
    }
    Ok((read_only, knobs))
}

/// S3's bucket naming rules, as SkyPilot checks them.
fn check_bucket_name(name: &str, path: &str) -> Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let edges = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ip_shaped = name.split('.').count() == 4
        && name
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    if (3..=63).contains(&name.len())
        && ok_chars
        && edges(name.chars().next())
        && edges(name.chars().last())
        && !name.contains("..")
        && !ip_shaped
        && !name.starts_with("xn--")
        && !name.ends_with("-s3alias")
    {
        return Ok(());
    }
    Err(SpecError::new(
        path,
        format!(
            "'{}' is not an S3 bucket name (3-63 of a-z 0-9 . -, starting and ending with a \
             letter or digit, no '..', not an IP address)",
            name.chars().take(80).collect::<String>()
        ),
    ))
}

/// Where a mount lands: absolute, `~/...`, or relative to the job's work
/// dir; never through `..`, never ending in `/` (SkyPilot's rule).
fn check_destination(dst: &str, path: &str) -> Result<()> {
    let refuse = |why: &str| Err(SpecError::new(path, why.to_string()));
    if dst.trim().is_empty() {
        return refuse("the destination is empty");
    }
    if dst.ends_with('/') {
        return refuse("mount paths cannot end with a slash");
    }
    if dst.contains('\0') || dst.split('/').any(|c| c == "..") {
        return refuse("the destination may not contain '..' or NUL");
    }
    if dst == "~" || dst == "." {
        return refuse(
            "the destination must name a file or directory, not the home or work dir itself",
        );
    }
    Ok(())
}

fn parse_source(s: &str, path: &str) -> Result<MountSource> {
    if s.is_empty() {
        return Err(SpecError::new(path, "the source is empty"));
    }
    if s.ends_with('/') && s.len() > 1 {
        return Err(SpecError::new(path, "mount paths cannot end with a slash"));
    }
    let Some((scheme, rest)) = s.split_once("://") else {
        return Ok(MountSource::Local {
            path: s.to_string(),
            manifest: None,
        });
    };
    let host = rest.split('/').next().unwrap_or_default();
    match scheme {
        "s3" | "r2" | "https" if host.is_empty() => Err(SpecError::new(
            path,
            format!(
                "'{s}': no {} in the URI",
                if scheme == "https" { "host" } else { "bucket" }
            ),
        )),
        "s3" | "r2" | "https" => Ok(MountSource::Uri(s.to_string())),
        "http" => Err(SpecError::new(
            path,
            format!("'{s}': plain http is not accepted; use https://"),
        )),
        other if STORES_ELSEWHERE.iter().any(|(sch, ..)| *sch == other) => {
            let whose = STORES_ELSEWHERE
                .iter()
                .find(|(sch, ..)| *sch == other)
                .map_or("", |(.., w)| w);
            Err(SpecError::new(path, format!("'{s}' {}", elsewhere(whose))))
        }
        _ => Err(SpecError::new(
            path,
            format!("'{s}': unknown scheme {scheme}:// (Nembo copies s3://, r2:// and https://)"),
        )),
    }
}
