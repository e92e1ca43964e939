//! Seeweb's ECS API v2 (`clouds.md` §4): header `X-APITOKEN`, JSON with a
//! `status` envelope. `notes` is the only tag a server has (≤ 60
//! characters): `nembo:<cluster>:<node>`. A create is an action to poll;
//! the server then boots, and Seeweb reboots it once after first boot, so
//! the agent's unit is enabled but not started: the reboot starts it.
//!
//! Token: `SEEWEB_API_TOKEN`, else `seeweb.token_file` (0600). Base URL:
//! `seeweb.endpoint`, `SEEWEB_API_URL`, else `https://api.seeweb.it/ecs/v2`.

use std::path::PathBuf;
use std::time::Duration;

use hyper::body::Bytes;
use nembo_domain::state::{Offering, Resources};
use serde::Deserialize;
use serde_json::Value;

use super::bootstrap::{Bootstrap, Start};
use super::http::{HttpClient, Response};
use super::{BoxFuture, Instance, LaunchRequest, Provider, ProviderError};

/// Settings from `seeweb:` in providers.yaml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeewebSettings {
    /// File holding the API token (0600), when `SEEWEB_API_TOKEN` is unset.
    pub token_file: Option<PathBuf>,
    /// API base URL.
    pub endpoint: Option<String>,
    /// Locations to use (default: those in the catalog).
    #[serde(default)]
    pub regions: Vec<String>,
    /// Image for every plan (default: the NVIDIA-driver Ubuntu 22.04 image,
    /// its UEFI variant for H200, which requires it).
    pub image: Option<String>,
    /// Label of an SSH key already uploaded to Seeweb, for your own access.
    pub ssh_key: Option<String>,
    /// How often an action or a boot is polled (ms; Seeweb suggests 5 s).
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// How long a create may take to boot before it has failed (s).
    #[serde(default = "default_boot_timeout_s")]
    pub boot_timeout_s: u64,
}

fn default_poll_ms() -> u64 {
    5000
}

fn default_boot_timeout_s() -> u64 {
    1800
}

const DEFAULT_ENDPOINT: &str = "https://api.seeweb.it/ecs/v2";
const UEFI_IMAGE: &str = "ubuntu-2204-uefi-nvidia-driver";
const PLAIN_IMAGE: &str = "ubuntu-2204-nvidia-driver";
/// Create errors that mean "no capacity here" (clouds.md).
const CAPACITY_WORDS: &[&str] = &[
    "not available",
    "no capacity",
    "lack of resources",
    "not activatable",
    "no host",
];

/// The Seeweb provider.
pub struct SeewebProvider {
    settings: SeewebSettings,
    cluster: String,
    http: HttpClient,
    offerings: Vec<Offering>,
    bootstrap: Bootstrap,
}

/// A server of ours, as listed.
struct Server {
    name: String,
    node_id: String,
    status: String,
    /// `current_status`: RUNNING, SHUTOFF (powered off).
    power: String,
}

impl SeewebProvider {
    /// A provider for `cluster`, offering `catalog` rows of the configured regions.
    pub fn new(
        settings: SeewebSettings,
        cluster: String,
        catalog: Vec<Offering>,
        bootstrap: Bootstrap,
    ) -> Self {
        let offerings = catalog
            .into_iter()
            .filter(|o| settings.regions.is_empty() || settings.regions.contains(&o.region))
            // A plan's disk comes with it (known from a refreshed catalog:
            // a task's disk_size fits a plan whose disk is at least that);
            // a Seeweb server has every port open.
            .map(|o| Offering {
                opens_ports: true,
                ports_per_node: false,
                custom_images: false,
                can_stop: true,
                ..o
            })
            .collect();
        Self {
            settings,
            cluster,
            http: HttpClient::default(),
            offerings,
            bootstrap,
        }
    }

    fn base(&self) -> String {
        self.settings
            .endpoint
            .clone()
            .or_else(|| std::env::var("SEEWEB_API_URL").ok())
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string()
    }

    fn token(&self) -> Result<String, ProviderError> {
        if let Some(t) = std::env::var("SEEWEB_API_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
        {
            return Ok(t);
        }
        let path = self.settings.token_file.as_ref().ok_or_else(|| {
            ProviderError::Auth("no Seeweb token: set SEEWEB_API_TOKEN or seeweb.token_file".into())
        })?;
        let path = match (path.strip_prefix("~"), std::env::var_os("HOME")) {
            (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
            _ => path.clone(),
        };
        nembo_proto::client::read_secret(&path)
            .map(|t| t.trim().to_string())
            .map_err(|e| ProviderError::Auth(format!("Seeweb token: {e}")))
    }

    fn tag_prefix(&self) -> String {
        format!("nembo:{}:", self.cluster)
    }

    async fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response, ProviderError> {
        let token = self.token()?;
        let mut b = http::Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base()))
            .header("X-APITOKEN", token)
            .header(http::header::ACCEPT, "application/json");
        let payload = match body {
            Some(v) => {
                b = b.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = b
            .body(payload)
            .map_err(|e| ProviderError::InvalidRequest(format!("Seeweb endpoint: {e}")))?;
        self.http.send(req).await
    }

    /// A call whose answer must be a success; the JSON body.
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ProviderError> {
        let what = format!("{method} {path}");
        let resp = self.request(method, path, body).await?;
        let json: Option<Value> = serde_json::from_slice(&resp.body).ok();
        let refused = json
            .as_ref()
            .and_then(|j| j.get("status"))
            .and_then(Value::as_str)
            .is_some_and(|s| s == "error" || s == "not_found");
        if resp.status < 400 && !refused {
            return json.ok_or_else(|| {
                ProviderError::Transient(format!("{what}: answer is not JSON: {}", resp.text()))
            });
        }
        let message = json
            .as_ref()
            .and_then(|j| {
                ["message", "error", "detail"]
                    .iter()
                    .find_map(|k| j.get(*k))
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    })
            })
            .unwrap_or_else(|| resp.text().chars().take(300).collect());
        Err(classify(resp.status, &format!("{what}: {message}")))
    }

    async fn servers(&self) -> Result<Vec<Server>, ProviderError> {
        let list = self.call(http::Method::GET, "/servers", None).await?;
        let prefix = self.tag_prefix();
        Ok(list
            .get("server")
            .and_then(Value::as_array)
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .filter_map(|s| {
                let node_id = s.get("notes")?.as_str()?.strip_prefix(&prefix)?;
                Some(Server {
                    name: s.get("name")?.as_str()?.to_string(),
                    node_id: node_id.to_string(),
                    status: s
                        .get("status")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    power: s
                        .get("current_status")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                })
            })
            .collect())
    }

    /// Whether (plan, location) has capacity now, from the live view.
    async fn has_capacity(&self, plan: &str, location: &str) -> Result<bool, ProviderError> {
        let live = self
            .call(http::Method::GET, "/plans/availables", None)
            .await?;
        let plans = live
            .get("plans")
            .and_then(Value::as_array)
            .map(|a| a.as_slice())
            .unwrap_or_default();
        Ok(plans
            .iter()
            .filter(|p| p.get("name").and_then(Value::as_str) == Some(plan))
            .flat_map(|p| {
                p.get("region_availables")
                    .and_then(Value::as_array)
                    .map(|a| a.as_slice())
                    .unwrap_or_default()
            })
            .any(|r| r.get("region").and_then(Value::as_str) == Some(location)))
    }

    async fn wait_action(
        &self,
        id: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), ProviderError> {
        loop {
            let a = self
                .call(http::Method::GET, &format!("/actions/{id}"), None)
                .await?;
            match a.pointer("/action/status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed") => {
                    return Err(ProviderError::Capacity(format!(
                        "Seeweb action {id} failed"
                    )))
                }
                _ => {}
            }
            self.pause(deadline, &format!("action {id}")).await?;
        }
    }

    /// Polls the server until it is `Booted` with an address. It may 404
    /// for a moment after the create.
    async fn wait_booted(
        &self,
        name: &str,
        deadline: tokio::time::Instant,
    ) -> Result<(), ProviderError> {
        loop {
            let resp = self
                .request(http::Method::GET, &format!("/servers/{name}"), None)
                .await?;
            if resp.status < 400 {
                let s: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
                let status = s.pointer("/server/status").and_then(Value::as_str);
                let ipv4 = s
                    .pointer("/server/ipv4")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                match status {
                    Some("Booted") if !ipv4.is_empty() => return Ok(()),
                    Some("Fail") => {
                        return Err(ProviderError::Capacity(format!(
                            "Seeweb server {name} failed to boot"
                        )))
                    }
                    Some("Deleting") | Some("Deleted") => {
                        return Err(ProviderError::Transient(format!(
                            "Seeweb server {name} is being deleted"
                        )))
                    }
                    _ => {}
                }
            } else if resp.status != 404 {
                return Err(classify(resp.status, &resp.text()));
            }
            self.pause(deadline, &format!("server {name} to boot"))
                .await?;
        }
    }

    async fn pause(&self, deadline: tokio::time::Instant, what: &str) -> Result<(), ProviderError> {
        if tokio::time::Instant::now() >= deadline {
            return Err(ProviderError::Transient(format!(
                "gave up waiting for {what} after {} s",
                self.settings.boot_timeout_s
            )));
        }
        tokio::time::sleep(Duration::from_millis(self.settings.poll_ms.max(10))).await;
        Ok(())
    }

    fn image_for(&self, req: &LaunchRequest) -> String {
        if let Some(i) = &self.settings.image {
            return i.clone();
        }
        if req.resources.accelerators.contains_key("H200") {
            UEFI_IMAGE.into()
        } else {
            PLAIN_IMAGE.into()
        }
    }

    /// Powers the node's server off or on, and waits for the action (a
    /// bare Action, without the usual envelope).
    async fn power(&self, node_id: &str, kind: &str) -> Result<(), ProviderError> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(self.settings.boot_timeout_s);
        let server = self
            .servers()
            .await?
            .into_iter()
            .find(|s| s.node_id == node_id && !matches!(s.status.as_str(), "Deleting" | "Deleted"))
            .ok_or_else(|| {
                ProviderError::InvalidRequest(format!("node {node_id}: its Seeweb server is gone"))
            })?;
        let body = serde_json::json!({ "type": kind });
        let action = self
            .call(
                http::Method::POST,
                &format!("/servers/{}/actions", server.name),
                Some(&body),
            )
            .await?;
        if let Some(id) = action.get("id").and_then(Value::as_u64) {
            self.wait_action(id, deadline).await?;
        }
        tracing::info!(node = node_id, server = %server.name, kind, "Seeweb power action done");
        Ok(())
    }

    /// The plans Seeweb sells now, as catalog rows (`nembo catalog refresh seeweb`).
    pub async fn fetch_catalog(&self) -> Result<Vec<Offering>, ProviderError> {
        let plans = self.call(http::Method::GET, "/plans", None).await?;
        let mut out = Vec::new();
        for p in plans
            .get("plans")
            .and_then(Value::as_array)
            .map(|a| a.as_slice())
            .unwrap_or_default()
        {
            if p.get("available").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            let Some(name) = p.get("name").and_then(Value::as_str) else {
                continue;
            };
            let gpus = lenient_number(p.get("gpu")).unwrap_or(0.0);
            let label = p
                .get("gpu_label")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if gpus <= 0.0 || label.is_empty() {
                continue; // CPU-only plans are not what Nembo rents here.
            }
            let mut accelerators = std::collections::BTreeMap::new();
            accelerators.insert(gpu_name(label), gpus);
            let resources = Resources {
                accelerators,
                cpus: lenient_number(p.get("cpu")).unwrap_or(0.0),
                memory_gb: lenient_number(p.get("ram")).unwrap_or(0.0) / 1024.0,
            };
            let Some(price) = lenient_number(p.get("hourly_price")) else {
                continue;
            };
            let disk = lenient_number(p.get("disk"))
                .filter(|d| *d > 0.0)
                .map(|d| d as u64);
            for region in p
                .get("available_regions")
                .and_then(Value::as_array)
                .map(|a| a.as_slice())
                .unwrap_or_default()
            {
                let Some(location) = region.get("location").and_then(Value::as_str) else {
                    continue;
                };
                out.push(Offering {
                    provider: "seeweb".into(),
                    region: location.to_string(),
                    instance_type: name.to_string(),
                    resources: resources.clone(),
                    hourly_price: price,
                    spot_price: None,
                    zone: None,
                    runs_as_coordinator_user: false,
                    simulated: false,
                    fixed_machines: None,
                    disk_gb_max: disk,
                    opens_ports: false,
                    ports_per_node: false,
                    custom_images: false,
                    can_stop: false,
                });
            }
        }
        out.sort_by(|a, b| (&a.instance_type, &a.region).cmp(&(&b.instance_type, &b.region)));
        Ok(out)
    }
}

/// Seeweb sends numbers as strings in places ("cpu": "16").
fn lenient_number(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Seeweb's display label ("H100 80GB", "L40s 48GB", "RTX A6000 48GB") to
/// Nembo's accelerator name (H100, L40S, A6000).
pub fn gpu_name(label: &str) -> String {
    let words: Vec<String> = label
        .split_whitespace()
        .filter(|w| {
            !(w.to_ascii_uppercase().ends_with("GB") && w[..w.len() - 2].parse::<f64>().is_ok())
        })
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let name = words.join("");
    let memory_80 = label.to_ascii_uppercase().contains("80GB");
    match name.as_str() {
        "A100" if memory_80 => "A100-80GB".into(),
        "RTXA6000" => "A6000".into(),
        "RTXPRO6000" => "RTXPRO6000".into(),
        _ => name,
    }
}

fn classify(status: u16, message: &str) -> ProviderError {
    let m = message.to_string();
    let lower = message.to_ascii_lowercase();
    match status {
        401 | 403 => ProviderError::Auth(m),
        s if s >= 500 || s == 429 => ProviderError::Transient(m),
        _ if CAPACITY_WORDS.iter().any(|w| lower.contains(w)) => ProviderError::Capacity(m),
        _ if lower.contains("quota") || lower.contains("limit") => ProviderError::Quota(m),
        _ => ProviderError::InvalidRequest(m),
    }
}

impl Provider for SeewebProvider {
    fn name(&self) -> &str {
        "seeweb"
    }

    fn offerings(&self) -> Vec<Offering> {
        self.offerings.clone()
    }

    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<String, ProviderError>> {
        Box::pin(async move {
            let deadline =
                tokio::time::Instant::now() + Duration::from_secs(self.settings.boot_timeout_s);
            let notes = format!("{}{}", self.tag_prefix(), req.node_id);
            if notes.len() > 60 {
                return Err(ProviderError::InvalidRequest(format!(
                    "tag '{notes}' is longer than Seeweb's 60-character notes"
                )));
            }
            let existing = self.servers().await?.into_iter().find(|s| {
                s.node_id == req.node_id && !matches!(s.status.as_str(), "Deleting" | "Deleted")
            });
            let name = match existing {
                Some(s) => s.name,
                None => {
                    if !self.has_capacity(&req.instance_type, &req.region).await? {
                        return Err(ProviderError::Capacity(format!(
                            "plan {} has no capacity in {} (GET /plans/availables)",
                            req.instance_type, req.region
                        )));
                    }
                    let mut body = serde_json::json!({
                        "plan": req.instance_type,
                        "image": self.image_for(&req),
                        "location": req.region,
                        "notes": notes,
                        "user_customize": self.bootstrap.script(&req, Start::AfterReboot),
                    });
                    // Seeweb refuses nulls: a field is there or absent.
                    if let Some(key) = &self.settings.ssh_key {
                        body["ssh_key"] = Value::String(key.clone());
                    }
                    let created = self
                        .call(http::Method::POST, "/servers", Some(&body))
                        .await?;
                    let name = created
                        .pointer("/server/name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            ProviderError::Transient("create answered no server name".into())
                        })?
                        .to_string();
                    tracing::info!(node = %req.node_id, server = %name, plan = %req.instance_type, location = %req.region, "Seeweb server created");
                    if let Some(action) = created.get("action_id").and_then(Value::as_u64) {
                        self.wait_action(action, deadline).await?;
                    }
                    name
                }
            };
            self.wait_booted(&name, deadline).await?;
            Ok(name)
        })
    }

    fn list_owned(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move {
            Ok(self
                .servers()
                .await?
                .into_iter()
                .map(|s| Instance {
                    live: !matches!(s.status.as_str(), "Deleting" | "Deleted"),
                    state: if s.power.is_empty() {
                        s.status
                    } else {
                        format!("{} ({})", s.status, s.power)
                    },
                    instance_id: s.name,
                    node_id: s.node_id,
                })
                .collect())
        })
    }

    /// Seeweb keeps no tag a leader could update, so there is no fencing
    /// by term here: a stale delete only removes what no node wants, and a
    /// stale create is found by the reconciler.
    fn terminate<'a>(
        &'a self,
        node_id: &'a str,
        _term: u64,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            for s in self.servers().await? {
                if s.node_id != node_id || matches!(s.status.as_str(), "Deleting" | "Deleted") {
                    continue;
                }
                let path = format!("/servers/{}", s.name);
                let resp = self.request(http::Method::DELETE, &path, None).await?;
                // 404 (or "status": "not_found"): already gone, which is the goal.
                let gone = resp.status == 404 || resp.text().contains("\"not_found\"");
                if resp.status >= 400 && !gone {
                    return Err(classify(
                        resp.status,
                        &format!("DELETE {path}: {}", resp.text()),
                    ));
                }
                tracing::info!(node = node_id, server = %s.name, "Seeweb server deleted");
            }
            Ok(())
        })
    }

    /// `POST /servers/{name}/actions {type: power_off}`: the server and its
    /// disk stay (Seeweb's plans have no spot).
    fn stop<'a>(
        &'a self,
        node_id: &'a str,
        _term: u64,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.power(node_id, "power_off"))
    }

    fn start(&self, req: LaunchRequest) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move { self.power(&req.node_id, "power_on").await })
    }

    fn check(&self) -> BoxFuture<'_, Result<String, ProviderError>> {
        Box::pin(async move {
            let held = self.servers().await?;
            Ok(format!(
                "token accepted by {}; {} servers held",
                self.base(),
                held.len()
            ))
        })
    }

    fn refresh_catalog(&self) -> BoxFuture<'_, Result<Vec<Offering>, ProviderError>> {
        Box::pin(self.fetch_catalog())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_labels_become_nembo_names() {
        for (label, name) in [
            ("H100 80GB", "H100"),
            ("H200 141GB", "H200"),
            ("A100 80GB", "A100-80GB"),
            ("L40s 48GB", "L40S"),
            ("L4 24GB", "L4"),
            ("RTX A6000 48GB", "A6000"),
            ("RTX PRO 6000 96GB", "RTXPRO6000"),
            ("A30", "A30"),
        ] {
            assert_eq!(gpu_name(label), name, "{label}");
        }
    }

    #[test]
    fn capacity_wording_is_a_capacity_error() {
        let e = classify(
            400,
            "Plan ECS1GPU8 not available in region it-fr2: lack of resources",
        );
        assert!(matches!(e, ProviderError::Capacity(_)));
        assert!(matches!(
            classify(401, "Invalid token"),
            ProviderError::Auth(_)
        ));
        assert!(matches!(
            classify(502, "bad gateway"),
            ProviderError::Transient(_)
        ));
        assert!(matches!(
            classify(400, "Field plan is required"),
            ProviderError::InvalidRequest(_)
        ));
    }
}
