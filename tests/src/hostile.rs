//! A hostile server for the VM scenarios of tests/src/scenarios/hostile.rs:
//! `abuse-guest hostile --ctl CTL [options]`, normally run as the user a
//! device is delegated to. It does what a buggy or malicious server might
//! (blocking files, files on the device itself, a buffer that faults on an
//! unserved device, forged errnos, a fetch held by a thread whose main
//! thread is gone or by a process that forked) and prints what happened,
//! one line per event with `key=value` fields, for the scenario to check:
//!
//! - `fetched id=0x.. cmd=N sector=N len=N flags=N bio=ID:CMD:SECTOR:LEN:FLAGS`
//!   for every request it fetched (descriptors only);
//! - `target ...` (same fields): the request it goes on with;
//! - `refuse spec=SPEC errno=E in_flight=A->B` for each `--refuse`;
//! - `moving id=..` then `moved errno=E` for `--move`;
//! - `child pid=N` (from the child), `holding`, `main-exited`;
//! - `get` then `got errno=E` or `got fetched=N` for `--mmap`;
//! - `failed id=.. cmd=N errno=N put=E` for each `--fail-errnos` entry;
//! - `put ok busy=N` or `put errno=E busy=N` for `--answer-when-told`;
//! - `error MESSAGE` when it could not do what it was asked (exit 1).
//!
//! `E` is `ok` or the errno's name (`EINVAL`, ...). A file SPEC is `pipe`,
//! `socket`, `fifo:PATH` (opened read-write), `direct:PATH` (O_DIRECT) or a
//! PATH, opened for the request's direction.

use std::io::BufRead;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use abuse_sys::uapi::*;
use abuse_sys::{AbuseBio, Control};
use nix::errno::Errno;
use nix::libc;

/// How long it waits for a request to fetch.
const FETCH_WAIT: Duration = Duration::from_secs(15);

/// `abuse-guest hostile` options.
#[derive(Default)]
struct Opts {
    ctl: String,
    /// A request another process fetched (learned from it): moved or
    /// refused without fetching anything.
    bio: Option<AbuseBio>,
    /// Fetch until a request covering this sector comes (else the first).
    want_sector: Option<u64>,
    refuse: Vec<String>,
    mover: Option<String>,
    mmap: Option<String>,
    fail_errnos: Vec<u32>,
    in_thread: bool,
    fork: bool,
    hold: bool,
    /// Answer the (READ) request with `pattern(seed)` once told `put`.
    answer_seed: Option<u64>,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--ctl" => o.ctl = val()?,
            "--bio" => o.bio = Some(parse_bio(&val()?)?),
            "--want-sector" => {
                o.want_sector = Some(val()?.parse().map_err(|e| format!("{a}: {e}"))?)
            }
            "--refuse" => o.refuse.push(val()?),
            "--move" => o.mover = Some(val()?),
            "--mmap" => o.mmap = Some(val()?),
            "--fail-errnos" => {
                for e in val()?.split(',') {
                    o.fail_errnos
                        .push(e.parse().map_err(|e| format!("{a}: {e}"))?);
                }
            }
            "--in-thread" => o.in_thread = true,
            "--fork" => o.fork = true,
            "--hold" => o.hold = true,
            "--answer-when-told" => {
                o.answer_seed = Some(val()?.parse().map_err(|e| format!("{a}: {e}"))?)
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if o.ctl.is_empty() {
        return Err("hostile needs --ctl".into());
    }
    Ok(o)
}

/// `ID:CMD:SECTOR:LEN:FLAGS`, as a `fetched` line's `bio=` field gives it.
fn parse_bio(s: &str) -> Result<AbuseBio, String> {
    let f: Vec<&str> = s.split(':').collect();
    let bad = || format!("--bio {s}: want ID:CMD:SECTOR:LEN:FLAGS");
    if f.len() != 5 {
        return Err(bad());
    }
    let id = u64::from_str_radix(f[0].trim_start_matches("0x"), 16).map_err(|_| bad())?;
    Ok(AbuseBio {
        id,
        cmd: f[1].parse().map_err(|_| bad())?,
        sector: f[2].parse().map_err(|_| bad())?,
        len: f[3].parse().map_err(|_| bad())?,
        flags: f[4].parse().map_err(|_| bad())?,
        ..Default::default()
    })
}

/// A request's fields, as printed.
pub fn describe(b: &AbuseBio) -> String {
    format!(
        "id={:#x} cmd={} sector={} len={} flags={} bio={:#x}:{}:{}:{}:{}",
        b.id, b.cmd, b.sector, b.len, b.flags, b.id, b.cmd, b.sector, b.len, b.flags
    )
}

/// An ioctl's outcome, as printed: `ok` or the errno's name.
fn outcome<T>(r: &abuse_sys::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("{:?}", e.errno()),
    }
}

/// Runs `abuse-guest hostile ARGS`; the process's exit code.
pub fn main(args: &[String]) -> i32 {
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            println!("error {e}");
            1
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let ctl = Control::open(&o.ctl).map_err(|e| e.to_string())?;
    if let Some(dev) = &o.mmap {
        return get_into_mapping(&ctl, dev);
    }
    if !o.fail_errnos.is_empty() {
        return fail_with(&ctl, &o.fail_errnos);
    }
    if o.in_thread {
        fetch_in_thread_and_exit_main(ctl);
    }
    let bio = match o.bio {
        Some(b) => b,
        None => fetch(&ctl, o.want_sector, 16)?,
    };
    println!("target {}", describe(&bio));
    for spec in &o.refuse {
        let before = in_flight(&ctl)?;
        let r = put_file(&ctl, &bio, spec);
        let after = in_flight(&ctl)?;
        println!(
            "refuse spec={spec} errno={} in_flight={before}->{after}",
            r.unwrap_or_else(|e| format!("open failed: {e}"))
        );
    }
    if o.fork {
        fork_keeping_the_file()?;
    }
    if let Some(seed) = o.answer_seed {
        return answer_when_told(&ctl, &bio, seed);
    }
    if let Some(spec) = &o.mover {
        println!("moving id={:#x}", bio.id);
        let r = put_file(&ctl, &bio, spec);
        println!(
            "moved errno={}",
            r.unwrap_or_else(|e| format!("open failed: {e}"))
        );
    }
    if o.hold {
        println!("holding");
        sleep_forever();
    }
    Ok(())
}

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn in_flight(ctl: &Control) -> Result<u32, String> {
    ctl.status().map(|s| s.in_flight).map_err(|e| e.to_string())
}

/// Fetches (descriptors only, up to `batch` at a time) until a request
/// covering `sector` comes (or any, with None), printing every one; the
/// others stay fetched.
fn fetch(ctl: &Control, sector: Option<u64>, batch: usize) -> Result<AbuseBio, String> {
    let deadline = Instant::now() + FETCH_WAIT;
    let mut bios = [AbuseBio::default(); 16];
    loop {
        let n = ctl
            .get_descriptors(&mut bios[..batch.min(16)])
            .map_err(|e| e.to_string())?;
        let mut found = None;
        for b in &bios[..n] {
            println!("fetched {}", describe(b));
            let covers = |s: u64| {
                b.sector <= s && s < b.sector + (u64::from(b.len) >> ABUSE_SECTOR_SHIFT).max(1)
            };
            if found.is_none() && sector.is_none_or(covers) {
                found = Some(*b);
            }
        }
        if let Some(b) = found {
            return Ok(b);
        }
        if Instant::now() >= deadline {
            return Err(format!("no request to fetch within {FETCH_WAIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Opens a file SPEC for a request's direction; the first fd is the one to
/// name (the others keep a pipe's or socket's other end open).
fn open_spec(spec: &str, write: bool) -> Result<Vec<OwnedFd>, String> {
    let pair = |r: i32, fds: [i32; 2]| -> Result<Vec<OwnedFd>, String> {
        if r != 0 {
            return Err(format!("{spec}: {}", Errno::last()));
        }
        // SAFETY: pipe2/socketpair just returned these two descriptors,
        // which nothing else owns.
        Ok(fds
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect())
    };
    let open = |path: &str, read: bool, write: bool, flags: i32| {
        std::fs::OpenOptions::new()
            .read(read)
            .write(write)
            .custom_flags(flags)
            .open(path)
            .map(|f| vec![OwnedFd::from(f)])
            .map_err(|e| format!("{path}: {e}"))
    };
    match spec.split_once(':') {
        _ if spec == "pipe" => {
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for the two descriptors pipe2 writes.
            let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
            let mut v = pair(r, fds)?;
            // fds[0] reads, fds[1] writes: the one for the direction first.
            if write {
                v.swap(0, 1);
            }
            Ok(v)
        }
        _ if spec == "socket" => {
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for the two descriptors socketpair writes.
            let r = unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            };
            pair(r, fds)
        }
        // Read-write: the open does not wait for the other end.
        Some(("fifo", path)) => open(path, true, true, 0),
        Some(("direct", path)) => open(path, !write, write, libc::O_DIRECT),
        _ => open(spec, !write, write, 0),
    }
}

/// PUTs `bio` as done, its data moved by the driver to or from the file
/// SPEC (ABUSE_BIO_FILE, at offset 0): the PUT's outcome, or why the file
/// could not be opened.
fn put_file(ctl: &Control, bio: &AbuseBio, spec: &str) -> Result<String, String> {
    let fds = open_spec(spec, bio.cmd == ABUSE_CMD_WRITE)?;
    let b = AbuseBio {
        flags: bio.flags | ABUSE_BIO_FILE,
        error: fds[0].as_raw_fd() as u32,
        addr: 0,
        result: ABUSE_RESULT_OKAY,
        ..*bio
    };
    let r = ctl.put_bios(&[b]);
    drop(fds);
    Ok(outcome(&r))
}

/// Fetches in a second thread, which then holds the request; the main
/// thread exits once it has (the process lives on in that thread).
fn fetch_in_thread_and_exit_main(ctl: Control) -> ! {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = fetch(&ctl, None, 1);
        if let Ok(b) = &r {
            println!("target {}", describe(b));
        }
        let _ = tx.send(r.map(|_| ()));
        sleep_forever();
    });
    match rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            println!("error {e}");
            std::process::exit(1);
        }
        Err(_) => std::process::exit(1),
    }
    println!("main-exited");
    // The main thread alone exits: the exit system call pthread_exit()
    // ends with. (pthread_exit itself unwinds the caller's frames, and
    // unwinding out of Rust's main aborts the process.)
    // SAFETY: SYS_exit ends this thread only; nothing of it is used after.
    unsafe { libc::syscall(libc::SYS_exit, 0) };
    unreachable!("SYS_exit returned");
}

/// Forks a child (a process of its own, not a thread) that keeps every
/// descriptor, the control file among them, and sleeps.
fn fork_keeping_the_file() -> Result<(), String> {
    // SAFETY: this process has one thread here, so the child may run
    // anything; it only prints and sleeps.
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", Errno::last())),
        0 => {
            println!("child pid={}", std::process::id());
            sleep_forever();
        }
        child => {
            println!("forked child={child}");
            Ok(())
        }
    }
}

/// Holds the request until a `put` line comes on stdin, then completes it
/// (a READ with `pattern(seed)`), retrying while it is busy (EBUSY: another
/// process is moving it); then waits for stdin to close.
fn answer_when_told(ctl: &Control, bio: &AbuseBio, seed: u64) -> Result<(), String> {
    println!("holding id={:#x}", bio.id);
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        let n = stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("stdin closed before `put`".into());
        }
        if line.trim() == "put" {
            break;
        }
    }
    let data = crate::guest::pattern(seed, bio.len as usize);
    let b = AbuseBio {
        result: ABUSE_RESULT_OKAY,
        addr: if bio.cmd == ABUSE_CMD_READ {
            data.as_ptr() as u64
        } else {
            0
        },
        ..*bio
    };
    let start = Instant::now();
    let mut busy = 0;
    loop {
        let r = ctl.put_bios(&[b]);
        match &r {
            Err(e) if e.errno() == Errno::EBUSY && start.elapsed() < FETCH_WAIT => {
                busy += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {
                match r {
                    Ok(_) => println!("put ok busy={busy}"),
                    Err(e) => println!("put errno={:?} busy={busy}", e.errno()),
                }
                break;
            }
        }
    }
    while stdin.lock().read_line(&mut line).is_ok_and(|n| n > 0) {}
    Ok(())
}

/// GET_BIO with the data buffer a shared mapping of `dev` (a block device
/// with no server: the copy faults, and faulting the page in waits for
/// that device); prints what the call returned.
fn get_into_mapping(ctl: &Control, dev: &str) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| format!("{dev}: {e}"))?;
    let len = 1 << 20;
    // SAFETY: a fresh shared mapping of an open file; unmapped below, and
    // nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap {dev}: {}", Errno::last()));
    }
    // SAFETY: `p` maps `len` bytes, readable and writable, until munmap.
    let buf = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) };
    let mut bios = [AbuseBio::default(); 1];
    println!("get");
    match ctl.get_bios(&mut bios, buf) {
        // get_bios reports ENOMSG (nothing fetched) as 0.
        Ok(0) => println!("got errno=ENOMSG"),
        Ok(n) => {
            println!("got fetched={n}");
            for b in &bios[..n] {
                println!("fetched {}", describe(b));
            }
        }
        Err(e) => println!("got errno={:?}", e.errno()),
    }
    // SAFETY: the mapping made above, no longer referred to.
    unsafe { libc::munmap(p, len) };
    Ok(())
}

/// Fetches requests one at a time and fails the k-th with `errnos[k]`.
fn fail_with(ctl: &Control, errnos: &[u32]) -> Result<(), String> {
    for &e in errnos {
        let b = fetch(ctl, None, 1)?;
        let failed = AbuseBio {
            result: ABUSE_RESULT_MEDIA_FAILURE,
            flags: b.flags | ABUSE_BIO_ERRNO,
            error: e,
            ..b
        };
        let r = ctl.put_bios(&[failed]);
        println!(
            "failed id={:#x} cmd={} errno={e} put={}",
            b.id,
            b.cmd,
            outcome(&r)
        );
    }
    Ok(())
}
