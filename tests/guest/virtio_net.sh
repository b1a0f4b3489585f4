#!/bin/sh
# Runs inside a scripts/guest guest (--modules virtio_net): the stock
# virtio_pci and virtio_net drivers on the emulated virtio-net function, and
# what tests/test_guest_net.py asks of them.  Prints one name=value line per
# observation; never stops early.
#
#   virtio_net.sh BDF ADDRESS PEER COUNT
#
# Brings the function's interface up with ADDRESS/24, pings PEER (an address
# of the host's network namespace, behind the TAP the device is attached to)
# COUNT times, and reports the interface's counters before and after.
set -u
BDF=$1 ADDR=$2 PEER=$3 COUNT=$4
dev=/sys/bus/pci/devices/$BDF

wait_for() {  # wait_for SECONDS TEST...: a bound for a slow guest, never a measurement
    t=$(($1 * 10)); shift
    while ! "$@" && [ $t -gt 0 ]; do sleep 0.1; t=$((t - 1)); done
    "$@"
}
say() { echo "$1=$2"; }
has_iface() { ls "$dev"/virtio*/net/ >/dev/null 2>&1; }
is_up() { [ "$(cat /sys/class/net/$iface/operstate)" = up ]; }
counter() { cat /sys/class/net/$iface/statistics/$1; }

say pci_driver "$(basename "$(readlink "$dev/driver")")"
wait_for 30 has_iface
iface=$(ls "$dev"/virtio*/net/ | head -n 1)
virtio=$(basename "$(dirname "$(dirname "$dev"/virtio*/net/"$iface")")")
say iface "$iface"
say virtio_driver "$(basename "$(readlink "$dev/$virtio/driver")")"
say mac "$(cat /sys/class/net/$iface/address)"
# The features the driver took, as the virtio core shows them: one character a bit.
say features "$(cat "$dev/$virtio/features")"
ip link set "$iface" up
ip addr add "$ADDR/24" dev "$iface"
wait_for 30 is_up
say operstate "$(cat /sys/class/net/$iface/operstate)"
say rx_packets_before "$(counter rx_packets)"
say tx_packets_before "$(counter tx_packets)"
busybox ping -c "$COUNT" -W 10 "$PEER" > /tmp/ping.out 2>&1
say ping_rc $?
sed -n 's/^\([0-9]*\) packets transmitted, \([0-9]*\) packets received.*/ping_sent=\1\nping_received=\2/p' /tmp/ping.out
say rx_packets "$(counter rx_packets)"
say tx_packets "$(counter tx_packets)"
say rx_errors "$(counter rx_errors)"
say tx_errors "$(counter tx_errors)"
say rx_dropped "$(counter rx_dropped)"
ip link set "$iface" down
say down_operstate "$(cat /sys/class/net/$iface/operstate)"
