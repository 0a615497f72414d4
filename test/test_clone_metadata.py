"""The clone's metadata and identity through the real binaries (issue 8):
a lost superblock block loses no write on a restart from the saved
`--json`, damage is refused naming it (never formatted over), two clones
of one source have their own uuid and NGUID, and a released clone restarts
from its saved config with its source gone.

Writes go through `clone_workload` (clone_tgt plus the `workload_io` RPC);
docs/metadata.md is the format's reference.
"""

import json
from pathlib import Path

import pytest
from clone_util import (BS, classify, clone_create, clone_status, make_stamped_file,
                        make_zero_file, uring, wait_clone, wait_for, wait_hydrated,
                        wl_factory)  # noqa: F401

BLOCKS = 1024                 # 4 MiB of 4 KiB blocks
MD_BYTES = 1 << 20
WRITES = [(3, 1), (100, 16), (517, 5), (1000, 24)]


def bdev_config(cfg):
    return [s for s in cfg["subsystems"] if s["subsystem"] == "bdev"][0]["config"]


def make_stack(t, d, md_bs=BS, prefix=""):
    """Src (stamped file), Dst, Md (uring; Md with `md_bs` blocks)."""
    if not (d / "src.img").exists():
        make_stamped_file(d / "src.img", BLOCKS)
    make_zero_file(d / ("%sdst.img" % prefix), BLOCKS * BS)
    make_zero_file(d / ("%smd.img" % prefix), MD_BYTES)
    if "Src" not in t.bdevs():
        t.rpc("bdev_uring_create", **uring(d / "src.img", "Src"))
    t.rpc("bdev_uring_create", **uring(d / ("%sdst.img" % prefix), prefix + "Dst"))
    t.rpc("bdev_uring_create", **uring(d / ("%smd.img" % prefix), prefix + "Md", bs=md_bs))


def write_and_flush(t, clone="Clone0", seq=7):
    for off, n in WRITES:
        t.write_stamps(clone, seq, off, n)
    t.flush(clone)


def check_writes(t, clone="Clone0", seq=7):
    """Every block reads as the write made to it, or as the source."""
    # In pieces: SPDK's client re-parses its whole buffer per socket read.
    data = b"".join(t.read(clone, at, 32) for at in range(0, BLOCKS, 32))
    written = {b for off, n in WRITES for b in range(off, off + n)}
    bad = []
    for b in range(BLOCKS):
        got = classify(data[b * BS:(b + 1) * BS], b)
        want = seq if b in written and seq else 0
        if got != want:
            bad.append("block %d: %r, expected %r" % (b, got, want))
    assert not bad, "%d blocks wrong:\n%s" % (len(bad), "\n".join(bad[:20]))


def zero_md(d, offset, length, name="md.img"):
    with open(d / name, "r+b") as f:
        f.seek(offset)
        f.write(bytes(length))


@pytest.mark.parametrize("md_bs", [512, 4096])
def test_zeroed_superblock_block_restart_from_saved_json(wl_factory, datadir, workdir, md_bs):
    """Defect 1: `dd if=/dev/zero of=md.img bs=4096 count=1 conv=notrunc`
    after a clean shutdown, then `--json`: every write is still there. Both
    superblock blocks zeroed: the create is refused (-22, naming the
    damage), the metadata file is left as it was; `force_format` then
    formats it."""
    t = wl_factory()
    make_stack(t, datadir, md_bs)
    clone_create(t, no_hydration=True)
    uuid = clone_status(t)["uuid"]
    write_and_flush(t)
    cfg = Path(workdir) / "saved.json"
    cfg.write_text(t.cli("save_config").stdout)
    t.stop()

    zero_md(datadir, 0, 4096)
    t = wl_factory("--json", cfg)
    s = wait_clone(t)
    assert s["uuid"] == uuid and s["hydrated_regions"] > 0, s
    check_writes(t)
    t.stop()

    zero_md(datadir, 0, 8192)
    md_before = (datadir / "md.img").read_bytes()
    config = json.loads(cfg.read_text())
    create = [c for c in bdev_config(config) if c["method"] == "bdev_clone_create"][0]
    config_bases = Path(workdir) / "bases.json"
    bdev_config(config).remove(create)
    config_bases.write_text(json.dumps(config))
    t = wl_factory("--json", config_bases)
    code, msg = t.rpc_err("bdev_clone_create", **create["params"])
    assert code == -22, msg
    assert "metadata damaged: superblock slots 0 and 1 unreadable" in msg, msg
    assert "bitmap units hold hydrated regions" in msg, msg
    assert "Clone0" not in t.bdevs()
    assert (datadir / "md.img").read_bytes() == md_before, "a refused create wrote metadata"
    # the operator's way out: force_format (the saved uuid is kept as given)
    t.rpc("bdev_clone_create", **dict(create["params"], force_format=True))
    s = clone_status(t)
    assert s["uuid"] == uuid and s["hydrated_regions"] == 0, s
    check_writes(t, seq=0)
    t.stop()


def test_two_clones_of_one_source_have_their_own_identity(tgt_factory, datadir):
    """Defect 2: two clones of one source, created without `uuid`, get
    different bdev uuids, so one subsystem exports both with different
    NGUIDs and UUIDs; one's metadata under the other is refused naming both
    uuids."""
    t = tgt_factory()
    make_stack(t, datadir)
    make_stack(t, datadir, prefix="B")
    clone_create(t, name="CloneA", no_hydration=True)
    clone_create(t, name="CloneB", dest="BDst", md="BMd", no_hydration=True)
    ua, ub = clone_status(t, "CloneA")["uuid"], clone_status(t, "CloneB")["uuid"]
    assert ua != ub, "two clones of one source share uuid %s" % ua
    assert (t.bdev("CloneA")["uuid"], t.bdev("CloneB")["uuid"]) == (ua, ub)

    nqn = "nqn.2016-06.io.spdk:clones"
    t.rpc("nvmf_create_transport", trtype="TCP")
    t.rpc("nvmf_create_subsystem", nqn=nqn, allow_any_host=True)
    t.rpc("nvmf_subsystem_add_ns", nqn=nqn, namespace={"bdev_name": "CloneA"})
    t.rpc("nvmf_subsystem_add_ns", nqn=nqn, namespace={"bdev_name": "CloneB"})
    sub = [s for s in t.rpc("nvmf_get_subsystems") if s["nqn"] == nqn][0]
    ns = sub["namespaces"]
    assert len(ns) == 2, sub
    assert ns[0]["uuid"] != ns[1]["uuid"], ns
    assert ns[0]["nguid"] != ns[1]["nguid"], ns
    t.rpc("nvmf_delete_subsystem", nqn=nqn)

    t.rpc("bdev_clone_delete", name="CloneA")
    t.rpc("bdev_clone_delete", name="CloneB")
    md_b = (datadir / "Bmd.img").read_bytes()
    code, msg = t.rpc_err("bdev_clone_create", name="CloneA", source_bdev_name="Src",
                          dest_bdev_name="Dst", metadata_bdev_name="BMd", uuid=ua)
    assert code == -22 and ua in msg and ub in msg, msg
    assert (datadir / "Bmd.img").read_bytes() == md_b
    # without a uuid, each clone takes its metadata's
    clone_create(t, name="CloneA", no_hydration=True)
    assert clone_status(t, "CloneA")["uuid"] == ua


def test_released_clone_restarts_without_its_source(wl_factory, datadir, workdir):
    """Defect 3: once `source_released`, the source is deleted and the
    config saved; the replay brings the clone back from the destination and
    the metadata alone (the target does not fail), serving every byte."""
    t = wl_factory()
    make_stack(t, datadir)
    clone_create(t, hydration_threshold=32, hydration_batch_size=8)
    write_and_flush(t)
    wait_hydrated(t)
    wait_for(lambda: ((lambda s: (s["source_released"], s))(clone_status(t))), 10,
             "source_released")
    t.rpc("bdev_uring_delete", name="Src")
    cfg = Path(workdir) / "saved.json"
    cfg.write_text(t.cli("save_config").stdout)
    creates = [c for c in bdev_config(json.loads(cfg.read_text()))
               if c["method"] == "bdev_clone_create"]
    assert creates[0]["params"]["source_bdev_name"] == "Src", creates
    t.stop()
    (datadir / "src.img").unlink()

    t = wl_factory("--json", cfg)
    s = wait_clone(t)
    assert s["state"] == "hydrated" and s["source_released"] is True, s
    assert s["hydrated_regions"] == s["num_regions"], s
    check_writes(t)
    # still a working clone: writes and flushes go on
    t.write_stamps("Clone0", 9, 200, 4)
    t.flush("Clone0")
    assert all(classify(t.read("Clone0", 200, 4)[i * BS:(i + 1) * BS], 200 + i) == 9
               for i in range(4))
    t.stop()
