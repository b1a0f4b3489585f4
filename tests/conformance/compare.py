#!/usr/bin/env python3
"""Compare vfio-conformance outputs: the real kernel against cuse-vfio.

    compare.py --allowlist allowlist.toml --real real.txt \\
               --emulated fuse=fuse.txt [--emulated cuse=cuse.txt]

Each output is the stdout of ``vfio-conformance``: one ``name=value`` line per
observation.  For every emulated transport the report counts observations
that match the real kernel, that differ, that differ but are allowed by the
reviewed allowlist, and that are missing (printed by the real kernel only) or
extra (printed by cuse-vfio only), and lists every line that is not a match.

Exit status: 0 when every observation of every transport matches or is
allowed; 1 when any difference, missing or extra observation is not allowed
(or an output is malformed); 2 on bad usage or an invalid allowlist.

Standard library only (tomllib: Python 3.11+).
"""

import argparse
import dataclasses
import fnmatch
import sys
import tomllib
from typing import Dict, List, Optional, Sequence, Tuple

TRANSPORTS = ("fuse", "cuse")
DONE = "done"


class AllowlistError(ValueError):
    """The allowlist file is not what this tool accepts."""


ABSENT = "(absent)"    # an allowlist pin for a line one side does not print


@dataclasses.dataclass(frozen=True)
class Allow:
    """One reviewed, known difference, pinned to both values.

    An entry covers a line only when its name matches and the kernel printed
    exactly ``real`` and cuse-vfio exactly ``emulated`` (``"(absent)"`` for a
    side that printed nothing): any other value, a missing line or an extra
    line under the same name is a difference again.
    """
    name: str             # exact observation name or an fnmatch glob
    reason: str           # one sentence: why the difference is acceptable for now
    real: str             # the kernel's value, pinned
    emulated: str         # cuse-vfio's value, pinned
    transport: str = "all"

    def covers(self, line: "Line", transport: str) -> bool:
        if self.transport not in ("all", transport):
            return False
        if (_pin(line.real), _pin(line.emulated)) != (self.real, self.emulated):
            return False
        return fnmatch.fnmatchcase(line.name, self.name)


def _pin(value: Optional[str]) -> str:
    return ABSENT if value is None else value


@dataclasses.dataclass
class Output:
    """A parsed vfio-conformance output."""
    values: Dict[str, str]
    problems: List[str]   # malformed lines, duplicate names, no done=1

    @property
    def complete(self) -> bool:
        return self.values.get(DONE) == "1"


@dataclasses.dataclass
class Line:
    """One observation that is not a plain match."""
    kind: str             # "differing", "missing" or "extra"
    name: str
    real: Optional[str]
    emulated: Optional[str]
    allowed_by: Optional[Allow] = None


@dataclasses.dataclass
class Result:
    """The comparison of one transport with the real kernel."""
    transport: str
    matched: int
    lines: List[Line]
    problems: List[str]   # problems of the emulated output itself

    def count(self, kind: str, allowed: bool = False) -> int:
        return sum(1 for ln in self.lines if ln.kind == kind and (ln.allowed_by is not None) == allowed)

    @property
    def allowed(self) -> int:
        return sum(1 for ln in self.lines if ln.allowed_by is not None)

    @property
    def failures(self) -> List[Line]:
        return [ln for ln in self.lines if ln.allowed_by is None]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.problems


def parse_output(text: str) -> Output:
    """Parses ``name=value`` lines; the first ``=`` separates name and value."""
    values: Dict[str, str] = {}
    problems: List[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        name, sep, value = line.partition("=")
        if not sep or not name or name != name.strip():
            problems.append(f"line {number} is not name=value: {line!r}")
            continue
        if name in values:
            problems.append(f"observation {name} printed twice (line {number})")
            continue
        values[name] = value
    if values.get(DONE) != "1":
        problems.append("the run did not finish (no done=1 line)")
    return Output(values, problems)


def load_allowlist(text: str) -> List[Allow]:
    """Parses the allowlist TOML: ``[[allow]]`` tables of name, reason, transport."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AllowlistError(f"allowlist is not valid TOML: {e}") from None
    unknown = set(data) - {"allow"}
    if unknown:
        raise AllowlistError(f"allowlist has unknown top-level keys: {', '.join(sorted(unknown))}")
    entries = data.get("allow", [])
    if not isinstance(entries, list):
        raise AllowlistError("allowlist: 'allow' must be an array of tables ([[allow]])")
    allows = []
    for i, entry in enumerate(entries, 1):
        where = f"allowlist entry {i}"
        if not isinstance(entry, dict):
            raise AllowlistError(f"{where} is not a table")
        extra = set(entry) - {"name", "reason", "real", "emulated", "transport"}
        if extra:
            raise AllowlistError(f"{where} has unknown keys: {', '.join(sorted(extra))}")
        name, reason = entry.get("name"), entry.get("reason")
        transport = entry.get("transport", "all")
        if not isinstance(name, str) or not name:
            raise AllowlistError(f"{where} needs a name (an observation name or a glob)")
        if not isinstance(reason, str) or not reason.strip():
            raise AllowlistError(f"{where} ({name}) needs a reason")
        if transport not in TRANSPORTS + ("all",):
            raise AllowlistError(f"{where} ({name}): transport must be fuse, cuse or all, not {transport!r}")
        real, emulated = entry.get("real"), entry.get("emulated")
        if not isinstance(real, str) or not isinstance(emulated, str):
            raise AllowlistError(f"{where} ({name}) needs real and emulated: the two values it allows, "
                                 f"as strings ({ABSENT!r} for a line one side does not print)")
        if real == emulated:
            raise AllowlistError(f"{where} ({name}): real and emulated are both {real!r}, which is no difference")
        allows.append(Allow(name, reason.strip(), real, emulated, transport))
    return allows


def _allowed_by(line: Line, transport: str, allowlist: Sequence[Allow]) -> Optional[Allow]:
    for allow in allowlist:
        if allow.covers(line, transport):
            return allow
    return None


def compare(real: Output, emulated: Output, transport: str, allowlist: Sequence[Allow]) -> Result:
    """Compares one emulated output with the real kernel's, in the real kernel's order."""
    matched = 0
    lines: List[Line] = []
    for name, value in real.values.items():
        if name not in emulated.values:
            lines.append(Line("missing", name, value, None))
        elif emulated.values[name] == value:
            matched += 1
        else:
            lines.append(Line("differing", name, value, emulated.values[name]))
    for name, value in emulated.values.items():
        if name not in real.values:
            lines.append(Line("extra", name, None, value))
    for line in lines:
        line.allowed_by = _allowed_by(line, transport, allowlist)
    # "no done=1" is already a missing observation; keep only the other problems.
    problems = [p for p in emulated.problems if "done=1" not in p]
    return Result(transport, matched, lines, problems)


def unused_allows(results: Sequence[Result], allowlist: Sequence[Allow]) -> List[Allow]:
    """Allowlist entries that covered nothing in any compared transport."""
    compared = {r.transport for r in results}
    used = {id(ln.allowed_by) for r in results for ln in r.lines if ln.allowed_by is not None}
    return [a for a in allowlist
            if id(a) not in used and (a.transport == "all" or a.transport in compared)]


def _show(value: Optional[str]) -> str:
    return _pin(value)


def format_report(real: Output, results: Sequence[Result], allowlist: Sequence[Allow]) -> str:
    out: List[str] = []
    out.append(f"real kernel: {len(real.values)} observations"
               + ("" if real.complete else " (INCOMPLETE: no done=1)"))
    for problem in real.problems:
        if "done=1" not in problem:
            out.append(f"  real output problem: {problem}")
    for r in results:
        out.append("")
        out.append(f"transport {r.transport}: {r.matched} matched, "
                   f"{r.count('differing')} differing, {r.allowed} allowed, "
                   f"{r.count('missing')} missing, {r.count('extra')} extra"
                   f" -> {'PASS' if r.ok else 'FAIL'}")
        for problem in r.problems:
            out.append(f"  {r.transport} output problem: {problem}")
        width = max((len(ln.name) for ln in r.lines), default=0)
        for ln in r.failures:
            out.append(f"  {ln.kind.upper():9} {ln.name:{width}}  real={_show(ln.real)}  "
                       f"{r.transport}={_show(ln.emulated)}")
        for ln in r.lines:
            if ln.allowed_by is not None:
                out.append(f"  allowed   {ln.name:{width}}  real={_show(ln.real)}  "
                           f"{r.transport}={_show(ln.emulated)}  ({ln.allowed_by.reason})")
    stale = unused_allows(results, allowlist)
    if stale:
        out.append("")
        out.append("allowlist entries that matched nothing (remove them once the emulator conforms):")
        for a in stale:
            out.append(f"  {a.name} [{a.transport}] real={a.real} emulated={a.emulated}: {a.reason}")
    return "\n".join(out) + "\n"


def run(real_text: str, emulated: Sequence[Tuple[str, str]], allowlist_text: str) -> Tuple[str, bool]:
    """Returns (report, passed) for the real output and (transport, output) pairs."""
    allowlist = load_allowlist(allowlist_text)
    real = parse_output(real_text)
    results = [compare(real, parse_output(text), transport, allowlist) for transport, text in emulated]
    real_ok = not real.problems
    return format_report(real, results, allowlist), real_ok and all(r.ok for r in results)


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--allowlist", required=True, help="the reviewed allowlist (TOML)")
    p.add_argument("--real", required=True, help="output of vfio-conformance on the real kernel")
    p.add_argument("--emulated", action="append", default=[], metavar="TRANSPORT=FILE",
                   help="output of vfio-conformance under cuse-vfio (fuse=FILE, cuse=FILE)")
    args = p.parse_args(argv)
    emulated = []
    for spec in args.emulated:
        transport, sep, path = spec.partition("=")
        if not sep or transport not in TRANSPORTS:
            p.error(f"--emulated wants fuse=FILE or cuse=FILE, not {spec!r}")
        emulated.append((transport, _read(path)))
    try:
        report, passed = run(_read(args.real), emulated, _read(args.allowlist))
    except AllowlistError as e:
        print(f"compare.py: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(report)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
