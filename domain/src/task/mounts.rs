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
            Value::Mapping(_) => {
                return Err(SpecError::new(
                    path,
                    "a storage object ({name, source, store, mode}) is valid SkyPilot but not \
                     supported by Nembo yet; give a local path, or an s3:// or https:// URI to copy",
                ))
            }
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
