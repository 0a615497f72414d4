//! The clone bdev (dm-clone semantics, see `shared/design.md` "The clone
//! module"). The pure parts do no I/O, so the bdev integration
//! ([`module`]) is a thin executor around tested logic.
//!
//! * [`geometry`]: regions and 64-bit block/region arithmetic.
//! * [`region_map`]: the lock-free hydration bitmap and its dirty-unit tracker.
//! * [`metadata`]: the on-disk format (`docs/metadata.md`), encode/decode.
//! * [`router`]: the I/O routing state machine an executor drives.
//! * [`module`]: the bdev, its channels, the owner-reactor executor
//!   (hydration, commits), create/delete/status; [`rpc`]: its RPCs.

mod error;
pub mod geometry;
pub mod metadata;
pub mod module;
#[doc(hidden)]
pub mod oneshot;
pub mod region_map;
pub mod router;
pub mod rpc;

pub use error::CloneError;
pub use geometry::{Geometry, GeometryError};
pub use metadata::{MetadataError, SuperState, Superblock};
pub use module::{
    create, delete, hydrated_regions, region_hydrated, set_hydration, status, status_all,
    CloneBdev, CreateOpts, HydrationOpts, MODULE_NAME,
};
pub use region_map::RegionMap;
pub use router::{
    Command, CommitId, CopyId, IoError, IoKind, MetadataMode, OpId, ReqId, Request, Router,
    RouterConfig, RouterError, Status, UnitImage,
};
pub use rpc::register_rpcs;
