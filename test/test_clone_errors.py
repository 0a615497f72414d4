"""Failures of the clone's base bdevs (docs/clone.md; the gaps of
dm-clone's upstream suite, dm-clone.md §4): error bdevs under the source,
destination and metadata of a clone inside `clone_workload`.

* a source read error fails only the user read that needed the source;
  hydration retries and completes with the source's data;
* a destination write error fails the write; the region stays cold and
  still reads the source;
* a metadata write error switches the clone to read-only metadata: the
  flush that needed the commit fails, reads still work, writes that would
  need a hydration fail, the status says so;
* hydration paused by repeated source or destination errors says why
  (`paused_reason`), makes `clonectl status` exit 4, keeps probing and
  resumes by itself when the base works again.
"""

import pytest
from clone_util import (BS, UUID_DST, UUID_MD, UUID_SRC, classify, clone_create, clone_status,
                        clonectl,
                        make_stamped_file, make_zero_file, uring, wait_for, wait_hydrated,
                        wl_factory, mask)  # noqa: F401
from spdk.rpc.client import JSONRPCException

BLOCKS = 256
REGION = 4      # blocks per 16 KiB region


class ErrStack:
    """Src/Dst/Md on uring files, each behind an error bdev (EE_*)."""

    def __init__(self, t, d):
        self.t = t
        self.src = make_stamped_file(d / "src.img", BLOCKS)
        self.src_image = self.src.read_bytes()
        make_zero_file(d / "dst.img", BLOCKS * BS)
        make_zero_file(d / "md.img", 1 << 20)
        t.rpc("bdev_uring_create", **uring(self.src, "Src", UUID_SRC))
        t.rpc("bdev_uring_create", **uring(d / "dst.img", "Dst", UUID_DST))
        t.rpc("bdev_uring_create", **uring(d / "md.img", "Md", UUID_MD))
        for b in ("Src", "Dst", "Md"):
            t.rpc("bdev_error_create", base_name=b)

    def create(self, **opts):
        clone_create(self.t, source="EE_Src", dest="EE_Dst", md="EE_Md", region_size_kb=16,
                     **opts)

    def inject(self, bdev, io_type, num=1):
        self.t.rpc("bdev_error_inject_error", name="EE_" + bdev, io_type=io_type,
                   error_type="failure", num=num)

    def clear(self, bdev):
        self.t.rpc("bdev_error_inject_error", name="EE_" + bdev, io_type="clear",
                   error_type="failure")


def io_fails(fn, *args, **kw):
    with pytest.raises(JSONRPCException) as e:
        fn(*args, **kw)
    return e.value.message


@pytest.fixture
def es(wl_factory, datadir, mask):
    t = wl_factory(mask=mask)
    return ErrStack(t, datadir)


def test_source_read_error_fails_only_that_read(es):
    t = es.t
    es.create(no_hydration=True)
    es.inject("Src", "read", num=1)
    io_fails(t.read, "Clone0", 9, 1)
    assert classify(t.read("Clone0", 9, 1), 9) == 0, "the next read must succeed"
    # hydrated regions do not touch the source at all
    t.write_stamps("Clone0", 5, 0, REGION)
    es.inject("Src", "read", num=100)
    assert classify(t.read("Clone0", 1, 1), 1) == 5
    es.clear("Src")
    s = clone_status(t)
    assert s["state"] == "paused" and s["metadata"]["mode"] == "rw", s


def test_hydration_retries_source_errors(es):
    t = es.t
    es.create(no_hydration=True)
    es.inject("Src", "read", num=5)
    t.rpc("bdev_clone_set_hydration", name="Clone0", enable=True, hydration_threshold=4)
    s = wait_hydrated(t, timeout=60)
    assert s["errors"]["source_read"] >= 1, \
        "5 failed source reads during hydration, none counted: %s" % s["errors"]
    assert s["metadata"]["mode"] == "rw"
    t.stop()
    assert (es.src.parent / "dst.img").read_bytes() == es.src_image


def test_dest_write_error_fails_the_write(es):
    t = es.t
    es.create(no_hydration=True)
    es.inject("Dst", "write", num=1)
    io_fails(t.write_stamps, "Clone0", 7, 2 * REGION, REGION)      # whole cold region
    s = clone_status(t)
    assert s["hydrated_regions"] == 0, "a failed overwrite must not mark its region: %s" % s
    assert s["errors"]["dest_write"] >= 1, s["errors"]
    assert classify(t.read("Clone0", 2 * REGION, 1), 2 * REGION) == 0
    t.write_stamps("Clone0", 8, 2 * REGION, REGION)
    assert classify(t.read("Clone0", 2 * REGION, 1), 2 * REGION) == 8
    # a partial write whose hydration copy cannot be written fails too
    es.inject("Dst", "write", num=1)
    io_fails(t.write_stamps, "Clone0", 9, 5 * REGION + 1, 1)
    assert classify(t.read("Clone0", 5 * REGION + 1, 1), 5 * REGION + 1) == 0
    assert clone_status(t)["hydrated_regions"] == 1


def fail_a_commit(es, md_errors, mode):
    """Region 0 written and committed; then `md_errors` injected on the
    metadata bdev, region 4 written, and its flush fails: the clone's
    status once its metadata mode is `mode`."""
    t = es.t
    es.create(no_hydration=True)
    t.write_stamps("Clone0", 3, 0, REGION)          # region 0 hydrated, committed
    t.flush("Clone0")
    for kind in md_errors:
        es.inject("Md", kind, num=1000)
    t.write_stamps("Clone0", 4, 4 * REGION, REGION)  # region 4: needs a commit
    io_fails(t.flush, "Clone0")
    return wait_for(lambda: ((lambda s: (s["metadata"]["mode"] == mode, s))(clone_status(t))),
                    5, "metadata mode " + mode)


def test_metadata_write_error_goes_read_only(es):
    t = es.t
    s = fail_a_commit(es, ["write"], "ro")
    assert s["state"] == "read_only", s
    assert s["errors"]["metadata"] >= 1, s["errors"]
    # reads work; the committed region keeps its data
    assert classify(t.read("Clone0", 0, 1), 0) == 3
    assert classify(t.read("Clone0", 40, 1), 40) == 0
    # writes to hydrated regions work; writes needing a hydration fail
    t.write_stamps("Clone0", 5, 0, 1)
    assert classify(t.read("Clone0", 0, 1), 0) == 5
    io_fails(t.write_stamps, "Clone0", 6, 10 * REGION, REGION)
    io_fails(t.write_stamps, "Clone0", 6, 11 * REGION + 1, 1)
    # a clean shutdown still works
    es.clear("Md")
    t.stop()


def test_metadata_unreadable_after_failed_commit_goes_failed(es):
    """dm-clone: after a failed commit the metadata is reopened; when even
    that fails, fail mode: every I/O fails and the status says so."""
    t = es.t
    s = fail_a_commit(es, ["write", "read"], "fail")
    assert s["state"] == "failed", s
    assert "metadata unusable" in (s["last_error"] or ""), s
    # fail mode: reads and writes fail, even of committed regions
    io_fails(t.read, "Clone0", 0, 1)
    io_fails(t.write_stamps, "Clone0", 5, 0, 1)
    # and it never leaves fail mode, even when the metadata works again
    es.clear("Md")
    io_fails(t.read, "Clone0", 0, 1)
    assert clone_status(t)["state"] == "failed"
    t.stop()


def test_commit_flushes_destination_before_metadata(es):
    """The durability order (docs/metadata.md "Commit"): the destination is
    flushed before any bitmap unit is written. A failed destination flush
    must fail the commit with no metadata write, so no region is ever
    recorded hydrated ahead of its data."""
    t = es.t
    es.create(no_hydration=True)
    t.flush("Clone0")
    md_before = t.rpc("bdev_get_iostat", names=["EE_Md"])
    md_before = (md_before["bdevs"] if isinstance(md_before, dict) else md_before)[0]
    es.inject("Dst", "flush", num=1)
    t.write_stamps("Clone0", 3, 2 * REGION, REGION)     # region 2: needs a commit
    io_fails(t.flush, "Clone0")
    md_after = t.rpc("bdev_get_iostat", names=["EE_Md"])
    md_after = (md_after["bdevs"] if isinstance(md_after, dict) else md_after)[0]
    assert md_after["num_write_ops"] == md_before["num_write_ops"], \
        "bitmap units were written although the destination flush before them failed"
    s = clone_status(t)
    assert s["errors"]["metadata"] >= 1 or s["metadata"]["mode"] != "rw", s


def wait_status(t, pred, what, timeout=60):
    return wait_for(lambda: ((lambda s: (pred(s), s))(clone_status(t))), timeout, what)


@pytest.mark.parametrize("base,io_type,reason", [("Src", "read", "source_errors"),
                                                 ("Dst", "write", "dest_errors")])
def test_hydration_paused_by_errors_resumes_by_itself(es, base, io_type, reason):
    """Issue #8: after 8 failed copies hydration paused until someone ran
    set_hydration --enable. Now it says why, probes with back-off and
    resumes when the base is back; clonectl exits 4 meanwhile."""
    t = es.t
    es.create(no_hydration=True)
    s = clone_status(t)
    assert (s["state"], s["paused_reason"]) == ("paused", "user"), s
    assert clonectl(t.sock, "status").returncode == 0, "a user pause is no failure"
    es.inject(base, io_type, num=1 << 30)
    t.rpc("bdev_clone_set_hydration", name="Clone0", enable=True, hydration_threshold=4)
    s = wait_status(t, lambda s: s["state"] == "paused", "paused by %s" % reason)
    assert s["paused_reason"] == reason and s["hydration_enabled"] is True, s
    cp = clonectl(t.sock, "status")
    assert cp.returncode == 4, (cp.returncode, cp.stdout, cp.stderr)
    assert "paused:" + reason in cp.stdout and "Clone0" in cp.stderr, cp.stdout + cp.stderr
    # it keeps probing (one copy at a time, with back-off) while paused
    key = "source_read" if base == "Src" else "dest_write"
    n = s["errors"][key]
    s = wait_status(t, lambda s: s["errors"][key] > n, "a probe copy while paused")
    assert s["state"] == "paused" and s["paused_reason"] == reason, s
    es.clear(base)
    s = wait_hydrated(t, timeout=120)
    assert s["paused_reason"] is None and s["last_error"] is None, s
    assert clonectl(t.sock, "status").returncode == 0
    t.stop()
    assert (es.src.parent / "dst.img").read_bytes() == es.src_image
