"""The clone's user tools against the real clone_tgt: the rpc.py plugin
(scripts/clone_rpc_plugin.py through `spdk-rpc --plugin clone_rpc_plugin`),
`clonectl status` (table, --json, --watch, exit codes) and scripts/demo.sh."""

import json
import os
import subprocess
import time

import pytest

from conftest import ROOT, SMALL, SPDK_RPC, require_binaries
from clone_util import CLONECTL, clonectl

PLUGIN_ENV = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"), NO_COLOR="1")
MB = 1 << 20


def plugin(sock, *args, check=True, timeout=60):
    """spdk-rpc -s SOCK --plugin clone_rpc_plugin ARGS... (the real CLI)."""
    if SPDK_RPC is None:
        pytest.fail("spdk-rpc not found: run bash scripts/test.sh to create .venv", pytrace=False)
    cmd = [str(SPDK_RPC), "-s", str(sock), "--plugin", "clone_rpc_plugin"] + [str(a) for a in args]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=PLUGIN_ENV,
                        stdin=subprocess.DEVNULL)
    if check and cp.returncode != 0:
        raise AssertionError("%s exited %d\nstdout:\n%s\nstderr:\n%s"
                             % (" ".join(cmd), cp.returncode, cp.stdout, cp.stderr))
    return cp


def dry_run(*args):
    """The request the plugin would send, without a target (spdk-rpc --dry-run)."""
    cp = plugin("/nonexistent.sock", "--dry-run", *args, check=False)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith("Request:\n"), cp.stdout
    return json.loads(cp.stdout[len("Request:\n"):])


def make_bases(tgt, mb=8, source_latency_us=None):
    """Malloc source (behind a delay bdev if asked), destination, metadata."""
    tgt.cli("bdev_malloc_create", "-b", "Src0", mb, 4096)
    source = "Src0"
    if source_latency_us:
        tgt.cli("bdev_delay_create", "-b", "Src0", "-d", "Remote0", "-r", source_latency_us,
                "-t", source_latency_us, "-w", source_latency_us, "-n", source_latency_us)
        source = "Remote0"
    tgt.cli("bdev_malloc_create", "-b", "Dst0", mb, 4096)
    tgt.cli("bdev_malloc_create", "-b", "Meta0", 4, 4096)
    return source


def wait_state(tgt, name, states, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        st = tgt.rpc("bdev_clone_get_bdevs", name=name)[0]
        if st["state"] in states:
            return st
        if time.monotonic() > deadline:
            raise AssertionError("%s still %s after %s s: %s" % (name, st["state"], timeout, st))
        time.sleep(0.05)


# --- the plugin: argument handling and the request it sends (no target) ------------

def test_plugin_create_sends_only_given_params():
    req = dry_run("bdev_clone_create", "-b", "Clone0", "-s", "Src0", "-d", "Dst0", "-m", "Meta0")
    assert req["method"] == "bdev_clone_create"
    assert req["params"] == {"name": "Clone0", "source_bdev_name": "Src0",
                             "dest_bdev_name": "Dst0", "metadata_bdev_name": "Meta0"}


def test_plugin_create_every_option():
    req = dry_run("bdev_clone_create", "--name", "C", "--source-bdev-name", "S",
                  "--dest-bdev-name", "D", "--metadata-bdev-name", "M", "-r", "64",
                  "--no-hydration", "--no-discard-passdown", "--hydration-threshold", "0",
                  "--hydration-batch-size", "8", "--hydration-mbytes-per-sec", "100",
                  "--copy-on-read", "-u", "8e1f8a39-6f3c-4b1e-9d7a-3c1f5b2a9e10",
                  "--force-format")
    assert req["params"] == {
        "name": "C", "source_bdev_name": "S", "dest_bdev_name": "D", "metadata_bdev_name": "M",
        "region_size_kb": 64, "no_hydration": True, "no_discard_passdown": True,
        "hydration_threshold": 0, "hydration_batch_size": 8, "hydration_mbytes_per_sec": 100,
        "copy_on_read": True, "uuid": "8e1f8a39-6f3c-4b1e-9d7a-3c1f5b2a9e10",
        "force_format": True}


def test_plugin_other_requests():
    assert dry_run("bdev_clone_delete", "C")["params"] == {"name": "C"}
    assert "params" not in dry_run("bdev_clone_get_bdevs")
    assert dry_run("bdev_clone_get_bdevs", "-b", "C")["params"] == {"name": "C"}
    assert dry_run("bdev_clone_set_hydration", "-b", "C", "--disable")["params"] == \
        {"name": "C", "enable": False}
    assert dry_run("bdev_clone_set_hydration", "-b", "C", "--enable", "--hydration-threshold", "4",
                   "--hydration-batch-size", "2", "--hydration-mbytes-per-sec", "0")["params"] == \
        {"name": "C", "enable": True, "hydration_threshold": 4, "hydration_batch_size": 2,
         "hydration_mbytes_per_sec": 0}
    # Nothing but the name: the target answers "No options specified".
    assert dry_run("bdev_clone_set_hydration", "-b", "C")["params"] == {"name": "C"}


@pytest.mark.parametrize("args, complaint", [
    (["bdev_clone_create", "-b", "C", "-s", "S", "-d", "D"], "-m/--metadata-bdev-name"),
    (["bdev_clone_create", "-b", "C", "-s", "S", "-d", "D", "-m", "M", "-r", "-4"], "must not be negative"),
    (["bdev_clone_create", "-b", "C", "-s", "S", "-d", "D", "-m", "M", "-r", "big"], "invalid integer"),
    (["bdev_clone_set_hydration", "-b", "C", "--enable", "--disable"], "not allowed with"),
    (["bdev_clone_set_hydration", "--enable"], "-b/--name"),
    (["bdev_clone_delete"], "name"),
])
def test_plugin_rejects_bad_arguments(args, complaint):
    cp = plugin("/nonexistent.sock", "--dry-run", *args, check=False)
    assert cp.returncode == 2, (cp.stdout, cp.stderr)
    assert complaint in cp.stderr, cp.stderr
    assert "Request:" not in cp.stdout


# --- the plugin against the real target ---------------------------------------------

def test_plugin_every_command(tgt):
    source = make_bases(tgt)
    cp = plugin(tgt.sock, "bdev_clone_create", "-b", "Clone0", "-s", source, "-d", "Dst0",
                "-m", "Meta0", "-r", "64", "--no-hydration", "--hydration-batch-size", "2")
    assert cp.stdout.strip() == "Clone0", cp.stdout
    b = tgt.bdev("Clone0")
    assert b["num_blocks"] * b["block_size"] == 8 * MB

    got = json.loads(plugin(tgt.sock, "bdev_clone_get_bdevs", "-b", "Clone0").stdout)
    assert len(got) == 1
    st = got[0]
    assert (st["name"], st["source_bdev_name"], st["dest_bdev_name"], st["metadata_bdev_name"]) == \
        ("Clone0", source, "Dst0", "Meta0")
    assert st["region_size_kb"] == 64 and st["num_regions"] == 128
    assert st["hydration_enabled"] is False and st["state"] == "paused", st
    assert st["hydration_batch_size"] == 2
    assert [c["name"] for c in json.loads(plugin(tgt.sock, "bdev_clone_get_bdevs").stdout)] == ["Clone0"]

    plugin(tgt.sock, "bdev_clone_set_hydration", "-b", "Clone0", "--hydration-threshold", "3",
           "--hydration-mbytes-per-sec", "500")
    st = tgt.rpc("bdev_clone_get_bdevs", name="Clone0")[0]
    assert (st["hydration_threshold"], st["hydration_mbytes_per_sec"]) == (3, 500), st
    assert st["hydration_enabled"] is False
    plugin(tgt.sock, "bdev_clone_set_hydration", "-b", "Clone0", "--enable")
    st = wait_state(tgt, "Clone0", ("hydrated",))
    assert st["hydrated_regions"] == 128 and st["progress"]["percent"] == 100
    plugin(tgt.sock, "bdev_clone_set_hydration", "-b", "Clone0", "--disable")
    assert tgt.rpc("bdev_clone_get_bdevs", name="Clone0")[0]["hydration_enabled"] is False

    cp = plugin(tgt.sock, "bdev_clone_delete", "Clone0")
    assert cp.stdout.strip() == ""
    assert json.loads(plugin(tgt.sock, "bdev_clone_get_bdevs").stdout) == []
    assert "Clone0" not in tgt.bdevs()
    # The bases are released: a new clone can claim them again.
    plugin(tgt.sock, "bdev_clone_create", "-b", "Clone1", "-s", source, "-d", "Dst0", "-m", "Meta0",
           "-r", "64")


def rpc_error(cp):
    """(code, message) of the JSON-RPC error spdk-rpc printed (it exits 1)."""
    assert cp.returncode == 1, (cp.stdout, cp.stderr)
    marker = "response:\n"
    assert marker in cp.stdout, cp.stdout
    err = json.loads(cp.stdout[cp.stdout.rindex(marker) + len(marker):])
    return err["code"], err["message"]


def test_plugin_errors_carry_the_rpc_text(tgt):
    source = make_bases(tgt)
    code, msg = rpc_error(plugin(tgt.sock, "bdev_clone_create", "-b", "C", "-s", "Nope", "-d", "Dst0",
                                 "-m", "Meta0", check=False))
    assert code == -19 and "Nope" in msg, msg
    code, msg = rpc_error(plugin(tgt.sock, "bdev_clone_create", "-b", "C", "-s", source, "-d", "Dst0",
                                 "-m", "Meta0", "-r", "3", check=False))
    assert code == -22 and "region_size_kb 3" in msg, msg
    assert "C" not in tgt.bdevs()
    plugin(tgt.sock, "bdev_clone_create", "-b", "C", "-s", source, "-d", "Dst0", "-m", "Meta0",
           "--no-hydration")
    code, msg = rpc_error(plugin(tgt.sock, "bdev_clone_create", "-b", "C", "-s", source, "-d", "Dst0",
                                 "-m", "Meta0", check=False))
    assert code in (-17, -16), (code, msg)
    assert rpc_error(plugin(tgt.sock, "bdev_clone_set_hydration", "-b", "C", check=False)) == \
        (-22, "No options specified")
    for args in (["bdev_clone_delete", "Nope"], ["bdev_clone_get_bdevs", "-b", "Nope"],
                 ["bdev_clone_set_hydration", "-b", "Nope", "--enable"]):
        code, msg = rpc_error(plugin(tgt.sock, *args, check=False))
        assert code == -19 and "Nope" in msg, (args, code, msg)


# --- clonectl ------------------------------------------------------------------------

def test_clonectl_table_and_json(tgt):
    source = make_bases(tgt)
    r = clonectl(tgt.sock, "status")
    assert r.returncode == 0 and r.stdout.strip() == "no clone bdevs", r
    plugin(tgt.sock, "bdev_clone_create", "-b", "Clone0", "-s", source, "-d", "Dst0", "-m", "Meta0",
           "--no-hydration")
    r = clonectl(tgt.sock, "status")
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "REGIONS", "DONE", "MiB/s", "ETA", "SRC-RELEASED",
                                "ERRORS"], r.stdout
    row = lines[1].split()
    assert row[:4] == ["Clone0", "paused", "0/2048", "0.0%"], r.stdout
    assert row[6] == "no" and row[7] == "-", r.stdout
    assert "\x1b" not in r.stdout

    r = clonectl(tgt.sock, "status", "Clone0", "--json")
    assert r.returncode == 0, r
    st = json.loads(r.stdout)
    want = tgt.rpc("bdev_clone_get_bdevs", name="Clone0")
    assert [s["name"] for s in st] == ["Clone0"], st
    assert list(st[0]) == list(want[0]), "clonectl --json must print the status object as is"
    assert (st[0]["state"], st[0]["num_regions"], st[0]["hydrated_regions"]) == ("paused", 2048, 0)

    tgt.rpc("bdev_clone_set_hydration", name="Clone0", enable=True)
    wait_state(tgt, "Clone0", ("hydrated",))
    row = clonectl(tgt.sock, "status", "Clone0").stdout.splitlines()[1].split()
    assert row[:4] == ["Clone0", "hydrated", "2048/2048", "100.0%"], row
    assert row[5] == "-"


def test_clonectl_prints_any_name(tgt):
    """Issue #8 defect 5: a clone name of 65,536 bytes or more made
    `clonectl status` panic (exit 101) for every clone. Any name the target
    accepts prints: long, unicode, control characters escaped."""
    source = make_bases(tgt)
    long_name = "L" * 70000
    odd = "odd\x1b[2J\t\u00fc\U0001F600\\"
    tgt.rpc("bdev_clone_create", name=long_name, source_bdev_name=source, dest_bdev_name="Dst0",
            metadata_bdev_name="Meta0", no_hydration=True)
    for b in ("Src1", "Dst1"):
        tgt.rpc("bdev_malloc_create", name=b, num_blocks=256, block_size=4096)
    tgt.rpc("bdev_malloc_create", name="Meta1", num_blocks=64, block_size=4096)
    tgt.rpc("bdev_clone_create", name=odd, source_bdev_name="Src1", dest_bdev_name="Dst1",
            metadata_bdev_name="Meta1", no_hydration=True)
    shown_odd = "odd\\u{1b}[2J\\t\u00fc\U0001F600\\\\"
    r = clonectl(tgt.sock, "status")
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    lines = r.stdout.splitlines()
    assert lines[1].split()[:2] == [long_name, "paused"], lines[1][-200:]
    assert lines[2].split()[:2] == [shown_odd, "paused"], lines[2]
    assert "\x1b" not in r.stdout and "\t" not in r.stdout
    # the columns line up (padding counts characters) however long the names
    assert lines[0].index("STATE") == lines[1].index("paused") == lines[2].index("paused")
    for name in (long_name, odd):
        r = clonectl(tgt.sock, "status", name, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)[0]["name"] == name


def test_clonectl_clear_errors(tgt, workdir):
    r = clonectl(tgt.sock, "status", "Nope")
    assert r.returncode == 1, r
    err = tgt.rpc_err("bdev_clone_get_bdevs", name="Nope")
    assert err[0] == -19
    assert r.stderr.strip() == "clonectl: bdev_clone_get_bdevs: %s (JSON-RPC error -19)" % err[1], r.stderr
    r = clonectl(workdir / "missing.sock", "status")
    assert r.returncode == 1, r
    assert "cannot connect to %s: No such file or directory" % (workdir / "missing.sock") in r.stderr
    r = clonectl(tgt.sock, "status", "--interval", "0", "--watch")
    assert r.returncode == 2 and "interval" in r.stderr, r


def test_clonectl_watch_ends_when_hydrated(tgt):
    # 8 MiB at 4 KiB regions through a 200 us source at 4 MB/s: about 2 s.
    source = make_bases(tgt, mb=8, source_latency_us=200)
    plugin(tgt.sock, "bdev_clone_create", "-b", "Clone0", "-s", source, "-d", "Dst0", "-m", "Meta0",
           "--no-hydration", "--hydration-mbytes-per-sec", "4")
    require_binaries(CLONECTL)
    watch = subprocess.Popen([str(CLONECTL), "-s", str(tgt.sock), "status", "--watch", "--interval",
                              "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Paused is not done: the watch keeps going until hydration is enabled.
        time.sleep(1.0)
        assert watch.poll() is None, watch.communicate()
        t0 = time.monotonic()
        plugin(tgt.sock, "bdev_clone_set_hydration", "-b", "Clone0", "--enable")
        out, err = watch.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, (out, err)
    assert "\x1b" not in out and "\r" not in out, repr(out[:500])
    progress = [ln for ln in out.splitlines() if ln.startswith("Clone0: ")]
    assert progress[0].startswith("Clone0: paused 0.0% (0/2048 regions)"), out
    assert any(" hydrating " in ln for ln in progress), out
    assert progress[-1].startswith("Clone0: hydrated 100.0% (2048/2048 regions)"), out
    assert took >= 1.0, "8 MiB at 4 MB/s hydrated in %.2f s: the rate limit was ignored" % took
    st = tgt.rpc("bdev_clone_get_bdevs", name="Clone0")[0]
    assert st["state"] == "hydrated"
    # The closing table.
    assert out.splitlines()[-1].split()[:3] == ["Clone0", "hydrated", "2048/2048"], out


def test_clonectl_watch_draws_bars_on_a_terminal(tgt):
    """On a terminal --watch draws progress bars (escape codes), then the table."""
    import pty
    source = make_bases(tgt, mb=8)
    plugin(tgt.sock, "bdev_clone_create", "-b", "Clone0", "-s", source, "-d", "Dst0", "-m", "Meta0",
           "--hydration-mbytes-per-sec", "8")
    require_binaries(CLONECTL)
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(CLONECTL), "-s", str(tgt.sock), "status", "--watch", "--interval",
                             "0.1"], stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        rc = proc.wait(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode(errors="replace")
    assert rc == 0, (text, proc.stderr.read())
    assert "\x1b[" in text, repr(text[:300])
    assert "[" + "=" * 40 + "]" in text, repr(text[-1500:])
    assert "Clone0: " not in text, "plain progress lines on a terminal"
    assert text.replace("\r", "").rstrip().splitlines()[-1].split()[:3] == \
        ["Clone0", "hydrated", "2048/2048"], repr(text[-500:])


def test_clonectl_failed_clone_exits_non_zero(tgt):
    """Metadata on an error bdev; failing its writes makes the clone leave rw."""
    tgt.cli("bdev_malloc_create", "-b", "Src0", 8, 4096)
    tgt.cli("bdev_malloc_create", "-b", "Dst0", 8, 4096)
    tgt.cli("bdev_malloc_create", "-b", "Meta0", 4, 4096)
    tgt.cli("bdev_error_create", "Meta0")
    plugin(tgt.sock, "bdev_clone_create", "-b", "Clone0", "-s", "Src0", "-d", "Dst0",
           "-m", "EE_Meta0", "--no-hydration")
    assert clonectl(tgt.sock, "status").returncode == 0
    tgt.cli("bdev_error_inject_error", "EE_Meta0", "write", "failure", "-n", 1000000)
    tgt.cli("bdev_error_inject_error", "EE_Meta0", "flush", "failure", "-n", 1000000)
    plugin(tgt.sock, "bdev_clone_set_hydration", "-b", "Clone0", "--enable")
    r = clonectl(tgt.sock, "status", "--watch", "--interval", "0.2", timeout=60)
    assert r.returncode == 3, r
    st = tgt.rpc("bdev_clone_get_bdevs", name="Clone0")[0]
    assert st["state"] in ("failed", "read_only") or st["metadata"]["mode"] != "rw", st
    assert st["errors"]["metadata"] > 0, st
    assert "clonectl: Clone0 is " in r.stderr, r.stderr
    r = clonectl(tgt.sock, "status")
    assert r.returncode == 3, r
    assert "meta=" in r.stdout, r.stdout


# --- the demo ------------------------------------------------------------------------

def test_demo_runs_and_checks_the_data():
    size = 16 if SMALL else 64
    env = dict(os.environ, DEMO_SIZE_MB=str(size), DEMO_SECONDS="1", NO_COLOR="1")
    cp = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True, text=True,
                        env=env, timeout=600, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, "demo.sh exited %d\nstdout:\n%s\nstderr:\n%s" \
        % (cp.returncode, cp.stdout[-6000:], cp.stderr[-6000:])
    lines = cp.stdout.strip().splitlines()
    assert lines[-1].startswith("DEMO OK: the destination holds the source plus exactly the writes"), \
        cp.stdout[-3000:]
    assert any(ln.endswith(" 0 wrong") for ln in lines), cp.stdout[-3000:]
    assert "\x1b" not in cp.stdout
