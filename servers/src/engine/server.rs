//! Serving a backend from a program of one's own: [`Server`] sets the
//! device up for the backend (unless it already is), runs the engine until
//! SIGINT or SIGTERM, and stops the backend cleanly. `abusectl server` is
//! built on it.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use abuse_sys::uapi::*;
use abuse_sys::Control;
use nix::sys::signal::{SigSet, Signal};

use super::{serve, EngineConfig, EngineError, Stats};
use crate::backend::Backend;

/// Block size a device is set up with when none is given.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

impl EngineConfig {
    /// `abusectl server`'s defaults for the control node `ctl`: one worker
    /// per hardware queue, pinned, 32 requests per fetch, the backend's
    /// I/O threads, SCHED_BATCH, the kernel moving data to and from the
    /// backend's file where it has one.
    pub fn new(ctl: impl Into<PathBuf>) -> Self {
        EngineConfig {
            ctl: ctl.into(),
            threads: 0,
            batch: 32,
            io_threads: None,
            pin: true,
            sched_batch: true,
            copy_data: false,
        }
    }
}

/// SIGINT and SIGTERM, blocked so that a thread can wait for them.
///
/// Block them first thing in `main`, before anything starts a thread:
/// threads inherit the mask, and a thread that does not block them would
/// take the signal's default action (the process dies mid-request).
pub struct StopSignals(SigSet);

impl StopSignals {
    /// Blocks SIGINT and SIGTERM in the calling thread.
    pub fn block() -> io::Result<StopSignals> {
        let mut sigs = SigSet::empty();
        sigs.add(Signal::SIGINT);
        sigs.add(Signal::SIGTERM);
        sigs.thread_block().map_err(io::Error::from)?;
        Ok(StopSignals(sigs))
    }

    /// Starts a thread that sets the returned flag when one arrives.
    pub fn watch(self) -> Arc<AtomicBool> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            let _ = self.0.wait();
            flag.store(true, Ordering::Relaxed);
        });
        stop
    }
}

/// The status that sets a device up for `backend` from `st` (geometry,
/// queues, timeout, RO and DELEGATED as given): `st.size` (0: the
/// backend's size) rounded down to the block size, and exactly the
/// features the backend handles; read-only if the backend is.
pub fn device_status(backend: &dyn Backend, mut st: AbuseStatus) -> Result<AbuseStatus, String> {
    let size = if st.size == 0 {
        backend.size()
    } else {
        st.size
    };
    if size > backend.size() {
        return Err(format!(
            "size={size} is larger than the backend ({} bytes)",
            backend.size()
        ));
    }
    if st.block_size == 0 {
        st.block_size = DEFAULT_BLOCK_SIZE;
    }
    st.size = size - size % st.block_size as u64;
    st.flags = (st.flags & (ABUSE_FLAG_READ_ONLY | ABUSE_FLAG_DELEGATED)) | backend.features();
    if backend.read_only() {
        st.flags |= ABUSE_FLAG_READ_ONLY;
    }
    Ok(st)
}

/// A status with the defaults `abusectl setup` uses (4096-byte blocks,
/// one hardware queue per CPU, 128 requests deep, a 30 s timeout) and
/// size 0 (the backend's, in [`device_status`]).
pub fn default_status() -> AbuseStatus {
    AbuseStatus {
        block_size: DEFAULT_BLOCK_SIZE,
        queue_depth: ABUSE_DEFAULT_QUEUE_DEPTH,
        timeout_ms: ABUSE_DEFAULT_TIMEOUT_MS,
        ..Default::default()
    }
}

/// A server for one control node: a backend, how the engine runs, when to
/// stop.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use abuse_servers::{null::Null, Server};
/// Server::new("/dev/abctl0", Null::new(1 << 30)).setup()?.run()?;
/// # Ok(()) }
/// ```
pub struct Server {
    config: EngineConfig,
    backend: Arc<dyn Backend>,
    stop: Option<Arc<AtomicBool>>,
    stats: Arc<Stats>,
}

impl Server {
    /// Serves `backend` on the control node `ctl` (e.g. /dev/abctl0) with
    /// [`EngineConfig::new`]'s defaults.
    pub fn new(ctl: impl Into<PathBuf>, backend: impl Backend + 'static) -> Server {
        Server::shared(ctl, Arc::new(backend))
    }

    /// As [`Server::new`], for a backend already shared.
    pub fn shared(ctl: impl Into<PathBuf>, backend: Arc<dyn Backend>) -> Server {
        Server {
            config: EngineConfig::new(ctl),
            backend,
            stop: None,
            stats: Arc::new(Stats::default()),
        }
    }

    /// The engine's settings (the control node is the one given to `new`).
    pub fn config(mut self, f: impl FnOnce(&mut EngineConfig)) -> Server {
        f(&mut self.config);
        self
    }

    /// Sets the device up now, unless it is configured already (a server
    /// restarted after a crash takes the device over as it is): the
    /// backend's size and features, [`default_status`]'s geometry.
    pub fn setup(self) -> Result<Server, EngineError> {
        self.setup_with(default_status())
    }

    /// As [`Server::setup`], from `st` as [`device_status`] takes it.
    pub fn setup_with(self, want: AbuseStatus) -> Result<Server, EngineError> {
        let ctl = Control::open(&self.config.ctl)?;
        if ctl.status()?.flags & ABUSE_FLAG_CONFIGURED == 0 {
            let st = device_status(&*self.backend, want)
                .map_err(|e| EngineError::Unsuitable(self.config.ctl.clone(), e))?;
            ctl.set_status(&st)?;
        }
        Ok(self)
    }

    /// Stops when `stop` is set, rather than on SIGINT/SIGTERM.
    pub fn stop_on(mut self, stop: Arc<AtomicBool>) -> Server {
        self.stop = Some(stop);
        self
    }

    /// Counts into `stats` (read them while it runs).
    pub fn stats(mut self, stats: Arc<Stats>) -> Server {
        self.stats = stats;
        self
    }

    /// The backend it serves.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Serves until stopped (SIGINT or SIGTERM unless [`Server::stop_on`]
    /// was given: blocked here, so block them earlier with
    /// [`StopSignals::block`] if the backend started threads of its own),
    /// completing every request it fetched, then stops the backend
    /// ([`Backend::stop`]; its error is [`EngineError::Stop`]).
    pub fn run(self) -> Result<(), EngineError> {
        let stop = match &self.stop {
            Some(stop) => stop.clone(),
            None => StopSignals::block().map_err(EngineError::Signals)?.watch(),
        };
        serve(&self.config, self.backend.clone(), stop, self.stats)?;
        self.backend.stop().map_err(EngineError::Stop)
    }
}
