/*
 * ioctl-loop: the client scripts/bench runs against every server at once.
 *
 *   ioctl-loop N ROUNDS LABEL=CONTAINER,GROUP ...
 *
 * For each target, VFIO_GET_API_VERSION on CONTAINER and VFIO_GROUP_GET_STATUS
 * on GROUP, N calls a round after a warm-up of N/10.  Rounds of the targets
 * alternate (target A, target B, A, B, ...), so a load that comes and goes on
 * the machine falls on all of them alike.  Prints, per target, the median
 * round as nanoseconds per call:  LABEL api_ns=... status_ns=...
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <linux/vfio.h>

#define MAX_TARGETS 8
#define MAX_ROUNDS 64

struct target {
	char label[64];
	int container, group;
	double api[MAX_ROUNDS], status[MAX_ROUNDS];
};

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

static int api(int fd) { return ioctl(fd, VFIO_GET_API_VERSION); }

static int status(int fd)
{
	struct vfio_group_status st = { .argsz = sizeof(st) };
	return ioctl(fd, VFIO_GROUP_GET_STATUS, &st);
}

/* n calls of op on fd; ns per call */
static double round_ns(int (*op)(int), int fd, long n, const char *what)
{
	double t0 = now_ns();
	for (long i = 0; i < n; i++)
		if (op(fd) < 0) {
			perror(what);
			exit(1);
		}
	return (now_ns() - t0) / n;
}

static int open_target(struct target *t, const char *spec)
{
	char container[1024], group[1024];
	const char *eq = strchr(spec, '='), *comma = eq ? strchr(eq, ',') : NULL;

	if (!eq || !comma || eq - spec >= (long)sizeof(t->label) || comma - eq - 1 >= (long)sizeof(container) ||
	    strlen(comma + 1) >= sizeof(group))
		return -1;
	snprintf(t->label, sizeof(t->label), "%.*s", (int)(eq - spec), spec);
	snprintf(container, sizeof(container), "%.*s", (int)(comma - eq - 1), eq + 1);
	snprintf(group, sizeof(group), "%s", comma + 1);
	t->container = open(container, O_RDWR);
	if (t->container < 0) {
		perror(container);
		return -1;
	}
	t->group = open(group, O_RDWR);
	if (t->group < 0) {
		perror(group);
		return -1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	static struct target targets[MAX_TARGETS];
	int count = argc - 3;

	if (argc < 4 || count > MAX_TARGETS) {
		fprintf(stderr, "usage: %s N ROUNDS LABEL=CONTAINER,GROUP ...\n", argv[0]);
		return 2;
	}
	long n = atol(argv[1]);
	int rounds = atoi(argv[2]);
	if (n < 10 || rounds < 1 || rounds > MAX_ROUNDS) {
		fprintf(stderr, "%s: N >= 10 and 1 <= ROUNDS <= %d\n", argv[0], MAX_ROUNDS);
		return 2;
	}
	for (int i = 0; i < count; i++)
		if (open_target(&targets[i], argv[3 + i]))
			return 1;
	for (int i = 0; i < count; i++) {
		round_ns(api, targets[i].container, n / 10, "warm-up");
		round_ns(status, targets[i].group, n / 10, "warm-up");
	}
	for (int r = 0; r < rounds; r++)
		for (int i = 0; i < count; i++) {
			targets[i].api[r] = round_ns(api, targets[i].container, n, "VFIO_GET_API_VERSION");
			targets[i].status[r] = round_ns(status, targets[i].group, n, "VFIO_GROUP_GET_STATUS");
		}
	for (int i = 0; i < count; i++)
		printf("%s api_ns=%.0f status_ns=%.0f\n", targets[i].label, median(targets[i].api, rounds),
		       median(targets[i].status, rounds));
	return 0;
}
