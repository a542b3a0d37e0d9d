//! Servers that die, stop or never come: nothing is lost.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use abuse_sys::uapi::*;
use nix::sys::signal::Signal;

use crate::ensure;
use crate::guest::{
    backing, config, control, insmod, open_direct, pattern, setup, teardown, wait_for, Aligned,
    Outcome, Server,
};

const CTL: &str = "/dev/abctl0";
const DEV: &str = "/dev/abuse0";
const MIB: u64 = 1 << 20;

/// Writes `blocks` 4 KiB patterns from `threads` threads and reads them
/// back, in the background; the result is whether every byte verified.
fn verified_io(threads: u64, blocks: u64, seed: u64) -> std::thread::JoinHandle<Outcome> {
    std::thread::spawn(move || {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                std::thread::spawn(move || -> Outcome {
                    let f = open_direct(DEV, true)?;
                    for b in 0..blocks {
                        let at = (t * blocks + b) * 4096;
                        let data = pattern(seed + t * blocks + b, 4096);
                        f.write_all_at(Aligned::from(&data).as_ref(), at)
                            .map_err(|e| format!("write at {at}: {e}"))?;
                        let mut back = Aligned::new(4096);
                        f.read_exact_at(back.as_mut(), at)
                            .map_err(|e| format!("read at {at}: {e}"))?;
                        ensure!(back.as_ref() == data, "data at {at} differs");
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| "I/O thread panicked")??;
        }
        Ok(())
    })
}

/// A server fetches requests and is killed with SIGKILL: a second server
/// gets them flagged REQUEUED, the writer sees no error, the data verifies.
pub fn requeue_on_release() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/rq.img", 32 * MIB)?;
    setup(CTL, &config(32 * MIB, 4096, 32, 0, 0))?;
    // It fetches a batch and sits on it.
    let doomed = Server::start(CTL, "/tmp/rq.img", &["--hold-ms", "600000", "--batch", "8"])?;
    let io = verified_io(8, 16, 1000);
    ensure!(
        wait_for(Duration::from_secs(10), || doomed.stat("max_get") > 0),
        "the first server fetched nothing"
    );
    let held = doomed.stat("max_get");
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(
        st.in_flight as u64 >= held,
        "fetched requests not in flight: {st:?}"
    );
    doomed.signal(Signal::SIGKILL)?;
    doomed.kill();
    let rescuer = Server::start(CTL, "/tmp/rq.img", &["--threads", "2"])?;
    io.join().map_err(|_| "I/O panicked")??;
    ensure!(
        rescuer.stat("requeued") >= held,
        "the second server saw {} REQUEUED requests, {held} were held",
        rescuer.stat("requeued")
    );
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(st.requeues >= held && st.errors == 0, "counters: {st:?}");
    drop(rescuer);
    teardown()
}

/// No server: I/O waits (pending); a server started later completes it
/// without error.
pub fn no_server_waits() -> Outcome {
    insmod("max_abuse=1")?;
    backing("/tmp/ns.img", 16 * MIB)?;
    setup(CTL, &config(16 * MIB, 4096, 16, 0, 1000))?;
    let io = verified_io(4, 4, 3000);
    ensure!(
        wait_for(Duration::from_secs(5), || control(CTL)
            .and_then(|c| c.status().map_err(|e| e.to_string()))
            .map(|s| s.pending >= 4)
            .unwrap_or(false)),
        "the I/O did not queue up"
    );
    // Longer than the timeout: pending requests are not failed or lost.
    std::thread::sleep(Duration::from_secs(3));
    ensure!(!io.is_finished(), "I/O finished without a server");
    let st = control(CTL)?.status().map_err(|e| e.to_string())?;
    ensure!(
        st.pending >= 4 && st.errors == 0 && st.completed == 0,
        "while waiting: {st:?}"
    );
    let _server = Server::start(CTL, "/tmp/ns.img", &[])?;
    io.join().map_err(|_| "I/O panicked")??;
    teardown()
}

/// DEVICE_FAILURE fails everything outstanding.
pub fn device_failure() -> Outcome {
    insmod("max_abuse=1")?;
    setup(CTL, &config(16 * MIB, 4096, 16, 0, 0))?;
    let ctl = control(CTL)?;
    let readers: Vec<_> = (0..6u64)
        .map(|i| {
            std::thread::spawn(move || -> Result<(), String> {
                let f = open_direct(DEV, false)?;
                let mut buf = Aligned::new(4096);
                f.read_exact_at(buf.as_mut(), i * 8192)
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    ensure!(
        wait_for(Duration::from_secs(5), || ctl
            .status()
            .map(|s| s.pending == 6)
            .unwrap_or(false)),
        "reads did not queue"
    );
    // Fetch two; fail one of them with DEVICE_FAILURE.
    let mut bios = [AbuseBio::default(); 2];
    let mut buf = vec![0u8; 64 * 1024];
    ensure!(
        ctl.get_bios(&mut bios, &mut buf)
            .map_err(|e| e.to_string())?
            == 2,
        "could not fetch two"
    );
    let t = Instant::now();
    let done = ctl
        .put_bios(&[AbuseBio {
            result: ABUSE_RESULT_DEVICE_FAILURE,
            ..bios[0]
        }])
        .map_err(|e| e.to_string())?;
    ensure!(done == 1, "DEVICE_FAILURE PUT completed {done}");
    for r in readers {
        let res = r.join().map_err(|_| "reader panicked")?;
        ensure!(res.is_err(), "a read succeeded after DEVICE_FAILURE");
    }
    ensure!(
        t.elapsed() < Duration::from_secs(1),
        "failing took {:?}",
        t.elapsed()
    );
    let st = ctl.status().map_err(|e| e.to_string())?;
    ensure!(
        st.pending == 0 && st.in_flight == 0 && st.errors == 6,
        "after DEVICE_FAILURE: {st:?}"
    );
    // The other fetched one is now stale.
    let err = ctl.put_bios(&bios[1..2]).err().map(|e| e.errno());
    ensure!(
        err == Some(nix::errno::Errno::ESTALE),
        "PUT of a failed request: {err:?}"
    );
    drop(ctl);
    teardown()
}
