"""The README's device-model example is real code: it loads, serves and counts."""

import os
import re
import struct

from cuse_vfio import uapi
from cuse_vfio.machine import topology
from cuse_vfio.machine import Machine
from cuse_vfio.transport.local import LocalProcess

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_the_readme_device_example_works(tmp_path):
    text = open(README, encoding="utf-8").read()
    model = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    toml = re.search(r"```toml\n(\[\[device\]\]\nbdf = \"0000:00:05.0\".*?)```", text, re.S).group(1)
    path = tmp_path / "counter.py"
    path.write_text(model)
    machine = Machine(topology.parse(toml, "<README>"), model_files=[str(path)])
    try:
        p = LocalProcess(machine.dispatcher)
        c = p.open("/dev/vfio/vfio")
        g = p.open("/dev/vfio/5")
        p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, struct.pack("<i", c))
        p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        d = p.ioctl(g, uapi.VFIO_GROUP_GET_DEVICE_FD, b"0000:00:05.0\0")
        assert p.pread(d, 4, 7 << 40) == struct.pack("<HH", 0x1B36, 0x00F1)
        bar2 = 2 << 40
        efd = p.eventfd()
        irq = struct.pack("<IIIII", 24, uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
                          uapi.VFIO_PCI_INTX_IRQ_INDEX, 0, 1) + struct.pack("<i", efd)
        p.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, irq)
        for _ in range(3):
            p.pwrite(d, b"\1\0\0\0", bar2 + 4)
        assert p.pread(d, 4, bar2) == struct.pack("<I", 3)
        assert p.resolve_fd(efd).read() >= 1  # INTx reached the client's eventfd
        info = uapi.vfio_region_info(argsz=32, index=0)
        p.ioctl(d, uapi.VFIO_DEVICE_GET_REGION_INFO, info)
        assert info.size == 64 * 1024 and info.flags & uapi.VFIO_REGION_INFO_FLAG_MMAP
    finally:
        machine.close()
