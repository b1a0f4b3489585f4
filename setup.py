import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class build_ext_with_preload(build_ext):
    """build_ext (which builds the cffi shim) plus the LD_PRELOAD hand-off library.

    The preload library is a plain shared object with no Python in it, so it
    is not an Extension; it is compiled with the same compiler and put beside
    the shim in the package, in place for editable installs too.
    """

    def run(self):
        super().run()
        spec = importlib.util.spec_from_file_location("_build_shim", os.path.join(HERE, "csrc", "_build_shim.py"))
        build_script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build_script)
        out_dir = os.path.dirname(self.get_ext_fullpath("cuse_vfio.transport._shim"))
        os.makedirs(out_dir, exist_ok=True)
        build_script.build_preload(self.compiler, out_dir, os.path.join(self.build_temp, "preload"))


class build_py_with_client(build_py):
    """build_py plus the edu client's C source as package data, so `cuse-vfio demo`
    works from an installed wheel; a source tree uses examples/ itself."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "cuse_vfio", "cli", "examples")
        os.makedirs(target, exist_ok=True)
        self.copy_file(os.path.join(HERE, "examples", "vfio-edu-client.c"), target)


# Metadata lives in pyproject.toml; this file adds only what must be code.
setup(
    cffi_modules=["csrc/_build_shim.py:ffibuilder", "csrc/_build_shim.py:copier_ffibuilder"],
    cmdclass={"build_ext": build_ext_with_preload, "build_py": build_py_with_client},
)
