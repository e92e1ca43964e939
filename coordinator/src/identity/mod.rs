//! Who is who, and what stays secret: the cluster CA and member
//! certificates, tokens on disk (tls), the agent certificate issuer, and
//! task secrets sealed before they enter the Raft log.

pub mod issuer;
pub mod sealed;
pub mod tls;
