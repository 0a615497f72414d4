//! The Unix-socket JSON-RPC server (rpc-contract.md §1.1, §1.2; SPDK
//! `lib/rpc/rpc.c`, `lib/jsonrpc/jsonrpc_server_tcp.c`).
//!
//! Threads: one accept thread; per connection one reader thread (framing and
//! envelope parsing happen as bytes arrive) and one writer thread fed by an
//! mpsc channel. Every request is handed to reactor 0 as a task; its reply
//! goes to the writer as soon as it completes, so replies leave in completion
//! order and a slow client never blocks reactor 0. The writer closes the
//! connection when the reader is done (EOF, parse error) *and* every request
//! in flight was answered, so a client that half-closes still gets its replies.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{self, AddressFamily, Backlog, MsgFlags, SockFlag, SockType, UnixAddr};
use nix::sys::stat::{self, Mode};
use nix::unistd;
use serde_json::Value;

use crate::error::RpcError;
use crate::json::{immediate_error, parse_error_reply, process_value, take_values};

/// Receive buffer per connection (`SPDK_JSONRPC_RECV_BUF_SIZE`). A request
/// that does not fit is answered with -32700 and the connection is closed.
pub const RECV_BUF_SIZE: usize = 256 * 1024;
/// Concurrent connections (`SPDK_JSONRPC_MAX_CONNS`); more are closed at once.
pub const MAX_CONNS: usize = 64;
/// `listen()` backlog, as SPDK.
const LISTEN_BACKLOG: i32 = 512;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("RPC Unix domain socket path {} in use. Specify another.", .0.display())]
    InUse(PathBuf),
    #[error("RPC Listen address Unix socket path too long: {}", .0.display())]
    PathTooLong(PathBuf),
    #[error("Cannot open lock file {}: {source}", .path.display())]
    LockFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot listen on RPC socket {}: {source}", .path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot start RPC server thread: {0}")]
    Thread(#[source] io::Error),
    #[error("Cannot set the owner group or mode of RPC socket {}: {source}", .path.display())]
    Access {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

struct ConnEntry {
    /// A clone of the socket, to shut it down from [`Server::shutdown`].
    stream: UnixStream,
    reader: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Conns {
    live: Mutex<HashMap<u64, ConnEntry>>,
    next_id: AtomicU64,
    /// Requests handed to reactor 0 whose reply is not yet written (or
    /// dropped): what [`Server::drain`] waits for, so a reply is not lost
    /// to a shutdown its own handler set off.
    pending: AtomicUsize,
}

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ConnEntry>> {
        reactor::sync::lock(&self.live)
    }
}

/// A listening RPC server. Dropping it shuts it down like [`Server::shutdown`].
pub struct Server {
    path: PathBuf,
    lock_path: PathBuf,
    lock: Option<Flock<File>>,
    stop: Arc<AtomicBool>,
    /// Write end of the accept thread's wake-up pair.
    wake: UnixStream,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Conns>,
    stopped: bool,
}

fn lock_path_for(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".lock");
    PathBuf::from(s)
}

/// Bind and listen on `path`, owner-only (0600) whatever the umask, or
/// 0660 with group `group` when one is given: the socket drives a process
/// that may open any file, so its mode must not follow the umask.
fn bind_listen(path: &Path, group: Option<u32>) -> Result<UnixListener, ServerError> {
    let listen_err = |e: nix::Error| ServerError::Listen {
        path: path.to_path_buf(),
        source: io::Error::from(e),
    };
    let addr = UnixAddr::new(path).map_err(|e| match e {
        nix::Error::ENAMETOOLONG => ServerError::PathTooLong(path.to_path_buf()),
        e => listen_err(e),
    })?;
    let fd: OwnedFd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(listen_err)?;
    // Linux creates the socket file with the socket inode's mode minus the
    // umask: 0600 here makes it owner-only from the first instant, with no
    // window in which others could connect (umask is per process, so
    // changing it would race other threads).
    stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o600)).map_err(listen_err)?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(listen_err)?;
    let access_err = |e: nix::Error| {
        let _ = std::fs::remove_file(path);
        ServerError::Access {
            path: path.to_path_buf(),
            source: io::Error::from(e),
        }
    };
    // Then exactly 0600 (a umask may have taken bits away), or the group
    // first and only then its access.
    let mode = match group {
        Some(gid) => {
            unistd::chown(path, None, Some(unistd::Gid::from_raw(gid))).map_err(access_err)?;
            0o660
        }
        None => 0o600,
    };
    stat::fchmodat(
        None,
        path,
        Mode::from_bits_truncate(mode),
        stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(access_err)?;
    let backlog = Backlog::new(LISTEN_BACKLOG).unwrap_or(Backlog::MAXCONN);
    socket::listen(&fd, backlog).map_err(listen_err)?;
    let listener = UnixListener::from(fd);
    // Non-blocking so accept() after poll() cannot hang if the peer vanished.
    listener
        .set_nonblocking(true)
        .map_err(|e| ServerError::Listen {
            path: path.to_path_buf(),
            source: e,
        })?;
    Ok(listener)
}

impl Server {
    /// Take an exclusive `flock` on `<path>.lock`, unlink a stale socket,
    /// bind, `listen(512)` and serve on background threads. Requests run on
    /// reactor 0, which must be running while clients talk to the server.
    pub fn listen(path: &Path) -> Result<Server, ServerError> {
        Self::listen_with_group(path, None)
    }

    /// [`Server::listen`], the socket mode 0660 with owner group `group`
    /// (a gid) instead of 0600, for a group allowed to drive the target.
    pub fn listen_with_group(path: &Path, group: Option<u32>) -> Result<Server, ServerError> {
        let lock_path = lock_path_for(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| ServerError::LockFile {
                path: lock_path.clone(),
                source,
            })?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| ServerError::InUse(path.to_path_buf()))?;

        // We hold the lock, so a socket file left there is stale.
        match std::fs::remove_file(path) {
            Ok(()) => tracing::debug!(path = %path.display(), "removed stale RPC socket"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove stale RPC socket")
            }
        }
        // On failure the lock file goes away again, as in SPDK.
        let fail = |e: ServerError| {
            let _ = std::fs::remove_file(&lock_path);
            e
        };
        let listener = bind_listen(path, group).map_err(fail)?;
        let (wake_rx, wake) = UnixStream::pair().map_err(|e| fail(ServerError::Thread(e)))?;

        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Conns::default());
        let accept = {
            let stop = stop.clone();
            let conns = conns.clone();
            std::thread::Builder::new()
                .name("rpc-accept".into())
                .spawn(move || accept_loop(listener, wake_rx, stop, conns))
        };
        let accept = match accept {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(fail(ServerError::Thread(e)));
            }
        };
        tracing::info!(path = %path.display(), "RPC server listening");
        Ok(Server {
            path: path.to_path_buf(),
            lock_path,
            lock: Some(lock),
            stop,
            wake,
            accept: Some(accept),
            conns,
            stopped: false,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wait (on reactor 0, where the handlers run) until every request
    /// received so far has its reply written, or `timeout` passes: a
    /// shutdown set off by a request (`spdk_kill_instance`, the delete of
    /// the bdev an application serves) still answers it.
    pub async fn drain(&self, timeout: Duration) {
        let start = std::time::Instant::now();
        while self.conns.pending.load(Ordering::Acquire) > 0 && start.elapsed() < timeout {
            reactor::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Stop accepting, close every connection (replies still in flight are
    /// dropped: [`Server::drain`] first), unlink the socket and the lock
    /// file, release the lock.
    pub fn shutdown(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.stop.store(true, Ordering::SeqCst);
        let _ = (&self.wake).write_all(&[1]);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        // The accept thread is gone, so no entry is added after this.
        let entries: Vec<ConnEntry> = self.conns.lock().drain().map(|(_, e)| e).collect();
        for e in &entries {
            let _ = e.stream.shutdown(std::net::Shutdown::Both);
        }
        for e in entries {
            if let Some(h) = e.reader {
                let _ = h.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
        // Unlink before unlocking: a process that opens the path afterwards
        // gets a fresh file rather than one we are about to delete.
        let _ = std::fs::remove_file(&self.lock_path);
        drop(self.lock.take());
        tracing::info!(path = %self.path.display(), "RPC server stopped");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn accept_loop(listener: UnixListener, wake: UnixStream, stop: Arc<AtomicBool>, conns: Arc<Conns>) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two initialised pollfd structs
        // that lives across the call; both fds stay open (owned above).
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::warn!(error = %e, "RPC poll failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        if fds[0].revents == 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let live = conns.lock().len();
                if live >= MAX_CONNS {
                    tracing::error!(
                        max = MAX_CONNS,
                        "too many RPC connections; closing the new one"
                    );
                    drop(stream);
                    continue;
                }
                if let Err(e) = spawn_conn(stream, &conns) {
                    tracing::error!(error = %e, "cannot start RPC connection threads");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning on a readable listener.
                tracing::warn!(error = %e, "RPC accept failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn spawn_conn(stream: UnixStream, conns: &Arc<Conns>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let id = conns.next_id.fetch_add(1, Ordering::Relaxed);
    let rstream = stream.try_clone()?;
    let wstream = stream.try_clone()?;
    conns.lock().insert(
        id,
        ConnEntry {
            stream,
            reader: None,
        },
    );
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let wconns = conns.clone();
    let writer = std::thread::Builder::new()
        .name(format!("rpc-conn{id}-tx"))
        .spawn(move || writer_loop(wstream, rx, id, wconns));
    if let Err(e) = writer {
        if let Some(e) = conns.lock().remove(&id) {
            let _ = e.stream.shutdown(std::net::Shutdown::Both);
        }
        return Err(e);
    }
    // If this fails, `tx` is dropped with the closure and the writer closes
    // the connection and removes its entry.
    let reader = std::thread::Builder::new()
        .name(format!("rpc-conn{id}-rx"))
        .spawn({
            let conns = conns.clone();
            move || reader_loop(rstream, tx, conns)
        })?;
    if let Some(e) = conns.lock().get_mut(&id) {
        e.reader = Some(reader);
    }
    Ok(())
}

/// Queue a reply for the writer, which counts it off [`Conns::pending`]
/// once written; the caller counted it on.
fn queue_reply(tx: &Sender<Vec<u8>>, conns: &Conns, out: Vec<u8>) {
    if tx.send(out).is_err() {
        // The writer is gone (connection reset): nobody will count it off.
        conns.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Hand one top-level value to reactor 0; its reply goes to `tx`.
fn submit(v: Value, tx: &Sender<Vec<u8>>, conns: &Arc<Conns>) {
    conns.pending.fetch_add(1, Ordering::AcqRel);
    if reactor::stopping() {
        // No reactor to run handlers (not started, or shutting down).
        match immediate_error(v, &RpcError::internal("Internal error")) {
            Some(out) => queue_reply(tx, conns, out),
            None => {
                conns.pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
        return;
    }
    let tx = tx.clone();
    let conns = conns.clone();
    reactor::send(0, move || {
        reactor::spawn_local(async move {
            match process_value(v).await {
                Some(out) => queue_reply(&tx, &conns, out),
                None => {
                    conns.pending.fetch_sub(1, Ordering::AcqRel);
                }
            }
        });
    });
}

fn reader_loop(mut stream: UnixStream, tx: Sender<Vec<u8>>, conns: Arc<Conns>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let room = RECV_BUF_SIZE - buf.len();
        if room == 0 {
            tracing::error!(
                limit = RECV_BUF_SIZE,
                "RPC request exceeds the receive buffer"
            );
            conns.pending.fetch_add(1, Ordering::AcqRel);
            queue_reply(&tx, &conns, parse_error_reply());
            break;
        }
        let want = room.min(chunk.len());
        let n = match stream.read(&mut chunk[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(error = %e, "RPC connection read failed");
                break;
            }
        };
        let eof = n == 0;
        buf.extend_from_slice(&chunk[..n]);
        let framed = take_values(&mut buf, eof);
        for v in framed.values {
            submit(v, &tx, &conns);
        }
        if framed.parse_error {
            // No resync point in a JSON stream: answer and close.
            conns.pending.fetch_add(1, Ordering::AcqRel);
            queue_reply(&tx, &conns, parse_error_reply());
            break;
        }
        if eof {
            if !buf.is_empty() {
                tracing::debug!(
                    bytes = buf.len(),
                    "RPC peer closed with an incomplete request"
                );
            }
            break;
        }
    }
    // Stop reading; the writer still sends what is in flight.
    let _ = stream.shutdown(std::net::Shutdown::Read);
}

/// `send(MSG_NOSIGNAL)` until all of `data` is out: a peer that went away
/// must not raise SIGPIPE in an application that did not ignore it.
fn send_all(stream: &UnixStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match socket::send(stream.as_raw_fd(), data, MsgFlags::MSG_NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn writer_loop(stream: UnixStream, rx: Receiver<Vec<u8>>, id: u64, conns: Arc<Conns>) {
    let mut broken = false;
    // Ends once the reader and every in-flight request dropped their sender.
    for msg in rx.iter() {
        if !broken {
            if let Err(e) = send_all(&stream, &msg) {
                tracing::debug!(error = %e, "RPC connection write failed");
                broken = true;
            }
        }
        conns.pending.fetch_sub(1, Ordering::AcqRel);
    }
    // Other clones of the fd exist (the registry's), so close explicitly.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    conns.lock().remove(&id);
}
