//! Filters: a [`Backend`] that wraps a backend and changes what happens to
//! its requests (delays, injected errors, a flaky disk, a log, a rate limit,
//! read-only), stackable on every backend, as nbdkit's filters are.
//!
//! A filter is given on the command line as `NAME[:KEY=VAL,FLAG,...]`
//! ([`FilterSpec::parse`]); [`wrap`] stacks several in command-line order,
//! **the first one outermost**: it sees each request first, before the
//! filters after it and the backend (as `nbdkit --filter=A --filter=B`). So
//! `--filter log:file=L --filter error:write` logs the errors the error
//! filter injects, and `--filter error:write --filter log:file=L` logs only
//! the writes that reached the backend.
//!
//! Each filter lives in a file of its own and implements one small API,
//! [`Filter`]: it sees each request as a [`Request`] and passes it on with
//! [`Request::pass`] (or not: it fails it, drops it, delays it). Everything
//! else of the [`Backend`] trait is forwarded by [`Filtered`] in one place,
//! so that no filter can forget to forward `stop`, `flush` or a feature.
//! One thing is not forwarded: the kernel never moves data between a
//! request and the backend's files by itself (`data_file`, `moved_files`,
//! `read_from_file`, `write_to_file`), since those READs and WRITEs would
//! never reach the filter.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::Backend;

pub mod delay;
pub mod error;
pub mod flaky;
pub mod log;
pub mod rate;
pub mod readonly;

/// A request's command, as a filter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cmd {
    /// READ.
    Read,
    /// WRITE.
    Write,
    /// FLUSH.
    Flush,
    /// DISCARD.
    Discard,
    /// WRITE_ZEROES.
    WriteZeroes,
}

// In ABUSE_CMD_* order.
const _: () = assert!(
    Cmd::Read as u16 == abuse_sys::uapi::ABUSE_CMD_READ
        && Cmd::Write as u16 == abuse_sys::uapi::ABUSE_CMD_WRITE
        && Cmd::Flush as u16 == abuse_sys::uapi::ABUSE_CMD_FLUSH
        && Cmd::Discard as u16 == abuse_sys::uapi::ABUSE_CMD_DISCARD
        && Cmd::WriteZeroes as u16 == abuse_sys::uapi::ABUSE_CMD_WRITE_ZEROES
);

impl Cmd {
    /// Every command.
    pub const ALL: [Cmd; 5] = [
        Cmd::Read,
        Cmd::Write,
        Cmd::Flush,
        Cmd::Discard,
        Cmd::WriteZeroes,
    ];

    /// Its name in filter options (`read`, `write_zeroes`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Cmd::Read => "read",
            Cmd::Write => "write",
            Cmd::Flush => "flush",
            Cmd::Discard => "discard",
            Cmd::WriteZeroes => "write_zeroes",
        }
    }

    /// The command named `name` in filter options.
    pub fn from_name(name: &str) -> Option<Cmd> {
        Cmd::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The command `ABUSE_CMD_*` stands for.
    pub fn from_abuse(cmd: u16) -> Option<Cmd> {
        Cmd::ALL.get(cmd as usize).copied()
    }

    /// Whether it changes the device's contents (WRITE, DISCARD,
    /// WRITE_ZEROES).
    pub fn writes(self) -> bool {
        matches!(self, Cmd::Write | Cmd::Discard | Cmd::WriteZeroes)
    }

    /// Its index in `ALL`.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cmd::Read => "READ",
            Cmd::Write => "WRITE",
            Cmd::Flush => "FLUSH",
            Cmd::Discard => "DISCARD",
            Cmd::WriteZeroes => "WRITE_ZEROES",
        })
    }
}

enum Data<'a> {
    None,
    Read { buf: &'a mut [u8], or_hole: bool },
    Write(&'a [u8]),
}

/// One request on its way through the filters to the backend.
pub struct Request<'a> {
    /// The command.
    pub cmd: Cmd,
    /// Byte offset (0 for FLUSH).
    pub offset: u64,
    /// Bytes (0 for FLUSH).
    pub len: u64,
    /// WRITE: durable before it completes.
    pub fua: bool,
    /// WRITE_ZEROES: the range may be deallocated.
    pub unmap: bool,
    data: Data<'a>,
    /// READ: the backend said the range is a hole (the buffer is left as
    /// it was and the request completes as zeroes).
    pub hole: bool,
}

impl<'a> Request<'a> {
    fn new(cmd: Cmd, offset: u64, len: u64, data: Data<'a>) -> Self {
        Request {
            cmd,
            offset,
            len,
            fua: false,
            unmap: false,
            data,
            hole: false,
        }
    }

    /// A READ of `buf.len()` bytes at `offset`; `or_hole`: as
    /// [`Backend::read_or_hole`].
    pub fn read(offset: u64, buf: &'a mut [u8], or_hole: bool) -> Self {
        let len = buf.len() as u64;
        Self::new(Cmd::Read, offset, len, Data::Read { buf, or_hole })
    }

    /// A WRITE of `buf` at `offset`.
    pub fn write(offset: u64, buf: &'a [u8], fua: bool) -> Self {
        Request {
            fua,
            ..Self::new(Cmd::Write, offset, buf.len() as u64, Data::Write(buf))
        }
    }

    /// A FLUSH.
    pub fn flush() -> Self {
        Self::new(Cmd::Flush, 0, 0, Data::None)
    }

    /// A DISCARD of `len` bytes at `offset`.
    pub fn discard(offset: u64, len: u64) -> Self {
        Self::new(Cmd::Discard, offset, len, Data::None)
    }

    /// A WRITE_ZEROES of `len` bytes at `offset`; `unmap`: the range may be
    /// deallocated.
    pub fn write_zeroes(offset: u64, len: u64, unmap: bool) -> Self {
        Request {
            unmap,
            ..Self::new(Cmd::WriteZeroes, offset, len, Data::None)
        }
    }

    /// Runs it on `next` (the next filter or the backend).
    pub fn pass(&mut self, next: &dyn Backend) -> io::Result<()> {
        match &mut self.data {
            Data::Read { buf, or_hole: true } => {
                self.hole = next.read_or_hole(self.offset, buf)?;
                Ok(())
            }
            Data::Read { buf, .. } => next.read(self.offset, buf),
            Data::Write(buf) => next.write(self.offset, buf, self.fua),
            Data::None => match self.cmd {
                Cmd::Flush => next.flush(),
                Cmd::Discard => next.discard(self.offset, self.len),
                _ => next.write_zeroes(self.offset, self.len, self.unmap),
            },
        }
    }
}

/// What a filter does. Only `request` is required; the rest default to
/// what the next layer says.
pub trait Filter: Send + Sync + 'static {
    /// Handles `req`: typically does something, then `req.pass(next)`.
    fn request(&self, req: &mut Request<'_>, next: &dyn Backend) -> io::Result<()>;
    /// The features to advertise, given the next layer's.
    fn features(&self, next: u32) -> u32 {
        next
    }
    /// Whether writes are refused, given whether the next layer refuses them.
    fn read_only(&self, next: bool) -> bool {
        next
    }
    /// Whether a request may wait (sleep, storage), given the next
    /// layer's answer: a filter that sleeps says true for what it delays.
    fn may_block(&self, _cmd: u16, next: bool) -> bool {
        next
    }
    /// I/O threads to run a batch's requests on, given the next layer's.
    fn io_threads(&self, next: usize) -> usize {
        next
    }
    /// The server stops (after the next layer stopped).
    fn stop(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A backend seen through a filter.
pub struct Filtered<F> {
    filter: F,
    next: Arc<dyn Backend>,
}

impl<F: Filter> Filtered<F> {
    /// `filter` over `next` (the next filter, or the backend).
    pub fn new(filter: F, next: Arc<dyn Backend>) -> Self {
        Filtered { filter, next }
    }

    /// The filter itself.
    pub fn filter(&self) -> &F {
        &self.filter
    }

    fn run<'b>(&self, mut req: Request<'b>) -> io::Result<Request<'b>> {
        self.filter.request(&mut req, &*self.next)?;
        Ok(req)
    }
}

impl<F: Filter> Backend for Filtered<F> {
    fn size(&self) -> u64 {
        self.next.size()
    }

    fn read_only(&self) -> bool {
        self.filter.read_only(self.next.read_only())
    }

    fn features(&self) -> u32 {
        self.filter.features(self.next.features())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.run(Request::read(offset, buf, false)).map(drop)
    }

    fn read_or_hole(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        self.run(Request::read(offset, buf, true)).map(|r| r.hole)
    }

    // data_file, moved_files, read_from_file, write_to_file: the defaults
    // (none): every READ and WRITE must come through the filter.

    fn needs_payloads(&self) -> bool {
        // A filter counts bytes and ranges: it needs the real lengths,
        // which descriptor-only fetching (null) would not give it.
        true
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.run(Request::write(offset, buf, fua)).map(drop)
    }

    fn flush(&self) -> io::Result<()> {
        self.run(Request::flush()).map(drop)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.run(Request::discard(offset, len)).map(drop)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.run(Request::write_zeroes(offset, len, unmap))
            .map(drop)
    }

    fn check_block_size(&self, block_size: u32) -> io::Result<()> {
        self.next.check_block_size(block_size)
    }

    fn io_threads(&self) -> usize {
        self.filter.io_threads(self.next.io_threads())
    }

    fn may_block(&self, cmd: u16, offset: u64, len: u64, fua: bool) -> bool {
        self.filter
            .may_block(cmd, self.next.may_block(cmd, offset, len, fua))
    }

    fn stop(&self) -> io::Result<()> {
        let next = self.next.stop();
        let mine = self.filter.stop();
        next.and(mine)
    }
}

/// A parsed `--filter` argument: which filter, with which options.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterSpec {
    /// What was given, for messages.
    pub text: String,
    /// The filter, with its options.
    pub kind: Kind,
}

/// Each filter's options.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// `delay`.
    Delay(delay::Options),
    /// `error`.
    Error(error::Options),
    /// `flaky`.
    Flaky(flaky::Options),
    /// `log`.
    Log(log::Options),
    /// `rate`.
    Rate(rate::Options),
    /// `readonly` (no options).
    Readonly,
}

/// The filters, with a line of help each (for messages).
pub const FILTERS: &[(&str, &str)] = &[
    (
        "delay",
        "read=DUR,write=DUR,flush=DUR,discard=DUR,write_zeroes=DUR",
    ),
    (
        "error",
        "[read,write,flush,discard,write_zeroes],rate=N%,errno=EIO,seed=N,after=N,sectors=A-B",
    ),
    ("flaky", "up=DUR,down=DUR,mode=drop|fail"),
    ("log", "file=PATH"),
    ("rate", "iops=N,bw=N[K|M|G]"),
    ("readonly", "(no options)"),
];

impl FilterSpec {
    /// Parses `NAME[:KEY=VAL,FLAG,...]`, e.g. `delay:read=10ms` or
    /// `error:write,rate=1%,errno=EIO`; the error says what is wrong and
    /// what would be right (it does not repeat `text`: clap's does).
    pub fn parse(text: &str) -> Result<FilterSpec, String> {
        let (name, rest) = match text.split_once(':') {
            Some((n, r)) => (n.trim(), Some(r)),
            None => (text.trim(), None),
        };
        let usage = || {
            FILTERS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(n, u)| format!(" (usage: {n}:{u})"))
                .unwrap_or_default()
        };
        let opts = Opts::split(rest.unwrap_or("")).map_err(|e| format!("{e}{}", usage()))?;
        let kind = match name {
            "delay" => delay::Options::parse(&opts).map(Kind::Delay),
            "error" => error::Options::parse(&opts).map(Kind::Error),
            "flaky" => flaky::Options::parse(&opts).map(Kind::Flaky),
            "log" => log::Options::parse(&opts).map(Kind::Log),
            "rate" => rate::Options::parse(&opts).map(Kind::Rate),
            "readonly" => opts.none().map(|()| Kind::Readonly),
            "" => Err("no filter name (NAME[:KEY=VAL,...], e.g. delay:read=10ms)".into()),
            other => Err(format!(
                "unknown filter '{other}' (filters: {})",
                FILTERS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
        .map_err(|e| format!("{e}{}", usage()))?;
        Ok(FilterSpec {
            text: text.to_string(),
            kind,
        })
    }

    /// This filter over `next`.
    pub fn apply(&self, next: Arc<dyn Backend>) -> Result<Arc<dyn Backend>, String> {
        Ok(match &self.kind {
            Kind::Delay(o) => Arc::new(Filtered::new(delay::Delay::new(o.clone()), next)),
            Kind::Error(o) => Arc::new(Filtered::new(error::Error::new(o.clone()), next)),
            Kind::Flaky(o) => Arc::new(Filtered::new(flaky::Flaky::new(o.clone()), next)),
            Kind::Log(o) => Arc::new(Filtered::new(
                log::Log::open(o).map_err(|e| format!("filter '{}': {e}", self.text))?,
                next,
            )),
            Kind::Rate(o) => Arc::new(Filtered::new(rate::Rate::new(o.clone()), next)),
            Kind::Readonly => Arc::new(Filtered::new(readonly::Readonly, next)),
        })
    }
}

impl std::str::FromStr for FilterSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FilterSpec::parse(s)
    }
}

/// `backend` seen through `specs`, the first outermost (it sees each
/// request first). No specs: the backend itself.
pub fn wrap_shared(
    backend: Arc<dyn Backend>,
    specs: &[FilterSpec],
) -> Result<Arc<dyn Backend>, String> {
    specs.iter().rev().try_fold(backend, |b, s| s.apply(b))
}

/// [`wrap_shared`] for a boxed backend.
pub fn wrap(backend: Box<dyn Backend>, specs: &[FilterSpec]) -> Result<Box<dyn Backend>, String> {
    if specs.is_empty() {
        return Ok(backend);
    }
    let outer = wrap_shared(Arc::from(backend), specs)?;
    Ok(Box::new(Shared(outer)))
}

/// An `Arc<dyn Backend>` as a backend (every method forwarded).
struct Shared(Arc<dyn Backend>);

impl Backend for Shared {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        self.0.read_only()
    }
    fn features(&self) -> u32 {
        self.0.features()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, buf)
    }
    fn read_or_hole(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        self.0.read_or_hole(offset, buf)
    }
    fn data_file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.0.data_file()
    }
    fn moved_files(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.0.moved_files()
    }
    fn read_from_file(&self, offset: u64, len: u64) -> Option<(std::os::fd::BorrowedFd<'_>, u64)> {
        self.0.read_from_file(offset, len)
    }
    fn write_to_file(&self, offset: u64, len: u64) -> Option<(std::os::fd::BorrowedFd<'_>, u64)> {
        self.0.write_to_file(offset, len)
    }
    fn needs_payloads(&self) -> bool {
        self.0.needs_payloads()
    }
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.0.write(offset, buf, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.0.write_zeroes(offset, len, unmap)
    }
    fn check_block_size(&self, block_size: u32) -> io::Result<()> {
        self.0.check_block_size(block_size)
    }
    fn io_threads(&self) -> usize {
        self.0.io_threads()
    }
    fn may_block(&self, cmd: u16, offset: u64, len: u64, fua: bool) -> bool {
        self.0.may_block(cmd, offset, len, fua)
    }
    fn stop(&self) -> io::Result<()> {
        self.0.stop()
    }
}

/// A filter's options, split: `KEY=VAL` pairs and bare `FLAG`s, in order.
pub struct Opts<'a> {
    /// The items in order: `KEY=VAL` as `(KEY, Some(VAL))`, a bare `FLAG`
    /// as `(FLAG, None)`.
    pub items: Vec<(&'a str, Option<&'a str>)>,
}

impl<'a> Opts<'a> {
    fn split(s: &'a str) -> Result<Self, String> {
        let mut items = Vec::new();
        for item in s.split(',') {
            let item = item.trim();
            if item.is_empty() {
                if s.trim().is_empty() {
                    continue;
                }
                return Err("an empty option (two commas, or a trailing one)".into());
            }
            match item.split_once('=') {
                Some((k, v)) => {
                    let (k, v) = (k.trim(), v.trim());
                    if k.is_empty() {
                        return Err(format!("'{item}' has no key before '='"));
                    }
                    if v.is_empty() {
                        return Err(format!("{k}= needs a value"));
                    }
                    if items.iter().any(|(seen, _)| *seen == k) {
                        return Err(format!("{k} given twice"));
                    }
                    items.push((k, Some(v)));
                }
                None => items.push((item, None)),
            }
        }
        Ok(Opts { items })
    }

    /// Errors unless there are no options.
    pub fn none(&self) -> Result<(), String> {
        match self.items.first() {
            None => Ok(()),
            Some((k, _)) => Err(format!("takes no options, got '{k}'")),
        }
    }
}

/// An error for the option `key` whose value `val` is not `what`.
pub fn bad(key: &str, val: &str, what: &str) -> String {
    format!("{key}={val}: not {what}")
}

/// An error for an option this filter does not know.
pub fn unknown(key: &str, val: Option<&str>, known: &str) -> String {
    match val {
        Some(v) => format!("unknown option '{key}={v}' (options: {known})"),
        None => format!("unknown option '{key}' (options: {known})"),
    }
}

/// An error for an option that needs a value but was given bare.
pub fn needs_value(key: &str, example: &str) -> String {
    format!("{key} needs a value ({key}={example})")
}

/// A duration: a number with a unit `ns`, `us`, `ms`, `s`, `m`, `h` (a bare
/// number is seconds), e.g. `10ms`, `1.5s`, `2`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| "not a duration (e.g. 10ms, 1.5s, 2)".to_string())?;
    let scale = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit '{other}' (ns, us, ms, s, m, h; none: seconds)"
            ))
        }
    };
    let secs = n * scale;
    if !secs.is_finite() || secs > 86400.0 * 365.0 {
        return Err("too long a duration".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A count of bytes: a number with an optional K, M, G or T (powers of
/// 1024), e.g. `512K`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let bad = || "not a number of bytes (e.g. 4096, 512K, 10M, 1G)".to_string();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// A plain number.
pub fn parse_u64(key: &str, s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| bad(key, s, "a whole number (e.g. 100)"))
}
