"""NBD end to end, with the real tools (Debian's nbdkit, libnbd-bin, qemu-utils):

* the NBD client bdev (bdev_nbd_create) over nbdkit (file + delay / error
  filters) and qemu-nbd serving a qcow2 image, as a clone source;
* the NBD server (nbd_server_start, nbd_export_add) exporting the clone and
  other bdevs to nbdcopy, qemu-io, qemu-img and nbdinfo;
* a source server killed and restarted under a hydrating clone;
* malformed requests from a raw socket.
"""

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from clone_util import clone_create, clone_status, wait_for, wait_hydrated
from conftest import ROOT, SMALL, SPDK_RPC, Target, scratch_dir

MB = 1 << 20
BS = 4096
TOOLS = ("nbdkit", "nbdinfo", "nbdcopy", "qemu-nbd", "qemu-img", "qemu-io")
PLUGIN_ENV = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"), NO_COLOR="1")


def need_tools():
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail("missing %s: run bash scripts/test.sh (it installs nbdkit, libnbd-bin, "
                    "qemu-utils)" % ", ".join(missing), pytrace=False)


def run(*cmd, check=True, timeout=120):
    cp = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                        stdin=subprocess.DEVNULL)
    if check and cp.returncode != 0:
        raise AssertionError("%s exited %d\nstdout:\n%s\nstderr:\n%s"
                             % (" ".join(map(str, cmd)), cp.returncode, cp.stdout, cp.stderr))
    return cp


class Server:
    """A foreground NBD server process (nbdkit or qemu-nbd) on a Unix socket."""

    def __init__(self, argv, sock, log):
        self.argv = [str(a) for a in argv]
        self.sock = Path(sock)
        self.log = Path(log)
        self.proc = None

    def start(self):
        if self.sock.exists():
            self.sock.unlink()
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not self.sock.exists():
            if self.proc.poll() is not None:
                raise AssertionError("%s exited %s:\n%s" % (self.argv, self.proc.returncode,
                                                            self.log.read_text(errors="replace")))
            if time.monotonic() > deadline:
                raise AssertionError("%s did not create %s" % (self.argv, self.sock))
            time.sleep(0.02)
        return self

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        if self.proc:
            self._log.close()

    def uri(self, export=""):
        return "nbd+unix:///%s?socket=%s" % (export, self.sock)


@pytest.fixture
def nbd_dir():
    with scratch_dir("ctgt-nbd-") as d:
        yield d


@pytest.fixture
def servers():
    started = []

    def start(argv, sock, log):
        need_tools()
        s = Server(argv, sock, log).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def nbdkit(servers, d, name, plugin_args, filters=(), extra=()):
    sock = d / ("%s.sock" % name)
    argv = ["nbdkit", "-f", "-U", sock, "--exit-with-parent"] + list(extra)
    argv += ["--filter=%s" % f for f in filters] + list(plugin_args)
    return servers(argv, sock, d / ("%s.log" % name))


def random_image(path, size, holes=()):
    """Random data with zero-filled sparse holes [(offset, length)]."""
    data = bytearray(os.urandom(size))
    for off, ln in holes:
        data[off:off + ln] = bytes(ln)
    Path(path).write_bytes(bytes(data))
    for off, ln in holes:
        subprocess.run(["fallocate", "-p", "-o", str(off), "-l", str(ln), str(path)], check=True)
    return bytes(data)


def stack(t, d, source_uri, size, name="Clone0", source="Src", dst_fill=None, **clone_opts):
    """NBD source bdev, file destination (sparse, or filled with the byte
    `dst_fill`), malloc metadata, the clone."""
    t.rpc("bdev_nbd_create", name=source, uri=source_uri, block_size=BS,
          reconnect_delay_ms=100, fast_io_fail_timeout_ms=500, io_timeout_ms=5000)
    dst = d / ("%s-dst.img" % name)
    with open(dst, "wb") as f:
        if dst_fill is None:
            f.truncate(size)
        else:
            f.write(bytes([dst_fill]) * size)
    t.rpc("bdev_uring_create", filename=str(dst), name="Dst", block_size=BS)
    t.rpc("bdev_malloc_create", name="Md", num_blocks=1024, block_size=BS)
    clone_create(t, name=name, source=source, dest="Dst", md="Md", region_size_kb=64, **clone_opts)
    return dst


def export(t, d, bdev, writable=True):
    sock = d / "export.sock"
    if not t.rpc("nbd_get_exports")["listen"]:
        t.rpc("nbd_server_start", listen=str(sock))
    t.rpc("nbd_export_add", bdev_name=bdev, writable=writable)
    return "nbd+unix:///%s?socket=%s" % (bdev, sock)


def saved(t):
    """save_config through the real rpc.py: {subsystem: config}."""
    doc = json.loads(t.cli("save_config").stdout)
    return {s["subsystem"]: s["config"] or [] for s in doc["subsystems"]}


def set_hydration(t, name="Clone0", **kw):
    t.rpc("bdev_clone_set_hydration", name=name, **kw)


# ---------------------------------------------------------------------------


def test_create_errors_leave_nothing(tgt, servers, nbd_dir):
    need_tools()
    code, msg = tgt.rpc_err("bdev_nbd_create", name="N", uri="http://example.com/x")
    assert code == -22 and "scheme" in msg, msg
    code, msg = tgt.rpc_err("bdev_nbd_create", name="N", uri="nbds://host/x")
    assert code == -22 and "TLS" in msg, msg
    code, msg = tgt.rpc_err("bdev_nbd_create", name="N",
                            uri="nbd+unix:///x?socket=%s" % (nbd_dir / "none.sock"))
    assert code == -5 and "none.sock" in msg, msg
    # A listening TCP port that is not an NBD server closes on us.
    code, msg = tgt.rpc_err("bdev_nbd_create", name="N", uri="nbd://127.0.0.1:1/x",
                            connect_timeout_ms=2000)
    assert code == -5, msg
    img = nbd_dir / "a.img"
    random_image(img, 1 * MB)
    q = servers(["qemu-nbd", "-k", nbd_dir / "q.sock", "-f", "raw", "-x", "disk", "-t", "-r",
                 img], nbd_dir / "q.sock", nbd_dir / "q.log")
    code, msg = tgt.rpc_err("bdev_nbd_create", name="N", uri=q.uri("nosuch"))
    assert code == -5 and "nosuch" in msg, msg
    assert tgt.rpc("bdev_get_bdevs") == []
    assert tgt.rpc("bdev_nbd_create", name="N", uri=q.uri("disk")) == "N"
    b = tgt.bdev("N")
    assert b["product_name"] == "NBD disk" and b["num_blocks"] * b["block_size"] == MB
    assert b["driver_specific"]["nbd"]["read_only"] is True
    assert b["supported_io_types"]["write"] is False
    code, msg = tgt.rpc_err("bdev_nbd_create", name="N", uri=q.uri("disk"))
    assert code == -17, msg
    cfg = [c for c in saved(tgt)["bdev"] if c["method"] == "bdev_nbd_create"]
    assert cfg and cfg[0]["params"]["uri"] == q.uri("disk"), cfg
    assert tgt.rpc("bdev_nbd_delete", name="N") is True
    code, _ = tgt.rpc_err("bdev_nbd_delete", name="N")
    assert code == -19


def test_server_rpcs_and_tools(tgt, servers, nbd_dir):
    """Exports of malloc/null bdevs read and written with nbdinfo, qemu-io,
    nbdcopy and qemu-img; the RPC errors; save_config; the plugin."""
    need_tools()
    tgt.rpc("bdev_malloc_create", name="M0", num_blocks=4096, block_size=BS)
    tgt.rpc("bdev_null_create", name="Z0", num_blocks=4096, block_size=BS)
    code, msg = tgt.rpc_err("nbd_server_start", listen="not-an-address")
    assert code == -22 and "not-an-address" in msg, msg
    code, _ = tgt.rpc_err("nbd_export_add", bdev_name="Nope")
    assert code == -19
    sock = nbd_dir / "srv.sock"
    cp = subprocess.run([str(SPDK_RPC), "-s", str(tgt.sock), "--plugin", "nbd_rpc_plugin",
                         "nbd_server_start", "-l", str(sock)], env=PLUGIN_ENV,
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    code, _ = tgt.rpc_err("nbd_server_start", listen=str(sock))
    assert code == -17
    assert tgt.rpc("nbd_export_add", bdev_name="M0", writable=True) == "M0"
    assert tgt.rpc("nbd_export_add", bdev_name="Z0", name="zero") == "zero"
    code, _ = tgt.rpc_err("nbd_export_add", bdev_name="Z0", name="zero")
    assert code == -17
    m0 = "nbd+unix:///M0?socket=%s" % sock
    info = json.loads(run("nbdinfo", "--json", m0).stdout)
    e = info["exports"][0]
    assert e["export-size"] == 4096 * BS and e["block_size_minimum"] == BS
    assert e["can_multi_conn"] and e["can_flush"] and e["can_fua"] and not e["is_read_only"]
    assert "base:allocation" in e["contexts"]
    listed = run("nbdinfo", "--list", "--json", "nbd+unix:///?socket=%s" % sock).stdout
    assert {x["export-name"] for x in json.loads(listed)["exports"]} == {"M0", "zero"}
    # Writes (plain, FUA, zeroes, trim), flush, read back.
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -f -P 0x6b 1M 64k",
        "-c", "write -z 2M 128k", "-c", "discard 3M 4k", "-c", "flush",
        "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x6b 1M 64k", "-c", "read -P 0 2M 128k", m0)
    out = nbd_dir / "m0.raw"
    run("nbdcopy", "--connections=4", m0, out)
    expect = bytearray(4096 * BS)
    expect[0:MB] = b"\x5a" * MB
    expect[MB:MB + 65536] = b"\x6b" * 65536
    data = out.read_bytes()
    assert data[:3 * MB] == bytes(expect[:3 * MB])
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", out, m0)
    # The null bdev reports itself as all holes reading zeroes.
    zero = "nbd+unix:///zero?socket=%s" % sock
    mp = json.loads(run("nbdinfo", "--map", "--json", zero).stdout)
    assert all(x["type"] == 3 for x in mp), mp
    # Read-only export refuses writes.
    cp = run("qemu-io", "-f", "raw", "-c", "write 0 4k", zero, check=False)
    assert cp.returncode != 0 or "failed" in cp.stdout + cp.stderr
    ex = tgt.rpc("nbd_get_exports")
    assert ex["listen"] == [str(sock)] and len(ex["exports"]) == 2
    subs = saved(tgt)
    assert {"method": "nbd_server_start", "params": {"listen": str(sock)}} in subs["nbd"]
    assert {"method": "nbd_export_add",
            "params": {"bdev_name": "M0", "name": "M0", "writable": True}} in subs["nbd"]
    assert tgt.rpc("nbd_export_remove", name="zero") is True
    code, _ = tgt.rpc_err("nbd_export_remove", name="zero")
    assert code == -19
    # Deleting an exported bdev removes its export.
    tgt.rpc("bdev_malloc_delete", name="M0")
    wait_for(lambda: (tgt.rpc("nbd_get_exports")["exports"] == [], None), 10, "export removal")
    assert tgt.rpc("nbd_server_stop") is True
    assert not sock.exists()
    code, _ = tgt.rpc_err("nbd_server_stop")
    assert code == -19
    # TCP: stopping releases the port (a restart binds it again at once).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for _ in range(2):
        assert tgt.rpc("nbd_server_start", listen="127.0.0.1:%d" % port) is True
        tgt.rpc("bdev_null_create", name="T0", num_blocks=16, block_size=BS)
        tgt.rpc("nbd_export_add", bdev_name="T0")
        assert "export-size" in run("nbdinfo", "--json", "nbd://127.0.0.1:%d/T0" % port).stdout
        tgt.rpc("nbd_export_remove", name="T0")
        tgt.rpc("bdev_null_delete", name="T0")
        assert tgt.rpc("nbd_server_stop") is True


def _recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed after %d of %d bytes" % (len(b), n))
        b += c
    return b


def _handshake(path, export):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    g = _recv_exact(s, 18)
    assert g[:8] == b"NBDMAGIC"
    s.sendall(struct.pack(">I", 3))
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
    while True:
        magic, opt, ty, ln = struct.unpack(">QIII", _recv_exact(s, 20))
        _recv_exact(s, ln)
        if ty == 1:
            return s
        assert ty == 3, ty


def _request(s, ty, off, ln, cookie, flags=0, magic=0x25609513):
    s.sendall(struct.pack(">IHHQQI", magic, flags, ty, cookie, off, ln))


def test_malformed_requests(tgt, nbd_dir):
    """Bad requests get an error reply; a stream that cannot be followed is
    closed; the target serves on."""
    tgt.rpc("bdev_malloc_create", name="M0", num_blocks=256, block_size=BS)
    sock = nbd_dir / "srv.sock"
    tgt.rpc("nbd_server_start", listen=str(sock))
    tgt.rpc("nbd_export_add", bdev_name="M0")
    s = _handshake(sock, "M0")
    for cookie, (ty, off, ln, flags) in enumerate([
            (0, 256 * BS, BS, 0),        # read past the end
            (0, 100, BS, 0),             # unaligned
            (1, 0, BS, 0),               # write to a read-only export (payload follows)
            (0, 0, BS, 0x8000),          # unknown flag
            (99, 0, 0, 0),               # unknown command
            (0, 0, 64 << 20, 0)]):       # read larger than the maximum
        _request(s, ty, off, ln, cookie, flags)
        if ty == 1:
            s.sendall(bytes(ln))
        magic, err, ck = struct.unpack(">IIQ", _recv_exact(s, 16))
        assert magic == 0x67446698 and ck == cookie and err != 0, (ty, off, ln, err)
    _request(s, 0, 0, BS, 77)
    magic, err, ck = struct.unpack(">IIQ", _recv_exact(s, 16))
    assert (err, ck) == (0, 77)
    _recv_exact(s, BS)
    _request(s, 0, 0, BS, 78, magic=0x12345678)
    with pytest.raises((EOFError, ConnectionResetError)):
        _recv_exact(s, 16)
    s.close()
    # Garbage instead of a handshake; an oversized option.
    for junk in (b"\xff" * 64, struct.pack(">IQII", 3, 0x49484156454F5054, 7, 1 << 30)):
        r = socket.socket(socket.AF_UNIX)
        r.settimeout(10)
        r.connect(str(sock))
        _recv_exact(r, 18)
        r.sendall(junk)
        with pytest.raises((EOFError, ConnectionResetError)):
            _recv_exact(r, 1 << 20)
        r.close()
    assert tgt.rpc("nbd_get_exports")["exports"][0]["name"] == "M0"
    s = _handshake(sock, "M0")
    _request(s, 2, 0, 0, 1)      # NBD_CMD_DISC
    s.close()


def test_clone_from_nbdkit_exported_while_hydrating(tgt, servers, nbd_dir):
    """nbdkit file + delay filter as the source; the clone exported over NBD
    and read (nbdcopy), written (qemu-io), compared (qemu-img compare) and
    sized (nbdinfo) while it hydrates, after the source is released and after
    the source server is gone; the destination ends byte-identical."""
    size = (8 if SMALL else 32) * MB
    img = nbd_dir / "src.img"
    src = random_image(img, size, holes=[(2 * MB, MB)])
    kit = nbdkit(servers, nbd_dir, "kit", ["file", img, "rdelay=2ms"], filters=["delay"],
                 extra=["-r"])
    dst = stack(tgt, nbd_dir, kit.uri(), size, hydration_mbytes_per_sec=2)
    uri = export(tgt, nbd_dir, "Clone0")
    assert json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]["export-size"] == size
    copy = nbd_dir / "copy1.raw"
    run("nbdcopy", uri, copy)
    assert clone_status(tgt)["state"] == "hydrating"
    assert copy.read_bytes() == src
    run("qemu-io", "-f", "raw", "-c", "write -P 0xc3 %d 192k" % (5 * MB + 4096), uri)
    expect = bytearray(src)
    expect[5 * MB + 4096:5 * MB + 4096 + 196608] = b"\xc3" * 196608
    exp_file = nbd_dir / "expect.raw"
    exp_file.write_bytes(bytes(expect))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", exp_file, uri)
    set_hydration(tgt, hydration_mbytes_per_sec=0)
    wait_hydrated(tgt, timeout=120)
    wait_for(lambda: (clone_status(tgt)["source_released"], None), 30, "source release")
    assert dst.read_bytes() == bytes(expect)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", exp_file, uri)
    tgt.rpc("bdev_nbd_delete", name="Src")
    kit.kill()
    copy2 = nbd_dir / "copy2.raw"
    run("nbdcopy", uri, copy2)
    assert copy2.read_bytes() == bytes(expect)
    assert json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]["export-size"] == size


def test_clone_from_qemu_nbd_qcow2(tgt, servers, nbd_dir):
    """qemu-nbd serving a qcow2 image (sparse, with data written into it) as
    the source; the destination equals `qemu-img convert -O raw`."""
    need_tools()
    size = (8 if SMALL else 32) * MB
    q = nbd_dir / "src.qcow2"
    run("qemu-img", "create", "-f", "qcow2", q, str(size))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 3M 512k",
        "-c", "write -P 0x33 %d 64k" % (size - 65536), q)
    raw = nbd_dir / "src.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", q, raw)
    srv = servers(["qemu-nbd", "-k", nbd_dir / "q.sock", "-f", "qcow2", "-t", "-r", "-x", "img", q],
                  nbd_dir / "q.sock", nbd_dir / "q.log")
    dst = stack(tgt, nbd_dir, srv.uri("img"), size)
    wait_hydrated(tgt, timeout=120)
    assert dst.read_bytes() == raw.read_bytes()
    uri = export(tgt, nbd_dir, "Clone0", writable=False)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", raw, uri)


def test_error_filter_source_fails_then_recovers(tgt, servers, nbd_dir):
    """nbdkit's error filter fails every read while its trigger file exists:
    reads through the clone fail with EIO (never hang), hydration records
    errors; once the file is gone hydration completes byte-identical."""
    size = 4 * MB
    img = nbd_dir / "src.img"
    src = random_image(img, size)
    trigger = nbd_dir / "errors-on"
    trigger.write_text("1")
    kit = nbdkit(servers, nbd_dir, "err", ["file", img, "error-rate=100%",
                                           "error-file=%s" % trigger], filters=["error"],
                 extra=["-r"])
    dst = stack(tgt, nbd_dir, kit.uri(), size)
    uri = export(tgt, nbd_dir, "Clone0", writable=False)
    cp = run("nbdcopy", uri, nbd_dir / "fail.raw", check=False, timeout=60)
    assert cp.returncode != 0, cp.stdout
    wait_for(lambda: (clone_status(tgt)["errors"]["source_read"] > 0, clone_status(tgt)), 30,
             "source read errors")
    assert clone_status(tgt)["state"] != "hydrated"
    trigger.unlink()
    set_hydration(tgt, enable=True)
    wait_hydrated(tgt, timeout=120)
    assert dst.read_bytes() == src


def test_source_server_killed_and_restarted(tgt, servers, nbd_dir):
    """kill -9 of nbdkit under a hydrating clone: the NBD bdev reconnects
    with back-off once a new nbdkit serves the same socket; the clone's
    reads work again and hydration completes byte-identical."""
    size = (8 if SMALL else 16) * MB
    img = nbd_dir / "src.img"
    src = random_image(img, size)
    argv = ["file", img]
    kit = nbdkit(servers, nbd_dir, "k1", argv, extra=["-r"])
    dst = stack(tgt, nbd_dir, kit.uri(), size, hydration_mbytes_per_sec=2)
    wait_for(lambda: (clone_status(tgt)["hydrated_regions"] > 0, None), 30, "some hydration")
    kit.kill()
    wait_for(lambda: (tgt.bdev("Src")["driver_specific"]["nbd"]["connected"] == 0, None), 10,
             "the NBD connection to drop")
    time.sleep(1)
    assert clone_status(tgt)["state"] != "hydrated"
    # A new server on the same socket (the client reconnects to the URI).
    kit2 = nbdkit(servers, nbd_dir, "k1", argv, extra=["-r"])
    assert kit2.sock == kit.sock
    wait_for(lambda: (tgt.bdev("Src")["driver_specific"]["nbd"]["connected"] == 1, None), 20,
             "the NBD bdev to reconnect")
    set_hydration(tgt, hydration_mbytes_per_sec=0, enable=True)
    wait_hydrated(tgt, timeout=120)
    assert dst.read_bytes() == src


class TwoReactors(Target):
    @property
    def argv(self):
        return [a if a != "0x1" else "0x3" for a in super().argv]


def test_multi_conn_client_over_reactors(workdir, servers, nbd_dir):
    """connections=4 to an nbdkit memory export (multi-conn) on two
    reactors: data written through the bdev reads back through nbdkit, and
    the export's clients are spread over both reactors."""
    need_tools()
    t = TwoReactors(workdir).start()
    try:
        _multi_conn(t, servers, nbd_dir)
    finally:
        t.kill()


def _multi_conn(t, servers, nbd_dir):
    kit = nbdkit(servers, nbd_dir, "mem", ["memory", "16M"])
    t.rpc("bdev_nbd_create", name="Mem", uri=kit.uri(), connections=4, block_size=BS)
    nb = t.bdev("Mem")["driver_specific"]["nbd"]
    assert nb["connections"] == 4 and "multi_conn" in nb["transmission_flags"], nb
    wait_for(lambda: (t.bdev("Mem")["driver_specific"]["nbd"]["connected"] == 4, None), 10,
             "four connections")
    uri = export(t, nbd_dir, "Mem")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x7e 0 8M", "-c", "read -P 0x7e 0 8M", uri)
    # Straight from nbdkit: the data is there.
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x7e 0 8M", kit.uri())


def test_requests_split_at_the_servers_maximum(tgt, servers, nbd_dir):
    """nbdkit refuses requests over 64 KiB (blocksize-policy filter): 4 MiB
    reads and writes through the NBD bdev are split to fit."""
    kit = nbdkit(servers, nbd_dir, "bp", ["memory", "16M", "blocksize-maximum=65536",
                                          "blocksize-error-policy=error"],
                 filters=["blocksize-policy"])
    tgt.rpc("bdev_nbd_create", name="Mem", uri=kit.uri(), block_size=BS)
    assert tgt.bdev("Mem")["driver_specific"]["nbd"]["max_payload"] == 65536
    uri = export(tgt, nbd_dir, "Mem")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 4M 4M", "-c", "read -P 0x3c 4M 4M", uri)
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x3c 4M 4M", "-c", "read -P 0 0 4M",
        kit.uri())


def _dry(*args):
    cp = subprocess.run([str(SPDK_RPC), "-s", "/nonexistent.sock", "--dry-run", "--plugin",
                         "nbd_rpc_plugin"] + [str(a) for a in args], env=PLUGIN_ENV,
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout[len("Request:\n"):])


def test_plugin_sends_only_given_params():
    assert _dry("bdev_nbd_create", "-b", "S", "-u", "nbd://h/e") == {
        "jsonrpc": "2.0", "method": "bdev_nbd_create", "id": 1,
        "params": {"name": "S", "uri": "nbd://h/e"}}
    p = _dry("bdev_nbd_create", "-b", "S", "-u", "nbd://h/e", "-r", "-c", "4", "--block-size",
             "4096", "--connect-timeout-ms", "100", "--io-timeout-ms", "0",
             "--reconnect-delay-ms", "50", "--fast-io-fail-timeout-ms", "0")["params"]
    assert p == {"name": "S", "uri": "nbd://h/e", "read_only": True, "connections": 4,
                 "block_size": 4096, "connect_timeout_ms": 100, "io_timeout_ms": 0,
                 "reconnect_delay_ms": 50, "fast_io_fail_timeout_ms": 0}
    assert _dry("bdev_nbd_delete", "-b", "S")["params"] == {"name": "S"}
    assert _dry("nbd_server_start", "-l", "127.0.0.1:10809")["params"] == {
        "listen": "127.0.0.1:10809"}
    assert "params" not in _dry("nbd_server_stop")
    assert _dry("nbd_export_add", "-b", "C", "-n", "c", "-w")["params"] == {
        "bdev_name": "C", "name": "c", "writable": True}
    assert _dry("nbd_export_add", "-b", "C")["params"] == {"bdev_name": "C"}
    assert _dry("nbd_export_remove", "-n", "c")["params"] == {"name": "c"}
    assert "params" not in _dry("nbd_get_exports")


def _reads(logfile):
    """(offset, count) of every Read in an nbdkit log filter file."""
    out = []
    for line in Path(logfile).read_text().splitlines():
        if " Read " not in line or "..." not in line:
            continue
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        out.append((int(f["offset"], 0), int(f["count"], 0)))
    return out


def test_sparse_source_holes_are_never_read(tgt, servers, nbd_dir):
    """Hydration asks the NBD source for block status and writes zeroes for
    its holes without reading them (nbdkit's log filter records every read);
    the destination still equals the source."""
    size = (16 if SMALL else 64) * MB
    img = nbd_dir / "sparse.img"
    holes = [(0, 2 * MB), (5 * MB, 6 * MB), (size - 3 * MB, 3 * MB)]
    src = random_image(img, size, holes=holes)
    logf = nbd_dir / "reads.log"
    kit = nbdkit(servers, nbd_dir, "sp", ["file", img, "logfile=%s" % logf], filters=["log"],
                 extra=["-r"])
    # The destination starts as garbage: the holes must be written as zeroes.
    dst = stack(tgt, nbd_dir, kit.uri(), size, dst_fill=0xEE, no_hydration=True)
    # Exported while cold, the clone shows the source's holes (its block
    # status comes from the source's for cold regions).
    uri = export(tgt, nbd_dir, "Clone0", writable=False)
    zero = [(e["offset"], e["length"]) for e in
            json.loads(run("nbdinfo", "--map", "--json", uri).stdout) if e["type"] & 2]
    assert zero == holes, zero
    set_hydration(tgt, enable=True)
    wait_hydrated(tgt, timeout=120)
    # Hydrated: all data now (the destination is not sparse-aware).
    mp = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    assert all(e["type"] == 0 for e in mp), mp
    assert dst.read_bytes() == src
    reads = _reads(logf)
    assert reads, "no reads logged"
    bad = [(o, n) for o, n in reads for ho, hn in holes if o < ho + hn and ho < o + n]
    assert not bad, "reads inside the source's holes: %s" % bad[:10]


def test_client_over_tcp(tgt, nbd_dir):
    """The client over TCP (nbd://127.0.0.1:PORT/EXPORT) to nbdkit."""
    need_tools()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(nbd_dir / "tcp.log", "wb")
    kit = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p",
                            str(port), "-e", "disk", "memory", "8M"], stdout=log,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        uri = "nbd://127.0.0.1:%d/disk" % port
        deadline = time.monotonic() + 15
        while run("nbdinfo", "--size", uri, check=False).returncode != 0:
            assert time.monotonic() < deadline and kit.poll() is None, "nbdkit did not start"
            time.sleep(0.05)
        assert tgt.rpc("bdev_nbd_create", name="T", uri=uri, block_size=BS) == "T"
        nb = tgt.bdev("T")["driver_specific"]["nbd"]
        assert nb["address"] == "127.0.0.1:%d" % port and nb["export"] == "disk", nb
        exp = export(tgt, nbd_dir, "T")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x42 64k 1M", "-c", "read -P 0x42 64k 1M", exp)
        run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x42 64k 1M", uri)
    finally:
        kit.kill()
        kit.wait()
        log.close()


def test_write_zeroes_without_native_support_is_bounded(tgt, nbd_dir):
    """NBD_CMD_WRITE_ZEROES on a bdev with no native write-zeroes (aio
    without fallocate) is written from a bounded zero buffer, chunk by
    chunk: a 512 MiB request under an address-space limit of 128 MiB more
    than the target has mapped succeeds (a buffer of the request's size used
    to abort the target), zeroes exactly its range, and the target serves on."""
    from test_resource_limits import AddressSpaceLimit
    path = nbd_dir / "disk.img"
    size = 1 << 30
    with open(path, "wb") as f:
        f.truncate(size)
    tgt.rpc("bdev_aio_create", filename=str(path), name="A0", block_size=BS)
    assert not tgt.bdev("A0")["supported_io_types"]["write_zeroes"]
    sock = nbd_dir / "srv.sock"
    tgt.rpc("nbd_server_start", listen=str(sock))
    tgt.rpc("nbd_export_add", bdev_name="A0", writable=True)
    s = _handshake(sock, "A0")
    s.settimeout(120)

    def reply(cookie):
        magic, err, ck = struct.unpack(">IIQ", _recv_exact(s, 16))
        assert (magic, ck) == (0x67446698, cookie)
        return err

    def read(off, ln, cookie):
        _request(s, 0, off, ln, cookie)
        assert reply(cookie) == 0
        return _recv_exact(s, ln)

    # A pattern around and inside the range; the range is not whole chunks.
    start, length = BS, (512 << 20) + 3 * BS
    end = start + length
    spots = [0, start, start + MB - BS, start + MB, end - BS, end]
    pattern = {off: os.urandom(BS) for off in spots}
    for i, (off, data) in enumerate(pattern.items()):
        _request(s, 1, off, BS, 100 + i)
        s.sendall(data)
        assert reply(100 + i) == 0
    with AddressSpaceLimit(tgt.pid, 128 << 20):
        _request(s, 6, start, length, 7)
        assert reply(7) == 0
    assert tgt.running(), tgt.log()[-3000:]
    for i, off in enumerate(spots):
        want = pattern[off] if off < start or off >= end else bytes(BS)
        assert read(off, BS, 200 + i) == want, off
    _request(s, 2, 0, 0, 1)      # NBD_CMD_DISC
    s.close()
