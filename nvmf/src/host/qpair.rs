//! One NVMe/TCP queue pair (one TCP connection) of the host, owned by the
//! reactor that connected it.
//!
//! * Commands get a CID from a fixed table of request slots; bdev I/O wait
//!   in a queue when every slot is busy, and are split at the controller's
//!   transfer limit. Nothing is allocated per I/O in steady state: the slot
//!   and parent tables, the transmit and receive buffers are reused.
//! * The poller flushes the transmit buffer, then reads and decodes PDUs
//!   incrementally (header, data straight into the I/O buffer, digest).
//! * Anything malformed from the target (bad type, lengths, CID, offsets,
//!   digests, short data) fails the connection with a log saying what was
//!   wrong; an H2CTermReq goes out first where the spec asks for one.
//!   Outstanding I/O is handed to the owner (`on_fail`), which retries or
//!   fails it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::Waker;
use std::time::Duration;

use bdev::{BdevIo, IoStatus, IoType};
use reactor::{PollStatus, Poller};

use super::sock::{Sock, Xfer};
use super::wire;
use super::HostError;
use crate::pdu::off;
use crate::pdu::{
    parse_body, Accept, CommonHeader, DataHdr, Decoder, DecoderConfig, Encoder, Fes, Pdu, PduType,
    R2t, CH_LEN, TERM_MAX_DATA,
};
use crate::spec::{self, ConnectCmd, ConnectData, Cqe, Sgl, Sqe};
use reactor::with_timeout;

const NONE: u32 = u32::MAX;
const RX_BUF: usize = 128 * 1024;
/// Receive straight into the I/O buffer when at least this much payload is
/// still to come and nothing is buffered.
const DIRECT_RX: usize = 16 * 1024;
/// In-capsule data the hosts always allow on the admin queue and for
/// fabrics commands (nvme-tcp.md §2.6).
const ADMIN_ICD_MAX: usize = 8192;

/// Static parameters of a queue pair.
#[derive(Clone, Debug)]
pub struct QpParams {
    pub qid: u16,
    /// Queue entries (SQSIZE + 1); at most `depth - 1` commands outstanding.
    pub depth: u16,
    pub hdgst: bool,
    pub ddgst: bool,
    /// Keep-alive timeout for the admin Connect (ms).
    pub kato_ms: u32,
    pub hostid: [u8; 16],
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
    /// Largest write sent in-capsule on an I/O queue (IOCCSZ*16 - 64).
    pub icd_max: usize,
    /// Largest transfer of one command, in bytes (MDTS).
    pub max_xfer: u64,
    pub connect_timeout: Duration,
}

type AdminResult = Result<(Cqe, Vec<u8>), HostError>;

#[derive(Default)]
struct AdminSlot {
    result: Option<AdminResult>,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Req {
    active: bool,
    /// Host-to-controller data (write, DSM ranges, admin data out).
    out: bool,
    /// Controller-to-host data.
    inp: bool,
    /// The data went in-capsule (no R2T expected).
    icd: bool,
    len: u32,
    /// Bytes received (reads) or sent by H2CData (writes).
    xfer: u32,
    parent: u32,
    /// Offset of this command's data in the parent's buffer.
    buf_off: usize,
    /// A DSM range (its data lives here, not in the I/O buffer).
    dsm: [u8; spec::dsm::RANGE_SIZE],
    use_dsm: bool,
    /// A data digest mismatch was seen on this command's payload.
    bad_digest: bool,
    admin: Option<Rc<RefCell<AdminSlot>>>,
    abuf: Vec<u8>,
}

struct Parent {
    io: Option<Box<BdevIo>>,
    nsid: u32,
    bs: u32,
    /// Next block to issue (relative to the I/O's first block).
    cursor: u64,
    outstanding: u32,
    status: IoStatus,
}

enum Rx {
    Hdr,
    Data(DataRx),
    Ddgst {
        cid: u16,
        crc: u32,
        last: bool,
        success: bool,
        datal: u32,
    },
}

/// The C2HData payload being received.
#[derive(Clone, Copy)]
struct DataRx {
    cid: u16,
    /// Bytes still to come, and where they go in the read's buffer.
    left: usize,
    off: usize,
    /// Data digest so far.
    crc: u32,
    last: bool,
    success: bool,
}

/// Data sent from an I/O buffer without a copy.
struct Ext {
    at: usize,
    ptr: *const u8,
    len: usize,
    cid: u16,
}

/// Payloads at least this large go out from the I/O buffer (writev).
const ZERO_COPY_MIN: usize = 4096;

enum Body {
    Resp(Cqe),
    R2t(R2t),
    Data(DataHdr),
    Other,
}

/// What one step of the receive state machine did.
enum Step {
    /// Nothing moved: wait for the socket.
    Idle,
    /// Something moved, now waiting for the socket.
    Stalled,
    /// Something moved; go on.
    Moved,
    /// The state changed without new bytes; go on.
    Next,
}

struct Inner {
    enc: Encoder,
    dec: Decoder,
    maxh2cdata: u32,
    icd_max: usize,
    max_xfer: u64,
    qid: u16,
    reqs: Vec<Req>,
    free: Vec<u16>,
    parents: Vec<Parent>,
    free_parents: Vec<u32>,
    pending: VecDeque<u32>,
    /// Bytes to send: headers and small data.
    tx: Vec<u8>,
    tx_off: usize,
    /// Large H2CData payloads that go out straight from the I/O buffers,
    /// each after the `tx` bytes before its `at`.
    ext: VecDeque<Ext>,
    /// Bytes of `ext.front()` already sent.
    ext_off: usize,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    rstate: Rx,
    /// Bytes of the current data PDU payload, for the Data→Ddgst step.
    cur_datal: u32,
    failed: Option<String>,
    done: Vec<Box<BdevIo>>,
}

/// A bdev I/O handed back by a failed queue pair, with its namespace ID and
/// block size.
pub type Returned = (Box<BdevIo>, u32, u32);

/// Hook the owner installs: gets the bdev I/O that were outstanding when the
/// connection failed or was closed, exactly once, and whether the host
/// closed it itself (`true`) rather than losing it.
pub type FailFn = Box<dyn FnOnce(Vec<Returned>, bool)>;

pub struct Qpair {
    inner: RefCell<Inner>,
    sock: Sock,
    poller: RefCell<Option<Poller>>,
    on_fail: RefCell<Option<FailFn>>,
    addr: SocketAddr,
    notified: Cell<bool>,
}

impl Qpair {
    /// Connect TCP, exchange ICReq/ICResp, start polling, then send the
    /// fabrics Connect. Returns the queue pair and the CNTLID.
    pub async fn connect(addr: SocketAddr, p: &QpParams) -> Result<(Rc<Qpair>, u16), HostError> {
        let sock = Sock::connect(addr, p.connect_timeout).await?;
        let ic = with_timeout(p.connect_timeout, icreq_exchange(&sock, p.hdgst, p.ddgst))
            .await
            .ok_or_else(|| HostError::Timeout(format!("waiting for the ICResp from {addr}")))??;
        if (p.hdgst && !ic.hdgst) || (p.ddgst && !ic.ddgst) {
            tracing::warn!(%addr, qid = p.qid, asked_hdgst = p.hdgst, asked_ddgst = p.ddgst, got_hdgst = ic.hdgst, got_ddgst = ic.ddgst, "controller did not enable every digest asked for; using what it granted");
        }
        let slots = p.depth.max(2) - 1;
        let mut reqs = Vec::with_capacity(slots as usize);
        reqs.resize_with(slots as usize, Req::default);
        let inner = Inner {
            enc: Encoder {
                hdgst: ic.hdgst,
                ddgst: ic.ddgst,
                tx_pda: ic.cpda,
            },
            dec: Decoder::new(DecoderConfig {
                accept: Accept::CtrlToHost,
                hdgst: ic.hdgst,
                ddgst: ic.ddgst,
                rx_pda: 0,
                max_icd: 0,
                max_data: u32::MAX,
            }),
            maxh2cdata: ic.maxh2cdata,
            icd_max: if p.qid == 0 { ADMIN_ICD_MAX } else { p.icd_max },
            max_xfer: p.max_xfer.max(4096),
            qid: p.qid,
            reqs,
            free: (0..slots).rev().collect(),
            parents: Vec::with_capacity(slots as usize * 2),
            free_parents: Vec::new(),
            pending: VecDeque::with_capacity(256),
            tx: Vec::with_capacity(256 * 1024),
            tx_off: 0,
            ext: VecDeque::with_capacity(slots as usize),
            ext_off: 0,
            rx: vec![0u8; RX_BUF].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            rstate: Rx::Hdr,
            cur_datal: 0,
            failed: None,
            done: Vec::with_capacity(slots as usize),
        };
        let qp = Rc::new(Qpair {
            inner: RefCell::new(inner),
            sock,
            poller: RefCell::new(None),
            on_fail: RefCell::new(None),
            addr,
            notified: Cell::new(false),
        });
        let weak = Rc::downgrade(&qp);
        *qp.poller.borrow_mut() = Some(reactor::poller_register(
            Duration::ZERO,
            move || match weak.upgrade() {
                Some(q) => q.poll(),
                None => PollStatus::Idle,
            },
        ));
        let cmd = ConnectCmd {
            recfmt: 0,
            qid: p.qid,
            sqsize: p.depth - 1,
            cattr: 0,
            kato: if p.qid == 0 { p.kato_ms } else { 0 },
        };
        let sqe = cmd.to_sqe(0);
        let data = ConnectData {
            hostid: p.hostid,
            cntlid: p.cntlid,
            subnqn: p.subnqn.clone(),
            hostnqn: p.hostnqn.clone(),
        };
        let res = with_timeout(
            p.connect_timeout,
            qp.admin(sqe, data.to_bytes().to_vec(), 0),
        )
        .await;
        let (cqe, _) = match res {
            Some(r) => r.inspect_err(|_| qp.close())?,
            None => {
                qp.close();
                return Err(HostError::Timeout(format!(
                    "waiting for the Connect response on qid {} from {addr}",
                    p.qid
                )));
            }
        };
        if !cqe.status.is_success() {
            qp.close();
            return Err(HostError::ConnectRejected {
                qid: p.qid,
                status: cqe.status,
                detail: connect_error_detail(&cqe),
            });
        }
        Ok((qp, cqe.dw0 as u16))
    }

    pub fn qid(&self) -> u16 {
        self.inner.borrow().qid
    }

    pub fn is_failed(&self) -> bool {
        self.inner.borrow().failed.is_some()
    }

    pub fn set_on_fail(&self, f: FailFn) {
        *self.on_fail.borrow_mut() = Some(f);
    }

    /// Digests in use.
    pub fn digests(&self) -> (bool, bool) {
        let i = self.inner.borrow();
        (i.enc.hdgst, i.enc.ddgst)
    }

    /// Issue one command and wait for its completion. `out` is
    /// host-to-controller data; `in_len` bytes are read back.
    pub async fn admin(&self, mut sqe: Sqe, out: Vec<u8>, in_len: usize) -> AdminResult {
        let slot = Rc::new(RefCell::new(AdminSlot::default()));
        {
            let mut i = self.inner.borrow_mut();
            if let Some(why) = &i.failed {
                return Err(HostError::Disconnected(why.clone()));
            }
            let Some(cid) = i.free.pop() else {
                return Err(HostError::Busy);
            };
            let (qid, icd_max) = (i.qid, i.icd_max);
            let r = &mut i.reqs[cid as usize];
            r.active = true;
            r.parent = NONE;
            r.use_dsm = false;
            r.bad_digest = false;
            r.xfer = 0;
            r.admin = Some(slot.clone());
            r.out = !out.is_empty();
            r.inp = in_len > 0;
            r.len = if r.out {
                out.len() as u32
            } else {
                in_len as u32
            };
            sqe.cid = cid;
            sqe.flags = 0x40;
            let fabrics = sqe.opc == spec::fabrics::OPCODE;
            let icd = r.out && (out.len() <= ADMIN_ICD_MAX && (fabrics || qid == 0));
            let icd = icd || (r.out && out.len() <= icd_max);
            let r = &mut i.reqs[cid as usize];
            r.icd = icd;
            r.abuf = if r.out { out } else { vec![0u8; in_len] };
            sqe.sgl = if icd {
                Sgl::icd(r.len)
            } else {
                Sgl::transport(r.len)
            };
            let Inner { tx, reqs, enc, .. } = &mut *i;
            let icd_data: &[u8] = if icd { &reqs[cid as usize].abuf } else { &[] };
            enc.capsule_cmd(tx, &sqe, icd_data);
        }
        self.kick();
        std::future::poll_fn(|cx| {
            let mut s = slot.borrow_mut();
            match s.result.take() {
                Some(r) => std::task::Poll::Ready(r),
                None => {
                    s.waker = Some(cx.waker().clone());
                    std::task::Poll::Pending
                }
            }
        })
        .await
    }

    /// Queue a bdev I/O on this queue pair. Gives it back when the
    /// connection has failed.
    pub fn submit_io(&self, io: Box<BdevIo>, nsid: u32, bs: u32) -> Result<(), Box<BdevIo>> {
        {
            let mut i = self.inner.borrow_mut();
            if i.failed.is_some() {
                return Err(io);
            }
            let p = Parent {
                io: Some(io),
                nsid,
                bs,
                cursor: 0,
                outstanding: 0,
                status: IoStatus::Success,
            };
            let idx = match i.free_parents.pop() {
                Some(x) => {
                    i.parents[x as usize] = p;
                    x
                }
                None => {
                    i.parents.push(p);
                    (i.parents.len() - 1) as u32
                }
            };
            i.pending.push_back(idx);
            i.pump();
        }
        Ok(())
    }

    /// Flush what is queued now rather than at the next poll (admin path).
    fn kick(&self) {
        let r = self.inner.borrow_mut().flush(&self.sock);
        if let Err(e) = r {
            self.fail(e);
        }
    }

    /// Close the connection: outstanding I/O go to `on_fail` as for a
    /// failure, admin waiters get an error.
    pub fn close(&self) {
        self.fail_quiet("queue pair closed by the host".into(), false);
    }

    fn fail(&self, why: String) {
        self.fail_quiet(why, true)
    }

    fn fail_quiet(&self, why: String, log: bool) {
        let (ios, admins) = {
            let mut i = self.inner.borrow_mut();
            if i.failed.is_some() {
                return;
            }
            if log {
                tracing::error!(addr = %self.addr, qid = i.qid, "NVMe/TCP connection failed: {why}");
            }
            // Give a queued TermReq one chance to leave.
            let _ = i.flush(&self.sock);
            i.failed = Some(why.clone());
            let mut ios = Vec::new();
            let mut admins = Vec::new();
            let Inner {
                reqs,
                parents,
                pending,
                free,
                free_parents,
                ..
            } = &mut *i;
            for (cid, r) in reqs.iter_mut().enumerate() {
                if !r.active {
                    continue;
                }
                r.active = false;
                if let Some(a) = r.admin.take() {
                    admins.push(a);
                } else if r.parent != NONE {
                    let p = &mut parents[r.parent as usize];
                    if let Some(io) = p.io.take() {
                        ios.push((io, p.nsid, p.bs));
                        free_parents.push(r.parent);
                    }
                }
                free.push(cid as u16);
            }
            for idx in pending.drain(..) {
                let p = &mut parents[idx as usize];
                if let Some(io) = p.io.take() {
                    ios.push((io, p.nsid, p.bs));
                    free_parents.push(idx);
                }
            }
            // Nothing may point into the I/O buffers once they go back.
            i.tx.clear();
            i.tx_off = 0;
            i.ext.clear();
            i.ext_off = 0;
            (ios, admins)
        };
        self.sock.close();
        self.poller.borrow_mut().take();
        for a in admins {
            let mut s = a.borrow_mut();
            s.result = Some(Err(HostError::Disconnected(why.clone())));
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        }
        if !self.notified.replace(true) {
            let cb = self.on_fail.borrow_mut().take();
            match cb {
                Some(cb) => cb(ios, !log),
                None => {
                    for (io, _, _) in ios {
                        io.complete(IoStatus::Failed);
                    }
                }
            }
        }
    }

    fn poll(&self) -> PollStatus {
        let res = {
            let mut i = self.inner.borrow_mut();
            if i.failed.is_some() {
                return PollStatus::Idle;
            }
            i.flush(&self.sock).and_then(|_| i.receive(&self.sock))
        };
        let busy = match res {
            Ok(b) => b,
            Err(e) => {
                self.fail(e);
                // What completed before the error (responses that came with
                // the FIN of a target shutting down) is no longer in flight:
                // left in `done`, it would never be called back.
                self.run_done();
                return PollStatus::Busy;
            }
        };
        self.run_done();
        if busy {
            let r = self.inner.borrow_mut().flush(&self.sock);
            if let Err(e) = r {
                self.fail(e);
            }
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    /// Call back completed bdev I/O with no borrow held (callbacks submit).
    fn run_done(&self) {
        let mut done = std::mem::take(&mut self.inner.borrow_mut().done);
        for io in done.drain(..) {
            let st = io.status;
            io.complete(st);
        }
        let mut i = self.inner.borrow_mut();
        if i.done.is_empty() {
            i.done = done;
        }
    }
}

impl Drop for Qpair {
    fn drop(&mut self) {
        self.sock.close();
    }
}

async fn icreq_exchange(sock: &Sock, hdgst: bool, ddgst: bool) -> Result<wire::Granted, HostError> {
    let req = wire::icreq(hdgst, ddgst);
    let mut sent = 0;
    while sent < req.len() {
        match sock.send(&req[sent..]) {
            Xfer::Done(n) => sent += n,
            Xfer::WouldBlock => wait(sock, libc::POLLOUT).await,
            Xfer::Closed => return Err(HostError::Io("connection closed during ICReq".into())),
            Xfer::Err(e) => return Err(HostError::Io(format!("sending ICReq: {e}"))),
        }
    }
    let mut resp = [0u8; crate::pdu::IC_LEN];
    let mut got = 0;
    while got < resp.len() {
        match sock.recv(&mut resp[got..]) {
            Xfer::Done(n) => {
                got += n;
                if got >= 10 {
                    let ch = CommonHeader::parse(&resp);
                    if ch.pdu_type == PduType::C2HTermReq as u8 {
                        return Err(HostError::Protocol(format!(
                            "controller refused the connection with a C2HTermReq: {}",
                            wire::fes_name(u16::from_le_bytes([resp[8], resp[9]]))
                        )));
                    }
                }
            }
            Xfer::WouldBlock => wait(sock, libc::POLLIN).await,
            Xfer::Closed => {
                return Err(HostError::Io(
                    "controller closed the connection before its ICResp".into(),
                ))
            }
            Xfer::Err(e) => return Err(HostError::Io(format!("receiving ICResp: {e}"))),
        }
    }
    wire::parse_icresp(&resp).map_err(HostError::Protocol)
}

async fn wait(sock: &Sock, ev: i16) {
    if reactor::is_interrupt_mode() {
        // The socket (and its fd) outlives this await.
        reactor::net::wait_fd(sock.fd(), ev as u32).await;
    } else {
        reactor::yield_now().await;
    }
}

/// Decode a Connect error's DW0 (IATTR/IPO) into words.
fn connect_error_detail(cqe: &Cqe) -> String {
    let st = cqe.status;
    if st.sct == spec::sct::COMMAND_SPECIFIC && st.sc == spec::csc::CONNECT_INVALID_PARAMETERS {
        let ipo = cqe.dw0 & 0xFFFF;
        let in_data = (cqe.dw0 >> 16) & 1 == 1;
        let field = if in_data {
            match ipo as u16 {
                spec::CONNECT_DATA_SUBNQN_OFF => "subnqn (unknown subsystem)",
                spec::CONNECT_DATA_HOSTNQN_OFF => "hostnqn",
                spec::CONNECT_DATA_CNTLID_OFF => "cntlid",
                _ => "connect data",
            }
        } else {
            "command field (qid / sqsize)"
        };
        return format!("Connect Invalid Parameters: {field}");
    }
    if st.sct == spec::sct::COMMAND_SPECIFIC && st.sc == spec::csc::CONNECT_INVALID_HOST {
        return "host not allowed to access the subsystem".into();
    }
    if st.sct == spec::sct::COMMAND_SPECIFIC && st.sc == spec::csc::CONNECT_CONTROLLER_BUSY {
        return "controller busy".into();
    }
    format!("Connect failed: {st}")
}

impl Inner {
    /// Start waiting I/O while command slots are free.
    fn pump(&mut self) {
        while let Some(&pidx) = self.pending.front() {
            if self.free.is_empty() {
                return;
            }
            let finished = self.issue_one(pidx);
            if finished {
                self.pending.pop_front();
            }
        }
    }

    /// Issue the next command of parent `pidx`; true once it has no more
    /// to issue.
    fn issue_one(&mut self, pidx: u32) -> bool {
        let cid = self.free.pop().expect("checked by pump");
        let enc = self.enc;
        let max_xfer = self.max_xfer;
        let icd_max = self.icd_max;
        let Inner {
            parents, reqs, tx, ..
        } = self;
        let p = &mut parents[pidx as usize];
        let io = p.io.as_ref().expect("pending parent holds its I/O");
        let bs = p.bs as u64;
        let total = io.num_blocks;
        let start = p.cursor;
        let (opc, n) = match io.io_type {
            IoType::Read | IoType::Write => {
                // NLB is 16 bits; keep each command's byte count within u32
                // even with 64 KiB blocks and no MDTS.
                let max_blocks = (max_xfer.min(1 << 31) / bs).clamp(1, 65536);
                let opc = if io.io_type == IoType::Read {
                    spec::nvm::READ
                } else {
                    spec::nvm::WRITE
                };
                (opc, (total - start).min(max_blocks))
            }
            IoType::WriteZeroes => (spec::nvm::WRITE_ZEROES, (total - start).min(65536)),
            IoType::Unmap => (
                spec::nvm::DATASET_MANAGEMENT,
                (total - start).min(u32::MAX as u64),
            ),
            IoType::Flush => (spec::nvm::FLUSH, total - start),
            IoType::Reset => (spec::nvm::FLUSH, 0),
        };
        let slba = io.offset_blocks + start;
        let mut sqe = Sqe {
            opc,
            flags: 0x40,
            cid,
            nsid: p.nsid,
            ..Sqe::default()
        };
        let r = &mut reqs[cid as usize];
        r.active = true;
        r.parent = pidx;
        r.admin = None;
        r.xfer = 0;
        r.use_dsm = false;
        r.bad_digest = false;
        r.buf_off = (start * bs) as usize;
        r.out = false;
        r.inp = false;
        r.icd = false;
        r.len = 0;
        match opc {
            spec::nvm::READ | spec::nvm::WRITE => {
                sqe.cdw10 = slba as u32;
                sqe.cdw11 = (slba >> 32) as u32;
                sqe.cdw12 = (n - 1) as u32;
                if opc == spec::nvm::WRITE && io.fua {
                    sqe.cdw12 |= 1 << 30;
                }
                r.len = (n * bs) as u32;
                r.out = opc == spec::nvm::WRITE;
                r.inp = !r.out;
            }
            spec::nvm::WRITE_ZEROES => {
                sqe.cdw10 = slba as u32;
                sqe.cdw11 = (slba >> 32) as u32;
                sqe.cdw12 = (n - 1) as u32;
            }
            spec::nvm::DATASET_MANAGEMENT => {
                sqe.cdw10 = spec::dsm::cdw10(1);
                sqe.cdw11 = spec::dsm::ATTR_DEALLOCATE;
                r.dsm = spec::dsm::Range {
                    attributes: 0,
                    nlb: n as u32,
                    slba,
                }
                .encode();
                r.use_dsm = true;
                r.out = true;
                r.len = spec::dsm::RANGE_SIZE as u32;
            }
            _ => {}
        }
        let icd = r.out && (r.len as usize) <= icd_max;
        r.icd = icd;
        if r.out || r.inp {
            sqe.sgl = if icd {
                Sgl::icd(r.len)
            } else {
                Sgl::transport(r.len)
            };
        } else {
            sqe.sgl = Sgl::transport(0);
        }
        let data: &[u8] = if !icd {
            &[]
        } else if r.use_dsm {
            &r.dsm
        } else {
            let buf = io.buf.as_ref().expect("write has a buffer");
            &buf.as_slice()[r.buf_off..r.buf_off + r.len as usize]
        };
        enc.capsule_cmd(tx, &sqe, data);
        p.cursor = start + n.max(1);
        p.outstanding += 1;
        p.cursor >= total
    }

    /// Send what is queued, as far as the socket takes it.
    fn flush(&mut self, sock: &Sock) -> Result<(), String> {
        loop {
            let r = if self.ext.is_empty() {
                if self.tx_off >= self.tx.len() {
                    break;
                }
                sock.send(&self.tx[self.tx_off..])
            } else {
                let mut iov = [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; 64];
                let mut k = 0;
                let mut cur = self.tx_off;
                let mut all = true;
                for (j, e) in self.ext.iter().enumerate() {
                    if k + 2 > iov.len() {
                        all = false;
                        break;
                    }
                    if cur < e.at {
                        iov[k] = libc::iovec {
                            iov_base: self.tx[cur..].as_ptr() as *mut libc::c_void,
                            iov_len: e.at - cur,
                        };
                        k += 1;
                    }
                    let skip = if j == 0 { self.ext_off } else { 0 };
                    iov[k] = libc::iovec {
                        // SAFETY: stays within the ext's buffer (skip < len).
                        iov_base: unsafe { e.ptr.add(skip) } as *mut libc::c_void,
                        iov_len: e.len - skip,
                    };
                    k += 1;
                    cur = e.at;
                }
                if all && k < iov.len() && cur < self.tx.len() {
                    iov[k] = libc::iovec {
                        iov_base: self.tx[cur..].as_ptr() as *mut libc::c_void,
                        iov_len: self.tx.len() - cur,
                    };
                    k += 1;
                }
                // SAFETY: every iovec points into `tx` (not touched during
                // the call) or into an I/O buffer that its command owns until
                // the controller has answered, which it cannot before these
                // bytes left (a completion that comes earlier fails the
                // connection, see `complete`); failing the connection clears
                // `ext` before any I/O is handed back.
                unsafe { sock.sendv(&iov[..k]) }
            };
            match r {
                Xfer::Done(n) => self.advance(n),
                Xfer::WouldBlock => {
                    sock.arm(true);
                    break;
                }
                Xfer::Closed => return Err("connection closed by the controller".into()),
                Xfer::Err(e) => return Err(format!("send failed: {e}")),
            }
        }
        if self.tx_off == self.tx.len() && self.ext.is_empty() {
            self.tx.clear();
            self.tx_off = 0;
        } else if self.tx_off > 1 << 20 {
            let d = self.tx_off;
            self.tx.drain(..d);
            for e in self.ext.iter_mut() {
                e.at -= d;
            }
            self.tx_off = 0;
        }
        Ok(())
    }

    /// Account for `n` bytes sent, in queue order.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            match self.ext.front() {
                Some(e) if self.tx_off < e.at => {
                    let k = n.min(e.at - self.tx_off);
                    self.tx_off += k;
                    n -= k;
                }
                Some(e) => {
                    let k = n.min(e.len - self.ext_off);
                    self.ext_off += k;
                    n -= k;
                    if self.ext_off == e.len {
                        self.ext.pop_front();
                        self.ext_off = 0;
                    }
                }
                None => {
                    self.tx_off += n;
                    n = 0;
                }
            }
        }
    }

    /// Read into the receive buffer; Ok(false) when nothing is available.
    fn fill(&mut self, sock: &Sock) -> Result<bool, String> {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx_start > 0 && self.rx.len() - self.rx_end < 4096 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        let end = self.rx_end;
        match sock.recv(&mut self.rx[end..]) {
            Xfer::Done(n) => {
                self.rx_end += n;
                Ok(true)
            }
            Xfer::WouldBlock => {
                sock.arm(false);
                Ok(false)
            }
            Xfer::Closed => Err("connection closed by the controller".into()),
            Xfer::Err(e) => Err(format!("receive failed: {e}")),
        }
    }

    /// Make sure `n` bytes are buffered; Ok(false) if they are not yet.
    fn need(&mut self, sock: &Sock, n: usize) -> Result<bool, String> {
        while self.rx_end - self.rx_start < n {
            if self.rx.len() - self.rx_start < n {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            if !self.fill(sock)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Queue an H2CTermReq for the header at rx_start and return the error.
    fn term(&mut self, fes: Fes, fei: u32, why: String) -> String {
        let hl = (self.rx_end - self.rx_start).min(TERM_MAX_DATA);
        let hdr = self.rx[self.rx_start..self.rx_start + hl].to_vec();
        Encoder::term_req(&mut self.tx, false, fes, fei, &hdr);
        why
    }

    /// Decode everything available. Ok(true) if anything happened.
    fn receive(&mut self, sock: &Sock) -> Result<bool, String> {
        let mut busy = false;
        for _ in 0..256 {
            let step = match self.rstate {
                Rx::Hdr => self.rx_header(sock)?,
                Rx::Data(d) => self.rx_data(sock, d)?,
                Rx::Ddgst {
                    cid,
                    crc,
                    last,
                    success,
                    datal,
                } => self.rx_ddgst(sock, cid, crc, last, success, datal)?,
            };
            match step {
                Step::Idle => return Ok(busy),
                Step::Stalled => return Ok(true),
                Step::Moved => busy = true,
                Step::Next => {}
            }
        }
        Ok(true)
    }

    /// A PDU header (and, but for C2HData, the whole PDU): responses
    /// complete, R2Ts start sends, C2HData switches to streaming its data.
    fn rx_header(&mut self, sock: &Sock) -> Result<Step, String> {
        if !self.need(sock, CH_LEN)? {
            return Ok(Step::Idle);
        }
        let n = self
            .dec
            .header_bytes_needed(&self.rx[self.rx_start..self.rx_end]);
        if !self.need(sock, n)? {
            return Ok(Step::Stalled);
        }
        let h = match self.dec.header(&self.rx[self.rx_start..self.rx_end]) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(Step::Stalled),
            Err(e) => {
                return Err(self.term(e.fes, e.fei, format!("bad PDU from the controller: {e}")))
            }
        };
        // Everything up to the data for C2HData (its payload is streamed),
        // the whole PDU otherwise (at most 152 bytes).
        let hdr_total = if h.ty == PduType::C2HData {
            h.data_off
        } else {
            h.plen
        };
        if !self.need(sock, hdr_total)? {
            return Ok(Step::Stalled);
        }
        let s = self.rx_start;
        let body = {
            let b = &self.rx[s..s + hdr_total];
            let data = if h.ty == PduType::C2HTermReq {
                &b[h.data_off.min(hdr_total)..]
            } else {
                &[][..]
            };
            match parse_body(&h, b, data) {
                Pdu::C2HTermReq(t, _) => {
                    return Err(format!(
                        "controller terminated the connection (C2HTermReq FES {}: {}, FEI {:#x})",
                        t.fes,
                        wire::fes_name(t.fes),
                        t.fei
                    ));
                }
                Pdu::CapsuleResp(c) => Body::Resp(c),
                Pdu::R2T(r) => Body::R2t(r),
                Pdu::C2HData(d, _) => Body::Data(d),
                _ => Body::Other,
            }
        };
        match body {
            Body::Other => {
                return Err(self.term(
                    Fes::PduSequenceError,
                    0,
                    format!("unexpected {:?} PDU after connection setup", h.ty),
                ));
            }
            Body::Resp(cqe) => {
                self.rx_start += hdr_total;
                self.complete(cqe)?;
            }
            Body::R2t(r) => {
                self.r2t(r)?;
                self.rx_start += hdr_total;
            }
            Body::Data(d) => {
                self.check_c2h_data(&d)?;
                self.rx_start += hdr_total;
                self.cur_datal = d.datal;
                self.rstate = Rx::Data(DataRx {
                    cid: d.cccid,
                    left: d.datal as usize,
                    off: d.datao as usize,
                    crc: 0,
                    last: d.last,
                    success: d.success,
                });
            }
        }
        Ok(Step::Moved)
    }

    /// A data PDU's CCCID must name an outstanding request that `wants`
    /// it; else a TermReq (Invalid Header Field at CCCID) and the error
    /// "`pdu` for CID `cid`, which has no `what`".
    fn expect_req(
        &mut self,
        cid: u16,
        pdu: &str,
        what: &str,
        wants: impl Fn(&Req) -> bool,
    ) -> Result<(), String> {
        if matches!(self.reqs.get(cid as usize), Some(r) if r.active && wants(r)) {
            return Ok(());
        }
        Err(self.term(
            Fes::InvalidHeaderField,
            off::CCCID,
            format!("{pdu} for CID {cid}, which has no {what}"),
        ))
    }

    /// A C2HData header must continue an outstanding read, in order, within
    /// its length.
    fn check_c2h_data(&mut self, d: &DataHdr) -> Result<(), String> {
        let cid = d.cccid;
        self.expect_req(cid, "C2HData", "outstanding read", |r| r.inp)?;
        let r = &self.reqs[cid as usize];
        if d.datao != r.xfer {
            let msg = format!(
                "C2HData for CID {cid} at offset {}, expected {}",
                d.datao, r.xfer
            );
            return Err(self.term(Fes::DataOutOfRange, off::DATAO, msg));
        }
        if d.datao as u64 + d.datal as u64 > r.len as u64 {
            let msg = format!(
                "C2HData for CID {cid} carries {} bytes at {}, beyond the {} requested",
                d.datal, d.datao, r.len
            );
            return Err(self.term(Fes::DataOutOfRange, off::DATAL, msg));
        }
        Ok(())
    }

    /// C2HData payload: large remainders straight from the socket into the
    /// read's buffer, else copied out of the receive buffer; the data digest
    /// accumulates on the way.
    fn rx_data(&mut self, sock: &Sock, d: DataRx) -> Result<Step, String> {
        let DataRx {
            cid,
            left,
            off,
            crc,
            last,
            success,
        } = d;
        if left == 0 {
            let datal = self.cur_datal;
            if self.enc.ddgst {
                self.rstate = Rx::Ddgst {
                    cid,
                    crc,
                    last,
                    success,
                    datal,
                };
            } else {
                self.rstate = Rx::Hdr;
                self.data_done(cid, datal, last, success, true)?;
            }
            return Ok(Step::Next);
        }
        let avail = self.rx_end - self.rx_start;
        let ddgst = self.enc.ddgst;
        let advanced = |n: usize, crc: u32| {
            Rx::Data(DataRx {
                left: left - n,
                off: off + n,
                crc,
                ..d
            })
        };
        if avail == 0 && left >= DIRECT_RX {
            let dest = self.dest(cid, off, left);
            return match sock.recv(dest) {
                Xfer::Done(n) => {
                    let crc = if ddgst {
                        crc32c::crc32c_append(crc, &dest[..n])
                    } else {
                        crc
                    };
                    self.rstate = advanced(n, crc);
                    Ok(Step::Moved)
                }
                Xfer::WouldBlock => {
                    sock.arm(false);
                    Ok(Step::Idle)
                }
                Xfer::Closed => Err("connection closed by the controller".into()),
                Xfer::Err(e) => Err(format!("receive failed: {e}")),
            };
        }
        if avail == 0 && !self.fill(sock)? {
            return Ok(Step::Idle);
        }
        let n = left.min(self.rx_end - self.rx_start);
        let s = self.rx_start;
        // Split borrows: the receive buffer and the destination.
        let src = std::mem::take(&mut self.rx);
        let dest = self.dest(cid, off, n);
        dest.copy_from_slice(&src[s..s + n]);
        let crc = if ddgst {
            crc32c::crc32c_append(crc, &src[s..s + n])
        } else {
            crc
        };
        self.rx = src;
        self.rx_start += n;
        self.rstate = advanced(n, crc);
        Ok(Step::Moved)
    }

    /// The data digest after a C2HData payload: a mismatch fails the
    /// command, not the connection.
    fn rx_ddgst(
        &mut self,
        sock: &Sock,
        cid: u16,
        crc: u32,
        last: bool,
        success: bool,
        datal: u32,
    ) -> Result<Step, String> {
        if !self.need(sock, 4)? {
            return Ok(Step::Idle);
        }
        let b = &self.rx[self.rx_start..self.rx_start + 4];
        let want = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        self.rx_start += 4;
        self.rstate = Rx::Hdr;
        let ok = want == crc;
        if !ok {
            tracing::error!(cid, "data digest mismatch on C2HData (computed {crc:#010x}, PDU says {want:#010x}); failing the command");
        }
        self.data_done(cid, datal, last, success, ok)?;
        Ok(Step::Next)
    }

    /// Where the payload of `cid` at `off` goes.
    fn dest(&mut self, cid: u16, off: usize, n: usize) -> &mut [u8] {
        let r = &mut self.reqs[cid as usize];
        if r.parent == NONE {
            return &mut r.abuf[off..off + n];
        }
        let base = r.buf_off;
        let io = self.parents[r.parent as usize]
            .io
            .as_mut()
            .expect("outstanding command has its I/O");
        let buf = io.buf.as_mut().expect("read has a buffer");
        &mut buf.as_mut_slice()[base + off..base + off + n]
    }

    fn data_done(
        &mut self,
        cid: u16,
        datal: u32,
        _last: bool,
        success: bool,
        digest_ok: bool,
    ) -> Result<(), String> {
        let r = &mut self.reqs[cid as usize];
        r.xfer += datal;
        if !digest_ok {
            // Remember the failure; the CQE (or SUCCESS) completes it.
            r.bad_digest = true;
        }
        if success {
            if r.xfer != r.len {
                return Err(format!(
                    "C2HData SUCCESS for CID {cid} after {} of {} bytes",
                    r.xfer, r.len
                ));
            }
            let cqe = Cqe {
                cid,
                ..Cqe::default()
            };
            self.complete(cqe)?;
        }
        Ok(())
    }

    fn r2t(&mut self, r2t: R2t) -> Result<(), String> {
        let R2t {
            cccid: cid,
            ttag,
            r2to,
            r2tl,
        } = r2t;
        self.expect_req(cid, "R2T", "write waiting for one", |r| r.out && !r.icd)?;
        let r = &self.reqs[cid as usize];
        if r2tl == 0 || r2to != r.xfer || r2to as u64 + r2tl as u64 > r.len as u64 {
            return Err(self.term(
                Fes::DataOutOfRange,
                off::DATAO,
                format!(
                    "R2T for CID {cid} asks for {r2tl} bytes at {r2to}; {} of {} already sent",
                    r.xfer, r.len
                ),
            ));
        }
        let enc = self.enc;
        let maxd = self.maxh2cdata as usize;
        let Inner {
            reqs,
            parents,
            tx,
            ext,
            ..
        } = self;
        let r = &mut reqs[cid as usize];
        // Data of bdev I/O goes out from its buffer; DSM ranges and admin
        // data (small, and owned by the slot) are copied.
        let (src, zero_copy): (&[u8], bool) = if r.use_dsm {
            (&r.dsm, false)
        } else if r.parent == NONE {
            (&r.abuf, false)
        } else {
            let io = parents[r.parent as usize]
                .io
                .as_ref()
                .expect("outstanding write has its I/O");
            let b = io.buf.as_ref().expect("write has a buffer");
            (&b.as_slice()[r.buf_off..r.buf_off + r.len as usize], true)
        };
        let mut off = r2to as usize;
        let end = (r2to + r2tl) as usize;
        while off < end {
            let n = (end - off).min(maxd);
            let d = DataHdr {
                cccid: cid,
                ttag,
                datao: off as u32,
                datal: n as u32,
                last: off + n == end,
                success: false,
            };
            let chunk = &src[off..off + n];
            if zero_copy && n >= ZERO_COPY_MIN {
                enc.data_header(tx, false, &d);
                ext.push_back(Ext {
                    at: tx.len(),
                    ptr: chunk.as_ptr(),
                    len: n,
                    cid,
                });
                if enc.ddgst {
                    tx.extend_from_slice(&crate::pdu::crc32c(chunk).to_le_bytes());
                }
            } else {
                enc.data_pdu(tx, false, &d, chunk);
            }
            off += n;
        }
        r.xfer = end as u32;
        Ok(())
    }

    fn complete(&mut self, cqe: Cqe) -> Result<(), String> {
        let cid = cqe.cid;
        let ok = matches!(self.reqs.get(cid as usize), Some(r) if r.active);
        if !ok {
            return Err(format!(
                "CapsuleResp for CID {cid}, which is not outstanding"
            ));
        }
        if self.ext.iter().any(|e| e.cid == cid) {
            return Err(format!(
                "CapsuleResp for CID {cid} before all of its data was sent"
            ));
        }
        let r = &mut self.reqs[cid as usize];
        let mut status = cqe.status;
        if status.is_success() && r.inp && r.xfer != r.len {
            return Err(format!(
                "short data-in: CID {cid} completed successfully after {} of {} bytes",
                r.xfer, r.len
            ));
        }
        if status.is_success() && r.out && !r.icd && r.xfer != r.len {
            return Err(format!(
                "CID {cid} completed successfully before its {} bytes of data were requested",
                r.len
            ));
        }
        if r.bad_digest {
            // Data digest error on the payload: a transport error, retryable.
            status = spec::Status::generic(spec::sc::DATA_TRANSFER_ERROR);
        }
        r.active = false;
        self.free.push(cid);
        if let Some(a) = r.admin.take() {
            let data = std::mem::take(&mut r.abuf);
            let mut s = a.borrow_mut();
            s.result = Some(Ok((Cqe { status, ..cqe }, data)));
            if let Some(w) = s.waker.take() {
                w.wake();
            }
            return Ok(());
        }
        let pidx = r.parent;
        let p = &mut self.parents[pidx as usize];
        p.outstanding -= 1;
        if !status.is_success() && p.status.is_success() {
            p.status = IoStatus::NvmeError {
                sct: status.sct,
                sc: status.sc,
            };
        }
        let total = p.io.as_ref().map(|io| io.num_blocks).unwrap_or(0);
        if p.outstanding == 0 && p.cursor >= total.max(1) {
            if let Some(mut io) = p.io.take() {
                io.status = p.status;
                self.done.push(io);
            }
            self.free_parents.push(pidx);
        }
        self.pump();
        Ok(())
    }
}
