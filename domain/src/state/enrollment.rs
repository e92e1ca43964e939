//! Who a node is: enrollment with a node or join token, revocation, and the
//! access commands (users, join tokens, audit records) passed to
//! [`crate::access::Access`].

use serde::{Deserialize, Serialize};

use super::{conflict, Node, NodeState, Outcome, Rejection, Resources, State};

/// Provider name of nodes that joined on their own with an admin's join
/// token (`nembo-agent --join-token-file`): machines Nembo did not launch
/// and cannot stop; `down` only forgets them.
pub const MANUAL_PROVIDER: &str = "manual";

/// How an agent proved it may enroll.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Enrollment {
    /// The token the coordinator made for a node it launched (checked by
    /// the coordinator; one enrollment per node).
    NodeToken,
    /// An admin's join token (its secret checked by the coordinator).
    JoinToken {
        /// The [`JoinToken`](crate::access::JoinToken)'s id.
        id: String,
    },
}

impl State {
    pub(super) fn enroll_node(
        &mut self,
        via: &Enrollment,
        node_id: Option<&str>,
        hostname: &str,
        resources: &Resources,
        key_sha256: &str,
        at_ms: i64,
    ) -> Outcome {
        let id = match node_id {
            Some(id) => {
                let Some(node) = self.nodes.get(id) else {
                    return Outcome::Rejected(Rejection::NoSuchNode(id.to_string()));
                };
                if node.revoked_at_ms.is_some() {
                    return conflict(format!("node {id} is revoked"));
                }
                if node.state.is_final() || node.state == NodeState::Terminating {
                    return conflict(format!("node {id} is {:?}", node.state));
                }
                // A node token is good for the node's first enrollment only;
                // an admin's join token may re-enroll a node whose
                // certificate ran out.
                // A node started again after a stop may trade its node token
                // (written anew by its provider) once more, for the key it
                // already has: its certificate may have run out while stopped.
                let restarting = node.state == NodeState::Starting
                    && node.enrolled_key.as_deref() == Some(key_sha256);
                if *via == Enrollment::NodeToken && node.enrolled_key.is_some() && !restarting {
                    return conflict("join token already used");
                }
                id.to_string()
            }
            None => {
                if *via == Enrollment::NodeToken {
                    return conflict("a node token names its node");
                }
                format!("node-{}", self.last_node_seq + 1)
            }
        };
        if let Enrollment::JoinToken { id: token } = via {
            // A leaked admin token must not make its holder an existing
            // node (and hand it that node's jobs and secrets).
            match self.access.join_tokens.get(token).map(|t| &t.node) {
                Some(Some(bound)) if node_id != Some(bound.as_str()) => {
                    return conflict(format!("this join token is for node {bound}"))
                }
                Some(None) if node_id.is_some() => {
                    return conflict(
                        "this join token makes a new node; re-enrolling an existing one takes a token made for it (--node)",
                    )
                }
                _ => {}
            }
            if let Err(why) = self.access.spend_join_token(token, &id, at_ms) {
                return conflict(why);
            }
        }
        if node_id.is_none() {
            self.last_node_seq += 1;
            self.nodes.insert(
                id.clone(),
                Node {
                    id: id.clone(),
                    state: NodeState::Provisioning,
                    provider: MANUAL_PROVIDER.into(),
                    region: MANUAL_PROVIDER.into(),
                    instance_type: hostname.to_string(),
                    resources: resources.clone(),
                    hourly_price: 0.0,
                    address: String::new(),
                    public_address: String::new(),
                    instance_id: Some(hostname.to_string()),
                    created_at_ms: at_ms,
                    message: "enrolled with a join token".into(),
                    unhealthy: None,
                    zone: None,
                    spot: false,
                    launched_at_ms: Some(at_ms),
                    ended_at_ms: None,
                    preemption: None,
                    enrolled_key: None,
                    revoked_at_ms: None,
                    simulated: false,
                    fixed_machine: false,
                    disk_gb: None,
                    disk_tier: None,
                    ports_open: false,
                    opened_ports: None,
                    image_id: None,
                    cluster: None,
                    stoppable: false,
                    stopped_ms: 0,
                    stopped_since_ms: None,
                    last_busy_ms: None,
                },
            );
        }
        if let Some(node) = self.nodes.get_mut(&id) {
            node.enrolled_key = Some(key_sha256.to_string());
        }
        Outcome::Nodes(vec![id])
    }

    pub(super) fn revoke_node(&mut self, node_id: &str, at_ms: i64) -> Outcome {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return Outcome::Rejected(Rejection::NoSuchNode(node_id.to_string()));
        };
        node.revoked_at_ms.get_or_insert(at_ms);
        if !node.state.is_final() {
            node.state = NodeState::Terminating;
            node.message = "revoked by an admin".into();
        }
        let msg = format!("node {node_id} revoked");
        self.fail_ranks_on(node_id, &msg, at_ms);
        Outcome::Applied
    }

    pub(super) fn apply_access(&mut self, c: &crate::access::AccessCommand) -> Outcome {
        match self.access.apply(c) {
            Ok(()) => Outcome::Applied,
            Err(why) => conflict(why),
        }
    }
}
