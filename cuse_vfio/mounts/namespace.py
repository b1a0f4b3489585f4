"""``cuse-vfio run``'s helper: build CMD's mount namespace, then exec CMD.

Run as ``python -s -m cuse_vfio.mounts.namespace SPEC_FD STATUS_FD`` (a
separate process, so that nothing runs between fork and exec in the
multi-threaded server).  It reads a JSON spec
(``{"binds": [[source, target], ...], "staging": dir, "argv": [...], "env": {...}}``)
from SPEC_FD, unshares its mount namespace, makes every mount private, binds
each source on its target and execs CMD.  If anything fails before the exec
it writes one sentence to STATUS_FD and exits (125, or 126/127 when CMD
cannot be executed / found); STATUS_FD closes on exec, so an empty read
tells the server that CMD runs.

A target that does not exist on the host (no ``/dev/vfio`` without the vfio
module, no ``drivers/vfio-pci`` without vfio-pci) cannot be created there
without the host seeing it, so the parent directory gets a tmpfs copy (every
entry bound from the original) with the missing directory added.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from typing import List, Optional, Set

from . import CLONE_NEWNS, MNT_DETACH, MS_BIND, MS_MOVE, MS_PRIVATE, MS_REC, mount, umount2, unshare

EXIT_NOT_STARTED = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


class Failed(Exception):
    """A step of the setup failed; the message is the sentence the server prints."""


def _mount(source: Optional[str], target: str, fstype: Optional[str], flags: int, what: str,
           data: Optional[str] = None) -> None:
    try:
        mount(source, target, fstype, flags, data, what)
    except OSError as e:
        raise Failed(e.strerror) from None


class Namespace:
    """The private mount namespace being built, and the tmpfs copies made in it."""

    def __init__(self, staging: str):
        self.staging = staging
        self.copies: Set[str] = set()  # our own tmpfs copies: a missing child is a mkdir away

    def copy_with(self, directory: str, missing: str) -> None:
        # ``directory`` (/dev or /sys/...) lacks ``missing``; a mkdir there would show on the host
        # too.  Build a tmpfs holding every entry of ``directory`` (bound from the original) plus
        # ``missing``, and move it over ``directory`` in this namespace only.
        st = os.stat(directory)
        new = os.path.join(self.staging, str(len(self.copies)))
        os.mkdir(new, 0o700)
        _mount("tmpfs", new, "tmpfs", 0, f"a tmpfs for a private copy of {directory}",
               "mode=%o,uid=%d,gid=%d" % (st.st_mode & 0o7777, st.st_uid, st.st_gid))
        for name in os.listdir(directory):
            src, dst = os.path.join(directory, name), os.path.join(new, name)
            try:
                lst = os.lstat(src)
                if stat.S_ISLNK(lst.st_mode):
                    os.symlink(os.readlink(src), dst)
                    continue
                if stat.S_ISDIR(lst.st_mode):
                    os.mkdir(dst, 0o755)
                else:
                    os.close(os.open(dst, os.O_CREAT | os.O_RDONLY, 0o600))
                _mount(src, dst, None, MS_BIND | MS_REC, f"binding {src}")
            except (OSError, Failed):
                pass  # gone meanwhile, or not bindable: the copy goes without it
        os.mkdir(os.path.join(new, missing), 0o755)
        _mount(new, directory, None, MS_MOVE, f"moving a private copy of {directory} into place")
        self.copies.add(directory)

    def ensure_dir(self, path: str) -> None:
        if os.path.isdir(path):
            return
        if os.path.lexists(path):
            raise Failed(f"{path} exists and is not a directory, so nothing can be bound on it")
        parent = os.path.dirname(path)
        self.ensure_dir(parent)
        if parent in self.copies:
            os.mkdir(path, 0o755)
        else:
            self.copy_with(parent, os.path.basename(path))

    def build(self, binds: List[List[str]]) -> None:
        try:
            unshare(CLONE_NEWNS)
        except OSError as e:
            raise Failed("cannot make a private mount namespace (unshare CLONE_NEWNS): %s%s" % (
                os.strerror(e.errno or 0), "" if os.geteuid() == 0 else "; run as root")) from None
        _mount(None, "/", None, MS_REC | MS_PRIVATE, "making the namespace's mounts private")
        _mount("tmpfs", self.staging, "tmpfs", 0, "a staging tmpfs", "mode=700")
        for source, target in binds:
            self.ensure_dir(target)
            _mount(source, target, None, MS_BIND | MS_REC, f"binding {source} on {target}")
        try:
            umount2(self.staging, MNT_DETACH)
        except OSError:
            pass


def main(argv: List[str]) -> None:
    spec_fd, status_fd = int(argv[1]), int(argv[2])
    os.set_inheritable(status_fd, False)

    def fail(message: str, code: int) -> None:
        os.write(status_fd, message.encode())
        os._exit(code)

    with os.fdopen(spec_fd, "rb") as f:
        spec = json.loads(f.read())
    try:
        Namespace(spec["staging"]).build(spec["binds"])
    except Failed as e:
        fail(str(e), EXIT_NOT_STARTED)
    except OSError as e:
        fail(f"setting up the mount namespace: {e}", EXIT_NOT_STARTED)
    cmd = spec["argv"]
    try:
        os.execvpe(cmd[0], cmd, spec["env"])
    except FileNotFoundError:
        fail(f"{cmd[0]}: command not found", EXIT_NOT_FOUND)
    except OSError as e:
        fail(f"{cmd[0]}: cannot execute: {e.strerror}", EXIT_CANNOT_EXECUTE)


if __name__ == "__main__":
    main(sys.argv)
