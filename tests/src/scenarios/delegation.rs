//! Delegation: root hands one device to an unprivileged user, who may then
//! serve it and nothing more.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use abuse_sys::uapi::*;

use super::servers::fio_verify;
use crate::ensure;
use crate::guest::{
    backing, control, e2fsck_clean, insmod, sh, teardown, Outcome, Server, MKFS_EXT4, SETPRIV,
};

const NOBODY: u32 = 65534;

fn as_nobody(cmd: &str) -> Result<String, String> {
    sh(&format!(
        "{SETPRIV} --reuid={NOBODY} --regid={NOBODY} --clear-groups {cmd} 2>&1; echo rc=$?"
    ))
}

/// `owner=65534` delegates /dev/abctl0 to nobody: its node becomes
/// nobody's, and a server running as nobody serves mkfs.ext4, ext4 and fio
/// --verify. nobody is refused (EPERM, nothing changed) a reset, a
/// reconfiguration, and a device not delegated to it even when the node's
/// mode would let it open; root's RESET ends the delegation (the node is
/// root's again, the server's open file is refused and it stops).
pub fn delegated_server_without_root() -> Outcome {
    insmod("max_abuse=2")?;
    backing("/tmp/dl.img", 64 << 20)?;
    sh("chown 65534:65534 /tmp/dl.img && chmod 1777 /tmp")?;
    let out = sh("abusectl setup /dev/abctl0 size=64M,flush,owner=65534:65534 2>&1")?;
    ensure!(out.trim().is_empty(), "setup with owner: {out}");
    let node = std::fs::metadata("/dev/abctl0").map_err(|e| e.to_string())?;
    ensure!(
        (node.uid(), node.gid(), node.mode() & 0o777) == (NOBODY, NOBODY, 0o600),
        "node is {}:{} mode {:o}",
        node.uid(),
        node.gid(),
        node.mode() & 0o777
    );
    let st = control("/dev/abctl0")?
        .status()
        .map_err(|e| e.to_string())?;
    ensure!(
        st.flags & ABUSE_FLAG_DELEGATED != 0 && st.owner_uid == NOBODY,
        "status: {st:?}"
    );
    // abusectl list: one line per device, as a person reads it, and the
    // same fields as JSON.
    let list = sh("abusectl list")?;
    print!("{list}");
    let line = list
        .lines()
        .find(|l| l.starts_with("/dev/abctl0 "))
        .unwrap_or_default();
    let queues = format!("{}x{}", st.queues, st.queue_depth);
    ensure!(
        line.contains(" rw ")
            && line.contains("64M")
            && line.contains(&queues)
            && line.contains("65534:65534"),
        "abusectl list:\n{list}"
    );
    ensure!(
        list.lines()
            .any(|l| l.starts_with("/dev/abctl1 ") && l.contains(" - ")),
        "the unconfigured device in abusectl list:\n{list}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&sh("abusectl list --json")?).map_err(|e| e.to_string())?;
    ensure!(
        json[0]["owner"] == "65534:65534"
            && json[0]["queues"] == st.queues
            && json[1]["owner"].is_null(),
        "abusectl list --json: {json}"
    );
    let mut server = Server::abusectl_as(
        NOBODY,
        "/dev/abctl0",
        &["file", "/tmp/dl.img"],
        "/tmp/dl.log",
    )?;
    fio_verify(2, 8, "")?;
    sh(&format!(
        "{MKFS_EXT4} -q -F /dev/abuse0 && mount /dev/abuse0 /mnt && cp -r /etc /mnt/ && dd if=/dev/urandom of=/mnt/f bs=1M count=8 2>/dev/null && umount /mnt"
    ))?;
    e2fsck_clean("/dev/abuse0")?;
    ensure!(
        server.stat("writes") > 0,
        "the server as nobody wrote nothing"
    );
    // Serving only: no reset, no reconfiguration.
    let gen = st.generation;
    for cmd in [
        "abusectl reset /dev/abctl0",
        "abusectl setup /dev/abctl0 reconnect ro",
    ] {
        let out = as_nobody(cmd)?;
        ensure!(
            out.contains("not permitted") && out.contains("rc=1"),
            "{cmd} as nobody: {out}"
        );
    }
    let now = control("/dev/abctl0")?
        .status()
        .map_err(|e| e.to_string())?;
    ensure!(
        now.generation == gen && now.flags & ABUSE_FLAG_READ_ONLY == 0,
        "a refused call changed the device: {now:?}"
    );
    // A device not delegated to it: refused by the driver even when the
    // node's mode lets nobody open it.
    sh("abusectl setup /dev/abctl1 size=16M && chmod 0666 /dev/abctl1")?;
    let out = as_nobody("abusectl info /dev/abctl1")?;
    ensure!(
        out.contains("permission denied") && out.contains("rc=1"),
        "info on /dev/abctl1 as nobody: {out}"
    );
    sh("chmod 0600 /dev/abctl1 && abusectl reset /dev/abctl1")?;
    // RESET ends the delegation.
    sh("abusectl reset /dev/abctl0")?;
    let node = std::fs::metadata("/dev/abctl0").map_err(|e| e.to_string())?;
    ensure!(
        (node.uid(), node.gid()) == (0, 0),
        "node still {}:{} after RESET",
        node.uid(),
        node.gid()
    );
    let exited = server.exit_status(Duration::from_secs(20));
    ensure!(
        exited.is_some_and(|s| !s.success()),
        "the server as nobody did not stop after RESET: {exited:?}"
    );
    let log = std::fs::read_to_string("/tmp/dl.log").unwrap_or_default();
    ensure!(
        log.contains("not permitted") || log.contains("reset"),
        "server's last words: {log}"
    );
    let out = as_nobody("abusectl info /dev/abctl0")?;
    ensure!(
        out.contains("rc=1"),
        "nobody still opens /dev/abctl0 after RESET: {out}"
    );
    drop(server);
    teardown()
}
