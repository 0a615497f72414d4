//! Generic-layer tests on malloc bdevs, on a real reactor runtime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use reactor::DmaBuf;

use crate::modules::malloc;
use crate::util::{self, run_on_reactor};
use crate::*;

fn mk(name: &str, blocks: u64) -> Arc<Bdev> {
    malloc::create(malloc::CreateParams::new(name, 512, blocks)).unwrap()
}

fn pattern(len: usize, seed: u8) -> DmaBuf {
    let mut b = DmaBuf::new(len);
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    b
}

#[test]
fn read_write_roundtrip_and_bounds() {
    run_on_reactor(0x1, || async {
        mk("M0", 1024);
        let desc = open("M0", true, |_| {}).unwrap();
        let ch = desc.channel();
        let w = pattern(4096, 7);
        let expect = w.as_slice().to_vec();
        util::write(&ch, 8, w, false).await.unwrap();
        let r = util::read(&ch, 8, 8).await.unwrap();
        assert_eq!(r.as_slice(), &expect[..]);
        // Fresh malloc memory reads as zeroes.
        assert!(util::read(&ch, 100, 1)
            .await
            .unwrap()
            .as_slice()
            .iter()
            .all(|&b| b == 0));
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

        let ro = open("A", false, |_| {}).unwrap();
        let ch = ro.channel();
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
        let desc = open("Q", false, |_| {}).unwrap();
        let ch = desc.channel();
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
        let desc = open("Z", true, |_| {}).unwrap();
        let ch = desc.channel();
        util::simple(&ch, IoType::Reset, 0, 0).await.unwrap();
        util::write(&ch, 0, pattern(512, 1), false).await.unwrap();
        assert!(!desc.bdev().reset_in_progress.load(Ordering::SeqCst));
    });
}

#[test]
fn channels_on_two_reactors() {
    if std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        < 2
    {
        return;
    }
    run_on_reactor(0x3, || async {
        mk("X", 256);
        let desc = Arc::new(open("X", true, |_| {}).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let d1 = desc.clone();
        reactor::spawn_on(1, move || async move {
            let ch = d1.channel();
            util::write(&ch, 16, pattern(512, 9), false).await.unwrap();
            tx.send(reactor::current()).unwrap();
        });
        loop {
            if let Ok(r) = rx.try_recv() {
                assert_eq!(r, Some(1));
                break;
            }
            reactor::sleep(std::time::Duration::from_millis(1)).await;
        }
        let ch = desc.channel();
        let r = util::read(&ch, 16, 1).await.unwrap();
        assert_eq!(r.as_slice(), pattern(512, 9).as_slice());
        assert_eq!(desc.bdev().iostat().write.ops, 1);
        drop(ch);
        drop(desc);
    });
}
