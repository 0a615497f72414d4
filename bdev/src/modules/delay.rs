//! `delay`: a stacked bdev that holds each I/O's completion back by a
//! configurable latency (SPDK `module/bdev/delay`).
//!
//! * Create opens and claims (exclusive write) a base bdev and registers a
//!   bdev of the same geometry on top; removing the base removes it too.
//! * Every I/O goes to the base at once, in place (the shared stacked-bdev
//!   helper, `crate::stacked`: no child I/O). Its completion is held in a
//!   per-channel queue until `submit time + latency` (reads use the read
//!   latencies; writes, unmap, write_zeroes and flush the write latencies;
//!   every 100th I/O of a channel gets the p99 latency instead of the
//!   average). Queues are FIFO per latency class, as in SPDK: lowering a
//!   latency at runtime does not let new I/O overtake held I/O.
//! * A channel drains its queues from one armed reactor timer, not an
//!   every-iteration poller, so reactors in interrupt mode wake up for it.
//! * Reset completes every held I/O (on every reactor) as aborted, then
//!   resets the base.
//! * Zero latencies hold nothing: the completion passes straight up unless
//!   I/O of its class is still held ahead of it (FIFO).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::rpc::{DecodeError, RpcError};
use reactor::TimerId;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::rpc::{register_action, register_create, register_delete};
use crate::stacked::{self, Base};
use crate::{Bdev, BdevError, BdevIo, BdevOps, BoxFuture, ChannelOps, IoChannel, IoStatus, IoType};

pub const MODULE_NAME: &str = "delay";
pub const PRODUCT_NAME: &str = "delay";

/// SPDK's `BDEV_DELAY_NAMESPACE_UUID`: a delay bdev created without a uuid
/// gets UUIDv5(namespace, base uuid), so it is stable across restarts.
const NAMESPACE_UUID: Uuid = Uuid::from_u128(0x4009b574_6430_4f1b_bc40_ace811091027);

/// Longest single timer we arm; a longer hold re-arms when it fires. Keeps
/// the reactor's `now + delay` arithmetic far from overflow for absurd
/// latencies (they are u64 microseconds from the outside).
const MAX_TIMER: Duration = Duration::from_secs(3600);

/// Deadlines travel in `driver_ctx` beside the 2-bit latency class.
const MAX_DEADLINE: u64 = u64::MAX >> 2;

/// Errors of `bdev_delay_update_latency`, each with SPDK's reply.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DelayError {
    #[error("unknown latency type '{0}'")]
    UnknownLatencyType(String),
    #[error("delay bdev '{0}' does not exist")]
    NotFound(String),
    #[error("bdev '{0}' is not a delay bdev")]
    NotDelay(String),
}

impl From<DelayError> for RpcError {
    fn from(e: DelayError) -> Self {
        tracing::debug!(error = %e, "bdev_delay_update_latency failed");
        // vbdev_delay_rpc.c answers these two with -32602 and fixed texts.
        match e {
            DelayError::UnknownLatencyType(_) => {
                RpcError::invalid_params("Please specify a valid latency type.")
            }
            DelayError::NotFound(_) => {
                RpcError::invalid_params("The requested bdev does not exist.")
            }
            DelayError::NotDelay(_) => {
                RpcError::new(-32600, "The requested bdev is not a delay bdev.")
            }
        }
    }
}

/// The four latencies, as SPDK's `latency_type` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LatencyType {
    AvgRead,
    P99Read,
    AvgWrite,
    P99Write,
}

impl LatencyType {
    pub fn parse(s: &str) -> Option<LatencyType> {
        match s {
            "avg_read" => Some(LatencyType::AvgRead),
            "p99_read" => Some(LatencyType::P99Read),
            "avg_write" => Some(LatencyType::AvgWrite),
            "p99_write" => Some(LatencyType::P99Write),
            _ => None,
        }
    }

    fn idx(self) -> usize {
        self as usize
    }

    const ALL: [LatencyType; 4] = [
        LatencyType::AvgRead,
        LatencyType::P99Read,
        LatencyType::AvgWrite,
        LatencyType::P99Write,
    ];
}

/// Latencies in microseconds, shared by the bdev and all its channels and
/// updated at runtime without locks.
#[derive(Default)]
struct Latencies([AtomicU64; 4]);

impl Latencies {
    fn get(&self, t: LatencyType) -> u64 {
        self.0[t.idx()].load(Ordering::Relaxed)
    }
    fn set(&self, t: LatencyType, us: u64) {
        self.0[t.idx()].store(us, Ordering::Relaxed)
    }
}

/// Per-bdev state of a delay bdev.
pub struct DelayBdev {
    base: Base,
    lat: Arc<Latencies>,
}

impl DelayBdev {
    pub fn base_bdev_name(&self) -> &str {
        self.base.name()
    }

    pub fn latency_us(&self, t: LatencyType) -> u64 {
        self.lat.get(t)
    }

    /// `driver_specific.delay` and the `bdev_delay_create` params share one
    /// writer, as SPDK's `_delay_write_conf_values`.
    fn conf_values(&self, b: &Bdev) -> Value {
        json!({
            "name": b.name(),
            "base_bdev_name": self.base.name(),
            "uuid": b.uuid().to_string(),
            "avg_read_latency": self.lat.get(LatencyType::AvgRead),
            "p99_read_latency": self.lat.get(LatencyType::P99Read),
            "avg_write_latency": self.lat.get(LatencyType::AvgWrite),
            "p99_write_latency": self.lat.get(LatencyType::P99Write),
        })
    }
}

impl BdevOps for DelayBdev {
    fn module_name(&self) -> &'static str {
        MODULE_NAME
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        self.base.io_type_supported(t)
    }

    fn create_channel(&self, _bdev: &Arc<Bdev>) -> Box<dyn ChannelOps> {
        let st = Rc::new(DelayChan {
            base: self.base.channel(),
            lat: self.lat.clone(),
            queues: Default::default(),
            seq: Cell::new(0),
            timer: Cell::new(None),
        });
        Box::new(DelayChannel(st))
    }

    fn dump_info_json(&self, b: &Bdev) -> Value {
        json!({ "delay": self.conf_values(b) })
    }

    fn write_config_json(&self, b: &Bdev) -> Option<Value> {
        Some(json!({ "method": "bdev_delay_create", "params": self.conf_values(b) }))
    }

    fn destruct(&self, _bdev: &Arc<Bdev>) -> BoxFuture {
        // Closing the descriptor releases the claim on the base.
        let desc = self.base.close();
        Box::pin(async move { drop(desc) })
    }
}

/// A completed base I/O waiting for its deadline.
struct Held {
    deadline: u64,
    status: IoStatus,
    io: Box<BdevIo>,
}

/// Per-reactor state of one delay bdev.
struct DelayChan {
    /// `None` only if the channel was made after destruct (no base left).
    base: Option<IoChannel>,
    lat: Arc<Latencies>,
    /// One FIFO per [`LatencyType`].
    queues: [RefCell<VecDeque<Held>>; 4],
    /// I/O counter choosing the p99 latency deterministically (1 in 100).
    seq: Cell<u64>,
    /// The armed drain timer and the time it fires.
    timer: Cell<Option<(TimerId, u64)>>,
}

impl DelayChan {
    fn hold(self: &Rc<Self>, class: LatencyType, h: Held) {
        self.queues[class.idx()].borrow_mut().push_back(h);
        self.drain();
    }

    /// Complete every held I/O whose deadline passed (head of each FIFO
    /// only), then arm the timer for the earliest remaining head.
    fn drain(self: &Rc<Self>) {
        let now = reactor::now_ns();
        for q in &self.queues {
            loop {
                // No borrow across complete(): the callback may submit again.
                let h = {
                    let mut q = q.borrow_mut();
                    match q.front() {
                        Some(h) if h.deadline <= now => q.pop_front(),
                        _ => None,
                    }
                };
                match h {
                    Some(h) => h.io.complete(h.status),
                    None => break,
                }
            }
        }
        self.arm(now);
    }

    fn arm(self: &Rc<Self>, now: u64) {
        let next = self
            .queues
            .iter()
            .filter_map(|q| q.borrow().front().map(|h| h.deadline))
            .min();
        let Some(next) = next else { return };
        if let Some((id, at)) = self.timer.get() {
            if at <= next {
                return;
            }
            reactor::cancel_timer(id);
        }
        let delay = Duration::from_nanos(next.saturating_sub(now)).min(MAX_TIMER);
        let weak = Rc::downgrade(self);
        let id = reactor::set_timer(delay, move || {
            if let Some(st) = weak.upgrade() {
                st.timer.set(None);
                st.drain();
            }
        });
        self.timer
            .set(Some((id, now.saturating_add(delay.as_nanos() as u64))));
    }

    /// Complete everything held in this channel, regardless of deadlines.
    fn abort_all(&self, status: IoStatus) {
        for q in &self.queues {
            loop {
                let h = q.borrow_mut().pop_front();
                match h {
                    Some(h) => h.io.complete(status),
                    None => break,
                }
            }
        }
    }
}

/// The `ChannelOps` half (what `for_each_channel` hands back).
struct DelayChannel(Rc<DelayChan>);

impl ChannelOps for DelayChannel {
    fn submit(&self, mut io: Box<BdevIo>) {
        let st = &self.0;
        let Some(base) = &st.base else {
            return io.complete(IoStatus::Failed);
        };
        if io.io_type == IoType::Reset {
            return stacked::reset(io, st.base.clone(), |bdev| async move {
                abort_everywhere(&bdev).await
            });
        }
        let n = st.seq.get();
        st.seq.set(n.wrapping_add(1));
        let p99 = n % 100 == 99;
        let class = match (io.io_type == IoType::Read, p99) {
            (true, false) => LatencyType::AvgRead,
            (true, true) => LatencyType::P99Read,
            (false, false) => LatencyType::AvgWrite,
            (false, true) => LatencyType::P99Write,
        };
        let lat_ns = st.lat.get(class).saturating_mul(1000);
        // The exact clock, so that no I/O is held less than its latency;
        // none at all for a zero latency.
        let deadline = if lat_ns == 0 {
            0
        } else {
            reactor::now_ns().saturating_add(lat_ns).min(MAX_DEADLINE)
        };
        io.driver_ctx = deadline << 2 | class.idx() as u64;
        base.forward_hooked(io);
    }

    fn forward_done(&self, io: Box<BdevIo>) {
        let st = &self.0;
        let class = LatencyType::ALL[(io.driver_ctx & 3) as usize];
        let deadline = io.driver_ctx >> 2;
        let status = io.status;
        if deadline == 0 && st.queues[class.idx()].borrow().is_empty() {
            return io.complete(status);
        }
        st.hold(
            class,
            Held {
                deadline,
                status,
                io,
            },
        );
    }
}

/// Complete everything held by `bdev` on every reactor as aborted.
async fn abort_everywhere(bdev: &Arc<Bdev>) {
    crate::for_each_channel(bdev, |ch: &DelayChannel| ch.0.abort_all(IoStatus::Aborted)).await
}

// ---------------------------------------------------------------------------
// Create / delete / update

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    pub name: String,
    pub base_bdev_name: String,
    pub avg_read_latency: u64,
    pub p99_read_latency: u64,
    pub avg_write_latency: u64,
    pub p99_write_latency: u64,
    pub uuid: Option<Uuid>,
}

/// Create and register a delay bdev on `base_bdev_name`. On failure nothing
/// is left behind: no bdev, no descriptor, no claim.
pub fn create(p: CreateParams) -> Result<Arc<Bdev>, BdevError> {
    if p.p99_read_latency < p.avg_read_latency || p.p99_write_latency < p.avg_write_latency {
        return Err(BdevError::Invalid(
            "p99 latency must be greater than or equal to the average latency".into(),
        ));
    }
    let lat = Arc::new(Latencies::default());
    lat.set(LatencyType::AvgRead, p.avg_read_latency);
    lat.set(LatencyType::P99Read, p.p99_read_latency);
    lat.set(LatencyType::AvgWrite, p.avg_write_latency);
    lat.set(LatencyType::P99Write, p.p99_write_latency);
    stacked::create(&p.name, &p.base_bdev_name, MODULE_NAME, |base| {
        let uuid = p
            .uuid
            .unwrap_or_else(|| Uuid::new_v5(&NAMESPACE_UUID, base.bdev().uuid().as_bytes()));
        let builder = base.builder(&p.name, PRODUCT_NAME).uuid(Some(uuid));
        (builder, DelayBdev { base, lat })
    })
}

/// Set one latency of a running delay bdev. Like SPDK, a p99 below the
/// average is accepted here (scripts raise avg before p99); held I/O keeps
/// its deadline.
pub fn update_latency(name: &str, latency_type: &str, latency_us: u64) -> Result<(), DelayError> {
    let t = LatencyType::parse(latency_type)
        .ok_or_else(|| DelayError::UnknownLatencyType(latency_type.to_string()))?;
    let b = crate::get(name)
        .filter(|b| b.name() == name)
        .ok_or_else(|| DelayError::NotFound(name.to_string()))?;
    let d = b
        .ops_as::<DelayBdev>()
        .ok_or_else(|| DelayError::NotDelay(name.to_string()))?;
    d.lat.set(t, latency_us);
    tracing::info!(
        bdev = name,
        latency_type,
        latency_us,
        "delay latency updated"
    );
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateLatencyParams {
    delay_bdev_name: String,
    latency_type: String,
    latency_us: u64,
}

pub fn register_methods() {
    register_create("bdev_delay_create", DecodeError::Internal, create);
    register_delete("bdev_delay_delete", MODULE_NAME, DecodeError::Internal);
    register_action(
        "bdev_delay_update_latency",
        DecodeError::Internal,
        |p: UpdateLatencyParams| async move {
            update_latency(&p.delay_bdev_name, &p.latency_type, p.latency_us)
        },
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
    use reactor::DmaBuf;

    fn params(name: &str, base: &str, read_us: u64, write_us: u64) -> CreateParams {
        CreateParams {
            name: name.into(),
            base_bdev_name: base.into(),
            avg_read_latency: read_us,
            p99_read_latency: read_us,
            avg_write_latency: write_us,
            p99_write_latency: write_us,
            uuid: None,
        }
    }

    /// A 64-block malloc `base` and delay bdev `name` on it with `us` of
    /// latency for every I/O, and a descriptor and channel of that.
    fn delay_on(name: &str, base: &str, us: u64, write: bool) -> (crate::Desc, IoChannel) {
        mk_malloc(base, 64);
        create(params(name, base, us, us)).unwrap();
        open_ch(name, write)
    }

    #[test]
    fn adds_latency_and_passes_data() {
        let (w_ns, r_ns, ok) = run_on_reactor(0x1, || async {
            let base = mk_malloc("DM0", 256);
            let d = create(params("D0", "DM0", 2_000, 3_000)).unwrap();
            assert_eq!(d.product_name(), "delay");
            assert_eq!(d.block_size(), base.block_size());
            assert_eq!(d.num_blocks(), base.num_blocks());
            assert_eq!(base.claim_type(), Some(ClaimType::ExclusiveWrite));
            let (_desc, ch) = open_ch("D0", true);
            let w = pattern(4096, 3);
            let expect = w.as_slice().to_vec();
            let t0 = reactor::now_ns();
            util::write(&ch, 10, w, false).await.unwrap();
            let w_ns = reactor::now_ns() - t0;
            let t1 = reactor::now_ns();
            let r = util::read(&ch, 10, 8).await.unwrap();
            let r_ns = reactor::now_ns() - t1;
            // Unmap, write_zeroes and flush go through too.
            util::simple(&ch, IoType::Unmap, 0, 1).await.unwrap();
            util::simple(&ch, IoType::WriteZeroes, 1, 1).await.unwrap();
            util::simple(&ch, IoType::Flush, 0, 256).await.unwrap();
            (w_ns, r_ns, r.as_slice() == &expect[..])
        });
        assert!(ok, "data passes through the delay bdev intact");
        assert!(w_ns >= 3_000_000, "write took only {w_ns} ns");
        assert!(r_ns >= 2_000_000, "read took only {r_ns} ns");
    }

    #[test]
    fn update_latency_takes_effect() {
        let (before, after) = run_on_reactor(0x1, || async {
            let (_desc, ch) = delay_on("D1", "DM1", 0, false);
            let t0 = reactor::now_ns();
            util::read(&ch, 0, 1).await.unwrap();
            let before = reactor::now_ns() - t0;
            // p99 below avg is accepted on update, as in SPDK.
            update_latency("D1", "avg_read", 20_000).unwrap();
            update_latency("D1", "p99_read", 20_000).unwrap();
            let dd = crate::get("D1").unwrap();
            assert_eq!(
                dd.ops_as::<DelayBdev>()
                    .unwrap()
                    .latency_us(LatencyType::AvgRead),
                20_000
            );
            let t1 = reactor::now_ns();
            util::read(&ch, 0, 1).await.unwrap();
            let after = reactor::now_ns() - t1;

            assert_eq!(
                update_latency("D1", "avg_bogus", 1),
                Err(DelayError::UnknownLatencyType("avg_bogus".into()))
            );
            assert_eq!(
                update_latency("nope", "avg_read", 1),
                Err(DelayError::NotFound("nope".into()))
            );
            // A bdev of another module is not a delay bdev.
            assert_eq!(
                update_latency("DM1", "avg_read", 1),
                Err(DelayError::NotDelay("DM1".into()))
            );
            let e = RpcError::from(DelayError::NotDelay("DM1".into()));
            assert_eq!(
                (e.code, e.message.as_str()),
                (-32600, "The requested bdev is not a delay bdev.")
            );
            let e = RpcError::from(DelayError::UnknownLatencyType("x".into()));
            assert_eq!(
                (e.code, e.message.as_str()),
                (-32602, "Please specify a valid latency type.")
            );
            let e = RpcError::from(DelayError::NotFound("x".into()));
            assert_eq!(
                (e.code, e.message.as_str()),
                (-32602, "The requested bdev does not exist.")
            );
            (before, after)
        });
        assert!(
            after >= 20_000_000,
            "updated latency not applied: {after} ns"
        );
        assert!(before < after);
    }

    #[test]
    fn p99_applies_to_one_in_a_hundred() {
        let slow = run_on_reactor(0x1, || async {
            mk_malloc("DM2", 64);
            let mut p = params("D2", "DM2", 0, 0);
            p.p99_read_latency = 5_000;
            create(p).unwrap();
            let (_desc, ch) = open_ch("D2", false);
            let mut slow = 0;
            for _ in 0..200 {
                let t0 = reactor::now_ns();
                util::read(&ch, 0, 1).await.unwrap();
                if reactor::now_ns() - t0 >= 5_000_000 {
                    slow += 1;
                }
            }
            slow
        });
        assert!(
            slow >= 2,
            "expected the p99 latency on 2 of 200 reads, saw {slow}"
        );
    }

    #[test]
    fn create_errors_leave_nothing_behind() {
        run_on_reactor(0x1, || async {
            let base = mk_malloc("DM3", 64);
            let e = create(CreateParams {
                p99_write_latency: 1,
                avg_write_latency: 2,
                ..params("D3", "DM3", 0, 0)
            })
            .unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL);
            assert_eq!(
                create(params("D3", "missing", 0, 0)).unwrap_err().errno(),
                libc::ENODEV
            );
            assert_eq!(
                create(params("DM3", "DM3", 0, 0)).unwrap_err().errno(),
                libc::EEXIST
            );
            assert_eq!(base.claim_type(), None, "failed creates released the base");

            // Someone else writing to the base: the exclusive claim fails -EBUSY.
            let writer = crate::open("DM3", true, |_| {}).unwrap();
            assert_eq!(
                create(params("D3", "DM3", 0, 0)).unwrap_err().errno(),
                libc::EBUSY
            );
            assert!(crate::get("D3").is_none());
            assert_eq!(base.claim_type(), None);
            drop(writer);

            create(params("D3", "DM3", 0, 0)).unwrap();
            // A claimed base refuses the second writer: -EPERM, as SPDK's
            // spdk_bdev_open_ext(write=true) on a claimed bdev.
            assert_eq!(
                create(params("D3b", "DM3", 0, 0)).unwrap_err().errno(),
                libc::EPERM
            );
            assert!(crate::get("D3b").is_none());
            assert_eq!(base.claim_module().as_deref(), Some("delay"));

            // Delete: only delay bdevs, -19 otherwise.
            assert_eq!(delete_errno("DM3", MODULE_NAME).await, libc::ENODEV);
            crate::unregister_by_name("D3", MODULE_NAME).await.unwrap();
            assert!(crate::get("D3").is_none());
            assert_eq!(base.claim_type(), None, "delete released the claim");
            assert_eq!(delete_errno("D3", MODULE_NAME).await, libc::ENODEV);
        });
    }

    #[test]
    fn hot_remove_of_base_removes_delay() {
        run_on_reactor(0x1, || async {
            mk_malloc("DM4", 64);
            create(params("D4", "DM4", 100, 100)).unwrap();
            crate::unregister("DM4").await.unwrap();
            assert!(crate::get("DM4").is_none());
            // The delay bdev's unregister was spawned from the event; it
            // completed before the base's (which waited for our descriptor).
            assert!(crate::get("D4").is_none());
        });
    }

    #[test]
    fn reset_aborts_held_io() {
        let (status, reset_ns) = run_on_reactor(0x1, || async {
            let (_desc, ch) = delay_on("D5", "DM5", 10_000_000, true);
            let pending = util::submit(&ch, IoType::Read, 0, 1, Some(DmaBuf::new(512)), false);
            reactor::sleep(Duration::from_millis(5)).await;
            let t0 = reactor::now_ns();
            util::simple(&ch, IoType::Reset, 0, 0).await.unwrap();
            let io = pending.await;
            (io.status, reactor::now_ns() - t0)
        });
        assert_eq!(status, IoStatus::Aborted);
        assert!(reset_ns < 1_000_000_000, "reset waited for the held I/O");
    }

    #[test]
    fn info_and_config_json() {
        run_on_reactor(0x1, || async {
            let base = mk_malloc("DM6", 64);
            let u = Uuid::new_v4();
            let mut p = params("D6", "DM6", 10, 20);
            p.p99_read_latency = 11;
            p.p99_write_latency = 21;
            p.uuid = Some(u);
            let d = create(p).unwrap();
            assert_eq!(d.uuid(), u);
            let expect = json!({
                "name": "D6",
                "base_bdev_name": "DM6",
                "uuid": u.to_string(),
                "avg_read_latency": 10,
                "p99_read_latency": 11,
                "avg_write_latency": 20,
                "p99_write_latency": 21,
            });
            assert_eq!(d.ops().dump_info_json(&d), json!({ "delay": expect }));
            assert_eq!(
                d.ops().write_config_json(&d),
                Some(json!({"method": "bdev_delay_create", "params": expect}))
            );
            update_latency("D6", "p99_write", 99).unwrap();
            let c = d.ops().write_config_json(&d).unwrap();
            assert_eq!(c["params"]["p99_write_latency"], 99);
            // Replaying the saved params decodes strictly.
            let replay: CreateParams = serde_json::from_value(c["params"].clone()).unwrap();
            assert_eq!(replay.uuid, Some(u));

            // Without a uuid: derived from the base's, stable, as SPDK.
            let d7 = create(params("D7", "D6", 0, 0)).unwrap();
            assert_eq!(
                d7.uuid(),
                Uuid::new_v5(&NAMESPACE_UUID, d.uuid().as_bytes())
            );
            assert_ne!(d7.uuid(), base.uuid());
        });
    }

    #[test]
    fn rpc_methods_end_to_end() {
        run_on_reactor(0x1, || async {
            register_methods();
            mk_malloc("DR0", 64);
            let create = json!({"name": "DR", "base_bdev_name": "DR0", "avg_read_latency": 5,
                "p99_read_latency": 10, "avg_write_latency": 5, "p99_write_latency": 10});
            let mut bad = create.clone();
            bad["name"] = json!("DR1");
            bad["p99_read_latency"] = json!(1);
            let mut missing = create.clone();
            missing["name"] = json!("DR2");
            missing["base_bdev_name"] = json!("nope");
            let mut extra = create.clone();
            extra["bogus"] = json!(1);
            let upd = |n: &str, t: &str| json!({"delay_bdev_name": n, "latency_type": t, "latency_us": 7});
            let enodev = Err(RpcError::errno(libc::ENODEV));
            rpc_steps(vec![
                ("bdev_delay_create", create.clone(), Ok(json!("DR"))),
                ("bdev_delay_create", create, Err(RpcError::errno(libc::EEXIST))),
                (
                    "bdev_delay_create",
                    bad,
                    Err(RpcError::errno_msg(
                        libc::EINVAL,
                        "Invalid argument: p99 latency must be greater than or equal to the average latency",
                    )),
                ),
                ("bdev_delay_create", missing, enodev.clone()),
                ("bdev_delay_create", extra, Err(RpcError::decode_failed())),
                ("bdev_delay_update_latency", upd("DR", "p99_write"), Ok(json!(true))),
                (
                    "bdev_delay_update_latency",
                    upd("DR", "p50_write"),
                    Err(RpcError::invalid_params("Please specify a valid latency type.")),
                ),
                (
                    "bdev_delay_update_latency",
                    upd("DRx", "avg_read"),
                    Err(RpcError::invalid_params("The requested bdev does not exist.")),
                ),
            ])
            .await;
            let d = crate::get("DR").unwrap();
            assert_eq!(d.ops().dump_info_json(&d)["delay"]["p99_write_latency"], 7);
            rpc_steps(vec![
                ("bdev_delay_delete", json!({"name": "DR0"}), enodev.clone()),
                ("bdev_delay_delete", json!({"name": "DR"}), Ok(json!(true))),
                ("bdev_delay_delete", json!({"name": "DR"}), enodev),
            ])
            .await;
        });
    }

    #[test]
    fn reset_reaches_other_reactors() {
        if !two_cores() {
            return;
        }
        let status = run_on_reactor(0x3, || async {
            mk_malloc("DM8", 64);
            create(params("D8", "DM8", 10_000_000, 10_000_000)).unwrap();
            let desc = Arc::new(crate::open("D8", true, |_| {}).unwrap());
            // A read held on reactor 1 ...
            let held = on_reactor(1, &desc, |ch| async move {
                util::submit(&ch, IoType::Read, 0, 1, Some(DmaBuf::new(512)), false)
                    .await
                    .status
            });
            reactor::sleep(Duration::from_millis(20)).await;
            // ... is aborted by a reset submitted on reactor 0.
            let ch = desc.channel();
            util::simple(&ch, IoType::Reset, 0, 0).await.unwrap();
            held.recv().await
        });
        assert_eq!(status, IoStatus::Aborted);
    }

    #[test]
    fn params_decode_strictly() {
        let ok = json!({"name": "D", "base_bdev_name": "B", "avg_read_latency": 1,
            "p99_read_latency": 1, "avg_write_latency": 1, "p99_write_latency": 1});
        assert!(serde_json::from_value::<CreateParams>(ok.clone()).is_ok());
        let mut extra = ok.clone();
        extra["bogus"] = json!(1);
        assert!(serde_json::from_value::<CreateParams>(extra).is_err());
        let mut neg = ok.clone();
        neg["avg_read_latency"] = json!(-1);
        assert!(serde_json::from_value::<CreateParams>(neg).is_err());
        let mut missing = ok;
        missing.as_object_mut().unwrap().remove("p99_write_latency");
        assert!(serde_json::from_value::<CreateParams>(missing).is_err());
        assert!(serde_json::from_value::<UpdateLatencyParams>(
            json!({"delay_bdev_name": "D", "latency_type": "avg_read", "latency_us": 5})
        )
        .is_ok());
    }
}
