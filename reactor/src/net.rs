//! Socket helpers for every network front end (the NVMe/TCP target and host,
//! an NBD server): one place for the socket options, address handling and
//! non-blocking transfers, through `nix`'s safe wrappers.
//!
//! * Setup: [`listen_tcp`] / [`listen_tcp_retrying`] (bind + listen, the
//!   latter riding out `EADDRINUSE` for a while), [`connect_tcp`]
//!   (non-blocking connect with a timeout, awaited on the reactor's
//!   io_uring), [`listen_unix`] / [`connect_unix`], [`set_nodelay`],
//!   [`set_nonblocking`], [`shutdown`], [`local_addr`] / [`peer_addr`],
//!   [`resolve`].
//! * Transfers on a non-blocking socket: [`recv`], [`send`], [`sendv`]
//!   ([`sendv_raw`]), each classified as an [`Xfer`]; readiness without
//!   blocking: [`readable`] (one socket), [`poll_now`] (many at once).
//! * Readiness: [`wait_fd`] awaits `POLLIN`/`POLLOUT` through an io_uring
//!   `PollAdd`, so a reactor in interrupt mode wakes for it.
//!
//! The data path of a transport may drive its sockets through io_uring
//! directly (the target's Recv/SendMsg); these helpers are for the rest.

use std::io::{self, IoSlice};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, MsgFlags, Shutdown, SockFlag, SockType, SockaddrStorage,
    UnixAddr,
};

/// Outcome of one non-blocking transfer.
#[derive(Debug)]
pub enum Xfer {
    /// This many bytes moved (never 0).
    Done(usize),
    /// Nothing can move now (`EAGAIN`, `EINTR`, or an empty buffer).
    WouldBlock,
    /// The peer closed the connection (a receive returned 0).
    Closed,
    Err(io::Error),
}

fn classify(r: nix::Result<usize>, is_recv: bool) -> Xfer {
    match r {
        Ok(0) if is_recv => Xfer::Closed,
        Ok(0) => Xfer::WouldBlock,
        Ok(n) => Xfer::Done(n),
        Err(Errno::EAGAIN) | Err(Errno::EINTR) => Xfer::WouldBlock,
        Err(e) => Xfer::Err(e.into()),
    }
}

/// Receive into `buf` without blocking.
pub fn recv(fd: &impl AsFd, buf: &mut [u8]) -> Xfer {
    if buf.is_empty() {
        return Xfer::WouldBlock;
    }
    let fd = fd.as_fd().as_raw_fd();
    classify(socket::recv(fd, buf, MsgFlags::MSG_DONTWAIT), true)
}

/// Send from `buf` without blocking (no SIGPIPE on a closed peer).
pub fn send(fd: &impl AsFd, buf: &[u8]) -> Xfer {
    if buf.is_empty() {
        return Xfer::WouldBlock;
    }
    let fd = fd.as_fd().as_raw_fd();
    classify(
        socket::send(fd, buf, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL),
        false,
    )
}

/// Gather-send `iov` without blocking (sendmsg; no SIGPIPE).
pub fn sendv(fd: &impl AsFd, iov: &[IoSlice<'_>]) -> Xfer {
    if iov.is_empty() {
        return Xfer::WouldBlock;
    }
    let fd = fd.as_fd().as_raw_fd();
    let r = socket::sendmsg::<SockaddrStorage>(
        fd,
        iov,
        &[],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    );
    classify(r, false)
}

/// [`sendv`] from raw iovecs (kept by a caller that sends the same queue
/// again after a partial send, without rebuilding `IoSlice`s).
///
/// # Safety
/// Every iovec must point to memory valid for reads of its length.
pub unsafe fn sendv_raw(fd: &impl AsFd, iov: &[libc::iovec]) -> Xfer {
    // SAFETY: `IoSlice` is documented as ABI-compatible with `iovec` on Unix
    // (repr(transparent)); the caller guarantees the memory.
    let slices =
        unsafe { std::slice::from_raw_parts(iov.as_ptr() as *const IoSlice<'_>, iov.len()) };
    sendv(fd, slices)
}

/// Which of `fds` can make progress now: one poll(2) with a zero timeout
/// for many sockets (a poll group, as SPDK's `epoll_wait(0)` per group).
/// Entries with a negative fd are skipped; `revents` is filled in. False
/// when none is ready (or poll failed: the caller then tries each).
pub fn poll_now(fds: &mut [libc::pollfd]) -> bool {
    if fds.is_empty() {
        return false;
    }
    // SAFETY: `fds` is a valid, exclusively borrowed array of its length.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
    if n < 0 {
        for p in fds.iter_mut() {
            p.revents = p.events;
        }
    }
    n != 0
}

/// Whether `fd` has something to read (or an error or hang-up to report)
/// right now: poll(2) with a zero timeout, which, unlike recv(2), takes no
/// socket lock (cheap to ask in a busy-poll loop, as SPDK's posix sock does).
pub fn readable(fd: &impl AsFd) -> bool {
    let mut p = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    !matches!(nix::poll::poll(&mut p, PollTimeout::ZERO), Ok(0))
}

/// Set TCP_NODELAY: PDUs and replies go out at once, not after Nagle's wait.
pub fn set_nodelay(fd: &impl AsFd) -> io::Result<()> {
    Ok(socket::setsockopt(fd, sockopt::TcpNoDelay, &true)?)
}

/// Set or clear O_NONBLOCK.
pub fn set_nonblocking(fd: &impl AsFd, on: bool) -> io::Result<()> {
    let raw = fd.as_fd().as_raw_fd();
    let mut fl = OFlag::from_bits_truncate(fcntl(raw, FcntlArg::F_GETFL)?);
    fl.set(OFlag::O_NONBLOCK, on);
    fcntl(raw, FcntlArg::F_SETFL(fl))?;
    Ok(())
}

/// Shut both directions down: pending and armed operations on the socket
/// complete (a poll sees POLLHUP, a recv returns 0). Errors (a socket that
/// never connected) are of no interest to a caller tearing down.
pub fn shutdown(fd: &impl AsFd) {
    let _ = socket::shutdown(fd.as_fd().as_raw_fd(), Shutdown::Both);
}

fn to_socket_addr(ss: SockaddrStorage) -> Option<SocketAddr> {
    if let Some(a) = ss.as_sockaddr_in() {
        return Some(SocketAddr::V4((*a).into()));
    }
    ss.as_sockaddr_in6().map(|a| SocketAddr::V6((*a).into()))
}

/// The local address of a TCP socket.
pub fn local_addr(fd: &impl AsFd) -> Option<SocketAddr> {
    to_socket_addr(socket::getsockname(fd.as_fd().as_raw_fd()).ok()?)
}

/// The remote address of a connected TCP socket.
pub fn peer_addr(fd: &impl AsFd) -> Option<SocketAddr> {
    to_socket_addr(socket::getpeername(fd.as_fd().as_raw_fd()).ok()?)
}

/// Resolve `host` (an IPv4 or IPv6 literal, IPv6 with or without brackets,
/// or a name) with `port`. The error names the host.
pub fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    (bare, port)
        .to_socket_addrs()
        .map_err(|e| invalid(format!("cannot resolve '{host}': {e}")))?
        .next()
        .ok_or_else(|| invalid(format!("'{host}' resolves to no address")))
}

/// Bind and listen on `addr` (SO_REUSEADDR, close-on-exec), blocking mode.
pub fn listen_tcp(addr: SocketAddr) -> io::Result<OwnedFd> {
    Ok(TcpListener::bind(addr)?.into())
}

/// [`listen_tcp`], retrying for up to `retry` while the address is in use.
///
/// A killed process's listening socket can outlive it by some milliseconds
/// (the kernel tears down its io_uring, which holds the pending accept,
/// asynchronously), so a restart right after a crash would otherwise fail.
/// A port really held by someone else still fails once `retry` is over.
pub async fn listen_tcp_retrying(addr: SocketAddr, retry: Duration) -> io::Result<OwnedFd> {
    let deadline = Instant::now() + retry;
    let mut warned = false;
    loop {
        match listen_tcp(addr) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                if !warned {
                    tracing::warn!(%addr, "address in use; retrying for up to {retry:?}");
                    warned = true;
                }
                crate::sleep(Duration::from_millis(10)).await;
            }
            r => return r,
        }
    }
}

/// Why [`connect_tcp`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("socket: {0}")]
    Socket(io::Error),
    #[error("connecting to {0}: {1}")]
    Refused(SocketAddr, io::Error),
    #[error("connecting to {0}: no answer within {1:?}")]
    Timeout(SocketAddr, Duration),
}

/// Connect to `addr` within `timeout`. The socket comes back non-blocking,
/// close-on-exec, with TCP_NODELAY. The wait is an io_uring poll on the
/// calling reactor, so other work goes on meanwhile.
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<OwnedFd, ConnectError> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| ConnectError::Socket(e.into()))?;
    set_nodelay(&fd).map_err(ConnectError::Socket)?;
    match socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) => return Ok(fd),
        Err(Errno::EINPROGRESS) => {}
        Err(e) => return Err(ConnectError::Refused(addr, e.into())),
    }
    let waited = crate::with_timeout(timeout, wait_fd(fd.as_raw_fd(), libc::POLLOUT as u32)).await;
    if waited.is_none() {
        // Complete the armed poll before the fd goes.
        shutdown(&fd);
        return Err(ConnectError::Timeout(addr, timeout));
    }
    match socket::getsockopt(&fd, sockopt::SocketError) {
        Ok(0) => Ok(fd),
        Ok(e) => Err(ConnectError::Refused(addr, io::Error::from_raw_os_error(e))),
        Err(e) => Err(ConnectError::Refused(addr, e.into())),
    }
}

/// Why [`listen_unix`] failed.
#[derive(Debug, thiserror::Error)]
pub enum UnixListenError {
    #[error("socket path {0} is too long for a Unix socket address")]
    PathTooLong(std::path::PathBuf),
    #[error("cannot listen on {0}: {1}")]
    Io(std::path::PathBuf, io::Error),
}

/// Bind and listen on the Unix socket `path` (close-on-exec, blocking mode).
/// The path must not exist: removing a stale socket is the caller's choice.
pub fn listen_unix(path: &Path, backlog: i32) -> Result<OwnedFd, UnixListenError> {
    let err = |e: Errno| UnixListenError::Io(path.to_path_buf(), e.into());
    let addr = UnixAddr::new(path).map_err(|e| match e {
        Errno::ENAMETOOLONG => UnixListenError::PathTooLong(path.to_path_buf()),
        e => err(e),
    })?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err)?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(err)?;
    let backlog = Backlog::new(backlog).unwrap_or(Backlog::MAXCONN);
    socket::listen(&fd, backlog).map_err(err)?;
    Ok(fd)
}

/// Connect to the Unix socket `path` (blocking mode).
pub fn connect_unix(path: &Path) -> io::Result<UnixStream> {
    UnixStream::connect(path)
}

/// Wait until `fd` reports one of `events` (or an error or hang-up), on the
/// calling reactor's io_uring; resolves with the poll's result.
///
/// The fd must stay open until this resolves: to give up early, [`shutdown`]
/// the socket, which completes the poll.
pub async fn wait_fd(fd: RawFd, events: u32) -> i32 {
    let e = crate::uring::op::PollAdd::new(crate::uring::ty::Fd(fd), events).build();
    // SAFETY: PollAdd references no memory; the caller keeps the fd open
    // until the poll completes (a shut-down socket completes it at once).
    unsafe { crate::uring::run(e) }.await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn transfers_are_classified() {
        let l = listen_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = local_addr(&l).unwrap();
        let mut peer = std::net::TcpStream::connect(addr).unwrap();
        let s: OwnedFd = TcpListener::from(l).accept().unwrap().0.into();
        set_nonblocking(&s, true).unwrap();
        set_nodelay(&s).unwrap();
        assert_eq!(peer_addr(&s), Some(peer.local_addr().unwrap()));
        let mut buf = [0u8; 8];
        assert!(matches!(recv(&s, &mut buf), Xfer::WouldBlock));
        assert!(!readable(&s));
        peer.write_all(b"abc").unwrap();
        while !readable(&s) {}
        assert!(matches!(recv(&s, &mut buf), Xfer::Done(3)));
        assert!(matches!(send(&s, b"xy"), Xfer::Done(2)));
        let parts = [IoSlice::new(b"12"), IoSlice::new(b"345")];
        assert!(matches!(sendv(&s, &parts), Xfer::Done(5)));
        let mut got = [0u8; 7];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"xy12345");
        drop(peer);
        while !readable(&s) {}
        assert!(matches!(recv(&s, &mut buf), Xfer::Closed));
    }

    #[test]
    fn resolve_takes_bracketed_ipv6() {
        let want: SocketAddr = "[::1]:4420".parse().unwrap();
        assert_eq!(resolve("[::1]", 4420).unwrap(), want);
        assert_eq!(resolve("::1", 4420).unwrap(), want);
        let want: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!(resolve("127.0.0.1", 80).unwrap(), want);
    }

    #[test]
    fn unix_listen_and_connect() {
        let dir = std::env::temp_dir().join(format!("reactor-net-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::from(listen_unix(&path, 4).unwrap());
        let mut c = connect_unix(&path).unwrap();
        let (mut a, _) = l.accept().unwrap();
        c.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        a.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        let long = dir.join("x".repeat(200));
        assert!(matches!(
            listen_unix(&long, 4),
            Err(UnixListenError::PathTooLong(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
