/*
 * vfio-loop: every hot path of a VFIO client, against the C floor on the same transport.
 *
 *   vfio-loop N ROUNDS NULL_IOCTL NULL_RW CONTAINER GROUP BDF DMA_GROUP DMA_BDF
 *
 * NULL_IOCTL and NULL_RW are tests/bench/null-server.c's nodes on the
 * transport cuse-vfio's ioctls and its device files use (the same FUSE file,
 * or a CUSE device and a FUSE file); CONTAINER, GROUP and BDF are cuse-vfio's
 * nodes and its edu device, DMA_GROUP and DMA_BDF its dma-bench device
 * (tests/bench/dma_model.py), whose group joins the same container (run under
 * `cuse-vfio run`, whose LD_PRELOAD library hands over the device fds).  Each
 * operation runs N times a round after a warm-up of N/10 (the DMA commands
 * N/100 times), rounds of the floor and of cuse-vfio alternating, and prints
 * the median round of each, one line per operation:
 *
 *   OP floor_ns=F vfio_ns=V [bytes=B]
 *
 *   api       VFIO_GET_API_VERSION                   | a do-nothing ioctl
 *   status    VFIO_GROUP_GET_STATUS (8 bytes in, out)| an ioctl copying 8 bytes in and out
 *   cfg_read  pread of 4 bytes of config space       | pread of 4 bytes
 *   bar_write pwrite of edu's liveness register      | pwrite of 4 bytes
 *   map       MAP_DMA + UNMAP_DMA of 4 KiB           | two do-nothing ioctls
 *   map_full  the same with 65,534 other mappings    | two do-nothing ioctls
 *   msi       edu's raise-IRQ write, then its MSI    | a byte to another process, which
 *             eventfd polled and read                |   signals an eventfd polled and read
 *   intx      the same with INTx (MSI off); the ack  | the same as msi
 *             write and VFIO's INTx unmask after it  |
 *             are not timed                          |
 *   intx_cycle the whole of it: raise, eventfd, ack, | msi's, a null pwrite and a null ioctl
 *             unmask (VFIO_DEVICE_SET_IRQS)          |
 *   msi_fuse, the same as msi and intx, against the  | a pwrite of the raise-IRQ register to the
 *   intx_fuse same transport's floor                 |   null server (NULL_RW), which signals an
 *                                                    |   eventfd of the client's (fetched as
 *                                                    |   cuse-vfio fetches SET_IRQS's) before it
 *                                                    |   answers; the eventfd polled and read
 *   dma_*     one command of dma-bench: COUNT DMA    | the same copies of the client's buffer by
 *             copies of SIZE bytes of the client's   |   another process, process_vm_readv or
 *             buffer (MAP_DMA'd), read (memory to    |   _writev (a scatter list: one remote
 *             the model) or write, one transfer or   |   iovec an entry), on a byte on a pipe,
 *             a scatter list of 4 KiB entries        |   answered by a byte when done
 *   dma_*_shm the same on a second buffer, a shared   | the same on that buffer
 *             memfd (QEMU's memory-backend-memfd)    |
 *   (bytes=B: the bytes one command moves, for bandwidth)
 *
 * VFIO_LOOP_ONLY=PREFIX measures only the operations whose name starts with
 * PREFIX (to profile one path: the set-up still runs).
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
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/vfio.h>

#define MAX_ROUNDS 64
#define CONFIG_OFFSET ((uint64_t)VFIO_PCI_CONFIG_REGION_INDEX << 40)
#define EDU_LIVENESS 0x04
#define EDU_IRQ_RAISE 0x60
#define EDU_IRQ_ACK 0x64
#define MAPPINGS 65535 /* type1's default dma_entry_limit */
/* The null server's interrupt: its eventfd set by this ioctl (the same in tests/bench/null-server.c). */
#define NULL_SERVER_SET_EVENTFD _IO('N', 1)
/* dma-bench's registers (tests/bench/dma_model.py) */
#define DMA_IOVA_LO 0x00
#define DMA_IOVA_HI 0x04
#define DMA_SIZE 0x08
#define DMA_COUNT 0x0C
#define DMA_SEGMENT 0x10
#define DMA_GO 0x14
#define DMA_DONE 0x18
#define DMA_BUF_SIZE (1 << 20)
#define DMA_BUF_IOVA ((uint64_t)1 << 32) /* above what the other mappings take */
#define DMA_SHM_IOVA (DMA_BUF_IOVA + 2 * DMA_BUF_SIZE)
#define DMA_MAX_SEGMENTS (DMA_BUF_SIZE / 4096)

static int null_fd, null_rw_fd, container, group, device, efd, floor_efd, floor_pipe, fuse_efd;
static int dma_device, dma_cmd_pipe, dma_done_pipe;
static void *page, *dma_buf, *dma_shm;
/* Time an operation spent on what it does but is not measuring (the INTx ack and unmask). */
static double untimed_ns;
/* The DMA command now measured: what dma-bench is set to, and what the floor's process is sent. */
static struct dma_cmd {
	uint32_t write, size, count, segment, shared;
} dma_now;

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
static int null_read(void) { return read4(null_rw_fd, CONFIG_OFFSET); }
static int cfg_read(void) { return read4(device, CONFIG_OFFSET); }

static int write4(int fd, uint64_t off, uint32_t v) { return pwrite(fd, &v, 4, off) == 4 ? 0 : -1; }
static int null_write(void) { return write4(null_rw_fd, EDU_LIVENESS, 1); }
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
static int null_fuse_msi(void) { return write4(null_rw_fd, EDU_IRQ_RAISE, 1) || wait_eventfd(fuse_efd); }

/* What a client does after an INTx: the device's interrupt acknowledged (its
 * line lowered), then VFIO's automask lifted, as QEMU does without KVM. */
static int intx_ack_unmask(void)
{
	struct vfio_irq_set unmask = {
		.argsz = sizeof(unmask), .flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
		.index = VFIO_PCI_INTX_IRQ_INDEX, .start = 0, .count = 1,
	};
	return write4(device, EDU_IRQ_ACK, 1) || ioctl(device, VFIO_DEVICE_SET_IRQS, &unmask) ? -1 : 0;
}

static int intx(void)
{
	int rc = write4(device, EDU_IRQ_RAISE, 1) || wait_eventfd(efd);
	double t0 = now_ns();

	rc = rc || intx_ack_unmask();
	untimed_ns += now_ns() - t0;
	return rc;
}
static int intx_cycle(void) { return write4(device, EDU_IRQ_RAISE, 1) || wait_eventfd(efd) || intx_ack_unmask(); }
static int null_intx_cycle(void) { return null_msi() || null_write() || null_ioctl(); }

/* One command of dma-bench (dma_now); one command to the floor's process, answered when done. */
static int dma(void) { return write4(dma_device, DMA_GO, dma_now.write ? 2 : 1); }
static int null_dma(void)
{
	char c;
	return write(dma_cmd_pipe, &dma_now, sizeof(dma_now)) != sizeof(dma_now) || read(dma_done_pipe, &c, 1) != 1;
}

/* -- set-up ------------------------------------------------------------------------- */
static void set_irq(int index, int fd, const char *what)
{
	char buf[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
	struct vfio_irq_set *set = (struct vfio_irq_set *)buf;

	set->argsz = sizeof(buf);
	set->flags = VFIO_IRQ_SET_ACTION_TRIGGER | (fd < 0 ? VFIO_IRQ_SET_DATA_NONE : VFIO_IRQ_SET_DATA_EVENTFD);
	set->index = index;
	set->start = 0;
	set->count = fd < 0 ? 0 : 1;
	memcpy(set->data, &fd, sizeof(fd));
	if (ioctl(device, VFIO_DEVICE_SET_IRQS, set))
		die(what);
}

static void open_vfio(const char *cpath, const char *gpath, const char *bdf)
{
	int type = VFIO_TYPE1v2_IOMMU;

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
	set_irq(VFIO_PCI_MSI_IRQ_INDEX, efd, "VFIO_DEVICE_SET_IRQS (MSI)");
}

/* The client's DMA buffer: anonymous memory, or a shared memfd (as QEMU's guest RAM with
 * memory-backend-memfd), filled with 0x5a and mapped for DMA both ways at iova. */
static void *dma_buffer(int shared, uint64_t iova)
{
	struct vfio_iommu_type1_dma_map map = {
		.argsz = sizeof(map), .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.iova = iova, .size = DMA_BUF_SIZE,
	};
	int fd = -1;
	void *buf;

	if (shared && ((fd = memfd_create("dma-bench", MFD_CLOEXEC)) < 0 || ftruncate(fd, DMA_BUF_SIZE)))
		die("memfd_create");
	buf = mmap(NULL, DMA_BUF_SIZE, PROT_READ | PROT_WRITE, shared ? MAP_SHARED : MAP_PRIVATE | MAP_ANONYMOUS,
		   fd, 0);
	/* Not in the processes forked later (as QEMU and DPDK keep DMA memory): no copy-on-write
	 * sharing with them, so neither the floor's copies nor the model's ever break it. */
	if (buf == MAP_FAILED || madvise(buf, DMA_BUF_SIZE, MADV_DONTFORK))
		die("mmap");
	if (fd >= 0)
		close(fd);
	memset(buf, 0x5a, DMA_BUF_SIZE);
	map.vaddr = (uintptr_t)buf;
	if (ioctl(container, VFIO_IOMMU_MAP_DMA, &map))
		die("MAP_DMA (a DMA buffer)");
	return buf;
}

/* dma-bench: its group in the same container, memory decoding and bus mastering on,
 * and the client's two buffers mapped for DMA both ways. */
static void open_dma(const char *gpath, const char *bdf)
{
	uint16_t cmd = 0x0006; /* PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER */
	int g;

	if ((g = open(gpath, O_RDWR)) < 0)
		die(gpath);
	if (ioctl(g, VFIO_GROUP_SET_CONTAINER, &container))
		die("VFIO_GROUP_SET_CONTAINER (dma-bench)");
	if ((dma_device = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, bdf)) < 0)
		die("VFIO_GROUP_GET_DEVICE_FD (dma-bench)");
	if (pwrite(dma_device, &cmd, 2, CONFIG_OFFSET + 4) != 2)
		die("enabling dma-bench's bus mastering");
	dma_buf = dma_buffer(0, DMA_BUF_IOVA);
	dma_shm = dma_buffer(1, DMA_SHM_IOVA);
}

static void unmap_dma_buf(uint64_t iova)
{
	struct vfio_iommu_type1_dma_unmap unmap = { .argsz = sizeof(unmap), .iova = iova, .size = DMA_BUF_SIZE };

	if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap) || unmap.size != DMA_BUF_SIZE)
		die("UNMAP_DMA (a DMA buffer)");
}

/* The DMA floor's other process: each command on the pipe is COUNT copies of the client's
 * buffer with process_vm_readv/writev (one remote iovec a scatter-list entry), then a byte back. */
static void start_dma_floor(void)
{
	int cmd[2], done[2];
	pid_t client = getpid();

	if (pipe(cmd) || pipe(done))
		die("pipe");
	switch (fork()) {
	case -1:
		die("fork");
	case 0: {
		static struct iovec remote[DMA_MAX_SEGMENTS];
		struct dma_cmd c;
		/* Page-aligned (a malloc'd buffer 16 bytes past a page start makes readv here about
		 * 4x slower: the kernel's copy into it is misaligned). */
		char *local = mmap(NULL, DMA_BUF_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		close(cmd[1]);
		close(done[0]);
		if (local == MAP_FAILED)
			_exit(1);
		memset(local, 0xa5, DMA_BUF_SIZE);
		while (read(cmd[0], &c, sizeof(c)) == sizeof(c)) {
			uint32_t seg = c.segment ? c.segment : c.size, n = 0;
			struct iovec l = { local, c.size };

			for (uint32_t pos = 0; pos < c.size && n < DMA_MAX_SEGMENTS; pos += seg, n++) {
				remote[n].iov_base = (char *)(c.shared ? dma_shm : dma_buf) + pos;
				remote[n].iov_len = c.size - pos < seg ? c.size - pos : seg;
			}
			for (uint32_t i = 0; i < c.count; i++)
				if ((c.write ? process_vm_writev(client, &l, 1, remote, n, 0)
					     : process_vm_readv(client, &l, 1, remote, n, 0)) != (ssize_t)c.size)
					_exit(1);
			if (write(done[1], "x", 1) != 1)
				_exit(1);
		}
		_exit(0);
	}
	}
	close(cmd[0]);
	close(done[1]);
	dma_cmd_pipe = cmd[1];
	dma_done_pipe = done[0];
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
	untimed_ns = 0;
	for (long i = 0; i < n; i++)
		if (op()) {
			fprintf(stderr, "vfio-loop: %s: ", what);
			die("");
		}
	return (now_ns() - t0 - untimed_ns) / n;
}

static int wanted(const char *name)
{
	const char *only = getenv("VFIO_LOOP_ONLY");
	return !only || !strncmp(name, only, strlen(only));
}

static void measure(const char *name, int (*floor)(void), int (*op)(void), long n, int rounds)
{
	double f[MAX_ROUNDS], v[MAX_ROUNDS];

	if (!wanted(name))
		return;
	round_ns(floor, n / 10 + 1, name);
	round_ns(op, n / 10 + 1, name);
	for (int r = 0; r < rounds; r++) {
		f[r] = round_ns(floor, n, name);
		v[r] = round_ns(op, n, name);
	}
	printf("%s floor_ns=%.0f vfio_ns=%.0f", name, median(f, rounds), median(v, rounds));
	if (!strncmp(name, "dma_", 4))
		printf(" bytes=%llu", (unsigned long long)dma_now.size * dma_now.count);
	printf("\n");
	fflush(stdout);
}

/* One DMA line: dma-bench set to COUNT copies of SIZE (SEGMENT: scatter-list entries) of the
 * anonymous buffer or (shared) the memfd one, the copies it completed checked against those asked for. */
static void measure_dma(const char *name, int write, uint32_t size, uint32_t count, uint32_t segment,
			int shared, long n, int rounds)
{
	uint64_t iova = shared ? DMA_SHM_IOVA : DMA_BUF_IOVA;
	uint32_t before, after;

	if (!wanted(name))
		return;
	dma_now = (struct dma_cmd){ .write = write, .size = size, .count = count, .segment = segment, .shared = shared };
	if (write4(dma_device, DMA_IOVA_LO, (uint32_t)iova) || write4(dma_device, DMA_IOVA_HI, iova >> 32) ||
	    write4(dma_device, DMA_SIZE, size) || write4(dma_device, DMA_COUNT, count) ||
	    write4(dma_device, DMA_SEGMENT, segment) || pread(dma_device, &before, 4, DMA_DONE) != 4)
		die("setting dma-bench up");
	measure(name, null_dma, dma, n, rounds);
	if (pread(dma_device, &after, 4, DMA_DONE) != 4)
		die("reading dma-bench's DONE");
	if (after - before != (uint32_t)(count * (n / 10 + 1 + n * rounds))) {
		fprintf(stderr, "vfio-loop: %s: dma-bench completed %u of %ld copies (the IOMMU refused some)\n",
			name, after - before, count * (n / 10 + 1 + n * rounds));
		exit(1);
	}
}

int main(int argc, char **argv)
{
	if (argc != 10) {
		fprintf(stderr, "usage: %s N ROUNDS NULL_IOCTL NULL_RW CONTAINER GROUP BDF DMA_GROUP DMA_BDF\n", argv[0]);
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
	if ((null_rw_fd = open(argv[4], O_RDWR)) < 0)
		die(argv[4]);
	page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (page == MAP_FAILED)
		die("mmap");
	memset(page, 0, 4096);
	open_vfio(argv[5], argv[6], argv[7]);
	open_dma(argv[8], argv[9]);
	start_signaller();
	start_dma_floor();
	if ((fuse_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0)
		die("eventfd");
	if (ioctl(null_rw_fd, NULL_SERVER_SET_EVENTFD, fuse_efd))
		die("NULL_SERVER_SET_EVENTFD");

	measure("api", null_ioctl, api, n, rounds);
	measure("status", null_status, status, n, rounds);
	measure("cfg_read", null_read, cfg_read, n, rounds);
	measure("bar_write", null_write, bar_write, n, rounds);
	measure("msi", null_msi, msi, n, rounds);
	measure("msi_fuse", null_fuse_msi, msi, n, rounds);
	set_irq(VFIO_PCI_MSI_IRQ_INDEX, -1, "VFIO_DEVICE_SET_IRQS (MSI off)");
	set_irq(VFIO_PCI_INTX_IRQ_INDEX, efd, "VFIO_DEVICE_SET_IRQS (INTx)");
	measure("intx", null_msi, intx, n, rounds);
	measure("intx_fuse", null_fuse_msi, intx, n, rounds);
	measure("intx_cycle", null_intx_cycle, intx_cycle, n, rounds);
	/* DMA: 1 MiB a command at 4 KiB a copy, 4 MiB at 1 MiB. */
	long nd = n / 100 > 5 ? n / 100 : 5;
	for (int shared = 0; shared < 2; shared++) {
		char name[32];
		static const struct { const char *name; int write; uint32_t size, count, segment; } lines[] = {
			{ "dma_read_4k", 0, 4096, 256, 0 },
			{ "dma_write_4k", 1, 4096, 256, 0 },
			{ "dma_read_1m", 0, DMA_BUF_SIZE, 4, 0 },
			{ "dma_write_1m", 1, DMA_BUF_SIZE, 4, 0 },
			{ "dma_readv_1m", 0, DMA_BUF_SIZE, 4, 4096 },
			{ "dma_writev_1m", 1, DMA_BUF_SIZE, 4, 4096 },
		};
		for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++) {
			snprintf(name, sizeof(name), "%s%s", lines[i].name, shared ? "_shm" : "");
			measure_dma(name, lines[i].write, lines[i].size, lines[i].count, lines[i].segment, shared,
				    nd, rounds);
		}
	}
	unmap_dma_buf(DMA_BUF_IOVA);
	unmap_dma_buf(DMA_SHM_IOVA);
	measure("map", null_two, map_unmap, n / 4, rounds);
	/* 65,534 more mappings of the same page, 4 KiB apart below 1 << 31 (not timed). */
	for (uint64_t i = 0; i < MAPPINGS - 1 && wanted("map_full"); i++)
		if (map_at(0x10000000 + (i << 12)))
			die("MAP_DMA (filling the container)");
	measure("map_full", null_two, map_unmap, n / 4, rounds);
	if (ioctl(null_rw_fd, NULL_SERVER_SET_EVENTFD, -1))
		die("NULL_SERVER_SET_EVENTFD (-1)");
	close(floor_pipe);
	close(dma_cmd_pipe);
	while (wait(NULL) > 0)
		;
	return 0;
}
