#!/usr/bin/env bash
# The clone bdev's benchmarks, each beside its baseline in one run, ending
# with a table (scripts/bench_clone.py has the details):
#   a. 4 KiB randread/randwrite QD32, hydrated clone vs raw destination
#   b. hydration throughput from a delayed source vs the rate limit
#   c. 4 KiB randread p99 while a hydration runs vs idle
#   d. create / resume time for a 1 TiB sparse source at 4 KiB regions
#   e. clone_tgt RSS per region for that clone
# Arguments pick benchmarks (e.g. `bench_clone.sh a c`); default all.
# Env: BENCH_SECONDS (5), BENCH_CLONE_MB (512), BENCH_DIR. Figures only.
set -euo pipefail
. "$(dirname "$0")/common.sh"
build_release >/dev/null
ensure_venv
exec "$VENV/bin/python" "$ROOT/scripts/bench_clone.py" "$@"
