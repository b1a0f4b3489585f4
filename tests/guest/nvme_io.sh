#!/bin/sh
# Runs inside a scripts/guest guest (--modules nvme --smp 2): the stock nvme
# driver on the first NVMe controller, and what tests/test_guest_nvme.py asks
# of it.  Prints one name=value line per observation; never stops early.
#
#   nvme_io.sh A B MIB BAD_LBA C
#
# A, B, C are MiB offsets on the namespace.  MIB MiB of random data go to A
# and, at the same time from the other vCPU, to B (two dd with O_DIRECT,
# pinned with taskset, so they go down two I/O queues); both are read back
# with O_DIRECT and compared.  BAD_LBA (none: skip) must fail to read
# (ENODATA with O_DIRECT, EIO through the page cache).  Then a controller reset, after which A is read again and 1 MiB goes
# to C.  sha256 sums of what was written let the host check its backing file.
set -u
A=$1 B=$2 MIB=$3 BAD=$4 C=$5
ns=nvme0n1
dev=/dev/$ns
ctrl=/sys/class/nvme/nvme0
work=$(mktemp -d)

wait_for() {  # wait_for SECONDS TEST...: a bound for a slow guest, never a measurement
    t=$(($1 * 10)); shift
    while ! "$@" && [ $t -gt 0 ]; do sleep 0.1; t=$((t - 1)); done
    "$@"
}
is_live() { [ "$(cat $ctrl/state 2>/dev/null)" = live ]; }
say() { echo "$1=$2"; }
# dd_rc NAME DD-ARGS...: runs dd, says NAME_rc, keeps its stderr in $work/NAME.err
dd_rc() {
    n=$1; shift
    dd status=none "$@" 2>"$work/$n.err"
    say "${n}_rc" $?
}
# interrupts: per queue vector of the controller (/proc/interrupts, all
# CPUs added up): "nvme0q0:N nvme0q1:M ..."; each I/O queue has its own
# vector when the controller offers enough MSI-X vectors.
interrupts() {
    awk '$NF ~ /^nvme0q[0-9]+$/ { n = 0; for (i = 2; i < NF; i++) if ($i ~ /^[0-9]+$/) n += $i; printf "%s:%d ", $NF, n }' \
        /proc/interrupts
}
wait_for 60 test -b $dev
say block_device "$([ -b $dev ] && echo yes || echo no)"
say driver "$(basename "$(readlink $ctrl/device/driver)")"
say state "$(cat $ctrl/state)"
say sectors "$(cat /sys/block/$ns/size)"
say lba_size "$(cat /sys/block/$ns/queue/logical_block_size)"
say hw_queues "$(ls /sys/block/$ns/mq | wc -l)"
say cpus "$(nproc)"

head -c $((MIB << 20)) /dev/urandom > $work/a
head -c $((MIB << 20)) /dev/urandom > $work/b
head -c $((1 << 20)) /dev/urandom > $work/c
say sha_a "$(sha256sum < $work/a | cut -d' ' -f1)"
say sha_b "$(sha256sum < $work/b | cut -d' ' -f1)"
say sha_c "$(sha256sum < $work/c | cut -d' ' -f1)"

say irqs_before "$(interrupts)"
taskset -c 0 dd status=none if=$work/a of=$dev bs=1M seek=$A oflag=direct 2>$work/wa.err &
pa=$!
taskset -c 1 dd status=none if=$work/b of=$dev bs=1M seek=$B oflag=direct 2>$work/wb.err &
pb=$!
wait $pa; say write_a_rc $?
wait $pb; say write_b_rc $?
say irqs_after_writes "$(interrupts)"
taskset -c 1 dd status=none if=$dev of=$work/ra bs=1M skip=$A count=$MIB iflag=direct 2>$work/ra.err &
pa=$!
taskset -c 0 dd status=none if=$dev of=$work/rb bs=1M skip=$B count=$MIB iflag=direct 2>$work/rb.err &
pb=$!
wait $pa; say read_a_rc $?
wait $pb; say read_b_rc $?
say irqs_after_reads "$(interrupts)"
say readback_a "$(cmp -s $work/a $work/ra && echo same || echo different)"
say readback_b "$(cmp -s $work/b $work/rb && echo same || echo different)"

if [ "$BAD" != none ]; then
    # The block layer gives BLK_STS_MEDIUM to the reader as ENODATA (O_DIRECT);
    # a buffered read of the page sees it as EIO (the page is not uptodate).
    lba=$(cat /sys/block/$ns/queue/logical_block_size)
    dd_rc bad_direct if=$dev of=/dev/null bs=$lba skip=$BAD count=1 iflag=direct
    say bad_direct_error "$(sed -n 's/^dd: .*: //p' $work/bad_direct.err | head -n 1)"
    dd_rc before_bad if=$dev of=/dev/null bs=$lba skip=$((BAD - 1)) count=1 iflag=direct
    # nvme_log_error, before the request ends (so before dd returns):
    # "nvme0n1: I/O Cmd(0x2) @ LBA N, 1 blocks, I/O Error (sct 0x2 / sc 0x81) DNR"
    # (the names are "Read", "Unrecovered Read Error" with CONFIG_NVME_VERBOSE_ERRORS)
    say dmesg_nvme_error "$(dmesg | grep -E "$ns: .*\(0x2\) @ LBA $BAD, 1 blocks" | tail -n 1 | sed 's/^\[[^]]*\] //')"
    say dmesg_medium_error "$(dmesg | grep -E "critical medium error, dev $ns, sector $BAD " | tail -n 1 | sed 's/^\[[^]]*\] //')"
    dd_rc bad_buffered if=$dev of=/dev/null bs=4096 skip=$((BAD * lba / 4096)) count=1
    say bad_buffered_error "$(sed -n 's/^dd: .*: //p' $work/bad_buffered.err | head -n 1)"
fi

echo 1 > $ctrl/reset_controller
say reset_write_rc $?
wait_for 60 is_live
say state_after_reset "$(cat $ctrl/state)"
dd_rc reread_a if=$dev of=$work/ra2 bs=1M skip=$A count=$MIB iflag=direct
say reread_a "$(cmp -s $work/a $work/ra2 && echo same || echo different)"
dd_rc write_c if=$work/c of=$dev bs=1M seek=$C oflag=direct
dd_rc read_c if=$dev of=$work/rc bs=1M skip=$C count=1 iflag=direct
say readback_c "$(cmp -s $work/c $work/rc && echo same || echo different)"
say queue_setups "$(dmesg | grep -c 'nvme nvme0: .*default/read/poll queues')"
say timeouts "$(dmesg | grep -c 'nvme nvme0: I/O .* timeout')"
rm -rf "$work"
