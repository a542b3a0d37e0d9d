//! Running one request on the backend: transient errors retried, a panic
//! contained to its request, and every failure carried to the kernel as an
//! errno and logged (rate-limited).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use abuse_sys::uapi::*;
use abuse_sys::{cmd_name, AbuseBio};
use nix::errno::Errno;

use super::{Counters, Stats};
use crate::backend::Backend;

/// Attempts of a backend call that fails with a transient error (EINTR,
/// EAGAIN, ENOMEM) before the failure is reported.
const TRANSIENT_ATTEMPTS: u32 = 5;

/// The errno a backend error stands for.
pub fn errno_of(e: &io::Error) -> i32 {
    if let Some(n) = e.raw_os_error() {
        return n;
    }
    match e.kind() {
        io::ErrorKind::Unsupported => Errno::EOPNOTSUPP as i32,
        io::ErrorKind::InvalidInput => Errno::EINVAL as i32,
        io::ErrorKind::OutOfMemory => Errno::ENOMEM as i32,
        io::ErrorKind::StorageFull => Errno::ENOSPC as i32,
        io::ErrorKind::ReadOnlyFilesystem => Errno::EROFS as i32,
        _ => Errno::EIO as i32,
    }
}

fn transient(errno: i32) -> bool {
    [Errno::EINTR, Errno::EAGAIN, Errno::ENOMEM]
        .iter()
        .any(|e| *e as i32 == errno)
}

/// Calls `op`, retrying transient failures with a short backoff; a panic
/// becomes an EIO failure of this request alone (the backend is shared by
/// every worker: one bad request must not take them all down).
/// Why a request failed: the errno the kernel gets, and what the backend
/// said when that is more than the errno (a corrupt delta, a panic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub errno: i32,
    pub detail: Option<String>,
}

impl Failure {
    fn errno(errno: Errno) -> Self {
        Failure {
            errno: errno as i32,
            detail: None,
        }
    }
}

fn attempt(op: &mut dyn FnMut() -> io::Result<()>, stats: &Counters) -> Result<(), Failure> {
    let mut delay = Duration::from_millis(1);
    for n in 1.. {
        match catch_unwind(AssertUnwindSafe(&mut *op)) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => {
                let errno = errno_of(&e);
                if !transient(errno) || n >= TRANSIENT_ATTEMPTS {
                    let detail = e.raw_os_error().is_none().then(|| e.to_string());
                    return Err(Failure { errno, detail });
                }
                stats.retries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(delay);
                delay *= 4;
            }
            Err(panic) => {
                stats.panics.fetch_add(1, Ordering::Relaxed);
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                return Err(Failure {
                    errno: Errno::EIO as i32,
                    detail: Some(format!(
                        "the backend panicked: {}",
                        what.unwrap_or_default()
                    )),
                });
            }
        }
    }
    unreachable!()
}

/// Runs `bio` on the backend with its payload inside `buf`, whose first
/// byte is at user address `base`; see [`execute_payload`].
#[cfg(test)]
pub fn execute(
    backend: &dyn Backend,
    bio: &mut AbuseBio,
    buf: &mut [u8],
    base: u64,
    stats: &Stats,
    kernel: Kernel,
) -> Option<Failure> {
    // The kernel placed the payload at `addr`, inside `buf`.
    let start = bio.addr.wrapping_sub(base) as usize;
    let payload = buf.get_mut(start..start.saturating_add(bio.len as usize));
    execute_payload(backend, bio, payload, stats, kernel)
}

/// The payloads of a batch, each split off the buffer (they never
/// overlap: the kernel places them one after the other), so that the
/// requests can run at once. A payload outside the buffer is `None`.
pub fn split_payloads<'a>(
    bios: &'a mut [AbuseBio],
    buf: &'a mut [u8],
    base: u64,
) -> Vec<(&'a mut AbuseBio, Option<&'a mut [u8]>)> {
    let mut rest = buf;
    let mut at = 0usize;
    bios.iter_mut()
        .map(|bio| {
            if !matches!(bio.cmd, ABUSE_CMD_READ | ABUSE_CMD_WRITE) {
                return (bio, None);
            }
            let len = bio.len as usize;
            let start = bio.addr.wrapping_sub(base) as usize;
            if len == 0 {
                return (bio, Some(<&mut [u8]>::default()));
            }
            let fits = start >= at && start.saturating_add(len) <= at + rest.len();
            if !fits {
                return (bio, None);
            }
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - at);
            let (payload, tail) = tail.split_at_mut(len);
            rest = tail;
            at = start + len;
            (bio, Some(payload))
        })
        .collect()
}

/// What the kernel's protocol version lets a PUT say.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    /// Failures carry an errno (ABUSE_BIO_ERRNO, version 2).
    pub errno: bool,
    /// READs may complete as zeroes (ABUSE_BIO_ZEROES, version 4).
    pub zeroes: bool,
}

impl Kernel {
    pub fn of(version: u32) -> Self {
        Kernel {
            errno: version >= 2,
            zeroes: version >= 4,
        }
    }
}

/// Runs `bio` on the backend and fills in its PUT result (with what
/// `kernel` understands: an errno, zeroes). `payload` is the READ's or
/// WRITE's data (None: outside the buffer, an EIO). Returns the failure,
/// if any.
pub fn execute_payload(
    backend: &dyn Backend,
    bio: &mut AbuseBio,
    payload: Option<&mut [u8]>,
    stats: &Stats,
    kernel: Kernel,
) -> Option<Failure> {
    let stats = stats.mine();
    let offset = bio.sector << ABUSE_SECTOR_SHIFT;
    let len = bio.len as u64;
    if bio.flags & ABUSE_BIO_REQUEUED != 0 {
        stats.requeued.fetch_add(1, Ordering::Relaxed);
    }
    let fua = bio.flags & ABUSE_BIO_FUA != 0;
    let ro = backend.read_only();
    bio.flags &= !(ABUSE_BIO_ERRNO | ABUSE_BIO_ZEROES);
    let result = match bio.cmd {
        ABUSE_CMD_READ => match payload {
            Some(data) => {
                let mut hole = false;
                let read = &mut || match kernel.zeroes {
                    true => backend.read_or_hole(offset, data).map(|h| hole = h),
                    false => backend.read(offset, data),
                };
                attempt(read, stats).map(|()| {
                    stats.reads.fetch_add(1, Ordering::Relaxed);
                    stats.bytes_read.fetch_add(len, Ordering::Relaxed);
                    if hole {
                        bio.flags |= ABUSE_BIO_ZEROES;
                        stats.holes.fetch_add(1, Ordering::Relaxed);
                    }
                })
            }
            None => Err(Failure::errno(Errno::EIO)),
        },
        ABUSE_CMD_WRITE if !ro => match payload {
            Some(data) => attempt(&mut || backend.write(offset, data, fua), stats).map(|()| {
                stats.writes.fetch_add(1, Ordering::Relaxed);
                stats.bytes_written.fetch_add(len, Ordering::Relaxed);
                if fua {
                    stats.fua.fetch_add(1, Ordering::Relaxed);
                }
            }),
            None => Err(Failure::errno(Errno::EIO)),
        },
        ABUSE_CMD_FLUSH => attempt(&mut || backend.flush(), stats).map(|()| {
            stats.flushes.fetch_add(1, Ordering::Relaxed);
        }),
        ABUSE_CMD_DISCARD if !ro => {
            attempt(&mut || backend.discard(offset, len), stats).map(|()| {
                stats.discards.fetch_add(1, Ordering::Relaxed);
            })
        }
        ABUSE_CMD_WRITE_ZEROES if !ro => {
            let unmap = bio.flags & ABUSE_BIO_NOUNMAP == 0;
            attempt(&mut || backend.write_zeroes(offset, len, unmap), stats).map(|()| {
                stats.write_zeroes.fetch_add(1, Ordering::Relaxed);
            })
        }
        ABUSE_CMD_WRITE | ABUSE_CMD_DISCARD | ABUSE_CMD_WRITE_ZEROES => {
            Err(Failure::errno(Errno::EROFS))
        }
        _ => Err(Failure::errno(Errno::EOPNOTSUPP)),
    };
    bio.error = 0;
    match result {
        Ok(()) => {
            bio.result = ABUSE_RESULT_OKAY;
            None
        }
        Err(f) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            bio.result = ABUSE_RESULT_MEDIA_FAILURE;
            if kernel.errno {
                bio.flags |= ABUSE_BIO_ERRNO;
                bio.error = f.errno as u32;
            }
            Some(f)
        }
    }
}

/// Hands a READ or WRITE to the kernel to move between the request and
/// the backend's file `fd` (ABUSE_BIO_FILE): fills in the PUT entry and
/// counts it. False: not such a request, or not one the file may take (a
/// WRITE to a read-only backend, a range past the backend's end): the
/// backend runs it.
pub fn by_file(backend: &dyn Backend, bio: &mut AbuseBio, fd: RawFd, stats: &Stats) -> bool {
    let write = match bio.cmd {
        ABUSE_CMD_READ => false,
        ABUSE_CMD_WRITE if !backend.read_only() => true,
        _ => return false,
    };
    let (offset, len) = (bio.sector << ABUSE_SECTOR_SHIFT, bio.len as u64);
    if len == 0
        || offset
            .checked_add(len)
            .is_none_or(|end| end > backend.size())
    {
        return false;
    }
    hand_to_file(bio, fd, offset, write, stats);
    true
}

/// Hands a READ, or a WRITE without FUA, whose data lies whole in one of
/// the backend's files (`Backend::read_from_file`, `write_to_file`) to the
/// kernel to move there, if it is one of `files`. False: not such a
/// request; the backend runs it.
pub fn place_by_file(
    backend: &dyn Backend,
    bio: &mut AbuseBio,
    files: &[RawFd],
    stats: &Stats,
) -> bool {
    let write = match bio.cmd {
        ABUSE_CMD_READ => false,
        ABUSE_CMD_WRITE if bio.flags & ABUSE_BIO_FUA == 0 && !backend.read_only() => true,
        _ => return false,
    };
    if bio.len == 0 {
        return false;
    }
    let (offset, len) = (bio.sector << ABUSE_SECTOR_SHIFT, bio.len as u64);
    let placed = if write {
        backend.write_to_file(offset, len)
    } else {
        backend.read_from_file(offset, len)
    };
    match placed {
        Some((fd, at)) if files.contains(&fd.as_raw_fd()) => {
            hand_to_file(bio, fd.as_raw_fd(), at, write, stats);
            true
        }
        _ => false,
    }
}

/// Fills in the PUT entry that has the kernel move the request's data to
/// or from `fd` at `at`, and counts the request.
fn hand_to_file(bio: &mut AbuseBio, fd: RawFd, at: u64, write: bool, stats: &Stats) {
    let len = bio.len as u64;
    let stats = stats.mine();
    if bio.flags & ABUSE_BIO_REQUEUED != 0 {
        stats.requeued.fetch_add(1, Ordering::Relaxed);
    }
    bio.flags = (bio.flags & !(ABUSE_BIO_ERRNO | ABUSE_BIO_ZEROES)) | ABUSE_BIO_FILE;
    bio.addr = at;
    bio.error = fd as u32;
    bio.result = ABUSE_RESULT_OKAY;
    stats.file_io.fetch_add(1, Ordering::Relaxed);
    if write {
        stats.writes.fetch_add(1, Ordering::Relaxed);
        stats.bytes_written.fetch_add(len, Ordering::Relaxed);
        if bio.flags & ABUSE_BIO_FUA != 0 {
            stats.fua.fetch_add(1, Ordering::Relaxed);
        }
    } else {
        stats.reads.fetch_add(1, Ordering::Relaxed);
        stats.bytes_read.fetch_add(len, Ordering::Relaxed);
    }
}

/// The kernel refused to move a request's data to or from the file
/// (`errno`: EBADF, EINVAL): the entry becomes an I/O error for the next
/// PUT, with the refusal as its detail.
pub fn file_refused(bio: &mut AbuseBio, errno: Errno, stats: &Stats, kernel: Kernel) -> Failure {
    stats.mine().errors.fetch_add(1, Ordering::Relaxed);
    bio.flags &= !ABUSE_BIO_FILE;
    bio.addr = 0;
    bio.result = ABUSE_RESULT_MEDIA_FAILURE;
    bio.error = 0;
    if kernel.errno {
        bio.flags |= ABUSE_BIO_ERRNO;
        bio.error = Errno::EIO as u32;
    }
    Failure {
        errno: Errno::EIO as i32,
        detail: Some(format!(
            "the kernel would not move its data to or from the backing file: {}",
            errno.desc()
        )),
    }
}

/// Logs failed requests to stderr, at most `BURST` a second; the rest are
/// counted and summed up in the next line that gets through.
pub struct FailureLog {
    state: Mutex<(Instant, u32, u64)>,
}

impl FailureLog {
    const BURST: u32 = 10;

    pub fn new() -> Self {
        FailureLog {
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// Logs (or counts) the failure of `bio` with `errno` on `device`.
    pub fn failed(&self, device: &std::path::Path, bio: &AbuseBio, f: &Failure) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.0.elapsed() >= Duration::from_secs(1) {
            *st = (Instant::now(), 0, st.2);
        }
        if st.1 >= Self::BURST {
            st.2 += 1;
            return;
        }
        st.1 += 1;
        let suppressed = std::mem::take(&mut st.2);
        drop(st);
        let more = if suppressed > 0 {
            format!(" ({suppressed} more failures not shown)")
        } else {
            String::new()
        };
        eprintln!(
            "abuse server: {}: {} of {} bytes at offset {} failed: {}{more}",
            device.display(),
            cmd_name(bio.cmd),
            bio.len,
            bio.sector << ABUSE_SECTOR_SHIFT,
            Errno::from_raw(f.errno).desc(),
        );
        if let Some(d) = &f.detail {
            eprintln!("abuse server: {}:   {d}", device.display());
        }
    }
}

impl Default for FailureLog {
    fn default() -> Self {
        Self::new()
    }
}
