//! What the fleet has cost: catalog price times run time. Pure: `now_ms`
//! comes from the caller, so the report is the same on every replica.

use crate::state::{JobId, JobState, Node, NodeState, State};

/// One node's bill.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeCost {
    /// Node.
    pub node_id: String,
    /// Hours billed: from the provider's launch to the node's end (or
    /// now), less the time it was stopped.
    pub hours: f64,
    /// The cluster it belongs to, if any.
    pub cluster: Option<String>,
    /// `hours x hourly_price`.
    pub cost: f64,
}

/// One job's share.
#[derive(Debug, Clone, PartialEq)]
pub struct JobCost {
    /// Job.
    pub job_id: JobId,
    /// Node-hours its attempts held, from assignment to end (or now).
    pub node_hours: f64,
    /// Its share of those nodes' price: the fraction of each node's GPUs
    /// (or vCPUs, on a CPU node) it asked for.
    pub cost: f64,
}

/// The bill so far.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CostReport {
    /// Every node ever launched.
    pub nodes: Vec<NodeCost>,
    /// Every job that ran on a node.
    pub jobs: Vec<JobCost>,
    /// Sum over nodes (what the providers charge; job shares leave idle time out).
    pub total: f64,
}

const HOUR_MS: f64 = 3_600_000.0;

/// One node's bill at `now_ms`; none if it was never launched.
pub fn node_bill(n: &Node, now_ms: i64) -> Option<NodeCost> {
    let start = n.launched_at_ms?;
    let end = n.ended_at_ms.unwrap_or(match n.state {
        NodeState::Terminated | NodeState::Failed => start,
        _ => now_ms,
    });
    // A stopped machine is not billed (its disk is, at a price the
    // catalogs do not carry).
    let stopped = n.stopped_ms + n.stopped_since_ms.map_or(0, |since| (end - since).max(0));
    let hours = (end - start - stopped).max(0) as f64 / HOUR_MS;
    Some(NodeCost {
        node_id: n.id.clone(),
        hours,
        cost: hours * n.hourly_price,
        cluster: n.cluster.clone(),
    })
}

/// The bill at `now_ms`.
pub fn report(state: &State, now_ms: i64) -> CostReport {
    let mut out = CostReport::default();
    for bill in state.nodes.values().filter_map(|n| node_bill(n, now_ms)) {
        out.total += bill.cost;
        out.nodes.push(bill);
    }
    for job in state.jobs.values() {
        let mut node_hours = 0.0;
        let mut cost = 0.0;
        for a in &job.attempts {
            let end = a.ended_at_ms.unwrap_or(
                if a.state.is_terminal() || job.state == JobState::Pending {
                    a.assigned_at_ms
                } else {
                    now_ms
                },
            );
            let hours = (end - a.assigned_at_ms).max(0) as f64 / HOUR_MS;
            for id in &a.node_ids {
                let Some(n) = state.nodes.get(id) else {
                    continue;
                };
                let gpus: f64 = n.resources.accelerators.values().sum();
                let asked: f64 = a.demand.accelerators.values().sum();
                let share = if gpus > 0.0 {
                    asked / gpus
                } else if n.resources.cpus > 0.0 {
                    a.demand.cpus / n.resources.cpus
                } else {
                    1.0
                };
                node_hours += hours;
                cost += hours * n.hourly_price * share.clamp(0.0, 1.0);
            }
        }
        if !job.attempts.is_empty() {
            out.jobs.push(JobCost {
                job_id: job.id,
                node_hours,
                cost,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, Offering, Outcome, Resources};
    use crate::task::parse_task_yaml;

    #[test]
    fn nodes_bill_from_launch_to_end_and_jobs_pay_their_share() {
        let mut s = State::default();
        let spec =
            parse_task_yaml("resources: {accelerators: H100:2}", &Default::default()).unwrap();
        s.apply(&Command::SubmitJob {
            spec,
            idempotency_key: None,
            owner: String::new(),
            at_ms: 0,
        });
        let mut resources = Resources {
            cpus: 32.0,
            memory_gb: 256.0,
            ..Default::default()
        };
        resources.accelerators.insert("H100".into(), 8.0);
        let offering = Offering {
            provider: "sim".into(),
            region: "r".into(),
            zone: None,
            runs_as_coordinator_user: false,
            simulated: false,
            fixed_machines: None,
            disk_gb_max: None,
            opens_ports: false,
            ports_per_node: false,
            custom_images: false,
            can_stop: false,
            instance_type: "h100-8".into(),
            resources,
            hourly_price: 16.0,
            spot_price: Some(4.0),
        };
        let Outcome::Nodes(nodes) = s.apply(&Command::ProvisionNodes {
            job_id: 1,
            offering,
            count: 1,
            spot: true,
            at_ms: 0,
        }) else {
            panic!()
        };
        let node = nodes[0].clone();
        let h = 3_600_000;
        s.apply(&Command::NodeLaunched {
            node_id: node.clone(),
            instance_id: "i-1".into(),
            at_ms: h,
        });
        s.apply(&Command::NodeUp {
            node_id: node.clone(),
            address: "10.0.0.1".into(),
            public_address: String::new(),
            at_ms: h,
        });
        s.apply(&Command::AssignJob {
            job_id: 1,
            node_ids: vec![node.clone()],
            candidate: 0,
            at_ms: h,
        });
        // Two hours later: the node has run 2 h at the spot price (4/h);
        // the job holds 2 of its 8 GPUs for those 2 h.
        let r = report(&s, 3 * h);
        assert_eq!(r.nodes.len(), 1);
        assert!((r.nodes[0].hours - 2.0).abs() < 1e-9);
        assert!((r.total - 8.0).abs() < 1e-9, "{r:?}");
        assert!((r.jobs[0].cost - 2.0).abs() < 1e-9, "{r:?}");
        // Terminated: billing stops.
        s.apply(&Command::NodeTerminated {
            node_id: node,
            at_ms: 4 * h,
        });
        let r = report(&s, 10 * h);
        assert!((r.total - 12.0).abs() < 1e-9, "{r:?}");
    }
}
