//! AWS EC2 through its Query API, signed with SigV4 (object_store's
//! signer; no AWS SDK: it takes 8 minutes to build here). Instances are
//! tagged `nembo-cluster` (this cluster), `nembo-node` (the node: the
//! attempt, never reused) and `nembo-term` (the newest leader term that
//! acted on it, the fencing token). `ClientToken` = node id makes a
//! repeated RunInstances return the first instance instead of a second.
//!
//! Credentials: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`
//! (`AWS_SESSION_TOKEN`), else the profile (`aws.profile`, `AWS_PROFILE`,
//! `default`) in `~/.aws/credentials` (`AWS_SHARED_CREDENTIALS_FILE`). They
//! are read at each call, so fixing them needs no restart. Endpoint:
//! `aws.endpoint`, `AWS_ENDPOINT_URL_EC2`, `AWS_ENDPOINT_URL`, else
//! `https://ec2.<region>.amazonaws.com/`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;

use hyper::body::Bytes;
use nembo_domain::state::Offering;
use nembo_domain::task::PortRange;
use object_store::aws::{AwsAuthorizer, AwsCredential};
use serde::Deserialize;

use super::bootstrap::{Bootstrap, Start};
use super::http::{form_encode, HttpClient};
use super::{BoxFuture, Instance, LaunchRequest, Provider, ProviderError};

/// Settings from `aws:` in providers.yaml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsSettings {
    /// Regions to use (default: every region in the catalog).
    #[serde(default)]
    pub regions: Vec<String>,
    /// AMI for every region (default: the newest AWS Deep Learning Base
    /// AMI with NVIDIA drivers, looked up per region).
    pub image_id: Option<String>,
    /// EC2 key pair for SSH access, if wanted.
    pub key_name: Option<String>,
    /// Security groups (default: the VPC's default group). The agent only
    /// dials out, so it needs no inbound rule.
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    /// Credentials profile.
    pub profile: Option<String>,
    /// EC2 endpoint for every region (tests, private endpoints).
    pub endpoint: Option<String>,
}

/// Name pattern of the default AMI.
const DEFAULT_AMI_NAME: &str = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)*";
const API_VERSION: &str = "2016-11-15";
/// The largest gp3 / io2 root volume, GB (16 TiB).
const EBS_GB_MAX: u64 = 16_384;

/// The EC2 provider.
pub struct AwsProvider {
    settings: AwsSettings,
    cluster: String,
    http: HttpClient,
    offerings: Vec<Offering>,
    regions: Vec<String>,
    bootstrap: Bootstrap,
    /// Per region: AMI, zone ID → zone name. Filled on first use.
    region_cache: Mutex<HashMap<String, RegionInfo>>,
    /// Node → region, for nodes launched by this process.
    node_regions: Mutex<HashMap<String, String>>,
}

#[derive(Clone, Default)]
struct RegionInfo {
    image_id: Option<String>,
    zone_names: Option<HashMap<String, String>>,
}

impl AwsProvider {
    /// A provider for `cluster` (its tag value) offering `catalog` rows of
    /// the configured regions.
    pub fn new(
        settings: AwsSettings,
        cluster: String,
        catalog: Vec<Offering>,
        bootstrap: Bootstrap,
    ) -> Self {
        let offerings: Vec<Offering> = catalog
            .into_iter()
            .filter(|o| settings.regions.is_empty() || settings.regions.contains(&o.region))
            // The root volume is sized and typed at launch (BlockDeviceMappings);
            // a task's ports get a security group of the node's own.
            .map(|o| Offering {
                disk_gb_max: Some(EBS_GB_MAX),
                opens_ports: true,
                ports_per_node: true,
                // `image_id`: an AMI per region, or one for all.
                custom_images: true,
                can_stop: true,
                ..o
            })
            .collect();
        let mut regions: Vec<String> = if settings.regions.is_empty() {
            offerings.iter().map(|o| o.region.clone()).collect()
        } else {
            settings.regions.clone()
        };
        regions.sort();
        regions.dedup();
        Self {
            settings,
            cluster,
            http: HttpClient::default(),
            offerings,
            regions,
            bootstrap,
            region_cache: Mutex::new(HashMap::new()),
            node_regions: Mutex::new(HashMap::new()),
        }
    }

    fn endpoint(&self, region: &str) -> String {
        self.settings
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL_EC2").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| format!("https://ec2.{region}.amazonaws.com/"))
    }

    /// One signed Query API call; the parsed answer, or the error classed.
    async fn call(
        &self,
        region: &str,
        action: &str,
        params: Vec<(String, String)>,
    ) -> Result<Element, ProviderError> {
        let mut all = vec![
            ("Action".to_string(), action.to_string()),
            ("Version".to_string(), API_VERSION.to_string()),
        ];
        all.extend(params);
        let body = form_encode(&all);
        let credential = credentials(self.settings.profile.as_deref())?;
        let mut req: object_store::client::HttpRequest = http::Request::builder()
            .method(http::Method::POST)
            .uri(self.endpoint(region))
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .body(body.clone().into())
            .map_err(|e| ProviderError::InvalidRequest(format!("endpoint: {e}")))?;
        AwsAuthorizer::new(&credential, "ec2", region)
            .try_authorize(&mut req, None)
            .map_err(|e| ProviderError::Auth(format!("signing: {e}")))?;
        let (parts, _) = req.into_parts();
        let resp = self
            .http
            .send(http::Request::from_parts(parts, Bytes::from(body)))
            .await?;
        let text = resp.text();
        let xml = Element::parse(&text);
        if resp.status < 400 {
            return xml.map_err(|e| {
                ProviderError::Transient(format!("{action} in {region}: unreadable answer: {e}"))
            });
        }
        // EC2 answers <Response><Errors><Error>, moto <ErrorResponse>: find it anywhere.
        let (code, message) = xml
            .ok()
            .and_then(|x| {
                let e = x.find("Error")?;
                Some((
                    e.text_at(&["Code"]).unwrap_or_default().to_string(),
                    e.text_at(&["Message"]).unwrap_or_default().to_string(),
                ))
            })
            .unwrap_or_else(|| (String::new(), text.chars().take(300).collect()));
        Err(classify(
            resp.status,
            &code,
            &format!("{action} in {region}: {code}: {message}"),
        ))
    }

    /// Instances of this cluster in `region`, optionally of one node.
    async fn describe_in(
        &self,
        region: &str,
        node_id: Option<&str>,
    ) -> Result<Vec<Ec2Instance>, ProviderError> {
        let mut found = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut params = vec![
                ("Filter.1.Name".into(), "tag:nembo-cluster".into()),
                ("Filter.1.Value.1".into(), self.cluster.clone()),
            ];
            if let Some(node) = node_id {
                params.push(("Filter.2.Name".into(), "tag:nembo-node".into()));
                params.push(("Filter.2.Value.1".into(), node.to_string()));
            }
            if let Some(token) = &next {
                params.push(("NextToken".into(), token.clone()));
            }
            let xml = self.call(region, "DescribeInstances", params).await?;
            for item in xml.find_all("instancesSet") {
                for i in item.children_named("item") {
                    found.push(Ec2Instance::from_xml(i));
                }
            }
            next = xml
                .text_at(&["nextToken"])
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            if next.is_none() {
                return Ok(found);
            }
        }
    }

    /// The group opening `ports` on `node_id`, made (or found, on a retried
    /// launch) and tagged as the node's.
    async fn ports_group(
        &self,
        region: &str,
        node_id: &str,
        ports: &[PortRange],
    ) -> Result<String, ProviderError> {
        let name = port_group_name(&self.cluster, node_id);
        let mut create = vec![
            ("GroupName".to_string(), name.clone()),
            (
                "GroupDescription".to_string(),
                format!("Nembo: the ports of node {node_id}"),
            ),
            (
                "TagSpecification.1.ResourceType".to_string(),
                "security-group".to_string(),
            ),
        ];
        for (n, (k, v)) in [
            ("nembo-cluster", &self.cluster),
            ("nembo-node", &node_id.to_string()),
        ]
        .iter()
        .enumerate()
        {
            create.push((
                format!("TagSpecification.1.Tag.{}.Key", n + 1),
                k.to_string(),
            ));
            create.push((
                format!("TagSpecification.1.Tag.{}.Value", n + 1),
                v.to_string(),
            ));
        }
        let id = match self.call(region, "CreateSecurityGroup", create).await {
            Ok(xml) => xml.text_at(&["groupId"]).unwrap_or_default().to_string(),
            Err(e) if has_code(&e, "InvalidGroup.Duplicate") => self
                .groups(region, "group-name", &name)
                .await?
                .into_iter()
                .next()
                .map(|(id, _)| id)
                .unwrap_or_default(),
            Err(e) => return Err(e),
        };
        if id.is_empty() {
            return Err(ProviderError::Transient(format!(
                "CreateSecurityGroup in {region}: no group id for {name}"
            )));
        }
        let mut rules = vec![("GroupId".to_string(), id.clone())];
        for (n, r) in ports.iter().enumerate() {
            let k = |f: &str| format!("IpPermissions.{}.{f}", n + 1);
            rules.push((k("IpProtocol"), "tcp".into()));
            rules.push((k("FromPort"), r.start.to_string()));
            rules.push((k("ToPort"), r.end.to_string()));
            rules.push((k("IpRanges.1.CidrIp"), "0.0.0.0/0".into()));
        }
        match self
            .call(region, "AuthorizeSecurityGroupIngress", rules)
            .await
        {
            Ok(_) => {}
            Err(e) if has_code(&e, "InvalidPermission.Duplicate") => {}
            Err(e) => return Err(e),
        }
        tracing::info!(node = node_id, region, group = %id, ports = ?ports, "EC2 security group for the node's ports");
        Ok(id)
    }

    /// The default VPC's `default` group.
    async fn default_group(&self, region: &str) -> Result<String, ProviderError> {
        self.groups(region, "group-name", "default")
            .await?
            .into_iter()
            .next()
            .map(|(id, _)| id)
            .ok_or_else(|| {
                ProviderError::InvalidRequest(format!(
                    "{region} has no default security group; name one in providers.yaml \
                     (aws.security_group_ids)"
                ))
            })
    }

    /// Groups matching one filter: (id, the `nembo-node` tag).
    async fn groups(
        &self,
        region: &str,
        filter: &str,
        value: &str,
    ) -> Result<Vec<(String, Option<String>)>, ProviderError> {
        let xml = self
            .call(
                region,
                "DescribeSecurityGroups",
                vec![
                    ("Filter.1.Name".into(), filter.into()),
                    ("Filter.1.Value.1".into(), value.into()),
                ],
            )
            .await?;
        let mut out = Vec::new();
        for set in xml.find_all("securityGroupInfo") {
            for g in set.children_named("item") {
                let id = g.text_at(&["groupId"]).unwrap_or_default().to_string();
                let node = g
                    .child("tagSet")
                    .into_iter()
                    .flat_map(|t| t.children_named("item"))
                    .find(|t| t.text_at(&["key"]) == Some("nembo-node"))
                    .and_then(|t| t.text_at(&["value"]))
                    .map(str::to_string);
                out.push((id, node));
            }
        }
        Ok(out)
    }

    /// Deletes this cluster's port groups whose node has no live instance
    /// left. A group is held until its instance is gone (EC2 answers
    /// DependencyViolation meanwhile), so each termination also sweeps what
    /// earlier ones could not yet delete.
    async fn sweep_port_groups(&self, region: &str) {
        let (Ok(groups), Ok(instances)) = (
            self.groups(region, "tag:nembo-cluster", &self.cluster)
                .await,
            self.describe_in(region, None).await,
        ) else {
            return;
        };
        for (id, node) in groups {
            let Some(node) = node else { continue };
            if instances
                .iter()
                .any(|i| i.live() && i.node_id.as_deref() == Some(node.as_str()))
            {
                continue;
            }
            match self
                .call(
                    region,
                    "DeleteSecurityGroup",
                    vec![("GroupId".into(), id.clone())],
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(node = %node, region, group = %id, "EC2 security group deleted")
                }
                Err(e) if has_code(&e, "DependencyViolation") => {}
                Err(e) => tracing::warn!(group = %id, error = %e, "EC2 security group not deleted"),
            }
        }
    }

    async fn region_info(&self, region: &str) -> Result<RegionInfo, ProviderError> {
        let cached = self
            .region_cache
            .lock()
            .expect("region cache")
            .get(region)
            .cloned()
            .unwrap_or_default();
        if cached.zone_names.is_some()
            && (cached.image_id.is_some() || self.settings.image_id.is_some())
        {
            return Ok(cached);
        }
        let zones = self
            .call(region, "DescribeAvailabilityZones", Vec::new())
            .await?;
        let zone_names: HashMap<String, String> = zones
            .find_all("item")
            .into_iter()
            .filter_map(|z| {
                Some((
                    z.text_at(&["zoneId"])?.to_string(),
                    z.text_at(&["zoneName"])?.to_string(),
                ))
            })
            .collect();
        let image_id = match &self.settings.image_id {
            Some(id) => Some(id.clone()),
            None => Some(self.newest_default_ami(region).await?),
        };
        let info = RegionInfo {
            image_id,
            zone_names: Some(zone_names),
        };
        self.region_cache
            .lock()
            .expect("region cache")
            .insert(region.to_string(), info.clone());
        Ok(info)
    }

    async fn newest_default_ami(&self, region: &str) -> Result<String, ProviderError> {
        let xml = self
            .call(
                region,
                "DescribeImages",
                vec![
                    ("Owner.1".into(), "amazon".into()),
                    ("Filter.1.Name".into(), "name".into()),
                    ("Filter.1.Value.1".into(), DEFAULT_AMI_NAME.into()),
                    ("Filter.2.Name".into(), "state".into()),
                    ("Filter.2.Value.1".into(), "available".into()),
                ],
            )
            .await?;
        xml.find_all("item")
            .into_iter()
            .filter_map(|i| {
                Some((
                    i.text_at(&["creationDate"]).unwrap_or_default(),
                    i.text_at(&["imageId"])?,
                ))
            })
            .max()
            .map(|(_, id)| id.to_string())
            .ok_or_else(|| {
                ProviderError::InvalidRequest(format!(
                    "no AMI named '{DEFAULT_AMI_NAME}' in {region}; set aws.image_id"
                ))
            })
    }

    /// The root device of `image` (`/dev/sda1` on Ubuntu AMIs), whose
    /// volume `disk_size` and `disk_tier` size and type.
    async fn root_device(&self, region: &str, image: &str) -> Result<String, ProviderError> {
        let xml = self
            .call(
                region,
                "DescribeImages",
                vec![("ImageId.1".into(), image.to_string())],
            )
            .await?;
        Ok(xml
            .find_all("item")
            .into_iter()
            .find_map(|i| i.text_at(&["rootDeviceName"]).map(str::to_string))
            .unwrap_or_else(|| "/dev/sda1".into()))
    }

    /// Refuses a leader older than the newest that tagged these instances.
    /// The instances tagged with the request's node in its region, once the
    /// region is remembered for the node and no newer leader has acted on
    /// them (launch and start both begin here).
    async fn instances_for(&self, req: &LaunchRequest) -> Result<Vec<Ec2Instance>, ProviderError> {
        self.node_regions
            .lock()
            .expect("node regions")
            .insert(req.node_id.clone(), req.region.clone());
        let found = self.describe_in(&req.region, Some(&req.node_id)).await?;
        Self::fence(&found, req.term)?;
        Ok(found)
    }

    /// Tags `instances` with the acting leader's term (the fence a later
    /// call checks), then calls `action` (StopInstances, StartInstances,
    /// TerminateInstances) on them.
    async fn act(
        &self,
        region: &str,
        action: &str,
        instances: &[&Ec2Instance],
        term: u64,
    ) -> Result<(), ProviderError> {
        let mut tag = Vec::new();
        let mut ids = Vec::new();
        for (n, i) in instances.iter().enumerate() {
            tag.push((format!("ResourceId.{}", n + 1), i.id.clone()));
            ids.push((format!("InstanceId.{}", n + 1), i.id.clone()));
        }
        tag.push(("Tag.1.Key".into(), "nembo-term".into()));
        tag.push(("Tag.1.Value".into(), term.to_string()));
        self.call(region, "CreateTags", tag).await?;
        self.call(region, action, ids).await?;
        Ok(())
    }

    fn fence(instances: &[Ec2Instance], term: u64) -> Result<(), ProviderError> {
        match instances.iter().filter_map(|i| i.term).max() {
            Some(newest) if newest > term => Err(ProviderError::Fenced(format!(
                "a leader of term {newest} has acted on this node; this call is from term {term}"
            ))),
            _ => Ok(()),
        }
    }

    fn regions_of(&self, node_id: &str) -> Vec<String> {
        match self.node_regions.lock().expect("node regions").get(node_id) {
            Some(r) => vec![r.clone()],
            None => self.regions.clone(),
        }
    }
}

impl Provider for AwsProvider {
    fn name(&self) -> &str {
        "aws"
    }

    fn offerings(&self) -> Vec<Offering> {
        self.offerings.clone()
    }

    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<String, ProviderError>> {
        Box::pin(async move {
            let region = req.region.as_str();
            let existing = self.instances_for(&req).await?;
            if let Some(i) = existing.iter().find(|i| i.live()) {
                return Ok(i.id.clone());
            }
            let info = self.region_info(region).await?;
            // The task's own image, else the configured or newest default AMI.
            let image = req
                .image_id
                .clone()
                .or_else(|| info.image_id.clone())
                .unwrap_or_default();
            let mut p: Vec<(String, String)> = vec![
                ("ImageId".into(), image.clone()),
                ("InstanceType".into(), req.instance_type.clone()),
                ("MinCount".into(), "1".into()),
                ("MaxCount".into(), "1".into()),
                // Idempotency: a retried call returns the first instance.
                (
                    "ClientToken".into(),
                    client_token(&self.cluster, &req.node_id),
                ),
                (
                    "UserData".into(),
                    base64(self.bootstrap.script(&req, Start::Now).as_bytes()),
                ),
                (
                    "InstanceInitiatedShutdownBehavior".into(),
                    "terminate".into(),
                ),
                ("TagSpecification.1.ResourceType".into(), "instance".into()),
            ];
            let tags = [
                ("nembo-cluster", self.cluster.clone()),
                ("nembo-node", req.node_id.clone()),
                ("nembo-term", req.term.to_string()),
                ("Name", format!("nembo-{}", req.node_id)),
            ];
            for (n, (k, v)) in tags.iter().enumerate() {
                p.push((
                    format!("TagSpecification.1.Tag.{}.Key", n + 1),
                    k.to_string(),
                ));
                p.push((format!("TagSpecification.1.Tag.{}.Value", n + 1), v.clone()));
            }
            if req.disk_gb.is_some() || req.disk_tier.is_some() {
                let root = self.root_device(region, &image).await?;
                p.extend(block_device(&root, req.disk_gb, req.disk_tier));
            }
            if let Some(zone) = &req.zone {
                let name = info
                    .zone_names
                    .as_ref()
                    .and_then(|z| z.get(zone))
                    .cloned()
                    // A zone name (us-east-1a) is taken as it is.
                    .unwrap_or_else(|| zone.clone());
                p.push(("Placement.AvailabilityZone".into(), name));
            }
            if req.spot {
                p.push(("InstanceMarketOptions.MarketType".into(), "spot".into()));
                p.push((
                    "InstanceMarketOptions.SpotOptions.SpotInstanceType".into(),
                    "one-time".into(),
                ));
                p.push((
                    "InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior".into(),
                    "terminate".into(),
                ));
            }
            if let Some(key) = &self.settings.key_name {
                p.push(("KeyName".into(), key.clone()));
            }
            let mut groups = self.settings.security_group_ids.clone();
            if !req.ports.is_empty() {
                // The VPC's default group keeps what a node has without
                // ports (its peers, egress); the node's own opens the ports.
                if groups.is_empty() {
                    groups.push(self.default_group(region).await?);
                }
                groups.push(self.ports_group(region, &req.node_id, &req.ports).await?);
            }
            for (n, sg) in groups.iter().enumerate() {
                p.push((format!("SecurityGroupId.{}", n + 1), sg.clone()));
            }
            let xml = self.call(region, "RunInstances", p).await?;
            let id = xml
                .find("instancesSet")
                .and_then(|s| s.child("item"))
                .and_then(|i| i.text_at(&["instanceId"]))
                .ok_or_else(|| {
                    ProviderError::Transient("RunInstances answered no instance id".into())
                })?;
            tracing::info!(node = %req.node_id, instance = id, region, instance_type = %req.instance_type, spot = req.spot, "EC2 instance launched");
            Ok(id.to_string())
        })
    }

    fn describe<'a>(
        &'a self,
        node_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Instance>, ProviderError>> {
        Box::pin(async move {
            for region in self.regions_of(node_id) {
                let found = self.describe_in(&region, Some(node_id)).await?;
                // The live one if there is one, else the newest record of it.
                if let Some(i) = found.iter().find(|i| i.live()).or(found.last()) {
                    return Ok(Some(Instance {
                        instance_id: i.id.clone(),
                        node_id: node_id.to_string(),
                        live: i.live(),
                        state: i.state.clone(),
                    }));
                }
            }
            Ok(None)
        })
    }

    fn list_owned(&self) -> BoxFuture<'_, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move {
            let mut all = Vec::new();
            for region in &self.regions {
                // The leak reconciler's round also deletes the port groups
                // that a termination could not yet (their instance was
                // still shutting down).
                self.sweep_port_groups(region).await;
                for i in self.describe_in(region, None).await? {
                    if let Some(node_id) = i.node_id.clone() {
                        all.push(Instance {
                            live: i.live(),
                            instance_id: i.id,
                            node_id,
                            state: i.state,
                        });
                    }
                }
            }
            Ok(all)
        })
    }

    fn terminate<'a>(
        &'a self,
        node_id: &'a str,
        term: u64,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            for region in self.regions_of(node_id) {
                let found = self.describe_in(&region, Some(node_id)).await?;
                Self::fence(&found, term)?;
                let live: Vec<&Ec2Instance> = found.iter().filter(|i| i.live()).collect();
                if live.is_empty() {
                    continue;
                }
                self.act(&region, "TerminateInstances", &live, term).await?;
                tracing::info!(node = node_id, region = %region, instances = live.len(), "EC2 instances terminated");
                self.sweep_port_groups(&region).await;
            }
            Ok(())
        })
    }

    /// StopInstances, keeping the EBS volume (the offering says spot
    /// instances cannot: the state refuses to stop a spot node first).
    fn stop<'a>(&'a self, node_id: &'a str, term: u64) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            for region in self.regions_of(node_id) {
                let found = self.describe_in(&region, Some(node_id)).await?;
                Self::fence(&found, term)?;
                let running: Vec<&Ec2Instance> = found
                    .iter()
                    .filter(|i| i.live() && !matches!(i.state.as_str(), "stopping" | "stopped"))
                    .collect();
                if running.is_empty() {
                    continue;
                }
                self.act(&region, "StopInstances", &running, term).await?;
                tracing::info!(node = node_id, region = %region, "EC2 instance stopped");
            }
            Ok(())
        })
    }

    /// StartInstances on the node's stopped instance; its agent comes back
    /// with the identity on its disk.
    fn start(&self, req: LaunchRequest) -> BoxFuture<'_, Result<(), ProviderError>> {
        Box::pin(async move {
            let region = req.region.as_str();
            let found = self.instances_for(&req).await?;
            let live: Vec<&Ec2Instance> = found.iter().filter(|i| i.live()).collect();
            if live.is_empty() {
                return Err(ProviderError::InvalidRequest(format!(
                    "node {}: its instance is gone",
                    req.node_id
                )));
            }
            let stopped: Vec<&Ec2Instance> = live
                .into_iter()
                .filter(|i| i.state != "running" && i.state != "pending")
                .collect();
            if !stopped.is_empty() {
                self.act(region, "StartInstances", &stopped, req.term)
                    .await?;
                tracing::info!(node = %req.node_id, region, "EC2 instance started");
            }
            Ok(())
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<String, ProviderError>> {
        Box::pin(async move {
            let region = self.regions.first().cloned().ok_or_else(|| {
                ProviderError::InvalidRequest("no regions configured or in the catalog".into())
            })?;
            let held = self.describe_in(&region, None).await?;
            let live = held.iter().filter(|i| i.live()).count();
            Ok(format!(
                "credentials accepted by {}; {live} instances held in {region}; regions: {}",
                self.endpoint(&region),
                self.regions.join(", ")
            ))
        })
    }
}

/// The EC2 error code inside a classified error (its message holds
/// `Action in region: Code: message`).
fn has_code(e: &ProviderError, code: &str) -> bool {
    e.to_string().contains(&format!(": {code}: "))
}

/// A node's port group: unique in the account's region (≤ 255 characters).
fn port_group_name(cluster: &str, node_id: &str) -> String {
    format!("nembo-{cluster}-{node_id}-ports")
        .chars()
        .take(255)
        .collect()
}

/// `ClientToken`s are unique per account and region for a while, so the
/// cluster is part of it (≤ 64 ASCII characters).
fn client_token(cluster: &str, node_id: &str) -> String {
    format!("{cluster}-{node_id}").chars().take(64).collect()
}

/// RunInstances parameters for the root volume, as SkyPilot maps
/// `disk_tier` on AWS: low = standard (magnetic), medium = gp3 at 3500
/// IOPS and 218 MB/s, high = gp3 at 7000 IOPS and 437 MB/s, ultra and best
/// = io2 at 20 000 IOPS. The size defaults to SkyPilot's 256 GB.
fn block_device(
    root: &str,
    gb: Option<u64>,
    tier: Option<nembo_domain::task::DiskTier>,
) -> Vec<(String, String)> {
    use nembo_domain::task::DiskTier;
    let key = |k: &str| format!("BlockDeviceMapping.1.{k}");
    let mut p = vec![
        (key("DeviceName"), root.to_string()),
        (key("Ebs.VolumeSize"), gb.unwrap_or(256).to_string()),
        (key("Ebs.DeleteOnTermination"), "true".into()),
    ];
    let (kind, iops, throughput) = match tier.unwrap_or(DiskTier::Medium) {
        DiskTier::Low => ("standard", None, None),
        DiskTier::Medium => ("gp3", Some(3500), Some(218)),
        DiskTier::High => ("gp3", Some(7000), Some(437)),
        DiskTier::Ultra | DiskTier::Best => ("io2", Some(20_000), None),
    };
    p.push((key("Ebs.VolumeType"), kind.into()));
    if let Some(i) = iops {
        p.push((key("Ebs.Iops"), i.to_string()));
    }
    if let Some(t) = throughput {
        p.push((key("Ebs.Throughput"), t.to_string()));
    }
    p
}

/// Error codes by what the provisioner should do.
fn classify(status: u16, code: &str, message: &str) -> ProviderError {
    let m = message.to_string();
    match code {
        "InsufficientInstanceCapacity"
        | "InsufficientHostCapacity"
        | "InsufficientReservedInstanceCapacity"
        | "InsufficientCapacity"
        | "SpotMaxPriceTooLow"
        | "Unsupported" => ProviderError::Capacity(m),
        "InstanceLimitExceeded"
        | "VcpuLimitExceeded"
        | "MaxSpotInstanceCountExceeded"
        | "InsufficientFreeAddressesInSubnet" => ProviderError::Quota(m),
        "AuthFailure"
        | "UnauthorizedOperation"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "MissingAuthenticationToken"
        | "OptInRequired"
        | "Blocked" => ProviderError::Auth(m),
        "RequestLimitExceeded"
        | "Throttling"
        | "InternalError"
        | "ServiceUnavailable"
        | "Unavailable" => ProviderError::Transient(m),
        _ if status >= 500 => ProviderError::Transient(m),
        _ if status == 401 || status == 403 => ProviderError::Auth(m),
        _ => ProviderError::InvalidRequest(m),
    }
}

struct Ec2Instance {
    id: String,
    state: String,
    node_id: Option<String>,
    term: Option<u64>,
}

impl Ec2Instance {
    fn from_xml(item: &Element) -> Self {
        let tags: BTreeMap<&str, &str> = item
            .child("tagSet")
            .map(|t| {
                t.children_named("item")
                    .filter_map(|i| Some((i.text_at(&["key"])?, i.text_at(&["value"])?)))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            id: item
                .text_at(&["instanceId"])
                .unwrap_or_default()
                .to_string(),
            state: item
                .text_at(&["instanceState", "name"])
                .unwrap_or_default()
                .to_string(),
            node_id: tags.get("nembo-node").map(|s| s.to_string()),
            term: tags.get("nembo-term").and_then(|t| t.parse().ok()),
        }
    }

    /// Costs money or may again: anything but going or gone.
    fn live(&self) -> bool {
        !matches!(self.state.as_str(), "shutting-down" | "terminated")
    }
}

fn credentials(profile: Option<&str>) -> Result<AwsCredential, ProviderError> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(key_id), Some(secret_key)) =
        (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
    {
        return Ok(AwsCredential {
            key_id,
            secret_key,
            token: env("AWS_SESSION_TOKEN"),
        });
    }
    let path = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")))
        .ok_or_else(|| ProviderError::Auth("no AWS credentials: HOME is not set".into()))?;
    let profile = profile
        .map(str::to_string)
        .or_else(|| env("AWS_PROFILE"))
        .unwrap_or_else(|| "default".into());
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ProviderError::Auth(format!(
            "no AWS credentials: AWS_ACCESS_KEY_ID is not set and {}: {e}",
            path.display()
        ))
    })?;
    let section = ini_section(&text, &profile);
    match (
        section.get("aws_access_key_id"),
        section.get("aws_secret_access_key"),
    ) {
        (Some(k), Some(s)) => Ok(AwsCredential {
            key_id: k.clone(),
            secret_key: s.clone(),
            token: section.get("aws_session_token").cloned(),
        }),
        _ => Err(ProviderError::Auth(format!(
            "profile [{profile}] in {} has no aws_access_key_id and aws_secret_access_key",
            path.display()
        ))),
    }
}

/// The `key = value` pairs of `[name]` in an INI file.
fn ini_section(text: &str, name: &str) -> HashMap<String, String> {
    let mut inside = false;
    let mut out = HashMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') && line.ends_with(']') {
            inside = line[1..line.len() - 1].trim() == name;
        } else if inside && !line.starts_with('#') && !line.starts_with(';') {
            if let Some((k, v)) = line.split_once('=') {
                out.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
    }
    out
}

fn base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// An XML element, read whole: EC2's answers are small.
#[derive(Debug, Default)]
pub struct Element {
    name: String,
    text: String,
    children: Vec<Element>,
}

impl Element {
    /// Parses a document into its root element.
    pub fn parse(text: &str) -> Result<Element, String> {
        use quick_xml::events::Event;
        let mut reader = quick_xml::Reader::from_str(text);
        let mut stack: Vec<Element> = vec![Element::default()];
        loop {
            match reader.read_event().map_err(|e| e.to_string())? {
                Event::Start(s) => stack.push(Element {
                    name: String::from_utf8_lossy(s.local_name().as_ref()).into_owned(),
                    ..Element::default()
                }),
                Event::Empty(s) => {
                    let e = Element {
                        name: String::from_utf8_lossy(s.local_name().as_ref()).into_owned(),
                        ..Element::default()
                    };
                    stack.last_mut().expect("root").children.push(e);
                }
                Event::End(_) => {
                    let done = stack.pop().expect("balanced");
                    stack
                        .last_mut()
                        .ok_or("unbalanced end tag")?
                        .children
                        .push(done);
                }
                Event::Text(t) => {
                    let s = t.decode().map_err(|e| e.to_string())?;
                    stack.last_mut().expect("root").text.push_str(&s);
                }
                Event::CData(t) => {
                    let s = t.decode().map_err(|e| e.to_string())?;
                    stack.last_mut().expect("root").text.push_str(&s);
                }
                Event::GeneralRef(r) => {
                    let c = match r.resolve_char_ref().map_err(|e| e.to_string())? {
                        Some(c) => c,
                        None => match r.decode().map_err(|e| e.to_string())?.as_ref() {
                            "lt" => '<',
                            "gt" => '>',
                            "amp" => '&',
                            "quot" => '"',
                            "apos" => '\'',
                            other => return Err(format!("unknown entity &{other};")),
                        },
                    };
                    stack.last_mut().expect("root").text.push(c);
                }
                Event::Eof => break,
                _ => {}
            }
        }
        let mut doc = stack.pop().ok_or("empty document")?;
        if !stack.is_empty() {
            return Err("unclosed element".into());
        }
        doc.children.pop().ok_or_else(|| "no root element".into())
    }

    /// The first child called `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child called `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The trimmed text at a path of child names.
    pub fn text_at(&self, path: &[&str]) -> Option<&str> {
        let mut e = self;
        for p in path {
            e = e.child(p)?;
        }
        Some(e.text.trim())
    }

    /// The first element called `name`, this one or below, depth first.
    pub fn find(&self, name: &str) -> Option<&Element> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name))
    }

    /// Every element called `name` below this one, not below a match.
    pub fn find_all(&self, name: &str) -> Vec<&Element> {
        let mut out = Vec::new();
        for c in &self.children {
            if c.name == name {
                out.push(c);
            } else {
                out.extend(c.find_all(name));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn disk_tiers_map_to_ebs_volumes_as_skypilot_maps_them() {
        use nembo_domain::task::DiskTier;
        let get = |p: &[(String, String)], k: &str| {
            p.iter()
                .find(|(n, _)| n == &format!("BlockDeviceMapping.1.{k}"))
                .map(|(_, v)| v.clone())
        };
        let high = block_device("/dev/sda1", Some(512), Some(DiskTier::High));
        assert_eq!(get(&high, "DeviceName").as_deref(), Some("/dev/sda1"));
        assert_eq!(get(&high, "Ebs.VolumeSize").as_deref(), Some("512"));
        assert_eq!(get(&high, "Ebs.VolumeType").as_deref(), Some("gp3"));
        assert_eq!(get(&high, "Ebs.Iops").as_deref(), Some("7000"));
        assert_eq!(get(&high, "Ebs.Throughput").as_deref(), Some("437"));
        let default = block_device("/dev/xvda", None, None);
        assert_eq!(get(&default, "Ebs.VolumeSize").as_deref(), Some("256"));
        assert_eq!(get(&default, "Ebs.Iops").as_deref(), Some("3500"));
        let best = block_device("/dev/sda1", Some(100), Some(DiskTier::Best));
        assert_eq!(get(&best, "Ebs.VolumeType").as_deref(), Some("io2"));
        assert_eq!(get(&best, "Ebs.Throughput"), None);
        let low = block_device("/dev/sda1", Some(100), Some(DiskTier::Low));
        assert_eq!(get(&low, "Ebs.VolumeType").as_deref(), Some("standard"));
        assert_eq!(get(&low, "Ebs.Iops"), None);
    }

    use super::*;

    #[test]
    fn both_error_envelopes_are_read_and_classed() {
        let ec2 = r#"<?xml version="1.0" encoding="UTF-8"?>
<Response><Errors><Error><Code>InsufficientInstanceCapacity</Code><Message>We currently do not have sufficient p5.48xlarge capacity in the Availability Zone you requested (us-east-1a).</Message></Error></Errors><RequestID>x</RequestID></Response>"#;
        let x = Element::parse(ec2).unwrap();
        let e = x.find("Error").unwrap();
        assert_eq!(e.text_at(&["Code"]), Some("InsufficientInstanceCapacity"));
        let moto = "<ErrorResponse><Errors><Error><Code>AuthFailure</Code><Message>a &amp; b &#39;c&#39;</Message></Error></Errors></ErrorResponse>";
        let x = Element::parse(moto).unwrap();
        assert_eq!(
            x.find("Error").unwrap().text_at(&["Message"]),
            Some("a & b 'c'")
        );
        assert!(matches!(
            classify(400, "InsufficientInstanceCapacity", ""),
            ProviderError::Capacity(_)
        ));
        assert!(matches!(
            classify(400, "VcpuLimitExceeded", ""),
            ProviderError::Quota(_)
        ));
        assert!(matches!(
            classify(401, "AuthFailure", ""),
            ProviderError::Auth(_)
        ));
        assert!(matches!(classify(503, "", ""), ProviderError::Transient(_)));
        assert!(matches!(
            classify(400, "InvalidAMIID.Malformed", ""),
            ProviderError::InvalidRequest(_)
        ));
    }

    #[test]
    fn base64_and_ini_profiles() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        let ini = "[default]\naws_access_key_id = A\n[prod]\n aws_access_key_id=B \naws_secret_access_key = S\n";
        assert_eq!(ini_section(ini, "prod")["aws_access_key_id"], "B");
        assert_eq!(
            ini_section(ini, "default").get("aws_secret_access_key"),
            None
        );
    }
}
