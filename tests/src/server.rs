//! A small test server for the VM scenarios, written against abuse-sys:
//! serves a device from a backing file, and records what it saw so that a
//! scenario can check which requests reached user space.
//!
//! Runs as `abuse-guest serve ...` in its own process, so scenarios can
//! kill, stop and restart servers.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abuse_sys::uapi::*;
use abuse_sys::Control;
use serde_json::json;

/// What a server saw, written as JSON to its stats file.
#[derive(Default)]
pub struct Stats {
    pub by_cmd: [AtomicU64; 5],
    pub fua: AtomicU64,
    pub nounmap: AtomicU64,
    pub requeued: AtomicU64,
    pub max_get: AtomicU64,
    pub max_put: AtomicU64,
    pub completed: AtomicU64,
    pub stale: AtomicU64,
    pub late_put: Mutex<Option<String>>,
}

impl Stats {
    fn to_json(&self) -> serde_json::Value {
        let c = |i: usize| self.by_cmd[i].load(Ordering::Relaxed);
        json!({
            "read": c(0), "write": c(1), "flush": c(2), "discard": c(3), "write_zeroes": c(4),
            "fua": self.fua.load(Ordering::Relaxed),
            "nounmap": self.nounmap.load(Ordering::Relaxed),
            "requeued": self.requeued.load(Ordering::Relaxed),
            "max_get": self.max_get.load(Ordering::Relaxed),
            "max_put": self.max_put.load(Ordering::Relaxed),
            "completed": self.completed.load(Ordering::Relaxed),
            "stale": self.stale.load(Ordering::Relaxed),
            "late_put": *self.late_put.lock().unwrap(),
        })
    }

    fn save(&self, path: &str) {
        let tmp = format!("{path}.tmp");
        if std::fs::write(&tmp, self.to_json().to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

/// `abuse-guest serve` options.
pub struct Opts {
    pub ctl: String,
    pub backing: String,
    pub stats: String,
    pub threads: usize,
    pub batch: usize,
    /// Fetch one batch, hold it this long without completing, then try to
    /// complete it (a late PUT) and exit.
    pub hold: Option<Duration>,
    /// Sleep this long before completing each batch (keeps requests in flight).
    pub delay: Duration,
}

impl Opts {
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = Opts {
            ctl: String::new(),
            backing: String::new(),
            stats: "/tmp/server-stats.json".into(),
            threads: 1,
            batch: 16,
            hold: None,
            delay: Duration::ZERO,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
            match a.as_str() {
                "--ctl" => o.ctl = val()?,
                "--backing" => o.backing = val()?,
                "--stats" => o.stats = val()?,
                "--threads" => o.threads = val()?.parse().map_err(|e| format!("--threads: {e}"))?,
                "--batch" => o.batch = val()?.parse().map_err(|e| format!("--batch: {e}"))?,
                "--hold-ms" => {
                    o.hold = Some(Duration::from_millis(
                        val()?.parse().map_err(|e| format!("{e}"))?,
                    ))
                }
                "--delay-ms" => {
                    o.delay = Duration::from_millis(val()?.parse().map_err(|e| format!("{e}"))?)
                }
                other => return Err(format!("unknown option {other}")),
            }
        }
        if o.ctl.is_empty() || o.backing.is_empty() {
            return Err("serve needs --ctl and --backing".into());
        }
        Ok(o)
    }
}

/// Page-aligned buffer for a batch's payloads.
fn buffer(batch: usize) -> Vec<u8> {
    vec![0u8; batch * (ABUSE_MAX_BIO_BYTES as usize + ABUSE_DATA_ALIGN as usize)]
}

/// Applies one request to the backing file; returns the PUT result.
fn handle(file: &File, bio: &AbuseBio, buf: &mut [u8], base: u64, stats: &Stats) -> u32 {
    let off = bio.sector << ABUSE_SECTOR_SHIFT;
    if let Some(c) = stats.by_cmd.get(bio.cmd as usize) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    for (flag, counter) in [
        (ABUSE_BIO_FUA, &stats.fua),
        (ABUSE_BIO_NOUNMAP, &stats.nounmap),
        (ABUSE_BIO_REQUEUED, &stats.requeued),
    ] {
        if bio.flags & flag != 0 {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
    // The kernel placed the payload at `addr`, inside `buf`.
    let start = bio.addr.wrapping_sub(base) as usize;
    let range = start..start.saturating_add(bio.len as usize);
    let ok = match bio.cmd {
        ABUSE_CMD_READ => buf
            .get_mut(range)
            .is_some_and(|d| file.read_exact_at(d, off).is_ok()),
        ABUSE_CMD_WRITE => buf
            .get(range)
            .is_some_and(|d| file.write_all_at(d, off).is_ok()),
        ABUSE_CMD_FLUSH => file.sync_data().is_ok(),
        ABUSE_CMD_DISCARD | ABUSE_CMD_WRITE_ZEROES => {
            let zeros = vec![0u8; bio.len as usize];
            file.write_all_at(&zeros, off).is_ok()
        }
        _ => false,
    };
    if ok {
        ABUSE_RESULT_OKAY
    } else {
        ABUSE_RESULT_MEDIA_FAILURE
    }
}

/// Runs the server until killed.
pub fn serve(o: Opts) -> Result<(), String> {
    let file = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&o.backing)
            .map_err(|e| format!("{}: {e}", o.backing))?,
    );
    let stats = Arc::new(Stats::default());
    stats.save(&o.stats);
    if let Some(hold) = o.hold {
        return hold_then_put(&o, &file, &stats, hold);
    }
    let mut workers = Vec::new();
    for _ in 0..o.threads {
        let (file, stats, ctl, stats_path, batch, delay) = (
            file.clone(),
            stats.clone(),
            o.ctl.clone(),
            o.stats.clone(),
            o.batch,
            o.delay,
        );
        workers.push(std::thread::spawn(move || -> Result<(), String> {
            let ctl = Control::open(&ctl).map_err(|e| e.to_string())?;
            let mut bios = vec![AbuseBio::default(); batch];
            let mut buf = buffer(batch);
            loop {
                let n = ctl
                    .get_bios(&mut bios, &mut buf)
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    ctl.poll(Some(Duration::from_millis(200)))
                        .map_err(|e| e.to_string())?;
                    continue;
                }
                stats.max_get.fetch_max(n as u64, Ordering::Relaxed);
                let base = buf.as_ptr() as u64;
                for bio in &mut bios[..n] {
                    bio.result = handle(&file, bio, &mut buf, base, &stats);
                }
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                // A PUT stops at the first stale entry (requeued by the
                // timeout and served by someone else): skip it, go on.
                let mut rest = &bios[..n];
                let mut done = 0;
                while !rest.is_empty() {
                    match ctl.put_bios(rest) {
                        Ok(k) => {
                            done += k;
                            break;
                        }
                        Err(e) if e.errno() == nix::errno::Errno::ESTALE => {
                            let k = match e {
                                abuse_sys::Error::Ioctl { done, .. } => done,
                                _ => 0,
                            };
                            done += k;
                            stats.stale.fetch_add(1, Ordering::Relaxed);
                            rest = &rest[k + 1..];
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                }
                stats.max_put.fetch_max(done as u64, Ordering::Relaxed);
                stats.completed.fetch_add(done as u64, Ordering::Relaxed);
                stats.save(&stats_path);
            }
        }));
    }
    for w in workers {
        w.join().map_err(|_| "worker panicked".to_string())??;
    }
    Ok(())
}

/// Fetches one batch, holds it, then tries to complete it and records how
/// the late PUT went.
fn hold_then_put(o: &Opts, file: &File, stats: &Stats, hold: Duration) -> Result<(), String> {
    let ctl = Control::open(&o.ctl).map_err(|e| e.to_string())?;
    let mut bios = vec![AbuseBio::default(); o.batch];
    let mut buf = buffer(o.batch);
    let n = loop {
        let n = ctl
            .get_bios(&mut bios, &mut buf)
            .map_err(|e| e.to_string())?;
        if n > 0 {
            break n;
        }
        ctl.poll(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
    };
    stats.max_get.store(n as u64, Ordering::Relaxed);
    stats.save(&o.stats);
    let until = Instant::now() + hold;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let base = buf.as_ptr() as u64;
    for bio in &mut bios[..n] {
        bio.result = handle(file, bio, &mut buf, base, stats);
    }
    let outcome = match ctl.put_bios(&bios[..n]) {
        Ok(done) => format!("ok {done}"),
        Err(e) => format!("{}", e.errno()),
    };
    *stats.late_put.lock().unwrap() = Some(outcome);
    stats.save(&o.stats);
    Ok(())
}
