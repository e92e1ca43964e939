//! The providers' HTTP client: nembo-proto's, with its failures classed as
//! transient (no answer is worth retrying).

use hyper::body::Bytes;

pub use nembo_proto::http::{form_encode, Response};

use super::ProviderError;

/// Sends requests; cheap to clone.
#[derive(Clone, Default)]
pub struct HttpClient(nembo_proto::http::HttpClient);

impl HttpClient {
    /// Sends `req`; any answer, whatever its status, is `Ok`. Failing to
    /// connect or to read the answer in time is transient.
    pub async fn send(&self, req: http::Request<Bytes>) -> Result<Response, ProviderError> {
        self.0
            .send(req)
            .await
            .map_err(|e| ProviderError::Transient(e.to_string()))
    }
}
