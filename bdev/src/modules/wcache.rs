//! `wcache`: a RAM disk with a volatile write cache, for power-cut tests.
//!
//! Not a production module (no RPC): crash tests put it under a stacked bdev
//! (the clone's destination and metadata) to check what survives a power
//! cut. Its durable contents live in a [`Media`], which outlives the bdev:
//!
//! * a write lands in the volatile cache and completes; reads see it;
//! * a flush makes every cached write durable, then completes;
//! * a FUA write is durable when it completes;
//! * [`Media::power_cut`] loses the cache the way a real disk may: each
//!   block with unflushed writes independently keeps its durable contents or
//!   takes any one of its unflushed versions (so multi-block writes tear,
//!   and unflushed writes to one block may land out of order). Every later
//!   I/O on the bdevs created before the cut fails, as on a dead device;
//! * [`create_on`] registers a new bdev over the same media: "power on".
//!
//! The cache is a mutex-protected map: this is a test device, the lock is
//! not on any production I/O path.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{Bdev, BdevBuilder, BdevError, BdevIo, BdevOps, ChannelOps, IoStatus, IoType};

pub const PRODUCT_NAME: &str = "Write-cache test disk";

/// Orders events across every media of the process (see [`Media::events`]).
static EVENT_SEQ: AtomicU64 = AtomicU64::new(0);

/// What the media saw, for ordering checks (e.g. "the destination was
/// flushed before the metadata write").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A write (or unmap / write zeroes) completed into the cache.
    Write { offset_blocks: u64, num_blocks: u64 },
    /// A FUA write completed (durable).
    WriteFua { offset_blocks: u64, num_blocks: u64 },
    /// A flush completed: everything written before it is durable.
    Flush,
}

#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct MediaStats {
    pub writes: u64,
    pub flushes: u64,
    /// Blocks with unflushed data right now.
    pub dirty_blocks: u64,
    pub power_cuts: u64,
}

struct State {
    durable: Vec<u8>,
    /// block -> unflushed versions, oldest first.
    cache: BTreeMap<u64, Vec<Box<[u8]>>>,
    /// Bdevs of an older generation fail every I/O.
    generation: u64,
    log: Option<Vec<(u64, Event)>>,
    stats: MediaStats,
}

/// The durable side of a write-cache disk: survives its bdevs.
pub struct Media {
    block_size: u32,
    num_blocks: u64,
    state: Mutex<State>,
}

impl Media {
    pub fn new(block_size: u32, num_blocks: u64) -> Arc<Media> {
        assert!(block_size >= 512 && block_size.is_power_of_two());
        Arc::new(Media {
            block_size,
            num_blocks,
            state: Mutex::new(State {
                durable: vec![0; (block_size as u64 * num_blocks) as usize],
                cache: BTreeMap::new(),
                generation: 0,
                log: None,
                stats: MediaStats::default(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the media from the others.
        reactor::sync::lock(&self.state)
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    /// Start (or stop) recording [`Event`]s.
    pub fn set_logging(&self, on: bool) {
        self.lock().log = on.then(Vec::new);
    }

    /// Events recorded so far, each with a process-wide sequence number.
    pub fn events(&self) -> Vec<(u64, Event)> {
        self.lock().log.clone().unwrap_or_default()
    }

    pub fn stats(&self) -> MediaStats {
        let s = self.lock();
        MediaStats {
            dirty_blocks: s.cache.len() as u64,
            ..s.stats
        }
    }

    /// The durable contents (what survives a power cut that keeps nothing
    /// of the cache).
    pub fn durable(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// Write straight to the durable image (test setup: e.g. a source's
    /// initial contents).
    pub fn fill_durable(&self, offset_bytes: usize, data: &[u8]) {
        self.lock().durable[offset_bytes..offset_bytes + data.len()].copy_from_slice(data);
    }

    /// Cut the power: resolve the cache as a real disk might (seeded), and
    /// kill every bdev on this media. Returns how many blocks kept an
    /// unflushed version.
    pub fn power_cut(&self, seed: u64) -> u64 {
        let mut s = self.lock();
        let bs = self.block_size as usize;
        let mut rng = seed ^ 0x9e37_79b9_7f4a_7c15;
        let mut kept = 0;
        let cache = std::mem::take(&mut s.cache);
        for (block, versions) in cache {
            // 0 = nothing reached the medium; k = version k-1 did.
            let pick = (splitmix(&mut rng) % (versions.len() as u64 + 1)) as usize;
            if pick > 0 {
                let off = block as usize * bs;
                s.durable[off..off + bs].copy_from_slice(&versions[pick - 1]);
                kept += 1;
            }
        }
        s.generation += 1;
        s.stats.power_cuts += 1;
        kept
    }

    fn record(s: &mut State, ev: Event) {
        if let Some(log) = s.log.as_mut() {
            log.push((EVENT_SEQ.fetch_add(1, Ordering::Relaxed), ev));
        }
    }
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct WcacheBdev {
    media: Arc<Media>,
    generation: u64,
}

struct WcacheChannel {
    media: Arc<Media>,
    generation: u64,
}

impl WcacheChannel {
    fn run(&self, io: &mut BdevIo) -> IoStatus {
        let m = &self.media;
        let bs = m.block_size as usize;
        let mut s = m.lock();
        if s.generation != self.generation {
            return IoStatus::Failed;
        }
        let (first, n) = (io.offset_blocks, io.num_blocks);
        match io.io_type {
            IoType::Read => {
                let buf = io.buf.as_mut().expect("generic layer checked the buffer");
                let out = buf.as_mut_slice();
                for i in 0..n {
                    let b = first + i;
                    let dst = &mut out[i as usize * bs..(i as usize + 1) * bs];
                    match s.cache.get(&b).and_then(|v| v.last()) {
                        Some(data) => dst.copy_from_slice(data),
                        None => dst.copy_from_slice(&s.durable[b as usize * bs..][..bs]),
                    }
                }
            }
            IoType::Write | IoType::Unmap | IoType::WriteZeroes => {
                let fua = io.io_type == IoType::Write && io.fua;
                for i in 0..n {
                    let b = first + i;
                    let data: Box<[u8]> = match (io.io_type, io.buf.as_ref()) {
                        (IoType::Write, Some(buf)) => {
                            buf.as_slice()[i as usize * bs..(i as usize + 1) * bs].into()
                        }
                        _ => vec![0; bs].into(),
                    };
                    if fua {
                        // Durable now; older unflushed versions can no
                        // longer land on top of it.
                        s.cache.remove(&b);
                        s.durable[b as usize * bs..][..bs].copy_from_slice(&data);
                    } else {
                        s.cache.entry(b).or_default().push(data);
                    }
                }
                s.stats.writes += 1;
                let ev = if fua {
                    Event::WriteFua {
                        offset_blocks: first,
                        num_blocks: n,
                    }
                } else {
                    Event::Write {
                        offset_blocks: first,
                        num_blocks: n,
                    }
                };
                Media::record(&mut s, ev);
            }
            IoType::Flush => {
                let cache = std::mem::take(&mut s.cache);
                for (b, mut versions) in cache {
                    let data = versions.pop().expect("a cached block has a version");
                    s.durable[b as usize * bs..][..bs].copy_from_slice(&data);
                }
                s.stats.flushes += 1;
                Media::record(&mut s, Event::Flush);
            }
            IoType::Reset => {}
        }
        IoStatus::Success
    }
}

impl ChannelOps for WcacheChannel {
    fn submit(&self, mut io: Box<BdevIo>) {
        let st = self.run(&mut io);
        io.complete(st);
    }
}

impl BdevOps for WcacheBdev {
    fn module_name(&self) -> &'static str {
        "wcache"
    }
    fn io_type_supported(&self, _t: IoType) -> bool {
        true
    }
    fn create_channel(&self, _bdev: &Arc<Bdev>) -> Box<dyn ChannelOps> {
        Box::new(WcacheChannel {
            media: self.media.clone(),
            generation: self.generation,
        })
    }
}

/// A new media and a bdev on it.
pub fn create(
    name: &str,
    block_size: u32,
    num_blocks: u64,
) -> Result<(Arc<Bdev>, Arc<Media>), BdevError> {
    let media = Media::new(block_size, num_blocks);
    let b = create_on(name, &media)?;
    Ok((b, media))
}

/// Register a bdev over existing media ("power on" after a cut).
pub fn create_on(name: &str, media: &Arc<Media>) -> Result<Arc<Bdev>, BdevError> {
    let generation = media.lock().generation;
    BdevBuilder::new(name, PRODUCT_NAME)
        .block_size(media.block_size)
        .num_blocks(media.num_blocks)
        .write_cache(true)
        .register(WcacheBdev {
            media: media.clone(),
            generation,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::open_ch;
    use crate::util::{self, run_on_reactor};
    use reactor::DmaBuf;

    fn buf(bs: usize, blocks: usize, v: u8) -> DmaBuf {
        let mut b = DmaBuf::new(bs * blocks);
        b.as_mut_slice().fill(v);
        b
    }

    #[test]
    fn cache_flush_fua_and_power_cut() {
        run_on_reactor(0x1, || async {
            let (_b, media) = create("WC0", 512, 64).unwrap();
            media.set_logging(true);
            let (desc, ch) = open_ch("WC0", true);
            // Flushed: survives any cut.
            util::write(&ch, 0, buf(512, 4, 1), false).await.unwrap();
            util::simple(&ch, IoType::Flush, 0, 64).await.unwrap();
            // FUA: durable at once.
            util::write(&ch, 4, buf(512, 2, 2), true).await.unwrap();
            // Unflushed: read back before the cut, may be lost or torn.
            util::write(&ch, 8, buf(512, 8, 3), false).await.unwrap();
            util::write(&ch, 8, buf(512, 1, 4), false).await.unwrap();
            let r = util::read(&ch, 8, 2).await.unwrap();
            assert!(r.as_slice()[..512].iter().all(|&x| x == 4));
            assert!(r.as_slice()[512..].iter().all(|&x| x == 3));
            assert_eq!(media.stats().dirty_blocks, 8);
            let ev = media.events();
            assert_eq!(ev.len(), 5);
            assert_eq!(ev[1].1, Event::Flush);
            assert!(ev.windows(2).all(|w| w[0].0 < w[1].0));

            media.power_cut(7);
            // The old bdev is dead.
            assert_eq!(util::read(&ch, 0, 1).await.unwrap_err(), IoStatus::Failed);
            drop(ch);
            drop(desc);
            crate::unregister("WC0").await.unwrap();

            let _b = create_on("WC0", &media).unwrap();
            let (desc, ch) = open_ch("WC0", true);
            let r = util::read(&ch, 0, 16).await.unwrap();
            let blk = |i: usize| &r.as_slice()[i * 512..(i + 1) * 512];
            for i in 0..4 {
                assert!(blk(i).iter().all(|&x| x == 1));
            }
            for i in 4..6 {
                assert!(blk(i).iter().all(|&x| x == 2));
            }
            // Block 8 had versions 3 and 4; others only 3; any may be kept.
            assert!([0u8, 3, 4].contains(&blk(8)[0]));
            for i in 8..16 {
                let v = blk(i)[0];
                assert!(blk(i).iter().all(|&x| x == v));
                assert!([0u8, 3, 4].contains(&v), "block {i}: {v}");
            }
            drop(ch);
            drop(desc);
            crate::unregister("WC0").await.unwrap();
        });
    }

    #[test]
    fn power_cut_tears_across_seeds() {
        // Over many seeds a multi-block unflushed write is sometimes kept
        // whole, sometimes lost, sometimes torn.
        let (mut whole, mut lost, mut torn) = (0, 0, 0);
        for seed in 0..64 {
            let media = Media::new(512, 8);
            {
                let mut s = media.lock();
                for b in 0..8 {
                    s.cache.insert(b, vec![vec![9u8; 512].into()]);
                }
            }
            media.power_cut(seed);
            let d = media.durable();
            let kept = (0..8).filter(|b| d[b * 512] == 9).count();
            match kept {
                8 => whole += 1,
                0 => lost += 1,
                _ => torn += 1,
            }
        }
        assert!(torn > 0 && whole + lost + torn == 64);
    }
}
