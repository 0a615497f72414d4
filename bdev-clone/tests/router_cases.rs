//! Targeted router tests, one or more per dm-clone bug class
//! (dm-clone.md §1.4-1.9, §2) and per routing rule.

#[macro_use]
mod common;

use std::sync::Arc;

use bdev_clone::commit::{CommitRounds, Committer};
use bdev_clone::metadata;
use bdev_clone::region_map::REGIONS_PER_UNIT;
use bdev_clone::router::{
    Command, CommitId, IoError, IoKind, MetadataMode, Request, Router, RouterConfig, RouterError,
    Status, Stripes,
};
use bdev_clone::{Geometry, RegionMap};
use common::{source_tag, Sim};

/// 8 blocks of 512 bytes per 4 KiB region.
fn geo(blocks: u64) -> Geometry {
    Geometry::new(blocks, 512, blocks, 512, 4096).unwrap()
}

fn quiet() -> RouterConfig {
    RouterConfig {
        hydration_enabled: false,
        ..RouterConfig::default()
    }
}

/// A read-write router on its own over `map` (commit rounds counted by a
/// committer of its own).
fn router_over(g: Geometry, map: &Arc<RegionMap>, cfg: RouterConfig) -> Router {
    Router::new(
        g,
        map.clone(),
        cfg,
        MetadataMode::ReadWrite,
        CommitRounds::default(),
    )
    .unwrap()
}

/// [`router_over`] a fresh map.
fn router(g: Geometry, cfg: RouterConfig) -> (Router, Arc<RegionMap>) {
    let map = Arc::new(RegionMap::new(g.num_regions()));
    (router_over(g, &map, cfg), map)
}

/// A router and its clone's committer (metadata blocks of `per` units),
/// as the target pairs them.
fn router_and_committer(
    g: Geometry,
    map: &Arc<RegionMap>,
    cfg: RouterConfig,
    per: u32,
) -> (Router, Committer<CommitId>) {
    let c = Committer::new(CommitRounds::default(), per);
    let r = Router::new(
        g,
        map.clone(),
        cfg,
        MetadataMode::ReadWrite,
        c.rounds().clone(),
    )
    .unwrap();
    (r, c)
}

fn sim(blocks: u64, cfg: RouterConfig) -> Sim {
    let mut s = Sim::new(geo(blocks), cfg, 42);
    s.keep_trace = true;
    s
}

fn count(trace: &[Command], pred: impl Fn(&Command) -> bool) -> usize {
    trace.iter().filter(|c| pred(c)).count()
}

fn is_commit(c: &Command) -> bool {
    matches!(c, Command::Commit { .. })
}
/// Complete a commit round's three steps, in order.
fn complete_round(s: &mut Sim) {
    for step in ["commit_dest_flush", "commit_write", "commit_md_flush"] {
        s.complete_kind(step, true);
    }
}

fn hydrated(s: &Sim, r: u64) -> bool {
    s.map().is_hydrated(r)
}

// ----- discards (dm-clone §2 #5, §1.8) ------------------------------------

#[test]
fn discard_inside_one_region_does_nothing() {
    let mut s = sim(64, quiet());
    // Cold region 1: blocks 9..14 start after its start and end before its end.
    let id = s.try_submit(IoKind::Discard, 9, 5, false).unwrap();
    assert_eq!(s.status_of(id), Some(Status::Success));
    assert_eq!(s.in_flight(), 0, "no passdown of a partial region");
    assert!(!hydrated(&s, 1));
    // Same on a hydrated region: nothing passes down.
    s.try_submit(IoKind::Write, 8, 8, false).unwrap();
    s.complete_kind("write_dest", true);
    assert!(hydrated(&s, 1));
    s.trace.clear();
    let id = s.try_submit(IoKind::Discard, 9, 5, false).unwrap();
    assert_eq!(s.status_of(id), Some(Status::Success));
    assert_eq!(
        count(&s.trace, |c| matches!(c, Command::DiscardDest { .. })),
        0
    );
    s.finish();
}

#[test]
fn discard_starting_and_ending_inside_regions_touches_only_whole_regions() {
    let mut s = sim(64, quiet());
    // Hydrate regions 1 and 3 by writes, so their partial blocks hold data
    // a wrong discard would destroy.
    s.try_submit(IoKind::Write, 8, 8, false).unwrap();
    s.io_done(IoKind::Write, 24, 8);
    s.trace.clear();
    // 9..29: partial region 1, whole region 2, partial region 3.
    let id = s.try_submit(IoKind::Discard, 9, 20, false).unwrap();
    let discards = picked!(s.trace, DiscardDest.blocks);
    assert_eq!(discards, vec![16..24]);
    assert!(
        hydrated(&s, 2),
        "the whole cold region is marked without a copy"
    );
    assert_eq!(
        count(&s.trace, |c| matches!(c, Command::StartCopy { .. })),
        0
    );
    s.drain_ok(id);
    // The partial blocks still read the writes (checked against the model).
    s.finish();
}

#[test]
fn discard_of_the_whole_device_marks_the_partial_tail_region() {
    // 21 blocks: regions 0, 1 full, region 2 has 5 blocks.
    let mut s = sim(21, quiet());
    let id = s.try_submit(IoKind::Discard, 0, 21, false).unwrap();
    assert!(s.map().is_complete(), "tail region discarded too");
    s.drain_ok(id);
    let passed = picked!(s.trace, DiscardDest.blocks);
    assert_eq!(passed, vec![0..21]);
    // A discard of the tail region alone, ending at the device end.
    let mut s = sim(21, quiet());
    s.try_submit(IoKind::Discard, 16, 5, false).unwrap();
    assert!(hydrated(&s, 2));
    assert!(!hydrated(&s, 1));
    // Ending short of the device end: the tail is partial, ignored.
    let mut s = sim(21, quiet());
    s.try_submit(IoKind::Discard, 16, 4, false).unwrap();
    assert!(!hydrated(&s, 2));
    s.finish();
}

#[test]
fn discard_without_passdown_marks_only() {
    let cfg = RouterConfig {
        discard_passdown: false,
        ..quiet()
    };
    let mut s = sim(32, cfg);
    let id = s.try_submit(IoKind::Discard, 0, 16, false).unwrap();
    assert_eq!(s.status_of(id), Some(Status::Success));
    assert_eq!(s.in_flight(), 0);
    assert!(hydrated(&s, 0) && hydrated(&s, 1));
    s.finish();
}

// ----- the tail region -----------------------------------------------------

#[test]
fn tail_region_writes_and_copies_are_short() {
    let mut s = sim(21, quiet());
    // A write covering the tail region to the device end is a whole overwrite.
    s.try_submit(IoKind::Write, 16, 5, false).unwrap();
    assert_eq!(s.pending_kinds(), vec!["write_dest"]);
    s.complete_kind("write_dest", true);
    assert!(hydrated(&s, 2));
    // A partial write to a cold region copies it first, whole.
    let mut s = sim(21, quiet());
    s.try_submit(IoKind::Write, 17, 2, false).unwrap();
    let copy = s
        .trace
        .iter()
        .find_map(|c| match c {
            Command::StartCopy {
                regions, blocks, ..
            } => Some((regions.clone(), blocks.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(copy, (2..3, 16..21));
    assert_eq!(
        s.pending_kinds(),
        vec!["copy"],
        "the write waits for the copy"
    );
    s.complete_kind("copy", true);
    assert_eq!(s.pending_kinds(), vec!["write_dest"]);
    s.finish();
    // Background hydration copies the tail region with its short length.
    let mut s = sim(21, RouterConfig::default());
    s.config_mut(|c| c.hydration_threshold = 8);
    s.config_mut(|c| c.hydration_batch_size = 8);
    s.background();
    let copies = picked!(s.trace, StartCopy.blocks);
    assert_eq!(copies, vec![0..21]);
}

// ----- 64-bit arithmetic past 2^31 regions and 16 TiB (§2 #6-#8) --------

#[test]
fn regions_past_2_pow_31_and_offsets_past_16_tib() {
    // 2^32 regions of 64 KiB with 512-byte blocks: 256 TiB, 2^39 blocks.
    // The map is 512 MiB of zeroed, untouched (lazily mapped) memory.
    let blocks = 1u64 << 39;
    let g = Geometry::new(blocks, 512, blocks, 512, 64 << 10).unwrap();
    assert_eq!(g.num_regions(), 1 << 32);
    let (mut r, map) = router(g, quiet());
    let mut out = Vec::new();

    let region = (1u64 << 31) + 12_345; // > 2^31: the signed 32-bit limit
    let first = region * 128;
    assert!(first * 512 > 16 << 40, "past 16 TiB");
    // Partial write: copies exactly that region.
    r.submit(Request::write(1, first + 3, 2), &mut out).unwrap();
    assert_eq!(
        out[0],
        Command::StartCopy {
            copy: 1,
            regions: region..region + 1,
            blocks: first..first + 128
        }
    );
    out.clear();
    r.copy_done(1, true, &mut out).unwrap();
    assert!(map.is_hydrated(region));
    assert!(!map.is_hydrated(region - 1) && !map.is_hydrated(region + 1));
    assert!(
        matches!(&out[0], Command::WriteDest { blocks, .. } if *blocks == (first + 3..first + 5))
    );
    let op = match &out[0] {
        Command::WriteDest { op, .. } => *op,
        _ => unreachable!(),
    };
    out.clear();
    r.op_done(op, true, &mut out).unwrap();
    assert_eq!(
        out,
        vec![Command::Complete {
            req: 1,
            status: Status::Success
        }]
    );
    out.clear();

    // Discard starting inside a region near the end, running to the end.
    let last = g.num_regions() - 1;
    r.submit(Request::discard(2, blocks - 200, 200), &mut out)
        .unwrap();
    assert_eq!(
        out[0],
        Command::DiscardDest {
            req: 2,
            op: 2,
            blocks: (last) * 128..blocks
        }
    );
    assert!(map.is_hydrated(last) && !map.is_hydrated(last - 1));
    assert_eq!(map.hydrated_count(), 2);
    out.clear();

    // A read spanning cold and hydrated regions at these offsets.
    r.submit(Request::read(3, first - 1, 130), &mut out)
        .unwrap();
    assert_eq!(
        out,
        vec![
            Command::ReadSource {
                req: 3,
                op: 3,
                blocks: first - 1..first
            },
            Command::ReadDest {
                req: 3,
                op: 4,
                blocks: first..first + 128
            },
            Command::ReadSource {
                req: 3,
                op: 5,
                blocks: first + 128..first + 129
            },
        ]
    );
    out.clear();

    // The commit names the right units: region / 4032 fits u32.
    let mut c = Committer::<CommitId>::new(CommitRounds::default(), 1);
    let round = c.start(&map, true).unwrap();
    let units: Vec<u32> = c.snapshot(&map, &round).iter().map(|u| u.index).collect();
    assert_eq!(
        units,
        vec![
            (region / REGIONS_PER_UNIT) as u32,
            (last / REGIONS_PER_UNIT) as u32
        ]
    );
    // Background hydration from a cursor near the end wraps to region 0.
    let (mut r2, _) = router(g, RouterConfig::default());
    let mut out = Vec::new();
    r2.submit(Request::discard(1, (last - 1) * 128, 256), &mut out)
        .unwrap();
    out.clear();
    r2.next_background(&mut out);
    assert!(matches!(&out[0], Command::StartCopy { regions, .. } if *regions == (0..1)));
    assert_eq!(metadata::required_bytes(1 << 32) % 4096, 0);
}

// ----- discard vs in-flight hydration (§1.8) ------------------------------

#[test]
fn discard_waits_for_an_in_flight_background_copy() {
    let mut s = sim(32, RouterConfig::default());
    s.background(); // copy of region 0 in flight
    assert_eq!(s.pending_kinds(), vec!["copy"]);
    let d = s.try_submit(IoKind::Discard, 0, 8, false).unwrap();
    assert_eq!(s.pending_kinds(), vec!["copy"], "the discard waits");
    assert_eq!(s.status_of(d), None);
    s.complete_kind("copy", true);
    // Now the region is hydrated and the discard passes down.
    assert_eq!(s.pending_kinds(), vec!["discard_dest"]);
    s.complete_kind("discard_dest", true);
    assert_eq!(s.status_of(d), Some(Status::Success));
    // A later write must never be overwritten: nothing else is pending.
    let w = s.try_submit(IoKind::Write, 2, 1, false).unwrap();
    assert_eq!(s.pending_kinds(), vec!["write_dest"]);
    s.complete_kind("write_dest", true);
    assert_eq!(s.status_of(w), Some(Status::Success));
    s.finish();
}

#[test]
fn discard_waits_for_a_copy_started_by_a_partial_write() {
    let (mut r, map) = router(geo(32), quiet());
    let mut out = Vec::new();
    r.submit(Request::write(1, 9, 1), &mut out).unwrap();
    assert!(matches!(&out[0], Command::StartCopy { copy: 1, regions, .. } if *regions == (1..2)));
    out.clear();
    // The discard of region 1 neither marks it nor passes down yet: if it
    // marked it, a later write would go straight to the destination and
    // the late copy could land on top of it.
    r.submit(Request::discard(2, 8, 8), &mut out).unwrap();
    assert!(out.is_empty());
    assert!(!map.is_hydrated(1));
    // Region 2 is idle: its discard goes through at once.
    r.submit(Request::discard(3, 16, 8), &mut out).unwrap();
    assert!(map.is_hydrated(2));
    assert!(matches!(&out[0], Command::DiscardDest { blocks, .. } if *blocks == (16..24)));
    out.clear();
    r.copy_done(1, true, &mut out).unwrap();
    assert!(map.is_hydrated(1));
    // Now, in arrival order: the waiting write, then the discard.
    assert!(matches!(&out[0], Command::WriteDest { req: 1, .. }));
    assert!(matches!(&out[1], Command::DiscardDest { req: 2, blocks, .. } if *blocks == (8..16)));
    assert_eq!(r.stats().copies_in_flight, 0, "no copy left to land late");
}

#[test]
fn discard_of_a_region_whose_copy_fails_still_marks_it() {
    let mut s = sim(32, RouterConfig::default());
    s.background();
    let d = s.try_submit(IoKind::Discard, 0, 8, false).unwrap();
    s.complete_kind("copy", false);
    // The copy failed, the region is still cold: the discard marks it.
    assert!(hydrated(&s, 0));
    s.drain_ok(d);
    s.finish();
}

// ----- flush and commit (§1.5, §2 #1-#3) -----------------------------------

#[test]
fn flush_with_nothing_changed_writes_no_metadata() {
    let mut s = sim(32, quiet());
    s.io_done(IoKind::Read, 0, 8);
    // A flush is the committer's: a round that is a destination flush.
    let f = s.try_submit(IoKind::Flush, 0, 0, false).unwrap();
    assert_eq!(s.pending_kinds(), vec!["commit_dest_flush"]);
    s.drain_ok(f);
    assert_eq!(s.md_writes(), 0);
    // The periodic commit has nothing to do.
    assert!(!s.timer());

    // First write to a cold region + flush: one metadata write, no extra
    // destination flush (the round flushed it).
    s.io_done(IoKind::Write, 0, 8);
    let f = s.try_submit(IoKind::Flush, 0, 0, false).unwrap();
    assert_eq!(s.pending_kinds(), vec!["commit_dest_flush"]);
    s.drain_ok(f);
    assert_eq!(s.md_writes(), 1);

    // Rewriting the hydrated region + flush: no metadata write.
    s.io_done(IoKind::Write, 0, 4);
    s.io_done(IoKind::Flush, 0, 0);
    assert_eq!(s.md_writes(), 1);
    s.finish();
}

#[test]
fn commit_goes_dest_flush_then_metadata_write_then_metadata_flush() {
    let mut s = sim(32, quiet());
    s.io_done(IoKind::Write, 0, 8);
    let f = s.try_submit(IoKind::Flush, 0, 0, false).unwrap();
    let md_before = s.md_durable().to_vec();
    assert_eq!(s.pending_kinds(), vec!["commit_dest_flush"]);
    s.complete_kind("commit_dest_flush", true);
    assert_eq!(s.pending_kinds(), vec!["commit_write"]);
    assert_eq!(
        s.md_durable(),
        &md_before[..],
        "nothing durable before the md flush"
    );
    s.complete_kind("commit_write", true);
    assert_eq!(s.pending_kinds(), vec!["commit_md_flush"]);
    assert_eq!(s.status_of(f), None, "the flush waits for the whole commit");
    s.complete_kind("commit_md_flush", true);
    assert_eq!(s.status_of(f), Some(Status::Success));
    // The unit on the metadata device now says region 0 is hydrated.
    let map = Sim::load_map(&s.geo, s.uuid, s.md_durable());
    assert!(map.is_hydrated(0) && !map.is_hydrated(1));
    s.finish();
}

#[test]
fn commit_snapshot_excludes_regions_hydrated_after_it_was_emitted() {
    // dm-clone §2 #1: bits of the next transaction must not ride along.
    let cfg = RouterConfig {
        hydration_threshold: 2,
        ..RouterConfig::default()
    };
    let mut s = sim(64, cfg);
    s.background(); // copies of regions 0 and 1 (batch 1)
    assert_eq!(s.pending_kinds(), vec!["copy", "copy"]);
    s.complete(0, true); // region 0's
    assert!(hydrated(&s, 0) && !hydrated(&s, 1));
    assert!(s.timer(), "the periodic round");
    // Region 1 (same unit) finishes while the round is in flight.
    s.complete_kind("copy", true);
    assert!(s.map().has_dirty(), "region 1 waits for the next round");
    // A flush now needs a round after the one in flight.
    let f = s.try_submit(IoKind::Flush, 0, 0, false).unwrap();
    complete_round(&mut s);
    assert_eq!(s.status_of(f), None, "queued behind the round in flight");
    let durable = Sim::load_map(&s.geo, s.uuid, s.md_durable());
    assert!(
        durable.is_hydrated(0) && !durable.is_hydrated(1),
        "the snapshot is the map when the round started"
    );
    s.drain_ok(f);
    let durable = Sim::load_map(&s.geo, s.uuid, s.md_durable());
    assert!(durable.is_hydrated(0) && durable.is_hydrated(1));
    s.finish();
}

#[test]
fn flush_or_fua_write_during_a_round_with_nothing_new_waits_for_the_next() {
    let mut s = sim(64, quiet());
    s.io_done(IoKind::Write, 0, 8);
    assert!(s.timer(), "the periodic round");
    // A write to the hydrated region completes after the round's
    // destination flush was issued; a flush now must cover it.
    let w = s.try_submit(IoKind::Write, 0, 1, false).unwrap();
    s.complete_kind("write_dest", true);
    assert_eq!(s.status_of(w), Some(Status::Success));
    assert!(!s.map().has_dirty());
    let f = s.try_submit(IoKind::Flush, 0, 0, false).unwrap();
    // A FUA write finding no dirty unit: the round in flight may hold the
    // bit of the region it relies on, so it asks for the next one too.
    let fua = s.try_submit(IoKind::Write, 1, 1, true).unwrap();
    s.complete_kind("write_dest", true);
    complete_round(&mut s);
    assert_eq!((s.status_of(f), s.status_of(fua)), (None, None));
    assert_eq!(
        s.pending_kinds(),
        vec!["commit_dest_flush"],
        "nothing new: the next round is a destination flush only"
    );
    let md_writes = s.md_writes();
    s.complete_kind("commit_dest_flush", true);
    assert_eq!(s.status_of(f), Some(Status::Success));
    assert_eq!(s.status_of(fua), Some(Status::Success));
    assert_eq!(s.md_writes(), md_writes);
    // Power loss now: the write before the flush must be there (`finish`
    // reads every block back against what the crash allows).
    s.crash_and_restart(quiet(), 5).finish();
}

#[test]
fn fua_write_completes_after_the_commit() {
    let mut s = sim(32, quiet());
    let w = s.try_submit(IoKind::Write, 0, 8, true).unwrap();
    assert!(s
        .trace
        .iter()
        .any(|c| matches!(c, Command::WriteDest { fua: true, .. })));
    s.complete_kind("write_dest", true);
    assert_eq!(s.status_of(w), None);
    assert_eq!(s.pending_kinds(), vec!["commit_dest_flush"]);
    s.drain_ok(w);
    // FUA to a hydrated region with nothing to commit: no commit.
    s.trace.clear();
    let w = s.try_submit(IoKind::Write, 1, 1, true).unwrap();
    s.drain_ok(w);
    assert_eq!(count(&s.trace, is_commit), 0);
    s.finish();
}

#[test]
fn periodic_commit_and_4k_metadata_blocks() {
    let g = geo(8 * 4032 * 10); // 10 units
    let map = Arc::new(RegionMap::new(g.num_regions()));
    let (mut r, mut c) = router_and_committer(g, &map, quiet(), 8);
    let mut out = Vec::new();
    r.submit(Request::discard(1, 8 * 4032 * 9, 8), &mut out)
        .unwrap(); // unit 9
    out.clear();
    let round = c.start(&map, true).expect("the periodic round");
    // Unit 9 lives in metadata block 1 (units 8..16); the map has 10 units.
    let idx: Vec<u32> = c.snapshot(&map, &round).iter().map(|u| u.index).collect();
    assert_eq!(idx, vec![8, 9]);
    map.set(0);
    assert!(c.start(&map, true).is_none(), "one round at a time");
}

// ----- writes and per-region serialisation --------------------------------

#[test]
fn whole_region_writes_skip_the_copy_and_serialise_later_writers() {
    let mut s = sim(64, quiet());
    let w = s.try_submit(IoKind::Write, 4, 28, false).unwrap();
    // Region 0 partial (copy), regions 1..3 whole (overwrite), 3 partial.
    let copies = picked!(s.trace, StartCopy.regions);
    assert_eq!(copies, vec![0..1]);
    let writes = picked!(s.trace, WriteDest.blocks);
    assert_eq!(writes, vec![8..32]);
    assert!(!hydrated(&s, 1), "marked only when the write completes");
    s.complete_kind("write_dest", true);
    assert!(hydrated(&s, 1) && hydrated(&s, 2) && hydrated(&s, 3));
    s.drain_ok(w);
    s.finish();
}

#[test]
fn a_partial_write_waits_for_a_whole_region_overwrite_in_flight() {
    let (mut r, _) = router(geo(64), quiet());
    let mut out = Vec::new();
    r.submit(Request::write(1, 8, 8), &mut out).unwrap();
    assert_eq!(out.len(), 1);
    out.clear();
    // Another writer to region 1 while the overwrite is in flight: queued,
    // no copy (that would race the overwrite).
    r.submit(Request::write(2, 9, 1), &mut out).unwrap();
    assert!(out.is_empty());
    r.submit(Request::discard(3, 8, 8), &mut out).unwrap();
    assert!(out.is_empty());
    // Reads of a cold region go to the source meanwhile.
    r.submit(Request::read(4, 8, 1), &mut out).unwrap();
    assert!(matches!(out[0], Command::ReadSource { .. }));
    out.clear();
    r.op_done(1, true, &mut out).unwrap();
    let kinds: Vec<_> = out
        .iter()
        .map(|c| match c {
            Command::WriteDest { req, .. } => format!("write{req}"),
            Command::DiscardDest { req, .. } => format!("discard{req}"),
            Command::Complete { req, .. } => format!("complete{req}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds, vec!["write2", "discard3", "complete1"]);
}

#[test]
fn a_failed_copy_fails_the_waiting_write_and_is_retried_later() {
    let mut s = sim(32, quiet());
    let w = s.try_submit(IoKind::Write, 1, 1, false).unwrap();
    s.complete_kind("copy", false);
    assert_eq!(
        s.status_of(w),
        Some(Status::Error(IoError::HydrationFailed))
    );
    assert!(!hydrated(&s, 0));
    assert_eq!(s.routers[0].stats().copy_failures, 1);
    // Background hydration comes back to region 0 after wrapping.
    s.config_mut(|c| c.hydration_enabled = true);
    s.config_mut(|c| c.hydration_threshold = 1);
    for _ in 0..5 {
        s.background();
        s.drain();
    }
    assert!(s.map().is_complete());
    s.finish();
}

#[test]
fn source_read_errors_fail_only_the_reads_that_need_the_source() {
    let mut s = sim(32, quiet());
    s.io_done(IoKind::Write, 0, 8);
    let r1 = s.try_submit(IoKind::Read, 0, 16, false).unwrap();
    s.complete_kind("read_source", false);
    s.drain();
    assert_eq!(s.status_of(r1), Some(Status::Error(IoError::SourceIo)));
    let r2 = s.try_submit(IoKind::Read, 0, 8, false).unwrap();
    s.drain_ok(r2);
}

// ----- background hydration -------------------------------------------------

#[test]
fn background_respects_threshold_batch_and_busy_regions() {
    let cfg = RouterConfig {
        hydration_threshold: 4,
        hydration_batch_size: 3,
        ..RouterConfig::default()
    };
    let (mut r, _) = router(geo(8 * 20), cfg);
    let mut out = Vec::new();
    // A user write is busy on region 1 (whole overwrite in flight).
    r.submit(Request::write(1, 8, 8), &mut out).unwrap();
    out.clear();
    assert_eq!(r.next_background(&mut out), 4);
    let copies = picked!(out, StartCopy.regions);
    // Region 0 (the run stops at busy region 1), then 2..5 batched, capped
    // by the threshold: 1 + 3 = 4 regions.
    assert_eq!(copies, vec![0..1, 2..5]);
    assert_eq!(r.stats().regions_copying, 4);
    out.clear();
    assert_eq!(r.next_background(&mut out), 0, "threshold reached");
    r.copy_done(1, true, &mut out).unwrap();
    assert_eq!(r.next_background(&mut out), 1);
    assert!(matches!(&out[0], Command::StartCopy { regions, .. } if *regions == (5..6)));
    out.clear();
    // Threshold 0 and disabled both stop it.
    r.config_mut().hydration_threshold = 0;
    r.copy_done(2, true, &mut out).unwrap();
    assert_eq!(r.next_background(&mut out), 0);
    r.config_mut().hydration_threshold = 4;
    r.config_mut().hydration_enabled = false;
    assert_eq!(r.next_background(&mut out), 0);
    r.config_mut().hydration_enabled = true;
    assert!(r.next_background(&mut out) > 0);
    // User-triggered copies are not held back by the threshold.
    out.clear();
    r.submit(Request::write(9, 8 * 15 + 1, 1), &mut out)
        .unwrap();
    assert!(matches!(&out[0], Command::StartCopy { regions, .. } if *regions == (15..16)));
}

#[test]
fn a_huge_threshold_starts_only_as_many_copies_as_allowed() {
    // Issue #8: threshold u32::MAX started a copy per cold region at once.
    let cfg = RouterConfig {
        hydration_threshold: u32::MAX as u64,
        hydration_batch_size: 1,
        ..RouterConfig::default()
    };
    let (mut r, _) = router(geo(8 * 10_000), cfg);
    let mut out = Vec::new();
    assert_eq!(r.next_background_max(&mut out, 32), 32);
    assert_eq!(out.len(), 32);
    assert_eq!(r.stats().regions_copying, 32);
    out.clear();
    // A batch counts as one copy: 5 copies of 7 regions.
    r.config_mut().hydration_batch_size = 7;
    assert_eq!(r.next_background_max(&mut out, 5), 35);
    assert_eq!(out.len(), 5);
    out.clear();
    assert_eq!(r.next_background_max(&mut out, 0), 0);
    assert!(out.is_empty());
}

#[test]
fn copy_on_read_hydrates_read_regions_first() {
    let cfg = RouterConfig {
        copy_on_read: true,
        ..RouterConfig::default()
    };
    let mut s = sim(8 * 30, cfg);
    s.io_done(IoKind::Read, 8 * 20 + 3, 2);
    s.trace.clear();
    s.background();
    assert!(s
        .trace
        .iter()
        .any(|c| matches!(c, Command::StartCopy { regions, .. } if *regions == (20..21))));
    s.finish();
}

// ----- metadata modes (§1.9) ---------------------------------------------

#[test]
fn a_failed_commit_switches_to_read_only() {
    let mut s = sim(32, quiet());
    s.try_submit(IoKind::Write, 0, 8, false).unwrap(); // region 0 hydrated
    s.drain();
    let f = s.try_submit(IoKind::Flush, 0, 0, false).unwrap();
    s.complete_kind("commit_dest_flush", true);
    s.complete_kind("commit_write", false);
    assert_eq!(s.status_of(f), Some(Status::Error(IoError::CommitFailed)));
    assert_eq!(s.mode(), MetadataMode::ReadOnly);
    // Reads work (hydrated from dest, cold from source).
    let r = s.try_submit(IoKind::Read, 0, 16, false).unwrap();
    s.drain_ok(r);
    // Writes to hydrated regions work, to cold regions fail.
    let w = s.try_submit(IoKind::Write, 1, 2, false).unwrap();
    s.drain_ok(w);
    let w = s.try_submit(IoKind::Write, 9, 2, false).unwrap();
    assert_eq!(s.status_of(w), Some(Status::Error(IoError::ReadOnly)));
    let w = s.try_submit(IoKind::Write, 8, 8, false).unwrap();
    assert_eq!(s.status_of(w), Some(Status::Error(IoError::ReadOnly)));
    // Discards of cold ranges are ignored with success.
    let d = s.try_submit(IoKind::Discard, 8, 8, false).unwrap();
    assert_eq!(s.status_of(d), Some(Status::Success));
    assert!(!hydrated(&s, 1));
    // No hydration; and a flush that would need a commit fails.
    assert_eq!(s.background(), 0);
    let f = s.try_submit(IoKind::Flush, 0, 0, false).unwrap();
    assert_eq!(s.status_of(f), Some(Status::Error(IoError::CommitFailed)));
    // The periodic round writes nothing: it fails at once and its units
    // stay dirty.
    s.timer();
    assert_eq!(s.in_flight(), 0, "no metadata I/O in read-only mode");
    assert!(s.map().has_dirty());
    s.drain();
}

#[test]
fn read_only_mode_allows_flushes_with_nothing_to_commit() {
    let mut s = sim(32, quiet());
    s.io_done(IoKind::Write, 0, 8);
    let f = s.try_submit(IoKind::Flush, 0, 0, false).unwrap();
    s.drain_ok(f);
    s.routers[0].set_read_only();
    assert_eq!(s.mode(), MetadataMode::ReadOnly);
    let md_writes = s.md_writes();
    let f = s.try_submit(IoKind::Flush, 0, 0, false).unwrap();
    assert_eq!(s.pending_kinds(), vec!["commit_dest_flush"]);
    s.drain_ok(f);
    assert_eq!(s.md_writes(), md_writes);
    let w = s.try_submit(IoKind::Write, 0, 8, false).unwrap();
    assert_eq!(s.pending_kinds(), vec!["write_dest"]);
    s.drain_ok(w);
    let w = s.try_submit(IoKind::Write, 8, 8, false).unwrap();
    assert_eq!(s.status_of(w), Some(Status::Error(IoError::ReadOnly)));
    s.finish();
}

#[test]
fn a_copy_completing_in_read_only_mode_is_not_recorded() {
    let mut s = sim(32, RouterConfig::default());
    s.io_done(IoKind::Write, 16, 8);
    s.background(); // copy of region 0
    let w = s.try_submit(IoKind::Write, 1, 1, false).unwrap(); // waits on it
    let f = s.try_submit(IoKind::Flush, 0, 0, false).unwrap();
    s.complete_kind("commit_dest_flush", false);
    assert_eq!(s.status_of(f), Some(Status::Error(IoError::CommitFailed)));
    s.complete_kind("copy", true);
    assert!(!hydrated(&s, 0));
    assert_eq!(s.status_of(w), Some(Status::Error(IoError::ReadOnly)));
    s.drain();
}

#[test]
fn failed_mode_fails_everything() {
    let mut s = sim(32, quiet());
    s.routers[0].set_failed();
    for (k, o, l) in [
        (IoKind::Read, 0, 1),
        (IoKind::Write, 0, 8),
        (IoKind::Discard, 0, 8),
        (IoKind::Flush, 0, 0),
    ] {
        let id = s.try_submit(k, o, l, false).unwrap();
        assert_eq!(
            s.status_of(id),
            Some(Status::Error(IoError::MetadataFailed))
        );
    }
    assert_eq!(s.background(), 0);
}

// ----- request validation ----------------------------------------------------

#[test]
fn invalid_and_duplicate_requests() {
    let g = geo(32);
    let (mut r, _) = router(g, quiet());
    let mut out = Vec::new();
    for (i, req) in [
        Request::read(1, 30, 3),
        Request::write(2, 0, 0),
        Request::discard(3, u64::MAX, 2),
        // Flushes are the committer's.
        Request::new(4, IoKind::Flush, 0, 0),
    ]
    .into_iter()
    .enumerate()
    {
        r.submit(req, &mut out).unwrap();
        assert_eq!(
            out[i],
            Command::Complete {
                req: i as u64 + 1,
                status: Status::Error(IoError::Invalid)
            }
        );
    }
    out.clear();
    r.submit(Request::read(5, 0, 1), &mut out).unwrap();
    assert_eq!(
        r.submit(Request::read(5, 0, 1), &mut out),
        Err(RouterError::DuplicateRequest(5))
    );
    assert!(matches!(
        r.op_done(999, true, &mut out),
        Err(RouterError::Unknown { what: "op", .. })
    ));
    assert!(Router::new(
        g,
        Arc::new(RegionMap::new(3)),
        quiet(),
        MetadataMode::ReadWrite,
        CommitRounds::default()
    )
    .is_err());
}

// ----- crash consistency, targeted ----------------------------------------

#[test]
fn crash_after_flush_keeps_the_write_and_before_commit_reads_the_source() {
    let mut s = sim(32, quiet());
    // Write A to cold region 0 (partial: copy then write), flushed.
    s.io_done(IoKind::Write, 2, 1);
    s.io_done(IoKind::Flush, 0, 0);
    // Write B to cold region 1, not flushed.
    s.io_done(IoKind::Write, 8, 8);
    let mut after = s.crash_and_restart(quiet(), 9);
    assert!(after.map().is_hydrated(0), "committed");
    assert!(
        !after.map().is_hydrated(1),
        "never committed: reads the source"
    );
    // Reads are checked against what the crash allows.
    let r = after.try_submit(IoKind::Read, 0, 16, false).unwrap();
    after.drain_ok(r);
    assert_eq!(after.source[9], source_tag(9));
    after.finish();
}

#[test]
fn metadata_failing_during_a_commit_fails_requests_waiting_for_the_next() {
    let mut s = sim(64, quiet());
    let w1 = s.try_submit(IoKind::Write, 0, 8, true).unwrap();
    s.complete_kind("write_dest", true);
    assert_eq!(s.pending_kinds(), vec!["commit_dest_flush"], "w1's round");
    // Region 1 marked while that round is in flight: a FUA write and a
    // flush need the next round.
    let w2 = s.try_submit(IoKind::Write, 8, 8, true).unwrap();
    s.complete_kind("write_dest", true);
    let f = s.try_submit(IoKind::Flush, 0, 0, false).unwrap();
    assert_eq!(s.pending_kinds(), vec!["commit_dest_flush"], "behind w1's");
    s.routers[0].set_failed();
    complete_round(&mut s);
    assert_eq!(s.status_of(w1), Some(Status::Success));
    assert_eq!(
        s.status_of(w2),
        Some(Status::Error(IoError::MetadataFailed))
    );
    assert_eq!(s.status_of(f), Some(Status::Error(IoError::CommitFailed)));
    assert_eq!(s.in_flight(), 0, "no round in failed mode");
    assert!(s.routers[0].is_idle());
}

/// Striped ownership: two routers over one map each copy only their own
/// stripes, batches never cross a stripe, and together they cover all.
#[test]
fn striped_routers_copy_only_their_stripes() {
    let g = geo(1000 * 8 + 3); // 1001 regions, a short tail
    let map = Arc::new(RegionMap::new(g.num_regions()));
    let cfg = RouterConfig {
        hydration_threshold: 1000,
        hydration_batch_size: 50,
        ..RouterConfig::default()
    };
    let mut seen = vec![0u8; g.num_regions() as usize];
    for idx in 0..2u64 {
        let mut r = router_over(g, &map, cfg.clone());
        r.set_stripe(64, idx, 2);
        let mut out = Vec::new();
        r.next_background(&mut out);
        for c in &out {
            if let Command::StartCopy { regions, .. } = c {
                assert_eq!(
                    regions.start / 64,
                    (regions.end - 1) / 64,
                    "{regions:?} crosses a stripe"
                );
                for x in regions.clone() {
                    assert_eq!((x / 64) % 2, idx, "region {x} copied by owner {idx}");
                    seen[x as usize] += 1;
                }
            }
        }
    }
    assert!(
        seen.iter().all(|&n| n == 1),
        "every region copied exactly once"
    );
}

/// Two striped routers and their committer: a round one router asked for
/// takes the other's bits too, so a FUA write on the other that finds
/// nothing dirty still waits for the next round.
#[test]
fn routers_share_the_committers_rounds() {
    let stripes = Stripes {
        regions: 64,
        owners: 2,
    };
    let mut s = Sim::with_shape(geo(8 * 256), quiet(), stripes, 1, 42);
    // Region 64 (router 1's) marked, not committed.
    s.io_done(IoKind::Write, 8 * 64, 8);
    // Router 0's FUA write asks for a round: it takes unit 0, both bits.
    let w0 = s.try_submit(IoKind::Write, 0, 8, true).unwrap();
    s.complete_kind("write_dest", true);
    assert_eq!(s.pending_kinds(), vec!["commit_dest_flush"]);
    assert!(!s.map().has_dirty());
    let w1 = s.try_submit(IoKind::Write, 8 * 64 + 1, 1, true).unwrap();
    s.complete_kind("write_dest", true);
    assert_eq!(s.status_of(w1), None, "its bit may sit in router 0's round");
    complete_round(&mut s);
    assert_eq!(s.status_of(w0), Some(Status::Success));
    assert_eq!(s.status_of(w1), None);
    assert_eq!(s.pending_kinds(), vec!["commit_dest_flush"], "its round");
    s.drain_ok(w1);
    s.finish();
}
