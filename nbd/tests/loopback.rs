//! The NBD client and server against each other in one process, on two
//! reactors: the client bdev (two connections, one per reactor) reads,
//! writes, flushes and asks for block status through the server; then the
//! client's state machine: the export goes away (I/O waits, then fails fast
//! with EIO), comes back (the client reconnects and I/O works again).

use std::time::Duration;

use bdev::util;
use reactor::DmaBuf;
use serde_json::json;

async fn call(m: &str, p: serde_json::Value) -> Result<serde_json::Value, String> {
    ::rpc::call(m, Some(p))
        .await
        .map_err(|e| format!("{m}: {e}"))
}

#[test]
fn client_against_server_and_reconnect() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let dir = std::env::temp_dir().join(format!("nbd-loopback-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let sock = dir.join("s.sock");
    let sock2 = sock.clone();
    let r: Result<(), String> = util::run_on_reactor(0x3, move || async move {
        nbd::register_methods();
        ::rpc::set_state(::rpc::RUNTIME);
        bdev::modules::malloc::create(bdev::modules::malloc::CreateParams::new("M", 512, 8192))
            .map_err(|e| e.to_string())?;
        bdev::modules::null::create(bdev::modules::null::CreateParams::new("Z", 512, 8192))
            .map_err(|e| e.to_string())?;
        call("nbd_server_start", json!({"listen": sock2.to_str()})).await?;
        call(
            "nbd_export_add",
            json!({"bdev_name": "M", "writable": true}),
        )
        .await?;
        call("nbd_export_add", json!({"bdev_name": "Z"})).await?;
        let uri = |e: &str| format!("nbd+unix:///{e}?socket={}", sock2.display());
        call(
            "bdev_nbd_create",
            json!({"name": "N", "uri": uri("M"), "connections": 2,
                   "reconnect_delay_ms": 20, "fast_io_fail_timeout_ms": 300}),
        )
        .await?;
        call("bdev_nbd_create", json!({"name": "NZ", "uri": uri("Z")})).await?;

        let n = bdev::open("N", true, |_| {}).map_err(|e| e.to_string())?;
        let m = bdev::open("M", false, |_| {}).map_err(|e| e.to_string())?;
        let (nch, mch) = (n.channel(), m.channel());
        // Writes of several sizes, a FUA one, through the client.
        for (i, (off, blocks)) in [(0u64, 1u64), (7, 9), (100, 2048)].into_iter().enumerate() {
            let mut b = DmaBuf::new((blocks * 512) as usize);
            for (j, x) in b.as_mut_slice().iter_mut().enumerate() {
                *x = (j as u8).wrapping_mul(31).wrapping_add(i as u8 + 1);
            }
            let want = b.as_slice().to_vec();
            util::write(&nch, off, b, i == 1)
                .await
                .map_err(|s| format!("write: {s:?}"))?;
            let direct = util::read(&mch, off, blocks)
                .await
                .map_err(|s| format!("{s:?}"))?;
            assert_eq!(direct.as_slice(), &want[..], "server side of write {i}");
            let back = util::read(&nch, off, blocks)
                .await
                .map_err(|s| format!("{s:?}"))?;
            assert_eq!(back.as_slice(), &want[..], "client read of write {i}");
        }
        let io = util::submit(&nch, bdev::IoType::Flush, 0, 8192, None, false).await;
        assert!(io.status.is_success());
        // Block status: the null export is all holes, malloc all data.
        let z = bdev::open("NZ", false, |_| {}).map_err(|e| e.to_string())?;
        let zch = z.channel();
        assert!(z.bdev().has_block_status());
        let st = util::block_status(&zch, 10, 100)
            .await
            .map_err(|s| format!("{s:?}"))?;
        assert_eq!(st, vec![bdev::BlockExtent::hole(100)]);
        let st = util::block_status(&nch, 0, 8192)
            .await
            .map_err(|s| format!("{s:?}"))?;
        assert_eq!(st, vec![bdev::BlockExtent::data(8192)]);
        drop(zch);
        drop(z);

        // The export goes: I/O waits for the reconnect, then fails fast.
        call("nbd_export_remove", json!({"name": "M"})).await?;
        let t0 = reactor::now_ns();
        let r = util::read(&nch, 0, 1).await;
        assert!(r.is_err(), "read with the export gone");
        let waited = Duration::from_nanos(reactor::now_ns() - t0);
        assert!(waited < Duration::from_secs(20), "failed after {waited:?}");
        // Fast-fail: the next one fails without waiting for a reconnect.
        assert!(util::read(&nch, 0, 1).await.is_err());
        // It comes back: the client reconnects and the data is there.
        call(
            "nbd_export_add",
            json!({"bdev_name": "M", "writable": true}),
        )
        .await?;
        let mut ok = false;
        for _ in 0..500 {
            if let Ok(b) = util::read(&nch, 0, 1).await {
                assert_eq!(b.as_slice()[1], 31u8.wrapping_add(1));
                ok = true;
                break;
            }
            reactor::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok, "the client did not come back");
        drop((nch, mch, n, m));
        call("bdev_nbd_delete", json!({"name": "N"})).await?;
        call("bdev_nbd_delete", json!({"name": "NZ"})).await?;
        nbd::shutdown().await;
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    r.unwrap();
}
