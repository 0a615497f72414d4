//! A one-shot, cross-reactor value handoff for the management path
//! (create/delete waiting for work done on the owner reactor).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

type Slot<T> = Arc<Mutex<(Option<T>, Option<Waker>)>>;

pub(crate) struct Sender<T>(Slot<T>);
pub(crate) struct Receiver<T>(Slot<T>);

pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let s: Slot<T> = Arc::new(Mutex::new((None, None)));
    (Sender(s.clone()), Receiver(s))
}

impl<T> Sender<T> {
    pub(crate) fn send(self, v: T) {
        let w = {
            let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
            g.0 = Some(v);
            g.1.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }
}

impl<T> Receiver<T> {
    pub(crate) fn recv(self) -> impl Future<Output = T> {
        std::future::poll_fn(move |cx| {
            let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
            match g.0.take() {
                Some(v) => Poll::Ready(v),
                None => {
                    g.1 = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
    }
}

/// Run `f` as a task on reactor `r` and await its result.
pub async fn run_on<F, Fut, T>(r: u32, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let (tx, rx) = channel();
    reactor::spawn_on(r, move || async move {
        tx.send(f().await);
    });
    rx.recv().await
}
