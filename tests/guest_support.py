"""Running scripts/guest from the tests: one command in a guest whose devices
are cuse-vfio's, passed through by QEMU; the output parsed as ``name=value``
lines."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "scripts", "guest")
#: a bound for a hung guest, never a measurement
TIMEOUT = 600


def run_guest(*args, timeout=TIMEOUT, cwd=ROOT, netns=None):
    """scripts/guest ARGS (options, then ``--`` and the command), in network namespace ``netns`` if
    given; its CompletedProcess."""
    where = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run(where + [GUEST, "--timeout", str(timeout)] + list(args), cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=timeout + 60)


def values(text):
    """{name: value} of the ``name=value`` lines (the last one wins)."""
    out = {}
    for line in text.splitlines():
        name, eq, value = line.partition("=")
        if eq and name and " " not in name:
            out[name] = value
    return out


def explain(proc):
    """What to show when an assertion on a guest run fails."""
    return "exit %d\n--- stdout\n%s\n--- stderr\n%s" % (proc.returncode, proc.stdout, proc.stderr)
