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

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
                        deadline_ms: crate::supervisor::now_ms() + 30_000,
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
    headers: Vec<(String, String)>,
    /// Body text.
    pub body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Plain HTTP/1.1 with `Connection: close`: metadata services are
/// link-local and unencrypted by design, and this keeps the agent free of
/// an HTTP client stack. 70 s covers GCP's hanging GET.
pub async fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<Reply> {
    let err = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| err(format!("{url}: only http:// is supported")))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        s.take(1 << 20).read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(70), exchange)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{url}: timed out"))
        })??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| err(format!("{url}: not an HTTP answer")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_string(),
    })
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn to_ms(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64) -> Option<i64> {
    // Bounded, so that no field a metadata server sends can overflow the
    // arithmetic (the fuzzer found a 16-digit year).
    let ok = (1970..=9999).contains(&y)
        && (1..=12).contains(&mo)
        && (1..=31).contains(&d)
        && (0..24).contains(&h)
        && (0..60).contains(&mi)
        && (0..61).contains(&s);
    ok.then(|| ((days_from_civil(y, mo, d) * 24 + h) * 60 + mi) * 60_000 + s * 1000)
}

/// `2026-01-05T18:02:00Z` (UTC, optional fraction).
pub fn parse_rfc3339(t: &str) -> Option<i64> {
    let t = t.trim().strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, mo, dd) = (d.next()??, d.next()??, d.next()??);
    let time = time.split('.').next()?;
    let mut c = time.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, s) = (c.next()??, c.next()??, c.next()??);
    to_ms(y, mo, dd, h, mi, s)
}

/// `Mon, 19 Sep 2016 18:29:47 GMT`.
pub fn parse_rfc1123(t: &str) -> Option<i64> {
    let parts: Vec<&str> = t.split_whitespace().collect();
    let [_, d, mon, y, time, "GMT"] = parts[..] else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mo = MONTHS.iter().position(|m| *m == mon)? as i64 + 1;
    let mut c = time.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, s) = (c.next()??, c.next()??, c.next()??);
    to_ms(y.parse().ok()?, mo, d.parse().ok()?, h, mi, s)
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
}
