#!/usr/bin/env bash
# The clone bdev's benchmarks, each beside its baseline in one run, ending
# with a table (scripts/bench_clone.py has the details):
#   a. 4 KiB randread/randwrite QD32, hydrated clone vs raw destination
#   b. hydration throughput from a delayed source vs the rate limit
#   c. 4 KiB randread p99 while a hydration runs vs idle
#   d. create / resume time for a 1 TiB sparse source at 4 KiB regions
#   e. clone_tgt RSS per region for that clone
#   f. hydration over a slow shared link (2 ms / 10 ms, 100 MiB/s) with a
#      4 KiB QD32 reader over NVMe/TCP, beside QEMU's block-stream over the
#      same link (nbdkit + qemu-storage-daemon); scripts/bench_link.py
# Arguments pick benchmarks (e.g. `bench_clone.sh a c`); default a-e (f only
# when named: about 10 minutes, needs nbdkit and qemu-storage-daemon).
# Env: BENCH_SECONDS (5; f: 10), BENCH_CLONE_MB (512), BENCH_DIR; f:
# BENCH_LINK_MB (1024), BENCH_LINK_DELAYS_MS ("2 10"), BENCH_LINK_SIDES
# ("clone qemu"). Figures only.
set -euo pipefail
. "$(dirname "$0")/common.sh"
for a in "$@"; do
    [ "$a" = f ] || continue
    for t in nbdkit qemu-storage-daemon qemu-img; do
        command -v "$t" >/dev/null || { echo "bench_clone.sh f needs $t (apt-get install nbdkit qemu-utils; qemu-storage-daemon is in qemu-system-common)" >&2; exit 1; }
    done
done
build_release >/dev/null
ensure_venv
exec "$VENV/bin/python" "$ROOT/scripts/bench_clone.py" "$@"
