"""virtio devices on the PCI transport.

* :mod:`.virtqueue` -- split virtqueues, every access DMA through the IOMMU.
* :mod:`.pci` -- the transitional virtio PCI transport (legacy I/O BAR, modern
  capabilities in a memory BAR, MSI-X, INTx with the ISR).
* :mod:`.net` -- virtio-net (model ``virtio-net``).
* :mod:`.backends` -- where its frames go: loopback, a TAP interface, a pcap record.
"""

from . import net  # noqa: F401  (registers "virtio-net")
