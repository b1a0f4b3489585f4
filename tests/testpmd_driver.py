"""Drive dpdk-testpmd at its prompt, as a person would, and report what it did as one JSON line.

Runs where testpmd should run: as CMD of ``cuse-vfio run`` (so testpmd sees
the emulated NIC) or on its own (DPDK's software ring, the benchmark's floor)::

    python tests/testpmd_driver.py flow [--runs N] [--min-rx N] -- EAL-ARGS...
    python tests/testpmd_driver.py rate --seconds S [--server-pid PID|parent] [--profile FILE] -- EAL-ARGS...

Both start ``dpdk-testpmd EAL-ARGS -- -i --forward-mode=io --port-topology=loop``
on port 0 and type ``start tx_first``: one burst goes out, then every frame
that comes back in is sent out again.

- ``flow`` polls ``show port stats 0`` until at least ``--min-rx`` frames came
  back, then ``stop`` (the forward statistics) and ``quit``; it does that
  ``--runs`` times, each a new testpmd, so a run that did not give the device
  back leaves the next one unable to start.  The wait is bounded
  (``--timeout`` per step), never a measurement.
- ``rate`` reads the counters, lets the traffic run ``--seconds``, reads them
  again, and adds the CPU time testpmd and the server (``--server-pid parent``:
  the ``cuse-vfio run`` that started this driver) spent meanwhile; with
  ``--profile FILE`` py-spy samples the server's Python stacks (those holding
  the GIL) over the same window into FILE (its ``raw`` format: one
  ``frame;frame;... count`` line a stack).

The module's parse functions are what the DPDK stage and scripts/bench read
testpmd's output with.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

PROMPT = "testpmd> "
#: py-spy's samples a second
PROFILE_RATE = 200
TESTPMD_ARGS = ["-i", "--forward-mode=io", "--port-topology=loop", "--total-num-mbufs=2048"]


class TestpmdError(Exception):
    pass


class Testpmd:
    """One interactive testpmd: :meth:`command` types a line and returns what it printed up to the next prompt."""

    def __init__(self, eal_args: List[str], timeout: float):
        self.timeout = timeout
        # stdbuf: testpmd's printf output must reach the pipe line by line, before the prompt
        # that follows it (cmdline writes the prompt with write(2), stdio would hold the rest).
        self.proc = subprocess.Popen(["stdbuf", "-oL", "dpdk-testpmd", *eal_args, "--", *TESTPMD_ARGS],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.log = ""
        self._seen = 0
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.startup = self._until_prompt("start")

    def _read(self) -> None:
        while True:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            with self._changed:
                if not chunk:
                    self.log += "\0"  # EOF marker
                    self._changed.notify_all()
                    return
                self.log += chunk.decode(errors="replace")
                self._changed.notify_all()

    def _until_prompt(self, what: str) -> str:
        deadline = time.monotonic() + self.timeout
        with self._changed:
            while True:
                at = self.log.find(PROMPT, self._seen)
                if at >= 0:
                    out, self._seen = self.log[self._seen:at], at + len(PROMPT)
                    return out
                if self.log.endswith("\0"):
                    raise TestpmdError(f"testpmd exited during {what}:\n{self.log[self._seen:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TestpmdError(f"testpmd gave no prompt within {self.timeout:g} s after {what}:\n"
                                       f"{self.log[self._seen:]}")
                self._changed.wait(left)

    def command(self, line: str) -> str:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._until_prompt(repr(line))

    def quit(self) -> int:
        """``quit``: testpmd stops and closes its ports and exits; its status."""
        self.proc.stdin.write(b"quit\n")
        self.proc.stdin.close()
        try:
            status = self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        self._reader.join(self.timeout)
        return status

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- what testpmd prints ----------------------------------------------------------------------
def port_stats(text: str) -> Dict[str, int]:
    """``show port stats``: the packet and error counters, and testpmd's own pps over the last interval."""
    found: Dict[str, int] = {}
    for key, name in (("RX-packets", "rx"), ("RX-missed", "rx_missed"), ("RX-errors", "rx_errors"),
                      ("RX-nombuf", "rx_nombuf"), ("TX-packets", "tx"), ("TX-errors", "tx_errors"),
                      ("Rx-pps", "rx_pps"), ("Tx-pps", "tx_pps")):
        m = re.search(rf"{key}:\s+(\d+)", text)
        if m:
            found[name] = int(m.group(1))
    return found


def forward_stats(text: str) -> Dict[str, int]:
    """``stop`` (or exit): the accumulated forward statistics of all ports."""
    block = text.split("Accumulated forward statistics for all ports", 1)[-1]
    found: Dict[str, int] = {}
    for key, name in (("RX-packets", "rx"), ("RX-dropped", "rx_dropped"), ("TX-packets", "tx"),
                      ("TX-dropped", "tx_dropped")):
        m = re.search(rf"{key}:\s+(\d+)", block)
        if m:
            found[name] = int(m.group(1))
    return found


def link(text: str) -> Dict[str, str]:
    """``show port info``: the link's status, speed and duplex."""
    return {key.lower(): m.group(1).strip() for key in ("status", "speed", "duplex")
            for m in [re.search(rf"^Link {key}:\s*(.*)$", text, re.M)] if m}


def cpu_seconds(pid: int) -> float:
    """User plus system time of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the two jobs ---------------------------------------------------------------------------------
def flow(eal_args: List[str], min_rx: int, timeout: float) -> dict:
    pmd = Testpmd(eal_args, timeout)
    try:
        report = {"link": link(pmd.command("show port info 0"))}
        pmd.command("start tx_first")
        deadline = time.monotonic() + timeout
        polls = 0
        while True:
            stats = port_stats(pmd.command("show port stats 0"))
            polls += 1
            if stats.get("rx", 0) >= min_rx or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        report.update(port_while_running=stats, polls=polls)
        report["forward"] = forward_stats(pmd.command("stop"))
        report["port"] = port_stats(pmd.command("show port stats 0"))
        report["status"] = pmd.quit()
        report["log"] = pmd.log.rstrip("\0")
        return report
    finally:
        pmd.kill()


def py_spy(pid: int, seconds: float, out: str) -> subprocess.Popen:
    """py-spy (beside this Python, as pip installs it) recording ``pid``'s stacks for ``seconds``.

    Only stacks holding the GIL count (``--gil``): the server's Python work.  A
    thread in a C call (the FUSE reply, process_vm_readv) has released the GIL,
    and py-spy would otherwise charge that time, and time the thread waits to
    run again, to the Python frame that made the call.
    """
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                             "--rate", str(PROFILE_RATE), "--format", "raw", "--nonblocking", "--gil", "--output", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def rate(eal_args: List[str], seconds: float, server_pid: Optional[int], timeout: float,
         profile: Optional[str] = None) -> dict:
    pmd = Testpmd(eal_args, timeout)
    spy = None
    try:
        pmd.command("start tx_first")
        pmd.command("show port stats 0")  # testpmd's pps counts from here

        def sample() -> dict:
            now = {"t": time.monotonic(), "testpmd_cpu": cpu_seconds(pmd.proc.pid),
                   "stats": port_stats(pmd.command("show port stats 0"))}
            if server_pid is not None:
                now["server_cpu"] = cpu_seconds(server_pid)
            return now

        first = sample()
        if profile is not None and server_pid is not None:
            spy = py_spy(server_pid, seconds, profile)
        time.sleep(seconds)
        last = sample()
        if spy is not None:
            _, err = spy.communicate(timeout=timeout)
            if spy.returncode:
                raise TestpmdError(f"py-spy failed ({spy.returncode}): {err.strip()}")
        report = {"seconds": last["t"] - first["t"],
                  "rx": last["stats"]["rx"] - first["stats"]["rx"],
                  "tx": last["stats"]["tx"] - first["stats"]["tx"],
                  "rx_pps_testpmd": last["stats"].get("rx_pps"),
                  "testpmd_cpu": last["testpmd_cpu"] - first["testpmd_cpu"]}
        if server_pid is not None:
            report["server_cpu"] = last["server_cpu"] - first["server_cpu"]
        if spy is not None:
            report["profile"] = {"file": os.path.abspath(profile), "rate": PROFILE_RATE,
                                 "seconds": max(1, round(seconds))}
        report["forward"] = forward_stats(pmd.command("stop"))
        report["status"] = pmd.quit()
        return report
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
        pmd.kill()


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", choices=("flow", "rate"))
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--min-rx", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--server-pid", default=None, help="a pid, or 'parent'")
    ap.add_argument("--profile", default=None, help="rate: py-spy's raw stacks of the server, to this file")
    ap.add_argument("--timeout", type=float, default=120.0, help="bound for one step (a hung testpmd)")
    if "--" not in argv:
        ap.error("give testpmd's EAL arguments after --")
    split = argv.index("--")
    args, eal_args = ap.parse_args(argv[:split]), argv[split + 1:]
    if args.job == "flow":
        reports: List[dict] = []
        for _ in range(args.runs):
            try:
                reports.append(flow(eal_args, args.min_rx, args.timeout))
            except TestpmdError as e:
                reports.append({"error": str(e)})
                break
        print(json.dumps({"runs": reports}))
        return 0 if all(r.get("status") == 0 for r in reports) else 1
    try:
        server = os.getppid() if args.server_pid == "parent" else (int(args.server_pid) if args.server_pid else None)
        print(json.dumps(rate(eal_args, args.seconds, server, args.timeout, args.profile)))
        return 0
    except TestpmdError as e:
        print(json.dumps({"error": str(e)}))
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
