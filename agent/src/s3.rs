//! object_store's S3 client over nembo-proto's HTTP client (hyper + rustls
//! with ring), so the agent needs neither reqwest nor aws-lc. Credentials,
//! region and endpoint are the job's own `AWS_*` variables (its `envs` and
//! `secrets`: `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP` for a
//! test server, ...), else the agent's environment (an instance role on a
//! cloud VM): never the coordinators' credentials.

use std::sync::Arc;

use std::collections::BTreeMap;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
};
use object_store::{ClientOptions, ObjectStore};

#[derive(Debug, Default)]
struct Connector;

impl HttpConnector for Connector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(Service(
            nembo_proto::http::HttpClient::default(),
        )))
    }
}

struct Service(nembo_proto::http::HttpClient);

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("nembo http client")
    }
}

#[async_trait::async_trait]
impl HttpService for Service {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (parts, body) = req.into_parts();
        // Payloads are already in memory: a checkpoint file smaller than a
        // part, or one part of a multipart upload (checkpoint.rs). Answers
        // are read whole too (nembo-proto's client caps them at 32 MiB),
        // which is why restores read in 8 MiB ranges, never one GET.
        let bytes = http_body_util::BodyExt::collect(body)
            .await
            .map_err(|e| HttpError::new(HttpErrorKind::Request, e))?
            .to_bytes();
        let resp = self
            .0
            .send(http::Request::from_parts(parts, bytes))
            .await
            .map_err(|e| HttpError::new(HttpErrorKind::Connect, e))?;
        let mut out = http::Response::new(resp.body.into());
        *out.status_mut() = http::StatusCode::from_u16(resp.status)
            .map_err(|e| HttpError::new(HttpErrorKind::Decode, e))?;
        *out.headers_mut() = resp.headers;
        Ok(out)
    }
}

/// The bucket of `s3://bucket[/prefix]` or `r2://bucket[/prefix]`, and the
/// prefix.
pub fn open(
    url: &str,
    job_env: &BTreeMap<String, String>,
) -> Result<(Arc<dyn ObjectStore>, String), String> {
    if let Some(rest) = url.strip_prefix("r2://") {
        let env = r2_env(job_env)?;
        return open_s3(rest, &env, false);
    }
    let rest = url
        .strip_prefix("s3://")
        .ok_or("not an s3:// or r2:// URL")?;
    open_s3(rest, job_env, true)
}

/// Cloudflare R2 is S3's API at the account's endpoint: the job's
/// `R2_ACCESS_KEY_ID`, `R2_SECRET_ACCESS_KEY` and `CLOUDFLARE_ACCOUNT_ID`
/// (or `R2_ENDPOINT_URL`) as the S3 client's settings, region `auto`.
fn r2_env(job_env: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, String> {
    let get = |k: &str| job_env.get(k).filter(|v| !v.is_empty()).cloned();
    let endpoint = match (get("R2_ENDPOINT_URL"), get("CLOUDFLARE_ACCOUNT_ID")) {
        (Some(e), _) => e,
        (None, Some(account)) => format!("https://{account}.r2.cloudflarestorage.com"),
        (None, None) => {
            return Err(
                "r2:// needs the job's CLOUDFLARE_ACCOUNT_ID (or R2_ENDPOINT_URL) secret".into(),
            )
        }
    };
    let (Some(key), Some(secret)) = (get("R2_ACCESS_KEY_ID"), get("R2_SECRET_ACCESS_KEY")) else {
        return Err(
            "r2:// needs the job's R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY secrets".into(),
        );
    };
    let mut env = BTreeMap::new();
    env.insert(
        "AWS_ALLOW_HTTP".into(),
        endpoint.starts_with("http://").to_string(),
    );
    env.insert("AWS_ENDPOINT_URL".into(), endpoint);
    env.insert("AWS_ACCESS_KEY_ID".into(), key);
    env.insert("AWS_SECRET_ACCESS_KEY".into(), secret);
    env.insert("AWS_DEFAULT_REGION".into(), "auto".into());
    Ok(env)
}

fn open_s3(
    rest: &str,
    job_env: &BTreeMap<String, String>,
    from_agent_env: bool,
) -> Result<(Arc<dyn ObjectStore>, String), String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err("no bucket in the URL".into());
    }
    // S3 falls back to the agent's environment (an instance role); R2 is
    // the job's own keys only.
    let mut builder = if from_agent_env {
        AmazonS3Builder::from_env()
    } else {
        AmazonS3Builder::new()
    };
    for (name, value) in job_env.iter().filter(|(k, _)| k.starts_with("AWS_")) {
        if let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
            builder = builder.with_config(key, value);
        }
    }
    let store = builder
        .with_bucket_name(bucket)
        .with_http_connector(Connector)
        .build()
        .map_err(|e| e.to_string())?;
    Ok((Arc::new(store), prefix.trim_matches('/').to_string()))
}
