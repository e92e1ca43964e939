//! Uploads of file contents for local file mounts and workdirs
//! ([`crate::blobs`]): which the cluster lacks, and the upload itself.

use nembo_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::blobs::{BlobError, Incoming};
use crate::context::Ctx;
use crate::error::CoordinatorError;

/// An upload that sends no piece for this long is dropped.
pub const PIECE_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Most digests one FindMissingBlobs may ask about.
const MAX_ASKED: usize = 2 * nembo_proto::files::MAX_ENTRIES;

impl From<BlobError> for CoordinatorError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::Invalid(m) => CoordinatorError::InvalidArgument(m),
            BlobError::Missing(d) => CoordinatorError::NotFound(format!("blob {d}")),
            BlobError::NoRoom(m) => CoordinatorError::TooLarge(m),
            BlobError::Io(e) => CoordinatorError::Storage(e.to_string()),
        }
    }
}

/// The digests not held here.
pub async fn find_missing_blobs(
    ctx: &Ctx,
    request: Request<pb::FindMissingBlobsRequest>,
) -> Result<Response<pb::FindMissingBlobsResponse>, Status> {
    let pb::FindMissingBlobsRequest { digests, announce } = request.into_inner();
    if digests.len() > MAX_ASKED {
        return Err(CoordinatorError::TooLarge(format!(
            "{} digests; at most {MAX_ASKED} per call",
            digests.len()
        ))
        .into());
    }
    let missing = ctx.blobs.missing_marking_fresh(digests);
    let upload_id = if announce && !missing.is_empty() {
        ctx.blobs.announce(missing.clone()).unwrap_or_default()
    } else {
        String::new()
    };
    Ok(Response::new(pb::FindMissingBlobsResponse {
        missing,
        takes_whole_blobs: true,
        upload_id,
    }))
}

/// Receives blobs piece by piece; each is kept once it hashes to its name.
pub async fn put_blobs(
    ctx: &Ctx,
    request: Request<Streaming<pb::PutBlobsRequest>>,
) -> Result<Response<pb::PutBlobsResponse>, Status> {
    let mut stream = request.into_inner();
    let (mut blobs, mut bytes) = (0u64, 0u64);
    let mut written = Vec::new();
    let mut current: Option<Incoming> = None;
    // Held while the upload runs: jobs that name its blobs wait for them.
    let mut _carrying = None;
    loop {
        let next = tokio::time::timeout(PIECE_IDLE, stream.next())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!("no piece of the upload for {PIECE_IDLE:?}"))
            })?;
        let Some(piece) = next else {
            break;
        };
        let piece = piece?;
        if !piece.upload_id.is_empty() {
            if _carrying.is_none() {
                _carrying = ctx.blobs.carry(&piece.upload_id);
            }
            // It may say only that: the upload has begun.
            if current.is_none() && piece.whole.is_empty() && piece.digest.is_empty() {
                continue;
            }
        }
        if !piece.whole.is_empty() {
            if current.is_some() {
                return Err(CoordinatorError::InvalidArgument(
                    "whole blobs sent inside another blob's pieces".into(),
                )
                .into());
            }
            let store = &ctx.blobs;
            let (size, pack) = tokio::task::block_in_place(|| store.put_whole(&piece.whole))
                .map_err(CoordinatorError::from)?;
            bytes += size;
            blobs += piece.whole.len() as u64;
            written.push(pack);
            continue;
        }
        if current.is_none() {
            if piece.size > nembo_proto::files::MAX_BYTES {
                return Err(CoordinatorError::TooLarge(format!(
                    "blob {} of {} bytes; the limit is {} GiB",
                    piece.digest,
                    piece.size,
                    nembo_proto::files::MAX_BYTES >> 30
                ))
                .into());
            }
            current = Some(
                ctx.blobs
                    .begin(&piece.digest, piece.size)
                    .map_err(CoordinatorError::from)?,
            );
        }
        let Some(incoming) = current.as_mut() else {
            continue;
        };
        incoming
            .write(&piece.data)
            .map_err(CoordinatorError::from)?;
        if piece.last {
            if let Some(done) = current.take() {
                let (size, path) = done.finish().map_err(CoordinatorError::from)?;
                bytes += size;
                blobs += 1;
                written.push(path);
            }
        }
    }
    if current.is_some() {
        return Err(CoordinatorError::InvalidArgument(
            "the upload ended inside a blob (no piece with `last`)".into(),
        )
        .into());
    }
    // Acknowledged means on disk.
    let blobs_dir = &ctx.blobs;
    tokio::task::block_in_place(|| blobs_dir.sync(&written)).map_err(CoordinatorError::from)?;
    Ok(Response::new(pb::PutBlobsResponse { blobs, bytes }))
}
