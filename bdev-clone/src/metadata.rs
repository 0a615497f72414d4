//! The clone's on-disk metadata format (documented in `docs/metadata.md`):
//! pure encode/decode against byte slices, no I/O.
//!
//! ```text
//! byte 0      superblock slot 0 (4096 bytes)
//! byte 4096   superblock slot 1 (4096 bytes)
//! byte 8192   bitmap unit 0, unit 1, ... (512 bytes each)
//! ```
//!
//! Every offset is a multiple of 4096 except unit offsets, which are
//! multiples of 512: a metadata bdev with 512-byte blocks writes single
//! units, one with 4096-byte blocks writes groups of 8 (see
//! [`units_per_block`]).

use std::ops::Range;

use uuid::Uuid;

use crate::geometry::{Geometry, MAX_REGIONS, MAX_REGION_SIZE, MIN_REGION_SIZE};
use crate::region_map::{units_for, RegionMap, REGIONS_PER_UNIT, WORDS_PER_UNIT};

/// Format block size: superblocks are this large and aligned to it.
pub const FORMAT_BLOCK_SIZE: u64 = 4096;
/// Magic at byte 0 of a superblock.
pub const MAGIC: [u8; 8] = *b"CLNTGTMD";
/// The version this code writes. Version 1 (no seeded unit checksums, one
/// superblock slot written) is still read, and upgraded on open.
pub const VERSION: u32 = 2;
/// The first format: still opened, then rewritten as [`VERSION`].
pub const VERSION_1: u32 = 1;
/// Superblock flag: formatting began and has not finished. Nothing was
/// ever hydrated under such a superblock, so it is formatted again.
pub const FLAG_FORMATTING: u32 = 1;
/// Flags this version understands; other bits are refused.
pub const KNOWN_FLAGS: u32 = FLAG_FORMATTING;
/// Prefix of a version 2 unit's checksum input (then the clone's uuid,
/// then the unit's bytes 4..512, which hold its index).
const UNIT_SEED: &[u8; 8] = b"CLNTGTU2";
/// Byte offset of the bitmap (after the two superblock slots).
pub const BITMAP_OFFSET: u64 = 2 * FORMAT_BLOCK_SIZE;
/// Size of one bitmap unit: one sector, the atomic write granularity.
pub const UNIT_SIZE: usize = 512;
/// Bytes of region bits in a unit.
pub const UNIT_BITS_BYTES: usize = WORDS_PER_UNIT * 8;

const _: () = assert!(8 + UNIT_BITS_BYTES == UNIT_SIZE);

// Superblock field offsets (little-endian).
const SB_MAGIC: usize = 0;
const SB_VERSION: usize = 8;
const SB_FLAGS: usize = 12;
const SB_SEQUENCE: usize = 16;
const SB_UUID: usize = 24;
const SB_SOURCE_BLOCKS: usize = 40;
const SB_BLOCK_SIZE: usize = 48;
const SB_SLOT: usize = 52;
const SB_REGION_SIZE: usize = 56;
const SB_NUM_REGIONS: usize = 64;
const SB_BITMAP_OFFSET: usize = 72;
const SB_BITMAP_UNITS: usize = 80;
/// End of the defined fields; bytes from here to the checksum are zero.
const SB_FIELDS_END: usize = 88;
const SB_CRC: usize = FORMAT_BLOCK_SIZE as usize - 4;

/// Errors reading, validating or sizing metadata.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata damaged: superblock slots 0 and 1 unreadable (slot 0: {slot0}; slot 1: {slot1}){units}")]
    CorruptSuperblock {
        slot0: String,
        slot1: String,
        /// What the bitmap area holds (filled in by the opener), e.g.
        /// ", 12 bitmap units hold hydrated regions".
        units: String,
    },
    #[error("metadata damaged: superblock slots disagree: slot 0 is {slot0}; slot 1 is {slot1}")]
    SlotsDisagree { slot0: String, slot1: String },
    #[error("metadata superblock in slot {slot} has version {found}; this build reads versions {VERSION_1} and {VERSION}")]
    UnsupportedVersion { slot: u32, found: u32 },
    #[error("metadata superblock in slot {slot} has unknown flags {flags:#x}")]
    UnsupportedFlags { slot: u32, flags: u32 },
    #[error("metadata superblock in slot {slot} is inconsistent: {reason}")]
    InconsistentSuperblock { slot: u32, reason: String },
    #[error("metadata was formatted for {found}; this clone has {expected} (differs: {differs})")]
    GeometryMismatch {
        found: String,
        expected: String,
        differs: String,
    },
    #[error("metadata belongs to clone {found}, not to clone {expected}")]
    UuidMismatch { found: Uuid, expected: Uuid },
    #[error(
        "metadata bdev too small: needs {need} bytes for {num_regions} regions, has {have} bytes"
    )]
    TooSmall {
        have: u64,
        need: u64,
        num_regions: u64,
    },
    #[error("metadata damaged: bitmap unit {unit}: {reason}")]
    CorruptUnit { unit: u64, reason: String },
    #[error("metadata damaged: {count} of {total} bitmap units unusable ({detail})")]
    DamagedUnits {
        count: u64,
        total: u64,
        detail: String,
    },
    #[error("metadata buffer too short: {what} needs {need} bytes, got {got}")]
    ShortBuffer {
        what: &'static str,
        need: usize,
        got: usize,
    },
}

/// Bytes a metadata bdev needs for `num_regions` regions: two superblock
/// blocks plus the units, rounded up to 4096.
pub fn required_bytes(num_regions: u64) -> u64 {
    let units_bytes = units_for(num_regions) * UNIT_SIZE as u64;
    BITMAP_OFFSET + units_bytes.div_ceil(FORMAT_BLOCK_SIZE) * FORMAT_BLOCK_SIZE
}

/// Refuse a metadata bdev of `have` bytes that cannot hold `num_regions`.
pub fn check_size(have: u64, num_regions: u64) -> Result<(), MetadataError> {
    let need = required_bytes(num_regions);
    if have < need {
        return Err(MetadataError::TooSmall {
            have,
            need,
            num_regions,
        });
    }
    Ok(())
}

/// Byte offset of bitmap unit `unit`.
pub fn unit_offset(unit: u64) -> u64 {
    BITMAP_OFFSET + unit * UNIT_SIZE as u64
}

/// Byte offset of superblock slot `slot` (0 or 1).
pub fn superblock_offset(slot: u32) -> u64 {
    slot as u64 * FORMAT_BLOCK_SIZE
}

/// Units per metadata-bdev block: writes must cover whole blocks, so a
/// bdev with 4096-byte blocks writes units in aligned groups of 8.
pub fn units_per_block(md_block_size: u32) -> u32 {
    (md_block_size as usize / UNIT_SIZE).max(1) as u32
}

/// The superblock's contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub flags: u32,
    /// Bumped on every superblock write; the reader takes the valid slot
    /// with the highest sequence.
    pub sequence: u64,
    /// The clone's uuid: a metadata bdev of another clone is refused.
    pub uuid: Uuid,
    pub source_blocks: u64,
    pub block_size: u32,
    /// Region size in bytes.
    pub region_size: u64,
    pub num_regions: u64,
    pub bitmap_offset: u64,
    pub bitmap_units: u64,
}

impl Superblock {
    /// The first superblock of a freshly formatted clone (sequence 1).
    pub fn new(uuid: Uuid, g: &Geometry) -> Superblock {
        Superblock {
            version: VERSION,
            flags: 0,
            sequence: 1,
            uuid,
            source_blocks: g.source_blocks(),
            block_size: g.block_size(),
            region_size: g.region_size(),
            num_regions: g.num_regions(),
            bitmap_offset: BITMAP_OFFSET,
            bitmap_units: units_for(g.num_regions()),
        }
    }

    /// The same superblock with the next sequence number.
    pub fn next(&self) -> Superblock {
        Superblock {
            sequence: self.sequence + 1,
            ..self.clone()
        }
    }

    /// Bytes this superblock's layout occupies on the metadata bdev.
    pub fn required_bytes(&self) -> u64 {
        required_bytes(self.num_regions)
    }

    fn check_consistent(&self, slot: u32) -> Result<(), MetadataError> {
        let bad = |reason: String| MetadataError::InconsistentSuperblock { slot, reason };
        if self.block_size == 0 || !self.block_size.is_power_of_two() {
            return Err(bad(format!("block_size {}", self.block_size)));
        }
        if !self.region_size.is_power_of_two()
            || !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&self.region_size)
            || !self.region_size.is_multiple_of(self.block_size as u64)
        {
            return Err(bad(format!("region_size {}", self.region_size)));
        }
        let region_blocks = self.region_size / self.block_size as u64;
        if self.source_blocks == 0
            || self.source_blocks.div_ceil(region_blocks) != self.num_regions
            || self.num_regions > MAX_REGIONS
        {
            return Err(bad(format!(
                "num_regions {} does not match {} source blocks of region_size {}",
                self.num_regions, self.source_blocks, self.region_size
            )));
        }
        if self.bitmap_offset != BITMAP_OFFSET {
            return Err(bad(format!("bitmap_offset {}", self.bitmap_offset)));
        }
        if self.bitmap_units != units_for(self.num_regions) {
            return Err(bad(format!(
                "bitmap_units {} for {} regions",
                self.bitmap_units, self.num_regions
            )));
        }
        Ok(())
    }
}

/// What the two superblock slots hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SuperState {
    /// Both slots all-zero: a blank device, to be formatted (if the
    /// bitmap area is all zero too; the opener checks).
    Blank,
    /// The newest valid superblock, the slot it was read from, and whether
    /// the other slot holds the same copy (both current: one lost block
    /// loses nothing; otherwise the opener rewrites the other slot).
    Valid {
        sb: Superblock,
        slot: u32,
        both: bool,
    },
}

impl SuperState {
    /// The slot the next superblock write goes to: never the one holding
    /// the newest valid copy (so a torn write leaves that copy intact).
    pub fn slot_to_write(&self) -> u32 {
        match self {
            SuperState::Blank => 0,
            SuperState::Valid { slot, .. } => 1 - slot,
        }
    }
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Encode `sb` for slot `slot` (the slot number is stored, so a copy found
/// in the wrong block is not trusted). 4096 bytes.
pub fn encode_superblock(sb: &Superblock, slot: u32) -> Vec<u8> {
    let mut b = vec![0u8; FORMAT_BLOCK_SIZE as usize];
    b[SB_MAGIC..SB_MAGIC + 8].copy_from_slice(&MAGIC);
    put_u32(&mut b, SB_VERSION, sb.version);
    put_u32(&mut b, SB_FLAGS, sb.flags);
    put_u64(&mut b, SB_SEQUENCE, sb.sequence);
    b[SB_UUID..SB_UUID + 16].copy_from_slice(sb.uuid.as_bytes());
    put_u64(&mut b, SB_SOURCE_BLOCKS, sb.source_blocks);
    put_u32(&mut b, SB_BLOCK_SIZE, sb.block_size);
    put_u32(&mut b, SB_SLOT, slot);
    put_u64(&mut b, SB_REGION_SIZE, sb.region_size);
    put_u64(&mut b, SB_NUM_REGIONS, sb.num_regions);
    put_u64(&mut b, SB_BITMAP_OFFSET, sb.bitmap_offset);
    put_u64(&mut b, SB_BITMAP_UNITS, sb.bitmap_units);
    let crc = crc32c::crc32c(&b[..SB_CRC]);
    put_u32(&mut b, SB_CRC, crc);
    b
}

/// The first `need` bytes of `b`, holding `what`.
fn prefix<'a>(b: &'a [u8], need: usize, what: &'static str) -> Result<&'a [u8], MetadataError> {
    b.get(..need).ok_or(MetadataError::ShortBuffer {
        what,
        need,
        got: b.len(),
    })
}

enum Slot {
    Zero,
    Invalid(String),
    Valid(Superblock),
}

fn decode_slot(b: &[u8], slot: u32) -> Result<Slot, MetadataError> {
    let b = prefix(b, FORMAT_BLOCK_SIZE as usize, "a superblock slot")?;
    if b.iter().all(|&x| x == 0) {
        return Ok(Slot::Zero);
    }
    if b[SB_MAGIC..SB_MAGIC + 8] != MAGIC {
        return Ok(Slot::Invalid("bad magic".into()));
    }
    let crc = get_u32(b, SB_CRC);
    if crc32c::crc32c(&b[..SB_CRC]) != crc {
        return Ok(Slot::Invalid("bad checksum".into()));
    }
    // Magic and checksum hold: from here on the copy is what a writer meant.
    let version = get_u32(b, SB_VERSION);
    if version != VERSION && version != VERSION_1 {
        return Err(MetadataError::UnsupportedVersion {
            slot,
            found: version,
        });
    }
    if get_u32(b, SB_SLOT) != slot {
        return Ok(Slot::Invalid(format!(
            "written for slot {}",
            get_u32(b, SB_SLOT)
        )));
    }
    let flags = get_u32(b, SB_FLAGS);
    let known = if version == VERSION_1 { 0 } else { KNOWN_FLAGS };
    if flags & !known != 0 {
        return Err(MetadataError::UnsupportedFlags { slot, flags });
    }
    if b[SB_FIELDS_END..SB_CRC].iter().any(|&x| x != 0) {
        return Err(MetadataError::InconsistentSuperblock {
            slot,
            reason: "reserved bytes are not zero".into(),
        });
    }
    let sb = Superblock {
        version,
        flags,
        sequence: get_u64(b, SB_SEQUENCE),
        uuid: Uuid::from_bytes(b[SB_UUID..SB_UUID + 16].try_into().unwrap()),
        source_blocks: get_u64(b, SB_SOURCE_BLOCKS),
        block_size: get_u32(b, SB_BLOCK_SIZE),
        region_size: get_u64(b, SB_REGION_SIZE),
        num_regions: get_u64(b, SB_NUM_REGIONS),
        bitmap_offset: get_u64(b, SB_BITMAP_OFFSET),
        bitmap_units: get_u64(b, SB_BITMAP_UNITS),
    };
    sb.check_consistent(slot)?;
    Ok(Slot::Valid(sb))
}

fn describe_sb(sb: &Superblock) -> String {
    format!(
        "clone {} (version {}, sequence {}, {})",
        sb.uuid,
        sb.version,
        sb.sequence,
        geometry_summary(sb.region_size, sb.block_size, sb.source_blocks)
    )
}

/// Read the two superblock slots (bytes 0..4096 and 4096..8192).
///
/// * Both all-zero: `Blank` (the opener formats the device only if its
///   bitmap area is all zero too).
/// * Otherwise the valid slot with the highest sequence wins; a torn or
///   missing copy in the other slot is fine (the opener rewrites it).
/// * Two valid copies of different clones or geometries: refused (one of
///   them was put there from elsewhere; which one cannot be told).
/// * Neither valid: `CorruptSuperblock`, naming what is wrong with each.
/// * A copy with good magic and checksum but an unknown version or flags is
///   refused outright (a newer writer made it).
pub fn decode_superblock(block0: &[u8], block1: &[u8]) -> Result<SuperState, MetadataError> {
    let s0 = decode_slot(block0, 0)?;
    let s1 = decode_slot(block1, 1)?;
    let describe = |s: &Slot| match s {
        Slot::Zero => "all zero".to_string(),
        Slot::Invalid(r) => r.clone(),
        Slot::Valid(_) => "valid".to_string(),
    };
    match (s0, s1) {
        (Slot::Zero, Slot::Zero) => Ok(SuperState::Blank),
        (Slot::Valid(a), Slot::Valid(b)) => {
            let same_clone = a.uuid == b.uuid
                && a.source_blocks == b.source_blocks
                && a.block_size == b.block_size
                && a.region_size == b.region_size;
            if !same_clone {
                return Err(MetadataError::SlotsDisagree {
                    slot0: describe_sb(&a),
                    slot1: describe_sb(&b),
                });
            }
            let both = a == b;
            if b.sequence > a.sequence {
                Ok(SuperState::Valid {
                    sb: b,
                    slot: 1,
                    both,
                })
            } else {
                Ok(SuperState::Valid {
                    sb: a,
                    slot: 0,
                    both,
                })
            }
        }
        (Slot::Valid(a), _) => Ok(SuperState::Valid {
            sb: a,
            slot: 0,
            both: false,
        }),
        (_, Slot::Valid(b)) => Ok(SuperState::Valid {
            sb: b,
            slot: 1,
            both: false,
        }),
        (a, b) => Err(MetadataError::CorruptSuperblock {
            slot0: describe(&a),
            slot1: describe(&b),
            units: String::new(),
        }),
    }
}

fn geometry_summary(region_size: u64, block_size: u32, source_blocks: u64) -> String {
    format!("region_size {region_size}, block_size {block_size} and {source_blocks} source blocks")
}

/// Refuse a superblock formatted for another geometry, naming the fields
/// that differ (there is no resize).
pub fn check_geometry(sb: &Superblock, expected: &Geometry) -> Result<(), MetadataError> {
    let mut differs = Vec::new();
    if sb.region_size != expected.region_size() {
        differs.push("region_size");
    }
    if sb.block_size != expected.block_size() {
        differs.push("block_size");
    }
    if sb.source_blocks != expected.source_blocks() {
        differs.push("source blocks");
    }
    if differs.is_empty() {
        return Ok(());
    }
    Err(MetadataError::GeometryMismatch {
        found: geometry_summary(sb.region_size, sb.block_size, sb.source_blocks),
        expected: geometry_summary(
            expected.region_size(),
            expected.block_size(),
            expected.source_blocks(),
        ),
        differs: differs.join(", "),
    })
}

/// Refuse a superblock written by another clone.
pub fn check_uuid(sb: &Superblock, expected: Uuid) -> Result<(), MetadataError> {
    if sb.uuid != expected {
        return Err(MetadataError::UuidMismatch {
            found: sb.uuid,
            expected,
        });
    }
    Ok(())
}

/// Checksum of a version 2 unit: CRC-32C of `CLNTGTU2`, the clone's uuid
/// and bytes 4..512 (the index and the words). Bound to the clone, so a
/// unit of another clone does not validate; to its index, so a unit found
/// at another position is named as misplaced.
fn unit_crc(uuid: &Uuid, b: &[u8]) -> u32 {
    let seed = crc32c::crc32c_append(crc32c::crc32c(UNIT_SEED), uuid.as_bytes());
    crc32c::crc32c_append(seed, &b[4..UNIT_SIZE])
}

/// Checksum of a version 1 unit: CRC-32C of bytes 4..512 only.
fn unit_crc_v1(b: &[u8]) -> u32 {
    crc32c::crc32c(&b[4..UNIT_SIZE])
}

fn encode_words(unit_index: u32, words: &[u64; WORDS_PER_UNIT]) -> [u8; UNIT_SIZE] {
    let mut b = [0u8; UNIT_SIZE];
    put_u32(&mut b, 4, unit_index);
    for (i, w) in words.iter().enumerate() {
        put_u64(&mut b, 8 + 8 * i, *w);
    }
    b
}

/// Encode bitmap unit `unit_index` of clone `uuid` from its words:
/// `[crc u32][unit_index u32][63 words LE]` (version 2, see [`unit_crc`]).
pub fn encode_unit_words(
    uuid: &Uuid,
    unit_index: u32,
    words: &[u64; WORDS_PER_UNIT],
) -> [u8; UNIT_SIZE] {
    let mut b = encode_words(unit_index, words);
    let crc = unit_crc(uuid, &b);
    put_u32(&mut b, 0, crc);
    b
}

/// A version 1 unit (the crc over bytes 4..512 alone): what clones made
/// before version 2 hold; for the compatibility tests.
pub fn encode_unit_words_v1(unit_index: u32, words: &[u64; WORDS_PER_UNIT]) -> [u8; UNIT_SIZE] {
    let mut b = encode_words(unit_index, words);
    let crc = unit_crc_v1(&b);
    put_u32(&mut b, 0, crc);
    b
}

/// Encodes a clone's version 2 units into a buffer, byte for byte as
/// [`encode_unit_words`], fast enough to format 2^28 regions (66,576 units)
/// in a few milliseconds. A unit whose words are all zero (every unit of a
/// fresh map) differs from unit 0's image only in its index, and CRC-32C is
/// affine over messages of one length, so its checksum is unit 0's XOR the
/// precomputed contribution of each set bit of the index: no hashing of its
/// 508 bytes. Units with bits go through [`encode_unit_words`].
pub struct UnitEncoder {
    uuid: Uuid,
    /// Checksum of the all-zero unit 0.
    zero_crc: u32,
    /// What bit `b` of the index changes in an all-zero unit's checksum.
    index_bit_crc: [u32; 32],
}

impl UnitEncoder {
    pub fn new(uuid: &Uuid) -> UnitEncoder {
        let zero = [0u64; WORDS_PER_UNIT];
        let crc_of = |index: u32| get_u32(&encode_unit_words(uuid, index, &zero), 0);
        let zero_crc = crc_of(0);
        let mut index_bit_crc = [0u32; 32];
        for (b, c) in index_bit_crc.iter_mut().enumerate() {
            *c = crc_of(1 << b) ^ zero_crc;
        }
        UnitEncoder {
            uuid: *uuid,
            zero_crc,
            index_bit_crc,
        }
    }

    /// Write unit `unit_index` holding `words` into `out` (its first
    /// [`UNIT_SIZE`] bytes).
    pub fn encode_into(&self, unit_index: u32, words: &[u64; WORDS_PER_UNIT], out: &mut [u8]) {
        let out = &mut out[..UNIT_SIZE];
        if words.iter().any(|&w| w != 0) {
            out.copy_from_slice(&encode_unit_words(&self.uuid, unit_index, words));
            return;
        }
        let (mut crc, mut bits) = (self.zero_crc, unit_index);
        while bits != 0 {
            crc ^= self.index_bit_crc[bits.trailing_zeros() as usize];
            bits &= bits - 1;
        }
        put_u32(out, 0, crc);
        put_u32(out, 4, unit_index);
        out[8..].fill(0);
    }
}

/// Encode unit `unit_index` from the live map. Only for a map nobody is
/// setting bits in; a commit encodes the snapshot the router took
/// (`router::UnitImage`), see docs/metadata.md "Commit".
pub fn encode_unit(uuid: &Uuid, unit_index: u32, map: &RegionMap) -> [u8; UNIT_SIZE] {
    encode_unit_words(uuid, unit_index, &map.unit_words(unit_index as u64))
}

/// How units are checked: the clone's uuid and the superblock's version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnitKey {
    pub uuid: Uuid,
    pub version: u32,
}

impl UnitKey {
    pub fn of(sb: &Superblock) -> UnitKey {
        UnitKey {
            uuid: sb.uuid,
            version: sb.version,
        }
    }
}

/// Decode a unit read from [`unit_offset`]`(expected_index)`.
///
/// Version 2: every unit was written at format time, so an all-zero unit
/// is damage (zeroed), as is a checksum that does not match this clone's
/// uuid (damaged, or another clone's unit) or an index that is not the
/// unit's position (misplaced). Version 1 (and units an interrupted
/// upgrade rewrote): an all-zero unit was never written and is all-cold;
/// either checksum is accepted.
pub fn decode_unit(
    bytes: &[u8],
    expected_index: u32,
    key: &UnitKey,
) -> Result<[u64; WORDS_PER_UNIT], MetadataError> {
    let b = prefix(bytes, UNIT_SIZE, "a bitmap unit")?;
    let bad = |reason: String| MetadataError::CorruptUnit {
        unit: expected_index as u64,
        reason,
    };
    let mut words = [0u64; WORDS_PER_UNIT];
    if b.iter().all(|&x| x == 0) {
        if key.version == VERSION_1 {
            return Ok(words);
        }
        return Err(bad("all zero (zeroed: a formatted unit never is)".into()));
    }
    let crc = get_u32(b, 0);
    let ok = crc == unit_crc(&key.uuid, b) || (key.version == VERSION_1 && crc == unit_crc_v1(b));
    if !ok {
        let why = if crc == unit_crc_v1(b) {
            "a version 1 unit in version 2 metadata".to_string()
        } else {
            format!(
                "checksum does not match clone {} (damaged, or another clone's unit)",
                key.uuid
            )
        };
        return Err(bad(why));
    }
    let index = get_u32(b, 4);
    if index != expected_index {
        return Err(bad(format!("holds unit {index} (misplaced)")));
    }
    for (i, w) in words.iter_mut().enumerate() {
        *w = get_u64(b, 8 + 8 * i);
    }
    Ok(words)
}

/// Damaged units found while loading the bitmap: all are counted, the
/// first few named.
#[derive(Clone, Debug, Default)]
pub struct UnitDamage {
    pub count: u64,
    pub named: Vec<(u64, String)>,
}

impl UnitDamage {
    const NAMED: usize = 4;

    fn add(&mut self, unit: u64, e: MetadataError) {
        self.count += 1;
        if self.named.len() < Self::NAMED {
            let reason = match e {
                MetadataError::CorruptUnit { reason, .. } => reason,
                other => other.to_string(),
            };
            self.named.push((unit, reason));
        }
    }

    /// The error for `total` units, if any was damaged.
    pub fn into_error(self, total: u64) -> Result<(), MetadataError> {
        if self.count == 0 {
            return Ok(());
        }
        let mut detail: Vec<String> = self
            .named
            .iter()
            .map(|(u, r)| format!("unit {u}: {r}"))
            .collect();
        if self.count > self.named.len() as u64 {
            detail.push(format!("{} more", self.count - self.named.len() as u64));
        }
        Err(MetadataError::DamagedUnits {
            count: self.count,
            total,
            detail: detail.join("; "),
        })
    }
}

/// Decode a run of consecutive units starting at `first_unit` from `bytes`
/// (as read from `unit_offset(first_unit)`) into `map`; damaged units
/// (including bits past the last region) go to `damage` and load nothing.
pub fn load_units(
    map: &RegionMap,
    first_unit: u64,
    bytes: &[u8],
    key: &UnitKey,
    damage: &mut UnitDamage,
) {
    for (i, chunk) in bytes.chunks(UNIT_SIZE).enumerate() {
        let unit = first_unit + i as u64;
        if unit >= map.num_units() {
            break;
        }
        let loaded = decode_unit(chunk, unit as u32, key).and_then(|words| {
            map.load_unit(unit, &words)
                .map_err(|e| MetadataError::CorruptUnit {
                    unit,
                    reason: e.to_string(),
                })
        });
        if let Err(e) = loaded {
            damage.add(unit, e);
        }
    }
}

/// Load the whole bitmap area (`bitmap_units × 512` bytes from byte 8192)
/// in one call; the error names the damage.
pub fn load_bitmap(map: &RegionMap, bytes: &[u8], key: &UnitKey) -> Result<(), MetadataError> {
    let mut damage = UnitDamage::default();
    load_units(map, 0, bytes, key, &mut damage);
    damage.into_error(map.num_units())
}

/// What a bitmap area without a superblock holds: units that are not all
/// zero, and of those, units with any region bit set.
pub fn scan_units(bytes: &[u8]) -> (u64, u64) {
    let (mut nonzero, mut with_bits) = (0, 0);
    // OR-folds rather than `any`: without the early exit they vectorize,
    // and a blank area (what a create checks) is read to its end anyway.
    let zero = |b: &[u8]| b.iter().fold(0u8, |a, &x| a | x) == 0;
    for u in bytes.chunks(UNIT_SIZE) {
        if !zero(u) {
            nonzero += 1;
            if u.len() > 8 && !zero(&u[8..]) {
                with_bits += 1;
            }
        }
    }
    (nonzero, with_bits)
}

/// Group sorted unit indices into runs of whole metadata blocks:
/// each returned range starts and ends on a multiple of `per_block`
/// (clamped to `num_units`, the last block may be short of units but the
/// write covers a whole block: the executor pads with zero units, which are
/// valid). Adjacent blocks merge; a run is at most `max_units` long
/// (rounded down to whole blocks, at least one block).
pub fn unit_extents(
    units: &[u32],
    per_block: u32,
    num_units: u64,
    max_units: u64,
) -> Vec<Range<u64>> {
    let per = per_block.max(1) as u64;
    let max = (max_units / per).max(1) * per;
    let mut out: Vec<Range<u64>> = Vec::new();
    for &u in units {
        let s = u as u64 / per * per;
        let e = (s + per).min(num_units.div_ceil(per) * per);
        match out.last_mut() {
            // Already inside the last extent (same block).
            Some(last) if e <= last.end => {}
            Some(last) if s == last.end && e - last.start <= max => last.end = e,
            _ => out.push(s..e),
        }
    }
    out
}

/// Regions covered by unit `unit`.
pub fn unit_regions(unit: u64, num_regions: u64) -> Range<u64> {
    let s = (unit * REGIONS_PER_UNIT).min(num_regions);
    s..(s + REGIONS_PER_UNIT).min(num_regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geo(blocks: u64, region: u64) -> Geometry {
        Geometry::new(blocks, 512, blocks, 512, region).unwrap()
    }

    /// A decoded superblock `sb` from `slot` (`both`: the other slot holds it too).
    fn valid(sb: &Superblock, slot: u32, both: bool) -> SuperState {
        SuperState::Valid {
            sb: sb.clone(),
            slot,
            both,
        }
    }

    fn uuid() -> Uuid {
        Uuid::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788)
    }

    #[test]
    fn sizing() {
        assert_eq!(required_bytes(1), 8192 + 4096);
        assert_eq!(required_bytes(4032 * 8), 8192 + 4096);
        assert_eq!(required_bytes(4032 * 8 + 1), 8192 + 8192);
        // 1 TiB at 4 KiB: 2^28 regions, 66,577 units, about 32.5 MiB.
        let n = 1u64 << 28;
        assert_eq!(units_for(n), 66_577);
        assert_eq!(
            required_bytes(n),
            8192 + (66_577u64 * 512).div_ceil(4096) * 4096
        );
        // 2^32 regions still have u32 unit indices.
        assert!(units_for(1 << 32) < u32::MAX as u64);
        let e = check_size(16 << 10, 1 << 18).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "metadata bdev too small: needs {} bytes for 262144 regions, has 16384 bytes",
                required_bytes(1 << 18)
            )
        );
        assert!(check_size(required_bytes(1 << 18), 1 << 18).is_ok());
    }

    #[test]
    fn superblock_round_trip_and_slots() {
        let g = geo(1 << 20, 65536);
        let sb = Superblock::new(uuid(), &g);
        let zero = vec![0u8; 4096];
        assert_eq!(decode_superblock(&zero, &zero).unwrap(), SuperState::Blank);
        assert_eq!(SuperState::Blank.slot_to_write(), 0);

        let b0 = encode_superblock(&sb, 0);
        let st = decode_superblock(&b0, &zero).unwrap();
        assert_eq!(st, valid(&sb, 0, false));
        assert_eq!(st.slot_to_write(), 1);
        // Both slots current.
        let b1 = encode_superblock(&sb, 1);
        assert_eq!(decode_superblock(&b0, &b1).unwrap(), valid(&sb, 0, true));
        // Either one lost: the other still holds the clone.
        assert_eq!(decode_superblock(&zero, &b1).unwrap(), valid(&sb, 1, false));

        // The next write goes to slot 1 with a higher sequence and wins.
        let sb2 = sb.next();
        let b1 = encode_superblock(&sb2, 1);
        let st = decode_superblock(&b0, &b1).unwrap();
        assert_eq!(st, valid(&sb2, 1, false));
        assert_eq!(st.slot_to_write(), 0);

        // A torn write of slot 0 (sequence 3) leaves slot 1 in charge.
        let sb3 = sb2.next();
        let mut torn = encode_superblock(&sb3, 0);
        torn[2048..].copy_from_slice(&b0[2048..]);
        assert_eq!(
            decode_superblock(&torn, &b1).unwrap(),
            valid(&sb2, 1, false)
        );
        // A copy written for slot 1 found in block 0 is not trusted.
        let misplaced = encode_superblock(&sb3, 1);
        assert_eq!(
            decode_superblock(&misplaced, &b1).unwrap(),
            valid(&sb2, 1, false)
        );
        // Two valid copies of different clones: refused, naming both.
        let other = Superblock::new(Uuid::from_u128(9), &g);
        let e = decode_superblock(&encode_superblock(&other, 0), &b1).unwrap_err();
        assert!(matches!(e, MetadataError::SlotsDisagree { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&Uuid::from_u128(9).to_string()) && msg.contains(&uuid().to_string()),
            "{msg}"
        );
        // A version 1 copy and its version 2 upgrade (interrupted): the
        // newer wins.
        let mut v1 = Superblock::new(uuid(), &g);
        v1.version = VERSION_1;
        let st = decode_superblock(&encode_superblock(&v1, 0), &b1).unwrap();
        assert!(matches!(st, SuperState::Valid { slot: 1, .. }), "{st:?}");
    }

    #[test]
    fn corrupt_superblocks_are_errors_not_blank() {
        let g = geo(1 << 20, 65536);
        let zero = vec![0u8; 4096];
        let mut junk = vec![0u8; 4096];
        junk[100] = 1;
        let e = decode_superblock(&junk, &zero).unwrap_err();
        assert_eq!(
            e.to_string(),
            "metadata damaged: superblock slots 0 and 1 unreadable (slot 0: bad magic; slot 1: all zero)"
        );
        let mut bad = encode_superblock(&Superblock::new(uuid(), &g), 0);
        bad[SB_SEQUENCE] ^= 1;
        let e = decode_superblock(&bad, &junk).unwrap_err();
        assert!(
            e.to_string()
                .contains("slot 0: bad checksum; slot 1: bad magic"),
            "{e}"
        );

        // A newer version is refused even if the other slot is valid.
        let mut v2 = Superblock::new(uuid(), &g);
        v2.version = 3;
        let b = encode_superblock(&v2, 1);
        let ok = encode_superblock(&Superblock::new(uuid(), &g), 0);
        assert_eq!(
            decode_superblock(&ok, &b).unwrap_err(),
            MetadataError::UnsupportedVersion { slot: 1, found: 3 }
        );
        let mut fl = Superblock::new(uuid(), &g);
        fl.flags = 4;
        let mut v1f = Superblock::new(uuid(), &g);
        v1f.version = VERSION_1;
        v1f.flags = FLAG_FORMATTING;
        assert!(matches!(
            decode_superblock(&encode_superblock(&v1f, 0), &zero),
            Err(MetadataError::UnsupportedFlags { slot: 0, flags: 1 })
        ));
        assert!(matches!(
            decode_superblock(&encode_superblock(&fl, 0), &zero),
            Err(MetadataError::UnsupportedFlags { slot: 0, flags: 4 })
        ));
        // Internally inconsistent (num_regions wrong) with a good checksum.
        let mut inc = Superblock::new(uuid(), &g);
        inc.num_regions += 1;
        assert!(matches!(
            decode_superblock(&encode_superblock(&inc, 0), &zero),
            Err(MetadataError::InconsistentSuperblock { slot: 0, .. })
        ));
        assert!(matches!(
            decode_superblock(&zero[..100], &zero),
            Err(MetadataError::ShortBuffer { .. })
        ));
    }

    #[test]
    fn geometry_and_uuid_mismatch_messages() {
        let formatted = geo(1 << 20, 65536);
        let sb = Superblock::new(uuid(), &formatted);
        assert!(check_geometry(&sb, &formatted).is_ok());
        let e = check_geometry(&sb, &geo(1 << 20, 4096)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "metadata was formatted for region_size 65536, block_size 512 and 1048576 source blocks; \
             this clone has region_size 4096, block_size 512 and 1048576 source blocks (differs: region_size)"
        );
        let e = check_geometry(&sb, &geo((1 << 20) + 1, 65536)).unwrap_err();
        assert!(e.to_string().ends_with("(differs: source blocks)"), "{e}");
        let g4k = Geometry::new(1 << 17, 4096, 1 << 17, 4096, 65536).unwrap();
        let e = check_geometry(&sb, &g4k).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("(differs: block_size, source blocks)"),
            "{e}"
        );
        // Same geometry, another clone.
        let other = Uuid::from_u128(7);
        let e = check_uuid(&sb, other).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "metadata belongs to clone {}, not to clone {}",
                uuid(),
                other
            )
        );
        assert!(check_uuid(&sb, uuid()).is_ok());
    }

    fn key() -> UnitKey {
        UnitKey {
            uuid: uuid(),
            version: VERSION,
        }
    }

    #[test]
    fn units_round_trip_and_detect_corruption() {
        let u0 = uuid();
        let map = RegionMap::new(3 * REGIONS_PER_UNIT);
        map.set(0);
        map.set(REGIONS_PER_UNIT + 77);
        map.set(3 * REGIONS_PER_UNIT - 1);
        for u in 0..3u32 {
            let b = encode_unit(&u0, u, &map);
            assert_eq!(
                decode_unit(&b, u, &key()).unwrap(),
                map.unit_words(u as u64)
            );
        }
        // An encoded empty unit is not all-zero, and an all-zero unit is
        // damage in version 2 (all-cold only in version 1).
        let empty = encode_unit_words(&u0, 0, &[0; WORDS_PER_UNIT]);
        assert!(empty.iter().any(|&x| x != 0));
        assert_eq!(
            decode_unit(&[0u8; 512], 5, &key()).unwrap_err().to_string(),
            "metadata damaged: bitmap unit 5: all zero (zeroed: a formatted unit never is)"
        );
        let v1 = UnitKey {
            version: VERSION_1,
            ..key()
        };
        assert_eq!(
            decode_unit(&[0u8; 512], 5, &v1).unwrap(),
            [0; WORDS_PER_UNIT]
        );

        let good = encode_unit(&u0, 1, &map);
        let mut flipped = good;
        flipped[300] ^= 0x10;
        assert!(decode_unit(&flipped, 1, &key())
            .unwrap_err()
            .to_string()
            .starts_with("metadata damaged: bitmap unit 1: checksum does not match clone"));
        // A unit written to the wrong place (misdirected write).
        assert_eq!(
            decode_unit(&good, 2, &key()).unwrap_err().to_string(),
            "metadata damaged: bitmap unit 2: holds unit 1 (misplaced)"
        );
        // Another clone's unit, same index and bits.
        let foreign = encode_unit(&Uuid::from_u128(5), 1, &map);
        let e = decode_unit(&foreign, 1, &key()).unwrap_err().to_string();
        assert!(e.contains("another clone's unit"), "{e}");
        // A version 1 unit: accepted under a version 1 superblock only.
        let old = encode_unit_words_v1(1, &map.unit_words(1));
        assert_eq!(decode_unit(&old, 1, &v1).unwrap(), map.unit_words(1));
        assert!(decode_unit(&old, 1, &key())
            .unwrap_err()
            .to_string()
            .contains("a version 1 unit"));
        // An interrupted upgrade leaves version 2 units under a version 1
        // superblock: accepted.
        assert_eq!(decode_unit(&good, 1, &v1).unwrap(), map.unit_words(1));
        // Bits past the last region.
        let small = RegionMap::new(100);
        let mut w = [0u64; WORDS_PER_UNIT];
        w[1] = 1 << 40;
        let b = encode_unit_words(&u0, 0, &w);
        assert!(matches!(
            load_bitmap(&small, &b, &key()),
            Err(MetadataError::DamagedUnits {
                count: 1,
                total: 1,
                ..
            })
        ));
    }

    #[test]
    fn load_units_rebuilds_the_map_and_names_every_damaged_unit() {
        let n = 5 * REGIONS_PER_UNIT + 7;
        let map = RegionMap::new(n);
        map.set_range(100..9000);
        map.set(n - 1);
        let mut area = vec![0u8; (map.num_units() as usize) * UNIT_SIZE];
        for u in 0..map.num_units() {
            area[u as usize * UNIT_SIZE..][..UNIT_SIZE].copy_from_slice(&encode_unit(
                &uuid(),
                u as u32,
                &map,
            ));
        }
        let back = RegionMap::new(n);
        load_bitmap(&back, &area, &key()).unwrap();
        for r in 0..n {
            assert_eq!(back.is_hydrated(r), map.is_hydrated(r));
        }
        // Unit 3 zeroed, unit 4 a copy of unit 2: both named.
        area[3 * UNIT_SIZE..4 * UNIT_SIZE].fill(0);
        area.copy_within(2 * UNIT_SIZE..3 * UNIT_SIZE, 4 * UNIT_SIZE);
        let e = load_bitmap(&RegionMap::new(n), &area, &key()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "metadata damaged: 2 of 6 bitmap units unusable (unit 3: all zero (zeroed: a formatted \
             unit never is); unit 4: holds unit 2 (misplaced))"
        );
        assert_eq!(scan_units(&area), (5, 5));
    }

    #[test]
    fn extents_cover_whole_metadata_blocks() {
        assert_eq!(unit_extents(&[0, 1, 5], 1, 10, 100), vec![0..2, 5..6]);
        assert_eq!(unit_extents(&[0, 1, 5, 9, 17], 8, 18, 100), vec![0..24]);
        assert_eq!(
            unit_extents(&[0, 9, 17], 8, 18, 8),
            vec![0..8, 8..16, 16..24]
        );
        assert_eq!(unit_extents(&[3], 8, 4, 100), vec![0..8]);
        assert_eq!(units_per_block(512), 1);
        assert_eq!(units_per_block(4096), 8);
        assert_eq!(unit_offset(0), 8192);
        assert_eq!(unit_offset(8) % 4096, 0);
        assert_eq!(superblock_offset(1), 4096);
        assert_eq!(unit_regions(1, 5000), 4032..5000);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The fast encoder writes exactly what `encode_unit_words` does,
        /// for any uuid and index, with and without region bits.
        #[test]
        fn unit_encoder_matches_encode_unit_words(
            u in any::<u128>(),
            index in any::<u32>(),
            low_index in 0u32..70_000,
            word in 0usize..WORDS_PER_UNIT,
            bits in any::<u64>(),
        ) {
            let id = Uuid::from_u128(u);
            let enc = UnitEncoder::new(&id);
            let mut words = [0u64; WORDS_PER_UNIT];
            let mut out = [0xa5u8; UNIT_SIZE + 1];
            for i in [index, low_index, 0, 1, u32::MAX] {
                enc.encode_into(i, &words, &mut out);
                prop_assert_eq!(&out[..UNIT_SIZE], &encode_unit_words(&id, i, &words)[..]);
            }
            prop_assert_eq!(out[UNIT_SIZE], 0xa5, "nothing past the unit");
            words[word] = bits;
            enc.encode_into(index, &words, &mut out);
            prop_assert_eq!(&out[..UNIT_SIZE], &encode_unit_words(&id, index, &words)[..]);
        }

        /// A multi-unit write torn at sector granularity: every unit reads
        /// back as either its old or its new image, both decode, and each
        /// bit is old-or-new, never garbage.
        #[test]
        fn torn_multi_unit_write(
            n_units in 1u64..8,
            old_sets in proptest::collection::vec(0u64..4032 * 8, 0..100),
            new_sets in proptest::collection::vec(0u64..4032 * 8, 0..100),
            tear in proptest::collection::vec(any::<bool>(), 8),
        ) {
            let n = n_units * REGIONS_PER_UNIT - 3;
            let map = RegionMap::new(n);
            for r in old_sets { map.set(r % n); }
            let old: Vec<[u8; UNIT_SIZE]> = (0..n_units).map(|u| encode_unit(&uuid(), u as u32, &map)).collect();
            let old_words: Vec<_> = (0..n_units).map(|u| map.unit_words(u)).collect();
            for r in new_sets { map.set(r % n); } // bits only go 0 -> 1
            let new: Vec<[u8; UNIT_SIZE]> = (0..n_units).map(|u| encode_unit(&uuid(), u as u32, &map)).collect();
            let mut disk = Vec::new();
            for u in 0..n_units as usize {
                disk.extend_from_slice(if tear[u] { &new[u] } else { &old[u] });
            }
            let back = RegionMap::new(n);
            load_bitmap(&back, &disk, &key()).unwrap();
            for r in 0..n {
                let u = (r / REGIONS_PER_UNIT) as usize;
                let bit = r % REGIONS_PER_UNIT;
                let was = old_words[u][(bit / 64) as usize] & (1 << (bit % 64)) != 0;
                let now = map.is_hydrated(r);
                let got = back.is_hydrated(r);
                prop_assert!(got == was || got == now);
                // The torn result never claims a region the new image lacks.
                prop_assert!(!got || now);
            }
        }
    }
}
