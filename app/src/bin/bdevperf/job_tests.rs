//! Jobs end to end on a real runtime, against a test bdev that can fail
//! I/Os or silently drop writes (stale data), to check the failure and
//! verify paths without an error-injection module.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bdev::{Bdev, BdevBuilder, BdevIo, BdevOps, ChannelOps, IoStatus, IoType};

use crate::job::{self, JobParams, JobResult, Mode};

/// One runtime per process at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const BS: usize = 512;
const BLOCKS: u64 = 1024;

#[derive(Default)]
struct Faults {
    /// Fail every Nth I/O (0: never).
    fail_every: u64,
    /// Complete every Nth write successfully without storing it (0: never).
    drop_write_every: u64,
}

impl Faults {
    fn fail_every(n: u64) -> Self {
        Faults {
            fail_every: n,
            ..Faults::default()
        }
    }
    fn drop_write_every(n: u64) -> Self {
        Faults {
            drop_write_every: n,
            ..Faults::default()
        }
    }
}

/// The bdev and, cloned, each of its channels: all share one memory and
/// one I/O count.
#[derive(Clone)]
struct TestBdev {
    mem: Arc<Mutex<Vec<u8>>>,
    faults: Arc<Faults>,
    count: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
}

impl ChannelOps for TestBdev {
    fn submit(&self, mut io: Box<BdevIo>) {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if self.faults.fail_every != 0 && n.is_multiple_of(self.faults.fail_every) {
            return io.complete(IoStatus::Failed);
        }
        let off = io.offset_blocks as usize * BS;
        let len = io.num_blocks as usize * BS;
        let mut mem = self.mem.lock().unwrap();
        match io.io_type {
            IoType::Read => {
                if let Some(b) = io.buf.as_mut() {
                    b.as_mut_slice()[..len].copy_from_slice(&mem[off..off + len]);
                }
            }
            IoType::Write => {
                let w = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
                let drop_it = self.faults.drop_write_every != 0
                    && w.is_multiple_of(self.faults.drop_write_every);
                if let (false, Some(b)) = (drop_it, io.buf.as_ref()) {
                    mem[off..off + len].copy_from_slice(&b.as_slice()[..len]);
                }
            }
            IoType::Unmap | IoType::WriteZeroes => mem[off..off + len].fill(0),
            IoType::Flush | IoType::Reset => {}
        }
        drop(mem);
        io.complete(IoStatus::Success);
    }
}

impl BdevOps for TestBdev {
    fn module_name(&self) -> &'static str {
        "bdevperf_test"
    }
    fn io_type_supported(&self, _t: IoType) -> bool {
        true
    }
    fn create_channel(&self, _bdev: &Arc<Bdev>) -> Box<dyn ChannelOps> {
        Box::new(self.clone())
    }
}

/// A job of `mode` over the whole test bdev, 8 blocks an I/O: sequential,
/// queue depth 8, stopping at the first failure, for 100 ms, unless the
/// test changes that.
fn params(mode: Mode) -> JobParams {
    JobParams {
        mode,
        random: false,
        queue_depth: 8,
        block_size: BS as u32,
        io_blocks: 8,
        ios_base: 0,
        size_in_ios: BLOCKS / 8,
        duration_ns: 100_000_000,
        continue_on_failure: false,
        track_latency: true,
        seed: 12345,
        compare_data: true,
    }
}

/// Register a test bdev, run one job on it, unregister it.
fn run(name: &str, faults: Faults, p: JobParams) -> JobResult {
    let _g = reactor::sync::lock(&SERIAL);
    let (tx, rx) = mpsc::channel();
    let name = name.to_string();
    let cfg = reactor::Config {
        core_mask: 0x1,
        interrupt_mode: true,
        mem_size_mb: 16,
        no_huge: true,
        uring_entries: 64,
    };
    let rt = reactor::start(cfg, move || {
        let ops = TestBdev {
            mem: Arc::new(Mutex::new(vec![0u8; BLOCKS as usize * BS])),
            faults: Arc::new(faults),
            count: Arc::default(),
            writes: Arc::default(),
        };
        BdevBuilder::new(name.clone(), "test")
            .block_size(BS as u32)
            .num_blocks(BLOCKS)
            .register(ops)
            .unwrap();
        let desc = bdev::open(&name, !p.mode.read_only(), |_| {}).unwrap();
        let bdev_name = name.clone();
        let done: job::DoneFn = Box::new(move |mut res: JobResult| {
            drop(res.desc.take());
            reactor::spawn_local(async move {
                bdev::unregister(&bdev_name).await.unwrap();
                tx.send(res).unwrap();
            });
        });
        job::start(name, desc, p, Arc::new(AtomicBool::new(false)), done);
    })
    .unwrap();
    let res = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("job finished");
    reactor::stop();
    rt.join();
    res
}

#[test]
fn clean_runs_have_no_failures() {
    for (mode, random) in [
        (Mode::Mixed { read_pct: 100 }, true),
        (Mode::Mixed { read_pct: 50 }, false),
        (Mode::Verify, false),
        (Mode::Unmap, false),
        (Mode::Flush, true),
        (Mode::WriteZeroes, false),
    ] {
        let mut p = params(mode);
        p.random = random;
        p.queue_depth = 16;
        let r = run("bp_clean", Faults::default(), p);
        assert!(r.completed > 100, "{mode:?}: {} I/Os", r.completed);
        assert_eq!((r.failed, r.miscompares), (0, 0), "{mode:?}");
        assert!(!r.ended_with_error);
        assert!(r.lat_min_ns > 0 && r.lat_min_ns <= r.lat_max_ns);
        assert!(r.lat_sum_ns >= r.lat_min_ns * r.completed);
        let h = r.histogram.as_ref().expect("-l keeps a histogram");
        assert_eq!(h.total(), r.completed + r.failed, "{mode:?}");
        assert!(h.percentile(0.99) <= r.lat_max_ns + r.lat_max_ns / 60);
        assert!(r.runtime_ns >= 100_000_000, "ran for the full time");
    }
}

#[test]
fn first_failure_stops_the_job() {
    let mut p = params(Mode::Mixed { read_pct: 100 });
    p.random = true;
    p.queue_depth = 4;
    p.duration_ns = 2_000_000_000;
    let r = run("bp_fail", Faults::fail_every(50), p);
    assert_eq!(r.failed, 1, "the job drains after its first failure");
    assert!(r.ended_with_error);
    assert!(r.runtime_ns < 1_000_000_000, "it did not run the full time");
}

#[test]
fn continue_on_failure_counts_every_failure() {
    let mut p = params(Mode::Mixed { read_pct: 0 });
    p.continue_on_failure = true;
    let r = run("bp_cof", Faults::fail_every(10), p);
    assert!(r.failed > 5);
    let total = r.completed + r.failed;
    // About one in ten fails.
    assert!(
        r.failed * 12 > total && r.failed * 8 < total,
        "{} of {total}",
        r.failed
    );
    assert!(!r.ended_with_error);
}

#[test]
fn verify_detects_dropped_writes() {
    // A dropped write leaves the previous generation (or zeroes) behind.
    let mut p = params(Mode::Verify);
    p.continue_on_failure = true;
    let r = run("bp_stale", Faults::drop_write_every(7), p);
    assert!(r.miscompares > 5, "{} miscompares", r.miscompares);
    assert_eq!(r.failed, r.miscompares);
    let mut p = params(Mode::Verify);
    p.duration_ns = 2_000_000_000;
    let r = run("bp_stale1", Faults::drop_write_every(7), p);
    // The job stops at the first miscompare; I/Os already in flight drain
    // and may miscompare too.
    assert!((1..=8).contains(&r.miscompares), "{}", r.miscompares);
    assert!(r.ended_with_error);
    assert!(r.runtime_ns < 1_000_000_000);
}
