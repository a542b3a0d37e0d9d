//! `readonly`: the device is served read-only, whatever the backend
//! could do: the server sets it up with `ro` (`--setup`), refuses to serve
//! a writable one, and a WRITE, DISCARD or WRITE_ZEROES that reaches it
//! anyway fails with EROFS (which the kernel gets as an I/O error). READs
//! and FLUSHes pass; the features are the backend's.

use std::io;

use super::{Filter, Request};
use crate::backend::Backend;

/// The readonly filter.
pub struct Readonly;

impl Filter for Readonly {
    fn request(&self, req: &mut Request<'_>, next: &dyn Backend) -> io::Result<()> {
        if req.cmd.writes() {
            return Err(io::Error::from_raw_os_error(nix::libc::EROFS));
        }
        req.pass(next)
    }

    fn read_only(&self, _next: bool) -> bool {
        true
    }
}
