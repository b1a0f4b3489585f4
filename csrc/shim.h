/*
 * cuse-vfio shim: the part of the serving layer that must be C.
 *
 * libfuse3 glue for two kinds of session (a CUSE character device, a FUSE
 * mount served with the low-level API), one serving loop that owns every
 * session, and the reply helpers Python calls, among them the CUSE
 * unrestricted-ioctl retry reply.  A read or write reaches Python as its
 * decoded fields (cv_py_read, cv_py_write), an ioctl as one `struct
 * cv_request` (cv_py_ioctl), every other request as one `struct cv_request`
 * too (cv_py_request); all VFIO logic is there.
 *
 * Everything between the cffi-cdef markers below is also the cdef of the
 * Python binding (_build_shim.py reads it from here), so it stays in the C
 * that cffi's parser takes: no preprocessor lines but `#define NAME integer`,
 * and CV_PYTHON marks the functions Python implements.
 */
#ifndef CUSE_VFIO_SHIM_H
#define CUSE_VFIO_SHIM_H

#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>
#include <cuse_lowlevel.h>
#include <stddef.h>
#include <stdint.h>

/* Implemented in Python (cffi `extern "Python+C"`), called by the loop. */
#define CV_PYTHON extern

/* cffi-cdef: begin */

/* What a request asks for (cv_request.op). */
enum cv_op {
	CV_OP_LOOKUP = 1,
	CV_OP_GETATTR,
	CV_OP_SETATTR,
	CV_OP_OPEN,
	CV_OP_READ,
	CV_OP_WRITE,
	CV_OP_FLUSH,
	CV_OP_RELEASE,
	CV_OP_IOCTL,
	CV_OP_READDIR,
	CV_OP_INIT_DONE,   /* CUSE: the kernel created the device (req is NULL) */
	CV_OP_SESSION_END, /* the kernel side went away (req is NULL; size = -errno or 0) */
};

enum cv_kind { CV_KIND_FUSE = 0, CV_KIND_CUSE = 1 };

/* One request, flattened; only the fields of its op are meaningful (reads and
 * writes never come as one: cv_py_read, cv_py_write).
 * Valid only during the call that hands it over: Python copies what it keeps. */
struct cv_request {
	int sid;               /* the session id Python gave */
	int op;
	fuse_req_t req;
	uint64_t ino;          /* FUSE inode (1 = root); 0 on CUSE */
	uint64_t fh;           /* what Python's open reply put in fi->fh */
	int open_flags;
	unsigned int cmd;      /* ioctl */
	uint64_t arg;          /* ioctl: the raw argument (a pointer into the caller) */
	unsigned int ioctl_flags;
	const char *name;      /* lookup */
	const void *in_buf;    /* ioctl in data (CUSE retry) */
	size_t in_size;
	size_t out_size;       /* ioctl: bytes the kernel will copy out */
	int64_t size;          /* readdir size; SESSION_END: -errno */
	int64_t off;           /* readdir offset */
	int32_t pid;           /* the calling thread (a tid) */
	uint32_t uid;
	uint32_t gid;
};

struct cv_session;
struct cv_loop;

/* Sessions.  On failure NULL, with a sentence in err. */
struct cv_session *cv_fuse_session_new(int sid, const char *mountpoint, const char *options,
				       char *err, size_t errlen);
struct cv_session *cv_cuse_session_new(int sid, const char *devname, char *err, size_t errlen);
int cv_session_fd(struct cv_session *s);
/* Unmount (FUSE), close the kernel connection, free.  Only once the loop no
 * longer runs and no reply for this session can still be sent. */
void cv_session_free(struct cv_session *s);

/* The serving loop: poll over every session, receive, process, one request
 * at a time, on the thread that calls cv_loop_run (the GIL is released).
 * cv_loop_run returns 0 once stopped, -errno on failure, and 1 when a
 * handler on its thread called cv_loop_retire: another thread serves now. */
struct cv_loop *cv_loop_new(char *err, size_t errlen);
int cv_loop_add(struct cv_loop *l, struct cv_session *s);
int cv_loop_run(struct cv_loop *l);
/* From a handler: this thread leaves the loop once the request ends. */
void cv_loop_retire(void);
void cv_loop_stop(struct cv_loop *l);
/* From a request handler on the loop thread: process what session s has
 * queued right now, without blocking.  Returns the number processed. */
int cv_loop_drain(struct cv_loop *l, struct cv_session *s);
void cv_loop_free(struct cv_loop *l);

/* Replies. */
int cv_reply_entry(fuse_req_t req, uint64_t ino, uint32_t mode, uint32_t uid, uint32_t gid,
		   uint64_t size, double timeout);
int cv_reply_attr(fuse_req_t req, uint64_t ino, uint32_t mode, uint32_t uid, uint32_t gid,
		  uint64_t size, double timeout);
int cv_reply_open(fuse_req_t req, uint64_t fh, int direct_io, int nonseekable);
int cv_reply_dir(fuse_req_t req, const char *const *names, const uint64_t *inos, const uint32_t *modes,
		 size_t n, int64_t off, size_t size);
/* The unrestricted-ioctl retry: ask the kernel to fetch the given ranges of
 * the caller's memory (in) and to accept the given ranges back (out).
 * Refuses (-ENOMEM, nothing sent) beyond the kernel's limits, so the caller
 * can answer the request itself.  (cuse_vfio/transport/retry.py checks the
 * same limits first, deliberately, to say why in the log.) */
int cv_reply_ioctl_retry(fuse_req_t req, const uint64_t *in_addr, const uint64_t *in_len, size_t n_in,
			 const uint64_t *out_addr, const uint64_t *out_len, size_t n_out);
/* The final ioctl answer: result, and the bytes to copy out (to the out
 * ranges of the last retry, in order).  A negative result without data is
 * sent as an error. */
int cv_reply_ioctl(fuse_req_t req, int result, const void *buf, size_t size);

#define CV_IOCTL_MAX_IOV 256       /* FUSE_IOCTL_MAX_IOV */
#define CV_IOCTL_MAX_BYTES 131072  /* 128 KiB: CUSE never raises max_pages, 32 pages per direction */

/* The requests, and the loop's log lines (level as Python's logging).  Reads
 * and writes, the hot path of a device fd, come decoded: which session, the
 * request to answer, the open (fh), the bytes, the offset and the calling
 * thread; the data of a write is valid only during the call.  Ioctls come as
 * a cv_request of their own kind, everything else through cv_py_request. */
CV_PYTHON void cv_py_request(struct cv_request *r);
CV_PYTHON void cv_py_ioctl(struct cv_request *r);
CV_PYTHON void cv_py_read(int sid, fuse_req_t req, uint64_t fh, size_t size, int64_t off, int32_t pid);
CV_PYTHON void cv_py_write(int sid, fuse_req_t req, uint64_t fh, const char *buf, size_t size, int64_t off,
			   int32_t pid);
CV_PYTHON void cv_py_log(int level, const char *message);

/* cffi-cdef: end */

#endif
