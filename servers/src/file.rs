//! The file backend: a regular file or a block device, with pread/pwrite.
//! FLUSH → fdatasync, FUA → a write with RWF_DSYNC (only its range is made
//! durable), DISCARD → punch a hole (BLKDISCARD on a block device), where
//! the backing store can, WRITE_ZEROES → zero the range (BLKZEROOUT).
//!
//! The device is never larger than the file, and writes never grow it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use abuse_sys::uapi::*;
use nix::fcntl::{fallocate, FallocateFlags};

use crate::backend::Backend;
use crate::sync::SyncLatch;

mod blk {
    // <linux/fs.h>: BLKDISCARD and BLKZEROOUT = _IO(0x12, 119/127) taking
    // a uint64_t[2] range.
    nix::ioctl_write_ptr_bad!(discard, nix::request_code_none!(0x12, 119), [u64; 2]);
    nix::ioctl_write_ptr_bad!(zeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
}

fn no_space() -> io::Error {
    io::Error::from_raw_os_error(nix::libc::ENOSPC)
}

/// Storage in a file or block device.
pub struct FileBackend {
    file: File,
    size: u64,
    read_only: bool,
    block_device: bool,
    direct: bool,
    /// Holes can be punched (files) or the device discards (block devices).
    can_discard: bool,
    /// Tripped by a failed sync: every later FLUSH fails.
    synced: SyncLatch,
}

/// How to open the file.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileOptions {
    /// Open the file read-only: a read-only device.
    pub read_only: bool,
    /// O_DIRECT: bypass the page cache (payload buffers are page-aligned).
    pub direct: bool,
}

impl FileBackend {
    /// Opens `path`; a read-only open gives a read-only device.
    pub fn open(path: &Path, opts: FileOptions) -> io::Result<Self> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(nix::libc::O_DIRECT);
        }
        let file = oo.open(path)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device || meta.is_file() {
            crate::blkdev::size(&file)?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        };
        let can_discard = !opts.read_only
            && if block_device {
                discards(&meta)
            } else {
                // Punching past the end changes no data (KEEP_SIZE) and
                // tells whether the filesystem can punch holes at all.
                fallocate(
                    file.as_raw_fd(),
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    size as i64,
                    4096,
                )
                .is_ok()
            };
        Ok(FileBackend {
            file,
            size,
            read_only: opts.read_only,
            block_device,
            direct: opts.direct,
            can_discard,
            synced: SyncLatch::default(),
        })
    }

    fn range(offset: u64, len: u64) -> [u64; 2] {
        [offset, len]
    }

    /// Refuses ranges past the end: the file never grows.
    fn within(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(no_space()),
        }
    }
}

/// Whether the block device behind `meta` accepts discards (its queue's
/// discard_max_bytes in sysfs is not 0).
fn discards(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let rdev = meta.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    std::fs::read_to_string(format!(
        "/sys/dev/block/{major}:{minor}/queue/discard_max_bytes"
    ))
    .ok()
    .and_then(|s| s.trim().parse::<u64>().ok())
    .is_some_and(|n| n > 0)
}

/// A page-aligned buffer, for O_DIRECT probes.
fn aligned(len: usize) -> io::Result<memmap2::MmapMut> {
    memmap2::MmapMut::map_anon(len.max(1))
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn data_file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        Some(self.file.as_fd())
    }

    fn features(&self) -> u32 {
        let discard = if self.can_discard {
            ABUSE_FLAG_DISCARD
        } else {
            0
        };
        ABUSE_FLAG_FLUSH | ABUSE_FLAG_FUA | ABUSE_FLAG_WRITE_ZEROES | discard
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.within(offset, buf.len() as u64)?;
        if !fua {
            return self.file.write_all_at(buf, offset);
        }
        // FUA: this write durable, not the whole file (RWF_DSYNC).
        let mut done = 0;
        while done < buf.len() {
            let rest = &buf[done..];
            let iov = nix::libc::iovec {
                iov_base: rest.as_ptr() as *mut _,
                iov_len: rest.len(),
            };
            // SAFETY: `iov` describes `rest`, which is borrowed for the call;
            // pwritev2 only reads from it.
            let n = unsafe {
                nix::libc::pwritev2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as i64,
                    nix::libc::RWF_DSYNC,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(io::ErrorKind::WriteZero.into()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() == Some(nix::libc::EIO) {
                        // Its sync may have failed on other pages too,
                        // and consumed the error a later fdatasync would
                        // have reported.
                        self.synced.trip(&e);
                    }
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.synced.sync(|| self.file.sync_data())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.within(offset, len)?;
        if !self.can_discard {
            return Err(crate::backend::unsupported());
        }
        if self.block_device {
            // SAFETY: BLKDISCARD reads a [start, len] pair.
            unsafe { blk::discard(self.file.as_raw_fd(), &Self::range(offset, len)) }?;
        } else {
            fallocate(
                self.file.as_raw_fd(),
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.within(offset, len)?;
        if self.block_device {
            // SAFETY: BLKZEROOUT reads a [start, len] pair.
            unsafe { blk::zeroout(self.file.as_raw_fd(), &Self::range(offset, len)) }?;
            return Ok(());
        }
        let flags = if unmap && self.can_discard {
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        } else {
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        };
        match fallocate(self.file.as_raw_fd(), flags, offset as i64, len as i64) {
            Ok(()) => Ok(()),
            // Filesystems without ZERO_RANGE (tmpfs): write the zeroes.
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                crate::backend::fill_zeroes(|b, at| self.file.write_all_at(b, at), offset, len)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn check_block_size(&self, block_size: u32) -> io::Result<()> {
        if !self.direct {
            return Ok(());
        }
        // O_DIRECT needs I/O aligned to the backing store's own sectors:
        // a read of one device block at offset 0 tells whether it is.
        let len = (block_size as u64).min(self.size) as usize;
        let mut buf = aligned(len)?;
        match self.file.read_at(&mut buf[..len], 0) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "--direct: the backing store needs O_DIRECT I/O aligned to more than the device's {block_size}-byte blocks: set the device up with a larger bs (e.g. bs=4096) or drop --direct"
                ),
            )),
            Err(e) => Err(e),
            Ok(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(size: u64) -> (tempfile::NamedTempFile, FileBackend) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(size).unwrap();
        let b = FileBackend::open(f.path(), FileOptions::default()).unwrap();
        (f, b)
    }

    #[test]
    fn size_defaults_to_the_file() {
        let (_f, b) = backend(3 << 20);
        assert_eq!(b.size(), 3 << 20);
        assert!(!b.read_only());
    }

    #[test]
    fn write_read_flush() {
        let (_f, b) = backend(1 << 20);
        b.write(4096, &[7u8; 8192], true).unwrap();
        b.flush().unwrap();
        let mut buf = [0u8; 8192];
        b.read(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 7));
    }

    #[test]
    fn discard_and_write_zeroes_read_back_zero() {
        let (_f, b) = backend(1 << 20);
        b.write(0, &[9u8; 1 << 20], false).unwrap();
        b.discard(0, 65536).unwrap();
        b.write_zeroes(65536, 65536, false).unwrap();
        b.write_zeroes(131072, 4096, true).unwrap();
        let mut buf = vec![1u8; 135168];
        b.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        let mut rest = [0u8; 4096];
        b.read(135168, &mut rest).unwrap();
        assert!(rest.iter().all(|&x| x == 9), "zeroing went past its range");
    }

    #[test]
    fn read_only_open() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8192).unwrap();
        let b = FileBackend::open(
            f.path(),
            FileOptions {
                read_only: true,
                direct: false,
            },
        )
        .unwrap();
        assert!(b.read_only());
        assert!(b.write(0, &[1u8; 512], false).is_err());
    }

    #[test]
    fn writes_never_grow_the_file() {
        let (f, b) = backend(1 << 20);
        for (what, r) in [
            ("write", b.write((1 << 20) - 4096, &[1u8; 8192], false)),
            ("fua write", b.write(1 << 20, &[1u8; 512], true)),
            ("write_zeroes", b.write_zeroes(1 << 20, 4096, false)),
            ("discard", b.discard((1 << 20) - 4096, 8192)),
            ("overflow", b.write(u64::MAX - 100, &[1u8; 512], false)),
        ] {
            let e = r.expect_err(what);
            assert_eq!(e.raw_os_error(), Some(nix::libc::ENOSPC), "{what}: {e}");
        }
        assert_eq!(f.as_file().metadata().unwrap().len(), 1 << 20);
    }

    #[test]
    fn fua_write_is_read_back() {
        let (_f, b) = backend(1 << 20);
        b.write(8192, &[3u8; 12288], true).unwrap();
        let mut buf = [0u8; 12288];
        b.read(8192, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 3));
    }

    #[test]
    fn discard_is_advertised_where_holes_can_be_punched() {
        let (_f, b) = backend(1 << 20);
        // The temp dir's filesystem (tmpfs, ext4, overlay on those) punches holes.
        assert_ne!(b.features() & ABUSE_FLAG_DISCARD, 0);
        let ro = FileBackend::open(
            _f.path(),
            FileOptions {
                read_only: true,
                direct: false,
            },
        )
        .unwrap();
        assert_eq!(ro.features() & ABUSE_FLAG_DISCARD, 0);
    }

    #[test]
    fn direct_checks_the_block_size_it_can_do() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let opts = FileOptions {
            read_only: false,
            direct: true,
        };
        // Not every filesystem takes O_DIRECT at all; where one does, a
        // 4096-byte device block is aligned for it.
        if let Ok(b) = FileBackend::open(f.path(), opts) {
            b.check_block_size(4096).unwrap();
        }
        let (_g, buffered) = backend(1 << 20);
        buffered.check_block_size(512).unwrap();
    }

    #[test]
    fn not_a_file() {
        assert!(FileBackend::open(Path::new("/"), FileOptions::default()).is_err());
    }
}
