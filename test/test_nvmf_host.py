"""End to end: our NVMe/TCP host (bdev_nvme_*) against our NVMe/TCP target,
two clone_tgt processes (or a target and bdevperf) over loopback, driven by
SPDK's own spdk-rpc. bdevperf's verify workload checks the data.
"""

import json
import socket
import time

import pytest

from conftest import (PERF_SECS, SMALL, concurrent_rpc, parse_rpc_error, run_bdevperf,
                      write_bdev_config)
from spdk.rpc.client import JSONRPCException

NQN = "nqn.2016-06.io.spdk:cnode1"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6d1f3e2a-51b5-4c3e-9c3b-0a8f1d2e3c4b"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def setup_target(t, port, transport=(), mb=64, bs=512, allow_any=True, name="Malloc0"):
    t.rpc("bdev_malloc_create", name=name, num_blocks=mb * 1024 * 1024 // bs, block_size=bs)
    t.cli("nvmf_create_transport", "-t", "tcp", *transport)
    args = ["nvmf_create_subsystem", NQN, "-s", "SPDK00000000000001"]
    if allow_any:
        args.append("-a")
    t.cli(*args)
    t.cli("nvmf_subsystem_add_ns", NQN, name)
    t.cli("nvmf_subsystem_add_listener", NQN, "-t", "tcp", "-a", "127.0.0.1", "-s", str(port),
          "-f", "ipv4")
    return t


def attach_params(port, name="Nvme0", **kw):
    p = {"name": name, "trtype": "tcp", "traddr": "127.0.0.1", "adrfam": "ipv4",
         "trsvcid": str(port), "subnqn": NQN}
    p.update(kw)
    return p


def perf_config(workdir, port, fname="nvme.json", **kw):
    return write_bdev_config(workdir / fname,
                             [("bdev_nvme_attach_controller", attach_params(port, **kw))])


@pytest.fixture
def target(tgt_factory, workdir):
    port = free_port()
    t = setup_target(tgt_factory(name="target", sock=workdir / "target.sock"), port)
    t.port = port
    return t


def test_attach_identify_get_detach(tgt_factory, workdir, target):
    host = tgt_factory(name="host", sock=workdir / "host.sock")
    port = target.port
    cp = host.cli("bdev_nvme_attach_controller", "-b", "Nvme0", "-t", "tcp", "-a", "127.0.0.1",
                  "-f", "ipv4", "-s", port, "-n", NQN, "-q", HOSTNQN)
    assert cp.stdout.split() == ["Nvme0n1"]
    b = host.bdev("Nvme0n1")
    m = target.bdev("Malloc0")
    assert b["product_name"] == "NVMe disk"
    assert (b["block_size"], b["num_blocks"]) == (m["block_size"], m["num_blocks"])
    # The namespace UUID (from the NS descriptors) is the target bdev's.
    assert b["uuid"] == m["uuid"]
    assert b["supported_io_types"]["unmap"] and b["supported_io_types"]["write_zeroes"]
    nv = b["driver_specific"]["nvme"][0]
    assert nv["trid"]["subnqn"] == NQN and nv["trid"]["trsvcid"] == str(port)
    assert nv["ctrlr_data"]["serial_number"] == "SPDK00000000000001"

    ctrls = host.rpc("bdev_nvme_get_controllers")
    assert len(ctrls) == 1 and ctrls[0]["name"] == "Nvme0"
    c = ctrls[0]["ctrlrs"][0]
    assert c["state"] == "enabled"
    assert c["trid"] == {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1",
                         "trsvcid": str(port), "subnqn": NQN}
    assert c["host"]["nqn"] == HOSTNQN
    assert host.rpc("bdev_nvme_get_controllers", name="Nvme0") == ctrls
    assert host.rpc_err("bdev_nvme_get_controllers", name="Nope") == (-19, "No such device")

    # The same name again: SPDK's -114 and text.
    code, msg = host.rpc_err("bdev_nvme_attach_controller", **attach_params(port))
    assert code == -114
    assert msg == "A controller named Nvme0 already exists and multipath is disabled"

    # The target sees one controller of our host NQN.
    tc = target.rpc("nvmf_subsystem_get_controllers", nqn=NQN)
    assert [x["hostnqn"] for x in tc] == [HOSTNQN]

    host.cli("bdev_nvme_detach_controller", "Nvme0")
    assert "Nvme0n1" not in host.bdevs()
    assert host.rpc("bdev_nvme_get_controllers") == []
    assert host.rpc_err("bdev_nvme_detach_controller", name="Nvme0") == (-19, "No such device")
    deadline = time.monotonic() + 5
    while target.rpc("nvmf_subsystem_get_controllers", nqn=NQN) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target.rpc("nvmf_subsystem_get_controllers", nqn=NQN) == []


def test_concurrent_detaches_one_true_the_others_enodev(tgt_factory, workdir, target):
    """Issue #8 defect 7 for bdev_nvme_detach_controller: a detach that
    found the controller already being detached answered true too."""
    host = tgt_factory(name="host", sock=workdir / "host.sock")
    host.rpc("bdev_nvme_attach_controller", **attach_params(target.port))
    got = concurrent_rpc(host, 4, "bdev_nvme_detach_controller", name="Nvme0")
    assert sorted(got, key=str) == sorted([(True, None)] + [(None, -19)] * 3, key=str), got
    assert host.rpc("bdev_nvme_get_controllers") == []
    assert "Nvme0n1" not in host.bdevs()


def test_attach_errors(tgt_factory, workdir, target):
    host = tgt_factory(name="host", sock=workdir / "host.sock")
    port = target.port
    # Unknown subsystem: the Connect is rejected, the reason is named.
    code, msg = host.rpc_err("bdev_nvme_attach_controller",
                             **dict(attach_params(port), subnqn="nqn.2016-06.io.spdk:none"))
    assert code == -5 and "subnqn" in msg, msg
    # Nothing listening.
    code, msg = host.rpc_err("bdev_nvme_attach_controller", **attach_params(free_port()))
    assert code == -5 and "cannot connect" in msg, msg
    # SPDK's parameter rules.
    code, msg = host.rpc_err("bdev_nvme_attach_controller",
                             **attach_params(port, ctrlr_loss_timeout_sec=5))
    assert code == -22 and "reconnect_delay_sec" in msg
    code, msg = host.rpc_err("bdev_nvme_attach_controller",
                             **dict(attach_params(port), trtype="rdma"))
    assert code == -22 and "trtype" in msg
    code, msg = host.rpc_err("bdev_nvme_attach_controller",
                             **dict(attach_params(port), bogus=1))
    assert (code, msg) == (-32603, "spdk_json_decode_object failed")
    code, _ = host.rpc_err("bdev_nvme_attach_controller", **dict(attach_params(port), psk="x"))
    assert code == -22
    assert host.rpc("bdev_nvme_get_controllers") == []
    assert host.bdevs() == {}


def test_access_list(tgt_factory, workdir):
    port = free_port()
    target = setup_target(tgt_factory(name="target", sock=workdir / "target.sock"), port, allow_any=False)
    host = tgt_factory(name="host", sock=workdir / "host.sock")
    code, msg = host.rpc_err("bdev_nvme_attach_controller", **attach_params(port, hostnqn=HOSTNQN))
    assert code == -5 and "not allowed" in msg, msg
    target.cli("nvmf_subsystem_add_host", NQN, HOSTNQN)
    assert host.rpc("bdev_nvme_attach_controller",
                    **attach_params(port, hostnqn=HOSTNQN)) == ["Nvme0n1"]
    # Another host NQN is still refused.
    code, _ = host.rpc_err("bdev_nvme_attach_controller",
                           **attach_params(port, name="Nvme1", hostnqn=HOSTNQN + "x"))
    assert code == -5


def test_discovery_controller(tgt_factory, workdir, target):
    """Attaching to the discovery NQN (SPDK's default when subnqn is absent)
    gives a controller with no namespaces."""
    host = tgt_factory(name="host", sock=workdir / "host.sock")
    p = attach_params(target.port)
    del p["subnqn"]
    assert host.rpc("bdev_nvme_attach_controller", **p) == []
    c = host.rpc("bdev_nvme_get_controllers")[0]["ctrlrs"][0]
    assert c["trid"]["subnqn"] == "nqn.2014-08.org.nvmexpress.discovery"
    assert c["state"] == "enabled"
    host.rpc("bdev_nvme_detach_controller", name="Nvme0")


@pytest.mark.parametrize("digests", ["none", "hdgst", "ddgst", "both"])
def test_bdevperf_verify_digests(workdir, target, digests):
    kw = {"hdgst": digests in ("hdgst", "both"), "ddgst": digests in ("ddgst", "both")}
    cfg = perf_config(workdir, target.port, **kw)
    for size in ("4k", "128k"):
        r = run_bdevperf(cfg, "-q", "16", "-o", size, "-w", "verify")
        assert r.returncode == 0, r.describe()
        assert r.total["iops"] > 0 and r.total["fail_per_s"] == 0, r.describe()


@pytest.mark.parametrize("transport,sizes", [
    # In-capsule writes up to 8 KiB, R2T above it.
    (("-c", "8192"), ("512", "4k", "8k", "12k", "64k")),
    # No in-capsule data at all: every write goes by R2T.
    (("-c", "0"), ("512", "4k", "20k")),
    # max_io_size 16 KiB (MDTS): 128 KiB and 1 MiB I/O are split.
    (("-i", "16384", "-c", "4096"), ("4k", "128k", "1m")),
])
def test_bdevperf_verify_sizes_icd_r2t_split(tgt_factory, workdir, transport, sizes):
    port = free_port()
    setup_target(tgt_factory(name="target", sock=workdir / "target.sock"), port, transport=transport)
    cfg = perf_config(workdir, port)
    for size in sizes:
        r = run_bdevperf(cfg, "-q", "8", "-o", size, "-w", "verify", secs=1)
        assert r.returncode == 0, r.describe()
        assert r.total["iops"] > 0 and r.total["fail_per_s"] == 0, r.describe()


def test_unmap_write_zeroes_flush(workdir, target):
    cfg = perf_config(workdir, target.port)
    for w in ("unmap", "write_zeroes", "flush"):
        r = run_bdevperf(cfg, "-q", "8", "-o", "64k", "-w", w, secs=1)
        assert r.returncode == 0, r.describe()
        assert r.total["iops"] > 0 and r.total["fail_per_s"] == 0, r.describe()


def test_save_config_replays(tgt_factory, target, workdir):
    host = tgt_factory(name="host", sock=workdir / "host.sock")
    host.rpc("bdev_nvme_attach_controller",
             **attach_params(target.port, hostnqn=HOSTNQN, ctrlr_loss_timeout_sec=10,
                             reconnect_delay_sec=2, fast_io_fail_timeout_sec=4))
    cp = host.cli("save_config")
    cfg = json.loads(cp.stdout)
    bdev_sub = [s for s in cfg["subsystems"] if s["subsystem"] == "bdev"][0]
    attach = [c for c in bdev_sub["config"] if c["method"] == "bdev_nvme_attach_controller"]
    assert len(attach) == 1
    p = attach[0]["params"]
    assert (p["name"], p["trtype"], p["traddr"], p["trsvcid"], p["subnqn"], p["hostnqn"]) == \
        ("Nvme0", "TCP", "127.0.0.1", str(target.port), NQN, HOSTNQN)
    assert (p["ctrlr_loss_timeout_sec"], p["reconnect_delay_sec"],
            p["fast_io_fail_timeout_sec"]) == (10, 2, 4)
    path = workdir / "saved.json"
    path.write_text(cp.stdout)
    host.stop()
    again = tgt_factory("--json", path, name="host2", sock=workdir / "host2.sock")
    assert "Nvme0n1" in again.bdevs()
    assert again.rpc("bdev_nvme_get_controllers")[0]["ctrlrs"][0]["host"]["nqn"] == HOSTNQN


def test_keep_alive_keeps_the_association(tgt_factory, workdir, target):
    """KATO 3 s: idle for more than two KATOs, the controller stays the same
    one (the target would have dropped it without our Keep Alives)."""
    host = tgt_factory(name="host", sock=workdir / "host.sock")
    host.rpc("bdev_nvme_set_options", keep_alive_timeout_ms=3000)
    host.rpc("bdev_nvme_attach_controller", **attach_params(target.port))
    code, _ = host.rpc_err("bdev_nvme_set_options", keep_alive_timeout_ms=4000)
    assert code == -1
    before = target.rpc("nvmf_subsystem_get_controllers", nqn=NQN)
    assert len(before) == 1
    assert "kato=3000" in target.log()
    time.sleep(7)
    after = target.rpc("nvmf_subsystem_get_controllers", nqn=NQN)
    assert [c["cntlid"] for c in after] == [c["cntlid"] for c in before]
    assert host.rpc("bdev_nvme_get_controllers")[0]["ctrlrs"][0]["state"] == "enabled"
    assert "keep-alive timeout" not in target.log()
    assert "connection lost" not in host.log()


def test_reconnect_after_target_restart(tgt_factory, workdir):
    """bdevperf reads through a target that goes away and comes back: I/O
    fails fast while it is down (after fast_io_fail_timeout_sec), the host
    reconnects every reconnect_delay_sec, and I/O works again after."""
    port = free_port()
    target = setup_target(tgt_factory(name="target", sock=workdir / "target.sock"), port)
    saved = workdir / "target.json"
    saved.write_text(target.cli("save_config").stdout)
    cfg = perf_config(workdir, port, ctrlr_loss_timeout_sec=30, reconnect_delay_sec=1,
                      fast_io_fail_timeout_sec=1)
    perf_sock = workdir / "perf.sock"
    import subprocess
    from conftest import PERF_BIN
    argv = [str(PERF_BIN), "--json", str(cfg), "--interrupt-mode", "-q", "8", "-o", "4k",
            "-w", "randread", "-t", "12", "-f", "-r", str(perf_sock)]
    # A file, not a pipe: an assertion below shows what bdevperf logged.
    perf_log = workdir / "perf.log"
    with open(perf_log, "w") as log:
        perf = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        from spdk.rpc.client import JSONRPCClient
        deadline = time.monotonic() + 10
        while not perf_sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        cl = JSONRPCClient(str(perf_sock), timeout=10)

        def reads():
            return cl.call("bdev_get_iostat", {"names": ["Nvme0n1"]})["bdevs"][0]["num_read_ops"]

        def state():
            return cl.call("bdev_nvme_get_controllers", {})[0]["ctrlrs"][0]["state"]

        assert reads() > 0 and state() == "enabled"
        target.kill()
        time.sleep(2.5)
        assert state() == "resetting"
        stalled = reads()
        time.sleep(0.5)
        assert reads() == stalled, "reads succeeded with the target down"
        target2 = tgt_factory("--json", saved, name="target2", sock=workdir / "target2.sock")
        deadline = time.monotonic() + 5
        while state() != "enabled" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state() == "enabled"
        time.sleep(0.5)
        assert reads() > stalled, ("no reads completed after the reconnect; bdevperf:\n"
                                   + perf_log.read_text()[-5000:])
        cl.close()
        perf.wait(timeout=30)
        out = perf_log.read_text()
    finally:
        if perf.poll() is None:
            perf.kill()
            perf.wait()
    # Failures while down, counted (fast fail), and a clean exit path.
    assert "Fail/s" in out, out
    total = [line for line in out.splitlines() if line.strip().startswith("Total")]
    assert total, out
    nums = [float(x) for x in total[-1].split(":")[1].split()]
    iops, fails = nums[0], nums[2]
    assert iops > 0 and fails > 100, out
    assert target2.running()


def test_controller_loss_deletes_bdev(tgt_factory, workdir, target):
    host = tgt_factory(name="host", sock=workdir / "host.sock")
    host.rpc("bdev_nvme_attach_controller",
             **attach_params(target.port, ctrlr_loss_timeout_sec=2, reconnect_delay_sec=1))
    assert "Nvme0n1" in host.bdevs()
    target.kill()
    deadline = time.monotonic() + 10
    while host.rpc("bdev_nvme_get_controllers") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert host.rpc("bdev_nvme_get_controllers") == []
    assert "Nvme0n1" not in host.bdevs()
    assert "ctrlr_loss_timeout_sec (2) expired" in host.log()


def test_keep_alive_timeout_detects_a_hung_target(tgt_factory, target, workdir):
    """A target that stops answering (SIGSTOP) is noticed through Keep Alive
    within KATO; with no reconnect configured the controller ends failed and
    its I/O fails (SPDK's ctrlr_loss_timeout_sec = 0 behaviour)."""
    import os
    import signal
    host = tgt_factory(name="host", sock=workdir / "host.sock")
    host.rpc("bdev_nvme_set_options", keep_alive_timeout_ms=2000, tcp_connect_timeout_ms=1000)
    host.rpc("bdev_nvme_attach_controller", **attach_params(target.port))
    os.kill(target.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        state = None
        while time.monotonic() < deadline:
            state = host.rpc("bdev_nvme_get_controllers")[0]["ctrlrs"][0]["state"]
            if state == "failed":
                break
            time.sleep(0.2)
        assert state == "failed", host.log()
        assert "Keep Alive not answered within KATO" in host.log()
    finally:
        os.kill(target.pid, signal.SIGCONT)
    # Still listed (SPDK keeps a failed controller until it is detached).
    host.rpc("bdev_nvme_detach_controller", name="Nvme0")
    assert host.rpc("bdev_nvme_get_controllers") == []


def test_reset_controller(tgt_factory, target, workdir):
    host = tgt_factory(name="host", sock=workdir / "host.sock")
    host.rpc("bdev_nvme_attach_controller", **attach_params(target.port))
    old = host.rpc("bdev_nvme_get_controllers")[0]["ctrlrs"][0]["cntlid"]
    host.cli("bdev_nvme_reset_controller", "Nvme0")
    c = host.rpc("bdev_nvme_get_controllers")[0]["ctrlrs"][0]
    assert c["state"] == "enabled"
    # A new association: a new controller on the target, the old one gone.
    assert c["cntlid"] != old
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        tc = target.rpc("nvmf_subsystem_get_controllers", nqn=NQN)
        if [x["cntlid"] for x in tc] == [c["cntlid"]]:
            break
        time.sleep(0.05)
    assert [x["cntlid"] for x in tc] == [c["cntlid"]]
    assert host.rpc_err("bdev_nvme_reset_controller", name="Nope") == (-19, "No such device")
    assert host.rpc_err("bdev_nvme_reset_controller", name="Nvme0",
                        cntlid=c["cntlid"] + 1) == (-19, "No such device")
    assert "Nvme0n1" in host.bdevs()


def test_one_qpair_per_reactor(tgt_factory, workdir):
    """bdevperf on two reactors, two namespaces (512 B and 4 KiB blocks):
    each reactor has its own queue pair; the target sees two I/O queues."""
    port = free_port()
    t = setup_target(tgt_factory(name="target", sock=workdir / "target.sock"), port)
    t.rpc("bdev_malloc_create", name="Malloc1", num_blocks=8192, block_size=4096)
    t.cli("nvmf_subsystem_add_ns", NQN, "Malloc1")
    cfg = perf_config(workdir, port)
    r = run_bdevperf(cfg, "-m", "0x3", "-C", "-q", "8", "-o", "8k", "-w", "verify", secs=1)
    assert r.returncode == 0, r.describe()
    assert r.total["fail_per_s"] == 0, r.describe()
    # Four jobs (two bdevs x two cores), each with I/O done.
    rows = [line.split(":", 1)[1].split() for line in r.stdout.splitlines()
            if line.strip().startswith("Nvme0n") and ":" in line]
    assert len(rows) == 4 and all(float(x[1]) > 0 for x in rows), r.describe()


def test_busy_polling_host(workdir, target):
    """The host busy-polling (no --interrupt-mode), as in production: data
    verified at 4 KiB and 128 KiB."""
    import subprocess
    from conftest import PERF_BIN
    cfg = perf_config(workdir, target.port, ddgst=True)
    for size in ("4k", "128k"):
        argv = [str(PERF_BIN), "--json", str(cfg), "-q", "16", "-o", size, "-w", "verify",
                "-t", "1"]
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        total = [line for line in cp.stdout.splitlines() if line.strip().startswith("Total")]
        nums = [float(x) for x in total[-1].split(":")[1].split()]
        assert nums[0] > 0 and nums[2] == 0, cp.stdout
