//! NVMe over Fabrics, TCP transport: the PDU codec and NVMe structures
//! ([`pdu`], [`spec`]) shared by target and host, and the target itself:
//! subsystems, namespaces, controllers and queues ([`target`], `ctrlr`,
//! `tcp`) driven by SPDK's nvmf_* RPCs ([`rpc`]).

pub mod ctrlr;
pub mod fuzz;
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
