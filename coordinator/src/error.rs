//! Coordinator errors, mapped to `tonic::Status` in exactly one place.

use tonic::{Code, Status};

use crate::replication::raft::{ProposeError, StorageError};

/// Everything a coordinator call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Bad input; the message starts with the field path.
    #[error("{0}")]
    InvalidArgument(String),
    /// Unknown id.
    #[error("{0}")]
    NotFound(String),
    /// A request over the size limit.
    #[error("{0}")]
    TooLarge(String),
    /// The state does not allow it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// What it would create exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// Every one of a bounded resource (ports) is taken.
    #[error("{0}")]
    Exhausted(String),
    /// No valid credential.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid credential without the right to do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// Raft did not apply the change.
    #[error(transparent)]
    Propose(#[from] ProposeError),
    /// Durable storage failed.
    #[error("storage: {0}")]
    Storage(String),
    /// A bug or an unexpected failure.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<StorageError> for CoordinatorError {
    fn from(e: StorageError) -> Self {
        CoordinatorError::Storage(e.0)
    }
}

impl From<nembo_domain::task::SpecError> for CoordinatorError {
    fn from(e: nembo_domain::task::SpecError) -> Self {
        CoordinatorError::InvalidArgument(e.to_string())
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        let code = match &e {
            CoordinatorError::InvalidArgument(_) => Code::InvalidArgument,
            CoordinatorError::NotFound(_) => Code::NotFound,
            CoordinatorError::TooLarge(_) | CoordinatorError::Exhausted(_) => {
                Code::ResourceExhausted
            }
            CoordinatorError::AlreadyExists(_) => Code::AlreadyExists,
            CoordinatorError::FailedPrecondition(_) => Code::FailedPrecondition,
            CoordinatorError::Unauthenticated(_) => Code::Unauthenticated,
            CoordinatorError::PermissionDenied(_) => Code::PermissionDenied,
            CoordinatorError::Propose(_) => Code::Unavailable,
            CoordinatorError::Storage(_) | CoordinatorError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
