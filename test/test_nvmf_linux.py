"""The real Linux NVMe/TCP host (nvme-cli + nvme-tcp in a QEMU guest built
by test/vm/linux-guest, see docs/testing.md) against clone_tgt: discover, connect, id-ctrl,
id-ns, ns-descs, logs, dd and fio verify, out-of-range read, write zeroes,
discard, mkfs.ext4 + mount + fstrim, disconnect, and digests."""

import os
import re
import subprocess
from pathlib import Path

from test_nvmf_target import ADDR, free_port

ROOT = Path(__file__).resolve().parents[1]
GUEST_SCRIPT = ROOT / "test" / "guest" / "nvmf_linux.sh"
NQN = "nqn.2016-06.io.spdk:linux1"


def test_linux_host(tgt2, linux_guest):
    tgt = tgt2
    port, dport = free_port(), free_port()
    tgt.rpc("bdev_malloc_create", name="Malloc0", num_blocks=131072, block_size=512)
    tgt.rpc("nvmf_create_transport", trtype="TCP")
    tgt.rpc("nvmf_create_subsystem", nqn=NQN, allow_any_host=True, serial_number="CLONETGT0001",
            model_number="clone-tgt linux test")
    tgt.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "Malloc0"})
    for p, nqn in ((port, NQN), (port, "nqn.2014-08.org.nvmexpress.discovery"),
                   (dport, "nqn.2014-08.org.nvmexpress.discovery")):
        tgt.rpc("nvmf_subsystem_add_listener", nqn=nqn,
                listen_address={"trtype": "TCP", "traddr": ADDR, "trsvcid": str(p)})
    argv = [str(linux_guest), "run", "--timeout", "1200", str(GUEST_SCRIPT), str(port), NQN, str(dport)]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=1500,
                        stdin=subprocess.DEVNULL)
    out = cp.stdout + "\n" + cp.stderr
    fails = re.findall(r"CHECK-FAIL .*", out)
    oks = re.findall(r"CHECK-OK (\S+)", out)
    assert cp.returncode == 0 and not fails, "guest exit %d, failed checks %s\n%s" % (
        cp.returncode, fails, out[-15000:])
    for must in ("connect", "dd-verify", "fio-verify", "oob-read", "mkfs", "fs-verify", "fstrim",
                 "disconnect", "digest-verify", "discover-dport", "discover-ioport", "ka-live", "reset",
                 "reset-verify", "write-zeroes", "zeroes-read"):
        assert must in oks, "check %s did not run\n%s" % (must, out[-15000:])
    # The host disconnected cleanly: no controller left, no panic.
    assert tgt.rpc("nvmf_subsystem_get_controllers", nqn=NQN) == []
    assert "panicked" not in tgt.log()
    tgt.stop()
