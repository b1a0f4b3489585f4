"""The trace file: one JSON record per request, and the table a person reads.

``--trace FILE`` appends records as the dispatcher decodes them (time, pid,
node, ioctl name, fields in and out, result or errno name); ``cuse-vfio trace
FILE`` prints them as a table, one request a line.
"""

from __future__ import annotations

import json
import threading
from typing import IO, Iterable, Iterator, List, Optional


class TraceWriter:
    """A thread-safe JSON-lines sink for the dispatcher's ``trace`` callback."""

    def __init__(self, path: str):
        self._file: IO[str] = open(path, "a", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()

    def __call__(self, record: dict) -> None:
        line = json.dumps(record, default=_jsonable, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _jsonable(value):
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return str(value)


class MalformedFile(ValueError):
    """A trace or fault-log line that is not a JSON object; the message names the line."""


def read_records(lines: Iterable[str], what: str = "trace record") -> Iterator[dict]:
    """The JSON objects of a JSON-lines file, one per non-blank line; anything else is MalformedFile."""
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise MalformedFile(f"line {number} is not a {what}: {e.msg}") from None
        if not isinstance(record, dict):
            raise MalformedFile(f"line {number} is not a {what}: a JSON {type(record).__name__}, not an object")
        yield record


def open_input(path: str) -> IO[str]:
    """``path`` for reading, or stdin for ``-`` (left open when done)."""
    if path == "-":
        import sys

        return open(sys.stdin.fileno(), encoding="utf-8", closefd=False)
    return open(path, encoding="utf-8")


def _fields(fields: Optional[dict]) -> str:
    if not fields:
        return ""
    if not isinstance(fields, dict):
        return str(fields)
    parts = []
    for key, value in fields.items():
        if key.endswith("_names") or key == "truncated":
            continue
        names = fields.get(f"{key}_names")
        if names:
            value = "|".join(n.split("_FLAG_")[-1] for n in names)
        elif isinstance(value, int) and value > 9:
            value = hex(value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


def format_table(records: Iterable[dict]) -> List[str]:
    rows = []
    start = None
    for r in records:
        t = r.get("time")
        if isinstance(t, (int, float)):
            start = t if start is None else start
            when = f"{t - start:10.6f}"
        else:
            when = " " * 10
        result = r.get("errno") or r.get("result", "")
        rows.append(f"{when}  {str(r.get('pid', '')):>7}  {str(r.get('node', '')):<20}  "
                    f"{r.get('ioctl', '?'):<32}  {str(result):<8}  {_fields(r.get('in'))}"
                    + (f"  -> {_fields(r.get('out'))}" if r.get("out") else ""))
    header = f"{'time':>10}  {'pid':>7}  {'node':<20}  {'ioctl':<32}  {'result':<8}  fields"
    return [header] + rows


def print_trace(path: str, out=None) -> int:
    """``cuse-vfio trace FILE``: a --trace file (``-``: stdin) as a table; a malformed file is an error."""
    import sys

    out = out or sys.stdout
    name = "stdin" if path == "-" else path
    try:
        with open_input(path) as f:
            records = list(read_records(f))
    except OSError as e:
        print(f"cuse-vfio trace: cannot read {name}: {e.strerror}", file=sys.stderr)
        return 1
    except MalformedFile as e:
        print(f"cuse-vfio trace: {name}: {e} (is it a --trace file?)", file=sys.stderr)
        return 1
    for line in format_table(records):
        print(line, file=out)
    return 0
