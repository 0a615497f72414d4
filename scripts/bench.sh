#!/usr/bin/env bash
# Benchmarks of the foundation, side by side with a raw baseline in one run.
#   1. bdevperf 4 KiB randread QD32 on one core, malloc bdev (busy-polling).
#   2. uring bdev on a file vs fio --ioengine=io_uring on the same file,
#      same queue depth, O_DIRECT.
#   3. message ring throughput between two reactors (criterion).
#   4. the clone bdev: scripts/bench_clone.sh b d (its own table).
#   5. the data path (its figures in one table, each beside its
#      baseline from the same run): scripts/bench_datapath.py p99 - malloc,
#      delay 0 and a hydrated clone over malloc, and bench_clone's (a) and
#      (c) rows. NVMe/TCP figures: scripts/bench_nvmf.sh (two free cores).
# Figures only: nothing here asserts a speed.
set -euo pipefail
. "$(dirname "$0")/common.sh"

SECS="${BENCH_SECONDS:-10}"
WORK="${BENCH_DIR:-/var/tmp/clone-tgt-bench}"
FILE_MB="${BENCH_FILE_MB:-1024}"
mkdir -p "$WORK"
command -v fio >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null
}
build_release >/dev/null
BDEVPERF="$ROOT/target/release/bdevperf"

total_iops() { awk '/^ *Total/ {print $3}' "$1"; }

echo "== 1. bdevperf, malloc, 4 KiB randread, QD32, one core, ${SECS}s"
cat >"$WORK/malloc.json" <<'EOF'
{"subsystems":[{"subsystem":"bdev","config":[
  {"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":262144,"block_size":4096}}]}]}
EOF
"$BDEVPERF" --json "$WORK/malloc.json" -m 0x1 -q 32 -o 4096 -w randread -t "$SECS" | tee "$WORK/malloc.out"
echo "malloc randread IOPS: $(total_iops "$WORK/malloc.out")"

echo
echo "== 2. uring bdev vs fio io_uring, same file, 4 KiB randread, QD32, O_DIRECT, ${SECS}s"
IMG="$WORK/bench.img"
if [ ! -f "$IMG" ] || [ "$(stat -c %s "$IMG")" -ne $((FILE_MB << 20)) ]; then
    # Real data, not a sparse file: reads of holes never reach the disk.
    dd if=/dev/urandom of="$IMG" bs=1M count="$FILE_MB" status=none
fi
cat >"$WORK/uring.json" <<EOF
{"subsystems":[{"subsystem":"bdev","config":[
  {"method":"bdev_uring_create","params":{"name":"Uring0","filename":"$IMG","block_size":4096}}]}]}
EOF
"$BDEVPERF" --json "$WORK/uring.json" -m 0x1 -q 32 -o 4096 -w randread -t "$SECS" | tee "$WORK/uring.out"
fio --name=baseline --filename="$IMG" --ioengine=io_uring --direct=1 --rw=randread --bs=4k \
    --iodepth=32 --numjobs=1 --runtime="$SECS" --time_based --group_reporting \
    --output-format=json >"$WORK/fio.json"
URING=$(total_iops "$WORK/uring.out")
FIO=$("$VENV/bin/python" -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"],2))' "$WORK/fio.json" 2>/dev/null ||
    python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"],2))' "$WORK/fio.json")
echo "uring bdev IOPS: $URING   fio io_uring IOPS: $FIO   ratio: $(python3 -c "print(round($URING/$FIO, 3))")"

echo
echo "== 3. message ring, reactor 1 -> reactor 0"
(cd "$ROOT" && cargo bench -p reactor --bench msg_ring 2>/dev/null | grep -E "msg_ring|time:|thrpt:")

echo
echo "== 4. the clone bdev (scripts/bench_clone.sh b d; a and c are in 5)"
BENCH_SECONDS="$SECS" "$ROOT/scripts/bench_clone.sh" b d

echo
echo "== 5. the data path (scripts/bench_datapath.py)"
ensure_venv
BENCH_SECONDS="$SECS" "$VENV/bin/python" "$ROOT/scripts/bench_datapath.py" p99
