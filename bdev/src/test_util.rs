//! Fixtures shared by the unit tests of the bdev layer and its modules:
//! base bdevs, data, descriptors with their channel, tables of RPC calls
//! and their replies, work on another reactor. Test builds only.

use std::sync::Arc;

use ::rpc::{RpcError, RUNTIME};
use reactor::DmaBuf;
use serde_json::Value;

use crate::modules::malloc;
use crate::{Bdev, Desc, IoChannel};

/// A malloc bdev of 512-byte blocks.
pub(crate) fn mk(name: &str, blocks: u64) -> Arc<Bdev> {
    malloc::create(malloc::CreateParams::new(name, 512, blocks)).unwrap()
}

/// `len` bytes of seeded data.
pub(crate) fn pattern(len: usize, seed: u8) -> DmaBuf {
    let mut b = DmaBuf::new(len);
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    b
}

/// Whether every byte of `b` is zero.
pub(crate) fn zeroed(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Cross-reactor tests need two cores; they pass trivially on one.
pub(crate) fn two_cores() -> bool {
    std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2
}

/// Open bdev `name` (writable if `write`) and the calling reactor's
/// channel to it. Bind as `let (desc, ch)`: the channel drops first.
pub(crate) fn open_ch(name: &str, write: bool) -> (Desc, IoChannel) {
    let desc = crate::open(name, write, |_| {}).unwrap();
    let ch = desc.channel();
    (desc, ch)
}

/// One RPC call of a [`rpc_steps`] table: method, params, expected reply.
pub(crate) type RpcStep = (&'static str, Value, Result<Value, RpcError>);

/// Call each method in turn (in RUNTIME state, as rpc.py after startup)
/// and check its reply; a mismatch names the step, method and params.
pub(crate) async fn rpc_steps(steps: Vec<RpcStep>) {
    ::rpc::set_state(RUNTIME);
    for (i, (method, params, want)) in steps.into_iter().enumerate() {
        let got = ::rpc::call(method, Some(params.clone())).await;
        assert_eq!(got, want, "step {i}: {method} {params}");
    }
}

/// The errno of deleting bdev `name` as a bdev of `module`.
pub(crate) async fn delete_errno(name: &str, module: &str) -> i32 {
    crate::unregister_by_name(name, module)
        .await
        .unwrap_err()
        .errno()
}

/// Start the future made by `f` on reactor `r` with that reactor's channel
/// of `desc`; its output arrives on the returned receiver (after the channel
/// and descriptor there are dropped). Unlike [`reactor::run_on`], the caller
/// may act before awaiting it, e.g. reset while it is held.
pub(crate) fn on_reactor<F, Fut, T>(r: u32, desc: &Arc<Desc>, f: F) -> reactor::sync::Receiver<T>
where
    F: FnOnce(IoChannel) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    let (tx, rx) = reactor::sync::oneshot();
    let d = desc.clone();
    reactor::spawn_on(r, move || async move {
        let v = f(d.channel()).await;
        drop(d);
        tx.send(v);
    });
    rx
}

/// Write `len` bytes of pattern at `offset` through reactor 1's channel of
/// `desc`, then check that they ran there and read back the same here.
pub(crate) async fn write_there_read_here(desc: &Arc<Desc>, offset: u64, len: usize, fua: bool) {
    let wrote = on_reactor(1, desc, move |ch| async move {
        crate::util::write(&ch, offset, pattern(len, 9), fua)
            .await
            .unwrap();
        reactor::current()
    });
    assert_eq!(wrote.recv().await, Some(1), "the write ran on reactor 1");
    let ch = desc.channel();
    let blocks = len as u64 / desc.bdev().block_size() as u64;
    let r = crate::util::read(&ch, offset, blocks).await.unwrap();
    assert_eq!(r.as_slice(), pattern(len, 9).as_slice());
}
