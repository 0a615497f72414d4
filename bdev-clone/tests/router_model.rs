//! Model-based tests of the router: random workloads, random completion
//! orders, failure injection and crashes, against a reference model
//! (see `common/mod.rs`).

mod common;

use bdev_clone::router::{IoKind, RouterConfig, Stripes};
use bdev_clone::Geometry;
use common::Sim;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Action {
    /// kind: 0..=2 read, 3..=4 write, 5 FUA write, 6 write-zeroes,
    /// 7 discard, 8 flush.
    Submit {
        kind: u8,
        off: u16,
        len: u8,
        aligned: bool,
    },
    Complete {
        pick: u16,
    },
    Background,
    Timer,
    Crash,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (0u8..9, any::<u16>(), any::<u8>(), any::<bool>())
            .prop_map(|(kind, off, len, aligned)| Action::Submit { kind, off, len, aligned }),
        10 => any::<u16>().prop_map(|pick| Action::Complete { pick }),
        2 => Just(Action::Background),
        1 => Just(Action::Timer),
        1 => Just(Action::Crash),
    ]
}

#[derive(Clone, Debug)]
struct Setup {
    /// (block size, region size)
    shape: (u32, u64),
    source_blocks: u64,
    threshold: u64,
    batch: u64,
    passdown: bool,
    copy_on_read: bool,
    md_units_per_block: u32,
    /// (owners, regions per stripe), as the target's striped ownership.
    stripes: (u64, u64),
    failures: bool,
    seed: u64,
    /// Read-triggered copies per pump (with copy-on-read).
    read_budget: u64,
    /// Reads and writes of the same blocks in flight together.
    overlap: bool,
}

prop_compose! {
    fn setup()(
        shape in prop_oneof![
            Just((512u32, 4096u64)),
            Just((512, 8192)),
            Just((4096, 4096)),
            Just((4096, 16384)),
        ],
        source_blocks in 1u64..300,
        threshold in 0u64..5,
        batch in 1u64..4,
        passdown in any::<bool>(),
        copy_on_read in any::<bool>(),
        md_units_per_block in prop_oneof![Just(1u32), Just(8)],
        stripes in (1u64..4, prop_oneof![Just(1u64), Just(2), Just(64)]),
        failures in any::<bool>(),
        seed in any::<u64>(),
        read_budget in prop_oneof![Just(0u64), Just(1), Just(3), Just(u64::MAX)],
        overlap in any::<bool>(),
    ) -> Setup {
        Setup {
            shape,
            source_blocks,
            threshold,
            batch,
            passdown,
            copy_on_read,
            md_units_per_block,
            stripes,
            failures,
            seed,
            read_budget,
            overlap,
        }
    }
}

fn config(s: &Setup) -> RouterConfig {
    RouterConfig {
        hydration_threshold: s.threshold,
        hydration_batch_size: s.batch,
        hydration_enabled: true,
        discard_passdown: s.passdown,
        copy_on_read: s.copy_on_read,
    }
}

fn build(s: &Setup) -> Sim {
    let (bs, rs) = s.shape;
    let geo = Geometry::new(s.source_blocks, bs, s.source_blocks + 7, bs, rs).unwrap();
    let stripes = Stripes {
        owners: s.stripes.0,
        regions: s.stripes.1,
    };
    let mut sim = Sim::with_shape(geo, config(s), stripes, s.md_units_per_block, s.seed);
    sim.set_read_budget(s.read_budget);
    sim.overlap_reads = s.overlap;
    if s.failures {
        sim.fail_source = 12;
        sim.fail_dest = 8;
        sim.fail_commit = 6;
    }
    sim
}

/// Apply one action; returns false for a crash.
fn step(sim: &mut Sim, a: &Action) -> bool {
    match *a {
        Action::Submit {
            kind,
            off,
            len,
            aligned,
        } => {
            let n = sim.geo.source_blocks();
            let rb = sim.geo.region_blocks();
            let mut offset = off as u64 % n;
            let mut len = 1 + len as u64 % (3 * rb + 2);
            if aligned {
                offset = offset / rb * rb;
                len = len.div_ceil(rb) * rb;
            }
            len = len.min(n - offset).max(1);
            let (k, fua) = match kind {
                0..=2 => (IoKind::Read, false),
                3 | 4 => (IoKind::Write, false),
                5 => (IoKind::Write, true),
                6 => (IoKind::WriteZeroes, false),
                7 => (IoKind::Discard, false),
                _ => (IoKind::Flush, false),
            };
            sim.try_submit(k, offset, len, fua);
        }
        Action::Complete { pick } => {
            if sim.in_flight() > 0 {
                let i = pick as usize % sim.in_flight();
                let ok = sim.draw_ok(i);
                sim.complete(i, ok);
            }
        }
        Action::Background => {
            sim.background();
        }
        Action::Timer => {
            sim.timer();
        }
        Action::Crash => return false,
    }
    sim.check();
    true
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8000, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    /// Random interleavings; every read checked at completion, invariants
    /// after every step; at the end everything drains, hydrates, and the
    /// destination equals the model.
    #[test]
    fn random_workloads_match_the_model(s in setup(), actions in proptest::collection::vec(action(), 1..400)) {
        let mut sim = build(&s);
        for a in &actions {
            if !matches!(a, Action::Crash) {
                step(&mut sim, a);
            }
        }
        sim.finish();
        prop_assert!(sim.stats.requests_done > 0);
    }

    /// Power loss at a random point: after restart from the committed
    /// bitmap every block reads as the model allows (flushed writes present,
    /// anything else the source or a later write, never garbage); then the
    /// restarted clone runs on and finishes hydration.
    #[test]
    fn crash_anywhere_then_restart(s in setup(), actions in proptest::collection::vec(action(), 1..400), after in proptest::collection::vec(action(), 0..40)) {
        let mut sim = build(&s);
        for a in &actions {
            if !step(&mut sim, a) {
                break;
            }
        }
        let mut restarted = sim.crash_and_restart(config(&s), s.seed ^ 0x55);
        restarted.set_read_budget(s.read_budget);
        restarted.overlap_reads = s.overlap;
        restarted.check();
        for a in &after {
            if !matches!(a, Action::Crash) {
                step(&mut restarted, a);
            }
        }
        restarted.finish();
    }
}

/// A long single run with failures, to exercise read-only mode and retries
/// over many steps.
#[test]
fn long_run_with_failures() {
    for seed in 0..12u64 {
        let s = Setup {
            shape: (512, 4096),
            source_blocks: 2003,
            threshold: 3,
            batch: 2,
            passdown: true,
            copy_on_read: seed % 2 == 0,
            md_units_per_block: if seed % 3 == 0 { 8 } else { 1 },
            stripes: (1 + seed % 3, [64, 1, 2][(seed / 3 % 3) as usize]),
            failures: true,
            seed,
            read_budget: [0, 1, 2, u64::MAX][(seed % 4) as usize],
            overlap: seed % 3 != 1,
        };
        let mut sim = build(&s);
        sim.fail_commit = if seed % 4 != 3 { 0 } else { 2 };
        let mut rng = common::Rng::new(seed + 100);
        for _ in 0..4000 {
            let a = match rng.below(40) {
                0..=13 => Action::Submit {
                    kind: rng.below(9) as u8,
                    off: rng.next() as u16,
                    len: rng.next() as u8,
                    aligned: rng.chance(64),
                },
                14..=36 => Action::Complete {
                    pick: rng.next() as u16,
                },
                37 => Action::Background,
                _ => Action::Timer,
            };
            step(&mut sim, &a);
        }
        sim.finish();
        assert!(sim.stats.reads_checked > 300, "{:?}", sim.stats);
        if seed % 4 != 3 {
            // No commit failures: it stays read-write and hydrates.
            assert!(sim.stats.copies > 50, "{:?}", sim.stats);
        }
        if s.copy_on_read && s.read_budget > 0 {
            assert!(sim.stats.read_copies > 20, "{:?}", sim.stats);
        }
    }
}
