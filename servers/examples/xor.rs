//! An overlay that transforms the data on its way through: XOR
//! "encryption" (a toy: do not protect anything with it) over any backend,
//! here a file.
//!
//! `xor CTL FILE KEY`, e.g. `xor /dev/abctl0 disk.img secret`: sets the
//! device up over FILE's size (unless it already is), serves until SIGINT
//! or SIGTERM. The file holds each byte at offset `o` XORed with
//! `KEY[o % KEY.len()]`.
//!
//! What a transforming wrapper must get right:
//! - it must not pass on the inner backend's `data_file` (nor
//!   `read_from_file`/`write_to_file`): the kernel would move the bytes
//!   between the request and the file itself, untransformed. Left out, the
//!   trait's defaults say "no file": every READ and WRITE comes through
//!   `read` and `write`.
//! - DISCARD and WRITE_ZEROES would leave zeroes in the file, which read
//!   back as the key: it does not advertise them.
//! - `write` must not change the caller's buffer: it transforms a copy.

use std::io;
use std::sync::Arc;

use abuse_servers::backend::unsupported;
use abuse_servers::file::{FileBackend, FileOptions};
use abuse_servers::{Backend, Server, StopSignals};
use abuse_sys::uapi::{ABUSE_FLAG_FLUSH, ABUSE_FLAG_FUA};

/// `inner`'s bytes XORed with `key`, repeated from offset 0.
struct Xor {
    inner: Arc<dyn Backend>,
    key: Vec<u8>,
}

impl Xor {
    fn apply(&self, offset: u64, buf: &mut [u8]) {
        let n = self.key.len() as u64;
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= self.key[((offset + i as u64) % n) as usize];
        }
    }
}

impl Backend for Xor {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn features(&self) -> u32 {
        self.inner.features() & (ABUSE_FLAG_FLUSH | ABUSE_FLAG_FUA)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, buf)?;
        self.apply(offset, buf);
        Ok(())
    }
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        let mut data = buf.to_vec();
        self.apply(offset, &mut data);
        self.inner.write(offset, &data, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(unsupported())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
        Err(unsupported())
    }
    fn check_block_size(&self, block_size: u32) -> io::Result<()> {
        self.inner.check_block_size(block_size)
    }
    fn io_threads(&self) -> usize {
        self.inner.io_threads()
    }
    fn may_block(&self, cmd: u16, offset: u64, len: u64, fua: bool) -> bool {
        self.inner.may_block(cmd, offset, len, fua)
    }
    fn stop(&self) -> io::Result<()> {
        self.inner.stop()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Blocked before any thread starts, so that every thread inherits it.
    let signals = StopSignals::block()?;
    let [_, ctl, file, key] = &std::env::args().collect::<Vec<_>>()[..] else {
        return Err("usage: xor CTL FILE KEY".into());
    };
    if key.is_empty() {
        return Err("the key must not be empty".into());
    }
    let inner = FileBackend::open(file.as_ref(), FileOptions::default())
        .map_err(|e| format!("{file}: {e}"))?;
    let xor = Xor {
        inner: Arc::new(inner),
        key: key.as_bytes().to_vec(),
    };
    let server = Server::new(ctl, xor).setup()?;
    println!("serving {ctl} from {file}, XORed");
    server.stop_on(signals.watch()).run()?;
    eprintln!("xor: stopped cleanly");
    Ok(())
}
