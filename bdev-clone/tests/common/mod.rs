//! A simulated executor for the router, with a reference model.
//!
//! As in the target: regions are striped over several routers (one per
//! reactor there) sharing one map, a request is split at stripes
//! ([`Stripes::split`]) and each part routed by its owner; commits and user
//! flushes go through the clone's one [`Committer`] (rounds serialised,
//! dirty units snapshotted in whole metadata blocks, units put back on
//! failure), executed here in its three steps as `committer.rs` does.
//!
//! Devices are arrays of `u64` tags, one per block: the source holds fixed
//! tags, user writes put fresh tags, write-zeroes puts `ZERO`, a discard
//! puts `DISCARDED`, and the destination starts as garbage. The executor
//! keeps every command the router emits in a pending set and completes them
//! in whatever order the test picks, with optional failures.
//!
//! Durability: each device has a durable image and, per block, the
//! completed writes not yet flushed. A flush makes durable what completed
//! before it was *issued*; a crash keeps, per block, the durable value or
//! any newer completed or in-flight write (and per metadata unit the same),
//! which is everything a real volatile write cache may do.
//!
//! The model: per block, the set of values a read may return now (`cur`,
//! normally one value; a failed write adds its value; `None` = anything,
//! after a discard), and for crashes the value made durable by the last
//! flush/FUA (`stable`) plus every write since (`since`).
#![allow(dead_code, unused_macros)]

/// The `field` of every `Variant` command in a trace, in order (use with
/// `#[macro_use] mod common;`).
macro_rules! picked {
    ($trace:expr, $variant:ident . $field:ident) => {
        $trace
            .iter()
            .filter_map(|c| match c {
                Command::$variant { $field, .. } => Some($field.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
}

use std::collections::HashMap;
use std::sync::Arc;

use bdev_clone::commit::{Committer, Round, UnitImage};
use bdev_clone::metadata::{self, SuperState, Superblock, UNIT_SIZE};
use bdev_clone::region_map::WORDS_PER_UNIT;
use bdev_clone::router::{
    Command, CommitId, IoError, IoKind, MetadataMode, ReqId, Request, Router, RouterConfig, Status,
    Stripes,
};
use bdev_clone::{Geometry, RegionMap};
use uuid::Uuid;

pub const ZERO: u64 = 0;
pub const DISCARDED: u64 = 0xD15C_0000_0000_0000;

pub fn source_tag(b: u64) -> u64 {
    0x5000_0000_0000_0000 | b
}
pub fn garbage_tag(b: u64) -> u64 {
    0xBAD0_0000_0000_0000 | b
}

/// `None` = any value is allowed (discarded).
pub type Val = Option<u64>;

#[derive(Clone, Debug)]
struct SinceEntry {
    req: ReqId,
    val: Val,
    done: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpClass {
    Read,
    Write,
    Flush,
}

struct UserReq {
    req: Request,
    tag: u64,
    /// Read results, per block of the request.
    buf: Vec<Option<u64>>,
    /// Flush: the model at submission and the completion sequence then.
    flush_snap: Option<(Vec<Vec<Val>>, u64)>,
    /// Blocks whose value this request changes (discard: whole regions).
    affected: std::ops::Range<u64>,
    /// Reads: per block, the values it may return besides `cur` at its
    /// completion (`cur` at its submission, and every write racing it).
    seen: Vec<Vec<Val>>,
}

/// Who waits for a commit round (`committer.rs`'s `Waiter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiter {
    /// Router `.0`'s commit `.1`.
    Router(usize, CommitId),
    /// A user flush.
    Flush(ReqId),
}

/// A part of a user request, at its owner.
#[derive(Clone, Copy, Debug)]
struct Part {
    user: ReqId,
    owner: usize,
}

/// A read-triggered copy's source read (its destination write is a `Copy`
/// once it is in).
#[derive(Debug)]
struct ReadCopy {
    req: ReqId,
    op: u64,
    read: std::ops::Range<u64>,
    copy: u64,
    blocks: std::ops::Range<u64>,
    owner: usize,
}

#[derive(Debug)]
enum Pending {
    User {
        cmd: Command,
        owner: usize,
    },
    Copy {
        copy: u64,
        blocks: std::ops::Range<u64>,
        owner: usize,
    },
    ReadCopy(ReadCopy),
    CommitDestFlush {
        round: Round,
        units: Vec<UnitImage>,
        epoch: u64,
    },
    CommitWrite {
        round: Round,
        units: Vec<UnitImage>,
    },
    CommitMdFlush {
        round: Round,
        epoch: u64,
    },
}

/// Small deterministic RNG (xorshift64*).
#[derive(Clone)]
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn chance(&mut self, per_256: u8) -> bool {
        (self.next() & 0xff) < per_256 as u64
    }
}

#[derive(Clone, Debug, Default)]
pub struct SimStats {
    pub reads_checked: u64,
    pub requests_done: u64,
    pub requests_failed: u64,
    pub copies: u64,
    pub read_copies: u64,
    pub commits_issued: u64,
}

pub struct Sim {
    pub geo: Geometry,
    /// One per owner; region r belongs to `routers[stripes.owner(r)]`.
    pub routers: Vec<Router>,
    pub stripes: Stripes,
    map: Arc<RegionMap>,
    /// The clone's committer.
    pub committer: Committer<Waiter>,
    /// The clone's metadata mode (the worst any router or round reached).
    clone_mode: MetadataMode,
    /// Parts in flight by the id their router knows them by.
    parts: HashMap<ReqId, Part>,
    /// Per user request: parts not yet answered, and the first error.
    left: HashMap<ReqId, (u32, Status)>,
    next_part: ReqId,
    pub uuid: Uuid,
    pub source: Vec<u64>,
    pub dest: Vec<u64>,
    dest_durable: Vec<u64>,
    dest_volatile: Vec<Vec<(u64, u64)>>,
    dest_seq: u64,
    pub md_block_units: u32,
    md_durable: Vec<u8>,
    md_volatile: Vec<(u64, u32, [u8; UNIT_SIZE])>,
    md_seq: u64,
    pending: Vec<Pending>,
    reqs: HashMap<ReqId, UserReq>,
    next_req: ReqId,
    cur: Vec<Vec<Val>>,
    stable: Vec<Vec<Val>>,
    /// Model sequence at which `stable` was last set.
    stable_seq: Vec<u64>,
    since: Vec<Vec<SinceEntry>>,
    model_seq: u64,
    prev_bits: Vec<bool>,
    pub rng: Rng,
    out: Vec<Command>,
    /// Failure injection, per 256 operations.
    pub fail_source: u8,
    pub fail_dest: u8,
    pub fail_commit: u8,
    pub stats: SimStats,
    /// Every command the router emitted, in order (for targeted tests).
    pub trace: Vec<Command>,
    pub keep_trace: bool,
    pub completions: Vec<(ReqId, Status)>,
    /// Read-triggered copies each router may start per pump (`background`).
    pub read_budget: u64,
    /// Let reads and writes to the same blocks be in flight together (a
    /// read may then return any value the block had meanwhile).
    pub overlap_reads: bool,
    /// With `keep_trace`: what each successful read returned.
    pub read_results: HashMap<ReqId, Vec<u64>>,
}

fn intersect(a: &std::ops::Range<u64>, b: &std::ops::Range<u64>) -> std::ops::Range<u64> {
    let s = a.start.max(b.start);
    s..a.end.min(b.end).max(s)
}

trait Blocks {
    fn span(&self) -> std::ops::Range<u64>;
}

impl Blocks for Request {
    fn span(&self) -> std::ops::Range<u64> {
        self.offset_blocks..self.offset_blocks + self.num_blocks
    }
}

fn blank_md(num_regions: u64) -> Vec<u8> {
    vec![0u8; metadata::required_bytes(num_regions) as usize]
}

fn region_blocks_of(geo: &Geometry, blocks: &std::ops::Range<u64>) -> std::ops::Range<u64> {
    geo.regions_covering(blocks.start, blocks.end - blocks.start)
        .unwrap()
}

impl Sim {
    /// A fresh clone: blank metadata formatted, destination garbage; one
    /// owner, metadata blocks of one unit.
    pub fn new(geo: Geometry, cfg: RouterConfig, seed: u64) -> Sim {
        let one = Stripes {
            regions: 64,
            owners: 1,
        };
        Sim::with_shape(geo, cfg, one, 1, seed)
    }

    /// [`Sim::new`] with `stripes` and metadata blocks of `md_block_units`
    /// units.
    pub fn with_shape(
        geo: Geometry,
        cfg: RouterConfig,
        stripes: Stripes,
        md_block_units: u32,
        seed: u64,
    ) -> Sim {
        let uuid = Uuid::from_u128(0xC10E_0000_0000_0000_0000_0000_0000_0001);
        let mut md = blank_md(geo.num_regions());
        // Format: blank -> every unit (empty), then the superblock in both
        // slots.
        let st = metadata::decode_superblock(&md[..4096], &md[4096..8192]).unwrap();
        assert_eq!(st, SuperState::Blank);
        for u in 0..bdev_clone::region_map::units_for(geo.num_regions()) {
            md[metadata::unit_offset(u) as usize..][..UNIT_SIZE].copy_from_slice(
                &metadata::encode_unit_words(&uuid, u as u32, &[0; WORDS_PER_UNIT]),
            );
        }
        let sb = Superblock::new(uuid, &geo);
        for slot in [0, 1] {
            md[metadata::superblock_offset(slot) as usize..][..4096]
                .copy_from_slice(&metadata::encode_superblock(&sb, slot));
        }
        let n = geo.source_blocks() as usize;
        let source: Vec<u64> = (0..n as u64).map(source_tag).collect();
        let dest: Vec<u64> = (0..n as u64).map(garbage_tag).collect();
        let cur = source.iter().map(|&v| vec![Some(v)]).collect::<Vec<_>>();
        Sim::assemble(
            geo,
            cfg,
            stripes,
            md_block_units,
            seed,
            uuid,
            source,
            dest,
            md,
            cur,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        geo: Geometry,
        cfg: RouterConfig,
        stripes: Stripes,
        md_block_units: u32,
        seed: u64,
        uuid: Uuid,
        source: Vec<u64>,
        dest: Vec<u64>,
        md: Vec<u8>,
        cur: Vec<Vec<Val>>,
    ) -> Sim {
        let map = Arc::new(Self::load_map(&geo, uuid, &md));
        let n = geo.source_blocks() as usize;
        let prev_bits = (0..geo.num_regions()).map(|r| map.is_hydrated(r)).collect();
        let committer = Committer::new(Default::default(), md_block_units);
        let routers = (0..stripes.owners)
            .map(|i| {
                let rounds = committer.rounds().clone();
                let mut r = Router::new(
                    geo,
                    map.clone(),
                    cfg.clone(),
                    MetadataMode::ReadWrite,
                    rounds,
                )
                .unwrap();
                r.set_stripe(stripes.regions, i, stripes.owners);
                r
            })
            .collect();
        Sim {
            geo,
            routers,
            stripes,
            map,
            committer,
            clone_mode: MetadataMode::ReadWrite,
            parts: HashMap::new(),
            left: HashMap::new(),
            next_part: 1 << 48,
            uuid,
            source,
            dest_durable: dest.clone(),
            dest,
            dest_volatile: vec![Vec::new(); n],
            dest_seq: 0,
            md_block_units,
            md_durable: md,
            md_volatile: Vec::new(),
            md_seq: 0,
            pending: Vec::new(),
            reqs: HashMap::new(),
            next_req: 1,
            stable: cur.clone(),
            stable_seq: vec![0; n],
            cur,
            since: vec![Vec::new(); n],
            model_seq: 0,
            prev_bits,
            rng: Rng::new(seed),
            out: Vec::new(),
            fail_source: 0,
            fail_dest: 0,
            fail_commit: 0,
            stats: SimStats::default(),
            trace: Vec::new(),
            keep_trace: false,
            completions: Vec::new(),
            read_budget: 0,
            overlap_reads: false,
            read_results: HashMap::new(),
        }
    }

    /// What a restart does: read both superblocks, check them, load units.
    pub fn load_map(geo: &Geometry, uuid: Uuid, md: &[u8]) -> RegionMap {
        let st = metadata::decode_superblock(&md[..4096], &md[4096..8192]).expect("superblock");
        let SuperState::Valid { sb, .. } = st else {
            panic!("metadata blank after format")
        };
        metadata::check_geometry(&sb, geo).unwrap();
        metadata::check_uuid(&sb, uuid).unwrap();
        metadata::check_size(md.len() as u64, geo.num_regions()).unwrap();
        let map = RegionMap::new(geo.num_regions());
        let units = map.num_units() as usize;
        let start = metadata::unit_offset(0) as usize;
        metadata::load_bitmap(
            &map,
            &md[start..start + units * UNIT_SIZE],
            &metadata::UnitKey::of(&sb),
        )
        .expect("bitmap units");
        map
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    pub fn requests_in_flight(&self) -> usize {
        self.reqs.len()
    }

    /// Submit unless it overlaps a request in flight (reads may overlap
    /// reads). Returns the id.
    pub fn try_submit(&mut self, kind: IoKind, offset: u64, len: u64, fua: bool) -> Option<ReqId> {
        if kind != IoKind::Flush {
            let end = offset + len;
            let overlap = self.overlap_reads;
            let clash = self.reqs.values().any(|u| {
                u.req.kind != IoKind::Flush
                    && !(u.req.kind == IoKind::Read && kind == IoKind::Read)
                    && !(overlap && (u.req.kind == IoKind::Read || kind == IoKind::Read))
                    && u.req.offset_blocks < end
                    && offset < u.req.offset_blocks + u.req.num_blocks
            });
            if clash {
                return None;
            }
        }
        let id = self.next_req;
        self.next_req += 1;
        let mut req = Request::new(id, kind, offset, len);
        req.fua = fua;
        Some(self.submit(req))
    }

    /// Submit a request as is (caller keeps concurrent requests disjoint).
    pub fn submit(&mut self, req: Request) -> ReqId {
        let id = req.id;
        self.next_req = self.next_req.max(id + 1);
        let tag = 0x1000_0000_0000 + id;
        let blocks = req.offset_blocks..req.offset_blocks + req.num_blocks;
        let in_range = self.geo.contains(req.offset_blocks, req.num_blocks) && req.num_blocks > 0;
        let affected = match req.kind {
            IoKind::Write | IoKind::WriteZeroes if in_range => blocks.clone(),
            IoKind::Discard if in_range => {
                let w = self
                    .geo
                    .whole_regions_in(req.offset_blocks, req.num_blocks)
                    .unwrap();
                self.geo.region_range_blocks(w)
            }
            _ => 0..0,
        };
        let val = match req.kind {
            IoKind::Write => Some(tag),
            IoKind::WriteZeroes => Some(ZERO),
            _ => None,
        };
        for b in affected.clone() {
            self.since[b as usize].push(SinceEntry {
                req: id,
                val,
                done: None,
            });
        }
        let flush_snap = (req.kind == IoKind::Flush).then(|| (self.cur.clone(), self.model_seq));
        // A read may return what the block held when it was submitted, or
        // anything written meanwhile (by a write in flight or later).
        let mut seen = Vec::new();
        if req.kind == IoKind::Read && in_range {
            seen = blocks
                .clone()
                .map(|b| self.cur[b as usize].clone())
                .collect();
            for u in self.reqs.values() {
                let v = match u.req.kind {
                    IoKind::Write => Some(u.tag),
                    IoKind::WriteZeroes => Some(ZERO),
                    _ => None,
                };
                for b in intersect(&u.affected, &blocks) {
                    seen[(b - blocks.start) as usize].push(v);
                }
            }
        }
        for u in self.reqs.values_mut() {
            if u.req.kind == IoKind::Read && !u.seen.is_empty() {
                for b in intersect(&affected, &u.req.span()) {
                    u.seen[(b - u.req.offset_blocks) as usize].push(val);
                }
            }
        }
        self.reqs.insert(
            id,
            UserReq {
                buf: vec![
                    None;
                    if req.kind == IoKind::Read {
                        req.num_blocks as usize
                    } else {
                        0
                    }
                ],
                req: req.clone(),
                tag,
                flush_snap,
                affected,
                seen,
            },
        );
        if self.mode() == MetadataMode::Failed {
            // The target's channel fails every I/O of a failed clone.
            self.left.insert(id, (1, Status::Success));
            self.complete_request(id, Status::Error(IoError::MetadataFailed));
            return id;
        }
        if req.kind == IoKind::Flush {
            // As in the target: a flush is the committer's (a round started
            // after it arrived; a destination flush only if nothing changed).
            self.left.insert(id, (1, Status::Success));
            self.committer.request(Waiter::Flush(id));
            self.start_round(false);
            return id;
        }
        let Some(regions) = self
            .geo
            .regions_covering(req.offset_blocks, req.num_blocks)
            .filter(|r| !r.is_empty() && req.num_blocks > 0)
        else {
            // The target fails it before any router; the routers agree.
            self.left.insert(id, (1, Status::Success));
            self.parts.insert(id, Part { user: id, owner: 0 });
            return self.route(0, req);
        };
        let split = self
            .stripes
            .split(&self.geo, regions, req.offset_blocks, req.num_blocks);
        self.left.insert(id, (split.len() as u32, Status::Success));
        for (k, &(owner, off, num)) in split.iter().enumerate() {
            let pid = if k == 0 {
                id
            } else {
                self.next_part += 1;
                self.next_part
            };
            self.parts.insert(pid, Part { user: id, owner });
            let mut part = Request::new(pid, req.kind, off, num);
            part.fua = req.fua;
            self.route(owner, part);
        }
        id
    }

    fn route(&mut self, owner: usize, req: Request) -> ReqId {
        let id = req.id;
        self.sync_mode(owner);
        let mut out = std::mem::take(&mut self.out);
        self.routers[owner].submit(req, &mut out).unwrap();
        self.out = out;
        self.absorb_from(owner);
        id
    }

    /// The shared map.
    pub fn map(&self) -> &Arc<RegionMap> {
        &self.map
    }

    /// The clone's metadata mode.
    pub fn mode(&mut self) -> MetadataMode {
        self.publish();
        self.clone_mode
    }

    /// Change every router's tunables.
    pub fn config_mut(&mut self, f: impl Fn(&mut RouterConfig)) {
        for r in &mut self.routers {
            f(r.config_mut());
        }
    }

    /// The owners' `publish`: the clone's mode is the worst of its own and
    /// every router's.
    fn publish(&mut self) {
        for r in &self.routers {
            if r.mode().code() > self.clone_mode.code() {
                self.clone_mode = r.mode();
            }
        }
    }

    /// The owner's `sync_mode`: router `i`'s mode down to the clone's.
    fn sync_mode(&mut self, i: usize) {
        self.publish();
        match self.clone_mode {
            MetadataMode::ReadWrite => {}
            MetadataMode::ReadOnly => self.routers[i].set_read_only(),
            MetadataMode::Failed => self.routers[i].set_failed(),
        }
    }

    /// Every owner's hydration poller.
    pub fn background(&mut self) -> u64 {
        let mut n = 0;
        for i in 0..self.routers.len() {
            self.sync_mode(i);
            self.routers[i].set_read_copy_budget(self.read_budget);
            let mut out = std::mem::take(&mut self.out);
            n += self.routers[i].next_background(&mut out);
            self.out = out;
            self.absorb_from(i);
        }
        n
    }

    /// The periodic commit: a round if something changed and none is in
    /// flight. Returns whether one started.
    pub fn timer(&mut self) -> bool {
        self.start_round(true)
    }

    /// The committer starts a round if one is wanted (`committer.rs`'s
    /// `start_round`): snapshot, then step 1 (destination flush) issued
    /// now; nothing changed: that flush only; metadata not read-write: the
    /// round fails at once.
    fn start_round(&mut self, periodic: bool) -> bool {
        let map = self.map.clone();
        let Some(round) = self.committer.start(&map, periodic) else {
            return false;
        };
        self.stats.commits_issued += 1;
        self.publish();
        if !round.dirty.is_empty() && self.clone_mode != MetadataMode::ReadWrite {
            self.end_round(round, false);
            return true;
        }
        let units = self.committer.snapshot(&map, &round);
        for w in units.windows(2) {
            assert!(w[0].index < w[1].index, "commit units ascending");
        }
        let per = self.md_block_units.max(1);
        if let Some(u) = units.first() {
            assert_eq!(u.index % per, 0, "commit covers whole metadata blocks");
        }
        self.pending.push(Pending::CommitDestFlush {
            round,
            units,
            epoch: self.dest_seq,
        });
        true
    }

    /// A round ended: the committer answers its waiters, then starts the
    /// next round if one is wanted.
    fn end_round(&mut self, round: Round, ok: bool) {
        let map = self.map.clone();
        let failed_with_units = !ok && !round.dirty.is_empty();
        let waiters = self.committer.finish(&map, round, ok);
        if failed_with_units && self.clone_mode == MetadataMode::ReadWrite {
            // The target's clone goes read-only; a router with nothing
            // waiting learns it before its next request (`sync_mode`).
            self.clone_mode = MetadataMode::ReadOnly;
        }
        for w in waiters {
            match w {
                Waiter::Router(i, c) => {
                    let mut out = std::mem::take(&mut self.out);
                    self.routers[i].commit_done(c, ok, &mut out).unwrap();
                    self.out = out;
                    self.absorb_from(i);
                }
                Waiter::Flush(id) => {
                    let st = if ok {
                        Status::Success
                    } else {
                        Status::Error(IoError::CommitFailed)
                    };
                    self.complete_request(id, st);
                }
            }
        }
        self.start_round(false);
        // The committer's own owner drives its router right after a round
        // (owner 0 is the committer's here).
        self.sync_mode(0);
    }

    fn dest_writers_conflict(
        &self,
        blocks: &std::ops::Range<u64>,
        exclusive: bool,
    ) -> Option<String> {
        let regions = region_blocks_of(&self.geo, blocks);
        for p in &self.pending {
            let (other, other_exclusive) = match p {
                Pending::Copy { blocks, .. } => (blocks.clone(), true),
                Pending::ReadCopy(rc) => (rc.blocks.clone(), true),
                Pending::User {
                    cmd:
                        Command::WriteDest { blocks, .. }
                        | Command::WriteZeroesDest { blocks, .. }
                        | Command::DiscardDest { blocks, .. },
                    ..
                } => (blocks.clone(), false),
                _ => continue,
            };
            let oregions = region_blocks_of(&self.geo, &other);
            let overlap = regions.start < oregions.end && oregions.start < regions.end;
            if overlap && (exclusive || other_exclusive) {
                return Some(format!(
                    "dest writers {blocks:?} and {other:?} share a region ({p:?})"
                ));
            }
        }
        None
    }

    /// A copy as issued: whole cold regions, no other writer in them.
    fn check_copy(
        &self,
        regions: &std::ops::Range<u64>,
        blocks: &std::ops::Range<u64>,
        what: &str,
    ) {
        assert_eq!(*blocks, self.geo.region_range_blocks(regions.clone()));
        for r in regions.clone() {
            assert!(!self.map.is_hydrated(r), "{what} of hydrated region {r}");
        }
        if let Some(e) = self.dest_writers_conflict(blocks, true) {
            panic!("{what} issued over another writer: {e}");
        }
    }

    /// Take the router's commands into the pending set, checking the
    /// per-region writer rule as each is issued.
    fn absorb_from(&mut self, owner: usize) {
        while !self.out.is_empty() {
            let cmds: Vec<Command> = std::mem::take(&mut self.out);
            for cmd in cmds {
                if self.keep_trace {
                    self.trace.push(cmd.clone());
                }
                match cmd {
                    Command::Complete { req, status } => self.part_done(req, status),
                    Command::Commit { commit } => {
                        self.committer.request(Waiter::Router(owner, commit));
                        self.start_round(false);
                    }
                    Command::StartCopy {
                        copy,
                        regions,
                        blocks,
                    } => {
                        self.check_copy(&regions, &blocks, "copy");
                        self.stats.copies += 1;
                        self.pending.push(Pending::Copy {
                            copy,
                            blocks,
                            owner,
                        });
                    }
                    Command::ReadCopy {
                        req,
                        op,
                        read,
                        copy,
                        regions,
                        blocks,
                    } => {
                        self.check_copy(&regions, &blocks, "read copy");
                        assert!(
                            read.start >= blocks.start
                                && read.end <= blocks.end
                                && !read.is_empty(),
                            "read {read:?} outside its copy {blocks:?}"
                        );
                        self.stats.read_copies += 1;
                        self.pending.push(Pending::ReadCopy(ReadCopy {
                            req,
                            op,
                            read,
                            copy,
                            blocks,
                            owner,
                        }));
                    }
                    cmd => {
                        let blocks = match &cmd {
                            Command::WriteDest { blocks, .. }
                            | Command::WriteZeroesDest { blocks, .. }
                            | Command::DiscardDest { blocks, .. } => Some(blocks.clone()),
                            _ => None,
                        };
                        if let Some(b) = blocks {
                            // A write to a cold region is an overwrite: the
                            // clone's own writer, exclusive in its regions.
                            let regs = region_blocks_of(&self.geo, &b);
                            let overwrite = regs.clone().any(|r| !self.map.is_hydrated(r));
                            if let Some(e) = self.dest_writers_conflict(&b, overwrite) {
                                panic!("dest write issued over another writer: {e}");
                            }
                            if matches!(cmd, Command::DiscardDest { .. }) {
                                let w =
                                    self.geo.whole_regions_in(b.start, b.end - b.start).unwrap();
                                assert_eq!(
                                    self.geo.region_range_blocks(w),
                                    b,
                                    "discard passdown is whole regions only"
                                );
                            }
                        }
                        self.pending.push(Pending::User { cmd, owner });
                    }
                }
            }
        }
    }

    fn dest_write(&mut self, blocks: std::ops::Range<u64>, val: impl Fn(u64) -> u64, fua: bool) {
        self.dest_seq += 1;
        for b in blocks {
            let v = val(b);
            self.dest[b as usize] = v;
            if fua {
                self.dest_durable[b as usize] = v;
                self.dest_volatile[b as usize].clear();
            } else {
                self.dest_volatile[b as usize].push((self.dest_seq, v));
            }
        }
    }

    fn dest_flush(&mut self, epoch: u64) {
        for b in 0..self.dest.len() {
            let vol = &mut self.dest_volatile[b];
            if let Some(pos) = vol.iter().rposition(|(s, _)| *s <= epoch) {
                self.dest_durable[b] = vol[pos].1;
                vol.drain(..=pos);
            }
        }
    }

    fn md_flush(&mut self, epoch: u64) {
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.md_volatile)
            .into_iter()
            .partition(|(s, _, _)| *s <= epoch);
        for (_, u, bytes) in done {
            self.md_durable[metadata::unit_offset(u as u64) as usize..][..UNIT_SIZE]
                .copy_from_slice(&bytes);
        }
        self.md_volatile = keep;
    }

    fn md_write(&mut self, units: &[UnitImage], only_some: bool) {
        self.md_seq += 1;
        for u in units {
            if only_some && self.rng.chance(128) {
                continue;
            }
            let bytes = metadata::encode_unit_words(&self.uuid, u.index, &u.words);
            self.md_volatile.push((self.md_seq, u.index, bytes));
        }
    }

    /// Complete pending item `i` (`ok` = success).
    pub fn complete(&mut self, i: usize, ok: bool) {
        let p = self.pending.swap_remove(i);
        let mut out = std::mem::take(&mut self.out);
        let owner = match p {
            Pending::User { cmd, owner } => {
                let r = &mut self.routers[owner];
                match (matches!(cmd, Command::ReadDest { .. }), cmd) {
                    (
                        from_dest,
                        Command::ReadSource { req, op, blocks }
                        | Command::ReadDest { req, op, blocks },
                    ) => {
                        if ok {
                            let user = self.parts[&req].user;
                            let u = self.reqs.get_mut(&user).expect("read of a live request");
                            for b in blocks.clone() {
                                let v = if from_dest {
                                    self.dest[b as usize]
                                } else {
                                    self.source[b as usize]
                                };
                                u.buf[(b - u.req.offset_blocks) as usize] = Some(v);
                            }
                        }
                        r.op_done(op, ok, &mut out).unwrap();
                    }
                    (
                        _,
                        Command::WriteDest {
                            req,
                            op,
                            blocks,
                            fua,
                        },
                    ) => {
                        let tag = self.reqs[&self.parts[&req].user].tag;
                        if ok || self.rng.chance(128) {
                            self.dest_write(blocks, |_| tag, fua && ok);
                        }
                        self.routers[owner].op_done(op, ok, &mut out).unwrap();
                    }
                    (_, Command::WriteZeroesDest { op, blocks, .. }) => {
                        if ok || self.rng.chance(128) {
                            self.dest_write(blocks, |_| ZERO, false);
                        }
                        self.routers[owner].op_done(op, ok, &mut out).unwrap();
                    }
                    (_, Command::DiscardDest { op, blocks, .. }) => {
                        if ok || self.rng.chance(128) {
                            self.dest_write(blocks, |b| DISCARDED | b, false);
                        }
                        self.routers[owner].op_done(op, ok, &mut out).unwrap();
                    }
                    (_, other) => unreachable!("{other:?}"),
                }
                Some(owner)
            }
            Pending::Copy {
                copy,
                blocks,
                owner,
            } => {
                if ok || self.rng.chance(128) {
                    let src = self.source.clone();
                    self.dest_write(blocks, |b| src[b as usize], false);
                }
                self.routers[owner].copy_done(copy, ok, &mut out).unwrap();
                Some(owner)
            }
            Pending::ReadCopy(rc) => {
                // The user's part is answered from the source data as soon
                // as it is in; the destination write follows.
                if ok {
                    let user = self.parts[&rc.req].user;
                    let u = self.reqs.get_mut(&user).expect("read of a live request");
                    for b in rc.read {
                        u.buf[(b - u.req.offset_blocks) as usize] = Some(self.source[b as usize]);
                    }
                }
                let r = &mut self.routers[rc.owner];
                r.op_done(rc.op, ok, &mut out).unwrap();
                if ok {
                    self.pending.push(Pending::Copy {
                        copy: rc.copy,
                        blocks: rc.blocks,
                        owner: rc.owner,
                    });
                } else {
                    r.copy_done(rc.copy, false, &mut out).unwrap();
                }
                Some(rc.owner)
            }
            Pending::CommitDestFlush {
                round,
                units,
                epoch,
            } => {
                if ok {
                    self.dest_flush(epoch);
                }
                if ok && !round.dirty.is_empty() {
                    self.pending.push(Pending::CommitWrite { round, units });
                } else {
                    self.end_round(round, ok);
                }
                None
            }
            Pending::CommitWrite { round, units } => {
                self.md_write(&units, !ok);
                if ok {
                    self.pending.push(Pending::CommitMdFlush {
                        round,
                        epoch: self.md_seq,
                    });
                } else {
                    self.end_round(round, false);
                }
                None
            }
            Pending::CommitMdFlush { round, epoch } => {
                if ok {
                    self.md_flush(epoch);
                }
                self.end_round(round, ok);
                None
            }
        };
        if let Some(owner) = owner {
            self.out = out;
            self.absorb_from(owner);
        }
    }

    /// A router completed part `req`: the user request completes with its
    /// last part (failed if any part failed).
    fn part_done(&mut self, req: ReqId, status: Status) {
        let Part { user, .. } = self.parts.remove(&req).expect("completion of a live part");
        let e = self.left.get_mut(&user).expect("parts of a live request");
        e.0 -= 1;
        if e.1 == Status::Success {
            e.1 = status;
        }
        if e.0 == 0 {
            let st = e.1;
            self.complete_request(user, st);
        }
    }

    /// Whether pending item `i` may fail under the injection rates (drawn now).
    pub fn draw_ok(&mut self, i: usize) -> bool {
        let rate = match &self.pending[i] {
            Pending::User { cmd, .. } => match cmd {
                Command::ReadSource { .. } => self.fail_source,
                _ => self.fail_dest,
            },
            Pending::Copy { .. } | Pending::ReadCopy(_) => self.fail_source,
            _ => self.fail_commit,
        };
        !self.rng.chance(rate)
    }

    fn complete_request(&mut self, id: ReqId, status: Status) {
        self.left.remove(&id);
        self.completions.push((id, status));
        let u = self.reqs.remove(&id).expect("completion of a live request");
        self.model_seq += 1;
        let seq = self.model_seq;
        self.stats.requests_done += 1;
        let ok = status == Status::Success;
        if !ok {
            self.stats.requests_failed += 1;
        }
        match u.req.kind {
            IoKind::Read => {
                if ok {
                    self.stats.reads_checked += 1;
                    if self.keep_trace {
                        let got = u.buf.iter().map(|v| v.unwrap_or(u64::MAX)).collect();
                        self.read_results.insert(id, got);
                    }
                    for (i, v) in u.buf.iter().enumerate() {
                        let b = u.req.offset_blocks + i as u64;
                        let v = v.unwrap_or_else(|| panic!("read {id} block {b} never filled"));
                        let mut allowed = self.cur[b as usize].clone();
                        if let Some(s) = u.seen.get(i) {
                            allowed.extend(s.iter().copied());
                        }
                        assert!(
                            allowed.iter().any(|a| a.is_none() || *a == Some(v)),
                            "read {id} block {b} returned {v:#x}, allowed {allowed:x?}"
                        );
                    }
                }
            }
            IoKind::Write | IoKind::WriteZeroes | IoKind::Discard => {
                let val = match u.req.kind {
                    IoKind::Write => Some(u.tag),
                    IoKind::WriteZeroes => Some(ZERO),
                    _ => None,
                };
                for b in u.affected.clone() {
                    let b = b as usize;
                    if ok {
                        self.cur[b] = vec![val];
                    } else if !self.cur[b].contains(&val) {
                        self.cur[b].push(val);
                    }
                    for e in self.since[b].iter_mut().filter(|e| e.req == id) {
                        e.done = Some(seq);
                    }
                    if ok && u.req.fua {
                        self.stable[b] = vec![val];
                        self.stable_seq[b] = seq;
                        self.since[b].clear();
                    }
                }
            }
            IoKind::Flush => {
                if ok {
                    let (snap, epoch) = u.flush_snap.unwrap();
                    for (b, s) in snap.into_iter().enumerate() {
                        // A FUA write that completed after this flush was
                        // submitted already made something newer durable.
                        if self.stable_seq[b] <= epoch {
                            self.stable[b] = s;
                            self.stable_seq[b] = epoch;
                            self.since[b].retain(|e| e.done.is_none_or(|d| d > epoch));
                        }
                    }
                }
            }
        }
    }

    /// Check the invariants that hold between any two steps.
    pub fn check(&mut self) {
        let map = self.map.clone();
        let bits: Vec<bool> = (0..self.geo.num_regions())
            .map(|r| map.is_hydrated(r))
            .collect();
        for (r, (&was, &now)) in self.prev_bits.iter().zip(&bits).enumerate() {
            assert!(!was || now, "region {r} went from hydrated to cold");
        }
        self.prev_bits = bits;
        let mut busy = vec![false; self.dest.len()];
        for u in self.reqs.values() {
            if matches!(
                u.req.kind,
                IoKind::Write | IoKind::WriteZeroes | IoKind::Discard
            ) {
                let end = (u.req.offset_blocks + u.req.num_blocks).min(self.dest.len() as u64);
                for b in u.req.offset_blocks.min(end)..end {
                    busy[b as usize] = true;
                }
            }
        }
        for r in 0..self.geo.num_regions() {
            let hydrated = map.is_hydrated(r);
            for b in self.geo.region_range_blocks(r..r + 1) {
                if busy[b as usize] {
                    continue;
                }
                let v = if hydrated {
                    self.dest[b as usize]
                } else {
                    self.source[b as usize]
                };
                let allowed = &self.cur[b as usize];
                assert!(
                    allowed.iter().any(|a| a.is_none() || *a == Some(v)),
                    "block {b} (region {r}, hydrated {hydrated}) would read {v:#x}, allowed {allowed:x?}"
                );
            }
        }
    }

    /// Complete everything in flight (random order, no failures).
    pub fn drain(&mut self) {
        let mut guard = 0;
        while !self.pending.is_empty() {
            let i = self.rng.below(self.pending.len() as u64) as usize;
            self.complete(i, true);
            self.check();
            guard += 1;
            assert!(guard < 1_000_000, "drain does not terminate");
        }
    }

    /// Drain, hydrate everything, commit; then the destination must hold the
    /// model everywhere and every region be hydrated.
    pub fn finish(&mut self) {
        self.fail_source = 0;
        self.fail_dest = 0;
        self.fail_commit = 0;
        self.drain();
        assert_eq!(self.requests_in_flight(), 0, "requests left after drain");
        if self.mode() == MetadataMode::ReadWrite {
            self.config_mut(|cfg| {
                cfg.hydration_enabled = true;
                cfg.hydration_threshold = cfg.hydration_threshold.max(1);
            });
            let mut rounds = 0;
            while !self.map.is_complete() {
                self.background();
                assert!(self.in_flight() > 0, "hydration stalled");
                self.drain();
                rounds += 1;
                assert!(rounds < 100_000);
            }
            let id = self.try_submit(IoKind::Flush, 0, 0, false).unwrap();
            self.drain();
            assert_eq!(self.completions.last(), Some(&(id, Status::Success)));
            assert!(self.routers.iter().all(|r| r.is_complete_and_durable()));
            for b in 0..self.dest.len() {
                let allowed = &self.cur[b];
                let v = self.dest[b];
                assert!(
                    allowed.iter().any(|a| a.is_none() || *a == Some(v)),
                    "after hydration block {b} holds {v:#x}, model {allowed:x?}"
                );
            }
        }
        assert!(self.routers.iter().all(|r| r.is_idle()));
        assert!(!self.committer.in_flight());
        // Read everything back through the router.
        let n = self.geo.source_blocks();
        let step = self.geo.region_blocks().max(3);
        let mut off = 0;
        while off < n {
            let len = step.min(n - off);
            self.try_submit(IoKind::Read, off, len, false).unwrap();
            off += len;
        }
        self.drain();
    }

    /// Power loss now: keep what the devices may have kept, restart from the
    /// committed metadata, and return the new clone whose model is what each
    /// block may read after the crash.
    pub fn crash_and_restart(&mut self, cfg: RouterConfig, seed: u64) -> Sim {
        // Destination: durable, or any newer completed or in-flight write.
        let mut dest = self.dest_durable.clone();
        let mut cands: Vec<Vec<u64>> = self
            .dest_volatile
            .iter()
            .map(|v| v.iter().map(|(_, x)| *x).collect())
            .collect();
        for p in &self.pending {
            match p {
                Pending::Copy { blocks, .. } => {
                    for b in blocks.clone() {
                        cands[b as usize].push(self.source[b as usize]);
                    }
                }
                Pending::User { cmd, .. } => {
                    let (blocks, v): (_, Box<dyn Fn(u64) -> u64>) = match cmd {
                        Command::WriteDest { req, blocks, .. } => {
                            let t = self.reqs[&self.parts[req].user].tag;
                            (blocks.clone(), Box::new(move |_| t))
                        }
                        Command::WriteZeroesDest { blocks, .. } => {
                            (blocks.clone(), Box::new(|_| ZERO))
                        }
                        Command::DiscardDest { blocks, .. } => {
                            (blocks.clone(), Box::new(|b| DISCARDED | b))
                        }
                        _ => continue,
                    };
                    for b in blocks {
                        cands[b as usize].push(v(b));
                    }
                }
                _ => {}
            }
        }
        for (b, c) in cands.iter().enumerate() {
            let k = self.rng.below(c.len() as u64 + 1) as usize;
            if k > 0 {
                dest[b] = c[k - 1];
            }
        }
        // Metadata: per unit, durable or any newer write (torn at 512 bytes).
        let mut md = self.md_durable.clone();
        let mut ucands: HashMap<u32, Vec<[u8; UNIT_SIZE]>> = HashMap::new();
        for (_, u, bytes) in &self.md_volatile {
            ucands.entry(*u).or_default().push(*bytes);
        }
        for p in &self.pending {
            if let Pending::CommitWrite { units, .. } = p {
                for u in units {
                    ucands
                        .entry(u.index)
                        .or_default()
                        .push(metadata::encode_unit_words(&self.uuid, u.index, &u.words));
                }
            }
        }
        let mut keys: Vec<_> = ucands.keys().copied().collect();
        keys.sort();
        for u in keys {
            let c = &ucands[&u];
            let k = self.rng.below(c.len() as u64 + 1) as usize;
            if k > 0 {
                md[metadata::unit_offset(u as u64) as usize..][..UNIT_SIZE]
                    .copy_from_slice(&c[k - 1]);
            }
        }
        // After the crash a block may read as its durable value or any write since.
        let allowed: Vec<Vec<Val>> = (0..self.dest.len())
            .map(|b| {
                let mut a = self.stable[b].clone();
                for e in &self.since[b] {
                    if !a.contains(&e.val) {
                        a.push(e.val);
                    }
                }
                a
            })
            .collect();
        Sim::assemble(
            self.geo,
            cfg,
            self.stripes,
            self.md_block_units,
            seed,
            self.uuid,
            self.source.clone(),
            dest,
            md,
            allowed,
        )
    }

    /// Let every router start `n` read-triggered copies now (and per
    /// `background` pump from now on).
    pub fn set_read_budget(&mut self, n: u64) {
        self.read_budget = n;
        for r in &mut self.routers {
            r.set_read_copy_budget(n);
        }
    }

    /// Pending items, for targeted tests.
    pub fn pending_kinds(&self) -> Vec<&'static str> {
        self.pending
            .iter()
            .map(|p| match p {
                Pending::User { cmd, .. } => match cmd {
                    Command::ReadSource { .. } => "read_source",
                    Command::ReadDest { .. } => "read_dest",
                    Command::WriteDest { .. } => "write_dest",
                    Command::WriteZeroesDest { .. } => "write_zeroes_dest",
                    Command::DiscardDest { .. } => "discard_dest",
                    _ => "other",
                },
                Pending::Copy { .. } => "copy",
                Pending::ReadCopy(_) => "read_copy",
                Pending::CommitDestFlush { .. } => "commit_dest_flush",
                Pending::CommitWrite { .. } => "commit_write",
                Pending::CommitMdFlush { .. } => "commit_md_flush",
            })
            .collect()
    }

    /// Index of the first pending item of `kind`.
    pub fn find(&self, kind: &str) -> Option<usize> {
        self.pending_kinds().iter().position(|k| *k == kind)
    }

    /// Complete the first pending item of `kind`.
    pub fn complete_kind(&mut self, kind: &str, ok: bool) {
        let i = self
            .find(kind)
            .unwrap_or_else(|| panic!("no pending {kind}: {:?}", self.pending_kinds()));
        self.complete(i, ok);
        self.check();
    }

    /// Submit a request (no FUA) and complete everything in flight.
    /// Returns its id.
    pub fn io_done(&mut self, kind: IoKind, offset: u64, len: u64) -> ReqId {
        let id = self.try_submit(kind, offset, len, false).unwrap();
        self.drain();
        id
    }

    /// Complete everything in flight; request `id` succeeded.
    pub fn drain_ok(&mut self, id: ReqId) {
        self.drain();
        assert_eq!(self.status_of(id), Some(Status::Success));
    }

    pub fn status_of(&self, id: ReqId) -> Option<Status> {
        self.completions
            .iter()
            .find(|(r, _)| *r == id)
            .map(|(_, s)| *s)
    }

    /// Metadata writes issued so far.
    pub fn md_writes(&self) -> u64 {
        self.md_seq
    }

    pub fn md_durable(&self) -> &[u8] {
        &self.md_durable
    }
}
