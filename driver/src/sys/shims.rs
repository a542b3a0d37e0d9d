// SPDX-License-Identifier: GPL-2.0
//! What 6.12's Rust bindings do not give a module, from `shims.c` (built
//! into the module): no patch to the kernel tree is needed.
//!
//! The functions are declared with the signatures `shims.c` defines. The
//! constants bindgen cannot evaluate are mirrored here; `shims.c` fails the
//! build if one differs from the kernel's headers, and the host test
//! `abuse-sys/tests/driver_shims.rs` that both files list the same ones.

use kernel::bindings;

pub(crate) const BLK_STS_NOTSUPP: bindings::blk_status_t = 1;
pub(crate) const BLK_STS_IOERR: bindings::blk_status_t = 10;
pub(crate) const BLK_STS_DEV_RESOURCE: bindings::blk_status_t = 13;
pub(crate) const BLK_FEAT_WRITE_CACHE: bindings::blk_features_t = 1 << 0;
pub(crate) const BLK_FEAT_FUA: bindings::blk_features_t = 1 << 1;
pub(crate) const EPOLLIN: u32 = 0x001;
pub(crate) const EPOLLRDNORM: u32 = 0x040;
pub(crate) const EPOLLMSG: u32 = 0x400;

/// `REQ_OP_MASK`, `REQ_FUA`, `REQ_NOUNMAP`: as `blk_types.h` defines them,
/// from the values bindgen does give.
pub(crate) const REQ_OP_MASK: bindings::blk_opf_t = (1 << bindings::REQ_OP_BITS) - 1;
pub(crate) const REQ_FUA: bindings::blk_opf_t = 1 << bindings::req_flag_bits___REQ_FUA;
pub(crate) const REQ_NOUNMAP: bindings::blk_opf_t = 1 << bindings::req_flag_bits___REQ_NOUNMAP;

// The structures are only passed through by pointer; some (`task_struct`)
// hold members that are empty in this configuration, which the lint flags,
// as it would in the kernel's own `bindings` crate (which allows it too).
#[allow(improper_ctypes)]
extern "C" {
    /// `poll_wait(file, head, table)`.
    pub(crate) fn abuse_poll_wait(
        file: *mut bindings::file,
        head: *mut bindings::wait_queue_head,
        table: *mut bindings::poll_table_struct,
    );
    /// `__kuid_val(current_fsuid())`.
    pub(crate) fn abuse_current_fsuid() -> u32;
    /// `kill_pid(pid, sig, priv)`.
    pub(crate) fn abuse_kill_pid(pid: *mut bindings::pid, sig: i32, priv_: i32) -> i32;
    /// `atomic_read(&task->signal->live) <= 0`; `task` held by a reference.
    pub(crate) fn abuse_thread_group_exited(task: *mut bindings::task_struct) -> bool;
}
