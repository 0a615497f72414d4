"""Helpers for the clone bdev's end-to-end tests (test_clone_*.py).

* Stamped blocks, byte-identical to `app/src/bin/clone_workload.rs`: bytes
  0..8 `CWSTAMP1`, 8..16 seq (0 = the source's stamp), 16..24 the block
  number, then `mix(seq, block)` repeated.
* `WorkloadTarget`: `clone_workload` (the target plus an in-process I/O
  client) driven like `clone_tgt`, with the `workload_io` and
  `workload_dump` RPCs.
* Clone RPC helpers (`bdev_clone_*` of rpc-contract.md §2.7), sent as raw
  JSON-RPC through SPDK's client (no rpc.py plugin needed).
"""

import json
import os
import struct
import subprocess
import time
from pathlib import Path

import pytest
from spdk.rpc.client import JSONRPCException
from conftest import BIN_DIR, SMALL, Target, require_binaries

WORKLOAD_BIN = BIN_DIR / "clone_workload"
CLONECTL = BIN_DIR / "clonectl"

BS = 4096
MAGIC = b"CWSTAMP1"
M64 = (1 << 64) - 1

# Every field the status object must carry (rpc-contract.md §2.7).
STATUS_FIELDS = (
    "name", "uuid", "source_bdev_name", "dest_bdev_name", "metadata_bdev_name",
    "region_size_kb", "num_regions", "hydrated_regions", "hydrating_regions",
    "hydration_enabled", "discard_passdown", "copy_on_read", "hydration_threshold",
    "hydration_batch_size", "hydration_mbytes_per_sec", "state", "paused_reason", "progress",
    "source_released", "errors", "metadata", "hydration",
)
STATES = ("hydrating", "paused", "hydrated", "read_only", "failed")

# Fixed uuids: a restarted stack must look the same to the clone.
UUID_SRC = "6c1a3b5e-0000-4000-8000-000000000001"
UUID_DST = "6c1a3b5e-0000-4000-8000-000000000002"
UUID_MD = "6c1a3b5e-0000-4000-8000-000000000003"
UUID_CLONE = "6c1a3b5e-0000-4000-8000-0000000000c1"


def mix(seq, block):
    z = (seq * 0x9E3779B97F4A7C15 + block * 0xD1B54A32D192ED03 + 0x2545F4914F6CDD1D) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def stamp(seq, block, bs=BS):
    w = struct.pack("<Q", mix(seq, block))
    return MAGIC + struct.pack("<QQ", seq, block) + w * ((bs - 24) // 8)


def stamps(seq, first, count, bs=BS):
    return b"".join(stamp(seq, b, bs) for b in range(first, first + count))


def classify(data, block, bs=BS):
    """'zero', the stamp's seq (int) when `data` is a valid stamp of `block`,
    or None (garbage)."""
    if data.count(0) == len(data):
        return "zero"
    if data[:8] != MAGIC:
        return None
    seq, blk = struct.unpack_from("<QQ", data, 8)
    if blk != block:
        return None
    return seq if data == stamp(seq, block, bs) else None


def describe(data, block, bs=BS):
    c = classify(data, block, bs)
    if c == "zero":
        return "zeroes"
    if c is None:
        if data[:8] == MAGIC:
            seq, blk = struct.unpack_from("<QQ", data, 8)
            return "garbage (a torn or misplaced stamp: seq %d block %d)" % (seq, blk)
        return "garbage (starts %s)" % data[:24].hex()
    return "seq %d" % c if c else "the source stamp"


def make_stamped_file(path, blocks, bs=BS, seq=0):
    with open(path, "wb") as f:
        for b in range(blocks):
            f.write(stamp(seq, b, bs))
    return Path(path)


def make_zero_file(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return Path(path)


def md_required_bytes(num_regions):
    """docs/metadata.md: 8192 + roundup(512 * ceil(regions / 4032), 4096)."""
    units = -(-num_regions // 4032)
    return 8192 + -(-(512 * units) // 4096) * 4096


# ---------------------------------------------------------------------------
# processes


class MaskTarget(Target):
    """clone_tgt on the reactors of `mask` (conftest's Target uses 0x1)."""

    mask = "0x1"

    @property
    def argv(self):
        argv = super().argv
        return argv[:3] + [self.mask] + argv[4:]


class WorkloadTarget(MaskTarget):
    """`clone_workload` serving JSON-RPC (plus workload_io/workload_dump) or
    running a journaled workload; same flags and framework as clone_tgt."""

    @property
    def argv(self):
        return [str(WORKLOAD_BIN)] + super().argv[1:]

    def start(self, wait=True):
        require_binaries(WORKLOAD_BIN)
        return super().start(wait=wait)

    # I/O through the in-process client
    def io(self, io_type, bdev, offset=0, num=0, **kw):
        return self.rpc("workload_io", bdev_name=bdev, io_type=io_type, offset_blocks=offset,
                        num_blocks=num, **kw)

    def read(self, bdev, offset, num):
        return bytes.fromhex(self.io("read", bdev, offset, num)["data"])

    def write_stamps(self, bdev, seq, offset, num):
        return self.io("write", bdev, offset, num, stamp=seq)

    def flush(self, bdev):
        return self.io("flush", bdev)

    def unmap(self, bdev, offset, num):
        return self.io("unmap", bdev, offset, num)

    def dump(self, bdev, path):
        self.rpc("workload_dump", bdev_name=bdev, path=str(path))
        return Path(path).read_bytes()


@pytest.fixture
def wl_factory(request, workdir):
    """start(*extra_args, wait=True, name=None, rpc_server=True, mask="0x1",
    tgt=False) -> WorkloadTarget (or, with tgt=True, clone_tgt itself)"""
    started = request.node.__dict__.setdefault("_clone_targets", [])

    def start(*args, wait=True, name=None, rpc_server=True, mask="0x1", tgt=False):
        cls = MaskTarget if tgt else WorkloadTarget
        t = cls(workdir, args=args, name=name or "%s%d" % ("tgt" if tgt else "wl", len(started)),
                rpc_server=rpc_server)
        t.mask = mask
        started.append(t)
        return t.start(wait=wait)

    yield start
    for t in reversed(started):
        t.kill()


@pytest.fixture(params=["0x1", "0x3"], ids=["1reactor", "2reactors"])
def mask(request):
    """Reactor mask: the clone stripes region ownership over reactors, so
    the I/O tests run on one and on two."""
    return request.param


# ---------------------------------------------------------------------------
# clone RPCs


def clone_create(t, name="Clone0", source="Src", dest="Dst", md="Md", **opts):
    return t.rpc("bdev_clone_create", name=name, source_bdev_name=source, dest_bdev_name=dest,
                 metadata_bdev_name=md, **opts)


def clone_status(t, name="Clone0"):
    got = t.rpc("bdev_clone_get_bdevs", name=name)
    assert isinstance(got, list) and len(got) == 1, got
    return got[0]


def wait_for(pred, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = pred()
        if ok:
            return last
        time.sleep(interval)
    raise AssertionError("timed out after %.0f s waiting for %s; last seen: %s"
                         % (timeout, what, json.dumps(last, indent=1)[:3000]))


def wait_clone(t, name="Clone0", timeout=15):
    """The clone's status once it exists. clone_tgt serves RPCs while its
    --json config is still loading, and framework_wait_init returns before
    the config's bdev methods have run, so poll."""
    def pred():
        try:
            return True, clone_status(t, name)
        except JSONRPCException as e:
            if "response:\n" not in e.message or '"code": -19' not in e.message:
                raise
            return False, e.message
    return wait_for(pred, timeout, "clone %s to be created from the --json config" % name)


def wait_state(t, state, name="Clone0", timeout=60):
    def pred():
        s = clone_status(t, name)
        assert s["state"] in STATES, s
        return s["state"] == state, s
    return wait_for(pred, timeout, "%s to reach state %r" % (name, state))


def wait_hydrated(t, name="Clone0", timeout=60):
    s = wait_state(t, "hydrated", name, timeout)
    assert s["hydrated_regions"] == s["num_regions"], s
    return s


def claimed(t, name):
    return t.bdev(name)["claimed"]


def md_writes(t, name="Md"):
    st = t.rpc("bdev_get_iostat", names=[name])
    bdevs = st["bdevs"] if isinstance(st, dict) else st
    assert len(bdevs) == 1, st
    return bdevs[0]["num_write_ops"]


def uring(filename, name, uuid=None, bs=BS):
    p = {"filename": str(filename), "name": name, "block_size": bs}
    if uuid:
        p["uuid"] = uuid
    return p


def slow_source_clone(t, src, dst, meta, bs, read_us, region_kb, rate_mbps):
    """Clone0 over uring files `src`, `dst`, `meta`, its source behind a
    delay bdev (`read_us` on average, twice that at p99, reads and writes
    alike) so that hydration takes its time."""
    t.rpc("bdev_uring_create", name="SrcFile", filename=str(src), block_size=bs)
    t.rpc("bdev_delay_create", name="Src", base_bdev_name="SrcFile", avg_read_latency=read_us,
          p99_read_latency=2 * read_us, avg_write_latency=read_us, p99_write_latency=2 * read_us)
    t.rpc("bdev_uring_create", name="Dst", filename=str(dst), block_size=bs)
    t.rpc("bdev_uring_create", name="Meta", filename=str(meta), block_size=bs)
    t.rpc("bdev_clone_create", name="Clone0", source_bdev_name="Src", dest_bdev_name="Dst",
          metadata_bdev_name="Meta", region_size_kb=region_kb, hydration_mbytes_per_sec=rate_mbps)


def scale(small, normal):
    return small if SMALL else normal


def file_blocks(path, bs=BS):
    data = Path(path).read_bytes()
    return [data[i:i + bs] for i in range(0, len(data), bs)]


def wait_file_exists(path, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.02)
    return False


def clonectl(sock, *args, timeout=60):
    """Run the real `clonectl -s SOCK ARGS...`; returns CompletedProcess."""
    require_binaries(CLONECTL)
    cmd = [str(CLONECTL), "-s", str(sock)] + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=dict(os.environ, NO_COLOR="1"))
