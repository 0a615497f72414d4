//! File- and block-device-backed bdevs over io_uring: SPDK's `uring`
//! (`bdev_uring_*`, "URING bdev") and `aio` (`bdev_aio_*`, "AIO disk")
//! modules share this code; they differ only in their RPC params, their
//! `driver_specific` / `save_config` output and which I/O types they
//! advertise.
//!
//! * The backing file is opened once, with `O_DIRECT` when the filesystem
//!   allows it (falling back to buffered I/O with a warning), and the fd is
//!   shared by every reactor's channel through an `Arc`.
//! * Each channel submits to its own reactor's ring
//!   ([`reactor::uring::submit`]); completions run on that reactor.
//! * Read/Write map to `IORING_OP_READ`/`WRITE` (FUA as `RWF_DSYNC`), with
//!   short transfers resubmitted for the remainder; Flush to `fdatasync`;
//!   Unmap and WriteZeroes to `fallocate` (punch hole / zero range), falling
//!   back to writing zeroes when the filesystem or device cannot.
//! * Reset completes once *this channel's* in-flight I/O has drained (the
//!   generic layer already stops new I/O during a reset). Channels on other
//!   reactors are not waited for: each reactor sees its own completions.
//! * `bdev_*_rescan` re-reads the size. The generic layer fixes a bdev's
//!   block count at registration, so a changed size is refused with -EINVAL;
//!   a size of zero (device gone) hot-removes the bdev, as SPDK does.

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ::rpc::{DecodeError, RpcError};
use reactor::uring::{op, ty};
use reactor::DmaBuf;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::rpc::{register_action, register_create, register_delete, NameParams};
use crate::{Bdev, BdevBuilder, BdevError, BdevIo, BdevOps, ChannelOps, IoStatus, IoType};

pub const URING_PRODUCT_NAME: &str = "URING bdev";
pub const AIO_PRODUCT_NAME: &str = "AIO disk";

/// Largest single read/write handed to the kernel; larger I/O is issued in
/// pieces (the kernel caps one transfer near 2 GiB anyway).
const MAX_CHUNK: u64 = 1 << 30;
/// Size of the per-channel zero buffer used when fallocate cannot zero.
const ZERO_BUF_LEN: usize = 1 << 20;
/// Logical block size assumed for regular files (what the page cache and
/// every Linux filesystem accept).
const FILE_LOGICAL_BLOCK: u32 = 512;

/// Which SPDK module a bdev belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Uring,
    Aio,
}

impl Flavor {
    pub fn module_name(self) -> &'static str {
        match self {
            Flavor::Uring => "uring",
            Flavor::Aio => "aio",
        }
    }

    pub fn product_name(self) -> &'static str {
        match self {
            Flavor::Uring => URING_PRODUCT_NAME,
            Flavor::Aio => AIO_PRODUCT_NAME,
        }
    }
}

/// Create-time failures. OS errors keep their errno so the RPC reply
/// carries SPDK's `-errno` code, with a message naming the path.
#[derive(Debug, thiserror::Error)]
pub enum FileBdevError {
    #[error(transparent)]
    Bdev(#[from] BdevError),
    #[error("{what} {path}: {msg}")]
    Os {
        what: &'static str,
        path: String,
        errno: i32,
        msg: String,
    },
}

impl FileBdevError {
    fn os(what: &'static str, path: &str, e: &std::io::Error) -> Self {
        // Errors without an errno (e.g. a NUL byte in the path) are bad input.
        let errno = e.raw_os_error().unwrap_or(libc::EINVAL);
        FileBdevError::Os {
            what,
            path: path.to_string(),
            errno,
            msg: RpcError::errno(errno).message,
        }
    }

    fn invalid(msg: String) -> Self {
        FileBdevError::Bdev(BdevError::Invalid(msg))
    }

    /// Positive errno of the reply.
    pub fn errno(&self) -> i32 {
        match self {
            FileBdevError::Bdev(e) => e.errno(),
            FileBdevError::Os { errno, .. } => *errno,
        }
    }
}

impl From<FileBdevError> for RpcError {
    fn from(e: FileBdevError) -> RpcError {
        match e {
            FileBdevError::Bdev(b) => b.into(),
            FileBdevError::Os { errno, .. } => {
                tracing::error!(error = %e, "file bdev");
                RpcError::errno_msg(errno, e.to_string())
            }
        }
    }
}

/// Everything `create` needs; the RPC params map onto it.
#[derive(Clone, Debug)]
pub struct FileBdevOpts {
    pub flavor: Flavor,
    pub name: String,
    pub filename: String,
    /// 0: autodetect (the device's logical block size, 512 for files).
    pub block_size: u32,
    pub uuid: Option<Uuid>,
    /// Open `O_RDONLY`; writes are reported unsupported.
    pub readonly: bool,
    /// Preallocate a regular file's blocks at create, and (as SPDK's aio)
    /// advertise unmap/write_zeroes. The uring flavour always advertises them.
    pub fallocate: bool,
    /// Submit reads/writes with `RWF_NOWAIT` (aio's `nowait`).
    pub nowait: bool,
    /// Try `O_DIRECT`. The RPCs always do; tests turn it off to exercise
    /// the buffered path on filesystems that would accept it.
    pub allow_direct: bool,
}

impl FileBdevOpts {
    pub fn new(flavor: Flavor, name: impl Into<String>, filename: impl Into<String>) -> Self {
        FileBdevOpts {
            flavor,
            name: name.into(),
            filename: filename.into(),
            block_size: 0,
            uuid: None,
            readonly: false,
            fallocate: false,
            nowait: false,
            allow_direct: true,
        }
    }
}

/// The open backing file, shared by the bdev and all its channels; the fd
/// closes when the last in-flight I/O and channel let go of it.
struct Disk {
    file: File,
    filename: String,
    flavor: Flavor,
    is_blockdev: bool,
    direct: bool,
    block_size: u32,
    block_size_override: bool,
    readonly: bool,
    fallocate: bool,
    nowait: bool,
    /// The fs/device refused `FALLOC_FL_ZERO_RANGE`: zero by writing.
    no_zero_range: AtomicBool,
    /// The fs/device refused `FALLOC_FL_PUNCH_HOLE`: unmap by writing zeroes.
    no_punch_hole: AtomicBool,
}

impl Disk {
    /// Set once the fs/device refused fallocate `mode` (punch hole, else
    /// zero range).
    fn refused(&self, mode: i32) -> &AtomicBool {
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            &self.no_punch_hole
        } else {
            &self.no_zero_range
        }
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Current size in bytes (file length or device capacity).
    fn size(&self) -> std::io::Result<u64> {
        backing_size(&self.file, self.is_blockdev)
    }
}

/// `BdevOps` of both flavours.
pub struct FileBdev {
    disk: Arc<Disk>,
}

impl FileBdev {
    pub fn filename(&self) -> &str {
        &self.disk.filename
    }

    /// Whether I/O bypasses the page cache (`O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.disk.direct
    }

    pub fn flavor(&self) -> Flavor {
        self.disk.flavor
    }
}

impl BdevOps for FileBdev {
    fn module_name(&self) -> &'static str {
        self.disk.flavor.module_name()
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        let d = &self.disk;
        match t {
            IoType::Read | IoType::Flush | IoType::Reset => true,
            IoType::Write => !d.readonly,
            // SPDK's aio only offers these with `fallocate`.
            IoType::Unmap | IoType::WriteZeroes => {
                !d.readonly && (d.flavor == Flavor::Uring || d.fallocate)
            }
        }
    }

    /// Clean shutdown and delete: make what was written durable before the
    /// file is closed (the device's volatile cache included).
    fn destruct(&self, _bdev: &Arc<Bdev>) -> crate::BoxFuture {
        let disk = self.disk.clone();
        Box::pin(async move {
            if disk.readonly {
                return;
            }
            let fd = std::os::fd::AsRawFd::as_raw_fd(&disk.file);
            let e = reactor::uring::op::Fsync::new(reactor::uring::ty::Fd(fd))
                .flags(reactor::uring::ty::FsyncFlags::DATASYNC)
                .build();
            // SAFETY: `disk` (and so the fd) lives in this future until the
            // result arrives; the SQE references no memory.
            let res = unsafe { reactor::uring::run(e) }.await;
            if res < 0 {
                tracing::error!(path = %disk.filename, error = %std::io::Error::from_raw_os_error(-res), "final fdatasync failed");
            }
        })
    }

    fn has_block_status(&self) -> bool {
        !self.disk.is_blockdev
    }

    fn create_channel(&self, _bdev: &Arc<Bdev>) -> Box<dyn ChannelOps> {
        Box::new(FileChannel {
            st: Rc::new(ChanState {
                disk: self.disk.clone(),
                inflight: Cell::new(0),
                resets: RefCell::new(Vec::new()),
                zero_buf: RefCell::new(None),
            }),
        })
    }

    fn dump_info_json(&self, _bdev: &Bdev) -> Value {
        let d = &self.disk;
        match d.flavor {
            Flavor::Uring => json!({ "uring": { "filename": d.filename } }),
            Flavor::Aio => json!({
                "aio": {
                    "filename": d.filename,
                    "block_size_override": d.block_size_override,
                    "readonly": d.readonly,
                    "fallocate": d.fallocate,
                    "nowait": d.nowait,
                }
            }),
        }
    }

    fn write_config_json(&self, b: &Bdev) -> Option<Value> {
        let d = &self.disk;
        let mut p = Map::new();
        p.insert("name".into(), json!(b.name()));
        let method = match d.flavor {
            Flavor::Uring => {
                p.insert("block_size".into(), json!(b.block_size()));
                p.insert("filename".into(), json!(d.filename));
                p.insert("uuid".into(), json!(b.uuid().to_string()));
                "bdev_uring_create"
            }
            Flavor::Aio => {
                // As SPDK: an autodetected block size is detected again.
                if d.block_size_override {
                    p.insert("block_size".into(), json!(b.block_size()));
                }
                p.insert("filename".into(), json!(d.filename));
                p.insert("readonly".into(), json!(d.readonly));
                p.insert("fallocate".into(), json!(d.fallocate));
                p.insert("uuid".into(), json!(b.uuid().to_string()));
                p.insert("nowait".into(), json!(d.nowait));
                "bdev_aio_create"
            }
        };
        Some(json!({ "method": method, "params": Value::Object(p) }))
    }
}

// ---------------------------------------------------------------------------
// Opening and sizing the backing file.

// BLKGETSIZE64 = _IOR(0x12, 114, size_t): device capacity in bytes.
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
// BLKSSZGET = _IO(0x12, 104) returning an int: logical sector size.
nix::ioctl_read_bad!(blksszget, libc::BLKSSZGET, libc::c_int);

fn backing_size(file: &File, is_blockdev: bool) -> std::io::Result<u64> {
    if is_blockdev {
        let mut size = 0u64;
        // SAFETY: the fd is open for the call's duration and `size` is a
        // valid u64 for the kernel to fill.
        unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(std::io::Error::from)?;
        Ok(size)
    } else {
        Ok(file.metadata()?.len())
    }
}

fn logical_block_size(file: &File) -> std::io::Result<u32> {
    let mut lbs: libc::c_int = 0;
    // SAFETY: as above; the kernel writes one int.
    unsafe { blksszget(file.as_raw_fd(), &mut lbs) }.map_err(std::io::Error::from)?;
    u32::try_from(lbs).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// `O_DIRECT` offset alignment a regular file needs (`statx` DIOALIGN):
/// `None` if the kernel/fs does not say, `Some(0)` if the file cannot do
/// direct I/O at all.
fn dio_offset_align(file: &File) -> Option<u32> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: AT_EMPTY_PATH with an empty C string queries the open fd
    // itself; `stx` is a properly sized, zeroed buffer for the result.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: statx succeeded and filled the struct (it was zeroed before,
    // so every field is initialised either way).
    let stx = unsafe { stx.assume_init() };
    (stx.stx_mask & libc::STATX_DIOALIGN != 0).then_some(stx.stx_dio_offset_align)
}

/// Turn `O_DIRECT` off on an open fd (Linux allows it via F_SETFL).
fn clear_direct(file: &File) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fl = fcntl(file.as_raw_fd(), FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let fl = OFlag::from_bits_truncate(fl) & !OFlag::O_DIRECT;
    fcntl(file.as_raw_fd(), FcntlArg::F_SETFL(fl)).map_err(std::io::Error::from)?;
    Ok(())
}

/// Open the backing file, with `O_DIRECT` when wanted and possible.
fn open_backing(
    path: &str,
    readonly: bool,
    try_direct: bool,
) -> Result<(File, bool), FileBdevError> {
    let mut oo = OpenOptions::new();
    oo.read(true).write(!readonly);
    if try_direct {
        match oo.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => return Ok((f, true)),
            // Filesystems without direct I/O refuse the flag with EINVAL.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    path,
                    "O_DIRECT refused by the filesystem; using buffered I/O"
                );
            }
            Err(e) => return Err(FileBdevError::os("Could not open", path, &e)),
        }
    }
    let f = oo
        .open(path)
        .map_err(|e| FileBdevError::os("Could not open", path, &e))?;
    Ok((f, false))
}

/// Open, size and register a uring or aio bdev.
pub fn create(o: FileBdevOpts) -> Result<Arc<Bdev>, FileBdevError> {
    if crate::get(&o.name).is_some() {
        return Err(BdevError::Exists(o.name).into());
    }
    let path = o.filename.as_str();
    let (file, mut direct) = open_backing(path, o.readonly, o.allow_direct)?;
    let ft = file
        .metadata()
        .map_err(|e| FileBdevError::os("Could not stat", path, &e))?
        .file_type();
    let is_blockdev = ft.is_block_device();
    if !is_blockdev && !ft.is_file() {
        return Err(FileBdevError::invalid(format!(
            "{path} is neither a regular file nor a block device"
        )));
    }
    let size = backing_size(&file, is_blockdev)
        .map_err(|e| FileBdevError::os("Could not get the size of", path, &e))?;
    let detected = if is_blockdev {
        logical_block_size(&file)
            .map_err(|e| FileBdevError::os("Could not get the block size of", path, &e))?
    } else {
        FILE_LOGICAL_BLOCK
    };

    let block_size_override = o.block_size != 0;
    let block_size = if block_size_override {
        if o.block_size < detected {
            return Err(FileBdevError::invalid(format!(
                "Specified block size {} is smaller than the logical block size {detected} of {path}",
                o.block_size
            )));
        }
        o.block_size
    } else {
        detected
    };
    if block_size < 512 || !block_size.is_power_of_two() {
        return Err(FileBdevError::invalid(format!(
            "Invalid block size {block_size} (must be a power of two, at least 512)"
        )));
    }
    if size < block_size as u64 {
        return Err(FileBdevError::invalid(format!(
            "{path} ({size} bytes) is smaller than one block ({block_size} bytes)"
        )));
    }
    if !size.is_multiple_of(block_size as u64) {
        return Err(FileBdevError::invalid(format!(
            "Disk size {size} of {path} is not a multiple of block size {block_size}"
        )));
    }

    // Some filesystems accept O_DIRECT at open but need a coarser alignment
    // than our block size, or none at all: go buffered rather than fail
    // every I/O with EINVAL later.
    if direct && !is_blockdev {
        if let Some(align) = dio_offset_align(&file) {
            if align == 0 || align > block_size {
                tracing::warn!(
                    path,
                    align,
                    block_size,
                    "direct I/O alignment does not fit; using buffered I/O"
                );
                clear_direct(&file)
                    .map_err(|e| FileBdevError::os("Could not reconfigure", path, &e))?;
                direct = false;
            }
        }
    }

    if o.fallocate && !is_blockdev {
        if o.readonly {
            tracing::warn!(path, "fallocate ignored on a read-only bdev");
        } else {
            preallocate(&file, size, path)?;
        }
    }

    let disk = Arc::new(Disk {
        file,
        filename: o.filename.clone(),
        flavor: o.flavor,
        is_blockdev,
        direct,
        block_size,
        block_size_override,
        readonly: o.readonly,
        fallocate: o.fallocate,
        nowait: o.nowait,
        no_zero_range: AtomicBool::new(false),
        no_punch_hole: AtomicBool::new(false),
    });
    let b = BdevBuilder::new(o.name, o.flavor.product_name())
        .block_size(block_size)
        .num_blocks(size / block_size as u64)
        .uuid(o.uuid)
        .write_cache(true)
        .register(FileBdev { disk })?;
    tracing::info!(bdev = %b.name(), module = o.flavor.module_name(), path, direct, blockdev = is_blockdev, "file bdev created");
    Ok(b)
}

/// Allocate every block of a regular file now, so later writes cannot fail
/// with ENOSPC. A filesystem without fallocate only gets a warning.
fn preallocate(file: &File, size: u64, path: &str) -> Result<(), FileBdevError> {
    let len = libc::off_t::try_from(size)
        .map_err(|_| FileBdevError::invalid(format!("{path} is too large")))?;
    // SAFETY: plain syscall on an open fd; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            tracing::warn!(path, "filesystem cannot preallocate; continuing without");
        } else {
            return Err(FileBdevError::os("Could not preallocate", path, &e));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The I/O path. Every operation's callback owns the BdevIo (and so its
// buffer) and an Rc of the channel state (and so the fd) until the kernel
// has completed it.

struct ChanState {
    disk: Arc<Disk>,
    /// I/O submitted to this channel and not yet completed.
    inflight: Cell<u64>,
    /// Resets waiting for `inflight` to reach zero (boxed: that is what
    /// `BdevIo::complete` takes).
    #[allow(clippy::vec_box)]
    resets: RefCell<Vec<Box<BdevIo>>>,
    /// Zeroes for write_zeroes/unmap when fallocate cannot do it; shared by
    /// concurrent writes (the kernel only reads it).
    zero_buf: RefCell<Option<Rc<DmaBuf>>>,
}

impl ChanState {
    fn zero_buf(&self) -> Rc<DmaBuf> {
        self.zero_buf
            .borrow_mut()
            .get_or_insert_with(|| {
                let len = ZERO_BUF_LEN.max(self.disk.block_size as usize);
                Rc::new(DmaBuf::zeroed(len))
            })
            .clone()
    }
}

struct FileChannel {
    st: Rc<ChanState>,
}

/// Allocation of `len` bytes at `off` in a regular file, from
/// SEEK_DATA/SEEK_HOLE (answered from the filesystem's extent map, no data
/// read): the first run only, data or hole. Block devices and filesystems
/// without support report data.
fn seek_status(fd: RawFd, off: u64, len: u64) -> (u64, bool) {
    let seek = |whence| {
        // SAFETY: lseek on an open fd passes no memory.
        let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error())
        } else {
            Ok(r as u64)
        }
    };
    match seek(libc::SEEK_DATA) {
        Ok(d) if d > off => ((d - off).min(len), true),
        // No data after `off`: the rest of the file is a hole.
        Err(Some(libc::ENXIO)) => (len, true),
        Ok(_) => match seek(libc::SEEK_HOLE) {
            Ok(h) if h > off => ((h - off).min(len), false),
            _ => (len, false),
        },
        Err(_) => (len, false),
    }
}

impl ChannelOps for FileChannel {
    fn block_status(&self, offset_blocks: u64, num_blocks: u64, cb: crate::BlockStatusCb) {
        let d = &self.st.disk;
        let bs = d.block_size as u64;
        let mut out = Vec::new();
        if d.is_blockdev {
            out.push(crate::BlockExtent::data(num_blocks));
        } else {
            // A few extents per call: the caller asks again for the rest.
            let (mut at, end) = (offset_blocks * bs, (offset_blocks + num_blocks) * bs);
            while at < end && out.len() < 64 {
                let (n, hole) = seek_status(d.fd(), at, end - at);
                // Round to whole blocks: a block that is partly data is data.
                let blocks = if hole { n / bs } else { n.div_ceil(bs) };
                let blocks = blocks.max(1).min((end - at) / bs);
                let e = if hole && blocks * bs <= n {
                    crate::BlockExtent::hole(blocks)
                } else {
                    crate::BlockExtent::data(blocks)
                };
                match out.last_mut() {
                    Some(l) if l.hole == e.hole => l.num_blocks += e.num_blocks,
                    _ => out.push(e),
                }
                at += blocks * bs;
            }
        }
        reactor::defer(move || cb(Ok(out)));
    }

    fn submit(&self, io: Box<BdevIo>) {
        let st = &self.st;
        if io.io_type == IoType::Reset {
            if st.inflight.get() == 0 {
                io.complete(IoStatus::Success);
            } else {
                st.resets.borrow_mut().push(io);
            }
            return;
        }
        st.inflight.set(st.inflight.get() + 1);
        match io.io_type {
            IoType::Read | IoType::Write => rw(self.st.clone(), io, 0, st.disk.nowait),
            IoType::Flush => flush(self.st.clone(), io),
            // Nothing to do (and fallocate would say EINVAL), as malloc.
            IoType::Unmap | IoType::WriteZeroes if io.num_blocks == 0 => {
                finish(self.st.clone(), io, IoStatus::Success)
            }
            IoType::Unmap | IoType::WriteZeroes => {
                let mode = if io.io_type == IoType::Unmap {
                    libc::FALLOC_FL_PUNCH_HOLE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE
                };
                if st.disk.refused(mode).load(Ordering::Relaxed) {
                    zero_fill(self.st.clone(), io, 0)
                } else {
                    fallocate(self.st.clone(), io, mode | libc::FALLOC_FL_KEEP_SIZE)
                }
            }
            // Took the early return above; completing keeps this total.
            IoType::Reset => finish(self.st.clone(), io, IoStatus::Success),
        }
    }
}

/// Complete an I/O of this channel; release waiting resets once drained.
fn finish(st: Rc<ChanState>, io: Box<BdevIo>, status: IoStatus) {
    st.inflight.set(st.inflight.get().saturating_sub(1));
    io.complete(status);
    if st.inflight.get() == 0 && !st.resets.borrow().is_empty() {
        let resets = std::mem::take(&mut *st.resets.borrow_mut());
        for r in resets {
            r.complete(IoStatus::Success);
        }
    }
}

/// Byte offset and length of an I/O's block range. The generic layer
/// checked the range lies inside the bdev, so neither overflows.
fn byte_range(st: &ChanState, io: &BdevIo) -> (u64, u64) {
    let bs = st.disk.block_size as u64;
    (io.offset_blocks * bs, io.num_blocks * bs)
}

/// Status for a failed CQE; `None` means "just resubmit".
fn error_status(st: &ChanState, io: &BdevIo, errno: i32) -> Option<IoStatus> {
    match errno {
        libc::EINTR => None,
        // Out of kernel resources: let the generic layer retry the I/O.
        libc::EAGAIN | libc::ENOMEM => Some(IoStatus::NoMem),
        _ => {
            tracing::warn!(
                path = %st.disk.filename,
                io_type = ?io.io_type,
                offset_blocks = io.offset_blocks,
                num_blocks = io.num_blocks,
                error = %std::io::Error::from_raw_os_error(errno),
                "file bdev I/O failed"
            );
            Some(IoStatus::Failed)
        }
    }
}

/// Issue the part of a read/write after its first `done` bytes.
fn rw(st: Rc<ChanState>, mut io: Box<BdevIo>, done: u64, nowait: bool) {
    let (off, total) = byte_range(&st, &io);
    let len = (total - done).min(MAX_CHUNK.max(st.disk.block_size as u64)) as u32;
    let ptr = match io.buf.as_mut() {
        // The generic layer checked the buffer; this only keeps a bad
        // caller from turning into memory unsafety.
        Some(b) if b.len() as u64 >= total => {
            // SAFETY: done < total <= b.len(), so the pointer stays inside
            // the buffer, and done + len <= total.
            unsafe { b.as_mut_ptr().add(done as usize) }
        }
        _ => return finish(st, io, IoStatus::Failed),
    };
    let mut flags = if nowait { libc::RWF_NOWAIT } else { 0 };
    let fd = ty::Fd(st.disk.fd());
    let entry = if io.io_type == IoType::Read {
        op::Read::new(fd, ptr, len)
            .offset(off + done)
            .rw_flags(flags)
            .build()
    } else {
        if io.fua {
            flags |= libc::RWF_DSYNC;
        }
        op::Write::new(fd, ptr as *const u8, len)
            .offset(off + done)
            .rw_flags(flags)
            .build()
    };
    // SAFETY: the callback owns `io`, whose heap-allocated DmaBuf `ptr`
    // points into, and `st`, whose Arc<Disk> keeps the fd open, until the
    // kernel has completed the operation.
    unsafe {
        reactor::uring::submit(entry, move |res| rw_done(st, io, done, total, nowait, res));
    }
}

fn rw_done(st: Rc<ChanState>, io: Box<BdevIo>, done: u64, total: u64, nowait: bool, res: i32) {
    if res < 0 {
        let errno = -res;
        // RWF_NOWAIT would block: go again and let io_uring's workers wait.
        if nowait && errno == libc::EAGAIN {
            return rw(st, io, done, false);
        }
        return match error_status(&st, &io, errno) {
            None => rw(st, io, done, nowait),
            Some(s) => finish(st, io, s),
        };
    }
    if res == 0 {
        // No progress: the file shrank under us (EOF) or the device is gone.
        tracing::warn!(path = %st.disk.filename, io_type = ?io.io_type, offset_blocks = io.offset_blocks, done, total, "short transfer made no progress");
        return finish(st, io, IoStatus::Failed);
    }
    let done = done + res as u64;
    if done < total {
        rw(st, io, done, nowait)
    } else {
        finish(st, io, IoStatus::Success)
    }
}

fn flush(st: Rc<ChanState>, io: Box<BdevIo>) {
    let entry = op::Fsync::new(ty::Fd(st.disk.fd()))
        .flags(ty::FsyncFlags::DATASYNC)
        .build();
    // SAFETY: fsync uses no memory; `st` keeps the fd open until completion.
    unsafe {
        reactor::uring::submit(entry, move |res| {
            if res >= 0 {
                return finish(st, io, IoStatus::Success);
            }
            match error_status(&st, &io, -res) {
                None => flush(st, io),
                Some(s) => finish(st, io, s),
            }
        });
    }
}

fn fallocate(st: Rc<ChanState>, io: Box<BdevIo>, mode: i32) {
    let (off, len) = byte_range(&st, &io);
    let entry = op::Fallocate::new(ty::Fd(st.disk.fd()), len)
        .offset(off)
        .mode(mode)
        .build();
    // SAFETY: fallocate uses no memory; `st` keeps the fd open until completion.
    unsafe {
        reactor::uring::submit(entry, move |res| fallocate_done(st, io, mode, res));
    }
}

fn fallocate_done(st: Rc<ChanState>, io: Box<BdevIo>, mode: i32, res: i32) {
    if res >= 0 {
        return finish(st, io, IoStatus::Success);
    }
    let errno = -res;
    if errno == libc::EOPNOTSUPP {
        // Remember, so later I/O goes straight to writing zeroes.
        if !st.disk.refused(mode).swap(true, Ordering::Relaxed) {
            tracing::info!(path = %st.disk.filename, mode, "fallocate mode not supported; writing zeroes instead");
        }
        return zero_fill(st, io, 0);
    }
    match error_status(&st, &io, errno) {
        None => fallocate(st, io, mode),
        Some(s) => finish(st, io, s),
    }
}

/// Write zeroes over an I/O's range from the shared zero buffer, starting
/// `done` bytes in.
fn zero_fill(st: Rc<ChanState>, io: Box<BdevIo>, done: u64) {
    let (off, total) = byte_range(&st, &io);
    let zb = st.zero_buf();
    let len = (total - done).min(zb.len() as u64) as u32;
    let entry = op::Write::new(ty::Fd(st.disk.fd()), zb.as_ptr(), len)
        .offset(off + done)
        .build();
    // SAFETY: the callback owns an Rc of the zero buffer (len bytes are
    // inside it) and `st` (the fd) until the kernel has completed the write.
    unsafe {
        reactor::uring::submit(entry, move |res| {
            let _keep = &zb;
            if res > 0 {
                let done = done + res as u64;
                return if done < total {
                    zero_fill(st, io, done)
                } else {
                    finish(st, io, IoStatus::Success)
                };
            }
            if res == 0 {
                tracing::warn!(path = %st.disk.filename, "zeroing write made no progress");
                return finish(st, io, IoStatus::Failed);
            }
            match error_status(&st, &io, -res) {
                None => zero_fill(st, io, done),
                Some(s) => finish(st, io, s),
            }
        });
    }
}

// ---------------------------------------------------------------------------
// RPCs.

/// `bdev_uring_create` params.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct UringCreateParams {
    pub filename: String,
    pub name: String,
    #[serde(default)]
    pub block_size: u32,
    pub uuid: Option<Uuid>,
}

/// `bdev_aio_create` params (rpc.py sends `false` for unset flags).
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AioCreateParams {
    pub name: String,
    pub filename: String,
    #[serde(default)]
    pub block_size: u32,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub fallocate: bool,
    pub uuid: Option<Uuid>,
    #[serde(default)]
    pub nowait: bool,
}

impl From<UringCreateParams> for FileBdevOpts {
    fn from(p: UringCreateParams) -> Self {
        FileBdevOpts {
            block_size: p.block_size,
            uuid: p.uuid,
            ..FileBdevOpts::new(Flavor::Uring, p.name, p.filename)
        }
    }
}

impl From<AioCreateParams> for FileBdevOpts {
    fn from(p: AioCreateParams) -> Self {
        FileBdevOpts {
            block_size: p.block_size,
            uuid: p.uuid,
            readonly: p.readonly,
            fallocate: p.fallocate,
            nowait: p.nowait,
            ..FileBdevOpts::new(Flavor::Aio, p.name, p.filename)
        }
    }
}

/// The bdev `name` if it belongs to `flavor`, else -ENODEV.
fn find(name: &str, flavor: Flavor) -> Result<Arc<Bdev>, RpcError> {
    crate::get(name)
        .filter(|b| !b.is_removing() && b.name() == name && b.module_name() == flavor.module_name())
        .filter(|b| b.ops_as::<FileBdev>().is_some())
        .ok_or_else(|| RpcError::errno(libc::ENODEV))
}

/// `bdev_{uring,aio}_rescan`: re-read the backing size (see module docs).
pub async fn rescan(name: &str, flavor: Flavor) -> Result<(), RpcError> {
    let b = find(name, flavor)?;
    let disk = match b.ops_as::<FileBdev>() {
        Some(f) => f.disk.clone(),
        None => return Err(RpcError::errno(libc::ENODEV)),
    };
    let size = disk.size().map_err(|e| {
        RpcError::from(FileBdevError::os(
            "Could not get the size of",
            &disk.filename,
            &e,
        ))
    })?;
    if size == 0 {
        tracing::warn!(bdev = name, path = %disk.filename, "backing device is gone; removing the bdev");
        crate::unregister_bdev(&b).await;
        return Ok(());
    }
    let blocks = size / b.block_size() as u64;
    if blocks == b.num_blocks() {
        return Ok(());
    }
    b.notify_blockcnt_change(blocks).map_err(RpcError::from)
}

pub fn register_methods() {
    register_create(
        "bdev_uring_create",
        DecodeError::Internal,
        |p: UringCreateParams| create(p.into()),
    );
    register_by_name(Flavor::Uring, "bdev_uring");
    register_create(
        "bdev_aio_create",
        DecodeError::Internal,
        |p: AioCreateParams| create(p.into()),
    );
    register_by_name(Flavor::Aio, "bdev_aio");
}

/// `<prefix>_delete` and `<prefix>_rescan` of one flavor.
fn register_by_name(flavor: Flavor, prefix: &str) {
    let delete = format!("{prefix}_delete");
    register_delete(&delete, flavor.module_name(), DecodeError::Internal);
    register_action(
        &format!("{prefix}_rescan"),
        DecodeError::Internal,
        move |p: NameParams| async move { rescan(&p.name, flavor).await },
    );
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::path::Path;
    use std::rc::Rc;

    use reactor::DmaBuf;
    use serde_json::json;

    use super::*;
    use crate::test_util::{
        delete_errno, open_ch, rpc_steps, two_cores, write_there_read_here, zeroed,
    };
    use crate::util::{self, run_on_reactor};

    /// A sparse temp file of `size` bytes in `dir`, or None if `dir` is
    /// not there (so the test skips that backend).
    fn tmpfile_in(dir: &str, size: u64) -> Option<tempfile::NamedTempFile> {
        if !Path::new(dir).is_dir() {
            return None;
        }
        let f = tempfile::Builder::new()
            .prefix("clone-tgt-bdev-")
            .tempfile_in(dir)
            .ok()?;
        f.as_file().set_len(size).unwrap();
        Some(f)
    }

    /// Run `f` with the path of a sparse temp file of `size` bytes in
    /// /var/tmp on a runtime of `core_mask` (as `run_on_reactor`); skip
    /// if there is no /var/tmp.
    fn on_tmpfile<F, Fut>(core_mask: u64, size: u64, f: F)
    where
        F: FnOnce(String) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        let Some(file) = tmpfile_in("/var/tmp", size) else {
            return;
        };
        let path = path_of(&file);
        run_on_reactor(core_mask, move || f(path));
    }

    /// Grow or shrink the file behind the bdev's back.
    fn set_file_len(path: &str, len: u64) {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(len).unwrap();
    }

    fn path_of(f: &tempfile::NamedTempFile) -> String {
        f.path().to_str().unwrap().to_string()
    }

    fn pattern(len: usize, seed: u8) -> DmaBuf {
        let mut b = DmaBuf::new(len);
        for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(13).wrapping_add(seed) | 1;
        }
        b
    }

    fn pread(path: &str, off: u64, len: usize) -> Vec<u8> {
        let f = File::open(path).unwrap();
        let mut v = vec![0u8; len];
        f.read_exact_at(&mut v, off).unwrap();
        v
    }

    fn opts(flavor: Flavor, name: &str, path: &str) -> FileBdevOpts {
        FileBdevOpts::new(flavor, name, path)
    }

    fn file_bdev(b: &Bdev) -> &FileBdev {
        b.ops_as::<FileBdev>().unwrap()
    }

    /// Write/read/FUA/flush/unmap/write_zeroes/reset on one backend.
    async fn exercise(name: &str, path: &str) {
        let desc = crate::open(name, true, |_| {}).unwrap();
        let ch = desc.channel();
        let bs = 512usize;
        for (i, &(off, n)) in [(0u64, 1u64), (1, 7), (63, 65), (4000, 256), (8191, 1)]
            .iter()
            .enumerate()
        {
            let w = pattern(n as usize * bs, i as u8);
            let expect = w.as_slice().to_vec();
            util::write(&ch, off, w, i % 2 == 1).await.unwrap();
            let r = util::read(&ch, off, n).await.unwrap();
            assert_eq!(r.as_slice(), &expect[..], "{name}: read back at {off}+{n}");
            // It landed at the right place in the file, too.
            assert_eq!(
                pread(path, off * bs as u64, expect.len()),
                expect,
                "{name}: file at {off}"
            );
        }
        // One large I/O, bigger than a single DmaBuf pool class boundary.
        let big = pattern(2 << 20, 99);
        let expect = big.as_slice().to_vec();
        util::write(&ch, 4096, big, true).await.unwrap();
        assert_eq!(
            util::read(&ch, 4096, 4096).await.unwrap().as_slice(),
            &expect[..]
        );

        util::simple(&ch, IoType::Flush, 0, 8192).await.unwrap();

        // Unmap blocks 1..8 (written above): zeroes, neighbours intact.
        let before0 = util::read(&ch, 0, 1).await.unwrap().as_slice().to_vec();
        util::simple(&ch, IoType::Unmap, 1, 7).await.unwrap();
        assert!(zeroed(util::read(&ch, 1, 7).await.unwrap().as_slice()));
        assert_eq!(
            util::read(&ch, 0, 1).await.unwrap().as_slice(),
            &before0[..]
        );
        assert!(pread(path, 512, 7 * 512).iter().all(|&x| x == 0));

        // Write zeroes over part of the large write; the rest survives.
        util::simple(&ch, IoType::WriteZeroes, 4100, 300)
            .await
            .unwrap();
        let r = util::read(&ch, 4096, 4096).await.unwrap();
        assert_eq!(&r.as_slice()[..4 * bs], &expect[..4 * bs]);
        assert!(r.as_slice()[4 * bs..304 * bs].iter().all(|&x| x == 0));
        assert_eq!(&r.as_slice()[304 * bs..], &expect[304 * bs..]);
        // A zeroing larger than the fallback's zero buffer.
        util::simple(&ch, IoType::WriteZeroes, 0, 8192)
            .await
            .unwrap();
        assert!(zeroed(util::read(&ch, 0, 8192).await.unwrap().as_slice()));

        util::simple(&ch, IoType::WriteZeroes, 8, 0).await.unwrap();
        util::simple(&ch, IoType::Reset, 0, 0).await.unwrap();
        util::write(&ch, 5, pattern(bs, 3), false).await.unwrap();
        drop(ch);
        drop(desc);
    }

    #[test]
    fn roundtrip_on_each_backend() {
        // (dir, try O_DIRECT). /dev/shm is tmpfs: no FALLOC_FL_ZERO_RANGE,
        // so write_zeroes takes the zero-buffer fallback there.
        let cases = [
            ("/var/tmp", true),
            ("/var/tmp", false),
            ("/tmp", true),
            ("/dev/shm", true),
        ];
        for (i, (dir, direct)) in cases.into_iter().enumerate() {
            let Some(f) = tmpfile_in(dir, 4 << 20) else {
                continue;
            };
            let path = path_of(&f);
            let flavor = if i % 2 == 0 {
                Flavor::Uring
            } else {
                Flavor::Aio
            };
            run_on_reactor(0x1, move || async move {
                let name = format!("F{i}");
                let mut o = opts(flavor, &name, &path);
                o.allow_direct = direct;
                o.fallocate = flavor == Flavor::Aio; // aio needs it for unmap/write_zeroes
                let b = create(o).unwrap();
                assert_eq!(b.block_size(), 512);
                assert_eq!(b.num_blocks(), 8192);
                if !direct {
                    assert!(!file_bdev(&b).is_direct());
                }
                tracing::info!(dir, direct = file_bdev(&b).is_direct(), "backend");
                exercise(&name, &path).await;
            });
        }
    }

    #[test]
    fn block_status_from_seek_data_and_seek_hole() {
        // 1 MiB sparse file with data at 256..320 KiB only.
        let Some(f) = tmpfile_in("/var/tmp", 1 << 20) else {
            return;
        };
        f.as_file().write_all_at(&[0xab; 65536], 256 << 10).unwrap();
        let path = path_of(&f);
        run_on_reactor(0x1, move || async move {
            let b = create(opts(Flavor::Uring, "BS", &path)).unwrap();
            assert!(b.has_block_status());
            let (_desc, ch) = open_ch("BS", false);
            let bs = b.block_size() as u64;
            let (data0, data1) = ((256 << 10) / bs, (320 << 10) / bs);
            let all = util::block_status(&ch, 0, b.num_blocks()).await.unwrap();
            let mut at = 0;
            for e in &all {
                let expect_data = at >= data0 && at < data1;
                if e.hole {
                    assert!(!expect_data && e.zero, "{all:?}");
                    assert!(at + e.num_blocks <= data0 || at >= data1, "{all:?}");
                }
                at += e.num_blocks;
            }
            assert_eq!(at, b.num_blocks(), "{all:?}");
            assert!(all.iter().any(|e| e.hole), "{all:?}");
            // The data itself is never reported as a hole.
            let mid = util::block_status(&ch, data0, data1 - data0).await.unwrap();
            assert!(mid.iter().all(|e| !e.hole), "{mid:?}");
        });
    }

    #[test]
    fn nowait_and_fua_writes() {
        on_tmpfile(0x1, 1 << 20, |path| async move {
            let mut o = opts(Flavor::Aio, "NW", &path);
            o.nowait = true;
            let b = create(o).unwrap();
            assert_eq!(b.ops().dump_info_json(&b)["aio"]["nowait"], json!(true));
            let (_desc, ch) = open_ch("NW", true);
            for i in 0..16u64 {
                let w = pattern(4096, i as u8);
                let expect = w.as_slice().to_vec();
                util::write(&ch, i * 8, w, i % 2 == 0).await.unwrap();
                assert_eq!(
                    util::read(&ch, i * 8, 8).await.unwrap().as_slice(),
                    &expect[..]
                );
            }
        });
    }

    #[test]
    fn reset_waits_for_inflight_io() {
        on_tmpfile(0x1, 1 << 20, |path| async move {
            create(opts(Flavor::Uring, "RS", &path)).unwrap();
            let (_desc, ch) = open_ch("RS", true);
            let log: Rc<RefCell<Vec<(&'static str, IoStatus)>>> = Rc::default();
            for i in 0..8u64 {
                let l = log.clone();
                let mut io = BdevIo::write(i * 16, 16, pattern(16 * 512, i as u8), move |io| {
                    l.borrow_mut().push(("write", io.status));
                });
                io.fua = true;
                ch.submit(io);
            }
            let l = log.clone();
            ch.submit(BdevIo::new(IoType::Reset, 0, 0, None, move |io| {
                l.borrow_mut().push(("reset", io.status));
            }));
            while log.borrow().len() < 9 {
                reactor::sleep(std::time::Duration::from_millis(1)).await;
            }
            let log = log.borrow();
            assert_eq!(
                log[8],
                ("reset", IoStatus::Success),
                "reset completes last: {log:?}"
            );
            assert!(
                log[..8].iter().all(|e| *e == ("write", IoStatus::Success)),
                "{log:?}"
            );
        });
    }

    #[test]
    fn readonly_refuses_writes() {
        let Some(f) = tmpfile_in("/var/tmp", 64 << 10) else {
            return;
        };
        let path = path_of(&f);
        f.as_file().write_all_at(&[0x5a; 512], 1024).unwrap();
        run_on_reactor(0x1, move || async move {
            let mut o = opts(Flavor::Aio, "RO", &path);
            o.readonly = true;
            o.fallocate = true; // ignored: nothing may be written
            let b = create(o).unwrap();
            for (t, ok) in [
                (IoType::Read, true),
                (IoType::Write, false),
                (IoType::Unmap, false),
                (IoType::WriteZeroes, false),
                (IoType::Flush, true),
                (IoType::Reset, true),
            ] {
                assert_eq!(b.io_type_supported(t), ok, "{t:?}");
            }
            let (_desc, ch) = open_ch("RO", true);
            let r = util::read(&ch, 2, 1).await.unwrap();
            assert!(r.as_slice().iter().all(|&x| x == 0x5a));
            assert_eq!(
                util::write(&ch, 0, pattern(512, 1), false)
                    .await
                    .unwrap_err(),
                IoStatus::Failed
            );
            assert_eq!(
                util::simple(&ch, IoType::WriteZeroes, 0, 1)
                    .await
                    .unwrap_err(),
                IoStatus::Failed
            );
            assert!(
                pread(&path, 0, 512).iter().all(|&x| x == 0),
                "file untouched"
            );
            let cfg = b.ops().write_config_json(&b).unwrap();
            assert_eq!(cfg["params"]["readonly"], json!(true));
        });
    }

    #[test]
    fn fallocate_preallocates_and_enables_unmap() {
        let Some(f) = tmpfile_in("/var/tmp", 1 << 20) else {
            return;
        };
        let Some(g) = tmpfile_in("/var/tmp", 1 << 20) else {
            return;
        };
        let (pf, pg) = (path_of(&f), path_of(&g));
        let sparse_blocks = f.as_file().metadata().unwrap().blocks();
        run_on_reactor(0x1, move || async move {
            let mut o = opts(Flavor::Aio, "FA", &pf);
            o.fallocate = true;
            let b = create(o).unwrap();
            let allocated = std::fs::metadata(&pf).unwrap().blocks() * 512;
            assert!(
                allocated >= 1 << 20 || sparse_blocks * 512 >= 1 << 20,
                "blocks allocated: {allocated}"
            );
            assert!(b.io_type_supported(IoType::Unmap));
            assert!(b.io_type_supported(IoType::WriteZeroes));
            // Without `fallocate`, aio advertises neither (as SPDK).
            let b2 = create(opts(Flavor::Aio, "FB", &pg)).unwrap();
            assert!(!b2.io_type_supported(IoType::Unmap));
            assert!(!b2.io_type_supported(IoType::WriteZeroes));
            let (_desc, ch) = open_ch("FB", true);
            assert_eq!(
                util::simple(&ch, IoType::Unmap, 0, 8).await.unwrap_err(),
                IoStatus::Failed
            );
        });
    }

    #[test]
    fn size_and_block_size_detection() {
        on_tmpfile(0x1, 1 << 20, |path| async move {
            let u = Uuid::parse_str("11111111-2222-3333-4444-555555555555").unwrap();
            let b = create(opts(Flavor::Uring, "D0", &path)).unwrap();
            assert_eq!((b.block_size(), b.num_blocks()), (512, 2048));
            assert_eq!(b.product_name(), "URING bdev");
            assert_eq!(b.module_name(), "uring");
            assert!(b.write_cache());
            for t in IoType::ALL {
                assert!(b.io_type_supported(t), "uring supports {t:?}");
            }
            assert_eq!(
                b.ops().dump_info_json(&b),
                json!({"uring": {"filename": path}})
            );
            let cfg = b.ops().write_config_json(&b).unwrap();
            assert_eq!(
                cfg,
                json!({"method": "bdev_uring_create", "params": {
                    "name": "D0", "block_size": 512, "filename": path,
                    "uuid": b.uuid().to_string()}})
            );
            // The config's params are valid create params.
            serde_json::from_value::<UringCreateParams>(cfg["params"].clone()).unwrap();

            let mut o = opts(Flavor::Aio, "D1", &path);
            o.block_size = 4096;
            o.uuid = Some(u);
            let b = create(o).unwrap();
            assert_eq!((b.block_size(), b.num_blocks(), b.uuid()), (4096, 256, u));
            assert_eq!(b.product_name(), "AIO disk");
            assert_eq!(b.module_name(), "aio");
            assert_eq!(
                b.ops().dump_info_json(&b),
                json!({"aio": {"filename": path, "block_size_override": true,
                    "readonly": false, "fallocate": false, "nowait": false}})
            );
            let cfg = b.ops().write_config_json(&b).unwrap();
            assert_eq!(
                cfg,
                json!({"method": "bdev_aio_create", "params": {
                    "name": "D1", "block_size": 4096, "filename": path, "readonly": false,
                    "fallocate": false, "uuid": u.to_string(), "nowait": false}})
            );
            serde_json::from_value::<AioCreateParams>(cfg["params"].clone()).unwrap();
            // Autodetected: block_size is left out, as SPDK does.
            let b = create(opts(Flavor::Aio, "D2", &path)).unwrap();
            let cfg = b.ops().write_config_json(&b).unwrap();
            assert!(cfg["params"].get("block_size").is_none());
            assert_eq!(
                b.ops().dump_info_json(&b)["aio"]["block_size_override"],
                json!(false)
            );
            // Registered in order, so save_config emits them in order too.
            let names: Vec<_> = crate::list().iter().map(|b| b.name().to_string()).collect();
            assert_eq!(names, ["D0", "D1", "D2"]);
        });
    }

    #[test]
    fn create_errors() {
        let dir = tempfile::tempdir_in("/var/tmp")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        std::fs::write(format!("{d}/short"), [0u8; 100]).unwrap();
        std::fs::write(format!("{d}/odd"), [0u8; 1000]).unwrap();
        std::fs::write(format!("{d}/ok"), [0u8; 8192]).unwrap();
        run_on_reactor(0x1, move || async move {
            let missing = format!("{d}/missing");
            let e = create(opts(Flavor::Aio, "E0", &missing)).unwrap_err();
            assert_eq!(e.errno(), libc::ENOENT);
            let r = RpcError::from(e);
            assert_eq!(r.code, -2);
            assert!(r.message.contains(&missing), "{}", r.message);
            assert!(
                r.message.contains("No such file or directory"),
                "{}",
                r.message
            );

            let short = create(opts(Flavor::Uring, "E1", &format!("{d}/short"))).unwrap_err();
            assert_eq!(RpcError::from(short).code, -22);
            let odd = create(opts(Flavor::Uring, "E1", &format!("{d}/odd"))).unwrap_err();
            assert_eq!(odd.errno(), libc::EINVAL);
            let dir_err = create(opts(Flavor::Uring, "E1", &d)).unwrap_err();
            assert!(
                matches!(dir_err.errno(), libc::EISDIR | libc::EINVAL),
                "{dir_err}"
            );
            let ok = format!("{d}/ok");
            for bs in [256u32, 520, 1536, 3000] {
                let mut o = opts(Flavor::Aio, "E1", &ok);
                o.block_size = bs;
                assert_eq!(
                    create(o).unwrap_err().errno(),
                    libc::EINVAL,
                    "block_size {bs}"
                );
            }
            // 8 KiB file with 16 KiB blocks: smaller than one block.
            let mut o = opts(Flavor::Aio, "E1", &ok);
            o.block_size = 16384;
            assert_eq!(create(o).unwrap_err().errno(), libc::EINVAL);
            assert!(
                crate::get("E1").is_none(),
                "failed creates register nothing"
            );

            create(opts(Flavor::Uring, "E2", &ok)).unwrap();
            let dup = create(opts(Flavor::Aio, "E2", &ok)).unwrap_err();
            assert_eq!(RpcError::from(dup), RpcError::errno(libc::EEXIST));
            // Delete: missing, and the wrong module, are both -ENODEV.
            assert_eq!(delete_errno("nope", "uring").await, libc::ENODEV);
            assert_eq!(delete_errno("E2", "aio").await, libc::ENODEV);
            crate::unregister_by_name("E2", "uring").await.unwrap();
            assert!(crate::get("E2").is_none());
        });
    }

    #[test]
    fn io_past_eof_fails_instead_of_short_success() {
        on_tmpfile(0x1, 1 << 20, |path| async move {
            create(opts(Flavor::Uring, "S0", &path)).unwrap();
            let (desc, ch) = open_ch("S0", true);
            util::write(&ch, 1000, pattern(100 * 512, 5), false)
                .await
                .unwrap();
            // Shrink the file behind the bdev's back: a read across the new
            // EOF gets a short transfer, then nothing; it must fail.
            set_file_len(&path, 512 << 10);
            assert_eq!(
                util::read(&ch, 1000, 100).await.unwrap_err(),
                IoStatus::Failed
            );
            assert_eq!(
                util::read(&ch, 1500, 8).await.unwrap_err(),
                IoStatus::Failed
            );
            assert!(util::read(&ch, 0, 8).await.is_ok());
            // Rescan sees the smaller size and refuses to shrink an open
            // bdev (-EBUSY, as SPDK); the old size stays.
            let e = rescan("S0", Flavor::Uring).await.unwrap_err();
            assert_eq!(e.code, -libc::EBUSY);
            assert_eq!(desc.bdev().num_blocks(), (1 << 20) / 512);
        });
    }

    #[test]
    fn rescan_cases() {
        on_tmpfile(0x1, 1 << 20, |path| async move {
            create(opts(Flavor::Aio, "R0", &path)).unwrap();
            rescan("R0", Flavor::Aio).await.unwrap();
            assert_eq!(
                rescan("R0", Flavor::Uring).await.unwrap_err(),
                RpcError::errno(libc::ENODEV)
            );
            assert_eq!(
                rescan("nope", Flavor::Aio).await.unwrap_err(),
                RpcError::errno(libc::ENODEV)
            );
            set_file_len(&path, 2 << 20);
            rescan("R0", Flavor::Aio).await.unwrap();
            assert_eq!(crate::get("R0").unwrap().num_blocks(), (2 << 20) / 512);
            // Size zero: the device is gone; the bdev is hot-removed.
            set_file_len(&path, 0);
            rescan("R0", Flavor::Aio).await.unwrap();
            assert!(crate::get("R0").is_none());
        });
    }

    #[test]
    fn rpc_methods_end_to_end() {
        on_tmpfile(0x1, 1 << 20, |path| async move {
            register_methods();
            let enodev = Err(RpcError::errno(libc::ENODEV));
            let named = |name: &str| json!({ "name": name });
            rpc_steps(vec![
                // rpc.py sends false for every unset store_true flag.
                (
                    "bdev_aio_create",
                    json!({"name": "A0", "filename": path, "block_size": 512,
                           "readonly": false, "fallocate": false, "nowait": false}),
                    Ok(json!("A0")),
                ),
                (
                    "bdev_aio_create",
                    json!({"name": "A0", "filename": path}),
                    Err(RpcError::errno(libc::EEXIST)),
                ),
                (
                    "bdev_aio_create",
                    json!({"name": "A1", "filename": path, "bogus": 1}),
                    Err(RpcError::decode_failed()),
                ),
            ])
            .await;
            let r = ::rpc::call(
                "bdev_aio_create",
                Some(json!({"name": "A1", "filename": "/nonexistent/x"})),
            )
            .await;
            assert_eq!(r.unwrap_err().code, -2);
            rpc_steps(vec![
                (
                    "bdev_uring_create",
                    json!({"filename": path, "name": "U0"}),
                    Ok(json!("U0")),
                ),
                ("bdev_uring_rescan", named("U0"), Ok(json!(true))),
                ("bdev_uring_rescan", named("A0"), enodev.clone()),
                ("bdev_aio_rescan", named("A0"), Ok(json!(true))),
                ("bdev_aio_delete", named("U0"), enodev.clone()),
                ("bdev_uring_delete", named("U0"), Ok(json!(true))),
                ("bdev_aio_delete", named("A0"), Ok(json!(true))),
                ("bdev_aio_delete", named("A0"), enodev),
                (
                    "bdev_uring_delete",
                    json!({}),
                    Err(RpcError::decode_failed()),
                ),
            ])
            .await;
        });
    }

    #[test]
    fn channels_on_two_reactors() {
        if !two_cores() {
            return;
        }
        on_tmpfile(0x3, 1 << 20, |path| async move {
            create(opts(Flavor::Uring, "X0", &path)).unwrap();
            let desc = Arc::new(crate::open("X0", true, |_| {}).unwrap());
            write_there_read_here(&desc, 16, 4096, true).await;
        });
    }

    /// Needs root and util-linux: a loop device with 4 KiB logical sectors.
    /// Run with `cargo test -p bdev -- --ignored loop_block_device`.
    #[test]
    #[ignore]
    fn loop_block_device() {
        let Some(f) = tmpfile_in("/var/tmp", 8 << 20) else {
            return;
        };
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--sector-size", "4096"])
            .arg(f.path())
            .output();
        let dev = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
            _ => return,
        };
        let d2 = dev.clone();
        let res = std::panic::catch_unwind(move || {
            run_on_reactor(0x1, move || async move {
                let mut o = opts(Flavor::Aio, "L1", &d2);
                o.block_size = 512;
                assert_eq!(
                    create(o).unwrap_err().errno(),
                    libc::EINVAL,
                    "below the sector size"
                );
                let b = create(opts(Flavor::Uring, "L0", &d2)).unwrap();
                assert_eq!((b.block_size(), b.num_blocks()), (4096, 2048));
                assert!(file_bdev(&b).is_direct());
                let (_desc, ch) = open_ch("L0", true);
                let w = pattern(8192, 4);
                let expect = w.as_slice().to_vec();
                util::write(&ch, 3, w, true).await.unwrap();
                assert_eq!(util::read(&ch, 3, 2).await.unwrap().as_slice(), &expect[..]);
                util::simple(&ch, IoType::Flush, 0, 1).await.unwrap();
                util::simple(&ch, IoType::WriteZeroes, 3, 1).await.unwrap();
                util::simple(&ch, IoType::Unmap, 4, 1).await.unwrap();
                assert!(zeroed(util::read(&ch, 3, 2).await.unwrap().as_slice()));
                rescan("L0", Flavor::Uring).await.unwrap();
            })
        });
        let _ = std::process::Command::new("losetup")
            .args(["-d", &dev])
            .status();
        if let Err(p) = res {
            std::panic::resume_unwind(p);
        }
    }
}
