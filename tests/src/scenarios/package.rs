//! The Debian package (make deb, copied into the guest as
//! /lib/abuse/abuse.deb), installed with the real dpkg as on a machine and
//! used: its abusectl sets a device up, serves it from a file, lists and
//! resets it; dpkg -r takes its files away and keeps the configuration,
//! dpkg -P that too.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::ensure;
use crate::guest::{backing, insmod, kill_servers, pattern, sh, teardown, wait_for, Outcome};

const DEB: &str = "/lib/abuse/abuse.deb";
/// The real dpkg (copied from the host with its libraries): the guest's
/// busybox sh would run its own dpkg applet for a bare `dpkg`.
const DPKG: &str = "/usr/bin/dpkg";
const ABUSECTL: &str = "/usr/bin/abusectl";
const CTL: &str = "/dev/abctl1";
/// The package's conffile.
const CONFFILE: &str = "/etc/abuse/abctl.conf.example";
const DEV: &str = "/dev/abuse1";

/// What the package puts on a machine, besides its DKMS source.
const FILES: &[&str] = &[
    ABUSECTL,
    "/usr/share/man/man1/abusectl.1.gz",
    "/usr/share/man/man1/abusectl-server.1.gz",
    "/usr/share/bash-completion/completions/abusectl",
    "/usr/share/zsh/site-functions/_abusectl",
    "/usr/share/fish/vendor_completions.d/abusectl.fish",
    "/usr/lib/udev/rules.d/60-abuse.rules",
    "/usr/lib/systemd/system/abuse-server@.service",
    "/usr/lib/modules-load.d/abuse.conf",
    "/etc/abuse/abctl.conf.example",
];

/// The package's `abusectl list`, and its line for CTL ("" if none).
fn listed() -> Result<(String, String), String> {
    let list = sh(&format!("{ABUSECTL} list"))?;
    let line = list
        .lines()
        .find(|l| l.starts_with(CTL))
        .unwrap_or_default()
        .to_string();
    Ok((list, line))
}

fn status() -> String {
    sh("/usr/bin/dpkg-query -W -f='${Status}' abuse 2>/dev/null").unwrap_or_default()
}

pub fn deb_package_installs_and_serves() -> Outcome {
    let out = sh(&format!("{DPKG} -i {DEB} 2>&1"))?;
    ensure!(
        status() == "install ok installed",
        "dpkg -i: status '{}': {out}",
        status()
    );
    // The postinst ran, and says why the module was not built here.
    ensure!(
        out.contains("dkms is not installed"),
        "the postinst said nothing of DKMS: {out}"
    );
    for f in FILES {
        ensure!(
            std::fs::metadata(f).is_ok_and(|m| m.len() > 0),
            "the package did not install {f}"
        );
    }
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/abuse-server@.service")
        .map_err(|e| e.to_string())?;
    ensure!(
        unit.contains("ExecStart=/usr/bin/abusectl server /dev/abctl%i"),
        "the unit does not run the package's abusectl: {unit}"
    );
    let page = sh("zcat /usr/share/man/man1/abusectl-server.1.gz")?;
    ensure!(
        page.starts_with(".ie") || page.contains(".TH"),
        "not a man page: {page:.80}"
    );
    // The module's source, for DKMS: dkms.conf names this version, and the
    // driver's sources are there in the layout it builds in.
    let version = sh("/usr/bin/dpkg-query -W -f='${Version}' abuse")?;
    let src = format!("/usr/src/abuse-{version}");
    let conf = std::fs::read_to_string(format!("{src}/dkms.conf"))
        .map_err(|e| format!("{src}/dkms.conf: {e}"))?;
    ensure!(
        conf.contains(&format!("PACKAGE_VERSION=\"{version}\"")),
        "dkms.conf is not for {version}: {conf}"
    );
    for f in [
        "driver/Kbuild",
        "driver/Makefile",
        "driver/kernel-toolchain.sh",
        "driver/src/abuse.rs",
        "driver/src/sys/kabi_check.c",
        "abuse-sys/src/uapi.rs",
    ] {
        ensure!(
            std::path::Path::new(&src).join(f).exists(),
            "no {f} in {src}"
        );
    }
    ensure!(
        sh(&format!("{ABUSECTL} --version"))?.contains(&version),
        "abusectl is not {version}"
    );

    // Used: setup, server, I/O, list, reset.
    insmod("max_abuse=2")?;
    let file = "/tmp/package.img";
    backing(file, 64 << 20)?;
    sh(&format!("{ABUSECTL} setup {CTL} size=64M"))?;
    let mut server = Command::new(ABUSECTL)
        .args(["server", CTL, "file", file])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let data = pattern(7, 1 << 20);
    std::fs::write("/tmp/package.pattern", &data).map_err(|e| e.to_string())?;
    sh(&format!(
        "dd if=/tmp/package.pattern of={DEV} bs=64k seek=16 oflag=direct conv=fsync 2>&1"
    ))?;
    let back = sh(&format!(
        "dd if={DEV} bs=64k skip=16 count=16 iflag=direct 2>/dev/null | cmp - /tmp/package.pattern && \
         dd if={file} bs=64k skip=16 count=16 2>/dev/null | cmp - /tmp/package.pattern && echo same"
    ))?;
    ensure!(
        back.trim() == "same",
        "what the package's server wrote is not what was written"
    );
    let (list, line) = listed()?;
    ensure!(
        line.contains(DEV) && line.contains("64M") && line.contains("rw"),
        "list: {list}"
    );
    sh(&format!("{ABUSECTL} reset {CTL}"))?;
    let (list, line) = listed()?;
    ensure!(
        line.split_whitespace().nth(2) == Some("-"),
        "still configured after reset: {list}"
    );
    let _ = server.kill();
    let _ = server.wait();
    kill_servers();
    teardown()?;

    // Removed: its files go, the configuration stays until purged.
    let out = sh(&format!("{DPKG} -r abuse 2>&1"))?;
    ensure!(
        !std::path::Path::new(ABUSECTL).exists(),
        "dpkg -r left {ABUSECTL}: {out}"
    );
    ensure!(!std::path::Path::new(&src).exists(), "dpkg -r left {src}");
    // The boot-time load goes with the package (not a conffile: it would
    // name a module DKMS removed on every boot).
    ensure!(
        !std::path::Path::new("/usr/lib/modules-load.d/abuse.conf").exists(),
        "dpkg -r left the modules-load entry"
    );
    ensure!(
        std::path::Path::new(CONFFILE).exists(),
        "dpkg -r removed a conffile"
    );
    sh(&format!("{DPKG} -P abuse 2>&1"))?;
    ensure!(
        !std::path::Path::new(CONFFILE).exists(),
        "dpkg -P left the conffiles"
    );
    ensure!(
        wait_for(Duration::from_secs(1), || status().is_empty()
            || status().starts_with("unknown")),
        "still known to dpkg after purge: '{}'",
        status()
    );
    Ok(())
}
