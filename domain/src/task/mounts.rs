//! `file_mounts`: what is copied onto every node before `setup`, with
//! SkyPilot's meaning. A string value is a local path (uploaded by the
//! client) or a bucket / object URI (copied by the agent); a storage object
//! (`{name, source, store, mode}`) is not supported yet and refused by name.

use std::collections::BTreeMap;

use yaml_serde::Value;

use super::yaml::{as_map, key_str, kind};
use super::{MountSource, Result, SpecError};

/// Most entries in `file_mounts`.
pub const MAX_FILE_MOUNTS: usize = 256;

/// URI schemes SkyPilot knows that Nembo cannot read yet.
const SCHEMES_NOT_YET: &[&str] = &[
    "gs", "r2", "cos", "oci", "nebius", "cw", "vastdata", "hf", "az",
];

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

/// `$NAME` and `${NAME}` replaced by the task's `envs` in every path and
/// source (SkyPilot does this for file mounts); an unknown name is left as
/// written. Secrets are never put into paths.
pub(super) fn substitute_envs(
    mounts: BTreeMap<String, MountSource>,
    envs: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, MountSource>> {
    if envs.is_empty() {
        return Ok(mounts);
    }
    let mut out = BTreeMap::new();
    for (dst, src) in mounts {
        let dst2 = expand(&dst, envs);
        let path = format!("file_mounts.{dst2}");
        check_destination(&dst2, &path)?;
        let src2 = match src {
            MountSource::Local { path: p, manifest } => {
                let p = expand(&p, envs);
                match parse_source(&p, &path)? {
                    MountSource::Local { path, .. } => MountSource::Local { path, manifest },
                    uri => uri,
                }
            }
            MountSource::Uri(u) => parse_source(&expand(&u, envs), &path)?,
        };
        out.insert(dst2, src2);
    }
    Ok(out)
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

/// A storage object. What Nembo does today: `mode: COPY` of an existing
/// bucket or prefix (`source: s3://...`), which is what a URI string means.
/// Creating a bucket from a local source (`name`) and FUSE mounts (MOUNT,
/// MOUNT_CACHED, SkyPilot's default mode) are refused by name.
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
    let text = |k: &str| -> Result<Option<String>> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
            Some(other) => Err(SpecError::new(
                format!("{path}.{k}"),
                format!("expected a string, got {}", kind(other)),
            )),
        }
    };
    let mode = text("mode")?
        .unwrap_or_else(|| "MOUNT".into())
        .to_ascii_uppercase();
    if !matches!(mode.as_str(), "MOUNT" | "COPY" | "MOUNT_CACHED") {
        return Err(SpecError::new(
            format!("{path}.mode"),
            format!("'{mode}': expected MOUNT, COPY or MOUNT_CACHED"),
        ));
    }
    if let Some(store) = text("store")? {
        if store != "s3" {
            return Err(SpecError::new(
                format!("{path}.store"),
                format!(
                    "'{store}' is valid SkyPilot but not supported by Nembo yet; Nembo reads s3"
                ),
            ));
        }
    }
    let source = match m.get("source") {
        Some(Value::String(s)) => Some(s.trim().to_string()),
        None | Some(Value::Null) => None,
        Some(_) => {
            return Err(SpecError::new(
                format!("{path}.source"),
                "a list of local sources is valid SkyPilot but not supported by Nembo yet",
            ))
        }
    };
    let is_uri = source.as_deref().is_some_and(|s| s.contains("://"));
    if !is_uri {
        return Err(SpecError::new(
            path,
            "a storage object that creates a bucket (a local `source`, or `name` alone) is \
             valid SkyPilot but not supported by Nembo yet; upload it yourself and give \
             `source: s3://bucket/prefix` with `mode: COPY`, or mount the local path directly",
        ));
    }
    if text("name")?.is_some() {
        return Err(SpecError::new(
            format!("{path}.name"),
            "is not allowed with a bucket URI as `source` (SkyPilot's rule)",
        ));
    }
    if mode != "COPY" {
        return Err(SpecError::new(
            format!("{path}.mode"),
            format!(
                "{mode} (the default) needs a FUSE mount on the node, which Nembo does not set \
                 up yet; `mode: COPY` copies the bucket in before setup (writes stay on the node)"
            ),
        ));
    }
    parse_source(source.as_deref().unwrap_or_default(), path)
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
        "s3" | "https" if host.is_empty() => Err(SpecError::new(
            path,
            format!("'{s}': no {} in the URI", if scheme == "s3" { "bucket" } else { "host" }),
        )),
        "s3" | "https" => Ok(MountSource::Uri(s.to_string())),
        "http" => Err(SpecError::new(
            path,
            format!("'{s}': plain http is not accepted; use https://"),
        )),
        s3 if SCHEMES_NOT_YET.contains(&s3) => Err(SpecError::new(
            path,
            format!("'{s}': {scheme}:// is valid SkyPilot but not supported by Nembo yet; use s3:// or https://"),
        )),
        _ => Err(SpecError::new(
            path,
            format!("'{s}': unknown scheme {scheme}:// (Nembo copies s3:// and https://)"),
        )),
    }
}
