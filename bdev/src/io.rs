//! I/O descriptors.

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

pub type IoCallback = Box<dyn FnOnce(Box<BdevIo>)>;

/// One I/O. Owned by whoever holds it: the submitter until submit, the
/// module until it completes it, then the submitter's callback again.
pub struct BdevIo {
    pub io_type: IoType,
    pub offset_blocks: u64,
    pub num_blocks: u64,
    /// Data buffer for read/write: at least `num_blocks * block_size` bytes.
    pub buf: Option<DmaBuf>,
    /// Force unit access (write through the device's volatile cache).
    pub fua: bool,
    pub status: IoStatus,
    pub(crate) cb: Option<IoCallback>,
    pub(crate) ch: Option<Rc<ChannelInner>>,
    pub(crate) submit_ns: u64,
    /// Free for the module that currently owns the I/O.
    pub driver_ctx: u64,
}

impl BdevIo {
    pub fn new(
        io_type: IoType,
        offset_blocks: u64,
        num_blocks: u64,
        buf: Option<DmaBuf>,
        cb: impl FnOnce(Box<BdevIo>) + 'static,
    ) -> Box<BdevIo> {
        Box::new(BdevIo {
            io_type,
            offset_blocks,
            num_blocks,
            buf,
            fua: false,
            status: IoStatus::Pending,
            cb: Some(Box::new(cb)),
            ch: None,
            submit_ns: 0,
            driver_ctx: 0,
        })
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

    /// Complete the I/O (module side). Exactly once per submitted I/O; may
    /// be called inline from `submit`: the generic layer then defers the
    /// user callback to the next loop iteration.
    pub fn complete(mut self: Box<Self>, status: IoStatus) {
        self.status = status;
        crate::channel::complete_io(self);
    }

    /// The bdev this I/O was submitted to (set by the generic layer at
    /// submit; `None` before).
    pub fn bdev(&self) -> Option<&std::sync::Arc<crate::Bdev>> {
        self.ch.as_ref().map(|c| &c.bdev)
    }

    /// Take the callback and run it (used for I/O that never reached a
    /// channel, e.g. rejected at submit).
    pub(crate) fn call_back(mut self: Box<Self>) {
        if let Some(cb) = self.cb.take() {
            cb(self);
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
            .finish()
    }
}
