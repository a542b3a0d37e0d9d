//! What a storage backend implements. The engine calls it from several
//! threads at once, for requests that may overlap.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use abuse_sys::uapi::*;

/// Every feature a backend can handle (FLUSH, FUA, DISCARD, WRITE_ZEROES).
pub const ALL_FEATURES: u32 =
    ABUSE_FLAG_FLUSH | ABUSE_FLAG_FUA | ABUSE_FLAG_DISCARD | ABUSE_FLAG_WRITE_ZEROES;

/// A backend's storage.
pub trait Backend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes must be refused (the device is set up read-only).
    fn read_only(&self) -> bool {
        false
    }
    /// The `ABUSE_FLAG_*` features it handles (FLUSH, FUA, DISCARD,
    /// WRITE_ZEROES); the device advertises exactly these.
    fn features(&self) -> u32;
    /// Fills `buf` from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// As `read`, except where the whole range is known to read as zeroes
    /// without reading it (a hole): then `buf` is left as it is and the
    /// result is true, and the engine completes the READ as zeroes
    /// (ABUSE_BIO_ZEROES: neither written nor copied). By default, reads.
    fn read_or_hole(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        self.read(offset, buf).map(|()| false)
    }
    /// The file that holds the device's bytes at the same offsets, if
    /// there is one: the kernel then moves READ and WRITE data between the
    /// request and this file itself (ABUSE_BIO_FILE, as loop does with its
    /// backing file): one copy, none through the server, and `read` and
    /// `write` are not called for them. A FUA WRITE is synced by the kernel.
    fn data_file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// The files `read_from_file` and `write_to_file` may name. The engine
    /// checks them once, at start: a request placed in one the kernel
    /// cannot move to or from (neither a regular file nor a block device,
    /// or an ABUSE device) is run by the backend instead.
    fn moved_files(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        Vec::new()
    }
    /// Where a READ of `len` bytes at `offset` lies whole in one of
    /// `moved_files`, if it does: the file and the offset there. The kernel
    /// then moves it from there itself (ABUSE_BIO_FILE), when the worker
    /// next calls SERVE, and `read` is not called for it: what the file
    /// holds there must not change meanwhile, other than by writes racing
    /// the READ (a cow's mapped block never moves, its base never changes).
    fn read_from_file(
        &self,
        _offset: u64,
        _len: u64,
    ) -> Option<(std::os::fd::BorrowedFd<'_>, u64)> {
        None
    }
    /// Where a WRITE of `len` bytes at `offset` lies whole in one of
    /// `moved_files`, if it does (and the device is writable): the file and
    /// the offset there. The kernel then moves the data there itself, as
    /// for `read_from_file`, and `write` is not called for it. Only asked
    /// for WRITEs without FUA: the kernel's sync of the file would not
    /// commit what else the backend keeps (a cow's mappings).
    fn write_to_file(&self, _offset: u64, _len: u64) -> Option<(std::os::fd::BorrowedFd<'_>, u64)> {
        None
    }
    /// Whether it looks at request data at all. One whose every READ is a
    /// hole (`read_or_hole` says so without touching the buffer) and whose
    /// WRITEs go nowhere (null) answers false: the engine then fetches
    /// descriptors only and passes it empty buffers, so no payload is
    /// copied either way.
    fn needs_payloads(&self) -> bool {
        true
    }
    /// Writes `buf` at `offset`; with `fua`, durably before returning.
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// The range's contents may be forgotten.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The range reads as zeroes; `unmap`: it may be deallocated.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// Whether it can do I/O in units of the device's `block_size` (e.g.
    /// O_DIRECT on a backing store with larger sectors cannot): checked
    /// when a server starts, with an error a person can act on.
    fn check_block_size(&self, _block_size: u32) -> io::Result<()> {
        Ok(())
    }
    /// Threads the engine runs a batch's requests on at once: calls that
    /// block (disk I/O, syncs) should not wait for one another. 0: the
    /// calls are quick, run them one by one in the worker.
    fn io_threads(&self) -> usize {
        4
    }
    /// Whether running this request may wait on storage (a read that
    /// misses the page cache, a sync): only then does handing it to an I/O
    /// thread pay for the hand-off. A batch runs on the I/O threads when
    /// two or more of its requests may block, else in the worker. By
    /// default, every request may.
    fn may_block(&self, _cmd: u16, _offset: u64, _len: u64, _fua: bool) -> bool {
        true
    }
    /// The server stops cleanly: no request is in flight or will come.
    fn stop(&self) -> io::Result<()> {
        Ok(())
    }
}

/// An error for an operation a backend does not advertise.
pub fn unsupported() -> io::Error {
    io::Error::from(io::ErrorKind::Unsupported)
}

/// Writes `len` zero bytes at `offset` through `write_at`, a MiB at a time
/// from a page-aligned buffer (so that it also serves O_DIRECT files): for
/// storage that cannot punch holes or zero ranges itself.
pub fn fill_zeroes(
    mut write_at: impl FnMut(&[u8], u64) -> io::Result<()>,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let zeros = memmap2::MmapMut::map_anon(len.clamp(1, 1 << 20) as usize)?;
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        write_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Calls `f(unit index, offset in the unit, range in the request)` for each
/// piece of `len` bytes at `offset` that lies in one unit of `unit` bytes
/// (a cow block, a qcow2 cluster); I/O past `size` is refused.
pub fn pieces(
    offset: u64,
    len: u64,
    size: u64,
    unit: u64,
    mut f: impl FnMut(u64, u64, std::ops::Range<usize>) -> io::Result<()>,
) -> io::Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "beyond the end of the device",
        ));
    }
    let mut done = 0;
    while done < len {
        let at = offset + done;
        let (index, inner) = (at / unit, at % unit);
        let n = (unit - inner).min(len - done);
        f(index, inner, done as usize..(done + n) as usize)?;
        done += n;
    }
    Ok(())
}

/// Reads as much of `buf` as `f` holds from `at`; returns the count.
pub fn read_full(f: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], at + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// Fills `buf` from `at`; past the file's end (a sparse tail) reads zeroes.
pub fn read_or_zeroes(f: &File, buf: &mut [u8], at: u64) -> io::Result<()> {
    let n = read_full(f, buf, at)?;
    buf[n..].fill(0);
    Ok(())
}

/// Deallocates a range of a file (it reads as zeroes), or writes the
/// zeroes where the file system cannot punch holes.
pub fn punch_file(f: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::fd::AsRawFd;
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(f.as_raw_fd(), flags, offset as i64, len as i64) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => {
            fill_zeroes(|b, at| f.write_all_at(b, at), offset, len)
        }
        Err(e) => Err(e.into()),
    }
}
