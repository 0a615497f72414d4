//! A minimal server for trying clients (e.g. `spdk-rpc -s <path> ...`)
//! against this crate alone: builtins, one demo subsystem and two demo
//! methods. Runs until SIGINT or SIGTERM.
//!
//! `cargo run -p rpc --example serve -- /tmp/demo.sock`

use nix::sys::signal::{SigSet, Signal};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Echo {
    name: String,
    #[serde(default)]
    upper: bool,
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/var/tmp/spdk.sock".to_string());

    // Block the signals before any thread starts so that all inherit the
    // mask and only the sigwait below receives them.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    if let Err(e) = sigs.thread_block() {
        eprintln!("cannot block signals: {e}");
        std::process::exit(1);
    }

    rpc::register_builtin_methods();
    rpc::register_subsystem("demo", &[], || {
        vec![json!({"method": "demo_echo", "params": {"name": "saved"}})]
    });
    rpc::register_typed(
        "demo_echo",
        rpc::RUNTIME,
        rpc::DecodeError::Internal,
        |p: Echo| async move {
            Ok(if p.upper {
                p.name.to_uppercase()
            } else {
                p.name
            })
        },
    );
    rpc::register("demo_missing", rpc::RUNTIME, |_| {
        Box::pin(async { Err(rpc::RpcError::errno(libc::ENODEV)) })
    });
    rpc::set_state(rpc::RUNTIME);

    let cfg = reactor::Config {
        core_mask: 1,
        interrupt_mode: true,
        mem_size_mb: 8,
        no_huge: true,
        uring_entries: 64,
    };
    let rt = match reactor::start(cfg, || {}) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start reactors: {e}");
            std::process::exit(1);
        }
    };
    let server = match rpc::Server::listen(std::path::Path::new(&path)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            reactor::stop();
            rt.join();
            std::process::exit(1);
        }
    };
    println!("listening on {path}");
    let _ = sigs.wait();
    server.shutdown();
    reactor::stop();
    rt.join();
}
