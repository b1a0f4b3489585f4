import os
import sys

# Test-only fakes (core_fakes.py, ...) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    # scripts/test runs these as stages of their own (they boot qemu VMs), not in the host stage.
    config.addinivalue_line("markers", "vm: boots a qemu VM through scripts/vm (a stage of scripts/test)")
    config.addinivalue_line("markers", "dpdk: runs DPDK's testpmd on hugepages (the dpdk stage of scripts/test)")
    config.addinivalue_line("markers", "guest: boots a guest through scripts/guest, QEMU passing cuse-vfio's devices "
                                       "through (the guest stage of scripts/test)")
