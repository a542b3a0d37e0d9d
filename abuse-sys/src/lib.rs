//! The ABUSE user-space API.
//!
//! [`uapi`] holds the `#[repr(C)]` structs, constants and ioctl numbers (the
//! same file the kernel driver compiles); [`Control`] is a safe handle on a
//! control node `/dev/abctlN` for servers and tools.

pub mod uapi;

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
pub use uapi::*;

mod raw {
    use super::uapi::*;
    use nix::sys::ioctl::ioctl_num_type;

    nix::ioctl_read_bad!(get_status, ABUSE_GET_STATUS as ioctl_num_type, AbuseStatus);
    nix::ioctl_write_ptr_bad!(set_status, ABUSE_SET_STATUS as ioctl_num_type, AbuseStatus);
    nix::ioctl_none_bad!(reset, ABUSE_RESET as ioctl_num_type);
    nix::ioctl_readwrite_bad!(get_bio, ABUSE_GET_BIO as ioctl_num_type, AbuseXfer);
    nix::ioctl_readwrite_bad!(put_bio, ABUSE_PUT_BIO as ioctl_num_type, AbuseXfer);
    nix::ioctl_readwrite_bad!(serve, ABUSE_SERVE as ioctl_num_type, AbuseServe);
}

/// What failed, on which device, and the kernel's errno.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {}", open_cause(*.errno))]
    Open { path: PathBuf, errno: Errno },
    #[error("{path}: SET_STATUS failed: device is busy: still open from its previous configuration (unmount it first, or close what holds {block})")]
    StillOpen { path: PathBuf, block: String },
    #[error("{path}: {op} failed: {}", ioctl_cause(.op, *.errno))]
    Ioctl {
        path: PathBuf,
        op: &'static str,
        errno: Errno,
        /// Requests of the batch handled before the failure.
        done: usize,
    },
}

impl Error {
    /// The kernel's errno behind the failure.
    pub fn errno(&self) -> Errno {
        match self {
            Error::Open { errno, .. } | Error::Ioctl { errno, .. } => *errno,
            Error::StillOpen { .. } => Errno::EBUSY,
        }
    }
}

fn open_cause(errno: Errno) -> String {
    match errno {
        Errno::ENOENT | Errno::ENXIO | Errno::ENODEV => {
            "no such device (is the abuse module loaded?)".into()
        }
        Errno::EACCES | Errno::EPERM => {
            "permission denied (ABUSE control nodes are root's, or the user's a device is delegated to)".into()
        }
        e => e.desc().to_string(),
    }
}

fn ioctl_cause(op: &str, errno: Errno) -> String {
    match errno {
        Errno::EPERM | Errno::EACCES => {
            "not permitted (needs CAP_SYS_ADMIN; a user a device is delegated to may only serve it)"
                .into()
        }
        Errno::EBUSY if op == "SET_STATUS" => {
            "device is busy: already configured (reset it first, or use reconnect)".into()
        }
        Errno::ENOTTY => "not supported by this abuse module".into(),
        Errno::EINVAL if op == "SET_STATUS" => {
            "invalid configuration (size, bs, qs, queues, timeout or flags)".into()
        }
        Errno::ENXIO if op != "SET_STATUS" => "device is not configured".into(),
        e => e.desc().to_string(),
    }
}

/// The name of a request command (`ABUSE_CMD_*`), for messages.
pub fn cmd_name(cmd: u16) -> &'static str {
    match cmd {
        ABUSE_CMD_READ => "READ",
        ABUSE_CMD_WRITE => "WRITE",
        ABUSE_CMD_FLUSH => "FLUSH",
        ABUSE_CMD_DISCARD => "DISCARD",
        ABUSE_CMD_WRITE_ZEROES => "WRITE_ZEROES",
        _ => "unknown command",
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// An open control node `/dev/abctlN`.
///
/// The protocol is stateless: any number of `Control`s, in any threads or
/// processes, may serve one device. Requests fetched through this handle
/// and not completed are handed out again when it is closed.
pub struct Control {
    file: File,
    path: PathBuf,
}

impl Control {
    /// Opens a control node.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::Open {
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                path: path.clone(),
            })?;
        Ok(Control { file, path })
    }

    /// Wraps an already open control node (e.g. one inherited from a parent).
    pub fn from_fd(fd: std::os::fd::OwnedFd, path: impl AsRef<Path>) -> Self {
        Control {
            file: File::from(fd),
            path: path.as_ref().to_path_buf(),
        }
    }

    /// The path this handle was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, op: &'static str, errno: Errno, done: usize) -> Error {
        Error::Ioctl {
            path: self.path.clone(),
            op,
            errno,
            done,
        }
    }

    /// ABUSE_GET_STATUS: configuration and counters.
    pub fn status(&self) -> Result<AbuseStatus> {
        let mut st = AbuseStatus::default();
        // SAFETY: `st` is a valid, writable AbuseStatus for the whole call.
        unsafe { raw::get_status(self.file.as_raw_fd(), &mut st) }
            .map_err(|e| self.err("GET_STATUS", e, 0))?;
        Ok(st)
    }

    /// ABUSE_SET_STATUS: configure the device. EBUSY on a device that is
    /// not configured means its block device is still open from the
    /// previous configuration: that comes back as [`Error::StillOpen`].
    pub fn set_status(&self, st: &AbuseStatus) -> Result<()> {
        // SAFETY: `st` is a valid AbuseStatus the kernel only reads.
        match unsafe { raw::set_status(self.file.as_raw_fd(), st) } {
            Ok(_) => Ok(()),
            Err(Errno::EBUSY) => match self.status() {
                Ok(now) if now.flags & ABUSE_FLAG_CONFIGURED == 0 => Err(Error::StillOpen {
                    path: self.path.clone(),
                    block: format!("/dev/abuse{}", now.index),
                }),
                _ => Err(self.err("SET_STATUS", Errno::EBUSY, 0)),
            },
            Err(e) => Err(self.err("SET_STATUS", e, 0)),
        }
    }

    /// ABUSE_RESET: fail everything outstanding, unconfigure.
    pub fn reset(&self) -> Result<()> {
        // SAFETY: RESET takes no argument.
        unsafe { raw::reset(self.file.as_raw_fd()) }.map_err(|e| self.err("RESET", e, 0))?;
        Ok(())
    }

    /// ABUSE_GET_BIO: fetches up to `bios.len()` pending requests, placing
    /// WRITE payloads (and READ space) in `data`. Returns how many were
    /// fetched: 0 when nothing is pending.
    pub fn get_bios(&self, bios: &mut [AbuseBio], data: &mut [u8]) -> Result<usize> {
        let (ptr, len) = (data.as_mut_ptr() as u64, data.len() as u64);
        self.get_raw(bios, ptr, len, 0)
    }

    /// ABUSE_GET_BIO fetching descriptors only (ABUSE_XFER_DESCRIPTORS,
    /// protocol version 5): no payload is copied, every `addr` is 0, and
    /// WRITEs are completed with ABUSE_BIO_FILE or failed.
    pub fn get_descriptors(&self, bios: &mut [AbuseBio]) -> Result<usize> {
        self.get_raw(bios, 0, 0, ABUSE_XFER_DESCRIPTORS)
    }

    fn get_raw(
        &self,
        bios: &mut [AbuseBio],
        data: u64,
        data_len: u64,
        flags: u32,
    ) -> Result<usize> {
        let mut xfer = AbuseXfer {
            bios: bios.as_mut_ptr() as u64,
            data,
            data_len,
            count: bios.len().min(u32::MAX as usize) as u32,
            flags,
            ..Default::default()
        };
        // SAFETY: the kernel writes at most `count` entries into `bios` and at
        // most `data_len` bytes at `data` (a buffer the caller exclusively
        // borrows, or nothing), both exclusively borrowed here.
        match unsafe { raw::get_bio(self.file.as_raw_fd(), &mut xfer) } {
            Ok(_) => Ok(xfer.count as usize),
            Err(Errno::ENOMSG) => Ok(0),
            Err(e) => Err(self.err("GET_BIO", e, 0)),
        }
    }

    /// ABUSE_PUT_BIO: completes `bios` in order. For READs the kernel copies
    /// `len` bytes from each entry's `addr`, which must point into memory
    /// this process owns (normally the `data` buffer of the GET that fetched
    /// it). On failure, [`Error::Ioctl::done`] tells how many completed.
    pub fn put_bios(&self, bios: &[AbuseBio]) -> Result<usize> {
        let mut xfer = AbuseXfer {
            bios: bios.as_ptr() as u64,
            count: bios.len().min(u32::MAX as usize) as u32,
            ..Default::default()
        };
        // SAFETY: the kernel reads `count` entries from `bios` and, for READs,
        // reads from each `addr`; a bad address makes it fail with EFAULT, it
        // never writes through them.
        match unsafe { raw::put_bio(self.file.as_raw_fd(), &mut xfer) } {
            Ok(_) => Ok(xfer.count as usize),
            Err(e) => Err(self.err("PUT_BIO", e, xfer.count as usize)),
        }
    }

    /// ABUSE_SERVE: completes `bios[..put]`, then fetches up to `bios.len()`
    /// pending requests into `bios` (payloads in `data`), from hardware
    /// queue `queue` first, sleeping up to `wait` when none is pending.
    /// Returns how many were fetched (0: none came within `wait`, or a
    /// signal arrived). On failure, [`Error::Ioctl::done`] tells how many of
    /// the `put` entries completed.
    pub fn serve(
        &self,
        bios: &mut [AbuseBio],
        put: usize,
        data: &mut [u8],
        queue: u32,
        wait: Duration,
    ) -> Result<usize> {
        let (ptr, len) = (data.as_mut_ptr() as u64, data.len() as u64);
        self.serve_raw(bios, put, (ptr, len, 0), queue, wait)
    }

    /// ABUSE_SERVE fetching descriptors only, as [`Control::get_descriptors`].
    pub fn serve_descriptors(
        &self,
        bios: &mut [AbuseBio],
        put: usize,
        queue: u32,
        wait: Duration,
    ) -> Result<usize> {
        self.serve_raw(bios, put, (0, 0, ABUSE_XFER_DESCRIPTORS), queue, wait)
    }

    /// SERVE with the fetch's (data, data_len, flags).
    fn serve_raw(
        &self,
        bios: &mut [AbuseBio],
        put: usize,
        (data, data_len, flags): (u64, u64, u32),
        queue: u32,
        wait: Duration,
    ) -> Result<usize> {
        assert!(put <= bios.len(), "put {put} > {} entries", bios.len());
        let mut x = AbuseServe {
            bios: bios.as_mut_ptr() as u64,
            data,
            data_len,
            put: put as u32,
            count: bios.len().min(u32::MAX as usize) as u32,
            queue,
            wait_ms: wait.as_millis().min(u32::MAX as u128) as u32,
            flags,
            ..Default::default()
        };
        // SAFETY: the kernel reads the first `put` entries of `bios` (and
        // READ payloads from their `addr`, failing with EFAULT on a bad one),
        // then writes at most `count` entries into `bios` and `data_len`
        // bytes at `data` (the caller's exclusively borrowed buffer, or
        // nothing).
        match unsafe { raw::serve(self.file.as_raw_fd(), &mut x) } {
            Ok(_) => Ok(x.count as usize),
            Err(e) => Err(self.err("SERVE", e, x.put as usize)),
        }
    }

    /// Waits until requests are pending or `timeout` passes (None: forever).
    /// Returns the poll events seen (empty on timeout).
    pub fn poll(&self, timeout: Option<Duration>) -> Result<PollFlags> {
        let timeout = match timeout {
            None => PollTimeout::NONE,
            Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => Ok(PollFlags::empty()),
            Ok(_) => Ok(fds[0].revents().unwrap_or(PollFlags::empty())),
            Err(e) => Err(self.err("poll", e, 0)),
        }
    }
}

impl std::os::fd::AsRawFd for Control {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Control {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
