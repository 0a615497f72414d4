#!/bin/bash
# Runs inside the linux-guest VM: the Linux NVMe/TCP host against clone_tgt
# on the host's loopback (10.0.2.2 here).
#   nvmf_linux.sh PORT NQN DISC_PORT
# Prints "### step" markers and "CHECK-OK name" / "CHECK-FAIL name"; exit 0 iff
# every check passed.
set -u
PORT=$1
NQN=$2
DPORT=$3
HOST=10.0.2.2
fails=0

step() { echo; echo "### $*"; }
ok() { echo "CHECK-OK $1"; }
bad() { echo "CHECK-FAIL $1${2:+: $2}"; fails=$((fails + 1)); }
check() { local name=$1; shift; if "$@"; then ok "$name"; else bad "$name"; fi; }

wait_dev() {
  for _ in $(seq 100); do
    for d in /dev/nvme*n1; do [ -b "$d" ] && { echo "$d"; return 0; }; done
    sleep 0.2
  done
  return 1
}

step "modprobe nvme-tcp"
modprobe nvme-tcp || exit 1
modprobe crc32c 2>/dev/null

step "nvme discover (discovery port $DPORT, and the I/O port $PORT)"
out=$(nvme discover -t tcp -a $HOST -s "$DPORT" 2>&1); echo "$out"
check discover-dport grep -q "subnqn: *$NQN" <<<"$out"
check discover-trsvcid grep -q "trsvcid: *$PORT" <<<"$out"
out=$(nvme discover -t tcp -a $HOST -s "$PORT" 2>&1); echo "$out"
check discover-ioport grep -q "subnqn: *$NQN" <<<"$out"

step "nvme connect"
nvme connect -t tcp -a $HOST -s "$PORT" -n "$NQN" --keep-alive-tmo=2 || { bad connect; exit 1; }
dev=$(wait_dev) || { bad namespace-device; dmesg | tail -20; exit 1; }
ok connect
ctrl=${dev%n1}
nvme list
cat /sys/class/nvme/${ctrl#/dev/}/state /sys/class/nvme/${ctrl#/dev/}/transport

step "nvme id-ctrl / id-ns / ns-descs / logs / features"
idc=$(nvme id-ctrl "$ctrl"); echo "$idc" | grep -E '^(vid|sn|mn|fr|mdts|cntlid|ver|kas|sqes|cqes|maxcmd|nn|oncs|vwc|sgls|subnqn|ioccsz|iorcsz|icdoff|cntrltype) '
check id-ctrl-subnqn grep -qE "^subnqn +: $NQN\$" <<<"$idc"
check id-ctrl-mn grep -qE "^mn +: clone-tgt linux" <<<"$idc"
check id-ctrl-oncs grep -qE "^oncs +: 0xc\$" <<<"$idc"
idn=$(nvme id-ns "$dev"); echo "$idn" | grep -E '^(nsze|ncap|nuse|nlbaf|flbas|nguid|lbaf)'
check id-ns-nsze grep -qE "^nsze +: 0x20000\$" <<<"$idn"
check id-ns-lbaf grep -qE "lbaf +0 : ms:0 +lbads:9 +rp:0 \(in use\)" <<<"$idn"
nvme ns-descs "$dev" && ok ns-descs || bad ns-descs
[ -n "$(cat /sys/block/${dev#/dev/}/uuid 2>/dev/null)" ] && ok sysfs-uuid || bad sysfs-uuid
nvme smart-log "$ctrl" >/dev/null && ok smart-log || bad smart-log
nvme error-log "$ctrl" -e 1 >/dev/null && ok error-log || bad error-log
nvme get-feature "$ctrl" -f 7 && ok get-feature-7 || bad get-feature-7
nvme get-feature "$ctrl" -f 0x0f && ok get-feature-kato || bad get-feature-kato
echo "discard_max_bytes: $(cat /sys/block/${dev#/dev/}/queue/discard_max_bytes)"
echo "write_cache: $(cat /sys/block/${dev#/dev/}/queue/write_cache)"

step "dd write/read/compare (in-capsule and R2T writes)"
dd if=/dev/urandom of=/tmp/pat bs=1M count=4 status=none
dd if=/tmp/pat of="$dev" bs=1M count=4 oflag=direct conv=fsync status=none || bad dd-write
dd if="$dev" of=/tmp/back bs=1M count=4 iflag=direct status=none || bad dd-read
check dd-verify cmp /tmp/pat /tmp/back

step "fio verify, 4k..128k, iodepth 32"
fio --name=verify --filename="$dev" --direct=1 --ioengine=libaio --rw=randrw --bsrange=4k-128k \
    --iodepth=32 --size=16M --verify=crc32c --do_verify=1 --eta=never --minimal >/tmp/fio.out 2>&1 \
  && ok fio-verify || { bad fio-verify; cat /tmp/fio.out; }

step "keep-alive: idle 3 x KATO, still live"
sleep 6
[ "$(cat /sys/class/nvme/${ctrl#/dev/}/state)" = live ] && ok ka-live || bad ka-live "$(cat /sys/class/nvme/${ctrl#/dev/}/state)"

step "nvme reset (CC.EN 1->0->1 and a new association)"
dd if="$dev" of=/tmp/pre bs=1M count=4 iflag=direct status=none
nvme reset "$ctrl" && ok reset || bad reset
for _ in $(seq 50); do [ "$(cat /sys/class/nvme/${ctrl#/dev/}/state)" = live ] && break; sleep 0.2; done
dd if="$dev" of=/tmp/back3 bs=1M count=4 iflag=direct status=none
check reset-verify cmp /tmp/pre /tmp/back3

step "out of range read fails"
if nvme read "$dev" -s 131072 -c 0 -z 512 -d /tmp/oob 2>&1; then bad oob-read; else ok oob-read; fi

step "write zeroes (nvme write-zeroes) and discard"
nvme write-zeroes "$dev" -s 0 -c 2047 && ok write-zeroes || bad write-zeroes
dd if="$dev" bs=1M count=1 iflag=direct status=none | cmp - <(head -c 1048576 /dev/zero) \
  && ok zeroes-read || bad zeroes-read
blkdiscard -o 1048576 -l 1048576 "$dev" && ok blkdiscard || bad blkdiscard

step "mkfs.ext4 + mount + write + remount + verify + fstrim"
modprobe ext4
mkfs.ext4 -q -F "$dev" && ok mkfs || bad mkfs
mkdir -p /mnt/t
mount "$dev" /mnt/t && ok mount || bad mount
dd if=/dev/urandom of=/mnt/t/f bs=1M count=3 status=none; sync
sum1=$(md5sum </mnt/t/f)
umount /mnt/t && mount "$dev" /mnt/t || bad remount
sum2=$(md5sum </mnt/t/f)
[ "$sum1" = "$sum2" ] && ok fs-verify || bad fs-verify "$sum1 != $sum2"
rm /mnt/t/f; sync
fstrim -v /mnt/t && ok fstrim || bad fstrim
umount /mnt/t

step "nvme disconnect"
nvme disconnect -n "$NQN" && ok disconnect || bad disconnect
sleep 0.5
[ -e "$ctrl" ] && bad ctrl-gone || ok ctrl-gone

step "connect with header and data digests, dd verify, disconnect"
if nvme connect -t tcp -a $HOST -s "$PORT" -n "$NQN" -g -G; then
  dev=$(wait_dev) || bad digest-device
  dd if=/tmp/pat of="$dev" bs=1M count=4 oflag=direct status=none
  dd if="$dev" of=/tmp/back2 bs=1M count=4 iflag=direct status=none
  check digest-verify cmp /tmp/pat /tmp/back2
  nvme disconnect -n "$NQN" && ok digest-disconnect || bad digest-disconnect
else
  bad digest-connect
fi

dmesg | grep -iE "nvme|error" | tail -n 30
echo "failures: $fails"
exit $fails
