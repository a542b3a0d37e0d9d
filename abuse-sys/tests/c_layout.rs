//! The C header must describe exactly the Rust layout: gcc compiles a
//! program that prints sizeof/offsetof of every struct and field and the
//! value of every constant and ioctl number, and each is compared with Rust.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use abuse_sys::uapi::*;

/// (C expression, value Rust says it has)
fn expectations() -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = Vec::new();
    macro_rules! layout {
        ($rust:ident, $c:literal, [$($field:ident),* $(,)?]) => {
            v.push((format!("sizeof(struct {})", $c), std::mem::size_of::<$rust>() as u64));
            v.push((format!("_Alignof(struct {})", $c), std::mem::align_of::<$rust>() as u64));
            $(
                v.push((
                    format!("offsetof(struct {}, {})", $c, stringify!($field)),
                    std::mem::offset_of!($rust, $field) as u64,
                ));
                v.push((
                    format!("sizeof(((struct {} *)0)->{})", $c, stringify!($field)),
                    {
                        let x = $rust::default();
                        std::mem::size_of_val(&x.$field) as u64
                    },
                ));
            )*
        };
    }
    macro_rules! constants {
        ($($name:ident),* $(,)?) => {
            $( v.push((stringify!($name).to_string(), $name as u64)); )*
        };
    }
    layout!(
        AbuseStatus,
        "abuse_status",
        [
            size,
            block_size,
            queue_depth,
            flags,
            timeout_ms,
            index,
            max_bytes,
            dev,
            max_batch,
            version,
            pending,
            in_flight,
            completed,
            errors,
            requeues,
            timeouts,
            generation,
            queues,
            max_queues,
            owner_uid,
            owner_gid,
            reserved
        ]
    );
    layout!(
        AbuseBio,
        "abuse_bio",
        [id, sector, addr, len, cmd, flags, result, error]
    );
    layout!(
        AbuseXfer,
        "abuse_xfer",
        [bios, data, data_len, count, flags, reserved]
    );
    layout!(
        AbuseServe,
        "abuse_serve",
        [bios, data, data_len, put, count, queue, wait_ms, flags, reserved0, reserved]
    );
    constants!(
        ABUSE_VERSION,
        ABUSE_FLAG_READ_ONLY,
        ABUSE_FLAG_RECONNECT,
        ABUSE_FLAG_FLUSH,
        ABUSE_FLAG_FUA,
        ABUSE_FLAG_DISCARD,
        ABUSE_FLAG_WRITE_ZEROES,
        ABUSE_FLAG_DELEGATED,
        ABUSE_FLAG_SETTABLE,
        ABUSE_FLAG_CONFIGURED,
        ABUSE_FLAG_REPORTED,
        ABUSE_CMD_READ,
        ABUSE_CMD_WRITE,
        ABUSE_CMD_FLUSH,
        ABUSE_CMD_DISCARD,
        ABUSE_CMD_WRITE_ZEROES,
        ABUSE_BIO_FUA,
        ABUSE_BIO_REQUEUED,
        ABUSE_BIO_NOUNMAP,
        ABUSE_BIO_ERRNO,
        ABUSE_BIO_ZEROES,
        ABUSE_BIO_FILE,
        ABUSE_XFER_DESCRIPTORS,
        ABUSE_RESULT_OKAY,
        ABUSE_RESULT_MEDIA_FAILURE,
        ABUSE_RESULT_DEVICE_FAILURE,
        ABUSE_MIN_BLOCK_SIZE,
        ABUSE_MAX_BLOCK_SIZE,
        ABUSE_DEFAULT_QUEUE_DEPTH,
        ABUSE_MAX_QUEUE_DEPTH,
        ABUSE_MAX_QUEUES,
        ABUSE_MAX_BATCH,
        ABUSE_MAX_BIO_BYTES,
        ABUSE_DATA_ALIGN,
        ABUSE_DEFAULT_TIMEOUT_MS,
        ABUSE_MIN_TIMEOUT_MS,
        ABUSE_MAX_SIZE,
        ABUSE_MAX_ERRNO,
        ABUSE_SECTOR_SHIFT,
        ABUSE_GET_STATUS,
        ABUSE_SET_STATUS,
        ABUSE_RESET,
        ABUSE_GET_BIO,
        ABUSE_PUT_BIO,
        ABUSE_SERVE,
    );
    v
}

/// Compiles (with `cflags`) and runs the C side, returning expression -> value.
fn c_values(exprs: &[String], cflags: &[&str]) -> BTreeMap<String, u64> {
    let dir = std::env::temp_dir().join(format!(
        "abuse-c-layout-{}{}",
        std::process::id(),
        cflags.join("")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let mut src = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include <abuse.h>\nint main(void) {\n",
    );
    for e in exprs {
        src += &format!("  printf(\"%s=%llu\\n\", \"{e}\", (unsigned long long)({e}));\n");
    }
    src += "  return 0;\n}\n";
    let c = dir.join("layout.c");
    let exe = dir.join("layout");
    std::fs::write(&c, src).unwrap();
    let out = Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Werror"])
        .args(cflags)
        .arg("-I")
        .arg(&include)
        .arg(&c)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("gcc must be installed (make deps)");
    assert!(
        out.status.success(),
        "gcc failed on abuse.h:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    assert!(run.status.success());
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once('=').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn assert_matches(want: &[(String, u64)], cflags: &[&str]) {
    let exprs: Vec<String> = want.iter().map(|(e, _)| e.clone()).collect();
    let got = c_values(&exprs, cflags);
    let mismatches: Vec<String> = want
        .iter()
        .filter(|(e, v)| got.get(e) != Some(v))
        .map(|(e, v)| format!("{e}: C says {:?}, Rust says {v}", got.get(e)))
        .collect();
    assert!(
        mismatches.is_empty(),
        "abuse.h ({cflags:?}) disagrees with uapi.rs:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn c_header_matches_rust_layout() {
    assert_matches(&expectations(), &[]);
}

/// A 32-bit caller (through compat_ioctl) sees the same sizes, offsets and
/// ioctl numbers: the driver passes its structs through unchanged. Only
/// alignment differs on i386 (u64 aligns to 4), which no offset depends on.
#[test]
fn c_header_layout_is_the_same_for_32_bit_callers() {
    let want: Vec<_> = expectations()
        .into_iter()
        .filter(|(e, _)| !e.starts_with("_Alignof"))
        .collect();
    assert_matches(&want, &["-m32"]);
}

#[test]
fn ioctl_numbers_match_nix_encoding() {
    use nix::sys::ioctl::ioctl_num_type;
    use nix::{request_code_none, request_code_read, request_code_readwrite, request_code_write};
    assert_eq!(
        ABUSE_GET_STATUS as ioctl_num_type,
        request_code_read!(b'A', 0x20, std::mem::size_of::<AbuseStatus>())
    );
    assert_eq!(
        ABUSE_SET_STATUS as ioctl_num_type,
        request_code_write!(b'A', 0x21, std::mem::size_of::<AbuseStatus>())
    );
    assert_eq!(
        ABUSE_RESET as ioctl_num_type,
        request_code_none!(b'A', 0x23)
    );
    assert_eq!(
        ABUSE_GET_BIO as ioctl_num_type,
        request_code_readwrite!(b'A', 0x24, std::mem::size_of::<AbuseXfer>())
    );
    assert_eq!(
        ABUSE_PUT_BIO as ioctl_num_type,
        request_code_readwrite!(b'A', 0x25, std::mem::size_of::<AbuseXfer>())
    );
    assert_eq!(
        ABUSE_SERVE as ioctl_num_type,
        request_code_readwrite!(b'A', 0x26, std::mem::size_of::<AbuseServe>())
    );
}
