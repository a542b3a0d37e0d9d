//! The null backend: reads return zeroes, writes are dropped.

use std::io;

use crate::backend::{Backend, ALL_FEATURES};

/// Zeroes in, nothing out, at any size.
pub struct Null {
    size: u64,
}

impl Null {
    /// A device of `size` bytes.
    pub fn new(size: u64) -> Self {
        Null { size }
    }
}

impl Backend for Null {
    fn size(&self) -> u64 {
        self.size
    }

    fn io_threads(&self) -> usize {
        // Nothing blocks: a hand-off would cost more than the work.
        0
    }

    fn features(&self) -> u32 {
        ALL_FEATURES
    }

    fn read(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }

    fn read_or_hole(&self, _offset: u64, _buf: &mut [u8]) -> io::Result<bool> {
        Ok(true)
    }

    fn needs_payloads(&self) -> bool {
        false
    }

    fn write(&self, _offset: u64, _buf: &[u8], _fua: bool) -> io::Result<()> {
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
        Ok(())
    }
}
