"""kill -9 of clone_tgt itself under an NVMe/TCP workload on a hydrating clone.

clone_tgt (2 reactors) exports a clone of a delayed uring source; four
threads of test/nvmf_probe.py (one I/O queue each, spread over both reactors)
write stamped blocks, deallocate ranges (DSM) and flush, while hydration runs
rate-limited. At a random moment clone_tgt is killed with SIGKILL; it is
restarted with `--json` (the config saved before the workload, so the clone
resumes from its metadata), the host reconnects and reads every block back
over NVMe/TCP and checks it against a model:

* a write acknowledged before an acknowledged flush (submitted after the
  write's completion) must survive, unless a later command touched the block;
* otherwise a block reads as that durable value, or as any write to it issued
  since, or as zeroes if a deallocate covered it since;
* each 4 KiB block is all of one stamp (LBA, write sequence number): no torn or
  misplaced data; the source blocks carry their own stamp.

After a restart the value read is what the clone holds on disk, so the model
narrows each block to the value read: a later crash must not bring back an
older or a lost value. Several rounds kill during the workload and during the
resumed hydration; the end waits for `hydrated` + `source_released`, reads all
again, stops cleanly and compares the destination file with what was read.
"""

import json
import os
import random
import socket
import struct
import threading
import time

import pytest

import nvmf_probe as probe
from clone_util import slow_source_clone
from conftest import SMALL
from test_nvmf_target import ADDR, free_port

NQN = "nqn.2016-06.io.spdk:clonecrash"
BS = 4096
REGION_KB = 64
BLOCKS_PER_REGION = REGION_KB * 1024 // BS
NUM_BLOCKS = 4096 if SMALL else 8192          # 16 / 32 MiB
ROUNDS = 3 if SMALL else 5
RATE_MBPS = 1                                  # hydration keeps running over the rounds
HOT_WINDOWS = 3                                # per worker and round: writes/deallocates go
WINDOW_REGIONS = 2                             # there (a partial write hydrates its region)
WORKERS = 4                                    # I/O queues, one command in flight each
MAX_IO_BLOCKS = 32                             # 128 KiB reads
MAGIC = b"CLNCRASH"
SRC_KIND, WRITE_KIND = 0, 1
ZERO_BLOCK = bytes(BS)


def stamp(lba, seq, kind):
    return struct.pack("<8sQQQ", MAGIC, lba, seq, kind) * (BS // 32)


def decode(lba, block):
    """'Z' for zeroes, ('S',) for the source stamp, ('W', seq) for a write stamp;
    anything else is reported as it is (torn, misplaced, garbage)."""
    if block == ZERO_BLOCK:
        return "Z"
    magic, blba, seq, kind = struct.unpack("<8sQQQ", block[:32])
    if magic != MAGIC or block != block[:32] * (BS // 32):
        return ("garbage", block[:48].hex())
    if blba != lba:
        return ("misplaced", blba, seq, kind)
    if kind == SRC_KIND and seq == 0:
        return ("S",)
    if kind == WRITE_KIND:
        return ("W", seq)
    return ("garbage", block[:48].hex())


class Model:
    """Per block: `durable` (set of values one of which the block must hold at
    least) and `ops` (writes / deallocates issued since, in issue order; one
    issuer per block, so issue order is also completion order)."""

    def __init__(self, n):
        self.lock = threading.Lock()
        self.durable = [{("S",)} for _ in range(n)]
        self.ops = [[] for _ in range(n)]
        self.done_clock = 0          # completion order of all commands

    def issue(self, lbas, value):
        with self.lock:
            op = {"value": value, "done": None}
            for b in lbas:
                self.ops[b].append(op)
            return op

    def complete(self, op):
        with self.lock:
            self.done_clock += 1
            op["done"] = self.done_clock

    def flush_issued(self):
        with self.lock:
            return self.done_clock

    def flush_done(self, t):
        """Everything completed at or before `t` is durable now."""
        with self.lock:
            for b, ops in enumerate(self.ops):
                last = None
                for i, op in enumerate(ops):
                    if op["done"] is not None and op["done"] <= t:
                        last = i
                if last is None:
                    continue
                self.durable[b] = self._value_after(b, ops[:last + 1])
                del ops[:last + 1]

    def _value_after(self, b, ops):
        """Values the block may hold after `ops` all completed, from durable."""
        cur = set(self.durable[b])
        for op in ops:
            if op["value"] == "Z":
                # Deallocate: zeroes, or unchanged (partial regions are not discarded).
                cur = cur | {"Z"}
            else:
                cur = {op["value"]}
        return cur

    def current(self, b):
        """Values a live read may return (the block's ops have all completed)."""
        with self.lock:
            return self._value_after(b, self.ops[b])

    def after_crash(self, b):
        """Values a read may return after a crash: the durable value, or any
        issued since (completed or not), or zeroes if deallocated since."""
        with self.lock:
            allowed = set(self.durable[b])
            for op in self.ops[b]:
                allowed.add(op["value"])
            return allowed

    def settle(self, b, value):
        """After a restart the clone's on-disk state is what was read."""
        with self.lock:
            self.durable[b] = {value}
            self.ops[b] = []


@pytest.fixture
def targets(tgt2_factory):
    return tgt2_factory


def wait_nvmf(port, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = probe.admin_session(ADDR, port, NQN)
            return admin
        except (OSError, probe.Closed):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def read_all(port, cntlid, nsid=1):
    io = probe.io_session(ADDR, port, NQN, cntlid, qid=1)
    try:
        out = []
        for lba in range(0, NUM_BLOCKS, MAX_IO_BLOCKS):
            n = min(MAX_IO_BLOCKS, NUM_BLOCKS - lba)
            _, data = io.read(nsid, lba, n, bs=BS)
            assert len(data) == n * BS
            out.append(data)
        return b"".join(out)
    finally:
        io.close()


class Worker(threading.Thread):
    """Writes, deallocates, flushes and live-checked reads on the blocks of one
    partition (blocks [lo, hi)), until stopped or the connection dies. Writes and
    deallocates stay in a few hot windows: each partial write to a cold region
    copies that region first, and the hydrator must still be busy at the kill."""

    seq_lock = threading.Lock()
    seq = 0

    def __init__(self, model, port, cntlid, qid, lo, hi, rng):
        super().__init__(daemon=True)
        self.model, self.port, self.cntlid, self.qid = model, port, cntlid, qid
        self.lo, self.hi, self.rng = lo, hi, rng
        regions = range(-(-lo // BLOCKS_PER_REGION), hi // BLOCKS_PER_REGION - WINDOW_REGIONS + 1)
        self.windows = [(r * BLOCKS_PER_REGION, (r + WINDOW_REGIONS) * BLOCKS_PER_REGION)
                        for r in rng.sample(regions, HOT_WINDOWS)]
        self.stop = threading.Event()
        self.error = None
        self.counts = {"write": 0, "dealloc": 0, "flush": 0, "read": 0}

    @classmethod
    def next_seq(cls):
        with cls.seq_lock:
            cls.seq += 1
            return cls.seq

    def run(self):
        try:
            io = probe.io_session(ADDR, self.port, NQN, self.cntlid, qid=self.qid)
        except (OSError, probe.Closed) as e:
            self.error = "connect: %r" % e
            return
        try:
            while not self.stop.is_set():
                self.step(io)
        except (OSError, probe.Closed, socket.timeout):
            pass            # the target was killed
        except probe.Status as e:
            self.error = "command failed: %s" % e
        except AssertionError as e:
            self.error = str(e)
        finally:
            io.close()

    def span(self, maxn, hot=True):
        lo, hi = self.rng.choice(self.windows) if hot else (self.lo, self.hi)
        n = self.rng.randint(1, min(maxn, hi - lo))
        lba = self.rng.randrange(lo, hi - n + 1)
        return lba, n

    def step(self, io):
        r = self.rng.random()
        m = self.model
        if r < 0.55:
            lba, n = self.span(min(BLOCKS_PER_REGION + 4, MAX_IO_BLOCKS))    # within MDTS
            seq = self.next_seq()
            data = b"".join(stamp(lba + i, seq, WRITE_KIND) for i in range(n))
            op = m.issue(range(lba, lba + n), ("W", seq))
            io.write(1, lba, data, bs=BS)
            m.complete(op)
            self.counts["write"] += 1
        elif r < 0.70:
            if self.rng.random() < 0.4:     # whole regions
                lo, hi = self.rng.choice(self.windows)
                lba = self.rng.randrange(lo, hi, BLOCKS_PER_REGION)
                n = BLOCKS_PER_REGION * self.rng.randint(1, (hi - lba) // BLOCKS_PER_REGION)
            else:
                lba, n = self.span(2 * BLOCKS_PER_REGION)
            op = m.issue(range(lba, lba + n), "Z")
            io.deallocate(1, [(lba, n)])
            m.complete(op)
            self.counts["dealloc"] += 1
        elif r < 0.85:
            t = m.flush_issued()
            io.flush(1)
            m.flush_done(t)
            self.counts["flush"] += 1
        else:
            lba, n = self.span(MAX_IO_BLOCKS, hot=self.rng.random() < 0.5)
            _, data = io.read(1, lba, n, bs=BS)
            for i in range(n):
                got = decode(lba + i, data[i * BS:(i + 1) * BS])
                want = m.current(lba + i)
                assert got in want, "live read of block %d: %r, expected one of %r" % (
                    lba + i, got, want)
            self.counts["read"] += 1


def run_workload(model, port, admin, rng):
    """WORKERS workers, one I/O queue each (queues alternate over both
    reactors), each on its own slice of the blocks, until stopped or killed."""
    part = NUM_BLOCKS // WORKERS
    ws = [Worker(model, port, admin.cntlid, 1 + i, i * part, (i + 1) * part,
                 random.Random(rng.random()))
          for i in range(WORKERS)]
    for w in ws:
        w.start()
    return ws


def stop_workers(ws, timeout=20):
    for w in ws:
        w.stop.set()
    for w in ws:
        w.join(timeout)
        assert not w.is_alive(), "a workload thread hangs"
    errors = [w.error for w in ws if w.error]
    assert not errors, errors
    total = {}
    for w in ws:
        for k, v in w.counts.items():
            total[k] = total.get(k, 0) + v
    return total


def check_all(model, port, admin, what):
    """Read every block; returns how many had to hold one exact written value."""
    image = read_all(port, admin.cntlid)
    bad, exact = [], 0
    for b in range(NUM_BLOCKS):
        got = decode(b, image[b * BS:(b + 1) * BS])
        allowed = model.after_crash(b)
        if got not in allowed:
            bad.append((b, got, sorted(map(str, allowed))))
        else:
            exact += len(allowed) == 1 and got[0] == "W"
            model.settle(b, got)
    assert not bad, "%s: %d blocks wrong, first: %r" % (what, len(bad), bad[:5])
    return exact


def clone_status(tgt):
    return tgt.rpc("bdev_clone_get_bdevs", name="Clone0")[0]


def test_kill9_during_nvmf_workload_and_hydration(targets, datadir, workdir):
    seed = int(os.environ.get("CLONE_TGT_TEST_SEED", time.time_ns() % 100000))
    rng = random.Random(seed)
    print("seed", seed)
    size = NUM_BLOCKS * BS
    src = datadir / "src.img"
    with open(src, "wb") as f:
        for lba in range(NUM_BLOCKS):
            f.write(stamp(lba, 0, SRC_KIND))
    dst, meta = datadir / "dst.img", datadir / "meta.img"
    with open(dst, "wb") as f:
        f.truncate(size)
    with open(meta, "wb") as f:
        f.truncate(1 << 20)
    port = free_port()

    tgt = targets()
    slow_source_clone(tgt, src, dst, meta, BS, read_us=1000, region_kb=REGION_KB,
                      rate_mbps=RATE_MBPS)
    tgt.rpc("nvmf_create_transport", trtype="TCP")
    tgt.rpc("nvmf_create_subsystem", nqn=NQN, allow_any_host=True, serial_number="CLONECRASH01")
    tgt.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "Clone0"})
    tgt.rpc("nvmf_subsystem_add_listener", nqn=NQN,
            listen_address={"trtype": "TCP", "traddr": ADDR, "trsvcid": str(port)})
    cfg = workdir / "config.json"
    cfg.write_text(tgt.cli("save_config").stdout)  # rpc.py builds it from framework_get_config
    methods = [c["method"] for s in json.loads(cfg.read_text())["subsystems"]
               for c in (s["config"] or [])]
    for m in ("bdev_clone_create", "bdev_delay_create", "nvmf_subsystem_add_listener"):
        assert m in methods, "save_config lacks %s: %s" % (m, methods)

    model = Model(NUM_BLOCKS)
    totals = {"write": 0, "dealloc": 0, "flush": 0, "read": 0}
    kills, exact = [], 0
    for rnd in range(ROUNDS):
        admin = wait_nvmf(port)
        idle = rnd == ROUNDS - 2         # one kill with only the resumed hydration running
        ws = [] if idle else run_workload(model, port, admin, rng)
        time.sleep(rng.uniform(0.3, 1.5))
        st = clone_status(tgt)
        assert st["state"] == "hydrating" and st["hydrated_regions"] < st["num_regions"], (
            "round %d: hydration is not running at the kill (%s %d/%d): the test proves "
            "nothing" % (rnd, st["state"], st["hydrated_regions"], st["num_regions"]))
        os.kill(tgt.pid, 9)
        tgt.wait_exit()
        kills.append((rnd, "idle" if idle else "workload", st["hydrated_regions"]))
        for w in ws:
            w.stop.set()
        counts = stop_workers(ws)
        for k, v in counts.items():
            totals[k] += v
        admin.close()

        # restart at once (the old listener may still linger: see test_restart_at_once_*)
        tgt = targets(("--json", cfg), sock=tgt.sock)
        st = clone_status(tgt)
        assert st["state"] in ("hydrating", "hydrated"), st
        # resumed, not started over: the regions committed before the kill are still there
        assert st["hydrated_regions"] > 0, st
        admin = wait_nvmf(port)
        exact += check_all(model, port, admin, "after kill %d" % (rnd + 1))
        admin.close()

    assert totals["write"] > 50 and totals["flush"] > 5 and totals["dealloc"] > 5, totals
    assert exact > 100, "only %d blocks had to hold a flushed write: proves too little" % exact

    # A last clean workload, a flush, then let hydration finish.
    admin = wait_nvmf(port)
    ws = run_workload(model, port, admin, rng)
    time.sleep(1.0)
    stop_workers(ws)
    io = probe.io_session(ADDR, port, NQN, admin.cntlid, qid=1)
    t = model.flush_issued()
    io.flush(1)
    model.flush_done(t)
    io.close()
    tgt.rpc("bdev_clone_set_hydration", name="Clone0", hydration_mbytes_per_sec=0)
    deadline = time.monotonic() + 60
    while True:
        st = clone_status(tgt)
        if st["state"] == "hydrated" and st["source_released"]:
            break
        assert st["state"] in ("hydrating", "hydrated") and time.monotonic() < deadline, st
        time.sleep(0.1)
    assert st["errors"] == {"source_read": 0, "dest_write": 0, "metadata": 0}, st
    image = read_all(port, admin.cntlid)
    bad = []
    for b in range(NUM_BLOCKS):
        got = decode(b, image[b * BS:(b + 1) * BS])
        if got not in model.current(b):
            bad.append((b, got, model.current(b)))
    assert not bad, "hydrated: %d blocks wrong, first: %r" % (len(bad), bad[:5])
    admin.close()
    tgt.stop()
    assert "panicked" not in tgt.log()
    with open(dst, "rb") as f:
        on_disk = f.read(size)
    assert on_disk == image, "the destination file differs from what the clone served"
    print("kills (round, during, hydrated regions)", kills, "ops", totals,
          "blocks checked to hold exactly their flushed write", exact)


def nvmf_config(tgt, port, bdev="M"):
    tgt.rpc("nvmf_create_transport", trtype="TCP")
    tgt.rpc("nvmf_create_subsystem", nqn=NQN, allow_any_host=True)
    tgt.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": bdev})
    tgt.rpc("nvmf_subsystem_add_listener", nqn=NQN,
            listen_address={"trtype": "TCP", "traddr": ADDR, "trsvcid": str(port)})


def test_restart_at_once_after_kill9_listens_again(targets, workdir):
    """A killed clone_tgt's listening socket outlives the process by 10-20 ms
    (the kernel tears its io_uring, holding the pending Accept, down
    asynchronously). A restart from --json right away used to fail its config
    load with EADDRINUSE every time; the listener now retries for a second."""
    port = free_port()
    tgt = targets()
    tgt.rpc("bdev_malloc_create", name="M", num_blocks=1024, block_size=512)
    nvmf_config(tgt, port)
    cfg = workdir / "config.json"
    cfg.write_text(tgt.cli("save_config").stdout)
    for _ in range(3 if SMALL else 6):
        admin = wait_nvmf(port)
        io = probe.io_session(ADDR, port, NQN, admin.cntlid)
        io.write(1, 7, bytes(range(256)) * 2)      # (a malloc bdev: lost at the kill)
        os.kill(tgt.pid, 9)
        tgt.wait_exit()
        tgt = targets(("--json", cfg), sock=tgt.sock)
        admin.close()
        io.close()
        admin = wait_nvmf(port)
        assert probe.io_session(ADDR, port, NQN, admin.cntlid).read(1, 7, 1)[1] == bytes(512)
        admin.close()
    tgt.stop()


def test_listen_on_a_port_in_use_still_fails(targets):
    """The retry is bounded: a port someone else listens on is refused after ~1 s."""
    holder = socket.socket()
    holder.bind((ADDR, 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        tgt = targets()
        tgt.rpc("bdev_malloc_create", name="M", num_blocks=1024, block_size=512)
        tgt.rpc("nvmf_create_transport", trtype="TCP")
        tgt.rpc("nvmf_create_subsystem", nqn=NQN, allow_any_host=True)
        t0 = time.monotonic()
        assert tgt.rpc_err("nvmf_subsystem_add_listener", nqn=NQN,
                           listen_address={"trtype": "TCP", "traddr": ADDR,
                                           "trsvcid": str(port)}) == (-32602, "Invalid parameters")
        took = time.monotonic() - t0
        assert 0.9 < took < 5, took
        assert "Address already in use" in tgt.log()
        assert tgt.rpc("nvmf_subsystem_get_listeners", nqn=NQN) == []
        tgt.stop()
    finally:
        holder.close()
