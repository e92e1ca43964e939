//! The agents' side of the coordinator: enrollment (a join token and a key
//! for a certificate) and the session each enrolled agent holds with the
//! leader (hello, heartbeats, reports, job orders, log upload).

pub mod enroll;
pub mod files;
pub mod session;
pub mod shells;
