"""What serving runs on: its directories, the loop and its sessions, the workers, the stall pool, the hand-off socket.

``start`` makes them, in an order that lets each find what it needs;
``stop`` takes them down in the reverse order, bounded in time, and removes
only the directories and mounts it made itself.  Nothing here knows a node,
a file or a VFIO rule: sessions come from the file systems that serve them.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional

from ..memory import STALL_POOL_SIZE, serving_thread
from ..mounts import MountPointError, canonical, detach, refuse_mount_point, top_device
from .eventfd import EventfdPoller
from .handoff import Handoff, Mapper
from .shim import Loop, Session, TransportError

log = logging.getLogger(__name__)


def _rmdir_quietly(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


class Runtime:
    """The runtime directory (0711: every user reaches the socket by name, nobody lists it), and the rest."""

    def __init__(self, runtime_dir: Optional[str], workers: int):
        self._runtime_dir_arg = runtime_dir
        self.runtime_dir: Optional[str] = None
        self._workers_count = workers
        self.loop: Optional[Loop] = None
        self.loop_thread: Optional[threading.Thread] = None
        #: every thread that served the loop and may still be in a request (one stalled in a client's memory)
        self._loop_threads: List[threading.Thread] = []
        self.workers: Optional[ThreadPoolExecutor] = None
        #: where requests whose client memory stalled are finished (a thread can wait for each
        #: stalled copy, so a stalling client never takes the workers from the others)
        self.stalls: Optional[ThreadPoolExecutor] = None
        self.handoff: Optional[Handoff] = None
        self.eventfd_poller: Optional[EventfdPoller] = None
        self.sessions: List[Session] = []
        self.stopping = False
        self._created_runtime_dir = False
        self._created_dirs: List[str] = []

    @property
    def device_mount(self) -> str:
        """The FUSE mount device fds are files of (inside the 0711 runtime dir, 0700 itself)."""
        return os.path.join(self.runtime_dir or "", "devices")

    @property
    def socket_path(self) -> str:
        return os.path.join(self.runtime_dir or "", "handoff.sock")

    # -- start -----------------------------------------------------------------------
    def start(self, mapper: Mapper, handoff_ttl: float) -> None:
        """The runtime directory, the eventfd poller, the hand-off socket, the workers, the loop."""
        self._make_runtime_dir()
        self.eventfd_poller = EventfdPoller()
        self.handoff = Handoff(self.socket_path, ttl=handoff_ttl, mapper=mapper)
        self.handoff.start()
        # Handlers run on the loop, the workers and the stall pool, and may hold the model's lock:
        # none of them waits for client memory past the short check (serving_thread).
        self.workers = ThreadPoolExecutor(max_workers=self._workers_count, thread_name_prefix="cuse-vfio-worker",
                                          initializer=serving_thread)
        self.stalls = ThreadPoolExecutor(max_workers=STALL_POOL_SIZE, thread_name_prefix="cuse-vfio-stalled",
                                         initializer=serving_thread)
        self.loop = Loop()
        os.makedirs(self.device_mount, mode=0o700, exist_ok=True)
        self.refuse_mount_point(self.device_mount, "the device-file mount point (in --runtime-dir)")

    @staticmethod
    def refuse_mount_point(path: str, what: str) -> None:
        try:
            refuse_mount_point(path, what)
        except MountPointError as e:
            raise TransportError(str(e)) from None

    def _make_runtime_dir(self) -> None:
        if self._runtime_dir_arg:
            os.makedirs(self._runtime_dir_arg, mode=0o700, exist_ok=True)
            self.runtime_dir = os.path.abspath(self._runtime_dir_arg)
        else:
            base = "/run" if os.access("/run", os.W_OK) else None
            self.runtime_dir = tempfile.mkdtemp(prefix="cuse-vfio.", dir=base)
            self._created_runtime_dir = True
        # Every local user must reach the hand-off socket by its name (a client
        # need not be root), but nobody lists or changes what is in here.
        os.chmod(self.runtime_dir, 0o711)

    def make_dir(self, path: str, mode: int) -> None:
        """A directory serving needs (the nodes' mount point); removed at stop only if made here."""
        if not os.path.isdir(path):
            os.makedirs(path, mode=mode)
            self._created_dirs.append(path)

    def add_session(self, session: Session) -> None:
        assert self.loop is not None, "start() first"
        if session.kind == "fuse":
            # What "ours" is at that mount point: detach_mounts touches nothing else.
            session.device = top_device(canonical(session.where))
        self.sessions.append(session)
        self.loop.add(session)

    def run_loop(self) -> None:
        self.start_loop_thread()

    def start_loop_thread(self) -> None:
        """A thread that serves the loop: the first, or one that takes over from a thread that stalled
        in a request (which leaves the loop once that request ends: ``retire_loop_thread``)."""
        self.loop_thread = threading.Thread(target=self._serve, name="cuse-vfio-loop", daemon=True)
        self._loop_threads = [t for t in self._loop_threads if t.is_alive()] + [self.loop_thread]
        self.loop_thread.start()

    def _serve(self) -> None:
        assert self.loop is not None, "start() first"
        serving_thread()  # everyone waits for this thread: client memory never holds it past the short check
        try:
            rc = self.loop.run()
        finally:
            serving_thread(False)
        if rc < 0 and not self.stopping:
            log.error("the serving loop stopped: %s", os.strerror(-rc))

    def on_loop_thread(self) -> bool:
        return self.loop is not None and threading.get_ident() == self.loop.thread_ident

    def holds_nothing(self) -> bool:
        """The calling thread serves the loop, and no request but the one it is in: a request the
        loop serves inside another one's (a drain) would hold that one too while it waits."""
        loop = self.loop
        return loop is not None and not loop.nested and threading.get_ident() == loop.thread_ident

    def leave_loop(self) -> None:
        """No thread serves the loop until the next ``start_loop_thread`` runs."""
        if self.loop is not None:
            self.loop.thread_ident = None

    def retire_loop_thread(self) -> None:
        """This thread (another serves the loop now) leaves the loop once its request ends."""
        if self.loop is not None:
            self.loop.retire()

    def accepts_work(self) -> bool:
        return not self.stopping and self.workers is not None

    # -- stop ------------------------------------------------------------------------
    def stop(self, timeout: float, release_all: Callable[[], None]) -> None:
        """Down in the reverse order of start; ``release_all`` ends what clients still hold.

        Safe to call twice or after a failed start.
        """
        if self.stopping:
            return
        self.stopping = True
        # 1. Let in-flight deferred requests finish while the loop still serves
        #    them, for a bounded time: a worker stuck (in a client's own FUSE
        #    file, say) is left behind.
        deadline = time.monotonic() + timeout
        for pool in (self.workers, self.stalls):
            if pool is None:
                continue
            pool.shutdown(wait=False)
            for worker in list(getattr(pool, "_threads", ())):
                worker.join(max(0.0, deadline - time.monotonic()))
                if worker.is_alive():
                    log.error("%s is still busy after %g s: stopping without it", worker.name, timeout)
        # 2. Unredeemed device files are closed, which the loop turns into releases.
        if self.handoff is not None:
            self.handoff.stop()
        # 3. Stop the loop, then the kernel connections (nothing can reply to them any more).
        if self.loop is not None:
            self.loop.stop()
        if self.loop_thread is not None:
            self.loop_thread.join(timeout=timeout)
            if self.loop_thread.is_alive():
                # The sessions cannot be freed under the loop; at least leave nothing mounted.
                log.error("the serving loop did not stop; its mounts are detached, sessions left to process exit")
                self.detach_mounts()
                return
        for thread in self._loop_threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t for t in self._loop_threads if t.is_alive()]
        if stuck:
            # A thread the loop left is still in a request, waiting in a client's memory: it would
            # answer through its session when the copy ends, so the sessions outlive this server.
            log.error("%d thread(s) still wait in a client's memory; their mounts are detached, "
                      "their sessions left to process exit", len(stuck))
            self.detach_mounts()
        else:
            for session in reversed(self.sessions):
                session.free()
            if self.loop is not None:
                self.loop.free()
        self.sessions.clear()
        # 4. Whatever clients still hold is gone now: release it like their exit would.
        release_all()
        if self.eventfd_poller is not None:
            self.eventfd_poller.stop()
        for path in reversed(self._created_dirs):
            _rmdir_quietly(path)
        if self.runtime_dir:
            _rmdir_quietly(self.device_mount)
            if self._created_runtime_dir:
                shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def detach_mounts(self) -> None:
        """Lazily unmount every FUSE mount of ours, without a lookup its (stuck) daemon would answer."""
        for session in self.sessions:
            if session.kind != "fuse":
                continue
            where = canonical(session.where)
            if session.device is None or top_device(where) != session.device:
                log.error("%s: the mount there is not the one this server made; left alone", session.where)
                continue
            try:
                detach(session.where)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: not mounted (any more)
                    log.error("cannot detach %s: %s", session.where, os.strerror(e.errno or 0))
