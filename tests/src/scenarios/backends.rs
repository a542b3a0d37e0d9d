//! Backends that serve storage users already have: an NBD server (nbdkit)
//! behind ABUSE.

use std::process::{Child, Command};
use std::time::Duration;

use abuse_sys::uapi::*;

use super::servers::fio_verify;
use crate::ensure;
use crate::guest::{
    backing, control, e2fsck_clean, exists, insmod, sh, teardown, wait_for, Outcome, Server,
    MKFS_EXT4,
};

const CTL: &str = "/dev/abctl0";
const DEV: &str = "/dev/abuse0";
const MIB: u64 = 1 << 20;
const SOCK: &str = "/tmp/nbd.sock";

/// nbdkit in the foreground on `SOCK` with `args`; killed when dropped.
struct Nbdkit(Child);

impl Nbdkit {
    fn start(args: &[&str]) -> Result<Nbdkit, String> {
        let _ = std::fs::remove_file(SOCK);
        let child = Command::new("/usr/bin/nbdkit")
            .args(["-f", "-U", SOCK])
            .args(args)
            .spawn()
            .map_err(|e| format!("nbdkit: {e}"))?;
        let n = Nbdkit(child);
        ensure!(
            wait_for(Duration::from_secs(20), || exists(SOCK)),
            "nbdkit did not listen on {SOCK}"
        );
        Ok(n)
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `abusectl server CTL nbd unix:SOCK` in front of nbdkit's file plugin:
/// the device takes the export's size and features; fio --verify passes
/// while nbdkit is killed and restarted under it (the server reconnects,
/// fio sees no error); ext4 on it is e2fsck-clean; and the file behind
/// nbdkit holds exactly what the device shows.
pub fn nbd_backend() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/nbd.img", 64 * MIB)?;
    let file = ["file", "/tmp/nbd.img"];
    let mut nbdkit = Nbdkit::start(&file)?;
    let server = Server::abusectl_logged(
        CTL,
        &["nbd", &format!("unix:{SOCK}"), "--setup", "qs=64"],
        Some("/tmp/nbd-server.log"),
    )?;
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(st.size == 64 * MIB, "size {} from a 64 MiB export", st.size);
    ensure!(
        st.flags & ABUSE_FLAG_FLUSH != 0 && st.flags & ABUSE_FLAG_WRITE_ZEROES != 0,
        "nbdkit's file plugin flushes and zeroes, the device says {:#x}",
        st.flags
    );
    fio_verify(2, 8, "")?;
    // The NBD server dies and comes back in the middle of a verified run.
    let fio = std::thread::spawn(|| fio_verify(2, 16, "--randseed=11"));
    std::thread::sleep(Duration::from_secs(3));
    let _ = nbdkit.0.kill();
    let _ = nbdkit.0.wait();
    std::thread::sleep(Duration::from_secs(1));
    nbdkit = Nbdkit::start(&file)?;
    fio.join().map_err(|_| "fio panicked")??;
    let log = std::fs::read_to_string("/tmp/nbd-server.log").unwrap_or_default();
    ensure!(
        log.contains("reconnected"),
        "no reconnection after nbdkit restarted:\n{log}"
    );
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(
        st.errors == 0,
        "{} requests failed across the restart",
        st.errors
    );
    sh(&format!(
        "{MKFS_EXT4} -q -F {DEV} && mount {DEV} /mnt && cp -r /etc /mnt/ && dd if=/dev/urandom of=/mnt/f bs=1M count=8 2>/dev/null && umount /mnt"
    ))?;
    e2fsck_clean(DEV)?;
    let same = sh(&format!("cmp {DEV} /tmp/nbd.img && echo same"))?;
    ensure!(
        same.contains("same"),
        "the file behind nbdkit differs from the device"
    );
    drop(server);
    drop(nbdkit);
    teardown()
}

/// An error the NBD server returns is that request's error, not a broken
/// connection: with nbdkit's error filter failing reads (while a trigger
/// file exists), a read through the device fails with EIO and the next
/// one, after the trigger is gone, succeeds with no reconnection.
pub fn nbd_errors_reach_the_reader() -> Outcome {
    insmod("max_abuse=1")?;
    let _ = std::fs::remove_file("/tmp/nbd-fail");
    let _nbdkit = Nbdkit::start(&[
        "--filter=error",
        "memory",
        "16M",
        "error-pread=EIO",
        "error-pread-rate=100%",
        "error-pread-file=/tmp/nbd-fail",
    ])?;
    let server = Server::abusectl_logged(
        CTL,
        &[
            "nbd",
            &format!("nbd+unix:///?socket={SOCK}"),
            "--setup",
            "qs=16,timeout=0",
        ],
        Some("/tmp/nbd-err.log"),
    )?;
    sh(&format!(
        "dd if=/dev/urandom of={DEV} bs=4096 count=4 oflag=direct 2>/dev/null"
    ))?;
    std::fs::write("/tmp/nbd-fail", b"").map_err(|e| e.to_string())?;
    let failed = sh(&format!(
        "dd if={DEV} of=/dev/null bs=4096 count=1 iflag=direct 2>&1; echo rc=$?"
    ))?;
    ensure!(
        failed.contains("Input/output error") && !failed.contains("rc=0"),
        "a read the NBD server fails: {failed}"
    );
    std::fs::remove_file("/tmp/nbd-fail").map_err(|e| e.to_string())?;
    sh(&format!(
        "dd if={DEV} of=/dev/null bs=4096 count=4 iflag=direct 2>/dev/null"
    ))?;
    let log = std::fs::read_to_string("/tmp/nbd-err.log").unwrap_or_default();
    ensure!(
        !log.contains("connection lost"),
        "a request error was taken for a dropped connection:\n{log}"
    );
    drop(server);
    teardown()
}
