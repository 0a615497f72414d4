"""f. Hydration over a slow, shared link, with QEMU's peer over the same link
in the same run (run through `scripts/bench_clone.sh f`).

The link: a random source file read with a constant delay (2 ms, then
10 ms) behind a 100 MiB/s limit that hydration and user reads share, as a
WAN link does.
  clone  uring source file -> bdev_delay_create (reads DELAY) ->
         bdev_set_qos_limit --rw_mbytes_per_sec 100 on the delay bdev;
         clone -r 64 with default tunables, destination and metadata uring
         files; exported over NVMe/TCP by clone_tgt (one reactor, interrupt
         mode).
  QEMU   nbdkit `file` plugin on the same source file behind its `rate`
         (800M bits/s = 100 MiB/s, burstiness 50 ms) and `delay`
         (rdelay=DELAY) filters;
         qemu-storage-daemon: that NBD export as the backing of a qcow2
         overlay, a copy-on-read filter on top of it, `block-stream` into
         the overlay, an NBD export of the filter.
  reader target/release/bdevperf in its own process (interrupt mode): 4 KiB
         randread QD32 for BENCH_SECONDS, started right after hydration
         starts, through NVMe/TCP (bdev_nvme_attach_controller) or NBD
         (bdev_nbd_create), one queue pair / one connection.
Per link, a plain reader of each side's link (bdevperf 128 KiB randread
QD32, 3 s) first shows that both get the same one. Each side then hydrates
twice: alone, then with the reader. The share
of the link is the bytes read from the source over 100 MiB/s x the
hydration time: alone that is the copy; with the reader the copy plus the
user's cold reads (the link's busy share). Bytes read from the source: the
delay bdev's bdev_get_iostat (clone), nbdkit's log filter (QEMU); both
exact.

Env: BENCH_LINK_MB (1024: the source's size), BENCH_LINK_DELAYS_MS ("2 10"),
BENCH_SECONDS (reader run, 10 here), BENCH_LINK_SIDES ("clone qemu").
Figures only: nothing here asserts a speed.
"""

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from bench_nbd import Qmp, wait_sock

ROOT = Path(__file__).resolve().parents[1]
PERF = ROOT / "target" / "release" / "bdevperf"
MIB = 1 << 20
LINK_MB = int(os.environ.get("BENCH_LINK_MB", "1024"))
DELAYS_MS = [float(d) for d in os.environ.get("BENCH_LINK_DELAYS_MS", "2 10").split()]
SIDES = os.environ.get("BENCH_LINK_SIDES", "clone qemu").split()
SECS = int(os.environ.get("BENCH_SECONDS", "10"))
RATE_MIB = 100         # the link, MiB/s (bdev_set_qos_limit's MB is MiB)
REGION_KB = 64
NQN = "nqn.2016-06.io.spdk:link"
TIMEOUT = 3600         # per hydration; main's defaults take ~3 min at 10 ms

# The goals, per delay (ms): reader IOPS, p99 ms, share alone, busy with the reader.
GOALS = {2: (15000, 8.0, 0.97, 0.95), 10: (7800, None, 0.95, None)}


def say(*a):
    print(*a, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc, timeout=60):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def percentile_us(out, pct):
    for line in out.splitlines():
        m = re.match(r"^\s*%s%%\s*:\s*([0-9.]+)\s*us" % re.escape(pct), line)
        if m:
            return float(m.group(1))
    raise SystemExit("no %s%% line in bdevperf -l output:\n%s" % (pct, out))


class Reader:
    """bdevperf, randread QD32 (4 KiB for SECS by default) on one bdev of a
    config (a list of (method, params)), in its own process from start()
    to result()."""

    def __init__(self, work, name, methods, bdev, io_size=4096, secs=SECS):
        self.cfg = work / ("%s-reader.json" % name)
        self.cfg.write_text(json.dumps({"subsystems": [{"subsystem": "bdev", "config": [
            {"method": m, "params": p} for m, p in methods]}]}))
        self.argv = [str(PERF), "--json", str(self.cfg), "-m", "0x2", "--interrupt-mode",
                     "--log-level", "warn", "-T", bdev, "-q", "32", "-o", str(io_size),
                     "-w", "randread", "-t", str(secs), "-l"]
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def result(self):
        """(IOPS, p50 ms, p99 ms)."""
        out, _ = self.proc.communicate(timeout=SECS + 300)
        if self.proc.returncode != 0:
            raise SystemExit("bdevperf failed:\n$ %s\n%s" % (" ".join(self.argv), out))
        m = re.search(r"^\s*Total\s*:\s*([0-9.]+)", out, re.M)
        if not m:
            raise SystemExit("no Total row in:\n" + out)
        return (float(m.group(1)), percentile_us(out, "50.00000") / 1000,
                percentile_us(out, "99.00000") / 1000)


def link_check(work, name, methods, bdev):
    """MiB/s of a plain reader of the link (128 KiB randread QD32, 3 s):
    what a copy could get from it."""
    r = Reader(work, "f-check-" + name, methods, bdev, io_size=128 << 10, secs=3)
    r.start()
    return r.result()[0] / 8


def hydrate(start, hydrated, source_bytes, reader=None, sample=lambda: None):
    """Start hydration (and the reader right after it); wait until it is
    done. Returns a dict: seconds, source bytes read meanwhile, the reader's
    (IOPS, p50, p99), whether the reader outlasted hydration, and the last
    sample() taken while the reader ran."""
    b0 = source_bytes()
    start()
    t0 = time.monotonic()
    if reader:
        reader.start()
    last = None
    try:
        while not hydrated():
            if time.monotonic() - t0 > TIMEOUT:
                raise SystemExit("hydration did not end within %d s" % TIMEOUT)
            if reader and reader.running():
                last = sample() or last
            time.sleep(0.05)
    except BaseException:
        if reader and reader.running():
            reader.proc.kill()
            reader.proc.wait()
        raise
    secs = time.monotonic() - t0
    r = {"secs": secs, "outlasted": bool(reader and reader.running()), "sample": last,
         "bytes0": b0}
    if reader:
        r["reader"] = reader.result()
    r["bytes"] = source_bytes() - b0
    return r


class CloneSide:
    """clone_tgt with the link as delay + QoS bdevs, a clone of it exported
    over NVMe/TCP."""

    name = "clone"

    def __init__(self, target_cls, work, src):
        self.target_cls, self.work, self.src = target_cls, work, src

    def link(self, delay_ms):
        """The source behind the link, as (method, params), bdev Link0."""
        us = int(delay_ms * 1000)
        return [("bdev_uring_create", {"filename": str(self.src), "name": "Src0",
                                       "block_size": 4096}),
                ("bdev_delay_create", {"base_bdev_name": "Src0", "name": "Link0",
                                       "avg_read_latency": us, "p99_read_latency": us,
                                       "avg_write_latency": us, "p99_write_latency": us}),
                ("bdev_set_qos_limit", {"name": "Link0", "rw_mbytes_per_sec": RATE_MIB})]

    def check(self, delay_ms):
        return link_check(self.work, "clone-%gms" % delay_ms, self.link(delay_ms), "Link0")

    def run(self, delay_ms, with_reader):
        tag = "f-clone-%gms%s" % (delay_ms, "-reader" if with_reader else "")
        dst, meta = self.work / (tag + "-dst.img"), self.work / (tag + "-meta.img")
        for p, size in ((dst, LINK_MB * MIB), (meta, 8 * MIB)):
            with open(p, "wb") as f:
                f.truncate(size)
        t = self.target_cls(self.work, tag, interrupt=True)
        try:
            for method, params in self.link(delay_ms):
                t.rpc(method, **params)
            t.rpc("bdev_uring_create", filename=str(dst), name="Dst0", block_size=4096)
            t.rpc("bdev_uring_create", filename=str(meta), name="Meta0", block_size=4096)
            t.rpc("bdev_clone_create", name="Clone0", source_bdev_name="Link0",
                  dest_bdev_name="Dst0", metadata_bdev_name="Meta0", region_size_kb=REGION_KB,
                  no_hydration=True)
            reader = None
            if with_reader:
                port = free_port()
                t.rpc("nvmf_create_transport", trtype="TCP")
                t.rpc("nvmf_create_subsystem", nqn=NQN, allow_any_host=True)
                t.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "Clone0"})
                t.rpc("nvmf_subsystem_add_listener", nqn=NQN, listen_address={
                    "trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1",
                    "trsvcid": str(port)})
                reader = Reader(self.work, tag, [("bdev_nvme_attach_controller", {
                    "name": "Nvme0", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                    "trsvcid": str(port), "subnqn": NQN})], "Nvme0n1")

            def source_bytes():
                return t.rpc("bdev_get_iostat", names=["Link0"])["bdevs"][0]["bytes_read"]

            def state():
                st = t.status("Clone0")
                if st["state"] in ("failed", "read_only"):
                    raise SystemExit("Clone0 %s: %s" % (st["state"], st))
                return st

            r = hydrate(lambda: t.rpc("bdev_clone_set_hydration", name="Clone0", enable=True),
                        lambda: state()["state"] == "hydrated", source_bytes, reader,
                        # hyd's measured source latency / rate / window, when the status has them
                        lambda: state().get("hydration"))
        finally:
            t.stop()
        for p in (dst, meta):
            p.unlink()
        return r


class QemuSide:
    """nbdkit (file + rate + delay) -> qemu-storage-daemon (qcow2 overlay,
    copy-on-read filter, block-stream) exported over NBD."""

    name = "QEMU"

    def __init__(self, work, src):
        self.work, self.src = work, src

    def link(self, tag, delay_ms):
        """nbdkit serving the source behind the link: (process, socket, log)."""
        sock, log = self.work / (tag + "-nbdkit.sock"), self.work / (tag + "-nbdkit.log")
        for p in (sock, log):
            p.unlink(missing_ok=True)
        # log is outermost so that it sees every request of the link; rate
        # before delay as QoS before the delay bdev on the clone's side. The
        # rate filter's bucket starts full and holds `burstiness` seconds of
        # the rate (2 by default: 200 MiB free at the start, 1 GiB then
        # streams at 116 MiB/s); 50 ms (5 MiB, more than one request) makes
        # it the link the clone gets.
        kit = subprocess.Popen(["nbdkit", "-f", "-r", "-U", str(sock), "--filter=log",
                                "--filter=rate", "--filter=delay", "file", str(self.src),
                                "logfile=%s" % log, "rate=%dM" % (RATE_MIB * 8),
                                "burstiness=0.05", "rdelay=%gms" % delay_ms],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_sock(sock, kit, "nbdkit")
        except BaseException:
            stop(kit)
            raise
        return kit, sock, log

    def check(self, delay_ms):
        tag = "f-check-qemu-%gms" % delay_ms
        kit, sock, _ = self.link(tag, delay_ms)
        try:
            return link_check(self.work, "qemu-%gms" % delay_ms, [("bdev_nbd_create", {
                "name": "Nbd0", "uri": "nbd+unix:///?socket=%s" % sock, "block_size": 4096})],
                "Nbd0")
        finally:
            stop(kit)

    def run(self, delay_ms, with_reader):
        tag = "f-qemu-%gms%s" % (delay_ms, "-reader" if with_reader else "")
        d = self.work
        ov, qmp_sock, exp_sock = (d / (tag + s) for s in (".qcow2", "-qmp.sock", "-qsd.sock"))
        for p in (qmp_sock, exp_sock):
            p.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(ov), str(LINK_MB * MIB)],
                       check=True)
        kit, kit_sock, nlog = self.link(tag, delay_ms)
        qsd = None
        qlog = open(d / (tag + "-qsd.log"), "wb")
        try:
            qsd = subprocess.Popen([
                "qemu-storage-daemon",
                "--blockdev", "driver=nbd,node-name=src,server.type=unix,server.path=%s,"
                "read-only=on" % kit_sock,
                "--blockdev", "driver=file,node-name=ovf,filename=%s,aio=io_uring,"
                "cache.direct=on" % ov,
                "--blockdev", "driver=qcow2,node-name=ov,file=ovf,backing=src",
                "--blockdev", "driver=copy-on-read,node-name=cor,file=ov",
                "--nbd-server", "addr.type=unix,addr.path=%s" % exp_sock,
                "--export", "type=nbd,id=e0,node-name=cor,name=clone",
                "--chardev", "socket,id=m,path=%s,server=on,wait=off" % qmp_sock,
                "--monitor", "chardev=m"], stdout=qlog, stderr=subprocess.STDOUT)
            wait_sock(qmp_sock, qsd, "qemu-storage-daemon")
            wait_sock(exp_sock, qsd, "qemu-storage-daemon")
            q = Qmp(qmp_sock)
            reader = None
            if with_reader:
                reader = Reader(d, tag, [("bdev_nbd_create", {
                    "name": "Nbd0", "uri": "nbd+unix:///clone?socket=%s" % exp_sock,
                    "block_size": 4096})], "Nbd0")
            r = hydrate(lambda: q.cmd("block-stream", **{"job-id": "s0", "device": "ov"}),
                        lambda: not q.cmd("query-block-jobs"),
                        # nbdkit writes its log as requests arrive
                        lambda: nbdkit_read_bytes(nlog), reader)
            q.cmd("quit")
            qsd.wait(timeout=60)
        finally:
            if qsd:
                stop(qsd)
            qlog.close()
            stop(kit)
        # all of it, now that nbdkit has exited and flushed its log
        r["bytes"] = nbdkit_read_bytes(nlog) - r["bytes0"]
        ov.unlink()
        return r


def nbdkit_read_bytes(log):
    if not log.exists():
        return 0
    return sum(int(m.group(1), 16) for m in re.finditer(
        r" Read id=\d+ offset=0x[0-9a-f]+ count=0x([0-9a-f]+)", log.read_text()))


def share(r):
    return r["bytes"] / (RATE_MIB * MIB * r["secs"])


def run(work, target_cls, random_file):
    """Runs f; prints its table; returns rows for bench_clone's summary
    table: (benchmark, clone, baseline, ratio, aim)."""
    load = os.getloadavg()
    say("\n== f. hydration over a %d MiB/s link (%s ms reads), %d MiB random source, -r %d, "
        "default tunables; reader 4 KiB randread QD32 %d s; load average %.2f %.2f %.2f"
        % (RATE_MIB, " / ".join("%g" % x for x in DELAYS_MS), LINK_MB, REGION_KB, SECS, *load))
    src = work / "f-src.img"
    random_file(src, LINK_MB)
    sides = [s for s in (CloneSide(target_cls, work, src), QemuSide(work, src))
             if s.name.lower() in SIDES]
    results = {}
    try:
        for delay in DELAYS_MS:
            say("link check, %g ms (a plain reader: bdevperf 128 KiB randread QD32, 3 s): %s"
                % (delay, ", ".join("%s's %.1f MiB/s" % (side.name, side.check(delay))
                                    for side in sides)))
            for side in sides:
                alone = side.run(delay, False)
                say("%s %g ms, alone: %.2f s, %.1f MiB from the source, share %.3f"
                    % (side.name, delay, alone["secs"], alone["bytes"] / MIB, share(alone)))
                busy = side.run(delay, True)
                iops, p50, p99 = busy["reader"]
                # Beyond one copy of the source: user reads that were not
                # kept (a copy-on-read's read counts as the copy).
                user = busy["bytes"] - LINK_MB * MIB
                say("%s %g ms, with the reader: %.2f s, %.1f MiB from the source (%.1f MiB of "
                    "them user reads not kept), busy %.3f; reader %.0f IOPS, p50 %.2f ms, "
                    "p99 %.2f ms%s"
                    % (side.name, delay, busy["secs"], busy["bytes"] / MIB, user / MIB,
                       share(busy), iops, p50, p99,
                       "; the reader outlasted hydration" if busy["outlasted"] else ""))
                if busy["sample"] is not None:
                    say("  status 'hydration' near the reader's end: %s"
                        % json.dumps(busy["sample"]))
                results[(side.name, delay)] = (alone, busy)
    finally:
        src.unlink()
    say("\n| side, link | reads during hydration | p50 / p99 | hydration alone | with the reader "
        "| share of the link alone | link busy with the reader | goal |")
    say("|---|---|---|---|---|---|---|---|")
    for (name, delay), (alone, busy) in results.items():
        iops, p50, p99 = busy["reader"]
        say("| %s, %g ms | %.0f IOPS | %.2f / %.2f ms | %.2f s | %.2f s%s | %.3f | %.3f | %s |"
            % (name, delay, iops, p50, p99, alone["secs"], busy["secs"],
               " (reader outlasted it)" if busy["outlasted"] else "", share(alone), share(busy),
               goal_text(delay) if name == "clone" else "—"))
    return summary_rows(results)


def goal_text(delay):
    g = GOALS.get(int(delay)) if delay == int(delay) else None
    if not g:
        return "—"
    iops, p99, alone, busy = g
    parts = [">= %.1f K IOPS" % (iops / 1000)]
    if p99:
        parts.append("p99 <= %g ms" % p99)
    parts.append("alone >= %.2f" % alone)
    if busy:
        parts.append("busy >= %.2f" % busy)
    return ", ".join(parts)


def summary_rows(results):
    """The clone against QEMU on each link, for bench_clone's table."""
    rows = []
    for delay in DELAYS_MS:
        c, q = results.get(("clone", delay)), results.get(("QEMU", delay))
        if not c:
            continue
        g = GOALS.get(int(delay), (None, None, None, None))
        ci, _, cp99 = c[1]["reader"]
        qi, _, qp99 = q[1]["reader"] if q else (None, None, None)
        rows.append(("f. 4 KiB randread QD32 during hydration, %g ms link, clone vs QEMU" % delay,
                     "%.0f IOPS" % ci, "%.0f IOPS" % qi if q else "—", ci / qi if q else 0,
                     ">= %.0f IOPS" % g[0] if g[0] else ">= 2"))
        rows.append(("f. its p99, clone vs QEMU (%g ms)" % delay, "%.2f ms" % cp99,
                     "%.2f ms" % qp99 if q else "—", cp99 / qp99 if q else 0,
                     "<= %g ms" % g[1] if g[1] else "—"))
        rows.append(("f. hydration alone, share of the %g ms link" % delay, "%.3f" % share(c[0]),
                     "QEMU %.3f" % share(q[0]) if q else "—", share(c[0]),
                     ">= %.2f" % g[2] if g[2] else "—"))
        rows.append(("f. link busy with the reader (%g ms)" % delay, "%.3f" % share(c[1]),
                     "QEMU %.3f" % share(q[1]) if q else "—", share(c[1]),
                     ">= %.2f" % g[3] if g[3] else "—"))
    return rows
