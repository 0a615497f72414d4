#!/usr/bin/env bash
# The clone against QEMU's qemu-storage-daemon (qcow2 overlay + block-stream)
# over the very same NBD source: one nbdkit `file` source behind its `rate`
# and `delay` filters; both hydrate it, both are exported over NBD and read
# with the same `fio --ioengine=nbd` (scripts/bench_nbd.py has the details):
#   - 4 KiB randread QD16 during hydration (IOPS, p99)
#   - hydration time, idle and with that fio run
#   - 4 KiB randread / randwrite QD16 once hydrated, and fio on a raw file
# Env: BENCH_NBD_MB (512), BENCH_NBD_RATE (nbdkit rate= in bits/s, 400M),
# BENCH_NBD_DELAY (nbdkit rdelay=, 1ms), BENCH_SECONDS (5), BENCH_DIR.
set -euo pipefail
. "$(dirname "$0")/common.sh"
for t in nbdkit qemu-storage-daemon qemu-img fio; do
    command -v "$t" >/dev/null || { echo "bench_nbd.sh needs $t (apt-get install nbdkit libnbd-bin qemu-utils fio; with Debian 12's QEMU 7.2, qemu-storage-daemon is in qemu-system-common)" >&2; exit 1; }
done
build_release >/dev/null
ensure_venv
exec "$VENV/bin/python" "$ROOT/scripts/bench_nbd.py" "$@"
