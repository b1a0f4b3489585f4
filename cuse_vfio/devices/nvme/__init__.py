"""An NVM Express 1.4 PCIe controller (``model = "nvme"``), as QEMU's ``-device nvme`` presents it.

Identity: PCI 1b36:0010, revision 2, class 010802 (NVM Express), subsystem
1af4:1100, INTA.  Capabilities: MSI-X (one vector per I/O queue plus the
admin queue: ``max_queues + 1``), MSI (32 vectors, 64-bit, per-vector mask),
power management (No_Soft_Reset), PCI Express endpoint with Function Level
Reset.  BAR0 is 64-bit memory, laid out as QEMU does: the controller
registers at 0, the doorbells from 0x1000 (stride 4: SQ y tail at
0x1000 + 8y, CQ y head at 0x1004 + 8y), then the MSI-X table on the next
4 KiB boundary and the PBA on the one after; the BAR is that rounded up to a
power of two (16 KiB for the default 64 queues: table at 0x2000, PBA at
0x3000).  No other BAR, no CMB, no PMR.

Controller: CAP with MQES 2047, CQR, TO 15 (7.5 s), DSTRD 0, NVM command set,
MPSMIN 4 KiB, MPSMAX 64 KiB; VS 1.4.  CC.EN 0 -> 1 checks MPS, CSS, AMS,
IOSQES/IOCQES (0 or 6/4), AQA and the alignment of ASQ/ACQ and sets CSTS.CFS
when one is wrong; otherwise the admin queues exist at once and CSTS.RDY
follows after ``ready_delay``.  CC.EN 1 -> 0 is a controller reset: every
queue and every command in flight is dropped without a completion, features
return to their defaults, CSTS.RDY clears after ``ready_delay``.  A function
reset (VFIO_DEVICE_RESET, FLR) does the same at once and clears CC, AQA, ASQ,
ACQ.  A shutdown notification (CC.SHN) flushes the backing file, then
reports CSTS.SHST complete.  A DMA fault on a queue entry, or an error of the
model itself, is Controller Fatal Status.  See :mod:`.admin` and :mod:`.nvm`
for the commands, :mod:`.queues` for PRPs (no SGLs: a command with PSDT != 0
is Invalid Field in Command).

Topology keys (all optional)::

    [[device]]
    bdf = "0000:00:04.0"
    model = "nvme"
    group = 4
    backing = "/var/tmp/nvme0.img"  # the file holding the blocks; created (sparse) when missing.
                                    # Without it: an anonymous sparse temporary file, deleted at exit
    size = "1G"                     # bytes, or K/M/G/T (binary); needed to create a file, default 1G
                                    # for the anonymous one; an existing file's size is used when omitted
    lba_size = 512                  # 512 or 4096
    namespaces = 1                  # namespaces 1..N: N equal regions of the one file, in order
    serial = "CUSEVFIO0000000040"   # SN (default from the BDF, so each controller differs)
    model_name = "QEMU NVMe Ctrl"   # MN
    max_queues = 64                 # I/O queue pairs (MSI-X vectors = max_queues + 1)
    mdts = 7                        # maximum transfer: 2^mdts * 4 KiB (0: no limit)
    ready_delay = 0.001             # seconds from CC.EN to CSTS.RDY (and from CC.SHN to SHST complete)
    io_thread = true                # run commands on an I/O thread (default), or inside the doorbell write

    [[device.inject]]               # media errors: Unrecovered Read Error / Write Fault
    kind = "media-error"
    opcodes = ["read"]              # default ["read", "write"]
    lba = [1000, 1999]              # first and last LBA (default: any); nsid = 1 to pick a namespace
    count = 1                       # fire once, then let commands through (default: every time)
    dnr = false                     # set Do Not Retry in the status (default false)

    [[device.inject]]               # hold commands back: they complete `seconds` later, out of order
    kind = "delay"
    opcodes = ["write", "flush"]    # default ["io"]: every I/O command
    seconds = 0.5

    [[device.inject]]               # controller fatal status (CSTS.CFS) at a command
    kind = "fatal"
    opcodes = ["io"]                # default ["io"]; "admin", "identify", "io:0x80", "admin:0xc0" ...
    after = 1000                    # let 1000 matching commands through first (default 0)

Every rule takes ``opcodes`` (command names: read, write, flush,
write-zeroes, dsm, and the admin ones: identify, get-log-page, create-sq,
... ; ``io`` / ``admin`` for all of a queue type; ``io:0xNN`` /
``admin:0xNN`` for any opcode), ``nsid``, ``lba``, ``after`` and ``count``;
the first rule that matches a command and fires decides.  The same list can
be written inline: ``inject = [{kind = "delay", seconds = 0.1}]``.

Threading: the doorbell write only records the new tail and wakes the
controller's I/O thread, which runs rounds under the device lock (see
:mod:`.engine`); with ``manual_time`` (tests) or ``io_thread = false``
commands run inside the doorbell write instead.  Delays and the
CSTS.RDY / SHST transitions are ``call_later`` work.
"""

from .controller import NvmeController

__all__ = ["NvmeController"]
