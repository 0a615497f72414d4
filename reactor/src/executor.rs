//! A small single-threaded executor per reactor, for management work
//! (RPC handlers, create/delete, examine). The data path does not use it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use crate::runtime::{self, try_local, with_local};
use crate::sync::{local_oneshot, LocalReceiver};

type Task = Pin<Box<dyn Future<Output = ()>>>;

#[derive(Default)]
pub(crate) struct Executor {
    tasks: RefCell<Vec<Option<(Task, u64)>>>,
    free: RefCell<Vec<usize>>,
    ready: RefCell<VecDeque<(usize, u64)>>,
    gen: Cell<u64>,
}

struct TaskWaker {
    reactor: u32,
    slot: usize,
    gen: u64,
    queued: AtomicBool,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        if runtime::current() == Some(self.reactor) {
            with_local(|l| l.executor.ready.borrow_mut().push_back((me.slot, me.gen)));
        } else {
            runtime::send(self.reactor, move || {
                with_local(|l| l.executor.ready.borrow_mut().push_back((me.slot, me.gen)));
            });
        }
    }
}

impl Executor {
    fn spawn(&self, fut: Task) -> (usize, u64) {
        let gen = self.gen.get() + 1;
        self.gen.set(gen);
        let mut tasks = self.tasks.borrow_mut();
        let slot = match self.free.borrow_mut().pop() {
            Some(s) => {
                tasks[s] = Some((fut, gen));
                s
            }
            None => {
                tasks.push(Some((fut, gen)));
                tasks.len() - 1
            }
        };
        self.ready.borrow_mut().push_back((slot, gen));
        (slot, gen)
    }

    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.borrow().is_empty()
    }

    /// Poll every task that was woken; true if any ran.
    pub(crate) fn run_ready(&self) -> bool {
        let n = self.ready.borrow().len();
        if n == 0 {
            return false;
        }
        let reactor = runtime::current().unwrap_or(0);
        for _ in 0..n {
            let Some((slot, gen)) = self.ready.borrow_mut().pop_front() else {
                break;
            };
            // Take the task out so it may spawn or wake others while polled.
            let task = {
                let mut tasks = self.tasks.borrow_mut();
                match tasks.get_mut(slot) {
                    Some(t @ Some(_)) if t.as_ref().map(|x| x.1) == Some(gen) => t.take(),
                    _ => None,
                }
            };
            let Some((mut fut, gen)) = task else { continue };
            let waker = Waker::from(Arc::new(TaskWaker {
                reactor,
                slot,
                gen,
                queued: AtomicBool::new(false),
            }));
            let mut cx = Context::from_waker(&waker);
            match fut.as_mut().poll(&mut cx) {
                Poll::Ready(()) => {
                    self.free.borrow_mut().push(slot);
                }
                Poll::Pending => {
                    self.tasks.borrow_mut()[slot] = Some((fut, gen));
                }
            }
        }
        true
    }

    pub(crate) fn clear(&self) {
        let tasks: Vec<_> = self.tasks.borrow_mut().drain(..).collect();
        drop(tasks);
        self.ready.borrow_mut().clear();
        self.free.borrow_mut().clear();
    }
}

/// Awaits the output of a task spawned with [`spawn_local`].
pub struct JoinHandle<T>(LocalReceiver<T>);

impl<T> Future for JoinHandle<T> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// Spawn a future on the calling reactor. The returned handle may be
/// dropped; the task still runs to completion.
pub fn spawn_local<T: 'static>(fut: impl Future<Output = T> + 'static) -> JoinHandle<T> {
    let (tx, rx) = local_oneshot();
    let task = async move { tx.send(fut.await) };
    with_local(|l| l.executor.spawn(Box::pin(task)));
    JoinHandle(rx)
}

/// Spawn a future, built by `f`, on reactor `reactor` (from any thread).
pub fn spawn_on<F, Fut>(reactor: u32, f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    runtime::send(reactor, move || {
        spawn_local(f());
    });
}

/// A future that completes after `d` (one-shot reactor timer, armed at
/// the first poll).
pub fn sleep(d: Duration) -> Sleep {
    Sleep {
        dur: d,
        fired: None,
        done: false,
    }
}

pub struct Sleep {
    dur: Duration,
    fired: Option<LocalReceiver<()>>,
    /// Fired and seen: stays ready if polled again.
    done: bool,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.done {
            return Poll::Ready(());
        }
        let dur = self.dur;
        let fired = self.fired.get_or_insert_with(|| {
            let (tx, rx) = local_oneshot();
            runtime::set_timer(dur, move || tx.send(()));
            rx
        });
        let r = Pin::new(fired).poll(cx);
        self.done = r.is_ready();
        r
    }
}

/// Run `fut` for at most `d`: `None` if the time ran out first (`fut` is
/// dropped then).
pub async fn with_timeout<T>(d: Duration, fut: impl Future<Output = T>) -> Option<T> {
    let mut fut = std::pin::pin!(fut);
    let mut sleep = std::pin::pin!(sleep(d));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Give other tasks and the data path one loop iteration.
pub fn yield_now() -> YieldNow {
    YieldNow(false)
}

pub struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        let w = cx.waker().clone();
        if try_local().is_some() {
            runtime::defer(move || w.wake());
        } else {
            w.wake();
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::tests::cfg_on;
    use crate::runtime::{start, stop};
    use std::sync::mpsc;

    #[test]
    fn tasks_sleep_and_join() {
        let _g = crate::sync::lock(&crate::runtime::tests::SERIAL);
        let (tx, rx) = mpsc::channel();
        let cfg = cfg_on(0x1);
        let rt = start(cfg, move || {
            spawn_local(async move {
                let h = spawn_local(async {
                    sleep(Duration::from_millis(10)).await;
                    yield_now().await;
                    42u32
                });
                let v = h.await;
                tx.send(v).unwrap();
            });
        })
        .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 42);
        stop();
        rt.join();
    }
}
