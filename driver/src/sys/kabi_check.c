// SPDX-License-Identifier: GPL-2.0
/*
 * Build-time checks of sys/kabi.rs, the part of the kernel's C interface the
 * driver declares itself because 6.12's Rust bindings do not give it to a
 * module: constants bindgen cannot evaluate (casts through __force types),
 * a structure it sees only as opaque (poll_table), and a function whose
 * header it does not include (kill_pid). So the module builds against an
 * unpatched Rust-enabled kernel tree.
 *
 * Compiled with the kernel's own flags and headers (Kbuild always-y), but
 * not linked into the module: it holds no code, only static_asserts, and
 * the build fails if a declaration in kabi.rs no longer matches this
 * kernel. The host test abuse-sys/tests/driver_kabi.rs checks that both
 * files list the same constants with the same values.
 */
#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#include <linux/build_bug.h>
#include <linux/poll.h>
#include <linux/sched/signal.h>

#define CHECK(name, value) static_assert((__force u64)(name) == (value), #name)
#define SAME_TYPE(a, b) static_assert(__builtin_types_compatible_p(a, b), #a " is not " #b)

/* The constants kabi.rs mirrors, and their types there. */
CHECK(BLK_STS_NOTSUPP, 1);
CHECK(BLK_STS_IOERR, 10);
CHECK(BLK_STS_DEV_RESOURCE, 13);
CHECK(BLK_FEAT_WRITE_CACHE, 1 << 0);
CHECK(BLK_FEAT_FUA, 1 << 1);
CHECK(EPOLLIN, 0x001);
CHECK(EPOLLRDNORM, 0x040);
CHECK(EPOLLMSG, 0x400);
static_assert(sizeof(blk_status_t) == 1);
static_assert(sizeof(blk_features_t) == 4);
static_assert(sizeof(__poll_t) == 4);

/* kabi::PollTable: struct poll_table_struct, field by field. */
static_assert(offsetof(struct poll_table_struct, _qproc) == 0);
static_assert(offsetof(struct poll_table_struct, _key) == sizeof(void *));
static_assert(sizeof(struct poll_table_struct) == 2 * sizeof(void *));
SAME_TYPE(typeof(((poll_table *)0)->_qproc),
	  void (*)(struct file *, wait_queue_head_t *, struct poll_table_struct *));
SAME_TYPE(typeof(((poll_table *)0)->_key), __poll_t);

/* kabi::kill_pid: exported, declared in linux/sched/signal.h. */
SAME_TYPE(typeof(kill_pid), int(struct pid *, int, int));
