/*
 * vfio-loop: every hot path of a VFIO client, against the C floor on the same transport.
 *
 *   vfio-loop N ROUNDS NULL_NODE CONTAINER GROUP BDF
 *
 * NULL_NODE is tests/bench/null-server.c's file; CONTAINER, GROUP and BDF are
 * cuse-vfio's nodes and its edu device (run under `cuse-vfio run`, whose
 * LD_PRELOAD library hands over the device fd).  Each operation runs N times
 * a round after a warm-up of N/10, rounds of the floor and of cuse-vfio
 * alternating, and prints the median round of each, one line per operation:
 *
 *   OP floor_ns=F vfio_ns=V
 *
 *   api       VFIO_GET_API_VERSION                   | a do-nothing ioctl
 *   status    VFIO_GROUP_GET_STATUS (8 bytes in, out)| an ioctl copying 8 bytes in and out
 *   cfg_read  pread of 4 bytes of config space       | pread of 4 bytes
 *   bar_write pwrite of edu's liveness register      | pwrite of 4 bytes
 *   map       MAP_DMA + UNMAP_DMA of 4 KiB           | two do-nothing ioctls
 *   map_full  the same with 65,534 other mappings    | two do-nothing ioctls
 *   msi       edu's raise-IRQ write, then its MSI    | a byte to another process, which
 *             eventfd polled and read                |   signals an eventfd polled and read
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/vfio.h>

#define MAX_ROUNDS 64
#define CONFIG_OFFSET ((uint64_t)VFIO_PCI_CONFIG_REGION_INDEX << 40)
#define EDU_LIVENESS 0x04
#define EDU_IRQ_RAISE 0x60
#define MAPPINGS 65535 /* type1's default dma_entry_limit */

static int null_fd, container, group, device, efd, floor_efd, floor_pipe;
static void *page;

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static double now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
	qsort(v, n, sizeof(v[0]), cmp);
	return v[n / 2];
}

/* -- the operations: 0 or -1 (errno set) ------------------------------------------ */
static int null_ioctl(void) { return ioctl(null_fd, VFIO_GET_API_VERSION) < 0 ? -1 : 0; }
static int api(void) { return ioctl(container, VFIO_GET_API_VERSION) < 0 ? -1 : 0; }

static int status_on(int fd)
{
	struct vfio_group_status st = { .argsz = sizeof(st) };
	return ioctl(fd, VFIO_GROUP_GET_STATUS, &st) || !(st.flags & VFIO_GROUP_FLAGS_VIABLE) ? -1 : 0;
}
static int null_status(void) { return status_on(null_fd); }
static int status(void) { return status_on(group); }

static int read4(int fd, uint64_t off)
{
	uint32_t v;
	return pread(fd, &v, 4, off) == 4 ? 0 : -1;
}
static int null_read(void) { return read4(null_fd, CONFIG_OFFSET); }
static int cfg_read(void) { return read4(device, CONFIG_OFFSET); }

static int write4(int fd, uint64_t off, uint32_t v) { return pwrite(fd, &v, 4, off) == 4 ? 0 : -1; }
static int null_write(void) { return write4(null_fd, EDU_LIVENESS, 1); }
static int bar_write(void) { return write4(device, EDU_LIVENESS, 1); }

static int null_two(void) { return null_ioctl() || null_ioctl() ? -1 : 0; }

static int map_at(uint64_t iova)
{
	struct vfio_iommu_type1_dma_map map = {
		.argsz = sizeof(map), .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)page, .iova = iova, .size = 4096,
	};
	return ioctl(container, VFIO_IOMMU_MAP_DMA, &map);
}

static int map_unmap(void)
{
	/* In the middle of the IOVA space the other mappings take (below 1 << 32). */
	uint64_t iova = (uint64_t)1 << 31;
	struct vfio_iommu_type1_dma_unmap unmap = { .argsz = sizeof(unmap), .iova = iova, .size = 4096 };

	if (map_at(iova))
		return -1;
	return ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap) || unmap.size != 4096 ? -1 : 0;
}

static int wait_eventfd(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	uint64_t n;

	if (poll(&p, 1, 5000) != 1)
		return -1;
	return read(fd, &n, 8) == 8 ? 0 : -1;
}

static int msi(void) { return write4(device, EDU_IRQ_RAISE, 1) || wait_eventfd(efd); }
static int null_msi(void) { return write(floor_pipe, "x", 1) != 1 || wait_eventfd(floor_efd); }

/* -- set-up ------------------------------------------------------------------------- */
static void open_vfio(const char *cpath, const char *gpath, const char *bdf)
{
	int type = VFIO_TYPE1v2_IOMMU;
	char buf[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
	struct vfio_irq_set *set = (struct vfio_irq_set *)buf;

	if ((container = open(cpath, O_RDWR)) < 0)
		die(cpath);
	if ((group = open(gpath, O_RDWR)) < 0)
		die(gpath);
	if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container))
		die("VFIO_GROUP_SET_CONTAINER");
	if (ioctl(container, VFIO_SET_IOMMU, type))
		die("VFIO_SET_IOMMU");
	if ((device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf)) < 0)
		die("VFIO_GROUP_GET_DEVICE_FD");
	/* MSI on one eventfd, non-blocking as QEMU's and DPDK's are. */
	if ((efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0)
		die("eventfd");
	set->argsz = sizeof(buf);
	set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
	set->index = VFIO_PCI_MSI_IRQ_INDEX;
	set->start = 0;
	set->count = 1;
	memcpy(set->data, &efd, sizeof(efd));
	if (ioctl(device, VFIO_DEVICE_SET_IRQS, set))
		die("VFIO_DEVICE_SET_IRQS (MSI)");
}

/* The floor's other process: each byte on the pipe is one eventfd signal. */
static void start_signaller(void)
{
	int p[2];
	char c;
	uint64_t one = 1;

	if ((floor_efd = eventfd(0, EFD_NONBLOCK)) < 0 || pipe(p))
		die("eventfd/pipe");
	switch (fork()) {
	case -1:
		die("fork");
	case 0:
		close(p[1]);
		while (read(p[0], &c, 1) == 1)
			if (write(floor_efd, &one, 8) != 8)
				_exit(1);
		_exit(0);
	}
	close(p[0]);
	floor_pipe = p[1];
}

/* -- measuring ---------------------------------------------------------------------- */
static double round_ns(int (*op)(void), long n, const char *what)
{
	double t0 = now_ns();
	for (long i = 0; i < n; i++)
		if (op()) {
			fprintf(stderr, "vfio-loop: %s: ", what);
			die("");
		}
	return (now_ns() - t0) / n;
}

static void measure(const char *name, int (*floor)(void), int (*op)(void), long n, int rounds)
{
	double f[MAX_ROUNDS], v[MAX_ROUNDS];

	round_ns(floor, n / 10 + 1, name);
	round_ns(op, n / 10 + 1, name);
	for (int r = 0; r < rounds; r++) {
		f[r] = round_ns(floor, n, name);
		v[r] = round_ns(op, n, name);
	}
	printf("%s floor_ns=%.0f vfio_ns=%.0f\n", name, median(f, rounds), median(v, rounds));
	fflush(stdout);
}

int main(int argc, char **argv)
{
	if (argc != 7) {
		fprintf(stderr, "usage: %s N ROUNDS NULL_NODE CONTAINER GROUP BDF\n", argv[0]);
		return 2;
	}
	long n = atol(argv[1]);
	int rounds = atoi(argv[2]);
	if (n < 10 || rounds < 1 || rounds > MAX_ROUNDS) {
		fprintf(stderr, "%s: N >= 10 and 1 <= ROUNDS <= %d\n", argv[0], MAX_ROUNDS);
		return 2;
	}
	if ((null_fd = open(argv[3], O_RDWR)) < 0)
		die(argv[3]);
	page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (page == MAP_FAILED)
		die("mmap");
	memset(page, 0, 4096);
	open_vfio(argv[4], argv[5], argv[6]);
	start_signaller();

	measure("api", null_ioctl, api, n, rounds);
	measure("status", null_status, status, n, rounds);
	measure("cfg_read", null_read, cfg_read, n, rounds);
	measure("bar_write", null_write, bar_write, n, rounds);
	measure("msi", null_msi, msi, n, rounds);
	measure("map", null_two, map_unmap, n / 4, rounds);
	/* 65,534 more mappings of the same page, 4 KiB apart below 1 << 31 (not timed). */
	for (uint64_t i = 0; i < MAPPINGS - 1; i++)
		if (map_at(0x10000000 + (i << 12)))
			die("MAP_DMA (filling the container)");
	measure("map_full", null_two, map_unmap, n / 4, rounds);
	close(floor_pipe);
	wait(NULL);
	return 0;
}
