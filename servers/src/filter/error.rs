//! `error`: fails requests with an errno, as a failing disk would.
//! `error:write,rate=1%,errno=EIO,seed=7,after=100,sectors=2048-4095`
//!
//! - `read`, `write`, `flush`, `discard`, `write_zeroes` (bare words): the
//!   commands that may fail [default: every one];
//! - `rate=N%`: the share of those that fail [default: 100%], drawn from a
//!   seeded pseudo-random sequence (`seed=N`, default 0): the same seed
//!   fails the same requests of the same sequence of requests;
//! - `errno=NAME`: what they fail with [default: EIO]: EIO, ENOSPC,
//!   EOPNOTSUPP, ENODATA, EILSEQ, ETIMEDOUT, ENOLINK or EREMOTEIO (the
//!   errnos a server may give the kernel; the filesystem sees each as
//!   itself);
//! - `after=N`: the first N requests that match pass, whatever the rate;
//! - `sectors=A-B`: only requests that touch a 512-byte sector from A to B
//!   (both included) match; a FLUSH (no range) then never does.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;

use super::{bad, needs_value, parse_u64, unknown, Cmd, Filter, Opts, Request};
use crate::backend::Backend;

/// The errnos `errno=` takes: those the driver passes on as themselves.
pub const ERRNOS: [Errno; 8] = [
    Errno::EIO,
    Errno::ENOSPC,
    Errno::EOPNOTSUPP,
    Errno::ENODATA,
    Errno::EILSEQ,
    Errno::ETIMEDOUT,
    Errno::ENOLINK,
    Errno::EREMOTEIO,
];

/// Which requests the error filter fails, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Which commands match, indexed by [`Cmd::index`].
    pub cmds: [bool; 5],
    /// The share that fails, 0 to 1.
    pub rate: f64,
    /// What the failing requests fail with (one of [`ERRNOS`]).
    pub errno: Errno,
    /// Seeds the pseudo-random sequence that picks the failures.
    pub seed: u64,
    /// Requests that match but pass before any fails.
    pub after: u64,
    /// Sectors (512 bytes) from..=to.
    pub sectors: Option<(u64, u64)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cmds: [true; 5],
            rate: 1.0,
            errno: Errno::EIO,
            seed: 0,
            after: 0,
            sectors: None,
        }
    }
}

impl Options {
    /// Parses the filter's options.
    pub fn parse(opts: &Opts<'_>) -> Result<Self, String> {
        let known = "read, write, flush, discard, write_zeroes, rate=N%, errno=NAME, seed=N, after=N, sectors=A-B";
        let mut o = Options::default();
        let mut named = [false; 5];
        for &(k, v) in &opts.items {
            if let Some(cmd) = Cmd::from_name(k) {
                if let Some(v) = v {
                    return Err(format!(
                        "'{k}={v}': a command is named bare (e.g. error:{k},rate=1%)"
                    ));
                }
                named[cmd.index()] = true;
                continue;
            }
            let Some(v) = v else {
                return Err(match k {
                    "rate" => needs_value(k, "1%"),
                    "errno" => needs_value(k, "EIO"),
                    "seed" | "after" => needs_value(k, "100"),
                    "sectors" => needs_value(k, "0-2047"),
                    _ => unknown(k, None, known),
                });
            };
            match k {
                "rate" => o.rate = parse_percent(v).map_err(|e| bad(k, v, &e))?,
                "errno" => {
                    o.errno = ERRNOS
                        .into_iter()
                        .find(|e| format!("{e:?}").eq_ignore_ascii_case(v))
                        .ok_or_else(|| {
                            let names: Vec<String> =
                                ERRNOS.iter().map(|e| format!("{e:?}")).collect();
                            bad(k, v, &format!("one of {}", names.join(", ")))
                        })?
                }
                "seed" => o.seed = parse_u64(k, v)?,
                "after" => o.after = parse_u64(k, v)?,
                "sectors" => {
                    let range = v.split_once('-').and_then(|(a, b)| {
                        Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?))
                    });
                    match range {
                        Some((a, b)) if a <= b => o.sectors = Some((a, b)),
                        Some(_) => return Err(bad(k, v, "a range from low to high")),
                        None => {
                            return Err(bad(k, v, "a range of sectors A-B (e.g. sectors=0-2047)"))
                        }
                    }
                }
                _ => return Err(unknown(k, Some(v), known)),
            }
        }
        if named.iter().any(|&n| n) {
            o.cmds = named;
        }
        Ok(o)
    }
}

/// `N%` (0 to 100) as a share of 1.
fn parse_percent(s: &str) -> Result<f64, String> {
    let what = || "a percentage from 0% to 100% (e.g. rate=1%, rate=0.5%)".to_string();
    let n: f64 = s
        .strip_suffix('%')
        .ok_or_else(what)?
        .trim()
        .parse()
        .map_err(|_| what())?;
    if !(0.0..=100.0).contains(&n) {
        return Err(what());
    }
    Ok(n / 100.0)
}

/// SplitMix64: a pseudo-random u64 for the `n`th draw from `seed`.
fn draw(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The error filter.
pub struct Error {
    o: Options,
    /// Requests that matched so far.
    matched: AtomicU64,
    /// Draws from the sequence so far.
    draws: AtomicU64,
    injected: AtomicU64,
}

impl Error {
    /// The filter, with these options.
    pub fn new(o: Options) -> Self {
        Error {
            o,
            matched: AtomicU64::new(0),
            draws: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    /// Errors injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn matches(&self, req: &Request<'_>) -> bool {
        if !self.o.cmds[req.cmd.index()] {
            return false;
        }
        match self.o.sectors {
            None => true,
            Some(_) if req.cmd == Cmd::Flush => false,
            Some((from, to)) => {
                let first = req.offset >> 9;
                let end = (req.offset + req.len.max(1)).div_ceil(512);
                first <= to && end > from
            }
        }
    }

    fn fails(&self, req: &Request<'_>) -> bool {
        if !self.matches(req) {
            return false;
        }
        if self.matched.fetch_add(1, Ordering::Relaxed) < self.o.after {
            return false;
        }
        if self.o.rate >= 1.0 {
            return true;
        }
        let n = self.draws.fetch_add(1, Ordering::Relaxed);
        // 53 random bits as a fraction of 1.
        let x = (draw(self.o.seed, n) >> 11) as f64 / (1u64 << 53) as f64;
        x < self.o.rate
    }
}

impl Filter for Error {
    fn request(&self, req: &mut Request<'_>, next: &dyn Backend) -> io::Result<()> {
        if self.fails(req) {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::from_raw_os_error(self.o.errno as i32));
        }
        req.pass(next)
    }
}
