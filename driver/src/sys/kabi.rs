// SPDX-License-Identifier: GPL-2.0
//! What the driver needs of the kernel's C interface that 6.12's Rust
//! bindings do not give a module, declared here so that the module builds
//! against an unpatched kernel tree: constants bindgen cannot evaluate, the
//! layout of `poll_table` (opaque in the bindings), and `kill_pid` (whose
//! header the bindings do not include).
//!
//! `kabi_check.c`, compiled with the kernel's flags and headers but not
//! linked into the module, fails the build if any of these no longer
//! matches the kernel; the host test `abuse-sys/tests/driver_kabi.rs`
//! checks that both files list the same constants with the same values.

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

/// `struct poll_table_struct` (`poll_table`), field by field.
#[repr(C)]
pub(crate) struct PollTable {
    pub(crate) qproc: Option<
        unsafe extern "C" fn(
            file: *mut bindings::file,
            head: *mut bindings::wait_queue_head,
            table: *mut bindings::poll_table_struct,
        ),
    >,
    /// `_key`: not read here; declared for the layout.
    #[allow(dead_code)]
    pub(crate) key: u32,
}

// The structures are only passed by pointer; some (`pid`) hold members that
// are empty in this configuration, which the lint flags, as it would in the
// kernel's own `bindings` crate (which allows it too).
#[allow(improper_ctypes)]
extern "C" {
    /// `int kill_pid(struct pid *pid, int sig, int priv)`.
    pub(crate) fn kill_pid(pid: *mut bindings::pid, sig: i32, priv_: i32) -> i32;
}
