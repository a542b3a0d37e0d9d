//! Stand-alone servers under test (the library's examples, the C and
//! Python ramdisks): a server process started from its command line, and
//! the story each goes through. Each is killed with SIGKILL in the middle
//! of fio --verify and restarted: nothing it acknowledged is lost; a server
//! started afresh reads back what the first run wrote; ext4 made on it
//! across another kill is e2fsck-clean with every file intact.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::servers::fio_verify;
use crate::ensure;
use crate::guest::{control, e2fsck_clean, sh, Outcome, MKFS_EXT4};

pub(crate) const CTL: &str = "/dev/abctl0";
pub(crate) const DEV: &str = "/dev/abuse0";
pub(crate) const MIB: u64 = 1 << 20;

/// A server process; killed (SIGKILL) when dropped.
pub(crate) struct ServerProcess {
    child: Child,
    what: String,
    log: String,
}

impl ServerProcess {
    /// Runs `argv`; it is up once it prints its "serving" line (after it
    /// set the device up), which it must within `within`.
    pub(crate) fn start(argv: &[&str], within: Duration) -> Result<ServerProcess, String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = format!("/tmp/standalone-{n}.log");
        let what = argv.join(" ");
        let err = std::fs::File::create(&log).map_err(|e| format!("{log}: {e}"))?;
        let mut child = Command::new(argv[0])
            .args(&argv[1..])
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {what}: {e}"))?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        // Reads (and drains) its stdout: the first line says it serves.
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut s = ServerProcess { child, what, log };
        match rx.recv_timeout(within) {
            Ok(line) if line.contains("serving") => Ok(s),
            got => {
                let status = s.child.try_wait();
                Err(format!(
                    "{} did not start ({got:?}, {status:?}): {}",
                    s.what,
                    s.stderr()
                ))
            }
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9, and reaped: its control file is closed, what it had fetched
    /// is pending again.
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: it completes what it holds and exits 0.
    pub(crate) fn stop(mut self) -> Outcome {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .map_err(|e| e.to_string())?;
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                ensure!(
                    status.success(),
                    "{}: SIGTERM: exited with {status}: {}",
                    self.what,
                    self.stderr()
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("{} did not exit within 10 s of SIGTERM", self.what))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How one server goes through [`story`].
pub(crate) struct Story<'a> {
    /// The first server: it sets a 64 MiB device up.
    pub(crate) first: &'a [&'a str],
    /// Every later one: it takes the configured device over.
    pub(crate) again: &'a [&'a str],
    /// How long a server may take to say it serves.
    pub(crate) start_within: Duration,
    /// The file the server keeps the data in, which must be 64 MiB.
    pub(crate) store: Option<&'a str>,
    /// A directory copied into the tree beside its 40 files.
    pub(crate) extra: Option<&'a str>,
    /// One more kill and restart between the e2fsck and the remount.
    pub(crate) restart_before_remount: bool,
}

/// The story, on a 64 MiB device the first server sets up:
/// 1. fio --verify (4 jobs, 8 MiB each), the server killed (SIGKILL) in
///    the middle of it (writing, at the speeds seen) and restarted: 0
///    errors, every block verifies;
/// 2. killed while idle, a new one started: fio --verify_only reads back
///    what the first run wrote;
/// 3. ext4 made, a tree copied in, the server killed with it mounted and
///    dirty, a new one started: umount writes back through it, e2fsck -fn
///    is clean, the tree reads back identical after a remount;
/// 4. returns the last server, still serving.
pub(crate) fn story(s: &Story) -> Result<ServerProcess, String> {
    let start = |argv| ServerProcess::start(argv, s.start_within);
    let first = start(s.first)?;
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(st.size == 64 * MIB, "the server set up {} bytes", st.size);
    if let Some(store) = s.store {
        ensure!(
            std::fs::metadata(store).map(|m| m.len()).unwrap_or(0) == 64 * MIB,
            "{store} is not the 64 MiB store"
        );
    }
    // 1. kill -9 during fio, restart. Its write phase takes some 3 s under
    // TCG.
    let fio = std::thread::spawn(|| fio_verify(4, 8, "--randseed=7"));
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(
        !fio.is_finished(),
        "fio finished before the kill: make it longer"
    );
    first.kill();
    std::thread::sleep(Duration::from_millis(300));
    let second = start(s.again)?;
    fio.join().map_err(|_| "fio thread panicked")??;
    // 2. A server started afresh reads back what the first run wrote.
    second.kill();
    let third = start(s.again)?;
    fio_verify(4, 8, "--randseed=7 --verify_only")?;
    // 3. ext4 across a kill -9 with the filesystem mounted and dirty. A
    // tree of its own: other scenarios leave theirs in /tmp/tree.
    sh(&format!("{MKFS_EXT4} -q -F {DEV} && mount {DEV} /mnt"))?;
    let extra = s
        .extra
        .map(|d| format!("cp -r {d} /tmp/tree/ && "))
        .unwrap_or_default();
    sh(&format!(
        "rm -rf /tmp/tree && mkdir -p /tmp/tree && {extra}i=0; while [ $i -lt 40 ]; do \
        dd if=/dev/urandom of=/tmp/tree/f$i bs=1k count=$((i * 37 % 500 + 1)) 2>/dev/null; \
        i=$((i + 1)); done; cp -r /tmp/tree /mnt/"
    ))?;
    let want = sh("cd /tmp/tree && find . -type f | sort | xargs md5sum")?;
    third.kill();
    let mut last = start(s.again)?;
    sh("umount /mnt")?;
    e2fsck_clean(DEV)?;
    if s.restart_before_remount {
        last.kill();
        last = start(s.again)?;
    }
    let got = sh(&format!(
        "mount -o ro {DEV} /mnt && cd /mnt/tree && find . -type f | sort | xargs md5sum; cd /; umount /mnt"
    ))?;
    ensure!(
        got == want,
        "the tree read back differs:\n{got}\nwanted:\n{want}"
    );
    if s.extra.is_some() {
        ensure!(
            want.lines().count() > 40,
            "the tree is too small to mean anything"
        );
    } else {
        ensure!(
            want.lines().count() == 40,
            "the tree is not the 40 files written"
        );
    }
    Ok(last)
}
