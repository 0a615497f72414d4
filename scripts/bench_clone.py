#!/usr/bin/env python3
"""The clone bdev's benchmarks, side by side with their baselines in one run
(run through scripts/bench_clone.sh, which builds and makes the venv).

  a. bdevperf 4 KiB randread / randwrite QD32 on a fully hydrated clone vs on
     its raw destination (a malloc bdev on both sides)          aim >= 0.97x
  b. hydration throughput from a delayed, rate-limited source vs the limit
                                                                aim >= 0.95x
  c. 4 KiB randread p99 on a hydrated clone while another clone hydrates in
     the same reactor vs idle                                   aim <= 1.5x
  d. create and resume time, 1 TiB sparse source, 4 KiB regions aim <= 50 / 300 ms
  e. clone_tgt RSS growth for that clone, in bits per region    aim <= 1.1
  f. hydration over a slow shared link (2 ms and 10 ms reads, 100 MiB/s)
     with a reader, beside QEMU's block-stream over the same link (its own
     table; scripts/bench_link.py has the details). Only when named.

Figures only: nothing here asserts a speed. (a) and (c) alternate their two
sides BENCH_REPEAT times (3) and take medians. Env: BENCH_SECONDS (5),
BENCH_CLONE_MB (512), BENCH_DIR.

Backends. The measured destinations of (a) and (c) are malloc bdevs, so the
clone's own cost shows rather than the disk's. Not files in /dev/shm: the
uring bdev opens them O_DIRECT, tmpfs cannot do that without blocking, and
io_uring hands every such I/O to its io-wq worker threads, which inherit the
reactor's core (-m 0x1) and share it with the busy-polling reactor; the
measured latency was then the scheduler's (a 2.6 ms p99 at 130 us average,
idle), and the second clone's page-cache writes in those workers (first
touch of tmpfs pages) took the core from the reads (4x p99, 1/7 the IOPS).
An NVMe device completes O_DIRECT I/O without such threads. The slow
sources stay files: in /dev/shm while a clone is made, and for (c)'s
hydrating clone a file under BENCH_DIR (a real disk, O_DIRECT) behind a
500 us delay bdev.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spdk.rpc.client import JSONRPCClient

ROOT = Path(__file__).resolve().parents[1]
TGT = ROOT / "target" / "release" / "clone_tgt"
PERF = ROOT / "target" / "release" / "bdevperf"
SECS = int(os.environ.get("BENCH_SECONDS", "5"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
SIZE_MB = int(os.environ.get("BENCH_CLONE_MB", "512"))
RATE_MB = 100          # (b) the hydration rate limit, MiB/s
RATE_C = 150           # (c) the rate of the clone hydrating beside the measured one
TIB_MB = 1 << 20       # 1 TiB in MiB (bdev_null_create's unit)

rows = []              # (benchmark, clone, baseline, ratio, aim)


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def fmt_runs(v):
    return "median %.0f (%s)" % (median(v), ", ".join("%.0f" % x for x in v))


def say(*a):
    print(*a, flush=True)


class Target:
    def __init__(self, work, name, config=None, interrupt=False):
        self.sock = str(work / ("%s.sock" % name))
        self.log = open(work / ("%s.log" % name), "ab")
        argv = [str(TGT), "-m", "0x1", "-r", self.sock]
        if interrupt:
            argv.append("--interrupt-mode")
        if config:
            argv += ["--json", str(config)]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("clone_tgt did not start; see %s" % self.log.name)
            time.sleep(0.02)
        self.client = JSONRPCClient(self.sock, timeout=120)
        self.rpc("framework_wait_init")

    def rpc(self, method, **params):
        return self.client.call(method, params)

    def status(self, name):
        return self.rpc("bdev_clone_get_bdevs", name=name)[0]

    def wait_hydrated(self, name, timeout=600, poll=0.02):
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(name)
            if st["state"] == "hydrated":
                return st
            if st["state"] in ("failed", "read_only") or time.monotonic() > deadline:
                raise SystemExit("%s did not hydrate: %s" % (name, st))
            time.sleep(poll)

    def mem_kib(self, field="VmRSS"):
        for line in open("/proc/%d/status" % self.proc.pid):
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise SystemExit("no %s" % field)

    def stop(self):
        try:
            self.rpc("spdk_kill_instance", sig_name="SIGTERM")
        except Exception:
            self.proc.send_signal(signal.SIGTERM)
        self.client.close()
        if self.proc.wait(timeout=120) != 0:
            raise SystemExit("clone_tgt exited %s; see %s" % (self.proc.returncode, self.log.name))


def bdevperf(config, *args):
    argv = [str(PERF), "--json", str(config), "-m", "0x1", "--log-level", "warn"] + [str(a) for a in args]
    cp = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=SECS + 300)
    if cp.returncode != 0:
        raise SystemExit("bdevperf failed:\n$ %s\n%s\n%s" % (" ".join(argv), cp.stdout, cp.stderr))
    return cp.stdout


def bdevperf_figure(out, line_re, what):
    """The number `line_re` captures on the first line of bdevperf's output it matches."""
    m = re.search(line_re, out, re.MULTILINE)
    if m is None:
        raise SystemExit("no %s in:\n%s" % (what, out))
    return float(m.group(1))


def total_iops(out):
    return bdevperf_figure(out, r"^\s*Total\s*:\s*([0-9.]+)", "Total row")


def p99_us(out):
    return bdevperf_figure(out, r"^\s*99\.00000%\s*:\s*([0-9.]+)\s*us",
                           "99.00000% line in bdevperf -l output")


def config_file(path, methods):
    doc = {"subsystems": [{"subsystem": "bdev", "config": [
        {"method": m, "params": p} for m, p in methods]}]}
    path.write_text(json.dumps(doc, indent=2))
    return path


def sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)


def random_file(path, mb):
    with open("/dev/urandom", "rb") as r, open(path, "wb") as w:
        for _ in range(mb):
            w.write(r.read(1 << 20))


def hydrated_clone(work, shm, tag, mb):
    """A target with Clone0 hydrated: its source Src0 a file of `mb` MiB of random data, its
    destination Dst0 a malloc bdev, its metadata Meta0 a sparse file. Returns the target, the
    source and metadata files, Clone0's status and how long hydration took in seconds."""
    src, meta = shm / ("%s-src.img" % tag), shm / ("%s-meta.img" % tag)
    random_file(src, mb)
    sparse(meta, 8 << 20)
    t = Target(work, tag)
    t.rpc("bdev_uring_create", filename=str(src), name="Src0", block_size=4096)
    t.rpc("bdev_malloc_create", name="Dst0", num_blocks=mb << 8, block_size=4096)
    t.rpc("bdev_uring_create", filename=str(meta), name="Meta0", block_size=4096)
    t.rpc("bdev_clone_create", name="Clone0", source_bdev_name="Src0", dest_bdev_name="Dst0",
          metadata_bdev_name="Meta0", region_size_kb=64, hydration_threshold=32, hydration_batch_size=4)
    t0 = time.monotonic()
    st = t.wait_hydrated("Clone0")
    return t, src, meta, st, time.monotonic() - t0


def bench_a(work, shm):
    say("\n== a. bdevperf 4 KiB QD32 on a hydrated clone vs its raw destination (%d MiB, %d s)"
        % (SIZE_MB, SECS))
    # The destination is a malloc bdev (see the module doc): bdevperf gets
    # a new, zeroed one; the metadata says hydrated, and these runs only
    # time the I/O.
    t, src, meta, st, secs = hydrated_clone(work, shm, "a", SIZE_MB)
    say("hydrated %d MiB in %.2f s (source released: %s)" % (SIZE_MB, secs, st["source_released"]))
    cfg = work / "a-clone.json"
    with open(cfg, "w") as f:
        subprocess.run([str(ROOT / ".venv" / "bin" / "spdk-rpc"), "-s", t.sock, "save_config"],
                       stdout=f, check=True)
    t.stop()
    raw_cfg = config_file(work / "a-raw.json", [
        ("bdev_malloc_create", {"name": "Dst0", "num_blocks": SIZE_MB << 8, "block_size": 4096})])
    for w in ("randread", "randwrite"):
        clone, raw = [], []
        for _ in range(REPEAT):  # interleaved, so drift on a shared machine hits both
            clone.append(total_iops(bdevperf(cfg, "-T", "Clone0", "-q", 32, "-o", 4096, "-w", w,
                                             "-t", SECS)))
            raw.append(total_iops(bdevperf(raw_cfg, "-T", "Dst0", "-q", 32, "-o", 4096, "-w", w,
                                           "-t", SECS)))
        say("%s: clone %s IOPS, raw destination %s IOPS" % (w, fmt_runs(clone), fmt_runs(raw)))
        c, r = median(clone), median(raw)
        rows.append(("a. 4 KiB %s QD32, hydrated clone vs raw dest" % w, "%.0f IOPS" % c,
                     "%.0f IOPS" % r, c / r, ">= 0.97"))
    for p in (src, meta):
        p.unlink()


def bench_b(work, shm):
    mb = min(SIZE_MB, RATE_MB * SECS * 2)
    say("\n== b. hydration throughput, %d MiB from a delayed source (500 us reads), limit %d MB/s"
        % (mb, RATE_MB))
    src, dst, meta = shm / "b-src.img", shm / "b-dst.img", shm / "b-meta.img"
    random_file(src, mb)
    sparse(dst, mb << 20)
    sparse(meta, 8 << 20)
    t = Target(work, "b")
    t.rpc("bdev_uring_create", filename=str(src), name="Src0", block_size=4096)
    t.rpc("bdev_delay_create", base_bdev_name="Src0", name="Remote0", avg_read_latency=500,
          p99_read_latency=1500, avg_write_latency=500, p99_write_latency=1500)
    t.rpc("bdev_uring_create", filename=str(dst), name="Dst0", block_size=4096)
    t.rpc("bdev_uring_create", filename=str(meta), name="Meta0", block_size=4096)
    t.rpc("bdev_clone_create", name="Clone0", source_bdev_name="Remote0", dest_bdev_name="Dst0",
          metadata_bdev_name="Meta0", region_size_kb=64, no_hydration=True, hydration_threshold=32,
          hydration_batch_size=4, hydration_mbytes_per_sec=RATE_MB)
    t0 = time.monotonic()
    t.rpc("bdev_clone_set_hydration", name="Clone0", enable=True)
    t.wait_hydrated("Clone0")
    secs = time.monotonic() - t0
    t.stop()
    # The limit is in MB/s as bdev_set_qos_limit's rw_mbytes_per_sec: MiB.
    rate = (mb << 20) / secs / (1 << 20)
    say("%d MiB in %.2f s: %.1f MiB/s (limit %d)" % (mb, secs, rate, RATE_MB))
    rows.append(("b. hydration rate, 500 us source, limited", "%.1f MiB/s" % rate,
                 "limit %d" % RATE_MB, rate / RATE_MB, ">= 0.95"))
    for p in (src, dst, meta):
        p.unlink()


def wait_for_bdev(proc, sock, name, timeout=120):
    """Until bdev `name` exists in the app behind `sock` (started as `proc`)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            out, _ = proc.communicate()
            raise SystemExit("bdevperf exited before %s existed:\n%s" % (name, out))
        try:
            client = JSONRPCClient(sock, timeout=30)
            try:
                if client.call("bdev_get_bdevs", {"name": name}):
                    return
            finally:
                client.close()
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("%s did not appear within %d s" % (name, timeout))
        time.sleep(0.05)


def bench_c(work, shm):
    say("\n== c. 4 KiB randread p99 on a hydrated clone, another clone hydrating (%d MiB/s) vs idle (%d s)"
        % (RATE_C, SECS))
    # Clone0: hydrated (from a): reuse a small hydrated stack made here.
    mb = min(SIZE_MB, 256)
    t, src, meta, st, _ = hydrated_clone(work, shm, "c", mb)
    clone0_uuid = st["uuid"]
    t.stop()
    # Clone1: a second clone in the same process and reactor, copying real
    # data from a delayed source (500 us) at RATE_C MiB/s (unlimited, it
    # varies from 100 to 250 MiB/s here with the machine's load), sized so
    # that it is still hydrating when the run ends (checked below).
    src1 = work / "c-src1.img"
    mb1 = RATE_C * (SECS + 2)
    random_file(src1, mb1)
    base = [
        ("bdev_uring_create", {"filename": str(src), "name": "Src0", "block_size": 4096}),
        ("bdev_malloc_create", {"name": "Dst0", "num_blocks": mb << 8, "block_size": 4096}),
        ("bdev_uring_create", {"filename": str(meta), "name": "Meta0", "block_size": 4096}),
        ("bdev_clone_create", {"name": "Clone0", "source_bdev_name": "Src0", "dest_bdev_name": "Dst0",
                               "metadata_bdev_name": "Meta0", "region_size_kb": 64,
                               "uuid": clone0_uuid}),
        ("bdev_uring_create", {"filename": str(src1), "name": "Src1", "block_size": 4096}),
        ("bdev_delay_create", {"base_bdev_name": "Src1", "name": "Remote1", "avg_read_latency": 500,
                               "p99_read_latency": 1500, "avg_write_latency": 500,
                               "p99_write_latency": 1500}),
        ("bdev_malloc_create", {"name": "Dst1", "num_blocks": mb1 << 8, "block_size": 4096}),
        ("bdev_malloc_create", {"name": "Meta1", "num_blocks": 1024, "block_size": 4096}),
    ]
    p99 = {"idle": [], "hydrating": []}
    for mode in ("idle", "hydrating") * REPEAT:  # interleaved
        clone1 = {"name": "Clone1", "source_bdev_name": "Remote1", "dest_bdev_name": "Dst1",
                  "metadata_bdev_name": "Meta1", "region_size_kb": 64, "hydration_threshold": 32,
                  "hydration_batch_size": 4, "hydration_mbytes_per_sec": RATE_C}
        if mode == "idle":
            clone1["no_hydration"] = True
        cfg = config_file(work / ("c-%s.json" % mode), base + [("bdev_clone_create", clone1)])
        sock = str(work / "c-perf.sock")
        argv = [str(PERF), "--json", str(cfg), "-m", "0x1", "--log-level", "warn", "-r", sock,
                "-T", "Clone0", "-q", "32", "-o", "4096", "-w", "randread", "-t", str(SECS), "-l"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # The run starts once the config is loaded, which takes a while for
        # a large Dst1: time from when Clone1 exists, not from the start.
        wait_for_bdev(proc, sock, "Clone1")
        time.sleep(SECS - 0.5)
        st = JSONRPCClient(sock, timeout=30).call("bdev_clone_get_bdevs", {"name": "Clone1"})[0]
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise SystemExit("bdevperf failed:\n$ %s\n%s" % (" ".join(argv), out))
        p99[mode].append(p99_us(out))
        say("%s: Clone0 p99 %.1f us, %.0f IOPS; Clone1 near the end: %s, %d/%d regions, %.1f MiB/s"
            % (mode, p99[mode][-1], total_iops(out), st["state"], st["hydrated_regions"],
               st["num_regions"], st["progress"]["bytes_per_sec"] / (1 << 20)))
        if mode == "hydrating" and st["state"] != "hydrating":
            raise SystemExit("Clone1 was not hydrating to the end of the run: %s" % st)
    p99 = {k: median(v) for k, v in p99.items()}
    src1.unlink()
    rows.append(("c. 4 KiB randread p99, hydration running vs idle", "%.1f us" % p99["hydrating"],
                 "%.1f us" % p99["idle"], p99["hydrating"] / p99["idle"], "<= 1.5"))
    for p in (src, meta):
        p.unlink()


def bench_de(work):
    say("\n== d/e. create and resume, 1 TiB sparse source, 4 KiB regions; RSS per region "
        "(%d rounds, each on new metadata)" % REPEAT)
    t = Target(work, "de")
    t.rpc("bdev_null_create", name="Src0", num_blocks=TIB_MB << 8, block_size=4096)
    t.rpc("bdev_null_create", name="Dst0", num_blocks=TIB_MB << 8, block_size=4096)
    creates, resumes = [], []
    for i in range(REPEAT):
        # A new blank metadata file each round: create formats, the second
        # create over the same metadata resumes.
        meta, md = work / ("de-meta%d.img" % i), "Meta%d" % i
        sparse(meta, 64 << 20)
        t.rpc("bdev_uring_create", filename=str(meta), name=md, block_size=4096)
        params = dict(name="Clone0", source_bdev_name="Src0", dest_bdev_name="Dst0",
                      metadata_bdev_name=md, region_size_kb=4, no_hydration=True)
        if i == 0:
            time.sleep(0.5)
            rss0, data0 = t.mem_kib("VmRSS"), t.mem_kib("VmData")
        t0 = time.monotonic()
        t.rpc("bdev_clone_create", **params)
        creates.append((time.monotonic() - t0) * 1000)
        if i == 0:
            time.sleep(0.5)
            rss1, data1 = t.mem_kib("VmRSS"), t.mem_kib("VmData")
            regions = t.status("Clone0")["num_regions"]
        t.rpc("bdev_clone_delete", name="Clone0")
        t0 = time.monotonic()
        t.rpc("bdev_clone_create", **params)
        resumes.append((time.monotonic() - t0) * 1000)
        if i == 0:
            time.sleep(0.5)
            rss2 = t.mem_kib("VmRSS")
        t.rpc("bdev_clone_delete", name="Clone0")
        t.rpc("bdev_uring_delete", name=md)
        meta.unlink()
    t.stop()
    create_ms, resume_ms = median(creates), median(resumes)
    bits = lambda kib: kib * 1024 * 8 / regions  # noqa: E731
    say("create %s ms, resume %s ms; %d regions: RSS %d -> %d KiB (%.3f bits/region; "
        "untouched map pages are not resident), %d KiB after resume; allocated (VmData) "
        "+%d KiB = %.3f bits/region" % (fmt_runs(creates), fmt_runs(resumes), regions, rss0, rss1,
                                        bits(rss1 - rss0), rss2, data1 - data0,
                                        bits(data1 - data0)))
    rows.append(("d. create, 1 TiB at 4 KiB regions", "%.1f ms" % create_ms, "aim 50 ms",
                 create_ms / 50, "<= 1"))
    rows.append(("d. resume (same metadata), 1 TiB at 4 KiB", "%.1f ms" % resume_ms, "aim 300 ms",
                 resume_ms / 300, "<= 1"))
    rows.append(("e. memory per region, 2^28 regions (allocated; resident)",
                 "%.3f; %.3f bits" % (bits(data1 - data0), bits(rss1 - rss0)), "1 bit",
                 bits(data1 - data0), "<= 1.1"))


def main():
    for b in (TGT, PERF):
        if not os.access(b, os.X_OK):
            raise SystemExit("missing %s: cargo build --release" % b)
    work = Path(os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="clone-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    shm_root = "/dev/shm" if os.path.isdir("/dev/shm") else str(work)
    shm = Path(tempfile.mkdtemp(prefix="clone-bench-", dir=shm_root))
    only = sys.argv[1:] or ["a", "b", "c", "d"]
    try:
        if "a" in only:
            bench_a(work, shm)
        if "b" in only:
            bench_b(work, shm)
        if "c" in only:
            bench_c(work, shm)
        if "d" in only or "e" in only:
            bench_de(work)
        if "f" in only:
            import bench_link
            rows.extend(bench_link.run(work, Target, random_file))
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    say("\n| benchmark | clone | baseline | ratio | aim |")
    say("|---|---|---|---|---|")
    for name, clone, base, ratio, aim in rows:
        say("| %s | %s | %s | %.3f | %s |" % (name, clone, base, ratio, aim))
    say("\nlogs: %s" % work)


if __name__ == "__main__":
    main()
