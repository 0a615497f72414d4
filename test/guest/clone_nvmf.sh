#!/bin/bash
# Runs inside the linux-guest VM (see test/test_clone_nvmf.py): the Linux
# NVMe/TCP host uses two clones exported by clone_tgt while they hydrate, and
# keeps using them while they switch to pass-through (source released).
#   clone_nvmf.sh PORT NQN SRC_SHA256 FIO1_OFF FIO1_LEN FIO2_OFF FIO2_LEN
# /mnt/share (9p, shared with the host test):
#   common.sh         test/guest/common.sh
#   writes.txt        "PHASE FILE OFFSET" lines: patterns to write to namespace 1
#   connected, phase1-done, loop-count, fio1.bin, fio2.bin, final.sha   (written here)
#   released          (written by the host once both clones are hydrated, the
#                     source released and deleted): the expected sha256 of ns 1
# Prints "CHECK-OK name" / "CHECK-FAIL name"; exit 0 iff every check passed.
set -u
PORT=$1 NQN=$2 SRC_SHA=$3 F1OFF=$4 F1LEN=$5 F2OFF=$6 F2LEN=$7
# test/guest/common.sh: HOST, SH, fails, step, ok, bad, check, sha
. /mnt/share/common.sh || exit 1

# dd a pattern file to ns 1 at a byte offset, or read it back and compare
put() { dd if="$SH/$1" of="$A" bs=512 seek=$(($2 / 512)) oflag=direct conv=notrunc status=none; }
same() {
  local n=$(($(stat -c %s "$SH/$1") / 512))
  dd if="$A" bs=512 skip=$(($2 / 512)) count=$n iflag=direct status=none | cmp -s - "$SH/$1"
}
phase_writes() {
  local ph=$1 p f o
  while read -r p f o; do
    [ "$p" = "$ph" ] || continue
    put "$f" "$o" || bad "write-$f"
  done <"$SH/writes.txt"
  sync
  blockdev --flushbufs "$A" || bad "flushbufs-$ph"
  while read -r p f o; do
    [ "$p" = "$ph" ] || continue
    check "readback-$f" same "$f" "$o"
  done <"$SH/writes.txt"
}
fio_verify() {  # name offset length
  fio --name="$1" --filename="$A" --offset="$2" --size="$3" --direct=1 --ioengine=libaio \
      --rw=randwrite --bsrange=4k-64k --iodepth=16 --verify=crc32c --do_verify=1 \
      --eta=never --minimal >/tmp/$1.out 2>&1 && ok "$1" || { bad "$1"; cat /tmp/$1.out; }
  # the host checks the destination file against what the range holds now
  dd if="$A" of="$SH/$1.bin" bs=64k skip=$(($2 / 65536)) count=$(($3 / 65536)) iflag=direct \
     status=none || bad "$1-copy"
}

step "connect"
modprobe nvme-tcp || exit 1
modprobe crc32c 2>/dev/null
nvme connect -t tcp -a $HOST -s "$PORT" -n "$NQN" || { bad connect; exit 1; }
for _ in $(seq 100); do [ -b /dev/nvme0n1 ] && [ -b /dev/nvme0n2 ] && break; sleep 0.2; done
A=/dev/nvme0n1 B=/dev/nvme0n2
[ -b $A ] && [ -b $B ] || { bad namespaces; ls /dev/nvme*; exit 1; }
ok connect
nvme list
touch $SH/connected

step "phase 1 (hydrating): the clone reads as the source"
got=$(sha $A)
[ "$got" = "$SRC_SHA" ] && ok sha-source || bad sha-source "$got != $SRC_SHA"

step "phase 1: pattern writes (dd oflag=direct), flush, read back"
phase_writes 1

step "phase 1: fio verify on [$F1OFF, +$F1LEN)"
fio_verify fio1 "$F1OFF" "$F1LEN"

step "phase 1: mkfs.ext4 + mount + files on namespace 2"
modprobe ext4
mkdir -p /mnt/b
mkfs.ext4 -q -F $B && ok mkfs || bad mkfs
mount $B /mnt/b && ok mount || bad mount
dd if=/dev/urandom of=/mnt/b/big bs=1M count=4 status=none
for i in $(seq 20); do head -c $((i * 1000)) /dev/urandom >/mnt/b/small$i; done
sync
(cd /mnt/b && md5sum big small*) >/tmp/b.md5

step "phase 1 done; I/O continues until the host says the source is released"
dd if=$A of=/tmp/img1 bs=1M iflag=direct status=none || bad img1
size=$(blockdev --getsize64 $A)
echo 0 >$SH/loop-count
touch $SH/phase1-done
n=0 loopfail=0
t0=$(date +%s)
while [ ! -e $SH/released ]; do
  mb=$(( (RANDOM * 32768 + RANDOM) % (size / 1048576) ))
  # a read that must match, and a rewrite of the same data
  dd if=$A bs=1M skip=$mb count=1 iflag=direct status=none | \
    cmp -s - <(dd if=/tmp/img1 bs=1M skip=$mb count=1 status=none) || loopfail=$((loopfail + 1))
  dd if=/tmp/img1 of=$A bs=1M skip=$mb seek=$mb count=1 oflag=direct conv=notrunc status=none \
    || loopfail=$((loopfail + 1))
  (cd /mnt/b && md5sum -c --quiet /tmp/b.md5) >/dev/null || loopfail=$((loopfail + 1))
  n=$((n + 1))
  echo $n >$SH/loop-count
  [ $(($(date +%s) - t0)) -lt 150 ] || { bad released-timeout; break; }
done
echo "I/O rounds during the switch: $n, failures: $loopfail"
[ $loopfail = 0 ] && [ $n -gt 0 ] && ok io-during-switch || bad io-during-switch "$n rounds, $loopfail failed"

step "phase 2 (pass-through, source deleted on the host)"
want=$(cat $SH/released)
got=$(sha $A)
[ "$got" = "$want" ] && ok sha-after-release || bad sha-after-release "$got != $want"
phase_writes 2
fio_verify fio2 "$F2OFF" "$F2LEN"
(cd /mnt/b && md5sum -c --quiet /tmp/b.md5) && ok fs-verify || bad fs-verify
rm /mnt/b/big /mnt/b/small1*; sync
fstrim -v /mnt/b && ok fstrim || bad fstrim
umount /mnt/b && ok umount || bad umount
e2fsck -fn $B >/tmp/fsck.out 2>&1 && ok fsck || { bad fsck; cat /tmp/fsck.out; }
sha $A >$SH/final.sha
sync

step "disconnect"
nvme disconnect -n "$NQN" && ok disconnect || bad disconnect
if dmesg | grep -iE "I/O error|blk_update_request|Buffer I/O|EXT4-fs error|reset controller"; then
  bad dmesg-clean
else
  ok dmesg-clean
fi
dmesg | grep -iE "nvme" | tail -n 10
echo "failures: $fails"
exit $fails
