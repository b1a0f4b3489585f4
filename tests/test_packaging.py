"""Packaging: the sdist builds and carries the C sources, a wheel built from it
installs into a fresh venv, and every command works from there, writing nothing
into site-packages.

Builds go through pip's isolated build environment (setuptools and cffi from
the package index), as a user's `pip install` would.
"""

import glob
import hashlib
import os
import subprocess
import sys
import tarfile

import pytest

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("serve", "run", "trace", "faults", "doctor", "demo")


def sh(*argv, **kwargs):
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def tree_digest(path):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            h.update(os.path.relpath(os.path.join(root, name), path).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel built from the sdist, installed with its dependencies into a new venv."""
    work = tmp_path_factory.mktemp("packaging")
    sh(sys.executable, "-m", "build", "--sdist", "--outdir", str(work / "dist"), TOP)
    sdist, = glob.glob(str(work / "dist" / "cuse_vfio-*.tar.gz"))
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), sdist)
    wheel, = glob.glob(str(work / "dist" / "cuse_vfio-*.whl"))
    venv = work / "venv"
    sh(sys.executable, "-m", "venv", str(venv))
    sh(str(venv / "bin" / "python"), "-m", "pip", "install", "-q", wheel)
    site = sh(str(venv / "bin" / "python"), "-c", "import cuse_vfio, os; print(os.path.dirname(cuse_vfio.__file__))",
              cwd=str(work))  # not the source tree, which python -c would import first
    return {"sdist": sdist, "venv": venv, "package": site.strip(), "work": work}


def test_the_sdist_carries_what_the_build_and_the_demo_need(installed):
    with tarfile.open(installed["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("pyproject.toml", "setup.py", "LICENSE", "README.md", "csrc/shim.c", "csrc/shim.h",
                   "csrc/preload.c", "csrc/_build_shim.py", "examples/vfio-edu-client.c",
                   "examples/devices/scratchpad.py", "cuse_vfio/py.typed"):
        assert needed in names, f"the sdist lacks {needed}"


def test_the_installed_package_has_its_compiled_parts(installed):
    package = installed["package"]
    assert package.startswith(str(installed["venv"]))
    assert glob.glob(os.path.join(package, "transport", "_shim*.so"))
    assert os.path.isfile(os.path.join(package, "transport", "libcuse_vfio_preload.so"))
    assert os.path.isfile(os.path.join(package, "py.typed"))


def test_version_and_every_subcommand_help(installed):
    cli = str(installed["venv"] / "bin" / "cuse-vfio")
    from cuse_vfio import __version__
    assert sh(cli, "--version").strip() == f"cuse-vfio {__version__}"
    for command in COMMANDS:
        assert sh(cli, command, "--help").startswith(f"usage: cuse-vfio {command}")


def test_demo_from_the_wheel_writes_nothing_into_site_packages(installed, tmp_path):
    cli = str(installed["venv"] / "bin" / "cuse-vfio")
    lib = str(installed["venv"] / "lib")      # site-packages and what is beside it
    before = tree_digest(lib)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = sh(cli, "demo", "--in-process", env=env, cwd=str(tmp_path))
    assert "PASSED" in out
    assert os.path.isfile(tmp_path / "cache" / "cuse-vfio" / "demo" / "demo-trace.jsonl")
    if os.geteuid() == 0 and os.path.exists("/dev/fuse"):
        out = sh(cli, "demo", "--transport", "fuse", env=env, cwd=str(tmp_path))
        assert "exited with status 0" in out
        assert os.access(tmp_path / "cache" / "cuse-vfio" / "demo" / "vfio-edu-client", os.X_OK)
    assert tree_digest(lib) == before
