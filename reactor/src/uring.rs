//! One io_uring per reactor. Operations carry a completion callback that
//! owns whatever the kernel reads or writes (buffers, paths), so nothing is
//! freed while the kernel still uses it.

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

use crate::msg::Slot;
use crate::runtime::with_local;

/// Callback run with the CQE result (`res`: bytes or `-errno`), in a fixed
/// slot: no allocation for a closure of up to `INLINE_WORDS` words.
type Cb = Slot<i32>;

const EVENTFD_TAG: u64 = u64::MAX;

pub(crate) struct Ring {
    ring: RefCell<IoUring>,
    cbs: RefCell<Vec<Option<Cb>>>,
    free: RefCell<Vec<usize>>,
    /// SQEs pushed since the last `submit`.
    unsubmitted: Cell<u32>,
    inflight: Cell<u32>,
    efd_armed: Cell<bool>,
    efd_buf: Box<Cell<u64>>,
}

impl Ring {
    pub(crate) fn new(entries: u32) -> std::io::Result<Ring> {
        let ring = IoUring::builder().setup_clamp().build(entries.max(8))?;
        Ok(Ring {
            ring: RefCell::new(ring),
            cbs: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            unsubmitted: Cell::new(0),
            inflight: Cell::new(0),
            efd_armed: Cell::new(false),
            efd_buf: Box::new(Cell::new(0)),
        })
    }

    fn push(&self, entry: squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        loop {
            // SAFETY: the caller of `submit` guarantees the entry's memory
            // stays valid until its completion callback runs.
            let pushed = unsafe { ring.submission().push(&entry).is_ok() };
            if pushed {
                break;
            }
            // Submission queue full: hand what we have to the kernel.
            if let Err(e) = ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!(error = %e, "io_uring submit failed");
                }
            }
            self.unsubmitted.set(0);
        }
        self.unsubmitted.set(self.unsubmitted.get() + 1);
    }

    pub(crate) fn flush_submissions(&self) {
        if self.unsubmitted.get() == 0 {
            return;
        }
        match self.ring.borrow_mut().submit() {
            Ok(_) => self.unsubmitted.set(0),
            Err(e) => {
                if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!(error = %e, "io_uring submit failed");
                }
            }
        }
    }

    /// Run callbacks of completed operations; true if any completed.
    pub(crate) fn reap(&self) -> bool {
        if self.inflight.get() == 0 && !self.efd_armed.get() {
            return false;
        }
        let mut any = false;
        loop {
            let cqe = {
                let mut ring = self.ring.borrow_mut();
                let mut cq = ring.completion();
                cq.next()
            };
            let Some(cqe) = cqe else { break };
            any = true;
            let tag = cqe.user_data();
            if tag == EVENTFD_TAG {
                self.efd_armed.set(false);
                continue;
            }
            let cb = self.cbs.borrow_mut()[tag as usize].take();
            self.free.borrow_mut().push(tag as usize);
            self.inflight.set(self.inflight.get() - 1);
            if let Some(cb) = cb {
                cb.run_with(cqe.result());
            }
        }
        any
    }

    /// Sleep in `io_uring_enter` until a completion, an eventfd kick, or
    /// the timeout.
    pub(crate) fn wait(&self, timeout: Option<Duration>, efd: RawFd) {
        if !self.efd_armed.get() {
            let e = opcode::Read::new(types::Fd(efd), self.efd_buf.as_ptr() as *mut u8, 8)
                .build()
                .user_data(EVENTFD_TAG);
            self.push(e);
            self.efd_armed.set(true);
        }
        let ring = self.ring.borrow_mut();
        let r = match timeout {
            Some(t) => {
                let ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                ring.submitter().submit_with_args(1, &args)
            }
            None => ring.submit_and_wait(1),
        };
        self.unsubmitted.set(0);
        if let Err(e) = r {
            match e.raw_os_error() {
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) => {}
                _ => tracing::error!(error = %e, "io_uring wait failed"),
            }
        }
    }

    fn submit_op(&self, entry: squeue::Entry, cb: Cb) {
        let slot = match self.free.borrow_mut().pop() {
            Some(s) => {
                self.cbs.borrow_mut()[s] = Some(cb);
                s
            }
            None => {
                let mut cbs = self.cbs.borrow_mut();
                cbs.push(Some(cb));
                cbs.len() - 1
            }
        };
        self.inflight.set(self.inflight.get() + 1);
        self.push(entry.user_data(slot as u64));
    }
}

/// Queue `entry` on the calling reactor's ring; `cb` runs on this reactor
/// with the result. Submission is batched once per loop iteration.
///
/// # Safety
/// Every pointer in `entry` (buffers, paths, iovecs) must stay valid until
/// `cb` runs; the usual way is for `cb` to own them.
pub unsafe fn submit(entry: squeue::Entry, cb: impl FnOnce(i32) + 'static) {
    with_local(|l| l.ring.submit_op(entry, Slot::with_arg(cb)));
}

/// Number of operations in flight on the calling reactor's ring.
pub fn inflight() -> u32 {
    with_local(|l| l.ring.inflight.get())
}

pub use io_uring::opcode as op;
pub use io_uring::types as ty;

/// Await one operation on the calling reactor's ring; resolves with the
/// CQE result (`res`: bytes or `-errno`).
///
/// # Safety
/// As [`submit`]: every pointer and fd in `entry` must stay valid until
/// the returned future resolves, and the future must be polled to
/// completion (not dropped early) when `entry` references memory.
pub unsafe fn run(entry: io_uring::squeue::Entry) -> impl std::future::Future<Output = i32> {
    let (tx, rx) = crate::sync::local_oneshot();
    // SAFETY: forwarded to the caller's contract.
    unsafe { submit(entry, move |res| tx.send(res)) };
    rx
}
