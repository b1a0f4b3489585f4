"""Mounts as this host's kernel has them: mount(2), umount2(2) and /proc/self/mountinfo, written once.

The serving layer detaches its FUSE mounts when their daemon is stuck, the
command line detaches what a run left behind, and ``run``'s namespace helper
(:mod:`.namespace`) binds the nodes and the sysfs view; all of them come here.
This module imports nothing of the project, so the helper starts light.
"""

from __future__ import annotations

import ctypes
import os
import re
from typing import Dict, Iterator, List, Optional, Tuple

CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def _path(s: Optional[str]) -> Optional[bytes]:
    return None if s is None else os.fsencode(s)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(source: Optional[str], target: str, fstype: Optional[str], flags: int, data: Optional[str] = None,
          what: str = "mount") -> None:
    """mount(2); OSError with ``what`` and the errno when it fails."""
    _check(_libc.mount(_path(source), _path(target), _path(fstype), flags, _path(data)), what)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2); OSError with the errno when it fails (EINVAL: not a mount point)."""
    _check(_libc.umount2(os.fsencode(target), flags), f"umount {target}")


def detach(target: str) -> None:
    """A lazy unmount (MNT_DETACH) that never follows a symlink nor asks the file system below."""
    umount2(target, MNT_DETACH | UMOUNT_NOFOLLOW)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def _mounts(path: str) -> Iterator[Tuple[str, str]]:
    """(mount point, file system type) of every line of a mountinfo file, bottom to top; none when unreadable."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return
    for line in lines:
        fields, _, rest = line.partition(" - ")
        where = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields.split()[4])
        yield where, rest.split()[0] if rest else ""


def mountinfo(path: str = "/proc/self/mountinfo") -> Dict[str, str]:
    """Mount point -> file system type of the topmost mount there (this mount namespace); {} when unreadable."""
    return dict(_mounts(path))


def fs_types(mountpoint: str, path: str = "/proc/self/mountinfo") -> List[str]:
    """The file system types mounted exactly on ``mountpoint``, bottom to top."""
    return [fstype for where, fstype in _mounts(path) if where == mountpoint]


def top_device(mountpoint: str, path: str = "/proc/self/mountinfo") -> Optional[Tuple[int, int]]:
    """(major, minor) of the topmost mount exactly on ``mountpoint``, or None: read from mountinfo,
    never by a stat that a stuck FUSE daemon at that place would have to answer."""
    top = None
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                where = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if where == mountpoint:
                    major, minor = fields[2].split(":")
                    top = (int(major), int(minor))
    except (OSError, ValueError, IndexError):
        return None
    return top


def canonical(mountpoint: str) -> str:
    """The path mountinfo names ``mountpoint`` by, without a lookup of the mount point itself
    (its FUSE daemon may not answer yet, or ever): the parent resolved, the last name kept."""
    mountpoint = os.path.abspath(mountpoint)
    return os.path.join(os.path.realpath(os.path.dirname(mountpoint)), os.path.basename(mountpoint))


def refuse_mount_point(path: str, what: str) -> None:
    """A server mounts only on a directory nobody has mounted on: on top of another
    server's mount it would hide that one, and detach it on exit."""
    types = fs_types(canonical(path))
    if types:
        raise MountPointError(f"{what} {path} is already a mount point ({', '.join(types)}): another server "
                              "may be serving there; stop it, unmount it, or choose another directory")


class MountPointError(RuntimeError):
    """A directory to mount on is taken; the message says which and what to do."""
