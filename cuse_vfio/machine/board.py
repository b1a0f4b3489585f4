"""The emulated host a topology describes: its bus, IOMMU groups, drivers and sysfs.

``Machine(topology)`` builds what a booted kernel would have: one PCI
function per ``[[device]]`` entry, created from its model, placed in its
IOMMU group and bound to vfio-pci; the type1 (and, when asked, noiommu)
IOMMU drivers registered; a Dispatcher in front of it all.  Transports then
only have to serve ``machine.dispatcher``; the sysfs view is derived from the
same functions, so what a client reads in /sys is what its device fd shows.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence

from ..core import DEFAULT_KERNEL_ABI, BusDevice, IommuGroup, KernelAbi, Vfio, VfioBusDriver, device_bind
from ..devices import HotResetBus, PciDevice, VfioPciDevice, create_model, load_model_file
from ..dispatch import Dispatcher
from ..iommu import register_default_drivers
from ..sysfs import SysfsDevice, SysfsGroup, SysfsView, bar_resource, qemu_vtd, vfio_modules
from .params import ModuleParams
from .topology import MSI_WINDOW, Topology, TopologyError, bus_of, devfn_of

log = logging.getLogger(__name__)


class Machine:
    def __init__(self, topology: Topology, *, trace: Optional[Callable[[dict], None]] = None,
                 noiommu: bool = False, model_files: Sequence[str] = (), kernel_abi: Optional[str] = None):
        self.topology = topology
        for path in model_files:
            load_model_file(path)
        #: the module parameters, as the topology (and ``noiommu``, i.e. --noiommu) set them
        self.params = ModuleParams(topology.modules)
        if noiommu:
            self.params.set("vfio", "enable_unsafe_noiommu_mode", True)
        # the command line's choice, else the topology file's, else 6.1
        self.vfio = Vfio(abi=KernelAbi(kernel_abi or topology.kernel_abi or DEFAULT_KERNEL_ABI))
        geometry = topology.iommu
        type1_params = {name: self.params.get("vfio_iommu_type1", name)
                        for name in ("dma_entry_limit", "allow_unsafe_interrupts", "disable_hugepages")}
        self.type1, self.noiommu = register_default_drivers(
            self.vfio, noiommu=self.params.get("vfio", "enable_unsafe_noiommu_mode"),
            aperture=geometry.aperture, reserved_regions=geometry.reserved_regions,
            interrupt_remapping=geometry.intremap, **type1_params)
        #: every IOMMU fault of every container, readable while the server runs
        self.fault_log = self.type1.fault_log
        self.vfio_pci = VfioBusDriver(self.vfio, "vfio-pci", self._vfio_pci_probe)
        self.iommu_groups: Dict[int, IommuGroup] = {}
        self.bus_devices: Dict[str, BusDevice] = {}
        self.vdevs: Dict[str, VfioPciDevice] = {}
        self._pending: Dict[str, VfioPciDevice] = {}
        for spec in topology.devices:
            options = dict(spec.options)
            # BAR accesses are split as the kernel ABI's vfio-pci splits them
            # (rdwr.BAR_IO_WIDTH); a topology may still ask for another io_width.
            io_width = options.pop("io_width", None)
            if io_width is not None and (not isinstance(io_width, int) or isinstance(io_width, bool)):
                # 4.0 and true compare equal to 4 and 1, so vfio-pci's own check would take them
                raise TopologyError(f"{topology.source}: device {spec.bdf}: io_width is 1, 2, 4 or 8, "
                                    f"not {io_width!r}")
            # Whether the model's register windows are offered for mmap (sparse mmap areas); by default
            # as the model says (PciDevice.mmap_windows).
            mmap_windows = options.pop("mmap_windows", None)
            if mmap_windows is not None and not isinstance(mmap_windows, bool):
                raise TopologyError(f"{topology.source}: device {spec.bdf}: mmap_windows is true or false, "
                                    f"not {mmap_windows!r}")
            try:
                function = create_model(spec.model, name=spec.bdf, **options)
            except (KeyError, TypeError, ValueError) as e:
                raise TopologyError(f"{topology.source}: device {spec.bdf} (model {spec.model!r}): "
                                    f"{e.args[0] if e.args else e}") from None
            # A DMA with no container attached (released, or never set) is a fault of the machine's log.
            function.dma._record_faults_to(self.fault_log)
            try:
                self._pending[spec.bdf] = VfioPciDevice(
                    function, spec.bdf, io_width=io_width, abi=self.vfio.abi, mmap_windows=mmap_windows,
                    nointxmask=self.params.get("vfio_pci", "nointxmask"),
                    disable_idle_d3=self.params.get("vfio_pci", "disable_idle_d3"))
            except ValueError as e:
                raise TopologyError(f"{topology.source}: device {spec.bdf}: {e}") from None
            if not spec.iommu and not self.noiommu.enable_unsafe_noiommu_mode:
                # vfio_pci_core_register_device -> vfio_group_find_or_alloc: -EINVAL, the probe fails
                raise TopologyError(f"{topology.source}: device {spec.bdf} has iommu = false: vfio-pci binds a "
                                    "device without an IOMMU only with [module.vfio] "
                                    "enable_unsafe_noiommu_mode = true (or --noiommu)")
            group = self.iommu_groups.get(spec.group)
            if group is None:
                group = self.iommu_groups[spec.group] = IommuGroup(spec.group, noiommu=not spec.iommu)
                if not spec.iommu:  # vfio_noiommu_group_alloc
                    log.warning("vfio-pci %s: Adding kernel taint for vfio-noiommu group on device", spec.bdf)
            dev = self.bus_devices[spec.bdf] = BusDevice(spec.bdf)
            group.add_device(dev)
            device_bind(dev, self.vfio_pci)
        self._wire_buses()
        self.dispatcher = Dispatcher(self.vfio, trace=trace)

    def _wire_buses(self) -> None:
        """Function 0 of a slot with others says so (QEMU's multifunction=on), and each root
        port's secondary bus becomes one HotResetBus holding every function on it, in devfn
        order as the kernel's walk of the bus finds them.  The root bus cannot be reset: its
        devices keep no HotResetBus, and the hot reset ioctls answer ENODEV for them."""
        specs = {spec.bdf: spec for spec in self.topology.devices}
        for bdf, vdev in self.vdevs.items():
            if bdf.endswith(".0") and any(other[:-1] == bdf[:-1] and other != bdf for other in specs):
                vdev.function.set_multifunction()
        for port in self.topology.root_ports:
            bus = HotResetBus(segment=int(port.bdf[:4], 16), bus=port.secondary)
            for bdf in sorted((b for b in specs if bus_of(b) == port.secondary), key=devfn_of):
                bus.add(devfn_of(bdf), specs[bdf].group, self.vdevs[bdf])

    def _vfio_pci_probe(self, dev: BusDevice) -> VfioPciDevice:
        vdev = self._pending.pop(dev.name)
        self.vdevs[dev.name] = vdev
        return vdev

    @property
    def group_ids(self) -> List[int]:
        return sorted(self.iommu_groups)

    # -- what the host tells about it ----------------------------------------
    def sysfs_view(self) -> SysfsView:
        devices = []
        for bdf, vdev in sorted(self.vdevs.items()):
            fn = vdev.function
            resources = []
            for bar in fn.bars:
                if bar is None:  # unimplemented, or the upper half of a 64-bit BAR
                    resources.append((0, 0, 0))
                    continue
                resources.append(bar_resource(bar.size, io=bar.io, mem64=bar.bits64,
                                              prefetchable=getattr(bar, "prefetchable", False),
                                              start=bar.address))
            if fn.rom is not None:
                # IORESOURCE_MEM | READONLY | SIZEALIGN | the ROM's "shadowable" bit, as a disabled ROM shows
                resources.append((fn.rom.address, fn.rom.address + fn.rom.size - 1, 0x46200))
            group = self.bus_devices[bdf].iommu_group
            assert group is not None  # __init__ put every device in its group
            devices.append(SysfsDevice.from_config_space(
                bdf, group.id, _config_reader(fn),
                resources=resources, config_size=fn.config.size, iommu=not group.noiommu))
        modules = vfio_modules(self.params.get, abi=self.vfio.abi)
        iommu = qemu_vtd(self.type1.aperture, self.type1.pgsize_bitmap, intremap=self.type1.interrupt_remapping)
        reserved = tuple(sorted((start, end, "msi" if (start, end) == MSI_WINDOW else "reserved")
                         for start, end in self.topology.iommu.reserved_regions))
        # vfio_noiommu_group_alloc: a group of its own, named "vfio-noiommu", with no IOMMU domain
        # (type "unknown") and no reserved regions (no device of it has IOMMU ops)
        groups = [SysfsGroup(gid, type="unknown", reserved_regions=(), name="vfio-noiommu")
                  if self.iommu_groups[gid].noiommu else SysfsGroup(gid, reserved_regions=reserved)
                  for gid in self.group_ids]
        return SysfsView(devices, groups, modules, iommu)

    def close(self) -> None:
        for vdev in self.vdevs.values():
            stop = getattr(vdev.function, "shutdown", None)
            if stop is not None:
                stop()


def _config_reader(fn: PciDevice) -> Callable[[], bytes]:
    """What the sysfs ``config`` file reads: the function's config space as it is at that moment."""
    return lambda: bytes(fn.config.data)
