"""The sysfs view: the emulated machine where VFIO clients look for it.

Clients learn about VFIO and find their group through sysfs before they open
anything: QEMU readlinks ``<sysfsdev>/iommu_group`` and takes the basename;
DPDK ``stat``s ``/sys/module/vfio``, reads the noiommu parameter, scans
``/sys/bus/pci/devices``, parses ``vendor``/``device``/``class``/``resource``,
compares ``basename(readlink(driver))`` with ``"vfio-pci"`` and reads the
IOMMU's address width; rust-vmm and SPDK do the same.  This package serves,
read-only and with the fusepy API (mfusepy over libfuse3), a tree laid out
like ``/sys`` so that ``cuse-vfio run`` can bind its directories over the real
ones in a private mount namespace (see :meth:`SysfsView.bind_dirs`)::

    <root>/bus/pci/devices/<bdf>/            vendor device subsystem_vendor ...
                                             config resource uevent modalias ...
                                             iommu_group -> ../../../../kernel/iommu_groups/N
                                             driver      -> ../../../../bus/pci/drivers/vfio-pci
                                             subsystem   -> ../../../../bus/pci
                                             iommu       -> ../../../../devices/virtual/iommu/dmar0
    <root>/kernel/iommu_groups/N/            type reserved_regions
    <root>/kernel/iommu_groups/N/devices/<bdf> -> ../../../../bus/pci/devices/<bdf>
    <root>/bus/pci/drivers/vfio-pci/         bind unbind new_id remove_id uevent
    <root>/bus/pci/drivers/vfio-pci/<bdf>    -> ../../../../bus/pci/devices/<bdf>
    <root>/bus/pci/drivers/vfio-pci/module   -> ../../../../module/vfio_pci
    <root>/module/{vfio,vfio_pci,...}/       initstate holders/ parameters/ ... (modules.py)
    <root>/devices/virtual/iommu/dmar0/      intel-iommu/cap ... (iommu.py)
    <root>/class/iommu/dmar0                 -> ../../devices/virtual/iommu/dmar0

Only functions bound to vfio-pci appear, as the devices the topology lists:
a function behind a root port is ``bus/pci/devices/0000:01:00.0`` like any
other, with its group and driver; the root port itself, like the host
bridge, is the host's and has no directory here (no emulated client walks
from a function up to its bridge; the hot reset ioctls name what a bus
reset touches).

Links are relative and every device directory sits four levels below the
root, as ``/sys/devices/pci0000:00/<bdf>`` does on a real system (the kernel's
links are ``../../../kernel/iommu_groups/N`` from three levels down, and
``../../../../devices/pci0000:00/<bdf>`` from the group and driver
directories), so a link resolves the same way inside the view and, after
the binds, under ``/sys``.  Everything else of ``/sys`` (CPUs, NUMA nodes,
hugepages) stays the host kernel's own.

``lspci -O sysfs.path=<root>/bus/pci -vk`` reads the view as it reads /sys.

Writes.  The view does not change the emulated machine, so it refuses them,
with the errno the kernel gives where it can: opening for writing a file
whose mode has no write bit is EACCES (kernfs refuses it even for root), and
every other change (``config``, ``numa_node``, ``enable``, a module
parameter, chmod, mkdir, ...) is EROFS; config writes go through the VFIO
device fd's config region.  The one exception is the control files (the
driver's ``bind``, ``unbind``, ``new_id``, ``remove_id`` and ``uevent``, a
module's ``uevent``): setup scripts written for real hardware run ``echo
1234 11e8 > new_id`` unconditionally, and an emulated device is already bound
to vfio-pci and can be bound to nothing else, so those writes are accepted,
logged and ignored.

Layout: ``pci`` (devices and groups, the attribute formats), ``modules``,
``iommu`` (what the kernel shows besides devices), ``tree`` (the node kinds),
``view`` (the tree built from them), ``mount`` (serving it through FUSE).
"""

from .iommu import SysfsIommu, qemu_vtd
from .modules import Parameter, SysfsModule, bool_parameter, uint_parameter, vfio_modules
from .mount import SysfsMount, mounted
from .pci import SysfsDevice, SysfsGroup, bar_resource
from .tree import SysfsViewError
from .view import SysfsView

__all__ = [
    "Parameter", "SysfsDevice", "SysfsGroup", "SysfsIommu", "SysfsModule", "SysfsMount", "SysfsView",
    "SysfsViewError", "bar_resource", "bool_parameter", "mounted", "qemu_vtd", "uint_parameter",
    "vfio_modules",
]
