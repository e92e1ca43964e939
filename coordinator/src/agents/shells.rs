//! Shell sessions (`nembo ssh`) ride on the agents' own sessions: the
//! leader holds every agent's session, so a client's Shell call is joined
//! here to its node's session by a session id, and the agent's output is
//! routed back by the same id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use nembo_proto::agent::v1 as apb;
use nembo_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

/// A node's session outbox.
pub type AgentOutbox = mpsc::Sender<Result<apb::SessionResponse, Status>>;
/// A client's Shell response stream.
pub type ClientOutbox = mpsc::Sender<Result<pb::ShellResponse, Status>>;

/// Where shell traffic goes: each connected agent's outbox, each open
/// session's client.
#[derive(Default)]
pub struct ShellRoutes {
    agents: Mutex<HashMap<String, AgentOutbox>>,
    clients: Mutex<HashMap<u64, ClientOutbox>>,
    next_id: AtomicU64,
}

impl ShellRoutes {
    /// The agent of `node` holds a session here now.
    pub fn agent_connected(&self, node: &str, outbox: AgentOutbox) {
        self.agents
            .lock()
            .expect("shell routes")
            .insert(node.to_string(), outbox);
    }

    /// That session ended (a newer one of the same node stays).
    pub fn agent_gone(&self, node: &str, outbox: &AgentOutbox) {
        let mut agents = self.agents.lock().expect("shell routes");
        if agents.get(node).is_some_and(|o| o.same_channel(outbox)) {
            agents.remove(node);
        }
    }

    /// The outbox of `node`'s agent, if it holds a session here.
    pub fn agent(&self, node: &str) -> Option<AgentOutbox> {
        self.agents.lock().expect("shell routes").get(node).cloned()
    }

    /// A new session whose output goes to `client`.
    pub fn open(&self, client: ClientOutbox) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.clients
            .lock()
            .expect("shell routes")
            .insert(id, client);
        id
    }

    /// The session is over.
    pub fn close(&self, id: u64) {
        self.clients.lock().expect("shell routes").remove(&id);
    }

    /// Passes an agent's output on to its client; the last one (with the
    /// exit code) closes the session.
    pub async fn deliver(&self, out: apb::ShellOutput) {
        let client = self
            .clients
            .lock()
            .expect("shell routes")
            .get(&out.session_id)
            .cloned();
        let Some(client) = client else { return };
        let mut msgs = Vec::new();
        if !out.output.is_empty() {
            msgs.push(pb::shell_response::Msg::Output(out.output));
        }
        if !out.stderr.is_empty() {
            msgs.push(pb::shell_response::Msg::Stderr(out.stderr));
        }
        if let Some(code) = out.exit_code {
            msgs.push(pb::shell_response::Msg::ExitCode(code));
            self.close(out.session_id);
        }
        for m in msgs {
            if client
                .send(Ok(pb::ShellResponse { msg: Some(m) }))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}
