// SPDX-License-Identifier: GPL-2.0
/*
 * The part of the kernel's C API the driver needs and 6.12's Rust bindings
 * do not give a module: static inline functions and macros, structures from
 * headers rust/bindings/bindings_helper.h does not include, and constants
 * bindgen cannot evaluate (casts through __force types).
 *
 * Built into the module (Kbuild), so the driver builds against an unpatched
 * Rust-enabled kernel tree. sys/shims.rs declares each function with the
 * signature defined here, and mirrors each constant; CHECK() below fails
 * the build if a mirrored value differs from the kernel's own (a host test,
 * abuse-sys/tests/driver_shims.rs, checks that both files list the same
 * constants with the same values).
 */
#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#include <linux/build_bug.h>
#include <linux/cred.h>
#include <linux/poll.h>
#include <linux/sched/signal.h>

#define CHECK(name, value) static_assert((__force u64)(name) == (value), #name)

CHECK(BLK_STS_NOTSUPP, 1);
CHECK(BLK_STS_IOERR, 10);
CHECK(BLK_STS_DEV_RESOURCE, 13);
CHECK(BLK_FEAT_WRITE_CACHE, 1 << 0);
CHECK(BLK_FEAT_FUA, 1 << 1);
CHECK(EPOLLIN, 0x001);
CHECK(EPOLLRDNORM, 0x040);
CHECK(EPOLLMSG, 0x400);

/* The types the constants have in sys/shims.rs. */
static_assert(sizeof(blk_status_t) == 1);
static_assert(sizeof(blk_features_t) == 4);
static_assert(sizeof(__poll_t) == 4);

/* The functions sys/shims.rs declares (called from Rust only). */
void abuse_poll_wait(struct file *file, wait_queue_head_t *head, poll_table *table);
u32 abuse_current_fsuid(void);
int abuse_kill_pid(struct pid *pid, int sig, int priv);
bool abuse_thread_group_exited(struct task_struct *task);

/* poll_wait() is static inline. */
void abuse_poll_wait(struct file *file, wait_queue_head_t *head, poll_table *table)
{
	poll_wait(file, head, table);
}

/* current_fsuid() is a macro over the task's credentials (struct cred). */
u32 abuse_current_fsuid(void)
{
	return __kuid_val(current_fsuid());
}

/* kill_pid() is declared in linux/sched/signal.h. */
int abuse_kill_pid(struct pid *pid, int sig, int priv)
{
	return kill_pid(pid, sig, priv);
}

/*
 * Whether every thread of @task's group has entered do_exit(): the group's
 * live count (struct signal_struct, linux/sched/signal.h). @task must be
 * held by a reference, which keeps its signal_struct.
 */
bool abuse_thread_group_exited(struct task_struct *task)
{
	return atomic_read(&task->signal->live) <= 0;
}
