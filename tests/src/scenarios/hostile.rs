//! A hostile server (design: "The server is untrusted"): an unprivileged
//! user's program, serving the device delegated to it, that does whatever
//! it likes. Whatever it does, RESET and the timeout end every wait it
//! creates, no other process is killed for it, nothing of a later
//! configuration is fetched by a call that began under an earlier one, and
//! the reader above sees only the errnos a disk may report.
//!
//! The hostile server is `abuse-guest hostile` (tests/src/hostile.rs), run
//! as user nobody (setpriv) on a device set up with `owner=65534:65534`; it
//! prints what it did and what the driver answered, and the scenario checks
//! that against what root and the readers of /dev/abuse0 saw.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use abuse_sys::uapi::*;
use abuse_sys::Control;
use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::Signal;

use crate::ensure;
use crate::guest::{
    abusectl, backing, control, dmesg, e2fsck_clean, exists, insmod, kill_servers, open_direct,
    pattern, reset_all, sh, teardown, wait_for, Aligned, Outcome, Server, MKFS_EXT4, SETPRIV,
    SFDISK,
};

const CTL: &str = "/dev/abctl0";
const DEV: &str = "/dev/abuse0";
const MIB: u64 = 1 << 20;
const NOBODY: u32 = 65534;
/// The extended block major, of partitions numbered past `max_part`.
const BLOCK_EXT_MAJOR: u32 = 259;

/// A helper process, `abuse-guest hostile ARGS`, whose output lines are
/// read as they come. Killed when dropped.
struct Helper {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// Lines not yet taken by `expect`.
    unread: VecDeque<String>,
    /// Every line, for messages.
    log: Vec<String>,
}

impl Helper {
    /// Runs it as user nobody (the user the device is delegated to).
    fn nobody(what: &str, args: &[&str]) -> Result<Helper, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(SETPRIV);
        cmd.args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
        ])
        .arg(exe);
        Self::spawn(what, cmd, args)
    }

    /// Runs it as root.
    fn root(what: &str, args: &[&str]) -> Result<Helper, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        Self::spawn(what, Command::new(exe), args)
    }

    fn spawn(what: &str, mut cmd: Command, args: &[&str]) -> Result<Helper, String> {
        cmd.arg("hostile")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("starting {what}: {e}"))?;
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().ok_or("no stdout")?;
        let err = child.stderr.take().ok_or("no stderr")?;
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("stderr: {l}"));
            }
        });
        Ok(Helper {
            what: what.into(),
            stdin: child.stdin.take(),
            child,
            lines,
            unread: VecDeque::new(),
            log: Vec::new(),
        })
    }

    fn take(&mut self, l: String) {
        self.log.push(l.clone());
        self.unread.push_back(l);
    }

    fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.take(l);
        }
    }

    /// The first line not yet taken that starts with `prefix`, waiting up
    /// to `within` for it.
    fn expect(&mut self, prefix: &str, within: Duration) -> Result<String, String> {
        let deadline = Instant::now() + within;
        loop {
            self.drain();
            if let Some(i) = self.unread.iter().position(|l| l.starts_with(prefix)) {
                return Ok(self.unread.remove(i).unwrap_or_default());
            }
            let failed = self.unread.iter().any(|l| l.starts_with("error "));
            let left = deadline.saturating_duration_since(Instant::now());
            if failed || left.is_zero() {
                break;
            }
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(l) => self.take(l),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let (exit, said) = (self.child.try_wait(), self.output());
        Err(format!(
            "{}: no `{prefix}` line within {within:?} ({exit:?}); it said: {said}",
            self.what
        ))
    }

    /// Whether it has printed a line starting with `prefix`.
    fn said(&mut self, prefix: &str) -> bool {
        self.drain();
        self.log.iter().any(|l| l.starts_with(prefix))
    }

    /// Everything it printed so far.
    fn output(&mut self) -> String {
        self.drain();
        self.log.join(" | ")
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Writes a line to its stdin.
    fn tell(&mut self, line: &str) -> Outcome {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{line}").map_err(|e| format!("{}: {e}", self.what))
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Its exit status, if it exits within `within`.
    fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_for(within, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Checks that it was killed by SIGKILL within `within`.
    fn killed_within(&mut self, within: Duration) -> Outcome {
        let exit = self.exit_within(within);
        let said = self.output();
        ensure!(
            exit.and_then(|s| s.signal()) == Some(Signal::SIGKILL as i32),
            "{} (pid {}) was not killed within {within:?}: {exit:?}; it said: {said}",
            self.what,
            self.pid()
        );
        Ok(())
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        // Not forever: one stuck in an uninterruptible wait is reaped once
        // cleanup() has reset the device it waits for.
        wait_for(Duration::from_secs(2), || {
            !matches!(self.child.try_wait(), Ok(None))
        });
    }
}

/// The value of `key=` in a helper's line.
fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(String::from)
}

/// The request a `fetched` or `target` line describes.
fn bio_of(line: &str) -> Result<AbuseBio, String> {
    let b = field(line, "bio").ok_or_else(|| format!("no bio= in `{line}`"))?;
    let f: Vec<&str> = b.split(':').collect();
    let num = |i: usize| -> Result<u64, String> {
        let s = f.get(i).ok_or_else(|| format!("bad bio= in `{line}`"))?;
        match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => s.parse(),
        }
        .map_err(|e| format!("bad bio= in `{line}`: {e}"))
    };
    Ok(AbuseBio {
        id: num(0)?,
        cmd: num(1)? as u16,
        sector: num(2)?,
        len: num(3)? as u32,
        flags: num(4)? as u16,
        ..Default::default()
    })
}

/// The `bio=` form of a request, for `--bio`.
fn bio_arg(b: &AbuseBio) -> String {
    format!("{:#x}:{}:{}:{}:{}", b.id, b.cmd, b.sector, b.len, b.flags)
}

/// Sets up `ctl` delegated to nobody, with the timeout in seconds (0:
/// never).
fn delegate(ctl: &str, size: &str, timeout_s: u32) -> Outcome {
    let out = sh(&format!(
        "abusectl setup {ctl} size={size},owner={NOBODY}:{NOBODY},timeout={timeout_s} 2>&1"
    ))?;
    ensure!(out.trim().is_empty(), "setup {ctl}: {out}");
    Ok(())
}

fn status_of(ctl: &str) -> Result<AbuseStatus, String> {
    control(ctl)?.status().map_err(|e| e.to_string())
}

/// Root's open files of the loop devices of [`loop_over_unserved`]: closed
/// by [`cleanup`], after RESET. (The last close of a loop device waits for
/// its pages, among them one whose read waits for the unserved device.)
static LOOPS_HELD: std::sync::Mutex<Vec<File>> = std::sync::Mutex::new(Vec::new());

/// A loop device, readable by nobody, over /dev/abuseN, set up by root
/// with no server: reading it waits until that device is served or reset.
/// Root keeps it open until cleanup, so that no hostile's close is its last
/// one.
fn loop_over_unserved(n: u32) -> Result<String, String> {
    loop_over_unserved_as(n, false)
}

/// [`loop_over_unserved`], writable by nobody (`writable`) or read-only.
fn loop_over_unserved_as(n: u32, writable: bool) -> Result<String, String> {
    sh(&format!("abusectl setup /dev/abctl{n} size=16M"))?;
    // Writable: with direct I/O, so that a write waits for the device
    // rather than landing in its page cache.
    let (ro, mode) = if writable {
        ("--direct-io=on ", "0666")
    } else {
        ("-r ", "0644")
    };
    let lo = sh(&format!("/sbin/losetup {ro}-f --show /dev/abuse{n}"))?
        .trim()
        .to_string();
    sh(&format!("chmod {mode} {lo}"))?;
    let f = File::open(&lo).map_err(|e| format!("{lo}: {e}"))?;
    LOOPS_HELD.lock().map_err(|e| e.to_string())?.push(f);
    Ok(lo)
}

/// A 4 KiB O_DIRECT read of /dev/abuse0 at `at`, in a thread.
fn read_async(at: u64) -> JoinHandle<std::io::Result<Vec<u8>>> {
    std::thread::spawn(move || {
        let f = open_direct(DEV, false).map_err(std::io::Error::other)?;
        let mut buf = Aligned::new(4096);
        f.read_exact_at(buf.as_mut(), at)?;
        Ok(buf.as_ref().to_vec())
    })
}

/// An O_DIRECT write of `data` to /dev/abuse0 at `at`, in a thread.
fn write_async(at: u64, data: Vec<u8>) -> JoinHandle<std::io::Result<()>> {
    std::thread::spawn(move || {
        let f = open_direct(DEV, true).map_err(std::io::Error::other)?;
        f.write_all_at(Aligned::from(&data).as_ref(), at)
    })
}

/// Joins `h`, failing if it takes longer than `within`.
fn join_within<T>(h: JoinHandle<T>, within: Duration, what: &str) -> Result<T, String> {
    ensure!(
        wait_for(within, || h.is_finished()),
        "{what} did not finish within {within:?}"
    );
    h.join().map_err(|_| format!("{what} panicked"))
}

/// The errno of a failed read or write (None: it succeeded).
fn errno_of<T>(r: &std::io::Result<T>) -> Option<Errno> {
    r.as_ref()
        .err()
        .map(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))
}

/// Waits until a PUT of `bio` gets EBUSY: some process is moving its data.
/// The probe names the request's id with another sector, so it is refused
/// whatever the request's state (EINVAL while merely fetched) and can never
/// complete it.
fn wait_moving(ctl: &Control, bio: &AbuseBio, within: Duration) -> Outcome {
    let probe = AbuseBio {
        result: ABUSE_RESULT_MEDIA_FAILURE,
        sector: bio.sector ^ 8,
        addr: 0,
        error: 0,
        ..*bio
    };
    let mut last = None;
    let moving = wait_for(within, || {
        last = ctl.put_bios(&[probe]).err().map(|e| e.errno());
        last != Some(Errno::EINVAL)
    });
    ensure!(
        moving && last == Some(Errno::EBUSY),
        "the request is not being moved: a probe PUT got {last:?}"
    );
    Ok(())
}

/// Whether dmesg has the timeout's line for process `pid`.
fn fence_logged(pid: i32, timeout_ms: u32) -> bool {
    let want = format!("server pid {pid} (abuse-guest) held a request");
    let past = format!("past the {timeout_ms} ms timeout: killing it");
    dmesg()
        .lines()
        .any(|l| l.contains(&want) && l.contains(&past))
}

/// Whether dmesg names process `pid` as fenced, in any line.
fn named_in_dmesg(pid: i32) -> bool {
    dmesg().contains(&format!("server pid {pid} "))
}

/// A process's state letter (R, S, D, Z, ...), if it exists.
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// A process's thread group id.
fn tgid(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// A file of `size` bytes, zero but for 4 KiB of `pattern(seed)` at each
/// `(offset, seed)`.
fn image(path: &str, size: u64, blocks: &[(u64, u64)]) -> Outcome {
    backing(path, size)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("{path}: {e}"))?;
    for &(at, seed) in blocks {
        f.write_all_at(&pattern(seed, 4096), at)
            .map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}

/// 4 KiB of a file at `at`.
fn file_block(path: &str, at: u64) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; 4096];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut buf, at))
        .map_err(|e| format!("{path}: {e}"))?;
    Ok(buf)
}

/// The pids of live `abuse-guest hostile` processes (helpers and the
/// children they forked; a zombie's cmdline is empty).
fn hostile_pids() -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(|e| e.ok())
        .filter_map(|p| {
            let pid = p.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
            let mut args = cmdline.split(|&b| b == 0);
            let exe = args.next()?;
            (exe.ends_with(b"abuse-guest") && args.next() == Some(b"hostile")).then_some(pid)
        })
        .collect()
}

/// Ends what a scenario left: RESET first (it ends every wait on an ABUSE
/// device, so everything below can exit), then the filesystem, the
/// helpers, the servers and the loop devices.
fn cleanup() {
    reset_all();
    if let Ok(mut held) = LOOPS_HELD.lock() {
        held.clear();
    }
    let _ = sh("umount /mnt 2>/dev/null; rm -f /tmp/hostile.fifo; true");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = hostile_pids();
        if pids.is_empty() || Instant::now() >= deadline {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill_servers();
    let _ = sh("/sbin/losetup -D");
    // A loop device lets go of its backing device at its last close.
    wait_for(Duration::from_secs(5), || {
        sh("/sbin/losetup -a").is_ok_and(|out| out.trim().is_empty())
    });
}

/// Loads the module with `params`, runs `body`, and cleans up whatever it
/// returned.
fn run(params: &str, body: fn() -> Outcome) -> Outcome {
    insmod(params)?;
    let res = body();
    cleanup();
    let down = teardown();
    res.and(down)
}

/// ABUSE_BIO_FILE refuses what could wait on whoever is at its other end
/// (a pipe, a FIFO, a socket, a character device, a directory: EINVAL) and
/// changes nothing: the request stays fetched and can be PUT again. A file
/// that does block (a loop device over an unserved ABUSE device) is
/// accepted, and RESET does not wait for it: RESET returns at once, the
/// reader of /dev/abuse0 gets EIO at once, the move is still blocked; when
/// its I/O finally ends (the other device is reset) the late PUT gets
/// ESTALE and changes nothing. No timeout: RESET alone ends the wait.
pub fn hostile_blocking_file_then_reset() -> Outcome {
    run("max_abuse=2", blocking_file_then_reset)
}

fn blocking_file_then_reset() -> Outcome {
    delegate(CTL, "16M", 0)?;
    let lo = loop_over_unserved(1)?;
    sh("mkfifo -m 0666 /tmp/hostile.fifo")?;
    let reader = read_async(0);
    let refused = [
        "pipe",
        "fifo:/tmp/hostile.fifo",
        "socket",
        "/dev/zero",
        "/tmp",
    ];
    let mut args = vec!["--ctl", CTL];
    for spec in &refused {
        args.extend(["--refuse", spec]);
    }
    args.extend(["--move", &lo]);
    let mut h = Helper::nobody("the hostile server", &args)?;
    let bio = bio_of(&h.expect("target", Duration::from_secs(10))?)?;
    ensure!(bio.cmd == ABUSE_CMD_READ, "fetched {bio:?}, not the READ");
    // Every refusal is checked before the verdict, so that one wrong errno
    // does not hide what the rest of the scenario shows.
    let mut problems = Vec::new();
    for spec in &refused {
        let line = h.expect(&format!("refuse spec={spec} "), Duration::from_secs(5))?;
        if field(&line, "errno").as_deref() != Some("EINVAL")
            || field(&line, "in_flight").as_deref() != Some("1->1")
        {
            problems.push(format!("want EINVAL, the request still fetched: `{line}`"));
        }
    }
    h.expect("moving", Duration::from_secs(5))?;
    let ctl = control(CTL)?;
    wait_moving(&ctl, &bio, Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        !h.said("moved"),
        "the move from {lo} over an unserved device did not block: {}",
        h.output()
    );
    let start = Instant::now();
    let (ok, out) = abusectl(&format!("reset {CTL}"));
    let took = start.elapsed();
    ensure!(ok, "abusectl reset: {out}");
    ensure!(
        took < Duration::from_secs(3),
        "RESET took {took:?} with a move blocked"
    );
    let res = join_within(reader, Duration::from_secs(2), "the reader after RESET")?;
    ensure!(
        errno_of(&res) == Some(Errno::EIO),
        "the reader got {:?} after RESET, want EIO",
        res.map(|_| "data")
    );
    // RESET did not wait for the file I/O: it is still blocked.
    ensure!(
        !h.said("moved") && h.alive(),
        "the move ended with RESET: {}",
        h.output()
    );
    let st = status_of(CTL)?;
    ensure!(
        st.flags & ABUSE_FLAG_CONFIGURED == 0 && st.in_flight == 0 && st.pending == 0,
        "after RESET: {st:?}"
    );
    // End the blocked I/O: its late result is refused.
    control("/dev/abctl1")?.reset().map_err(|e| e.to_string())?;
    let moved = h.expect("moved", Duration::from_secs(10))?;
    ensure!(
        field(&moved, "errno").as_deref() == Some("ESTALE"),
        "the move RESET ended meanwhile: `{moved}`, want ESTALE"
    );
    let exit = h.exit_within(Duration::from_secs(5));
    ensure!(
        exit.is_some_and(|s| s.success()),
        "the hostile server: {exit:?}: {}",
        h.output()
    );
    ensure!(problems.is_empty(), "{}", problems.join("; "));
    Ok(())
}

/// The timeout fences the process doing a move, and only it: a hostile
/// moving a request from a blocking file (a buffered read of a loop device
/// over an unserved ABUSE device: a killable wait) is killed 2 s on, and
/// dmesg names its pid; meanwhile root's PUT of that request, correct in
/// every field, gets EBUSY and changes nothing; the request then goes to a
/// real server, and the reader gets its data. A server can never get
/// another process killed: when the hostile moves a request that a root
/// process fetched (its id learned from that process), the timeout kills
/// the hostile, not the holder, which stays alive and completes the
/// request (its PUTs meanwhile get EBUSY).
pub fn hostile_blocking_file_fenced() -> Outcome {
    run("max_abuse=3", blocking_file_fenced)
}

fn blocking_file_fenced() -> Outcome {
    let img = "/tmp/hostile-fenced.img";
    image(img, 16 * MIB, &[(0, 21)])?;
    delegate(CTL, "16M", 2)?;
    let ctl = control(CTL)?;
    let lo1 = loop_over_unserved(1)?;
    // The hostile fetches and moves.
    let reader = read_async(0);
    let mut h = Helper::nobody("the hostile server", &["--ctl", CTL, "--move", &lo1])?;
    let bio = bio_of(&h.expect("target", Duration::from_secs(10))?)?;
    h.expect("moving", Duration::from_secs(5))?;
    wait_moving(&ctl, &bio, Duration::from_secs(5))?;
    let data = pattern(99, bio.len as usize);
    let puts = [
        (
            "a READ's data",
            AbuseBio {
                result: ABUSE_RESULT_OKAY,
                addr: data.as_ptr() as u64,
                ..bio
            },
        ),
        (
            "a failure",
            AbuseBio {
                result: ABUSE_RESULT_MEDIA_FAILURE,
                ..bio
            },
        ),
    ];
    for (what, b) in puts {
        let e = ctl.put_bios(&[b]).err().map(|e| e.errno());
        ensure!(
            e == Some(Errno::EBUSY),
            "root's PUT ({what}) of the request being moved: {e:?}, want EBUSY"
        );
        let st = status_of(CTL)?;
        ensure!(
            st.in_flight == 1 && st.completed == 0,
            "root's refused PUT ({what}) changed the request: {st:?}"
        );
    }
    h.killed_within(Duration::from_secs(10))?;
    ensure!(
        !h.said("moved"),
        "the killed mover returned: {}",
        h.output()
    );
    ensure!(
        wait_for(Duration::from_secs(2), || fence_logged(h.pid(), 2000)),
        "dmesg does not name the killed mover {}",
        h.pid()
    );
    let fenced_at = Instant::now();
    // Its control file released, the request goes to the next server.
    ensure!(
        wait_for(Duration::from_secs(5), || status_of(CTL)
            .is_ok_and(|s| s.pending == 1 && s.in_flight == 0)),
        "the request was not handed out again: {:?}",
        status_of(CTL)
    );
    let server = Server::abusectl(CTL, &["file", img])?;
    let got = join_within(reader, Duration::from_secs(10), "the reader")?
        .map_err(|e| format!("the reader: {e}"))?;
    ensure!(
        got == pattern(21, 4096),
        "the reader did not get the real server's data"
    );
    drop(server);
    kill_servers();
    // The file I/O the killed mover started is still waiting for
    // /dev/abuse1: end it.
    control("/dev/abctl1")?.reset().map_err(|e| e.to_string())?;

    // A root process fetches and holds; the hostile moves that request.
    let lo2 = loop_over_unserved(2)?;
    // One fence line every 5 s at most: this one must be logged too.
    std::thread::sleep(
        (fenced_at + Duration::from_secs(4)).saturating_duration_since(Instant::now()),
    );
    let reader = read_async(8192);
    let mut holder = Helper::root(
        "the root holder",
        &["--ctl", CTL, "--answer-when-told", "22"],
    )?;
    let bio = bio_of(&holder.expect("target", Duration::from_secs(10))?)?;
    holder.expect("holding", Duration::from_secs(5))?;
    let id = bio_arg(&bio);
    let mut h2 = Helper::nobody(
        "the hostile mover",
        &["--ctl", CTL, "--bio", &id, "--move", &lo2],
    )?;
    h2.expect("moving", Duration::from_secs(5))?;
    wait_moving(&ctl, &bio, Duration::from_secs(5))?;
    holder.tell("put")?;
    let put = holder.expect("put ", Duration::from_secs(15))?;
    let busy: u32 = field(&put, "busy")
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    ensure!(
        put.starts_with("put ok") && busy > 0,
        "the holder's PUT: `{put}` (want EBUSY while moved, then done)"
    );
    h2.killed_within(Duration::from_secs(5))?;
    ensure!(holder.alive(), "the root holder died: {}", holder.output());
    let got = join_within(reader, Duration::from_secs(5), "the second reader")?
        .map_err(|e| format!("the second reader: {e}"))?;
    ensure!(
        got == pattern(22, 4096),
        "the reader did not get the holder's data"
    );
    ensure!(
        wait_for(Duration::from_secs(2), || fence_logged(h2.pid(), 2000)),
        "dmesg does not name the killed mover {}",
        h2.pid()
    );
    ensure!(
        !named_in_dmesg(holder.pid()),
        "dmesg names the holder {}:\n{}",
        holder.pid(),
        dmesg()
    );
    holder.close_stdin();
    let exit = holder.exit_within(Duration::from_secs(5));
    ensure!(
        exit.is_some_and(|s| s.success()),
        "the root holder: {exit:?}: {}",
        holder.output()
    );
    let st = status_of(CTL)?;
    ensure!(
        st.timeouts >= 2 && st.errors == 0 && st.completed == 2 && st.in_flight == 0,
        "counters: {st:?}"
    );
    Ok(())
}

/// A process the timeout kills but that cannot die (its move waits,
/// uninterruptibly, on an O_DIRECT read of a loop device over an unserved
/// ABUSE device) has its request failed max(timeout, 5 s) after the kill:
/// the reader gets EIO, dmesg says "did not exit after SIGKILL", and the
/// wait it was part of no longer holds anything of /dev/abuse0. Once its
/// own wait ends (the other device is reset), it dies.
pub fn hostile_unkillable_move_failed() -> Outcome {
    run("max_abuse=2", unkillable_move_failed)
}

/// A hostile server (user nobody) that moves the request it fetches, a
/// `cmd`, with O_DIRECT I/O on `lo` (a loop device over an unserved ABUSE
/// device), where it waits uninterruptibly; returned once the timeout has
/// fenced it (dmesg names it), with when it fetched the request.
fn fenced_stuck_mover(ctl: &Control, lo: &str, cmd: u16) -> Result<(Helper, Instant), String> {
    let direct = format!("direct:{lo}");
    let mut h = Helper::nobody("the hostile server", &["--ctl", CTL, "--move", &direct])?;
    let bio = bio_of(&h.expect("target", Duration::from_secs(10))?)?;
    let fetched_at = Instant::now();
    ensure!(bio.cmd == cmd, "fetched cmd {}, want {cmd}", bio.cmd);
    h.expect("moving", Duration::from_secs(5))?;
    wait_moving(ctl, &bio, Duration::from_secs(5))?;
    let pid = h.pid();
    ensure!(
        wait_for(Duration::from_secs(6), || fence_logged(pid, 2000)),
        "the mover {pid} was not fenced"
    );
    Ok((h, fetched_at))
}

/// The fenced mover `h` is alive and in uninterruptible sleep.
fn stuck_in_d(h: &mut Helper) -> Outcome {
    let state = proc_state(h.pid());
    ensure!(
        h.alive() && state == Some('D'),
        "the fenced mover is not stuck in D state: {state:?}, {}",
        h.output()
    );
    Ok(())
}

fn unkillable_move_failed() -> Outcome {
    delegate(CTL, "16M", 2)?;
    let ctl = control(CTL)?;
    let lo = loop_over_unserved(1)?;
    let reader = read_async(0);
    let (mut h, fetched_at) = fenced_stuck_mover(&ctl, &lo, ABUSE_CMD_READ)?;
    let pid = h.pid();
    std::thread::sleep(Duration::from_millis(300));
    stuck_in_d(&mut h)?;
    let res = join_within(reader, Duration::from_secs(15), "the reader")?;
    let at = fetched_at.elapsed();
    ensure!(
        errno_of(&res) == Some(Errno::EIO),
        "the reader got {:?}, want EIO",
        res.map(|_| "data")
    );
    // Fenced 2-3 s after the fetch, failed 5 s (the grace) after that.
    ensure!(
        at >= Duration::from_secs(6) && at <= Duration::from_secs(14),
        "the request was failed {at:?} after the fetch"
    );
    let said =
        format!("server pid {pid} (abuse-guest) did not exit after SIGKILL: failing its request");
    ensure!(
        dmesg().contains(&said),
        "dmesg lacks `{said}`:\n{}",
        dmesg()
    );
    ensure!(
        h.alive(),
        "the unkillable mover exited before its wait ended"
    );
    let st = status_of(CTL)?;
    ensure!(
        st.in_flight == 0 && st.pending == 0 && st.errors == 1 && st.timeouts >= 1,
        "counters: {st:?}"
    );
    // Its own wait ends: it dies, without a word.
    control("/dev/abctl1")?.reset().map_err(|e| e.to_string())?;
    h.killed_within(Duration::from_secs(10))?;
    ensure!(
        !h.said("moved"),
        "the killed mover returned: {}",
        h.output()
    );
    Ok(())
}

/// The timeout never fails a WRITE: a process it kills but that cannot die
/// while it moves a WRITE (an O_DIRECT write to a loop device over an
/// unserved ABUSE device) keeps the request well past max(timeout, 5 s) of
/// grace: the writer still waits and nothing is failed, since the stuck
/// process may yet perform that write, and it must not land over data the
/// filesystem wrote after seeing it fail. RESET ends it: the writer gets
/// EIO at once.
pub fn hostile_unkillable_write_waits_for_reset() -> Outcome {
    run("max_abuse=2", unkillable_write_waits_for_reset)
}

fn unkillable_write_waits_for_reset() -> Outcome {
    delegate(CTL, "16M", 2)?;
    let ctl = control(CTL)?;
    let lo = loop_over_unserved_as(1, true)?;
    let writer = write_async(0, pattern(5, 4096));
    let (mut h, _) = fenced_stuck_mover(&ctl, &lo, ABUSE_CMD_WRITE)?;
    let pid = h.pid();
    // The grace is 5 s: a READ would have been failed by now.
    std::thread::sleep(Duration::from_secs(9));
    stuck_in_d(&mut h)?;
    ensure!(
        !writer.is_finished(),
        "the WRITE ended while its stuck mover may still perform it"
    );
    let st = status_of(CTL)?;
    ensure!(
        st.in_flight == 1 && st.errors == 0 && st.timeouts >= 1,
        "counters: {st:?}"
    );
    let said = format!("server pid {pid} (abuse-guest) did not exit after SIGKILL");
    ensure!(!dmesg().contains(&said), "dmesg says `{said}`");
    ctl.reset().map_err(|e| e.to_string())?;
    let res = join_within(writer, Duration::from_secs(5), "the writer")?;
    ensure!(
        errno_of(&res) == Some(Errno::EIO),
        "the writer got {:?} after RESET, want EIO",
        res.map(|_| "success")
    );
    // Its own wait ends: it dies.
    control("/dev/abctl1")?.reset().map_err(|e| e.to_string())?;
    h.killed_within(Duration::from_secs(10))?;
    Ok(())
}

/// FIBMAP: the filesystem block holding block `n` of a file.
fn fibmap(path: &str, n: i32) -> Result<u64, String> {
    let f = File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let mut block = n;
    // SAFETY: FIBMAP reads and writes one int, `block`.
    let r = unsafe {
        libc::ioctl(f.as_raw_fd(), 1 /* FIBMAP */, &mut block as *mut i32)
    };
    ensure!(
        r == 0 && block > 0,
        "FIBMAP {path}: {r} {block} {}",
        Errno::last()
    );
    Ok(block as u64)
}

/// The self-deadlock is refused: a hostile moving the writeback WRITE of a
/// page of /mnt/f (ext4 mounted from /dev/abuse0) into /mnt/f itself with
/// O_DIRECT (the direct write would wait for that page's writeback, which
/// waits for the request) gets EINVAL, as without O_DIRECT, and nothing
/// changes; a real server then completes everything, the page reaches the
/// image and e2fsck finds the filesystem clean. So are partitions of the
/// device (EINVAL), also one numbered past max_part (major 259).
pub fn hostile_file_on_own_device() -> Outcome {
    run("max_abuse=1 max_part=1", file_on_own_device)
}

fn file_on_own_device() -> Outcome {
    let img = "/tmp/hostile-own.img";
    backing(img, 64 * MIB)?;
    // A timeout, should a move be accepted and deadlock after all.
    delegate(CTL, "64M", 5)?;
    let server = Server::abusectl(CTL, &["file", img])?;
    sh(&format!(
        "{MKFS_EXT4} -q -F -b 4096 {DEV} && mount {DEV} /mnt && dd if=/dev/urandom of=/mnt/f bs=4k count=16 2>/dev/null && sync && chmod 0666 /mnt/f"
    ))?;
    let sector = fibmap("/mnt/f", 0)? * 8;
    drop(server);
    kill_servers();
    // Dirty the file's first page, and sync it in the background: its
    // writeback waits for a server.
    let new = pattern(41, 4096);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/mnt/f")
        .map_err(|e| e.to_string())?;
    f.write_all_at(&new, 0).map_err(|e| e.to_string())?;
    let syncer = std::thread::spawn(move || f.sync_all());
    let sector_arg = sector.to_string();
    let mut h = Helper::nobody(
        "the hostile server",
        &[
            "--ctl",
            CTL,
            "--want-sector",
            &sector_arg,
            "--refuse",
            "direct:/mnt/f",
            "--refuse",
            "/mnt/f",
        ],
    )?;
    let target = h.expect("target", Duration::from_secs(10))?;
    let bio = bio_of(&target)?;
    ensure!(
        bio.cmd == ABUSE_CMD_WRITE,
        "the request at sector {sector}: `{target}`"
    );
    let mut problems = Vec::new();
    for spec in ["direct:/mnt/f", "/mnt/f"] {
        let line = h.expect(&format!("refuse spec={spec} "), Duration::from_secs(5))?;
        let flight = field(&line, "in_flight").unwrap_or_default();
        let unchanged = flight.split_once("->").is_some_and(|(a, b)| a == b);
        if field(&line, "errno").as_deref() != Some("EINVAL") || !unchanged {
            problems.push(format!("want EINVAL, nothing changed: `{line}`"));
        }
    }
    // It exits: what it fetched goes to the next server.
    let exit = h.exit_within(Duration::from_secs(5));
    ensure!(
        exit.is_some_and(|s| s.success()),
        "the hostile server: {exit:?}: {}",
        h.output()
    );
    let server = Server::abusectl(CTL, &["file", img])?;
    join_within(syncer, Duration::from_secs(15), "the fsync")?
        .map_err(|e| format!("fsync /mnt/f: {e}"))?;
    sh("umount /mnt")?;
    ensure!(
        file_block(img, sector * 512)? == new,
        "the synced page is not in the image at sector {sector}"
    );
    e2fsck_clean(DEV)?;
    let st = status_of(CTL)?;
    ensure!(st.errors == 0, "counters: {st:?}");
    drop(server);
    kill_servers();
    control(CTL)?.reset().map_err(|e| e.to_string())?;

    // Partitions: p1 has the device's major, p3 (past max_part=1) 259.
    let pimg = "/tmp/hostile-parts.img";
    image(pimg, 64 * MIB, &[(4096, 42)])?;
    sh(&format!(
        "printf 'start=2048, size=8192\\nsize=8192\\nsize=8192\\n' | {SFDISK} -q {pimg}"
    ))?;
    // 512-byte blocks: the units of the table sfdisk wrote in the image.
    delegate(CTL, "64M,bs=512", 5)?;
    let server = Server::abusectl(CTL, &["file", pimg])?;
    // Opening the device reads its partition table.
    sh(&format!(
        "dd if={DEV} of=/dev/null bs=4k count=1 2>/dev/null"
    ))?;
    ensure!(
        wait_for(Duration::from_secs(5), || exists("/dev/abuse0p3")),
        "no /dev/abuse0p3"
    );
    let major = |p: &str| {
        std::fs::metadata(p)
            .map(|m| libc::major(m.rdev()))
            .map_err(|e| format!("{p}: {e}"))
    };
    let disk = libc::major(status_of(CTL)?.dev);
    ensure!(
        major("/dev/abuse0p1")? == disk && major("/dev/abuse0p3")? == BLOCK_EXT_MAJOR,
        "majors: p1 {:?}, p3 {:?} (the disk's {disk})",
        major("/dev/abuse0p1"),
        major("/dev/abuse0p3")
    );
    sh("chmod 0644 /dev/abuse0p1 /dev/abuse0p3")?;
    drop(server);
    kill_servers();
    let reader = read_async(4096);
    let specs = ["/dev/abuse0p3", "direct:/dev/abuse0p3", "/dev/abuse0p1"];
    let mut args = vec!["--ctl", CTL];
    for spec in &specs {
        args.extend(["--refuse", spec]);
    }
    let mut h = Helper::nobody("the hostile server", &args)?;
    h.expect("target", Duration::from_secs(10))?;
    for spec in specs {
        let line = h.expect(&format!("refuse spec={spec} "), Duration::from_secs(5))?;
        if field(&line, "errno").as_deref() != Some("EINVAL")
            || field(&line, "in_flight").as_deref() != Some("1->1")
        {
            problems.push(format!("want EINVAL, the request still fetched: `{line}`"));
        }
    }
    let exit = h.exit_within(Duration::from_secs(5));
    ensure!(
        exit.is_some_and(|s| s.success()),
        "the hostile server: {exit:?}: {}",
        h.output()
    );
    let _server = Server::abusectl(CTL, &["file", pimg])?;
    let got = join_within(reader, Duration::from_secs(10), "the reader")?
        .map_err(|e| format!("the reader: {e}"))?;
    ensure!(
        got == pattern(42, 4096),
        "the reader did not get the image's data"
    );
    ensure!(problems.is_empty(), "{}", problems.join("; "));
    Ok(())
}

/// The fence reaches the thread group: a hostile whose main thread has
/// exited while another thread holds a fetched request is killed whole
/// (kill through the thread group, not the dead leader), the request is
/// handed out again and a real server completes it. A hostile that forked
/// (a process of its own keeps the control file open) is killed, its child
/// is not (it stays alive, a thread group of its own), and the request is
/// handed out again once the killed process has exited, though its file
/// lives on in the child.
pub fn hostile_fence_reaches_thread_group() -> Outcome {
    run("max_abuse=1", fence_reaches_thread_group)
}

fn fence_reaches_thread_group() -> Outcome {
    let img = "/tmp/hostile-group.img";
    image(img, 16 * MIB, &[(0, 51), (8192, 52)])?;
    delegate(CTL, "16M", 2)?;
    // The main thread exits; a second thread holds the request.
    let reader = read_async(0);
    let mut h = Helper::nobody("the hostile server", &["--ctl", CTL, "--in-thread"])?;
    h.expect("target", Duration::from_secs(10))?;
    h.expect("main-exited", Duration::from_secs(5))?;
    let pid = h.pid();
    let threads = || std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
    ensure!(
        wait_for(Duration::from_secs(2), || proc_state(pid) == Some('Z')
            && threads() == 2),
        "the leader is not a zombie beside its thread: state {:?}, {} threads",
        proc_state(pid),
        threads()
    );
    h.killed_within(Duration::from_secs(10))?;
    ensure!(
        wait_for(Duration::from_secs(2), || fence_logged(pid, 2000)),
        "dmesg does not name the killed server {pid}"
    );
    let fenced_at = Instant::now();
    ensure!(
        wait_for(Duration::from_secs(5), || status_of(CTL)
            .is_ok_and(|s| s.pending == 1 && s.in_flight == 0)),
        "the request was not handed out again: {:?}",
        status_of(CTL)
    );
    let server = Server::abusectl(CTL, &["file", img])?;
    let got = join_within(reader, Duration::from_secs(10), "the reader")?
        .map_err(|e| format!("the reader: {e}"))?;
    ensure!(
        got == pattern(51, 4096),
        "the reader did not get the real server's data"
    );
    drop(server);
    kill_servers();

    // It forks: the child keeps the control file; the parent holds.
    // One fence line every 5 s at most: this one must be logged too.
    std::thread::sleep(
        (fenced_at + Duration::from_secs(4)).saturating_duration_since(Instant::now()),
    );
    let reader = read_async(8192);
    let mut h = Helper::nobody("the forking server", &["--ctl", CTL, "--fork", "--hold"])?;
    h.expect("target", Duration::from_secs(10))?;
    let line = h.expect("child", Duration::from_secs(5))?;
    let child: i32 = field(&line, "pid")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("`{line}`"))?;
    h.expect("holding", Duration::from_secs(5))?;
    let parent = h.pid();
    ensure!(
        tgid(child) == Some(child) && child != parent,
        "the child {child} is in thread group {:?} (the parent is {parent})",
        tgid(child)
    );
    h.killed_within(Duration::from_secs(10))?;
    let live = |p: i32| proc_state(p).is_some_and(|s| s != 'Z' && s != 'X');
    ensure!(live(child), "the child {child} was killed too");
    ensure!(
        wait_for(Duration::from_secs(5), || status_of(CTL)
            .is_ok_and(|s| s.pending == 1 && s.in_flight == 0)),
        "the request was not handed out again: {:?}",
        status_of(CTL)
    );
    let server = Server::abusectl(CTL, &["file", img])?;
    let got = join_within(reader, Duration::from_secs(10), "the second reader")?
        .map_err(|e| format!("the second reader: {e}"))?;
    ensure!(
        got == pattern(52, 4096),
        "the reader did not get the real server's data"
    );
    ensure!(live(child), "the child {child} died");
    ensure!(
        wait_for(Duration::from_secs(2), || fence_logged(parent, 2000)),
        "dmesg does not name the killed parent {parent}"
    );
    ensure!(
        !named_in_dmesg(child),
        "dmesg names the child {child}:\n{}",
        dmesg()
    );
    drop(server);
    let st = status_of(CTL)?;
    ensure!(
        st.timeouts >= 2 && st.requeues >= 2 && st.errors == 0,
        "counters: {st:?}"
    );
    Ok(())
}

/// A call is pinned to the configuration it began under: a GET_BIO whose
/// data buffer is a shared mapping of another, unserved ABUSE device faults
/// on its copy; the driver puts the WRITE back (pending) and faults the
/// page in with nothing held, which waits for that device. Meanwhile root
/// resets /dev/abctl0 (the WRITE fails), sets it up again with the same
/// delegation and queues a new WRITE; once the other device is served and
/// the fault ends, the old call fetches nothing (ENOMSG): the new WRITE
/// stays pending for a server of the new configuration, which completes it.
pub fn hostile_user_copy_fault_across_reset() -> Outcome {
    run("max_abuse=2", user_copy_fault_across_reset)
}

fn user_copy_fault_across_reset() -> Outcome {
    let img = "/tmp/hostile-pinned.img";
    backing(img, 16 * MIB)?;
    delegate(CTL, "16M", 0)?;
    sh("abusectl setup /dev/abctl1 size=16M && chmod 0666 /dev/abuse1")?;
    let first = write_async(0, pattern(61, 4096));
    ensure!(
        wait_for(Duration::from_secs(5), || status_of(CTL)
            .is_ok_and(|s| s.pending == 1)),
        "the first WRITE is not pending"
    );
    let mut h = Helper::nobody(
        "the hostile server",
        &["--ctl", CTL, "--mmap", "/dev/abuse1"],
    )?;
    h.expect("get", Duration::from_secs(10))?;
    // Faulting the mapping in reads /dev/abuse1, which has no server.
    ensure!(
        wait_for(Duration::from_secs(5), || status_of("/dev/abctl1")
            .is_ok_and(|s| s.pending > 0)),
        "the fault did not reach /dev/abuse1: {}",
        h.output()
    );
    std::thread::sleep(Duration::from_millis(200));
    let st = status_of(CTL)?;
    ensure!(
        st.pending == 1 && st.in_flight == 0 && !h.said("got"),
        "while the fault waits: {st:?}, {}",
        h.output()
    );
    control(CTL)?.reset().map_err(|e| e.to_string())?;
    let res = join_within(first, Duration::from_secs(3), "the first WRITE")?;
    ensure!(
        errno_of(&res) == Some(Errno::EIO),
        "the first WRITE got {res:?} after RESET"
    );
    delegate(CTL, "16M", 0)?;
    let gen = status_of(CTL)?.generation;
    let second = write_async(4096, pattern(62, 4096));
    ensure!(
        wait_for(Duration::from_secs(5), || status_of(CTL)
            .is_ok_and(|s| s.pending == 1)),
        "the second WRITE is not pending"
    );
    // Serve /dev/abuse1: the fault ends and the old call goes on.
    let under = Server::abusectl("/dev/abctl1", &["null"])?;
    let got = h.expect("got", Duration::from_secs(10))?;
    ensure!(
        got == "got errno=ENOMSG",
        "the call begun under the old configuration: `{got}`: {}",
        h.output()
    );
    let exit = h.exit_within(Duration::from_secs(5));
    ensure!(
        exit.is_some_and(|s| s.success()),
        "the hostile server: {exit:?}: {}",
        h.output()
    );
    std::thread::sleep(Duration::from_millis(300));
    let st = status_of(CTL)?;
    ensure!(
        st.pending == 1 && st.in_flight == 0 && st.generation == gen,
        "the new configuration's WRITE: {st:?}"
    );
    let _server = Server::abusectl(CTL, &["file", img])?;
    join_within(second, Duration::from_secs(10), "the second WRITE")?
        .map_err(|e| format!("the second WRITE: {e}"))?;
    ensure!(
        file_block(img, 4096)? == pattern(62, 4096),
        "the second WRITE is not in the image"
    );
    drop(under);
    Ok(())
}

/// A server's errno reaches the reader only if a disk may report it: EIO,
/// ENOSPC, EOPNOTSUPP, ENODATA, EILSEQ, ETIMEDOUT, ENOLINK and EREMOTEIO as
/// themselves; every other (the statuses the block layer keeps for itself:
/// EAGAIN, ENOMEM, EBUSY, EREMCHG, ENODEV, ETOOMANYREFS, EOVERFLOW, EINVAL,
/// EBADE, ETIME; and any errno, up to 4095) as EIO. Checked with an
/// O_DIRECT read and write of /dev/abuse0 for each.
pub fn hostile_errnos_whitelisted() -> Outcome {
    run("max_abuse=1", errnos_whitelisted)
}

fn errnos_whitelisted() -> Outcome {
    use Errno::*;
    delegate(CTL, "16M", 0)?;
    let mut cases: Vec<(i32, Errno)> = [
        EIO, ENOSPC, EOPNOTSUPP, ENODATA, EILSEQ, ETIMEDOUT, ENOLINK, EREMOTEIO,
    ]
    .iter()
    .map(|&e| (e as i32, e))
    .collect();
    for e in [
        EAGAIN,
        ENOMEM,
        EBUSY,
        EREMCHG,
        ENODEV,
        ETOOMANYREFS,
        EOVERFLOW,
        EINVAL,
        EBADE,
        ETIME,
        EPERM,
        EINTR,
        ERESTART,
    ] {
        cases.push((e as i32, EIO));
    }
    cases.push((4095, EIO));
    // A read then a write for each errno, one at a time: the hostile fails
    // the k-th request it fetches with the k-th errno.
    let list: Vec<String> = cases
        .iter()
        .flat_map(|(e, _)| [e.to_string(), e.to_string()])
        .collect();
    let list = list.join(",");
    let mut h = Helper::nobody(
        "the hostile server",
        &["--ctl", CTL, "--fail-errnos", &list],
    )?;
    let mut problems = Vec::new();
    for (i, &(sent, want)) in cases.iter().enumerate() {
        let at = i as u64 * 4096;
        let read = join_within(read_async(at), Duration::from_secs(15), "a read")?;
        let line = h.expect("failed", Duration::from_secs(5))?;
        let put = field(&line, "put").unwrap_or_default();
        let write = join_within(
            write_async(at, pattern(i as u64, 4096)),
            Duration::from_secs(15),
            "a write",
        )?;
        let line2 = h.expect("failed", Duration::from_secs(5))?;
        let put2 = field(&line2, "put").unwrap_or_default();
        let (r, w) = (errno_of(&read), errno_of(&write));
        if r != Some(want) || w != Some(want) || put != "ok" || put2 != "ok" {
            problems.push(format!(
                "errno {sent}: the reader got {r:?}, the writer {w:?}, want {want} (PUTs: {put}, {put2})"
            ));
        }
    }
    let exit = h.exit_within(Duration::from_secs(5));
    ensure!(
        exit.is_some_and(|s| s.success()),
        "the hostile server: {exit:?}: {}",
        h.output()
    );
    let st = status_of(CTL)?;
    let n = 2 * cases.len() as u64;
    ensure!(
        st.errors == n && st.completed == n && st.in_flight == 0,
        "counters: {st:?}"
    );
    ensure!(problems.is_empty(), "{}", problems.join("; "));
    Ok(())
}
