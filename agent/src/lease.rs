//! The contact lease. A node cut off from every coordinator is declared
//! lost by the majority after the node TTL, and a managed job's attempt on
//! it is started again elsewhere. The agent cannot tell that from all
//! coordinators being down, so it assumes the worst for those attempts
//! only: when it has heard nothing from a leader for the lease the leader
//! gave it (half the node TTL), it stops them, and they are over before
//! the node can be declared lost. Other jobs, which nothing replaces, run
//! on through any outage.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::supervisor::{contact_file, Supervisor};

/// The last word from a leader, and how long it holds.
#[derive(Debug, Clone)]
pub struct Contact {
    /// When the leader last spoke (welcome, order or heartbeat answer).
    pub at: Instant,
    /// How long that holds (zero: for ever).
    pub lease: Duration,
    /// The node this agent is: the watchdogs stop an attempt whose contact
    /// file speaks for another node (a new one in a wiped directory).
    pub node_id: String,
}

/// Stops the replaceable attempts each time a contact's lease runs out
/// without a newer one, and renews [`contact_file`] at each contact; runs
/// until the sender is dropped.
pub async fn enforce(
    mut contact: watch::Receiver<Option<Contact>>,
    sup: Supervisor,
    work_dir: PathBuf,
) {
    let file = contact_file(&work_dir);
    loop {
        let current = contact.borrow_and_update().clone();
        if let Some(c) = &current {
            // Rewritten, so its time is now: what the watchdogs read.
            let _ =
                tokio::fs::write(&file, format!("{} {}\n", c.lease.as_millis(), c.node_id)).await;
        }
        match current {
            Some(c) if !c.lease.is_zero() => {
                tokio::select! {
                    () = tokio::time::sleep_until(c.at + c.lease) => {
                        sup.stop_replaceable(
                            c.lease / 2,
                            format!(
                                "stopped: no word from a coordinator for {} ms, so the \
                                 coordinators may be starting this job again elsewhere",
                                c.lease.as_millis()
                            ),
                        );
                        // Nothing more to do until a leader speaks again.
                        if contact.changed().await.is_err() {
                            return;
                        }
                    }
                    changed = contact.changed() => if changed.is_err() { return },
                }
            }
            _ => {
                if contact.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}
