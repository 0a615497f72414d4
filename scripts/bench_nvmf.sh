#!/usr/bin/env bash
# NVMe/TCP benchmark: our host (bdevperf with bdev_nvme_attach_controller)
# against our target (clone_tgt exporting a malloc bdev), one reactor each
# (target -m 0x1, bdevperf -m 0x2), busy-polling, over loopback; side by
# side with bdevperf on the same malloc bdev locally (no network), so the
# cost of the NVMe/TCP path shows in one run.
#   4 KiB randread QD32 (IOPS, p99), 4 KiB randwrite QD32, 128 KiB read QD16.
# Figures only: nothing here asserts a speed. Needs two free cores.
set -euo pipefail
trap 'echo "bench_nvmf.sh: failed at line $LINENO (target log: $WORK/tgt.log)" >&2' ERR
. "$(dirname "$0")/common.sh"

SECS="${BENCH_SECONDS:-10}"
WORK="${BENCH_DIR:-/var/tmp/clone-tgt-bench-nvmf}"
PORT="${BENCH_PORT:-$((20000 + RANDOM % 20000))}"
NQN=nqn.2016-06.io.spdk:bench
mkdir -p "$WORK"
ensure_venv
build_release >/dev/null
TGT="$ROOT/target/release/clone_tgt"
BDEVPERF="$ROOT/target/release/bdevperf"
RPC="$VENV/bin/spdk-rpc -s $WORK/tgt.sock"

MALLOC='{"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":262144,"block_size":4096}}'
cat >"$WORK/local.json" <<EOF
{"subsystems":[{"subsystem":"bdev","config":[$MALLOC]}]}
EOF
cat >"$WORK/nvme.json" <<EOF
{"subsystems":[{"subsystem":"bdev","config":[
  {"method":"bdev_nvme_attach_controller","params":{"name":"Nvme0","trtype":"tcp","adrfam":"ipv4",
   "traddr":"127.0.0.1","trsvcid":"$PORT","subnqn":"$NQN"}}]}]}
EOF

TGT_PID=
cleanup() {
    if [ -n "$TGT_PID" ] && kill -0 "$TGT_PID" 2>/dev/null; then
        kill "$TGT_PID"
        wait "$TGT_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

"$TGT" -m 0x1 -r "$WORK/tgt.sock" >"$WORK/tgt.log" 2>&1 &
TGT_PID=$!
for _ in $(seq 400); do [ -S "$WORK/tgt.sock" ] && break; sleep 0.05; done
[ -S "$WORK/tgt.sock" ] || { echo "clone_tgt did not start (see $WORK/tgt.log)" >&2; exit 1; }
$RPC bdev_malloc_create -b Malloc0 1024 4096 >/dev/null
$RPC nvmf_create_transport -t tcp >/dev/null
$RPC nvmf_create_subsystem "$NQN" -a -s SPDK00000000000001 >/dev/null
$RPC nvmf_subsystem_add_ns "$NQN" Malloc0 >/dev/null
$RPC nvmf_subsystem_add_listener "$NQN" -t tcp -a 127.0.0.1 -s "$PORT" -f ipv4 >/dev/null

iops() { awk '/^ *Total/ {print $3}' "$1"; }
mibs() { awk '/^ *Total/ {print $4}' "$1"; }
p99() { awk '/^ *99.00000% :/ {sub("us","",$3); print $3; exit}' "$1"; }

run() { # name config bdevperf-args...
    local name=$1 cfg=$2
    shift 2
    "$BDEVPERF" --json "$cfg" -m 0x2 -t "$SECS" -l "$@" >"$WORK/$name.out" 2>&1
}

printf "%-34s %12s %10s %10s\n" "run (${SECS}s each)" "IOPS" "MiB/s" "p99 us"
for spec in "randread 4096 32" "randwrite 4096 32" "read 131072 16"; do
    set -- $spec
    for where in local nvme; do
        name="$where-$1-$2"
        run "$name" "$WORK/$where.json" -w "$1" -o "$2" -q "$3"
        printf "%-34s %12s %10s %10s\n" "$where $1 $(( $2 / 1024 ))KiB QD$3" \
            "$(iops "$WORK/$name.out")" "$(mibs "$WORK/$name.out")" "$(p99 "$WORK/$name.out")"
    done
done
echo "(local = bdevperf on the malloc bdev in-process; nvme = bdevperf -m 0x2 -> NVMe/TCP loopback -> clone_tgt -m 0x1 -> malloc)"
echo "outputs: $WORK/*.out"
