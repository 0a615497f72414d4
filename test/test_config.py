"""save_config / --json / load_config round trips (rpc-contract.md §1.6, §2.1, §4.8)."""

import json
import os
import time

from conftest import write_bdev_config

MALLOC_UUID = "6a2f1c3e-4b5d-4e6f-8a7b-9c0d1e2f3a4b"
ERROR_UUID = "7b3f2d4e-5c6e-4f70-9b8c-0d1e2f3a4b5c"


def build_bdevs(t, datadir):
    """Several modules, stacked bdevs, claims, a QoS limit."""
    aio_file = os.path.join(str(datadir), "aio.img")
    uring_file = os.path.join(str(datadir), "uring.img")
    for p in (aio_file, uring_file):
        with open(p, "wb") as f:
            f.truncate(4 << 20)
    t.cli("bdev_malloc_create", "-b", "Malloc0", "-u", MALLOC_UUID, "8", "512")
    t.cli("bdev_malloc_create", "-b", "Malloc1", "4", "4096")
    t.cli("bdev_malloc_create", "-b", "Malloc2", "2", "512")
    t.cli("bdev_null_create", "Null0", "16", "4096")
    t.cli("bdev_aio_create", aio_file, "AIO0", "512")
    t.cli("bdev_uring_create", uring_file, "URING0", "4096")
    t.cli("bdev_delay_create", "-b", "Malloc1", "-d", "Delay0",
          "-r", "100", "-t", "200", "-w", "300", "-n", "400")
    t.cli("bdev_error_create", "--uuid", ERROR_UUID, "Malloc2")
    t.cli("bdev_set_qos_limit", "Malloc0", "--rw-ios-per-sec", "10000", "--r-mbytes-per-sec", "20")
    return ["AIO0", "Delay0", "EE_Malloc2", "Malloc0", "Malloc1", "Malloc2", "Null0", "URING0"]


def sorted_bdevs(t):
    return sorted(t.rpc("bdev_get_bdevs"), key=lambda b: b["name"])


def wait_for_bdevs(t, expected_names, timeout=10.0):
    """framework_wait_init, then poll until exactly these bdevs exist."""
    assert t.rpc("framework_wait_init") is True
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = sorted(b["name"] for b in t.rpc("bdev_get_bdevs"))
        if got == sorted(expected_names):
            return
        time.sleep(0.05)
    raise AssertionError("bdevs after config load: %r, expected %r" % (got, sorted(expected_names)))


def bdev_section(cfg):
    secs = [s for s in cfg["subsystems"] if s["subsystem"] == "bdev"]
    assert len(secs) == 1, cfg
    return secs[0]["config"]


def test_save_config_shape(tgt, datadir):
    build_bdevs(tgt, datadir)
    cfg = json.loads(tgt.cli("save_config").stdout)
    assert set(cfg) == {"subsystems"}
    for s in cfg["subsystems"]:
        assert set(s) == {"subsystem", "config"}, s
    entries = bdev_section(cfg)
    methods = [e["method"] for e in entries]
    assert methods[0] == "bdev_set_options" and methods[-1] == "bdev_wait_for_examine", methods
    for m in ("bdev_malloc_create", "bdev_null_create", "bdev_aio_create", "bdev_uring_create",
              "bdev_delay_create", "bdev_error_create", "bdev_set_qos_limit"):
        assert m in methods, (m, methods)
    # every bdev is created after the bdevs it stands on
    created = {}
    for i, e in enumerate(entries):
        p = e.get("params", {})
        if e["method"] == "bdev_error_create":
            created["EE_" + p["base_name"]] = i
            assert created.get(p["base_name"], len(entries)) < i, methods
        elif e["method"] == "bdev_delay_create":
            created[p["name"]] = i
            assert created.get(p["base_bdev_name"], len(entries)) < i, methods
        elif e["method"].endswith("_create"):
            created[p["name"]] = i
    qos = [e for e in entries if e["method"] == "bdev_set_qos_limit"]
    assert qos and qos[0]["params"]["name"] == "Malloc0"
    assert qos[0]["params"]["rw_ios_per_sec"] == 10000 and qos[0]["params"]["r_mbytes_per_sec"] == 20
    assert methods.index("bdev_set_qos_limit") > created["Malloc0"]
    # save_subsystem_config gives the same list
    sub = json.loads(tgt.cli("save_subsystem_config", "-n", "bdev").stdout)
    assert sub == {"subsystem": "bdev", "config": entries}


def test_save_then_json_restart(tgt_factory, datadir, workdir):
    t1 = tgt_factory(name="first")
    names = build_bdevs(t1, datadir)
    before = sorted_bdevs(t1)
    cfg_path = workdir / "cfg.json"
    cfg_text = t1.cli("save_config").stdout
    cfg_path.write_text(cfg_text)
    t1.stop()

    t2 = tgt_factory("--json", cfg_path, name="second")
    wait_for_bdevs(t2, names)
    after = sorted_bdevs(t2)
    for b_old, b_new in zip(before, after):
        assert b_new == b_old, "bdev %s differs after --json restart" % b_old["name"]
    assert after == before
    # saving again gives the same config
    again = json.loads(t2.cli("save_config").stdout)
    assert bdev_section(again) == bdev_section(json.loads(cfg_text))
    t2.stop()


def test_load_config_into_fresh_target(tgt_factory, datadir, workdir):
    t1 = tgt_factory(name="first")
    names = build_bdevs(t1, datadir)
    before = sorted_bdevs(t1)
    cfg_text = t1.cli("save_config").stdout
    t1.stop()

    # stdin, into a target already in RUNTIME (STARTUP-only entries are skipped)
    t2 = tgt_factory(name="stdin")
    cp = t2.cli("load_config", input=cfg_text)
    assert cp.returncode == 0
    wait_for_bdevs(t2, names)
    assert sorted_bdevs(t2) == before
    t2.stop()

    # -j FILE, into a --wait-for-rpc target (load_config calls framework_start_init itself)
    cfg_path = workdir / "cfg.json"
    cfg_path.write_text(cfg_text)
    t3 = tgt_factory("--wait-for-rpc", name="startup")
    cp = t3.cli("load_config", "-j", cfg_path)
    assert "skipped" not in cp.stdout, cp.stdout
    wait_for_bdevs(t3, names)
    assert sorted_bdevs(t3) == before
    t3.stop()


def test_json_with_startup_options(tgt_factory, workdir):
    cfg = write_bdev_config(workdir / "opts.json", [
        ("bdev_set_options", {"bdev_io_pool_size": 32767, "bdev_io_cache_size": 128,
                              "bdev_auto_examine": True}),
        ("bdev_malloc_create", {"name": "Malloc0", "num_blocks": 256, "block_size": 512}),
        ("bdev_wait_for_examine", None),
    ])
    t = tgt_factory("--json", cfg)
    wait_for_bdevs(t, ["Malloc0"])
    opts = t.rpc("framework_get_config", name="bdev")[0]
    assert opts["method"] == "bdev_set_options"
    assert opts["params"]["bdev_io_pool_size"] == 32767
    assert opts["params"]["bdev_io_cache_size"] == 128


def test_json_failing_method_stops_startup(tgt_factory, workdir):
    cfg = write_bdev_config(workdir / "bad.json", [
        ("bdev_malloc_create", {"name": "Malloc0", "num_blocks": 256, "block_size": 512}),
        ("bdev_malloc_create", {"name": "Bad0", "num_blocks": 256, "block_size": 500}),
        ("bdev_malloc_create", {"name": "Malloc1", "num_blocks": 256, "block_size": 512}),
    ])
    t = tgt_factory("--json", cfg, wait=False)
    rc = t.wait_exit(timeout=15)
    assert rc != 0, "clone_tgt started despite a failing --json method:\n%s" % t.log()
    assert "bdev_malloc_create" in t.log(), t.log()
    assert not t.sock.exists() and not t.lock.exists(), "socket/lock left after a failed start"


def test_json_ignore_init_errors(tgt_factory, workdir):
    cfg = write_bdev_config(workdir / "bad.json", [
        ("bdev_malloc_create", {"name": "Malloc0", "num_blocks": 256, "block_size": 512}),
        ("bdev_malloc_create", {"name": "Bad0", "num_blocks": 256, "block_size": 500}),
        ("bdev_delay_create", {"name": "Delay0", "base_bdev_name": "Missing",
                               "avg_read_latency": 1, "p99_read_latency": 1,
                               "avg_write_latency": 1, "p99_write_latency": 1}),
        ("bdev_malloc_create", {"name": "Malloc1", "num_blocks": 256, "block_size": 512}),
    ])
    t = tgt_factory("--json", cfg, "--json-ignore-init-errors")
    wait_for_bdevs(t, ["Malloc0", "Malloc1"])
    t.stop()


def test_json_unknown_method_in_known_subsystem_fails(tgt_factory, workdir):
    cfg = write_bdev_config(workdir / "unknown.json", [
        ("bdev_malloc_create", {"name": "Malloc0", "num_blocks": 256, "block_size": 512}),
        ("bdev_frobnicate_create", {"name": "F0"}),
    ])
    t = tgt_factory("--json", cfg, wait=False)
    rc = t.wait_exit(timeout=15)
    assert rc != 0, t.log()
    assert "bdev_frobnicate_create" in t.log(), t.log()


def test_json_with_comments(tgt_factory, workdir):
    path = workdir / "comments.json"
    path.write_text("""// a config written by hand
{
  /* the only root key SPDK reads */
  "subsystems": [
    {
      "subsystem": "bdev", // block devices
      "config": [
        {"method": "bdev_malloc_create",
         "params": {"name": "Malloc0", "num_blocks": 128, "block_size": 512}}, // one disk
        /* and a null one */
        {"method": "bdev_null_create",
         "params": {"name": "Null0", "num_blocks": 128, "block_size": 512}}
      ]
    }
  ]
}
""")
    t = tgt_factory("--json", path)
    wait_for_bdevs(t, ["Malloc0", "Null0"])


def test_json_skips_subsystems_we_do_not_have(tgt_factory, workdir):
    path = workdir / "foreign.json"
    path.write_text(json.dumps({"subsystems": [
        {"subsystem": "sock", "config": [
            {"method": "sock_set_default_impl", "params": {"impl_name": "posix"}},
            {"method": "sock_impl_set_options", "params": {"impl_name": "posix",
                                                           "recv_buf_size": 2097152}}]},
        {"subsystem": "ublk", "config": [
            {"method": "ublk_create_target", "params": {"cpumask": "0x1"}}]},
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "Malloc0", "num_blocks": 128, "block_size": 512}},
            {"method": "bdev_wait_for_examine"}]},
        {"subsystem": "scheduler", "config": None},
    ]}, indent=2))
    t = tgt_factory("--json", path)
    wait_for_bdevs(t, ["Malloc0"])
    t.stop()


def test_json_nested_array_is_a_batch(tgt_factory, workdir):
    path = workdir / "batch.json"
    path.write_text(json.dumps({"subsystems": [{"subsystem": "bdev", "config": [
        [{"method": "bdev_malloc_create",
          "params": {"name": "Malloc0", "num_blocks": 128, "block_size": 512}},
         {"method": "bdev_malloc_create",
          "params": {"name": "Malloc1", "num_blocks": 128, "block_size": 512}}],
        {"method": "bdev_null_create",
         "params": {"name": "Null0", "num_blocks": 128, "block_size": 512}},
    ]}]}))
    t = tgt_factory("--json", path)
    wait_for_bdevs(t, ["Malloc0", "Malloc1", "Null0"])


def test_json_missing_file(tgt_factory, workdir):
    missing = workdir / "no-such-config.json"
    t = tgt_factory("--json", missing, wait=False)
    rc = t.wait_exit(timeout=15)
    assert rc != 0
    assert str(missing) in t.log(), t.log()


def test_json_not_json(tgt_factory, workdir):
    path = workdir / "broken.json"
    path.write_text('{"subsystems": [ {"subsystem": "bdev", "config": [ }')
    t = tgt_factory("--json", path, wait=False)
    rc = t.wait_exit(timeout=15)
    assert rc != 0, t.log()


def test_empty_config_starts(tgt_factory, workdir):
    path = workdir / "empty.json"
    path.write_text('{"subsystems": []}')
    t = tgt_factory("--json", path)
    assert t.rpc("framework_wait_init") is True
    assert t.rpc("bdev_get_bdevs") == []
    t.stop()
