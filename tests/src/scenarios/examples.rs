//! The library's examples (servers/examples/, built statically into the
//! guest as /bin/abuse-example-*): servers written on `abuse_servers::Server`
//! outside the crate. Each is killed with SIGKILL in the middle of fio
//! --verify and restarted: nothing it acknowledged is lost (the ramdisk
//! keeps its bytes in a /dev/shm file mapped shared, xor in its file); a
//! server started afresh reads back what the first run wrote; ext4 on it is
//! e2fsck-clean; SIGTERM stops it with exit 0.

use std::time::Duration;

use super::standalone::{story, Story, CTL, DEV, MIB};
use crate::ensure;
use crate::guest::{backing, insmod, sh, teardown, Outcome};

/// The story of [`story`] for an example started by `argv` (the same
/// command each time: once the device is configured, it takes it over).
fn example_story(
    argv: &[&str],
    store: Option<&str>,
) -> Result<super::standalone::ServerProcess, String> {
    story(&Story {
        first: argv,
        again: argv,
        start_within: Duration::from_secs(30),
        store,
        extra: None,
        restart_before_remount: false,
    })
}

/// servers/examples/ramdisk.rs: its /dev/shm store keeps the data across
/// kill -9; SIGTERM stops it with exit 0.
pub fn example_ramdisk_server() -> Outcome {
    insmod("max_abuse=1")?;
    let store = "/dev/shm/ram-example";
    let _ = std::fs::remove_file(store);
    let last = example_story(
        &["/bin/abuse-example-ramdisk", CTL, store, "64"],
        Some(store),
    )?;
    last.stop()?;
    let _ = std::fs::remove_file(store);
    teardown()
}

/// servers/examples/xor.rs over a file: its file keeps the data across
/// kill -9, and holds it XORed (zeroes written through the device read in
/// the file as the key); SIGTERM stops it with exit 0.
pub fn example_xor_server() -> Outcome {
    insmod("max_abuse=1")?;
    let file = "/tmp/xor.img";
    backing(file, 64 * MIB)?;
    let last = example_story(&["/bin/abuse-example-xor", CTL, file, "k3y!"], None)?;
    sh(&format!(
        "dd if=/dev/zero of={DEV} bs=4k count=1 oflag=direct conv=fsync 2>&1"
    ))?;
    let mut back = vec![1u8; 4096];
    std::io::Read::read_exact(
        &mut std::fs::File::open(DEV).map_err(|e| e.to_string())?,
        &mut back,
    )
    .map_err(|e| format!("reading {DEV}: {e}"))?;
    ensure!(
        back.iter().all(|&b| b == 0),
        "zeroes written through xor read back as {:?}",
        &back[..16]
    );
    last.stop()?;
    let head = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
    ensure!(
        head[..4096].chunks(4).all(|c| c == b"k3y!"),
        "zeroes written through xor are not the key in the file: {:?}",
        &head[..16]
    );
    teardown()
}
