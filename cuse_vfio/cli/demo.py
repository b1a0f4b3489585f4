"""``cuse-vfio demo``: the bundled edu client against the default topology, then what it asked.

    ./scripts/demo             # bootstrap, then this
    cuse-vfio demo             # compile examples/vfio-edu-client.c into build/, `run` it with
                               # --trace and --fault-log there, print the trace table and the faults
    cuse-vfio demo --in-process  # the same driver steps in Python, straight into the core (no kernel)

The exit status is the client's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from typing import List

SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: a checkout (or an editable install) has the client in examples/; a wheel carries a copy as package data
IN_SOURCE_TREE = os.path.isfile(os.path.join(SOURCE_TREE, "setup.py"))
CLIENT_SOURCE = (os.path.join(SOURCE_TREE, "examples", "vfio-edu-client.c") if IN_SOURCE_TREE
                 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "vfio-edu-client.c"))


def run_demo(args) -> int:
    from .server import ServeError

    try:
        if getattr(args, "in_process", False):
            return _in_process(args)
        return _through_the_kernel(args)
    except ServeError as e:
        print(f"cuse-vfio demo: {e}", file=sys.stderr)
        return 1


def default_build_dir() -> str:
    """build/ of a source tree; for an installed package, never site-packages: the user's cache."""
    if IN_SOURCE_TREE:
        return os.path.join(SOURCE_TREE, "build")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "cuse-vfio", "demo")


def _build_dir(args) -> str:
    path = os.path.abspath(getattr(args, "build_dir", None) or default_build_dir())
    os.makedirs(path, exist_ok=True)
    return path


def compile_client(build: str, source: str = CLIENT_SOURCE) -> str:
    """gcc -Wall -Werror the edu client into ``build``; the path of the program."""
    from .server import ServeError

    if not os.path.isfile(source):
        raise ServeError(f"{source} is missing: reinstall cuse-vfio, or run the demo from a source tree "
                         f"(git clone, then ./scripts/demo)")
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        raise ServeError("gcc is missing: run ./scripts/bootstrap (it installs gcc and the kernel headers)")
    exe = os.path.join(build, "vfio-edu-client")
    done = subprocess.run([cc, "-Wall", "-Werror", "-O2", "-o", exe, source], capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise ServeError(f"compiling {source} failed (linux-libc-dev missing? run ./scripts/bootstrap)")
    return exe


def _through_the_kernel(args) -> int:
    from .server import ServeError, fault_summary, format_fault, read_faults, run_command
    from .trace import print_trace

    if os.geteuid() != 0:
        raise ServeError("the demo mounts FUSE file systems and a private mount namespace: run it as root")
    build = _build_dir(args)
    exe = compile_client(build)
    trace = os.path.join(build, "demo-trace.jsonl")
    faults = os.path.join(build, "demo-faults.jsonl")
    for path in (trace, faults):
        if os.path.exists(path):
            os.unlink(path)
    options = argparse.Namespace(transport=getattr(args, "transport", "auto"), topology=None, dev_dir=None,
                                 sysfs_dir=None, trace=trace, fault_log=faults, model_file=[], noiommu=False,
                                 runtime_dir=None, quiet=True, kernel_abi=getattr(args, "kernel_abi", None))
    rel = os.path.relpath(exe)
    used = {"transport": "none"}

    def announce(serving) -> None:
        used["transport"] = serving.transport
        how = ("real character devices through /dev/cuse" if serving.transport == "cuse"
               else "files on a FUSE mount")
        print(f"== cuse-vfio demo: transport {serving.transport.upper()}, the VFIO nodes are {how} "
              f"(why: {serving.transport_reason})", flush=True)
        for note in serving.notes:
            print(f"== note: {note}", flush=True)
        print(f"== default topology: edu at 0000:00:02.0 in IOMMU group 2; running `cuse-vfio run -- {rel}`, "
              f"which sees them as /dev/vfio/vfio, /dev/vfio/2 and /sys", flush=True)

    status = run_command(options, [exe], announce=announce)
    print(f"\n== trace ({os.path.relpath(trace)}; `cuse-vfio trace {os.path.relpath(trace)}`)", flush=True)
    print_trace(trace)
    print(f"\n== IOMMU fault log ({os.path.relpath(faults)})")
    records = read_faults(faults) if os.path.exists(faults) else []
    for record in records:
        print(format_fault(record))
    print(fault_summary(records))
    print(f"\n== {rel} exited with status {status} (transport {used['transport'].upper()})")
    return status


def _in_process(args) -> int:
    """The edu client's steps as Python calls into the dispatcher: no kernel, no FUSE, no root."""
    import struct

    from .. import uapi
    from ..machine import Machine
    from ..machine.topology import load
    from ..memory import PAGE_SIZE
    from ..transport.local import LocalProcess
    from .trace import TraceWriter, format_table

    build = _build_dir(args)
    trace_path = os.path.join(build, "demo-trace.jsonl")
    if os.path.exists(trace_path):
        os.unlink(trace_path)
    trace = TraceWriter(trace_path)
    machine = Machine(load(None), trace=trace, kernel_abi=getattr(args, "kernel_abi", None))
    failures: List[str] = []

    def check(ok: bool, what: str) -> None:
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            failures.append(what)

    print("== cuse-vfio demo --in-process: the edu driver's steps, straight into the core (no kernel)")
    p = LocalProcess(machine.dispatcher)
    try:
        c = p.open("/dev/vfio/vfio")
        check(p.ioctl(c, uapi.VFIO_GET_API_VERSION) == uapi.VFIO_API_VERSION, "VFIO_GET_API_VERSION")
        g = p.open("/dev/vfio/2")
        status = uapi.vfio_group_status(argsz=8)
        p.ioctl(g, uapi.VFIO_GROUP_GET_STATUS, status)
        check(bool(status.flags & uapi.VFIO_GROUP_FLAGS_VIABLE), "VFIO_GROUP_GET_STATUS viable")
        p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, struct.pack("<i", c))
        p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        check(True, "VFIO_GROUP_SET_CONTAINER, VFIO_SET_IOMMU(TYPE1v2)")
        buf = p.memory.alloc(2 * PAGE_SIZE)
        p.ioctl(c, uapi.VFIO_IOMMU_MAP_DMA, uapi.vfio_iommu_type1_dma_map(
            argsz=32, flags=3, vaddr=buf, iova=0x100000, size=2 * PAGE_SIZE))
        d = p.ioctl(g, uapi.VFIO_GROUP_GET_DEVICE_FD, b"0000:00:02.0\0")
        check(d >= 0, "VFIO_GROUP_GET_DEVICE_FD 0000:00:02.0")
        config = 7 << 40
        check(p.pread(d, 4, config) == bytes.fromhex("3412e811"), "config space IDs 1234:11e8")
        cmd = int.from_bytes(p.pread(d, 2, config + 4), "little")
        p.pwrite(d, (cmd | 0x6).to_bytes(2, "little"), config + 4)

        def rd(off: int, size: int = 4) -> int:
            return int.from_bytes(p.pread(d, size, off), "little")

        def wr(off: int, value: int, size: int = 4) -> None:
            p.pwrite(d, value.to_bytes(size, "little"), off)

        def wait_idle(off: int, bit: int) -> bool:
            for _ in range(500):  # edu works on a timer, as in QEMU
                if not rd(off, 8 if off >= 0x80 else 4) & bit:
                    return True
                time.sleep(0.01)
            return False

        check(rd(0) == 0x010000ED, "edu ID register 0x010000ed")
        wr(4, 0x12345678)
        check(rd(4) == ~0x12345678 & 0xFFFFFFFF, "edu liveness inverts 0x12345678")
        wr(8, 10)
        check(wait_idle(0x20, 1) and rd(8) == 3628800, "edu factorial 10! = 3628800")
        p.memory.write(buf, bytes(range(1, 65)))
        for src, dst, direction in ((0x100000, 0x40000, 0), (0x40000, 0x101000, 2)):
            wr(0x80, src, 8)
            wr(0x88, dst, 8)
            wr(0x90, 64, 8)
            wr(0x98, 1 | direction, 8)
            wait_idle(0x98, 1)
        check(p.memory.read(buf + 4096, 64) == bytes(range(1, 65)), "edu DMA round trip of 64 bytes")
        wr(0x80, 0x40000, 8)
        wr(0x88, 0x900000, 8)
        wr(0x90, 64, 8)
        wr(0x98, 3, 8)
        wait_idle(0x98, 1)
        check(machine.fault_log.total == 1, "DMA to the unmapped iova 0x900000 is an IOMMU fault")
        p.exit()
    finally:
        machine.close()
        trace.close()
    print(f"\n== trace ({os.path.relpath(trace_path)})")
    with open(trace_path, encoding="utf-8") as f:
        from .trace import read_records

        for line in format_table(read_records(f)):
            print(line)
    print("\n== IOMMU fault log")
    for fault in machine.fault_log.faults():
        print(fault)
    print(f"IOMMU faults: {machine.fault_log.total}")
    print(f"\n== {'PASSED' if not failures else 'FAILED'}: {len(failures)} failure(s) (in-process, no transport)")
    return 1 if failures else 0
