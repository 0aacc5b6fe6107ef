/*
 * readloop: open, read and close one file as fast as possible, the way a
 * pod process reads its secret, and print the operations per second.
 *
 *   readloop PATH SECONDS
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char *argv[])
{
	static char buf[65536];
	double start, end;
	long ops = 0;
	int fd;

	if (argc != 3) {
		fprintf(stderr, "usage: %s PATH SECONDS\n", argv[0]);
		return 2;
	}
	start = now();
	end = start + atof(argv[2]);
	do {
		for (int i = 0; i < 64; i++) {
			fd = open(argv[1], O_RDONLY);
			if (fd < 0 || read(fd, buf, sizeof(buf)) < 0) {
				perror(argv[1]);
				return 1;
			}
			close(fd);
			ops++;
		}
	} while (now() < end);
	printf("%.0f\n", ops / (now() - start));
	return 0;
}
