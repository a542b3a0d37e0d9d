//! Backends that serve storage users already have: an NBD server (nbdkit)
//! behind ABUSE, and qemu's qcow2 images.

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

/// `qemu-img check IMAGE`: "No errors" and exit 0, or why not.
fn qemu_img_clean(img: &str) -> Outcome {
    let out = sh(&format!("/usr/bin/qemu-img check {img} 2>&1; echo rc=$?"))?;
    ensure!(
        out.contains("No errors") && out.contains("rc=0"),
        "qemu-img check {img}:\n{out}"
    );
    Ok(())
}

/// `abusectl server CTL qcow2 IMAGE` on images qemu-img made: over a raw
/// backing file, fio --verify with 64 KiB clusters allocated under it, ext4
/// made, filled and e2fsck-clean; after a clean stop `qemu-img check` is
/// clean and `qemu-img compare` finds the image equal to what the device
/// showed. Then a server killed with SIGKILL in the middle of a verified
/// run: another takes its requests over (fio sees no error), the image is
/// dirty meanwhile, and after a clean stop `qemu-img check` is clean again.
pub fn qcow2_backend() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/q-base.raw", 64 * MIB)?;
    sh("dd if=/dev/urandom of=/tmp/q-base.raw bs=1M count=8 conv=notrunc 2>/dev/null")?;
    sh("/usr/bin/qemu-img create -q -f qcow2 -b /tmp/q-base.raw -F raw /tmp/q.qcow2")?;
    let start = |args: &[&str]| {
        Server::abusectl_logged(CTL, args, Some("/tmp/q-server.log")).map_err(|e| {
            let log = std::fs::read_to_string("/tmp/q-server.log").unwrap_or_default();
            format!("{e}:\n{log}")
        })
    };
    let server = start(&["qcow2", "/tmp/q.qcow2", "--setup", "qs=64"])?;
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(st.size == 64 * MIB, "size {} from a 64 MiB image", st.size);
    ensure!(
        st.flags & ABUSE_FLAG_FLUSH != 0 && st.flags & ABUSE_FLAG_DISCARD != 0,
        "qcow2 flushes and discards, the device says {:#x}",
        st.flags
    );
    // Unwritten clusters read the backing file.
    let same = sh(&format!(
        "cmp -n 8388608 {DEV} /tmp/q-base.raw && echo same"
    ))?;
    ensure!(
        same.contains("same"),
        "the backing file's data does not show"
    );
    fio_verify(2, 8, "")?;
    sh(&format!(
        "{MKFS_EXT4} -q -F {DEV} && mount {DEV} /mnt && cp -r /etc /mnt/ && dd if=/dev/urandom of=/mnt/f bs=1M count=8 2>/dev/null && umount /mnt"
    ))?;
    e2fsck_clean(DEV)?;
    sh(&format!(
        "dd if={DEV} of=/tmp/q-shown.raw bs=1M 2>/dev/null"
    ))?;
    let status = server.stop_with(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30))?;
    ensure!(status.success(), "the server stopped with {status}");
    qemu_img_clean("/tmp/q.qcow2")?;
    let cmp = sh(
        "/usr/bin/qemu-img compare -f qcow2 -F raw /tmp/q.qcow2 /tmp/q-shown.raw 2>&1; echo rc=$?",
    )?;
    ensure!(
        cmp.contains("Images are identical") && cmp.contains("rc=0"),
        "qemu-img reads the image differently from the device:\n{cmp}"
    );

    // Killed mid-run: the next server takes over and repairs.
    // The device stays set up: the next servers just serve it.
    let args = ["qcow2", "/tmp/q.qcow2"];
    let victim = start(&args)?;
    let fio = std::thread::spawn(|| fio_verify(2, 16, "--randseed=21 --offset=16M"));
    std::thread::sleep(Duration::from_secs(3));
    victim.kill();
    let info = sh("/usr/bin/qemu-img info --force-share --output=json /tmp/q.qcow2")?;
    ensure!(
        info.contains("\"dirty-flag\": true"),
        "a killed server's image is not marked dirty:\n{info}"
    );
    let next = start(&args)?;
    fio.join().map_err(|_| "fio panicked")??;
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(
        st.errors == 0,
        "{} requests failed across the kill",
        st.errors
    );
    let status = next.stop_with(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30))?;
    ensure!(status.success(), "the second server stopped with {status}");
    qemu_img_clean("/tmp/q.qcow2")?;
    teardown()
}

/// qemu-nbd in the foreground serving `image` (format `fmt`) on `SOCK`,
/// several connections allowed; killed when dropped.
struct QemuNbd(Child);

impl QemuNbd {
    fn start(image: &str, fmt: &str) -> Result<QemuNbd, String> {
        let _ = std::fs::remove_file(SOCK);
        let child = Command::new("/usr/bin/qemu-nbd")
            .args(["-k", SOCK, "-f", fmt, "-e", "8", "--cache=writeback", image])
            .spawn()
            .map_err(|e| format!("qemu-nbd: {e}"))?;
        let q = QemuNbd(child);
        ensure!(
            wait_for(Duration::from_secs(20), || exists(SOCK)),
            "qemu-nbd did not listen on {SOCK}"
        );
        Ok(q)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The nbd backend in front of qemu-nbd (serving a qcow2 image): fio
/// --verify passes while qemu-nbd is stopped and restarted under it; ext4
/// on it is e2fsck-clean; and qemu-img reads the image as the device
/// showed it, with `qemu-img check` clean.
pub fn nbd_backend_qemu_nbd() -> Outcome {
    insmod("max_abuse=1")?;
    let img = "/tmp/qn.qcow2";
    sh(&format!("/usr/bin/qemu-img create -q -f qcow2 {img} 64M"))?;
    let mut qemu_nbd = QemuNbd::start(img, "qcow2")?;
    let server = Server::abusectl_logged(
        CTL,
        &["nbd", &format!("unix:{SOCK}"), "--setup", "qs=64"],
        Some("/tmp/qn-server.log"),
    )?;
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(st.size == 64 * MIB, "size {} from a 64 MiB image", st.size);
    fio_verify(2, 8, "")?;
    let fio = std::thread::spawn(|| fio_verify(2, 16, "--randseed=13"));
    std::thread::sleep(Duration::from_secs(3));
    // SIGTERM: qemu-nbd keeps qcow2 metadata in memory until a flush, so
    // a SIGKILL would lose acknowledged writes whatever the client does.
    let pid = nix::unistd::Pid::from_raw(qemu_nbd.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).map_err(|e| e.to_string())?;
    let _ = qemu_nbd.0.wait();
    std::thread::sleep(Duration::from_secs(1));
    qemu_nbd = QemuNbd::start(img, "qcow2")?;
    fio.join().map_err(|_| "fio panicked")??;
    let log = std::fs::read_to_string("/tmp/qn-server.log").unwrap_or_default();
    ensure!(
        log.contains("reconnected"),
        "no reconnection after qemu-nbd restarted:\n{log}"
    );
    sh(&format!(
        "{MKFS_EXT4} -q -F {DEV} && mount {DEV} /mnt && cp -r /etc /mnt/ && umount /mnt"
    ))?;
    e2fsck_clean(DEV)?;
    sh(&format!(
        "dd if={DEV} of=/tmp/qn-shown.raw bs=1M 2>/dev/null"
    ))?;
    drop(server);
    drop(qemu_nbd);
    qemu_img_clean(img)?;
    let cmp = sh(&format!(
        "/usr/bin/qemu-img compare -f qcow2 -F raw {img} /tmp/qn-shown.raw 2>&1; echo rc=$?"
    ))?;
    ensure!(
        cmp.contains("Images are identical") && cmp.contains("rc=0"),
        "the image differs from what the device showed:\n{cmp}"
    );
    teardown()
}

/// A slow NBD server (nbdkit's delay filter: 100 ms per read and write):
/// verified I/O still succeeds, nothing times out, and the requests wait
/// on the server together (many per connection: pipelined), not one after another.
pub fn nbd_slow_server() -> Outcome {
    insmod("max_abuse=1")?;
    let _nbdkit = Nbdkit::start(&[
        "--filter=delay",
        "memory",
        "16M",
        "delay-read=100ms",
        "delay-write=100ms",
    ])?;
    let _server = Server::abusectl_logged(
        CTL,
        &["nbd", &format!("unix:{SOCK}"), "--setup", "qs=32"],
        Some("/tmp/nbd-slow.log"),
    )?;
    // 2 jobs x 256 KiB of 4 KiB writes, then the same reads: 256
    // requests, 25.6 s one after another, 6.4 s one per connection (4).
    // Pipelined, the 16 the jobs keep in flight wait on the server
    // together (nbdkit runs 16 per connection): 1.6 s, and fio's own
    // start-up (4.6 s in all measured under TCG).
    let start = std::time::Instant::now();
    fio_verify(2, 1, "--iodepth=8 --size=256k --offset_increment=256k")?;
    let took = start.elapsed();
    ensure!(
        took < Duration::from_millis(6_400),
        "256 requests of 100 ms took {took:?}: no more than one per connection waited on the server at a time"
    );
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(st.errors == 0, "{} requests failed", st.errors);
    teardown()
}
