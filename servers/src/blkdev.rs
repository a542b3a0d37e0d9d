//! Block devices as backing stores: their size (a block device's file
//! length is 0).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;

// <linux/fs.h>: BLKGETSIZE64 = _IOR(0x12, 114, size_t).
nix::ioctl_read!(
    /// BLKGETSIZE64: the size of a block device in bytes.
    ///
    /// # Safety
    ///
    /// `data` must point at a writable `u64`.
    getsize64,
    0x12,
    114,
    u64
);

/// The size in bytes of a regular file or a block device.
pub fn size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 into `size`.
        unsafe { getsize64(file.as_raw_fd(), &mut size) }?;
        Ok(size)
    } else {
        Ok(meta.len())
    }
}
