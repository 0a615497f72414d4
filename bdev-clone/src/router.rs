//! The clone's I/O routing state machine: owner-side, single-threaded, pure.
//! It decides; an executor does the I/O.
//!
//! # Driving it
//!
//! Inputs are user requests ([`Router::submit`]) and completion events
//! ([`Router::op_done`], [`Router::copy_done`], [`Router::commit_done`]),
//! plus [`Router::next_background`] (hydrator poller). Each call appends
//! [`Command`]s to a caller-owned `Vec` (reuse it: no allocation in steady
//! state); the executor performs them and reports each back exactly once:
//!
//! | command | executor does | then calls |
//! |---|---|---|
//! | `ReadSource` / `ReadDest` | read `blocks` of source / destination into the request's buffer at `(blocks.start - offset) * block_size` | `op_done(op, ok)` |
//! | `WriteDest` | write that part of the buffer to the destination (`fua` passed on) | `op_done` |
//! | `WriteZeroesDest` / `DiscardDest` | write zeroes / unmap `blocks` on the destination | `op_done` |
//! | `StartCopy` | read `blocks` from the source, write them to the destination at the same offsets (zero detection may write zeroes instead) | `copy_done(copy, ok)` |
//! | `ReadCopy` | read `blocks` (whole regions) from the source once; put its `read` part into the request's buffer at `(read.start - offset) * block_size` and report the op at once (the user does not wait for the destination); then, if the read succeeded, write `blocks` to the destination (zeroes may become write_zeroes) | `op_done(op, ok)` for the read, then `copy_done(copy, ok)` (false at once if the read failed) |
//! | `Commit` | ask the clone's [`crate::commit::Committer`] for a round that starts after now (it snapshots the dirty units, 1. flushes the destination, 2. writes the units, 3. flushes the metadata bdev, in that order) | `commit_done(commit, ok)` when that round ended (false if any step failed) |
//! | `Complete` | complete the user I/O with `status` | — |
//!
//! Commands may be issued in any order and concurrently (a round's three
//! steps are the committer's, strictly in order). A completion may be reported from inside the
//! executor's command loop or later; the router never calls out.
//!
//! # What it decides
//!
//! * Reads: hydrated regions from the destination, cold regions from the
//!   source (even with a copy in flight: the source never changes).
//! * Copy-on-read (optional), read-triggered copies: a run of cold idle
//!   regions a read covers (at most [`READ_COPY_MAX_BYTES`] per copy, so
//!   none with larger regions) is copied by the read itself, one
//!   `ReadCopy` per run: one source read answers the user and fills the
//!   destination, and the regions are hydrated when the destination write
//!   succeeds. Each takes one unit of the budget the executor sets each
//!   pump ([`Router::set_read_copy_budget`]: the room the link has). The
//!   regions are busy while it runs, exactly as for any copy: writes,
//!   write-zeroes and discards to them wait and are re-routed after it, so
//!   source data never lands over a write acknowledged meanwhile, and the
//!   read itself is answered from the source data whatever waits behind
//!   it. A read of a region already busy (a copy or overwrite in flight)
//!   reads the source and does not wait; the rest of the run, once the
//!   budget is spent, too; the latter are queued for the hydrator
//!   ahead of its cursor, and with background hydration off (or threshold
//!   0) copy-on-read still copies them, one region per copy, and nothing
//!   else.
//! * Background picks: copy-on-read regions first, then the newest region
//!   right after a recent cold read (a bounded queue of
//!   64, this router's regions only): users read what they need first.
//!   Every fourth pick in a row comes from the cursor, so the cursor always
//!   moves on while reads keep adding hints.
//! * Writes and write-zeroes: hydrated regions go straight to the
//!   destination. Whole cold regions go to the destination with no copy and
//!   are marked hydrated when that write succeeds. A partially covered cold
//!   region is copied first (at once, ahead of background work, not counted
//!   against the threshold), and the write waits for the copy.
//! * Per-region serialisation of the clone's own writers: a cold region
//!   with a copy or a whole-region overwrite in flight is *busy*; writes,
//!   write-zeroes and discards to it wait behind it (FIFO) and are
//!   re-routed when it finishes. Hydrated regions take user I/O without a
//!   lock: the clone has no writer of its own there.
//! * Discard: only whole regions (the device's partial tail region counts
//!   when the range reaches the device end); cold ones are marked hydrated
//!   without a copy; with passdown the whole-region range goes on to the
//!   destination. A busy region's discard waits for the copy or overwrite,
//!   so a late copy can never land on top of a later write.
//! * Flush: not the router's. The executor sends user flushes to the
//!   clone's committer (a round started after the flush arrived: the
//!   destination flush, then the units, if any changed); `submit` refuses
//!   one as `Invalid`. FUA writes complete only once a commit covering
//!   every region marked before they finished is durable.
//! * Commits are one per clone, made by its committer for every router
//!   (regions are striped over routers, one per reactor, sharing one map):
//!   a round snapshots the dirty bitmap units when it starts; every bit in
//!   it belongs to data whose destination write has already completed, so
//!   the round's destination flush (issued after) makes it durable before
//!   the bits are written (dm-clone §2 #1, #3). A FUA write that finds no
//!   dirty unit while a round is in flight still waits for the next one:
//!   its bits may sit in that round's snapshot.
//! * Metadata modes as dm-clone §1.9: a failed commit switches to read-only
//!   (reads work; writes to hydrated regions work; writes to cold regions,
//!   and FUA writes that would need a commit, fail; discards of cold
//!   ranges are ignored; no hydration). `Failed` fails everything.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::commit::CommitRounds;
use crate::geometry::Geometry;
use crate::region_map::RegionMap;

/// A user request's id, chosen by the executor, unique among requests in
/// flight.
pub type ReqId = u64;
/// One I/O the router asked for on behalf of a request.
pub type OpId = u64;
/// One hydration copy.
pub type CopyId = u64;
/// One metadata commit.
pub type CommitId = u64;

/// Most regions remembered for copy-on-read.
const COR_QUEUE_MAX: usize = 4096;

/// Most regions remembered as following recent cold reads (newest kept).
const NEAR_QUEUE_MAX: usize = 64;

/// Of every `HINT_RUN + 1` background copies at most `HINT_RUN` start at a
/// hint (copy-on-read or near-read regions); the next comes from the
/// cursor, which so always moves on.
const HINT_RUN: u32 = 3;

/// Largest read-triggered copy: one buffer holds it.
pub const READ_COPY_MAX_BYTES: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
}

/// A user request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub id: ReqId,
    pub kind: IoKind,
    pub offset_blocks: u64,
    pub num_blocks: u64,
    /// Force unit access (writes only).
    pub fua: bool,
}

impl Request {
    pub fn new(id: ReqId, kind: IoKind, offset_blocks: u64, num_blocks: u64) -> Request {
        Request {
            id,
            kind,
            offset_blocks,
            num_blocks,
            fua: false,
        }
    }
    pub fn read(id: ReqId, offset_blocks: u64, num_blocks: u64) -> Request {
        Request::new(id, IoKind::Read, offset_blocks, num_blocks)
    }
    pub fn write(id: ReqId, offset_blocks: u64, num_blocks: u64) -> Request {
        Request::new(id, IoKind::Write, offset_blocks, num_blocks)
    }
    pub fn write_fua(id: ReqId, offset_blocks: u64, num_blocks: u64) -> Request {
        Request {
            fua: true,
            ..Request::write(id, offset_blocks, num_blocks)
        }
    }
    pub fn write_zeroes(id: ReqId, offset_blocks: u64, num_blocks: u64) -> Request {
        Request::new(id, IoKind::WriteZeroes, offset_blocks, num_blocks)
    }
    pub fn discard(id: ReqId, offset_blocks: u64, num_blocks: u64) -> Request {
        Request::new(id, IoKind::Discard, offset_blocks, num_blocks)
    }
    fn blocks(&self) -> Range<u64> {
        self.offset_blocks..self.offset_blocks + self.num_blocks
    }
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoError {
    /// Out of the device, or empty.
    Invalid,
    /// A source read failed.
    SourceIo,
    /// A destination I/O failed.
    DestIo,
    /// The region the write needed could not be hydrated.
    HydrationFailed,
    /// Metadata is read-only: the request would need a hydration or a commit.
    ReadOnly,
    /// Metadata has failed: every request fails.
    MetadataFailed,
    /// The commit this FUA write waited for failed.
    CommitFailed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Success,
    Error(IoError),
}

/// Striped ownership: regions are dealt to `owners` routers (one per
/// reactor) in runs of `regions` (owner of region r = (r / regions) mod
/// owners). The executor sends each part of a request to its owner's
/// router ([`Router::set_stripe`] tells a router which stripes are its).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stripes {
    pub regions: u64,
    pub owners: u64,
}

impl Stripes {
    /// The owner index of region `r`.
    pub fn owner(&self, r: u64) -> usize {
        ((r / self.regions) % self.owners) as usize
    }

    /// The parts of blocks `offset..offset + num` (whose regions are
    /// `regions`, not empty), one per stripe it touches: (owner index,
    /// offset, num). Within one stripe, or with one owner, one part.
    pub fn split(
        &self,
        geo: &Geometry,
        regions: Range<u64>,
        offset: u64,
        num: u64,
    ) -> Vec<(usize, u64, u64)> {
        let stripe = self.regions;
        if self.owners == 1 || regions.start / stripe == (regions.end - 1) / stripe {
            return vec![(self.owner(regions.start), offset, num)];
        }
        let mut parts = Vec::new();
        let mut r = regions.start;
        while r < regions.end {
            let end_r = ((r / stripe + 1) * stripe).min(regions.end);
            let b = geo.region_range_blocks(r..end_r);
            let (s0, e0) = (b.start.max(offset), b.end.min(offset + num));
            parts.push((self.owner(r), s0, e0 - s0));
            r = end_r;
        }
        parts
    }
}

/// What the executor is asked to do. `blocks` are clone block offsets
/// (identical on source and destination).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    ReadSource {
        req: ReqId,
        op: OpId,
        blocks: Range<u64>,
    },
    ReadDest {
        req: ReqId,
        op: OpId,
        blocks: Range<u64>,
    },
    WriteDest {
        req: ReqId,
        op: OpId,
        blocks: Range<u64>,
        fua: bool,
    },
    WriteZeroesDest {
        req: ReqId,
        op: OpId,
        blocks: Range<u64>,
    },
    DiscardDest {
        req: ReqId,
        op: OpId,
        blocks: Range<u64>,
    },
    /// A read-triggered copy: read whole cold `regions` (`blocks`) from
    /// the source once; answer the request's part `read` from that data
    /// (`op_done(op)` as soon as the source data is in, before the
    /// destination write), then write `blocks` to the destination
    /// (`copy_done(copy)`).
    ReadCopy {
        req: ReqId,
        op: OpId,
        read: Range<u64>,
        copy: CopyId,
        regions: Range<u64>,
        blocks: Range<u64>,
    },
    /// Copy whole regions source -> destination.
    StartCopy {
        copy: CopyId,
        regions: Range<u64>,
        blocks: Range<u64>,
    },
    /// A commit round that starts after now (the committer's; see the
    /// module documentation).
    Commit {
        commit: CommitId,
    },
    Complete {
        req: ReqId,
        status: Status,
    },
}

/// Metadata mode (dm-clone §1.9).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetadataMode {
    ReadWrite,
    ReadOnly,
    Failed,
}

impl MetadataMode {
    /// Modes only get worse, in code order: a clone keeps its mode as this
    /// code in an atomic and raises it with `fetch_max`.
    pub fn code(self) -> u8 {
        match self {
            MetadataMode::ReadWrite => 0,
            MetadataMode::ReadOnly => 1,
            MetadataMode::Failed => 2,
        }
    }

    pub fn from_code(code: u8) -> MetadataMode {
        match code {
            0 => MetadataMode::ReadWrite,
            1 => MetadataMode::ReadOnly,
            _ => MetadataMode::Failed,
        }
    }

    /// The status object's `metadata.mode`.
    pub fn short_name(self) -> &'static str {
        match self {
            MetadataMode::ReadWrite => "rw",
            MetadataMode::ReadOnly => "ro",
            MetadataMode::Failed => "fail",
        }
    }
}

/// Tunables; all may change at run time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Most regions being copied at once for background hydration (copies
    /// started for user writes count too but are not held back). 0 stops
    /// background hydration.
    pub hydration_threshold: u64,
    /// Most contiguous regions per background copy.
    pub hydration_batch_size: u64,
    pub hydration_enabled: bool,
    /// Pass whole-region discards on to the destination.
    pub discard_passdown: bool,
    /// Hydrate the cold regions that are read: by the read itself within
    /// the read-copy budget, else queued ahead of the cursor (also with
    /// background hydration off).
    pub copy_on_read: bool,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            hydration_threshold: 1,
            hydration_batch_size: 1,
            hydration_enabled: true,
            discard_passdown: true,
            copy_on_read: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    #[error("request id {0} is already in flight")]
    DuplicateRequest(ReqId),
    #[error("no {what} {id} is in flight")]
    Unknown { what: &'static str, id: u64 },
    #[error("the region map has {map} regions, the geometry {geometry}")]
    MapMismatch { map: u64, geometry: u64 },
}

/// Counters for status and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RouterStats {
    pub requests_in_flight: usize,
    pub ops_in_flight: usize,
    pub copies_in_flight: usize,
    /// Regions covered by copies in flight (background and user).
    pub regions_copying: u64,
    /// Busy cold-region intervals (copies and whole-region overwrites).
    pub busy_intervals: usize,
    pub commit_in_flight: bool,
    pub commits: u64,
    pub copy_failures: u64,
    /// Read-triggered copies in flight (counted in `copies_in_flight`).
    pub read_copies_in_flight: usize,
    /// Read-triggered copies started since the router was made.
    pub read_copies: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Source,
    Dest,
}

struct OpState {
    req: ReqId,
    target: Target,
    /// Whole cold regions this write hydrates on success (also the busy
    /// interval it holds).
    hydrates: Option<Range<u64>>,
}

/// A run of cold regions with one writer of the clone's own in flight.
struct Busy {
    end: u64,
    waiters: Vec<Part>,
}

/// Part of a request waiting for a busy interval.
struct Part {
    req: ReqId,
    blocks: Range<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Doing its I/O.
    Data,
    /// Waiting for a commit (FUA write).
    Durability,
}

struct ReqState {
    kind: IoKind,
    fua: bool,
    /// Ops, waiting parts and commit waits outstanding (+1 while routing).
    outstanding: u32,
    error: Option<IoError>,
    phase: Phase,
}

struct InFlightCommit {
    id: CommitId,
}

/// See the module documentation.
pub struct Router {
    geo: Geometry,
    map: Arc<RegionMap>,
    cfg: RouterConfig,
    mode: MetadataMode,
    next_op: OpId,
    next_copy: CopyId,
    next_commit: CommitId,
    reqs: HashMap<ReqId, ReqState>,
    ops: HashMap<OpId, OpState>,
    /// Busy intervals by first region; never overlapping; cold regions only.
    busy: BTreeMap<u64, Busy>,
    /// Copies in flight: (first region, read-triggered).
    copies: HashMap<CopyId, (u64, bool)>,
    regions_copying: u64,
    cursor: u64,
    cor_queue: VecDeque<u64>,
    /// Regions right after recent cold reads, newest last.
    near_queue: VecDeque<u64>,
    /// Background copies started at a hint since the cursor's last one.
    hint_streak: u32,
    /// Read-triggered copies this router may still start (the executor
    /// sets it each pump).
    read_copy_budget: u64,
    read_copies_in_flight: usize,
    read_copies: u64,
    /// Regions of read-triggered copies started since the executor last
    /// asked ([`Router::take_read_copy_regions`]).
    read_copy_regions: u64,
    commit: Option<InFlightCommit>,
    /// A commit is wanted as soon as the one in flight completes.
    commit_again: bool,
    /// Requests waiting for commit `.1` to complete.
    commit_waiters: Vec<(ReqId, CommitId)>,
    commits: u64,
    copy_failures: u64,
    /// Striped ownership: (regions per stripe, this owner's index, owners).
    /// Background copies only pick regions of this owner's stripes.
    stripe: Option<(u64, u64, u64)>,
    /// The clone's commit rounds in flight (its committer counts them).
    rounds: CommitRounds,
}

impl Router {
    /// A router over `map` (fresh, or loaded from metadata) whose commits
    /// are made by the committer counting `rounds`.
    pub fn new(
        geo: Geometry,
        map: Arc<RegionMap>,
        cfg: RouterConfig,
        mode: MetadataMode,
        rounds: CommitRounds,
    ) -> Result<Router, RouterError> {
        if map.num_regions() != geo.num_regions() {
            return Err(RouterError::MapMismatch {
                map: map.num_regions(),
                geometry: geo.num_regions(),
            });
        }
        Ok(Router {
            geo,
            map,
            cfg,
            mode,
            next_op: 1,
            next_copy: 1,
            next_commit: 1,
            reqs: HashMap::new(),
            ops: HashMap::new(),
            busy: BTreeMap::new(),
            copies: HashMap::new(),
            regions_copying: 0,
            cursor: 0,
            cor_queue: VecDeque::new(),
            near_queue: VecDeque::new(),
            hint_streak: 0,
            read_copy_budget: 0,
            read_copies_in_flight: 0,
            read_copies: 0,
            read_copy_regions: 0,
            commit: None,
            commit_again: false,
            commit_waiters: Vec::new(),
            commits: 0,
            copy_failures: 0,
            stripe: None,
            rounds,
        })
    }

    /// Own only the regions of stripes `index`, `index + count`, ... of
    /// `stripe_regions` regions each (background hydration picks only
    /// those; the executor routes only their I/O here).
    pub fn set_stripe(&mut self, stripe_regions: u64, index: u64, count: u64) {
        if count > 1 && stripe_regions > 0 {
            self.stripe = Some((stripe_regions, index % count, count));
            self.cursor = (index % count) * stripe_regions;
        } else {
            self.stripe = None;
        }
    }

    /// Whether bits may still be on their way to disk elsewhere.
    fn commit_pending_elsewhere(&self) -> bool {
        self.rounds.in_flight()
    }

    fn owned(&self, r: u64) -> bool {
        match self.stripe {
            None => true,
            Some((len, idx, cnt)) => (r / len) % cnt == idx,
        }
    }

    /// First region of the next stripe this router owns after region `r`
    /// (may be past the end).
    fn next_owned_start(&self, r: u64) -> u64 {
        match self.stripe {
            None => r + 1,
            Some((len, idx, cnt)) => {
                let ns = r / len + 1;
                (ns + (idx + cnt - ns % cnt) % cnt) * len
            }
        }
    }

    /// End of the stripe holding `r` (the device end without striping).
    fn stripe_end(&self, r: u64) -> u64 {
        match self.stripe {
            None => u64::MAX,
            Some((len, _, _)) => (r / len + 1) * len,
        }
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }
    /// The shared map (hand clones to other reactors for lock-free reads).
    pub fn map(&self) -> &Arc<RegionMap> {
        &self.map
    }
    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }
    /// Change tunables (threshold, batch, enable, passdown, copy-on-read).
    pub fn config_mut(&mut self) -> &mut RouterConfig {
        &mut self.cfg
    }
    pub fn mode(&self) -> MetadataMode {
        self.mode
    }
    /// The metadata device failed (e.g. unreadable): every request fails
    /// from now on. There is no way back short of a new router.
    pub fn set_failed(&mut self) {
        self.mode = MetadataMode::Failed;
    }
    /// The metadata went read-only elsewhere (a commit round failed while
    /// this router had nothing waiting for it): record no new hydration from now on.
    pub fn set_read_only(&mut self) {
        if self.mode == MetadataMode::ReadWrite {
            self.mode = MetadataMode::ReadOnly;
        }
    }
    /// How many read-triggered copies may start from now until the next
    /// call (the executor sets it each pump from the room the link has;
    /// each copy started takes one). 0: cold reads only read the source.
    pub fn set_read_copy_budget(&mut self, n: u64) {
        self.read_copy_budget = n;
    }

    /// Regions covered by read-triggered copies started since the last
    /// call (the executor charges them to the hydration rate limit).
    pub fn take_read_copy_regions(&mut self) -> u64 {
        std::mem::take(&mut self.read_copy_regions)
    }

    /// Background hydration cursor (next region the hydrator looks at).
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    pub fn stats(&self) -> RouterStats {
        RouterStats {
            requests_in_flight: self.reqs.len(),
            ops_in_flight: self.ops.len(),
            copies_in_flight: self.copies.len(),
            regions_copying: self.regions_copying,
            busy_intervals: self.busy.len(),
            commit_in_flight: self.commit.is_some(),
            commits: self.commits,
            copy_failures: self.copy_failures,
            read_copies_in_flight: self.read_copies_in_flight,
            read_copies: self.read_copies,
        }
    }

    /// Every region hydrated and that state committed: the clone could
    /// switch to pass-through and release the source.
    pub fn is_complete_and_durable(&self) -> bool {
        self.map.is_complete()
            && !self.map.has_dirty()
            && self.commit.is_none()
            && !self.commit_pending_elsewhere()
    }

    /// Nothing in flight at all (for suspend / delete).
    pub fn is_idle(&self) -> bool {
        self.reqs.is_empty()
            && self.ops.is_empty()
            && self.copies.is_empty()
            && self.commit.is_none()
    }

    // ----- user requests -------------------------------------------------

    /// Route a user request. Invalid ranges, and flushes (the committer's:
    /// see the module documentation), complete at once with
    /// `IoError::Invalid`; a duplicate id is refused.
    pub fn submit(&mut self, req: Request, out: &mut Vec<Command>) -> Result<(), RouterError> {
        if self.reqs.contains_key(&req.id) {
            return Err(RouterError::DuplicateRequest(req.id));
        }
        let status = if req.kind == IoKind::Flush {
            Some(IoError::Invalid)
        } else if self.mode == MetadataMode::Failed {
            Some(IoError::MetadataFailed)
        } else if req.num_blocks == 0 || !self.geo.contains(req.offset_blocks, req.num_blocks) {
            Some(IoError::Invalid)
        } else {
            None
        };
        if let Some(e) = status {
            out.push(Command::Complete {
                req: req.id,
                status: Status::Error(e),
            });
            return Ok(());
        }
        self.reqs.insert(
            req.id,
            ReqState {
                kind: req.kind,
                fua: req.fua && req.kind == IoKind::Write,
                outstanding: 1,
                error: None,
                phase: Phase::Data,
            },
        );
        self.route(req.id, req.blocks(), None, out);
        self.put(req.id, out);
        Ok(())
    }

    fn route(
        &mut self,
        id: ReqId,
        blocks: Range<u64>,
        failed: Option<&Range<u64>>,
        out: &mut Vec<Command>,
    ) {
        let Some(st) = self.reqs.get(&id) else {
            return;
        };
        let kind = st.kind;
        if self.mode == MetadataMode::Failed {
            self.fail(id, IoError::MetadataFailed);
            return;
        }
        match kind {
            IoKind::Read => self.route_read(id, blocks, out),
            IoKind::Write | IoKind::WriteZeroes => self.route_write(id, blocks, failed, out),
            IoKind::Discard => self.route_discard(id, blocks, out),
            // `submit` refuses flushes; none is ever routed.
            IoKind::Flush => self.fail(id, IoError::Invalid),
        }
    }

    fn route_read(&mut self, id: ReqId, blocks: Range<u64>, out: &mut Vec<Command>) {
        let regs = self.region_span(&blocks);
        let mut r = regs.start;
        while r < regs.end {
            let max = regs.end - r;
            let hydrated = self.map.is_hydrated(r);
            let n = if hydrated {
                self.map.run_of_hydrated(r, max)
            } else {
                self.map.run_of_unhydrated(r, max)
            };
            if hydrated {
                let part = intersect(&blocks, &self.geo.region_range_blocks(r..r + n));
                let op = self.new_op(id, Target::Dest, None);
                out.push(Command::ReadDest {
                    req: id,
                    op,
                    blocks: part,
                });
            } else {
                self.read_cold(id, &blocks, r..r + n, out);
            }
            r += n;
        }
        if !self.map.is_hydrated(regs.end - 1) {
            self.hint_after_read(regs.end);
        }
    }

    /// Whether cold reads may start read-triggered copies now.
    fn may_read_copy(&self) -> bool {
        self.cfg.copy_on_read
            && self.mode == MetadataMode::ReadWrite
            && self.read_copy_budget > 0
            && self.geo.region_size() <= READ_COPY_MAX_BYTES
    }

    /// The part of read `id` in the cold regions `cold`: idle runs are
    /// copied by the read (one source read answers it and fills the
    /// destination) while the budget lasts; regions with a copy or
    /// overwrite in flight read the source (it never changes: no need to
    /// wait); once the budget is spent the rest reads the source too and,
    /// with copy-on-read, is queued for the hydrator.
    fn read_cold(
        &mut self,
        id: ReqId,
        blocks: &Range<u64>,
        cold: Range<u64>,
        out: &mut Vec<Command>,
    ) {
        let mut r = cold.start;
        while r < cold.end {
            if let Some((_, end)) = self.busy_at(r) {
                // Being copied or overwritten: the source, without waiting.
                let end = end.min(cold.end);
                self.read_source(id, blocks, r..end, out);
                r = end;
                continue;
            }
            if self.may_read_copy() {
                let per_copy = (READ_COPY_MAX_BYTES / self.geo.region_size()).max(1);
                let end = self.next_busy_start(r).min(cold.end).min(r + per_copy);
                let read = intersect(blocks, &self.geo.region_range_blocks(r..end));
                self.read_copy(id, read, r..end, out);
                r = end;
                continue;
            }
            // Over budget: one source read for the rest of the run.
            self.read_source(id, blocks, r..cold.end, out);
            if self.cfg.copy_on_read && self.mode == MetadataMode::ReadWrite {
                for c in r..cold.end {
                    if self.cor_queue.len() >= COR_QUEUE_MAX {
                        break;
                    }
                    if self.busy_at(c).is_none() {
                        self.cor_queue.push_back(c);
                    }
                }
            }
            break;
        }
    }

    /// Read the part of `blocks` in cold `regions` from the source.
    fn read_source(
        &mut self,
        id: ReqId,
        blocks: &Range<u64>,
        regions: Range<u64>,
        out: &mut Vec<Command>,
    ) {
        let part = intersect(blocks, &self.geo.region_range_blocks(regions));
        let op = self.new_op(id, Target::Source, None);
        out.push(Command::ReadSource {
            req: id,
            op,
            blocks: part,
        });
    }

    /// Start a read-triggered copy of cold idle `regions` answering the
    /// part `read` of request `id`; the regions are busy until it ends.
    fn read_copy(
        &mut self,
        id: ReqId,
        read: Range<u64>,
        regions: Range<u64>,
        out: &mut Vec<Command>,
    ) {
        self.read_copy_budget -= 1;
        self.read_copies += 1;
        self.read_copies_in_flight += 1;
        self.read_copy_regions += regions.end - regions.start;
        let op = self.new_op(id, Target::Source, None);
        let copy = self.begin_copy(regions.clone(), true);
        out.push(Command::ReadCopy {
            req: id,
            op,
            read,
            copy,
            blocks: self.geo.region_range_blocks(regions.clone()),
            regions,
        });
    }

    /// Remember region `r`, right after a cold read, for the hydrator.
    fn hint_after_read(&mut self, r: u64) {
        if r >= self.geo.num_regions() || !self.owned(r) || self.map.is_hydrated(r) {
            return;
        }
        if self.near_queue.back() == Some(&r) {
            return;
        }
        if self.near_queue.len() >= NEAR_QUEUE_MAX {
            self.near_queue.pop_front();
        }
        self.near_queue.push_back(r);
    }

    fn route_write(
        &mut self,
        id: ReqId,
        blocks: Range<u64>,
        failed: Option<&Range<u64>>,
        out: &mut Vec<Command>,
    ) {
        let regs = self.region_span(&blocks);
        if self.mode != MetadataMode::ReadWrite {
            // No hydration can be recorded: only hydrated regions take writes.
            if self.map.is_range_hydrated(regs) {
                self.write_op(id, blocks, None, out);
            } else {
                self.fail(id, IoError::ReadOnly);
            }
            return;
        }
        let mut r = regs.start;
        while r < regs.end {
            if self.map.is_hydrated(r) {
                let n = self.map.run_of_hydrated(r, regs.end - r);
                let part = intersect(&blocks, &self.geo.region_range_blocks(r..r + n));
                self.write_op(id, part, None, out);
                r += n;
                continue;
            }
            if let Some((start, end)) = self.busy_at(r) {
                let end = end.min(regs.end);
                let part = intersect(&blocks, &self.geo.region_range_blocks(r..end));
                self.wait_on(start, id, part);
                r = end;
                continue;
            }
            // A run of cold, idle regions: partial ends are hydrated first,
            // whole ones are overwritten without a copy.
            let cap = self.next_busy_start(r).min(regs.end) - r;
            let n = self.map.run_of_unhydrated(r, cap).max(1);
            let (mut w0, mut w1) = (r, r + n);
            if !self.geo.covers_region(&blocks, w0) {
                self.hydrate_first(id, w0, &blocks, failed, out);
                w0 += 1;
            }
            if w1 > w0 && !self.geo.covers_region(&blocks, w1 - 1) {
                self.hydrate_first(id, w1 - 1, &blocks, failed, out);
                w1 -= 1;
            }
            if w1 > w0 {
                let part = self.geo.region_range_blocks(w0..w1);
                self.write_op(id, part, Some(w0..w1), out);
            }
            r += n;
        }
    }

    /// Start the copy of cold idle region `p` for a partial write and queue
    /// the write's part behind it.
    fn hydrate_first(
        &mut self,
        id: ReqId,
        p: u64,
        blocks: &Range<u64>,
        failed: Option<&Range<u64>>,
        out: &mut Vec<Command>,
    ) {
        if failed.is_some_and(|f| f.contains(&p)) {
            // The copy this part waited for failed: fail it (dm-clone does),
            // rather than retrying for ever on a broken source.
            self.fail(id, IoError::HydrationFailed);
            return;
        }
        self.start_copy(p..p + 1, out);
        let part = intersect(blocks, &self.geo.region_range_blocks(p..p + 1));
        self.wait_on(p, id, part);
    }

    fn write_op(
        &mut self,
        id: ReqId,
        blocks: Range<u64>,
        hydrates: Option<Range<u64>>,
        out: &mut Vec<Command>,
    ) {
        let (kind, fua) = {
            let st = &self.reqs[&id];
            (st.kind, st.fua)
        };
        let op = self.new_op(id, Target::Dest, hydrates.clone());
        if let Some(h) = hydrates {
            self.busy.insert(
                h.start,
                Busy {
                    end: h.end,
                    waiters: Vec::new(),
                },
            );
        }
        out.push(if kind == IoKind::WriteZeroes {
            Command::WriteZeroesDest {
                req: id,
                op,
                blocks,
            }
        } else {
            Command::WriteDest {
                req: id,
                op,
                blocks,
                fua,
            }
        });
    }

    fn route_discard(&mut self, id: ReqId, blocks: Range<u64>, out: &mut Vec<Command>) {
        let whole = self
            .geo
            .whole_regions_in(blocks.start, blocks.end - blocks.start)
            .unwrap_or(0..0);
        if whole.is_empty() {
            return; // only partial regions: nothing to do (dm-clone §2 #5)
        }
        if self.mode != MetadataMode::ReadWrite {
            // Cold ranges are ignored (cannot be recorded); a fully
            // hydrated range still passes down.
            if self.cfg.discard_passdown && self.map.is_range_hydrated(whole.clone()) {
                self.discard_op(id, whole, out);
            }
            return;
        }
        let mut r = whole.start;
        while r < whole.end {
            if let Some((start, end)) = self.busy_at(r) {
                // A copy or overwrite is in flight: wait for it, never let
                // it land after this discard and a later write.
                let end = end.min(whole.end);
                let part = self.geo.region_range_blocks(r..end);
                self.wait_on(start, id, part);
                r = end;
                continue;
            }
            let end = self.next_busy_start(r).min(whole.end);
            self.map.set_range(r..end);
            if self.cfg.discard_passdown {
                self.discard_op(id, r..end, out);
            }
            r = end;
        }
    }

    fn discard_op(&mut self, id: ReqId, regions: Range<u64>, out: &mut Vec<Command>) {
        let op = self.new_op(id, Target::Dest, None);
        out.push(Command::DiscardDest {
            req: id,
            op,
            blocks: self.geo.region_range_blocks(regions),
        });
    }

    // ----- completions ---------------------------------------------------

    /// A `ReadSource`/`ReadDest`/`WriteDest`/`WriteZeroesDest`/
    /// `DiscardDest` finished.
    pub fn op_done(
        &mut self,
        op: OpId,
        ok: bool,
        out: &mut Vec<Command>,
    ) -> Result<(), RouterError> {
        let st = self
            .ops
            .remove(&op)
            .ok_or(RouterError::Unknown { what: "op", id: op })?;
        if !ok {
            self.fail(
                st.req,
                match st.target {
                    Target::Source => IoError::SourceIo,
                    Target::Dest => IoError::DestIo,
                },
            );
        }
        if let Some(h) = st.hydrates {
            let busy = self
                .busy
                .remove(&h.start)
                .expect("overwrite holds its interval");
            if ok {
                match self.mode {
                    MetadataMode::ReadWrite => {
                        self.map.set_range(h);
                    }
                    // The data is on the destination but the region cannot
                    // be recorded: reads would still go to the source.
                    MetadataMode::ReadOnly => self.fail(st.req, IoError::ReadOnly),
                    MetadataMode::Failed => self.fail(st.req, IoError::MetadataFailed),
                }
            }
            self.release(busy.waiters, None, out);
        }
        self.put(st.req, out);
        Ok(())
    }

    /// A `StartCopy` finished.
    pub fn copy_done(
        &mut self,
        copy: CopyId,
        ok: bool,
        out: &mut Vec<Command>,
    ) -> Result<(), RouterError> {
        let (start, read) = self.copies.remove(&copy).ok_or(RouterError::Unknown {
            what: "copy",
            id: copy,
        })?;
        if read {
            self.read_copies_in_flight -= 1;
        }
        let busy = self.busy.remove(&start).expect("copy holds its interval");
        let regions = start..busy.end;
        self.regions_copying -= regions.end - regions.start;
        if !ok {
            self.copy_failures += 1;
            tracing::debug!(?regions, "hydration copy failed; will be retried");
        }
        if ok && self.mode == MetadataMode::ReadWrite {
            self.map.set_range(regions);
            self.release(busy.waiters, None, out);
        } else {
            // Not recorded: waiting partial writes fail, others re-route.
            self.release(busy.waiters, Some(&regions), out);
        }
        Ok(())
    }

    /// A `Commit` finished (all three steps), or one of its steps failed.
    pub fn commit_done(
        &mut self,
        commit: CommitId,
        ok: bool,
        out: &mut Vec<Command>,
    ) -> Result<(), RouterError> {
        match &self.commit {
            Some(c) if c.id == commit => {}
            _ => {
                return Err(RouterError::Unknown {
                    what: "commit",
                    id: commit,
                })
            }
        }
        self.commit = None;
        if ok {
            self.commits += 1;
            if self.commit_again && self.mode == MetadataMode::ReadWrite {
                self.commit_again = false;
                self.start_commit(out);
            }
            let mut ready = Vec::new();
            self.commit_waiters.retain(|&(req, need)| {
                if need <= commit {
                    ready.push(req);
                    false
                } else {
                    true
                }
            });
            for req in ready {
                self.put(req, out);
            }
            if self.commit.is_none() && !self.commit_waiters.is_empty() {
                // They need a later commit that can no longer start (the
                // metadata failed while this one was in flight).
                let e = match self.mode {
                    MetadataMode::Failed => IoError::MetadataFailed,
                    _ => IoError::ReadOnly,
                };
                for (req, _) in std::mem::take(&mut self.commit_waiters) {
                    self.fail(req, e);
                    self.put(req, out);
                }
            }
        } else {
            // Uncommitted bits stay in core (their data is on the
            // destination, reads are right) and dirty (the committer put
            // them back), so every later FUA write (and flush, at the
            // committer) that needs them fails: they cannot be made durable.
            if self.mode == MetadataMode::ReadWrite {
                tracing::error!(
                    commit,
                    "metadata commit failed: switching to read-only mode"
                );
                self.mode = MetadataMode::ReadOnly;
            }
            self.commit_again = false;
            let waiters = std::mem::take(&mut self.commit_waiters);
            for (req, _) in waiters {
                self.fail(req, IoError::CommitFailed);
                self.put(req, out);
            }
        }
        Ok(())
    }

    // ----- background hydration -------------------------------------------

    /// Start background copies: hints first (copy-on-read regions, then
    /// regions after recent cold reads; at most 3 picks in a row), then
    /// cold idle regions from the cursor (wrapping, so failed regions are
    /// retried), batching up to `hydration_batch_size` contiguous regions,
    /// while fewer than `hydration_threshold` regions are being copied
    /// (read-triggered copies count). Returns the number of regions
    /// started.
    pub fn next_background(&mut self, out: &mut Vec<Command>) -> u64 {
        self.next_background_max(out, u64::MAX)
    }

    /// [`Router::next_background`], starting at most `max_copies` copies:
    /// the executor bounds the work of one call and its copy buffers in
    /// flight, whatever the threshold.
    pub fn next_background_max(&mut self, out: &mut Vec<Command>, max_copies: u64) -> u64 {
        if self.mode != MetadataMode::ReadWrite {
            return 0;
        }
        // Background hydration off or paused (threshold 0): with
        // copy-on-read the regions read still get copied, one at a time
        // and one copy in flight at least, and nothing else.
        let cor_only = !self.cfg.hydration_enabled || self.cfg.hydration_threshold == 0;
        if cor_only && !self.cfg.copy_on_read {
            return 0;
        }
        let threshold = self.cfg.hydration_threshold.max(cor_only as u64);
        let batch = if cor_only {
            1
        } else {
            self.cfg.hydration_batch_size.max(1)
        };
        let mut started = 0;
        let mut copies = 0;
        while self.regions_copying < threshold && copies < max_copies {
            let budget = batch.min(threshold - self.regions_copying);
            let picked = if cor_only {
                self.pick_read_region().map(|r| (r, false))
            } else {
                self.pick_candidate()
            };
            let Some((r, from_cursor)) = picked else {
                break;
            };
            let cap = (self.next_busy_start(r) - r)
                .min(budget)
                .min(self.stripe_end(r) - r);
            let n = self.map.run_of_unhydrated(r, cap).max(1);
            self.start_copy(r..r + n, out);
            started += n;
            copies += 1;
            if from_cursor {
                self.cursor = if r + n >= self.geo.num_regions() {
                    0
                } else {
                    r + n
                };
            }
        }
        started
    }

    /// The next region to copy, and whether it came from the cursor: a
    /// hint first (copy-on-read regions, then the newest region following
    /// a cold read), except that every `HINT_RUN + 1`th pick is the
    /// cursor's.
    fn pick_candidate(&mut self) -> Option<(u64, bool)> {
        if self.hint_streak < HINT_RUN {
            if let Some(r) = self.pick_hint() {
                self.hint_streak += 1;
                return Some((r, false));
            }
        }
        let picked = self.pick_from_cursor();
        if picked.is_some() {
            self.hint_streak = 0;
        }
        picked
    }

    /// The next copy-on-read region still cold and idle.
    fn pick_read_region(&mut self) -> Option<u64> {
        while let Some(r) = self.cor_queue.pop_front() {
            if !self.map.is_hydrated(r) && self.busy_at(r).is_none() {
                return Some(r);
            }
        }
        None
    }

    fn pick_hint(&mut self) -> Option<u64> {
        if let Some(r) = self.pick_read_region() {
            return Some(r);
        }
        // Newest first: the reader is there now.
        while let Some(r) = self.near_queue.pop_back() {
            if !self.map.is_hydrated(r) && self.busy_at(r).is_none() {
                return Some(r);
            }
        }
        None
    }

    fn pick_from_cursor(&mut self) -> Option<(u64, bool)> {
        let n = self.geo.num_regions();
        let mut pos = self.cursor.min(n - 1);
        let mut travelled = 0u64;
        loop {
            let r = self.map.next_unhydrated_wrapping(pos)?;
            travelled += (r + n - pos) % n;
            if travelled >= n {
                return None;
            }
            if !self.owned(r) {
                let mut next = self.next_owned_start(r);
                if next >= n {
                    // Wrap to this owner's first stripe.
                    next = match self.stripe {
                        Some((len, idx, _)) => idx * len,
                        None => 0,
                    };
                    if next >= n {
                        return None;
                    }
                }
                travelled += (next + n - r) % n;
                if travelled >= n {
                    return None;
                }
                pos = next;
                continue;
            }
            match self.busy_at(r) {
                None => return Some((r, true)),
                Some((_, end)) => {
                    travelled += end - r;
                    if travelled >= n {
                        return None;
                    }
                    pos = if end >= n { 0 } else { end };
                }
            }
        }
    }

    fn start_copy(&mut self, regions: Range<u64>, out: &mut Vec<Command>) -> CopyId {
        let copy = self.begin_copy(regions.clone(), false);
        out.push(Command::StartCopy {
            copy,
            blocks: self.geo.region_range_blocks(regions.clone()),
            regions,
        });
        copy
    }

    /// A new copy of `regions`: they are busy until `copy_done`.
    fn begin_copy(&mut self, regions: Range<u64>, read: bool) -> CopyId {
        let copy = self.next_copy;
        self.next_copy += 1;
        self.copies.insert(copy, (regions.start, read));
        self.busy.insert(
            regions.start,
            Busy {
                end: regions.end,
                waiters: Vec::new(),
            },
        );
        self.regions_copying += regions.end - regions.start;
        copy
    }

    // ----- commits -------------------------------------------------------------

    /// The id of a commit whose snapshot is taken from now on.
    fn request_commit(&mut self, out: &mut Vec<Command>) -> CommitId {
        match &self.commit {
            None => self.start_commit(out),
            Some(c) => {
                self.commit_again = true;
                c.id + 1
            }
        }
    }

    fn start_commit(&mut self, out: &mut Vec<Command>) -> CommitId {
        debug_assert!(self.commit.is_none());
        let id = self.next_commit;
        self.next_commit += 1;
        self.commit = Some(InFlightCommit { id });
        out.push(Command::Commit { commit: id });
        id
    }

    fn wait_commit(&mut self, id: ReqId, commit: CommitId) {
        if let Some(st) = self.reqs.get_mut(&id) {
            st.outstanding += 1;
            st.phase = Phase::Durability;
            self.commit_waiters.push((id, commit));
        }
    }

    // ----- bookkeeping ---------------------------------------------------------

    fn region_span(&self, blocks: &Range<u64>) -> Range<u64> {
        self.geo
            .regions_covering(blocks.start, blocks.end - blocks.start)
            .unwrap_or(0..0)
    }

    /// The busy interval holding cold region `r`, as (start, end).
    fn busy_at(&self, r: u64) -> Option<(u64, u64)> {
        self.busy
            .range(..=r)
            .next_back()
            .filter(|(_, b)| b.end > r)
            .map(|(s, b)| (*s, b.end))
    }

    /// First busy interval start at or after `from` (`u64::MAX` if none).
    fn next_busy_start(&self, from: u64) -> u64 {
        self.busy
            .range(from..)
            .next()
            .map(|(s, _)| *s)
            .unwrap_or(u64::MAX)
    }

    fn new_op(&mut self, req: ReqId, target: Target, hydrates: Option<Range<u64>>) -> OpId {
        let op = self.next_op;
        self.next_op += 1;
        self.ops.insert(
            op,
            OpState {
                req,
                target,
                hydrates,
            },
        );
        if let Some(st) = self.reqs.get_mut(&req) {
            st.outstanding += 1;
        }
        op
    }

    fn wait_on(&mut self, busy_start: u64, req: ReqId, blocks: Range<u64>) {
        if blocks.is_empty() {
            return;
        }
        if let Some(st) = self.reqs.get_mut(&req) {
            st.outstanding += 1;
        }
        self.busy
            .get_mut(&busy_start)
            .expect("busy interval")
            .waiters
            .push(Part { req, blocks });
    }

    /// Re-route parts that waited for a busy interval, in arrival order.
    fn release(&mut self, waiters: Vec<Part>, failed: Option<&Range<u64>>, out: &mut Vec<Command>) {
        for p in waiters {
            if self.reqs.get(&p.req).is_some_and(|st| st.error.is_none()) {
                self.route(p.req, p.blocks, failed, out);
            }
            self.put(p.req, out);
        }
    }

    fn fail(&mut self, req: ReqId, e: IoError) {
        if let Some(st) = self.reqs.get_mut(&req) {
            st.error.get_or_insert(e);
        }
    }

    /// One outstanding item of `req` is done; finish it when none remain.
    fn put(&mut self, req: ReqId, out: &mut Vec<Command>) {
        let Some(st) = self.reqs.get_mut(&req) else {
            return;
        };
        st.outstanding -= 1;
        if st.outstanding > 0 {
            return;
        }
        if st.error.is_none() && st.phase == Phase::Data && st.fua {
            // FUA: the data is on stable media (the write carried FUA);
            // the regions it relies on must be committed too.
            st.phase = Phase::Durability;
            if self.map.has_dirty() || self.commit_pending_elsewhere() {
                if self.mode != MetadataMode::ReadWrite {
                    self.fail(req, IoError::ReadOnly);
                } else {
                    let c = self.request_commit(out);
                    self.wait_commit(req, c);
                    return;
                }
            } else if let Some(c) = self.commit.as_ref().map(|c| c.id) {
                self.wait_commit(req, c);
                return;
            }
        }
        let st = self.reqs.remove(&req).unwrap();
        out.push(Command::Complete {
            req,
            status: match st.error {
                None => Status::Success,
                Some(e) => Status::Error(e),
            },
        });
    }
}

fn intersect(a: &Range<u64>, b: &Range<u64>) -> Range<u64> {
    let s = a.start.max(b.start);
    let e = a.end.min(b.end);
    s..e.max(s)
}
