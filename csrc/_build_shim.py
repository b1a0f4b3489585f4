"""cffi (API mode) builds of ``cuse_vfio.transport._shim`` and ``cuse_vfio.memory._copier``,
and of the LD_PRELOAD library.

``setup.py`` names ``ffibuilder`` and ``copier_ffibuilder`` in ``cffi_modules``;
its ``build_ext`` also calls :func:`build_preload`.  Each cdef is read from its
header (``shim.h``, ``copier.h``: one declaration of every function and struct
both sides use).
"""

import os
import shlex
import subprocess

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

#: What cffi must know of libfuse3 itself: the request handle and the plain replies Python sends.
LIBFUSE_CDEF = """
typedef struct fuse_req *fuse_req_t;
int fuse_reply_err(fuse_req_t req, int err);
void fuse_reply_none(fuse_req_t req);
int fuse_reply_buf(fuse_req_t req, const char *buf, size_t size);
int fuse_reply_write(fuse_req_t req, size_t count);
"""

BEGIN, END = "/* cffi-cdef: begin */", "/* cffi-cdef: end */"


def shim_cdef(header=os.path.join(HERE, "shim.h")):
    """The declarations of shim.h between its cffi-cdef markers, as cffi takes them."""
    with open(header, encoding="utf-8") as f:
        text = f.read()
    try:
        part = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    except ValueError:
        raise SystemExit(f"{header}: the {BEGIN} / {END} markers are missing") from None
    return part.replace("CV_PYTHON", 'extern "Python+C"')


CDEF = LIBFUSE_CDEF + shim_cdef()


def _pkg_config(*flags):
    try:
        out = subprocess.check_output(["pkg-config", *flags, "fuse3"], text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"cuse-vfio needs libfuse3 headers: install libfuse3-dev and pkg-config ({e})")
    return shlex.split(out)


def _relative(path):
    # setuptools wants sources relative to setup.py's directory.
    try:
        return os.path.relpath(path)
    except ValueError:
        return path


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
_cflags = _pkg_config("--cflags")
ffibuilder.set_source(
    "cuse_vfio.transport._shim",
    '#include "shim.h"',
    sources=[_relative(os.path.join(HERE, "shim.c"))],
    include_dirs=[HERE] + [f[2:] for f in _cflags if f.startswith("-I")],
    define_macros=[(f[2:].split("=")[0], f[2:].split("=")[1] if "=" in f else None)
                   for f in _cflags if f.startswith("-D")],
    extra_compile_args=["-Wall", "-Wno-unused-parameter"],
    libraries=["fuse3", "pthread"],
    library_dirs=[f[2:] for f in _pkg_config("--libs-only-L") if f.startswith("-L")],
)

#: The bounded copies of client memory (csrc/copier.h) and the guarded copies of shared windows
#: (csrc/shared.h), below the transport: no libfuse in it.
copier_ffibuilder = FFI()
copier_ffibuilder.cdef(shim_cdef(os.path.join(HERE, "copier.h")) + shim_cdef(os.path.join(HERE, "shared.h")))
copier_ffibuilder.set_source(
    "cuse_vfio.memory._copier",
    '#include "copier.h"\n#include "shared.h"',
    sources=[_relative(os.path.join(HERE, "copier.c")), _relative(os.path.join(HERE, "shared.c"))],
    include_dirs=[HERE],
    extra_compile_args=["-Wall", "-O2"],
    libraries=["pthread"],
)

PRELOAD_NAME = "libcuse_vfio_preload.so"


def build_preload(compiler, out_dir, build_temp):
    """Compile csrc/preload.c into ``out_dir/libcuse_vfio_preload.so`` (plain C, no Python)."""
    os.makedirs(build_temp, exist_ok=True)
    objects = compiler.compile([_relative(os.path.join(HERE, "preload.c"))], output_dir=build_temp,
                               extra_postargs=["-fPIC", "-O2", "-Wall"])
    target = os.path.join(out_dir, PRELOAD_NAME)
    compiler.link_shared_object(objects, target, libraries=["dl"])
    return target


if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
    copier_ffibuilder.compile(verbose=True)
