//! `bdevperf`: drive bdevs with a fixed queue depth and report IOPS,
//! bandwidth and latency, as SPDK's `examples/bdev/bdevperf`.
//!
//! Flow (SPDK's): load the `--json` config, make one job per target bdev
//! (bdev i on reactor i % reactors; with `-C` one per reactor per bdev over
//! a slice of it), open each bdev on the app reactor, start every job on its
//! reactor, wait until all have drained, print the table, return the exit
//! code; the framework then unregisters the bdevs and stops.

#[path = "bdevperf/histogram.rs"]
mod histogram;
#[path = "bdevperf/job.rs"]
mod job;
#[cfg(test)]
#[path = "bdevperf/job_tests.rs"]
mod job_tests;
#[path = "bdevperf/pattern.rs"]
mod pattern;
#[path = "bdevperf/report.rs"]
mod report;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use clap::{Parser, ValueEnum};

use job::{JobParams, JobResult, Mode};

/// Refuse jobs whose preallocated buffers would exceed this (per job).
const MAX_JOB_BUFFER_BYTES: u64 = 4 << 30;
const MAX_QUEUE_DEPTH: u32 = 1 << 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    Read,
    Write,
    Randread,
    Randwrite,
    Rw,
    Randrw,
    Verify,
    Flush,
    Unmap,
    #[value(name = "write_zeroes")]
    WriteZeroes,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::Randread => "randread",
            Workload::Randwrite => "randwrite",
            Workload::Rw => "rw",
            Workload::Randrw => "randrw",
            Workload::Verify => "verify",
            Workload::Flush => "flush",
            Workload::Unmap => "unmap",
            Workload::WriteZeroes => "write_zeroes",
        }
    }

    fn is_mix(self) -> bool {
        matches!(self, Workload::Rw | Workload::Randrw)
    }

    fn is_random(self) -> bool {
        matches!(
            self,
            Workload::Randread | Workload::Randwrite | Workload::Randrw
        )
    }
}

const AFTER_HELP: &str = "\
Results: IOPS and MiB/s count successful I/Os; Fail/s counts failed ones and verify \
miscompares. TO/s is always 0: I/O timeouts (SPDK's -k) are not implemented. For verify, \
one I/O is a write of a pattern plus its read-back, and its latency spans both.

Exit status: 0 when every job ended without a failed I/O or miscompare, 1 otherwise \
(also on bad flags, no bdev to test, or an unknown -T bdev). SIGINT stops the run early \
and still prints the results.";

#[derive(Parser, Debug)]
#[command(
    name = "bdevperf",
    version,
    about = "Measure bdev performance: keep a queue depth of I/O in flight and report IOPS, MiB/s and latency",
    after_help = AFTER_HELP,
    // getopt semantics, as SPDK: a repeated flag takes the last value.
    args_override_self = true
)]
struct Cli {
    #[command(flatten)]
    common: app::CommonOpts,
    /// I/O queue depth per job
    #[arg(short = 'q', long = "queue-depth", required = true,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_QUEUE_DEPTH)))]
    queue_depth: u32,
    /// I/O size in bytes; k, m, g suffixes (binary) accepted, e.g. 4096, 4k, 128k, 1m
    #[arg(short = 'o', long = "io-size", required = true, value_parser = parse_io_size)]
    io_size: u64,
    /// I/O pattern
    #[arg(short = 'w', long = "workload", required = true, value_enum)]
    workload: Workload,
    /// rwmixread: percentage of reads, 0..=100 (required for rw and randrw)
    #[arg(short = 'M', long = "rwmixread", allow_negative_numbers = true)]
    rwmixread: Option<i64>,
    /// Run time in seconds
    #[arg(short = 't', long = "time", required = true,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    time: u64,
    /// Test only this bdev (default: every unclaimed bdev)
    #[arg(short = 'T', long = "bdev")]
    bdev: Option<String>,
    /// Every core of the mask runs a job on each bdev (each on its own slice)
    #[arg(short = 'C')]
    multithread: bool,
    /// Continue after failed I/Os and miscompares (default: a job stops at its first)
    #[arg(short = 'f', long = "continue-on-failure")]
    continue_on_failure: bool,
    /// Serve JSON-RPC on this Unix socket (default: no RPC server)
    #[arg(short = 'r', long = "rpc-socket")]
    rpc_socket: Option<PathBuf>,
    /// Latency percentiles per job after the table: -l summary, -ll also the histogram
    #[arg(short = 'l', action = clap::ArgAction::Count)]
    latency: u8,
}

/// SPDK's `spdk_parse_capacity`: a decimal number with an optional binary
/// suffix k/m/g (either case; a trailing "b" or "ib" is tolerated).
fn parse_io_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(format!(
            "invalid I/O size '{s}': expected e.g. 4096, 4k, 128k or 1m"
        ));
    }
    let (num, suffix) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("invalid I/O size '{s}'"))?;
    let lower = suffix.to_ascii_lowercase();
    let unit = match lower.trim_end_matches('b').trim_end_matches('i') {
        "" if lower.is_empty() => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return Err(format!("invalid I/O size '{s}': unknown suffix '{suffix}'")),
    };
    let v = n
        .checked_mul(unit)
        .filter(|&v| v <= i32::MAX as u64)
        .ok_or_else(|| format!("I/O size '{s}' is too large"))?;
    if v == 0 {
        return Err("I/O size must be greater than 0".into());
    }
    Ok(v)
}

/// Validated run settings (what SPDK's `verify_test_params` accepts).
#[derive(Clone, Debug)]
struct Config {
    queue_depth: u32,
    io_size: u64,
    workload: Workload,
    mode: Mode,
    time_s: u64,
    bdev: Option<String>,
    multithread: bool,
    continue_on_failure: bool,
    /// 0 off, 1 summary, 2 summary and histogram.
    latency: u8,
}

impl Config {
    /// Check the flags; `Ok` carries the config and warnings to print.
    fn from_cli(cli: &Cli) -> Result<(Config, Vec<String>), String> {
        let mut warnings = Vec::new();
        let w = cli.workload;
        let mode = if w.is_mix() {
            match cli.rwmixread {
                Some(m @ 0..=100) => Mode::Mixed { read_pct: m as u8 },
                _ => {
                    return Err(
                        "-M must be specified to value from 0 to 100 for rw or randrw.".into(),
                    )
                }
            }
        } else {
            if cli.rwmixread.is_some() {
                warnings.push(
                    "Ignoring -M option... Please use -M option only when using rw or randrw."
                        .into(),
                );
            }
            match w {
                Workload::Read | Workload::Randread => Mode::Mixed { read_pct: 100 },
                Workload::Write | Workload::Randwrite => Mode::Mixed { read_pct: 0 },
                Workload::Verify => Mode::Verify,
                Workload::Flush => Mode::Flush,
                Workload::Unmap => Mode::Unmap,
                Workload::WriteZeroes => Mode::WriteZeroes,
                Workload::Rw | Workload::Randrw => unreachable!("handled above"),
            }
        };
        if let Some(b) = &cli.bdev {
            if b.is_empty() {
                return Err("-T needs a bdev name".into());
            }
        }
        Ok((
            Config {
                queue_depth: cli.queue_depth,
                io_size: cli.io_size,
                workload: w,
                mode,
                time_s: cli.time,
                bdev: cli.bdev.clone(),
                multithread: cli.multithread,
                continue_on_failure: cli.continue_on_failure,
                latency: cli.latency.min(2),
            },
            warnings,
        ))
    }
}

/// One job to run: which bdev, where, on which slice.
struct Plan {
    bdev: String,
    reactor: u32,
    params: JobParams,
    /// -M value shown in the report for rw/randrw.
    read_pct: Option<u8>,
}

/// Counts finished jobs; the app task awaits it (wakers work across reactors).
#[derive(Default)]
struct Latch {
    remaining: AtomicUsize,
    waker: Mutex<Option<Waker>>,
}

impl Latch {
    fn count_down(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let w = reactor::sync::lock(&self.waker).take();
            if let Some(w) = w {
                w.wake();
            }
        }
    }

    fn wait(self: &Arc<Self>) -> impl Future<Output = ()> {
        struct Wait(Arc<Latch>);
        impl Future for Wait {
            type Output = ();
            fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                let mut w = reactor::sync::lock(&self.0.waker);
                if self.0.remaining.load(Ordering::Acquire) == 0 {
                    return Poll::Ready(());
                }
                *w = Some(cx.waker().clone());
                Poll::Pending
            }
        }
        Wait(self.clone())
    }
}

/// Resolve targets and lay out the jobs; errors are the messages to print.
fn plan_jobs(cfg: &Config, seed: u64) -> Result<Vec<Plan>, String> {
    let bdevs = match &cfg.bdev {
        Some(name) => match bdev::get(name) {
            Some(b) if !b.is_removing() => vec![b],
            _ => return Err(format!("Unable to find bdev '{name}'")),
        },
        // SPDK's spdk_for_each_bdev_leaf: bdevs nobody has claimed.
        None => bdev::list()
            .into_iter()
            .filter(|b| b.claim_type().is_none() && !b.is_removing())
            .collect(),
    };
    if bdevs.is_empty() {
        return Err(
            "No bdev to test: the --json config creates none, or all are claimed by other bdevs"
                .into(),
        );
    }
    let nr = reactor::num_reactors().max(1);
    let mut plans = Vec::new();
    for (i, b) in bdevs.iter().enumerate() {
        let bs = u64::from(b.block_size());
        if !cfg.io_size.is_multiple_of(bs) {
            return Err(format!(
                "IO size ({}) is not multiples of data block size of bdev {} ({})",
                cfg.io_size,
                b.name(),
                bs
            ));
        }
        if cfg.io_size > b.size_bytes() {
            return Err(format!(
                "IO size ({}) is larger than bdev {} ({} bytes)",
                cfg.io_size,
                b.name(),
                b.size_bytes()
            ));
        }
        if let Some(t) = cfg.mode.io_type() {
            if !b.io_type_supported(t) {
                return Err(format!("bdev {} does not support {}", b.name(), t.name()));
            }
        }
        let io_blocks = cfg.io_size / bs;
        let total_ios = b.num_blocks() / io_blocks;
        let placements: Vec<(u32, u64, u64)> = if cfg.multithread {
            let per = total_ios / u64::from(nr);
            if per == 0 {
                return Err(format!(
                    "bdev {} is too small for {} jobs of {} bytes (-C)",
                    b.name(),
                    nr,
                    cfg.io_size
                ));
            }
            (0..nr).map(|r| (r, u64::from(r) * per, per)).collect()
        } else {
            vec![((i as u32) % nr, 0, total_ios)]
        };
        for (reactor, ios_base, size_in_ios) in placements {
            let mut qd = cfg.queue_depth;
            if cfg.mode == Mode::Verify && u64::from(qd) > size_in_ios {
                eprintln!(
                    "Due to constraints of verify job, queue depth (-q, {qd}) can't exceed the number of IO \
                     requests which can be submitted to the bdev {} simultaneously ({size_in_ios}). \
                     Queue depth is limited to {size_in_ios}",
                    b.name()
                );
                qd = size_in_ios as u32;
            }
            if cfg.mode == Mode::Verify && !b.stores_data() {
                eprintln!(
                    "bdevperf: {} ({}) stores no data: verify checks that every write and \
                     read-back completes, and does not compare data",
                    b.name(),
                    b.product_name()
                );
            }
            let bufs = if cfg.mode == Mode::Verify { 2 } else { 1 };
            if cfg.mode.io_type().is_none()
                && u64::from(qd) * cfg.io_size * bufs > MAX_JOB_BUFFER_BYTES
            {
                return Err(format!(
                    "queue depth {qd} x IO size {} needs more than {} GiB of buffers per job",
                    cfg.io_size,
                    MAX_JOB_BUFFER_BYTES >> 30
                ));
            }
            let n = plans.len() as u64;
            plans.push(Plan {
                bdev: b.name().to_string(),
                reactor,
                read_pct: match cfg.mode {
                    Mode::Mixed { read_pct } if cfg.workload.is_mix() => Some(read_pct),
                    _ => None,
                },
                params: JobParams {
                    mode: cfg.mode,
                    random: cfg.workload.is_random(),
                    queue_depth: qd,
                    block_size: b.block_size(),
                    io_blocks,
                    ios_base,
                    size_in_ios,
                    duration_ns: cfg.time_s.saturating_mul(1_000_000_000),
                    continue_on_failure: cfg.continue_on_failure,
                    track_latency: cfg.latency > 0,
                    seed: pattern::mix64(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1,
                    compare_data: b.stores_data(),
                },
            });
        }
    }
    Ok(plans)
}

/// The app's main task, on reactor 0 once the config is loaded.
async fn bdevperf_main(cfg: Config) -> i32 {
    let plans = match plan_jobs(&cfg, pattern::seed(0)) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("bdevperf: {msg}");
            return 1;
        }
    };

    // Open every bdev first (on this, the app reactor), so a failure leaves
    // nothing running.
    let mut opened = Vec::with_capacity(plans.len());
    for plan in &plans {
        let removed = Arc::new(AtomicBool::new(false));
        let flag = removed.clone();
        let write = !plan.params.mode.read_only();
        match bdev::open(&plan.bdev, write, move |ev| {
            if ev == bdev::BdevEvent::Remove {
                flag.store(true, Ordering::Relaxed);
            }
        }) {
            Ok(desc) => opened.push((desc, removed)),
            Err(e) => {
                eprintln!("bdevperf: Could not open bdev {}: {e}", plan.bdev);
                return 1;
            }
        }
    }

    println!("Running I/O for {} seconds...", cfg.time_s);
    report::flush();

    let latch = Arc::new(Latch::default());
    latch.remaining.store(plans.len(), Ordering::Release);
    let results: Arc<Mutex<Vec<Option<JobResult>>>> =
        Arc::new(Mutex::new((0..plans.len()).map(|_| None).collect()));
    for (i, (plan, (desc, removed))) in plans.iter().zip(opened).enumerate() {
        let (name, params) = (plan.bdev.clone(), plan.params);
        let (results, latch) = (results.clone(), latch.clone());
        let done: job::DoneFn = Box::new(move |mut res: JobResult| {
            // Close at once on the app reactor, as SPDK's bdevperf_job_end,
            // so a bdev deleted mid-run need not wait for the other jobs.
            let desc = res.desc.take();
            reactor::send(0, move || drop(desc));
            reactor::sync::lock(&results)[i] = Some(res);
            latch.count_down();
        });
        reactor::send(plan.reactor, move || {
            job::start(name, desc, params, removed, done)
        });
    }
    latch.wait().await;

    let results: Vec<Option<JobResult>> = std::mem::take(&mut *reactor::sync::lock(&results));
    // Every job reported (the latch says so); pair before dropping Nones so
    // rows can never shift to the wrong plan.
    let done: Vec<(&Plan, &JobResult)> = plans
        .iter()
        .zip(&results)
        .filter_map(|(p, r)| r.as_ref().map(|r| (p, r)))
        .collect();
    let rows: Vec<report::Row> = done
        .iter()
        .map(|&(plan, r)| report::Row {
            name: &plan.bdev,
            core_mask: 1u64
                .checked_shl(reactor::core_id(plan.reactor) as u32)
                .unwrap_or(0),
            workload: cfg.workload.name(),
            read_pct: plan.read_pct,
            queue_depth: plan.params.queue_depth,
            io_size: cfg.io_size,
            verify_range: (plan.params.mode == Mode::Verify)
                .then_some((plan.params.ios_base, plan.params.size_in_ios)),
            result: r,
        })
        .collect();
    if app::shutdown_requested() {
        let secs = done.iter().map(|(_, r)| r.runtime_ns).max().unwrap_or(0) as f64 / 1e9;
        println!("Received shutdown signal, test time was about {secs:.6} seconds");
    }
    print!("{}", report::render(&rows));
    if cfg.latency > 0 {
        for &(plan, r) in &done {
            if let Some(h) = &r.histogram {
                let title = format!("{} from core {}", plan.bdev, reactor::core_id(plan.reactor));
                print!("{}", h.render_summary(&title));
                if cfg.latency > 1 {
                    print!("{}", h.render_detail(&title));
                }
            }
        }
    }
    report::flush();

    let bad =
        done.len() != plans.len() || done.iter().any(|(_, r)| r.failed > 0 || r.miscompares > 0);
    i32::from(bad)
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let (cfg, warnings) = match Config::from_cli(&cli) {
        Ok(x) => x,
        Err(msg) => {
            eprintln!("bdevperf: {msg}");
            std::process::exit(1);
        }
    };
    for w in warnings {
        eprintln!("{w}");
    }
    let spec = app::AppSpec {
        common: cli.common,
        rpc_socket: cli.rpc_socket,
        wait_for_rpc: false,
    };
    let main = app::main_fn(move || bdevperf_main(cfg));
    app::exit_with("bdevperf", app::run(spec, Some(main)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("bdevperf").chain(args.iter().copied()))
    }

    fn config(args: &[&str]) -> Result<Config, String> {
        let cli = parse(args).map_err(|e| e.to_string())?;
        Config::from_cli(&cli).map(|(c, _)| c)
    }

    #[test]
    fn io_size_suffixes() {
        assert_eq!(parse_io_size("4096"), Ok(4096));
        assert_eq!(parse_io_size("4k"), Ok(4096));
        assert_eq!(parse_io_size("4K"), Ok(4096));
        assert_eq!(parse_io_size("128k"), Ok(128 << 10));
        assert_eq!(parse_io_size("1m"), Ok(1 << 20));
        assert_eq!(parse_io_size("1M"), Ok(1 << 20));
        assert_eq!(parse_io_size("1g"), Ok(1 << 30));
        assert_eq!(parse_io_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_io_size("64kb"), Ok(64 << 10));
        for bad in [
            "",
            "k",
            "4x",
            "-4096",
            "0",
            "0k",
            "4kk",
            "3g",
            "99999999999999999999",
            "4 k",
        ] {
            assert!(parse_io_size(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn required_flags() {
        let full = ["-q", "32", "-o", "4096", "-w", "randread", "-t", "3"];
        assert!(parse(&full).is_ok());
        for drop_flag in ["-q", "-o", "-w", "-t"] {
            let i = full.iter().position(|a| *a == drop_flag).unwrap();
            let mut args = full.to_vec();
            args.drain(i..i + 2);
            let e = parse(&args).unwrap_err();
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::MissingRequiredArgument,
                "{drop_flag}"
            );
            assert!(e.use_stderr());
        }
        assert!(parse(&["-q", "0", "-o", "4k", "-w", "read", "-t", "1"]).is_err());
        assert!(parse(&["-q", "32", "-o", "4k", "-w", "read", "-t", "0"]).is_err());
        assert!(parse(&["-q", "32", "-o", "4k", "-w", "bogus", "-t", "1"]).is_err());
        assert!(parse(&["-q", "x", "-o", "4k", "-w", "read", "-t", "1"]).is_err());
        let c = config(&[
            "-q",
            "8",
            "-o",
            "128k",
            "-w",
            "write_zeroes",
            "-t",
            "2",
            "-T",
            "Malloc0",
            "-C",
        ])
        .unwrap();
        assert_eq!(c.io_size, 128 << 10);
        assert_eq!(c.mode, Mode::WriteZeroes);
        assert_eq!(c.bdev.as_deref(), Some("Malloc0"));
        assert!(c.multithread);
        // CommonOpts flags are there too.
        let cli = parse(&[
            "-q", "1", "-o", "4k", "-w", "read", "-t", "1", "--json", "x.json", "-m", "0x3",
        ])
        .unwrap();
        assert_eq!(cli.common.cpumask, "0x3");
        assert!(cli.rpc_socket.is_none());
    }

    #[test]
    fn rwmixread_validation() {
        let base = ["-q", "4", "-o", "4k", "-t", "1"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            config(&v)
        };
        assert!(with(&["-w", "rw"]).is_err(), "-M is required for rw");
        assert!(
            with(&["-w", "randrw"]).is_err(),
            "-M is required for randrw"
        );
        assert!(with(&["-w", "rw", "-M", "101"]).is_err());
        assert!(with(&["-w", "rw", "-M=-1"]).is_err());
        assert_eq!(
            with(&["-w", "rw", "-M", "70"]).unwrap().mode,
            Mode::Mixed { read_pct: 70 }
        );
        assert_eq!(
            with(&["-w", "randrw", "-M", "0"]).unwrap().mode,
            Mode::Mixed { read_pct: 0 }
        );
        assert_eq!(
            with(&["-w", "randrw", "-M", "100"]).unwrap().mode,
            Mode::Mixed { read_pct: 100 }
        );
        // Ignored (with a warning) for other workloads, as SPDK.
        let cli = parse(&["-q", "4", "-o", "4k", "-t", "1", "-w", "read", "-M", "50"]).unwrap();
        let (c, warnings) = Config::from_cli(&cli).unwrap();
        assert_eq!(c.mode, Mode::Mixed { read_pct: 100 });
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn workloads() {
        let m = |w: &str| config(&["-q", "1", "-o", "4k", "-t", "1", "-w", w]).unwrap();
        assert_eq!(m("read").mode, Mode::Mixed { read_pct: 100 });
        assert_eq!(m("randwrite").mode, Mode::Mixed { read_pct: 0 });
        assert!(m("randwrite").workload.is_random());
        assert!(!m("write").workload.is_random());
        assert_eq!(m("verify").mode, Mode::Verify);
        assert_eq!(m("flush").mode, Mode::Flush);
        assert_eq!(m("unmap").mode, Mode::Unmap);
        for w in Workload::value_variants() {
            assert_eq!(Workload::from_str(w.name(), false).ok(), Some(*w));
        }
    }

    #[test]
    fn help_exits_zero() {
        let e = parse(&["--help"]).unwrap_err();
        assert!(!e.use_stderr());
        assert!(e.to_string().contains("TO/s is always 0"));
    }
}
