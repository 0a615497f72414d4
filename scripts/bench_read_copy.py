#!/usr/bin/env python3
"""Read-triggered copies under load: in-process bdevperf (4 KiB randread QD32,
one reactor) on a clone of a random source behind a delay bdev (LAT us reads)
whose link is shared at 100 MiB/s (bdev_set_qos_limit on the delay bdev);
64 KiB regions, malloc destination. Prints IOPS, p50, p99 and the regions
hydrated at the end of each run. Figures only (docs/clone.md, "Copy-on-read").

  cargo build --release --workspace --bins
  .venv/bin/python scripts/bench_read_copy.py off cor1 cor4 cor32 hyd1 both1 hyd16 both16

off: no_hydration; corN: no_hydration + copy_on_read, threshold N; hydN:
background hydration, threshold N; bothN: both. Env: MB (1024), SECS (5),
LAT (2000), BENCH_DIR (a temporary directory).
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spdk.rpc.client import JSONRPCClient

ROOT = Path(__file__).resolve().parent.parent
PERF = str(ROOT / "target" / "release" / "bdevperf")
W = os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="bench-read-copy-")
MB = int(os.environ.get("MB", "1024"))
SECS = int(os.environ.get("SECS", "5"))
LAT = int(os.environ.get("LAT", "2000"))
src = W + "/src.img"
if not os.path.exists(src) or os.path.getsize(src) != MB << 20:
    with open("/dev/urandom", "rb") as r, open(src, "wb") as w:
        for _ in range(MB):
            w.write(r.read(1 << 20))
def run(name, **clone):
    cfg = [
        ("bdev_uring_create", {"filename": src, "name": "SrcF", "block_size": 4096}),
        ("bdev_delay_create", {"base_bdev_name": "SrcF", "name": "Src", "avg_read_latency": LAT,
                               "p99_read_latency": LAT, "avg_write_latency": 0, "p99_write_latency": 0}),
        ("bdev_set_qos_limit", {"name": "Src", "rw_mbytes_per_sec": 100}),
        ("bdev_malloc_create", {"name": "Dst", "num_blocks": MB << 8, "block_size": 4096}),
        ("bdev_malloc_create", {"name": "Md", "num_blocks": 1024, "block_size": 4096}),
        ("bdev_clone_create", dict({"name": "Clone0", "source_bdev_name": "Src", "dest_bdev_name": "Dst",
                                    "metadata_bdev_name": "Md", "region_size_kb": 64}, **clone)),
    ]
    doc = {"subsystems": [{"subsystem": "bdev", "config": [{"method": m, "params": p} for m, p in cfg]}]}
    path = W + "/%s.json" % name
    open(path, "w").write(json.dumps(doc))
    sock = W + "/perf.sock"
    argv = [PERF, "--json", path, "-m", "0x1", "--log-level", "warn", "-r", sock, "-T", "Clone0",
            "-q", "32", "-o", "4096", "-w", "randread", "-t", str(SECS), "-l"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(SECS - 0.3)
    st = JSONRPCClient(sock, timeout=30).call("bdev_clone_get_bdevs", {"name": "Clone0"})[0]
    out, _ = p.communicate(timeout=300)
    iops = re.search(r"^\s*Total\s*:\s*([0-9.]+)", out, re.M).group(1)
    pct = dict(re.findall(r"^\s*(50\.00000|99\.00000)%\s*:\s*([0-9.]+)\s*us", out, re.M))
    print("%-28s IOPS %8s  p50 %8s us  p99 %8s us  hydrated %5d/%d (%.0f MiB)" % (
        name, iops, pct.get("50.00000"), pct.get("99.00000"), st["hydrated_regions"], st["num_regions"],
        st["hydrated_regions"] / 16), flush=True)
for v in sys.argv[1:]:
    if v == "off":
        run("cor-off", no_hydration=True)
    elif v.startswith("cor"):
        run("cor-on-threshold-" + v[3:], no_hydration=True, copy_on_read=True, hydration_threshold=int(v[3:]))
    elif v.startswith("hyd"):
        run("hyd-threshold-" + v[3:], hydration_threshold=int(v[3:]))
    elif v.startswith("both"):
        run("hyd+cor-threshold-" + v[4:], copy_on_read=True, hydration_threshold=int(v[4:]))
if not os.environ.get("BENCH_DIR"):
    os.unlink(src)
