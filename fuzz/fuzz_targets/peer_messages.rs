//! What a Raft peer may send: the batch envelope, the raft-rs messages in
//! it, and the commands in log entries, which the state machine applies.
//! `State::apply` must never panic, whatever it is given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nembo_domain::state::{Command, State};
use nembo_proto::raft::v1 as rpb;
use prost::Message as _;
use protobuf::Message as _;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = rpb::StreamRequest::decode(data) {
        for m in &batch.messages {
            let _ = raft::eraftpb::Message::parse_from_bytes(m);
        }
    }
    let _ = rpb::SnapshotRequest::decode(data);
    let _ = raft::eraftpb::Message::parse_from_bytes(data);
    // Entries carry JSON commands: a sequence of them, applied in order.
    if let Ok(cmds) = serde_json::from_slice::<Vec<Command>>(data) {
        let mut state = State::default();
        for c in &cmds {
            let _ = state.apply(c);
        }
    } else if let Ok(cmd) = serde_json::from_slice::<Command>(data) {
        let _ = State::default().apply(&cmd);
    }
});
