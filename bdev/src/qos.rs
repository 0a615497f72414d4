//! QoS rate limits (`bdev_set_qos_limit`), enforced in the I/O path with a
//! lock-free generic cell rate algorithm: each limit keeps a theoretical
//! arrival time; an I/O reserves its cost and may start once every limit it
//! is subject to has room. No lock, one CAS per applicable limit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::io::IoType;

/// Limits in SPDK's units; 0 = unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosLimits {
    pub rw_ios_per_sec: u64,
    pub rw_mbytes_per_sec: u64,
    pub r_mbytes_per_sec: u64,
    pub w_mbytes_per_sec: u64,
}

impl QosLimits {
    pub fn any(&self) -> bool {
        self.rw_ios_per_sec | self.rw_mbytes_per_sec | self.r_mbytes_per_sec | self.w_mbytes_per_sec
            != 0
    }
    fn as_array(&self) -> [u64; 4] {
        [
            self.rw_ios_per_sec,
            self.rw_mbytes_per_sec,
            self.r_mbytes_per_sec,
            self.w_mbytes_per_sec,
        ]
    }
}

/// Credit an idle bdev may bank: one SPDK QoS timeslice (1 ms).
const BURST_NS: u64 = 1_000_000;

#[derive(Default)]
pub(crate) struct Qos {
    limits: [AtomicU64; 4],
    tat: [AtomicU64; 4],
    enabled: AtomicBool,
}

impl Qos {
    pub(crate) fn limits(&self) -> QosLimits {
        let l = |i: usize| self.limits[i].load(Ordering::Relaxed);
        QosLimits {
            rw_ios_per_sec: l(0),
            rw_mbytes_per_sec: l(1),
            r_mbytes_per_sec: l(2),
            w_mbytes_per_sec: l(3),
        }
    }

    pub(crate) fn set_limits(&self, l: QosLimits) {
        for (i, v) in l.as_array().into_iter().enumerate() {
            self.limits[i].store(v, Ordering::Relaxed);
        }
        self.enabled.store(l.any(), Ordering::Release);
    }

    #[inline]
    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Reserve capacity for one I/O; returns the time (ns) it may start.
    pub(crate) fn admit(&self, ty: IoType, bytes: u64, now: u64) -> u64 {
        let (is_read, is_write) = match ty {
            IoType::Read => (true, false),
            IoType::Write | IoType::WriteZeroes => (false, true),
            _ => return now,
        };
        let mut start = now;
        for i in 0..4 {
            let rate = self.limits[i].load(Ordering::Relaxed);
            if rate == 0 || (i == 2 && !is_read) || (i == 3 && !is_write) {
                continue;
            }
            let cost = if i == 0 {
                1_000_000_000 / rate
            } else {
                ((bytes as u128 * 1_000_000_000) / (rate as u128 * 1024 * 1024)) as u64
            };
            let mut old = self.tat[i].load(Ordering::Relaxed);
            loop {
                let s = old.max(now.saturating_sub(BURST_NS));
                match self.tat[i].compare_exchange_weak(
                    old,
                    s + cost,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        start = start.max(s);
                        break;
                    }
                    Err(x) => old = x,
                }
            }
        }
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Qos` with only the limits `l` sets.
    fn limited(l: QosLimits) -> Qos {
        let q = Qos::default();
        q.set_limits(l);
        q
    }

    #[test]
    fn iops_limit_spaces_io() {
        let q = limited(QosLimits {
            rw_ios_per_sec: 1000,
            ..Default::default()
        });
        let now = 10_000_000_000;
        // One I/O, plus 1 ms of banked credit (one more at 1000/s), go at
        // once; the rest one per millisecond.
        let starts: Vec<u64> = (0..5).map(|_| q.admit(IoType::Read, 4096, now)).collect();
        assert_eq!(&starts[..2], &[now, now]);
        for w in starts[1..].windows(2) {
            assert_eq!(w[1] - w[0], 1_000_000);
        }
        // Unmap is not rate limited.
        assert_eq!(q.admit(IoType::Unmap, 1 << 20, now), now);
    }

    #[test]
    fn bandwidth_limit_by_direction() {
        let q = limited(QosLimits {
            w_mbytes_per_sec: 1,
            ..Default::default()
        });
        let now = 5_000_000_000;
        assert_eq!(q.admit(IoType::Read, 1 << 20, now), now);
        let a = q.admit(IoType::Write, 1 << 20, now);
        let b = q.admit(IoType::Write, 1 << 20, now);
        assert_eq!(a, now);
        // 1 MiB at 1 MiB/s: a second later, less the banked 1 ms.
        assert_eq!(b - a, 999_000_000);
        assert!(!QosLimits::default().any());
    }
}
