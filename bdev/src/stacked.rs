//! The shape every stacked bdev shares (delay, error, the clone; SPDK's
//! passthru): open and claim a base, register a bdev that inherits the
//! base's properties, unregister it when the base goes away, hand I/O down
//! to the base in place ([`crate::IoChannel::forward`]) and reset the base
//! under the stacked bdev's own reset.
//!
//! ```ignore
//! let (base, link) = stacked::open_base(&p.base_bdev_name, ClaimType::ExclusiveWrite, "delay")?;
//! let builder = base.builder(p.name, "delay");
//! let bdev = link.register(builder, DelayBdev { base, .. })?;
//! // per I/O, in ChannelOps::submit:  base_channel.forward(io)
//! // in BdevOps::destruct:            let desc = self.base.close();
//! ```

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use reactor::sync::lock;

use crate::{
    util, Bdev, BdevBuilder, BdevError, BdevIo, BdevOps, ClaimType, Desc, IoChannel, IoStatus,
    IoType,
};

/// A stacked bdev's base: its claimed descriptor (until [`Base::close`])
/// and the bdev itself (kept apart: `io_type_supported` runs per I/O).
pub struct Base {
    name: String,
    bdev: Arc<Bdev>,
    desc: Mutex<Option<Desc>>,
}

/// Registers the stacked bdev so that removing the base unregisters it.
#[must_use = "register the stacked bdev through it"]
pub struct RemoveLink(Arc<OnceLock<Weak<Bdev>>>);

/// Open `base_name` and claim it for `module` with `claim` (opened
/// writable unless the claim is `ReadManyWriteNone`). On failure nothing is
/// left open or claimed.
pub fn open_base(
    base_name: &str,
    claim: ClaimType,
    module: &'static str,
) -> Result<(Base, RemoveLink), BdevError> {
    let (me, event_cb) = crate::remove_propagator(module);
    let write = claim != ClaimType::ReadManyWriteNone;
    let mut desc = crate::open(base_name, write, event_cb)?;
    desc.claim(claim, module)?;
    let bdev = desc.bdev().clone();
    let base = Base {
        name: bdev.name().to_string(),
        bdev,
        desc: Mutex::new(Some(desc)),
    };
    Ok((base, RemoveLink(me)))
}

impl Base {
    /// The base's name (its primary name, also when opened by an alias).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    #[inline]
    pub fn io_type_supported(&self, t: IoType) -> bool {
        self.bdev.io_type_supported(t)
    }

    /// The calling reactor's channel to the base; `None` once closed (a
    /// channel made after destruct has no base left).
    pub fn channel(&self) -> Option<IoChannel> {
        lock(&self.desc).as_ref().map(|d| d.channel())
    }

    /// A builder for the stacked bdev with the base's geometry and
    /// properties (block size and count, write cache, alignment, I/O
    /// boundary, physical block size).
    pub fn builder(&self, name: impl Into<String>, product_name: &str) -> BdevBuilder {
        let b = &self.bdev;
        BdevBuilder::new(name, product_name)
            .block_size(b.block_size())
            .num_blocks(b.num_blocks())
            .write_cache(b.write_cache())
            .required_alignment(b.required_alignment())
            .optimal_io_boundary(b.optimal_io_boundary())
            .physical_block_size(b.physical_block_size())
    }

    /// Take the descriptor out (for `destruct`): dropping it closes the
    /// base and releases the claim.
    pub fn close(&self) -> Option<Desc> {
        lock(&self.desc).take()
    }
}

impl RemoveLink {
    /// Register the stacked bdev (a failed register drops `ops`, and with
    /// it the base's descriptor and claim).
    pub fn register(self, builder: BdevBuilder, ops: impl BdevOps) -> Result<Arc<Bdev>, BdevError> {
        let bdev = builder.register(ops)?;
        let _ = self.0.set(Arc::downgrade(&bdev));
        Ok(bdev)
    }
}

/// The stacked reset, in SPDK's order: `drain` what the module holds (on
/// every reactor), reset the base, `drain` again (I/O that was at the base
/// when the reset began and came back since: a reset does not finish
/// before every earlier I/O has), then complete `io` with the base's reset
/// status.
pub fn reset<F, Fut>(io: Box<BdevIo>, base: Option<IoChannel>, drain: F)
where
    F: Fn(Arc<Bdev>) -> Fut + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let Some(bdev) = io.bdev().cloned() else {
        return io.complete(IoStatus::Failed);
    };
    reactor::spawn_local(async move {
        drain(bdev.clone()).await;
        let status = match &base {
            Some(base) => {
                let r = util::submit(base, IoType::Reset, 0, 0, None, false).await;
                let s = r.status;
                r.free();
                s
            }
            None => IoStatus::Failed,
        };
        drain(bdev).await;
        io.complete(status);
    });
}
