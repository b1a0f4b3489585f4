"""NVM Express 1.4 numbers the controller model needs, named as the spec and ``include/linux/nvme.h`` name them.

Statuses are the 15-bit Status Field of a completion without its phase tag
(QEMU's convention): SC in bits 7:0, SCT in 10:8, More in 13, DNR in 14.  A
completion's DW3 upper half is ``status << 1 | phase``.
"""

from __future__ import annotations

import struct

# -- controller registers (NVMe 1.4, 3.1) ------------------------------------------------
REG_CAP = 0x00
REG_VS = 0x08
REG_INTMS = 0x0C
REG_INTMC = 0x10
REG_CC = 0x14
REG_CSTS = 0x1C
REG_NSSR = 0x20
REG_AQA = 0x24
REG_ASQ = 0x28
REG_ACQ = 0x30
REG_CMBLOC = 0x38
REG_CMBSZ = 0x3C
REG_DBS = 0x1000          # doorbells: SQ y tail at 0x1000 + 2y*stride, CQ y head at 0x1000 + (2y+1)*stride

NVME_VS_1_4 = 0x00010400

CAP_CQR = 1 << 16         # contiguous queues required
CAP_CSS_NVM = 1 << 37     # NVM command set
CAP_TO_SHIFT = 24
CAP_DSTRD_SHIFT = 32
CAP_MPSMIN_SHIFT = 48
CAP_MPSMAX_SHIFT = 52

CC_EN = 1 << 0
CC_CSS_SHIFT, CC_CSS_MASK = 4, 0x7
CC_MPS_SHIFT, CC_MPS_MASK = 7, 0xF
CC_AMS_SHIFT, CC_AMS_MASK = 11, 0x7
CC_SHN_SHIFT, CC_SHN_MASK = 14, 0x3
CC_IOSQES_SHIFT, CC_IOSQES_MASK = 16, 0xF
CC_IOCQES_SHIFT, CC_IOCQES_MASK = 20, 0xF
CC_WRITABLE = 0x00FFFFF1   # EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES

CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_SHIFT = 2
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2

SQES = 6                  # 64-byte submission queue entries (2^6)
CQES = 4                  # 16-byte completion queue entries (2^4)
SQE_SIZE = 1 << SQES
CQE_SIZE = 1 << CQES

#: a submission queue entry: opcode, flags, CID, NSID, CDW2-3, MPTR, PRP1, PRP2, CDW10-15
SQE = struct.Struct("<BBHIQQQQ6I")
#: a completion queue entry: DW0, DW1, SQ head, SQ id, CID, status and phase
CQE = struct.Struct("<IIHHHH")

FLAGS_FUSE_MASK = 0x03
FLAGS_PSDT_SHIFT = 6

NSID_BROADCAST = 0xFFFFFFFF

# -- status codes (NVMe 1.4, 4.6.1.2) -------------------------------------------------------
DNR = 0x4000
MORE = 0x2000
SCT_GENERIC, SCT_COMMAND, SCT_MEDIA = 0, 1, 2

SUCCESS = 0x00
INVALID_OPCODE = 0x01
INVALID_FIELD = 0x02
DATA_TRANSFER_ERROR = 0x04
INTERNAL_ERROR = 0x06
ABORT_REQUESTED = 0x07
ABORT_SQ_DELETION = 0x08
INVALID_NAMESPACE = 0x0B
COMMAND_SEQUENCE_ERROR = 0x0C
PRP_OFFSET_INVALID = 0x13
LBA_OUT_OF_RANGE = 0x80

CQ_INVALID = 0x100
INVALID_QID = 0x101
INVALID_QUEUE_SIZE = 0x102
ABORT_LIMIT_EXCEEDED = 0x103
AER_LIMIT_EXCEEDED = 0x105
INVALID_VECTOR = 0x108
INVALID_LOG_PAGE = 0x109
INVALID_QUEUE_DELETION = 0x10C
FEATURE_NOT_SAVEABLE = 0x10D
FEATURE_NOT_CHANGEABLE = 0x10E
FEATURE_NOT_NS_SPECIFIC = 0x10F

WRITE_FAULT = 0x280
UNRECOVERED_READ_ERROR = 0x281

STATUS_NAMES = {
    SUCCESS: "Successful Completion", INVALID_OPCODE: "Invalid Command Opcode",
    INVALID_FIELD: "Invalid Field in Command", DATA_TRANSFER_ERROR: "Data Transfer Error",
    INTERNAL_ERROR: "Internal Error", ABORT_REQUESTED: "Command Abort Requested",
    ABORT_SQ_DELETION: "Command Aborted due to SQ Deletion", INVALID_NAMESPACE: "Invalid Namespace or Format",
    COMMAND_SEQUENCE_ERROR: "Command Sequence Error", PRP_OFFSET_INVALID: "PRP Offset Invalid",
    LBA_OUT_OF_RANGE: "LBA Out of Range", CQ_INVALID: "Completion Queue Invalid",
    INVALID_QID: "Invalid Queue Identifier", INVALID_QUEUE_SIZE: "Invalid Queue Size",
    ABORT_LIMIT_EXCEEDED: "Abort Command Limit Exceeded",
    AER_LIMIT_EXCEEDED: "Asynchronous Event Request Limit Exceeded", INVALID_VECTOR: "Invalid Interrupt Vector",
    INVALID_LOG_PAGE: "Invalid Log Page", INVALID_QUEUE_DELETION: "Invalid Queue Deletion",
    FEATURE_NOT_SAVEABLE: "Feature Identifier Not Saveable", FEATURE_NOT_CHANGEABLE: "Feature Not Changeable",
    FEATURE_NOT_NS_SPECIFIC: "Feature Not Namespace Specific", WRITE_FAULT: "Write Fault",
    UNRECOVERED_READ_ERROR: "Unrecovered Read Error",
}


def status_name(status: int) -> str:
    base = status & 0x7FF
    text = STATUS_NAMES.get(base, f"status 0x{base:03x}")
    return text + (" (DNR)" if status & DNR else "")


# -- admin commands (NVMe 1.4, Figure 139) ------------------------------------------------
ADMIN_DELETE_SQ = 0x00
ADMIN_CREATE_SQ = 0x01
ADMIN_GET_LOG_PAGE = 0x02
ADMIN_DELETE_CQ = 0x04
ADMIN_CREATE_CQ = 0x05
ADMIN_IDENTIFY = 0x06
ADMIN_ABORT = 0x08
ADMIN_SET_FEATURES = 0x09
ADMIN_GET_FEATURES = 0x0A
ADMIN_ASYNC_EVENT = 0x0C
ADMIN_KEEP_ALIVE = 0x18

ADMIN_NAMES = {
    ADMIN_DELETE_SQ: "delete-sq", ADMIN_CREATE_SQ: "create-sq", ADMIN_GET_LOG_PAGE: "get-log-page",
    ADMIN_DELETE_CQ: "delete-cq", ADMIN_CREATE_CQ: "create-cq", ADMIN_IDENTIFY: "identify",
    ADMIN_ABORT: "abort", ADMIN_SET_FEATURES: "set-features", ADMIN_GET_FEATURES: "get-features",
    ADMIN_ASYNC_EVENT: "async-event", ADMIN_KEEP_ALIVE: "keep-alive",
}

# -- NVM command set I/O commands (NVMe 1.4, Figure 346) -----------------------------------
NVM_FLUSH = 0x00
NVM_WRITE = 0x01
NVM_READ = 0x02
NVM_WRITE_ZEROES = 0x08
NVM_DSM = 0x09

NVM_NAMES = {NVM_FLUSH: "flush", NVM_WRITE: "write", NVM_READ: "read",
             NVM_WRITE_ZEROES: "write-zeroes", NVM_DSM: "dsm"}

RW_FUA = 1 << 30          # CDW12
WZ_DEAC = 1 << 25         # CDW12 of Write Zeroes
DSM_AD = 1 << 2           # CDW11 attribute: deallocate
DSM_RANGE = struct.Struct("<IIQ")  # context attributes, length in LBAs, starting LBA

# -- Identify (CNS values, NVMe 1.4 Figure 244; 05h/06h from the command set specific TP) --
CNS_NS = 0x00
CNS_CTRL = 0x01
CNS_ACTIVE_NS_LIST = 0x02
CNS_NS_DESCRIPTORS = 0x03
CNS_CS_NS = 0x05
CNS_CS_CTRL = 0x06
CSI_NVM = 0x00
IDENTIFY_SIZE = 4096

NIDT_EUI64, NIDT_NGUID, NIDT_UUID = 1, 2, 3

# -- features (NVMe 1.4, Figure 271) -----------------------------------------------------
FEAT_ARBITRATION = 0x01
FEAT_POWER_MGMT = 0x02
FEAT_TEMP_THRESHOLD = 0x04
FEAT_ERROR_RECOVERY = 0x05
FEAT_VOLATILE_WC = 0x06
FEAT_NUM_QUEUES = 0x07
FEAT_IRQ_COALESCE = 0x08
FEAT_IRQ_CONFIG = 0x09
FEAT_WRITE_ATOMICITY = 0x0A
FEAT_ASYNC_EVENT = 0x0B
FEAT_TIMESTAMP = 0x0E

SEL_CURRENT, SEL_DEFAULT, SEL_SAVED, SEL_CAPABILITIES = 0, 1, 2, 3
FEAT_CAP_SAVEABLE, FEAT_CAP_NS_SPECIFIC, FEAT_CAP_CHANGEABLE = 1 << 0, 1 << 1, 1 << 2

# -- log pages (NVMe 1.4, Figure 191) ----------------------------------------------------
LOG_ERROR = 0x01
LOG_SMART = 0x02
LOG_FW_SLOT = 0x03
LOG_SIZES = {LOG_ERROR: 64, LOG_SMART: 512, LOG_FW_SLOT: 512}

# -- asynchronous events (NVMe 1.4, 5.2) ---------------------------------------------------
AER_TYPE_ERROR = 0
AER_TYPE_SMART = 1
AER_ERROR_INVALID_DB_REGISTER = 0x00
AER_ERROR_INVALID_DB_VALUE = 0x01
AER_SMART_TEMPERATURE = 0x01
#: the log page that clears a masked event type when read with RAE cleared
AER_LOG_OF_TYPE = {AER_TYPE_ERROR: LOG_ERROR, AER_TYPE_SMART: LOG_SMART}

SMART_WARN_TEMPERATURE = 1 << 1

# -- queue creation flags (CDW11) ------------------------------------------------------
QUEUE_PHYS_CONTIG = 1 << 0
CQ_IRQ_ENABLED = 1 << 1
