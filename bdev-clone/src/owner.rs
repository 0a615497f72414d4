//! The owners: regions are striped over reactors (owner = (region /
//! stripe) mod reactors) and each reactor holds one [`Owner`] per clone
//! with its own [`Router`] over the shared map. The owner executes the
//! router's commands (reads, writes, copies, commits) as the executor
//! contract in `router.rs` says, and feeds completions back; [`drive`] runs
//! the router until it has nothing more to say. Requests, completions and
//! nudges reach the owners through one loop per reactor (`drain`), which
//! queues what arrives while it runs instead of finding an owner borrowed.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::rc::{Rc, Weak as RcWeak};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bdev::{BdevIo, IoChannel, IoStatus, IoType};
use reactor::sync::lock;
use reactor::DmaBuf;

use crate::channel::{reply, send_to, Part, UserMsg};
use crate::clone::Shared;
use crate::committer::{committer_request, start_round, Committer, Waiter, COMMIT_PERIOD};
use crate::error::CloneError;
use crate::hydration::{
    is_zero, start_copy, write_zeroes, Hyd, HydRc, HYDRATION_POLL, MAX_COPY_BUF_BYTES, PAUSE_NONE,
    PROBE_MIN_NS,
};
use crate::lifecycle::release_all;
use crate::metadata;
use crate::router::{Command, CommitId, CopyId, IoKind, OpId, ReqId, Request, Router, Status};
use crate::router::{MetadataMode, READ_COPY_MAX_BYTES};

thread_local! {
    /// Owners living on this reactor, by clone id.
    pub(crate) static OWNERS: RefCell<HashMap<u64, Rc<RefCell<Owner>>>> = RefCell::new(HashMap::new());
}

pub(crate) struct OwnerReq {
    pub(crate) origin: u32,
    pub(crate) token: u64,
    pub(crate) offset: u64,
    pub(crate) num: u64,
    pub(crate) buf: Option<DmaBuf>,
}

impl OwnerReq {
    pub(crate) fn part(&self) -> Part {
        Part {
            token: self.token,
            offset: self.offset,
        }
    }

    /// Where the op on `blocks` (block size `bs`) sits in this request's
    /// buffer: byte offset and length, and whether it is the whole request
    /// (then the request's own buffer goes down, no bounce buffer).
    fn span(&self, blocks: &Range<u64>, bs: u32) -> (usize, usize, bool) {
        let at = ((blocks.start - self.offset) * bs as u64) as usize;
        let whole = blocks.start == self.offset && blocks.end - blocks.start == self.num;
        (at, bytes(blocks, bs), whole)
    }
}

pub(crate) struct Owner {
    pub(crate) sh: Arc<Shared>,
    /// Index in `Shared::owners`.
    pub(crate) idx: usize,
    pub(crate) committer: Option<Committer>,
    /// The committer's owner started the source's release (completion).
    pub(crate) releasing: bool,
    pub(crate) router: Option<Router>,
    pub(crate) src: Option<IoChannel>,
    pub(crate) dst: IoChannel,
    pub(crate) md: IoChannel,
    pub(crate) reqs: HashMap<ReqId, OwnerReq>,
    pub(crate) next_req: ReqId,
    pub(crate) out: Vec<Command>,
    /// Hydration's window, rate limit, copies and buffers (shared with
    /// the copy tasks).
    pub(crate) hyd: HydRc,
    pub(crate) fail_streak: u32,
    /// When the last failed copy counted in the streak failed.
    pub(crate) last_fail: u64,
    pub(crate) backoff_until: u64,
    /// The next `StartCopy` executed is a probe (paused by errors).
    pub(crate) probe_pending: bool,
    /// The wait before the next probe.
    pub(crate) probe_wait: u64,
    /// Background work held back (delete, reset).
    pub(crate) stopping: bool,
    pub(crate) quiesced: bool,
    pub(crate) rate_mark: (u64, u64),
    pub(crate) pollers: Vec<reactor::Poller>,
}

pub(crate) fn owner_of(id: u64) -> Option<Rc<RefCell<Owner>>> {
    OWNERS.with(|o| o.borrow().get(&id).cloned())
}

/// What reaches this reactor's owners while [`drain`] is already handling
/// one (from a call it made): a user request part, a completion to apply,
/// a nudge to run the router.
enum Event {
    Receive(UserMsg),
    Apply(RcWeak<RefCell<Owner>>, Box<dyn FnOnce(&mut Owner)>),
    Drive(Rc<RefCell<Owner>>),
}

thread_local! {
    /// Events queued while [`drain`] runs on this reactor.
    static EVENTS: RefCell<VecDeque<Event>> = const { RefCell::new(VecDeque::new()) };
    /// [`drain`] is running here: an owner may be borrowed.
    static DRAINING: Cell<bool> = const { Cell::new(false) };
}

/// This reactor's owner loop: the router's executor runs inside it, and
/// whatever comes back to an owner from a call it made is queued and
/// handled here, in order, once the current event is done; so no handler
/// finds an owner borrowed and nothing waits for a later reactor pass.
fn drain(first: impl FnOnce()) {
    struct Running;
    impl Drop for Running {
        fn drop(&mut self) {
            DRAINING.with(|d| d.set(false));
        }
    }
    DRAINING.with(|d| d.set(true));
    let _running = Running;
    first();
    while let Some(ev) = EVENTS.with(|q| q.borrow_mut().pop_front()) {
        match ev {
            Event::Receive(msg) => receive(msg),
            Event::Apply(weak, f) => apply(&weak, f),
            Event::Drive(rc) => run(&rc),
        }
    }
}

fn draining() -> bool {
    DRAINING.with(Cell::get)
}

/// For [`drain`], running on this reactor.
fn queue(ev: Event) {
    EVENTS.with(|q| {
        let mut q = q.borrow_mut();
        // Back-to-back nudges of one owner: the first covers both.
        if let (Event::Drive(rc), Some(Event::Drive(last))) = (&ev, q.back()) {
            if Rc::ptr_eq(rc, last) {
                return;
            }
        }
        q.push_back(ev);
    });
}

/// A user request part, on its owner's reactor.
pub(crate) fn owner_receive(msg: UserMsg) {
    if draining() {
        return queue(Event::Receive(msg));
    }
    drain(|| receive(msg));
}

fn receive(msg: UserMsg) {
    let Some(rc) = owner_of(msg.clone) else {
        return reply(msg.origin, msg.part(), IoStatus::Failed, msg.buf);
    };
    let mut guard = rc.borrow_mut();
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
    run(&rc);
}

/// A request that reached the owner after the router was dropped.
pub(crate) fn serve_released(rc: &Rc<RefCell<Owner>>, msg: UserMsg) {
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
pub(crate) fn drive(rc: &Rc<RefCell<Owner>>) {
    if draining() {
        return queue(Event::Drive(rc.clone()));
    }
    drain(|| run(rc));
}

fn run(rc: &Rc<RefCell<Owner>>) {
    let mut guard = rc.borrow_mut();
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
    if let Some(c) = o.committer.as_ref() {
        let sh = &o.sh;
        if !o.releasing
            && !c.in_flight()
            && sh.map.is_complete()
            && !sh.map.has_dirty()
            && sh.mode() == MetadataMode::ReadWrite
        {
            o.releasing = true;
            let sh = sh.clone();
            reactor::spawn_local(release_all(sh));
        }
    }
}

impl Owner {
    pub(crate) fn router_and_out(&mut self) -> Option<(&mut Router, &mut Vec<Command>)> {
        let Owner { router, out, .. } = self;
        router.as_mut().map(|r| (r, out))
    }

    pub(crate) fn op_done(&mut self, op: OpId, ok: bool) {
        if let Some((r, out)) = self.router_and_out() {
            if let Err(e) = r.op_done(op, ok, out) {
                tracing::error!(error = %e, "clone: stray op completion");
            }
        }
    }

    pub(crate) fn copy_done(&mut self, copy: CopyId, ok: bool) {
        if let Some((r, out)) = self.router_and_out() {
            if let Err(e) = r.copy_done(copy, ok, out) {
                tracing::error!(error = %e, "clone: stray copy completion");
            }
        }
    }

    pub(crate) fn commit_done(&mut self, commit: CommitId, ok: bool) {
        if let Some((r, out)) = self.router_and_out() {
            if let Err(e) = r.commit_done(commit, ok, out) {
                tracing::error!(error = %e, "clone: stray commit completion");
            }
        }
    }

    pub(crate) fn publish(&mut self) {
        self.hyd.borrow().publish(&self.sh.pacing[self.idx]);
        let slot = &self.sh.hydrating[self.idx];
        if let Some(r) = &self.router {
            slot.store(r.stats().regions_copying, Ordering::Relaxed);
            // Modes only get worse; the worst owner's is the clone's.
            self.sh.worsen_mode(r.mode());
        } else {
            slot.store(0, Ordering::Relaxed);
        }
    }

    /// Drop the router, the source channel and the pollers (completion).
    pub(crate) fn release_local(&mut self) {
        self.router = None;
        self.src = None;
        self.hyd.borrow_mut().clear_bufs();
        self.sh.hydrating[self.idx].store(0, Ordering::Relaxed);
        // Pollers are dropped outside their own callbacks.
        let pollers = std::mem::take(&mut self.pollers);
        reactor::defer(move || drop(pollers));
    }
}

/// Tell a waiter how its commit went.
/// Bring a router's metadata mode down to the clone's: a commit that
/// failed in the committer (answering only flushes) leaves the routers
/// read-write otherwise, and they would go on recording hydrations that can
/// never be committed.
pub(crate) fn sync_mode(sh: &Shared, router: &mut Router) {
    match sh.mode() {
        MetadataMode::ReadWrite => {}
        MetadataMode::ReadOnly => router.set_read_only(),
        _ => router.set_failed(),
    }
}

/// Bytes of `blocks` at block size `bs`.
pub(crate) fn bytes(blocks: &Range<u64>, bs: u32) -> usize {
    ((blocks.end - blocks.start) * bs as u64) as usize
}

pub(crate) fn exec(rc: &Rc<RefCell<Owner>>, o: &mut Owner, c: Command) {
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
                op_finished(&weak, op, ok);
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
                op_finished(&weak, op, io.status.is_success())
            });
        }
        Command::StartCopy { copy, blocks, .. } => start_copy(rc, o, copy, blocks),
        Command::ReadCopy {
            req,
            op,
            read,
            copy,
            blocks,
            ..
        } => exec_read_copy(rc, o, req, op, read, copy, blocks),
        Command::Commit { commit, .. } => {
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

/// From an I/O callback: `f` on the owner, if it still exists, then drive
/// it.
pub(crate) fn then_drive(weak: &RcWeak<RefCell<Owner>>, f: impl FnOnce(&mut Owner) + 'static) {
    if draining() {
        return queue(Event::Apply(weak.clone(), Box::new(f)));
    }
    drain(|| apply(weak, f));
}

fn apply(weak: &RcWeak<RefCell<Owner>>, f: impl FnOnce(&mut Owner)) {
    let Some(rc) = weak.upgrade() else { return };
    f(&mut rc.borrow_mut());
    run(&rc);
}

/// A destination write's, write-zeroes' or unmap's completion, from its I/O
/// callback (a failure counts as a destination error).
pub(crate) fn op_finished(weak: &RcWeak<RefCell<Owner>>, op: OpId, ok: bool) {
    then_drive(weak, move |o| {
        if !ok {
            o.sh.err_dest.fetch_add(1, Ordering::Relaxed);
        }
        o.op_done(op, ok);
    });
}

pub(crate) fn exec_read(
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
    let (at, len, whole) = r.span(&blocks, bs);
    let (buf, bounce) = match (whole, r.buf.take()) {
        (true, Some(b)) => (b, false),
        (_, b) => {
            r.buf = b;
            (DmaBuf::new(len), true)
        }
    };
    let count = |sh: &Shared| sh.err_source.fetch_add(1, Ordering::Relaxed);
    let moved = Moved {
        req,
        op,
        bounce,
        read_into: Some(at..at + len),
        count_error: from_source.then_some(count),
    };
    let cb = moved.callback(rc);
    // The user's cold reads share the source's link with hydration: the
    // window counts them first.
    let on_link = from_source.then(|| (o.hyd.clone(), o.hyd.borrow_mut().user_read(len as u64)));
    ch.read(blocks.start, blocks.end - blocks.start, buf, move |io| {
        if let Some((hyd, sent)) = on_link {
            hyd.borrow_mut().read_done(sent, io.status.is_success());
        }
        cb(io)
    });
}

/// An op moving a request's data, for its I/O callback.
struct Moved {
    req: ReqId,
    op: OpId,
    /// The I/O used a bounce buffer, not the request's own.
    bounce: bool,
    /// A read: where its data goes in the request's buffer.
    read_into: Option<Range<usize>>,
    count_error: Option<fn(&Shared) -> u64>,
}

impl Moved {
    /// Count a failure, give the request its buffer back (or copy a read
    /// through a bounce buffer into it), then the op is done.
    fn callback(self, rc: &Rc<RefCell<Owner>>) -> impl FnOnce(Box<BdevIo>) + 'static {
        let weak = Rc::downgrade(rc);
        move |mut io| {
            let ok = io.status.is_success();
            then_drive(&weak, move |o| {
                if let (false, Some(count)) = (ok, self.count_error) {
                    count(&o.sh);
                }
                if let (Some(buf), Some(r)) = (io.buf.take(), o.reqs.get_mut(&self.req)) {
                    match (self.bounce, self.read_into, r.buf.as_mut()) {
                        (false, ..) => r.buf = Some(buf),
                        (true, Some(into), Some(rb)) if ok => {
                            rb.as_mut_slice()[into.clone()]
                                .copy_from_slice(&buf.as_slice()[..into.len()]);
                        }
                        _ => {}
                    }
                }
                o.op_done(self.op, ok);
            });
        }
    }
}

pub(crate) fn exec_write(
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
    let (at, len, whole) = r.span(&blocks, bs);
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
    let count = |sh: &Shared| sh.err_dest.fetch_add(1, Ordering::Relaxed);
    let moved = Moved {
        req,
        op,
        bounce,
        read_into: None,
        count_error: Some(count),
    };
    let mut io = BdevIo::write(
        blocks.start,
        blocks.end - blocks.start,
        buf,
        moved.callback(rc),
    );
    io.fua = fua;
    o.dst.submit(io);
}

/// Execute a `ReadCopy`: one source read of whole regions; the request's
/// part is copied into its buffer and its op reported at once (the user
/// does not wait for the destination), then the same buffer is written to
/// the destination (zeroes as write_zeroes when it can) and the copy
/// reported.
#[allow(clippy::too_many_arguments)]
pub(crate) fn exec_read_copy(
    rc: &Rc<RefCell<Owner>>,
    o: &mut Owner,
    req: ReqId,
    op: OpId,
    read: Range<u64>,
    copy: CopyId,
    blocks: Range<u64>,
) {
    let Some(src) = o.src.clone() else {
        o.op_done(op, false);
        return o.copy_done(copy, false);
    };
    let bs = o.sh.geo.block_size();
    let len = bytes(&blocks, bs);
    let buf = o.take_copy_buf(len);
    let weak = Rc::downgrade(rc);
    // The link carries it as a user read: the window counts it.
    let (hyd, sent) = (o.hyd.clone(), o.hyd.borrow_mut().user_read(len as u64));
    src.read(
        blocks.start,
        blocks.end - blocks.start,
        buf,
        move |mut io| {
            hyd.borrow_mut().read_done(sent, io.status.is_success());
            let buf = io.buf.take().unwrap_or_else(|| DmaBuf::new(0));
            let ok = io.status.is_success() && buf.len() >= len;
            let w = weak.clone();
            then_drive(&weak, move |o| {
                if !ok {
                    o.sh.err_source.fetch_add(1, Ordering::Relaxed);
                } else if let Some(r) = o.reqs.get_mut(&req) {
                    if let Some(rb) = r.buf.as_mut() {
                        let at = ((read.start - r.offset) * bs as u64) as usize;
                        let from = ((read.start - blocks.start) * bs as u64) as usize;
                        let n = bytes(&read, bs);
                        rb.as_mut_slice()[at..at + n]
                            .copy_from_slice(&buf.as_slice()[from..from + n]);
                    }
                }
                o.op_done(op, ok);
                if !ok {
                    o.give_copy_buf(len, Some(buf));
                    return o.copy_done(copy, false);
                }
                let zero = o.sh.dest_write_zeroes && is_zero(buf.as_slice());
                // All zeroes: write_zeroes, and the buffer waits beside it.
                let (t, data, kept) = if zero {
                    (IoType::WriteZeroes, None, Some(buf))
                } else {
                    (IoType::Write, Some(buf), None)
                };
                let n = blocks.end - blocks.start;
                o.dst
                    .submit(BdevIo::new(t, blocks.start, n, data, move |mut io| {
                        let ok = io.status.is_success();
                        then_drive(&w, move |o| {
                            o.give_copy_buf(len, io.buf.take().or(kept));
                            if ok {
                                o.sh.hydrated_bytes.fetch_add(len as u64, Ordering::Relaxed);
                            } else {
                                o.sh.err_dest.fetch_add(1, Ordering::Relaxed);
                            }
                            o.copy_done(copy, ok);
                        });
                    }));
            });
        },
    );
}

impl Owner {
    /// A copy buffer of `len` bytes; its bytes count in the copy-buffer cap
    /// until given back.
    fn take_copy_buf(&mut self, len: usize) -> DmaBuf {
        self.hyd.borrow_mut().take_sized(len)
    }

    /// Give back a buffer from [`Owner::take_copy_buf`] of `len` bytes.
    fn give_copy_buf(&mut self, len: usize, buf: Option<DmaBuf>) {
        self.hyd.borrow_mut().put_sized(len, buf);
    }
}

impl Owner {
    /// Set the router's read-triggered copy budget (each pump): the regions
    /// the source's link has room for now (the hydration window's room
    /// after the user's reads and hydration's chunks), at most the copy
    /// threshold; one at a time when the link is full, so copy-on-read
    /// hydrates what is read also with background hydration off or paused
    /// by the user. None while the clone stops, is paused by errors or is
    /// not read-write. Read copies are user I/O: the rate limit does not
    /// hold them back, but their bytes are taken from its bucket, so
    /// background copies make room.
    pub(crate) fn set_read_copy_budget(&mut self) {
        let sh = self.sh.clone();
        let room = self.read_copy_room();
        let Some(router) = self.router.as_mut() else {
            return;
        };
        let started = router.take_read_copy_regions();
        if sh.mbytes_per_sec.load(Ordering::Relaxed) > 0 {
            let mut h = self.hyd.borrow_mut();
            h.bucket.take((started * sh.geo.region_size()) as f64);
        }
        let on = sh.copy_on_read.load(Ordering::Relaxed)
            && sh.mode() == MetadataMode::ReadWrite
            && sh.paused.load(Ordering::Relaxed) == PAUSE_NONE
            && !self.stopping
            && !self.quiesced;
        let budget = if on {
            let in_flight = router.stats().read_copies_in_flight as u64;
            let bufs = MAX_COPY_BUF_BYTES.saturating_sub(self.hyd.borrow().buf_bytes)
                / READ_COPY_MAX_BYTES;
            let floor = u64::from(in_flight == 0);
            room.min(sh.threshold.load(Ordering::Relaxed) as u64)
                .max(floor)
                .min(bufs)
        } else {
            0
        };
        router.set_read_copy_budget(budget);
    }
}

/// Build owner `idx` on this reactor (channels, pollers; the committer
/// too on the home reactor).
pub(crate) fn start_owner(sh: Arc<Shared>, router: Router, idx: usize) -> Result<(), CloneError> {
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
        committer: home.then(|| {
            Committer::new(
                sh.commit_rounds.clone(),
                metadata::units_per_block(sh.md_block_size),
            )
        }),
        releasing: false,
        router: Some(router),
        src,
        dst,
        md,
        reqs: HashMap::new(),
        next_req: 1,
        out: Vec::with_capacity(64),
        hyd: Hyd::new(now),
        fail_streak: 0,
        last_fail: 0,
        backoff_until: 0,
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
    // The status reports the starting window from the first call, not a
    // zero that changes once this owner first runs.
    rc.borrow_mut().publish();
    OWNERS.with(|o| o.borrow_mut().insert(sh.id, rc));
    Ok(())
}
