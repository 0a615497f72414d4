#!/usr/bin/env bash
# The main job on local files, nothing to set up beyond the Rust toolchain:
# build, start clone_tgt, build a bdev stack with SPDK's own rpc.py
# (spdk-rpc from PyPI), save the config, and push verified I/O through every
# bdev with bdevperf from that saved config.
set -euo pipefail
. "$(dirname "$0")/common.sh"

WORK="${DEMO_DIR:-/var/tmp/clone-tgt-demo}"
SOCK="$WORK/spdk.sock"
SECS="${DEMO_SECONDS:-3}"
rm -rf "$WORK" && mkdir -p "$WORK"

step() { printf '\n== %s\n' "$*"; }

step "building (cargo build --release)"
build_release >/dev/null 2>"$WORK/build.log" || { cat "$WORK/build.log"; exit 1; }
step "installing SPDK's rpc.py (pip install spdk==$SPDK_PY_VERSION into .venv)"
ensure_venv
RPC=("$VENV/bin/spdk-rpc" -s "$SOCK")

step "starting clone_tgt (-m 0x1 --interrupt-mode -r $SOCK)"
"$ROOT/target/release/clone_tgt" -m 0x1 --interrupt-mode -r "$SOCK" >"$WORK/clone_tgt.log" 2>&1 &
TGT=$!
trap 'kill $TGT 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.05; done
"${RPC[@]}" framework_wait_init >/dev/null

step "a 64 MiB data file, served through io_uring (bdev_uring_create)"
truncate -s 64M "$WORK/data.img"
"${RPC[@]}" bdev_uring_create "$WORK/data.img" Uring0 4096
step "a 64 MiB RAM disk behind a delay bdev emulating a remote, 500 us away"
"${RPC[@]}" bdev_malloc_create -b Malloc0 64 4096
"${RPC[@]}" bdev_delay_create -b Malloc0 -d Remote0 -r 500 -t 1000 -w 500 -n 1000
step "the stack as SPDK users see it (bdev_get_bdevs, abridged)"
"${RPC[@]}" bdev_get_bdevs >"$WORK/bdevs.json"
"$VENV/bin/python" - "$WORK/bdevs.json" <<'PY'
import json, sys
for b in json.load(open(sys.argv[1])):
    size_mib = b["num_blocks"] * b["block_size"] >> 20
    claim = b.get("claim_type", "-")
    print(f"  {b['name']:<8} {b['product_name']:<12} {size_mib:>4} MiB  claim: {claim}")
PY

step "saving the config (spdk-rpc save_config) and stopping the target"
"${RPC[@]}" save_config >"$WORK/config.json"
"${RPC[@]}" spdk_kill_instance SIGTERM
wait $TGT
trap - EXIT
[ ! -e "$SOCK" ] || { echo "socket left behind"; exit 1; }

step "bdevperf -w verify on every unclaimed bdev of the saved config ($SECS s)"
"$ROOT/target/release/bdevperf" --json "$WORK/config.json" --interrupt-mode -m 0x1 --log-level warn \
    -q 16 -o 4096 -w verify -t "$SECS" | tee "$WORK/bdevperf.log"

step "done"
echo "clone_tgt served SPDK's rpc.py unchanged; the saved config replayed in bdevperf,"
echo "and every block written through Uring0 and Remote0 read back intact."
echo "Files: $WORK (config.json, clone_tgt.log, bdevperf.log)"
