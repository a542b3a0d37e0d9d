//! SET_STATUS, GET_STATUS and RESET: what they accept, refuse and change.

use std::time::{Duration, Instant};

use abuse_sys::uapi::*;
use nix::errno::Errno;

use crate::ensure;
use crate::guest::SETPRIV;
use crate::guest::{
    config, control, insmod, rmmod, setup, sh, teardown, wait_for, Outcome, Server,
};

const CTL: &str = "/dev/abctl0";
const MIB: u64 = 1 << 20;

fn sysfs(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Capacity and block size are what was asked; GET_STATUS reflects them;
/// a second SET_STATUS is EBUSY; RECONNECT changes only read-only and the
/// queue depth; invalid configurations are EINVAL and change nothing.
pub fn setup_rules() -> Outcome {
    insmod("max_abuse=2")?;
    let ctl = control(CTL)?;
    let errno = |st: &AbuseStatus| ctl.set_status(st).err().map(|e| e.errno());
    // Invalid on an unconfigured device: EINVAL, still unconfigured.
    let bad = [
        ("zero size", config(0, 4096, 16, 0, 0)),
        (
            "size not a multiple of bs",
            config(MIB + 512, 4096, 16, 0, 0),
        ),
        ("bs not a power of two", config(MIB, 1536, 16, 0, 0)),
        ("bs below 512", config(MIB, 256, 16, 0, 0)),
        ("bs above 4096", config(MIB, 8192, 16, 0, 0)),
        ("queue depth 0", config(MIB, 4096, 0, 0, 0)),
        ("absurd queue depth", config(MIB, 4096, 1_000_000, 0, 0)),
        (
            "more queues than the device can have",
            AbuseStatus {
                queues: ABUSE_MAX_QUEUES + 1,
                ..config(MIB, 4096, 16, 0, 0)
            },
        ),
        ("unknown flag", config(MIB, 4096, 16, 1 << 12, 0)),
        ("timeout below 1 s", config(MIB, 4096, 16, 0, 999)),
        (
            "size past ABUSE_MAX_SIZE",
            config(ABUSE_MAX_SIZE + 4096, 4096, 16, 0, 0),
        ),
        ("size that wraps sectors", config(!4095, 4096, 16, 0, 0)),
        (
            "FUA without FLUSH",
            config(MIB, 4096, 16, ABUSE_FLAG_FUA, 0),
        ),
        (
            "reserved set",
            AbuseStatus {
                reserved: [0, 0, 0, 1, 0],
                ..config(MIB, 4096, 16, 0, 0)
            },
        ),
    ];
    for (what, st) in &bad {
        ensure!(
            errno(st) == Some(Errno::EINVAL),
            "{what}: got {:?}, want EINVAL",
            errno(st)
        );
        let now = ctl.status().map_err(|e| e.to_string())?;
        ensure!(
            now.flags & ABUSE_FLAG_CONFIGURED == 0 && now.size == 0,
            "{what}: the device changed"
        );
    }
    ensure!(
        sysfs("/sys/block/abuse0/size") == "0",
        "capacity changed by invalid setups"
    );

    // A valid setup: capacity, block size, queue depth and limits as asked.
    setup(CTL, &config(64 * MIB, 4096, 32, ABUSE_FLAG_FLUSH, 5000))?;
    let st = ctl.status().map_err(|e| e.to_string())?;
    ensure!(
        st.size == 64 * MIB && st.block_size == 4096 && st.queue_depth == 32,
        "status after setup: {st:?}"
    );
    ensure!(
        st.flags & ABUSE_FLAG_CONFIGURED != 0 && st.flags & ABUSE_FLAG_FLUSH != 0,
        "flags after setup: {:#x}",
        st.flags
    );
    ensure!(st.timeout_ms == 5000, "timeout {}", st.timeout_ms);
    ensure!(
        sysfs("/sys/block/abuse0/size") == (64 * MIB / 512).to_string(),
        "capacity in sysfs: {}",
        sysfs("/sys/block/abuse0/size")
    );
    ensure!(
        sysfs("/sys/block/abuse0/queue/logical_block_size") == "4096",
        "logical block size in sysfs"
    );
    // One hardware queue per online CPU unless asked, as blk-mq sees it.
    let st = ctl.status().map_err(|e| e.to_string())?;
    let hw = std::fs::read_dir("/sys/block/abuse0/mq")
        .map_err(|e| e.to_string())?
        .count();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    ensure!(
        st.queues as usize == cpus && hw == cpus && st.max_queues as usize >= cpus,
        "{} queues reported (max {}), {hw} in sysfs, {cpus} CPUs",
        st.queues,
        st.max_queues
    );
    ensure!(
        sysfs("/sys/block/abuse0/queue/write_cache") == "write back",
        "FLUSH advertised but write cache off"
    );
    let blk = sh("blockdev --getsize64 /dev/abuse0 2>/dev/null || cat /sys/block/abuse0/size")?;
    ensure!(
        blk.trim() == (64 * MIB).to_string() || blk.trim() == (64 * MIB / 512).to_string(),
        "blockdev size {blk}"
    );

    // Configured: a second SET_STATUS is EBUSY and changes nothing.
    ensure!(
        errno(&config(32 * MIB, 512, 8, 0, 0)) == Some(Errno::EBUSY),
        "second SET_STATUS not EBUSY"
    );
    // RECONNECT: read-only and queue depth change...
    setup(
        CTL,
        &config(
            0,
            0,
            8,
            ABUSE_FLAG_RECONNECT | ABUSE_FLAG_FLUSH | ABUSE_FLAG_READ_ONLY,
            0,
        ),
    )?;
    let st = ctl.status().map_err(|e| e.to_string())?;
    ensure!(
        st.queue_depth == 8 && st.flags & ABUSE_FLAG_READ_ONLY != 0,
        "RECONNECT did not apply: {st:?}"
    );
    ensure!(
        sysfs("/sys/block/abuse0/ro") == "1",
        "RECONNECT not visible in sysfs"
    );
    // ...but nothing else: a different size, block size or feature is EINVAL.
    for (what, st) in [
        (
            "size",
            config(32 * MIB, 0, 8, ABUSE_FLAG_RECONNECT | ABUSE_FLAG_FLUSH, 0),
        ),
        (
            "block size",
            config(0, 512, 8, ABUSE_FLAG_RECONNECT | ABUSE_FLAG_FLUSH, 0),
        ),
        (
            "features",
            config(
                0,
                0,
                8,
                ABUSE_FLAG_RECONNECT | ABUSE_FLAG_FLUSH | ABUSE_FLAG_DISCARD,
                0,
            ),
        ),
        (
            "queue depth",
            config(0, 0, 5000, ABUSE_FLAG_RECONNECT | ABUSE_FLAG_FLUSH, 0),
        ),
    ] {
        ensure!(
            errno(&st) == Some(Errno::EINVAL),
            "RECONNECT changing {what}: {:?}",
            errno(&st)
        );
    }
    let st = ctl.status().map_err(|e| e.to_string())?;
    ensure!(
        st.size == 64 * MIB && st.block_size == 4096 && st.queue_depth == 8,
        "refused RECONNECTs changed the device: {st:?}"
    );
    setup(
        CTL,
        &config(0, 0, 0, ABUSE_FLAG_RECONNECT | ABUSE_FLAG_FLUSH, 0),
    )?;
    ensure!(
        sysfs("/sys/block/abuse0/ro") == "0",
        "RECONNECT did not clear read-only"
    );

    // The other device is untouched.
    let other = control("/dev/abctl1")?
        .status()
        .map_err(|e| e.to_string())?;
    ensure!(
        other.size == 0 && other.flags == 0,
        "setting up abctl0 changed abctl1"
    );
    ctl.reset().map_err(|e| e.to_string())?;
    drop(ctl);
    rmmod()
}

/// RESET fails every pending and fetched request with EIO within 1 s,
/// unconfigures the device; RESET of an unconfigured device is harmless;
/// the device can be set up again.
pub fn reset_fails_outstanding() -> Outcome {
    insmod("max_abuse=1")?;
    let ctl = control(CTL)?;
    ctl.reset()
        .map_err(|e| format!("RESET of an unconfigured device: {e}"))?;
    crate::guest::backing("/tmp/reset.img", 16 * MIB)?;
    for round in 0..3 {
        setup(CTL, &config(16 * MIB, 4096, 16, 0, 0))?;
        // One server fetches a request and holds it; more I/O stays pending.
        let holder = Server::start(
            CTL,
            "/tmp/reset.img",
            &["--hold-ms", "600000", "--batch", "1"],
        )?;
        let readers: Vec<_> = (0..4)
            .map(|i| {
                std::thread::spawn(move || {
                    sh(&format!(
                        "dd if=/dev/abuse0 of=/dev/null bs=4096 count=1 skip={} iflag=direct",
                        i * 100
                    ))
                })
            })
            .collect();
        ensure!(
            wait_for(Duration::from_secs(10), || holder.stat("max_get") == 1
                && ctl
                    .status()
                    .map(|s| s.pending == 3 && s.in_flight == 1)
                    .unwrap_or(false)),
            "round {round}: no fetched and pending requests to reset: {:?}",
            ctl.status()
        );
        let t = Instant::now();
        ctl.reset().map_err(|e| e.to_string())?;
        for r in readers {
            let res = r.join().map_err(|_| "reader panicked")?;
            ensure!(
                res.is_err(),
                "round {round}: a reader succeeded across RESET"
            );
        }
        ensure!(
            t.elapsed() < Duration::from_secs(1),
            "round {round}: RESET took {:?} to fail everything",
            t.elapsed()
        );
        let st = ctl.status().map_err(|e| e.to_string())?;
        ensure!(
            st.flags & ABUSE_FLAG_CONFIGURED == 0 && st.size == 0,
            "round {round}: still configured after RESET"
        );
        ensure!(
            st.pending == 0 && st.in_flight == 0,
            "round {round}: requests left: {st:?}"
        );
        ensure!(
            sysfs("/sys/block/abuse0/size") == "0",
            "round {round}: capacity not 0"
        );
        ctl.reset().map_err(|e| format!("second RESET: {e}"))?;
        holder.kill();
    }
    // Set up again and serve normally.
    setup(CTL, &config(16 * MIB, 4096, 16, 0, 0))?;
    let server = Server::start(CTL, "/tmp/reset.img", &[])?;
    sh("dd if=/dev/zero of=/dev/abuse0 bs=4096 count=16 oflag=direct")?;
    drop((server, ctl));
    teardown()
}

/// While a device is configured the module stays (rmmod → EBUSY); after
/// RESET of all devices rmmod succeeds; 20 load/setup/reset/unload cycles.
pub fn rmmod_while_configured() -> Outcome {
    for round in 0..20 {
        insmod("max_abuse=2").map_err(|e| format!("round {round}: {e}"))?;
        setup(CTL, &config(8 * MIB, 512, 4, 0, 0))?;
        setup("/dev/abctl1", &config(4 * MIB, 4096, 64, 0, 0))?;
        let err = rmmod().err().unwrap_or_default();
        // busybox rmmod asks with O_NONBLOCK: a module in use is EAGAIN.
        ensure!(
            err.contains("temporarily unavailable") || err.contains("in use"),
            "round {round}: rmmod of a configured module: {err:?}"
        );
        control(CTL)?.reset().map_err(|e| e.to_string())?;
        ensure!(
            rmmod().is_err(),
            "round {round}: rmmod succeeded with abctl1 still configured"
        );
        control("/dev/abctl1")?.reset().map_err(|e| e.to_string())?;
        rmmod().map_err(|e| format!("round {round}: after RESET of all: {e}"))?;
        ensure!(
            crate::guest::dev_nodes("abuse").is_empty(),
            "round {round}: nodes left"
        );
    }
    Ok(())
}

/// Without CAP_SYS_ADMIN: the nodes don't open, and the ioctls are refused.
pub fn non_root_refused() -> Outcome {
    insmod("max_abuse=1")?;
    setup(CTL, &config(8 * MIB, 4096, 8, 0, 0))?;
    // As nobody: open fails.
    let out = sh(&format!("{SETPRIV} --reuid=65534 --regid=65534 --clear-groups abusectl info /dev/abctl0 2>&1; echo rc=$?"))?;
    ensure!(
        out.contains("rc=1") && out.contains("permission denied"),
        "abusectl info as nobody: {out}"
    );
    // As root without CAP_SYS_ADMIN: open (0600 root) is allowed by the
    // mode but refused by the driver; an fd opened before dropping the
    // capability still cannot issue ioctls.
    let out = sh(&format!("{SETPRIV} --inh-caps=-sys_admin --bounding-set=-sys_admin abusectl info /dev/abctl0 2>&1; echo rc=$?"))?;
    ensure!(
        out.contains("rc=1")
            && (out.contains("not permitted") || out.contains("permission denied")),
        "abusectl info without CAP_SYS_ADMIN: {out}"
    );
    let out = sh(&format!("exec 3<>/dev/abctl0; {SETPRIV} --inh-caps=-sys_admin --bounding-set=-sys_admin abuse-guest ioctl-fd3 2>&1; echo rc=$?"))?;
    ensure!(
        out.contains("EPERM") && out.contains("rc=0"),
        "ioctl on an inherited fd without CAP_SYS_ADMIN: {out}"
    );
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(st.size == 8 * MIB, "the refused ioctls changed the device");
    control(CTL)?.reset().map_err(|e| e.to_string())?;
    rmmod()
}
