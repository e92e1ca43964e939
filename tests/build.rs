//! Builds the fake `libnvidia-ml.so.1` the GPU tests load through the
//! agent's real NVML code path (nvml-wrapper, dlopen at run time).

use std::path::PathBuf;

fn main() {
    let src = "fake-nvml/fake_nvml.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let lib = out.join("libnvidia-ml.so.1");
    let status = cc::Build::new()
        .get_compiler()
        .to_command()
        .args(["-shared", "-fPIC", "-pthread", "-O1", "-Wall", "-o"])
        .arg(&lib)
        .arg(src)
        .status()
        .expect("run the C compiler");
    assert!(status.success(), "building the fake NVML library failed");
    println!("cargo:rustc-env=NEMBO_FAKE_NVML_LIB={}", lib.display());
}
