/*
 * cuse-vfio shared windows: a client's DMA memory that is a shared file
 * (tmpfs, memfd, hugetlbfs) mapped into the server too, so a model's DMA is
 * a memcpy here instead of a copy through another process's memory.
 *
 * The server's mapping of a file the client controls can fault: the client
 * truncates the file, or a hugetlbfs page cannot be allocated, and the
 * access raises SIGBUS.  Every copy through a window is made under a guard:
 * a SIGBUS inside it ends the copy (the caller gets -EFAULT), and any other
 * SIGBUS goes to the handler that was there before, or kills the process as
 * it always would.
 *
 * Opening the file is careful too: it is named by /proc/PID/map_files, and
 * a file on a FUSE mount (whose daemon may never answer) must never be
 * opened, stat'ed or statfs'ed here.  cv_shared_open takes the device and
 * inode the caller expects (checked by the caller to be a tmpfs or
 * hugetlbfs superblock) and looks at the file with calls that never reach a
 * file system before it trusts it.
 *
 * Everything between the cffi-cdef markers is also the cdef of the Python
 * binding (cuse_vfio.memory._copier, with copier.h's).
 */
#ifndef CUSE_VFIO_SHARED_H
#define CUSE_VFIO_SHARED_H

#include <stddef.h>
#include <stdint.h>

/* cffi-cdef: begin */

/* Make sure the SIGBUS guard's handler is the process's (again, if something replaced it since;
 * what it replaces is chained to): 0 or -errno. */
int cv_shared_guard(void);
/* len bytes from src to dst under the guard: len, or -EFAULT when a page of either raised SIGBUS
 * (the bytes before it may have moved). */
long cv_shared_copy(void *dst, const void *src, size_t len);
/* nsegs pieces (address, length pairs) of the window of limit bytes at base, where address origin
 * is, in order, to local (to_window 0) or from it (to_window 1): the bytes moved up to the first
 * piece that raised SIGBUS (that piece may be partly moved); -ERANGE, and nothing moved, when some
 * piece is not all inside the window. */
long cv_shared_copy_list(char *local, char *base, uint64_t origin, uint64_t limit, const uint64_t *segs,
			 size_t nsegs, int to_window);
/* The file of the mapping [start, end) of process pid, opened read-only or read-write, if it is
 * the regular file (dev_major:dev_minor, ino) and its file system's magic is one of magics
 * (nmagics): an fd, -ESTALE when it is another file, -EMEDIUMTYPE another file system, or -errno.
 * *magic gets the file system's magic once it is known. */
int cv_shared_open(int pid, uint64_t start, uint64_t end, uint32_t dev_major, uint32_t dev_minor,
		   uint64_t ino, int writable, const long *magics, int nmagics, long *magic);
/* len bytes of address space reserved (no access, no memory), aligned to align: the address, or
 * NULL with errno. */
void *cv_shared_reserve(size_t len, size_t align);
/* len bytes of fd at offset mapped shared, at addr (inside a reservation) or where the kernel
 * likes (addr NULL), never inherited by a child: the address, or NULL with errno. */
void *cv_shared_map(void *addr, size_t len, int writable, int fd, uint64_t offset);
/* Unmap [addr, addr + len): 0 or -errno. */
int cv_shared_unmap(void *addr, size_t len);

/* cffi-cdef: end */

#endif
