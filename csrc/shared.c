/*
 * cuse-vfio shared windows: see shared.h.
 *
 * The guard: a thread about to touch a window sets cv_guard_jump (its own,
 * thread-local) to a jump buffer; the SIGBUS handler, finding one set, jumps
 * back out of the copy.  The jump leaves SIGBUS blocked (the buffer does not
 * keep the signal mask: saving it would cost a syscall a copy), so the copy
 * that caught one unblocks it again.  A SIGBUS with no guarded copy under way
 * on its thread goes to the handler that was there before ours; with none, it
 * does what it would have done without us (the default action: the process
 * dies with a core).
 */
#define _GNU_SOURCE
#include "shared.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

static __thread sigjmp_buf *cv_guard_jump __attribute__((tls_model("initial-exec")));
static pthread_mutex_t cv_guard_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction cv_guard_previous;   /* the handler ours replaced: set before ours is */

static void cv_guard_handler(int sig, siginfo_t *info, void *context)
{
	sigjmp_buf *jump = cv_guard_jump;
	struct sigaction previous = cv_guard_previous;

	if (jump) {
		cv_guard_jump = NULL;
		siglongjmp(*jump, 1);
	}
	if (previous.sa_flags & SA_SIGINFO) {
		previous.sa_sigaction(sig, info, context);
		return;
	}
	if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
		previous.sa_handler(sig);
		return;
	}
	if (previous.sa_handler == SIG_IGN && info->si_code <= 0)
		return;   /* a SIGBUS someone sent, which the process ignored */
	/* The default action: a fault happens again once the handler returns, a sent one is raised
	 * (pending while the handler runs, delivered as it returns). */
	signal(SIGBUS, SIG_DFL);
	if (info->si_code <= 0)
		raise(SIGBUS);
}

int cv_shared_guard(void)
{
	struct sigaction now, ours;
	int err = 0;

	pthread_mutex_lock(&cv_guard_lock);
	if (sigaction(SIGBUS, NULL, &now)) {
		err = -errno;
	} else if (!(now.sa_flags & SA_SIGINFO) || now.sa_sigaction != cv_guard_handler) {
		memset(&ours, 0, sizeof(ours));
		ours.sa_sigaction = cv_guard_handler;
		ours.sa_flags = SA_SIGINFO | SA_ONSTACK;
		sigemptyset(&ours.sa_mask);
		cv_guard_previous = now;
		if (sigaction(SIGBUS, &ours, NULL))
			err = -errno;
	}
	pthread_mutex_unlock(&cv_guard_lock);
	return err;
}

/* After a jump out of the handler: SIGBUS is still blocked on this thread (see above). */
static void cv_guard_caught(void)
{
	sigset_t bus;

	cv_guard_jump = NULL;
	sigemptyset(&bus);
	sigaddset(&bus, SIGBUS);
	pthread_sigmask(SIG_UNBLOCK, &bus, NULL);
}

long cv_shared_copy(void *dst, const void *src, size_t len)
{
	sigjmp_buf jump;

	if (sigsetjmp(jump, 0)) {
		cv_guard_caught();
		return -EFAULT;
	}
	cv_guard_jump = &jump;
	__atomic_signal_fence(__ATOMIC_SEQ_CST);   /* set before a byte is touched */
	memcpy(dst, src, len);
	__atomic_signal_fence(__ATOMIC_SEQ_CST);
	cv_guard_jump = NULL;
	return (long)len;
}

long cv_shared_copy_list(char *local, char *base, uint64_t origin, uint64_t limit, const uint64_t *segs,
			 size_t nsegs, int to_window)
{
	sigjmp_buf jump;
	volatile size_t moved = 0;   /* read after the jump: what the pieces before the failing one moved */
	size_t i;

	for (i = 0; i < nsegs; i++) {
		uint64_t at = segs[2 * i] - origin, len = segs[2 * i + 1];

		if (segs[2 * i] < origin || at > limit || len > limit - at)
			return -ERANGE;
	}
	if (sigsetjmp(jump, 0)) {
		cv_guard_caught();
		return (long)moved;
	}
	cv_guard_jump = &jump;
	__atomic_signal_fence(__ATOMIC_SEQ_CST);
	for (i = 0; i < nsegs; i++) {
		char *window = base + (segs[2 * i] - origin);
		size_t len = segs[2 * i + 1];

		if (to_window)
			memcpy(window, local + moved, len);
		else
			memcpy(local + moved, window, len);
		__atomic_signal_fence(__ATOMIC_SEQ_CST);
		moved += len;
	}
	cv_guard_jump = NULL;
	return (long)moved;
}

int cv_shared_open(int pid, uint64_t start, uint64_t end, uint32_t dev_major, uint32_t dev_minor,
		   uint64_t ino, int writable, const long *magics, int nmagics, long *magic)
{
	char path[96];
	struct statx stx;
	struct statfs sfs;
	int path_fd, fd, i, known = 0;

	/* O_PATH: the link is followed and nothing of the file's own is called (no open, no
	 * revalidation), whatever file system it is on. */
	snprintf(path, sizeof(path), "/proc/%d/map_files/%llx-%llx", pid, (unsigned long long)start,
		 (unsigned long long)end);
	path_fd = open(path, O_PATH | O_CLOEXEC);
	if (path_fd < 0)
		return -errno;
	/* The attributes the inode has cached, without asking its file system: is it the file the
	 * caller checked (the mapping may have changed since), and a regular one (not a device)? */
	if (statx(path_fd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_TYPE | STATX_INO, &stx)) {
		fd = -errno;
		goto out;
	}
	if (!S_ISREG(stx.stx_mode) || stx.stx_ino != ino || stx.stx_dev_major != dev_major ||
	    stx.stx_dev_minor != dev_minor) {
		fd = -ESTALE;
		goto out;
	}
	/* Only now, on a superblock the caller knows to be memory, the file system is asked. */
	if (fstatfs(path_fd, &sfs)) {
		fd = -errno;
		goto out;
	}
	*magic = (long)sfs.f_type;
	for (i = 0; i < nmagics; i++)
		known |= (long)sfs.f_type == magics[i];
	if (!known) {
		fd = -EMEDIUMTYPE;
		goto out;
	}
	snprintf(path, sizeof(path), "/proc/self/fd/%d", path_fd);
	fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
	if (fd < 0)
		fd = -errno;
out:
	close(path_fd);
	return fd;
}

void *cv_shared_reserve(size_t len, size_t align)
{
	char *area, *at;
	size_t span;

	if (!len || !align || (align & (align - 1)) || len > SIZE_MAX - align) {
		errno = EINVAL;
		return NULL;
	}
	/* Anything mmap gives is page-aligned: more than that needs room to move. */
	span = align > (size_t)sysconf(_SC_PAGESIZE) ? len + align : len;
	area = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (area == MAP_FAILED)
		return NULL;
	if (span == len)
		return area;
	at = (char *)(((uintptr_t)area + align - 1) & ~(uintptr_t)(align - 1));
	/* Only [at, at + len) stays: one mapping, not three, in the server's map count. */
	if (at > area)
		munmap(area, (size_t)(at - area));
	if (area + span > at + len)
		munmap(at + len, (size_t)(area + span - (at + len)));
	return at;
}

void *cv_shared_map(void *addr, size_t len, int writable, int fd, uint64_t offset)
{
	char *got = mmap(addr, len, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED | (addr ? MAP_FIXED : 0),
			 fd, (off_t)offset);
	int err;

	if (got == MAP_FAILED)
		return NULL;
	/* A child the server forks (and does not exec) must not keep the client's pages. */
	if (madvise(got, len, MADV_DONTFORK)) {
		err = errno;
		if (!addr)
			munmap(got, len);   /* (one in a reservation goes with it) */
		errno = err;
		return NULL;
	}
	return got;
}

int cv_shared_unmap(void *addr, size_t len)
{
	return munmap(addr, len) ? -errno : 0;
}
