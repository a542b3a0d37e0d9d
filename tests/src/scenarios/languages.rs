//! Servers in other languages: examples/c/ramdisk.c (pthreads, SERVE, on
//! abuse.h alone) and python/ramdisk.py (python/abuse.py: ctypes and
//! fcntl.ioctl). Each is killed with SIGKILL in the middle of fio --verify
//! and restarted on the same /dev/shm store: nothing it acknowledged is
//! lost, a server started afresh finds the data again, and ext4 made on the
//! device across another kill is e2fsck-clean with every file intact.

use std::time::Duration;

use super::standalone::{story, Story, CTL};
use crate::guest::{insmod, teardown, Outcome};

/// One server under test: how to start it on a device already set up, and
/// how to start it setting the device up.
struct Lang {
    serve: &'static [&'static str],
    setup: &'static [&'static str],
}

const C: Lang = Lang {
    serve: &["/bin/abuse-ramdisk-c", "-t", "2", CTL, "/dev/shm/ram-c"],
    setup: &[
        "/bin/abuse-ramdisk-c",
        "-t",
        "2",
        "-s",
        "64M",
        CTL,
        "/dev/shm/ram-c",
    ],
};

const PYTHON: Lang = Lang {
    serve: &[
        "/usr/bin/python3",
        "/lib/abuse/python/ramdisk.py",
        CTL,
        "/dev/shm/ram-py",
    ],
    setup: &[
        "/usr/bin/python3",
        "/lib/abuse/python/ramdisk.py",
        CTL,
        "/dev/shm/ram-py",
        "64M",
    ],
};

/// The story of [`story`] for one server, which sets the device up and
/// keeps the data in `store`, the tree carrying the Python sources too, and
/// one more restart before the remount; then SIGTERM stops it with exit 0.
fn ramdisk_story(lang: &Lang, store: &str) -> Outcome {
    insmod("max_abuse=1")?;
    let _ = std::fs::remove_file(store);
    let last = story(&Story {
        first: lang.setup,
        again: lang.serve,
        // Generous: python starts in a second or two under TCG.
        start_within: Duration::from_secs(60),
        store: Some(store),
        extra: Some("/lib/abuse/python"),
        restart_before_remount: true,
    })?;
    // 4. A clean stop.
    last.stop()?;
    let _ = std::fs::remove_file(store);
    teardown()
}

/// examples/c/ramdisk.c under fio --verify with a kill -9 and restarts.
pub fn c_ramdisk_server() -> Outcome {
    ramdisk_story(&C, "/dev/shm/ram-c")
}

/// python/ramdisk.py under fio --verify with a kill -9 and restarts.
pub fn python_ramdisk_server() -> Outcome {
    ramdisk_story(&PYTHON, "/dev/shm/ram-py")
}
