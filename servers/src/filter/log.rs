//! `log`: one line per request to a file, once it completed:
//! `log:file=/tmp/requests.log`. Each line: the time it completed (UTC),
//! the command, offset and length in bytes, its flags, the result (`ok`,
//! `ok hole` for a READ the backend answered as zeroes, or `error=ENAME`)
//! and how long it took:
//!
//! ```text
//! 2025-06-01T12:00:00.123456Z WRITE offset=4096 len=8192 fua ok 0.412ms
//! 2025-06-01T12:00:00.123502Z READ offset=0 len=4096 error=EIO 0.003ms
//! ```
//!
//! The file is appended to (created if need be); each line is written
//! whole, at once, so lines from several threads never mix.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;

use super::{needs_value, unknown, Filter, Opts, Request};
use crate::backend::Backend;

/// Where the log filter writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// The log file (appended to, created if need be).
    pub file: PathBuf,
}

impl Options {
    /// Parses the filter's options.
    pub fn parse(opts: &Opts<'_>) -> Result<Self, String> {
        let mut file = None;
        for &(k, v) in &opts.items {
            match (k, v) {
                ("file", Some(v)) => file = Some(PathBuf::from(v)),
                ("file", None) => return Err(needs_value(k, "/tmp/requests.log")),
                _ => return Err(unknown(k, v, "file=PATH")),
            }
        }
        let file = file.ok_or("needs file=PATH (e.g. log:file=/tmp/requests.log)")?;
        Ok(Options { file })
    }
}

/// The log filter.
pub struct Log {
    file: Mutex<File>,
}

impl Log {
    /// The filter: opens the log file for appending, creating it if need be.
    pub fn open(o: &Options) -> Result<Self, String> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&o.file)
            .map_err(|e| format!("{}: {e}", o.file.display()))?;
        Ok(Log {
            file: Mutex::new(file),
        })
    }
}

/// `2025-06-01T12:00:00.123456Z` for `t`.
pub fn utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

impl Filter for Log {
    fn request(&self, req: &mut Request<'_>, next: &dyn Backend) -> io::Result<()> {
        let start = Instant::now();
        let result = req.pass(next);
        let took = start.elapsed();
        let mut line = format!(
            "{} {} offset={} len={}",
            utc(SystemTime::now()),
            req.cmd,
            req.offset,
            req.len
        );
        if req.fua {
            line.push_str(" fua");
        }
        if req.unmap {
            line.push_str(" unmap");
        }
        match &result {
            Ok(()) if req.hole => line.push_str(" ok hole"),
            Ok(()) => line.push_str(" ok"),
            Err(e) => {
                let errno = Errno::from_raw(crate::engine::errno_of(e));
                line.push_str(&format!(" error={errno:?}"));
            }
        }
        line.push_str(&format!(" {:.3}ms\n", took.as_secs_f64() * 1e3));
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // The log must not fail the request: a full disk loses lines.
        let _ = f.write_all(line.as_bytes());
        result
    }

    fn stop(&self) -> io::Result<()> {
        let f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.sync_data()
    }
}
