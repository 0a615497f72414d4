"""bdev RPCs of every module, driven through SPDK's real CLI and client
(rpc-contract.md §2.2, §2.3; rpc-params.md)."""

import json
import os
import time
import uuid

import pytest

from conftest import DECODE_FAILED, EEXIST, EINVAL, ENODEV, RawConn, cannot_run, concurrent_rpc

IO_TYPES = ["read", "write", "unmap", "flush", "reset", "nvme_admin", "nvme_io", "nvme_io_md",
            "write_zeroes", "zcopy", "get_zone_info", "zone_management", "zone_append", "compare",
            "compare_and_write", "abort", "seek_hole", "seek_data", "copy", "nvme_iov_md",
            "nvme_nssr", "write_uncorrectable"]
RATE_LIMITS = ["rw_ios_per_sec", "rw_mbytes_per_sec", "r_mbytes_per_sec", "w_mbytes_per_sec"]
IOSTAT_COUNTERS = ["bytes_read", "num_read_ops", "bytes_written", "num_write_ops",
                   "bytes_unmapped", "num_unmap_ops", "bytes_copied", "num_copy_ops"]
IOSTAT_LATENCIES = ["%s%s_latency_ticks" % (pfx, op) for op in ("read", "write", "unmap", "copy")
                    for pfx in ("", "max_", "min_")]
CLAIM_FAILED = [(-1, "Operation not permitted"), (-16, "Device or resource busy")]


def make_file(dirpath, name, size):
    path = os.path.join(str(dirpath), name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def check_common_fields(b, name, product, block_size, num_blocks, writable=True):
    """The fields every bdev_get_bdevs element has (bdev_rpc.c rpc_dump_bdev_info)."""
    assert b["name"] == name
    assert b["aliases"] == [] or all(isinstance(a, str) for a in b["aliases"])
    assert b["product_name"] == product, b
    assert b["block_size"] == block_size, b
    assert b["num_blocks"] == num_blocks, b
    uuid.UUID(b["uuid"])
    for k in ("preferred_write_alignment", "preferred_write_granularity", "optimal_write_size",
              "preferred_unmap_alignment", "preferred_unmap_granularity"):
        assert isinstance(b[k], int) and b[k] >= 0, (k, b)
    assert set(b["assigned_rate_limits"]) == set(RATE_LIMITS), b["assigned_rate_limits"]
    assert isinstance(b["claimed"], bool)
    if b["claimed"]:
        assert b["claim_type"] in ("exclusive_write", "read_many_write_one",
                                   "read_many_write_none", "read_many_write_shared"), b
    else:
        assert "claim_type" not in b, b
    assert b["zoned"] is False
    sup = b["supported_io_types"]
    assert set(sup) == set(IO_TYPES), sorted(set(sup) ^ set(IO_TYPES))
    assert all(isinstance(v, bool) for v in sup.values()), sup
    assert sup["read"] is True, sup
    if writable:
        assert sup["write"] is True, sup
    assert isinstance(b["driver_specific"], dict)
    if b.get("md_size", 0) == 0:
        assert "md_interleave" not in b and "dif_type" not in b, b


def assert_unclaimed(tgt, name):
    b = tgt.bdev(name)
    assert b["claimed"] is False and "claim_type" not in b, b


def assert_cli_delete(tgt, method, name, base):
    """`method NAME` through the CLI prints nothing, removes the stacked bdev
    and frees its base; deleting it again is -19."""
    cp = tgt.cli(method, name)
    assert cp.stdout.strip() == ""
    assert tgt.rpc_err("bdev_get_bdevs", name=name) == ENODEV
    assert_unclaimed(tgt, base)
    assert tgt.rpc_err(method, name=name) == ENODEV


def names(tgt):
    return sorted(tgt.bdevs())


# --- malloc ------------------------------------------------------------------------

def test_malloc_create_via_cli(tgt):
    cp = tgt.cli("bdev_malloc_create", "-b", "Malloc0", "32", "512")
    assert cp.stdout.strip() == "Malloc0"
    b = tgt.bdev("Malloc0")
    check_common_fields(b, "Malloc0", "Malloc disk", 512, 32 * 1024 * 1024 // 512)
    assert b["claimed"] is False
    assert b["driver_specific"] == {}
    assert all(v == 0 for v in b["assigned_rate_limits"].values())
    sup = b["supported_io_types"]
    for t in ("unmap", "write_zeroes", "flush", "reset"):
        assert sup[t] is True, (t, sup)
    # CLI view is the same JSON
    assert json.loads(tgt.cli("bdev_get_bdevs", "-b", "Malloc0").stdout) == [b]


def test_malloc_4k_and_uuid(tgt):
    u = "12345678-1234-4234-8234-123456789abc"
    cp = tgt.cli("bdev_malloc_create", "-b", "M4k", "-u", u, "8", "4096")
    assert cp.stdout.strip() == "M4k"
    b = tgt.bdev("M4k")
    check_common_fields(b, "M4k", "Malloc disk", 4096, 2048)
    assert b["uuid"] == u


def test_malloc_auto_name(tgt):
    name = tgt.rpc("bdev_malloc_create", num_blocks=64, block_size=512)
    assert isinstance(name, str) and name.startswith("Malloc"), name
    assert tgt.bdev(name)["num_blocks"] == 64
    other = tgt.rpc("bdev_malloc_create", num_blocks=64, block_size=512)
    assert other != name and other.startswith("Malloc")


def test_malloc_delete(tgt):
    tgt.cli("bdev_malloc_create", "-b", "Malloc0", "1", "512")
    cp = tgt.cli("bdev_malloc_delete", "Malloc0")
    assert cp.stdout.strip() == ""
    assert tgt.rpc_err("bdev_get_bdevs", name="Malloc0") == ENODEV
    assert tgt.rpc_err("bdev_malloc_delete", name="Malloc0") == ENODEV
    cp = tgt.cli("bdev_malloc_delete", "Malloc0", check=False)
    assert cp.returncode == 1 and "No such device" in cp.stdout + cp.stderr


def check_create_errors(tgt, method, name, bad_block_size, decode_failures):
    """`method` refuses a taken name (EEXIST), a bad block size and zero blocks (EINVAL), and
    each of `decode_failures` (params that fail to decode); no failed create changes the bdev list."""
    tgt.rpc(method, name=name, num_blocks=128, block_size=512)
    before = tgt.bdevs()
    assert tgt.rpc_err(method, name=name, num_blocks=256, block_size=512) == EEXIST
    assert tgt.rpc_err(method, name="Bad0", num_blocks=128, block_size=bad_block_size)[0] == -22
    assert tgt.rpc_err(method, name="Bad1", num_blocks=0, block_size=512)[0] == -22
    for params in decode_failures:
        assert tgt.rpc_err(method, **params) == (-32603, DECODE_FAILED), params
    assert tgt.bdevs() == before, "a failed create changed the bdev list"


def test_malloc_errors(tgt):
    check_create_errors(tgt, "bdev_malloc_create", "Malloc0", 500, [
        # decode_mdisk_uuid fails inside spdk_json_decode_object
        dict(name="Bad2", num_blocks=8, block_size=512, uuid="not-a-uuid"),
        dict(name="Bad3", num_blocks=8, block_size=512, bogus=True)])


INVALID_GEOMETRY = {
    "malloc_block_size_500": ("bdev_malloc_create", {"name": "X", "num_blocks": 128, "block_size": 500}),
    "malloc_zero_blocks": ("bdev_malloc_create", {"name": "X", "num_blocks": 0, "block_size": 512}),
    "null_block_size_1000": ("bdev_null_create", {"name": "X", "num_blocks": 64, "block_size": 1000}),
    "null_zero_blocks": ("bdev_null_create", {"name": "X", "num_blocks": 0, "block_size": 512}),
    "delay_p99_below_avg": ("bdev_delay_create", {"name": "X", "base_bdev_name": "Base0",
                                                  "avg_read_latency": 200, "p99_read_latency": 100,
                                                  "avg_write_latency": 1, "p99_write_latency": 1}),
}


@pytest.mark.parametrize("case", sorted(INVALID_GEOMETRY))
def test_einval_is_errno_and_strerror(tgt, case):
    """-EINVAL from a create is sent as (rc, spdk_strerror(-rc)), e.g. bdev_malloc_rpc.c;
    clone-tgt keeps SPDK's text first and names the problem after it."""
    tgt.rpc("bdev_malloc_create", name="Base0", num_blocks=64, block_size=512)
    method, params = INVALID_GEOMETRY[case]
    code, message = tgt.rpc_err(method, **params)
    assert code == EINVAL[0]
    assert message.startswith(EINVAL[1] + ": ") and len(message) > len(EINVAL[1]) + 4, message
    assert names(tgt) == ["Base0"]
    assert_unclaimed(tgt, "Base0")


def test_malloc_cli_name_taken(tgt):
    tgt.cli("bdev_malloc_create", "-b", "Malloc0", "1", "512")
    cp = tgt.cli("bdev_malloc_create", "-b", "Malloc0", "1", "512", check=False)
    assert cp.returncode == 1
    out = cp.stdout + cp.stderr
    assert "File exists" in out and "-17" in out, out


def test_delete_with_wrong_module(tgt):
    tgt.rpc("bdev_malloc_create", name="Malloc0", num_blocks=64, block_size=512)
    tgt.rpc("bdev_null_create", name="Null0", num_blocks=64, block_size=512)
    # spdk_bdev_unregister_by_name: -ENODEV when the bdev belongs to another module
    assert tgt.rpc_err("bdev_null_delete", name="Malloc0") == ENODEV
    assert tgt.rpc_err("bdev_malloc_delete", name="Null0") == ENODEV
    assert tgt.rpc_err("bdev_delay_delete", name="Malloc0") == ENODEV
    assert tgt.rpc_err("bdev_error_delete", name="Malloc0") == ENODEV
    assert names(tgt) == ["Malloc0", "Null0"]


def test_names_are_shared_across_modules(tgt):
    tgt.rpc("bdev_malloc_create", name="Disk0", num_blocks=64, block_size=512)
    assert tgt.rpc_err("bdev_null_create", name="Disk0", num_blocks=64, block_size=512) == EEXIST
    assert tgt.bdev("Disk0")["product_name"] == "Malloc disk"


# --- null --------------------------------------------------------------------------

def test_null_create_via_cli(tgt):
    cp = tgt.cli("bdev_null_create", "Null0", "16", "512")
    assert cp.stdout.strip() == "Null0"
    b = tgt.bdev("Null0")
    check_common_fields(b, "Null0", "Null disk", 512, 16 * 1024 * 1024 // 512)
    assert b["driver_specific"] == {}
    tgt.cli("bdev_null_create", "Null4k", "16", "4096")
    check_common_fields(tgt.bdev("Null4k"), "Null4k", "Null disk", 4096, 4096)

    cp = tgt.cli("bdev_null_delete", "Null0")
    assert cp.stdout.strip() == ""
    assert tgt.rpc_err("bdev_get_bdevs", name="Null0") == ENODEV
    assert tgt.rpc_err("bdev_null_delete", name="Null0") == ENODEV


def test_null_errors(tgt):
    check_create_errors(tgt, "bdev_null_create", "Null0", 1000, [
        dict(num_blocks=64, block_size=512),  # name is required for null
        dict(name="N3", num_blocks=64, block_size=512, bogus=1)])


# --- aio ---------------------------------------------------------------------------

def test_aio_create_via_cli(tgt, datadir):
    path = make_file(datadir, "aio.img", 8 << 20)
    cp = tgt.cli("bdev_aio_create", path, "AIO0", "512")
    assert cp.stdout.strip() == "AIO0"
    b = tgt.bdev("AIO0")
    check_common_fields(b, "AIO0", "AIO disk", 512, (8 << 20) // 512)
    aio = b["driver_specific"]["aio"]
    assert aio["filename"] == path
    assert aio["block_size_override"] is True
    assert aio["readonly"] is False
    assert aio["fallocate"] is False
    assert set(aio) >= {"filename", "block_size_override", "readonly", "fallocate"}, aio

    cp = tgt.cli("bdev_aio_delete", "AIO0")
    assert cp.stdout.strip() == ""
    assert tgt.rpc_err("bdev_get_bdevs", name="AIO0") == ENODEV
    assert tgt.rpc_err("bdev_aio_delete", name="AIO0") == ENODEV
    assert os.path.getsize(path) == 8 << 20, "deleting the bdev must keep the file"


def test_aio_4k_readonly(tgt, datadir):
    path = make_file(datadir, "aio4k.img", 4 << 20)
    tgt.cli("bdev_aio_create", "--readonly", path, "AIO4k", "4096")
    b = tgt.bdev("AIO4k")
    check_common_fields(b, "AIO4k", "AIO disk", 4096, 1024, writable=False)
    assert b["driver_specific"]["aio"]["readonly"] is True


def test_aio_fallocate_enables_unmap(tgt, datadir):
    # bdev_aio.c: UNMAP and WRITE_ZEROES are supported only with fallocate
    p1 = make_file(datadir, "plain.img", 4 << 20)
    p2 = make_file(datadir, "falloc.img", 4 << 20)
    tgt.cli("bdev_aio_create", p1, "AIO0", "512")
    tgt.cli("bdev_aio_create", "--fallocate", p2, "AIO1", "512")
    plain = tgt.bdev("AIO0")["supported_io_types"]
    falloc = tgt.bdev("AIO1")
    assert plain["unmap"] is False and plain["write_zeroes"] is False, plain
    assert falloc["supported_io_types"]["unmap"] is True, falloc
    assert falloc["supported_io_types"]["write_zeroes"] is True, falloc
    assert falloc["driver_specific"]["aio"]["fallocate"] is True


def test_aio_rescan(tgt, datadir):
    path = make_file(datadir, "grow.img", 4 << 20)
    tgt.rpc("bdev_aio_create", name="AIO0", filename=path, block_size=512)
    assert tgt.bdev("AIO0")["num_blocks"] == 8192
    assert tgt.rpc("bdev_aio_rescan", name="AIO0") is True
    assert tgt.rpc_err("bdev_aio_rescan", name="nope") == ENODEV


def test_aio_errors(tgt, datadir):
    path = make_file(datadir, "a.img", 4 << 20)
    tgt.rpc("bdev_aio_create", name="AIO0", filename=path, block_size=512)
    before = tgt.bdevs()
    assert tgt.rpc_err("bdev_aio_create", name="AIO0", filename=path, block_size=512) == EEXIST

    missing = os.path.join(str(datadir), "does-not-exist.img")
    code, msg = tgt.rpc_err("bdev_aio_create", name="AIO1", filename=missing, block_size=512)
    assert code == -2, (code, msg)
    assert missing in msg, "the error should name the missing file: %r" % msg
    assert not os.path.exists(missing), "a failed create must not create the file"

    cp = tgt.cli("bdev_aio_create", missing, "AIO1", "512", check=False)
    assert cp.returncode == 1 and missing in cp.stdout + cp.stderr

    assert tgt.rpc_err("bdev_aio_create", name="AIO2", filename=path, block_size=500)[0] == -22
    assert tgt.rpc_err("bdev_aio_create", name="AIO3", filename=path, block_size=512,
                       bogus=1) == (-32603, DECODE_FAILED)
    assert tgt.bdevs() == before


# --- uring -------------------------------------------------------------------------

def test_uring_create_via_cli(tgt, datadir):
    size = 8 << 20
    path = make_file(datadir, "uring.img", size)
    cp = tgt.cli("bdev_uring_create", path, "URING0")
    assert cp.stdout.strip() == "URING0"
    b = tgt.bdev("URING0")
    assert b["block_size"] in (512, 4096), b
    check_common_fields(b, "URING0", "URING bdev", b["block_size"], size // b["block_size"])
    assert b["driver_specific"]["uring"]["filename"] == path

    tgt.cli("bdev_uring_create", make_file(datadir, "u2.img", size), "URING1", "4096")
    check_common_fields(tgt.bdev("URING1"), "URING1", "URING bdev", 4096, size // 4096)

    assert tgt.rpc("bdev_uring_rescan", name="URING0") is True
    cp = tgt.cli("bdev_uring_delete", "URING0")
    assert cp.stdout.strip() == ""
    assert tgt.rpc_err("bdev_get_bdevs", name="URING0") == ENODEV
    assert tgt.rpc_err("bdev_uring_delete", name="URING0") == ENODEV
    assert tgt.rpc_err("bdev_uring_rescan", name="URING0") == ENODEV
    # uring and aio are different modules
    assert tgt.rpc_err("bdev_aio_delete", name="URING1") == ENODEV
    assert names(tgt) == ["URING1"]


def test_uring_errors(tgt, datadir):
    path = make_file(datadir, "u.img", 4 << 20)
    tgt.rpc("bdev_uring_create", name="U0", filename=path, block_size=512)
    before = tgt.bdevs()
    assert tgt.rpc_err("bdev_uring_create", name="U0", filename=path) == EEXIST
    missing = os.path.join(str(datadir), "nothing-here.img")
    code, msg = tgt.rpc_err("bdev_uring_create", name="U1", filename=missing)
    assert code == -2, (code, msg)
    assert missing in msg, msg
    assert not os.path.exists(missing)
    assert tgt.rpc_err("bdev_uring_create", name="U2", filename=path, bogus=1) == \
        (-32603, DECODE_FAILED)
    assert tgt.rpc_err("bdev_uring_create", filename=path) == (-32603, DECODE_FAILED)
    assert tgt.bdevs() == before


def test_uring_on_loop_device(tgt, datadir):
    """A real block device: sizes and block size come from the device."""
    import shutil
    import subprocess
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        cannot_run("needs root and losetup")
    img = make_file(datadir, "loop.img", 16 << 20)
    cp = subprocess.run(["losetup", "--find", "--show", "--sector-size", "4096", img],
                        capture_output=True, text=True)
    if cp.returncode != 0:
        cannot_run("no loop device available here: %s" % cp.stderr.strip())
    dev = cp.stdout.strip()
    try:
        assert tgt.rpc("bdev_uring_create", name="Loop0", filename=dev) == "Loop0"
        b = tgt.bdev("Loop0")
        check_common_fields(b, "Loop0", "URING bdev", 4096, (16 << 20) // 4096)
        # smaller than the device's logical block size: rejected
        code, _ = tgt.rpc_err("bdev_aio_create", name="Loop1", filename=dev, block_size=512)
        assert code == -22
        tgt.rpc("bdev_uring_delete", name="Loop0")
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


# --- delay -------------------------------------------------------------------------

def test_delay_create_via_cli(tgt):
    tgt.rpc("bdev_malloc_create", name="Malloc0", num_blocks=2048, block_size=512)
    base_uuid = tgt.bdev("Malloc0")["uuid"]
    cp = tgt.cli("bdev_delay_create", "-b", "Malloc0", "-d", "Delay0",
                 "-r", "100", "-t", "200", "-w", "100", "-n", "200")
    assert cp.stdout.strip() == "Delay0"
    d = tgt.bdev("Delay0")
    check_common_fields(d, "Delay0", "delay", 512, 2048)
    assert d["uuid"] != base_uuid
    assert d["claimed"] is False
    ds = d["driver_specific"]["delay"]
    assert ds["name"] == "Delay0"
    assert ds["base_bdev_name"] == "Malloc0"
    assert (ds["avg_read_latency"], ds["p99_read_latency"],
            ds["avg_write_latency"], ds["p99_write_latency"]) == (100, 200, 100, 200), ds

    base = tgt.bdev("Malloc0")
    assert base["claimed"] is True and base["claim_type"] == "exclusive_write", base

    # the claimed base cannot be stacked on again, and nothing is left behind
    before = tgt.bdevs()
    assert tgt.rpc_err("bdev_delay_create", name="Delay1", base_bdev_name="Malloc0",
                       avg_read_latency=1, p99_read_latency=1, avg_write_latency=1,
                       p99_write_latency=1) in CLAIM_FAILED
    assert tgt.rpc_err("bdev_error_create", base_name="Malloc0") in CLAIM_FAILED
    assert tgt.bdevs() == before

    assert_cli_delete(tgt, "bdev_delay_delete", "Delay0", base="Malloc0")


def test_delay_with_uuid_and_stacking(tgt):
    u = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
    tgt.rpc("bdev_null_create", name="Null0", num_blocks=1024, block_size=4096)
    assert tgt.rpc("bdev_delay_create", name="D0", base_bdev_name="Null0", uuid=u,
                   avg_read_latency=5, p99_read_latency=5, avg_write_latency=5,
                   p99_write_latency=5) == "D0"
    assert tgt.bdev("D0")["uuid"] == u
    # a delay bdev on a delay bdev
    assert tgt.rpc("bdev_delay_create", name="D1", base_bdev_name="D0",
                   avg_read_latency=1, p99_read_latency=1, avg_write_latency=1,
                   p99_write_latency=1) == "D1"
    assert tgt.bdev("D0")["claim_type"] == "exclusive_write"
    check_common_fields(tgt.bdev("D1"), "D1", "delay", 4096, 1024)
    tgt.rpc("bdev_delay_delete", name="D1")
    assert_unclaimed(tgt, "D0")


def test_delay_errors(tgt):
    tgt.rpc("bdev_malloc_create", name="Malloc0", num_blocks=64, block_size=512)
    before = tgt.bdevs()
    lat = dict(avg_read_latency=10, p99_read_latency=20, avg_write_latency=10, p99_write_latency=20)
    # missing base
    assert tgt.rpc_err("bdev_delay_create", name="D0", base_bdev_name="Nope", **lat) == ENODEV
    # p99 below the average
    assert tgt.rpc_err("bdev_delay_create", name="D1", base_bdev_name="Malloc0",
                       avg_read_latency=200, p99_read_latency=100,
                       avg_write_latency=1, p99_write_latency=1)[0] == -22
    # name taken
    assert tgt.rpc_err("bdev_delay_create", name="Malloc0", base_bdev_name="Malloc0",
                       **lat) == EEXIST
    # a required latency missing, an unknown key
    assert tgt.rpc_err("bdev_delay_create", name="D2", base_bdev_name="Malloc0",
                       avg_read_latency=1, p99_read_latency=1,
                       avg_write_latency=1) == (-32603, DECODE_FAILED)
    assert tgt.rpc_err("bdev_delay_create", name="D3", base_bdev_name="Malloc0", bogus=1,
                       **lat) == (-32603, DECODE_FAILED)
    assert tgt.bdevs() == before, "a failed create left something behind"
    assert_unclaimed(tgt, "Malloc0")
    assert tgt.rpc_err("bdev_delay_delete", name="Nope") == ENODEV


def test_delay_update_latency(tgt):
    tgt.rpc("bdev_malloc_create", name="Malloc0", num_blocks=64, block_size=512)
    tgt.rpc("bdev_delay_create", name="Delay0", base_bdev_name="Malloc0", avg_read_latency=100,
            p99_read_latency=200, avg_write_latency=100, p99_write_latency=200)
    cp = tgt.cli("bdev_delay_update_latency", "Delay0", "avg_read", "150")
    assert cp.stdout.strip() == "true"
    assert tgt.rpc("bdev_delay_update_latency", delay_bdev_name="Delay0",
                   latency_type="p99_write", latency_us=500) is True
    ds = tgt.bdev("Delay0")["driver_specific"]["delay"]
    assert ds["avg_read_latency"] == 150 and ds["p99_write_latency"] == 500, ds
    assert ds["p99_read_latency"] == 200 and ds["avg_write_latency"] == 100, ds

    # vbdev_delay_rpc.c rpc_bdev_delay_update_latency's own codes and texts
    assert tgt.rpc_err("bdev_delay_update_latency", delay_bdev_name="Nope",
                       latency_type="avg_read", latency_us=1) == \
        (-32602, "The requested bdev does not exist.")
    assert tgt.rpc_err("bdev_delay_update_latency", delay_bdev_name="Malloc0",
                       latency_type="avg_read", latency_us=1) == \
        (-32600, "The requested bdev is not a delay bdev.")
    code, _ = tgt.rpc_err("bdev_delay_update_latency", delay_bdev_name="Delay0",
                          latency_type="bogus", latency_us=1)
    assert code in (-32602, -32603)
    assert tgt.bdev("Delay0")["driver_specific"]["delay"] == ds


def test_delete_base_removes_stacked_bdev(tgt):
    # Hot-remove: unregistering the base unregisters the vbdevs on it.
    tgt.rpc("bdev_malloc_create", name="Malloc0", num_blocks=64, block_size=512)
    tgt.rpc("bdev_delay_create", name="Delay0", base_bdev_name="Malloc0", avg_read_latency=1,
            p99_read_latency=1, avg_write_latency=1, p99_write_latency=1)
    assert tgt.rpc("bdev_malloc_delete", name="Malloc0") is True
    deadline = time.monotonic() + 5
    while tgt.bdevs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert names(tgt) == []


# --- error -------------------------------------------------------------------------

def test_error_create_via_cli(tgt):
    tgt.rpc("bdev_malloc_create", name="Malloc1", num_blocks=1024, block_size=512)
    cp = tgt.cli("bdev_error_create", "Malloc1")
    assert cp.stdout.strip() == "true", cp.stdout
    e = tgt.bdev("EE_Malloc1")
    # vbdev_error.c: spdk_bdev_part_construct(..., "Error Injection Disk")
    check_common_fields(e, "EE_Malloc1", "Error Injection Disk", 512, 1024)
    assert e["driver_specific"]["error_disk"]["base_bdev"] == "Malloc1"
    base = tgt.bdev("Malloc1")
    assert base["claimed"] is True and base["claim_type"] == "exclusive_write"

    tgt.cli("bdev_error_inject_error", "EE_Malloc1", "read", "failure", "-n", "10")
    assert tgt.rpc("bdev_error_inject_error", name="EE_Malloc1", io_type="clear",
                   error_type="failure") is True
    assert tgt.rpc("bdev_error_inject_error", name="EE_Malloc1", io_type="all",
                   error_type="nomem", num=1) is True

    assert_cli_delete(tgt, "bdev_error_delete", "EE_Malloc1", base="Malloc1")


def test_error_create_with_uuid(tgt):
    u = "0f0f0f0f-1111-4222-8333-444444444444"
    tgt.rpc("bdev_null_create", name="Null0", num_blocks=64, block_size=512)
    tgt.rpc("bdev_error_create", base_name="Null0", uuid=u)
    assert tgt.bdev("EE_Null0")["uuid"] == u


def test_error_errors(tgt):
    tgt.rpc("bdev_malloc_create", name="Malloc0", num_blocks=64, block_size=512)
    before = tgt.bdevs()
    assert tgt.rpc_err("bdev_error_create", base_name="Nope") == ENODEV
    # error-bdev decode failures are -32602 (rpc-contract.md §1.4)
    assert tgt.rpc_err("bdev_error_create", base_name="Malloc0", bogus=1) == \
        (-32602, DECODE_FAILED)
    assert tgt.bdevs() == before
    assert_unclaimed(tgt, "Malloc0")

    tgt.rpc("bdev_error_create", base_name="Malloc0")
    assert tgt.rpc_err("bdev_error_inject_error", name="EE_Nope", io_type="read",
                       error_type="failure") == ENODEV
    code, _ = tgt.rpc_err("bdev_error_inject_error", name="EE_Malloc0", io_type="sideways",
                          error_type="failure")
    assert code in (-32602, -32603)
    code, _ = tgt.rpc_err("bdev_error_inject_error", name="EE_Malloc0", io_type="read",
                          error_type="explode")
    assert code in (-32602, -32603)


# --- bdev core: get / iostat / qos / examine -----------------------------------------

def test_get_bdevs_all_and_one(tgt):
    assert tgt.rpc("bdev_get_bdevs") == []
    tgt.rpc("bdev_malloc_create", name="B", num_blocks=64, block_size=512)
    tgt.rpc("bdev_null_create", name="A", num_blocks=64, block_size=512)
    tgt.rpc("bdev_malloc_create", name="C", num_blocks=64, block_size=512)
    all_ = tgt.rpc("bdev_get_bdevs")
    assert sorted(b["name"] for b in all_) == ["A", "B", "C"]
    one = tgt.rpc("bdev_get_bdevs", name="A")
    assert len(one) == 1 and one[0]["name"] == "A"
    assert one[0] == [b for b in all_ if b["name"] == "A"][0]
    assert tgt.rpc_err("bdev_get_bdevs", name="missing") == ENODEV
    assert tgt.rpc_err("bdev_get_bdevs", name="A", bogus=1) == (-32603, DECODE_FAILED)
    # the CLI with no name
    assert sorted(b["name"] for b in json.loads(tgt.cli("bdev_get_bdevs").stdout)) == ["A", "B", "C"]


def test_get_bdevs_timeout_waits_for_bdev(tgt):
    c = RawConn(tgt.sock)
    try:
        c.send({"jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 1,
                "params": {"name": "Late0", "timeout": 5000}})
        assert c.silent_for(0.3)
        tgt.rpc("bdev_malloc_create", name="Late0", num_blocks=64, block_size=512)
        reply = c.recv(timeout=5)
        assert reply["id"] == 1 and reply["result"][0]["name"] == "Late0", reply
    finally:
        c.close()


def test_get_bdevs_timeout_expires(tgt):
    t0 = time.monotonic()
    code, msg = tgt.rpc_err("bdev_get_bdevs", name="Never", timeout=300)
    elapsed = time.monotonic() - t0
    assert code == -110, (code, msg)
    assert elapsed >= 0.25, elapsed


def test_iostat_shape(tgt):
    tgt.rpc("bdev_malloc_create", name="Malloc0", num_blocks=64, block_size=512)
    tgt.rpc("bdev_null_create", name="Null0", num_blocks=64, block_size=512)
    st = tgt.rpc("bdev_get_iostat")
    assert isinstance(st["tick_rate"], int) and st["tick_rate"] > 0, st
    assert isinstance(st["ticks"], int) and st["ticks"] > 0, st
    assert sorted(b["name"] for b in st["bdevs"]) == ["Malloc0", "Null0"]
    for b in st["bdevs"]:
        for k in IOSTAT_COUNTERS + IOSTAT_LATENCIES:
            assert isinstance(b.get(k), int), (k, b)
        for k in IOSTAT_COUNTERS:
            assert b[k] == 0, (k, b)        # nothing did I/O yet
    one = tgt.rpc("bdev_get_iostat", names=["Null0"])
    assert [b["name"] for b in one["bdevs"]] == ["Null0"]
    ticks2 = tgt.rpc("bdev_get_iostat")["ticks"]
    assert ticks2 >= st["ticks"]

    assert tgt.rpc_err("bdev_get_iostat", names=["Nope"]) == ENODEV
    code, _ = tgt.rpc_err("bdev_get_iostat", per_channel=True)
    assert code == -22
    per = tgt.rpc("bdev_get_iostat", names=["Malloc0"], per_channel=True)
    assert per["name"] == "Malloc0" and isinstance(per["channels"], list), per

    cli = json.loads(tgt.cli("bdev_get_iostat", "--names", "Malloc0").stdout)
    assert [b["name"] for b in cli["bdevs"]] == ["Malloc0"]


def test_reset_iostat(tgt):
    tgt.rpc("bdev_malloc_create", name="Malloc0", num_blocks=64, block_size=512)
    assert tgt.rpc("bdev_reset_iostat") is True
    assert tgt.rpc("bdev_reset_iostat", name="Malloc0", mode="all") is True
    assert tgt.rpc("bdev_reset_iostat", name="Malloc0", mode="maxmin") is True
    assert tgt.rpc_err("bdev_reset_iostat", name="Nope") == ENODEV
    code, _ = tgt.rpc_err("bdev_reset_iostat", mode="sometimes")
    assert code in (-32602, -32603)
    tgt.cli("bdev_reset_iostat", "-b", "Malloc0")


def test_qos_limit(tgt):
    tgt.rpc("bdev_malloc_create", name="Malloc0", num_blocks=64, block_size=512)
    assert tgt.rpc_err("bdev_set_qos_limit", name="Malloc0") == (-22, "No rate limits specified")
    assert tgt.rpc("bdev_set_qos_limit", name="Malloc0", rw_ios_per_sec=20000,
                   r_mbytes_per_sec=100) is True
    lim = tgt.bdev("Malloc0")["assigned_rate_limits"]
    assert lim == {"rw_ios_per_sec": 20000, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 100,
                   "w_mbytes_per_sec": 0}, lim
    # omitted = unchanged; 0 = unlimited
    tgt.cli("bdev_set_qos_limit", "Malloc0", "--w-mbytes-per-sec", "50")
    lim = tgt.bdev("Malloc0")["assigned_rate_limits"]
    assert lim == {"rw_ios_per_sec": 20000, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 100,
                   "w_mbytes_per_sec": 50}, lim
    tgt.rpc("bdev_set_qos_limit", name="Malloc0", rw_ios_per_sec=0)
    assert tgt.bdev("Malloc0")["assigned_rate_limits"]["rw_ios_per_sec"] == 0

    assert tgt.rpc_err("bdev_set_qos_limit", name="Nope", rw_ios_per_sec=1000) == ENODEV
    # SPDK: IOPS limits go in steps of 1000 -> "Failed to configure rate limit: ..."
    code, msg = tgt.rpc_err("bdev_set_qos_limit", name="Malloc0", rw_ios_per_sec=1500)
    assert code == -32602 and msg.startswith("Failed to configure rate limit"), (code, msg)
    assert tgt.rpc_err("bdev_set_qos_limit", name="Malloc0", rw_ios_per_sec=-5) == \
        (-32603, DECODE_FAILED)
    assert tgt.bdev("Malloc0")["assigned_rate_limits"]["w_mbytes_per_sec"] == 50
    # save_config replays the limit right after the bdev
    cfg = tgt.rpc("framework_get_config", name="bdev")
    methods = [e["method"] for e in cfg]
    i = methods.index("bdev_malloc_create")
    assert methods[i + 1] == "bdev_set_qos_limit", methods
    assert cfg[i + 1]["params"]["name"] == "Malloc0"
    assert cfg[i + 1]["params"]["w_mbytes_per_sec"] == 50


def test_wait_for_examine(tgt):
    assert tgt.rpc("bdev_wait_for_examine") is True
    tgt.rpc("bdev_malloc_create", name="Malloc0", num_blocks=64, block_size=512)
    assert tgt.rpc("bdev_wait_for_examine") is True
    tgt.cli("bdev_wait_for_examine")


def test_examine_needs_auto_examine_off(tgt):
    tgt.rpc("bdev_malloc_create", name="Malloc0", num_blocks=64, block_size=512)
    code, _ = tgt.rpc_err("bdev_examine", name="Malloc0")
    assert code == -22


def test_manual_examine(tgt_factory):
    t = tgt_factory("--wait-for-rpc")
    assert t.rpc("bdev_set_options", bdev_auto_examine=False) is True
    assert t.rpc("framework_start_init") is True
    assert t.rpc("bdev_examine", name="Malloc0") is True
    assert t.rpc_err("bdev_examine", name="Malloc0")[0] == -17
    t.rpc("bdev_malloc_create", name="Malloc0", num_blocks=64, block_size=512)
    assert t.rpc("bdev_wait_for_examine") is True
    cfg = t.rpc("framework_get_config", name="bdev")
    assert cfg[0]["method"] == "bdev_set_options"
    assert cfg[0]["params"]["bdev_auto_examine"] is False
    assert {"method": "bdev_examine", "params": {"name": "Malloc0"}} in cfg, cfg
    assert cfg[-1]["method"] == "bdev_wait_for_examine"


# --- concurrent deletes ------------------------------------------------------------

LAT = dict(avg_read_latency=1, p99_read_latency=1, avg_write_latency=1, p99_write_latency=1)


@pytest.mark.parametrize("module", ["malloc", "uring", "aio", "delay", "error"])
def test_concurrent_deletes_one_true_the_others_enodev(tgt, datadir, module):
    """Issue #8 defect 7, for every delete RPC: of concurrent deletes of one
    bdev exactly one answers true, the others -19. A delay bdev stacked on
    top holds a descriptor, so the first delete waits while the others run."""
    tgt.rpc("bdev_malloc_create", name="Base0", num_blocks=256, block_size=4096)
    if module == "malloc":
        victim, delete = "Base0", "bdev_malloc_delete"
    elif module in ("uring", "aio"):
        path = datadir / "f.img"
        path.write_bytes(b"\0" * (1 << 20))
        victim, delete = "F0", "bdev_%s_delete" % module
        tgt.rpc("bdev_%s_create" % module, name=victim, filename=str(path), block_size=4096)
    elif module == "delay":
        victim, delete = "D0", "bdev_delay_delete"
        tgt.rpc("bdev_delay_create", name=victim, base_bdev_name="Base0", **LAT)
    else:
        victim, delete = "EE_Base0", "bdev_error_delete"
        tgt.rpc("bdev_error_create", base_name="Base0")
    tgt.rpc("bdev_delay_create", name="Top", base_bdev_name=victim, **LAT)
    got = concurrent_rpc(tgt, 4, delete, name=victim)
    assert sorted(got, key=str) == sorted([(True, None)] + [(None, -19)] * 3, key=str), got
    names = tgt.bdevs()
    assert victim not in names and "Top" not in names, names
