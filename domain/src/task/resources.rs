//! The `resources` block: its fields, the `any_of`/`ordered` alternatives
//! laid over it, and every accelerator form, expanded into candidates.

use std::collections::BTreeMap;

use yaml_serde::Value;

use super::values::{canonical_accelerator, parse_count, parse_positive};
use super::yaml::{as_map, check_keys, join, key_str, kind, opt_string, scalar_string, show};
use super::{
    parse_disk_size, Accelerator, DiskTier, Infra, Memory, PortRange, Quantity, ResourceCandidate,
    ResourceRequest, Result, SpecError,
};

const RESOURCE_SUPPORTED: &[&str] = &[
    "infra",
    "cloud",
    "region",
    "zone",
    "accelerators",
    "cpus",
    "memory",
    "instance_type",
    "use_spot",
    "labels",
    "max_hourly_cost",
    "ports",
    "disk_size",
    "disk_tier",
    "image_id",
    "any_of",
    "ordered",
    "job_recovery",
    "network_tier",
    "autostop",
    "priority",
];
/// SkyPilot's resource fields Nembo refuses, and why.
const RESOURCE_REFUSED: &[(&str, &str)] = &[
    ("volumes", super::VOLUMES_NEED),
    (
        "accelerator_args",
        "it configures TPUs, which only GCP has, and Nembo has no GCP provider yet",
    ),
    (
        "local_disk",
        "instance volumes are GCP local SSDs in SkyPilot, and Nembo has no GCP provider yet",
    ),
];

/// The fields of one `resources` block (or one `any_of`/`ordered` entry),
/// before accelerators are expanded into candidates.
#[derive(Default, Clone)]
struct PartialResources {
    infra: Option<Infra>,
    accelerators: Option<Vec<Accelerator>>,
    accelerators_ordered: bool,
    cpus: Option<Quantity>,
    memory: Option<Memory>,
    instance_type: Option<String>,
    use_spot: Option<bool>,
    max_hourly_cost: Option<f64>,
    ports: Option<Vec<PortRange>>,
    disk_size_gb: Option<u64>,
    disk_tier: Option<DiskTier>,
    image_id: Option<BTreeMap<String, String>>,
    docker_image: Option<String>,
}

impl PartialResources {
    fn overlay(&self, over: &PartialResources) -> PartialResources {
        PartialResources {
            infra: over.infra.clone().or_else(|| self.infra.clone()),
            accelerators: over
                .accelerators
                .clone()
                .or_else(|| self.accelerators.clone()),
            accelerators_ordered: if over.accelerators.is_some() {
                over.accelerators_ordered
            } else {
                self.accelerators_ordered
            },
            cpus: over.cpus.or(self.cpus),
            memory: over.memory.or(self.memory),
            instance_type: over
                .instance_type
                .clone()
                .or_else(|| self.instance_type.clone()),
            use_spot: over.use_spot.or(self.use_spot),
            max_hourly_cost: over.max_hourly_cost.or(self.max_hourly_cost),
            ports: over.ports.clone().or_else(|| self.ports.clone()),
            disk_size_gb: over.disk_size_gb.or(self.disk_size_gb),
            disk_tier: over.disk_tier.or(self.disk_tier),
            // One `image_id` replaces the other whole, container and all.
            image_id: if over.image_id.is_some() || over.docker_image.is_some() {
                over.image_id.clone()
            } else {
                self.image_id.clone()
            },
            docker_image: if over.image_id.is_some() || over.docker_image.is_some() {
                over.docker_image.clone()
            } else {
                self.docker_image.clone()
            },
        }
    }

    fn expand(&self) -> Vec<ResourceCandidate> {
        let base = ResourceCandidate {
            infra: self.infra.clone().unwrap_or_default(),
            accelerator: None,
            cpus: self.cpus,
            memory: self.memory,
            instance_type: self.instance_type.clone(),
            use_spot: self.use_spot.unwrap_or(false),
            max_hourly_cost: self.max_hourly_cost,
            ports: self.ports.clone().unwrap_or_default(),
            disk_size_gb: self.disk_size_gb,
            disk_tier: self.disk_tier,
            image_id: self.image_id.clone().unwrap_or_default(),
            docker_image: self.docker_image.clone(),
        };
        match &self.accelerators {
            None => vec![base],
            Some(accs) => accs
                .iter()
                .map(|a| ResourceCandidate {
                    accelerator: Some(a.clone()),
                    ..base.clone()
                })
                .collect(),
        }
    }
}

pub(super) fn parse_resources(v: &Value) -> Result<ResourceRequest> {
    if v.is_null() {
        return Ok(ResourceRequest::default());
    }
    let map = as_map(v, "resources")?;
    check_keys(map, "resources", RESOURCE_SUPPORTED, RESOURCE_REFUSED)?;
    let base = parse_partial(map, "resources")?;
    let mut labels = BTreeMap::new();
    if let Some(l) = map.get("labels") {
        if !l.is_null() {
            for (k, val) in as_map(l, "resources.labels")? {
                let key = key_str(k, "resources.labels")?;
                labels.insert(
                    key.to_string(),
                    scalar_string(val, &format!("resources.labels.{key}"))?,
                );
            }
        }
    }
    let any_of = map.get("any_of");
    let ordered = map.get("ordered");
    if any_of.is_some() && ordered.is_some() {
        return Err(SpecError::new(
            "resources",
            "'any_of' and 'ordered' cannot both be given",
        ));
    }
    let (list, list_name) = match (any_of, ordered) {
        (Some(l), _) => (Some(l), "any_of"),
        (_, Some(l)) => (Some(l), "ordered"),
        _ => (None, ""),
    };
    let mut candidates = Vec::new();
    let mut is_ordered = base.accelerators_ordered;
    match list {
        None => candidates.extend(base.expand()),
        Some(list) => {
            let path = format!("resources.{list_name}");
            let items = list.as_sequence().ok_or_else(|| {
                SpecError::new(&path, format!("expected a list, got {}", kind(list)))
            })?;
            if items.is_empty() {
                return Err(SpecError::new(&path, "must not be empty"));
            }
            if list_name == "ordered" {
                is_ordered = true;
                if base.accelerators.as_ref().is_some_and(|a| a.len() > 1) {
                    return Err(SpecError::new(
                        "resources.accelerators",
                        "several accelerators cannot be combined with 'ordered'",
                    ));
                }
            }
            for (i, item) in items.iter().enumerate() {
                let ipath = format!("{path}[{i}]");
                let imap = as_map(item, &ipath)?;
                let nested: Vec<&str> = RESOURCE_SUPPORTED
                    .iter()
                    .copied()
                    .filter(|k| {
                        !matches!(
                            *k,
                            "any_of"
                                | "ordered"
                                | "labels"
                                | "job_recovery"
                                | "autostop"
                                | "priority"
                        )
                    })
                    .collect();
                check_keys(imap, &ipath, &nested, RESOURCE_REFUSED)?;
                let over = parse_partial(imap, &ipath)?;
                candidates.extend(base.overlay(&over).expand());
            }
        }
    }
    Ok(ResourceRequest {
        candidates,
        ordered: is_ordered,
        labels,
    })
}

fn parse_partial(map: &yaml_serde::Mapping, prefix: &str) -> Result<PartialResources> {
    let mut p = PartialResources::default();
    let field = |k: &str| join(prefix, k);
    let has_infra = map.contains_key("infra");
    for legacy in ["cloud", "region", "zone"] {
        if has_infra && map.contains_key(legacy) {
            return Err(SpecError::new(
                field(legacy),
                "cannot be combined with 'infra'; use infra: cloud/region/zone",
            ));
        }
    }
    if let Some(v) = map.get("infra") {
        if let Some(s) = opt_string(v, &field("infra"))? {
            p.infra = Some(Infra::parse(&s, &field("infra"))?);
        }
    } else {
        let get = |k: &str| -> Result<Option<String>> {
            match map.get(k) {
                Some(v) => opt_string(v, &field(k)),
                None => Ok(None),
            }
        };
        let (cloud, region, zone) = (get("cloud")?, get("region")?, get("zone")?);
        if cloud.is_some() || region.is_some() || zone.is_some() {
            p.infra = Some(Infra {
                cloud: cloud.map(|c| c.to_ascii_lowercase()),
                region,
                zone,
            });
        }
    }
    if let Some(v) = map.get("accelerators") {
        let (accs, ordered) = parse_accelerators(v, &field("accelerators"))?;
        if !accs.is_empty() {
            p.accelerators = Some(accs);
            p.accelerators_ordered = ordered;
        }
    }
    if let Some(v) = map.get("cpus") {
        if !v.is_null() {
            p.cpus = Some(Quantity::parse(
                &scalar_string(v, &field("cpus"))?,
                &field("cpus"),
            )?);
        }
    }
    if let Some(v) = map.get("memory") {
        if !v.is_null() {
            p.memory = Some(Memory::parse(
                &scalar_string(v, &field("memory"))?,
                &field("memory"),
            )?);
        }
    }
    if let Some(v) = map.get("instance_type") {
        p.instance_type = opt_string(v, &field("instance_type"))?;
    }
    if let Some(v) = map.get("use_spot") {
        p.use_spot = match v {
            Value::Null => None,
            Value::Bool(b) => Some(*b),
            other => {
                return Err(SpecError::new(
                    field("use_spot"),
                    format!("expected true or false, got {}", show(other)),
                ))
            }
        };
    }
    if let Some(v) = map.get("ports").filter(|v| !v.is_null()) {
        p.ports = Some(PortRange::parse_all(v, &field("ports"))?);
    }
    if let Some(v) = map.get("disk_size").filter(|v| !v.is_null()) {
        p.disk_size_gb = Some(parse_disk_size(v, &field("disk_size"))?);
    }
    if let Some(v) = map.get("disk_tier").filter(|v| !v.is_null()) {
        let s = scalar_string(v, &field("disk_tier"))?;
        p.disk_tier = Some(DiskTier::parse(&s, &field("disk_tier"))?);
    }
    if let Some(v) = map.get("network_tier").filter(|v| !v.is_null()) {
        // `standard` is what every node has; `best` asks for the fabric of
        // multi-node training (EFA on AWS), which no provider sets up yet.
        let s = scalar_string(v, &field("network_tier"))?;
        match s.to_ascii_lowercase().as_str() {
            "standard" => {}
            "best" => {
                return Err(SpecError::new(
                    field("network_tier"),
                    "best (EFA or GPUDirect networking between nodes) is not set up by any \
                     Nembo provider yet; use standard, the default",
                ))
            }
            _ => {
                return Err(SpecError::new(
                    field("network_tier"),
                    format!("'{s}': expected standard or best"),
                ))
            }
        }
    }
    if let Some(v) = map.get("image_id").filter(|v| !v.is_null()) {
        let (vm, docker) = parse_image_id(v, &field("image_id"))?;
        p.image_id = (!vm.is_empty()).then_some(vm);
        p.docker_image = docker;
    }
    if let Some(v) = map.get("max_hourly_cost") {
        if !v.is_null() {
            let s = scalar_string(v, &field("max_hourly_cost"))?;
            p.max_hourly_cost = Some(parse_positive(&s, &field("max_hourly_cost"))?);
        }
    }
    Ok(p)
}

/// `image_id`: one VM image, or a map region -> image (failover then stays
/// in those regions); `docker:<image>`, or the map's `docker` key beside VM
/// images, runs `setup` and `run` in that container image on the node.
/// Returns the VM images and the container image.
fn parse_image_id(v: &Value, path: &str) -> Result<(BTreeMap<String, String>, Option<String>)> {
    let image = |v: &Value, p: &str| -> Result<String> {
        let s = scalar_string(v, p)?.trim().to_string();
        if s.is_empty() {
            return Err(SpecError::new(p, "the image is empty"));
        }
        Ok(s)
    };
    let mut out = BTreeMap::new();
    let mut docker = None;
    match v {
        Value::Mapping(m) => {
            for (k, img) in m {
                let region = key_str(k, path)?;
                let p = join(path, region);
                let s = image(img, &p)?;
                if region == "docker" {
                    docker = Some(container_image(
                        s.strip_prefix("docker:").unwrap_or(&s),
                        &p,
                    )?);
                } else if s.starts_with("docker:") {
                    // SkyPilot's rule: a container image goes under the
                    // `docker` key, never as one region's VM image.
                    return Err(SpecError::new(
                        &p,
                        "a docker: image in a region map must be given as `docker: <image>` instead",
                    ));
                } else {
                    out.insert(region.to_string(), s);
                }
            }
            if out.is_empty() && docker.is_none() {
                return Err(SpecError::new(path, "must not be empty"));
            }
        }
        other => {
            let s = image(other, path)?;
            match s.strip_prefix("docker:") {
                Some(name) => docker = Some(container_image(name, path)?),
                None => {
                    out.insert("*".into(), s);
                }
            }
        }
    }
    Ok((out, docker))
}

/// A container image reference (`[registry/]name[:tag][@digest]`), checked
/// for what could reach the engine as something else: it goes into an
/// argv, so it may not start with `-` or hold spaces.
pub fn container_image(name: &str, path: &str) -> Result<String> {
    let name = name.trim();
    let ok = |c: char| c.is_ascii_alphanumeric() || "._-/:@".contains(c);
    if name.is_empty() {
        return Err(SpecError::new(
            path,
            "the docker image is empty (`docker:<image>`)",
        ));
    }
    if name.len() > 512 || name.starts_with(['-', '/', ':', '@']) || !name.chars().all(ok) {
        return Err(SpecError::new(
            path,
            format!(
                "'{}' is not a container image reference ([registry/]name[:tag][@digest])",
                name.chars().take(80).collect::<String>()
            ),
        ));
    }
    Ok(name.to_string())
}

/// Every accelerator form SkyPilot accepts: `H100`, `H100:8`, `{H100: 8}`,
/// `{L4: 1, A10G: 1}` (any of them), `[H100:8, A100:8]` (in that order).
/// Returns the alternatives and whether their order is a preference.
fn parse_accelerators(v: &Value, path: &str) -> Result<(Vec<Accelerator>, bool)> {
    match v {
        Value::Null => Ok((Vec::new(), false)),
        Value::String(s) => {
            let s = s.trim();
            // SkyPilot also accepts the set/dict forms written as strings.
            if s.starts_with('{') || s.starts_with('[') {
                let inner: Value = yaml_serde::from_str(s)
                    .map_err(|e| SpecError::new(path, format!("cannot parse '{s}': {e}")))?;
                return parse_accelerators(&inner, path);
            }
            Ok((vec![Accelerator::parse(s, path)?], false))
        }
        Value::Mapping(m) => {
            if m.is_empty() {
                return Err(SpecError::new(path, "must not be empty"));
            }
            let mut out = Vec::new();
            for (k, c) in m {
                let name = scalar_string(k, path)?;
                // `{H100:8, H200:8}`: with no space after the colon YAML reads
                // keys with no values, a set of `name:count`s (SkyPilot's
                // set form).
                if c.is_null() && name.contains(':') {
                    out.push(Accelerator::parse(&name, path)?);
                    continue;
                }
                let count = match c {
                    Value::Null => 1.0,
                    other => parse_count(&scalar_string(other, path)?, path)?,
                };
                out.push(Accelerator {
                    name: canonical_accelerator(&name, path)?,
                    count,
                });
            }
            Ok((out, false))
        }
        Value::Sequence(items) => {
            if items.is_empty() {
                return Err(SpecError::new(path, "must not be empty"));
            }
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let ipath = format!("{path}[{i}]");
                let (accs, _) = parse_accelerators(item, &ipath)?;
                out.extend(accs);
            }
            Ok((out, true))
        }
        other => Err(SpecError::new(
            path,
            format!(
                "expected 'NAME', 'NAME:COUNT', a mapping or a list, got {}",
                show(other)
            ),
        )),
    }
}
