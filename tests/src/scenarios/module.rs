//! Loading and unloading the module: nodes, modes, status, parameters.

use std::os::linux::fs::MetadataExt;
use std::os::unix::fs::FileTypeExt;
use std::time::Duration;

use abuse_sys::{Control, ABUSE_VERSION};
use nix::errno::Errno;

use crate::ensure;
use crate::guest::{dev_nodes, exists, insmod, rmmod, sh, wait_for, Outcome};

/// Checks that exactly `n` pairs exist, with the right types and modes.
fn check_pairs(n: usize) -> Outcome {
    let want_ctl: Vec<String> = (0..n).map(|i| format!("abctl{i}")).collect();
    let want_blk: Vec<String> = (0..n).map(|i| format!("abuse{i}")).collect();
    let (mut want_ctl_sorted, mut want_blk_sorted) = (want_ctl.clone(), want_blk.clone());
    want_ctl_sorted.sort();
    want_blk_sorted.sort();
    ensure!(
        wait_for(Duration::from_secs(5), || dev_nodes("abctl")
            == want_ctl_sorted
            && dev_nodes("abuse") == want_blk_sorted),
        "expected {want_ctl:?} and {want_blk:?}, found {:?} and {:?}",
        dev_nodes("abctl"),
        dev_nodes("abuse")
    );
    for i in 0..n {
        let ctl = std::fs::metadata(format!("/dev/abctl{i}")).map_err(|e| e.to_string())?;
        ensure!(
            ctl.file_type().is_char_device(),
            "/dev/abctl{i} is not a character device"
        );
        ensure!(
            ctl.st_mode() & 0o777 == 0o600,
            "/dev/abctl{i} has mode {:o}, want 600",
            ctl.st_mode() & 0o777
        );
        ensure!(ctl.st_uid() == 0, "/dev/abctl{i} is not owned by root");
        let blk = std::fs::metadata(format!("/dev/abuse{i}")).map_err(|e| e.to_string())?;
        ensure!(
            blk.file_type().is_block_device(),
            "/dev/abuse{i} is not a block device"
        );
        ensure!(
            blk.st_mode() & 0o077 == 0,
            "/dev/abuse{i} has mode {:o}: group/other access",
            blk.st_mode() & 0o777
        );
        let size = std::fs::read_to_string(format!("/sys/block/abuse{i}/size"))
            .map_err(|e| e.to_string())?;
        ensure!(
            size.trim() == "0",
            "/dev/abuse{i} has capacity {} sectors, want 0",
            size.trim()
        );
    }
    Ok(())
}

pub fn load_creates_pairs() -> Outcome {
    insmod("max_abuse=4")?;
    check_pairs(4)?;
    ensure!(
        !exists("/dev/abuse4") && !exists("/dev/abctl4"),
        "a fifth pair exists"
    );
    rmmod()
}

pub fn default_is_8_devices() -> Outcome {
    insmod("")?;
    check_pairs(8)?;
    rmmod()
}

pub fn bad_params_refused() -> Outcome {
    // max_part=256: more than a disk's 255 partitions.
    for params in [
        "max_abuse=0",
        "max_abuse=100000",
        "max_part=4000000",
        "max_part=256",
    ] {
        ensure!(insmod(params).is_err(), "insmod {params} succeeded");
        ensure!(
            dev_nodes("abctl").is_empty() && dev_nodes("abuse").is_empty(),
            "insmod {params} left nodes behind"
        );
    }
    Ok(())
}

pub fn info_reports_status() -> Outcome {
    insmod("max_abuse=4")?;
    check_pairs(4)?;
    for i in 0..4u32 {
        let path = format!("/dev/abctl{i}");
        // The raw ioctl...
        let st = Control::open(&path)
            .map_err(|e| e.to_string())?
            .status()
            .map_err(|e| e.to_string())?;
        let blk = std::fs::metadata(format!("/dev/abuse{i}")).map_err(|e| e.to_string())?;
        ensure!(st.index == i, "{path}: index {} != {i}", st.index);
        ensure!(
            st.dev == blk.st_rdev(),
            "{path}: dev {:#x} != rdev of /dev/abuse{i} {:#x}",
            st.dev,
            blk.st_rdev()
        );
        ensure!(
            st.size == 0 && st.flags == 0,
            "{path}: unconfigured device reports size {} flags {:#x}",
            st.size,
            st.flags
        );
        ensure!(
            st.version == ABUSE_VERSION,
            "{path}: version {}",
            st.version
        );
        ensure!(
            st.max_bytes > 0 && st.max_batch > 0,
            "{path}: limits not reported"
        );
        // ...and what abusectl prints of it.
        let human = sh(&format!("abusectl info {path}"))?;
        ensure!(
            human.contains("unconfigured"),
            "abusectl info {path} does not say unconfigured:\n{human}"
        );
        ensure!(
            human.contains(&format!("/dev/abuse{i}")),
            "abusectl info {path} does not name /dev/abuse{i}:\n{human}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&sh(&format!("abusectl info --json {path}"))?)
                .map_err(|e| e.to_string())?;
        ensure!(
            json["index"] == i && json["size"] == 0 && json["configured"] == false,
            "abusectl info --json {path}: {json}"
        );
        ensure!(
            json["dev"] == st.dev,
            "abusectl info --json {path}: dev {} != {}",
            json["dev"],
            st.dev
        );
    }
    // A missing device is a clear error, not a crash.
    let err = sh("abusectl info /dev/abctl9").err().unwrap_or_default();
    ensure!(
        err.contains("no such device"),
        "abusectl info on a missing node: {err:?}"
    );
    rmmod()
}

pub fn unknown_ioctl_enotty() -> Outcome {
    insmod("max_abuse=1")?;
    check_pairs(1)?;
    let ctl = Control::open("/dev/abctl0").map_err(|e| e.to_string())?;
    // Unknown numbers in ABUSE's range and outside it, with and without
    // direction bits: ENOTTY, and the device is untouched.
    for req in [
        nix::request_code_none!(b'A', 0x2f),
        nix::request_code_read!(b'A', 0x2e, 8),
        nix::request_code_write!(b'A', 0x20, 4),
        nix::request_code_none!(b'Z', 0x20),
    ] {
        // SAFETY: the argument is a null pointer the kernel must not touch
        // for an unknown ioctl.
        let r = unsafe {
            nix::libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&ctl_fd(&ctl)),
                req as _,
                0usize,
            )
        };
        let errno = Errno::last();
        ensure!(
            r == -1 && errno == Errno::ENOTTY,
            "ioctl {req:#x}: got {r} ({errno}), want ENOTTY"
        );
    }
    let st = ctl.status().map_err(|e| e.to_string())?;
    ensure!(st.size == 0, "device changed by unknown ioctls");
    drop(ctl);
    rmmod()
}

fn ctl_fd(ctl: &Control) -> std::os::fd::BorrowedFd<'_> {
    std::os::fd::AsFd::as_fd(ctl)
}

pub fn rmmod_removes_nodes() -> Outcome {
    insmod("max_abuse=4 max_part=3")?;
    check_pairs(4)?;
    // While a control node is open, the module is pinned.
    let ctl = Control::open("/dev/abctl2").map_err(|e| e.to_string())?;
    ensure!(
        rmmod().is_err(),
        "rmmod succeeded while /dev/abctl2 was open"
    );
    drop(ctl);
    rmmod()?;
    ensure!(
        wait_for(Duration::from_secs(5), || dev_nodes("abctl").is_empty()
            && dev_nodes("abuse").is_empty()),
        "nodes left after rmmod: {:?} {:?}",
        dev_nodes("abctl"),
        dev_nodes("abuse")
    );
    ensure!(
        !exists("/sys/block/abuse0") && !exists("/sys/class/abctl"),
        "sysfs entries left after rmmod"
    );
    let devices = std::fs::read_to_string("/proc/devices").map_err(|e| e.to_string())?;
    ensure!(
        !devices.contains("abuse") && !devices.contains("abctl"),
        "majors left registered:\n{devices}"
    );
    Ok(())
}

pub fn load_unload_10x() -> Outcome {
    for round in 0..10 {
        insmod("max_abuse=4").map_err(|e| format!("round {round}: {e}"))?;
        check_pairs(4).map_err(|e| format!("round {round}: {e}"))?;
        let st = Control::open("/dev/abctl3")
            .and_then(|c| c.status())
            .map_err(|e| format!("round {round}: {e}"))?;
        ensure!(st.index == 3, "round {round}: wrong index");
        rmmod().map_err(|e| format!("round {round}: {e}"))?;
        ensure!(
            wait_for(Duration::from_secs(5), || dev_nodes("abctl").is_empty()
                && dev_nodes("abuse").is_empty()),
            "round {round}: nodes left after rmmod"
        );
    }
    Ok(())
}
