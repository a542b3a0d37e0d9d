//! The real servers (`abusectl server`): file and null backends, several
//! threads and processes, crashes, and abusectl's errors.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::ensure;
use crate::guest::{
    backing, control, e2fsck_clean, insmod, sh, teardown, wait_for, Outcome, Server, MKFS_EXT4,
};

const CTL: &str = "/dev/abctl0";
const DEV: &str = "/dev/abuse0";
const MIB: u64 = 1 << 20;
const FIO: &str = "/usr/bin/fio";

/// fio randwrite with crc32c verification over `jobs` × `per_job` bytes.
pub(crate) fn fio_verify(jobs: u32, per_job_mib: u32, extra: &str) -> Result<String, String> {
    sh(&format!(
        "{FIO} --name=verify --filename={DEV} --rw=randwrite --bs=4k --ioengine=libaio --direct=1 \
         --iodepth=16 --numjobs={jobs} --size={per_job_mib}M --offset_increment={per_job_mib}M \
         --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting {extra} 2>&1"
    ))
    .and_then(|out| {
        if out.contains("err= 0") && !out.contains("verify: bad") {
            Ok(out)
        } else {
            Err(format!("fio reported errors:\n{out}"))
        }
    })
}

/// The file server with 4 threads: mkfs.ext4, mount, copy a tree, umount,
/// e2fsck -fn clean; the backing file, loop-mounted read-only, holds the
/// same tree. SIGTERM stops the server with exit 0.
pub fn file_server_ext4() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/srv.img", 128 * MIB)?;
    let server = Server::abusectl(
        CTL,
        &["file", "/tmp/srv.img", "--threads", "4", "--setup", "qs=64"],
    )?;
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(
        st.size == 128 * MIB,
        "--setup took size {} from a 128 MiB file",
        st.size
    );
    sh(&format!("{MKFS_EXT4} -q -F {DEV} && mount {DEV} /mnt"))?;
    sh("mkdir -p /tmp/tree/a/b && cp -r /lib /etc /tmp/tree/a/ && i=0; while [ $i -lt 150 ]; do \
        mkdir -p /tmp/tree/d$((i % 7)); dd if=/dev/urandom of=/tmp/tree/d$((i % 7))/f$i bs=1k count=$((i * 13 % 300 + 1)) 2>/dev/null; \
        i=$((i + 1)); done; dd if=/dev/urandom of=/tmp/tree/a/b/rand bs=1M count=4 2>/dev/null; cp -r /tmp/tree /mnt/")?;
    let want = sh("cd /tmp/tree && find . -type f | sort | xargs md5sum")?;
    sh("umount /mnt")?;
    e2fsck_clean(DEV)?;
    let status = server.stop_with(Signal::SIGTERM, Duration::from_secs(10))?;
    ensure!(status.success(), "SIGTERM: server exited with {status}");
    // The backing file itself, through loop, read-only.
    let got = sh("mkdir -p /mnt2 && mount -o ro,loop /tmp/srv.img /mnt2 && cd /mnt2/tree && find . -type f | sort | xargs md5sum; cd /; umount /mnt2")?;
    ensure!(got == want, "the backing file does not hold the tree");
    ensure!(
        want.lines().count() > 100,
        "the tree is too small to mean anything"
    );
    teardown()
}

/// fio --verify=crc32c randwrite + verify, 4 jobs, iodepth 16, against 4
/// server threads, then against 2 server processes: 0 errors, and each
/// process served a share (its own counters). The file server has the
/// kernel move the data to and from its file (every READ and WRITE counted
/// as file_io); the second process of the pair copies (--copy-data), so
/// the two ways serve one device side by side.
pub fn fio_threads_and_processes() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/fio.img", 64 * MIB)?;
    let one = Server::abusectl(
        CTL,
        &[
            "file",
            "/tmp/fio.img",
            "--threads",
            "4",
            "--setup",
            "qs=128",
        ],
    )?;
    fio_verify(4, 8, "")?;
    std::thread::sleep(Duration::from_millis(1500));
    let moved = one.stat("reads") + one.stat("writes");
    ensure!(
        one.stat("writes") > 0 && one.stat("reads") > 0 && one.stat("file_io") == moved,
        "the server saw no I/O, or copied some: {}",
        one.stats()
    );
    drop(one);
    let a = Server::abusectl(CTL, &["file", "/tmp/fio.img", "--threads", "2"])?;
    let b = Server::abusectl(
        CTL,
        &["file", "/tmp/fio.img", "--threads", "2", "--copy-data"],
    )?;
    fio_verify(4, 8, "--randseed=7")?;
    // Counters are saved every second.
    std::thread::sleep(Duration::from_millis(1500));
    let (ra, rb) = (a.stat("requests"), b.stat("requests"));
    ensure!(
        ra > 0 && rb > 0,
        "not both processes served: {ra} and {rb} requests"
    );
    ensure!(
        a.stat("file_io") > 0 && b.stat("file_io") == 0,
        "file_io: {} by the default server, {} by the copying one",
        a.stat("file_io"),
        b.stat("file_io")
    );
    println!("fio: two processes served {ra} and {rb} requests");
    teardown()
}

/// kill -9 one of two server processes during fio: fio finishes with 0
/// errors. kill -9 the only server during fio, start a new one: 0 errors.
pub fn kill_server_during_fio() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/kill.img", 64 * MIB)?;
    let a = Server::abusectl(
        CTL,
        &[
            "file",
            "/tmp/kill.img",
            "--threads",
            "2",
            "--setup",
            "qs=64",
        ],
    )?;
    let b = Server::abusectl(CTL, &["file", "/tmp/kill.img", "--threads", "2"])?;
    let fio = std::thread::spawn(|| fio_verify(4, 8, ""));
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        !fio.is_finished(),
        "fio finished before the kill: make it longer"
    );
    a.kill();
    fio.join().map_err(|_| "fio thread panicked")??;
    drop(b);
    // The only server dies mid-run; a new one takes over.
    let c = Server::abusectl(CTL, &["file", "/tmp/kill.img", "--threads", "2"])?;
    let fio = std::thread::spawn(|| fio_verify(4, 8, "--randseed=3"));
    std::thread::sleep(Duration::from_secs(2));
    c.kill();
    std::thread::sleep(Duration::from_millis(500));
    let d = Server::abusectl(CTL, &["file", "/tmp/kill.img", "--threads", "2"])?;
    fio.join().map_err(|_| "fio thread panicked")??;
    // Everything after the kill went through the new server.
    ensure!(
        wait_for(Duration::from_secs(3), || d.stat("requests") > 0),
        "the new server served nothing: {}",
        d.stats()
    );
    teardown()
}

/// fsync on a file in the mounted filesystem makes the data durable: the
/// server saw FLUSH and called fdatasync (its counters show it).
pub fn fsync_reaches_server() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/sync.img", 64 * MIB)?;
    let server = Server::abusectl(
        CTL,
        &["file", "/tmp/sync.img", "--threads", "2", "--setup", ""],
    )?;
    sh(&format!("{MKFS_EXT4} -q -F {DEV} && mount {DEV} /mnt"))?;
    std::thread::sleep(Duration::from_millis(1200));
    let before = server.stat("flushes");
    // busybox dd conv=fsync: write, then fsync(2) on the file.
    sh("dd if=/dev/urandom of=/mnt/durable bs=64k count=4 conv=fsync 2>/dev/null")?;
    ensure!(
        wait_for(Duration::from_secs(3), || server.stat("flushes") > before),
        "fsync sent no FLUSH to the server: {}",
        server.stats()
    );
    sh("umount /mnt")?;
    teardown()
}

/// blkdiscard on the device: the backing file's allocated blocks drop.
pub fn discard_punches_holes() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/disc.img", 64 * MIB)?;
    let server = Server::abusectl(
        CTL,
        &["file", "/tmp/disc.img", "--threads", "2", "--setup", ""],
    )?;
    sh(&format!(
        "dd if=/dev/urandom of={DEV} bs=1M count=32 oflag=direct 2>/dev/null"
    ))?;
    let du = || {
        sh("du -k /tmp/disc.img").map(|s| {
            s.split_whitespace()
                .next()
                .unwrap_or("0")
                .parse::<u64>()
                .unwrap_or(0)
        })
    };
    let before = du()?;
    ensure!(
        before >= 32 * 1024,
        "the backing file holds only {before} KiB after 32 MiB of writes"
    );
    sh(&format!("/sbin/blkdiscard {DEV}"))?;
    let after = du()?;
    ensure!(
        after < 1024,
        "after blkdiscard the backing file still holds {after} KiB (was {before})"
    );
    std::thread::sleep(Duration::from_millis(1200));
    ensure!(
        server.stat("discards") > 0,
        "no DISCARD in the server's counters"
    );
    teardown()
}

/// A null server: writes are accepted; a 256 MiB read returns zeroes, each
/// READ completed as a hole (ABUSE_BIO_ZEROES), never with the payloads of
/// the writes before it, which sit in the server's buffers.
pub fn null_server() -> Outcome {
    insmod("max_abuse=1")?;
    let server = Server::abusectl(CTL, &["null", "256M", "--setup", ""])?;
    sh(&format!(
        "dd if=/dev/urandom of={DEV} bs=1M count=16 oflag=direct 2>/dev/null"
    ))?;
    let out = sh(&format!(
        "dd if={DEV} bs=1M count=256 iflag=direct 2>/dev/null | tr -d '\\000' | wc -c"
    ))?;
    ensure!(
        out.trim() == "0",
        "{} non-zero bytes read from the null device",
        out.trim()
    );
    let bytes = sh(&format!(
        "dd if={DEV} bs=1M iflag=direct 2>/dev/null | wc -c"
    ))?;
    ensure!(
        bytes.trim() == (256 * MIB).to_string(),
        "read {} bytes from a 256 MiB device",
        bytes.trim()
    );
    // 256 MiB in requests of at most 1 MiB: at least 256 READs, once the
    // stats file (saved every second) has caught up.
    wait_for(Duration::from_secs(5), || server.stat("reads") >= 256);
    let (reads, holes) = (server.stat("reads"), server.stat("holes"));
    ensure!(
        reads >= 256 && holes == reads,
        "{holes} of {reads} READs completed as holes"
    );
    teardown()
}

/// abusectl's errors name the device and the cause, and exit non-zero.
pub fn abusectl_errors() -> Outcome {
    let run = |cmd: &str| -> (i32, String) {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("{cmd} 2>&1"))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let expect = |cmd: &str, code: i32, text: &str| -> Outcome {
        let (c, out) = run(cmd);
        ensure!(
            c == code && out.contains(text),
            "`{cmd}`: exit {c}, output {out:?}; want exit {code} and {text:?}"
        );
        Ok(())
    };
    // No module: no such device.
    expect(
        "abusectl info /dev/abctl0",
        1,
        "/dev/abctl0: no such device",
    )?;
    insmod("max_abuse=1")?;
    expect(
        "abusectl setup /dev/abctl0 size=1G,colour=blue",
        1,
        "unknown option 'colour=blue'",
    )?;
    expect(
        "abusectl setup /dev/abctl0 size=1000,bs=4096",
        1,
        "not a multiple of bs=4096",
    )?;
    expect("abusectl setup /dev/abctl0 size=12Q", 1, "unknown suffix")?;
    expect("abusectl setup /dev/abctl0 bs=512", 1, "needs size=")?;
    expect("abusectl setup /dev/abctl0 size=64M,qs=4", 0, "")?;
    expect(
        "abusectl setup /dev/abctl0 size=64M",
        1,
        "busy: already configured",
    )?;
    expect(
        &format!(
            "{} --reuid=65534 --regid=65534 --clear-groups abusectl info /dev/abctl0",
            crate::guest::SETPRIV
        ),
        1,
        "permission denied",
    )?;
    expect(
        "abusectl server /dev/abctl0 tape /dev/st0",
        1,
        "unknown backend 'tape'",
    )?;
    expect(
        "abusectl server /dev/abctl0 file /nonexistent",
        1,
        "/nonexistent: No such file",
    )?;
    expect("abusectl get /dev/abctl0", 1, "no request pending")?;
    expect(
        "abusectl poll /dev/abctl0 --timeout 0.2",
        1,
        "no request pending",
    )?;
    expect("abusectl reset /dev/abctl0", 0, "")?;
    expect("abusectl info /dev/abctl0", 0, "unconfigured")?;
    expect("abusectl frobnicate", 2, "unrecognized subcommand")?;
    expect("abusectl setup /dev/abctl0", 2, "required")?;
    let (c, help) = run("abusectl server --help");
    ensure!(
        c == 0 && help.contains("Examples") && help.contains("--threads"),
        "server --help: {help}"
    );
    teardown()
}
