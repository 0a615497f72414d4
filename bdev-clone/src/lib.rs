//! The clone bdev (dm-clone semantics, see `docs/clone.md`). The pure parts
//! do no I/O, so the bdev integration is a thin executor around tested
//! logic.
//!
//! The pure parts:
//! * [`geometry`]: regions and 64-bit block/region arithmetic.
//! * [`region_map`]: the lock-free hydration bitmap and its dirty-unit tracker.
//! * [`metadata`]: the on-disk format (`docs/metadata.md`), encode/decode.
//! * [`router`]: the I/O routing state machine an executor drives.
//! * [`commit`]: the commit rounds one committer makes for every router.
//!
//! The bdev, one file per concern:
//! * `clone.rs`: the shared state and the `BdevOps`.
//! * `channel.rs`: per-reactor submit, the hydrated fast path, stripe split.
//! * `owner.rs`: the per-reactor owners executing their routers.
//! * `hydration.rs`: background copies, back-off, rate limit.
//! * `committer.rs`: commit rounds (the durability order) and their waiters.
//! * `metadata_io.rs`: reading, opening, formatting, repairing metadata.
//! * `lifecycle.rs`: create, completion, quiesce, delete.
//! * `status.rs`: the status object ([`CloneStatus`], also parsed by
//!   `clonectl`); [`rpc`]: the RPCs and their params.

mod channel;
mod clone;
pub mod commit;
mod committer;
mod error;
pub mod geometry;
mod hydration;
mod lifecycle;
pub mod metadata;
mod metadata_io;
mod owner;
pub mod pacer;
pub mod region_map;
pub mod router;
pub mod rpc;
mod status;

pub use clone::{CloneBdev, MODULE_NAME, PRODUCT_NAME};
pub use commit::{CommitRounds, Committer, UnitImage};
pub use error::CloneError;
pub use geometry::{Geometry, GeometryError};
pub use hydration::{set_hydration, MAX_BATCH_SIZE, MAX_MBYTES_PER_SEC};
#[doc(hidden)]
pub use lifecycle::set_stripe_words;
pub use lifecycle::{create, delete};
pub use metadata::{MetadataError, SuperState, Superblock};
pub use region_map::RegionMap;
pub use router::{
    Command, CommitId, CopyId, IoError, IoKind, MetadataMode, OpId, ReqId, Request, Router,
    RouterConfig, RouterError, Status, Stripes,
};
pub use rpc::{register_rpcs, CreateOpts, HydrationOpts};
pub use status::{
    hydrated_regions, region_hydrated, status, status_all, CloneSettings, CloneState, CloneStatus,
    ErrorCounts, MetadataStatus, Named, PausedReason, Progress,
};
