"""The emulated machine: a topology file, and the host it describes (QEMU's boards, below its command line).

* :mod:`.topology` -- topology files: which devices, at which PCI addresses,
  in which IOMMU groups, with which owners and modes for the group nodes.
* :mod:`.board` -- ``Machine``: what a booted kernel would have for that
  topology (functions from their models, IOMMU groups, vfio-pci, the IOMMU
  drivers, a Dispatcher in front) and its sysfs view.

The command line and the tests build machines the same way:
``Machine(load(path))``; a transport then serves ``machine.dispatcher``.
"""

from .board import Machine
from .topology import DEFAULT_TOPOLOGY, DeviceSpec, Topology, TopologyError, load, parse

__all__ = ["DEFAULT_TOPOLOGY", "DeviceSpec", "Machine", "Topology", "TopologyError", "load", "parse"]
