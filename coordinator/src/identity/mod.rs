//! Who is who, and what stays secret: the cluster CA, tokens on disk
//! (tls), the certificate issuer, members' own certificates (member), and
//! task secrets sealed before they enter the Raft log.

pub mod issuer;
pub mod member;
pub mod sealed;
pub mod tls;
