//! The cow backend: copy-on-write over a read-only base (docs/cow-format.md).
//!
//! Serving processes hold the delta's lock shared (the first one briefly
//! exclusive, while it sets up the shared working area) and the base's
//! lock shared; `merge` needs both exclusively, so it refuses while any
//! server has the delta open, or any delta's server reads the base.

pub mod delta;
pub mod format;
pub mod storage;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use rayon::prelude::*;

use crate::backend::{Backend, ALL_FEATURES};
use delta::{Delta, DeltaError};

/// Why a cow operation failed, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// The delta could not be created, opened or used.
    #[error("{0}: {1}")]
    Delta(PathBuf, DeltaError),
    /// I/O on the file failed.
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
    /// A server holds the delta.
    #[error("{0}: in use by a running cow server (stop it first)")]
    Busy(PathBuf),
    /// The delta to create exists already.
    #[error("{0}: already exists (remove it, or pick another name)")]
    Exists(PathBuf),
    /// A server reads the base, so it cannot be merged into.
    #[error("{0}: the base is in use by a cow server (stop it before merging)")]
    BaseBusy(PathBuf),
    /// The base is being merged into.
    #[error("{0}: the base is being merged into (wait for the merge to finish)")]
    BaseMerging(PathBuf),
    /// The base's contents are not those the delta was made over.
    #[error(
        "{0}: does not match the delta: its contents differ from the base the delta was made over"
    )]
    VerifyFailed(PathBuf),
}

fn io_err(p: &Path) -> impl FnOnce(io::Error) -> CowError + '_ {
    move |e| CowError::Io(p.to_path_buf(), e)
}

/// Opens the base read-only and takes its lock (without waiting).
fn lock_base(path: &Path, how: BaseLock) -> Result<Flock<File>, CowError> {
    let file = File::open(path).map_err(io_err(path))?;
    let (arg, busy): (_, fn(PathBuf) -> CowError) = match how {
        BaseLock::Shared => (FlockArg::LockSharedNonblock, CowError::BaseMerging),
        BaseLock::Exclusive => (FlockArg::LockExclusiveNonblock, CowError::BaseBusy),
    };
    Flock::lock(file, arg).map_err(|_| busy(path.to_path_buf()))
}

/// Takes the delta's lock without waiting.
fn lock(file: File, path: &Path) -> Result<Flock<File>, CowError> {
    Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|_| CowError::Busy(path.to_path_buf()))
}

/// A delta opened only to read its durable state: no shared working area,
/// no locks (a server may be running).
struct ReadOnly(File);

impl storage::Storage for ReadOnly {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        storage::Storage::read_at(&self.0, buf, offset)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn punch(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        storage::Storage::size(&self.0)
    }
}

impl storage::Shared for ReadOnly {
    // Read under the delta's flush lock: what `cow info` reads is one
    // commit, not a mix of two.
    fn lock_byte(&self, at: u64) -> io::Result<()> {
        storage::read_lock_byte(&self.0, at)
    }
    fn unlock_byte(&self, at: u64) -> io::Result<()> {
        storage::Shared::unlock_byte(&self.0, at)
    }
}

/// What `Cow::inspect` found.
pub struct Inspection {
    /// The delta's header.
    pub header: format::Header,
    /// Blocks the durable table maps.
    pub mapped: u64,
    /// The base's path: the one given, or the one the delta records.
    pub base_path: PathBuf,
    /// Whether a server holds the delta (its table on disk may then trail
    /// the server's).
    pub in_use: bool,
}

/// A base that is not there: `cow info` reads only the delta.
struct NoBase;

impl storage::Storage for NoBase {
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::NotFound))
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Err(io::Error::from(io::ErrorKind::NotFound))
    }
}

/// An open cow device.
pub struct Cow {
    delta: Delta<Flock<File>, Flock<File>>,
    /// The base's path.
    pub base_path: PathBuf,
}

/// Attempts to join a delta whose first server is still setting it up.
const JOIN_ATTEMPTS: u32 = 100;

impl storage::Storage for Flock<File> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        storage::Storage::read_at(&**self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        storage::Storage::write_at(&**self, buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        storage::Storage::sync(&**self)
    }
    fn size(&self) -> io::Result<u64> {
        storage::Storage::size(&**self)
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        storage::Storage::punch(&**self, offset, len)
    }
    fn fill_holes(&self, offset: u64, len: u64) -> io::Result<()> {
        storage::Storage::fill_holes(&**self, offset, len)
    }
}

impl storage::Shared for Flock<File> {
    fn map_working(&self, uuid: &[u8; 16], len: u64) -> io::Result<Option<memmap2::MmapMut>> {
        storage::Shared::map_working(&**self, uuid, len)
    }
    fn lock_byte(&self, at: u64) -> io::Result<()> {
        storage::Shared::lock_byte(&**self, at)
    }
    fn unlock_byte(&self, at: u64) -> io::Result<()> {
        storage::Shared::unlock_byte(&**self, at)
    }
    fn boot_id(&self) -> Option<[u8; 16]> {
        storage::boot_id()
    }
    /// Every server holds the delta's lock shared: exclusive, this is the
    /// only one, and a server starting now waits for it to go.
    fn lock_sole(&self) -> io::Result<bool> {
        if self.relock(FlockArg::LockExclusiveNonblock).is_ok() {
            return Ok(true);
        }
        // flock(2) dropped the shared lock trying to convert it: take it
        // again. Meanwhile another server may have found itself the last
        // and committed and removed the area: this one's writes, all in
        // the area before, were committed with it.
        self.relock(FlockArg::LockShared).map_err(io::Error::from)?;
        Ok(false)
    }
    fn remove_working(&self, uuid: &[u8; 16]) -> io::Result<()> {
        storage::Shared::remove_working(&**self, uuid)
    }
}

/// How a cow opener holds the base.
#[derive(Clone, Copy)]
enum BaseLock {
    /// Servers: a merge must not rewrite it under them.
    Shared,
    /// Merge: no server of any delta may be reading it.
    Exclusive,
}

impl Cow {
    fn new(delta: Delta<Flock<File>, Flock<File>>, base_path: PathBuf) -> Cow {
        Cow { delta, base_path }
    }

    /// Creates an empty delta `delta` over `base` with `block_size` blocks
    /// (reading the whole base once; `progress` is told the bytes done).
    pub fn create(
        base: &Path,
        delta: &Path,
        block_size: u32,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Cow, CowError> {
        let base_file = lock_base(base, BaseLock::Shared)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(delta)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    CowError::Exists(delta.to_path_buf())
                } else {
                    CowError::Io(delta.to_path_buf(), e)
                }
            })?;
        let store = lock(file, delta)?;
        let abs = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        match Delta::create(
            store,
            base_file,
            block_size,
            &abs.to_string_lossy(),
            progress,
        ) {
            Ok(d) => {
                let cow = Cow::new(d, abs);
                cow.delta_store()
                    .relock(FlockArg::LockShared)
                    .map_err(|e| CowError::Io(delta.to_path_buf(), e.into()))?;
                Ok(cow)
            }
            Err(e) => {
                // Nothing half-made is left behind.
                let _ = std::fs::remove_file(delta);
                Err(CowError::Delta(delta.to_path_buf(), e))
            }
        }
    }

    /// Opens a delta to serve it; the base is the one its header names
    /// unless given. The first server sets up the shared working area (it
    /// holds the delta's lock exclusively meanwhile, and keeps what a server
    /// of this boot left there, checked); later ones check it and join.
    pub fn open(delta: &Path, base: Option<&Path>) -> Result<Cow, CowError> {
        let open_file = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(delta)
                .map_err(io_err(delta))
        };
        for _ in 0..JOIN_ATTEMPTS {
            let (store, first) = match Flock::lock(open_file()?, FlockArg::LockExclusiveNonblock) {
                Ok(l) => (l, true),
                // Another server has it (or is setting it up): share it.
                Err((file, _)) => (
                    Flock::lock(file, FlockArg::LockShared)
                        .map_err(|(_, e)| CowError::Io(delta.to_path_buf(), e.into()))?,
                    false,
                ),
            };
            let (base_path, base_file) = Self::open_base(&*store, delta, base, BaseLock::Shared)?;
            let d = if first {
                Delta::open(store, base_file)
            } else {
                Delta::join(store, base_file)
            };
            match d {
                Ok(d) => {
                    let cow = Cow::new(d, base_path);
                    if first {
                        cow.delta_store()
                            .relock(FlockArg::LockShared)
                            .map_err(|e| CowError::Io(delta.to_path_buf(), e.into()))?;
                    }
                    return Ok(cow);
                }
                // Its first server died while setting it up, or an exclusive
                // opener (`cow info`'s probe) held it a moment: try again.
                Err(DeltaError::NotReady) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => return Err(CowError::Delta(delta.to_path_buf(), e)),
            }
        }
        Err(CowError::Delta(delta.to_path_buf(), DeltaError::NotReady))
    }

    /// Opens a delta no server has open, to merge it.
    pub fn open_exclusive(delta: &Path, base: Option<&Path>) -> Result<Cow, CowError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(delta)
            .map_err(io_err(delta))?;
        let store = lock(file, delta)?;
        let (base_path, base_file) = Self::open_base(&*store, delta, base, BaseLock::Exclusive)?;
        let d = Delta::open_for_merge(store, base_file)
            .map_err(|e| CowError::Delta(delta.to_path_buf(), e))?;
        Ok(Cow::new(d, base_path))
    }

    /// Where the working area of the delta at `delta` lives (while any
    /// server of this boot has served it).
    pub fn working_area_path(delta: &Path) -> Result<PathBuf, CowError> {
        let file = File::open(delta).map_err(io_err(delta))?;
        let h = Self::peek_header(&file).map_err(|e| CowError::Delta(delta.to_path_buf(), e))?;
        storage::working_path(&file, &h.uuid).map_err(io_err(delta))
    }

    fn delta_store(&self) -> &Flock<File> {
        self.delta.store()
    }

    /// The base's path: `base` if given, else the one the header names.
    fn base_path(
        store: &impl storage::Storage,
        delta: &Path,
        base: Option<&Path>,
    ) -> Result<PathBuf, CowError> {
        match base {
            Some(b) => Ok(b.to_path_buf()),
            None => Ok(PathBuf::from(
                Self::peek_base(store).map_err(|e| CowError::Delta(delta.to_path_buf(), e))?,
            )),
        }
    }

    /// The base, opened read-only and locked as `how` says.
    fn open_base(
        store: &impl storage::Storage,
        delta: &Path,
        base: Option<&Path>,
        how: BaseLock,
    ) -> Result<(PathBuf, Flock<File>), CowError> {
        let path = Self::base_path(store, delta, base)?;
        let file = lock_base(&path, how)?;
        Ok((path, file))
    }

    fn peek_base(store: &impl storage::Storage) -> Result<String, DeltaError> {
        Ok(Self::peek_header(store)?.base_path)
    }

    fn peek_header(store: &impl storage::Storage) -> Result<format::Header, DeltaError> {
        let mut hb = [0u8; format::PAGE];
        store.read_at(&mut hb, 0)?;
        Ok(format::Header::decode(&hb)?)
    }

    /// Reads a delta without changing it, also while a server has it open,
    /// and without its base: its header, the blocks its durable table maps,
    /// and whether a server holds it (dirty: the table on disk may trail
    /// the server's).
    pub fn inspect(delta: &Path, base: Option<&Path>) -> Result<Inspection, CowError> {
        let file = File::open(delta).map_err(io_err(delta))?;
        let in_use = match Flock::lock(
            file.try_clone().map_err(io_err(delta))?,
            FlockArg::LockExclusiveNonblock,
        ) {
            Ok(l) => {
                drop(l);
                false
            }
            Err(_) => true,
        };
        let base_path = Self::base_path(&file, delta, base)?;
        let d = Delta::inspect(ReadOnly(file), NoBase)
            .map_err(|e| CowError::Delta(delta.to_path_buf(), e))?;
        let mapped = d.mapped_blocks();
        Ok(Inspection {
            header: d.header().clone(),
            mapped,
            base_path,
            in_use,
        })
    }

    /// Reads every byte of `base` and checks it is the base `header` was
    /// made over (`cow info --verify`); `progress` is told the bytes done.
    pub fn verify(
        header: &format::Header,
        base: &Path,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), CowError> {
        let file = File::open(base).map_err(io_err(base))?;
        let size = storage::Storage::size(&file).map_err(io_err(base))?;
        if size != header.base_size {
            return Err(CowError::VerifyFailed(base.to_path_buf()));
        }
        let read = |off, buf: &mut [u8]| storage::Storage::read_at(&file, buf, off);
        let digest = format::digest(read, size, progress).map_err(io_err(base))?;
        if digest != header.base_digest {
            return Err(CowError::VerifyFailed(base.to_path_buf()));
        }
        Ok(())
    }

    /// How many acknowledged but not yet committed mappings this opener
    /// found and kept in the working area (a server of this boot was killed
    /// or stopped before a FLUSH); None: it was built from the table.
    pub fn adopted(&self) -> Option<u64> {
        self.delta.adopted()
    }

    /// The delta's header.
    pub fn header(&self) -> &format::Header {
        self.delta.header()
    }

    /// Blocks the delta maps (its working table).
    pub fn mapped_blocks(&self) -> u64 {
        self.delta.mapped_blocks()
    }

    /// Writes every mapped block into the base, then empties the delta
    /// (which then describes the new base).
    ///
    /// The delta is first marked as being merged: if the merge is cut short
    /// (the base then half written), the delta refuses to be served and
    /// `merge` runs again from the start, which finishes it.
    pub fn merge(
        mut self,
        delta_path: &Path,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, CowError> {
        // What a killed server left uncommitted is in the working area:
        // commit it, so that the delta on disk holds all that is merged.
        self.delta.flush().map_err(io_err(delta_path))?;
        self.delta.mark_merging().map_err(io_err(delta_path))?;
        let h = self.delta.header().clone();
        let base = OpenOptions::new()
            .write(true)
            .open(&self.base_path)
            .map_err(io_err(&self.base_path))?;
        let merged = (0..h.nblocks())
            .into_par_iter()
            .filter(|&b| self.delta.is_mapped(b))
            .map(|b| -> io::Result<u64> {
                let mut buf = vec![0u8; h.block_size as usize];
                let off = b * h.block_size as u64;
                self.delta.read(off, &mut buf)?;
                base.write_all_at(&buf, off)?;
                progress(h.block_size as u64);
                Ok(1)
            })
            .sum::<io::Result<u64>>()
            .map_err(io_err(&self.base_path))?;
        base.sync_all().map_err(io_err(&self.base_path))?;
        drop(base);
        // Start the delta over: a fresh one describing the merged base.
        let base_path = self.base_path.clone();
        let work = storage::working_path(self.delta_store(), &h.uuid);
        drop(self);
        if let Ok(work) = work {
            let _ = std::fs::remove_file(work);
        }
        let tmp = delta_path.with_extension("merging");
        let _ = std::fs::remove_file(&tmp);
        // `self` (and its exclusive lock on the base) is gone: the new
        // delta takes the base shared, like any server.
        Cow::create(&base_path, &tmp, h.block_size, &|_| {})?;
        std::fs::rename(&tmp, delta_path).map_err(io_err(delta_path))?;
        Ok(merged)
    }
}

impl Backend for Cow {
    fn size(&self) -> u64 {
        self.delta.header().virtual_size
    }

    fn features(&self) -> u32 {
        ALL_FEATURES
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.delta.read(offset, buf)
    }

    fn moved_files(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.delta.base().as_fd(), self.delta.store().as_fd()]
    }

    fn read_from_file(&self, offset: u64, len: u64) -> Option<(BorrowedFd<'_>, u64)> {
        Some(match self.delta.locate(offset, len)? {
            (delta::Source::Base, at) => (self.delta.base().as_fd(), at),
            (delta::Source::Delta, at) => (self.delta.store().as_fd(), at),
        })
    }

    /// A rewrite of mapped blocks goes where they are (a mapped block never
    /// moves); a first write is the server's to copy and map.
    fn write_to_file(&self, offset: u64, len: u64) -> Option<(BorrowedFd<'_>, u64)> {
        match self.delta.locate(offset, len)? {
            (delta::Source::Delta, at) => Some((self.delta.store().as_fd(), at)),
            (delta::Source::Base, _) => None,
        }
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.delta.write(offset, buf, fua)
    }

    /// A WRITE without FUA that reads nothing of the base (its blocks are
    /// mapped, or it covers them whole) only fills the page cache.
    fn may_block(&self, cmd: u16, offset: u64, len: u64, fua: bool) -> bool {
        !(cmd == abuse_sys::uapi::ABUSE_CMD_WRITE
            && !fua
            && self.delta.writes_in_place(offset, len))
    }

    fn flush(&self) -> io::Result<()> {
        self.delta.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // Discarded blocks read as zeroes (not as the base).
        self.delta.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.delta.write_zeroes(offset, len, unmap)
    }

    /// The last server to stop commits everything and leaves no working
    /// area behind (the table then says all it held).
    fn stop(&self) -> io::Result<()> {
        self.delta.stop()
    }
}
