//! What the integration tests share.

use std::path::Path;
use std::process::Command;

/// `len` pseudo-random bytes from `seed`, never zero: unwritten (or
/// discarded) space, which reads as zero, is never taken for written data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

/// Runs qemu-img, failing the test with its output if it fails; returns
/// what it printed.
#[allow(dead_code)] // not every test binary makes images
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (make deps installs it)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into()
}

/// Creates the qcow2 image `img` over the backing file `backing` (as the
/// image names it: a relative name is relative to the image's directory)
/// of `format` (raw or qcow2), with `-o opts` if any.
#[allow(dead_code)]
pub fn qcow2_over(img: &Path, backing: &str, format: &str, opts: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(o) = opts {
        args.extend(["-o", o]);
    }
    args.extend(["-b", backing, "-F", format, img.to_str().unwrap()]);
    qemu_img(&args);
}

/// `qemu-img check` finds no errors in `img`.
#[allow(dead_code)]
pub fn check_clean(img: &Path) {
    let out = qemu_img(&["check", img.to_str().unwrap()]);
    assert!(out.contains("No errors"), "{out}");
}
