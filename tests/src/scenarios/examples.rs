//! The library's examples (servers/examples/, built statically into the
//! guest as /bin/abuse-example-*): servers written on `abuse_servers::Server`
//! outside the crate. Each is killed with SIGKILL in the middle of fio
//! --verify and restarted: nothing it acknowledged is lost (the ramdisk
//! keeps its bytes in a /dev/shm file mapped shared, xor in its file); a
//! server started afresh reads back what the first run wrote; ext4 on it is
//! e2fsck-clean; SIGTERM stops it with exit 0.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::servers::fio_verify;
use crate::ensure;
use crate::guest::{backing, control, e2fsck_clean, insmod, sh, teardown, Outcome, MKFS_EXT4};

const CTL: &str = "/dev/abctl0";
const DEV: &str = "/dev/abuse0";
const MIB: u64 = 1 << 20;

/// An example server process; killed (SIGKILL) when dropped.
struct Example {
    child: Child,
    what: String,
    log: String,
}

impl Example {
    /// Runs `argv`; it is up once it prints its "serving" line (after it
    /// set the device up).
    fn start(argv: &[&str]) -> Result<Example, String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = format!("/tmp/example-{n}.log");
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
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut s = Example { child, what, log };
        match rx.recv_timeout(Duration::from_secs(30)) {
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

    /// kill -9, and reaped: what it had fetched is pending again.
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

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One example's story, on a 64 MiB device `argv` sets up:
/// 1. fio --verify (4 jobs, 8 MiB each), the server killed (SIGKILL) in
///    the middle of it and restarted (the same command: the device is
///    configured, it takes it over): 0 errors, every block verifies;
/// 2. killed while idle, a new one started: fio --verify_only reads back
///    what the first run wrote;
/// 3. ext4 made, a tree copied in, the server killed with it mounted and
///    dirty, a new one started: umount writes back, e2fsck -fn is clean,
///    the tree reads back identical after a remount;
/// 4. returns the last server, still serving.
fn story(argv: &[&str]) -> Result<Example, String> {
    let first = Example::start(argv)?;
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(st.size == 64 * MIB, "the server set up {} bytes", st.size);
    // 1. kill -9 during fio, restart.
    let fio = std::thread::spawn(|| fio_verify(4, 8, "--randseed=7"));
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(
        !fio.is_finished(),
        "fio finished before the kill: make it longer"
    );
    first.kill();
    std::thread::sleep(Duration::from_millis(300));
    let second = Example::start(argv)?;
    fio.join().map_err(|_| "fio thread panicked")??;
    // 2. A server started afresh reads back what the first run wrote.
    second.kill();
    let third = Example::start(argv)?;
    fio_verify(4, 8, "--randseed=7 --verify_only")?;
    // 3. ext4 across a kill -9 with the filesystem mounted and dirty.
    sh(&format!("{MKFS_EXT4} -q -F {DEV} && mount {DEV} /mnt"))?;
    sh(
        "rm -rf /tmp/tree && mkdir -p /tmp/tree && i=0; while [ $i -lt 40 ]; do \
        dd if=/dev/urandom of=/tmp/tree/f$i bs=1k count=$((i * 37 % 500 + 1)) 2>/dev/null; \
        i=$((i + 1)); done; cp -r /tmp/tree /mnt/",
    )?;
    let want = sh("cd /tmp/tree && find . -type f | sort | xargs md5sum")?;
    third.kill();
    let fourth = Example::start(argv)?;
    sh("umount /mnt")?;
    e2fsck_clean(DEV)?;
    let got = sh(&format!(
        "mount -o ro {DEV} /mnt && cd /mnt/tree && find . -type f | sort | xargs md5sum; cd /; umount /mnt"
    ))?;
    ensure!(
        got == want,
        "the tree read back differs:\n{got}\nwanted:\n{want}"
    );
    ensure!(
        want.lines().count() == 40,
        "the tree is not the 40 files written"
    );
    Ok(fourth)
}

/// servers/examples/ramdisk.rs: its /dev/shm store keeps the data across
/// kill -9; SIGTERM stops it with exit 0.
pub fn example_ramdisk_server() -> Outcome {
    insmod("max_abuse=1")?;
    let store = "/dev/shm/ram-example";
    let _ = std::fs::remove_file(store);
    let last = story(&["/bin/abuse-example-ramdisk", CTL, store, "64"])?;
    ensure!(
        std::fs::metadata(store).map(|m| m.len()).unwrap_or(0) == 64 * MIB,
        "{store} is not the 64 MiB store"
    );
    last.stop()?;
    let _ = std::fs::remove_file(store);
    teardown()
}

/// servers/examples/xor.rs over a file: its file keeps the data across
/// kill -9, and holds it XORed (zeroes written through the device read in
/// the file as the key); SIGTERM stops it with exit 0.
pub fn example_xor_server() -> Outcome {
    insmod("max_abuse=1")?;
    let file = "/tmp/xor.img";
    backing(file, 64 * MIB)?;
    let last = story(&["/bin/abuse-example-xor", CTL, file, "k3y!"])?;
    sh(&format!(
        "dd if=/dev/zero of={DEV} bs=4k count=1 oflag=direct conv=fsync 2>&1"
    ))?;
    let mut back = vec![1u8; 4096];
    std::io::Read::read_exact(
        &mut std::fs::File::open(DEV).map_err(|e| e.to_string())?,
        &mut back,
    )
    .map_err(|e| format!("reading {DEV}: {e}"))?;
    ensure!(
        back.iter().all(|&b| b == 0),
        "zeroes written through xor read back as {:?}",
        &back[..16]
    );
    last.stop()?;
    let head = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
    ensure!(
        head[..4096].chunks(4).all(|c| c == b"k3y!"),
        "zeroes written through xor are not the key in the file: {:?}",
        &head[..16]
    );
    teardown()
}
