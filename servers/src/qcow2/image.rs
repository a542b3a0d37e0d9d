//! The image file as the backend sees it: positioned reads and writes, a
//! sync, its size, and hole punching. A `File` in service; in the tests, a
//! recorder that logs every write and sync, so that a power cut can be
//! played at every point of an allocation and the image checked after it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Positioned I/O on an image, with an explicit durability point.
pub trait ImageIo: Send + Sync {
    /// Reads at `off`; fewer bytes than asked only at the end of the file.
    fn pread(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `off`.
    fn pwrite_all(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Everything written so far is durable when this returns.
    fn sync(&self) -> io::Result<()>;
    /// The file's length.
    fn size(&self) -> io::Result<u64>;
    /// The range reads as zeroes and holds no space.
    fn punch(&self, off: u64, len: u64) -> io::Result<()>;

    /// Reads all of `buf` at `off` (an error past the end).
    fn pread_exact(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if self.pread_full(buf, off)? < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("a read at {off} runs past the end of the image"),
            ));
        }
        Ok(())
    }

    /// Reads as much of `buf` as the file holds at `off`.
    fn pread_full(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.pread(&mut buf[done..], off + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }

    /// Reads `buf` at `off`, zeroes past the end.
    fn pread_or_zeroes(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let n = self.pread_full(buf, off)?;
        buf[n..].fill(0);
        Ok(())
    }
}

impl ImageIo for File {
    fn pread(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        loop {
            match self.read_at(buf, off) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn pwrite_all(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.write_all_at(buf, off)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        crate::backend::punch_file(self, off, len)
    }
}
