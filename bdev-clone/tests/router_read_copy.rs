//! Read-triggered copies (copy-on-read): one source read answers the user
//! and fills the destination; the regions are busy while it runs, so no
//! write acknowledged meanwhile is ever overwritten by source data. And the
//! hydrator's preference for regions near recent reads.

#[macro_use]
mod common;

use bdev_clone::router::{Command, IoError, IoKind, RouterConfig, Status};
use bdev_clone::Geometry;
use common::{source_tag, Sim};

/// 8 blocks of 512 bytes per 4 KiB region.
fn geo(blocks: u64) -> Geometry {
    Geometry::new(blocks, 512, blocks, 512, 4096).unwrap()
}

/// Copy-on-read, no background hydration (as `no_hydration`).
fn cor() -> RouterConfig {
    RouterConfig {
        hydration_enabled: false,
        copy_on_read: true,
        ..RouterConfig::default()
    }
}

fn sim(blocks: u64, cfg: RouterConfig, budget: u64) -> Sim {
    let mut s = Sim::new(geo(blocks), cfg, 7);
    s.keep_trace = true;
    s.overlap_reads = true;
    s.set_read_budget(budget);
    s
}

fn read_copies(s: &Sim) -> Vec<std::ops::Range<u64>> {
    picked!(s.trace, ReadCopy.regions)
}

fn source_reads(s: &Sim) -> Vec<std::ops::Range<u64>> {
    picked!(s.trace, ReadSource.blocks)
}

fn sources(blocks: std::ops::Range<u64>) -> Vec<u64> {
    blocks.map(source_tag).collect()
}

#[test]
fn a_cold_read_is_answered_by_the_copy_before_its_destination_write() {
    let mut s = sim(64, cor(), 1);
    let id = s.try_submit(IoKind::Read, 10, 3, false).unwrap();
    assert_eq!(read_copies(&s), vec![1..2]);
    assert!(source_reads(&s).is_empty(), "one source read only");
    assert_eq!(s.pending_kinds(), vec!["read_copy"]);
    s.complete_kind("read_copy", true);
    // The user has the source data; the destination write is still to come.
    assert_eq!(s.status_of(id), Some(Status::Success));
    assert_eq!(s.read_results[&id], sources(10..13));
    assert_eq!(s.pending_kinds(), vec!["copy"]);
    assert!(!s.map().is_hydrated(1));
    s.complete_kind("copy", true);
    assert!(s.map().is_hydrated(1));
    assert_eq!(&s.dest[8..16], &sources(8..16)[..]);
    // Budget spent: the next cold read only reads the source (and queues
    // its region for the hydrator).
    s.try_submit(IoKind::Read, 30, 1, false).unwrap();
    assert_eq!(read_copies(&s).len(), 1);
    assert_eq!(source_reads(&s), vec![30..31]);
    s.finish();
}

#[test]
fn a_read_over_several_cold_regions_is_one_copy_per_idle_run() {
    let mut s = sim(128, cor(), 8);
    // Region 3 hydrated (a whole-region write), region 6 being copied for
    // a partial write.
    s.io_done(IoKind::Write, 24, 8);
    s.try_submit(IoKind::Write, 50, 1, false).unwrap();
    assert_eq!(s.pending_kinds(), vec!["copy"]);
    let id = s.try_submit(IoKind::Read, 4, 60, false).unwrap();
    // Regions 0..3, 4..6 and 7 are copied by the read; region 3 reads the
    // destination; region 6 (busy) the source.
    assert_eq!(read_copies(&s), vec![0..3, 4..6, 7..8]);
    assert_eq!(source_reads(&s), vec![48..56]);
    s.drain_ok(id);
    for r in 0..8 {
        assert!(s.map().is_hydrated(r), "region {r}");
    }
    s.finish();
}

#[test]
fn a_read_of_a_region_being_copied_reads_the_source_without_waiting() {
    let cfg = RouterConfig {
        hydration_enabled: true,
        ..cor()
    };
    let mut s = sim(64, cfg, 4);
    s.set_read_budget(0);
    assert_eq!(s.background(), 1); // region 0
    s.set_read_budget(4);
    let id = s.try_submit(IoKind::Read, 2, 2, false).unwrap();
    assert!(read_copies(&s).is_empty());
    assert_eq!(source_reads(&s), vec![2..4]);
    s.complete_kind("read_source", true);
    assert_eq!(s.status_of(id), Some(Status::Success));
    s.finish();
}

#[test]
fn no_read_copies_without_copy_on_read_or_budget_or_in_read_only_mode() {
    type Setup = fn(&mut Sim);
    let cases: [(&str, Setup); 3] = [
        ("copy-on-read off", |s| {
            s.config_mut(|c| c.copy_on_read = false)
        }),
        ("no budget", |s| s.set_read_budget(0)),
        // Read-only metadata records no hydration: reads just read.
        ("read-only", |s| s.routers[0].set_read_only()),
    ];
    for (case, setup) in cases {
        let mut s = sim(64, cor(), 4);
        setup(&mut s);
        s.try_submit(IoKind::Read, 0, 8, false).unwrap();
        assert!(read_copies(&s).is_empty(), "{case}");
        assert_eq!(source_reads(&s), vec![0..8], "{case}");
    }
}

/// The busy rule: a write to a region whose read-triggered copy is in
/// flight waits for it, and the user's read still returns the source.
#[test]
fn a_partial_write_waits_behind_a_read_copy_and_the_read_returns_the_source() {
    let mut s = sim(64, cor(), 1);
    let rd = s.try_submit(IoKind::Read, 8, 8, false).unwrap();
    let wr = s.try_submit(IoKind::Write, 9, 2, false).unwrap();
    // The write waits: no destination write, no copy of its own.
    assert_eq!(s.pending_kinds(), vec!["read_copy"]);
    s.complete_kind("read_copy", true);
    assert_eq!(s.read_results[&rd], sources(8..16));
    assert_eq!(s.status_of(wr), None);
    s.complete_kind("copy", true);
    assert!(s.map().is_hydrated(1));
    // Now on a hydrated region: straight to the destination.
    assert_eq!(s.pending_kinds(), vec!["write_dest"]);
    s.drain_ok(wr);
    let back = s.io_done(IoKind::Read, 8, 8);
    let tag = 0x1000_0000_0000 + wr;
    let mut want = sources(8..16);
    want[1] = tag;
    want[2] = tag;
    assert_eq!(s.read_results[&back], want);
    s.finish();
}

/// The bug class of copy-on-read caches: a write acknowledged while the
/// read's copy is in flight must never be overwritten by the copy's
/// (older) source data. Whole-region writes, write-zeroes and discards
/// would take the no-copy path at once if the region were not busy.
#[test]
fn whole_region_writes_and_discards_racing_a_read_copy_are_never_overwritten() {
    for kind in [IoKind::Write, IoKind::WriteZeroes, IoKind::Discard] {
        for read_first in [true, false] {
            let mut s = sim(64, cor(), 1);
            let rd = s.try_submit(IoKind::Read, 16, 8, false).unwrap();
            if read_first {
                // The user's data is in; the destination write is not.
                s.complete_kind("read_copy", true);
                assert_eq!(s.read_results[&rd], sources(16..24));
            }
            let w = s.try_submit(kind, 16, 8, false).unwrap();
            assert_eq!(
                s.pending_kinds()
                    .iter()
                    .filter(|k| **k != "read_copy" && **k != "copy")
                    .count(),
                0,
                "{kind:?} went ahead of the read copy"
            );
            s.drain_ok(w);
            assert_eq!(s.status_of(rd), Some(Status::Success));
            assert_eq!(s.read_results[&rd], sources(16..24));
            // Then a write acknowledged after the racing one: still there.
            let w2 = s.io_done(IoKind::Write, 17, 1);
            let back = s.io_done(IoKind::Read, 16, 8);
            let got = &s.read_results[&back];
            assert_eq!(got[1], 0x1000_0000_0000 + w2, "{kind:?}");
            match kind {
                IoKind::Write => assert!(
                    got.iter()
                        .enumerate()
                        .all(|(i, &v)| i == 1 || v == 0x1000_0000_0000 + w),
                    "{kind:?}: {got:x?}"
                ),
                IoKind::WriteZeroes => assert!(
                    got.iter()
                        .enumerate()
                        .all(|(i, &v)| i == 1 || v == common::ZERO),
                    "{kind:?}: {got:x?}"
                ),
                // Discarded data is undefined; the model checks the rest.
                _ => {}
            }
            s.finish();
        }
    }
}

#[test]
fn a_failed_read_copy_fails_the_read_and_leaves_the_region_cold() {
    let mut s = sim(64, cor(), 2);
    let rd = s.try_submit(IoKind::Read, 0, 4, false).unwrap();
    s.complete_kind("read_copy", false);
    assert_eq!(s.status_of(rd), Some(Status::Error(IoError::SourceIo)));
    assert!(!s.map().is_hydrated(0));
    assert!(s.routers[0].is_idle());
    // A destination write failure: the read succeeded, the region stays cold.
    let rd = s.try_submit(IoKind::Read, 8, 4, false).unwrap();
    s.complete_kind("read_copy", true);
    s.complete_kind("copy", false);
    assert_eq!(s.status_of(rd), Some(Status::Success));
    assert!(!s.map().is_hydrated(1));
    s.finish();
}

#[test]
fn a_read_copy_is_durable_after_a_flush_and_survives_a_crash() {
    let mut s = sim(64, cor(), 2);
    let rd = s.try_submit(IoKind::Read, 40, 2, false).unwrap();
    s.drain_ok(rd);
    assert!(s.map().is_hydrated(5));
    let f = s.try_submit(IoKind::Flush, 0, 0, false).unwrap();
    s.drain_ok(f);
    let mut after = s.crash_and_restart(cor(), 9);
    assert!(after.map().is_hydrated(5), "the flushed hydration was lost");
    after.check();
    after.finish();
}

// ----- the hydrator prefers regions near recent reads ----------------------

fn copies(s: &Sim) -> Vec<std::ops::Range<u64>> {
    s.trace
        .iter()
        .filter_map(|c| match c {
            Command::StartCopy { regions, .. } => Some(regions.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn hydration_takes_the_regions_after_recent_reads_but_the_cursor_moves_on() {
    let cfg = RouterConfig {
        hydration_threshold: 1,
        ..RouterConfig::default()
    };
    let mut s = sim(8 * 64, cfg, 0);
    // Cold reads ending in regions 10, 20, 30, 40 (no copy-on-read).
    for r in [10u64, 20, 30, 40] {
        s.try_submit(IoKind::Read, r * 8, 8, false).unwrap();
    }
    s.drain();
    for _ in 0..5 {
        assert_eq!(s.background(), 1);
        s.drain();
    }
    // Newest hint first, three hints, then the cursor (region 0), then the
    // last hint.
    assert_eq!(copies(&s), vec![41..42, 31..32, 21..22, 0..1, 11..12]);
    for _ in 0..3 {
        s.background();
        s.drain();
    }
    // No hints left: the cursor goes on from where it was.
    assert_eq!(&copies(&s)[5..], &[1..2, 2..3, 3..4]);
    s.finish();
}

#[test]
fn copy_on_read_regions_over_budget_still_come_first() {
    let cfg = RouterConfig {
        hydration_threshold: 1,
        copy_on_read: true,
        ..RouterConfig::default()
    };
    let mut s = sim(8 * 64, cfg, 0);
    s.io_done(IoKind::Read, 8 * 50, 8);
    assert_eq!(s.background(), 1);
    // The region read itself, then the one after it.
    assert_eq!(copies(&s), vec![50..51]);
    s.drain();
    s.background();
    assert_eq!(copies(&s), vec![50..51, 51..52]);
    s.finish();
}

#[test]
fn with_hydration_off_copy_on_read_copies_exactly_the_regions_read() {
    for threshold in [0, 1, 4] {
        let cfg = RouterConfig {
            hydration_threshold: threshold,
            hydration_batch_size: 8,
            ..cor()
        };
        let mut s = sim(8 * 64, cfg, 0);
        // Over budget: the reads only read the source and queue their regions.
        s.try_submit(IoKind::Read, 8 * 30 + 3, 8 * 2, false)
            .unwrap();
        s.io_done(IoKind::Read, 8 * 50, 1);
        for _ in 0..6 {
            s.background();
            s.drain();
        }
        // One region per copy (no batching past what was read), nothing
        // from the cursor or the regions after the reads.
        assert_eq!(copies(&s), vec![30..31, 31..32, 32..33, 50..51]);
        let hydrated: Vec<u64> = (0..64).filter(|&r| s.map().is_hydrated(r)).collect();
        assert_eq!(hydrated, vec![30, 31, 32, 50]);
        assert_eq!(s.background(), 0);
    }
}
