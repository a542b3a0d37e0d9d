//! QEMU's image-locking protocol (block/file-posix.c), so that QEMU and an
//! ABUSE server never write one image at once: `qemu-img snapshot`,
//! `commit`, `resize` or a running VM refuse an image ABUSE serves, and
//! ABUSE refuses one QEMU writes. `flock` (what the server took before)
//! does not conflict with QEMU's locks, which are OFD byte-range locks.
//!
//! One byte per permission: a shared lock on byte 100 + i says "I hold
//! permission i", one on byte 200 + i "I do not let others have it".
//! Taking a permission checks that nobody locks 200 + i; refusing to share
//! one checks that nobody locks 100 + i. The locks belong to the open file
//! and go when it is closed (or the process dies).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// QEMU's BLK_PERM_* bits, by index.
const CONSISTENT_READ: i64 = 0;
const WRITE: i64 = 1;
const RESIZE: i64 = 3;

fn name(perm: i64) -> &'static str {
    match perm {
        CONSISTENT_READ => "consistent read",
        WRITE => "write",
        2 => "write unchanged",
        RESIZE => "resize",
        _ => "?",
    }
}

fn range(at: i64, kind: libc::c_short) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: at,
        l_len: 1,
        l_pid: 0,
    }
}

/// Whether another open file holds a lock on byte `at`.
fn held_elsewhere(file: &File, at: i64) -> io::Result<bool> {
    let mut fl = range(at, libc::F_WRLCK as libc::c_short);
    fcntl(file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut fl))?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes QEMU's locks on `file` for a writer (`write`: the consistent
/// read, write and resize permissions, sharing neither write nor resize,
/// as a VM's qcow2 image) or a reader (consistent read, sharing neither,
/// as `qemu-img info`). Refused, naming the permission, if another program
/// (QEMU, or another ABUSE server) holds the image in a conflicting way.
pub fn lock(file: &File, write: bool) -> io::Result<()> {
    let held: &[i64] = if write {
        &[CONSISTENT_READ, WRITE, RESIZE]
    } else {
        &[CONSISTENT_READ]
    };
    let unshared: &[i64] = &[WRITE, RESIZE];
    let conflict = |what: String| {
        io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "in use by another program (QEMU, or another server): {what} (QEMU's image lock)"
            ),
        )
    };
    // As QEMU does: take ours, then look for others'.
    let ours = held
        .iter()
        .map(|p| PERM_BASE + p)
        .chain(unshared.iter().map(|p| SHARED_BASE + p));
    for at in ours {
        let fl = range(at, libc::F_RDLCK as libc::c_short);
        fcntl(file.as_raw_fd(), FcntlArg::F_OFD_SETLK(&fl))
            .map_err(|_| conflict(format!("cannot lock byte {at}")))?;
    }
    for &p in held {
        if held_elsewhere(file, SHARED_BASE + p)? {
            return Err(conflict(format!(
                "it does not share the \"{}\" permission",
                name(p)
            )));
        }
    }
    for &p in unshared {
        if held_elsewhere(file, PERM_BASE + p)? {
            return Err(conflict(format!("it holds the \"{}\" permission", name(p))));
        }
    }
    Ok(())
}
