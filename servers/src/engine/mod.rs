//! The server engine: worker threads that each poll the control node, fetch
//! a batch, run it on the backend and complete it. Stateless like the
//! protocol: workers share nothing but the backend and the counters, and
//! other engines (in other processes) may serve the same device.
//!
//! It serves one configuration: the one it checked at start (size and
//! features within the backend's). When the device is reset or
//! reconfigured under it (the configuration generation changes), it stops
//! with an error rather than serve a configuration it was not started for.
//! One failing worker stops all of them; a backend call that panics fails
//! its request (EIO) and the engine carries on.

mod device;
mod execute;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abuse_sys::uapi::*;
use abuse_sys::{AbuseBio, AbuseStatus, Control};
use memmap2::MmapMut;
use nix::errno::Errno;

use crate::backend::Backend;
pub use device::ControlDevice;
pub use execute::errno_of;
use execute::{execute, FailureLog};

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
    /// Backend calls retried after a transient error.
    pub retries: AtomicU64,
    /// Backend calls that panicked (each failed its request).
    pub panics: AtomicU64,
}

impl Stats {
    /// Requests completed successfully by this engine.
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

/// Why an engine stopped, or would not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Device(#[from] abuse_sys::Error),
    #[error("{0}: cannot allocate the transfer buffer: {1}")]
    Buffer(PathBuf, std::io::Error),
    #[error("{0}: the device is not configured (abusectl setup, or server --setup)")]
    NotConfigured(PathBuf),
    #[error("{0}: {1}")]
    Unsuitable(PathBuf, String),
    #[error("{path}: the device was {what} under this server (configuration generation {from} -> {to}): stopping rather than serve a configuration it was not started for")]
    Reconfigured {
        path: PathBuf,
        what: &'static str,
        from: u64,
        to: u64,
    },
    #[error("a worker thread panicked")]
    Panicked,
}

/// How long a worker sleeps in poll() before checking for shutdown and for
/// a change of configuration.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Longest backoff between retries of an ioctl failing with ENOMEM/EAGAIN.
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// The features a configured device advertises.
const FEATURES: u32 =
    ABUSE_FLAG_FLUSH | ABUSE_FLAG_FUA | ABUSE_FLAG_DISCARD | ABUSE_FLAG_WRITE_ZEROES;

/// Whether `backend` can serve the device `st` describes: it must be
/// configured, no larger than the backend, advertise no feature the backend
/// lacks, not be writable over a read-only backend, and use a block size
/// the backend can do I/O in.
pub fn check_device(
    path: &std::path::Path,
    st: &AbuseStatus,
    backend: &dyn Backend,
) -> Result<(), EngineError> {
    let bad = |why: String| Err(EngineError::Unsuitable(path.to_path_buf(), why));
    if st.flags & ABUSE_FLAG_CONFIGURED == 0 {
        return Err(EngineError::NotConfigured(path.to_path_buf()));
    }
    if st.size > backend.size() {
        return bad(format!(
            "the device ({} bytes) is larger than the backend ({} bytes): reset it and set it up with size={} or less",
            st.size,
            backend.size(),
            backend.size()
        ));
    }
    let lacking = st.flags & FEATURES & !backend.features();
    if lacking != 0 {
        let names: Vec<&str> = [
            (ABUSE_FLAG_FLUSH, "flush"),
            (ABUSE_FLAG_FUA, "fua"),
            (ABUSE_FLAG_DISCARD, "discard"),
            (ABUSE_FLAG_WRITE_ZEROES, "write_zeroes"),
        ]
        .iter()
        .filter(|(f, _)| lacking & f != 0)
        .map(|(_, n)| *n)
        .collect();
        return bad(format!(
            "the device advertises {}, which this backend does not handle: reset it and set it up without",
            names.join(", ")
        ));
    }
    if backend.read_only() && st.flags & ABUSE_FLAG_READ_ONLY == 0 {
        return bad(
            "the backend is read-only but the device is writable: set it up with ro".into(),
        );
    }
    backend
        .check_block_size(st.block_size)
        .map_err(|e| EngineError::Unsuitable(path.to_path_buf(), e.to_string()))
}

/// Serves `cfg.ctl` with `backend` until `stop` is set; every request a
/// worker fetched is completed before it returns.
pub fn serve(
    cfg: &EngineConfig,
    backend: Arc<dyn Backend>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
) -> Result<(), EngineError> {
    let path = cfg.ctl.clone();
    serve_with(move || Control::open(&path), cfg, backend, stop, stats)
}

/// [`serve`] on control devices `open` returns (one per worker: if this
/// process dies, the kernel hands what each fetched to the next server).
pub fn serve_with<C: ControlDevice>(
    open: impl Fn() -> abuse_sys::Result<C>,
    cfg: &EngineConfig,
    backend: Arc<dyn Backend>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
) -> Result<(), EngineError> {
    let first = open()?;
    let st = first.status()?;
    check_device(first.path(), &st, &*backend)?;
    let batch = cfg.batch.clamp(1, ABUSE_MAX_BATCH as usize);
    let shared = Arc::new(Shared {
        backend,
        stop,
        stats,
        generation: st.generation,
        with_errno: st.version >= 2,
        failure: Mutex::new(None),
        log: FailureLog::new(),
    });
    let mut ctls = vec![first];
    for _ in 1..cfg.threads.max(1) {
        ctls.push(open()?);
    }
    let workers: Vec<_> = ctls
        .into_iter()
        .map(|ctl| {
            let shared = shared.clone();
            std::thread::spawn(move || {
                if let Err(e) = worker(&ctl, batch, &shared) {
                    shared.fail(e);
                }
            })
        })
        .collect();
    for w in workers {
        if w.join().is_err() {
            shared.fail(EngineError::Panicked);
        }
    }
    let failure = shared
        .failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    failure.map_or(Ok(()), Err)
}

/// What the workers of one engine share.
struct Shared {
    backend: Arc<dyn Backend>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    /// The configuration this engine serves.
    generation: u64,
    /// The kernel takes errnos on PUT_BIO (protocol version 2).
    with_errno: bool,
    /// The first worker failure: it stops the others and is reported.
    failure: Mutex<Option<EngineError>>,
    log: FailureLog,
}

impl Shared {
    fn fail(&self, e: EngineError) {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Retries an ioctl that failed with EINTR, ENOMEM or EAGAIN (transient),
/// with a growing backoff, until it succeeds, fails otherwise, or `stop`.
fn retry<T>(
    stop: &AtomicBool,
    mut op: impl FnMut() -> abuse_sys::Result<T>,
) -> abuse_sys::Result<T> {
    let mut delay = Duration::from_millis(1);
    loop {
        match op() {
            Err(e)
                if matches!(e.errno(), Errno::EINTR | Errno::ENOMEM | Errno::EAGAIN)
                    && !stop.load(Ordering::Relaxed) =>
            {
                if e.errno() != Errno::EINTR {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
            r => return r,
        }
    }
}

fn worker<C: ControlDevice>(ctl: &C, batch: usize, shared: &Shared) -> Result<(), EngineError> {
    let mut bios = vec![AbuseBio::default(); batch];
    // Page-aligned (an anonymous mapping), so the file backend may use
    // O_DIRECT on the payloads the kernel places in it.
    let mut buf = MmapMut::map_anon(batch * (ABUSE_MAX_BIO_BYTES + ABUSE_DATA_ALIGN) as usize)
        .map_err(|e| EngineError::Buffer(ctl.path().to_path_buf(), e))?;
    let stop = &*shared.stop;
    let mut last_check = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let n = retry(stop, || ctl.get_bios(&mut bios, &mut buf))?;
        if n == 0 {
            // Idle: is the device still the one this engine was started for?
            if last_check.elapsed() >= POLL_INTERVAL {
                check_generation(ctl, shared.generation)?;
                last_check = Instant::now();
            }
            retry(stop, || ctl.wait(POLL_INTERVAL))?;
            continue;
        }
        let base = buf.as_ptr() as u64;
        for bio in &mut bios[..n] {
            let stats = &shared.stats;
            if let Some(failure) = execute(
                &*shared.backend,
                bio,
                &mut buf,
                base,
                stats,
                shared.with_errno,
            ) {
                shared.log.failed(ctl.path(), bio, &failure);
            }
        }
        complete(ctl, &bios[..n], shared)?;
        shared.stats.batches.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Fails if the device was reset or reconfigured since the engine started.
fn check_generation<C: ControlDevice>(ctl: &C, generation: u64) -> Result<(), EngineError> {
    let st = ctl.status()?;
    if st.generation == generation {
        return Ok(());
    }
    let what = if st.flags & ABUSE_FLAG_CONFIGURED == 0 {
        "reset"
    } else {
        "reconfigured"
    };
    Err(EngineError::Reconfigured {
        path: ctl.path().to_path_buf(),
        what,
        from: generation,
        to: st.generation,
    })
}

/// PUT_BIO for a batch. An entry that is stale (the device was reset, or
/// the request failed with DEVICE_FAILURE) is skipped.
fn complete<C: ControlDevice>(
    ctl: &C,
    mut bios: &[AbuseBio],
    shared: &Shared,
) -> Result<(), abuse_sys::Error> {
    while !bios.is_empty() {
        // Not cut short by a stop: what was fetched is completed.
        match retry(&AtomicBool::new(false), || ctl.put_bios(bios)) {
            Ok(_) => return Ok(()),
            Err(e @ abuse_sys::Error::Ioctl { done, .. }) if e.errno() == Errno::ESTALE => {
                shared.stats.stale.fetch_add(1, Ordering::Relaxed);
                bios = &bios[done + 1..];
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
