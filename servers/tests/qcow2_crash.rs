//! Power cuts during qcow2 allocations. The image's I/O goes through a
//! recorder of every write and sync; the stream is then cut at every
//! point, and of the writes not yet synced a power cut may keep none, all,
//! any one, all but one, or one torn at a sector boundary (Linux's model:
//! nothing unsynced is promised). Each image such a cut leaves must be
//! `qemu-img check` free of corruption (leaks allowed: a cluster taken
//! and not linked), must read every write acknowledged before the last
//! completed FLUSH, must read nothing but old or newly written data
//! anywhere, and must open for writing, serve on, and stop clean.

mod common;
use common::{pattern, qcow2_over};

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use abuse_servers::qcow2::image::ImageIo;
use abuse_servers::qcow2::Qcow2;
use abuse_servers::Backend;

const SIZE: u64 = 4 << 20;
const SECTOR: usize = 512;

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Sync,
}

/// The image file, every write and sync logged.
struct Recorder {
    file: File,
    log: Arc<Mutex<Vec<Op>>>,
}

impl ImageIo for Recorder {
    fn pread(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.file.pread(buf, off)
    }
    fn pwrite_all(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.pwrite_all(buf, off)?;
        self.log.lock().unwrap().push(Op::Write(off, buf.to_vec()));
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync()?;
        self.log.lock().unwrap().push(Op::Sync);
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        self.file.size()
    }
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.file.punch(off, len)?;
        // A punch a crash may lose, as a write of zeroes.
        self.log
            .lock()
            .unwrap()
            .push(Op::Write(off, vec![0; len as usize]));
        Ok(())
    }
}

/// How many bytes of the `i`th unsynced write (of `n`) a crash kept.
type Keep = Box<dyn Fn(usize, usize) -> usize>;

/// What the device is asked, in order.
enum Req {
    Write(u64, Vec<u8>),
    Zeroes(u64, u64),
    Flush,
    Stop,
}

/// Allocating writes of every kind: whole and partial clusters (merged
/// with the backing file), a new L2 table, a rewrite in place, zeroes, a
/// write spanning clusters, with FLUSHes between and a clean stop last.
fn requests() -> Vec<Req> {
    vec![
        Req::Write(0, pattern(1, 4096)),
        Req::Write(8192 + 512, pattern(2, 1024)),
        Req::Flush,
        Req::Write(5 << 19, pattern(3, 4096)),
        Req::Write(0, pattern(4, 4096)),
        Req::Zeroes(12288, 4096),
        Req::Flush,
        Req::Write(16384 + 1024, pattern(6, 8192)),
        Req::Write(3 << 20, pattern(7, 512)),
        Req::Stop,
    ]
}

/// What a crash after `cut` logged ops leaves: every synced write, and of
/// the unsynced ones what `keep` says (by position in that tail): None
/// (lost), or the bytes of it that landed.
fn crash_image(
    start: &[u8],
    log: &[Op],
    cut: usize,
    keep: &dyn Fn(usize, usize) -> usize,
) -> Vec<u8> {
    let synced = log[..cut]
        .iter()
        .rposition(|o| matches!(o, Op::Sync))
        .map_or(0, |i| i + 1);
    let mut img = start.to_vec();
    for (i, op) in log[..cut].iter().enumerate() {
        let Op::Write(off, data) = op else { continue };
        let n = if i < synced {
            data.len()
        } else {
            keep(i - synced, data.len())
        };
        let end = *off as usize + n;
        if img.len() < end {
            img.resize(end, 0);
        }
        img[*off as usize..end].copy_from_slice(&data[..n]);
    }
    img
}

/// For each sector of the device, the contents it may show after a crash:
/// what it held at the last FLUSH completed before the crash, or what any
/// later write put there.
fn allowed(base: &[u8], reqs: &[Req], flushed: usize) -> Vec<HashSet<Vec<u8>>> {
    let mut dev = base.to_vec();
    let mut sets: Vec<HashSet<Vec<u8>>> = vec![HashSet::new(); base.len() / SECTOR];
    let apply = |dev: &mut Vec<u8>, r: &Req| match r {
        Req::Write(off, d) => dev[*off as usize..][..d.len()].copy_from_slice(d),
        Req::Zeroes(off, len) => dev[*off as usize..][..*len as usize].fill(0),
        Req::Flush | Req::Stop => {}
    };
    for r in &reqs[..flushed] {
        apply(&mut dev, r);
    }
    for (s, set) in sets.iter_mut().enumerate() {
        set.insert(dev[s * SECTOR..][..SECTOR].to_vec());
    }
    for r in &reqs[flushed..] {
        apply(&mut dev, r);
        let (off, len) = match r {
            Req::Write(off, d) => (*off, d.len() as u64),
            Req::Zeroes(off, len) => (*off, *len),
            _ => continue,
        };
        for s in off as usize / SECTOR..(off + len).div_ceil(SECTOR as u64) as usize {
            sets[s].insert(dev[s * SECTOR..][..SECTOR].to_vec());
        }
    }
    sets
}

/// `qemu-img check` of `img`: no corruption (exit 0, or 3: leaks only).
fn check_no_corruption(img: &Path, what: &str) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2", img.to_str().unwrap()])
        .output()
        .expect("qemu-img");
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "{what}: qemu-img check finds corruption:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_power_cut_at_every_write_of_an_allocation_leaves_a_consistent_image() {
    power_cut_everywhere(true, 4096);
}

/// Without a backing file, with qemu's default 64 KiB clusters: a new
/// cluster gets only the data written (and its end), not a merged whole.
#[test]
fn a_power_cut_at_every_write_of_an_allocation_without_backing_file() {
    power_cut_everywhere(false, 65536);
}

/// One test at a time: a qemu-img another test forks holds this test's
/// open images (and their QEMU locks) until it execs, and a reopen meanwhile
/// is refused as "in use".
static SERIAL: Mutex<()> = Mutex::new(());

fn power_cut_everywhere(backing: bool, cluster: u64) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("top.qcow2");
    let opts = format!("cluster_size={cluster}");
    let base_data = if backing {
        let b = pattern(5, SIZE as usize);
        std::fs::write(dir.path().join("base.raw"), &b).unwrap();
        qcow2_over(&img, "base.raw", "raw", Some(&opts));
        b
    } else {
        common::qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            img.to_str().unwrap(),
            &SIZE.to_string(),
        ]);
        vec![0u8; SIZE as usize]
    };
    let start = std::fs::read(&img).unwrap();

    // Serve the requests through the recorder; note where each completed
    // FLUSH (or the stop, which flushes) ends in the log.
    let log = Arc::new(Mutex::new(Vec::new()));
    let reqs = requests();
    let mut flushes: Vec<(usize, usize)> = Vec::new(); // (log length, requests before)
    {
        let l = log.clone();
        let q = Qcow2::open_through(&img, &move |file| {
            Box::new(Recorder {
                file,
                log: l.clone(),
            })
        })
        .unwrap();
        for (i, r) in reqs.iter().enumerate() {
            match r {
                Req::Write(off, d) => q.write(*off, d, false).unwrap(),
                Req::Zeroes(off, len) => q.write_zeroes(*off, *len, false).unwrap(),
                Req::Flush => q.flush().unwrap(),
                Req::Stop => q.stop().unwrap(),
            }
            if matches!(r, Req::Flush | Req::Stop) {
                flushes.push((log.lock().unwrap().len(), i + 1));
            }
        }
    }
    let log = log.lock().unwrap().clone();
    assert!(
        log.iter().filter(|o| matches!(o, Op::Sync)).count() >= 4,
        "the allocations synced nothing?"
    );

    let crashed = dir.path().join("crashed.qcow2");
    let mut seen = HashSet::new();
    let mut cases = 0;
    for cut in 0..=log.len() {
        let synced = log[..cut]
            .iter()
            .rposition(|o| matches!(o, Op::Sync))
            .map_or(0, |i| i + 1);
        let tail: Vec<usize> = log[synced..cut]
            .iter()
            .map(|o| match o {
                Op::Write(_, d) => d.len(),
                Op::Sync => 0,
            })
            .collect();
        let mut plans: Vec<(String, Keep)> = vec![
            ("none".into(), Box::new(|_, _| 0)),
            ("all".into(), Box::new(|_, n| n)),
        ];
        for (k, &len) in tail.iter().enumerate() {
            plans.push((
                format!("only #{k}"),
                Box::new(move |i, n| if i == k { n } else { 0 }),
            ));
            plans.push((
                format!("all but #{k}"),
                Box::new(move |i, n| if i == k { 0 } else { n }),
            ));
            if len > SECTOR {
                plans.push((
                    format!("#{k} torn after a sector"),
                    Box::new(move |i, n| if i == k { SECTOR } else { n }),
                ));
            }
        }
        // The requests whose FLUSH completed before the cut.
        let flushed = flushes
            .iter()
            .filter(|(at, _)| *at <= cut)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0);
        let may = allowed(&base_data, &reqs, flushed);
        for (name, keep) in plans {
            let image = crash_image(&start, &log, cut, &*keep);
            if !seen.insert(image.clone()) {
                continue;
            }
            cases += 1;
            let what = format!("a cut after {cut} of {} ops, {name}", log.len());
            std::fs::write(&crashed, &image).unwrap();
            check_no_corruption(&crashed, &what);
            // What it reads: acknowledged and flushed data, else old or new.
            {
                let q = Qcow2::open(&crashed, true).unwrap_or_else(|e| panic!("{what}: {e}"));
                let mut back = vec![0u8; SIZE as usize];
                q.read(0, &mut back)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                for (s, set) in may.iter().enumerate() {
                    assert!(
                        set.contains(&back[s * SECTOR..][..SECTOR]),
                        "{what}: sector {s} reads data that was never there, or lost a flushed write"
                    );
                }
            }
            // A server takes it on (repairing what a dirty image leaked),
            // writes, and stops clean.
            let q = Qcow2::open(&crashed, false).unwrap_or_else(|e| panic!("{what}: {e}"));
            q.write(1 << 20, &pattern(9, 4096), false).unwrap();
            q.stop().unwrap();
            drop(q);
            let out = common::qemu_img(&["check", "-f", "qcow2", crashed.to_str().unwrap()]);
            assert!(
                out.contains("No errors"),
                "{what}: after a server took it on: {out}"
            );
        }
    }
    assert!(cases > 20, "only {cases} distinct crash images");
}

/// An image file whose next sync fails once, as Linux reports a failed
/// writeback: once (the pages are then clean, and the next fsync succeeds).
struct FailOnce {
    file: File,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

impl ImageIo for FailOnce {
    fn pread(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.file.pread(buf, off)
    }
    fn pwrite_all(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.pwrite_all(buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5));
        }
        self.file.sync()
    }
    fn size(&self) -> io::Result<u64> {
        self.file.size()
    }
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.file.punch(off, len)
    }
}

/// After one failed sync, no FLUSH succeeds again in this server (the
/// failed writeback's data may be gone while the next fsync succeeds), and
/// no allocation links clusters whose data may not be on the disk.
#[test]
fn a_failed_sync_fails_every_later_qcow2_flush() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.raw"), pattern(5, SIZE as usize)).unwrap();
    let img = dir.path().join("top.qcow2");
    qcow2_over(&img, "base.raw", "raw", Some("cluster_size=4096"));
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let a = armed.clone();
    let q = Qcow2::open_through(&img, &move |file| {
        Box::new(FailOnce {
            file,
            armed: a.clone(),
        })
    })
    .unwrap();
    q.write(0, &pattern(1, 4096), false).unwrap();
    q.flush().unwrap();
    // In place (no sync on the way): the FLUSH meets the failure.
    q.write(0, &pattern(2, 4096), false).unwrap();
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(q.flush().is_err(), "the failed sync was not reported");
    assert!(q.flush().is_err(), "a FLUSH after a failed sync succeeded");
    // An allocation needs a sync before it links: it fails too.
    assert!(
        q.write(1 << 20, &pattern(3, 4096), false).is_err(),
        "an allocation linked clusters after a failed sync"
    );
    assert!(q.flush().is_err(), "a later FLUSH succeeded");
}
