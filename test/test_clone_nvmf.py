"""The product's main story with the real Linux NVMe/TCP host (nvme-cli +
nvme-tcp in the QEMU guest of test/vm/linux-guest): two clones of one slow source (a uring
file of random data behind a delay bdev) are exported over NVMe/TCP and used
while they hydrate (rate-limited), then switch to pass-through (source
released, then deleted) while the host keeps doing I/O; the host never
notices.

Guest (test/guest/clone_nvmf.sh): namespace 1 reads as the source (sha256),
takes pattern writes (dd oflag=direct, flush, read back) and a fio verify;
namespace 2 gets mkfs.ext4, files, later fstrim and e2fsck. Host: the clones
are still hydrating when the guest finishes that; then hydration is let loose,
both clones reach `hydrated` + `source_released: true` with the guest still
connected, the source bdevs are deleted, the guest keeps reading, rewriting and
checking, and after the release namespace 1 reads exactly as expected, takes
more writes and another fio verify. After a clean shutdown, the destination
file of clone 1 equals the source with exactly the guest's writes applied.

A second test kills clone_tgt with SIGKILL under the Linux host's reads of a
hydrating clone and restarts it from its saved config: the host reconnects by
itself, no read fails or differs, the clone resumes and hydrates."""

import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from clone_util import slow_source_clone
from test_nvmf_target import ADDR, free_port

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "test" / "guest"
NQN = "nqn.2016-06.io.spdk:clone-nvmf"
MiB = 1 << 20
# The same size at every scale: at the slowest rate (1 MiB/s) hydration must
# outlast the guest's boot and phase 1 by a wide margin on a slow machine.
SIZE = 96 * MiB
REGION_KB = 64
BS = 512
FIO1 = (16 * MiB, 8 * MiB)
FIO2 = (24 * MiB, 4 * MiB)


def status(tgt, name):
    return tgt.rpc("bdev_clone_get_bdevs", name=name)[0]


def wait_file(path, proc, timeout):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the guest did not write %s within %d s" % (
            path.name, timeout)
        time.sleep(0.1)
    return True


def start_guest(linux_guest, share, script, *args):
    """Boot the guest running test/guest/SCRIPT with ARGS and `share` at /mnt/share, where the
    script finds the helpers it sources (test/guest/common.sh)."""
    shutil.copy(GUEST / "common.sh", share / "common.sh")
    argv = [str(linux_guest), "run", "--timeout", "600", "--share", str(share), str(GUEST / script)]
    return subprocess.Popen(argv + [str(a) for a in args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)


def guest_output(proc):
    out, _ = proc.communicate(timeout=60)
    return out


def test_clone_over_nvmf_linux_host(tgt2, datadir, linux_guest):
    tgt = tgt2
    rnd = os.urandom
    src_data = rnd(SIZE)
    src = datadir / "src.img"
    src.write_bytes(src_data)
    files = {}
    for n in ("dst_a", "meta_a", "dst_b", "meta_b"):
        files[n] = datadir / (n + ".img")
        with open(files[n], "wb") as f:
            f.truncate(SIZE if n.startswith("dst") else MiB)

    # The guest's pattern writes: whole regions, a partial region, one block at
    # an odd LBA, across the last region boundary; and after the release.
    share = datadir / "share"
    share.mkdir()
    writes = [(1, "p1.bin", 1 * MiB, 256 * 1024),
              (1, "p2.bin", 5 * MiB + 4096, 12 * 1024),
              (1, "p3.bin", 12345 * BS, BS),
              (1, "p4.bin", SIZE - 68 * 1024, 68 * 1024),
              (2, "q1.bin", 9 * MiB + BS, 128 * 1024),
              (2, "q2.bin", 2 * MiB + 60 * 1024, 8 * 1024)]
    for _, name, _, length in writes:
        (share / name).write_bytes(rnd(length))
    (share / "writes.txt").write_text("".join("%d %s %d\n" % (ph, n, off)
                                              for ph, n, off, _ in writes))

    port = free_port()
    tgt.rpc("bdev_uring_create", name="SrcFile", filename=str(src), block_size=BS)
    tgt.rpc("bdev_delay_create", name="Src", base_bdev_name="SrcFile", avg_read_latency=500,
            p99_read_latency=1000, avg_write_latency=500, p99_write_latency=1000)
    for c in ("a", "b"):
        tgt.rpc("bdev_uring_create", name="Dst_" + c, filename=str(files["dst_" + c]),
                block_size=BS)
        tgt.rpc("bdev_uring_create", name="Meta_" + c, filename=str(files["meta_" + c]),
                block_size=BS)
        tgt.rpc("bdev_clone_create", name="Clone_" + c, source_bdev_name="Src",
                dest_bdev_name="Dst_" + c, metadata_bdev_name="Meta_" + c,
                region_size_kb=REGION_KB, hydration_mbytes_per_sec=1,
                uuid="0c10e000-0000-4000-8000-00000000000" + c)
    tgt.rpc("nvmf_create_transport", trtype="TCP")
    tgt.rpc("nvmf_create_subsystem", nqn=NQN, allow_any_host=True, serial_number="CLONENVMF0001",
            model_number="clone-tgt clone test")
    for c in ("a", "b"):
        tgt.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "Clone_" + c})
    tgt.rpc("nvmf_subsystem_add_listener", nqn=NQN,
            listen_address={"trtype": "TCP", "traddr": ADDR, "trsvcid": str(port)})

    t0 = time.monotonic()
    proc = start_guest(linux_guest, share, "clone_nvmf.sh", port, NQN,
                       hashlib.sha256(src_data).hexdigest(), *FIO1, *FIO2)
    timeline = []
    try:
        if not wait_file(share / "connected", proc, 300):
            pytest.fail("guest ended before connecting:\n%s" % guest_output(proc)[-15000:])
        for c in ("a", "b"):
            st = status(tgt, "Clone_" + c)
            assert st["state"] == "hydrating" and st["hydrated_regions"] < st["num_regions"], st
        timeline.append(("connected", time.monotonic() - t0, st["hydrated_regions"]))
        if not wait_file(share / "phase1-done", proc, 300):
            pytest.fail("guest ended in phase 1:\n%s" % guest_output(proc)[-15000:])
        # The whole of phase 1 ran against a hydrating clone 1. (mkfs.ext4 discards
        # all of namespace 2, which marks every whole region of clone 2 hydrated.)
        st = status(tgt, "Clone_a")
        assert st["state"] == "hydrating" and not st["source_released"], st
        assert 0 < st["hydrated_regions"] < st["num_regions"], st
        timeline.append(("phase1-done", time.monotonic() - t0, st["hydrated_regions"]))

        # Let hydration finish while the guest keeps doing I/O.
        for c in ("a", "b"):
            tgt.rpc("bdev_clone_set_hydration", name="Clone_" + c, hydration_mbytes_per_sec=0)
        deadline = time.monotonic() + 120
        for c in ("a", "b"):
            while True:
                st = status(tgt, "Clone_" + c)
                if st["state"] == "hydrated" and st["source_released"]:
                    break
                assert st["state"] in ("hydrating", "hydrated") and time.monotonic() < deadline, st
                time.sleep(0.1)
            assert st["errors"] == {"source_read": 0, "dest_write": 0, "metadata": 0}, st
        # the host is still connected (admin + I/O queues)
        ctrls = tgt.rpc("nvmf_subsystem_get_controllers", nqn=NQN)
        assert len(ctrls) == 1, ctrls
        qpairs = tgt.rpc("nvmf_subsystem_get_qpairs", nqn=NQN)
        assert len(qpairs) >= 2, qpairs
        # The source goes away entirely: the clones no longer need it.
        tgt.rpc("bdev_delay_delete", name="Src")
        tgt.rpc("bdev_uring_delete", name="SrcFile")
        assert "Src" not in tgt.bdevs() and "SrcFile" not in tgt.bdevs()
        released_at = int((share / "loop-count").read_text() or 0)
        timeline.append(("released", time.monotonic() - t0, released_at))
        # ...and the guest's reads, rewrites and fs checks go on succeeding.
        deadline = time.monotonic() + 60
        while int((share / "loop-count").read_text() or 0) < released_at + 2:
            assert proc.poll() is None, "guest ended during the switch:\n%s" % (
                guest_output(proc)[-15000:])
            assert time.monotonic() < deadline, "guest I/O stalled after the release"
            time.sleep(0.1)

        # What namespace 1 holds now: the source, phase-1 patterns, fio1's range.
        image = bytearray(src_data)
        for ph, name, off, length in writes:
            if ph == 1:
                image[off:off + length] = (share / name).read_bytes()
        image[FIO1[0]:FIO1[0] + FIO1[1]] = (share / "fio1.bin").read_bytes()
        (share / "released").write_text(hashlib.sha256(image).hexdigest())

        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    took = time.monotonic() - t0
    fails = re.findall(r"CHECK-FAIL .*", out)
    oks = re.findall(r"CHECK-OK (\S+)", out)
    assert proc.returncode == 0 and not fails, "guest exit %d, failed checks %s\n%s" % (
        proc.returncode, fails, out[-15000:])
    for must in ("connect", "sha-source", "readback-p1.bin", "readback-p2.bin", "readback-p3.bin",
                 "readback-p4.bin", "fio1", "mkfs", "mount", "io-during-switch",
                 "sha-after-release", "readback-q1.bin", "readback-q2.bin", "fio2", "fs-verify",
                 "fstrim", "umount", "fsck", "disconnect", "dmesg-clean"):
        assert must in oks, "check %s did not run\n%s" % (must, out[-15000:])

    assert tgt.rpc("nvmf_subsystem_get_controllers", nqn=NQN) == []
    tgt.stop()
    assert "panicked" not in tgt.log()

    # The destination of clone 1: the source with exactly the guest's writes.
    for ph, name, off, length in writes:
        if ph == 2:
            image[off:off + length] = (share / name).read_bytes()
    image[FIO2[0]:FIO2[0] + FIO2[1]] = (share / "fio2.bin").read_bytes()
    assert (share / "final.sha").read_text().split()[0] == hashlib.sha256(image).hexdigest(), \
        "the guest's last read of namespace 1 differs from the expected image"
    with open(files["dst_a"], "rb") as f:
        dest = f.read(SIZE)
    if dest != bytes(image):
        first = next(i for i in range(SIZE) if dest[i] != image[i])
        pytest.fail("destination of clone 1 differs from the expected image at byte %d (%d MiB)"
                    % (first, first // MiB))
    print("\n".join(l for l in out.splitlines() if l.startswith(("###", "I/O rounds"))))
    print("timeline (event, s, hydrated regions of clone 1 / guest I/O rounds):", timeline,
          "total %.1f s" % took)


def test_linux_host_rides_out_kill9_of_the_target(tgt2_factory, workdir, datadir, linux_guest):
    """The Linux host keeps reading a hydrating clone (every read compared)
    while clone_tgt is killed with SIGKILL and restarted from its saved config:
    nvme-tcp reconnects, the reads in flight are retried, the flushed writes are
    there, the clone resumes hydrating from its metadata and finishes; the
    destination is then the source plus exactly the host's writes."""
    _rides_out_kill9(tgt2_factory, workdir, datadir, linux_guest)


def _rides_out_kill9(start, workdir, datadir, linux_guest):
    size = 64 * MiB
    src_data = os.urandom(size)
    src, dst, meta = datadir / "src.img", datadir / "dst.img", datadir / "meta.img"
    src.write_bytes(src_data)
    for f, n in ((dst, size), (meta, MiB)):
        with open(f, "wb") as fh:
            fh.truncate(n)
    share = datadir / "share"
    share.mkdir()
    writes = [("p1.bin", 3 * MiB, 192 * 1024), ("p2.bin", 7 * MiB + 8192, 4096),
              ("p3.bin", 20 * MiB - 512, 1024)]
    for name, _, length in writes:
        (share / name).write_bytes(os.urandom(length))
    (share / "writes.txt").write_text("".join("%s %d\n" % (n, off) for n, off, _ in writes))
    image = bytearray(src_data)
    for name, off, length in writes:
        image[off:off + length] = (share / name).read_bytes()

    port = free_port()
    tgt = start()
    slow_source_clone(tgt, src, dst, meta, BS, read_us=500, region_kb=REGION_KB, rate_mbps=1)
    tgt.rpc("nvmf_create_transport", trtype="TCP")
    tgt.rpc("nvmf_create_subsystem", nqn=NQN, allow_any_host=True, serial_number="CLONENVMF0002",
            model_number="clone-tgt kill test")
    tgt.rpc("nvmf_subsystem_add_ns", nqn=NQN, namespace={"bdev_name": "Clone0"})
    tgt.rpc("nvmf_subsystem_add_listener", nqn=NQN,
            listen_address={"trtype": "TCP", "traddr": ADDR, "trsvcid": str(port)})
    cfg = workdir / "config.json"
    cfg.write_text(tgt.cli("save_config").stdout)

    proc = start_guest(linux_guest, share, "clone_nvmf_kill.sh", port, NQN,
                       hashlib.sha256(src_data).hexdigest())
    try:
        if not wait_file(share / "written", proc, 300):
            pytest.fail("guest ended before its writes:\n%s" % guest_output(proc)[-15000:])
        reads = share / "reads"
        wait_file(reads, proc, 60)
        before = int(reads.read_text() or 0)
        deadline = time.monotonic() + 30
        while int(reads.read_text() or 0) < before + 2:     # reads are going on
            assert time.monotonic() < deadline and proc.poll() is None, "guest reads stalled"
            time.sleep(0.05)
        st = status(tgt, "Clone0")
        assert st["state"] == "hydrating" and 0 < st["hydrated_regions"] < st["num_regions"], st
        at_kill = st["hydrated_regions"]
        os.kill(tgt.pid, 9)
        tgt.wait_exit()
        tgt = start(("--json", cfg), sock=tgt.sock)
        st2 = status(tgt, "Clone0")
        assert st2["state"] == "hydrating" and st2["hydrated_regions"] > 0, st2
        (share / "restarted").write_text("")

        # The host reconnects by itself and its reads go on; then let hydration finish.
        deadline = time.monotonic() + 60
        while not tgt.rpc("nvmf_subsystem_get_controllers", nqn=NQN):
            assert time.monotonic() < deadline and proc.poll() is None, "the host did not reconnect"
            time.sleep(0.1)
        tgt.rpc("bdev_clone_set_hydration", name="Clone0", hydration_mbytes_per_sec=0)
        deadline = time.monotonic() + 120
        while True:
            st = status(tgt, "Clone0")
            if st["state"] == "hydrated" and st["source_released"]:
                break
            assert st["state"] in ("hydrating", "hydrated") and time.monotonic() < deadline, st
            time.sleep(0.1)
        (share / "released").write_text("")
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    fails = re.findall(r"CHECK-FAIL .*", out)
    oks = re.findall(r"CHECK-OK (\S+)", out)
    assert proc.returncode == 0 and not fails, "guest exit %d, failed checks %s\n%s" % (
        proc.returncode, fails, out[-15000:])
    for must in ("connect", "sha-source", "reads-across-kill", "saw-reconnect",
                 "sha-after-restart", "sha-after-release", "disconnect", "dmesg-no-io-error"):
        assert must in oks, "check %s did not run\n%s" % (must, out[-15000:])
    tgt.stop()
    assert "panicked" not in tgt.log()
    with open(dst, "rb") as f:
        assert f.read(size) == bytes(image), "destination != source + the host's writes"
    print("\n".join(l for l in out.splitlines() if l.startswith(("###", "reads:"))))
    print("hydrated regions at the kill %d, after the restart %d" % (
        at_kill, st2["hydrated_regions"]))
