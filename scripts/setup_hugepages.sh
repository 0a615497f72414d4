#!/usr/bin/env bash
# Reserve 2 MiB hugepages for clone_tgt's DMA buffer pool.
#
#   scripts/setup_hugepages.sh [N]     (default 512 pages = 1 GiB; 0 releases them)
#
# Optional: without hugepages the target falls back to ordinary pages and logs
# a warning (and --no-huge asks for that explicitly). Needs root.
set -euo pipefail

N=${1:-${NRHUGE:-512}}
if ! [[ "$N" =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [number of 2 MiB pages]" >&2
    exit 2
fi

KNOB=/proc/sys/vm/nr_hugepages
if [[ ! -e $KNOB ]]; then
    echo "this kernel has no hugepage support ($KNOB missing)" >&2
    exit 1
fi
hp_size_kb=$(awk '/^Hugepagesize:/ {print $2}' /proc/meminfo)
if [[ -n "$hp_size_kb" && "$hp_size_kb" != 2048 ]]; then
    echo "note: the default hugepage size here is ${hp_size_kb} kB, not 2048 kB" >&2
fi

before=$(cat "$KNOB")
# Compacting memory first makes a large reservation more likely to succeed.
if [[ -w /proc/sys/vm/compact_memory ]]; then
    echo 1 > /proc/sys/vm/compact_memory 2>/dev/null || true
fi
if ! echo "$N" > "$KNOB" 2>/dev/null; then
    echo "cannot write $KNOB (are you root?); hugepages stay at $before" >&2
    exit 1
fi
granted=$(cat "$KNOB")

free_pages=$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo)
echo "hugepages (${hp_size_kb:-2048} kB): requested $N, granted $granted (was $before), free $free_pages"

if [[ ! -d /dev/hugepages ]] || ! grep -qs ' /dev/hugepages hugetlbfs ' /proc/mounts; then
    echo "note: no hugetlbfs at /dev/hugepages; clone_tgt maps hugepages with MAP_HUGETLB and does not need it"
fi

if (( granted < N )); then
    echo "warning: only $granted of $N pages could be reserved (memory fragmented?);" \
         "clone_tgt uses ordinary pages for the rest" >&2
fi
