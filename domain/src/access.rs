//! Who may use the cluster: users with roles, one-time join tokens for
//! agents, and the audit trail of every call that changed something.
//!
//! Only digests of tokens are kept (SHA-256 of 256 random bits: a slow hash
//! adds nothing against a secret that cannot be guessed). The coordinator
//! hashes and compares; everything here is pure state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a user may do. Ordered: each role can do what the ones before can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads status and metrics.
    Viewer,
    /// Runs jobs, and sees and cancels its own.
    User,
    /// Everything: all jobs, nodes, members, users, tokens, the audit log.
    Admin,
}

impl Role {
    /// `viewer`, `user` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "user" => Ok(Role::User),
            "admin" => Ok(Role::Admin),
            other => Err(format!("role '{other}' is not one of viewer, user, admin")),
        }
    }
}

/// A named holder of an API token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Unique name; jobs are owned by it.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Public half of its token (`nembo_<id>_<secret>`): finds the user.
    pub token_id: String,
    /// SHA-256 of the secret half, hex.
    pub token_sha256: String,
    /// When the token was issued.
    pub created_at_ms: i64,
    /// When it was revoked: refused from then on.
    pub revoked_at_ms: Option<i64>,
}

/// A token an agent trades, with a key it generated, for a certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinToken {
    /// Public half (`nembo-join.<id>.<secret>`).
    pub id: String,
    /// SHA-256 of the secret half, hex.
    pub sha256: String,
    /// Free text for `nembo admin tokens list`.
    pub description: String,
    /// Who made it.
    pub created_by: String,
    /// When.
    pub created_at_ms: i64,
    /// Refused from then on.
    pub expires_at_ms: i64,
    /// Enrollments left.
    pub uses_left: u32,
    /// Revoked by an admin.
    pub revoked_at_ms: Option<i64>,
    /// Nodes enrolled with it.
    pub nodes: Vec<String>,
    /// The existing node it re-enrolls (one whose certificate ran out);
    /// none: it makes new nodes only, so it can never take over a node.
    #[serde(default)]
    pub node: Option<String>,
}

impl JoinToken {
    /// Why it cannot be used at `now_ms`, if it cannot.
    pub fn unusable(&self, now_ms: i64) -> Option<&'static str> {
        if self.revoked_at_ms.is_some() {
            Some("join token revoked")
        } else if now_ms >= self.expires_at_ms {
            Some("join token expired")
        } else if self.uses_left == 0 {
            Some("join token already used")
        } else {
            None
        }
    }
}

/// One call that changed something (or tried to).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When it was handled.
    pub at_ms: i64,
    /// Who: a user name, `root` for the cluster's own token, or the join
    /// token an agent enrolled with.
    pub who: String,
    /// Their role (none: an agent).
    pub role: Option<Role>,
    /// The RPC, e.g. `SubmitJob`.
    pub call: String,
    /// What it named or made (`job 12`, `user alice`); never a secret.
    pub target: String,
    /// `ok`, or the gRPC code it failed with.
    pub result: String,
}

/// Most records of changes kept in the state; older ones are dropped first.
pub const AUDIT_KEEP: usize = 10_000;

/// Most records of refused or failed calls kept. They have a ring of their
/// own: any caller can make refusals at will, and 10 000 of them used to
/// push every record of a change (users made, tokens, enrollments) out.
pub const REFUSALS_KEEP: usize = 2_000;

/// Users, join tokens and the audit trail: part of the replicated state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Access {
    /// By name.
    pub users: BTreeMap<String, User>,
    /// By id.
    pub join_tokens: BTreeMap<String, JoinToken>,
    /// Calls that changed something (result `ok`), oldest first, at most
    /// [`AUDIT_KEEP`].
    pub audit: imbl::Vector<AuditRecord>,
    /// Records dropped from the front of `audit` so far: the record at
    /// `audit[i]` is the `audit_dropped + i`-th ever kept, a position that
    /// never changes (audit log pages are keyed by it).
    #[serde(default)]
    pub audit_dropped: u64,
    /// Refused or failed calls, oldest first, at most [`REFUSALS_KEEP`].
    #[serde(default)]
    pub refusals: imbl::Vector<AuditRecord>,
    /// As `audit_dropped`, for `refusals`.
    #[serde(default)]
    pub refusals_dropped: u64,
    /// Each coordinator member's current certificate: on the Raft stream a
    /// member's older certificate (rotated, or renewed) is refused.
    #[serde(default)]
    pub member_certs: BTreeMap<u64, MemberCert>,
}

/// A member certificate the cluster knows as that member's current one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCert {
    /// SHA-256 of its DER, hex.
    pub sha256: String,
    /// Its start of validity (Unix ms): a later certificate replaces it.
    pub not_before_ms: i64,
}

impl MemberCert {
    /// Whether `presented` is this member certificate or a later one. Of
    /// two certificates issued in the same second, the one with the greater
    /// digest counts as the later, so every member decides alike.
    pub fn admits(&self, presented: &MemberCert) -> bool {
        presented.sha256 == self.sha256
            || (presented.not_before_ms, &presented.sha256) > (self.not_before_ms, &self.sha256)
    }
}

impl Access {
    /// Whether member `id` may speak with the certificate `presented`: any
    /// certificate the CA issued to it until one is registered, then only
    /// that one or a later one.
    pub fn admits_member(&self, id: u64, presented: &MemberCert) -> bool {
        self.member_certs
            .get(&id)
            .is_none_or(|current| current.admits(presented))
    }
}

/// A change to [`Access`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AccessCommand {
    /// Issue a token for a user (new, or one whose token was revoked).
    CreateUser {
        /// Name.
        name: String,
        /// Role.
        role: Role,
        /// Token id.
        token_id: String,
        /// Token secret digest.
        token_sha256: String,
        /// Time.
        at_ms: i64,
    },
    /// Refuse a user's token from now on.
    RevokeUser {
        /// Name.
        name: String,
        /// Time.
        at_ms: i64,
    },
    /// Issue a join token.
    CreateJoinToken {
        /// The token (with no node yet).
        token: JoinToken,
    },
    /// Refuse a join token from now on.
    RevokeJoinToken {
        /// Id.
        id: String,
        /// Time.
        at_ms: i64,
    },
    /// Record a call.
    Audit(AuditRecord),
    /// Member `member_id` now uses `cert`; its earlier ones are refused.
    /// Ignored unless `cert` is later than the one registered.
    RegisterMemberCert {
        /// The member.
        member_id: u64,
        /// Its certificate.
        cert: MemberCert,
    },
    /// Member `member_id` left the cluster at `at_ms`: every certificate
    /// it had is refused from now on (one issued later, for a member that
    /// rejoins under the same id, is not).
    RetireMember {
        /// The member.
        member_id: u64,
        /// When it left.
        at_ms: i64,
    },
}

impl Access {
    /// Applies `cmd`; `Err` says why nothing changed.
    pub fn apply(&mut self, cmd: &AccessCommand) -> Result<(), String> {
        match cmd {
            AccessCommand::CreateUser {
                name,
                role,
                token_id,
                token_sha256,
                at_ms,
            } => {
                if let Some(u) = self.users.get(name) {
                    if u.revoked_at_ms.is_none() {
                        return Err(format!(
                            "user {name} exists; revoke its token first to issue a new one"
                        ));
                    }
                }
                self.users.insert(
                    name.clone(),
                    User {
                        name: name.clone(),
                        role: *role,
                        token_id: token_id.clone(),
                        token_sha256: token_sha256.clone(),
                        created_at_ms: *at_ms,
                        revoked_at_ms: None,
                    },
                );
                Ok(())
            }
            AccessCommand::RevokeUser { name, at_ms } => {
                let u = self
                    .users
                    .get_mut(name)
                    .ok_or_else(|| format!("user {name} not found"))?;
                u.revoked_at_ms.get_or_insert(*at_ms);
                Ok(())
            }
            AccessCommand::CreateJoinToken { token } => {
                if self.join_tokens.contains_key(&token.id) {
                    return Err(format!("join token {} exists", token.id));
                }
                self.join_tokens.insert(token.id.clone(), token.clone());
                Ok(())
            }
            AccessCommand::RevokeJoinToken { id, at_ms } => {
                let t = self
                    .join_tokens
                    .get_mut(id)
                    .ok_or_else(|| format!("join token {id} not found"))?;
                t.revoked_at_ms.get_or_insert(*at_ms);
                Ok(())
            }
            AccessCommand::RegisterMemberCert { member_id, cert } => {
                let current = self.member_certs.get(member_id);
                if current.is_some_and(|c| c == cert || !c.admits(cert)) {
                    return Err(format!(
                        "member {member_id} already has this certificate or a later one"
                    ));
                }
                self.member_certs.insert(*member_id, cert.clone());
                Ok(())
            }
            AccessCommand::RetireMember { member_id, at_ms } => {
                self.member_certs.insert(
                    *member_id,
                    MemberCert {
                        sha256: String::new(),
                        not_before_ms: *at_ms,
                    },
                );
                Ok(())
            }
            AccessCommand::Audit(record) => {
                let (ring, dropped, keep) = if record.result == "ok" {
                    (&mut self.audit, &mut self.audit_dropped, AUDIT_KEEP)
                } else {
                    (
                        &mut self.refusals,
                        &mut self.refusals_dropped,
                        REFUSALS_KEEP,
                    )
                };
                ring.push_back(record.clone());
                while ring.len() > keep {
                    ring.pop_front();
                    *dropped += 1;
                }
                Ok(())
            }
        }
    }

    /// The user holding token id `token_id`, if it is not revoked.
    pub fn user_by_token_id(&self, token_id: &str) -> Option<&User> {
        self.users
            .values()
            .find(|u| u.token_id == token_id && u.revoked_at_ms.is_none())
    }

    /// Spends one use of join token `id` for `node_id` at `now_ms`.
    pub fn spend_join_token(&mut self, id: &str, node_id: &str, now_ms: i64) -> Result<(), String> {
        let t = self
            .join_tokens
            .get_mut(id)
            .ok_or_else(|| "join token not known".to_string())?;
        if let Some(why) = t.unusable(now_ms) {
            return Err(why.to_string());
        }
        t.uses_left -= 1;
        t.nodes.push(node_id.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_members_later_certificate_replaces_and_shuts_out_the_earlier() {
        let cert = |sha: &str, at: i64| MemberCert {
            sha256: sha.into(),
            not_before_ms: at,
        };
        let register = |a: &mut Access, c: &MemberCert| {
            a.apply(&AccessCommand::RegisterMemberCert {
                member_id: 2,
                cert: c.clone(),
            })
        };
        let mut a = Access::default();
        let (old, new) = (cert("bb", 1_000), cert("aa", 2_000));
        // Nothing registered: any certificate the CA issued to it.
        assert!(a.admits_member(2, &old));
        register(&mut a, &old).unwrap();
        assert!(a.admits_member(2, &old) && a.admits_member(2, &new));
        register(&mut a, &new).unwrap();
        assert!(a.admits_member(2, &new));
        assert!(
            !a.admits_member(2, &old),
            "the rotated certificate is refused"
        );
        assert!(register(&mut a, &old).is_err(), "and cannot come back");
        assert!(register(&mut a, &new).is_err(), "nothing to do twice");
        // The same second: the greater digest is the later, on every member.
        assert!(a.admits_member(2, &cert("ab", 2_000)));
        assert!(!a.admits_member(2, &cert("a0", 2_000)));
        assert!(a.admits_member(3, &old), "other members are their own");
        // A member that leaves: none of its certificates is taken again,
        // but one issued after it left (it rejoins) is.
        a.apply(&AccessCommand::RetireMember {
            member_id: 2,
            at_ms: 3_000,
        })
        .unwrap();
        assert!(!a.admits_member(2, &new));
        assert!(a.admits_member(2, &cert("cc", 4_000)));
    }

    fn token(uses: u32) -> JoinToken {
        JoinToken {
            id: "t1".into(),
            sha256: "h".into(),
            description: String::new(),
            created_by: "root".into(),
            created_at_ms: 0,
            expires_at_ms: 1000,
            uses_left: uses,
            revoked_at_ms: None,
            nodes: Vec::new(),
            node: None,
        }
    }

    #[test]
    fn a_join_token_is_spent_once_per_use_and_refused_when_expired_or_revoked() {
        let mut a = Access::default();
        a.apply(&AccessCommand::CreateJoinToken { token: token(1) })
            .unwrap();
        assert_eq!(a.spend_join_token("t1", "node-1", 10), Ok(()));
        assert_eq!(
            a.spend_join_token("t1", "node-2", 11),
            Err("join token already used".into())
        );
        a.join_tokens.get_mut("t1").unwrap().uses_left = 5;
        assert_eq!(
            a.spend_join_token("t1", "node-2", 1000),
            Err("join token expired".into())
        );
        a.apply(&AccessCommand::RevokeJoinToken {
            id: "t1".into(),
            at_ms: 20,
        })
        .unwrap();
        assert_eq!(
            a.spend_join_token("t1", "node-2", 21),
            Err("join token revoked".into())
        );
        assert_eq!(a.join_tokens["t1"].nodes, vec!["node-1".to_string()]);
    }

    #[test]
    fn a_revoked_user_is_not_found_and_may_be_issued_a_new_token() {
        let mut a = Access::default();
        let create = |id: &str| AccessCommand::CreateUser {
            name: "alice".into(),
            role: Role::User,
            token_id: id.into(),
            token_sha256: "h".into(),
            at_ms: 1,
        };
        a.apply(&create("a1")).unwrap();
        assert!(
            a.apply(&create("a2")).is_err(),
            "an active user is not replaced"
        );
        assert_eq!(a.user_by_token_id("a1").unwrap().name, "alice");
        a.apply(&AccessCommand::RevokeUser {
            name: "alice".into(),
            at_ms: 2,
        })
        .unwrap();
        assert!(a.user_by_token_id("a1").is_none());
        a.apply(&create("a2")).unwrap();
        assert!(a.user_by_token_id("a1").is_none());
        assert!(a.user_by_token_id("a2").is_some());
    }

    #[test]
    fn the_audit_trail_keeps_the_newest_records() {
        let mut a = Access::default();
        for i in 0..(AUDIT_KEEP as i64 + 5) {
            a.apply(&AccessCommand::Audit(AuditRecord {
                at_ms: i,
                who: "root".into(),
                role: Some(Role::Admin),
                call: "CancelJob".into(),
                target: format!("job {i}"),
                result: "ok".into(),
            }))
            .unwrap();
        }
        assert_eq!(a.audit.len(), AUDIT_KEEP);
        assert_eq!(a.audit.front().unwrap().at_ms, 5);
    }

    #[test]
    fn refusals_never_push_out_the_records_of_changes() {
        let mut a = Access::default();
        let record = |i: i64, result: &str| AuditRecord {
            at_ms: i,
            who: "vera".into(),
            role: Some(Role::Viewer),
            call: "SubmitJob".into(),
            target: String::new(),
            result: result.into(),
        };
        a.apply(&AccessCommand::Audit(record(0, "ok"))).unwrap();
        for i in 1..=(REFUSALS_KEEP as i64 * 5) {
            a.apply(&AccessCommand::Audit(record(i, "PermissionDenied")))
                .unwrap();
        }
        assert_eq!(a.audit.len(), 1, "the change is still there");
        assert_eq!(a.refusals.len(), REFUSALS_KEEP);
        assert_eq!(a.refusals_dropped, REFUSALS_KEEP as u64 * 4);
    }

    #[test]
    fn roles_are_ordered_and_parsed() {
        assert!(Role::Viewer < Role::User && Role::User < Role::Admin);
        assert_eq!("admin".parse::<Role>(), Ok(Role::Admin));
        assert!("root"
            .parse::<Role>()
            .unwrap_err()
            .contains("viewer, user, admin"));
    }
}
