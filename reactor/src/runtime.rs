//! Reactor threads, mailboxes, pollers, timers and the main loop.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle as ThreadHandle;
use std::time::Duration;

use crossbeam_queue::SegQueue;

use crate::executor::Executor;
use crate::msg::{SendSlot, Slot};
use crate::uring::Ring;

/// A message run on another reactor: a fixed slot, no allocation for a
/// small closure (see `msg`).
type Msg = SendSlot;

/// What a poller reports, as SPDK's `SPDK_POLLER_BUSY` / `SPDK_POLLER_IDLE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollStatus {
    Busy,
    Idle,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("core mask {0:#x} selects no core")]
    EmptyMask(u64),
    #[error("core {0} in the mask is not available on this machine ({1} cores online)")]
    NoSuchCore(usize, usize),
    #[error("a runtime is already running in this process")]
    AlreadyRunning,
    #[error("cannot create io_uring: {0}")]
    Uring(std::io::Error),
    #[error("cannot create eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot spawn reactor thread: {0}")]
    Spawn(std::io::Error),
}

/// Runtime configuration (`-m`, `--interrupt-mode`, `-s`, `--no-huge`).
#[derive(Clone, Debug)]
pub struct Config {
    /// Core mask as in SPDK's `-m`: bit N selects core N.
    pub core_mask: u64,
    /// Sleep when idle instead of busy-polling.
    pub interrupt_mode: bool,
    /// DMA pool size in MiB.
    pub mem_size_mb: usize,
    /// Do not try hugepages for the DMA pool.
    pub no_huge: bool,
    /// Entries of each reactor's io_uring submission queue.
    pub uring_entries: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            core_mask: 0x1,
            interrupt_mode: false,
            mem_size_mb: 256,
            no_huge: false,
            uring_entries: 1024,
        }
    }
}

/// Cross-thread half of a reactor.
pub(crate) struct Mailbox {
    queue: SegQueue<Msg>,
    efd: OwnedFd,
    sleeping: AtomicBool,
}

impl Mailbox {
    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own.
        unsafe {
            libc::write(
                self.efd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            );
        }
    }
}

pub(crate) struct Shared {
    mailboxes: Vec<Mailbox>,
    cores: Vec<usize>,
    interrupt_mode: bool,
    stop: AtomicBool,
}

impl Shared {
    pub(crate) fn send(&self, reactor: u32, msg: Msg) {
        let mb = &self.mailboxes[reactor as usize];
        mb.queue.push(msg);
        // Pairs with the SeqCst store of `sleeping` before the reactor's
        // final emptiness check: either it sees our message or we see it asleep.
        if self.interrupt_mode && mb.sleeping.load(Ordering::SeqCst) {
            mb.kick();
        }
    }
}

static GLOBAL: Mutex<Option<Arc<Shared>>> = Mutex::new(None);

fn global() -> Arc<Shared> {
    crate::sync::lock(&GLOBAL)
        .clone()
        .expect("reactor runtime is not running")
}

struct PollerSlot {
    f: Option<Box<dyn FnMut() -> PollStatus>>,
    period_ns: u64,
    next_ns: u64,
    gen: u64,
}

struct TimerEntry {
    f: Box<dyn FnOnce()>,
}

/// Per-reactor state, reachable only from its own thread.
pub(crate) struct Local {
    pub(crate) index: u32,
    pub(crate) shared: Arc<Shared>,
    deferred: RefCell<VecDeque<Slot>>,
    pollers: RefCell<Vec<PollerSlot>>,
    free_pollers: RefCell<Vec<usize>>,
    poller_gen: Cell<u64>,
    timers: RefCell<BinaryHeap<Reverse<(u64, u64)>>>,
    timer_fns: RefCell<HashMap<u64, TimerEntry>>,
    timer_seq: Cell<u64>,
    pub(crate) executor: Executor,
    pub(crate) ring: Ring,
}

thread_local! {
    static LOCAL: RefCell<Option<Rc<Local>>> = const { RefCell::new(None) };
    /// This reactor's clock, read once per loop iteration (0 off-reactor).
    static TICK: Cell<u64> = const { Cell::new(0) };
}

pub(crate) fn with_local<R>(f: impl FnOnce(&Rc<Local>) -> R) -> R {
    LOCAL.with(|l| {
        let l = l.borrow();
        let local = l
            .as_ref()
            .expect("must be called on a reactor thread (reactor::current() is None)");
        f(local)
    })
}

pub(crate) fn try_local() -> Option<Rc<Local>> {
    LOCAL.with(|l| l.borrow().clone())
}

/// Monotonic nanoseconds (CLOCK_MONOTONIC). Read on every I/O, so it is
/// one vDSO call and integer math, no `Instant` arithmetic.
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The time at the start of this reactor's loop iteration (CLOCK_MONOTONIC
/// ns, as [`now_ns`]; read again after messages ran and before timers, so
/// an I/O never completes at the tick it was submitted at): about one clock
/// read per iteration instead of two per I/O, for I/O statistics, QoS and latencies that
/// tolerate being one iteration old (SPDK caches its ticks per poll the
/// same way). Off a reactor it is [`now_ns`]. Never earlier than a previous
/// call on the same thread.
#[inline]
pub fn tick_ns() -> u64 {
    let t = TICK.with(|t| t.get());
    if t == 0 {
        now_ns()
    } else {
        t
    }
}

/// Read the clock into [`tick_ns`] now (the loop does it every iteration;
/// code that waited in between, e.g. a blocking wait, may refresh early).
#[inline]
pub fn refresh_tick() -> u64 {
    let t = now_ns();
    TICK.with(|c| c.set(t));
    t
}

/// Index of the calling reactor (0-based), or `None` off-reactor.
pub fn current() -> Option<u32> {
    LOCAL.with(|l| l.borrow().as_ref().map(|l| l.index))
}

/// Number of reactors of the running runtime.
pub fn num_reactors() -> u32 {
    match try_local() {
        Some(l) => l.shared.mailboxes.len() as u32,
        None => global().mailboxes.len() as u32,
    }
}

/// Physical core that reactor `reactor` is pinned to.
pub fn core_id(reactor: u32) -> usize {
    match try_local() {
        Some(l) => l.shared.cores[reactor as usize],
        None => global().cores[reactor as usize],
    }
}

/// Whether reactors sleep when idle.
pub fn is_interrupt_mode() -> bool {
    match try_local() {
        Some(l) => l.shared.interrupt_mode,
        None => global().interrupt_mode,
    }
}

/// Run `f` on reactor `reactor` (lock-free MPSC ring; never runs inline).
/// Callable from any thread while the runtime runs.
pub fn send(reactor: u32, f: impl FnOnce() + Send + 'static) {
    match try_local() {
        Some(l) => l.shared.send(reactor, SendSlot::new(f)),
        None => global().send(reactor, SendSlot::new(f)),
    }
}

/// Run `f` on this reactor at its next loop iteration (no atomics).
pub fn defer(f: impl FnOnce() + 'static) {
    with_local(|l| l.deferred.borrow_mut().push_back(Slot::new(f)));
}

/// Handle to a registered poller. Dropping it unregisters the poller;
/// it is `!Send` so that happens on the owning reactor.
pub struct Poller {
    idx: usize,
    gen: u64,
    _not_send: std::marker::PhantomData<Rc<()>>,
}

impl Drop for Poller {
    fn drop(&mut self) {
        if let Some(l) = try_local() {
            let mut pollers = l.pollers.borrow_mut();
            if let Some(slot) = pollers.get_mut(self.idx) {
                if slot.gen == self.gen {
                    slot.gen = 0;
                    slot.f = None;
                    l.free_pollers.borrow_mut().push(self.idx);
                }
            }
        }
    }
}

/// Register a poller on the calling reactor: run every iteration when
/// `period` is zero, otherwise at most once per `period`.
pub fn poller_register(period: Duration, f: impl FnMut() -> PollStatus + 'static) -> Poller {
    with_local(|l| {
        let gen = l.poller_gen.get() + 1;
        l.poller_gen.set(gen);
        let period_ns = period.as_nanos() as u64;
        let slot = PollerSlot {
            f: Some(Box::new(f)),
            period_ns,
            next_ns: now_ns() + period_ns,
            gen,
        };
        let mut pollers = l.pollers.borrow_mut();
        let idx = match l.free_pollers.borrow_mut().pop() {
            Some(i) => {
                pollers[i] = slot;
                i
            }
            None => {
                pollers.push(slot);
                pollers.len() - 1
            }
        };
        Poller {
            idx,
            gen,
            _not_send: std::marker::PhantomData,
        }
    })
}

/// Identifies a one-shot timer for [`cancel_timer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerId(u64);

/// Run `f` on this reactor once `delay` has passed.
pub fn set_timer(delay: Duration, f: impl FnOnce() + 'static) -> TimerId {
    with_local(|l| {
        let seq = l.timer_seq.get() + 1;
        l.timer_seq.set(seq);
        let deadline = now_ns() + delay.as_nanos() as u64;
        l.timers.borrow_mut().push(Reverse((deadline, seq)));
        l.timer_fns
            .borrow_mut()
            .insert(seq, TimerEntry { f: Box::new(f) });
        TimerId(seq)
    })
}

/// Cancel a timer that has not fired yet (no-op otherwise).
pub fn cancel_timer(id: TimerId) {
    with_local(|l| {
        l.timer_fns.borrow_mut().remove(&id.0);
    });
}

/// Ask every reactor to leave its loop. Callable from any thread.
pub fn stop() {
    let shared = match try_local() {
        Some(l) => l.shared.clone(),
        None => match crate::sync::lock(&GLOBAL).clone() {
            Some(s) => s,
            None => return,
        },
    };
    shared.stop.store(true, Ordering::SeqCst);
    for mb in &shared.mailboxes {
        mb.kick();
    }
}

/// Whether [`stop`] has been called.
pub fn stopping() -> bool {
    match try_local() {
        Some(l) => l.shared.stop.load(Ordering::SeqCst),
        None => crate::sync::lock(&GLOBAL)
            .as_ref()
            .is_none_or(|s| s.stop.load(Ordering::SeqCst)),
    }
}

/// A running set of reactors.
pub struct Runtime {
    threads: Vec<ThreadHandle<()>>,
}

impl Runtime {
    /// Wait until every reactor has left its loop, then tear the runtime
    /// down so another can be started in this process.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
        *crate::sync::lock(&GLOBAL) = None;
    }
}

fn mask_to_cores(mask: u64) -> Result<Vec<usize>, Error> {
    let online = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // SAFETY: sysconf has no preconditions.
    let conf = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    let ncpu = if conf > 0 { conf as usize } else { online }.max(online);
    let cores: Vec<usize> = (0..64).filter(|b| mask & (1u64 << b) != 0).collect();
    if cores.is_empty() {
        return Err(Error::EmptyMask(mask));
    }
    for &c in &cores {
        if c >= ncpu {
            return Err(Error::NoSuchCore(c, online));
        }
    }
    Ok(cores)
}

fn new_eventfd() -> Result<OwnedFd, Error> {
    // Blocking on purpose: io_uring returns EAGAIN at once for a non-blocking
    // fd instead of waiting for it to become readable.
    // SAFETY: plain syscall; the fd is owned by the OwnedFd on success.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::EventFd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, valid descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Start one reactor per core of `cfg.core_mask` and run `main` on reactor 0.
pub fn start(cfg: Config, main: impl FnOnce() + Send + 'static) -> Result<Runtime, Error> {
    let cores = mask_to_cores(cfg.core_mask)?;
    {
        let g = crate::sync::lock(&GLOBAL);
        if g.is_some() {
            return Err(Error::AlreadyRunning);
        }
    }
    crate::dma::init(cfg.mem_size_mb, !cfg.no_huge);
    let mut mailboxes = Vec::with_capacity(cores.len());
    for _ in &cores {
        mailboxes.push(Mailbox {
            queue: SegQueue::new(),
            efd: new_eventfd()?,
            sleeping: AtomicBool::new(false),
        });
    }
    let shared = Arc::new(Shared {
        mailboxes,
        cores: cores.clone(),
        interrupt_mode: cfg.interrupt_mode,
        stop: AtomicBool::new(false),
    });
    *crate::sync::lock(&GLOBAL) = Some(shared.clone());

    let barrier = Arc::new(Barrier::new(cores.len() + 1));
    let ring_err: Arc<Mutex<Option<Error>>> = Arc::new(Mutex::new(None));
    let mut threads = Vec::new();
    for (i, &core) in cores.iter().enumerate() {
        let shared = shared.clone();
        let barrier = barrier.clone();
        let ring_err = ring_err.clone();
        let entries = cfg.uring_entries;
        let t = std::thread::Builder::new()
            .name(format!("reactor_{i}"))
            .spawn(move || {
                let mut set = nix::sched::CpuSet::new();
                if set.set(core).is_ok() {
                    if let Err(e) =
                        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                    {
                        tracing::warn!(core, error = %e, "cannot pin reactor to its core");
                    }
                }
                let ring = match Ring::new(entries) {
                    Ok(r) => r,
                    Err(e) => {
                        *crate::sync::lock(&ring_err) = Some(Error::Uring(e));
                        barrier.wait();
                        return;
                    }
                };
                let local = Rc::new(Local {
                    index: i as u32,
                    shared,
                    deferred: RefCell::new(VecDeque::new()),
                    pollers: RefCell::new(Vec::new()),
                    free_pollers: RefCell::new(Vec::new()),
                    poller_gen: Cell::new(0),
                    timers: RefCell::new(BinaryHeap::new()),
                    timer_fns: RefCell::new(HashMap::new()),
                    timer_seq: Cell::new(0),
                    executor: Executor::default(),
                    ring,
                });
                LOCAL.with(|l| *l.borrow_mut() = Some(local.clone()));
                barrier.wait();
                tracing::debug!(reactor = i, core, "reactor started");
                run_loop(&local);
                tracing::debug!(reactor = i, "reactor stopped");
                // Drop what this reactor still owns on its own thread.
                local.executor.clear();
                local.pollers.borrow_mut().clear();
                local.timer_fns.borrow_mut().clear();
                local.deferred.borrow_mut().clear();
                LOCAL.with(|l| *l.borrow_mut() = None);
                TICK.with(|t| t.set(0));
            })
            .map_err(Error::Spawn)?;
        threads.push(t);
    }
    barrier.wait();
    if let Some(e) = crate::sync::lock(&ring_err).take() {
        stop();
        Runtime { threads }.join();
        return Err(e);
    }
    shared.send(0, SendSlot::new(main));
    Ok(Runtime { threads })
}

const MSG_BATCH: usize = 128;

fn run_loop(l: &Rc<Local>) {
    let mb = &l.shared.mailboxes[l.index as usize];
    loop {
        let mut busy = false;
        refresh_tick();

        for _ in 0..MSG_BATCH {
            match mb.queue.pop() {
                Some(m) => {
                    busy = true;
                    m.run();
                }
                None => break,
            }
        }
        if busy {
            // What messages submitted may complete in the deferred work
            // below: it must see a later clock than they did.
            refresh_tick();
        }

        let n = l.deferred.borrow().len();
        for _ in 0..n {
            let f = l.deferred.borrow_mut().pop_front();
            match f {
                Some(f) => {
                    busy = true;
                    f.run();
                }
                None => break,
            }
        }

        busy |= l.executor.run_ready();
        busy |= run_pollers(l);
        busy |= run_timers(l);
        busy |= l.ring.reap();

        if l.shared.stop.load(Ordering::Relaxed) {
            break;
        }
        l.ring.flush_submissions();

        if !busy && l.shared.interrupt_mode {
            mb.sleeping.store(true, Ordering::SeqCst);
            let idle = mb.queue.is_empty()
                && l.deferred.borrow().is_empty()
                && !l.executor.has_ready()
                && !l.shared.stop.load(Ordering::SeqCst);
            if idle {
                let deadline = next_deadline(l);
                let now = now_ns();
                let timeout = deadline.map(|d| Duration::from_nanos(d.saturating_sub(now)));
                l.ring.wait(timeout, mb.efd.as_raw_fd());
            }
            mb.sleeping.store(false, Ordering::SeqCst);
        }
    }
}

fn run_pollers(l: &Rc<Local>) -> bool {
    let mut busy = false;
    let n = l.pollers.borrow().len();
    if n == 0 {
        return false;
    }
    // Timed pollers compare with the iteration's clock.
    let now = tick_ns();
    for i in 0..n {
        let (f, gen) = {
            let mut pollers = l.pollers.borrow_mut();
            let slot = &mut pollers[i];
            if slot.f.is_none() {
                continue;
            }
            if slot.period_ns > 0 {
                if now < slot.next_ns {
                    continue;
                }
                slot.next_ns = now + slot.period_ns;
            }
            (slot.f.take(), slot.gen)
        };
        let mut f = f.expect("checked above");
        if f() == PollStatus::Busy {
            busy = true;
        }
        let mut pollers = l.pollers.borrow_mut();
        // Put it back unless it was unregistered while running.
        if let Some(slot) = pollers.get_mut(i) {
            if slot.gen == gen && slot.f.is_none() {
                slot.f = Some(f);
            }
        }
    }
    busy
}

fn run_timers(l: &Rc<Local>) -> bool {
    let mut busy = false;
    if l.timers.borrow().is_empty() {
        return false;
    }
    // What the timers do sees a clock no earlier than their deadline.
    let now = refresh_tick();
    loop {
        let seq = {
            let mut heap = l.timers.borrow_mut();
            match heap.peek() {
                Some(Reverse((d, _))) if *d <= now => heap.pop().map(|Reverse((_, s))| s),
                _ => None,
            }
        };
        let Some(seq) = seq else { break };
        let entry = l.timer_fns.borrow_mut().remove(&seq);
        if let Some(e) = entry {
            busy = true;
            (e.f)();
        }
    }
    busy
}

fn next_deadline(l: &Rc<Local>) -> Option<u64> {
    let mut d: Option<u64> = None;
    {
        let mut heap = l.timers.borrow_mut();
        let fns = l.timer_fns.borrow();
        // Drop cancelled timers from the top so they do not cause wakeups.
        while let Some(Reverse((deadline, seq))) = heap.peek().copied() {
            if fns.contains_key(&seq) {
                d = Some(deadline);
                break;
            }
            heap.pop();
        }
    }
    for p in l.pollers.borrow().iter() {
        if p.f.is_some() {
            let next = if p.period_ns == 0 {
                now_ns()
            } else {
                p.next_ns
            };
            // Every-iteration pollers in interrupt mode are re-run on any
            // wakeup; they must not keep the reactor spinning.
            if p.period_ns > 0 {
                d = Some(d.map_or(next, |x| x.min(next)));
            }
        }
    }
    d
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::mpsc;

    pub(crate) static SERIAL: Mutex<()> = Mutex::new(());

    fn cfg(interrupt: bool) -> Config {
        Config {
            core_mask: 0x1,
            interrupt_mode: interrupt,
            mem_size_mb: 8,
            no_huge: true,
            uring_entries: 64,
        }
    }

    /// The crate's test runtime on `core_mask`, in interrupt mode.
    pub(crate) fn cfg_on(core_mask: u64) -> Config {
        Config {
            core_mask,
            ..cfg(true)
        }
    }

    #[test]
    fn messages_timers_pollers() {
        let _g = crate::sync::lock(&SERIAL);
        for interrupt in [false, true] {
            let (tx, rx) = mpsc::channel();
            let rt = start(cfg(interrupt), move || {
                let count = Rc::new(Cell::new(0u32));
                let c2 = count.clone();
                let holder: Rc<RefCell<Option<Poller>>> = Rc::new(RefCell::new(None));
                let h2 = holder.clone();
                let tx2 = tx.clone();
                *holder.borrow_mut() = Some(poller_register(Duration::from_millis(1), move || {
                    c2.set(c2.get() + 1);
                    if c2.get() == 5 {
                        h2.borrow_mut().take();
                        tx2.send(("poller", c2.get() as u64)).unwrap();
                    }
                    PollStatus::Busy
                }));
                let t0 = now_ns();
                let tx3 = tx.clone();
                set_timer(Duration::from_millis(20), move || {
                    tx3.send(("timer", (now_ns() - t0) / 1_000_000)).unwrap();
                });
                let cancelled =
                    set_timer(Duration::from_millis(5), || panic!("cancelled timer ran"));
                cancel_timer(cancelled);
                let _ = count;
            })
            .unwrap();
            let mut got = Vec::new();
            for _ in 0..2 {
                got.push(rx.recv_timeout(Duration::from_secs(5)).unwrap());
            }
            got.sort();
            assert_eq!(got[0], ("poller", 5));
            assert_eq!(got[1].0, "timer");
            assert!(got[1].1 >= 20);
            stop();
            rt.join();
        }
    }

    #[test]
    fn cross_thread_send_wakes_sleeping_reactor() {
        let _g = crate::sync::lock(&SERIAL);
        let rt = start(cfg(true), || {}).unwrap();
        let counter = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        for _ in 0..1000 {
            let c = counter.clone();
            let tx = tx.clone();
            send(0, move || {
                assert_eq!(current(), Some(0));
                if c.fetch_add(1, Ordering::SeqCst) == 999 {
                    tx.send(()).unwrap();
                }
            });
        }
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        stop();
        rt.join();
    }

    #[test]
    fn bad_masks() {
        assert!(matches!(mask_to_cores(0), Err(Error::EmptyMask(0))));
        assert!(matches!(
            mask_to_cores(1 << 63),
            Err(Error::NoSuchCore(63, _))
        ));
        assert_eq!(mask_to_cores(0x1).unwrap(), vec![0]);
    }
}
