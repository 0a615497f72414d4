//! A connected non-blocking stream socket (TCP or Unix) for async tasks on
//! a reactor, on top of `reactor::net`: transfers are non-blocking; when one
//! would block, the task awaits readiness through an io_uring `PollAdd`, so
//! busy-polling and `--interrupt-mode` reactors both wake for it.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use reactor::net::{self, Xfer};

use crate::uri::Endpoint;

pub use reactor::with_timeout;

pub struct Sock {
    fd: OwnedFd,
}

impl Sock {
    /// Take a connected (or accepted) socket; it is made non-blocking and,
    /// for TCP, TCP_NODELAY.
    pub fn from_fd(fd: OwnedFd) -> Sock {
        let _ = net::set_nonblocking(&fd, true);
        // Fails harmlessly on Unix sockets.
        let _ = net::set_nodelay(&fd);
        Sock { fd }
    }

    /// Connect within `timeout`. The error says where and why.
    pub async fn connect(ep: &Endpoint, timeout: Duration) -> Result<Sock, String> {
        match ep {
            Endpoint::Unix(p) => {
                // A Unix connect completes or fails at once (no handshake).
                let s = net::connect_unix(p)
                    .map_err(|e| format!("cannot connect to {}: {e}", p.display()))?;
                Ok(Sock::from_fd(s.into()))
            }
            Endpoint::Tcp { host, port } => {
                let addr = net::resolve(host, *port).map_err(|e| e.to_string())?;
                let fd = net::connect_tcp(addr, timeout)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Sock { fd })
            }
        }
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Read exactly `buf.len()` bytes. EOF before that is an error.
    pub async fn read_exact(&self, buf: &mut [u8]) -> std::io::Result<()> {
        let closed = (
            std::io::ErrorKind::UnexpectedEof,
            "connection closed by the peer",
        );
        self.transfer(buf.len(), libc::POLLIN, closed, |at| {
            net::recv(&self.fd, &mut buf[at..])
        })
        .await
    }

    pub async fn write_all(&self, buf: &[u8]) -> std::io::Result<()> {
        let closed = (std::io::ErrorKind::BrokenPipe, "connection closed");
        self.transfer(buf.len(), libc::POLLOUT, closed, |at| {
            net::send(&self.fd, &buf[at..])
        })
        .await
    }

    /// Repeat `step` (one non-blocking transfer from byte `at` on) until
    /// `len` bytes have moved, awaiting `events` whenever the socket would
    /// block; a peer that closes first is the error `closed`.
    async fn transfer(
        &self,
        len: usize,
        events: libc::c_short,
        closed: (std::io::ErrorKind, &str),
        mut step: impl FnMut(usize) -> Xfer,
    ) -> std::io::Result<()> {
        let mut at = 0;
        while at < len {
            match step(at) {
                Xfer::Done(n) => at += n,
                Xfer::WouldBlock => {
                    net::wait_fd(self.fd(), events as u32).await;
                }
                Xfer::Closed => return Err(std::io::Error::new(closed.0, closed.1)),
                Xfer::Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Shut both directions down: pending polls complete, the peer sees EOF.
    pub fn shutdown(&self) {
        net::shutdown(&self.fd);
    }
}
