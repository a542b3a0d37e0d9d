//! Servers in other languages: examples/c/ramdisk.c (pthreads, SERVE, on
//! abuse.h alone) and python/ramdisk.py (python/abuse.py: ctypes and
//! fcntl.ioctl). Each is killed with SIGKILL in the middle of fio --verify
//! and restarted on the same /dev/shm store: nothing it acknowledged is
//! lost, a server started afresh finds the data again, and ext4 made on the
//! device across another kill is e2fsck-clean with every file intact.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::servers::fio_verify;
use crate::ensure;
use crate::guest::{e2fsck_clean, insmod, sh, teardown, Outcome, MKFS_EXT4};

const CTL: &str = "/dev/abctl0";
const DEV: &str = "/dev/abuse0";
const MIB: u64 = 1 << 20;

/// A ramdisk server process; killed (SIGKILL) when dropped.
struct Ramdisk {
    child: Child,
    what: String,
    log: String,
}

impl Ramdisk {
    /// Runs `argv`; it is up once it prints its "serving" line.
    fn start(argv: &[&str]) -> Result<Ramdisk, String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = format!("/tmp/ramdisk-{n}.log");
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
        let mut s = Ramdisk { child, what, log };
        // Generous: python starts in a second or two under TCG.
        match rx.recv_timeout(Duration::from_secs(60)) {
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
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: it completes what it holds and exits 0.
    fn stop(mut self) -> Outcome {
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

impl Drop for Ramdisk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One server under test: how to start it on a device already set up, and
/// how to start it setting the device up.
struct Lang {
    serve: &'static [&'static str],
    setup: &'static [&'static str],
}

const C: Lang = Lang {
    serve: &["/bin/abuse-ramdisk-c", "-t", "2", CTL, "/dev/shm/ram-c"],
    setup: &[
        "/bin/abuse-ramdisk-c",
        "-t",
        "2",
        "-s",
        "64M",
        CTL,
        "/dev/shm/ram-c",
    ],
};

const PYTHON: Lang = Lang {
    serve: &[
        "/usr/bin/python3",
        "/lib/abuse/python/ramdisk.py",
        CTL,
        "/dev/shm/ram-py",
    ],
    setup: &[
        "/usr/bin/python3",
        "/lib/abuse/python/ramdisk.py",
        CTL,
        "/dev/shm/ram-py",
        "64M",
    ],
};

/// The whole story for one server:
/// 1. it sets a 64 MiB device up; fio --verify (4 jobs, 8 MiB each) runs,
///    the server is killed (SIGKILL) in the middle of it (writing, at the
///    speeds seen) and restarted on the store: 0 errors, every block
///    verifies;
/// 2. that server is killed while idle and a new one started: fio
///    --verify_only reads back what the first run wrote (the store kept it);
/// 3. ext4 is made, a tree copied in, the server killed with the
///    filesystem mounted and dirty, a new one started: umount writes back
///    through it, e2fsck -fn is clean, the tree reads back identical after
///    a remount (and once more after a server restart);
/// 4. SIGTERM stops the server with exit 0.
fn ramdisk_story(lang: &Lang, store: &str) -> Outcome {
    insmod("max_abuse=1")?;
    let _ = std::fs::remove_file(store);
    // 1. kill -9 during fio, restart.
    let first = Ramdisk::start(lang.setup)?;
    let st = crate::guest::control(CTL)?
        .status()
        .map_err(|e| e.to_string())?;
    ensure!(st.size == 64 * MIB, "the server set up {} bytes", st.size);
    ensure!(
        std::fs::metadata(store).map(|m| m.len()).unwrap_or(0) == 64 * MIB,
        "{store} is not the 64 MiB store"
    );
    let fio = std::thread::spawn(|| fio_verify(4, 8, "--randseed=7"));
    // Its write phase takes some 3 s under TCG.
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(
        !fio.is_finished(),
        "fio finished before the kill: make it longer"
    );
    first.kill();
    std::thread::sleep(Duration::from_millis(300));
    let second = Ramdisk::start(lang.serve)?;
    fio.join().map_err(|_| "fio thread panicked")??;
    // 2. A server started afresh reads back what the first run wrote.
    second.kill();
    let third = Ramdisk::start(lang.serve)?;
    fio_verify(4, 8, "--randseed=7 --verify_only")?;
    // 3. ext4 across a kill -9 with the filesystem mounted and dirty.
    sh(&format!("{MKFS_EXT4} -q -F {DEV} && mount {DEV} /mnt"))?;
    sh(
        // A tree of its own: other scenarios leave theirs in /tmp/tree.
        "rm -rf /tmp/tree && mkdir -p /tmp/tree && cp -r /lib/abuse/python /tmp/tree/ && i=0; while [ $i -lt 40 ]; do \
        dd if=/dev/urandom of=/tmp/tree/f$i bs=1k count=$((i * 37 % 500 + 1)) 2>/dev/null; \
        i=$((i + 1)); done; cp -r /tmp/tree /mnt/",
    )?;
    let want = sh("cd /tmp/tree && find . -type f | sort | xargs md5sum")?;
    third.kill();
    let fourth = Ramdisk::start(lang.serve)?;
    sh("umount /mnt")?;
    e2fsck_clean(DEV)?;
    fourth.kill();
    let fifth = Ramdisk::start(lang.serve)?;
    let got = sh("mount -o ro /dev/abuse0 /mnt && cd /mnt/tree && find . -type f | sort | xargs md5sum; cd /; umount /mnt")?;
    ensure!(
        got == want,
        "the tree read back differs:\n{got}\nwanted:\n{want}"
    );
    ensure!(
        want.lines().count() > 40,
        "the tree is too small to mean anything"
    );
    // 4. A clean stop.
    fifth.stop()?;
    let _ = std::fs::remove_file(store);
    teardown()
}

/// examples/c/ramdisk.c under fio --verify with a kill -9 and restarts.
pub fn c_ramdisk_server() -> Outcome {
    ramdisk_story(&C, "/dev/shm/ram-c")
}

/// python/ramdisk.py under fio --verify with a kill -9 and restarts.
pub fn python_ramdisk_server() -> Outcome {
    ramdisk_story(&PYTHON, "/dev/shm/ram-py")
}
