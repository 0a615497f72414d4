"""End-to-end test harness: start the built `clone_tgt`, talk to it with SPDK's
own Python client (`spdk.rpc.client.JSONRPCClient`) and its real CLI
(`.venv/bin/spdk-rpc`), run `bdevperf`, and clean up whatever happens.

Run through scripts/test.sh (it builds the binaries and the venv first).
CLONE_TGT_TEST_SCALE=small (set by CI=true) shortens bdevperf runs.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from spdk.rpc.client import JSONRPCClient, JSONRPCException

ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = ROOT / "target" / "release"
TGT_BIN = BIN_DIR / "clone_tgt"
PERF_BIN = BIN_DIR / "bdevperf"

SCALE = os.environ.get("CLONE_TGT_TEST_SCALE", "normal")
SMALL = SCALE == "small"
#: bdevperf run time in seconds
PERF_SECS = 1 if SMALL else 2

START_TIMEOUT = 10.0
STOP_TIMEOUT = 20.0
RPC_TIMEOUT = 30.0

# The strings SPDK sends (rpc-contract.md §1.4).
MSG_STARTUP_ONLY = ("Method may only be called after framework is initialized "
                    "using framework_start_init RPC.")
MSG_RUNTIME_ONLY = ("Method may only be called before framework is initialized. "
                    "Use --wait-for-rpc command line parameter and then issue this RPC "
                    "before the framework_start_init RPC.")
DECODE_FAILED = "spdk_json_decode_object failed"

ENODEV = (-19, "No such device")
EEXIST = (-17, "File exists")
EINVAL = (-22, "Invalid argument")
ENOENT = (-2, "No such file or directory")


def _find_spdk_rpc():
    for cand in (ROOT / ".venv" / "bin" / "spdk-rpc", Path(sys.executable).parent / "spdk-rpc"):
        if cand.exists():
            return cand
    found = shutil.which("spdk-rpc")
    return Path(found) if found else None


SPDK_RPC = _find_spdk_rpc()


def require_binaries(*paths):
    missing = [str(p) for p in paths if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail("missing binaries: %s\nbuild them (and the venv) with: bash scripts/test.sh"
                    % ", ".join(missing), pytrace=False)


CI = os.environ.get("CI") == "true"


def cannot_run(reason):
    """A test whose prerequisites are missing: under CI=true that is a
    failure (CI must run every test), on a developer's machine a skip that
    says why."""
    if CI:
        pytest.fail("cannot run under CI: %s" % reason, pytrace=False)
    pytest.skip(reason)


# The real Linux NVMe/TCP host: a QEMU guest built by test/vm/linux-guest
# (its image is cached; scripts/test.sh builds it before the tests).
LINUX_GUEST = ROOT / "test" / "vm" / "linux-guest"
_guest_state = {}


@pytest.fixture(scope="session")
def linux_guest():
    """The harness path, once its image is built (building it if needed)."""
    if "error" not in _guest_state:
        cp = subprocess.run([str(LINUX_GUEST), "build"], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=1800)
        _guest_state["error"] = None if cp.returncode == 0 else (
            "test/vm/linux-guest build failed (exit %d): %s"
            % (cp.returncode, (cp.stdout + cp.stderr)[-3000:]))
    if _guest_state["error"]:
        cannot_run(_guest_state["error"])
    return LINUX_GUEST


def parse_rpc_error(exc):
    """(code, message) from a JSONRPCException raised by JSONRPCClient.call."""
    text = exc.message
    marker = "response:\n"
    idx = text.rfind(marker)
    if idx < 0:
        raise AssertionError("not a JSON-RPC error response: %r" % text)
    err = json.loads(text[idx + len(marker):])
    return err["code"], err["message"]


def concurrent_rpc(tgt, n, method, **params):
    """n clients send `method` at once, each on its own connection;
    returns [(result, None) or (None, error code)] in client order."""
    import threading
    clients = [JSONRPCClient(str(tgt.sock), timeout=RPC_TIMEOUT) for _ in range(n)]
    out = [None] * n
    go = threading.Barrier(n)

    def run(i):
        go.wait()
        try:
            # A copy each: the client adds "method" to the dict it is given
            # when the reply is an error, and the others have not sent yet.
            out[i] = (clients[i].call(method, dict(params)), None)
        except JSONRPCException as e:
            out[i] = (None, parse_rpc_error(e)[0])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RPC_TIMEOUT + 5)
    for c in clients:
        c.close()
    return out


def short_tmpdir(prefix="ctgt-"):
    """A short directory (AF_UNIX paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp" if os.path.isdir("/var/tmp") else None))


class Target:
    """One clone_tgt process serving JSON-RPC on `sock`."""

    def __init__(self, workdir, args=(), sock=None, name="tgt", rpc_server=True, mask="0x1"):
        self.workdir = Path(workdir)
        self.mask = mask
        self.name = name
        self.sock = Path(sock) if sock else self.workdir / "spdk.sock"
        self._own_dir = None
        if len(str(self.sock)) > 100:
            self._own_dir = short_tmpdir()
            self.sock = self._own_dir / "spdk.sock"
        self.lock = Path(str(self.sock) + ".lock")
        self.extra_args = [str(a) for a in args]
        self.rpc_server = rpc_server
        self.log_path = self.workdir / ("%s.log" % name)
        self.proc = None
        self._client = None
        self.returncode = None

    # -- process -----------------------------------------------------------

    @property
    def argv(self):
        argv = [str(TGT_BIN), "--interrupt-mode", "-m", self.mask, "--no-huge"]
        if self.rpc_server:
            argv += ["-r", str(self.sock)]
        return argv + self.extra_args

    def start(self, wait=True):
        require_binaries(TGT_BIN)
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, NO_COLOR="1", RUST_BACKTRACE="1")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir, env=env)
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout=START_TIMEOUT):
        """Wait until the RPC socket accepts a connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail("clone_tgt exited with %s before its socket accepted connections:\n%s"
                            % (self.proc.returncode, self.log()), pytrace=False)
            if self.sock.exists():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.settimeout(1.0)
                    s.connect(str(self.sock))
                except OSError:
                    time.sleep(0.02)
                    continue
                finally:
                    s.close()
                self._wait_json_loaded(deadline)
                return self
            time.sleep(0.02)
        pytest.fail("clone_tgt did not accept connections on %s within %.0f s:\n%s"
                    % (self.sock, timeout, self.log()), pytrace=False)

    def _wait_json_loaded(self, deadline):
        """With --json the RPC socket is served while the config still
        loads (as spdk_tgt does): wait for the load to end, so a test's
        first RPC sees the configured bdevs. A failed load is the test's
        to see (no wait beyond the process's exit or the deadline)."""
        if self.argv[0] != str(TGT_BIN) or not {"--json", "-c"} & set(self.extra_args):
            return   # only clone_tgt says "clone_tgt started"
        while time.monotonic() < deadline and self.proc.poll() is None:
            log = self.log()
            if "clone_tgt started" in log or "loading --json config failed" in log:
                return
            time.sleep(0.02)

    def wait_exit(self, timeout=STOP_TIMEOUT):
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail("clone_tgt (pid %d) still running %.0f s after being told to stop:\n%s"
                        % (self.proc.pid, timeout, self.log()), pytrace=False)
        self._close_client()
        return self.returncode

    def stop(self, how="rpc", timeout=STOP_TIMEOUT):
        """Shut down cleanly: how = "rpc" (spdk_kill_instance SIGTERM), "rpc-SIGINT",
        "SIGTERM" or "SIGINT" (os.kill). Asserts exit 0 and that the socket
        and its lock file are gone."""
        if how == "rpc":
            self.rpc("spdk_kill_instance", sig_name="SIGTERM")
        elif how == "rpc-SIGINT":
            self.rpc("spdk_kill_instance", sig_name="SIGINT")
        else:
            os.kill(self.proc.pid, getattr(signal, how))
        rc = self.wait_exit(timeout)
        assert rc == 0, "clone_tgt exited %s after %s:\n%s" % (rc, how, self.log())
        assert not self.sock.exists(), "socket %s left behind after %s" % (self.sock, how)
        assert not self.lock.exists(), "lock file %s left behind after %s" % (self.lock, how)
        return rc

    def kill(self):
        """Teardown: make sure the process is gone (SIGTERM, then SIGKILL)."""
        self._close_client()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self.returncode is None:
            self.returncode = self.proc.returncode
        try:
            self._log.close()
        except Exception:
            pass
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    # -- RPC ---------------------------------------------------------------

    def client(self):
        if self._client is None:
            self._client = JSONRPCClient(str(self.sock), timeout=RPC_TIMEOUT)
        return self._client

    def _close_client(self):
        if self._client is not None:
            try:
                self._client.close()
            except OSError:
                pass
            self._client = None

    def rpc(self, method, **params):
        """Call `method` with SPDK's client; raises JSONRPCException on an error reply."""
        try:
            return self.client().call(method, params)
        except JSONRPCException as e:
            if "response:\n" not in e.message:
                # Transport trouble (timeout, closed): the connection is unusable.
                self._close_client()
            raise

    def rpc_err(self, method, **params):
        """Call `method`, expect an error reply; return (code, message)."""
        try:
            result = self.client().call(method, params)
        except JSONRPCException as e:
            if "response:\n" not in e.message:
                self._close_client()
                raise AssertionError("%s: no JSON-RPC reply: %s" % (method, e.message))
            return parse_rpc_error(e)
        raise AssertionError("%s %s succeeded (result %r), expected an error"
                             % (method, json.dumps(params), result))

    def cli(self, *args, check=True, input=None, timeout=60):
        """Run the real `spdk-rpc -s SOCK ARGS...`; returns CompletedProcess."""
        if SPDK_RPC is None:
            pytest.fail("spdk-rpc not found: run bash scripts/test.sh to create .venv", pytrace=False)
        cmd = [str(SPDK_RPC), "-s", str(self.sock)] + [str(a) for a in args]
        cp = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                            **({} if input is not None else {"stdin": subprocess.DEVNULL}))
        if check and cp.returncode != 0:
            raise AssertionError("%s exited %d\nstdout:\n%s\nstderr:\n%s"
                                 % (" ".join(cmd), cp.returncode, cp.stdout, cp.stderr))
        return cp

    # -- helpers -----------------------------------------------------------

    def bdevs(self):
        return {b["name"]: b for b in self.rpc("bdev_get_bdevs")}

    def bdev(self, name):
        got = self.rpc("bdev_get_bdevs", name=name)
        assert isinstance(got, list) and len(got) == 1, got
        return got[0]


# ---------------------------------------------------------------------------
# fixtures


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if CI and rep.skipped and not hasattr(rep, "wasxfail"):
        # Whatever skipped it (a mark, a fixture, pytest.skip): CI runs every test.
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = "skipped under CI=true, which must run every test: %s" % reason
    if rep.failed:
        for t in getattr(item, "_clone_targets", []):
            rep.sections.append(("clone_tgt log (%s, pid %s, exit %s)"
                                 % (t.name, t.proc.pid if t.proc else "-",
                                    t.proc.poll() if t.proc else "-"),
                                 t.log()[-20000:]))


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


@contextlib.contextmanager
def scratch_dir(prefix):
    """A short-path temporary directory (socket paths fit), removed after."""
    d = short_tmpdir(prefix)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def datadir():
    """A directory for backing files where O_DIRECT works (/var/tmp is on disk)."""
    with scratch_dir("ctgt-data-") as d:
        yield d


@pytest.fixture
def tgt_factory(request, workdir):
    """start(*extra_args, wait=True, sock=None, name=None, rpc_server=True, mask="0x1")
    -> Target"""
    started = []
    request.node._clone_targets = started

    def start(*args, wait=True, sock=None, name=None, rpc_server=True, mask="0x1"):
        t = Target(workdir, args=args, sock=sock, name=name or "tgt%d" % len(started),
                   rpc_server=rpc_server, mask=mask)
        started.append(t)
        return t.start(wait=wait)

    yield start
    for t in reversed(started):
        t.kill()


@pytest.fixture
def tgt(tgt_factory):
    return tgt_factory()


@pytest.fixture
def tgt2_factory(tgt_factory):
    """start(args=(), sock=None) -> a Target on two reactors (so a host's
    queues and a clone's regions land on different reactors)."""
    return lambda args=(), sock=None: tgt_factory(*args, sock=sock, mask="0x3")


@pytest.fixture
def tgt2(tgt2_factory):
    return tgt2_factory()


# ---------------------------------------------------------------------------
# bdevperf


class PerfResult:
    """A bdevperf run: exit code, output, and the numbers of its `Total` row."""

    NUM = r"(-?[0-9]+(?:\.[0-9]+)?)"

    def __init__(self, cp, argv):
        self.argv = argv
        self.returncode = cp.returncode
        self.stdout = cp.stdout
        self.stderr = cp.stderr
        self.total = self._parse_total()
        self.jobs = self._parse_jobs()
        self.percentiles = self._parse_percentiles()

    @property
    def output(self):
        return self.stdout + "\n" + self.stderr

    def _parse_total(self):
        # SPDK's row: "Total : IOPS MiB/s Fail/s TO/s Average min max"
        for line in reversed(self.output.splitlines()):
            m = re.match(r"^\s*Total\s*:\s*(.*)$", line)
            if not m:
                continue
            nums = [float(x) for x in re.findall(self.NUM, m.group(1))]
            if len(nums) >= 7:
                keys = ("iops", "mibps", "fail_per_s", "timeout_per_s", "avg_lat_us",
                        "min_lat_us", "max_lat_us")
                return dict(zip(keys, nums[:7]))
        return None

    def _parse_percentiles(self):
        # -l: "Summary latency data for <bdev> from core N:" then "  99.00000% :  25.343us"
        out, cur = {}, None
        for line in self.stdout.splitlines():
            m = re.match(r"^Summary latency data for (\S+) from core \d+:", line)
            if m:
                cur = out.setdefault(m.group(1), {})
                continue
            m = re.match(r"^\s*([0-9.]+)% :\s*([0-9.]+)us$", line)
            if m and cur is not None:
                cur[float(m.group(1))] = float(m.group(2))
        return out

    def _parse_jobs(self):
        # per-job row: "NAME : runtime IOPS MiB/s Fail/s TO/s Average min max"
        jobs = {}
        row = re.compile(r"^\s*(\S+)\s*:\s*((?:%s\s+){7}%s)\s*$" % (self.NUM, self.NUM))
        for line in self.output.splitlines():
            m = row.match(line)
            if not m or m.group(1) == "Total":
                continue
            nums = [float(x) for x in m.group(2).split()]
            jobs[m.group(1)] = dict(zip(("runtime_s", "iops", "mibps", "fail_per_s", "timeout_per_s",
                                         "avg_lat_us", "min_lat_us", "max_lat_us"), nums))
        return jobs

    def describe(self):
        return ("$ %s\nexit %s\n--- stdout ---\n%s\n--- stderr ---\n%s"
                % (" ".join(self.argv), self.returncode, self.stdout[-8000:], self.stderr[-8000:]))


def write_bdev_config(path, methods):
    """A --json file with one "bdev" subsystem holding `methods` [(method, params)]."""
    config = [{"method": m, "params": p} if p is not None else {"method": m} for m, p in methods]
    doc = {"subsystems": [{"subsystem": "bdev", "config": config}]}
    Path(path).write_text(json.dumps(doc, indent=2))
    return path


def run_bdevperf(config, *args, timeout=None, secs=None):
    require_binaries(PERF_BIN)
    secs = PERF_SECS if secs is None else secs
    argv = [str(PERF_BIN), "--json", str(config), "--interrupt-mode", "-t", str(secs)]
    argv += [str(a) for a in args]
    env = dict(os.environ, NO_COLOR="1", RUST_BACKTRACE="1")
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                            timeout=timeout if timeout is not None else secs + 30)
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        raise AssertionError("bdevperf (-t %s) still running after %s s; killed.\n$ %s\n"
                             "stdout:\n%s\nstderr:\n%s"
                             % (secs, e.timeout, " ".join(argv), text(e.stdout)[-8000:],
                                text(e.stderr)[-8000:]))
    return PerfResult(cp, argv)


# ---------------------------------------------------------------------------
# a raw JSON-RPC connection (no SPDK library): bytes in, JSON values out


class RawConn:
    """A plain AF_UNIX stream client that decodes concatenated JSON values."""

    def __init__(self, path, timeout=10.0):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(str(path))
        self.timeout = timeout
        self.text = ""      # received, not yet decoded
        self.raw = b""      # everything received
        self.eof = False

    def send(self, data):
        if isinstance(data, (dict, list)):
            data = json.dumps(data)
        if isinstance(data, str):
            data = data.encode()
        self.s.sendall(data)

    def shutdown_write(self):
        self.s.shutdown(socket.SHUT_WR)

    def _fill(self, timeout):
        """Read once; False on timeout; sets eof on orderly close."""
        self.s.settimeout(timeout)
        try:
            data = self.s.recv(65536)
        except socket.timeout:
            return False
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.raw += data
        self.text += data.decode("utf-8", errors="replace")
        return True

    def _decode(self):
        stripped = self.text.lstrip()
        if not stripped:
            return None
        try:
            value, idx = json.JSONDecoder().raw_decode(stripped)
        except ValueError:
            return None
        self.text = stripped[idx:]
        return (value,)

    def recv(self, timeout=None):
        """The next complete JSON value (fails the test on timeout or close)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            got = self._decode()
            if got is not None:
                return got[0]
            if self.eof:
                raise AssertionError("connection closed; partial data %r" % self.text)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no complete reply within %.1f s; partial data %r"
                                     % (timeout, self.text))
            self._fill(left)

    def request(self, data, timeout=None):
        self.send(data)
        return self.recv(timeout)

    def silent_for(self, secs):
        """True if nothing (not even a close) arrives within `secs`."""
        if self.text.strip():
            return False
        deadline = time.monotonic() + secs
        while time.monotonic() < deadline:
            if self._fill(deadline - time.monotonic()):
                return False
            if self.eof:
                return False
        return True

    def read_until_closed(self, timeout=None):
        """Everything that arrives until the peer closes; fails on timeout."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("peer did not close within %.1f s; got %r" % (timeout, self.raw))
            self._fill(left)
        return self.raw

    def closed_by_peer(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._fill(deadline - time.monotonic())
        return self.eof

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


@pytest.fixture
def raw(tgt):
    """open() -> RawConn to the `tgt` fixture's socket; all closed at teardown."""
    conns = []

    def open_conn(timeout=10.0):
        c = RawConn(tgt.sock, timeout)
        conns.append(c)
        return c

    yield open_conn
    for c in conns:
        c.close()
