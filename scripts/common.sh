# Shared by the scripts: repo root, the Python venv with SPDK's rpc.py
# (PyPI package `spdk`), and building the binaries.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
SPDK_PY_VERSION="26.9"

ensure_venv() {
    if ! "$VENV/bin/python" -c "import spdk, pytest" 2>/dev/null ||
        [ "$("$VENV/bin/pip" show spdk 2>/dev/null | awk '/^Version:/{print $2}')" != "$SPDK_PY_VERSION" ]; then
        if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        fi
        [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q --disable-pip-version-check "spdk==$SPDK_PY_VERSION" pytest
    fi
}

build_release() {
    (cd "$ROOT" && cargo build --release --workspace --bins)
}
