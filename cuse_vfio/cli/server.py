"""``cuse-vfio serve`` and ``cuse-vfio run``: a Machine behind a Server, with its sysfs view.

    serving = Serving(options)     # what the command line asked for
    serving.start()                # machine, nodes, device files, hand-off socket, sysfs view
    ...                            # serve: wait for a signal; run: one command in a namespace
    serving.stop()                 # every mount down, every directory it made removed

Everything a run creates lives under one runtime directory (``/run/cuse-vfio.XXXX``
unless ``--runtime-dir``)::

    server/     the Server's own 0700 directory: hand-off socket, device-file mount
    dev/        the FUSE mount of the nodes (FUSE transport, no --dev-dir)
    sys/        the sysfs view (no --sysfs-dir)
    ns/         where ``run``'s namespace builds its private copies of /dev and /sys dirs

``run`` starts CMD through a small helper (:mod:`cuse_vfio.mounts.namespace`, a
separate Python process, so that nothing runs between fork and exec in this
multi-threaded server): it unshares its mount namespace, makes every mount
private, binds the nodes on ``/dev/vfio`` and the view's directories over
``/sys/bus/pci/devices``, ``/sys/kernel/iommu_groups`` and
``/sys/bus/pci/drivers/vfio-pci``, then execs CMD with the client environment.
The server's own view of /dev and /sys never changes.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..devices import load_model_file, model_names
from ..machine import Machine
from ..machine.topology import TopologyError, load
from ..mounts import MNT_DETACH, mountinfo, namespace, umount2
from ..mounts.namespace import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_NOT_STARTED
from ..sysfs import SysfsMount, SysfsViewError
from ..transport.server import Server, choose_transport
from ..transport.shim import TransportError
from .trace import MalformedFile, TraceWriter, open_input, read_records

log = logging.getLogger(__name__)

#: the kernel's vfio container node, which the real vfio module may own
KERNEL_CONTAINER = "/dev/vfio/vfio"
#: where CUSE nodes go when the kernel's vfio module owns /dev/vfio
CUSE_FALLBACK_DIR = "/dev/cuse-vfio"
#: where ``run`` shows the nodes to CMD
CLIENT_DEV_DIR = "/dev/vfio"
#: the directory this package is in, which the namespace helper is started with
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



class ServeError(Exception):
    """Serving cannot start or go on; the message is one sentence with the fix."""


# -- what the command line asked for ----------------------------------------------------
class Serving:
    """The Machine, the Server and the sysfs view of one ``serve`` or ``run``."""

    def __init__(self, options):
        self.options = options
        self.machine: Optional[Machine] = None
        self.server: Optional[Server] = None
        self.sysfs_mount: Optional[SysfsMount] = None
        self.transport = ""                   # "cuse" or "fuse", once chosen
        self.transport_reason = ""
        self.notes: List[str] = []            # sentences about choices made for the user
        self.runtime_dir: Optional[str] = None
        self.sysfs_dir: Optional[str] = None
        self.fault_count = 0
        self._trace = None
        self._fault_file = None
        self._fault_lock = threading.Lock()
        self._unsubscribe: Optional[Callable[[], None]] = None
        self._made_dirs: List[str] = []       # removed (with what they hold) in reverse order by stop()
        self._stopped = False

    # -- start -------------------------------------------------------------------------
    def start(self) -> "Serving":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        opts = self.options
        topology = self._load_topology()
        self._open_outputs()
        try:
            self.machine = Machine(topology, trace=self._trace, noiommu=bool(getattr(opts, "noiommu", False)),
                                   kernel_abi=getattr(opts, "kernel_abi", None))
        except TopologyError as e:
            raise ServeError(str(e)) from None
        self._unsubscribe = self.machine.fault_log.subscribe(self._on_fault)

        self._make_runtime_dir()
        self.transport, self.transport_reason = self._choose_transport()
        dev_dir = self._choose_dev_dir()
        try:
            self.server = server = Server(self.machine.dispatcher, topology.groups.values(), transport=self.transport,
                                          dev_dir=dev_dir, runtime_dir=self.in_runtime_dir("server"))
            server.start()
        except TransportError as e:
            raise ServeError(str(e)) from None
        except OSError as e:
            raise ServeError(f"cannot serve the nodes in {dev_dir}: {e.strerror}"
                             + ("" if os.geteuid() == 0 else " (run as root)")) from None

        owners = sorted({g.uid for g in topology.groups.values() if g.uid != 0})
        closed = _first_closed_parent(server.socket_path)
        if owners and closed:
            self.notes.append(f"{closed} is not searchable by other users, so the group owners' clients (uid "
                              f"{', '.join(map(str, owners))}) cannot reach the hand-off socket and get no "
                              "device fd: give a --runtime-dir they can reach (the default is under /run)")

        self.sysfs_dir = self._mount_point(getattr(opts, "sysfs_dir", None), "sys", "--sysfs-dir")
        try:
            self.sysfs_mount = self.machine.sysfs_view().mount(self.sysfs_dir)
        except SysfsViewError as e:
            raise ServeError(str(e)) from None

    def _load_topology(self):
        for path in getattr(self.options, "model_file", None) or ():
            if not os.path.isfile(path):
                raise ServeError(f"model file {path} does not exist: give the path of a Python file "
                                 "that registers device models")
            try:
                load_model_file(path)
            except Exception as e:  # a user's file: any error is theirs to see, in one line
                where = _traceback_line(e, path)
                raise ServeError(f"model file {path}{where} failed to load: {type(e).__name__}: {e}") from None
        try:
            return load(getattr(self.options, "topology", None), known_models=model_names())
        except TopologyError as e:
            raise ServeError(str(e)) from None

    def _open_outputs(self) -> None:
        trace = getattr(self.options, "trace", None)
        if trace:
            try:
                self._trace = TraceWriter(trace)
            except OSError as e:
                raise ServeError(f"cannot write the trace file {trace}: {e.strerror}") from None
        fault_log = getattr(self.options, "fault_log", None)
        if fault_log:
            try:
                self._fault_file = open(fault_log, "a", encoding="utf-8", buffering=1)
            except OSError as e:
                raise ServeError(f"cannot write the fault log {fault_log}: {e.strerror}") from None

    def in_runtime_dir(self, name: str) -> str:
        assert self.runtime_dir is not None, "_make_runtime_dir() first"
        return os.path.join(self.runtime_dir, name)

    def _running(self) -> Tuple[Server, Machine, SysfsMount]:
        if self.server is None or self.machine is None or self.sysfs_mount is None:
            raise ServeError("not serving: start() has not completed")
        return self.server, self.machine, self.sysfs_mount

    def _make_runtime_dir(self) -> None:
        wanted = getattr(self.options, "runtime_dir", None)
        if wanted:
            try:
                self.runtime_dir = self._make_dir(os.path.abspath(wanted))
            except OSError as e:
                raise ServeError(f"cannot create the runtime directory {wanted}: {e.strerror}") from None
        else:
            base = "/run" if os.access("/run", os.W_OK) else None
            self.runtime_dir = tempfile.mkdtemp(prefix="cuse-vfio.", dir=base)
            self._made_dirs.append(self.runtime_dir)
            # Others may need to reach dev/ and sys/; the server's own part is server/ (0700).
            os.chmod(self.runtime_dir, 0o755)
        self._make_dir(os.path.join(self.runtime_dir, "server"))

    def _choose_transport(self) -> Tuple[str, str]:
        requested = getattr(self.options, "transport", "auto") or "auto"
        if requested == "cuse":
            why = _cuse_unusable()
            if why:
                raise ServeError(f"{why}: load the cuse module (modprobe cuse) or use --transport fuse")
        return choose_transport(requested)

    def _choose_dev_dir(self) -> str:
        wanted = getattr(self.options, "dev_dir", None)
        if self.transport == "cuse":
            if wanted:
                path = os.path.abspath(wanted)
                if os.path.exists(os.path.join(path, "vfio")):
                    raise ServeError(f"{os.path.join(path, 'vfio')} already exists"
                                     + (" (the kernel's vfio module owns it)" if _kernel_owns_vfio(path) else "")
                                     + f": choose another --dev-dir such as {CUSE_FALLBACK_DIR}")
                return path
            if _kernel_owns_vfio():
                self.notes.append(f"the kernel's vfio module owns {KERNEL_CONTAINER}, so the CUSE nodes are in "
                                  f"{CUSE_FALLBACK_DIR} (`cuse-vfio run` shows them to CMD as {CLIENT_DEV_DIR})")
                return CUSE_FALLBACK_DIR
            if os.path.exists(KERNEL_CONTAINER):
                raise ServeError(f"{KERNEL_CONTAINER} already exists (another cuse-vfio?): stop it, or give "
                                 f"--dev-dir {CUSE_FALLBACK_DIR}")
            return CLIENT_DEV_DIR
        if wanted:
            return os.path.abspath(wanted)
        return self._make_dir(self.in_runtime_dir("dev"))

    def _mount_point(self, wanted: Optional[str], default_name: str, option: str) -> str:
        if wanted:
            path = os.path.abspath(wanted)
            if os.path.isdir(path):
                return path
            if os.path.exists(path):
                raise ServeError(f"{option} {path} is not a directory: give a directory to mount on")
            try:
                return self._make_dir(path)
            except OSError as e:
                raise ServeError(f"cannot create {path} for {option}: {e.strerror}") from None
        return self._make_dir(self.in_runtime_dir(default_name))

    def _make_dir(self, path: str) -> str:
        missing = []
        head = path
        while head and not os.path.exists(head):
            missing.append(head)
            head = os.path.dirname(head)
        os.makedirs(path, mode=0o755, exist_ok=True)
        self._made_dirs.extend(reversed(missing))
        return path

    # -- faults ------------------------------------------------------------------------
    def _on_fault(self, fault) -> None:
        with self._fault_lock:
            self.fault_count += 1
            if self._fault_file is not None and not self._fault_file.closed:
                self._fault_file.write(json.dumps({
                    "time": fault.time, "device": fault.device, "iova": fault.iova, "length": fault.length,
                    "direction": fault.direction, "reason": fault.reason, "detail": fault.detail,
                }, separators=(",", ":")) + "\n")
        log.warning("IOMMU fault: %s: DMA %s of %d bytes at iova 0x%x blocked: %s%s",
                    fault.device or "?", fault.direction, fault.length, fault.iova, fault.reason,
                    f" ({fault.detail})" if fault.detail else "")

    # -- what a client needs -------------------------------------------------------------
    def client_env(self, base=None) -> Dict[str, str]:
        return self._running()[0].client_env(base)

    def describe(self) -> List[str]:
        """Where everything is, and the environment a client needs: the lines ``serve`` prints."""
        s, machine, _ = self._running()
        lines = [f"transport: {self.transport.upper()} ({self.transport_reason})"]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"container: {s.container_path}")
        by_group: Dict[int, List[str]] = {}
        for d in machine.topology.devices:
            by_group.setdefault(d.group, []).append(f"{d.bdf} {d.model}")
        for gid in machine.group_ids:
            lines.append(f"group {gid}: {s.group_path(gid)} ({', '.join(by_group.get(gid, []))})")
        lines.append(f"sysfs view: {self.sysfs_dir} (bus/pci/devices, kernel/iommu_groups, "
                     "bus/pci/drivers/vfio-pci, module/vfio*, devices/virtual/iommu, class/iommu)")
        lines.append(f"device files: {s.device_mount}")
        if getattr(self.options, "trace", None):
            lines.append(f"trace: {os.path.abspath(self.options.trace)}")
        if getattr(self.options, "fault_log", None):
            lines.append(f"fault log: {os.path.abspath(self.options.fault_log)}")
        env = s.client_env()
        lines.append("client environment: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
        if os.path.realpath(s.dev_dir) != CLIENT_DEV_DIR:
            lines.append(f"note: a client that opens {CLIENT_DEV_DIR} itself sees these nodes under "
                         "`cuse-vfio run -- CMD` (or serve with --dev-dir /dev/vfio)")
        else:
            first = machine.topology.devices[0].bdf
            lines.append(f"note: QEMU finds the group with -device vfio-pci,sysfsdev={self.sysfs_dir}"
                         f"/bus/pci/devices/{first}")
        return lines

    def namespace_binds(self) -> List[Tuple[str, str]]:
        """(source, target) pairs that make CMD's /dev/vfio and /sys show this server."""
        server, _, sysfs_mount = self._running()
        binds = []
        if os.path.realpath(server.dev_dir) != CLIENT_DEV_DIR:
            binds.append((server.dev_dir, CLIENT_DEV_DIR))
        binds += [(src, dst) for dst, src in sysfs_mount.paths().items()]
        return binds

    # -- stop --------------------------------------------------------------------------
    def stop(self) -> None:
        """Take everything down, in the reverse order of start; safe to call twice or after a failed start."""
        if self._stopped:
            return
        self._stopped = True
        if self.sysfs_mount is not None:
            try:
                self.sysfs_mount.unmount()
            except Exception:
                log.exception("unmounting the sysfs view on %s failed", self.sysfs_dir)
        if self.server is not None:
            try:
                self.server.stop()
            except Exception:
                log.exception("stopping the server failed")
        if self.machine is not None:
            self.machine.close()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._trace is not None:
            self._trace.close()
        with self._fault_lock:
            if self._fault_file is not None:
                self._fault_file.close()
        # A mount of ours that refused to go (a client still inside it) is detached now.
        for path in self._mount_points():
            _detach_if_mounted(path)
        for path in reversed(self._made_dirs):
            _remove_tree(path)

    def _mount_points(self) -> List[str]:
        points = [self.sysfs_dir]
        if self.server is not None and self.server.runtime_dir:
            points.append(self.server.device_mount)
            if self.transport == "fuse":
                points.append(self.server.dev_dir)
        return [p for p in points if p]

    def __enter__(self) -> "Serving":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- serve --------------------------------------------------------------------------------
class _Signals:
    """SIGINT/SIGTERM/SIGHUP as an event; each signal also goes to ``forward`` when set."""

    NAMES = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.event = threading.Event()
        self.received: Optional[int] = None
        self.forward: Optional[Callable[[int], None]] = None
        self._saved = {}

    def __enter__(self) -> "_Signals":
        for sig in self.NAMES:
            self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, sig, frame) -> None:
        self.received = sig
        self.event.set()
        if self.forward is not None:
            self.forward(sig)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def serve_forever(args) -> int:
    """``cuse-vfio serve``: print where everything is, serve until SIGINT/SIGTERM/SIGHUP, tear down."""
    serving = Serving(args)
    with _Signals() as signals:
        try:
            serving.start()
            for line in serving.describe():
                print(line, flush=True)
            print(f"ready: serving until SIGINT or SIGTERM (pid {os.getpid()})", flush=True)
            while not signals.event.wait(1.0):
                pass
            assert signals.received is not None  # the handler sets it before the event
            print(f"stopping ({signal.Signals(signals.received).name})", flush=True)
        finally:
            serving.stop()
    if serving.fault_count:
        print(f"{serving.fault_count} IOMMU fault(s) while serving", flush=True)
    return 0


# -- run ----------------------------------------------------------------------------------
def run_command(args, cmd: Sequence[str], *, announce: Optional[Callable[[Serving], None]] = None) -> int:
    """``cuse-vfio run``: serve, run ``cmd`` in a private mount namespace, tear down; CMD's status.

    ``announce(serving)`` is called once everything serves, before CMD starts.
    """
    serving = Serving(args)
    quiet = getattr(args, "quiet", False)
    with _Signals() as signals:
        try:
            serving.start()
            if announce is not None:
                announce(serving)
            if not quiet:
                print(f"cuse-vfio run: {serving.transport.upper()} transport ({serving.transport_reason}); "
                      f"CMD sees the nodes in {CLIENT_DEV_DIR} and the sysfs view in /sys", file=sys.stderr,
                      flush=True)
                for note in serving.notes:
                    print(f"cuse-vfio run: {note}", file=sys.stderr, flush=True)
            if signals.received is not None:  # stopped while starting: CMD never runs
                return 128 + signals.received
            status = _run_in_namespace(serving, list(cmd), signals)
        finally:
            serving.stop()
    if serving.fault_count and not quiet:
        print(f"cuse-vfio run: {serving.fault_count} IOMMU fault(s) during the run", file=sys.stderr, flush=True)
    return status


def _run_in_namespace(serving: Serving, cmd: List[str], signals: _Signals) -> int:
    cwd = os.getcwd()
    staging = serving._make_dir(serving.in_runtime_dir("ns"))
    os.chmod(staging, 0o700)
    spec = json.dumps({
        "binds": serving.namespace_binds(),
        "staging": staging,
        "argv": cmd,
        "env": serving.client_env(os.environ),
    }).encode()
    spec_r, spec_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    # The helper itself runs without the hand-off library (CMD gets it from the spec) and
    # without the caller's Python settings: it finds this package, and only the standard
    # library besides.
    helper_env = {k: v for k, v in os.environ.items()
                  if k not in ("LD_PRELOAD", "CUSE_VFIO_SOCKET") and not k.startswith("PYTHON")}
    helper_env["PYTHONPATH"] = PACKAGE_ROOT
    try:
        proc = subprocess.Popen([sys.executable, "-s", "-m", namespace.__name__, str(spec_r), str(status_w)],
                                env=helper_env, pass_fds=(spec_r, status_w), cwd=cwd)
    except OSError as e:
        for fd in (spec_r, spec_w, status_r, status_w):
            os.close(fd)
        raise ServeError(f"cannot start the namespace helper {sys.executable}: {e.strerror}") from None
    os.close(spec_r)
    os.close(status_w)

    def forward(sig: int) -> None:
        # A terminal's Ctrl-C has already reached CMD (it is in our foreground process group).
        if sig == signal.SIGINT and _in_foreground():
            return
        try:
            proc.send_signal(sig)
        except OSError:
            pass

    signals.forward = forward
    if signals.received is not None:  # arrived while CMD was being started
        forward(signals.received)
    try:
        try:
            with os.fdopen(spec_w, "wb") as f:
                f.write(spec)
        except BrokenPipeError:
            pass  # the helper died first; its status says why
        with os.fdopen(status_r, "rb") as status_file:
            problem = status_file.read().decode(errors="replace").strip()  # EOF without a word: CMD was exec'd
        rc = proc.wait()
    finally:
        signals.forward = None
    if problem:
        print(f"cuse-vfio run: {problem}", file=sys.stderr, flush=True)
        return rc if rc in (EXIT_NOT_FOUND, EXIT_CANNOT_EXECUTE) else EXIT_NOT_STARTED
    return 128 - rc if rc < 0 else rc


def _in_foreground() -> bool:
    try:
        with open("/dev/tty", "rb") as tty:
            return os.tcgetpgrp(tty.fileno()) == os.getpgrp()
    except OSError:
        return False


# -- the fault log file -------------------------------------------------------------------------
def read_faults(path: str) -> List[dict]:
    """The records of a ``--fault-log`` file (``-``: stdin); a line that is not one is MalformedFile."""
    with open_input(path) as f:
        return list(read_records(f, what="fault record"))


def format_fault(record: dict) -> str:
    return (f"{record.get('device') or '?'}: DMA {record.get('direction', '?')} of {record.get('length', 0)} bytes "
            f"at iova 0x{int(record.get('iova', 0)):x} blocked: {record.get('reason', '?')}"
            + (f" ({record['detail']})" if record.get("detail") else ""))


def print_faults(path: str, out=None) -> int:
    """``cuse-vfio faults FILE``: one line per fault, then how many by reason."""
    out = out or sys.stdout
    name = "stdin" if path == "-" else path
    try:
        records = read_faults(path)
    except OSError as e:
        print(f"cuse-vfio faults: cannot read {name}: {e.strerror}", file=sys.stderr)
        return 1
    except MalformedFile as e:
        print(f"cuse-vfio faults: {name}: {e} (is it a --fault-log file?)", file=sys.stderr)
        return 1
    for record in records:
        print(format_fault(record), file=out)
    print(fault_summary(records), file=out)
    return 0


def fault_summary(records: List[dict]) -> str:
    if not records:
        return "IOMMU faults: none"
    reasons: Dict[str, int] = {}
    for r in records:
        reasons[r.get("reason", "?")] = reasons.get(r.get("reason", "?"), 0) + 1
    return f"IOMMU faults: {len(records)} (" + ", ".join(f"{n} {why}" for why, n in sorted(reasons.items())) + ")"


# -- teardown helpers -------------------------------------------------------------------------
def _detach_if_mounted(path: str) -> None:
    if not mountinfo().get(path, "").startswith("fuse"):
        return
    log.warning("%s was still mounted after stopping: detaching it", path)
    try:
        umount2(path, MNT_DETACH)
    except OSError as e:
        log.error("cannot detach %s: %s", path, os.strerror(e.errno or 0))


def _remove_tree(path: str) -> None:
    """Remove a directory this run made, unless something is still mounted in it."""
    if not os.path.isdir(path):
        return
    prefix = path.rstrip("/") + "/"
    if any(m == path or m.startswith(prefix) for m in mountinfo()):
        log.warning("%s is left in place: something is still mounted in it", path)
        return
    shutil.rmtree(path, ignore_errors=True)


def _first_closed_parent(path: str) -> Optional[str]:
    """The first directory above ``path`` that other users cannot search (None: all can)."""
    parent = os.path.dirname(os.path.abspath(path))
    chain = []
    while True:
        chain.append(parent)
        if parent == "/":
            break
        parent = os.path.dirname(parent)
    for directory in reversed(chain):
        try:
            if not os.stat(directory).st_mode & stat.S_IXOTH:
                return directory
        except OSError:
            return directory
    return None


# -- what the machine has ----------------------------------------------------------------------
def _cuse_unusable() -> str:
    """Why /dev/cuse cannot serve nodes ("" when it can)."""
    if not os.path.exists("/dev/cuse"):
        return "/dev/cuse is missing"
    try:
        os.close(os.open("/dev/cuse", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return f"/dev/cuse cannot be opened ({e.strerror})"
    return ""


def _kernel_owns_vfio(dev_dir: str = "/dev/vfio") -> bool:
    """Is ``<dev_dir>/vfio`` the kernel vfio module's container (misc device 10:196, VFIO_MINOR)?"""
    try:
        st = os.stat(os.path.join(dev_dir, "vfio"))
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (10, 196)


def _traceback_line(e: BaseException, path: str) -> str:
    if isinstance(e, SyntaxError) and e.lineno:
        return f", line {e.lineno},"
    tb = e.__traceback__
    line = None
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return f", line {line}," if line else ""
