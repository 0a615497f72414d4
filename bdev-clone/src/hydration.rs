//! Hydration on an owner: when to start background copies (enabled,
//! threshold, in-flight caps, token-bucket rate limit), executing a copy
//! (chunked source read, zero detection, destination write, reused
//! buffers), and what failures do (back-off, pause after a streak, probes
//! that resume by themselves); `bdev_clone_set_hydration`. Which regions
//! to copy is the router's decision (`router.rs`, `next_background`).

use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bdev::{util, IoChannel, IoType};
use reactor::sync::lock;
use reactor::DmaBuf;

use crate::channel::send_to;
use crate::clone::{find, Shared};
use crate::error::CloneError;
use crate::owner::{bytes, drive, owner_of, sync_mode, then_drive, Owner};
use crate::router::CopyId;
use crate::router::MetadataMode;
use crate::rpc::{check_tunables, HydrationOpts};

/// Largest single I/O of a hydration copy or a metadata load.
pub(crate) const CHUNK_BYTES: u64 = 1 << 20;

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
/// scan and update of one copy.
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

/// Copy `blocks` from the source to the destination in chunks through
/// `buf`; an all-zero chunk becomes write_zeroes when the destination has
/// it. A source that reports block status (an NBD export, a sparse file)
/// is asked first: what reads as zeroes is zeroed on the destination
/// without being read. Gives the buffer back for reuse.
pub(crate) async fn copy_blocks(
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
                        // Never past the copy, whatever the source answers.
                        end = (end + e.num_blocks).min(blocks.end);
                        extents.push_back((end, e.zero));
                    }
                    if end == at {
                        // An answer that covers nothing: read the rest.
                        extents.clear();
                        ask = false;
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
        let cfg = router.config_mut();
        cfg.hydration_enabled = enabled;
        cfg.hydration_threshold = sh.threshold.load(Ordering::Relaxed) as u64;
        cfg.hydration_batch_size = sh.batch.load(Ordering::Relaxed).max(1) as u64;
        cfg.copy_on_read = sh.copy_on_read.load(Ordering::Relaxed);
        // Copy-on-read copies the regions read even with hydration off.
        if !(enabled || running && cfg.copy_on_read) || sh.map.is_complete() {
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

    pub(crate) fn copy_failed(&mut self, fault: CopyFault, what: String, probe: bool) {
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

/// Execute a `StartCopy`: a buffer from the reuse list, the copy as a
/// task, its outcome to the back-off and the router.
pub(crate) fn start_copy(rc: &Rc<RefCell<Owner>>, o: &mut Owner, copy: CopyId, blocks: Range<u64>) {
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
        then_drive(&weak, move |o| {
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
        });
    });
}
