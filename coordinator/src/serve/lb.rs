//! The load balancer: on every coordinator, one listener per service (its
//! port, shared by members on one host through SO_REUSEPORT), HTTP/1.1 and
//! HTTP/2 (hyper's auto server), proxying to the service's READY replicas
//! as the replicated state lists them. Responses stream through unbuffered
//! (token streaming); request bodies are read first (up to
//! [`MAX_REQUEST_BODY`]) so that a request that found a replica gone can
//! be sent to another.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nembo_domain::serve::serving_replicas;
use nembo_domain::task::LoadBalancingPolicy;
use tokio::task::JoinHandle;

use super::RequestCounter;
use crate::context::Ctx;

/// The task secret that, when set, is the bearer token callers must
/// present to the service's load balancer.
pub const TOKEN_SECRET: &str = "NEMBO_SERVICE_TOKEN";

/// Largest request body the load balancer takes.
pub const MAX_REQUEST_BODY: usize = 16 << 20;

/// Tries per request on replicas that could not be reached.
const ATTEMPTS: usize = 3;

/// How long a request to a service scaled to zero waits for a replica.
const COLD_START_WAIT: Duration = Duration::from_secs(120);

type ProxyBody = BoxBody<Bytes, BodyError>;
type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Keeps one listener per service the state holds, on this coordinator;
/// runs for the coordinator's life (followers serve traffic too).
pub async fn run(ctx: Arc<Ctx>) {
    let mut views = ctx.raft.subscribe();
    // Per service: what its listener was opened with, and its task.
    let mut listeners: HashMap<String, (Listening, JoinHandle<()>)> = HashMap::new();
    let client: Client<HttpConnector, Full<Bytes>> = {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector)
    };
    loop {
        let view = views.borrow_and_update().clone();
        let services = &view.state.services;
        // A listener goes when its service does, when it failed, and when
        // an update changed its TLS files (they are read when it opens).
        listeners.retain(|name, (opened, task)| {
            let keep =
                services.get(name).is_some_and(|s| listening(s) == *opened) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        ctx.serve.load.retain(|name| services.contains_key(name));
        for (name, service) in services {
            if listeners.contains_key(name) {
                continue;
            }
            let opened = listening(service);
            let tls = opened.1.clone();
            let lb = Arc::new(Balancer {
                ctx: ctx.clone(),
                service: name.clone(),
                client: client.clone(),
                counter: ctx.serve.load.counter(name),
                inflight: Mutex::new(HashMap::new()),
                turn: AtomicUsize::new(0),
                routing: Mutex::new(None),
            });
            let addr = SocketAddr::new(ctx.serve.bind_ip, service.lb_port);
            let shared = member_shares_host(&view.members, view.id);
            let task = tokio::spawn(async move {
                if let Err(e) = listen(lb, addr, tls, shared).await {
                    tracing::error!(%addr, error = %e, "load balancer stopped");
                }
            });
            listeners.insert(name.clone(), (opened, task));
        }
        tokio::select! {
            changed = views.changed() => if changed.is_err() { break },
            // A listener that failed (its port was taken) is tried again.
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
    for (_, (_, task)) in listeners {
        task.abort();
    }
}

/// A listener's port and TLS files.
type Listening = (u16, Option<nembo_domain::task::ServiceTls>);

fn listening(s: &nembo_domain::state::Service) -> Listening {
    let tls = s
        .newest()
        .and_then(|t| t.service.as_ref())
        .and_then(|x| x.tls.clone());
    (s.lb_port, tls)
}

/// One service's load balancer on this coordinator.
struct Balancer {
    ctx: Arc<Ctx>,
    service: String,
    client: Client<HttpConnector, Full<Bytes>>,
    counter: Arc<RequestCounter>,
    /// Requests in flight per replica id, for `least_load`.
    inflight: Mutex<HashMap<u32, usize>>,
    /// `round_robin`'s position.
    turn: AtomicUsize,
    /// The newest state's routing.
    routing: Mutex<Option<Arc<Routing>>>,
}

/// Another member of this cluster runs on this member's host.
fn member_shares_host(members: &std::collections::BTreeMap<u64, String>, me: u64) -> bool {
    let host = |url: &String| url.parse::<http::Uri>().ok()?.host().map(str::to_string);
    let mine = members.get(&me).and_then(host);
    mine.is_some() && members.iter().any(|(id, u)| *id != me && host(u) == mine)
}

async fn listen(
    lb: Arc<Balancer>,
    addr: SocketAddr,
    tls: Option<nembo_domain::task::ServiceTls>,
    shared: bool,
) -> std::io::Result<()> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    // Members of one cluster on one host (a local cluster, tests) each
    // listen on the service's port; the kernel spreads connections among
    // them, and one member's crash leaves the others listening. Only
    // then: a lone member keeps its port to itself, so another cluster of
    // the same user on this host cannot share it.
    socket.set_reuseport(shared)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    let acceptor = match tls {
        Some(t) => Some(tls_acceptor(&t)?),
        None => None,
    };
    tracing::info!(service = %lb.service, %addr, tls = acceptor.is_some(), "load balancer listening");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "load balancer accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let lb = lb.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let lb = lb.clone();
                async move { Ok::<_, Infallible>(lb.proxy(req, peer).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let served = match acceptor {
                Some(a) => {
                    match tokio::time::timeout(Duration::from_secs(10), a.accept(stream)).await {
                        Ok(Ok(s)) => builder.serve_connection(TokioIo::new(s), service).await,
                        _ => return,
                    }
                }
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "load balancer connection");
            }
        });
    }
}

fn tls_acceptor(t: &nembo_domain::task::ServiceTls) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, e: String| std::io::Error::other(format!("{what}: {e}"));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.certfile)
        .map_err(|e| bad(&t.certfile, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&t.certfile, e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_file(&t.keyfile).map_err(|e| bad(&t.keyfile, e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad("tls", e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| bad("tls", e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn plain(status: StatusCode, msg: &str) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    r
}

/// Headers that belong to one hop, not to the request (RFC 9110 7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

impl Balancer {
    async fn proxy(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        self.counter.record(nembo_proto::clock::now_ms() / 1000);
        if let Err(refused) = self.authorize(req.headers_mut()) {
            return refused;
        }
        let (mut parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body over {} MiB", MAX_REQUEST_BODY >> 20),
                )
            }
            Err(_) => return plain(StatusCode::BAD_REQUEST, "request body cut short"),
        };
        for h in HOP_BY_HOP {
            parts.headers.remove(*h);
        }
        if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
            parts.headers.append("x-forwarded-for", v);
        }
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let mut tried: Vec<u32> = Vec::new();
        let mut last_error = String::new();
        for attempt in 0..ATTEMPTS {
            let Some((id, endpoint, stream_timeout)) = self.choose(&tried).await else {
                if last_error.is_empty() {
                    return plain(StatusCode::SERVICE_UNAVAILABLE, "No ready replicas.");
                }
                break;
            };
            tried.push(id);
            let Ok(uri) = format!("http://{endpoint}{path}").parse::<http::Uri>() else {
                return plain(StatusCode::BAD_REQUEST, "bad request path");
            };
            let mut upstream = Request::new(Full::new(body.clone()));
            *upstream.method_mut() = parts.method.clone();
            *upstream.uri_mut() = uri;
            *upstream.headers_mut() = parts.headers.clone();
            // HTTP/2's :authority has no Host header; replicas speak HTTP/1.1.
            if !upstream.headers().contains_key(http::header::HOST) {
                if let Some(a) = parts.uri.authority() {
                    if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                        upstream.headers_mut().insert(http::header::HOST, v);
                    }
                }
            }
            let guard = Inflight::start(self.clone(), id);
            match self.client.request(upstream).await {
                Ok(resp) => {
                    let (mut head, body) = resp.into_parts();
                    for h in HOP_BY_HOP {
                        head.headers.remove(*h);
                    }
                    let body = BodyExt::boxed(Tracked {
                        inner: body,
                        until: tokio::time::Instant::now() + stream_timeout,
                        timer: None,
                        _guard: guard,
                    });
                    return Response::from_parts(head, body);
                }
                Err(e) => {
                    last_error = format!("replica {id} ({endpoint}): {e}");
                    tracing::debug!(service = %self.service, error = %last_error, "proxy attempt failed");
                    if attempt + 1 < ATTEMPTS {
                        tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                    }
                }
            }
        }
        plain(
            StatusCode::BAD_GATEWAY,
            &format!("no replica answered: {last_error}"),
        )
    }

    /// What requests need from the state, worked out once per applied
    /// state rather than per request.
    fn routing(&self) -> Option<Arc<Routing>> {
        let state = self.ctx.raft.view().state.clone();
        let mut cache = self.routing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = cache.as_ref().filter(|r| Arc::ptr_eq(&r.state, &state)) {
            return Some(r.clone());
        }
        let service = state.services.get(&self.service)?;
        let spec = service.newest().and_then(|t| t.service.as_ref());
        let token = match service.newest().and_then(|t| t.secrets.get(TOKEN_SECRET)) {
            None => Ok(None),
            Some(sealed) => self
                .ctx
                .secrets
                .open(TOKEN_SECRET, sealed)
                .map(Some)
                .map_err(|_| ()),
        };
        let r = Arc::new(Routing {
            ready: serving_replicas(&state, service),
            policy: spec.map(|s| s.load_balancing_policy).unwrap_or_default(),
            stream_timeout: Duration::from_secs(spec.map_or(120, |s| s.stream_timeout_s).into()),
            token,
            scaled_to_zero: service.target == 0,
            state: state.clone(),
        });
        *cache = Some(r.clone());
        Some(r)
    }

    /// Callers of a service whose task sets [`TOKEN_SECRET`] present it as
    /// a bearer token; it goes no further than here.
    #[allow(clippy::result_large_err)]
    fn authorize(&self, headers: &mut http::HeaderMap) -> Result<(), Response<ProxyBody>> {
        let Some(routing) = self.routing() else {
            return Ok(());
        };
        let expected = match &routing.token {
            Ok(None) => return Ok(()),
            Ok(Some(t)) => t,
            Err(()) => {
                return Err(plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the service's token cannot be read",
                ))
            }
        };
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if presented.is_empty() || !crate::identity::tls::token_matches(presented, expected) {
            let mut r = plain(
                StatusCode::UNAUTHORIZED,
                "this service wants a bearer token",
            );
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
            return Err(r);
        }
        headers.remove(http::header::AUTHORIZATION);
        Ok(())
    }

    /// A READY replica not yet tried, by the service's policy. A service
    /// scaled to zero waits for its first replica.
    async fn choose(&self, tried: &[u32]) -> Option<(u32, String, Duration)> {
        let mut waiting: Option<(tokio::time::Instant, tokio::sync::watch::Receiver<_>)> = None;
        loop {
            let routing = self.routing()?;
            let ready: Vec<&(u32, String)> = routing
                .ready
                .iter()
                .filter(|(id, _)| !tried.contains(id))
                .collect();
            if !ready.is_empty() {
                let turn = self.turn.fetch_add(1, Ordering::Relaxed);
                let pick = match routing.policy {
                    LoadBalancingPolicy::RoundRobin => turn % ready.len(),
                    LoadBalancingPolicy::LeastLoad => {
                        let inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                        let load = |i: usize| inflight.get(&ready[i].0).copied().unwrap_or(0);
                        // Ties rotate, so equal replicas share the traffic.
                        (0..ready.len())
                            .map(|k| (turn + k) % ready.len())
                            .min_by_key(|i| load(*i))
                            .unwrap_or(0)
                    }
                };
                let (id, endpoint) = ready[pick].clone();
                return Some((id, endpoint, routing.stream_timeout));
            }
            // A service scaled to zero waits for its first replica; any
            // other answers at once (SkyServe's 503), as one whose replicas
            // are failing must.
            let (deadline, views) = match &mut waiting {
                Some((d, views)) => (*d, views),
                None if routing.scaled_to_zero && tried.is_empty() => {
                    let w = waiting.insert((
                        tokio::time::Instant::now() + COLD_START_WAIT,
                        self.ctx.raft.subscribe(),
                    ));
                    (w.0, &mut w.1)
                }
                None => return None,
            };
            if tokio::time::timeout_at(deadline, views.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }
}

/// A service's routing as of one applied state.
struct Routing {
    state: Arc<nembo_domain::state::State>,
    /// READY replicas of the versions that serve, with their endpoints.
    ready: Vec<(u32, String)>,
    policy: LoadBalancingPolicy,
    stream_timeout: Duration,
    /// The bearer token callers must present; `Err`: it cannot be opened.
    token: Result<Option<String>, ()>,
    scaled_to_zero: bool,
}

/// Counts a request in flight to a replica until its response is done.
struct Inflight {
    lb: Arc<Balancer>,
    replica: u32,
}

impl Inflight {
    fn start(lb: Arc<Balancer>, replica: u32) -> Self {
        *lb.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(replica)
            .or_default() += 1;
        Self { lb, replica }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        let mut map = self.lb.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.replica) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.replica);
            }
        }
    }
}

/// A replica's response body, passed through frame by frame, holding its
/// in-flight count until the stream ends, and cut at the service's
/// `load_balancer.stream_timeout_seconds`. The timer is armed only once
/// the replica makes the stream wait: a response that is there at once
/// (most are) costs no timer.
struct Tracked {
    inner: Incoming,
    until: tokio::time::Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    _guard: Inflight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let timed_out = || -> BodyError {
            "the response outlasted the service's load_balancer.stream_timeout_seconds".into()
        };
        if tokio::time::Instant::now() >= self.until {
            return Poll::Ready(Some(Err(timed_out())));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                Poll::Ready(frame.map(|f| f.map_err(|e| Box::new(e) as BodyError)))
            }
            Poll::Pending => {
                let until = self.until;
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(timed_out())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
