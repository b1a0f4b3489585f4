/*
 * vfio-conformance: one VFIO client, two implementations.
 *
 *   vfio-conformance [GROUP [BDF [params]]]   (defaults: 2 0000:00:02.0)
 *
 * With "params" it also counts how many 4 KiB mappings the container still
 * takes before MAP_DMA fails (vfio_iommu_type1.dma_entry_limit); that run is
 * meant for a kernel (or a topology) that sets the module parameters.
 *
 * Drives the legacy container/group/device API of <linux/vfio.h> on QEMU's
 * "edu" device and prints one "name=value" line per observation, so that the
 * output of the real kernel (vfio-pci in a VM) and of cuse-vfio can be
 * compared line by line (tests/conformance/compare.py).
 *
 * Rules that keep the output comparable:
 *  - nothing that varies between runs is printed: no addresses, fd numbers,
 *    timings or pids;
 *  - a failed syscall prints "name=ERR:<ERRNO NAME>" and the run goes on, so
 *    one divergence does not hide the next one;
 *  - syscall results print as the decimal return value, flags/sizes/
 *    registers as hex.
 * Exit status: 0 when the run got to "done=1"; 2 when the container or the
 * group could not be opened (nothing could be observed).
 *
 * Written only against <linux/vfio.h> and libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/vfio.h>
#include <poll.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 0x1000UL

/* QEMU edu register map (docs/specs/edu.rst). */
#define EDU_ID          0x00
#define EDU_LIVENESS    0x04
#define EDU_FACTORIAL   0x08
#define EDU_STATUS      0x20
#define EDU_IRQ_STATUS  0x24
#define EDU_IRQ_RAISE   0x60
#define EDU_IRQ_ACK     0x64
#define EDU_DMA_SRC     0x80
#define EDU_DMA_DST     0x88
#define EDU_DMA_COUNT   0x90
#define EDU_DMA_CMD     0x98
#define EDU_DMA_BUF     0x40000
#define EDU_DMA_START   0x1
#define EDU_DMA_TO_RAM  0x2
/*
 * Bytes moved by each DMA.  QEMU 7.2's edu aborts the whole VM (hw_error)
 * when a transfer reaches the last byte of its 4 KiB buffer (its range check
 * wants end < buffer end), so stay well inside it.
 */
#define EDU_DMA_LEN     0x800

/* IOVAs used by the type1 and DMA steps (all below edu's 28-bit DMA mask). */
#define IOVA_A     0x100000UL
#define IOVA_B     0x200000UL
#define IOVA_VADDR 0x300000UL
#define IOVA_DMA   0x400000UL
#define IOVA_DIRTY 0x500000UL
#define IOVA_FREE  0x800000UL

#define UNKNOWN_VFIO_IOCTL _IO(VFIO_TYPE, VFIO_BASE + 50)

static struct {
	int container, container2, group, device;
	const char *group_id, *bdf;
	uint8_t *mem;          /* 64 anonymous pages for MAP_DMA */
	uint64_t bar0_off, config_off;
	uint8_t msi_cap;       /* offset of the MSI capability, 0 if none */
	int params;            /* argv "params": the module-parameter observations too */
} S = { -1, -1, -1, -1, NULL, NULL, NULL, 0, 0, 0, 0 };

/* ------------------------------------------------------------------ output */

static const char *errname(int e)
{
	static const struct { int e; const char *n; } tab[] = {
		{ EPERM, "EPERM" }, { ENOENT, "ENOENT" }, { ESRCH, "ESRCH" },
		{ EINTR, "EINTR" }, { EIO, "EIO" }, { ENXIO, "ENXIO" },
		{ E2BIG, "E2BIG" }, { EBADF, "EBADF" }, { EAGAIN, "EAGAIN" },
		{ ENOMEM, "ENOMEM" }, { EACCES, "EACCES" }, { EFAULT, "EFAULT" },
		{ EBUSY, "EBUSY" }, { EEXIST, "EEXIST" }, { EXDEV, "EXDEV" },
		{ ENODEV, "ENODEV" }, { ENOTDIR, "ENOTDIR" }, { EISDIR, "EISDIR" },
		{ EINVAL, "EINVAL" }, { ENFILE, "ENFILE" }, { EMFILE, "EMFILE" },
		{ ENOTTY, "ENOTTY" }, { EFBIG, "EFBIG" }, { ENOSPC, "ENOSPC" },
		{ ESPIPE, "ESPIPE" }, { EROFS, "EROFS" }, { EPIPE, "EPIPE" },
		{ ERANGE, "ERANGE" }, { EDEADLK, "EDEADLK" }, { ENOSYS, "ENOSYS" },
		{ EOVERFLOW, "EOVERFLOW" }, { EOPNOTSUPP, "EOPNOTSUPP" },
		{ EBADFD, "EBADFD" },
		{ ETIMEDOUT, "ETIMEDOUT" }, { ENOTCONN, "ENOTCONN" },
		{ ECONNREFUSED, "ECONNREFUSED" },
		{ ENOMSG, "ENOMSG" }, { ENODATA, "ENODATA" }, { EPROTO, "EPROTO" },
		{ ECANCELED, "ECANCELED" }, { ENOLINK, "ENOLINK" },
	};
	static char buf[16];
	for (size_t i = 0; i < sizeof(tab) / sizeof(tab[0]); i++)
		if (tab[i].e == e)
			return tab[i].n;
	snprintf(buf, sizeof(buf), "E%d", e);
	return buf;
}

static void vput(const char *name, const char *fmt, va_list ap)
{
	printf("%s=", name);
	vprintf(fmt, ap);
	putchar('\n');
}

/* put("a.b", "0x%x", v) prints "a.b=0x..." */
static void put(const char *name, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vput(name, fmt, ap);
	va_end(ap);
}

/* A name built with printf, valid until the 8th next call. */
static const char *nm(const char *fmt, ...)
{
	static char ring[8][96];
	static int next;
	char *b = ring[next++ % 8];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(b, sizeof(ring[0]), fmt, ap);
	va_end(ap);
	return b;
}

/* The result of a syscall: its decimal value, or ERR:<errno>. Returns rc. */
static long put_rc(const char *name, long rc, int err)
{
	if (rc < 0)
		put(name, "ERR:%s", errname(err));
	else
		put(name, "%ld", rc);
	return rc;
}

#define XIOCTL(name, fd, req, arg) \
	({ long _r = ioctl((fd), (req), (arg)); put_rc((name), _r, errno); })

static void put_hex(const char *name, uint64_t v)
{
	put(name, "0x%" PRIx64, v);
}

/* ------------------------------------------------------------- small tools */

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	nanosleep(&ts, NULL);
}

static int new_eventfd(void)
{
	return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

/* Waits up to ms for the eventfd; prints its counter or "none". */
static void put_event(const char *name, int efd, int ms)
{
	struct pollfd p = { .fd = efd, .events = POLLIN };
	uint64_t n = 0;
	int r = poll(&p, 1, ms);
	if (r < 0) {
		put(name, "ERR:%s", errname(errno));
		return;
	}
	if (r == 0) {
		put(name, "none");
		return;
	}
	if (read(efd, &n, sizeof(n)) != sizeof(n)) {
		put(name, "ERR:%s", errname(errno));
		return;
	}
	put(name, "%" PRIu64, n);
}

/* A page address that is certainly not mapped. */
static void *hole_page(void)
{
	void *p = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p != MAP_FAILED)
		munmap(p, PAGE);
	return p;
}

/* Region pread/pwrite of 1/2/4/8 bytes; prints value or errno when name. */
static int region_read(uint64_t off, void *v, size_t n)
{
	ssize_t r = pread(S.device, v, n, off);
	if (r == (ssize_t)n)
		return 0;
	if (r >= 0)
		errno = EIO;
	return -1;
}

static int region_write(uint64_t off, const void *v, size_t n)
{
	ssize_t r = pwrite(S.device, v, n, off);
	if (r == (ssize_t)n)
		return 0;
	if (r >= 0)
		errno = EIO;
	return -1;
}

static uint32_t cfg_read(unsigned off, size_t n)
{
	uint32_t v = 0;
	if (region_read(S.config_off + off, &v, n))
		return 0xffffffff;
	return v;
}

static int cfg_write(unsigned off, uint32_t v, size_t n)
{
	return region_write(S.config_off + off, &v, n);
}

static uint32_t bar0_read32(uint64_t reg)
{
	uint32_t v = 0;
	if (region_read(S.bar0_off + reg, &v, 4))
		return 0xffffffff;
	return v;
}

static int bar0_write32(uint64_t reg, uint32_t v)
{
	return region_write(S.bar0_off + reg, &v, 4);
}

static void put_bar0_read32(const char *name, uint64_t reg)
{
	uint32_t v = 0;
	if (region_read(S.bar0_off + reg, &v, 4))
		put(name, "ERR:%s", errname(errno));
	else
		put_hex(name, v);
}

static void put_bar0_write32(const char *name, uint64_t reg, uint32_t v)
{
	if (region_write(S.bar0_off + reg, &v, 4))
		put(name, "ERR:%s", errname(errno));
	else
		put(name, "ok");
}

/* Polls a BAR0 register until (value & mask) == 0, at most ~5 s. */
static void put_wait_clear(const char *name, uint64_t reg, uint32_t mask)
{
	for (int i = 0; i < 5000; i++) {
		uint32_t v = bar0_read32(reg);
		if (v == 0xffffffff) {
			put(name, "ERR:read");
			return;
		}
		if (!(v & mask)) {
			put(name, "done");
			return;
		}
		sleep_ms(1);
	}
	put(name, "timeout");
}

/* ------------------------------------------------------------- type1 tools */

static long map_dma(uint32_t argsz, uint32_t flags, const void *vaddr,
		    uint64_t iova, uint64_t size)
{
	struct vfio_iommu_type1_dma_map m = {
		.argsz = argsz, .flags = flags, .vaddr = (uintptr_t)vaddr,
		.iova = iova, .size = size,
	};
	return ioctl(S.container, VFIO_IOMMU_MAP_DMA, &m);
}

#define RW (VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE)

static void put_map(const char *name, uint32_t argsz, uint32_t flags,
		    const void *vaddr, uint64_t iova, uint64_t size)
{
	long r = map_dma(argsz, flags, vaddr, iova, size);
	put_rc(name, r, errno);
}

/* UNMAP_DMA; prints "<name>" (rc) and "<name>.size" (the size written back). */
static void put_unmap(const char *name, uint32_t argsz, uint32_t flags,
		      uint64_t iova, uint64_t size)
{
	struct vfio_iommu_type1_dma_unmap u = {
		.argsz = argsz, .flags = flags, .iova = iova, .size = size,
	};
	long r = ioctl(S.container, VFIO_IOMMU_UNMAP_DMA, &u);
	if (put_rc(name, r, errno) >= 0)
		put_hex(nm("%s.size", name), u.size);
}

/* Fills buf with the full GET_INFO answer; returns rc. */
static long type1_info(void *buf, size_t len)
{
	struct vfio_iommu_type1_info *info = buf;
	memset(buf, 0, len);
	info->argsz = len;
	return ioctl(S.container, VFIO_IOMMU_GET_INFO, buf);
}

/* Finds capability id in an info buffer; NULL if absent. */
static struct vfio_info_cap_header *find_cap(void *buf, size_t len, uint32_t first, uint16_t id)
{
	uint32_t off = first;
	for (int n = 0; off && n < 16; n++) {
		if (off + sizeof(struct vfio_info_cap_header) > len)
			return NULL;
		struct vfio_info_cap_header *h = (void *)((uint8_t *)buf + off);
		if (h->id == id)
			return h;
		off = h->next;
	}
	return NULL;
}

static void put_dma_avail(const char *name)
{
	uint64_t buf[512];
	struct vfio_iommu_type1_info *info = (void *)buf;
	if (type1_info(buf, sizeof(buf)) < 0) {
		put(name, "ERR:%s", errname(errno));
		return;
	}
	struct vfio_iommu_type1_info_dma_avail *a = (void *)find_cap(
		buf, sizeof(buf), (info->flags & VFIO_IOMMU_INFO_CAPS) ? info->cap_offset : 0,
		VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL);
	if (!a)
		put(name, "absent");
	else
		put(name, "%u", a->avail);
}

/* ------------------------------------------------------------- sysfs */

/* The first line of a sysfs file, or ERR:<errno>. */
static void put_sysfs(const char *name, const char *path)
{
	char buf[128];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		put(name, "ERR:%s", errname(errno));
		return;
	}
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	int err = errno;
	close(fd);
	if (n < 0) {
		put(name, "ERR:%s", errname(err));
		return;
	}
	buf[n] = 0;
	buf[strcspn(buf, "\n")] = 0;
	put(name, "%s", buf);
}

/* Bits MASK of the 16-bit register at OFF of the function's own config
 * space, as /sys/bus/pci/devices/BDF/config shows it. */
static void put_sysfs_config16(const char *name, unsigned off, uint16_t mask)
{
	uint16_t v;
	int fd = open(nm("/sys/bus/pci/devices/%s/config", S.bdf), O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		put(name, "ERR:%s", errname(errno));
		return;
	}
	ssize_t n = pread(fd, &v, sizeof(v), off);
	int err = errno;
	close(fd);
	if (n != sizeof(v))
		put(name, n < 0 ? "ERR:%s" : "short", errname(err));
	else
		put_hex(name, v & mask);
}

/* The module parameters as /sys/module/NAME/parameters/ shows them. */
static void module_params(void)
{
	static const char *const params[][2] = {
		{"vfio", "enable_unsafe_noiommu_mode"},
		{"vfio_iommu_type1", "allow_unsafe_interrupts"},
		{"vfio_iommu_type1", "disable_hugepages"},
		{"vfio_iommu_type1", "dma_entry_limit"},
		{"vfio_pci", "disable_denylist"},
		{"vfio_pci", "disable_idle_d3"},
		{"vfio_pci", "enable_sriov"},
		{"vfio_pci", "nointxmask"},
	};
	for (size_t i = 0; i < sizeof(params) / sizeof(params[0]); i++)
		put_sysfs(nm("module.%s.%s", params[i][0], params[i][1]),
			  nm("/sys/module/%s/parameters/%s", params[i][0], params[i][1]));
}

/* The function's PCI power state; after a close, vfio-pci's runtime
 * suspend is an asynchronous request, so give it a moment first. */
static void put_power_state(const char *name, int settle)
{
	if (settle)
		sleep_ms(200);
	put_sysfs(name, nm("/sys/bus/pci/devices/%s/power_state", S.bdf));
}

/* ------------------------------------------------------------- container */

static void check_extensions(int fd, const char *when)
{
	for (int ext = 0; ext <= 11; ext++)
		XIOCTL(nm("container.check_extension.%s.%d", when, ext), fd, VFIO_CHECK_EXTENSION, ext);
	XIOCTL(nm("container.check_extension.%s.0x7fffffff", when), fd, VFIO_CHECK_EXTENSION, 0x7fffffff);
}

/* Everything the container answers before any group is attached. */
static void container_initial(void)
{
	XIOCTL("container.api_version", S.container, VFIO_GET_API_VERSION, 0);
	check_extensions(S.container, "pre");
	XIOCTL("container.set_iommu.no_group", S.container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU);
	XIOCTL("container.unknown_ioctl.no_iommu", S.container, UNKNOWN_VFIO_IOCTL, 0);
	{
		struct vfio_iommu_type1_info info = { .argsz = sizeof(info) };
		XIOCTL("container.get_info.no_iommu", S.container, VFIO_IOMMU_GET_INFO, &info);
	}
	XIOCTL("container.non_vfio_ioctl", S.container, TCGETS, hole_page());

	S.container2 = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
	put_rc("container2.open", S.container2 < 0 ? -1 : 0, errno);
	XIOCTL("container2.api_version", S.container2, VFIO_GET_API_VERSION, 0);
	XIOCTL("container2.check_extension.3", S.container2, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU);
}

/* After SET_CONTAINER: SET_IOMMU and what changes with it. */
static void container_set_iommu(void)
{
	XIOCTL("container.set_iommu.bad_type", S.container, VFIO_SET_IOMMU, 0x7fff);
	XIOCTL("container.set_iommu.spapr", S.container, VFIO_SET_IOMMU, VFIO_SPAPR_TCE_IOMMU);
	XIOCTL("container.set_iommu.type1v2", S.container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU);
	XIOCTL("container.set_iommu.again", S.container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU);
	XIOCTL("container.set_iommu.again_type1", S.container, VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU);
	check_extensions(S.container, "post");
	XIOCTL("container.unknown_ioctl.iommu", S.container, UNKNOWN_VFIO_IOCTL, 0);
	XIOCTL("container.api_version.iommu", S.container, VFIO_GET_API_VERSION, 0);
	XIOCTL("container2.set_iommu.no_group", S.container2, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU);
}

/* ------------------------------------------------------------- group */

static void put_group_status(const char *name)
{
	struct vfio_group_status st = { .argsz = sizeof(st) };
	if (XIOCTL(name, S.group, VFIO_GROUP_GET_STATUS, &st) >= 0)
		put_hex(nm("%s.flags", name), st.flags);
}

/* Group rules before the container is set. */
static void group_initial(void)
{
	put_group_status("group.status.initial");
	for (unsigned a = 0; a < 8; a += (a == 0 ? 4 : 3)) {
		struct vfio_group_status st = { .argsz = a };
		XIOCTL(nm("group.status.argsz%u", a), S.group, VFIO_GROUP_GET_STATUS, &st);
	}
	{
		struct vfio_group_status st = { .argsz = 4096 };
		if (XIOCTL("group.status.argsz_large", S.group, VFIO_GROUP_GET_STATUS, &st) >= 0)
			put_hex("group.status.argsz_large.argsz", st.argsz);
	}
	XIOCTL("group.status.bad_pointer", S.group, VFIO_GROUP_GET_STATUS, hole_page());

	XIOCTL("group.unset_container.none", S.group, VFIO_GROUP_UNSET_CONTAINER, 0);
	XIOCTL("group.get_device_fd.no_container", S.group, VFIO_GROUP_GET_DEVICE_FD, S.bdf);

	int bad = -1;
	XIOCTL("group.set_container.minus1", S.group, VFIO_GROUP_SET_CONTAINER, &bad);
	bad = open("/dev/null", O_RDWR | O_CLOEXEC);
	XIOCTL("group.set_container.devnull", S.group, VFIO_GROUP_SET_CONTAINER, &bad);
	close(bad);
	bad = new_eventfd();
	XIOCTL("group.set_container.eventfd", S.group, VFIO_GROUP_SET_CONTAINER, &bad);
	close(bad);
	XIOCTL("group.set_container.bad_pointer", S.group, VFIO_GROUP_SET_CONTAINER, hole_page());
	put_group_status("group.status.after_failed_set");

	XIOCTL("group.set_container", S.group, VFIO_GROUP_SET_CONTAINER, &S.container);
	put_group_status("group.status.container_set");
	XIOCTL("group.set_container.twice", S.group, VFIO_GROUP_SET_CONTAINER, &S.container);
	XIOCTL("group.set_container.other", S.group, VFIO_GROUP_SET_CONTAINER, &S.container2);
	XIOCTL("group.get_device_fd.no_iommu", S.group, VFIO_GROUP_GET_DEVICE_FD, S.bdf);
}

/* Group rules once the IOMMU is set: getting the device fd. */
static void group_device(void)
{
	XIOCTL("group.get_device_fd.unknown_name", S.group, VFIO_GROUP_GET_DEVICE_FD, "0000:00:1f.7");
	XIOCTL("group.get_device_fd.empty_name", S.group, VFIO_GROUP_GET_DEVICE_FD, "");
	XIOCTL("group.get_device_fd.bad_pointer", S.group, VFIO_GROUP_GET_DEVICE_FD, hole_page());
	/* vfio-pci's match: "<bdf>", then spaces and at most one vf_token=<uuid>. */
	static const char *const suffixes[][2] = {
		{"trailing_space", " "}, {"trailing_spaces", "   "}, {"glued", "x"}, {"option", " foo"},
		{"vf_token", " vf_token=01234567-89ab-cdef-0123-456789abcdef"}, {"vf_token_short", " vf_token=zz"},
	};
	for (size_t i = 0; i < sizeof(suffixes) / sizeof(suffixes[0]); i++) {
		char name[128], key[96];
		snprintf(name, sizeof(name), "%s%s", S.bdf, suffixes[i][1]);
		snprintf(key, sizeof(key), "group.get_device_fd.name.%s", suffixes[i][0]);
		int fd = ioctl(S.group, VFIO_GROUP_GET_DEVICE_FD, name);
		put(key, fd < 0 ? "ERR:%s" : "ok", errname(errno));
		if (fd >= 0)
			close(fd);
	}
	S.device = ioctl(S.group, VFIO_GROUP_GET_DEVICE_FD, S.bdf);
	if (S.device < 0)
		put("group.get_device_fd", "ERR:%s", errname(errno));
	else
		put("group.get_device_fd", "ok");
	int fl = fcntl(S.device, F_GETFD);
	if (fl < 0)
		put("group.device_fd.cloexec", "ERR:%s", errname(errno));
	else
		put("group.device_fd.cloexec", "%d", !!(fl & FD_CLOEXEC));
	fl = fcntl(S.device, F_GETFL);
	if (fl < 0)
		put("group.device_fd.accmode", "ERR:%s", errname(errno));
	else
		put("group.device_fd.accmode", "%s", (fl & O_ACCMODE) == O_RDWR ? "O_RDWR" :
		    (fl & O_ACCMODE) == O_RDONLY ? "O_RDONLY" : "O_WRONLY");

	/* A second device fd of the same device. */
	int dev2 = ioctl(S.group, VFIO_GROUP_GET_DEVICE_FD, S.bdf);
	put("group.get_device_fd.second", dev2 < 0 ? "ERR:%s" : "ok", errname(errno));
	if (dev2 >= 0)
		close(dev2);

	XIOCTL("group.unset_container.device_open", S.group, VFIO_GROUP_UNSET_CONTAINER, 0);
	char path[64];
	snprintf(path, sizeof(path), "/dev/vfio/%s", S.group_id);
	int g2 = open(path, O_RDWR | O_CLOEXEC);
	put("group.open.second", g2 < 0 ? "ERR:%s" : "ok", errname(errno));
	if (g2 >= 0)
		close(g2);
	XIOCTL("group.unknown_ioctl", S.group, UNKNOWN_VFIO_IOCTL, 0);
	XIOCTL("group.container_ioctl_on_group", S.group, VFIO_GET_API_VERSION, 0);
	put_group_status("group.status.device_open");
}

/* ------------------------------------------------------------- type1 */

static void put_type1_caps(void *buf, size_t len, uint32_t first)
{
	uint32_t off = first;
	int n;
	for (n = 0; off && n < 16; n++) {
		if (off + sizeof(struct vfio_info_cap_header) > len) {
			put(nm("type1.cap.%d", n), "out_of_buffer");
			return;
		}
		struct vfio_info_cap_header *h = (void *)((uint8_t *)buf + off);
		put_hex(nm("type1.cap.%d.offset", n), off);
		put(nm("type1.cap.%d.id", n), "%u", h->id);
		put(nm("type1.cap.%d.version", n), "%u", h->version);
		if (h->id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
			struct vfio_iommu_type1_info_cap_iova_range *c = (void *)h;
			put(nm("type1.cap.%d.nr_iovas", n), "%u", c->nr_iovas);
			for (uint32_t i = 0; i < c->nr_iovas && i < 16; i++) {
				put_hex(nm("type1.cap.%d.iova.%u.start", n, i), c->iova_ranges[i].start);
				put_hex(nm("type1.cap.%d.iova.%u.end", n, i), c->iova_ranges[i].end);
			}
		} else if (h->id == VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION) {
			struct vfio_iommu_type1_info_cap_migration *c = (void *)h;
			put_hex(nm("type1.cap.%d.flags", n), c->flags);
			put_hex(nm("type1.cap.%d.pgsize_bitmap", n), c->pgsize_bitmap);
			put_hex(nm("type1.cap.%d.max_dirty_bitmap_size", n), c->max_dirty_bitmap_size);
		} else if (h->id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL) {
			struct vfio_iommu_type1_info_dma_avail *c = (void *)h;
			put(nm("type1.cap.%d.avail", n), "%u", c->avail);
		}
		off = h->next;
	}
	put("type1.cap.count", "%d", n);
}

static void type1_get_info(void)
{
	{
		struct vfio_iommu_type1_info info = { .argsz = 8 };
		XIOCTL("type1.get_info.argsz8", S.container, VFIO_IOMMU_GET_INFO, &info);
	}
	{
		struct vfio_iommu_type1_info info;
		memset(&info, 0xa5, sizeof(info));
		info.argsz = 16;
		if (XIOCTL("type1.get_info.argsz16", S.container, VFIO_IOMMU_GET_INFO, &info) >= 0) {
			put_hex("type1.get_info.argsz16.argsz", info.argsz);
			put_hex("type1.get_info.argsz16.flags", info.flags);
			put_hex("type1.get_info.argsz16.pgsizes", info.iova_pgsizes);
			put("type1.get_info.argsz16.cap_offset_untouched", "%s",
			    info.cap_offset == 0xa5a5a5a5 ? "yes" : "no");
		}
	}
	{
		struct vfio_iommu_type1_info info;
		memset(&info, 0xa5, sizeof(info));
		info.argsz = sizeof(info);
		if (XIOCTL("type1.get_info.sizeof", S.container, VFIO_IOMMU_GET_INFO, &info) >= 0) {
			put_hex("type1.get_info.sizeof.argsz", info.argsz);
			put_hex("type1.get_info.sizeof.flags", info.flags);
			put_hex("type1.get_info.sizeof.pgsizes", info.iova_pgsizes);
			put_hex("type1.get_info.sizeof.cap_offset", info.cap_offset);
		}
	}
	{
		uint64_t buf[512];
		struct vfio_iommu_type1_info *info = (void *)buf;
		long r = type1_info(buf, sizeof(buf));
		if (put_rc("type1.get_info.full", r, errno) >= 0) {
			put_hex("type1.get_info.full.argsz", info->argsz);
			put_hex("type1.get_info.full.flags", info->flags);
			put_hex("type1.get_info.full.pgsizes", info->iova_pgsizes);
			put_hex("type1.get_info.full.cap_offset", info->cap_offset);
			if (info->flags & VFIO_IOMMU_INFO_CAPS)
				put_type1_caps(buf, sizeof(buf), info->cap_offset);
		}
	}
}

static void type1_map(void)
{
	uint8_t *m = S.mem;
	const size_t sz = sizeof(struct vfio_iommu_type1_dma_map);

	put_dma_avail("type1.dma_avail.initial");
	put_map("type1.map.ok", sz, RW, m, IOVA_A, 4 * PAGE);
	put_dma_avail("type1.dma_avail.after_map1");
	put_map("type1.map.overlap_exact", sz, RW, m, IOVA_A, 4 * PAGE);
	put_map("type1.map.overlap_head", sz, RW, m + 8 * PAGE, IOVA_A - PAGE, 2 * PAGE);
	put_map("type1.map.overlap_tail", sz, RW, m + 8 * PAGE, IOVA_A + 3 * PAGE, 2 * PAGE);
	put_map("type1.map.overlap_inside", sz, RW, m + 8 * PAGE, IOVA_A + PAGE, PAGE);
	put_map("type1.map.overlap_around", sz, RW, m + 8 * PAGE, IOVA_A - PAGE, 6 * PAGE);
	put_map("type1.map.unaligned_iova", sz, RW, m + 8 * PAGE, IOVA_FREE + 0x800, PAGE);
	put_map("type1.map.unaligned_size", sz, RW, m + 8 * PAGE, IOVA_FREE, 0x800);
	put_map("type1.map.unaligned_vaddr", sz, RW, m + 8 * PAGE + 0x800, IOVA_FREE, PAGE);
	put_map("type1.map.size0", sz, RW, m + 8 * PAGE, IOVA_FREE, 0);
	put_map("type1.map.no_rw_flags", sz, 0, m + 8 * PAGE, IOVA_FREE, PAGE);
	put_map("type1.map.unknown_flag", sz, RW | (1u << 3), m + 8 * PAGE, IOVA_FREE, PAGE);
	put_map("type1.map.argsz_short", sz - 8, RW, m + 8 * PAGE, IOVA_FREE, PAGE);
	put_map("type1.map.argsz_large", sz + 64, RW, m + 8 * PAGE, IOVA_FREE, PAGE);
	put_unmap("type1.map.argsz_large.unmap", sizeof(struct vfio_iommu_type1_dma_unmap), 0, IOVA_FREE, PAGE);
	put_map("type1.map.iova_wrap", sz, RW, m + 8 * PAGE, 0xfffffffffffff000ULL, 2 * PAGE);
	put_map("type1.map.vaddr_wrap", sz, RW, (void *)0xfffffffffffff000ULL, IOVA_FREE, 2 * PAGE);
	put_map("type1.map.iova_msi_window", sz, RW, m + 8 * PAGE, 0xfee00000ULL, PAGE);
	put_map("type1.map.iova_2p39", sz, RW, m + 8 * PAGE, 1ULL << 39, PAGE);
	put_map("type1.map.iova_2p48", sz, RW, m + 8 * PAGE, 1ULL << 48, PAGE);
	put_map("type1.map.unmapped_vaddr", sz, RW, hole_page(), IOVA_FREE, PAGE);

	void *ro = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	put_map("type1.map.readonly_vaddr.rw", sz, RW, ro, IOVA_FREE, PAGE);
	put_map("type1.map.readonly_vaddr.read", sz, VFIO_DMA_MAP_FLAG_READ, ro, IOVA_FREE + PAGE, PAGE);
	put_unmap("type1.map.readonly_vaddr.unmap", sizeof(struct vfio_iommu_type1_dma_unmap), 0,
		  IOVA_FREE, 2 * PAGE);
	munmap(ro, PAGE);
	put_map("type1.map.write_only", sz, VFIO_DMA_MAP_FLAG_WRITE, m + 8 * PAGE, IOVA_FREE, PAGE);
	put_dma_avail("type1.dma_avail.after_write_only");
	put_unmap("type1.map.write_only.unmap", sizeof(struct vfio_iommu_type1_dma_unmap), 0, IOVA_FREE, PAGE);
	put_dma_avail("type1.dma_avail.after_unmap_write_only");
}

/* Map one 4 KiB page at distinct IOVAs until MAP_DMA refuses: with the
 * mappings already there, dma_entry_limit bounds the count (ENOSPC). */
static void type1_entry_limit(void)
{
	const uint64_t base = 0x10000000ULL, cap = 1u << 17;
	uint64_t n = 0;
	int err = 0;
	put_dma_avail("type1.limit.dma_avail.before");
	for (; n < cap; n++) {
		if (map_dma(sizeof(struct vfio_iommu_type1_dma_map), RW, S.mem + 32 * PAGE,
			    base + 2 * PAGE * n, PAGE) < 0) {
			err = errno;
			break;
		}
	}
	put("type1.limit.mapped", "%" PRIu64, n);
	put("type1.limit.stop", n < cap ? "ERR:%s" : "none", errname(err));
	put_dma_avail("type1.limit.dma_avail.full");
	put_unmap("type1.limit.unmap", sizeof(struct vfio_iommu_type1_dma_unmap), 0, base, 2 * PAGE * cap);
	put_dma_avail("type1.limit.dma_avail.after_unmap");
}

static void type1_unmap(void)
{
	uint8_t *m = S.mem;
	const size_t msz = sizeof(struct vfio_iommu_type1_dma_map);
	const size_t usz = sizeof(struct vfio_iommu_type1_dma_unmap);

	put_map("type1.map.b", msz, RW, m + 4 * PAGE, IOVA_B, 4 * PAGE);
	put_dma_avail("type1.dma_avail.after_map2");
	put_unmap("type1.unmap.straddle_start", usz, 0, IOVA_B - PAGE, 2 * PAGE);
	put_unmap("type1.unmap.straddle_end", usz, 0, IOVA_B + 3 * PAGE, 2 * PAGE);
	put_unmap("type1.unmap.first_page", usz, 0, IOVA_B, PAGE);
	put_unmap("type1.unmap.unaligned_iova", usz, 0, IOVA_B + 0x800, PAGE);
	put_unmap("type1.unmap.unaligned_size", usz, 0, IOVA_B, 0x800);
	put_unmap("type1.unmap.size0", usz, 0, IOVA_B, 0);
	put_unmap("type1.unmap.argsz_short", usz - 8, 0, IOVA_B, 4 * PAGE);
	put_unmap("type1.unmap.unknown_flag", usz, 1u << 3, IOVA_B, 4 * PAGE);
	put_unmap("type1.unmap.wrap", usz, 0, 0xfffffffffffff000ULL, 2 * PAGE);
	put_unmap("type1.unmap.dirty_bitmap_not_tracking", usz, VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
		  IOVA_B, 4 * PAGE);
	put_unmap("type1.unmap.empty", usz, 0, IOVA_FREE, PAGE);
	put_unmap("type1.unmap.exact", usz, 0, IOVA_B, 4 * PAGE);
	put_dma_avail("type1.dma_avail.after_unmap");

	/* One unmap covering two whole mappings and the hole between them. */
	put_map("type1.map.c1", msz, RW, m + 4 * PAGE, IOVA_B, PAGE);
	put_map("type1.map.c2", msz, RW, m + 6 * PAGE, IOVA_B + 2 * PAGE, 2 * PAGE);
	put_dma_avail("type1.dma_avail.after_c1_c2");
	put_unmap("type1.unmap.covering_two", usz, 0, IOVA_B, 4 * PAGE);

	put_map("type1.map.d", msz, RW, m + 4 * PAGE, IOVA_B, 2 * PAGE);
	put_unmap("type1.unmap_all.iova_nonzero", usz, VFIO_DMA_UNMAP_FLAG_ALL, PAGE, 0);
	put_unmap("type1.unmap_all.size_nonzero", usz, VFIO_DMA_UNMAP_FLAG_ALL, 0, PAGE);
	put_unmap("type1.unmap_all.with_dirty_bitmap", usz,
		  VFIO_DMA_UNMAP_FLAG_ALL | VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, 0, 0);
	put_unmap("type1.unmap_all", usz, VFIO_DMA_UNMAP_FLAG_ALL, 0, 0);
	put_dma_avail("type1.dma_avail.after_unmap_all");
	put_unmap("type1.unmap_all.empty", usz, VFIO_DMA_UNMAP_FLAG_ALL, 0, 0);
}

static void type1_vaddr(void)
{
	uint8_t *m = S.mem;
	const size_t msz = sizeof(struct vfio_iommu_type1_dma_map);
	const size_t usz = sizeof(struct vfio_iommu_type1_dma_unmap);
	uint8_t *v = m + 16 * PAGE;

	put_map("type1.vaddr.map", msz, RW, v, IOVA_VADDR, 4 * PAGE);
	put_map("type1.vaddr.update_valid", msz, VFIO_DMA_MAP_FLAG_VADDR, v, IOVA_VADDR, 4 * PAGE);
	put_unmap("type1.vaddr.invalidate_partial", usz, VFIO_DMA_UNMAP_FLAG_VADDR, IOVA_VADDR, PAGE);
	put_unmap("type1.vaddr.invalidate", usz, VFIO_DMA_UNMAP_FLAG_VADDR, IOVA_VADDR, 4 * PAGE);
	put_unmap("type1.vaddr.invalidate_again", usz, VFIO_DMA_UNMAP_FLAG_VADDR, IOVA_VADDR, 4 * PAGE);
	put_unmap("type1.vaddr.invalidate_with_dirty", usz,
		  VFIO_DMA_UNMAP_FLAG_VADDR | VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, IOVA_VADDR, 4 * PAGE);
	put_map("type1.vaddr.update_size_mismatch", msz, VFIO_DMA_MAP_FLAG_VADDR, v, IOVA_VADDR, 2 * PAGE);
	put_map("type1.vaddr.update_iova_mismatch", msz, VFIO_DMA_MAP_FLAG_VADDR, v, IOVA_VADDR + PAGE, 3 * PAGE);
	put_map("type1.vaddr.update_with_rw", msz, VFIO_DMA_MAP_FLAG_VADDR | RW, v, IOVA_VADDR, 4 * PAGE);
	put_map("type1.vaddr.map_over_invalid", msz, RW, v, IOVA_VADDR, 4 * PAGE);
	put_dma_avail("type1.vaddr.dma_avail_invalid");
	put_map("type1.vaddr.update", msz, VFIO_DMA_MAP_FLAG_VADDR, v, IOVA_VADDR, 4 * PAGE);
	put_unmap("type1.vaddr.unmap", usz, 0, IOVA_VADDR, 4 * PAGE);

	put_map("type1.vaddr.map2", msz, RW, v, IOVA_VADDR, 4 * PAGE);
	put_unmap("type1.vaddr.invalidate_all", usz, VFIO_DMA_UNMAP_FLAG_VADDR | VFIO_DMA_UNMAP_FLAG_ALL, 0, 0);
	put_map("type1.vaddr.update2", msz, VFIO_DMA_MAP_FLAG_VADDR, v, IOVA_VADDR, 4 * PAGE);
	put_unmap("type1.vaddr.unmap_all", usz, VFIO_DMA_UNMAP_FLAG_ALL, 0, 0);
}

/* DIRTY_PAGES with a GET_BITMAP request in data[]; prints rc and bitmap word. */
static void put_dirty_get(const char *name, uint32_t argsz, uint64_t iova, uint64_t size,
			  uint64_t pgsize, uint64_t bmsize)
{
	struct {
		struct vfio_iommu_type1_dirty_bitmap hdr;
		struct vfio_iommu_type1_dirty_bitmap_get get;
	} __attribute__((packed)) req;
	uint64_t bits[4] = { 0, 0, 0, 0 };
	memset(&req, 0, sizeof(req));
	req.hdr.argsz = argsz;
	req.hdr.flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP;
	req.get.iova = iova;
	req.get.size = size;
	req.get.bitmap.pgsize = pgsize;
	req.get.bitmap.size = bmsize;
	req.get.bitmap.data = (void *)bits;
	if (XIOCTL(name, S.container, VFIO_IOMMU_DIRTY_PAGES, &req) >= 0)
		put_hex(nm("%s.bitmap", name), bits[0]);
}

static void put_dirty_flags(const char *name, uint32_t argsz, uint32_t flags)
{
	struct vfio_iommu_type1_dirty_bitmap d = { .argsz = argsz, .flags = flags };
	XIOCTL(name, S.container, VFIO_IOMMU_DIRTY_PAGES, &d);
}

static void type1_dirty(void)
{
	const size_t msz = sizeof(struct vfio_iommu_type1_dma_map);
	const uint32_t dsz = sizeof(struct vfio_iommu_type1_dirty_bitmap);
	const uint32_t gsz = dsz + sizeof(struct vfio_iommu_type1_dirty_bitmap_get);

	put_map("type1.dirty.map", msz, RW, S.mem + 24 * PAGE, IOVA_DIRTY, 4 * PAGE);
	put_dirty_flags("type1.dirty.argsz_short", 4, VFIO_IOMMU_DIRTY_PAGES_FLAG_START);
	put_dirty_flags("type1.dirty.flags0", dsz, 0);
	put_dirty_flags("type1.dirty.start_stop", dsz,
			VFIO_IOMMU_DIRTY_PAGES_FLAG_START | VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP);
	put_dirty_flags("type1.dirty.unknown_flag", dsz, 1u << 3);
	put_dirty_get("type1.dirty.get_not_started", gsz, IOVA_DIRTY, 4 * PAGE, PAGE, 8);
	put_dirty_flags("type1.dirty.start", dsz, VFIO_IOMMU_DIRTY_PAGES_FLAG_START);
	put_dirty_flags("type1.dirty.start_again", dsz, VFIO_IOMMU_DIRTY_PAGES_FLAG_START);
	put_dirty_get("type1.dirty.get", gsz, IOVA_DIRTY, 4 * PAGE, PAGE, 8);
	put_dirty_get("type1.dirty.get_again", gsz, IOVA_DIRTY, 4 * PAGE, PAGE, 8);
	put_dirty_get("type1.dirty.get_argsz_no_data", dsz, IOVA_DIRTY, 4 * PAGE, PAGE, 8);
	put_dirty_get("type1.dirty.get_bad_pgsize", gsz, IOVA_DIRTY, 4 * PAGE, 2 * PAGE, 8);
	put_dirty_get("type1.dirty.get_bitmap_small", gsz, IOVA_DIRTY, 4 * PAGE, PAGE, 0);
	put_dirty_get("type1.dirty.get_unaligned_iova", gsz, IOVA_DIRTY + 0x800, 4 * PAGE, PAGE, 8);
	put_dirty_get("type1.dirty.get_size0", gsz, IOVA_DIRTY, 0, PAGE, 8);
	put_dirty_get("type1.dirty.get_partial", gsz, IOVA_DIRTY + PAGE, 2 * PAGE, PAGE, 8);
	put_dirty_get("type1.dirty.get_unmapped_range", gsz, IOVA_FREE, 4 * PAGE, PAGE, 8);
	put_dirty_get("type1.dirty.get_straddle", gsz, IOVA_DIRTY - PAGE, 4 * PAGE, PAGE, 8);
	put_dirty_flags("type1.dirty.get_start", dsz,
			VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP | VFIO_IOMMU_DIRTY_PAGES_FLAG_START);
	{
		struct {
			struct vfio_iommu_type1_dma_unmap u;
			struct vfio_bitmap b;
		} __attribute__((packed)) req;
		uint64_t bits[4] = { 0, 0, 0, 0 };
		memset(&req, 0, sizeof(req));
		req.u.argsz = sizeof(req);
		req.u.flags = VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
		req.u.iova = IOVA_DIRTY;
		req.u.size = 4 * PAGE;
		req.b.pgsize = PAGE;
		req.b.size = 8;
		req.b.data = (void *)bits;
		if (XIOCTL("type1.dirty.unmap_with_bitmap", S.container, VFIO_IOMMU_UNMAP_DMA, &req) >= 0) {
			put_hex("type1.dirty.unmap_with_bitmap.size", req.u.size);
			put_hex("type1.dirty.unmap_with_bitmap.bitmap", bits[0]);
		}
	}
	put_dirty_flags("type1.dirty.stop", dsz, VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP);
	put_dirty_flags("type1.dirty.stop_again", dsz, VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP);
	put_unmap("type1.dirty.unmap_all", sizeof(struct vfio_iommu_type1_dma_unmap),
		  VFIO_DMA_UNMAP_FLAG_ALL, 0, 0);
}

/* ------------------------------------------------------------- device */

static void device_info(void)
{
	{
		struct vfio_device_info info = { .argsz = 8 };
		XIOCTL("device.info.argsz8", S.device, VFIO_DEVICE_GET_INFO, &info);
	}
	{
		struct vfio_device_info info;
		memset(&info, 0xa5, sizeof(info));
		info.argsz = offsetof(struct vfio_device_info, cap_offset);
		if (XIOCTL("device.info.argsz16", S.device, VFIO_DEVICE_GET_INFO, &info) >= 0) {
			put_hex("device.info.argsz16.argsz", info.argsz);
			put_hex("device.info.argsz16.flags", info.flags);
		}
	}
	{
		struct vfio_device_info info;
		memset(&info, 0xa5, sizeof(info));
		info.argsz = sizeof(info);
		if (XIOCTL("device.info", S.device, VFIO_DEVICE_GET_INFO, &info) >= 0) {
			put_hex("device.info.argsz", info.argsz);
			put_hex("device.info.flags", info.flags);
			put("device.info.num_regions", "%u", info.num_regions);
			put("device.info.num_irqs", "%u", info.num_irqs);
			put_hex("device.info.cap_offset", info.cap_offset);
		}
	}
	XIOCTL("device.info.bad_pointer", S.device, VFIO_DEVICE_GET_INFO, hole_page());
	XIOCTL("device.unknown_ioctl", S.device, UNKNOWN_VFIO_IOCTL, 0);
	XIOCTL("device.container_ioctl_on_device", S.device, VFIO_GET_API_VERSION, 0);
}

static void put_region_caps(unsigned idx, void *buf, size_t len, uint32_t first)
{
	uint32_t off = first;
	int n;
	for (n = 0; off && n < 16; n++) {
		if (off + sizeof(struct vfio_info_cap_header) > len) {
			put(nm("device.region.%u.cap.%d", idx, n), "out_of_buffer");
			return;
		}
		struct vfio_info_cap_header *h = (void *)((uint8_t *)buf + off);
		put_hex(nm("device.region.%u.cap.%d.offset", idx, n), off);
		put(nm("device.region.%u.cap.%d.id", idx, n), "%u", h->id);
		put(nm("device.region.%u.cap.%d.version", idx, n), "%u", h->version);
		if (h->id == VFIO_REGION_INFO_CAP_SPARSE_MMAP) {
			struct vfio_region_info_cap_sparse_mmap *c = (void *)h;
			put(nm("device.region.%u.cap.%d.nr_areas", idx, n), "%u", c->nr_areas);
			for (uint32_t i = 0; i < c->nr_areas && i < 16; i++) {
				put_hex(nm("device.region.%u.cap.%d.area.%u.offset", idx, n, i), c->areas[i].offset);
				put_hex(nm("device.region.%u.cap.%d.area.%u.size", idx, n, i), c->areas[i].size);
			}
		} else if (h->id == VFIO_REGION_INFO_CAP_TYPE) {
			struct vfio_region_info_cap_type *c = (void *)h;
			put_hex(nm("device.region.%u.cap.%d.type", idx, n), c->type);
			put_hex(nm("device.region.%u.cap.%d.subtype", idx, n), c->subtype);
		}
		off = h->next;
	}
	put(nm("device.region.%u.cap.count", idx), "%d", n);
}

static void device_regions(void)
{
	S.bar0_off = (uint64_t)VFIO_PCI_BAR0_REGION_INDEX << 40;
	S.config_off = (uint64_t)VFIO_PCI_CONFIG_REGION_INDEX << 40;
	for (unsigned idx = 0; idx <= 9; idx++) {
		uint64_t buf[128];
		struct vfio_region_info *ri = (void *)buf;
		memset(buf, 0, sizeof(buf));
		ri->argsz = sizeof(buf);
		ri->index = idx;
		if (XIOCTL(nm("device.region.%u", idx), S.device, VFIO_DEVICE_GET_REGION_INFO, ri) < 0)
			continue;
		put_hex(nm("device.region.%u.argsz", idx), ri->argsz);
		put_hex(nm("device.region.%u.flags", idx), ri->flags);
		put_hex(nm("device.region.%u.size", idx), ri->size);
		put_hex(nm("device.region.%u.offset", idx), ri->offset);
		if (ri->flags & VFIO_REGION_INFO_FLAG_CAPS) {
			put_hex(nm("device.region.%u.cap_offset", idx), ri->cap_offset);
			put_region_caps(idx, buf, sizeof(buf), ri->cap_offset);
		}
		if (idx == VFIO_PCI_BAR0_REGION_INDEX)
			S.bar0_off = ri->offset;
		if (idx == VFIO_PCI_CONFIG_REGION_INDEX)
			S.config_off = ri->offset;
	}
	{
		struct vfio_region_info ri = { .argsz = 12, .index = 0 };
		XIOCTL("device.region.argsz12", S.device, VFIO_DEVICE_GET_REGION_INFO, &ri);
	}
	{
		struct vfio_region_info ri;
		memset(&ri, 0xa5, sizeof(ri));
		ri.argsz = 16;
		ri.index = 0;
		XIOCTL("device.region.argsz16", S.device, VFIO_DEVICE_GET_REGION_INFO, &ri);
	}
	{
		struct vfio_region_info ri;
		memset(&ri, 0xa5, sizeof(ri));
		ri.argsz = sizeof(ri);
		ri.index = 0;
		if (XIOCTL("device.region.0.sizeof", S.device, VFIO_DEVICE_GET_REGION_INFO, &ri) >= 0) {
			put_hex("device.region.0.sizeof.argsz", ri.argsz);
			put_hex("device.region.0.sizeof.flags", ri.flags);
			put_hex("device.region.0.sizeof.cap_offset", ri.cap_offset);
		}
	}
	{
		struct vfio_region_info ri = { .argsz = sizeof(ri), .index = 0x7fffffff };
		XIOCTL("device.region.huge_index", S.device, VFIO_DEVICE_GET_REGION_INFO, &ri);
	}
}

static void device_irq_info(void)
{
	for (unsigned idx = 0; idx <= 5; idx++) {
		struct vfio_irq_info ii;
		memset(&ii, 0, sizeof(ii));
		ii.argsz = sizeof(ii);
		ii.index = idx;
		if (XIOCTL(nm("device.irq.%u", idx), S.device, VFIO_DEVICE_GET_IRQ_INFO, &ii) < 0)
			continue;
		put_hex(nm("device.irq.%u.flags", idx), ii.flags);
		put(nm("device.irq.%u.count", idx), "%u", ii.count);
	}
	struct vfio_irq_info ii = { .argsz = 12, .index = 0 };
	XIOCTL("device.irq.argsz12", S.device, VFIO_DEVICE_GET_IRQ_INFO, &ii);
}

static void device_config(void)
{
	uint8_t h[64];
	memset(h, 0, sizeof(h));
	if (region_read(S.config_off, h, sizeof(h)) < 0) {
		put("config.header", "ERR:%s", errname(errno));
	} else {
		put("config.header", "ok");
	}
#define U8(o) (h[o])
#define U16(o) (uint16_t)(h[o] | h[(o) + 1] << 8)
#define U32(o) ((uint32_t)U16(o) | (uint32_t)U16((o) + 2) << 16)
	put_hex("config.vendor", U16(0x00));
	put_hex("config.device", U16(0x02));
	put_hex("config.command", U16(0x04));
	put_hex("config.status", U16(0x06));
	put_hex("config.revision", U8(0x08));
	put_hex("config.class", U32(0x08) >> 8);
	put_hex("config.cacheline", U8(0x0c));
	put_hex("config.latency", U8(0x0d));
	put_hex("config.header_type", U8(0x0e));
	put_hex("config.bist", U8(0x0f));
	for (int i = 0; i < 6; i++)
		put_hex(nm("config.bar%d", i), U32(0x10 + 4 * i));
	put_hex("config.cardbus_cis", U32(0x28));
	put_hex("config.subsys_vendor", U16(0x2c));
	put_hex("config.subsys_id", U16(0x2e));
	put_hex("config.rom", U32(0x30));
	put_hex("config.cap_ptr", U8(0x34));
	put_hex("config.reserved_35", U32(0x34) >> 8);
	put_hex("config.reserved_38", U32(0x38));
	put_hex("config.int_line", U8(0x3c));
	put_hex("config.int_pin", U8(0x3d));
	put_hex("config.min_gnt", U8(0x3e));
	put_hex("config.max_lat", U8(0x3f));

	/* Capability list. */
	unsigned ptr = (U16(0x06) & 0x10) ? (U8(0x34) & 0xfc) : 0;
	int n;
	for (n = 0; ptr && n < 48; n++) {
		uint32_t hdr = cfg_read(ptr, 2);
		put_hex(nm("config.cap.%d.offset", n), ptr);
		put_hex(nm("config.cap.%d.id", n), hdr & 0xff);
		if ((hdr & 0xff) == 0x05) {
			S.msi_cap = ptr;
			put_hex(nm("config.cap.%d.msi_control", n), cfg_read(ptr + 2, 2));
		}
		ptr = (hdr >> 8) & 0xfc;
	}
	put("config.cap.count", "%d", n);

	/* BAR sizing: all-ones, read back the mask, restore. */
	static const struct { const char *name; unsigned off; uint32_t ones; } bars[] = {
		{ "bar0", 0x10, 0xffffffff }, { "bar1", 0x14, 0xffffffff },
		{ "rom", 0x30, 0xfffff800 },
	};
	for (size_t i = 0; i < sizeof(bars) / sizeof(bars[0]); i++) {
		uint32_t orig = cfg_read(bars[i].off, 4);
		if (cfg_write(bars[i].off, bars[i].ones, 4) < 0)
			put(nm("config.%s.sizing.write", bars[i].name), "ERR:%s", errname(errno));
		put_hex(nm("config.%s.sizing", bars[i].name), cfg_read(bars[i].off, 4));
		if (cfg_write(bars[i].off, orig, 4) < 0)
			put(nm("config.%s.restore.write", bars[i].name), "ERR:%s", errname(errno));
		put(nm("config.%s.restore", bars[i].name), "%s",
		    cfg_read(bars[i].off, 4) == orig ? "same" : "differs");
	}

	/* Vendor ID is read-only; the command register is writable. */
	cfg_write(0x00, 0xffff, 2);
	put_hex("config.vendor.after_write", cfg_read(0x00, 2));
	uint32_t cmd = cfg_read(0x04, 2);
	if (cfg_write(0x04, cmd | 0x6, 2) < 0)
		put("config.command.enable_mem_master", "ERR:%s", errname(errno));
	else
		put("config.command.enable_mem_master", "ok");
	put_hex("config.command.after_enable", cfg_read(0x04, 2));
	put_hex("config.read_1byte_0x01", cfg_read(0x01, 1));
	put_hex("config.read_2byte_0x02", cfg_read(0x02, 2));

	uint32_t v = 0;
	if (region_read(S.config_off + 0xfc, &v, 4) < 0)
		put("config.read_0xfc", "ERR:%s", errname(errno));
	else
		put_hex("config.read_0xfc", v);
	if (region_read(S.config_off + 0x100, &v, 4) < 0)
		put("config.read_0x100", "ERR:%s", errname(errno));
	else
		put_hex("config.read_0x100", v);
	if (region_read(S.config_off + 0xfe, &v, 4) < 0)
		put("config.read_0xfe_across_end", "ERR:%s", errname(errno));
	else
		put_hex("config.read_0xfe_across_end", v);
}

/* ------------------------------------------------------------- edu BAR0 */

static void edu_registers(void)
{
	put_bar0_read32("edu.id", EDU_ID);
	put_bar0_write32("edu.liveness.write", EDU_LIVENESS, 0x12345678);
	put_bar0_read32("edu.liveness", EDU_LIVENESS);

	put_bar0_write32("edu.factorial.write", EDU_FACTORIAL, 10);
	put_wait_clear("edu.factorial.wait", EDU_STATUS, 0x1);
	put_bar0_read32("edu.factorial", EDU_FACTORIAL);
	put_bar0_read32("edu.status", EDU_STATUS);

	uint64_t v64 = 0x1122334455667788ULL;
	if (region_write(S.bar0_off + EDU_DMA_SRC, &v64, 8) < 0)
		put("edu.write64_0x80", "ERR:%s", errname(errno));
	else
		put("edu.write64_0x80", "ok");
	v64 = 0;
	if (region_read(S.bar0_off + EDU_DMA_SRC, &v64, 8) < 0)
		put("edu.read64_0x80", "ERR:%s", errname(errno));
	else
		put_hex("edu.read64_0x80", v64);
	put_bar0_read32("edu.read32_0x80", EDU_DMA_SRC);
	put_bar0_read32("edu.read32_0x84", EDU_DMA_SRC + 4);
	bar0_write32(EDU_DMA_SRC, 0);

	uint16_t v16 = 0;
	if (region_read(S.bar0_off + EDU_ID, &v16, 2) < 0)
		put("edu.read16_0x00", "ERR:%s", errname(errno));
	else
		put_hex("edu.read16_0x00", v16);
	uint8_t v8 = 0;
	if (region_read(S.bar0_off + EDU_ID, &v8, 1) < 0)
		put("edu.read8_0x00", "ERR:%s", errname(errno));
	else
		put_hex("edu.read8_0x00", v8);
	put_bar0_read32("edu.read32_unimplemented_0x10", 0x10);
	put_bar0_read32("edu.read32_last", 0xffffc);
	put_bar0_read32("edu.read32_past_end", 0x100000);
	uint32_t v32 = 0;
	if (region_read(((uint64_t)VFIO_PCI_BAR1_REGION_INDEX << 40), &v32, 4) < 0)
		put("edu.bar1_read", "ERR:%s", errname(errno));
	else
		put_hex("edu.bar1_read", v32);

	/* With memory decoding off the BAR must not be reachable. */
	uint32_t cmd = cfg_read(0x04, 2);
	cfg_write(0x04, cmd & ~0x2u, 2);
	put_bar0_read32("edu.read32_memory_disabled", EDU_ID);
	cfg_write(0x04, cmd, 2);
	put_bar0_read32("edu.read32_memory_reenabled", EDU_ID);
}

static void edu_dma(void)
{
	uint8_t *buf = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		put("dma.buffer", "ERR:%s", errname(errno));
		return;
	}
	for (unsigned i = 0; i < PAGE; i++)
		buf[i] = (uint8_t)(i * 7 + 3);
	memset(buf + PAGE, 0, PAGE);

	put_map("dma.map", sizeof(struct vfio_iommu_type1_dma_map), RW, buf, IOVA_DMA, 2 * PAGE);
	bar0_write32(EDU_DMA_SRC, IOVA_DMA);
	bar0_write32(EDU_DMA_DST, EDU_DMA_BUF);
	bar0_write32(EDU_DMA_COUNT, EDU_DMA_LEN);
	put_bar0_write32("dma.to_device.start", EDU_DMA_CMD, EDU_DMA_START);
	put_wait_clear("dma.to_device.wait", EDU_DMA_CMD, EDU_DMA_START);
	/* Whether the device buffer is also visible through BAR0 (not on QEMU 7.2). */
	put_bar0_read32("dma.device_buffer.read32", EDU_DMA_BUF);

	bar0_write32(EDU_DMA_SRC, EDU_DMA_BUF);
	bar0_write32(EDU_DMA_DST, IOVA_DMA + PAGE);
	bar0_write32(EDU_DMA_COUNT, EDU_DMA_LEN);
	put_bar0_write32("dma.to_ram.start", EDU_DMA_CMD, EDU_DMA_START | EDU_DMA_TO_RAM);
	put_wait_clear("dma.to_ram.wait", EDU_DMA_CMD, EDU_DMA_START);
	put("dma.round_trip", "%s", memcmp(buf, buf + PAGE, EDU_DMA_LEN) == 0 ? "equal" : "differs");
	put("dma.beyond_count_untouched", "%s", buf[PAGE + EDU_DMA_LEN] == 0 ? "yes" : "no");

	put_unmap("dma.unmap", sizeof(struct vfio_iommu_type1_dma_unmap), 0, IOVA_DMA, 2 * PAGE);
	munmap(buf, 2 * PAGE);
}

/* SET_IRQS with zero or one eventfd / bool; returns rc, prints it. */
static long put_set_irqs(const char *name, uint32_t argsz, uint32_t flags, uint32_t index,
			 uint32_t start, uint32_t count, int32_t data)
{
	struct {
		struct vfio_irq_set s;
		int32_t data[4];
	} req;
	memset(&req, 0, sizeof(req));
	req.s.argsz = argsz;
	req.s.flags = flags;
	req.s.index = index;
	req.s.start = start;
	req.s.count = count;
	req.data[0] = data;
	return XIOCTL(name, S.device, VFIO_DEVICE_SET_IRQS, &req);
}

#define IRQ_EVENTFD_TRIGGER (VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER)
#define IRQ_NONE_TRIGGER (VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER)
#define IRQ_NONE_UNMASK (VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK)
#define SET_SZ ((uint32_t)sizeof(struct vfio_irq_set))

static void edu_msi(void)
{
	int efd = new_eventfd();
	put_set_irqs("msi.enable", SET_SZ + 4, IRQ_EVENTFD_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 1, efd);
	if (S.msi_cap)
		put_hex("msi.config_control", cfg_read(S.msi_cap + 2, 2));
	put_hex("msi.config_command", cfg_read(0x04, 2));
	put_set_irqs("msi.enable_intx_while_msi", SET_SZ + 4, IRQ_EVENTFD_TRIGGER,
		     VFIO_PCI_INTX_IRQ_INDEX, 0, 1, efd);
	put_bar0_write32("msi.raise", EDU_IRQ_RAISE, 0x1);
	put_event("msi.event", efd, 2000);
	put_bar0_read32("msi.irq_status", EDU_IRQ_STATUS);
	put_bar0_write32("msi.ack", EDU_IRQ_ACK, 0x1);
	put_bar0_read32("msi.irq_status.after_ack", EDU_IRQ_STATUS);
	put_bar0_write32("msi.raise2", EDU_IRQ_RAISE, 0x4);
	put_event("msi.event2", efd, 2000);
	put_bar0_write32("msi.ack2", EDU_IRQ_ACK, 0x4);
	put_set_irqs("msi.trigger_bool", SET_SZ + 1,
		     VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 1, 1);
	put_event("msi.trigger_bool.event", efd, 2000);
	put_set_irqs("msi.trigger_none", SET_SZ, IRQ_NONE_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 1, 0);
	put_event("msi.trigger_none.event", efd, 2000);
	put_set_irqs("msi.unmask", SET_SZ, IRQ_NONE_UNMASK, VFIO_PCI_MSI_IRQ_INDEX, 0, 1, 0);
	put_set_irqs("msi.disable", SET_SZ, IRQ_NONE_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 0, 0);
	if (S.msi_cap)
		put_hex("msi.config_control.after_disable", cfg_read(S.msi_cap + 2, 2));
	put_set_irqs("msi.disable_again", SET_SZ, IRQ_NONE_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 0, 0);
	close(efd);
}

static void edu_intx(void)
{
	int efd = new_eventfd();
	put_set_irqs("intx.enable", SET_SZ + 4, IRQ_EVENTFD_TRIGGER, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, efd);
	put_set_irqs("intx.enable_msi_while_intx", SET_SZ + 4, IRQ_EVENTFD_TRIGGER,
		     VFIO_PCI_MSI_IRQ_INDEX, 0, 1, efd);
	put_bar0_write32("intx.raise", EDU_IRQ_RAISE, 0x1);
	put_event("intx.event", efd, 2000);
	put_hex("intx.config_status", cfg_read(0x06, 2) & 0x8);
	/* Automasked: vfio-pci sets the function's INTx-disable bit unless
	 * nointxmask (then disable_irq).  The config region shows the user's
	 * (virtualized) bit; sysfs's config shows the function's own. */
	put_hex("intx.config_command_intx_disable", cfg_read(0x04, 2) & 0x400);
	put_sysfs_config16("intx.sysfs_command_intx_disable", 0x04, 0x400);
	put_bar0_write32("intx.ack", EDU_IRQ_ACK, 0x1);
	/* Automasked: a new assertion gives no event until UNMASK. */
	put_bar0_write32("intx.raise_masked", EDU_IRQ_RAISE, 0x1);
	put_event("intx.event_while_masked", efd, 500);
	put_set_irqs("intx.unmask", SET_SZ, IRQ_NONE_UNMASK, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, 0);
	put_event("intx.event_after_unmask", efd, 2000);
	put_bar0_write32("intx.ack2", EDU_IRQ_ACK, 0x1);
	put_set_irqs("intx.unmask2", SET_SZ, IRQ_NONE_UNMASK, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, 0);
	put_event("intx.event_after_ack_unmask", efd, 500);
	put_bar0_write32("intx.raise3", EDU_IRQ_RAISE, 0x1);
	put_event("intx.event3", efd, 2000);
	put_bar0_write32("intx.ack3", EDU_IRQ_ACK, 0x1);
	put_set_irqs("intx.mask", SET_SZ, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK,
		     VFIO_PCI_INTX_IRQ_INDEX, 0, 1, 0);
	put_set_irqs("intx.unmask3", SET_SZ, IRQ_NONE_UNMASK, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, 0);
	put_set_irqs("intx.trigger_none", SET_SZ, IRQ_NONE_TRIGGER, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, 0);
	put_event("intx.trigger_none.event", efd, 2000);
	put_set_irqs("intx.unmask4", SET_SZ, IRQ_NONE_UNMASK, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, 0);
	put_set_irqs("intx.disable", SET_SZ, IRQ_NONE_TRIGGER, VFIO_PCI_INTX_IRQ_INDEX, 0, 0, 0);
	put_set_irqs("intx.unmask_disabled", SET_SZ, IRQ_NONE_UNMASK, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, 0);
	close(efd);
}

static void set_irqs_rules(void)
{
	int efd = new_eventfd();
	put_set_irqs("set_irqs.argsz_short", 8, IRQ_NONE_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 0, 0);
	put_set_irqs("set_irqs.argsz_no_data", SET_SZ, IRQ_EVENTFD_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 1, efd);
	put_set_irqs("set_irqs.index5", SET_SZ, IRQ_NONE_TRIGGER, 5, 0, 0, 0);
	put_set_irqs("set_irqs.index_err_eventfd", SET_SZ + 4, IRQ_EVENTFD_TRIGGER, VFIO_PCI_ERR_IRQ_INDEX, 0, 1, efd);
	put_set_irqs("set_irqs.index_req_eventfd", SET_SZ + 4, IRQ_EVENTFD_TRIGGER, VFIO_PCI_REQ_IRQ_INDEX, 0, 1, efd);
	put_set_irqs("set_irqs.index_req_disable", SET_SZ, IRQ_NONE_TRIGGER, VFIO_PCI_REQ_IRQ_INDEX, 0, 0, 0);
	put_set_irqs("set_irqs.msix_count1", SET_SZ + 4, IRQ_EVENTFD_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 1, efd);
	put_set_irqs("set_irqs.msix_count0", SET_SZ, IRQ_NONE_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 0, 0);
	put_set_irqs("set_irqs.start_count_overflow", SET_SZ + 8, IRQ_EVENTFD_TRIGGER,
		     VFIO_PCI_MSI_IRQ_INDEX, 0xffffffff, 2, efd);
	put_set_irqs("set_irqs.msi_count2", SET_SZ + 8, IRQ_EVENTFD_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 2, efd);
	put_set_irqs("set_irqs.msi_start1", SET_SZ + 4, IRQ_EVENTFD_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 1, 1, efd);
	put_set_irqs("set_irqs.intx_count2", SET_SZ + 8, IRQ_EVENTFD_TRIGGER, VFIO_PCI_INTX_IRQ_INDEX, 0, 2, efd);
	put_set_irqs("set_irqs.data_none_bool", SET_SZ + 1,
		     VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER,
		     VFIO_PCI_MSI_IRQ_INDEX, 0, 1, 0);
	put_set_irqs("set_irqs.no_data_type", SET_SZ, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 0, 0);
	put_set_irqs("set_irqs.two_actions", SET_SZ,
		     VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK,
		     VFIO_PCI_INTX_IRQ_INDEX, 0, 1, 0);
	put_set_irqs("set_irqs.no_action", SET_SZ, VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, 0);
	put_set_irqs("set_irqs.unknown_flag", SET_SZ, IRQ_NONE_TRIGGER | (1u << 6), VFIO_PCI_MSI_IRQ_INDEX, 0, 0, 0);
	put_set_irqs("set_irqs.msi_fd_minus5", SET_SZ + 4, IRQ_EVENTFD_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 1, -5);
	int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
	put_set_irqs("set_irqs.not_eventfd", SET_SZ + 4, IRQ_EVENTFD_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 1, devnull);
	close(devnull);
	put_set_irqs("set_irqs.msi_unmask_eventfd", SET_SZ + 4,
		     VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_MSI_IRQ_INDEX, 0, 1, efd);
	put_set_irqs("set_irqs.count0_disable_msi", SET_SZ, IRQ_NONE_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 0, 0);
	put_set_irqs("set_irqs.count0_disable_intx", SET_SZ, IRQ_NONE_TRIGGER, VFIO_PCI_INTX_IRQ_INDEX, 0, 0, 0);
	put_set_irqs("set_irqs.count0_eventfd", SET_SZ, IRQ_EVENTFD_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 0, 0);
	XIOCTL("set_irqs.bad_pointer", S.device, VFIO_DEVICE_SET_IRQS, hole_page());
	close(efd);
}

/* ------------------------------------------------------------- mmap of regions */

/* One mmap of a device region: "ok" or the errno; unmapped again at once. */
static void *put_mmap(const char *name, size_t len, int prot, int flags, uint64_t off)
{
	void *p = mmap(NULL, len, prot, flags, S.device, (off_t)off);
	if (p == MAP_FAILED) {
		put(name, "ERR:%s", errname(errno));
		return NULL;
	}
	put(name, "ok");
	return p;
}

static void device_mmap(void)
{
	uint64_t bar0 = S.bar0_off;
	void *p = put_mmap("device.mmap.bar0", 0x100000, PROT_READ | PROT_WRITE, MAP_SHARED, bar0);
	if (p) {
		/* A read through the mapping is the register read a pread would be. */
		put_hex("device.mmap.bar0.edu_id", *(volatile uint32_t *)((uint8_t *)p + EDU_ID));
		munmap(p, 0x100000);
	}
	p = put_mmap("device.mmap.bar0.private", PAGE, PROT_READ, MAP_PRIVATE, bar0);
	if (p)
		munmap(p, PAGE);
	p = put_mmap("device.mmap.bar0.past_end", 2 * PAGE, PROT_READ, MAP_SHARED, bar0 + 0x100000 - PAGE);
	if (p)
		munmap(p, 2 * PAGE);
	p = put_mmap("device.mmap.bar1", PAGE, PROT_READ, MAP_SHARED, (uint64_t)VFIO_PCI_BAR1_REGION_INDEX << 40);
	if (p)
		munmap(p, PAGE);
	p = put_mmap("device.mmap.rom", PAGE, PROT_READ, MAP_SHARED, (uint64_t)VFIO_PCI_ROM_REGION_INDEX << 40);
	if (p)
		munmap(p, PAGE);
	p = put_mmap("device.mmap.config", PAGE, PROT_READ, MAP_SHARED, S.config_off);
	if (p)
		munmap(p, PAGE);
	p = put_mmap("device.mmap.no_region", PAGE, PROT_READ, MAP_SHARED, (uint64_t)VFIO_PCI_NUM_REGIONS << 40);
	if (p)
		munmap(p, PAGE);
}

/* ------------------------------------------------------------- container and group files */

/* read/write on the container (the IOMMU driver's, type1 has none) and on a group. */
static void container_and_group_rw(void)
{
	uint64_t v = 0;
	long r;   /* the call first: argument order is unspecified, errno must be read after it */
	r = read(S.container, &v, sizeof(v));
	put_rc("container.read", r, errno);
	r = write(S.container, &v, sizeof(v));
	put_rc("container.write", r, errno);
	r = read(S.group, &v, sizeof(v));
	put_rc("group.read", r, errno);
	r = write(S.group, &v, sizeof(v));
	put_rc("group.write", r, errno);
}


static void device_reset_and_features(void)
{
	XIOCTL("device.reset", S.device, VFIO_DEVICE_RESET, 0);
	put_bar0_read32("device.reset.edu_liveness", EDU_LIVENESS);
	put_hex("device.reset.command", cfg_read(0x04, 2));

	{
		struct vfio_pci_hot_reset_info hi;
		memset(&hi, 0, sizeof(hi));
		hi.argsz = sizeof(hi);
		if (XIOCTL("device.hot_reset_info", S.device, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, &hi) >= 0) {
			put_hex("device.hot_reset_info.flags", hi.flags);
			put("device.hot_reset_info.count", "%u", hi.count);
		}
		hi.argsz = 4;
		XIOCTL("device.hot_reset_info.argsz4", S.device, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, &hi);
	}
	{
		struct vfio_pci_hot_reset hr;
		memset(&hr, 0, sizeof(hr));
		hr.argsz = sizeof(hr);
		XIOCTL("device.hot_reset.count0", S.device, VFIO_DEVICE_PCI_HOT_RESET, &hr);
	}
	{
		/* The real group fd in the array, as a user resetting its own group passes it. */
		struct { struct vfio_pci_hot_reset hr; int32_t fds[2]; } a;
		memset(&a, 0, sizeof(a));
		a.hr.argsz = sizeof(a.hr) + sizeof(int32_t);
		a.hr.count = 1;
		a.fds[0] = S.group;
		XIOCTL("device.hot_reset.group_fd", S.device, VFIO_DEVICE_PCI_HOT_RESET, &a);
		a.fds[0] = S.container;
		XIOCTL("device.hot_reset.container_fd", S.device, VFIO_DEVICE_PCI_HOT_RESET, &a);
		a.fds[0] = -1;
		XIOCTL("device.hot_reset.bad_fd", S.device, VFIO_DEVICE_PCI_HOT_RESET, &a);
		a.hr.argsz = sizeof(a.hr) + 2 * sizeof(int32_t);
		a.hr.count = 2;
		a.fds[0] = a.fds[1] = S.group;
		XIOCTL("device.hot_reset.group_fd_twice", S.device, VFIO_DEVICE_PCI_HOT_RESET, &a);
	}

	static const struct { const char *n; uint32_t f; } ops[] = {
		{ "probe", VFIO_DEVICE_FEATURE_PROBE },
		{ "probe_get", VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_GET },
		{ "probe_set", VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET },
	};
	for (unsigned f = 0; f <= 8; f++) {
		for (size_t o = 0; o < sizeof(ops) / sizeof(ops[0]); o++) {
			struct vfio_device_feature df = {
				.argsz = sizeof(df), .flags = ops[o].f | f,
			};
			XIOCTL(nm("device.feature.%u.%s", f, ops[o].n), S.device, VFIO_DEVICE_FEATURE, &df);
		}
	}
	{
		struct vfio_device_feature df = { .argsz = sizeof(df), .flags = VFIO_DEVICE_FEATURE_PROBE | 0xfff };
		XIOCTL("device.feature.0xfff.probe", S.device, VFIO_DEVICE_FEATURE, &df);
		df.argsz = 4;
		df.flags = VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_MIGRATION;
		XIOCTL("device.feature.argsz4", S.device, VFIO_DEVICE_FEATURE, &df);
		df.argsz = sizeof(df);
		df.flags = VFIO_DEVICE_FEATURE_PROBE | (1u << 19) | VFIO_DEVICE_FEATURE_MIGRATION;
		XIOCTL("device.feature.unknown_flag", S.device, VFIO_DEVICE_FEATURE, &df);
		df.flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY;
		XIOCTL("device.feature.get_and_set", S.device, VFIO_DEVICE_FEATURE, &df);
		df.flags = VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY;
		XIOCTL("device.feature.no_op", S.device, VFIO_DEVICE_FEATURE, &df);
	}
}

/* ------------------------------------------------------------- a bus that can be reset */

/*
 * BUS_BDF and BUS_SIBLING: the two functions of one device behind a PCI
 * Express root port (scripts/vm: 0000:00:04.0, secondary bus 1), so a
 * secondary bus reset is possible and hits both.  Their group is read from
 * sysfs, attached to the container, and the hot reset rules are asked:
 * what GET_PCI_HOT_RESET_INFO lists, and which group fds PCI_HOT_RESET takes.
 */
#define BUS_BDF     "0000:01:00.0"
#define BUS_SIBLING "0000:01:00.1"

struct bus_fn {
	const char *name;
	int fd;
	uint64_t config_off, bar0_off;
};

static uint64_t region_offset(int fd, uint32_t index)
{
	struct vfio_region_info r = { .argsz = sizeof(r), .index = index };
	if (ioctl(fd, VFIO_DEVICE_GET_REGION_INFO, &r) < 0)
		return (uint64_t)index << 40;
	return r.offset;
}

static void bus_fn_open(struct bus_fn *f, int group, const char *bdf)
{
	f->fd = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
	put(nm("bus.%s.get_device_fd", f->name), f->fd < 0 ? "ERR:%s" : "ok", errname(errno));
	if (f->fd < 0)
		return;
	f->config_off = region_offset(f->fd, VFIO_PCI_CONFIG_REGION_INDEX);
	f->bar0_off = region_offset(f->fd, VFIO_PCI_BAR0_REGION_INDEX);
}

static uint32_t bus_cfg_read(const struct bus_fn *f, unsigned off, size_t n)
{
	uint32_t v = 0;
	if (pread(f->fd, &v, n, f->config_off + off) != (ssize_t)n)
		return 0xffffffff;
	return v;
}

/* A register of the function's BAR0 (edu), or ERR:<errno>. */
static void put_bus_bar0(const char *name, const struct bus_fn *f, uint64_t reg)
{
	uint32_t v = 0;
	ssize_t r = pread(f->fd, &v, 4, f->bar0_off + reg);
	if (r != 4)
		put(name, "ERR:%s", r < 0 ? errname(errno) : "short");
	else
		put_hex(name, v);
}

/* GET_PCI_HOT_RESET_INFO with room for `room` devices: rc, count, flags and, when it fits, each device. */
static void put_hot_reset_info(const char *name, int fd, unsigned room)
{
	struct {
		struct vfio_pci_hot_reset_info hi;
		struct vfio_pci_dependent_device dev[4];
	} a;
	memset(&a, 0xa5, sizeof(a));
	a.hi.argsz = sizeof(a.hi) + room * sizeof(a.dev[0]);
	a.hi.count = 0x77;
	long r = ioctl(fd, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, &a);
	int err = errno;
	put_rc(name, r, err);
	if (r < 0 && err != ENOSPC)
		return;
	put_hex(nm("%s.flags", name), a.hi.flags);
	put(nm("%s.count", name), "%u", a.hi.count);
	for (unsigned i = 0; r >= 0 && i < a.hi.count && i < room; i++) {
		put(nm("%s.%u.group_id", name, i), "%u", a.dev[i].group_id);
		put(nm("%s.%u.address", name, i), "%04x:%02x:%02x.%u", a.dev[i].segment, a.dev[i].bus,
		    a.dev[i].devfn >> 3, a.dev[i].devfn & 7);
	}
}

/* PCI_HOT_RESET with the given fds (count n, argsz to match). */
static long hot_reset_fds(int device, const int32_t *fds, unsigned n, uint32_t flags)
{
	struct { struct vfio_pci_hot_reset hr; int32_t fds[4]; } a;
	memset(&a, 0, sizeof(a));
	a.hr.argsz = sizeof(a.hr) + n * sizeof(int32_t);
	a.hr.flags = flags;
	a.hr.count = n;
	memcpy(a.fds, fds, n * sizeof(int32_t));
	return ioctl(device, VFIO_DEVICE_PCI_HOT_RESET, &a);
}

static void put_hot_reset(const char *name, int device, const int32_t *fds, unsigned n)
{
	long r = hot_reset_fds(device, fds, n, 0);
	put_rc(name, r, errno);
}

/* What one reset did to both functions: the edu registers they hold, and their config as vfio-pci restored it. */
static void put_after_reset(const char *name, struct bus_fn *fn, const uint32_t *bar0_before)
{
	for (int i = 0; i < 2; i++) {
		if (fn[i].fd < 0)
			continue;
		put_bus_bar0(nm("%s.%s.edu_liveness", name, fn[i].name), &fn[i], EDU_LIVENESS);
		put_hex(nm("%s.%s.command", name, fn[i].name), bus_cfg_read(&fn[i], 0x04, 2));
		put(nm("%s.%s.bar0", name, fn[i].name), "%s",
		    bus_cfg_read(&fn[i], 0x10, 4) == bar0_before[i] ? "kept" : "changed");
	}
}

static void bus_hot_reset(void)
{
	char link[256];
	ssize_t n = readlink("/sys/bus/pci/devices/" BUS_BDF "/iommu_group", link, sizeof(link) - 1);
	if (n < 0) {
		put("bus.iommu_group", "ERR:%s", errname(errno));
		return;
	}
	link[n] = 0;
	const char *gid = strrchr(link, '/') ? strrchr(link, '/') + 1 : link;
	put("bus.iommu_group", "%s", gid);
	int group = open(nm("/dev/vfio/%.16s", gid), O_RDWR | O_CLOEXEC);
	put("bus.open_group", group < 0 ? "ERR:%s" : "ok", errname(errno));
	if (group < 0)
		return;
	XIOCTL("bus.set_container", group, VFIO_GROUP_SET_CONTAINER, &S.container);

	struct bus_fn fn[2] = { { "fn0", -1, 0, 0 }, { "fn1", -1, 0, 0 } };
	bus_fn_open(&fn[0], group, BUS_BDF);
	bus_fn_open(&fn[1], group, BUS_SIBLING);
	if (fn[0].fd >= 0) {
		struct vfio_device_info info = { .argsz = sizeof(info) };
		if (XIOCTL("bus.fn0.info", fn[0].fd, VFIO_DEVICE_GET_INFO, &info) >= 0)
			put_hex("bus.fn0.info.flags", info.flags);
		XIOCTL("bus.fn0.reset", fn[0].fd, VFIO_DEVICE_RESET, 0);
		/* function 0 of a multi-function device says so in its header type */
		put_hex("bus.fn0.header_type", bus_cfg_read(&fn[0], 0x0e, 1));
	}
	if (fn[1].fd >= 0)
		put_hex("bus.fn1.header_type", bus_cfg_read(&fn[1], 0x0e, 1));
	if (fn[0].fd < 0)
		goto out;

	/* The list: too small (ENOSPC with the count), then big enough, from either function. */
	put_hot_reset_info("bus.hot_reset_info.room0", fn[0].fd, 0);
	put_hot_reset_info("bus.hot_reset_info.room1", fn[0].fd, 1);
	put_hot_reset_info("bus.hot_reset_info", fn[0].fd, 4);
	if (fn[1].fd >= 0)
		put_hot_reset_info("bus.hot_reset_info.fn1", fn[1].fd, 2);

	/* Group fds that do not cover the bus, or are no group at all. */
	int32_t fds[4];
	int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	put_hot_reset("bus.hot_reset.count0", fn[0].fd, fds, 0);
	fds[0] = S.group;    /* a real group, but not the one of the bus */
	put_hot_reset("bus.hot_reset.other_group", fn[0].fd, fds, 1);
	fds[0] = -1;
	put_hot_reset("bus.hot_reset.bad_fd", fn[0].fd, fds, 1);
	fds[0] = S.container;
	put_hot_reset("bus.hot_reset.container_fd", fn[0].fd, fds, 1);
	fds[0] = fn[0].fd;
	put_hot_reset("bus.hot_reset.device_fd", fn[0].fd, fds, 1);
	fds[0] = null_fd;
	put_hot_reset("bus.hot_reset.devnull", fn[0].fd, fds, 1);
	fds[0] = group;
	fds[1] = -1;
	put_hot_reset("bus.hot_reset.group_then_bad_fd", fn[0].fd, fds, 2);
	fds[1] = null_fd;
	put_hot_reset("bus.hot_reset.group_then_devnull", fn[0].fd, fds, 2);
	fds[1] = fds[2] = group;
	put_hot_reset("bus.hot_reset.count3", fn[0].fd, fds, 3);
	{
		long r = hot_reset_fds(fn[0].fd, fds, 1, 1);
		put_rc("bus.hot_reset.flags1", r, errno);
		struct vfio_pci_hot_reset_info hi = { .argsz = 4 };
		XIOCTL("bus.hot_reset_info.argsz4", fn[0].fd, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, &hi);
	}
	close(null_fd);

	/* The right group: the reset goes through and hits both functions. */
	uint32_t bar0[2] = { 0, 0 };
	for (int i = 0; i < 2; i++) {
		if (fn[i].fd < 0)
			continue;
		uint32_t v = 0x11111111u * (uint32_t)(i + 1);
		if (pwrite(fn[i].fd, &v, 4, fn[i].bar0_off + EDU_LIVENESS) != 4)
			put(nm("bus.%s.write_liveness", fn[i].name), "ERR:%s", errname(errno));
		bar0[i] = bus_cfg_read(&fn[i], 0x10, 4);
	}
	put_after_reset("bus.before_reset", fn, bar0);
	fds[0] = group;
	put_hot_reset("bus.hot_reset.group_fd", fn[0].fd, fds, 1);
	put_after_reset("bus.after_reset", fn, bar0);
	/* More fds than groups needed: a duplicate, and a group the bus does not need, are accepted. */
	fds[0] = fds[1] = group;
	put_hot_reset("bus.hot_reset.group_fd_twice", fn[0].fd, fds, 2);
	fds[0] = S.group;
	put_hot_reset("bus.hot_reset.other_group_and_group", fn[0].fd, fds, 2);
	{
		/* argsz covers only the header: vfio-pci checks argsz >= minsz alone and reads count fds after it */
		struct { struct vfio_pci_hot_reset hr; int32_t fds[1]; } a = {
			.hr = { .argsz = sizeof(a.hr), .count = 1 }, .fds = { group },
		};
		XIOCTL("bus.hot_reset.argsz_header_only", fn[0].fd, VFIO_DEVICE_PCI_HOT_RESET, &a);
	}
	if (fn[1].fd >= 0) {
		fds[0] = group;
		put_hot_reset("bus.hot_reset.from_fn1", fn[1].fd, fds, 1);
		/* the sibling closed again: its group is still needed, and the reset still reaches it */
		put_rc("bus.fn1.close", close(fn[1].fd), errno);
		fn[1].fd = -1;
		put_hot_reset("bus.hot_reset.fn1_closed", fn[0].fd, fds, 1);
		fds[0] = S.group;
		put_hot_reset("bus.hot_reset.fn1_closed.other_group", fn[0].fd, fds, 1);
	}

out:
	for (int i = 0; i < 2; i++)
		if (fn[i].fd >= 0)
			close(fn[i].fd);
	XIOCTL("bus.unset_container", group, VFIO_GROUP_UNSET_CONTAINER, 0);
	put_rc("bus.close_group", close(group), errno);
}

/* ------------------------------------------------------------- release */

static void release(void)
{
	put_rc("release.close_device", close(S.device), errno);
	S.device = -1;
	put_power_state("power_state.after_close", 1);
	XIOCTL("release.unset_container", S.group, VFIO_GROUP_UNSET_CONTAINER, 0);
	put_group_status("release.status");
	XIOCTL("release.unset_container.again", S.group, VFIO_GROUP_UNSET_CONTAINER, 0);
	{
		struct vfio_iommu_type1_info info = { .argsz = sizeof(info) };
		XIOCTL("release.container.get_info", S.container, VFIO_IOMMU_GET_INFO, &info);
	}
	XIOCTL("release.container.check_extension.3", S.container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU);
	XIOCTL("release.container.set_iommu", S.container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU);
	put_rc("release.close_group", close(S.group), errno);

	char path[64];
	snprintf(path, sizeof(path), "/dev/vfio/%s", S.group_id);
	S.group = open(path, O_RDWR | O_CLOEXEC);
	put("release.reopen_group", S.group < 0 ? "ERR:%s" : "ok", errname(errno));
	put_group_status("release.reopen.status");

	/* The same container can take the group again, in its initial state. */
	XIOCTL("release.reattach.set_container", S.group, VFIO_GROUP_SET_CONTAINER, &S.container);
	XIOCTL("release.reattach.set_iommu", S.container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU);
	put_dma_avail("release.reattach.dma_avail");
	int dev = ioctl(S.group, VFIO_GROUP_GET_DEVICE_FD, S.bdf);
	put("release.reattach.get_device_fd", dev < 0 ? "ERR:%s" : "ok", errname(errno));
	if (dev >= 0) {
		S.device = dev;
		put_bar0_read32("release.reattach.edu_id", EDU_ID);
		close(dev);
		S.device = -1;
	}
	/* Closing the container while the group is set detaches the group. */
	put_rc("release.close_container", close(S.container), errno);
	S.container = -1;
	put_group_status("release.status_after_container_close");
	put_rc("release.close_container2", close(S.container2), errno);
	put_rc("release.close_group2", close(S.group), errno);
}

/* ------------------------------------------------------------- main */

int main(int argc, char **argv)
{
	char path[64];

	setvbuf(stdout, NULL, _IOLBF, 0);
	S.group_id = argc > 1 ? argv[1] : "2";
	S.bdf = argc > 2 ? argv[2] : "0000:00:02.0";
	S.params = argc > 3 && strcmp(argv[3], "params") == 0;

	S.container = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
	if (S.container < 0) {
		put("open_container", "ERR:%s", errname(errno));
		return 2;
	}
	put("open_container", "ok");
	container_initial();

	snprintf(path, sizeof(path), "/dev/vfio/%s", S.group_id);
	S.group = open(path, O_RDWR | O_CLOEXEC);
	if (S.group < 0) {
		put("open_group", "ERR:%s", errname(errno));
		return 2;
	}
	put("open_group", "ok");

	S.mem = mmap(NULL, 64 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (S.mem == MAP_FAILED) {
		put("mmap", "ERR:%s", errname(errno));
		return 2;
	}
	memset(S.mem, 0x5a, 64 * PAGE);

	module_params();
	put_power_state("power_state.before_open", 0);
	group_initial();
	container_set_iommu();
	group_device();
	put_power_state("power_state.after_open", 0);

	type1_get_info();
	if (S.params)
		type1_entry_limit();
	container_and_group_rw();
	type1_map();
	type1_unmap();
	type1_vaddr();
	type1_dirty();

	device_info();
	device_regions();
	device_irq_info();
	device_config();
	edu_registers();
	device_mmap();
	edu_dma();
	edu_msi();
	edu_intx();
	set_irqs_rules();
	device_reset_and_features();
	bus_hot_reset();

	release();
	put("done", "1");
	return 0;
}
