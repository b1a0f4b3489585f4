/*
 * cuse-vfio copier: see copier.h.  One lock guards the idle threads, the
 * thread count and the stalled counts; each copy's done word is a futex the
 * thread that asked waits on.  A stalled copy counts against its key (the
 * process) from cv_copy_stall until its syscall returns, whoever waits.
 *
 * A copy is a hand-off to another thread and back, so its cost is the two
 * context switches; neither side is woken while the other holds the lock
 * (on one CPU that would add two more switches: the woken thread runs, finds
 * the lock taken and gives the CPU back).  Copier structs are never freed
 * (a thread that exits leaves its struct in cv_spare for the next one), so a
 * copier may be signalled after the lock is dropped.
 */
#define _GNU_SOURCE
#include "copier.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define CV_COPY_KEYS 64      /* keys with stalled copies at once (past that, EAGAIN) */
#define CV_COPY_MAX_IDLE 8   /* idle threads kept; more exit */

struct cv_copy {
	int op, target, key;
	uint64_t *segs;      /* nsegs (address, length) pairs in the remote memory, in order */
	size_t nsegs;
	size_t len;          /* their lengths' sum: the bytes of buf */
	long result;         /* bytes moved or -errno, once done */
	int done;            /* a futex word: set (release) with cv_lock held, waited on without it */
	int abandoned;
	int stalled;         /* counted in cv_stalled_total */
	int charged;         /* counted in key's slot too */
	struct cv_copier *copier;
	char buf[];          /* the only memory the syscall touches on our side */
};

struct cv_copier {
	pthread_cond_t cond; /* a copy was given */
	struct cv_copy *copy;
	struct cv_copier *next_idle;
};

static pthread_mutex_t cv_lock = PTHREAD_MUTEX_INITIALIZER;
static struct cv_copier *cv_idle;
static struct cv_copier *cv_spare;   /* of threads that exited: never freed, reused */
static int cv_idle_count;
static int cv_threads;
static struct { int key, count; } cv_stalled[CV_COPY_KEYS];
static int cv_stalled_total;

static int *cv_stalled_slot(int key, int make)
{
	int i, free_slot = -1;

	for (i = 0; i < CV_COPY_KEYS; i++) {
		if (cv_stalled[i].count && cv_stalled[i].key == key)
			return &cv_stalled[i].count;
		if (!cv_stalled[i].count && free_slot < 0)
			free_slot = i;
	}
	if (!make || free_slot < 0)
		return NULL;
	cv_stalled[free_slot].key = key;
	return &cv_stalled[free_slot].count;
}

static ssize_t cv_copy_one(struct cv_copy *c, char *local, uint64_t remote, size_t len)
{
	struct iovec l = { local, len }, r = { (void *)(uintptr_t)remote, len };

	switch (c->op) {
	case CV_COPY_READV:
		return process_vm_readv(c->target, &l, 1, &r, 1, 0);
	case CV_COPY_WRITEV:
		return process_vm_writev(c->target, &l, 1, &r, 1, 0);
	case CV_COPY_PREAD:
		return pread(c->target, local, len, (off_t)remote);
	case CV_COPY_PWRITE:
		return pwrite(c->target, local, len, (off_t)remote);
	default:
		errno = EINVAL;
		return -1;
	}
}

/* The pieces in order, up to the first that fails or moves less: the bytes moved, or -errno
 * if the first moved nothing. */
static long cv_copy_run(struct cv_copy *c)
{
	size_t i, moved = 0;

	for (i = 0; i < c->nsegs; i++) {
		size_t len = c->segs[2 * i + 1];
		ssize_t n = cv_copy_one(c, c->buf + moved, c->segs[2 * i], len);

		if (n < 0)
			return moved ? (long)moved : -errno;
		moved += (size_t)n;
		if ((size_t)n < len)
			break;
	}
	return (long)moved;
}

static void cv_copy_free(struct cv_copy *c)
{
	free(c);
}

static void cv_futex_wake(int *word)
{
	syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static void *cv_copier_main(void *arg)
{
	struct cv_copier *self = arg;

	pthread_mutex_lock(&cv_lock);
	for (;;) {
		struct cv_copy *c;
		long result;

		while (!self->copy)
			pthread_cond_wait(&self->cond, &cv_lock);
		c = self->copy;
		pthread_mutex_unlock(&cv_lock);
		result = cv_copy_run(c);
		pthread_mutex_lock(&cv_lock);
		self->copy = NULL;
		if (c->stalled)
			cv_stalled_total--;
		if (c->charged) {
			int *stalled = cv_stalled_slot(c->key, 0);

			if (stalled)
				(*stalled)--;
		}
		if (c->abandoned) {
			cv_copy_free(c);
			c = NULL;
		} else {
			c->result = result;
			__atomic_store_n(&c->done, 1, __ATOMIC_RELEASE);
		}
		if (cv_idle_count >= CV_COPY_MAX_IDLE) {
			cv_threads--;
			self->next_idle = cv_spare;   /* its condition stays valid: see cv_copy_start */
			cv_spare = self;
			pthread_mutex_unlock(&cv_lock);
			if (c)
				cv_futex_wake(&c->done);
			return NULL;
		}
		self->next_idle = cv_idle;
		cv_idle = self;
		cv_idle_count++;
		if (c) {
			/* Woken without the lock held, so the waiter does not wake into a
			 * held lock and give the CPU straight back.  c may be freed by now
			 * (its waiter saw done): a private futex wake only names the address. */
			pthread_mutex_unlock(&cv_lock);
			cv_futex_wake(&c->done);
			pthread_mutex_lock(&cv_lock);
		}
	}
}

/* An idle copier, or a new one; cv_lock held. */
static struct cv_copier *cv_copier_get(void)
{
	struct cv_copier *t = cv_idle;
	pthread_attr_t attr;
	pthread_t thread;
	sigset_t all, old;
	int rc;

	if (t) {
		cv_idle = t->next_idle;
		cv_idle_count--;
		return t;
	}
	if (cv_threads >= CV_COPY_MAX_THREADS) {
		errno = EAGAIN;
		return NULL;
	}
	if (cv_spare) {
		t = cv_spare;
		cv_spare = t->next_idle;
	} else {
		t = calloc(1, sizeof(*t));
		if (!t) {
			errno = ENOMEM;
			return NULL;
		}
		pthread_cond_init(&t->cond, NULL);
	}
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&attr, 64 * 1024);
	/* Signals are the serving threads' business, never a copier's. */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	rc = pthread_create(&thread, &attr, cv_copier_main, t);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
	if (rc) {
		t->next_idle = cv_spare;
		cv_spare = t;
		errno = rc;
		return NULL;
	}
	cv_threads++;
	return t;
}

struct cv_copy *cv_copy_start(int op, int target, uint64_t remote, const void *src, size_t len, int key)
{
	uint64_t seg[2] = { remote, len };

	return cv_copy_start_list(op, target, seg, 1, src, len, key);
}

struct cv_copy *cv_copy_start_list(int op, int target, const uint64_t *segs, size_t nsegs,
				   const void *src, size_t len, int key)
{
	struct cv_copy *c;
	struct cv_copier *t;
	size_t i, sum = 0, at = (len + 7) & ~(size_t)7;
	int *stalled;

	for (i = 0; i < nsegs; i++)
		sum += segs[2 * i + 1];
	if (sum != len || nsegs > (SIZE_MAX - sizeof(*c) - at) / (2 * sizeof(uint64_t))) {
		errno = EINVAL;
		return NULL;
	}
	c = malloc(sizeof(*c) + at + nsegs * 2 * sizeof(uint64_t));
	if (!c) {
		errno = ENOMEM;
		return NULL;
	}
	c->op = op;
	c->target = target;
	c->key = key;
	c->segs = (uint64_t *)(void *)(c->buf + at);
	memcpy(c->segs, segs, nsegs * 2 * sizeof(uint64_t));
	c->nsegs = nsegs;
	c->len = len;
	c->result = 0;
	c->done = 0;
	c->abandoned = 0;
	c->stalled = 0;
	c->charged = 0;
	if (src && (op == CV_COPY_WRITEV || op == CV_COPY_PWRITE))
		memcpy(c->buf, src, len);

	pthread_mutex_lock(&cv_lock);
	if (key < 0 && cv_stalled_total) {
		pthread_mutex_unlock(&cv_lock);
		cv_copy_free(c);
		errno = ENOKEY;
		return NULL;
	}
	stalled = key < 0 ? NULL : cv_stalled_slot(key, 0);
	if (stalled && *stalled >= CV_COPY_MAX_STALLED) {
		pthread_mutex_unlock(&cv_lock);
		cv_copy_free(c);
		errno = EBUSY;
		return NULL;
	}
	t = cv_copier_get();
	if (!t) {
		int err = errno;

		pthread_mutex_unlock(&cv_lock);
		cv_copy_free(c);
		errno = err;
		return NULL;
	}
	c->copier = t;
	t->copy = c;
	pthread_mutex_unlock(&cv_lock);
	/* Signalled without the lock held, so the copier does not wake into a
	 * held lock; t outlives its thread (cv_spare), so this is safe even if
	 * the copy is already done and the thread gone. */
	pthread_cond_signal(&t->cond);
	return c;
}

long cv_copy_wait(struct cv_copy *c, int timeout_ms, void *dst)
{
	struct timespec now, deadline, left;
	long result;

	clock_gettime(CLOCK_MONOTONIC, &deadline);
	deadline.tv_sec += timeout_ms / 1000;
	deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (deadline.tv_nsec >= 1000000000L) {
		deadline.tv_sec++;
		deadline.tv_nsec -= 1000000000L;
	}
	while (!__atomic_load_n(&c->done, __ATOMIC_ACQUIRE)) {
		clock_gettime(CLOCK_MONOTONIC, &now);
		left.tv_sec = deadline.tv_sec - now.tv_sec;
		left.tv_nsec = deadline.tv_nsec - now.tv_nsec;
		if (left.tv_nsec < 0) {
			left.tv_sec--;
			left.tv_nsec += 1000000000L;
		}
		if (left.tv_sec < 0)
			return -ETIMEDOUT;   /* still running: the caller waits again or abandons it */
		/* Returns at once if done is no longer 0; a wake may be spurious. */
		syscall(SYS_futex, &c->done, FUTEX_WAIT_PRIVATE, 0, &left, NULL, 0);
	}
	result = c->result;
	if (result > 0 && dst && (c->op == CV_COPY_READV || c->op == CV_COPY_PREAD))
		memcpy(dst, c->buf, (size_t)result);
	cv_copy_free(c);
	return result;
}

/* Count a running copy as stalled, against key when key names a process; cv_lock held. */
static void cv_copy_stall_locked(struct cv_copy *c, int key)
{
	int *stalled;

	if (c->done || c->stalled)
		return;
	c->stalled = 1;
	cv_stalled_total++;
	stalled = key < 0 ? NULL : cv_stalled_slot(key, 1);
	if (stalled) {   /* NULL past CV_COPY_KEYS processes: counted in the total only */
		(*stalled)++;
		c->key = key;
		c->charged = 1;
	}
}

void cv_copy_stall(struct cv_copy *c, int key)
{
	pthread_mutex_lock(&cv_lock);
	cv_copy_stall_locked(c, key);
	pthread_mutex_unlock(&cv_lock);
}

void cv_copy_abandon(struct cv_copy *c)
{
	pthread_mutex_lock(&cv_lock);
	if (c->done) {
		pthread_mutex_unlock(&cv_lock);
		cv_copy_free(c);
		return;
	}
	cv_copy_stall_locked(c, c->key);
	c->abandoned = 1;
	pthread_mutex_unlock(&cv_lock);
}

int cv_copy_stalled(int key)
{
	int *stalled, n;

	pthread_mutex_lock(&cv_lock);
	if (key < 0) {
		n = cv_stalled_total;
	} else {
		stalled = cv_stalled_slot(key, 0);
		n = stalled ? *stalled : 0;
	}
	pthread_mutex_unlock(&cv_lock);
	return n;
}

int cv_copy_busy(void)
{
	int n;

	pthread_mutex_lock(&cv_lock);
	n = cv_threads - cv_idle_count;
	pthread_mutex_unlock(&cv_lock);
	return n;
}

/* -- inline copies and their guard (see copier.h) ---------------------------- */

/* One word says what the inline copy in flight is doing: its sequence number
 * above, its state in the low two bits.  The copying thread moves IDLE->BUSY
 * (a compare-and-swap: one inline copy at a time) and back; the guard moves
 * BUSY->STALLED, with cv_lock held, and only a word it saw BUSY a whole period
 * ago (the same sequence number: the same copy). */
enum { CV_INLINE_IDLE = 0, CV_INLINE_BUSY = 1, CV_INLINE_STALLED_STATE = 2 };

static int cv_inline_word;            /* a futex word: the guard sleeps on it when idle */
static int cv_inline_target;
static int cv_inline_owner;
static int cv_inline_key = -1;        /* the process a stalled inline copy is charged to */
static int cv_guard_running;
static int cv_guard_sleeping;

static ssize_t cv_inline_syscall(int op, int target, uint64_t remote, void *local, size_t len)
{
	struct iovec l = { local, len }, r = { (void *)(uintptr_t)remote, len };

	if (op == CV_COPY_READV)
		return process_vm_readv(target, &l, 1, &r, 1, 0);
	if (op == CV_COPY_WRITEV)
		return process_vm_writev(target, &l, 1, &r, 1, 0);
	errno = EINVAL;
	return -1;
}

long cv_inline_copy(int op, int target, uint64_t remote, void *local, size_t len, int owner)
{
	int word, busy, old;
	long result;
	ssize_t n;

	if (!__atomic_load_n(&cv_guard_running, __ATOMIC_ACQUIRE) ||
	    __atomic_load_n(&cv_stalled_total, __ATOMIC_ACQUIRE))
		return -ENOKEY;
	word = __atomic_load_n(&cv_inline_word, __ATOMIC_RELAXED);
	if ((word & 3) != CV_INLINE_IDLE)
		return -ENOKEY;   /* another thread's copy is in flight or stalled */
	busy = (word & ~3) + 4 + CV_INLINE_BUSY;
	if (!__atomic_compare_exchange_n(&cv_inline_word, &word, busy, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
		return -ENOKEY;
	__atomic_store_n(&cv_inline_target, target, __ATOMIC_RELAXED);
	__atomic_store_n(&cv_inline_owner, owner, __ATOMIC_RELAXED);
	if (__atomic_load_n(&cv_guard_sleeping, __ATOMIC_SEQ_CST)) {
		__atomic_store_n(&cv_guard_sleeping, 0, __ATOMIC_RELAXED);
		cv_futex_wake(&cv_inline_word);
	}
	n = cv_inline_syscall(op, target, remote, local, len);
	result = n < 0 ? -errno : (long)n;
	old = __atomic_exchange_n(&cv_inline_word, busy & ~3, __ATOMIC_SEQ_CST);
	if ((old & 3) != CV_INLINE_STALLED_STATE)
		return result;
	pthread_mutex_lock(&cv_lock);
	cv_stalled_total--;
	if (cv_inline_key >= 0) {
		int *stalled = cv_stalled_slot(cv_inline_key, 0);

		if (stalled)
			(*stalled)--;
	}
	cv_inline_key = -1;
	pthread_mutex_unlock(&cv_lock);
	return result + CV_INLINE_STALLED;
}

/* The thread group of thread tid (its process), or tid when /proc no longer knows it. */
static int cv_tgid_of(int tid)
{
	char path[64], buf[512], *at;
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/status", tid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd == -1)
		return tid;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return tid;
	buf[n] = 0;
	at = strstr(buf, "\nTgid:");
	return at ? atoi(at + 6) : tid;
}

/* Declare the copy of word w stalled: its owner, or 0 if it ended meanwhile. */
static int cv_guard_declare(int w)
{
	int owner = __atomic_load_n(&cv_inline_owner, __ATOMIC_RELAXED);
	int key = cv_tgid_of(__atomic_load_n(&cv_inline_target, __ATOMIC_RELAXED)), *stalled;

	pthread_mutex_lock(&cv_lock);
	if (!__atomic_compare_exchange_n(&cv_inline_word, &w, (w & ~3) | CV_INLINE_STALLED_STATE, 0,
					 __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
		pthread_mutex_unlock(&cv_lock);
		return 0;
	}
	cv_stalled_total++;
	stalled = cv_stalled_slot(key, 1);
	if (stalled) {   /* NULL past CV_COPY_KEYS processes: counted in the total only */
		(*stalled)++;
		cv_inline_key = key;
	}
	pthread_mutex_unlock(&cv_lock);
	return owner;
}

int cv_guard_watch(int period_ms)
{
	struct timespec period = { period_ms / 1000, (long)(period_ms % 1000) * 1000000L };
	int seen = -1, quiet = 0;

	__atomic_store_n(&cv_guard_running, 1, __ATOMIC_RELEASE);
	for (;;) {
		int w = __atomic_load_n(&cv_inline_word, __ATOMIC_SEQ_CST);

		if ((w & 3) == CV_INLINE_BUSY && w == seen) {
			int owner = cv_guard_declare(w);

			if (owner)
				return owner;
		}
		quiet = w == seen ? quiet + 1 : 0;
		seen = w;
		if (quiet > 40 && (w & 3) == CV_INLINE_IDLE) {
			/* Nothing copied inline for a while: sleep until the next copy starts.
			 * Either it sees cv_guard_sleeping and wakes us, or the word differs
			 * from w by then and the wait returns at once. */
			__atomic_store_n(&cv_guard_sleeping, 1, __ATOMIC_SEQ_CST);
			syscall(SYS_futex, &cv_inline_word, FUTEX_WAIT_PRIVATE, w, NULL, NULL, 0);
			__atomic_store_n(&cv_guard_sleeping, 0, __ATOMIC_SEQ_CST);
			quiet = 0;
			seen = -1;
			nanosleep(&period, NULL);
			continue;
		}
		nanosleep(&period, NULL);
	}
}
