"""bdevperf over each module: data integrity (verify), workloads, latency,
QoS, error injection and bad arguments. Each case writes its own --json config."""

import os

import pytest

from conftest import PERF_SECS, SMALL, run_bdevperf, write_bdev_config

MALLOC_MB = 16 if SMALL else 64
FILE_MB = 16 if SMALL else 64


def malloc(name, mb=MALLOC_MB, bs=512):
    return ("bdev_malloc_create", {"name": name, "num_blocks": mb * 1024 * 1024 // bs,
                                   "block_size": bs})


def delay(name, base, read_us, write_us):
    """A delay bdev whose average and p99 latencies are both the given ones."""
    return ("bdev_delay_create", {"name": name, "base_bdev_name": base,
                                  "avg_read_latency": read_us, "p99_read_latency": read_us,
                                  "avg_write_latency": write_us, "p99_write_latency": write_us})


def make_file(datadir, name, mb=FILE_MB):
    path = os.path.join(str(datadir), name)
    with open(path, "wb") as f:
        f.truncate(mb << 20)
    return path


def assert_clean_run(r, min_iops=1.0):
    assert r.returncode == 0, r.describe()
    assert r.total is not None, "no Total row:\n" + r.describe()
    assert r.total["iops"] >= min_iops, r.describe()
    assert r.total["mibps"] > 0, r.describe()
    assert r.total["fail_per_s"] == 0, r.describe()
    assert r.total["timeout_per_s"] == 0, r.describe()
    assert 0 < r.total["min_lat_us"] <= r.total["avg_lat_us"] <= r.total["max_lat_us"], r.describe()


def check_jobs(r, expected):
    assert sorted(r.jobs) == sorted(expected), "job rows %s, expected %s\n%s" \
        % (sorted(r.jobs), sorted(expected), r.describe())
    total_iops = sum(j["iops"] for j in r.jobs.values())
    assert abs(total_iops - r.total["iops"]) <= max(1.0, 0.01 * r.total["iops"]), r.describe()
    # The job stops at -t: a generous bound, as a loaded machine drains the
    # last I/Os late (a job that never stopped would still fail).
    for j in r.jobs.values():
        assert 0 < j["runtime_s"] <= PERF_SECS + 10, r.describe()


# --- verify on every backing ---------------------------------------------------------

def test_verify_malloc(workdir):
    cfg = write_bdev_config(workdir / "bp.json", [malloc("Malloc0")])
    r = run_bdevperf(cfg, "-q", 16, "-o", 4096, "-w", "verify")
    assert_clean_run(r)
    check_jobs(r, ["Malloc0"])
    # IOPS x size = MiB/s
    assert abs(r.total["iops"] * 4096 / 2**20 - r.total["mibps"]) <= 0.02 * r.total["mibps"] + 0.01


def test_verify_malloc_4k_blocks_large_io(workdir):
    cfg = write_bdev_config(workdir / "bp.json", [malloc("Malloc0", bs=4096)])
    r = run_bdevperf(cfg, "-q", 8, "-o", "128k", "-w", "verify")
    assert_clean_run(r)


@pytest.mark.parametrize("method,name,bs", [("bdev_uring_create", "URING0", 512),
                                            ("bdev_aio_create", "AIO0", 4096)])
def test_verify_file(workdir, datadir, method, name, bs):
    path = make_file(datadir, name.lower() + ".img")
    cfg = write_bdev_config(workdir / "bp.json", [
        (method, {"name": name, "filename": path, "block_size": bs})])
    r = run_bdevperf(cfg, "-q", 16, "-o", 4096, "-w", "verify")
    assert_clean_run(r)
    check_jobs(r, [name])


def test_verify_data_lands_in_file(workdir, datadir):
    """What a write workload puts in a uring bdev is in the file afterwards."""
    path = make_file(datadir, "data.img", mb=4)
    cfg = write_bdev_config(workdir / "bp.json", [
        ("bdev_uring_create", {"name": "URING0", "filename": path, "block_size": 512})])
    r = run_bdevperf(cfg, "-q", 8, "-o", 4096, "-w", "write", secs=1)
    assert_clean_run(r)
    with open(path, "rb") as f:
        data = f.read()
    assert data.count(0) < len(data), "the file is still all zeroes after a write workload"


def run_on_delay(workdir, workload, qd, read_us, write_us):
    """A clean 4 KiB bdevperf run of `workload` on Delay0 (read_us, write_us) over Malloc0."""
    cfg = write_bdev_config(workdir / "bp.json", [
        malloc("Malloc0"),
        delay("Delay0", "Malloc0", read_us=read_us, write_us=write_us),
    ])
    r = run_bdevperf(cfg, "-q", qd, "-o", 4096, "-w", workload, "-T", "Delay0")
    assert_clean_run(r)
    return r


def test_verify_delay_latency_visible(workdir):
    r = run_on_delay(workdir, "verify", 16, read_us=2000, write_us=2000)
    check_jobs(r, ["Delay0"])
    assert r.total["avg_lat_us"] >= 2000, r.describe()
    assert r.total["min_lat_us"] >= 2000 * 0.95, r.describe()
    # 16 in flight, >= 2 ms each: at most ~8000 IOPS
    assert r.total["iops"] <= 16 / 0.002 * 1.05, r.describe()


def test_delay_randread_latency(workdir):
    r = run_on_delay(workdir, "randread", 4, read_us=1000, write_us=10)
    assert 1000 <= r.total["avg_lat_us"] < 1000 * 5, r.describe()


def test_latency_percentiles(workdir):
    # -l: SPDK's per-job summary; a 1 ms delay bdev bounds every percentile from below.
    cfg = write_bdev_config(workdir / "bp.json", [
        malloc("Malloc0"),
        malloc("Malloc1"),
        delay("Delay0", "Malloc1", read_us=1000, write_us=10),
    ])
    r = run_bdevperf(cfg, "-q", 4, "-o", 4096, "-w", "randread", "-l", secs=1)
    assert_clean_run(r)
    p = r.percentiles
    assert set(p) == {"Malloc0", "Delay0"}, r.describe()
    d = p["Delay0"]
    assert d[1.0] >= 1000 * 0.98 and d[99.0] >= d[50.0] >= d[1.0], r.describe()
    assert d[99.0] <= r.jobs["Delay0"]["max_lat_us"] * 1.02, r.describe()
    assert p["Malloc0"][50.0] < d[50.0], r.describe()
    assert "Latency histogram" not in r.stdout
    r = run_bdevperf(cfg, "-q", 4, "-o", 4096, "-w", "randread", "-ll", "-T", "Malloc0", secs=1)
    assert_clean_run(r)
    assert "Latency histogram for Malloc0 from core 0:" in r.stdout, r.describe()


def test_null_stores_no_data(workdir):
    """Null completes I/O without storing data: writes and reads succeed; verify runs every
    write and read-back, says that it cannot compare data, and passes when no I/O fails."""
    cfg = write_bdev_config(workdir / "bp.json", [
        ("bdev_null_create", {"name": "Null0", "num_blocks": 262144, "block_size": 512})])
    for workload in (["-w", "randwrite"], ["-w", "randread"], ["-w", "rw", "-M", "50"]):
        r = run_bdevperf(cfg, "-q", 16, "-o", 4096, *workload, secs=1)
        assert_clean_run(r)
        check_jobs(r, ["Null0"])
    r = run_bdevperf(cfg, "-q", 16, "-o", 4096, "-w", "verify", secs=1)
    assert_clean_run(r)
    check_jobs(r, ["Null0"])
    assert "stores no data" in r.output, r.describe()


def test_verify_two_cores(workdir):
    cfg = write_bdev_config(workdir / "bp.json", [malloc("Malloc0"), malloc("Malloc1")])
    r = run_bdevperf(cfg, "-q", 8, "-o", 4096, "-w", "verify", "-m", "0x3")
    assert_clean_run(r)
    assert set(r.jobs) == {"Malloc0", "Malloc1"}, r.describe()


# --- workloads ---------------------------------------------------------------------------

WORKLOADS = {
    "randread": ["-w", "randread"],
    "read": ["-w", "read"],
    "randwrite": ["-w", "randwrite"],
    "write": ["-w", "write"],
    "rw50": ["-w", "rw", "-M", "50"],
    "randrw70": ["-w", "randrw", "-M", "70"],
    "unmap": ["-w", "unmap"],
    "flush": ["-w", "flush"],
    "write_zeroes": ["-w", "write_zeroes"],
}


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_workload_on_malloc(workdir, name):
    cfg = write_bdev_config(workdir / "bp.json", [malloc("Malloc0")])
    r = run_bdevperf(cfg, "-q", 16, "-o", 4096, *WORKLOADS[name], secs=1)
    assert_clean_run(r)
    check_jobs(r, ["Malloc0"])


@pytest.mark.parametrize("name", ["unmap", "write_zeroes", "flush", "rw50"])
def test_workload_on_aio_file(workdir, datadir, name):
    path = make_file(datadir, "wl.img", mb=16)
    # SPDK's aio bdev supports unmap and write_zeroes only with fallocate
    cfg = write_bdev_config(workdir / "bp.json", [
        ("bdev_aio_create", {"name": "AIO0", "filename": path, "block_size": 512,
                             "fallocate": True})])
    r = run_bdevperf(cfg, "-q", 8, "-o", 4096, *WORKLOADS[name], secs=1)
    assert_clean_run(r)


def test_unsupported_workload_refused(workdir, datadir):
    path = make_file(datadir, "nofalloc.img", mb=4)
    cfg = write_bdev_config(workdir / "bp.json", [
        ("bdev_aio_create", {"name": "AIO0", "filename": path, "block_size": 512})])
    r = run_bdevperf(cfg, "-q", 8, "-o", 4096, "-w", "unmap", secs=1)
    assert r.returncode != 0, r.describe()


def test_all_unclaimed_bdevs_get_a_job(workdir):
    cfg = write_bdev_config(workdir / "bp.json", [
        malloc("Malloc0"), malloc("Malloc1"),
        delay("Delay0", "Malloc1", read_us=10, write_us=10),
    ])
    r = run_bdevperf(cfg, "-q", 8, "-o", 4096, "-w", "randread", secs=1)
    assert_clean_run(r)
    # Malloc1 is claimed by Delay0: it gets no job of its own
    check_jobs(r, ["Malloc0", "Delay0"])


def test_qos_limit_caps_iops(workdir):
    limit = 2000
    cfg = write_bdev_config(workdir / "bp.json", [
        malloc("Malloc0"),
        ("bdev_set_qos_limit", {"name": "Malloc0", "rw_ios_per_sec": limit}),
    ])
    r = run_bdevperf(cfg, "-q", 16, "-o", 4096, "-w", "randread", secs=2)
    assert_clean_run(r)
    assert r.total["iops"] <= limit * 1.15, r.describe()
    assert r.total["iops"] >= limit * 0.5, r.describe()


def test_qos_bandwidth_limit(workdir):
    cfg = write_bdev_config(workdir / "bp.json", [
        malloc("Malloc0"),
        ("bdev_set_qos_limit", {"name": "Malloc0", "rw_mbytes_per_sec": 10}),
    ])
    r = run_bdevperf(cfg, "-q", 16, "-o", 65536, "-w", "randwrite", secs=2)
    assert_clean_run(r)
    assert r.total["mibps"] <= 10 * 1.15, r.describe()
    assert r.total["mibps"] >= 10 * 0.5, r.describe()


# --- error injection ----------------------------------------------------------------------

def read_failures_config(workdir):
    """EE_Malloc0 over Malloc0 with 10 read failures injected."""
    return write_bdev_config(workdir / "bp.json", [
        malloc("Malloc0"),
        ("bdev_error_create", {"base_name": "Malloc0"}),
        ("bdev_error_inject_error", {"name": "EE_Malloc0", "io_type": "read",
                                     "error_type": "failure", "num": 10}),
    ])


def test_error_injection_fails_reads(workdir):
    cfg = read_failures_config(workdir)
    r = run_bdevperf(cfg, "-q", 16, "-o", 4096, "-w", "randread", "-T", "EE_Malloc0", secs=1)
    assert r.returncode != 0, "injected read failures did not fail the run:\n" + r.describe()
    assert r.total is not None, r.describe()
    assert r.total["fail_per_s"] > 0, r.describe()


def test_error_injection_writes_only(workdir):
    """Read errors injected; a write workload is untouched."""
    cfg = read_failures_config(workdir)
    r = run_bdevperf(cfg, "-q", 16, "-o", 4096, "-w", "randwrite", "-T", "EE_Malloc0", secs=1)
    assert_clean_run(r)


def test_error_bdev_without_injection_verifies(workdir):
    cfg = write_bdev_config(workdir / "bp.json", [
        malloc("Malloc0"),
        ("bdev_error_create", {"base_name": "Malloc0"}),
    ])
    r = run_bdevperf(cfg, "-q", 16, "-o", 4096, "-w", "verify", secs=1)
    assert_clean_run(r)
    check_jobs(r, ["EE_Malloc0"])


# --- bad arguments ----------------------------------------------------------------------

def test_missing_bdev(workdir):
    cfg = write_bdev_config(workdir / "bp.json", [malloc("Malloc0")])
    r = run_bdevperf(cfg, "-q", 16, "-o", 4096, "-w", "randread", "-T", "missing", secs=1)
    assert r.returncode != 0, r.describe()
    assert "missing" in r.output, r.describe()


@pytest.mark.parametrize("bs,io_size", [(512, 1000), (4096, 512), (512, 0)])
def test_io_size_not_a_block_multiple(workdir, bs, io_size):
    cfg = write_bdev_config(workdir / "bp.json", [malloc("Malloc0", bs=bs)])
    r = run_bdevperf(cfg, "-q", 16, "-o", io_size, "-w", "randread", secs=1)
    assert r.returncode != 0, r.describe()
    assert r.total is None or r.total["iops"] == 0, r.describe()


def test_rw_without_mix(workdir):
    cfg = write_bdev_config(workdir / "bp.json", [malloc("Malloc0")])
    r = run_bdevperf(cfg, "-q", 16, "-o", 4096, "-w", "rw", secs=1)
    assert r.returncode != 0, r.describe()


def test_bad_json_config(workdir):
    cfg = write_bdev_config(workdir / "bp.json", [malloc("Malloc0", bs=500)])
    r = run_bdevperf(cfg, "-q", 16, "-o", 4096, "-w", "randread", secs=1)
    assert r.returncode != 0, r.describe()


def test_no_bdevs(workdir):
    cfg = write_bdev_config(workdir / "bp.json", [])
    r = run_bdevperf(cfg, "-q", 16, "-o", 4096, "-w", "randread", secs=1)
    assert r.returncode != 0, r.describe()
