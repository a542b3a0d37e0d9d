//! The fast path: ABUSE_SERVE's rules, wake-one sleeping, and several
//! hardware queues served by any server.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abuse_sys::uapi::*;
use nix::errno::Errno;

use crate::ensure;
use crate::guest::{config, control, insmod, sh, teardown, Outcome};

const CTL: &str = "/dev/abctl0";
const DEV: &str = "/dev/abuse0";
const MIB: u64 = 1 << 20;

nix::ioctl_readwrite_bad!(
    raw_serve,
    ABUSE_SERVE as nix::sys::ioctl::ioctl_num_type,
    AbuseServe
);

/// A setup with `queues` hardware queues.
fn setup_queues(queues: u32, depth: u32) -> Outcome {
    let st = AbuseStatus {
        queues,
        ..config(16 * MIB, 4096, depth, 0, 0)
    };
    control(CTL)?
        .set_status(&st)
        .map_err(|e| format!("setup queues={queues}: {e}"))
}

/// Completes `bios` (fetched READs) with zeroes through PUT_BIO.
fn complete_reads(ctl: &abuse_sys::Control, bios: &[AbuseBio]) -> Outcome {
    ctl.put_bios(bios)
        .map(|_| ())
        .map_err(|e| format!("PUT_BIO: {e}"))
}

/// Bad SERVE arguments are EINVAL and change nothing; with nothing
/// pending, SERVE returns none at once without `wait_ms`, and after about
/// `wait_ms` with it; completions and fetches in one call work.
pub fn serve_rules() -> Outcome {
    insmod("max_abuse=1")?;
    setup_queues(0, 16)?;
    let ctl = control(CTL)?;
    let mut bios = [AbuseBio::default(); 4];
    let mut buf = vec![0u8; 4 * 4096];
    let good = AbuseServe {
        bios: bios.as_mut_ptr() as u64,
        data: buf.as_mut_ptr() as u64,
        data_len: buf.len() as u64,
        count: 4,
        ..Default::default()
    };
    let bad = [
        (
            "unknown flags",
            AbuseServe {
                flags: !ABUSE_XFER_DESCRIPTORS,
                ..good
            },
        ),
        (
            "reserved0",
            AbuseServe {
                reserved0: 1,
                ..good
            },
        ),
        (
            "reserved",
            AbuseServe {
                reserved: [0, 1],
                ..good
            },
        ),
        ("count 0", AbuseServe { count: 0, ..good }),
        ("put > count", AbuseServe { put: 5, ..good }),
        (
            "count past the batch limit",
            AbuseServe {
                count: ABUSE_MAX_BATCH + 1,
                ..good
            },
        ),
    ];
    for (what, mut x) in bad {
        // SAFETY: `x` is a valid AbuseServe; its pointers name live buffers.
        let r = unsafe { raw_serve(ctl.as_raw_fd(), &mut x) };
        ensure!(r == Err(Errno::EINVAL), "{what}: {r:?}, want EINVAL");
    }
    // Nothing pending: none fetched, at once without a wait...
    let t = Instant::now();
    let n = ctl
        .serve(&mut bios, 0, &mut buf, 0, Duration::ZERO)
        .map_err(|e| e.to_string())?;
    ensure!(
        n == 0 && t.elapsed() < Duration::from_secs(1),
        "idle SERVE: {n} after {:?}",
        t.elapsed()
    );
    // ...and after the wait with one.
    let t = Instant::now();
    let n = ctl
        .serve(&mut bios, 0, &mut buf, 0, Duration::from_millis(300))
        .map_err(|e| e.to_string())?;
    let waited = t.elapsed();
    ensure!(
        n == 0 && waited >= Duration::from_millis(250) && waited < Duration::from_secs(10),
        "SERVE with wait_ms=300: {n} after {waited:?}"
    );
    // A sleeping SERVE wakes for a request and fetches it; the next SERVE
    // completes it (the reader sees its data) and fetches the next.
    let reader = std::thread::spawn(|| {
        sh(&format!(
            "dd if={DEV} of=/tmp/serve-read bs=4096 count=2 iflag=direct 2>&1"
        ))
    });
    let n = ctl
        .serve(&mut bios, 0, &mut buf, 0, Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    ensure!(
        n == 1 && bios[0].cmd == ABUSE_CMD_READ,
        "woke with {n}: {:?}",
        bios[0]
    );
    let off = (bios[0].addr - buf.as_ptr() as u64) as usize;
    buf[off..off + 4096].fill(0xa5);
    let n = ctl
        .serve(&mut bios, 1, &mut buf, 0, Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    ensure!(
        n == 1 && bios[0].sector == 8,
        "second fetch: {n} {:?}",
        bios[0]
    );
    let off = (bios[0].addr - buf.as_ptr() as u64) as usize;
    buf[off..off + 4096].fill(0x5a);
    // A stale entry stops the completions at it: put reports how many.
    let stale = AbuseBio {
        id: bios[0].id ^ (1 << 40),
        ..bios[0]
    };
    let mut two = [bios[0], stale];
    let r = ctl.serve(&mut two, 2, &mut buf, 0, Duration::ZERO);
    match r {
        Err(e @ abuse_sys::Error::Ioctl { done: 1, .. }) if e.errno() == Errno::ESTALE => {}
        other => return Err(format!("SERVE with a stale second entry: {other:?}")),
    }
    reader.join().map_err(|_| "reader panicked")??;
    let data = std::fs::read("/tmp/serve-read").map_err(|e| e.to_string())?;
    ensure!(
        data.len() == 8192
            && data[..4096].iter().all(|&b| b == 0xa5)
            && data[4096..].iter().all(|&b| b == 0x5a),
        "the reader did not get what SERVE completed"
    );
    let st = ctl.status().map_err(|e| e.to_string())?;
    ensure!(
        st.in_flight == 0 && st.pending == 0 && st.errors == 0,
        "after: {st:?}"
    );
    drop(ctl);
    teardown()
}

/// One new request wakes one sleeping server, not all: of three SERVE calls
/// sleeping on the same queue, one fetches it and the other two sleep on
/// until their wait ends.
pub fn serve_wakes_one() -> Outcome {
    insmod("max_abuse=1")?;
    setup_queues(1, 16)?;
    let start = Instant::now();
    let sleepers: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(
                move || -> Result<(usize, Duration, Vec<AbuseBio>), String> {
                    let ctl = control(CTL)?;
                    let mut bios = [AbuseBio::default(); 1];
                    let mut buf = vec![0u8; 4096];
                    let n = ctl
                        .serve(&mut bios, 0, &mut buf, 0, Duration::from_secs(6))
                        .map_err(|e| e.to_string())?;
                    let at = start.elapsed();
                    if n == 1 {
                        complete_reads(&ctl, &bios)?;
                    }
                    Ok((n, at, bios[..n].to_vec()))
                },
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    sh(&format!(
        "dd if={DEV} of=/dev/null bs=4096 count=1 iflag=direct 2>&1"
    ))?;
    let mut results = Vec::new();
    for s in sleepers {
        results.push(s.join().map_err(|_| "sleeper panicked")??);
    }
    let woke: Vec<_> = results.iter().filter(|r| r.0 == 1).collect();
    ensure!(
        woke.len() == 1,
        "{} sleepers fetched the one request: {results:?}",
        woke.len()
    );
    ensure!(
        woke[0].1 < Duration::from_secs(5),
        "the woken sleeper returned after {:?}",
        woke[0].1
    );
    for (n, at, _) in results.iter().filter(|r| r.0 == 0) {
        ensure!(
            *at >= Duration::from_millis(5500),
            "a sleeper that fetched {n} returned after {at:?}: woken for a request another took"
        );
    }
    teardown()
}

/// A server woken for a request its buffer cannot hold gets EINVAL and
/// hands the request on: another server sleeping for work is woken for it,
/// instead of sleeping on until its wait ends.
pub fn serve_hands_on_what_does_not_fit() -> Outcome {
    insmod("max_abuse=1")?;
    setup_queues(1, 16)?;
    // sleeper LEN WAIT: a SERVE with a LEN-byte buffer; (fetched, when).
    let start = Instant::now();
    let sleeper = move |len: usize, wait: u64| {
        std::thread::spawn(move || -> Result<(usize, Duration), String> {
            let ctl = control(CTL)?;
            let mut bios = [AbuseBio::default(); 1];
            let mut buf = vec![0u8; len];
            let n = ctl
                .serve(&mut bios, 0, &mut buf, 0, Duration::from_secs(wait))
                .map_err(|e| e.to_string())?;
            if n == 1 {
                let off = (bios[0].addr - buf.as_ptr() as u64) as usize;
                buf[off..off + bios[0].len as usize].fill(0xa5);
                ctl.put_bios(&bios).map_err(|e| format!("PUT_BIO: {e}"))?;
            }
            Ok((n, start.elapsed()))
        })
    };
    // The small one sleeps first, so the wake-up goes to it.
    let small = sleeper(4096, 100);
    std::thread::sleep(Duration::from_millis(300));
    let big = sleeper(65536, 100);
    std::thread::sleep(Duration::from_millis(300));
    sh(&format!(
        "dd if={DEV} of=/tmp/serve-big bs=16384 count=1 iflag=direct 2>&1"
    ))?;
    let read_at = start.elapsed();
    let big = big.join().map_err(|_| "big sleeper panicked")??;
    ensure!(big.0 == 1, "the big-buffer SERVE fetched {}", big.0);
    // Without the hand-on it would return after its 100 s wait.
    ensure!(
        read_at < Duration::from_secs(60),
        "the 16 KiB read took until {read_at:?}"
    );
    let data = std::fs::read("/tmp/serve-big").map_err(|e| e.to_string())?;
    ensure!(
        data.len() == 16384 && data.iter().all(|&b| b == 0xa5),
        "the reader did not get what the big-buffer SERVE completed"
    );
    let small = small.join().map_err(|_| "small sleeper panicked")?;
    ensure!(
        matches!(&small, Err(e) if e.contains("EINVAL") || e.contains("Invalid argument")),
        "the 4 KiB-buffer SERVE woken for a 16 KiB READ: {small:?}, want EINVAL"
    );
    teardown()
}

/// Several hardware queues: I/O submitted on every CPU lands on more than
/// one queue (request ids carry it), and a server that fetches with one
/// queue's hint serves them all promptly: a request on a queue nobody
/// sleeps on wakes a sleeper of another queue.
pub fn queues_served_by_any() -> Outcome {
    insmod("max_abuse=1")?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    ensure!(cpus >= 2, "needs 2 CPUs, has {cpus}");
    setup_queues(cpus, 64)?;
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(st.queues == cpus, "asked {cpus} queues, got {}", st.queues);
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<(u64, Vec<u32>), String> {
            let ctl = control(CTL)?;
            let mut bios = vec![AbuseBio::default(); 32];
            let mut buf = vec![0u8; 32 * 8192];
            let (mut put, mut served) = (0, 0u64);
            let mut per_queue = vec![0u32; 64];
            while !stop.load(Ordering::Relaxed) {
                // Hint 0 always: this server sleeps on queue 0 only.
                let n = ctl
                    .serve(&mut bios, put, &mut buf, 0, Duration::from_secs(30))
                    .map_err(|e| e.to_string())?;
                for b in &bios[..n] {
                    per_queue[((b.id >> 16) & 0xffff) as usize] += 1;
                }
                served += n as u64;
                put = n;
            }
            if put > 0 {
                complete_reads(&ctl, &bios[..put])?;
            }
            Ok((served, per_queue))
        })
    };
    // Reads pinned to the last CPU: blk-mq queues them on its queue, which
    // no server sleeps on.
    let last = cpus - 1;
    let t = Instant::now();
    sh(&format!(
        "taskset -c {last} sh -c 'for i in $(seq 0 49); do dd if={DEV} of=/dev/null bs=4096 count=1 skip=$i iflag=direct 2>/dev/null || exit 1; done'"
    ))?;
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    // Wake the server so it sees the stop.
    sh(&format!(
        "dd if={DEV} of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null"
    ))?;
    let (served, per_queue) = server.join().map_err(|_| "server panicked")??;
    ensure!(served >= 50, "served {served} requests");
    ensure!(
        per_queue[last as usize] > 0,
        "no request on queue {last} (per queue: {:?})",
        &per_queue[..cpus as usize]
    );
    // A request on a queue with no sleeper waiting for the server's 30 s
    // sleep to end would take 25 minutes for 50 reads.
    ensure!(took < Duration::from_secs(60), "50 reads took {took:?}");
    teardown()
}
