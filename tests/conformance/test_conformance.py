"""Differential conformance: the C client, the comparison, and the live run.

(a) the client compiles with -Wall -Werror;
(b) compare.py on small synthetic outputs;
(c) scripts/conformance: the client against the real kernel (qemu VM, asked
    live) and against cuse-vfio; skipped only when scripts/vm says the VM
    cannot run on this machine.

real-6.1.txt beside this file is one real-kernel output (Debian 6.1.0, QEMU
7.2 q35 + intel-iommu, the machine of vm.toml: an edu on the root bus and a
two-function edu behind a PCIe root port), the real stage's output
(build/conformance/6.1/real.txt), kept for developers to read; no test uses
it: the real kernel is asked live on every run.
"""

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import compare  # noqa: E402

CONFORMANCE_NO_VM = 3   # scripts/conformance: the VM harness cannot run here


# ---------------------------------------------------------------- (a) the client

def test_client_compiles_with_werror(tmp_path):
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build tests/conformance/vfio-conformance.c"
    out = tmp_path / "vfio-conformance"
    r = subprocess.run([gcc, "-Wall", "-Werror", "-O2", "-o", str(out),
                        os.path.join(HERE, "vfio-conformance.c")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.access(out, os.X_OK)


def test_client_without_vfio_nodes_says_so_and_exits_2(tmp_path):
    """With no /dev/vfio/vfio (the host has no VFIO) the harness cannot start."""
    if os.path.exists("/dev/vfio/vfio"):
        pytest.skip("this machine has a /dev/vfio/vfio")
    out = tmp_path / "vfio-conformance"
    subprocess.run(["gcc", "-O2", "-o", str(out), os.path.join(HERE, "vfio-conformance.c")], check=True)
    r = subprocess.run([str(out)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stdout == "open_container=ERR:ENOENT\n"


# ---------------------------------------------------------------- (b) compare.py

REAL = """\
open_container=ok
container.api_version=0
device.region.0.flags=0x7
device.region.0.size=0x100000
msi.event=1
done=1
"""

ALLOW_BAR0 = """\
[[allow]]
name = "device.region.0.*flags"
real = "0x7"
emulated = "0x3"
reason = "BAR0 is not mmappable here."
"""


def run_compare(emulated, allowlist="", transport="fuse", real=REAL):
    report, passed = compare.run(real, [(transport, emulated)], allowlist)
    allows = compare.load_allowlist(allowlist)
    result = compare.compare(compare.parse_output(real), compare.parse_output(emulated), transport, allows)
    return report, passed, result


def test_identical_outputs_match():
    report, passed, r = run_compare(REAL)
    assert passed and r.ok
    assert r.matched == 6 and r.lines == []
    assert "transport fuse: 6 matched, 0 differing, 0 allowed, 0 missing, 0 extra -> PASS" in report


def test_a_differing_value_fails_and_is_listed():
    report, passed, r = run_compare(REAL.replace("container.api_version=0", "container.api_version=1"))
    assert not passed
    assert r.matched == 5 and r.count("differing") == 1
    assert [(ln.name, ln.real, ln.emulated) for ln in r.failures] == [("container.api_version", "0", "1")]
    assert "DIFFERING container.api_version" in report
    assert "real=0  fuse=1" in report


def test_an_allowed_difference_passes_and_is_reported_with_its_reason():
    report, passed, r = run_compare(REAL.replace("flags=0x7", "flags=0x3"), ALLOW_BAR0)
    assert passed
    assert r.allowed == 1 and r.count("differing") == 0
    assert "1 allowed" in report
    assert "allowed   device.region.0.flags" in report and "(BAR0 is not mmappable here.)" in report


def test_an_allowlist_entry_for_another_transport_does_not_apply():
    allow = ALLOW_BAR0 + 'transport = "cuse"\n'
    _, passed, r = run_compare(REAL.replace("flags=0x7", "flags=0x3"), allow, transport="fuse")
    assert not passed and r.count("differing") == 1
    _, passed, _ = run_compare(REAL.replace("flags=0x7", "flags=0x3"), allow, transport="cuse")
    assert passed


def test_a_missing_observation_fails():
    report, passed, r = run_compare(REAL.replace("msi.event=1\n", ""))
    assert not passed
    assert r.count("missing") == 1
    assert "MISSING   msi.event" in report and "fuse=(absent)" in report


def test_an_emulated_run_that_stops_early_reports_every_missing_line():
    partial = "".join(REAL.splitlines(keepends=True)[:3])
    _, passed, r = run_compare(partial)
    assert not passed
    assert [ln.name for ln in r.failures] == ["device.region.0.size", "msi.event", "done"]


def test_an_extra_observation_fails():
    _, passed, r = run_compare(REAL + "device.region.0.cap.count=1\n")
    assert not passed and r.count("extra") == 1


def test_a_glob_can_allow_a_missing_observation_pinned_as_absent():
    allow = '[[allow]]\nname = "msi.*"\nreal = "1"\nemulated = "(absent)"\nreason = "no MSI yet."\n'
    _, passed, r = run_compare(REAL.replace("msi.event=1\n", ""), allow)
    assert passed and r.allowed == 1
    _, passed, r = run_compare(REAL.replace("msi.event=1\n", "msi.event=0\n"), allow)
    assert not passed and r.count("differing") == 1


def test_an_allowed_difference_covers_only_its_pinned_values():
    """An allowed name with another emulated value, or gone, or extra, is a difference again."""
    for emulated in (REAL.replace("flags=0x7", "flags=0x0"), REAL.replace("device.region.0.flags=0x7\n", "")):
        _, passed, r = run_compare(emulated, ALLOW_BAR0)
        assert not passed and r.allowed == 0 and len(r.failures) == 1
    _, passed, r = run_compare(REAL.replace("flags=0x7", "flags=0x3") + "device.region.0.sizeof.flags=0x3\n",
                               ALLOW_BAR0)
    assert not passed and r.allowed == 1 and [ln.kind for ln in r.failures] == ["extra"]


def test_unused_allowlist_entries_are_listed():
    report, passed, _ = run_compare(REAL, ALLOW_BAR0)
    assert passed
    assert "matched nothing" in report and "device.region.0.*flags" in report


def test_duplicate_and_malformed_lines_are_output_problems():
    out = compare.parse_output("a=1\na=2\nnot a line\ndone=1\n")
    assert out.values == {"a": "1", "done": "1"}
    assert len(out.problems) == 2
    _, passed, r = run_compare(REAL + "msi.event=1\n")
    assert not passed and r.problems


def test_an_incomplete_real_output_fails_the_comparison():
    real = REAL.replace("done=1\n", "")
    report, passed = compare.run(real, [("fuse", real)], "")
    assert not passed
    assert "INCOMPLETE" in report


def test_values_may_contain_equal_signs():
    assert compare.parse_output("x=a=b\ndone=1\n").values["x"] == "a=b"


@pytest.mark.parametrize("text, message", [
    ('[[allow]]\nname = "x"\nreal = "1"\nemulated = "2"\n', "needs a reason"),
    ('[[allow]]\nname = "x"\nreason = "r"\n', "needs real and emulated"),
    ('[[allow]]\nname = "x"\nreason = "r"\nreal = "1"\nemulated = "1"\n', "no difference"),
    ('[[allow]]\nreason = "r"\n', "needs a name"),
    ('[[allow]]\nname = "x"\nreason = "r"\ntransport = "tcp"\n', "transport must be"),
    ('[[allow]]\nname = "x"\nreason = "r"\nwhy = "?"\n', "unknown keys"),
    ('[allow\n', "not valid TOML"),
])
def test_an_invalid_allowlist_is_refused(text, message):
    with pytest.raises(compare.AllowlistError, match=message):
        compare.load_allowlist(text)


@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_the_reviewed_allowlists_are_valid_and_short(kernel):
    with open(os.path.join(HERE, f"allowlist-{kernel}.toml")) as f:
        allows = compare.load_allowlist(f.read())
    assert allows, "the known BAR0 mmap difference is listed"
    assert len(allows) <= 5 and all(a.reason.endswith(".") for a in allows)


def test_the_command_line_exit_status(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text(REAL)
    same = tmp_path / "same.txt"
    same.write_text(REAL)
    other = tmp_path / "other.txt"
    other.write_text(REAL.replace("flags=0x7", "flags=0x3"))
    allow = tmp_path / "allow.toml"
    allow.write_text("")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[allow]]\nname = "x"\n')

    def cli(*args):
        return subprocess.run([sys.executable, os.path.join(HERE, "compare.py"), *args],
                              capture_output=True, text=True)

    assert cli("--allowlist", str(allow), "--real", str(real), "--emulated", f"fuse={same}").returncode == 0
    r = cli("--allowlist", str(allow), "--real", str(real), "--emulated", f"fuse={same}",
            "--emulated", f"cuse={other}")
    assert r.returncode == 1
    assert "transport fuse:" in r.stdout and "transport cuse:" in r.stdout
    assert cli("--allowlist", str(bad), "--real", str(real), "--emulated", f"fuse={same}").returncode == 2
    assert cli("--allowlist", str(allow), "--real", str(real), "--emulated", f"tcp={same}").returncode == 2


# ---------------------------------------------------------------- (c) live

@pytest.mark.vm
def test_live_against_the_real_kernel():
    """The client against real vfio-pci (VM) and cuse-vfio (fuse, cuse VM); any unallowed difference fails."""
    r = subprocess.run([os.path.join(TOP, "scripts", "conformance"), "--cuse"], cwd=TOP,
                       capture_output=True, text=True)
    if r.returncode == CONFORMANCE_NO_VM:
        reason = " ".join(ln.strip() for ln in r.stdout.strip().splitlines()[:2])
        pytest.skip("the VM harness cannot run here: " + reason)
    assert r.returncode == 0, f"scripts/conformance exited {r.returncode}:\n{r.stdout}{r.stderr}"
