/*
 * ioctl-loop: the client scripts/bench runs against every server.
 *
 *   ioctl-loop CONTAINER GROUP N ROUNDS
 *
 * VFIO_GET_API_VERSION on CONTAINER and VFIO_GROUP_GET_STATUS on GROUP, each
 * N times per round after a warm-up of N/10, ROUNDS rounds; prints the median
 * round as nanoseconds per call:  api_ns=... status_ns=...
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <linux/vfio.h>

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

static int api(int fd) { return ioctl(fd, VFIO_GET_API_VERSION); }

static int status(int fd)
{
	struct vfio_group_status st = { .argsz = sizeof(st) };
	return ioctl(fd, VFIO_GROUP_GET_STATUS, &st);
}

static double median_ns(int (*op)(int), int fd, long n, int rounds, const char *what)
{
	double per[64];
	long i;

	for (i = 0; i < n / 10; i++)
		if (op(fd) < 0) {
			perror(what);
			exit(1);
		}
	for (int r = 0; r < rounds; r++) {
		double t0 = now_ns();
		for (i = 0; i < n; i++)
			if (op(fd) < 0) {
				perror(what);
				exit(1);
			}
		per[r] = (now_ns() - t0) / n;
	}
	qsort(per, rounds, sizeof(per[0]), cmp);
	return per[rounds / 2];
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s CONTAINER GROUP N ROUNDS\n", argv[0]);
		return 2;
	}
	long n = atol(argv[3]);
	int rounds = atoi(argv[4]);
	int c = open(argv[1], O_RDWR), g = open(argv[2], O_RDWR);

	if (c < 0 || g < 0 || n < 10 || rounds < 1 || rounds > 64) {
		perror("open");
		return 1;
	}
	printf("api_ns=%.0f ", median_ns(api, c, n, rounds, "VFIO_GET_API_VERSION"));
	printf("status_ns=%.0f\n", median_ns(status, g, n, rounds, "VFIO_GROUP_GET_STATUS"));
	return 0;
}
