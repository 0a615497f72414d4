//! Errors of the clone module's management calls, each with the errno its
//! RPC replies with (`rpc-contract.md` §2.7).

use crate::geometry::GeometryError;
use crate::metadata::MetadataError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CloneError {
    /// A named bdev does not exist (-19).
    #[error("bdev '{0}' does not exist")]
    NoSuchBdev(String),
    /// The source is missing and the clone cannot run without it (-19).
    #[error("bdev '{name}' does not exist and the clone needs it: {why}")]
    NoSource { name: String, why: String },
    /// No clone by that name (-19).
    #[error("clone bdev '{0}' does not exist")]
    NoSuchClone(String),
    /// The clone's name is taken (-17).
    #[error("bdev name '{0}' already exists")]
    Exists(String),
    /// Bad parameters or an unusable geometry (-22).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Geometry(#[from] GeometryError),
    #[error("{0}")]
    Metadata(#[from] MetadataError),
    /// A base bdev is claimed by someone else (-16).
    #[error("{0}")]
    Claimed(String),
    /// I/O on a base bdev failed during create (-5).
    #[error("{0}")]
    Io(String),
    /// The machine cannot hold what the clone needs in memory (-12).
    #[error("{0}")]
    NoMem(String),
    /// `bdev_clone_set_hydration` without any option (-22).
    #[error("No options specified")]
    NoOptions,
}

impl CloneError {
    /// Positive errno (the RPC replies with its negation).
    pub fn errno(&self) -> i32 {
        match self {
            CloneError::NoSuchBdev(_)
            | CloneError::NoSource { .. }
            | CloneError::NoSuchClone(_) => libc::ENODEV,
            CloneError::Exists(_) => libc::EEXIST,
            CloneError::Invalid(_)
            | CloneError::Geometry(_)
            | CloneError::Metadata(_)
            | CloneError::NoOptions => libc::EINVAL,
            CloneError::Claimed(_) => libc::EBUSY,
            CloneError::Io(_) => libc::EIO,
            CloneError::NoMem(_) => libc::ENOMEM,
        }
    }

    pub(crate) fn from_bdev(e: bdev::BdevError) -> CloneError {
        match e {
            bdev::BdevError::NotFound(n) => CloneError::NoSuchBdev(n),
            bdev::BdevError::Exists(n) => CloneError::Exists(n),
            bdev::BdevError::Claimed { .. } | bdev::BdevError::WriteRefused(_) => {
                CloneError::Claimed(e.to_string())
            }
            bdev::BdevError::Invalid(m) => CloneError::Invalid(m),
            bdev::BdevError::NoMem(m) => CloneError::NoMem(m),
            other => CloneError::Io(other.to_string()),
        }
    }
}

impl From<CloneError> for ::rpc::RpcError {
    fn from(e: CloneError) -> Self {
        tracing::debug!(error = %e, "clone RPC failed");
        match e {
            // SPDK's own text for this one.
            CloneError::NoOptions => ::rpc::RpcError::errno_msg(e.errno(), e.to_string()),
            // As the other modules: strerror() first (what SPDK sends), then
            // what was wrong, so scripts and people both get theirs.
            _ => {
                let plain = ::rpc::RpcError::errno(e.errno()).message;
                ::rpc::RpcError::errno_msg(e.errno(), format!("{plain}: {e}"))
            }
        }
    }
}
