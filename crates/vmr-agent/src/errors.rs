//! How the agent's errors reach their callers: a store error or a machine's refusal as the
//! remote primary is told it (`RemoteError`), and a refusal as the CLI reports it (exit code 5).

use vmr_core::Refusal;
use vmr_proto::wire::RemoteError;
use vmr_store::StoreError;

use crate::exit;
use crate::util::coded;

/// Map a store error onto what the primary is told.
pub fn store_err(e: StoreError) -> RemoteError {
    match e {
        StoreError::WrongBase { expected, got, .. } => RemoteError::WrongBase { expected, got },
        StoreError::UnknownVm(vm) => RemoteError::UnknownVm { vm },
        ref err if err.is_disk_full() => RemoteError::DiskFull {
            message: crate::util::chain(err),
        },
        StoreError::CorruptExtent { .. } => RemoteError::CorruptExtent { index: 0 },
        // Not retryable: the primary stops in Error with this message.
        ref err @ StoreError::DiskShrunk { .. } => RemoteError::BadRequest {
            message: err.to_string(),
        },
        other => RemoteError::Internal {
            message: crate::util::chain(&other),
        },
    }
}

/// An internal failure, as the primary is told.
pub fn internal(e: impl std::fmt::Display) -> RemoteError {
    RemoteError::Internal {
        message: e.to_string(),
    }
}

/// What the primary is told when the replica's machine refuses a cycle or call.
pub fn refusal_err(r: Refusal) -> RemoteError {
    match r {
        Refusal::Paused { .. } => RemoteError::Unavailable {
            message: r.to_string(),
        },
        Refusal::WrongBase { expected, got } => RemoteError::WrongBase { expected, got },
        other => RemoteError::BadRequest {
            message: other.to_string(),
        },
    }
}

/// A refusal of the machine, as the CLI reports it.
pub fn refused(r: Refusal) -> anyhow::Error {
    coded(exit::INVALID_STATE, r.to_string())
}
