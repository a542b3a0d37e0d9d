//! The driver declares what 6.12's Rust bindings lack of the kernel's C
//! interface in driver/src/sys/kabi.rs; driver/src/sys/kabi_check.c checks
//! each declaration against the kernel's headers at build time. This test
//! holds the two files together: every mirrored constant is checked, with
//! the same value, nothing is checked that is not mirrored, and every
//! function and structure declared has its type checked.

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

/// `pub(crate) const NAME: T = literal;` in kabi.rs (the derived ones,
/// whose value names a binding, are not mirrors).
fn mirrored() -> BTreeMap<String, u64> {
    let src = std::fs::read_to_string(format!("{DRIVER}/kabi.rs")).unwrap();
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

/// `CHECK(NAME, literal);` in kabi_check.c.
fn checked() -> BTreeMap<String, u64> {
    let src = std::fs::read_to_string(format!("{DRIVER}/kabi_check.c")).unwrap();
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
        "kabi.rs mirrors too few constants: {rust:?}"
    );
    assert_eq!(
        rust, c,
        "kabi.rs (left) and kabi_check.c's CHECKs (right) differ"
    );
}

#[test]
fn every_declared_function_and_structure_is_checked() {
    let rs = std::fs::read_to_string(format!("{DRIVER}/kabi.rs")).unwrap();
    let c = std::fs::read_to_string(format!("{DRIVER}/kabi_check.c")).unwrap();
    let fns: Vec<&str> = rs
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub(crate) fn ")?.split('(').next())
        .collect();
    assert!(!fns.is_empty(), "no functions found in kabi.rs");
    for f in fns {
        assert!(
            c.contains(&format!("SAME_TYPE(typeof({f}),")),
            "{f} is declared in kabi.rs but its type is not checked in kabi_check.c"
        );
    }
    // The one structure: each field's place and type, and the size.
    assert!(rs.contains("pub(crate) struct PollTable"));
    for check in [
        "offsetof(struct poll_table_struct, _qproc) == 0",
        "offsetof(struct poll_table_struct, _key)",
        "sizeof(struct poll_table_struct)",
        "SAME_TYPE(typeof(((poll_table *)0)->_qproc)",
        "SAME_TYPE(typeof(((poll_table *)0)->_key), __poll_t)",
    ] {
        assert!(c.contains(check), "kabi_check.c does not check {check}");
    }
}
