# scripts/guest: every device the topology passes through must be where the
# harness put it.  Sourced by /init; GUEST_DEVICES (from /etc/vm.env) holds
# words BDF=VENDOR:DEVICE (ids as sysfs writes them, e.g. 0x1234:0x11e8; an
# empty id is not checked).
missing=
for want in $GUEST_DEVICES; do
    bdf=${want%%=*}
    ids=${want#*=}
    d=/sys/bus/pci/devices/$bdf
    if [ ! -d $d ]; then
        missing="$missing $bdf (absent)"
    elif [ "$ids" != ":" ] && [ "$(cat $d/vendor):$(cat $d/device)" != "$ids" ]; then
        missing="$missing $bdf (is $(cat $d/vendor):$(cat $d/device), not $ids)"
    fi
done
if [ -n "$missing" ]; then
    {
        echo "the passed-through devices are not where expected:$missing; the guest's PCI devices:"
        for p in /sys/bus/pci/devices/*; do
            echo "  ${p##*/} $(cat $p/vendor):$(cat $p/device) class=$(cat $p/class) driver=$(readlink $p/driver | sed 's,.*/,,')"
        done
    } > /vmrun/devcheck 2>&1
    cat /vmrun/devcheck
    fail 123 "$(cat /vmrun/devcheck)"
fi
log "passed-through devices present: $GUEST_DEVICES"
