//! The per-reactor channel: a user I/O arrives on whichever reactor the
//! host's queue runs on. Reads and writes of regions all hydrated (and
//! everything once the clone is released) go straight to the destination
//! with no message hop; the rest is split at ownership stripes and each
//! part sent to its owner (`owner.rs`), the parts' answers gathered here.
//! Flushes go to the committer (`committer.rs`); resets drain the owners.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bdev::{util, BdevIo, ChannelOps, IoChannel, IoStatus, IoType};
use reactor::sync::lock;
use reactor::DmaBuf;

use crate::clone::{source_with_status, Shared};
use crate::committer::committer_flush;
use crate::lifecycle::owner_quiesce;
use crate::owner::owner_receive;
use crate::router::IoKind;
use crate::router::MetadataMode;

pub(crate) struct CloneChannel {
    pub(crate) sh: Arc<Shared>,
    pub(crate) dst: Option<IoChannel>,
}

thread_local! {
    /// User I/O sent to owners, by token, on the reactor that received it.
    static PENDING: RefCell<HashMap<u64, Pending>> = RefCell::new(HashMap::new());
    static NEXT_TOKEN: Cell<u64> = const { Cell::new(1) };

}

/// A user I/O whose parts are with owners.
pub(crate) struct Pending {
    pub(crate) io: Box<BdevIo>,
    /// Parts not yet answered.
    pub(crate) left: u32,
    pub(crate) status: IoStatus,
    /// The parts carry copies of the buffer (the I/O spans owners).
    pub(crate) split: bool,
}

/// (Part of) a user I/O handed to its owner reactor (the `BdevIo` stays
/// on the reactor that received it).
pub(crate) struct UserMsg {
    pub(crate) clone: u64,
    pub(crate) kind: IoKind,
    pub(crate) offset: u64,
    pub(crate) num: u64,
    pub(crate) fua: bool,
    pub(crate) buf: Option<DmaBuf>,
    pub(crate) origin: u32,
    pub(crate) token: u64,
}

impl UserMsg {
    pub(crate) fn part(&self) -> Part {
        Part {
            token: self.token,
            offset: self.offset,
        }
    }
}

/// Which part of which user I/O an answer is for.
#[derive(Clone, Copy)]
pub(crate) struct Part {
    pub(crate) token: u64,
    pub(crate) offset: u64,
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
        crate::hydration::note_user_io();
        let sh = &self.sh;
        let Some(dst) = &self.dst else {
            return io.complete(IoStatus::Failed);
        };
        if sh.mode() == MetadataMode::Failed {
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
            return forward(dst, io);
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
pub(crate) fn forward(dst: &IoChannel, io: Box<BdevIo>) {
    if io.io_type == IoType::Read {
        // Reads count no destination error: nothing to do on the way back.
        dst.forward(io)
    } else {
        dst.forward_hooked(io)
    }
}

/// After completion: whole regions of a discard go on to the destination
/// (with passdown), as before completion.
pub(crate) fn passthrough_discard(sh: &Arc<Shared>, dst: &IoChannel, mut io: Box<BdevIo>) {
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
            forward(dst, io)
        }
    }
}

pub(crate) fn to_owner(sh: &Arc<Shared>, kind: IoKind, mut io: Box<BdevIo>) {
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
    // Parts: one per stripe the request touches (each has one owner).
    let parts = sh.stripes.split(&sh.geo, regions, off, num);
    let single = parts.len() == 1;
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
pub(crate) fn send_to(r: u32, f: impl FnOnce() + Send + 'static) {
    if reactor::current() == Some(r) {
        reactor::defer(f);
    } else {
        reactor::send(r, f);
    }
}

/// Back on the receiving reactor: one part is done; complete the user I/O
/// after the last.
pub(crate) fn finish_part(p: Part, status: IoStatus, buf: Option<DmaBuf>) {
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

pub(crate) fn reply(origin: u32, part: Part, status: IoStatus, buf: Option<DmaBuf>) {
    send_to(origin, move || finish_part(part, status, buf));
}

/// Reset: the destination and source are reset, and the reset completes
/// only after every request the owner holds has finished.
pub(crate) fn reset(sh: Arc<Shared>, dst: IoChannel, io: Box<BdevIo>) {
    reactor::spawn_local(async move {
        let id = sh.id;
        // Pause background copies and wait for every owner to drain.
        for &r in &sh.owners {
            reactor::run_on(r, move || owner_quiesce(id, true)).await;
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
            reactor::run_on(r, move || owner_quiesce(id, false)).await;
        }
        io.complete(st);
    });
}
