"""Client processes as the kernel reaches them: memory (process_vm_readv/writev), fds (pidfd_getfd), tid -> tgid."""

from .process import PAGE_SIZE, ProcessImage, ProcessMemory, fetch_fd, pidfd_getfd, pidfd_open, process_image, tgid_of

__all__ = ["PAGE_SIZE", "ProcessImage", "ProcessMemory", "process_image", "fetch_fd", "pidfd_getfd", "pidfd_open",
           "tgid_of"]
