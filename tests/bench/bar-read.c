/* Runs inside a scripts/guest guest for scripts/bench: the time of one 4-byte read of a BAR register.
 *
 *   bar-read RESOURCE_FILE OFFSET N [OFFSET N]...
 *
 * Maps the BAR through sysfs (/sys/bus/pci/devices/BDF/resourceN, as a
 * user-space driver does), reads OFFSET N times after N/10 untimed reads,
 * and prints "OFFSET ns_per_read value" for each pair, OFFSET in hex.
 * The guest kernel boots with iomem=relaxed, so the BAR maps whether or not
 * a driver holds it.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	struct stat st;
	volatile uint32_t *bar;
	int fd, i;

	if (argc < 4 || argc % 2) {
		fprintf(stderr, "usage: bar-read RESOURCE_FILE OFFSET N [OFFSET N]...\n");
		return 2;
	}
	fd = open(argv[1], O_RDWR | O_SYNC);
	if (fd < 0 || fstat(fd, &st)) {
		perror(argv[1]);
		return 1;
	}
	bar = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (bar == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	for (i = 2; i < argc; i += 2) {
		unsigned long offset = strtoul(argv[i], NULL, 0);
		long n = strtol(argv[i + 1], NULL, 0), k;
		uint32_t value = 0;
		double t0;

		if (offset % 4 || offset + 4 > (unsigned long)st.st_size || n <= 0) {
			fprintf(stderr, "bar-read: offset 0x%lx or count %ld does not fit the BAR\n", offset, n);
			return 2;
		}
		for (k = 0; k < n / 10; k++)
			value = bar[offset / 4];
		t0 = now_ns();
		for (k = 0; k < n; k++)
			value = bar[offset / 4];
		printf("0x%lx %.1f 0x%x\n", offset, (now_ns() - t0) / n, value);
	}
	return 0;
}
