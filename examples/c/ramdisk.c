/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * ramdisk: an ABUSE server in C, against abuse-sys/include/abuse.h alone.
 *
 *   ramdisk [-s SIZE] [-b BLOCK_SIZE] [-t THREADS] CTL STORE
 *
 *   ramdisk -s 1G /dev/abctl0 /dev/shm/ram0     # set up /dev/abuse0, serve it
 *   ramdisk /dev/abctl0 /dev/shm/ram0           # serve it as it is set up
 *
 * The RAM is a shared-memory file, STORE (on tmpfs: /dev/shm), mapped
 * MAP_SHARED: every WRITE is in it before it is acknowledged, so a server
 * that dies (kill -9, a crash, an upgrade) loses nothing it acknowledged.
 * The next server, given the same STORE, finds the data and serves on; the
 * requests the dead one had fetched are handed out again by the driver. The
 * store lives as long as the file: it does not survive a reboot, and FLUSH
 * (an fdatasync of STORE, nothing on tmpfs) cannot make it. Remove the file
 * to free the memory (after a RESET of the device).
 *
 * THREADS workers (default: one per hardware queue) each loop on ABUSE_SERVE:
 * one call completes the batch the worker ran and fetches the next. A READ
 * is completed with `addr` pointing into the store itself, so the driver
 * copies its data straight from there; a WRITE's payload is copied from the
 * batch buffer into the store; DISCARD and WRITE_ZEROES punch a hole in STORE
 * (WRITE_ZEROES with NOUNMAP writes zeroes). SIGINT or SIGTERM: each worker
 * completes what it holds and the server exits 0. A RESET or reconfiguration
 * of the device under it stops it (exit 1).
 *
 * Build: cc -O2 -Wall -Wextra -Werror -pthread -I abuse-sys/include \
 *            examples/c/ramdisk.c -o ramdisk      (or: make -C examples/c)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <abuse.h>

#define BATCH 16
#define WAIT_MS 500
#define MAX_THREADS 64
#define FEATURES (ABUSE_FLAG_FLUSH | ABUSE_FLAG_FUA | ABUSE_FLAG_DISCARD | ABUSE_FLAG_WRITE_ZEROES)

static const char *ctl_path, *store_path;
static int ctl_fd, store_fd;
static unsigned char *store;
static uint64_t store_size;
static uint64_t generation;
static uint32_t max_bytes, queues;
static atomic_bool stopping, failed;
/* After a failed fdatasync every later FLUSH fails (Linux forgets the
 * pages it could not write back: the next fdatasync would succeed). */
static atomic_int sync_errno;

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
	va_list ap;

	fputs("ramdisk: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static void usage(int code) __attribute__((noreturn));
static void usage(int code)
{
	fprintf(code ? stderr : stdout,
		"usage: ramdisk [-s SIZE] [-b BLOCK_SIZE] [-t THREADS] CTL STORE\n"
		"  Serves the ABUSE device of control node CTL (/dev/abctlN) from RAM:\n"
		"  STORE, a shared-memory file (/dev/shm/NAME), created if missing.\n"
		"  A restarted server given the same STORE finds its data.\n"
		"  -s SIZE        set the device up first (bytes, or with K, M, G, T),\n"
		"                 unless it already is (then SIZE must match)\n"
		"  -b BLOCK_SIZE  with -s: the logical block size (default 4096)\n"
		"  -t THREADS     worker threads (default: one per hardware queue)\n");
	exit(code);
}

/* "64M" -> 67108864; 0 on a malformed size. */
static uint64_t parse_size(const char *s)
{
	char *end;
	unsigned long long v;
	int shift = 0;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s)
		return 0;
	switch (*end) {
	case 'T': case 't': shift += 10; /* fall through */
	case 'G': case 'g': shift += 10; /* fall through */
	case 'M': case 'm': shift += 10; /* fall through */
	case 'K': case 'k': shift += 10; end++; break;
	case '\0': break;
	default: return 0;
	}
	if (*end || v > (ULLONG_MAX >> shift))
		return 0;
	return (uint64_t)v << shift;
}

static void get_status(struct abuse_status *st)
{
	memset(st, 0, sizeof(*st));
	if (ioctl(ctl_fd, ABUSE_GET_STATUS, st) < 0)
		die("%s: GET_STATUS: %s", ctl_path, strerror(errno));
}

/* Configures the device (size bytes) unless it already is; returns its status. */
static void set_up(struct abuse_status *st, uint64_t size, uint32_t bs)
{
	struct abuse_status want = {
		.size = size,
		.block_size = bs,
		.queue_depth = ABUSE_DEFAULT_QUEUE_DEPTH,
		.flags = FEATURES,
		.timeout_ms = ABUSE_DEFAULT_TIMEOUT_MS,
	};

	if (ioctl(ctl_fd, ABUSE_SET_STATUS, &want) < 0) {
		if (errno == EINVAL)
			die("%s: SET_STATUS refused size %" PRIu64 " with block size %u: the size must be a "
			    "non-zero multiple of a block size that is a power of two in 512-4096",
			    ctl_path, size, bs);
		if (errno == EBUSY) {
			/* Set up meanwhile by another server, or still open
			 * from a configuration before a RESET. */
			get_status(st);
			if (st->flags & ABUSE_FLAG_CONFIGURED)
				return;
			die("%s: SET_STATUS: device is busy: /dev/abuse%u is still open from its previous "
			    "configuration (unmount it first)", ctl_path, st->index);
		}
		die("%s: SET_STATUS: %s", ctl_path, strerror(errno));
	}
	get_status(st);
}

/* Opens (or creates) the store and maps it; it must hold `size` bytes. */
static void open_store(uint64_t size)
{
	struct stat sb;

	store_fd = open(store_path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (store_fd < 0)
		die("%s: cannot open the store: %s", store_path, strerror(errno));
	if (fstat(store_fd, &sb) < 0)
		die("%s: %s", store_path, strerror(errno));
	if (!S_ISREG(sb.st_mode))
		die("%s: the store must be a regular file (a name in /dev/shm)", store_path);
	if (sb.st_size == 0) {
		if (ftruncate(store_fd, (off_t)size) < 0)
			die("%s: cannot make it %" PRIu64 " bytes: %s", store_path, size, strerror(errno));
	} else if ((uint64_t)sb.st_size != size) {
		die("%s holds %jd bytes but the device is %" PRIu64 ": it is another device's store "
		    "(remove it to start from zeroes)", store_path, (intmax_t)sb.st_size, size);
	}
	if (size > SIZE_MAX)
		die("%s: %" PRIu64 " bytes cannot be mapped", store_path, size);
	store = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, store_fd, 0);
	if (store == MAP_FAILED)
		die("%s: cannot map %" PRIu64 " bytes: %s", store_path, size, strerror(errno));
	store_size = size;
}

static void fail(struct abuse_bio *b, int err)
{
	b->result = ABUSE_RESULT_MEDIA_FAILURE;
	b->flags = ABUSE_BIO_ERRNO;
	b->error = (uint32_t)err;
}

/* Zeroes [off, off+len) of the store, freeing its pages if `unmap`. */
static int zero(uint64_t off, uint32_t len, int unmap)
{
	if (unmap && fallocate(store_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, len) == 0)
		return 0;
	if (unmap && errno != EOPNOTSUPP)
		return errno;
	memset(store + off, 0, len);
	return 0;
}

static int sync_store(void)
{
	int err = atomic_load(&sync_errno);

	if (err)
		return err;
	if (fdatasync(store_fd) < 0) {
		err = errno;
		atomic_store(&sync_errno, err);
		fprintf(stderr, "ramdisk: %s: fdatasync: %s (every later FLUSH fails)\n", store_path,
			strerror(err));
	}
	return err;
}

/* Runs one request, setting its result (and for a READ, where its data is). */
static void run(struct abuse_bio *b)
{
	uint64_t off = b->sector << ABUSE_SECTOR_SHIFT;
	uint16_t flags = b->flags;
	int err = 0;

	b->result = ABUSE_RESULT_OKAY;
	b->flags = 0;
	b->error = 0;
	if (b->cmd != ABUSE_CMD_FLUSH && (off > store_size || b->len > store_size - off)) {
		/* The driver fails these itself; never trust it blindly. */
		fail(b, EIO);
		return;
	}
	switch (b->cmd) {
	case ABUSE_CMD_READ:
		/* The driver copies the data from here when it completes. */
		b->addr = (uint64_t)(uintptr_t)(store + off);
		return;
	case ABUSE_CMD_WRITE:
		memcpy(store + off, (const void *)(uintptr_t)b->addr, b->len);
		if (flags & ABUSE_BIO_FUA)
			err = sync_store();
		break;
	case ABUSE_CMD_FLUSH:
		err = sync_store();
		break;
	case ABUSE_CMD_DISCARD:
		err = zero(off, b->len, 1);
		break;
	case ABUSE_CMD_WRITE_ZEROES:
		err = zero(off, b->len, !(flags & ABUSE_BIO_NOUNMAP));
		break;
	default:
		err = EOPNOTSUPP;
	}
	if (err)
		fail(b, err);
}

static void backoff(unsigned *delay_ms)
{
	struct timespec ts = { 0, (long)*delay_ms * 1000000L };

	nanosleep(&ts, NULL);
	if (*delay_ms < 100)
		*delay_ms *= 2;
}

/* Whether the device is still the configuration this server started on. */
static int same_device(void)
{
	struct abuse_status st;

	memset(&st, 0, sizeof(st));
	if (ioctl(ctl_fd, ABUSE_GET_STATUS, &st) < 0)
		return 0;
	return (st.flags & ABUSE_FLAG_CONFIGURED) && st.generation == generation;
}

/* Completes bios[0..held] with PUT_BIO, skipping those the driver no longer
 * has (ESTALE: the device was reset); used when the worker stops. */
static void complete(struct abuse_bio *bios, unsigned held)
{
	unsigned delay = 1;

	while (held) {
		struct abuse_xfer x = { .bios = (uintptr_t)bios, .count = held };
		unsigned done;

		if (ioctl(ctl_fd, ABUSE_PUT_BIO, &x) == 0)
			return;
		done = x.count < held ? x.count : held;
		if (errno == ESTALE) {
			done++;
		} else if (errno == EINTR || errno == EAGAIN || errno == ENOMEM || errno == EBUSY) {
			backoff(&delay);
		} else {
			fprintf(stderr, "ramdisk: %s: PUT_BIO: %s\n", ctl_path, strerror(errno));
			atomic_store(&failed, 1);
			return;
		}
		memmove(bios, bios + done, (held - done) * sizeof(*bios));
		held -= done;
	}
}

static void *worker(void *arg)
{
	uint32_t queue = (uint32_t)(uintptr_t)arg;
	struct abuse_bio bios[BATCH];
	size_t data_len = (size_t)BATCH * (max_bytes + ABUSE_DATA_ALIGN);
	void *data = mmap(NULL, data_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned held = 0, delay = 1;
	time_t checked = time(NULL);

	if (data == MAP_FAILED) {
		fprintf(stderr, "ramdisk: a %zu-byte buffer: %s\n", data_len, strerror(errno));
		atomic_store(&failed, 1);
		return NULL;
	}
	memset(bios, 0, sizeof(bios));
	while (!atomic_load(&stopping)) {
		struct abuse_serve x = {
			.bios = (uintptr_t)bios,
			.data = (uintptr_t)data,
			.data_len = data_len,
			.put = held,
			.count = BATCH,
			.queue = queue,
			.wait_ms = WAIT_MS,
		};

		if (ioctl(ctl_fd, ABUSE_SERVE, &x) < 0) {
			/* What completed is done; a request the driver no
			 * longer has (ESTALE: reset, or failed by a device
			 * failure) is dropped; transient errors are retried. */
			int err = errno;
			unsigned done = x.put < held ? x.put : held;

			if (err == ESTALE && done < held) {
				done++;
			} else if (err == EINTR || err == EAGAIN || err == ENOMEM || err == EBUSY) {
				backoff(&delay);
			} else {
				fprintf(stderr, "ramdisk: %s: SERVE: %s\n", ctl_path, strerror(err));
				atomic_store(&failed, 1);
				break;
			}
			memmove(bios, bios + done, (held - done) * sizeof(*bios));
			held -= done;
			continue;
		}
		held = 0;
		delay = 1;
		if (x.count == 0) {
			/* Idle: is the device still the one we set out to serve? */
			if (time(NULL) != checked) {
				checked = time(NULL);
				if (!same_device()) {
					fprintf(stderr, "ramdisk: %s: the device was reset or reconfigured "
						"(generation %" PRIu64 " is gone): stopping\n", ctl_path, generation);
					atomic_store(&failed, 1);
					break;
				}
			}
			continue;
		}
		for (unsigned i = 0; i < x.count; i++)
			run(&bios[i]);
		held = x.count;
	}
	complete(bios, held);
	munmap(data, data_len);
	return NULL;
}

int main(int argc, char **argv)
{
	struct abuse_status st;
	uint64_t size = 0;
	uint32_t bs = 4096;
	long threads = 0;
	pthread_t tids[MAX_THREADS];
	sigset_t sigs;
	int opt;

	while ((opt = getopt(argc, argv, "s:b:t:h")) != -1) {
		switch (opt) {
		case 's':
			size = parse_size(optarg);
			if (!size)
				die("-s %s: not a size (bytes, or a number with K, M, G or T)", optarg);
			break;
		case 'b':
			bs = (uint32_t)parse_size(optarg);
			if (bs < ABUSE_MIN_BLOCK_SIZE || bs > ABUSE_MAX_BLOCK_SIZE || (bs & (bs - 1)))
				die("-b %s: the block size is a power of two in 512-4096", optarg);
			break;
		case 't':
			threads = strtol(optarg, NULL, 10);
			if (threads < 1 || threads > MAX_THREADS)
				die("-t %s: between 1 and %d threads", optarg, MAX_THREADS);
			break;
		case 'h':
			usage(0);
		default:
			usage(2);
		}
	}
	if (argc - optind != 2)
		usage(2);
	ctl_path = argv[optind];
	store_path = argv[optind + 1];

	ctl_fd = open(ctl_path, O_RDWR | O_CLOEXEC);
	if (ctl_fd < 0) {
		if (errno == ENOENT)
			die("%s: no such device (is the abuse module loaded?)", ctl_path);
		if (errno == EACCES || errno == EPERM)
			die("%s: permission denied (serving needs root, or a device delegated to you)", ctl_path);
		die("%s: %s", ctl_path, strerror(errno));
	}
	get_status(&st);
	if (st.version < ABUSE_VERSION)
		die("%s: the driver speaks protocol version %u; this server needs %u", ctl_path, st.version,
		    ABUSE_VERSION);
	if (!(st.flags & ABUSE_FLAG_CONFIGURED)) {
		if (!size)
			die("%s: the device is not set up: give -s SIZE to set it up", ctl_path);
		/* The store first: a store of another size leaves the device as it was. */
		open_store(size);
		set_up(&st, size, bs);
	}
	if (size && st.size != size)
		die("%s: already set up with %" PRIu64 " bytes, not %" PRIu64 " (abusectl reset %s first)",
		    ctl_path, (uint64_t)st.size, size, ctl_path);
	if (!store)
		open_store(st.size);
	generation = st.generation;
	max_bytes = st.max_bytes ? st.max_bytes : ABUSE_MAX_BIO_BYTES;
	queues = st.queues ? st.queues : 1;
	if (!threads)
		threads = queues < MAX_THREADS ? queues : MAX_THREADS;

	/* Workers never see SIGINT/SIGTERM: this thread waits for them. */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	for (long i = 0; i < threads; i++) {
		int err = pthread_create(&tids[i], NULL, worker, (void *)(uintptr_t)(i % queues));

		if (err)
			die("cannot start a worker thread: %s", strerror(err));
	}
	printf("ramdisk: serving %s (/dev/abuse%u, %" PRIu64 " bytes) from %s with %ld threads\n", ctl_path,
	       st.index, (uint64_t)st.size, store_path, threads);
	fflush(stdout);
	while (!atomic_load(&failed)) {
		struct timespec tick = { 0, 200 * 1000000L };

		if (sigtimedwait(&sigs, NULL, &tick) > 0)
			break;
	}
	atomic_store(&stopping, 1);
	for (long i = 0; i < threads; i++)
		pthread_join(tids[i], NULL);
	return atomic_load(&failed) ? 1 : 0;
}
