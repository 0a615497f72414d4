//! Per-reactor channels and the generic submit/complete path: checks,
//! iostat, QoS queueing, NOMEM retry, reset freeze, and deferral of
//! completions that a module makes inline from `submit`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use reactor::{DmaBuf, TimerId};

use crate::io::{BdevIo, Frame, IoStatus, IoType, MAX_FRAMES};
use crate::stat::IoStat;
use crate::{Bdev, ChannelOps};

pub(crate) struct ChannelInner {
    pub(crate) bdev: Arc<Bdev>,
    pub(crate) module: Box<dyn ChannelOps>,
    stat: Arc<IoStat>,
    nomem: RefCell<VecDeque<Box<BdevIo>>>,
    nomem_timer: Cell<Option<TimerId>>,
    qos_queue: RefCell<VecDeque<(u64, Box<BdevIo>)>>,
    qos_timer: Cell<Option<TimerId>>,
}

impl Drop for ChannelInner {
    fn drop(&mut self) {
        self.bdev.stats.retire(&self.stat);
        // `try_with`: a channel still held when its thread exits may be
        // dropped after the registry's own thread-local is gone.
        let _ = CHANNELS.try_with(|c| {
            if let Ok(mut c) = c.try_borrow_mut() {
                if let Some(w) = c.get(&self.bdev.id) {
                    if w.strong_count() == 0 {
                        c.remove(&self.bdev.id);
                    }
                }
            }
        });
    }
}

thread_local! {
    static CHANNELS: RefCell<HashMap<u64, Weak<ChannelInner>>> = RefCell::new(HashMap::new());
    static SUBMIT_DEPTH: Cell<u32> = const { Cell::new(0) };
    static DEFERRED: RefCell<VecDeque<Box<BdevIo>>> = const { RefCell::new(VecDeque::new()) };
    /// A `drain_deferred` is queued or running: at most one per iteration,
    /// so what a completion defers waits for the next iteration.
    static DRAIN_QUEUED: Cell<bool> = const { Cell::new(false) };
}

/// A reactor's handle for submitting I/O to one bdev. Cheap to clone;
/// `!Send`: it belongs to the reactor that made it.
#[derive(Clone)]
pub struct IoChannel {
    inner: Rc<ChannelInner>,
    write: bool,
}

pub(crate) fn get_channel(bdev: &Arc<Bdev>, write: bool) -> IoChannel {
    let existing = CHANNELS.with(|c| c.borrow().get(&bdev.id).and_then(|w| w.upgrade()));
    let inner = match existing {
        Some(i) => i,
        None => {
            let module = bdev.ops.create_channel(bdev);
            let inner = Rc::new(ChannelInner {
                bdev: bdev.clone(),
                module,
                stat: bdev.stats.new_channel(),
                nomem: RefCell::new(VecDeque::new()),
                nomem_timer: Cell::new(None),
                qos_queue: RefCell::new(VecDeque::new()),
                qos_timer: Cell::new(None),
            });
            CHANNELS.with(|c| c.borrow_mut().insert(bdev.id, Rc::downgrade(&inner)));
            inner
        }
    };
    IoChannel { inner, write }
}

fn fail_early(mut io: Box<BdevIo>, status: IoStatus) {
    io.status = status;
    // Never call back inline from submit: callers may hold borrows.
    defer_io(io);
}

/// Finish `io` at the next loop iteration.
fn defer_io(io: Box<BdevIo>) {
    DEFERRED.with(|d| d.borrow_mut().push_back(io));
    if !DRAIN_QUEUED.replace(true) {
        reactor::defer(drain_deferred);
    }
}

impl IoChannel {
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.inner.bdev
    }

    /// Submit an I/O. Every I/O is completed through its callback exactly
    /// once, on this reactor, never inline.
    pub fn submit(&self, io: Box<BdevIo>) {
        if io.in_flight() {
            // A module passing the I/O it was given to its base: that is a
            // forward (keeps the upper level's accounting), not a new I/O.
            debug_assert!(false, "submit of an I/O in flight; use IoChannel::forward");
            return self.forward(io);
        }
        self.start(io)
    }

    /// Stacked modules: hand `io`, which this channel's *upper* bdev was
    /// given, down to this (base) channel unchanged in place, instead of a
    /// child I/O. The offset and length may be changed first (within this
    /// bdev); the base's generic layer checks, counts and queues it as any
    /// I/O. When the base completes it, the upper level completes with the
    /// base's status (the buffer travels with it), at once and with no
    /// module code in between. See [`IoChannel::forward_hooked`] for a
    /// module that wants to see the completion.
    #[inline]
    pub fn forward(&self, io: Box<BdevIo>) {
        self.push_level(io, false)
    }

    /// As [`IoChannel::forward`], but the base's completion goes to the
    /// upper module's [`ChannelOps::forward_done`] with the I/O as the upper
    /// level has it (its `driver_ctx` restored, `status` the base's), which
    /// completes it (now or later) with [`BdevIo::complete`].
    #[inline]
    pub fn forward_hooked(&self, io: Box<BdevIo>) {
        self.push_level(io, true)
    }

    fn push_level(&self, mut io: Box<BdevIo>, hook: bool) {
        let Some(upper) = io.ch.take() else {
            // Not in flight: nothing to forward from; a plain submit.
            return self.start(io);
        };
        let depth = io.depth as usize;
        if depth >= MAX_FRAMES {
            io.ch = Some(upper);
            return forward_with_child(self, io, hook);
        }
        io.frames[depth] = Some(Frame {
            ch: upper,
            submit_ns: io.submit_ns,
            driver_ctx: io.driver_ctx,
            hook,
        });
        io.depth += 1;
        io.driver_ctx = 0;
        self.start(io)
    }

    /// The generic submit path: checks, accounting, reset freeze, QoS.
    fn start(&self, mut io: Box<BdevIo>) {
        let bdev = &self.inner.bdev;
        io.status = IoStatus::Pending;
        if io.io_type.is_write() && !self.write {
            tracing::debug!(bdev = %bdev.name, "write through a read-only descriptor");
            return fail_early(io, IoStatus::Failed);
        }
        if !bdev.ops.io_type_supported(io.io_type) {
            return fail_early(io, IoStatus::Failed);
        }
        if io.io_type != IoType::Reset {
            let end = io.offset_blocks.checked_add(io.num_blocks);
            if end.is_none_or(|e| e > bdev.num_blocks()) {
                return fail_early(io, IoStatus::Failed);
            }
        }
        if matches!(io.io_type, IoType::Read | IoType::Write) {
            let need = io.num_blocks * bdev.block_size as u64;
            if io.num_blocks == 0 || io.buf.as_ref().is_none_or(|b| (b.len() as u64) < need) {
                return fail_early(io, IoStatus::Failed);
            }
        }
        if bdev.reset_in_progress.load(Ordering::Acquire) && io.io_type != IoType::Reset {
            return fail_early(io, IoStatus::Aborted);
        }
        // The iteration's clock: latencies and QoS need no more precision.
        let now = reactor::tick_ns();
        io.ch = Some(self.inner.clone());
        io.submit_ns = now;
        let st = &self.inner.stat.outstanding;
        st.store(st.load(Ordering::Relaxed) + 1, Ordering::Relaxed);

        if io.io_type == IoType::Reset {
            return start_reset(&self.inner, io);
        }
        if bdev.qos.enabled() {
            let bytes = io.num_blocks * bdev.block_size as u64;
            let start = bdev.qos.admit(io.io_type, bytes, now);
            let queued = !self.inner.qos_queue.borrow().is_empty();
            if start > now || queued {
                self.inner.qos_queue.borrow_mut().push_back((start, io));
                arm_qos(&self.inner);
                return;
            }
        }
        dispatch(&self.inner, io);
    }

    pub fn read(
        &self,
        offset_blocks: u64,
        num_blocks: u64,
        buf: DmaBuf,
        cb: impl FnOnce(Box<BdevIo>) + 'static,
    ) {
        self.submit(BdevIo::read(offset_blocks, num_blocks, buf, cb))
    }

    pub fn write(
        &self,
        offset_blocks: u64,
        num_blocks: u64,
        buf: DmaBuf,
        cb: impl FnOnce(Box<BdevIo>) + 'static,
    ) {
        self.submit(BdevIo::write(offset_blocks, num_blocks, buf, cb))
    }

    pub fn flush(
        &self,
        offset_blocks: u64,
        num_blocks: u64,
        cb: impl FnOnce(Box<BdevIo>) + 'static,
    ) {
        self.submit(BdevIo::new(
            IoType::Flush,
            offset_blocks,
            num_blocks,
            None,
            cb,
        ))
    }

    pub fn unmap(
        &self,
        offset_blocks: u64,
        num_blocks: u64,
        cb: impl FnOnce(Box<BdevIo>) + 'static,
    ) {
        self.submit(BdevIo::new(
            IoType::Unmap,
            offset_blocks,
            num_blocks,
            None,
            cb,
        ))
    }

    pub fn write_zeroes(
        &self,
        offset_blocks: u64,
        num_blocks: u64,
        cb: impl FnOnce(Box<BdevIo>) + 'static,
    ) {
        self.submit(BdevIo::new(
            IoType::WriteZeroes,
            offset_blocks,
            num_blocks,
            None,
            cb,
        ))
    }

    pub fn reset(&self, cb: impl FnOnce(Box<BdevIo>) + 'static) {
        self.submit(BdevIo::new(IoType::Reset, 0, 0, None, cb))
    }

    /// Allocation status of a range (see [`crate::ChannelOps::block_status`]);
    /// a range past the end or empty fails. The extents are clipped to the
    /// range and never empty.
    pub fn block_status(
        &self,
        offset_blocks: u64,
        num_blocks: u64,
        cb: impl FnOnce(Result<Vec<crate::BlockExtent>, IoStatus>) + 'static,
    ) {
        let end = offset_blocks.checked_add(num_blocks);
        if num_blocks == 0 || end.is_none_or(|e| e > self.inner.bdev.num_blocks()) {
            reactor::defer(move || cb(Err(IoStatus::Failed)));
            return;
        }
        self.inner.module.block_status(
            offset_blocks,
            num_blocks,
            Box::new(move |r| {
                cb(r.and_then(|v| {
                    let mut left = num_blocks;
                    let out: Vec<crate::BlockExtent> = v
                        .into_iter()
                        .filter(|e| e.num_blocks > 0)
                        .map_while(|mut e| {
                            if left == 0 {
                                return None;
                            }
                            e.num_blocks = e.num_blocks.min(left);
                            left -= e.num_blocks;
                            Some(e)
                        })
                        .collect();
                    if out.is_empty() {
                        Err(IoStatus::Failed)
                    } else {
                        Ok(out)
                    }
                }))
            }),
        );
    }
}

fn dispatch(inner: &Rc<ChannelInner>, io: Box<BdevIo>) {
    SUBMIT_DEPTH.with(|d| d.set(d.get() + 1));
    inner.module.submit(io);
    SUBMIT_DEPTH.with(|d| d.set(d.get() - 1));
}

fn arm_qos(inner: &Rc<ChannelInner>) {
    if inner.qos_timer.get().is_some() {
        return;
    }
    let head = inner.qos_queue.borrow().front().map(|(t, _)| *t);
    let Some(head) = head else { return };
    let delay = Duration::from_nanos(head.saturating_sub(reactor::tick_ns()));
    let weak = Rc::downgrade(inner);
    let id = reactor::set_timer(delay, move || {
        if let Some(inner) = weak.upgrade() {
            inner.qos_timer.set(None);
            release_qos(&inner);
        }
    });
    inner.qos_timer.set(Some(id));
}

fn release_qos(inner: &Rc<ChannelInner>) {
    let now = reactor::tick_ns();
    loop {
        let io = {
            let mut q = inner.qos_queue.borrow_mut();
            match q.front() {
                Some((t, _)) if *t <= now => q.pop_front().map(|(_, io)| io),
                _ => None,
            }
        };
        let Some(io) = io else { break };
        if inner.bdev.reset_in_progress.load(Ordering::Acquire) {
            io.complete(IoStatus::Aborted);
        } else {
            dispatch(inner, io);
        }
    }
    arm_qos(inner);
}

/// Module side of completion (see [`BdevIo::complete`]).
pub(crate) fn complete_io(io: Box<BdevIo>) {
    if SUBMIT_DEPTH.with(|d| d.get()) > 0 {
        return defer_io(io);
    }
    finish(io);
}

/// Complete what was deferred before this call; what those completions
/// defer in turn waits for the next loop iteration, so a caller that
/// resubmits from its callback to an inline-completing module cannot
/// starve messages, timers and RPCs.
fn drain_deferred() {
    let n = DEFERRED.with(|d| d.borrow().len());
    for _ in 0..n {
        let io = DEFERRED.with(|d| d.borrow_mut().pop_front());
        match io {
            Some(io) => finish(io),
            None => break,
        }
    }
    // Queued once more only now: a completion above that deferred an I/O
    // did not queue a second drain into this same iteration.
    if DEFERRED.with(|d| !d.borrow().is_empty()) {
        reactor::defer(drain_deferred);
    } else {
        DRAIN_QUEUED.set(false);
    }
}

fn finish(mut io: Box<BdevIo>) {
    loop {
        if let Some(ch) = io.ch.take() {
            if io.status == IoStatus::NoMem {
                io.status = IoStatus::Pending;
                io.ch = Some(ch.clone());
                ch.nomem.borrow_mut().push_back(io);
                arm_nomem(&ch);
                return;
            }
            account(&ch, &io);
        }
        // Else it was rejected before it reached a channel.
        if io.depth == 0 {
            return io.call_back();
        }
        // A forwarded I/O: back to the level above.
        io.depth -= 1;
        let Some(f) = io.frames[io.depth as usize].take() else {
            debug_assert!(false, "forwarded I/O lost a level");
            tracing::error!(io = ?io, "forwarded I/O lost a level; failing it");
            continue;
        };
        io.submit_ns = f.submit_ns;
        io.driver_ctx = f.driver_ctx;
        if f.hook {
            let ch = f.ch.clone();
            io.ch = Some(f.ch);
            return ch.module.forward_done(io);
        }
        io.ch = Some(f.ch);
    }
}

/// Iostat and the outstanding count of `io` completing on `ch`.
fn account(ch: &Rc<ChannelInner>, io: &BdevIo) {
    let bytes = match io.io_type {
        IoType::Read | IoType::Write | IoType::Unmap | IoType::WriteZeroes => {
            io.num_blocks * ch.bdev.block_size as u64
        }
        _ => 0,
    };
    let lat = reactor::tick_ns().saturating_sub(io.submit_ns);
    ch.stat.record(io.io_type, bytes, io.status, lat);
    let st = &ch.stat.outstanding;
    st.store(
        st.load(Ordering::Relaxed).saturating_sub(1),
        Ordering::Relaxed,
    );
    if io.io_type == IoType::Reset {
        ch.bdev.reset_in_progress.store(false, Ordering::Release);
    }
    // A completion frees resources: give parked NOMEM I/O another go.
    if !ch.nomem.borrow().is_empty() {
        retry_nomem(ch);
    }
}

/// A forward past [`MAX_FRAMES`] levels: a child I/O carries it down.
fn forward_with_child(base: &IoChannel, mut parent: Box<BdevIo>, hook: bool) {
    let buf = parent.buf.take();
    let (t, off, num, fua) = (
        parent.io_type,
        parent.offset_blocks,
        parent.num_blocks,
        parent.fua,
    );
    let mut child = BdevIo::new(t, off, num, buf, move |mut child| {
        parent.buf = child.buf.take();
        let status = child.status;
        child.free();
        match (hook, parent.ch.clone()) {
            (true, Some(ch)) => {
                parent.status = status;
                ch.module.forward_done(parent)
            }
            _ => parent.complete(status),
        }
    });
    child.fua = fua;
    base.start(child);
}

fn arm_nomem(ch: &Rc<ChannelInner>) {
    if ch.nomem_timer.get().is_some() {
        return;
    }
    // Fallback when nothing else completes on this channel to trigger it.
    let weak = Rc::downgrade(ch);
    let id = reactor::set_timer(Duration::from_micros(100), move || {
        if let Some(ch) = weak.upgrade() {
            ch.nomem_timer.set(None);
            retry_nomem(&ch);
        }
    });
    ch.nomem_timer.set(Some(id));
}

fn retry_nomem(ch: &Rc<ChannelInner>) {
    let ios: Vec<Box<BdevIo>> = ch.nomem.borrow_mut().drain(..).collect();
    for io in ios {
        if ch.bdev.reset_in_progress.load(Ordering::Acquire) {
            io.complete(IoStatus::Aborted);
        } else {
            dispatch(ch, io);
        }
    }
}

/// Freeze: new I/O is aborted, queued I/O on every reactor is aborted, then
/// the module resets (and must complete every outstanding I/O first).
fn start_reset(inner: &Rc<ChannelInner>, io: Box<BdevIo>) {
    let bdev = inner.bdev.clone();
    if bdev.reset_in_progress.swap(true, Ordering::AcqRel) {
        // Resets are serialised per bdev: wait for the running one.
        let inner = inner.clone();
        let slot: Rc<RefCell<Option<reactor::Poller>>> = Rc::new(RefCell::new(None));
        let slot2 = slot.clone();
        let mut io = Some(io);
        *slot.borrow_mut() = Some(reactor::poller_register(
            Duration::from_micros(100),
            move || {
                if !inner.bdev.reset_in_progress.load(Ordering::Acquire) {
                    slot2.borrow_mut().take();
                    if let Some(mut io) = io.take() {
                        // Undo the outstanding count; submit counts it again.
                        let st = &inner.stat.outstanding;
                        st.store(
                            st.load(Ordering::Relaxed).saturating_sub(1),
                            Ordering::Relaxed,
                        );
                        io.ch = None;
                        let ch = IoChannel {
                            inner: inner.clone(),
                            write: true,
                        };
                        ch.start(io);
                    }
                    return reactor::PollStatus::Busy;
                }
                reactor::PollStatus::Idle
            },
        ));
        return;
    }
    let id = bdev.id;
    for r in 0..reactor::num_reactors() {
        reactor::send(r, move || abort_queued(id));
    }
    let inner2 = inner.clone();
    // Let the abort messages run before the module sees the reset.
    reactor::defer(move || dispatch(&inner2, io));
}

fn abort_queued(bdev_id: u64) {
    let ch = CHANNELS.with(|c| c.borrow().get(&bdev_id).and_then(|w| w.upgrade()));
    let Some(ch) = ch else { return };
    let mut ios: Vec<Box<BdevIo>> = ch.nomem.borrow_mut().drain(..).collect();
    ios.extend(ch.qos_queue.borrow_mut().drain(..).map(|(_, io)| io));
    for io in ios {
        io.complete(IoStatus::Aborted);
    }
}

/// Run `f` with `bdev`'s channel on every reactor that has one, one
/// reactor after another, and resolve once all have (SPDK's
/// `spdk_for_each_channel`). `T` is the module's `ChannelOps` type.
/// Management path only (resets, teardown).
pub async fn for_each_channel<T: 'static>(
    bdev: &Arc<Bdev>,
    f: impl Fn(&T) + Send + Sync + 'static,
) {
    let id = bdev.id;
    crate::util::on_each_reactor(move || {
        // Upgrade, then let the table go before calling `f`: it may
        // complete I/O whose callbacks open or drop channels.
        let ch = CHANNELS.with(|c| c.borrow().get(&id).and_then(|w| w.upgrade()));
        if let Some(ch) = ch {
            if let Some(t) = ch.module.as_ref().as_any_ref().downcast_ref::<T>() {
                f(t);
            }
        }
    })
    .await
}
