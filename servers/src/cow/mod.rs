//! The cow backend: copy-on-write over a read-only base (docs/cow-format.md).
//!
//! Serving processes hold the delta's lock shared (the first one briefly
//! exclusive, while it sets up the shared working area); `merge` needs it
//! exclusively, so it refuses while any server has the delta open.

pub mod delta;
pub mod format;
pub mod storage;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use abuse_sys::uapi::*;
use nix::fcntl::{Flock, FlockArg};
use rayon::prelude::*;

use crate::backend::Backend;
use delta::{Delta, DeltaError};

/// Why a cow operation failed, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    #[error("{0}: {1}")]
    Delta(PathBuf, DeltaError),
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("{0}: in use by a running cow server (stop it first)")]
    Busy(PathBuf),
    #[error("{0}: already exists (remove it, or pick another name)")]
    Exists(PathBuf),
}

fn io_err(p: &Path) -> impl FnOnce(io::Error) -> CowError + '_ {
    move |e| CowError::Io(p.to_path_buf(), e)
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
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        storage::Storage::size(&self.0)
    }
}

impl storage::Shared for ReadOnly {}

/// What `Cow::inspect` found.
pub struct Inspection {
    pub header: format::Header,
    pub mapped: u64,
    pub base_path: PathBuf,
    pub in_use: bool,
}

/// An open cow device.
pub struct Cow {
    delta: Delta<Flock<File>, File>,
    pub base_path: PathBuf,
}

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
}

impl storage::Shared for Flock<File> {
    fn map_shared(&self, offset: u64, len: u64) -> io::Result<Option<memmap2::MmapMut>> {
        storage::Shared::map_shared(&**self, offset, len)
    }
    fn lock_byte(&self, at: u64) -> io::Result<()> {
        storage::Shared::lock_byte(&**self, at)
    }
    fn unlock_byte(&self, at: u64) -> io::Result<()> {
        storage::Shared::unlock_byte(&**self, at)
    }
}

impl Cow {
    /// Creates an empty delta `delta` over `base` with `block_size` blocks.
    pub fn create(base: &Path, delta: &Path, block_size: u32) -> Result<Cow, CowError> {
        let base_file = File::open(base).map_err(io_err(base))?;
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
        match Delta::create(store, base_file, block_size, &abs.to_string_lossy()) {
            Ok(d) => Ok(Cow {
                delta: d,
                base_path: abs,
            }),
            Err(e) => {
                // Nothing half-made is left behind.
                let _ = std::fs::remove_file(delta);
                Err(CowError::Delta(delta.to_path_buf(), e))
            }
        }
    }

    /// Opens a delta to serve it; the base is the one its header names
    /// unless given. The first server fills the shared working area (it
    /// holds the delta's lock exclusively meanwhile); later ones join it.
    pub fn open(delta: &Path, base: Option<&Path>) -> Result<Cow, CowError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(delta)
            .map_err(io_err(delta))?;
        let (store, first) = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => (l, true),
            // Another server has it: wait for its set-up, then share it.
            Err((file, _)) => (
                Flock::lock(file, FlockArg::LockShared)
                    .map_err(|(_, e)| CowError::Io(delta.to_path_buf(), e.into()))?,
                false,
            ),
        };
        let cow = Self::open_locked(store, delta, base, first)?;
        if first {
            cow.delta_store()
                .relock(FlockArg::LockShared)
                .map_err(|e| CowError::Io(delta.to_path_buf(), e.into()))?;
        }
        Ok(cow)
    }

    /// Opens a delta no server has open, to merge it.
    pub fn open_exclusive(delta: &Path, base: Option<&Path>) -> Result<Cow, CowError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(delta)
            .map_err(io_err(delta))?;
        let store = lock(file, delta)?;
        let (base_path, base_file) = Self::open_base(&store, delta, base)?;
        let d = Delta::open_for_merge(store, base_file)
            .map_err(|e| CowError::Delta(delta.to_path_buf(), e))?;
        Ok(Cow {
            delta: d,
            base_path,
        })
    }

    fn open_locked(
        store: Flock<File>,
        delta: &Path,
        base: Option<&Path>,
        first: bool,
    ) -> Result<Cow, CowError> {
        let (base_path, base_file) = Self::open_base(&store, delta, base)?;
        let d = if first {
            Delta::open(store, base_file)
        } else {
            Delta::join(store, base_file)
        };
        let d = d.map_err(|e| CowError::Delta(delta.to_path_buf(), e))?;
        Ok(Cow {
            delta: d,
            base_path,
        })
    }

    fn delta_store(&self) -> &Flock<File> {
        self.delta.store()
    }

    /// The base: `base` if given, else the one the delta's header names;
    /// returns its path and the file, opened read-only.
    fn open_base(
        store: &impl storage::Storage,
        delta: &Path,
        base: Option<&Path>,
    ) -> Result<(PathBuf, File), CowError> {
        let path = match base {
            Some(b) => b.to_path_buf(),
            None => PathBuf::from(
                Self::peek_base(store).map_err(|e| CowError::Delta(delta.to_path_buf(), e))?,
            ),
        };
        let file = File::open(&path).map_err(io_err(&path))?;
        Ok((path, file))
    }

    fn peek_base(store: &impl storage::Storage) -> Result<String, DeltaError> {
        let mut hb = [0u8; format::PAGE];
        store.read_at(&mut hb, 0)?;
        Ok(format::Header::decode(&hb)?.base_path)
    }

    /// Reads a delta without changing it, also while a server has it open:
    /// its header, the blocks its durable table maps, its base, and whether
    /// a server holds it (dirty: the table on disk may trail the server's).
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
        let (base_path, base_file) = Self::open_base(&file, delta, base)?;
        let d = Delta::open(ReadOnly(file), base_file)
            .map_err(|e| CowError::Delta(delta.to_path_buf(), e))?;
        Ok(Inspection {
            header: d.header().clone(),
            mapped: d.mapped_blocks(),
            base_path,
            in_use,
        })
    }

    pub fn header(&self) -> &format::Header {
        self.delta.header()
    }

    pub fn mapped_blocks(&self) -> u64 {
        self.delta.mapped_blocks()
    }

    /// Writes every mapped block into the base, then empties the delta
    /// (which then describes the new base).
    ///
    /// The delta is first marked as being merged: if the merge is cut short
    /// (the base then half written), the delta refuses to be served and
    /// `merge` runs again from the start, which finishes it.
    pub fn merge(mut self, delta_path: &Path) -> Result<u64, CowError> {
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
                Ok(1)
            })
            .sum::<io::Result<u64>>()
            .map_err(io_err(&self.base_path))?;
        base.sync_all().map_err(io_err(&self.base_path))?;
        drop(base);
        // Start the delta over: a fresh one describing the merged base.
        let base_path = self.base_path.clone();
        drop(self);
        let tmp = delta_path.with_extension("merging");
        let _ = std::fs::remove_file(&tmp);
        Cow::create(&base_path, &tmp, h.block_size)?;
        std::fs::rename(&tmp, delta_path).map_err(io_err(delta_path))?;
        Ok(merged)
    }
}

impl Backend for Cow {
    fn size(&self) -> u64 {
        self.delta.header().virtual_size
    }

    fn features(&self) -> u32 {
        ABUSE_FLAG_FLUSH | ABUSE_FLAG_FUA
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.delta.read(offset, buf)
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.delta.write(offset, buf, fua)
    }

    fn flush(&self) -> io::Result<()> {
        self.delta.flush()
    }

    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(crate::backend::unsupported())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
        Err(crate::backend::unsupported())
    }
}
