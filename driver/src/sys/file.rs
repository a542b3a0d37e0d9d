// SPDX-License-Identifier: GPL-2.0
//! A file a server names by descriptor, for the driver to move a request's
//! data to or from (ABUSE_BIO_FILE). 6.12's `rust/kernel` has no `File`.

use core::ptr::NonNull;
use kernel::{bindings, prelude::*};

/// `FMODE_READ` and `FMODE_WRITE` (`__force fmode_t` casts bindgen cannot
/// evaluate; their values have been fixed since the first Linux).
const FMODE_READ: u32 = 1 << 0;
const FMODE_WRITE: u32 = 1 << 1;

/// A reference to an open file, dropped with `fput`.
pub(crate) struct File(NonNull<bindings::file>);

impl File {
    /// The file open as `fd` in the calling process (`fget`); EBADF if
    /// there is none.
    pub(crate) fn get(fd: u32) -> Result<Self> {
        // SAFETY: `fget` looks `fd` up in the current task's table and
        // returns a counted reference, or NULL.
        let f = unsafe { bindings::fget(fd) };
        NonNull::new(f).map(Self).ok_or(EBADF)
    }

    pub(crate) fn as_ptr(&self) -> *mut bindings::file {
        self.0.as_ptr()
    }

    fn raw(&self) -> &bindings::file {
        // SAFETY: we hold a reference, so the file lives; `f_mode` and
        // `f_inode` are set at open and not changed after.
        unsafe { self.0.as_ref() }
    }

    /// Whether it was opened for writing (`write`) or for reading.
    pub(crate) fn opened_for(&self, write: bool) -> bool {
        self.raw().f_mode & if write { FMODE_WRITE } else { FMODE_READ } != 0
    }

    /// Whether it is a block device of block major `major`.
    pub(crate) fn is_block_device_of(&self, major: u32) -> bool {
        // SAFETY: an open file's inode lives as long as the file; its mode
        // and device number do not change.
        let inode = unsafe { &*self.raw().f_inode };
        inode.i_mode as u32 & bindings::S_IFMT == bindings::S_IFBLK && super::chrdev::major(inode.i_rdev) == major
    }

    /// Makes the `len` bytes at `pos` durable (`vfs_fsync_range`, data
    /// and what is needed to read it back).
    pub(crate) fn sync_range(&self, pos: u64, len: u64) -> Result {
        let end = pos.saturating_add(len.max(1) - 1).min(i64::MAX as u64);
        // SAFETY: a live file; the call sleeps, which the caller (an ioctl,
        // holding no lock) allows.
        let ret = unsafe { bindings::vfs_fsync_range(self.as_ptr(), pos as i64, end as i64, 1) };
        kernel::error::to_result(ret)
    }
}

impl Drop for File {
    fn drop(&mut self) {
        // SAFETY: gives back the reference `fget` took.
        unsafe { bindings::fput(self.as_ptr()) };
    }
}
