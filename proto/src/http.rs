//! The one HTTP client Nembo's cloud calls share (the coordinators' provider
//! APIs, the agents' object store): HTTP/1.1 over rustls (the `ring`
//! provider, Mozilla's roots) or plain HTTP for a local test server. A
//! connection per request: these calls are few and slow, and a fresh
//! connection never carries a stale one's failure.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// A call that got no answer: no connection, no TLS, a timeout.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HttpError(pub String);

/// Largest response body read; a cloud API answer is far smaller.
const MAX_BODY: usize = 32 << 20;

/// A response, read whole.
#[derive(Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    pub headers: http::HeaderMap,
    /// Body bytes.
    pub body: Bytes,
}

impl Response {
    /// The body as text, lossily.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends requests; cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new(Duration::from_secs(30))
    }
}

impl HttpClient {
    /// A client whose calls give up after `timeout` (connect to last byte).
    pub fn new(timeout: Duration) -> Self {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Self {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            timeout,
        }
    }

    /// Sends `req`; any answer, whatever its status, is `Ok`.
    pub async fn send(&self, req: http::Request<Bytes>) -> Result<Response, HttpError> {
        let what = format!("{} {}", req.method(), req.uri());
        tokio::time::timeout(self.timeout, self.send_inner(req))
            .await
            .map_err(|_| HttpError(format!("{what}: timed out")))?
            .map_err(|e| HttpError(format!("{what}: {e}")))
    }

    async fn send_inner(&self, mut req: http::Request<Bytes>) -> Result<Response, String> {
        let uri = req.uri().clone();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => return Err(format!("unsupported scheme {other:?}")),
        };
        let host = uri.host().ok_or("no host in URL")?.to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_else(|| host.clone());
        req.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_str(&authority).map_err(|e| e.to_string())?,
        );
        // The connection carries the authority; the request line takes the path.
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse::<http::Uri>()
            .map_err(|e| e.to_string())?;
        *req.uri_mut() = path;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connect {host}:{port}: {e}"))?;
        let req = req.map(Full::new);
        let resp = if https {
            let name =
                rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}: {e}"))?;
            exchange(TokioIo::new(tls), req).await?
        } else {
            exchange(TokioIo::new(tcp), req).await?
        };
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok(Response {
            status,
            headers: parts.headers,
            body,
        })
    }
}

async fn exchange<T>(
    io: T,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// Percent-encodes for a form body or a query (RFC 3986 unreserved kept):
/// the encoding SigV4 signs.
pub fn form_encode(pairs: &[(String, String)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_into(&mut out, k);
        out.push('=');
        encode_into(&mut out, v);
    }
    out
}

fn encode_into(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_keeps_only_unreserved_characters() {
        let body = form_encode(&[
            ("Action".into(), "RunInstances".into()),
            ("Filter.1.Value.1".into(), "a b/c+d=é".into()),
        ]);
        assert_eq!(
            body,
            "Action=RunInstances&Filter.1.Value.1=a%20b%2Fc%2Bd%3D%C3%A9"
        );
    }
}
