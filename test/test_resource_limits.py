"""RPCs whose parameters size an allocation: a size the machine cannot give
is refused with -12 ("Cannot allocate memory: ...", naming the size and the
limit; nvmf_create_transport: SPDK's -32603 text, then why), changes
nothing, and the target keeps serving: a bdev exported over NVMe/TCP before
the bad RPC still reads back what was written to it.

Before this was checked, `bdev_malloc_create` of more than the free memory
got the whole target OOM-killed while it faulted the RAM disk in, and an
allocation over the address-space limit (`ulimit -v`) aborted it.
"""

import json
import os
import resource

import pytest

import nvmf_probe as P
from test_nvmf_target import ADDR, free_port

NQN = "nqn.2016-06.io.spdk:cnode-limits"
ENOMEM = -12
MSG = "Cannot allocate memory: "


class Served:
    """A malloc bdev exported over NVMe/TCP, with a pattern written to it
    through a real NVMe/TCP queue pair."""

    BLOCKS, BS = 16384, 512

    def __init__(self, tgt):
        self.tgt = tgt
        port = free_port()
        tgt.rpc("bdev_malloc_create", name="Keep", num_blocks=self.BLOCKS, block_size=self.BS)
        tgt.rpc("nvmf_create_transport", trtype="TCP")
        tgt.rpc("nvmf_create_subsystem", nqn=NQN, allow_any_host=True)
        tgt.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "Keep"})
        tgt.rpc("nvmf_subsystem_add_listener", nqn=NQN,
                listen_address={"trtype": "tcp", "traddr": ADDR, "trsvcid": str(port)})
        self.admin = P.admin_session(ADDR, port, NQN)
        self.io = P.io_session(ADDR, port, NQN, self.admin.cntlid)
        self.data = os.urandom(64 * self.BS)
        self.io.write(1, 100, self.data)
        self.io.flush(1)

    def check(self, names_before):
        """The target is alive, its bdevs are those it had, and the data reads back."""
        assert self.tgt.running(), self.tgt.log()[-3000:]
        assert set(self.tgt.bdevs()) == names_before
        assert self.io.read(1, 100, 64)[1] == self.data, "data written before the bad RPC changed"
        # And it still creates what fits.
        assert self.tgt.rpc("bdev_malloc_create", name="After", num_blocks=2048,
                            block_size=512) == "After"

    def close(self):
        self.io.close()
        self.admin.close()


@pytest.fixture
def served(tgt):
    s = Served(tgt)
    yield s
    s.close()


def meminfo_bytes(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no %s in /proc/meminfo" % key)


def vm_size(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize for pid %d" % pid)


class AddressSpaceLimit:
    """Lower the target's soft RLIMIT_AS (`ulimit -v`) to what it has mapped
    plus `room` bytes; restored on exit (the hard limit is left alone)."""

    def __init__(self, pid, room):
        self.pid, self.room = pid, room

    def __enter__(self):
        self.old = resource.prlimit(self.pid, resource.RLIMIT_AS)
        resource.prlimit(self.pid, resource.RLIMIT_AS,
                         (vm_size(self.pid) + self.room, self.old[1]))
        return self

    def __exit__(self, *exc):
        try:
            resource.prlimit(self.pid, resource.RLIMIT_AS, self.old)
        except ProcessLookupError:
            pass   # the target died: the test reports that


def malloc_sizes():
    """(id, MB): far beyond any machine, and the whole RAM (just over what
    is free, since something always uses some)."""
    ram_mb = -(-meminfo_bytes("MemTotal") // (1 << 20))
    return [("1TiB", 1 << 20), ("ram", ram_mb)]


def cli_error(cp):
    """(code, message) of the JSON-RPC error rpc.py printed."""
    text = cp.stdout + cp.stderr
    marker = "response:\n"
    idx = text.rfind(marker)
    assert idx >= 0, text
    err = json.loads(text[idx + len(marker):])
    return err["code"], err["message"]


@pytest.mark.parametrize("case,mb", malloc_sizes(), ids=[c for c, _ in malloc_sizes()])
def test_malloc_larger_than_memory(tgt, served, case, mb):
    before = set(tgt.bdevs())
    # rpc.py's own CLI, as a user types it (size in MB, block size).
    cp = tgt.cli("bdev_malloc_create", "-b", "Big", str(mb), "512", check=False)
    assert cp.returncode != 0, cp.stdout
    code, msg = cli_error(cp)
    assert code == ENOMEM, (code, msg)
    assert msg.startswith(MSG), msg
    assert "malloc bdev 'Big'" in msg and "%d bytes" % (mb << 20) in msg, msg
    assert "MemAvailable" in msg or "cgroup" in msg or "address-space" in msg, msg
    served.check(before)


def test_malloc_over_address_space_limit(tgt, served):
    """1 GiB fits in memory but not under `ulimit -v`: mmap fails, which used
    to abort the target."""
    before = set(tgt.bdevs())
    with AddressSpaceLimit(tgt.pid, 128 << 20):
        code, msg = tgt.rpc_err("bdev_malloc_create", name="Big", num_blocks=2 << 20,
                                block_size=512)
    assert code == ENOMEM, (code, msg)
    assert msg.startswith(MSG) and "%d bytes" % (1 << 30) in msg, msg
    assert "address-space limit" in msg, msg
    served.check(before)


def test_clone_map_over_address_space_limit(tgt, served):
    """An 8 TiB source in 4 KiB regions needs a 256 MiB region map: refused
    before anything is claimed or written when it cannot be had (the
    allocation used to abort the target)."""
    for name in ("Src", "Dst", "Md"):
        tgt.rpc("bdev_null_create", name=name, num_blocks=2 << 30, block_size=4096)
    before = set(tgt.bdevs())
    with AddressSpaceLimit(tgt.pid, 128 << 20):
        code, msg = tgt.rpc_err("bdev_clone_create", name="Clone0", source_bdev_name="Src",
                                dest_bdev_name="Dst", metadata_bdev_name="Md",
                                region_size_kb=4, no_hydration=True)
    assert code == ENOMEM, (code, msg)
    assert msg.startswith(MSG), msg
    assert "clone of 2147483648 regions" in msg and "address-space limit" in msg, msg
    for name in ("Src", "Dst", "Md"):
        assert tgt.bdev(name)["claimed"] is False
    served.check(before)


def test_nvmf_transport_queue_beyond_memory(tgt):
    """A write's buffer is taken when its command arrives: a transport whose
    one queue pair may hold 65535 writes of 8 MiB (512 GiB) would let one
    host exhaust memory. Refused with SPDK's error and the reason; a
    transport that fits is then created and serves."""
    code, msg = tgt.rpc_err("nvmf_create_transport", trtype="TCP", max_queue_depth=65535,
                            max_io_size=8 << 20)
    assert code == -32603, (code, msg)
    assert msg.startswith("Transport type 'TCP' create failed: "), msg
    assert "max_queue_depth 65535" in msg and "max_io_size 8388608" in msg, msg
    assert "could not allocate %d bytes" % (65535 * (8 << 20)) in msg, msg
    assert tgt.rpc("nvmf_get_transports") == []
    s = Served(tgt)
    try:
        s.check({"Keep"})
    finally:
        s.close()
