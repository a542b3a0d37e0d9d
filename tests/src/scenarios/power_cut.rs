//! Power cut (two boots of their own, tests/vm/run.sh): ext4 on a cow
//! device and on a qcow2 device, their delta and image on a virtio disk
//! (cache=none); the host kills the VM while files are being written, and
//! the next boot checks that nothing fsync'd was lost.

use std::time::Duration;

use nix::sys::signal::Signal;

use super::cow::md5;
use crate::ensure;
use crate::guest::{e2fsck_clean, insmod, sh, teardown, Outcome, Server, MKFS_EXT4};

/// Where the files live: ext4 on the virtio disk.
const DISK_MNT: &str = "/vd";
const MANIFEST: &str = "/vd/manifest";

/// The two devices: (control node, device, mount point, backend args).
fn devices() -> [(&'static str, &'static str, &'static str, Vec<String>); 2] {
    [
        (
            "/dev/abctl0",
            "/dev/abuse0",
            "/mnt",
            vec!["cow".into(), format!("{DISK_MNT}/pc.cow")],
        ),
        (
            "/dev/abctl1",
            "/dev/abuse1",
            "/mnt2",
            vec!["qcow2".into(), format!("{DISK_MNT}/pc.qcow2")],
        ),
    ]
}

/// Servers of both devices, setting them up (both boots).
fn serve_both() -> Result<Vec<Server>, String> {
    devices()
        .into_iter()
        .map(|(ctl, _, _, backend)| {
            let mut args: Vec<&str> = backend.iter().map(String::as_str).collect();
            args.extend(["--threads", "4", "--setup", ""]);
            Server::abusectl(ctl, &args)
        })
        .collect()
}

/// First boot: the delta over a base and a qcow2 image over the same base
/// as its backing file, both on the virtio disk. Files are written to
/// both filesystems and fsync'd one by one, each recorded (with its
/// checksum) in a manifest on the virtio disk once its fsync returned;
/// then the host is told to cut the power and the guest goes on writing
/// until it does.
pub fn power_cut_write() -> Outcome {
    insmod("max_abuse=2")?;
    sh(&format!(
        "{MKFS_EXT4} -q -F /dev/vda && mkdir -p {DISK_MNT} && mount /dev/vda {DISK_MNT}"
    ))?;
    sh(&format!(
        "dd if=/dev/urandom of={DISK_MNT}/base.img bs=1M count=64 2>/dev/null && sync"
    ))?;
    sh(&format!(
        "abusectl cow create --base {DISK_MNT}/base.img --delta {DISK_MNT}/pc.cow --block-size 64K"
    ))?;
    sh(&format!(
        "/usr/bin/qemu-img create -q -f qcow2 -b base.img -F raw {DISK_MNT}/pc.qcow2 && sync"
    ))?;
    let _servers = serve_both()?;
    for (_, dev, mnt, _) in devices() {
        sh(&format!(
            "{MKFS_EXT4} -q -F {dev} && mkdir -p {mnt} && mount {dev} {mnt} && mkdir {mnt}/d"
        ))?;
    }
    sh(&format!(": > {MANIFEST} && sync"))?;
    let record = |i: u32| -> Outcome {
        for (_, _, mnt, _) in devices() {
            let f = format!("{mnt}/d/f{i}");
            // conv=fsync: the file is durable (a FLUSH reached the
            // server and was committed) when dd returns.
            sh(&format!(
                "dd if=/dev/urandom of={f} bs=4k count={} conv=fsync 2>/dev/null",
                1 + i % 37
            ))?;
            let sum = md5(&f)?;
            sh(&format!(
                "echo '{sum} {f}' >> {MANIFEST} && sync {MANIFEST}"
            ))?;
        }
        Ok(())
    };
    for i in 0..30 {
        record(i)?;
    }
    println!("abuse-vm: cut the power");
    // Keep writing (synced and not) until the power goes.
    let start = std::time::Instant::now();
    let mut i = 30;
    while start.elapsed() < Duration::from_secs(120) {
        record(i)?;
        for (_, _, mnt, _) in devices() {
            sh(&format!(
                "dd if=/dev/urandom of={mnt}/d/unsynced{i} bs=64k count=8 2>/dev/null"
            ))?;
        }
        i += 1;
    }
    Err("the power was not cut".into())
}

/// Second boot: `qemu-img check` finds no corruption in the qcow2 image
/// (leaked clusters are allowed: the image is dirty); both are served
/// again; each filesystem mounts (its journal replays) and e2fsck -fn
/// finds it clean; every file the manifest lists (each fsync'd before the
/// cut) is there with its checksum; after the qcow2 server stops cleanly,
/// `qemu-img check` finds nothing at all.
pub fn power_cut_check() -> Outcome {
    insmod("max_abuse=2")?;
    sh(&format!("mkdir -p {DISK_MNT} && mount /dev/vda {DISK_MNT}"))?;
    let img = format!("{DISK_MNT}/pc.qcow2");
    let check = sh(&format!("/usr/bin/qemu-img check {img} 2>&1; echo rc=$?"))?;
    ensure!(
        check.contains("rc=0") || check.contains("rc=3"),
        "qemu-img check after the power cut found corruption:\n{check}"
    );
    let mut servers = serve_both()?;
    for (_, dev, mnt, _) in devices() {
        sh(&format!(
            "mkdir -p {mnt} && mount {dev} {mnt} && umount {mnt}"
        ))?;
        e2fsck_clean(dev).map_err(|e| format!("{dev} after the power cut: {e}"))?;
        sh(&format!("mount {dev} {mnt}"))?;
    }
    let manifest = std::fs::read_to_string(MANIFEST).map_err(|e| format!("{MANIFEST}: {e}"))?;
    let mut checked = 0;
    for line in manifest.lines() {
        let Some((sum, file)) = line.split_once(' ') else {
            continue;
        };
        let got = md5(file).map_err(|e| format!("{file}, fsync'd before the cut, is gone: {e}"))?;
        ensure!(
            got == sum,
            "{file}, fsync'd before the cut, changed: {got} != {sum}"
        );
        checked += 1;
    }
    ensure!(
        checked >= 60,
        "only {checked} files were recorded before the cut"
    );
    println!("power_cut: {checked} fsync'd files intact after the power cut");
    for (_, _, mnt, _) in devices() {
        sh(&format!("umount {mnt}"))?;
    }
    let qcow2 = servers.pop().ok_or("no qcow2 server")?;
    let status = qcow2.stop_with(Signal::SIGTERM, Duration::from_secs(30))?;
    ensure!(status.success(), "the qcow2 server stopped with {status}");
    let check = sh(&format!("/usr/bin/qemu-img check {img} 2>&1; echo rc=$?"))?;
    ensure!(
        check.contains("No errors") && check.contains("rc=0"),
        "qemu-img check after the qcow2 server stopped:\n{check}"
    );
    drop(servers);
    teardown()
}
