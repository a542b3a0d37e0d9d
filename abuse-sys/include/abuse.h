/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * ABUSE: A Block device in User SpacE -- the user-space API for C servers.
 *
 * Mirrors abuse-sys/src/uapi.rs, the single source of truth; a host test
 * (abuse-sys/tests/c_layout.rs) checks every size, offset and ioctl number.
 */
#ifndef _UAPI_LINUX_ABUSE_H
#define _UAPI_LINUX_ABUSE_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define ABUSE_VERSION 5

/* The ioctl numbers assume the asm-generic _IOC layout, as the Rust uapi does. */
#if defined(__powerpc__) || defined(__mips__) || defined(__sparc__) 
#error "ABUSE's uapi assumes the asm-generic _IOC layout, which this architecture does not use"
#endif

/* struct abuse_status.flags */
#define ABUSE_FLAG_READ_ONLY     (1U << 0)
#define ABUSE_FLAG_RECONNECT     (1U << 1)
#define ABUSE_FLAG_FLUSH         (1U << 2)
#define ABUSE_FLAG_FUA           (1U << 3)
#define ABUSE_FLAG_DISCARD       (1U << 4)
#define ABUSE_FLAG_WRITE_ZEROES  (1U << 5)
#define ABUSE_FLAG_DELEGATED     (1U << 6)	/* owner_uid may serve it */
#define ABUSE_FLAG_SETTABLE      0x7fU
#define ABUSE_FLAG_CONFIGURED    (1U << 16)
#define ABUSE_FLAG_REPORTED      ABUSE_FLAG_CONFIGURED

/* struct abuse_bio.cmd */
#define ABUSE_CMD_READ           0
#define ABUSE_CMD_WRITE          1
#define ABUSE_CMD_FLUSH          2
#define ABUSE_CMD_DISCARD        3
#define ABUSE_CMD_WRITE_ZEROES   4

/* struct abuse_bio.flags */
#define ABUSE_BIO_FUA            (1U << 0)
#define ABUSE_BIO_REQUEUED       (1U << 1)
#define ABUSE_BIO_NOUNMAP        (1U << 2)
#define ABUSE_BIO_ERRNO          (1U << 3)
/* PUT_BIO of a successful READ: the data is all zeroes, nothing is read
 * from addr (protocol version 4) */
#define ABUSE_BIO_ZEROES         (1U << 4)
/* PUT_BIO of a successful READ or WRITE: the driver moves the data between
 * the request and file descriptor `error` at byte offset `addr` (protocol
 * version 5) */
#define ABUSE_BIO_FILE           (1U << 5)

/* struct abuse_xfer.flags (GET_BIO), struct abuse_serve.flags: fetch
 * descriptors only, no payload in the buffer (protocol version 5) */
#define ABUSE_XFER_DESCRIPTORS   (1U << 0)

/* struct abuse_bio.result */
#define ABUSE_RESULT_OKAY            0
#define ABUSE_RESULT_MEDIA_FAILURE   1
#define ABUSE_RESULT_DEVICE_FAILURE  2

#define ABUSE_MIN_BLOCK_SIZE       512
#define ABUSE_MAX_BLOCK_SIZE       4096
#define ABUSE_DEFAULT_QUEUE_DEPTH  128
#define ABUSE_MAX_QUEUE_DEPTH      1024
#define ABUSE_MAX_QUEUES           32
#define ABUSE_MAX_BATCH            256
#define ABUSE_MAX_BIO_BYTES        (1U << 20)
#define ABUSE_DATA_ALIGN           4096
#define ABUSE_DEFAULT_TIMEOUT_MS   30000
#define ABUSE_MIN_TIMEOUT_MS       1000
#define ABUSE_MAX_SIZE             0x7ffffffffffff000ULL
#define ABUSE_MAX_ERRNO            4095
#define ABUSE_SECTOR_SHIFT         9

/* GET_STATUS / SET_STATUS. SET_STATUS reads size, block_size, queue_depth,
 * flags and timeout_ms, ignores what GET_STATUS reports (fields and
 * ABUSE_FLAG_REPORTED), and requires reserved to be zero. */
struct abuse_status {
	__u64 size;
	__u32 block_size;
	__u32 queue_depth;
	__u32 flags;
	__u32 timeout_ms;
	__u32 index;
	__u32 max_bytes;
	__u64 dev;
	__u32 max_batch;
	__u32 version;
	__u32 pending;
	__u32 in_flight;
	__u64 completed;
	__u64 errors;
	__u64 requeues;
	__u64 timeouts;
	__u64 generation;	/* changes on every configure and RESET */
	__u32 queues;		/* hardware queues; SET_STATUS: 0 = one per CPU */
	__u32 max_queues;
	__u32 owner_uid;	/* with ABUSE_FLAG_DELEGATED: who may serve it */
	__u32 owner_gid;
	__u64 reserved[5];
};

/* One request. */
struct abuse_bio {
	__u64 id;
	__u64 sector;
	__u64 addr;
	__u32 len;
	__u16 cmd;
	__u16 flags;
	__u32 result;
	__u32 error;	/* PUT_BIO with ABUSE_BIO_ERRNO: a positive errno;
			 * with ABUSE_BIO_FILE: the file descriptor */
};

/* GET_BIO / PUT_BIO: a batch of requests. */
struct abuse_xfer {
	__u64 bios;
	__u64 data;
	__u64 data_len;
	__u32 count;
	__u32 flags;
	__u64 reserved[4];
};

/* SERVE: complete bios[0..put], then fetch up to count, sleeping up to
 * wait_ms when none is pending. Writes back put and count. */
struct abuse_serve {
	__u64 bios;
	__u64 data;
	__u64 data_len;
	__u32 put;
	__u32 count;
	__u32 queue;
	__u32 wait_ms;
	__u32 flags;
	__u32 reserved0;
	__u64 reserved[2];
};

#define ABUSE_GET_STATUS  _IOR('A', 0x20, struct abuse_status)
#define ABUSE_SET_STATUS  _IOW('A', 0x21, struct abuse_status)
#define ABUSE_RESET       _IO('A', 0x23)
#define ABUSE_GET_BIO     _IOWR('A', 0x24, struct abuse_xfer)
#define ABUSE_PUT_BIO     _IOWR('A', 0x25, struct abuse_xfer)
#define ABUSE_SERVE       _IOWR('A', 0x26, struct abuse_serve)

#endif /* _UAPI_LINUX_ABUSE_H */
