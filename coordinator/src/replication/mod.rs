//! Replication: the Raft member (raft-rs on its own thread, raft-engine on
//! disk) and the peer transport that carries its messages between members
//! over mutual TLS.

pub mod peer;
pub mod raft;
