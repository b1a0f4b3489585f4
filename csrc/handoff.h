/*
 * The fd hand-off protocol between the LD_PRELOAD library (preload.c) and
 * the server (cuse_vfio/transport/handoff.py), on a Unix stream socket,
 * in the host's byte order.
 *
 * The server greets with CV_HANDOFF_HELLO (one byte); then the library sends
 * any number of requests, each opening with a u32:
 *   >= CV_TOKEN_MIN  a token from GET_DEVICE_FD: the answer is a
 *                    struct cv_token_reply, with the device fd (SCM_RIGHTS)
 *                    when its status is 0, then CV_HANDOFF_CLOSED (one byte)
 *                    once the server has closed its own copy of that fd:
 *                    the library returns the fd only after it, so the
 *                    client's close is the last one and releases the device
 *                    before close() returns, as the kernel's does;
 *   CV_OP_MMAP       the rest of a struct cv_mmap_request: the answer is a
 *                    struct cv_mmap_reply, with the memfd when its status is 0.
 *
 * This header is the one definition of that format.  The Python side
 * declares the same structs with ctypes, and tests/test_uapi_layout.py
 * compiles this header to check every size, offset and constant, as it
 * checks the VFIO structs against <linux/vfio.h>.
 */
#ifndef CUSE_VFIO_HANDOFF_H
#define CUSE_VFIO_HANDOFF_H

#include <stdint.h>

/* Tokens live above any fd number (fs.nr_open is at most 2^30 - 8), so the
 * library can tell a token from a real kernel fd, and a request's first u32
 * from an operation. */
#define CV_TOKEN_MIN (1 << 30)
#define CV_HANDOFF_HELLO 'R'
#define CV_HANDOFF_CLOSED 'C'
#define CV_OP_MMAP 1u
/* An mmap answer: the fd is no device file of this server (the library maps it itself). */
#define CV_NOT_MINE (-1)

struct cv_token_reply {
	int32_t status;  /* 0 (the device fd comes with it) or an errno */
};

struct cv_mmap_request {
	uint32_t op;     /* CV_OP_MMAP */
	int32_t fd;      /* the caller's fd number; the server takes it with pidfd_getfd */
	int32_t prot;
	int32_t flags;
	uint64_t offset; /* as mmap() got it: region index << 40 | offset in the region */
	uint64_t length;
};

struct cv_mmap_reply {
	int32_t status;  /* 0 (the memfd comes with it), an errno, or CV_NOT_MINE */
	uint32_t reserved;
	uint64_t start;  /* where in the memfd the mapping starts */
};

#endif
