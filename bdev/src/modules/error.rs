//! `error`: a stacked bdev that injects I/O errors on demand (SPDK
//! `module/bdev/error`), for testing how upper layers cope.
//!
//! * `bdev_error_create {base_name}` claims the base and registers
//!   `EE_<base_name>` on top; removing the base removes it too.
//! * `bdev_error_inject_error` arms, per I/O type (read, write, unmap,
//!   flush), `num` injections of one error type. Each injected I/O uses one
//!   up; `queue_depth` limits injection to moments when at least that many
//!   I/Os of the channel are in flight at the base.
//! * Error types: `failure` (fail without touching the base), `nomem` (the
//!   generic layer retries it), `nvme_failure` (an NVMe status), `pending`
//!   (held until a reset fails it), `corrupt_data` (XOR one byte of the
//!   data: before a write goes down, after a read comes back).
//!
//! Injection settings are atomics shared by all reactors; the I/O path
//! takes no lock.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use ::rpc::DecodeError;
use reactor::DmaBuf;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::rpc::{register_action, register_delete};
use crate::stacked::{self, Base};
use crate::{Bdev, BdevError, BdevIo, BdevOps, BoxFuture, ChannelOps, IoChannel, IoStatus, IoType};

pub const MODULE_NAME: &str = "error";
/// What SPDK's error bdev reports (`spdk_bdev_part_construct` in
/// `vbdev_error.c`).
pub const PRODUCT_NAME: &str = "Error Injection Disk";
/// Error bdevs are named after their base: `EE_<base>`.
pub const NAME_PREFIX: &str = "EE_";

/// `io_type` of `bdev_error_inject_error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InjectIoType {
    /// Disarm every I/O type (`num` = 0); other settings stay.
    Clear,
    Read,
    Write,
    Unmap,
    Flush,
    All,
}

/// `error_type` of `bdev_error_inject_error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum ErrorType {
    #[serde(rename = "failure")]
    Failure,
    #[serde(rename = "pending")]
    Pending,
    #[serde(rename = "corrupt_data")]
    CorruptData,
    #[serde(rename = "nomem")]
    NoMem,
    #[serde(rename = "nvme_failure")]
    NvmeFailure,
}

impl ErrorType {
    const ALL: [ErrorType; 5] = [
        ErrorType::Failure,
        ErrorType::Pending,
        ErrorType::CorruptData,
        ErrorType::NoMem,
        ErrorType::NvmeFailure,
    ];

    fn from_u8(v: u8) -> ErrorType {
        Self::ALL
            .get(v as usize)
            .copied()
            .unwrap_or(ErrorType::Failure)
    }
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct InjectParams {
    pub name: String,
    pub io_type: InjectIoType,
    pub error_type: ErrorType,
    #[serde(default = "one")]
    pub num: u32,
    #[serde(default)]
    pub queue_depth: u64,
    #[serde(default)]
    pub corrupt_offset: u64,
    #[serde(default)]
    pub corrupt_value: u8,
    #[serde(default)]
    pub nvme_sct: u32,
    #[serde(default)]
    pub nvme_sc: u32,
}

fn one() -> u32 {
    1
}

impl InjectParams {
    /// `num` injections of `error_type` on `io_type` I/O of bdev `name`,
    /// every other setting at its default.
    pub fn new(name: &str, io_type: InjectIoType, error_type: ErrorType, num: u32) -> Self {
        InjectParams {
            name: name.into(),
            io_type,
            error_type,
            num,
            queue_depth: 0,
            corrupt_offset: 0,
            corrupt_value: 0,
            nvme_sct: 0,
            nvme_sc: 0,
        }
    }
}

/// What to do with one I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hit {
    Failure,
    Pending,
    Corrupt { offset: u64, value: u8 },
    NoMem,
    Nvme { sct: u8, sc: u8 },
}

/// One I/O type's injection settings.
#[derive(Default)]
struct Slot {
    error_type: AtomicU8,
    /// Injections left; 0 = disarmed. Published last, so a reader that
    /// takes one sees the settings stored before it.
    num: AtomicU32,
    queue_depth: AtomicU64,
    corrupt_offset: AtomicU64,
    corrupt_value: AtomicU8,
    nvme_sct: AtomicU8,
    nvme_sc: AtomicU8,
}

impl Slot {
    fn arm(&self, p: &InjectParams, sct: u8, sc: u8) {
        self.num.store(0, Ordering::Release);
        self.error_type.store(p.error_type as u8, Ordering::Relaxed);
        self.queue_depth.store(p.queue_depth, Ordering::Relaxed);
        self.corrupt_offset
            .store(p.corrupt_offset, Ordering::Relaxed);
        self.corrupt_value.store(p.corrupt_value, Ordering::Relaxed);
        self.nvme_sct.store(sct, Ordering::Relaxed);
        self.nvme_sc.store(sc, Ordering::Relaxed);
        self.num.store(p.num, Ordering::Release);
    }

    /// Use up one injection if armed and the channel is deep enough.
    fn take(&self, inflight: u64) -> Option<Hit> {
        if inflight < self.queue_depth.load(Ordering::Relaxed) {
            return None;
        }
        self.num
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .ok()?;
        Some(
            match ErrorType::from_u8(self.error_type.load(Ordering::Relaxed)) {
                ErrorType::Failure => Hit::Failure,
                ErrorType::Pending => Hit::Pending,
                ErrorType::NoMem => Hit::NoMem,
                ErrorType::CorruptData => Hit::Corrupt {
                    offset: self.corrupt_offset.load(Ordering::Relaxed),
                    value: self.corrupt_value.load(Ordering::Relaxed),
                },
                ErrorType::NvmeFailure => Hit::Nvme {
                    sct: self.nvme_sct.load(Ordering::Relaxed),
                    sc: self.nvme_sc.load(Ordering::Relaxed),
                },
            },
        )
    }
}

/// Settings for read, write, unmap and flush (the types SPDK injects on).
#[derive(Default)]
struct Injections([Slot; 4]);

impl Injections {
    fn slot(&self, t: IoType) -> Option<&Slot> {
        match t {
            IoType::Read => Some(&self.0[0]),
            IoType::Write => Some(&self.0[1]),
            IoType::Unmap => Some(&self.0[2]),
            IoType::Flush => Some(&self.0[3]),
            IoType::Reset | IoType::WriteZeroes => None,
        }
    }
}

/// Per-bdev state of an error bdev.
pub struct ErrorBdev {
    base: Base,
    /// The uuid given at create, for `save_config` (SPDK saves only that).
    uuid: Option<Uuid>,
    inj: Arc<Injections>,
}

impl ErrorBdev {
    pub fn base_bdev_name(&self) -> &str {
        self.base.name()
    }
}

impl BdevOps for ErrorBdev {
    fn module_name(&self) -> &'static str {
        MODULE_NAME
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        self.base.io_type_supported(t)
    }

    fn create_channel(&self, bdev: &Arc<Bdev>) -> Box<dyn ChannelOps> {
        let st = Rc::new(ErrorChan {
            block_size: bdev.block_size() as u64,
            base: self.base.channel(),
            inj: self.inj.clone(),
            inflight: Cell::new(0),
            pending: RefCell::new(VecDeque::new()),
        });
        Box::new(ErrorChannel(st))
    }

    fn dump_info_json(&self, _b: &Bdev) -> Value {
        json!({ "error_disk": { "base_bdev": self.base.name() } })
    }

    fn write_config_json(&self, _b: &Bdev) -> Option<Value> {
        let mut params = json!({ "base_name": self.base.name() });
        if let Some(u) = self.uuid {
            params["uuid"] = json!(u.to_string());
        }
        Some(json!({ "method": "bdev_error_create", "params": params }))
    }

    fn destruct(&self, bdev: &Arc<Bdev>) -> BoxFuture {
        let desc = self.base.close();
        let bdev = bdev.clone();
        Box::pin(async move {
            // Pending I/O would otherwise never complete once the bdev is gone.
            fail_pending_everywhere(&bdev).await;
            // Closing the descriptor releases the claim on the base.
            drop(desc);
        })
    }
}

/// Per-reactor state of one error bdev.
struct ErrorChan {
    block_size: u64,
    /// `None` only if the channel was made after destruct (no base left).
    base: Option<IoChannel>,
    inj: Arc<Injections>,
    /// I/Os of this channel in flight at the base (SPDK's `io_inflight`,
    /// compared with `queue_depth`).
    inflight: Cell<u64>,
    /// I/Os held by a `pending` injection until the next reset.
    pending: RefCell<VecDeque<Box<BdevIo>>>,
}

/// Fail every pending I/O of `bdev` on every reactor.
async fn fail_pending_everywhere(bdev: &Arc<Bdev>) {
    crate::for_each_channel(bdev, |ch: &ErrorChannel| {
        ch.0.fail_pending(IoStatus::Failed)
    })
    .await
}

impl ErrorChan {
    /// Complete every pending I/O of this channel.
    fn fail_pending(&self, status: IoStatus) {
        loop {
            // No borrow across complete(): the callback may submit again.
            let io = self.pending.borrow_mut().pop_front();
            match io {
                Some(io) => io.complete(status),
                None => break,
            }
        }
    }
}

/// XOR the byte at `offset` of the I/O's data (no-op past its end).
fn corrupt(buf: &mut Option<DmaBuf>, len: u64, offset: u64, value: u8) {
    if offset >= len {
        return;
    }
    let byte = buf.as_mut().and_then(|b| {
        usize::try_from(offset)
            .ok()
            .and_then(|o| b.as_mut_slice().get_mut(o))
    });
    if let Some(x) = byte {
        *x ^= value;
    }
}

/// The `ChannelOps` half (what `for_each_channel` hands back).
struct ErrorChannel(Rc<ErrorChan>);

impl ChannelOps for ErrorChannel {
    fn submit(&self, mut io: Box<BdevIo>) {
        let st = &self.0;
        if io.io_type == IoType::Reset {
            // Pending I/O fails first (SPDK fails them), then the base resets.
            return stacked::reset(io, st.base.clone(), |bdev| async move {
                fail_pending_everywhere(&bdev).await
            });
        }
        let hit = st
            .inj
            .slot(io.io_type)
            .and_then(|s| s.take(st.inflight.get()));
        if let Some(hit) = hit {
            tracing::debug!(io_type = ?io.io_type, ?hit, "injecting error");
        }
        let len = io.num_blocks.saturating_mul(st.block_size);
        let read_corrupt = match hit {
            None => None,
            Some(Hit::Failure) => return io.complete(IoStatus::Failed),
            Some(Hit::NoMem) => return io.complete(IoStatus::NoMem),
            Some(Hit::Nvme { sct, sc }) => return io.complete(IoStatus::NvmeError { sct, sc }),
            Some(Hit::Pending) => return st.pending.borrow_mut().push_back(io),
            Some(Hit::Corrupt { offset, value }) => match io.io_type {
                IoType::Write => {
                    corrupt(&mut io.buf, len, offset, value);
                    None
                }
                IoType::Read => Some((offset, value)),
                _ => None,
            },
        };
        let Some(base) = &st.base else {
            return io.complete(IoStatus::Failed);
        };
        st.inflight.set(st.inflight.get() + 1);
        // A read to corrupt once it is back: where and how, beside the
        // flag bit (corrupt_value 0 is refused at inject; past the data's
        // end there is nothing to corrupt).
        io.driver_ctx = match read_corrupt {
            Some((offset, value)) if offset < len => offset << 8 | value as u64,
            _ => 0,
        };
        base.forward_hooked(io);
    }

    fn forward_done(&self, mut io: Box<BdevIo>) {
        let st = &self.0;
        st.inflight.set(st.inflight.get().saturating_sub(1));
        let ctx = io.driver_ctx;
        if ctx != 0 && io.status.is_success() {
            let len = io.num_blocks.saturating_mul(st.block_size);
            corrupt(&mut io.buf, len, ctx >> 8, ctx as u8);
        }
        let status = io.status;
        io.complete(status);
    }
}

// ---------------------------------------------------------------------------
// Create / delete / inject

/// Create and register `EE_<base_name>`. On failure nothing is left
/// behind: no bdev, no descriptor, no claim.
pub fn create(base_name: &str, uuid: Option<Uuid>) -> Result<Arc<Bdev>, BdevError> {
    let name = format!("{NAME_PREFIX}{base_name}");
    stacked::create(&name, base_name, MODULE_NAME, |base| {
        let builder = base.builder(&name, PRODUCT_NAME).uuid(uuid);
        let ops = ErrorBdev {
            base,
            uuid,
            inj: Arc::default(),
        };
        (builder, ops)
    })
}

/// Arm (or with `clear`, disarm) injections on error bdev `p.name`.
/// -EINVAL for a zero `corrupt_value` with `corrupt_data` (XOR 0 would not
/// corrupt anything) or an NVMe status that does not fit; -ENODEV if the
/// bdev is missing or not an error bdev.
pub fn inject_error(p: &InjectParams) -> Result<(), BdevError> {
    if p.error_type == ErrorType::CorruptData && p.corrupt_value == 0 {
        return Err(BdevError::Invalid(
            "corrupt_value should be non-zero".into(),
        ));
    }
    let (sct, sc) = match (u8::try_from(p.nvme_sct), u8::try_from(p.nvme_sc)) {
        (Ok(sct), Ok(sc)) if sct <= 7 => (sct, sc),
        _ if p.error_type != ErrorType::NvmeFailure => (0, 0),
        _ => {
            return Err(BdevError::Invalid(
                "nvme_sct must be 0..7 and nvme_sc 0..255".into(),
            ))
        }
    };
    let b = crate::get(&p.name)
        .filter(|b| !b.is_removing())
        .ok_or_else(|| BdevError::NotFound(p.name.clone()))?;
    let e = b
        .ops_as::<ErrorBdev>()
        .ok_or_else(|| BdevError::NotFound(p.name.clone()))?;
    let slots = &e.inj.0;
    match p.io_type {
        InjectIoType::Clear => slots.iter().for_each(|s| s.num.store(0, Ordering::Release)),
        InjectIoType::All => slots.iter().for_each(|s| s.arm(p, sct, sc)),
        InjectIoType::Read => slots[0].arm(p, sct, sc),
        InjectIoType::Write => slots[1].arm(p, sct, sc),
        InjectIoType::Unmap => slots[2].arm(p, sct, sc),
        InjectIoType::Flush => slots[3].arm(p, sct, sc),
    }
    tracing::info!(bdev = %p.name, io_type = ?p.io_type, error_type = ?p.error_type, num = p.num, "error injection set");
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    pub base_name: String,
    pub uuid: Option<Uuid>,
}

pub fn register_methods() {
    // The error bdev's RPCs answer decode failures with -32602 (contract §1.4).
    register_action(
        "bdev_error_create",
        DecodeError::ErrorBdev,
        |p: CreateParams| async move { create(&p.base_name, p.uuid).map(drop) },
    );
    register_delete("bdev_error_delete", MODULE_NAME, DecodeError::ErrorBdev);
    register_action(
        "bdev_error_inject_error",
        DecodeError::ErrorBdev,
        |p: InjectParams| async move { inject_error(&p) },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{
        delete_errno, mk as mk_malloc, on_reactor, open_ch, pattern, rpc_steps, two_cores,
    };
    use crate::util::{self, run_on_reactor};
    use crate::ClaimType;
    use ::rpc::RpcError;
    use std::time::Duration;

    /// A 64-block malloc `base`, `EE_<base>` on it, and a writable
    /// descriptor and channel of that.
    fn error_on(base: &str) -> (crate::Desc, IoChannel) {
        mk_malloc(base, 64);
        create(base, None).unwrap();
        open_ch(&format!("{NAME_PREFIX}{base}"), true)
    }

    fn inject(name: &str, io_type: InjectIoType, error_type: ErrorType, num: u32) -> InjectParams {
        InjectParams::new(name, io_type, error_type, num)
    }

    #[test]
    fn create_naming_info_and_delete() {
        run_on_reactor(0x1, || async {
            let base = mk_malloc("EM0", 64);
            let e = create("EM0", None).unwrap();
            assert_eq!(e.name(), "EE_EM0");
            assert_eq!(e.product_name(), PRODUCT_NAME);
            assert_eq!((e.block_size(), e.num_blocks()), (512, 64));
            assert_eq!(base.claim_type(), Some(ClaimType::ExclusiveWrite));
            assert_eq!(
                e.ops().dump_info_json(&e),
                json!({"error_disk": {"base_bdev": "EM0"}})
            );
            assert_eq!(
                e.ops().write_config_json(&e),
                Some(json!({"method": "bdev_error_create", "params": {"base_name": "EM0"}}))
            );
            assert_eq!(create("EM0", None).unwrap_err().errno(), libc::EEXIST);
            assert_eq!(create("missing", None).unwrap_err().errno(), libc::ENODEV);
            // Claimed base (by another module): -EPERM, as SPDK's open.
            let base2 = mk_malloc("EM0b", 8);
            let mut holder = crate::open("EM0b", false, |_| {}).unwrap();
            holder.claim(ClaimType::ExclusiveWrite, "other").unwrap();
            assert_eq!(create("EM0b", None).unwrap_err().errno(), libc::EPERM);
            assert!(crate::get("EE_EM0b").is_none());
            assert_eq!(base2.claim_module().as_deref(), Some("other"));
            drop(holder);

            let u = Uuid::new_v4();
            let e2 = create("EM0b", Some(u)).unwrap();
            assert_eq!(e2.uuid(), u);
            assert_eq!(
                e2.ops().write_config_json(&e2).unwrap()["params"],
                json!({"base_name": "EM0b", "uuid": u.to_string()})
            );

            assert_eq!(delete_errno("EM0", MODULE_NAME).await, libc::ENODEV);
            crate::unregister_by_name("EE_EM0", MODULE_NAME)
                .await
                .unwrap();
            assert!(crate::get("EE_EM0").is_none());
            assert_eq!(base.claim_type(), None);
            // Hot-remove of the base takes the error bdev with it.
            crate::unregister("EM0b").await.unwrap();
            assert!(crate::get("EE_EM0b").is_none());
        });
    }

    #[test]
    fn failure_nvme_and_clear() {
        run_on_reactor(0x1, || async {
            let (_desc, ch) = error_on("EM1");
            inject_error(&inject("EE_EM1", InjectIoType::Read, ErrorType::Failure, 2)).unwrap();
            assert_eq!(util::read(&ch, 0, 1).await.unwrap_err(), IoStatus::Failed);
            // Writes are not armed.
            util::write(&ch, 0, pattern(512, 1), false).await.unwrap();
            assert_eq!(util::read(&ch, 0, 1).await.unwrap_err(), IoStatus::Failed);
            // num used up.
            assert_eq!(
                util::read(&ch, 0, 1).await.unwrap().as_slice(),
                pattern(512, 1).as_slice()
            );

            let mut p = inject("EE_EM1", InjectIoType::Write, ErrorType::NvmeFailure, 1);
            p.nvme_sct = 1;
            p.nvme_sc = 0x81;
            inject_error(&p).unwrap();
            assert_eq!(
                util::write(&ch, 0, pattern(512, 2), false)
                    .await
                    .unwrap_err(),
                IoStatus::NvmeError { sct: 1, sc: 0x81 }
            );

            inject_error(&inject(
                "EE_EM1",
                InjectIoType::All,
                ErrorType::Failure,
                100,
            ))
            .unwrap();
            for t in [IoType::Unmap, IoType::Flush] {
                let r = util::simple(&ch, t, 0, 1).await;
                assert_eq!(r, Err(IoStatus::Failed), "{t:?}");
            }
            // Write zeroes is never injected (as SPDK).
            util::simple(&ch, IoType::WriteZeroes, 1, 1).await.unwrap();
            inject_error(&inject(
                "EE_EM1",
                InjectIoType::Clear,
                ErrorType::Failure,
                0,
            ))
            .unwrap();
            util::read(&ch, 0, 1).await.unwrap();
            util::write(&ch, 0, pattern(512, 3), false).await.unwrap();
            util::simple(&ch, IoType::Unmap, 0, 1).await.unwrap();

            // num = 0 arms nothing.
            inject_error(&inject("EE_EM1", InjectIoType::Read, ErrorType::Failure, 0)).unwrap();
            util::read(&ch, 0, 1).await.unwrap();
        });
    }

    #[test]
    fn nomem_is_retried_until_it_goes_through() {
        run_on_reactor(0x1, || async {
            let base = mk_malloc("EM2", 64);
            create("EM2", None).unwrap();
            let (_desc, ch) = open_ch("EE_EM2", true);
            inject_error(&inject("EE_EM2", InjectIoType::Write, ErrorType::NoMem, 3)).unwrap();
            util::write(&ch, 4, pattern(1024, 9), false).await.unwrap();
            let r = util::read(&ch, 4, 2).await.unwrap();
            assert_eq!(r.as_slice(), pattern(1024, 9).as_slice());
            let ee = crate::get("EE_EM2").unwrap();
            let eb = ee.ops_as::<ErrorBdev>().unwrap();
            assert_eq!(
                eb.inj.0[1].num.load(Ordering::SeqCst),
                0,
                "all three injections used"
            );
            // The retries happened in the generic layer: one write op.
            assert_eq!(ee.iostat().write.ops, 1);
            assert_eq!(base.iostat().write.ops, 1);
        });
    }

    #[test]
    fn corrupt_data_on_write_and_read() {
        run_on_reactor(0x1, || async {
            let (_desc, ch) = error_on("EM3");
            // The base stays readable through a read-only descriptor.
            let (_raw, raw_ch) = open_ch("EM3", false);

            let mut p = inject("EE_EM3", InjectIoType::Write, ErrorType::CorruptData, 1);
            p.corrupt_offset = 600;
            p.corrupt_value = 0xff;
            inject_error(&p).unwrap();
            let src = pattern(1024, 5);
            let mut expect = src.as_slice().to_vec();
            expect[600] ^= 0xff;
            util::write(&ch, 0, src, false).await.unwrap();
            assert_eq!(
                util::read(&raw_ch, 0, 2).await.unwrap().as_slice(),
                &expect[..]
            );

            // Reads: the base data stays intact, the returned copy is flipped.
            util::write(&ch, 8, pattern(512, 6), false).await.unwrap();
            p.io_type = InjectIoType::Read;
            p.corrupt_offset = 3;
            p.corrupt_value = 0x0f;
            inject_error(&p).unwrap();
            let mut expect = pattern(512, 6).as_slice().to_vec();
            expect[3] ^= 0x0f;
            assert_eq!(util::read(&ch, 8, 1).await.unwrap().as_slice(), &expect[..]);
            assert_eq!(
                util::read(&ch, 8, 1).await.unwrap().as_slice(),
                pattern(512, 6).as_slice()
            );

            // XOR with 0 corrupts nothing: rejected.
            p.corrupt_value = 0;
            assert_eq!(inject_error(&p).unwrap_err().errno(), libc::EINVAL);
        });
    }

    #[test]
    fn pending_until_reset() {
        let (before_reset, status, after) = run_on_reactor(0x1, || async {
            let (_desc, ch) = error_on("EM4");
            inject_error(&inject("EE_EM4", InjectIoType::Read, ErrorType::Pending, 1)).unwrap();
            let done: Rc<Cell<Option<IoStatus>>> = Rc::new(Cell::new(None));
            let d2 = done.clone();
            ch.read(0, 1, DmaBuf::new(512), move |io| d2.set(Some(io.status)));
            reactor::sleep(Duration::from_millis(20)).await;
            let before_reset = done.get();
            util::simple(&ch, IoType::Reset, 0, 0).await.unwrap();
            let after = util::read(&ch, 0, 1).await.is_ok();
            (before_reset, done.get(), after)
        });
        assert_eq!(before_reset, None, "pending I/O completed before the reset");
        assert_eq!(status, Some(IoStatus::Failed));
        assert!(after);
    }

    #[test]
    fn pending_io_is_failed_at_delete() {
        let status = run_on_reactor(0x1, || async {
            let (desc, ch) = error_on("EM5");
            inject_error(&inject(
                "EE_EM5",
                InjectIoType::Write,
                ErrorType::Pending,
                1,
            ))
            .unwrap();
            let io = util::submit(&ch, IoType::Write, 0, 1, Some(DmaBuf::new(512)), false);
            drop(ch);
            drop(desc);
            crate::unregister_by_name("EE_EM5", MODULE_NAME)
                .await
                .unwrap();
            io.await.status
        });
        assert_eq!(status, IoStatus::Failed);
    }

    #[test]
    fn queue_depth_gates_injection() {
        let statuses = run_on_reactor(0x1, || async {
            let (_desc, ch) = error_on("EM6");
            let mut p = inject("EE_EM6", InjectIoType::Read, ErrorType::Failure, 1);
            p.queue_depth = 2;
            inject_error(&p).unwrap();
            // Alone, a read never reaches depth 2.
            util::read(&ch, 0, 1).await.unwrap();
            // Three at once: the third sees two in flight at the base.
            let f: Vec<_> = (0..3)
                .map(|i| util::submit(&ch, IoType::Read, i, 1, Some(DmaBuf::new(512)), false))
                .collect();
            let mut out = Vec::new();
            for x in f {
                out.push(x.await.status);
            }
            out
        });
        assert_eq!(
            statuses,
            vec![IoStatus::Success, IoStatus::Success, IoStatus::Failed]
        );
    }

    #[test]
    fn rpc_methods_end_to_end() {
        run_on_reactor(0x1, || async {
            register_methods();
            mk_malloc("ER0", 64);
            let decode = Err(RpcError::invalid_params("spdk_json_decode_object failed"));
            let enodev = Err(RpcError::errno(libc::ENODEV));
            let inj = |name: &str, error_type: &str| json!({"name": name, "io_type": "read", "error_type": error_type, "num": 1});
            rpc_steps(vec![(
                "bdev_error_create",
                json!({"base_name": "ER0"}),
                Ok(json!(true)),
            )])
            .await;
            assert!(crate::get("EE_ER0").is_some());
            rpc_steps(vec![
                (
                    "bdev_error_create",
                    json!({"base_name": "ER0"}),
                    Err(RpcError::errno(libc::EEXIST)),
                ),
                (
                    "bdev_error_create",
                    json!({"base_name": "nope"}),
                    enodev.clone(),
                ),
                ("bdev_error_create", json!({"name": "ER0"}), decode.clone()),
                (
                    "bdev_error_inject_error",
                    inj("EE_ER0", "failure"),
                    Ok(json!(true)),
                ),
                (
                    "bdev_error_inject_error",
                    inj("EE_ER0", "boom"),
                    decode.clone(),
                ),
                (
                    "bdev_error_inject_error",
                    inj("EE_ER0", "corrupt_data"),
                    Err(RpcError::errno_msg(
                        libc::EINVAL,
                        "Invalid argument: corrupt_value should be non-zero",
                    )),
                ),
                (
                    "bdev_error_inject_error",
                    json!({"name": "ER0", "io_type": "clear", "error_type": "failure"}),
                    enodev.clone(),
                ),
                ("bdev_error_delete", json!({"nam": "x"}), decode),
                ("bdev_error_delete", json!({"name": "ER0"}), enodev),
                (
                    "bdev_error_delete",
                    json!({"name": "EE_ER0"}),
                    Ok(json!(true)),
                ),
            ])
            .await;
            assert!(crate::get("EE_ER0").is_none());
        });
    }

    #[test]
    fn reset_fails_pending_on_other_reactors() {
        if !two_cores() {
            return;
        }
        let status = run_on_reactor(0x3, || async {
            mk_malloc("EM9", 64);
            create("EM9", None).unwrap();
            let desc = Arc::new(crate::open("EE_EM9", true, |_| {}).unwrap());
            inject_error(&inject(
                "EE_EM9",
                InjectIoType::Write,
                ErrorType::Pending,
                1,
            ))
            .unwrap();
            let held = on_reactor(1, &desc, |ch| async move {
                util::write(&ch, 0, DmaBuf::new(512), false).await
            });
            let mut held = std::pin::pin!(held.recv());
            let early = reactor::with_timeout(Duration::from_millis(20), held.as_mut()).await;
            assert!(early.is_none(), "pending write completed early");
            let ch = desc.channel();
            util::simple(&ch, IoType::Reset, 0, 0).await.unwrap();
            held.await
        });
        assert_eq!(status, Err(IoStatus::Failed));
    }

    #[test]
    fn inject_errors_and_decoding() {
        run_on_reactor(0x1, || async {
            mk_malloc("EM7", 8);
            create("EM7", None).unwrap();
            let p = inject("EM7", InjectIoType::Read, ErrorType::Failure, 1);
            assert_eq!(
                inject_error(&p).unwrap_err().errno(),
                libc::ENODEV,
                "not an error bdev"
            );
            let p = inject("nope", InjectIoType::Read, ErrorType::Failure, 1);
            assert_eq!(inject_error(&p).unwrap_err().errno(), libc::ENODEV);
            let mut p = inject("EE_EM7", InjectIoType::Read, ErrorType::NvmeFailure, 1);
            p.nvme_sc = 256;
            assert_eq!(inject_error(&p).unwrap_err().errno(), libc::EINVAL);
        });
        let p: InjectParams = serde_json::from_value(
            json!({"name": "EE_x", "io_type": "all", "error_type": "nomem"}),
        )
        .unwrap();
        assert_eq!(
            (p.num, p.queue_depth, p.io_type, p.error_type),
            (1, 0, InjectIoType::All, ErrorType::NoMem)
        );
        for bad in [
            json!({"name": "x", "io_type": "write_zeroes", "error_type": "failure"}),
            json!({"name": "x", "io_type": "read", "error_type": "bogus"}),
            json!({"name": "x", "io_type": "read", "error_type": "corrupt_data", "corrupt_value": 256}),
            json!({"name": "x", "io_type": "read"}),
            json!({"name": "x", "io_type": "read", "error_type": "failure", "extra": 1}),
        ] {
            assert!(
                serde_json::from_value::<InjectParams>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            RpcError::from(DecodeError::ErrorBdev),
            RpcError::new(-32602, "spdk_json_decode_object failed")
        );
        assert!(serde_json::from_value::<CreateParams>(json!({"base_name": "M"})).is_ok());
        assert!(serde_json::from_value::<CreateParams>(json!({"name": "M"})).is_err());
    }
}
