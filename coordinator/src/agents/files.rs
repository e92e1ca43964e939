//! File contents for the jobs a node runs: the manifests of their local
//! file mounts and workdirs, and the files those list. A node gets only
//! what one of its jobs ships, never a blob by digest alone.

use std::collections::BTreeSet;
use std::io::Read;

use nembo_domain::task::TaskSpec;
use nembo_proto::agent::v1 as apb;
use nembo_proto::files::{WholeBatch, PIECE_BYTES, WHOLE_MAX};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::agents::enroll::AgentCaller;
use crate::context::Ctx;

/// Most digests in one FetchBlobs.
const MAX_PER_CALL: usize = 10_000;

/// Streams the asked blobs, each in pieces, to a node that runs the job.
pub async fn fetch_blobs(
    ctx: &Ctx,
    request: Request<apb::FetchBlobsRequest>,
) -> Result<Response<ReceiverStream<Result<apb::FetchBlobsResponse, Status>>>, Status> {
    let Some(AgentCaller::Node(node)) = request.extensions().get::<AgentCaller>().cloned() else {
        return Err(Status::permission_denied(
            "only a node's certificate fetches files",
        ));
    };
    let req = request.into_inner();
    if req.digests.len() > MAX_PER_CALL {
        return Err(Status::invalid_argument(format!(
            "{} digests; at most {MAX_PER_CALL} per call",
            req.digests.len()
        )));
    }
    let view = ctx.raft.view();
    let job = req
        .job_id
        .parse::<nembo_domain::state::JobId>()
        .ok()
        .and_then(|id| view.state.jobs.get(&id).cloned())
        .filter(|j| j.attempts.iter().any(|a| a.node_ids.contains(&node)))
        .ok_or_else(|| {
            Status::permission_denied(format!("job {} has no attempt on {node}", req.job_id))
        })?;
    let shipped = shipped_by(ctx, &job.spec)?;
    if let Some(bad) = req.digests.iter().find(|d| !shipped.contains(*d)) {
        return Err(Status::permission_denied(format!(
            "blob {bad} is not shipped by job {}",
            req.job_id
        )));
    }
    // Checked now, opened one at a time as they are sent: a batch of
    // thousands must not hold thousands of files open. One that an upload
    // in progress will bring is waited for.
    if let Some(d) = req
        .digests
        .iter()
        .find(|d| !ctx.blobs.is_coming(d) && !ctx.blobs.has(d))
    {
        return Err(Status::not_found(format!(
            "blob {d} is not held by this coordinator (it was uploaded to another one, or \
             lost with its disk: launch the task again to upload it)"
        )));
    }
    let (digests, store) = (req.digests, ctx.blobs.clone());
    let takes_whole = req.takes_whole_blobs;
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut small = WholeBatch::default();
        let send_whole = |whole: Vec<_>| {
            tx.blocking_send(Ok(apb::FetchBlobsResponse {
                whole,
                ..Default::default()
            }))
            .is_ok()
        };
        for digest in digests {
            let fail = |e: std::io::Error| Err(Status::internal(format!("{digest}: {e}")));
            if !store.has(&digest) {
                // What is gathered goes first: the node has work while this waits.
                if let Some(gathered) = small.take() {
                    if !send_whole(gathered) {
                        return;
                    }
                }
                if !store.wait_for(&digest) {
                    let _ = tx.blocking_send(Err(Status::not_found(format!(
                        "blob {digest}: its upload ended without it (the launching client \
                         stopped or lost its connection: launch the task again)"
                    ))));
                    return;
                }
            }
            let (mut file, mut left) = match store.open(&digest) {
                Ok(opened) => opened,
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::internal(format!("{digest}: {e}"))));
                    return;
                }
            };
            if takes_whole && left <= WHOLE_MAX {
                let mut data = Vec::with_capacity(left as usize);
                if let Err(e) = file.read_to_end(&mut data) {
                    let _ = tx.blocking_send(fail(e));
                    return;
                }
                if let Some(full) = small.push(digest, data) {
                    if !send_whole(full) {
                        return;
                    }
                }
                continue;
            }
            loop {
                // Sized to what is left: a small file costs a small buffer.
                let mut data = vec![0u8; left.min(PIECE_BYTES as u64) as usize];
                let n = match nembo_proto::files::read_full(&mut file, &mut data) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.blocking_send(fail(e));
                        return;
                    }
                };
                data.truncate(n);
                left = left.saturating_sub(n as u64);
                let last = left == 0 || n == 0;
                let piece = apb::FetchBlobsResponse {
                    digest: digest.clone(),
                    data,
                    last,
                    whole: Vec::new(),
                };
                if tx.blocking_send(Ok(piece)).is_err() {
                    return;
                }
                if last {
                    break;
                }
            }
        }
        if let Some(rest) = small.take() {
            send_whole(rest);
        }
    });
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// Every blob a job ships: its manifests and the files they list.
fn shipped_by(ctx: &Ctx, spec: &TaskSpec) -> Result<BTreeSet<String>, Status> {
    let manifests = spec
        .workdir_manifest
        .iter()
        .map(String::as_str)
        .chain(spec.file_mounts.values().filter_map(|m| m.local()?.1));
    let mut out = BTreeSet::new();
    for digest in manifests {
        let manifest = ctx
            .blobs
            .manifest(digest)
            .map_err(|e| Status::not_found(e.to_string()))?;
        out.extend(manifest.files().map(|(_, _, d)| d.to_string()));
        out.insert(digest.to_string());
    }
    Ok(out)
}
