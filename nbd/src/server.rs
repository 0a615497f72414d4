//! The NBD server: listeners (TCP or Unix), exports of bdevs, and one task
//! per client connection.
//!
//! * Listeners accept on reactor 0 (a poller doing non-blocking accepts) and
//!   hand each connection to a reactor, round-robin; the connection stays
//!   there, with its own channel to the exported bdev.
//! * Handshake: fixed newstyle only; `NBD_OPT_GO`, `NBD_OPT_INFO`,
//!   `NBD_OPT_LIST`, `NBD_OPT_EXPORT_NAME`, `NBD_OPT_STRUCTURED_REPLY`,
//!   `NBD_OPT_{SET,LIST}_META_CONTEXT` (`base:allocation`), `NBD_OPT_ABORT`.
//! * Transmission: requests are pipelined (at most [`MAX_INFLIGHT`] per
//!   connection); replies go out as their I/O completes, structured when
//!   agreed. A request that cannot be honoured gets an error reply; a
//!   stream that cannot be followed (bad magic, oversized write payload)
//!   closes the connection.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use bdev::{BdevIo, IoChannel, IoType};
use reactor::net;
use reactor::DmaBuf;
use serde_json::{json, Value};

use crate::proto::*;
use crate::sock::Sock;
use crate::NbdError;
use reactor::sync::{call_on, lock};

/// Requests in flight per connection before the server stops reading.
pub const MAX_INFLIGHT: u32 = 64;
/// Largest read or write payload (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The `base:allocation` context id this server hands out.
const META_ID: u32 = 1;

pub struct Export {
    pub name: String,
    pub bdev_name: String,
    pub writable: bool,
    desc: Mutex<Option<bdev::Desc>>,
    removed: AtomicBool,
    conns: AtomicU32,
}

impl Export {
    fn json(&self) -> Value {
        json!({
            "name": self.name,
            "bdev_name": self.bdev_name,
            "writable": self.writable,
            "connections": self.conns.load(Ordering::Relaxed),
        })
    }
}

struct Listener {
    listen: String,
    unix: Option<PathBuf>,
    /// The listening socket, owned by its accept task on reactor 0, which
    /// closes it once `stop` is set and the socket shut down.
    fd: RawFd,
    stop: Arc<AtomicBool>,
}

#[derive(Default)]
struct Registry {
    listeners: Vec<Listener>,
    exports: Vec<Arc<Export>>,
    rr: u32,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    listeners: Vec::new(),
    exports: Vec::new(),
    rr: 0,
});
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

fn reg() -> std::sync::MutexGuard<'static, Registry> {
    lock(&REGISTRY)
}

fn find_export(name: &str) -> Option<Arc<Export>> {
    let r = reg();
    if let Some(e) = r
        .exports
        .iter()
        .find(|e| e.name == name && !e.removed.load(Ordering::Acquire))
    {
        return Some(e.clone());
    }
    // The default export (empty name) is the only one, when there is one.
    if name.is_empty() && r.exports.len() == 1 {
        return r.exports.first().cloned();
    }
    None
}

// ---------------------------------------------------------------------------
// Listeners

/// `nbd_server_start`: listen on `HOST:PORT` or an absolute Unix socket path.
pub fn start(listen: &str) -> Result<(), NbdError> {
    if reg().listeners.iter().any(|l| l.listen == listen) {
        return Err(NbdError::Exists(format!(
            "the NBD server already listens on {listen}"
        )));
    }
    let (fd, unix): (OwnedFd, Option<PathBuf>) = if listen.starts_with('/') {
        let p = PathBuf::from(listen);
        if p.exists() {
            // A socket left by a process that died: nobody answers on it.
            use std::os::unix::fs::FileTypeExt;
            let is_sock = std::fs::metadata(&p).is_ok_and(|m| m.file_type().is_socket());
            if is_sock && net::connect_unix(&p).is_err() {
                let _ = std::fs::remove_file(&p);
            } else {
                return Err(NbdError::Exists(format!(
                    "'{listen}' exists (in use or not a socket)"
                )));
            }
        }
        let fd = net::listen_unix(&p, 128).map_err(|e| NbdError::Invalid(e.to_string()))?;
        (fd, Some(p))
    } else {
        let (host, port) = listen.rsplit_once(':').ok_or_else(|| {
            NbdError::Invalid(format!(
                "listen '{listen}' is neither HOST:PORT nor an absolute socket path"
            ))
        })?;
        let port: u16 = port.parse().map_err(|_| {
            NbdError::Invalid(format!("listen '{listen}': '{port}' is not a port number"))
        })?;
        let addr = net::resolve(host, port)
            .map_err(|e| NbdError::Invalid(format!("listen '{listen}': {e}")))?;
        let fd = net::listen_tcp(addr)
            .map_err(|e| NbdError::Invalid(format!("cannot listen on {addr}: {e}")))?;
        (fd, None)
    };
    net::set_nonblocking(&fd, true).map_err(|e| NbdError::Io(e.to_string()))?;
    let stop = Arc::new(AtomicBool::new(false));
    reg().listeners.push(Listener {
        listen: listen.to_string(),
        unix,
        fd: fd.as_raw_fd(),
        stop: stop.clone(),
    });
    reactor::spawn_local(accept_loop(fd, listen.to_string(), stop));
    tracing::info!(listen, "NBD server listening");
    Ok(())
}

/// Accept while the listening socket is readable; sleep on its readiness
/// (io_uring poll) otherwise. Ends when stopped (the socket is shut down,
/// which completes the poll) and closes the socket.
async fn accept_loop(fd: OwnedFd, listen: String, stop: Arc<AtomicBool>) {
    loop {
        net::wait_fd(fd.as_raw_fd(), libc::POLLIN as u32).await;
        if stop.load(Ordering::Acquire) {
            break;
        }
        if !accept_some(&fd, &listen) {
            // Nothing came (a failed accept): do not spin on an error.
            reactor::sleep(Duration::from_millis(10)).await;
        }
    }
    tracing::info!(listen, "NBD listener closed");
}

/// Accept what is pending; whether anything was.
fn accept_some(fd: &OwnedFd, listen: &str) -> bool {
    let mut busy = false;
    loop {
        match nix::sys::socket::accept4(
            fd.as_raw_fd(),
            nix::sys::socket::SockFlag::SOCK_CLOEXEC | nix::sys::socket::SockFlag::SOCK_NONBLOCK,
        ) {
            Ok(c) => {
                busy = true;
                let n = reactor::num_reactors().max(1);
                let r = {
                    let mut g = reg();
                    g.rr = g.rr.wrapping_add(1);
                    g.rr % n
                };
                let listen = listen.to_string();
                reactor::send(r, move || {
                    // SAFETY: accept4 returned this fd; it is owned from here.
                    let fd = unsafe { OwnedFd::from_raw_fd(c) };
                    reactor::spawn_local(serve(Sock::from_fd(fd), listen));
                });
            }
            Err(nix::errno::Errno::EAGAIN) => return true,
            Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::ECONNABORTED) => {}
            Err(e) => {
                tracing::warn!(listen, error = %e, "NBD accept failed");
                return busy;
            }
        }
    }
}

/// `nbd_server_stop`: stop listening and close every client connection.
/// The exports stay (a later `nbd_server_start` serves them again).
pub async fn stop() -> Result<(), NbdError> {
    let ls: Vec<Listener> = std::mem::take(&mut reg().listeners);
    if ls.is_empty() {
        return Err(NbdError::NotFound("the NBD server is not running".into()));
    }
    for l in ls {
        l.stop.store(true, Ordering::Release);
        // SAFETY: the accept task, on this reactor (0, where RPCs run),
        // owns the fd and closes it only after its poll completes and it
        // sees `stop`; it cannot run before this shutdown, which completes
        // that poll.
        let fd = unsafe { BorrowedFd::borrow_raw(l.fd) };
        net::shutdown(&fd);
        if let Some(p) = l.unix {
            let _ = std::fs::remove_file(p);
        }
        tracing::info!(listen = %l.listen, "NBD server stopped listening");
    }
    close_conns(None).await;
    Ok(())
}

pub fn listeners() -> Vec<String> {
    reg().listeners.iter().map(|l| l.listen.clone()).collect()
}

// ---------------------------------------------------------------------------
// Exports

/// `nbd_export_add`.
pub fn export_add(
    bdev_name: &str,
    name: Option<String>,
    writable: bool,
) -> Result<String, NbdError> {
    let name = name.unwrap_or_else(|| bdev_name.to_string());
    if name.len() > MAX_NAME_LEN {
        return Err(NbdError::Invalid(
            "export name longer than 4096 bytes".into(),
        ));
    }
    if reg().exports.iter().any(|e| e.name == name) {
        return Err(NbdError::Exists(format!("export '{name}' already exists")));
    }
    let n2 = name.clone();
    let desc = bdev::open(bdev_name, writable, move |ev| {
        if ev == bdev::BdevEvent::Remove {
            let n = n2.clone();
            reactor::spawn_on(0, move || async move {
                tracing::warn!(export = %n, "exported bdev removed; removing the export");
                let _ = export_remove(&n).await;
            });
        }
    })
    .map_err(NbdError::Bdev)?;
    let e = Arc::new(Export {
        name: name.clone(),
        bdev_name: desc.bdev().name().to_string(),
        writable,
        desc: Mutex::new(Some(desc)),
        removed: AtomicBool::new(false),
        conns: AtomicU32::new(0),
    });
    reg().exports.push(e);
    tracing::info!(export = %name, bdev = bdev_name, writable, "NBD export added");
    Ok(name)
}

/// `nbd_export_remove`: its clients are disconnected, then the bdev is
/// released.
pub async fn export_remove(name: &str) -> Result<(), NbdError> {
    let e = {
        let mut r = reg();
        let i = r
            .exports
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| NbdError::NotFound(format!("no export named '{name}'")))?;
        r.exports.remove(i)
    };
    e.removed.store(true, Ordering::Release);
    close_conns(Some(name.to_string())).await;
    while e.conns.load(Ordering::Acquire) > 0 {
        reactor::sleep(Duration::from_millis(1)).await;
    }
    drop(lock(&e.desc).take());
    tracing::info!(export = %name, "NBD export removed");
    Ok(())
}

pub fn exports_json() -> Vec<Value> {
    reg().exports.iter().map(|e| e.json()).collect()
}

/// `save_config`: listeners, then exports.
pub fn config_json() -> Vec<Value> {
    let r = reg();
    let mut out: Vec<Value> = r
        .listeners
        .iter()
        .map(|l| json!({"method": "nbd_server_start", "params": {"listen": l.listen}}))
        .collect();
    out.extend(r.exports.iter().map(|e| {
        json!({"method": "nbd_export_add", "params": {
            "bdev_name": e.bdev_name, "name": e.name, "writable": e.writable}})
    }));
    out
}

/// Clean shutdown: stop listening, disconnect, release every bdev.
pub async fn shutdown() {
    let _ = stop().await;
    let names: Vec<String> = reg().exports.iter().map(|e| e.name.clone()).collect();
    for n in names {
        let _ = export_remove(&n).await;
    }
}

// ---------------------------------------------------------------------------
// Connections

struct ConnEntry {
    id: u64,
    sock: Weak<Sock>,
    export: Option<String>,
}

thread_local! {
    static CONNS: RefCell<Vec<ConnEntry>> = const { RefCell::new(Vec::new()) };
}

/// Shut down the connections of `export` (all when `None`) on every reactor.
async fn close_conns(export: Option<String>) {
    for r in 0..reactor::num_reactors() {
        let ex = export.clone();
        call_on(r, move || {
            CONNS.with(|c| {
                for e in c.borrow().iter() {
                    if ex.is_none() || e.export == ex {
                        if let Some(s) = e.sock.upgrade() {
                            s.shutdown();
                        }
                    }
                }
            })
        })
        .await;
    }
}

/// What a connection serves after the handshake.
struct Session {
    export: Arc<Export>,
    structured: bool,
    meta: bool,
}

#[derive(Default)]
struct Out {
    tx: Vec<u8>,
    tx_waker: Option<Waker>,
    inflight: u32,
    rx_waker: Option<Waker>,
    closed: bool,
}

type OutRc = Rc<RefCell<Out>>;

fn push(out: &OutRc, bytes: &[&[u8]]) {
    let mut o = out.borrow_mut();
    for b in bytes {
        o.tx.extend_from_slice(b);
    }
    if let Some(w) = o.tx_waker.take() {
        w.wake();
    }
}

fn done(out: &OutRc) {
    let mut o = out.borrow_mut();
    o.inflight -= 1;
    if let Some(w) = o.rx_waker.take() {
        w.wake();
    }
}

async fn serve(sock: Sock, listen: String) {
    let sock = Rc::new(sock);
    let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    CONNS.with(|c| {
        c.borrow_mut().push(ConnEntry {
            id,
            sock: Rc::downgrade(&sock),
            export: None,
        })
    });
    match negotiate(&sock, id).await {
        Ok(Some(s)) => {
            let ex = s.export.clone();
            tracing::debug!(conn = id, export = %ex.name, %listen, structured = s.structured, "NBD client connected");
            transmission(&sock, s).await;
            ex.conns.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(conn = id, %listen, error = %e, "NBD handshake ended"),
    }
    sock.shutdown();
    CONNS.with(|c| c.borrow_mut().retain(|e| e.id != id));
}

async fn opt_reply(sock: &Sock, opt: u32, ty: u32, data: &[u8]) -> Result<(), String> {
    sock.write_all(&encode_option_reply(opt, ty, data))
        .await
        .map_err(|e| e.to_string())
}

fn transmission_flags(e: &Export, structured: bool) -> u16 {
    // Multi-conn is safe: a flush reaches the bdev itself, so it covers
    // writes completed on every connection.
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN;
    if structured {
        f |= TF_SEND_DF;
    }
    if !e.writable {
        f |= TF_READ_ONLY;
    } else {
        // Trim is advisory and write-zeroes falls back to writing zeroes, so
        // both are always offered on writable exports.
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
    }
    f
}

fn export_geometry(e: &Export) -> Option<(u64, u32)> {
    lock(&e.desc)
        .as_ref()
        .map(|d| (d.bdev().size_bytes(), d.bdev().block_size()))
}

/// The handshake; `Some` once the client entered transmission.
async fn negotiate(sock: &Sock, id: u64) -> Result<Option<Session>, String> {
    let io = |e: std::io::Error| e.to_string();
    sock.write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        .await
        .map_err(io)?;
    let mut cf = [0u8; 4];
    sock.read_exact(&mut cf).await.map_err(io)?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & !(CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES) != 0 {
        return Err(format!("unknown client flags {cflags:#x}"));
    }
    let no_zeroes = cflags & CFLAG_NO_ZEROES != 0;
    let (mut structured, mut meta) = (false, false);
    loop {
        let mut h = [0u8; OPT_HDR_LEN];
        sock.read_exact(&mut h).await.map_err(io)?;
        let (opt, len) = decode_option_header(&h).map_err(|e| format!("bad option: {e}"))?;
        if len > MAX_OPT_LEN {
            return Err(format!("option {opt} of {len} bytes"));
        }
        let mut d = vec![0u8; len as usize];
        sock.read_exact(&mut d).await.map_err(io)?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&d).into_owned();
                // No way to refuse politely here: the protocol says close.
                let e = find_export(&name).ok_or_else(|| format!("no export '{name}'"))?;
                let (size, _) = export_geometry(&e).ok_or("export going away")?;
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&size.to_be_bytes());
                b.extend_from_slice(&transmission_flags(&e, structured).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                sock.write_all(&b).await.map_err(io)?;
                return Ok(Some(enter(e, structured, meta, id)));
            }
            OPT_ABORT => {
                let _ = opt_reply(sock, opt, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !d.is_empty() {
                    opt_reply(sock, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                let names: Vec<String> = reg().exports.iter().map(|e| e.name.clone()).collect();
                for n in names {
                    let mut p = (n.len() as u32).to_be_bytes().to_vec();
                    p.extend_from_slice(n.as_bytes());
                    opt_reply(sock, opt, REP_SERVER, &p).await?;
                }
                opt_reply(sock, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let (name, infos) = match decode_go(&d) {
                    Ok(x) => x,
                    Err(e) => {
                        opt_reply(sock, opt, REP_ERR_INVALID, e.to_string().as_bytes()).await?;
                        continue;
                    }
                };
                let Some(e) = find_export(&name) else {
                    let msg = format!("no export named '{name}'");
                    opt_reply(sock, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                let Some((size, bs)) = export_geometry(&e) else {
                    opt_reply(sock, opt, REP_ERR_SHUTDOWN, b"export going away").await?;
                    continue;
                };
                let flags = transmission_flags(&e, structured);
                opt_reply(sock, opt, REP_INFO, &encode_info_export(size, flags)).await?;
                opt_reply(
                    sock,
                    opt,
                    REP_INFO,
                    &encode_info_block_size(bs, bs.max(4096), MAX_PAYLOAD),
                )
                .await?;
                if infos.contains(&INFO_NAME) {
                    let mut p = INFO_NAME.to_be_bytes().to_vec();
                    p.extend_from_slice(e.name.as_bytes());
                    opt_reply(sock, opt, REP_INFO, &p).await?;
                }
                opt_reply(sock, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(Some(enter(e, structured, meta, id)));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !d.is_empty() {
                    opt_reply(
                        sock,
                        opt,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                    continue;
                }
                structured = true;
                opt_reply(sock, opt, REP_ACK, &[]).await?;
            }
            OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT => {
                if !structured {
                    opt_reply(
                        sock,
                        opt,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let (name, queries) = match decode_meta_context(&d) {
                    Ok(x) => x,
                    Err(e) => {
                        opt_reply(sock, opt, REP_ERR_INVALID, e.to_string().as_bytes()).await?;
                        continue;
                    }
                };
                if find_export(&name).is_none() {
                    let msg = format!("no export named '{name}'");
                    opt_reply(sock, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                }
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    meta = false;
                }
                let matches = |q: &str| q == BASE_ALLOCATION || (!set && q == "base:");
                if (queries.is_empty() && !set) || queries.iter().any(|q| matches(q)) {
                    let mut p = META_ID.to_be_bytes().to_vec();
                    p.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    opt_reply(sock, opt, REP_META_CONTEXT, &p).await?;
                    if set {
                        meta = true;
                    }
                }
                opt_reply(sock, opt, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => {
                opt_reply(sock, opt, REP_ERR_UNSUP, b"TLS is not supported").await?;
            }
            _ => {
                opt_reply(sock, opt, REP_ERR_UNSUP, b"unsupported option").await?;
            }
        }
    }
}

fn enter(export: Arc<Export>, structured: bool, meta: bool, id: u64) -> Session {
    export.conns.fetch_add(1, Ordering::AcqRel);
    CONNS.with(|c| {
        if let Some(e) = c.borrow_mut().iter_mut().find(|e| e.id == id) {
            e.export = Some(export.name.clone());
        }
    });
    Session {
        export,
        structured,
        meta,
    }
}

async fn writer(out: OutRc, sock: Rc<Sock>) {
    loop {
        let data = std::future::poll_fn(|cx| {
            let mut o = out.borrow_mut();
            if !o.tx.is_empty() {
                return Poll::Ready(Some(std::mem::take(&mut o.tx)));
            }
            if o.closed {
                return Poll::Ready(None);
            }
            o.tx_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        let Some(data) = data else { return };
        if sock.write_all(&data).await.is_err() {
            sock.shutdown();
            return;
        }
    }
}

/// Send the reply of a request without payload.
fn reply_status(out: &OutRc, structured: bool, cookie: u64, err: u32) {
    if structured && err != 0 {
        push(out, &[&encode_structured_error(cookie, err, "")]);
    } else {
        push(out, &[&encode_simple_reply(err, cookie)]);
    }
}

/// Why a request is refused before any I/O (NBD errno), if it is.
fn check(r: &Request, s: &Session, size: u64, bs: u64) -> Option<u32> {
    let known =
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
    if r.flags & !known != 0 {
        return Some(EINVAL);
    }
    let write = matches!(r.ty, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if write && !s.export.writable {
        return Some(EPERM);
    }
    if r.ty == CMD_FLUSH {
        return None;
    }
    if r.ty == CMD_BLOCK_STATUS && (!s.meta || r.length == 0) {
        return Some(EINVAL);
    }
    if r.flags & CMD_FLAG_FAST_ZERO != 0 {
        // Zeroing is not promised to be faster than writing.
        return Some(ENOTSUP);
    }
    if r.ty == CMD_READ && r.length > MAX_PAYLOAD {
        return Some(EINVAL);
    }
    let end = r.offset.checked_add(r.length as u64);
    if end.is_none_or(|e| e > size) {
        return Some(if write { ENOSPC } else { EINVAL });
    }
    if !r.offset.is_multiple_of(bs) || !(r.length as u64).is_multiple_of(bs) {
        return Some(EINVAL);
    }
    None
}

async fn transmission(sock: &Rc<Sock>, s: Session) {
    if s.export.removed.load(Ordering::Acquire) {
        // Removed while this client was still negotiating.
        return;
    }
    let ch: Option<IoChannel> = lock(&s.export.desc).as_ref().map(|d| d.channel());
    let Some(ch) = ch else { return };
    let (size, bs) = (ch.bdev().size_bytes(), ch.bdev().block_size() as u64);
    let out: OutRc = Rc::default();
    reactor::spawn_local(writer(out.clone(), sock.clone()));
    let why = loop {
        // Bounded pipelining: wait for room before reading the next request.
        std::future::poll_fn(|cx| {
            let mut o = out.borrow_mut();
            if o.inflight < MAX_INFLIGHT {
                Poll::Ready(())
            } else {
                o.rx_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        let mut h = [0u8; REQUEST_LEN];
        if let Err(e) = sock.read_exact(&mut h).await {
            break e.to_string();
        }
        let r = match Request::decode(&h) {
            Ok(r) => r,
            Err(e) => break format!("bad request: {e}"),
        };
        if r.ty == CMD_DISC {
            break String::new();
        }
        let mut payload = None;
        if r.ty == CMD_WRITE {
            if r.length > MAX_PAYLOAD {
                break format!("write payload of {} bytes exceeds {MAX_PAYLOAD}", r.length);
            }
            let mut b = DmaBuf::new(r.length.max(1) as usize);
            if let Err(e) = sock
                .read_exact(&mut b.as_mut_slice()[..r.length as usize])
                .await
            {
                break e.to_string();
            }
            payload = Some(b);
        }
        if let Some(err) = check(&r, &s, size, bs) {
            reply_status(&out, s.structured, r.cookie, err);
            continue;
        }
        out.borrow_mut().inflight += 1;
        submit(&ch, &out, &s, r, payload, bs);
    };
    if !why.is_empty() {
        tracing::debug!(export = %s.export.name, reason = %why, "NBD connection closing");
    }
    // Let what is in flight finish and its replies go out.
    std::future::poll_fn(|cx| {
        let mut o = out.borrow_mut();
        if o.inflight == 0 {
            Poll::Ready(())
        } else {
            o.rx_waker = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await;
    let mut o = out.borrow_mut();
    o.closed = true;
    if let Some(w) = o.tx_waker.take() {
        w.wake();
    }
}

/// Largest zero buffer a write-zeroes emulation holds (SPDK's bdev layer
/// uses 1 MiB too).
const ZERO_CHUNK_BYTES: u64 = 1 << 20;

/// Write zeroes on a bdev without native write-zeroes: writes of one
/// zeroed buffer of at most [`ZERO_CHUNK_BYTES`], one after another. A
/// request may span 4 GiB; a buffer of its full size would let one client
/// exhaust the target's memory.
fn zero_by_writes(
    ch: &IoChannel,
    offset_blocks: u64,
    num_blocks: u64,
    fua: bool,
    done: impl FnOnce(bdev::IoStatus) + 'static,
) {
    let per = (ZERO_CHUNK_BYTES / ch.bdev().block_size() as u64).max(1);
    let bytes = num_blocks.min(per) * ch.bdev().block_size() as u64;
    let zeroes = DmaBuf::zeroed(bytes as usize);
    zero_chunk(
        ch.clone(),
        offset_blocks,
        num_blocks,
        per,
        fua,
        zeroes,
        Box::new(done),
    );
}

fn zero_chunk(
    ch: IoChannel,
    offset_blocks: u64,
    left: u64,
    per: u64,
    fua: bool,
    zeroes: DmaBuf,
    done: Box<dyn FnOnce(bdev::IoStatus)>,
) {
    let n = left.min(per);
    let ch2 = ch.clone();
    let mut io = BdevIo::write(offset_blocks, n, zeroes, move |mut io: Box<BdevIo>| {
        if io.status != bdev::IoStatus::Success || n == left {
            return done(io.status);
        }
        let bytes = n * ch2.bdev().block_size() as u64;
        let z = io
            .buf
            .take()
            .unwrap_or_else(|| DmaBuf::zeroed(bytes as usize));
        zero_chunk(ch2, offset_blocks + n, left - n, per, fua, z, done)
    });
    io.fua = fua;
    ch.submit(io);
}

fn submit(ch: &IoChannel, out: &OutRc, s: &Session, r: Request, payload: Option<DmaBuf>, bs: u64) {
    let (structured, cookie) = (s.structured, r.cookie);
    let ob = r.offset / bs;
    let nb = r.length as u64 / bs;
    let o2 = out.clone();
    let status_cb = move |io: Box<BdevIo>| {
        reply_status(&o2, structured, cookie, errno_of(io.status));
        done(&o2);
    };
    let supports = |t| ch.bdev().io_type_supported(t);
    match r.ty {
        CMD_READ if nb == 0 => {
            reply_status(out, structured, cookie, 0);
            done(out);
        }
        CMD_READ => {
            let o2 = out.clone();
            let len = r.length as usize;
            ch.read(ob, nb, DmaBuf::new(len), move |io| {
                let err = errno_of(io.status);
                match (err, io.buf.as_ref()) {
                    (0, Some(b)) if structured => {
                        let h = encode_structured_header(
                            REPLY_FLAG_DONE,
                            REPLY_TYPE_OFFSET_DATA,
                            cookie,
                            8 + len as u32,
                        );
                        push(&o2, &[&h, &r.offset.to_be_bytes(), &b.as_slice()[..len]]);
                    }
                    (0, Some(b)) => {
                        push(
                            &o2,
                            &[&encode_simple_reply(0, cookie), &b.as_slice()[..len]],
                        );
                    }
                    _ => reply_status(&o2, structured, cookie, err.max(EIO)),
                }
                done(&o2);
            });
        }
        CMD_WRITE if nb == 0 => {
            reply_status(out, structured, cookie, 0);
            done(out);
        }
        CMD_WRITE => {
            let mut io = BdevIo::write(
                ob,
                nb,
                payload.unwrap_or_else(|| DmaBuf::new(r.length as usize)),
                status_cb,
            );
            io.fua = r.flags & CMD_FLAG_FUA != 0;
            ch.submit(io);
        }
        CMD_FLUSH if supports(IoType::Flush) => ch.flush(0, ch.bdev().num_blocks(), status_cb),
        CMD_TRIM if nb > 0 && supports(IoType::Unmap) => ch.unmap(ob, nb, status_cb),
        CMD_WRITE_ZEROES if nb > 0 && supports(IoType::WriteZeroes) => {
            let mut io = BdevIo::new(IoType::WriteZeroes, ob, nb, None, status_cb);
            io.fua = r.flags & CMD_FLAG_FUA != 0;
            ch.submit(io);
        }
        CMD_WRITE_ZEROES if nb > 0 => {
            let fua = r.flags & CMD_FLAG_FUA != 0;
            let o2 = out.clone();
            zero_by_writes(ch, ob, nb, fua, move |st| {
                reply_status(&o2, structured, cookie, errno_of(st));
                done(&o2);
            });
        }
        // Nothing to flush, nothing to trim (trim is advisory), or empty.
        CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES => {
            reply_status(out, structured, cookie, 0);
            done(out);
        }
        CMD_BLOCK_STATUS => {
            let o2 = out.clone();
            let one = r.flags & CMD_FLAG_REQ_ONE != 0;
            ch.block_status(ob, nb.max(1), move |res| {
                match res {
                    Ok(ext) => {
                        let mut p = META_ID.to_be_bytes().to_vec();
                        let max_ext = ((u32::MAX as u64) / bs) * bs;
                        'outer: for e in ext {
                            let f = if e.hole { STATE_HOLE } else { 0 }
                                | if e.zero { STATE_ZERO } else { 0 };
                            let mut left = e.num_blocks * bs;
                            while left > 0 {
                                let n = left.min(max_ext);
                                p.extend_from_slice(&(n as u32).to_be_bytes());
                                p.extend_from_slice(&f.to_be_bytes());
                                left -= n;
                                if one {
                                    break 'outer;
                                }
                            }
                        }
                        let h = encode_structured_header(
                            REPLY_FLAG_DONE,
                            REPLY_TYPE_BLOCK_STATUS,
                            cookie,
                            p.len() as u32,
                        );
                        push(&o2, &[&h, &p]);
                    }
                    Err(st) => reply_status(&o2, structured, cookie, errno_of(st).max(EIO)),
                }
                done(&o2);
            });
        }
        _ => {
            reply_status(out, structured, cookie, EINVAL);
            done(out);
        }
    }
}

/// [`check`] for an export of `size` bytes in blocks of `bs` (fuzzing and
/// unit tests).
pub fn check_request(r: &Request, writable: bool, meta: bool, size: u64, bs: u64) -> Option<u32> {
    let s = Session {
        export: Arc::new(Export {
            name: "t".into(),
            bdev_name: "t".into(),
            writable,
            desc: Mutex::new(None),
            removed: AtomicBool::new(false),
            conns: AtomicU32::new(0),
        }),
        structured: true,
        meta,
    };
    check(r, &s, size, bs)
}
