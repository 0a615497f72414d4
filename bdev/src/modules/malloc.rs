//! `malloc`: a RAM disk (SPDK `module/bdev/malloc`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ::rpc::DecodeError;
use reactor::DmaBuf;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::rpc::{register_create, register_delete};
use crate::{Bdev, BdevBuilder, BdevError, BdevIo, BdevOps, ChannelOps, IoStatus, IoType};

pub const PRODUCT_NAME: &str = "Malloc disk";

pub struct MallocBdev {
    mem: DmaBuf,
    block_size: u32,
    optimal_io_boundary: u32,
    physical_block_size: u32,
}

// The backing store is only touched through raw copies of disjoint I/O
// ranges; overlapping concurrent I/O has undefined contents on any block
// device, and here too, but never unsafety beyond that data race on bytes.
struct MallocChannel {
    base: *mut u8,
    block_size: u64,
    _bdev: Arc<Bdev>,
}

impl ChannelOps for MallocChannel {
    fn submit(&self, mut io: Box<BdevIo>) {
        let off = (io.offset_blocks * self.block_size) as usize;
        let len = (io.num_blocks * self.block_size) as usize;
        match io.io_type {
            IoType::Read => {
                let buf = io.buf.as_mut().expect("generic layer checked the buffer");
                // SAFETY: the generic layer checked off+len is inside the
                // bdev and that the buffer holds len bytes; _bdev keeps
                // the backing store alive.
                unsafe { std::ptr::copy_nonoverlapping(self.base.add(off), buf.as_mut_ptr(), len) };
            }
            IoType::Write => {
                let buf = io.buf.as_ref().expect("generic layer checked the buffer");
                // SAFETY: as for reads.
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.base.add(off), len) };
            }
            IoType::Unmap | IoType::WriteZeroes => {
                // SAFETY: range checked by the generic layer.
                unsafe { std::ptr::write_bytes(self.base.add(off), 0, len) };
            }
            IoType::Flush | IoType::Reset => {}
        }
        io.complete(IoStatus::Success);
    }
}

// SAFETY: the raw base pointer is only used for copies of checked ranges;
// the mapping lives as long as the bdev, which the channel holds.
unsafe impl Send for MallocBdev {}
// SAFETY: as above.
unsafe impl Sync for MallocBdev {}

impl BdevOps for MallocBdev {
    fn module_name(&self) -> &'static str {
        "malloc"
    }
    fn io_type_supported(&self, _t: IoType) -> bool {
        true
    }
    fn create_channel(&self, bdev: &Arc<Bdev>) -> Box<dyn ChannelOps> {
        Box::new(MallocChannel {
            base: self.mem.as_ptr() as *mut u8,
            block_size: self.block_size as u64,
            _bdev: bdev.clone(),
        })
    }
    fn write_config_json(&self, b: &Bdev) -> Option<Value> {
        Some(json!({
            "method": "bdev_malloc_create",
            "params": {
                "name": b.name(),
                "num_blocks": b.num_blocks(),
                "block_size": self.block_size,
                "physical_block_size": self.physical_block_size,
                "uuid": b.uuid().to_string(),
                "optimal_io_boundary": self.optimal_io_boundary,
                "md_size": 0,
                "dif_type": 0,
                "dif_is_head_of_md": false,
                "dif_pi_format": 0,
            }
        }))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    pub name: Option<String>,
    pub block_size: u32,
    pub num_blocks: u64,
    pub uuid: Option<Uuid>,
    #[serde(default)]
    pub optimal_io_boundary: u32,
    #[serde(default)]
    pub md_size: u32,
    #[serde(default)]
    pub md_interleave: bool,
    #[serde(default)]
    pub dif_type: i32,
    #[serde(default)]
    pub dif_is_head_of_md: bool,
    #[serde(default)]
    pub physical_block_size: u32,
    #[serde(default)]
    pub dif_pi_format: u32,
    #[serde(default = "default_numa")]
    pub numa_id: i32,
}

fn default_numa() -> i32 {
    -1
}

impl CreateParams {
    /// Plain RAM disk parameters, every optional field at its default.
    pub fn new(name: &str, block_size: u32, num_blocks: u64) -> Self {
        CreateParams {
            name: Some(name.to_string()),
            block_size,
            num_blocks,
            uuid: None,
            optimal_io_boundary: 0,
            md_size: 0,
            md_interleave: false,
            dif_type: 0,
            dif_is_head_of_md: false,
            physical_block_size: 0,
            dif_pi_format: 0,
            numa_id: -1,
        }
    }
}

static AUTO_NAME: AtomicU64 = AtomicU64::new(0);

/// Create and register a malloc bdev.
pub fn create(p: CreateParams) -> Result<Arc<Bdev>, BdevError> {
    if p.num_blocks == 0 {
        return Err(BdevError::Invalid(
            "Disk num_blocks must be greater than 0".into(),
        ));
    }
    if p.block_size == 0 || !p.block_size.is_multiple_of(512) || !p.block_size.is_power_of_two() {
        return Err(BdevError::Invalid(format!(
            "block_size {} must be a power of two and a multiple of 512",
            p.block_size
        )));
    }
    if p.physical_block_size != 0 && !p.physical_block_size.is_multiple_of(p.block_size) {
        return Err(BdevError::Invalid(
            "physical_block_size must be a multiple of block_size".into(),
        ));
    }
    if p.md_size != 0 || p.dif_type != 0 {
        return Err(BdevError::Invalid(
            "separate metadata and DIF are not supported by this target".into(),
        ));
    }
    let bytes = p
        .num_blocks
        .checked_mul(p.block_size as u64)
        .filter(|&b| b <= isize::MAX as u64)
        .ok_or_else(|| BdevError::Invalid("malloc bdev size overflows".into()))?;
    let name = match p.name {
        Some(n) => n,
        None => loop {
            let n = format!("Malloc{}", AUTO_NAME.fetch_add(1, Ordering::Relaxed));
            if crate::get(&n).is_none() {
                break n;
            }
        },
    };
    if crate::get(&name).is_some() {
        return Err(BdevError::Exists(name));
    }
    // The size comes from the RPC: refuse what the machine cannot give
    // (-ENOMEM, as SPDK's failed spdk_zmalloc) rather than abort or be
    // OOM-killed with every other bdev. The store is faulted in here, not
    // lazily, so the check covers everything it will ever take.
    let mem = DmaBuf::try_zeroed(bytes as usize)
        .map_err(|e| BdevError::NoMem(format!("malloc bdev '{name}': {e}")))?;
    let ops = MallocBdev {
        mem,
        block_size: p.block_size,
        optimal_io_boundary: p.optimal_io_boundary,
        physical_block_size: p.physical_block_size,
    };
    BdevBuilder::new(name, PRODUCT_NAME)
        .block_size(p.block_size)
        .num_blocks(p.num_blocks)
        .uuid(p.uuid)
        .optimal_io_boundary(p.optimal_io_boundary)
        .physical_block_size(p.physical_block_size)
        .register(ops)
}

pub fn register_methods() {
    register_create("bdev_malloc_create", DecodeError::Internal, create);
    register_delete("bdev_malloc_delete", "malloc", DecodeError::Internal);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::run_on_reactor;

    #[test]
    fn size_beyond_memory_is_enomem_and_registers_nothing() {
        run_on_reactor(0x1, || async {
            // 1 PiB: more than any machine here can give.
            let err = create(CreateParams::new("Huge", 4096, 1 << 38)).unwrap_err();
            assert!(matches!(err, BdevError::NoMem(_)), "{err}");
            let rpc = ::rpc::RpcError::from(err);
            assert_eq!(rpc.code, -libc::ENOMEM);
            assert!(
                rpc.message.starts_with(
                    "Cannot allocate memory: malloc bdev 'Huge': could not allocate 1125899906842624 bytes"
                ),
                "{}",
                rpc.message
            );
            assert!(crate::get("Huge").is_none());
            // What fits is still created.
            create(CreateParams::new("Small", 512, 64)).unwrap();
        });
    }
}
