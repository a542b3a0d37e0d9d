//! A wrapper that logs every request its backend serves, to stderr: the
//! command, offset, length and how long the backend took, and any error.
//!
//! `logging CTL FILE`, e.g. `logging /dev/abctl0 disk.img`: sets the device
//! up over FILE (unless it already is), serves until SIGINT or SIGTERM.
//!
//! It passes every call on unchanged, except the file the kernel could
//! move data to and from itself (`data_file`, `read_from_file`,
//! `write_to_file`): requests moved that way never reach the server, so it
//! does not pass them on, and sees (and logs) every READ and WRITE.
//! Wrapping any other backend is the same: `Logged { inner: backend }`.

use std::io;
use std::time::Instant;

use abuse_servers::file::{FileBackend, FileOptions};
use abuse_servers::{Backend, Server, StopSignals};

/// `inner`, each request logged.
struct Logged<B> {
    inner: B,
}

impl<B: Backend> Logged<B> {
    /// Runs `f`, then logs `what` with its duration and result.
    fn log<T>(
        &self,
        what: std::fmt::Arguments,
        f: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let start = Instant::now();
        let result = f();
        let took = start.elapsed();
        match &result {
            Ok(_) => eprintln!("{what}: ok in {took:?}"),
            Err(e) => eprintln!("{what}: {e} in {took:?}"),
        }
        result
    }
}

impl<B: Backend> Backend for Logged<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn features(&self) -> u32 {
        self.inner.features()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len();
        self.log(format_args!("READ {len} @ {offset}"), || {
            self.inner.read(offset, buf)
        })
    }
    fn read_or_hole(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        let len = buf.len();
        self.log(format_args!("READ {len} @ {offset}"), || {
            self.inner.read_or_hole(offset, buf)
        })
    }
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        let (len, fua_) = (buf.len(), if fua { " FUA" } else { "" });
        self.log(format_args!("WRITE{fua_} {len} @ {offset}"), || {
            self.inner.write(offset, buf, fua)
        })
    }
    fn flush(&self) -> io::Result<()> {
        self.log(format_args!("FLUSH"), || self.inner.flush())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.log(format_args!("DISCARD {len} @ {offset}"), || {
            self.inner.discard(offset, len)
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.log(format_args!("WRITE_ZEROES {len} @ {offset}"), || {
            self.inner.write_zeroes(offset, len, unmap)
        })
    }
    fn check_block_size(&self, block_size: u32) -> io::Result<()> {
        self.inner.check_block_size(block_size)
    }
    fn needs_payloads(&self) -> bool {
        self.inner.needs_payloads()
    }
    fn io_threads(&self) -> usize {
        self.inner.io_threads()
    }
    fn may_block(&self, cmd: u16, offset: u64, len: u64, fua: bool) -> bool {
        self.inner.may_block(cmd, offset, len, fua)
    }
    fn stop(&self) -> io::Result<()> {
        eprintln!("stopping");
        self.inner.stop()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Blocked before any thread starts, so that every thread inherits it.
    let signals = StopSignals::block()?;
    let [_, ctl, file] = &std::env::args().collect::<Vec<_>>()[..] else {
        return Err("usage: logging CTL FILE".into());
    };
    let inner = FileBackend::open(file.as_ref(), FileOptions::default())
        .map_err(|e| format!("{file}: {e}"))?;
    let server = Server::new(ctl, Logged { inner }).setup()?;
    println!("serving {ctl} from {file}, logging to stderr");
    Ok(server.stop_on(signals.watch()).run()?)
}
