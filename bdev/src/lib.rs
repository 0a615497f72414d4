//! The block-device layer, after SPDK's `lib/bdev`.
//!
//! * A module implements [`BdevOps`] (per bdev) and [`ChannelOps`] (per bdev
//!   per reactor) and registers the bdev with [`register`].
//! * Users [`open`] a [`Desc`] (optionally writable, with a hot-remove
//!   callback), take a per-reactor [`IoChannel`] from it and submit
//!   [`BdevIo`]s; completions come back on the same reactor.
//! * Claims, iostat, QoS and reset live in the generic layer.
//!
//! Thread rules: registration, unregistration, open, claims and RPCs run on
//! reactor 0 (the app thread); channels and I/O belong to the reactor that
//! made them.

mod channel;
mod io;
pub mod modules;
mod qos;
pub mod rpc;
pub mod stacked;
mod stat;
pub mod util;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

pub use channel::{for_each_channel, IoChannel};
pub use io::{BdevIo, IoCallback, IoDoneFn, IoStatus, IoType};
pub use qos::QosLimits;
pub use stat::IoStatSnapshot;
use uuid::Uuid;

/// Errors of the bdev layer, each with the errno SPDK returns for it.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum BdevError {
    #[error("bdev '{0}' does not exist")]
    NotFound(String),
    #[error("bdev name '{0}' already exists")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("bdev '{bdev}' is already claimed ({claim}) by module {module}")]
    Claimed {
        bdev: String,
        claim: &'static str,
        module: String,
    },
    #[error("bdev '{0}' is claimed and refuses new writers")]
    WriteRefused(String),
    #[error("{0}")]
    Io(String),
    #[error("out of memory: {0}")]
    NoMem(String),
}

impl BdevError {
    /// Positive errno for the JSON-RPC `-errno` reply.
    pub fn errno(&self) -> i32 {
        match self {
            BdevError::NotFound(_) => libc::ENODEV,
            BdevError::Exists(_) => libc::EEXIST,
            BdevError::Invalid(_) => libc::EINVAL,
            BdevError::Claimed { .. } => libc::EBUSY,
            BdevError::WriteRefused(_) => libc::EPERM,
            BdevError::Io(_) => libc::EIO,
            BdevError::NoMem(_) => libc::ENOMEM,
        }
    }
}

impl From<BdevError> for ::rpc::RpcError {
    fn from(e: BdevError) -> Self {
        tracing::debug!(error = %e, "bdev error");
        match &e {
            // SPDK sends strerror() alone; we keep its text first and say
            // what was wrong after it, so scripts and people both get theirs.
            BdevError::Invalid(msg) => {
                ::rpc::RpcError::errno_msg(libc::EINVAL, format!("Invalid argument: {msg}"))
            }
            BdevError::Io(msg) => ::rpc::RpcError::errno_msg(e.errno(), msg.clone()),
            BdevError::NoMem(msg) => {
                ::rpc::RpcError::errno_msg(libc::ENOMEM, format!("Cannot allocate memory: {msg}"))
            }
            _ => ::rpc::RpcError::errno(e.errno()),
        }
    }
}

pub type BoxFuture = Pin<Box<dyn Future<Output = ()>>>;

/// What a module implements for each of its bdevs. Shared by every reactor.
pub trait BdevOps: AsAny + Send + Sync + 'static {
    /// Module name, e.g. "malloc".
    fn module_name(&self) -> &'static str;
    fn io_type_supported(&self, io_type: IoType) -> bool;
    /// Build this bdev's channel for the calling reactor.
    fn create_channel(&self, bdev: &Arc<Bdev>) -> Box<dyn ChannelOps>;
    /// `driver_specific` of `bdev_get_bdevs` (an object, `{}` when none).
    fn dump_info_json(&self, _bdev: &Bdev) -> serde_json::Value {
        serde_json::json!({})
    }
    /// The `{"method":..,"params":..}` that re-creates this bdev, for
    /// `save_config`; `None` for bdevs created by something else.
    fn write_config_json(&self, _bdev: &Bdev) -> Option<serde_json::Value> {
        None
    }
    /// Whether data written can be read back (false for `null`, which
    /// discards writes).
    fn stores_data(&self) -> bool {
        true
    }
    /// Whether [`ChannelOps::block_status`] says more than "all data"
    /// (callers skip the query otherwise).
    fn has_block_status(&self) -> bool {
        false
    }
    /// Release what the bdev holds (base descriptors, memory). Runs on
    /// reactor 0 once every descriptor is closed.
    fn destruct(&self, _bdev: &Arc<Bdev>) -> BoxFuture {
        Box::pin(async {})
    }
}

/// Per-reactor half of a bdev. `submit` must complete each I/O exactly
/// once (inline or later, on this reactor). `AsAny` lets a module reach its
/// own channels through [`for_each_channel`].
pub trait ChannelOps: AsAny {
    fn submit(&self, io: Box<BdevIo>);

    /// A stacked module's hook for an I/O it handed to its base with
    /// [`IoChannel::forward_hooked`]: the base completed it (`io.status`),
    /// and this level must now complete it, at once or later, exactly once.
    fn forward_done(&self, io: Box<BdevIo>) {
        let status = io.status;
        io.complete(status)
    }

    /// Allocation status of `num_blocks` at `offset_blocks` (NBD's
    /// `base:allocation`): extents covering a non-empty prefix of the range,
    /// through `cb` on this reactor, never inline. Modules that cannot tell
    /// keep this default: everything is allocated data.
    fn block_status(&self, offset_blocks: u64, num_blocks: u64, cb: BlockStatusCb) {
        let _ = offset_blocks;
        reactor::defer(move || cb(Ok(vec![BlockExtent::data(num_blocks)])));
    }
}

/// One run of blocks with the same allocation status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockExtent {
    pub num_blocks: u64,
    /// Not allocated (reads return zeroes unless `zero` is false, in which
    /// case the content is unspecified, as NBD's `NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads return zeroes.
    pub zero: bool,
}

impl BlockExtent {
    pub fn data(num_blocks: u64) -> Self {
        BlockExtent {
            num_blocks,
            hole: false,
            zero: false,
        }
    }
    /// Unallocated and reading as zeroes.
    pub fn hole(num_blocks: u64) -> Self {
        BlockExtent {
            num_blocks,
            hole: true,
            zero: true,
        }
    }
}

/// Completion of [`IoChannel::block_status`].
pub type BlockStatusCb = Box<dyn FnOnce(Result<Vec<BlockExtent>, IoStatus>)>;

/// Events delivered to open descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BdevEvent {
    /// The bdev is going away: close the descriptor.
    Remove,
    /// The block count changed (`Bdev::num_blocks` has the new value).
    Resize,
}

/// Claim types as SPDK names them in `bdev_get_bdevs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimType {
    ExclusiveWrite,
    ReadManyWriteOne,
    ReadManyWriteNone,
    ReadManyWriteShared,
}

impl ClaimType {
    pub fn name(self) -> &'static str {
        match self {
            ClaimType::ExclusiveWrite => "exclusive_write",
            ClaimType::ReadManyWriteOne => "read_many_write_one",
            ClaimType::ReadManyWriteNone => "read_many_write_none",
            ClaimType::ReadManyWriteShared => "read_many_write_shared",
        }
    }
}

struct Claim {
    ty: ClaimType,
    module: String,
    /// Descriptors holding the claim (several only for shared claims).
    holders: Vec<u64>,
    shared_key: u64,
}

struct DescEntry {
    id: u64,
    write: bool,
    event_cb: Arc<dyn Fn(BdevEvent) + Send + Sync>,
}

/// A registered block device.
pub struct Bdev {
    id: u64,
    name: String,
    aliases: Vec<String>,
    product_name: String,
    block_size: u32,
    num_blocks: AtomicU64,
    uuid: Uuid,
    write_cache: bool,
    required_alignment: u32,
    optimal_io_boundary: u32,
    physical_block_size: u32,
    hints: IoHints,
    ops: Box<dyn BdevOps>,
    claim: Mutex<Option<Claim>>,
    descs: Mutex<Vec<DescEntry>>,
    removing: AtomicBool,
    removed: AtomicBool,
    pub(crate) qos: qos::Qos,
    pub(crate) stats: stat::StatRegistry,
    pub(crate) reset_in_progress: AtomicBool,
}

impl std::fmt::Debug for Bdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bdev")
            .field("name", &self.name)
            .field("module", &self.module_name())
            .field("block_size", &self.block_size)
            .field("num_blocks", &self.num_blocks())
            .finish()
    }
}

impl Bdev {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn aliases(&self) -> &[String] {
        &self.aliases
    }
    pub fn product_name(&self) -> &str {
        &self.product_name
    }
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks() * self.block_size as u64
    }
    /// Send `ev` to every open descriptor's event callback (outside the
    /// lock: a callback may close its descriptor).
    fn notify(&self, ev: BdevEvent) {
        let cbs: Vec<_> = lock(&self.descs)
            .iter()
            .map(|d| d.event_cb.clone())
            .collect();
        for cb in cbs {
            cb(ev);
        }
    }

    /// The module's device changed size (SPDK
    /// `spdk_bdev_notify_blockcnt_change`): shrinking is refused with
    /// -EBUSY while descriptors are open; otherwise the new count takes
    /// effect and every open descriptor gets [`BdevEvent::Resize`].
    pub fn notify_blockcnt_change(&self, new_blocks: u64) -> Result<(), BdevError> {
        if new_blocks == 0 {
            return Err(BdevError::Invalid(
                "a bdev cannot shrink to zero blocks".into(),
            ));
        }
        let old = self.num_blocks();
        if new_blocks < old && self.open_desc_count() > 0 {
            return Err(BdevError::Claimed {
                bdev: self.name.clone(),
                claim: "open",
                module: "its users (cannot shrink while open)".into(),
            });
        }
        self.num_blocks.store(new_blocks, Ordering::Release);
        tracing::info!(bdev = %self.name, old, new = new_blocks, "bdev resized");
        self.notify(BdevEvent::Resize);
        Ok(())
    }
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }
    pub fn write_cache(&self) -> bool {
        self.write_cache
    }
    pub fn required_alignment(&self) -> u32 {
        self.required_alignment
    }
    pub fn optimal_io_boundary(&self) -> u32 {
        self.optimal_io_boundary
    }
    pub fn physical_block_size(&self) -> u32 {
        self.physical_block_size
    }
    pub fn io_hints(&self) -> IoHints {
        self.hints
    }
    pub fn module_name(&self) -> &'static str {
        self.ops.module_name()
    }
    pub fn ops(&self) -> &dyn BdevOps {
        self.ops.as_ref()
    }
    /// Downcast helper for modules: `bdev.ops_as::<MyBdev>()`.
    pub fn ops_as<T: 'static>(&self) -> Option<&T> {
        self.ops.as_ref().as_any_ref().downcast_ref::<T>()
    }
    pub fn io_type_supported(&self, t: IoType) -> bool {
        self.ops.io_type_supported(t)
    }
    pub fn stores_data(&self) -> bool {
        self.ops.stores_data()
    }
    pub fn has_block_status(&self) -> bool {
        self.ops.has_block_status()
    }
    pub fn is_removing(&self) -> bool {
        self.removing.load(Ordering::Acquire)
    }
    pub fn claim_type(&self) -> Option<ClaimType> {
        lock(&self.claim).as_ref().map(|c| c.ty)
    }
    pub fn claim_module(&self) -> Option<String> {
        lock(&self.claim).as_ref().map(|c| c.module.clone())
    }
    pub fn qos_limits(&self) -> QosLimits {
        self.qos.limits()
    }
    pub fn set_qos_limits(&self, l: QosLimits) {
        self.qos.set_limits(l)
    }
    /// Aggregate I/O statistics over every channel, since the last reset.
    pub fn iostat(&self) -> IoStatSnapshot {
        self.stats.snapshot()
    }
    pub fn reset_iostat(&self) {
        self.stats.reset()
    }
    fn open_desc_count(&self) -> usize {
        lock(&self.descs).len()
    }
}

/// Lets [`Bdev::ops_as`] downcast without every module writing it.
pub trait AsAny {
    fn as_any_ref(&self) -> &dyn std::any::Any;
}
impl<T: std::any::Any> AsAny for T {
    fn as_any_ref(&self) -> &dyn std::any::Any {
        self
    }
}

use reactor::sync::lock;

/// Write/unmap hints reported in `bdev_get_bdevs` (in blocks; 0 = none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoHints {
    pub preferred_write_alignment: u32,
    pub preferred_write_granularity: u32,
    pub optimal_write_size: u32,
    pub preferred_unmap_alignment: u32,
    pub preferred_unmap_granularity: u32,
}

/// Declares [`BdevBuilder`] from one list of its plain properties, each
/// with its default and a setter `field(v)` that stores `v`.
macro_rules! bdev_builder {
    ($($field:ident: $ty:ty = $default:expr),* $(,)?) => {
        /// Everything a module states about a new bdev.
        pub struct BdevBuilder {
            name: String,
            aliases: Vec<String>,
            product_name: String,
            hints: IoHints,
            $($field: $ty,)*
        }

        impl BdevBuilder {
            pub fn new(name: impl Into<String>, product_name: impl Into<String>) -> Self {
                BdevBuilder {
                    name: name.into(),
                    aliases: Vec::new(),
                    product_name: product_name.into(),
                    hints: IoHints::default(),
                    $($field: $default,)*
                }
            }

            $(
                pub fn $field(mut self, v: $ty) -> Self {
                    self.$field = v;
                    self
                }
            )*
        }
    };
}

bdev_builder! {
    block_size: u32 = 512,
    num_blocks: u64 = 0,
    uuid: Option<Uuid> = None,
    write_cache: bool = false,
    required_alignment: u32 = 0,
    optimal_io_boundary: u32 = 0,
    physical_block_size: u32 = 0,
}

impl BdevBuilder {
    pub fn io_hints(mut self, h: IoHints) -> Self {
        self.hints = h;
        self
    }
    pub fn alias(mut self, a: impl Into<String>) -> Self {
        self.aliases.push(a.into());
        self
    }
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Register the bdev; fails with -EEXIST on a taken name or alias.
    pub fn register(self, ops: impl BdevOps) -> Result<Arc<Bdev>, BdevError> {
        if self.name.is_empty() {
            return Err(BdevError::Invalid("bdev name must not be empty".into()));
        }
        if self.block_size == 0 || !self.block_size.is_multiple_of(512) {
            return Err(BdevError::Invalid(format!(
                "block size {} is not a multiple of 512",
                self.block_size
            )));
        }
        if self.num_blocks == 0 {
            return Err(BdevError::Invalid(
                "bdev must have at least one block".into(),
            ));
        }
        let mut reg = lock(&REGISTRY);
        for n in std::iter::once(&self.name).chain(self.aliases.iter()) {
            if reg.find(n).is_some() {
                return Err(BdevError::Exists(n.clone()));
            }
        }
        reg.next_id += 1;
        let bdev = Arc::new(Bdev {
            id: reg.next_id,
            name: self.name,
            aliases: self.aliases,
            product_name: self.product_name,
            block_size: self.block_size,
            num_blocks: AtomicU64::new(self.num_blocks),
            uuid: self.uuid.unwrap_or_else(Uuid::new_v4),
            write_cache: self.write_cache,
            required_alignment: self.required_alignment,
            optimal_io_boundary: self.optimal_io_boundary,
            physical_block_size: self.physical_block_size,
            hints: self.hints,
            ops: Box::new(ops),
            claim: Mutex::new(None),
            descs: Mutex::new(Vec::new()),
            removing: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            qos: qos::Qos::default(),
            stats: stat::StatRegistry::default(),
            reset_in_progress: AtomicBool::new(false),
        });
        reg.bdevs.push(bdev.clone());
        drop(reg);
        tracing::info!(bdev = %bdev.name, module = bdev.module_name(), blocks = bdev.num_blocks(), block_size = bdev.block_size, "bdev registered");
        if rpc::examine_allowed(&bdev.name) {
            run_examine(&bdev);
        }
        Ok(bdev)
    }
}

#[derive(Default)]
struct Registry {
    bdevs: Vec<Arc<Bdev>>,
    next_id: u64,
    next_desc: u64,
}

impl Registry {
    fn find(&self, name: &str) -> Option<&Arc<Bdev>> {
        self.bdevs
            .iter()
            .find(|b| b.name == name || b.aliases.iter().any(|a| a == name))
    }
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    bdevs: Vec::new(),
    next_id: 0,
    next_desc: 0,
});

/// Look a bdev up by name or alias (removing ones included).
pub fn get(name: &str) -> Option<Arc<Bdev>> {
    lock(&REGISTRY).find(name).cloned()
}

/// Every registered bdev, in registration order.
pub fn list() -> Vec<Arc<Bdev>> {
    lock(&REGISTRY).bdevs.clone()
}

type ExamineFn = Arc<dyn Fn(&Arc<Bdev>) + Send + Sync>;
static EXAMINERS: Mutex<Vec<ExamineFn>> = Mutex::new(Vec::new());
static EXAMINES_IN_PROGRESS: AtomicU64 = AtomicU64::new(0);

/// Let a module look at every bdev registered from now on (SPDK's
/// `examine_config`). The callback must not block; a module that needs
/// I/O calls [`examine_begin`] / [`examine_end`] around it.
pub fn register_examine(f: impl Fn(&Arc<Bdev>) + Send + Sync + 'static) {
    lock(&EXAMINERS).push(Arc::new(f));
}

pub fn examine_begin() {
    EXAMINES_IN_PROGRESS.fetch_add(1, Ordering::SeqCst);
}

pub fn examine_end() {
    EXAMINES_IN_PROGRESS.fetch_sub(1, Ordering::SeqCst);
}

pub(crate) fn run_examine(bdev: &Arc<Bdev>) {
    let ex: Vec<ExamineFn> = lock(&EXAMINERS).clone();
    for f in ex {
        f(bdev);
    }
}

/// Resolves once no examine is in progress (`bdev_wait_for_examine`).
pub async fn wait_for_examine() {
    while EXAMINES_IN_PROGRESS.load(Ordering::SeqCst) > 0 {
        reactor::sleep(Duration::from_millis(1)).await;
    }
}

/// An open handle on a bdev. Dropping it closes it and releases its claim.
pub struct Desc {
    id: u64,
    bdev: Arc<Bdev>,
    write: bool,
}

/// Open `name`. A writable open of a bdev whose claim refuses writers
/// fails with -EPERM, as in SPDK.
pub fn open(
    name: &str,
    write: bool,
    event_cb: impl Fn(BdevEvent) + Send + Sync + 'static,
) -> Result<Desc, BdevError> {
    let mut reg = lock(&REGISTRY);
    let bdev = match reg.find(name) {
        Some(b) if !b.is_removing() => b.clone(),
        _ => return Err(BdevError::NotFound(name.to_string())),
    };
    if write {
        // Only claimants write to a claimed bdev; they get write access
        // through Desc::claim.
        if lock(&bdev.claim).is_some() {
            return Err(BdevError::WriteRefused(bdev.name.clone()));
        }
    }
    reg.next_desc += 1;
    let id = reg.next_desc;
    drop(reg);
    lock(&bdev.descs).push(DescEntry {
        id,
        write,
        event_cb: Arc::new(event_cb),
    });
    Ok(Desc { id, bdev, write })
}

impl Desc {
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    pub fn is_writable(&self) -> bool {
        self.write
    }

    /// The calling reactor's channel for this bdev (created on first use,
    /// shared by every descriptor on this reactor).
    pub fn channel(&self) -> IoChannel {
        channel::get_channel(&self.bdev, self.write)
    }

    /// Claim the bdev for `module` (SPDK `spdk_bdev_module_claim_bdev_desc`).
    /// -EBUSY on conflict. WRITE_ONE and WRITE_SHARED promote this
    /// descriptor to writable; WRITE_NONE needs no other writer open.
    pub fn claim(&mut self, ty: ClaimType, module: &str) -> Result<(), BdevError> {
        self.claim_shared(ty, module, 0)
    }

    pub fn claim_shared(
        &mut self,
        ty: ClaimType,
        module: &str,
        shared_key: u64,
    ) -> Result<(), BdevError> {
        let mut claim = lock(&self.bdev.claim);
        if let Some(c) = claim.as_mut() {
            let joinable = c.ty == ClaimType::ReadManyWriteShared
                && ty == ClaimType::ReadManyWriteShared
                && c.shared_key == shared_key
                && shared_key != 0;
            if joinable || (c.ty == ty && ty == ClaimType::ReadManyWriteNone) {
                c.holders.push(self.id);
                if ty != ClaimType::ReadManyWriteNone {
                    self.write = true;
                }
                return Ok(());
            }
            return Err(BdevError::Claimed {
                bdev: self.bdev.name.clone(),
                claim: c.ty.name(),
                module: c.module.clone(),
            });
        }
        let descs = lock(&self.bdev.descs);
        let other_writers = descs.iter().any(|d| d.write && d.id != self.id);
        drop(descs);
        match ty {
            ClaimType::ReadManyWriteNone if self.write || other_writers => {
                return Err(BdevError::Claimed {
                    bdev: self.bdev.name.clone(),
                    claim: "open for writing",
                    module: "another user".into(),
                });
            }
            ClaimType::ReadManyWriteOne | ClaimType::ExclusiveWrite if other_writers => {
                return Err(BdevError::Claimed {
                    bdev: self.bdev.name.clone(),
                    claim: "open for writing",
                    module: "another user".into(),
                });
            }
            _ => {}
        }
        *claim = Some(Claim {
            ty,
            module: module.to_string(),
            holders: vec![self.id],
            shared_key,
        });
        if ty != ClaimType::ReadManyWriteNone {
            self.write = true;
            if let Some(d) = lock(&self.bdev.descs).iter_mut().find(|d| d.id == self.id) {
                d.write = true;
            }
        }
        Ok(())
    }

    /// Release this descriptor's claim, if it holds one.
    pub fn release_claim(&self) {
        let mut claim = lock(&self.bdev.claim);
        if let Some(c) = claim.as_mut() {
            c.holders.retain(|&h| h != self.id);
            if c.holders.is_empty() {
                *claim = None;
            }
        }
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        self.release_claim();
        lock(&self.bdev.descs).retain(|d| d.id != self.id);
    }
}

impl std::fmt::Debug for Desc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Desc")
            .field("bdev", &self.bdev.name)
            .field("write", &self.write)
            .finish()
    }
}

/// Unregister a bdev, as `spdk_bdev_unregister`: tell every open
/// descriptor to go away (hot-remove), wait for them to close, destruct,
/// then drop it from the registry. Runs on reactor 0. A second call for a
/// bdev already going away waits for the first.
pub async fn unregister(name: &str) -> Result<(), BdevError> {
    let bdev = get(name).ok_or_else(|| BdevError::NotFound(name.to_string()))?;
    unregister_bdev(&bdev).await;
    Ok(())
}

/// Unregister `name` only if it belongs to `module` (-ENODEV otherwise, as
/// `spdk_bdev_unregister_by_name`). Of concurrent calls for one bdev (the
/// delete RPCs), exactly one succeeds; the others wait until it is gone
/// and get -ENODEV, so every reply leaves the name free.
pub async fn unregister_by_name(name: &str, module: &str) -> Result<(), BdevError> {
    match get(name) {
        Some(b) if b.module_name() == module && b.name == name => {
            if unregister_bdev_first(&b).await {
                Ok(())
            } else {
                Err(BdevError::NotFound(name.to_string()))
            }
        }
        _ => Err(BdevError::NotFound(name.to_string())),
    }
}

pub async fn unregister_bdev(bdev: &Arc<Bdev>) {
    unregister_bdev_first(bdev).await;
}

/// [`unregister_bdev`]; true for the call that did it, false for one that
/// found it already going away (and waited for that).
async fn unregister_bdev_first(bdev: &Arc<Bdev>) -> bool {
    if bdev.removing.swap(true, Ordering::AcqRel) {
        while !bdev.removed.load(Ordering::Acquire) {
            reactor::sleep(Duration::from_millis(1)).await;
        }
        return false;
    }
    tracing::info!(bdev = %bdev.name, "unregistering bdev");
    bdev.notify(BdevEvent::Remove);
    let mut waited = 0u32;
    while bdev.open_desc_count() > 0 {
        reactor::sleep(Duration::from_millis(1)).await;
        waited += 1;
        if waited.is_multiple_of(5000) {
            tracing::warn!(bdev = %bdev.name, open = bdev.open_desc_count(), "still waiting for descriptors to close");
        }
    }
    bdev.ops.destruct(bdev).await;
    lock(&REGISTRY).bdevs.retain(|b| !Arc::ptr_eq(b, bdev));
    bdev.removed.store(true, Ordering::Release);
    tracing::info!(bdev = %bdev.name, "bdev unregistered");
    true
}

/// Unregister every bdev, newest first (clean shutdown).
pub async fn unregister_all() {
    loop {
        let last = lock(&REGISTRY).bdevs.last().cloned();
        match last {
            Some(b) => unregister_bdev(&b).await,
            None => break,
        }
    }
}

/// A `Weak` handle that does not keep a bdev alive.
pub fn downgrade(b: &Arc<Bdev>) -> Weak<Bdev> {
    Arc::downgrade(b)
}

#[cfg(test)]
mod test_util;
#[cfg(test)]
mod tests;

/// A base event callback that unregisters the stacked bdev `me` (once set)
/// when the base goes away, so hot-remove propagates up the stack. `what`
/// names the stacked module (or the base's role) in the log.
pub fn remove_propagator(
    what: &'static str,
) -> (
    Arc<OnceLock<Weak<Bdev>>>,
    impl Fn(BdevEvent) + Send + Sync + 'static,
) {
    let me: Arc<OnceLock<Weak<Bdev>>> = Arc::default();
    let me2 = me.clone();
    let cb = move |ev: BdevEvent| {
        if ev != BdevEvent::Remove {
            return;
        }
        let Some(b) = me2.get().and_then(Weak::upgrade) else {
            return;
        };
        tracing::warn!(bdev = %b.name(), what, "base bdev removed; unregistering");
        // Events arrive while the base's unregister runs; ours must not
        // run inside it (it waits for this descriptor to close).
        reactor::spawn_on(0, move || async move { unregister_bdev(&b).await });
    };
    (me, cb)
}
