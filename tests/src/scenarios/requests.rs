//! How requests travel: FLUSH/FUA/DISCARD/WRITE_ZEROES passthrough, bad
//! GET/PUT arguments, poll, and fuzzing the ioctls.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use abuse_sys::uapi::*;
use abuse_sys::Control;
use nix::errno::Errno;

use crate::ensure;
use crate::guest::{
    backing, config, control, insmod, open_direct, pattern, setup, sh, teardown, wait_for, Aligned,
    Outcome, Server,
};
use crate::guest::{BLKDISCARD, MKFS_EXT4};

const CTL: &str = "/dev/abctl0";
const DEV: &str = "/dev/abuse0";
const MIB: u64 = 1 << 20;

/// FLUSH reaches the server on fsync and FUA is flagged when advertised;
/// blkdiscard and blkdiscard -z arrive as DISCARD and WRITE_ZEROES when
/// advertised; when not, they never reach the server as such.
pub fn flush_fua_discard() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/ff.img", 32 * MIB)?;
    let all = ABUSE_FLAG_FLUSH | ABUSE_FLAG_FUA | ABUSE_FLAG_DISCARD | ABUSE_FLAG_WRITE_ZEROES;
    setup(CTL, &config(32 * MIB, 4096, 32, all, 0))?;
    let server = Server::start(CTL, "/tmp/ff.img", &[])?;
    sh(&format!(
        "dd if=/dev/urandom of={DEV} bs=4096 count=4 conv=fsync 2>/dev/null"
    ))?;
    ensure!(
        server.stat("flush") > 0,
        "fsync sent no FLUSH: {}",
        server.stats()
    );
    // ext4's journal commits use FUA writes.
    sh(&format!(
        "{MKFS_EXT4} -q -F {DEV} && mount {DEV} /mnt && echo x > /mnt/f && sync && umount /mnt"
    ))?;
    ensure!(
        server.stat("fua") > 0,
        "no write carried FUA: {}",
        server.stats()
    );
    sh(&format!("{BLKDISCARD} -o 1048576 -l 1048576 {DEV}"))?;
    ensure!(
        wait_for(Duration::from_secs(2), || server.stat("discard") > 0),
        "{BLKDISCARD} sent no DISCARD: {}",
        server.stats()
    );
    sh(&format!("{BLKDISCARD} -z -o 2097152 -l 1048576 {DEV}"))?;
    ensure!(
        server.stat("write_zeroes") > 0,
        "{BLKDISCARD} -z sent no WRITE_ZEROES: {}",
        server.stats()
    );
    drop(server);
    control(CTL)?.reset().map_err(|e| e.to_string())?;

    // Nothing advertised: no FLUSH, FUA, DISCARD or WRITE_ZEROES reaches the server.
    setup(CTL, &config(32 * MIB, 4096, 32, 0, 0))?;
    let server = Server::start(CTL, "/tmp/ff.img", &[])?;
    let q = |f: &str| {
        std::fs::read_to_string(format!("/sys/block/abuse0/queue/{f}"))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    ensure!(
        q("write_cache") == "write through" && q("fua") == "0",
        "cache/FUA advertised: {} {}",
        q("write_cache"),
        q("fua")
    );
    ensure!(
        q("discard_max_bytes") == "0" && q("write_zeroes_max_bytes") == "0",
        "discard/write-zeroes advertised"
    );
    sh(&format!(
        "dd if=/dev/urandom of={DEV} bs=4096 count=4 conv=fsync 2>/dev/null"
    ))?;
    ensure!(
        sh(&format!("{BLKDISCARD} {DEV} 2>&1")).is_err(),
        "{BLKDISCARD} succeeded without DISCARD"
    );
    // -z falls back to writing zeroes: WRITEs, never WRITE_ZEROES.
    let _ = sh(&format!("{BLKDISCARD} -z -o 0 -l 65536 {DEV} 2>&1"));
    let s = server.stats();
    ensure!(
        s["flush"] == 0 && s["fua"] == 0 && s["discard"] == 0 && s["write_zeroes"] == 0,
        "unadvertised requests reached the server: {s}"
    );
    ensure!(server.stat("write") > 0, "writes did not reach the server");
    drop(server);
    teardown()
}

/// Bad PUTs (stale, made-up, mismatched) fail and complete nothing; GETs
/// and PUTs with bad pointers or too-small buffers fail and lose nothing:
/// a correct PUT afterwards completes the request with the right data.
pub fn bad_input() -> Outcome {
    insmod("max_abuse=1")?;
    setup(CTL, &config(16 * MIB, 512, 16, 0, 0))?;
    let ctl = control(CTL)?;
    let data = pattern(42, 4096);
    // First a direct write of 4 KiB at sector 0, for the GET cases.
    let wdata = data.clone();
    let writer = std::thread::spawn(move || -> Outcome {
        let f = open_direct(DEV, true)?;
        f.write_all_at(Aligned::from(&wdata).as_ref(), 0)
            .map_err(|e| e.to_string())
    });
    ensure!(
        wait_for(Duration::from_secs(5), || ctl
            .status()
            .map(|s| s.pending == 1)
            .unwrap_or(false)),
        "the write did not arrive"
    );
    let fd = ctl.as_raw_fd();
    let raw_get = |x: &mut AbuseXfer| -> Errno {
        // SAFETY: exercising the kernel's checks: the kernel must validate
        // every pointer in `x`; `x` itself is valid.
        let r = unsafe { nix::libc::ioctl(fd, ABUSE_GET_BIO as _, x as *mut AbuseXfer) };
        if r == 0 {
            Errno::UnknownErrno
        } else {
            Errno::last()
        }
    };
    let mut bios = [AbuseBio::default(); 4];
    let mut buf = vec![0u8; 2 * MIB as usize];
    let good = |bios: &mut [AbuseBio], buf: &mut [u8]| AbuseXfer {
        bios: bios.as_mut_ptr() as u64,
        data: buf.as_mut_ptr() as u64,
        data_len: buf.len() as u64,
        count: bios.len() as u32,
        ..Default::default()
    };
    // Bad GETs: EFAULT/EINVAL, and the request stays pending.
    let cases: Vec<(&str, AbuseXfer, Errno)> = vec![
        (
            "unmapped bios",
            AbuseXfer {
                bios: 0x10,
                ..good(&mut bios, &mut buf)
            },
            Errno::EFAULT,
        ),
        (
            "unmapped data",
            AbuseXfer {
                data: 0x1000,
                ..good(&mut bios, &mut buf)
            },
            Errno::EFAULT,
        ),
        (
            "kernel-address data",
            AbuseXfer {
                data: 0xffff_8880_0000_0000,
                ..good(&mut bios, &mut buf)
            },
            Errno::EFAULT,
        ),
        (
            "data too small",
            AbuseXfer {
                data_len: 1024,
                ..good(&mut bios, &mut buf)
            },
            Errno::EINVAL,
        ),
        (
            "count 0",
            AbuseXfer {
                count: 0,
                ..good(&mut bios, &mut buf)
            },
            Errno::EINVAL,
        ),
        (
            "count too large",
            AbuseXfer {
                count: ABUSE_MAX_BATCH + 1,
                ..good(&mut bios, &mut buf)
            },
            Errno::EINVAL,
        ),
        (
            "unknown flags set",
            AbuseXfer {
                flags: !ABUSE_XFER_DESCRIPTORS,
                ..good(&mut bios, &mut buf)
            },
            Errno::EINVAL,
        ),
        (
            "reserved set",
            AbuseXfer {
                reserved: [0, 1, 0, 0],
                ..good(&mut bios, &mut buf)
            },
            Errno::EINVAL,
        ),
    ];
    for (what, mut x, want) in cases {
        let got = raw_get(&mut x);
        ensure!(got == want, "GET with {what}: {got}, want {want}");
        let st = ctl.status().map_err(|e| e.to_string())?;
        ensure!(
            st.pending == 1 && st.in_flight == 0,
            "GET with {what} lost or fetched the request: {st:?}"
        );
    }
    // A bad header pointer.
    // SAFETY: the kernel must reject the unmapped header address.
    let r = unsafe { nix::libc::ioctl(fd, ABUSE_GET_BIO as _, 0x8usize) };
    ensure!(
        r == -1 && Errno::last() == Errno::EFAULT,
        "GET with an unmapped header: {r} {}",
        Errno::last()
    );
    // A good GET gets it, REQUEUED-free, with the payload intact.
    let n = ctl
        .get_bios(&mut bios, &mut buf)
        .map_err(|e| e.to_string())?;
    ensure!(
        n == 1 && bios[0].cmd == ABUSE_CMD_WRITE && bios[0].sector == 0 && bios[0].len == 4096,
        "fetched {n}: {:?}",
        bios[0]
    );
    let start = (bios[0].addr - buf.as_ptr() as u64) as usize;
    ensure!(
        buf[start..start + 4096] == data[..],
        "the WRITE payload differs after failed GETs"
    );
    ctl.put_bios(&bios[..1]).map_err(|e| e.to_string())?;
    writer.join().map_err(|_| "writer panicked")??;

    // Then a direct read of 4 KiB at sector 8, for the PUT cases.
    let reader = std::thread::spawn(|| -> Result<Vec<u8>, String> {
        let f = open_direct(DEV, false)?;
        let mut buf = Aligned::new(4096);
        f.read_exact_at(buf.as_mut(), 4096)
            .map_err(|e| e.to_string())?;
        Ok(buf.as_ref().to_vec())
    });
    ensure!(
        wait_for(Duration::from_secs(5), || ctl
            .status()
            .map(|s| s.pending == 1)
            .unwrap_or(false)),
        "the read did not arrive"
    );
    let n = ctl
        .get_bios(&mut bios, &mut buf)
        .map_err(|e| e.to_string())?;
    ensure!(
        n == 1 && bios[0].cmd == ABUSE_CMD_READ && bios[0].sector == 8 && bios[0].len == 4096,
        "fetched {n}: {:?}",
        bios[0]
    );
    let fetched = bios[0];
    // Bad PUTs: nothing completed.
    let put_err = |b: AbuseBio| ctl.put_bios(&[b]).err().map(|e| (e.errno(), e.to_string()));
    let stale = |id: u64| AbuseBio { id, ..fetched };
    let cases = [
        ("made-up id", stale(0xdead_beef_0000_0003), Errno::ESTALE),
        (
            "old generation",
            stale(fetched.id.wrapping_sub(1 << 32)),
            Errno::ESTALE,
        ),
        (
            "tag out of range",
            stale((fetched.id & !0xffff_ffff) | 5000),
            Errno::ESTALE,
        ),
        (
            "wrong sector",
            AbuseBio {
                sector: 16,
                ..fetched
            },
            Errno::EINVAL,
        ),
        (
            "wrong command",
            AbuseBio {
                cmd: ABUSE_CMD_WRITE,
                ..fetched
            },
            Errno::EINVAL,
        ),
        (
            "wrong length",
            AbuseBio {
                len: 512,
                ..fetched
            },
            Errno::EINVAL,
        ),
        (
            "bad result",
            AbuseBio {
                result: 77,
                ..fetched
            },
            Errno::EINVAL,
        ),
        (
            "unmapped READ data",
            AbuseBio {
                addr: 0x1000,
                ..fetched
            },
            Errno::EFAULT,
        ),
    ];
    for (what, b, want) in cases {
        let got = put_err(b);
        ensure!(
            got.as_ref().map(|g| g.0) == Some(want),
            "PUT with {what}: {got:?}, want {want}"
        );
        let st = ctl.status().map_err(|e| e.to_string())?;
        ensure!(
            st.in_flight == 1 && st.completed == 1,
            "PUT with {what} completed or lost the request: {st:?}"
        );
    }
    // An unmapped bios array for PUT.
    let mut x = AbuseXfer {
        bios: 0x10,
        count: 1,
        ..Default::default()
    };
    // SAFETY: the kernel must reject the unmapped array.
    let r = unsafe { nix::libc::ioctl(fd, ABUSE_PUT_BIO as _, &mut x as *mut AbuseXfer) };
    ensure!(
        r == -1 && Errno::last() == Errno::EFAULT,
        "PUT with unmapped bios: {r}"
    );
    // The correct PUT completes it, with the data.
    let start = (fetched.addr - buf.as_ptr() as u64) as usize;
    buf[start..start + 4096].copy_from_slice(&data);
    let done = ctl.put_bios(&[fetched]).map_err(|e| e.to_string())?;
    ensure!(done == 1, "the correct PUT completed {done}");
    let got = reader.join().map_err(|_| "reader panicked")??;
    ensure!(got == data, "the reader got different data");
    // Now the id is stale: a second PUT fails and completes nothing more.
    ensure!(
        put_err(fetched).map(|g| g.0) == Some(Errno::ESTALE),
        "a second PUT of a completed request succeeded"
    );
    let st = ctl.status().map_err(|e| e.to_string())?;
    ensure!(
        st.completed == 2 && st.errors == 0 && st.in_flight == 0,
        "counters after: {st:?}"
    );
    drop(ctl);
    teardown()
}

/// poll(): POLLIN/POLLMSG only while requests are pending; a sleeping
/// poller wakes on new I/O.
pub fn poll_readiness() -> Outcome {
    insmod("max_abuse=1")?;
    setup(CTL, &config(16 * MIB, 4096, 16, 0, 0))?;
    let ctl = control(CTL)?;
    let ev = ctl
        .poll(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    ensure!(ev.is_empty(), "readable with nothing pending: {ev:?}");
    // A poller sleeping in another thread wakes when I/O arrives.
    let poller = std::thread::spawn(|| -> Result<(i16, Duration), String> {
        use std::os::fd::AsRawFd;
        let c = Control::open(CTL).map_err(|e| e.to_string())?;
        let t = std::time::Instant::now();
        // Raw poll(2): nix's PollFlags has no POLLMSG (0x400) and drops
        // revents it cannot name. Ask for every event the driver reports.
        let mut pfd = nix::libc::pollfd {
            fd: c.as_raw_fd(),
            events: nix::libc::POLLIN | nix::libc::POLLRDNORM | 0x400,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { nix::libc::poll(&mut pfd, 1, 20_000) };
        if n < 0 {
            return Err(format!("poll: {}", Errno::last()));
        }
        Ok((pfd.revents, t.elapsed()))
    });
    std::thread::sleep(Duration::from_millis(500));
    let reader = std::thread::spawn(|| {
        sh(&format!(
            "dd if={DEV} of=/dev/null bs=4096 count=1 iflag=direct"
        ))
    });
    let (ev, waited) = poller.join().map_err(|_| "poller panicked")??;
    let want = nix::libc::POLLIN | nix::libc::POLLRDNORM | 0x400;
    ensure!(
        ev & want == want,
        "poller woke with revents {ev:#x}, want POLLIN|POLLRDNORM|POLLMSG"
    );
    ensure!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(15),
        "poller woke after {waited:?}"
    );
    // Fetch it: no longer readable.
    let mut bios = [AbuseBio::default(); 1];
    let mut buf = vec![0u8; 8192];
    ensure!(
        ctl.get_bios(&mut bios, &mut buf)
            .map_err(|e| e.to_string())?
            == 1,
        "nothing to fetch"
    );
    let ev = ctl
        .poll(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    ensure!(
        ev.is_empty(),
        "readable after the only request was fetched: {ev:?}"
    );
    let n = ctl.get_bios(&mut bios, &mut buf);
    ensure!(
        matches!(n, Ok(0)),
        "GET with nothing pending: {n:?} (want ENOMSG)"
    );
    ctl.put_bios(&bios).map_err(|e| e.to_string())?;
    reader.join().map_err(|_| "reader panicked")??;
    drop(ctl);
    teardown()
}

/// Every ioctl on fd 3 (inherited, opened with privileges) must be EPERM
/// once CAP_SYS_ADMIN is gone. Prints what each returned; 0 if all EPERM.
pub fn ioctls_on_fd3() -> i32 {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: the shell opened fd 3 for us and nothing else owns it.
    let ctl = Control::from_fd(unsafe { OwnedFd::from_raw_fd(3) }, "/dev/abctl0");
    let mut all = true;
    let mut report = |name: &str, e: Option<Errno>| {
        println!("{name}: {e:?}");
        all &= e == Some(Errno::EPERM);
    };
    report("GET_STATUS", ctl.status().err().map(|e| e.errno()));
    report("RESET", ctl.reset().err().map(|e| e.errno()));
    report(
        "SET_STATUS",
        ctl.set_status(&config(MIB, 512, 1, 0, 0))
            .err()
            .map(|e| e.errno()),
    );
    let mut bios = [AbuseBio::default(); 1];
    report(
        "GET_BIO",
        ctl.get_bios(&mut bios, &mut [0u8; 4096])
            .err()
            .map(|e| e.errno()),
    );
    report("PUT_BIO", ctl.put_bios(&bios).err().map(|e| e.errno()));
    if all {
        0
    } else {
        1
    }
}

/// ≥ 100,000 ioctls with random numbers, sizes, header contents, ids and
/// pointers from several threads while I/O runs: the kernel stays clean
/// (the dmesg scan) and the device still works afterwards.
pub fn fuzz_ioctls() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/fuzz.img", 32 * MIB)?;
    setup(
        CTL,
        &config(
            32 * MIB,
            4096,
            32,
            ABUSE_FLAG_FLUSH | ABUSE_FLAG_DISCARD,
            1000,
        ),
    )?;
    let server = Server::start(CTL, "/tmp/fuzz.img", &["--threads", "2"])?;
    // Background I/O that must keep verifying.
    let io = std::thread::spawn(|| -> Outcome {
        let f = open_direct(DEV, true)?;
        for round in 0..40u64 {
            if round % 10 == 0 {
                eprintln!("fuzz: background I/O round {round}");
            }
            for blk in 0..16u64 {
                let buf = Aligned::from(&pattern(round * 16 + blk, 4096));
                f.write_all_at(buf.as_ref(), blk * 4096)
                    .map_err(|e| format!("write: {e}"))?;
            }
            for blk in 0..16u64 {
                let mut buf = Aligned::new(4096);
                f.read_exact_at(buf.as_mut(), blk * 4096)
                    .map_err(|e| format!("read: {e}"))?;
                ensure!(
                    buf.as_ref() == pattern(round * 16 + blk, 4096),
                    "round {round} block {blk} differs"
                );
            }
        }
        Ok(())
    });
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 50_000;
    let fuzzers: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || -> Result<u64, String> {
                let mut ctl = Control::open(CTL).map_err(|e| e.to_string())?;
                let mut rng = 0x1234_5678_9abc_def1u64 ^ (t << 32);
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let mut bios = vec![AbuseBio::default(); 8];
                let mut data = vec![0u8; 64 * 1024];
                let mut calls = 0;
                while calls < PER_THREAD {
                    let r = next();
                    // Mostly our own numbers (with random sizes and
                    // directions), sometimes anything at all.
                    let nr = [0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x2f][(r & 7) as usize];
                    let size =
                        [0u64, 8, 40, 64, 152, 4096, (r >> 8) & 0x3fff][((r >> 4) % 7) as usize];
                    let dir = (r >> 20) & 3;
                    let req = if r % 97 == 0 {
                        (r >> 11) as u32
                    } else if r % 11 == 0 {
                        ABUSE_SERVE
                    } else {
                        ((dir << 30) | (size << 16) | (u64::from(b'A') << 8) | nr) as u32
                    };
                    // Never SET_STATUS or RESET the device for real: that
                    // would fail the background I/O by design.
                    if req == ABUSE_RESET || req == ABUSE_SET_STATUS {
                        continue;
                    }
                    // Pointers are random (the kernel must catch them) or
                    // our own buffers with honest lengths: the kernel may
                    // legitimately write that much, and must not write more.
                    let ours = (r >> 3) % 5 >= 2;
                    let mut x = AbuseXfer {
                        bios: match r % 5 {
                            0 => next(),
                            1 => 0,
                            _ => bios.as_mut_ptr() as u64,
                        },
                        data: match (r >> 3) % 5 {
                            0 => next(),
                            1 => 0,
                            _ => data.as_mut_ptr() as u64,
                        },
                        data_len: match ((r >> 6) % 4, ours) {
                            (0, false) => next(),
                            (0, true) => next() % (data.len() as u64 + 1),
                            (1, _) => 0,
                            _ => data.len() as u64,
                        },
                        count: match (r >> 9) % 4 {
                            0 => next() as u32,
                            1 => 0,
                            _ => 1 + (next() % 8) as u32,
                        },
                        flags: if r % 31 == 0 { next() as u32 } else { 0 },
                        reserved: if r % 37 == 0 {
                            [next(), 0, 0, 0]
                        } else {
                            [0; 4]
                        },
                    };
                    if x.bios == bios.as_ptr() as u64 && (9..=ABUSE_MAX_BATCH).contains(&x.count) {
                        x.count = 8;
                    }
                    // Random ids, sectors and results for PUT: never a
                    // real fetched request's (those belong to the server).
                    for b in bios.iter_mut() {
                        *b = AbuseBio {
                            id: next(),
                            sector: next() % 8192,
                            addr: next(),
                            len: (next() % 8192) as u32,
                            cmd: (next() % 6) as u16,
                            flags: if next() % 3 == 0 { ABUSE_BIO_ERRNO } else { 0 },
                            result: (next() % 4) as u32,
                            error: (next() % 8192) as u32,
                        };
                    }
                    // The header sits in a page-sized scratch area: whatever
                    // struct the (possibly real) ioctl number names fits.
                    let mut scratch = [0u64; 512];
                    // SAFETY: AbuseXfer is plain old data, smaller than scratch.
                    unsafe { std::ptr::write(scratch.as_mut_ptr().cast::<AbuseXfer>(), x) };
                    if req == ABUSE_SERVE {
                        // Honest room (the kernel may fill `count` entries),
                        // random completions, a short sleep at most.
                        let count = if x.bios == bios.as_ptr() as u64 {
                            x.count.min(8)
                        } else {
                            x.count
                        };
                        let serve = AbuseServe {
                            bios: x.bios,
                            data: x.data,
                            data_len: x.data_len,
                            put: (next() % 10) as u32,
                            count,
                            queue: next() as u32,
                            wait_ms: (next() % 20) as u32,
                            flags: x.flags,
                            reserved0: if r % 41 == 0 { next() as u32 } else { 0 },
                            reserved: [x.reserved[0], 0],
                        };
                        // SAFETY: as above.
                        unsafe {
                            std::ptr::write(scratch.as_mut_ptr().cast::<AbuseServe>(), serve)
                        };
                    }
                    let arg = match (r >> 13) % 8 {
                        0 => next() as usize,
                        1 => 0,
                        _ => scratch.as_mut_ptr() as usize,
                    };
                    // SAFETY: the point of the test: the kernel must check
                    // every pointer. Valid pointers here point at buffers
                    // this thread owns and may be written.
                    let ret = unsafe { nix::libc::ioctl(ctl.as_raw_fd(), req as _, arg) };
                    calls += 1;
                    if calls % 10_000 == 0 {
                        eprintln!("fuzz: thread {t}: {calls} ioctls");
                    }
                    // A GET that succeeded took real requests: closing the
                    // file hands them to the real server (requeue on release).
                    if (req == ABUSE_GET_BIO || req == ABUSE_SERVE) && ret == 0 {
                        ctl = Control::open(CTL).map_err(|e| e.to_string())?;
                    }
                }
                Ok(calls)
            })
        })
        .collect();
    let mut total = 0;
    for f in fuzzers {
        total += f.join().map_err(|_| "fuzzer panicked")??;
    }
    let io_result = io.join().map_err(|_| "I/O thread panicked")?;
    ensure!(total >= THREADS * PER_THREAD, "only {total} ioctls");
    // Requests a fuzzer fetched went back to the server when it closed its
    // file: the background I/O saw no error.
    io_result.map_err(|e| format!("I/O during fuzzing: {e}"))?;
    let f = open_direct(DEV, true)?;
    for blk in 0..64u64 {
        let buf = Aligned::from(&pattern(blk + 9999, 4096));
        f.write_all_at(buf.as_ref(), blk * 4096)
            .map_err(|e| format!("after fuzzing, write: {e}"))?;
        let mut back = Aligned::new(4096);
        f.read_exact_at(back.as_mut(), blk * 4096)
            .map_err(|e| format!("after fuzzing, read: {e}"))?;
        ensure!(
            back.as_ref() == buf.as_ref(),
            "after fuzzing, block {blk} differs"
        );
    }
    drop(f);
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(
        st.flags & ABUSE_FLAG_CONFIGURED != 0 && st.size == 32 * MIB,
        "fuzzing changed the configuration: {st:?}"
    );
    println!("fuzz: {total} ioctls");
    drop(server);
    teardown()
}
