//! Small cross-reactor helpers: run a future on another reactor and await
//! its output; run a closure there without re-entering the caller.

use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

struct Oneshot<T> {
    inner: Mutex<(Option<T>, Option<Waker>)>,
}

/// Run the future made by `f` on reactor `r` and return its output.
pub async fn on_reactor<T, F, Fut>(r: u32, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    if reactor::current() == Some(r) {
        return f().await;
    }
    let slot = Arc::new(Oneshot {
        inner: Mutex::new((None, None)),
    });
    let s2 = slot.clone();
    reactor::spawn_on(r, move || async move {
        let v = f().await;
        let w = {
            let mut g = s2.inner.lock().unwrap_or_else(|e| e.into_inner());
            g.0 = Some(v);
            g.1.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    });
    std::future::poll_fn(|cx| {
        let mut g = slot.inner.lock().unwrap_or_else(|e| e.into_inner());
        match g.0.take() {
            Some(v) => Poll::Ready(v),
            None => {
                g.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    })
    .await
}

/// Run `f` on reactor `r`: by message, or deferred when `r` is this one.
pub fn send_to(r: u32, f: impl FnOnce() + Send + 'static) {
    if reactor::current() == Some(r) {
        reactor::defer(f);
    } else {
        reactor::send(r, f);
    }
}
