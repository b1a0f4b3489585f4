/*
 * null-server: the floor scripts/bench compares cuse-vfio with.  A libfuse3
 * low-level server that answers every ioctl with 0 at once, on the same
 * transport cuse-vfio uses: one file on a FUSE mount, or one CUSE character
 * device.  Single-threaded, as cuse-vfio's serving loop is.  Reads answer
 * zeros, writes take everything.  VFIO_GROUP_GET_STATUS copies its argument
 * in and out of the caller the way cuse-vfio does on the same transport, so
 * it is the floor of an ioctl with argument copies: on FUSE (a restricted
 * ioctl) with process_vm_readv/writev of argsz bytes; on CUSE (unrestricted)
 * by the retry protocol: the first call answers "retry" with the caller's 8
 * bytes as the range in and out, the kernel sends it again with them, and the
 * reply carries the 8 bytes back.
 *
 * The floor of an interrupt on the same transport: NULL_SERVER_SET_EVENTFD
 * (an ioctl on the FUSE file whose argument is an eventfd number of the
 * caller) fetches that eventfd with pidfd_getfd, as cuse-vfio fetches the
 * ones VFIO_DEVICE_SET_IRQS names, and from then on a pwrite at
 * NULL_SERVER_SIGNAL_OFFSET signals it before the reply (edu's raise-IRQ
 * write, answered by a null server); -1 lets it go.  The caller is one thread
 * (the FUSE request names the calling thread; pidfd_open needs a process).
 *
 *   null-server fuse MOUNTPOINT      serves MOUNTPOINT/node until SIGINT/SIGTERM
 *   null-server cuse NAME            serves /dev/NAME until SIGINT/SIGTERM
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 35
#include <cuse_lowlevel.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/vfio.h>

#define NODE_INO 2
/* The same two in tests/bench/vfio-loop.c. */
#define NULL_SERVER_SET_EVENTFD _IO('N', 1)
#define NULL_SERVER_SIGNAL_OFFSET 0x60 /* edu's raise-IRQ register */

/* The eventfd a pwrite at NULL_SERVER_SIGNAL_OFFSET signals, or -1. */
static int signal_efd = -1;

/* NULL_SERVER_SET_EVENTFD: the caller's eventfd FD fetched, or let go (FD -1); 0 or an errno. */
static int set_eventfd(pid_t pid, int fd)
{
	int pidfd, mine;

	if (signal_efd >= 0) {
		close(signal_efd);
		signal_efd = -1;
	}
	if (fd < 0)
		return 0;
	if ((pidfd = (int)syscall(SYS_pidfd_open, pid, 0)) < 0)
		return errno;
	mine = (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
	close(pidfd);
	if (mine < 0)
		return errno;
	signal_efd = mine;
	return 0;
}

static void null_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg, struct fuse_file_info *fi,
		       unsigned flags, const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{
	(void)ino; (void)fi; (void)flags; (void)in_buf; (void)in_bufsz; (void)out_bufsz;
	if (cmd == NULL_SERVER_SET_EVENTFD && ino) {
		int err = set_eventfd(fuse_req_ctx(req)->pid, (int)(intptr_t)arg);

		if (err)
			fuse_reply_err(req, err);
		else
			fuse_reply_ioctl(req, 0, NULL, 0);
		return;
	}
	if (cmd == VFIO_GROUP_GET_STATUS && ino) {
		/* A restricted FUSE ioctl: the argument is in the caller (pid is its thread). */
		struct vfio_group_status st;
		struct iovec local = { &st, sizeof(st) }, remote = { arg, sizeof(st) };
		pid_t pid = fuse_req_ctx(req)->pid;

		if (process_vm_readv(pid, &local, 1, &remote, 1, 0) != (ssize_t)sizeof(st) || st.argsz < sizeof(st)) {
			fuse_reply_err(req, EFAULT);
			return;
		}
		st.flags = VFIO_GROUP_FLAGS_VIABLE;
		if (process_vm_writev(pid, &local, 1, &remote, 1, 0) != (ssize_t)sizeof(st)) {
			fuse_reply_err(req, EFAULT);
			return;
		}
	}
	fuse_reply_ioctl(req, 0, NULL, 0);
}

static void null_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	static const char zeros[4096];

	(void)ino; (void)off; (void)fi;
	fuse_reply_buf(req, zeros, size < sizeof(zeros) ? size : sizeof(zeros));
}

static void null_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	(void)ino; (void)buf; (void)fi;
	if (off == NULL_SERVER_SIGNAL_OFFSET && signal_efd >= 0 && eventfd_write(signal_efd, 1)) {
		fuse_reply_err(req, errno);
		return;
	}
	fuse_reply_write(req, size);
}

static void null_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ino != NODE_INO && ino != FUSE_ROOT_ID && ino != 0) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	fi->direct_io = 1;
	fi->nonseekable = ino == 0; /* CUSE only: pread at an offset reaches the FUSE file */
	fuse_reply_open(req, fi);
}

static void null_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino; (void)fi;
	fuse_reply_err(req, 0);
}

/* -- FUSE: a root directory holding "node" ----------------------------------------- */
static void fill(fuse_ino_t ino, struct stat *st)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_mode = ino == FUSE_ROOT_ID ? S_IFDIR | 0755 : S_IFREG | 0666;
	st->st_nlink = ino == FUSE_ROOT_ID ? 2 : 1;
}

static void null_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;

	if (parent != FUSE_ROOT_ID || strcmp(name, "node")) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	memset(&e, 0, sizeof(e));
	e.ino = NODE_INO;
	e.attr_timeout = e.entry_timeout = 3600.0;
	fill(NODE_INO, &e.attr);
	fuse_reply_entry(req, &e);
}

static void null_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;

	(void)fi;
	if (ino != FUSE_ROOT_ID && ino != NODE_INO) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	fill(ino, &st);
	fuse_reply_attr(req, &st, 3600.0);
}

static int serve_fuse(const char *argv0, const char *mountpoint)
{
	static const struct fuse_lowlevel_ops ops = {
		.lookup = null_lookup, .getattr = null_getattr, .open = null_open,
		.release = null_release, .ioctl = null_ioctl, .read = null_read, .write = null_write,
	};
	char *args_v[] = { (char *)argv0, "-o", "allow_other,default_permissions,fsname=null-server", NULL };
	struct fuse_args args = FUSE_ARGS_INIT(3, args_v);
	struct fuse_session *se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
	int rc = 1;

	if (!se)
		return 1;
	if (fuse_set_signal_handlers(se) == 0) {
		if (fuse_session_mount(se, mountpoint) == 0) {
			rc = fuse_session_loop(se) ? 1 : 0;
			fuse_session_unmount(se);
		}
		fuse_remove_signal_handlers(se);
	}
	fuse_session_destroy(se);
	return rc;
}

/* -- CUSE: one character device, unrestricted ioctls answered at once ---------------- */
static void cuse_open(fuse_req_t req, struct fuse_file_info *fi)
{
	null_open(req, 0, fi);
}

static void cuse_release(fuse_req_t req, struct fuse_file_info *fi)
{
	null_release(req, 0, fi);
}

static void cuse_ioctl(fuse_req_t req, int cmd, void *arg, struct fuse_file_info *fi, unsigned flags,
		       const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{
	struct vfio_group_status st;
	struct iovec iov = { arg, sizeof(st) };

	if ((unsigned int)cmd != VFIO_GROUP_GET_STATUS) {
		null_ioctl(req, 0, (unsigned int)cmd, arg, fi, flags, in_buf, in_bufsz, out_bufsz);
		return;
	}
	if (in_bufsz == 0) {
		fuse_reply_ioctl_retry(req, &iov, 1, &iov, 1);
		return;
	}
	if (in_bufsz < sizeof(st) || out_bufsz < sizeof(st)) {
		fuse_reply_err(req, EFAULT);
		return;
	}
	memcpy(&st, in_buf, sizeof(st));
	if (st.argsz < sizeof(st)) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	st.flags = VFIO_GROUP_FLAGS_VIABLE;
	fuse_reply_ioctl(req, 0, &st, sizeof(st));
}

static int serve_cuse(const char *argv0, const char *name)
{
	static const struct cuse_lowlevel_ops ops = {
		.open = cuse_open, .release = cuse_release, .ioctl = cuse_ioctl,
	};
	char devname[256];
	const char *dev_info[] = { devname };
	struct cuse_info ci = { .dev_info_argc = 1, .dev_info_argv = dev_info, .flags = CUSE_UNRESTRICTED_IOCTL };
	char *args_v[] = { (char *)argv0, "-f", "-s", NULL };

	snprintf(devname, sizeof(devname), "DEVNAME=%s", name);
	return cuse_lowlevel_main(3, args_v, &ci, &ops, NULL);
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "fuse"))
		return serve_fuse(argv[0], argv[2]);
	if (argc == 3 && !strcmp(argv[1], "cuse"))
		return serve_cuse(argv[0], argv[2]);
	fprintf(stderr, "usage: %s fuse MOUNTPOINT | cuse NAME\n", argv[0]);
	return 2;
}
