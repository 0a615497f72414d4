#!/usr/bin/env bash
# The main job on local files, nothing to set up beyond the Rust toolchain:
# a writable clone of a slow "remote" source, usable the moment it exists,
# exported over NVMe/TCP, hydrated onto a local file in the background,
# resumed after a restart, then checked block by block.
#
#   1. build (release); SPDK's rpc.py (spdk-rpc) into .venv
#   2. a source file of random data (DEMO_SIZE_MB, default 1024), served by
#      io_uring behind a delay bdev with a remote disk's latencies; a
#      destination file and a metadata file (uring bdevs)
#   3. clone_tgt; the clone created with spdk-rpc --plugin clone_rpc_plugin;
#      exported with SPDK's nvmf_* RPCs on 127.0.0.1
#   4. usable at once: bdevperf, as an NVMe/TCP host (bdev_nvme_attach_
#      controller), runs -w verify on the clone over the network while
#      clone_tgt hydrates it; clonectl status meanwhile
#   5. clone_tgt stopped mid-hydration and started again from its saved
#      config: the clone resumes where it was; clonectl status --watch until
#      hydrated and the source released; clean shutdown
#   6. the destination must equal the source, except the blocks bdevperf wrote
#      through the clone, which must hold exactly bdevperf's pattern for them
#
# Env: DEMO_SIZE_MB (1024), DEMO_SECONDS (verify run, 5), DEMO_KEEP=1 keeps
# the work directory, DEMO_LATENCY_US (source read latency, 2000),
# DEMO_RATE_MBPS (hydration limit, 100 MiB/s: a remote link is shared).
set -euo pipefail
. "$(dirname "$0")/common.sh"
PS4='$ '

SIZE_MB="${DEMO_SIZE_MB:-1024}"
SECS="${DEMO_SECONDS:-5}"
LAT_US="${DEMO_LATENCY_US:-2000}"
RATE="${DEMO_RATE_MBPS:-100}"
REGION_KB=64
[[ "$SIZE_MB" =~ ^[0-9]+$ && "$SIZE_MB" -ge 1 ]] || { echo "DEMO_SIZE_MB must be a positive number of MiB" >&2; exit 2; }

mkdir -p /var/tmp
WORK=$(mktemp -d /var/tmp/clone-demo.XXXXXX) # on disk: O_DIRECT works there
SOCK="$WORK/tgt.sock"
PERF_SOCK="$WORK/perf.sock"
TGT=""
PERF=""
cleanup() {
    local rc=$?
    for p in $PERF $TGT; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
    if [[ $rc -ne 0 ]]; then
        for f in "$WORK"/*.log; do [[ -f "$f" ]] && { echo "--- $f (last lines)"; tail -n 20 "$f"; }; done
    fi
    if [[ "${DEMO_KEEP:-0}" == 1 || $rc -ne 0 ]]; then
        echo "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print('%.2f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$1" "$2"; }
wait_sock() {
    for _ in $(seq 200); do [[ -S "$1" ]] && return 0; kill -0 "$2" 2>/dev/null || return 1; sleep 0.05; done
    return 1
}

step "building (cargo build --release)"
build_release >/dev/null 2>"$WORK/build.log" || { cat "$WORK/build.log"; exit 1; }
step "SPDK's rpc.py (pip install spdk==$SPDK_PY_VERSION into .venv, once)"
ensure_venv
export PYTHONPATH="$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}"
RPC=("$VENV/bin/spdk-rpc" -s "$SOCK")
CLONE_RPC=("$VENV/bin/spdk-rpc" -s "$SOCK" --plugin clone_rpc_plugin)
CLONECTL="$ROOT/target/release/clonectl"

step "a $SIZE_MB MiB source of random data, a destination and a metadata file"
T0=$(now)
dd if=/dev/urandom of="$WORK/source.img" bs=1M count="$SIZE_MB" status=none
truncate -s "${SIZE_MB}M" "$WORK/dest.img"
truncate -s 8M "$WORK/meta.img"
echo "source.img ($SIZE_MB MiB, written in $(elapsed "$T0" "$(now)") s), dest.img (empty), meta.img (8 MiB)"

step "clone_tgt (-m 0x1 --interrupt-mode) and the stack, with spdk-rpc"
"$ROOT/target/release/clone_tgt" -m 0x1 --interrupt-mode -r "$SOCK" >"$WORK/clone_tgt.log" 2>&1 &
TGT=$!
wait_sock "$SOCK" "$TGT" || { echo "clone_tgt did not start"; exit 1; }
"${RPC[@]}" framework_wait_init >/dev/null
set -x
"${RPC[@]}" bdev_uring_create "$WORK/source.img" Source0 4096 >/dev/null
"${RPC[@]}" bdev_delay_create -b Source0 -d Remote0 -r "$LAT_US" -t $((LAT_US * 3)) -w "$LAT_US" -n $((LAT_US * 3)) >/dev/null
"${RPC[@]}" bdev_uring_create "$WORK/dest.img" Dest0 4096 >/dev/null
"${RPC[@]}" bdev_uring_create "$WORK/meta.img" Meta0 4096 >/dev/null
{ set +x; } 2>/dev/null
echo "Remote0: Source0 behind a delay bdev (reads ${LAT_US} us on average, 1 in 100 at $((LAT_US * 3)) us)"

step "creating the clone (spdk-rpc --plugin clone_rpc_plugin bdev_clone_create)"
T_CREATE=$(now)
set -x
"${CLONE_RPC[@]}" bdev_clone_create -b Clone0 -s Remote0 -d Dest0 -m Meta0 -r "$REGION_KB" \
    --hydration-threshold 16 --hydration-batch-size 4 --hydration-mbytes-per-sec "$RATE"
{ set +x; } 2>/dev/null
T_CREATED=$(now)
"$CLONECTL" -s "$SOCK" status
echo "the stack as SPDK users see it (bdev_get_bdevs, abridged):"
"${RPC[@]}" bdev_get_bdevs >"$WORK/bdevs.json"
python3 - "$WORK/bdevs.json" <<'PY'
import json, sys
for b in json.load(open(sys.argv[1])):
    size_mib = b["num_blocks"] * b["block_size"] >> 20
    claim = b.get("claim_type", "-")
    print(f"  {b['name']:<8} {b['product_name']:<12} {size_mib:>5} MiB  claim: {claim}")
PY
# The host's I/O is capped (QoS, saved with the config) so that bdevperf's
# writes cover about a tenth of the clone: the rest must then equal the source.
BLOCKS=$((SIZE_MB * 256))
QOS=$(((BLOCKS / 10 * 2 / SECS) / 1000 * 1000))
[[ $QOS -ge 1000 ]] || QOS=1000
set -x
"${RPC[@]}" bdev_set_qos_limit Clone0 --rw-ios-per-sec "$QOS"
{ set +x; } 2>/dev/null
NQN=nqn.2016-06.io.spdk:clone0
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
step "exporting Clone0 over NVMe/TCP (SPDK's nvmf_* RPCs) on 127.0.0.1:$PORT"
set -x
"${RPC[@]}" nvmf_create_transport -t tcp >/dev/null
"${RPC[@]}" nvmf_create_subsystem "$NQN" -a -s CLONE0 -d clone-tgt >/dev/null
"${RPC[@]}" nvmf_subsystem_add_ns "$NQN" Clone0 >/dev/null
"${RPC[@]}" nvmf_subsystem_add_listener "$NQN" -t tcp -a 127.0.0.1 -s "$PORT" >/dev/null
{ set +x; } 2>/dev/null

step "usable at once: bdevperf as an NVMe/TCP host, -w verify on the clone while it hydrates (${SECS} s, QD16, 4 KiB, at most $QOS IOPS)"
cat >"$WORK/host.json" <<EOF
{"subsystems": [{"subsystem": "bdev", "config": [
  {"method": "bdev_nvme_attach_controller",
   "params": {"name": "Nvme0", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
              "trsvcid": "$PORT", "subnqn": "$NQN"}}]}]}
EOF
echo "bdevperf --json host.json: bdev_nvme_attach_controller -b Nvme0 -t tcp -a 127.0.0.1 -s $PORT -n $NQN -> Nvme0n1"
"$ROOT/target/release/bdevperf" --json "$WORK/host.json" -r "$PERF_SOCK" --interrupt-mode -m 0x1 \
    --log-level warn -T Nvme0n1 -q 16 -o 4096 -w verify -t "$SECS" >"$WORK/bdevperf.log" 2>&1 &
PERF=$!
sleep "$(python3 -c "print(max(0.5, $SECS / 2))")"
echo "meanwhile, in clone_tgt (clonectl status):"
"$CLONECTL" -s "$SOCK" status || true
wait "$PERF" || { cat "$WORK/bdevperf.log"; echo "bdevperf verify FAILED"; exit 1; }
PERF=""
grep -E "^\s*(Job|Nvme0n1|Total)" "$WORK/bdevperf.log" || cat "$WORK/bdevperf.log"
VERIFY_IOPS=$(awk '/^ *Total/ {print $3}' "$WORK/bdevperf.log")

step "stopping clone_tgt while it hydrates (its config saved first)"
"$CLONECTL" -s "$SOCK" status
"${RPC[@]}" save_config >"$WORK/config.json"
"${RPC[@]}" spdk_kill_instance SIGTERM
wait "$TGT" || { echo "clone_tgt exited with an error"; exit 1; }
TGT=""
echo "config saved (bdev_clone_create after its bases, then the nvmf export); clone_tgt stopped cleanly"

step "clone_tgt again from the saved config: the clone resumes and hydrates"
T_RESUME=$(now)
"$ROOT/target/release/clone_tgt" -m 0x1 --interrupt-mode -r "$SOCK" --json "$WORK/config.json" \
    >>"$WORK/clone_tgt.log" 2>&1 &
TGT=$!
wait_sock "$SOCK" "$TGT" || { echo "clone_tgt did not start"; exit 1; }
"${RPC[@]}" framework_wait_init >/dev/null
"$CLONECTL" -s "$SOCK" status
echo "\$ clonectl status Clone0 --watch --interval 0.5"
"$CLONECTL" -s "$SOCK" status Clone0 --watch --interval 0.5
T_HYDRATED=$(now)
"$CLONECTL" -s "$SOCK" status Clone0 --json >"$WORK/status.json"
"${RPC[@]}" spdk_kill_instance SIGTERM
wait "$TGT" || { echo "clone_tgt exited with an error"; exit 1; }
TGT=""

step "checking: destination == source, except the blocks bdevperf wrote through the clone over NVMe/TCP"
python3 - "$WORK/source.img" "$WORK/dest.img" "$WORK/status.json" >"$WORK/check.out" <<'PY'
import json, mmap, struct, sys

# bdevperf's verify pattern (app/src/bin/bdevperf/pattern.rs): per block,
# word 0 = LBA, word 1 = write generation, word i >= 2 = base + i * GOLDEN.
M = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return z ^ (z >> 31)
def rotl32(x):
    return ((x << 32) | (x >> 32)) & M
def is_pattern(block, lba):
    n = len(block) // 8
    lba0, gen = struct.unpack_from("<QQ", block)
    if lba0 != lba:
        return False
    base = mix64(lba ^ rotl32(gen) ^ GOLDEN)
    return block == struct.pack("<%dQ" % n, lba, gen, *[(base + i * GOLDEN) & M for i in range(2, n)])

BS = 4096
CHUNK = 1 << 20
status = json.load(open(sys.argv[3]))[0]
with open(sys.argv[1], "rb") as fs, open(sys.argv[2], "rb") as fd:
    src = mmap.mmap(fs.fileno(), 0, access=mmap.ACCESS_READ)
    dst = mmap.mmap(fd.fileno(), 0, access=mmap.ACCESS_READ)
    written = other = 0
    for off in range(0, len(src), CHUNK):
        if src[off:off + CHUNK] == dst[off:off + CHUNK]:
            continue
        for b in range(off, min(off + CHUNK, len(src)), BS):
            if src[b:b + BS] != dst[b:b + BS]:
                if is_pattern(dst[b:b + BS], b // BS):
                    written += 1
                else:
                    other += 1
                    if other <= 5:
                        print("MISMATCH at byte %d (block %d)" % (b, b // BS), file=sys.stderr)
print(json.dumps({"blocks": len(src) // BS, "written": written, "other": other,
                  "state": status["state"], "hydrated": status["hydrated_regions"],
                  "regions": status["num_regions"]}))
sys.exit(1 if other or status["state"] != "hydrated" else 0)
PY
CHECK=$(cat "$WORK/check.out")
python3 - "$CHECK" <<'PY'
import json, sys
c = json.loads(sys.argv[1])
print("clone state %s, %d/%d regions hydrated" % (c["state"], c["hydrated"], c["regions"]))
print("%d blocks: %d equal to the source, %d written by bdevperf (its pattern, at its LBA), %d wrong"
      % (c["blocks"], c["blocks"] - c["written"] - c["other"], c["written"], c["other"]))
PY

step "what happened"
CREATE_MS=$(python3 -c "print('%.1f' % ((float('$T_CREATED') - float('$T_CREATE')) * 1000))")
HYD_S=$(elapsed "$T_RESUME" "$T_HYDRATED")
echo "clone of a ${SIZE_MB} MiB remote-like source (${LAT_US} us reads), ${REGION_KB} KiB regions, hydration limited to ${RATE} MiB/s"
echo "  create (spdk-rpc round trip included): ${CREATE_MS} ms; usable at once"
echo "  bdevperf verify over NVMe/TCP while hydrating: ${VERIFY_IOPS} IOPS (QoS cap $QOS) for ${SECS} s, no miscompare"
echo "  restart from the saved config, resume, hydration to 100 % and source released: ${HYD_S} s"
echo "DEMO OK: the destination holds the source plus exactly the writes made through the clone"
