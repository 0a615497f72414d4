//! The NVMe/TCP host (initiator) and its bdev module, after SPDK's
//! `lib/nvme` (TCP transport) and `module/bdev/nvme`.
//!
//! * [`qpair`]: one TCP connection: ICReq/ICResp, fabrics Connect, command
//!   slots, in-capsule and R2T/H2CData writes, C2HData reads straight into
//!   the I/O buffer, digests, and strict checks on everything received.
//! * [`ctrlr`]: a controller: admin queue on reactor 0 (enable through
//!   properties, Identify, Set Features number of queues, keep-alive), one
//!   I/O queue pair per reactor, reconnect with SPDK's
//!   `ctrlr_loss_timeout_sec` / `reconnect_delay_sec` /
//!   `fast_io_fail_timeout_sec` semantics, detach.
//! * [`nvme_bdev`]: one bdev per active namespace (`<name>n<nsid>`, product
//!   "NVMe disk"); a bdev channel is its reactor's queue pair.
//! * [`rpc`]: `bdev_nvme_attach_controller`, `bdev_nvme_detach_controller`,
//!   `bdev_nvme_get_controllers`.

// Bdev I/O travel as `Box<BdevIo>` (the bdev layer's ownership unit), so
// lists of them are vectors of boxes.
#![allow(clippy::vec_box)]

pub mod ctrlr;
pub mod nvme_bdev;
pub mod qpair;
pub mod rpc;
pub mod sock;
pub mod wire;

use std::net::SocketAddr;

use crate::spec::Status;

/// Errors of the host, each with the errno its RPC reports.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HostError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("timed out {0}")]
    Timeout(String),
    #[error("NVMe/TCP protocol error: {0}")]
    Protocol(String),
    #[error("controller rejected the Connect on qid {qid}: {detail} ({status})")]
    ConnectRejected {
        qid: u16,
        status: Status,
        detail: String,
    },
    #[error("connection lost: {0}")]
    Disconnected(String),
    #[error("no free command slot on the admin queue")]
    Busy,
    #[error("{what} failed with NVMe status {status}")]
    Nvme { what: String, status: Status },
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    NotFound(String),
}

impl HostError {
    pub fn errno(&self) -> i32 {
        match self {
            HostError::Invalid(_) => libc::EINVAL,
            HostError::Timeout(_) => libc::ETIMEDOUT,
            HostError::Exists(_) => libc::EALREADY,
            HostError::NotFound(_) => libc::ENODEV,
            HostError::Busy => libc::EBUSY,
            _ => libc::EIO,
        }
    }
}

impl From<std::io::Error> for HostError {
    fn from(e: std::io::Error) -> Self {
        HostError::Io(e.to_string())
    }
}

/// Detach every controller (clean shutdown, on reactor 0, after the bdevs
/// are unregistered): each gets its shutdown notification (CC.SHN) and its
/// connections are closed.
pub async fn shutdown() {
    for c in ctrlr::all() {
        let _ = ctrlr::detach(&c.opts.name).await;
    }
}

/// Register the RPC methods of the NVMe bdev module.
pub fn register_methods() {
    rpc::register_methods();
}

#[cfg(test)]
mod tests;
