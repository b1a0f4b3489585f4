"""``/sys/module/<name>``: the VFIO modules as a loaded Linux 6.1 shows them.

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
  are set on the command line: ``--noiommu``).

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

from .pci import DRIVER
from .tree import SysfsViewError


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


def vfio_modules(*, noiommu: Optional[Callable[[], bool]], dma_entry_limit: Callable[[], int]) -> List[SysfsModule]:
    """The modules loaded once vfio-pci is: their parameters, holders and drivers as in 6.1.

    ``noiommu`` reads the noiommu driver's switch (None: a kernel without
    ``CONFIG_VFIO_NOIOMMU``, whose vfio module has no parameters);
    ``dma_entry_limit`` the type1 driver's limit.  The other parameters are
    at the kernel's defaults, which is how the emulated kernel behaves
    (INTx masked, hugepages pinned as such, interrupts remapped, no SR-IOV
    through vfio-pci, the IGD/VGA quirks unused).
    """
    def no() -> bool:  # a bool parameter at its default
        return False

    vfio_params = [bool_parameter("enable_unsafe_noiommu_mode", 0o644, noiommu)] if noiommu else []
    return [
        SysfsModule("irqbypass", holders=("vfio_pci_core",)),
        SysfsModule("vfio", vfio_params, version="0.3",
                    holders=("vfio_iommu_type1", "vfio_pci", "vfio_pci_core")),
        SysfsModule("vfio_iommu_type1", [
            bool_parameter("allow_unsafe_interrupts", 0o644, no),
            bool_parameter("disable_hugepages", 0o644, no),
            uint_parameter("dma_entry_limit", 0o644, dma_entry_limit),
        ], version="0.2"),
        SysfsModule("vfio_pci", [
            bool_parameter("disable_denylist", 0o444, no),
            bool_parameter("disable_idle_d3", 0o644, no),
            bool_parameter("disable_vga", 0o444, no),    # CONFIG_VFIO_PCI_VGA
            bool_parameter("enable_sriov", 0o644, no),   # CONFIG_PCI_IOV
            bool_parameter("nointxmask", 0o644, no),
        ], drivers=(("pci", DRIVER),)),
        SysfsModule("vfio_pci_core", holders=("vfio_pci",)),
        SysfsModule("vfio_virqfd", version="0.1", holders=("vfio_pci_core",)),
    ]
