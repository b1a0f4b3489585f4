/*
 * cuse-vfio shim: libfuse3 glue, the serving loop, the reply helpers.
 * See shim.h for the contract; the VFIO rules are all in Python.
 */
#define _GNU_SOURCE
#include "shim.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* Defined by the cffi module (extern "Python+C" in _build_shim.py). */

#define CV_MAX_SESSIONS 1024

struct cv_session {
	struct fuse_session *se;
	int sid;
	int kind;
	int fd;
	int ended;
	int mounted;    /* a FUSE mount to undo */
};

struct cv_loop {
	pthread_mutex_t lock;
	struct cv_session *sessions[CV_MAX_SESSIONS];
	int n;
	int wake;       /* eventfd: stop, or the session list changed */
	volatile int stop;
};

static time_t cv_epoch;

/* libfuse's own messages (mount failures and the like) go to Python's log. */
static void cv_log(enum fuse_log_level level, const char *fmt, va_list ap)
{
	char msg[512];
	size_t len;

	vsnprintf(msg, sizeof(msg), fmt, ap);
	len = strlen(msg);
	while (len && msg[len - 1] == '\n')
		msg[--len] = '\0';
	cv_py_log((int)level, msg);
}

static void cv_init(void)
{
	cv_epoch = time(NULL);
	fuse_set_log_func(cv_log);
}

static void cv_init_once(void)
{
	static pthread_once_t once = PTHREAD_ONCE_INIT;

	pthread_once(&once, cv_init);
}

/* -- requests -> Python ---------------------------------------------------- */

static void cv_fill(struct cv_request *r, fuse_req_t req, int op)
{
	struct cv_session *s = fuse_req_userdata(req);
	const struct fuse_ctx *ctx = fuse_req_ctx(req);

	memset(r, 0, sizeof(*r));
	r->sid = s->sid;
	r->op = op;
	r->req = req;
	r->pid = ctx->pid;
	r->uid = ctx->uid;
	r->gid = ctx->gid;
}

static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct cv_request r;

	cv_fill(&r, req, CV_OP_LOOKUP);
	r.ino = parent;
	r.name = name;
	cv_py_request(&r);
}

static void ll_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	/* Inodes live in Python's tables for as long as they mean something;
	 * the kernel's lookup count changes nothing. */
	(void)ino;
	(void)nlookup;
	fuse_reply_none(req);
}

static void ll_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
	(void)count;
	(void)forgets;
	fuse_reply_none(req);
}

static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct cv_request r;

	(void)fi;
	cv_fill(&r, req, CV_OP_GETATTR);
	r.ino = ino;
	cv_py_request(&r);
}

static void ll_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
		       struct fuse_file_info *fi)
{
	/* Owners and modes come from the topology. */
	(void)ino;
	(void)attr;
	(void)to_set;
	(void)fi;
	fuse_reply_err(req, EPERM);
}

static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct cv_request r;

	cv_fill(&r, req, CV_OP_OPEN);
	r.ino = ino;
	r.open_flags = fi->flags;
	cv_py_request(&r);
}

static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	struct cv_session *s = fuse_req_userdata(req);

	(void)ino;
	cv_py_read(s->sid, req, fi->fh, size, off, fuse_req_ctx(req)->pid);
}

static void ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	struct cv_session *s = fuse_req_userdata(req);

	(void)ino;
	cv_py_write(s->sid, req, fi->fh, buf, size, off, fuse_req_ctx(req)->pid);
}

static void ll_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	/* Nothing is buffered; a close must not wait on Python. */
	(void)ino;
	(void)fi;
	fuse_reply_err(req, 0);
}

static void ll_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct cv_request r;

	cv_fill(&r, req, CV_OP_RELEASE);
	r.ino = ino;
	r.fh = fi->fh;
	r.open_flags = fi->flags;
	cv_py_request(&r);
}

static void ll_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg,
		     struct fuse_file_info *fi, unsigned flags, const void *in_buf,
		     size_t in_bufsz, size_t out_bufsz)
{
	struct cv_request r;

	cv_fill(&r, req, CV_OP_IOCTL);
	r.ino = ino;
	r.fh = fi->fh;
	r.cmd = cmd;
	r.arg = (uint64_t)(uintptr_t)arg;
	r.ioctl_flags = flags;
	r.in_buf = in_buf;
	r.in_size = in_bufsz;
	r.out_size = out_bufsz;
	cv_py_ioctl(&r);
}

static void ll_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	struct cv_request r;

	(void)fi;
	cv_fill(&r, req, CV_OP_READDIR);
	r.ino = ino;
	r.size = (int64_t)size;
	r.off = off;
	cv_py_request(&r);
}

static const struct fuse_lowlevel_ops cv_fuse_ops = {
	.lookup = ll_lookup,
	.forget = ll_forget,
	.forget_multi = ll_forget_multi,
	.getattr = ll_getattr,
	.setattr = ll_setattr,
	.open = ll_open,
	.read = ll_read,
	.write = ll_write,
	.flush = ll_flush,
	.release = ll_release,
	.ioctl = ll_ioctl,
	.readdir = ll_readdir,
};

/* CUSE: the same requests without inodes. */
static void cuse_init_done(void *userdata)
{
	struct cv_session *s = userdata;
	struct cv_request r;

	memset(&r, 0, sizeof(r));
	r.sid = s->sid;
	r.op = CV_OP_INIT_DONE;
	cv_py_request(&r);
}

static void cuse_open(fuse_req_t req, struct fuse_file_info *fi)
{
	ll_open(req, 0, fi);
}

static void cuse_read(fuse_req_t req, size_t size, off_t off, struct fuse_file_info *fi)
{
	ll_read(req, 0, size, off, fi);
}

static void cuse_write(fuse_req_t req, const char *buf, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	ll_write(req, 0, buf, size, off, fi);
}

static void cuse_flush(fuse_req_t req, struct fuse_file_info *fi)
{
	ll_flush(req, 0, fi);
}

static void cuse_release(fuse_req_t req, struct fuse_file_info *fi)
{
	ll_release(req, 0, fi);
}

static void cuse_ioctl(fuse_req_t req, int cmd, void *arg, struct fuse_file_info *fi,
		       unsigned flags, const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{
	ll_ioctl(req, 0, (unsigned int)cmd, arg, fi, flags, in_buf, in_bufsz, out_bufsz);
}

static const struct cuse_lowlevel_ops cv_cuse_ops = {
	.init_done = cuse_init_done,
	.open = cuse_open,
	.read = cuse_read,
	.write = cuse_write,
	.flush = cuse_flush,
	.release = cuse_release,
	.ioctl = cuse_ioctl,
};

/* -- sessions -------------------------------------------------------------- */

static int cv_prepare_fd(int fd)
{
	int fl;

	/* Non-blocking so that a drain stops at "nothing queued"; close-on-exec
	 * so a client started by `cuse-vfio run` never holds our connection. */
	fl = fcntl(fd, F_GETFL);
	if (fl == -1 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) == -1)
		return -1;
	fl = fcntl(fd, F_GETFD);
	if (fl == -1 || fcntl(fd, F_SETFD, fl | FD_CLOEXEC) == -1)
		return -1;
	return 0;
}

static struct cv_session *cv_session_alloc(int sid, int kind)
{
	struct cv_session *s = calloc(1, sizeof(*s));

	if (s) {
		s->sid = sid;
		s->kind = kind;
		s->fd = -1;
	}
	return s;
}

struct cv_session *cv_fuse_session_new(int sid, const char *mountpoint, const char *options,
				       char *err, size_t errlen)
{
	char *argv[] = { "cuse-vfio", "-o", (char *)options, NULL };
	struct fuse_args args = FUSE_ARGS_INIT(3, argv);
	struct cv_session *s;

	cv_init_once();
	s = cv_session_alloc(sid, CV_KIND_FUSE);
	if (!s) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	s->se = fuse_session_new(&args, &cv_fuse_ops, sizeof(cv_fuse_ops), s);
	fuse_opt_free_args(&args);
	if (!s->se) {
		snprintf(err, errlen, "libfuse refused the session options \"%s\"", options);
		free(s);
		return NULL;
	}
	if (fuse_session_mount(s->se, mountpoint) != 0) {
		snprintf(err, errlen, "cannot mount a FUSE file system on %s (see the libfuse message above)",
			 mountpoint);
		fuse_session_destroy(s->se);
		free(s);
		return NULL;
	}
	s->mounted = 1;
	s->fd = fuse_session_fd(s->se);
	if (cv_prepare_fd(s->fd) != 0) {
		snprintf(err, errlen, "cannot set up the FUSE connection of %s: %s", mountpoint,
			 strerror(errno));
		cv_session_free(s);
		return NULL;
	}
	return s;
}

struct cv_session *cv_cuse_session_new(int sid, const char *devname, char *err, size_t errlen)
{
	char *argv[] = { "cuse-vfio", NULL };
	struct fuse_args args = FUSE_ARGS_INIT(1, argv);
	char info[256], path[64];
	const char *info_argv[1] = { info };
	struct cuse_info ci;
	struct cv_session *s;
	int fd;

	cv_init_once();
	if (snprintf(info, sizeof(info), "DEVNAME=%s", devname) >= (int)sizeof(info)) {
		snprintf(err, errlen, "device name %s is too long", devname);
		return NULL;
	}
	memset(&ci, 0, sizeof(ci));
	ci.dev_info_argc = 1;
	ci.dev_info_argv = info_argv;
	/* VFIO ioctls are _IO(';', n): no size bits, so only an unrestricted
	 * ioctl lets the server reach the argument. */
	ci.flags = CUSE_UNRESTRICTED_IOCTL;

	s = cv_session_alloc(sid, CV_KIND_CUSE);
	if (!s) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	/* cuse_lowlevel_new + our own /dev/cuse open instead of
	 * cuse_lowlevel_setup: no daemonizing (what -f asks for) and no libfuse
	 * signal handlers, so SIGINT and SIGTERM stay Python's. */
	s->se = cuse_lowlevel_new(&args, &ci, &cv_cuse_ops, s);
	fuse_opt_free_args(&args);
	if (!s->se) {
		snprintf(err, errlen, "libfuse could not create a CUSE session for %s", devname);
		free(s);
		return NULL;
	}
	fd = open("/dev/cuse", O_RDWR | O_CLOEXEC);
	if (fd == -1) {
		int e = errno;

		snprintf(err, errlen, "/dev/cuse cannot be opened (%s): load the cuse module or use --transport fuse",
			 strerror(e));
		fuse_session_destroy(s->se);
		free(s);
		errno = e;
		return NULL;
	}
	/* libfuse takes an already open channel as "/dev/fd/N". */
	snprintf(path, sizeof(path), "/dev/fd/%d", fd);
	if (fuse_session_mount(s->se, path) != 0) {
		snprintf(err, errlen, "libfuse did not accept the /dev/cuse channel");
		close(fd);
		fuse_session_destroy(s->se);
		free(s);
		return NULL;
	}
	s->fd = fd;
	if (cv_prepare_fd(fd) != 0) {
		snprintf(err, errlen, "cannot set up the /dev/cuse channel: %s", strerror(errno));
		cv_session_free(s);
		return NULL;
	}
	return s;
}

int cv_session_fd(struct cv_session *s)
{
	return s->fd;
}

void cv_session_free(struct cv_session *s)
{
	if (!s)
		return;
	if (s->se) {
		if (s->mounted)
			fuse_session_unmount(s->se);
		fuse_session_destroy(s->se);
	}
	free(s);
}

/* -- the loop -------------------------------------------------------------- */

struct cv_loop *cv_loop_new(char *err, size_t errlen)
{
	struct cv_loop *l = calloc(1, sizeof(*l));

	if (!l) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	l->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (l->wake == -1) {
		snprintf(err, errlen, "eventfd: %s", strerror(errno));
		free(l);
		return NULL;
	}
	pthread_mutex_init(&l->lock, NULL);
	return l;
}

static void cv_loop_wake(struct cv_loop *l)
{
	uint64_t one = 1;
	ssize_t n = write(l->wake, &one, sizeof(one));

	(void)n; /* a full counter is already a wake-up */
}

int cv_loop_add(struct cv_loop *l, struct cv_session *s)
{
	int ret = 0;

	pthread_mutex_lock(&l->lock);
	if (l->n == CV_MAX_SESSIONS)
		ret = -ENOSPC;
	else
		l->sessions[l->n++] = s;
	pthread_mutex_unlock(&l->lock);
	cv_loop_wake(l);
	return ret;
}

static void cv_session_ended(struct cv_session *s, int err)
{
	struct cv_request r;

	s->ended = 1;
	memset(&r, 0, sizeof(r));
	r.sid = s->sid;
	r.op = CV_OP_SESSION_END;
	r.size = err;
	cv_py_request(&r);
}

/*
 * Each thread that serves has its own receive buffers, one per nesting level
 * (a handler may drain another session: cv_loop_drain), so a thread that
 * stops in the middle of a request (its client's memory stalled it, and
 * another thread took over the loop) holds no buffer anyone else needs.
 */
#define CV_MAX_DEPTH 4
static __thread struct fuse_buf cv_bufs[CV_MAX_DEPTH];
static __thread struct cv_session *cv_serving[CV_MAX_DEPTH];
static __thread int cv_depth;
static __thread int cv_retired;

static void cv_free_bufs(void)
{
	int i;

	for (i = 0; i < CV_MAX_DEPTH; i++) {
		free(cv_bufs[i].mem);
		memset(&cv_bufs[i], 0, sizeof(cv_bufs[i]));
	}
}

/* 1: one request processed; 0: nothing queued; -1: the session ended. */
static int cv_process_one(struct cv_session *s)
{
	struct fuse_buf *buf;
	int res;

	if (cv_depth == CV_MAX_DEPTH)
		return 0;
	buf = &cv_bufs[cv_depth];
	res = fuse_session_receive_buf(s->se, buf);
	if (res == -EAGAIN || res == -EINTR)
		return 0;
	if (res <= 0 || fuse_session_exited(s->se)) {
		cv_session_ended(s, res);
		return -1;
	}
	cv_serving[cv_depth++] = s;
	fuse_session_process_buf(s->se, buf);
	cv_serving[--cv_depth] = NULL;
	return 1;
}

void cv_loop_retire(void)
{
	cv_retired = 1;
}

int cv_loop_run(struct cv_loop *l)
{
	struct pollfd pfd[CV_MAX_SESSIONS + 1];
	struct cv_session *polled[CV_MAX_SESSIONS + 1];
	sigset_t mask;
	int i, n;

	/* Signals are for Python's main thread; here they would only turn
	 * poll() into EINTR. */
	sigfillset(&mask);
	sigdelset(&mask, SIGSEGV);
	sigdelset(&mask, SIGBUS);
	sigdelset(&mask, SIGFPE);
	sigdelset(&mask, SIGILL);
	pthread_sigmask(SIG_BLOCK, &mask, NULL);

	while (!l->stop) {
		pfd[0].fd = l->wake;
		pfd[0].events = POLLIN;
		n = 1;
		pthread_mutex_lock(&l->lock);
		for (i = 0; i < l->n; i++) {
			if (l->sessions[i]->ended)
				continue;
			pfd[n].fd = l->sessions[i]->fd;
			pfd[n].events = POLLIN;
			polled[n] = l->sessions[i];
			n++;
		}
		pthread_mutex_unlock(&l->lock);

		if (poll(pfd, n, -1) == -1) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (pfd[0].revents) {
			uint64_t count;
			ssize_t r = read(l->wake, &count, sizeof(count));

			(void)r;
			if (l->stop)
				break;
		}
		for (i = 1; i < n && !l->stop && !cv_retired; i++) {
			if (pfd[i].revents & (POLLIN | POLLERR | POLLHUP))
				cv_process_one(polled[i]);
		}
		if (cv_retired)
			break;
	}
	cv_free_bufs();
	if (cv_retired) {
		cv_retired = 0;
		return 1;
	}
	return 0;
}

void cv_loop_stop(struct cv_loop *l)
{
	l->stop = 1;
	cv_loop_wake(l);
}

int cv_loop_drain(struct cv_loop *l, struct cv_session *s)
{
	int count = 0;

	int i;

	(void)l;
	/* Not a session this thread is in the middle of serving: its requests stay in order. */
	if (s->ended)
		return 0;
	for (i = 0; i < cv_depth; i++)
		if (cv_serving[i] == s)
			return 0;
	while (cv_process_one(s) == 1)
		count++;
	return count;
}

void cv_loop_free(struct cv_loop *l)
{
	if (!l)
		return;
	close(l->wake);
	pthread_mutex_destroy(&l->lock);
	free(l);
}

/* -- replies --------------------------------------------------------------- */

static void cv_stat(struct stat *st, uint64_t ino, uint32_t mode, uint32_t uid, uint32_t gid,
		    uint64_t size)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_mode = mode;
	st->st_nlink = S_ISDIR(mode) ? 2 : 1;
	st->st_uid = uid;
	st->st_gid = gid;
	st->st_size = (off_t)size;
	st->st_atime = st->st_mtime = st->st_ctime = cv_epoch;
}

int cv_reply_entry(fuse_req_t req, uint64_t ino, uint32_t mode, uint32_t uid, uint32_t gid,
		   uint64_t size, double timeout)
{
	struct fuse_entry_param e;

	memset(&e, 0, sizeof(e));
	e.ino = ino;
	e.generation = 1;
	cv_stat(&e.attr, ino, mode, uid, gid, size);
	e.attr_timeout = timeout;
	e.entry_timeout = timeout;
	return fuse_reply_entry(req, &e);
}

int cv_reply_attr(fuse_req_t req, uint64_t ino, uint32_t mode, uint32_t uid, uint32_t gid,
		  uint64_t size, double timeout)
{
	struct stat st;

	cv_stat(&st, ino, mode, uid, gid, size);
	return fuse_reply_attr(req, &st, timeout);
}

int cv_reply_open(fuse_req_t req, uint64_t fh, int direct_io, int nonseekable)
{
	struct fuse_file_info fi;

	memset(&fi, 0, sizeof(fi));
	fi.fh = fh;
	/* direct_io: every pread/pwrite reaches the server with its offset
	 * (region index << 40), never the page cache. */
	fi.direct_io = direct_io ? 1 : 0;
	fi.nonseekable = nonseekable ? 1 : 0;
	return fuse_reply_open(req, &fi);
}

int cv_reply_dir(fuse_req_t req, const char *const *names, const uint64_t *inos, const uint32_t *modes,
		 size_t n, int64_t off, size_t size)
{
	char *buf = malloc(size ? size : 1);
	size_t pos = 0, i;
	int ret;

	if (!buf)
		return fuse_reply_err(req, ENOMEM);
	for (i = off < 0 ? 0 : (size_t)off; i < n; i++) {
		struct stat st;
		size_t len;

		memset(&st, 0, sizeof(st));
		st.st_ino = inos[i];
		st.st_mode = modes[i];
		len = fuse_add_direntry(req, buf + pos, size - pos, names[i], &st, (off_t)(i + 1));
		if (len > size - pos)
			break;
		pos += len;
	}
	ret = fuse_reply_buf(req, buf, pos);
	free(buf);
	return ret;
}

int cv_reply_ioctl_retry(fuse_req_t req, const uint64_t *in_addr, const uint64_t *in_len, size_t n_in,
			 const uint64_t *out_addr, const uint64_t *out_len, size_t n_out)
{
	struct iovec iov[CV_IOCTL_MAX_IOV];
	size_t i, in_total = 0, out_total = 0;

	/* The kernel's limits (fuse_do_ioctl): at most 256 iovecs in all and,
	 * on CUSE, 128 KiB per direction.  Past them it would fail the ioctl
	 * with ENOMEM; say so before sending anything. */
	if (n_in + n_out > CV_IOCTL_MAX_IOV)
		return -ENOMEM;
	for (i = 0; i < n_in; i++) {
		in_total += in_len[i];
		iov[i].iov_base = (void *)(uintptr_t)in_addr[i];
		iov[i].iov_len = in_len[i];
	}
	for (i = 0; i < n_out; i++) {
		out_total += out_len[i];
		iov[n_in + i].iov_base = (void *)(uintptr_t)out_addr[i];
		iov[n_in + i].iov_len = out_len[i];
	}
	if (in_total > CV_IOCTL_MAX_BYTES || out_total > CV_IOCTL_MAX_BYTES)
		return -ENOMEM;
	return fuse_reply_ioctl_retry(req, n_in ? iov : NULL, n_in, n_out ? iov + n_in : NULL, n_out);
}

int cv_reply_ioctl(fuse_req_t req, int result, const void *buf, size_t size)
{
	/* The kernel copies reply data out before it looks at the result, so
	 * data with a negative result works like a copy_to_user followed by an
	 * error return (hot reset info's ENOSPC does that). */
	if (result < 0 && size == 0)
		return fuse_reply_err(req, -result);
	return fuse_reply_ioctl(req, result, size ? buf : NULL, size);
}
