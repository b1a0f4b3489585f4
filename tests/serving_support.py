"""What the client tests of the serving layer share: the transport they run on,
a served Server that is always taken down, and the name=value output of their C clients."""

import contextlib
import os
import subprocess

#: fuse here; CUSE_VFIO_TEST_TRANSPORT=cuse runs the same tests on CUSE (inside scripts/vm)
TRANSPORT = os.environ.get("CUSE_VFIO_TEST_TRANSPORT", "fuse")
#: a bound for a hung client, never a measurement
CLIENT_TIMEOUT = 60


def unmount(path):
    if path and os.path.ismount(path):
        subprocess.run(["umount", "-l", path], check=False)


@contextlib.contextmanager
def serving(server):
    """Start ``server``; stop it and make sure none of its mounts survive, whatever happens."""
    try:
        server.start()
        yield server
    finally:
        mounts = (server.dev_dir, server.device_mount if server.runtime_dir else None)
        server.stop()
        for path in mounts:
            unmount(path)


def parse_values(text):
    """A client's "name=value" lines as {name: int}."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        out[key] = int(value)
    return out
