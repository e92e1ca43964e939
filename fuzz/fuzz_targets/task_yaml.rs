//! The task YAML parser: never panics, and whatever it accepts passes
//! validation (the API relies on that).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use nembo_domain::task::{parse_task_yaml, validate};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut overrides = BTreeMap::new();
    overrides.insert("HF_TOKEN".to_string(), "x".to_string());
    if let Ok(spec) = parse_task_yaml(text, &overrides) {
        if let Err(e) = validate(&spec) {
            panic!("accepted a task that does not validate: {e}");
        }
    }
});
