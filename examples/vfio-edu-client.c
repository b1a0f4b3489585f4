/*
 * A plain VFIO user-space driver for QEMU's edu device, written only against
 * <linux/vfio.h>.  It runs unchanged against the kernel's vfio-pci (in a VM
 * with an edu device) and against cuse-vfio.
 *
 *   vfio-edu-client [GROUP [BDF]]      (defaults: 2 0000:00:02.0)
 *
 * Every step prints one "step: result" line; the exit status is 0 only when
 * every step worked.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/vfio.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

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
#define EDU_DMA_IRQ     0x4

static int failures;

#define CHECK(cond, ...) do {                                   \
	if (cond) { printf("ok   "); printf(__VA_ARGS__); printf("\n"); } \
	else { failures++; printf("FAIL "); printf(__VA_ARGS__);     \
	       printf(" (errno %d %s)\n", errno, strerror(errno)); } \
} while (0)

static uint64_t bar0_off, config_off;
static int device;

static uint32_t rd32(uint64_t reg)
{
	uint32_t v = 0;
	if (pread(device, &v, 4, bar0_off + reg) != 4)
		return 0xffffffff;
	return v;
}

static int wr32(uint64_t reg, uint32_t v)
{
	return pwrite(device, &v, 4, bar0_off + reg) == 4 ? 0 : -1;
}

static int wr64(uint64_t reg, uint64_t v)
{
	return pwrite(device, &v, 8, bar0_off + reg) == 8 ? 0 : -1;
}

static int wait_idle(uint64_t reg, uint32_t busy_bit)
{
	for (int i = 0; i < 5000; i++) {
		if (!(rd32(reg) & busy_bit))
			return 0;
		usleep(1000);
	}
	return -1;
}

static int wait_eventfd(int efd, int ms)
{
	struct pollfd p = { .fd = efd, .events = POLLIN };
	uint64_t n;
	if (poll(&p, 1, ms) != 1)
		return -1;
	return read(efd, &n, 8) == 8 ? (int)n : -1;
}

int main(int argc, char **argv)
{
	const char *group_id = argc > 1 ? argv[1] : "2";
	const char *bdf = argc > 2 ? argv[2] : "0000:00:02.0";
	char path[64];

	setvbuf(stdout, NULL, _IOLBF, 0);

	int container = open("/dev/vfio/vfio", O_RDWR);
	CHECK(container >= 0, "open /dev/vfio/vfio");
	if (container < 0)
		return 1;
	CHECK(ioctl(container, VFIO_GET_API_VERSION) == VFIO_API_VERSION, "VFIO_GET_API_VERSION == %d", VFIO_API_VERSION);
	CHECK(ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) == 1, "VFIO_CHECK_EXTENSION(TYPE1v2)");

	snprintf(path, sizeof(path), "/dev/vfio/%s", group_id);
	int group = open(path, O_RDWR);
	CHECK(group >= 0, "open %s", path);
	if (group < 0)
		return 1;

	struct vfio_group_status status = { .argsz = sizeof(status) };
	CHECK(ioctl(group, VFIO_GROUP_GET_STATUS, &status) == 0 && (status.flags & VFIO_GROUP_FLAGS_VIABLE),
	      "VFIO_GROUP_GET_STATUS viable (flags 0x%x)", status.flags);
	CHECK(ioctl(group, VFIO_GROUP_SET_CONTAINER, &container) == 0, "VFIO_GROUP_SET_CONTAINER");
	CHECK(ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) == 0, "VFIO_SET_IOMMU(TYPE1v2)");

	struct vfio_iommu_type1_info iommu_info = { .argsz = sizeof(iommu_info) };
	CHECK(ioctl(container, VFIO_IOMMU_GET_INFO, &iommu_info) == 0 && (iommu_info.flags & VFIO_IOMMU_INFO_PGSIZES),
	      "VFIO_IOMMU_GET_INFO pgsizes 0x%" PRIx64, (uint64_t)iommu_info.iova_pgsizes);

	size_t buf_size = 2 * 4096;
	uint8_t *buf = mmap(NULL, buf_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t iova = 0x100000;
	struct vfio_iommu_type1_dma_map map = {
		.argsz = sizeof(map), .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)buf, .iova = iova, .size = buf_size,
	};
	CHECK(ioctl(container, VFIO_IOMMU_MAP_DMA, &map) == 0, "VFIO_IOMMU_MAP_DMA iova 0x%" PRIx64 " size 0x%zx", iova, buf_size);

	device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
	CHECK(device >= 0, "VFIO_GROUP_GET_DEVICE_FD %s", bdf);
	if (device < 0)
		return 1;
	CHECK(fcntl(device, F_GETFD) & FD_CLOEXEC, "device fd is close-on-exec");

	struct vfio_device_info dinfo = { .argsz = sizeof(dinfo) };
	CHECK(ioctl(device, VFIO_DEVICE_GET_INFO, &dinfo) == 0 && (dinfo.flags & VFIO_DEVICE_FLAGS_PCI),
	      "VFIO_DEVICE_GET_INFO pci, %u regions, %u irqs", dinfo.num_regions, dinfo.num_irqs);

	struct vfio_region_info reg = { .argsz = sizeof(reg), .index = VFIO_PCI_BAR0_REGION_INDEX };
	CHECK(ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &reg) == 0 && reg.size == 1 << 20,
	      "BAR0 region: size 0x%" PRIx64 " offset 0x%" PRIx64, (uint64_t)reg.size, (uint64_t)reg.offset);
	bar0_off = reg.offset;
	struct vfio_region_info cfg = { .argsz = sizeof(cfg), .index = VFIO_PCI_CONFIG_REGION_INDEX };
	CHECK(ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &cfg) == 0, "config region: size 0x%" PRIx64, (uint64_t)cfg.size);
	config_off = cfg.offset;

	uint16_t ids[2] = { 0, 0 };
	CHECK(pread(device, ids, 4, config_off) == 4 && ids[0] == 0x1234 && ids[1] == 0x11e8,
	      "config space IDs %04x:%04x", ids[0], ids[1]);
	uint16_t cmd = 0;
	pread(device, &cmd, 2, config_off + 4);
	cmd |= 0x6; /* memory space + bus master */
	CHECK(pwrite(device, &cmd, 2, config_off + 4) == 2, "enable memory and bus mastering");

	CHECK(rd32(EDU_ID) == 0x010000ed, "edu ID register 0x%08x", rd32(EDU_ID));
	wr32(EDU_LIVENESS, 0x12345678);
	CHECK(rd32(EDU_LIVENESS) == ~0x12345678u, "edu liveness inverts 0x12345678");

	wr32(EDU_FACTORIAL, 10);
	CHECK(wait_idle(EDU_STATUS, 0x1) == 0 && rd32(EDU_FACTORIAL) == 3628800, "edu factorial 10! = %u", rd32(EDU_FACTORIAL));

	/* DMA: RAM -> device buffer -> RAM, through the IOMMU mapping. */
	for (int i = 0; i < 64; i++)
		buf[i] = (uint8_t)(i * 7 + 1);
	wr64(EDU_DMA_SRC, iova);
	wr64(EDU_DMA_DST, EDU_DMA_BUF);
	wr64(EDU_DMA_COUNT, 64);
	wr64(EDU_DMA_CMD, EDU_DMA_START);
	int to_dev = wait_idle(EDU_DMA_CMD, EDU_DMA_START);
	wr64(EDU_DMA_SRC, EDU_DMA_BUF);
	wr64(EDU_DMA_DST, iova + 4096);
	wr64(EDU_DMA_COUNT, 64);
	wr64(EDU_DMA_CMD, EDU_DMA_START | EDU_DMA_TO_RAM);
	int to_ram = wait_idle(EDU_DMA_CMD, EDU_DMA_START);
	CHECK(to_dev == 0 && to_ram == 0 && memcmp(buf, buf + 4096, 64) == 0, "edu DMA round trip of 64 bytes");

	/* MSI: one vector into an eventfd, raised by the edu IRQ register. */
	struct vfio_irq_info irq = { .argsz = sizeof(irq), .index = VFIO_PCI_MSI_IRQ_INDEX };
	CHECK(ioctl(device, VFIO_DEVICE_GET_IRQ_INFO, &irq) == 0 && irq.count == 1, "MSI irq info: %u vector(s)", irq.count);
	int efd = eventfd(0, EFD_CLOEXEC);
	char irqbuf[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
	struct vfio_irq_set *set = (struct vfio_irq_set *)irqbuf;
	set->argsz = sizeof(irqbuf);
	set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
	set->index = VFIO_PCI_MSI_IRQ_INDEX;
	set->start = 0;
	set->count = 1;
	memcpy(set->data, &efd, sizeof(int32_t));
	CHECK(ioctl(device, VFIO_DEVICE_SET_IRQS, set) == 0, "VFIO_DEVICE_SET_IRQS MSI -> eventfd");
	wr32(EDU_IRQ_RAISE, 0x42);
	CHECK(wait_eventfd(efd, 5000) > 0, "MSI arrived on the eventfd");
	CHECK(rd32(EDU_IRQ_STATUS) == 0x42, "edu IRQ status 0x%x", rd32(EDU_IRQ_STATUS));
	wr32(EDU_IRQ_ACK, 0x42);
	set->argsz = sizeof(struct vfio_irq_set);
	set->flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
	set->count = 0;
	CHECK(ioctl(device, VFIO_DEVICE_SET_IRQS, set) == 0, "disable MSI");

	/* INTx: with MSI off, edu raises its pin.  vfio-pci signals the eventfd and
	 * masks the line (automask) until the driver unmasks it; a level still
	 * asserted at the unmask is signalled again at once. */
	struct vfio_irq_info intx = { .argsz = sizeof(intx), .index = VFIO_PCI_INTX_IRQ_INDEX };
	CHECK(ioctl(device, VFIO_DEVICE_GET_IRQ_INFO, &intx) == 0 && intx.count == 1 &&
	      (intx.flags & VFIO_IRQ_INFO_AUTOMASKED), "INTx irq info: %u line, automasked", intx.count);
	set->argsz = sizeof(irqbuf);
	set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
	set->index = VFIO_PCI_INTX_IRQ_INDEX;
	set->start = 0;
	set->count = 1;
	memcpy(set->data, &efd, sizeof(int32_t));
	CHECK(ioctl(device, VFIO_DEVICE_SET_IRQS, set) == 0, "VFIO_DEVICE_SET_IRQS INTx -> eventfd");
	wr32(EDU_IRQ_RAISE, 0x1);
	CHECK(wait_eventfd(efd, 5000) > 0, "INTx arrived on the eventfd");
	wr32(EDU_IRQ_ACK, 0x1);         /* the line drops; the IRQ stays masked */
	wr32(EDU_IRQ_RAISE, 0x2);       /* raised again while masked */
	CHECK(wait_eventfd(efd, 100) < 0, "INTx stays masked until unmasked (automask)");
	set->argsz = sizeof(struct vfio_irq_set);
	set->flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK;
	set->count = 1;
	CHECK(ioctl(device, VFIO_DEVICE_SET_IRQS, set) == 0 && wait_eventfd(efd, 5000) > 0,
	      "VFIO_DEVICE_SET_IRQS unmask: the pending INTx arrives");
	CHECK(rd32(EDU_IRQ_STATUS) == 0x2, "edu IRQ status 0x%x", rd32(EDU_IRQ_STATUS));
	wr32(EDU_IRQ_ACK, 0x2);
	CHECK(ioctl(device, VFIO_DEVICE_SET_IRQS, set) == 0, "unmask after the acknowledge");
	set->flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
	set->count = 0;
	CHECK(ioctl(device, VFIO_DEVICE_SET_IRQS, set) == 0, "disable INTx");

	struct vfio_iommu_type1_dma_unmap unmap = { .argsz = sizeof(unmap), .iova = iova, .size = buf_size };
	CHECK(ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap) == 0 && unmap.size == buf_size, "VFIO_IOMMU_UNMAP_DMA");

	close(efd);
	close(device);
	close(group);
	close(container);
	printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
	return failures ? 1 : 0;
}
