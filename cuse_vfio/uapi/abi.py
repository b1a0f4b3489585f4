"""Kernel personalities: which Linux release's VFIO a server behaves as.

A client of the legacy container/group/device API can tell Linux 6.1 from
6.12 by a handful of observations (an errno, a capability's offset, an IRQ
flag, how wide a BAR access may be).  cuse-vfio reproduces either: one
``KernelAbi`` object (``Vfio.abi``) names the release, and every behaviour
that differs is a ``Rule`` declared beside the code it changes::

    # core/group.py
    SET_CONTAINER_NOT_A_CONTAINER = Rule(
        "group.set_container.not_a_container", errno.EINVAL,
        since={"6.2": errno.EBADFD},
        why="... vfio_group_ioctl_set_container ends with -EBADFD ...")
    ...
    raise VfioError(SET_CONTAINER_NOT_A_CONTAINER.of(self.vfio.abi), ...)

A rule's value for a release is the one of the newest change at or before
it, else its original (6.1) value.  ``RULES`` holds every rule declared, so
``cuse-vfio`` and the tests can list the table; ``rule.why`` names the
kernel function and commit the difference comes from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Tuple

#: the releases a server can be: each one was checked against the real
#: kernel (Debian's 6.1 and bookworm-security's 6.12, scripts/conformance)
KERNEL_ABIS = ("6.1", "6.12")
DEFAULT_KERNEL_ABI = "6.1"


def _release(text: str) -> Tuple[int, int]:
    parts = text.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"a kernel release is MAJOR.MINOR, not {text!r}")
    return int(parts[0]), int(parts[1])


@dataclasses.dataclass(frozen=True)
class KernelAbi:
    """One kernel release's VFIO, as the rules see it."""
    version: str = DEFAULT_KERNEL_ABI

    def __post_init__(self) -> None:
        if self.version not in KERNEL_ABIS:
            raise ValueError(f"unknown kernel ABI {self.version!r}: cuse-vfio can be "
                             + " or ".join(KERNEL_ABIS))

    @property
    def release(self) -> Tuple[int, int]:
        return _release(self.version)

    def __str__(self) -> str:
        return self.version


#: every Rule declared, by name (filled in as the modules that declare them load)
RULES: Dict[str, "Rule"] = {}


class Rule:
    """One observable behaviour that changed between kernel releases."""

    def __init__(self, name: str, original: Any, *, since: Mapping[str, Any], why: str):
        if not why.strip():
            raise ValueError(f"rule {name}: say why (the kernel function and commit)")
        if name in RULES:
            raise ValueError(f"rule {name} is declared twice")
        self.name = name
        self.original = original
        self.why = why
        self.changes = sorted(((_release(v), value) for v, value in since.items()), key=lambda c: c[0])
        RULES[name] = self

    def of(self, abi: KernelAbi) -> Any:
        """The behaviour on ``abi``'s release."""
        value = self.original
        for release, changed in self.changes:
            if abi.release >= release:
                value = changed
        return value

    def __repr__(self) -> str:
        return f"Rule({self.name!r})"


def table() -> Dict[str, Dict[str, Any]]:
    """{rule name: {release: value}} for every supported release."""
    return {name: {v: rule.of(KernelAbi(v)) for v in KERNEL_ABIS} for name, rule in sorted(RULES.items())}
