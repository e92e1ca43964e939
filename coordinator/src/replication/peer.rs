//! Raft traffic between coordinators: the `nembo.raft.v1.RaftPeerService` service and a
//! sender task per peer. Messages travel as opaque rust-protobuf bytes in
//! batches; only callers presenting a certificate signed by the cluster CA
//! are accepted (the listener asks every client for one and verifies it).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nembo_domain::access::MemberCert;
use nembo_proto::raft::v1 as rpb;
use nembo_proto::raft::v1::raft_peer_service_client::RaftPeerServiceClient;
use nembo_proto::raft::v1::raft_peer_service_server::RaftPeerService;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::identity::member::{self, MemberIdentity};
use crate::replication::raft::{RaftHandle, Transport};

/// Largest peer message: a batch of raft messages (each at most
/// `max_size_per_msg`, 1 MiB, plus one entry) or a snapshot chunk.
pub const MAX_PEER_MESSAGE: usize = 16 * 1024 * 1024;
/// Largest snapshot a member accepts (the whole state, encoded).
pub const MAX_SNAPSHOT: usize = 2 * 1024 * 1024 * 1024;
const SNAPSHOT_CHUNK: usize = 1024 * 1024;
const QUEUE: usize = 4096;
const MAX_BATCH: usize = 512;
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Queues messages for each peer's sender task; peers come and go with
/// membership changes.
pub struct PeerTransport {
    me: u64,
    tls: PeerTls,
    raft: Arc<OnceLock<RaftHandle>>,
    runtime: tokio::runtime::Handle,
    // A std mutex: taken on the Raft thread for a map lookup, never held
    // across an await.
    queues: Mutex<HashMap<u64, (String, mpsc::Sender<Message>)>>,
}

impl Transport for PeerTransport {
    fn send(&self, msg: Message) {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        match queues.get(&msg.to) {
            // A full queue drops the message; Raft retransmits what matters.
            Some((_, q)) => {
                let _ = q.try_send(msg);
            }
            None => tracing::debug!(
                to = msg.to,
                "raft message for a member with no known address"
            ),
        }
    }

    fn set_members(&self, members: &BTreeMap<u64, String>) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        // Dropping a sender ends its task.
        queues.retain(|id, (url, _)| members.get(id) == Some(url));
        for (&id, url) in members {
            if id == self.me || queues.contains_key(&id) {
                continue;
            }
            match self.sender(id, url) {
                Ok(tx) => {
                    queues.insert(id, (url.clone(), tx));
                }
                Err(e) => tracing::error!(member = id, %url, error = %e, "cannot reach member"),
            }
        }
    }
}

impl PeerTransport {
    fn sender(
        &self,
        id: u64,
        url: &str,
    ) -> Result<mpsc::Sender<Message>, nembo_proto::client::ConnectError> {
        // The address is checked here, once; the connection is made (and
        // remade with each renewed certificate) by the sender task.
        nembo_proto::client::endpoint(url, &self.tls.ca)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let (me, raft, tls, url) = (
            self.me,
            self.raft.clone(),
            self.tls.clone(),
            url.to_string(),
        );
        self.runtime
            .spawn(async move { send_loop(me, id, url, tls, rx, raft).await });
        Ok(tx)
    }
}

/// TLS material a member dials its peers with.
#[derive(Clone)]
pub struct PeerTls {
    /// Cluster CA.
    pub ca: Vec<u8>,
    /// This member's current certificate and key, presented as the client
    /// certificate; a renewal replaces it.
    pub identity: watch::Receiver<Arc<MemberIdentity>>,
}

impl PeerTls {
    /// A client of `url` that presents the current certificate.
    pub(crate) fn client(
        &mut self,
        url: &str,
    ) -> Result<RaftPeerServiceClient<Channel>, nembo_proto::client::ConnectError> {
        let identity = self.identity.borrow_and_update().clone();
        let channel = nembo_proto::client::endpoint_with_identity(
            url,
            &self.ca,
            Some((&identity.cert_pem, &identity.key_pem)),
        )?
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy();
        Ok(RaftPeerServiceClient::new(channel)
            .max_encoding_message_size(MAX_PEER_MESSAGE)
            .max_decoding_message_size(MAX_PEER_MESSAGE))
    }
}

/// A transport for member `me`, with no peers until [`Transport::set_members`].
/// `raft` is filled in once the member has started (the member needs the
/// transport first). Call from within the Tokio runtime.
pub fn start(me: u64, tls: PeerTls, raft: Arc<OnceLock<RaftHandle>>) -> PeerTransport {
    PeerTransport {
        me,
        tls,
        raft,
        runtime: tokio::runtime::Handle::current(),
        queues: Mutex::new(HashMap::new()),
    }
}

async fn send_loop(
    me: u64,
    to: u64,
    url: String,
    mut tls: PeerTls,
    mut rx: mpsc::Receiver<Message>,
    raft: Arc<OnceLock<RaftHandle>>,
) {
    let report = |ok: bool| {
        if let (Some(raft), false) = (raft.get(), ok) {
            raft.report_unreachable(to);
        }
    };
    // One stream at a time; reopened, on a new connection with the
    // member's current certificate, whenever it breaks or the certificate
    // is renewed.
    loop {
        let mut client = match tls.client(&url) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(member = to, %url, error = %e, "cannot reach member");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Snapshots go over their own calls on the same connection.
        let snapshot_client = client.clone();
        let (stream_tx, stream_rx) = mpsc::channel::<rpb::StreamRequest>(64);
        let mut call =
            Box::pin(client.stream(tokio_stream::wrappers::ReceiverStream::new(stream_rx)));
        let broken = loop {
            tokio::select! {
                first = rx.recv() => {
                    let Some(first) = first else { return };
                    let mut next = Some(first);
                    let (mut messages, mut bytes) = (Vec::new(), 0);
                    while let Some(m) = next.take() {
                        if m.get_msg_type() == MessageType::MsgSnapshot {
                            // Raft sends no other snapshot to this peer until
                            // this one is reported.
                            tokio::spawn(send_snapshot(me, snapshot_client.clone(), m, raft.clone()));
                        } else if let Ok(b) = m.write_to_bytes() {
                            bytes += b.len();
                            messages.push(b);
                        }
                        if messages.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                            next = rx.try_recv().ok();
                        }
                    }
                    if messages.is_empty() {
                        continue;
                    }
                    let sent = stream_tx.send(rpb::StreamRequest { from: me, messages }).await.is_ok();
                    if !sent {
                        report(false);
                        break true;
                    }
                }
                _ = &mut call => break true,
                Ok(()) = tls.identity.changed() => break false,
            }
        };
        if broken {
            report(false);
            // Drop what queued up meanwhile (Raft resends what matters) and
            // give the peer a moment before reconnecting.
            tokio::time::sleep(Duration::from_millis(50)).await;
            while rx.try_recv().is_ok() {}
        }
    }
}

/// Streams one snapshot message in chunks and tells Raft whether it arrived.
async fn send_snapshot(
    me: u64,
    mut client: RaftPeerServiceClient<Channel>,
    msg: Message,
    raft: Arc<OnceLock<RaftHandle>>,
) {
    let to = msg.to;
    let ok = match msg.write_to_bytes() {
        Ok(bytes) => {
            let (len, count) = (bytes.len(), bytes.len().div_ceil(SNAPSHOT_CHUNK));
            tracing::info!(to, bytes = len, chunks = count, "sending snapshot");
            // Chunks are cut as the stream is polled: one copy in flight,
            // not a second copy of the whole state.
            let chunks = (0..count).map(move |i| rpb::SnapshotRequest {
                from: me,
                data: bytes[i * SNAPSHOT_CHUNK..len.min((i + 1) * SNAPSHOT_CHUNK)].to_vec(),
            });
            match client.snapshot(tokio_stream::iter(chunks)).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(to, error = %e, "snapshot not delivered");
                    false
                }
            }
        }
        Err(_) => false,
    };
    if let Some(raft) = raft.get() {
        if !ok {
            raft.report_unreachable(to);
        }
        raft.report_snapshot(to, ok);
    }
}

/// The receiving side.
pub struct PeerService {
    raft: RaftHandle,
    seen: mpsc::Sender<(u64, MemberCert)>,
    load: crate::serve::Reported,
}

impl PeerService {
    /// Feeds received messages to `raft`, and the member certificates it
    /// admits to `seen` (the owner of member certificates registers them).
    /// Load reports go to `load`.
    pub fn new(
        raft: RaftHandle,
        seen: mpsc::Sender<(u64, MemberCert)>,
        load: crate::serve::Reported,
    ) -> Self {
        Self { raft, seen, load }
    }

    /// The TLS layer verified any certificate against the cluster CA; here
    /// we insist it is member `from`'s, so that neither an agent's
    /// certificate (also from the cluster CA) nor one member posing as
    /// another gets a word into Raft, and that it is the member's current
    /// one: not a certificate it has since replaced, nor one of a member
    /// that left.
    fn admit(
        &self,
        certs: Option<&[tonic::transport::CertificateDer<'static>]>,
        from: u64,
    ) -> Result<(), Status> {
        let refuse = |why: String| {
            tracing::warn!(claimed = from, error = %why, "raft traffic refused");
            Status::permission_denied(why)
        };
        crate::identity::issuer::require_member(certs, from).map_err(|e| refuse(e.to_string()))?;
        let presented = certs
            .and_then(|c| c.first())
            .and_then(member::presented)
            .ok_or_else(|| refuse("the member certificate cannot be read".into()))?;
        let view = self.raft.view();
        if let Some(current) = view.state.access.member_certs.get(&from) {
            if !current.admits(&presented) {
                return Err(refuse(format!(
                    "member {from}'s certificate (valid from Unix ms {}) was replaced by one \
                     valid from {}, or the member left then: it is no longer accepted",
                    presented.not_before_ms, current.not_before_ms
                )));
            }
        }
        // Full: the owner registers it from a later stream.
        let _ = self.seen.try_send((from, presented));
        Ok(())
    }
}

#[tonic::async_trait]
impl RaftPeerService for PeerService {
    async fn report_load(
        &self,
        request: Request<rpb::ReportLoadRequest>,
    ) -> Result<Response<rpb::ReportLoadResponse>, Status> {
        let certs = request.peer_certs();
        let from = request.get_ref().from;
        self.admit(certs.as_deref().map(Vec::as_slice), from)?;
        let now_s = nembo_proto::clock::now_ms() / 1000;
        let report = request.into_inner();
        let mut load = self.load.lock().unwrap_or_else(|e| e.into_inner());
        load.retain(|(member, _), _| *member != from);
        // A member serves the services in the state, a few hundred at most.
        for (service, qps) in report.qps.into_iter().take(10_000) {
            if qps.is_finite() && qps >= 0.0 {
                load.insert((from, service), (qps, now_s));
            }
        }
        Ok(Response::new(rpb::ReportLoadResponse {}))
    }

    async fn stream(
        &self,
        request: Request<tonic::Streaming<rpb::StreamRequest>>,
    ) -> Result<Response<rpb::StreamResponse>, Status> {
        let certs = request.peer_certs();
        let mut batches = request.into_inner();
        let mut sender = None;
        while let Some(batch) = batches.message().await? {
            if sender != Some(batch.from) {
                self.admit(certs.as_deref().map(Vec::as_slice), batch.from)?;
                sender = Some(batch.from);
            }
            for bytes in &batch.messages {
                match Message::parse_from_bytes(bytes) {
                    Ok(m) if m.from != batch.from => {
                        return Err(Status::permission_denied(format!(
                            "member {} sent a message from {}",
                            batch.from, m.from
                        )))
                    }
                    Ok(m) => self.raft.step(m),
                    Err(e) => {
                        return Err(Status::invalid_argument(format!("bad raft message: {e}")))
                    }
                }
            }
        }
        Ok(Response::new(rpb::StreamResponse {}))
    }

    async fn snapshot(
        &self,
        request: Request<tonic::Streaming<rpb::SnapshotRequest>>,
    ) -> Result<Response<rpb::SnapshotResponse>, Status> {
        let certs = request.peer_certs();
        let mut chunks = request.into_inner();
        let mut bytes = Vec::new();
        let mut sender = None;
        while let Some(chunk) = chunks.message().await? {
            if sender != Some(chunk.from) {
                self.admit(certs.as_deref().map(Vec::as_slice), chunk.from)?;
                sender = Some(chunk.from);
            }
            if bytes.len() + chunk.data.len() > MAX_SNAPSHOT {
                return Err(Status::resource_exhausted(format!(
                    "snapshot larger than {MAX_SNAPSHOT} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk.data);
        }
        let msg = Message::parse_from_bytes(&bytes)
            .map_err(|e| Status::invalid_argument(format!("bad snapshot message: {e}")))?;
        if msg.get_msg_type() != MessageType::MsgSnapshot {
            return Err(Status::invalid_argument("not a snapshot message"));
        }
        if Some(msg.from) != sender {
            return Err(Status::permission_denied("a snapshot from another member"));
        }
        tracing::info!(from = msg.from, bytes = bytes.len(), "received snapshot");
        self.raft.step(msg);
        Ok(Response::new(rpb::SnapshotResponse {}))
    }
}
