#!/bin/sh
# The /init of every cuse-vfio guest (scripts/vm, scripts/guest).  Console output
# goes to the console log only.  It talks to the host only through files in
# /vmrun, a writable 9p share of the per-run directory: 9p writes are
# synchronous round trips, so everything written is on the host before
# `poweroff -f`, and the kernel console stays out of it.
#
# What differs between guests comes in two files of the initramfs:
#   /etc/vm.env  shell assignments: VM_HOSTNAME, VM_MODULES (the guest kernel's
#                modules directory as a path of the host root), and the hook's own
#   /hook.sh     sourced once /vmrun is up, before the root moves (may call fail)
export PATH=/bin
. /etc/vm.env
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
log() { echo "vm-init: $*"; }
reported=
# fail CODE MESSAGE...: tell the host (if /vmrun is up) and power off.
fail() {
    code=$1; shift
    log "FAILED: $*"
    if [ -n "$reported" ]; then
        { echo "$code"; echo "$*"; } > /vmrun/harness.tmp && mv /vmrun/harness.tmp /vmrun/harness_error
    fi
    sync
    poweroff -f
    sleep 5
}
# modopts FILE: the options the kernel command line gives module FILE
# (NN-NAME.ko), words NAME.PARAM=VALUE, handed to insmod as modprobe does.
modopts() {
    want=${1#*-}; want=$(echo "${want%.ko}" | tr - _)
    for w in $(cat /proc/cmdline); do
        key=${w%%=*}
        case "$key" in *.*) ;; *) continue ;; esac
        if [ "$(echo "${key%%.*}" | tr - _)" = "$want" ]; then printf '%s ' "${w#*.}"; fi
    done
}
for m in $(cat /modules/order); do
    opts=$(modopts $m)
    [ -n "$opts" ] && log "module options for $m: $opts"
    insmod /modules/$m $opts || { log "insmod $m $opts failed"; fail 125 "insmod $m $opts failed"; }
done
log "modules loaded"

mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none vmrun /vmrun \
    || fail 125 "cannot mount the run directory (9p tag vmrun)"
reported=1
echo booted > /vmrun/stage

# What this guest checks or sets up before the root moves (devices, drivers).
if [ -f /hook.sh ]; then
    . /hook.sh
fi

# The host's / read-only, overlayfs with a tmpfs upper on top: the command
# sees the host's files at their paths and may write anywhere (e.g. .pyc
# files, build outputs in the repo); the writes die with the VM.
# Tested: overlay over a 9p lower works on Debian's 6.1 kernel.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /mnt/lower \
    || fail 125 "cannot mount the host root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /newroot \
    || fail 125 "cannot mount overlayfs over the 9p host root"
N=/newroot
# `modprobe` in the guest finds the guest kernel's modules, not the host's.
kver=$(uname -r)
if [ -n "$VM_MODULES" ] && [ -d "$N$VM_MODULES" ]; then
    mkdir -p "$N/lib/modules/$kver" && mount --bind "$N$VM_MODULES" "$N/lib/modules/$kver" \
        || fail 125 "cannot bind the guest kernel's modules on /lib/modules/$kver"
fi
for d in proc sys dev; do
    mkdir -p $N/$d && mount --move /$d $N/$d || fail 125 "cannot move /$d into the new root"
done
# A caller working under /tmp (a fresh clone in /tmp/x, say) keeps its
# directory: it is set aside before the fresh /tmp hides it, then bound back.
cwd=$(cat /vmrun/cwd 2>/dev/null)
case "$cwd" in
/tmp/?*) mkdir -p /mnt/cwd && mount --bind "$N$cwd" /mnt/cwd 2>/dev/null || cwd= ;;
*) cwd= ;;
esac
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $N/tmp
if [ -n "$cwd" ]; then
    mkdir -p "$N$cwd" && mount --bind /mnt/cwd "$N$cwd" || fail 125 "cannot keep the calling directory $cwd"
fi
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs $N/run
mkdir -p $N/dev/pts $N/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $N/dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $N/dev/shm
[ -e $N/dev/ptmx ] || ln -s pts/ptmx $N/dev/ptmx
[ -e $N/dev/fd ] || ln -s /proc/self/fd $N/dev/fd
[ -e $N/dev/stdin ] || ln -s /proc/self/fd/0 $N/dev/stdin
[ -e $N/dev/stdout ] || ln -s /proc/self/fd/1 $N/dev/stdout
[ -e $N/dev/stderr ] || ln -s /proc/self/fd/2 $N/dev/stderr
[ -d $N/sys/fs/fuse/connections ] && mount -t fusectl fusectl $N/sys/fs/fuse/connections
ip link set lo up
hostname "${VM_HOSTNAME:-cuse-vfio-vm}"


cp /vmrun/job.sh $N/run/cuse-vfio-vm-job.sh || fail 125 "cannot copy the job script"
echo running > /vmrun/stage
log "running the command"
# fd 3: the job script's channel for harness errors (e.g. the cwd is missing).
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    chroot $N /bin/sh /run/cuse-vfio-vm-job.sh \
    </newroot/dev/null >/vmrun/stdout 2>/vmrun/stderr 3>/vmrun/job_error
rc=$?
echo $rc > /vmrun/status.tmp && mv /vmrun/status.tmp /vmrun/status
log "command exited $rc"
sync
poweroff -f
sleep 5
