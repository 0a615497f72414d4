#!/usr/bin/env bash
# NVMe/TCP benchmark: our host (bdevperf with bdev_nvme_attach_controller)
# against our target (clone_tgt exporting a malloc bdev), one reactor each
# (target -m 0x1, bdevperf -m 0x2), busy-polling, over loopback; side by
# side with bdevperf on the same malloc bdev locally (no network), so the
# cost of the NVMe/TCP path shows in one run.
#   4 KiB randread QD32 (IOPS, p99), 4 KiB randwrite QD32, 128 KiB read QD16.
# Beside wall-clock IOPS each NVMe/TCP run reports I/Os per CPU-second of the
# two processes together (user + system time of target and host while the
# run lasts): on a shared machine they lose their cores to others for part
# of a run, which the wall figure counts and this one much less.
# BENCH_BIN_DIR=<another build's target/release>: its clone_tgt serves the
# same runs in turn with this build's (same host), BENCH_REPEAT times (3),
# and a last table gives each side's medians. One target runs at a time.
# BENCH_INTERRUPT=1 runs target and host with --interrupt-mode: neither
# spins while it waits, so I/Os per CPU-second is then the cost of the
# path itself, which an overloaded machine moves least.
# Figures only: nothing here asserts a speed. Needs two free cores.
set -euo pipefail
trap 'echo "bench_nvmf.sh: failed at line $LINENO (target log: $WORK/tgt.log)" >&2' ERR
. "$(dirname "$0")/common.sh"

SECS="${BENCH_SECONDS:-10}"
MODE=()
[ -n "${BENCH_INTERRUPT:-}" ] && MODE=(--interrupt-mode)
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
stop_tgt() {
    if [ -n "$TGT_PID" ] && kill -0 "$TGT_PID" 2>/dev/null; then
        kill "$TGT_PID"
        wait "$TGT_PID" 2>/dev/null || true
    fi
    TGT_PID=
}
trap stop_tgt EXIT

start_tgt() { # clone_tgt binary
    rm -f "$WORK/tgt.sock"
    "$1" -m 0x1 "${MODE[@]}" -r "$WORK/tgt.sock" >"$WORK/tgt.log" 2>&1 &
    TGT_PID=$!
    for _ in $(seq 400); do [ -S "$WORK/tgt.sock" ] && break; sleep 0.05; done
    [ -S "$WORK/tgt.sock" ] || { echo "clone_tgt did not start (see $WORK/tgt.log)" >&2; exit 1; }
    $RPC bdev_malloc_create -b Malloc0 1024 4096 >/dev/null
    $RPC nvmf_create_transport -t tcp >/dev/null
    $RPC nvmf_create_subsystem "$NQN" -a -s SPDK00000000000001 >/dev/null
    $RPC nvmf_subsystem_add_ns "$NQN" Malloc0 >/dev/null
    $RPC nvmf_subsystem_add_listener "$NQN" -t tcp -a 127.0.0.1 -s "$PORT" -f ipv4 >/dev/null
}

HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

iops() { awk '/^ *Total/ {print $3}' "$1"; }
mibs() { awk '/^ *Total/ {print $4}' "$1"; }
p99() { awk '/^ *99.00000% :/ {sub("us","",$3); print $3; exit}' "$1"; }

run() { # name config bdevperf-args... ; prints I/Os per CPU-second (nvme runs)
    local name=$1 cfg=$2 t0 t1 cpu
    shift 2
    [ -n "$TGT_PID" ] && t0=$(cpu_ticks "$TGT_PID")
    { time "$BDEVPERF" --json "$cfg" -m 0x2 "${MODE[@]}" -t "$SECS" -l "$@" >"$WORK/$name.out" 2>&1; } \
        2>"$WORK/$name.time"
    [ -n "$TGT_PID" ] || return 0
    t1=$(cpu_ticks "$TGT_PID")
    cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$HZ" '{print $1 + $2 + (b - a) / hz}' "$WORK/$name.time")
    awk -v n="$(iops "$WORK/$name.out")" -v s="$SECS" -v c="$cpu" \
        'BEGIN {printf "%.0f", (c > 0 ? n * s / c : 0)}'
}

median() { sort -g | awk '{v[NR] = $1} END {print NR ? (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) : "-"}'; }

TIMEFORMAT='%U %S'
SPECS=("randread 4096 32" "randwrite 4096 32" "read 131072 16")
BUILDS=(this)
[ -n "${BENCH_BIN_DIR:-}" ] && BUILDS+=(other)
REPEAT="${BENCH_REPEAT:-$([ ${#BUILDS[@]} -gt 1 ] && echo 3 || echo 1)}"
RESULTS="$WORK/results.txt"
: >"$RESULTS"

printf "%-40s %12s %10s %10s %14s\n" "run (${SECS}s each)" "IOPS" "MiB/s" "p99 us" "I/Os per CPU-s"
for rep in $(seq "$REPEAT"); do
    for spec in "${SPECS[@]}"; do
        set -- $spec
        name="local-$1-$2"
        run "$name" "$WORK/local.json" -w "$1" -o "$2" -q "$3"
        printf "%-40s %12s %10s %10s\n" "local $1 $(( $2 / 1024 ))KiB QD$3" \
            "$(iops "$WORK/$name.out")" "$(mibs "$WORK/$name.out")" "$(p99 "$WORK/$name.out")"
        echo "local $1-$2 $(iops "$WORK/$name.out") -" >>"$RESULTS"
    done
    for build in "${BUILDS[@]}"; do
        if [ "$build" = this ]; then start_tgt "$TGT"; else start_tgt "$BENCH_BIN_DIR/clone_tgt"; fi
        for spec in "${SPECS[@]}"; do
            set -- $spec
            name="nvme-$build-$1-$2"
            rate=$(run "$name" "$WORK/nvme.json" -w "$1" -o "$2" -q "$3")
            printf "%-40s %12s %10s %10s %14s\n" "nvme ($build) $1 $(( $2 / 1024 ))KiB QD$3" \
                "$(iops "$WORK/$name.out")" "$(mibs "$WORK/$name.out")" \
                "$(p99 "$WORK/$name.out")" "$rate"
            echo "$build $1-$2 $(iops "$WORK/$name.out") $rate" >>"$RESULTS"
        done
        stop_tgt
    done
done
if [ "$REPEAT" -gt 1 ]; then
    echo
    printf "medians of %s runs %-18s %14s %14s\n" "$REPEAT" "" "IOPS" "I/Os per CPU-s"
    for who in local "${BUILDS[@]}"; do
        for spec in "${SPECS[@]}"; do
            set -- $spec
            k="$1-$2"
            m=$(awk -v w="$who" -v k="$k" '$1 == w && $2 == k {print $3}' "$RESULTS" | median)
            c=$(awk -v w="$who" -v k="$k" '$1 == w && $2 == k {print $4}' "$RESULTS" | median)
            printf "%-38s %14s %14s\n" "$who $1 $(( $2 / 1024 ))KiB QD$3" "$m" "$c"
        done
    done
fi
echo "(local = bdevperf on the malloc bdev in-process; nvme = bdevperf -m 0x2 -> NVMe/TCP loopback -> clone_tgt -m 0x1 -> malloc;"
echo " this = this build's clone_tgt, other = \$BENCH_BIN_DIR's; I/Os per CPU-s: target + host CPU time)"
echo "outputs: $WORK/*.out"
