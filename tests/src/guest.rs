//! Helpers for scenarios running inside the test VM: loading the module,
//! running commands, waiting for conditions.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A scenario's outcome: `Err` carries what went wrong.
pub type Outcome = Result<(), String>;

/// One named rule proven in the VM.
pub struct Scenario {
    pub name: &'static str,
    pub run: fn() -> Outcome,
}

/// Where /init puts the module.
pub const MODULE: &str = "/lib/abuse/abuse.ko";

/// Fails the scenario with a message unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Runs a command line with `sh -c`; returns stdout, or an error with the
/// exit status and stderr.
pub fn sh(cmd: &str) -> Result<String, String> {
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{cmd}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Loads the module with `params` (e.g. "max_abuse=4").
pub fn insmod(params: &str) -> Outcome {
    sh(&format!("insmod {MODULE} {params}")).map(|_| ())
}

/// Unloads the module.
pub fn rmmod() -> Outcome {
    sh("rmmod abuse").map(|_| ())
}

/// Whether the module is loaded.
pub fn loaded() -> bool {
    std::fs::read_to_string("/proc/modules")
        .is_ok_and(|m| m.lines().any(|l| l.starts_with("abuse ")))
}

/// Unloads the module if a scenario left it loaded (so the next starts clean).
pub fn ensure_unloaded() {
    if loaded() {
        let _ = rmmod();
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Names in /dev starting with `prefix`, sorted.
pub fn dev_nodes(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether a path exists.
pub fn exists(p: &str) -> bool {
    Path::new(p).exists()
}
