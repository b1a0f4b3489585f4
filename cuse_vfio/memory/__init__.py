"""Client processes as the kernel reaches them: memory (process_vm_readv/writev), fds (pidfd_getfd), tid -> tgid."""

from .process import ProcessMemory, fetch_fd, pidfd_getfd, pidfd_open, tgid_of

__all__ = ["ProcessMemory", "fetch_fd", "pidfd_getfd", "pidfd_open", "tgid_of"]
