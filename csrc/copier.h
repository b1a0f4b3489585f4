/*
 * cuse-vfio copier: moving bytes to and from a client's memory with a
 * bounded wait.
 *
 * A copy from or to another process can block for as long as that process
 * wants: its page may be a file on a FUSE mount whose daemon never answers
 * (the fault waits, killable only, for the daemon).  So the server never
 * makes the syscall on a thread that must go on: a copier thread makes it,
 * and the thread that asked waits as long as it chooses.  A copy it stops
 * waiting for is abandoned: its thread frees it when the syscall returns
 * and is then idle again.  The thread that asked only ever sees the copy's
 * own buffer, so an abandoned copy writes nowhere but there.
 *
 * Everything between the cffi-cdef markers is also the cdef of the Python
 * binding (cuse_vfio.memory._copier, built by _build_copier.py).
 */
#ifndef CUSE_VFIO_COPIER_H
#define CUSE_VFIO_COPIER_H

#include <stddef.h>
#include <stdint.h>

/* cffi-cdef: begin */

/* What a copy does (target is a pid for the *V ops, an fd of /proc/PID/mem for the P* ops). */
enum cv_copy_op {
	CV_COPY_READV = 0,   /* process_vm_readv */
	CV_COPY_WRITEV = 1,  /* process_vm_writev */
	CV_COPY_PREAD = 2,   /* pread */
	CV_COPY_PWRITE = 3,  /* pwrite */
};

struct cv_copy;

/* Start a copy of len bytes at remote, charged to key (the process whose
 * memory it is; -1 when the caller has not looked it up).  A write takes its
 * bytes from src now.  NULL with errno: EBUSY when key already has
 * CV_COPY_MAX_STALLED stalled copies, ENOKEY when key is -1 and some copy is
 * stalled (only then does the process matter: name it and start again),
 * EAGAIN when CV_COPY_MAX_THREADS copier threads exist and none is idle,
 * ENOMEM. */
struct cv_copy *cv_copy_start(int op, int target, uint64_t remote, const void *src, size_t len, int key);
/* The same over nsegs pieces of the remote memory (segs: address, length pairs whose lengths
 * add up to len), copied in order as one copy: it stops at the first piece that fails or moves
 * less, and its result is the bytes moved in all (-errno when the first piece moved nothing).
 * EINVAL when the lengths do not add up to len. */
struct cv_copy *cv_copy_start_list(int op, int target, const uint64_t *segs, size_t nsegs,
				   const void *src, size_t len, int key);
/* Wait at most timeout_ms for it: the bytes moved (a read's go to dst) or
 * -errno, and the copy is freed; or -ETIMEDOUT, and it is still running. */
long cv_copy_wait(struct cv_copy *c, int timeout_ms, void *dst);
/* The copy missed its short wait: from now until its syscall returns it is
 * one of key's stalled copies (whether or not anyone still waits for it). */
void cv_copy_stall(struct cv_copy *c, int key);
/* Stop waiting for a running copy: it is freed when its syscall returns. */
void cv_copy_abandon(struct cv_copy *c);
/* Stalled copies of key still running (key -1: of every key). */
int cv_copy_stalled(int key);
/* Copier threads running a copy now. */
int cv_copy_busy(void);

/*
 * Inline copies: made on the calling thread, watched by a guard.  Only one
 * thread copies inline at a time (the serving loop's); a copy made with
 * cv_inline_copy costs its syscall and two atomic operations, no hand-off.
 * The guard (a thread blocked in cv_guard_watch) samples the copy in flight;
 * one it finds running across a whole sampling period is declared stalled:
 * it is charged to its process like a stalled copier copy (cv_copy_stalled),
 * and cv_guard_watch returns the owner given with it so that the caller can have another
 * thread take over the stalled thread's work.  While any copy is stalled, no
 * copy is made inline (-ENOKEY: use the copier).
 */
/* A copy of len bytes at remote (op: CV_COPY_READV or CV_COPY_WRITEV; target a pid):
 * the bytes moved or -errno; plus CV_INLINE_STALLED when the guard declared it
 * stalled meanwhile.  -ENOKEY, nothing done, when a copy is stalled or no guard watches. */
long cv_inline_copy(int op, int target, uint64_t remote, void *local, size_t len, int owner);
/* Watch inline copies, sampling every period_ms (one watcher per process, for good):
 * the owner (> 0) given with a copy it declared stalled. */
int cv_guard_watch(int period_ms);

#define CV_INLINE_STALLED 0x10000000000
#define CV_COPY_MAX_STALLED 4
#define CV_COPY_MAX_THREADS 64

/* cffi-cdef: end */

#endif
