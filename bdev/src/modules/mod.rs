//! Base bdev modules, each with SPDK's RPC names, params, results and errors.

pub mod delay;
pub mod error;
pub mod malloc;
pub mod null;
pub mod uring;
pub mod wcache;

/// Register every base module's RPC methods.
pub fn register_methods() {
    malloc::register_methods();
    delay::register_methods();
    error::register_methods();
    null::register_methods();
    uring::register_methods();
}
