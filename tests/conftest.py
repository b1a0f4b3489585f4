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


# CUSE_VFIO_NO_SKIP=1 (set by scripts/test under CI): a test that skips is a
# failure, with its reason, so a missing /dev/fuse, root or /dev/cuse can never
# shrink a green run.  On a person's machine a skip stays a skip, listed by -rs.
NO_SKIP = os.environ.get("CUSE_VFIO_NO_SKIP") == "1"


def pytest_runtest_makereport(item, call):
    if not NO_SKIP:
        return None
    from _pytest.runner import TestReport  # noqa: PLC0415

    report = TestReport.from_item_and_call(item, call)
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where every test must run (CUSE_VFIO_NO_SKIP=1): {reason}"
    return report
