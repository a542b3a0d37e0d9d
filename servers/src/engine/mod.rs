//! The server engine: worker threads (one per hardware queue by default)
//! that each complete a batch and fetch the next in one call (ABUSE_SERVE,
//! sleeping in the kernel when nothing is pending) and run it on the
//! backend; a blocking backend's batch runs on a pool of I/O threads, so
//! a FLUSH or a slow read does not hold up the requests beside it. Where
//! the backend's storage is a file (the file server), the kernel moves
//! READ and WRITE data between the request and that file itself
//! (ABUSE_BIO_FILE), fetching descriptors only: one copy instead of two.
//! Stateless like the protocol: workers share nothing but the backend and
//! the counters, and other engines (in other processes) may serve the same
//! device.
//!
//! It serves one configuration: the one it checked at start (size and
//! features within the backend's). When the device is reset or
//! reconfigured under it (the configuration generation changes), it stops
//! with an error rather than serve a configuration it was not started for.
//! One failing worker stops all of them; a backend call that panics fails
//! its request (EIO) and the engine carries on.

mod affinity;
mod device;
mod execute;
mod server;
mod stats;
#[cfg(test)]
mod tests;

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abuse_sys::uapi::*;
use abuse_sys::{AbuseBio, AbuseStatus, Control};
use memmap2::MmapMut;
use nix::errno::Errno;

use crate::backend::{Backend, ALL_FEATURES};
pub use device::{serve_compat, ControlDevice};
pub use execute::errno_of;
use execute::{
    by_file, execute_payload, file_refused, place_by_file, split_payloads, FailureLog, Kernel,
};
pub use server::{default_status, device_status, Server, StopSignals, DEFAULT_BLOCK_SIZE};
pub use stats::{Counters, Stats, Totals};

/// How an engine runs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The control device (/dev/abctlN).
    pub ctl: PathBuf,
    /// Worker threads; 0: one per hardware queue of the device (one where
    /// the kernel moves the data to and from the backend's file).
    pub threads: usize,
    /// Requests per fetch and completion.
    pub batch: usize,
    /// Threads running a batch's requests at once; None: the backend's
    /// choice ([`Backend::io_threads`]), 0: in the worker, one by one.
    pub io_threads: Option<usize>,
    /// Run worker i on the CPUs of hardware queue i (when there is one
    /// worker per queue).
    pub pin: bool,
    /// Run a worker under SCHED_BATCH while it fetches several requests at
    /// a time, so that a new request does not preempt its submitter to be
    /// fetched alone (the normal policy while they come one at a time).
    pub sched_batch: bool,
    /// Move READ and WRITE data through the server's buffers even where
    /// the kernel could move it to and from the backend's file itself.
    pub copy_data: bool,
}

/// Why an engine stopped, or would not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A call on the control device failed.
    #[error(transparent)]
    Device(#[from] abuse_sys::Error),
    /// The transfer buffer could not be allocated.
    #[error("{0}: cannot allocate the transfer buffer: {1}")]
    Buffer(PathBuf, std::io::Error),
    /// The device has not been set up.
    #[error("{0}: the device is not configured (abusectl setup, or server --setup)")]
    NotConfigured(PathBuf),
    /// The device and the backend do not fit together (why).
    #[error("{0}: {1}")]
    Unsuitable(PathBuf, String),
    /// The device was reconfigured under the server.
    #[error("{path}: the device was {what} under this server (configuration generation {from} -> {to}): stopping rather than serve a configuration it was not started for")]
    Reconfigured {
        /// The control device.
        path: PathBuf,
        /// What happened to the device.
        what: &'static str,
        /// The configuration generation the server started with.
        from: u64,
        /// The generation found.
        to: u64,
    },
    /// A worker thread panicked.
    #[error("a worker thread panicked")]
    Panicked,
    /// The I/O threads could not be started.
    #[error("cannot start the I/O threads: {0}")]
    Pool(String),
    /// SIGINT and SIGTERM could not be blocked.
    #[error("blocking SIGINT and SIGTERM: {0}")]
    Signals(std::io::Error),
    /// [`Backend::stop`] failed.
    #[error("stopping the backend: {0}")]
    Stop(std::io::Error),
}

/// How long a worker sleeps in the kernel before checking for shutdown and
/// for a change of configuration.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Longest backoff between retries of an ioctl failing with ENOMEM/EAGAIN.
const MAX_BACKOFF: Duration = Duration::from_millis(100);

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
    let lacking = st.flags & ALL_FEATURES & !backend.features();
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
    let io_threads = cfg.io_threads.unwrap_or_else(|| backend.io_threads());
    let pool = (io_threads > 0)
        .then(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(io_threads)
                .thread_name(|i| format!("abuse-io-{i}"))
                .build()
        })
        .transpose()
        .map_err(|e| EngineError::Pool(e.to_string()))?;
    // Whether the kernel may move data to and from the backend's files.
    let moves = !cfg.copy_data && st.version >= 5;
    let data_file = backend
        .data_file()
        .filter(|fd| moves && !is_abuse_device(*fd, st.dev))
        .map(|fd| fd.as_raw_fd());
    // The files READs may be moved from (the data file takes them all).
    let moved_files = backend
        .moved_files()
        .into_iter()
        .filter(|fd| moves && data_file.is_none() && kernel_moves_with(*fd, st.dev))
        .map(|fd| fd.as_raw_fd())
        .collect();
    let threads = match cfg.threads {
        // Moves into one file serialize on its inode lock: one worker, as
        // loop has (several measured slower on writes, no faster on reads).
        0 if data_file.is_some() => 1,
        0 => (st.queues as usize).max(1),
        n => n,
    };
    let descriptors = st.version >= 5 && (data_file.is_some() || !backend.needs_payloads());
    let shared = Arc::new(Shared {
        data_file,
        moved_files,
        descriptors,
        backend,
        stop,
        stats,
        generation: st.generation,
        kernel: Kernel::of(st.version),
        combined: st.version >= 3,
        sched_batch: cfg.sched_batch,
        pool,
        failure: Mutex::new(None),
        log: FailureLog::new(),
    });
    let mut ctls = vec![first];
    for _ in 1..threads {
        ctls.push(open()?);
    }
    // One worker per queue: each runs where its queue's requests come from.
    let pin = cfg.pin && threads == st.queues as usize;
    let index = st.index;
    let workers: Vec<_> = ctls
        .into_iter()
        .enumerate()
        .map(|(i, ctl)| {
            let shared = shared.clone();
            std::thread::spawn(move || {
                if pin {
                    affinity::pin_to_queue(index, i as u32);
                }
                if let Err(e) = worker(&ctl, i as u32, batch, &shared) {
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

/// Whether `fd` is a block device of the same major as the device `dev`
/// (an ABUSE device: the kernel does not move data to those).
fn is_abuse_device(fd: BorrowedFd<'_>, dev: u64) -> bool {
    use nix::sys::stat::{fstat, major, SFlag};
    fstat(fd.as_raw_fd()).is_ok_and(|st| {
        SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFBLK
            && major(st.st_rdev) == major(dev)
    })
}

/// Whether the kernel moves data to and from `fd` (`Backend::moved_files`):
/// a regular file, or a block device other than an ABUSE device.
fn kernel_moves_with(fd: BorrowedFd<'_>, dev: u64) -> bool {
    use nix::sys::stat::{fstat, SFlag};
    fstat(fd.as_raw_fd()).is_ok_and(|st| {
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        kind == SFlag::S_IFREG || kind == SFlag::S_IFBLK
    }) && !is_abuse_device(fd, dev)
}

/// What the workers of one engine share.
struct Shared {
    /// The backend's file, which the kernel moves READ and WRITE data to
    /// and from itself (fetches are then descriptors only). Open as long
    /// as `backend`.
    data_file: Option<RawFd>,
    /// The backend's `moved_files` the kernel may move data to and from
    /// (protocol 5, not `--copy-data`, no data file): READs and WRITEs
    /// `Backend::read_from_file` and `write_to_file` place in one of them
    /// go that way.
    moved_files: Vec<RawFd>,
    /// Fetch descriptors only (ABUSE_XFER_DESCRIPTORS): the kernel moves
    /// the data to and from `data_file`, or the backend needs none.
    descriptors: bool,
    backend: Arc<dyn Backend>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    /// The configuration this engine serves.
    generation: u64,
    /// What PUT_BIO may say (errnos, zeroes).
    kernel: Kernel,
    /// The kernel has ABUSE_SERVE (protocol version 3).
    combined: bool,
    /// Workers switch to SCHED_BATCH while fetching several at a time.
    sched_batch: bool,
    /// Runs a batch's requests at once (None: one by one in the worker).
    pool: Option<rayon::ThreadPool>,
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

fn worker<C: ControlDevice>(
    ctl: &C,
    queue: u32,
    batch: usize,
    shared: &Shared,
) -> Result<(), EngineError> {
    let mut bios = vec![AbuseBio::default(); batch];
    // Page-aligned (an anonymous mapping), so the file backend may use
    // O_DIRECT on the payloads the kernel places in it.
    let mut buf = MmapMut::map_anon(batch * (ABUSE_MAX_BIO_BYTES + ABUSE_DATA_ALIGN) as usize)
        .map_err(|e| EngineError::Buffer(ctl.path().to_path_buf(), e))?;
    let stop = &*shared.stop;
    let mut last_check = Instant::now();
    // Entries of `bios` run and waiting to be completed by the next call.
    let mut held = 0;
    let mut delay = Duration::from_millis(1);
    let mut policy = affinity::Policy::new(shared.sched_batch);
    while !stop.load(Ordering::Relaxed) {
        let data = (!shared.descriptors).then_some(&mut buf[..]);
        let served = if shared.combined {
            ctl.serve(&mut bios, held, data, queue, POLL_INTERVAL)
        } else {
            serve_compat(ctl, &mut bios, held, data, POLL_INTERVAL)
        };
        let n = match served {
            Ok(n) => n,
            Err(e) => {
                // What completed is done; a stale entry (the device was
                // reset, or failed with DEVICE_FAILURE) is skipped; a
                // transient failure is retried after a backoff.
                let done = match &e {
                    abuse_sys::Error::Ioctl { done, .. } => (*done).min(held),
                    _ => 0,
                };
                let skip = match e.errno() {
                    Errno::ESTALE if done < held => {
                        shared.stats.mine().stale.fetch_add(1, Ordering::Relaxed);
                        done + 1
                    }
                    errno @ (Errno::EBADF | Errno::EINVAL)
                        if done < held && bios[done].flags & ABUSE_BIO_FILE != 0 =>
                    {
                        refused(ctl.path(), &mut bios[done], errno, shared);
                        done
                    }
                    // EBUSY: another process is moving this request's
                    // data (ABUSE_BIO_FILE); once it finishes the PUT is
                    // stale, once it gives up the request is ours again.
                    Errno::EINTR | Errno::ENOMEM | Errno::EAGAIN | Errno::EBUSY => {
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(MAX_BACKOFF);
                        done
                    }
                    _ => return Err(e.into()),
                };
                bios.copy_within(skip..held, 0);
                held -= skip;
                continue;
            }
        };
        held = 0;
        delay = Duration::from_millis(1);
        if n == 0 {
            // Idle: is the device still the one this engine was started for?
            if last_check.elapsed() >= POLL_INTERVAL {
                check_generation(ctl, shared.generation)?;
                last_check = Instant::now();
            }
            continue;
        }
        policy.fetched(n);
        run_batch(ctl.path(), &mut bios[..n], &mut buf, shared);
        held = n;
        shared.stats.mine().batches.fetch_add(1, Ordering::Relaxed);
    }
    complete(ctl, &mut bios[..held], shared)?;
    Ok(())
}

/// Runs a fetched batch on the backend, on the I/O threads if there is a
/// pool and two or more of its requests may block, and fills in each
/// request's result. A READ or WRITE the kernel moves to or from the
/// backend's file only gets its PUT entry: the move happens in the next
/// call, in this worker (one pass over the batch in the kernel beats
/// handing single PUTs to other threads; more workers, `--threads`, keep
/// more such moves in flight).
fn run_batch(path: &std::path::Path, bios: &mut [AbuseBio], buf: &mut [u8], shared: &Shared) {
    let base = buf.as_ptr() as u64;
    let (backend, stats) = (&*shared.backend, &*shared.stats);
    let run = |(bio, payload): (&mut AbuseBio, Option<&mut [u8]>)| {
        if let Some(failure) = execute_payload(backend, bio, payload, stats, shared.kernel) {
            shared.log.failed(path, bio, &failure);
        }
    };
    let mut jobs = split_payloads(bios, buf, base);
    if let Some(fd) = shared.data_file {
        jobs.retain_mut(|(bio, _)| !by_file(backend, bio, fd, stats));
    } else {
        if !shared.moved_files.is_empty() {
            jobs.retain_mut(|(bio, _)| !place_by_file(backend, bio, &shared.moved_files, stats));
        }
        if shared.descriptors {
            // A backend that needs no payloads gets empty ones.
            for (bio, payload) in jobs.iter_mut() {
                if matches!(bio.cmd, ABUSE_CMD_READ | ABUSE_CMD_WRITE) {
                    payload.get_or_insert(&mut []);
                }
            }
        }
    }
    // The hand-off to the I/O threads pays only where two calls that may
    // wait on storage can overlap.
    let may_block = |bio: &AbuseBio| {
        let (offset, fua) = (
            bio.sector << ABUSE_SECTOR_SHIFT,
            bio.flags & ABUSE_BIO_FUA != 0,
        );
        backend.may_block(bio.cmd, offset, bio.len as u64, fua)
    };
    match &shared.pool {
        Some(pool) if jobs.iter().filter(|(bio, _)| may_block(bio)).count() > 1 => {
            use rayon::iter::{IntoParallelIterator, ParallelIterator};
            pool.install(|| jobs.into_par_iter().for_each(run));
        }
        _ => jobs.into_iter().for_each(run),
    }
}

/// The kernel refused a PUT entry moving data to or from the file: it
/// becomes an I/O error, logged.
fn refused(path: &std::path::Path, bio: &mut AbuseBio, errno: Errno, shared: &Shared) {
    let failure = file_refused(bio, errno, &shared.stats, shared.kernel);
    shared.log.failed(path, bio, &failure);
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
/// the request failed with DEVICE_FAILURE) is skipped; one whose move to or
/// from the file is refused becomes an I/O error.
fn complete<C: ControlDevice>(
    ctl: &C,
    mut bios: &mut [AbuseBio],
    shared: &Shared,
) -> Result<(), abuse_sys::Error> {
    while !bios.is_empty() {
        // Not cut short by a stop: what was fetched is completed.
        match retry(&AtomicBool::new(false), || ctl.put_bios(bios)) {
            Ok(_) => return Ok(()),
            Err(e @ abuse_sys::Error::Ioctl { done, .. }) if e.errno() == Errno::ESTALE => {
                shared.stats.mine().stale.fetch_add(1, Ordering::Relaxed);
                bios = &mut bios[done + 1..];
            }
            Err(e @ abuse_sys::Error::Ioctl { done, .. })
                if matches!(e.errno(), Errno::EBADF | Errno::EINVAL)
                    && bios
                        .get(done)
                        .is_some_and(|b| b.flags & ABUSE_BIO_FILE != 0) =>
            {
                refused(ctl.path(), &mut bios[done], e.errno(), shared);
                bios = &mut bios[done..];
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
