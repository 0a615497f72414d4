//! In-process tests of the clone bdev on a real runtime (malloc/null
//! bases). One runtime per process at a time: `run_on_reactor` serialises.

use std::sync::Arc;
use std::time::Duration;

use bdev::modules::malloc;
use bdev::util::{self, run_on_reactor};
use bdev::{Bdev, IoType};
use bdev_clone::{create, delete, status, CreateOpts};
use reactor::DmaBuf;

fn mk_malloc(name: &str, bs: u32, blocks: u64) -> Arc<Bdev> {
    malloc::create(malloc::CreateParams::new(name, bs, blocks)).unwrap()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn write_all(name: &str, at: u64, data: &[u8]) {
    let d = bdev::open(name, true, |_| {}).unwrap();
    let ch = d.channel();
    let mut b = DmaBuf::new(data.len());
    b.as_mut_slice().copy_from_slice(data);
    util::write(&ch, at, b, false).await.unwrap();
}

async fn read_all(name: &str, at: u64, blocks: u64) -> Vec<u8> {
    let d = bdev::open(name, false, |_| {}).unwrap();
    let ch = d.channel();
    util::read(&ch, at, blocks)
        .await
        .unwrap()
        .as_slice()
        .to_vec()
}

async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        reactor::sleep(Duration::from_millis(2)).await;
    }
}

fn st(name: &str, key: &str) -> serde_json::Value {
    status(name).unwrap()[key].clone()
}

#[test]
fn end_to_end_hydrates_releases_and_resumes() {
    run_on_reactor(0x3, || async {
        let blocks = 4096u64; // 2 MiB of 512-byte blocks
        let src_data = pattern((blocks * 512) as usize, 1);
        mk_malloc("S0", 512, blocks);
        write_all("S0", 0, &src_data).await;
        mk_malloc("D0", 512, blocks);
        mk_malloc("M0", 512, 64);
        let mut o = CreateOpts::new("C0", "S0", "D0", "M0");
        o.no_hydration = true;
        let c = create(o).await.unwrap();
        assert_eq!(c.num_blocks(), blocks);
        assert_eq!(st("C0", "state"), "paused");
        // Cold reads come from the source.
        assert_eq!(read_all("C0", 0, blocks).await, src_data);
        // A partial write to a cold region hydrates it first.
        let w = pattern(512 * 3, 2);
        write_all("C0", 9, &w).await;
        let mut expect = src_data.clone();
        expect[9 * 512..12 * 512].copy_from_slice(&w);
        assert_eq!(read_all("C0", 0, blocks).await, expect);
        assert_eq!(st("C0", "hydrated_regions"), 1);
        // Flush commits.
        let d = bdev::open("C0", true, |_| {}).unwrap();
        util::simple(&d.channel(), IoType::Flush, 0, blocks)
            .await
            .unwrap();
        drop(d);
        bdev_clone::set_hydration(&bdev_clone::HydrationOpts {
            name: "C0".into(),
            enable: Some(true),
            hydration_threshold: Some(8),
            ..Default::default()
        })
        .unwrap();
        wait_for("full hydration and release", 20, || {
            st("C0", "source_released") == true
        })
        .await;
        assert_eq!(st("C0", "state"), "hydrated");
        assert_eq!(read_all("D0", 0, blocks).await, expect);
        assert_eq!(read_all("C0", 0, blocks).await, expect);
        delete("C0").await.unwrap();
        assert!(bdev::get("C0").is_none());
        // Re-create on the same metadata: everything is still hydrated.
        create(CreateOpts::new("C0", "S0", "D0", "M0"))
            .await
            .unwrap();
        assert_eq!(st("C0", "hydrated_regions"), st("C0", "num_regions"));
        assert_eq!(read_all("C0", 0, blocks).await, expect);
        delete("C0").await.unwrap();
    });
}

// ---------------------------------------------------------------------------
// Model-based randomized test

use bdev::Desc;
use bdev_clone::oneshot::run_on;
use bdev_clone::HydrationOpts;

/// A small deterministic RNG (xorshift64*), so seeds replay.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

#[derive(Clone, Debug)]
enum Op {
    Read(u64, u64),
    Write(u64, u64, bool, u64),
    Zeroes(u64, u64),
    Discard(u64, u64),
    Flush,
}

impl Op {
    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Op::Read(o, n) | Op::Write(o, n, _, _) | Op::Zeroes(o, n) | Op::Discard(o, n) => {
                Some((o, n))
            }
            Op::Flush => None,
        }
    }
}

/// What every block of the clone must read: its bytes, unless a discard
/// left it undefined.
struct Model {
    data: Vec<u8>,
    defined: Vec<bool>,
    bs: u64,
    region_blocks: u64,
    blocks: u64,
}

impl Model {
    fn apply(&mut self, op: &Op) {
        let bs = self.bs as usize;
        match *op {
            Op::Write(o, n, _, seed) => {
                let d = pattern((n * self.bs) as usize, seed);
                self.data[o as usize * bs..(o + n) as usize * bs].copy_from_slice(&d);
                self.defined[o as usize..(o + n) as usize].fill(true);
            }
            Op::Zeroes(o, n) => {
                self.data[o as usize * bs..(o + n) as usize * bs].fill(0);
                self.defined[o as usize..(o + n) as usize].fill(true);
            }
            Op::Discard(o, n) => {
                // Whole regions only (the short tail region counts when the
                // range reaches the end); partial regions keep their data.
                let rb = self.region_blocks;
                let start = o.div_ceil(rb) * rb;
                let end = if o + n == self.blocks {
                    self.blocks
                } else {
                    (o + n) / rb * rb
                };
                if end > start {
                    self.defined[start as usize..end as usize].fill(false);
                }
            }
            Op::Read(..) | Op::Flush => {}
        }
    }

    fn check(&self, what: &str, at: u64, got: &[u8]) {
        let bs = self.bs as usize;
        for (i, chunk) in got.chunks(bs).enumerate() {
            let b = at as usize + i;
            if self.defined[b] {
                assert!(
                    chunk == &self.data[b * bs..(b + 1) * bs],
                    "{what}: block {b} differs from the model"
                );
            }
        }
    }
}

async fn do_op(desc: Arc<Desc>, op: Op, bs: u64) -> Option<Vec<u8>> {
    let ch = desc.channel();
    match op {
        Op::Read(o, n) => Some(
            util::read(&ch, o, n)
                .await
                .expect("read")
                .as_slice()
                .to_vec(),
        ),
        Op::Write(o, n, fua, seed) => {
            let d = pattern((n * bs) as usize, seed);
            let mut b = DmaBuf::new(d.len());
            b.as_mut_slice().copy_from_slice(&d);
            util::write(&ch, o, b, fua).await.expect("write");
            None
        }
        Op::Zeroes(o, n) => {
            util::simple(&ch, IoType::WriteZeroes, o, n)
                .await
                .expect("write_zeroes");
            None
        }
        Op::Discard(o, n) => {
            util::simple(&ch, IoType::Unmap, o, n).await.expect("unmap");
            None
        }
        Op::Flush => {
            util::simple(&ch, IoType::Flush, 0, 1).await.expect("flush");
            None
        }
    }
}

fn small() -> bool {
    std::env::var("CLONE_TGT_TEST_SCALE").is_ok_and(|v| v == "small")
}

async fn model_run(seed: u64, ops: usize) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let bs = 512u64;
    let region_kb = [4u32, 8, 16][rng.below(3) as usize];
    let region_blocks = region_kb as u64 * 1024 / bs;
    let blocks = 8192 - 4; // a short tail region
    let (s, d, m, c) = (
        format!("S{seed}"),
        format!("D{seed}"),
        format!("M{seed}"),
        format!("C{seed}"),
    );
    let src_data = pattern((blocks * bs) as usize, seed + 1000);
    mk_malloc(&s, bs as u32, blocks);
    write_all(&s, 0, &src_data).await;
    mk_malloc(&d, bs as u32, 8192);
    mk_malloc(&m, bs as u32, 64);
    let mut o = CreateOpts::new(&c, &s, &d, &m);
    o.region_size_kb = region_kb;
    o.hydration_threshold = 1 + rng.below(4) as u32;
    o.hydration_batch_size = 1 + rng.below(3) as u32;
    o.hydration_mbytes_per_sec = 2;
    o.no_hydration = rng.chance(30);
    o.copy_on_read = rng.chance(30);
    create(o).await.unwrap();
    let mut model = Model {
        data: src_data,
        defined: vec![true; blocks as usize],
        bs,
        region_blocks,
        blocks,
    };
    let desc = Arc::new(bdev::open(&c, true, |_| {}).unwrap());
    let mut done = 0;
    while done < ops {
        // A batch of non-overlapping ops, run concurrently on both reactors.
        let k = 1 + rng.below(6) as usize;
        let mut batch: Vec<Op> = Vec::new();
        while batch.len() < k {
            let len = match rng.below(10) {
                0..=5 => 1 + rng.below(24),
                6 | 7 => region_blocks * (1 + rng.below(3)),
                _ => 1 + rng.below(region_blocks * 4),
            };
            let len = len.min(blocks);
            let mut off = match rng.below(4) {
                0 => rng.below(blocks / region_blocks) * region_blocks,
                1 => blocks - len,
                _ => rng.below(blocks - len + 1),
            };
            off = off.min(blocks - len);
            let op = match rng.below(20) {
                0..=6 => Op::Read(off, len),
                7..=12 => Op::Write(off, len, rng.chance(20), rng.next()),
                13 | 14 => Op::Zeroes(off, len),
                15..=17 => Op::Discard(off, len),
                _ => Op::Flush,
            };
            let overlaps = op.range().is_some_and(|(o, n)| {
                batch
                    .iter()
                    .any(|b| b.range().is_some_and(|(bo, bn)| o < bo + bn && bo < o + n))
            });
            if !overlaps {
                batch.push(op);
            }
        }
        let handles: Vec<_> = batch
            .iter()
            .map(|op| {
                let (desc, op, r) = (desc.clone(), op.clone(), rng.below(2) as u32);
                reactor::spawn_local(run_on(r, move || do_op(desc, op, bs)))
            })
            .collect();
        for (op, h) in batch.iter().zip(handles) {
            if let Some(data) = h.await {
                let (o, _) = op.range().unwrap();
                model.check(&format!("seed {seed} {op:?}"), o, &data);
            }
        }
        for op in &batch {
            model.apply(op);
        }
        done += batch.len();
        if rng.chance(3) {
            bdev_clone::set_hydration(&HydrationOpts {
                name: c.clone(),
                enable: Some(rng.chance(70)),
                hydration_threshold: Some(rng.below(5) as u32),
                ..Default::default()
            })
            .unwrap();
        }
    }
    drop(desc);
    let before = bdev_clone::hydrated_regions(&c).unwrap().0;
    delete(&c).await.unwrap();
    // Resume on the same metadata, hydrate everything.
    let mut o = CreateOpts::new(&c, &s, &d, &m);
    o.region_size_kb = region_kb;
    o.hydration_threshold = 16;
    o.hydration_batch_size = 4;
    create(o).await.unwrap();
    let (after, total) = bdev_clone::hydrated_regions(&c).unwrap();
    assert!(
        after >= before,
        "seed {seed}: resume lost hydrated regions ({after} < {before})"
    );
    model.check(
        &format!("seed {seed} resumed"),
        0,
        &read_all(&c, 0, blocks).await,
    );
    wait_for("full hydration", 30, || st(&c, "source_released") == true).await;
    assert_eq!(bdev_clone::hydrated_regions(&c).unwrap().0, total);
    model.check(
        &format!("seed {seed} dest"),
        0,
        &read_all(&d, 0, blocks).await,
    );
    model.check(
        &format!("seed {seed} final"),
        0,
        &read_all(&c, 0, blocks).await,
    );
    delete(&c).await.unwrap();
    for b in [&s, &d, &m] {
        bdev::unregister(b).await.unwrap();
    }
}

#[test]
fn model_based_random_io_with_hydration_and_resume() {
    let (seeds, ops) = if small() { (4u64, 150) } else { (10, 400) };
    run_on_reactor(0x3, move || async move {
        for seed in 1..=seeds {
            model_run(seed, ops).await;
        }
    });
}
