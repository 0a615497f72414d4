//! I/O descriptors.

use std::any::Any;
use std::cell::RefCell;
use std::rc::Rc;

use reactor::DmaBuf;

use crate::channel::ChannelInner;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoType {
    Read,
    Write,
    Unmap,
    Flush,
    Reset,
    WriteZeroes,
}

impl IoType {
    pub const ALL: [IoType; 6] = [
        IoType::Read,
        IoType::Write,
        IoType::Unmap,
        IoType::Flush,
        IoType::Reset,
        IoType::WriteZeroes,
    ];

    /// Whether the I/O modifies the device (needs a writable descriptor).
    pub fn is_write(self) -> bool {
        matches!(
            self,
            IoType::Write | IoType::Unmap | IoType::Flush | IoType::WriteZeroes
        )
    }

    /// SPDK's name in `supported_io_types`.
    pub fn name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Unmap => "unmap",
            IoType::Flush => "flush",
            IoType::Reset => "reset",
            IoType::WriteZeroes => "write_zeroes",
        }
    }
}

/// Completion status, as SPDK's `spdk_bdev_io_status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoStatus {
    Pending,
    Success,
    Failed,
    /// Out of resources: the generic layer retries the I/O.
    NoMem,
    Aborted,
    Miscompare,
    /// An NVMe completion status (status code type, status code).
    NvmeError {
        sct: u8,
        sc: u8,
    },
}

impl IoStatus {
    pub fn is_success(self) -> bool {
        self == IoStatus::Success
    }

    /// SPDK's key in `io_error` of `bdev_get_iostat`.
    pub fn name(self) -> &'static str {
        match self {
            IoStatus::Pending => "pending",
            IoStatus::Success => "success",
            IoStatus::Failed => "failed",
            IoStatus::NoMem => "nomem",
            IoStatus::Aborted => "aborted",
            IoStatus::Miscompare => "miscompare",
            IoStatus::NvmeError { .. } => "nvme_error",
        }
    }
}

/// A completion closure: it receives the I/O back (management path; it
/// costs an allocation when it captures anything).
pub type IoCallback = Box<dyn FnOnce(Box<BdevIo>)>;

/// A completion function: it receives the I/O back, its context in
/// [`BdevIo::cb_arg`] / [`BdevIo::cb_ctx`] (SPDK's completion callback and
/// `cb_arg`). No allocation; the function stays set, so the I/O can be
/// submitted again as it is, or given back with [`BdevIo::free`].
pub type IoDoneFn = fn(Box<BdevIo>);

pub(crate) enum Completion {
    None,
    Closure(IoCallback),
    Fn(IoDoneFn),
}

/// One stacked level of a forwarded I/O ([`crate::IoChannel::forward`]):
/// what the upper bdev's generic layer and module had in the I/O.
pub(crate) struct Frame {
    pub(crate) ch: Rc<ChannelInner>,
    pub(crate) submit_ns: u64,
    pub(crate) driver_ctx: u64,
    /// Call the upper module's `ChannelOps::forward_done` (else complete
    /// the upper level with the base's status at once).
    pub(crate) hook: bool,
}

/// Levels a descriptor forwards through in place; a deeper stack forwards
/// with child I/Os from there on (correct, only slower).
pub(crate) const MAX_FRAMES: usize = 4;

/// Descriptors a reactor keeps for reuse (SPDK's per-thread bdev_io cache).
const CACHE_MAX: usize = 4096;

thread_local! {
    // Boxes, not values: a descriptor is handed around as its box.
    #[allow(clippy::vec_box)]
    static CACHE: RefCell<Vec<Box<BdevIo>>> = const { RefCell::new(Vec::new()) };
}

/// One I/O. Owned by whoever holds it: the submitter until submit, the
/// module until it completes it, then the submitter's completion again.
/// Descriptors come from a per-reactor cache and go back to it with
/// [`BdevIo::free`] (dropping one instead is correct, just not reused).
pub struct BdevIo {
    pub io_type: IoType,
    pub offset_blocks: u64,
    pub num_blocks: u64,
    /// Data buffer for read/write: at least `num_blocks * block_size` bytes.
    pub buf: Option<DmaBuf>,
    /// Force unit access (write through the device's volatile cache).
    pub fua: bool,
    pub status: IoStatus,
    /// The submitter's context for an [`IoDoneFn`] completion (untouched
    /// by the bdev layer and modules).
    pub cb_arg: Option<Rc<dyn Any>>,
    /// The submitter's small context (e.g. which slot or request).
    pub cb_ctx: u64,
    pub(crate) cb: Completion,
    /// The channel the I/O is in flight on: `Some` from submit to
    /// completion, at every level of a forwarded I/O.
    pub(crate) ch: Option<Rc<ChannelInner>>,
    pub(crate) submit_ns: u64,
    /// Free for the module that currently owns the I/O (saved and restored
    /// around a forward, so each level has its own).
    pub driver_ctx: u64,
    pub(crate) frames: [Option<Frame>; MAX_FRAMES],
    pub(crate) depth: u8,
}

impl BdevIo {
    fn alloc(
        io_type: IoType,
        offset_blocks: u64,
        num_blocks: u64,
        buf: Option<DmaBuf>,
        cb: Completion,
    ) -> Box<BdevIo> {
        let cached = CACHE.with(|c| c.try_borrow_mut().ok().and_then(|mut c| c.pop()));
        match cached {
            Some(mut io) => {
                io.debug_check_idle();
                io.io_type = io_type;
                io.offset_blocks = offset_blocks;
                io.num_blocks = num_blocks;
                io.buf = buf;
                io.cb = cb;
                io
            }
            None => Box::new(BdevIo {
                io_type,
                offset_blocks,
                num_blocks,
                buf,
                fua: false,
                status: IoStatus::Pending,
                cb_arg: None,
                cb_ctx: 0,
                cb,
                ch: None,
                submit_ns: 0,
                driver_ctx: 0,
                frames: [const { None }; MAX_FRAMES],
                depth: 0,
            }),
        }
    }

    pub fn new(
        io_type: IoType,
        offset_blocks: u64,
        num_blocks: u64,
        buf: Option<DmaBuf>,
        cb: impl FnOnce(Box<BdevIo>) + 'static,
    ) -> Box<BdevIo> {
        Self::alloc(
            io_type,
            offset_blocks,
            num_blocks,
            buf,
            Completion::Closure(Box::new(cb)),
        )
    }

    /// A descriptor from this reactor's cache completed through `done`, with
    /// `cb_arg` / `cb_ctx` as its context: the data path's allocation-free
    /// form (SPDK's `spdk_bdev_read(..., cb, cb_arg)`).
    pub fn with_fn(
        io_type: IoType,
        offset_blocks: u64,
        num_blocks: u64,
        buf: Option<DmaBuf>,
        done: IoDoneFn,
        cb_arg: Option<Rc<dyn Any>>,
        cb_ctx: u64,
    ) -> Box<BdevIo> {
        let mut io = Self::alloc(
            io_type,
            offset_blocks,
            num_blocks,
            buf,
            Completion::Fn(done),
        );
        io.cb_arg = cb_arg;
        io.cb_ctx = cb_ctx;
        io
    }

    pub fn read(
        offset_blocks: u64,
        num_blocks: u64,
        buf: DmaBuf,
        cb: impl FnOnce(Box<BdevIo>) + 'static,
    ) -> Box<BdevIo> {
        Self::new(IoType::Read, offset_blocks, num_blocks, Some(buf), cb)
    }

    pub fn write(
        offset_blocks: u64,
        num_blocks: u64,
        buf: DmaBuf,
        cb: impl FnOnce(Box<BdevIo>) + 'static,
    ) -> Box<BdevIo> {
        Self::new(IoType::Write, offset_blocks, num_blocks, Some(buf), cb)
    }

    /// Give a completed descriptor back to this reactor's cache (SPDK's
    /// `spdk_bdev_free_io`). What it still holds (buffer, context) is
    /// dropped. Only for an I/O that is not in flight: the submitter calls
    /// it from (or after) its completion.
    pub fn free(mut self: Box<Self>) {
        self.debug_check_idle();
        if self.ch.is_some() || self.depth != 0 {
            // Still in flight somewhere: never recycle it (debug builds
            // stopped above); dropping it is the safe way out.
            tracing::error!(io = ?self, "free of an I/O in flight; dropped instead");
            return;
        }
        self.buf = None;
        self.cb = Completion::None;
        self.cb_arg = None;
        self.cb_ctx = 0;
        self.fua = false;
        self.status = IoStatus::Pending;
        self.driver_ctx = 0;
        self.submit_ns = 0;
        CACHE.with(|c| {
            if let Ok(mut c) = c.try_borrow_mut() {
                if c.len() < CACHE_MAX {
                    c.push(self);
                }
            }
        });
    }

    /// In debug builds, stop at a descriptor that is in flight where it
    /// must not be (recycled, reused, or freed while a module has it).
    #[inline]
    pub(crate) fn debug_check_idle(&self) {
        debug_assert!(
            self.ch.is_none() && self.depth == 0,
            "bdev I/O reused while in flight: {self:?}"
        );
    }

    /// Complete the I/O (module side). Exactly once per submitted I/O; may
    /// be called inline from `submit`: the generic layer then defers the
    /// user callback to the next loop iteration.
    pub fn complete(mut self: Box<Self>, status: IoStatus) {
        debug_assert!(
            self.ch.is_some(),
            "completion of an I/O not in flight: {self:?}"
        );
        self.status = status;
        crate::channel::complete_io(self);
    }

    /// The bdev this I/O was submitted to (set by the generic layer at
    /// submit; `None` before). For a forwarded I/O, the level that has it.
    pub fn bdev(&self) -> Option<&std::sync::Arc<crate::Bdev>> {
        self.ch.as_ref().map(|c| &c.bdev)
    }

    /// Whether the I/O is in flight (submitted and not yet completed back
    /// to its submitter).
    pub fn in_flight(&self) -> bool {
        self.ch.is_some() || self.depth != 0
    }

    /// Run the submitter's completion (the I/O has left every channel).
    pub(crate) fn call_back(mut self: Box<Self>) {
        debug_assert!(!self.in_flight(), "callback of an I/O in flight: {self:?}");
        match std::mem::replace(&mut self.cb, Completion::None) {
            Completion::Closure(cb) => cb(self),
            Completion::Fn(f) => {
                // Stays set: the submitter may submit the same I/O again.
                self.cb = Completion::Fn(f);
                f(self)
            }
            Completion::None => {
                tracing::error!(io = ?self, "completed I/O has no completion callback");
            }
        }
    }
}

impl std::fmt::Debug for BdevIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BdevIo")
            .field("type", &self.io_type)
            .field("offset_blocks", &self.offset_blocks)
            .field("num_blocks", &self.num_blocks)
            .field("status", &self.status)
            .field("in_flight", &self.ch.is_some())
            .field("depth", &self.depth)
            .finish()
    }
}

/// Descriptors in this reactor's cache (tests).
#[cfg(test)]
pub(crate) fn cache_len() -> usize {
    CACHE.with(|c| c.borrow().len())
}
