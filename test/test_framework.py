"""Framework RPCs, init states, shutdown and the socket lock (rpc-contract.md §1.1, §1.4, §1.6, §2.1)."""

import grp
import json
import os
import re
import signal
import stat
import time

import pytest

from conftest import MSG_RUNTIME_ONLY, MSG_STARTUP_ONLY, RawConn

ALL_METHODS = [
    "spdk_get_version", "rpc_get_methods", "framework_wait_init", "framework_start_init",
    "framework_get_subsystems", "framework_get_config", "spdk_kill_instance",
    "bdev_get_bdevs", "bdev_get_iostat", "bdev_reset_iostat", "bdev_wait_for_examine",
    "bdev_examine", "bdev_set_qos_limit", "bdev_set_options",
    "bdev_malloc_create", "bdev_malloc_delete",
    "bdev_null_create", "bdev_null_delete",
    "bdev_uring_create", "bdev_uring_delete", "bdev_uring_rescan",
    "bdev_aio_create", "bdev_aio_delete", "bdev_aio_rescan",
    "bdev_delay_create", "bdev_delay_delete", "bdev_delay_update_latency",
    "bdev_error_create", "bdev_error_delete", "bdev_error_inject_error",
]
STARTUP_ONLY = ["framework_start_init", "bdev_set_options"]
BOTH_STATES = ["rpc_get_methods", "spdk_get_version", "framework_wait_init"]
RUNTIME_ONLY = [m for m in ALL_METHODS if m not in STARTUP_ONLY + BOTH_STATES]


# --- spdk_get_version ---------------------------------------------------------

def test_get_version_shape(tgt):
    v = tgt.rpc("spdk_get_version")
    assert isinstance(v, dict)
    assert isinstance(v["version"], str) and v["version"].startswith("SPDK v26.09"), v
    f = v["fields"]
    assert f["major"] == 26 and f["minor"] == 9, f
    assert isinstance(f["patch"], int) and f["patch"] >= 0
    assert isinstance(f["suffix"], str)
    # "SPDK v" MAJOR "." 2-digit MINOR ["." PATCH] SUFFIX [" git sha1 " SHA]
    assert re.fullmatch(r"SPDK v26\.09(\.\d+)?%s( git sha1 [0-9a-f]+)?" % re.escape(f["suffix"]),
                        v["version"]), v["version"]


def test_get_version_rejects_params(tgt):
    code, msg = tgt.rpc_err("spdk_get_version", verbose=True)
    assert code == -32602, (code, msg)
    assert msg == "spdk_get_version method requires no parameters"


# --- rpc_get_methods ----------------------------------------------------------

def test_rpc_get_methods_lists_everything(tgt):
    methods = tgt.rpc("rpc_get_methods")
    assert isinstance(methods, list) and all(isinstance(m, str) for m in methods)
    assert len(methods) == len(set(methods)), "duplicates in %r" % methods
    missing = [m for m in ALL_METHODS if m not in methods]
    assert not missing, "rpc_get_methods lacks %s" % missing


def test_rpc_get_methods_current_in_runtime(tgt):
    current = tgt.rpc("rpc_get_methods", current=True)
    for m in STARTUP_ONLY:
        assert m not in current, "%s is STARTUP-only but listed as callable in RUNTIME" % m
    for m in RUNTIME_ONLY + BOTH_STATES:
        assert m in current, "%s missing from current=True in RUNTIME" % m
    # Explicit false (what rpc.py sends for unset flags) means "all methods".
    everything = tgt.rpc("rpc_get_methods", current=False, include_aliases=False)
    assert set(ALL_METHODS) <= set(everything)


def test_rpc_get_methods_current_in_startup(tgt_factory):
    t = tgt_factory("--wait-for-rpc")
    current = t.rpc("rpc_get_methods", current=True)
    for m in STARTUP_ONLY + BOTH_STATES:
        assert m in current, "%s missing from current=True in STARTUP" % m
    for m in ["bdev_malloc_create", "bdev_get_bdevs", "framework_get_config", "spdk_kill_instance"]:
        assert m not in current, "%s is RUNTIME-only but listed in STARTUP" % m


def test_unknown_method(tgt):
    assert tgt.rpc_err("no_such_method") == (-32601, "Method not found")
    assert tgt.rpc_err("bdev_malloc_create_x", name="a") == (-32601, "Method not found")
    # the connection is still good
    assert tgt.rpc("spdk_get_version")["fields"]["major"] == 26


# --- init states --------------------------------------------------------------

def test_startup_only_methods_in_runtime(tgt):
    assert tgt.rpc_err("framework_start_init") == (-1, MSG_RUNTIME_ONLY)
    assert tgt.rpc_err("bdev_set_options", bdev_io_pool_size=1024) == (-1, MSG_RUNTIME_ONLY)


def test_wait_for_rpc_flow(tgt_factory):
    t = tgt_factory("--wait-for-rpc")

    # RUNTIME methods are refused in STARTUP, with SPDK's text, and change nothing.
    assert t.rpc_err("bdev_malloc_create", name="M0", num_blocks=64, block_size=512) == \
        (-1, MSG_STARTUP_ONLY)
    assert t.rpc_err("bdev_get_bdevs") == (-1, MSG_STARTUP_ONLY)
    assert t.rpc_err("framework_start_init", bogus=1) == \
        (-32602, "framework_start_init requires no parameters")

    # STARTUP-only option setting works now.
    assert t.rpc("bdev_set_options", bdev_io_pool_size=32767, bdev_io_cache_size=128) is True

    # framework_wait_init is deferred until the framework is initialised.
    waiter = RawConn(t.sock)
    try:
        waiter.send({"jsonrpc": "2.0", "method": "framework_wait_init", "id": 41})
        assert waiter.silent_for(0.5), "framework_wait_init replied before framework_start_init: %r" \
            % waiter.text

        assert t.rpc("framework_start_init") is True
        reply = waiter.recv(timeout=10)
        assert reply == {"jsonrpc": "2.0", "id": 41, "result": True}, reply
    finally:
        waiter.close()

    # Now in RUNTIME: creation works, STARTUP-only methods are refused.
    assert t.rpc("framework_wait_init") is True
    assert t.rpc("bdev_malloc_create", name="M0", num_blocks=64, block_size=512) == "M0"
    assert t.bdev("M0")["num_blocks"] == 64
    assert t.rpc_err("framework_start_init") == (-1, MSG_RUNTIME_ONLY)
    assert t.rpc_err("bdev_set_options", bdev_io_pool_size=1024) == (-1, MSG_RUNTIME_ONLY)

    # The options set in STARTUP are what save_config would replay.
    cfg = t.rpc("framework_get_config", name="bdev")
    assert cfg[0]["method"] == "bdev_set_options"
    assert cfg[0]["params"]["bdev_io_pool_size"] == 32767
    assert cfg[0]["params"]["bdev_io_cache_size"] == 128
    t.stop()


def test_sigterm_in_startup_state(tgt_factory):
    t = tgt_factory("--wait-for-rpc")
    assert t.rpc("spdk_get_version")["fields"]["major"] == 26
    t.stop("SIGTERM")


# --- framework_get_subsystems / framework_get_config ----------------------------

def test_framework_get_subsystems(tgt):
    subs = tgt.rpc("framework_get_subsystems")
    assert isinstance(subs, list)
    bdev = [s for s in subs if s.get("subsystem") == "bdev"]
    assert len(bdev) == 1, subs
    assert isinstance(bdev[0]["depends_on"], list)
    names = [s["subsystem"] for s in subs]
    # Dependencies come before the subsystems that need them (init order).
    for i, s in enumerate(subs):
        for dep in s["depends_on"]:
            assert dep in names[:i], "%s depends on %s, which is not listed before it" % (s, dep)


def test_framework_get_config_bdev(tgt):
    empty = tgt.rpc("framework_get_config", name="bdev")
    assert isinstance(empty, list)
    assert empty[0]["method"] == "bdev_set_options"
    assert empty[-1] == {"method": "bdev_wait_for_examine"} or \
        (empty[-1]["method"] == "bdev_wait_for_examine" and not empty[-1].get("params"))
    opts = empty[0]["params"]
    for key in ("bdev_io_pool_size", "bdev_io_cache_size", "bdev_auto_examine"):
        assert key in opts, opts

    tgt.rpc("bdev_malloc_create", name="Malloc0", num_blocks=128, block_size=512)
    tgt.rpc("bdev_null_create", name="Null0", num_blocks=128, block_size=4096)
    cfg = tgt.rpc("framework_get_config", name="bdev", with_batches=False)
    methods = [e["method"] for e in cfg]
    assert methods[0] == "bdev_set_options" and methods[-1] == "bdev_wait_for_examine", methods
    creates = [e for e in cfg if e["method"] in ("bdev_malloc_create", "bdev_null_create")]
    # registration order
    assert [e["params"]["name"] for e in creates] == ["Malloc0", "Null0"], creates


def test_framework_get_config_unknown_subsystem(tgt):
    assert tgt.rpc_err("framework_get_config", name="x") == (-32602, "Subsystem 'x' not found")


# --- shutdown -------------------------------------------------------------------

def test_kill_instance_sigterm(tgt):
    tgt.rpc("bdev_malloc_create", name="Malloc0", num_blocks=256, block_size=512)
    tgt.rpc("bdev_delay_create", name="Delay0", base_bdev_name="Malloc0", avg_read_latency=10,
            p99_read_latency=10, avg_write_latency=10, p99_write_latency=10)
    tgt.stop("rpc")


def test_kill_instance_sigint(tgt):
    tgt.stop("rpc-SIGINT")


def test_os_sigint(tgt):
    tgt.rpc("bdev_malloc_create", name="Malloc0", num_blocks=256, block_size=512)
    tgt.stop("SIGINT")


def test_os_sigterm(tgt):
    tgt.stop("SIGTERM")


def test_kill_instance_bad_signal_name(tgt):
    code, msg = tgt.rpc_err("spdk_kill_instance", sig_name="SIGBOGUS")
    assert code in (-32602, -32603), (code, msg)
    assert tgt.running()
    assert tgt.rpc("spdk_get_version")["fields"]["major"] == 26


def test_second_target_on_same_socket_fails(tgt, tgt_factory):
    second = tgt_factory(sock=tgt.sock, name="second", wait=False)
    rc = second.wait_exit(timeout=10)
    assert rc != 0, "a second clone_tgt on %s started:\n%s" % (tgt.sock, second.log())
    assert "in use" in second.log(), second.log()
    # The first one keeps its socket and lock and still answers.
    assert tgt.sock.exists() and tgt.lock.exists()
    assert tgt.rpc("spdk_get_version")["fields"]["major"] == 26
    tgt.stop()


def test_stale_socket_file_is_replaced(workdir, tgt_factory):
    # A socket file left by a crashed target (no lock held) does not block a new one.
    stale = workdir / "spdk.sock"
    import socket as _socket
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    assert stale.exists()
    t = tgt_factory(sock=stale)
    assert t.rpc("spdk_get_version")["fields"]["major"] == 26
    t.stop()


# --- the real CLI -----------------------------------------------------------------

def test_cli_get_version(tgt):
    cp = tgt.cli("spdk_get_version")
    v = json.loads(cp.stdout)
    assert v["version"].startswith("SPDK v26.09")
    assert v["fields"]["major"] == 26 and v["fields"]["minor"] == 9


def test_cli_rpc_get_methods(tgt):
    methods = json.loads(tgt.cli("rpc_get_methods").stdout)
    assert set(ALL_METHODS) <= set(methods)
    current = json.loads(tgt.cli("rpc_get_methods", "--current").stdout)
    assert "framework_start_init" not in current and "bdev_malloc_create" in current


def test_cli_error_exit_code(tgt):
    cp = tgt.cli("bdev_get_bdevs", "-b", "nope", check=False)
    assert cp.returncode == 1
    out = cp.stdout + cp.stderr
    assert "No such device" in out and "-19" in out, out


def test_cli_script_mode_one_connection(tgt):
    # No subcommand, stdin not a tty: one command per line on one connection.
    script = "# comment\nbdev_malloc_create -b M1 1 512\nbdev_get_bdevs -b M1\n"
    cp = tgt.cli(input=script)
    assert "M1" in cp.stdout
    assert tgt.bdev("M1")["num_blocks"] == 2048


def test_cli_kill_instance(tgt):
    tgt.cli("spdk_kill_instance", "SIGTERM")
    assert tgt.wait_exit() == 0, tgt.log()
    assert not tgt.sock.exists() and not tgt.lock.exists()


def test_no_rpc_server(tgt_factory):
    t = tgt_factory("--no-rpc-server", rpc_server=False, wait=False)
    time.sleep(0.5)
    assert t.running(), "clone_tgt --no-rpc-server exited:\n%s" % t.log()
    os.kill(t.pid, signal.SIGTERM)
    assert t.wait_exit() == 0, t.log()


def test_socket_in_missing_directory(tgt_factory, workdir):
    t = tgt_factory(sock=workdir / "no" / "such" / "dir" / "spdk.sock", wait=False)
    assert t.wait_exit(timeout=10) != 0, t.log()


# --- the socket's access --------------------------------------------------------

def start_under_umask(tgt_factory, mask, *args, name="tgt"):
    old = os.umask(mask)
    try:
        return tgt_factory(*args, name=name)
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_rpc_socket_is_owner_only_whatever_the_umask(tgt_factory, mask):
    """Issue #8 defect 6: the socket's mode followed the umask (0777 under
    umask 000: any local user could drive the target)."""
    t = start_under_umask(tgt_factory, mask)
    st = os.stat(t.sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert st.st_uid == os.geteuid()
    assert t.rpc("spdk_get_version")["fields"]["major"] == 26


def test_rpc_socket_group(tgt_factory):
    gid = max(os.getgroups() or [os.getegid()])
    group = grp.getgrgid(gid).gr_name
    t = start_under_umask(tgt_factory, 0o077, "--rpc-socket-group", group)
    st = os.stat(t.sock)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid, (oct(st.st_mode), st.st_gid)
    assert t.rpc("spdk_get_version")["fields"]["major"] == 26
    t.stop()
    t = start_under_umask(tgt_factory, 0o022, "--rpc-socket-group", str(gid), name="bygid")
    st = os.stat(t.sock)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid, (oct(st.st_mode), st.st_gid)


def test_rpc_socket_unknown_group(tgt_factory):
    t = tgt_factory("--rpc-socket-group", "no-such-group-xyz", wait=False)
    assert t.wait_exit(timeout=10) != 0
    assert "--rpc-socket-group \"no-such-group-xyz\": no such group" in t.log(), t.log()
    assert not t.sock.exists()
