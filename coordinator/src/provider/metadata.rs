//! A metadata service for local (and simulated) nodes that answers as
//! AWS's IMDSv2, GCP's metadata server and Azure's Scheduled Events do
//! (`clouds.md` §1), so the agent's real preemption watchers run against
//! them. A node's notice is a file in its directory, `preempt.json`
//! (`{"format": "aws"|"gcp"|"azure", "deadline_ms": …}`), written by
//! `nembo local preempt`; until then every service says "nothing".
//!
//! Paths: `/<node>/aws/latest/…`, `/<node>/gcp/instance/…`,
//! `/<node>/azure/scheduledevents`. Plain HTTP on loopback, as the real
//! services are plain HTTP on a link-local address.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Response, StatusCode, Uri};
use serde::{Deserialize, Serialize};

/// A scheduled notice, as `nembo local preempt` writes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InjectedNotice {
    /// `aws`, `gcp` or `azure`.
    pub format: String,
    /// When the node goes (unix ms).
    pub deadline_ms: i64,
}

/// The file a node's notice lives in.
pub fn notice_path(node_dir: &Path) -> PathBuf {
    node_dir.join("preempt.json")
}

/// Starts the service over `nodes_dir` on loopback; its base URL.
pub async fn start(nodes_dir: PathBuf) -> std::io::Result<String> {
    serve(
        tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?,
        nodes_dir,
    )
}

/// Serves `nodes_dir` on `listener` (the fault suite's agents reach it over
/// a bridge); its base URL.
pub fn serve(listener: tokio::net::TcpListener, nodes_dir: PathBuf) -> std::io::Result<String> {
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap| {
        let nodes_dir = nodes_dir.clone();
        async move { answer(&nodes_dir, &method, &uri, &headers).await }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}"))
}

fn reply(
    status: StatusCode,
    body: impl Into<String>,
    headers: &[(&str, String)],
) -> Response<Body> {
    let mut r = Response::builder().status(status);
    for (k, v) in headers {
        r = r.header(*k, v.as_str());
    }
    r.body(Body::from(body.into()))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn read_notice(nodes_dir: &Path, node: &str, format: &str) -> Option<InjectedNotice> {
    let n: InjectedNotice =
        serde_json::from_slice(&std::fs::read(notice_path(&nodes_dir.join(node))).ok()?).ok()?;
    (n.format == format).then_some(n)
}

fn query(uri: &Uri, key: &str) -> Option<String> {
    uri.query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

async fn answer(
    nodes_dir: &Path,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response<Body> {
    let path = uri.path().trim_start_matches('/');
    let mut parts = path.splitn(3, '/');
    let (Some(node), Some(cloud), rest) = (parts.next(), parts.next(), parts.next().unwrap_or(""))
    else {
        return reply(StatusCode::NOT_FOUND, "", &[]);
    };
    // A node name never walks out of the nodes directory.
    if node.is_empty() || node.contains("..") || !nodes_dir.join(node).is_dir() {
        return reply(StatusCode::NOT_FOUND, "", &[]);
    }
    let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
    match (cloud, rest, method) {
        ("aws", "latest/api/token", &Method::PUT) => {
            match header("x-aws-ec2-metadata-token-ttl-seconds").and_then(|t| t.parse::<u32>().ok())
            {
                Some(1..=21600) => reply(StatusCode::OK, format!("token-{node}"), &[]),
                _ => reply(StatusCode::BAD_REQUEST, "", &[]),
            }
        }
        ("aws", r, &Method::GET) if r.starts_with("latest/meta-data/") => {
            if header("x-aws-ec2-metadata-token") != Some(format!("token-{node}").as_str()) {
                return reply(StatusCode::UNAUTHORIZED, "", &[]);
            }
            match (r, read_notice(nodes_dir, node, "aws")) {
                ("latest/meta-data/spot/instance-action", Some(n)) => reply(
                    StatusCode::OK,
                    serde_json::json!({"action": "terminate", "time": rfc3339(n.deadline_ms)})
                        .to_string(),
                    &[("content-type", "application/json".into())],
                ),
                ("latest/meta-data/spot/termination-time", Some(n)) => {
                    reply(StatusCode::OK, rfc3339(n.deadline_ms), &[])
                }
                _ => reply(StatusCode::NOT_FOUND, "", &[]),
            }
        }
        ("gcp", r, &Method::GET) if r.starts_with("instance/") => {
            if header("metadata-flavor") != Some("Google") {
                return reply(
                    StatusCode::FORBIDDEN,
                    "Missing Metadata-Flavor:Google header.",
                    &[],
                );
            }
            let key = r.trim_start_matches("instance/").to_string();
            let value = |nodes_dir: &Path| {
                let preempted = read_notice(nodes_dir, node, "gcp").is_some();
                match key.as_str() {
                    "preempted" => Some(if preempted { "TRUE" } else { "FALSE" }),
                    "maintenance-event" => Some("NONE"),
                    _ => None,
                }
            };
            let Some(mut v) = value(nodes_dir) else {
                return reply(StatusCode::NOT_FOUND, "", &[]);
            };
            let etag = |v: &str| format!("{:x}", v.len());
            if query(uri, "wait_for_change").as_deref() == Some("true") {
                let last = query(uri, "last_etag").unwrap_or_default();
                let limit = query(uri, "timeout_sec")
                    .and_then(|t| t.parse::<u64>().ok())
                    .unwrap_or(60)
                    .min(300);
                let until = tokio::time::Instant::now() + Duration::from_secs(limit);
                while etag(v) == last && tokio::time::Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    v = value(nodes_dir).unwrap_or(v);
                }
            }
            reply(
                StatusCode::OK,
                v,
                &[("etag", etag(v)), ("metadata-flavor", "Google".into())],
            )
        }
        ("azure", "scheduledevents", m) => {
            if header("metadata") != Some("true") {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "Required metadata header not specified",
                    &[],
                );
            }
            if m == Method::POST {
                let _ = std::fs::write(nodes_dir.join(node).join("azure-ack"), b"");
                return reply(StatusCode::OK, "", &[]);
            }
            let events: Vec<serde_json::Value> = read_notice(nodes_dir, node, "azure")
                .map(|n| {
                    vec![serde_json::json!({
                        "EventId": format!("nembo-{node}"),
                        "EventType": "Preempt",
                        "ResourceType": "VirtualMachine",
                        "Resources": [node],
                        "EventStatus": "Scheduled",
                        "NotBefore": rfc1123(n.deadline_ms),
                        "Description": "Virtual machine is being preempted.",
                        "EventSource": "Platform",
                        "DurationInSeconds": -1,
                    })]
                })
                .unwrap_or_default();
            let doc =
                serde_json::json!({"DocumentIncarnation": events.len() + 1, "Events": events});
            reply(
                StatusCode::OK,
                doc.to_string(),
                &[("content-type", "application/json".into())],
            )
        }
        _ => reply(StatusCode::NOT_FOUND, "", &[]),
    }
}

fn civil(ms: i64) -> (i64, i64, i64, i64, i64, i64, i64) {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = (days + 4).rem_euclid(7); // 1970-01-01 was a Thursday
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60, weekday)
}

/// `2026-01-05T18:02:00Z`.
pub fn rfc3339(ms: i64) -> String {
    let (y, m, d, h, mi, s, _) = civil(ms);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `Mon, 19 Sep 2016 18:29:47 GMT`.
pub fn rfc1123(ms: i64) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, m, d, h, mi, s, wd) = civil(ms);
    format!(
        "{}, {d:02} {} {y} {h:02}:{mi:02}:{s:02} GMT",
        DAYS[wd as usize],
        MONTHS[(m - 1) as usize]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_in_each_clouds_format() {
        assert_eq!(rfc3339(1_767_636_120_000), "2026-01-05T18:02:00Z");
        assert_eq!(rfc1123(1_474_309_787_000), "Mon, 19 Sep 2016 18:29:47 GMT");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
