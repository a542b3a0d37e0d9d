//! The VM suite fails on kernel bug reports by matching the guest's dmesg
//! against tests/vm/kernel-bugs.regex. Check that it catches real reports
//! and passes a clean boot of the debug kernel.

use std::io::Write;
use std::process::{Command, Stdio};

const PATTERNS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/vm/kernel-bugs.regex");

fn matching(text: &str) -> Vec<String> {
    let mut grep = Command::new("grep")
        .args(["-E", "-f", PATTERNS])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("grep");
    grep.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = grep.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn catches_kernel_bug_reports() {
    let reports = [
        "[   12.1] WARNING: CPU: 1 PID: 97 at block/blk-mq.c:1234 blk_mq_start_request+0x10/0x20",
        "[   12.1] WARNING: possible circular locking dependency detected",
        "[   12.1] WARNING: possible recursive locking detected",
        "[   12.1] WARNING: inconsistent lock state",
        "[   12.1] BUG: sleeping function called from invalid context at mm/slub.c:4123",
        "[   12.1] BUG: kernel NULL pointer dereference, address: 0000000000000008",
        "[   12.1] BUG kmalloc-64 (Tainted: G O): Poison overwritten",
        "[   12.1] Oops: general protection fault, probably for non-canonical address",
        "[   12.1] kernel BUG at drivers/block/abuse.c:12!",
        "[   12.1] INFO: task abuse-guest:123 blocked for more than 120 seconds.",
        "[   12.1] =============================\n[   12.1] WARNING: suspicious RCU usage",
        "[   12.1] list_add corruption. prev->next should be next",
        "[   12.1] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!",
        "[   12.1] Call Trace:",
    ];
    for r in reports {
        assert!(!matching(r).is_empty(), "the dmesg scan misses: {r}");
    }
}

#[test]
fn clean_debug_boot_passes() {
    let clean = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/vm/testdata/clean-dmesg.txt"
    ))
    .unwrap();
    assert!(
        clean.lines().count() > 100,
        "the sample boot log is too short to mean anything"
    );
    assert!(
        clean.contains("lockdep"),
        "the sample must come from the lockdep-enabled test kernel"
    );
    let hits = matching(&clean);
    assert!(hits.is_empty(), "false positives in a clean boot: {hits:?}");
}
