//! Where a delta lives: a file, or (in tests) a fake file that loses what
//! was not synced when it "crashes".

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Positional I/O with an explicit durability point.
pub trait Storage: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Everything written so far is durable when this returns.
    fn sync(&self) -> io::Result<()>;
    /// The size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// The range reads as zeroes, deallocated where the storage can.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        crate::backend::fill_zeroes(|b, at| self.write_at(b, at), offset, len)
    }
    /// Writes zeroes into the holes of the range, so that later writes
    /// there allocate nothing (and an fdatasync after them commits no file
    /// system journal); what the range reads does not change. Only while
    /// nobody else writes the range. By default, nothing (no holes).
    fn fill_holes(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

impl Storage for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Reads past the end (a sparse tail) are zeroes.
        crate::backend::read_or_zeroes(self, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn size(&self) -> io::Result<u64> {
        // A block device (a base on LVM, say) reports its size by ioctl.
        crate::blkdev::size(self)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        crate::backend::punch_file(self, offset, len)
    }

    fn fill_holes(&self, offset: u64, len: u64) -> io::Result<()> {
        use nix::unistd::{lseek, Whence};
        use std::os::fd::AsRawFd;
        let end = offset.saturating_add(len).min(self.size()?);
        let mut at = offset;
        while at < end {
            let hole = match lseek(self.as_raw_fd(), at as i64, Whence::SeekHole) {
                Ok(h) => h as u64,
                // No hole-seeking here (or nothing left): nothing to fill.
                Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENXIO) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            if hole >= end {
                break;
            }
            let data = match lseek(self.as_raw_fd(), hole as i64, Whence::SeekData) {
                Ok(d) => (d as u64).min(end),
                Err(nix::errno::Errno::ENXIO) => end,
                Err(e) => return Err(e.into()),
            };
            crate::backend::fill_zeroes(|b, at| self.write_all_at(b, at), hole, data - hole)?;
            at = data;
        }
        Ok(())
    }
}

/// What serving processes share: the working area, and locks. Storage
/// without them (the tests' in-memory files) is private to one `Delta`,
/// whose own mutexes then suffice.
pub trait Shared: Storage {
    /// A shared, writable mapping of the working area of the delta named
    /// `uuid` (`len` bytes, zeroes when new).
    fn map_working(&self, _uuid: &[u8; 16], _len: u64) -> io::Result<Option<memmap2::MmapMut>> {
        Ok(None)
    }
    /// Takes the cross-process lock on byte `at`, waiting for it.
    fn lock_byte(&self, _at: u64) -> io::Result<()> {
        Ok(())
    }
    /// Releases the cross-process lock on byte `at`.
    fn unlock_byte(&self, _at: u64) -> io::Result<()> {
        Ok(())
    }
    /// This boot's id: a working area left by a server of this boot is
    /// live memory and may be adopted; one from another boot is rebuilt
    /// from the table. None: never adopt.
    fn boot_id(&self) -> Option<[u8; 16]> {
        None
    }
    /// Tries to become the delta's only server, without waiting: true if
    /// no other server has it open, and none can open it until this one
    /// is gone (it then writes nothing the working area does not show
    /// this one). False: others may run (this one still holds its share).
    /// By default (storage private to one `Delta`): true.
    fn lock_sole(&self) -> io::Result<bool> {
        Ok(true)
    }
    /// Removes the working area of the delta named `uuid`: its last server
    /// stopped, with everything committed. By default, nothing (none).
    fn remove_working(&self, _uuid: &[u8; 16]) -> io::Result<()> {
        Ok(())
    }
}

/// Where the working areas live: shared memory, so that a delta's fsyncs
/// never write them back, a killed server's survive for the next one, and
/// a reboot clears them. `ABUSE_COW_WORKDIR` overrides it.
pub fn working_dir() -> std::path::PathBuf {
    std::env::var_os("ABUSE_COW_WORKDIR")
        .map(Into::into)
        .unwrap_or_else(|| "/dev/shm".into())
}

/// The working area's file for the delta `file` named `uuid`: the file's
/// identity is in the name too, so that a copy of a delta (same uuid)
/// served at the same time gets its own.
pub fn working_path(file: &File, uuid: &[u8; 16]) -> io::Result<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    Ok(working_dir().join(format!("abuse-cow-{hex}-{:x}-{}", m.dev(), m.ino())))
}

/// The kernel's boot id (/proc/sys/kernel/random/boot_id), as 16 bytes.
pub fn boot_id() -> Option<[u8; 16]> {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
}

fn ofd_lock(file: &File, at: u64, kind: i16, wait: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fl = nix::libc::flock {
        l_type: kind,
        l_whence: nix::libc::SEEK_SET as i16,
        l_start: at as i64,
        l_len: 1,
        l_pid: 0,
    };
    loop {
        let arg = if wait {
            nix::fcntl::FcntlArg::F_OFD_SETLKW(&fl)
        } else {
            nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)
        };
        match nix::fcntl::fcntl(file.as_raw_fd(), arg) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => return r.map(|_| ()).map_err(io::Error::from),
        }
    }
}

/// A read lock on byte `at` of `file` (which may be open read-only),
/// waiting for it: excludes the holders of write locks on it.
pub fn read_lock_byte(file: &File, at: u64) -> io::Result<()> {
    ofd_lock(file, at, nix::libc::F_RDLCK as i16, true)
}

/// Opens the working area at `path`, or creates it (`O_EXCL`, mode 0600)
/// if there is none; never through a symbolic link. One that is there must
/// be a regular file of this server's user that no other user may open:
/// else another user made it (the name is predictable) or can change it,
/// holding a writable mapping of what this server serves, or truncating
/// it under the server's mapping. Such an area is refused, not adopted nor
/// removed (it may hold a killed server's acknowledged writes): every
/// server of a delta runs as one user.
fn open_working(path: &std::path::Path) -> io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let refuse = |why: String| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: not a working area this server can trust ({why}); \
                 remove it once no server of this delta runs, and start again",
                path.display()
            ),
        )
    };
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    // O_NONBLOCK: opening a FIFO or a device planted there must not wait.
    let flags = nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK;
    for _ in 0..8 {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
        {
            Ok(area) => {
                let m = area.metadata().map_err(named)?;
                let euid = nix::unistd::geteuid().as_raw();
                if !m.file_type().is_file() {
                    let what = match m.file_type() {
                        t if t.is_dir() => "a directory",
                        t if t.is_fifo() => "a FIFO",
                        t if t.is_block_device() || t.is_char_device() => "a device",
                        t if t.is_socket() => "a socket",
                        _ => "not a regular file",
                    };
                    return Err(refuse(what.into()));
                }
                if m.uid() != euid {
                    return Err(refuse(format!(
                        "owned by uid {}, this server runs as uid {euid}",
                        m.uid()
                    )));
                }
                if m.mode() & 0o077 != 0 {
                    return Err(refuse(format!(
                        "mode {:o}: other users may open it",
                        m.mode() & 0o7777
                    )));
                }
                return Ok(area);
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
                return Err(refuse("a symbolic link".into()))
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => {
                return Err(refuse(
                    "a socket, or a device with nothing behind it".into(),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(named(e)),
        }
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(flags)
            .open(path)
        {
            Ok(area) => return Ok(area),
            // Another server made it meanwhile: open that one.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(named(e)),
        }
    }
    Err(refuse("it keeps appearing and vanishing".into()))
}

impl Shared for File {
    fn map_working(&self, uuid: &[u8; 16], len: u64) -> io::Result<Option<memmap2::MmapMut>> {
        use std::os::fd::AsRawFd;
        let path = working_path(self, uuid)?;
        let area = open_working(&path)?;
        // Reserve it now: a full tmpfs is an error here, not a SIGBUS later.
        if area.metadata()?.len() < len {
            nix::fcntl::posix_fallocate(area.as_raw_fd(), 0, len as i64).map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!(
                        "{}: cannot reserve {len} bytes for the working area ({e}); \
                         make room, or set ABUSE_COW_WORKDIR",
                        path.display()
                    ),
                )
            })?;
        }
        // SAFETY: the file is the delta's working area, which other
        // processes change concurrently by design; it is only ever accessed
        // through atomics (see `delta::Working`), and never truncated (it
        // is this user's alone: `open_working`).
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(len as usize)
                .map_mut(&area)?
        };
        Ok(Some(map))
    }

    fn lock_byte(&self, at: u64) -> io::Result<()> {
        // OFD locks belong to the open file, not the process: they exclude
        // other opens of the delta (other servers), and go away with them.
        ofd_lock(self, at, nix::libc::F_WRLCK as i16, true)
    }

    fn unlock_byte(&self, at: u64) -> io::Result<()> {
        ofd_lock(self, at, nix::libc::F_UNLCK as i16, false)
    }

    fn boot_id(&self) -> Option<[u8; 16]> {
        boot_id()
    }

    /// A bare file holds no server's lock: it never knows it is the only
    /// one (`Flock<File>` does).
    fn lock_sole(&self) -> io::Result<bool> {
        Ok(false)
    }

    fn remove_working(&self, uuid: &[u8; 16]) -> io::Result<()> {
        match std::fs::remove_file(working_path(self, uuid)?) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}
