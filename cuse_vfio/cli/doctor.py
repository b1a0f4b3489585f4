"""``cuse-vfio doctor``: what this machine allows, and what follows, one line each.

Every check is tried for real where it can be (open /dev/cuse, read a child's
memory, take a child's fd, unshare in a child, serve the FUSE nodes and ask
them for VFIO_GET_API_VERSION), never guessed from a config file.  Lines are

    ok    what works and what it gives
    no    what is missing, what follows, and the fix
    warn  what works in a way the user may not expect

The exit status is 0 when the FUSE path (the one that works without CUSE) does.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional

from ..mounts import CLONE_NEWNS, unshare


@dataclass
class Finding:
    name: str
    ok: bool
    text: str
    fix: str = ""
    #: the FUSE path (serve/run without CUSE) needs this
    needed: bool = False
    warn: bool = False

    def line(self) -> str:
        mark = "warn" if self.warn and self.ok else ("ok" if self.ok else "no")
        return f"{mark:<5} {self.name:<16} {self.text}" + (f": {self.fix}" if self.fix and not self.ok or
                                                            self.fix and self.warn else "")


def run_doctor(out=None) -> int:
    out = out or sys.stdout
    findings: List[Finding] = []
    # Checks that fork come first, while this process has one thread.
    for check in (check_root, check_cuse, check_fuse, check_ptrace, check_pidfd, check_namespaces,
                  check_kernel_vfio, check_built, check_fuse_serving):
        try:
            finding = check()
        except Exception as e:  # a check that breaks is itself a finding, never a traceback
            finding = Finding(check.__name__[6:], False, f"the check failed: {type(e).__name__}: {e}")
        findings.append(finding)
        print(finding.line(), file=out, flush=True)
    fuse_ok = all(f.ok for f in findings if f.needed)
    cuse_ok = next(f.ok for f in findings if f.name == "CUSE")
    ns_ok = next(f.ok for f in findings if f.name == "mount namespace")
    if fuse_ok:
        transport = "CUSE character devices" if cuse_ok else "files on a FUSE mount (no CUSE here)"
        verdict = f"cuse-vfio can serve: `cuse-vfio serve` and `run` use {transport}"
        if not ns_ok:
            verdict += "; `run` cannot make its namespace, so point clients at the paths `serve` prints"
    else:
        missing = ", ".join(f.name for f in findings if f.needed and not f.ok)
        verdict = f"cuse-vfio cannot serve on this machine until these are fixed: {missing}"
    print(verdict, file=out)
    return 0 if fuse_ok else 1


# -- the checks ------------------------------------------------------------------------------
def check_root() -> Finding:
    if os.geteuid() == 0:
        return Finding("user", True, "root: FUSE mounts with allow_other, other processes' memory and fds")
    return Finding("user", False, f"uid {os.geteuid()}, not root: the server reads clients' memory and fds and "
                   "mounts with allow_other", "run cuse-vfio as root (sudo)", needed=True)


def check_cuse() -> Finding:
    from .server import _cuse_unusable

    why = _cuse_unusable()
    if not why:
        return Finding("CUSE", True, "/dev/cuse opens: the nodes can be real character devices (--transport cuse)")
    return Finding("CUSE", False, f"{why}, so only FUSE is possible (the nodes are files on a FUSE mount)",
                   "load the cuse module (modprobe cuse) or use --transport fuse")


def check_fuse() -> Finding:
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return Finding("FUSE", False, f"/dev/fuse cannot be opened ({e.strerror}): no transport at all",
                       "load the fuse module (modprobe fuse), or give the container /dev/fuse", needed=True)
    tool = shutil.which("fusermount3")
    if tool is None:
        return Finding("FUSE", False, "/dev/fuse opens but fusermount3 is missing (it unmounts the sysfs view)",
                       "apt-get install fuse3 (./scripts/bootstrap does)", needed=True)
    return Finding("FUSE", True, f"/dev/fuse opens and {tool} is there: device fds, FUSE nodes, the sysfs view",
                   needed=True)


def _with_child(body: Callable[[int], Finding]) -> Finding:
    """Run ``body(pid)`` against a child that sleeps until killed."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            signal.pause()
        finally:
            os._exit(0)
    try:
        return body(pid)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


_probe = ctypes.create_string_buffer(b"cuse-vfio doctor probe")


def check_ptrace() -> Finding:
    from ..errors import VfioError
    from ..memory import ProcessMemory

    scope = _read("/proc/sys/kernel/yama/ptrace_scope")
    where = f" (yama ptrace_scope {scope})" if scope is not None else " (no Yama LSM)"

    def body(pid: int) -> Finding:
        try:
            data = ProcessMemory(pid).read(ctypes.addressof(_probe), len(_probe.raw))
        except VfioError as e:
            fix = ("echo 1 > /proc/sys/kernel/yama/ptrace_scope (3 can only be lowered by a reboot)"
                   if scope == "3" else "run as root (CAP_SYS_PTRACE)")
            return Finding("ptrace access", False, f"process_vm_readv on a child failed{where}: {e.strerror}; "
                           "ioctl arguments on FUSE and every DMA need it", fix, needed=True)
        if data != _probe.raw:
            return Finding("ptrace access", False, "process_vm_readv on a child read the wrong bytes",
                           needed=True)
        return Finding("ptrace access", True, f"process_vm_readv on a child works{where}: ioctl arguments "
                       "(FUSE) and DMA into clients' memory", needed=True)

    return _with_child(body)


def check_pidfd() -> Finding:
    from ..errors import VfioError
    from ..memory import fetch_fd

    r, w = os.pipe()

    def body(pid: int) -> Finding:
        try:
            fd = fetch_fd(pid, r)
        except VfioError as e:
            fix = ("needs Linux 5.6 or later" if e.errno in (errno.ENOSYS, errno.EINVAL)
                   else "run as root (pidfd_getfd needs ptrace access to the client)")
            return Finding("pidfd_getfd", False, f"taking a child's fd failed ({e.strerror}): the container fd "
                           "of VFIO_GROUP_SET_CONTAINER and the eventfds of SET_IRQS cannot be resolved", fix,
                           needed=True)
        same = os.fstat(fd).st_ino == os.fstat(r).st_ino
        os.close(fd)
        return Finding("pidfd_getfd", same, "pidfd_open + pidfd_getfd on a child work: SET_CONTAINER's "
                       "container fd and SET_IRQS's eventfds" if same else "pidfd_getfd returned another file",
                       needed=True)

    try:
        return _with_child(body)
    finally:
        os.close(r)
        os.close(w)


def check_namespaces() -> Finding:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            unshare(CLONE_NEWNS)
        except OSError as e:
            os._exit(min(e.errno or 0, 255) or 1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return Finding("mount namespace", True, "unshare(CLONE_NEWNS) works in a child: `cuse-vfio run` shows "
                       "CMD the nodes at /dev/vfio and the sysfs view in /sys")
    why = os.strerror(code) if code > 0 else f"killed by signal {-code}"
    return Finding("mount namespace", False, f"unshare(CLONE_NEWNS) failed in a child ({why}): `cuse-vfio run` "
                   "cannot work", "run as root, or outside a container that forbids unshare (seccomp); "
                   "`cuse-vfio serve` still works for clients that take node paths")


def check_kernel_vfio() -> Finding:
    from .server import CUSE_FALLBACK_DIR, KERNEL_CONTAINER, _kernel_owns_vfio

    if _kernel_owns_vfio():
        return Finding("kernel vfio", True, f"the kernel's vfio module owns {KERNEL_CONTAINER}: CUSE nodes go to "
                       f"{CUSE_FALLBACK_DIR}, and `cuse-vfio run` shows them to CMD as /dev/vfio",
                       warn=True)
    if os.path.exists(KERNEL_CONTAINER):
        return Finding("kernel vfio", True, f"{KERNEL_CONTAINER} exists but is not the kernel's (another "
                       "cuse-vfio serving?)", "stop it, or give --dev-dir", warn=True)
    loaded = " (module loaded, no container node)" if os.path.isdir("/sys/module/vfio") else ""
    return Finding("kernel vfio", True, f"/dev/vfio is free{loaded}: CUSE nodes can be /dev/vfio/vfio and "
                   "/dev/vfio/N for every process")


def check_built() -> Finding:
    from ..transport.server import PRELOAD_LIBRARY

    try:
        importlib.import_module("cuse_vfio.transport.shim")  # loads the cffi module
    except ImportError as e:
        return Finding("built parts", False, f"the C shim does not load ({e})", "run ./scripts/bootstrap",
                       needed=True)
    if not os.path.exists(PRELOAD_LIBRARY):
        return Finding("built parts", False, f"{PRELOAD_LIBRARY} is missing: clients cannot receive device fds",
                       "run ./scripts/bootstrap", needed=True)
    return Finding("built parts", True, f"the C shim loads and the hand-off library is built ({PRELOAD_LIBRARY})",
                   needed=True)


def check_fuse_serving() -> Finding:
    """Serve the default topology on FUSE for a moment and ask the container for its API version."""
    import tempfile

    from ..machine import Machine
    from ..machine.topology import load
    from ..transport.server import Server
    from ..uapi.ioctls import VFIO_API_VERSION, VFIO_GET_API_VERSION

    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        return Finding("FUSE serving", False, "not tried (needs root and /dev/fuse, above)", needed=True)
    machine = Machine(load(None))
    top = tempfile.mkdtemp(prefix="cuse-vfio-doctor.", dir="/run" if os.access("/run", os.W_OK) else None)
    server = Server(machine.dispatcher, machine.topology.groups.values(), transport="fuse",
                    dev_dir=os.path.join(top, "dev"), runtime_dir=os.path.join(top, "server"))
    try:
        server.start()
        fd = os.open(server.container_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            version = libc.ioctl(fd, ctypes.c_ulong(VFIO_GET_API_VERSION), ctypes.c_ulong(0))
        finally:
            os.close(fd)
        if version != VFIO_API_VERSION:
            return Finding("FUSE serving", False, f"VFIO_GET_API_VERSION through the FUSE node gave {version}",
                           needed=True)
        return Finding("FUSE serving", True, "served the default topology on FUSE and a real ioctl on its "
                       "container node answered VFIO_GET_API_VERSION", needed=True)
    except Exception as e:
        return Finding("FUSE serving", False, f"serving on FUSE failed: {e}", needed=True)
    finally:
        server.stop()
        machine.close()
        for sub in ("dev", "server", ""):
            try:
                os.rmdir(os.path.join(top, sub))
            except OSError:
                pass


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None
