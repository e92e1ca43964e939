//! Reading a YAML task: values of the expected kind, and keys checked against
//! the fields SkyPilot and Nembo know, with errors naming the field path.

use yaml_serde::Value;

use super::{Result, SpecError};

pub(super) fn as_map<'a>(v: &'a Value, path: &str) -> Result<&'a yaml_serde::Mapping> {
    v.as_mapping()
        .ok_or_else(|| SpecError::new(path, format!("expected a mapping, got {}", kind(v))))
}

pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

pub(super) fn key_str<'a>(k: &'a Value, path: &str) -> Result<&'a str> {
    k.as_str()
        .ok_or_else(|| SpecError::new(path, format!("keys must be strings, got {}", kind(k))))
}

pub(super) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Refuses keys not in `supported`: those in `refused` (a key, and why
/// Nembo cannot honour it) with their reason, any other as unknown.
pub(super) fn check_keys(
    map: &yaml_serde::Mapping,
    prefix: &str,
    supported: &[&str],
    refused: &[(&str, &str)],
) -> Result<()> {
    for k in map.keys() {
        let key = key_str(k, if prefix.is_empty() { "task" } else { prefix })?;
        if supported.contains(&key) {
            continue;
        }
        let path = join(prefix, key);
        if let Some((_, why)) = refused.iter().find(|(k, _)| *k == key) {
            return Err(SpecError::new(
                path,
                format!("is valid SkyPilot, but {why}"),
            ));
        }
        let hint = match key {
            "spot_recovery" => " (did you mean 'job_recovery'?)".to_string(),
            "experimental" => {
                " (SkyPilot's `experimental.config_overrides` is now the task's `config`)"
                    .to_string()
            }
            _ => did_you_mean(key, supported)
                .map_or(String::new(), |s| format!(" (did you mean '{s}'?)")),
        };
        return Err(SpecError::new(path, format!("unknown field{hint}")));
    }
    Ok(())
}

fn did_you_mean<'a>(key: &str, options: &[&'a str]) -> Option<&'a str> {
    options
        .iter()
        .map(|o| (edit_distance(key, o), *o))
        .filter(|(d, o)| *d <= 2.max(o.len() / 4))
        .min()
        .map(|(_, o)| o)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

pub(super) fn scalar_string(v: &Value, path: &str) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(SpecError::new(
            path,
            format!("expected a string, got {}", kind(other)),
        )),
    }
}

pub(super) fn opt_string(v: &Value, path: &str) -> Result<Option<String>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => Err(SpecError::new(
            path,
            format!("expected a string, got {}", kind(other)),
        )),
    }
}

pub(super) fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        Value::Number(n) => n.to_string(),
        other => kind(other).to_string(),
    }
}
