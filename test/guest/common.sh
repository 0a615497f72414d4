# Sourced by the guest scripts of test/test_clone_nvmf.py, which puts this
# file in the 9p share beside their inputs (test/vm/linux-guest runs one
# script only): the host's address, the share, and the check helpers.
# Checks print "CHECK-OK name" / "CHECK-FAIL name[: why]" and count the
# failures in $fails, the script's exit status.
HOST=10.0.2.2
SH=/mnt/share
fails=0

step() { echo; echo "### $(cut -d' ' -f1 /proc/uptime)s $*"; }
ok() { echo "CHECK-OK $1"; }
bad() { echo "CHECK-FAIL $1${2:+: $2}"; fails=$((fails + 1)); }
check() { local name=$1; shift; if "$@"; then ok "$name"; else bad "$name"; fi; }
sha() { dd if="$1" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1; }
