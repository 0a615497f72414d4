//! Power cut: the clone over write-cache disks (`bdev::modules::wcache`)
//! whose unflushed writes are dropped or torn at the cut.
//!
//! Each round runs a seeded workload (writes of stamped blocks, FUA writes,
//! write-zeroes, discards, flushes, checked reads) from several tasks while
//! hydration runs, cuts the power of the destination and metadata disks
//! at a random instant, deletes the clone, powers the disks back on,
//! re-creates the clone on the same metadata (resume) and reads every block
//! through it. A block must read as the model allows: the write made
//! durable by an acknowledged flush or FUA, or anything submitted after it
//! (or zeroes after a discard); with nothing durable, the source or any
//! write. Never garbage, never a torn block. Rounds chain: what a block
//! read after recovery is what the next round starts from. The last round
//! hydrates fully and checks the destination image itself.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use bdev::modules::{malloc, wcache};
use bdev::util::{self, run_on_reactor};
use bdev::{IoChannel, IoType};
use bdev_clone::{CloneState, CreateOpts};
use reactor::DmaBuf;

const SOURCE_TAG: u64 = 0xA5A5_0000_0000_0000;

fn scale_small() -> bool {
    std::env::var("CLONE_TGT_TEST_SCALE").as_deref() == Ok("small")
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What one block can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Val {
    Zero,
    /// A stamped version; 0 = the source's.
    Ver(u64),
}

fn word(block: u64, ver: u64) -> u64 {
    SOURCE_TAG ^ (ver << 40) ^ block
}

/// Decode a block read back; `None` = not a whole stamp of any version.
fn decode(block: u64, data: &[u8]) -> Option<Val> {
    let w: Vec<u64> = data
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    if w.iter().any(|&x| x != w[0]) {
        return None;
    }
    if w[0] == 0 {
        return Some(Val::Zero);
    }
    let v = w[0] ^ SOURCE_TAG ^ block;
    if v & ((1 << 40) - 1) != 0 {
        return None;
    }
    Some(Val::Ver(v >> 40))
}

fn stamp(buf: &mut [u8], first_block: u64, bs: usize, ver: u64) {
    for (i, blk) in buf.chunks_exact_mut(bs).enumerate() {
        let w = word(first_block + i as u64, ver).to_le_bytes();
        for c in blk.chunks_exact_mut(8) {
            c.copy_from_slice(&w);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Ev {
    Write(Val),
    Discard,
}

#[derive(Clone, Debug)]
struct Event {
    ev: Ev,
    /// Completion order (global counter), once acknowledged with success.
    done_at: Option<u64>,
    fua: bool,
}

/// Per-block history since the round's baseline.
struct Model {
    /// What each block held (as a set) when the round began.
    base: Vec<Vec<Val>>,
    events: Vec<Vec<Event>>,
    completions: u64,
    /// Largest submit snapshot of an acknowledged flush.
    flushed_upto: Option<u64>,
}

impl Model {
    fn new(base: Vec<Vec<Val>>) -> Model {
        let n = base.len();
        Model {
            base,
            events: vec![Vec::new(); n],
            completions: 0,
            flushed_upto: None,
        }
    }

    /// Values a block may read now (no crash: its owner task is the only
    /// writer and waits for each I/O). `true` = anything stamped for this
    /// block or zeroes (after a discard, contents are undefined, as in
    /// dm-clone: never another block's data, never garbage).
    fn live(&self, b: usize) -> (Vec<Val>, bool) {
        let (mut set, mut any) = (self.base[b].clone(), false);
        for e in &self.events[b] {
            match e.ev {
                Ev::Write(v) if e.done_at.is_some() => (set, any) = (vec![v], false),
                Ev::Write(v) => set.push(v), // failed write: old or new
                Ev::Discard => any = true,
            }
        }
        (set, any)
    }

    /// Values a block may read after a power cut (same encoding).
    fn after_cut(&self, b: usize) -> (Vec<Val>, bool) {
        let ev = &self.events[b];
        let durable = |e: &Event| match (e.done_at, self.flushed_upto) {
            (Some(d), Some(f)) => d <= f || e.fua,
            (Some(_), None) => e.fua,
            (None, _) => false,
        };
        let floor = ev.iter().rposition(durable);
        // The last write at or before the floor is what the floor keeps.
        let wpos = floor.and_then(|f| ev[..=f].iter().rposition(|e| matches!(e.ev, Ev::Write(_))));
        let mut set = match wpos {
            Some(i) => match ev[i].ev {
                Ev::Write(v) => vec![v],
                Ev::Discard => unreachable!(),
            },
            None => self.base[b].clone(),
        };
        let any = ev[wpos.map_or(0, |i| i + 1)..]
            .iter()
            .any(|e| matches!(e.ev, Ev::Discard));
        for e in &ev[floor.map_or(0, |f| f + 1)..] {
            if let Ev::Write(v) = e.ev {
                set.push(v);
            }
        }
        (set, any)
    }
}

fn allowed(g: Option<Val>, (set, any): &(Vec<Val>, bool)) -> bool {
    match g {
        None => false,
        Some(g) => *any || set.contains(&g),
    }
}

struct Params {
    bs: u32,
    blocks: u64,
    region_kb: u32,
    md_bs: u32,
    workers: u64,
}

struct Shared {
    model: RefCell<Model>,
    rng: RefCell<Rng>,
    next_ver: std::cell::Cell<u64>,
    stop: std::cell::Cell<bool>,
    failures: RefCell<Vec<String>>,
    ops: std::cell::Cell<u64>,
}

async fn worker(sh: Rc<Shared>, ch: IoChannel, p: Rc<Params>, w: u64, region_blocks: u64) {
    // Each worker owns a whole-region slice of the device: it is the only
    // writer of its blocks, so its own reads are exact.
    let slice = (p.blocks / region_blocks / p.workers) * region_blocks;
    let lo = w * slice;
    let hi = if w == p.workers - 1 {
        p.blocks
    } else {
        lo + slice
    };
    let bs = p.bs as usize;
    while !sh.stop.get() {
        // Think time, so a round leaves much of the device cold and
        // hydration has work in flight at the cut.
        let think = sh.rng.borrow_mut().below(1500);
        reactor::sleep(Duration::from_micros(think)).await;
        if sh.stop.get() {
            break;
        }
        let (kind, off, len) = {
            let mut r = sh.rng.borrow_mut();
            let kind = r.below(100);
            // Often region-aligned, often not; up to 3 regions long.
            let off = if r.below(2) == 0 {
                lo + r.below((hi - lo) / region_blocks) * region_blocks
            } else {
                lo + r.below(hi - lo)
            };
            let len = 1 + r.below(3 * region_blocks);
            (kind, off, len.min(hi - off).min(256))
        };
        sh.ops.set(sh.ops.get() + 1);
        match kind {
            0..=44 => {
                // write (10 % of them FUA)
                let ver = sh.next_ver.get();
                sh.next_ver.set(ver + 1);
                let fua = kind < 5;
                let mut buf = DmaBuf::new(len as usize * bs);
                stamp(buf.as_mut_slice(), off, bs, ver);
                push(&sh, off, len, Ev::Write(Val::Ver(ver)), fua);
                let ok = util::write(&ch, off, buf, fua).await.is_ok();
                done(&sh, off, len, ok);
            }
            45..=50 => {
                push(&sh, off, len, Ev::Write(Val::Zero), false);
                let ok = util::simple(&ch, IoType::WriteZeroes, off, len)
                    .await
                    .is_ok();
                done(&sh, off, len, ok);
            }
            51..=53 => {
                push(&sh, off, len, Ev::Discard, false);
                let ok = util::simple(&ch, IoType::Unmap, off, len).await.is_ok();
                done(&sh, off, len, ok);
            }
            54..=63 => {
                let snap = sh.model.borrow().completions;
                if util::simple(&ch, IoType::Flush, 0, 1).await.is_ok() && !sh.stop.get() {
                    let mut m = sh.model.borrow_mut();
                    m.flushed_upto = Some(m.flushed_upto.map_or(snap, |f| f.max(snap)));
                }
            }
            _ => {
                let r = util::read(&ch, off, len).await;
                if sh.stop.get() {
                    break;
                }
                let Ok(data) = r else {
                    sh.failures
                        .borrow_mut()
                        .push(format!("read {off}+{len} failed before the cut"));
                    continue;
                };
                let m = sh.model.borrow();
                for i in 0..len {
                    let b = off + i;
                    let got = decode(b, &data.as_slice()[i as usize * bs..][..bs]);
                    let allowed = m.live(b as usize);
                    if !self::allowed(got, &allowed) {
                        sh.failures.borrow_mut().push(format!(
                            "live read: block {b} read {got:?}, allowed {allowed:?}"
                        ));
                    }
                }
            }
        }
    }
}

fn push(sh: &Shared, off: u64, len: u64, ev: Ev, fua: bool) {
    let mut m = sh.model.borrow_mut();
    for b in off..off + len {
        m.events[b as usize].push(Event {
            ev,
            done_at: None,
            fua,
        });
    }
}

fn done(sh: &Shared, off: u64, len: u64, ok: bool) {
    // Acknowledgements seen after the cut are not counted: the model only
    // trusts what completed while the disks were up.
    if !ok || sh.stop.get() {
        return;
    }
    let mut m = sh.model.borrow_mut();
    m.completions += 1;
    let at = m.completions;
    for b in off..off + len {
        // The worker's last event on each block is this one.
        if let Some(e) = m.events[b as usize].last_mut() {
            e.done_at = Some(at);
        }
    }
}

fn opts(p: &Params, rate: u64, threshold: u32, batch: u32) -> CreateOpts {
    let mut o = CreateOpts::new("Clone0", "Src", "Dst", "Md");
    o.region_size_kb = p.region_kb;
    o.hydration_mbytes_per_sec = rate;
    o.hydration_threshold = threshold;
    o.hydration_batch_size = batch;
    o
}

async fn read_all(name: &str, p: &Params) -> Result<Vec<Option<Val>>, String> {
    let desc = bdev::open(name, false, |_| {}).map_err(|e| format!("open {name}: {e}"))?;
    let ch = desc.channel();
    let bs = p.bs as usize;
    let mut out = Vec::with_capacity(p.blocks as usize);
    let mut off = 0;
    while off < p.blocks {
        let n = (p.blocks - off).min(128);
        let data = util::read(&ch, off, n)
            .await
            .map_err(|e| format!("read {off}+{n} after recovery: {e:?}"))?;
        for i in 0..n {
            out.push(decode(off + i, &data.as_slice()[i as usize * bs..][..bs]));
        }
        off += n;
    }
    Ok(out)
}

/// Wait until every region is hydrated, committed and the source released.
async fn wait_hydrated(name: &str) -> Result<(), String> {
    let mut st = None;
    for _ in 0..6000 {
        let s = bdev_clone::status(name).ok_or("clone vanished")?;
        match s.state {
            CloneState::Hydrated if s.source_released => return Ok(()),
            CloneState::Failed | CloneState::ReadOnly => return Err(format!("clone state {s:?}")),
            _ => reactor::sleep(Duration::from_millis(10)).await,
        }
        st = Some(s);
    }
    Err(format!("not hydrated and released after 60 s: {st:?}"))
}

async fn run_seed(seed: u64, rounds: u32) -> Result<(), String> {
    let mut rng = Rng(seed);
    let bs = if rng.below(3) == 0 { 4096 } else { 512 };
    let region_kb = [4u32, 8, 64][rng.below(3) as usize].max(bs / 1024);
    let p = Rc::new(Params {
        bs,
        blocks: (16 << 20) / bs as u64 - rng.below(7), // a partial tail region
        region_kb,
        md_bs: if rng.below(2) == 0 { 512 } else { 4096 },
        workers: 1 + rng.below(4),
    });
    let region_blocks = region_kb as u64 * 1024 / bs as u64;

    // Source: stamped version 0 in RAM (it never changes).
    let src = malloc::create(malloc::CreateParams::new("Src", p.bs, p.blocks))
        .map_err(|e| e.to_string())?;
    {
        let d = bdev::open("Src", true, |_| {}).map_err(|e| e.to_string())?;
        let ch = d.channel();
        let mut off = 0;
        while off < p.blocks {
            let n = (p.blocks - off).min(1024);
            let mut b = DmaBuf::new((n * p.bs as u64) as usize);
            stamp(b.as_mut_slice(), off, p.bs as usize, 0);
            util::write(&ch, off, b, false)
                .await
                .map_err(|e| format!("{e:?}"))?;
            off += n;
        }
    }
    drop(src);
    let (_, dst) =
        wcache::create("Dst", p.bs, p.blocks + rng.below(64)).map_err(|e| e.to_string())?;
    let (_, md) =
        wcache::create("Md", p.md_bs, (1 << 20) / p.md_bs as u64).map_err(|e| e.to_string())?;

    let mut base: Vec<Vec<Val>> = vec![vec![Val::Ver(0)]; p.blocks as usize];
    for round in 0..rounds {
        let last = round + 1 == rounds;
        let rate = 2 + rng.below(6); // MB/s: slow enough to cut mid-hydration
        let o = opts(&p, rate, 1 + rng.below(4) as u32, 1 + rng.below(4) as u32);
        bdev_clone::create(o)
            .await
            .map_err(|e| format!("round {round}: create: {e}"))?;
        let sh = Rc::new(Shared {
            model: RefCell::new(Model::new(base.clone())),
            rng: RefCell::new(Rng(rng.next())),
            // Versions have 24 bits in a stamp: 2^20 per round.
            next_ver: std::cell::Cell::new(1 + (u64::from(round) << 20)),
            stop: std::cell::Cell::new(false),
            failures: RefCell::new(Vec::new()),
            ops: std::cell::Cell::new(0),
        });
        let desc = bdev::open("Clone0", true, |_| {}).map_err(|e| e.to_string())?;
        let mut tasks = Vec::new();
        for w in 0..p.workers {
            let (sh, ch, p) = (sh.clone(), desc.channel(), p.clone());
            tasks.push(reactor::spawn_local(worker(sh, ch, p, w, region_blocks)));
        }
        reactor::sleep(Duration::from_millis(50 + rng.below(400))).await;
        // The cut: both disks at one instant (no await in between).
        sh.stop.set(true);
        let cut_seed = rng.next();
        md.power_cut(cut_seed);
        dst.power_cut(cut_seed ^ 1);
        for t in tasks {
            t.await;
        }
        let fails = sh.failures.borrow().clone();
        if !fails.is_empty() {
            return Err(format!(
                "seed {seed} round {round}: {} live failures, first: {}",
                fails.len(),
                fails[0]
            ));
        }
        drop(desc);
        bdev_clone::delete("Clone0")
            .await
            .map_err(|e| format!("round {round}: delete after the cut: {e}"))?;
        bdev::unregister("Dst").await.map_err(|e| e.to_string())?;
        bdev::unregister("Md").await.map_err(|e| e.to_string())?;
        wcache::create_on("Dst", &dst).map_err(|e| e.to_string())?;
        wcache::create_on("Md", &md).map_err(|e| e.to_string())?;

        // Power on: resume on the same metadata, unthrottled on the last round.
        let o = opts(&p, if last { 0 } else { rate }, 4, 8);
        bdev_clone::create(o)
            .await
            .map_err(|e| format!("round {round}: resume: {e}"))?;
        let got = read_all("Clone0", &p).await?;
        eprintln!(
            "seed {seed} round {round}: {} ops, resumed with {} regions hydrated",
            sh.ops.get(),
            bdev_clone::status("Clone0").unwrap().hydrated_regions
        );
        let mut bad = Vec::new();
        {
            let m = sh.model.borrow();
            for (b, g) in got.iter().enumerate() {
                let allowed = m.after_cut(b);
                if !self::allowed(*g, &allowed) {
                    bad.push(format!("block {b}: read {g:?}, allowed {allowed:?}"));
                }
            }
        }
        if !bad.is_empty() {
            return Err(format!(
                "seed {seed} round {round} (bs {}, region {} KiB, md bs {}, {} ops): {} bad blocks, first: {}",
                p.bs,
                p.region_kb,
                p.md_bs,
                sh.ops.get(),
                bad.len(),
                bad[..bad.len().min(5)].join("; ")
            ));
        }
        // The next round starts from what recovery showed.
        base = got
            .iter()
            .map(|g| vec![g.expect("checked above")])
            .collect();
        if last {
            wait_hydrated("Clone0").await?;
            let again = read_all("Clone0", &p).await?;
            if again != got {
                return Err("clone reads changed across hydration".into());
            }
            // The destination now holds every block (after a flush).
            let d = bdev::open("Clone0", true, |_| {}).map_err(|e| e.to_string())?;
            util::simple(&d.channel(), IoType::Flush, 0, 1)
                .await
                .map_err(|e| format!("{e:?}"))?;
            drop(d);
            let img = dst.durable();
            for (b, g) in got.iter().enumerate() {
                let on_dst = decode(b as u64, &img[b * p.bs as usize..][..p.bs as usize]);
                if on_dst != *g {
                    return Err(format!("dest block {b}: {on_dst:?}, clone read {g:?}"));
                }
            }
        }
        bdev_clone::delete("Clone0")
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[test]
fn power_cut_keeps_every_flushed_write() {
    let (seeds, rounds) = if scale_small() { (3, 2) } else { (8, 3) };
    let failures: Vec<String> = run_on_reactor(0x3, move || async move {
        let mut failures = Vec::new();
        for seed in 0..seeds {
            if let Err(e) = run_seed(0xC10E_0000 + seed, rounds).await {
                failures.push(e);
            }
            bdev::unregister_all().await;
        }
        failures
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
