//! The NBD client bdev (`bdev_nbd_create`), shaped like the NVMe/TCP host.
//!
//! * One bdev per NBD export; its connections (several only when the
//!   server offers `NBD_FLAG_CAN_MULTI_CONN`) are spread over reactors,
//!   connection `i` on reactor `i mod reactors`. A bdev channel sends each
//!   I/O to a connection on its own reactor when there is one, otherwise by
//!   message to another; the reply comes back the same way.
//! * A connection pipelines requests (cookies), splits them at the server's
//!   maximum payload, reads structured replies (data, holes, block status,
//!   errors) or simple ones, and emulates FUA with a flush when the server
//!   lacks it.
//! * A lost connection (peer gone, protocol error, a request unanswered for
//!   `io_timeout_ms`) keeps its I/O and reconnects with back-off, starting
//!   at `reconnect_delay_ms`. I/O waiting longer than
//!   `fast_io_fail_timeout_ms` fails with EIO, and new I/O fails at once
//!   until the connection is back (bdev_nvme's fast-fail).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bdev::{
    Bdev, BdevBuilder, BdevIo, BdevOps, BlockExtent, BlockStatusCb, ChannelOps, IoStatus, IoType,
};
use reactor::{DmaBuf, Poller};
use serde_json::{json, Value};

use crate::handshake::{handshake, Negotiated};
use crate::proto::{self, *};
use crate::sock::{with_timeout, Sock};
use crate::uri::{Endpoint, NbdUri};
use crate::NbdError;
use reactor::sync::call_on;

pub const MODULE_NAME: &str = "nbd";
pub const PRODUCT_NAME: &str = "NBD disk";
/// Longest non-data chunk payload accepted (block status of a big range).
const MAX_CHUNK: u32 = 16 << 20;
/// Trim / write-zeroes requests are split at this many bytes.
const MAX_RANGE: u64 = 1 << 30;
/// Back-off never waits longer than this between attempts.
const MAX_BACKOFF_MS: u64 = 10_000;

/// What `bdev_nbd_create` was given (defaults filled in).
#[derive(Debug, Clone)]
pub struct ClientOpts {
    pub name: String,
    pub uri: String,
    pub target: NbdUri,
    pub read_only: bool,
    pub connections: u32,
    pub block_size: u32,
    pub connect_timeout_ms: u64,
    pub io_timeout_ms: u64,
    pub reconnect_delay_ms: u64,
    pub fast_io_fail_timeout_ms: u64,
}

/// State every reactor reads.
pub struct Shared {
    id: u64,
    pub opts: ClientOpts,
    pub neg: Negotiated,
    nconns: usize,
    read_only: bool,
    deleted: AtomicBool,
    rr: AtomicUsize,
    connected: AtomicU32,
}

impl Shared {
    fn bs(&self) -> u64 {
        self.opts.block_size as u64
    }
    fn reactor_of(&self, i: usize) -> u32 {
        (i as u32) % reactor::num_reactors().max(1)
    }
    /// A connection on this reactor if any (round-robin among them),
    /// otherwise any.
    fn pick(&self) -> usize {
        let n = self.nconns;
        let rr = self.rr.fetch_add(1, Ordering::Relaxed);
        let nr = reactor::num_reactors().max(1) as usize;
        if let Some(cur) = reactor::current() {
            let cur = cur as usize;
            if cur < n {
                // Connections on this reactor: cur, cur + nr, ...
                let local = (n - cur).div_ceil(nr);
                return cur + (rr % local) * nr;
            }
        }
        rr % n
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Trim,
    Zeroes,
    Status,
}

/// One bdev I/O on its way to a connection (Send: it may cross reactors).
struct Req {
    kind: Kind,
    offset: u64,
    len: u64,
    buf: Option<DmaBuf>,
    fua: bool,
    origin: u32,
    token: u64,
}

// ---------------------------------------------------------------------------
// Origin side: the bdev I/O waits here for its reply.

enum Waiter {
    Io(Box<BdevIo>),
    Status(BlockStatusCb),
}

thread_local! {
    static PENDING: RefCell<HashMap<u64, Waiter>> = RefCell::new(HashMap::new());
    static NEXT_TOKEN: Cell<u64> = const { Cell::new(1) };
    static CONNS: RefCell<HashMap<(u64, usize), ConnRc>> = RefCell::new(HashMap::new());
}

fn park(w: Waiter) -> u64 {
    let t = NEXT_TOKEN.with(|n| {
        let t = n.get();
        n.set(t + 1);
        t
    });
    PENDING.with(|p| p.borrow_mut().insert(t, w));
    t
}

fn finish(token: u64, st: IoStatus, buf: Option<DmaBuf>, ext: Vec<BlockExtent>) {
    let w = PENDING.with(|p| p.borrow_mut().remove(&token));
    match w {
        Some(Waiter::Io(mut io)) => {
            if buf.is_some() {
                io.buf = buf;
            }
            io.complete(st);
        }
        Some(Waiter::Status(cb)) => cb(if st.is_success() && !ext.is_empty() {
            Ok(ext)
        } else {
            Err(if st.is_success() {
                IoStatus::Failed
            } else {
                st
            })
        }),
        None => {}
    }
}

fn reply(req: Req, st: IoStatus, ext: Vec<BlockExtent>) {
    let Req {
        origin, token, buf, ..
    } = req;
    send_to(origin, move || finish(token, st, buf, ext));
}

/// Run `f` on reactor `r`: by message, or deferred when `r` is this one
/// (never inside the caller).
fn send_to(r: u32, f: impl FnOnce() + Send + 'static) {
    if reactor::current() == Some(r) {
        reactor::defer(f);
    } else {
        reactor::send(r, f);
    }
}

fn dispatch(sh: &Arc<Shared>, req: Req) {
    let i = sh.pick();
    let (id, r) = (sh.id, sh.reactor_of(i));
    send_to(r, move || conn_submit(id, i, req));
}

// ---------------------------------------------------------------------------
// The bdev

pub struct NbdBdev {
    sh: Arc<Shared>,
}

struct NbdChannel {
    sh: Arc<Shared>,
}

impl ChannelOps for NbdChannel {
    fn submit(&self, mut io: Box<BdevIo>) {
        let sh = &self.sh;
        let kind = match io.io_type {
            IoType::Read => Kind::Read,
            IoType::Write => Kind::Write,
            IoType::Unmap => Kind::Trim,
            IoType::WriteZeroes => Kind::Zeroes,
            IoType::Flush if sh.neg.flag(TF_SEND_FLUSH) => Kind::Flush,
            // The server keeps no cache it would flush for us.
            IoType::Flush | IoType::Reset => {
                io.complete(IoStatus::Success);
                return;
            }
        };
        let bs = sh.bs();
        let req = Req {
            kind,
            offset: io.offset_blocks * bs,
            len: io.num_blocks * bs,
            buf: io.buf.take(),
            fua: io.fua,
            origin: reactor::current().unwrap_or(0),
            token: 0,
        };
        let token = park(Waiter::Io(io));
        dispatch(sh, Req { token, ..req });
    }

    fn block_status(&self, offset_blocks: u64, num_blocks: u64, cb: BlockStatusCb) {
        let sh = &self.sh;
        if sh.neg.meta_context.is_none() {
            reactor::defer(move || cb(Ok(vec![BlockExtent::data(num_blocks)])));
            return;
        }
        let bs = sh.bs();
        // One request; the caller asks again for what it did not cover.
        let max = (u32::MAX as u64 / bs) * bs;
        let req = Req {
            kind: Kind::Status,
            offset: offset_blocks * bs,
            len: (num_blocks * bs).min(max),
            buf: None,
            fua: false,
            origin: reactor::current().unwrap_or(0),
            token: park(Waiter::Status(cb)),
        };
        dispatch(sh, req);
    }
}

fn flag_names(f: u16) -> Vec<&'static str> {
    [
        (TF_READ_ONLY, "read_only"),
        (TF_SEND_FLUSH, "flush"),
        (TF_SEND_FUA, "fua"),
        (TF_ROTATIONAL, "rotational"),
        (TF_SEND_TRIM, "trim"),
        (TF_SEND_WRITE_ZEROES, "write_zeroes"),
        (TF_SEND_DF, "df"),
        (TF_CAN_MULTI_CONN, "multi_conn"),
    ]
    .iter()
    .filter(|(b, _)| f & b != 0)
    .map(|(_, n)| *n)
    .collect()
}

/// The `bdev_nbd_create` call that re-creates a client.
pub fn config_json(o: &ClientOpts) -> Value {
    json!({
        "method": "bdev_nbd_create",
        "params": {
            "name": o.name,
            "uri": o.uri,
            "read_only": o.read_only,
            "connections": o.connections,
            "block_size": o.block_size,
            "connect_timeout_ms": o.connect_timeout_ms,
            "io_timeout_ms": o.io_timeout_ms,
            "reconnect_delay_ms": o.reconnect_delay_ms,
            "fast_io_fail_timeout_ms": o.fast_io_fail_timeout_ms,
        }
    })
}

impl BdevOps for NbdBdev {
    fn module_name(&self) -> &'static str {
        MODULE_NAME
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        let (sh, rw) = (&self.sh, !self.sh.read_only);
        match t {
            IoType::Read => true,
            IoType::Write | IoType::Flush => rw,
            IoType::Unmap => rw && sh.neg.flag(TF_SEND_TRIM),
            IoType::WriteZeroes => rw && sh.neg.flag(TF_SEND_WRITE_ZEROES),
            IoType::Reset => false,
        }
    }

    fn has_block_status(&self) -> bool {
        self.sh.neg.meta_context.is_some()
    }

    fn create_channel(&self, _b: &Arc<Bdev>) -> Box<dyn ChannelOps> {
        Box::new(NbdChannel {
            sh: self.sh.clone(),
        })
    }

    fn dump_info_json(&self, _b: &Bdev) -> Value {
        let sh = &self.sh;
        let (ep, socket) = match &sh.opts.target.endpoint {
            Endpoint::Tcp { .. } => (sh.opts.target.endpoint.to_string(), None),
            Endpoint::Unix(p) => ("unix".to_string(), Some(p.display().to_string())),
        };
        json!({
            "nbd": {
                "uri": sh.opts.uri,
                "export": sh.opts.target.export,
                "address": ep,
                "socket": socket,
                "size": sh.neg.info.size,
                "transmission_flags": flag_names(sh.neg.info.flags),
                "structured_replies": sh.neg.structured,
                "block_status": sh.neg.meta_context.is_some(),
                "max_payload": sh.neg.max_payload(),
                "read_only": sh.read_only,
                "connections": sh.nconns,
                "connected": sh.connected.load(Ordering::Relaxed),
                "io_timeout_ms": sh.opts.io_timeout_ms,
                "reconnect_delay_ms": sh.opts.reconnect_delay_ms,
                "fast_io_fail_timeout_ms": sh.opts.fast_io_fail_timeout_ms,
            }
        })
    }

    fn write_config_json(&self, _b: &Bdev) -> Option<Value> {
        Some(config_json(&self.sh.opts))
    }

    fn destruct(&self, _b: &Arc<Bdev>) -> bdev::BoxFuture {
        let sh = self.sh.clone();
        Box::pin(async move { stop_all(&sh).await })
    }
}

async fn stop_all(sh: &Arc<Shared>) {
    sh.deleted.store(true, Ordering::Release);
    for i in 0..sh.nconns {
        let id = sh.id;
        call_on(sh.reactor_of(i), move || conn_delete(id, i)).await;
    }
    tracing::info!(bdev = %sh.opts.name, "NBD client stopped");
}

// ---------------------------------------------------------------------------
// Connections

struct Active {
    req: Req,
    parts: u32,
    status: IoStatus,
    ext: Vec<BlockExtent>,
    /// FUA without server support: a flush follows the write.
    flush_after: bool,
}

struct Cmd {
    req: u64,
    ty: u16,
    offset: u64,
    len: u32,
    sent_ns: u64,
    failed: bool,
}

struct Conn {
    sh: Arc<Shared>,
    idx: usize,
    sock: Option<Rc<Sock>>,
    /// Bumped at every connect and teardown; stale tasks notice it.
    session: u64,
    reqs: HashMap<u64, Active>,
    next_req: u64,
    cmds: HashMap<u64, Cmd>,
    next_cookie: u64,
    tx: Vec<u8>,
    tx_waker: Option<Waker>,
    waiting: VecDeque<Req>,
    fail_fast: bool,
    deleted: bool,
    _timeout: Option<Poller>,
}

type ConnRc = Rc<RefCell<Conn>>;

fn conn(id: u64, i: usize) -> Option<ConnRc> {
    CONNS.with(|c| c.borrow().get(&(id, i)).cloned())
}

fn conn_submit(id: u64, i: usize, req: Req) {
    let Some(rc) = conn(id, i) else {
        return reply(req, IoStatus::Failed, Vec::new());
    };
    let mut c = rc.borrow_mut();
    if c.deleted || (c.sock.is_none() && c.fail_fast) {
        drop(c);
        return reply(req, IoStatus::Failed, Vec::new());
    }
    if c.sock.is_none() {
        c.waiting.push_back(req);
        return;
    }
    c.issue(req);
}

impl Conn {
    fn up(&self) -> bool {
        self.sock.is_some()
    }

    fn push_cmd(&mut self, rid: u64, ty: u16, flags: u16, offset: u64, len: u32) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let r = proto::Request {
            flags,
            ty,
            cookie,
            offset,
            length: len,
        };
        self.tx.extend_from_slice(&r.encode());
        self.cmds.insert(
            cookie,
            Cmd {
                req: rid,
                ty,
                offset,
                len,
                sent_ns: reactor::now_ns(),
                failed: false,
            },
        );
        cookie
    }

    /// Turn a request into NBD commands (split as the server needs).
    fn issue(&mut self, req: Req) {
        let rid = self.next_req;
        self.next_req += 1;
        let neg = self.sh.neg;
        let bs = self.sh.bs();
        let server_fua = neg.flag(TF_SEND_FUA);
        let fua_flag = if req.fua && server_fua {
            CMD_FLAG_FUA
        } else {
            0
        };
        let flush_after = req.fua && !server_fua && neg.flag(TF_SEND_FLUSH);
        let mut parts = 0u32;
        match req.kind {
            Kind::Read | Kind::Write => {
                let chunk = ((neg.max_payload() as u64 / bs) * bs).max(bs);
                let mut at = 0u64;
                while at < req.len {
                    let n = chunk.min(req.len - at);
                    let ty = if req.kind == Kind::Read {
                        CMD_READ
                    } else {
                        CMD_WRITE
                    };
                    let fl = if ty == CMD_WRITE { fua_flag } else { 0 };
                    self.push_cmd(rid, ty, fl, req.offset + at, n as u32);
                    if ty == CMD_WRITE {
                        if let Some(b) = req.buf.as_ref() {
                            self.tx
                                .extend_from_slice(&b.as_slice()[at as usize..(at + n) as usize]);
                        }
                    }
                    at += n;
                    parts += 1;
                }
            }
            Kind::Trim | Kind::Zeroes => {
                let ty = if req.kind == Kind::Trim {
                    CMD_TRIM
                } else {
                    CMD_WRITE_ZEROES
                };
                let mut at = 0u64;
                while at < req.len {
                    let n = MAX_RANGE.min(req.len - at);
                    self.push_cmd(rid, ty, fua_flag, req.offset + at, n as u32);
                    at += n;
                    parts += 1;
                }
            }
            Kind::Flush => {
                self.push_cmd(rid, CMD_FLUSH, 0, 0, 0);
                parts = 1;
            }
            Kind::Status => {
                self.push_cmd(rid, CMD_BLOCK_STATUS, 0, req.offset, req.len as u32);
                parts = 1;
            }
        }
        self.reqs.insert(
            rid,
            Active {
                req,
                parts,
                status: IoStatus::Success,
                ext: Vec::new(),
                flush_after: flush_after && parts > 0,
            },
        );
        if parts == 0 {
            self.part_done(rid, IoStatus::Success);
        }
        self.wake_tx();
    }

    fn wake_tx(&mut self) {
        if let Some(w) = self.tx_waker.take() {
            w.wake();
        }
    }

    fn part_done(&mut self, rid: u64, st: IoStatus) {
        let Some(a) = self.reqs.get_mut(&rid) else {
            return;
        };
        a.parts = a.parts.saturating_sub(1);
        if !st.is_success() {
            a.status = IoStatus::Failed;
        }
        if a.parts > 0 {
            return;
        }
        if a.flush_after && a.status.is_success() {
            a.flush_after = false;
            a.parts = 1;
            self.push_cmd(rid, CMD_FLUSH, 0, 0, 0);
            self.wake_tx();
            return;
        }
        if let Some(a) = self.reqs.remove(&rid) {
            reply(a.req, a.status, a.ext);
        }
    }

    fn cmd_done(&mut self, cookie: u64) {
        if let Some(c) = self.cmds.remove(&cookie) {
            let st = if c.failed {
                IoStatus::Failed
            } else {
                IoStatus::Success
            };
            self.part_done(c.req, st);
        }
    }

    /// The connection is gone: its requests wait for the next one (they are
    /// sent again whole) or fail once fast-fail applies.
    fn teardown(&mut self, why: &str) {
        if let Some(s) = self.sock.take() {
            s.shutdown();
            self.sh.connected.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(bdev = %self.sh.opts.name, conn = self.idx, reason = why, "NBD connection lost; reconnecting");
        }
        self.session += 1;
        self.wake_tx();
        self.tx.clear();
        self.cmds.clear();
        let mut reqs: Vec<(u64, Active)> = self.reqs.drain().collect();
        reqs.sort_by_key(|(id, _)| *id);
        for (_, a) in reqs.into_iter().rev() {
            self.waiting.push_front(a.req);
        }
        if self.deleted || self.fail_fast {
            self.fail_waiting();
        }
    }

    fn fail_waiting(&mut self) {
        for r in self.waiting.drain(..) {
            reply(r, IoStatus::Failed, Vec::new());
        }
    }
}

/// Block-status extents (bytes, from the request's offset) as whole
/// blocks: a block is a hole or zero only if all of it is.
pub fn to_block_extents(extents: &[(u32, u32)], bs: u64, max_len: u64) -> Vec<BlockExtent> {
    let mut out: Vec<BlockExtent> = Vec::new();
    let mut push = |n: u64, f: u32| {
        let e = BlockExtent {
            num_blocks: n,
            hole: f & STATE_HOLE != 0,
            zero: f & STATE_ZERO != 0,
        };
        match out.last_mut() {
            Some(l) if l.hole == e.hole && l.zero == e.zero => l.num_blocks += n,
            _ => out.push(e),
        }
    };
    let (mut pos, mut partial, mut acc) = (0u64, 0u64, 0u32);
    for &(len, flags) in extents {
        let mut len = (len as u64).min(max_len.saturating_sub(pos));
        if len == 0 {
            continue;
        }
        pos += len;
        if partial > 0 {
            let take = (bs - partial).min(len);
            acc &= flags;
            partial += take;
            len -= take;
            if partial == bs {
                push(1, acc);
                partial = 0;
            }
        }
        let whole = len / bs;
        if whole > 0 {
            push(whole, flags);
            len -= whole * bs;
        }
        if len > 0 {
            partial = len;
            acc = flags;
        }
    }
    out
}

fn protocol(e: impl std::fmt::Display) -> String {
    format!("protocol error: {e}")
}

/// Where in the request's buffer the server's bytes for `cmd` go.
fn data_range(
    c: &Cmd,
    req_offset: u64,
    off: u64,
    len: u64,
) -> Result<std::ops::Range<usize>, String> {
    if c.ty != CMD_READ || off < c.offset || off + len > c.offset + c.len as u64 {
        return Err(protocol(format!(
            "data for {off}+{len} outside the request {}+{}",
            c.offset, c.len
        )));
    }
    let at = (off - req_offset) as usize;
    Ok(at..at + len as usize)
}

/// Read `range` of the request's buffer straight from the socket.
async fn read_into(
    rc: &ConnRc,
    sock: &Sock,
    rid: u64,
    range: std::ops::Range<usize>,
) -> Result<(), String> {
    let buf = rc
        .borrow_mut()
        .reqs
        .get_mut(&rid)
        .and_then(|a| a.req.buf.take());
    let Some(mut buf) = buf else {
        // Nowhere to put it (cannot happen for a read): drain it.
        let mut sink = vec![0u8; range.len()];
        return sock.read_exact(&mut sink).await.map_err(|e| e.to_string());
    };
    let r = match buf.as_mut_slice().get_mut(range) {
        Some(dst) => sock.read_exact(dst).await.map_err(|e| e.to_string()),
        None => Err(protocol("read reply larger than the buffer")),
    };
    if let Some(a) = rc.borrow_mut().reqs.get_mut(&rid) {
        a.req.buf = Some(buf);
    }
    r
}

async fn reader(rc: &ConnRc, sock: &Sock) -> Result<(), String> {
    let (ctx, structured, bs) = {
        let c = rc.borrow();
        (c.sh.neg.meta_context, c.sh.neg.structured, c.sh.bs())
    };
    loop {
        let mut h = [0u8; STRUCTURED_REPLY_LEN];
        sock.read_exact(&mut h[..4])
            .await
            .map_err(|e| e.to_string())?;
        let hl =
            reply_header_len(u32::from_be_bytes([h[0], h[1], h[2], h[3]])).map_err(protocol)?;
        sock.read_exact(&mut h[4..hl])
            .await
            .map_err(|e| e.to_string())?;
        let hdr = decode_reply_header(&h[..hl]).map_err(protocol)?;
        let cookie = match hdr {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Structured { cookie, .. } => cookie,
        };
        let (rid, ty, offset, len, req_off) = {
            let c = rc.borrow();
            let cmd = c
                .cmds
                .get(&cookie)
                .ok_or_else(|| protocol(format!("reply for unknown cookie {cookie:#x}")))?;
            let ro = c.reqs.get(&cmd.req).map_or(0, |a| a.req.offset);
            (cmd.req, cmd.ty, cmd.offset, cmd.len, ro)
        };
        match hdr {
            ReplyHeader::Simple { error, .. } => {
                if error == 0 && ty == CMD_READ {
                    if structured {
                        return Err(protocol(
                            "simple reply with data after structured replies were agreed",
                        ));
                    }
                    let r = (offset - req_off) as usize..(offset - req_off + len as u64) as usize;
                    read_into(rc, sock, rid, r).await?;
                }
                let mut c = rc.borrow_mut();
                if error != 0 {
                    tracing::debug!(cookie, error, "NBD request failed");
                    if let Some(cmd) = c.cmds.get_mut(&cookie) {
                        cmd.failed = true;
                    }
                }
                c.cmd_done(cookie);
            }
            ReplyHeader::Structured {
                flags,
                ty: cty,
                length,
                ..
            } => {
                if !structured {
                    return Err(protocol("structured reply that was not negotiated"));
                }
                if cty == REPLY_TYPE_OFFSET_DATA {
                    if length < 9 {
                        return Err(protocol("NBD_REPLY_TYPE_OFFSET_DATA without data"));
                    }
                    let mut o = [0u8; 8];
                    sock.read_exact(&mut o).await.map_err(|e| e.to_string())?;
                    let off = u64::from_be_bytes(o);
                    let range = {
                        let c = rc.borrow();
                        let cmd = c
                            .cmds
                            .get(&cookie)
                            .ok_or_else(|| protocol("cookie vanished"))?;
                        data_range(cmd, req_off, off, length as u64 - 8)?
                    };
                    read_into(rc, sock, rid, range).await?;
                } else {
                    if length > MAX_CHUNK {
                        return Err(protocol(format!("reply chunk of {length} bytes")));
                    }
                    let mut d = vec![0u8; length as usize];
                    sock.read_exact(&mut d).await.map_err(|e| e.to_string())?;
                    let chunk = decode_chunk(cty, &d).map_err(protocol)?;
                    let mut c = rc.borrow_mut();
                    match chunk {
                        Chunk::None => {}
                        Chunk::Hole {
                            offset: off,
                            length,
                        } => {
                            let range = {
                                let cmd = c
                                    .cmds
                                    .get(&cookie)
                                    .ok_or_else(|| protocol("cookie vanished"))?;
                                data_range(cmd, req_off, off, length as u64)?
                            };
                            if let Some(b) = c.reqs.get_mut(&rid).and_then(|a| a.req.buf.as_mut()) {
                                if let Some(s) = b.as_mut_slice().get_mut(range) {
                                    s.fill(0);
                                }
                            }
                        }
                        Chunk::BlockStatus { context, extents } => {
                            if ty != CMD_BLOCK_STATUS {
                                return Err(protocol("block status reply to another command"));
                            }
                            if Some(context) == ctx {
                                if let Some(a) = c.reqs.get_mut(&rid) {
                                    a.ext = to_block_extents(&extents, bs, len as u64);
                                    if a.ext.is_empty() {
                                        // Less than a block described: call it data.
                                        a.ext.push(BlockExtent::data(1));
                                    }
                                }
                            }
                        }
                        Chunk::Error { error, message, .. } => {
                            tracing::debug!(cookie, error, %message, "NBD request failed");
                            if let Some(cmd) = c.cmds.get_mut(&cookie) {
                                cmd.failed = true;
                            }
                        }
                    }
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    let mut c = rc.borrow_mut();
                    if ty == CMD_BLOCK_STATUS {
                        let no_ext = c.reqs.get(&rid).is_some_and(|a| a.ext.is_empty());
                        if no_ext {
                            if let Some(cmd) = c.cmds.get_mut(&cookie) {
                                cmd.failed = true;
                            }
                        }
                    }
                    c.cmd_done(cookie);
                }
            }
        }
    }
}

async fn writer(rc: ConnRc, sock: Rc<Sock>, session: u64) {
    loop {
        let data = std::future::poll_fn(|cx| {
            let mut c = rc.borrow_mut();
            if c.session != session {
                return Poll::Ready(None);
            }
            if c.tx.is_empty() {
                c.tx_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(Some(std::mem::take(&mut c.tx)))
        })
        .await;
        let Some(data) = data else { return };
        if let Err(e) = sock.write_all(&data).await {
            tracing::debug!(error = %e, "NBD send failed");
            sock.shutdown();
            return;
        }
    }
}

/// Connect and run the handshake within the connect timeout.
pub async fn connect_once(o: &ClientOpts) -> Result<(Sock, Negotiated), String> {
    let t = Duration::from_millis(o.connect_timeout_ms);
    let fut = async {
        let s = Sock::connect(&o.target.endpoint, t).await?;
        let n = handshake(&s, &o.target.export).await?;
        Ok::<_, String>((s, n))
    };
    match with_timeout(t, fut).await {
        Some(r) => r,
        None => Err(format!(
            "no NBD handshake with {} within {} ms",
            o.target.endpoint, o.connect_timeout_ms
        )),
    }
}

fn start_session(rc: &ConnRc, sock: Rc<Sock>) -> u64 {
    let mut c = rc.borrow_mut();
    c.session += 1;
    c.sock = Some(sock.clone());
    c.fail_fast = false;
    c.sh.connected.fetch_add(1, Ordering::Relaxed);
    let waiting: Vec<Req> = c.waiting.drain(..).collect();
    for r in waiting {
        c.issue(r);
    }
    let s = c.session;
    drop(c);
    reactor::spawn_local(writer(rc.clone(), sock, s));
    s
}

async fn conn_main(rc: ConnRc, first: Option<(Sock, Negotiated)>) {
    let (sh, idx) = {
        let c = rc.borrow();
        (c.sh.clone(), c.idx)
    };
    let base = sh.opts.reconnect_delay_ms.max(1);
    let mut delay = base;
    let mut first = first;
    let mut sessions = 0u64;
    loop {
        if rc.borrow().deleted {
            return;
        }
        let got = match first.take() {
            Some(x) => Ok(x),
            None => connect_once(&sh.opts).await,
        };
        let got = got.and_then(|(s, n)| {
            if n.info.size != sh.neg.info.size
                || (n.info.flags & TF_READ_ONLY) > (sh.neg.info.flags & TF_READ_ONLY)
            {
                Err(format!(
                    "the export changed across the reconnect (size {} -> {}, flags {:#x} -> {:#x})",
                    sh.neg.info.size, n.info.size, sh.neg.info.flags, n.info.flags
                ))
            } else {
                Ok((s, n))
            }
        });
        match got {
            Ok((sock, _)) => {
                if rc.borrow().deleted {
                    sock.shutdown();
                    return;
                }
                let sock = Rc::new(sock);
                if sessions > 0 {
                    tracing::info!(bdev = %sh.opts.name, conn = idx, "NBD connection re-established");
                }
                sessions += 1;
                start_session(&rc, sock.clone());
                let r = reader(&rc, &sock).await;
                let why = r.err().unwrap_or_default();
                rc.borrow_mut().teardown(&why);
                delay = base;
            }
            Err(e) => {
                tracing::warn!(bdev = %sh.opts.name, conn = idx, error = %e, "NBD reconnect failed");
            }
        }
        if rc.borrow().deleted {
            return;
        }
        reactor::sleep(Duration::from_millis(delay)).await;
        delay = (delay * 2).min(MAX_BACKOFF_MS.max(base));
    }
}

/// Checks for requests unanswered too long, and applies fast-fail to
/// requests waiting for a reconnect.
fn watchdog(w: &std::rc::Weak<RefCell<Conn>>, down_since: &Cell<Option<u64>>) {
    let Some(rc) = w.upgrade() else { return };
    let mut c = rc.borrow_mut();
    let now = reactor::now_ns();
    if c.up() {
        down_since.set(None);
        let limit = c.sh.opts.io_timeout_ms * 1_000_000;
        let stale = limit > 0
            && c.cmds
                .values()
                .any(|m| now.saturating_sub(m.sent_ns) > limit);
        if stale {
            tracing::warn!(bdev = %c.sh.opts.name, conn = c.idx, "NBD request unanswered for {} ms", c.sh.opts.io_timeout_ms);
            if let Some(s) = c.sock.as_ref() {
                s.shutdown();
            }
        }
    } else {
        let since = *down_since.get().get_or_insert(now);
        down_since.set(Some(since));
        let ff = c.sh.opts.fast_io_fail_timeout_ms * 1_000_000;
        if !c.fail_fast && now.saturating_sub(since) >= ff {
            tracing::warn!(bdev = %c.sh.opts.name, conn = c.idx, "fast_io_fail_timeout_ms ({}) expired: failing I/O until reconnected", c.sh.opts.fast_io_fail_timeout_ms);
            c.fail_fast = true;
            c.fail_waiting();
        }
    }
}

fn conn_start(sh: Arc<Shared>, idx: usize, fd: OwnedFd, neg: Negotiated) {
    let rc = Rc::new(RefCell::new(Conn {
        sh: sh.clone(),
        idx,
        sock: None,
        session: 0,
        reqs: HashMap::new(),
        next_req: 1,
        cmds: HashMap::new(),
        next_cookie: 1,
        tx: Vec::new(),
        tx_waker: None,
        waiting: VecDeque::new(),
        fail_fast: false,
        deleted: false,
        _timeout: None,
    }));
    let w = Rc::downgrade(&rc);
    let down = Cell::new(None);
    let p = reactor::poller_register(Duration::from_millis(100), move || {
        watchdog(&w, &down);
        reactor::PollStatus::Idle
    });
    rc.borrow_mut()._timeout = Some(p);
    CONNS.with(|c| c.borrow_mut().insert((sh.id, idx), rc.clone()));
    reactor::spawn_local(conn_main(rc, Some((Sock::from_fd(fd), neg))));
}

fn conn_delete(id: u64, idx: usize) {
    let Some(rc) = CONNS.with(|c| c.borrow_mut().remove(&(id, idx))) else {
        return;
    };
    let mut c = rc.borrow_mut();
    c.deleted = true;
    c._timeout = None;
    if let Some(s) = c.sock.as_ref() {
        s.shutdown();
    }
    // Whatever is in flight fails now; the reader's teardown finds nothing.
    let reqs: Vec<Active> = c.reqs.drain().map(|(_, a)| a).collect();
    c.cmds.clear();
    for a in reqs {
        reply(a.req, IoStatus::Failed, Vec::new());
    }
    c.fail_waiting();
}

static NEXT_ID: AtomicU32 = AtomicU32::new(1);

/// `bdev_nbd_create`: connect (every connection), register the bdev.
pub async fn create(o: ClientOpts) -> Result<String, NbdError> {
    if bdev::get(&o.name).is_some() {
        return Err(NbdError::Exists(format!(
            "bdev name '{}' already exists",
            o.name
        )));
    }
    let (s0, neg) = connect_once(&o)
        .await
        .map_err(|e| NbdError::Io(format!("{}: {e}", o.uri)))?;
    let bs = o.block_size as u64;
    if neg.min_block() as u64 > bs {
        return Err(NbdError::Invalid(format!(
            "the export's minimum block size {} is larger than block_size {bs}",
            neg.min_block()
        )));
    }
    if neg.info.size < bs {
        return Err(NbdError::Invalid(format!(
            "the export is {} bytes, less than one block of {bs}",
            neg.info.size
        )));
    }
    if neg.info.size % bs != 0 {
        tracing::warn!(bdev = %o.name, size = neg.info.size, bs, "export size is not a multiple of the block size: the tail is not accessible");
    }
    let mut nconns = o.connections.max(1) as usize;
    if nconns > 1 && !neg.flag(TF_CAN_MULTI_CONN) {
        tracing::warn!(bdev = %o.name, asked = nconns, "the server does not offer multi-conn: using one connection");
        nconns = 1;
    }
    let mut socks = vec![(s0, neg)];
    for _ in 1..nconns {
        let x = connect_once(&o)
            .await
            .map_err(|e| NbdError::Io(format!("{}: extra connection: {e}", o.uri)))?;
        socks.push(x);
    }
    let read_only = o.read_only || neg.flag(TF_READ_ONLY);
    let sh = Arc::new(Shared {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed) as u64,
        opts: o.clone(),
        neg,
        nconns,
        read_only,
        deleted: AtomicBool::new(false),
        rr: AtomicUsize::new(0),
        connected: AtomicU32::new(0),
    });
    for (i, (s, n)) in socks.into_iter().enumerate() {
        let fd = s.into_fd();
        let sh2 = sh.clone();
        call_on(sh.reactor_of(i), move || conn_start(sh2, i, fd, n)).await;
    }
    let reg = BdevBuilder::new(o.name.clone(), PRODUCT_NAME)
        .block_size(o.block_size)
        .num_blocks(neg.info.size / bs)
        .write_cache(neg.flag(TF_SEND_FLUSH) && !read_only)
        .optimal_io_boundary(0)
        .register(NbdBdev { sh: sh.clone() });
    match reg {
        Ok(b) => {
            tracing::info!(bdev = %b.name(), uri = %o.uri, size = neg.info.size, flags = ?flag_names(neg.info.flags), connections = nconns, structured = neg.structured, block_status = neg.meta_context.is_some(), "NBD bdev created");
            Ok(b.name().to_string())
        }
        Err(e) => {
            stop_all(&sh).await;
            Err(NbdError::Bdev(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_extents_round_to_blocks() {
        // 512-byte blocks: 1024 hole, 256 data + 256 hole (a data block),
        // 512 zero.
        let e = to_block_extents(
            &[
                (1024, STATE_HOLE | STATE_ZERO),
                (256, 0),
                (256, STATE_HOLE),
                (512, STATE_ZERO),
            ],
            512,
            u64::MAX,
        );
        assert_eq!(
            e,
            vec![
                BlockExtent::hole(2),
                BlockExtent::data(1),
                BlockExtent {
                    num_blocks: 1,
                    hole: false,
                    zero: true
                }
            ]
        );
        // Clipped to the asked length; a trailing partial block is left out.
        let e = to_block_extents(&[(4096, STATE_HOLE | STATE_ZERO)], 512, 1024);
        assert_eq!(e, vec![BlockExtent::hole(2)]);
        let e = to_block_extents(&[(700, 0)], 512, u64::MAX);
        assert_eq!(e, vec![BlockExtent::data(1)]);
        // Two partial holes that make a whole block stay a hole.
        let e = to_block_extents(&[(256, 3), (256, 3), (100, 0)], 512, u64::MAX);
        assert_eq!(e, vec![BlockExtent::hole(1)]);
        assert!(to_block_extents(&[], 512, 4096).is_empty());
    }
}
