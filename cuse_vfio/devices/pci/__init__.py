"""The PCI framework: one emulated PCI function as the hardware would be.

This is the device *below* vfio-pci: the config space a host kernel reads
with ``pci_read_config_*``, the BARs it maps, the interrupts it receives.
What user space sees through a device fd is :mod:`cuse_vfio.devices.vfio_pci`'s virtualized
view of it (``vfio_pci_config.c``); keeping the two apart is what lets that
module model the kernel's virtualization rule for rule.

The framework is split by what a model adds; everything is importable from
here (``from cuse_vfio.devices.pci import PciDevice, RamBar``):
:mod:`.regs` (pci_regs.h), :mod:`.config` (config space bytes and masks),
:mod:`.bars` (BARs, shared memory, ROM), :mod:`.caps` (capabilities),
:mod:`.irq` (irq indexes, the sink), :mod:`.dma` (the DMA port),
:mod:`.device` (``PciDevice``).

Writing a device model
----------------------
Subclass :class:`PciDevice`, one file per model, reading top to bottom as
identity -> BARs and capabilities -> register handlers -> reset::

    @register_model("scratchpad")             # registry.py: topology files name it
    class Scratchpad(PciDevice):
        vendor_id, device_id = 0x1b36, 0x00f0
        class_code = 0xff0000
        interrupt_pin = 1                      # INTA; 0 = no INTx

        def __init__(self, name=None, **options):   # options: the topology entry's keys
            super().__init__(name, **options)
            self.ram = self.add_bar(0, RamBar(64 * 1024))          # plain memory: mmappable
            self.add_bar(2, MmioBar(4096, self.regs_read, self.regs_write))
            self.add_capability(MsiCapability(vectors=4, addr64=True))

        def regs_read(self, offset, size): ...          # naturally aligned 1/2/4/8 bytes
        def regs_write(self, offset, size, value): ...

        def reset(self): ...                   # explicit: the model's own state

* Identity: class attributes ``vendor_id``, ``device_id``, ``subsystem_vendor_id``,
  ``subsystem_id``, ``revision``, ``class_code`` (24 bits), ``interrupt_pin``.
  What firmware leaves (``firmware_command``, ``interrupt_line``, a BAR's
  ``address``) and ``command_wmask`` let a model look like a given machine.
* Reset: ``can_reset = True`` offers a device-specific function reset;
  ``ExpressCapability(flr=True)`` and ``PmCapability(no_soft_reset=False)``
  offer FLR and PM reset.  With any of them vfio-pci sets
  VFIO_DEVICE_FLAGS_RESET; without, VFIO_DEVICE_RESET is EINVAL, as for QEMU's
  edu.  A reset puts config space back to power-on and then calls ``reset()``.
* BARs: :class:`MmioBar` / :class:`IoBar` (register handlers, for registers
  with side effects: clients use pread/pwrite), :class:`RamBar` (plain memory in
  a memfd, :class:`SharedMemory`, offered for mmap whole, MSI-X table included,
  as 6.1 does); ``bits64`` / ``prefetchable``; :class:`Rom` for the expansion ROM.
  ``MmioBar.add_window(offset, size)`` makes whole pages of a register BAR
  memory the model keeps current (:class:`BarWindow`): registers without side
  effects that a client may map (sparse mmap areas) instead of trapping,
  unless ``mmap_windows`` (class attribute, or the topology key) is false.
* Capabilities: :class:`PmCapability`, :class:`MsiCapability`,
  :class:`MsixCapability` (table and PBA inside a BAR),
  :class:`ExpressCapability` (makes config space 4 KiB),
  :class:`VendorCapability`, and extended ones (:class:`ExtendedCapability`,
  :class:`VendorExtCapability`).  Each lands on the next free dword.
* Interrupts, one narrow helper: ``raise_irq(index, vector)`` /
  ``lower_irq(index)`` with the VFIO irq index (:class:`IrqIndex`); INTx is a
  level, MSI and MSI-X are messages; ``msi_enabled()`` / ``msix_enabled()``
  say what the host set up; ``signal_error()`` is the ERR index.  Masking,
  automasking and eventfds are vfio-pci's business (:class:`IrqSink`).
* DMA, the other: ``self.dma.read(iova, size)`` / ``self.dma.write(iova, data)``,
  and for a scatter list ``self.dma.readv([(iova, n), ...])`` /
  ``self.dma.writev([(iova, n), ...], data)`` (one IOMMU pass and one copy per
  run contiguous in client memory, rather than a transfer per page),
  through the container's IOMMU.  Nothing moves while bus mastering is off or
  no IOMMU is attached (:class:`DmaFault`), or when the IOMMU refuses (a
  VfioError with ``.reason``); each is a fault in the log.  Catch VfioError
  where the hardware would flag an error.
* Time: ``self.call_later(delay, fn)`` for work a real device does
  asynchronously; ``complete_pending()`` runs it now (``manual_time=True``
  makes tests deterministic).  Handlers, config hooks and deferred work all
  run under ``self.lock``.
* A handler or reset that raises fails that one access with EIO and a logged
  traceback; the device and the server live on.
"""

from .bars import Bar, BarWindow, FileMemory, FileRamBar, IoBar, MmioBar, RamBar, Rom, SharedMemory  # noqa: F401
from .caps import (  # noqa: F401
    Capability,
    ExpressCapability,
    ExtendedCapability,
    MsiCapability,
    MsixCapability,
    PmCapability,
    VendorCapability,
    VendorExtCapability,
)
from .config import ConfigSpace, capability_offsets  # noqa: F401
from .device import DeferredWork, PciDevice  # noqa: F401
from .dma import DmaFault, DmaPort  # noqa: F401
from .irq import IrqIndex, IrqSink  # noqa: F401
from .regs import *  # noqa: F401,F403  (every register name of pci_regs.h)
