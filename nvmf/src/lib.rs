//! NVMe over Fabrics, TCP transport: the PDU codec and NVMe structures
//! ([`pdu`], [`spec`]) shared by target and host, and the target itself.

pub mod host;
pub mod pdu;
pub mod spec;
