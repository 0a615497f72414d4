//! The metadata device's I/O (the format is `metadata.rs`, documented in
//! `docs/metadata.md`): read the superblocks and the bitmap area, open a
//! clone's metadata (decide format / load / refuse, naming the damage),
//! format, repair (heal a slot, upgrade version 1), and the recheck after a
//! failed commit.

use std::collections::VecDeque;

use bdev::{util, BdevIo, IoChannel, IoStatus, IoType};
use reactor::DmaBuf;
use uuid::Uuid;

use crate::clone::Shared;
use crate::error::CloneError;
use crate::geometry::Geometry;
use crate::metadata::{
    self, MetadataError, SuperState, Superblock, UnitKey, BITMAP_OFFSET, FORMAT_BLOCK_SIZE,
    UNIT_SIZE,
};
use crate::region_map::{units_for, RegionMap, WORDS_PER_UNIT};

/// Metadata is read and zeroed in I/Os of this size.
pub(crate) const MD_IO_BYTES: u64 = 4 << 20;

/// Read the committed superblock back and check it is still this clone's
/// (dm-clone reopens its metadata after a failed commit).
pub(crate) async fn recheck_metadata(md: &IoChannel, sh: &Shared) -> Result<(), String> {
    match read_superblock(md).await.map_err(|e| e.to_string())? {
        SuperState::Valid { sb, .. } => {
            metadata::check_geometry(&sb, &sh.geo).map_err(|e| e.to_string())?;
            metadata::check_uuid(&sb, sh.uuid).map_err(|e| e.to_string())
        }
        SuperState::Blank => Err("the superblock is gone (all zero)".into()),
    }
}

/// Read and decode both superblock slots.
pub(crate) async fn read_superblock(md: &IoChannel) -> Result<SuperState, CloneError> {
    let mdbs = md.bdev().block_size() as u64;
    let sb = util::read(md, 0, BITMAP_OFFSET / mdbs)
        .await
        .map_err(|s| io_err("metadata superblock read", s))?;
    let fb = FORMAT_BLOCK_SIZE as usize;
    Ok(metadata::decode_superblock(
        &sb.as_slice()[..fb],
        &sb.as_slice()[fb..2 * fb],
    )?)
}

pub(crate) fn io_err(what: &str, st: IoStatus) -> CloneError {
    CloneError::Io(format!("{what} failed ({})", st.name()))
}

/// Read the metadata area after the superblocks (`bytes` of it) in large
/// I/Os, handing each piece and its first unit to `f`.
pub(crate) async fn read_bitmap_area(
    md: &IoChannel,
    bytes: u64,
    mut f: impl FnMut(u64, &[u8]),
) -> Result<(), CloneError> {
    let mdbs = md.bdev().block_size() as u64;
    let total = bytes.div_ceil(mdbs) * mdbs;
    let mut at = 0u64;
    while at < total {
        let n = MD_IO_BYTES.min(total - at);
        let b = util::read(md, (BITMAP_OFFSET + at) / mdbs, n / mdbs)
            .await
            .map_err(|s| io_err("metadata bitmap read", s))?;
        f(at / UNIT_SIZE as u64, b.as_slice());
        at += n;
    }
    Ok(())
}

/// What the bitmap area of a device without a valid superblock holds, for
/// the refusal (", 12 bitmap units hold hydrated regions"); empty when it
/// is all zero.
pub(crate) async fn describe_bitmap_area(
    md: &IoChannel,
    num_regions: u64,
) -> Result<String, CloneError> {
    let units = units_for(num_regions);
    let (mut nonzero, mut with_bits) = (0u64, 0u64);
    read_bitmap_area(md, units * UNIT_SIZE as u64, |first, b| {
        let keep = ((units - first.min(units)) as usize * UNIT_SIZE).min(b.len());
        let (n, w) = metadata::scan_units(&b[..keep]);
        nonzero += n;
        with_bits += w;
    })
    .await?;
    Ok(match (nonzero, with_bits) {
        (0, _) => String::new(),
        (n, 0) => format!(", {n} bitmap units are not blank (none holds a hydrated region)"),
        (_, w) => format!(", {w} bitmap units hold hydrated regions"),
    })
}

/// A metadata write an open decided on, made only once the create can no
/// longer fail for another reason.
pub(crate) enum Repair {
    /// Version 1 metadata: rewrite every unit as version 2, then both
    /// superblock slots.
    Upgrade { sb: Superblock, slot: u32 },
    /// One slot is stale or damaged: write the current copy there.
    Heal { sb: Superblock, slot: u32 },
}

/// The outcome of reading a clone's metadata.
pub(crate) enum Opened {
    /// Blank, an interrupted format, or `force_format`: format with this
    /// uuid.
    Format(Uuid),
    /// A clone's metadata, loaded into the map.
    Loaded { uuid: Uuid, repair: Option<Repair> },
}

/// Read a clone's metadata without writing anything: decide whether to
/// format (blank device, interrupted format, `force`), or check the
/// superblock against the clone and load the bitmap into `map`. Anything
/// else is refused, naming the damage.
pub(crate) async fn open_metadata(
    md: &IoChannel,
    geo: &Geometry,
    state: Result<SuperState, CloneError>,
    want: Option<Uuid>,
    force: bool,
    map: &RegionMap,
) -> Result<Opened, CloneError> {
    if force {
        return Ok(Opened::Format(want.unwrap_or_else(Uuid::new_v4)));
    }
    let (sb, slot, both) = match state {
        Err(CloneError::Metadata(MetadataError::CorruptSuperblock { slot0, slot1, .. })) => {
            let units = describe_bitmap_area(md, geo.num_regions()).await?;
            return Err(MetadataError::CorruptSuperblock {
                slot0,
                slot1,
                units,
            }
            .into());
        }
        Err(e) => return Err(e),
        Ok(SuperState::Blank) => {
            // Blank only if nothing at all is written: a clone whose two
            // superblock blocks were lost is not formatted over.
            let units = describe_bitmap_area(md, geo.num_regions()).await?;
            if !units.is_empty() {
                return Err(MetadataError::CorruptSuperblock {
                    slot0: "all zero".into(),
                    slot1: "all zero".into(),
                    units,
                }
                .into());
            }
            return Ok(Opened::Format(want.unwrap_or_else(Uuid::new_v4)));
        }
        Ok(SuperState::Valid { sb, slot, both }) => (sb, slot, both),
    };
    if sb.flags & metadata::FLAG_FORMATTING != 0 {
        // A format that never finished: no clone ever ran on it.
        return Ok(Opened::Format(want.unwrap_or(sb.uuid)));
    }
    metadata::check_geometry(&sb, geo)?;
    if let Some(u) = want {
        metadata::check_uuid(&sb, u)?;
    }
    let key = UnitKey::of(&sb);
    let mut damage = metadata::UnitDamage::default();
    read_bitmap_area(md, sb.bitmap_units * UNIT_SIZE as u64, |first, b| {
        metadata::load_units(map, first, b, &key, &mut damage)
    })
    .await?;
    damage.into_error(map.num_units())?;
    let repair = if sb.version == metadata::VERSION_1 {
        Some(Repair::Upgrade {
            sb: sb.clone(),
            slot,
        })
    } else if !both {
        Some(Repair::Heal {
            sb: sb.clone(),
            slot: 1 - slot,
        })
    } else {
        None
    };
    Ok(Opened::Loaded {
        uuid: sb.uuid,
        repair,
    })
}

/// Write `sb` to each of `slots` in turn, flushing after each, so a torn
/// write damages one copy at most.
pub(crate) async fn write_superblock(
    md: &IoChannel,
    sb: &Superblock,
    slots: &[u32],
) -> Result<(), CloneError> {
    let mdbs = md.bdev().block_size() as u64;
    for &slot in slots {
        let img = metadata::encode_superblock(sb, slot);
        let mut buf = DmaBuf::new(img.len());
        buf.as_mut_slice().copy_from_slice(&img);
        util::write(md, metadata::superblock_offset(slot) / mdbs, buf, false)
            .await
            .map_err(|s| io_err("metadata superblock write", s))?;
        flush_metadata(md).await?;
    }
    Ok(())
}

/// Flush the whole metadata bdev.
async fn flush_metadata(md: &IoChannel) -> Result<(), CloneError> {
    util::simple(md, IoType::Flush, 0, md.bdev().num_blocks())
        .await
        .map_err(|s| io_err("metadata flush", s))
}

/// Unit writes of [`write_all_units`] in flight at once: the next piece is
/// encoded while the device writes the previous ones.
const UNIT_WRITES_IN_FLIGHT: usize = 4;

/// Write every unit of `map` (version 2, bound to `uuid`) and flush, in
/// [`MD_IO_BYTES`] writes with up to [`UNIT_WRITES_IN_FLIGHT`] in flight.
/// On a failed write, the writes already in flight are waited for (none
/// lands after the error is returned) and nothing is flushed.
pub(crate) async fn write_all_units(
    md: &IoChannel,
    uuid: &Uuid,
    map: &RegionMap,
) -> Result<(), CloneError> {
    let mdbs = md.bdev().block_size() as u64;
    let units = map.num_units();
    let per_io = MD_IO_BYTES / UNIT_SIZE as u64;
    let enc = metadata::UnitEncoder::new(uuid);
    // Bits are only ever set, each counted once: a count of zero is an
    // all-zero map (every format's), whose words need not be read (for
    // 2^28 regions, faulting in 32 MiB of untouched map for nothing).
    let clear = map.hydrated_count() == 0;
    const ZERO: [u64; WORDS_PER_UNIT] = [0; WORDS_PER_UNIT];
    let mut in_flight = VecDeque::with_capacity(UNIT_WRITES_IN_FLIGHT);
    let mut spare: Vec<DmaBuf> = Vec::new();
    let mut failed = None;
    let mut first = 0u64;
    while first < units && failed.is_none() {
        if in_flight.len() == UNIT_WRITES_IN_FLIGHT {
            let io = in_flight.pop_front().expect("in flight").await;
            reap(io, &mut spare, &mut failed);
            continue;
        }
        let n = per_io.min(units - first);
        let bytes = (n * UNIT_SIZE as u64).div_ceil(mdbs) * mdbs;
        let mut b = spare
            .pop()
            .unwrap_or_else(|| DmaBuf::new(MD_IO_BYTES as usize));
        let s = &mut b.as_mut_slice()[..bytes as usize];
        for (i, out) in s.chunks_exact_mut(UNIT_SIZE).take(n as usize).enumerate() {
            let u = first + i as u64;
            let words = if clear { ZERO } else { map.unit_words(u) };
            enc.encode_into(u as u32, &words, out);
        }
        // The tail of a last partial block: zero units, never read.
        s[n as usize * UNIT_SIZE..].fill(0);
        let off = metadata::unit_offset(first) / mdbs;
        in_flight.push_back(util::submit(
            md,
            IoType::Write,
            off,
            bytes / mdbs,
            Some(b),
            false,
        ));
        first += n;
    }
    for f in in_flight {
        reap(f.await, &mut spare, &mut failed);
    }
    match failed {
        Some(st) => Err(io_err("metadata bitmap write", st)),
        None => flush_metadata(md).await,
    }
}

/// A finished unit write: keep its buffer, note the first failure.
fn reap(mut io: Box<BdevIo>, spare: &mut Vec<DmaBuf>, failed: &mut Option<IoStatus>) {
    if !io.status.is_success() && failed.is_none() {
        *failed = Some(io.status);
    }
    spare.extend(io.buf.take());
}

/// Format: a superblock saying "formatting" in both slots, every unit
/// (empty, bound to the uuid), then the real superblock in both slots. A
/// crash at any point leaves either a formatting superblock (formatted
/// again on the next create) or a complete format.
pub(crate) async fn format_metadata(
    md: &IoChannel,
    geo: &Geometry,
    uuid: Uuid,
    map: &RegionMap,
) -> Result<(), CloneError> {
    let mut sb = Superblock::new(uuid, geo);
    sb.flags = metadata::FLAG_FORMATTING;
    write_superblock(md, &sb, &[0, 1]).await?;
    write_all_units(md, &uuid, map).await?;
    let done = Superblock {
        flags: 0,
        ..sb.next()
    };
    write_superblock(md, &done, &[1, 0]).await
}

/// Carry out an open's [`Repair`].
pub(crate) async fn repair_metadata(
    md: &IoChannel,
    map: &RegionMap,
    repair: Repair,
    name: &str,
) -> Result<(), CloneError> {
    match repair {
        Repair::Upgrade { sb, slot } => {
            tracing::info!(clone = %name, "upgrading metadata from version 1 to {}", metadata::VERSION);
            write_all_units(md, &sb.uuid, map).await?;
            let new = Superblock {
                version: metadata::VERSION,
                ..sb.next()
            };
            // The slot not holding the version 1 copy first.
            write_superblock(md, &new, &[1 - slot, slot]).await
        }
        Repair::Heal { sb, slot } => {
            tracing::warn!(clone = %name, slot, "metadata superblock slot {slot} was stale or damaged: rewritten");
            write_superblock(md, &sb, &[slot]).await
        }
    }
}
