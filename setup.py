import importlib.util
import os

from setuptools import find_packages, setup
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


setup(
    name="cuse-vfio",
    version="0.1.0",
    description="The Linux VFIO interface in Python, served as real character devices",
    packages=find_packages(include=["cuse_vfio", "cuse_vfio.*"]),
    python_requires=">=3.9",
    install_requires=["cffi>=1.15", "ioctl-opt>=1.3", "mfusepy>=3.0", "tomli>=2.0; python_version<'3.11'"],
    setup_requires=["cffi>=1.15"],
    cffi_modules=["csrc/_build_shim.py:ffibuilder"],
    cmdclass={"build_ext": build_ext_with_preload},
    extras_require={"test": ["pytest>=7", "pytest-timeout>=2"]},
    entry_points={"console_scripts": ["cuse-vfio = cuse_vfio.cli:main"]},
)
