"""Client processes as the kernel reaches them.

Memory: :mod:`.process` (through the copier), :mod:`.inline`, :mod:`.shared`;
fds, tid -> tgid, capabilities and limits: :mod:`.pids`.
"""

from .pids import fetch_fd, pidfd_getfd, pidfd_open, tgid_of
from .process import (
    PAGE_SIZE,
    STALL_POOL_SIZE,
    CopyStalled,
    ProcessImage,
    ProcessMemory,
    ResumedMemory,
    StalledCopy,
    process_image,
    serving_thread,
)

__all__ = ["PAGE_SIZE", "STALL_POOL_SIZE", "CopyStalled", "ProcessImage", "ProcessMemory", "ResumedMemory",
           "StalledCopy", "process_image", "fetch_fd", "pidfd_getfd", "pidfd_open", "serving_thread", "tgid_of"]
