//! Filters over the real servers (`abusectl server ... --filter SPEC`):
//! injected write errors reach ext4 and leave a file system e2fsck can
//! repair; a read delay shows in fio's latencies; an IOPS limit holds.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::ensure;
use crate::guest::{backing, dmesg, e2fsck_clean, insmod, sh, teardown, Outcome, Server};
use crate::guest::{E2FSCK, MKFS_EXT4};

const CTL: &str = "/dev/abctl0";
const DEV: &str = "/dev/abuse0";
const MIB: u64 = 1 << 20;
const FIO: &str = "/usr/bin/fio";

/// Stops `server` with SIGTERM: it must exit 0.
fn stop(server: Server) -> Outcome {
    let status = server.stop_with(Signal::SIGTERM, Duration::from_secs(10))?;
    ensure!(status.success(), "SIGTERM: the server exited with {status}");
    Ok(())
}

/// Runs fio with `args` on the device, JSON out; its first job.
fn fio_json(args: &str) -> Result<serde_json::Value, String> {
    let out = sh(&format!(
        "{FIO} --name=f --filename={DEV} --direct=1 --output-format=json {args} 2>/dev/null"
    ))?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("fio's JSON: {e}: {out}"))?;
    let job = v["jobs"][0].clone();
    ensure!(job["error"] == 0, "fio failed: {job}");
    Ok(job)
}

/// The median READ completion latency of a fio job, in ms.
fn p50_ms(job: &serde_json::Value) -> f64 {
    job["read"]["clat_ns"]["percentile"]["50.000000"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6
}

/// ext4 over a file server whose writes fail now and then
/// (`--filter error:write,rate=5%,seed=1`).
///
/// What is asserted: a tree written and synced before the faults; then,
/// with the filter, new files written and synced: some WRITEs fail with
/// EIO, which the server counts and logs and the kernel reports (dmesg
/// names abuse0 with an I/O error). After the server is restarted without
/// the filter and the file system unmounted, nothing is promised about the
/// files written under the faults (their writes may have been lost, ext4
/// may have aborted its journal), but what the faults allow is a file
/// system e2fsck can bring back: `e2fsck -fy` repairs whatever it finds
/// (exit status below 4: nothing left uncorrected), `e2fsck -fn` then
/// finds it clean, and the tree synced before the faults reads back
/// intact (a failed write only ever loses new data; the journal's replay
/// restores metadata whose in-place write failed).
pub fn filter_error_ext4() -> Outcome {
    insmod("max_abuse=1")?;
    let img = "/tmp/flt.img";
    backing(img, 64 * MIB)?;
    let clean = Server::abusectl(CTL, &["file", img, "--setup", "qs=32"])?;
    sh(&format!("{MKFS_EXT4} -q -F {DEV} && mount {DEV} /mnt"))?;
    sh("mkdir -p /mnt/base && cp -r /etc /mnt/base/ && \
        dd if=/dev/urandom of=/mnt/base/rand bs=64k count=16 2>/dev/null && sync")?;
    let want = sh("cd /mnt/base && find . -type f | sort | xargs md5sum")?;
    // The file system stays mounted while the servers change: requests
    // wait for the next one.
    stop(clean)?;
    let kernel_before = dmesg().len();
    let log = "/tmp/flt-server.log";
    let faulty = Server::abusectl_logged(
        CTL,
        &["file", img, "--filter", "error:write,rate=5%,seed=1"],
        Some(log),
    )?;
    // Some of these fail (EIO, or EROFS once ext4 aborts): not checked.
    let _ = sh("mkdir -p /mnt/new && i=0; while [ $i -lt 40 ]; do \
        dd if=/dev/urandom of=/mnt/new/f$i bs=16k count=4 conv=fsync 2>/dev/null; \
        i=$((i + 1)); done; sync");
    // The counters are saved every second.
    std::thread::sleep(Duration::from_millis(1500));
    let (errors, writes) = (faulty.stat("errors"), faulty.stat("writes"));
    println!(
        "error filter: {errors} of {} writes failed",
        errors + writes
    );
    ensure!(errors > 0, "no write failed: {}", faulty.stats());
    stop(faulty)?;
    let kernel = dmesg().get(kernel_before..).unwrap_or_default().to_string();
    ensure!(
        kernel
            .lines()
            .any(|l| l.contains("abuse0") && l.contains("I/O error")),
        "the kernel reported no I/O error on abuse0:\n{kernel}"
    );
    let said = std::fs::read_to_string(log).unwrap_or_default();
    ensure!(
        said.contains("/dev/abctl0: WRITE of") && said.contains("failed: I/O error"),
        "the server logged no failed WRITE: {said}"
    );
    // Without the filter: unmount, repair, check.
    let _clean = Server::abusectl(CTL, &["file", img])?;
    sh("umount /mnt")?;
    let fsck = sh(&format!(
        "{E2FSCK} -fy {DEV} >/tmp/flt-fsck.log 2>&1; echo $?"
    ))?;
    let code: i32 = fsck.trim().parse().map_err(|_| format!("e2fsck: {fsck}"))?;
    let fsck_log = std::fs::read_to_string("/tmp/flt-fsck.log").unwrap_or_default();
    ensure!(
        code < 4,
        "e2fsck -fy left errors uncorrected (exit {code}):\n{fsck_log}"
    );
    println!("e2fsck -fy after the faults: exit {code}");
    e2fsck_clean(DEV)?;
    let got = sh(&format!(
        "mount -o ro {DEV} /mnt && cd /mnt/base && find . -type f | sort | xargs md5sum; cd /; umount /mnt"
    ))?;
    ensure!(
        got == want,
        "the tree synced before the faults changed:\n{got}\nvs\n{want}"
    );
    teardown()
}

/// fio QD1 random 4 KiB reads: over a file server with
/// `--filter delay:read=10ms` the median latency is at least 10 ms (and
/// not much more); without the filter it is well below.
pub fn filter_delay_latency() -> Outcome {
    insmod("max_abuse=1")?;
    let img = "/tmp/delay.img";
    backing(img, 32 * MIB)?;
    let plain = Server::abusectl(CTL, &["file", img, "--setup", "qs=32"])?;
    let fio = "--rw=randread --bs=4k --ioengine=psync --iodepth=1 --size=16M --time_based";
    let base = p50_ms(&fio_json(&format!("{fio} --runtime=1"))?);
    stop(plain)?;
    let _delayed = Server::abusectl(CTL, &["file", img, "--filter", "delay:read=10ms"])?;
    let job = fio_json(&format!("{fio} --runtime=3"))?;
    let p50 = p50_ms(&job);
    let reads = job["read"]["total_ios"].as_u64().unwrap_or(0);
    println!(
        "randread QD1 p50: {base:.3} ms without, {p50:.3} ms with delay:read=10ms ({reads} reads)"
    );
    ensure!(reads >= 50, "only {reads} reads in 3 s");
    ensure!(
        (10.0..40.0).contains(&p50),
        "p50 {p50:.3} ms with delay:read=10ms: not from 10 ms to a little more"
    );
    ensure!(
        (0.0..10.0).contains(&base),
        "p50 {base:.3} ms without the filter: the delay proves nothing"
    );
    teardown()
}

/// fio random 4 KiB reads at iodepth 16 over a null server with
/// `--filter rate:iops=200`: 200 IOPS within 10% (after a 1 s ramp, over
/// 4 s); without the filter it does more than 10% over (else the limit
/// would prove nothing).
pub fn filter_rate_iops() -> Outcome {
    insmod("max_abuse=1")?;
    let fio = "--rw=randread --bs=4k --ioengine=libaio --iodepth=16 --size=64M --time_based";
    let plain = Server::abusectl(CTL, &["null", "64M", "--setup", "qs=32"])?;
    let free = fio_json(&format!("{fio} --runtime=1"))?["read"]["iops"]
        .as_f64()
        .unwrap_or(0.0);
    stop(plain)?;
    let _limited = Server::abusectl(CTL, &["null", "64M", "--filter", "rate:iops=200"])?;
    let job = fio_json(&format!("{fio} --ramp_time=1 --runtime=4"))?;
    let iops = job["read"]["iops"].as_f64().unwrap_or(0.0);
    println!("randread QD16: {free:.0} IOPS free, {iops:.1} IOPS under rate:iops=200");
    ensure!(
        (180.0..=220.0).contains(&iops),
        "rate:iops=200 gave {iops:.1} IOPS"
    );
    ensure!(
        free.is_finite() && free > 220.0,
        "{free:.0} IOPS without the filter: the limit proves nothing"
    );
    teardown()
}
