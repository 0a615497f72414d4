//! Non-blocking TCP sockets for the host, driven from the owning reactor.
//!
//! Reads and writes are plain non-blocking `recv`/`send` calls made by the
//! queue pair's poller. In interrupt mode a reactor only wakes for io_uring
//! completions, messages and timers, so when a socket has nothing to read
//! (or cannot take more bytes) we arm a one-shot io_uring `PollAdd` on it:
//! its completion wakes the reactor, whose loop then runs the poller again.

use std::cell::Cell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

pub use reactor::net::Xfer;
use reactor::net::{self, ConnectError};

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

/// Resolve `addr:port` (IPv4 or IPv6 literal, or a name).
pub fn resolve(traddr: &str, trsvcid: &str) -> Result<SocketAddr, HostError> {
    let port: u16 = trsvcid
        .parse()
        .map_err(|_| HostError::Invalid(format!("trsvcid '{trsvcid}' is not a port number")))?;
    net::resolve(traddr, port).map_err(|e| HostError::Invalid(format!("traddr: {e}")))
}

impl Sock {
    /// Connect to `addr` with a timeout; the socket is non-blocking with
    /// TCP_NODELAY set.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Sock, HostError> {
        let fd = net::connect_tcp(addr, timeout).await.map_err(|e| match e {
            ConnectError::Socket(e) => HostError::Io(format!("socket: {e}")),
            ConnectError::Refused(a, e) => HostError::Connect(a, e.to_string()),
            ConnectError::Timeout(a, _) => HostError::Timeout(format!("connecting to {a}")),
        })?;
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
        // Busy-polling: while the socket is idle, ask poll(2) (lockless)
        // rather than recv(2), which takes the socket lock on every call and,
        // spinning, keeps the kernel's receive path on the socket backlog
        // (as SPDK's posix sock, which polls readiness first). Right after
        // data came, recv directly: more is likely on its way.
        if !buf.is_empty() && !self.interrupt && self.idle.get() && !net::readable(&self.fd) {
            return Xfer::WouldBlock;
        }
        let r = net::recv(&self.fd, buf);
        self.idle.set(matches!(r, Xfer::WouldBlock));
        r
    }

    pub fn send(&self, buf: &[u8]) -> Xfer {
        net::send(&self.fd, buf)
    }

    /// Gather-send `iov` (sendmsg).
    ///
    /// # Safety
    /// Every iovec must point to memory valid for reads of its length.
    pub unsafe fn sendv(&self, iov: &[libc::iovec]) -> Xfer {
        // SAFETY: forwarded to the caller's contract.
        unsafe { net::sendv_raw(&self.fd, iov) }
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
        // SAFETY: no memory is referenced; the fd stays open until the socket
        // is dropped, and `close` shuts the socket down first so the poll
        // completes before the fd is freed.
        unsafe { reactor::uring::submit(e, move |_| f.set(false)) };
    }

    /// Shut the connection down (completes any armed poll). Idempotent.
    pub fn close(&self) {
        if !self.closed.replace(true) {
            net::shutdown(&self.fd);
        }
    }
}

impl Drop for Sock {
    fn drop(&mut self) {
        self.close();
    }
}
