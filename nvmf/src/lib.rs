//! NVMe over Fabrics, TCP transport, in layers (each uses only those above):
//!
//! 1. [`spec`]: NVMe / NVMe-oF structures (SQE, CQE, Connect, DSM ranges,
//!    status codes, Identify and log layouts); [`pdu`]: the NVMe/TCP PDU
//!    codec. Shared by the target and the host.
//! 2. [`target`]: subsystems, namespaces, listeners, controllers, and the
//!    transport interface ([`target::TransportOps`]) through which it
//!    reaches queues.
//! 3. [`ctrlr`] (admin commands, properties, Identify, logs, features),
//!    [`connect`] (fabrics Connect), [`nvm_cmd`] (NVM I/O commands to bdev
//!    I/O): command handling, transport-independent.
//! 4. [`tcp`]: the TCP transport (listeners, connections, PDUs in and out).
//! 5. [`rpc`]: SPDK's nvmf_* RPCs and `save_config`.
//!
//! [`host`] is the NVMe/TCP host behind `bdev_nvme_attach_controller`; it
//! uses layer 1 only.

/// The options an RPC sets: `$ty { fields }` with each field taken from the
/// decoded params `$given` where given (`Some`), else from `$base`. Used by
/// `nvmf_create_transport` (base: the transport defaults) and
/// `bdev_nvme_set_options` (base: the current module options).
macro_rules! given_or {
    ($ty:ident { $($f:ident),* $(,)? } from $given:expr, else $base:expr) => {{
        let (given, base) = (&$given, $base);
        $ty {
            $($f: given.$f.unwrap_or(base.$f),)*
        }
    }};
}

pub mod connect;
pub mod ctrlr;
pub mod fuzz;
pub mod host;
pub mod nvm_cmd;
pub mod pdu;
pub mod rpc;
pub mod spec;
pub mod target;
pub mod tcp;

/// Register the nvmf RPCs and the "nvmf" config subsystem.
pub fn register_methods() {
    rpc::register_methods();
}

/// Stop listening, drop controllers and close namespace bdevs (call on
/// reactor 0 before unregistering bdevs).
pub fn shutdown() {
    rpc::shutdown();
}
