//! Where a delta lives: a file, or (in tests) a fake file that loses what
//! was not synced when it "crashes".

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Positional I/O with an explicit durability point.
pub trait Storage: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Everything written so far is durable when this returns.
    fn sync(&self) -> io::Result<()>;
    fn size(&self) -> io::Result<u64>;
}

impl Storage for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Reads past the end (a sparse tail) are zeroes.
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64)? {
                0 => {
                    buf[done..].fill(0);
                    break;
                }
                n => done += n,
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}
