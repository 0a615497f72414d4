//! The clone bdev's pure parts (dm-clone semantics, see `shared/design.md`
//! "The clone module"): no I/O, no reactor, no RPC, so the bdev integration
//! is a thin executor around tested logic.
//!
//! * [`geometry`]: regions and 64-bit block/region arithmetic.
//! * [`region_map`]: the lock-free hydration bitmap and its dirty-unit tracker.
//! * [`metadata`]: the on-disk format (`docs/metadata.md`), encode/decode.
//! * [`router`]: the I/O routing state machine an executor drives.

pub mod geometry;
pub mod metadata;
pub mod region_map;
pub mod router;

pub use geometry::{Geometry, GeometryError};
pub use metadata::{MetadataError, SuperState, Superblock};
pub use region_map::RegionMap;
pub use router::{
    Command, CommitId, CopyId, IoError, IoKind, MetadataMode, OpId, ReqId, Request, Router,
    RouterConfig, RouterError, Status, UnitImage,
};
