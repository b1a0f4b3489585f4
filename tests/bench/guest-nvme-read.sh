#!/bin/sh
# Runs inside a scripts/guest guest for scripts/bench: reads from the first
# NVMe namespace with O_DIRECT and prints what dd measured, one name=value a line.
#
#   guest-nvme-read.sh MIB ROUNDS N4K
#
#   seq_bytes_per_s=B   ROUNDS times: MIB MiB in 1 MiB reads (dd bs=1M iflag=direct)
#   read4k_ns=T         ROUNDS times: N4K 4 KiB reads, one at a time; T is the
#                       time of one read (dd's elapsed time / N4K)
# One untimed pass over the same blocks first, so both devices read a warm
# host page cache.
set -eu
MIB=$1 ROUNDS=$2 N4K=$3
dev=/dev/nvme0n1
t=600
while [ ! -b $dev ] && [ $t -gt 0 ]; do sleep 0.1; t=$((t - 1)); done

# elapsed: dd's own "..., S s, ..." in seconds
elapsed() { sed -n 's/.* copied, \([0-9.e+-]*\) s, .*/\1/p'; }

dd if=$dev of=/dev/null bs=1M count="$MIB" iflag=direct status=none
i=0
while [ $i -lt "$ROUNDS" ]; do
    s=$(dd if=$dev of=/dev/null bs=1M count="$MIB" iflag=direct 2>&1 | elapsed)
    awk -v s="$s" -v b=$((MIB << 20)) 'BEGIN { printf "seq_bytes_per_s=%d\n", b / s }'
    s=$(dd if=$dev of=/dev/null bs=4k count="$N4K" iflag=direct 2>&1 | elapsed)
    awk -v s="$s" -v n="$N4K" 'BEGIN { printf "read4k_ns=%d\n", s * 1e9 / n }'
    i=$((i + 1))
done
