// SPDX-License-Identifier: GPL-2.0
//! A file a server names by descriptor, for the driver to move a request's
//! data to or from (ABUSE_BIO_FILE). 6.12's `rust/kernel` has no `File`.

use core::ptr::NonNull;
use kernel::{bindings, prelude::*};

/// `FMODE_READ`, `FMODE_WRITE`, `FMODE_PREAD` and `FMODE_PWRITE` (`__force fmode_t` casts bindgen cannot
/// evaluate; their values have been fixed since the first Linux).
const FMODE_READ: u32 = 1 << 0;
const FMODE_WRITE: u32 = 1 << 1;
const FMODE_PREAD: u32 = 1 << 3;
const FMODE_PWRITE: u32 = 1 << 4;

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

    /// Whether it was opened for writing (`write`) or for reading, with
    /// positioned I/O (what loop needs of its backing file).
    pub(crate) fn opened_for(&self, write: bool) -> bool {
        let need = if write { FMODE_WRITE | FMODE_PWRITE } else { FMODE_READ | FMODE_PREAD };
        self.raw().f_mode & need == need
    }

    fn inode(&self) -> &bindings::inode {
        // SAFETY: an open file's inode lives as long as the file.
        unsafe { &*self.raw().f_inode }
    }

    /// A regular file or a block device: the files loop accepts
    /// (`loop_validate_file`). Not a pipe, socket or character device,
    /// whose reads and writes wait on whoever is at the other end.
    pub(crate) fn is_regular_or_block(&self) -> bool {
        let kind = self.inode().i_mode as u32 & bindings::S_IFMT;
        kind == bindings::S_IFREG || kind == bindings::S_IFBLK
    }

    /// Whether the file's data lives on a disk of block major `major`: it
    /// is such a disk or one of its partitions (whatever their own device
    /// numbers: partitions past `max_part` have the extended major), or a
    /// regular file of a filesystem mounted from one.
    pub(crate) fn lives_on_major(&self, major: u32) -> bool {
        let inode = self.inode();
        let kind = inode.i_mode as u32 & bindings::S_IFMT;
        let bdev = if kind == bindings::S_IFBLK {
            // SAFETY: an open block device file's mapping host is the bdev
            // inode (`file_bdev`), alive as long as the file.
            unsafe { bindings::file_bdev(self.as_ptr()) }
        } else {
            // SAFETY: an inode's superblock outlives it; `s_bdev` is set at
            // mount (NULL for filesystems without one) and fixed after.
            unsafe { (*inode.i_sb).s_bdev }
        };
        if bdev.is_null() {
            return false;
        }
        // SAFETY: a block device that an open file or a mounted filesystem
        // holds has its gendisk, whose `major` is fixed at allocation.
        unsafe { (*(*bdev).bd_disk).major as u32 == major }
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
