//! The file backend: a regular file or a block device, with pread/pwrite.
//! FLUSH/FUA → fdatasync, DISCARD → punch a hole (BLKDISCARD on a block
//! device), WRITE_ZEROES → zero the range (BLKZEROOUT).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use abuse_sys::uapi::*;
use nix::fcntl::{fallocate, FallocateFlags};

use crate::backend::Backend;

mod blk {
    // <linux/fs.h>: BLKGETSIZE64 = _IOR(0x12, 114, size_t), BLKDISCARD and
    // BLKZEROOUT = _IO(0x12, 119/127) taking a uint64_t[2] range.
    nix::ioctl_read!(getsize64, 0x12, 114, u64);
    nix::ioctl_write_ptr_bad!(discard, nix::request_code_none!(0x12, 119), [u64; 2]);
    nix::ioctl_write_ptr_bad!(zeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
}

/// Storage in a file or block device.
pub struct FileBackend {
    file: File,
    size: u64,
    read_only: bool,
    block_device: bool,
}

/// How to open the file.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileOptions {
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
        let size = if block_device {
            let mut size = 0u64;
            // SAFETY: BLKGETSIZE64 writes one u64 into `size`.
            unsafe { blk::getsize64(file.as_raw_fd(), &mut size) }?;
            size
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        };
        Ok(FileBackend {
            file,
            size,
            read_only: opts.read_only,
            block_device,
        })
    }

    fn range(offset: u64, len: u64) -> [u64; 2] {
        [offset, len]
    }
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn features(&self) -> u32 {
        ABUSE_FLAG_FLUSH | ABUSE_FLAG_FUA | ABUSE_FLAG_DISCARD | ABUSE_FLAG_WRITE_ZEROES
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
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
        if self.block_device {
            // SAFETY: BLKZEROOUT reads a [start, len] pair.
            unsafe { blk::zeroout(self.file.as_raw_fd(), &Self::range(offset, len)) }?;
            return Ok(());
        }
        let flags = if unmap {
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        } else {
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        };
        match fallocate(self.file.as_raw_fd(), flags, offset as i64, len as i64) {
            Ok(()) => Ok(()),
            // Filesystems without ZERO_RANGE (tmpfs): write the zeroes.
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                let zeros = vec![0u8; 1 << 20];
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(zeros.len() as u64) as usize;
                    self.file.write_all_at(&zeros[..n], at)?;
                    at += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
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
    fn not_a_file() {
        assert!(FileBackend::open(Path::new("/"), FileOptions::default()).is_err());
    }
}
