//! `null`: a bdev that discards writes and reads zeroes (SPDK
//! `module/bdev/null`). Useful as a sink for benchmarks and as a
//! placeholder base device.
//!
//! Supported I/O follows SPDK: read, write, write_zeroes and reset; flush
//! and unmap are reported unsupported (the generic layer fails them).

use std::sync::Arc;

use ::rpc::{DecodeError, RpcError};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::rpc::{register_action, register_create, register_delete};
use crate::{Bdev, BdevBuilder, BdevError, BdevIo, BdevOps, ChannelOps, IoStatus, IoType};

pub const PRODUCT_NAME: &str = "Null disk";
pub const MODULE_NAME: &str = "null";

/// What `bdev_null_create` was given, kept so `save_config` re-creates the
/// same bdev (the generic layer has no fields for the preferred_* hints).
pub struct NullBdev {
    block_size: u32,
    physical_block_size: u32,
    dif_is_head_of_md: bool,
    dif_pi_format: u32,
    preferred_write_granularity: u32,
    preferred_write_alignment: u32,
    optimal_write_size: u32,
    preferred_unmap_granularity: u32,
    preferred_unmap_alignment: u32,
}

struct NullChannel {
    block_size: u64,
}

impl ChannelOps for NullChannel {
    fn submit(&self, mut io: Box<BdevIo>) {
        if io.io_type == IoType::Read {
            // Deterministic contents: a read returns zeroes. The generic
            // layer checked the buffer holds num_blocks * block_size bytes;
            // `get` keeps this panic-free regardless.
            let len = io.num_blocks.saturating_mul(self.block_size);
            if let Some(buf) = io.buf.as_mut() {
                let len = usize::try_from(len).unwrap_or(usize::MAX).min(buf.len());
                buf.as_mut_slice()[..len].fill(0);
            }
        }
        // Writes and write_zeroes are discarded; reset has nothing in flight.
        io.complete(IoStatus::Success);
    }

    fn block_status(&self, _offset_blocks: u64, num_blocks: u64, cb: crate::BlockStatusCb) {
        // Nothing is stored and every read returns zeroes.
        reactor::defer(move || cb(Ok(vec![crate::BlockExtent::hole(num_blocks)])));
    }
}

impl BdevOps for NullBdev {
    fn module_name(&self) -> &'static str {
        MODULE_NAME
    }
    fn stores_data(&self) -> bool {
        false
    }
    fn has_block_status(&self) -> bool {
        true
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(
            t,
            IoType::Read | IoType::Write | IoType::WriteZeroes | IoType::Reset
        )
    }

    fn create_channel(&self, _bdev: &Arc<Bdev>) -> Box<dyn ChannelOps> {
        Box::new(NullChannel {
            block_size: self.block_size as u64,
        })
    }

    fn write_config_json(&self, b: &Bdev) -> Option<Value> {
        let mut p = Map::new();
        p.insert("name".into(), json!(b.name()));
        p.insert("num_blocks".into(), json!(b.num_blocks()));
        p.insert("block_size".into(), json!(self.block_size));
        p.insert(
            "physical_block_size".into(),
            json!(self.physical_block_size),
        );
        p.insert("md_size".into(), json!(0));
        p.insert("dif_type".into(), json!(0));
        p.insert("dif_is_head_of_md".into(), json!(self.dif_is_head_of_md));
        p.insert("dif_pi_format".into(), json!(self.dif_pi_format));
        p.insert("uuid".into(), json!(b.uuid().to_string()));
        // SPDK leaves the optional hints out; emit them only when set so a
        // default bdev's config matches SPDK's byte for byte.
        for (k, v) in [
            (
                "preferred_write_granularity",
                self.preferred_write_granularity,
            ),
            ("preferred_write_alignment", self.preferred_write_alignment),
            ("optimal_write_size", self.optimal_write_size),
            (
                "preferred_unmap_granularity",
                self.preferred_unmap_granularity,
            ),
            ("preferred_unmap_alignment", self.preferred_unmap_alignment),
        ] {
            if v != 0 {
                p.insert(k.into(), json!(v));
            }
        }
        Some(json!({ "method": "bdev_null_create", "params": Value::Object(p) }))
    }
}

/// `bdev_null_create` params (rpc-params.md).
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    pub name: String,
    pub block_size: u32,
    pub num_blocks: u64,
    pub uuid: Option<Uuid>,
    #[serde(default)]
    pub physical_block_size: u32,
    #[serde(default)]
    pub md_size: u32,
    #[serde(default)]
    pub dif_type: i32,
    #[serde(default)]
    pub dif_pi_format: u32,
    #[serde(default)]
    pub dif_is_head_of_md: bool,
    #[serde(default)]
    pub preferred_write_granularity: u32,
    #[serde(default)]
    pub preferred_write_alignment: u32,
    #[serde(default)]
    pub optimal_write_size: u32,
    #[serde(default)]
    pub preferred_unmap_granularity: u32,
    #[serde(default)]
    pub preferred_unmap_alignment: u32,
}

impl CreateParams {
    /// Minimal params: everything optional left at its default.
    pub fn new(name: impl Into<String>, block_size: u32, num_blocks: u64) -> Self {
        CreateParams {
            name: name.into(),
            block_size,
            num_blocks,
            uuid: None,
            physical_block_size: 0,
            md_size: 0,
            dif_type: 0,
            dif_pi_format: 0,
            dif_is_head_of_md: false,
            preferred_write_granularity: 0,
            preferred_write_alignment: 0,
            optimal_write_size: 0,
            preferred_unmap_granularity: 0,
            preferred_unmap_alignment: 0,
        }
    }
}

/// Create and register a null bdev.
pub fn create(p: CreateParams) -> Result<Arc<Bdev>, BdevError> {
    if p.md_size != 0 || p.dif_type != 0 {
        return Err(BdevError::Invalid(
            "separate metadata and DIF are not supported by this target".into(),
        ));
    }
    if p.block_size == 0 || !p.block_size.is_multiple_of(512) {
        return Err(BdevError::Invalid(format!(
            "Data block size {} is not a multiple of 512",
            p.block_size
        )));
    }
    if p.num_blocks == 0 {
        return Err(BdevError::Invalid("Disk must be more than 0 blocks".into()));
    }
    if p.physical_block_size != 0 && !p.physical_block_size.is_multiple_of(p.block_size) {
        return Err(BdevError::Invalid(
            "physical_block_size must be a multiple of block_size".into(),
        ));
    }
    if p.num_blocks.checked_mul(p.block_size as u64).is_none() {
        return Err(BdevError::Invalid("null bdev size overflows".into()));
    }
    if crate::get(&p.name).is_some() {
        return Err(BdevError::Exists(p.name));
    }
    let ops = NullBdev {
        block_size: p.block_size,
        physical_block_size: p.physical_block_size,
        dif_is_head_of_md: p.dif_is_head_of_md,
        dif_pi_format: p.dif_pi_format,
        preferred_write_granularity: p.preferred_write_granularity,
        preferred_write_alignment: p.preferred_write_alignment,
        optimal_write_size: p.optimal_write_size,
        preferred_unmap_granularity: p.preferred_unmap_granularity,
        preferred_unmap_alignment: p.preferred_unmap_alignment,
    };
    BdevBuilder::new(p.name, PRODUCT_NAME)
        .block_size(p.block_size)
        .num_blocks(p.num_blocks)
        .uuid(p.uuid)
        .physical_block_size(p.physical_block_size)
        .io_hints(crate::IoHints {
            preferred_write_alignment: p.preferred_write_alignment,
            preferred_write_granularity: p.preferred_write_granularity,
            optimal_write_size: p.optimal_write_size,
            preferred_unmap_alignment: p.preferred_unmap_alignment,
            preferred_unmap_granularity: p.preferred_unmap_granularity,
        })
        .register(ops)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeParams {
    name: String,
    /// New size in MiB.
    new_size: u64,
}

/// `bdev_null_resize`: grow only, as SPDK (the null bdev holds no data).
fn resize(name: &str, new_size_mib: u64) -> Result<(), RpcError> {
    let b = crate::get(name)
        .filter(|b| !b.is_removing())
        .ok_or_else(|| RpcError::errno(libc::ENODEV))?;
    if b.module_name() != MODULE_NAME {
        return Err(RpcError::errno_msg(
            libc::EINVAL,
            format!("bdev '{name}' is not a null bdev"),
        ));
    }
    let current_mib = b.size_bytes() / (1024 * 1024);
    if new_size_mib < current_mib {
        return Err(RpcError::errno_msg(
            libc::EINVAL,
            "The new bdev size must not be smaller than current bdev size",
        ));
    }
    let new_blocks = new_size_mib
        .checked_mul(1024 * 1024)
        .map(|bytes| bytes / b.block_size() as u64)
        .ok_or_else(|| RpcError::errno_msg(libc::EINVAL, "new_size overflows"))?;
    if new_blocks == b.num_blocks() {
        return Ok(());
    }
    b.notify_blockcnt_change(new_blocks).map_err(RpcError::from)
}

pub fn register_methods() {
    register_create("bdev_null_create", DecodeError::Internal, create);
    register_delete("bdev_null_delete", MODULE_NAME, DecodeError::Internal);
    register_action(
        "bdev_null_resize",
        DecodeError::Internal,
        |p: ResizeParams| async move { resize(&p.name, p.new_size) },
    );
}

#[cfg(test)]
mod tests {
    use reactor::DmaBuf;

    use super::*;
    use crate::test_util::open_ch;
    use crate::util::{self, run_on_reactor};

    #[test]
    fn reads_zero_writes_succeed() {
        run_on_reactor(0x1, || async {
            let b = create(CreateParams::new("N0", 512, 2048)).unwrap();
            assert_eq!(b.product_name(), PRODUCT_NAME);
            assert_eq!(b.module_name(), "null");
            assert!(!b.write_cache());
            let (desc, ch) = open_ch("N0", true);
            let mut w = DmaBuf::new(4096);
            w.as_mut_slice().fill(0xa5);
            util::write(&ch, 10, w, false).await.unwrap();
            util::write(&ch, 0, DmaBuf::new(512), true).await.unwrap();
            // A dirty buffer comes back zeroed: nothing was stored.
            let mut dirty = DmaBuf::new(4096);
            dirty.as_mut_slice().fill(0xff);
            let io = util::submit(&ch, IoType::Read, 10, 8, Some(dirty), false).await;
            assert_eq!(io.status, IoStatus::Success);
            assert!(io.buf.as_ref().unwrap().as_slice().iter().all(|&x| x == 0));
            util::simple(&ch, IoType::WriteZeroes, 0, 2048)
                .await
                .unwrap();
            util::simple(&ch, IoType::Reset, 0, 0).await.unwrap();
            // Unsupported as in SPDK.
            for t in [IoType::Unmap, IoType::Flush] {
                let r = util::simple(&ch, t, 0, 8).await;
                assert_eq!(r, Err(IoStatus::Failed), "{t:?}");
            }
            // Range checks still apply.
            assert_eq!(
                util::read(&ch, 2047, 2).await.unwrap_err(),
                IoStatus::Failed
            );
            drop(ch);
            drop(desc);
        });
    }

    #[test]
    fn config_json_and_errors() {
        run_on_reactor(0x1, || async {
            let u = Uuid::parse_str("7e25812e-1111-2222-3333-444455556666").unwrap();
            let mut p = CreateParams::new("N1", 4096, 256);
            p.uuid = Some(u);
            p.physical_block_size = 4096;
            p.optimal_write_size = 8;
            let b = create(p).unwrap();
            assert_eq!(b.uuid(), u);
            let cfg = b.ops().write_config_json(&b).unwrap();
            assert_eq!(
                cfg,
                json!({
                    "method": "bdev_null_create",
                    "params": {
                        "name": "N1",
                        "num_blocks": 256,
                        "block_size": 4096,
                        "physical_block_size": 4096,
                        "md_size": 0,
                        "dif_type": 0,
                        "dif_is_head_of_md": false,
                        "dif_pi_format": 0,
                        "uuid": "7e25812e-1111-2222-3333-444455556666",
                        "optimal_write_size": 8,
                    }
                })
            );
            // The emitted params decode back into a create request.
            let again: CreateParams = serde_json::from_value(cfg["params"].clone()).unwrap();
            assert_eq!(again.num_blocks, 256);
            assert_eq!(b.ops().dump_info_json(&b), json!({}));

            let e = create(CreateParams::new("N1", 512, 8)).unwrap_err();
            assert_eq!(e.errno(), libc::EEXIST);
            assert_eq!(
                create(CreateParams::new("N2", 512, 0)).unwrap_err().errno(),
                libc::EINVAL
            );
            assert_eq!(
                create(CreateParams::new("N2", 520, 8)).unwrap_err().errno(),
                libc::EINVAL
            );
            let mut md = CreateParams::new("N2", 512, 8);
            md.md_size = 8;
            assert_eq!(RpcError::from(create(md).unwrap_err()).code, -22);
            let mut dif = CreateParams::new("N2", 512, 8);
            dif.dif_type = 1;
            assert_eq!(create(dif).unwrap_err().errno(), libc::EINVAL);

            // Resize: same size is a no-op, shrinking is refused, growing
            // takes effect and tells open descriptors.
            assert!(resize("N1", 1).is_ok());
            assert_eq!(resize("N1", 0).unwrap_err().code, -22);
            let seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let s2 = seen.clone();
            let d = crate::open("N1", false, move |ev| {
                if ev == crate::BdevEvent::Resize {
                    s2.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            })
            .unwrap();
            let before = d.bdev().num_blocks();
            resize("N1", 2).unwrap();
            assert_eq!(d.bdev().num_blocks(), before * 2);
            assert!(seen.load(std::sync::atomic::Ordering::SeqCst));
            drop(d);
            assert_eq!(
                resize("nope", 2).unwrap_err(),
                RpcError::errno(libc::ENODEV)
            );

            assert!(matches!(
                crate::unregister_by_name("nope", MODULE_NAME).await,
                Err(BdevError::NotFound(_))
            ));
            crate::unregister_by_name("N1", MODULE_NAME).await.unwrap();
            assert!(crate::get("N1").is_none());
        });
    }

    #[test]
    fn params_decode_strictly() {
        let ok: CreateParams = serde_json::from_value(json!({
            "name": "n", "block_size": 512, "num_blocks": 8,
            "dif_is_head_of_md": false, "preferred_unmap_alignment": 4
        }))
        .unwrap();
        assert_eq!(ok.preferred_unmap_alignment, 4);
        assert!(serde_json::from_value::<CreateParams>(json!({
            "name": "n", "block_size": 512, "num_blocks": 8, "bogus": 1
        }))
        .is_err());
        assert!(
            serde_json::from_value::<CreateParams>(json!({"name": "n", "block_size": 512}))
                .is_err()
        );
        assert!(serde_json::from_value::<CreateParams>(json!({
            "name": "n", "block_size": -512, "num_blocks": 8
        }))
        .is_err());
    }
}
