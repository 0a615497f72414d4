//! Non-blocking TCP sockets for the host, driven from the owning reactor.
//!
//! Reads and writes are plain non-blocking `recv`/`send` calls made by the
//! queue pair's poller. In interrupt mode a reactor only wakes for io_uring
//! completions, messages and timers, so when a socket has nothing to read
//! (or cannot take more bytes) we arm a one-shot io_uring `PollAdd` on it:
//! its completion wakes the reactor, whose loop then runs the poller again.

use std::cell::Cell;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use super::HostError;

/// A connected, non-blocking TCP socket owned by one reactor.
pub struct Sock {
    fd: OwnedFd,
    /// A `PollAdd` for POLLIN / POLLOUT is in flight.
    armed_in: Rc<Cell<bool>>,
    armed_out: Rc<Cell<bool>>,
    closed: Cell<bool>,
    /// The reactor sleeps when idle (read once: asked on every EAGAIN).
    interrupt: bool,
    /// The last receive found nothing.
    idle: Cell<bool>,
}

/// Outcome of a non-blocking transfer.
pub enum Xfer {
    /// This many bytes moved (never 0).
    Done(usize),
    /// Nothing to do now.
    WouldBlock,
    /// The peer closed the connection (recv returned 0).
    Closed,
    Err(std::io::Error),
}

/// Resolve `addr:port` (IPv4 or IPv6 literal, or a name).
pub fn resolve(traddr: &str, trsvcid: &str) -> Result<SocketAddr, HostError> {
    let port: u16 = trsvcid
        .parse()
        .map_err(|_| HostError::Invalid(format!("trsvcid '{trsvcid}' is not a port number")))?;
    let host = traddr.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .map_err(|e| HostError::Invalid(format!("cannot resolve traddr '{traddr}': {e}")))?
        .next()
        .ok_or_else(|| HostError::Invalid(format!("traddr '{traddr}' resolves to no address")))
}

/// Wait until `fd` reports one of `events` (or an error/hangup), on the
/// calling reactor's io_uring.
async fn wait_fd(fd: RawFd, events: u32) -> i32 {
    let e = reactor::uring::op::PollAdd::new(reactor::uring::ty::Fd(fd), events).build();
    // SAFETY: PollAdd references no memory; the fd stays open until the
    // socket is dropped, and a poll on a socket that is shut down completes
    // (POLLHUP), so the operation never outlives its purpose.
    unsafe { reactor::uring::run(e) }.await
}

impl Sock {
    /// Connect to `addr` with a timeout; the socket is non-blocking with
    /// TCP_NODELAY set.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Sock, HostError> {
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe {
            libc::socket(
                domain,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return Err(HostError::Io(format!(
                "socket: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads sizeof(int) bytes from `one`.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let (storage, len) = sockaddr(&addr);
        // SAFETY: storage holds a valid sockaddr of `len` bytes.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &storage as *const _ as *const libc::sockaddr,
                len,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(HostError::Connect(addr, e.to_string()));
            }
            let raw = fd.as_raw_fd();
            let waited = with_timeout(timeout, wait_fd(raw, libc::POLLOUT as u32)).await;
            if waited.is_none() {
                // Unblock the armed poll before the fd goes.
                // SAFETY: shutdown on our own fd.
                unsafe { libc::shutdown(raw, libc::SHUT_RDWR) };
                return Err(HostError::Timeout(format!("connecting to {addr}")));
            }
            let mut err: libc::c_int = 0;
            let mut elen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most elen bytes into err.
            unsafe {
                libc::getsockopt(
                    raw,
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    &mut err as *mut _ as *mut libc::c_void,
                    &mut elen,
                )
            };
            if err != 0 {
                return Err(HostError::Connect(
                    addr,
                    std::io::Error::from_raw_os_error(err).to_string(),
                ));
            }
        }
        Ok(Sock {
            fd,
            armed_in: Rc::new(Cell::new(false)),
            armed_out: Rc::new(Cell::new(false)),
            closed: Cell::new(false),
            interrupt: reactor::is_interrupt_mode(),
            idle: Cell::new(true),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn recv(&self, buf: &mut [u8]) -> Xfer {
        if buf.is_empty() {
            return Xfer::WouldBlock;
        }
        // Busy-polling: while the socket is idle, ask poll(2) (lockless)
        // rather than recv(2), which takes the socket lock on every call and,
        // spinning, keeps the kernel's receive path on the socket backlog
        // (as SPDK's posix sock, which polls readiness first). Right after
        // data came, recv directly: more is likely on its way.
        if !self.interrupt && self.idle.get() {
            let mut p = libc::pollfd {
                fd: self.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, zero timeout.
            let r = unsafe { libc::poll(&mut p, 1, 0) };
            if r == 0 {
                return Xfer::WouldBlock;
            }
        }
        let r = self.recv_now(buf);
        self.idle.set(matches!(r, Xfer::WouldBlock));
        r
    }

    fn recv_now(&self, buf: &mut [u8]) -> Xfer {
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let n = unsafe {
            libc::recv(
                self.fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        classify(n, true)
    }

    pub fn send(&self, buf: &[u8]) -> Xfer {
        if buf.is_empty() {
            return Xfer::WouldBlock;
        }
        // SAFETY: send reads at most buf.len() bytes from buf.
        let n = unsafe {
            libc::send(
                self.fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        classify(n, false)
    }

    /// Gather-send `iov` (sendmsg).
    ///
    /// # Safety
    /// Every iovec must point to memory valid for reads of its length.
    pub unsafe fn sendv(&self, iov: &[libc::iovec]) -> Xfer {
        if iov.is_empty() {
            return Xfer::WouldBlock;
        }
        // SAFETY: an all-zero msghdr is valid; we set the iovec array.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        // SAFETY: the caller guarantees the iovecs; msg lives across the call.
        let n = unsafe { libc::sendmsg(self.fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        classify(n, false)
    }

    /// In interrupt mode, make sure the reactor wakes when the socket
    /// becomes readable (`out` false) or writable (`out` true).
    pub fn arm(&self, out: bool) {
        if !self.interrupt || self.closed.get() {
            return;
        }
        let flag = if out { &self.armed_out } else { &self.armed_in };
        if flag.replace(true) {
            return;
        }
        let f = flag.clone();
        let ev = if out { libc::POLLOUT } else { libc::POLLIN } as u32;
        let e = reactor::uring::op::PollAdd::new(reactor::uring::ty::Fd(self.fd()), ev).build();
        // SAFETY: no memory is referenced; see `wait_fd`. `close` shuts the
        // socket down first so the poll completes before the fd is freed.
        unsafe { reactor::uring::submit(e, move |_| f.set(false)) };
    }

    /// Shut the connection down (completes any armed poll). Idempotent.
    pub fn close(&self) {
        if !self.closed.replace(true) {
            // SAFETY: shutdown on our own fd.
            unsafe { libc::shutdown(self.fd(), libc::SHUT_RDWR) };
        }
    }
}

impl Drop for Sock {
    fn drop(&mut self) {
        self.close();
    }
}

fn classify(n: isize, is_recv: bool) -> Xfer {
    if n > 0 {
        return Xfer::Done(n as usize);
    }
    if n == 0 && is_recv {
        return Xfer::Closed;
    }
    if n == 0 {
        return Xfer::WouldBlock;
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Xfer::WouldBlock,
        _ => Xfer::Err(e),
    }
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in.
            unsafe { std::ptr::write(&mut st as *mut _ as *mut libc::sockaddr_in, sin) };
            (
                st,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6.
            unsafe { std::ptr::write(&mut st as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (
                st,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

/// Run `fut` for at most `d`; `None` on timeout.
pub async fn with_timeout<T>(d: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    use std::future::Future;
    let mut fut = std::pin::pin!(fut);
    let mut sleep = std::pin::pin!(reactor::sleep(d));
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(cx) {
            return std::task::Poll::Ready(Some(v));
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(None);
        }
        std::task::Poll::Pending
    })
    .await
}
