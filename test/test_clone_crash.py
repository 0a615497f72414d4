"""Process kill: `kill -9` the process hosting the clone at a random point
of a write + discard + flush + hydration workload, restart `clone_tgt`
with the same `--json` (resume), sometimes kill that one -9 during
hydration too, let it finish hydrating, shut down cleanly, and check every
block of the destination file against a model rebuilt from the workload's
journal:

* a block written before an acknowledged flush that was submitted after
  the write was acknowledged holds that write or a later-submitted one
  (or zeroes from a later-submitted discard);
* every other block holds the source stamp or the stamp of a write to that
  block, or zeroes if a discard covered it;
* never anything else (garbage fails with the block number and both values).

CLONE_CRASH_SEED=N reproduces a run; CLONE_TGT_TEST_SCALE=small runs fewer
rounds with the same checks.
"""

import os
import random
import signal
import time

import pytest
from conftest import write_bdev_config
from clone_util import stamp as stamps_of  # noqa: E402
from clone_util import (BS, UUID_CLONE, UUID_DST, UUID_MD, UUID_SRC, classify, describe,
                        make_stamped_file, make_zero_file, scale, uring, wait_clone, wait_for,
                        wait_hydrated, wl_factory)  # noqa: F401

BLOCKS = 4097            # 16 MiB + a block: the last region is partial
REGION_KB = 8
REGION_BLOCKS = REGION_KB * 1024 // BS
SRC_DELAY_US = 4000      # slow source: hydration takes ~2 s at threshold 1
ROUNDS = scale(3, 10)
BASE_SEED = int(os.environ.get("CLONE_CRASH_SEED", "20261121"))


class Journal:
    """What the workload submitted and what was acknowledged, in order."""

    def __init__(self, text):
        self.ops = {}        # seq -> dict(op, off, n, sub=line index, ack=line index|None)
        self.bad_reads = []
        self.failed = []
        lines = text.split("\n")
        if lines and lines[-1] != "":
            lines = lines[:-1]   # an unfinished line (cannot happen with write(2), but be safe)
        for i, line in enumerate(lines):
            f = line.split()
            if not f:
                continue
            if f[0] == "S":
                self.ops[int(f[1])] = dict(op=f[2], off=int(f[3]), n=int(f[4]), sub=i, ack=None,
                                           ok=False)
            elif f[0] == "A":
                self.ops[int(f[1])]["ack"] = i
                self.ops[int(f[1])]["ok"] = f[2] == "ok"
                if f[2] != "ok":
                    self.failed.append(line)
            elif f[0] == "X":
                self.bad_reads.append(line)

    def allowed(self, blocks):
        """Per block: (journal line after which a completion must come to
        still count, may it be the source, may it be zeroes, {write seq:
        its ack line or None}).

        Writes in flight together complete in any order, so "a later write"
        means one not acknowledged before the durable write was submitted:
        a write W' is superseded by a durable write W when W' was
        acknowledged before W was submitted."""
        writes = {b: {} for b in range(blocks)}
        discards = {b: [] for b in range(blocks)}
        for seq, o in self.ops.items():
            if o["op"] == "W":
                for b in range(o["off"], o["off"] + o["n"]):
                    writes[b][seq] = o["ack"]
            elif o["op"] == "D":
                for b in range(o["off"], o["off"] + o["n"]):
                    discards[b].append(o["ack"])
        # the last acknowledged flush's submission line
        flush_subs = [o["sub"] for o in self.ops.values() if o["op"] == "F" and o["ok"]]
        last_flush = max(flush_subs) if flush_subs else -1
        # per block: submission line of the newest-submitted durable write
        durable_sub = [-1] * blocks
        for o in self.ops.values():
            if o["op"] == "W" and o["ok"] and o["ack"] < last_flush:
                for b in range(o["off"], o["off"] + o["n"]):
                    durable_sub[b] = max(durable_sub[b], o["sub"])
        out = []
        for b in range(blocks):
            ds = durable_sub[b]
            may_zero = any(a is None or a > ds for a in discards[b])
            out.append((ds, ds < 0, may_zero, writes[b]))
        return out

    def live(self, ack, durable_sub):
        return ack is None or ack > durable_sub


def check_destination(path, journal, seed):
    data = path.read_bytes()
    assert len(data) >= BLOCKS * BS
    allowed = journal.allowed(BLOCKS)
    bad = []
    for b in range(BLOCKS):
        blk = data[b * BS:(b + 1) * BS]
        got = classify(blk, b)
        dsub, may_src, may_zero, wseqs = allowed[b]
        if got == "zero":
            ok = may_zero
        elif got == 0:
            ok = may_src
        elif got is None:
            ok = False
        else:
            ok = got in wseqs and journal.live(wseqs[got], dsub)
        if not ok:
            exp = []
            if may_src:
                exp.append("the source stamp")
            live = sorted(q for q, a in wseqs.items() if journal.live(a, dsub))
            exp.append("a write among %s (not superseded by a flushed write submitted "
                       "at journal line %d)" % (live[-8:], dsub))
            if may_zero:
                exp.append("zeroes")
            bad.append("block %d: found %s; expected %s" % (b, describe(blk, b), " or ".join(exp)))
    assert not bad, "%s: %d bad blocks in the destination:\n%s" % (
        seed, len(bad), "\n".join(bad[:30]))


def clone_config(path, d, region_kb=REGION_KB, **opts):
    create = {"name": "Clone0", "source_bdev_name": "Src", "dest_bdev_name": "Dst",
              "metadata_bdev_name": "Md", "region_size_kb": region_kb, "uuid": UUID_CLONE,
              "hydration_threshold": 1, "hydration_batch_size": 1}
    create.update(opts)
    return write_bdev_config(path, [
        ("bdev_uring_create", uring(d / "src.img", "SrcFile", UUID_SRC)),
        ("bdev_delay_create", {"base_bdev_name": "SrcFile", "name": "Src",
                               "avg_read_latency": SRC_DELAY_US,
                               "p99_read_latency": SRC_DELAY_US,
                               "avg_write_latency": 0, "p99_write_latency": 0}),
        ("bdev_uring_create", uring(d / "dst.img", "Dst", UUID_DST)),
        ("bdev_uring_create", uring(d / "md.img", "Md", UUID_MD)),
        ("bdev_clone_create", create),
    ])


def kill9(t):
    os.kill(t.pid, signal.SIGKILL)
    t.proc.wait(timeout=10)


@pytest.mark.parametrize("rnd", range(ROUNDS))
def test_kill9_workload_then_resume(wl_factory, datadir, rnd):
    seed = BASE_SEED + rnd
    rng = random.Random(seed)
    d = datadir
    src = make_stamped_file(d / "src.img", BLOCKS)
    src_image = src.read_bytes()
    make_zero_file(d / "dst.img", BLOCKS * BS)
    make_zero_file(d / "md.img", 1 << 20)
    # each round its own geometry and options
    region_kb = rng.choice([4, 8, 16])
    opts = {"no_discard_passdown": rng.random() < 0.3, "copy_on_read": rng.random() < 0.3,
            "hydration_threshold": rng.choice([1, 2]),
            "hydration_batch_size": rng.choice([1, 1, 4])}
    cfg = clone_config(d / "clone.json", d, region_kb, **opts)
    journal_path = d / "journal.txt"
    mask = rng.choice(["0x1", "0x3"])
    what = "seed %d, -m %s, region %d KiB, %s" % (seed, mask, region_kb, opts)

    # 1. the workload, hosting the clone, killed -9 at a random time; in
    # some rounds set_hydration is toggled meanwhile through its RPC server
    toggle = rng.random() < 0.4
    what += ", set_hydration toggled" if toggle else ""
    wl = wl_factory("--json", cfg, "--bdev", "Clone0", "--journal", journal_path,
                    "--seed", seed, "--region-blocks", region_kb * 1024 // BS,
                    "--queue-depth", rng.choice([1, 4, 8]),
                    "--think-us", rng.choice([300, 1000, 3000]), rpc_server=toggle,
                    wait=toggle, mask=mask)
    wait_for(lambda: (journal_path.exists() and journal_path.stat().st_size > 0, None), 15,
             "the workload to start (journal %s)" % journal_path)
    deadline = time.monotonic() + rng.uniform(0.05, scale(1.0, 2.0))
    while toggle and time.monotonic() < deadline:
        opt = rng.choice([{"enable": False}, {"enable": True}, {"enable": True},
                          {"hydration_threshold": rng.randrange(0, 5)},
                          {"hydration_batch_size": rng.randrange(1, 5)}])
        assert wl.rpc("bdev_clone_set_hydration", name="Clone0", **opt) is True
        time.sleep(rng.uniform(0.01, 0.15))
    time.sleep(max(0.0, deadline - time.monotonic()))
    assert wl.running(), "the workload exited by itself (%s):\n%s" % (wl.proc.poll(), wl.log())
    kill9(wl)
    journal = Journal(journal_path.read_text())
    assert not journal.bad_reads, "%s: the workload read bad data:\n%s" % (
        what, "\n".join(journal.bad_reads[:20]))
    assert not journal.failed, "%s: I/O failed:\n%s" % (what, "\n".join(journal.failed[:20]))
    assert len(journal.ops) > 0, "the workload did nothing before the kill:\n" + wl.log()

    # 2. resume in clone_tgt; sometimes kill that too while it hydrates
    tgt = wl_factory("--json", cfg, tgt=True, mask=mask)
    s = wait_clone(tgt)
    print("%s: %d ops journaled; resumed with %d/%d regions hydrated"
          % (what, len(journal.ops), s["hydrated_regions"], s["num_regions"]))
    assert s["state"] in ("hydrating", "hydrated"), s
    assert s["metadata"]["mode"] == "rw", s
    if rng.random() < 0.5:
        time.sleep(rng.uniform(0.05, 0.8))
        kill9(tgt)
        tgt = wl_factory("--json", cfg, tgt=True, mask=mask)
        wait_clone(tgt)
    tgt.rpc("bdev_clone_set_hydration", name="Clone0", enable=True, hydration_threshold=32,
            hydration_batch_size=4)
    s = wait_hydrated(tgt, timeout=90)
    assert all(v == 0 for v in s["errors"].values()), s
    tgt.stop()

    # 3. the model
    check_destination(d / "dst.img", journal, what)
    assert src.read_bytes() == src_image, "%s: a write reached the source" % what


def test_model_check_catches_bad_blocks(wl_factory, datadir):
    """The checker itself, on a plain uring bdev (no clone): a killed
    workload's file passes; a lost durable write and a flipped bit fail."""
    d = datadir
    make_stamped_file(d / "u.img", BLOCKS)
    cfg = write_bdev_config(d / "u.json", [("bdev_uring_create", uring(d / "u.img", "U"))])
    journal_path = d / "journal.txt"
    wl = wl_factory("--json", cfg, "--bdev", "U", "--journal", journal_path, "--seed", 7,
                    "--region-blocks", REGION_BLOCKS, rpc_server=False, wait=False)
    wait_for(lambda: (journal_path.exists() and journal_path.stat().st_size > 0, None), 15,
             "the workload to start")
    time.sleep(0.5)
    kill9(wl)
    journal = Journal(journal_path.read_text())
    assert not journal.bad_reads and not journal.failed
    check_destination(d / "u.img", journal, 7)

    allowed = journal.allowed(BLOCKS)
    durable = [b for b, a in enumerate(allowed) if a[0] >= 0]
    assert durable, "the workload made no write durable in 0.5 s"
    data = bytearray((d / "u.img").read_bytes())
    b = durable[0]
    data[b * BS:(b + 1) * BS] = stamps_of(0, b)
    (d / "bad.img").write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="block %d: found the source stamp" % b):
        check_destination(d / "bad.img", journal, 7)
    data = bytearray((d / "u.img").read_bytes())
    data[3 * BS + 100] ^= 1
    (d / "bad.img").write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="block 3: found garbage"):
        check_destination(d / "bad.img", journal, 7)


def test_kill9_during_create_and_format(wl_factory, datadir):
    """kill -9 within the first milliseconds, while the --json config
    creates the clone and formats its blank metadata: the restart must come
    up (formatting again or resuming), never refuse its own metadata."""
    d = datadir
    rng = random.Random(BASE_SEED)
    src = make_stamped_file(d / "src.img", BLOCKS)
    make_zero_file(d / "dst.img", BLOCKS * BS)
    cfg = clone_config(d / "clone.json", d, 4)
    outcomes = []
    for i in range(scale(6, 20)):
        make_zero_file(d / "md.img", 1 << 20)          # blank again
        mask = rng.choice(["0x1", "0x3"])
        t = wl_factory("--json", cfg, tgt=True, wait=False, mask=mask)
        time.sleep(rng.uniform(0.0, 0.02))
        kill9(t)
        md = (d / "md.img").read_bytes()
        outcomes.append("blank" if md[:8192].count(0) == 8192 else "formatted")
        t = wl_factory("--json", cfg, tgt=True, mask=mask)
        s = wait_clone(t)
        assert s["metadata"]["mode"] == "rw", (outcomes, s)
        kill9(t)
    print("metadata after each early kill: %s" % outcomes)
    restart_and_hydrate(wl_factory, cfg, batch=8)
    assert (d / "dst.img").read_bytes() == src.read_bytes(), outcomes


def restart_and_hydrate(wl_factory, cfg, batch):
    """Restart from the saved config `cfg`, hydrate the clone to the end
    (faster than its own settings) and stop cleanly."""
    t = wl_factory("--json", cfg, tgt=True)
    wait_clone(t)
    t.rpc("bdev_clone_set_hydration", name="Clone0", hydration_threshold=32,
          hydration_batch_size=batch)
    wait_hydrated(t, timeout=90)
    t.stop()


@pytest.mark.parametrize("how", ["delete", "SIGTERM"])
def test_clean_stop_keeps_every_acknowledged_write(wl_factory, datadir, how):
    """bdev_clone_delete under a running workload, or a clean shutdown,
    commits: every write acknowledged before it is durable, as if a flush
    had followed; then a restart resumes and hydrates."""
    d = datadir
    seed = BASE_SEED + 1000
    src = make_stamped_file(d / "src.img", BLOCKS)
    src_image = src.read_bytes()
    make_zero_file(d / "dst.img", BLOCKS * BS)
    make_zero_file(d / "md.img", 1 << 20)
    cfg = clone_config(d / "clone.json", d, 8)
    journal_path = d / "journal.txt"
    wl = wl_factory("--json", cfg, "--bdev", "Clone0", "--journal", journal_path, "--seed", seed,
                    "--region-blocks", 2, "--queue-depth", 4, "--think-us", 1000)
    wait_for(lambda: (journal_path.exists() and journal_path.stat().st_size > 0, None), 15,
             "the workload to start")
    time.sleep(0.8)
    if how == "delete":
        assert wl.rpc("bdev_clone_delete", name="Clone0") is True
        rc = wl.wait_exit(20)     # the workers stop on the remove event; the app ends
    else:
        wl.proc.send_signal(signal.SIGTERM)
        rc = wl.wait_exit(20)
    assert rc == 0, "the workload ended with %s:\n%s" % (rc, wl.log()[-3000:])
    text = journal_path.read_text()
    journal = Journal(text + "S 999999999 F 0 0\nA 999999999 ok\n")   # the clean stop
    assert not journal.bad_reads
    # I/O in flight when the delete began may fail; with a clean shutdown none does
    assert how == "delete" or not journal.failed, journal.failed
    acked = sum(1 for o in journal.ops.values() if o["op"] == "W" and o["ack"] is not None)
    assert acked > 0

    restart_and_hydrate(wl_factory, cfg, batch=4)
    check_destination(d / "dst.img", journal, "clean %s, seed %d" % (how, seed))
    assert src.read_bytes() == src_image
