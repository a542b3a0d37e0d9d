//! The servers in other languages speak the header's ABI: python/abuse.py's
//! ctypes structures, constants and ioctl numbers are compared with what gcc
//! says of abuse.h (every struct field and every `#define ABUSE_*` the header
//! has, read from the header itself, so a field or constant added there and
//! not in Python fails here), and examples/c/ramdisk.c builds with
//! -Wall -Wextra -Werror.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn header() -> PathBuf {
    repo().join("abuse-sys/include/abuse.h")
}

/// The header's object-like `#define ABUSE_*` names.
fn constants(h: &str) -> Vec<String> {
    h.lines()
        .filter_map(|l| l.trim().strip_prefix("#define "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("ABUSE_") && !n.contains('('))
        .map(str::to_string)
        .collect()
}

/// Each `struct abuse_*` of the header with its fields, in order.
fn structs(h: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in h.lines() {
        // Field lines: `__u64 name;` or `__u64 name[5];`, then maybe a comment.
        let code = line.split("/*").next().unwrap_or("").trim();
        if let Some(rest) = code.strip_prefix("struct ") {
            if let Some(name) = rest.strip_suffix('{') {
                current = Some((name.trim().to_string(), Vec::new()));
            }
        } else if code.starts_with("};") {
            out.extend(current.take());
        } else if let Some((_, fields)) = current.as_mut() {
            if let Some(decl) = code.strip_suffix(';') {
                let name = decl.split_whitespace().last().unwrap_or("");
                fields.push(name.split('[').next().unwrap_or("").to_string());
            }
        }
    }
    out
}

fn parse(out: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn run(cmd: &mut Command, what: &str) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (make deps installs it)"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// expression -> value, from gcc on the header.
fn c_side(consts: &[String], structs: &[(String, Vec<String>)]) -> BTreeMap<String, String> {
    let mut src = String::from("#include <stdio.h>\n#include <stddef.h>\n#include <abuse.h>\n");
    src += "#define P(k, e) printf(\"%s=%llu\\n\", k, (unsigned long long)(e))\nint main(void) {\n";
    for c in consts {
        src += &format!("  P(\"{c}\", {c});\n");
    }
    for (s, fields) in structs {
        src += &format!("  P(\"sizeof {s}\", sizeof(struct {s}));\n");
        for f in fields {
            src += &format!("  P(\"offsetof {s}.{f}\", offsetof(struct {s}, {f}));\n");
            src += &format!("  P(\"sizeof {s}.{f}\", sizeof(((struct {s} *)0)->{f}));\n");
        }
    }
    src += "  return 0;\n}\n";
    let dir = std::env::temp_dir().join(format!("abuse-languages-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (c, exe) = (dir.join("layout.c"), dir.join("layout"));
    std::fs::write(&c, src).unwrap();
    run(
        Command::new("gcc")
            .args(["-std=c11", "-Wall", "-Werror", "-I"])
            .arg(repo().join("abuse-sys/include"))
            .arg(&c)
            .arg("-o")
            .arg(&exe),
        "gcc",
    );
    let out = run(&mut Command::new(&exe), "the C layout program");
    let _ = std::fs::remove_dir_all(&dir);
    let mut got = parse(&out);
    for (s, fields) in structs {
        got.insert(format!("fields {s}"), fields.join(","));
    }
    got
}

/// The same expressions, from python/abuse.py; plus every ABUSE_* name it has.
fn python_side(consts: &[String], structs: &[(String, Vec<String>)]) -> BTreeMap<String, String> {
    let script = format!(
        r#"
import ctypes, sys
sys.path.insert(0, sys.argv[1])
import abuse
for c in {consts:?}:
    print(f"{{c}}={{getattr(abuse, c, 'missing in abuse.py')}}")
for s in {names:?}:
    cls = abuse.STRUCTS.get(s)
    if cls is None:
        print(f"fields {{s}}=missing in abuse.STRUCTS")
        continue
    print(f"sizeof {{s}}={{ctypes.sizeof(cls)}}")
    print(f"fields {{s}}={{','.join(f[0] for f in cls._fields_)}}")
    for f in cls._fields_:
        print(f"offsetof {{s}}.{{f[0]}}={{getattr(cls, f[0]).offset}}")
        print(f"sizeof {{s}}.{{f[0]}}={{getattr(cls, f[0]).size}}")
print("names=" + ",".join(sorted(n for n in dir(abuse) if n.startswith("ABUSE_"))))
"#,
        names = structs.iter().map(|(s, _)| s).collect::<Vec<_>>(),
    );
    // -B: no __pycache__ left in the source tree.
    let out = run(
        Command::new("python3")
            .arg("-B")
            .arg("-c")
            .arg(script)
            .arg(repo().join("python")),
        "python3",
    );
    parse(&out)
}

#[test]
fn python_abuse_matches_the_c_header() {
    let h = std::fs::read_to_string(header()).unwrap();
    let consts = constants(&h);
    let structs = structs(&h);
    assert!(
        consts.len() > 40 && consts.iter().any(|c| c == "ABUSE_SERVE"),
        "read too few constants from abuse.h: {consts:?}"
    );
    assert_eq!(
        structs.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
        ["abuse_status", "abuse_bio", "abuse_xfer", "abuse_serve"],
        "the structs read from abuse.h"
    );
    let mut want = c_side(&consts, &structs);
    let mut got = python_side(&consts, &structs);
    let mut names = consts.clone();
    names.sort();
    want.insert("names".into(), names.join(","));
    // Python lists its own fields; the C side's come from the header.
    let mut mismatches: Vec<String> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: C says {v}, abuse.py says {:?}", got.get(k)))
        .collect();
    got.retain(|k, _| !want.contains_key(k));
    mismatches.extend(
        got.iter()
            .map(|(k, v)| format!("{k}: only abuse.py has it ({v})")),
    );
    assert!(
        mismatches.is_empty(),
        "python/abuse.py disagrees with abuse.h:\n{}",
        mismatches.join("\n")
    );
    assert!(want.len() > 100, "too little compared: {want:?}");
}

#[test]
fn c_ramdisk_builds_with_all_warnings_as_errors() {
    let exe = std::env::temp_dir().join(format!("abuse-ramdisk-{}", std::process::id()));
    run(
        Command::new("gcc")
            .args([
                "-std=gnu11",
                "-O2",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-pthread",
                "-I",
            ])
            .arg(repo().join("abuse-sys/include"))
            .arg(repo().join("examples/c/ramdisk.c"))
            .arg("-o")
            .arg(&exe),
        "gcc examples/c/ramdisk.c",
    );
    // Usage errors are told, with exit 2; a missing device names the module.
    let usage = Command::new(&exe).output().unwrap();
    let missing = Command::new(&exe)
        .args(["/dev/abctl-none", "/dev/shm/abuse-none"])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&exe);
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("usage: ramdisk"));
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("/dev/abctl-none: no such device (is the abuse module loaded?)"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}

#[test]
fn python_ramdisk_tells_what_is_wrong() {
    let ramdisk = repo().join("python/ramdisk.py");
    let py = |args: &[&str]| {
        Command::new("python3")
            .arg("-B")
            .arg(&ramdisk)
            .args(args)
            .output()
            .expect("python3 (make deps installs it)")
    };
    let usage = py(&[]);
    assert_eq!(usage.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("usage: ramdisk.py CTL STORE"));
    let missing = py(&["/dev/abctl-none", "/dev/shm/abuse-none", "1M"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("/dev/abctl-none: open: no such device (is the abuse module loaded?)"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}
