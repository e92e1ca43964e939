//! Connecting to a coordinator: TLS against the cluster CA, bearer token on
//! every call. Shared by the CLI, the agent and the tests.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::agent::v1::agent_service_client::AgentServiceClient;
use crate::v1::coordinator_service_client::CoordinatorServiceClient;

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct BearerToken(MetadataValue<tonic::metadata::Ascii>);

impl BearerToken {
    /// Fails if the token has characters that cannot go in a header.
    pub fn new(token: &str) -> Result<Self, ConnectError> {
        let v = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| ConnectError::BadToken)?;
        Ok(Self(v))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        // A coordinator forwarding a call to its leader passes the caller's
        // own token on, rather than acting with its own.
        if !req.metadata().contains_key("authorization") {
            req.metadata_mut().insert("authorization", self.0.clone());
        }
        Ok(req)
    }
}

/// Why a secret file (token, key) could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// It could not be read.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// Group or others can read it.
    #[error("{0} is readable by other users; run chmod 600 on it")]
    Exposed(String),
}

/// Reads a secret file (trimmed), refusing one that group or others can
/// read. Every binary reads tokens and keys through this one check.
pub fn read_secret(path: &std::path::Path) -> Result<String, SecretError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| SecretError::Io {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(SecretError::Exposed(path.display().to_string()));
    }
    Ok(std::fs::read_to_string(path)
        .map_err(io)?
        .trim()
        .to_string())
}

/// Writes `data` to `path` whole or not at all: a temp file beside it,
/// created with `mode` (0600 for secrets, so they are never readable by
/// others, not even for a moment), fsynced, then renamed over `path`.
pub fn write_atomically(path: &std::path::Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The endpoint is not a URL.
    #[error("invalid endpoint '{0}'")]
    BadEndpoint(String),
    /// The token cannot be sent as a header.
    #[error("the token contains characters that cannot be sent")]
    BadToken,
    /// TLS setup or the connection failed.
    #[error("cannot connect to {endpoint}: {source}")]
    Transport {
        endpoint: String,
        source: tonic::transport::Error,
    },
}

/// An authenticated client of the public API.
pub type Client = CoordinatorServiceClient<InterceptedService<Channel, BearerToken>>;
/// An authenticated client of the agent protocol.
pub type AgentClient = AgentServiceClient<InterceptedService<Channel, BearerToken>>;

/// A TLS endpoint that trusts only `ca_pem`. `https://127.0.0.1:PORT` is
/// verified against the certificate's `localhost` name.
pub fn endpoint(url: &str, ca_pem: &[u8]) -> Result<Endpoint, ConnectError> {
    endpoint_with_identity(url, ca_pem, None)
}

/// Like [`endpoint`], presenting a client certificate (mutual TLS between
/// cluster members): `identity` is (certificate PEM, key PEM).
pub fn endpoint_with_identity(
    url: &str,
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<Endpoint, ConnectError> {
    let domain = url
        .trim_start_matches("https://")
        .split([':', '/'])
        .next()
        .unwrap_or("localhost");
    let domain = if domain.parse::<std::net::IpAddr>().is_ok() || domain.starts_with('[') {
        "localhost"
    } else {
        domain
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(domain);
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(url.to_string())
        .map_err(|_| ConnectError::BadEndpoint(url.to_string()))?
        .tls_config(tls)
        .map_err(|source| ConnectError::Transport {
            endpoint: url.to_string(),
            source,
        })
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true)
        })
}

async fn channel(url: &str, ca_pem: &[u8]) -> Result<Channel, ConnectError> {
    endpoint(url, ca_pem)?
        .connect()
        .await
        .map_err(|source| ConnectError::Transport {
            endpoint: url.to_string(),
            source,
        })
}

/// Connects to the public API.
pub async fn connect(url: &str, ca_pem: &[u8], token: &str) -> Result<Client, ConnectError> {
    Ok(client(
        channel(url, ca_pem).await?,
        BearerToken::new(token)?,
    ))
}

/// A client of the public API over `channel`, sending `token`.
pub fn client(channel: Channel, token: BearerToken) -> Client {
    CoordinatorServiceClient::with_interceptor(channel, token)
        .max_decoding_message_size(64 * 1024 * 1024)
}

/// A client of the public API over several coordinators: calls go to any
/// that answers (each forwards to the leader), so one member being down
/// does not stop the client. Connections are made lazily.
pub fn connect_any(urls: &[String], ca_pem: &[u8], token: &str) -> Result<Client, ConnectError> {
    let endpoints = urls
        .iter()
        .map(|u| endpoint(u, ca_pem))
        .collect::<Result<Vec<_>, _>>()?;
    let channel = Channel::balance_list(endpoints.into_iter());
    Ok(client(channel, BearerToken::new(token)?))
}

/// Connects to the agent protocol.
pub async fn connect_agent(
    url: &str,
    ca_pem: &[u8],
    token: &str,
) -> Result<AgentClient, ConnectError> {
    Ok(AgentServiceClient::with_interceptor(
        channel(url, ca_pem).await?,
        BearerToken::new(token)?,
    ))
}

/// A client of the agent protocol that proves itself with the node's
/// certificate (mutual TLS) rather than a token.
pub type AgentTlsClient = AgentServiceClient<Channel>;

/// Connects to the agent protocol with the node's certificate and key (PEM).
pub async fn connect_agent_tls(
    url: &str,
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<AgentTlsClient, ConnectError> {
    let channel = endpoint_with_identity(url, ca_pem, Some((cert_pem, key_pem)))?
        .connect()
        .await
        .map_err(|source| ConnectError::Transport {
            endpoint: url.to_string(),
            source,
        })?;
    Ok(AgentServiceClient::new(channel))
}

/// Connects to the enrollment service (no credentials: the join token
/// travels in the request).
pub async fn connect_enrollment(
    url: &str,
    ca_pem: &[u8],
) -> Result<
    crate::agent::v1::enrollment_service_client::EnrollmentServiceClient<Channel>,
    ConnectError,
> {
    Ok(
        crate::agent::v1::enrollment_service_client::EnrollmentServiceClient::new(
            channel(url, ca_pem).await?,
        ),
    )
}

/// Calls `f` until it succeeds, retrying while the cluster answers
/// `UNAVAILABLE` (a member down, or a leader change in progress, which
/// takes a second or two), for up to 15 s. Safe for submissions that carry
/// an idempotency key, for reads, and for idempotent calls.
pub async fn call<T, R, F, Fut>(client: &Client, req: R, f: F) -> Result<T, tonic::Status>
where
    R: Clone,
    F: Fn(Client, R) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match f(client.clone(), req.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if retryable(&s) && tokio::time::Instant::now() < deadline => {
                let pause = Duration::from_millis(100);
                tokio::time::sleep(pause + jitter(pause)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

/// A failure that says nothing about the call itself: the member was down,
/// had no leader yet, or the connection broke.
fn retryable(s: &tonic::Status) -> bool {
    use std::error::Error as _;
    let transport = s
        .source()
        .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
    s.code() == tonic::Code::Unavailable
        || (matches!(s.code(), tonic::Code::Unknown | tonic::Code::Cancelled) && transport)
}

/// A random pause in `[0, max)`, from the OS random source: machines booted
/// from one image, or clients started by one script, must not retry in
/// lockstep (a pid or a clock is the same, or close, on all of them).
pub fn jitter(max: Duration) -> Duration {
    max.mul_f64(random_fraction())
}

/// A uniform number in `[0, 1)`.
fn random_fraction() -> f64 {
    // Jitter needs no cryptographic strength, but the OS source is the one
    // that differs between identical machines; it only fails where nothing
    // else would work either, and then no jitter is still correct.
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        return 0.0;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// 32 random bits from the OS source, for names that must not collide.
pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::getrandom(&mut b).expect("the OS random source is unavailable");
    u32::from_le_bytes(b)
}

/// Every item of a paginated list: `page(token)` fetches one page and
/// returns its items with the next page's token (empty after the last).
pub async fn all_pages<T, E, F, Fut>(mut page: F) -> Result<Vec<T>, E>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), E>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}
