//! Per-channel I/O statistics, aggregated per bdev for `bdev_get_iostat`.
//! Each channel's counters have a single writer (its reactor), so updates
//! are plain relaxed load/store pairs: no contended atomics on the I/O path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

use crate::io::{IoStatus, IoType};

const NERR: usize = 5;
const ERR_NAMES: [&str; NERR] = ["failed", "nomem", "aborted", "miscompare", "nvme_error"];

#[derive(Default)]
struct OpStat {
    bytes: AtomicU64,
    ops: AtomicU64,
    lat_sum: AtomicU64,
    lat_max: AtomicU64,
    /// 0 = none yet.
    lat_min: AtomicU64,
}

#[derive(Default)]
pub(crate) struct IoStat {
    read: OpStat,
    write: OpStat,
    unmap: OpStat,
    errors: [AtomicU64; NERR],
    pub(crate) outstanding: AtomicU64,
    pub(crate) reactor: u32,
}

fn bump(a: &AtomicU64, v: u64) {
    a.store(a.load(Relaxed).wrapping_add(v), Relaxed);
}

impl IoStat {
    pub(crate) fn record(&self, ty: IoType, bytes: u64, status: IoStatus, lat_ns: u64) {
        let idx = match status {
            IoStatus::Success => None,
            IoStatus::Failed | IoStatus::Pending => Some(0),
            IoStatus::NoMem => Some(1),
            IoStatus::Aborted => Some(2),
            IoStatus::Miscompare => Some(3),
            IoStatus::NvmeError { .. } => Some(4),
        };
        if let Some(i) = idx {
            bump(&self.errors[i], 1);
            return;
        }
        let op = match ty {
            IoType::Read => &self.read,
            IoType::Write | IoType::WriteZeroes => &self.write,
            IoType::Unmap => &self.unmap,
            IoType::Flush | IoType::Reset => return,
        };
        bump(&op.bytes, bytes);
        bump(&op.ops, 1);
        bump(&op.lat_sum, lat_ns);
        if lat_ns > op.lat_max.load(Relaxed) {
            op.lat_max.store(lat_ns, Relaxed);
        }
        let min = op.lat_min.load(Relaxed);
        if min == 0 || lat_ns < min {
            op.lat_min.store(lat_ns.max(1), Relaxed);
        }
    }

    fn add_to(&self, s: &mut IoStatSnapshot) {
        let f = |o: &OpStat, d: &mut OpSnapshot| {
            d.bytes += o.bytes.load(Relaxed);
            d.ops += o.ops.load(Relaxed);
            d.latency_ticks += o.lat_sum.load(Relaxed);
            d.max_latency_ticks = d.max_latency_ticks.max(o.lat_max.load(Relaxed));
            let m = o.lat_min.load(Relaxed);
            if m != 0 && (d.min_latency_ticks == 0 || m < d.min_latency_ticks) {
                d.min_latency_ticks = m;
            }
        };
        f(&self.read, &mut s.read);
        f(&self.write, &mut s.write);
        f(&self.unmap, &mut s.unmap);
        for i in 0..NERR {
            s.errors[i] += self.errors[i].load(Relaxed);
        }
    }

    fn reset_maxmin(&self) {
        for o in [&self.read, &self.write, &self.unmap] {
            o.lat_max.store(0, Relaxed);
            o.lat_min.store(0, Relaxed);
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpSnapshot {
    pub bytes: u64,
    pub ops: u64,
    /// Sum of latencies in ticks (nanoseconds: tick_rate is 1e9).
    pub latency_ticks: u64,
    pub max_latency_ticks: u64,
    pub min_latency_ticks: u64,
}

/// Totals over every channel of a bdev.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoStatSnapshot {
    pub read: OpSnapshot,
    pub write: OpSnapshot,
    pub unmap: OpSnapshot,
    errors: [u64; NERR],
}

impl IoStatSnapshot {
    /// Non-zero error counts keyed by SPDK's status names.
    pub fn io_errors(&self) -> Vec<(&'static str, u64)> {
        ERR_NAMES
            .iter()
            .zip(self.errors.iter())
            .filter(|(_, &n)| n > 0)
            .map(|(k, &n)| (*k, n))
            .collect()
    }

    fn minus(mut self, b: &IoStatSnapshot) -> IoStatSnapshot {
        for (x, y) in [
            (&mut self.read, &b.read),
            (&mut self.write, &b.write),
            (&mut self.unmap, &b.unmap),
        ] {
            x.bytes = x.bytes.saturating_sub(y.bytes);
            x.ops = x.ops.saturating_sub(y.ops);
            x.latency_ticks = x.latency_ticks.saturating_sub(y.latency_ticks);
        }
        for i in 0..NERR {
            self.errors[i] = self.errors[i].saturating_sub(b.errors[i]);
        }
        self
    }
}

#[derive(Default)]
pub(crate) struct StatRegistry {
    live: Mutex<Vec<Weak<IoStat>>>,
    retired: Mutex<IoStatSnapshot>,
    baseline: Mutex<IoStatSnapshot>,
}

use reactor::sync::lock;

impl StatRegistry {
    pub(crate) fn new_channel(&self) -> Arc<IoStat> {
        let s = Arc::new(IoStat {
            reactor: reactor::current().unwrap_or(0),
            ..Default::default()
        });
        let mut live = lock(&self.live);
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(&s));
        s
    }

    /// Fold a closing channel's counters into the retired totals.
    pub(crate) fn retire(&self, s: &IoStat) {
        s.add_to(&mut lock(&self.retired));
    }

    fn raw(&self) -> IoStatSnapshot {
        let mut total = lock(&self.retired).clone();
        for w in lock(&self.live).iter() {
            if let Some(s) = w.upgrade() {
                s.add_to(&mut total);
            }
        }
        total
    }

    pub(crate) fn snapshot(&self) -> IoStatSnapshot {
        self.raw().minus(&lock(&self.baseline))
    }

    /// Per-channel counters (`bdev_get_iostat per_channel`).
    pub(crate) fn per_channel(&self) -> Vec<(u32, IoStatSnapshot)> {
        lock(&self.live)
            .iter()
            .filter_map(|w| w.upgrade())
            .map(|s| {
                let mut snap = IoStatSnapshot::default();
                s.add_to(&mut snap);
                (s.reactor, snap)
            })
            .collect()
    }

    /// Forget error counts only (`reset_mode: error`).
    pub(crate) fn reset_errors(&self) {
        let raw = self.raw();
        lock(&self.baseline).errors = raw.errors;
    }

    /// Forget max/min latencies only (`reset_mode: maxmin`).
    pub(crate) fn reset_maxmin(&self) {
        {
            let mut guard = lock(&self.retired);
            let retired = &mut *guard;
            for o in [&mut retired.read, &mut retired.write, &mut retired.unmap] {
                o.max_latency_ticks = 0;
                o.min_latency_ticks = 0;
            }
        }
        for w in lock(&self.live).iter() {
            if let Some(s) = w.upgrade() {
                s.reset_maxmin();
            }
        }
    }

    pub(crate) fn reset(&self) {
        let raw = self.raw();
        *lock(&self.baseline) = raw;
        self.reset_maxmin();
    }
}
