"""cuse-vfio: the Linux VFIO interface re-implemented in Python.

Layers (imports run downward only): cli, transport, dispatch, core, iommu,
devices, uapi, memory. ``uapi`` and ``core`` never touch a file descriptor of
the kernel, so the whole VFIO model can be driven in-process.
"""

__version__ = "0.1.0"
