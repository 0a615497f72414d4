//! Hydration on an owner: when to start background copies (enabled, the
//! adaptive window of [`crate::pacer`], the caps, token-bucket rate limit),
//! executing a copy (source reads in small chunks, several in flight per
//! copy, each admitted by the window after the user's cold reads; zero
//! detection; destination writes within a per-reactor budget per loop
//! iteration; reused buffers), and what failures do (back-off, pause after
//! a streak, probes that resume by themselves); `bdev_clone_set_hydration`.
//! Which regions to copy is the router's decision (`router.rs`,
//! `next_background`).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bdev::{util, IoChannel, IoType};
use reactor::sync::lock;
use reactor::DmaBuf;

use crate::channel::send_to;
use crate::clone::{find, PaceStats, Shared};
use crate::error::CloneError;
use crate::owner::{bytes, drive, owner_of, sync_mode, then_drive, Owner};
use crate::pacer::{Pacer, Sent, TokenBucket};
use crate::router::CopyId;
use crate::router::MetadataMode;
use crate::rpc::{check_tunables, HydrationOpts};

/// Largest single I/O of a metadata load, and of zeroing by writes.
pub(crate) const CHUNK_BYTES: u64 = 1 << 20;

/// Source read of a hydration copy: a cold user read waits behind at most
/// one of these on the link, and a user I/O on the reactor behind at most
/// one chunk's zero check and destination write (the iteration budget).
pub const COPY_CHUNK: u64 = 128 << 10;

/// Bytes a background copy covers when `hydration_batch_size` allows
/// (whole regions; one region when regions are larger): few enough that a
/// partial write waiting for its region's copy waits little.
pub const COPY_TARGET: u64 = 256 << 10;

/// Largest background copy the window asks for (where it is large).
pub(crate) const MAX_COPY_TARGET: u64 = 1 << 20;

/// Chunks of one copy in flight at once (a copy of a large region).
pub(crate) const MAX_LANES: u64 = 16;

/// Hydration's destination work (zero check and write) per reactor loop
/// iteration, over all clones of the reactor, while user I/O to a clone ran
/// on the reactor in the last [`USER_IO_RECENT_NS`]: a user I/O waits
/// behind at most this much of it. One chunk always passes; with no user
/// I/O, no limit (hydration of a local source runs at memory speed).
pub(crate) const ITERATION_BUDGET: u64 = COPY_CHUNK;

pub(crate) const USER_IO_RECENT_NS: u64 = 10_000_000;

/// Chunk buffers kept for reuse per owner.
const MAX_SPARE_BUFS: usize = 128;

/// `hydration_threshold` when not given: no cap beyond the owner's own
/// (the window decides).
pub const DEFAULT_THRESHOLD: u32 = u32::MAX;

/// Hydration back-off after a failed copy: first and longest wait.
pub(crate) const BACKOFF_MIN_NS: u64 = 10_000_000;

pub(crate) const BACKOFF_MAX_NS: u64 = 1_000_000_000;

/// Consecutive failed copies after which hydration pauses.
pub(crate) const MAX_FAIL_STREAK: u32 = 8;

/// While paused by errors, one probe copy after this long, doubling up to
/// the maximum; a probe that succeeds resumes hydration.
pub(crate) const PROBE_MIN_NS: u64 = 1_000_000_000;

pub(crate) const PROBE_MAX_NS: u64 = 30_000_000_000;

/// Whatever `hydration_threshold` says, an owner keeps at most this many
/// background copies in flight, with at most this many bytes of copy
/// buffers, and starts at most this many per pass: memory and the work of
/// one reactor iteration stay bounded for any accepted value.
pub(crate) const MAX_COPIES_IN_FLIGHT: u64 = 256;

pub(crate) const MAX_COPY_BUF_BYTES: u64 = 64 << 20;

pub(crate) const MAX_COPY_STARTS_PER_PASS: u64 = 32;

/// Largest `hydration_batch_size` (regions per copy): bounds the bitmap
/// scan and update of one copy. Also its default: no cap beyond
/// [`COPY_TARGET`].
pub const MAX_BATCH_SIZE: u32 = 65_536;

/// Largest `hydration_mbytes_per_sec` (1 TiB/s; 0 = unlimited).
pub const MAX_MBYTES_PER_SEC: u64 = 1 << 20;

/// Hydration poller period (rate-limit refill, back-off expiry).
pub(crate) const HYDRATION_POLL: Duration = Duration::from_millis(2);

pub(crate) const PAUSE_NONE: u8 = 0;

pub(crate) const PAUSE_SOURCE: u8 = 1;

pub(crate) const PAUSE_DEST: u8 = 2;

/// Which base a failed copy failed on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum CopyFault {
    Source,
    Dest,
}

/// Zero `blocks` on the destination: write_zeroes when it has it, else
/// writes of a zeroed buffer.
pub(crate) async fn write_zeroes(dst: &IoChannel, sh: &Shared, blocks: Range<u64>) -> bool {
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

pub(crate) fn is_zero(b: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to splits off the
    // unaligned head and tail as bytes.
    let (head, mid, tail) = unsafe { b.align_to::<u64>() };
    head.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// Hydration's state on one owner, shared with its copy tasks (never
/// borrowed across an await).
pub(crate) struct Hyd {
    pub(crate) pacer: Pacer,
    pub(crate) bucket: TokenBucket,
    /// Bytes of started copies not yet read from the source (nor found to
    /// be zeroes).
    pub(crate) pending: u64,
    /// Copies in flight.
    pub(crate) copies: u64,
    /// Bytes of chunk buffers in use.
    pub(crate) buf_bytes: u64,
    /// Largest hydration in flight on the source seen, bytes.
    pub(crate) peak_in_flight: u64,
    waiters: VecDeque<Waker>,
    bufs: Vec<DmaBuf>,
}

pub(crate) type HydRc = Rc<RefCell<Hyd>>;

impl Hyd {
    pub(crate) fn new(now: u64) -> HydRc {
        Rc::new(RefCell::new(Hyd {
            pacer: Pacer::new(COPY_CHUNK, MAX_COPY_BUF_BYTES, now),
            bucket: TokenBucket::default(),
            pending: 0,
            copies: 0,
            buf_bytes: 0,
            peak_in_flight: 0,
            waiters: VecDeque::new(),
            bufs: Vec::new(),
        }))
    }

    /// The window has room: every waiting chunk tries again (few wait:
    /// copies start only as the window needs them).
    pub(crate) fn wake(&mut self) {
        if self.pacer.room() > 0 {
            for w in self.waiters.drain(..) {
                w.wake();
            }
        }
    }

    /// A read of the source finished (hydration's or the user's).
    pub(crate) fn read_done(&mut self, s: Sent, ok: bool) {
        if ok {
            self.pacer.on_done(reactor::tick_ns(), s);
        } else {
            self.pacer.on_failed(s);
        }
        self.wake();
    }

    /// Whether the window has room for a chunk and no started copy has
    /// one to read: the link would idle until the next copy starts.
    fn starved(&self) -> bool {
        self.pending < COPY_CHUNK && self.pacer.room() >= COPY_CHUNK
    }

    /// A user's cold read of `bytes` goes to the source now: it is never
    /// held back, but the window counts it.
    pub(crate) fn user_read(&mut self, bytes: u64) -> Sent {
        self.pacer.on_send(reactor::tick_ns(), bytes, true)
    }

    pub(crate) fn publish(&self, st: &PaceStats) {
        let p = &self.pacer;
        st.window.store(p.window(), Ordering::Relaxed);
        st.in_flight.store(p.hyd_in_flight(), Ordering::Relaxed);
        st.user_in_flight
            .store(p.user_in_flight(), Ordering::Relaxed);
        st.peak_in_flight
            .store(self.peak_in_flight, Ordering::Relaxed);
        st.min_latency_ns
            .store(p.min_rtt().unwrap_or(0), Ordering::Relaxed);
        st.rate_bps.store(p.bw(), Ordering::Relaxed);
    }

    pub(crate) fn clear_bufs(&mut self) {
        self.bufs.clear();
    }

    fn take_buf(&mut self, len: usize) -> DmaBuf {
        self.buf_bytes += COPY_CHUNK;
        match self.bufs.pop() {
            Some(mut b) if b.capacity() >= len => {
                b.set_len(len);
                b
            }
            _ => {
                let mut b = DmaBuf::new(COPY_CHUNK as usize);
                b.set_len(len);
                b
            }
        }
    }

    /// A buffer of `len` bytes for a read-triggered copy (any size up to
    /// a region run), counted in the buffer cap until [`Hyd::put_sized`].
    pub(crate) fn take_sized(&mut self, len: usize) -> DmaBuf {
        self.buf_bytes += len as u64;
        match self.bufs.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = self.bufs.swap_remove(i);
                b.set_len(len);
                b
            }
            None => DmaBuf::new(len),
        }
    }

    pub(crate) fn put_sized(&mut self, len: usize, b: Option<DmaBuf>) {
        self.buf_bytes = self.buf_bytes.saturating_sub(len as u64);
        self.wake();
        if let Some(b) = b {
            if self.bufs.len() < MAX_SPARE_BUFS {
                self.bufs.push(b);
            }
        }
    }

    fn put_buf(&mut self, b: Option<DmaBuf>) {
        self.buf_bytes = self.buf_bytes.saturating_sub(COPY_CHUNK);
        // A chunk waiting for the buffer cap may go now.
        self.wake();
        if let Some(b) = b.filter(|b| b.capacity() >= COPY_CHUNK as usize) {
            if self.bufs.len() < MAX_SPARE_BUFS {
                self.bufs.push(b);
            }
        }
    }
}

/// Waits until the window has room for a chunk of `bytes` (and the buffer
/// cap allows it), then records its send.
struct Admit<'a> {
    hyd: &'a HydRc,
    bytes: u64,
}

impl Future for Admit<'_> {
    type Output = Sent;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Sent> {
        let mut h = self.hyd.borrow_mut();
        let fits = h.pacer.room() >= self.bytes.min(COPY_CHUNK)
            && h.buf_bytes + COPY_CHUNK <= MAX_COPY_BUF_BYTES;
        if fits || (h.pacer.hyd_in_flight() == 0 && h.buf_bytes == 0) {
            h.pending = h.pending.saturating_sub(self.bytes);
            let s = h.pacer.on_send(reactor::tick_ns(), self.bytes, false);
            h.peak_in_flight = h.peak_in_flight.max(h.pacer.hyd_in_flight());
            return Poll::Ready(s);
        }
        h.waiters.push_back(cx.waker().clone());
        Poll::Pending
    }
}

/// This reactor's hydration work in its current loop iteration, and the
/// chunks waiting for a later one, served in order by tickets (a waiting
/// future may be polled again by its task for other reasons: it keeps its
/// place, and a future dropped while waiting gives it up).
#[derive(Default)]
struct Iteration {
    tick: u64,
    used: u64,
    /// The ticket served next, and the next one given out.
    head: u64,
    tail: u64,
    /// Wakers of tickets `head..tail`; `None` once given up.
    slots: VecDeque<Option<Waker>>,
    scheduled: bool,
}

thread_local! {
    static ITERATION: RefCell<Iteration> = RefCell::new(Iteration::default());
    /// When this reactor last received user I/O for a clone.
    static USER_IO: Cell<u64> = const { Cell::new(0) };
}

/// A user I/O to a clone arrived on this reactor (the fast path: one
/// thread-local store).
#[inline]
pub(crate) fn note_user_io() {
    USER_IO.with(|c| c.set(reactor::tick_ns()));
}

impl Iteration {
    fn fits(&mut self, bytes: u64) -> bool {
        let tick = reactor::tick_ns();
        if self.tick != tick {
            self.tick = tick;
            self.used = 0;
        }
        let user = USER_IO.with(|c| c.get());
        self.used == 0
            || self.used + bytes <= ITERATION_BUDGET
            || tick.saturating_sub(user) > USER_IO_RECENT_NS
    }

    /// Drop given-up tickets at the head; wake the head at the next
    /// iteration.
    fn schedule(&mut self) {
        while self.slots.front().is_some_and(|s| s.is_none()) {
            self.slots.pop_front();
            self.head += 1;
        }
        if !self.slots.is_empty() && !self.scheduled {
            self.scheduled = true;
            reactor::defer(|| {
                let w = ITERATION.with(|it| {
                    let mut it = it.borrow_mut();
                    it.scheduled = false;
                    it.slots.front().cloned().flatten()
                });
                if let Some(w) = w {
                    w.wake();
                }
            });
        }
    }
}

/// Take `bytes` of this reactor's [`ITERATION_BUDGET`]; when the iteration
/// has spent it, wait for a later one (whichever clone's copy asks).
struct Budget {
    bytes: u64,
    ticket: Option<u64>,
    done: bool,
}

impl Future for Budget {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let bytes = self.bytes;
        let ticket = self.ticket;
        let (granted, ticket) = ITERATION.with(|it| {
            let mut it = it.borrow_mut();
            match ticket {
                None if it.slots.is_empty() && it.fits(bytes) => {
                    it.used += bytes;
                    (true, None)
                }
                None => {
                    let t = it.tail;
                    it.tail += 1;
                    it.slots.push_back(Some(cx.waker().clone()));
                    it.schedule();
                    (false, Some(t))
                }
                Some(t) if t == it.head && it.fits(bytes) => {
                    it.used += bytes;
                    it.slots.pop_front();
                    it.head += 1;
                    it.schedule();
                    (true, None)
                }
                Some(t) => {
                    let i = (t - it.head) as usize;
                    it.slots[i] = Some(cx.waker().clone());
                    it.schedule();
                    (false, Some(t))
                }
            }
        });
        self.ticket = ticket;
        self.done = granted;
        if granted {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        if let (Some(t), false) = (self.ticket, self.done) {
            // Off the reactor's thread-local at teardown, nothing to do.
            let _ = ITERATION.try_with(|it| {
                let mut it = it.borrow_mut();
                if let Some(s) = t
                    .checked_sub(it.head)
                    .and_then(|i| it.slots.get_mut(i as usize))
                {
                    *s = None;
                }
                it.schedule();
            });
        }
    }
}

fn iteration_budget(bytes: u64) -> Budget {
    Budget {
        bytes,
        ticket: None,
        done: false,
    }
}

/// The source's extents over `blocks` as (range, reads as zeroes), from
/// its block status when it reports one (an NBD export, a sparse file);
/// else one data extent.
async fn extents(src: &IoChannel, blocks: Range<u64>) -> Vec<(Range<u64>, bool)> {
    let mut out: Vec<(Range<u64>, bool)> = Vec::new();
    let mut at = blocks.start;
    if src.bdev().has_block_status() {
        while at < blocks.end {
            let Ok(v) = util::block_status(src, at, blocks.end - at).await else {
                break;
            };
            let start = at;
            for e in v {
                // Never past the copy, whatever the source answers.
                let end = (at + e.num_blocks).min(blocks.end);
                if end > at {
                    match out.last_mut() {
                        Some((r, z)) if *z == e.zero && r.end == at => r.end = end,
                        _ => out.push((at..end, e.zero)),
                    }
                }
                at = end;
            }
            if at == start {
                // An answer that covers nothing: read the rest.
                break;
            }
        }
    }
    if at < blocks.end {
        out.push((at..blocks.end, false));
    }
    out
}

type CopyResult = Result<(), (CopyFault, String)>;

fn fault(sh: &Shared, f: CopyFault, what: &str, at: u64) -> CopyResult {
    match f {
        CopyFault::Source => sh.err_source.fetch_add(1, Ordering::Relaxed),
        CopyFault::Dest => sh.err_dest.fetch_add(1, Ordering::Relaxed),
    };
    Err((f, format!("{what} at block {at} failed")))
}

/// Copy `blocks` from the source to the destination. What the source's
/// block status reports as zeroes is zeroed on the destination without
/// being read; the rest is read in [`COPY_CHUNK`]s, up to [`MAX_LANES`] at
/// once, each admitted by the owner's window ([`Hyd`]); an all-zero chunk
/// becomes write_zeroes when the destination has it. `pending` is what the
/// copy counted in [`Hyd::pending`]; what it did not read is taken off.
pub(crate) async fn copy_blocks(
    src: &IoChannel,
    dst: &IoChannel,
    sh: &Shared,
    hyd: &HydRc,
    owner: &Weak<RefCell<Owner>>,
    blocks: Range<u64>,
) -> CopyResult {
    let bs = sh.geo.block_size() as u64;
    let chunk = (COPY_CHUNK / bs).max(1);
    let pending = (blocks.end - blocks.start) * bs;
    let read = Cell::new(0u64);
    let mut res = Ok(());
    for (r, zero) in extents(src, blocks).await {
        if zero {
            if !write_zeroes(dst, sh, r.clone()).await {
                res = fault(sh, CopyFault::Dest, "destination write_zeroes", r.start);
                break;
            }
            continue;
        }
        let next = Cell::new(r.start);
        let failed = Cell::new(false);
        let lanes = (r.end - r.start).div_ceil(chunk).min(MAX_LANES);
        let lane = || async {
            loop {
                let at = next.get();
                if at >= r.end || failed.get() {
                    return Ok(());
                }
                let n = chunk.min(r.end - at);
                next.set(at + n);
                let len = n * bs;
                let sent = Admit { hyd, bytes: len }.await;
                read.set(read.get() + len);
                let buf = hyd.borrow_mut().take_buf(len as usize);
                let mut io = util::submit(src, IoType::Read, at, n, Some(buf), false).await;
                let ok = io.status.is_success();
                let starved = {
                    let mut h = hyd.borrow_mut();
                    h.read_done(sent, ok);
                    h.starved()
                };
                if starved {
                    // The window has room the copies started cannot
                    // fill: start more now, not at the next poll, so the
                    // link does not idle.
                    if let Some(rc) = owner.upgrade() {
                        drive(&rc);
                    }
                }
                let mut buf = io.buf.take();
                if !ok {
                    failed.set(true);
                    hyd.borrow_mut().put_buf(buf);
                    return fault(sh, CopyFault::Source, "source read", at);
                }
                iteration_budget(len).await;
                let zero = sh.dest_write_zeroes
                    && buf
                        .as_ref()
                        .is_some_and(|b| is_zero(&b.as_slice()[..len as usize]));
                let mut io = if zero {
                    util::submit(dst, IoType::WriteZeroes, at, n, None, false).await
                } else {
                    util::submit(dst, IoType::Write, at, n, buf.take(), false).await
                };
                if !zero {
                    buf = io.buf.take();
                }
                hyd.borrow_mut().put_buf(buf);
                if !io.status.is_success() {
                    failed.set(true);
                    return fault(sh, CopyFault::Dest, "destination write", at);
                }
            }
        };
        let results = futures::future::join_all((0..lanes).map(|_| lane())).await;
        if let Some(e) = results.into_iter().find(|r| r.is_err()) {
            res = e;
            break;
        }
    }
    let mut h = hyd.borrow_mut();
    h.pending = h.pending.saturating_sub(pending.saturating_sub(read.get()));
    h.wake();
    res
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

impl Owner {
    /// Start background copies if hydration may run now: at most
    /// `MAX_COPY_STARTS_PER_PASS`, within the in-flight caps; while paused
    /// by errors, one probe copy when its back-off has expired.
    pub(crate) fn pump(&mut self) {
        self.set_read_copy_budget();
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
        let running = sh.mode() == MetadataMode::ReadWrite && !self.stopping && !self.quiesced;
        let enabled = sh.hydration_enabled.load(Ordering::Relaxed) && running;
        let region = sh.geo.region_size();
        let threshold = sh.threshold.load(Ordering::Relaxed) as u64;
        let mut h = self.hyd.borrow_mut();
        // The threshold caps the window too (regions' bytes in flight).
        h.pacer
            .set_cap(threshold.saturating_mul(region).min(MAX_COPY_BUF_BYTES));
        h.wake();
        // Regions per copy: an eighth of the window (fewer, larger copies
        // where the window is large: a fast local source), from COPY_TARGET
        // to MAX_COPY_TARGET; the batch size caps it.
        let target = (h.pacer.window() / 8).clamp(COPY_TARGET, MAX_COPY_TARGET);
        let per_copy =
            (sh.batch.load(Ordering::Relaxed).max(1) as u64).min((target / region).max(1));
        let copy_bytes = per_copy * region;
        let cfg = router.config_mut();
        cfg.hydration_enabled = enabled;
        cfg.hydration_threshold = threshold;
        cfg.hydration_batch_size = per_copy;
        cfg.copy_on_read = sh.copy_on_read.load(Ordering::Relaxed);
        // Copy-on-read copies the regions read even with hydration off.
        if !(enabled || running && cfg.copy_on_read) || sh.map.is_complete() {
            return;
        }
        let now = reactor::now_ns();
        if now < self.backoff_until {
            return;
        }
        // Copies enough to fill the window's room with one copy to spare,
        // so the next chunk is ready when one completes.
        let want = (h.pacer.room() + copy_bytes).saturating_sub(h.pending);
        let mut room = (want / copy_bytes)
            .min(MAX_COPIES_IN_FLIGHT.saturating_sub(h.copies))
            .min(MAX_COPY_STARTS_PER_PASS);
        if paused {
            if self.probe_pending || h.copies > 0 {
                return;
            }
            room = room.min(1);
        }
        if room == 0 {
            return;
        }
        let limit = sh.mbytes_per_sec.load(Ordering::Relaxed);
        // Each owner gets an equal share of the clone's limit.
        let bps = limit as f64 * 1048576.0 / sh.owners.len() as f64;
        if !h.bucket.refill(now, bps, copy_bytes as f64) {
            return;
        }
        drop(h);
        let started = router.next_background_max(&mut self.out, room);
        self.hyd
            .borrow_mut()
            .bucket
            .take(started as f64 * region as f64);
        if paused && started > 0 {
            self.probe_pending = true;
            // The next probe waits for this one's outcome and back-off.
            self.backoff_until = now + self.probe_wait;
        }
    }

    /// How many read-triggered copies of a whole region the source's link
    /// has room for now: the window's room after the user's reads and
    /// hydration's chunks, in regions (for the router's read-copy budget).
    pub(crate) fn read_copy_room(&self) -> u64 {
        self.hyd.borrow().pacer.room() / self.sh.geo.region_size().max(1)
    }

    pub(crate) fn on_timer(&mut self) {
        let now = reactor::now_ns();
        let bytes = self.sh.hydrated_bytes.load(Ordering::Relaxed);
        let (t0, b0) = self.rate_mark;
        if now > t0 {
            let rate = (bytes - b0) as f64 * 1e9 / (now - t0) as f64;
            self.sh.rate_bps.store(rate as u64, Ordering::Relaxed);
        }
        self.rate_mark = (now, bytes);
    }

    /// A copy started at `started` failed. Copies that were already in
    /// flight when the last failure was counted fail together (a source
    /// that went away fails every copy at once): they count as one in the
    /// streak, so pausing still takes `MAX_FAIL_STREAK` back-offs however
    /// many copies the window keeps in flight.
    pub(crate) fn copy_failed(
        &mut self,
        fault: CopyFault,
        what: String,
        probe: bool,
        started: u64,
    ) {
        let now = reactor::now_ns();
        let same_burst = started < self.last_fail && !probe;
        let reason = match fault {
            CopyFault::Source => PAUSE_SOURCE,
            CopyFault::Dest => PAUSE_DEST,
        };
        tracing::warn!(clone = %self.sh.name, streak = self.fail_streak, same_burst, "hydration copy failed: {what}");
        self.sh.set_last_error(what);
        if same_burst {
            return;
        }
        self.last_fail = now;
        self.fail_streak = self.fail_streak.saturating_add(1);
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
    pub(crate) fn copy_succeeded(&mut self) {
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
}

/// Execute a `StartCopy`: the copy as a task (its chunks wait for the
/// window), its outcome to the back-off and the router.
pub(crate) fn start_copy(rc: &Rc<RefCell<Owner>>, o: &mut Owner, copy: CopyId, blocks: Range<u64>) {
    let probe = std::mem::take(&mut o.probe_pending);
    let Some(src) = o.src.clone() else {
        return o.copy_done(copy, false);
    };
    let started = reactor::now_ns();
    {
        let mut h = o.hyd.borrow_mut();
        h.copies += 1;
        h.pending += bytes(&blocks, o.sh.geo.block_size()) as u64;
    }
    let (dst, sh, hyd, weak) = (
        o.dst.clone(),
        o.sh.clone(),
        o.hyd.clone(),
        Rc::downgrade(rc),
    );
    reactor::spawn_local(async move {
        let res = copy_blocks(&src, &dst, &sh, &hyd, &weak, blocks.clone()).await;
        hyd.borrow_mut().copies -= 1;
        then_drive(&weak, move |o| match res {
            Ok(()) => {
                o.copy_succeeded();
                let n = bytes(&blocks, sh.geo.block_size()) as u64;
                sh.hydrated_bytes.fetch_add(n, Ordering::Relaxed);
                o.copy_done(copy, true);
            }
            Err((fault, e)) => {
                o.copy_failed(fault, e, probe, started);
                o.copy_done(copy, false);
            }
        });
    });
}
