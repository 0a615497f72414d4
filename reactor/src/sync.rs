//! Helpers for the management path: poison-tolerant locking, the one-shot
//! value handoff (across threads, or within a reactor for awaiting a
//! callback), and running work on a given reactor.
//!
//! None of this is for the per-I/O path, which takes no locks and reaches
//! other reactors by message ([`crate::send`]).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context, Poll, Waker};

/// Lock `m`, ignoring poisoning: the state behind our mutexes is updated in
/// steps that each leave it consistent, so a panic elsewhere while holding
/// the lock is no reason to refuse service (or to panic again) here.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-lock `l`, ignoring poisoning (see [`lock`]).
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-lock `l`, ignoring poisoning (see [`lock`]).
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// One value and the task waiting for it: the one-shot handoff behind
/// [`oneshot`] (across threads) and [`local_oneshot`] (within a reactor),
/// and so behind every "await a callback's result" in the runtime and the
/// bdev layer.
struct Handoff<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

impl<T> Default for Handoff<T> {
    fn default() -> Self {
        Handoff {
            value: None,
            waker: None,
        }
    }
}

impl<T> Handoff<T> {
    /// Store the value; the waiter to wake, once the lock or borrow is
    /// released (waking may run code that looks at the slot again).
    fn put(&mut self, v: T) -> Option<Waker> {
        self.value = Some(v);
        self.waker.take()
    }

    fn poll_take(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        match self.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                self.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

fn wake(w: Option<Waker>) {
    if let Some(w) = w {
        w.wake();
    }
}

type Slot<T> = Arc<Mutex<Handoff<T>>>;

/// The sending half of a [`oneshot`] channel (any thread).
pub struct Sender<T>(Slot<T>);

/// The receiving half of a [`oneshot`] channel: a future for the value.
pub struct Receiver<T>(Slot<T>);

/// A channel for one value, from any thread to a task awaiting it.
pub fn oneshot<T>() -> (Sender<T>, Receiver<T>) {
    let s: Slot<T> = Arc::default();
    (Sender(s.clone()), Receiver(s))
}

impl<T> Sender<T> {
    pub fn send(self, v: T) {
        // The guard is dropped before the wake (see `Handoff::put`).
        let w = lock(&self.0).put(v);
        wake(w);
    }
}

impl<T> Receiver<T> {
    /// Wait for the value. The sender must send: a dropped sender leaves
    /// this pending.
    pub fn recv(self) -> impl Future<Output = T> {
        std::future::poll_fn(move |cx| lock(&self.0).poll_take(cx))
    }
}

/// The sending half of a [`local_oneshot`] channel (this reactor only).
pub struct LocalSender<T>(Rc<RefCell<Handoff<T>>>);

/// The receiving half of a [`local_oneshot`] channel: a future for the
/// value.
pub struct LocalReceiver<T>(Rc<RefCell<Handoff<T>>>);

/// A channel for one value within a reactor (no lock): for awaiting a
/// completion callback, a timer or a task on the same reactor.
pub fn local_oneshot<T>() -> (LocalSender<T>, LocalReceiver<T>) {
    let s: Rc<RefCell<Handoff<T>>> = Rc::default();
    (LocalSender(s.clone()), LocalReceiver(s))
}

impl<T> LocalSender<T> {
    pub fn send(self, v: T) {
        let w = self.0.borrow_mut().put(v);
        wake(w);
    }
}

impl<T> Future for LocalReceiver<T> {
    type Output = T;
    /// Pending until the sender sends (a dropped sender leaves it so).
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        self.0.borrow_mut().poll_take(cx)
    }
}

/// Run the future made by `f` as a task on reactor `r` and await its output
/// (at once, without a hop, when already on `r`).
pub async fn run_on<F, Fut, T>(r: u32, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    if crate::current() == Some(r) {
        return f().await;
    }
    let (tx, rx) = oneshot();
    crate::spawn_on(r, move || async move {
        tx.send(f().await);
    });
    rx.recv().await
}

/// Run `f` on reactor `r` (a message, not a task) and await its result
/// (at once when already on `r`).
pub async fn call_on<F, T>(r: u32, f: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if crate::current() == Some(r) {
        return f();
    }
    let (tx, rx) = oneshot();
    crate::send(r, move || tx.send(f()));
    rx.recv().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::tests::cfg_on;
    use crate::runtime::{start, stop};
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn run_and_call_on_other_reactors() {
        let _g = lock(&crate::runtime::tests::SERIAL);
        let (tx, rx) = mpsc::channel();
        let cfg = cfg_on(0x3);
        let rt = start(cfg, move || {
            crate::spawn_local(async move {
                let a = run_on(1, || async { crate::current() }).await;
                let b = call_on(1, || crate::current().map(|r| r + 10)).await;
                let c = call_on(0, || 7).await;
                tx.send((a, b, c)).unwrap();
            });
        })
        .unwrap();
        let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(got, (Some(1), Some(11), 7));
        stop();
        rt.join();
    }

    #[test]
    fn lock_survives_poisoning() {
        let m = Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
