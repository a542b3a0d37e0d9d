//! A qcow2 image's backing chain: raw files and qcow2 images, read-only,
//! and the reading of compressed clusters.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{header, Qcow2, Qcow2Error};
use crate::backend::Backend;

/// Chains longer than this are refused (a loop, or a mistake).
const MAX_DEPTH: u32 = 16;

/// A backing image, read-only.
pub enum Backing {
    Raw { file: File, size: u64 },
    Qcow2(Box<Qcow2>),
}

impl Backing {
    /// Opens the backing file `name` of the image at `image` (a relative
    /// name is relative to the image's directory, as qemu takes it). It
    /// must lie in `within` (symbolic links resolved), the top image's
    /// directory, unless `within` is None: an image is untrusted input, and
    /// served by root it must not read any file of the host it names.
    pub fn open(
        image: &Path,
        name: &str,
        format: Option<&str>,
        depth: u32,
        within: Option<&Path>,
    ) -> Result<Backing, Qcow2Error> {
        if depth > MAX_DEPTH {
            return Err(Qcow2Error::Unsupported(format!(
                "a backing chain deeper than {MAX_DEPTH}"
            )));
        }
        let path = match Path::new(name) {
            p if p.is_absolute() => p.to_path_buf(),
            p => image.parent().unwrap_or(Path::new(".")).join(p),
        };
        let named = |e: io::Error| {
            Qcow2Error::Io(io::Error::new(
                e.kind(),
                format!("backing file {}: {e}", path.display()),
            ))
        };
        let file = File::open(&path).map_err(named)?;
        if let Some(dir) = within {
            let real = path.canonicalize().map_err(named)?;
            if !real.starts_with(dir) {
                return Err(Qcow2Error::Unsupported(format!(
                    "a backing file outside the image's directory {} ({} is {}): pass --backing-anywhere if you trust the image",
                    dir.display(),
                    path.display(),
                    real.display()
                )));
            }
        }
        let is_qcow2 = match format {
            Some("qcow2") => true,
            Some("raw") => false,
            Some(other) => {
                return Err(Qcow2Error::Unsupported(format!(
                    "a backing file in format {other}"
                )))
            }
            None => {
                let mut magic = [0u8; 4];
                file.read_exact_at(&mut magic, 0).is_ok()
                    && u32::from_be_bytes(magic) == header::MAGIC
            }
        };
        if is_qcow2 {
            drop(file);
            Ok(Backing::Qcow2(Box::new(Qcow2::open_chain(
                &path,
                true,
                depth + 1,
                within,
                &|f| Box::new(f),
            )?)))
        } else {
            // QEMU's reader lock, as on a qcow2 backing image: nobody
            // writes it while it is read (a VM, or this very image, named
            // as its own backing file).
            super::qemu_lock::lock(&file, false).map_err(named)?;
            let size = crate::blkdev::size(&file).map_err(named)?;
            Ok(Backing::Raw { file, size })
        }
    }

    /// Reads at `offset`; what lies past the backing image's end is zeroes.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.read_or_hole(offset, buf)? {
            buf.fill(0);
        }
        Ok(())
    }

    /// As [`Backend::read_or_hole`]: holes are what lies past the end and a
    /// qcow2 backing image's own holes (a raw file's are not looked for).
    pub fn read_or_hole(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        let size = match self {
            Backing::Raw { size, .. } => *size,
            Backing::Qcow2(q) => q.size(),
        };
        let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let hole = match self {
            _ if n == 0 => true,
            Backing::Raw { file, .. } => {
                crate::backend::read_or_zeroes(file, &mut buf[..n], offset)?;
                false
            }
            Backing::Qcow2(q) => q.read_or_hole(offset, &mut buf[..n])?,
        };
        if hole && n == buf.len() {
            return Ok(true);
        }
        if hole {
            buf[..n].fill(0);
        }
        buf[n..].fill(0);
        Ok(false)
    }
}

/// A compressed cluster (raw deflate, as qemu writes it) at `off`, `len`
/// bytes at most, decompressed to a whole cluster of `cs` bytes.
pub fn inflate(
    file: &dyn super::image::ImageIo,
    off: u64,
    len: u64,
    cs: u64,
) -> io::Result<Vec<u8>> {
    let mut packed = vec![0u8; len as usize];
    let n = file.pread_full(&mut packed, off)?;
    let mut out = vec![0u8; cs as usize];
    let mut d = flate2::Decompress::new(false);
    d.decompress(&packed[..n], &mut out, flate2::FlushDecompress::Finish)
        .map_err(|e| super::damaged(format!("a compressed cluster at {off:#x}: {e}")))?;
    if d.total_out() != cs {
        return Err(super::damaged(format!(
            "a compressed cluster at {off:#x} holds {} bytes, not a cluster",
            d.total_out()
        )));
    }
    Ok(out)
}
