#!/usr/bin/env bash
# The project's one test command (CI runs it through .ci/run).
#
#   1. install what is missing (Debian packages, a Python venv with SPDK's client)
#   2. cargo build --release --workspace --bins
#   3. cargo test --release --workspace            (unit tests)
#   4. .venv/bin/pytest -v test/                    (end-to-end, against the built binaries;
#                                                     the Linux guest of test/vm/ is built first)
#
# CI=true shrinks sizes and durations (CLONE_TGT_TEST_SCALE=small); every
# test still runs, and a test that cannot run (missing tool, no guest image)
# fails instead of skipping. Extra arguments are passed to pytest (e.g. -k wire, -x).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

SPDK_PY_VERSION=26.9
VENV="$ROOT/.venv"
START=$SECONDS

banner() {
    printf '\n==============================================================================\n'
    printf '== %s\n' "$*"
    printf '==============================================================================\n'
}

die() {
    printf '\nFAILED: %s\n' "$*" >&2
    exit 1
}

if [[ "${CI:-}" == "true" ]]; then
    export CLONE_TGT_TEST_SCALE="${CLONE_TGT_TEST_SCALE:-small}"
fi
export CLONE_TGT_TEST_SCALE="${CLONE_TGT_TEST_SCALE:-normal}"
# Readable Rust panics in the target's logs; no colour codes in captured output.
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
export NO_COLOR=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# ---------------------------------------------------------------------------
banner "1/5 system packages"

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo -n)
    fi
fi

APT_UPDATED=0
apt_install() {
    # apt_install PKG...: install quietly; 'apt-get update' at most once per run.
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "apt-get not available; cannot install: $*" >&2
        return 1
    fi
    local out
    out=$(mktemp)
    if [[ $APT_UPDATED -eq 0 ]]; then
        echo "apt-get update"
        if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$out" 2>&1; then
            cat "$out" >&2
            rm -f "$out"
            return 1
        fi
        APT_UPDATED=1
    fi
    echo "apt-get install $*"
    if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "$@" >"$out" 2>&1; then
        cat "$out" >&2
        rm -f "$out"
        return 1
    fi
    rm -f "$out"
}

have_deb() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

# util-linux (losetup) is needed by tests that put a bdev on a loop device.
if ! command -v losetup >/dev/null 2>&1; then
    apt_install util-linux || die "cannot install util-linux (losetup)"
fi
# fio is for the benchmarks; the tests do not need it, so a failure only warns.
if ! command -v fio >/dev/null 2>&1; then
    apt_install fio || echo "warning: fio could not be installed (benchmarks only; tests go on)" >&2
fi

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || apt_install python3 || die "no python3"
venv_works() {
    local d
    d=$(mktemp -d)
    if "$PY" -m venv "$d/v" >/dev/null 2>&1 && [[ -x "$d/v/bin/python" ]]; then
        rm -rf "$d"
        return 0
    fi
    rm -rf "$d"
    return 1
}
if [[ ! -x "$VENV/bin/python" ]] && ! venv_works; then
    # Debian's python3 needs python3-venv (and ensurepip) for 'python3 -m venv'.
    pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
    apt_install python3-venv || true
    if [[ -n "$pyver" ]] && ! venv_works; then
        apt_install "python${pyver}-venv" || true
    fi
    venv_works || die "'$PY -m venv' does not work even after installing python3-venv"
fi
echo "system packages: ok ($(command -v losetup), fio: $(command -v fio || echo none))"

# ---------------------------------------------------------------------------
banner "2/5 Python venv (.venv: spdk==$SPDK_PY_VERSION, pytest)"

venv_ok() {
    [[ -x "$VENV/bin/python" && -x "$VENV/bin/pytest" && -x "$VENV/bin/spdk-rpc" ]] || return 1
    "$VENV/bin/python" - "$SPDK_PY_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import pytest  # noqa: F401
import spdk.rpc.client  # noqa: F401
sys.exit(0 if version("spdk") == sys.argv[1] else 1)
EOF
}

if venv_ok; then
    echo "venv up to date: $("$VENV/bin/python" --version), spdk $SPDK_PY_VERSION, pytest $("$VENV/bin/python" -c 'import pytest; print(pytest.__version__)')"
else
    if [[ -d "$VENV" && ! -x "$VENV/bin/python" ]] || { [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c '' 2>/dev/null; }; then
        echo "removing a broken venv"
        rm -rf "$VENV"
    fi
    [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "spdk==$SPDK_PY_VERSION" pytest \
        || die "pip install spdk==$SPDK_PY_VERSION pytest"
    venv_ok || die "the venv still lacks spdk==$SPDK_PY_VERSION / pytest / spdk-rpc"
    echo "venv ready"
fi

# ---------------------------------------------------------------------------
banner "3/5 cargo build --release --workspace --bins"
cargo build --release --workspace --bins || die "cargo build"
for b in clone_tgt bdevperf clonectl clone_workload; do
    [[ -x "target/release/$b" ]] || die "target/release/$b was not built"
done

# ---------------------------------------------------------------------------
banner "4/5 cargo test --release --workspace (unit tests)"
# A unit-test failure does not stop the end-to-end stage (more to learn from
# one run); the script still fails at the end.
FAILED_STAGES=()
if ! cargo test --release --workspace; then
    echo "cargo test FAILED (continuing with the end-to-end tests)" >&2
    FAILED_STAGES+=("cargo test")
fi

# ---------------------------------------------------------------------------
# The real Linux NVMe/TCP host for test/test_nvmf_linux.py and
# test/test_clone_nvmf.py: a QEMU guest built by test/vm/linux-guest (it
# installs qemu and its other host packages, fetches Debian packages with
# apt-get download and caches the image). A failed build fails the run; the
# guest tests then fail too (under CI) rather than skip.
echo "linux-guest: building/checking the guest image"
if ! test/vm/linux-guest build; then
    FAILED_STAGES+=("linux-guest build")
fi

# ---------------------------------------------------------------------------
banner "5/5 pytest -v test/ (end-to-end; CLONE_TGT_TEST_SCALE=$CLONE_TGT_TEST_SCALE)"
set +e
"$VENV/bin/pytest" -v test/ "$@"
rc=$?
set -e
case $rc in
    0) ;;
    5) FAILED_STAGES+=("pytest collected no tests (exit 5): the end-to-end suite did not run") ;;
    *) FAILED_STAGES+=("pytest exited $rc") ;;
esac

if [[ ${#FAILED_STAGES[@]} -gt 0 ]]; then
    banner "FAILED after $((SECONDS - START)) s"
    printf '  - %s\n' "${FAILED_STAGES[@]}" >&2
    exit 1
fi
banner "all stages passed in $((SECONDS - START)) s"
