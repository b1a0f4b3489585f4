# scripts/vm --mode vfio-edu: bind QEMU's edu device to the real vfio-pci
# (before /sys and /dev move into the new root).  Sourced by /init; uses
# EDU_BDF and EDU_GROUP from /etc/vm.env.
echo 1234 11e8 > /sys/bus/pci/drivers/vfio-pci/new_id
i=0
while [ ! -c /dev/vfio/$EDU_GROUP ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
g=$(readlink /sys/bus/pci/devices/$EDU_BDF/iommu_group)
if [ ! -c /dev/vfio/$EDU_GROUP ] || [ "${g##*/}" != "$EDU_GROUP" ] || [ ! -c /dev/vfio/vfio ]; then
    {
        echo "expected /dev/vfio/vfio, /dev/vfio/$EDU_GROUP and $EDU_BDF in IOMMU group $EDU_GROUP; found:"
        echo "  $EDU_BDF iommu_group -> ${g:-(none)}"
        echo "  /dev/vfio: $(ls /dev/vfio 2>&1 | tr '\n' ' ')"
        for p in /sys/bus/pci/devices/*; do
            echo "  pci ${p##*/} $(cat $p/vendor):$(cat $p/device) group=$(readlink $p/iommu_group | sed 's,.*/,,') driver=$(readlink $p/driver | sed 's,.*/,,')"
        done
        dmesg | grep -i -E 'dmar|iommu|vfio' | tail -n 15 | sed 's/^/  dmesg: /'
    } > /vmrun/devcheck 2>&1
    cat /vmrun/devcheck
    fail 123 "vfio-edu device check failed; $(cat /vmrun/devcheck)"
fi
log "edu $EDU_BDF in group ${g##*/}, /dev/vfio/$EDU_GROUP present"
