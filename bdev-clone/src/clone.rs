//! The clone's shared state and its bdev: [`Shared`] (the bases and
//! their properties, the tunables, the counters, the lifecycle flags, the
//! metadata mode as a [`MetadataMode`] code that only ever gets worse),
//! seen by the bdev, its channels on every reactor and every owner;
//! [`CloneBdev`] (the `BdevOps`); finding a clone by name.
//!
//! Where the rest lives: `channel.rs` (submit on any reactor), `owner.rs`
//! (the per-reactor owners executing the [`crate::router::Router`]),
//! `hydration.rs`, `committer.rs`, `metadata_io.rs`, `lifecycle.rs`
//! (create, delete, quiesce, completion), `status.rs`, `rpc.rs`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use bdev::{Bdev, BdevOps, BoxFuture, ChannelOps, Desc, IoType};
use reactor::sync::lock;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::channel::CloneChannel;
use crate::commit::CommitRounds;
use crate::geometry::Geometry;
use crate::lifecycle::stop_all;
use crate::region_map::RegionMap;
use crate::router::{MetadataMode, Stripes};

pub const MODULE_NAME: &str = "clone";
pub const PRODUCT_NAME: &str = "clone";

#[derive(Default)]
pub(crate) struct Descs {
    pub(crate) source: Option<Desc>,
    pub(crate) dest: Option<Desc>,
    pub(crate) md: Option<Desc>,
}

/// State shared by the bdev, its channels on every reactor and the owner.
pub(crate) struct Shared {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) source_name: String,
    pub(crate) dest_name: String,
    pub(crate) md_name: String,
    pub(crate) uuid: Uuid,
    pub(crate) geo: Geometry,
    pub(crate) map: Arc<RegionMap>,
    /// The committer's reactor (also an owner).
    pub(crate) home: u32,
    /// Owner reactors; region r belongs to `owners[(r / stripe) % len]`.
    pub(crate) owners: Vec<u32>,
    pub(crate) stripes: Stripes,
    /// Commit rounds in flight (the routers' view of the committer).
    pub(crate) commit_rounds: CommitRounds,
    pub(crate) md_block_size: u32,
    pub(crate) md_num_blocks: u64,
    pub(crate) dest_write_zeroes: bool,
    pub(crate) dest_unmap: bool,
    pub(crate) discard_passdown: bool,
    pub(crate) hydration_enabled: AtomicBool,
    /// Hydration stopped itself after repeated copy failures
    /// (`PAUSE_NONE`, `PAUSE_SOURCE` or `PAUSE_DEST`); it probes and
    /// resumes by itself.
    pub(crate) paused: AtomicU8,
    pub(crate) threshold: AtomicU32,
    pub(crate) batch: AtomicU32,
    pub(crate) mbytes_per_sec: AtomicU64,
    pub(crate) copy_on_read: AtomicBool,
    pub(crate) mode: AtomicU8,
    /// Regions being copied, per owner.
    pub(crate) hydrating: Vec<AtomicU64>,
    /// What each owner's hydration window uses and measured (status).
    pub(crate) pacing: Vec<PaceStats>,
    pub(crate) err_source: AtomicU64,
    pub(crate) err_dest: AtomicU64,
    pub(crate) err_md: AtomicU64,
    /// Bytes copied by hydration since create.
    pub(crate) hydrated_bytes: AtomicU64,
    /// Hydration rate measured over the last commit period.
    pub(crate) rate_bps: AtomicU64,
    pub(crate) released: AtomicBool,
    pub(crate) last_error: Mutex<Option<String>>,
    pub(crate) descs: Mutex<Descs>,
    /// Wakes the owner (set_hydration).
    pub(crate) kick: AtomicBool,
}

impl Shared {
    pub(crate) fn mode(&self) -> MetadataMode {
        MetadataMode::from_code(self.mode.load(Ordering::Acquire))
    }

    /// Bring the clone's mode down to `m` if it is better; the mode before.
    pub(crate) fn worsen_mode(&self, m: MetadataMode) -> MetadataMode {
        MetadataMode::from_code(self.mode.fetch_max(m.code(), Ordering::AcqRel))
    }

    pub(crate) fn set_last_error(&self, e: String) {
        *lock(&self.last_error) = Some(e);
    }
}

/// One owner's hydration window, published for the status object.
#[derive(Default)]
pub(crate) struct PaceStats {
    pub(crate) window: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) user_in_flight: AtomicU64,
    pub(crate) peak_in_flight: AtomicU64,
    /// Windowed minimum latency of the source, ns (0: none yet).
    pub(crate) min_latency_ns: AtomicU64,
    /// Windowed maximum delivery rate, bytes/s.
    pub(crate) rate_bps: AtomicU64,
}

/// The source's channel on this reactor while the clone still reads from a
/// source that reports block status.
pub(crate) fn source_with_status(sh: &Shared) -> Option<bdev::IoChannel> {
    if sh.released.load(Ordering::Acquire) {
        return None;
    }
    lock(&sh.descs)
        .source
        .as_ref()
        .filter(|d| d.bdev().has_block_status())
        .map(|d| d.channel())
}

/// The `BdevOps` of a clone.
pub struct CloneBdev(pub(crate) Arc<Shared>);

impl BdevOps for CloneBdev {
    fn module_name(&self) -> &'static str {
        MODULE_NAME
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(
            t,
            IoType::Read
                | IoType::Write
                | IoType::Flush
                | IoType::Reset
                | IoType::Unmap
                | IoType::WriteZeroes
        )
    }

    fn has_block_status(&self) -> bool {
        source_with_status(&self.0).is_some()
    }

    fn create_channel(&self, _bdev: &Arc<Bdev>) -> Box<dyn ChannelOps> {
        let descs = lock(&self.0.descs);
        let dst = descs.dest.as_ref().map(|d| d.channel());
        drop(descs);
        Box::new(CloneChannel {
            sh: self.0.clone(),
            dst,
        })
    }

    fn dump_info_json(&self, _b: &Bdev) -> Value {
        json!({ "clone": self.0.status() })
    }

    fn write_config_json(&self, _b: &Bdev) -> Option<Value> {
        Some(json!({"method": "bdev_clone_create", "params": self.0.config_params()}))
    }

    fn destruct(&self, _bdev: &Arc<Bdev>) -> BoxFuture {
        let sh = self.0.clone();
        Box::pin(async move {
            stop_all(&sh).await;
            let descs = std::mem::take(&mut *lock(&sh.descs));
            drop(descs);
            tracing::info!(clone = %sh.name, "clone bdev destroyed");
        })
    }
}

pub(crate) fn clone_of(b: &Arc<Bdev>) -> Option<Arc<Shared>> {
    b.ops_as::<CloneBdev>().map(|c| c.0.clone())
}

pub(crate) fn find(name: &str) -> Option<Arc<Shared>> {
    bdev::get(name)
        .filter(|b| b.name() == name)
        .and_then(|b| clone_of(&b))
}
