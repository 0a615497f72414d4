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
