//! One bdevperf job: a bdev, a reactor, `queue_depth` slots kept busy
//! until the time is up (SPDK's `bdevperf_job` and `bdevperf_task`).
//!
//! Everything here runs on the job's reactor. Per-slot state is built once;
//! per I/O the job only picks an offset, stamps the clock and submits, and
//! the completion callback (an `Rc` to the job plus the slot index) records
//! the latency and resubmits the same slot. Buffers are preallocated and
//! travel with the I/O: a slot's buffer is in its `Cell` exactly when no I/O
//! of that slot is in flight.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bdev::{BdevIo, Desc, IoChannel, IoType};
use reactor::{DmaBuf, TimerId};

use crate::histogram::Histogram;
use crate::pattern;

/// Miscompares and I/O errors printed per job; the rest are only counted.
const MAX_LOGGED_ERRORS: u32 = 8;

/// What the slots of a job submit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Reads and writes; `read_pct` of them reads (100: read, 0: write).
    Mixed {
        read_pct: u8,
    },
    /// Write a pattern, read it back, compare.
    Verify,
    Flush,
    Unmap,
    WriteZeroes,
}

impl Mode {
    /// Whether the job never modifies the bdev (it may open read-only).
    pub fn read_only(self) -> bool {
        self == Mode::Mixed { read_pct: 100 }
    }

    pub fn io_type(self) -> Option<IoType> {
        match self {
            Mode::Mixed { .. } | Mode::Verify => None,
            Mode::Flush => Some(IoType::Flush),
            Mode::Unmap => Some(IoType::Unmap),
            Mode::WriteZeroes => Some(IoType::WriteZeroes),
        }
    }

    fn needs_buffer(self) -> bool {
        matches!(self, Mode::Mixed { .. } | Mode::Verify)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct JobParams {
    pub mode: Mode,
    pub random: bool,
    pub queue_depth: u32,
    pub block_size: u32,
    /// I/O size in blocks.
    pub io_blocks: u64,
    /// First I/O unit of the job's range (in I/O-size units).
    pub ios_base: u64,
    /// Length of the job's range in I/O-size units (> 0).
    pub size_in_ios: u64,
    pub duration_ns: u64,
    pub continue_on_failure: bool,
    pub seed: u64,
    /// Keep a latency histogram (`-l`).
    pub track_latency: bool,
    /// The bdev keeps what is written (false: null): verify then checks
    /// that every write and read-back completes, and cannot compare data.
    pub compare_data: bool,
}

/// What a job reports when it has drained.
pub struct JobResult {
    pub runtime_ns: u64,
    pub completed: u64,
    pub failed: u64,
    pub miscompares: u64,
    pub lat_sum_ns: u64,
    pub lat_min_ns: u64,
    pub lat_max_ns: u64,
    /// With `-l`: every completed I/O's latency.
    pub histogram: Option<Histogram>,
    /// Stopped early because of a failure (SPDK: "ended ... with error").
    pub ended_with_error: bool,
    /// Handed back for the caller to close (on the app reactor).
    pub desc: Option<Desc>,
}

pub type DoneFn = Box<dyn FnOnce(JobResult) + Send>;

struct Slot {
    /// Data buffer: read target, write source, verify pattern.
    buf: Cell<Option<DmaBuf>>,
    /// Verify only: where the pattern is read back to.
    vbuf: Cell<Option<DmaBuf>>,
    offset_blocks: Cell<u64>,
    submit_ns: Cell<u64>,
    /// Verify only: next I/O unit of this slot's stripe.
    cursor: Cell<u64>,
    /// Verify only: generation of the pattern in flight.
    gen: Cell<u64>,
}

struct Job {
    name: String,
    p: JobParams,
    ch: IoChannel,
    slots: Box<[Slot]>,
    rng: Cell<u64>,
    seq: Cell<u64>,
    gen: Cell<u64>,
    inflight: Cell<u32>,
    draining: Cell<bool>,
    finished: Cell<bool>,
    start_ns: Cell<u64>,
    end_ns: Cell<u64>,
    /// Set by the descriptor's hot-remove callback (any thread).
    removed: Arc<AtomicBool>,
    completed: Cell<u64>,
    failed: Cell<u64>,
    miscompares: Cell<u64>,
    lat_sum: Cell<u64>,
    lat_min: Cell<u64>,
    lat_max: Cell<u64>,
    hist: RefCell<Option<Histogram>>,
    logged: Cell<u32>,
    ended_with_error: Cell<bool>,
    timer: Cell<Option<TimerId>>,
    desc: Cell<Option<Desc>>,
    done: Cell<Option<DoneFn>>,
}

/// Build the job on the calling reactor and start its I/O. `done` is called
/// once, on this reactor, after the job has drained and dropped its channel.
pub fn start(name: String, desc: Desc, p: JobParams, removed: Arc<AtomicBool>, done: DoneFn) {
    let ch = desc.channel();
    let io_bytes = (p.io_blocks * u64::from(p.block_size)) as usize;
    let qd = p.queue_depth as usize;
    let verify = p.mode == Mode::Verify;
    let writes = matches!(p.mode, Mode::Mixed { read_pct } if read_pct < 100);
    let slots: Box<[Slot]> = (0..qd)
        .map(|k| {
            let buf = p.mode.needs_buffer().then(|| {
                let mut b = DmaBuf::new(io_bytes);
                if writes {
                    // Plain writes carry a recognisable pattern, set once.
                    pattern::fill(b.as_mut_slice(), 0, p.block_size as usize, p.seed);
                }
                b
            });
            Slot {
                buf: Cell::new(buf),
                vbuf: Cell::new(verify.then(|| DmaBuf::new(io_bytes))),
                offset_blocks: Cell::new(0),
                submit_ns: Cell::new(0),
                cursor: Cell::new(k as u64),
                gen: Cell::new(0),
            }
        })
        .collect();
    let job = Rc::new(Job {
        name,
        p,
        ch,
        slots,
        rng: Cell::new(p.seed | 1),
        seq: Cell::new(0),
        gen: Cell::new(pattern::mix64(p.seed)),
        inflight: Cell::new(0),
        draining: Cell::new(false),
        finished: Cell::new(false),
        start_ns: Cell::new(0),
        end_ns: Cell::new(0),
        removed,
        completed: Cell::new(0),
        failed: Cell::new(0),
        miscompares: Cell::new(0),
        lat_sum: Cell::new(0),
        lat_min: Cell::new(u64::MAX),
        lat_max: Cell::new(0),
        hist: RefCell::new(p.track_latency.then(Histogram::default)),
        logged: Cell::new(0),
        ended_with_error: Cell::new(false),
        timer: Cell::new(None),
        desc: Cell::new(Some(desc)),
        done: Cell::new(Some(done)),
    });

    let now = reactor::now_ns();
    job.start_ns.set(now);
    job.end_ns.set(now.saturating_add(p.duration_ns));
    // The completion path checks the clock too; the timer covers a job
    // whose I/O stops completing for a while.
    let weak: Weak<Job> = Rc::downgrade(&job);
    let id = reactor::set_timer(Duration::from_nanos(p.duration_ns), move || {
        if let Some(job) = weak.upgrade() {
            job.timer.set(None);
            job.draining.set(true);
            if job.inflight.get() == 0 {
                job.finish(reactor::now_ns());
            }
        }
    });
    job.timer.set(Some(id));

    for k in 0..qd {
        if !submit(&job, k, job.clock()) {
            job.internal_error(k);
            break;
        }
    }
    if job.inflight.get() == 0 {
        job.finish(reactor::now_ns());
    }
}

impl Job {
    /// Next I/O unit (relative to `ios_base`) for slot `k`.
    #[inline]
    fn next_ios(&self, k: usize) -> u64 {
        let p = &self.p;
        if p.mode == Mode::Verify {
            // Slot k owns units k, k+qd, k+2qd, ...: in-flight verify I/Os
            // never overlap (SPDK uses a bitmap of outstanding offsets).
            let s = &self.slots[k];
            let cur = s.cursor.get();
            s.cursor
                .set(stripe_next(cur, k as u64, p.queue_depth, p.size_in_ios));
            cur
        } else if p.random {
            pattern::below(pattern::xorshift64(&self.rng), p.size_in_ios)
        } else {
            let cur = self.seq.get();
            let next = cur + 1;
            self.seq.set(if next >= p.size_in_ios { 0 } else { next });
            cur
        }
    }

    #[inline]
    fn pick_type(&self) -> IoType {
        match self.p.mode {
            Mode::Mixed { read_pct: 100 } => IoType::Read,
            Mode::Mixed { read_pct: 0 } | Mode::Verify => IoType::Write,
            Mode::Mixed { read_pct } => {
                if pattern::xorshift64(&self.rng) % 100 < u64::from(read_pct) {
                    IoType::Read
                } else {
                    IoType::Write
                }
            }
            Mode::Flush => IoType::Flush,
            Mode::Unmap => IoType::Unmap,
            Mode::WriteZeroes => IoType::WriteZeroes,
        }
    }

    /// The time for latencies: with `-l` the exact clock (percentiles need
    /// it); otherwise the reactor's per-iteration clock, which costs no
    /// clock read per I/O (the average latency stays right: submissions
    /// and completions are stamped alike, one iteration late at most).
    #[inline]
    fn clock(&self) -> u64 {
        if self.p.track_latency {
            reactor::now_ns()
        } else {
            reactor::tick_ns()
        }
    }

    #[inline]
    fn record(&self, lat: u64) {
        self.lat_sum.set(self.lat_sum.get().wrapping_add(lat));
        if lat < self.lat_min.get() {
            self.lat_min.set(lat);
        }
        if lat > self.lat_max.get() {
            self.lat_max.set(lat);
        }
        if let Some(h) = self.hist.borrow_mut().as_mut() {
            h.record(lat);
        }
    }

    fn log_error(&self, msg: std::fmt::Arguments<'_>) {
        let n = self.logged.get();
        if n < MAX_LOGGED_ERRORS {
            println!("{msg}");
        } else if n == MAX_LOGGED_ERRORS {
            println!("Job {}: further errors are counted, not printed", self.name);
        }
        self.logged.set(n + 1);
    }

    /// A slot lost its buffer: a bug in a lower layer, never outside input.
    fn internal_error(&self, k: usize) {
        self.log_error(format_args!(
            "Job {}: slot {k} has no buffer to submit (lost by the bdev layer); stopping the job",
            self.name
        ));
        self.failed.set(self.failed.get() + 1);
        self.ended_with_error.set(true);
        self.draining.set(true);
    }

    fn finish(&self, now: u64) {
        if self.finished.replace(true) {
            return;
        }
        if let Some(id) = self.timer.take() {
            reactor::cancel_timer(id);
        }
        let completed = self.completed.get();
        let failed = self.failed.get();
        let res = JobResult {
            runtime_ns: now.saturating_sub(self.start_ns.get()),
            completed,
            failed,
            miscompares: self.miscompares.get(),
            lat_sum_ns: self.lat_sum.get(),
            lat_min_ns: if completed + failed == 0 {
                0
            } else {
                self.lat_min.get()
            },
            lat_max_ns: self.lat_max.get(),
            histogram: self.hist.borrow_mut().take(),
            ended_with_error: self.ended_with_error.get(),
            desc: self.desc.take(),
        };
        if let Some(done) = self.done.take() {
            // Deferred: by then the job and its channel are gone (SPDK puts
            // the channel before the descriptor is closed).
            reactor::defer(move || done(res));
        }
    }
}

/// Next unit of slot `k`'s verify stripe after `cur` (wraps to `k`).
#[inline]
fn stripe_next(cur: u64, k: u64, qd: u32, size_in_ios: u64) -> u64 {
    let next = cur + u64::from(qd);
    if next >= size_in_ios {
        k
    } else {
        next
    }
}

/// Submit the next I/O of slot `k`, its latency counted from `stamp`.
/// False only when the slot has no buffer.
#[inline]
fn submit(job: &Rc<Job>, k: usize, stamp: u64) -> bool {
    let p = &job.p;
    let s = &job.slots[k];
    let off = (p.ios_base + job.next_ios(k)) * p.io_blocks;
    s.offset_blocks.set(off);
    let ty = job.pick_type();
    let buf = if p.mode.needs_buffer() {
        let Some(mut buf) = s.buf.take() else {
            return false;
        };
        if p.mode == Mode::Verify {
            let gen = job.gen.get().wrapping_add(1);
            job.gen.set(gen);
            s.gen.set(gen);
            pattern::fill(buf.as_mut_slice(), off, p.block_size as usize, gen);
        }
        Some(buf)
    } else {
        None
    };
    // A descriptor from the reactor's cache with a plain completion
    // function: no allocation per I/O.
    let j: Rc<dyn std::any::Any> = job.clone();
    let io = BdevIo::with_fn(ty, off, p.io_blocks, buf, io_done, Some(j), k as u64);
    job.inflight.set(job.inflight.get() + 1);
    s.submit_ns.set(stamp);
    job.ch.submit(io);
    true
}

/// Verify: the pattern is on the bdev; read it back into the slot's
/// second buffer. Gives the job back when that buffer is missing.
fn submit_readback(job: Rc<Job>, k: usize) -> Result<(), Rc<Job>> {
    let s = &job.slots[k];
    let Some(vbuf) = s.vbuf.take() else {
        return Err(job);
    };
    let (off, n) = (s.offset_blocks.get(), job.p.io_blocks);
    let ch = job.ch.clone();
    let j: Rc<dyn std::any::Any> = job;
    ch.submit(BdevIo::with_fn(
        IoType::Read,
        off,
        n,
        Some(vbuf),
        io_done,
        Some(j),
        k as u64,
    ));
    Ok(())
}

/// The completion function of every job I/O: its job and slot travel in
/// the descriptor.
fn io_done(mut io: Box<BdevIo>) {
    let k = io.cb_ctx as usize;
    match io.cb_arg.take().map(|a| a.downcast::<Job>()) {
        Some(Ok(job)) => on_complete(job, k, io),
        _ => {
            // Only this file submits with io_done, always with its job.
            tracing::error!(?io, "bdevperf I/O completed without its job");
            io.free();
        }
    }
}

fn on_complete(job: Rc<Job>, k: usize, mut io: Box<BdevIo>) {
    let now = job.clock();
    let p = job.p;
    let s = &job.slots[k];
    let ok = io.status.is_success();
    let ty = io.io_type;
    let readback = p.mode == Mode::Verify && ty == IoType::Read;
    if let Some(b) = io.buf.take() {
        if readback {
            s.vbuf.set(Some(b));
        } else {
            s.buf.set(Some(b));
        }
    }
    let status = io.status;
    io.free();

    if ok && p.mode == Mode::Verify && ty == IoType::Write {
        // Half-way through a verify I/O: the latency runs until the read.
        let job = match submit_readback(job, k) {
            Ok(()) => return,
            Err(job) => job,
        };
        job.inflight.set(job.inflight.get() - 1);
        job.internal_error(k);
        if job.inflight.get() == 0 {
            job.finish(now);
        }
        return;
    }

    let mut failed = !ok;
    if !ok {
        job.log_error(format_args!(
            "task offset: {} on job bdev={} fails ({} {:?})",
            s.offset_blocks.get(),
            job.name,
            ty.name(),
            status
        ));
    } else if readback {
        let (w, r) = (s.buf.take(), s.vbuf.take());
        let bs = p.block_size as usize;
        let mis = match (&w, &r) {
            (Some(w), Some(r)) if p.compare_data => {
                pattern::compare(w.as_slice(), r.as_slice(), s.offset_blocks.get(), bs)
            }
            _ => None,
        };
        let lost = w.is_none() || r.is_none();
        s.buf.set(w);
        s.vbuf.set(r);
        if lost {
            job.inflight.set(job.inflight.get() - 1);
            job.internal_error(k);
            if job.inflight.get() == 0 {
                job.finish(now);
            }
            return;
        }
        if let Some(m) = mis {
            failed = true;
            job.miscompares.set(job.miscompares.get() + 1);
            job.log_error(format_args!(
                "Buffer mismatch! Target: {} Disk Offset: {} (block {} byte {}: expected {:#018x}, found {:#018x}; \
                 block header says lba {} generation {:#x}, expected generation {:#x}: {})",
                job.name,
                s.offset_blocks.get(),
                m.lba,
                m.byte,
                m.expected,
                m.found,
                m.found_lba,
                m.found_gen,
                s.gen.get(),
                m.diagnosis(s.gen.get())
            ));
        }
    }

    job.record(now.saturating_sub(s.submit_ns.get()));
    if failed {
        job.failed.set(job.failed.get() + 1);
        if !p.continue_on_failure {
            // SPDK: the first failure ends the job (unless -f).
            job.ended_with_error.set(true);
            job.draining.set(true);
        }
    } else {
        job.completed.set(job.completed.get() + 1);
    }
    job.inflight.set(job.inflight.get() - 1);

    if !job.draining.get()
        && (now >= job.end_ns.get()
            || job.removed.load(Ordering::Relaxed)
            || app::shutdown_requested())
    {
        job.draining.set(true);
    }
    if job.draining.get() {
        if job.inflight.get() == 0 {
            job.finish(now);
        }
        return;
    }
    // The clock was read on completion; the resubmit follows within a few
    // dozen ns of bookkeeping, so that reading stamps it too (clock reads
    // are the largest cost per I/O after the data copy). A verify compare
    // takes longer: read the clock again.
    let stamp = if readback { job.clock() } else { now };
    if !submit(&job, k, stamp) {
        job.internal_error(k);
        if job.inflight.get() == 0 {
            job.finish(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_modes() {
        assert!(Mode::Mixed { read_pct: 100 }.read_only());
        assert!(!Mode::Mixed { read_pct: 99 }.read_only());
        assert!(!Mode::Verify.read_only());
        assert!(!Mode::Flush.read_only());
        assert_eq!(Mode::Unmap.io_type(), Some(IoType::Unmap));
        assert_eq!(Mode::Verify.io_type(), None);
    }

    /// The verify stripes of the slots are disjoint and cover the range.
    #[test]
    fn verify_stripes_are_disjoint() {
        for (size, qd) in [(10u64, 3u32), (7, 7), (100, 1), (33, 8)] {
            let mut owner = vec![None; size as usize];
            for k in 0..u64::from(qd) {
                let mut cur = k;
                loop {
                    assert!(owner[cur as usize].is_none_or(|o| o == k));
                    owner[cur as usize] = Some(k);
                    cur = stripe_next(cur, k, qd, size);
                    if cur == k {
                        break;
                    }
                }
            }
            assert!(owner.iter().all(|o| o.is_some()), "size {size} qd {qd}");
        }
    }
}
