//! Preemption watchers: the cloud's own warning, read from the metadata
//! service inside the VM, in each cloud's format (`clouds.md` §1):
//!
//! - AWS IMDSv2: a session token (`PUT /latest/api/token`), then
//!   `spot/instance-action` (404 until a notice) and the rebalance
//!   recommendation (advisory), polled.
//! - GCP: hanging GETs on `instance/preempted` and
//!   `instance/maintenance-event` (`wait_for_change`, `last_etag`).
//! - Azure Scheduled Events: polled; `Preempt` (and `Terminate`) events
//!   naming this VM; acknowledged once the job has checkpointed.
//!
//! Each yields a [`Notice`]. The base URLs are configurable so tests (and
//! the local provider's per-node metadata endpoint) can stand in for
//! 169.254.169.254.

use std::sync::OnceLock;
use std::time::Duration;

use nembo_proto::http::{HttpClient, HttpError};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::mpsc;

/// What a cloud said.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// `aws:terminate`, `aws:rebalance`, `gcp:preempted`,
    /// `gcp:TERMINATE_ON_HOST_MAINTENANCE`, `azure:Preempt`, ...
    pub kind: String,
    /// When the VM goes (unix ms); 0 when the cloud does not say.
    pub deadline_ms: i64,
    /// An early hint only (AWS rebalance): checkpoint, keep running.
    pub advisory: bool,
    /// Azure's event id, to acknowledge.
    pub azure_event: Option<String>,
}

/// Which metadata services to watch.
#[derive(Debug, Clone, Default)]
pub struct WatchConfig {
    /// AWS IMDS base (`http://169.254.169.254`).
    pub aws: Option<String>,
    /// GCP metadata base (`http://metadata.google.internal/computeMetadata/v1`).
    pub gcp: Option<String>,
    /// Azure metadata base (`http://169.254.169.254/metadata`).
    pub azure: Option<String>,
    /// This VM's name, as Azure lists it in an event's `Resources`
    /// (none: every event counts).
    pub azure_vm_name: Option<String>,
    /// Poll period for AWS and Azure.
    pub poll: Duration,
}

/// Starts a watcher per configured service; notices arrive on the channel,
/// each once.
pub fn start(cfg: WatchConfig) -> mpsc::Receiver<Notice> {
    let (tx, rx) = mpsc::channel(16);
    if let Some(base) = cfg.aws.clone() {
        tokio::spawn(watch_aws(base, cfg.poll, tx.clone()));
    }
    if let Some(base) = cfg.gcp.clone() {
        for key in ["preempted", "maintenance-event"] {
            tokio::spawn(watch_gcp(base.clone(), key, tx.clone()));
        }
    }
    if let Some(base) = cfg.azure.clone() {
        tokio::spawn(watch_azure(base, cfg.azure_vm_name.clone(), cfg.poll, tx));
    }
    rx
}

async fn watch_aws(base: String, poll: Duration, tx: mpsc::Sender<Notice>) {
    let base = base.trim_end_matches('/').to_string();
    let mut token: Option<String> = None;
    let (mut told_action, mut told_rebalance) = (false, false);
    loop {
        if token.is_none() {
            token = http(
                "PUT",
                &format!("{base}/latest/api/token"),
                &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
                "",
            )
            .await
            .ok()
            .filter(|r| r.status == 200)
            .map(|r| r.body.trim().to_string());
        }
        if let Some(t) = token.clone() {
            let h = [("X-aws-ec2-metadata-token", t.as_str())];
            let action = http(
                "GET",
                &format!("{base}/latest/meta-data/spot/instance-action"),
                &h,
                "",
            )
            .await;
            match action {
                Ok(r) if r.status == 200 && !told_action => {
                    if let Some(n) = parse_aws_action(&r.body) {
                        told_action = true;
                        if tx.send(n).await.is_err() {
                            return;
                        }
                    }
                }
                // The token expired or the service restarted: get another.
                Ok(r) if r.status == 401 => token = None,
                _ => {}
            }
            let rebalance = http(
                "GET",
                &format!("{base}/latest/meta-data/events/recommendations/rebalance"),
                &h,
                "",
            )
            .await;
            if let Ok(r) = rebalance {
                if r.status == 200 && !told_rebalance {
                    told_rebalance = true;
                    let n = Notice {
                        kind: "aws:rebalance".into(),
                        deadline_ms: 0,
                        advisory: true,
                        azure_event: None,
                    };
                    if tx.send(n).await.is_err() {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}

/// `{"action":"terminate","time":"2026-01-05T18:02:00Z"}`.
pub fn parse_aws_action(body: &str) -> Option<Notice> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let action = v.get("action")?.as_str()?;
    let deadline_ms = v
        .get("time")
        .and_then(|t| t.as_str())
        .and_then(parse_rfc3339)
        .unwrap_or(0);
    Some(Notice {
        kind: format!("aws:{action}"),
        deadline_ms,
        advisory: false,
        azure_event: None,
    })
}

async fn watch_gcp(base: String, key: &'static str, tx: mpsc::Sender<Notice>) {
    let url = format!("{}/instance/{key}", base.trim_end_matches('/'));
    let mut etag: Option<String> = None;
    loop {
        // The first read takes the current value; later ones hang until it changes.
        let target = match &etag {
            None => url.clone(),
            Some(e) => format!("{url}?wait_for_change=true&timeout_sec=60&last_etag={e}"),
        };
        match http("GET", &target, &[("Metadata-Flavor", "Google")], "").await {
            Ok(r) if r.status == 200 => {
                etag = r.header("etag").map(str::to_string).or(Some("0".into()));
                if let Some(n) = gcp_notice(key, r.body.trim()) {
                    // GCP gives Spot VMs 30 s from the flag to the hard stop.
                    let n = Notice {
                        deadline_ms: nembo_proto::clock::now_ms() + 30_000,
                        ..n
                    };
                    let _ = tx.send(n).await;
                    return;
                }
            }
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// A notice, if the value of `instance/<key>` is one.
pub fn gcp_notice(key: &str, value: &str) -> Option<Notice> {
    let kind = match (key, value) {
        ("preempted", "TRUE") => "gcp:preempted".to_string(),
        // GPU VMs cannot live-migrate: any host maintenance ends them.
        ("maintenance-event", v) if v.starts_with("TERMINATE") || v.starts_with("MIGRATE") => {
            format!("gcp:{v}")
        }
        _ => return None,
    };
    Some(Notice {
        kind,
        deadline_ms: 0,
        advisory: false,
        azure_event: None,
    })
}

const AZURE_API: &str = "api-version=2020-07-01";

async fn watch_azure(
    base: String,
    vm_name: Option<String>,
    poll: Duration,
    tx: mpsc::Sender<Notice>,
) {
    let url = format!("{}/scheduledevents?{AZURE_API}", base.trim_end_matches('/'));
    let mut told = std::collections::HashSet::new();
    loop {
        if let Ok(r) = http("GET", &url, &[("Metadata", "true")], "").await {
            if r.status == 200 {
                for n in parse_azure_events(&r.body, vm_name.as_deref()) {
                    let id = n.azure_event.clone().unwrap_or_default();
                    if told.insert(id) && tx.send(n).await.is_err() {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}

/// Azure's `Preempt` and `Terminate` events that concern this VM.
pub fn parse_azure_events(body: &str, vm_name: Option<&str>) -> Vec<Notice> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let events = v
        .get("Events")
        .and_then(|e| e.as_array())
        .cloned()
        .unwrap_or_default();
    events
        .iter()
        .filter_map(|e| {
            let ty = e.get("EventType")?.as_str()?;
            if !matches!(ty, "Preempt" | "Terminate") {
                return None;
            }
            // Events reach the whole availability set: act on ours only.
            let mine = vm_name.is_none_or(|me| {
                e.get("Resources")
                    .and_then(|r| r.as_array())
                    .is_some_and(|r| r.iter().any(|x| x.as_str() == Some(me)))
            });
            if !mine {
                return None;
            }
            let deadline_ms = e
                .get("NotBefore")
                .and_then(|t| t.as_str())
                .and_then(parse_rfc1123)
                .unwrap_or(0);
            Some(Notice {
                kind: format!("azure:{ty}"),
                deadline_ms,
                advisory: false,
                azure_event: Some(e.get("EventId")?.as_str()?.to_string()),
            })
        })
        .collect()
}

/// Tells Azure the VM is ready to go (after the final checkpoint).
pub async fn ack_azure(base: &str, event_id: &str) {
    let url = format!("{}/scheduledevents?{AZURE_API}", base.trim_end_matches('/'));
    let body = serde_json::json!({"StartRequests": [{"EventId": event_id}]}).to_string();
    match http(
        "POST",
        &url,
        &[("Metadata", "true"), ("Content-Type", "application/json")],
        &body,
    )
    .await
    {
        Ok(r) if r.status == 200 => tracing::info!(event = event_id, "Azure event acknowledged"),
        other => {
            tracing::warn!(event = event_id, answer = ?other.map(|r| r.status), "Azure event not acknowledged")
        }
    }
}

/// An answer from a metadata service.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    headers: http::HeaderMap,
    /// Body text.
    pub body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Metadata services are link-local plain HTTP; a reply may come chunked
/// (GCP's hanging GET does), which hyper decodes. 70 s covers that GET.
fn metadata_client() -> &'static HttpClient {
    static CLIENT: OnceLock<HttpClient> = OnceLock::new();
    CLIENT.get_or_init(|| HttpClient::new(Duration::from_secs(70)))
}

/// One call to a metadata service.
pub async fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Reply, HttpError> {
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(body.to_owned().into())
        .map_err(|e| HttpError(format!("{url}: {e}")))?;
    let r = metadata_client().send(req).await?;
    Ok(Reply {
        status: r.status,
        body: r.text(),
        headers: r.headers,
    })
}

/// `2026-01-05T18:02:00Z` (RFC 3339) in unix ms.
pub fn parse_rfc3339(t: &str) -> Option<i64> {
    let at = OffsetDateTime::parse(t.trim(), &Rfc3339).ok()?;
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

/// `Mon, 19 Sep 2016 18:29:47 GMT` (an HTTP date, as Azure writes
/// `NotBefore`) in unix ms.
pub fn parse_rfc1123(t: &str) -> Option<i64> {
    let at = httpdate::parse_http_date(t.trim()).ok()?;
    let ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    i64::try_from(ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_clouds_notice_format_is_read() {
        let n =
            parse_aws_action(r#"{"action":"terminate","time":"2026-01-05T18:02:00Z"}"#).unwrap();
        assert_eq!(n.kind, "aws:terminate");
        assert_eq!(n.deadline_ms, 1_767_636_120_000);
        assert!(parse_aws_action("<html>").is_none());
        assert_eq!(
            gcp_notice("preempted", "TRUE").unwrap().kind,
            "gcp:preempted"
        );
        assert!(gcp_notice("preempted", "FALSE").is_none());
        assert!(gcp_notice("maintenance-event", "NONE").is_none());
        assert!(gcp_notice("maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE").is_some());
        let body = r#"{"DocumentIncarnation":2,"Events":[
            {"EventId":"A","EventType":"Preempt","ResourceType":"VirtualMachine","Resources":["vm1"],"EventStatus":"Scheduled","NotBefore":"Mon, 19 Sep 2016 18:29:47 GMT"},
            {"EventId":"B","EventType":"Preempt","Resources":["vm2"],"NotBefore":""},
            {"EventId":"C","EventType":"Freeze","Resources":["vm1"],"NotBefore":""}]}"#;
        let mine = parse_azure_events(body, Some("vm1"));
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].azure_event.as_deref(), Some("A"));
        assert_eq!(mine[0].deadline_ms, 1_474_309_787_000);
        assert_eq!(parse_azure_events(body, None).len(), 2);
    }

    #[test]
    fn out_of_range_dates_are_refused_not_overflowed() {
        // Found by `scripts/fuzz` (fuzz/artifacts/notices): the year
        // overflowed the day arithmetic.
        let huge = r#"{"action":"terminate","time":"2024655640273416-+01-05T18:0:20Z"}"#;
        assert_eq!(parse_aws_action(huge).unwrap().deadline_ms, 0);
        assert_eq!(parse_rfc3339("2024655640273416-01-05T18:00:20Z"), None);
        assert_eq!(parse_rfc3339("2026-01-05T-1:00:00Z"), None);
        assert_eq!(
            parse_rfc1123("Mon, 19 Sep 99999999999999 18:29:47 GMT"),
            None
        );
        assert_eq!(
            parse_rfc3339("2026-01-05T18:02:00Z"),
            Some(1_767_636_120_000)
        );
    }

    /// A metadata server that answers every request with `Transfer-Encoding:
    /// chunked`, the body cut into small chunks, as a proxy or GCP's
    /// hanging GET may send it.
    async fn chunked_server(answer: fn(&str) -> (u16, &'static str)) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if sock.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let (status, body) = answer(&head);
                    let mut out = format!(
                        "HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                    );
                    for piece in body.as_bytes().chunks(7) {
                        out.push_str(&format!("{:x}\r\n", piece.len()));
                        out.push_str(std::str::from_utf8(piece).unwrap());
                        out.push_str("\r\n");
                    }
                    out.push_str("0\r\n\r\n");
                    let _ = sock.write_all(out.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn an_aws_notice_sent_chunked_is_read() {
        let base = chunked_server(|head| {
            if head.starts_with("PUT /latest/api/token") {
                (200, "token-1")
            } else if head.starts_with("GET /latest/meta-data/spot/instance-action")
                && head.contains("token-1")
            {
                (
                    200,
                    r#"{"action":"terminate","time":"2026-01-05T18:02:00Z"}"#,
                )
            } else {
                (404, "")
            }
        })
        .await;
        let mut notices = start(WatchConfig {
            aws: Some(base),
            poll: Duration::from_millis(50),
            ..Default::default()
        });
        let n = tokio::time::timeout(Duration::from_secs(10), notices.recv())
            .await
            .expect("a notice within 10 s")
            .unwrap();
        assert_eq!(n.kind, "aws:terminate");
        assert_eq!(n.deadline_ms, 1_767_636_120_000);
    }
}
