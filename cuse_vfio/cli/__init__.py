"""``cuse-vfio``: serve | run | trace | faults | doctor | demo."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional


def _serving_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transport", choices=("auto", "cuse", "fuse"), default="auto",
                   help="CUSE character devices, or files on a FUSE mount (kernels without CUSE); "
                        "auto picks CUSE when /dev/cuse works")
    p.add_argument("--topology", metavar="FILE", help="a TOML topology (default: one edu at 0000:00:02.0, group 2)")
    p.add_argument("--dev-dir", metavar="DIR",
                   help="where the nodes appear (CUSE: a /dev subdirectory; FUSE: a mount point); default "
                        "for CUSE /dev/vfio (/dev/cuse-vfio when the kernel's vfio module owns /dev/vfio/vfio), "
                        "for FUSE dev/ in the runtime directory; `run` shows them to CMD as /dev/vfio")
    p.add_argument("--sysfs-dir", metavar="DIR",
                   help="where the sysfs view is mounted (default: sys/ in the runtime directory)")
    p.add_argument("--trace", metavar="FILE", help="append every request, decoded, as JSON lines")
    p.add_argument("--fault-log", metavar="FILE",
                   help="append every IOMMU fault as a JSON line (they are also logged as they happen)")
    p.add_argument("--model-file", metavar="FILE", action="append", default=[],
                   help="a Python file that registers device models for the topology (repeatable)")
    p.add_argument("--noiommu", action="store_true",
                   help="also offer VFIO_NOIOMMU_IOMMU, as the kernel does with enable_unsafe_noiommu_mode")
    _kernel_abi_option(p)
    p.add_argument("--runtime-dir", metavar="DIR",
                   help="where the hand-off socket, the device-file mount and the default mount points go "
                        "(default: a new directory under /run, removed at exit)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log (-vv: every request)")


def _kernel_abi_option(p: argparse.ArgumentParser) -> None:
    from ..uapi.abi import KERNEL_ABIS

    p.add_argument("--kernel-abi", choices=KERNEL_ABIS, default=None,
                   help="the Linux release whose VFIO the nodes behave as (default: the topology's "
                        "kernel_abi, else 6.1)")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="cuse-vfio", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cuse-vfio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the VFIO nodes until interrupted")
    _serving_options(serve)

    run = sub.add_parser("run", help="serve, run CMD in a private mount namespace that sees the nodes, then stop")
    _serving_options(run)
    run.add_argument("-q", "--quiet", action="store_true", help="say nothing but errors and IOMMU faults")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS]")

    trace = sub.add_parser("trace", help="print a --trace file as a table")
    trace.add_argument("file", help="a file written by --trace; - reads stdin")

    faults = sub.add_parser("faults", help="print a --fault-log file, one fault a line")
    faults.add_argument("file", help="a file written by --fault-log; - reads stdin")

    sub.add_parser("doctor", help="what this machine allows, and the fix for what is missing")

    demo = sub.add_parser("demo", help="run the bundled edu client against the default topology")
    demo.add_argument("--in-process", action="store_true",
                      help="drive the core in-process instead of through real syscalls")
    demo.add_argument("--transport", choices=("auto", "cuse", "fuse"), default="auto")
    _kernel_abi_option(demo)
    demo.add_argument("--build-dir", metavar="DIR", help="where the client, the trace and the fault log go "
                                                         "(default: build/ in the source tree, else "
                                                         "~/.cache/cuse-vfio/demo)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * getattr(args, "verbose", 0)
    logging.basicConfig(level=max(level, logging.DEBUG), format="cuse-vfio: %(levelname)s: %(message)s")
    if args.command == "trace":
        from .trace import print_trace

        return print_trace(args.file)
    if args.command == "faults":
        from .server import print_faults

        return print_faults(args.file)
    if args.command == "doctor":
        from .doctor import run_doctor

        return run_doctor()
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args)
    from .server import EXIT_NOT_STARTED, ServeError, run_command, serve_forever

    # run's own failures exit 125 (as env(1)'s), so they cannot be taken for CMD's status.
    own_failure = EXIT_NOT_STARTED if args.command == "run" else 1
    try:
        if args.command == "serve":
            return serve_forever(args)
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            print("cuse-vfio run: nothing to run: give a command after --", file=sys.stderr)
            return own_failure
        return run_command(args, cmd)
    except ServeError as e:
        print(f"cuse-vfio: {e}", file=sys.stderr)
        return own_failure


if __name__ == "__main__":
    sys.exit(main())
