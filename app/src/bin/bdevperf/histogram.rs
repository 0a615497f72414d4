//! Latency histogram for `-l` (SPDK's `spdk_histogram_data` idea): a
//! log-linear bucket layout, fixed size, O(1) and allocation-free per I/O.
//!
//! Values below `2^SUB_BITS` ns have one bucket each; above, every power of
//! two is split into `2^SUB_BITS` linear sub-buckets, so a bucket's width is
//! at most 1/64 of its value (percentiles are within ~1.6 %).

const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Enough ranges for any u64 value.
const RANGES: usize = 64 - SUB_BITS as usize + 1;
const BUCKETS: usize = RANGES * SUB;

/// SPDK bdevperf's latency cut-offs for the summary.
pub const CUTOFFS: [f64; 15] = [
    0.01, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 0.99999, 0.999999,
    0.9999999,
];

pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
        }
    }
}

#[inline]
fn index(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros(); // >= SUB_BITS
    let range = (msb - SUB_BITS + 1) as usize;
    let sub = ((v >> (msb - SUB_BITS)) as usize) & (SUB - 1);
    range * SUB + sub
}

/// Inclusive upper bound of bucket `i`.
fn upper(i: usize) -> u64 {
    let (range, sub) = (i / SUB, (i % SUB) as u64);
    if range == 0 {
        return sub;
    }
    let shift = range as u32 - 1;
    let lo = (SUB as u64 + sub) << shift;
    lo.saturating_add((1u64 << shift) - 1)
}

impl Histogram {
    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.counts[index(ns)] += 1;
        self.total += 1;
    }

    #[cfg(test)]
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The smallest bucket bound at or below which `q` of the samples lie.
    pub fn percentile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let want = ((self.total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return upper(i);
            }
        }
        upper(BUCKETS - 1)
    }

    /// Non-empty buckets as (low_ns, high_ns, count, cumulative fraction).
    pub fn buckets(&self) -> Vec<(u64, u64, u64, f64)> {
        let mut out = Vec::new();
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            seen += c;
            let lo = if i == 0 { 0 } else { upper(i - 1) + 1 };
            out.push((lo, upper(i), c, seen as f64 / self.total as f64));
        }
        out
    }

    /// SPDK's summary block for one job.
    pub fn render_summary(&self, title: &str) -> String {
        let mut s = format!("\nSummary latency data for {title}:\n{}\n", "=".repeat(81));
        for q in CUTOFFS {
            s.push_str(&format!(
                "{:>10.5}% : {:>12.3}us\n",
                q * 100.0,
                self.percentile(q) as f64 / 1e3
            ));
        }
        s
    }

    /// SPDK's `-ll` histogram block for one job.
    pub fn render_detail(&self, title: &str) -> String {
        let mut s = format!(
            "\nLatency histogram for {title}:\n{}\n       Range in us     Cumulative    IO count\n",
            "=".repeat(81)
        );
        for (lo, hi, c, cum) in self.buckets() {
            s.push_str(&format!(
                "{:>10.3} - {:>10.3}: {:>9.4}%  ({:>9})\n",
                lo as f64 / 1e3,
                (hi + 1) as f64 / 1e3,
                cum * 100.0,
                c
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_contain_their_values_and_are_ordered() {
        let mut prev = 0;
        for v in (0..10_000u64).chain([1 << 20, (1 << 40) + 12345, u64::MAX]) {
            let i = index(v);
            assert!(v <= upper(i), "{v} above bucket {i} bound {}", upper(i));
            if i > 0 {
                assert!(v > upper(i - 1), "{v} not above previous bucket");
            }
            assert!(i >= prev);
            prev = i;
        }
        // Relative width bound above the linear part.
        for v in [100u64, 1_000, 123_456, 10_000_000] {
            let i = index(v);
            let lo = upper(i - 1) + 1;
            assert!((upper(i) - lo) as f64 <= v as f64 / 60.0);
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v * 1000); // 1 us .. 10 ms
        }
        let p50 = h.percentile(0.5) as f64;
        let p99 = h.percentile(0.99) as f64;
        assert!((p50 / 5_000_000.0 - 1.0).abs() < 0.02, "p50 {p50}");
        assert!((p99 / 9_900_000.0 - 1.0).abs() < 0.02, "p99 {p99}");
        assert_eq!(h.percentile(0.0000001), upper(index(1000)));
        h.record(7);
        assert_eq!(h.total(), 10_001);
        assert_eq!(h.percentile(0.00001), 7);
        let b = h.buckets();
        assert_eq!(b.iter().map(|x| x.2).sum::<u64>(), 10_001);
        assert!((b.last().unwrap().3 - 1.0).abs() < 1e-12);
        assert!(h.render_summary("x").contains("99.00000% :"));
    }

    #[test]
    fn empty_histogram_reports_zero() {
        let h = Histogram::default();
        assert_eq!(h.percentile(0.99), 0);
        assert!(h.buckets().is_empty());
    }
}
