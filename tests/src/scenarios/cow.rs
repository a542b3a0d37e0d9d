//! The cow server: copy-on-write over a read-only base image.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::ensure;
use crate::guest::{e2fsck_clean, insmod, sh, teardown, Outcome, Server, BLKDISCARD, MKFS_EXT4};

const CTL: &str = "/dev/abctl0";
const DEV: &str = "/dev/abuse0";

pub(crate) fn md5(path: &str) -> Result<String, String> {
    Ok(sh(&format!("md5sum {path}"))?
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn tree_sums(dir: &str) -> Result<String, String> {
    sh(&format!("cd {dir} && find . -type f | sort | xargs md5sum"))
}

/// A base holding ext4 with files → cow device → mount, modify, umount:
/// the base is unchanged, the cow device shows the changes, e2fsck -fn is
/// clean; merge is refused while the server runs; after merge the base
/// alone holds the modified filesystem.
pub fn cow_ext4_modify_merge() -> Outcome {
    insmod("max_abuse=1")?;
    sh(&format!("dd if=/dev/zero of=/tmp/base.img bs=1M count=64 2>/dev/null && {MKFS_EXT4} -q -F -b 4096 /tmp/base.img"))?;
    sh("mkdir -p /mnt2 && mount -o loop /tmp/base.img /mnt2 && mkdir /mnt2/docs && i=0; while [ $i -lt 30 ]; do \
        dd if=/dev/urandom of=/mnt2/docs/f$i bs=1k count=$((i * 5 + 1)) 2>/dev/null; i=$((i + 1)); done; umount /mnt2")?;
    let base_sum = md5("/tmp/base.img")?;
    sh("abusectl cow create --base /tmp/base.img --delta /tmp/work.cow --block-size 64K")?;
    let server = Server::abusectl(
        CTL,
        &["cow", "/tmp/work.cow", "--threads", "4", "--setup", ""],
    )?;
    sh(&format!(
        "mount {DEV} /mnt && rm /mnt/docs/f3 && echo changed >> /mnt/docs/f4 && mkdir /mnt/new && \
        dd if=/dev/urandom of=/mnt/new/big bs=1M count=6 2>/dev/null && umount /mnt"
    ))?;
    ensure!(
        md5("/tmp/base.img")? == base_sum,
        "the base changed under the cow device"
    );
    e2fsck_clean(DEV)?;
    sh(&format!("mount {DEV} /mnt"))?;
    let visible = tree_sums("/mnt")?;
    sh("umount /mnt")?;
    ensure!(
        visible.contains("./new/big") && !visible.contains("./docs/f3 "),
        "the changes are not visible: {visible}"
    );
    // kill -9 of the server while the mounted filesystem is being written;
    // a new server takes over; the filesystem stays consistent.
    sh(&format!("mount {DEV} /mnt"))?;
    let writer = std::thread::spawn(|| {
        sh("dd if=/dev/urandom of=/mnt/new/during-kill bs=64k count=96 2>/dev/null && sync")
    });
    std::thread::sleep(Duration::from_millis(700));
    server.kill();
    let server = Server::abusectl(CTL, &["cow", "/tmp/work.cow", "--threads", "4"])?;
    writer.join().map_err(|_| "writer panicked")??;
    let modified = tree_sums("/mnt")?;
    sh("umount /mnt")?;
    e2fsck_clean(DEV).map_err(|e| format!("after kill -9 of the cow server: {e}"))?;
    ensure!(
        modified.contains("./new/during-kill"),
        "the file written across the kill is missing"
    );
    let info = sh("abusectl cow info /tmp/work.cow")?;
    ensure!(
        info.contains("dirty") && !info.contains("mapped:      0 of"),
        "cow info while serving: {info}"
    );
    let refused = sh("abusectl cow merge /tmp/work.cow 2>&1")
        .err()
        .unwrap_or_default();
    ensure!(
        refused.contains("in use by a running cow server"),
        "merge while serving: {refused:?}"
    );
    let status = server.stop_with(Signal::SIGTERM, Duration::from_secs(10))?;
    ensure!(status.success(), "the cow server exited with {status}");
    ensure!(
        md5("/tmp/base.img")? == base_sum,
        "the base changed before the merge"
    );
    sh("abusectl cow merge /tmp/work.cow")?;
    e2fsck_clean("/tmp/base.img").map_err(|e| format!("the merged base: {e}"))?;
    let merged = sh("mount -o ro,loop /tmp/base.img /mnt2 && cd /mnt2 && find . -type f | sort | xargs md5sum; cd /; umount /mnt2")?;
    ensure!(
        merged == modified,
        "the merged base does not hold the modified tree"
    );
    let info = sh("abusectl cow info /tmp/work.cow")?;
    ensure!(
        info.contains("mapped:      0 of") && info.contains("clean"),
        "the delta after merge: {info}"
    );
    teardown()
}

/// Two cow server processes share one delta; kill -9 of one during fio
/// --verify, start another: fio finishes with 0 errors (nothing
/// acknowledged was lost, no first write was lost between processes).
pub fn cow_kill_during_fio() -> Outcome {
    insmod("max_abuse=1")?;
    sh("dd if=/dev/urandom of=/tmp/cbase.img bs=1M count=32 2>/dev/null")?;
    let base_sum = md5("/tmp/cbase.img")?;
    sh("abusectl cow create --base /tmp/cbase.img --delta /tmp/k.cow --block-size 16K")?;
    let first = Server::abusectl(
        CTL,
        &["cow", "/tmp/k.cow", "--threads", "2", "--setup", "qs=64"],
    )?;
    let second = Server::abusectl(CTL, &["cow", "/tmp/k.cow", "--threads", "2"])?;
    let fio = std::thread::spawn(|| {
        sh(&format!(
            "/usr/bin/fio --name=cow --filename={DEV} --rw=randwrite --bs=4k --ioengine=libaio --direct=1 \
             --iodepth=16 --numjobs=4 --size=8M --offset_increment=8M --verify=crc32c --do_verify=1 \
             --verify_fatal=1 --group_reporting 2>&1"
        ))
    });
    std::thread::sleep(Duration::from_secs(2));
    ensure!(!fio.is_finished(), "fio finished before the kill");
    first.kill();
    let _third = Server::abusectl(CTL, &["cow", "/tmp/k.cow", "--threads", "2"])?;
    let out = fio.join().map_err(|_| "fio panicked")??;
    ensure!(
        out.contains("err= 0") && !out.contains("verify: bad"),
        "fio after the kill:\n{out}"
    );
    std::thread::sleep(Duration::from_millis(1200));
    ensure!(
        second.stat("writes") > 0,
        "the second cow server served no writes: {}",
        second.stats()
    );
    let info = sh("abusectl cow info /tmp/k.cow")?;
    ensure!(
        info.contains("dirty"),
        "cow info while two servers run: {info}"
    );
    ensure!(md5("/tmp/cbase.img")? == base_sum, "the base changed");
    teardown()
}

/// A cow device over an ABUSE device (served by a file server): its base
/// reads come through the server's copies, since the kernel refuses to
/// move data from one of its own devices; none is an I/O error.
pub fn cow_over_abuse_device() -> Outcome {
    insmod("max_abuse=2")?;
    sh("dd if=/dev/urandom of=/tmp/abase.img bs=1M count=16 2>/dev/null")?;
    let under = Server::abusectl("/dev/abctl1", &["file", "/tmp/abase.img", "--setup", ""])?;
    sh("abusectl cow create --base /dev/abuse1 --delta /tmp/a.cow --block-size 4K")?;
    let server = Server::abusectl(CTL, &["cow", "/tmp/a.cow", "--setup", ""])?;
    sh(&format!("cmp {DEV} /tmp/abase.img"))?;
    sh(&format!("dd if=/dev/urandom of=/tmp/w bs=64k count=4 2>/dev/null && dd if=/tmp/w of={DEV} bs=64k seek=2 oflag=direct 2>/dev/null && dd if={DEV} of=/tmp/r bs=64k skip=2 count=4 iflag=direct 2>/dev/null && cmp /tmp/w /tmp/r"))?;
    // Counters are saved every second.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    ensure!(
        server.stat("reads") > 0 && server.stat("errors") == 0,
        "the cow server over /dev/abuse1: {}",
        server.stats()
    );
    drop(server);
    drop(under);
    crate::guest::kill_servers();
    teardown()
}

/// A cow device over a block-device base (a loop device: its size comes
/// from BLKGETSIZE64): data verifies through it, the base is untouched,
/// and DISCARD / WRITE_ZEROES are advertised and read back as zeroes.
pub fn cow_block_device_base() -> Outcome {
    insmod("max_abuse=1")?;
    sh("dd if=/dev/urandom of=/tmp/bbase.img bs=1M count=16 2>/dev/null")?;
    let sum = md5("/tmp/bbase.img")?;
    let lo = sh("/sbin/losetup -f --show -r /tmp/bbase.img")?
        .trim()
        .to_string();
    sh(&format!(
        "abusectl cow create --base {lo} --delta /tmp/b.cow --block-size 4K"
    ))?;
    let server = Server::abusectl(CTL, &["cow", "/tmp/b.cow", "--setup", ""])?;
    let info = sh("abusectl info --json /dev/abctl0")?;
    ensure!(
        info.contains("\"size\": 16777216")
            && info.contains("discard")
            && info.contains("write_zeroes"),
        "the cow device over {lo}: {info}"
    );
    // Read the base through the device (the kernel reads it from the loop
    // device itself); write, read back; discard.
    sh(&format!("cmp {DEV} {lo}"))?;
    // Counters are saved every second.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    ensure!(
        server.stat("file_io") > 0,
        "no READ of the loop base was moved by the kernel: {}",
        server.stats()
    );
    sh(&format!("dd if=/dev/urandom of=/tmp/w bs=64k count=16 2>/dev/null && dd if=/tmp/w of={DEV} bs=64k seek=8 oflag=direct 2>/dev/null && dd if={DEV} of=/tmp/r bs=64k skip=8 count=16 iflag=direct 2>/dev/null && cmp /tmp/w /tmp/r"))?;
    sh(&format!(
        "{BLKDISCARD} -o 524288 -l 1048576 {DEV} && {BLKDISCARD} -z -o 4194304 -l 65536 {DEV}"
    ))?;
    let zeros = sh(&format!(
        "dd if={DEV} bs=64k skip=8 count=16 2>/dev/null | tr -d '\\000' | wc -c"
    ))?;
    ensure!(
        zeros.trim() == "0",
        "discarded range reads {} non-zero bytes",
        zeros.trim()
    );
    let zeros = sh(&format!(
        "dd if={DEV} bs=64k skip=64 count=1 2>/dev/null | tr -d '\\000' | wc -c"
    ))?;
    ensure!(
        zeros.trim() == "0",
        "zeroed range reads {} non-zero bytes",
        zeros.trim()
    );
    drop(server);
    crate::guest::kill_servers();
    sh(&format!("/sbin/losetup -d {lo}"))?;
    ensure!(md5("/tmp/bbase.img")? == sum, "the base changed");
    teardown()
}
