//! Generic-layer tests on malloc bdevs, on a real reactor runtime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use reactor::DmaBuf;

use crate::modules::malloc;
use crate::test_util::{mk, open_ch, pattern, two_cores, write_there_read_here, zeroed};
use crate::util::{self, run_on_reactor};
use crate::*;

#[test]
fn read_write_roundtrip_and_bounds() {
    run_on_reactor(0x1, || async {
        mk("M0", 1024);
        let (desc, ch) = open_ch("M0", true);
        let w = pattern(4096, 7);
        let expect = w.as_slice().to_vec();
        util::write(&ch, 8, w, false).await.unwrap();
        let r = util::read(&ch, 8, 8).await.unwrap();
        assert_eq!(r.as_slice(), &expect[..]);
        // Fresh malloc memory reads as zeroes.
        assert!(zeroed(util::read(&ch, 100, 1).await.unwrap().as_slice()));
        // Past the end, and a short buffer, fail without touching data.
        assert_eq!(
            util::read(&ch, 1020, 8).await.unwrap_err(),
            IoStatus::Failed
        );
        let io = util::submit(&ch, IoType::Write, 0, 8, Some(DmaBuf::new(512)), false).await;
        assert_eq!(io.status, IoStatus::Failed);
        util::simple(&ch, IoType::Unmap, 8, 4).await.unwrap();
        let r = util::read(&ch, 8, 8).await.unwrap();
        assert!(r.as_slice()[..2048].iter().all(|&b| b == 0));
        assert_eq!(&r.as_slice()[2048..], &expect[2048..]);
        util::simple(&ch, IoType::Flush, 0, 1024).await.unwrap();
        let st = desc.bdev().iostat();
        assert_eq!(st.write.ops, 1);
        assert_eq!(st.write.bytes, 4096);
        assert_eq!(st.read.ops, 3);
        assert_eq!(st.unmap.ops, 1);
        assert!(st.read.max_latency_ticks >= st.read.min_latency_ticks);
    });
}

#[test]
fn names_claims_and_readonly_descs() {
    run_on_reactor(0x1, || async {
        mk("A", 64);
        let err = malloc::create(malloc::CreateParams::new("A", 512, 8)).unwrap_err();
        assert_eq!(err.errno(), libc::EEXIST);
        assert!(matches!(
            open("nope", false, |_| {}),
            Err(BdevError::NotFound(_))
        ));

        let (ro, ch) = open_ch("A", false);
        let e = util::write(&ch, 0, DmaBuf::new(512), false)
            .await
            .unwrap_err();
        assert_eq!(e, IoStatus::Failed, "read-only descriptor cannot write");

        let mut src = open("A", false, |_| {}).unwrap();
        src.claim(ClaimType::ReadManyWriteNone, "clone").unwrap();
        assert_eq!(src.bdev().claim_type(), Some(ClaimType::ReadManyWriteNone));
        assert!(matches!(
            open("A", true, |_| {}),
            Err(BdevError::WriteRefused(_))
        ));
        let mut other = open("A", false, |_| {}).unwrap();
        let e = other.claim(ClaimType::ExclusiveWrite, "x").unwrap_err();
        assert_eq!(e.errno(), libc::EBUSY);
        drop(src);
        assert_eq!(
            get("A").unwrap().claim_type(),
            None,
            "claim released on close"
        );
        other.claim(ClaimType::ExclusiveWrite, "x").unwrap();
        assert!(other.is_writable());
        drop(other);
        drop(ro);
    });
}

#[test]
fn unregister_sends_remove_and_waits_for_close() {
    run_on_reactor(0x1, || async {
        mk("R", 64);
        let desc: Rc<RefCell<Option<Desc>>> = Rc::new(RefCell::new(None));
        let seen = Arc::new(AtomicBool::new(false));
        let s2 = seen.clone();
        let d = open("R", false, move |ev| {
            assert_eq!(ev, BdevEvent::Remove);
            s2.store(true, Ordering::SeqCst);
        })
        .unwrap();
        *desc.borrow_mut() = Some(d);
        let d2 = desc.clone();
        reactor::spawn_local(async move {
            reactor::sleep(std::time::Duration::from_millis(20)).await;
            d2.borrow_mut().take();
        });
        unregister("R").await.unwrap();
        assert!(seen.load(Ordering::SeqCst));
        assert!(get("R").is_none());
        assert!(matches!(unregister("R").await, Err(BdevError::NotFound(_))));
    });
}

use std::cell::RefCell;
use std::rc::Rc;

#[test]
fn qos_limits_iops() {
    let (n, elapsed_ms) = run_on_reactor(0x1, || async {
        let b = mk("Q", 1024);
        b.set_qos_limits(QosLimits {
            rw_ios_per_sec: 1000,
            ..Default::default()
        });
        let (_desc, ch) = open_ch("Q", false);
        let t0 = reactor::now_ns();
        let mut n = 0;
        for i in 0..50 {
            util::read(&ch, i, 1).await.unwrap();
            n += 1;
        }
        (n, (reactor::now_ns() - t0) / 1_000_000)
    });
    assert_eq!(n, 50);
    // 50 I/Os at 1000/s cannot finish in much under 49 ms.
    assert!(elapsed_ms >= 45, "QoS did not delay I/O: {elapsed_ms} ms");
}

#[test]
fn reset_completes_and_io_resumes() {
    run_on_reactor(0x1, || async {
        mk("Z", 64);
        let (desc, ch) = open_ch("Z", true);
        util::simple(&ch, IoType::Reset, 0, 0).await.unwrap();
        util::write(&ch, 0, pattern(512, 1), false).await.unwrap();
        assert!(!desc.bdev().reset_in_progress.load(Ordering::SeqCst));
    });
}

#[test]
fn channels_on_two_reactors() {
    if !two_cores() {
        return;
    }
    run_on_reactor(0x3, || async {
        mk("X", 256);
        let desc = Arc::new(open("X", true, |_| {}).unwrap());
        write_there_read_here(&desc, 16, 512, false).await;
        assert_eq!(desc.bdev().iostat().write.ops, 1);
    });
}

// ---------------------------------------------------------------------------
// Descriptor reuse and in-place forwarding through stacked bdevs

use crate::modules::{delay, error};

#[test]
fn descriptors_are_recycled_clean() {
    run_on_reactor(0x1, || async {
        fn nop(io: Box<BdevIo>) {
            io.free();
        }
        let mut a = BdevIo::with_fn(IoType::Read, 1, 2, Some(DmaBuf::new(512)), nop, None, 7);
        a.fua = true;
        a.driver_ctx = 99;
        a.status = IoStatus::Failed;
        let p = &*a as *const BdevIo;
        a.free();
        let b = BdevIo::with_fn(IoType::Write, 3, 4, None, nop, None, 8);
        assert_eq!(&*b as *const BdevIo, p, "the freed descriptor is reused");
        assert_eq!(
            (b.io_type, b.offset_blocks, b.num_blocks),
            (IoType::Write, 3, 4)
        );
        assert!(b.buf.is_none() && b.cb_arg.is_none() && !b.fua);
        assert_eq!(
            (b.cb_ctx, b.driver_ctx, b.status),
            (8, 0, IoStatus::Pending)
        );
        assert!(!b.in_flight());

        // A descriptor still in flight never goes back to the cache (debug
        // builds stop at it: see freeing_in_flight_io_is_caught).
        let before = crate::io::cache_len();
        if !cfg!(debug_assertions) {
            let mut c = BdevIo::with_fn(IoType::Read, 0, 1, None, nop, None, 0);
            c.depth = 1;
            c.free();
            assert_eq!(crate::io::cache_len(), before, "in-flight I/O was recycled");
        }
        b.free();
        assert_eq!(crate::io::cache_len(), before + 1);
    });
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "reused while in flight")]
fn freeing_in_flight_io_is_caught() {
    fn nop(_io: Box<BdevIo>) {}
    let mut io = BdevIo::with_fn(IoType::Read, 0, 1, None, nop, None, 0);
    io.depth = 1;
    io.free();
}

/// What the I/Os of one stack test saw: completions per I/O, and statuses.
#[derive(Default)]
struct Seen {
    count: Vec<u32>,
    status: Vec<Option<IoStatus>>,
    bufs: Vec<Option<DmaBuf>>,
    done: usize,
}

fn seen_done(mut io: Box<BdevIo>) {
    let seen = io
        .cb_arg
        .take()
        .and_then(|a| a.downcast::<RefCell<Seen>>().ok());
    let seen = seen.expect("stack test I/O carries its tally");
    let i = io.cb_ctx as usize;
    let mut s = seen.borrow_mut();
    s.count[i] += 1;
    s.status[i] = Some(io.status);
    s.bufs[i] = io.buf.take();
    s.done += 1;
    drop(s);
    io.free();
}

/// Submit one I/O per block `0..n` (all at once) and wait for them.
async fn run_all(ch: &IoChannel, ty: IoType, n: usize, fill: bool) -> Seen {
    let seen = Rc::new(RefCell::new(Seen {
        count: vec![0; n],
        status: vec![None; n],
        bufs: (0..n).map(|_| None).collect(),
        done: 0,
    }));
    for i in 0..n {
        let buf = if fill {
            pattern(512, i as u8)
        } else {
            DmaBuf::new(512)
        };
        let arg: Rc<dyn std::any::Any> = seen.clone();
        ch.submit(BdevIo::with_fn(
            ty,
            i as u64,
            1,
            Some(buf),
            seen_done,
            Some(arg),
            i as u64,
        ));
    }
    while seen.borrow().done < n {
        reactor::sleep(std::time::Duration::from_millis(1)).await;
    }
    // Late double completions would land here.
    reactor::sleep(std::time::Duration::from_millis(20)).await;
    let Ok(seen) = Rc::try_unwrap(seen) else {
        panic!("tally still shared");
    };
    seen.into_inner()
}

fn delay0(name: &str, base: &str, us: u64) -> Arc<Bdev> {
    delay::create(delay::CreateParams {
        name: name.into(),
        base_bdev_name: base.into(),
        avg_read_latency: us,
        p99_read_latency: us,
        avg_write_latency: us,
        p99_write_latency: us,
        uuid: None,
    })
    .unwrap()
}

/// delay (held) over delay (0) over error over malloc: every I/O, handed
/// down in place and back, completes exactly once, with failures and NOMEM
/// retries injected at the error level; data and per-level iostat hold.
#[test]
fn forwarded_io_completes_exactly_once_through_a_stack() {
    run_on_reactor(0x1, || async {
        const N: usize = 600;
        let m = mk("FM", N as u64);
        let ee = error::create("FM", None).unwrap();
        delay0("FD1", "EE_FM", 0);
        let top = delay0("FD2", "FD1", 50);
        let inject =
            |io_type, error_type, num| error::InjectParams::new("EE_FM", io_type, error_type, num);
        error::inject_error(&inject(
            error::InjectIoType::Write,
            error::ErrorType::NoMem,
            25,
        ))
        .unwrap();
        let (_desc, ch) = open_ch("FD2", true);

        let w = run_all(&ch, IoType::Write, N, true).await;
        assert!(
            w.count.iter().all(|&c| c == 1),
            "a write completed twice or never"
        );
        assert!(
            w.status.iter().all(|s| *s == Some(IoStatus::Success)),
            "NOMEM is retried"
        );

        error::inject_error(&inject(
            error::InjectIoType::Read,
            error::ErrorType::Failure,
            30,
        ))
        .unwrap();
        let r = run_all(&ch, IoType::Read, N, false).await;
        assert!(
            r.count.iter().all(|&c| c == 1),
            "a read completed twice or never"
        );
        let failed = r
            .status
            .iter()
            .filter(|s| **s == Some(IoStatus::Failed))
            .count();
        assert_eq!(failed, 30, "exactly the injected reads fail");
        for i in 0..N {
            if r.status[i] == Some(IoStatus::Success) {
                let got = r.bufs[i].as_ref().expect("a read gives its buffer back");
                assert_eq!(
                    got.as_slice(),
                    pattern(512, i as u8).as_slice(),
                    "block {i}"
                );
            }
        }
        // Each level counted what reached it.
        assert_eq!(top.iostat().write.ops, N as u64);
        assert_eq!(top.iostat().read.ops, (N - 30) as u64);
        assert_eq!(m.iostat().write.ops, N as u64);
        assert_eq!(m.iostat().read.ops, (N - 30) as u64);
        assert_eq!(ee.iostat().io_errors(), vec![("failed", 30)]);
    });
}

/// Past the levels a descriptor forwards through in place, a child I/O
/// carries it down: still exactly once, with its data.
#[test]
fn deep_stacks_fall_back_to_child_io() {
    run_on_reactor(0x1, || async {
        const N: usize = 64;
        mk("DS0", N as u64);
        let mut below = "DS0".to_string();
        for i in 1..=7 {
            let name = format!("DS{i}");
            delay0(&name, &below, if i == 3 { 20 } else { 0 });
            below = name;
        }
        let desc = open(&below, true, |_| {}).unwrap();
        let ch = desc.channel();
        let w = run_all(&ch, IoType::Write, N, true).await;
        assert!(w.count.iter().all(|&c| c == 1));
        assert!(w.status.iter().all(|s| *s == Some(IoStatus::Success)));
        let r = run_all(&ch, IoType::Read, N, false).await;
        assert!(r.count.iter().all(|&c| c == 1));
        for i in 0..N {
            assert_eq!(r.status[i], Some(IoStatus::Success));
            let got = r.bufs[i].as_ref().unwrap();
            assert_eq!(
                got.as_slice(),
                pattern(512, i as u8).as_slice(),
                "block {i}"
            );
        }
        let ds0 = get("DS0").unwrap();
        assert_eq!(ds0.iostat().read.ops, N as u64);
    });
}

/// An inline completion reaches its submitter in a later loop iteration,
/// never the one it was submitted in: a callback that resubmits cannot
/// starve the loop, and latencies on the iteration's clock are never 0.
/// (Two drains used to be queued into one iteration.)
#[test]
fn inline_completions_come_back_a_loop_iteration_later() {
    let same = run_on_reactor(0x1, || async {
        struct Chain {
            left: std::cell::Cell<u32>,
            same_tick: std::cell::Cell<u32>,
            ch: IoChannel,
        }
        fn again(mut io: Box<BdevIo>) {
            let arg = io.cb_arg.take().expect("chain");
            let Ok(c) = arg.clone().downcast::<Chain>() else {
                panic!("the chain's I/O carries the chain");
            };
            if reactor::tick_ns() == io.cb_ctx {
                c.same_tick.set(c.same_tick.get() + 1);
            }
            if c.left.get() == 0 {
                return io.free();
            }
            c.left.set(c.left.get() - 1);
            io.cb_arg = Some(arg);
            io.cb_ctx = reactor::tick_ns();
            c.ch.submit(io);
        }
        mk("IC", 64);
        let desc = open("IC", true, |_| {}).unwrap();
        let chain = Rc::new(Chain {
            left: std::cell::Cell::new(500),
            same_tick: std::cell::Cell::new(0),
            ch: desc.channel(),
        });
        let arg: Rc<dyn std::any::Any> = chain.clone();
        let io = BdevIo::with_fn(
            IoType::Read,
            0,
            1,
            Some(DmaBuf::new(512)),
            again,
            Some(arg),
            reactor::tick_ns(),
        );
        chain.ch.submit(io);
        while chain.left.get() > 0 {
            reactor::sleep(std::time::Duration::from_millis(1)).await;
        }
        chain.same_tick.get()
    });
    assert_eq!(
        same, 0,
        "completions came back in the iteration of their submit"
    );
}
