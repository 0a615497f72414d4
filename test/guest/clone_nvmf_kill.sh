#!/bin/bash
# Runs inside the linux-guest VM (see test/test_clone_nvmf.py): the Linux
# NVMe/TCP host keeps using a hydrating clone while the host test kills
# clone_tgt with SIGKILL and restarts it from its saved config.
#   clone_nvmf_kill.sh PORT NQN SRC_SHA256
# /mnt/share: common.sh (test/guest/common.sh), writes.txt ("FILE OFFSET"
# patterns), written / reads-N (here),
# restarted (host: clone_tgt is back), released (host: hydrated, source released).
set -u
PORT=$1 NQN=$2 SRC_SHA=$3
# test/guest/common.sh: HOST, SH, fails, step, ok, bad, check, sha
. /mnt/share/common.sh || exit 1
state() { cat /sys/class/nvme/nvme0/state 2>/dev/null; }

step "connect (reconnect every second, give up after 120 s)"
modprobe nvme-tcp || exit 1
nvme connect -t tcp -a $HOST -s "$PORT" -n "$NQN" --reconnect-delay=1 --ctrl-loss-tmo=120 \
  || { bad connect; exit 1; }
for _ in $(seq 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.2; done
A=/dev/nvme0n1
[ -b $A ] && ok connect || { bad connect; exit 1; }
size=$(blockdev --getsize64 $A)

step "the clone reads as the source; pattern writes, flush, read back"
got=$(sha $A)
[ "$got" = "$SRC_SHA" ] && ok sha-source || bad sha-source "$got != $SRC_SHA"
while read -r f o; do
  dd if="$SH/$f" of=$A bs=512 seek=$((o / 512)) oflag=direct conv=notrunc status=none || bad "write-$f"
done <"$SH/writes.txt"
sync
blockdev --flushbufs $A || bad flushbufs
dd if=$A of=/tmp/img bs=1M iflag=direct status=none || bad img
touch $SH/written

step "reads (each compared) go on while clone_tgt is killed and restarted"
n=0 after=0 errs=0
t0=$(date +%s)
while [ $after -lt 3 ]; do
  mb=$(( (RANDOM * 32768 + RANDOM) % (size / 1048576) ))
  if ! dd if=$A bs=1M skip=$mb count=1 iflag=direct status=none | \
       cmp -s - <(dd if=/tmp/img bs=1M skip=$mb count=1 status=none); then
    errs=$((errs + 1)); echo "read of MiB $mb failed or differs (state $(state))"
  fi
  n=$((n + 1))
  echo $n >$SH/reads
  [ -e $SH/restarted ] && [ "$(state)" = live ] && after=$((after + 1))
  [ $(($(date +%s) - t0)) -lt 150 ] || { bad restart-timeout; break; }
done
echo "reads: $n, failed: $errs"
[ $errs = 0 ] && ok reads-across-kill || bad reads-across-kill "$errs of $n"
dmesg | grep -q "Successfully reconnected" && ok saw-reconnect || bad saw-reconnect
got=$(sha $A)
want=$(sha256sum </tmp/img | cut -d' ' -f1)
[ "$got" = "$want" ] && ok sha-after-restart || bad sha-after-restart

step "until hydrated (host), then once more"
for _ in $(seq 600); do [ -e $SH/released ] && break; sleep 0.2; done
[ -e $SH/released ] || bad released-timeout
got=$(sha $A)
[ "$got" = "$want" ] && ok sha-after-release || bad sha-after-release

step "disconnect"
nvme disconnect -n "$NQN" && ok disconnect || bad disconnect
dmesg | grep -iE "nvme" | tail -n 15
if dmesg | grep -iE "I/O error|Buffer I/O|blk_update_request"; then bad dmesg-no-io-error; else ok dmesg-no-io-error; fi
echo "failures: $fails"
exit $fails
