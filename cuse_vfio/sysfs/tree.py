"""The nodes of the view's tree: what each kind of sysfs entry is, before FUSE serves it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict

if TYPE_CHECKING:
    from .pci import SysfsDevice


class SysfsViewError(Exception):
    """The sysfs view cannot be built or mounted; the message says what and how to fix it."""


@dataclass
class Dir:
    children: Dict[str, object] = field(default_factory=dict)
    mode: int = 0o755


@dataclass
class Text:
    """A text attribute: ``render()`` gives the whole content, on every read."""

    render: Callable[[], str]
    mode: int
    what: str


@dataclass
class Config:
    """A PCI function's ``config``: binary, sized like the kernel's bin attribute."""

    device: SysfsDevice
    mode: int = 0o644


@dataclass
class Link:
    target: str
    mode: int = 0o777


@dataclass
class Control:
    """A write-only file whose writes are accepted, logged with ``why`` and ignored (see the package doc)."""

    why: str
    mode: int = 0o200
