//! The one door's way to the leader. A follower serves no call that needs
//! the leader: the gate hands the request, as it came (the caller's own
//! token included), to the leader over one kept channel, and relays the
//! answer. Handlers therefore always run on the leader (or, for the few
//! calls any member answers, wherever they arrive).

use std::time::Duration;

use tonic::body::Body;
use tonic::transport::Channel;
use tonic::Status;

use crate::replication::raft::RaftHandle;

/// How long a call waits for a leader (an election in progress) or for the
/// leader to confirm its leadership before it is answered UNAVAILABLE.
const FIND_LEADER: Duration = Duration::from_secs(3);

/// Where a call is served, by the leader of the moment.
pub enum Hop {
    /// Here: this member leads (and, for a read, has confirmed it).
    Here,
    /// At the leader, over this channel.
    Leader(Channel),
}

/// How this member reaches the current leader: one channel, kept while the
/// leader stays the same.
pub struct Forwarder {
    ca: Vec<u8>,
    channel: tokio::sync::Mutex<Option<(u64, Channel)>>,
}

impl Forwarder {
    /// Reaches leaders over TLS, trusting `ca_pem`.
    pub fn new(ca_pem: Vec<u8>) -> Self {
        Self {
            ca: ca_pem,
            channel: tokio::sync::Mutex::new(None),
        }
    }

    /// Finds the leader. A read (`linearizable`) is served here only once
    /// this member has confirmed with a quorum that it still leads (read
    /// index), so a deposed leader never answers from a stale state. A call
    /// changes nothing until it is served, so while leadership moves it is
    /// safe to look again: an old leader back from a partition learns it was
    /// deposed and sends the call to the new one.
    pub async fn find_leader(&self, raft: &RaftHandle, linearizable: bool) -> Result<Hop, Status> {
        let deadline = tokio::time::Instant::now() + FIND_LEADER;
        let mut views = raft.subscribe();
        loop {
            let failure = match self.leader_channel(raft).await {
                Ok(Some(channel)) => return Ok(Hop::Leader(channel)),
                Ok(None) if !linearizable => return Ok(Hop::Here),
                Ok(None) => match raft.read_index().await {
                    Ok(()) => return Ok(Hop::Here),
                    Err(e) => Status::unavailable(format!(
                        "leadership could not be confirmed for a linearizable read ({e}); retry"
                    )),
                },
                Err(status) => status,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(failure);
            }
            let _ = tokio::time::timeout_at(deadline, views.changed()).await;
        }
    }

    /// `None` when this member leads; otherwise a channel to the leader.
    pub async fn leader_channel(&self, raft: &RaftHandle) -> Result<Option<Channel>, Status> {
        let view = raft.view();
        if view.is_leader() {
            return Ok(None);
        }
        let leader = view.leader_id;
        let Some(url) = view.members.get(&leader).cloned() else {
            return Err(Status::unavailable("no leader elected yet; retry shortly"));
        };
        let mut cached = self.channel.lock().await;
        if let Some((id, c)) = &*cached {
            if *id == leader {
                return Ok(Some(c.clone()));
            }
        }
        let unreachable =
            |e: String| Status::unavailable(format!("leader {leader} unreachable: {e}"));
        let channel = nembo_proto::client::endpoint(&url, &self.ca)
            .map_err(|e| unreachable(e.to_string()))?
            .connect()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        *cached = Some((leader, channel.clone()));
        Ok(Some(channel))
    }
}

/// Sends `req` to the leader unchanged and relays its answer (a stream
/// included). A broken connection says nothing about the call itself, so it
/// is answered UNAVAILABLE, which clients retry.
pub async fn pass_on(mut channel: Channel, req: http::Request<Body>) -> http::Response<Body> {
    use tower_service::Service;
    let unreachable = |e: tonic::transport::Error| {
        Status::unavailable(format!("lost the connection to the leader: {e}")).into_http()
    };
    if let Err(e) = std::future::poll_fn(|cx| channel.poll_ready(cx)).await {
        return unreachable(e);
    }
    channel.call(req).await.unwrap_or_else(unreachable)
}
