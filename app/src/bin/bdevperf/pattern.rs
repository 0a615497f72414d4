//! Offsets and data for bdevperf: a xorshift PRNG (as SPDK's
//! `spdk_rand_xorshift64`), an unbiased range reduction, and the verify
//! pattern.
//!
//! Verify pattern, per block: word 0 is the block's LBA, word 1 the write
//! generation, the other words a hash of both. A read that returns an older
//! write of the same block (stale data) differs in word 1; one that returns
//! another block's data differs in word 0; the hashed words catch torn or
//! corrupted blocks.

use std::cell::Cell;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's finaliser: a cheap, well-mixing bijection.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A non-zero seed, different per process, call and `salt`.
pub fn seed(salt: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let s = mix64(t ^ (u64::from(std::process::id()) << 32) ^ mix64(salt.wrapping_add(GOLDEN)));
    if s == 0 {
        GOLDEN
    } else {
        s
    }
}

/// xorshift64 step (Marsaglia 13/7/17, as SPDK). The state must be non-zero.
#[inline]
pub fn xorshift64(state: &Cell<u64>) -> u64 {
    let mut x = state.get();
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    state.set(x);
    x
}

/// Map a uniform 64-bit value onto `0..n` with a multiply instead of a
/// division (Lemire); `n` must be non-zero.
#[inline]
pub fn below(r: u64, n: u64) -> u64 {
    ((u128::from(r) * u128::from(n)) >> 64) as u64
}

#[inline]
fn block_base(lba: u64, gen: u64) -> u64 {
    mix64(lba ^ gen.rotate_left(32) ^ GOLDEN)
}

/// Fill `buf` (whole blocks of `block_size`, a multiple of 8) with the
/// pattern of write generation `gen` starting at block `first_lba`.
pub fn fill(buf: &mut [u8], first_lba: u64, block_size: usize, gen: u64) {
    for (b, block) in buf.chunks_exact_mut(block_size).enumerate() {
        let lba = first_lba + b as u64;
        let Some((head, rest)) = block.split_at_mut_checked(16) else {
            continue;
        };
        head[..8].copy_from_slice(&lba.to_le_bytes());
        head[8..].copy_from_slice(&gen.to_le_bytes());
        // Word i (i >= 2) is base + i * GOLDEN: a plain induction, which
        // the compiler vectorises (this runs for every verify write).
        let mut v = block_base(lba, gen).wrapping_add(GOLDEN.wrapping_mul(2));
        for w in rest.chunks_exact_mut(8) {
            w.copy_from_slice(&v.to_le_bytes());
            v = v.wrapping_add(GOLDEN);
        }
    }
}

/// Where a read-back differs from what was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// LBA of the first differing block.
    pub lba: u64,
    /// Byte offset of the first differing word inside that block.
    pub byte: usize,
    pub expected: u64,
    pub found: u64,
    /// Header words of the block that was read (what it claims to be).
    pub found_lba: u64,
    pub found_gen: u64,
}

impl Mismatch {
    /// A short diagnosis from the block headers.
    pub fn diagnosis(&self, expected_gen: u64) -> &'static str {
        if self.found_lba == self.lba && self.found_gen != expected_gen {
            "stale data (an older or newer write of this block)"
        } else if self.found_lba != self.lba && self.byte == 0 {
            "data of another block or never written"
        } else {
            "corrupted data"
        }
    }
}

fn word(b: &[u8], i: usize) -> u64 {
    b.get(i * 8..i * 8 + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_le_bytes)
}

/// Compare what was written with what was read back. The fast path is one
/// `memcmp`; details are only worked out on a mismatch.
pub fn compare(written: &[u8], read: &[u8], first_lba: u64, block_size: usize) -> Option<Mismatch> {
    if written == read {
        return None;
    }
    for (b, (w, r)) in written
        .chunks(block_size)
        .zip(read.chunks(block_size))
        .enumerate()
    {
        if w == r {
            continue;
        }
        let words = w.len().min(r.len()) / 8;
        let i = (0..words).find(|&i| word(w, i) != word(r, i)).unwrap_or(0);
        return Some(Mismatch {
            lba: first_lba + b as u64,
            byte: i * 8,
            expected: word(w, i),
            found: word(r, i),
            found_lba: word(r, 0),
            found_gen: word(r, 1),
        });
    }
    // Lengths differ but the common part is equal.
    Some(Mismatch {
        lba: first_lba,
        byte: 0,
        expected: 0,
        found: 0,
        found_lba: 0,
        found_gen: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` bytes of the pattern of generation `gen` from block `first_lba`.
    fn filled(len: usize, first_lba: u64, block_size: usize, gen: u64) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        fill(&mut buf, first_lba, block_size, gen);
        buf
    }

    #[test]
    fn pattern_round_trip() {
        let a = filled(4096, 100, 512, 7);
        let b = filled(4096, 100, 512, 7);
        assert_eq!(compare(&a, &b, 100, 512), None);
        // Block headers are readable.
        assert_eq!(word(&a, 0), 100);
        assert_eq!(word(&a, 1), 7);
        assert_eq!(word(&a[512..], 0), 101);
    }

    #[test]
    fn word_layout() {
        let a = filled(1024, 3, 512, 9);
        for b in 0..2u64 {
            let blk = &a[b as usize * 512..];
            assert_eq!(word(blk, 0), 3 + b);
            assert_eq!(word(blk, 1), 9);
            for i in 2..64 {
                assert_eq!(
                    word(blk, i),
                    block_base(3 + b, 9).wrapping_add((i as u64).wrapping_mul(GOLDEN))
                );
            }
        }
    }

    #[test]
    fn stale_generation_is_detected() {
        let written = filled(4096, 8, 512, 2);
        let stale = filled(4096, 8, 512, 1);
        let m = compare(&written, &stale, 8, 512).expect("stale data must miscompare");
        assert_eq!(m.lba, 8);
        assert_eq!(m.byte, 8, "the generation word differs first");
        assert_eq!(m.found_gen, 1);
        assert_eq!(
            m.diagnosis(2),
            "stale data (an older or newer write of this block)"
        );
    }

    #[test]
    fn other_block_and_corruption_are_detected() {
        let written = filled(2048, 0, 1024, 5);
        let other = filled(2048, 2, 1024, 5);
        let m = compare(&written, &other, 0, 1024).unwrap();
        assert_eq!((m.lba, m.byte, m.found_lba), (0, 0, 2));
        assert_eq!(m.diagnosis(5), "data of another block or never written");

        let mut torn = written.clone();
        torn[1024 + 300] ^= 0x40;
        let m = compare(&written, &torn, 0, 1024).unwrap();
        assert_eq!((m.lba, m.byte), (1, 296));
        assert_eq!(m.diagnosis(5), "corrupted data");

        let zeros = vec![0u8; 2048];
        assert!(compare(&written, &zeros, 0, 1024).is_some());
    }

    #[test]
    fn every_word_depends_on_lba_and_generation() {
        let a = filled(512, 1, 512, 1);
        for (other, b) in [
            ("generation", filled(512, 1, 512, 2)),
            ("LBA", filled(512, 2, 512, 1)),
        ] {
            for i in 2..64 {
                assert_ne!(word(&a, i), word(&b, i), "word {i}, another {other}");
            }
        }
    }

    #[test]
    fn prng_and_range() {
        let s = Cell::new(seed(1));
        assert_ne!(s.get(), 0);
        let mut seen = [false; 10];
        for _ in 0..10_000 {
            let r = xorshift64(&s);
            assert_ne!(r, 0);
            let v = below(r, 10);
            assert!(v < 10);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|&x| x), "all values of 0..10 are hit");
        assert_eq!(below(u64::MAX, 1), 0);
        assert_eq!(below(u64::MAX, 7), 6);
    }
}
