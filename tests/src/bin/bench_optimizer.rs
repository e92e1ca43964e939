//! `bench_optimizer`: the optimizer's latency over a large catalog. Builds a
//! catalog of `--offerings` (default 10 000) offerings: 3 providers x 20
//! regions x 3 zones x GPU/CPU shapes, half with spot prices, 200 places
//! blocked; then ranks `--tasks` (default 2 000) tasks of every form
//! (single accelerator, any_of, ordered lists, cpus/memory, spot, pinned
//! infra, max_hourly_cost, multi-node) and reports the time per task.
//! Prints a table, then JSON.
//!
//! `cargo build --release -p nembo-tests && target/release/bench_optimizer`

use std::collections::BTreeMap;
use std::time::Instant;

use nembo_domain::optimizer::rank;
use nembo_domain::state::{Block, Offering, Resources};
use nembo_domain::task::{parse_task_yaml, TaskSpec};
use nembo_tests::{cli_arg, percentile};
use serde_json::json;

const GPUS: &[(&str, f64)] = &[
    ("H100", 8.0),
    ("H200", 8.0),
    ("A100-80GB", 8.0),
    ("A100", 8.0),
    ("L40S", 4.0),
    ("L4", 4.0),
    ("A10G", 4.0),
];

fn catalog(n: usize) -> Vec<Offering> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0u64;
    'fill: loop {
        for provider in ["aws", "seeweb", "sim"] {
            for region in 0..20 {
                for zone in ["a", "b", "c"] {
                    for (gpu, per_gpu) in GPUS {
                        for count in [1.0, 2.0, 4.0, 8.0] {
                            if out.len() == n {
                                break 'fill;
                            }
                            i += 1;
                            let mut resources = Resources {
                                cpus: count * 12.0,
                                memory_gb: count * 96.0,
                                ..Default::default()
                            };
                            resources.accelerators.insert(gpu.to_string(), count);
                            let price = per_gpu * count * (1.0 + (i % 17) as f64 / 40.0);
                            out.push(Offering {
                                provider: provider.into(),
                                region: format!("region-{region:02}"),
                                zone: Some(zone.into()),
                                runs_as_coordinator_user: false,
                                simulated: false,
                                fixed_machines: None,
                                disk_gb_max: None,
                                opens_ports: false,
                                ports_per_node: false,
                                custom_images: false,
                                can_stop: false,
                                instance_type: format!(
                                    "{}-{}x-{}",
                                    gpu.to_lowercase(),
                                    count,
                                    i % 5
                                ),
                                resources,
                                hourly_price: price,
                                spot_price: i.is_multiple_of(2).then_some(price * 0.4),
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

fn tasks(n: usize) -> Vec<TaskSpec> {
    let forms = [
        "resources: {accelerators: H100:8}",
        "resources: {accelerators: {H100: 8, H200: 8, A100-80GB: 8}}",
        "resources: {accelerators: ['H200:8', 'H100:8']}",
        "resources: {accelerators: L4:1, cpus: 8+, memory: 64+}",
        "resources: {accelerators: A100:4, use_spot: true}",
        "resources: {accelerators: H100:8, infra: aws/region-03}",
        "resources: {accelerators: L40S:2, max_hourly_cost: 10}",
        "num_nodes: 4\nresources: {accelerators: H100:8, use_spot: true}",
    ];
    (0..n)
        .map(|i| parse_task_yaml(forms[i % forms.len()], &Default::default()).expect("task"))
        .collect()
}

fn main() {
    let n = cli_arg("--offerings", 10_000) as usize;
    let task_count = cli_arg("--tasks", 2_000) as usize;
    let offerings = catalog(n);
    let mut blocked = BTreeMap::new();
    for o in offerings.iter().step_by(offerings.len().max(200) / 200) {
        blocked.insert(
            o.place_key(false),
            Block {
                until_ms: i64::MAX,
                reason: "no capacity".into(),
            },
        );
    }
    let specs = tasks(task_count);
    let mut micros = Vec::with_capacity(specs.len());
    let mut ranked = 0usize;
    // One pass to warm caches, then the measured one.
    for s in specs.iter().take(50) {
        std::hint::black_box(rank(s, &offerings, &blocked, 0));
    }
    let t0 = Instant::now();
    for s in &specs {
        let t = Instant::now();
        let choices = std::hint::black_box(rank(s, &offerings, &blocked, 0));
        micros.push(t.elapsed().as_secs_f64() * 1e6);
        ranked += choices.len();
    }
    let total = t0.elapsed().as_secs_f64();
    let mean = micros.iter().sum::<f64>() / micros.len() as f64;
    let p50 = percentile(&mut micros, 0.5);
    let p99 = percentile(&mut micros, 0.99);
    let max = percentile(&mut micros, 1.0);
    println!(
        "Optimizer: {} offerings ({} blocked), {} tasks of 8 forms",
        offerings.len(),
        blocked.len(),
        specs.len()
    );
    println!(
        "{:>10} {:>10} {:>10} {:>10} {:>14}",
        "mean us", "p50 us", "p99 us", "max us", "choices/task"
    );
    println!(
        "{:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>14.1}",
        mean,
        p50,
        p99,
        max,
        ranked as f64 / specs.len() as f64
    );
    println!(
        "{}",
        json!({
            "offerings": offerings.len(),
            "blocked": blocked.len(),
            "tasks": specs.len(),
            "mean_us": mean,
            "p50_us": p50,
            "p99_us": p99,
            "max_us": max,
            "total_s": total,
            "choices_per_task": ranked as f64 / specs.len() as f64,
        })
    );
}
