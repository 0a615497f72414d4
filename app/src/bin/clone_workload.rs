//! `clone_workload`: the target (same framework, same modules, same `--json`
//! config as `clone_tgt`) plus an in-process I/O client, for the clone's
//! crash tests: it journals every I/O as it is acknowledged, with no network
//! in between (the NVMe/TCP crash test is `test/test_clone_crash_nvmf.py`).
//!
//! Two ways to use it:
//!
//! * `--bdev NAME --journal FILE`: run a seeded random workload on NAME
//!   (stamped writes, partial and whole-region writes, unaligned discards,
//!   flushes, checked reads). Every operation is appended to the journal
//!   with plain write(2) when submitted (`S`) and when acknowledged (`A`),
//!   so a `kill -9` loses nothing the kernel already has and a test can
//!   rebuild what the device may hold.
//! * `-r SOCK`: serve JSON-RPC as `clone_tgt` does, plus `workload_io`
//!   (one read/write/unmap/flush/write_zeroes on a named bdev) and
//!   `workload_dump` (copy a whole bdev into a file).
//!
//! Stamped block (any block size >= 32, a multiple of 8): bytes 0..8
//! `CWSTAMP1`, 8..16 seq (u64 LE; 0 = the source's stamp), 16..24 block
//! number, 24..32 and every following 8-byte word `mix(seq, block)`.
//! `test/clone_util.py` builds and checks the same bytes.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bdev::{util, IoStatus, IoType};
use clap::Parser;
use reactor::DmaBuf;
use rpc::{register_typed, DecodeError, RpcError, RUNTIME};
use serde::Deserialize;
use serde_json::{json, Value};

const MAGIC: &[u8; 8] = b"CWSTAMP1";

/// splitmix64's finaliser over (seq, block): the fill word of a stamp.
fn mix(seq: u64, block: u64) -> u64 {
    let mut z = seq
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(block.wrapping_mul(0xD1B5_4A32_D192_ED03))
        .wrapping_add(0x2545_F491_4F6C_DD1D);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fill `out` (one block) with the stamp of (seq, block).
fn stamp_block(out: &mut [u8], seq: u64, block: u64) {
    out[0..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    out[16..24].copy_from_slice(&block.to_le_bytes());
    let w = mix(seq, block).to_le_bytes();
    for chunk in out[24..].chunks_exact_mut(8) {
        chunk.copy_from_slice(&w);
    }
}

/// What a block holds: `Some(Some(seq))` a valid stamp for `block`,
/// `Some(None)` all zeroes, `None` anything else.
fn classify(data: &[u8], block: u64) -> Option<Option<u64>> {
    if data.iter().all(|&b| b == 0) {
        return Some(None);
    }
    if &data[0..8] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(data[8..16].try_into().ok()?);
    let mut want = vec![0u8; data.len()];
    stamp_block(&mut want, seq, block);
    (want == data).then_some(Some(seq))
}

fn stamped_buf(bs: usize, seq: u64, offset: u64, num: u64) -> DmaBuf {
    let mut buf = DmaBuf::new(bs * num as usize);
    for (i, blk) in buf.as_mut_slice().chunks_exact_mut(bs).enumerate() {
        stamp_block(blk, seq, offset + i as u64);
    }
    buf
}

fn hex_encode(data: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(data.len() * 2);
    for &b in data {
        s.push(H[usize::from(b >> 4)] as char);
        s.push(H[usize::from(b & 15)] as char);
    }
    s
}

fn hex_decode(s: &str) -> Result<Vec<u8>, String> {
    let nib = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(format!("'{}' is not a hex digit", c as char)),
    };
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    b.chunks_exact(2)
        .map(|p| Ok((nib(p[0])? << 4) | nib(p[1])?))
        .collect()
}

// ---------------------------------------------------------------------------
// RPC methods (tests only drive this binary, never clone_tgt, with them)

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IoParams {
    bdev_name: String,
    /// read, write, unmap, flush, write_zeroes
    io_type: String,
    #[serde(default)]
    offset_blocks: u64,
    #[serde(default)]
    num_blocks: u64,
    /// write: the data, hex
    data: Option<String>,
    /// write: stamp every block with this sequence number instead of `data`
    stamp: Option<u64>,
    #[serde(default)]
    fua: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DumpParams {
    bdev_name: String,
    path: PathBuf,
}

fn io_failed(what: &str, s: IoStatus) -> RpcError {
    RpcError::errno_msg(libc::EIO, format!("{what} failed: {}", s.name()))
}

fn open_rw(name: &str, write: bool) -> Result<bdev::Desc, RpcError> {
    bdev::open(name, write, |_| {}).map_err(|e| RpcError::errno_msg(e.errno(), e.to_string()))
}

async fn workload_io(p: IoParams) -> Result<Value, RpcError> {
    let ty = match p.io_type.as_str() {
        "read" => IoType::Read,
        "write" => IoType::Write,
        "unmap" => IoType::Unmap,
        "flush" => IoType::Flush,
        "write_zeroes" => IoType::WriteZeroes,
        other => {
            return Err(RpcError::errno_msg(
                libc::EINVAL,
                format!("unknown io_type '{other}'"),
            ))
        }
    };
    let desc = open_rw(&p.bdev_name, ty != IoType::Read)?;
    let ch = desc.channel();
    let bs = desc.bdev().block_size() as usize;
    match ty {
        IoType::Read => {
            let buf = util::read(&ch, p.offset_blocks, p.num_blocks)
                .await
                .map_err(|s| io_failed("read", s))?;
            Ok(json!({ "data": hex_encode(buf.as_slice()) }))
        }
        IoType::Write => {
            let buf = match (p.stamp, p.data) {
                (Some(seq), None) => stamped_buf(bs, seq, p.offset_blocks, p.num_blocks),
                (None, Some(hex)) => {
                    let bytes =
                        hex_decode(&hex).map_err(|e| RpcError::errno_msg(libc::EINVAL, e))?;
                    if bytes.is_empty() || bytes.len() % bs != 0 {
                        return Err(RpcError::errno_msg(
                            libc::EINVAL,
                            format!("data is {} bytes, not a multiple of {bs}", bytes.len()),
                        ));
                    }
                    let mut buf = DmaBuf::new(bytes.len());
                    buf.as_mut_slice().copy_from_slice(&bytes);
                    buf
                }
                _ => {
                    return Err(RpcError::errno_msg(
                        libc::EINVAL,
                        "write needs exactly one of data and stamp",
                    ))
                }
            };
            util::write(&ch, p.offset_blocks, buf, p.fua)
                .await
                .map_err(|s| io_failed("write", s))?;
            Ok(Value::Bool(true))
        }
        _ => {
            util::simple(&ch, ty, p.offset_blocks, p.num_blocks)
                .await
                .map_err(|s| io_failed(ty.name(), s))?;
            Ok(Value::Bool(true))
        }
    }
}

async fn workload_dump(p: DumpParams) -> Result<Value, RpcError> {
    let desc = open_rw(&p.bdev_name, false)?;
    let ch = desc.channel();
    let b = desc.bdev().clone();
    let mut out = File::create(&p.path).map_err(|e| {
        RpcError::errno_msg(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("{}: {e}", p.path.display()),
        )
    })?;
    let chunk = (1u64 << 20) / u64::from(b.block_size());
    let mut off = 0;
    while off < b.num_blocks() {
        let n = chunk.min(b.num_blocks() - off);
        let buf = util::read(&ch, off, n)
            .await
            .map_err(|s| io_failed("read", s))?;
        out.write_all(buf.as_slice())
            .map_err(|e| RpcError::errno_msg(libc::EIO, e.to_string()))?;
        off += n;
    }
    Ok(json!({ "bytes": b.size_bytes() }))
}

fn register_methods() {
    register_typed(
        "workload_io",
        RUNTIME,
        DecodeError::InvalidParams,
        workload_io,
    );
    register_typed(
        "workload_dump",
        RUNTIME,
        DecodeError::InvalidParams,
        workload_dump,
    );
}

// ---------------------------------------------------------------------------
// the random workload

#[derive(Parser, Debug)]
#[command(
    name = "clone_workload",
    version,
    // getopt semantics, as SPDK: a repeated flag takes the last value.
    args_override_self = true,
    about = "clone_tgt plus an in-process I/O client: a journaled random workload (--bdev) \
             or the workload_io / workload_dump RPCs (-r)"
)]
struct Cli {
    #[command(flatten)]
    common: app::CommonOpts,
    /// Serve JSON-RPC on this Unix socket
    #[arg(short = 'r', long = "rpc-socket")]
    rpc_socket: Option<PathBuf>,
    /// Run the random workload on this bdev, then exit
    #[arg(long)]
    bdev: Option<String>,
    /// Journal file (appended: `S seq op offset blocks`, `A seq status`)
    #[arg(long)]
    journal: Option<PathBuf>,
    /// Random seed
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Operations to run (0: until killed or shut down)
    #[arg(long, default_value_t = 0)]
    ops: u64,
    /// Operations in flight
    #[arg(long = "queue-depth", default_value_t = 4)]
    queue_depth: u32,
    /// Blocks per clone region (for whole- and partial-region writes)
    #[arg(long = "region-blocks", default_value_t = 1)]
    region_blocks: u64,
    /// Largest I/O in regions
    #[arg(long = "max-io-regions", default_value_t = 3)]
    max_io_regions: u64,
    /// Sleep this many microseconds after each acknowledgement
    #[arg(long = "think-us", default_value_t = 0)]
    think_us: u64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0, 0x5EED)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Write { off: u64, n: u64 },
    Discard { off: u64, n: u64 },
    Flush,
    Read { off: u64, n: u64 },
}

struct Journal(File);

impl Journal {
    /// One line, one write(2): the page cache keeps it across kill -9.
    fn line(&mut self, s: String) {
        if let Err(e) = self.0.write_all(s.as_bytes()) {
            eprintln!("clone_workload: journal write failed: {e}");
            std::process::exit(2);
        }
    }
}

struct State {
    rng: Rng,
    next_seq: u64,
    journal: Journal,
    /// Sequence numbers of every write submitted, per block, for read checks.
    written: HashMap<u64, Vec<u64>>,
    /// Blocks some discard covered (they may read zeroes).
    discarded: std::collections::HashSet<u64>,
    bad: u64,
    done: u64,
    submitted: u64,
}

struct Spec {
    num_blocks: u64,
    bs: usize,
    region_blocks: u64,
    max_io_regions: u64,
    ops: u64,
    think_us: u64,
}

fn pick_op(rng: &mut Rng, s: &Spec) -> Op {
    let rb = s.region_blocks.max(1);
    let regions = s.num_blocks.div_ceil(rb);
    let max_n = (rb * s.max_io_regions.max(1)).min(s.num_blocks);
    let clamp = |off: u64, n: u64| (off, n.min(s.num_blocks - off).max(1));
    match rng.below(100) {
        // whole regions, aligned
        0..=24 => {
            let r = rng.below(regions);
            let (off, n) = clamp(r * rb, rb * (1 + rng.below(s.max_io_regions.max(1))));
            Op::Write { off, n }
        }
        // anywhere, any length (partial regions, crossing boundaries)
        25..=49 => {
            let off = rng.below(s.num_blocks);
            let (off, n) = clamp(off, 1 + rng.below(max_n));
            Op::Write { off, n }
        }
        50..=61 => {
            let off = rng.below(s.num_blocks);
            let (off, n) = clamp(off, 1 + rng.below(max_n + rb));
            Op::Discard { off, n }
        }
        62..=71 => Op::Flush,
        _ => {
            let off = rng.below(s.num_blocks);
            let (off, n) = clamp(off, 1 + rng.below(max_n));
            Op::Read { off, n }
        }
    }
}

/// The workload's shared state. A test client, not the target: a mutex
/// across its reactors is fine here.
type Shared = Arc<Mutex<State>>;

fn lock(st: &Shared) -> MutexGuard<'_, State> {
    reactor::sync::lock(st)
}

async fn run_one(ch: &bdev::IoChannel, spec: &Spec, st: &Shared) -> bool {
    let (seq, op) = {
        let mut g = lock(st);
        if spec.ops != 0 && g.submitted >= spec.ops {
            return false;
        }
        g.submitted += 1;
        let op = pick_op(&mut g.rng, spec);
        g.next_seq += 1;
        let seq = g.next_seq;
        let line = match op {
            Op::Write { off, n } => {
                for b in off..off + n {
                    g.written.entry(b).or_default().push(seq);
                }
                format!("S {seq} W {off} {n}\n")
            }
            Op::Discard { off, n } => {
                g.discarded.extend(off..off + n);
                format!("S {seq} D {off} {n}\n")
            }
            Op::Flush => format!("S {seq} F 0 0\n"),
            Op::Read { off, n } => format!("S {seq} R {off} {n}\n"),
        };
        g.journal.line(line);
        (seq, op)
    };
    let status = match op {
        Op::Write { off, n } => {
            let buf = stamped_buf(spec.bs, seq, off, n);
            util::write(ch, off, buf, false).await.err()
        }
        Op::Discard { off, n } => util::simple(ch, IoType::Unmap, off, n).await.err(),
        Op::Flush => util::simple(ch, IoType::Flush, 0, 0).await.err(),
        Op::Read { off, n } => match util::read(ch, off, n).await {
            Err(s) => Some(s),
            Ok(buf) => {
                let mut g = lock(st);
                for (i, blk) in buf.as_slice().chunks_exact(spec.bs).enumerate() {
                    let b = off + i as u64;
                    let ok = match classify(blk, b) {
                        Some(None) => g.discarded.contains(&b),
                        Some(Some(0)) => true,
                        Some(Some(s)) => g.written.get(&b).is_some_and(|v| v.contains(&s)),
                        None => false,
                    };
                    if !ok {
                        g.bad += 1;
                        let head = hex_encode(&blk[..32.min(blk.len())]);
                        g.journal
                            .line(format!("X {seq} block {b} unexpected content {head}\n"));
                    }
                }
                None
            }
        },
    };
    {
        let mut g = lock(st);
        let s = status.map_or("ok", |s| s.name());
        g.journal.line(format!("A {seq} {s}\n"));
        g.done += 1;
    }
    if spec.think_us > 0 {
        reactor::sleep(Duration::from_micros(spec.think_us)).await;
    }
    true
}

async fn run_workload(cli: RunArgs) -> i32 {
    let desc = match bdev::open(&cli.bdev, true, |_| {}) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("clone_workload: cannot open {}: {e}", cli.bdev);
            return 1;
        }
    };
    let b = desc.bdev().clone();
    let bs = b.block_size() as usize;
    if bs < 32 || !bs.is_multiple_of(8) {
        eprintln!("clone_workload: block size {bs} cannot hold a stamp");
        return 1;
    }
    let journal = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cli.journal)
    {
        Ok(f) => Journal(f),
        Err(e) => {
            eprintln!("clone_workload: {}: {e}", cli.journal.display());
            return 1;
        }
    };
    let spec = Arc::new(Spec {
        num_blocks: b.num_blocks(),
        bs,
        region_blocks: cli.region_blocks,
        max_io_regions: cli.max_io_regions,
        ops: cli.ops,
        think_us: cli.think_us,
    });
    let st = Arc::new(Mutex::new(State {
        rng: Rng(cli.seed),
        next_seq: 0,
        journal,
        written: HashMap::new(),
        discarded: Default::default(),
        bad: 0,
        done: 0,
        submitted: 0,
    }));
    lock(&st).journal.line(format!(
        "H bdev {} blocks {} block_size {bs} seed {}\n",
        cli.bdev,
        b.num_blocks(),
        cli.seed
    ));
    drop(desc);
    // Workers spread over every reactor (worker i on reactor i mod n), each
    // with its own descriptor, opened here and closed here (as bdevperf).
    let nr = reactor::num_reactors().max(1);
    let running = Arc::new(AtomicUsize::new(cli.queue_depth.max(1) as usize));
    // The bdev going away (deleted, or a base removed) stops the workers so
    // their descriptors close and the unregister can finish.
    let removed = Arc::new(AtomicBool::new(false));
    for i in 0..cli.queue_depth.max(1) {
        let flag = removed.clone();
        let desc = match bdev::open(&cli.bdev, true, move |ev| {
            if ev == bdev::BdevEvent::Remove {
                flag.store(true, Ordering::Release);
            }
        }) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("clone_workload: cannot open {}: {e}", cli.bdev);
                return 1;
            }
        };
        let (spec, st, running, removed) =
            (spec.clone(), st.clone(), running.clone(), removed.clone());
        reactor::send(i % nr, move || {
            reactor::spawn_local(async move {
                let ch = desc.channel();
                while !app::shutdown_requested()
                    && !removed.load(Ordering::Acquire)
                    && run_one(&ch, &spec, &st).await
                {}
                drop(ch);
                reactor::send(0, move || drop(desc));
                running.fetch_sub(1, Ordering::AcqRel);
            });
        });
    }
    while running.load(Ordering::Acquire) > 0 {
        reactor::sleep(Duration::from_millis(5)).await;
    }
    // let the descriptors' closes (sent to this reactor) run first
    reactor::sleep(Duration::from_millis(5)).await;
    let g = lock(&st);
    println!(
        "clone_workload: {} operations acknowledged, {} bad blocks read",
        g.done, g.bad
    );
    if g.bad > 0 {
        3
    } else {
        0
    }
}

struct RunArgs {
    bdev: String,
    journal: PathBuf,
    seed: u64,
    ops: u64,
    queue_depth: u32,
    region_blocks: u64,
    max_io_regions: u64,
    think_us: u64,
}

fn main() {
    let cli = Cli::parse();
    let run = match (&cli.bdev, &cli.journal) {
        (Some(b), Some(j)) => Some(RunArgs {
            bdev: b.clone(),
            journal: j.clone(),
            seed: cli.seed,
            ops: cli.ops,
            queue_depth: cli.queue_depth,
            region_blocks: cli.region_blocks,
            max_io_regions: cli.max_io_regions,
            think_us: cli.think_us,
        }),
        (None, None) => None,
        _ => {
            eprintln!("clone_workload: --bdev and --journal go together");
            std::process::exit(1);
        }
    };
    if run.is_none() && cli.rpc_socket.is_none() {
        eprintln!("clone_workload: nothing to do: give --bdev/--journal, -r SOCK, or both");
        std::process::exit(1);
    }
    register_methods();
    let spec = app::AppSpec {
        common: cli.common,
        rpc_socket: cli.rpc_socket,
        wait_for_rpc: false,
    };
    let main = app::main_fn(move || async move {
        match run {
            Some(r) => run_workload(r).await,
            None => {
                app::shutdown_signal().await;
                0
            }
        }
    });
    app::exit_with("clone_workload", app::run(spec, Some(main)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// mix(0, 0) and mix(5, 1234), as test/clone_util.py computes them.
    const MIX_0_0: u64 = 0x952f_14f1_e8dd_c491;
    const MIX_5_1234: u64 = 0x3757_be1c_480a_83ad;

    #[test]
    fn stamps_round_trip() {
        let mut b = vec![0u8; 512];
        stamp_block(&mut b, 7, 42);
        assert_eq!(classify(&b, 42), Some(Some(7)));
        assert_eq!(classify(&b, 43), None, "a stamp names its block");
        b[300] ^= 1;
        assert_eq!(classify(&b, 42), None, "a flipped bit is garbage");
        assert_eq!(classify(&[0u8; 512], 5), Some(None));
    }

    #[test]
    fn mix_matches_python() {
        // test/clone_util.py's mix() must give the same values.
        assert_eq!(mix(0, 0), MIX_0_0);
        assert_eq!(mix(5, 1234), MIX_5_1234);
        assert_ne!(mix(1, 0), mix(0, 1));
    }

    #[test]
    fn hex() {
        assert_eq!(hex_encode(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(hex_decode("00abFF").unwrap(), vec![0, 0xab, 0xff]);
        assert!(hex_decode("0").is_err());
        assert!(hex_decode("zz").is_err());
    }
}
