// SPDX-License-Identifier: GPL-2.0
//! Copies to and from a server's memory that never sleep.
//!
//! A request the driver has taken out of its slot must come back within a
//! bounded time: RESET and the timeout cannot reach it meanwhile. A plain
//! `copy_to_user` may fault and sleep for ever (a userfaultfd or FUSE
//! mapping the server itself answers), so copies made while a request is
//! held run with page faults disabled (`copy_*_user_nofault`) and fail
//! instead of faulting; the caller puts the request back, faults the range
//! in with nothing held (`fault_in_*`, which may sleep), and tries again,
//! as filesystems do for `write(2)` from a mapping of the file itself.

use kernel::{bindings, prelude::*, types::AsBytes};

// Exported by mm/gup.c, but declared in <linux/pagemap.h>, which the
// kernel's bindings do not include.
extern "C" {
    #[link_name = "fault_in_writeable"]
    fn fault_in_writeable_raw(uaddr: *mut u8, size: usize) -> usize;
    #[link_name = "fault_in_readable"]
    fn fault_in_readable_raw(uaddr: *const u8, size: usize) -> usize;
}

/// Copies `src` to user address `addr` without sleeping; EFAULT if any of
/// it is not mapped for writing now.
pub(crate) fn write_nofault(addr: usize, src: &[u8]) -> Result {
    if src.is_empty() {
        return Ok(());
    }
    // SAFETY: `src` is valid for `src.len()` bytes; the destination is a
    // user address, which `copy_to_user_nofault` checks (`access_ok`) and
    // writes with page faults disabled.
    let left = unsafe { bindings::copy_to_user_nofault(addr as *mut _, src.as_ptr().cast(), src.len()) };
    if left == 0 { Ok(()) } else { Err(EFAULT) }
}

/// Copies `value` to user address `addr` without sleeping (as
/// [`write_nofault`]).
pub(crate) fn write_value_nofault<T: AsBytes>(addr: usize, value: &T) -> Result {
    // SAFETY: `T: AsBytes`: every byte of `value` is initialised.
    let bytes = unsafe { core::slice::from_raw_parts((value as *const T).cast::<u8>(), core::mem::size_of::<T>()) };
    write_nofault(addr, bytes)
}

/// Fills `dst` from user address `addr` without sleeping; EFAULT if any of
/// it is not mapped for reading now.
pub(crate) fn read_nofault(dst: &mut [u8], addr: usize) -> Result {
    if dst.is_empty() {
        return Ok(());
    }
    // SAFETY: `dst` is valid for writes of `dst.len()` bytes; the source is
    // a user address, checked and read with page faults disabled.
    let left = unsafe { bindings::copy_from_user_nofault(dst.as_mut_ptr().cast(), addr as *const _, dst.len()) };
    if left == 0 { Ok(()) } else { Err(EFAULT) }
}

/// Faults the `len` bytes at user address `addr` in for writing (may
/// sleep); EFAULT if some cannot be.
pub(crate) fn fault_in_writeable(addr: usize, len: usize) -> Result {
    // SAFETY: only touches the current process's memory map, as a write
    // fault would; returns how many bytes could not be faulted in.
    let left = unsafe { fault_in_writeable_raw(addr as *mut _, len) };
    if left == 0 { Ok(()) } else { Err(EFAULT) }
}

/// Faults the `len` bytes at user address `addr` in for reading.
pub(crate) fn fault_in_readable(addr: usize, len: usize) -> Result {
    // SAFETY: as in `fault_in_writeable`.
    let left = unsafe { fault_in_readable_raw(addr as *const _, len) };
    if left == 0 { Ok(()) } else { Err(EFAULT) }
}
