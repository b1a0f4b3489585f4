"""cffi (API mode) build of ``cuse_vfio.transport._shim``, and of the LD_PRELOAD library.

``setup.py`` names ``ffibuilder`` in ``cffi_modules``; its ``build_ext`` also
calls :func:`build_preload`.  The cdef below mirrors ``shim.h``.
"""

import os
import shlex
import subprocess

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
typedef struct fuse_req *fuse_req_t;

enum cv_op {
    CV_OP_LOOKUP = 1, CV_OP_GETATTR, CV_OP_SETATTR, CV_OP_OPEN, CV_OP_READ, CV_OP_WRITE,
    CV_OP_FLUSH, CV_OP_RELEASE, CV_OP_IOCTL, CV_OP_READDIR, CV_OP_INIT_DONE, CV_OP_SESSION_END,
};

struct cv_request {
    int sid;
    int op;
    fuse_req_t req;
    uint64_t ino;
    uint64_t fh;
    int open_flags;
    unsigned int cmd;
    uint64_t arg;
    unsigned int ioctl_flags;
    const char *name;
    const void *in_buf;
    size_t in_size;
    size_t out_size;
    int64_t size;
    int64_t off;
    int32_t pid;
    uint32_t uid;
    uint32_t gid;
};

struct cv_session;
struct cv_loop;

struct cv_session *cv_fuse_session_new(int sid, const char *mountpoint, const char *options,
                                       char *err, size_t errlen);
struct cv_session *cv_cuse_session_new(int sid, const char *devname, char *err, size_t errlen);
int cv_session_fd(struct cv_session *s);
void cv_session_free(struct cv_session *s);

struct cv_loop *cv_loop_new(char *err, size_t errlen);
int cv_loop_add(struct cv_loop *l, struct cv_session *s);
int cv_loop_run(struct cv_loop *l);
void cv_loop_stop(struct cv_loop *l);
int cv_loop_drain(struct cv_loop *l, struct cv_session *s);
void cv_loop_free(struct cv_loop *l);

int cv_reply_entry(fuse_req_t req, uint64_t ino, uint32_t mode, uint32_t uid, uint32_t gid,
                   uint64_t size, double timeout);
int cv_reply_attr(fuse_req_t req, uint64_t ino, uint32_t mode, uint32_t uid, uint32_t gid,
                  uint64_t size, double timeout);
int cv_reply_open(fuse_req_t req, uint64_t fh, int direct_io, int nonseekable);
int cv_reply_dir(fuse_req_t req, const char *const *names, const uint64_t *inos, const uint32_t *modes,
                 size_t n, int64_t off, size_t size);
int cv_reply_ioctl_retry(fuse_req_t req, const uint64_t *in_addr, const uint64_t *in_len, size_t n_in,
                         const uint64_t *out_addr, const uint64_t *out_len, size_t n_out);
int cv_reply_ioctl(fuse_req_t req, int result, const void *buf, size_t size);

int fuse_reply_err(fuse_req_t req, int err);
void fuse_reply_none(fuse_req_t req);
int fuse_reply_buf(fuse_req_t req, const char *buf, size_t size);
int fuse_reply_write(fuse_req_t req, size_t count);

#define CV_IOCTL_MAX_IOV 256
#define CV_IOCTL_MAX_BYTES 131072

extern "Python+C" void cv_py_request(struct cv_request *r);
extern "Python+C" void cv_py_log(int level, const char *message);
"""


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
