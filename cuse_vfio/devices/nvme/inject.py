"""Error injection for driver developers: media errors, delays and controller fatal status on chosen commands.

A topology entry lists rules, each a table (see the package docstring for the
syntax).  Every fetched command is shown to the rules in order; the first
rule that matches and fires decides what happens to it:

* ``media-error``: the command completes with Unrecovered Read Error (reads)
  or Write Fault (every other opcode), moves no data, counts as a media error
  in the SMART log and leaves an entry in the error log;
* ``delay``: the command runs ``seconds`` later (other commands go on meanwhile,
  so completions come back out of order);
* ``fatal``: the controller sets CSTS.CFS and stops; only a reset brings it back.

A rule matches a command by opcode (``opcodes``), namespace (``nsid``) and
LBA range (``lba = [first, last]``, inclusive: a command matches when its
blocks overlap it); it lets ``after`` matching commands pass before it fires,
then fires ``count`` times (every time when not given; once for ``fatal``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

from . import spec

KINDS = ("media-error", "delay", "fatal")
_COMMON = ("kind", "opcodes", "nsid", "lba", "after", "count")
_KEYS = {"media-error": _COMMON + ("dnr",), "delay": _COMMON + ("seconds",), "fatal": _COMMON}
_DEFAULT_OPCODES = {"media-error": ["read", "write"], "delay": ["io"], "fatal": ["io"]}

#: (is_admin, opcode) for each name a rule may use
OPCODE_NAMES: Dict[str, Tuple[bool, int]] = {
    **{name: (False, op) for op, name in spec.NVM_NAMES.items()},
    **{name: (True, op) for op, name in spec.ADMIN_NAMES.items()},
}
#: commands with an LBA range (SLBA in CDW10-11, NLB in CDW12 15:0)
LBA_OPCODES = (spec.NVM_READ, spec.NVM_WRITE, spec.NVM_WRITE_ZEROES)


class Rule:
    __slots__ = ("index", "kind", "io_ops", "admin_ops", "nsid", "lba", "after", "count", "dnr", "seconds",
                 "seen", "fired")

    def __init__(self, index: int, entry):
        where = f"inject #{index + 1}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is not a table: write [[device.inject]] tables with a kind")
        kind = entry.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
        unknown = sorted(set(entry) - set(_KEYS[kind]))
        if unknown:
            raise ValueError(f"{where} ({kind}): unknown key {unknown[0]!r} (keys: {', '.join(_KEYS[kind])})")
        self.index = index
        self.kind = kind
        self.io_ops, self.admin_ops = self._opcodes(where, entry.get("opcodes", _DEFAULT_OPCODES[kind]))
        if kind == "media-error" and self.admin_ops:
            raise ValueError(f"{where} (media-error): media errors are for I/O commands, not admin ones")
        self.nsid = self._int(where, entry, "nsid", None, 1, spec.NSID_BROADCAST - 1)
        self.lba = self._lba(where, entry.get("lba"))
        self.after = self._int(where, entry, "after", 0, 0, 1 << 63) or 0  # TOML has no null
        self.count = self._int(where, entry, "count", 1 if kind == "fatal" else None, 1, 1 << 63)
        self.dnr = entry.get("dnr", False)
        if not isinstance(self.dnr, bool):
            raise ValueError(f"{where}: dnr must be true or false")
        self.seconds = 0.0
        if kind == "delay":
            seconds = entry.get("seconds")
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= 3600:
                raise ValueError(f"{where} (delay): seconds must be a number of seconds in (0, 3600]")
            self.seconds = float(seconds)
        self.seen = 0
        self.fired = 0

    @staticmethod
    def _int(where, entry, key, default, low, high) -> Optional[int]:
        value = entry.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{where}: {key} must be a whole number from {low} to {high}, not {value!r}")
        return value

    @staticmethod
    def _lba(where, value) -> Optional[Tuple[int, int]]:
        if value is None:
            return None
        if (not isinstance(value, list) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value) or value[0] > value[1]):
            raise ValueError(f"{where}: lba must be [first, last] LBAs with first <= last, not {value!r}")
        return value[0], value[1]

    @staticmethod
    def _opcodes(where, names):
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not names:
            raise ValueError(f"{where}: opcodes must be a list of command names like [\"read\", \"write\"]")
        io_ops: Set[int] = set()
        admin_ops: Set[int] = set()
        for name in names:
            if name == "io":
                io_ops.update(range(256))
            elif name == "admin":
                admin_ops.update(range(256))
            elif isinstance(name, str) and name in OPCODE_NAMES:
                admin, op = OPCODE_NAMES[name]
                (admin_ops if admin else io_ops).add(op)
            elif isinstance(name, str) and name.split(":")[0] in ("io", "admin") and name.count(":") == 1:
                prefix, number = name.split(":")
                try:
                    op = int(number, 0)
                except ValueError:
                    op = -1
                if not 0 <= op <= 0xFF:
                    raise ValueError(f"{where}: {name!r} names no opcode (write io:0x80 or admin:0xc0)")
                (admin_ops if prefix == "admin" else io_ops).add(op)
            else:
                raise ValueError(f"{where}: unknown command {name!r}: use io, admin, io:0xNN, admin:0xNN or one of "
                                 f"{', '.join(sorted(OPCODE_NAMES))}")
        return frozenset(io_ops), frozenset(admin_ops)

    def matches(self, admin: bool, opcode: int, nsid: int, cdw10: int, cdw11: int, cdw12: int) -> bool:
        if opcode not in (self.admin_ops if admin else self.io_ops):
            return False
        if self.nsid is not None and nsid != self.nsid:
            return False
        if self.lba is not None:
            if admin or opcode not in LBA_OPCODES:
                return False
            slba = cdw10 | (cdw11 << 32)
            last = slba + (cdw12 & 0xFFFF)
            if last < self.lba[0] or slba > self.lba[1]:
                return False
        return True

    def fires(self) -> bool:
        """A matching command was seen: whether the rule acts on it (``after`` and ``count`` spent here)."""
        self.seen += 1
        if self.seen <= self.after or (self.count is not None and self.fired >= self.count):
            return False
        self.fired += 1
        return True

    def media_status(self, opcode: int) -> int:
        status = spec.UNRECOVERED_READ_ERROR if opcode == spec.NVM_READ else spec.WRITE_FAULT
        return status | (spec.DNR if self.dnr else 0)

    def first_lba(self, cdw10: int, cdw11: int) -> int:
        slba = cdw10 | (cdw11 << 32)
        return max(slba, self.lba[0]) if self.lba is not None else slba


class Injector:
    """The rules of one controller, in topology order."""

    def __init__(self, entries):
        if entries is None:
            entries = []
        if isinstance(entries, dict):
            entries = [entries]
        if not isinstance(entries, list):
            raise ValueError("inject must be a list of tables ([[device.inject]] entries)")
        self.rules: List[Rule] = [Rule(i, e) for i, e in enumerate(entries)]

    def __bool__(self) -> bool:
        return bool(self.rules)

    def check(self, admin: bool, cmd) -> Optional[Rule]:
        """The rule that acts on this command (an unpacked SQE), or None."""
        opcode, nsid = cmd[0], cmd[3]
        cdw10, cdw11, cdw12 = cmd[8], cmd[9], cmd[10]
        for rule in self.rules:
            if rule.matches(admin, opcode, nsid, cdw10, cdw11, cdw12) and rule.fires():
                return rule
        return None
