//! `rate`: a limit on requests and bytes per second, as a cloud disk has:
//! `rate:iops=200`, `rate:bw=10M`, `rate:iops=500,bw=50M`.
//!
//! - `iops=N`: READs, WRITEs, DISCARDs and WRITE_ZEROES per second (a
//!   FLUSH moves no data and is not counted);
//! - `bw=N[K|M|G]`: bytes READ and WRITTEN per second (powers of 1024).
//!
//! Each is a token bucket shared by every thread of the server, holding at
//! most 1/50 s of tokens (at least one request's worth): a request takes
//! its tokens, into debt if there are not enough, and waits until the
//! debt is paid. Over a second, the rate holds within about 2%.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{needs_value, parse_bytes, parse_u64, unknown, Cmd, Filter, Opts, Request};
use crate::backend::Backend;

/// The rate filter's limits (at least one).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    /// Requests per second (READs, WRITEs, DISCARDs and WRITE_ZEROES).
    pub iops: Option<u64>,
    /// Bytes per second.
    pub bw: Option<u64>,
}

impl Options {
    /// Parses the filter's options.
    pub fn parse(opts: &Opts<'_>) -> Result<Self, String> {
        let known = "iops=N, bw=N[K|M|G]";
        let mut o = Options::default();
        for &(k, v) in &opts.items {
            match (k, v) {
                ("iops", Some(v)) => o.iops = Some(parse_u64(k, v)?),
                ("bw", Some(v)) => {
                    o.bw = Some(parse_bytes(v).map_err(|e| format!("{k}={v}: {e}"))?)
                }
                ("iops", None) => return Err(needs_value(k, "200")),
                ("bw", None) => return Err(needs_value(k, "10M")),
                _ => return Err(unknown(k, v, known)),
            }
        }
        if o.iops == Some(0) || o.bw == Some(0) {
            return Err("a rate of 0 would stop every request".into());
        }
        if o.iops.is_none() && o.bw.is_none() {
            return Err("limits nothing: give iops=N and/or bw=N (e.g. rate:iops=200)".into());
        }
        Ok(o)
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved.
pub struct Bucket {
    rate: f64,
    burst: f64,
    /// Tokens (negative: debt) as of the instant.
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// A full bucket: `rate` tokens a second, at most `burst` saved.
    pub fn new(rate: f64, burst: f64) -> Self {
        Bucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes `n` tokens; how long to wait before going on.
    pub fn take(&self, n: f64) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, last) = *s;
        let tokens = (tokens + now.saturating_duration_since(last).as_secs_f64() * self.rate)
            .min(self.burst);
        let left = tokens - n;
        *s = (left, now);
        if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / self.rate)
        }
    }
}

/// The rate filter.
pub struct Rate {
    iops: Option<Bucket>,
    bw: Option<Bucket>,
}

impl Rate {
    /// The filter, with these limits.
    pub fn new(o: Options) -> Self {
        let bucket = |rate: u64, least: f64| {
            let rate = rate as f64;
            Bucket::new(rate, (rate / 50.0).max(least))
        };
        Rate {
            iops: o.iops.map(|r| bucket(r, 1.0)),
            // At least a large request's worth (128 KiB).
            bw: o.bw.map(|r| bucket(r, 131072.0)),
        }
    }
}

impl Filter for Rate {
    fn request(&self, req: &mut Request<'_>, next: &dyn Backend) -> io::Result<()> {
        let mut wait = Duration::ZERO;
        if req.cmd != Cmd::Flush {
            if let Some(b) = &self.iops {
                wait = wait.max(b.take(1.0));
            }
        }
        if matches!(req.cmd, Cmd::Read | Cmd::Write) {
            if let Some(b) = &self.bw {
                wait = wait.max(b.take(req.len as f64));
            }
        }
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        req.pass(next)
    }

    fn may_block(&self, _cmd: u16, _next: bool) -> bool {
        true
    }

    fn io_threads(&self, next: usize) -> usize {
        next.max(4)
    }
}
