"""The sysfs view: formats in-process, then the same tree mounted through FUSE.

Mount tests need /dev/fuse and root (the dev/CI machines have both); every
mount is taken down in a fixture finalizer, so a failing test leaves no
mount behind.
"""

import errno
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time

import pytest

from cuse_vfio.sysfs import (
    SysfsDevice, SysfsGroup, SysfsView, SysfsViewError, bar_resource, mounted,
)
from cuse_vfio.sysfs import pci as sysfs

EDU = "0000:00:02.0"
NIC = "0000:00:03.0"


def edu_config() -> bytearray:
    """QEMU's edu device header, as q35 shows it."""
    cfg = bytearray(256)
    cfg[0x00:0x04] = bytes.fromhex("3412e811")     # 1234:11e8
    cfg[0x08] = 0x10                                # revision
    cfg[0x09:0x0C] = bytes.fromhex("00ff00")        # class 00ff00
    cfg[0x2C:0x30] = bytes.fromhex("f41a0011")      # subsystem 1af4:1100
    cfg[0x3C], cfg[0x3D] = 11, 1                    # INTx: line 11, pin A
    cfg[0x40:0x100] = bytes(range(0x40, 0x100))     # recognizable capability area
    return cfg


class Model:
    """A stand-in device model: live config bytes, and a switch to make its reader fail."""

    def __init__(self, cfg: bytearray):
        self.cfg = cfg
        self.broken = False

    def read_config(self) -> bytes:
        if self.broken:
            raise RuntimeError("model is wedged")
        return bytes(self.cfg)


def make_view(edu: Model, nic: Model) -> SysfsView:
    devices = [
        SysfsDevice.from_config_space(EDU, 2, edu.read_config, resources=[bar_resource(1 << 20)]),
        SysfsDevice(NIC, 5, vendor=0x8086, device=0x10D3, subsystem_vendor=0x8086, subsystem_device=0xA01F,
                    class_code=0x020000, revision=0x00, irq=0, config_reader=nic.read_config,
                    config_size=4096,
                    resources=[bar_resource(128 << 10), bar_resource(128 << 10), bar_resource(32, io=True),
                               bar_resource(16 << 10, mem64=True, prefetchable=True, start=0xFEBF0000)]),
    ]
    return SysfsView(devices, groups=[SysfsGroup(5, type="DMA", reserved_regions=())])


def _mounted(path: str) -> bool:
    return mounted(os.path.abspath(path))


@pytest.fixture
def models():
    nic_cfg = bytearray(4096)
    nic_cfg[0:4] = bytes.fromhex("8680d310")
    return Model(edu_config()), Model(nic_cfg)


@pytest.fixture
def view(models):
    return make_view(*models)


@pytest.fixture
def mnt(view, tmp_path):
    root = tmp_path / "sys"
    root.mkdir()
    handle = view.mount(str(root))
    try:
        yield str(root)
    finally:
        handle.unmount()
        assert not _mounted(str(root))


def dev(mnt: str, bdf: str = EDU, name: str = "") -> str:
    return os.path.join(mnt, "bus/pci/devices", bdf, name)


def cat(path: str) -> str:
    with open(path) as f:
        return f.read()


# -- in-process: the tree and its formats ------------------------------------

def test_from_config_space_takes_ids_from_the_header(models):
    d = SysfsDevice.from_config_space(EDU, 2, models[0].read_config)
    assert (d.vendor, d.device, d.subsystem_vendor, d.subsystem_device) == (0x1234, 0x11E8, 0x1AF4, 0x1100)
    assert (d.class_code, d.revision, d.irq, d.config_size) == (0x00FF00, 0x10, 11, 256)
    assert SysfsDevice.from_config_space(NIC, 5, models[1].read_config).config_size == 4096


def test_bar_resource_flags_match_the_kernel():
    # 0x140204 is what the dev machine's 6.18 shows for a 64-bit MMIO BAR.
    assert bar_resource(1 << 20, mem64=True) == (0, 0xFFFFF, 0x140204)
    assert bar_resource(1 << 20) == (0, 0xFFFFF, 0x40200)
    assert bar_resource(1 << 14, mem64=True, prefetchable=True, start=0xFEBF0000)[2] == 0x14220C
    assert bar_resource(32, io=True) == (0, 31, 0x40101)
    assert bar_resource(0) == (0, 0, 0)
    with pytest.raises(ValueError):
        bar_resource(3000)


@pytest.mark.parametrize("change, words", [
    ({"bdf": "00:02.0"}, "0000:00:02.0"),
    ({"bdf": "0000:00:02.0", "vendor": 0x12345}, "vendor"),
    ({"config_size": 1024}, "config_size"),
    ({"group_id": -1}, "IOMMU group"),
    ({"resources": [(0, 0, 0)] * 14}, "13 resources"),
])
def test_bad_device_descriptions_say_what_is_wrong(change, words):
    fields = dict(bdf=EDU, group_id=2, vendor=0x1234, device=0x11E8, subsystem_vendor=0x1AF4,
                  subsystem_device=0x1100, class_code=0xFF00, revision=0x10, irq=11,
                  config_reader=lambda: bytes(256))
    fields.update(change)
    with pytest.raises(SysfsViewError, match=re.escape(words)):
        SysfsDevice(**fields)


def test_duplicate_devices_and_bad_groups_are_refused(models):
    d = SysfsDevice.from_config_space(EDU, 2, models[0].read_config)
    with pytest.raises(SysfsViewError, match="listed twice"):
        SysfsView([d, d])
    with pytest.raises(SysfsViewError, match="type"):
        SysfsGroup(2, type="dma")


def test_cpumask_is_printed_like_the_kernel():
    assert sysfs._cpumask([0, 1], 2) == "3"
    assert sysfs._cpumask([0, 1], 8) == "03"
    assert sysfs._cpumask(range(40), 40) == "ff,ffffffff"
    assert sysfs._cpumask([0, 33], 64) == "00000002,00000001"
    assert sysfs._parse_cpulist("0-2,5,7-8\n") == [0, 1, 2, 5, 7, 8]


def test_local_cpus_match_a_real_device_without_numa_node():
    real = [p for p in sorted(os.listdir("/sys/bus/pci/devices"))
            if cat(f"/sys/bus/pci/devices/{p}/numa_node").strip() == "-1"] \
        if os.path.isdir("/sys/bus/pci/devices") else []
    if not real:
        pytest.skip("no real PCI device without a NUMA node to compare with")
    here = f"/sys/bus/pci/devices/{real[0]}"
    assert sysfs._host_cpus() == (cat(f"{here}/local_cpus").strip(), cat(f"{here}/local_cpulist").strip())


def test_paths_name_what_run_binds():
    assert SysfsView.paths("/run/cv") == {
        "/sys/bus/pci/devices": "/run/cv/bus/pci/devices",
        "/sys/kernel/iommu_groups": "/run/cv/kernel/iommu_groups",
        "/sys/bus/pci/drivers/vfio-pci": "/run/cv/bus/pci/drivers/vfio-pci",
    }


def test_in_process_reads(view, models):
    assert view.read(f"bus/pci/devices/{EDU}/vendor") == b"0x1234\n"
    assert view.read(f"/bus/pci/devices/{EDU}/config") == bytes(models[0].cfg)
    assert view.listdir("kernel/iommu_groups") == ["2", "5"]
    assert view.readlink(f"bus/pci/drivers/vfio-pci/{NIC}") == f"../../../../bus/pci/devices/{NIC}"
    with pytest.raises(FileNotFoundError):
        view.read("bus/pci/devices/0000:00:09.0/vendor")


def test_groups_list_in_numeric_order_even_without_devices(models):
    devices = [SysfsDevice.from_config_space(EDU, 10, models[0].read_config),
               SysfsDevice.from_config_space(NIC, 9, models[1].read_config)]
    view = SysfsView(devices, groups=[SysfsGroup(3)])
    assert view.listdir("kernel/iommu_groups") == ["3", "9", "10"]
    assert view.listdir("kernel/iommu_groups/3/devices") == []
    assert view.listdir("kernel/iommu_groups/9/devices") == [NIC]


# -- mounted -----------------------------------------------------------------

def test_device_attributes(mnt):
    expected = {
        "vendor": "0x1234\n", "device": "0x11e8\n",
        "subsystem_vendor": "0x1af4\n", "subsystem_device": "0x1100\n",
        "class": "0x00ff00\n", "revision": "0x10\n", "irq": "11\n", "numa_node": "-1\n",
        "enable": "0\n", "driver_override": "vfio-pci\n",
        "modalias": "pci:v00001234d000011E8sv00001AF4sd00001100bc00scFFi00\n",
        "uevent": ("DRIVER=vfio-pci\nPCI_CLASS=FF00\nPCI_ID=1234:11E8\nPCI_SUBSYS_ID=1AF4:1100\n"
                   f"PCI_SLOT_NAME={EDU}\n"
                   "MODALIAS=pci:v00001234d000011E8sv00001AF4sd00001100bc00scFFi00\n"),
        "local_cpus": sysfs._host_cpus()[0] + "\n",
        "local_cpulist": sysfs._host_cpus()[1] + "\n",
    }
    for name, text in expected.items():
        assert cat(dev(mnt, EDU, name)) == text, name
    assert cat(dev(mnt, NIC, "class")) == "0x020000\n"
    assert cat(dev(mnt, NIC, "uevent")).splitlines()[1] == "PCI_CLASS=20000"
    assert cat(dev(mnt, NIC, "modalias")) == "pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00\n"


def test_resource_has_13_kernel_format_lines(mnt):
    lines = cat(dev(mnt, NIC, "resource")).splitlines()
    assert len(lines) == 13
    assert all(re.fullmatch(r"0x[0-9a-f]{16} 0x[0-9a-f]{16} 0x[0-9a-f]{16}", line) for line in lines)
    assert lines[0] == "0x0000000000000000 0x000000000001ffff 0x0000000000040200"
    assert lines[2] == "0x0000000000000000 0x000000000000001f 0x0000000000040101"
    assert lines[3] == "0x00000000febf0000 0x00000000febf3fff 0x000000000014220c"
    assert set(lines[4:]) == {"0x0000000000000000 0x0000000000000000 0x0000000000000000"}
    # DPDK's reading: len = end - start + 1 for lines flagged IORESOURCE_MEM.
    start, end, flags = (int(v, 16) for v in cat(dev(mnt, EDU, "resource")).splitlines()[0].split())
    assert flags & sysfs.IORESOURCE_MEM and end - start + 1 == 1 << 20


def test_group_attributes(mnt):
    g2 = os.path.join(mnt, "kernel/iommu_groups/2")
    assert sorted(os.listdir(g2)) == ["devices", "reserved_regions", "type"]
    assert cat(f"{g2}/type") == "DMA-FQ\n"
    assert cat(f"{g2}/reserved_regions") == "0x00000000fee00000 0x00000000feefffff msi\n"
    assert cat(os.path.join(mnt, "kernel/iommu_groups/5/type")) == "DMA\n"
    assert cat(os.path.join(mnt, "kernel/iommu_groups/5/reserved_regions")) == ""


def test_directory_listings(mnt):
    assert sorted(os.listdir(mnt)) == ["bus", "kernel"]
    assert sorted(os.listdir(os.path.join(mnt, "bus/pci"))) == ["devices", "drivers"]
    assert os.listdir(os.path.join(mnt, "bus/pci/devices")) == [EDU, NIC]
    assert os.listdir(os.path.join(mnt, "bus/pci/drivers")) == ["vfio-pci"]
    assert sorted(os.listdir(os.path.join(mnt, "bus/pci/drivers/vfio-pci"))) == sorted(
        [EDU, NIC, "bind", "new_id", "remove_id", "uevent", "unbind"])
    assert os.listdir(os.path.join(mnt, "kernel/iommu_groups")) == ["2", "5"]
    assert os.listdir(os.path.join(mnt, "kernel/iommu_groups/2/devices")) == [EDU]
    assert os.listdir(os.path.join(mnt, "kernel/iommu_groups/5/devices")) == [NIC]
    names = set(os.listdir(dev(mnt, EDU)))
    assert {"config", "resource", "iommu_group", "driver", "subsystem", "uevent", "modalias"} <= names


def test_links_resolve_inside_the_view(mnt):
    assert os.readlink(dev(mnt, EDU, "iommu_group")) == "../../../../kernel/iommu_groups/2"
    assert os.readlink(dev(mnt, NIC, "iommu_group")) == "../../../../kernel/iommu_groups/5"
    assert os.readlink(dev(mnt, EDU, "driver")) == "../../../../bus/pci/drivers/vfio-pci"
    assert os.path.basename(os.readlink(dev(mnt, EDU, "driver"))) == "vfio-pci"
    assert os.path.realpath(dev(mnt, EDU, "iommu_group")) == os.path.join(mnt, "kernel/iommu_groups/2")
    assert os.path.realpath(dev(mnt, EDU, "driver")) == os.path.join(mnt, "bus/pci/drivers/vfio-pci")
    assert os.path.realpath(dev(mnt, EDU, "subsystem")) == os.path.join(mnt, "bus/pci")
    group_link = os.path.join(mnt, "kernel/iommu_groups/2/devices", EDU)
    assert os.path.realpath(group_link) == dev(mnt, EDU).rstrip("/")
    assert os.path.realpath(os.path.join(mnt, "bus/pci/drivers/vfio-pci", NIC)) == dev(mnt, NIC).rstrip("/")
    # walking through the links reaches the files
    assert cat(os.path.join(group_link, "vendor")) == "0x1234\n"
    assert cat(os.path.join(dev(mnt, EDU, "iommu_group"), "type")) == "DMA-FQ\n"


def test_shell_clients_find_the_group_and_driver(mnt):
    script = ('d="$1/bus/pci/devices/0000:00:02.0"; basename "$(readlink "$d/iommu_group")"; '
              'basename "$(readlink "$d/driver")"; readlink -f "$d/iommu_group"; cat "$d/vendor"; '
              'for g in "$1"/kernel/iommu_groups/*/devices/*; do echo "${g#$1/kernel/iommu_groups/}"; done')
    out = subprocess.run(["sh", "-c", script, "sh", mnt], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["2", "vfio-pci", os.path.join(mnt, "kernel/iommu_groups/2"), "0x1234",
                                f"2/devices/{EDU}", f"5/devices/{NIC}"]


def test_modes_sizes_and_owners_are_sysfs_like(mnt):
    def st(path):
        return os.lstat(path)

    for name, mode in (("vendor", 0o444), ("resource", 0o444), ("config", 0o644), ("numa_node", 0o644),
                       ("uevent", 0o644)):
        s = st(dev(mnt, EDU, name))
        assert stat.S_ISREG(s.st_mode) and stat.S_IMODE(s.st_mode) == mode, name
        assert (s.st_uid, s.st_gid) == (0, 0)
    assert st(dev(mnt, EDU, "vendor")).st_size == 4096
    assert st(dev(mnt, EDU, "config")).st_size == 256
    assert st(dev(mnt, NIC, "config")).st_size == 4096
    link = st(dev(mnt, EDU, "iommu_group"))
    assert stat.S_ISLNK(link.st_mode) and stat.S_IMODE(link.st_mode) == 0o777
    d = st(dev(mnt, EDU))
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o755
    for name in ("bind", "unbind", "new_id", "remove_id", "uevent"):
        assert stat.S_IMODE(st(os.path.join(mnt, "bus/pci/drivers/vfio-pci", name)).st_mode) == 0o200
    assert stat.S_IMODE(st(os.path.join(mnt, "kernel/iommu_groups/2/type")).st_mode) == 0o644


def test_short_reads_end_at_the_content_not_at_st_size(mnt):
    path = dev(mnt, EDU, "vendor")
    assert subprocess.run(["cat", path], capture_output=True, check=True).stdout == b"0x1234\n"
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.read(fd, 4096) == b"0x1234\n"
        assert os.read(fd, 4096) == b""
        assert os.pread(fd, 3, 2) == b"123"
    finally:
        os.close(fd)
    assert os.stat(path).st_size == 4096  # a short read does not shrink what stat says


def test_config_reads_are_live_full_and_partial(mnt, models):
    edu, _ = models
    path = dev(mnt, EDU, "config")
    with open(path, "rb") as f:
        assert f.read() == bytes(edu.cfg)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 4, 0) == bytes.fromhex("3412e811")
        assert os.pread(fd, 2, 0x2E) == bytes.fromhex("0011")
        assert os.pread(fd, 16, 250) == bytes(range(250, 256))  # clipped at the end
        assert os.pread(fd, 16, 256) == b""
        edu.cfg[0x04] = 0x07  # the model's command register changes under an open file
        assert os.pread(fd, 1, 0x04) == b"\x07"
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read()[0x04] == 0x07
    with open(dev(mnt, NIC, "config"), "rb") as f:
        data = f.read()
    assert len(data) == 4096 and data[:4] == bytes.fromhex("8680d310")


def test_config_shorter_than_its_size_reads_as_zeros(tmp_path):
    d = SysfsDevice(EDU, 2, 0x1234, 0x11E8, 0, 0, 0, 0, 0, config_reader=lambda: b"\x34\x12")
    root = tmp_path / "m"
    root.mkdir()
    with SysfsView([d]).mount(str(root)):
        with open(dev(str(root), EDU, "config"), "rb") as f:
            assert f.read() == b"\x34\x12" + bytes(254)


def test_unprivileged_readers_see_64_bytes_of_config(view, models):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    root = tempfile.mkdtemp(prefix="cuse-vfio-sysfs-")  # tmp_path is 0700: others cannot reach it
    os.chmod(root, 0o755)
    handle = view.mount(root)
    try:
        def nobody():
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)

        run = subprocess.run(["cat", dev(root, EDU, "config")], capture_output=True, preexec_fn=nobody)
        assert run.returncode == 0, run.stderr
        assert run.stdout == bytes(models[0].cfg[:64])
        run = subprocess.run(["cat", dev(root, EDU, "vendor")], capture_output=True, preexec_fn=nobody)
        assert run.stdout == b"0x1234\n"  # allow_other: other users' clients read the view
        run = subprocess.run(["sh", "-c", f"echo 1 > {os.path.join(root, 'bus/pci/drivers/vfio-pci/bind')}"],
                             capture_output=True, text=True, preexec_fn=nobody)
        assert run.returncode != 0 and "Permission denied" in run.stderr
        with open(dev(root, EDU, "config"), "rb") as f:  # root still sees everything
            assert len(f.read()) == 256
    finally:
        handle.unmount()
        os.rmdir(root)


def test_lspci_reads_the_view(mnt, models):
    if shutil.which("lspci") is None:
        pytest.skip("lspci (pciutils) is not installed")
    run = subprocess.run(["lspci", "-O", f"sysfs.path={mnt}/bus/pci", "-nnvk"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    edu, nic = run.stdout.split("\n\n")[:2]
    assert edu.startswith("00:02.0 Unclassified device [00ff]: Device [1234:11e8] (rev 10)")
    for line in ("IRQ 11, IOMMU group 2", "[size=1M]", "Kernel driver in use: vfio-pci"):
        assert line in edu
    assert "IOMMU group 5" in nic and "Memory at febf0000 (64-bit, prefetchable)" in nic
    run = subprocess.run(["lspci", "-O", f"sysfs.path={mnt}/bus/pci", "-xxx", "-s", "00:02.0"],
                         capture_output=True, text=True, check=True)
    assert run.stdout.splitlines()[1] == "00: 34 12 e8 11 00 00 00 00 10 00 ff 00 00 00 00 00"
    assert len([line for line in run.stdout.splitlines() if re.match(r"[0-9a-f]0: ", line)]) == 16


def test_bound_over_sys_in_a_private_mount_namespace(mnt):
    """What ``cuse-vfio run`` does: bind the view's directories over /sys, in a namespace of its own."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1)")
    binds = [f"mount --bind '{src}' '{dst}'" for dst, src in SysfsView.paths(mnt).items() if os.path.isdir(dst)]
    # Without vfio-pci loaded the host has no /sys/bus/pci/drivers/vfio-pci to bind over.
    binds.append(f"[ -d /sys/bus/pci/drivers/vfio-pci ] || mount --bind '{mnt}/bus/pci/drivers' /sys/bus/pci/drivers")
    script = " && ".join(binds) + (
        " && ls /sys/bus/pci/devices"
        f" && readlink -f /sys/bus/pci/devices/{EDU}/iommu_group"
        f" && basename $(readlink /sys/bus/pci/devices/{EDU}/driver)"
        f" && readlink -f /sys/kernel/iommu_groups/5/devices/{NIC}"
        f" && cat /sys/kernel/iommu_groups/2/devices/{EDU}/vendor"
        f" && readlink -f /sys/bus/pci/drivers/vfio-pci/{EDU}")
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [EDU, NIC, "/sys/kernel/iommu_groups/2", "vfio-pci",
                                       f"/sys/bus/pci/devices/{NIC}", "0x1234", f"/sys/bus/pci/devices/{EDU}"]


def expect_errno(code, fn, *args):
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == code, (fn, args, e.value)


def test_writes_are_refused_with_the_kernels_errno(mnt):
    # Files without a write bit: EACCES, as kernfs answers even root.
    expect_errno(errno.EACCES, os.open, dev(mnt, EDU, "vendor"), os.O_WRONLY)
    expect_errno(errno.EACCES, os.open, dev(mnt, EDU, "resource"), os.O_RDWR)
    expect_errno(errno.EACCES, os.open, os.path.join(mnt, "kernel/iommu_groups/2/reserved_regions"),
                 os.O_WRONLY)
    # Files root could write on real sysfs: the view does not change the device.
    for name in ("config", "numa_node", "enable", "driver_override", "uevent"):
        expect_errno(errno.EROFS, os.open, dev(mnt, EDU, name), os.O_WRONLY)
    expect_errno(errno.EROFS, os.open, os.path.join(mnt, "kernel/iommu_groups/2/type"), os.O_WRONLY)
    expect_errno(errno.EROFS, os.truncate, dev(mnt, EDU, "config"), 0)
    # Changes to the tree itself.
    expect_errno(errno.EROFS, os.mkdir, dev(mnt, EDU, "new"))
    expect_errno(errno.EROFS, os.unlink, dev(mnt, EDU, "vendor"))
    expect_errno(errno.EROFS, os.rmdir, os.path.join(mnt, "kernel/iommu_groups/2/devices"))
    expect_errno(errno.EROFS, os.symlink, "x", dev(mnt, EDU, "link"))
    expect_errno(errno.EROFS, os.rename, dev(mnt, EDU, "vendor"), dev(mnt, EDU, "vendor2"))
    expect_errno(errno.EROFS, os.chmod, dev(mnt, EDU, "vendor"), 0o666)
    expect_errno(errno.EROFS, os.open, dev(mnt, EDU, "created"), os.O_WRONLY | os.O_CREAT, 0o644)
    assert cat(dev(mnt, EDU, "vendor")) == "0x1234\n"


def test_driver_control_files_accept_and_ignore_writes(mnt, caplog):
    caplog.set_level(logging.INFO, logger="cuse_vfio.sysfs.mount")
    drv = os.path.join(mnt, "bus/pci/drivers/vfio-pci")
    with open(os.path.join(drv, "new_id"), "w") as f:
        assert f.write("1234 11e8\n") == 10
    run = subprocess.run(["sh", "-c", f"echo {EDU} > {drv}/unbind && echo {EDU} > {drv}/bind"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert os.path.basename(os.readlink(dev(mnt, EDU, "driver"))) == "vfio-pci"  # still bound
    expect_errno(errno.EACCES, os.open, os.path.join(drv, "bind"), os.O_RDONLY)  # write-only, as in sysfs
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and "unbind" not in caplog.text:
        time.sleep(0.01)
    assert "'1234 11e8'" in caplog.text and "unbind" in caplog.text


def test_unknown_paths_are_enoent(mnt):
    expect_errno(errno.ENOENT, os.stat, dev(mnt, "0000:00:09.0"))
    expect_errno(errno.ENOENT, os.stat, dev(mnt, EDU, "resource0"))
    expect_errno(errno.ENOENT, open, os.path.join(mnt, "kernel/iommu_groups/7/type"))
    expect_errno(errno.ENOENT, os.listdir, os.path.join(mnt, "bus/pci/drivers/nvme"))
    expect_errno(errno.ENOENT, os.readlink, os.path.join(mnt, "kernel/iommu_groups/2/devices", NIC))
    expect_errno(errno.EINVAL, os.readlink, dev(mnt, EDU, "vendor"))
    expect_errno(errno.ENOTDIR, os.listdir, dev(mnt, EDU, "vendor"))


def test_a_failing_config_reader_gives_eio_and_the_view_keeps_serving(mnt, models, caplog):
    edu, nic = models
    edu.broken = True
    with open(dev(mnt, EDU, "config"), "rb") as f:
        expect_errno(errno.EIO, f.read)
    assert cat(dev(mnt, EDU, "vendor")) == "0x1234\n"
    with open(dev(mnt, NIC, "config"), "rb") as f:
        assert f.read(4) == bytes.fromhex("8680d310")
    edu.broken = False
    with open(dev(mnt, EDU, "config"), "rb") as f:
        assert f.read() == bytes(edu.cfg)
    assert EDU in caplog.text and "EIO" in caplog.text


# -- mount lifecycle -----------------------------------------------------------

def test_mount_point_must_exist(view, tmp_path):
    with pytest.raises(SysfsViewError, match="not a directory"):
        view.mount(str(tmp_path / "missing"))


def test_mounting_leaves_sigterm_and_sighup_alone(view, tmp_path):
    def caught():
        with open("/proc/self/status") as f:
            mask = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
        return {sig: bool(mask >> (sig - 1) & 1) for sig in (signal.SIGTERM, signal.SIGHUP)}

    before = caught()
    with view.mount(str(tmp_path)):
        assert caught() == before  # libfuse's takeover is undone: SIGTERM still ends the process


def test_mounting_leaves_the_working_directory_alone(view, tmp_path):
    (tmp_path / "mnt").mkdir()
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        with view.mount("mnt"):
            assert os.getcwd() == str(tmp_path)  # libfuse moved the process to "/"; it is moved back
    finally:
        os.chdir(here)


def test_unmount_is_idempotent_and_ends_the_loop(view, tmp_path):
    handle = view.mount(str(tmp_path))
    assert handle.serving and _mounted(str(tmp_path))
    assert handle.paths()["/sys/kernel/iommu_groups"] == os.path.join(str(tmp_path), "kernel/iommu_groups")
    handle.unmount()
    handle.unmount()
    assert not handle.serving and not _mounted(str(tmp_path))
    assert os.listdir(tmp_path) == []
    with view.mount(str(tmp_path)):  # the same place can be mounted again
        assert cat(dev(str(tmp_path), EDU, "vendor")) == "0x1234\n"
    assert not _mounted(str(tmp_path))


def test_unmount_with_a_file_still_open(view, tmp_path):
    handle = view.mount(str(tmp_path))
    try:
        fd = os.open(dev(str(tmp_path), EDU, "config"), os.O_RDONLY)
        handle.unmount(timeout=1)
        assert not _mounted(str(tmp_path))  # detached even though busy
        os.close(fd)
        handle._thread.join(5)
        assert not handle.serving  # the loop ends once the last file closes
    finally:
        handle.unmount()


def test_foreground_mount_serves_until_unmounted(view, tmp_path):
    if shutil.which("fusermount3") is None:
        pytest.skip("fusermount3 is not installed")
    done = threading.Event()
    thread = threading.Thread(target=lambda: (view.mount(str(tmp_path), foreground=True), done.set()),
                              daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not _mounted(str(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cat(dev(str(tmp_path), NIC, "vendor")) == "0x8086\n"
    finally:
        subprocess.run(["fusermount3", "-u", str(tmp_path)], capture_output=True)
        thread.join(10)
        if _mounted(str(tmp_path)):
            subprocess.run(["umount", "-l", str(tmp_path)], capture_output=True)
    assert done.is_set()
