"""cuse-vfio: the Linux VFIO interface re-implemented in Python.

Layers (imports run downward only): cli, machine, transport (and sysfs),
dispatch, core, iommu, devices, uapi, memory (and mounts). ``uapi`` and
``core`` never touch a file descriptor of the kernel, so the whole VFIO model
can be driven in-process.
"""

__version__ = "0.1.0"
