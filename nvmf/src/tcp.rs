//! The TCP transport: listeners, and connections (queue pairs) as state
//! machines driven by their reactor's poll group.
//!
//! * A listener accepts on reactor 0 (io_uring Accept) and hands each new
//!   socket to a reactor, round-robin (SPDK's poll-group assignment). Each
//!   queue is its own connection and lives on one reactor from then on.
//! * Each reactor drives its connections from one poller (its poll group,
//!   as SPDK's): per iteration, a connection receives what its socket holds
//!   and decodes whole PDUs from it, and everything queued for the host
//!   (responses, R2Ts, C2H data straight from the bdev's buffers) leaves in
//!   one gathering sendmsg. Plain non-blocking recv/sendmsg: busy-polling,
//!   sockets that were idle at the last look are asked first with one
//!   poll(2) for the whole group (a recv spinning on an idle socket takes
//!   its lock every time and holds up the kernel's receive path); in
//!   `--interrupt-mode` a socket with nothing to read (or no room to send)
//!   gets an io_uring poll, whose completion wakes the reactor.
//! * Commands live in per-connection slots (reused); their bdev I/Os come
//!   from the reactor's descriptor cache and complete through a function
//!   (`BdevIo::with_fn`): no allocation per command beyond data buffers.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bdev::{BdevIo, IoChannel, IoType};
use reactor::net;
use reactor::uring::{op, ty};
use reactor::DmaBuf;

use crate::connect;
use crate::ctrlr::{self, CcAction, Done};
use crate::nvm_cmd;
use crate::pdu::{
    self, Accept, DataHdr, Decoder, DecoderConfig, Encoder, Fes, IcResp, Pdu, PduError, R2t,
};
use crate::spec::*;
use crate::target::{
    self, lock, stats, Ctrl, ListenAddr, Namespace, TransportOpts, ADMIN_ICD, AER_LIMIT,
    DISCOVERY_IDLE_MS, MAX_H2C_DATA,
};

/// Receive buffer: one whole PDU must fit (largest H2CData or capsule).
const RX_BUF: usize = 2 * MAX_H2C_DATA as usize + 4096;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

// ---------------------------------------------------------------------------
// Listeners

/// Owner's handle on a listening socket (kept in the target registry).
pub struct ListenerHandle {
    fd: RawFd,
    stop: Arc<AtomicBool>,
}

impl ListenerHandle {
    /// Stop accepting and close the socket (the pending Accept fails and
    /// its callback drops the fd).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        // SAFETY: the accept loop keeps the fd open until it observes `stop`,
        // which the shutdown makes it do.
        net::shutdown(&unsafe { BorrowedFd::borrow_raw(self.fd) });
    }
}

fn socket_addr(addr: &ListenAddr) -> std::io::Result<SocketAddr> {
    let host = if addr.traddr.contains(':') {
        format!("[{}]", addr.traddr)
    } else {
        addr.traddr.clone()
    };
    format!("{host}:{}", addr.trsvcid)
        .parse()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad listen address"))
}

/// Bind and start accepting on `addr` (call on reactor 0).
pub fn listen(addr: &ListenAddr) -> std::io::Result<ListenerHandle> {
    let fd = net::listen_tcp(socket_addr(addr)?)?;
    Ok(serve(fd, addr))
}

/// [`listen`], retrying the bind for up to `retry` while the address is in
/// use (see [`net::listen_tcp_retrying`]).
pub async fn listen_retrying(
    addr: &ListenAddr,
    retry: Duration,
) -> std::io::Result<ListenerHandle> {
    let fd = net::listen_tcp_retrying(socket_addr(addr)?, retry).await?;
    Ok(serve(fd, addr))
}

fn serve(fd: OwnedFd, addr: &ListenAddr) -> ListenerHandle {
    // Every queue comes through a listener: the target can reach them now.
    target::set_transport_ops(&TCP);
    let stop = Arc::new(AtomicBool::new(false));
    let h = ListenerHandle {
        fd: fd.as_raw_fd(),
        stop: stop.clone(),
    };
    tracing::info!(%addr, "NVMe/TCP target listening");
    arm_accept(Rc::new(fd), stop, addr.clone());
    h
}

fn arm_accept(fd: Rc<OwnedFd>, stop: Arc<AtomicBool>, addr: ListenAddr) {
    let e = op::Accept::new(
        ty::Fd(fd.as_raw_fd()),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .flags(libc::SOCK_CLOEXEC)
    .build();
    let fd2 = fd.clone();
    // SAFETY: the entry references only the fd, kept alive by the callback.
    unsafe {
        reactor::uring::submit(e, move |res| {
            if stop.load(Ordering::Acquire) {
                drop(fd2);
                tracing::info!(%addr, "NVMe/TCP listener closed");
                return;
            }
            if res >= 0 {
                // A fresh fd returned by accept, owned from here (inside the
                // enclosing unsafe block).
                let s = OwnedFd::from_raw_fd(res);
                dispatch_conn(s, addr.clone());
                arm_accept(fd2, stop, addr);
            } else {
                let err = std::io::Error::from_raw_os_error(-res);
                tracing::warn!(%addr, error = %err, "accept failed");
                // Back off on resource errors (EMFILE...) rather than spin.
                reactor::set_timer(Duration::from_millis(10), move || {
                    arm_accept(fd2, stop, addr)
                });
            }
        });
    }
}

fn dispatch_conn(s: OwnedFd, listen: ListenAddr) {
    let n = reactor::num_reactors().max(1);
    let r = {
        let mut t = target::tgt();
        t.qpair_rr = t.qpair_rr.wrapping_add(1);
        t.qpair_rr % n
    };
    let raw = s.into_raw_fd();
    reactor::send(r, move || {
        // SAFETY: ownership of the fd was released just above.
        let s = unsafe { OwnedFd::from_raw_fd(raw) };
        start_conn(s, listen)
    });
}

// ---------------------------------------------------------------------------
// Connections

type ConnRc = Rc<RefCell<Conn>>;

thread_local! {
    static CONNS: RefCell<HashMap<u64, ConnRc>> = RefCell::new(HashMap::new());
    /// The poller driving this reactor's connections (registered with the
    /// first one).
    static GROUP: RefCell<Option<reactor::Poller>> = const { RefCell::new(None) };
    /// The group poller's working lists, kept to allocate nothing per poll.
    static GROUP_SCRATCH: RefCell<(Vec<ConnRc>, Vec<libc::pollfd>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

fn get_conn(id: u64) -> Option<ConnRc> {
    CONNS.with(|c| c.borrow().get(&id).cloned())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    WaitIcReq,
    Ready,
    /// A TermReq was queued; close once it is sent.
    Terminating,
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Waiting for H2CData after an R2T.
    AwaitData,
    /// Executing (bdev I/O in flight or parked AER).
    Exec,
}

struct Slot {
    state: SlotState,
    sqe: Sqe,
    buf: Option<DmaBuf>,
    /// Transfer length from the SGL.
    len: u32,
    /// Bytes of host data received so far.
    got: u32,
    digest_err: bool,
    /// Outstanding sub-I/Os (DSM ranges) and the worst status seen.
    pending: u32,
    status: Status,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            state: SlotState::Free,
            sqe: Sqe::default(),
            buf: None,
            len: 0,
            got: 0,
            digest_err: false,
            pending: 0,
            status: Status::SUCCESS,
        }
    }
}

/// H2CData payloads at least this large are received straight into the
/// command's buffer.
const DIRECT_MIN: usize = 16 * 1024;

/// An H2CData payload being received directly into a command buffer.
#[derive(Clone, Copy, Debug)]
struct Direct {
    slot: usize,
    /// Next byte of the slot buffer to fill, and the end of this PDU's data.
    off: usize,
    end: usize,
    datao: u32,
    ddgst: bool,
    /// Data complete; its 4-byte digest comes through the receive buffer.
    digest_pending: bool,
    last: bool,
}

/// Cached namespace entry of a queue.
type NsEntry = Option<(Arc<Namespace>, IoChannel)>;

struct Queue {
    ctrl: Arc<Ctrl>,
    qid: u16,
    sqsize: u16,
    sqhd: u16,
    sqflow_off: bool,
    ns_gen: u64,
    ns_cache: Vec<NsEntry>,
}

impl Queue {
    fn ns(&mut self, nsid: u32) -> Option<&(Arc<Namespace>, IoChannel)> {
        let g = self.ctrl.subsys.ns_gen.load(Ordering::Acquire);
        if g != self.ns_gen || self.ns_cache.is_empty() {
            let table: Vec<Option<Arc<Namespace>>> = lock(&self.ctrl.subsys.state).ns.clone();
            self.ns_cache = table
                .into_iter()
                .map(|o| o.and_then(|n| n.channel().map(|ch| (n, ch))))
                .collect();
            if self.ns_cache.is_empty() {
                self.ns_cache.push(None);
            }
            self.ns_gen = g;
        }
        if nsid == 0 {
            return None;
        }
        let e = self.ns_cache.get(nsid as usize - 1)?.as_ref()?;
        if e.0.removed.load(Ordering::Acquire) {
            return None;
        }
        Some(e)
    }
}

/// What a connection has queued for its host, in order: PDU bytes, with
/// buffers sent in place (no copy) between them, and how much of it the
/// socket already took.
struct TxQueue {
    bytes: Vec<u8>,
    /// (position in `bytes` the buffer precedes, buffer, its length to send)
    bufs: Vec<(usize, DmaBuf, usize)>,
    /// Bytes of the queue already sent.
    off: usize,
}

impl Default for TxQueue {
    fn default() -> Self {
        TxQueue {
            bytes: Vec::with_capacity(64 * 1024),
            bufs: Vec::with_capacity(64),
            off: 0,
        }
    }
}

impl TxQueue {
    /// Queue the first `n` bytes of `b` after the bytes queued so far.
    fn push_buf(&mut self, b: DmaBuf, n: usize) {
        self.bufs.push((self.bytes.len(), b, n));
    }

    /// Bytes queued and not yet sent.
    fn pending(&self) -> usize {
        self.bytes.len() + self.bufs.iter().map(|b| b.2).sum::<usize>() - self.off
    }

    /// Fill `iov` with what is left to send (at most [`MAX_IOV`] entries);
    /// returns the bytes they cover. They point into the queue: valid until
    /// it next changes.
    fn iovecs(&self, iov: &mut Vec<libc::iovec>) -> usize {
        iov.clear();
        let mut skip = self.off;
        let mut offered = 0;
        let mut push = |iov: &mut Vec<libc::iovec>, sl: &[u8]| {
            if skip >= sl.len() {
                skip -= sl.len();
                return;
            }
            if iov.len() < MAX_IOV {
                iov.push(libc::iovec {
                    iov_base: sl[skip..].as_ptr() as *mut libc::c_void,
                    iov_len: sl.len() - skip,
                });
                offered += sl.len() - skip;
            }
            skip = 0;
        };
        let mut prev = 0;
        for (pos, b, n) in self.bufs.iter() {
            push(iov, &self.bytes[prev..*pos]);
            push(iov, &b.as_slice()[..*n]);
            prev = *pos;
        }
        push(iov, &self.bytes[prev..]);
        offered
    }

    /// `n` more bytes were sent; true (and the queue emptied, its buffers
    /// back to the pool) when that was all of it.
    fn advance(&mut self, n: usize) -> bool {
        self.off += n;
        if self.pending() > 0 {
            return false;
        }
        self.clear();
        true
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.bufs.clear();
        self.off = 0;
    }

    /// Drop what was sent from the head of the queue: its buffers go back
    /// to the pool now, not once the queue drains (which a host reading as
    /// fast as we queue may never let happen).
    fn compact(&mut self) {
        let mut off = self.off;
        let (mut cut, mut bufs_cut) = (0, 0);
        let mut in_buf = false;
        for (pos, _, n) in self.bufs.iter() {
            let run = pos - cut;
            if off < run {
                break;
            }
            off -= run;
            cut = *pos;
            if off < *n {
                in_buf = true;
                break;
            }
            off -= n;
            bufs_cut += 1;
        }
        if !in_buf {
            // The sent part ends in a run of PDU bytes.
            cut += off;
            off = 0;
        }
        self.bytes.drain(..cut);
        self.bufs.drain(..bufs_cut);
        for b in self.bufs.iter_mut() {
            b.0 -= cut;
        }
        self.off = off;
    }
}

pub struct Conn {
    id: u64,
    /// Shared with the io_uring polls armed on it, so the fd outlives them.
    fd: Rc<OwnedFd>,
    reactor: u32,
    listen: ListenAddr,
    local_ip: String,
    peer: String,
    phase: Phase,
    dec: Decoder,
    enc: Encoder,
    opts: TransportOpts,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    /// The last receive found nothing: busy-polling asks poll(2) first.
    rx_idle: bool,
    /// What is queued for the host.
    tx: TxQueue,
    /// The socket took less than offered: wait until it is writable.
    tx_blocked: bool,
    /// iovecs of the next sendmsg (kept to allocate nothing per send).
    iov: Vec<libc::iovec>,
    /// The reactor sleeps when idle: arm io_uring polls for wakeups.
    interrupt: bool,
    /// An io_uring poll for POLLIN / POLLOUT is in flight.
    armed_in: Rc<Cell<bool>>,
    armed_out: Rc<Cell<bool>>,
    q: Option<Queue>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    aers: Vec<u16>,
    ka_poller: Option<reactor::Poller>,
    max_r2t: u32,
    /// SQHD for the next CQE only (Connect with SQ flow control off).
    sqhd_override: Option<u16>,
    direct: Option<Direct>,
}

fn start_conn(fd: OwnedFd, listen: ListenAddr) {
    let Some(opts) = target::transport() else {
        return;
    };
    let r = reactor::current().unwrap_or(0);
    if let Err(e) = net::set_nodelay(&fd) {
        tracing::debug!(error = %e, "TCP_NODELAY");
    }
    let local_ip = net::local_addr(&fd)
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|| listen.traddr.clone());
    let peer = net::peer_addr(&fd)
        .map(|a| a.to_string())
        .unwrap_or_default();
    let id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    let dec = Decoder::new(DecoderConfig {
        accept: Accept::HostToCtrl,
        hdgst: false,
        ddgst: false,
        rx_pda: 0,
        max_icd: ADMIN_ICD.max(opts.in_capsule_data_size),
        max_data: MAX_H2C_DATA,
    });
    let c = Conn {
        id,
        fd: Rc::new(fd),
        reactor: r,
        listen,
        local_ip,
        peer,
        phase: Phase::WaitIcReq,
        dec,
        enc: Encoder::default(),
        opts,
        rx: vec![0u8; RX_BUF].into_boxed_slice(),
        rx_start: 0,
        rx_end: 0,
        rx_idle: true,
        tx: TxQueue::default(),
        tx_blocked: false,
        iov: Vec::with_capacity(MAX_IOV),
        interrupt: reactor::is_interrupt_mode(),
        armed_in: Rc::new(Cell::new(false)),
        armed_out: Rc::new(Cell::new(false)),
        q: None,
        slots: Vec::new(),
        free: Vec::new(),
        aers: Vec::new(),
        ka_poller: None,
        max_r2t: 1,
        sqhd_override: None,
        direct: None,
    };
    tracing::debug!(conn = id, peer = %c.peer, listen = %c.listen, "new NVMe/TCP connection");
    stats(r)
        .current_unassociated_qpairs
        .fetch_add(1, Ordering::Relaxed);
    let rc = Rc::new(RefCell::new(c));
    CONNS.with(|m| m.borrow_mut().insert(id, rc.clone()));
    GROUP.with(|g| {
        g.borrow_mut()
            .get_or_insert_with(|| reactor::poller_register(Duration::ZERO, poll_group));
    });
    // A host that never sends ICReq is dropped (Linux waits 10 s itself).
    let w = Rc::downgrade(&rc);
    reactor::set_timer(Duration::from_secs(30), move || {
        if let Some(rc) = w.upgrade() {
            let mut c = rc.borrow_mut();
            if c.phase == Phase::WaitIcReq {
                c.close("no ICReq within 30 s");
            }
        }
    });
}

/// This reactor's poll group: every connection receives and sends what it
/// can without blocking. Busy-polling, the sockets that had nothing to do at
/// the last look are asked first, all with one poll(2).
fn poll_group() -> reactor::PollStatus {
    let (mut conns, mut fds) = GROUP_SCRATCH.with(|g| std::mem::take(&mut *g.borrow_mut()));
    CONNS.with(|m| conns.extend(m.borrow().values().cloned()));
    let interrupt = reactor::is_interrupt_mode();
    fds.clear();
    if !interrupt {
        fds.extend(conns.iter().map(|rc| rc.borrow().readiness_query()));
        if !net::poll_now(&mut fds) && fds.iter().all(|p| p.fd >= 0) {
            // Every socket was idle and still is.
            conns.clear();
            GROUP_SCRATCH.with(|g| *g.borrow_mut() = (conns, fds));
            return reactor::PollStatus::Idle;
        }
    }
    let mut busy = false;
    for (k, rc) in conns.iter().enumerate() {
        let revents = fds.get(k).map_or(0, |p| p.revents);
        busy |= drive(rc, revents);
    }
    conns.clear();
    GROUP_SCRATCH.with(|g| *g.borrow_mut() = (conns, fds));
    if busy {
        reactor::PollStatus::Busy
    } else {
        reactor::PollStatus::Idle
    }
}

/// One connection's turn in the poll group (`revents`: what poll(2) saw, if
/// it was asked). True if anything moved.
fn drive(rc: &ConnRc, revents: i16) -> bool {
    let mut c = rc.borrow_mut();
    let mut busy = false;
    if c.may_receive(revents) {
        busy |= c.receive(rc);
    }
    if c.phase != Phase::Closed && c.tx_pending() > 0 && c.may_send(revents) {
        busy |= c.send();
    }
    if c.phase == Phase::Terminating && c.tx_pending() == 0 {
        c.close("termination request sent");
    }
    busy
}

fn process(rc: &ConnRc, c: &mut Conn) {
    let rx = std::mem::take(&mut c.rx);
    while c.phase == Phase::WaitIcReq || c.phase == Phase::Ready {
        if c.direct.is_some_and(|d| d.digest_pending) {
            if c.rx_end - c.rx_start < pdu::DIGEST_LEN {
                break;
            }
            let p = c.rx_start;
            let dg = u32::from_le_bytes([rx[p], rx[p + 1], rx[p + 2], rx[p + 3]]);
            c.rx_start += pdu::DIGEST_LEN;
            if let Err(e) = c.direct_done(rc, Some(dg)) {
                c.fatal(e, &[]);
                break;
            }
            continue;
        }
        if c.direct.is_some() {
            break;
        }
        let buf = &rx[c.rx_start..c.rx_end];
        let d = match c.dec.decode(buf) {
            Ok(Some(d)) => d,
            Ok(None) => {
                match c.try_direct(buf) {
                    Ok(_) => {}
                    Err(e) => {
                        let hdr = buf[..buf.len().min(pdu::HLEN_24)].to_vec();
                        c.fatal(e, &hdr);
                    }
                }
                break;
            }
            Err(e) => {
                let hl = buf.len().min(pdu::TERM_MAX_DATA).min(if buf.len() >= 3 {
                    (buf[2] as usize).max(8)
                } else {
                    buf.len()
                });
                let hdr = buf[..hl].to_vec();
                c.fatal(e, &hdr);
                break;
            }
        };
        let start = c.rx_start;
        c.rx_start += d.len;
        let hdr_end = (start + pdu::TERM_MAX_DATA).min(start + d.len);
        if let Err(e) = c.handle_pdu(rc, d.pdu, d.data_digest_ok) {
            let hdr = rx[start..hdr_end].to_vec();
            c.fatal(e, &hdr);
            break;
        }
    }
    c.rx = rx;
}

/// The TCP transport as the target sees it.
pub struct Tcp;

/// The one TCP transport (registered with the target by [`listen`]).
pub static TCP: Tcp = Tcp;

impl target::TransportOps for Tcp {
    fn close_qpair(&self, conn: u64, why: &str) {
        close_conn(conn, why);
    }
    fn deliver_events(&self, conn: u64) {
        deliver_events(conn);
    }
}

impl target::Listener for ListenerHandle {
    fn stop(&self) {
        ListenerHandle::stop(self);
    }
}

/// Close connection `id` on this reactor (from a controller teardown).
pub fn close_conn(id: u64, why: &str) {
    if let Some(rc) = get_conn(id) {
        rc.borrow_mut().close(why);
    }
}

/// Deliver queued asynchronous events to pending AERs of connection `id`.
pub fn deliver_events(id: u64) {
    if let Some(rc) = get_conn(id) {
        rc.borrow_mut().deliver_events();
    }
}

impl Conn {
    fn qid(&self) -> u16 {
        self.q.as_ref().map_or(0, |q| q.qid)
    }

    /// The poll(2) entry for this socket in the poll group: what it waits
    /// for (a negative fd when it has something to do without asking).
    fn readiness_query(&self) -> libc::pollfd {
        let mut events = 0;
        if self.rx_idle {
            events |= libc::POLLIN;
        }
        if self.tx_blocked {
            events |= libc::POLLOUT;
        }
        let busy = !self.rx_idle || (self.tx_pending() > 0 && !self.tx_blocked);
        libc::pollfd {
            fd: if busy || events == 0 || self.phase == Phase::Closed {
                -1
            } else {
                self.fd.as_raw_fd()
            },
            events,
            revents: 0,
        }
    }

    fn may_receive(&self, revents: i16) -> bool {
        if self.phase != Phase::Ready && self.phase != Phase::WaitIcReq {
            return false;
        }
        if self.interrupt {
            !self.armed_in.get()
        } else {
            !self.rx_idle || revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0
        }
    }

    fn may_send(&self, revents: i16) -> bool {
        if self.interrupt {
            !self.armed_out.get()
        } else {
            !self.tx_blocked || revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0
        }
    }

    /// In interrupt mode, have the reactor woken when the socket becomes
    /// readable (`out` false) or writable (`out` true).
    fn arm(&self, out: bool) {
        if !self.interrupt || self.phase == Phase::Closed {
            return;
        }
        let flag = if out { &self.armed_out } else { &self.armed_in };
        if flag.replace(true) {
            return;
        }
        let (flag, fd) = (flag.clone(), self.fd.clone());
        let ev = if out { libc::POLLOUT } else { libc::POLLIN };
        let e = op::PollAdd::new(ty::Fd(fd.as_raw_fd()), ev as u32).build();
        // SAFETY: a poll references no memory; the callback keeps the fd open
        // until the poll completes (`close` shuts the socket down, which
        // completes it).
        unsafe {
            reactor::uring::submit(e, move |_| {
                flag.set(false);
                drop(fd);
            })
        };
    }

    /// One non-blocking receive: into the receive buffer (then decode and
    /// handle its PDUs), or straight into a command's buffer during a direct
    /// H2CData receive. True if bytes came.
    fn receive(&mut self, rc: &ConnRc) -> bool {
        let room;
        let r = match self.direct.filter(|d| !d.digest_pending) {
            Some(d) => match self.slots[d.slot].buf.as_mut() {
                Some(b) => {
                    room = d.end - d.off;
                    net::recv(&*self.fd, &mut b.as_mut_slice()[d.off..d.end])
                }
                None => {
                    self.close("direct receive without a buffer");
                    return false;
                }
            },
            None => {
                if self.rx_start == self.rx_end {
                    self.rx_start = 0;
                    self.rx_end = 0;
                } else if self.rx.len() - self.rx_end < 4096 {
                    let (s, e) = (self.rx_start, self.rx_end);
                    self.rx.copy_within(s..e, 0);
                    self.rx_start = 0;
                    self.rx_end = e - s;
                }
                if self.rx_end == self.rx.len() {
                    // Cannot happen: the buffer holds two maximal PDUs.
                    self.close("receive buffer full");
                    return false;
                }
                room = self.rx.len() - self.rx_end;
                net::recv(&*self.fd, &mut self.rx[self.rx_end..])
            }
        };
        let n = match r {
            net::Xfer::Done(n) => n,
            net::Xfer::WouldBlock => {
                self.rx_idle = true;
                self.arm(false);
                return false;
            }
            net::Xfer::Closed => {
                self.close("connection closed by host");
                return false;
            }
            net::Xfer::Err(e) => {
                self.close(&format!("recv failed: {e}"));
                return false;
            }
        };
        // Less than asked for: the socket is drained. Ask for readiness next
        // time rather than make a recv that finds nothing.
        self.rx_idle = n < room;
        if self.rx_idle {
            self.arm(false);
        }
        match self.direct {
            Some(mut d) if !d.digest_pending => {
                d.off += n;
                if d.off < d.end {
                    self.direct = Some(d);
                } else if d.ddgst {
                    d.digest_pending = true;
                    self.direct = Some(d);
                } else if let Err(e) = self.direct_done(rc, None) {
                    self.fatal(e, &[]);
                }
            }
            _ => {
                self.rx_end += n;
                process(rc, self);
            }
        }
        true
    }

    fn tx_pending(&self) -> usize {
        self.tx.pending()
    }

    /// Send what is queued, in as few gathering sendmsg calls as the socket
    /// takes; what it does not take stays queued (its buffers with it).
    /// True if bytes went.
    fn send(&mut self) -> bool {
        let mut sent_any = false;
        loop {
            let offered = self.tx.iovecs(&mut self.iov);
            // SAFETY: the iovecs point into the queue's bytes and buffers,
            // which are neither changed nor dropped during the call.
            let r = unsafe { net::sendv_raw(&*self.fd, &self.iov) };
            match r {
                net::Xfer::Done(n) => {
                    sent_any = true;
                    if self.tx.advance(n) {
                        self.tx_blocked = false;
                        return true;
                    }
                    if n < offered {
                        // The socket buffer is full.
                        break;
                    }
                    // More iovecs than one sendmsg takes: go on.
                }
                net::Xfer::WouldBlock | net::Xfer::Closed => break,
                net::Xfer::Err(e) => {
                    self.close(&format!("send failed: {e}"));
                    return sent_any;
                }
            }
        }
        self.tx.compact();
        self.tx_blocked = true;
        self.arm(true);
        sent_any
    }

    fn fatal(&mut self, e: PduError, hdr: &[u8]) {
        tracing::warn!(conn = self.id, peer = %self.peer, error = %e, "NVMe/TCP protocol error; terminating the connection");
        if self.phase == Phase::Closed || self.phase == Phase::Terminating {
            return;
        }
        Encoder::term_req(&mut self.tx.bytes, true, e.fes, e.fei, hdr);
        self.phase = Phase::Terminating;
        self.detach_queue();
        // Give the host a moment to read the TermReq, then close anyway.
        let id = self.id;
        reactor::set_timer(Duration::from_secs(2), move || {
            close_conn(id, "termination request sent")
        });
    }

    /// Detach from the controller (admin queue: tear the controller down).
    fn detach_queue(&mut self) {
        if let Some(q) = self.q.take() {
            let s = stats(self.reactor);
            if q.qid == 0 {
                s.current_admin_qpairs.fetch_sub(1, Ordering::Relaxed);
                target::destroy_ctrl(&q.ctrl);
            } else {
                s.current_io_qpairs.fetch_sub(1, Ordering::Relaxed);
                let mut st = lock(&q.ctrl.state);
                if st
                    .io_qpairs
                    .get(&q.qid)
                    .is_some_and(|&(_, id)| id == self.id)
                {
                    st.io_qpairs.remove(&q.qid);
                }
            }
        } else if self.phase != Phase::Closed {
            stats(self.reactor)
                .current_unassociated_qpairs
                .fetch_sub(1, Ordering::Relaxed);
        }
        self.ka_poller = None;
        self.aers.clear();
    }

    fn close(&mut self, why: &str) {
        if self.phase == Phase::Closed {
            return;
        }
        tracing::debug!(conn = self.id, peer = %self.peer, qid = self.qid(), reason = why, "closing NVMe/TCP connection");
        if self.phase != Phase::Terminating {
            self.detach_queue();
        }
        self.phase = Phase::Closed;
        // Completes the polls armed on the socket.
        net::shutdown(&*self.fd);
        // What was not sent is dropped (the buffers go back to the pool).
        self.tx.clear();
        // The registry's reference goes (the caller holds another); in-flight
        // bdev I/O keeps its own. Now, not later: a reactor stopping drops
        // what its registry still holds only at thread exit. Deferred only
        // from inside a borrow of the registry.
        let id = self.id;
        let removed = CONNS.with(|m| m.try_borrow_mut().map(|mut m| m.remove(&id)).is_ok());
        if !removed {
            reactor::defer(move || {
                CONNS.with(|m| m.borrow_mut().remove(&id));
            });
        }
    }

    fn alloc_slot(&mut self) -> Result<usize, PduError> {
        if let Some(i) = self.free.pop() {
            return Ok(i as usize);
        }
        let limit = match &self.q {
            Some(q) => (q.sqsize as usize + 1) * 2 + AER_LIMIT,
            None => 8,
        };
        if self.slots.len() >= limit {
            return Err(PduError::new(
                Fes::PduSequenceError,
                0,
                "more commands outstanding than the queue size",
            ));
        }
        self.slots.push(Slot::new());
        Ok(self.slots.len() - 1)
    }

    fn handle_pdu(&mut self, rc: &ConnRc, p: Pdu<'_>, ddgst_ok: bool) -> Result<(), PduError> {
        match (self.phase, p) {
            (Phase::WaitIcReq, Pdu::IcReq(ic)) => {
                pdu::check_icreq(&ic)?;
                let hd = ic.dgst & 1 != 0;
                let dd = ic.dgst & 2 != 0;
                self.dec.cfg.hdgst = hd;
                self.dec.cfg.ddgst = dd;
                self.enc = Encoder {
                    hdgst: hd,
                    ddgst: dd,
                    tx_pda: ic.hpda,
                };
                self.max_r2t = ic.maxr2t.saturating_add(1);
                Encoder::icresp(
                    &mut self.tx.bytes,
                    &IcResp {
                        pfv: 0,
                        cpda: 0,
                        dgst: ic.dgst,
                        maxh2cdata: MAX_H2C_DATA,
                    },
                );
                self.phase = Phase::Ready;
                Ok(())
            }
            (Phase::WaitIcReq, _) => Err(PduError::new(
                Fes::PduSequenceError,
                0,
                "first PDU is not an ICReq",
            )),
            (_, Pdu::IcReq(_)) => Err(PduError::new(Fes::PduSequenceError, 0, "second ICReq")),
            (_, Pdu::H2CTermReq(t, _)) => {
                tracing::warn!(
                    conn = self.id,
                    fes = t.fes,
                    fei = t.fei,
                    "host terminated the connection"
                );
                self.close("H2CTermReq received");
                Ok(())
            }
            (_, Pdu::CapsuleCmd(sqe, icd)) => self.handle_cmd(rc, sqe, icd, ddgst_ok),
            (_, Pdu::H2CData(h, data)) => self.handle_h2c(rc, h, data, ddgst_ok),
            _ => Err(PduError::new(
                Fes::InvalidHeaderField,
                0,
                "unexpected PDU type",
            )),
        }
    }

    fn handle_cmd(
        &mut self,
        rc: &ConnRc,
        sqe: Sqe,
        icd: &[u8],
        ddgst_ok: bool,
    ) -> Result<(), PduError> {
        let i = self.alloc_slot()?;
        {
            let s = &mut self.slots[i];
            s.state = SlotState::Exec;
            s.sqe = sqe;
            s.buf = None;
            s.len = 0;
            s.got = 0;
            s.digest_err = false;
            s.pending = 0;
            s.status = Status::SUCCESS;
        }
        if let Some(q) = self.q.as_mut() {
            q.sqhd = if q.sqhd >= q.sqsize { 0 } else { q.sqhd + 1 };
        }
        if !ddgst_ok {
            self.finish(
                i,
                Done::err(Status::new(
                    sct::GENERIC,
                    sc::COMMAND_TRANSIENT_TRANSPORT_ERROR,
                    false,
                )),
            );
            return Ok(());
        }
        let dir = sqe.direction();
        if dir == DataDir::Bidirectional {
            self.finish(i, Done::err(Status::generic(sc::INVALID_OPCODE)));
            return Ok(());
        }
        let sgl = sqe.sgl;
        match sgl.kind {
            Sgl::DATA_BLOCK_OFFSET => {
                if sgl.len as usize != icd.len() {
                    return Err(PduError::new(
                        Fes::InvalidHeaderField,
                        pdu::off::PLEN,
                        "in-capsule data length differs from the SGL length",
                    ));
                }
                if sgl.addr != 0 {
                    self.finish(i, Done::err(Status::generic(sc::INVALID_SGL_OFFSET)));
                    return Ok(());
                }
                if dir != DataDir::HostToCtrl && !icd.is_empty() {
                    self.finish(
                        i,
                        Done::err(Status::generic(sc::SGL_DESCRIPTOR_TYPE_INVALID)),
                    );
                    return Ok(());
                }
                let mut b = DmaBuf::new(icd.len());
                b.as_mut_slice()[..icd.len()].copy_from_slice(icd);
                let s = &mut self.slots[i];
                s.buf = Some(b);
                s.len = icd.len() as u32;
                s.got = s.len;
                self.execute(rc, i);
            }
            Sgl::TRANSPORT_DATA_BLOCK => {
                if !icd.is_empty() {
                    self.finish(
                        i,
                        Done::err(Status::generic(sc::SGL_DESCRIPTOR_TYPE_INVALID)),
                    );
                    return Ok(());
                }
                let len = sgl.len;
                self.slots[i].len = len;
                if len == 0 || dir == DataDir::None {
                    self.slots[i].len = 0;
                    self.execute(rc, i);
                    return Ok(());
                }
                let max = self.opts.max_xfer().max(ADMIN_ICD);
                if len > max {
                    self.finish(i, Done::err(Status::generic(sc::DATA_SGL_LENGTH_INVALID)));
                    return Ok(());
                }
                if dir == DataDir::HostToCtrl {
                    // Fail before asking for data when the command cannot run.
                    if let Some(st) = self.precheck_write(&sqe, len) {
                        self.finish(i, Done::err(st));
                        return Ok(());
                    }
                    self.slots[i].buf = Some(DmaBuf::new(len as usize));
                    self.slots[i].state = SlotState::AwaitData;
                    let r = R2t {
                        cccid: sqe.cid,
                        ttag: i as u16 + 1,
                        r2to: 0,
                        r2tl: len,
                    };
                    self.enc.r2t(&mut self.tx.bytes, &r);
                } else {
                    self.execute(rc, i);
                }
            }
            _ => {
                return Err(PduError::new(
                    Fes::UnsupportedParameter,
                    pdu::off::SGL + 15,
                    "unsupported SGL descriptor type",
                ));
            }
        }
        Ok(())
    }

    /// Checks of an I/O write done before the R2T (so no data is asked
    /// for a command that fails anyway).
    fn precheck_write(&mut self, sqe: &Sqe, len: u32) -> Option<Status> {
        let q = self.q.as_mut()?;
        if q.qid == 0 || sqe.opc != nvm::WRITE {
            return None;
        }
        if !q.ctrl.ready.load(Ordering::Acquire) {
            return Some(Status::generic(sc::COMMAND_SEQUENCE_ERROR));
        }
        let Some((ns, _)) = q.ns(sqe.nsid) else {
            return Some(Status::generic(sc::INVALID_NAMESPACE_OR_FORMAT));
        };
        nvm_cmd::check_range(ns, sqe.slba(), sqe.nlb() as u64)
            .err()
            .or_else(|| {
                let need = sqe.nlb() as u64 * ns.block_size as u64;
                (need > len as u64).then_some(Status::generic(sc::DATA_SGL_LENGTH_INVALID))
            })
    }

    /// Validate an H2CData header against its R2T; the slot index.
    fn h2c_slot(&self, h: &DataHdr) -> Result<usize, PduError> {
        let i = (h.ttag as usize).wrapping_sub(1);
        let ok = i < self.slots.len() && self.slots[i].state == SlotState::AwaitData;
        if !ok {
            return Err(PduError::new(
                Fes::InvalidHeaderField,
                pdu::off::TTAG,
                "H2CData with an unknown transfer tag",
            ));
        }
        let s = &self.slots[i];
        if s.sqe.cid != h.cccid {
            return Err(PduError::new(
                Fes::InvalidHeaderField,
                pdu::off::CCCID,
                "H2CData CCCID does not match the R2T",
            ));
        }
        if h.datao != s.got {
            return Err(PduError::new(
                Fes::DataOutOfRange,
                pdu::off::DATAO,
                "H2CData offset is not the expected one",
            ));
        }
        if h.datao as u64 + h.datal as u64 > s.len as u64 {
            return Err(PduError::new(
                Fes::DataOutOfRange,
                pdu::off::DATAL,
                "H2CData beyond the transfer length",
            ));
        }
        Ok(i)
    }

    fn handle_h2c(
        &mut self,
        rc: &ConnRc,
        h: DataHdr,
        data: &[u8],
        ddgst_ok: bool,
    ) -> Result<(), PduError> {
        let i = self.h2c_slot(&h)?;
        let (start, end) = (h.datao as usize, h.datao as usize + h.datal as usize);
        if let Some(b) = self.slots[i].buf.as_mut() {
            b.as_mut_slice()[start..end].copy_from_slice(data);
        }
        self.h2c_received(rc, i, end as u32, ddgst_ok, h.last)
    }

    /// The data of one H2CData PDU is in the slot's buffer up to `end`.
    fn h2c_received(
        &mut self,
        rc: &ConnRc,
        i: usize,
        end: u32,
        ddgst_ok: bool,
        last: bool,
    ) -> Result<(), PduError> {
        let s = &mut self.slots[i];
        s.got = end;
        if !ddgst_ok {
            s.digest_err = true;
        }
        if s.got == s.len {
            if s.digest_err {
                self.finish(
                    i,
                    Done::err(Status::new(
                        sct::GENERIC,
                        sc::COMMAND_TRANSIENT_TRANSPORT_ERROR,
                        false,
                    )),
                );
            } else {
                self.slots[i].state = SlotState::Exec;
                self.execute(rc, i);
            }
        } else if last {
            return Err(PduError::new(
                Fes::DataOutOfRange,
                pdu::off::FLAGS,
                "LAST_PDU before the R2T was satisfied",
            ));
        }
        Ok(())
    }

    /// `buf` (the unconsumed receive bytes) starts with an incomplete PDU.
    /// If it is a large H2CData whose header is complete, take its data
    /// bytes so far into the command's buffer and receive the rest straight
    /// into that buffer (no copy). True if direct mode started.
    fn try_direct(&mut self, buf: &[u8]) -> Result<bool, PduError> {
        if buf.len() < pdu::CH_LEN || buf[0] != pdu::PduType::H2CData as u8 {
            return Ok(false);
        }
        let Some(h) = self.dec.header(buf)? else {
            return Ok(false);
        };
        if buf.len() < h.data_off || h.data_len < DIRECT_MIN {
            return Ok(false);
        }
        let Pdu::H2CData(d, _) = pdu::parse_body(&h, buf, &[]) else {
            return Ok(false);
        };
        let i = self.h2c_slot(&d)?;
        let have = buf.len() - h.data_off;
        // Only when a good part of the data is still to come: then every
        // buffered byte after the header is data (none is digest).
        if have + 4096 > h.data_len {
            return Ok(false);
        }
        let start = d.datao as usize;
        if let Some(b) = self.slots[i].buf.as_mut() {
            b.as_mut_slice()[start..start + have]
                .copy_from_slice(&buf[h.data_off..h.data_off + have]);
        } else {
            return Ok(false);
        }
        tracing::trace!(
            conn = self.id,
            slot = i,
            bytes = h.data_len - have,
            "H2CData: direct receive"
        );
        // Everything buffered belongs to this PDU (it is incomplete).
        self.rx_start = self.rx_end;
        self.direct = Some(Direct {
            slot: i,
            off: start + have,
            end: start + h.data_len,
            datao: d.datao,
            ddgst: h.has_ddgst,
            digest_pending: false,
            last: d.last,
        });
        Ok(true)
    }

    /// Direct data complete (and its digest, if any, in `digest`).
    fn direct_done(&mut self, rc: &ConnRc, digest: Option<u32>) -> Result<(), PduError> {
        let Some(d) = self.direct.take() else {
            return Ok(());
        };
        let ok = match (digest, self.slots[d.slot].buf.as_ref()) {
            (Some(want), Some(b)) => pdu::crc32c(&b.as_slice()[d.datao as usize..d.end]) == want,
            _ => true,
        };
        self.h2c_received(rc, d.slot, d.end as u32, ok, d.last)
    }

    /// Complete slot `i`: data (if any and successful), then the CQE, and
    /// free the slot first so the host may reuse the CID at once.
    fn finish(&mut self, i: usize, d: Done) {
        let s = &mut self.slots[i];
        let sqe = s.sqe;
        let buf = s.buf.take();
        s.state = SlotState::Free;
        self.free.push(i as u16);
        if self.phase != Phase::Ready {
            return;
        }
        let (qid, sqhd, sqflow_off) = match &self.q {
            Some(q) => (q.qid, q.sqhd, q.sqflow_off),
            None => (0, 0, false),
        };
        let want = sqe.sgl.len as usize;
        let mut skip_cqe = false;
        if d.status.is_success() && sqe.direction() == DataDir::CtrlToHost && want > 0 {
            let avail = match (&d.data, &buf) {
                (Some(v), _) => v.len(),
                (None, Some(b)) => b.len(),
                (None, None) => 0,
            };
            let n = want.min(avail);
            if n > 0 {
                let success = self.opts.c2h_success && sqflow_off && d.dw0 == 0 && d.dw1 == 0;
                let h = DataHdr {
                    cccid: sqe.cid,
                    ttag: 0,
                    datao: 0,
                    datal: n as u32,
                    last: true,
                    success,
                };
                match (&d.data, buf) {
                    (Some(v), _) => self.enc.data_pdu(&mut self.tx.bytes, true, &h, &v[..n]),
                    (None, Some(b)) => {
                        // Zero copy: the bdev's buffer goes out as its own
                        // iovec between the header and the digest.
                        self.enc.data_header(&mut self.tx.bytes, true, &h);
                        let digest = self.enc.ddgst.then(|| pdu::crc32c(&b.as_slice()[..n]));
                        self.tx.push_buf(b, n);
                        if let Some(dg) = digest {
                            self.tx.bytes.extend_from_slice(&dg.to_le_bytes());
                        }
                    }
                    (None, None) => {}
                }
                skip_cqe = success;
            }
        }
        if !skip_cqe {
            let cqe = Cqe {
                dw0: d.dw0,
                dw1: d.dw1,
                sqhd: self
                    .sqhd_override
                    .take()
                    .unwrap_or(if sqflow_off { 0 } else { sqhd }),
                sqid: qid,
                cid: sqe.cid,
                status: d.status,
            };
            self.enc.capsule_resp(&mut self.tx.bytes, &cqe);
        }
        if qid != 0 {
            stats(self.reactor)
                .completed_nvme_io
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn execute(&mut self, rc: &ConnRc, i: usize) {
        let sqe = self.slots[i].sqe;
        if sqe.opc == fabrics::OPCODE {
            let d = self.fabrics(i, &sqe);
            self.finish(i, d);
            return;
        }
        let Some(q) = self.q.as_ref() else {
            self.finish(i, Done::err(Status::generic(sc::COMMAND_SEQUENCE_ERROR)));
            return;
        };
        if sqe.fuse() != 0 {
            self.finish(i, Done::err(Status::generic(sc::INVALID_FIELD)));
            return;
        }
        if q.qid == 0 {
            if let Some(d) = self.admin(i, &sqe) {
                self.finish(i, d);
            }
        } else {
            self.io(rc, i, &sqe);
        }
    }

    fn fabrics(&mut self, i: usize, sqe: &Sqe) -> Done {
        match sqe.fctype() {
            fabrics::CONNECT => self.connect(i, sqe),
            fabrics::PROPERTY_GET | fabrics::PROPERTY_SET => {
                let Some(q) = self.q.as_ref().filter(|q| q.qid == 0) else {
                    return Done::err(if self.q.is_none() {
                        Status::generic(sc::COMMAND_SEQUENCE_ERROR)
                    } else {
                        Status::generic(sc::INVALID_OPCODE)
                    });
                };
                let ctrl = q.ctrl.clone();
                if sqe.fctype() == fabrics::PROPERTY_GET {
                    ctrlr::property_get(&ctrl, &self.opts, sqe)
                } else {
                    let (d, action) = ctrlr::property_set(&ctrl, sqe);
                    if action == CcAction::CloseIoQueues {
                        target::close_io_queues(&ctrl);
                    }
                    d
                }
            }
            _ => Done::err(Status::generic(sc::INVALID_OPCODE)),
        }
    }

    fn connect(&mut self, i: usize, sqe: &Sqe) -> Done {
        if self.q.is_some() {
            return Done::err(Status::generic(sc::COMMAND_SEQUENCE_ERROR));
        }
        let at = connect::QueueInfo {
            conn: self.id,
            reactor: self.reactor,
            listen: &self.listen,
            peer: &self.peer,
        };
        let slot = &self.slots[i];
        let a = match connect::admit(&at, &self.opts, sqe, slot.buf.as_ref(), slot.len) {
            Ok(a) => a,
            Err(d) => return d,
        };
        let st = stats(self.reactor);
        if a.qid == 0 {
            self.start_keep_alive(a.ctrl.clone());
            st.admin_qpairs.fetch_add(1, Ordering::Relaxed);
            st.current_admin_qpairs.fetch_add(1, Ordering::Relaxed);
        } else {
            self.dec.cfg.max_icd = self.opts.in_capsule_data_size.max(CONNECT_DATA_SIZE as u32);
            st.io_qpairs.fetch_add(1, Ordering::Relaxed);
            st.current_io_qpairs.fetch_add(1, Ordering::Relaxed);
        }
        st.current_unassociated_qpairs
            .fetch_sub(1, Ordering::Relaxed);
        let cntlid = a.ctrl.cntlid;
        self.q = Some(Queue {
            ctrl: a.ctrl,
            qid: a.qid,
            sqsize: a.sqsize,
            sqhd: 0,
            sqflow_off: a.sqflow_off,
            ns_gen: u64::MAX,
            ns_cache: Vec::new(),
        });
        // The Connect CQE reports SQHD FFFFh when SQ flow control is off.
        if a.sqflow_off {
            self.sqhd_override = Some(0xFFFF);
        }
        Done::dw0(cntlid as u32)
    }

    fn start_keep_alive(&mut self, ctrl: Arc<Ctrl>) {
        let id = self.id;
        self.ka_poller = Some(reactor::poller_register(
            Duration::from_millis(250),
            move || {
                let kato = match ctrl.kato_ms.load(Ordering::Acquire) {
                    0 if ctrl.is_discovery() => DISCOVERY_IDLE_MS,
                    0 => return reactor::PollStatus::Idle,
                    k => k,
                };
                let idle =
                    reactor::now_ns().saturating_sub(ctrl.last_ka_ns.load(Ordering::Acquire));
                if idle > kato as u64 * 1_000_000 {
                    tracing::warn!(nqn = %ctrl.subsys.nqn, cntlid = ctrl.cntlid, kato_ms = kato, "keep-alive timeout; destroying the controller");
                    let c = ctrl.clone();
                    reactor::defer(move || {
                        target::destroy_ctrl(&c);
                        close_conn(id, "keep-alive timeout");
                    });
                    return reactor::PollStatus::Busy;
                }
                reactor::PollStatus::Idle
            },
        ));
    }

    /// Admin commands; `None` when the command stays pending (AER).
    fn admin(&mut self, i: usize, sqe: &Sqe) -> Option<Done> {
        let q = self.q.as_ref().expect("admin queue");
        let ctrl = q.ctrl.clone();
        let disc = ctrl.is_discovery();
        if disc {
            // A discovery controller with KATO 0 is reaped after idling.
            ctrl.last_ka_ns.store(reactor::now_ns(), Ordering::Release);
        }
        let enabled = lock(&ctrl.state).csts & 1 != 0;
        if !enabled {
            return Some(Done::err(Status::generic(sc::COMMAND_SEQUENCE_ERROR)));
        }
        let xfer = self.slots[i].len;
        Some(match sqe.opc {
            admin::IDENTIFY => ctrlr::identify(&ctrl, &self.opts, sqe),
            admin::GET_LOG_PAGE => ctrlr::get_log_page(&ctrl, sqe, &self.local_ip, xfer),
            admin::SET_FEATURES => ctrlr::set_features(&ctrl, &self.opts, sqe),
            admin::GET_FEATURES => ctrlr::get_features(&ctrl, sqe),
            admin::KEEP_ALIVE => {
                ctrl.last_ka_ns.store(reactor::now_ns(), Ordering::Release);
                Done::ok()
            }
            admin::ASYNC_EVENT_REQUEST => {
                if self.aers.len() >= AER_LIMIT {
                    return Some(Done::err(Status::specific(csc::ASYNC_EVENT_LIMIT_EXCEEDED)));
                }
                self.aers.push(i as u16);
                self.deliver_events();
                return None;
            }
            admin::ABORT if !disc => Done::dw0(1),
            _ => Done::err(Status::generic(sc::INVALID_OPCODE)),
        })
    }

    fn deliver_events(&mut self) {
        let Some(q) = self.q.as_ref() else { return };
        let ctrl = q.ctrl.clone();
        loop {
            if self.aers.is_empty() {
                return;
            }
            let ev = {
                let mut st = lock(&ctrl.state);
                if st.events.is_empty() {
                    return;
                }
                let ev = st.events.remove(0);
                st.masked.push(ev);
                ev
            };
            let slot = self.aers.remove(0) as usize;
            self.finish(slot, Done::dw0(ev));
        }
    }

    fn io(&mut self, rc: &ConnRc, i: usize, sqe: &Sqe) {
        let q = self.q.as_mut().expect("I/O queue");
        if !q.ctrl.ready.load(Ordering::Acquire) {
            self.finish(i, Done::err(Status::generic(sc::COMMAND_SEQUENCE_ERROR)));
            return;
        }
        if !nvm_cmd::is_supported(sqe.opc) {
            self.finish(i, Done::err(Status::generic(sc::INVALID_OPCODE)));
            return;
        }
        let Some((ns, ch)) = q.ns(sqe.nsid) else {
            self.finish(
                i,
                Done::err(Status::generic(sc::INVALID_NAMESPACE_OR_FORMAT)),
            );
            return;
        };
        let (ns, ch) = (ns.clone(), ch.clone());
        let done = nvm_cmd::Completion {
            done: io_done,
            arg: rc.clone(),
            ctx: i as u64,
        };
        stats(self.reactor)
            .pending_bdev_io
            .fetch_add(1, Ordering::Relaxed);
        let max_xfer = self.opts.max_xfer();
        let slot = &mut self.slots[i];
        let cmd = nvm_cmd::Command {
            sqe,
            ns: &ns,
            ch: &ch,
            data: &mut slot.buf,
            data_len: slot.len,
            max_xfer,
            done: &done,
        };
        match nvm_cmd::submit(cmd) {
            nvm_cmd::Submitted::Pending(n) => slot.pending = n,
            nvm_cmd::Submitted::Now(st) => self.fail_pending(i, st),
        }
    }

    fn fail_pending(&mut self, i: usize, st: Status) {
        stats(self.reactor)
            .pending_bdev_io
            .fetch_sub(1, Ordering::Relaxed);
        self.finish(i, Done::err(st));
    }
}

/// Completion of a command's bdev I/O: `cb_arg` is the connection,
/// `cb_ctx` the command's slot.
fn io_done(mut io: Box<BdevIo>) {
    let Some(rc) = io
        .cb_arg
        .take()
        .and_then(|a| a.downcast::<RefCell<Conn>>().ok())
    else {
        tracing::error!(io = ?io, "NVMe/TCP I/O completed without its connection");
        return;
    };
    let i = io.cb_ctx as usize;
    let mut c = rc.borrow_mut();
    let st = nvm_cmd::status_of(io.status);
    let s = &mut c.slots[i];
    if s.pending > 1 {
        s.pending -= 1;
        if !st.is_success() {
            s.status = st;
        }
        io.free();
        return;
    }
    let st = if s.status.is_success() { st } else { s.status };
    stats(c.reactor)
        .pending_bdev_io
        .fetch_sub(1, Ordering::Relaxed);
    if io.io_type == IoType::Read && st.is_success() {
        c.slots[i].buf = io.buf.take();
    }
    if c.phase == Phase::Closed {
        let s = &mut c.slots[i];
        s.state = SlotState::Free;
        s.buf = None;
        io.free();
        return;
    }
    if !st.is_success() {
        tracing::debug!(conn = c.id, io = ?io, status = %st, "I/O failed");
    }
    io.free();
    c.finish(i, Done::err(st));
}

/// At most this many iovecs per sendmsg (UIO_MAXIOV); the rest goes next.
const MAX_IOV: usize = 1024;

/// The connections of this reactor as JSON for `nvmf_subsystem_get_qpairs`.
pub fn local_qpairs(nqn: &str) -> Vec<serde_json::Value> {
    let r = reactor::current().unwrap_or(0);
    CONNS.with(|m| {
        m.borrow()
            .values()
            .filter_map(|rc| {
                let c = rc.borrow();
                let q = c.q.as_ref()?;
                if q.ctrl.subsys.nqn != nqn || c.phase != Phase::Ready {
                    return None;
                }
                Some(serde_json::json!({
                    "cntlid": q.ctrl.cntlid,
                    "qid": q.qid,
                    "state": "active",
                    "thread": format!("nvmf_tgt_poll_group_{r:03}"),
                    "hostnqn": q.ctrl.hostnqn,
                    "listen_address": c.listen.to_json(),
                    "peer_address": {
                        "trtype": "TCP",
                        "adrfam": c.listen.adrfam.name(),
                        "traddr": c.peer.rsplit_once(':').map(|(a, _)| a.trim_matches(|x| x == '[' || x == ']')).unwrap_or(""),
                        "trsvcid": c.peer.rsplit_once(':').map(|(_, p)| p).unwrap_or(""),
                    },
                }))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queue of PDU bytes and buffers, with the byte stream it stands for.
    fn queue() -> (TxQueue, Vec<u8>) {
        let mut q = TxQueue::default();
        let mut want = Vec::new();
        let mut tag = 0u8;
        let mut bytes = |q: &mut TxQueue, want: &mut Vec<u8>, n: usize| {
            for _ in 0..n {
                tag = tag.wrapping_add(1);
                q.bytes.push(tag);
                want.push(tag);
            }
        };
        for (hdr, buf, tail) in [(24, 100, 4), (16, 0, 0), (24, 37, 0), (0, 5, 16)] {
            bytes(&mut q, &mut want, hdr);
            if buf > 0 {
                let mut b = DmaBuf::new(buf + 3);
                for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
                    *x = 0x80 | i as u8;
                }
                want.extend_from_slice(&b.as_slice()[..buf]);
                q.push_buf(b, buf);
            }
            bytes(&mut q, &mut want, tail);
        }
        (q, want)
    }

    fn gathered(q: &TxQueue) -> Vec<u8> {
        let mut iov = Vec::new();
        let n = q.iovecs(&mut iov);
        let mut out = Vec::new();
        for v in &iov {
            // SAFETY: the iovecs point into `q`, alive and unchanged here.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
            });
        }
        assert_eq!(out.len(), n);
        out
    }

    #[test]
    fn partial_sends_resume_where_they_stopped() {
        let (q, want) = queue();
        assert_eq!(gathered(&q), want);
        // Every split point, twice over (in a header run, a buffer, a
        // digest, the tail), with and without compaction in between.
        for a in 0..=want.len() {
            for b in [0, 1, 7, 40] {
                for compact in [false, true] {
                    let (mut q, _) = queue();
                    let bufs = q.bufs.len();
                    let done = q.advance(a);
                    assert_eq!(done, a == want.len());
                    if compact {
                        q.compact();
                        // Buffers wholly sent are gone; the rest stay.
                        assert!(q.bufs.len() <= bufs);
                    }
                    assert_eq!(gathered(&q), want[a..], "after {a}");
                    assert_eq!(q.pending(), want.len() - a);
                    let b = b.min(want.len() - a);
                    q.advance(b);
                    if compact {
                        q.compact();
                    }
                    assert_eq!(gathered(&q), want[a + b..], "after {a} + {b}");
                }
            }
        }
    }

    #[test]
    fn compaction_frees_sent_buffers_and_keeps_order() {
        let (mut q, want) = queue();
        // Past the first buffer (24 + 100 bytes) and into the next run.
        q.advance(130);
        q.compact();
        assert_eq!(q.bufs.len(), 2);
        assert_eq!(q.off, 0);
        assert_eq!(gathered(&q), want[130..]);
        // New output after a compaction goes after what is left.
        q.bytes.extend_from_slice(b"more");
        let mut w = want[130..].to_vec();
        w.extend_from_slice(b"more");
        assert_eq!(gathered(&q), w);
        assert!(q.advance(w.len()));
        assert!(q.bytes.is_empty() && q.bufs.is_empty() && q.off == 0);
    }
}
