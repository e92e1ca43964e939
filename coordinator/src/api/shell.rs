//! `Shell`: a terminal (or a command's pipes, or a TCP stream to a port)
//! on a cluster's node, carried over that node agent's session. Each open
//! session counts as activity for the cluster's autostop, through Raft.

use std::sync::Arc;

use nembo_domain::state::{Command, NodeState};
use nembo_proto::agent::v1 as apb;
use nembo_proto::clock::now_ms;
use nembo_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::clusters::owned;
use super::gate::{audited, principal};
use super::propose_change;
use crate::agents::shells::AgentOutbox;
use crate::context::Ctx;
use crate::error::CoordinatorError;

/// The stream of a shell's output.
pub type ShellStream = ReceiverStream<Result<pb::ShellResponse, Status>>;

pub async fn shell(
    ctx: &Arc<Ctx>,
    request: Request<Streaming<pb::ShellRequest>>,
) -> Result<Response<ShellStream>, Status> {
    let who = principal(&request)?;
    let mut inbound = request.into_inner();
    let invalid = |m: &str| Status::from(CoordinatorError::InvalidArgument(m.into()));
    let Some(pb::ShellRequest {
        msg: Some(pb::shell_request::Msg::Start(start)),
    }) = inbound.message().await?
    else {
        return Err(invalid("start: the first message opens the session"));
    };
    let (node_id, env) = {
        let view = ctx.raft.view();
        let c = owned(&view.state, &who, &start.cluster)?;
        let nodes: Vec<_> = view.state.cluster_nodes(c).collect();
        let Some(node) = nodes.get(start.node_rank as usize) else {
            return Err(invalid(&format!(
                "node_rank: cluster {} has {} node(s)",
                c.name,
                nodes.len()
            )));
        };
        if node.state != NodeState::Ready {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "cluster {}: node {} is {:?}{}",
                c.name,
                node.id,
                node.state,
                if c.stopped {
                    format!("; `nembo start {}` first", c.name)
                } else {
                    String::new()
                }
            ))
            .into());
        }
        let ips: Vec<&str> = nodes.iter().map(|n| n.address.as_str()).collect();
        let env = [
            ("SKYPILOT_NODE_RANK", start.node_rank.to_string()),
            ("SKYPILOT_NUM_NODES", nodes.len().to_string()),
            ("SKYPILOT_NODE_IPS", ips.join("\n")),
            ("NEMBO_CLUSTER", c.name.clone()),
            ("NEMBO_NODE_ID", node.id.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        (node.id.clone(), env)
    };
    let agent = ctx.shells.agent(&node_id).ok_or_else(|| {
        Status::unavailable(format!(
            "node {node_id}'s agent holds no session with this coordinator now; try again"
        ))
    })?;
    let cluster = start.cluster.clone();
    propose_change(
        ctx,
        Command::SshSession {
            name: cluster.clone(),
            open: true,
            at_ms: now_ms(),
        },
    )
    .await?;
    let (client_tx, client_rx) = mpsc::channel(256);
    let id = ctx.shells.open(client_tx.clone());
    let term = ctx.raft.view().term;
    let open = apb::shell_order::Msg::Open(apb::ShellOpen {
        command: start.command.clone(),
        terminal: start.terminal,
        term: start.term.clone(),
        env,
        forward_port: start.forward_port,
    });
    if agent.send(order(term, id, open)).await.is_err() {
        ctx.shells.close(id);
        close_session(ctx, &cluster).await;
        return Err(Status::unavailable(format!(
            "node {node_id}'s session ended; try again"
        )));
    }
    tokio::spawn(pump(
        ctx.clone(),
        inbound,
        agent,
        id,
        term,
        cluster.clone(),
        client_tx,
    ));
    Ok(audited(
        ReceiverStream::new(client_rx),
        format!("cluster {cluster} {node_id}"),
    ))
}

/// Passes the client's input on to the agent until the client goes away,
/// then ends the session at the agent and in the state.
async fn pump(
    ctx: Arc<Ctx>,
    mut inbound: Streaming<pb::ShellRequest>,
    agent: AgentOutbox,
    id: u64,
    term: u64,
    cluster: String,
    client: crate::agents::shells::ClientOutbox,
) {
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            // The agent's session ended: nothing more will come.
            () = agent.closed() => {
                let _ = client.send(Err(Status::unavailable("the node's session ended"))).await;
                break;
            }
        };
        let m = match msg {
            Ok(Some(pb::ShellRequest { msg: Some(m) })) => m,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => break,
        };
        let forward = match m {
            pb::shell_request::Msg::Stdin(d) => apb::shell_order::Msg::Stdin(d),
            pb::shell_request::Msg::Resize(r) => apb::shell_order::Msg::Resize(r),
            pb::shell_request::Msg::StdinClosed(b) => apb::shell_order::Msg::StdinClosed(b),
            pb::shell_request::Msg::Start(_) => continue,
        };
        if agent.send(order(term, id, forward)).await.is_err() {
            break;
        }
    }
    let _ = agent
        .send(order(term, id, apb::shell_order::Msg::Close(true)))
        .await;
    ctx.shells.close(id);
    close_session(&ctx, &cluster).await;
}

/// An order about session `id` to its node's agent, from a leader of `term`.
fn order(term: u64, id: u64, msg: apb::shell_order::Msg) -> Result<apb::SessionResponse, Status> {
    Ok(apb::SessionResponse {
        msg: Some(apb::session_response::Msg::Shell(apb::ShellOrder {
            term,
            session_id: id,
            msg: Some(msg),
        })),
    })
}

async fn close_session(ctx: &Ctx, cluster: &str) {
    ctx.propose_quietly(Command::SshSession {
        name: cluster.to_string(),
        open: false,
        at_ms: now_ms(),
    })
    .await;
}
