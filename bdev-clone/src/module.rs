//! The clone bdev: create/delete, the per-reactor channels with the
//! hydrated fast path, and the owner reactor's executor driving the
//! [`Router`] (user I/O that needs routing, hydration, commits).
//!
//! * Ownership: one owner reactor per clone (round-robin at create) holds
//!   the router, the in-flight maps and the hydration poller. Any reactor
//!   sends I/O whose regions are all hydrated straight to the destination
//!   (the bitmap is atomics, bits only go 0 -> 1); everything else is sent
//!   to the owner by message and its completion sent back.
//! * Commits are therefore serialised by the owner: the router snapshots
//!   the dirty units when it emits the `Commit`, the executor flushes the
//!   destination, writes the units, then flushes the metadata bdev.
//! * Completion: once every region is hydrated and committed and the router
//!   is idle, the source claim is released and the router dropped; all I/O
//!   then goes straight to the destination.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ops::Range;
use std::rc::{Rc, Weak as RcWeak};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bdev::{
    util, Bdev, BdevBuilder, BdevIo, BdevOps, BoxFuture, ChannelOps, ClaimType, Desc, IoChannel,
    IoStatus, IoType,
};
use reactor::DmaBuf;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::error::CloneError;
use crate::geometry::Geometry;
use crate::metadata::{
    self, MetadataError, SuperState, Superblock, UnitKey, BITMAP_OFFSET, FORMAT_BLOCK_SIZE,
    UNIT_SIZE,
};
use crate::oneshot;
use crate::region_map::{units_for, RegionMap};
use crate::router::{
    Command, CommitId, CopyId, IoKind, MetadataMode, OpId, ReqId, Request, Router, RouterConfig,
    Status, UnitImage,
};

pub const MODULE_NAME: &str = "clone";
pub const PRODUCT_NAME: &str = "clone";

/// Largest single I/O of a hydration copy or a metadata load.
const CHUNK_BYTES: u64 = 1 << 20;
/// Metadata is read and zeroed in I/Os of this size.
const MD_IO_BYTES: u64 = 4 << 20;
/// Hydration back-off after a failed copy: first and longest wait.
const BACKOFF_MIN_NS: u64 = 10_000_000;
const BACKOFF_MAX_NS: u64 = 1_000_000_000;
/// Consecutive failed copies after which hydration pauses.
const MAX_FAIL_STREAK: u32 = 8;
/// While paused by errors, one probe copy after this long, doubling up to
/// the maximum; a probe that succeeds resumes hydration.
const PROBE_MIN_NS: u64 = 1_000_000_000;
const PROBE_MAX_NS: u64 = 30_000_000_000;
/// Whatever `hydration_threshold` says, an owner keeps at most this many
/// background copies in flight, with at most this many bytes of copy
/// buffers, and starts at most this many per pass: memory and the work of
/// one reactor iteration stay bounded for any accepted value.
const MAX_COPIES_IN_FLIGHT: u64 = 256;
const MAX_COPY_BUF_BYTES: u64 = 64 << 20;
const MAX_COPY_STARTS_PER_PASS: u64 = 32;
/// Largest `hydration_batch_size` (regions per copy): bounds the bitmap
/// scan and update of one copy.
pub const MAX_BATCH_SIZE: u32 = 65_536;
/// Largest `hydration_mbytes_per_sec` (1 TiB/s; 0 = unlimited).
pub const MAX_MBYTES_PER_SEC: u64 = 1 << 20;
/// Hydration poller period (rate-limit refill, back-off expiry).
const HYDRATION_POLL: Duration = Duration::from_millis(2);
/// Periodic commit.
const COMMIT_PERIOD: Duration = Duration::from_secs(1);
/// How long delete waits for in-flight work before giving up on it.
const STOP_TIMEOUT_NS: u64 = 10_000_000_000;

fn default_region_size_kb() -> u32 {
    4
}
fn default_one() -> u32 {
    1
}

/// Parameters of `bdev_clone_create` (defaults per rpc-contract §2.7).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOpts {
    pub name: String,
    pub source_bdev_name: String,
    pub dest_bdev_name: String,
    pub metadata_bdev_name: String,
    #[serde(default = "default_region_size_kb")]
    pub region_size_kb: u32,
    #[serde(default)]
    pub no_hydration: bool,
    #[serde(default)]
    pub no_discard_passdown: bool,
    #[serde(default = "default_one")]
    pub hydration_threshold: u32,
    #[serde(default = "default_one")]
    pub hydration_batch_size: u32,
    #[serde(default)]
    pub hydration_mbytes_per_sec: u64,
    #[serde(default)]
    pub copy_on_read: bool,
    #[serde(default)]
    pub uuid: Option<Uuid>,
    /// Format the metadata whatever it holds (the operator's way out of
    /// damaged metadata). Never written by `save_config`.
    #[serde(default)]
    pub force_format: bool,
}

impl CreateOpts {
    pub fn new(
        name: impl Into<String>,
        source: impl Into<String>,
        dest: impl Into<String>,
        metadata: impl Into<String>,
    ) -> Self {
        CreateOpts {
            name: name.into(),
            source_bdev_name: source.into(),
            dest_bdev_name: dest.into(),
            metadata_bdev_name: metadata.into(),
            region_size_kb: default_region_size_kb(),
            no_hydration: false,
            no_discard_passdown: false,
            hydration_threshold: 1,
            hydration_batch_size: 1,
            hydration_mbytes_per_sec: 0,
            copy_on_read: false,
            uuid: None,
            force_format: false,
        }
    }
}

/// Refuse tunables outside their ranges (-22, naming the range); the
/// threshold takes any u32 (the in-flight caps above bound its effect).
fn check_tunables(batch: Option<u32>, mbytes_per_sec: Option<u64>) -> Result<(), CloneError> {
    if let Some(b) = batch.filter(|b| !(1..=MAX_BATCH_SIZE).contains(b)) {
        return Err(CloneError::Invalid(format!(
            "hydration_batch_size {b} is out of range: 1 to {MAX_BATCH_SIZE} regions"
        )));
    }
    if let Some(m) = mbytes_per_sec.filter(|&m| m > MAX_MBYTES_PER_SEC) {
        return Err(CloneError::Invalid(format!(
            "hydration_mbytes_per_sec {m} is out of range: 0 (unlimited) to {MAX_MBYTES_PER_SEC}"
        )));
    }
    Ok(())
}

/// Runtime changes of `bdev_clone_set_hydration`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HydrationOpts {
    pub name: String,
    pub enable: Option<bool>,
    pub hydration_threshold: Option<u32>,
    pub hydration_batch_size: Option<u32>,
    pub hydration_mbytes_per_sec: Option<u64>,
}

const PAUSE_NONE: u8 = 0;
const PAUSE_SOURCE: u8 = 1;
const PAUSE_DEST: u8 = 2;

/// Which base a failed copy failed on.
#[derive(Clone, Copy, Debug, PartialEq)]
enum CopyFault {
    Source,
    Dest,
}

const MODE_RW: u8 = 0;
const MODE_RO: u8 = 1;
const MODE_FAILED: u8 = 2;

fn mode_code(m: MetadataMode) -> u8 {
    match m {
        MetadataMode::ReadWrite => MODE_RW,
        MetadataMode::ReadOnly => MODE_RO,
        MetadataMode::Failed => MODE_FAILED,
    }
}

#[derive(Default)]
struct Descs {
    source: Option<Desc>,
    dest: Option<Desc>,
    md: Option<Desc>,
}

/// State shared by the bdev, its channels on every reactor and the owner.
pub(crate) struct Shared {
    id: u64,
    name: String,
    source_name: String,
    dest_name: String,
    md_name: String,
    uuid: Uuid,
    geo: Geometry,
    map: Arc<RegionMap>,
    /// The committer's reactor (also an owner).
    home: u32,
    /// Owner reactors; region r belongs to `owners[(r / stripe) % len]`.
    owners: Vec<u32>,
    stripe_regions: u64,
    /// Commit rounds in flight (the routers' view of the committer).
    commits_in_flight: Arc<AtomicU64>,
    md_block_size: u32,
    md_num_blocks: u64,
    dest_write_zeroes: bool,
    dest_unmap: bool,
    discard_passdown: bool,
    hydration_enabled: AtomicBool,
    /// Hydration stopped itself after repeated copy failures
    /// (`PAUSE_NONE`, `PAUSE_SOURCE` or `PAUSE_DEST`); it probes and
    /// resumes by itself.
    paused: AtomicU8,
    threshold: AtomicU32,
    batch: AtomicU32,
    mbytes_per_sec: AtomicU64,
    copy_on_read: AtomicBool,
    mode: AtomicU8,
    /// Regions being copied, per owner.
    hydrating: Vec<AtomicU64>,
    err_source: AtomicU64,
    err_dest: AtomicU64,
    err_md: AtomicU64,
    /// Bytes copied by hydration since create.
    hydrated_bytes: AtomicU64,
    /// Hydration rate measured over the last commit period.
    rate_bps: AtomicU64,
    released: AtomicBool,
    last_error: Mutex<Option<String>>,
    descs: Mutex<Descs>,
    /// Wakes the owner (set_hydration).
    kick: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn mode(&self) -> u8 {
        self.mode.load(Ordering::Acquire)
    }

    /// The owner index of region `r`.
    fn owner_index(&self, r: u64) -> usize {
        ((r / self.stripe_regions) % self.owners.len() as u64) as usize
    }

    fn set_last_error(&self, e: String) {
        *lock(&self.last_error) = Some(e);
    }

    fn state(&self) -> &'static str {
        match self.mode() {
            MODE_FAILED => "failed",
            MODE_RO => "read_only",
            _ if self.map.is_complete() => "hydrated",
            _ if self.paused_reason().is_some() => "paused",
            _ => "hydrating",
        }
    }

    /// Why hydration is paused, when it is: `user` (disabled or threshold
    /// 0) before the errors, which hydration leaves by itself.
    fn paused_reason(&self) -> Option<&'static str> {
        if !self.hydration_enabled.load(Ordering::Relaxed)
            || self.threshold.load(Ordering::Relaxed) == 0
        {
            return Some("user");
        }
        match self.paused.load(Ordering::Relaxed) {
            PAUSE_SOURCE => Some("source_errors"),
            PAUSE_DEST => Some("dest_errors"),
            _ => None,
        }
    }

    /// The settings `bdev_clone_create` takes, shared by the status object
    /// and `write_config_json` (one serializer, as SPDK's delay module).
    fn settings(&self) -> serde_json::Map<String, Value> {
        let v = json!({
            "name": self.name,
            "uuid": self.uuid.to_string(),
            "source_bdev_name": self.source_name,
            "dest_bdev_name": self.dest_name,
            "metadata_bdev_name": self.md_name,
            "region_size_kb": self.geo.region_size() / 1024,
            "hydration_threshold": self.threshold.load(Ordering::Relaxed),
            "hydration_batch_size": self.batch.load(Ordering::Relaxed),
            "hydration_mbytes_per_sec": self.mbytes_per_sec.load(Ordering::Relaxed),
            "copy_on_read": self.copy_on_read.load(Ordering::Relaxed),
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!("json! of an object"),
        }
    }

    fn config_params(&self) -> Value {
        let mut m = self.settings();
        m.insert(
            "no_hydration".into(),
            json!(!self.hydration_enabled.load(Ordering::Relaxed)),
        );
        m.insert("no_discard_passdown".into(), json!(!self.discard_passdown));
        Value::Object(m)
    }

    /// The status object of rpc-contract §2.7.
    pub(crate) fn status(&self) -> Value {
        let mut m = self.settings();
        let num = self.geo.num_regions();
        let hydrated = self.map.hydrated_count();
        let rate = self.rate_bps.load(Ordering::Relaxed);
        let remaining_bytes = (num - hydrated).saturating_mul(self.geo.region_size());
        let percent = if num == 0 {
            100.0
        } else {
            (hydrated as f64 * 10000.0 / num as f64).floor() / 100.0
        };
        let eta = if remaining_bytes == 0 {
            json!(0)
        } else if rate == 0 {
            Value::Null
        } else {
            json!(remaining_bytes.div_ceil(rate))
        };
        let mode = match self.mode() {
            MODE_RW => "rw",
            MODE_RO => "ro",
            _ => "fail",
        };
        let used = metadata::required_bytes(num).div_ceil(self.md_block_size as u64);
        m.insert("num_regions".into(), json!(num));
        m.insert("hydrated_regions".into(), json!(hydrated));
        m.insert(
            "hydrating_regions".into(),
            json!(self
                .hydrating
                .iter()
                .map(|h| h.load(Ordering::Relaxed))
                .sum::<u64>()),
        );
        m.insert(
            "hydration_enabled".into(),
            json!(self.hydration_enabled.load(Ordering::Relaxed)),
        );
        m.insert("discard_passdown".into(), json!(self.discard_passdown));
        let state = self.state();
        m.insert("state".into(), json!(state));
        m.insert(
            "paused_reason".into(),
            json!((state == "paused").then(|| self.paused_reason()).flatten()),
        );
        m.insert(
            "progress".into(),
            json!({"percent": percent, "bytes_per_sec": rate, "eta_sec": eta}),
        );
        m.insert(
            "source_released".into(),
            json!(self.released.load(Ordering::Acquire)),
        );
        m.insert(
            "errors".into(),
            json!({
                "source_read": self.err_source.load(Ordering::Relaxed),
                "dest_write": self.err_dest.load(Ordering::Relaxed),
                "metadata": self.err_md.load(Ordering::Relaxed),
            }),
        );
        m.insert(
            "metadata".into(),
            json!({
                "block_size": self.md_block_size,
                "used_blocks": used,
                "total_blocks": self.md_num_blocks,
                "mode": mode,
            }),
        );
        m.insert("last_error".into(), json!(lock(&self.last_error).clone()));
        Value::Object(m)
    }
}

/// The `BdevOps` of a clone.
pub struct CloneBdev(pub(crate) Arc<Shared>);

impl BdevOps for CloneBdev {
    fn module_name(&self) -> &'static str {
        MODULE_NAME
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(
            t,
            IoType::Read
                | IoType::Write
                | IoType::Flush
                | IoType::Reset
                | IoType::Unmap
                | IoType::WriteZeroes
        )
    }

    fn has_block_status(&self) -> bool {
        source_with_status(&self.0).is_some()
    }

    fn create_channel(&self, _bdev: &Arc<Bdev>) -> Box<dyn ChannelOps> {
        let descs = lock(&self.0.descs);
        let dst = descs.dest.as_ref().map(|d| d.channel());
        drop(descs);
        Box::new(CloneChannel {
            sh: self.0.clone(),
            dst,
        })
    }

    fn dump_info_json(&self, _b: &Bdev) -> Value {
        json!({ "clone": self.0.status() })
    }

    fn write_config_json(&self, _b: &Bdev) -> Option<Value> {
        Some(json!({"method": "bdev_clone_create", "params": self.0.config_params()}))
    }

    fn destruct(&self, _bdev: &Arc<Bdev>) -> BoxFuture {
        let sh = self.0.clone();
        Box::pin(async move {
            stop_all(&sh).await;
            let descs = std::mem::take(&mut *lock(&sh.descs));
            drop(descs);
            tracing::info!(clone = %sh.name, "clone bdev destroyed");
        })
    }
}

// ---------------------------------------------------------------------------
// Per-reactor channel and the hydrated fast path

struct CloneChannel {
    sh: Arc<Shared>,
    dst: Option<IoChannel>,
}

thread_local! {
    /// User I/O sent to owners, by token, on the reactor that received it.
    static PENDING: RefCell<HashMap<u64, Pending>> = RefCell::new(HashMap::new());
    static NEXT_TOKEN: Cell<u64> = const { Cell::new(1) };
    /// Owners living on this reactor, by clone id.
    static OWNERS: RefCell<HashMap<u64, Rc<RefCell<Owner>>>> = RefCell::new(HashMap::new());
}

/// A user I/O whose parts are with owners.
struct Pending {
    io: Box<BdevIo>,
    /// Parts not yet answered.
    left: u32,
    status: IoStatus,
    /// The parts carry copies of the buffer (the I/O spans owners).
    split: bool,
}

/// (Part of) a user I/O handed to its owner reactor (the `BdevIo` stays
/// on the reactor that received it).
struct UserMsg {
    clone: u64,
    kind: IoKind,
    offset: u64,
    num: u64,
    fua: bool,
    buf: Option<DmaBuf>,
    origin: u32,
    token: u64,
}

impl UserMsg {
    fn part(&self) -> Part {
        Part {
            token: self.token,
            offset: self.offset,
        }
    }
}

/// Which part of which user I/O an answer is for.
#[derive(Clone, Copy)]
struct Part {
    token: u64,
    offset: u64,
}

/// The source's channel on this reactor while the clone still reads from a
/// source that reports block status.
fn source_with_status(sh: &Shared) -> Option<IoChannel> {
    if sh.released.load(Ordering::Acquire) {
        return None;
    }
    lock(&sh.descs)
        .source
        .as_ref()
        .filter(|d| d.bdev().has_block_status())
        .map(|d| d.channel())
}

impl ChannelOps for CloneChannel {
    /// Hydrated regions are data; a run of cold regions reads as the
    /// source, so it has the source's status.
    fn block_status(&self, offset_blocks: u64, num_blocks: u64, cb: bdev::BlockStatusCb) {
        let sh = &self.sh;
        let end = offset_blocks + num_blocks;
        let rb = sh.geo.region_blocks();
        let first = sh.geo.region_of(offset_blocks);
        let cold = !sh.map.is_hydrated(first);
        // The run of regions in the same state (bounded: the caller asks
        // again for the rest).
        let mut r = first + 1;
        while r * rb < end && r - first < 65536 && sh.map.is_hydrated(r) != cold {
            r += 1;
        }
        let n = (r * rb).min(end) - offset_blocks;
        match source_with_status(sh).filter(|_| cold) {
            Some(src) => src.block_status(offset_blocks, n, cb),
            None => reactor::defer(move || cb(Ok(vec![bdev::BlockExtent::data(n)]))),
        }
    }

    fn submit(&self, io: Box<BdevIo>) {
        let sh = &self.sh;
        let Some(dst) = &self.dst else {
            return io.complete(IoStatus::Failed);
        };
        if sh.mode() == MODE_FAILED {
            return io.complete(IoStatus::Failed);
        }
        let released = sh.released.load(Ordering::Acquire);
        let kind = match io.io_type {
            IoType::Reset => return reset(sh.clone(), dst.clone(), io),
            IoType::Read => IoKind::Read,
            IoType::Write => IoKind::Write,
            IoType::WriteZeroes => IoKind::WriteZeroes,
            IoType::Unmap => IoKind::Discard,
            IoType::Flush => IoKind::Flush,
        };
        let fast = match kind {
            // A destination without write_zeroes gets zero writes from
            // the owner.
            IoKind::WriteZeroes if !sh.dest_write_zeroes => false,
            IoKind::Read | IoKind::Write | IoKind::WriteZeroes => {
                released
                    || (!io.fua
                        && sh
                            .geo
                            .regions_covering(io.offset_blocks, io.num_blocks)
                            .is_some_and(|r| !r.is_empty() && sh.map.is_range_hydrated(r)))
            }
            IoKind::Flush => released,
            IoKind::Discard => {
                if released {
                    return passthrough_discard(sh, dst, io);
                }
                false
            }
        };
        if fast {
            return forward(sh, dst, io);
        }
        to_owner(sh, kind, io);
    }

    /// A fast-path write, write_zeroes, flush or discard back from the
    /// destination (see `forward`).
    fn forward_done(&self, io: Box<BdevIo>) {
        if !io.status.is_success() {
            self.sh.err_dest.fetch_add(1, Ordering::Relaxed);
        }
        let status = io.status;
        io.complete(status);
    }
}

/// Send `io` unchanged to the destination, in place (no child I/O).
fn forward(_sh: &Arc<Shared>, dst: &IoChannel, io: Box<BdevIo>) {
    if io.io_type == IoType::Read {
        // Reads count no destination error: nothing to do on the way back.
        dst.forward(io)
    } else {
        dst.forward_hooked(io)
    }
}

/// After completion: whole regions of a discard go on to the destination
/// (with passdown), as before completion.
fn passthrough_discard(sh: &Arc<Shared>, dst: &IoChannel, mut io: Box<BdevIo>) {
    let whole = sh.geo.whole_regions_in(io.offset_blocks, io.num_blocks);
    match whole {
        None => io.complete(IoStatus::Failed),
        Some(r) if r.is_empty() || !sh.discard_passdown || !sh.dest_unmap => {
            io.complete(IoStatus::Success)
        }
        Some(r) => {
            let blocks = sh.geo.region_range_blocks(r);
            io.offset_blocks = blocks.start;
            io.num_blocks = blocks.end - blocks.start;
            forward(sh, dst, io)
        }
    }
}

fn to_owner(sh: &Arc<Shared>, kind: IoKind, mut io: Box<BdevIo>) {
    let token = NEXT_TOKEN.with(|t| {
        let v = t.get();
        t.set(v.wrapping_add(1));
        v
    });
    let origin = reactor::current().unwrap_or(0);
    let fua = io.fua;
    if kind == IoKind::Flush {
        // Flushes go to the committer: a commit round started after this
        // flush arrived (destination flush only when nothing changed).
        PENDING.with(|p| {
            p.borrow_mut().insert(
                token,
                Pending {
                    io,
                    left: 1,
                    status: IoStatus::Success,
                    split: false,
                },
            )
        });
        let id = sh.id;
        return send_to(sh.home, move || committer_flush(id, origin, token));
    }
    let (off, num) = (io.offset_blocks, io.num_blocks);
    let Some(regions) = sh.geo.regions_covering(off, num).filter(|r| !r.is_empty()) else {
        return io.complete(IoStatus::Failed);
    };
    let stripe = sh.stripe_regions;
    let single = sh.owners.len() == 1 || regions.start / stripe == (regions.end - 1) / stripe;
    // Parts: one per stripe the request touches (each has one owner).
    let mut parts: Vec<(usize, u64, u64)> = Vec::new();
    if single {
        parts.push((sh.owner_index(regions.start), off, num));
    } else {
        let mut r = regions.start;
        while r < regions.end {
            let end_r = ((r / stripe + 1) * stripe).min(regions.end);
            let b = sh.geo.region_range_blocks(r..end_r);
            let (s0, e0) = (b.start.max(off), b.end.min(off + num));
            parts.push((sh.owner_index(r), s0, e0 - s0));
            r = end_r;
        }
    }
    let bs = sh.geo.block_size() as u64;
    let whole = io.buf.take();
    let mut msgs = Vec::with_capacity(parts.len());
    for &(oi, po, pn) in &parts {
        let buf = match (&whole, kind) {
            (Some(_), _) if single => None,
            (Some(w), IoKind::Write) => {
                let at = ((po - off) * bs) as usize;
                let len = (pn * bs) as usize;
                let mut b = DmaBuf::new(len);
                b.as_mut_slice()
                    .copy_from_slice(&w.as_slice()[at..at + len]);
                Some(b)
            }
            (Some(_), IoKind::Read) => Some(DmaBuf::new((pn * bs) as usize)),
            _ => None,
        };
        msgs.push((
            sh.owners[oi],
            UserMsg {
                clone: sh.id,
                kind,
                offset: po,
                num: pn,
                fua,
                buf,
                origin,
                token,
            },
        ));
    }
    let mut whole = whole;
    if single {
        if let Some((_, m)) = msgs.first_mut() {
            m.buf = whole.take();
        }
    }
    io.buf = whole;
    PENDING.with(|p| {
        p.borrow_mut().insert(
            token,
            Pending {
                io,
                left: msgs.len() as u32,
                status: IoStatus::Success,
                split: !single,
            },
        )
    });
    for (r, m) in msgs {
        send_to(r, move || owner_receive(m));
    }
}

/// Run `f` on reactor `r`: by message, or deferred when `r` is this
/// reactor (never re-entering the caller).
fn send_to(r: u32, f: impl FnOnce() + Send + 'static) {
    if reactor::current() == Some(r) {
        reactor::defer(f);
    } else {
        reactor::send(r, f);
    }
}

/// Back on the receiving reactor: one part is done; complete the user I/O
/// after the last.
fn finish_part(p: Part, status: IoStatus, buf: Option<DmaBuf>) {
    let done = PENDING.with(|pend| {
        let mut pend = pend.borrow_mut();
        let e = pend.get_mut(&p.token)?;
        if e.split {
            let bs = e.io.bdev().map_or(512, |b| b.block_size()) as u64;
            let (t, first) = (e.io.io_type, e.io.offset_blocks);
            if let (Some(b), Some(dst)) = (buf, e.io.buf.as_mut()) {
                if t == IoType::Read && status.is_success() {
                    let at = ((p.offset - first) * bs) as usize;
                    let len = b.len().min(dst.len() - at);
                    dst.as_mut_slice()[at..at + len].copy_from_slice(&b.as_slice()[..len]);
                }
            }
        } else if buf.is_some() {
            e.io.buf = buf;
        }
        if !status.is_success() {
            e.status = status;
        }
        e.left -= 1;
        if e.left == 0 {
            pend.remove(&p.token)
        } else {
            None
        }
    });
    if let Some(e) = done {
        e.io.complete(e.status);
    }
}

fn reply(origin: u32, part: Part, status: IoStatus, buf: Option<DmaBuf>) {
    send_to(origin, move || finish_part(part, status, buf));
}

/// Reset: the destination and source are reset, and the reset completes
/// only after every request the owner holds has finished.
fn reset(sh: Arc<Shared>, dst: IoChannel, io: Box<BdevIo>) {
    reactor::spawn_local(async move {
        let id = sh.id;
        // Pause background copies and wait for every owner to drain.
        for &r in &sh.owners {
            oneshot::run_on(r, move || owner_quiesce(id, true)).await;
        }
        let st = util::submit(&dst, IoType::Reset, 0, 0, None, false)
            .await
            .status;
        let src = lock(&sh.descs).source.as_ref().map(|d| d.channel());
        if let Some(src) = src {
            if src.bdev().io_type_supported(IoType::Reset) {
                let _ = util::submit(&src, IoType::Reset, 0, 0, None, false).await;
            }
        }
        for &r in &sh.owners {
            oneshot::run_on(r, move || owner_quiesce(id, false)).await;
        }
        io.complete(st);
    });
}

// ---------------------------------------------------------------------------
// The owner: router executor, hydration, commits

struct OwnerReq {
    origin: u32,
    token: u64,
    offset: u64,
    num: u64,
    buf: Option<DmaBuf>,
}

impl OwnerReq {
    fn part(&self) -> Part {
        Part {
            token: self.token,
            offset: self.offset,
        }
    }
}

/// Who waits for a commit round.
enum Waiter {
    /// A router's `Commit` (its owner reactor and commit id).
    Router { reactor: u32, commit: CommitId },
    /// A user flush.
    Flush { origin: u32, token: u64 },
}

/// One per clone, on its home reactor: serialises commits. A round
/// snapshots the dirty units, flushes the destination, writes the units and
/// flushes the metadata; requests arriving during a round wait for the
/// next one (their bits may have missed the snapshot).
#[derive(Default)]
struct Committer {
    in_flight: bool,
    current: Vec<Waiter>,
    next: Vec<Waiter>,
    releasing: bool,
}

struct Owner {
    sh: Arc<Shared>,
    /// Index in `Shared::owners`.
    idx: usize,
    committer: Option<Committer>,
    router: Option<Router>,
    src: Option<IoChannel>,
    dst: IoChannel,
    md: IoChannel,
    reqs: HashMap<ReqId, OwnerReq>,
    next_req: ReqId,
    out: Vec<Command>,
    /// Reused hydration chunk buffers.
    bufs: Vec<DmaBuf>,
    /// Token bucket (bytes) of the hydration rate limit.
    tokens: f64,
    last_refill: u64,
    fail_streak: u32,
    backoff_until: u64,
    /// Copies in flight and their buffer bytes (the caps above).
    copies_in_flight: u64,
    copy_buf_bytes: u64,
    /// The next `StartCopy` executed is a probe (paused by errors).
    probe_pending: bool,
    /// The wait before the next probe.
    probe_wait: u64,
    /// Background work held back (delete, reset).
    stopping: bool,
    quiesced: bool,
    rate_mark: (u64, u64),
    pollers: Vec<reactor::Poller>,
}

fn owner_of(id: u64) -> Option<Rc<RefCell<Owner>>> {
    OWNERS.with(|o| o.borrow().get(&id).cloned())
}

fn owner_receive(msg: UserMsg) {
    let Some(rc) = owner_of(msg.clone) else {
        return reply(msg.origin, msg.part(), IoStatus::Failed, msg.buf);
    };
    let Ok(mut guard) = rc.try_borrow_mut() else {
        return reactor::defer(move || owner_receive(msg));
    };
    if guard.router.is_none() {
        // Completed meanwhile: the pass-through path serves it.
        drop(guard);
        return serve_released(&rc, msg);
    }
    {
        let o = &mut *guard;
        let Some(router) = o.router.as_mut() else {
            return;
        };
        let id = o.next_req;
        o.next_req += 1;
        let req = Request {
            id,
            kind: msg.kind,
            offset_blocks: msg.offset,
            num_blocks: msg.num,
            fua: msg.fua,
        };
        o.reqs.insert(
            id,
            OwnerReq {
                origin: msg.origin,
                token: msg.token,
                offset: msg.offset,
                num: msg.num,
                buf: msg.buf,
            },
        );
        sync_mode(&o.sh, router);
        if let Err(e) = router.submit(req, &mut o.out) {
            tracing::error!(error = %e, "clone router refused a request");
            if let Some(r) = o.reqs.remove(&id) {
                reply(r.origin, r.part(), IoStatus::Failed, r.buf);
            }
        }
    }
    drop(guard);
    drive(&rc);
}

/// A request that reached the owner after the router was dropped.
fn serve_released(rc: &Rc<RefCell<Owner>>, msg: UserMsg) {
    let o = rc.borrow();
    let dst = o.dst.clone();
    let sh = o.sh.clone();
    drop(o);
    if msg.kind == IoKind::WriteZeroes && !sh.dest_write_zeroes {
        let (origin, part) = (msg.origin, msg.part());
        let blocks = msg.offset..msg.offset + msg.num;
        reactor::spawn_local(async move {
            let ok = write_zeroes(&dst, &sh, blocks).await;
            let st = if ok {
                IoStatus::Success
            } else {
                IoStatus::Failed
            };
            reply(origin, part, st, None);
        });
        return;
    }
    let (t, off, num) = match msg.kind {
        IoKind::Read => (IoType::Read, msg.offset, msg.num),
        IoKind::Write => (IoType::Write, msg.offset, msg.num),
        IoKind::WriteZeroes => (IoType::WriteZeroes, msg.offset, msg.num),
        IoKind::Flush => (IoType::Flush, 0, sh.geo.source_blocks()),
        IoKind::Discard => match sh.geo.whole_regions_in(msg.offset, msg.num) {
            Some(r) if !r.is_empty() && sh.discard_passdown && sh.dest_unmap => {
                let b = sh.geo.region_range_blocks(r);
                (IoType::Unmap, b.start, b.end - b.start)
            }
            _ => return reply(msg.origin, msg.part(), IoStatus::Success, msg.buf),
        },
    };
    let (origin, part) = (msg.origin, msg.part());
    let mut child = BdevIo::new(t, off, num, msg.buf, move |mut c| {
        reply(origin, part, c.status, c.buf.take());
    });
    child.fua = msg.fua;
    dst.submit(child);
}

/// Run the router's commands until there are none, starting background
/// work when allowed; then publish counters and check for completion.
fn drive(rc: &Rc<RefCell<Owner>>) {
    let Ok(mut guard) = rc.try_borrow_mut() else {
        let rc = rc.clone();
        return reactor::defer(move || drive(&rc));
    };
    let o = &mut *guard;
    // One pump per pass: it starts a bounded number of copies, and the
    // next completion or poll starts more, so one pass never runs long.
    let mut pumped = false;
    loop {
        if o.out.is_empty() {
            if pumped {
                break;
            }
            pumped = true;
            o.pump();
            if o.out.is_empty() {
                break;
            }
        }
        let mut cmds = std::mem::take(&mut o.out);
        for c in cmds.drain(..) {
            exec(rc, o, c);
        }
        if o.out.is_empty() {
            o.out = cmds;
        }
    }
    o.publish();
    if let Some(c) = o.committer.as_mut() {
        let sh = &o.sh;
        if !c.releasing
            && !c.in_flight
            && sh.map.is_complete()
            && !sh.map.has_dirty()
            && sh.mode() == MODE_RW
        {
            c.releasing = true;
            let sh = sh.clone();
            reactor::spawn_local(release_all(sh));
        }
    }
}

impl Owner {
    fn router_and_out(&mut self) -> Option<(&mut Router, &mut Vec<Command>)> {
        let Owner { router, out, .. } = self;
        router.as_mut().map(|r| (r, out))
    }

    fn op_done(&mut self, op: OpId, ok: bool) {
        if let Some((r, out)) = self.router_and_out() {
            if let Err(e) = r.op_done(op, ok, out) {
                tracing::error!(error = %e, "clone: stray op completion");
            }
        }
    }

    fn copy_done(&mut self, copy: CopyId, ok: bool) {
        if let Some((r, out)) = self.router_and_out() {
            if let Err(e) = r.copy_done(copy, ok, out) {
                tracing::error!(error = %e, "clone: stray copy completion");
            }
        }
    }

    fn commit_done(&mut self, commit: CommitId, ok: bool) {
        if let Some((r, out)) = self.router_and_out() {
            if let Err(e) = r.commit_done(commit, ok, out) {
                tracing::error!(error = %e, "clone: stray commit completion");
            }
        }
    }

    /// Start background copies if hydration may run now: at most
    /// `MAX_COPY_STARTS_PER_PASS`, within the in-flight caps; while paused
    /// by errors, one probe copy when its back-off has expired.
    fn pump(&mut self) {
        let sh = self.sh.clone();
        if sh.kick.swap(false, Ordering::AcqRel) && sh.paused.load(Ordering::Acquire) == PAUSE_NONE
        {
            self.fail_streak = 0;
            self.backoff_until = 0;
            self.probe_wait = PROBE_MIN_NS;
        }
        let Some(router) = self.router.as_mut() else {
            return;
        };
        sync_mode(&sh, router);
        let paused = sh.paused.load(Ordering::Relaxed) != PAUSE_NONE;
        let enabled = sh.hydration_enabled.load(Ordering::Relaxed)
            && sh.mode() == MODE_RW
            && !self.stopping
            && !self.quiesced;
        let cfg = router.config_mut();
        cfg.hydration_enabled = enabled;
        cfg.hydration_threshold = sh.threshold.load(Ordering::Relaxed) as u64;
        cfg.hydration_batch_size = sh.batch.load(Ordering::Relaxed).max(1) as u64;
        cfg.copy_on_read = sh.copy_on_read.load(Ordering::Relaxed);
        if !enabled || sh.map.is_complete() {
            return;
        }
        let now = reactor::now_ns();
        if now < self.backoff_until {
            return;
        }
        let region = sh.geo.region_size();
        let per_copy = CHUNK_BYTES
            .min(cfg.hydration_batch_size.saturating_mul(region))
            .max(1);
        let mut room = MAX_COPIES_IN_FLIGHT
            .saturating_sub(self.copies_in_flight)
            .min(MAX_COPY_BUF_BYTES.saturating_sub(self.copy_buf_bytes) / per_copy)
            .min(MAX_COPY_STARTS_PER_PASS);
        if paused {
            if self.probe_pending || self.copies_in_flight > 0 {
                return;
            }
            room = room.min(1);
        }
        if room == 0 {
            return;
        }
        let limit = sh.mbytes_per_sec.load(Ordering::Relaxed);
        let region = region as f64;
        if limit > 0 {
            // Each owner gets an equal share of the clone's limit.
            let bps = limit as f64 * 1048576.0 / sh.owners.len() as f64;
            let elapsed = now.saturating_sub(self.last_refill) as f64 / 1e9;
            self.last_refill = now;
            // Burst at most 50 ms worth (or one batch), so an idle spell
            // does not let hydration overshoot the limit afterwards.
            let batch = cfg.hydration_batch_size as f64 * region;
            let cap = (bps * 0.05).max(batch);
            self.tokens = (self.tokens + elapsed * bps).min(cap);
            if self.tokens <= 0.0 {
                return;
            }
        } else {
            self.last_refill = now;
            self.tokens = 0.0;
        }
        let started = router.next_background_max(&mut self.out, room);
        if limit > 0 {
            self.tokens -= started as f64 * region;
        }
        if paused && started > 0 {
            self.probe_pending = true;
            // The next probe waits for this one's outcome and back-off.
            self.backoff_until = now + self.probe_wait;
        }
    }

    fn publish(&mut self) {
        let slot = &self.sh.hydrating[self.idx];
        if let Some(r) = &self.router {
            slot.store(r.stats().regions_copying, Ordering::Relaxed);
            // Modes only get worse; the worst owner's is the clone's.
            self.sh
                .mode
                .fetch_max(mode_code(r.mode()), Ordering::AcqRel);
        } else {
            slot.store(0, Ordering::Relaxed);
        }
    }

    fn on_timer(&mut self) {
        let now = reactor::now_ns();
        let bytes = self.sh.hydrated_bytes.load(Ordering::Relaxed);
        let (t0, b0) = self.rate_mark;
        if now > t0 {
            let rate = (bytes - b0) as f64 * 1e9 / (now - t0) as f64;
            self.sh.rate_bps.store(rate as u64, Ordering::Relaxed);
        }
        self.rate_mark = (now, bytes);
    }

    fn copy_failed(&mut self, fault: CopyFault, what: String, probe: bool) {
        self.fail_streak = self.fail_streak.saturating_add(1);
        let reason = match fault {
            CopyFault::Source => PAUSE_SOURCE,
            CopyFault::Dest => PAUSE_DEST,
        };
        let now = reactor::now_ns();
        tracing::warn!(clone = %self.sh.name, streak = self.fail_streak, "hydration copy failed: {what}");
        self.sh.set_last_error(what);
        if self.sh.paused.load(Ordering::Acquire) != PAUSE_NONE {
            if probe {
                self.sh.paused.store(reason, Ordering::Release);
                self.probe_wait = (self.probe_wait * 2).min(PROBE_MAX_NS);
                self.backoff_until = now + self.probe_wait;
            }
            return;
        }
        let shift = (self.fail_streak - 1).min(20);
        let wait = (BACKOFF_MIN_NS << shift).min(BACKOFF_MAX_NS);
        self.backoff_until = now + wait;
        if self.fail_streak >= MAX_FAIL_STREAK
            && self
                .sh
                .paused
                .compare_exchange(PAUSE_NONE, reason, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.probe_wait = PROBE_MIN_NS;
            self.backoff_until = now + self.probe_wait;
            tracing::error!(clone = %self.sh.name, "hydration paused after {} failed copies in a row; probing every {}-{} s", self.fail_streak, PROBE_MIN_NS / 1_000_000_000, PROBE_MAX_NS / 1_000_000_000);
        }
    }

    /// A copy succeeded: the streak ends, and a pause by errors too.
    fn copy_succeeded(&mut self) {
        self.fail_streak = 0;
        self.probe_wait = PROBE_MIN_NS;
        if self.sh.paused.load(Ordering::Relaxed) != PAUSE_NONE
            && self.sh.paused.swap(PAUSE_NONE, Ordering::AcqRel) != PAUSE_NONE
        {
            self.backoff_until = 0;
            *lock(&self.sh.last_error) = None;
            tracing::info!(clone = %self.sh.name, "a copy succeeded: hydration resumed");
        }
    }

    /// Drop the router, the source channel and the pollers (completion).
    fn release_local(&mut self) {
        self.router = None;
        self.src = None;
        self.bufs.clear();
        self.sh.hydrating[self.idx].store(0, Ordering::Relaxed);
        // Pollers are dropped outside their own callbacks.
        let pollers = std::mem::take(&mut self.pollers);
        reactor::defer(move || drop(pollers));
    }
}

/// Completion (every region hydrated and committed): from now on all I/O
/// goes straight to the destination; each owner drops its router once its
/// in-flight requests are done; then the source claim is released.
async fn release_all(sh: Arc<Shared>) {
    sh.released.store(true, Ordering::Release);
    sh.rate_bps.store(0, Ordering::Relaxed);
    if lock(&sh.descs).source.is_some() {
        tracing::info!(clone = %sh.name, "fully hydrated: releasing the source");
    }
    let id = sh.id;
    for &r in &sh.owners {
        oneshot::run_on(r, move || async move {
            let Some(rc) = owner_of(id) else { return };
            let t0 = reactor::now_ns();
            loop {
                let idle = rc.borrow().router.as_ref().is_none_or(|r| r.is_idle());
                if idle || reactor::now_ns() - t0 > STOP_TIMEOUT_NS {
                    break;
                }
                reactor::sleep(Duration::from_millis(1)).await;
            }
            rc.borrow_mut().release_local();
        })
        .await;
    }
    let d = lock(&sh.descs).source.take();
    drop(d);
}

/// On the home reactor: a commit is wanted by `w`.
fn committer_request(id: u64, w: Waiter) {
    let Some(rc) = owner_of(id) else {
        return answer(id, w, false);
    };
    let has = rc.borrow().committer.is_some();
    if !has {
        return answer(id, w, false);
    }
    if let Some(c) = rc.borrow_mut().committer.as_mut() {
        c.next.push(w);
    }
    start_round(&rc, false);
}

fn committer_flush(id: u64, origin: u32, token: u64) {
    committer_request(id, Waiter::Flush { origin, token });
}

/// Tell a waiter how its commit went.
/// Bring a router's metadata mode down to the clone's: a commit that
/// failed in the committer (answering only flushes) leaves the routers
/// read-write otherwise, and they would go on recording hydrations that can
/// never be committed.
fn sync_mode(sh: &Shared, router: &mut Router) {
    match sh.mode() {
        MODE_RW => {}
        MODE_RO => router.set_read_only(),
        _ => router.set_failed(),
    }
}

fn answer(id: u64, w: Waiter, ok: bool) {
    match w {
        Waiter::Router { reactor, commit } => send_to(reactor, move || {
            let Some(rc) = owner_of(id) else { return };
            rc.borrow_mut().commit_done(commit, ok);
            drive(&rc);
        }),
        Waiter::Flush { origin, token } => {
            let st = if ok {
                IoStatus::Success
            } else {
                IoStatus::Failed
            };
            reply(origin, Part { token, offset: 0 }, st, None)
        }
    }
}

/// Start a commit round if none is in flight and one is wanted (waiters,
/// or `periodic` with dirty units).
fn start_round(rc: &Rc<RefCell<Owner>>, periodic: bool) {
    let mut o = rc.borrow_mut();
    let sh = o.sh.clone();
    let (dst, md) = (o.dst.clone(), o.md.clone());
    let Some(c) = o.committer.as_mut() else {
        return;
    };
    if c.in_flight || (c.next.is_empty() && !(periodic && sh.map.has_dirty())) {
        return;
    }
    c.in_flight = true;
    c.current = std::mem::take(&mut c.next);
    drop(o);
    // Counted before the snapshot: a router that finds no dirty unit
    // then knows its bits may be in this round.
    sh.commits_in_flight.fetch_add(1, Ordering::AcqRel);
    let dirty = sh.map.take_dirty();
    let weak = Rc::downgrade(rc);
    reactor::spawn_local(async move {
        let ok = if dirty.is_empty() {
            // Nothing changed: a destination flush, no metadata write.
            let ok = util::simple(&dst, IoType::Flush, 0, sh.geo.source_blocks())
                .await
                .is_ok();
            if !ok {
                sh.err_dest.fetch_add(1, Ordering::Relaxed);
            }
            ok
        } else if sh.mode() != MODE_RW {
            false
        } else {
            let units = snapshot_units(&sh, &dirty);
            commit_units(&dst, &md, &sh, units).await
        };
        if !ok && !dirty.is_empty() {
            // The bits stay in core (reads are right) and dirty: every
            // later flush needing them fails (dm-clone read-only mode).
            sh.map.restore_dirty(&dirty);
            if sh.mode.fetch_max(MODE_RO, Ordering::AcqRel) == MODE_RW {
                tracing::error!(clone = %sh.name, "metadata commit failed: switching to read-only mode");
                // dm-clone's abort: reopen the last committed metadata; if
                // even that fails the metadata is unusable and the clone
                // goes to fail mode (every I/O fails; never left again).
                if let Err(why) = recheck_metadata(&md, &sh).await {
                    sh.mode.fetch_max(MODE_FAILED, Ordering::AcqRel);
                    sh.set_last_error(format!("metadata unusable after a failed commit: {why}"));
                    tracing::error!(clone = %sh.name, %why, "metadata unusable: switching to fail mode");
                }
            }
        }
        sh.commits_in_flight.fetch_sub(1, Ordering::AcqRel);
        let Some(rc) = weak.upgrade() else { return };
        let waiters = {
            let mut o = rc.borrow_mut();
            let Some(c) = o.committer.as_mut() else {
                return;
            };
            c.in_flight = false;
            std::mem::take(&mut c.current)
        };
        for w in waiters {
            answer(sh.id, w, ok);
        }
        start_round(&rc, false);
        drive(&rc);
    });
}

/// Read the committed superblock back and check it is still this clone's
/// (dm-clone reopens its metadata after a failed commit).
async fn recheck_metadata(md: &IoChannel, sh: &Shared) -> Result<(), String> {
    match read_superblock(md).await.map_err(|e| e.to_string())? {
        SuperState::Valid { sb, .. } => {
            metadata::check_geometry(&sb, &sh.geo).map_err(|e| e.to_string())?;
            metadata::check_uuid(&sb, sh.uuid).map_err(|e| e.to_string())
        }
        SuperState::Blank => Err("the superblock is gone (all zero)".into()),
    }
}

/// Read and decode both superblock slots.
async fn read_superblock(md: &IoChannel) -> Result<SuperState, CloneError> {
    let mdbs = md.bdev().block_size() as u64;
    let sb = util::read(md, 0, BITMAP_OFFSET / mdbs)
        .await
        .map_err(|s| io_err("metadata superblock read", s))?;
    let fb = FORMAT_BLOCK_SIZE as usize;
    Ok(metadata::decode_superblock(
        &sb.as_slice()[..fb],
        &sb.as_slice()[fb..2 * fb],
    )?)
}

/// Images of the dirty units, in whole metadata blocks (a block's other
/// units are written too; a group past the last unit is padded later).
fn snapshot_units(sh: &Shared, dirty: &[u32]) -> Vec<UnitImage> {
    let per = metadata::units_per_block(sh.md_block_size) as u64;
    let num_units = sh.map.num_units();
    let mut units = Vec::with_capacity(dirty.len());
    let mut last_group = u64::MAX;
    for &u in dirty {
        let g = u as u64 / per;
        if g == last_group {
            continue;
        }
        last_group = g;
        for v in g * per..(g * per + per).min(num_units) {
            units.push(UnitImage {
                index: v as u32,
                words: sh.map.unit_words(v),
            });
        }
    }
    units
}

/// Bytes of `blocks` at block size `bs`.
fn bytes(blocks: &Range<u64>, bs: u32) -> usize {
    ((blocks.end - blocks.start) * bs as u64) as usize
}

fn exec(rc: &Rc<RefCell<Owner>>, o: &mut Owner, c: Command) {
    match c {
        Command::ReadSource { req, op, blocks } => {
            let ch = o.src.clone();
            exec_read(rc, o, ch, true, req, op, blocks)
        }
        Command::ReadDest { req, op, blocks } => {
            let ch = Some(o.dst.clone());
            exec_read(rc, o, ch, false, req, op, blocks)
        }
        Command::WriteDest {
            req,
            op,
            blocks,
            fua,
        } => exec_write(rc, o, req, op, blocks, fua),
        Command::WriteZeroesDest { op, blocks, .. } => {
            let (dst, sh, weak) = (o.dst.clone(), o.sh.clone(), Rc::downgrade(rc));
            reactor::spawn_local(async move {
                let ok = write_zeroes(&dst, &sh, blocks).await;
                op_finished(&weak, op, ok, true);
            });
        }
        Command::DiscardDest { op, blocks, .. } => {
            if !o.sh.dest_unmap {
                // Advisory: the destination cannot unmap; the data of a
                // discarded range is undefined either way.
                return o.op_done(op, true);
            }
            let weak = Rc::downgrade(rc);
            let n = blocks.end - blocks.start;
            o.dst.unmap(blocks.start, n, move |io| {
                op_finished(&weak, op, io.status.is_success(), true)
            });
        }
        Command::FlushDest { op, .. } => {
            let weak = Rc::downgrade(rc);
            o.dst.flush(0, o.sh.geo.source_blocks(), move |io| {
                op_finished(&weak, op, io.status.is_success(), false)
            });
        }
        Command::StartCopy { copy, blocks, .. } => {
            let probe = std::mem::take(&mut o.probe_pending);
            let Some(src) = o.src.clone() else {
                return o.copy_done(copy, false);
            };
            let chunk = (CHUNK_BYTES / o.sh.geo.block_size() as u64).min(blocks.end - blocks.start)
                as usize
                * o.sh.geo.block_size() as usize;
            let buf = match o.bufs.pop() {
                Some(mut b) if b.capacity() >= chunk => {
                    b.set_len(chunk);
                    b
                }
                _ => DmaBuf::new(chunk),
            };
            o.copies_in_flight += 1;
            o.copy_buf_bytes += chunk as u64;
            let (dst, sh, weak) = (o.dst.clone(), o.sh.clone(), Rc::downgrade(rc));
            reactor::spawn_local(async move {
                let (res, buf) = copy_blocks(&src, &dst, &sh, blocks.clone(), buf).await;
                let Some(rc) = weak.upgrade() else { return };
                {
                    let mut o = rc.borrow_mut();
                    o.copies_in_flight -= 1;
                    o.copy_buf_bytes -= chunk as u64;
                    if o.bufs.len() < 64 {
                        o.bufs.push(buf);
                    }
                    match res {
                        Ok(()) => {
                            o.copy_succeeded();
                            let n = bytes(&blocks, sh.geo.block_size()) as u64;
                            sh.hydrated_bytes.fetch_add(n, Ordering::Relaxed);
                            o.copy_done(copy, true);
                        }
                        Err((fault, e)) => {
                            o.copy_failed(fault, e, probe);
                            o.copy_done(copy, false);
                        }
                    }
                }
                drive(&rc);
            });
        }
        Command::Commit { commit, .. } => {
            // The committer snapshots the units itself.
            let (id, reactor) = (o.sh.id, reactor::current().unwrap_or(0));
            send_to(o.sh.home, move || {
                committer_request(id, Waiter::Router { reactor, commit })
            });
        }
        Command::Complete { req, status } => {
            if let Some(r) = o.reqs.remove(&req) {
                let st = match status {
                    Status::Success => IoStatus::Success,
                    Status::Error(_) => IoStatus::Failed,
                };
                reply(r.origin, r.part(), st, r.buf);
            }
        }
    }
}

/// An op's completion, from an I/O callback (never inline with `exec`).
fn op_finished(weak: &RcWeak<RefCell<Owner>>, op: OpId, ok: bool, dest_write: bool) {
    let Some(rc) = weak.upgrade() else { return };
    {
        let mut o = rc.borrow_mut();
        if !ok && dest_write {
            o.sh.err_dest.fetch_add(1, Ordering::Relaxed);
        }
        o.op_done(op, ok);
    }
    drive(&rc);
}

fn exec_read(
    rc: &Rc<RefCell<Owner>>,
    o: &mut Owner,
    ch: Option<IoChannel>,
    from_source: bool,
    req: ReqId,
    op: OpId,
    blocks: Range<u64>,
) {
    let bs = o.sh.geo.block_size();
    let (Some(ch), Some(r)) = (ch, o.reqs.get_mut(&req)) else {
        return o.op_done(op, false);
    };
    let len = bytes(&blocks, bs);
    let at = ((blocks.start - r.offset) * bs as u64) as usize;
    let whole = blocks.start == r.offset && blocks.end - blocks.start == r.num;
    let (buf, bounce) = match (whole, r.buf.take()) {
        (true, Some(b)) => (b, false),
        (_, b) => {
            r.buf = b;
            (DmaBuf::new(len), true)
        }
    };
    let weak = Rc::downgrade(rc);
    ch.read(
        blocks.start,
        blocks.end - blocks.start,
        buf,
        move |mut io| {
            let ok = io.status.is_success();
            let Some(rc) = weak.upgrade() else { return };
            {
                let mut o = rc.borrow_mut();
                if !ok && from_source {
                    o.sh.err_source.fetch_add(1, Ordering::Relaxed);
                }
                if let (Some(buf), Some(r)) = (io.buf.take(), o.reqs.get_mut(&req)) {
                    if !bounce {
                        r.buf = Some(buf);
                    } else if ok {
                        if let Some(rb) = r.buf.as_mut() {
                            rb.as_mut_slice()[at..at + len].copy_from_slice(&buf.as_slice()[..len]);
                        }
                    }
                }
                o.op_done(op, ok);
            }
            drive(&rc);
        },
    );
}

fn exec_write(
    rc: &Rc<RefCell<Owner>>,
    o: &mut Owner,
    req: ReqId,
    op: OpId,
    blocks: Range<u64>,
    fua: bool,
) {
    let bs = o.sh.geo.block_size();
    let Some(r) = o.reqs.get_mut(&req) else {
        return o.op_done(op, false);
    };
    let len = bytes(&blocks, bs);
    let at = ((blocks.start - r.offset) * bs as u64) as usize;
    let whole = blocks.start == r.offset && blocks.end - blocks.start == r.num;
    let (buf, bounce) = match (whole, r.buf.take()) {
        (true, Some(b)) => (b, false),
        (_, Some(b)) => {
            let mut nb = DmaBuf::new(len);
            nb.as_mut_slice()
                .copy_from_slice(&b.as_slice()[at..at + len]);
            r.buf = Some(b);
            (nb, true)
        }
        (_, None) => return o.op_done(op, false),
    };
    let weak = Rc::downgrade(rc);
    let mut io = BdevIo::write(
        blocks.start,
        blocks.end - blocks.start,
        buf,
        move |mut io| {
            let ok = io.status.is_success();
            let Some(rc) = weak.upgrade() else { return };
            {
                let mut o = rc.borrow_mut();
                if !ok {
                    o.sh.err_dest.fetch_add(1, Ordering::Relaxed);
                }
                if !bounce {
                    if let (Some(buf), Some(r)) = (io.buf.take(), o.reqs.get_mut(&req)) {
                        r.buf = Some(buf);
                    }
                }
                o.op_done(op, ok);
            }
            drive(&rc);
        },
    );
    io.fua = fua;
    o.dst.submit(io);
}

/// Zero `blocks` on the destination: write_zeroes when it has it, else
/// writes of a zeroed buffer.
async fn write_zeroes(dst: &IoChannel, sh: &Shared, blocks: Range<u64>) -> bool {
    if sh.dest_write_zeroes {
        return util::simple(
            dst,
            IoType::WriteZeroes,
            blocks.start,
            blocks.end - blocks.start,
        )
        .await
        .is_ok();
    }
    let bs = sh.geo.block_size() as u64;
    let chunk = (CHUNK_BYTES / bs).min(blocks.end - blocks.start);
    let zero = DmaBuf::zeroed((chunk * bs) as usize);
    let mut buf = Some(zero);
    let mut at = blocks.start;
    while at < blocks.end {
        let n = chunk.min(blocks.end - at);
        let io = util::submit(dst, IoType::Write, at, n, buf.take(), false).await;
        if !io.status.is_success() {
            return false;
        }
        let mut io = io;
        buf = io.buf.take();
        at += n;
    }
    true
}

fn is_zero(b: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to splits off the
    // unaligned head and tail as bytes.
    let (head, mid, tail) = unsafe { b.align_to::<u64>() };
    head.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// Copy `blocks` from the source to the destination in chunks through
/// `buf`; an all-zero chunk becomes write_zeroes when the destination has
/// it. A source that reports block status (an NBD export, a sparse file)
/// is asked first: what reads as zeroes is zeroed on the destination
/// without being read. Gives the buffer back for reuse.
async fn copy_blocks(
    src: &IoChannel,
    dst: &IoChannel,
    sh: &Shared,
    blocks: Range<u64>,
    buf: DmaBuf,
) -> (Result<(), (CopyFault, String)>, DmaBuf) {
    let bs = sh.geo.block_size() as u64;
    let chunk = (buf.len() as u64 / bs).max(1);
    let mut buf = Some(buf);
    let mut at = blocks.start;
    let fail = |fault: CopyFault, what: &str, at: u64, buf: Option<DmaBuf>| {
        (
            Err((fault, format!("{what} at block {at} failed"))),
            buf.unwrap_or_else(|| DmaBuf::new(0)),
        )
    };
    let mut ask = src.bdev().has_block_status();
    // The source's extents from `at` on: (end block, reads as zeroes).
    let mut extents: std::collections::VecDeque<(u64, bool)> = Default::default();
    while at < blocks.end {
        while extents.front().is_some_and(|&(end, _)| end <= at) {
            extents.pop_front();
        }
        if ask && extents.is_empty() {
            match util::block_status(src, at, blocks.end - at).await {
                Ok(v) => {
                    let mut end = at;
                    for e in v {
                        end += e.num_blocks;
                        extents.push_back((end, e.zero));
                    }
                }
                // No answer: read the rest.
                Err(_) => ask = false,
            }
        }
        if let Some(&(end, true)) = extents.front() {
            if !write_zeroes(dst, sh, at..end).await {
                sh.err_dest.fetch_add(1, Ordering::Relaxed);
                return fail(CopyFault::Dest, "destination write_zeroes", at, buf);
            }
            at = end;
            continue;
        }
        let limit = extents.front().map_or(blocks.end, |&(end, _)| end);
        let n = chunk.min(limit - at);
        let mut io = util::submit(src, IoType::Read, at, n, buf.take(), false).await;
        buf = io.buf.take();
        if !io.status.is_success() {
            sh.err_source.fetch_add(1, Ordering::Relaxed);
            return fail(CopyFault::Source, "source read", at, buf);
        }
        let len = (n * bs) as usize;
        let zero =
            sh.dest_write_zeroes && buf.as_ref().is_some_and(|b| is_zero(&b.as_slice()[..len]));
        let mut io = if zero {
            util::submit(dst, IoType::WriteZeroes, at, n, None, false).await
        } else {
            util::submit(dst, IoType::Write, at, n, buf.take(), false).await
        };
        if !zero {
            buf = io.buf.take();
        }
        if !io.status.is_success() {
            sh.err_dest.fetch_add(1, Ordering::Relaxed);
            return fail(CopyFault::Dest, "destination write", at, buf);
        }
        at += n;
    }
    (Ok(()), buf.unwrap_or_else(|| DmaBuf::new(0)))
}

/// The commit's three steps, strictly in order: flush the destination,
/// write the units (whole metadata blocks), flush the metadata bdev.
async fn commit_units(dst: &IoChannel, md: &IoChannel, sh: &Shared, units: Vec<UnitImage>) -> bool {
    if util::simple(dst, IoType::Flush, 0, sh.geo.source_blocks())
        .await
        .is_err()
    {
        sh.err_dest.fetch_add(1, Ordering::Relaxed);
        sh.set_last_error("destination flush before a metadata commit failed".into());
        return false;
    }
    let mdbs = sh.md_block_size as usize;
    let per = (mdbs / UNIT_SIZE).max(1);
    // Runs of consecutive units, each written as one I/O.
    let mut i = 0;
    while i < units.len() {
        let mut j = i + 1;
        while j < units.len() && units[j].index == units[j - 1].index + 1 {
            j += 1;
        }
        let first = units[i].index as u64;
        let count = (j - i).div_ceil(per) * per;
        let mut buf = DmaBuf::zeroed(count * UNIT_SIZE);
        for (k, u) in units[i..j].iter().enumerate() {
            let img = metadata::encode_unit_words(&sh.uuid, u.index, &u.words);
            buf.as_mut_slice()[k * UNIT_SIZE..(k + 1) * UNIT_SIZE].copy_from_slice(&img);
        }
        let off = metadata::unit_offset(first) / mdbs as u64;
        if util::write(md, off, buf, false).await.is_err() {
            sh.err_md.fetch_add(1, Ordering::Relaxed);
            sh.set_last_error(format!("metadata write of units {first}.. failed"));
            return false;
        }
        i = j;
    }
    if util::simple(md, IoType::Flush, 0, sh.md_num_blocks)
        .await
        .is_err()
    {
        sh.err_md.fetch_add(1, Ordering::Relaxed);
        sh.set_last_error("metadata flush failed".into());
        return false;
    }
    true
}

/// Build owner `idx` on this reactor (channels, pollers; the committer
/// too on the home reactor).
fn start_owner(sh: Arc<Shared>, router: Router, idx: usize) -> Result<(), CloneError> {
    let descs = lock(&sh.descs);
    let (Some(d), Some(m)) = (&descs.dest, &descs.md) else {
        return Err(CloneError::Io("base bdev gone during create".into()));
    };
    // No source: a fully hydrated clone restarted without it.
    let src = descs.source.as_ref().map(|s| s.channel());
    let (dst, md) = (d.channel(), m.channel());
    drop(descs);
    let now = reactor::now_ns();
    let home = reactor::current() == Some(sh.home);
    let rc = Rc::new(RefCell::new(Owner {
        sh: sh.clone(),
        idx,
        committer: home.then(Committer::default),
        router: Some(router),
        src,
        dst,
        md,
        reqs: HashMap::new(),
        next_req: 1,
        out: Vec::with_capacity(64),
        bufs: Vec::new(),
        tokens: 0.0,
        last_refill: now,
        fail_streak: 0,
        backoff_until: 0,
        copies_in_flight: 0,
        copy_buf_bytes: 0,
        probe_pending: false,
        probe_wait: PROBE_MIN_NS,
        stopping: false,
        quiesced: false,
        rate_mark: (now, 0),
        pollers: Vec::new(),
    }));
    let w = Rc::downgrade(&rc);
    // Completions drive hydration; this poller covers the rate limit's
    // refill and the error back-off.
    let hyd = reactor::poller_register(HYDRATION_POLL, move || {
        if let Some(rc) = w.upgrade() {
            drive(&rc);
        }
        reactor::PollStatus::Idle
    });
    let mut pollers = vec![hyd];
    if home {
        // Periodic commit and the hydration rate figure.
        let w = Rc::downgrade(&rc);
        pollers.push(reactor::poller_register(COMMIT_PERIOD, move || {
            let Some(rc) = w.upgrade() else {
                return reactor::PollStatus::Idle;
            };
            rc.borrow_mut().on_timer();
            start_round(&rc, true);
            drive(&rc);
            reactor::PollStatus::Busy
        }));
    }
    rc.borrow_mut().pollers = pollers;
    OWNERS.with(|o| o.borrow_mut().insert(sh.id, rc));
    Ok(())
}

/// Delete: every owner stops background work and lets its in-flight I/O
/// finish; the committer makes a final commit (a failure is logged, not
/// fatal: the bases may be gone); then the owners are dropped.
async fn stop_all(sh: &Arc<Shared>) {
    let id = sh.id;
    for &r in &sh.owners {
        oneshot::run_on(r, move || async move {
            let Some(rc) = owner_of(id) else { return };
            rc.borrow_mut().stopping = true;
            let t0 = reactor::now_ns();
            loop {
                drive(&rc);
                if rc.borrow().router.as_ref().is_none_or(|r| r.is_idle()) {
                    return;
                }
                if reactor::now_ns() - t0 > STOP_TIMEOUT_NS {
                    tracing::warn!(clone = %rc.borrow().sh.name, "delete: in-flight I/O did not finish in time");
                    return;
                }
                reactor::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
    }
    oneshot::run_on(sh.home, move || async move {
        let Some(rc) = owner_of(id) else { return };
        let t0 = reactor::now_ns();
        let mut started = false;
        loop {
            let (busy, dirty, name) = {
                let o = rc.borrow();
                let busy = o.committer.as_ref().is_some_and(|c| c.in_flight);
                (busy, o.sh.map.has_dirty() && o.sh.mode() == MODE_RW, o.sh.name.clone())
            };
            if !busy && (started || !dirty) {
                break;
            }
            if !busy && !started {
                started = true;
                start_round(&rc, true);
            }
            if reactor::now_ns() - t0 > STOP_TIMEOUT_NS {
                tracing::warn!(clone = %name, "delete: the final commit did not finish in time");
                break;
            }
            reactor::sleep(Duration::from_millis(1)).await;
        }
        if rc.borrow().sh.mode() != MODE_RW {
            tracing::warn!(clone = %rc.borrow().sh.name, "final metadata commit not possible; recent hydration will be redone on resume");
        }
    })
    .await;
    for &r in &sh.owners {
        oneshot::run_on(r, move || async move {
            let rc = OWNERS.with(|o| o.borrow_mut().remove(&id));
            if let Some(rc) = rc {
                let mut o = rc.borrow_mut();
                o.pollers.clear();
                o.router = None;
                // Commit waiters still queued get an answer.
                if let Some(c) = o.committer.take() {
                    drop(o);
                    for w in c.current.into_iter().chain(c.next) {
                        answer(id, w, false);
                    }
                }
            }
        })
        .await;
    }
}

/// Reset support: hold background copies back and wait for the owner to
/// drain (`on`), or let them go again.
async fn owner_quiesce(id: u64, on: bool) {
    let Some(rc) = owner_of(id) else { return };
    rc.borrow_mut().quiesced = on;
    if !on {
        drive(&rc);
        return;
    }
    let t0 = reactor::now_ns();
    loop {
        drive(&rc);
        let idle = rc
            .borrow()
            .router
            .as_ref()
            .is_none_or(|r| r.stats().copies_in_flight == 0 && r.stats().ops_in_flight == 0);
        if idle || reactor::now_ns() - t0 > STOP_TIMEOUT_NS {
            return;
        }
        reactor::sleep(Duration::from_millis(1)).await;
    }
}

// ---------------------------------------------------------------------------
// Create / delete / status / runtime tunables

/// Where a base's event callback finds the clone once registered.
type SelfRef = Arc<OnceLock<Weak<Bdev>>>;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static NEXT_OWNER: AtomicU32 = AtomicU32::new(0);
/// Bitmap words per ownership stripe; 0: automatic (stripes of >= 4 MiB).
static STRIPE_WORDS: AtomicU64 = AtomicU64::new(0);

/// Tests: stripes of `words` bitmap words (64 regions each) for clones
/// created from now on; 0 restores the automatic size.
#[doc(hidden)]
pub fn set_stripe_words(words: u64) {
    STRIPE_WORDS.store(words, Ordering::Relaxed);
}

fn stripe_words(region_size: u64) -> u64 {
    match STRIPE_WORDS.load(Ordering::Relaxed) {
        0 => (4u64 << 20).div_ceil(region_size * 64).max(1),
        w => w,
    }
}

fn clone_of(b: &Arc<Bdev>) -> Option<Arc<Shared>> {
    b.ops_as::<CloneBdev>().map(|c| c.0.clone())
}

fn find(name: &str) -> Option<Arc<Shared>> {
    bdev::get(name)
        .filter(|b| b.name() == name)
        .and_then(|b| clone_of(&b))
}

fn open_claim(
    name: &str,
    ty: ClaimType,
    role: &'static str,
) -> Result<(Desc, SelfRef), CloneError> {
    // The source's removal after completion never arrives: its descriptor
    // is closed by then.
    let (me, cb) = bdev::remove_propagator(role);
    let mut d = bdev::open(name, false, cb).map_err(CloneError::from_bdev)?;
    d.claim(ty, MODULE_NAME).map_err(CloneError::from_bdev)?;
    Ok((d, me))
}

fn io_err(what: &str, st: IoStatus) -> CloneError {
    CloneError::Io(format!("{what} failed ({})", st.name()))
}

/// Read the metadata area after the superblocks (`bytes` of it) in large
/// I/Os, handing each piece and its first unit to `f`.
async fn read_bitmap_area(
    md: &IoChannel,
    bytes: u64,
    mut f: impl FnMut(u64, &[u8]),
) -> Result<(), CloneError> {
    let mdbs = md.bdev().block_size() as u64;
    let total = bytes.div_ceil(mdbs) * mdbs;
    let mut at = 0u64;
    while at < total {
        let n = MD_IO_BYTES.min(total - at);
        let b = util::read(md, (BITMAP_OFFSET + at) / mdbs, n / mdbs)
            .await
            .map_err(|s| io_err("metadata bitmap read", s))?;
        f(at / UNIT_SIZE as u64, b.as_slice());
        at += n;
    }
    Ok(())
}

/// What the bitmap area of a device without a valid superblock holds, for
/// the refusal (", 12 bitmap units hold hydrated regions"); empty when it
/// is all zero.
async fn describe_bitmap_area(md: &IoChannel, num_regions: u64) -> Result<String, CloneError> {
    let units = units_for(num_regions);
    let (mut nonzero, mut with_bits) = (0u64, 0u64);
    read_bitmap_area(md, units * UNIT_SIZE as u64, |first, b| {
        let keep = ((units - first.min(units)) as usize * UNIT_SIZE).min(b.len());
        let (n, w) = metadata::scan_units(&b[..keep]);
        nonzero += n;
        with_bits += w;
    })
    .await?;
    Ok(match (nonzero, with_bits) {
        (0, _) => String::new(),
        (n, 0) => format!(", {n} bitmap units are not blank (none holds a hydrated region)"),
        (_, w) => format!(", {w} bitmap units hold hydrated regions"),
    })
}

/// A metadata write an open decided on, made only once the create can no
/// longer fail for another reason.
enum Repair {
    /// Version 1 metadata: rewrite every unit as version 2, then both
    /// superblock slots.
    Upgrade { sb: Superblock, slot: u32 },
    /// One slot is stale or damaged: write the current copy there.
    Heal { sb: Superblock, slot: u32 },
}

/// The outcome of reading a clone's metadata.
enum Opened {
    /// Blank, an interrupted format, or `force_format`: format with this
    /// uuid.
    Format(Uuid),
    /// A clone's metadata, loaded into the map.
    Loaded { uuid: Uuid, repair: Option<Repair> },
}

/// Read a clone's metadata without writing anything: decide whether to
/// format (blank device, interrupted format, `force`), or check the
/// superblock against the clone and load the bitmap into `map`. Anything
/// else is refused, naming the damage.
async fn open_metadata(
    md: &IoChannel,
    geo: &Geometry,
    state: Result<SuperState, CloneError>,
    want: Option<Uuid>,
    force: bool,
    map: &RegionMap,
) -> Result<Opened, CloneError> {
    if force {
        return Ok(Opened::Format(want.unwrap_or_else(Uuid::new_v4)));
    }
    let (sb, slot, both) = match state {
        Err(CloneError::Metadata(MetadataError::CorruptSuperblock { slot0, slot1, .. })) => {
            let units = describe_bitmap_area(md, geo.num_regions()).await?;
            return Err(MetadataError::CorruptSuperblock {
                slot0,
                slot1,
                units,
            }
            .into());
        }
        Err(e) => return Err(e),
        Ok(SuperState::Blank) => {
            // Blank only if nothing at all is written: a clone whose two
            // superblock blocks were lost is not formatted over.
            let units = describe_bitmap_area(md, geo.num_regions()).await?;
            if !units.is_empty() {
                return Err(MetadataError::CorruptSuperblock {
                    slot0: "all zero".into(),
                    slot1: "all zero".into(),
                    units,
                }
                .into());
            }
            return Ok(Opened::Format(want.unwrap_or_else(Uuid::new_v4)));
        }
        Ok(SuperState::Valid { sb, slot, both }) => (sb, slot, both),
    };
    if sb.flags & metadata::FLAG_FORMATTING != 0 {
        // A format that never finished: no clone ever ran on it.
        return Ok(Opened::Format(want.unwrap_or(sb.uuid)));
    }
    metadata::check_geometry(&sb, geo)?;
    if let Some(u) = want {
        metadata::check_uuid(&sb, u)?;
    }
    let key = UnitKey::of(&sb);
    let mut damage = metadata::UnitDamage::default();
    read_bitmap_area(md, sb.bitmap_units * UNIT_SIZE as u64, |first, b| {
        metadata::load_units(map, first, b, &key, &mut damage)
    })
    .await?;
    damage.into_error(map.num_units())?;
    let repair = if sb.version == metadata::VERSION_1 {
        Some(Repair::Upgrade {
            sb: sb.clone(),
            slot,
        })
    } else if !both {
        Some(Repair::Heal {
            sb: sb.clone(),
            slot: 1 - slot,
        })
    } else {
        None
    };
    Ok(Opened::Loaded {
        uuid: sb.uuid,
        repair,
    })
}

/// Write `sb` to each of `slots` in turn, flushing after each, so a torn
/// write damages one copy at most.
async fn write_superblock(
    md: &IoChannel,
    sb: &Superblock,
    slots: &[u32],
) -> Result<(), CloneError> {
    let mdbs = md.bdev().block_size() as u64;
    let nblocks_dev = md.bdev().num_blocks();
    for &slot in slots {
        let img = metadata::encode_superblock(sb, slot);
        let mut buf = DmaBuf::new(img.len());
        buf.as_mut_slice().copy_from_slice(&img);
        util::write(md, metadata::superblock_offset(slot) / mdbs, buf, false)
            .await
            .map_err(|s| io_err("metadata superblock write", s))?;
        util::simple(md, IoType::Flush, 0, nblocks_dev)
            .await
            .map_err(|s| io_err("metadata flush", s))?;
    }
    Ok(())
}

/// Write every unit of `map` (version 2, bound to `uuid`) and flush.
async fn write_all_units(md: &IoChannel, uuid: &Uuid, map: &RegionMap) -> Result<(), CloneError> {
    let mdbs = md.bdev().block_size() as u64;
    let units = map.num_units();
    let per_io = MD_IO_BYTES / UNIT_SIZE as u64;
    let mut buf = Some(DmaBuf::zeroed(MD_IO_BYTES as usize));
    let mut first = 0u64;
    while first < units {
        let n = per_io.min(units - first);
        let bytes = (n * UNIT_SIZE as u64).div_ceil(mdbs) * mdbs;
        let mut b = buf
            .take()
            .unwrap_or_else(|| DmaBuf::zeroed(MD_IO_BYTES as usize));
        let s = &mut b.as_mut_slice()[..bytes as usize];
        // The tail of a last partial block: zero units, never read.
        s.fill(0);
        for i in 0..n {
            let img = metadata::encode_unit(uuid, (first + i) as u32, map);
            s[i as usize * UNIT_SIZE..][..UNIT_SIZE].copy_from_slice(&img);
        }
        let off = metadata::unit_offset(first) / mdbs;
        let mut io = util::submit(md, IoType::Write, off, bytes / mdbs, Some(b), false).await;
        if !io.status.is_success() {
            return Err(io_err("metadata bitmap write", io.status));
        }
        buf = io.buf.take();
        first += n;
    }
    util::simple(md, IoType::Flush, 0, md.bdev().num_blocks())
        .await
        .map_err(|s| io_err("metadata flush", s))?;
    Ok(())
}

/// Format: a superblock saying "formatting" in both slots, every unit
/// (empty, bound to the uuid), then the real superblock in both slots. A
/// crash at any point leaves either a formatting superblock (formatted
/// again on the next create) or a complete format.
async fn format_metadata(
    md: &IoChannel,
    geo: &Geometry,
    uuid: Uuid,
    map: &RegionMap,
) -> Result<(), CloneError> {
    let mut sb = Superblock::new(uuid, geo);
    sb.flags = metadata::FLAG_FORMATTING;
    write_superblock(md, &sb, &[0, 1]).await?;
    write_all_units(md, &uuid, map).await?;
    let done = Superblock {
        flags: 0,
        ..sb.next()
    };
    write_superblock(md, &done, &[1, 0]).await
}

/// Carry out an open's [`Repair`].
async fn repair_metadata(
    md: &IoChannel,
    map: &RegionMap,
    repair: Repair,
    name: &str,
) -> Result<(), CloneError> {
    match repair {
        Repair::Upgrade { sb, slot } => {
            tracing::info!(clone = %name, "upgrading metadata from version 1 to {}", metadata::VERSION);
            write_all_units(md, &sb.uuid, map).await?;
            let new = Superblock {
                version: metadata::VERSION,
                ..sb.next()
            };
            // The slot not holding the version 1 copy first.
            write_superblock(md, &new, &[1 - slot, slot]).await
        }
        Repair::Heal { sb, slot } => {
            tracing::warn!(clone = %name, slot, "metadata superblock slot {slot} was stale or damaged: rewritten");
            write_superblock(md, &sb, &[slot]).await
        }
    }
}

/// Create a clone (reactor 0). On failure nothing is left: no claim, no
/// bdev, metadata untouched unless it was blank.
pub async fn create(opts: CreateOpts) -> Result<Arc<Bdev>, CloneError> {
    if opts.name.is_empty() {
        return Err(CloneError::Invalid("clone name must not be empty".into()));
    }
    if bdev::get(&opts.name).is_some() {
        return Err(CloneError::Exists(opts.name));
    }
    check_tunables(
        Some(opts.hydration_batch_size),
        Some(opts.hydration_mbytes_per_sec),
    )?;
    let region_size = opts.region_size_kb as u64 * 1024;
    if !opts.region_size_kb.is_power_of_two() || !(4..=1_048_576).contains(&opts.region_size_kb) {
        return Err(CloneError::Invalid(format!(
            "region_size_kb {} must be a power of two from 4 to 1048576",
            opts.region_size_kb
        )));
    }
    // The source may be missing only for a clone whose metadata says it
    // is fully hydrated (checked below).
    let source_present = bdev::get(&opts.source_bdev_name).is_some();
    for (what, n) in [
        ("destination", &opts.dest_bdev_name),
        ("metadata", &opts.metadata_bdev_name),
    ] {
        if bdev::get(n).is_none() {
            tracing::debug!(role = what, bdev = %n, "clone create: missing base bdev");
            return Err(CloneError::NoSuchBdev(n.clone()));
        }
    }
    let no_source = |why: String| CloneError::NoSource {
        name: opts.source_bdev_name.clone(),
        why,
    };
    if !source_present && opts.force_format {
        return Err(no_source("force_format needs the source".into()));
    }
    let names = [
        &opts.source_bdev_name,
        &opts.dest_bdev_name,
        &opts.metadata_bdev_name,
    ];
    if names[0] == names[1] || names[0] == names[2] || names[1] == names[2] {
        return Err(CloneError::Invalid(
            "source, destination and metadata must be three different bdevs".into(),
        ));
    }
    let src = if source_present {
        Some(open_claim(
            &opts.source_bdev_name,
            ClaimType::ReadManyWriteNone,
            "source",
        )?)
    } else {
        None
    };
    let (dst, dst_me) = open_claim(
        &opts.dest_bdev_name,
        ClaimType::ExclusiveWrite,
        "destination",
    )?;
    let (md, md_me) = open_claim(
        &opts.metadata_bdev_name,
        ClaimType::ExclusiveWrite,
        "metadata",
    )?;
    let (db, mb) = (dst.bdev().clone(), md.bdev().clone());
    let mdbs = mb.block_size();
    if mdbs == 0
        || !mdbs.is_power_of_two()
        || mdbs as u64 > FORMAT_BLOCK_SIZE
        || (mdbs as usize) < UNIT_SIZE
    {
        return Err(CloneError::Invalid(format!(
            "metadata bdev block size {mdbs} is not supported (512 to 4096, a power of two)"
        )));
    }
    let md_ch = md.channel();
    let state = read_superblock(&md_ch).await;
    // The source's size and block size, from the source or, without it,
    // from the superblock.
    let (src_blocks, src_bs, src_align) = match &src {
        Some((s, _)) => (
            s.bdev().num_blocks(),
            s.bdev().block_size(),
            s.bdev().required_alignment(),
        ),
        None => match &state {
            Ok(SuperState::Valid { sb, .. }) if sb.flags & metadata::FLAG_FORMATTING == 0 => {
                (sb.source_blocks, sb.block_size, 0)
            }
            Ok(_) => return Err(no_source("the metadata holds no clone".into())),
            Err(e) => return Err(no_source(format!("the metadata is unusable: {e}"))),
        },
    };
    let geo = Geometry::new(
        src_blocks,
        src_bs,
        db.num_blocks(),
        db.block_size(),
        region_size,
    )?;
    metadata::check_size(mb.size_bytes(), geo.num_regions())?;
    let map = Arc::new(RegionMap::new(geo.num_regions()));
    let opened = open_metadata(&md_ch, &geo, state, opts.uuid, opts.force_format, &map).await?;
    if src.is_none() && !map.is_complete() {
        return Err(no_source(format!(
            "the metadata shows {} of {} regions hydrated; only a fully hydrated clone runs without its source",
            map.hydrated_count(),
            geo.num_regions()
        )));
    }
    // Every check passed: from here on the metadata may be written.
    let (uuid, formatted) = match opened {
        Opened::Format(uuid) => {
            if opts.force_format {
                tracing::warn!(clone = %opts.name, %uuid, "force_format: formatting the metadata; every region reads from the source again");
            }
            format_metadata(&md_ch, &geo, uuid, &map).await?;
            (uuid, true)
        }
        Opened::Loaded { uuid, repair } => {
            if let Some(r) = repair {
                repair_metadata(&md_ch, &map, r, &opts.name).await?;
            }
            (uuid, false)
        }
    };
    drop(md_ch);
    let released = src.is_none();
    // The source's own name (not an alias); without it, the name given.
    let source_name = match &src {
        Some((d, _)) => d.bdev().name().to_string(),
        None => opts.source_bdev_name.clone(),
    };
    let (src, src_me) = match src {
        Some((d, me)) => (Some(d), Some(me)),
        None => (None, None),
    };
    let cfg = RouterConfig {
        hydration_threshold: opts.hydration_threshold as u64,
        hydration_batch_size: opts.hydration_batch_size.max(1) as u64,
        hydration_enabled: !opts.no_hydration,
        discard_passdown: !opts.no_discard_passdown,
        copy_on_read: opts.copy_on_read,
        metadata_units_per_block: metadata::units_per_block(mdbs),
    };
    let n = reactor::num_reactors().max(1);
    // The committer's reactor rotates over clones.
    let home = NEXT_OWNER.fetch_add(1, Ordering::Relaxed) % n;
    let owners: Vec<u32> = (0..n).collect();
    let stripe_regions = 64 * stripe_words(geo.region_size());
    let commits_in_flight = Arc::new(AtomicU64::new(0));
    let mut routers = Vec::with_capacity(owners.len());
    for i in 0..owners.len() {
        let mut r = Router::new(geo, map.clone(), cfg.clone(), MetadataMode::ReadWrite)
            .map_err(|e| CloneError::Invalid(e.to_string()))?;
        r.set_stripe(stripe_regions, i as u64, owners.len() as u64);
        r.set_external_commits(commits_in_flight.clone());
        routers.push(r);
    }
    let sh = Arc::new(Shared {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        name: opts.name.clone(),
        source_name,
        dest_name: db.name().to_string(),
        md_name: mb.name().to_string(),
        uuid,
        geo,
        map,
        home,
        hydrating: owners.iter().map(|_| AtomicU64::new(0)).collect(),
        owners: owners.clone(),
        stripe_regions,
        commits_in_flight,
        md_block_size: mdbs,
        md_num_blocks: mb.num_blocks(),
        dest_write_zeroes: db.io_type_supported(IoType::WriteZeroes),
        dest_unmap: db.io_type_supported(IoType::Unmap),
        discard_passdown: !opts.no_discard_passdown,
        hydration_enabled: AtomicBool::new(!opts.no_hydration),
        paused: AtomicU8::new(PAUSE_NONE),
        threshold: AtomicU32::new(opts.hydration_threshold),
        batch: AtomicU32::new(opts.hydration_batch_size.max(1)),
        mbytes_per_sec: AtomicU64::new(opts.hydration_mbytes_per_sec),
        copy_on_read: AtomicBool::new(opts.copy_on_read),
        mode: AtomicU8::new(MODE_RW),
        err_source: AtomicU64::new(0),
        err_dest: AtomicU64::new(0),
        err_md: AtomicU64::new(0),
        hydrated_bytes: AtomicU64::new(0),
        rate_bps: AtomicU64::new(0),
        released: AtomicBool::new(released),
        last_error: Mutex::new(None),
        descs: Mutex::new(Descs {
            source: src,
            dest: Some(dst),
            md: Some(md),
        }),
        kick: AtomicBool::new(false),
    });
    for (i, router) in routers.into_iter().enumerate() {
        let sh2 = sh.clone();
        let started = oneshot::run_on(
            owners[i],
            move || async move { start_owner(sh2, router, i) },
        )
        .await;
        if let Err(e) = started {
            stop_all(&sh).await;
            drop(std::mem::take(&mut *lock(&sh.descs)));
            return Err(e);
        }
    }
    let reg = BdevBuilder::new(opts.name.clone(), PRODUCT_NAME)
        .block_size(geo.block_size())
        .num_blocks(geo.source_blocks())
        .uuid(Some(uuid))
        .write_cache(true)
        .required_alignment(db.required_alignment().max(src_align))
        .optimal_io_boundary(0)
        .physical_block_size(db.physical_block_size())
        .register(CloneBdev(sh.clone()));
    let bdev = match reg {
        Ok(b) => b,
        Err(e) => {
            stop_all(&sh).await;
            drop(std::mem::take(&mut *lock(&sh.descs)));
            return Err(CloneError::from_bdev(e));
        }
    };
    for me in [src_me, Some(dst_me), Some(md_me)].into_iter().flatten() {
        let _ = me.set(Arc::downgrade(&bdev));
    }
    tracing::info!(
        clone = %opts.name,
        source = %sh.source_name,
        dest = %sh.dest_name,
        metadata = %sh.md_name,
        regions = geo.num_regions(),
        hydrated = sh.map.hydrated_count(),
        formatted,
        source_released = released,
        home,
        stripe_regions,
        "clone bdev created"
    );
    Ok(bdev)
}

/// Delete a clone (reactor 0): final commit, claims released.
pub async fn delete(name: &str) -> Result<(), CloneError> {
    bdev::unregister_by_name(name, MODULE_NAME)
        .await
        .map_err(|_| CloneError::NoSuchClone(name.to_string()))
}

/// The status object of clone `name`.
pub fn status(name: &str) -> Option<Value> {
    find(name).map(|s| s.status())
}

/// Status of every clone, in registration order.
pub fn status_all() -> Vec<Value> {
    bdev::list()
        .iter()
        .filter_map(clone_of)
        .map(|s| s.status())
        .collect()
}

/// `bdev_clone_set_hydration`.
pub fn set_hydration(o: &HydrationOpts) -> Result<(), CloneError> {
    if o.enable.is_none()
        && o.hydration_threshold.is_none()
        && o.hydration_batch_size.is_none()
        && o.hydration_mbytes_per_sec.is_none()
    {
        return Err(CloneError::NoOptions);
    }
    let sh = find(&o.name).ok_or_else(|| CloneError::NoSuchClone(o.name.clone()))?;
    check_tunables(o.hydration_batch_size, o.hydration_mbytes_per_sec)?;
    if let Some(t) = o.hydration_threshold {
        sh.threshold.store(t, Ordering::Relaxed);
    }
    if let Some(b) = o.hydration_batch_size {
        sh.batch.store(b, Ordering::Relaxed);
    }
    if let Some(m) = o.hydration_mbytes_per_sec {
        sh.mbytes_per_sec.store(m, Ordering::Relaxed);
    }
    if let Some(e) = o.enable {
        sh.hydration_enabled.store(e, Ordering::Relaxed);
        if e {
            // Enabling resumes hydration paused by errors at once.
            sh.paused.store(PAUSE_NONE, Ordering::Release);
            *lock(&sh.last_error) = None;
        }
    }
    sh.kick.store(true, Ordering::Release);
    let id = sh.id;
    for &r in &sh.owners {
        send_to(r, move || {
            if let Some(rc) = owner_of(id) {
                drive(&rc);
            }
        });
    }
    tracing::info!(clone = %o.name, ?o, "clone hydration settings changed");
    Ok(())
}

/// Test and tool access: the clone's shared map (to check hydration).
pub fn hydrated_regions(name: &str) -> Option<(u64, u64)> {
    find(name).map(|s| (s.map.hydrated_count(), s.geo.num_regions()))
}

/// Whether region `r` of clone `name` is hydrated (tests, tools).
pub fn region_hydrated(name: &str, r: u64) -> Option<bool> {
    find(name)
        .filter(|s| r < s.geo.num_regions())
        .map(|s| s.map.is_hydrated(r))
}
