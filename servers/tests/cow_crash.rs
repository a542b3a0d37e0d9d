//! Crash consistency of the cow delta. The write stream to the delta is
//! cut at every point; of the writes not yet synced, a crash may persist
//! none, all, any one, all but one, or tear one at a sector boundary; the
//! delta reopened from what is left must hold every write acknowledged
//! before the last completed FLUSH, never show unwritten space, and never
//! take damage for a torn write (or a torn write for damage).

mod common;
use common::pattern;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};

use abuse_servers::cow::delta::{Delta, DeltaError};
use abuse_servers::cow::format::{FormatError, Header, ENTRIES_PER_PAGE, PAGE};
use abuse_servers::cow::storage::{Shared, Storage};

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Sync,
}

/// A sync that waits: it tells `entered` and blocks until `release`.
struct Gate {
    entered: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
}

/// An in-memory file that logs every write and sync; syncs can be made to
/// fail or to wait at a gate.
#[derive(Clone, Default)]
struct MemStore {
    inner: Arc<Mutex<(Vec<u8>, Vec<Op>)>>,
    /// When set to n + 1: the sync after n more successful ones fails.
    fail_sync: Arc<AtomicU32>,
    /// The next write fails (after the delta block was taken).
    fail_write: Arc<AtomicU32>,
    /// Linux's semantics for a failed sync: the writes it did not make
    /// durable are gone (their pages dropped), and the next sync succeeds
    /// without them. Unset: a failed sync keeps them (some may have landed).
    drop_on_failed_sync: Arc<AtomicU32>,
    /// What the store held before its first logged write.
    initial: Arc<Vec<u8>>,
    gate: Arc<Mutex<Option<Gate>>>,
}

impl MemStore {
    fn with(data: Vec<u8>) -> Self {
        MemStore {
            initial: Arc::new(data.clone()),
            inner: Arc::new(Mutex::new((data, Vec::new()))),
            ..Default::default()
        }
    }
    fn log(&self) -> Vec<Op> {
        self.inner.lock().unwrap().1.clone()
    }
    fn bytes(&self) -> Vec<u8> {
        self.inner.lock().unwrap().0.clone()
    }
    /// A failed sync drops every write since the last good one.
    fn linux_semantics(&self) {
        self.drop_on_failed_sync.store(1, Ordering::SeqCst);
    }
    /// Makes the sync after `skip` successful ones fail.
    fn fail_sync_after(&self, skip: u32) {
        self.fail_sync.store(skip + 1, Ordering::SeqCst);
    }
    /// What survives a crash now if nothing unsynced reaches the disk.
    fn synced_image(&self, start: &[u8], from: usize) -> Vec<u8> {
        let log = self.log()[from..].to_vec();
        crash_image(start, &log, log.len(), &|_| Apply::None)
    }
}

impl Storage for MemStore {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let g = self.inner.lock().unwrap();
        let have = g.0.len().saturating_sub(offset as usize).min(buf.len());
        if have > 0 {
            buf[..have].copy_from_slice(&g.0[offset as usize..offset as usize + have]);
        }
        buf[have..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.fail_write.swap(0, Ordering::SeqCst) == 1 {
            return Err(io::Error::from_raw_os_error(28));
        }
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
        let gate = self.gate.lock().unwrap().take();
        if let Some(g) = gate {
            g.entered.send(()).unwrap();
            g.release.recv().unwrap();
        }
        let armed = self.fail_sync.load(Ordering::SeqCst);
        if armed > 0 {
            self.fail_sync.store(armed - 1, Ordering::SeqCst);
        }
        if armed == 1 {
            // A failed sync: what it covered may or may not be on disk, so
            // it is not logged as a durability point.
            if self.drop_on_failed_sync.load(Ordering::SeqCst) == 1 {
                // Linux: the unsynced writes are gone for good: the store
                // reads what the last good sync left, and they are
                // forgotten.
                let mut g = self.inner.lock().unwrap();
                let from =
                    g.1.iter()
                        .rposition(|o| matches!(o, Op::Sync))
                        .map_or(0, |i| i + 1);
                g.1.truncate(from);
                let len = g.0.len();
                g.0 = crash_image(&self.initial, &g.1, g.1.len(), &|_| Apply::None);
                g.0.resize(len, 0);
            }
            return Err(io::Error::from_raw_os_error(5));
        }
        self.inner.lock().unwrap().1.push(Op::Sync);
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.inner.lock().unwrap().0.len() as u64)
    }
}

impl Shared for MemStore {}

/// What a crash did to one unsynced write.
#[derive(Clone, Copy, Debug)]
enum Apply {
    None,
    Full,
    /// Only its first `n` bytes (a whole number of sectors) landed.
    Prefix(usize),
}

/// The delta as a crash after `cut` ops leaves it: every synced write
/// applied, and the unsynced tail as `plan` (by position in the tail) says.
fn crash_image(start: &[u8], log: &[Op], cut: usize, plan: &dyn Fn(usize) -> Apply) -> Vec<u8> {
    let last_sync = log[..cut]
        .iter()
        .rposition(|o| matches!(o, Op::Sync))
        .map_or(0, |i| i + 1);
    let mut img = start.to_vec();
    for (i, op) in log[..cut].iter().enumerate() {
        if let Op::Write(off, data) = op {
            let n = if i < last_sync {
                data.len()
            } else {
                match plan(i - last_sync) {
                    Apply::None => continue,
                    Apply::Full => data.len(),
                    Apply::Prefix(n) => n.min(data.len()),
                }
            };
            let end = *off as usize + n;
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*off as usize..end].copy_from_slice(&data[..n]);
        }
    }
    img
}

type Plan = Box<dyn Fn(usize) -> Apply>;

/// The ways the unsynced tail (`writes`: its ops' lengths, None for a
/// sync) may land: none, all, each write alone, all but each, and each
/// torn after its first and its last-but-one sector, alone or with all the
/// others.
fn tail_variants(lens: &[Option<usize>]) -> Vec<(String, Plan)> {
    let mut v: Vec<(String, Plan)> = vec![
        ("none".into(), Box::new(|_| Apply::None)),
        ("all".into(), Box::new(|_| Apply::Full)),
    ];
    for (k, len) in lens.iter().enumerate() {
        let Some(len) = *len else { continue };
        v.push((
            format!("only #{k}"),
            Box::new(move |i| if i == k { Apply::Full } else { Apply::None }),
        ));
        v.push((
            format!("all but #{k}"),
            Box::new(move |i| if i == k { Apply::None } else { Apply::Full }),
        ));
        if len > 512 {
            for cut in [512, len - 512] {
                v.push((
                    format!("#{k} torn at {cut}"),
                    Box::new(move |i| {
                        if i == k {
                            Apply::Prefix(cut)
                        } else {
                            Apply::None
                        }
                    }),
                ));
                v.push((
                    format!("all, #{k} torn at {cut}"),
                    Box::new(move |i| {
                        if i == k {
                            Apply::Prefix(cut)
                        } else {
                            Apply::Full
                        }
                    }),
                ));
            }
        }
    }
    v
}

const BS: usize = 4096;

fn no_progress() -> &'static (dyn Fn(u64) + Sync) {
    &|_| {}
}

fn create(base: &MemStore) -> (MemStore, Delta<MemStore, MemStore>) {
    let store = MemStore::default();
    let d = Delta::create(
        store.clone(),
        base.clone(),
        BS as u32,
        "/base",
        no_progress(),
    )
    .unwrap();
    (store, d)
}

/// One step of a workload.
enum Step {
    Write(u64, Vec<u8>),
    Zeroes(u64, u64),
    Flush,
}

/// Writes over a table of three pages: whole blocks, partial blocks,
/// writes across two blocks, rewrites, zeroed ranges, and flushes that
/// commit several pages at once.
fn workload(blocks: u64) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut seed = 1;
    let page = ENTRIES_PER_PAGE as u64;
    for round in 0..5u64 {
        for i in 0..6u64 {
            // Spread over the pages; some blocks come back (rewrites).
            let block = ((i % 3) * page + round * 7 + (i / 3) * 3) % (blocks - 1);
            let at = block * BS as u64;
            let step = match (i + round) % 4 {
                0 => Step::Write(at, pattern(seed, BS)),
                1 => Step::Write(at + 512, pattern(seed, 1024)),
                2 => Step::Write(at + BS as u64 - 512, pattern(seed, 1536)),
                _ if round % 2 == 1 => Step::Zeroes(at, BS as u64),
                _ => Step::Write(at, pattern(seed, 2048)),
            };
            seed += 1;
            steps.push(step);
        }
        if round != 2 {
            steps.push(Step::Flush);
        }
    }
    steps
}

#[test]
fn every_crash_point_is_consistent() {
    // Every flush goes to the journal.
    every_crash_point(None, 1500);
}

#[test]
fn every_crash_point_is_consistent_across_checkpoints() {
    // Flushes alternate between the journal and checkpoints (into the
    // table's slots, as every flush of a version 2 delta does).
    every_crash_point(Some(2), 2000);
}

fn every_crash_point(journal_limit: Option<u32>, min_images: usize) {
    // Three table pages.
    let blocks = 2 * ENTRIES_PER_PAGE + 40;
    let base_bytes = pattern(999, blocks * BS);
    let base = MemStore::with(base_bytes.clone());
    let (store, mut delta) = create(&base);
    if let Some(limit) = journal_limit {
        delta.limit_journal(limit);
    }
    assert_eq!(delta.header().table_pages, 3);
    let start = store.bytes();
    let created = store.log().len();

    // Run the workload, remembering the device's contents after each step
    // and where in the log each flush completed.
    let mut model = base_bytes.clone();
    let mut versions = vec![model.clone()];
    let mut flushed: Vec<(usize, usize)> = Vec::new(); // (log len after flush, version)
    let mut touched = std::collections::BTreeSet::new();
    for step in workload(blocks as u64) {
        match step {
            Step::Write(off, data) => {
                delta.write(off, &data, false).unwrap();
                model[off as usize..off as usize + data.len()].copy_from_slice(&data);
                touched.extend([off as usize / BS, (off as usize + data.len() - 1) / BS]);
                versions.push(model.clone());
            }
            Step::Zeroes(off, len) => {
                delta.write_zeroes(off, len, true).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
                touched.insert(off as usize / BS);
                versions.push(model.clone());
            }
            Step::Flush => {
                delta.flush().unwrap();
                flushed.push((store.log().len() - created, versions.len() - 1));
            }
        }
    }
    let log = store.log()[created..].to_vec();
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
        let lens: Vec<Option<usize>> = log[last_sync..cut]
            .iter()
            .map(|o| match o {
                Op::Write(_, d) => Some(d.len()),
                Op::Sync => None,
            })
            .collect();
        for (how, plan) in tail_variants(&lens) {
            let img = crash_image(&start, &log, cut, &*plan);
            images += 1;
            let reopened = Delta::open(MemStore::with(img), base.clone())
                .unwrap_or_else(|e| panic!("cut {cut} ({how}): reopen failed: {e}"));
            // The last flush that completed before the cut.
            let must = flushed
                .iter()
                .rev()
                .find(|(at, _)| *at <= cut)
                .map_or(0, |&(_, v)| v);
            for &b in &touched {
                let mut got = vec![0u8; BS];
                reopened.read((b * BS) as u64, &mut got).unwrap();
                // Each sector holds what a write at or after the last flush
                // left there: never unwritten space, never a lost flush (an
                // unflushed rewrite may land in part, as on any disk).
                for s in 0..BS / 512 {
                    let r = b * BS + s * 512..b * BS + (s + 1) * 512;
                    let ok = versions[must..]
                        .iter()
                        .any(|v| v[r.clone()] == got[s * 512..(s + 1) * 512]);
                    assert!(ok, "cut {cut} ({how}): block {b} sector {s} holds data no write at or after the last flush left there");
                }
            }
        }
    }
    eprintln!("{images} crash images checked");
    assert!(images > min_images, "only {images} crash images");
    assert_eq!(base.bytes(), base_bytes, "the base was modified");
    assert!(base.log().is_empty(), "the base was written to");
}

/// Writes a whole block of `pattern(seed)` at block `b`, in `model` too.
fn put(d: &Delta<MemStore, MemStore>, model: &mut [u8], b: usize, seed: u64) {
    let data = pattern(seed, BS);
    d.write((b * BS) as u64, &data, false).unwrap();
    model[b * BS..(b + 1) * BS].copy_from_slice(&data);
}

/// Whether the device reads `model` in every block of `blocks`.
fn reads_as(d: &Delta<MemStore, MemStore>, model: &[u8], blocks: &[usize]) -> bool {
    blocks.iter().all(|&b| {
        let mut got = vec![0u8; BS];
        d.read((b * BS) as u64, &mut got).unwrap();
        got == model[b * BS..(b + 1) * BS]
    })
}

/// A power cut during a checkpoint, after some of its table slots reached
/// the disk and before its commit record did, left slots with the sequence
/// the next flush then took again: once that flush committed, the stale
/// slots counted as committed versions of their pages, and every later
/// open failed (table corrupt). The checkpoint is cut at every point; the
/// delta reopened from each image keeps being written and flushed (a
/// checkpoint of one page, journal flushes, a checkpoint of them all),
/// and reopens after each flush with every flushed write.
#[test]
fn a_power_cut_during_a_checkpoint_never_makes_the_delta_unopenable() {
    use abuse_servers::cow::format::decode_page;
    let blocks = 2 * ENTRIES_PER_PAGE + 40;
    let page = ENTRIES_PER_PAGE;
    let base_bytes = pattern(31, blocks * BS);
    let base = MemStore::with(base_bytes.clone());
    let (store, mut delta) = create(&base);
    let h = delta.header().clone();
    assert_eq!(h.table_pages, 3);
    // One journal page: a flush journals, the next one checkpoints.
    delta.limit_journal(1);
    let start = store.bytes();
    let created = store.log().len();
    let mut model = base_bytes.clone();
    put(&delta, &mut model, 1, 1);
    delta.flush().unwrap(); // journal: page 0
    let journaled = model.clone();
    put(&delta, &mut model, page + 1, 2);
    put(&delta, &mut model, 2 * page + 1, 3);
    put(&delta, &mut model, 2, 4);
    let before = store.log().len() - created;
    delta.flush().unwrap(); // checkpoint: pages 0, 1 and 2
    let checkpointed = model.clone();
    let log = store.log()[created..].to_vec();
    assert!(
        log[before..]
            .iter()
            .any(|o| matches!(o, Op::Write(off, _) if *off == h.slot_offset(1, 0))),
        "the second flush was not a checkpoint"
    );
    let touched = [1, 2, page + 1, 2 * page + 1];
    let (mut images, mut stale) = (0, 0);
    for cut in before..=log.len() {
        let last_sync = log[..cut]
            .iter()
            .rposition(|o| matches!(o, Op::Sync))
            .map_or(0, |i| i + 1);
        let lens: Vec<Option<usize>> = log[last_sync..cut]
            .iter()
            .map(|o| match o {
                Op::Write(_, d) => Some(d.len()),
                Op::Sync => None,
            })
            .collect();
        for (how, plan) in tail_variants(&lens) {
            let img = crash_image(&start, &log, cut, &*plan);
            images += 1;
            // A slot the uncommitted checkpoint left behind.
            let slot = h.slot_offset(1, 0) as usize;
            let left = img.len() >= slot + PAGE
                && decode_page(img[slot..slot + PAGE].try_into().unwrap(), 1).is_some();
            let s2 = MemStore::with(img);
            let mut d = Delta::open(s2.clone(), base.clone())
                .unwrap_or_else(|e| panic!("cut {cut} ({how}): reopen failed: {e}"));
            d.limit_journal(1);
            // The checkpoint committed, or not: all of it or none.
            let mut m = if reads_as(&d, &checkpointed, &touched) {
                checkpointed.clone()
            } else {
                assert!(
                    reads_as(&d, &journaled, &touched),
                    "cut {cut} ({how}): neither the first flush nor the second"
                );
                stale += left as usize;
                journaled.clone()
            };
            // Then a checkpoint of page 0 alone (or a journal flush), and
            // more of both.
            let steps: [&[usize]; 4] = [&[3], &[page + 2], &[2 * page + 2, 4], &[5, page + 3]];
            let mut seen = touched.to_vec();
            for (i, step) in steps.iter().enumerate() {
                for (j, &b) in step.iter().enumerate() {
                    put(&d, &mut m, b, 100 + 10 * i as u64 + j as u64);
                }
                d.flush()
                    .unwrap_or_else(|e| panic!("cut {cut} ({how}): flush {i}: {e}"));
                seen.extend_from_slice(step);
                let again =
                    Delta::open(MemStore::with(s2.bytes()), base.clone()).unwrap_or_else(|e| {
                        panic!("cut {cut} ({how}): reopen after flush {i} failed: {e}")
                    });
                assert!(
                    reads_as(&again, &m, &seen),
                    "cut {cut} ({how}): flush {i}: a flushed write is not there"
                );
            }
        }
    }
    eprintln!("{images} crash images, {stale} with a slot of the uncommitted checkpoint");
    assert!(
        stale > 0,
        "no image kept a slot of the uncommitted checkpoint"
    );
}

/// The race the first version lost writes to: a first write publishes its
/// mapping; a second write to the same block goes in place and is
/// acknowledged; FLUSH is acknowledged. A flush held inside its sync while
/// other writers map and rewrite blocks must not let any of it slip: after
/// the last FLUSH returns, a crash that loses everything unsynced keeps
/// every acknowledged write.
#[test]
fn acknowledged_writes_survive_flushes_racing_first_writes() {
    let blocks = ENTRIES_PER_PAGE + 10;
    let base = MemStore::with(pattern(3, blocks * BS));
    let (store, delta) = create(&base);
    let delta = Arc::new(delta);
    let start = store.bytes();
    let created = store.log().len();
    let mut model = base.bytes();
    // Something to flush, so the held flush snapshots a dirty page.
    delta.write(0, &pattern(10, BS), false).unwrap();
    model[..BS].copy_from_slice(&pattern(10, BS));
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    *store.gate.lock().unwrap() = Some(Gate {
        entered: entered_tx,
        release: release_rx,
    });
    let held = {
        let d = delta.clone();
        std::thread::spawn(move || d.flush().unwrap())
    };
    entered.recv().unwrap(); // the first flush is inside its data sync
                             // Meanwhile: first writes in the held flush's page and in another, and
                             // in-place rewrites of them, all acknowledged.
    let mut writes = vec![
        (1usize, pattern(11, BS)),
        (ENTRIES_PER_PAGE + 3, pattern(12, 512)),
    ];
    writes.push((1, pattern(13, 1024)));
    writes.push((ENTRIES_PER_PAGE + 3, pattern(14, BS)));
    for (b, data) in &writes {
        delta.write((b * BS) as u64, data, false).unwrap();
        model[b * BS..b * BS + data.len()].copy_from_slice(data);
    }
    let second = {
        let d = delta.clone();
        std::thread::spawn(move || d.flush().unwrap())
    };
    release.send(()).unwrap();
    held.join().unwrap();
    second.join().unwrap();
    let img = store.synced_image(&start, created);
    let reopened = Delta::open(MemStore::with(img), base.clone()).unwrap();
    for b in [0, 1, ENTRIES_PER_PAGE + 3] {
        let mut got = vec![0u8; BS];
        reopened.read((b * BS) as u64, &mut got).unwrap();
        assert_eq!(
            got,
            model[b * BS..(b + 1) * BS],
            "block {b}: an acknowledged, flushed write was lost"
        );
    }
}

/// Linux drops the pages a failed writeback could not write and marks them
/// clean: the next fsync succeeds without them. So after a failed sync
/// every later flush fails (a success would vouch for writes that are
/// gone), until the delta is reopened, which finds it consistent.
#[test]
fn a_failed_sync_fails_every_later_flush_until_reopened() {
    let blocks = 40;
    let base = MemStore::with(pattern(4, blocks * BS));
    // Each of a committing flush's two syncs (data and pages, commit).
    for skip in 0..2 {
        let (store, delta) = create(&base);
        store.linux_semantics();
        let start = store.bytes();
        let created = store.log().len();
        for b in 0..4u64 {
            delta
                .write(b * BS as u64 + 100, &pattern(b + 50, 700), false)
                .unwrap();
        }
        store.fail_sync_after(skip);
        assert!(
            delta.flush().is_err(),
            "a flush whose sync #{skip} failed succeeded"
        );
        delta
            .write(10 * BS as u64, &pattern(99, 512), false)
            .unwrap();
        assert!(
            delta.flush().is_err(),
            "sync #{skip} failed, its writes were dropped, and a later flush succeeded"
        );
        drop(delta);
        // A new server: a consistent delta, every block as the last good
        // commit left it (none of these was committed), and working again.
        let reopened = Delta::open(
            MemStore::with(store.synced_image(&start, created)),
            base.clone(),
        )
        .unwrap();
        for b in 0..4u64 {
            let mut got = vec![0u8; 700];
            reopened.read(b * BS as u64 + 100, &mut got).unwrap();
            let at = (b * BS as u64 + 100) as usize;
            assert_eq!(got, pattern(4, blocks * BS)[at..at + 700], "block {b}");
        }
        reopened.write(0, &pattern(7, 512), false).unwrap();
        reopened.flush().unwrap();
    }
}

/// A flush whose commit record was written but whose last sync failed (as
/// one that died there) may have committed: the next flush must take that
/// record as the last commit and write after it, never over what it named
/// (its records, its commit slot), which a crash could then tear.
#[test]
fn a_flush_after_one_that_failed_past_its_commit_record_writes_after_it() {
    let blocks = 40;
    let base = MemStore::with(pattern(5, blocks * BS));
    let (store, mut delta) = create(&base);
    let writes = |from: usize| -> Vec<(u64, u64)> {
        store.log()[from..]
            .iter()
            .filter_map(|o| match o {
                Op::Write(off, d) => Some((*off, *off + d.len() as u64)),
                Op::Sync => None,
            })
            .collect()
    };
    for round in 0..3u64 {
        for b in 0..3 {
            let at = (round * 3 + b) * BS as u64;
            delta.write(at, &pattern(at, BS), false).unwrap();
        }
        let before = store.log().len();
        // The data sync passes, the one after the commit record fails.
        store.fail_sync_after(1);
        assert!(delta.flush().is_err());
        let failed = writes(before);
        assert!(!failed.is_empty(), "the failed flush wrote nothing");
        // This server's flushes fail from now on; the next server opens
        // the delta as the failed flush left it (all of it landed).
        drop(delta);
        delta = Delta::open(store.clone(), base.clone()).unwrap();
        delta.write(0, &pattern(100 + round, 512), false).unwrap();
        let before = store.log().len();
        delta.flush().unwrap();
        for (s, e) in writes(before) {
            assert!(
                failed.iter().all(|&(fs, fe)| e <= fs || s >= fe),
                "round {round}: the next flush wrote {s}..{e} over what the failed one may have committed"
            );
        }
    }
}

/// `image` with the writes of `log` applied up to the one at `at`, of which
/// only the first `keep` bytes land: a crash tearing that write.
fn torn_at(image: &[u8], log: &[Op], at: u64, keep: usize) -> Vec<u8> {
    let mut torn = image.to_vec();
    for op in log {
        if let Op::Write(off, data) = op {
            let off = *off as usize;
            if off as u64 == at {
                torn[off..off + keep].copy_from_slice(&data[..keep]);
                break;
            }
            if torn.len() < off + data.len() {
                torn.resize(off + data.len(), 0);
            }
            torn[off..off + data.len()].copy_from_slice(data);
        }
    }
    torn
}

/// Damage to a committed table page or to a commit record is refused; a
/// page torn by a flush that never committed is not damage.
#[test]
fn damage_is_refused_and_tearing_is_not_damage() {
    let blocks = 40;
    let base = MemStore::with(pattern(5, blocks * BS));
    let (store, mut delta) = create(&base);
    delta.limit_journal(0);
    delta.write(0, &pattern(6, BS), false).unwrap();
    delta.flush().unwrap();
    delta.write(BS as u64, &pattern(7, BS), false).unwrap();
    delta.flush().unwrap();
    let good = store.bytes();
    let h = delta.header().clone();
    assert!(Delta::open(MemStore::with(good.clone()), base.clone()).is_ok());
    // Page 0 went to slot A (flush 1), then slot B (flush 2): B is the
    // committed version, A the previous one.
    let slot = |s: u32| h.slot_offset(0, s) as usize;
    for (what, at, want_ok) in [
        ("a byte of the committed slot", slot(1) + 100, false),
        ("a byte of the older slot", slot(0) + 100, true),
        ("the commit record", 4096 + 8, false),
        ("the older commit record", 8192 + 20, false),
    ] {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        let r = Delta::open(MemStore::with(bad), base.clone());
        assert_eq!(
            r.is_ok(),
            want_ok,
            "{what}: {:?}",
            r.err().map(|e| e.to_string())
        );
        if let Err(e) = r {
            let msg = e.to_string();
            assert!(msg.contains("corrupt"), "{what}: {msg}");
        }
    }
    // A third flush torn in its page write (so never committed): the
    // second flush's state, no error.
    delta.write(2 * BS as u64, &pattern(8, BS), false).unwrap();
    let before = store.log().len();
    delta.flush().unwrap();
    let torn = torn_at(&good, &store.log()[before..], h.slot_offset(0, 0), 2048);
    let reopened = Delta::open(MemStore::with(torn), base.clone())
        .expect("a torn, uncommitted page is not damage");
    let mut got = vec![0u8; BS];
    reopened.read(BS as u64, &mut got).unwrap();
    assert_eq!(got, pattern(7, BS));
}

/// The same for the journal: damage to a journal page a commit counts is
/// refused, even where a later copy of the page exists; a journal page
/// torn by a flush that never committed is not damage.
#[test]
fn journal_damage_is_refused_and_tearing_is_not_damage() {
    let blocks = 40;
    let base = MemStore::with(pattern(5, blocks * BS));
    let (store, delta) = create(&base);
    delta.write(0, &pattern(6, BS), false).unwrap();
    delta.flush().unwrap();
    delta.write(BS as u64, &pattern(7, BS), false).unwrap();
    delta.flush().unwrap();
    let good = store.bytes();
    let h = delta.header().clone();
    // Page 0 went to journal page 0 (flush 1), then journal page 1.
    let jp = |i: u32| h.journal_offset(i) as usize;
    for (what, at) in [
        ("the committed copy", jp(1) + 100),
        ("the superseded copy", jp(0) + 100),
    ] {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        let msg = Delta::open(MemStore::with(bad), base.clone())
            .err()
            .unwrap_or_else(|| panic!("{what}: damage accepted"))
            .to_string();
        assert!(msg.contains("corrupt"), "{what}: {msg}");
    }
    // Past the committed journal: ignored.
    let mut past = good.clone();
    past[jp(2) + 100] ^= 0x40;
    assert!(Delta::open(MemStore::with(past), base.clone()).is_ok());
    // A third flush torn in its journal write: the second flush's state.
    delta.write(2 * BS as u64, &pattern(8, BS), false).unwrap();
    let before = store.log().len();
    delta.flush().unwrap();
    let torn = torn_at(&good, &store.log()[before..], jp(2) as u64, 1536);
    let reopened = Delta::open(MemStore::with(torn), base.clone())
        .expect("a torn, uncommitted journal page is not damage");
    let mut got = vec![0u8; BS];
    reopened.read(BS as u64, &mut got).unwrap();
    assert_eq!(got, pattern(7, BS));
    reopened.read(2 * BS as u64, &mut got).unwrap();
    assert_eq!(
        got,
        pattern(5, blocks * BS)[2 * BS..3 * BS],
        "the torn flush's write"
    );
}

/// A flush journals its new mappings as records, several pages of them in
/// one write when there are many, and writes no table page until a
/// checkpoint; the records are the committed table when reopened.
#[test]
fn a_flush_journals_its_mappings_in_one_write_and_no_table_page() {
    use abuse_servers::cow::format::{decode_records, RECORDS_PER_PAGE};
    let blocks = 2 * ENTRIES_PER_PAGE + 40;
    let base = MemStore::with(pattern(5, blocks * BS));
    let (store, delta) = create(&base);
    let n = 2 * RECORDS_PER_PAGE + 10;
    for b in 0..n {
        let at = (b * 17 % blocks) * BS + 512;
        delta
            .write(at as u64, &pattern(b as u64, 512), false)
            .unwrap();
    }
    let before = store.log().len();
    delta.flush().unwrap();
    let h = delta.header().clone();
    let (journal, table) = (h.journal_offset(0), h.slot_offset(0, 0));
    let writes: Vec<(u64, usize)> = store.log()[before..]
        .iter()
        .filter_map(|o| match o {
            Op::Write(off, d) if *off >= PAGE as u64 && *off < h.data_offset => {
                Some((*off, d.len()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        writes,
        vec![
            (journal, 3 * PAGE),
            (abuse_servers::cow::format::Commit::slot(1), PAGE)
        ],
        "one journal write of three pages, then the commit record"
    );
    assert!(writes.iter().all(|&(off, _)| off < table));
    let img = store.bytes();
    let mut recs = 0;
    for i in 0..3 {
        let at = journal as usize + i * PAGE;
        let (seq, r) = decode_records(img[at..at + PAGE].try_into().unwrap()).unwrap();
        assert_eq!(seq, 1);
        recs += r.len();
    }
    assert_eq!(recs, n);
    let reopened = Delta::open(MemStore::with(img), base.clone()).unwrap();
    assert_eq!(reopened.mapped_blocks(), n as u64);
    let mut got = vec![0u8; 512];
    for b in 0..n {
        let at = (b * 17 % blocks) * BS + 512;
        reopened.read(at as u64, &mut got).unwrap();
        assert_eq!(got, pattern(b as u64, 512), "block {}", b * 17 % blocks);
    }
}

/// A version 3 delta (a journal of whole pages, the same layout) is still
/// served: its flushes journal the pages, and it reopens with them.
#[test]
fn a_version_3_delta_is_still_served() {
    use abuse_servers::cow::format::{decode_any_page, decode_records};
    let blocks = 40;
    let base = MemStore::with(pattern(5, blocks * BS));
    let (_, v4) = create(&base);
    let mut h = v4.header().clone();
    h.version = 3;
    let mut img = vec![0u8; h.data_offset as usize];
    img[..PAGE].copy_from_slice(&h.encode());
    let store = MemStore::with(img);
    let d = Delta::open(store.clone(), base.clone()).expect("a version 3 delta");
    d.write(3 * BS as u64 + 100, &pattern(9, 500), false)
        .unwrap();
    d.flush().unwrap();
    let img = store.bytes();
    let jp: &[u8; PAGE] = img[h.journal_offset(0) as usize..][..PAGE]
        .try_into()
        .unwrap();
    assert!(
        decode_records(jp).is_none(),
        "records in a version 3 journal"
    );
    let (seq, page, entries) = decode_any_page(jp).expect("a page in the journal");
    assert_eq!((seq, page), (1, 0));
    assert_ne!(entries[3], 0);
    let d = Delta::open(MemStore::with(img), base.clone()).unwrap();
    let mut got = vec![0u8; 500];
    d.read(3 * BS as u64 + 100, &mut got).unwrap();
    assert_eq!(got, pattern(9, 500));
}

#[test]
fn discard_and_write_zeroes_read_zero_and_stay_after_a_flush() {
    let blocks = 16;
    let base = MemStore::with(pattern(9, blocks * BS));
    let (store, delta) = create(&base);
    let start = store.bytes();
    let created = store.log().len();
    delta.write(2 * BS as u64, &pattern(1, BS), false).unwrap();
    // Mapped whole block, unmapped whole block, partial ranges, unmap or not.
    delta.write_zeroes(2 * BS as u64, BS as u64, true).unwrap();
    delta.write_zeroes(3 * BS as u64, BS as u64, true).unwrap();
    delta.write_zeroes(5 * BS as u64 + 512, 1024, true).unwrap();
    delta
        .write_zeroes(6 * BS as u64, 2 * BS as u64, false)
        .unwrap();
    delta.flush().unwrap();
    let base_bytes = base.bytes();
    for d in [
        &delta,
        &Delta::open(
            MemStore::with(store.synced_image(&start, created)),
            base.clone(),
        )
        .unwrap(),
    ] {
        let mut got = vec![0u8; blocks * BS];
        d.read(0, &mut got).unwrap();
        let zero = |r: std::ops::Range<usize>| got[r].iter().all(|&x| x == 0);
        assert!(
            zero(2 * BS..4 * BS) && zero(6 * BS..8 * BS),
            "zeroed blocks do not read zero"
        );
        assert!(zero(5 * BS + 512..5 * BS + 1536));
        assert_eq!(got[5 * BS..5 * BS + 512], base_bytes[5 * BS..5 * BS + 512]);
        assert_eq!(
            got[4 * BS..5 * BS],
            base_bytes[4 * BS..5 * BS],
            "a neighbour changed"
        );
    }
}

/// A delta block taken by a first write that never mapped it (the write
/// failed, or its server was killed in between) is lost, and nothing else:
/// every block of the device can still be written.
#[test]
fn a_leaked_delta_block_does_not_fill_the_delta() {
    let blocks = 20;
    let base = MemStore::with(pattern(8, blocks * BS));
    let (store, delta) = create(&base);
    for b in [3, 9] {
        store.fail_write.store(1, Ordering::SeqCst);
        assert!(delta
            .write((b * BS) as u64, &pattern(1, BS), false)
            .is_err());
    }
    for b in 0..blocks {
        delta
            .write((b * BS) as u64 + 8, &pattern(b as u64 + 100, 100), false)
            .unwrap();
    }
    delta.flush().unwrap();
    assert_eq!(delta.mapped_blocks(), blocks as u64);
    let reopened = Delta::open(MemStore::with(store.bytes()), base.clone()).unwrap();
    for b in 0..blocks {
        let mut got = vec![0u8; 100];
        reopened.read((b * BS) as u64 + 8, &mut got).unwrap();
        assert_eq!(got, pattern(b as u64 + 100, 100), "block {b}");
    }
}

#[test]
fn concurrent_first_writes_to_one_block_all_survive() {
    let blocks = 24;
    for round in 0..20u64 {
        let base = MemStore::with(vec![0x55; blocks * BS]);
        let (_, delta) = create(&base);
        let delta = Arc::new(delta);
        let threads = 8;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (delta, barrier) = (delta.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    // Each thread writes its own 512-byte slice of every block.
                    for b in 0..blocks as u64 {
                        let data = [t as u8 + 1 + round as u8; 512];
                        delta
                            .write(b * BS as u64 + t as u64 * 512, &data, false)
                            .unwrap();
                        if b % 7 == t as u64 {
                            delta.flush().unwrap();
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        for b in 0..blocks as u64 {
            let mut buf = vec![0u8; BS];
            delta.read(b * BS as u64, &mut buf).unwrap();
            for t in 0..threads {
                let want = t as u8 + 1 + round as u8;
                assert!(
                    buf[t * 512..(t + 1) * 512].iter().all(|&x| x == want),
                    "round {round}: block {b} lost thread {t}'s write"
                );
            }
        }
        assert_eq!(delta.mapped_blocks(), blocks as u64);
    }
}

#[test]
fn reads_racing_first_writes_see_old_or_new_never_a_mix() {
    let blocks = 24;
    let base = MemStore::with(vec![0xAA; blocks * BS]);
    let (_, delta) = create(&base);
    let delta = Arc::new(delta);
    let writer = {
        let delta = delta.clone();
        std::thread::spawn(move || {
            for b in 0..blocks as u64 {
                delta.write(b * BS as u64, &[0xBB; BS], false).unwrap();
            }
        })
    };
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let delta = delta.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    for b in 0..blocks as u64 {
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
    let blocks = 24;
    let base = MemStore::with(pattern(5, blocks * BS));
    let (store, delta) = create(&base);
    delta.write(0, &[9; BS], true).unwrap();
    let good = store.bytes();

    // A different base of the same size, a base that changed, one of another size.
    let other = MemStore::with(pattern(6, blocks * BS));
    assert!(matches!(
        Delta::open(MemStore::with(good.clone()), other),
        Err(DeltaError::BaseDigest)
    ));
    let mut changed = pattern(5, blocks * BS);
    changed[1234] ^= 1;
    assert!(matches!(
        Delta::open(MemStore::with(good.clone()), MemStore::with(changed)),
        Err(DeltaError::BaseDigest)
    ));
    assert!(matches!(
        Delta::open(MemStore::with(good.clone()), MemStore::with(vec![0; BS])),
        Err(DeltaError::BaseSize { .. })
    ));
    let err = |img: Vec<u8>| {
        Delta::open(MemStore::with(img), base.clone())
            .err()
            .unwrap()
            .to_string()
    };
    let mut bad = good.clone();
    bad[20] ^= 0xff;
    assert!(err(bad).contains("corrupt"));
    assert!(err(good[..6000].to_vec()).contains("truncated"));
    // Cut inside the block the write took (the file grows by a chunk of
    // zeroes past it, so it is not the file's end).
    let h = Header::decode(good[..4096].try_into().unwrap()).unwrap();
    let cut = (h.data_offset + BS as u64 - 1) as usize;
    assert!(good.len() > cut + BS);
    assert!(err(good[..cut].to_vec()).contains("outside the delta's data area"));
    assert!(err(vec![0; 100]).contains("truncated"));
    // Opening never writes: the delta and the base are as they were.
    let store2 = MemStore::with(good.clone());
    Delta::open(store2.clone(), base.clone()).unwrap();
    assert!(store2.log().is_empty() && base.log().is_empty());
}

mod fuzz {
    //! Hostile deltas: any bytes in the header (with a valid checksum, so
    //! the fields themselves are tried), the commit records and the table
    //! are refused with an error or opened consistently; nothing panics,
    //! overflows or allocates beyond the file's size.
    use super::*;
    use proptest::prelude::*;

    /// A small valid delta with three committed flushes: to the journal,
    /// a checkpoint into the table, to the journal again.
    fn valid() -> (MemStore, Vec<u8>, Header) {
        let blocks = 30;
        let base = MemStore::with(pattern(31, blocks * BS));
        let (store, mut delta) = create(&base);
        delta.limit_journal(1);
        for b in 0..6 {
            delta
                .write((b * 5 * BS) as u64, &pattern(b as u64, BS), false)
                .unwrap();
            if b % 2 == 1 {
                delta.flush().unwrap();
            }
        }
        (base, store.bytes(), delta.header().clone())
    }

    /// Re-signs a header page after its fields were changed.
    fn resign(img: &mut [u8]) {
        let crc = crc32c::crc32c(&img[..384]);
        img[384..388].copy_from_slice(&crc.to_le_bytes());
    }

    fn try_open(base: &MemStore, img: Vec<u8>) {
        if let Ok(d) = Delta::open(MemStore::with(img), base.clone()) {
            // Whatever opened reads without panicking.
            let mut buf = vec![0u8; d.header().block_size as usize];
            for b in 0..d.header().nblocks().min(64) {
                let _ = d.read(b * d.header().block_size as u64, &mut buf);
            }
        }
    }

    /// Opens a delta whose table was tampered with: true if it opened, and
    /// then every block reads (every mapping in range and its own); false
    /// if its entries' own checks refused it; any other outcome panics.
    fn open_or_refused(base: &MemStore, img: Vec<u8>) -> bool {
        match Delta::open(MemStore::with(img), base.clone()) {
            Ok(d) => {
                let mut buf = vec![0u8; BS];
                for b in 0..d.header().nblocks() {
                    d.read(b * BS as u64, &mut buf).unwrap();
                }
                true
            }
            Err(DeltaError::Format(
                FormatError::EntryOutOfRange { .. }
                | FormatError::EntryShared(..)
                | FormatError::TableCorrupt,
            )) => false,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn header_fields(
            bs in prop_oneof![Just(4096u32), any::<u32>()],
            vsize in prop_oneof![Just(30 * 4096u64), any::<u64>(), 1u64 << 40..1u64 << 62],
            base_size in prop_oneof![Just(30 * 4096u64), any::<u64>()],
            data_offset in any::<u64>(),
            pages in prop_oneof![Just(1u32), any::<u32>()],
            len in 0usize..600_000,
        ) {
            let (base, good, _) = valid();
            let mut img = good.clone();
            img.resize(len.max(4096), 0);
            img[12..16].copy_from_slice(&bs.to_le_bytes());
            img[16..24].copy_from_slice(&vsize.to_le_bytes());
            img[24..32].copy_from_slice(&base_size.to_le_bytes());
            img[112..120].copy_from_slice(&data_offset.to_le_bytes());
            img[120..124].copy_from_slice(&pages.to_le_bytes());
            resign(&mut img);
            try_open(&base, img);
        }

        #[test]
        fn any_bytes_anywhere_in_the_metadata(
            flips in proptest::collection::vec((0usize..4096 * 13, any::<u8>()), 1..16),
            resign_header in any::<bool>(),
        ) {
            // The header, the commit records, the journal's first 8 pages
            // (the flushes of `valid` wrote there) and the table's 2 slots.
            let (base, good, h) = valid();
            let mut img = good.clone();
            for (at, v) in flips {
                let at = if at < 4096 * 11 {
                    at
                } else {
                    h.slot_offset(0, 0) as usize + at - 4096 * 11
                };
                img[at] = v;
            }
            if resign_header {
                resign(&mut img);
            }
            try_open(&base, img);
        }

        #[test]
        fn journal_records_naming_anything(
            records in proptest::collection::vec((0u64..40, 0u64..64), 1..12),
            seq in 0u64..6,
        ) {
            use abuse_servers::cow::format::encode_records;
            let (base, good, h) = valid();
            // The last commit (3) counts one journal page: put any records
            // there, intact, so only their own checks can refuse them.
            let mut img = good.clone();
            let at = h.journal_offset(0) as usize;
            img[at..at + PAGE].copy_from_slice(&encode_records(seq, &records));
            if open_or_refused(&base, img) {
                // Accepted: a later flush than the checkpoint, blocks of
                // the delta (and, checked there, each mapping in range and
                // its own).
                prop_assert_eq!(seq, 3);
                prop_assert!(records.iter().all(|&(b, e)| b < h.nblocks() && e != 0));
            }
        }

        #[test]
        fn table_entries_pointing_anywhere(
            entries in proptest::collection::vec(any::<u64>(), 1..8),
            at in 0usize..ENTRIES_PER_PAGE,
        ) {
            use abuse_servers::cow::format::{encode_page, page_hash, xor_into, Commit};
            let (base, good, h) = valid();
            let mut img = good.clone();
            // A committed page 0 holding the entries, with a commit record
            // that names it: only the entries' own checks can refuse it.
            let mut page = vec![0u64; ENTRIES_PER_PAGE];
            for (i, e) in entries.iter().enumerate() {
                page[(at + i) % ENTRIES_PER_PAGE] = *e % 64;
            }
            let seq = 50;
            let off = h.slot_offset(0, 0) as usize;
            img[off..off + PAGE].copy_from_slice(&encode_page(seq, 0, &page));
            let other = h.slot_offset(0, 1) as usize;
            img[other..other + PAGE].fill(0);
            let mut hash = [0u8; 32];
            xor_into(&mut hash, &page_hash(0, seq));
            let c = Commit { seq, pages: hash, journal: 0 }.encode(h.version);
            let slot = Commit::slot(seq) as usize;
            img[slot..slot + PAGE].copy_from_slice(&c);
            let stale = 4096 + 8192 - slot;
            img[stale..stale + PAGE].fill(0);
            open_or_refused(&base, img);
        }
    }
}

/// Real files: the cases that need a shared mapping and OFD locks.
mod files {
    use super::*;
    use abuse_servers::cow::Cow;
    use abuse_servers::Backend;
    use nix::fcntl::{Flock, FlockArg};
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    const BLOCKS: usize = 24;

    /// A test's directory. The working areas (in /dev/shm) of the deltas
    /// in it go with it: the tests leave servers "killed", whose areas
    /// would otherwise stay there until a reboot.
    struct Scratch(tempfile::TempDir);

    impl Scratch {
        fn path(&self) -> &std::path::Path {
            self.0.path()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            for entry in std::fs::read_dir(self.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Ok(area) = Cow::working_area_path(&entry.path()) {
                    let _ = std::fs::remove_file(area);
                }
            }
        }
    }

    fn setup(seed: u64) -> (Scratch, std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
        let dir = Scratch(tempfile::tempdir().unwrap());
        let (base, delta) = (dir.path().join("base"), dir.path().join("delta"));
        let bytes = pattern(seed, BLOCKS * BS);
        std::fs::write(&base, &bytes).unwrap();
        drop(Cow::create(&base, &delta, BS as u32, no_progress()).unwrap());
        (dir, base, delta, bytes)
    }

    fn header(delta: &std::path::Path) -> Header {
        let mut hb = [0u8; PAGE];
        std::fs::File::open(delta)
            .unwrap()
            .read_exact_at(&mut hb, 0)
            .unwrap();
        Header::decode(&hb).unwrap()
    }

    /// One server's view of the delta file, whose syncs can be made to
    /// fail or to wait at a gate (as `MemStore`'s); the other servers'
    /// (`Cow`) are plain.
    struct Hooked {
        file: Flock<File>,
        /// When set to n + 1: the sync after n more successful ones fails
        /// (what was written stays in the file, as some of it may land).
        fail_sync: Arc<AtomicU32>,
        gate: Arc<Mutex<Option<Gate>>>,
    }

    impl Storage for Hooked {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            Storage::read_at(&self.file, buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            Storage::write_at(&self.file, buf, offset)
        }
        fn sync(&self) -> io::Result<()> {
            let gate = self.gate.lock().unwrap().take();
            if let Some(g) = gate {
                g.entered.send(()).unwrap();
                g.release.recv().unwrap();
            }
            let armed = self.fail_sync.load(Ordering::SeqCst);
            if armed > 0 {
                self.fail_sync.store(armed - 1, Ordering::SeqCst);
                if armed == 1 {
                    return Err(io::Error::from_raw_os_error(5));
                }
            }
            Storage::sync(&self.file)
        }
        fn size(&self) -> io::Result<u64> {
            Storage::size(&self.file)
        }
        fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
            Storage::punch(&self.file, offset, len)
        }
    }

    impl Shared for Hooked {
        fn map_working(&self, uuid: &[u8; 16], len: u64) -> io::Result<Option<memmap2::MmapMut>> {
            self.file.map_working(uuid, len)
        }
        fn lock_byte(&self, at: u64) -> io::Result<()> {
            self.file.lock_byte(at)
        }
        fn unlock_byte(&self, at: u64) -> io::Result<()> {
            self.file.unlock_byte(at)
        }
        fn boot_id(&self) -> Option<[u8; 16]> {
            self.file.boot_id()
        }
        fn lock_sole(&self) -> io::Result<bool> {
            self.file.lock_sole()
        }
        fn remove_working(&self, uuid: &[u8; 16]) -> io::Result<()> {
            self.file.remove_working(uuid)
        }
    }

    type HookedDelta = Delta<Hooked, Flock<File>>;

    /// Opens the delta as its first server through a `Hooked` store (it
    /// then holds the delta's lock shared, as `Cow::open` leaves it).
    fn hooked_server(delta: &Path, base: &Path) -> HookedDelta {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(delta)
            .unwrap();
        let file = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .unwrap_or_else(|_| panic!("another server has the delta"));
        let base = Flock::lock(File::open(base).unwrap(), FlockArg::LockSharedNonblock).unwrap();
        let store = Hooked {
            file,
            fail_sync: Default::default(),
            gate: Default::default(),
        };
        let d = Delta::open(store, base).unwrap();
        d.store().file.relock(FlockArg::LockShared).unwrap();
        d
    }

    /// A checkpoint whose sync failed (or whose server was killed) left a
    /// table slot with the sequence the next flush takes; another server,
    /// running on, then committed that sequence, and the stale slot counted
    /// as its page's version: every later open failed (table corrupt).
    #[test]
    fn a_checkpoint_that_failed_leaves_no_slot_another_servers_flush_commits() {
        let (_dir, base, delta, _) = setup(46);
        let mut a = hooked_server(&delta, &base);
        a.limit_journal(0); // its flushes checkpoint
        let b = Cow::open(&delta, None).unwrap();
        a.write(0, &pattern(1, BS), false).unwrap();
        a.store().fail_sync.store(1, Ordering::SeqCst);
        assert!(a.flush().is_err(), "the failed sync was not reported");
        // Server b journals: it rewrites no slot.
        b.write(BS as u64, &pattern(2, BS), false).unwrap();
        b.flush().unwrap();
        drop((a, b));
        let check = |cow: &Cow| {
            for (blk, seed) in [(0u64, 1), (1, 2)] {
                let mut got = vec![0u8; BS];
                cow.read(blk * BS as u64, &mut got).unwrap();
                assert_eq!(got, pattern(seed, BS), "block {blk}");
            }
        };
        let c = Cow::open(&delta, None).unwrap_or_else(|e| panic!("reopen: {e}"));
        check(&c);
        drop(c);
        // The table alone (as after a reboot) holds both.
        let f = OpenOptions::new()
            .write(true)
            .open(Cow::working_area_path(&delta).unwrap())
            .unwrap();
        f.write_all_at(&[0; 8], 0).unwrap();
        drop(f);
        let c = Cow::open(&delta, None).unwrap_or_else(|e| panic!("reopen: {e}"));
        assert_eq!(c.adopted(), None);
        check(&c);
    }

    /// A server stopping flushed, then found itself the last one and
    /// removed the working area: a first write another server acknowledged
    /// after that flush, that server then killed, lived only in the area
    /// removed, and was lost. Here the stopping server's final flush waits
    /// in its sync while the other server writes and is killed.
    #[test]
    fn a_first_write_acknowledged_while_another_server_stops_survives_its_kill() {
        let (_dir, base, delta, bytes) = setup(47);
        let a = hooked_server(&delta, &base);
        let b = Cow::open(&delta, None).unwrap();
        a.write(0, &pattern(1, BS), false).unwrap();
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        *a.store().gate.lock().unwrap() = Some(Gate {
            entered: entered_tx,
            release: release_rx,
        });
        let stopping = std::thread::spawn(move || {
            let r = a.stop();
            (a, r)
        });
        entered.recv().unwrap(); // a's final flush is in its sync
        let at = 5 * BS + 100;
        b.write(at as u64, &pattern(2, 700), false).unwrap();
        drop(b); // killed
        release.send(()).unwrap();
        let (a, r) = stopping.join().unwrap();
        r.unwrap();
        drop(a);
        let c = Cow::open(&delta, None).unwrap();
        let mut got = vec![0u8; 700];
        c.read(at as u64, &mut got).unwrap();
        assert!(
            got == pattern(2, 700),
            "the killed server's write was lost (the device reads {})",
            if got == bytes[at..at + 700] {
                "the base"
            } else {
                "something else"
            }
        );
        assert_eq!(c.adopted(), Some(1), "the working area was not kept");
        // The last server to stop leaves none.
        c.stop().unwrap();
        drop(c);
        assert!(!Cow::working_area_path(&delta).unwrap().exists());
        let c = Cow::open(&delta, None).unwrap();
        assert_eq!(c.adopted(), None);
        c.read(at as u64, &mut got).unwrap();
        assert_eq!(got, pattern(2, 700));
        c.stop().unwrap();
    }

    /// The working area's name is predictable: a symbolic link planted
    /// there (by another user, in /dev/shm) was followed, and the file it
    /// named grown, its mode changed, and served as the working area. It
    /// is refused now, and what it names is untouched.
    #[test]
    fn a_link_planted_at_the_working_areas_name_is_never_followed() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, _base, delta, _) = setup(48);
        let area = Cow::working_area_path(&delta).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"not a working area").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::remove_file(&area).unwrap(); // create's
        std::os::unix::fs::symlink(&victim, &area).unwrap();
        let err = Cow::open(&delta, None)
            .err()
            .expect("served through a link at the working area's name")
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"not a working area");
        let mode = std::fs::metadata(&victim).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o644, "the link's target was changed");
        // Once it is gone, the area is made afresh: this user's alone.
        std::fs::remove_file(&area).unwrap();
        let cow = Cow::open(&delta, None).unwrap();
        let m = std::fs::symlink_metadata(&area).unwrap();
        assert!(m.file_type().is_file());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        cow.stop().unwrap();
    }

    /// A working area another user made (the name is predictable), or one
    /// other users may open, could be changed under the server (a
    /// writable mapping of it is a way to make it serve anything): it was
    /// adopted, chowned and chmodded. It is refused now; so is one that is
    /// not a regular file.
    #[test]
    fn a_working_area_of_another_user_or_open_to_others_is_refused() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
        let (_dir, _base, delta, _) = setup(49);
        let area = Cow::working_area_path(&delta).unwrap();
        let plant = |mode: u32| {
            let _ = std::fs::remove_file(&area);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&area)
                .unwrap();
            f.set_permissions(std::fs::Permissions::from_mode(mode))
                .unwrap();
            f
        };
        let refused = |what: &str, want: &str| {
            let err = Cow::open(&delta, None)
                .err()
                .unwrap_or_else(|| panic!("{what}: adopted"))
                .to_string();
            assert!(err.contains(want), "{what}: {err}");
        };
        if nix::unistd::geteuid().is_root() {
            let f = plant(0o600);
            nix::unistd::fchown(f.as_raw_fd(), Some(12345.into()), Some(12345.into())).unwrap();
            refused("another user's area", "owned by uid 12345");
            let m = std::fs::metadata(&area).unwrap();
            assert_eq!(
                (m.uid(), m.mode() & 0o777),
                (12345, 0o600),
                "it was changed"
            );
        } else {
            eprintln!("not root: another user's area is not tried");
        }
        for mode in [0o666, 0o640, 0o602] {
            plant(mode);
            refused(
                &format!("an area of mode {mode:o}"),
                "other users may open it",
            );
            let m = std::fs::metadata(&area).unwrap();
            assert_eq!(m.mode() & 0o777, mode, "it was changed");
        }
        std::fs::remove_file(&area).unwrap();
        nix::unistd::mkfifo(&area, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        refused("a FIFO", "FIFO");
        std::fs::remove_file(&area).unwrap();
        std::fs::create_dir(&area).unwrap();
        refused("a directory", "directory");
        std::fs::remove_dir(&area).unwrap();
        let cow = Cow::open(&delta, None).unwrap();
        assert_eq!(cow.adopted(), None, "a new area");
        cow.stop().unwrap();
    }

    /// A server killed leaves its working area for the next one; if the
    /// delta is restored meanwhile (a copy put back over it, a snapshot
    /// rolled back: the same file), the area is another copy's: its
    /// mappings name blocks that in this copy are not theirs. It was
    /// adopted all the same; it is rebuilt from the table now.
    #[test]
    fn a_working_area_from_before_a_restore_of_the_delta_is_not_adopted() {
        use std::os::unix::fs::MetadataExt;
        let (dir, _base, delta, bytes) = setup(50);
        let bs = BS as u64;
        {
            let cow = Cow::open(&delta, None).unwrap();
            cow.write(2 * bs, &pattern(1, BS), false).unwrap();
            cow.flush().unwrap();
        }
        let saved = dir.path().join("saved");
        std::fs::copy(&delta, &saved).unwrap();
        let ino = std::fs::metadata(&delta).unwrap().ino();
        {
            // Adopts the area (killed: dropped), and goes on.
            let cow = Cow::open(&delta, None).unwrap();
            assert_eq!(cow.adopted(), Some(0));
            cow.write(3 * bs, &pattern(2, BS), false).unwrap();
            cow.write(2 * bs, &pattern(3, 512), false).unwrap();
            cow.flush().unwrap();
            cow.write(4 * bs + 100, &pattern(4, 700), false).unwrap();
        }
        std::fs::copy(&saved, &delta).unwrap();
        assert_eq!(
            std::fs::metadata(&delta).unwrap().ino(),
            ino,
            "the restore made another file: the test cannot tell"
        );
        let cow = Cow::open(&delta, None).unwrap();
        let mut want = bytes.clone();
        want[2 * BS..3 * BS].copy_from_slice(&pattern(1, BS));
        let mut got = vec![0u8; BLOCKS * BS];
        cow.read(0, &mut got).unwrap();
        for blk in 0..BLOCKS {
            assert!(
                got[blk * BS..(blk + 1) * BS] == want[blk * BS..(blk + 1) * BS],
                "block {blk} does not read what the restored delta holds"
            );
        }
        assert_eq!(cow.adopted(), None, "the stale working area was adopted");
        assert_eq!(cow.mapped_blocks(), 1);
        // And it goes on from there.
        cow.write(3 * bs, &pattern(5, BS), false).unwrap();
        cow.flush().unwrap();
        drop(cow);
        let cow = Cow::open(&delta, None).unwrap();
        cow.read(3 * bs, &mut got[..BS]).unwrap();
        assert!(got[..BS] == pattern(5, BS));
        cow.stop().unwrap();
    }

    /// A server killed before any FLUSH (here: dropped without one) left
    /// its acknowledged first writes in the working area: the next server
    /// of this boot keeps them, and its FLUSH commits them.
    #[test]
    fn a_killed_server_loses_nothing() {
        let (_dir, base, delta, _) = setup(40);
        {
            let cow = Cow::open(&delta, None).unwrap();
            assert_eq!(
                cow.adopted(),
                Some(0),
                "a fresh delta's working area is its own"
            );
            for b in 0..6u64 {
                cow.write(b * 3 * BS as u64 + 200, &pattern(b + 60, 900), false)
                    .unwrap();
            }
        }
        let cow = Cow::open(&delta, Some(&base)).unwrap();
        assert_eq!(cow.adopted(), Some(6));
        for b in 0..6u64 {
            let mut got = vec![0u8; 900];
            cow.read(b * 3 * BS as u64 + 200, &mut got).unwrap();
            assert_eq!(
                got,
                pattern(b + 60, 900),
                "block {} lost with its server",
                b * 3
            );
        }
        cow.flush().unwrap();
        drop(cow);
        // After a reboot (another boot id in the working area) the table
        // alone counts: it has everything, since the flush.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(Cow::working_area_path(&delta).unwrap())
            .unwrap();
        f.write_all_at(&[0xEE; 16], 3 * 8).unwrap();
        drop(f);
        let cow = Cow::open(&delta, None).unwrap();
        assert_eq!(
            cow.adopted(),
            None,
            "another boot's working area was adopted"
        );
        let mut got = vec![0u8; 900];
        cow.read(15 * BS as u64 + 200, &mut got).unwrap();
        assert_eq!(got, pattern(65, 900));
    }

    /// A working area whose set-up never finished (no marker) is built
    /// again, not adopted; one that disagrees with the table is refused.
    #[test]
    fn joining_checks_the_working_area() {
        let (_dir, _base, delta, _) = setup(41);
        {
            let cow = Cow::open(&delta, None).unwrap();
            cow.write(0, &pattern(1, BS), false).unwrap();
            cow.write(BS as u64, &pattern(2, BS), false).unwrap();
            cow.flush().unwrap();
        }
        let h = header(&delta);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(Cow::working_area_path(&delta).unwrap())
            .unwrap();
        // A first server that died setting up: marker cleared.
        f.write_all_at(&[0; 8], 0).unwrap();
        let cow = Cow::open(&delta, None).unwrap();
        assert_eq!(cow.adopted(), None);
        assert_eq!(cow.mapped_blocks(), 2);
        drop(cow);
        // Two blocks mapped to one delta block in the working table.
        let table = 8 * (512 + 2 * h.table_pages as u64);
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, table).unwrap();
        f.write_all_at(&e, table + 8 * 5).unwrap();
        let err = Cow::open(&delta, None)
            .err()
            .expect("a damaged working area was adopted")
            .to_string();
        assert!(err.contains("working area"), "{err}");
    }

    #[test]
    fn two_servers_share_one_delta_and_flush_each_others_writes() {
        let (_dir, _base, delta, _) = setup(42);
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
        // One server's FLUSH commits the other's first writes.
        b.flush().unwrap();
        drop((a, b));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(Cow::working_area_path(&delta).unwrap())
            .unwrap();
        f.write_all_at(&[0; 8], 0).unwrap(); // only the table counts
        drop(f);
        let c = Cow::open(&delta, None).unwrap();
        assert_eq!(c.adopted(), None);
        assert_eq!(c.mapped_blocks(), BLOCKS as u64);
        let mut buf = vec![0u8; BS];
        c.read(0, &mut buf).unwrap();
        assert!(buf[..512].iter().all(|&x| x == 9u8.wrapping_mul(8) + 1));
    }

    /// A server joins while another is busy taking and mapping blocks:
    /// the check of the working area must not mistake that for damage.
    #[test]
    fn joining_while_another_server_writes() {
        let (_dir, _base, delta, _) = setup(45);
        let a = Arc::new(Cow::open(&delta, None).unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..3u64)
            .map(|t| {
                let (a, stop) = (a.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        let blk = i % BLOCKS as u64;
                        a.write(blk * BS as u64, &[i as u8; 512], false).unwrap();
                        i += 3;
                    }
                })
            })
            .collect();
        for _ in 0..20 {
            let b = Cow::open(&delta, None).unwrap_or_else(|e| panic!("joining a busy delta: {e}"));
            drop(b);
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
    }

    /// Merge takes the base exclusively: refused while a server of another
    /// delta over the same base runs; and a server cannot start during it.
    /// Only a WRITE that reads nothing of the base and syncs nothing (its
    /// blocks mapped, or covered whole; no FUA) runs without blocking.
    #[test]
    fn only_writes_that_read_no_base_are_quick() {
        use abuse_sys::uapi::{ABUSE_CMD_READ, ABUSE_CMD_WRITE};
        let (_dir, _base, delta, _) = setup(45);
        let cow = Cow::open(&delta, None).unwrap();
        let bs = BS as u64;
        let quick = |cmd, off, len, fua| !cow.may_block(cmd, off, len, fua);
        assert!(
            quick(ABUSE_CMD_WRITE, bs, 2 * bs, false),
            "whole unmapped blocks"
        );
        assert!(
            !quick(ABUSE_CMD_WRITE, bs + 512, bs, false),
            "partial unmapped blocks"
        );
        assert!(!quick(ABUSE_CMD_WRITE, bs, bs, true), "FUA");
        assert!(!quick(ABUSE_CMD_READ, bs, bs, false), "a READ");
        cow.write(bs, &pattern(1, 512), false).unwrap();
        assert!(
            quick(ABUSE_CMD_WRITE, bs + 512, 1024, false),
            "a mapped block, in part"
        );
        assert!(
            !quick(ABUSE_CMD_WRITE, bs + 512, bs, false),
            "reaching an unmapped block in part"
        );
        assert!(
            quick(ABUSE_CMD_WRITE, bs + 512, 2 * bs - 512, false),
            "mapped, then unmapped whole"
        );
        assert!(
            !quick(ABUSE_CMD_WRITE, (BLOCKS as u64 - 1) * bs, 2 * bs, false),
            "past the end"
        );
        cow.stop().unwrap();
    }

    /// Where in `[from, to)` of `path` the first hole is, if any.
    fn first_hole(path: &std::path::Path, from: u64, to: u64) -> Option<u64> {
        use nix::unistd::{lseek, Whence};
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        let hole = lseek(f.as_raw_fd(), from as i64, Whence::SeekHole).unwrap() as u64;
        (hole < to).then_some(hole)
    }

    /// Every flush writes a commit slot and journal pages: they are real
    /// zeroes from creation (a write to a hole allocates, and the flush's
    /// fdatasync then commits the file system's journal too), and a delta
    /// made with holes there gets them filled when it is served.
    #[test]
    fn the_commit_slots_and_journal_are_allocated_before_any_flush() {
        let (_dir, base, delta, _) = setup(44);
        let h = header(&delta);
        let (from, to) = (PAGE as u64, h.journal_offset(h.journal_pages()));
        assert_eq!(
            first_hole(&delta, from, to),
            None,
            "a new delta has holes where flushes write"
        );
        {
            let cow = Cow::open(&delta, None).unwrap();
            cow.write(0, &pattern(7, BS), false).unwrap();
            cow.flush().unwrap();
        }
        // As a delta made before: holes in the journal past its use.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&delta)
            .unwrap();
        abuse_servers::backend::punch_file(&f, h.journal_offset(4), 8 * PAGE as u64).unwrap();
        drop(f);
        assert!(
            first_hole(&delta, from, to).is_some(),
            "this file system made no hole: the test cannot tell"
        );
        let cow = Cow::open(&delta, Some(&base)).unwrap();
        assert_eq!(first_hole(&delta, from, to), None, "serving left the holes");
        let mut got = vec![0u8; BS];
        cow.read(0, &mut got).unwrap();
        assert_eq!(got, pattern(7, BS));
        cow.flush().unwrap();
    }

    #[test]
    fn merge_takes_the_base_exclusively() {
        let (dir, base, delta, _) = setup(43);
        let other = dir.path().join("other");
        drop(Cow::create(&base, &other, BS as u32, no_progress()).unwrap());
        let server = Cow::open(&other, None).unwrap();
        let err = Cow::open_exclusive(&delta, None)
            .err()
            .expect("merged under a server")
            .to_string();
        assert!(err.contains("in use by a cow server"), "{err}");
        drop(server);
        let merging = Cow::open_exclusive(&delta, None).unwrap();
        let err = Cow::open(&other, None)
            .err()
            .expect("served a base being merged")
            .to_string();
        assert!(err.contains("being merged"), "{err}");
        drop(merging);
    }

    #[test]
    fn info_reads_without_the_base_and_verify_reads_all_of_it() {
        let (_dir, base, delta, bytes) = setup(44);
        {
            let cow = Cow::open(&delta, None).unwrap();
            cow.write(0, &[1; BS], true).unwrap();
        }
        let moved = base.with_extension("moved");
        std::fs::rename(&base, &moved).unwrap();
        let i = Cow::inspect(&delta, None).unwrap();
        assert_eq!(i.mapped, 1);
        assert!(
            Cow::verify(&i.header, &i.base_path, no_progress()).is_err(),
            "verified a missing base"
        );
        let done = std::sync::atomic::AtomicU64::new(0);
        Cow::verify(&i.header, &moved, &|n| {
            done.fetch_add(n, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(done.into_inner(), bytes.len() as u64);
        // One byte changed in the middle, between the samples an open
        // reads: open does not notice (cheap), verify does.
        let mut changed = bytes.clone();
        changed[BLOCKS * BS / 2 + 7] ^= 1;
        std::fs::write(&moved, &changed).unwrap();
        assert!(Cow::verify(&i.header, &moved, no_progress()).is_err());
    }

    #[test]
    fn an_interrupted_merge_is_refused_for_serving_and_finished_by_merge() {
        use abuse_servers::cow::format::FLAG_MERGING;
        let (_dir, base, delta, original) = setup(21);
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
        let mut h = header(&delta);
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
            .merge(&delta, no_progress())
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
}

/// A version 2 delta (no journal, its working area's room before the data)
/// is still served: every flush commits through the table's slots.
#[test]
fn a_version_2_delta_is_still_served() {
    let blocks = 40;
    let base = MemStore::with(pattern(5, blocks * BS));
    let (_, v3) = create(&base);
    let mut h = v3.header().clone();
    h.version = 2;
    let p = h.table_pages as u64;
    h.data_offset =
        (3 * 4096 + 2 * 4096 * p + 4096 + 8 * (2 * p + h.nblocks())).next_multiple_of(4096);
    let mut img = vec![0u8; h.data_offset as usize];
    img[..PAGE].copy_from_slice(&h.encode());
    let store = MemStore::with(img);
    let d = Delta::open(store.clone(), base.clone()).expect("a version 2 delta");
    assert_eq!(d.header().journal_pages(), 0);
    d.write(3 * BS as u64 + 100, &pattern(9, 500), false)
        .unwrap();
    d.flush().unwrap();
    let slot_a = h.slot_offset(0, 0);
    assert!(
        store
            .log()
            .iter()
            .any(|o| matches!(o, Op::Write(off, _) if *off == slot_a)),
        "the flush did not write the table's slot"
    );
    let d = Delta::open(MemStore::with(store.bytes()), base.clone()).unwrap();
    let mut got = vec![0u8; 500];
    d.read(3 * BS as u64 + 100, &mut got).unwrap();
    assert_eq!(got, pattern(9, 500));
}

/// Where `locate` places a range (for the kernel to read it from there
/// itself), the bytes there are what `read` returns; and it places
/// unmapped ranges in the base, ranges within mapped runs in the delta,
/// and nothing that straddles the two.
#[test]
fn locate_places_reads_where_read_finds_the_bytes() {
    use abuse_servers::cow::delta::Source;
    let blocks = 12;
    let base = MemStore::with(pattern(5, blocks * BS));
    let (store, delta) = create(&base);
    let bs = BS as u64;
    // Blocks 2 and 3 first-written in order (consecutive delta blocks),
    // 7 partially, 5 zeroed; the rest unmapped.
    delta.write(2 * bs, &pattern(1, 2 * BS), false).unwrap();
    delta.write(7 * bs + 100, &pattern(2, 300), false).unwrap();
    delta.write_zeroes(5 * bs, bs, true).unwrap();
    let mut placed = [0, 0];
    for start in (0..blocks as u64 * bs).step_by(512) {
        for len in [512, 4096, 8192, 3 * 4096] {
            if start + len > blocks as u64 * bs {
                continue;
            }
            let mut want = vec![0u8; len as usize];
            delta.read(start, &mut want).unwrap();
            let Some((source, at)) = delta.locate(start, len) else {
                continue;
            };
            let file = match source {
                Source::Base => base.bytes(),
                Source::Delta => store.bytes(),
            };
            let mut got = vec![0u8; len as usize];
            let have = file.len().saturating_sub(at as usize).min(len as usize);
            got[..have].copy_from_slice(&file[at as usize..at as usize + have]);
            assert_eq!(
                got, want,
                "{len} bytes at {start}, placed in {source:?} at {at}"
            );
            placed[(source == Source::Delta) as usize] += 1;
        }
    }
    assert!(placed[0] > 0 && placed[1] > 0, "placed: {placed:?}");
    // Straddling the base and the delta, or past the device: nowhere.
    assert_eq!(delta.locate(bs, 2 * bs), None);
    assert_eq!(delta.locate(3 * bs, 2 * bs), None);
    assert_eq!(delta.locate(11 * bs, 2 * bs), None);
    assert!(delta.locate(2 * bs + 512, bs).is_some());
}
