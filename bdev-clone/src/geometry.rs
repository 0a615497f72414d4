//! Region geometry: how the clone's blocks map onto regions.
//!
//! The clone is as large as the source. It is cut into `num_regions` regions
//! of `region_size` bytes (a power of two, 4 KiB..=1 GiB, a multiple of the
//! block size); the last region is shorter when the source is not a multiple
//! of the region size (the *tail* region).
//!
//! Everything is `u64` and overflow-checked: dm-clone had three bugs from
//! 32-bit region/sector arithmetic (dm-clone.md §2 #6-#8). The methods are
//! total: they never panic; out-of-device inputs give `None` or are clamped as
//! each method says.

use std::ops::Range;

/// Smallest region: 4 KiB.
pub const MIN_REGION_SIZE: u64 = 4096;
/// Largest region: 1 GiB.
pub const MAX_REGION_SIZE: u64 = 1 << 30;
/// At most 2^32 regions (the bitmap and the metadata unit index are sized
/// for it; dm-clone allows only 2^31).
pub const MAX_REGIONS: u64 = 1 << 32;

/// Which base bdev an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// Why a geometry was refused. Each message says exactly what is wrong and
/// with which numbers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("the {0} block size is 0")]
    ZeroBlockSize(Side),
    #[error("region size {0} bytes is not a power of two")]
    RegionSizeNotPowerOfTwo(u64),
    #[error(
        "region size {0} bytes is outside the allowed range {MIN_REGION_SIZE}..={MAX_REGION_SIZE} bytes (4 KiB to 1 GiB)"
    )]
    RegionSizeOutOfRange(u64),
    #[error(
        "region size {region_size} bytes is not a multiple of the {side} block size {block_size}"
    )]
    RegionSizeNotMultipleOfBlockSize {
        region_size: u64,
        side: Side,
        block_size: u32,
    },
    #[error(
        "block sizes differ: the source has {source_block_size}-byte blocks, the destination {dest_block_size}-byte blocks"
    )]
    BlockSizesDiffer {
        source_block_size: u32,
        dest_block_size: u32,
    },
    #[error("the source is empty (0 blocks)")]
    EmptySource,
    #[error("source size overflows 64 bits: {source_blocks} blocks of {block_size} bytes")]
    SizeOverflow { source_blocks: u64, block_size: u32 },
    #[error(
        "destination is smaller than the source: the destination has {dest_blocks} blocks ({dest_bytes} bytes), the source {source_blocks} blocks ({source_bytes} bytes)"
    )]
    DestinationTooSmall {
        source_blocks: u64,
        source_bytes: u64,
        dest_blocks: u64,
        dest_bytes: u64,
    },
    #[error("too many regions: {num_regions} regions of {region_size} bytes, at most {MAX_REGIONS} (2^32) are supported; {hint}")]
    TooManyRegions {
        num_regions: u64,
        region_size: u64,
        hint: String,
    },
}

/// A validated clone geometry. Cheap to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    source_blocks: u64,
    dest_blocks: u64,
    block_size: u32,
    region_size: u64,
    /// Blocks per (full) region, a power of two.
    region_blocks: u64,
    /// log2(region_blocks).
    region_shift: u32,
    num_regions: u64,
}

impl Geometry {
    /// Validate and build. Checks, in this order: block sizes non-zero;
    /// region size a power of two, within 4 KiB..=1 GiB, a multiple of the
    /// source then the destination block size; block sizes equal; source
    /// non-empty and its byte size within 64 bits; destination at least as
    /// large as the source; at most 2^32 regions.
    pub fn new(
        source_blocks: u64,
        source_block_size: u32,
        dest_blocks: u64,
        dest_block_size: u32,
        region_size_bytes: u64,
    ) -> Result<Geometry, GeometryError> {
        if source_block_size == 0 {
            return Err(GeometryError::ZeroBlockSize(Side::Source));
        }
        if dest_block_size == 0 {
            return Err(GeometryError::ZeroBlockSize(Side::Destination));
        }
        if !region_size_bytes.is_power_of_two() {
            return Err(GeometryError::RegionSizeNotPowerOfTwo(region_size_bytes));
        }
        if !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&region_size_bytes) {
            return Err(GeometryError::RegionSizeOutOfRange(region_size_bytes));
        }
        for (side, bs) in [
            (Side::Source, source_block_size),
            (Side::Destination, dest_block_size),
        ] {
            if !region_size_bytes.is_multiple_of(bs as u64) {
                return Err(GeometryError::RegionSizeNotMultipleOfBlockSize {
                    region_size: region_size_bytes,
                    side,
                    block_size: bs,
                });
            }
        }
        if source_block_size != dest_block_size {
            return Err(GeometryError::BlockSizesDiffer {
                source_block_size,
                dest_block_size,
            });
        }
        if source_blocks == 0 {
            return Err(GeometryError::EmptySource);
        }
        let block_size = source_block_size;
        let source_bytes =
            source_blocks
                .checked_mul(block_size as u64)
                .ok_or(GeometryError::SizeOverflow {
                    source_blocks,
                    block_size,
                })?;
        if dest_blocks < source_blocks {
            return Err(GeometryError::DestinationTooSmall {
                source_blocks,
                source_bytes,
                dest_blocks,
                dest_bytes: dest_blocks.saturating_mul(block_size as u64),
            });
        }
        // region_size is a power of two and a multiple of block_size, so
        // block_size is a power of two too and region_blocks is one.
        let region_blocks = region_size_bytes / block_size as u64;
        let num_regions = source_blocks.div_ceil(region_blocks);
        if num_regions > MAX_REGIONS {
            let needed = source_bytes.div_ceil(MAX_REGIONS).next_power_of_two();
            let hint = if needed <= MAX_REGION_SIZE {
                format!("use a region size of at least {needed} bytes")
            } else {
                "the source is too large for any region size".to_string()
            };
            return Err(GeometryError::TooManyRegions {
                num_regions,
                region_size: region_size_bytes,
                hint,
            });
        }
        Ok(Geometry {
            source_blocks,
            dest_blocks,
            block_size,
            region_size: region_size_bytes,
            region_blocks,
            region_shift: region_blocks.trailing_zeros(),
            num_regions,
        })
    }

    /// The clone's size in blocks (= the source's).
    pub fn source_blocks(&self) -> u64 {
        self.source_blocks
    }
    pub fn dest_blocks(&self) -> u64 {
        self.dest_blocks
    }
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// Region size in bytes.
    pub fn region_size(&self) -> u64 {
        self.region_size
    }
    /// Blocks per full region.
    pub fn region_blocks(&self) -> u64 {
        self.region_blocks
    }
    pub fn num_regions(&self) -> u64 {
        self.num_regions
    }
    /// The clone's size in bytes.
    pub fn size_bytes(&self) -> u64 {
        // Checked in `new`.
        self.source_blocks * self.block_size as u64
    }

    /// Region holding `block` (may be `>= num_regions` for blocks past the end).
    pub fn region_of(&self, block: u64) -> u64 {
        block >> self.region_shift
    }

    /// First block of region `r`, clamped to `source_blocks` for `r` past the end.
    pub fn region_first_block(&self, r: u64) -> u64 {
        if r >= self.num_regions {
            return self.source_blocks;
        }
        // r < num_regions <= 2^32 and r * region_blocks < source_blocks.
        r << self.region_shift
    }

    /// Length of region `r` in blocks: `region_blocks` except for a shorter
    /// tail region; 0 past the end.
    pub fn region_len_blocks(&self, r: u64) -> u64 {
        if r >= self.num_regions {
            return 0;
        }
        let first = self.region_first_block(r);
        (self.source_blocks - first).min(self.region_blocks)
    }

    /// Blocks covered by a range of regions (clamped to the device).
    pub fn region_range_blocks(&self, regions: Range<u64>) -> Range<u64> {
        let start = self.region_first_block(regions.start);
        let end = self.region_first_block(regions.end);
        start..end.max(start)
    }

    /// Whether `offset..offset+len` lies inside the clone (no overflow).
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        matches!(offset.checked_add(len), Some(end) if end <= self.source_blocks)
    }

    /// Regions overlapped by `offset..offset+len` (any overlap). `None` if the
    /// range leaves the device; empty for `len == 0`.
    pub fn regions_covering(&self, offset: u64, len: u64) -> Option<Range<u64>> {
        if !self.contains(offset, len) {
            return None;
        }
        let start = self.region_of(offset);
        if len == 0 {
            return Some(start..start);
        }
        let last = self.region_of(offset + len - 1);
        Some(start..last + 1)
    }

    /// Regions entirely inside `offset..offset+len`. A range that ends exactly
    /// at the device end covers the (short) tail region fully. Partial head
    /// and tail regions are left out; the result may be empty (then
    /// `start == end`), never inverted (dm-clone §2 #5). `None` if the range
    /// leaves the device.
    pub fn whole_regions_in(&self, offset: u64, len: u64) -> Option<Range<u64>> {
        if !self.contains(offset, len) {
            return None;
        }
        let end_block = offset + len;
        let start = offset.div_ceil(self.region_blocks);
        let end = if end_block == self.source_blocks {
            self.num_regions
        } else {
            end_block >> self.region_shift
        };
        Some(start..end.max(start))
    }

    /// Whether `blocks` covers region `r` entirely (the tail region counts
    /// as covered when `blocks` reaches the device end).
    pub fn covers_region(&self, blocks: &Range<u64>, r: u64) -> bool {
        let rb = self.region_range_blocks(r..r + 1);
        !rb.is_empty() && blocks.start <= rb.start && blocks.end >= rb.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_is_wrong() {
        let e = Geometry::new(1000, 512, 1000, 512, 6144).unwrap_err();
        assert_eq!(e, GeometryError::RegionSizeNotPowerOfTwo(6144));
        assert!(e.to_string().contains("6144"), "{e}");
        assert!(e.to_string().contains("not a power of two"));

        for bad in [2048u64, 1 << 31] {
            let e = Geometry::new(1000, 512, 1000, 512, bad).unwrap_err();
            assert_eq!(e, GeometryError::RegionSizeOutOfRange(bad));
            assert!(e.to_string().contains("4 KiB to 1 GiB"), "{e}");
        }
        assert!(Geometry::new(1000, 512, 1000, 512, 4096).is_ok());
        assert!(Geometry::new(1 << 21, 512, 1 << 21, 512, 1 << 30).is_ok());

        let e = Geometry::new(1000, 8192, 1000, 8192, 4096).unwrap_err();
        assert_eq!(
            e.to_string(),
            "region size 4096 bytes is not a multiple of the source block size 8192"
        );
        let e = Geometry::new(1000, 4096, 1000, 8192, 4096).unwrap_err();
        assert!(e.to_string().contains("destination block size 8192"), "{e}");

        let e = Geometry::new(1000, 512, 1000, 4096, 4096).unwrap_err();
        assert_eq!(
            e.to_string(),
            "block sizes differ: the source has 512-byte blocks, the destination 4096-byte blocks"
        );

        let e = Geometry::new(1000, 512, 999, 512, 4096).unwrap_err();
        assert_eq!(
            e.to_string(),
            "destination is smaller than the source: the destination has 999 blocks (511488 bytes), the source 1000 blocks (512000 bytes)"
        );
        assert_eq!(
            Geometry::new(0, 512, 0, 512, 4096).unwrap_err(),
            GeometryError::EmptySource
        );
        assert_eq!(
            Geometry::new(1, 0, 1, 512, 4096).unwrap_err(),
            GeometryError::ZeroBlockSize(Side::Source)
        );
        assert!(matches!(
            Geometry::new(u64::MAX, 512, u64::MAX, 512, 4096).unwrap_err(),
            GeometryError::SizeOverflow { .. }
        ));
    }

    #[test]
    fn region_count_limit_is_2_pow_32() {
        // Exactly 2^32 regions of 4 KiB: 16 TiB.
        let g = Geometry::new(1 << 32, 4096, 1 << 32, 4096, 4096).unwrap();
        assert_eq!(g.num_regions(), 1 << 32);
        // One block more is one region too many.
        let e = Geometry::new((1 << 32) + 1, 4096, (1 << 32) + 1, 4096, 4096).unwrap_err();
        match &e {
            GeometryError::TooManyRegions { num_regions, .. } => {
                assert_eq!(*num_regions, (1 << 32) + 1)
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("at least 8192 bytes"), "{e}");
        // 2^32 regions of 1 GiB = 4 EiB, the largest device.
        let blocks = 1u64 << 53; // 512-byte blocks
        let g = Geometry::new(blocks, 512, blocks, 512, 1 << 30).unwrap();
        assert_eq!(g.num_regions(), 1 << 32);
        let e = Geometry::new(blocks + 1, 512, blocks + 1, 512, 1 << 30).unwrap_err();
        assert!(
            e.to_string().contains("too large for any region size"),
            "{e}"
        );
    }

    #[test]
    fn tail_region() {
        // 8 blocks per region, 21 blocks: regions 0,1 full, region 2 has 5.
        let g = Geometry::new(21, 512, 100, 512, 4096).unwrap();
        assert_eq!(g.num_regions(), 3);
        assert_eq!(g.region_len_blocks(0), 8);
        assert_eq!(g.region_len_blocks(2), 5);
        assert_eq!(g.region_len_blocks(3), 0);
        assert_eq!(g.region_first_block(2), 16);
        assert_eq!(g.region_first_block(7), 21);
        assert_eq!(g.region_range_blocks(1..3), 8..21);
        // A range ending at the device end covers the tail fully.
        assert_eq!(g.whole_regions_in(16, 5), Some(2..3));
        assert_eq!(g.whole_regions_in(0, 21), Some(0..3));
        assert_eq!(g.whole_regions_in(16, 4), Some(2..2));
        assert!(g.covers_region(&(16..21), 2));
        assert!(!g.covers_region(&(16..20), 2));
        assert_eq!(g.whole_regions_in(16, 6), None);
        assert_eq!(g.regions_covering(20, 1), Some(2..3));
        assert_eq!(g.regions_covering(21, 1), None);
        assert_eq!(g.regions_covering(21, 0), Some(2..2));
    }

    #[test]
    fn partial_discard_ranges_never_invert() {
        let g = Geometry::new(64, 512, 64, 512, 4096).unwrap();
        // Inside one region, starting after its start and ending before its end.
        assert_eq!(g.whole_regions_in(9, 5), Some(2..2));
        // Start inside region 1, end inside region 3: only region 2.
        assert_eq!(g.whole_regions_in(9, 20), Some(2..3));
        // Start inside region 1, end at the start of region 3.
        assert_eq!(g.whole_regions_in(9, 15), Some(2..3));
        // Aligned.
        assert_eq!(g.whole_regions_in(8, 16), Some(1..3));
        assert_eq!(g.whole_regions_in(8, 0), Some(1..1));
        assert_eq!(g.regions_covering(9, 20), Some(1..4));
        assert_eq!(g.regions_covering(8, 8), Some(1..2));
    }

    #[test]
    fn offsets_beyond_16_tib_and_2_pow_31_regions() {
        // 2^32 regions of 64 KiB with 512-byte blocks: 256 TiB, 2^39 blocks.
        let blocks = 1u64 << 39;
        let g = Geometry::new(blocks, 512, blocks, 512, 64 << 10).unwrap();
        assert_eq!(g.num_regions(), 1 << 32);
        assert_eq!(g.region_blocks(), 128);
        let r = (1u64 << 31) + 12345; // past the 2^31 signed limit
        let first = g.region_first_block(r);
        assert_eq!(first, r * 128);
        assert!(first * 512 > 16 << 40, "byte offset beyond 16 TiB");
        assert_eq!(g.region_of(first), r);
        assert_eq!(g.region_of(first + 127), r);
        assert_eq!(g.region_of(first + 128), r + 1);
        let last = g.num_regions() - 1;
        assert_eq!(g.region_first_block(last), blocks - 128);
        assert_eq!(g.region_len_blocks(last), 128);
        assert_eq!(g.regions_covering(blocks - 1, 1), Some(last..last + 1));
        assert_eq!(g.whole_regions_in(first + 1, 300), Some(r + 1..r + 2));
        assert_eq!(
            g.whole_regions_in(blocks - 256, 256),
            Some(last - 1..last + 1)
        );
        assert_eq!(g.size_bytes(), 1 << 48);
    }

    #[test]
    fn region_of_round_trips_exhaustively_small() {
        for rs in [4096u64, 8192, 65536] {
            for n in 1..200u64 {
                let g = Geometry::new(n, 512, n, 512, rs).unwrap();
                let mut total = 0;
                for r in 0..g.num_regions() {
                    let rb = g.region_range_blocks(r..r + 1);
                    assert_eq!(rb.end - rb.start, g.region_len_blocks(r));
                    total += g.region_len_blocks(r);
                    for b in rb {
                        assert_eq!(g.region_of(b), r);
                    }
                }
                assert_eq!(total, n);
            }
        }
    }
}
