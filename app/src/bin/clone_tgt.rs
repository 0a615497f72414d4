//! `clone_tgt`: the storage target, driven like SPDK's `spdk_tgt`.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "clone_tgt",
    version,
    about = "Polled-mode storage target with the clone bdev; JSON-RPC compatible with SPDK's rpc.py"
)]
struct Cli {
    #[command(flatten)]
    common: app::CommonOpts,
    /// JSON-RPC Unix socket path
    #[arg(short = 'r', long = "rpc-socket", default_value = app::DEFAULT_RPC_SOCKET)]
    rpc_socket: PathBuf,
    /// Do not start the JSON-RPC server
    #[arg(long = "no-rpc-server")]
    no_rpc_server: bool,
    /// Wait for framework_start_init before initialising subsystems
    #[arg(long = "wait-for-rpc")]
    wait_for_rpc: bool,
}

fn main() {
    let cli = Cli::parse();
    let spec = app::AppSpec {
        common: cli.common,
        rpc_socket: (!cli.no_rpc_server).then_some(cli.rpc_socket),
        wait_for_rpc: cli.wait_for_rpc,
    };
    app::exit_with("clone_tgt", app::run(spec, None));
}
