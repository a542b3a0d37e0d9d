//! ABUSE_BIO_FILE: the driver moves a request's data between its pages and
//! a file the server names, from a fetch of descriptors only.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use abuse_sys::uapi::*;
use abuse_sys::AbuseBio;
use nix::errno::Errno;

use super::safety::puts_refused;
use crate::ensure;
use crate::guest::{
    config, control, insmod, open_direct, setup, teardown, wait_for, Aligned, Outcome,
};

const CTL: &str = "/dev/abctl0";
const DEV: &str = "/dev/abuse0";
const MIB: u64 = 1 << 20;

/// A descriptors-only fetch places no payload (every `addr` 0, no buffer
/// needed). A WRITE completed with ABUSE_BIO_FILE lands in the file at the
/// offset named; a READ is read from it, zeroes past the file's end.
/// Refused, the requests staying fetched: FILE on a failure, with ZEROES
/// or ERRNO, with an offset past off_t, on an ABUSE device or a directory
/// (EINVAL); an fd that is not open, or not open for the direction (EBADF).
pub fn put_file_rules() -> Outcome {
    insmod("max_abuse=1")?;
    setup(CTL, &config(16 * MIB, 4096, 16, 0, 0))?;
    let path = "/tmp/put-file.img";
    // 1 MiB + 2 KiB of 0x11: a READ of 8 KiB from 1 MiB - 4 KiB on crosses
    // the end 2 KiB before its own.
    std::fs::write(path, vec![0x11; MIB as usize + 2048]).map_err(|e| e.to_string())?;
    let reader = std::thread::spawn(|| -> Result<Vec<u8>, String> {
        let f = open_direct(DEV, false)?;
        let mut buf = Aligned::new(8192);
        buf.as_mut().fill(0xff);
        f.read_exact_at(buf.as_mut(), 0)
            .map_err(|e| e.to_string())?;
        Ok(buf.as_mut().to_vec())
    });
    let writer = std::thread::spawn(|| -> Result<(), String> {
        let f = open_direct(DEV, true)?;
        let mut buf = Aligned::new(4096);
        buf.as_mut().fill(0x5a);
        f.write_all_at(buf.as_mut(), 2 * MIB)
            .map_err(|e| e.to_string())
    });
    let ctl = control(CTL)?;
    let mut bios = [AbuseBio::default(); 2];
    let mut got = Vec::new();
    ensure!(
        wait_for(Duration::from_secs(5), || {
            if let Ok(n) = ctl.get_descriptors(&mut bios) {
                got.extend_from_slice(&bios[..n]);
            }
            got.len() == 2
        }),
        "fetched {} of 2 requests",
        got.len()
    );
    ensure!(
        got.iter().all(|b| b.addr == 0),
        "a descriptors-only fetch placed a payload: {got:?}"
    );
    let find = |cmd| {
        got.iter()
            .copied()
            .find(|b| b.cmd == cmd)
            .ok_or("a request is missing")
    };
    let (read, write) = (find(ABUSE_CMD_READ)?, find(ABUSE_CMD_WRITE)?);
    let open = |write: bool| {
        std::fs::OpenOptions::new()
            .read(!write)
            .write(write)
            .open(path)
            .map_err(|e| e.to_string())
    };
    let (ro, wo, rw) = (
        open(false)?,
        open(true)?,
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| e.to_string())?,
    );
    let dev = std::fs::File::open(DEV).map_err(|e| e.to_string())?;
    let dir = std::fs::File::open("/tmp").map_err(|e| e.to_string())?;
    let by = |b: AbuseBio, fd: i32, addr: u64| AbuseBio {
        flags: b.flags | ABUSE_BIO_FILE,
        error: fd as u32,
        addr,
        ..b
    };
    let invalid = [
        (
            "FILE on a failed READ",
            AbuseBio {
                result: ABUSE_RESULT_MEDIA_FAILURE,
                ..by(read, rw.as_raw_fd(), 0)
            },
        ),
        (
            "FILE with ZEROES",
            AbuseBio {
                flags: read.flags | ABUSE_BIO_FILE | ABUSE_BIO_ZEROES,
                ..by(read, rw.as_raw_fd(), 0)
            },
        ),
        (
            "FILE with ERRNO",
            AbuseBio {
                flags: write.flags | ABUSE_BIO_FILE | ABUSE_BIO_ERRNO,
                ..by(write, rw.as_raw_fd(), 0)
            },
        ),
        (
            "an offset past off_t",
            by(read, rw.as_raw_fd(), i64::MAX as u64 - 100),
        ),
        ("the ABUSE device itself", by(read, dev.as_raw_fd(), 0)),
        ("a directory", by(read, dir.as_raw_fd(), 0)),
    ];
    puts_refused(&ctl, &invalid, 2, Errno::EINVAL)?;
    let bad_fd = [
        ("an fd that is not open", by(read, 999, 0)),
        ("a WRITE to a read-only fd", by(write, ro.as_raw_fd(), 0)),
        ("a READ from a write-only fd", by(read, wo.as_raw_fd(), 0)),
    ];
    puts_refused(&ctl, &bad_fd, 2, Errno::EBADF)?;
    ctl.put_bios(&[
        by(read, rw.as_raw_fd(), MIB - 4096),
        by(write, rw.as_raw_fd(), 8192),
    ])
    .map_err(|e| e.to_string())?;
    let data = reader.join().map_err(|_| "reader panicked")??;
    let (file_part, past_end) = data.split_at(6144);
    ensure!(
        file_part.iter().all(|&b| b == 0x11) && past_end.iter().all(|&b| b == 0),
        "the READ from the file returned {:02x?}... and {:02x?}... past its end",
        &file_part[..8],
        &past_end[..8]
    );
    writer.join().map_err(|_| "writer panicked")??;
    let file = std::fs::read(path).map_err(|e| e.to_string())?;
    ensure!(
        file[8192..12288].iter().all(|&b| b == 0x5a)
            && file[..8192]
                .iter()
                .chain(&file[12288..])
                .all(|&b| b == 0x11),
        "the WRITE did not land at offset 8192 of the file alone"
    );
    let st = ctl.status().map_err(|e| e.to_string())?;
    ensure!(st.completed == 2 && st.errors == 0, "counters: {st:?}");
    drop((ctl, dev));
    teardown()
}
