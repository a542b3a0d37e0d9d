//! Protocol safety: a stalled server is fenced, never overtaken; a reset
//! leaves nothing of the old configuration behind; servers notice what
//! happened to their device; errors reach the filesystem as what they are.

use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use abuse_sys::uapi::*;
use nix::errno::Errno;
use nix::sys::signal::Signal;

use crate::ensure;
use crate::guest::{
    abusectl, backing, config, control, dmesg, insmod, open_direct, pattern, read_trimmed, setup,
    sh, teardown, wait_for, Aligned, Outcome, Server, MKFS_EXT4, SFDISK,
};

const CTL: &str = "/dev/abctl0";
const DEV: &str = "/dev/abuse0";
const MIB: u64 = 1 << 20;

fn status() -> Result<AbuseStatus, String> {
    control(CTL)?.status().map_err(|e| e.to_string())
}

/// Each PUT entry of `bad` is refused with `want` and changes nothing: the
/// `in_flight` fetched requests stay fetched.
pub(super) fn puts_refused(
    ctl: &abuse_sys::Control,
    bad: &[(&str, AbuseBio)],
    in_flight: u32,
    want: Errno,
) -> Outcome {
    for (what, b) in bad {
        let e = ctl.put_bios(&[*b]).err().map(|e| e.errno());
        ensure!(e == Some(want), "{what}: {e:?}, want {want}");
        ensure!(
            status()?.in_flight == in_flight,
            "{what}: a fetched request moved"
        );
    }
    Ok(())
}

/// Writes `data` at `at` through the device (O_DIRECT) in a thread.
fn write_async(at: u64, data: Vec<u8>) -> std::thread::JoinHandle<Outcome> {
    std::thread::spawn(move || {
        let f = open_direct(DEV, true)?;
        f.write_all_at(Aligned::from(&data).as_ref(), at)
            .map_err(|e| format!("write at {at}: {e}"))
    })
}

/// Joins `h`, failing if it takes longer than `timeout`.
fn join_within(h: std::thread::JoinHandle<Outcome>, timeout: Duration, what: &str) -> Outcome {
    ensure!(
        wait_for(timeout, || h.is_finished()),
        "{what} did not finish within {timeout:?}"
    );
    h.join().map_err(|_| format!("{what} panicked"))?
}

/// A server that fetched a WRITE is stopped (SIGSTOP) past the 2 s
/// timeout: the driver kills it and keeps the request until its file is
/// released; a second server then completes it; a newer write to the same
/// block completes; resuming the killed server changes nothing (its late
/// pwrite of the old data would land over the newer data, were it alive):
/// the block holds the newer data, and dmesg names the killed pid.
pub fn fence_stalled_server() -> Outcome {
    insmod("max_abuse=1")?;
    let img = "/tmp/fence.img";
    backing(img, 16 * MIB)?;
    setup(CTL, &config(16 * MIB, 4096, 16, 0, 2000))?;
    // Fetches one request, holds it 5 s, then writes it to the backing
    // file and PUTs it: the late write of a stalled server.
    let stalled = Server::start(CTL, img, &["--hold-ms", "5000", "--batch", "1"])?;
    let (old, new) = (pattern(1, 4096), pattern(2, 4096));
    let first = write_async(0, old.clone());
    ensure!(
        wait_for(Duration::from_secs(10), || stalled.stat("max_get") > 0),
        "the first server fetched nothing"
    );
    stalled.signal(Signal::SIGSTOP)?;
    let stopped_at = Instant::now();
    let rescuer = Server::start(CTL, img, &[])?;
    // Only once the stalled server is dead does the write go to the rescuer.
    join_within(first, Duration::from_secs(15), "the first write")?;
    let took = stopped_at.elapsed();
    ensure!(
        took >= Duration::from_millis(1500),
        "the write completed {took:?} after the stop: before the 2 s timeout"
    );
    join_within(
        write_async(0, new.clone()),
        Duration::from_secs(10),
        "the newer write",
    )?;
    // Wake it: were it alive, its hold would end and its write land.
    let _ = stalled.signal(Signal::SIGCONT);
    std::thread::sleep(Duration::from_secs(6));
    let mut back = vec![0u8; 4096];
    std::fs::File::open(img)
        .and_then(|f| f.read_exact_at(&mut back, 0))
        .map_err(|e| e.to_string())?;
    ensure!(
        back == new,
        "the backing file does not hold the newer write"
    );
    let mut dev = Aligned::new(4096);
    open_direct(DEV, false)?
        .read_exact_at(dev.as_mut(), 0)
        .map_err(|e| e.to_string())?;
    ensure!(
        dev.as_ref() == new,
        "the device does not read the newer write"
    );
    let pid = stalled.pid();
    let mut stalled = stalled;
    let exit = stalled.exit_status(Duration::from_secs(1));
    ensure!(
        exit.and_then(|s| s.signal()) == Some(Signal::SIGKILL as i32),
        "the stalled server was not killed: {exit:?}"
    );
    let log = dmesg();
    ensure!(
        log.contains(&format!("server pid {pid} (abuse-guest)")),
        "dmesg does not name the killed pid {pid}"
    );
    let st = status()?;
    ensure!(
        st.timeouts >= 1 && st.requeues >= 1 && st.errors == 0,
        "counters: {st:?}"
    );
    ensure!(
        rescuer.stat("requeued") >= 1,
        "the rescuer saw no REQUEUED request"
    );
    drop(rescuer);
    teardown()
}

/// Opens the device (which reads its partition table) and waits for
/// /dev/abuse0p1 to appear.
fn scan_partitions(when: &str) -> Outcome {
    sh(&format!(
        "dd if={DEV} of=/dev/null bs=4k count=1 2>/dev/null"
    ))?;
    ensure!(
        wait_for(Duration::from_secs(5), || std::path::Path::new(
            "/dev/abuse0p1"
        )
        .exists()),
        "no /dev/abuse0p1 after {when}"
    );
    Ok(())
}

/// RESET leaves nothing of the old configuration: a filesystem mounted
/// across it is shut down and SET_STATUS refuses (EBUSY, "still open:
/// unmount it first") until it is unmounted; partitions are dropped; the
/// disk sequence number and the configuration generation change; a new
/// backing file shows its own data, not the old one's.
pub fn reset_leaves_nothing_behind() -> Outcome {
    insmod("max_abuse=1 max_part=4")?;
    backing("/tmp/a.img", 32 * MIB)?;
    sh(&format!(
        "echo 'start=2048, size=30720' | {SFDISK} -q /tmp/a.img"
    ))?;
    let log = "/tmp/reset-server.log";
    let mut server =
        Server::abusectl_logged(CTL, &["file", "/tmp/a.img", "--setup", ""], Some(log))?;
    let (seq0, gen0) = (
        read_trimmed("/sys/block/abuse0/diskseq"),
        status()?.generation,
    );
    scan_partitions("the first setup")?;
    sh(&format!(
        "{MKFS_EXT4} -q -F /dev/abuse0p1 && mount /dev/abuse0p1 /mnt && echo old > /mnt/f && sync"
    ))?;
    let (ok, out) = abusectl(&format!("reset {CTL}"));
    ensure!(ok, "reset while mounted: {out}");
    // The server was started for the old configuration: it stops, non-zero.
    let exit = server.exit_status(Duration::from_secs(5));
    ensure!(
        exit.is_some_and(|s| !s.success()),
        "the server kept going after RESET: {exit:?}"
    );
    let said = std::fs::read_to_string(log).unwrap_or_default();
    ensure!(
        said.contains("was reset under this server"),
        "server said: {said}"
    );
    // The filesystem mounted from the old medium was shut down.
    ensure!(
        sh("echo new > /mnt/g && sync /mnt/g").is_err(),
        "a write to the filesystem mounted across RESET succeeded"
    );
    let st = status()?;
    ensure!(
        st.flags & ABUSE_FLAG_CONFIGURED == 0 && st.generation > gen0,
        "after RESET: {st:?} (generation was {gen0})"
    );
    ensure!(
        read_trimmed("/sys/block/abuse0/size") == "0",
        "capacity not 0"
    );
    ensure!(
        read_trimmed("/sys/block/abuse0/diskseq") != seq0,
        "no new disk sequence number"
    );
    // Still mounted: a new configuration is refused, in words.
    let (ok, out) = abusectl(&format!("setup {CTL} size=16M"));
    ensure!(
        !ok && out.contains("still open") && out.contains("unmount it first"),
        "setup while mounted: {ok} {out}"
    );
    ensure!(
        status()?.flags & ABUSE_FLAG_CONFIGURED == 0,
        "setup while mounted changed the device"
    );
    sh("umount /mnt")?;
    // A new backing file without a partition table: its data, no p1.
    let b = pattern(7, 4096);
    backing("/tmp/b.img", 16 * MIB)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open("/tmp/b.img")
        .and_then(|f| f.write_all_at(&b, 0))
        .map_err(|e| e.to_string())?;
    let _server = Server::abusectl(CTL, &["file", "/tmp/b.img", "--setup", ""])?;
    let mut got = vec![0u8; 4096];
    std::fs::File::open(DEV)
        .and_then(|f| f.read_exact_at(&mut got, 0))
        .map_err(|e| e.to_string())?;
    ensure!(got == b, "block 0 is not the new backing file's");
    ensure!(
        wait_for(Duration::from_secs(5), || !std::path::Path::new(
            "/sys/block/abuse0/abuse0p1"
        )
        .exists()),
        "the old partition survived into the new configuration"
    );
    ensure!(
        status()?.generation > gen0 + 1,
        "setup did not change the generation"
    );
    drop(_server);
    // Reset with nothing open: the partitions go at once.
    crate::guest::kill_servers();
    control(CTL)?.reset().map_err(|e| e.to_string())?;
    let _server = Server::abusectl(CTL, &["file", "/tmp/a.img", "--setup", ""])?;
    scan_partitions("setting a.img up again")?;
    control(CTL)?.reset().map_err(|e| e.to_string())?;
    ensure!(
        !std::path::Path::new("/sys/block/abuse0/abuse0p1").exists(),
        "RESET left the partition"
    );
    drop(_server);
    teardown()
}

/// A GET_STATUS result with RECONNECT added is a valid SET_STATUS: it
/// changes nothing (nor the generation); with another queue depth and
/// read-only it changes just those.
pub fn status_round_trip_reconnect() -> Outcome {
    insmod("max_abuse=1")?;
    setup(CTL, &config(32 * MIB, 512, 32, ABUSE_FLAG_FLUSH, 5000))?;
    let ctl = control(CTL)?;
    let before = ctl.status().map_err(|e| e.to_string())?;
    let mut st = before;
    st.flags |= ABUSE_FLAG_RECONNECT;
    ctl.set_status(&st)
        .map_err(|e| format!("round trip: {e}"))?;
    let same = ctl.status().map_err(|e| e.to_string())?;
    ensure!(
        same == before,
        "round trip changed the device: {before:?} -> {same:?}"
    );
    st.queue_depth = 64;
    st.flags |= ABUSE_FLAG_READ_ONLY;
    ctl.set_status(&st)
        .map_err(|e| format!("round trip with changes: {e}"))?;
    let now = ctl.status().map_err(|e| e.to_string())?;
    ensure!(
        now.queue_depth == 64
            && now.flags & ABUSE_FLAG_READ_ONLY != 0
            && now.flags & ABUSE_FLAG_FLUSH != 0
            && now.generation == before.generation
            && (now.size, now.block_size, now.timeout_ms) == (before.size, 512, 5000),
        "after reconnect: {now:?}"
    );
    drop(ctl);
    teardown()
}

/// `abusectl setup ... reconnect` changes only what it is given.
pub fn reconnect_changes_only_given() -> Outcome {
    insmod("max_abuse=1")?;
    let run = |args: &str| {
        let (ok, out) = abusectl(&format!("setup {CTL} {args}"));
        if ok {
            Ok(())
        } else {
            Err(format!("setup {args}: {out}"))
        }
    };
    run("size=64M,bs=512,qs=32,ro,flush,timeout=5")?;
    run("reconnect rw")?;
    let st = status()?;
    ensure!(
        (st.queue_depth, st.block_size, st.timeout_ms) == (32, 512, 5000)
            && st.flags & ABUSE_FLAG_FLUSH != 0
            && st.flags & ABUSE_FLAG_READ_ONLY == 0,
        "after reconnect rw: {st:?}"
    );
    run("reconnect qs=64")?;
    let st = status()?;
    ensure!(
        st.queue_depth == 64
            && st.flags & ABUSE_FLAG_READ_ONLY == 0
            && st.flags & ABUSE_FLAG_FLUSH != 0,
        "after reconnect qs=64: {st:?}"
    );
    let (ok, out) = abusectl(&format!("setup {CTL} reconnect size=128M"));
    ensure!(
        !ok && out.contains("differs"),
        "reconnect size=128M: {ok} {out}"
    );
    ensure!(
        status()?.size == 64 * MIB,
        "a refused reconnect changed the size"
    );
    teardown()
}

/// A server refuses a device larger than its backend or advertising a
/// feature its backend lacks; one whose device is reset or reconfigured
/// under it stops, non-zero, saying so.
pub fn server_stops_when_reset() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/s.img", 32 * MIB)?;
    setup(CTL, &config(64 * MIB, 4096, 16, 0, 0))?;
    let (ok, out) = abusectl(&format!("server {CTL} file /tmp/s.img"));
    ensure!(
        !ok && out.contains("larger than the backend"),
        "64M device on a 32M file: {ok} {out}"
    );
    control(CTL)?.reset().map_err(|e| e.to_string())?;
    // ramfs cannot punch holes: the file backend has no DISCARD.
    sh("mkdir -p /tmp/rf && mount -t ramfs ramfs /tmp/rf && dd if=/dev/zero of=/tmp/rf/r.img bs=1M count=8 2>/dev/null")?;
    setup(CTL, &config(8 * MIB, 4096, 16, ABUSE_FLAG_DISCARD, 0))?;
    let (ok, out) = abusectl(&format!("server {CTL} file /tmp/rf/r.img"));
    ensure!(
        !ok && out.contains("discard"),
        "discard over ramfs: {ok} {out}"
    );
    control(CTL)?.reset().map_err(|e| e.to_string())?;

    for reconfigure in [false, true] {
        let log = "/tmp/stop.log";
        let mut server =
            Server::abusectl_logged(CTL, &["file", "/tmp/s.img", "--setup", ""], Some(log))?;
        let ctl = control(CTL)?;
        ctl.reset().map_err(|e| e.to_string())?;
        if reconfigure {
            ctl.set_status(&config(16 * MIB, 4096, 16, 0, 0))
                .map_err(|e| e.to_string())?;
        }
        let exit = server.exit_status(Duration::from_secs(5));
        ensure!(
            exit.is_some_and(|s| s.code() == Some(1)),
            "server exit: {exit:?}"
        );
        let said = std::fs::read_to_string(log).unwrap_or_default();
        ensure!(
            said.contains("under this server") && said.contains("generation"),
            "server said: {said}"
        );
        ctl.reset().map_err(|e| e.to_string())?;
    }
    sh("umount /tmp/rf")?;
    teardown()
}

/// A backend's errno reaches the filesystem as what it is: a backing file
/// on a full tmpfs gives "No space left on device", not an I/O error,
/// whether the kernel moves the data to the file (the file server's
/// default) or the server writes it (--copy-data); the server logs each
/// failure of its own with device, command, offset and errno.
pub fn errno_reaches_filesystem() -> Outcome {
    insmod("max_abuse=1")?;
    sh("mkdir -p /tmp/small && mount -t tmpfs -o size=4m tmpfs /tmp/small")?;
    let log = "/tmp/errno.log";
    for (i, copy) in [(0, false), (1, true)] {
        let img = format!("/tmp/small/x{i}.img");
        backing(&img, 64 * MIB)?;
        let mut args = vec!["file", &img, "--setup", ""];
        if copy {
            args.push("--copy-data");
        }
        let server = Server::abusectl_logged(CTL, &args, Some(log))?;
        let res = sh(&format!(
            "dd if=/dev/zero of={DEV} bs=1M count=16 oflag=direct 2>&1"
        ));
        let out = match res {
            Ok(out) => return Err(format!("16 MiB fit a 4 MiB tmpfs: {out}")),
            Err(e) => e,
        };
        ensure!(
            out.contains("No space left on device"),
            "dd said (copy {copy}): {out}"
        );
        let st = status()?;
        ensure!(st.errors > 0, "no errors counted (copy {copy}): {st:?}");
        drop(server);
        crate::guest::kill_servers();
        control(CTL)?.reset().map_err(|e| e.to_string())?;
        sh(&format!("rm -f {img}"))?;
    }
    let said = std::fs::read_to_string(log).unwrap_or_default();
    ensure!(
        said.contains("/dev/abctl0: WRITE of") && said.contains("No space left on device"),
        "server log: {said}"
    );
    sh("umount /tmp/small")?;
    teardown()
}

/// The file backend checks O_DIRECT alignment at start: a 512-byte device
/// over a 4 KiB-sector loop device with --direct is refused with a clear
/// error; with bs=4096 it serves.
pub fn file_direct_alignment_checked() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/l.img", 16 * MIB)?;
    let loopdev = sh("/sbin/losetup --sector-size 4096 -f --show /tmp/l.img")?
        .trim()
        .to_string();
    setup(CTL, &config(16 * MIB, 512, 16, 0, 0))?;
    let (ok, out) = abusectl(&format!("server {CTL} file {loopdev} --direct"));
    ensure!(
        !ok && out.contains("--direct") && out.contains("bs=4096"),
        "bs=512 --direct: {ok} {out}"
    );
    control(CTL)?.reset().map_err(|e| e.to_string())?;
    let server = Server::abusectl(CTL, &["file", &loopdev, "--direct", "--setup", "bs=4096"])?;
    sh(&format!("dd if=/dev/urandom of=/tmp/r bs=64k count=4 2>/dev/null && dd if=/tmp/r of={DEV} bs=64k oflag=direct 2>/dev/null && cmp -n 262144 /tmp/r {DEV}"))?;
    drop(server);
    crate::guest::kill_servers();
    control(CTL)?.reset().map_err(|e| e.to_string())?;
    sh(&format!("/sbin/losetup -d {loopdev}"))?;
    teardown()
}

/// PUT with an errno: EINVAL (nothing changed) unless the flag, a failure
/// result and a valid errno go together; with them the reader sees that
/// errno (ENOSPC here), not EIO.
pub fn put_errno_rules() -> Outcome {
    insmod("max_abuse=1")?;
    setup(CTL, &config(16 * MIB, 4096, 16, 0, 0))?;
    // O_DIRECT: one request (a buffered read would retry a failed
    // readahead with a second one).
    let reader = std::thread::spawn(|| -> Result<(), std::io::Error> {
        let f = open_direct(DEV, false).map_err(std::io::Error::other)?;
        let mut buf = Aligned::new(4096);
        f.read_exact_at(buf.as_mut(), 0)
    });
    let ctl = control(CTL)?;
    let mut bios = [AbuseBio::default(); 1];
    let mut buf = vec![0u8; 2 << 20];
    ensure!(
        wait_for(Duration::from_secs(5), || ctl
            .get_bios(&mut bios, &mut buf)
            .map(|n| n == 1)
            .unwrap_or(false)),
        "no request to fetch"
    );
    let f = bios[0];
    let bad = [
        (
            "errno without the flag",
            AbuseBio {
                result: ABUSE_RESULT_MEDIA_FAILURE,
                error: 28,
                ..f
            },
        ),
        (
            "flag without an errno",
            AbuseBio {
                result: ABUSE_RESULT_MEDIA_FAILURE,
                flags: f.flags | ABUSE_BIO_ERRNO,
                ..f
            },
        ),
        (
            "errno past MAX_ERRNO",
            AbuseBio {
                result: ABUSE_RESULT_MEDIA_FAILURE,
                flags: f.flags | ABUSE_BIO_ERRNO,
                error: 5000,
                ..f
            },
        ),
        (
            "errno on success",
            AbuseBio {
                result: ABUSE_RESULT_OKAY,
                flags: f.flags | ABUSE_BIO_ERRNO,
                error: 28,
                ..f
            },
        ),
    ];
    puts_refused(&ctl, &bad, 1, Errno::EINVAL)?;
    let good = AbuseBio {
        result: ABUSE_RESULT_MEDIA_FAILURE,
        flags: f.flags | ABUSE_BIO_ERRNO,
        error: Errno::ENOSPC as u32,
        ..f
    };
    ctl.put_bios(&[good]).map_err(|e| e.to_string())?;
    let res = reader.join().map_err(|_| "reader panicked")?;
    let errno = res.err().and_then(|e| e.raw_os_error());
    ensure!(
        errno == Some(Errno::ENOSPC as i32),
        "the reader got {errno:?}, want ENOSPC"
    );
    drop(ctl);
    teardown()
}

/// ABUSE_BIO_ZEROES: only on a successful READ (else EINVAL, and the
/// request stays fetched); such a READ is filled with zeroes and nothing is
/// read from `addr` (here a pointer that would fault).
pub fn put_zeroes_rules() -> Outcome {
    insmod("max_abuse=1")?;
    setup(CTL, &config(16 * MIB, 4096, 16, 0, 0))?;
    // O_DIRECT: one request each, straight into (and out of) these buffers;
    // the read's buffer starts non-zero, so zeroes must come from the PUT.
    let reader = std::thread::spawn(|| -> Result<Vec<u8>, std::io::Error> {
        let f = open_direct(DEV, false).map_err(std::io::Error::other)?;
        let mut buf = Aligned::new(8192);
        buf.as_mut().fill(0xff);
        f.read_exact_at(buf.as_mut(), 0)?;
        Ok(buf.as_mut().to_vec())
    });
    let writer = std::thread::spawn(|| -> Result<(), std::io::Error> {
        let f = open_direct(DEV, true).map_err(std::io::Error::other)?;
        let mut buf = Aligned::new(4096);
        buf.as_mut().fill(0x5a);
        f.write_all_at(buf.as_mut(), MIB)
    });
    let ctl = control(CTL)?;
    let mut bios = [AbuseBio::default(); 2];
    let mut buf = vec![0u8; 2 << 20];
    let mut got = Vec::new();
    ensure!(
        wait_for(Duration::from_secs(5), || {
            if let Ok(n) = ctl.get_bios(&mut bios, &mut buf) {
                got.extend_from_slice(&bios[..n]);
            }
            got.len() == 2
        }),
        "fetched {} of 2 requests",
        got.len()
    );
    let find = |cmd| {
        got.iter()
            .copied()
            .find(|b| b.cmd == cmd)
            .ok_or("a request is missing")
    };
    let (read, write) = (find(ABUSE_CMD_READ)?, find(ABUSE_CMD_WRITE)?);
    let bad = [
        (
            "ZEROES on a WRITE",
            AbuseBio {
                flags: write.flags | ABUSE_BIO_ZEROES,
                ..write
            },
        ),
        (
            "ZEROES on a failed READ",
            AbuseBio {
                result: ABUSE_RESULT_MEDIA_FAILURE,
                flags: read.flags | ABUSE_BIO_ZEROES,
                ..read
            },
        ),
    ];
    puts_refused(&ctl, &bad, 2, Errno::EINVAL)?;
    let hole = AbuseBio {
        flags: read.flags | ABUSE_BIO_ZEROES,
        addr: 0,
        ..read
    };
    ctl.put_bios(&[hole, write]).map_err(|e| e.to_string())?;
    let data = reader
        .join()
        .map_err(|_| "reader panicked")?
        .map_err(|e| e.to_string())?;
    ensure!(
        data.iter().all(|&b| b == 0),
        "the READ completed as zeroes returned {} non-zero bytes",
        data.iter().filter(|&&b| b != 0).count()
    );
    writer
        .join()
        .map_err(|_| "writer panicked")?
        .map_err(|e| e.to_string())?;
    let st = status()?;
    ensure!(st.completed == 2 && st.errors == 0, "counters: {st:?}");
    drop(ctl);
    teardown()
}

/// A 32-bit process serves the device through compat_ioctl: GET_STATUS,
/// GET_BIO and PUT_BIO with 32-bit pointers move a write and a read.
pub fn compat_ioctl_32bit() -> Outcome {
    insmod("max_abuse=1")?;
    setup(CTL, &config(MIB, 4096, 16, 0, 0))?;
    let out = sh(&format!("/bin/abuse-compat32 {CTL} {DEV} 2>&1"))?;
    ensure!(out.contains("compat32: ok"), "abuse-compat32: {out}");
    let st = status()?;
    ensure!(st.completed >= 2 && st.errors == 0, "counters: {st:?}");
    teardown()
}
