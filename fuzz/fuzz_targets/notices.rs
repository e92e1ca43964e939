//! The cloud metadata answers the agent reads (AWS instance-action, GCP
//! values, Azure Scheduled Events) and their dates.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nembo_agent::preempt;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = preempt::parse_aws_action(text);
    let _ = preempt::gcp_notice("preempted", text);
    let _ = preempt::gcp_notice("maintenance-event", text);
    let _ = preempt::parse_azure_events(text, Some("vm1"));
    let _ = preempt::parse_azure_events(text, None);
    let _ = preempt::parse_rfc3339(text);
    let _ = preempt::parse_rfc1123(text);
});
