"""dm-clone's own test-suite scenarios (device-mapper-test-suite, branch
feature-dm-clone: CreationTests, CommitTests, ConsistencyTests; dm-clone.md
§4) and the partial-discard bug (§2 #5), on the clone inside
`clone_workload`, which hosts the target and does I/O in-process.
"""

import json
import random
import time

import pytest
from conftest import RawConn
from clone_util import (BS, UUID_DST, UUID_MD, UUID_SRC, classify, clone_create, clone_status,
                        describe, make_stamped_file, make_zero_file, md_required_bytes,
                        md_writes, stamp, uring, wait_for, wait_hydrated, wl_factory, mask)  # noqa: F401

GIB = 1 << 30


def null(t, name, blocks, bs=BS):
    t.rpc("bdev_null_create", name=name, num_blocks=blocks, block_size=bs)


# ---------------------------------------------------------------------------
# CreationTests


@pytest.mark.parametrize("kb,ok", [(4, True), (1048576, True), (2, False), (2097152, False),
                                   (4 * 1024 + 57, False)])
def test_region_size_bounds(wl_factory, datadir, kb, ok):
    """4 KiB .. 1 GiB, powers of two; a 1 GiB region on a 1 GiB device works."""
    t = wl_factory()
    null(t, "Src", GIB // BS)
    dst = make_zero_file(datadir / "dst.img", GIB)    # sparse
    t.rpc("bdev_uring_create", **uring(dst, "Dst"))
    md = make_zero_file(datadir / "md.img", 16 << 20)
    t.rpc("bdev_uring_create", **uring(md, "Md"))
    if ok:
        clone_create(t, region_size_kb=kb, no_hydration=True)
        s = clone_status(t)
        assert s["num_regions"] == GIB // (kb * 1024)
        # the clone serves I/O at both ends of the device
        last = GIB // BS - 1
        t.write_stamps("Clone0", 9, 0, 1)
        t.write_stamps("Clone0", 9, last, 1)
        assert classify(t.read("Clone0", 0, 1), 0) == 9
        assert classify(t.read("Clone0", last, 1), last) == 9
        assert t.read("Clone0", 1, 1) == bytes(BS), "unwritten blocks read the (null) source"
    else:
        code, msg = t.rpc_err("bdev_clone_create", name="Clone0", source_bdev_name="Src",
                              dest_bdev_name="Dst", metadata_bdev_name="Md", region_size_kb=kb)
        assert code == -22, msg
        assert t.rpc("bdev_clone_get_bdevs") == []
        assert md.read_bytes() == bytes(16 << 20)


def test_too_small_metadata_fails(wl_factory, datadir):
    """A 16 KiB metadata device for a 1 GiB clone at 4 KiB regions."""
    t = wl_factory()
    null(t, "Src", GIB // BS)
    null(t, "Dst", GIB // BS)
    md = make_zero_file(datadir / "md.img", 16 << 10)
    t.rpc("bdev_uring_create", **uring(md, "Md"))
    code, msg = t.rpc_err("bdev_clone_create", name="Clone0", source_bdev_name="Src",
                          dest_bdev_name="Dst", metadata_bdev_name="Md")
    need = md_required_bytes(GIB // BS)
    assert code == -22 and str(need) in msg, (code, msg, need)
    assert md.read_bytes() == bytes(16 << 10)


def _reopen(t, src_blocks, kb):
    t.rpc("bdev_null_create", name="S", num_blocks=src_blocks, block_size=BS)
    try:
        return t.rpc_err("bdev_clone_create", name="C", source_bdev_name="S",
                         dest_bdev_name="Dst", metadata_bdev_name="Md", region_size_kb=kb,
                         no_hydration=True, uuid=UUID_SRC)
    finally:
        t.rpc("bdev_null_delete", name="S")


def test_reopen_with_other_geometry_fails(wl_factory, datadir):
    """Formatted at 64 KiB regions and S blocks: 4 KiB, 128 KiB, S-1 and S+1 all fail;
    the original geometry opens again."""
    t = wl_factory()
    blocks = 16384  # 64 MiB
    null(t, "Dst", blocks + 1)
    md = make_zero_file(datadir / "md.img", 1 << 20)
    t.rpc("bdev_uring_create", **uring(md, "Md"))
    null(t, "S", blocks)
    t.rpc("bdev_clone_create", name="C", source_bdev_name="S", dest_bdev_name="Dst",
          metadata_bdev_name="Md", region_size_kb=64, no_hydration=True, uuid=UUID_SRC)
    t.rpc("bdev_clone_delete", name="C")
    t.rpc("bdev_null_delete", name="S")
    formatted = md.read_bytes()
    for src_blocks, kb, field in [(blocks, 4, "region_size"), (blocks, 128, "region_size"),
                                  (blocks - 1, 64, "source blocks"),
                                  (blocks + 1, 64, "source blocks")]:
        code, msg = _reopen(t, src_blocks, kb)
        assert code == -22, (src_blocks, kb, code, msg)
        assert field.split()[0] in msg, "the error should name %s: %r" % (field, msg)
        assert md.read_bytes() == formatted, "a refused open changed the metadata"
        assert t.rpc("bdev_clone_get_bdevs") == []
    t.rpc("bdev_null_create", name="S", num_blocks=blocks, block_size=BS)
    t.rpc("bdev_clone_create", name="C", source_bdev_name="S", dest_bdev_name="Dst",
          metadata_bdev_name="Md", region_size_kb=64, no_hydration=True, uuid=UUID_SRC)


@pytest.mark.parametrize("smaller", ["Dst"])
def test_data_device_smaller_than_target_fails(wl_factory, datadir, smaller):
    t = wl_factory()
    null(t, "Src", 4096)
    null(t, "Dst", 4095)
    md = make_zero_file(datadir / "md.img", 1 << 20)
    t.rpc("bdev_uring_create", **uring(md, "Md"))
    code, msg = t.rpc_err("bdev_clone_create", name="Clone0", source_bdev_name="Src",
                          dest_bdev_name=smaller, metadata_bdev_name="Md")
    assert code == -22, msg


# ---------------------------------------------------------------------------
# the stamped stack


class Stack:
    def __init__(self, t, datadir, blocks=1024, md_bytes=1 << 20, delay_us=0, src_stamps=None):
        """src_stamps: {block: seq} stamped on the source instead of seq 0."""
        self.t = t
        self.blocks = blocks
        self.src_path = make_stamped_file(datadir / "src.img", blocks)
        # What every block should read: seq of its stamp, or "zero".
        self.expect = [0] * blocks
        if src_stamps:
            data = bytearray(self.src_path.read_bytes())
            for b, seq in src_stamps.items():
                data[b * BS:(b + 1) * BS] = stamp(seq, b)
                self.expect[b] = seq
            self.src_path.write_bytes(bytes(data))
        self.src_image = self.src_path.read_bytes()
        self.dst_path = make_zero_file(datadir / "dst.img", blocks * BS)
        self.md_path = make_zero_file(datadir / "md.img", md_bytes)
        if delay_us:
            t.rpc("bdev_uring_create", **uring(self.src_path, "SrcFile", UUID_SRC))
            t.rpc("bdev_delay_create", base_bdev_name="SrcFile", name="Src",
                  avg_read_latency=delay_us, p99_read_latency=delay_us, avg_write_latency=0,
                  p99_write_latency=0)
        else:
            t.rpc("bdev_uring_create", **uring(self.src_path, "Src", UUID_SRC))
        t.rpc("bdev_uring_create", **uring(self.dst_path, "Dst", UUID_DST))
        t.rpc("bdev_uring_create", **uring(self.md_path, "Md", UUID_MD))

    def check_clone(self, allow_zero=()):
        data = self.t.dump("Clone0", self.md_path.parent / "clone.dump")
        self.check_image(data, "the clone", allow_zero)

    def check_image(self, data, what, allow_zero=()):
        assert len(data) == self.blocks * BS
        bad = []
        for b in range(self.blocks):
            blk = data[b * BS:(b + 1) * BS]
            got = classify(blk, b)
            if got == self.expect[b] or (got == "zero" and b in allow_zero):
                continue
            bad.append("block %d: expected %s, found %s"
                       % (b, "zeroes" if self.expect[b] == "zero" else
                          ("seq %d" % self.expect[b] if self.expect[b] else "the source stamp"),
                          describe(blk, b)))
        assert not bad, "%s: %d bad blocks:\n%s" % (what, len(bad), "\n".join(bad[:20]))

    def check_source_unchanged(self):
        assert self.src_path.read_bytes() == self.src_image, "a write reached the source"

    def stamp_clone(self, seq, first, count):
        self.t.write_stamps("Clone0", seq, first, count)
        for b in range(first, first + count):
            self.expect[b] = seq


# ---------------------------------------------------------------------------
# CommitTests


@pytest.fixture
def commit_stack(wl_factory, datadir, mask):
    t = wl_factory(mask=mask)
    st = Stack(t, datadir)
    clone_create(t, no_hydration=True)           # 4 KiB regions = 1 block
    # Let the create's own metadata writes (format) and a first periodic
    # tick pass.
    time.sleep(1.2)
    return st


def test_commit_on_flush(commit_stack):
    st, t = commit_stack, commit_stack.t
    for op in ("write", "discard"):
        before = md_writes(t)
        if op == "write":
            st.stamp_clone(1, 10, 1)
        else:
            t.unmap("Clone0", 20, 1)
        t.flush("Clone0")
        after = md_writes(t)
        assert after > before, "%s of a cold region + flush wrote no metadata" % op
        assert clone_status(t)["hydrated_regions"] == (1 if op == "write" else 2)

    # rewriting a hydrated region and flushing commits nothing
    before = md_writes(t)
    st.stamp_clone(2, 10, 1)
    t.flush("Clone0")
    t.flush("Clone0")
    assert md_writes(t) == before, "a flush with nothing changed wrote metadata"
    time.sleep(1.5)
    assert md_writes(t) == before, "a periodic commit with nothing changed wrote metadata"
    st.check_clone(allow_zero={20})
    st.check_source_unchanged()


def test_commit_periodically(commit_stack):
    st, t = commit_stack, commit_stack.t
    before = md_writes(t)
    st.stamp_clone(1, 5, 1)
    st.stamp_clone(1, 7, 3)
    # dm-clone's COMMIT_PERIOD is 1 s: a commit must come without a flush
    wait_for(lambda: (md_writes(t) > before, md_writes(t)), 3.0,
             "a periodic metadata commit within ~1 s")
    time.sleep(1.2)
    settled = md_writes(t)
    st.stamp_clone(2, 5, 1)          # hydrated already
    time.sleep(2.2)
    assert md_writes(t) == settled, "rewriting hydrated regions committed metadata"
    st.check_clone()


# ---------------------------------------------------------------------------
# ConsistencyTests


def test_pattern_stomp(wl_factory, datadir, mask):
    """Stamps on the source read back through the clone; stamps on the clone
    never reach the source; both hold through hydration and after it."""
    t = wl_factory(mask=mask)
    rng = random.Random(1234)
    # 20 random 4 KiB patterns on the source
    on_source = {rng.randrange(1024): 500 + i for i in range(20)}
    st = Stack(t, datadir, blocks=1024, delay_us=200, src_stamps=on_source)
    clone_create(t, region_size_kb=16, no_hydration=True)
    st.check_clone()
    for i in range(10):
        b = rng.randrange(st.blocks - 3)
        st.stamp_clone(1000 + i, b, rng.choice([1, 2, 4]))
    st.check_clone()
    st.check_source_unchanged()

    t.rpc("bdev_clone_set_hydration", name="Clone0", enable=True, hydration_threshold=16,
          hydration_batch_size=4)
    wait_hydrated(t, timeout=60)
    st.check_clone()
    st.check_source_unchanged()
    for i in range(5):
        b = rng.randrange(st.blocks - 3)
        st.stamp_clone(2000 + i, b, rng.choice([1, 3]))
    st.check_clone()
    st.check_source_unchanged()
    t.stop()
    st.check_image(st.dst_path.read_bytes(), "the destination file after shutdown")


def test_hydrated_destination_equals_source(wl_factory, datadir, mask):
    t = wl_factory(mask=mask)
    st = Stack(t, datadir, blocks=2048 + 3, delay_us=100)   # a partial tail region
    clone_create(t, region_size_kb=32, hydration_threshold=8, hydration_batch_size=4)
    s = wait_hydrated(t, timeout=60)
    assert s["num_regions"] == 2048 // 8 + 1
    st.check_clone()
    t.stop()
    assert st.dst_path.read_bytes() == st.src_image
    st.check_source_unchanged()


# ---------------------------------------------------------------------------
# partial-region discards (dm-clone bug #5)

REGION = 4   # blocks per 16 KiB region

DISCARDS = [
    (1, 2),            # inside one region, touching neither end
    (REGION + 1, 3),   # from inside a region to its end
    (2 * REGION, 3),   # from a region's start to inside it
    (3 * REGION + 3, REGION + 2),   # partial head, one whole region, partial tail
    (6 * REGION + 2, 3 * REGION),   # partial head, two whole, partial tail
    (11 * REGION, 2 * REGION),      # exactly two whole regions
]


def whole_region_blocks(off, n):
    first = -(-off // REGION) * REGION
    last = ((off + n) // REGION) * REGION
    return set(range(first, max(first, last)))


@pytest.mark.parametrize("passdown", [True, False])
def test_partial_region_discards(wl_factory, datadir, mask, passdown):
    t = wl_factory(mask=mask)
    st = Stack(t, datadir, blocks=256)
    clone_create(t, region_size_kb=16, no_hydration=True, no_discard_passdown=not passdown)
    # a hydrated area too: regions 16..31 written whole on the clone
    st.stamp_clone(7, 16 * REGION, 16 * REGION)
    base = 16 * REGION
    discards = DISCARDS + [(base + o, n) for o, n in DISCARDS]
    may_zero = set()
    for off, n in discards:
        t.unmap("Clone0", off, n)
        if off >= base:
            # hydrated regions: the discarded blocks may be dropped
            may_zero |= set(range(off, off + n))
        else:
            # cold regions: only whole regions may become zeroes; a partial
            # region's blocks keep the source's data
            may_zero |= whole_region_blocks(off, n)
    t.flush("Clone0")
    st.check_clone(allow_zero=may_zero)
    s = clone_status(t)
    cold_whole = {b // REGION for off, n in DISCARDS for b in whole_region_blocks(off, n)}
    assert s["hydrated_regions"] == 16 + len(cold_whole), \
        "whole cold regions discarded must be marked hydrated, partial ones not: %s" % s

    t.rpc("bdev_clone_set_hydration", name="Clone0", enable=True, hydration_threshold=8)
    wait_hydrated(t, timeout=60)
    st.check_clone(allow_zero=may_zero)
    st.check_source_unchanged()
    t.stop()
    st.check_image(st.dst_path.read_bytes(), "the destination file", allow_zero=may_zero)


# ---------------------------------------------------------------------------
# discard and overwrite racing a region's hydration (dm-clone.md §1.8: a late
# copy must never land over data written after the region was discarded)


def _send_all(conn, reqs):
    conn.send("".join(json.dumps(r) for r in reqs))


def _io_req(rid, io_type, offset, num, stamp_seq=None):
    p = {"bdev_name": "Clone0", "io_type": io_type, "offset_blocks": offset,
         "num_blocks": num}
    if stamp_seq is not None:
        p["stamp"] = stamp_seq
    return {"jsonrpc": "2.0", "id": rid, "method": "workload_io", "params": p}


def _replies(conn, n):
    got = {}
    while len(got) < n:
        r = conn.recv(timeout=30)
        assert "result" in r, r
        got[r["id"]] = r
    return got


def test_discard_and_overwrite_during_write_hydration(wl_factory, datadir, mask):
    """A partial write to a cold region starts its copy (slow source); a
    discard and a whole-region write of that region arrive meanwhile. The
    whole-region write's blocks must never go back to the source's data."""
    t = wl_factory(mask=mask)
    st = Stack(t, datadir, blocks=256, delay_us=100_000)
    clone_create(t, region_size_kb=16, no_hydration=True)
    regions = list(range(0, 40, 2))
    conn = RawConn(t.sock)
    try:
        # W1 (partial) then D (whole) pipelined, all regions at once
        reqs = []
        for r in regions:
            reqs.append(_io_req(r * 10 + 1, "write", r * REGION, 1, stamp_seq=100 + r))
            reqs.append(_io_req(r * 10 + 2, "unmap", r * REGION, REGION))
        _send_all(conn, reqs)
        # W2 (whole region) once the discards are acknowledged: the copies
        # started by W1 are still reading the 100 ms source
        got = {}
        while not all(r * 10 + 2 in got for r in regions):
            rep = conn.recv(timeout=30)
            assert "result" in rep, rep
            got[rep["id"]] = rep
        in_flight = sum(1 for r in regions if r * 10 + 1 not in got)
        print("partial writes still hydrating at overwrite time: %d of %d" % (in_flight, len(regions)))
        _send_all(conn, [_io_req(r * 10 + 3, "write", r * REGION, REGION, stamp_seq=200 + r)
                         for r in regions])
        got.update(_replies(conn, 2 * len(regions) - len(got) + len(regions)))
    finally:
        conn.close()
    bad = []
    for r in regions:
        data = t.read("Clone0", r * REGION, REGION)
        for i in range(REGION):
            b = r * REGION + i
            c = classify(data[i * BS:(i + 1) * BS], b)
            ok = {100 + r, 200 + r} if i == 0 else {200 + r}
            if c not in ok:
                bad.append("block %d (region %d): %s, expected seq in %s"
                           % (b, r, describe(data[i * BS:(i + 1) * BS], b), sorted(ok)))
    assert not bad, "(%d partial writes still hydrating when the overwrites were sent)\n%s" % (
        in_flight, "\n".join(bad[:20]))
    t.flush("Clone0")
    t.stop()
    st.check_source_unchanged()


def test_discard_and_overwrite_during_background_hydration(wl_factory, datadir, mask):
    """Background hydration copying the first regions from a slow source;
    those regions are discarded and overwritten whole meanwhile: the copy
    must not land after the overwrite."""
    t = wl_factory(mask=mask)
    st = Stack(t, datadir, blocks=64, delay_us=150_000)
    clone_create(t, region_size_kb=16, hydration_threshold=4, hydration_batch_size=1)
    wait_for(lambda: ((lambda s: (s["hydrating_regions"] > 0, s))(clone_status(t))), 5,
             "background copies in flight")
    first = 8   # regions 0..7: the hydrator starts at region 0
    for r in range(first):
        t.unmap("Clone0", r * REGION, REGION)
        st.stamp_clone(300 + r, r * REGION, REGION)
    wait_hydrated(t, timeout=60)
    st.check_clone()
    t.stop()
    st.check_image(st.dst_path.read_bytes(), "the destination file")
    st.check_source_unchanged()


def test_commit_on_fua(commit_stack):
    """A FUA write that hydrates a region completes only after the commit
    recording it; a FUA write to a hydrated region with nothing changed
    commits nothing."""
    st, t = commit_stack, commit_stack.t
    before = md_writes(t)
    t.io("write", "Clone0", 30, 1, stamp=1, fua=True)
    st.expect[30] = 1
    assert md_writes(t) > before, "a FUA write to a cold region returned before any commit"
    settled = md_writes(t)
    t.io("write", "Clone0", 30, 1, stamp=2, fua=True)
    st.expect[30] = 2
    assert md_writes(t) == settled, "a FUA write with nothing changed wrote metadata"
    st.check_clone()


# ---------------------------------------------------------------------------
# copy-on-read and the hydration rate limit


def test_copy_on_read(wl_factory, datadir, mask):
    """Copy-on-read hydrates the regions read ahead of the background cursor
    (router.rs: "queues the cold regions read for hydration ahead of the
    background cursor"); without it, reads leave regions to the cursor."""
    t = wl_factory(mask=mask)
    st = Stack(t, datadir, blocks=256, delay_us=50_000)     # 64 regions, 20 copies/s
    # One region at a time (dm-clone's defaults; the adaptive window would
    # copy all 64 at once), so the cursor is slow enough to be overtaken.
    clone_create(t, region_size_kb=16, copy_on_read=True, hydration_threshold=1,
                 hydration_batch_size=1)
    far = [60, 61, 55]                                     # the cursor starts at 0
    for r in far:
        data = t.read("Clone0", r * REGION, REGION)
        assert [classify(data[i * BS:(i + 1) * BS], r * REGION + i)
                for i in range(REGION)] == [0] * REGION

    def far_copied():
        dst = st.dst_path.read_bytes()
        return all(dst[r * REGION * BS:(r + 1) * REGION * BS] ==
                   st.src_image[r * REGION * BS:(r + 1) * REGION * BS] for r in far), None
    wait_for(far_copied, 1.5, "the regions read to be copied (the cursor needs ~3 s)")
    s = clone_status(t)
    assert s["hydrated_regions"] < 40, "copy-on-read regions came only with the cursor: %s" % s
    t.rpc("bdev_clone_set_hydration", name="Clone0", hydration_threshold=16)
    wait_hydrated(t, timeout=30)
    t.stop()
    assert st.dst_path.read_bytes() == st.src_image


def test_copy_on_read_without_background_hydration(wl_factory, datadir, mask):
    """copy_on_read with no_hydration hydrates exactly the regions read (a cold read is
    answered by the source read that also fills the destination, router.rs "read-triggered
    copies"); they are hydrated in the status, on the destination after a flush, and still
    hydrated after a restart; nothing else is copied."""
    t = wl_factory(mask=mask)
    st = Stack(t, datadir, blocks=256)                     # 64 regions of 16 KiB
    clone_create(t, region_size_kb=16, no_hydration=True, copy_on_read=True)
    # A partial region, three whole regions in one read, the last block; back to back, so
    # some reads find the copy budget spent and their regions are queued instead.
    reads = [(10 * REGION + 1, 2), (20 * REGION, 3 * REGION), (63 * REGION + 3, 1),
             (40 * REGION, 1), (41 * REGION, 1), (42 * REGION + 2, 2)]
    want = [10, 20, 21, 22, 40, 41, 42, 63]
    for off, n in reads:
        data = t.read("Clone0", off, n)
        assert [classify(data[i * BS:(i + 1) * BS], off + i) for i in range(n)] == [0] * n

    def read_ones_hydrated():
        s = clone_status(t)
        return s["hydrated_regions"] == len(want) and s["hydrating_regions"] == 0, s
    wait_for(read_ones_hydrated, 10, "the regions read to be hydrated")
    s = clone_status(t)
    assert (s["hydration_enabled"], s["state"], s["copy_on_read"]) == (False, "paused", True), s
    t.flush("Clone0")
    dst = st.dst_path.read_bytes()
    size = REGION * BS
    copied = [r for r in range(64) if dst[r * size:(r + 1) * size] == st.src_image[r * size:(r + 1) * size]]
    assert copied == want, "regions on the destination: %s" % copied
    t.stop()
    # Restart on the same files: the regions read come back hydrated.
    t = wl_factory(mask=mask)
    t.rpc("bdev_uring_create", **uring(st.src_path, "Src", UUID_SRC))
    t.rpc("bdev_uring_create", **uring(st.dst_path, "Dst", UUID_DST))
    t.rpc("bdev_uring_create", **uring(st.md_path, "Md", UUID_MD))
    clone_create(t, region_size_kb=16, no_hydration=True, copy_on_read=True)
    assert clone_status(t)["hydrated_regions"] == len(want)
    st.t = t
    st.check_clone()        # reads every block: copy-on-read hydrates the rest
    wait_for(lambda: (clone_status(t)["hydrated_regions"] == 64, None), 10, "every region read")


def test_copy_on_read_answers_before_the_destination_write(wl_factory, datadir):
    """A read-triggered copy answers the read as soon as the source data is in: with the
    destination's writes held 2 s (a delay bdev), the read returns the source data while its
    region is still being copied; the region is hydrated once that write is done."""
    t = wl_factory()
    src = make_stamped_file(datadir / "src.img", 256)
    dst = make_zero_file(datadir / "dst.img", 256 * BS)
    md = make_zero_file(datadir / "md.img", 1 << 20)
    t.rpc("bdev_uring_create", **uring(src, "Src", UUID_SRC))
    t.rpc("bdev_uring_create", **uring(dst, "DstFile", UUID_DST))
    t.rpc("bdev_delay_create", base_bdev_name="DstFile", name="Dst", avg_read_latency=0,
          p99_read_latency=0, avg_write_latency=2_000_000, p99_write_latency=2_000_000)
    t.rpc("bdev_uring_create", **uring(md, "Md", UUID_MD))
    clone_create(t, region_size_kb=16, no_hydration=True, copy_on_read=True)
    data = t.read("Clone0", 5 * REGION + 1, 2)
    assert [classify(data[i * BS:(i + 1) * BS], 5 * REGION + 1 + i) for i in range(2)] == [0, 0]
    s = clone_status(t)
    assert (s["hydrated_regions"], s["hydrating_regions"]) == (0, 1), \
        "the read waited for the destination write, or started no copy: %s" % s
    wait_for(lambda: (clone_status(t)["hydrated_regions"] == 1, None), 15, "the copy to land")
    t.flush("Clone0")
    assert dst.read_bytes()[5 * REGION * BS:6 * REGION * BS] == \
        src.read_bytes()[5 * REGION * BS:6 * REGION * BS]


def test_hydration_rate_limit(wl_factory, datadir):
    t = wl_factory()
    Stack(t, datadir, blocks=4096)                  # 16 MiB
    clone_create(t, region_size_kb=64, hydration_threshold=8, hydration_batch_size=4,
                 hydration_mbytes_per_sec=4)
    t0 = time.monotonic()
    time.sleep(1.5)
    s = clone_status(t)
    elapsed = time.monotonic() - t0
    done = s["hydrated_regions"] * 64 * 1024
    limit = 4 * 1024 * 1024 * elapsed
    assert done <= limit + 2 * 1024 * 1024, \
        "%d bytes hydrated in %.1f s at 4 MB/s" % (done, elapsed)
    # Progress, not speed: how close it gets to the limit is a benchmark figure.
    assert done > 0, "nothing hydrated in %.1f s at 4 MB/s" % elapsed
    assert 0 < s["progress"]["bytes_per_sec"] <= 8 * 1024 * 1024, s["progress"]
    t.rpc("bdev_clone_set_hydration", name="Clone0", hydration_mbytes_per_sec=0)
    wait_hydrated(t, timeout=30)
