//! One bdev per active namespace of an attached controller (SPDK's
//! `module/bdev/nvme/bdev_nvme.c`): named `<ctrlr>n<nsid>`, product "NVMe
//! disk", geometry from Identify Namespace, UUID from the namespace
//! descriptors. A bdev channel is its reactor's queue pair.

use std::rc::Rc;
use std::sync::Arc;

use bdev::{Bdev, BdevBuilder, BdevError, BdevIo, BdevOps, ChannelOps, IoStatus, IoType};
use serde_json::{json, Value};

use super::ctrlr::{self, Ctrlr, Local, NsInfo, Shared};

pub const MODULE_NAME: &str = "nvme";
pub const PRODUCT_NAME: &str = "NVMe disk";

pub struct NvmeBdev {
    pub nsid: u32,
    shared: Arc<Shared>,
    ctrlr_name: String,
    /// `driver_specific` for `bdev_get_bdevs` (fixed at attach).
    info: Value,
    /// The attach call that re-creates the controller, carried by its first
    /// namespace's bdev so `save_config` emits it exactly once.
    attach_config: Option<Value>,
    dsm: bool,
    write_zeroes: bool,
    vwc: bool,
}

struct NvmeChannel {
    local: Rc<Local>,
    nsid: u32,
    bs: u32,
    vwc: bool,
}

impl ChannelOps for NvmeChannel {
    fn submit(&self, io: Box<BdevIo>) {
        if io.io_type == IoType::Flush && !self.vwc {
            // Nothing is cached on the controller: a flush has nothing to do
            // (SPDK completes it the same way).
            io.complete(IoStatus::Success);
            return;
        }
        self.local.submit(io, self.nsid, self.bs);
    }
}

impl BdevOps for NvmeBdev {
    fn module_name(&self) -> &'static str {
        MODULE_NAME
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        match t {
            IoType::Read | IoType::Write | IoType::Flush => true,
            IoType::Unmap => self.dsm,
            IoType::WriteZeroes => self.write_zeroes,
            IoType::Reset => false,
        }
    }

    fn create_channel(&self, b: &Arc<Bdev>) -> Box<dyn ChannelOps> {
        Box::new(NvmeChannel {
            local: ctrlr::local(&self.shared),
            nsid: self.nsid,
            bs: b.block_size(),
            vwc: self.vwc,
        })
    }

    fn dump_info_json(&self, _b: &Bdev) -> Value {
        self.info.clone()
    }

    fn write_config_json(&self, _b: &Bdev) -> Option<Value> {
        self.attach_config.clone()
    }
}

impl std::fmt::Debug for NvmeBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeBdev")
            .field("ctrlr", &self.ctrlr_name)
            .field("nsid", &self.nsid)
            .finish()
    }
}

/// SPDK's `trid` object.
pub fn trid_json(c: &Ctrlr) -> Value {
    let o = &c.opts;
    json!({
        "trtype": "TCP",
        "adrfam": o.adrfam,
        "traddr": o.traddr,
        "trsvcid": o.trsvcid,
        "subnqn": o.subnqn,
    })
}

/// The `bdev_nvme_attach_controller` call that re-creates `c`, with SPDK's
/// keys (`bdev_nvme_config_json` / `nvme_ctrlr_config_json`).
pub fn attach_config(c: &Ctrlr) -> Value {
    let o = &c.opts;
    json!({
        "method": "bdev_nvme_attach_controller",
        "params": {
            "name": o.name,
            "trtype": "TCP",
            "adrfam": o.adrfam,
            "traddr": o.traddr,
            "trsvcid": o.trsvcid,
            "subnqn": o.subnqn,
            "prchk_reftag": false,
            "prchk_guard": false,
            "ctrlr_loss_timeout_sec": o.ctrlr_loss_timeout_sec,
            "reconnect_delay_sec": o.reconnect_delay_sec,
            "fast_io_fail_timeout_sec": o.fast_io_fail_timeout_sec,
            "hostnqn": o.hostnqn,
            "hdgst": o.hdgst,
            "ddgst": o.ddgst,
            "num_io_queues": o.num_io_queues,
        }
    })
}

/// Register the bdev of namespace `ns`.
pub fn register(c: &Rc<Ctrlr>, ns: &NsInfo, carries_config: bool) -> Result<String, BdevError> {
    let d = c.data();
    let name = format!("{}n{}", c.opts.name, ns.nsid);
    let info = json!({
        "nvme": [{
            "trid": trid_json(c),
            "cntlid": d.cntlid,
            "ctrlr_data": {
                "cntlid": d.cntlid,
                "vendor_id": format!("{:#06x}", d.vid),
                "model_number": d.mn,
                "serial_number": d.sn,
                "firmware_revision": d.fr,
                "subnqn": d.subnqn,
                "oacs": {"security": 0, "format": 0, "firmware": 0, "ns_manage": 0},
                "multi_ctrlr": true,
                "ana_reporting": false,
            },
            "vs": {"nvme_version": format!("{}.{}", d.ver >> 16, (d.ver >> 8) & 0xFF)},
            "ns_data": {"id": ns.nsid, "can_share": true},
        }],
        "mp_policy": "active_passive",
    });
    let ops = NvmeBdev {
        nsid: ns.nsid,
        shared: c.shared.clone(),
        ctrlr_name: c.opts.name.clone(),
        info,
        attach_config: carries_config.then(|| attach_config(c)),
        dsm: d.supports_dsm(),
        write_zeroes: d.supports_write_zeroes(),
        vwc: d.volatile_write_cache(),
    };
    let b = BdevBuilder::new(name.clone(), PRODUCT_NAME)
        .block_size(ns.block_size)
        .num_blocks(ns.num_blocks)
        .uuid(ns.uuid)
        .write_cache(d.volatile_write_cache())
        .register(ops)?;
    Ok(b.name().to_string())
}
