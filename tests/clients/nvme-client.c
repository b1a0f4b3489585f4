/*
 * nvme-client: a user-space NVMe driver in miniature, written only against
 * <linux/vfio.h> and the NVMe 1.4 register map, as libvfn or SPDK drive a
 * controller through VFIO.
 *
 *   nvme-client DEV_DIR GROUP BDF
 *
 * Container, group, device fd; bus mastering; 64 KiB of DMA memory mapped at
 * IOVA 0x10000000; MSI-X vector 0 on an eventfd; admin queues, CC.EN and
 * CSTS.RDY; Identify Controller; one I/O queue pair; a 4 KiB Write then a
 * 4 KiB Read of LBA 8 through a PRP1 with an offset and a PRP2; a Read into
 * an IOVA nobody mapped.  One observation a line: name=value (negative
 * values are -errno; statuses are the completion's Status Field >> 1).
 */
#include <errno.h>
#include <fcntl.h>
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
#include <linux/vfio.h>

#define CFG(off) (((off_t)VFIO_PCI_CONFIG_REGION_INDEX << 40) + (off))
#define BAR0(off) (((off_t)VFIO_PCI_BAR0_REGION_INDEX << 40) + (off))
#define IOVA 0x10000000ULL
#define PAGE 4096
#define MEM_SIZE (16 * PAGE)

/* where things live in the DMA memory, in pages */
enum { ASQ = 0, ACQ = 1, IDENT = 2, IOSQ = 3, IOCQ = 4, DATA = 5 /* and 6 */, SPARE = 8 };

struct sqe {
	uint8_t opcode, flags;
	uint16_t cid;
	uint32_t nsid;
	uint64_t rsvd, mptr, prp1, prp2;
	uint32_t cdw10, cdw11, cdw12, cdw13, cdw14, cdw15;
};

struct cqe {
	uint32_t dw0, dw1;
	uint16_t sqhd, sqid, cid, status;
};

static int dev;
static uint8_t *mem;

static int rc(int r) { return r < 0 ? -errno : r; }
static void say(const char *k, long v) { printf("%s=%ld\n", k, v); fflush(stdout); }
static uint32_t rd32(off_t off) { uint32_t v = 0; if (pread(dev, &v, 4, off) != 4) say("pread_failed", -errno); return v; }
static void wr32(off_t off, uint32_t v) { if (pwrite(dev, &v, 4, off) != 4) say("pwrite_failed", -errno); }
static void nap(void) { struct timespec t = { 0, 1000000 }; nanosleep(&t, NULL); }

/* Submit one command on queue qid (entries deep) and poll its completion by the phase tag. */
static int submit(int qid, int entries, int sq_page, int cq_page, struct sqe *cmd, uint32_t *dw0)
{
	static unsigned tail[2], head[2];
	static int phase[2] = { 1, 1 };
	struct cqe *cq = (struct cqe *)(mem + cq_page * PAGE);

	memcpy(mem + sq_page * PAGE + tail[qid] * 64, cmd, 64);
	tail[qid] = (tail[qid] + 1) % entries;
	__sync_synchronize();
	wr32(BAR0(0x1000 + 8 * qid), tail[qid]);
	for (int i = 0; i < 10000; i++) {
		volatile struct cqe *e = &cq[head[qid]];
		if ((e->status & 1) == phase[qid]) {
			int status = e->status >> 1;
			if (dw0)
				*dw0 = e->dw0;
			if (e->cid != cmd->cid)
				say("wrong_cid", e->cid);
			head[qid] = (head[qid] + 1) % entries;
			if (!head[qid])
				phase[qid] ^= 1;
			wr32(BAR0(0x1000 + 8 * qid + 4), head[qid]);
			return status;
		}
		nap();
	}
	return -ETIMEDOUT;
}

int main(int argc, char **argv)
{
	char path[4096];
	if (argc != 4)
		return 2;
	snprintf(path, sizeof path, "%s/vfio", argv[1]);
	int c = open(path, O_RDWR);
	snprintf(path, sizeof path, "%s/%s", argv[1], argv[2]);
	int g = open(path, O_RDWR);
	say("set_container", rc(ioctl(g, VFIO_GROUP_SET_CONTAINER, &c)));
	say("set_iommu", rc(ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)));
	dev = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, argv[3]);
	say("device", dev >= 0 ? 0 : -errno);
	if (dev < 0)
		return 1;

	say("vendor_device", rd32(CFG(0)));
	say("class_rev", rd32(CFG(8)));
	uint16_t cmd = 0;
	pread(dev, &cmd, 2, CFG(4));
	cmd |= 0x6; /* memory decode, bus master */
	pwrite(dev, &cmd, 2, CFG(4));

	mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	memset(mem, 0, MEM_SIZE);
	struct vfio_iommu_type1_dma_map map = { .argsz = sizeof map, .flags = 3, .vaddr = (uintptr_t)mem,
						 .iova = IOVA, .size = MEM_SIZE };
	say("map_dma", rc(ioctl(c, VFIO_IOMMU_MAP_DMA, &map)));

	int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	struct { struct vfio_irq_set s; int32_t fd; } irq = {
		{ .argsz = sizeof irq, .flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
		  .index = VFIO_PCI_MSIX_IRQ_INDEX, .start = 0, .count = 1 }, efd };
	say("msix", rc(ioctl(dev, VFIO_DEVICE_SET_IRQS, &irq)));

	say("vs", rd32(BAR0(0x08)));
	say("cap_mqes", rd32(BAR0(0x00)) & 0xffff);
	wr32(BAR0(0x24), (31 << 16) | 31);
	wr32(BAR0(0x28), IOVA + ASQ * PAGE);
	wr32(BAR0(0x2c), (IOVA + ASQ * PAGE) >> 32);
	wr32(BAR0(0x30), IOVA + ACQ * PAGE);
	wr32(BAR0(0x34), (IOVA + ACQ * PAGE) >> 32);
	wr32(BAR0(0x14), (4 << 20) | (6 << 16) | 1);
	int ready = 0;
	for (int i = 0; i < 5000 && !ready; i++) {
		ready = rd32(BAR0(0x1c)) & 1;
		if (!ready)
			nap();
	}
	say("ready", ready);

	struct sqe id = { .opcode = 0x06, .cid = 1, .prp1 = IOVA + IDENT * PAGE, .cdw10 = 1 };
	say("identify", submit(0, 32, ASQ, ACQ, &id, NULL));
	say("sn_ok", !memcmp(mem + IDENT * PAGE + 4, "CLIENT01", 8));
	say("vid", *(uint16_t *)(mem + IDENT * PAGE));
	struct pollfd p = { efd, POLLIN, 0 };
	say("msix_signalled", poll(&p, 1, 5000) == 1);

	struct sqe cq = { .opcode = 0x05, .cid = 2, .prp1 = IOVA + IOCQ * PAGE, .cdw10 = 1 | (15 << 16), .cdw11 = 1 };
	struct sqe sq = { .opcode = 0x01, .cid = 3, .prp1 = IOVA + IOSQ * PAGE, .cdw10 = 1 | (15 << 16),
			  .cdw11 = 1 | (1 << 16) };
	say("create_cq", submit(0, 32, ASQ, ACQ, &cq, NULL));
	say("create_sq", submit(0, 32, ASQ, ACQ, &sq, NULL));

	uint8_t *data = mem + DATA * PAGE + 0x200;
	for (int i = 0; i < 4096; i++)
		data[i] = (uint8_t)(i * 13 + 1);
	struct sqe w = { .opcode = 0x01, .cid = 4, .nsid = 1, .prp1 = IOVA + DATA * PAGE + 0x200,
			 .prp2 = IOVA + (DATA + 1) * PAGE, .cdw10 = 8, .cdw12 = 7 };
	say("write", submit(1, 16, IOSQ, IOCQ, &w, NULL));
	memset(data, 0, 4096);
	struct sqe r = w;
	r.opcode = 0x02;
	r.cid = 5;
	say("read", submit(1, 16, IOSQ, IOCQ, &r, NULL));
	int same = 1;
	for (int i = 0; i < 4096; i++)
		same &= data[i] == (uint8_t)(i * 13 + 1);
	say("read_back", same);
	struct sqe bad = r;
	bad.cid = 6;
	bad.prp1 = IOVA + MEM_SIZE + 0x200; /* nobody mapped it */
	bad.prp2 = IOVA + MEM_SIZE + PAGE;
	say("unmapped_read", submit(1, 16, IOSQ, IOCQ, &bad, NULL));
	struct sqe flush = { .opcode = 0x00, .cid = 7, .nsid = 1 };
	say("flush", submit(1, 16, IOSQ, IOCQ, &flush, NULL));
	say("csts", rd32(BAR0(0x1c)));
	return 0;
}
