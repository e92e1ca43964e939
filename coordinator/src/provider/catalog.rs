//! Provider catalogs: one CSV per provider (`catalog/<provider>.csv` in the
//! repository, compiled in), with `#` lines naming the source and date.
//! A refreshed copy in `<cluster dir>/catalog/<provider>.csv` wins over the
//! compiled one, so `nembo catalog refresh` takes effect on restart without
//! a rebuild.

use std::collections::BTreeMap;
use std::path::Path;

use nembo_domain::state::{Offering, Resources};

/// The columns, in order.
pub const HEADER: &str =
    "instance_type,accelerator_name,accelerator_count,vcpus,memory_gib,price,spot_price,region,zone";
/// The same with the disk each plan comes with (GB), for providers whose
/// disk is fixed per plan (Seeweb's refreshed catalogs).
pub const HEADER_WITH_DISK: &str = "instance_type,accelerator_name,accelerator_count,vcpus,memory_gib,price,spot_price,region,zone,disk_gb";

/// Parses a catalog; `provider` names every offering.
pub fn parse(provider: &str, text: &str) -> Result<Vec<Offering>, String> {
    let mut rows = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'));
    let with_disk = match rows.next() {
        Some((_, h)) if h.trim() == HEADER => false,
        Some((_, h)) if h.trim() == HEADER_WITH_DISK => true,
        other => {
            return Err(format!(
                "{provider} catalog: the first row must be the header '{HEADER}', not {:?}",
                other.map(|(_, l)| l)
            ))
        }
    };
    rows.map(|(i, line)| {
        row(provider, line, with_disk)
            .map_err(|e| format!("{provider} catalog line {}: {e}", i + 1))
    })
    .collect()
}

fn row(provider: &str, line: &str, with_disk: bool) -> Result<Offering, String> {
    let mut f: Vec<&str> = line.split(',').map(str::trim).collect();
    let disk = if with_disk { f.pop() } else { None };
    let [ty, acc, count, vcpus, mem, price, spot, region, zone] = f[..] else {
        return Err(format!(
            "{} columns, want {}",
            f.len() + usize::from(with_disk),
            9 + usize::from(with_disk)
        ));
    };
    let num = |name: &str, v: &str| -> Result<f64, String> {
        v.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| format!("{name} '{v}' is not a number"))
    };
    let mut accelerators = BTreeMap::new();
    if !acc.is_empty() {
        accelerators.insert(acc.to_string(), num("accelerator_count", count)?);
    }
    if ty.is_empty() || region.is_empty() {
        return Err("instance_type and region are required".into());
    }
    Ok(Offering {
        provider: provider.to_string(),
        region: region.to_string(),
        instance_type: ty.to_string(),
        resources: Resources {
            accelerators,
            cpus: num("vcpus", vcpus)?,
            memory_gb: num("memory_gib", mem)?,
        },
        hourly_price: num("price", price)?,
        spot_price: if spot.is_empty() {
            None
        } else {
            Some(num("spot_price", spot)?)
        },
        zone: (!zone.is_empty()).then(|| zone.to_string()),
        runs_as_coordinator_user: false,
        simulated: false,
        fixed_machines: None,
        disk_gb_max: match disk {
            None | Some("") => None,
            Some(d) => Some(
                d.parse::<u64>()
                    .map_err(|_| format!("disk_gb '{d}' is not a whole number"))?,
            ),
        },
        opens_ports: false,
        ports_per_node: false,
        custom_images: false,
        can_stop: false,
    })
}

/// The catalog to use: the refreshed copy under `dir` if there is one, else
/// the compiled-in `builtin`.
pub fn load(provider: &str, dir: Option<&Path>, builtin: &str) -> Result<Vec<Offering>, String> {
    if let Some(path) = dir.map(|d| d.join(format!("{provider}.csv"))) {
        match std::fs::read_to_string(&path) {
            Ok(text) => return parse(provider, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    parse(provider, builtin)
}

/// Writes offerings as a catalog, with `comments` (source, date) on top.
pub fn render(comments: &[String], offerings: &[Offering]) -> String {
    let mut out = String::new();
    for c in comments {
        out.push_str("# ");
        out.push_str(c);
        out.push('\n');
    }
    let with_disk = offerings.iter().any(|o| o.disk_gb_max.is_some());
    out.push_str(if with_disk { HEADER_WITH_DISK } else { HEADER });
    out.push('\n');
    for o in offerings {
        let (acc, count) = o
            .resources
            .accelerators
            .iter()
            .next()
            .map(|(k, v)| (k.as_str(), v.to_string()))
            .unwrap_or(("", String::new()));
        out.push_str(&format!(
            "{},{acc},{count},{},{},{},{},{},{}\n",
            o.instance_type,
            o.resources.cpus,
            o.resources.memory_gb,
            o.hourly_price,
            o.spot_price.map(|p| p.to_string()).unwrap_or_default(),
            o.region,
            o.zone.as_deref().unwrap_or(""),
        ));
        if with_disk {
            out.pop();
            let disk = o.disk_gb_max.map(|d| d.to_string()).unwrap_or_default();
            out.push_str(&format!(",{disk}\n"));
        }
    }
    out
}

/// AWS GPU instances (p4d, p5, p5en, g5, g6), published prices.
pub const AWS: &str = include_str!("../../../catalog/aws.csv");
/// Seeweb GPU plans, published prices.
pub const SEEWEB: &str = include_str!("../../../catalog/seeweb.csv");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_catalogs_parse_with_real_gpu_shapes() {
        let aws = parse("aws", AWS).unwrap();
        let p5 = aws
            .iter()
            .find(|o| o.instance_type == "p5.48xlarge" && o.region == "us-east-1")
            .expect("p5.48xlarge in us-east-1");
        assert_eq!(p5.resources.accelerators["H100"], 8.0);
        assert!(p5.hourly_price > 10.0 && p5.zone.is_some());
        for family in ["p4d.", "p5.", "p5en.", "g5.", "g6."] {
            assert!(
                aws.iter().any(|o| o.instance_type.starts_with(family)),
                "{family}"
            );
        }
        let seeweb = parse("seeweb", SEEWEB).unwrap();
        let h200 = seeweb
            .iter()
            .find(|o| o.resources.accelerators.get("H200") == Some(&1.0))
            .expect("a one-H200 plan");
        assert_eq!(h200.hourly_price, 2.60);
        assert!(seeweb.iter().all(|o| o.spot_price.is_none()));
    }

    #[test]
    fn a_refreshed_catalog_keeps_each_plans_disk() {
        let mut plans = parse("seeweb", SEEWEB).unwrap();
        assert!(
            plans.iter().all(|o| o.disk_gb_max.is_none()),
            "none shipped"
        );
        plans[0].disk_gb_max = Some(400);
        let text = render(&["refreshed".into()], &plans);
        assert!(text.contains(HEADER_WITH_DISK));
        let again = parse("seeweb", &text).unwrap();
        assert_eq!(again[0].disk_gb_max, Some(400));
        assert_eq!(again[1].disk_gb_max, None);
        let bad = format!("{HEADER_WITH_DISK}\nECS1GPU6,L4,1,4,32,0.38,,it-fr2,,lots\n");
        assert!(parse("seeweb", &bad)
            .unwrap_err()
            .contains("disk_gb 'lots'"));
    }

    #[test]
    fn render_and_parse_round_trip_and_bad_rows_name_their_line() {
        let seeweb = parse("seeweb", SEEWEB).unwrap();
        let again = parse("seeweb", &render(&["test".into()], &seeweb)).unwrap();
        assert_eq!(again, seeweb);
        let err = parse("x", &format!("{HEADER}\na,H100,one,1,1,1,,r,\n")).unwrap_err();
        assert!(
            err.contains("line 2") && err.contains("accelerator_count"),
            "{err}"
        );
        assert!(parse("x", "nope\n").unwrap_err().contains("header"));
    }
}
