//! The filters (`--filter`), each over a small in-memory backend: what
//! each does, that they forward every trait method, that they compose in
//! command-line order, and that malformed specs are refused clearly.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abuse_servers::backend::{Backend, ALL_FEATURES};
use abuse_servers::filter::error::Error as ErrorFilter;
use abuse_servers::filter::flaky::Flaky;
use abuse_servers::filter::{wrap, wrap_shared, FilterSpec, Filtered, Kind};
use abuse_sys::uapi::*;

const SIZE: u64 = 1 << 20;

/// A backend in memory that counts what reaches it.
#[derive(Default)]
struct Mem {
    data: Mutex<Vec<u8>>,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    zeroes: AtomicU64,
    stops: AtomicU64,
    features: u32,
}

impl Mem {
    fn new() -> Arc<Mem> {
        Arc::new(Mem {
            data: Mutex::new(vec![0; SIZE as usize]),
            features: ALL_FEATURES,
            ..Default::default()
        })
    }

    fn byte(&self, at: u64) -> u8 {
        self.data.lock().unwrap()[at as usize]
    }
}

impl Backend for Mem {
    fn size(&self) -> u64 {
        SIZE
    }
    fn features(&self) -> u32 {
        self.features
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, buf: &[u8], _fua: bool) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.discards.fetch_add(1, Ordering::Relaxed);
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.zeroes.fetch_add(1, Ordering::Relaxed);
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn io_threads(&self) -> usize {
        3
    }
    fn check_block_size(&self, block_size: u32) -> io::Result<()> {
        if block_size == 512 {
            return Err(io::Error::other("no 512"));
        }
        Ok(())
    }
    fn stop(&self) -> io::Result<()> {
        self.stops.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn spec(s: &str) -> FilterSpec {
    FilterSpec::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// `mem` through the filters `specs` (the first outermost).
fn stack(mem: &Arc<Mem>, specs: &[&str]) -> Arc<dyn Backend> {
    let specs: Vec<FilterSpec> = specs.iter().map(|s| spec(s)).collect();
    wrap_shared(mem.clone(), &specs).unwrap()
}

fn errno(r: io::Result<()>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error().expect("an errno"))
}

#[test]
fn malformed_specs_are_refused_with_a_reason() {
    for (bad, says) in [
        ("", "no filter name"),
        (":read=1ms", "no filter name"),
        ("nosuch", "unknown filter 'nosuch' (filters: delay, error"),
        ("delay", "delays nothing"),
        ("delay:read", "read needs a value (read=10ms)"),
        ("delay:read=", "read= needs a value"),
        ("delay:read=fast", "read=fast: not a duration"),
        ("delay:read=10parsecs", "unknown unit 'parsecs'"),
        (
            "delay:reed=10ms",
            "unknown option 'reed=10ms' (options: read=DUR",
        ),
        ("delay:read=1ms,,write=1ms", "an empty option"),
        ("delay:read=1ms,read=2ms", "read given twice"),
        ("delay:=1ms", "no key before '='"),
        ("error:rate=5", "rate=5: not a percentage"),
        ("error:rate=101%", "not a percentage from 0% to 100%"),
        ("error:rate", "rate needs a value (rate=1%)"),
        ("error:errno=EPERM", "errno=EPERM: not one of EIO, ENOSPC"),
        ("error:after=-1", "after=-1: not a whole number"),
        ("error:sectors=10", "not a range of sectors A-B"),
        ("error:sectors=9-3", "a range from low to high"),
        ("error:write=1", "a command is named bare"),
        ("error:writes", "unknown option 'writes'"),
        ("flaky:up=1s", "needs both up= and down="),
        ("flaky:up=1s,down=0", "down=0"),
        (
            "flaky:up=1s,down=1s,mode=maybe",
            "mode=maybe: not drop or fail",
        ),
        ("log", "needs file=PATH"),
        (
            "log:path=/tmp/x",
            "unknown option 'path=/tmp/x' (options: file=PATH)",
        ),
        ("rate", "limits nothing"),
        ("rate:iops=0", "a rate of 0"),
        ("rate:bw=10Q", "bw=10Q: not a number of bytes"),
        ("rate:iops=fast", "iops=fast: not a whole number"),
        ("readonly:yes", "takes no options"),
    ] {
        let e = FilterSpec::parse(bad).expect_err(bad);
        assert!(e.contains(says), "{bad:?}: said {e:?}, not {says:?}");
    }
    // Where the filter is known, the error shows its usage.
    let e = FilterSpec::parse("error:errno=EPERM").unwrap_err();
    assert!(e.contains("(usage: error:"), "{e}");
}

#[test]
fn specs_parse() {
    let s = spec("delay:read=10ms,write=1.5s,flush=2,discard=500us");
    let Kind::Delay(d) = &s.kind else {
        panic!("{s:?}")
    };
    assert_eq!(d.delays[0], Duration::from_millis(10));
    assert_eq!(d.delays[1], Duration::from_millis(1500));
    assert_eq!(d.delays[2], Duration::from_secs(2));
    assert_eq!(d.delays[3], Duration::from_micros(500));
    assert_eq!(d.delays[4], Duration::ZERO);
    let s = spec("error:write,rate=1%,errno=ENOSPC,seed=7,after=3,sectors=8-15");
    let Kind::Error(e) = &s.kind else {
        panic!("{s:?}")
    };
    assert_eq!(e.cmds, [false, true, false, false, false]);
    assert!((e.rate - 0.01).abs() < 1e-12);
    assert_eq!((e.seed, e.after, e.sectors), (7, 3, Some((8, 15))));
    assert_eq!(e.errno, nix::errno::Errno::ENOSPC);
    // errno names in any case; every command by default.
    let Kind::Error(e) = spec("error:errno=etimedout").kind else {
        panic!()
    };
    assert_eq!(
        (e.errno, e.cmds, e.rate),
        (nix::errno::Errno::ETIMEDOUT, [true; 5], 1.0)
    );
    let Kind::Rate(r) = spec("rate:iops=200,bw=10M").kind else {
        panic!()
    };
    assert_eq!((r.iops, r.bw), (Some(200), Some(10 << 20)));
    assert_eq!(spec("readonly").kind, Kind::Readonly);
    // As clap parses it.
    let s: FilterSpec = "flaky:up=1s,down=500ms,mode=fail".parse().unwrap();
    assert_eq!(s.text, "flaky:up=1s,down=500ms,mode=fail");
}

#[test]
fn every_method_is_forwarded() {
    let mem = Mem::new();
    // Every filter, so that none forgets one.
    let log = tempfile::NamedTempFile::new().unwrap();
    let all = [
        "delay:flush=1ms".to_string(),
        "error:read,rate=0%".into(),
        "flaky:up=1h,down=1s".into(),
        format!("log:file={}", log.path().display()),
        "rate:iops=1000000".into(),
    ];
    let specs: Vec<&str> = all.iter().map(String::as_str).collect();
    let b = stack(&mem, &specs);
    assert_eq!(b.size(), SIZE);
    assert_eq!(b.features(), ALL_FEATURES);
    assert!(!b.read_only());
    assert!(b.check_block_size(4096).is_ok());
    assert!(
        b.check_block_size(512).is_err(),
        "check_block_size not forwarded"
    );
    assert!(b.io_threads() >= 3);
    b.write(4096, &[7; 4096], true).unwrap();
    let mut buf = vec![0; 4096];
    b.read(4096, &mut buf).unwrap();
    assert_eq!(buf, vec![7; 4096]);
    assert!(!b.read_or_hole(4096, &mut buf).unwrap());
    b.flush().unwrap();
    b.discard(0, 4096).unwrap();
    b.write_zeroes(4096, 4096, false).unwrap();
    assert_eq!(mem.byte(4096), 0);
    b.stop().unwrap();
    assert_eq!(mem.reads.load(Ordering::Relaxed), 2);
    assert_eq!(mem.writes.load(Ordering::Relaxed), 1);
    assert_eq!(
        mem.flushes.load(Ordering::Relaxed),
        1,
        "flush not forwarded"
    );
    assert_eq!(mem.discards.load(Ordering::Relaxed), 1);
    assert_eq!(mem.zeroes.load(Ordering::Relaxed), 2);
    assert_eq!(mem.stops.load(Ordering::Relaxed), 1, "stop not forwarded");
    // A feature the backend lacks stays lacking.
    let partial = Arc::new(Mem {
        data: Mutex::new(vec![0; SIZE as usize]),
        features: ABUSE_FLAG_FLUSH,
        ..Default::default()
    });
    assert_eq!(stack(&partial, &specs).features(), ABUSE_FLAG_FLUSH);
    // Boxed, as `wrap` takes it.
    let boxed = wrap(
        Box::new(abuse_servers::null::Null::new(SIZE)),
        &[spec("readonly")],
    )
    .unwrap();
    assert!(boxed.read_only());
    let unfiltered = wrap(Box::new(abuse_servers::null::Null::new(SIZE)), &[]).unwrap();
    assert!(
        !unfiltered.needs_payloads(),
        "no filters: the backend itself"
    );
}

#[test]
fn holes_pass_through_and_payloads_are_asked_for() {
    // null answers every READ as a hole; through a filter it still does,
    // but the filter asks for payloads, so that it sees real lengths.
    let null: Arc<dyn Backend> = Arc::new(abuse_servers::null::Null::new(SIZE));
    let b = wrap_shared(null, &[spec("delay:write=1ms")]).unwrap();
    let mut buf = vec![1; 512];
    assert!(b.read_or_hole(0, &mut buf).unwrap());
    assert!(b.needs_payloads());
}

#[test]
fn the_kernel_never_moves_data_past_a_filter() {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(SIZE).unwrap();
    let file = abuse_servers::file::FileBackend::open(
        f.path(),
        abuse_servers::file::FileOptions {
            read_only: false,
            direct: false,
        },
    )
    .unwrap();
    assert!(file.data_file().is_some());
    let b = wrap_shared(Arc::new(file), &[spec("error:write,rate=0%")]).unwrap();
    assert!(b.data_file().is_none());
    assert!(b.moved_files().is_empty());
    assert!(b.read_from_file(0, 4096).is_none());
    assert!(b.write_to_file(0, 4096).is_none());
    // It still reads and writes the file.
    b.write(8192, &[9; 512], false).unwrap();
    let mut buf = [0; 512];
    b.read(8192, &mut buf).unwrap();
    assert_eq!(buf, [9; 512]);
}

#[test]
fn delay_delays_what_it_names() {
    let mem = Mem::new();
    let b = stack(&mem, &["delay:read=60ms,flush=30ms"]);
    let mut buf = [0; 512];
    let t = Instant::now();
    b.read(0, &mut buf).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(60),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    b.flush().unwrap();
    let flush = t.elapsed();
    assert!(flush >= Duration::from_millis(30), "{flush:?}");
    let t = Instant::now();
    b.write(0, &buf, false).unwrap();
    assert!(t.elapsed() < Duration::from_millis(30), "{:?}", t.elapsed());
    // It blocks: requests run on the I/O threads, side by side.
    assert!(b.may_block(ABUSE_CMD_READ, 0, 512, false));
    assert!(b.io_threads() >= 4);
}

#[test]
fn error_rate_is_seeded_and_within_tolerance() {
    let run = |seed: u64| {
        let mem = Mem::new();
        let b = stack(&mem, &[&format!("error:read,rate=10%,seed={seed}")]);
        let mut buf = [0; 512];
        let fails: Vec<bool> = (0..10_000)
            .map(|i| b.read((i % 2048) * 512, &mut buf).is_err())
            .collect();
        // Writes are not named: they all pass.
        for i in 0..100 {
            b.write(i * 512, &buf, false).unwrap();
        }
        assert_eq!(mem.writes.load(Ordering::Relaxed), 100);
        fails
    };
    let a = run(1);
    let n = a.iter().filter(|&&f| f).count();
    assert!((900..=1100).contains(&n), "10% of 10000 failed {n} times");
    assert_eq!(a, run(1), "the same seed fails the same requests");
    assert_ne!(a, run(2), "another seed fails others");
    // 0% and 100%.
    let mem = Mem::new();
    let mut buf = [0; 512];
    let none = stack(&mem, &["error:rate=0%"]);
    assert!((0..1000).all(|_| none.read(0, &mut buf).is_ok()));
    let all = stack(&mem, &["error"]);
    assert!((0..1000).all(|_| all.read(0, &mut buf).is_err()));
    assert_eq!(errno(all.flush()), Some(nix::libc::EIO));
}

#[test]
fn error_errno_after_and_sectors() {
    let mem = Mem::new();
    let buf = [5; 1024];
    // after=N: exactly the first N matching requests pass.
    let b = stack(&mem, &["error:write,after=7,errno=ENOSPC"]);
    let mut results = Vec::new();
    for i in 0..20 {
        results.push(errno(b.write(i * 1024, &buf, false)));
        // Reads do not match, and do not count.
        b.read(0, &mut [0; 512]).unwrap();
    }
    assert!(results[..7].iter().all(Option::is_none), "{results:?}");
    assert!(
        results[7..].iter().all(|e| *e == Some(nix::libc::ENOSPC)),
        "{results:?}"
    );
    assert_eq!(mem.writes.load(Ordering::Relaxed), 7);
    // What the engine hands the kernel: the errno itself.
    let e = b.write(0, &buf, false).unwrap_err();
    assert_eq!(
        abuse_servers::engine::errno_of(&e),
        nix::libc::ENOSPC,
        "{e}"
    );
    // sectors=A-B: requests touching sectors 16..=23 fail, others pass.
    let b = stack(&mem, &["error:sectors=16-23,errno=ENODATA"]);
    let mut r = [0; 1024];
    for (offset, len, fails) in [
        (0, 1024, false),
        (7 * 1024, 1024, false),      // sectors 14-15
        (7 * 1024, 1536, true),       // 14-16
        (8 * 1024, 512, true),        // 16
        (11 * 1024 + 512, 512, true), // 23
        (12 * 1024, 1024, false),     // 24-25
        (4096, 16384, true),          // 8-39: covers the whole range
    ] {
        let got = errno(b.read(offset, &mut r[..len.min(1024)]).and(b.write(
            offset,
            &vec![1; len],
            false,
        )));
        assert_eq!(
            got,
            fails.then_some(nix::libc::ENODATA),
            "offset {offset} len {len}"
        );
    }
    // A FLUSH has no range: it never matches sectors=.
    b.flush().unwrap();
    b.discard(8 * 1024, 512).unwrap_err();
    b.discard(0, 512).unwrap();
}

#[test]
fn error_counts_what_it_injected() {
    let mem = Mem::new();
    let f = Filtered::new(
        ErrorFilter::new(match spec("error:write,rate=50%,seed=3").kind {
            Kind::Error(o) => o,
            _ => unreachable!(),
        }),
        mem.clone(),
    );
    let failed = (0..1000)
        .filter(|i| f.write(i * 512, &[1; 512], false).is_err())
        .count();
    assert_eq!(f.filter().injected(), failed as u64);
    assert_eq!(mem.writes.load(Ordering::Relaxed), 1000 - failed as u64);
    assert!((400..=600).contains(&failed), "{failed}");
}

fn flaky(mem: &Arc<Mem>, s: &str) -> Filtered<Flaky> {
    let Kind::Flaky(o) = spec(s).kind else {
        unreachable!()
    };
    Filtered::new(Flaky::new(o), mem.clone())
}

/// Waits until the flaky filter is `down` (or up), then a little more.
fn until(f: &Filtered<Flaky>, down: bool) {
    let t = Instant::now();
    while f.filter().is_down() != down {
        assert!(t.elapsed() < Duration::from_secs(5), "never {down}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn flaky_drops_writes_while_down() {
    let mem = Mem::new();
    let f = flaky(&mem, "flaky:up=150ms,down=150ms");
    let mut checked = [0; 2];
    // Two periods: while up writes land; while down they are acknowledged
    // and dropped; reads pass always.
    for round in 0..2u8 {
        for down in [false, true] {
            until(&f, down);
            let at = (round as u64 * 2 + down as u64) * 512;
            let val = 10 + round * 2 + down as u8;
            let was = f.filter().is_down();
            f.write(at, &[val; 512], false).unwrap();
            f.discard(SIZE - 512, 512).unwrap();
            let mut buf = [0; 512];
            f.read(at, &mut buf).unwrap();
            if f.filter().is_down() != was {
                continue; // the phase turned meanwhile: no verdict
            }
            let want = if was { 0 } else { val };
            assert_eq!(buf[0], want, "round {round}, down {was}");
            assert_eq!(mem.byte(at), want);
            checked[was as usize] += 1;
        }
    }
    assert!(checked[0] > 0 && checked[1] > 0, "{checked:?}");
    assert!(f.filter().dropped() >= 2, "{}", f.filter().dropped());
    assert_eq!(f.filter().failed(), 0);
    f.flush().unwrap();
}

#[test]
fn flaky_fails_writes_while_down_with_mode_fail() {
    let mem = Mem::new();
    let f = flaky(&mem, "flaky:up=100ms,down=200ms,mode=fail");
    until(&f, false);
    let before = f.filter().is_down();
    let up = f.write(0, &[1; 512], false);
    if !before && !f.filter().is_down() {
        up.unwrap();
    }
    until(&f, true);
    let r = f.write_zeroes(0, 512, false);
    if f.filter().is_down() {
        assert_eq!(errno(r), Some(nix::libc::EIO));
        assert!(f.filter().failed() >= 1);
    }
    // Reads pass while down.
    let mut buf = [0; 512];
    f.read(0, &mut buf).unwrap();
    until(&f, false);
    f.write(512, &[2; 512], false).unwrap();
    assert_eq!(mem.byte(512), 2);
    assert_eq!(f.filter().dropped(), 0);
}

#[test]
fn log_writes_a_line_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("requests.log");
    let mem = Mem::new();
    let b = stack(
        &mem,
        &[
            &format!("log:file={}", path.display()),
            "error:discard,errno=EOPNOTSUPP",
        ],
    );
    b.write(4096, &[1; 8192], true).unwrap();
    b.read(0, &mut [0; 4096]).unwrap();
    b.flush().unwrap();
    b.discard(0, 4096).unwrap_err();
    b.write_zeroes(0, 4096, true).unwrap();
    b.stop().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    let rest: Vec<String> = lines
        .iter()
        .map(|l| {
            let (time, rest) = l.split_once(' ').unwrap();
            // 2025-06-01T12:00:00.123456Z
            assert_eq!(time.len(), 27, "{l}");
            assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{l}");
            let (what, took) = rest.rsplit_once(' ').unwrap();
            assert!(took.ends_with("ms"), "{l}");
            what.to_string()
        })
        .collect();
    assert_eq!(
        rest,
        [
            "WRITE offset=4096 len=8192 fua ok",
            "READ offset=0 len=4096 ok",
            "FLUSH offset=0 len=0 ok",
            "DISCARD offset=0 len=4096 error=EOPNOTSUPP",
            "WRITE_ZEROES offset=0 len=4096 unmap ok",
        ]
    );
    // The year is now's.
    let year: i32 = lines[0][..4].parse().unwrap();
    assert!((2024..2100).contains(&year), "{}", lines[0]);
}

#[test]
fn log_time_is_utc() {
    use std::time::UNIX_EPOCH;
    let utc = abuse_servers::filter::log::utc;
    assert_eq!(utc(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
    assert_eq!(
        utc(UNIX_EPOCH + Duration::from_micros(951_782_400_000_001)),
        "2000-02-29T00:00:00.000001Z"
    );
    assert_eq!(
        utc(UNIX_EPOCH + Duration::from_secs(1_735_689_599)),
        "2024-12-31T23:59:59.000000Z"
    );
}

#[test]
fn composition_follows_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let lines = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let mem = Mem::new();
    // log first: it is outermost, so it sees the error the next injects.
    let outer = dir.path().join("outer.log");
    let b = stack(
        &mem,
        &[&format!("log:file={}", outer.display()), "error:write"],
    );
    b.write(0, &[1; 512], false).unwrap_err();
    b.read(0, &mut [0; 512]).unwrap();
    let l = lines(&outer);
    assert_eq!(l.len(), 2, "{l:?}");
    assert!(
        l[0].contains("WRITE") && l[0].contains("error=EIO"),
        "{l:?}"
    );
    // error first: the failed write never reaches the log.
    let inner = dir.path().join("inner.log");
    let b = stack(
        &mem,
        &["error:write", &format!("log:file={}", inner.display())],
    );
    b.write(0, &[1; 512], false).unwrap_err();
    b.read(0, &mut [0; 512]).unwrap();
    let l = lines(&inner);
    assert_eq!(l.len(), 1, "{l:?}");
    assert!(l[0].contains("READ") && l[0].contains(" ok "), "{l:?}");
    // readonly outside flaky: writes fail with EROFS, never dropped.
    let b = stack(&mem, &["readonly", "flaky:up=0s,down=1h"]);
    assert_eq!(errno(b.write(0, &[1; 512], false)), Some(nix::libc::EROFS));
    // flaky outside readonly: dropped before they are refused.
    let b = stack(&mem, &["flaky:up=0s,down=1h", "readonly"]);
    b.write(0, &[1; 512], false).unwrap();
    // Both read-only either way.
    assert!(b.read_only());
}

#[test]
fn readonly_refuses_writes() {
    let mem = Mem::new();
    let b = stack(&mem, &["readonly"]);
    assert!(b.read_only());
    assert_eq!(b.features(), ALL_FEATURES);
    assert_eq!(errno(b.write(0, &[1; 512], false)), Some(nix::libc::EROFS));
    assert_eq!(errno(b.discard(0, 512)), Some(nix::libc::EROFS));
    assert_eq!(errno(b.write_zeroes(0, 512, true)), Some(nix::libc::EROFS));
    // As the engine maps it.
    let e = b.write(0, &[1; 512], false).unwrap_err();
    assert_eq!(abuse_servers::engine::errno_of(&e), nix::libc::EROFS);
    b.read(0, &mut [0; 512]).unwrap();
    b.flush().unwrap();
    assert_eq!(mem.writes.load(Ordering::Relaxed), 0);
    assert_eq!(mem.discards.load(Ordering::Relaxed), 0);
    assert_eq!(mem.flushes.load(Ordering::Relaxed), 1);
}

/// Runs `threads` threads of requests through `b` for `secs`; how many
/// completed.
fn hammer(b: &Arc<dyn Backend>, threads: usize, len: usize, secs: f64) -> u64 {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = Duration::from_secs_f64(secs);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (b, done) = (b.clone(), done.clone());
            s.spawn(move || {
                let mut buf = vec![0; len];
                let mut i = t as u64;
                while start.elapsed() < until {
                    b.read((i * len as u64) % (SIZE - len as u64), &mut buf)
                        .unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                    i += threads as u64;
                }
            });
        }
    });
    done.load(Ordering::Relaxed)
}

#[test]
fn rate_limits_iops_across_threads() {
    let mem = Mem::new();
    let b = stack(&mem, &["rate:iops=300"]);
    let n = hammer(&b, 4, 512, 1.0);
    // 300 in a second (each thread may finish one more after the second).
    assert!((270..=334).contains(&n), "iops=300 did {n} in 1 s");
    // FLUSH is not counted.
    let t = Instant::now();
    for _ in 0..100 {
        b.flush().unwrap();
    }
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn rate_limits_bandwidth_across_threads() {
    let mem = Mem::new();
    let b = stack(&mem, &["rate:bw=4M"]);
    let n = hammer(&b, 3, 65536, 1.0);
    // 4 MiB a second of 64 KiB reads: 64 (+ a burst of 2, + 3 finishing).
    assert!((58..=72).contains(&n), "bw=4M did {n} 64k reads in 1 s");
    // Both limits: the tighter holds.
    let b = stack(&mem, &["rate:iops=1000,bw=1M"]);
    let n = hammer(&b, 2, 65536, 1.0);
    assert!((14..=22).contains(&n), "bw=1M did {n} 64k reads in 1 s");
}
