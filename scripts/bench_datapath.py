#!/usr/bin/env python3
"""The data path's figures, each beside its baseline from the same
run (run through scripts/bench.sh, or directly after `cargo build --release`):

  1. bdevperf 4 KiB randread / randwrite QD32, one core, on a raw malloc bdev
     (the baseline of every row below; SPDK's bdevperf on this machine, as
     measured once: 1.39-1.56 M randread, 1.40-1.43 M randwrite)
  2. the same on a delay bdev with zero latencies over that malloc bdev (the
     simplest stacked bdev, as SPDK's passthru: 0.85 / 0.90 of raw there)
  3. the same on a hydrated clone whose destination is that malloc bdev
                                                                aim >= 0.95x
  4. (argument `p99`) 4 KiB randread p99 on a hydrated clone while another
     clone hydrates on the same reactor, vs idle: bench_clone.py's (c)
                                                                aim <= 1.3x

Every row alternates its two sides BENCH_REPEAT times (3) and takes the
median, so drift on a shared machine hits both. Beside wall-clock IOPS each
run reports I/Os per CPU-second of user time (the busy-polling reactor's
own work, start-up's prefault excluded): on a shared, overloaded machine
the reactor loses the core to others for part of the run, which the wall
figure counts and this one does not. Figures only: nothing here
asserts a speed. Env: BENCH_SECONDS (5), BENCH_REPEAT, BENCH_DIR,
BENCH_BIN_DIR (another build's bdevperf and clone_tgt, e.g. a copy of main's,
to compare builds: each row then also shows that build's figure).
"""

import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_clone as bc  # noqa: E402  (Target, bdevperf helpers, medians)

MB = 256  # malloc bdevs: 65536 blocks of 4 KiB


def malloc(name):
    return ("bdev_malloc_create", {"name": name, "num_blocks": MB << 8, "block_size": 4096})


CPU_RATE = {}  # (build, side) -> I/Os per CPU-second, per run


def perf(binary, cfg, bdev, w, key=None):
    argv = [str(binary), "--json", str(cfg), "-m", "0x1", "--log-level", "warn", "-T", bdev,
            "-q", "32", "-o", "4096", "-w", w, "-t", str(bc.SECS)]
    u0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    cp = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                        timeout=bc.SECS + 300)
    user = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - u0
    if cp.returncode != 0:
        raise SystemExit("bdevperf failed:\n$ %s\n%s\n%s" % (" ".join(argv), cp.stdout, cp.stderr))
    iops = bc.total_iops(cp.stdout)
    if key is not None and user > 0:
        CPU_RATE.setdefault(key, []).append(iops * bc.SECS / user)
    return iops


def hydrated_clone_config(work):
    """A clone over malloc bdevs, hydrated and released, saved as a config:
    replayed, the clone comes up hydrated (its metadata says so) and every
    I/O is a pass-through to the malloc destination."""
    meta = work / "dp-meta.img"
    bc.sparse(meta, 8 << 20)
    t = bc.Target(work, "dp")
    t.rpc("bdev_malloc_create", name="Src0", num_blocks=MB << 8, block_size=4096)
    t.rpc("bdev_malloc_create", name="Dst0", num_blocks=MB << 8, block_size=4096)
    t.rpc("bdev_uring_create", filename=str(meta), name="Meta0", block_size=4096)
    t.rpc("bdev_clone_create", name="Clone0", source_bdev_name="Src0", dest_bdev_name="Dst0",
          metadata_bdev_name="Meta0", region_size_kb=64, hydration_threshold=32,
          hydration_batch_size=4)
    st = t.wait_hydrated("Clone0")
    cfg = work / "dp-clone.json"
    with open(cfg, "w") as f:
        subprocess.run([str(bc.ROOT / ".venv" / "bin" / "spdk-rpc"), "-s", t.sock, "save_config"],
                       stdout=f, check=True)
    t.stop()
    if not st["source_released"]:
        bc.say("note: the clone kept its source (not released); rows measure the hydrated path")
    return cfg


def main():
    with_p99 = "p99" in sys.argv[1:]
    work = Path(os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="dp-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    other = os.environ.get("BENCH_BIN_DIR")
    builds = [("this build", bc.PERF)]
    if other:
        builds.append(("other build", Path(other) / "bdevperf"))
    raw = bc.config_file(work / "dp-raw.json", [malloc("Malloc0")])
    delay = bc.config_file(work / "dp-delay.json", [
        malloc("Malloc0"),
        ("bdev_delay_create", {"name": "Delay0", "base_bdev_name": "Malloc0", "avg_read_latency": 0,
                               "p99_read_latency": 0, "avg_write_latency": 0,
                               "p99_write_latency": 0})])
    clone = hydrated_clone_config(work)
    sides = [("raw malloc", raw, "Malloc0"), ("delay 0 over malloc", delay, "Delay0"),
             ("hydrated clone over malloc", clone, "Clone0")]
    rows = []
    for w in ("randread", "randwrite"):
        bc.say("\n== bdevperf 4 KiB %s QD32, one core, %d s, %d rounds" % (w, bc.SECS, bc.REPEAT))
        runs = {(b, s): [] for b, _ in builds for s, _, _ in sides}
        for _ in range(bc.REPEAT):
            for b, binary in builds:
                for s, cfg, bdev in sides:
                    runs[(b, s)].append(perf(binary, cfg, bdev, w, (b, s, w)))
        for b, _ in builds:
            for s, _, _ in sides:
                bc.say("%-11s %-27s %s IOPS; per CPU-second %s" % (
                    b, s, bc.fmt_runs(runs[(b, s)]), bc.fmt_runs(CPU_RATE.get((b, s, w), [0]))))
            base = bc.median(runs[(b, "raw malloc")])
            rows.append(("%s: malloc %s IOPS" % (b, w), "%.0f" % base, "SPDK bdevperf here: %s"
                         % ("1.39-1.56 M" if w == "randread" else "1.40-1.43 M"), None, ">= 1.1x SPDK"))
            for s, aim in (("delay 0 over malloc", "SPDK passthru %s" % ("0.85" if w == "randread" else "0.90")),
                           ("hydrated clone over malloc", ">= 0.95")):
                v = bc.median(runs[(b, s)])
                rows.append(("%s: %s %s vs raw malloc" % (b, s, w), "%.0f" % v, "%.0f" % base,
                             v / base, aim))
            cbase = bc.median(CPU_RATE.get((b, "raw malloc", w), [1]))
            for s in ("delay 0 over malloc", "hydrated clone over malloc"):
                v = bc.median(CPU_RATE.get((b, s, w), [0]))
                rows.append(("%s: %s %s vs raw malloc, I/Os per CPU-second" % (b, s, w), "%.0f" % v,
                             "%.0f" % cbase, v / cbase, ">= 0.95"))
        if other:
            for s, _, _ in sides:
                a, o = bc.median(runs[("this build", s)]), bc.median(runs[("other build", s)])
                rows.append(("this build vs other build: %s %s" % (s, w), "%.0f" % a, "%.0f" % o,
                             a / o, "> 1"))
                a = bc.median(CPU_RATE.get(("this build", s, w), [0]))
                o = bc.median(CPU_RATE.get(("other build", s, w), [1]))
                rows.append(("this build vs other build: %s %s, I/Os per CPU-second" % (s, w),
                             "%.0f" % a, "%.0f" % o, a / o, "> 1"))
    if with_p99:
        shm_root = "/dev/shm" if os.path.isdir("/dev/shm") else str(work)
        shm = Path(tempfile.mkdtemp(prefix="dp-bench-", dir=shm_root))
        try:
            bc.bench_c(work, shm)
        finally:
            shutil.rmtree(shm, ignore_errors=True)
        name, fig, base, ratio, _ = bc.rows[-1]
        rows.append((name, fig, base, ratio, "<= 1.3"))
    bc.say("\n| benchmark | figure | baseline (same run) | ratio | aim |")
    bc.say("|---|---|---|---|---|")
    for name, fig, base, ratio, aim in rows:
        bc.say("| %s | %s | %s | %s | %s |" % (name, fig, base, "-" if ratio is None else "%.3f" % ratio,
                                              aim))
    if not os.environ.get("BENCH_DIR"):
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
