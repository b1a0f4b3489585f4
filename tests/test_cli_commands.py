"""The command line as a user meets it: errors as one sentence, doctor, demo, trace, faults, options.

Every command is run as a separate process (``python -m cuse_vfio ...``), so
exit statuses and what reaches stdout/stderr are the real ones.  The serving
tests (those that mount) need root and /dev/fuse and check that nothing is
left mounted.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # a bound for a hung command, never a measurement
EDU = "0000:00:02.0"

needs_fuse = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs root and /dev/fuse")


def cli(*args, timeout=TIMEOUT):
    proc = subprocess.Popen([sys.executable, "-m", "cuse_vfio", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # serve/run tear down on SIGTERM
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"cuse-vfio {' '.join(args)} hung; stdout: {out}; stderr: {err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_sentence(done, status=1):
    """The error is one line on stderr, no traceback, exit 1 (run: 125, its own failure, never CMD's)."""
    assert done.returncode == status, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def no_leftovers(tmp_path):
    def mounts():
        with open("/proc/mounts") as f:
            return [line.split()[1] for line in f if line.split()[1].startswith(str(tmp_path))]

    assert mounts() == []
    yield str(tmp_path / "rt")
    assert mounts() == []
    assert not (tmp_path / "rt").exists()


# -- topology and model files -----------------------------------------------------------------
@pytest.mark.parametrize("text, line, words", [
    ('[[device]]\nbdf = "0000:00:02.0"\nmodel = "nosuch"\ngroup = 2\n', 3, "unknown device model 'nosuch'"),
    ('[[device]]\nbdf = "0000:00:02.0"\nmodel = "edu"\ngroup = 2\n\n[[device]]\nbdf = "00:03.0"\n'
     'model = "edu"\ngroup = 3\n', 7, "is not a PCI address"),
    ('[[device]]\nbdf = "0000:00:02.0"\nmodel = "edu"\ngroup = 2\n\n[group.2]\nmode = "rw"\n', 7,
     "is not an octal string"),
    ('[[device]]\nbdf = "0000:00:02.0"\nmodel = "edu"\ngroup = 2\nbroken =\n', 5, "not valid TOML"),
])
@pytest.mark.parametrize("command", [("serve",), ("run", "--", "true")])
def test_a_bad_topology_is_one_sentence_naming_the_line(tmp_path, text, line, words, command):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    sentence = one_sentence(cli(command[0], "--topology", str(path), *command[1:]),
                            status=125 if command[0] == "run" else 1)
    assert sentence.startswith(f"cuse-vfio: {path}")
    assert f"line {line}" in sentence and words in sentence


def test_a_missing_topology_file_is_one_sentence(tmp_path):
    sentence = one_sentence(cli("serve", "--topology", str(tmp_path / "missing.toml")))
    assert "missing.toml" in sentence and "cannot read" in sentence


def test_a_broken_model_file_is_one_sentence_naming_the_line(tmp_path):
    model = tmp_path / "broken.py"
    model.write_text("x = 1\nraise RuntimeError('no such register')\n")
    sentence = one_sentence(cli("serve", "--model-file", str(model)))
    assert f"model file {model}, line 2," in sentence and "RuntimeError: no such register" in sentence
    sentence = one_sentence(cli("serve", "--model-file", str(tmp_path / "absent.py")))
    assert "absent.py does not exist" in sentence


@pytest.mark.skipif(os.path.exists("/dev/cuse"), reason="this machine has CUSE")
def test_asking_for_cuse_without_it_says_the_fix():
    sentence = one_sentence(cli("serve", "--transport", "cuse"))
    assert sentence == ("cuse-vfio: /dev/cuse is missing: load the cuse module (modprobe cuse) "
                        "or use --transport fuse")


def test_run_without_a_command_says_so():
    done = cli("run", "--transport", "fuse")
    assert done.returncode == 125 and "give a command after --" in done.stderr


# -- serving options ------------------------------------------------------------------------------
@needs_fuse
def test_model_file_and_topology_serve_a_second_device(tmp_path, no_leftovers):
    topology = tmp_path / "two.toml"
    topology.write_text('[[device]]\nbdf = "0000:00:02.0"\nmodel = "edu"\ngroup = 2\n\n'
                        '[[device]]\nbdf = "0000:00:05.0"\nmodel = "scratchpad"\ngroup = 5\n')
    done = cli("run", "--transport", "fuse", "--runtime-dir", no_leftovers, "--topology", str(topology),
               "--model-file", os.path.join(ROOT, "examples", "devices", "scratchpad.py"), "--",
               "sh", "-c", "ls /dev/vfio; cat /sys/bus/pci/devices/0000:00:05.0/vendor; "
                           "readlink /sys/bus/pci/devices/0000:00:05.0/iommu_group")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["2", "5", "vfio", "0x1b36", "../../../../kernel/iommu_groups/5"]


CHECK_NOIOMMU = ("import fcntl, os; fd = os.open('/dev/vfio/vfio', os.O_RDWR); "
                 "print(fcntl.ioctl(fd, 0x3b65, 8), fcntl.ioctl(fd, 0x3b65, 3))")  # VFIO_CHECK_EXTENSION


@needs_fuse
@pytest.mark.parametrize("option, noiommu", [((), 0), (("--noiommu",), 1)])
def test_noiommu_offers_the_noiommu_driver(no_leftovers, option, noiommu):
    done = cli("run", "--transport", "fuse", "--runtime-dir", no_leftovers, *option, "--",
               sys.executable, "-c", CHECK_NOIOMMU)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(noiommu), "1"]


@needs_fuse
def test_sysfs_and_dev_dirs_can_be_chosen(tmp_path, no_leftovers):
    dev, sysfs = tmp_path / "nodes", tmp_path / "view"
    sysfs.mkdir()
    done = cli("run", "--transport", "fuse", "--runtime-dir", no_leftovers, "--dev-dir", str(dev),
               "--sysfs-dir", str(sysfs), "--", "sh", "-c",
               f"ls {dev}; cat {sysfs}/bus/pci/devices/{EDU}/device; ls /dev/vfio")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["2", "vfio", "0x11e8", "2", "vfio"]
    assert not dev.exists() and sysfs.is_dir() and os.listdir(sysfs) == []


# -- doctor, demo, trace, faults ------------------------------------------------------------------
@needs_fuse
def test_doctor_says_what_works_and_the_fix_for_what_does_not():
    done = cli("doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    # "mark  name            text": the name is the second column, 16 wide
    lines = {line[6:22].strip(): line for line in done.stdout.splitlines()[:-1]}
    assert lines["FUSE"].startswith("ok") and "/dev/fuse opens" in lines["FUSE"]
    assert lines["FUSE serving"].startswith("ok") and "VFIO_GET_API_VERSION" in lines["FUSE serving"]
    assert lines["ptrace access"].startswith("ok")
    assert lines["pidfd_getfd"].startswith("ok")
    assert lines["mount namespace"].startswith("ok")
    assert lines["built parts"].startswith("ok")
    if not os.path.exists("/dev/cuse"):
        assert lines["CUSE"].startswith("no") and "modprobe cuse" in lines["CUSE"]
        assert "--transport fuse" in lines["CUSE"]
    assert done.stdout.splitlines()[-1].startswith("cuse-vfio can serve")


@needs_fuse
def test_demo_runs_the_edu_client_and_prints_trace_and_faults(tmp_path):
    done = cli("demo", "--transport", "fuse", "--build-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "transport FUSE" in out.splitlines()[0]
    assert "PASSED: 0 failure(s)" in out
    assert "VFIO_GROUP_GET_DEVICE_FD" in out.split("== trace")[1]
    assert "IOMMU faults: none" in out
    assert out.splitlines()[-1].endswith("exited with status 0 (transport FUSE)")
    assert (tmp_path / "vfio-edu-client").exists() and (tmp_path / "demo-trace.jsonl").exists()


def test_demo_in_process_needs_no_kernel(tmp_path):
    done = cli("demo", "--in-process", "--build-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASSED: 0 failure(s)" in done.stdout and "IOMMU faults: 1" in done.stdout


def test_trace_of_a_missing_file_is_one_sentence(tmp_path):
    sentence = one_sentence(cli("trace", str(tmp_path / "none.jsonl")))
    assert "cannot read" in sentence


def test_faults_prints_each_fault_and_a_summary(tmp_path):
    path = tmp_path / "faults.jsonl"
    records = [{"time": 1.0, "device": EDU, "iova": 0x900000, "length": 64, "direction": "write",
                "reason": "unmapped", "detail": ""},
               {"time": 2.0, "device": EDU, "iova": 0x200000, "length": 8, "direction": "read",
                "reason": "read-not-permitted", "detail": "mapped without READ"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    done = cli("faults", str(path))
    assert done.returncode == 0
    assert done.stdout.splitlines() == [
        f"{EDU}: DMA write of 64 bytes at iova 0x900000 blocked: unmapped",
        f"{EDU}: DMA read of 8 bytes at iova 0x200000 blocked: read-not-permitted (mapped without READ)",
        "IOMMU faults: 2 (1 read-not-permitted, 1 unmapped)",
    ]


def test_trace_and_faults_read_stdin_and_refuse_a_malformed_file(tmp_path):
    record = {"time": 1.0, "device": EDU, "iova": 0x900000, "length": 64, "direction": "write",
              "reason": "unmapped", "detail": ""}
    for command, good, words in (
            ("faults", json.dumps(record) + "\n", "IOMMU faults: 1 (1 unmapped)"),
            ("trace", json.dumps({"time": 1.0, "pid": 7, "node": "container", "ioctl": "VFIO_GET_API_VERSION",
                                  "result": 0}) + "\n", "VFIO_GET_API_VERSION")):
        done = subprocess.run([sys.executable, "-m", "cuse_vfio", command, "-"], input=good, text=True,
                              capture_output=True, cwd=ROOT, timeout=TIMEOUT)
        assert done.returncode == 0 and words in done.stdout, done.stderr
        for bad in ("not json\n", good + "[1, 2]\n"):
            path = tmp_path / f"{command}.jsonl"
            path.write_text(bad)
            sentence = one_sentence(cli(command, str(path)))
            assert f"{path}: line" in sentence and "is not a" in sentence


@needs_fuse
def test_the_log_shows_the_level(tmp_path):
    model = tmp_path / "loud.py"
    model.write_text("import logging\nlogging.getLogger('loud').warning('a model file says hello')\n")
    done = cli("run", "--transport", "fuse", "--model-file", str(model), "--", "true")
    assert done.returncode == 0, done.stderr
    assert "cuse-vfio: WARNING: a model file says hello" in done.stderr.splitlines()
