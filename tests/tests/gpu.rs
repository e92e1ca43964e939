//! GPUs without a GPU: the real agent loads the fake `libnvidia-ml.so.1`
//! (built from tests/fake-nvml/fake_nvml.c) through nvml-wrapper, exactly as
//! it loads NVIDIA's, and reports what the test wrote into the fake's file.

use std::path::Path;
use std::process::Command;

use nembo_tests::bin;
use serde_json::Value;

/// Where the fake NVML library was built.
const FAKE_NVML: &str = env!("NEMBO_FAKE_NVML_LIB");

fn probe(values: &Path) -> Value {
    let out = Command::new(bin("nembo-agent"))
        .args(["--probe-gpus", "--nvml-lib", FAKE_NVML])
        .env("NEMBO_FAKE_NVML", values)
        .output()
        .expect("run nembo-agent --probe-gpus");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("probe JSON")
}

#[test]
fn the_agent_reads_every_metric_of_eight_gpus_and_skips_unsupported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("nvml.txt");
    std::fs::write(
        &values,
        "gpus 8\nname NVIDIA H100 80GB HBM3\nfb_total 85899345920\nfb_used 1073741824\n\
         util 40\nutil.3 97\nmem_util 12\ntemp 45\npower_mw 312500\npower_limit_mw 700000\n\
         energy_mj 5000\nsm_clock 1980\nmem_clock 2619\nthrottle 4\npcie_rx 100\npcie_tx 200\n\
         ecc_uncorrected.5 2\nprocs.1 2\nunsupported.7 temp power\n",
    )
    .unwrap();
    let p = probe(&values);
    assert_eq!(p["nvml_error"], Value::Null);
    assert_eq!(p["driver_version"], "580.00-fake");
    let gpus = p["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 8);
    assert!(gpus.iter().all(|g| g["model"] == "H100"), "{gpus:?}");
    assert_eq!(gpus[2]["pci_bus_id"], "00000000:12:00.0");
    let s = p["samples"].as_array().unwrap();
    assert_eq!(s[0]["gpu_util_percent"], 40);
    assert_eq!(s[3]["gpu_util_percent"], 97);
    assert_eq!(s[0]["fb_used_bytes"], 1073741824u64);
    assert_eq!(s[0]["fb_free_bytes"], 85899345920u64 - 1073741824);
    assert_eq!(s[0]["power_w"], 312.5);
    assert_eq!(s[0]["throttle_reasons"], 4);
    assert_eq!(s[5]["ecc_uncorrected"], 2);
    assert_eq!(s[1]["processes"], 2);
    // What a board does not support is absent, not an error.
    assert_eq!(s[7]["temperature_c"], Value::Null);
    assert_eq!(s[7]["power_w"], Value::Null);
    assert_eq!(s[7]["gpu_util_percent"], 40);
}

#[test]
fn without_the_library_the_agent_reports_no_gpus() {
    let out = Command::new(bin("nembo-agent"))
        .args([
            "--probe-gpus",
            "--nvml-lib",
            "/nonexistent/libnvidia-ml.so.1",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(p["nvml_error"].as_str().is_some());
    assert_eq!(p["gpus"].as_array().unwrap().len(), 0);
}
