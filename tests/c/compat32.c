/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A 32-bit server for one ABUSE device, through the driver's compat_ioctl:
 * a forked child writes a pattern through the block device and reads it
 * back; this process serves both requests from memory with GET_STATUS,
 * GET_BIO and PUT_BIO. Exits 0 only if the child saw its data again.
 *
 *   abuse-compat32 /dev/abctlN /dev/abuseN     (device of at most 1 MiB)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <abuse.h>

#define STORE (1 << 20)
#define AT 8192
#define LEN 4096

static char store[STORE];
static char data[4 * (ABUSE_MAX_BIO_BYTES + ABUSE_DATA_ALIGN)] __attribute__((aligned(4096)));

static int fail(const char *what)
{
	fprintf(stderr, "compat32: %s: %s\n", what, strerror(errno));
	return 1;
}

static int client(const char *dev)
{
	void *buf;
	int fd = open(dev, O_RDWR | O_DIRECT);

	if (fd < 0 || posix_memalign(&buf, 4096, LEN))
		return 2;
	for (int i = 0; i < LEN; i++)
		((unsigned char *)buf)[i] = (unsigned char)(i * 7 + 3);
	if (pwrite(fd, buf, LEN, AT) != LEN)
		return 3;
	memset(buf, 0, LEN);
	if (pread(fd, buf, LEN, AT) != LEN)
		return 4;
	for (int i = 0; i < LEN; i++)
		if (((unsigned char *)buf)[i] != (unsigned char)(i * 7 + 3))
			return 5;
	return 0;
}

int main(int argc, char **argv)
{
	struct abuse_status st;
	struct abuse_bio bios[4];
	int fd, status, served = 0;
	pid_t child;
	time_t deadline = time(NULL) + 20;

	if (argc != 3 || sizeof(void *) != 4) {
		fprintf(stderr, "usage: abuse-compat32 CTL DEV (a 32-bit build)\n");
		return 2;
	}
	fd = open(argv[1], O_RDWR);
	if (fd < 0)
		return fail("open");
	memset(&st, 0, sizeof(st));
	if (ioctl(fd, ABUSE_GET_STATUS, &st))
		return fail("GET_STATUS");
	if (!(st.flags & ABUSE_FLAG_CONFIGURED) || st.size > STORE || st.version != ABUSE_VERSION) {
		fprintf(stderr, "compat32: unexpected status: size %llu flags %#x version %u\n",
			(unsigned long long)st.size, st.flags, st.version);
		return 1;
	}
	child = fork();
	if (child == 0)
		_exit(client(argv[2]));
	while (served < 2 && time(NULL) < deadline) {
		struct abuse_xfer x = {
			.bios = (uintptr_t)bios, .data = (uintptr_t)data,
			.data_len = sizeof(data), .count = 4,
		};
		struct pollfd p = { .fd = fd, .events = POLLIN };

		if (ioctl(fd, ABUSE_GET_BIO, &x)) {
			if (errno != ENOMSG)
				return fail("GET_BIO");
			poll(&p, 1, 100);
			continue;
		}
		for (unsigned i = 0; i < x.count; i++) {
			struct abuse_bio *b = &bios[i];
			char *payload = (char *)(uintptr_t)b->addr;
			uint64_t off = b->sector << ABUSE_SECTOR_SHIFT;

			b->result = ABUSE_RESULT_OKAY;
			if (off + b->len > STORE)
				b->result = ABUSE_RESULT_MEDIA_FAILURE;
			else if (b->cmd == ABUSE_CMD_WRITE)
				memcpy(store + off, payload, b->len);
			else if (b->cmd == ABUSE_CMD_READ)
				memcpy(payload, store + off, b->len);
		}
		struct abuse_xfer put = { .bios = (uintptr_t)bios, .count = x.count };
		if (ioctl(fd, ABUSE_PUT_BIO, &put))
			return fail("PUT_BIO");
		served += x.count;
	}
	if (waitpid(child, &status, 0) != child)
		return fail("waitpid");
	if (!WIFEXITED(status) || WEXITSTATUS(status)) {
		fprintf(stderr, "compat32: the client failed (status %#x) after %d requests\n", status, served);
		return 1;
	}
	printf("compat32: ok, %d requests served\n", served);
	return 0;
}
