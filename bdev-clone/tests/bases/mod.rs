//! Base-bdev helpers shared by the in-process clone tests: malloc bdevs,
//! seeded data, whole reads and writes through any bdev, a seeded RNG, a
//! clone's status fields.
#![allow(dead_code)]

use std::sync::Arc;

use bdev::modules::malloc;
use bdev::util;
use bdev::Bdev;
use reactor::DmaBuf;

pub fn mk_malloc(name: &str, bs: u32, blocks: u64) -> Arc<Bdev> {
    malloc::create(malloc::CreateParams::new(name, bs, blocks)).unwrap()
}

/// `len` bytes of seeded pseudo-random data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
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

/// A malloc source `name` of `blocks` blocks of `bs` bytes holding
/// seeded data; returns that data.
pub async fn mk_source(name: &str, bs: u32, blocks: u64, seed: u64) -> Vec<u8> {
    let data = pattern(blocks as usize * bs as usize, seed);
    mk_malloc(name, bs, blocks);
    write_all(name, 0, &data).await;
    data
}

pub async fn write_all(name: &str, at: u64, data: &[u8]) {
    let d = bdev::open(name, true, |_| {}).unwrap();
    let ch = d.channel();
    let mut b = DmaBuf::new(data.len());
    b.as_mut_slice().copy_from_slice(data);
    util::write(&ch, at, b, false).await.unwrap();
}

pub async fn read_all(name: &str, at: u64, blocks: u64) -> Vec<u8> {
    let d = bdev::open(name, false, |_| {}).unwrap();
    let ch = d.channel();
    util::read(&ch, at, blocks)
        .await
        .unwrap()
        .as_slice()
        .to_vec()
}

/// A small deterministic RNG (xorshift64*), so seeds replay.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

/// Field `key` of clone `name`'s status object, as the wire has it.
pub fn st(name: &str, key: &str) -> serde_json::Value {
    let s = bdev_clone::status(name).expect("the clone exists");
    serde_json::to_value(s).expect("a status serializes")[key].clone()
}
