//! The driver mirrors the kernel constants bindgen cannot evaluate in
//! driver/src/sys/shims.rs; driver/src/sys/shims.c checks each against the
//! kernel's headers at build time (`CHECK(NAME, value)`). This test holds
//! the two lists together: every mirrored constant is checked, with the
//! same value, and nothing is checked that is not mirrored.

use std::collections::BTreeMap;

const DRIVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../driver/src/sys");

/// A C or Rust integer expression of the forms the two files use:
/// `10`, `0x40`, `1 << 0`.
fn eval(expr: &str) -> u64 {
    let expr = expr.trim();
    if let Some((a, b)) = expr.split_once("<<") {
        return eval(a) << eval(b);
    }
    match expr.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => expr.parse(),
    }
    .unwrap_or_else(|_| panic!("not a literal: {expr}"))
}

/// `pub(crate) const NAME: T = literal;` in shims.rs (the derived ones,
/// whose value names a binding, are not mirrors).
fn mirrored() -> BTreeMap<String, u64> {
    let src = std::fs::read_to_string(format!("{DRIVER}/shims.rs")).unwrap();
    src.lines()
        .filter_map(|l| l.trim().strip_prefix("pub(crate) const "))
        .filter(|l| !l.contains("bindings::REQ") && !l.contains("bindings::req"))
        .map(|l| {
            let (name, rest) = l.split_once(':').unwrap();
            let value = rest.split_once('=').unwrap().1.trim_end_matches(';');
            (name.trim().to_string(), eval(value))
        })
        .collect()
}

/// `CHECK(NAME, literal);` in shims.c.
fn checked() -> BTreeMap<String, u64> {
    let src = std::fs::read_to_string(format!("{DRIVER}/shims.c")).unwrap();
    src.lines()
        .filter_map(|l| l.strip_prefix("CHECK(")?.strip_suffix(");"))
        .map(|l| {
            let (name, value) = l.split_once(',').unwrap();
            (name.trim().to_string(), eval(value))
        })
        .collect()
}

#[test]
fn every_mirrored_constant_is_checked_against_the_kernel_with_its_value() {
    let (rust, c) = (mirrored(), checked());
    assert!(
        rust.len() >= 8,
        "shims.rs mirrors too few constants: {rust:?}"
    );
    assert_eq!(
        rust, c,
        "shims.rs (left) and shims.c's CHECKs (right) differ"
    );
}

#[test]
fn every_shim_function_is_defined_in_c() {
    let rs = std::fs::read_to_string(format!("{DRIVER}/shims.rs")).unwrap();
    let c = std::fs::read_to_string(format!("{DRIVER}/shims.c")).unwrap();
    let fns: Vec<&str> = rs
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub(crate) fn ")?.split('(').next())
        .collect();
    assert!(fns.len() >= 4, "no shim functions found: {fns:?}");
    for f in fns {
        assert!(
            c.lines()
                .any(|l| l.contains(&format!(" {f}(")) && !l.trim_end().ends_with(';')),
            "{f} is declared in shims.rs but not defined in shims.c"
        );
    }
}
