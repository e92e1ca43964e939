//! The values of resource fields: where a node runs ([`Infra`]), which GPU
//! ([`Accelerator`]), how many vCPUs ([`Quantity`]) and how much memory
//! ([`Memory`]), each parsed from its SkyPilot spelling and shown back in it.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Result, SpecError};

/// Where a node may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Infra {
    /// Provider name, lowercase (`local`, `aws`); `None`: any.
    pub cloud: Option<String>,
    /// `None`: any region.
    pub region: Option<String>,
    /// `None`: any zone.
    pub zone: Option<String>,
}

impl Infra {
    /// Parses `cloud[/region[/zone]]`, with `*` as a wildcard at any level.
    pub fn parse(s: &str, path: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self::default());
        }
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(SpecError::new(
                path,
                format!("'{s}' is not of the form cloud, cloud/region or cloud/region/zone"),
            ));
        }
        let part = |i: usize| parts.get(i).filter(|p| **p != "*").map(|p| p.to_string());
        Ok(Self {
            cloud: part(0).map(|c| c.to_ascii_lowercase()),
            region: part(1),
            zone: part(2),
        })
    }

    /// True when nothing is pinned.
    pub fn is_any(&self) -> bool {
        self.cloud.is_none() && self.region.is_none() && self.zone.is_none()
    }
}

impl fmt::Display for Infra {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            return Ok(());
        }
        let star = |p: &Option<String>| p.clone().unwrap_or_else(|| "*".to_string());
        write!(f, "{}", star(&self.cloud))?;
        if self.region.is_some() || self.zone.is_some() {
            write!(f, "/{}", star(&self.region))?;
        }
        if let Some(z) = &self.zone {
            write!(f, "/{z}")?;
        }
        Ok(())
    }
}

/// A GPU model and how many of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accelerator {
    /// Canonical model name (`H100`, `A100-80GB`).
    pub name: String,
    /// Positive; fractions share a GPU.
    pub count: f64,
}

impl Accelerator {
    /// Parses `NAME` or `NAME:COUNT`.
    pub fn parse(s: &str, path: &str) -> Result<Self> {
        let s = s.trim();
        let (name, count) = match s.split_once(':') {
            Some((n, c)) => (n.trim(), parse_count(c.trim(), path)?),
            None => (s, 1.0),
        };
        Ok(Self {
            name: canonical_accelerator(name, path)?,
            count,
        })
    }
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, fmt_num(self.count))
    }
}

/// A count that is either exact or a lower bound (`8` vs `8+`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantity {
    /// Positive (the parser refuses anything else).
    pub value: f64,
    /// `N+`: at least N.
    pub at_least: bool,
}

impl Quantity {
    /// Parses `N` or `N+`; N must be positive.
    pub fn parse(s: &str, path: &str) -> Result<Self> {
        let s = s.trim();
        let (num, at_least) = match s.strip_suffix('+') {
            Some(n) => (n.trim(), true),
            None => (s, false),
        };
        let value = parse_positive(num, path)?;
        Ok(Self { value, at_least })
    }

    /// Whether `have` satisfies this request.
    pub fn admits(&self, have: f64) -> bool {
        if self.at_least {
            have >= self.value
        } else {
            (have - self.value).abs() < 1e-9
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}",
            fmt_num(self.value),
            if self.at_least { "+" } else { "" }
        )
    }
}

/// Memory: GB, or GB per vCPU (`4x`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    /// GB, or GB per vCPU when `per_cpu`.
    pub quantity: Quantity,
    /// `Nx`: N GB for each vCPU.
    pub per_cpu: bool,
}

impl Memory {
    /// Parses `32`, `32+`, `4x` or `4x+`.
    pub fn parse(s: &str, path: &str) -> Result<Self> {
        let s = s.trim();
        let (body, plus) = match s.strip_suffix('+') {
            Some(b) => (b.trim(), "+"),
            None => (s, ""),
        };
        let (body, per_cpu) = match body.strip_suffix(['x', 'X']) {
            Some(b) => (b.trim(), true),
            None => (body, false),
        };
        let body = body
            .strip_suffix("GB")
            .or_else(|| body.strip_suffix("gb"))
            .unwrap_or(body)
            .trim();
        Ok(Self {
            quantity: Quantity::parse(&format!("{body}{plus}"), path)?,
            per_cpu,
        })
    }

    /// GB this request needs on a node with `cpus` vCPUs.
    pub fn gb_for(&self, cpus: f64) -> f64 {
        if self.per_cpu {
            self.quantity.value * cpus
        } else {
            self.quantity.value
        }
    }

    /// Whether a node with `cpus` vCPUs and `gb` GB satisfies this request.
    pub fn admits(&self, cpus: f64, gb: f64) -> bool {
        let want = Quantity {
            value: self.gb_for(cpus),
            at_least: self.quantity.at_least,
        };
        want.admits(gb)
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", fmt_num(self.quantity.value))?;
        if self.per_cpu {
            write!(f, "x")?;
        }
        if self.quantity.at_least {
            write!(f, "+")?;
        }
        Ok(())
    }
}

/// Formats a number without a trailing `.0`.
pub fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

pub(super) fn parse_positive(s: &str, path: &str) -> Result<f64> {
    let v: f64 = s
        .parse()
        .map_err(|_| SpecError::new(path, format!("'{s}' is not a number")))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(SpecError::new(
            path,
            format!("must be a positive number, got '{s}'"),
        ));
    }
    Ok(v)
}

pub(super) fn parse_count(s: &str, path: &str) -> Result<f64> {
    let v = parse_positive(s, path)
        .map_err(|e| SpecError::new(path, format!("accelerator count {}", e.message)))?;
    if v > 1.0 && v.fract() != 0.0 {
        return Err(SpecError::new(
            path,
            format!("accelerator count above 1 must be a whole number, got '{s}'"),
        ));
    }
    Ok(v)
}

/// Accelerator names Nembo knows, in their canonical spelling.
pub const KNOWN_ACCELERATORS: &[&str] = &[
    "A10",
    "A10G",
    "A100",
    "A100-80GB",
    "B200",
    "GB200",
    "H100",
    "H100-MEGA",
    "H200",
    "L4",
    "L40",
    "L40S",
    "MI300X",
    "T4",
    "V100",
    "V100-32GB",
    "RTX6000",
    "RTX4090",
    "RTXPRO6000",
];

pub(super) fn canonical_accelerator(name: &str, path: &str) -> Result<String> {
    if name.is_empty() {
        return Err(SpecError::new(path, "accelerator name is empty"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(SpecError::new(
            path,
            format!("'{name}' is not an accelerator name (letters, digits, '-' and '_' only)"),
        ));
    }
    Ok(KNOWN_ACCELERATORS
        .iter()
        .find(|k| k.eq_ignore_ascii_case(name))
        .map(|k| k.to_string())
        .unwrap_or_else(|| name.to_string()))
}

/// A TCP port range to open (`8888`, `8000-8010`), inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port (equal to `start` for one port).
    pub end: u16,
}

impl PortRange {
    /// Whether every port of `wanted` is in one of `open`'s ranges.
    pub fn all_within(wanted: &[PortRange], open: &[PortRange]) -> bool {
        wanted
            .iter()
            .all(|w| (w.start..=w.end).all(|p| open.iter().any(|o| o.start <= p && p <= o.end)))
    }

    /// Parses `ports`: an int, `"A-B"`, or a list of either (SkyPilot's
    /// forms); returns the ranges sorted and merged.
    pub fn parse_all(v: &yaml_serde::Value, path: &str) -> Result<Vec<PortRange>> {
        let items: Vec<(&yaml_serde::Value, String)> = match v {
            yaml_serde::Value::Sequence(s) => s
                .iter()
                .enumerate()
                .map(|(i, x)| (x, format!("{path}[{i}]")))
                .collect(),
            other => vec![(other, path.to_string())],
        };
        let mut out = Vec::new();
        for (item, p) in items {
            let text = match item {
                yaml_serde::Value::Number(n) => n.to_string(),
                yaml_serde::Value::String(s) => s.trim().to_string(),
                other => {
                    return Err(SpecError::new(
                        p,
                        format!("expected a port or 'A-B', got {}", super::yaml::show(other)),
                    ))
                }
            };
            let port = |s: &str| -> Result<u16> {
                s.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| SpecError::new(&p, format!("'{s}' is not a port (1-65535)")))
            };
            let (start, end) = match text.split_once('-') {
                Some((a, b)) => (port(a)?, port(b)?),
                None => (port(&text)?, port(&text)?),
            };
            if start > end {
                return Err(SpecError::new(
                    p,
                    format!("'{text}': the range's start is after its end"),
                ));
            }
            out.push(PortRange { start, end });
        }
        out.sort();
        let mut merged: Vec<PortRange> = Vec::new();
        for r in out {
            match merged.last_mut() {
                Some(last) if u32::from(r.start) <= u32::from(last.end) + 1 => {
                    last.end = last.end.max(r.end);
                }
                _ => merged.push(r),
            }
        }
        Ok(merged)
    }

    /// Every port in the ranges.
    pub fn ports(ranges: &[PortRange]) -> impl Iterator<Item = u16> + '_ {
        ranges.iter().flat_map(|r| r.start..=r.end)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// A disk's performance tier (SkyPilot's `disk_tier`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DiskTier {
    /// Magnetic or standard (AWS `standard`).
    Low,
    /// Balanced SSD (AWS gp3 at 3500 IOPS): SkyPilot's default.
    Medium,
    /// Fast SSD (AWS gp3 at 7000 IOPS).
    High,
    /// Provisioned IOPS (AWS io2).
    Ultra,
    /// The best the place has.
    Best,
}

impl DiskTier {
    /// Parses `low|medium|high|ultra|best`, any case.
    pub fn parse(s: &str, path: &str) -> Result<DiskTier> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "low" => DiskTier::Low,
            "medium" => DiskTier::Medium,
            "high" => DiskTier::High,
            "ultra" => DiskTier::Ultra,
            "best" => DiskTier::Best,
            _ => {
                return Err(SpecError::new(
                    path,
                    format!("'{s}': expected low, medium, high, ultra or best"),
                ))
            }
        })
    }

    /// Its name in a task.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskTier::Low => "low",
            DiskTier::Medium => "medium",
            DiskTier::High => "high",
            DiskTier::Ultra => "ultra",
            DiskTier::Best => "best",
        }
    }
}

/// Parses `disk_size`: whole GB, or a size with a unit (`512GB`, `1TB`,
/// `2TiB`), floored to whole GB; at least 1.
pub fn parse_disk_size(v: &yaml_serde::Value, path: &str) -> Result<u64> {
    let text = match v {
        yaml_serde::Value::Number(n) => n.to_string(),
        yaml_serde::Value::String(s) => s.trim().to_string(),
        other => {
            return Err(SpecError::new(
                path,
                format!("expected a size in GB, got {}", super::yaml::show(other)),
            ))
        }
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n > 0.0)
        .ok_or_else(|| SpecError::new(path, format!("'{text}' is not a positive size")))?;
    let gb_per = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "G" | "GB" | "GI" | "GIB" => 1.0,
        "K" | "KB" | "KI" | "KIB" => 1.0 / (1024.0 * 1024.0),
        "M" | "MB" | "MI" | "MIB" => 1.0 / 1024.0,
        "T" | "TB" | "TI" | "TIB" => 1024.0,
        "P" | "PB" | "PI" | "PIB" => 1024.0 * 1024.0,
        u => {
            return Err(SpecError::new(
                path,
                format!("'{text}': unknown unit '{u}' (KB, MB, GB, TB, PB)"),
            ))
        }
    };
    let gb = (n * gb_per).floor();
    if !(1.0..=1e9).contains(&gb) {
        return Err(SpecError::new(
            path,
            format!("'{text}' is {gb} GB; a disk is at least 1 GB"),
        ));
    }
    Ok(gb as u64)
}
