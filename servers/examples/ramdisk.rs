//! A ramdisk: the device's bytes in a file (in /dev/shm) mapped shared, so
//! that a server restarted after a crash finds them again.
//! `ramdisk CTL STORE SIZE_MIB`: sets the device up, serves until SIGTERM.
use abuse_servers::{backend::unsupported, Backend, Server};
use memmap2::MmapRaw;
use std::io;

struct Ram(MmapRaw);

impl Ram {
    /// The mapping at `offset`, for `len` bytes that must lie inside it.
    fn at(&self, offset: u64, len: usize) -> io::Result<*mut u8> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&end| end <= self.size());
        let at = end.map(|_| self.0.as_mut_ptr().wrapping_add(offset as usize));
        at.ok_or(io::Error::from(io::ErrorKind::InvalidInput))
    }
}

impl Backend for Ram {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn features(&self) -> u32 {
        0 // no FLUSH needed (a completed write is in memory), no DISCARD
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let at = self.at(offset, buf.len())?;
        unsafe { std::ptr::copy_nonoverlapping(at, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
    fn write(&self, offset: u64, buf: &[u8], _fua: bool) -> io::Result<()> {
        let at = self.at(offset, buf.len())?;
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), at, buf.len()) };
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Err(unsupported()) // never called: not advertised
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(unsupported())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let [_, ctl, store, mib] = &std::env::args().collect::<Vec<_>>()[..] else {
        return Err("usage: ramdisk CTL STORE SIZE_MIB".into());
    };
    let mut open = std::fs::OpenOptions::new();
    open.read(true).write(true).create(true).truncate(false);
    let file = open.open(store)?;
    file.set_len(mib.parse::<u64>()? << 20)?;
    let server = Server::new(ctl, Ram(MmapRaw::map_raw(&file)?)).setup()?;
    println!("serving {ctl} from {store}");
    Ok(server.run()?) // until SIGINT or SIGTERM
}
