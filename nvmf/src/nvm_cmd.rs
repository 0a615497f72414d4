//! NVM I/O commands (Read, Write, Flush, Write Zeroes, Dataset Management)
//! turned into bdev I/O on a namespace's channel, for any transport.
//!
//! The transport owns the command's data buffer and its completion: it calls
//! [`submit`] with a [`Command`] holding the buffer it received (writes, DSM
//! ranges), and each bdev I/O completes through the [`Completion`] it passes
//! (a function and its context, so a command allocates nothing);
//! [`status_of`] maps the bdev's status to an NVMe status.

use std::any::Any;
use std::rc::Rc;

use bdev::{BdevIo, IoChannel, IoDoneFn, IoStatus, IoType};
use reactor::DmaBuf;

use crate::spec::{dsm, nvm, sc, sct, Sqe, Status};
use crate::target::Namespace;

/// A Write Zeroes on a bdev without native support is written as a buffer
/// of zeroes, up to this many bytes.
const ZEROES_BY_WRITE_MAX: u64 = 8 << 20;

/// What [`submit`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Submitted {
    /// This many bdev I/Os are in flight; each completes through the
    /// [`Completion`].
    Pending(u32),
    /// Nothing was submitted: complete the command now with this status.
    Now(Status),
}

/// How the bdev I/Os of a command report back: `done` gets each completed
/// I/O with `arg` and `ctx` in its `cb_arg` / `cb_ctx` (SPDK's `cb` and
/// `cb_arg`); the transport gives the descriptor back with
/// [`BdevIo::free`].
pub struct Completion {
    pub done: IoDoneFn,
    pub arg: Rc<dyn Any>,
    pub ctx: u64,
}

impl Completion {
    fn io(&self, ty: IoType, slba: u64, nlb: u64, buf: Option<DmaBuf>) -> Box<BdevIo> {
        BdevIo::with_fn(
            ty,
            slba,
            nlb,
            buf,
            self.done,
            Some(self.arg.clone()),
            self.ctx,
        )
    }
}

/// Whether `opc` is an NVM I/O command we execute.
pub fn is_supported(opc: u8) -> bool {
    matches!(
        opc,
        nvm::READ | nvm::WRITE | nvm::FLUSH | nvm::WRITE_ZEROES | nvm::DATASET_MANAGEMENT
    )
}

/// An NVM command to execute, with what it needs.
pub struct Command<'a> {
    pub sqe: &'a Sqe,
    pub ns: &'a Namespace,
    /// The namespace's channel on this reactor.
    pub ch: &'a IoChannel,
    /// The host's data for the command (taken by writes and DSM).
    pub data: &'a mut Option<DmaBuf>,
    /// The transfer length the command's SGL announced.
    pub data_len: u32,
    /// The transport's largest transfer.
    pub max_xfer: u32,
    pub done: &'a Completion,
}

/// Submit an NVM command to its namespace. Read data comes back in the
/// completed I/O's buffer.
pub fn submit(mut c: Command<'_>) -> Submitted {
    let r = match c.sqe.opc {
        nvm::READ | nvm::WRITE => read_write(&mut c),
        nvm::FLUSH if !c.ns.bdev.io_type_supported(IoType::Flush) => Ok(0),
        nvm::FLUSH => {
            let io = c.done.io(IoType::Flush, 0, c.ns.num_blocks(), None);
            c.ch.submit(io);
            Ok(1)
        }
        nvm::WRITE_ZEROES => write_zeroes(&c),
        nvm::DATASET_MANAGEMENT => deallocate(&mut c),
        _ => Err(Status::generic(sc::INVALID_OPCODE)),
    };
    match r {
        Ok(0) => Submitted::Now(Status::SUCCESS),
        Ok(n) => Submitted::Pending(n),
        Err(st) => Submitted::Now(st),
    }
}

/// Each command kind: the number of bdev I/Os submitted (0: done, success),
/// or the status to complete the command with at once.
type Issued = Result<u32, Status>;

fn read_write(c: &mut Command<'_>) -> Issued {
    let (sqe, ns) = (c.sqe, c.ns);
    let (slba, nlb) = lba_range(sqe, ns)?;
    let need = nlb * ns.block_size as u64;
    if need > c.data_len as u64 {
        return Err(Status::generic(sc::DATA_SGL_LENGTH_INVALID));
    }
    if need > c.max_xfer as u64 {
        return Err(Status::generic(sc::INVALID_FIELD));
    }
    let mut io = if sqe.opc == nvm::READ {
        c.done
            .io(IoType::Read, slba, nlb, Some(DmaBuf::new(need as usize)))
    } else {
        let Some(buf) = c.data.take() else {
            return Err(Status::generic(sc::DATA_SGL_LENGTH_INVALID));
        };
        c.done.io(IoType::Write, slba, nlb, Some(buf))
    };
    io.fua = sqe.opc == nvm::WRITE && sqe.fua();
    c.ch.submit(io);
    Ok(1)
}

fn write_zeroes(c: &Command<'_>) -> Issued {
    let (slba, nlb) = lba_range(c.sqe, c.ns)?;
    let bytes = nlb * c.ns.block_size as u64;
    let io = if c.ns.bdev.io_type_supported(IoType::WriteZeroes) {
        c.done.io(IoType::WriteZeroes, slba, nlb, None)
    } else if bytes <= ZEROES_BY_WRITE_MAX {
        let zeroes = DmaBuf::zeroed(bytes as usize);
        let mut io = c.done.io(IoType::Write, slba, nlb, Some(zeroes));
        io.fua = c.sqe.fua();
        io
    } else {
        return Err(Status::generic(sc::INVALID_FIELD));
    };
    c.ch.submit(io);
    Ok(1)
}

/// Dataset Management: deallocate ranges become unmaps (other attributes
/// are hints we may ignore); empty ranges are skipped.
fn deallocate(c: &mut Command<'_>) -> Issued {
    let (sqe, ns) = (c.sqe, c.ns);
    let nr = dsm::num_ranges(sqe.cdw10);
    let Some(buf) = c.data.take() else {
        return Err(Status::generic(sc::DATA_SGL_LENGTH_INVALID));
    };
    if (c.data_len as usize) < nr * dsm::RANGE_SIZE {
        return Err(Status::generic(sc::DATA_SGL_LENGTH_INVALID));
    }
    if sqe.cdw11 & dsm::ATTR_DEALLOCATE == 0 || !ns.bdev.io_type_supported(IoType::Unmap) {
        return Ok(0);
    }
    let mut ranges = Vec::with_capacity(nr);
    for r in buf.as_slice().chunks_exact(dsm::RANGE_SIZE).take(nr) {
        let r = dsm::Range::decode(r);
        check_range(ns, r.slba, r.nlb as u64)?;
        if r.nlb > 0 {
            ranges.push(r);
        }
    }
    for r in &ranges {
        c.ch.submit(c.done.io(IoType::Unmap, r.slba, r.nlb as u64, None));
    }
    Ok(ranges.len() as u32)
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
