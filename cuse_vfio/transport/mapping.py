"""mmap of a device fd: the policy the kernel would apply, for the preload library to map a memfd.

A FUSE file cannot share the model's pages, so the preload library asks the
hand-off socket which memfd and where (``DeviceFileMapper.map``): the fd is
taken from the peer's own table (pidfd_getfd) and known by its open, as
SET_CONTAINER's container fd is, so a process is answered only for a device
file it holds.  Then do_mmap's checks for a file (``file_mmap_rules``), and
the device's own (``DeviceFile.mmap``).  The memfd stays the model's: the
hand-off only sends it, and only sealed against shrinking (``check_seals``).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import signal
import stat
from typing import Callable, Optional, Tuple

from ..core import DeviceFile
from ..errors import VfioError
from ..memory import PAGE_SIZE, pidfd_getfd
from .handoff import NotADeviceFile, Peer

log = logging.getLogger(__name__)

_MAP_SHARED_VALIDATE = 0x03
_F_GET_SEALS, _F_SEAL_SHRINK = 1034, 0x0002


def file_mmap_rules(offset: int, length: int, prot: int, flags: int, file_flags: int) -> Tuple[int, bool]:
    """do_mmap's checks of a file mapping before the file's own mmap: (length in whole pages, VM_SHARED).

    The system call's part of mmap(), which a FUSE file cannot get from the
    kernel once the preload library maps a memfd in its place: the offset on
    a page, a length, the mapping type, and what the file's open mode allows
    (``file_flags`` is its F_GETFL).  A shared mapping of a file open only
    for reading loses VM_SHARED, so the device's mmap sees a private one.
    """
    page = PAGE_SIZE
    if offset % page:
        raise VfioError(errno.EINVAL, f"mmap offset 0x{offset:x} is not on a page")
    if length == 0:
        raise VfioError(errno.EINVAL, "mmap of 0 bytes")
    length = (length + page - 1) // page * page
    if length >= 1 << 64:
        raise VfioError(errno.ENOMEM, "mmap length overflows")
    access = file_flags & os.O_ACCMODE
    kind = flags & 0x0F  # MAP_TYPE
    if kind in (mmap.MAP_SHARED, _MAP_SHARED_VALIDATE):
        if prot & mmap.PROT_WRITE and access == os.O_RDONLY:
            raise VfioError(errno.EACCES, "a writable shared mapping of a file not open for writing")
        shared = access != os.O_RDONLY
    elif kind == mmap.MAP_PRIVATE:
        shared = False
    else:
        raise VfioError(errno.EINVAL, f"mmap flags 0x{flags:x} are neither shared nor private")
    if access == os.O_WRONLY:
        raise VfioError(errno.EACCES, "mapping a file not open for reading")
    return length, shared


def check_seals(memfd: int, file_object: object) -> None:
    # The client gets the memfd itself.  Unless it is sealed against
    # shrinking, a client that truncates it makes the model's own mapping
    # of it fault, and SIGBUS ends the whole server: such memory is never
    # handed out.  (devices.SharedMemory seals what it creates.)
    try:
        seals = fcntl.fcntl(memfd, _F_GET_SEALS)
    except OSError:
        seals = 0
    if not seals & _F_SEAL_SHRINK:
        log.error("%r: its mappable memory is a memfd not sealed against shrinking, which a client could "
                  "truncate and crash this server; mmap refused (create it with MFD_ALLOW_SEALING and "
                  "add F_SEAL_SHRINK | F_SEAL_GROW, as devices.SharedMemory does)", file_object)
        raise VfioError(errno.EPERM, f"{file_object!r}: mappable memory is not sealed")


def fd_mount_id(pid: int, fd: int) -> Optional[int]:
    """The mount id of process ``pid``'s ``fd`` (None: no such fd), without touching the file."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as e:
        raise VfioError(e.errno or errno.EIO, f"/proc/{pid}/fdinfo/{fd}: {e.strerror}") from None
    raise VfioError(errno.EIO, f"/proc/{pid}/fdinfo/{fd} names no mount")


class DeviceFileMapper:
    """The hand-off's mapper for one server: its device-file mount, and how to know an open of ours.

    ``identify(fd, what)`` names the open behind a fetched fd (the server's
    private identify ioctl); ``close_fetched(fd)`` closes one without waiting
    on the serving loop.
    """

    def __init__(self, identify: Callable[[int, str], object], close_fetched: Callable[[int], None]):
        self.identify = identify
        self.close_fetched = close_fetched
        #: st_dev and mount id of the device-file mount, once it is mounted
        self.device_dev: Optional[int] = None
        self.device_mount_id: Optional[int] = None

    def mounted(self, device_mount: str) -> None:
        """The device-file mount is up: remember which it is."""
        self.device_dev = os.stat(device_mount).st_dev
        root = os.open(device_mount, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.device_mount_id = fd_mount_id(os.getpid(), root)
        finally:
            os.close(root)

    def map(self, peer: Peer, fd: int, offset: int, length: int, prot: int, flags: int) -> Tuple[int, int]:
        """``(memfd, start)`` for the peer's ``mmap(.., prot, flags, fd, offset)``.

        NotADeviceFile for anything but one of our device files: the library
        maps that as the kernel would.  Any local user may ask, about any fd
        of theirs, so nothing is done to the fd before its mount says it is
        ours: an fstat or a close of a file on a FUSE mount of their own
        would wait for their daemon, and with it every hand-off.  The mount
        is read from /proc/<pid>/fdinfo, which never reaches the file system,
        and the peer's pidfd vouches that the pid still was the peer's while
        it was read.
        """
        pid = peer.pid
        if fd < 0:
            raise VfioError(errno.EBADF, f"{fd} is not a file descriptor")
        mount_id = fd_mount_id(pid, fd)
        try:
            signal.pidfd_send_signal(peer.pidfd, 0)
        except ProcessLookupError:
            raise VfioError(errno.ESRCH, f"pid {pid} has exited") from None
        if mount_id is None:
            raise VfioError(errno.EBADF, f"fd {fd} is not open in pid {pid}")
        if mount_id != self.device_mount_id:
            raise NotADeviceFile(f"fd {fd} of pid {pid} is not a device file of this server")
        mine = pidfd_getfd(peer.pidfd, fd)
        try:
            st = os.fstat(mine)
            if not stat.S_ISREG(st.st_mode) or st.st_dev != self.device_dev:
                raise NotADeviceFile(f"fd {fd} of pid {pid} is not a device file of this server")
            file_object = self.identify(mine, f"fd {fd} of pid {pid}")
            if not isinstance(file_object, DeviceFile):
                raise NotADeviceFile(f"fd {fd} of pid {pid} is not a device fd")
            length, shared = file_mmap_rules(offset, length, prot, flags, fcntl.fcntl(mine, fcntl.F_GETFL))
            memory, start = file_object.mmap(offset, length, shared=shared)
            try:
                memfd = memory.fileno()
            except ValueError:  # the model closed it: the device is going away
                raise VfioError(errno.ENODEV, f"the memory of fd {fd} of pid {pid} is gone") from None
            if getattr(memory, "server_maps", True):  # memory this server never maps cannot SIGBUS it
                check_seals(memfd, file_object)
            log.debug("pid %d: mmap of fd %d at 0x%x (+0x%x): memfd at 0x%x", pid, fd, offset, length, start)
            return memfd, start
        finally:
            self.close_fetched(mine)
