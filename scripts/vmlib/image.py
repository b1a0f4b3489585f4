"""The guest's kernel and initramfs, built once on the host and cached.

    apt = Apt()
    with Lock(os.path.join(cache_dir(), "lock")):
        ensure_packages(apt)
        root, kver = ensure_kernel(apt)                       # Debian's stock kernel, unpacked
        initrd, mods = ensure_initramfs("cuse", root, kver, ["cuse"], {})
        kernel = ensure_pvh_kernel(root, kver)

Cache (CUSE_VFIO_VM_CACHE, else $XDG_CACHE_HOME/cuse-vfio-vm, else
~/.cache/cuse-vfio-vm): the unpacked kernel package, the initramfs images, the
per-run directories and console-last.log.  First use installs qemu-system-x86,
busybox-static and kmod with apt-get when missing and downloads the kernel
with `apt-get download`; an flock on the cache keeps concurrent first uses
from racing.
"""

import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time

DEBS = {  # binary we need -> Debian package that ships it
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "depmod": "kmod",
    "modprobe": "kmod",
}

# Modules every guest insmods (with their dependencies, as `modprobe
# --show-depends` orders them).  virtio_pci is not a dependency of anything
# below but the 9p transport needs it to find its devices.
COMMON_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]

#: the guest's /init, the same for every guest; what differs comes in /etc/vm.env and /hook.sh
INIT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "init.sh")


class HarnessError(Exception):
    """Anything that keeps the VM from running; the scripts exit 125."""


_name = ["vm"]


def set_name(name):
    """The prefix of every line the harness says on stderr ("vm", "guest")."""
    _name[0] = name


def say(msg):
    sys.stderr.write("%s: %s\n" % (_name[0], msg))
    sys.stderr.flush()


def cache_dir():
    d = os.environ.get("CUSE_VFIO_VM_CACHE")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "cuse-vfio-vm")
    return os.path.abspath(d)


def which(name):
    # sbin is often missing from PATH for depmod/modprobe.
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return shutil.which(name, path=path)


def dpkg_installed(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True)
    return r.returncode == 0 and "install ok installed" in r.stdout


def tool_ok(binary):
    if binary == "busybox":
        # Must be the static build: it runs in an initramfs without libc.
        return dpkg_installed("busybox-static") and os.path.exists("/bin/busybox")
    return which(binary) is not None


def missing_packages():
    return sorted({pkg for b, pkg in DEBS.items() if not tool_ok(b)})


def run_logged(cmd, what, cwd=None):
    """Run a setup command quietly; on failure show the end of its output on
    stderr (stdout belongs to the guest command) and raise HarnessError."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        r = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as e:
        raise HarnessError("%s: cannot run %s: %s" % (what, cmd[0], e))
    if r.returncode != 0:
        out = r.stdout.decode(errors="replace").rstrip()
        if out:
            sys.stderr.write("\n".join(out.splitlines()[-30:]) + "\n")
        raise HarnessError("%s failed (%s exited %d)" % (what, " ".join(cmd), r.returncode))


class Apt:
    """apt-get update at most once per harness run, and only when needed."""

    def __init__(self):
        self.updated = False

    def update(self):
        if not self.updated:
            say("apt-get update")
            run_logged(["apt-get", "update", "-qq"], "apt-get update")
            self.updated = True


def ensure_packages(apt):
    miss = missing_packages()
    if not miss:
        return
    if os.geteuid() != 0:
        raise HarnessError("missing Debian packages %s and not root to install them" % " ".join(miss))
    apt.update()
    say("installing Debian packages: %s" % " ".join(miss))
    run_logged(["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + miss,
               "apt-get install " + " ".join(miss))
    still = missing_packages()
    if still:
        raise HarnessError("still missing after apt-get install: %s" % " ".join(still))


#: the guest kernels a harness can boot: --kernel name -> the Debian
#: metapackage whose dependency is the real kernel package.  6.1 is bookworm's
#: own kernel; 6.12 is the one bookworm-security carries beside it.
KERNELS = {
    "6.1": "linux-image-amd64",
    "6.12": "linux-image-6.12-amd64",
}
DEFAULT_KERNEL = "6.1"


def kernel_package_name(apt, kernel=DEFAULT_KERNEL, allow_update=True):
    """The kernel's metapackage (KERNELS) depends on the real package
    (linux-image-6.1.0-NN-amd64, linux-image-6.12.NN+deb12-amd64); return that
    one for the candidate version."""
    meta = KERNELS[kernel]
    for attempt in (0, 1):
        r = subprocess.run(["apt-cache", "depends", meta], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, universal_newlines=True)
        m = re.search(r"^\s*Depends:\s*(linux-image-\d\S*)\s*$", r.stdout, re.M)
        if m:
            return m.group(1)
        if attempt == 0 and allow_update:
            apt.update()
        else:
            break
    raise HarnessError("cannot resolve the kernel package %s depends on (apt-cache depends)" % meta)


def _current_file(kernel):
    # "current" is 6.1's (the name older caches already use).
    return os.path.join(cache_dir(), "kernel", "current" if kernel == DEFAULT_KERNEL else "current-" + kernel)


def kernel_tree(kernel=DEFAULT_KERNEL):
    """(root, kver) of the cached unpacked kernel, or None."""
    cur = _current_file(kernel)
    try:
        with open(cur) as f:
            name = f.read().strip()
    except OSError:
        return None
    root = os.path.join(cache_dir(), "kernel", name)
    try:
        with open(os.path.join(root, ".cuse-vfio-vm-kver")) as f:
            kver = f.read().strip()
    except OSError:
        return None
    if not os.path.exists(os.path.join(root, "boot", "vmlinuz-" + kver)):
        return None
    return root, kver


def modules_dir(root, kver):
    for d in ("lib/modules", "usr/lib/modules"):
        p = os.path.join(root, d, kver)
        if os.path.isdir(p):
            return p
    return None


def ensure_kernel(apt, kernel=DEFAULT_KERNEL):
    have = kernel_tree(kernel)
    if have:
        return have  # once cached, never go to the network again
    kdir = os.path.join(cache_dir(), "kernel")
    os.makedirs(kdir, exist_ok=True)
    pkg = kernel_package_name(apt, kernel)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=kdir)
    try:
        say("downloading the kernel package %s" % pkg)
        # Sandbox user root: the _apt user may not be able to write into the cache.
        cmd = ["apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", pkg]
        try:
            run_logged(cmd, "apt-get download " + pkg, cwd=tmp)
        except HarnessError:
            if apt.updated:
                raise
            apt.update()  # stale package lists give 404s
            pkg = kernel_package_name(apt, kernel, allow_update=False)
            cmd[-1] = pkg
            run_logged(cmd, "apt-get download " + pkg, cwd=tmp)
        debs = [f for f in os.listdir(tmp) if f.endswith(".deb")]
        if len(debs) != 1:
            raise HarnessError("apt-get download %s left %r" % (pkg, debs))
        root = os.path.join(tmp, "root")
        run_logged(["dpkg-deb", "-x", os.path.join(tmp, debs[0]), root], "dpkg-deb -x " + debs[0])
        kvers = [f[len("vmlinuz-"):] for f in os.listdir(os.path.join(root, "boot"))
                 if f.startswith("vmlinuz-")]
        if len(kvers) != 1:
            raise HarnessError("kernel package %s: expected one boot/vmlinuz-*, found %r" % (debs[0], kvers))
        kver = kvers[0]
        if not modules_dir(root, kver):
            raise HarnessError("kernel package %s has no modules directory for %s" % (debs[0], kver))
        run_logged([which("depmod") or "depmod", "-b", root, kver], "depmod")
        with open(os.path.join(root, ".cuse-vfio-vm-kver"), "w") as f:
            f.write(kver + "\n")
        name = debs[0][:-len(".deb")]
        final = os.path.join(kdir, name)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(root, final)
        cur = _current_file(kernel)
        with open(cur + ".tmp", "w") as f:
            f.write(name + "\n")
        os.replace(cur + ".tmp", cur)
        say("kernel %s cached in %s" % (kver, final))
        return final, kver
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_pvh_kernel(root, kver):
    """Path of the kernel to boot.  Under TCG the bzImage's own xz
    decompression costs 4-7 s of every boot, so unpack vmlinux once on the
    host and let qemu boot that ELF through its PVH entry point (Debian's
    kernel has CONFIG_PVH=y).  Falls back to the bzImage."""
    bz = os.path.join(root, "boot", "vmlinuz-" + kver)
    out = os.path.join(root, "boot", "vmlinux-%s.pvh" % kver)
    if os.path.exists(out):
        return out
    try:
        with open(os.path.join(root, "boot", "config-" + kver)) as f:
            if "\nCONFIG_PVH=y\n" not in f.read():
                return bz
        with open(bz, "rb") as f:
            data = f.read()
        i = data.find(b"\xfd7zXZ\x00")
        if i < 0:
            return bz
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[i:])
        if elf[:4] != b"\x7fELF":
            return bz
    except (OSError, lzma.LZMAError):
        return bz
    with open(out + ".tmp", "wb") as f:
        f.write(elf)
    os.replace(out + ".tmp", out)
    return out


def resolve_modules(root, kver, names):
    """[(name, path)] in load order, dependencies first, no duplicates;
    built-in modules are skipped."""
    out, seen = [], set()
    modprobe = which("modprobe") or "modprobe"
    for name in names:
        # -C /dev/null: the host's modprobe.d must not add options or blacklists.
        r = subprocess.run([modprobe, "-C", "/dev/null", "-d", root, "-S", kver, "--show-depends", name],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        if r.returncode != 0:
            raise HarnessError("modprobe --show-depends %s: %s" % (name, r.stderr.strip()))
        for line in r.stdout.splitlines():
            w = line.split()
            if len(w) >= 2 and w[0] == "insmod" and w[1] not in seen:
                seen.add(w[1])
                base = os.path.basename(w[1])
                out.append((re.sub(r"\.ko(\.\w+)?$", "", base), w[1]))
    return out


def read_module(path):
    """Module bytes, uncompressed (busybox insmod does not decompress)."""
    if path.endswith(".xz"):
        with lzma.open(path) as f:
            return f.read()
    if path.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", path], stdout=subprocess.PIPE, check=True).stdout
    if path.endswith(".gz"):
        with gzip.open(path) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


class Cpio:
    """Minimal cpio "newc" writer, enough for an initramfs."""

    def __init__(self):
        self.parts = []
        self.ino = 1

    def _add(self, name, mode, data=b"", rdev=(0, 0)):
        self.ino += 1
        nb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0]
        hdr = b"070701" + b"".join(b"%08x" % v for v in fields)
        self.parts += [hdr, nb, b"\0" * ((-(len(hdr) + len(nb))) % 4), data, b"\0" * ((-len(data)) % 4)]

    def dir(self, name):
        self._add(name, stat.S_IFDIR | 0o755)

    def file(self, name, data, perm=0o644):
        self._add(name, stat.S_IFREG | perm, data)

    def symlink(self, name, target):
        self._add(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name, major, minor):
        self._add(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self):
        self._add("TRAILER!!!", 0)
        return b"".join(self.parts)



def ensure_initramfs(name, root, kver, modules, files):
    """Path of a cached initramfs (busybox, the modules ``modules`` need in
    load order, the common /init) and its [(module, path)] list.  ``files``
    maps extra image paths to their text: /etc/vm.env (the settings /init
    reads) and /hook.sh (sourced by /init once /vmrun is up)."""
    mods = resolve_modules(root, kver, COMMON_MODULES + list(modules))
    with open(INIT_SCRIPT, "rb") as f:
        init = f.read()
    with open("/bin/busybox", "rb") as f:
        busybox = f.read()
    h = hashlib.sha256()
    for part in [kver, " ".join(p for _, p in mods)] + ["%s=%s" % kv for kv in sorted(files.items())]:
        h.update(part.encode() + b"\0")
    h.update(hashlib.sha256(init).digest())
    h.update(hashlib.sha256(busybox).digest())
    d = os.path.join(cache_dir(), "initramfs")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "%s-%s-%s.cpio.gz" % (name, kver, h.hexdigest()[:16]))
    if os.path.exists(path):
        os.utime(path)  # recently used: keeps it from the clean-up below
        return path, mods
    say("building the initramfs %s (busybox and %d modules)" % (os.path.basename(path), len(mods)))
    applets = subprocess.run(["/bin/busybox", "--list"], stdout=subprocess.PIPE,
                             universal_newlines=True, check=True).stdout.split()
    c = Cpio()
    for dn in ("bin", "dev", "etc", "proc", "sys", "mnt", "mnt/lower", "mnt/rw", "newroot", "vmrun", "modules"):
        c.dir(dn)
    c.chardev("dev/console", 5, 1)  # init's stdio before devtmpfs is mounted
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", busybox, 0o755)
    for a in applets:
        if a != "busybox":
            c.symlink("bin/" + a, "busybox")
    order = []
    for i, (mod, p) in enumerate(mods):
        fn = "%02d-%s.ko" % (i, mod)
        c.file("modules/" + fn, read_module(p))
        order.append(fn)
    c.file("modules/order", ("\n".join(order) + "\n").encode())
    for fp, text in sorted(files.items()):
        c.file(fp.lstrip("/"), text.encode())
    c.file("init", init, 0o755)
    tmp = path + ".tmp.%d" % os.getpid()
    with open(tmp, "wb") as f:
        f.write(gzip.compress(c.finish(), 6))
    os.replace(tmp, path)
    # Keep the cache from growing forever: drop images unused for a day (not
    # at once: a checkout with another version of these scripts may be using one).
    for f in os.listdir(d):
        fp = os.path.join(d, f)
        try:
            if f.endswith(".cpio.gz") and fp != path and time.time() - os.stat(fp).st_mtime > 86400:
                os.unlink(fp)
        except OSError:
            pass
    return path, mods


def env_file(settings):
    """/etc/vm.env's text: shell assignments /init sources."""
    return "".join("%s=%s\n" % (k, shlex.quote(str(v))) for k, v in sorted(settings.items()))


class Lock:
    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.f = open(path, "a")

    def __enter__(self):
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *a):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


class Image:
    """What a boot needs: the kernel to boot, the initramfs, and the guest
    kernel's tree (its modules directory is bound on /lib/modules in the
    guest, so `modprobe` there loads the guest kernel's modules)."""

    def __init__(self, kernel, initrd, kver, root, mods):
        self.kernel, self.initrd, self.kver, self.root, self.mods = kernel, initrd, kver, root, mods


def setup(name, modules, settings, hook="", kernel=DEFAULT_KERNEL):
    """Everything before booting, under the cache lock.  ``settings`` go to
    /etc/vm.env, ``hook`` (shell text) to /hook.sh; ``kernel`` is a KERNELS key."""
    apt = Apt()
    with Lock(os.path.join(cache_dir(), "lock")):
        ensure_packages(apt)
        root, kver = ensure_kernel(apt, kernel)
        settings = dict(settings, VM_MODULES=modules_dir(root, kver))
        files = {"/etc/vm.env": env_file(settings)}
        if hook:
            files["/hook.sh"] = hook
        initrd, mods = ensure_initramfs(name, root, kver, modules, files)
        kernel = ensure_pvh_kernel(root, kver)
    return Image(kernel, initrd, kver, root, mods)
