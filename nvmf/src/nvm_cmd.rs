//! NVM I/O commands (Read, Write, Flush, Write Zeroes, Dataset Management)
//! turned into bdev I/O on a namespace's channel, for any transport.
//!
//! The transport owns the command's data buffer and its completion: it calls
//! [`submit`] with the buffer it received (writes, DSM ranges), and each bdev
//! I/O completes through the `done` callback it passes; [`status_of`] maps
//! the bdev's status to an NVMe status.

use bdev::{BdevIo, IoChannel, IoStatus, IoType};
use reactor::DmaBuf;

use crate::spec::{dsm, nvm, sc, sct, Sqe, Status};
use crate::target::Namespace;

/// A Write Zeroes on a bdev without native support is written as a buffer
/// of zeroes, up to this many bytes.
const ZEROES_BY_WRITE_MAX: u64 = 8 << 20;

/// What [`submit`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Submitted {
    /// This many bdev I/Os are in flight; each completes through `done`.
    Pending(u32),
    /// Nothing was submitted: complete the command now with this status.
    Now(Status),
}

/// Whether `opc` is an NVM I/O command we execute.
pub fn is_supported(opc: u8) -> bool {
    matches!(
        opc,
        nvm::READ | nvm::WRITE | nvm::FLUSH | nvm::WRITE_ZEROES | nvm::DATASET_MANAGEMENT
    )
}

/// Submit the NVM command `sqe` to namespace `ns` through `ch`.
///
/// `data` is the host's data for the command (taken by writes and DSM),
/// `data_len` the transfer length its SGL announced, `max_xfer` the
/// transport's largest transfer. Read data comes back in the completed I/O's
/// buffer.
pub fn submit(
    sqe: &Sqe,
    ns: &Namespace,
    ch: &IoChannel,
    data: &mut Option<DmaBuf>,
    data_len: u32,
    max_xfer: u32,
    done: impl Fn(Box<BdevIo>) + Clone + 'static,
) -> Submitted {
    match sqe.opc {
        nvm::READ | nvm::WRITE => read_write(sqe, ns, ch, data, data_len, max_xfer, done),
        nvm::FLUSH => {
            if !ns.bdev.io_type_supported(IoType::Flush) {
                return Submitted::Now(Status::SUCCESS);
            }
            ch.flush(0, ns.num_blocks(), done);
            Submitted::Pending(1)
        }
        nvm::WRITE_ZEROES => write_zeroes(sqe, ns, ch, done),
        nvm::DATASET_MANAGEMENT => deallocate(sqe, ns, ch, data, data_len, done),
        _ => Submitted::Now(Status::generic(sc::INVALID_OPCODE)),
    }
}

fn read_write(
    sqe: &Sqe,
    ns: &Namespace,
    ch: &IoChannel,
    data: &mut Option<DmaBuf>,
    data_len: u32,
    max_xfer: u32,
    done: impl Fn(Box<BdevIo>) + 'static,
) -> Submitted {
    let (slba, nlb) = match lba_range(sqe, ns) {
        Ok(r) => r,
        Err(st) => return Submitted::Now(st),
    };
    let need = nlb * ns.block_size as u64;
    if need > data_len as u64 {
        return Submitted::Now(Status::generic(sc::DATA_SGL_LENGTH_INVALID));
    }
    if need > max_xfer as u64 {
        return Submitted::Now(Status::generic(sc::INVALID_FIELD));
    }
    let mut io = if sqe.opc == nvm::READ {
        BdevIo::read(slba, nlb, DmaBuf::new(need as usize), done)
    } else {
        let Some(buf) = data.take() else {
            return Submitted::Now(Status::generic(sc::DATA_SGL_LENGTH_INVALID));
        };
        BdevIo::write(slba, nlb, buf, done)
    };
    io.fua = sqe.opc == nvm::WRITE && sqe.fua();
    ch.submit(io);
    Submitted::Pending(1)
}

fn write_zeroes(
    sqe: &Sqe,
    ns: &Namespace,
    ch: &IoChannel,
    done: impl Fn(Box<BdevIo>) + 'static,
) -> Submitted {
    let (slba, nlb) = match lba_range(sqe, ns) {
        Ok(r) => r,
        Err(st) => return Submitted::Now(st),
    };
    let bytes = nlb * ns.block_size as u64;
    if ns.bdev.io_type_supported(IoType::WriteZeroes) {
        ch.write_zeroes(slba, nlb, done);
    } else if bytes <= ZEROES_BY_WRITE_MAX {
        let mut io = BdevIo::write(slba, nlb, DmaBuf::zeroed(bytes as usize), done);
        io.fua = sqe.fua();
        ch.submit(io);
    } else {
        return Submitted::Now(Status::generic(sc::INVALID_FIELD));
    }
    Submitted::Pending(1)
}

/// Dataset Management: deallocate ranges become unmaps (other attributes
/// are hints we may ignore); empty ranges are skipped.
fn deallocate(
    sqe: &Sqe,
    ns: &Namespace,
    ch: &IoChannel,
    data: &mut Option<DmaBuf>,
    data_len: u32,
    done: impl Fn(Box<BdevIo>) + Clone + 'static,
) -> Submitted {
    let nr = dsm::num_ranges(sqe.cdw10);
    let Some(buf) = data.take() else {
        return Submitted::Now(Status::generic(sc::DATA_SGL_LENGTH_INVALID));
    };
    if (data_len as usize) < nr * dsm::RANGE_SIZE {
        return Submitted::Now(Status::generic(sc::DATA_SGL_LENGTH_INVALID));
    }
    if sqe.cdw11 & dsm::ATTR_DEALLOCATE == 0 || !ns.bdev.io_type_supported(IoType::Unmap) {
        return Submitted::Now(Status::SUCCESS);
    }
    let mut ranges = Vec::with_capacity(nr);
    for r in buf.as_slice().chunks_exact(dsm::RANGE_SIZE).take(nr) {
        let r = dsm::Range::decode(r);
        if let Err(st) = check_range(ns, r.slba, r.nlb as u64) {
            return Submitted::Now(st);
        }
        if r.nlb > 0 {
            ranges.push(r);
        }
    }
    if ranges.is_empty() {
        return Submitted::Now(Status::SUCCESS);
    }
    for r in &ranges {
        ch.unmap(r.slba, r.nlb as u64, done.clone());
    }
    Submitted::Pending(ranges.len() as u32)
}

/// The command's starting LBA and block count, checked against the namespace.
fn lba_range(sqe: &Sqe, ns: &Namespace) -> Result<(u64, u64), Status> {
    let (slba, nlb) = (sqe.slba(), sqe.nlb() as u64);
    check_range(ns, slba, nlb)?;
    Ok((slba, nlb))
}

/// The range `[slba, slba + nlb)` lies within the namespace.
pub fn check_range(ns: &Namespace, slba: u64, nlb: u64) -> Result<(), Status> {
    match slba.checked_add(nlb) {
        Some(end) if end <= ns.num_blocks() => Ok(()),
        _ => Err(Status::generic(sc::LBA_OUT_OF_RANGE)),
    }
}

/// The NVMe status for a completed bdev I/O.
pub fn status_of(st: IoStatus) -> Status {
    match st {
        IoStatus::Success => Status::SUCCESS,
        IoStatus::NvmeError { sct, sc } => Status::new(sct, sc, false),
        IoStatus::Aborted => Status::new(sct::GENERIC, sc::ABORTED_BY_REQUEST, false),
        _ => Status::new(sct::GENERIC, sc::INTERNAL_ERROR, false),
    }
}
