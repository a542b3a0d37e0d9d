//! `delay`: each request waits before it goes on (a slow disk, a distant
//! server). `delay:read=10ms,write=5ms,flush=100ms,discard=1ms,write_zeroes=1ms`;
//! commands not named are not delayed.

use std::io;
use std::time::Duration;

use super::{needs_value, parse_duration, unknown, Cmd, Filter, Opts, Request};
use crate::backend::Backend;

/// How long each command waits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    /// Indexed by [`Cmd::index`].
    pub delays: [Duration; 5],
}

impl Options {
    /// Parses the filter's options.
    pub fn parse(opts: &Opts<'_>) -> Result<Self, String> {
        let known = "read=DUR, write=DUR, flush=DUR, discard=DUR, write_zeroes=DUR";
        let mut o = Options::default();
        for &(k, v) in &opts.items {
            let cmd = Cmd::from_name(k).ok_or_else(|| unknown(k, v, known))?;
            let v = v.ok_or_else(|| needs_value(k, "10ms"))?;
            o.delays[cmd.index()] = parse_duration(v).map_err(|e| format!("{k}={v}: {e}"))?;
        }
        if o.delays.iter().all(|d| d.is_zero()) {
            return Err("delays nothing: name a command, e.g. delay:read=10ms".into());
        }
        Ok(o)
    }
}

/// The delay filter.
pub struct Delay {
    o: Options,
}

impl Delay {
    /// The filter, with these options.
    pub fn new(o: Options) -> Self {
        Delay { o }
    }

    fn of_cmd(&self, cmd: u16) -> Duration {
        Cmd::from_abuse(cmd).map_or(Duration::ZERO, |c| self.o.delays[c.index()])
    }
}

impl Filter for Delay {
    fn request(&self, req: &mut Request<'_>, next: &dyn Backend) -> io::Result<()> {
        let d = self.o.delays[req.cmd.index()];
        if !d.is_zero() {
            std::thread::sleep(d);
        }
        req.pass(next)
    }

    fn may_block(&self, cmd: u16, next: bool) -> bool {
        // A delayed request sleeps: run it beside the others, not in turn.
        next || !self.of_cmd(cmd).is_zero()
    }

    fn io_threads(&self, next: usize) -> usize {
        // Even over a backend that never blocks (null), delayed requests
        // wait side by side rather than one after the other.
        next.max(4)
    }
}
