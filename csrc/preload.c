/*
 * libcuse_vfio_preload.so: makes the device fds of cuse-vfio behave as the
 * kernel's, where a FUSE file cannot.
 *
 * 1. GET_DEVICE_FD.  A FUSE or CUSE server cannot install an fd in its
 *    caller, so the server's GET_DEVICE_FD answers with a one-time token
 *    (>= 2^30, above any fd number the kernel hands out) and keeps the device
 *    file open for this process.  This library wraps ioctl(): for
 *    GET_DEVICE_FD it first connects to the server's socket
 *    ($CUSE_VFIO_SOCKET) and waits for its greeting, so the server knows this
 *    process can receive an fd; then it makes the real call, sends the token
 *    back and receives the fd with SCM_RIGHTS, close-on-exec as the kernel's
 *    own device fds are.  Results below 2^30 (errors, real kernel fds of a
 *    real vfio group) are returned unchanged.
 *
 * 2. mmap of a region.  A device fd is a FUSE direct_io file, and FUSE cannot
 *    share the device model's pages through it.  The model keeps a mappable
 *    region (a BAR of plain memory) in a memfd, so this library wraps
 *    mmap(): for a device fd it asks the server which memfd and where in it
 *    (the server applies vfio-pci's rules and answers only for a device file
 *    this process holds), maps that memfd with the caller's address, prot and
 *    flags, and closes it; the mapping keeps the memory.
 *
 *    Which fds are device fds: every device fd lives on the server's
 *    device-file mount, so the library remembers that mount's st_dev when it
 *    receives a device fd, and an fd is a device fd when fstat() says it is a
 *    regular file on such a mount.  That follows dup(), dup2(), F_DUPFD, fds
 *    passed around inside the process and fork() with no wrapper of its own,
 *    at the price of one fstat per *file* mapping, and only in a process that
 *    has received a device fd; anonymous mappings (malloc, stacks) and every
 *    mapping of a process that never received one cost a flag test.
 *
 * Everything else goes straight to the real ioctl/mmap; munmap is untouched.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#include "handoff.h"

/* VFIO_GROUP_GET_DEVICE_FD of <linux/vfio.h> (cuse_vfio.uapi has it too): spelled out
 * here, deliberately, so the library builds where that header is not installed. */
#define CV_GROUP_GET_DEVICE_FD _IO(';', 100 + 6)
/* What cv_ask_map answers when the library maps the file itself. */
#define CV_FALLBACK INT_MIN

typedef int (*ioctl_fn)(int, unsigned long, ...);
typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);
typedef void *(*mmap64_fn)(void *, size_t, int, int, int, off64_t);

static ioctl_fn real_ioctl_fn(void)
{
	static ioctl_fn real;
	ioctl_fn fn = __atomic_load_n(&real, __ATOMIC_ACQUIRE);

	if (!fn) {
		fn = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
		__atomic_store_n(&real, fn, __ATOMIC_RELEASE);
	}
	return fn;
}

/*
 * The real mmap is looked up once, when the library is loaded: dlsym may
 * allocate, and an allocator that maps memory through mmap() would land back
 * here while the lookup is still going on.  A mapping made before that (from
 * another library's constructor) goes to the system call itself.
 */
static mmap_fn real_mmap;
static mmap64_fn real_mmap64;
static void cv_atfork_child(void);

__attribute__((constructor)) static void cv_init(void)
{
	__atomic_store_n(&real_mmap, (mmap_fn)dlsym(RTLD_NEXT, "mmap"), __ATOMIC_RELEASE);
	__atomic_store_n(&real_mmap64, (mmap64_fn)dlsym(RTLD_NEXT, "mmap64"), __ATOMIC_RELEASE);
	pthread_atfork(NULL, NULL, cv_atfork_child);
}

static void *cv_real_mmap(int is64, void *addr, size_t len, int prot, int flags, int fd, off64_t off)
{
	mmap_fn fn = is64 ? NULL : __atomic_load_n(&real_mmap, __ATOMIC_ACQUIRE);
	mmap64_fn fn64 = is64 ? __atomic_load_n(&real_mmap64, __ATOMIC_ACQUIRE) : NULL;

	if (fn)
		return fn(addr, len, prot, flags, fd, (off_t)off);
	if (fn64)
		return fn64(addr, len, prot, flags, fd, off);
#if UINTPTR_MAX == UINT64_MAX
	return (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
#else
	fn64 = (mmap64_fn)dlsym(RTLD_NEXT, "mmap64");
	if (!fn64) {
		errno = ENOSYS;
		return MAP_FAILED;
	}
	return fn64(addr, len, prot, flags, fd, off);
#endif
}

/* -- the device-file mounts this process has received fds from ------------------- */
#define CV_MAX_MOUNTS 8
static dev_t cv_mounts[CV_MAX_MOUNTS];
static int cv_nmounts;  /* entries below it are written before it is raised */
static int cv_mounts_lock;

static void cv_remember(int fd)
{
	struct stat st;
	int i, n;

	if (fstat(fd, &st) == -1)
		return;
	while (__atomic_exchange_n(&cv_mounts_lock, 1, __ATOMIC_ACQUIRE))
		;
	n = __atomic_load_n(&cv_nmounts, __ATOMIC_RELAXED);
	for (i = 0; i < n && cv_mounts[i] != st.st_dev; i++)
		;
	if (i == n && n < CV_MAX_MOUNTS) {
		cv_mounts[n] = st.st_dev;
		__atomic_store_n(&cv_nmounts, n + 1, __ATOMIC_RELEASE);
	}
	__atomic_store_n(&cv_mounts_lock, 0, __ATOMIC_RELEASE);
}

static int cv_is_device_fd(int fd)
{
	int n = __atomic_load_n(&cv_nmounts, __ATOMIC_ACQUIRE);
	int i, e;
	struct stat st;

	if (n == 0)
		return 0;
	e = errno;
	if (fstat(fd, &st) == -1) {
		errno = e;
		return 0;
	}
	if (!S_ISREG(st.st_mode))
		return 0;
	for (i = 0; i < n; i++)
		if (cv_mounts[i] == st.st_dev)
			return 1;
	return 0;
}

/* -- fork ----------------------------------------------------------------------------- *
 * A call's hand-off connection lives only as long as the call, but a fork() by
 * another thread meanwhile copies it into the child, where no thread will ever
 * close it: it would keep the connection (one of the user's few) open as long
 * as the child lives.  So calls register their connection here and the child
 * closes what it inherited.  The mounts lock may be held by a thread that does
 * not exist in the child: released there (the table is written before it is
 * published, so a half-done update is simply not seen).
 */
#define CV_MAX_INFLIGHT 64
static int cv_inflight[CV_MAX_INFLIGHT]; /* fd + 1, 0 for a free slot */

static int cv_track(int s)
{
	int i, free_slot;

	if (s < 0)
		return -1;
	for (i = 0; i < CV_MAX_INFLIGHT; i++) {
		free_slot = 0;
		if (__atomic_compare_exchange_n(&cv_inflight[i], &free_slot, s + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
			return i;
	}
	return -1; /* untracked: only the fork case above is affected */
}

/* Close a call's connection (if any) and free its slot. */
static void cv_untrack(int slot, int s)
{
	int e = errno;

	if (slot >= 0)
		__atomic_store_n(&cv_inflight[slot], 0, __ATOMIC_RELEASE);
	if (s >= 0)
		close(s);
	errno = e;
}

static void cv_atfork_child(void)
{
	int i, v;

	for (i = 0; i < CV_MAX_INFLIGHT; i++) {
		v = __atomic_exchange_n(&cv_inflight[i], 0, __ATOMIC_ACQ_REL);
		if (v > 0)
			close(v - 1);
	}
	__atomic_store_n(&cv_mounts_lock, 0, __ATOMIC_RELEASE);
}

/* -- the hand-off socket ------------------------------------------------------------- */
static int cv_connect(void)
{
	const char *path = getenv("CUSE_VFIO_SOCKET");
	struct sockaddr_un sa;
	char hello;
	ssize_t n;
	int s;

	if (!path || !*path || strlen(path) >= sizeof(sa.sun_path))
		return -1;
	s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s == -1)
		return -1;
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	strcpy(sa.sun_path, path);
	if (connect(s, (struct sockaddr *)&sa, sizeof(sa)) == -1)
		goto fail;
	/* The greeting means the server has recorded this process. */
	do
		n = recv(s, &hello, 1, 0);
	while (n == -1 && errno == EINTR);
	if (n != 1 || hello != CV_HANDOFF_HELLO)
		goto fail;
	return s;
fail:
	close(s);
	return -1;
}

/* Send a request, receive an answer of exactly `size` bytes and at most one fd (-1 if none). */
static int cv_call(int s, const void *req, size_t req_size, void *reply, size_t size, int *fd)
{
	union {
		struct cmsghdr hdr;
		char buf[CMSG_SPACE(sizeof(int))];
	} control;
	struct iovec iov = { reply, size };
	struct msghdr msg;
	struct cmsghdr *c;
	ssize_t n;

	*fd = -1;
	do
		n = send(s, req, req_size, MSG_NOSIGNAL);
	while (n == -1 && errno == EINTR);
	if (n != (ssize_t)req_size)
		return -1;
	memset(&msg, 0, sizeof(msg));
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = control.buf;
	msg.msg_controllen = sizeof(control.buf);
	do
		n = recvmsg(s, &msg, MSG_CMSG_CLOEXEC | MSG_WAITALL);
	while (n == -1 && errno == EINTR);
	for (c = CMSG_FIRSTHDR(&msg); n > 0 && c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
		    c->cmsg_len == CMSG_LEN(sizeof(int)))
			memcpy(fd, CMSG_DATA(c), sizeof(int));
	}
	if (n != (ssize_t)size) {
		if (*fd >= 0)
			close(*fd);
		*fd = -1;
		return -1;
	}
	return 0;
}

static int cv_fetch(int s, int token)
{
	uint32_t req = (uint32_t)token;
	struct cv_token_reply reply = { .status = EIO };
	int fd;

	if (cv_call(s, &req, sizeof(req), &reply, sizeof(reply), &fd) == -1)
		return -EIO;
	if (reply.status != 0) {
		if (fd >= 0)
			close(fd);
		return -(reply.status > 0 ? reply.status : EIO);
	}
	if (fd < 0)
		return -EIO;
	/* The server's copy is closed once CV_HANDOFF_CLOSED comes: only then is
	 * a close() of ours the last one, the one that releases the device. */
	char closed = 0;
	ssize_t n;
	do
		n = recv(s, &closed, 1, MSG_WAITALL);
	while (n == -1 && errno == EINTR);
	if (n != 1 || closed != CV_HANDOFF_CLOSED) {
		close(fd);
		return -EIO;
	}
	return fd;
}

static int cv_get_device_fd(int group, unsigned long request, void *arg)
{
	ioctl_fn real = real_ioctl_fn();
	int s, slot, ret, e = errno;

	s = cv_connect();
	slot = cv_track(s);
	errno = e;
	ret = real(group, request, arg);
	if (ret < CV_TOKEN_MIN) {
		/* An error or a real kernel fd: whatever the ioctl said. */
		e = errno;
		cv_untrack(slot, s);
		errno = e;
		return ret;
	}
	if (s == -1) {
		/*
		 * A token, though this call could not reach the server: another
		 * connection of this process (another thread's call) made the server
		 * issue it.  It is no fd: never return it.  The server releases the
		 * device file when the token expires.
		 */
		errno = EIO;
		return -1;
	}
	ret = cv_fetch(s, ret);
	cv_untrack(slot, s);
	if (ret < 0) {
		errno = -ret;
		return -1;
	}
	cv_remember(ret);
	errno = e;
	return ret;
}

int ioctl(int fd, unsigned long request, ...)
{
	va_list ap;
	void *arg;
	ioctl_fn real;

	va_start(ap, request);
	arg = va_arg(ap, void *);
	va_end(ap);
	if (request == CV_GROUP_GET_DEVICE_FD)
		return cv_get_device_fd(fd, request, arg);
	real = real_ioctl_fn();
	if (!real) {
		errno = ENOSYS;
		return -1;
	}
	return real(fd, request, arg);
}

/*
 * The memfd behind (fd, offset, length) and where in it to map, or -errno,
 * or CV_FALLBACK when there is no server to ask or the server does not know
 * the file: then it is mapped as any other file.
 */
static int cv_ask_map(int fd, int prot, int flags, uint64_t off, size_t len, uint64_t *start)
{
	struct cv_mmap_request req = {
		.op = CV_OP_MMAP, .fd = fd, .prot = prot, .flags = flags, .offset = off, .length = len,
	};
	struct cv_mmap_reply reply = { .status = EIO };
	int s, slot, memfd, rc;

	s = cv_connect();
	if (s == -1)
		return CV_FALLBACK;
	slot = cv_track(s);
	rc = cv_call(s, &req, sizeof(req), &reply, sizeof(reply), &memfd);
	cv_untrack(slot, s);
	if (rc == -1)
		return -EIO;
	if (reply.status != 0) {
		if (memfd >= 0)
			close(memfd);
		if (reply.status == CV_NOT_MINE)
			return CV_FALLBACK;
		return -(reply.status > 0 ? reply.status : EIO);
	}
	if (memfd < 0)
		return -EIO;
	*start = reply.start;
	return memfd;
}

static void *cv_mmap(int is64, void *addr, size_t len, int prot, int flags, int fd, off64_t off)
{
	uint64_t start = 0;
	void *p;
	int memfd, e;

	if (fd < 0 || (flags & MAP_ANONYMOUS) || !cv_is_device_fd(fd))
		return cv_real_mmap(is64, addr, len, prot, flags, fd, off);
	e = errno;
	memfd = cv_ask_map(fd, prot, flags, (uint64_t)off, len, &start);
	if (memfd == CV_FALLBACK) {
		errno = e;
		return cv_real_mmap(is64, addr, len, prot, flags, fd, off);
	}
	if (memfd < 0) {
		errno = -memfd;
		return MAP_FAILED;
	}
	errno = e; /* a successful mmap leaves the caller's errno as it was */
	p = cv_real_mmap(is64, addr, len, prot, flags, memfd, (off64_t)start);
	e = errno;
	close(memfd);
	errno = e;
	return p;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	return cv_mmap(0, addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off)
{
	return cv_mmap(1, addr, len, prot, flags, fd, off);
}
