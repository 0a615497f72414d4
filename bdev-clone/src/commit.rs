//! The commit protocol's decisions, sans-IO: one [`Committer`] per clone
//! serialises commit rounds for all its routers (one per reactor, striped
//! over one map) and for user flushes. The target's executor is
//! `committer.rs`; the router model and crash tests drive this same type.
//!
//! A round, in order: count it in flight, take the dirty units, snapshot
//! them ([`snapshot_units`], whole metadata blocks), flush the destination,
//! write the units, flush the metadata. Whoever asks while a round is in
//! flight waits for the next one: its bits may have missed the snapshot.
//! A round with no dirty unit is a destination flush only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::region_map::{RegionMap, WORDS_PER_UNIT};

/// The image of one bitmap unit taken when a round snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitImage {
    pub index: u32,
    pub words: [u64; WORDS_PER_UNIT],
}

/// A clone's commit rounds in flight, counted by its committer and read by
/// its routers: a flush or FUA write that finds no dirty unit while one is
/// in flight still asks for a commit (its bits may sit in that snapshot).
#[derive(Clone, Debug, Default)]
pub struct CommitRounds(Arc<AtomicU64>);

impl CommitRounds {
    pub fn in_flight(&self) -> bool {
        self.0.load(Ordering::Acquire) > 0
    }
}

/// A round started by [`Committer::start`].
#[derive(Debug)]
pub struct Round {
    /// The units taken from the map's dirty set (put back on failure).
    pub dirty: Vec<u32>,
}

/// One per clone; `W` is whoever waits for a round (a router's commit, a
/// user flush).
#[derive(Debug)]
pub struct Committer<W> {
    rounds: CommitRounds,
    units_per_block: u32,
    in_flight: bool,
    current: Vec<W>,
    next: Vec<W>,
}

impl<W> Committer<W> {
    /// A committer writing metadata blocks of `units_per_block` units.
    pub fn new(rounds: CommitRounds, units_per_block: u32) -> Self {
        Committer {
            rounds,
            units_per_block: units_per_block.max(1),
            in_flight: false,
            current: Vec::new(),
            next: Vec::new(),
        }
    }

    /// The counter the clone's routers share.
    pub fn rounds(&self) -> &CommitRounds {
        &self.rounds
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// `w` waits for the next round to start (call [`Committer::start`]).
    pub fn request(&mut self, w: W) {
        self.next.push(w);
    }

    /// Start a round if none is in flight and one is wanted (waiters, or
    /// `periodic` with dirty units).
    pub fn start(&mut self, map: &RegionMap, periodic: bool) -> Option<Round> {
        if self.in_flight || (self.next.is_empty() && !(periodic && map.has_dirty())) {
            return None;
        }
        self.in_flight = true;
        self.current = std::mem::take(&mut self.next);
        // Counted before the snapshot: a router that finds no dirty unit
        // then knows its bits may be in this round.
        self.rounds.0.fetch_add(1, Ordering::AcqRel);
        Some(Round {
            dirty: map.take_dirty(),
        })
    }

    /// Images of `round`'s units in whole metadata blocks, taken now.
    pub fn snapshot(&self, map: &RegionMap, round: &Round) -> Vec<UnitImage> {
        snapshot_units(map, &round.dirty, self.units_per_block)
    }

    /// `round` ended: a failed one puts its units back in the dirty set
    /// (the bits stay in core, reads are right; every later flush needing
    /// them fails). Returns its waiters, to be answered with `ok`.
    pub fn finish(&mut self, map: &RegionMap, round: Round, ok: bool) -> Vec<W> {
        if !ok && !round.dirty.is_empty() {
            map.restore_dirty(&round.dirty);
        }
        self.rounds.0.fetch_sub(1, Ordering::AcqRel);
        self.in_flight = false;
        std::mem::take(&mut self.current)
    }

    /// Every waiter still queued (the clone is going away).
    pub fn into_waiters(self) -> impl Iterator<Item = W> {
        self.current.into_iter().chain(self.next)
    }
}

/// Images of the `dirty` units (ascending), in whole metadata blocks of
/// `per` units: a block's other units are written too; a block past the
/// last unit is short (the writer pads it with zero units).
pub fn snapshot_units(map: &RegionMap, dirty: &[u32], per: u32) -> Vec<UnitImage> {
    let per = per.max(1) as u64;
    let num_units = map.num_units();
    let mut units = Vec::with_capacity(dirty.len());
    let mut last_group = u64::MAX;
    for &u in dirty {
        let g = u as u64 / per;
        if g == last_group {
            continue;
        }
        last_group = g;
        for v in g * per..(g * per + per).min(num_units) {
            units.push(UnitImage {
                index: v as u32,
                words: map.unit_words(v),
            });
        }
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_take_whole_blocks_and_failures_put_units_back() {
        let map = RegionMap::new(64 * WORDS_PER_UNIT as u64 * 10);
        let mut c: Committer<u32> = Committer::new(CommitRounds::default(), 8);
        assert!(
            c.start(&map, true).is_none(),
            "nothing dirty, nobody waiting"
        );
        map.set_range(0..1);
        let last = map.num_regions() - 1;
        map.set_range(last..last + 1);
        c.request(7);
        let r = c.start(&map, false).unwrap();
        assert!(c.rounds().in_flight());
        c.request(8);
        assert!(c.start(&map, false).is_none(), "one round at a time");
        let idx: Vec<u32> = c.snapshot(&map, &r).iter().map(|u| u.index).collect();
        // Unit 9 lives in block 1 (units 8..16); the map has 10 units.
        assert_eq!(idx, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(c.finish(&map, r, false), vec![7]);
        assert!(!c.rounds().in_flight());
        assert!(map.has_dirty(), "a failed round's units are dirty again");
        let r = c.start(&map, false).unwrap();
        assert_eq!(c.finish(&map, r, true), vec![8]);
        assert!(!map.has_dirty());
    }
}
