//! What a storage backend implements. The engine calls it from several
//! threads at once, for requests that may overlap.

use std::io;

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
