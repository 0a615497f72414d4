//! Non-blocking stream sockets (TCP or Unix) for async tasks on a reactor.
//! Transfers are plain non-blocking `recv`/`send`; when one would block the
//! task awaits readiness through an io_uring `PollAdd`, so both busy-polling
//! and `--interrupt-mode` reactors wake for it.
//!
//! Kept small and self-contained so it can give way to a shared socket
//! module in the reactor crate.

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType};

use crate::uri::Endpoint;

pub struct Sock {
    fd: OwnedFd,
}

async fn poll_fd(fd: RawFd, events: i16) -> i32 {
    let e = reactor::uring::op::PollAdd::new(reactor::uring::ty::Fd(fd), events as u32).build();
    // SAFETY: PollAdd references no memory. Sockets are shut down (which
    // completes the poll with POLLHUP) before they are closed.
    unsafe { reactor::uring::run(e) }.await
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

fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{host}': {e}"))?
        .next()
        .ok_or_else(|| format!("'{host}' resolves to no address"))
}

fn nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads sizeof(int) bytes from `one`.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// connect(2) on a non-blocking socket; the errno on failure.
fn connect_raw(fd: RawFd, addr: &SocketAddr) -> Result<(), i32> {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
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
            std::mem::size_of::<libc::sockaddr_in>()
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
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: `st` holds a valid sockaddr of `len` bytes.
    let r = unsafe {
        libc::connect(
            fd,
            &st as *const _ as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    } else {
        Ok(())
    }
}

impl Sock {
    /// Take a connected (or accepted) socket; it is made non-blocking and,
    /// for TCP, TCP_NODELAY.
    pub fn from_fd(fd: OwnedFd) -> Sock {
        let raw = fd.as_raw_fd();
        if let Ok(fl) = nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFL) {
            let fl = nix::fcntl::OFlag::from_bits_truncate(fl) | nix::fcntl::OFlag::O_NONBLOCK;
            let _ = nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_SETFL(fl));
        }
        // Fails harmlessly on Unix sockets.
        nodelay(raw);
        Sock { fd }
    }

    /// Connect with a timeout. The error says where and why.
    pub async fn connect(ep: &Endpoint, timeout: Duration) -> Result<Sock, String> {
        match ep {
            Endpoint::Unix(p) => {
                // A Unix connect completes or fails at once (no handshake).
                let s = UnixStream::connect(p)
                    .map_err(|e| format!("cannot connect to {}: {e}", p.display()))?;
                Ok(Sock::from_fd(s.into()))
            }
            Endpoint::Tcp { host, port } => {
                let addr = resolve(host, *port)?;
                let fam = if addr.is_ipv4() {
                    AddressFamily::Inet
                } else {
                    AddressFamily::Inet6
                };
                let fd = socket::socket(
                    fam,
                    SockType::Stream,
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                    None,
                )
                .map_err(|e| format!("socket: {e}"))?;
                nodelay(fd.as_raw_fd());
                match connect_raw(fd.as_raw_fd(), &addr) {
                    Ok(()) => {}
                    Err(libc::EINPROGRESS) => {
                        let raw = fd.as_raw_fd();
                        if with_timeout(timeout, poll_fd(raw, libc::POLLOUT))
                            .await
                            .is_none()
                        {
                            // Complete the armed poll before the fd closes.
                            let _ = socket::shutdown(raw, socket::Shutdown::Both);
                            return Err(format!(
                                "connecting to {addr} timed out after {} ms",
                                timeout.as_millis()
                            ));
                        }
                        let err = socket::getsockopt(&fd, sockopt::SocketError).unwrap_or(0);
                        if err != 0 {
                            return Err(format!(
                                "cannot connect to {addr}: {}",
                                std::io::Error::from_raw_os_error(err)
                            ));
                        }
                    }
                    Err(e) => {
                        return Err(format!(
                            "cannot connect to {addr}: {}",
                            std::io::Error::from_raw_os_error(e)
                        ))
                    }
                }
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
        let mut at = 0;
        while at < buf.len() {
            let rest = &mut buf[at..];
            // SAFETY: recv writes at most rest.len() bytes into rest.
            let n = unsafe {
                libc::recv(
                    self.fd(),
                    rest.as_mut_ptr() as *mut libc::c_void,
                    rest.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                at += n as usize;
                continue;
            }
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed by the peer",
                ));
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => {
                    poll_fd(self.fd(), libc::POLLIN).await;
                }
                _ => return Err(e),
            }
        }
        Ok(())
    }

    /// Send as much of `buf` as the socket takes now (0 when it would block).
    pub fn try_send(&self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: send reads at most buf.len() bytes from buf.
        let n = unsafe {
            libc::send(
                self.fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
            _ => Err(e),
        }
    }

    /// Wait until the socket takes more bytes (or fails).
    pub async fn writable(&self) {
        poll_fd(self.fd(), libc::POLLOUT).await;
    }

    pub async fn write_all(&self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let n = self.try_send(buf)?;
            if n == 0 {
                self.writable().await;
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Shut both directions down: pending polls complete, the peer sees EOF.
    pub fn shutdown(&self) {
        let _ = socket::shutdown(self.fd(), socket::Shutdown::Both);
    }
}
