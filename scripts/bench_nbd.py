"""clone_tgt vs qemu-storage-daemon, hydrating the same rate-limited NBD source.

Both sides get the same nbdkit source (`file` plugin behind `rate` and
`delay`), the same destination kind (a raw/qcow2 file on the same disk),
and are read through their own NBD export by the same fio (`--ioengine=nbd`).
clone_tgt: NBD client bdev -> clone (64 KiB regions) -> uring file, metadata
in RAM, export over a Unix socket; one reactor in interrupt mode (as QEMU's
event loop, it sleeps when idle, fair on a small shared machine).
qemu-storage-daemon: blockdev nbd source as the backing of a qcow2 overlay,
`block-stream` into the overlay, NBD export of the overlay.
Prints a markdown table; no assertion (figures only).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TGT = ROOT / "target" / "release" / "clone_tgt"
sys.path.insert(0, str(ROOT / "test"))
from spdk.rpc.client import JSONRPCClient  # noqa: E402

MB = 1 << 20
SIZE_MB = int(os.environ.get("BENCH_NBD_MB", "512"))
RATE = os.environ.get("BENCH_NBD_RATE", "400M")
DELAY = os.environ.get("BENCH_NBD_DELAY", "1ms")
SECS = int(os.environ.get("BENCH_SECONDS", "5"))
BS = 4096


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def wait_sock(p, proc, what):
    deadline = time.monotonic() + 20
    while not Path(p).exists():
        if proc.poll() is not None:
            raise SystemExit("%s exited %s" % (what, proc.returncode))
        if time.monotonic() > deadline:
            raise SystemExit("%s did not create %s" % (what, p))
        time.sleep(0.02)


def fio(uri=None, filename=None, rw="randread", secs=SECS, qd=16):
    cmd = ["fio", "--name=b", "--rw=%s" % rw, "--bs=4k", "--iodepth=%d" % qd,
           "--runtime=%d" % secs, "--time_based", "--output-format=json",
           "--randrepeat=0", "--norandommap"]
    if uri:
        cmd += ["--ioengine=nbd", "--uri=%s" % uri]
    else:
        cmd += ["--ioengine=io_uring", "--direct=1", "--filename=%s" % filename]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 120)
    if out.returncode != 0:
        raise SystemExit("fio failed: %s\n%s" % (" ".join(cmd), out.stderr))
    j = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = j["read"] if "read" in rw else j["write"]
    p99 = side["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0
    return side["iops"], p99


def measure(uri, load, t0, hydrated):
    """The hydration time since `t0` (alone, or with a randread run during
    it and randread/randwrite runs after it: (during, time, read, write))."""
    during = fio(uri) if load else None
    while not hydrated():
        time.sleep(0.05)
    hydr = time.monotonic() - t0
    if not load:
        return hydr
    return during, hydr, fio(uri), fio(uri, rw="randwrite")


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(str(path))
        self.f = self.s.makefile("rwb")
        self._read()
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            m = json.loads(self.f.readline())
            if "event" not in m:
                return m

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        r = self._read()
        if "error" in r:
            raise SystemExit("QMP %s: %s" % (name, r["error"]))
        return r["return"]


def clone_side(d, src_uri, load=True):
    sock = d / "spdk.sock"
    logf = open(d / "clone_tgt.log", "wb")
    p = subprocess.Popen([str(TGT), "--interrupt-mode", "-m", "0x1", "--no-huge", "-r", str(sock)],
                         stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_sock(sock, p, "clone_tgt")
        time.sleep(0.2)
        c = JSONRPCClient(str(sock), timeout=60)
        dst = d / "clone-dst.raw"
        with open(dst, "wb") as f:
            f.truncate(SIZE_MB * MB)
        c.call("bdev_nbd_create", {"name": "Src", "uri": src_uri, "block_size": BS})
        c.call("bdev_uring_create", {"filename": str(dst), "name": "Dst", "block_size": BS})
        c.call("bdev_malloc_create", {"name": "Md", "num_blocks": 2048, "block_size": BS})
        exp = d / "clone.sock"
        c.call("nbd_server_start", {"listen": str(exp)})
        t0 = time.monotonic()
        c.call("bdev_clone_create", {"name": "Clone0", "source_bdev_name": "Src",
                                     "dest_bdev_name": "Dst", "metadata_bdev_name": "Md",
                                     "region_size_kb": 64, "hydration_threshold": 16,
                                     "hydration_batch_size": 4})
        c.call("nbd_export_add", {"bdev_name": "Clone0", "writable": True})
        uri = "nbd+unix:///Clone0?socket=%s" % exp
        r = measure(uri, load, t0, lambda: c.call(
            "bdev_clone_get_bdevs", {"name": "Clone0"})[0]["state"] == "hydrated")
        c.call("spdk_kill_instance", {"sig_name": "SIGTERM"})
        p.wait(timeout=30)
        return r + (dst,) if load else r
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        logf.close()


def qemu_side(d, src_sock, load=True):
    ov = d / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(ov), str(SIZE_MB * MB)],
                   check=True)
    qmp, exp = d / "qmp.sock", d / "qsd.sock"
    logf = open(d / "qsd.log", "wb")
    p = subprocess.Popen([
        "qemu-storage-daemon",
        "--blockdev", "driver=nbd,node-name=src,server.type=unix,server.path=%s,read-only=on"
        % src_sock,
        "--blockdev", "driver=file,node-name=ovf,filename=%s,aio=io_uring,cache.direct=on" % ov,
        "--blockdev", "driver=qcow2,node-name=ov,file=ovf,backing=src",
        "--nbd-server", "addr.type=unix,addr.path=%s" % exp,
        "--export", "type=nbd,id=e0,node-name=ov,name=clone,writable=on",
        "--chardev", "socket,id=m,path=%s,server=on,wait=off" % qmp,
        "--monitor", "chardev=m"], stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_sock(qmp, p, "qemu-storage-daemon")
        wait_sock(exp, p, "qemu-storage-daemon")
        q = Qmp(qmp)
        t0 = time.monotonic()
        q.cmd("block-stream", **{"job-id": "s0", "device": "ov"})
        uri = "nbd+unix:///clone?socket=%s" % exp
        r = measure(uri, load, t0, lambda: not any(
            j["device"] == "s0" for j in q.cmd("query-block-jobs")))
        q.cmd("quit")
        p.wait(timeout=30)
        return r
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        logf.close()


def main():
    base = Path(os.environ.get("BENCH_DIR", "/var/tmp"))
    d = Path(tempfile.mkdtemp(prefix="bench-nbd-", dir=base))
    kit = None
    try:
        src = d / "src.raw"
        with open(src, "wb") as f:
            for _ in range(SIZE_MB):
                f.write(os.urandom(MB))
        ssock = d / "src.sock"
        kit = subprocess.Popen(["nbdkit", "-f", "-r", "-U", str(ssock), "--filter=rate",
                                "--filter=delay", "file", str(src), "rate=%s" % RATE,
                                "rdelay=%s" % DELAY], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        wait_sock(ssock, kit, "nbdkit")
        src_uri = "nbd+unix:///?socket=%s" % ssock
        log("clone_tgt, idle hydration ...")
        c_idle = clone_side(d, src_uri, load=False)
        log("qemu-storage-daemon, idle hydration ...")
        q_idle = qemu_side(d, ssock, load=False)
        for f in ("clone-dst.raw", "overlay.qcow2", "qsd.sock", "qmp.sock", "clone.sock", "spdk.sock"):
            (d / f).unlink(missing_ok=True)
        log("clone_tgt, with fio ...")
        c = clone_side(d, src_uri)
        log("qemu-storage-daemon, with fio ...")
        q = qemu_side(d, ssock)
        log("raw file ...")
        raw_r = fio(filename=c[4])
        raw_w = fio(filename=c[4], rw="randwrite")
        f = lambda x: "%.0f IOPS, p99 %.0f µs" % x  # noqa: E731
        print("\nsource: nbdkit file %d MiB, rate=%s bit/s, rdelay=%s; fio 4 KiB QD16 %d s "
              "through each side's NBD export\n" % (SIZE_MB, RATE, DELAY, SECS))
        print("| | clone_tgt (NBD client → clone → NBD export) | qemu-storage-daemon (qcow2 + block-stream) | raw file (fio io_uring, O_DIRECT) |")
        print("|---|---|---|---|")
        print("| randread during hydration | %s | %s | — |" % (f(c[0]), f(q[0])))
        print("| hydration time, idle | %.1f s | %.1f s | — |" % (c_idle, q_idle))
        print("| hydration time, with the randread run | %.1f s | %.1f s | — |" % (c[1], q[1]))
        print("| randread, hydrated | %s | %s | %s |" % (f(c[2]), f(q[2]), f(raw_r)))
        print("| randwrite, hydrated | %s | %s | %s |" % (f(c[3]), f(q[3]), f(raw_w)))
    finally:
        if kit and kit.poll() is None:
            kit.kill()
            kit.wait()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
