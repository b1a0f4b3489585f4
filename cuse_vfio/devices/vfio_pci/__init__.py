"""vfio-pci: a PCI function (:mod:`cuse_vfio.devices.pci`) presented to user space as a VFIO device.

Split as the kernel splits ``drivers/vfio/pci/`` (6.1), so each part reads
beside its C counterpart:

* :mod:`.core` -- ``vfio_pci_core.c``: ``VfioPciDevice`` (the ``DeviceOps``),
  open/release, the ioctl table, GET_INFO, GET_REGION_INFO, mmap.
* :mod:`.config` -- ``vfio_pci_config.c``: the virtual config space.
* :mod:`.intrs` -- ``vfio_pci_intrs.c``: INTx, MSI/MSI-X, ERR/REQ, SET_IRQS.
* :mod:`.rdwr` -- ``vfio_pci_rdwr.c``: BAR, ROM and config reads and writes, ioeventfds.
* :mod:`.reset` -- the resets of ``vfio_pci_core.c`` (function, hot reset) and the config
  state the PCI core saves around them.
* :mod:`.power` -- the runtime power management of ``vfio_pci_core.c`` and its
  low-power DEVICE_FEATUREs.
"""

from .core import ModelFailure, VfioPciDevice
from .rdwr import VFIO_PCI_INDEX_TO_OFFSET, VFIO_PCI_OFFSET_MASK, VFIO_PCI_OFFSET_SHIFT
from .reset import HotResetBus

__all__ = ["HotResetBus", "ModelFailure", "VFIO_PCI_INDEX_TO_OFFSET", "VFIO_PCI_OFFSET_MASK",
           "VFIO_PCI_OFFSET_SHIFT", "VfioPciDevice"]
