//! Every message between agents and coordinators (enrollment included),
//! and the API's submissions and admin requests: decoding arbitrary bytes
//! never panics, and what decodes re-encodes to something that decodes the
//! same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nembo_proto::agent::v1 as apb;
use nembo_proto::v1 as pb;
use prost::Message;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(m) = M::decode(data) {
        let again = M::decode(m.encode_to_vec().as_slice()).expect("re-encoded message decodes");
        assert_eq!(m, again);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<apb::SessionRequest>(data);
    round_trip::<apb::SessionResponse>(data);
    round_trip::<pb::SubmitJobRequest>(data);
    // Enrollment is open to anyone: its request is the first thing an
    // attacker gets to send.
    round_trip::<apb::EnrollRequest>(data);
    round_trip::<apb::RenewRequest>(data);
    round_trip::<apb::EnrollResponse>(data);
    round_trip::<pb::CreateUserRequest>(data);
    round_trip::<pb::CreateJoinTokenRequest>(data);
});
