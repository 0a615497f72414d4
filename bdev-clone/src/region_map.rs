//! The in-memory hydration map: one bit per region (1 = hydrated: the
//! destination holds the region's valid data), in atomic 64-bit words.
//!
//! * Readers on any thread call [`RegionMap::is_hydrated`] (one `Acquire`
//!   load, no lock).
//! * Bits are set by the region's owner ([`RegionMap::set`],
//!   [`RegionMap::set_range`]) with `fetch_or`, so several owners setting
//!   bits in the same word (regions striped over reactors) are safe. Bits are
//!   never cleared.
//! * A dirty tracker records which metadata *units* (4032 regions each, see
//!   `metadata`) changed since the last commit, one bit per unit, so the whole
//!   structure costs 1 + 1/4032 bits per region plus a fixed header.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// Regions per metadata unit: 504 bytes of bits.
pub const REGIONS_PER_UNIT: u64 = 4032;
/// Bitmap words per metadata unit.
pub const WORDS_PER_UNIT: usize = 63;

const _: () = assert!(REGIONS_PER_UNIT == 64 * WORDS_PER_UNIT as u64);

/// Units needed for `num_regions` regions.
pub fn units_for(num_regions: u64) -> u64 {
    num_regions.div_ceil(REGIONS_PER_UNIT)
}

/// Errors loading a map from metadata units.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegionMapError {
    #[error("bitmap unit {unit} is out of range: the map has {num_units} units")]
    UnitOutOfRange { unit: u64, num_units: u64 },
    #[error("bitmap unit {unit} has bits set past the last region ({num_regions} regions)")]
    BitsBeyondEnd { unit: u64, num_regions: u64 },
}

/// See the module documentation.
pub struct RegionMap {
    num_regions: u64,
    num_units: u64,
    words: Box<[AtomicU64]>,
    hydrated: AtomicU64,
    /// One bit per unit: changed since the last `take_dirty`.
    dirty: Box<[AtomicU64]>,
    dirty_units: AtomicU64,
}

impl std::fmt::Debug for RegionMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionMap")
            .field("num_regions", &self.num_regions)
            .field("hydrated", &self.hydrated_count())
            .field("dirty_units", &self.dirty_units.load(Ordering::Relaxed))
            .finish()
    }
}

// `AtomicU64` has the same size and bit validity as `u64`; the alignment is
// asserted so the conversion below is sound on every target this builds for.
const _: () = assert!(std::mem::align_of::<AtomicU64>() == std::mem::align_of::<u64>());
const _: () = assert!(std::mem::size_of::<AtomicU64>() == std::mem::size_of::<u64>());

/// `n` zeroed atomic words from a zeroed allocation (`calloc`: untouched
/// pages stay unmapped, so a 32 MiB map costs nothing until used).
fn zeroed_words(n: usize) -> Box<[AtomicU64]> {
    let plain: Box<[u64]> = vec![0u64; n].into_boxed_slice();
    let raw: *mut [u64] = Box::into_raw(plain);
    // SAFETY: AtomicU64 and u64 have the same size and alignment (asserted
    // above) and every bit pattern (here: 0) is a valid AtomicU64, so the
    // allocation made for `[u64; n]` has exactly the layout of
    // `[AtomicU64; n]`, and freeing it as such is correct.
    unsafe { Box::from_raw(raw as *mut [AtomicU64]) }
}

fn word_index(r: u64) -> usize {
    (r / 64) as usize
}

impl RegionMap {
    /// An all-cold map. Panics if `num_regions` exceeds 2^32 (a `Geometry`
    /// never does).
    pub fn new(num_regions: u64) -> RegionMap {
        assert!(
            num_regions <= crate::geometry::MAX_REGIONS,
            "at most 2^32 regions"
        );
        let num_units = units_for(num_regions);
        RegionMap {
            num_regions,
            num_units,
            words: zeroed_words(num_regions.div_ceil(64) as usize),
            hydrated: AtomicU64::new(0),
            dirty: zeroed_words(num_units.div_ceil(64) as usize),
            dirty_units: AtomicU64::new(0),
        }
    }

    /// Build from metadata units `(unit_index, words)` (see
    /// [`RegionMap::load_unit`]). Nothing is marked dirty.
    pub fn from_units(
        num_regions: u64,
        units: impl IntoIterator<Item = (u64, [u64; WORDS_PER_UNIT])>,
    ) -> Result<RegionMap, RegionMapError> {
        let map = RegionMap::new(num_regions);
        for (u, words) in units {
            map.load_unit(u, &words)?;
        }
        Ok(map)
    }

    /// OR one unit's words loaded from metadata into the map (not marked
    /// dirty: it is on disk already). Bits past the last region are refused.
    /// All-zero units cost only the check.
    pub fn load_unit(
        &self,
        unit: u64,
        words: &[u64; WORDS_PER_UNIT],
    ) -> Result<(), RegionMapError> {
        if unit >= self.num_units {
            return Err(RegionMapError::UnitOutOfRange {
                unit,
                num_units: self.num_units,
            });
        }
        let first_region = unit * REGIONS_PER_UNIT;
        for (i, &w) in words.iter().enumerate() {
            if w == 0 {
                continue;
            }
            let base = first_region + 64 * i as u64;
            let valid = self.num_regions.saturating_sub(base).min(64);
            let mask = if valid == 64 {
                u64::MAX
            } else {
                (1u64 << valid) - 1
            };
            if w & !mask != 0 {
                return Err(RegionMapError::BitsBeyondEnd {
                    unit,
                    num_regions: self.num_regions,
                });
            }
            let old = self.words[word_index(base)].fetch_or(w, Ordering::AcqRel);
            let newly = (w & !old).count_ones() as u64;
            if newly > 0 {
                self.hydrated.fetch_add(newly, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    pub fn num_regions(&self) -> u64 {
        self.num_regions
    }

    /// Metadata units covering the map.
    pub fn num_units(&self) -> u64 {
        self.num_units
    }

    /// Bytes allocated for the map: header, bitmap words, dirty-unit words.
    pub fn allocation_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + std::mem::size_of_val(&*self.words)
            + std::mem::size_of_val(&*self.dirty)
    }

    /// Whether region `r` is hydrated (false past the end). Lock-free, from
    /// any thread; `Acquire` pairs with the `Release` of the setter.
    #[inline]
    pub fn is_hydrated(&self, r: u64) -> bool {
        if r >= self.num_regions {
            return false;
        }
        self.words[word_index(r)].load(Ordering::Acquire) & (1 << (r % 64)) != 0
    }

    /// Mark `r` hydrated. Returns whether it was newly set. Ignores `r` past
    /// the end.
    pub fn set(&self, r: u64) -> bool {
        if r >= self.num_regions {
            return false;
        }
        let bit = 1u64 << (r % 64);
        let old = self.words[word_index(r)].fetch_or(bit, Ordering::AcqRel);
        if old & bit != 0 {
            return false;
        }
        self.hydrated.fetch_add(1, Ordering::Relaxed);
        self.mark_dirty(r / REGIONS_PER_UNIT);
        true
    }

    /// Mark a range hydrated, a word at a time. Returns how many were newly
    /// set. The range is clamped to the map.
    pub fn set_range(&self, regions: Range<u64>) -> u64 {
        let start = regions.start.min(self.num_regions);
        let end = regions.end.min(self.num_regions);
        let mut newly_total = 0;
        let mut r = start;
        let mut last_dirty_unit = u64::MAX;
        while r < end {
            let bit = r % 64;
            let n = (64 - bit).min(end - r);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let old = self.words[word_index(r)].fetch_or(mask, Ordering::AcqRel);
            let newly = (mask & !old).count_ones() as u64;
            if newly > 0 {
                newly_total += newly;
                let unit = r / REGIONS_PER_UNIT;
                if unit != last_dirty_unit {
                    self.mark_dirty(unit);
                    last_dirty_unit = unit;
                }
            }
            r += n;
        }
        if newly_total > 0 {
            self.hydrated.fetch_add(newly_total, Ordering::Relaxed);
        }
        newly_total
    }

    pub fn hydrated_count(&self) -> u64 {
        self.hydrated.load(Ordering::Relaxed)
    }

    pub fn is_complete(&self) -> bool {
        self.hydrated_count() == self.num_regions
    }

    /// Whether every region of `regions` (clamped) is hydrated.
    pub fn is_range_hydrated(&self, regions: Range<u64>) -> bool {
        let end = regions.end.min(self.num_regions);
        regions.start >= end
            || self.run_of_hydrated(regions.start, end - regions.start) == end - regions.start
    }

    /// First cold region in `from..num_regions`, skipping full words fast.
    pub fn next_unhydrated(&self, from: u64) -> Option<u64> {
        if from >= self.num_regions {
            return None;
        }
        let mut wi = word_index(from);
        let mut cold = !self.words[wi].load(Ordering::Acquire) & (u64::MAX << (from % 64));
        loop {
            if cold != 0 {
                let r = wi as u64 * 64 + cold.trailing_zeros() as u64;
                return (r < self.num_regions).then_some(r);
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            cold = !self.words[wi].load(Ordering::Acquire);
        }
    }

    /// First cold region at or after `from`, wrapping to 0 at the end.
    pub fn next_unhydrated_wrapping(&self, from: u64) -> Option<u64> {
        let from = if from >= self.num_regions { 0 } else { from };
        self.next_unhydrated(from).or_else(|| {
            if from > 0 {
                self.next_unhydrated(0)
            } else {
                None
            }
        })
    }

    /// Number of consecutive cold regions starting at `from`, at most `max`.
    pub fn run_of_unhydrated(&self, from: u64, max: u64) -> u64 {
        self.run_of(from, max, false)
    }

    /// Number of consecutive hydrated regions starting at `from`, at most `max`.
    pub fn run_of_hydrated(&self, from: u64, max: u64) -> u64 {
        self.run_of(from, max, true)
    }

    fn run_of(&self, from: u64, max: u64, hydrated: bool) -> u64 {
        if from >= self.num_regions {
            return 0;
        }
        let limit = max.min(self.num_regions - from);
        let mut run = 0;
        let mut r = from;
        while run < limit {
            let w = self.words[word_index(r)].load(Ordering::Acquire);
            let w = if hydrated { w } else { !w };
            let bit = r % 64;
            let ones = (w >> bit).trailing_ones() as u64;
            let avail = 64 - bit;
            let take = ones.min(avail);
            run += take;
            if take < avail {
                break;
            }
            r += avail;
        }
        run.min(limit)
    }

    fn mark_dirty(&self, unit: u64) {
        let bit = 1u64 << (unit % 64);
        let old = self.dirty[(unit / 64) as usize].fetch_or(bit, Ordering::AcqRel);
        if old & bit == 0 {
            self.dirty_units.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Whether some unit changed since the last `take_dirty`.
    pub fn has_dirty(&self) -> bool {
        self.dirty_units.load(Ordering::Acquire) != 0
    }

    /// Units changed since the last call, ascending; clears them. A bit set
    /// concurrently is either in this snapshot's units or re-marks its unit
    /// for the next one (the bit is set before its unit is marked).
    pub fn take_dirty(&self) -> Vec<u32> {
        let mut out = Vec::new();
        if !self.has_dirty() {
            return out;
        }
        for (i, w) in self.dirty.iter().enumerate() {
            if w.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = w.swap(0, Ordering::AcqRel);
            self.dirty_units
                .fetch_sub(bits.count_ones() as u64, Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                out.push((i as u64 * 64 + b) as u32);
                bits &= bits - 1;
            }
        }
        out
    }

    /// Mark units dirty again after a commit that carried them failed.
    pub fn restore_dirty(&self, units: &[u32]) {
        for &u in units {
            if (u as u64) < self.num_units {
                self.mark_dirty(u as u64);
            }
        }
    }

    /// A copy of one unit's words (zeros past the end of the map).
    pub fn unit_words(&self, unit: u64) -> [u64; WORDS_PER_UNIT] {
        let mut out = [0u64; WORDS_PER_UNIT];
        let first = (unit as usize).saturating_mul(WORDS_PER_UNIT);
        for (i, o) in out.iter_mut().enumerate() {
            if let Some(w) = self.words.get(first + i) {
                *o = w.load(Ordering::Acquire);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Instant;

    #[test]
    fn set_and_query() {
        let m = RegionMap::new(200);
        assert!(!m.is_hydrated(5));
        assert!(m.set(5));
        assert!(!m.set(5));
        assert!(m.is_hydrated(5));
        assert!(!m.set(200), "past the end is ignored");
        assert!(!m.is_hydrated(200));
        assert_eq!(m.hydrated_count(), 1);
        assert_eq!(m.set_range(0..70), 69);
        assert_eq!(m.set_range(60..300), 130);
        assert_eq!(m.hydrated_count(), 200);
        assert!(m.is_complete());
        assert_eq!(m.next_unhydrated(0), None);
        assert_eq!(m.next_unhydrated_wrapping(10), None);
    }

    #[test]
    fn scans_and_runs() {
        let m = RegionMap::new(300);
        m.set_range(0..130);
        m.set(140);
        assert_eq!(m.next_unhydrated(0), Some(130));
        assert_eq!(m.next_unhydrated(140), Some(141));
        assert_eq!(m.run_of_unhydrated(130, 100), 10);
        assert_eq!(m.run_of_unhydrated(130, 3), 3);
        assert_eq!(m.run_of_unhydrated(141, 1000), 159);
        assert_eq!(m.run_of_hydrated(0, 1000), 130);
        assert_eq!(m.run_of_hydrated(3, 5), 5);
        assert_eq!(m.run_of_hydrated(130, 5), 0);
        m.set_range(141..300);
        assert_eq!(m.next_unhydrated(141), None);
        assert_eq!(m.next_unhydrated_wrapping(141), Some(130));
        assert!(m.is_range_hydrated(141..300));
        assert!(!m.is_range_hydrated(129..141));
        // A region count that is not a multiple of 64: the bits past the
        // end are never reported as cold regions.
        let m = RegionMap::new(70);
        m.set_range(0..70);
        assert_eq!(m.next_unhydrated(0), None);
        assert_eq!(m.run_of_unhydrated(69, 10), 0);
    }

    #[test]
    fn dirty_units_take_and_restore() {
        let m = RegionMap::new(3 * REGIONS_PER_UNIT + 10);
        assert!(!m.has_dirty());
        m.set(0);
        m.set(REGIONS_PER_UNIT * 3 + 9);
        m.set_range(REGIONS_PER_UNIT - 1..REGIONS_PER_UNIT + 1);
        assert!(m.has_dirty());
        let d = m.take_dirty();
        assert_eq!(d, vec![0, 1, 3]);
        assert!(!m.has_dirty());
        assert!(m.take_dirty().is_empty());
        // Re-setting a set bit dirties nothing.
        m.set(0);
        assert!(!m.has_dirty());
        m.restore_dirty(&d);
        assert_eq!(m.take_dirty(), vec![0, 1, 3]);
    }

    #[test]
    fn unit_words_and_reload() {
        let n = 2 * REGIONS_PER_UNIT + 100;
        let m = RegionMap::new(n);
        for r in [0, 63, 64, 4031, 4032, 8064, n - 1] {
            m.set(r);
        }
        let units: Vec<_> = (0..m.num_units()).map(|u| (u, m.unit_words(u))).collect();
        assert_eq!(units[1].1[0], 1, "region 4032 is bit 0 of unit 1");
        let back = RegionMap::from_units(n, units).unwrap();
        for r in 0..n {
            assert_eq!(back.is_hydrated(r), m.is_hydrated(r), "region {r}");
        }
        assert_eq!(back.hydrated_count(), 7);
        assert!(!back.has_dirty(), "loaded bits are not dirty");

        let mut w = [0u64; WORDS_PER_UNIT];
        w[1] = 1 << 37; // region 2*4032 + 64 + 37 = 8165 >= n (8164)
        assert_eq!(
            back.load_unit(2, &w),
            Err(RegionMapError::BitsBeyondEnd {
                unit: 2,
                num_regions: n
            })
        );
        assert!(matches!(
            back.load_unit(3, &[0; WORDS_PER_UNIT]),
            Err(RegionMapError::UnitOutOfRange { .. })
        ));
    }

    #[test]
    fn memory_for_1_tib_at_4_kib_is_about_one_bit_per_region() {
        let regions = 1u64 << 28; // 1 TiB / 4 KiB
        let t = Instant::now();
        let m = RegionMap::new(regions);
        let took = t.elapsed();
        let bits_per_region = m.allocation_bytes() as f64 * 8.0 / regions as f64;
        assert!(bits_per_region <= 1.1, "{bits_per_region} bits per region");
        // 1 bit + 1/4032 bit per region plus a small header.
        assert!(m.allocation_bytes() <= (regions / 8 + regions / 4032 / 8 + 256) as usize);
        // calloc'd: creation does not touch the 32 MiB.
        assert!(took.as_millis() < 50, "creating took {took:?}");
        assert_eq!(m.next_unhydrated(regions - 1), Some(regions - 1));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn matches_a_bool_vector(n in 1u64..600, ops in proptest::collection::vec((0u64..650, 0u64..80), 0..40), probe in 0u64..650, max in 0u64..700) {
            let m = RegionMap::new(n);
            let mut v = vec![false; n as usize];
            for (s, len) in ops {
                let newly = m.set_range(s..s + len);
                let mut expect = 0;
                for r in s..(s + len).min(n) {
                    if !v[r as usize] { v[r as usize] = true; expect += 1; }
                }
                prop_assert_eq!(newly, expect);
            }
            prop_assert_eq!(m.hydrated_count(), v.iter().filter(|b| **b).count() as u64);
            let next = (probe..n).find(|r| !v[*r as usize]);
            prop_assert_eq!(m.next_unhydrated(probe), next);
            let cold_run = (probe..n).take_while(|r| !v[*r as usize]).count() as u64;
            prop_assert_eq!(m.run_of_unhydrated(probe, max), cold_run.min(max));
            let hot_run = (probe..n).take_while(|r| v[*r as usize]).count() as u64;
            prop_assert_eq!(m.run_of_hydrated(probe, max), hot_run.min(max));
            let wrap = next.or_else(|| (0..n).find(|r| !v[*r as usize]));
            prop_assert_eq!(m.next_unhydrated_wrapping(probe), wrap);
        }
    }
}
