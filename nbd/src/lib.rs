//! NBD (the Network Block Device protocol) for clone-tgt.
//!
//! * [`proto`]: the wire format, pure encoders and decoders (fuzzed).
//! * [`client`]: the NBD client bdev (`bdev_nbd_create`): any NBD server
//!   (nbdkit, qemu-nbd, another clone_tgt) as a bdev, e.g. a clone source.
//! * [`server`]: the NBD server (`nbd_server_start`, `nbd_export_add`):
//!   any bdev, a clone included, exported to NBD clients (QEMU, nbdcopy,
//!   qemu-img, libnbd programs).
//! * [`rpc`]: the JSON-RPC methods and the `nbd` subsystem's config.

pub mod client;
pub mod fuzz;
pub mod handshake;
pub mod proto;
pub mod rpc;
pub mod server;
pub mod sock;
pub mod uri;

/// Errors of the NBD module, each with the errno its RPC reports.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NbdError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Bdev(#[from] bdev::BdevError),
}

impl NbdError {
    pub fn errno(&self) -> i32 {
        match self {
            NbdError::Invalid(_) => libc::EINVAL,
            NbdError::Io(_) => libc::EIO,
            NbdError::Exists(_) => libc::EEXIST,
            NbdError::NotFound(_) => libc::ENODEV,
            NbdError::Bdev(e) => e.errno(),
        }
    }
}

impl From<NbdError> for ::rpc::RpcError {
    fn from(e: NbdError) -> Self {
        match e {
            NbdError::Bdev(b) => b.into(),
            NbdError::Invalid(m) => {
                ::rpc::RpcError::errno_msg(libc::EINVAL, format!("Invalid argument: {m}"))
            }
            NbdError::Io(m) => {
                ::rpc::RpcError::errno_msg(libc::EIO, format!("Input/output error: {m}"))
            }
            e => ::rpc::RpcError::errno_msg(e.errno(), e.to_string()),
        }
    }
}

/// Register the NBD RPC methods and the `nbd` subsystem.
pub fn register_methods() {
    rpc::register_methods();
}

/// Clean shutdown (reactor 0, before the bdevs go): stop the server and
/// release every exported bdev.
pub async fn shutdown() {
    server::shutdown().await;
}
