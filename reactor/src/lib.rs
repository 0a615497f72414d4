//! Thread-per-core runtime in the shape of SPDK's reactor/thread model.
//!
//! * One reactor thread per core of the mask, pinned to that core.
//! * Each reactor owns a lock-free MPSC mailbox ([`send`]), a local deferred
//!   queue ([`defer`]), pollers ([`poller_register`]), one-shot timers
//!   ([`set_timer`]), a small executor for management futures
//!   ([`spawn_local`]) and one io_uring ([`uring`]).
//! * Busy-polling by default; in interrupt mode a reactor with nothing to do
//!   sleeps in `io_uring_enter` until a completion, a message (eventfd) or
//!   its next timer.
//! * I/O and metadata buffers come from [`dma`], a hugepage-backed pool.
//! * Socket helpers shared by the network front ends are in [`net`];
//!   poison-tolerant locks, one-shot handoffs and [`run_on`] / [`call_on`]
//!   (await work done on another reactor) in [`sync`].
//!
//! Thread affinity: everything that is not `Send` (pollers, timers, tasks,
//! io_uring callbacks) runs on the reactor that created it and must be
//! dropped there.

pub mod dma;
mod executor;
pub mod memory;
mod msg;
pub mod net;
mod runtime;
pub mod sync;
pub mod uring;

pub use dma::DmaBuf;
pub use executor::{sleep, spawn_local, spawn_on, with_timeout, yield_now, JoinHandle};
pub use memory::AllocError;
pub use msg::INLINE_WORDS;
pub use runtime::{
    cancel_timer, core_id, current, defer, is_interrupt_mode, now_ns, num_reactors,
    poller_register, refresh_tick, send, set_timer, start, stop, stopping, tick_ns, Config, Error,
    PollStatus, Poller, Runtime, TimerId,
};
pub use sync::{call_on, run_on};
