//! Mapping between the domain model and the wire types.

use std::collections::BTreeMap;

use nembo_domain::access::Role;
use nembo_domain::state::{self as st, Job, JobState, Node, NodeState, Resources};
use nembo_domain::task::{
    self, container_image, Accelerator, DiskTier, Infra, Memory, PortRange, Quantity,
    RecoveryStrategy, ResourceCandidate, ResourceRequest, SpecError, TaskSpec,
};
use nembo_proto::clock::{duration, millis, timestamp};
use nembo_proto::v1 as pb;

/// Wire job state.
pub fn job_state(s: JobState) -> pb::JobState {
    match s {
        JobState::Pending => pb::JobState::Pending,
        JobState::Provisioning => pb::JobState::Provisioning,
        JobState::Starting => pb::JobState::Starting,
        JobState::Running => pb::JobState::Running,
        JobState::Recovering => pb::JobState::Recovering,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::FailedSetup => pb::JobState::FailedSetup,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn node_state(s: NodeState) -> pb::NodeState {
    match s {
        NodeState::Provisioning => pb::NodeState::Provisioning,
        NodeState::Ready => pb::NodeState::Ready,
        NodeState::Lost => pb::NodeState::Lost,
        NodeState::Terminating => pb::NodeState::Terminating,
        NodeState::Terminated => pb::NodeState::Terminated,
        NodeState::Failed => pb::NodeState::Failed,
        NodeState::Stopping => pb::NodeState::Stopping,
        NodeState::Stopped => pb::NodeState::Stopped,
        NodeState::Starting => pb::NodeState::Starting,
    }
}

/// Wire resources.
pub fn resources(r: &Resources) -> pb::NodeResources {
    pb::NodeResources {
        accelerators: r.accelerators.clone(),
        cpus: r.cpus,
        memory_gb: r.memory_gb,
    }
}

/// Wire task, secrets redacted.
pub fn spec_to_proto(spec: &TaskSpec) -> pb::TaskSpec {
    let s = spec.redacted();
    pb::TaskSpec {
        name: s.name.unwrap_or_default(),
        num_nodes: s.num_nodes,
        workdir: s.workdir.unwrap_or_default(),
        setup: s.setup.unwrap_or_default(),
        run: s.run.unwrap_or_default(),
        envs: s.envs,
        secrets: s.secrets,
        resources: Some(pb::ResourceRequest {
            candidates: s
                .resources
                .candidates
                .iter()
                .map(|c| pb::ResourceCandidate {
                    infra: c.infra.to_string(),
                    accelerator: c
                        .accelerator
                        .as_ref()
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                    cpus: c.cpus.map(|q| q.to_string()).unwrap_or_default(),
                    memory: c.memory.map(|m| m.to_string()).unwrap_or_default(),
                    instance_type: c.instance_type.clone().unwrap_or_default(),
                    use_spot: c.use_spot,
                    ports: c.ports.iter().map(ToString::to_string).collect(),
                    disk_size_gb: c.disk_size_gb.unwrap_or_default(),
                    disk_tier: c
                        .disk_tier
                        .map(|t| t.as_str().to_string())
                        .unwrap_or_default(),
                    image_id: c.image_id.clone().into_iter().collect(),
                    docker_image: c.docker_image.clone().unwrap_or_default(),
                })
                .collect(),
            ordered: s.resources.ordered,
            labels: s.resources.labels,
        }),
        job_recovery: s.recovery.map(|r| pb::JobRecovery {
            strategy: match r.strategy {
                RecoveryStrategy::EagerNextRegion => pb::RecoveryStrategy::EagerNextRegion,
                RecoveryStrategy::Failover => pb::RecoveryStrategy::Failover,
                RecoveryStrategy::None => pb::RecoveryStrategy::None,
            } as i32,
            max_restarts_on_errors: r.max_restarts_on_errors,
            recover_on_exit_codes: r.recover_on_exit_codes,
        }),
        checkpoint: s.checkpoint.map(|c| pb::Checkpoint {
            store: c.store,
            path: c.path,
            interval: Some(duration(i64::from(c.interval_s) * 1000)),
            signal: c.signal,
        }),
    }
}

fn non_empty(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// A structured spec from the wire, validated; errors name `spec.…` paths.
pub fn spec_from_proto(
    p: &pb::TaskSpec,
    overrides: &BTreeMap<String, String>,
) -> Result<TaskSpec, SpecError> {
    let mut candidates = Vec::new();
    let res = p.resources.clone().unwrap_or_default();
    for (i, c) in res.candidates.iter().enumerate() {
        let path = |f: &str| format!("spec.resources.candidates[{i}].{f}");
        candidates.push(ResourceCandidate {
            infra: Infra::parse(&c.infra, &path("infra"))?,
            accelerator: non_empty(&c.accelerator)
                .map(|a| Accelerator::parse(&a, &path("accelerator")))
                .transpose()?,
            cpus: non_empty(&c.cpus)
                .map(|q| Quantity::parse(&q, &path("cpus")))
                .transpose()?,
            memory: non_empty(&c.memory)
                .map(|m| Memory::parse(&m, &path("memory")))
                .transpose()?,
            instance_type: non_empty(&c.instance_type),
            use_spot: c.use_spot,
            max_hourly_cost: None,
            ports: if c.ports.is_empty() {
                Vec::new()
            } else {
                let list = yaml_serde::Value::Sequence(
                    c.ports.iter().map(|p| p.as_str().into()).collect(),
                );
                PortRange::parse_all(&list, &path("ports"))?
            },
            disk_size_gb: (c.disk_size_gb > 0).then_some(c.disk_size_gb),
            disk_tier: non_empty(&c.disk_tier)
                .map(|t| DiskTier::parse(&t, &path("disk_tier")))
                .transpose()?,
            image_id: c
                .image_id
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            docker_image: non_empty(&c.docker_image)
                .map(|d| container_image(&d, &path("docker_image")))
                .transpose()?,
        });
    }
    if candidates.is_empty() {
        candidates.push(ResourceCandidate::default());
    }
    // As for YAML: an override of a declared env stays an env; a name the
    // task does not declare is kept as a secret.
    let mut envs = p.envs.clone();
    let mut secrets = p.secrets.clone();
    for (name, value) in overrides {
        if envs.contains_key(name) {
            envs.insert(name.clone(), value.clone());
        } else {
            secrets.insert(name.clone(), value.clone());
        }
    }
    let spec = TaskSpec {
        name: non_empty(&p.name),
        num_nodes: if p.num_nodes == 0 { 1 } else { p.num_nodes },
        workdir: non_empty(&p.workdir),
        workdir_manifest: None,
        workdir_git: None,
        file_mounts: Default::default(),
        docker_run_options: Vec::new(),
        autostop: None,
        priority: None,
        inputs: None,
        outputs: None,
        cluster: None,
        service: None,
        replica: None,
        setup: non_empty(&p.setup),
        run: non_empty(&p.run),
        envs,
        secrets,
        resources: ResourceRequest {
            candidates,
            ordered: res.ordered,
            labels: res.labels,
        },
        recovery: p
            .job_recovery
            .as_ref()
            .map(|r| {
                Ok::<_, SpecError>(task::JobRecovery {
                    strategy: match pb::RecoveryStrategy::try_from(r.strategy) {
                        Ok(
                            pb::RecoveryStrategy::Unspecified
                            | pb::RecoveryStrategy::EagerNextRegion,
                        ) => RecoveryStrategy::EagerNextRegion,
                        Ok(pb::RecoveryStrategy::Failover) => RecoveryStrategy::Failover,
                        Ok(pb::RecoveryStrategy::None) => RecoveryStrategy::None,
                        Err(_) => {
                            return Err(SpecError::new(
                                "spec.job_recovery.strategy",
                                format!("{} is not a RecoveryStrategy", r.strategy),
                            ))
                        }
                    },
                    max_restarts_on_errors: r.max_restarts_on_errors,
                    recover_on_exit_codes: r.recover_on_exit_codes.clone(),
                })
            })
            .transpose()?,
        checkpoint: p
            .checkpoint
            .as_ref()
            .map(|c| {
                Ok::<_, SpecError>(task::Checkpoint {
                    store: c.store.clone(),
                    path: c.path.clone(),
                    interval_s: checkpoint_interval_s(c.interval.as_ref())?,
                    signal: if c.signal.is_empty() {
                        "SIGUSR1".into()
                    } else {
                        c.signal.clone()
                    },
                })
            })
            .transpose()?,
        managed: false,
        keep_off_coordinator_user: false,
    };
    task::validate(&spec).map_err(|e| SpecError::new(format!("spec.{}", e.path), e.message))?;
    Ok(spec)
}

/// A checkpoint interval from the wire: whole seconds, at least 1 (default 60).
fn checkpoint_interval_s(d: Option<&nembo_proto::prost_types::Duration>) -> Result<u32, SpecError> {
    let Some(ms) = millis(d) else {
        return Ok(60);
    };
    if ms < 1000 || ms % 1000 != 0 || ms / 1000 > i64::from(u32::MAX) {
        return Err(SpecError::new(
            "spec.checkpoint.interval",
            format!("must be a whole number of seconds, at least 1 (got {ms} ms)"),
        ));
    }
    Ok((ms / 1000) as u32)
}

/// The summary of a job (ListJobs' basic view): no task, attempts,
/// provision tries or recovery events.
pub fn job_summary(job: &Job) -> pb::Job {
    let mut j = job_to_proto(job);
    j.spec = None;
    j.idempotency_key.clear();
    j.attempts.clear();
    j.provision_tries.clear();
    if let Some(m) = j.managed.as_mut() {
        m.events.clear();
    }
    j
}

/// Wire job, secrets redacted.
pub fn job_to_proto(job: &Job) -> pb::Job {
    let current = job.current_attempt();
    pb::Job {
        job_id: job.id.to_string(),
        name: job.name().to_string(),
        state: job_state(job.state) as i32,
        exit_code: job.exit_code,
        submit_time: timestamp(job.submitted_at_ms),
        start_time: job.started_at_ms.and_then(timestamp),
        end_time: job.ended_at_ms.and_then(timestamp),
        node_ids: current
            .map(|a| a.node_ids.clone())
            .unwrap_or_else(|| job.reserved_nodes.clone()),
        attempts: job
            .attempts
            .iter()
            .map(|a| pb::Attempt {
                attempt: a.number,
                node_ids: a.node_ids.clone(),
                state: job_state(a.state) as i32,
                exit_code: a.exit_code,
                start_time: a.started_at_ms.and_then(timestamp),
                end_time: a.ended_at_ms.and_then(timestamp),
                message: a.message.clone(),
            })
            .collect(),
        message: job.message.clone(),
        spec: Some(spec_to_proto(&job.spec)),
        idempotency_key: job.idempotency_key.clone().unwrap_or_default(),
        owner: job.owner.clone(),
        cluster: job
            .spec
            .cluster
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_default(),
        provision_tries: job
            .provision_tries
            .iter()
            .map(|t| pb::ProvisionTry {
                place: t.place.clone(),
                hourly_price: t.hourly_price,
                count: t.count,
                time: timestamp(t.at_ms),
                outcome: t.outcome.clone(),
            })
            .collect(),
        managed: job.managed.as_ref().map(|m| pb::ManagedInfo {
            recoveries: m.recoveries,
            restarts_on_errors: m.restarts_on_errors,
            notice_node_id: m
                .notice
                .as_ref()
                .map(|n| n.node_id.clone())
                .unwrap_or_default(),
            notice_deadline: m.notice.as_ref().and_then(|n| timestamp(n.deadline_ms)),
            events: m
                .events
                .iter()
                .map(|e| pb::JobEvent {
                    time: timestamp(e.at_ms),
                    what: e.what.clone(),
                })
                .collect(),
        }),
    }
}

/// Wire offering (catalog fields only).
pub fn offering_to_proto(o: &st::Offering) -> pb::Offering {
    let (accelerator, accelerator_count) = o
        .resources
        .accelerators
        .iter()
        .next()
        .map(|(k, n)| (k.clone(), *n))
        .unwrap_or_default();
    pb::Offering {
        provider: o.provider.clone(),
        region: o.region.clone(),
        zone: o.zone.clone().unwrap_or_default(),
        instance_type: o.instance_type.clone(),
        accelerator,
        accelerator_count,
        cpus: o.resources.cpus,
        memory_gb: o.resources.memory_gb,
        hourly_price: o.hourly_price,
        spot_price: o.spot_price,
        simulated: o.simulated,
        ..Default::default()
    }
}

/// Wire optimizer choice.
pub fn choice_to_proto(c: &nembo_domain::optimizer::Choice) -> pb::Offering {
    pb::Offering {
        spot: c.spot,
        node_price: c.node_price,
        hourly_cost: c.hourly_cost,
        egress_cost: c.egress_cost,
        candidate_index: c.candidate as u32,
        ..offering_to_proto(c.offering)
    }
}

/// Wire node.
pub fn node_to_proto(state: &st::State, node: &Node) -> pb::Node {
    pb::Node {
        node_id: node.id.clone(),
        state: node_state(node.state) as i32,
        provider: node.provider.clone(),
        region: node.region.clone(),
        instance_type: node.instance_type.clone(),
        resources: Some(resources(&node.resources)),
        free: Some(resources(&state.free_on(&node.id))),
        address: node.address.clone(),
        public_address: node.public_address.clone(),
        job_ids: state
            .jobs_on(&node.id)
            .iter()
            .map(|j| j.to_string())
            .collect(),
        create_time: timestamp(node.created_at_ms),
        message: node.message.clone(),
        hourly_price: node.hourly_price,
        unhealthy_reason: node.unhealthy.clone().unwrap_or_default(),
        instance_id: node.instance_id.clone().unwrap_or_default(),
        spot: node.spot,
        zone: node.zone.clone().unwrap_or_default(),
        revoke_time: node.revoked_at_ms.and_then(timestamp),
        simulated: node.simulated,
        cluster: node.cluster.clone().unwrap_or_default(),
    }
}

/// Wire role; `None` (an agent's enrollment in the audit trail) is ROLE_AGENT.
pub fn role(r: Option<Role>) -> pb::Role {
    match r {
        Some(Role::Viewer) => pb::Role::Viewer,
        Some(Role::User) => pb::Role::User,
        Some(Role::Admin) => pb::Role::Admin,
        None => pb::Role::Agent,
    }
}

/// A user's role from the wire; `None` for anything a user cannot have.
pub fn role_from_proto(v: i32) -> Option<Role> {
    match pb::Role::try_from(v).ok()? {
        pb::Role::Viewer => Some(Role::Viewer),
        pb::Role::User => Some(Role::User),
        pb::Role::Admin => Some(Role::Admin),
        pb::Role::Unspecified | pb::Role::Agent => None,
    }
}

/// Domain job state from the wire (for filters).
pub fn job_state_from_proto(v: i32) -> Option<JobState> {
    Some(match pb::JobState::try_from(v).ok()? {
        pb::JobState::Pending => JobState::Pending,
        pb::JobState::Provisioning => JobState::Provisioning,
        pb::JobState::Starting => JobState::Starting,
        pb::JobState::Running => JobState::Running,
        pb::JobState::Recovering => JobState::Recovering,
        pb::JobState::Succeeded => JobState::Succeeded,
        pb::JobState::Failed => JobState::Failed,
        pb::JobState::FailedSetup => JobState::FailedSetup,
        pb::JobState::Cancelled => JobState::Cancelled,
        pb::JobState::Unspecified => return None,
    })
}

/// Wire autostop setting; none: disabled.
pub fn autostop_to_proto(a: Option<&task::Autostop>) -> pb::AutostopSetting {
    match a {
        None => pb::AutostopSetting {
            disabled: true,
            ..Default::default()
        },
        Some(a) => pb::AutostopSetting {
            disabled: false,
            idle_seconds: a.idle_s,
            down: a.down,
            wait_for: a.wait_for.as_str().into(),
        },
    }
}

/// The autostop a request asks for, checked.
pub fn autostop_from_proto(
    a: &pb::AutostopSetting,
    path: &str,
) -> Result<task::AutostopSetting, SpecError> {
    if a.disabled {
        return Ok(task::AutostopSetting::Off);
    }
    let wait_for = if a.wait_for.is_empty() {
        task::WaitFor::default()
    } else {
        task::WaitFor::parse(&a.wait_for).ok_or_else(|| {
            SpecError::new(
                format!("{path}.wait_for"),
                format!("expected jobs_and_ssh, jobs or none, got '{}'", a.wait_for),
            )
        })?
    };
    if a.idle_seconds > 366 * 86_400 {
        return Err(SpecError::new(
            format!("{path}.idle_seconds"),
            "at most a year",
        ));
    }
    Ok(task::AutostopSetting::On(task::Autostop {
        down: a.down,
        wait_for,
        ..task::Autostop::after(a.idle_seconds.max(1))
    }))
}

/// Wire cluster, with what its own nodes have cost by `now_ms`.
pub fn cluster_to_proto(state: &st::State, c: &st::Cluster, now_ms: i64) -> pb::Cluster {
    let head = state.cluster_nodes(c).next();
    let own: Vec<&Node> = state.cluster_own_nodes(c).collect();
    pb::Cluster {
        name: c.name.clone(),
        owner: c.owner.clone(),
        state: match state.cluster_status(c) {
            st::ClusterStatus::Init => pb::ClusterState::Init,
            st::ClusterStatus::Up => pb::ClusterState::Up,
            st::ClusterStatus::Stopped => pb::ClusterState::Stopped,
        } as i32,
        node_ids: state.cluster_nodes(c).map(|n| n.id.clone()).collect(),
        num_nodes: c.num_nodes,
        resources: c.resources.clone(),
        infra: head.map_or(String::new(), |n| format!("{}/{}", n.provider, n.region)),
        instance_type: head.map_or(String::new(), |n| n.instance_type.clone()),
        launch_time: timestamp(c.created_at_ms),
        autostop: c.autostop.as_ref().map(|a| autostop_to_proto(Some(a))),
        // Every node it has had, including those gone since (they were billed).
        cost: state
            .nodes
            .values()
            .filter(|n| n.cluster.as_deref() == Some(c.name.as_str()))
            .filter_map(|n| nembo_domain::cost::node_bill(n, now_ms))
            .map(|b| b.cost)
            .sum(),
        hourly_price: own.iter().map(|n| n.hourly_price).sum(),
        message: c.message.clone(),
        ssh_sessions: c.ssh_sessions,
        active_jobs: state.cluster_active_jobs(&c.name).count() as u32,
        spot: own.iter().any(|n| n.spot),
        provider_view: Vec::new(),
    }
}

/// A service for `serve status`: its replicas as SkyServe shows them.
pub fn service_to_proto(
    state: &st::State,
    s: &st::Service,
    endpoints: Vec<String>,
    qps: f64,
) -> pb::Service {
    use nembo_domain::serve;
    let replicas = s
        .replicas
        .values()
        .map(|r| {
            let node = serve::last_node(state, r);
            pb::ServiceReplica {
                replica_id: r.id,
                version: r.version,
                job_id: r.job_id.to_string(),
                status: serve::replica_status(state, r).as_str().into(),
                endpoint: serve::replica_endpoint(state, s, r).unwrap_or_default(),
                spot: r.spot,
                infra: node.map_or(String::new(), |n| format!("{}/{}", n.provider, n.region)),
                message: if r.message.is_empty() {
                    state
                        .jobs
                        .get(&r.job_id)
                        .map(|j| j.message.clone())
                        .unwrap_or_default()
                } else {
                    r.message.clone()
                },
                node_id: node.map(|n| n.id.clone()).unwrap_or_default(),
            }
        })
        .collect();
    pb::Service {
        name: s.name.clone(),
        owner: s.owner.clone(),
        status: serve::service_status(state, s).into(),
        version: s.version,
        endpoints,
        replicas,
        target_replicas: s.target,
        qps,
        lb_port: s.lb_port.into(),
        update_mode: match s.update_mode {
            st::UpdateMode::Rolling => pb::UpdateMode::Rolling,
            st::UpdateMode::BlueGreen => pb::UpdateMode::BlueGreen,
        } as i32,
        create_time: timestamp(s.created_at_ms),
        tls: s
            .newest()
            .and_then(|t| t.service.as_ref())
            .is_some_and(|x| x.tls.is_some()),
    }
}
