//! The server engine: worker threads that each poll the control node, fetch
//! a batch, run it on the backend and complete it. Stateless like the
//! protocol: workers share nothing but the backend and the counters, and
//! other engines (in other processes) may serve the same device.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use abuse_sys::uapi::*;
use abuse_sys::{AbuseBio, Control};
use memmap2::MmapMut;
use nix::errno::Errno;

use crate::backend::Backend;

/// How an engine runs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub ctl: PathBuf,
    pub threads: usize,
    /// Requests per GET_BIO/PUT_BIO.
    pub batch: usize,
}

/// This engine's own counters (each process has its own).
#[derive(Default, Debug)]
pub struct Stats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub fua: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    pub requeued: AtomicU64,
    pub stale: AtomicU64,
    pub batches: AtomicU64,
}

impl Stats {
    /// Requests completed by this engine.
    pub fn requests(&self) -> u64 {
        [
            &self.reads,
            &self.writes,
            &self.flushes,
            &self.discards,
            &self.write_zeroes,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// Why an engine stopped.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Device(#[from] abuse_sys::Error),
    #[error("{0}: cannot allocate the transfer buffer: {1}")]
    Buffer(PathBuf, std::io::Error),
    #[error("a worker thread panicked")]
    Panicked,
}

/// How long a worker sleeps in poll() before checking for shutdown.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Serves `cfg.ctl` with `backend` until `stop` is set; every request a
/// worker fetched is completed before it returns.
pub fn serve(
    cfg: &EngineConfig,
    backend: Arc<dyn Backend>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
) -> Result<(), EngineError> {
    let batch = cfg.batch.clamp(1, ABUSE_MAX_BATCH as usize);
    let workers: Vec<_> = (0..cfg.threads.max(1))
        .map(|_| {
            // Each worker has its own file: if this process dies, the kernel
            // hands what it fetched to the next server.
            let ctl = Control::open(&cfg.ctl);
            let (backend, stop, stats, path) = (
                backend.clone(),
                stop.clone(),
                stats.clone(),
                cfg.ctl.clone(),
            );
            std::thread::spawn(move || worker(ctl?, &path, batch, &*backend, &stop, &stats))
        })
        .collect();
    let mut result = Ok(());
    for w in workers {
        let r = w.join().unwrap_or(Err(EngineError::Panicked));
        if result.is_ok() {
            result = r;
        }
        // One worker failing stops the rest.
        stop.store(true, Ordering::Relaxed);
    }
    result
}

fn worker(
    ctl: Control,
    path: &Path,
    batch: usize,
    backend: &dyn Backend,
    stop: &AtomicBool,
    stats: &Stats,
) -> Result<(), EngineError> {
    let mut bios = vec![AbuseBio::default(); batch];
    // Page-aligned (an anonymous mapping), so the file backend may use
    // O_DIRECT on the payloads the kernel places in it.
    let mut buf = MmapMut::map_anon(batch * (ABUSE_MAX_BIO_BYTES + ABUSE_DATA_ALIGN) as usize)
        .map_err(|e| EngineError::Buffer(path.to_path_buf(), e))?;
    while !stop.load(Ordering::Relaxed) {
        let n = ctl.get_bios(&mut bios, &mut buf)?;
        if n == 0 {
            ctl.poll(Some(POLL_INTERVAL))?;
            continue;
        }
        let base = buf.as_ptr() as u64;
        for bio in &mut bios[..n] {
            bio.result = execute(backend, bio, &mut buf, base, stats);
        }
        complete(&ctl, &bios[..n], stats)?;
        stats.batches.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// PUT_BIO for a batch. An entry that is stale (its request timed out and
/// went to another server, or the device was reset) is skipped.
fn complete(ctl: &Control, mut bios: &[AbuseBio], stats: &Stats) -> Result<(), abuse_sys::Error> {
    while !bios.is_empty() {
        match ctl.put_bios(bios) {
            Ok(_) => return Ok(()),
            Err(e @ abuse_sys::Error::Ioctl { done, .. }) if e.errno() == Errno::ESTALE => {
                stats.stale.fetch_add(1, Ordering::Relaxed);
                bios = &bios[done + 1..];
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs one request on the backend; returns its PUT result.
fn execute(backend: &dyn Backend, bio: &AbuseBio, buf: &mut [u8], base: u64, stats: &Stats) -> u32 {
    let offset = bio.sector << ABUSE_SECTOR_SHIFT;
    let len = bio.len as u64;
    if bio.flags & ABUSE_BIO_REQUEUED != 0 {
        stats.requeued.fetch_add(1, Ordering::Relaxed);
    }
    // The kernel placed the payload at `addr`, inside `buf`.
    let start = bio.addr.wrapping_sub(base) as usize;
    let payload = start..start.saturating_add(bio.len as usize);
    let result = match bio.cmd {
        ABUSE_CMD_READ => match buf.get_mut(payload) {
            Some(data) => backend.read(offset, data).map(|()| {
                stats.reads.fetch_add(1, Ordering::Relaxed);
                stats.bytes_read.fetch_add(len, Ordering::Relaxed);
            }),
            None => Err(std::io::ErrorKind::InvalidData.into()),
        },
        ABUSE_CMD_WRITE if !backend.read_only() => match buf.get(payload) {
            Some(data) => {
                let fua = bio.flags & ABUSE_BIO_FUA != 0;
                backend.write(offset, data, fua).map(|()| {
                    stats.writes.fetch_add(1, Ordering::Relaxed);
                    stats.bytes_written.fetch_add(len, Ordering::Relaxed);
                    if fua {
                        stats.fua.fetch_add(1, Ordering::Relaxed);
                    }
                })
            }
            None => Err(std::io::ErrorKind::InvalidData.into()),
        },
        ABUSE_CMD_FLUSH => backend.flush().map(|()| {
            stats.flushes.fetch_add(1, Ordering::Relaxed);
        }),
        ABUSE_CMD_DISCARD if !backend.read_only() => backend.discard(offset, len).map(|()| {
            stats.discards.fetch_add(1, Ordering::Relaxed);
        }),
        ABUSE_CMD_WRITE_ZEROES if !backend.read_only() => {
            let unmap = bio.flags & ABUSE_BIO_NOUNMAP == 0;
            backend.write_zeroes(offset, len, unmap).map(|()| {
                stats.write_zeroes.fetch_add(1, Ordering::Relaxed);
            })
        }
        _ => Err(crate::backend::unsupported()),
    };
    match result {
        Ok(()) => ABUSE_RESULT_OKAY,
        Err(_) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            ABUSE_RESULT_MEDIA_FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::null::Null;

    fn bio(cmd: u16, sector: u64, len: u32, addr: u64, flags: u16) -> AbuseBio {
        AbuseBio {
            id: 1,
            sector,
            addr,
            len,
            cmd,
            flags,
            result: 0,
            reserved: 0,
        }
    }

    #[test]
    fn executes_each_command_on_the_backend() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let b = crate::file::FileBackend::open(f.path(), Default::default()).unwrap();
        let stats = Stats::default();
        let mut buf = vec![0u8; 16384];
        let base = buf.as_ptr() as u64;
        buf[4096..8192].fill(5);
        // WRITE the payload at buf[4096..], FUA.
        let w = bio(ABUSE_CMD_WRITE, 16, 4096, base + 4096, ABUSE_BIO_FUA);
        assert_eq!(execute(&b, &w, &mut buf, base, &stats), ABUSE_RESULT_OKAY);
        // READ it back into buf[8192..].
        let r = bio(ABUSE_CMD_READ, 16, 4096, base + 8192, 0);
        assert_eq!(execute(&b, &r, &mut buf, base, &stats), ABUSE_RESULT_OKAY);
        assert!(buf[8192..12288].iter().all(|&x| x == 5));
        assert_eq!(
            execute(
                &b,
                &bio(ABUSE_CMD_FLUSH, 0, 0, 0, 0),
                &mut buf,
                base,
                &stats
            ),
            ABUSE_RESULT_OKAY
        );
        assert_eq!(
            execute(
                &b,
                &bio(ABUSE_CMD_DISCARD, 16, 4096, 0, 0),
                &mut buf,
                base,
                &stats
            ),
            ABUSE_RESULT_OKAY
        );
        let r = bio(ABUSE_CMD_READ, 16, 4096, base + 8192, ABUSE_BIO_REQUEUED);
        assert_eq!(execute(&b, &r, &mut buf, base, &stats), ABUSE_RESULT_OKAY);
        assert!(
            buf[8192..12288].iter().all(|&x| x == 0),
            "discarded range not zero"
        );
        assert_eq!(stats.writes.load(Ordering::Relaxed), 1);
        assert_eq!(stats.fua.load(Ordering::Relaxed), 1);
        assert_eq!(stats.reads.load(Ordering::Relaxed), 2);
        assert_eq!(stats.flushes.load(Ordering::Relaxed), 1);
        assert_eq!(stats.discards.load(Ordering::Relaxed), 1);
        assert_eq!(stats.requeued.load(Ordering::Relaxed), 1);
        assert_eq!(stats.requests(), 5);
    }

    #[test]
    fn payload_outside_the_buffer_is_a_media_failure() {
        let stats = Stats::default();
        let mut buf = vec![0u8; 4096];
        let base = buf.as_ptr() as u64;
        let r = bio(ABUSE_CMD_READ, 0, 8192, base, 0);
        assert_eq!(
            execute(&Null::new(1 << 20), &r, &mut buf, base, &stats),
            ABUSE_RESULT_MEDIA_FAILURE
        );
        assert_eq!(stats.errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn unknown_command_fails() {
        let stats = Stats::default();
        let mut buf = vec![0u8; 4096];
        let base = buf.as_ptr() as u64;
        assert_eq!(
            execute(
                &Null::new(4096),
                &bio(99, 0, 0, 0, 0),
                &mut buf,
                base,
                &stats
            ),
            ABUSE_RESULT_MEDIA_FAILURE
        );
    }
}
