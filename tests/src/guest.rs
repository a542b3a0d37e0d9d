//! Helpers for scenarios running inside the test VM: loading the module,
//! running commands, waiting for conditions.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A scenario's outcome: `Err` carries what went wrong.
pub type Outcome = Result<(), String>;

/// One named rule proven in the VM.
pub struct Scenario {
    pub name: &'static str,
    pub run: fn() -> Outcome,
}

// The real tools, by absolute path: busybox's shell runs its own applets
// (without -z, --reuid, ...) ahead of PATH.
pub const MKFS_EXT4: &str = "/sbin/mke2fs -t ext4";
pub const E2FSCK: &str = "/sbin/e2fsck";
pub const BLKDISCARD: &str = "/sbin/blkdiscard";
pub const SFDISK: &str = "/sbin/sfdisk";
pub const SETPRIV: &str = "/usr/bin/setpriv";

/// `e2fsck -fn` finds nothing to fix on `dev` (a device or an image).
pub fn e2fsck_clean(dev: &str) -> Outcome {
    // -n: exit 0 only when clean; the output is checked too, for the log.
    let out = sh(&format!("{E2FSCK} -fn {dev} 2>&1"))?;
    if out.contains("ERROR") || out.contains("corrupt") {
        return Err(format!("e2fsck -fn {dev}: {out}"));
    }
    Ok(())
}

/// Where /init puts the module.
pub const MODULE: &str = "/lib/abuse/abuse.ko";

/// Fails the scenario with a message unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Runs a command line with `sh -c`; returns stdout, or an error with the
/// exit status and stderr.
pub fn sh(cmd: &str) -> Result<String, String> {
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{cmd}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Loads the module with `params` (e.g. "max_abuse=4").
pub fn insmod(params: &str) -> Outcome {
    sh(&format!("insmod {MODULE} {params}")).map(|_| ())
}

/// Unloads the module.
pub fn rmmod() -> Outcome {
    sh("rmmod abuse").map(|_| ())
}

/// Whether the module is loaded.
pub fn loaded() -> bool {
    std::fs::read_to_string("/proc/modules")
        .is_ok_and(|m| m.lines().any(|l| l.starts_with("abuse ")))
}

/// Unloads the module if a scenario left it loaded (so the next starts
/// clean): kills leftover servers, resets every device, then rmmod.
pub fn ensure_unloaded() {
    // RESET before unmounting: a filesystem a failed scenario left mounted
    // has no server any more, and unmounting it would wait for its
    // writeback forever (I/O waits for a server); RESET fails that I/O.
    kill_servers();
    if loaded() {
        reset_all();
    }
    let _ = Command::new("/bin/sh")
        .args([
            "-c",
            "umount /mnt 2>/dev/null; umount /mnt2 2>/dev/null; true",
        ])
        .status();
    if loaded() {
        let _ = rmmod();
    }
}

/// SIGKILLs every server process (`abuse-guest serve`, `abusectl server`)
/// a scenario left behind, and
/// waits until they are gone (their control files closed).
pub fn kill_servers() {
    while signal_servers() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGKILL to the live servers; false if there were none.
fn signal_servers() -> bool {
    let mut any = false;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    for p in procs.filter_map(|e| e.ok()) {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let mut args = cmdline.split(|&b| b == 0);
        let exe = args.next().unwrap_or_default();
        // Zombies have an empty cmdline: they have closed their files.
        let verb = args.next();
        let test_server = exe.ends_with(b"abuse-guest") && verb == Some(b"serve");
        let real_server = exe.ends_with(b"abusectl") && verb == Some(b"server");
        if test_server || real_server {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            any = true;
        }
    }
    any
}

/// Ends a scenario: stops its servers, RESETs every device, unloads.
pub fn teardown() -> Outcome {
    kill_servers();
    reset_all();
    rmmod()
}

/// RESETs every device.
pub fn reset_all() {
    for n in dev_nodes("abctl") {
        if let Ok(c) = abuse_sys::Control::open(format!("/dev/{n}")) {
            let _ = c.reset();
        }
    }
}

/// Opens a control node, with the error as a message.
pub fn control(path: &str) -> Result<abuse_sys::Control, String> {
    abuse_sys::Control::open(path).map_err(|e| e.to_string())
}

/// A SET_STATUS argument.
pub fn config(
    size: u64,
    block_size: u32,
    queue_depth: u32,
    flags: u32,
    timeout_ms: u32,
) -> abuse_sys::AbuseStatus {
    abuse_sys::AbuseStatus {
        size,
        block_size,
        queue_depth,
        flags,
        timeout_ms,
        ..Default::default()
    }
}

/// Configures `ctl`.
pub fn setup(ctl: &str, st: &abuse_sys::AbuseStatus) -> Outcome {
    control(ctl)?.set_status(st).map_err(|e| e.to_string())
}

/// A sparse backing file of `size` bytes (in the guest's tmpfs).
pub fn backing(path: &str, size: u64) -> Outcome {
    let f = std::fs::File::create(path).map_err(|e| format!("{path}: {e}"))?;
    f.set_len(size).map_err(|e| format!("{path}: {e}"))
}

/// Deterministic test data: `len` bytes that differ by `seed` and offset.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A test server process (`abuse-guest serve`); killed when dropped.
pub struct Server {
    child: std::process::Child,
    stats: String,
}

impl Server {
    /// Starts `abuse-guest serve --ctl CTL --backing FILE --stats ... ARGS`.
    pub fn start(ctl: &str, file: &str, args: &[&str]) -> Result<Server, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let stats = Self::stats_path();
        let head = ["serve", "--ctl", ctl, "--backing", file, "--stats", &stats];
        Self::spawn(
            exe.to_str().unwrap_or("abuse-guest"),
            &head,
            args,
            stats.clone(),
        )
    }

    /// Starts `abusectl server CTL ARGS --stats-file ...`: the real engine.
    pub fn abusectl(ctl: &str, args: &[&str]) -> Result<Server, String> {
        Self::abusectl_logged(ctl, args, None)
    }

    /// As [`Server::abusectl`], with its stderr in the file `log`.
    pub fn abusectl_logged(ctl: &str, args: &[&str], log: Option<&str>) -> Result<Server, String> {
        let stats = Self::stats_path();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--stats-file", &stats]);
        let mut cmd = Command::new("/bin/abusectl");
        cmd.args(["server", ctl]).args(&all);
        if let Some(log) = log {
            let f = std::fs::File::create(log).map_err(|e| format!("{log}: {e}"))?;
            cmd.stderr(f);
        }
        Self::spawn_cmd(cmd, "abusectl server", stats)
    }

    /// As [`Server::abusectl_logged`], run as user and group `id` (setpriv),
    /// with its stats where that user may write them.
    pub fn abusectl_as(id: u32, ctl: &str, args: &[&str], log: &str) -> Result<Server, String> {
        let stats = Self::stats_path();
        let mut cmd = Command::new("/usr/bin/setpriv");
        let (reuid, regid) = (format!("--reuid={id}"), format!("--regid={id}"));
        cmd.args([
            reuid.as_str(),
            regid.as_str(),
            "--clear-groups",
            "/bin/abusectl",
            "server",
            ctl,
        ])
        .args(args)
        .args(["--stats-file", &stats]);
        let f = std::fs::File::create(log).map_err(|e| format!("{log}: {e}"))?;
        cmd.stderr(f);
        Self::spawn_cmd(cmd, "abusectl server (as another user)", stats)
    }

    fn stats_path() -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stats = format!("/tmp/stats-{}-{n}.json", std::process::id());
        let _ = std::fs::remove_file(&stats);
        stats
    }

    /// Runs `program HEAD ARGS`; it is up once it has written `stats`.
    fn spawn(program: &str, head: &[&str], args: &[&str], stats: String) -> Result<Server, String> {
        let mut cmd = Command::new(program);
        cmd.args(head).args(args);
        Self::spawn_cmd(cmd, &format!("{program} {}", head.join(" ")), stats)
    }

    fn spawn_cmd(mut cmd: Command, what: &str, stats: String) -> Result<Server, String> {
        let child = cmd.spawn().map_err(|e| format!("starting {what}: {e}"))?;
        let mut s = Server { child, stats };
        // Generous: a cow server hashes its base first (slow under TCG).
        let up = wait_for(Duration::from_secs(30), || {
            Path::new(&s.stats).exists() || matches!(s.child.try_wait(), Ok(Some(_)))
        });
        if !up || !Path::new(&s.stats).exists() {
            return Err(format!("{what} did not start ({:?})", s.child.try_wait()));
        }
        Ok(s)
    }

    /// Waits up to `timeout` for it to exit by itself; its exit status.
    pub fn exit_status(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_for(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// Sends `sig`.
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> Outcome {
        nix::sys::signal::kill(self.pid(), sig).map_err(|e| e.to_string())
    }

    /// What the server saw so far.
    pub fn stats(&self) -> serde_json::Value {
        std::fs::read_to_string(&self.stats)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// A counter from the stats.
    pub fn stat(&self, key: &str) -> u64 {
        self.stats()[key].as_u64().unwrap_or(0)
    }

    /// Sends `sig` and waits for it to exit; returns its exit status.
    pub fn stop_with(
        mut self,
        sig: nix::sys::signal::Signal,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus, String> {
        self.signal(sig)?;
        let mut status = None;
        wait_for(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status.ok_or_else(|| format!("server did not exit within {timeout:?} of {sig}"))
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(mut self) {
        self.stop();
    }

    /// Waits for it to exit by itself.
    pub fn wait(mut self, timeout: Duration) -> Outcome {
        let ok = wait_for(timeout, || matches!(self.child.try_wait(), Ok(Some(_))));
        self.stop();
        if ok {
            Ok(())
        } else {
            Err("server did not exit".into())
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `abusectl ARGS`; returns (success, stdout + stderr).
pub fn abusectl(args: &str) -> (bool, String) {
    match Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("/bin/abusectl {args} 2>&1"))
        .output()
    {
        Ok(out) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// The kernel log.
pub fn dmesg() -> String {
    sh("dmesg").unwrap_or_default()
}

/// A file's contents as a string, trimmed ("" if unreadable).
pub fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Opens a block device for direct I/O.
pub fn open_direct(path: &str, write: bool) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("{path}: {e}"))
}

/// A buffer of `len` bytes aligned to 4096 (for O_DIRECT).
pub struct Aligned {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize) -> Self {
        let raw = vec![0u8; len + 4096];
        let off = raw.as_ptr().align_offset(4096);
        Aligned { raw, off, len }
    }

    pub fn from(data: &[u8]) -> Self {
        let mut a = Self::new(data.len());
        a.as_mut().copy_from_slice(data);
        a
    }
}

impl AsRef<[u8]> for Aligned {
    fn as_ref(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }
}

impl AsMut<[u8]> for Aligned {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Names in /dev starting with `prefix`, sorted.
pub fn dev_nodes(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether a path exists.
pub fn exists(p: &str) -> bool {
    Path::new(p).exists()
}
