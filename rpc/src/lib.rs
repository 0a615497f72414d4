//! SPDK-compatible JSON-RPC 2.0: a Unix-socket server, the method registry
//! with SPDK's STARTUP/RUNTIME states, the subsystem list behind
//! `framework_get_subsystems` / `framework_get_config` (and so `save_config`),
//! and the `--json` config loader. See `rpc-contract.md` §1 and §4.
//!
//! The crate knows no bdev or nvmf method: modules register theirs with
//! [`register`] / [`register_typed`] and their config with
//! [`register_subsystem`]. Every handler runs as a task on reactor 0.
//!
//! Deviations from SPDK worth knowing:
//! * The server answers a request larger than the 256 KiB receive buffer
//!   with -32700 "Parse error" and closes the connection (SPDK just closes).
//! * The 8192-values-per-request limit is not enforced; serde_json's nesting
//!   limit (128) is, as a parse error.
//! * The `--json` loader calls the registry in-process instead of through a
//!   temporary socket.

mod builtin;
mod config;
mod error;
mod json;
mod registry;
mod server;

pub use builtin::{register_builtin_methods, version_string};
pub use config::{load_json_config, strip_comments, ConfigError};
pub use error::{
    DecodeError, RpcError, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, INVALID_STATE,
    METHOD_NOT_FOUND, PARSE_ERROR,
};
pub use registry::{
    call, method_names, register, register_alias, register_subsystem, register_typed, set_state,
    state, HandlerFuture, RpcResult, RUNTIME, STARTUP,
};
pub use server::{Server, ServerError, MAX_CONNS, RECV_BUF_SIZE};

#[cfg(test)]
mod tests;
