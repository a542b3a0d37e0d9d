//! The engine against a fake control device that keeps the kernel's rules
//! (ids, payload placement, ESTALE for unknown ids, generations), and the
//! execution of single requests.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use abuse_sys::uapi::*;
use abuse_sys::{AbuseBio, AbuseStatus};
use nix::errno::Errno;

use super::execute::{execute, Kernel};
use super::*;
use crate::backend::{unsupported, Backend};
use crate::null::Null;

/// A request the fake device holds.
#[derive(Clone)]
struct Req {
    bio: AbuseBio,
    data: Vec<u8>,
}

/// How the fake completed a request: (bio as PUT, READ data).
type Done = (AbuseBio, Vec<u8>);

#[derive(Default)]
struct FakeState {
    status: AbuseStatus,
    pending: VecDeque<Req>,
    fetched: HashMap<u64, Req>,
    done: Vec<Done>,
    /// Ids whose PUT fails with ESTALE (as after a RESET of that request).
    stale: HashSet<u64>,
    /// GET_BIO fails with this errno once, for the worker that hits it.
    fail_get: Option<Errno>,
    /// A PUT entry with ABUSE_BIO_FILE is refused with this errno once.
    refuse_file: Option<Errno>,
    /// Fetches of descriptors only, and with payloads.
    fetches: (u32, u32),
    next_id: u64,
}

/// A control device in memory.
#[derive(Clone, Default)]
struct Fake {
    state: Arc<(Mutex<FakeState>, Condvar)>,
    path: PathBuf,
}

impl Fake {
    fn new(size: u64, flags: u32) -> Self {
        let f = Fake {
            path: "/dev/fake0".into(),
            ..Default::default()
        };
        f.lock().status = AbuseStatus {
            size,
            block_size: 4096,
            flags: flags | ABUSE_FLAG_CONFIGURED,
            generation: 7,
            version: ABUSE_VERSION,
            ..Default::default()
        };
        f
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.0.lock().unwrap()
    }

    /// Queues a request; returns its id.
    fn queue(&self, cmd: u16, sector: u64, data: Vec<u8>) -> u64 {
        self.queue_with(cmd, sector, data, 0)
    }

    /// Queues a request with `flags` (ABUSE_BIO_FUA, say); returns its id.
    fn queue_with(&self, cmd: u16, sector: u64, data: Vec<u8>, flags: u16) -> u64 {
        let mut st = self.lock();
        st.next_id += 1;
        let id = st.next_id;
        let bio = AbuseBio {
            id,
            sector,
            len: if cmd == ABUSE_CMD_FLUSH {
                0
            } else {
                data.len() as u32
            },
            cmd,
            flags,
            ..Default::default()
        };
        st.pending.push_back(Req { bio, data });
        self.state.1.notify_all();
        id
    }

    fn err(&self, op: &'static str, errno: Errno, done: usize) -> abuse_sys::Error {
        abuse_sys::Error::Ioctl {
            path: self.path.clone(),
            op,
            errno,
            done,
        }
    }

    /// Waits until `n` requests were completed (or fails the test).
    fn wait_done(&self, n: usize) -> Vec<Done> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let st = self.lock();
            if st.done.len() >= n {
                return st.done.clone();
            }
            drop(st);
            assert!(
                std::time::Instant::now() < deadline,
                "requests not completed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl ControlDevice for Fake {
    fn status(&self) -> abuse_sys::Result<AbuseStatus> {
        Ok(self.lock().status)
    }

    fn get_bios(
        &self,
        bios: &mut [AbuseBio],
        mut data: Option<&mut [u8]>,
    ) -> abuse_sys::Result<usize> {
        let mut st = self.lock();
        if let Some(e) = st.fail_get.take() {
            return Err(self.err("GET_BIO", e, 0));
        }
        match data {
            None => st.fetches.0 += 1,
            Some(_) => st.fetches.1 += 1,
        }
        let mut n = 0;
        let mut used = 0usize;
        while n < bios.len() {
            let Some(req) = st.pending.front() else { break };
            let off = used.next_multiple_of(ABUSE_DATA_ALIGN as usize);
            let len = req.bio.len as usize;
            if data.as_ref().is_some_and(|d| off + len > d.len()) {
                break;
            }
            let mut req = st.pending.pop_front().unwrap();
            // Descriptors only: the WRITE's data stays with the request.
            req.bio.addr = 0;
            if let Some(data) = data.as_deref_mut() {
                if req.bio.cmd == ABUSE_CMD_WRITE {
                    data[off..off + len].copy_from_slice(&req.data);
                }
                req.bio.addr = data.as_ptr() as u64 + off as u64;
                used = off + len;
            }
            bios[n] = req.bio;
            st.fetched.insert(req.bio.id, req);
            n += 1;
        }
        Ok(n)
    }

    fn put_bios(&self, bios: &[AbuseBio]) -> abuse_sys::Result<usize> {
        let mut st = self.lock();
        for (i, b) in bios.iter().enumerate() {
            if st.stale.contains(&b.id) || !st.fetched.contains_key(&b.id) {
                return Err(self.err("PUT_BIO", Errno::ESTALE, i));
            }
            let refuse = match b.flags & ABUSE_BIO_FILE {
                0 => None,
                _ => st.refuse_file.take(),
            };
            let req = st.fetched.get(&b.id).unwrap();
            let mut read = Vec::new();
            if b.flags & ABUSE_BIO_FILE != 0 {
                // As the kernel: the data moves between the request and
                // the file `error` at `addr`; a bad fd is refused.
                if !matches!(b.cmd, ABUSE_CMD_READ | ABUSE_CMD_WRITE) || b.result != 0 {
                    return Err(self.err("PUT_BIO", Errno::EINVAL, i));
                }
                if let Some(e) = refuse {
                    return Err(self.err("PUT_BIO", e, i));
                }
                // SAFETY: the engine names its backend's file, open while
                // it serves; a wrong number is what this checks.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(b.error as i32) };
                let moved = if b.cmd == ABUSE_CMD_READ {
                    read = vec![0; b.len as usize];
                    nix::sys::uio::pread(fd, &mut read, b.addr as i64)
                } else {
                    nix::sys::uio::pwrite(fd, &req.data, b.addr as i64)
                };
                if let Err(e) = moved {
                    return Err(self.err("PUT_BIO", e, i));
                }
            } else if b.flags & ABUSE_BIO_ZEROES != 0 {
                // As the kernel: only on a successful READ, then zeroes
                // without looking at `addr`.
                if b.cmd != ABUSE_CMD_READ || b.result != ABUSE_RESULT_OKAY {
                    return Err(self.err("PUT_BIO", Errno::EINVAL, i));
                }
                read = vec![0; b.len as usize];
            } else if b.cmd == ABUSE_CMD_READ && b.result == ABUSE_RESULT_OKAY {
                // SAFETY: as the kernel does, the fake reads `len` bytes at
                // `addr`, which the engine points into its own live buffer
                // (this is the same process).
                read = unsafe { std::slice::from_raw_parts(b.addr as *const u8, b.len as usize) }
                    .to_vec();
            }
            st.fetched.remove(&b.id);
            st.done.push((*b, read));
        }
        Ok(bios.len())
    }

    fn wait(&self, timeout: Duration) -> abuse_sys::Result<()> {
        let st = self.lock();
        if st.pending.is_empty() {
            let _ = self.state.1.wait_timeout(st, timeout).unwrap();
        }
        Ok(())
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// A backend in memory, with failures and panics to order.
struct Mem {
    data: Mutex<Vec<u8>>,
    /// WRITEs at this offset fail with ENOSPC.
    full_at: Option<u64>,
    /// READs at this offset panic.
    panic_at: Option<u64>,
    /// The next `transient` calls fail with ENOMEM.
    transient: AtomicU32,
}

impl Mem {
    fn new(size: usize) -> Self {
        Mem {
            data: Mutex::new(vec![0; size]),
            full_at: None,
            panic_at: None,
            transient: AtomicU32::new(0),
        }
    }

    fn transient(&self) -> std::io::Result<()> {
        let left = self.transient.load(Ordering::Relaxed);
        if left > 0 {
            self.transient.store(left - 1, Ordering::Relaxed);
            return Err(std::io::Error::from_raw_os_error(Errno::ENOMEM as i32));
        }
        Ok(())
    }
}

impl Backend for Mem {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn features(&self) -> u32 {
        ABUSE_FLAG_FLUSH
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        assert!(Some(offset) != self.panic_at, "backend bug at {offset}");
        self.transient()?;
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, buf: &[u8], _fua: bool) -> std::io::Result<()> {
        if Some(offset) == self.full_at {
            return Err(std::io::Error::from_raw_os_error(Errno::ENOSPC as i32));
        }
        self.transient()?;
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Err(unsupported())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        Err(unsupported())
    }
}

struct Running {
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    handle: std::thread::JoinHandle<Result<(), EngineError>>,
}

impl Running {
    /// Waits (at most 5 s: a test fails rather than hangs) for the engine
    /// to stop by itself.
    fn stopped(self) -> Result<(), EngineError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !self.handle.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "the engine did not stop"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        self.handle.join().unwrap()
    }

    fn finish(self) -> Result<(), EngineError> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

fn start(fake: &Fake, backend: Arc<dyn Backend>, threads: usize, batch: usize) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Stats::default());
    let cfg = EngineConfig {
        ctl: fake.path.clone(),
        threads,
        batch,
        io_threads: None,
        pin: false,
        sched_batch: true,
        copy_data: false,
    };
    let (f, s, st) = (fake.clone(), stop.clone(), stats.clone());
    let handle =
        std::thread::spawn(move || serve_with(move || Ok(f.clone()), &cfg, backend, s, st));
    Running {
        stop,
        stats,
        handle,
    }
}

#[test]
fn estale_in_the_middle_of_a_batch_skips_only_that_entry() {
    let fake = Fake::new(1 << 20, ABUSE_FLAG_FLUSH);
    let ids: Vec<u64> = (0..5)
        .map(|i| fake.queue(ABUSE_CMD_WRITE, i * 8, vec![i as u8 + 1; 4096]))
        .collect();
    fake.lock().stale.insert(ids[2]);
    let mem = Arc::new(Mem::new(1 << 20));
    let run = start(&fake, mem.clone(), 1, 16);
    let done = fake.wait_done(4);
    let completed: Vec<u64> = done.iter().map(|(b, _)| b.id).collect();
    assert_eq!(completed, vec![ids[0], ids[1], ids[3], ids[4]]);
    assert_eq!(run.stats.totals().stale, 1);
    run.finish().unwrap();
}

#[test]
fn a_reset_or_reconfigured_device_stops_the_engine_with_an_error() {
    for (configured, what) in [(false, "reset"), (true, "reconfigured")] {
        let fake = Fake::new(1 << 20, 0);
        let run = start(&fake, Arc::new(Null::new(1 << 20)), 2, 4);
        std::thread::sleep(Duration::from_millis(50));
        {
            let mut st = fake.lock();
            st.status.generation += 1;
            if !configured {
                st.status.flags &= !ABUSE_FLAG_CONFIGURED;
            }
        }
        let err = run.stopped().unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, EngineError::Reconfigured { .. }), "{msg}");
        assert!(msg.contains(what) && msg.contains("7 -> 8"), "{msg}");
    }
}

#[test]
fn one_failing_worker_stops_all_and_names_the_cause() {
    let fake = Fake::new(1 << 20, 0);
    let run = start(&fake, Arc::new(Null::new(1 << 20)), 4, 4);
    std::thread::sleep(Duration::from_millis(50));
    fake.lock().fail_get = Some(Errno::EIO);
    fake.state.1.notify_all();
    let err = run.stopped().unwrap_err();
    assert!(err.to_string().contains("GET_BIO"), "{err}");
}

#[test]
fn backend_errno_reaches_the_kernel_with_the_flag() {
    let fake = Fake::new(1 << 20, 0);
    let mut mem = Mem::new(1 << 20);
    mem.full_at = Some(8192);
    let ok = fake.queue(ABUSE_CMD_WRITE, 0, vec![1; 4096]);
    let full = fake.queue(ABUSE_CMD_WRITE, 16, vec![2; 4096]);
    let run = start(&fake, Arc::new(mem), 1, 8);
    let done = fake.wait_done(2);
    let by_id = |id| done.iter().find(|(b, _)| b.id == id).unwrap().0;
    let (a, b) = (by_id(ok), by_id(full));
    assert_eq!(
        (a.result, a.flags & ABUSE_BIO_ERRNO, a.error),
        (ABUSE_RESULT_OKAY, 0, 0)
    );
    assert_eq!(b.result, ABUSE_RESULT_MEDIA_FAILURE);
    assert_eq!(b.flags & ABUSE_BIO_ERRNO, ABUSE_BIO_ERRNO);
    assert_eq!(b.error, Errno::ENOSPC as u32);
    assert_eq!(run.stats.totals().errors, 1);
    run.finish().unwrap();
}

#[test]
fn a_panicking_backend_call_fails_only_its_request() {
    let fake = Fake::new(1 << 20, 0);
    let mut mem = Mem::new(1 << 20);
    mem.panic_at = Some(4096);
    let ids: Vec<u64> = (0..3)
        .map(|i| fake.queue(ABUSE_CMD_READ, i * 8, vec![0; 4096]))
        .collect();
    let run = start(&fake, Arc::new(mem), 1, 1);
    let done = fake.wait_done(3);
    for (b, _) in &done {
        let want = if b.id == ids[1] {
            ABUSE_RESULT_MEDIA_FAILURE
        } else {
            ABUSE_RESULT_OKAY
        };
        assert_eq!(b.result, want, "request {}", b.id);
    }
    assert_eq!(
        done.iter().find(|(b, _)| b.id == ids[1]).unwrap().0.error,
        Errno::EIO as u32
    );
    // It goes on serving after the panic.
    fake.queue(ABUSE_CMD_READ, 64, vec![0; 4096]);
    fake.wait_done(4);
    assert_eq!(run.stats.totals().panics, 1);
    run.finish().unwrap();
}

#[test]
fn transient_enomem_is_retried() {
    let fake = Fake::new(1 << 20, 0);
    let mem = Mem::new(1 << 20);
    mem.transient.store(2, Ordering::Relaxed);
    fake.queue(ABUSE_CMD_WRITE, 0, vec![9; 4096]);
    let read = fake.queue(ABUSE_CMD_READ, 0, vec![0; 4096]);
    let run = start(&fake, Arc::new(mem), 1, 1);
    let done = fake.wait_done(2);
    assert!(done.iter().all(|(b, _)| b.result == ABUSE_RESULT_OKAY));
    let (_, data) = done.iter().find(|(b, _)| b.id == read).unwrap();
    assert!(data.iter().all(|&x| x == 9), "read did not see the write");
    assert_eq!(run.stats.totals().retries, 2);
    run.finish().unwrap();
}

#[test]
fn refuses_a_device_larger_than_the_backend_or_with_features_it_lacks() {
    let cases = [
        (Fake::new(2 << 20, 0), "larger than the backend"),
        (Fake::new(1 << 20, ABUSE_FLAG_DISCARD), "discard"),
    ];
    for (fake, want) in cases {
        let err = start(&fake, Arc::new(Mem::new(1 << 20)), 1, 1)
            .stopped()
            .unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    }
    let mut unconfigured = Fake::new(1 << 20, 0);
    unconfigured.path = "/dev/fake1".into();
    unconfigured.lock().status.flags = 0;
    let err = start(&unconfigured, Arc::new(Mem::new(1 << 20)), 1, 1)
        .stopped()
        .unwrap_err();
    assert!(err.to_string().contains("not configured"), "{err}");
}

fn bio(cmd: u16, sector: u64, len: u32, addr: u64, flags: u16) -> AbuseBio {
    AbuseBio {
        id: 1,
        sector,
        addr,
        len,
        cmd,
        flags,
        ..Default::default()
    }
}

#[test]
fn executes_each_command_on_the_backend() {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(1 << 20).unwrap();
    let b = crate::file::FileBackend::open(f.path(), Default::default()).unwrap();
    let stats = Stats::default();
    let mut buf = vec![0u8; 16384];
    let base = buf.as_ptr() as u64;
    buf[4096..8192].fill(5);
    let run = |b: &dyn Backend, mut bio: AbuseBio, buf: &mut Vec<u8>| {
        execute(b, &mut bio, buf, base, &stats, Kernel::of(ABUSE_VERSION));
        bio.result
    };
    // WRITE the payload at buf[4096..], FUA; READ it back into buf[8192..].
    let w = bio(ABUSE_CMD_WRITE, 16, 4096, base + 4096, ABUSE_BIO_FUA);
    assert_eq!(run(&b, w, &mut buf), ABUSE_RESULT_OKAY);
    let r = bio(ABUSE_CMD_READ, 16, 4096, base + 8192, 0);
    assert_eq!(run(&b, r, &mut buf), ABUSE_RESULT_OKAY);
    assert!(buf[8192..12288].iter().all(|&x| x == 5));
    assert_eq!(
        run(&b, bio(ABUSE_CMD_FLUSH, 0, 0, 0, 0), &mut buf),
        ABUSE_RESULT_OKAY
    );
    assert_eq!(
        run(&b, bio(ABUSE_CMD_DISCARD, 16, 4096, 0, 0), &mut buf),
        ABUSE_RESULT_OKAY
    );
    let r = bio(ABUSE_CMD_READ, 16, 4096, base + 8192, ABUSE_BIO_REQUEUED);
    assert_eq!(run(&b, r, &mut buf), ABUSE_RESULT_OKAY);
    assert!(
        buf[8192..12288].iter().all(|&x| x == 0),
        "discarded range not zero"
    );
    assert_eq!(stats.totals().writes, 1);
    assert_eq!(stats.totals().fua, 1);
    assert_eq!(stats.totals().reads, 2);
    assert_eq!(stats.totals().flushes, 1);
    assert_eq!(stats.totals().discards, 1);
    assert_eq!(stats.totals().requeued, 1);
    assert_eq!(stats.totals().requests(), 5);
}

#[test]
fn payload_outside_the_buffer_or_unknown_command_fails_with_an_errno() {
    let stats = Stats::default();
    let mut buf = vec![0u8; 4096];
    let base = buf.as_ptr() as u64;
    let mut r = bio(ABUSE_CMD_READ, 0, 8192, base, 0);
    // Version 3: no ZEROES, so the null backend reads into the payload.
    assert_eq!(
        execute(
            &Null::new(1 << 20),
            &mut r,
            &mut buf,
            base,
            &stats,
            Kernel::of(3)
        )
        .map(|f| f.errno),
        Some(Errno::EIO as i32)
    );
    assert_eq!(r.result, ABUSE_RESULT_MEDIA_FAILURE);
    let mut u = bio(99, 0, 0, 0, 0);
    assert_eq!(
        execute(
            &Null::new(4096),
            &mut u,
            &mut buf,
            base,
            &stats,
            Kernel::of(ABUSE_VERSION)
        )
        .map(|f| f.errno),
        Some(Errno::EOPNOTSUPP as i32)
    );
    assert_eq!(
        (u.flags & ABUSE_BIO_ERRNO, u.error),
        (ABUSE_BIO_ERRNO, Errno::EOPNOTSUPP as u32)
    );
    // An old module (no errno support) gets a plain media failure.
    let mut old = bio(99, 0, 0, 0, 0);
    execute(
        &Null::new(4096),
        &mut old,
        &mut buf,
        base,
        &stats,
        Kernel::of(1),
    );
    assert_eq!(
        (old.result, old.flags, old.error),
        (ABUSE_RESULT_MEDIA_FAILURE, 0, 0)
    );
    assert_eq!(stats.totals().errors, 3);
}

/// A backend that knows a range is a hole completes its READ as zeroes
/// (nothing written to the payload) where the kernel understands it, and
/// reads it into the payload where it does not; a backend that does not
/// know reads.
#[test]
fn holes_complete_as_zeroes_where_the_kernel_takes_them() {
    let stats = Stats::default();
    let mut buf = vec![0xaau8; 4096];
    let base = buf.as_ptr() as u64;
    let mut r = bio(ABUSE_CMD_READ, 0, 4096, base, 0);
    assert_eq!(
        execute(
            &Null::new(1 << 20),
            &mut r,
            &mut buf,
            base,
            &stats,
            Kernel::of(4)
        ),
        None
    );
    assert_eq!(
        (r.result, r.flags & ABUSE_BIO_ZEROES),
        (ABUSE_RESULT_OKAY, ABUSE_BIO_ZEROES)
    );
    assert!(buf.iter().all(|&b| b == 0xaa), "the payload was written");
    let mut r = bio(ABUSE_CMD_READ, 0, 4096, base, ABUSE_BIO_ZEROES);
    assert_eq!(
        execute(
            &Null::new(1 << 20),
            &mut r,
            &mut buf,
            base,
            &stats,
            Kernel::of(3)
        ),
        None
    );
    assert_eq!(r.flags & ABUSE_BIO_ZEROES, 0);
    assert!(buf.iter().all(|&b| b == 0), "the payload was not read");
    let mem = Mem::new(1 << 20);
    mem.data.lock().unwrap()[..4096].fill(7);
    let mut r = bio(ABUSE_CMD_READ, 0, 4096, base, 0);
    assert_eq!(
        execute(&mem, &mut r, &mut buf, base, &stats, Kernel::of(4)),
        None
    );
    assert_eq!(r.flags & ABUSE_BIO_ZEROES, 0);
    assert!(buf.iter().all(|&b| b == 7));
    let t = stats.totals();
    assert_eq!((t.reads, t.holes), (3, 1));
}

/// A batch's payloads are split off the buffer one by one, so they can run
/// at once; one outside the buffer, or overlapping the one before, gets
/// none (and fails with EIO) instead of aliasing another's.
#[test]
fn payloads_split_disjoint() {
    let mut buf = vec![0u8; 4 * 4096];
    let base = buf.as_ptr() as u64;
    let bio = |cmd, addr: u64, len| AbuseBio {
        cmd,
        addr,
        len,
        ..Default::default()
    };
    let mut bios = [
        bio(ABUSE_CMD_WRITE, base, 4096),
        bio(ABUSE_CMD_FLUSH, 0, 0),
        bio(ABUSE_CMD_READ, base + 8192, 4096),
        bio(ABUSE_CMD_READ, base + 8192, 4096), // overlaps the one before
        bio(ABUSE_CMD_READ, base + 12288, 8192), // runs past the end
    ];
    let jobs = super::execute::split_payloads(&mut bios, &mut buf, base);
    let lens: Vec<Option<usize>> = jobs
        .iter()
        .map(|(_, p)| p.as_ref().map(|p| p.len()))
        .collect();
    assert_eq!(lens, [Some(4096), None, Some(4096), None, None]);
    let stats = Stats::default();
    let results: Vec<u32> = jobs
        .into_iter()
        .map(|(b, p)| {
            // Version 3: the null backend reads into its payload.
            super::execute::execute_payload(&Null::new(1 << 20), b, p, &stats, Kernel::of(3));
            b.result
        })
        .collect();
    assert_eq!(
        results,
        [
            ABUSE_RESULT_OKAY,
            ABUSE_RESULT_OKAY,
            ABUSE_RESULT_OKAY,
            ABUSE_RESULT_MEDIA_FAILURE,
            ABUSE_RESULT_MEDIA_FAILURE
        ]
    );
}

/// A file backend's READs and WRITEs: the kernel moves the data (the fake
/// does it with the fd and offset the engine names), fetches carry no
/// payloads; with `copy_data`, or a kernel before version 5, the engine
/// copies as before. Either way the file and the reads hold the writes.
#[test]
fn the_kernel_moves_a_file_backends_data_where_it_can() {
    use crate::file::{FileBackend, FileOptions};
    for (version, copy_data, by_file) in [(5, false, true), (5, true, false), (4, false, false)] {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(1 << 20).unwrap();
        let backend = Arc::new(FileBackend::open(tmp.path(), FileOptions::default()).unwrap());
        let fake = Fake::new(1 << 20, ABUSE_FLAG_FLUSH | ABUSE_FLAG_FUA);
        fake.lock().status.version = version;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let cfg = EngineConfig {
            ctl: fake.path.clone(),
            threads: 2,
            batch: 4,
            io_threads: None,
            pin: false,
            sched_batch: true,
            copy_data,
        };
        let (f, s, st, b) = (fake.clone(), stop.clone(), stats.clone(), backend.clone());
        let handle = std::thread::spawn(move || serve_with(move || Ok(f.clone()), &cfg, b, s, st));
        for i in 0..8u64 {
            fake.queue(ABUSE_CMD_WRITE, i * 16, vec![i as u8 + 1; 4096]);
        }
        fake.wait_done(8);
        fake.queue(ABUSE_CMD_FLUSH, 0, Vec::new());
        let reads: Vec<u64> = (0..8u64)
            .map(|i| fake.queue(ABUSE_CMD_READ, i * 16, vec![0; 4096]))
            .collect();
        let done = fake.wait_done(17);
        stop.store(true, Ordering::Relaxed);
        handle.join().unwrap().unwrap();
        let file = std::fs::read(tmp.path()).unwrap();
        for (i, id) in reads.iter().enumerate() {
            let at = i * 16 * 512;
            assert!(file[at..at + 4096].iter().all(|&x| x == i as u8 + 1));
            let (bio, data) = done.iter().find(|(b, _)| b.id == *id).unwrap();
            assert_eq!(bio.result, ABUSE_RESULT_OKAY);
            assert!(data.iter().all(|&x| x == i as u8 + 1), "read {i}");
        }
        for (bio, _) in &done {
            let expect = by_file && bio.cmd != ABUSE_CMD_FLUSH;
            assert_eq!(bio.flags & ABUSE_BIO_FILE != 0, expect, "{bio:?}");
        }
        let t = stats.totals();
        assert_eq!(
            (t.file_io, t.reads, t.writes, t.flushes),
            (if by_file { 16 } else { 0 }, 8, 8, 1)
        );
    }
}

/// A move to or from the file the kernel refuses (EBADF, EINVAL) fails
/// that request with an I/O error; the engine serves on.
#[test]
fn a_refused_file_move_fails_its_request_and_serving_goes_on() {
    use crate::file::{FileBackend, FileOptions};
    let tmp = tempfile::NamedTempFile::new().unwrap();
    tmp.as_file().set_len(1 << 20).unwrap();
    let backend = Arc::new(FileBackend::open(tmp.path(), FileOptions::default()).unwrap());
    let fake = Fake::new(1 << 20, 0);
    fake.lock().refuse_file = Some(Errno::EINVAL);
    let run = start(&fake, backend, 1, 4);
    let first = fake.queue(ABUSE_CMD_WRITE, 0, vec![7; 4096]);
    let second = fake.queue(ABUSE_CMD_WRITE, 8, vec![8; 4096]);
    let done = fake.wait_done(2);
    let by_id = |id| done.iter().find(|(b, _)| b.id == id).unwrap().0;
    let (a, b) = (by_id(first), by_id(second));
    assert_eq!(
        (a.result, a.flags & ABUSE_BIO_FILE, a.error),
        (ABUSE_RESULT_MEDIA_FAILURE, 0, Errno::EIO as u32)
    );
    assert_eq!(
        (b.result, b.flags & ABUSE_BIO_FILE),
        (ABUSE_RESULT_OKAY, ABUSE_BIO_FILE)
    );
    assert_eq!(run.stats.totals().errors, 1);
    run.finish().unwrap();
    let file = std::fs::read(tmp.path()).unwrap();
    assert!(file[4096..8192].iter().all(|&x| x == 8));
}

/// The null backend needs no payloads: on a version 5 kernel the engine
/// fetches descriptors only, drops WRITEs and answers READs as holes.
#[test]
fn null_fetches_descriptors_only() {
    for (version, descriptors) in [(5, true), (4, false)] {
        let fake = Fake::new(1 << 20, 0);
        fake.lock().status.version = version;
        let run = start(&fake, Arc::new(Null::new(1 << 20)), 1, 4);
        fake.queue(ABUSE_CMD_WRITE, 0, vec![9; 4096]);
        let read = fake.queue(ABUSE_CMD_READ, 0, vec![0; 4096]);
        let done = fake.wait_done(2);
        run.finish().unwrap();
        for (bio, _) in &done {
            assert_eq!(bio.result, ABUSE_RESULT_OKAY, "{bio:?}");
        }
        let (bio, data) = done.iter().find(|(b, _)| b.id == read).unwrap();
        assert_eq!(bio.flags & ABUSE_BIO_ZEROES, ABUSE_BIO_ZEROES);
        assert!(data.iter().all(|&b| b == 0));
        let (with_none, with_payloads) = fake.lock().fetches;
        assert_eq!(
            (with_none > 0, with_payloads > 0),
            (descriptors, !descriptors)
        );
    }
}

/// A cow backend's READs that lie whole in its base or in consecutive
/// delta blocks are moved by the kernel from there (the fake does it with
/// the fd and offset the engine names); one that straddles the two, and
/// every WRITE (a first write needs its payload), is run by the backend.
/// The data read is the device's either way.
#[test]
fn the_kernel_reads_a_cows_blocks_from_the_file_that_holds_them() {
    use crate::cow::Cow;
    let dir = tempfile::tempdir().unwrap();
    let (base, delta) = (dir.path().join("base.img"), dir.path().join("d.cow"));
    std::fs::write(&base, vec![9u8; 1 << 20]).unwrap();
    let backend = Arc::new(Cow::create(&base, &delta, 4096, &|_| {}).unwrap());
    let fake = Fake::new(1 << 20, ABUSE_FLAG_FLUSH);
    let run = start(&fake, backend.clone(), 1, 4);
    fake.queue(ABUSE_CMD_WRITE, 8, vec![1; 4096]);
    fake.wait_done(1);
    // In the delta, in the base, across both.
    let reads = [(8, 8, 1u8), (64, 8, 9), (8, 16, 0)];
    let ids: Vec<u64> = reads
        .iter()
        .map(|&(sector, sectors, _)| fake.queue(ABUSE_CMD_READ, sector, vec![0; sectors * 512]))
        .collect();
    let done = fake.wait_done(4);
    run.finish().unwrap();
    // The last server's stop: no working area left in /dev/shm.
    backend.stop().unwrap();
    for (&(_, _, fill), id) in reads.iter().zip(&ids) {
        let (bio, data) = done.iter().find(|(b, _)| b.id == *id).unwrap();
        assert_eq!(bio.result, ABUSE_RESULT_OKAY);
        let by_file = bio.flags & ABUSE_BIO_FILE != 0;
        if fill == 0 {
            assert!(!by_file, "a READ across the base and the delta: {bio:?}");
            assert!(data[..4096].iter().all(|&x| x == 1) && data[4096..].iter().all(|&x| x == 9));
        } else {
            assert!(by_file, "{bio:?}");
            assert!(data.iter().all(|&x| x == fill), "{bio:?}");
        }
    }
    let write = done.iter().find(|(b, _)| b.cmd == ABUSE_CMD_WRITE).unwrap();
    assert_eq!(write.0.flags & ABUSE_BIO_FILE, 0);
}

/// A cow backend's rewrites of mapped blocks (no FUA) are moved by the
/// kernel into the delta blocks that hold them; a first write, a write
/// reaching an unmapped block and a FUA write (whose durability is the
/// cow's commit, not the file's sync) are run by the backend. The device
/// reads what was written either way.
#[test]
fn the_kernel_rewrites_a_cows_mapped_blocks_in_place() {
    use crate::cow::Cow;
    let dir = tempfile::tempdir().unwrap();
    let (base, delta) = (dir.path().join("base.img"), dir.path().join("d.cow"));
    std::fs::write(&base, vec![9u8; 1 << 20]).unwrap();
    let backend = Arc::new(Cow::create(&base, &delta, 4096, &|_| {}).unwrap());
    let fake = Fake::new(1 << 20, ABUSE_FLAG_FLUSH | ABUSE_FLAG_FUA);
    let run = start(&fake, backend.clone(), 1, 4);
    let moved = |done: &[Done], id: u64| {
        let (bio, _) = done.iter().find(|(b, _)| b.id == id).unwrap();
        assert_eq!(bio.result, ABUSE_RESULT_OKAY, "{bio:?}");
        bio.flags & ABUSE_BIO_FILE != 0
    };
    // Blocks 1 and 2 mapped by first writes.
    let first = fake.queue(ABUSE_CMD_WRITE, 8, vec![1; 4096]);
    fake.queue(ABUSE_CMD_WRITE, 16, vec![4; 4096]);
    let done = fake.wait_done(2);
    assert!(!moved(&done, first), "a first write");
    let rewrite = fake.queue(ABUSE_CMD_WRITE, 8, vec![2; 4096]);
    let fua = fake.queue_with(ABUSE_CMD_WRITE, 16, vec![5; 4096], ABUSE_BIO_FUA);
    let done = fake.wait_done(4);
    assert!(moved(&done, rewrite), "a rewrite of a mapped block");
    assert!(!moved(&done, fua), "a FUA rewrite");
    let across = fake.queue(ABUSE_CMD_WRITE, 16, vec![6; 8192]);
    let done = fake.wait_done(5);
    assert!(!moved(&done, across), "a write reaching an unmapped block");
    run.finish().unwrap();
    let mut got = vec![0u8; 4 * 4096];
    backend.read(4096, &mut got).unwrap();
    backend.stop().unwrap();
    assert!(got[..4096].iter().all(|&x| x == 2), "the moved rewrite");
    assert!(got[4096..3 * 4096].iter().all(|&x| x == 6));
    assert!(got[3 * 4096..].iter().all(|&x| x == 9), "the base");
}

/// Records which thread ran each call, and under which scheduling policy;
/// READs "may block" (and each waits, up to a deadline, until another READ
/// is running too), WRITEs do not.
struct Threads {
    calls: Mutex<Vec<(u16, String, i32)>>,
    reading: (Mutex<u32>, Condvar),
}

impl Threads {
    fn call(cmd: u16) -> (u16, String, i32) {
        let name = std::thread::current().name().unwrap_or("").to_string();
        (cmd, name, super::affinity::current_policy())
    }
}

impl Backend for Threads {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn features(&self) -> u32 {
        0
    }
    fn read(&self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(Threads::call(ABUSE_CMD_READ));
        let (n, cv) = &self.reading;
        let mut n = n.lock().unwrap();
        *n += 1;
        cv.notify_all();
        let (n, _) = cv
            .wait_timeout_while(n, Duration::from_secs(2), |n| *n < 2)
            .unwrap();
        if *n < 2 {
            return Err(std::io::Error::other("the two READs did not run at once"));
        }
        Ok(())
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> std::io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(Threads::call(ABUSE_CMD_WRITE));
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Err(unsupported())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        Err(unsupported())
    }
    fn may_block(&self, cmd: u16, _: u64, _: u64, _: bool) -> bool {
        cmd == ABUSE_CMD_READ
    }
}

#[test]
fn a_batch_runs_on_the_io_threads_only_when_two_requests_may_block() {
    let backend = Arc::new(Threads {
        calls: Mutex::new(Vec::new()),
        reading: (Mutex::new(0), Condvar::new()),
    });
    let fake = Fake::new(1 << 20, 0);
    // One batch of quick WRITEs: run in the worker.
    for i in 0..4 {
        fake.queue(ABUSE_CMD_WRITE, i * 8, vec![1; 4096]);
    }
    let run = start(&fake, backend.clone(), 1, 16);
    fake.wait_done(4);
    // Then one batch with two READs that may block (each waits for the
    // other) beside two WRITEs: on the I/O threads, the READs at once.
    fake.lock().pending.extend((0..4).map(|i| {
        let cmd = if i % 2 == 0 {
            ABUSE_CMD_READ
        } else {
            ABUSE_CMD_WRITE
        };
        Req {
            bio: AbuseBio {
                id: 100 + i,
                sector: i * 8,
                len: 4096,
                cmd,
                ..Default::default()
            },
            data: vec![0; 4096],
        }
    }));
    fake.state.1.notify_all();
    let done = fake.wait_done(8);
    run.finish().unwrap();
    for (bio, _) in &done {
        assert_eq!(bio.result, ABUSE_RESULT_OKAY, "{bio:?}");
    }
    let calls = backend.calls.lock().unwrap();
    let on_pool = |(_, name, _): &(u16, String, i32)| name.starts_with("abuse-io-");
    assert!(
        !calls[..4].iter().any(on_pool),
        "quick WRITEs handed off: {calls:?}"
    );
    assert!(
        calls[4..].iter().all(on_pool),
        "a batch with two blocking READs ran in the worker: {calls:?}"
    );
    // The worker runs under SCHED_BATCH (a new request does not preempt its
    // submitter).
    assert!(
        calls[..4].iter().all(|c| c.2 == nix::libc::SCHED_BATCH),
        "the worker's policy: {calls:?}"
    );
}
