"""A noiommu group node served for real: a client process without CAP_SYS_RAWIO gets EPERM, root gets in.

vfio_group_fops_open (6.1): ``if (group->type == VFIO_NO_IOMMU && !capable(CAP_SYS_RAWIO)) return -EPERM``.
The client is a separate process started through ``setpriv``, which drops the
capability from its effective, permitted, inheritable and bounding sets; the
server reads the opener's capabilities as the transport reports the caller.
"""

import os
import shutil
import subprocess
import sys

import pytest

from cuse_vfio.machine import Machine
from cuse_vfio.machine.topology import parse
from cuse_vfio.transport.server import Server
from serving_support import CLIENT_TIMEOUT, TRANSPORT, serving

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
    pytest.mark.skipif(TRANSPORT == "cuse" and not os.path.exists("/dev/cuse"), reason="needs /dev/cuse"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
]

TOPOLOGY = '[[device]]\nbdf = "0000:00:05.0"\nmodel = "edu"\ngroup = 5\niommu = false\n'
OPEN = "import errno, os, sys\ntry:\n    os.close(os.open(sys.argv[1], os.O_RDWR))\n    print('opened')\n" \
       "except OSError as e:\n    print(errno.errorcode[e.errno])\n"


@pytest.fixture
def server(tmp_path):
    m = Machine(parse(TOPOLOGY, "t.toml"), noiommu=True)
    dev_dir = "/dev/cuse-vfio-test" if TRANSPORT == "cuse" else str(tmp_path / "vfio")
    s = Server(m.dispatcher, m.topology.groups.values(), transport=TRANSPORT, dev_dir=dev_dir,
               runtime_dir=str(tmp_path / "run"))
    try:
        with serving(s):
            yield s
    finally:
        m.close()


def open_as(node, *setpriv):
    cmd = (["setpriv", *setpriv, "--"] if setpriv else []) + [sys.executable, "-c", OPEN, node]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_noiommu_group_needs_cap_sys_rawio_from_a_real_client(server):
    node = os.path.join(server.dev_dir, "noiommu-5")
    assert os.path.exists(node)
    assert open_as(node, "--inh-caps=-sys_rawio", "--bounding-set=-sys_rawio") == "EPERM"
    assert open_as(node) == "opened"  # root with every capability
    # the container node is not guarded by the capability: only the noiommu group is
    assert open_as(os.path.join(server.dev_dir, "vfio"), "--inh-caps=-sys_rawio",
                   "--bounding-set=-sys_rawio") == "opened"
