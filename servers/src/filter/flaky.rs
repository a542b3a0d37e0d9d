//! `flaky`: a disk that works for a while, then does not (dm-flakey).
//! `flaky:up=10s,down=2s,mode=drop`: from the start, `up` working, then
//! `down` broken, and so on. While down, READs and FLUSHes pass; WRITEs,
//! DISCARDs and WRITE_ZEROES are dropped (`mode=drop`, the default:
//! acknowledged but never written, dm-flakey's drop_writes) or fail with
//! EIO (`mode=fail`, its error_writes).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{bad, needs_value, parse_duration, unknown, Filter, Opts, Request};
use crate::backend::Backend;

/// What happens to writes while the disk is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Acknowledged, not written.
    Drop,
    /// Failed with EIO.
    Fail,
}

/// When the flaky disk works, when not, and what it does to writes then.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// How long the disk works.
    pub up: Duration,
    /// How long it is then broken.
    pub down: Duration,
    /// What happens to writes while it is broken.
    pub mode: Mode,
}

impl Options {
    /// Parses the filter's options.
    pub fn parse(opts: &Opts<'_>) -> Result<Self, String> {
        let known = "up=DUR, down=DUR, mode=drop|fail";
        let (mut up, mut down, mut mode) = (None, None, Mode::Drop);
        for &(k, v) in &opts.items {
            let v = match (k, v) {
                ("up" | "down", None) => return Err(needs_value(k, "5s")),
                ("mode", None) => return Err(needs_value(k, "drop")),
                (_, None) => return Err(unknown(k, None, known)),
                (_, Some(v)) => v,
            };
            let dur = || parse_duration(v).map_err(|e| format!("{k}={v}: {e}"));
            match k {
                "up" => up = Some(dur()?),
                "down" => down = Some(dur()?),
                "mode" => {
                    mode = match v {
                        "drop" => Mode::Drop,
                        "fail" => Mode::Fail,
                        _ => return Err(bad(k, v, "drop or fail")),
                    }
                }
                _ => return Err(unknown(k, Some(v), known)),
            }
        }
        match (up, down) {
            (Some(up), Some(down)) if !down.is_zero() => Ok(Options { up, down, mode }),
            (Some(_), Some(_)) => Err("down=0: the disk would never fail".into()),
            _ => Err("needs both up= and down= (e.g. flaky:up=10s,down=2s)".into()),
        }
    }
}

/// The flaky filter.
pub struct Flaky {
    o: Options,
    start: Instant,
    dropped: AtomicU64,
    failed: AtomicU64,
}

impl Flaky {
    /// The filter, with these options; the disk works from now.
    pub fn new(o: Options) -> Self {
        Flaky {
            o,
            start: Instant::now(),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Whether the disk is down now.
    pub fn is_down(&self) -> bool {
        let period = (self.o.up + self.o.down).as_nanos();
        self.start.elapsed().as_nanos() % period >= self.o.up.as_nanos()
    }

    /// Writes (and discards, zeroes) dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes (and discards, zeroes) failed so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

impl Filter for Flaky {
    fn request(&self, req: &mut Request<'_>, next: &dyn Backend) -> io::Result<()> {
        if req.cmd.writes() && self.is_down() {
            return match self.o.mode {
                Mode::Drop => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Mode::Fail => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    Err(io::Error::from_raw_os_error(nix::libc::EIO))
                }
            };
        }
        req.pass(next)
    }
}
