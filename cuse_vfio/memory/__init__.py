"""Client processes as the kernel reaches them: memory (process_vm_readv/writev), fds (pidfd_getfd), tid -> tgid."""

from .process import (
    PAGE_SIZE,
    STALL_POOL_SIZE,
    CopyStalled,
    ProcessImage,
    ProcessMemory,
    ResumedMemory,
    StalledCopy,
    fetch_fd,
    pidfd_getfd,
    pidfd_open,
    process_image,
    serving_thread,
    tgid_of,
)

__all__ = ["PAGE_SIZE", "STALL_POOL_SIZE", "CopyStalled", "ProcessImage", "ProcessMemory", "ResumedMemory",
           "StalledCopy", "process_image", "fetch_fd", "pidfd_getfd", "pidfd_open", "serving_thread", "tgid_of"]
