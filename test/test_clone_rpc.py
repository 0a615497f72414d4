"""The clone bdev's RPCs (rpc-contract.md §2.7) against the real clone_tgt:
every error case leaves nothing behind (no clone registered, bases
unclaimed, metadata bytes unchanged), and the happy paths: status fields,
driver_specific, tunables, state transitions, save_config and resume.
"""

import json
import time
from pathlib import Path

import pytest
from conftest import EEXIST, ENODEV, RawConn, concurrent_rpc
from clone_util import (BS, STATES, STATUS_FIELDS, UUID_CLONE, UUID_DST, UUID_MD, UUID_SRC,
                        claimed, clone_create, clone_status, make_stamped_file, make_zero_file,
                        md_required_bytes, uring, wait_clone, wait_for, wait_hydrated,
                        wait_state)

SRC_BLOCKS = 2048           # 8 MiB of 4 KiB blocks
MD_BYTES = 1 << 20
EBUSY = -16
INVALID_PARAMS = -32602


class Stack:
    """Src (uring, stamped; optionally behind a delay bdev), Dst, Md (uring)."""

    def __init__(self, tgt, datadir, src_blocks=SRC_BLOCKS, md_bytes=MD_BYTES, delay_us=0):
        self.tgt = tgt
        self.src_path = make_stamped_file(datadir / "src.img", src_blocks)
        self.dst_path = make_zero_file(datadir / "dst.img", src_blocks * BS)
        self.md_path = make_zero_file(datadir / "md.img", md_bytes)
        self.methods = []
        if delay_us:
            self._add("bdev_uring_create", uring(self.src_path, "SrcFile", UUID_SRC))
            self._add("bdev_delay_create", {
                "base_bdev_name": "SrcFile", "name": "Src", "avg_read_latency": delay_us,
                "p99_read_latency": delay_us, "avg_write_latency": 0, "p99_write_latency": 0})
        else:
            self._add("bdev_uring_create", uring(self.src_path, "Src", UUID_SRC))
        self._add("bdev_uring_create", uring(self.dst_path, "Dst", UUID_DST))
        self._add("bdev_uring_create", uring(self.md_path, "Md", UUID_MD))

    def _add(self, method, params):
        self.methods.append((method, params))
        self.tgt.rpc(method, **params)

    def md_bytes(self):
        return self.md_path.read_bytes()


@pytest.fixture
def stack(tgt, datadir):
    return Stack(tgt, datadir)


def snapshot(tgt, stack):
    return {"names": set(tgt.bdevs()), "md": stack.md_bytes()}


def assert_nothing_left(tgt, stack, before, bases=("Src", "Dst", "Md")):
    assert set(tgt.bdevs()) == before["names"], "a failed create left bdevs behind"
    assert tgt.rpc("bdev_clone_get_bdevs") == [], "a failed create left a clone behind"
    for b in bases:
        assert tgt.bdev(b)["claimed"] is False, "%s still claimed after a failed create" % b
    assert stack.md_bytes() == before["md"], "a failed create changed the metadata bdev"


def create_err(tgt, **params):
    p = dict(name="Clone0", source_bdev_name="Src", dest_bdev_name="Dst",
             metadata_bdev_name="Md")
    p.update(params)
    p = {k: v for k, v in p.items() if v is not None}
    return tgt.rpc_err("bdev_clone_create", **p)


# ---------------------------------------------------------------------------
# create: errors


@pytest.mark.parametrize("missing", ["source_bdev_name", "dest_bdev_name", "metadata_bdev_name"])
def test_create_missing_bdev(tgt, stack, missing):
    before = snapshot(tgt, stack)
    code, msg = create_err(tgt, **{missing: "NoSuchBdev"})
    assert code == ENODEV[0], msg
    assert_nothing_left(tgt, stack, before)


def test_create_name_exists(tgt, stack):
    tgt.rpc("bdev_malloc_create", name="Taken", num_blocks=16, block_size=512)
    before = snapshot(tgt, stack)
    code, msg = create_err(tgt, name="Taken")
    assert code == EEXIST[0] and "Taken" in msg, msg
    assert_nothing_left(tgt, stack, before)
    # a clone's own name too
    clone_create(tgt, no_hydration=True)
    tgt.rpc("bdev_malloc_create", name="S2", num_blocks=SRC_BLOCKS, block_size=BS)
    tgt.rpc("bdev_malloc_create", name="D2", num_blocks=SRC_BLOCKS, block_size=BS)
    tgt.rpc("bdev_malloc_create", name="M2", num_blocks=256, block_size=BS)
    code, msg = tgt.rpc_err("bdev_clone_create", name="Clone0", source_bdev_name="S2",
                            dest_bdev_name="D2", metadata_bdev_name="M2")
    assert code == EEXIST[0], msg
    for b in ("S2", "D2", "M2"):
        assert claimed(tgt, b) is False
    assert [c["name"] for c in tgt.rpc("bdev_clone_get_bdevs")] == ["Clone0"]


@pytest.mark.parametrize("kb", [0, 2, 6, 12, 1000, 2097152, 4294967295])
def test_create_bad_region_size(tgt, stack, kb):
    before = snapshot(tgt, stack)
    code, msg = create_err(tgt, region_size_kb=kb)
    assert code == -22, msg
    assert "region" in msg.lower(), "the error should name the region size: %r" % msg
    assert_nothing_left(tgt, stack, before)


def test_create_region_not_multiple_of_block_size(tgt, stack):
    # 8 KiB blocks: a 4 KiB region holds half a block.
    tgt.rpc("bdev_malloc_create", name="S8", num_blocks=512, block_size=8192)
    tgt.rpc("bdev_malloc_create", name="D8", num_blocks=512, block_size=8192)
    before = snapshot(tgt, stack)
    code, msg = create_err(tgt, source_bdev_name="S8", dest_bdev_name="D8", region_size_kb=4)
    assert code == -22, msg
    assert_nothing_left(tgt, stack, before, bases=("S8", "D8", "Md"))
    # 8 KiB regions on the same bdevs are fine
    clone_create(tgt, source="S8", dest="D8", region_size_kb=8, no_hydration=True)
    assert clone_status(tgt)["num_regions"] == 512


def test_create_dest_smaller(tgt, stack):
    tgt.rpc("bdev_malloc_create", name="Small", num_blocks=SRC_BLOCKS - 1, block_size=BS)
    before = snapshot(tgt, stack)
    code, msg = create_err(tgt, dest_bdev_name="Small")
    assert code == -22, msg
    assert_nothing_left(tgt, stack, before, bases=("Src", "Small", "Md"))


def test_create_block_sizes_differ(tgt, stack):
    tgt.rpc("bdev_malloc_create", name="D512", num_blocks=SRC_BLOCKS * 8, block_size=512)
    before = snapshot(tgt, stack)
    code, msg = create_err(tgt, dest_bdev_name="D512")
    assert code == -22, msg
    assert_nothing_left(tgt, stack, before, bases=("Src", "D512", "Md"))


def test_create_metadata_too_small(tgt, datadir):
    stack = Stack(tgt, datadir, md_bytes=8192)
    before = snapshot(tgt, stack)
    code, msg = create_err(tgt)
    need = md_required_bytes(SRC_BLOCKS)
    assert code == -22, msg
    assert str(need) in msg, "the error should say %d bytes are needed: %r" % (need, msg)
    assert_nothing_left(tgt, stack, before)


def test_create_metadata_other_geometry(tgt, stack):
    clone_create(tgt, region_size_kb=64, no_hydration=True)
    assert tgt.rpc("bdev_clone_delete", name="Clone0") is True
    formatted = snapshot(tgt, stack)
    assert formatted["md"].count(0) != len(formatted["md"]), "create did not format the metadata"
    code, msg = create_err(tgt, region_size_kb=4, no_hydration=True)
    assert code == -22, msg
    assert "region_size" in msg and "65536" in msg, \
        "the error should say which geometry the metadata has: %r" % msg
    assert_nothing_left(tgt, stack, formatted)
    # the same geometry opens again
    clone_create(tgt, region_size_kb=64, no_hydration=True)


@pytest.mark.parametrize("which", ["Src", "Dst", "Md"])
def test_create_base_already_claimed(tgt, stack, which):
    tgt.rpc("bdev_delay_create", base_bdev_name=which, name="Holder", avg_read_latency=0,
            p99_read_latency=0, avg_write_latency=0, p99_write_latency=0)
    assert claimed(tgt, which)
    before = snapshot(tgt, stack)
    code, msg = create_err(tgt)
    assert code == EBUSY, msg
    assert set(tgt.bdevs()) == before["names"]
    assert tgt.rpc("bdev_clone_get_bdevs") == []
    assert stack.md_bytes() == before["md"]
    for b in {"Src", "Dst", "Md"} - {which}:
        assert claimed(tgt, b) is False, b
    assert tgt.bdev(which)["claimed"] is True, "the other claim must stay"
    tgt.rpc("bdev_delay_delete", name="Holder")
    clone_create(tgt, no_hydration=True)


def test_create_base_used_by_another_clone(tgt, stack):
    clone_create(tgt, no_hydration=True)
    tgt.rpc("bdev_malloc_create", name="S2", num_blocks=SRC_BLOCKS, block_size=BS)
    tgt.rpc("bdev_malloc_create", name="M2", num_blocks=256, block_size=BS)
    code, msg = tgt.rpc_err("bdev_clone_create", name="Clone1", source_bdev_name="S2",
                            dest_bdev_name="Dst", metadata_bdev_name="M2")
    assert code == EBUSY, msg
    assert "Clone1" not in tgt.bdevs()
    assert claimed(tgt, "S2") is False and claimed(tgt, "M2") is False
    assert claimed(tgt, "Dst") is True


@pytest.mark.parametrize("params", [
    {"bogus": 1},
    {"region_size_kb": "4"},
    {"region_size_kb": -4},
    {"region_size_kb": 4.5},
    {"no_hydration": "yes"},
    {"hydration_threshold": -1},
    {"hydration_mbytes_per_sec": "fast"},
    {"copy_on_read": 1},
    {"uuid": "not-a-uuid"},
    {"name": None},
    {"source_bdev_name": None},
    {"name": 7},
], ids=lambda p: json.dumps(p))
def test_create_undecodable_params(tgt, stack, params):
    before = snapshot(tgt, stack)
    code, msg = create_err(tgt, **params)  # a None value drops that key
    assert code == INVALID_PARAMS, (code, msg)
    assert_nothing_left(tgt, stack, before)


def test_create_duplicate_key(tgt, stack):
    before = snapshot(tgt, stack)
    c = RawConn(tgt.sock)
    try:
        reply = c.request('{"jsonrpc":"2.0","id":1,"method":"bdev_clone_create","params":'
                          '{"name":"Clone0","source_bdev_name":"Src","dest_bdev_name":"Dst",'
                          '"metadata_bdev_name":"Md","region_size_kb":4,"region_size_kb":8}}')
    finally:
        c.close()
    assert "error" in reply and reply["error"]["code"] == INVALID_PARAMS, reply
    assert_nothing_left(tgt, stack, before)


def test_params_not_an_object(tgt, stack):
    c = RawConn(tgt.sock)
    try:
        for method in ("bdev_clone_create", "bdev_clone_delete", "bdev_clone_set_hydration"):
            reply = c.request({"jsonrpc": "2.0", "id": 2, "method": method, "params": [1, 2]})
            assert reply["error"]["code"] == INVALID_PARAMS, (method, reply)
    finally:
        c.close()


# ---------------------------------------------------------------------------
# delete / get_bdevs / set_hydration: errors


def test_unknown_names(tgt, stack):
    assert tgt.rpc_err("bdev_clone_delete", name="Nope")[0] == ENODEV[0]
    assert tgt.rpc_err("bdev_clone_get_bdevs", name="Nope")[0] == ENODEV[0]
    assert tgt.rpc_err("bdev_clone_set_hydration", name="Nope", enable=True)[0] == ENODEV[0]
    # a bdev that exists but is not a clone
    assert tgt.rpc_err("bdev_clone_delete", name="Dst")[0] == ENODEV[0]
    assert tgt.rpc_err("bdev_clone_get_bdevs", name="Dst")[0] == ENODEV[0]
    assert "Dst" in tgt.bdevs()
    assert tgt.rpc_err("bdev_clone_delete")[0] == INVALID_PARAMS
    assert tgt.rpc_err("bdev_clone_set_hydration", name="Nope", bogus=1)[0] == INVALID_PARAMS


def test_set_hydration_no_options(tgt, stack):
    clone_create(tgt, no_hydration=True)
    before = clone_status(tgt)
    code, msg = tgt.rpc_err("bdev_clone_set_hydration", name="Clone0")
    assert (code, msg) == (-22, "No options specified")
    after = clone_status(tgt)
    for k in ("hydration_enabled", "hydration_threshold", "hydration_batch_size",
              "hydration_mbytes_per_sec", "state"):
        assert after[k] == before[k], k


# ---------------------------------------------------------------------------
# happy paths


def check_status(s, name="Clone0", num_regions=SRC_BLOCKS):
    missing = [f for f in STATUS_FIELDS if f not in s]
    assert not missing, "status lacks %s: %s" % (missing, json.dumps(s, indent=1))
    assert s["name"] == name
    assert isinstance(s["uuid"], str) and len(s["uuid"]) == 36
    assert s["num_regions"] == num_regions
    assert 0 <= s["hydrated_regions"] <= s["num_regions"]
    assert s["hydrating_regions"] >= 0
    assert s["state"] in STATES, s["state"]
    assert (s["paused_reason"] is None) == (s["state"] != "paused"), s
    assert s["paused_reason"] in (None, "user", "source_errors", "dest_errors"), s
    for k in ("hydration_enabled", "discard_passdown", "copy_on_read", "source_released"):
        assert isinstance(s[k], bool), k
    for k in ("hydration_threshold", "hydration_batch_size", "hydration_mbytes_per_sec"):
        assert isinstance(s[k], int) and s[k] >= 0, k
    p = s["progress"]
    assert set(p) >= {"percent", "bytes_per_sec", "eta_sec"}, p
    assert 0 <= p["percent"] <= 100 and p["bytes_per_sec"] >= 0
    e = s["errors"]
    assert set(e) >= {"source_read", "dest_write", "metadata"}, e
    assert all(v == 0 for v in e.values()), e
    m = s["metadata"]
    assert set(m) >= {"block_size", "used_blocks", "total_blocks", "mode"}, m
    assert m["mode"] in ("rw", "ro", "fail")
    assert 0 < m["used_blocks"] <= m["total_blocks"]


def test_status_fields(tgt, stack):
    assert clone_create(tgt, no_hydration=True) == "Clone0"
    s = clone_status(tgt)
    check_status(s)
    assert (s["source_bdev_name"], s["dest_bdev_name"], s["metadata_bdev_name"]) == \
        ("Src", "Dst", "Md")
    assert s["region_size_kb"] == 4
    assert s["hydrated_regions"] == 0 and s["hydrating_regions"] == 0
    assert s["hydration_enabled"] is False and s["state"] == "paused"
    assert s["discard_passdown"] is True and s["copy_on_read"] is False
    # Defaults: no caps, the adaptive window decides.
    assert (s["hydration_threshold"], s["hydration_batch_size"],
            s["hydration_mbytes_per_sec"]) == (U32_MAX, 65536, 0)
    h = s["hydration"]
    assert set(h) >= {"in_flight_bytes", "user_in_flight_bytes", "peak_in_flight_bytes",
                      "window_bytes", "source_latency_us", "source_mbytes_per_sec"}, h
    assert (h["in_flight_bytes"], h["peak_in_flight_bytes"], h["source_latency_us"]) == \
        (0, 0, None), "nothing measured before any copy"
    assert s["source_released"] is False
    assert s["metadata"]["mode"] == "rw"
    assert s["metadata"]["block_size"] * s["metadata"]["total_blocks"] == MD_BYTES
    assert s["metadata"]["used_blocks"] * s["metadata"]["block_size"] >= \
        md_required_bytes(SRC_BLOCKS)

    b = tgt.bdev("Clone0")
    assert b["block_size"] == BS and b["num_blocks"] == SRC_BLOCKS
    assert b["driver_specific"]["clone"] == clone_status(tgt)
    assert tgt.rpc("bdev_clone_get_bdevs") == [clone_status(tgt)]
    for base in ("Src", "Dst", "Md"):
        assert claimed(tgt, base) is True, base

    assert tgt.rpc("bdev_clone_delete", name="Clone0") is True
    assert "Clone0" not in tgt.bdevs()
    for base in ("Src", "Dst", "Md"):
        assert claimed(tgt, base) is False, base


def test_create_options(tgt, stack):
    clone_create(tgt, region_size_kb=16, no_hydration=True, no_discard_passdown=True,
                 hydration_threshold=8, hydration_batch_size=4, hydration_mbytes_per_sec=100,
                 copy_on_read=True, uuid=UUID_CLONE)
    s = clone_status(tgt)
    check_status(s, num_regions=SRC_BLOCKS // 4)
    assert s["uuid"] == UUID_CLONE
    assert tgt.bdev("Clone0")["uuid"] == UUID_CLONE
    assert (s["region_size_kb"], s["discard_passdown"], s["copy_on_read"]) == (16, False, True)
    assert (s["hydration_threshold"], s["hydration_batch_size"],
            s["hydration_mbytes_per_sec"]) == (8, 4, 100)
    # explicit false is accepted as rpc.py sends it
    tgt.rpc("bdev_clone_delete", name="Clone0")
    clone_create(tgt, region_size_kb=16, no_hydration=False, no_discard_passdown=False,
                 copy_on_read=False, uuid=UUID_CLONE)
    s = clone_status(tgt)
    assert (s["discard_passdown"], s["copy_on_read"], s["hydration_enabled"]) == \
        (True, False, True)
    # the metadata now belongs to UUID_CLONE: another uuid is refused, naming both
    tgt.rpc("bdev_clone_delete", name="Clone0")
    md = stack.md_bytes()
    code, msg = create_err(tgt, region_size_kb=16, uuid=UUID_SRC)
    assert code == -22 and UUID_CLONE in msg and UUID_SRC in msg, msg
    assert stack.md_bytes() == md
    # without a uuid the clone takes the metadata's
    clone_create(tgt, region_size_kb=16, no_hydration=True)
    assert clone_status(tgt)["uuid"] == UUID_CLONE


def test_uuid_default_stable(tgt, stack):
    """Without a uuid, the clone's is random at format time and kept in its
    metadata: the same at each re-create, never the source's."""
    clone_create(tgt, no_hydration=True)
    first = clone_status(tgt)["uuid"]
    assert first != UUID_SRC
    tgt.rpc("bdev_clone_delete", name="Clone0")
    clone_create(tgt, no_hydration=True)
    assert clone_status(tgt)["uuid"] == first


def test_hydration_states_and_tunables(tgt, datadir):
    stack = Stack(tgt, datadir, delay_us=2000)
    clone_create(tgt)
    s = wait_state(tgt, "hydrating", timeout=10)
    check_status(s)
    assert s["hydration_enabled"] is True

    # disable: paused, and the count stops moving
    assert tgt.rpc("bdev_clone_set_hydration", name="Clone0", enable=False) is True
    s = wait_for(lambda: ((lambda s: (s["state"] == "paused" and s["hydrating_regions"] == 0, s))(
        clone_status(tgt))), 10, "paused with nothing in flight")
    assert s["hydration_enabled"] is False
    time.sleep(0.5)
    assert clone_status(tgt)["hydrated_regions"] == s["hydrated_regions"], \
        "regions were hydrated while hydration was disabled"
    assert s["hydrated_regions"] < s["num_regions"]

    # tunables are visible
    assert tgt.rpc("bdev_clone_set_hydration", name="Clone0", hydration_threshold=32,
                   hydration_batch_size=8, hydration_mbytes_per_sec=0) is True
    s = clone_status(tgt)
    assert (s["hydration_threshold"], s["hydration_batch_size"],
            s["hydration_mbytes_per_sec"]) == (32, 8, 0)
    assert s["state"] == "paused", "changing tunables must not re-enable hydration"
    # threshold 0 pauses background copying even when enabled
    tgt.rpc("bdev_clone_set_hydration", name="Clone0", enable=True, hydration_threshold=0)
    time.sleep(0.3)
    before = clone_status(tgt)["hydrated_regions"]
    time.sleep(0.5)
    assert clone_status(tgt)["hydrated_regions"] == before, "threshold 0 still hydrates"

    # enable: hydrating, then hydrated; the source is released
    tgt.rpc("bdev_clone_set_hydration", name="Clone0", enable=True, hydration_threshold=32)
    s = wait_hydrated(tgt, timeout=60)
    check_status(s)
    assert s["progress"]["percent"] == 100
    s = wait_for(lambda: ((lambda s: (s["source_released"], s))(clone_status(tgt))), 10,
                 "source_released")
    assert claimed(tgt, "Src") is False, "the source claim must be dropped once hydrated"
    # a hydrated clone still answers set_hydration
    assert tgt.rpc("bdev_clone_set_hydration", name="Clone0", enable=False) is True
    assert clone_status(tgt)["state"] == "hydrated"


REGION = 64 << 10   # region_size_kb=64


def watch_hydration(tgt, timeout=120):
    """Status objects until hydrated."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        s = clone_status(tgt)
        seen.append(s)
        if s["state"] == "hydrated":
            return seen
        assert s["state"] == "hydrating", s
        assert time.monotonic() < deadline, "not hydrated in %d s: %s" % (timeout, s)
        time.sleep(0.02)


def test_default_window_grows_over_a_delayed_source(tgt, datadir):
    """With default tunables over a 2 ms source the hydrator measures the
    source and keeps more than one chunk in flight (dm-clone's 1 and 1
    kept one region); it says what it measured."""
    Stack(tgt, datadir, src_blocks=8192, delay_us=2000)
    clone_create(tgt, region_size_kb=64)
    seen = watch_hydration(tgt)
    h = [s["hydration"] for s in seen]
    peak = max(x["peak_in_flight_bytes"] for x in h)
    assert peak >= 4 * REGION, "the window never grew: %s" % h[-1]
    assert max(x["in_flight_bytes"] for x in h) > REGION, h[-1]
    assert max(x["window_bytes"] for x in h) >= 4 * REGION, h[-1]
    last = h[-1]
    assert last["source_latency_us"] >= 2000, last
    assert last["source_mbytes_per_sec"] > 0, last
    assert last["in_flight_bytes"] == 0 and last["user_in_flight_bytes"] == 0, last


def test_explicit_threshold_caps_the_window(tgt, datadir):
    """A threshold given is a cap: at most that many regions' bytes in flight
    (one 128 KiB chunk here: never less than a chunk)."""
    Stack(tgt, datadir, src_blocks=4096, delay_us=2000)
    clone_create(tgt, region_size_kb=64, hydration_threshold=2)
    seen = watch_hydration(tgt)
    h = seen[-1]["hydration"]
    assert 0 < h["peak_in_flight_bytes"] <= 2 * REGION, h
    assert h["window_bytes"] <= 2 * REGION, h


def test_save_config_and_resume(tgt_factory, datadir, workdir):
    tgt = tgt_factory()
    stack = Stack(tgt, datadir, delay_us=1000)
    clone_create(tgt, hydration_threshold=4, hydration_batch_size=2)
    wait_for(lambda: ((lambda s: (s["hydrated_regions"] >= 64, s))(clone_status(tgt))), 30,
             "64 regions hydrated")
    tgt.rpc("bdev_clone_set_hydration", name="Clone0", enable=False)
    wait_for(lambda: ((lambda s: (s["hydrating_regions"] == 0, s))(clone_status(tgt))), 10,
             "no region in flight")
    saved = clone_status(tgt)
    assert 0 < saved["hydrated_regions"] < saved["num_regions"]

    cp = tgt.cli("save_config")
    config = json.loads(cp.stdout)
    cfg_path = Path(workdir) / "saved.json"
    cfg_path.write_text(cp.stdout)
    bdev_sub = [s for s in config["subsystems"] if s["subsystem"] == "bdev"][0]
    methods = [c["method"] for c in bdev_sub["config"]]
    assert "bdev_clone_create" in methods, methods
    create = [c for c in bdev_sub["config"] if c["method"] == "bdev_clone_create"][0]["params"]
    for base in ("Src", "Dst", "Md"):
        i = [j for j, c in enumerate(bdev_sub["config"])
             if c.get("params", {}).get("name") == base][0]
        assert i < methods.index("bdev_clone_create"), "the clone must come after %s" % base
    assert create["name"] == "Clone0"
    assert create.get("hydration_threshold") == 4 and create.get("hydration_batch_size") == 2
    tgt.stop()

    # resume from the saved config
    tgt2 = tgt_factory("--json", cfg_path)
    s = wait_clone(tgt2)
    check_status(s)
    assert s["uuid"] == saved["uuid"]
    assert s["hydrated_regions"] >= saved["hydrated_regions"], \
        "resume lost hydrated regions: %d before, %d after" % (saved["hydrated_regions"],
                                                               s["hydrated_regions"])
    assert (s["hydration_threshold"], s["hydration_batch_size"]) == (4, 2)
    if not s["hydration_enabled"]:
        tgt2.rpc("bdev_clone_set_hydration", name="Clone0", enable=True)
    tgt2.rpc("bdev_clone_set_hydration", name="Clone0", hydration_threshold=32,
             hydration_batch_size=8)
    wait_hydrated(tgt2, timeout=60)
    wait_for(lambda: ((lambda s: (s["source_released"], s))(clone_status(tgt2))), 10,
             "source_released")
    tgt2.stop()

    # hydrated stays hydrated across another restart; the data is the source's
    tgt3 = tgt_factory("--json", cfg_path)
    s = wait_clone(tgt3)
    assert s["hydrated_regions"] == s["num_regions"] and s["state"] == "hydrated", s
    tgt3.stop()
    assert stack.dst_path.read_bytes() == stack.src_path.read_bytes()


# ---------------------------------------------------------------------------
# lifecycle: delete while hydrating, base removal


def test_delete_while_hydrating_then_resume(tgt, datadir):
    stack = Stack(tgt, datadir, delay_us=3000)
    clone_create(tgt, hydration_threshold=2)
    wait_for(lambda: ((lambda s: (s["hydrated_regions"] >= 16, s))(clone_status(tgt))), 30,
             "16 regions hydrated")
    assert tgt.rpc("bdev_clone_delete", name="Clone0") is True
    assert "Clone0" not in tgt.bdevs()
    for b in ("Src", "Dst", "Md"):
        assert claimed(tgt, b) is False, b
    # what the delete committed is what a new create finds
    clone_create(tgt, no_hydration=True)
    s = clone_status(tgt)
    assert s["hydrated_regions"] >= 16, "delete lost committed regions: %s" % s
    tgt.rpc("bdev_clone_set_hydration", name="Clone0", enable=True, hydration_threshold=32)
    wait_hydrated(tgt, timeout=60)
    tgt.stop()
    assert stack.dst_path.read_bytes() == stack.src_path.read_bytes()


@pytest.mark.parametrize("base", ["Dst", "Md"])
def test_removing_dest_or_metadata_removes_the_clone(tgt, stack, base):
    clone_create(tgt, no_hydration=True)
    tgt.rpc("bdev_uring_delete", name=base)
    wait_for(lambda: ("Clone0" not in tgt.bdevs(), sorted(tgt.bdevs())), 10,
             "the clone to go with its %s" % base)
    assert tgt.rpc("bdev_clone_get_bdevs") == []
    for b in {"Src", "Dst", "Md"} - {base}:
        assert claimed(tgt, b) is False, b


def test_source_removal_survived_once_hydrated(tgt, datadir):
    stack = Stack(tgt, datadir)
    clone_create(tgt, hydration_threshold=32, hydration_batch_size=8)
    wait_hydrated(tgt, timeout=60)
    wait_for(lambda: ((lambda s: (s["source_released"], s))(clone_status(tgt))), 10,
             "source_released")
    tgt.rpc("bdev_uring_delete", name="Src")
    assert "Clone0" in tgt.bdevs(), "a hydrated clone must survive its source's removal"
    s = clone_status(tgt)
    assert s["state"] == "hydrated" and s["source_released"] is True, s
    tgt.stop()
    assert stack.dst_path.read_bytes() == stack.src_path.read_bytes()


def test_source_removal_while_hydrating(tgt, datadir):
    """The clone cannot serve cold regions without its source: it goes away
    (as a passthru does) and its metadata stays resumable."""
    Stack(tgt, datadir, delay_us=3000)
    clone_create(tgt)
    wait_state(tgt, "hydrating", timeout=10)
    tgt.rpc("bdev_delay_delete", name="Src")
    wait_for(lambda: ("Clone0" not in tgt.bdevs(), sorted(tgt.bdevs())), 10,
             "the clone to go with its source")
    for b in ("Dst", "Md"):
        assert claimed(tgt, b) is False, b
    tgt.rpc("bdev_delay_create", base_bdev_name="SrcFile", name="Src", avg_read_latency=0,
            p99_read_latency=0, avg_write_latency=0, p99_write_latency=0)
    clone_create(tgt, hydration_threshold=32)
    wait_hydrated(tgt, timeout=60)


# ---------------------------------------------------------------------------
# tunables: any accepted value is safe, the others are refused with the range

U32_MAX = (1 << 32) - 1


@pytest.mark.parametrize("param,value,rng", [
    ("hydration_batch_size", 0, "1 to 65536"),
    ("hydration_batch_size", 65537, "1 to 65536"),
    ("hydration_batch_size", U32_MAX, "1 to 65536"),
    ("hydration_mbytes_per_sec", 1048577, "0 (unlimited) to 1048576"),
    ("hydration_mbytes_per_sec", (1 << 64) - 1, "0 (unlimited) to 1048576"),
])
def test_tunable_out_of_range_refused(tgt, stack, param, value, rng):
    before = snapshot(tgt, stack)
    code, msg = create_err(tgt, **{param: value})
    assert code == -22 and param in msg and rng in msg, msg
    assert_nothing_left(tgt, stack, before)
    clone_create(tgt, no_hydration=True)
    s0 = clone_status(tgt)
    code, msg = tgt.rpc_err("bdev_clone_set_hydration", name="Clone0", enable=True,
                            **{param: value})
    assert code == -22 and param in msg and rng in msg, msg
    s1 = clone_status(tgt)
    for k in ("hydration_enabled", "hydration_threshold", "hydration_batch_size",
              "hydration_mbytes_per_sec", "state"):
        assert s1[k] == s0[k], "a refused set_hydration changed %s" % k


def vm_hwm_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM for pid %d" % pid)


@pytest.mark.parametrize("threshold,batch", [(U32_MAX, 1), (U32_MAX, 65536)])
def test_huge_threshold_keeps_the_target_responsive(tgt, datadir, threshold, batch):
    """Issue #8 defect 4: threshold 4294967295 (or 16384) on a 256 MiB clone
    of 4 KiB regions started every copy at once: RPCs timed out for minutes
    and RSS grew by hundreds of MiB. Copies in flight are capped whatever
    the threshold, so RPCs keep answering (within the client's timeout),
    memory stays bounded and hydration completes."""
    blocks = (256 << 20) // BS
    src = make_stamped_file(datadir / "src.img", blocks)
    tgt.rpc("bdev_uring_create", **uring(src, "Src", UUID_SRC))
    tgt.rpc("bdev_uring_create", **uring(make_zero_file(datadir / "dst.img", blocks * BS),
                                         "Dst", UUID_DST))
    tgt.rpc("bdev_uring_create", **uring(make_zero_file(datadir / "md.img", MD_BYTES),
                                         "Md", UUID_MD))
    base = vm_hwm_mib(tgt.pid)
    clone_create(tgt, hydration_threshold=threshold, hydration_batch_size=batch)
    s = clone_status(tgt)
    assert s["hydration_threshold"] == threshold
    while s["state"] != "hydrated":
        # Every call must answer within the client's timeout (RPC_TIMEOUT).
        tgt.rpc("bdev_get_bdevs", name="Dst")
        s = clone_status(tgt)
        assert s["state"] in ("hydrating", "hydrated"), s
        time.sleep(0.05)
    grew = vm_hwm_mib(tgt.pid) - base
    # 64 MiB of copy buffers per owner at most, plus reused buffers.
    assert grew < 160, "RSS grew by %d MiB while hydrating" % grew
    tgt.rpc("bdev_clone_delete", name="Clone0")
    tgt.stop()
    assert (datadir / "dst.img").read_bytes() == src.read_bytes()


# ---------------------------------------------------------------------------
# concurrent deletes: exactly one answers true


def test_concurrent_deletes_of_one_clone(tgt, datadir):
    """Issue #8 defect 7: every concurrent bdev_clone_delete answered true."""
    Stack(tgt, datadir, delay_us=2000)
    clone_create(tgt, hydration_threshold=4)
    wait_state(tgt, "hydrating", timeout=10)
    got = concurrent_rpc(tgt, 4, "bdev_clone_delete", name="Clone0")
    assert sorted(got, key=str) == sorted([(True, None)] + [(None, -19)] * 3, key=str), got
    assert tgt.rpc("bdev_clone_get_bdevs") == []
    assert claimed(tgt, "Src") is False
