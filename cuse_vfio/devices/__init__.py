"""Emulated PCI devices: the PCI framework, the vfio-pci personality, and the models.

* :mod:`.pci` -- one PCI function as hardware: config space, BARs, capabilities,
  interrupts, DMA through a bus-master-checked port.  The model-writing API
  is documented there.
* :mod:`.vfio_pci` -- ``VfioPciDevice``: that function as a VFIO device
  (``DeviceOps``), with vfio-pci's config virtualization, regions and IRQs.
* :mod:`.registry` -- models by name for topology files.
* :mod:`.edu` -- QEMU's educational device.
* :mod:`.nvme` -- an NVM Express 1.4 controller (QEMU's ``nvme``).
* :mod:`.virtio` -- virtio-net on the transitional virtio PCI transport.
* :mod:`.ivshmem` -- QEMU's ivshmem-plain: a big BAR of shared memory.
"""

from .pci import (
    Bar,
    BarWindow,
    Capability,
    DmaFault,
    ExpressCapability,
    ExtendedCapability,
    IoBar,
    IrqIndex,
    IrqSink,
    MmioBar,
    MsiCapability,
    MsixCapability,
    PciDevice,
    PmCapability,
    RamBar,
    Rom,
    SharedMemory,
    VendorCapability,
    VendorExtCapability,
)
from .registry import create_model, load_model_file, model_class, model_names, register_model
from .vfio_pci import HotResetBus, ModelFailure, VfioPciDevice

# The models register themselves by name once the API above is in place.
# isort: off
from . import edu  # noqa: F401  (registers "edu")
from . import nvme  # noqa: F401  (registers "nvme")
from . import virtio  # noqa: F401  (registers "virtio-net")
from . import ivshmem  # noqa: F401  (registers "ivshmem-plain")
# isort: on

__all__ = [
    "Bar", "BarWindow", "Capability", "DmaFault", "ExpressCapability", "ExtendedCapability", "HotResetBus", "IoBar",
    "IrqIndex", "IrqSink", "MmioBar", "ModelFailure", "MsiCapability", "MsixCapability", "PciDevice",
    "PmCapability", "RamBar", "Rom", "SharedMemory", "VendorCapability", "VendorExtCapability",
    "VfioPciDevice", "create_model", "load_model_file", "model_class", "model_names", "register_model",
]
