/*
 * libcuse_vfio_preload.so: turns the token VFIO_GROUP_GET_DEVICE_FD returns
 * under cuse-vfio into a real device fd.
 *
 * A FUSE or CUSE server cannot install an fd in its caller, so the server's
 * GET_DEVICE_FD answers with a one-time token (>= 2^30, above any fd number
 * the kernel hands out) and keeps the device file open for this process.
 * This library wraps ioctl(): for GET_DEVICE_FD it first connects to the
 * server's socket ($CUSE_VFIO_SOCKET) and waits for its greeting, so the
 * server knows this process can receive an fd; then it makes the real call,
 * sends the token back and receives the fd with SCM_RIGHTS, close-on-exec
 * as the kernel's own device fds are.  Everything else goes straight to the
 * real ioctl.  Results below 2^30 (errors, real kernel fds of a real vfio
 * group) are returned unchanged.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define CV_GROUP_GET_DEVICE_FD _IO(';', 100 + 6)
#define CV_TOKEN_MIN (1 << 30)
#define CV_HELLO 'R'

typedef int (*ioctl_fn)(int, unsigned long, ...);

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
	if (n != 1 || hello != CV_HELLO)
		goto fail;
	return s;
fail:
	close(s);
	return -1;
}

static int cv_fetch(int s, int token)
{
	union {
		struct cmsghdr hdr;
		char buf[CMSG_SPACE(sizeof(int))];
	} control;
	uint32_t req = (uint32_t)token;
	int32_t status = EIO;
	struct iovec iov = { &status, sizeof(status) };
	struct msghdr msg;
	struct cmsghdr *c;
	ssize_t n;
	int fd = -1;

	do
		n = send(s, &req, sizeof(req), MSG_NOSIGNAL);
	while (n == -1 && errno == EINTR);
	if (n != sizeof(req))
		return -EIO;

	memset(&msg, 0, sizeof(msg));
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = control.buf;
	msg.msg_controllen = sizeof(control.buf);
	do
		n = recvmsg(s, &msg, MSG_CMSG_CLOEXEC);
	while (n == -1 && errno == EINTR);
	if (n != sizeof(status))
		return -EIO;
	for (c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
		    c->cmsg_len == CMSG_LEN(sizeof(int)))
			memcpy(&fd, CMSG_DATA(c), sizeof(int));
	}
	if (status != 0) {
		if (fd >= 0)
			close(fd);
		return -(status > 0 ? status : EIO);
	}
	if (fd < 0)
		return -EIO;
	return fd;
}

static int cv_get_device_fd(int group, unsigned long request, void *arg)
{
	ioctl_fn real = real_ioctl_fn();
	int s, ret, e;

	s = cv_connect();
	ret = real(group, request, arg);
	if (s == -1)
		return ret; /* no server to ask: whatever the ioctl said */
	if (ret < CV_TOKEN_MIN) {
		e = errno;
		close(s);
		errno = e;
		return ret;
	}
	ret = cv_fetch(s, ret);
	close(s);
	if (ret < 0) {
		errno = -ret;
		return -1;
	}
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
