//! The application framework shared by `clone_tgt` and `bdevperf`, after
//! SPDK's `lib/event/app.c`: start reactors, register every module's RPC
//! methods, serve JSON-RPC, load `--json` in two passes, handle signals and
//! `spdk_kill_instance`, and shut down cleanly (stop new work, drain, flush,
//! unregister bdevs newest first, remove the socket and its lock).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use clap::Args;
use rpc::{register_typed, DecodeError, RpcError, RUNTIME, STARTUP};
use serde::Deserialize;

/// `SPDK_DEFAULT_RPC_ADDR`.
pub const DEFAULT_RPC_SOCKET: &str = "/var/tmp/spdk.sock";
/// How long a clean shutdown waits for replies to requests already received.
const RPC_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("invalid core mask '{0}': expected a hex mask (0x3) or a core list ([0,2-3])")]
    BadMask(String),
    #[error(transparent)]
    Reactor(#[from] reactor::Error),
}

/// Flags every app takes, named as in SPDK's `spdk_app_opts`.
#[derive(Args, Debug, Clone)]
pub struct CommonOpts {
    /// Core mask for reactors: hex (0x3) or a list ([0,2-3])
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    pub cpumask: String,
    /// JSON config file to load at start (SPDK's two passes)
    #[arg(short = 'c', long = "json", alias = "config")]
    pub json: Option<PathBuf>,
    /// Keep going when a method in the --json config fails
    #[arg(long = "json-ignore-init-errors")]
    pub json_ignore_init_errors: bool,
    /// Sleep when idle instead of busy-polling (small machines, tests)
    #[arg(long = "interrupt-mode")]
    pub interrupt_mode: bool,
    /// Do not use hugepages for DMA buffers
    #[arg(long = "no-huge")]
    pub no_huge: bool,
    /// DMA buffer pool size in MiB
    #[arg(short = 's', long = "mem-size", default_value_t = 256)]
    pub mem_size: usize,
    /// Log level filter (error, warn, info, debug, trace); RUST_LOG also works
    #[arg(long = "log-level", default_value = "info")]
    pub log_level: String,
    /// Let this group (name or gid) use the RPC socket: mode 0660 with that
    /// owner group instead of the default owner-only 0600
    #[arg(long = "rpc-socket-group", value_name = "GROUP")]
    pub rpc_socket_group: Option<String>,
}

/// The gid of `--rpc-socket-group`: a group name, or a number.
fn resolve_group(g: &str) -> Result<u32, String> {
    match nix::unistd::Group::from_name(g) {
        Ok(Some(grp)) => Ok(grp.gid.as_raw()),
        Ok(None) => g
            .parse::<u32>()
            .map_err(|_| format!("--rpc-socket-group {g:?}: no such group")),
        Err(e) => Err(format!("--rpc-socket-group {g:?}: cannot look it up: {e}")),
    }
}

/// Parse SPDK's `-m`: `0x3`, `3` (hex) or `[0,2-3]`.
pub fn parse_core_mask(s: &str) -> Result<u64, AppError> {
    let bad = || AppError::BadMask(s.to_string());
    let t = s.trim();
    if let Some(list) = t.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        let mut mask = 0u64;
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let a: u32 = a.parse().map_err(|_| bad())?;
            let b: u32 = b.parse().map_err(|_| bad())?;
            if a > b || b >= 64 {
                return Err(bad());
            }
            for c in a..=b {
                mask |= 1 << c;
            }
        }
        return if mask == 0 { Err(bad()) } else { Ok(mask) };
    }
    let hex = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    match u64::from_str_radix(hex, 16) {
        Ok(0) | Err(_) => Err(bad()),
        Ok(m) => Ok(m),
    }
}

pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

static SHUTDOWN: AtomicBool = AtomicBool::new(false);
static SHUTDOWN_WAKER: Mutex<Option<Waker>> = Mutex::new(None);
static EXIT_CODE: AtomicI32 = AtomicI32::new(0);

/// Begin a clean shutdown (any thread).
pub fn request_shutdown() {
    SHUTDOWN.store(true, Ordering::SeqCst);
    if let Some(w) = reactor::sync::lock(&SHUTDOWN_WAKER).take() {
        w.wake();
    }
}

pub fn shutdown_requested() -> bool {
    SHUTDOWN.load(Ordering::SeqCst)
}

/// Resolves once a shutdown was requested.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    struct S;
    impl Future for S {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let mut w = reactor::sync::lock(&SHUTDOWN_WAKER);
            if SHUTDOWN.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *w = Some(cx.waker().clone());
            Poll::Pending
        }
    }
    S
}

static INIT_DONE: AtomicBool = AtomicBool::new(false);

/// Initialise subsystems and enter RUNTIME (`framework_start_init`).
async fn subsystem_init() -> Result<(), String> {
    if INIT_DONE.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    rpc::set_state(RUNTIME);
    tracing::info!("subsystems initialised; RPC state RUNTIME");
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillParams {
    sig_name: String,
}

fn signal_by_name(name: &str) -> Option<nix::sys::signal::Signal> {
    use nix::sys::signal::Signal::*;
    Some(match name {
        "SIGINT" => SIGINT,
        "SIGTERM" => SIGTERM,
        "SIGQUIT" => SIGQUIT,
        "SIGHUP" => SIGHUP,
        "SIGKILL" => SIGKILL,
        "SIGUSR1" => SIGUSR1,
        _ => return None,
    })
}

/// Methods the framework itself owns.
fn register_framework_methods() {
    rpc::register("framework_start_init", STARTUP, |params| {
        Box::pin(async move {
            if params.is_some() {
                return Err(RpcError::invalid_params(
                    "framework_start_init requires no parameters",
                ));
            }
            subsystem_init()
                .await
                .map_err(|_| RpcError::internal("framework_initialization failed"))?;
            Ok(serde_json::Value::Bool(true))
        })
    });
    rpc::register("framework_wait_init", STARTUP | RUNTIME, |params| {
        Box::pin(async move {
            if params.is_some() {
                return Err(RpcError::invalid_params(
                    "framework_wait_init requires no parameters",
                ));
            }
            while rpc::state() != RUNTIME {
                reactor::sleep(Duration::from_millis(5)).await;
            }
            Ok(serde_json::Value::Bool(true))
        })
    });
    register_typed(
        "spdk_kill_instance",
        RUNTIME,
        DecodeError::Internal,
        |p: KillParams| async move {
            let sig = signal_by_name(&p.sig_name)
                .ok_or_else(|| RpcError::invalid_params("Invalid parameters"))?;
            // Reply first, as SPDK does, then deliver the signal.
            reactor::set_timer(Duration::from_millis(20), move || {
                tracing::info!(signal = %sig, "spdk_kill_instance");
                if matches!(
                    sig,
                    nix::sys::signal::Signal::SIGINT | nix::sys::signal::Signal::SIGTERM
                ) {
                    request_shutdown();
                } else {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), sig);
                }
            });
            Ok(true)
        },
    );
}

/// Register every RPC method of the framework and of the modules linked in.
pub fn register_all_methods() {
    rpc::register_builtin_methods();
    register_framework_methods();
    bdev::rpc::register_methods();
    bdev::modules::register_methods();
    bdev_clone::register_rpcs();
    nvmf::register_methods();
    nvmf::host::register_methods();
    nbd::register_methods();
}

/// Block SIGINT/SIGTERM in every thread and handle them on one thread
/// (async-signal-safe by construction: no handler runs in signal context).
fn install_signal_thread() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    if let Err(e) = set.thread_block() {
        tracing::warn!(error = %e, "cannot block signals; Ctrl-C will not shut down cleanly");
        return;
    }
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(sig) => {
                    if shutdown_requested() {
                        tracing::warn!(signal = %sig, "second signal: exiting at once");
                        std::process::exit(1);
                    }
                    tracing::info!(signal = %sig, "shutting down");
                    request_shutdown();
                }
                Err(_) => continue,
            }
        });
}

/// How an app runs once the framework is up.
pub struct AppSpec {
    pub common: CommonOpts,
    /// Serve JSON-RPC on this socket (None: no RPC server).
    pub rpc_socket: Option<PathBuf>,
    /// Stay in STARTUP until `framework_start_init`.
    pub wait_for_rpc: bool,
}

/// What a tool runs once the framework is up (see [`main_fn`]).
pub type MainFn = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = i32>>> + Send>;

/// Box `f`, which makes the future a tool runs on the app reactor, as a
/// [`MainFn`].
pub fn main_fn<F, Fut>(f: F) -> MainFn
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = i32> + 'static,
{
    Box::new(move || Box::pin(f()))
}

/// End a binary with what [`run`] returned: its exit code, or exit 1 after
/// printing `prog: error` when the app could not start.
pub fn exit_with(prog: &str, result: Result<i32, AppError>) -> ! {
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("{prog}: {e}");
            std::process::exit(1);
        }
    }
}

/// Run the app: reactors, RPC, config, then `main` (None: serve until a
/// signal or `spdk_kill_instance`). Returns the process exit code.
pub fn run(spec: AppSpec, main: Option<MainFn>) -> Result<i32, AppError> {
    init_logging(&spec.common.log_level);
    let mask = parse_core_mask(&spec.common.cpumask)?;
    install_signal_thread();
    let cfg = reactor::Config {
        core_mask: mask,
        interrupt_mode: spec.common.interrupt_mode,
        mem_size_mb: spec.common.mem_size,
        no_huge: spec.common.no_huge,
        uring_entries: 1024,
    };
    let rt = reactor::start(cfg, move || {
        reactor::spawn_local(async move {
            let code = app_main(spec, main).await;
            EXIT_CODE.store(code, Ordering::SeqCst);
            reactor::stop();
        });
    })?;
    rt.join();
    Ok(EXIT_CODE.load(Ordering::SeqCst))
}

async fn app_main(spec: AppSpec, main: Option<MainFn>) -> i32 {
    register_all_methods();
    rpc::set_state(STARTUP);
    let group = match spec.common.rpc_socket_group.as_deref().map(resolve_group) {
        None => None,
        Some(Ok(gid)) => Some(gid),
        Some(Err(e)) => {
            tracing::error!("{e}");
            return 1;
        }
    };
    let server = match &spec.rpc_socket {
        Some(path) => match rpc::Server::listen_with_group(path, group) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the RPC server");
                return 1;
            }
        },
        None => None,
    };

    let mut code = 0;
    if let Some(path) = &spec.common.json {
        match std::fs::read_to_string(path) {
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read --json config");
                code = 1;
            }
            Ok(text) => {
                if let Err(e) = rpc::load_json_config(
                    &text,
                    spec.common.json_ignore_init_errors,
                    subsystem_init(),
                )
                .await
                {
                    tracing::error!(path = %path.display(), error = %e, "loading --json config failed");
                    code = 1;
                }
            }
        }
    } else if !spec.wait_for_rpc {
        let _ = subsystem_init().await;
    } else {
        tracing::info!("waiting for framework_start_init (--wait-for-rpc)");
    }

    if code == 0 {
        code = match main {
            Some(m) => {
                let fut = m();
                fut.await
            }
            None => {
                tracing::info!("clone_tgt started");
                shutdown_signal().await;
                0
            }
        };
    }

    // Clean shutdown: no new RPCs, then bdevs newest first (each flushes
    // and releases its bases), then the socket and its lock go.
    if let Some(s) = server {
        s.drain(RPC_DRAIN_TIMEOUT).await;
        s.shutdown();
    }
    nvmf::shutdown();
    // NBD clients go, and the exported bdevs are released, before the
    // bdevs are unregistered.
    nbd::shutdown().await;
    bdev::unregister_all().await;
    nvmf::host::shutdown().await;
    tracing::info!("shutdown complete");
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_masks() {
        assert_eq!(parse_core_mask("0x3").unwrap(), 3);
        assert_eq!(parse_core_mask("3").unwrap(), 3);
        assert_eq!(parse_core_mask("[0,2-3]").unwrap(), 0b1101);
        assert!(parse_core_mask("0x0").is_err());
        assert!(parse_core_mask("zz").is_err());
        assert!(parse_core_mask("[3-1]").is_err());
        assert!(parse_core_mask("[64]").is_err());
    }
}
