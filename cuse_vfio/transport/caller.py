"""The process behind one FUSE/CUSE request, as the dispatcher and the core ask for it.

What ``LocalProcess`` is in-process, ``RequestCaller`` is for a real client:
``pid`` (the tgid of the calling thread), ``memory`` (its current image),
``resolve_fd`` (SET_CONTAINER's container fd, hot reset's group fds),
``install_fd`` (GET_DEVICE_FD), ``get_eventfd`` (SET_IRQS).  Files fetched
from the client stay open until the request is over, as ``fdget`` holds a
file for the length of a syscall in the kernel.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, List, Optional

from ..core.ops import ForeignFile
from ..errors import VfioError
from ..memory import ProcessImage, fetch_fd, process_image, tgid_of
from .eventfd import ClientEventfd, is_eventfd

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)


class NotOurs(VfioError):
    """EINVAL: an fd argument that is none of this server's opens (Server.identify)."""


class RequestCaller:
    """Implements ``cuse_vfio.core.ops.Caller`` plus the fd services, for one request."""

    __slots__ = ("server", "tid", "uid", "_pid", "_memory", "_held")

    def __init__(self, server: "Server", tid: int, uid: int = 0):
        self.server = server
        self.tid = tid
        self.uid = uid
        self._pid: Optional[int] = None
        self._memory: Optional[ProcessImage] = None
        self._held: List[int] = []

    def __repr__(self) -> str:
        return f"RequestCaller(tid={self.tid})"

    # Looked up lazily: most requests (GET_API_VERSION, reads) never need it.
    @property
    def pid(self) -> int:
        if self._pid is None:
            self._pid = tgid_of(self.tid)
        return self._pid

    @property
    def memory(self) -> ProcessImage:
        # Bound to the process image of this request: a DMA mapping made now
        # keeps reaching this memory, never the program the client execs next.
        if self._memory is None:
            self._memory = process_image(self.pid)
        return self._memory

    def capable(self, cap: int) -> bool:
        """``capable(cap)``: the calling thread's effective capability set has ``cap``."""
        try:
            with open(f"/proc/{self.tid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"CapEff:"):
                        return bool(int(line.split()[1], 16) >> cap & 1)
        except (OSError, ValueError):
            pass
        return False

    # -- fds in arguments ----------------------------------------------------
    def _fetch(self, fd: int) -> int:
        if fd < 0:
            raise VfioError(errno.EBADF, f"{fd} is not a file descriptor")
        mine = fetch_fd(self.pid, fd)
        self._held.append(mine)
        return mine

    def resolve_fd(self, fd: int) -> object:
        """The object behind the client's ``fd``: Container, Group or DeviceFile of this server,
        or a ForeignFile for any other open file (EBADF for no file at all)."""
        self.server.check_off_loop("resolving an fd argument")
        what = f"fd {fd} of pid {self.pid}"
        try:
            return self.server.identify(self._fetch(fd), what)
        except NotOurs as e:
            return ForeignFile(e.strerror or what)

    def install_fd(self, file_object: object) -> int:
        """GET_DEVICE_FD: open the device file for the client and return the token its library redeems."""
        self.server.check_off_loop("opening a device file")
        return self.server.offer_device_file(self.pid, file_object)

    def get_eventfd(self, fd: int) -> ClientEventfd:
        """eventfd_ctx_fdget: EBADF for a bad fd, EINVAL for an fd that is not an eventfd."""
        mine = self._fetch(fd)
        if not is_eventfd(mine):
            raise VfioError(errno.EINVAL, f"fd {fd} of pid {self.pid} is not an eventfd")
        # Ownership passes to the eventfd object: not closed with the request.
        self._held.remove(mine)
        return ClientEventfd(mine, self.server.eventfd_poller, f"pid {self.pid} fd {fd}")

    def done(self) -> None:
        """The request is over: fdput every file fetched for it."""
        if not self._held:
            return
        held, self._held = self._held, []
        for fd in held:
            self.server.close_fetched(fd)
