//! Crash consistency of the cow delta: the write stream to the delta is cut
//! at every write point; the unsynced tail is dropped (or kept); the delta
//! reopened from what is left must hold every write acknowledged before the
//! last completed flush, map no block to unwritten space, and leave the
//! base untouched.

use std::io;
use std::sync::{Arc, Barrier, Mutex};

use abuse_servers::cow::delta::{Delta, DeltaError};
use abuse_servers::cow::storage::{Shared, Storage};

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Sync,
}

/// An in-memory file that logs every write and sync.
#[derive(Clone, Default)]
struct MemStore {
    inner: Arc<Mutex<(Vec<u8>, Vec<Op>)>>,
}

impl MemStore {
    fn with(data: Vec<u8>) -> Self {
        MemStore {
            inner: Arc::new(Mutex::new((data, Vec::new()))),
        }
    }
    fn log(&self) -> Vec<Op> {
        self.inner.lock().unwrap().1.clone()
    }
    fn bytes(&self) -> Vec<u8> {
        self.inner.lock().unwrap().0.clone()
    }
}

impl Storage for MemStore {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let g = self.inner.lock().unwrap();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = *g.0.get(offset as usize + i).unwrap_or(&0);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap();
        let end = offset as usize + buf.len();
        if g.0.len() < end {
            g.0.resize(end, 0);
        }
        g.0[offset as usize..end].copy_from_slice(buf);
        g.1.push(Op::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.lock().unwrap().1.push(Op::Sync);
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.inner.lock().unwrap().0.len() as u64)
    }
}

impl Shared for MemStore {}

/// The delta as a crash after `cut` ops may leave it: every synced write
/// applied, and of the unsynced tail the writes `keep` selects (a disk may
/// persist any of them, in any order).
fn crash_image(start: &[u8], log: &[Op], cut: usize, keep: impl Fn(usize) -> bool) -> Vec<u8> {
    let last_sync = log[..cut]
        .iter()
        .rposition(|o| matches!(o, Op::Sync))
        .map_or(0, |i| i + 1);
    let mut img = start.to_vec();
    for (i, op) in log[..cut].iter().enumerate() {
        if let Op::Write(off, data) = op {
            if i >= last_sync && !keep(i - last_sync) {
                continue;
            }
            let end = *off as usize + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*off as usize..end].copy_from_slice(data);
        }
    }
    img
}

/// Which writes of the unsynced tail (by position) a crash persisted.
type Keep = Box<dyn Fn(usize) -> bool>;

/// The ways the unsynced tail of `n` writes may land: none, all, each one
/// alone, all but each one.
fn tail_variants(n: usize) -> Vec<(String, Keep)> {
    let mut v: Vec<(String, Keep)> = vec![
        ("none".into(), Box::new(|_| false)),
        ("all".into(), Box::new(|_| true)),
    ];
    for k in 0..n {
        v.push((format!("only #{k}"), Box::new(move |i| i == k)));
        v.push((format!("all but #{k}"), Box::new(move |i| i != k)));
    }
    v
}

const BS: usize = 4096;
const BLOCKS: usize = 24;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1 // never zero: unwritten space reads as zero
        })
        .collect()
}

/// One step of the workload.
enum Step {
    Write(u64, Vec<u8>),
    Flush,
}

fn workload() -> Vec<Step> {
    let mut steps = Vec::new();
    let mut seed = 1;
    for round in 0..6u64 {
        for i in 0..5u64 {
            let block = (round * 7 + i * 5) % BLOCKS as u64;
            // Whole blocks, partial blocks, and writes across two blocks.
            let (off, len) = match i % 3 {
                0 => (block * BS as u64, BS),
                1 => (block * BS as u64 + 512, 1024),
                _ => (
                    block * BS as u64 + BS as u64 - 512,
                    1536.min(
                        (BLOCKS as u64 * BS as u64 - block * BS as u64 - BS as u64 + 512) as usize,
                    ),
                ),
            };
            seed += 1;
            steps.push(Step::Write(off, pattern(seed, len)));
        }
        if round % 2 == 1 {
            steps.push(Step::Flush);
        }
    }
    steps
}

#[test]
fn every_crash_point_is_consistent() {
    let base_bytes = pattern(999, BLOCKS * BS);
    let base = MemStore::with(base_bytes.clone());
    let store = MemStore::default();
    let delta = Delta::create(store.clone(), base.clone(), BS as u32, "/base").unwrap();
    let start = store.bytes();
    let created_ops = store.log().len();

    // Run the workload, remembering the device's contents after each step
    // and the log position at which each flush completed.
    let mut model = base_bytes.clone();
    let mut versions = vec![model.clone()];
    let mut flushed: Vec<(usize, usize)> = Vec::new(); // (log len after flush, version index)
    for step in workload() {
        match step {
            Step::Write(off, data) => {
                delta.write(off, &data, false).unwrap();
                model[off as usize..off as usize + data.len()].copy_from_slice(&data);
                versions.push(model.clone());
            }
            Step::Flush => {
                delta.flush().unwrap();
                flushed.push((store.log().len(), versions.len() - 1));
            }
        }
    }
    let log = store.log()[created_ops..].to_vec();
    assert!(
        flushed.len() >= 3 && log.len() > 40,
        "the workload is too small to mean anything"
    );

    let mut images = 0;
    for cut in 0..=log.len() {
        let last_sync = log[..cut]
            .iter()
            .rposition(|o| matches!(o, Op::Sync))
            .map_or(0, |i| i + 1);
        for (how, keep) in tail_variants(cut - last_sync) {
            let img = crash_image(&start, &log, cut, keep);
            images += 1;
            let reopened = Delta::open(MemStore::with(img), base.clone())
                .unwrap_or_else(|e| panic!("cut {cut} (unsynced kept: {how}): reopen failed: {e}"));
            // The last flush that completed before the cut.
            let must = flushed
                .iter()
                .rev()
                .find(|(at, _)| at - created_ops <= cut)
                .map_or(0, |&(_, v)| v);
            let mut got = vec![0u8; BLOCKS * BS];
            reopened.read(0, &mut got).unwrap();
            for b in 0..BLOCKS {
                let r = b * BS..(b + 1) * BS;
                // Each block holds a version at least as new as the flushed
                // one: never unwritten space (zeroes), never a lost flush.
                let ok = versions[must..]
                    .iter()
                    .any(|v| v[r.clone()] == got[r.clone()]);
                assert!(ok, "cut {cut} (unsynced kept: {how}): block {b} holds data no write at or after the last flush left there");
            }
        }
    }
    assert!(images > 300, "only {images} crash images");
    assert_eq!(base.bytes(), base_bytes, "the base was modified");
    assert!(base.log().is_empty(), "the base was written to");
}

#[test]
fn concurrent_first_writes_to_one_block_all_survive() {
    for round in 0..20u64 {
        let base = MemStore::with(vec![0x55; BLOCKS * BS]);
        let delta = Arc::new(Delta::create(MemStore::default(), base, BS as u32, "").unwrap());
        let threads = 8;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (delta, barrier) = (delta.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    // Each thread writes its own 512-byte slice of every block.
                    for b in 0..BLOCKS as u64 {
                        delta
                            .write(
                                b * BS as u64 + t as u64 * 512,
                                &[t as u8 + 1 + round as u8; 512],
                                false,
                            )
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        for b in 0..BLOCKS as u64 {
            let mut buf = vec![0u8; BS];
            delta.read(b * BS as u64, &mut buf).unwrap();
            for t in 0..threads {
                assert!(
                    buf[t * 512..(t + 1) * 512]
                        .iter()
                        .all(|&x| x == t as u8 + 1 + round as u8),
                    "round {round}: block {b} lost thread {t}'s write"
                );
            }
        }
        assert_eq!(delta.mapped_blocks(), BLOCKS as u64);
    }
}

#[test]
fn reads_racing_first_writes_see_old_or_new_never_a_mix() {
    let base = MemStore::with(vec![0xAA; BLOCKS * BS]);
    let delta = Arc::new(Delta::create(MemStore::default(), base, BS as u32, "").unwrap());
    let writer = {
        let delta = delta.clone();
        std::thread::spawn(move || {
            for b in 0..BLOCKS as u64 {
                delta.write(b * BS as u64, &[0xBB; BS], false).unwrap();
            }
        })
    };
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let delta = delta.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    for b in 0..BLOCKS as u64 {
                        let mut buf = vec![0u8; BS];
                        delta.read(b * BS as u64, &mut buf).unwrap();
                        let all = |v| buf.iter().all(|&x| x == v);
                        assert!(
                            all(0xAA) || all(0xBB),
                            "block {b} read a mix of old and new"
                        );
                    }
                }
            })
        })
        .collect();
    writer.join().unwrap();
    for r in readers {
        r.join().unwrap();
    }
}

#[test]
fn wrong_base_corrupt_and_truncated_deltas_are_refused() {
    let base = MemStore::with(pattern(5, BLOCKS * BS));
    let store = MemStore::default();
    let delta = Delta::create(store.clone(), base.clone(), BS as u32, "/b").unwrap();
    delta.write(0, &[9; BS], true).unwrap();
    let good = store.bytes();

    // A different base of the same size, a base that changed, one of another size.
    let other = MemStore::with(pattern(6, BLOCKS * BS));
    assert!(matches!(
        Delta::open(MemStore::with(good.clone()), other),
        Err(DeltaError::BaseDigest)
    ));
    let mut changed = pattern(5, BLOCKS * BS);
    changed[1234] ^= 1;
    assert!(matches!(
        Delta::open(MemStore::with(good.clone()), MemStore::with(changed)),
        Err(DeltaError::BaseDigest)
    ));
    assert!(matches!(
        Delta::open(MemStore::with(good.clone()), MemStore::with(vec![0; BS])),
        Err(DeltaError::BaseSize { .. })
    ));
    // A corrupt header, a truncated table, a table pointing past the end.
    let mut bad = good.clone();
    bad[20] ^= 0xff;
    let e = Delta::open(MemStore::with(bad), base.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("corrupt"), "{e}");
    let e = Delta::open(MemStore::with(good[..6000].to_vec()), base.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("truncated"), "{e}");
    let e = Delta::open(
        MemStore::with(good[..good.len() - 1].to_vec()),
        base.clone(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("past the end"), "{e}");
    let e = Delta::open(MemStore::with(vec![0; 100]), base.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("truncated"), "{e}");
    // Opening never writes: the delta and the base are as they were.
    let store2 = MemStore::with(good.clone());
    Delta::open(store2.clone(), base.clone()).unwrap();
    assert!(store2.log().is_empty() && base.log().is_empty());
}

#[test]
fn a_write_that_maps_a_block_is_durable_when_acknowledged() {
    // A server killed after acknowledging a first write must lose nothing:
    // the mapping is on disk before write() returns, with no FLUSH asked.
    let base = MemStore::with(pattern(11, BLOCKS * BS));
    let store = MemStore::default();
    let delta = Delta::create(store.clone(), base.clone(), BS as u32, "").unwrap();
    let start = store.bytes();
    let created = store.log().len();
    delta
        .write(3 * BS as u64 + 100, &[0x42; 300], false)
        .unwrap();
    let log = store.log()[created..].to_vec();
    // Drop everything unsynced: what a lost page cache would leave.
    let img = crash_image(&start, &log, log.len(), |_| false);
    let reopened = Delta::open(MemStore::with(img), base).unwrap();
    let mut buf = vec![0u8; 300];
    reopened.read(3 * BS as u64 + 100, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&x| x == 0x42),
        "an acknowledged first write was lost"
    );
}

#[test]
fn two_servers_share_one_delta() {
    use abuse_servers::cow::Cow;
    use abuse_servers::Backend;
    // Two opens of one delta behave like two server processes: their own
    // open files (flock and OFD locks are per open file), one shared
    // working area through the mapping.
    let dir = tempfile::tempdir().unwrap();
    let (base, delta) = (dir.path().join("base"), dir.path().join("delta"));
    std::fs::write(&base, vec![0x33u8; BLOCKS * BS]).unwrap();
    drop(Cow::create(&base, &delta, BS as u32).unwrap());
    let a = Arc::new(Cow::open(&delta, None).unwrap());
    let b = Arc::new(Cow::open(&delta, None).unwrap());
    assert!(
        Cow::open_exclusive(&delta, None).is_err(),
        "merge must be refused while servers run"
    );
    for round in 0..10u8 {
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8usize)
            .map(|t| {
                let cow = if t % 2 == 0 { a.clone() } else { b.clone() };
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    for blk in 0..BLOCKS as u64 {
                        let off = blk * BS as u64 + t as u64 * 512;
                        cow.write(off, &[round.wrapping_mul(8) + t as u8 + 1; 512], false)
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        for cow in [&a, &b] {
            for blk in 0..BLOCKS as u64 {
                let mut buf = vec![0u8; BS];
                cow.read(blk * BS as u64, &mut buf).unwrap();
                for t in 0..8 {
                    let want = round.wrapping_mul(8) + t as u8 + 1;
                    assert!(
                        buf[t * 512..(t + 1) * 512].iter().all(|&x| x == want),
                        "round {round}: block {blk} lost writer {t}"
                    );
                }
            }
        }
    }
    // Both see every block mapped once; after both stop, a fresh open (the
    // durable table) sees the same.
    assert_eq!(a.mapped_blocks(), BLOCKS as u64);
    assert_eq!(b.mapped_blocks(), BLOCKS as u64);
    drop((a, b));
    let c = Cow::open(&delta, None).unwrap();
    assert_eq!(c.mapped_blocks(), BLOCKS as u64);
    let mut buf = vec![0u8; BS];
    c.read(0, &mut buf).unwrap();
    assert!(buf[..512].iter().all(|&x| x == 9u8.wrapping_mul(8) + 1));
}

#[test]
fn an_interrupted_merge_is_refused_for_serving_and_finished_by_merge() {
    use abuse_servers::cow::format::{Header, FLAG_MERGING, PAGE};
    use abuse_servers::cow::Cow;
    use abuse_servers::Backend;
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let (base, delta) = (dir.path().join("base"), dir.path().join("delta"));
    let original = pattern(21, BLOCKS * BS);
    std::fs::write(&base, &original).unwrap();
    drop(Cow::create(&base, &delta, BS as u32).unwrap());
    let mut want = original.clone();
    {
        let cow = Cow::open(&delta, None).unwrap();
        for (i, blk) in [2usize, 7, 8, 19].iter().enumerate() {
            let data = pattern(100 + i as u64, 1000);
            cow.write((blk * BS + 300) as u64, &data, false).unwrap();
            want[blk * BS + 300..blk * BS + 1300].copy_from_slice(&data);
        }
        cow.flush().unwrap();
    }
    // A merge that died half way: the delta says so, and one of the four
    // blocks already reached the base.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&delta)
        .unwrap();
    let mut hb = [0u8; PAGE];
    f.read_exact_at(&mut hb, 0).unwrap();
    let mut h = Header::decode(&hb).unwrap();
    h.flags |= FLAG_MERGING;
    f.write_all_at(&h.encode(), 0).unwrap();
    drop(f);
    let b = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
    b.write_all_at(&want[7 * BS..8 * BS], (7 * BS) as u64)
        .unwrap();
    drop(b);

    let e = Cow::open(&delta, None)
        .err()
        .expect("served a half-merged delta")
        .to_string();
    assert!(e.contains("merge into the base was interrupted"), "{e}");
    let merged = Cow::open_exclusive(&delta, None)
        .unwrap()
        .merge(&delta)
        .unwrap();
    assert_eq!(merged, 4);
    assert_eq!(
        std::fs::read(&base).unwrap(),
        want,
        "the base does not hold the merged data"
    );
    let after = Cow::open(&delta, None).unwrap();
    assert_eq!(after.mapped_blocks(), 0);
    let mut got = vec![0u8; BLOCKS * BS];
    after.read(0, &mut got).unwrap();
    assert_eq!(got, want);
}
