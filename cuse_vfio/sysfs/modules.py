"""``/sys/module/<name>``: the VFIO modules as a loaded Linux 6.1 (or 6.12) shows them.

Clients decide about VFIO from here before they open anything: DPDK's EAL
``stat``s ``/sys/module/vfio`` ("VFIO modules not loaded, skipping VFIO
support" when it is missing) and reads
``/sys/module/vfio/parameters/enable_unsafe_noiommu_mode`` to choose between
IOVA as VA and as PA; setup scripts read ``vfio_iommu_type1``'s
``allow_unsafe_interrupts`` and ``dma_entry_limit``.

What a module directory holds (``kernel/module/sysfs.c``, ``kernel/params.c``,
compared with Debian's 6.1 in the vfio VM):

- ``initstate`` ``"live\\n"``; ``taint`` ``"\\n"`` (an in-tree module);
  ``version`` where the module declares ``MODULE_VERSION`` (vfio 0.3,
  vfio_iommu_type1 0.2, vfio_virqfd 0.1); ``uevent`` write-only (0200).
- ``holders/<user>`` -> ``../../<user>``: the modules that use this one.
- ``drivers/<bus>:<driver>`` -> ``../../../bus/<bus>/drivers/<driver>``.
- ``parameters/<name>``: only the parameters declared with a non-zero
  permission (vfio-pci's ``ids`` has none, so it has no file); ``bool``
  prints ``Y``/``N``, ``uint`` ``%u``, each followed by a newline.  Writes
  are refused like the view's other files (the emulated kernel's switches
  are set where the kernel's command line would set them: the topology's
  ``[module.NAME]`` tables, or ``--noiommu``).

``enable_unsafe_noiommu_mode`` exists only in a kernel built with
``CONFIG_VFIO_NOIOMMU``.  Debian's 6.1 is not (its vfio has no
``parameters/``); the emulated kernel always has the noiommu driver, as
such a build does, so the view shows the parameter, ``Y`` under
``--noiommu``.

Not served: what describes the module's binary image or its reference
count (``coresize``, ``initsize``, ``refcnt``, ``srcversion``, ``notes/``,
``sections/``); no emulated module has an image, and no client is known to
read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from ..uapi.abi import DEFAULT_KERNEL_ABI, KernelAbi, Rule
from .pci import DRIVER
from .tree import SysfsViewError

VIRQFD_MODULE = Rule(
    "sysfs.module.vfio_virqfd", True, since={"6.2": False},
    why="vfio_virqfd.ko is folded into vfio.ko from 6.2 (\"vfio: Fold vfio_virqfd.ko into vfio.ko\"): "
        "6.1 lists /sys/module/vfio_virqfd (version 0.1, held by vfio_pci_core), 6.12 has no such module; "
        "seen in both VMs.")


@dataclass(frozen=True)
class Parameter:
    """One file of ``parameters/``: ``render()`` prints the value as its kernel type does."""

    name: str
    mode: int
    render: Callable[[], str]


def bool_parameter(name: str, mode: int, value: Callable[[], bool]) -> Parameter:
    """``param_get_bool``: ``"%c\\n"`` of Y or N."""
    return Parameter(name, mode, lambda: "Y\n" if value() else "N\n")


def uint_parameter(name: str, mode: int, value: Callable[[], int]) -> Parameter:
    """``param_get_uint``: ``"%u\\n"``."""
    return Parameter(name, mode, lambda: f"{value()}\n")


@dataclass(frozen=True)
class SysfsModule:
    """What ``/sys/module/<name>`` says about one loaded module."""

    name: str
    parameters: Sequence[Parameter] = ()
    version: Optional[str] = None
    holders: Sequence[str] = ()
    #: (bus, driver): the drivers this module registers
    drivers: Sequence[Tuple[str, str]] = ()

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "-" in self.name:
            raise SysfsViewError(f"module {self.name!r}: a module's sysfs name has no '/' and no '-' "
                                 "(the kernel turns '-' into '_')")
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise SysfsViewError(f"module {self.name}: a parameter is listed twice in {names}")
        for p in self.parameters:
            if not p.mode & 0o444 or p.mode & ~0o777:
                raise SysfsViewError(f"module {self.name}: parameter {p.name} has mode {p.mode:o}; "
                                     "a parameter sysfs shows is readable (mode 0 means no file at all)")


def vfio_modules(value: Callable[[str, str], int], *, noiommu: bool = True,
                 abi: KernelAbi = KernelAbi(DEFAULT_KERNEL_ABI)) -> List[SysfsModule]:
    """The modules loaded once vfio-pci is: their parameters, holders and drivers on ``abi``'s release.

    ``value(module, parameter)`` reads a parameter's live value (the
    machine's module parameters); ``noiommu`` False is a kernel without
    ``CONFIG_VFIO_NOIOMMU``, whose vfio module has no parameters.
    """
    def flag(module: str, name: str, mode: int) -> Parameter:
        return bool_parameter(name, mode, lambda: bool(value(module, name)))

    vfio_params = [flag("vfio", "enable_unsafe_noiommu_mode", 0o644)] if noiommu else []
    virqfd = [SysfsModule("vfio_virqfd", version="0.1", holders=("vfio_pci_core",))] \
        if VIRQFD_MODULE.of(abi) else []
    return [
        SysfsModule("irqbypass", holders=("vfio_pci_core",)),
        SysfsModule("vfio", vfio_params, version="0.3",
                    holders=("vfio_iommu_type1", "vfio_pci", "vfio_pci_core")),
        SysfsModule("vfio_iommu_type1", [
            flag("vfio_iommu_type1", "allow_unsafe_interrupts", 0o644),
            flag("vfio_iommu_type1", "disable_hugepages", 0o644),
            uint_parameter("dma_entry_limit", 0o644, lambda: int(value("vfio_iommu_type1", "dma_entry_limit"))),
        ], version="0.2"),
        SysfsModule("vfio_pci", [
            flag("vfio_pci", "disable_denylist", 0o444),
            flag("vfio_pci", "disable_idle_d3", 0o644),
            flag("vfio_pci", "disable_vga", 0o444),    # CONFIG_VFIO_PCI_VGA
            flag("vfio_pci", "enable_sriov", 0o644),   # CONFIG_PCI_IOV
            flag("vfio_pci", "nointxmask", 0o644),
        ], drivers=(("pci", DRIVER),)),
        SysfsModule("vfio_pci_core", holders=("vfio_pci",)),
    ] + virqfd
