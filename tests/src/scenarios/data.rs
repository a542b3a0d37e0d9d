//! Data through the device: dd patterns, a real filesystem, batching,
//! back-pressure, partitions, read-only.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use abuse_sys::uapi::*;

use crate::ensure;
use crate::guest::{
    backing, config, control, insmod, open_direct, pattern, setup, sh, teardown, wait_for, Aligned,
    Outcome, Server,
};
use crate::guest::{e2fsck_clean, BLKDISCARD, MKFS_EXT4, SFDISK};

const CTL: &str = "/dev/abctl0";
const DEV: &str = "/dev/abuse0";
const MIB: u64 = 1 << 20;

/// Patterns written with dd at many offsets and sizes read back identical,
/// through the page cache and direct, and land in the backing file.
pub fn dd_patterns() -> Outcome {
    insmod("max_abuse=1")?;
    let size = 64 * MIB;
    backing("/tmp/dd.img", size)?;
    setup(CTL, &config(size, 512, 64, ABUSE_FLAG_FLUSH, 0))?;
    let _server = Server::start(CTL, "/tmp/dd.img", &["--threads", "2"])?;
    // (offset, length) in bytes: sector-aligned, 512 B to 1 MiB and beyond,
    // not multiples of the request size, some across 1 MiB boundaries.
    let cases: &[(u64, u64)] = &[
        (0, 512),
        (512, 1536),
        (4096 * 3 + 512, 7 * 512),
        (MIB - 512, 1024),
        (3 * MIB + 1536, 65 * 1024 + 512),
        (8 * MIB, MIB),
        (12 * MIB - 4096, MIB + 4096 + 512),
        (20 * MIB + 512, 3 * MIB + 1536),
        (size - 4096, 4096),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64 + 1, len as usize);
        std::fs::write("/tmp/pat", &data).map_err(|e| e.to_string())?;
        // bs=512 so dd can seek to any sector; conv=fsync pushes it out.
        sh(&format!(
            "dd if=/tmp/pat of={DEV} bs=512 seek={} conv=notrunc,fsync 2>/dev/null",
            off / 512
        ))?;
    }
    sh("echo 3 > /proc/sys/vm/drop_caches")?;
    let img = std::fs::File::open("/tmp/dd.img").map_err(|e| e.to_string())?;
    for (i, &(off, len)) in cases.iter().enumerate() {
        let want = pattern(i as u64 + 1, len as usize);
        sh(&format!(
            "dd if={DEV} of=/tmp/back bs=512 skip={} count={} 2>/dev/null",
            off / 512,
            len / 512
        ))?;
        let got = std::fs::read("/tmp/back").map_err(|e| e.to_string())?;
        ensure!(
            got == want,
            "case {i} ({off}+{len}): dd read back different data"
        );
        // Direct I/O of the same range, in one request where it fits.
        let f = open_direct(DEV, false)?;
        let start = off & !4095;
        let end = (off + len).next_multiple_of(4096);
        let mut buf = Aligned::new((end - start) as usize);
        f.read_exact_at(buf.as_mut(), start)
            .map_err(|e| e.to_string())?;
        let s = (off - start) as usize;
        ensure!(
            buf.as_ref()[s..s + len as usize] == want[..],
            "case {i}: O_DIRECT read differs"
        );
        // And the server really stored it.
        let mut onfile = vec![0u8; len as usize];
        img.read_exact_at(&mut onfile, off)
            .map_err(|e| e.to_string())?;
        ensure!(
            onfile == want,
            "case {i}: the backing file does not hold the data"
        );
    }
    teardown()
}

/// mkfs.ext4, mount, a tree of files, umount, e2fsck -fn clean, remount:
/// identical content.
pub fn ext4_roundtrip() -> Outcome {
    insmod("max_abuse=1")?;
    let size = 128 * MIB;
    backing("/tmp/fs.img", size)?;
    setup(
        CTL,
        &config(
            size,
            4096,
            64,
            ABUSE_FLAG_FLUSH | ABUSE_FLAG_FUA | ABUSE_FLAG_DISCARD,
            0,
        ),
    )?;
    let server = Server::start(CTL, "/tmp/fs.img", &["--threads", "2"])?;
    sh(&format!("{MKFS_EXT4} -q -F {DEV}"))?;
    sh(&format!("mount -t ext4 {DEV} /mnt"))?;
    let script = "mkdir -p /mnt/a/b/c /mnt/d && i=0; while [ $i -lt 40 ]; do \
        dd if=/dev/urandom of=/mnt/a/b/f$i bs=1k count=$((i*7+1)) 2>/dev/null; \
        echo file $i > /mnt/a/b/c/t$i; i=$((i+1)); done; \
        dd if=/dev/urandom of=/mnt/d/big bs=1M count=8 2>/dev/null; sync";
    sh(script)?;
    let before = sh("cd /mnt && find . -type f | sort | xargs md5sum")?;
    sh("umount /mnt")?;
    e2fsck_clean(DEV)?;
    sh(&format!("mount -t ext4 {DEV} /mnt"))?;
    let after = sh("cd /mnt && find . -type f | sort | xargs md5sum")?;
    sh("umount /mnt")?;
    ensure!(before == after, "content differs after remount");
    ensure!(
        before.lines().count() == 81,
        "expected 81 files, found {}",
        before.lines().count()
    );
    ensure!(
        server.stat("write") > 0 && server.stat("read") > 0,
        "the server saw no I/O: {}",
        server.stats()
    );
    drop(server);
    teardown()
}

/// Under concurrent load one GET_BIO returns several requests and one
/// PUT_BIO completes several.
pub fn batching() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/batch.img", 64 * MIB)?;
    setup(CTL, &config(64 * MIB, 4096, 128, 0, 0))?;
    // One thread with a small delay per batch, so requests pile up.
    let server = Server::start(CTL, "/tmp/batch.img", &["--batch", "32", "--delay-ms", "5"])?;
    let writers: Vec<_> = (0..16u64)
        .map(|w| {
            std::thread::spawn(move || -> Outcome {
                let f = open_direct(DEV, true)?;
                let buf = Aligned::from(&pattern(w, 4096));
                for i in 0..64u64 {
                    f.write_all_at(buf.as_ref(), (w * 64 + i) * 4096)
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            })
        })
        .collect();
    for w in writers {
        w.join().map_err(|_| "writer panicked")??;
    }
    let (get, put) = (server.stat("max_get"), server.stat("max_put"));
    ensure!(
        get > 1 && put > 1,
        "no batching: largest GET {get}, largest PUT {put}"
    );
    drop(server);
    teardown()
}

/// Queue depth 4 and 64 concurrent writers: no errors (back-pressure, not
/// failure), at most 4 requests held per hardware queue, and all data
/// verifies.
pub fn back_pressure() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/bp.img", 64 * MIB)?;
    setup(CTL, &config(64 * MIB, 4096, 4, 0, 0))?;
    let server = Server::start(CTL, "/tmp/bp.img", &["--delay-ms", "2"])?;
    let peak = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            let ctl = control(CTL).unwrap();
            while !done.load(Ordering::Relaxed) {
                if let Ok(st) = ctl.status() {
                    peak.fetch_max(st.pending + st.in_flight, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let writers: Vec<_> = (0..64u64)
        .map(|w| {
            std::thread::spawn(move || -> Outcome {
                let f = open_direct(DEV, true)?;
                for i in 0..8u64 {
                    let buf = Aligned::from(&pattern(w * 100 + i, 8192));
                    f.write_all_at(buf.as_ref(), (w * 8 + i) * 8192)
                        .map_err(|e| format!("writer {w}: {e}"))?;
                }
                Ok(())
            })
        })
        .collect();
    let results: Vec<Outcome> = writers
        .into_iter()
        .map(|w| w.join().unwrap_or(Err("panicked".into())))
        .collect();
    done.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    for r in results {
        r?;
    }
    let f = open_direct(DEV, false)?;
    for w in 0..64u64 {
        for i in 0..8u64 {
            let mut buf = Aligned::new(8192);
            f.read_exact_at(buf.as_mut(), (w * 8 + i) * 8192)
                .map_err(|e| e.to_string())?;
            ensure!(
                buf.as_ref() == pattern(w * 100 + i, 8192),
                "writer {w} block {i} differs"
            );
        }
    }
    drop(f);
    let peak = peak.load(Ordering::Relaxed);
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(
        peak <= 4 * st.queues,
        "{peak} requests outstanding with queue depth 4 on {} queues",
        st.queues
    );
    ensure!(st.errors == 0, "{} requests failed", st.errors);
    drop(server);
    teardown()
}

/// Read-only: writes fail and never reach the server; reads work.
pub fn read_only() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/ro.img", 16 * MIB)?;
    std::fs::write("/tmp/ro-data", pattern(7, 4096)).map_err(|e| e.to_string())?;
    sh("dd if=/tmp/ro-data of=/tmp/ro.img conv=notrunc 2>/dev/null")?;
    setup(
        CTL,
        &config(
            16 * MIB,
            4096,
            16,
            ABUSE_FLAG_READ_ONLY | ABUSE_FLAG_FLUSH | ABUSE_FLAG_DISCARD,
            0,
        ),
    )?;
    let server = Server::start(CTL, "/tmp/ro.img", &[])?;
    ensure!(
        sh(&format!(
            "dd if=/dev/zero of={DEV} bs=4096 count=1 oflag=direct 2>&1"
        ))
        .is_err(),
        "a direct write to a read-only device succeeded"
    );
    ensure!(
        sh(&format!(
            "dd if=/dev/zero of={DEV} bs=4096 count=1 conv=fsync 2>&1"
        ))
        .is_err(),
        "a buffered write + fsync to a read-only device succeeded"
    );
    ensure!(
        sh(&format!("{BLKDISCARD} {DEV} 2>&1")).is_err(),
        "{BLKDISCARD} on a read-only device succeeded"
    );
    let got = sh(&format!(
        "dd if={DEV} bs=4096 count=1 iflag=direct 2>/dev/null | md5sum"
    ))?;
    let want = sh("md5sum < /tmp/ro-data")?;
    ensure!(
        got.split_whitespace().next() == want.split_whitespace().next(),
        "read from a read-only device differs"
    );
    let s = server.stats();
    ensure!(
        s["write"] == 0 && s["discard"] == 0 && s["write_zeroes"] == 0,
        "writes reached the server: {s}"
    );
    ensure!(server.stat("read") > 0, "reads did not reach the server");
    drop(server);
    teardown()
}

/// With max_part=15, two partitions made with sfdisk appear as
/// /dev/abuse0p1 and p2; mkfs + mount on p1 works.
pub fn partitions() -> Outcome {
    insmod("max_abuse=2 max_part=15")?;
    backing("/tmp/part.img", 64 * MIB)?;
    setup(CTL, &config(64 * MIB, 512, 32, ABUSE_FLAG_FLUSH, 0))?;
    let server = Server::start(CTL, "/tmp/part.img", &[])?;
    sh(&format!(
        "printf 'label: dos\\n,24M,L\\n,,L\\n' | {SFDISK} -q {DEV}"
    ))?;
    ensure!(
        wait_for(Duration::from_secs(5), || crate::guest::exists(
            "/dev/abuse0p1"
        ) && crate::guest::exists(
            "/dev/abuse0p2"
        )),
        "partitions did not appear: {:?}",
        crate::guest::dev_nodes("abuse0")
    );
    let p1 =
        std::fs::read_to_string("/sys/block/abuse0/abuse0p1/size").map_err(|e| e.to_string())?;
    ensure!(
        p1.trim().parse::<u64>().unwrap_or(0) == 24 * 2048,
        "p1 has {} sectors",
        p1.trim()
    );
    sh(&format!("{MKFS_EXT4} -q -F /dev/abuse0p1 && mount /dev/abuse0p1 /mnt && echo hello > /mnt/x && umount /mnt"))?;
    sh("mount /dev/abuse0p1 /mnt && grep -q hello /mnt/x && umount /mnt")?;
    // RESET drops the partitions; a new setup over the same image finds them again.
    control(CTL)?.reset().map_err(|e| e.to_string())?;
    ensure!(
        wait_for(Duration::from_secs(5), || !crate::guest::exists(
            "/dev/abuse0p1"
        )),
        "partitions left after RESET"
    );
    setup(CTL, &config(64 * MIB, 512, 32, ABUSE_FLAG_FLUSH, 0))?;
    sh(&format!(
        "blockdev --rereadpt {DEV} 2>/dev/null || dd if={DEV} of=/dev/null count=1 2>/dev/null"
    ))?;
    ensure!(
        wait_for(Duration::from_secs(5), || crate::guest::exists(
            "/dev/abuse0p2"
        )),
        "partitions not found after setup again"
    );
    drop(server);
    teardown()
}
