//! Awaitable I/O for management code (metadata, tests, tools). The data
//! path uses callbacks; this wraps one submission in a future.

use std::future::Future;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use reactor::sync::{local_oneshot, LocalReceiver};
use reactor::DmaBuf;

use crate::{BdevIo, IoChannel, IoStatus, IoType};

/// Resolves with the completed I/O.
pub type IoFuture = LocalReceiver<Box<BdevIo>>;

/// Submit one I/O on `ch` and await its completion.
pub fn submit(
    ch: &IoChannel,
    io_type: IoType,
    offset_blocks: u64,
    num_blocks: u64,
    buf: Option<DmaBuf>,
    fua: bool,
) -> IoFuture {
    let (tx, rx) = local_oneshot();
    let mut io = BdevIo::new(io_type, offset_blocks, num_blocks, buf, move |io| {
        tx.send(io)
    });
    io.fua = fua;
    ch.submit(io);
    rx
}

/// Read `num_blocks` at `offset_blocks`; the data or the failing status.
pub async fn read(ch: &IoChannel, offset_blocks: u64, num_blocks: u64) -> Result<DmaBuf, IoStatus> {
    let len = (num_blocks * ch.bdev().block_size() as u64) as usize;
    let mut io = submit(
        ch,
        IoType::Read,
        offset_blocks,
        num_blocks,
        Some(DmaBuf::new(len)),
        false,
    )
    .await;
    match io.status {
        IoStatus::Success => Ok(io.buf.take().expect("read returns its buffer")),
        s => Err(s),
    }
}

/// Write `buf` at `offset_blocks`.
pub async fn write(
    ch: &IoChannel,
    offset_blocks: u64,
    buf: DmaBuf,
    fua: bool,
) -> Result<(), IoStatus> {
    let num = buf.len() as u64 / ch.bdev().block_size() as u64;
    let io = submit(ch, IoType::Write, offset_blocks, num, Some(buf), fua).await;
    match io.status {
        IoStatus::Success => Ok(()),
        s => Err(s),
    }
}

/// Any non-data I/O (flush, unmap, write_zeroes, reset).
pub async fn simple(
    ch: &IoChannel,
    io_type: IoType,
    offset_blocks: u64,
    num_blocks: u64,
) -> Result<(), IoStatus> {
    let io = submit(ch, io_type, offset_blocks, num_blocks, None, false).await;
    match io.status {
        IoStatus::Success => Ok(()),
        s => Err(s),
    }
}

/// The allocation status of a range ([`IoChannel::block_status`]), awaited.
pub async fn block_status(
    ch: &IoChannel,
    offset_blocks: u64,
    num_blocks: u64,
) -> Result<Vec<crate::BlockExtent>, IoStatus> {
    let (tx, rx) = local_oneshot();
    ch.block_status(offset_blocks, num_blocks, move |r| tx.send(r));
    rx.await
}

/// Run `f` on every reactor, one after the other, and resolve once all
/// have (SPDK's `spdk_for_each_channel`; each `f` finds its own channel).
/// For resets and teardown, not for the per-I/O path.
pub async fn on_each_reactor(f: impl Fn() + Send + Sync + 'static) {
    let f = Arc::new(f);
    let here = reactor::current();
    for r in 0..reactor::num_reactors() {
        if Some(r) == here {
            f();
            continue;
        }
        let f2 = f.clone();
        reactor::call_on(r, move || f2()).await;
    }
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Test harness: start a runtime on `core_mask` in interrupt mode, run
/// `f` as a task on reactor 0, unregister every bdev, stop, and return
/// `f`'s output. Runtimes are serialised within a process.
pub fn run_on_reactor<F, Fut, T>(core_mask: u64, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let _g = reactor::sync::lock(&SERIAL);
    let (tx, rx) = mpsc::channel();
    let cfg = reactor::Config {
        core_mask,
        interrupt_mode: true,
        mem_size_mb: 64,
        no_huge: true,
        uring_entries: 256,
    };
    let rt = reactor::start(cfg, move || {
        reactor::spawn_local(async move {
            let v = f().await;
            crate::unregister_all().await;
            let _ = tx.send(v);
        });
    })
    .expect("start reactor runtime");
    let v = rx.recv_timeout(Duration::from_secs(120));
    reactor::stop();
    rt.join();
    v.expect("test body finished on the reactor")
}
