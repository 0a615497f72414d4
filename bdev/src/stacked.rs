//! The shape every stacked bdev shares (delay, error, the clone; SPDK's
//! passthru): open and claim a base ([`open_base`], or [`claim_base`] for
//! the clone's three), register a bdev that inherits the
//! base's properties, unregister it when the base goes away, hand I/O down
//! to the base in place ([`crate::IoChannel::forward`]) and reset the base
//! under the stacked bdev's own reset.
//!
//! ```ignore
//! let bdev = stacked::create(&p.name, &p.base_bdev_name, "delay", |base| {
//!     (base.builder(&p.name, "delay"), DelayBdev { base, .. })
//! })?;
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

/// Open `base_name` and claim it for `module` with `claim`, as SPDK's
/// passthru, delay and error do (`spdk_bdev_open_ext` writable unless the
/// claim is `ReadManyWriteNone`, then the claim): a base another module
/// claimed refuses the writable open, -EPERM. On failure nothing is left
/// open or claimed.
pub fn open_base(
    base_name: &str,
    claim: ClaimType,
    module: &'static str,
) -> Result<(Base, RemoveLink), BdevError> {
    let write = claim != ClaimType::ReadManyWriteNone;
    let (desc, link) = open_claimed(base_name, write, claim, module)?;
    let bdev = desc.bdev().clone();
    let base = Base {
        name: bdev.name().to_string(),
        bdev,
        desc: Mutex::new(Some(desc)),
    };
    Ok((base, link))
}

/// Open `base_name` read-only and claim it for `module`, as a module using
/// `spdk_bdev_module_claim_bdev_desc` (the write claims make the
/// descriptor writable): a base already claimed gives -EBUSY naming the
/// claim and its module. For a bdev over several bases (the clone), which
/// keeps the descriptors and links the bdev once registered
/// ([`RemoveLink::link`]). On failure nothing is left open or claimed.
pub fn claim_base(
    base_name: &str,
    claim: ClaimType,
    module: &'static str,
) -> Result<(Desc, RemoveLink), BdevError> {
    open_claimed(base_name, false, claim, module)
}

/// Create stacked bdev `name` of `module` on `base_name`, as SPDK's
/// passthru, delay and error: -EEXIST on a taken name, open and claim the
/// base (exclusive write), then register the bdev `make` builds (usually
/// from [`Base::builder`]) with the ops that own the base. On failure
/// nothing is left behind: no bdev, no descriptor, no claim.
pub fn create<O: BdevOps>(
    name: &str,
    base_name: &str,
    module: &'static str,
    make: impl FnOnce(Base) -> (BdevBuilder, O),
) -> Result<Arc<Bdev>, BdevError> {
    if crate::get(name).is_some() {
        return Err(BdevError::Exists(name.to_string()));
    }
    let (base, link) = open_base(base_name, ClaimType::ExclusiveWrite, module)?;
    let base_bdev = base.bdev().clone();
    let (builder, ops) = make(base);
    let bdev = link.register(builder, ops)?;
    tracing::info!(bdev = %bdev.name(), base = %base_bdev.name(), "{module} bdev created");
    Ok(bdev)
}

fn open_claimed(
    base_name: &str,
    write: bool,
    claim: ClaimType,
    module: &'static str,
) -> Result<(Desc, RemoveLink), BdevError> {
    let (me, event_cb) = crate::remove_propagator(module);
    let mut desc = crate::open(base_name, write, event_cb)?;
    desc.claim(claim, module)?;
    Ok((desc, RemoveLink(me)))
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
        self.link(&bdev);
        Ok(bdev)
    }

    /// Removing the base unregisters `bdev` from now on (registered by its
    /// module; the first link holds).
    pub fn link(self, bdev: &Arc<Bdev>) {
        let _ = self.0.set(Arc::downgrade(bdev));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::malloc;
    use crate::util::run_on_reactor;

    #[test]
    fn a_claimed_base_refuses_open_base_with_eperm_and_claim_base_with_ebusy_naming_it() {
        run_on_reactor(0x1, || async {
            let b = malloc::create(malloc::CreateParams::new("SB0", 512, 8)).unwrap();
            let (held, _link) = open_base("SB0", ClaimType::ExclusiveWrite, "delay").unwrap();
            let open = b.open_desc_count();

            // SPDK's stacked modules: the writable open is refused.
            let Err(e) = open_base("SB0", ClaimType::ExclusiveWrite, "error") else {
                panic!("a second writer stacked on a claimed base");
            };
            assert_eq!(e.errno(), libc::EPERM);
            // The clone: the claim is refused, naming it and its holder.
            for ty in [ClaimType::ExclusiveWrite, ClaimType::ReadManyWriteNone] {
                let Err(e) = claim_base("SB0", ty, "clone") else {
                    panic!("claimed twice");
                };
                assert_eq!(e.errno(), libc::EBUSY, "{e}");
                let msg = e.to_string();
                assert!(msg.contains("SB0") && msg.contains("delay"), "{msg}");
            }
            assert_eq!(b.open_desc_count(), open, "nothing left open");
            assert_eq!(b.claim_module().as_deref(), Some("delay"));

            drop(held.close());
            let (desc, _link) = claim_base("SB0", ClaimType::ExclusiveWrite, "clone").unwrap();
            assert!(
                desc.is_writable(),
                "the write claim promotes the descriptor"
            );
            assert_eq!(b.claim_module().as_deref(), Some("clone"));
        });
    }
}
