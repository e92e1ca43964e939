//! The optimizer: a pure function of (task resources, catalog, blocked set,
//! time) to the places that could host the task, cheapest first. The
//! scheduler takes the first; `launch --dry-run` shows the top few; the
//! provisioner walks on to the next when a place refuses for capacity.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::state::{place_key_into, Block, Node, Offering};
use crate::task::{PortRange, ResourceCandidate, SpecError, TaskSpec};

/// One place a task could go, with what it would cost. Borrows the
/// catalog: ranking a large one allocates nothing per offering.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice<'a> {
    /// Index of the task's resource candidate it satisfies.
    pub candidate: usize,
    /// What to launch.
    pub offering: &'a Offering,
    /// On spot capacity.
    pub spot: bool,
    /// Price of one node per hour.
    pub node_price: f64,
    /// Price of all `num_nodes` per hour.
    pub hourly_cost: f64,
    /// What moving the task's `inputs` and `outputs` costs from there.
    pub egress_cost: f64,
}

impl Choice<'_> {
    /// What the ranking compares: an hour of all the nodes and the data's
    /// egress, as SkyPilot's optimizer does for a task with no time
    /// estimate (it assumes one hour).
    pub fn cost(&self) -> f64 {
        self.hourly_cost + self.egress_cost
    }
}

/// List price of internet egress out of a cloud, USD per GB (the first
/// tier). Those not listed charge nothing Nembo knows of: the local
/// machine, machines reached over ssh, Seeweb (traffic included), R2.
fn egress_per_gb(cloud: &str) -> f64 {
    match cloud {
        "aws" => 0.09,
        "gcp" => 0.12,
        "azure" => 0.087,
        "ibm" => 0.09,
        "oci" => 0.0085,
        _ => 0.0,
    }
}

/// What moving the task's data costs on `provider`'s machines: its
/// `inputs` out of the cloud that holds them, its `outputs` out of the
/// provider's own, each only across clouds (SkyPilot's estimate).
pub fn egress_cost(spec: &TaskSpec, provider: &str) -> f64 {
    let inputs = spec
        .inputs
        .as_ref()
        .and_then(|d| Some((d.cloud()?, d.size_gb)))
        .filter(|(cloud, _)| *cloud != provider)
        .map_or(0.0, |(cloud, gb)| gb * egress_per_gb(cloud));
    let outputs = spec
        .outputs
        .as_ref()
        .and_then(|d| Some((d.cloud()?, d.size_gb)))
        .filter(|(cloud, _)| *cloud != provider)
        .map_or(0.0, |(_, gb)| gb * egress_per_gb(provider));
    inputs + outputs
}

/// Whether a candidate's `infra` and `instance_type` admit this place and type.
pub fn place_matches(
    c: &ResourceCandidate,
    provider: &str,
    region: &str,
    zone: Option<&str>,
    instance_type: &str,
) -> bool {
    c.infra.cloud.as_deref().is_none_or(|x| x == provider)
        && c.infra.region.as_deref().is_none_or(|x| x == region)
        && c.infra.zone.as_deref().is_none_or(|x| Some(x) == zone)
        && c.instance_type
            .as_deref()
            .is_none_or(|x| x == instance_type)
}

/// Whether an offering can host a candidate: shape, place and price.
pub fn offering_matches(c: &ResourceCandidate, o: &Offering) -> bool {
    if !place_matches(
        c,
        &o.provider,
        &o.region,
        o.zone.as_deref(),
        &o.instance_type,
    ) {
        return false;
    }
    if c.use_spot && o.spot_price.is_none() {
        return false;
    }
    if let Some(max) = c.max_hourly_cost {
        if o.price(c.use_spot) > max {
            return false;
        }
    }
    if !(c.ports.is_empty() || o.opens_ports) || !disk_fits(c, o.disk_gb_max) {
        return false;
    }
    let image_ok = c.image_id.is_empty() || o.custom_images && c.image_for(&o.region).is_some();
    if !image_ok {
        return false;
    }
    if o.fixed_machines.is_some() {
        return fits_fixed_machine(c, o);
    }
    let gpus: f64 = o.resources.accelerators.values().sum();
    let has = |name: &str| o.resources.accelerators.get(name).copied().unwrap_or(0.0);
    match &c.accelerator {
        // Like SkyPilot: an instance carries exactly the GPUs asked for (fractions round up).
        Some(a) if has(&a.name) != a.count.ceil() => return false,
        // A CPU task does not take a GPU machine unless its type is named.
        None if c.instance_type.is_none() && gpus > 0.0 => return false,
        _ => {}
    }
    if let Some(q) = &c.cpus {
        if !q.admits(o.resources.cpus) {
            return false;
        }
    }
    if let Some(m) = &c.memory {
        if !m.admits(o.resources.cpus, o.resources.memory_gb) {
            return false;
        }
    }
    true
}

/// Whether a job of this candidate fits in a fixed machine: a machine that
/// exists is not chosen by its exact shape, as an instance type is, but by
/// room (`H100:1` runs on an 8-GPU box, `cpus: 4` on a 16-core one).
fn fits_fixed_machine(c: &ResourceCandidate, o: &Offering) -> bool {
    let has = |name: &str| o.resources.accelerators.get(name).copied().unwrap_or(0.0);
    let gpus_fit = c
        .accelerator
        .as_ref()
        .is_none_or(|a| has(&a.name) >= a.count);
    let cpus = c.cpus.as_ref().map_or(0.0, |q| q.value);
    let memory = c.memory.as_ref().map_or(0.0, |m| {
        m.gb_for(if cpus > 0.0 { cpus } else { o.resources.cpus })
    });
    gpus_fit && cpus <= o.resources.cpus && memory <= o.resources.memory_gb
}

/// Whether a candidate's disk (`disk_size`, `disk_tier`) can be had where
/// the largest disk is `max_gb` (none: the disk cannot be chosen there).
fn disk_fits(c: &ResourceCandidate, max_gb: Option<u64>) -> bool {
    match (c.disk_size_gb, c.disk_tier, max_gb) {
        (None, None, _) => true,
        (_, _, None) => false,
        (size, _, Some(max)) => size.is_none_or(|s| s <= max),
    }
}

/// Whether an existing node can take one rank of a candidate.
pub fn node_matches(c: &ResourceCandidate, node: &Node) -> bool {
    place_matches(
        c,
        &node.provider,
        &node.region,
        node.zone.as_deref(),
        &node.instance_type,
    ) && c.max_hourly_cost.is_none_or(|max| node.hourly_price <= max)
        && (c.ports.is_empty()
            || node.ports_open
                && node
                    .opened_ports
                    .as_ref()
                    .is_none_or(|open| PortRange::all_within(&c.ports, open)))
        && c.disk_size_gb
            .is_none_or(|want| node.disk_gb.is_some_and(|has| has >= want))
        && c.disk_tier
            .is_none_or(|want| node.disk_tier.is_some_and(|has| has >= want))
        && (c.image_id.is_empty() || c.image_for(&node.region) == node.image_id)
}

/// Every offering that can host the task and is not blocked at `now_ms`,
/// best first: in the task's order of candidates when it is `ordered`,
/// else by the hourly cost of all its nodes plus its data's egress
/// ([`Choice::cost`]); among equal prices the
/// smaller machine, then a stable order (provider, region, zone, type), so
/// that every replica and every run ranks alike.
pub fn rank<'a>(
    spec: &TaskSpec,
    offerings: &'a [Offering],
    blocked: &BTreeMap<String, Block>,
    now_ms: i64,
) -> Vec<Choice<'a>> {
    let nodes = f64::from(spec.num_nodes.max(1));
    let mut out: Vec<Choice> = Vec::new();
    // (offering, spot) already taken through an earlier candidate: keep the first.
    let mut seen = vec![[false; 2]; offerings.len()];
    let mut key = String::new();
    for (i, c) in spec.resources.candidates.iter().enumerate() {
        let market = usize::from(c.use_spot);
        for (k, o) in offerings.iter().enumerate() {
            let too_few = o.fixed_machines.is_some_and(|m| m < spec.num_nodes);
            if seen[k][market] || too_few || !offering_matches(c, o) {
                continue;
            }
            if !blocked.is_empty() {
                place_key_into(
                    &mut key,
                    &o.provider,
                    &o.region,
                    o.zone.as_deref(),
                    &o.instance_type,
                    c.use_spot,
                );
                if blocked
                    .get(key.as_str())
                    .is_some_and(|b| b.until_ms > now_ms)
                {
                    continue;
                }
            }
            seen[k][market] = true;
            let node_price = o.price(c.use_spot);
            out.push(Choice {
                candidate: i,
                offering: o,
                spot: c.use_spot,
                node_price,
                hourly_cost: node_price * nodes,
                egress_cost: egress_cost(spec, &o.provider),
            });
        }
    }
    let ordered = spec.resources.ordered;
    out.sort_by(|a, b| {
        let by_candidate = if ordered {
            a.candidate.cmp(&b.candidate)
        } else {
            Ordering::Equal
        };
        by_candidate
            .then(a.cost().total_cmp(&b.cost()))
            .then(size(a.offering).total_cmp(&size(b.offering)))
            .then_with(|| place_order(a.offering).cmp(&place_order(b.offering)))
            .then(a.candidate.cmp(&b.candidate))
    });
    out
}

/// A machine's size, for breaking price ties toward the smaller one.
fn size(o: &Offering) -> f64 {
    let gpus: f64 = o.resources.accelerators.values().sum();
    gpus * 1e6 + o.resources.cpus * 1e3 + o.resources.memory_gb
}

fn place_order(o: &Offering) -> (&str, &str, Option<&str>, &str) {
    (&o.provider, &o.region, o.zone.as_deref(), &o.instance_type)
}

/// The places that match the task but are blocked now, for the message of
/// a job that has nowhere left to go.
pub fn blocked_matches(
    spec: &TaskSpec,
    offerings: &[Offering],
    blocked: &BTreeMap<String, Block>,
    now_ms: i64,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for c in &spec.resources.candidates {
        for o in offerings.iter().filter(|o| offering_matches(c, o)) {
            let key = o.place_key(c.use_spot);
            if let Some(b) = blocked.get(&key).filter(|b| b.until_ms > now_ms) {
                if !out.iter().any(|(k, _)| *k == key) {
                    out.push((key, b.reason.clone()));
                }
            }
        }
    }
    out
}

/// Checks that some offering could ever host the task, naming the field
/// that rules everything out.
pub fn check_feasible(spec: &TaskSpec, offerings: &[Offering]) -> Result<(), SpecError> {
    if !rank(spec, offerings, &BTreeMap::new(), 0).is_empty() {
        return Ok(());
    }
    let c = &spec.resources.candidates[0];
    let providers: std::collections::BTreeSet<&str> =
        offerings.iter().map(|o| o.provider.as_str()).collect();
    let list = |v: Vec<String>| v.join(", ");
    if let Some(cloud) = &c.infra.cloud {
        if !providers.contains(cloud.as_str()) {
            return Err(SpecError::new(
                "resources.infra",
                format!(
                    "cloud '{cloud}' is not enabled (enabled: {})",
                    list(providers.iter().map(|s| s.to_string()).collect())
                ),
            ));
        }
        if let Some(r) = &c.infra.region {
            if !offerings
                .iter()
                .any(|o| &o.provider == cloud && &o.region == r)
            {
                let mut regions: Vec<String> = offerings
                    .iter()
                    .filter(|o| &o.provider == cloud)
                    .map(|o| o.region.clone())
                    .collect();
                regions.dedup();
                return Err(SpecError::new(
                    "resources.infra",
                    format!("{cloud} has no region '{r}' (regions: {})", list(regions)),
                ));
            }
        }
    }
    if !c.ports.is_empty() && offerings.iter().all(|o| !o.opens_ports) {
        return Err(SpecError::new(
            "resources.ports",
            format!(
                "no enabled provider opens ports ({} cannot); the local provider, AWS \
                 and Seeweb can",
                list(providers.iter().map(|s| s.to_string()).collect())
            ),
        ));
    }
    if !c.image_id.is_empty() {
        let takers: Vec<String> = providers
            .iter()
            .filter(|p| {
                offerings
                    .iter()
                    .any(|o| o.provider == **p && o.custom_images)
            })
            .map(|p| p.to_string())
            .collect();
        if takers.is_empty() {
            return Err(SpecError::new(
                "resources.image_id",
                format!(
                    "no enabled provider boots a VM image a task names ({} cannot; AWS can)",
                    list(providers.iter().map(|s| s.to_string()).collect())
                ),
            ));
        }
        if !offerings
            .iter()
            .any(|o| o.custom_images && c.image_for(&o.region).is_some())
        {
            return Err(SpecError::new(
                "resources.image_id",
                format!("names no region that {} offers", list(takers)),
            ));
        }
    }
    if c.disk_size_gb.is_some() || c.disk_tier.is_some() {
        let mut biggest: Vec<String> = Vec::new();
        for p in &providers {
            let max = offerings
                .iter()
                .filter(|o| o.provider == *p)
                .filter_map(|o| o.disk_gb_max)
                .max();
            biggest.push(match max {
                Some(gb) => format!("{p}: up to {gb} GB"),
                None => format!("{p}: disks come with the instance"),
            });
        }
        if !offerings.iter().any(|o| disk_fits(c, o.disk_gb_max)) {
            let (field, want) = match c.disk_size_gb {
                Some(gb) => ("resources.disk_size", format!("a disk of {gb} GB")),
                None => ("resources.disk_tier", "a chosen disk tier".to_string()),
            };
            return Err(SpecError::new(
                field,
                format!("no enabled provider gives {want} ({})", biggest.join("; ")),
            ));
        }
    }
    if c.use_spot && offerings.iter().all(|o| o.spot_price.is_none()) {
        return Err(SpecError::new(
            "resources.use_spot",
            "no enabled provider offers spot capacity",
        ));
    }
    if let Some(a) = &c.accelerator {
        let mut names: Vec<String> = offerings
            .iter()
            .flat_map(|o| o.resources.accelerators.keys().cloned())
            .collect();
        names.sort();
        names.dedup();
        if !names.contains(&a.name) {
            let offered = if names.is_empty() {
                String::new()
            } else {
                format!(" (GPUs offered: {})", list(names))
            };
            return Err(SpecError::new(
                "resources.accelerators",
                format!("no enabled provider offers {a}{offered}"),
            ));
        }
        return Err(SpecError::new(
            "resources.accelerators",
            format!(
                "no enabled provider offers {a} with the requested cpus, memory, nodes, place and price"
            ),
        ));
    }
    if let Some(t) = &c.instance_type {
        if !offerings.iter().any(|o| &o.instance_type == t) {
            return Err(SpecError::new(
                "resources.instance_type",
                format!("no enabled provider has instance type '{t}'"),
            ));
        }
    }
    Err(SpecError::new(
        "resources",
        "no instance of any enabled provider satisfies these resources",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Resources;
    use crate::task::parse_task_yaml;

    /// xorshift64*: deterministic, so a failing seed replays.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
            &xs[(self.next() % xs.len() as u64) as usize]
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
    }

    const GPUS: &[&str] = &["H100", "A100", "L4"];
    const PROVIDERS: &[&str] = &["aws", "seeweb", "sim"];
    const REGIONS: &[&str] = &["r1", "r2", "r3"];

    fn catalog(rng: &mut Rng, n: usize) -> Vec<Offering> {
        (0..n)
            .map(|i| {
                let mut resources = Resources {
                    cpus: *rng.pick(&[2.0, 4.0, 8.0, 16.0, 96.0]),
                    ..Default::default()
                };
                resources.memory_gb = resources.cpus * *rng.pick(&[2.0, 4.0, 8.0]);
                if rng.chance(70) {
                    resources
                        .accelerators
                        .insert(rng.pick(GPUS).to_string(), *rng.pick(&[1.0, 2.0, 4.0, 8.0]));
                }
                let price = (rng.next() % 5000) as f64 / 100.0;
                Offering {
                    provider: rng.pick(PROVIDERS).to_string(),
                    region: rng.pick(REGIONS).to_string(),
                    zone: rng.chance(30).then(|| rng.pick(&["a", "b"]).to_string()),
                    runs_as_coordinator_user: false,
                    simulated: false,
                    fixed_machines: None,
                    disk_gb_max: None,
                    opens_ports: false,
                    ports_per_node: false,
                    custom_images: false,
                    can_stop: false,
                    instance_type: format!("t{}", i % 40),
                    resources,
                    hourly_price: price,
                    spot_price: rng.chance(50).then_some(price * 0.3),
                }
            })
            .collect()
    }

    fn task(rng: &mut Rng) -> TaskSpec {
        let mut r = Vec::new();
        match rng.next() % 4 {
            0 => r.push(format!(
                "accelerators: '{}:{}'",
                rng.pick(GPUS),
                rng.pick(&[1, 2, 8])
            )),
            1 => {
                let first = (rng.next() % 3) as usize;
                r.push(format!(
                    "accelerators: {{{}: {}, {}: {}}}",
                    GPUS[first],
                    rng.pick(&[1, 8]),
                    GPUS[(first + 1) % 3],
                    rng.pick(&[2, 4])
                ))
            }
            2 => r.push(format!(
                "accelerators: ['{}:{}', '{}:{}']",
                rng.pick(GPUS),
                rng.pick(&[1, 8]),
                rng.pick(GPUS),
                rng.pick(&[1, 4])
            )),
            _ => {}
        }
        if rng.chance(40) {
            r.push(format!("cpus: '{}'", rng.pick(&["4+", "8", "16+", "2"])));
        }
        if rng.chance(30) {
            r.push(format!(
                "memory: '{}'",
                rng.pick(&["32+", "16", "4x", "2x+"])
            ));
        }
        if rng.chance(30) {
            r.push("use_spot: true".into());
        }
        if rng.chance(40) {
            let infra = match rng.next() % 3 {
                0 => rng.pick(PROVIDERS).to_string(),
                1 => format!("{}/{}", rng.pick(PROVIDERS), rng.pick(REGIONS)),
                _ => format!("*/{}/{}", rng.pick(REGIONS), rng.pick(&["a", "b"])),
            };
            r.push(format!("infra: '{infra}'"));
        }
        if rng.chance(20) {
            r.push(format!("instance_type: t{}", rng.next() % 40));
        }
        if rng.chance(30) {
            r.push(format!("max_hourly_cost: {}", 1 + rng.next() % 40));
        }
        let nodes = *rng.pick(&[1, 1, 2, 4]);
        let mut data = String::new();
        if rng.chance(30) {
            data += &format!("inputs: {{'s3://data/x': {}}}\n", rng.next() % 500);
        }
        if rng.chance(20) {
            data += &format!("outputs: {{'gs://out/y': {}}}\n", rng.next() % 200);
        }
        let yaml = format!(
            "num_nodes: {nodes}\n{data}resources: {{{}}}\n",
            r.join(", ")
        );
        parse_task_yaml(&yaml, &Default::default()).unwrap_or_else(|e| panic!("{yaml}: {e}"))
    }

    /// The request, checked field by field without the optimizer's code.
    fn violates(c: &ResourceCandidate, o: &Offering) -> Option<&'static str> {
        let gpus: f64 = o.resources.accelerators.values().sum();
        match &c.accelerator {
            Some(a) if o.resources.accelerators.get(&a.name) != Some(&a.count.ceil()) => {
                return Some("accelerators")
            }
            None if c.instance_type.is_none() && gpus > 0.0 => return Some("a GPU for a CPU task"),
            _ => {}
        }
        if c.infra.cloud.as_ref().is_some_and(|x| *x != o.provider) {
            return Some("cloud");
        }
        if c.infra.region.as_ref().is_some_and(|x| *x != o.region) {
            return Some("region");
        }
        if c.infra.zone.is_some() && c.infra.zone != o.zone {
            return Some("zone");
        }
        if c.instance_type
            .as_ref()
            .is_some_and(|t| *t != o.instance_type)
        {
            return Some("instance_type");
        }
        if c.use_spot && o.spot_price.is_none() {
            return Some("use_spot");
        }
        if c.cpus.as_ref().is_some_and(|q| !q.admits(o.resources.cpus)) {
            return Some("cpus");
        }
        if c.memory
            .as_ref()
            .is_some_and(|m| !m.admits(o.resources.cpus, o.resources.memory_gb))
        {
            return Some("memory");
        }
        let price = if c.use_spot {
            o.spot_price.unwrap_or(f64::MAX)
        } else {
            o.hourly_price
        };
        if c.max_hourly_cost.is_some_and(|max| price > max) {
            return Some("max_hourly_cost");
        }
        None
    }

    #[test]
    fn a_node_that_opened_some_ports_takes_only_jobs_within_them() {
        let node = |opened: serde_json::Value| -> Node {
            serde_json::from_value(serde_json::json!({
                "id": "node-1", "state": "Ready", "provider": "aws", "region": "us-east-1",
                "instance_type": "m6i.large",
                "resources": {"accelerators": {}, "cpus": 2.0, "memory_gb": 8.0},
                "hourly_price": 0.1, "address": "", "instance_id": null, "created_at_ms": 0,
                "message": "", "unhealthy": null, "zone": null, "spot": false,
                "launched_at_ms": null, "ended_at_ms": null, "preemption": null,
                "enrolled_key": null, "revoked_at_ms": null, "simulated": false,
                "fixed_machine": false, "ports_open": true, "opened_ports": opened,
            }))
            .unwrap()
        };
        let wants = |yaml: &str| {
            crate::task::parse_task_yaml(yaml, &Default::default())
                .unwrap()
                .resources
                .candidates[0]
                .clone()
        };
        let opened =
            node(serde_json::json!([{"start": 8888, "end": 8888}, {"start": 6006, "end": 6010}]));
        assert!(node_matches(
            &wants("resources: {ports: [8888, 6007-6008]}"),
            &opened
        ));
        assert!(node_matches(&wants("resources: {cpus: 1}"), &opened));
        assert!(!node_matches(&wants("resources: {ports: 9000}"), &opened));
        assert!(!node_matches(
            &wants("resources: {ports: 6009-6011}"),
            &opened
        ));
        // A provider that opens every port (local, Seeweb) takes any.
        assert!(node_matches(
            &wants("resources: {ports: 9000}"),
            &node(serde_json::Value::Null)
        ));
    }

    #[test]
    fn property_never_a_candidate_that_violates_the_request_nor_a_pricier_one_first() {
        let mut seen_choices = 0;
        for seed in 1..=300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let offerings = catalog(&mut rng, 300);
            let spec = task(&mut rng);
            // Block a few places, some already expired.
            let mut blocked = BTreeMap::new();
            for o in offerings.iter().take(20) {
                let until = if rng.chance(50) { 50 } else { 200 };
                blocked.insert(
                    o.place_key(rng.chance(50)),
                    Block {
                        until_ms: until,
                        reason: "test".into(),
                    },
                );
            }
            let now = 100;
            let choices = rank(&spec, &offerings, &blocked, now);
            seen_choices += choices.len();
            for ch in &choices {
                let c = &spec.resources.candidates[ch.candidate];
                assert_eq!(violates(c, ch.offering), None, "seed {seed}: {ch:?}");
                let key = ch.offering.place_key(ch.spot);
                assert!(
                    blocked.get(&key).is_none_or(|b| b.until_ms <= now),
                    "seed {seed}: blocked {key} offered"
                );
                let nodes = f64::from(spec.num_nodes);
                assert!((ch.hourly_cost - ch.node_price * nodes).abs() < 1e-9);
            }
            for w in choices.windows(2) {
                let (a, b) = (&w[0], &w[1]);
                if spec.resources.ordered {
                    assert!(
                        a.candidate <= b.candidate,
                        "seed {seed}: order of preference"
                    );
                    if a.candidate == b.candidate {
                        assert!(a.cost() <= b.cost(), "seed {seed}");
                    }
                } else {
                    assert!(a.cost() <= b.cost(), "seed {seed}: {a:?} before {b:?}");
                }
            }
            // Complete: every fitting, unblocked offering is ranked.
            for o in &offerings {
                for c in &spec.resources.candidates {
                    let open = blocked
                        .get(&o.place_key(c.use_spot))
                        .is_none_or(|b| b.until_ms <= now);
                    if violates(c, o).is_none() && open {
                        assert!(
                            choices
                                .iter()
                                .any(|ch| ch.offering == o && ch.spot == c.use_spot),
                            "seed {seed}: {o:?} fits but is missing"
                        );
                    }
                }
            }
        }
        assert!(
            seen_choices > 1000,
            "the generator must produce real choices"
        );
    }

    /// An offering in region r1 with no extras.
    fn offering(
        provider: &str,
        instance_type: &str,
        resources: Resources,
        price: f64,
        spot: Option<f64>,
    ) -> Offering {
        Offering {
            provider: provider.into(),
            region: "r1".into(),
            zone: None,
            runs_as_coordinator_user: false,
            simulated: false,
            fixed_machines: None,
            disk_gb_max: None,
            opens_ports: false,
            ports_per_node: false,
            custom_images: false,
            can_stop: false,
            instance_type: instance_type.into(),
            resources,
            hourly_price: price,
            spot_price: spot,
        }
    }

    #[test]
    fn inputs_and_outputs_weigh_egress_across_clouds() {
        let o = |provider: &str, price: f64| {
            let resources = Resources {
                cpus: 8.0,
                memory_gb: 32.0,
                ..Default::default()
            };
            offering(provider, &format!("{provider}-8"), resources, price, None)
        };
        let offerings = [o("seeweb", 1.00), o("aws", 1.05)];
        let first = |y: &str| {
            let spec = parse_task_yaml(y, &Default::default()).unwrap();
            let ranked = rank(&spec, &offerings, &BTreeMap::new(), 0);
            (ranked[0].offering.provider.clone(), ranked[0].egress_cost)
        };
        assert_eq!(first("run: x"), ("seeweb".into(), 0.0));
        // 100 GB read from S3 elsewhere costs AWS's egress: $9 > the $0.05/h saved.
        let (p, _) = first("inputs: {'s3://bucket/ds': 100}\nrun: x");
        assert_eq!(p, "aws");
        let spec = parse_task_yaml("inputs: {'s3://bucket/ds': 100}", &Default::default()).unwrap();
        assert!((egress_cost(&spec, "seeweb") - 9.0).abs() < 1e-9);
        assert_eq!(egress_cost(&spec, "aws"), 0.0);
        // Results written to GCS leave AWS at AWS's price; Seeweb's traffic is included.
        let (p, egress) = first("outputs: {'gs://results': 100}\nrun: x");
        assert_eq!((p.as_str(), egress), ("seeweb", 0.0));
        // Bad input names the entry.
        for (y, path) in [
            ("inputs: {'s3://b': -1}", "inputs.s3://b"),
            ("inputs: {'s3://b': lots}", "inputs.s3://b"),
            ("inputs: {'/local/dir': 5}", "inputs./local/dir"),
            ("outputs: {'s3://a': 1, 's3://b': 2}", "outputs"),
            ("outputs: [s3://a]", "outputs"),
        ] {
            let e = parse_task_yaml(y, &Default::default()).unwrap_err();
            assert_eq!(e.path, path, "{y}: {e}");
        }
    }

    #[test]
    fn spot_is_priced_at_the_spot_price_and_num_nodes_multiplies() {
        let o = |t: &str, price: f64, spot: Option<f64>| {
            let mut resources = Resources {
                cpus: 8.0,
                memory_gb: 64.0,
                ..Default::default()
            };
            resources.accelerators.insert("H100".into(), 1.0);
            offering("aws", t, resources, price, spot)
        };
        let offerings = [
            o("a", 4.0, Some(1.5)),
            o("b", 3.0, None),
            o("c", 3.5, Some(2.0)),
        ];
        let spec = |y: &str| parse_task_yaml(y, &Default::default()).unwrap();
        let on_demand = rank(
            &spec("resources: {accelerators: H100:1}"),
            &offerings,
            &BTreeMap::new(),
            0,
        );
        let order: Vec<&str> = on_demand
            .iter()
            .map(|c| c.offering.instance_type.as_str())
            .collect();
        assert_eq!(order, ["b", "c", "a"]);
        let spot = rank(
            &spec("num_nodes: 2\nresources: {accelerators: H100:1, use_spot: true}"),
            &offerings,
            &BTreeMap::new(),
            0,
        );
        let order: Vec<(&str, f64)> = spot
            .iter()
            .map(|c| (c.offering.instance_type.as_str(), c.hourly_cost))
            .collect();
        assert_eq!(order, [("a", 3.0), ("c", 4.0)]);
        assert!(spot.iter().all(|c| c.spot));
    }
}
