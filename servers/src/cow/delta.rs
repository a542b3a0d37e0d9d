//! A delta over a base: block remapping, first-write copies and the group
//! commit of docs/cow-format.md. Safe to use from many threads at once, and
//! from several processes sharing one delta file.
//!
//! A write is acknowledged once it is in the delta's page cache and, for a
//! first write, its mapping is in the shared working table (memory that
//! outlives a killed server: it is a mapping of the delta file). FLUSH makes
//! every acknowledged write durable: data first, then the table pages that
//! changed, then a commit record naming them. So first writes pay for
//! durability together, at FLUSH, as on any disk with a volatile cache.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::format::{
    self, decode_any_page, decode_page, decode_records, encode_page, encode_records, page_hash,
    xor_into, Commit, FormatError, Header, ENTRIES_PER_PAGE, ENTRY_JOURNAL, PAGE, RECORDS_PER_PAGE,
};
use super::storage::{Shared, Storage};

/// Why a delta could not be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// The delta's on-disk structures are bad.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Reading or writing the delta or the base failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The base's size is not the one the delta was made over.
    #[error("wrong base: the delta was made over a base of {want} bytes, this one has {got}")]
    BaseSize {
        /// The base's size, as the delta records it.
        want: u64,
        /// The size of the base given.
        got: u64,
    },
    /// The base's contents are not those the delta was made over.
    #[error("wrong base, or the base changed since the delta was made (its contents differ)")]
    BaseDigest,
    /// Another server of the delta is still setting up its working area.
    #[error("another server of this delta is still setting it up")]
    NotReady,
    /// The shared working area does not match the delta's table.
    #[error("the shared working area disagrees with the delta's table ({0}): stop every server of this delta and start again")]
    WorkingArea(String),
}

// The working area's control words (docs/cow-format.md).
const W_MARKER: usize = 0;
const W_UUID: usize = 1;
const W_BOOT: usize = 3;
const W_NEXT_FREE: usize = 5;
const W_COMMITTED: usize = 6;
const W_JOURNAL: usize = 7;
const W_HASH: usize = 8;
/// The sequence of the commit record a flush is writing: it differs from
/// `W_COMMITTED` only while a flush is between its record and the update
/// of the area (or died there), the one case the next flush rereads disk.
const W_COMMITTING: usize = 12;
/// The sequence of the last checkpoint that began writing table slots:
/// above `W_COMMITTED`, it never committed (its server was killed, or a
/// sync failed), and its slots, which carry the sequence the next flush
/// takes, are erased before that flush commits.
const W_SLOTS: usize = 13;
/// Words in the control page.
const W_CONTROL: usize = PAGE / 8;
/// `W_MARKER` of a working area that is set up. (`ABUSEWRK`, before
/// `W_COMMITTING`, is not adopted: a server of that version would not
/// announce its commits.)
const MARKER: u64 = u64::from_le_bytes(*b"ABUSEWK3");
/// The marker before `W_SLOTS`: same layout (the word is 0), adopted by a
/// first server, which marks it anew; no server of that version can join
/// it then (it would not announce its checkpoints).
const MARKER_2: u64 = u64::from_le_bytes(*b"ABUSEWK2");

/// The working area: control words, per table page its newest version in
/// its slots (`seq << 1 | slot`), a dirty count and the sequence of its
/// newest change in the journal (0: none), then the working table, then
/// (version 4) a bit per block whose mapping is not yet committed.
/// Shared between processes through a mapping in shared memory, or private.
struct Working {
    map: Option<memmap2::MmapMut>,
    local: Vec<AtomicU64>,
}

impl Working {
    fn words(&self) -> &[AtomicU64] {
        match &self.map {
            // SAFETY: the mapping is page-aligned, so 8-byte aligned; it
            // lives as long as `self`; every access, here and in the other
            // processes mapping it, is atomic.
            Some(m) => unsafe {
                std::slice::from_raw_parts(m.as_ptr().cast::<AtomicU64>(), m.len() / 8)
            },
            None => &self.local,
        }
    }
}

/// Lock bytes (beyond any real data) for cross-process exclusion.
const LOCK_BASE: u64 = 1 << 62;
const PAGE_LOCK: u64 = LOCK_BASE - 1;
const GROW_LOCK: u64 = LOCK_BASE - 2;

/// The delta grows by at least this much at a time, written with zeroes
/// ahead of the blocks that fill it: a first write then changes no file
/// metadata, so a FLUSH's fdatasyncs commit no filesystem journal (once
/// per chunk instead of twice per flush).
const GROW_CHUNK: u64 = 4 << 20;

/// Lock stripes for first writes: writes to different parts of one block
/// that is not yet copied must not both copy it.
const STRIPES: usize = 64;

/// How a delta is opened.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The only opener (exclusive): adopts a working area this boot's
    /// servers left, if it checks out, else builds it from the table.
    First,
    /// Another server has it set up: adopt it, after checking it.
    Join,
    /// To merge: as `First`, and an interrupted merge is expected.
    Merge,
    /// To read the durable state only (`cow info`): no working area.
    Inspect,
}

/// What the table on disk says (the last committed flush).
struct Durable {
    committed: u64,
    /// Per page: `seq << 1 | slot` of its newest version in its slots.
    pages: Vec<u64>,
    /// Per page: the sequence of its newest change in the journal, if that
    /// is newer than its slots' (else 0).
    journaled: Vec<u64>,
    /// Journal pages in use.
    journal: u32,
    hash: [u8; 32],
    table: Vec<u64>,
    /// Offsets of intact slots with a sequence above `committed`: written
    /// by a checkpoint that never committed.
    stale: Vec<u64>,
}

/// A cow device's state.
pub struct Delta<S: Shared, B: Storage> {
    header: Header,
    store: S,
    base: B,
    work: Working,
    stripes: Vec<Mutex<()>>,
    /// Serialises this process's flushes (the OFD lock on `PAGE_LOCK`
    /// does it between processes).
    flush_lock: Mutex<()>,
    /// Set when the working area was found and kept (a server of this
    /// boot left it): how many of its mappings were not yet committed.
    adopted: Option<u64>,
    /// Bytes of the delta known to be in the file (written, zeroes at
    /// least): fresh blocks below it need no change of the file's size.
    filled: AtomicU64,
    /// Serialises this process's growing of the file (the OFD lock on
    /// `GROW_LOCK` does it between processes).
    grow_lock: Mutex<()>,
    /// Journal pages this process's flushes use before a checkpoint.
    journal_limit: u32,
    /// Tripped by a failed sync: every later flush fails (see `crate::sync`).
    synced: crate::sync::SyncLatch,
}

/// Holds a cross-process lock byte; releases it when dropped.
struct ByteGuard<'a, S: Shared>(&'a S, u64);

impl<S: Shared> Drop for ByteGuard<'_, S> {
    fn drop(&mut self) {
        let _ = self.0.unlock_byte(self.1);
    }
}

fn lock_byte<S: Shared>(s: &S, at: u64) -> io::Result<ByteGuard<'_, S>> {
    s.lock_byte(at)?;
    Ok(ByteGuard(s, at))
}

fn corrupt(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl<S: Shared, B: Storage> Delta<S, B> {
    /// Makes a new, empty delta in `store` (which must be empty) over
    /// `base`, reading all of it once for its digest (`progress` is told the
    /// bytes done).
    pub fn create(
        store: S,
        base: B,
        block_size: u32,
        base_path: &str,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Self, DeltaError> {
        let size = base.size()?;
        let id = format::BaseId {
            size,
            sample: format::sample(|off, buf| base.read_at(buf, off), size)?,
            digest: format::digest(|off, buf| base.read_at(buf, off), size, progress)?,
        };
        let header = Header::new(block_size, &id, random_uuid()?, base_path)?;
        store.write_at(&header.encode(), 0)?;
        // Commit slots and table slots all zero: nothing committed, every
        // block unmapped (`open` makes the commit slots and the journal
        // real zeroes; the table's slots stay holes until a checkpoint).
        store.write_at(&[0], header.data_offset - 1)?;
        let delta = Self::open(store, base)?;
        delta.sync_store()?;
        Ok(delta)
    }

    /// Opens a delta as its first (or only) server.
    pub fn open(store: S, base: B) -> Result<Self, DeltaError> {
        Self::open_with(store, base, Mode::First)
    }

    /// Opens a delta that another server has set up: its working area is
    /// checked and shared.
    pub fn join(store: S, base: B) -> Result<Self, DeltaError> {
        Self::open_with(store, base, Mode::Join)
    }

    /// Opens a delta to merge it into its base: a merge that was
    /// interrupted left the base partly written, so its identity is not
    /// checked then (the merge is finished instead).
    pub fn open_for_merge(store: S, base: B) -> Result<Self, DeltaError> {
        Self::open_with(store, base, Mode::Merge)
    }

    /// Reads a delta's durable state without a working area or the base's
    /// check (`cow info`); `base` is only used for reads.
    pub fn inspect(store: S, base: B) -> Result<Self, DeltaError> {
        Self::open_with(store, base, Mode::Inspect)
    }

    fn open_with(store: S, base: B, mode: Mode) -> Result<Self, DeltaError> {
        let len = store.size()?;
        if len < PAGE as u64 {
            return Err(FormatError::Truncated(len, PAGE as u64).into());
        }
        let mut hb = [0u8; PAGE];
        store.read_at(&mut hb, 0)?;
        let header = Header::decode(&hb)?;
        // Before anything is allocated for the table: the file must hold
        // it (this bounds every allocation below by the file's size).
        if len < header.data_offset {
            return Err(FormatError::Truncated(len, header.data_offset).into());
        }
        let interrupted = header.flags & format::FLAG_MERGING != 0;
        if interrupted && mode != Mode::Merge && mode != Mode::Inspect {
            return Err(FormatError::Merging.into());
        }
        if mode != Mode::Inspect {
            let got = base.size()?;
            if got != header.base_size {
                return Err(DeltaError::BaseSize {
                    want: header.base_size,
                    got,
                });
            }
            if !interrupted
                && format::sample(|off, buf| base.read_at(buf, off), got)? != header.base_sample
            {
                return Err(DeltaError::BaseDigest);
            }
        }
        let map = match mode {
            Mode::Inspect => None,
            _ => store.map_working(&header.uuid, header.work_len())?,
        };
        let local = if map.is_some() {
            Vec::new()
        } else {
            let words = header.work_len() / 8;
            (0..words).map(|_| AtomicU64::new(0)).collect()
        };
        if matches!(mode, Mode::First | Mode::Merge) {
            // The commit slots and the journal, which every flush writes,
            // are real zeroes (a delta made before they were written at
            // creation has holes there), so a flush allocates nothing.
            // Exclusive here: nobody writes them meanwhile.
            let at = format::COMMIT_OFFSET;
            store.fill_holes(at, header.journal_offset(header.journal_pages()) - at)?;
        }
        let journal_limit = header.journal_pages();
        let mut delta = Delta {
            header,
            store,
            base,
            work: Working { map, local },
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            flush_lock: Mutex::new(()),
            adopted: None,
            filled: AtomicU64::new(len),
            grow_lock: Mutex::new(()),
            journal_limit,
            synced: Default::default(),
        };
        delta.set_up(mode)?;
        Ok(delta)
    }

    /// Fills or checks the working area, with no flush running anywhere.
    fn set_up(&mut self, mode: Mode) -> Result<(), DeltaError> {
        let _lock = lock_byte(&self.store, PAGE_LOCK)?;
        let durable = read_durable(&self.store, &self.header)?;
        if mode != Mode::Inspect {
            // No flush runs (the lock): a slot above the last commit is a
            // dead checkpoint's, and would count once the next flush
            // commits its sequence.
            self.erase(&durable.stale)?;
        }
        let shared = self.work.map.is_some();
        let boot = self.store.boot_id();
        let ours = shared && boot.is_some() && self.marked_for(boot, mode == Mode::Join);
        // An area of this delta whose last commit is not the one on disk
        // was left by servers of another copy of it: the file was restored
        // (cp over it, a snapshot rolled back) since. Its mappings name
        // blocks of that copy: rebuilt, never adopted.
        let current = ours && self.agrees_with(&durable);
        match mode {
            Mode::Join if !ours => Err(DeltaError::NotReady),
            Mode::Join if !current => Err(DeltaError::WorkingArea(format!(
                "its last commit is {}, the delta's is {} (was the delta restored while served?)",
                self.words()[W_COMMITTED].load(Ordering::Acquire),
                durable.committed
            ))),
            Mode::Join => self
                .check(&durable)
                .map(|_| ())
                .map_err(DeltaError::WorkingArea),
            Mode::First | Mode::Merge if current => {
                // A server of this boot left it (it was killed, or stopped):
                // its acknowledged writes are here, not all in the table yet.
                match self.check(&durable) {
                    Ok(pending) => {
                        self.adopted = Some(pending);
                        self.refresh_committed(&durable);
                        self.words()[W_MARKER].store(MARKER, Ordering::Release);
                        Ok(())
                    }
                    Err(why) => Err(DeltaError::WorkingArea(why)),
                }
            }
            _ => {
                self.build(&durable, boot);
                Ok(())
            }
        }
    }

    fn words(&self) -> &[AtomicU64] {
        self.work.words()
    }

    fn pages(&self) -> usize {
        self.header.table_pages as usize
    }

    /// The newest version of each table page in its slots.
    fn page_meta(&self) -> &[AtomicU64] {
        &self.words()[W_CONTROL..W_CONTROL + self.pages()]
    }

    /// Per table page, a count of changes not yet committed.
    fn dirty(&self) -> &[AtomicU64] {
        &self.words()[W_CONTROL + self.pages()..W_CONTROL + 2 * self.pages()]
    }

    /// Per table page, the sequence of its newest change in the journal
    /// (0: its slots hold its committed version): a checkpoint writes it.
    fn journaled(&self) -> &[AtomicU64] {
        &self.words()[W_CONTROL + 2 * self.pages()..W_CONTROL + 3 * self.pages()]
    }

    /// Whether the journal holds table entries (version 4), not pages.
    fn entry_journal(&self) -> bool {
        self.header.version >= ENTRY_JOURNAL
    }

    /// The sequence of page `p`'s version that the commit record's page
    /// hash counts: its slots' (version 4, whose journal holds entries),
    /// or its newest committed one (version 3's journal holds pages).
    fn hashed_seq(&self, p: usize) -> u64 {
        let home = self.page_meta()[p].load(Ordering::Acquire) >> 1;
        if self.entry_journal() {
            home
        } else {
            home.max(self.journaled()[p].load(Ordering::Acquire))
        }
    }

    /// The working table: 0 = unmapped, d + 1 = delta block d.
    fn table(&self) -> &[AtomicU64] {
        let at = W_CONTROL + 3 * self.pages();
        &self.words()[at..at + self.header.nblocks() as usize]
    }

    /// Version 4: a bit per block, set while its mapping is not committed
    /// (the records a flush journals). Empty before version 4.
    fn uncommitted(&self) -> &[AtomicU64] {
        if !self.entry_journal() {
            return &[];
        }
        let at = W_CONTROL + 3 * self.pages() + self.header.nblocks() as usize;
        &self.words()[at..at + self.header.nblocks().div_ceil(64) as usize]
    }

    /// Marks block `b`'s mapping uncommitted, and its page dirty.
    fn mark_uncommitted(&self, b: usize) {
        if let Some(w) = self.uncommitted().get(b / 64) {
            w.fetch_or(1 << (b % 64), Ordering::Release);
        }
        self.dirty()[b / ENTRIES_PER_PAGE].fetch_add(1, Ordering::Release);
    }

    fn next_free(&self) -> &AtomicU64 {
        &self.words()[W_NEXT_FREE]
    }

    /// Whether the working area is set up for this delta in this boot
    /// (`join`: by a server of this version, else of the one before too).
    fn marked_for(&self, boot: Option<[u8; 16]>, join: bool) -> bool {
        let w = self.words();
        let pair = |at: usize, v: &[u8; 16]| {
            w[at].load(Ordering::Acquire) == u64::from_le_bytes(v[..8].try_into().unwrap())
                && w[at + 1].load(Ordering::Acquire)
                    == u64::from_le_bytes(v[8..].try_into().unwrap())
        };
        let marker = w[W_MARKER].load(Ordering::Acquire);
        (marker == MARKER || (marker == MARKER_2 && !join))
            && pair(W_UUID, &self.header.uuid)
            && boot.is_some_and(|b| pair(W_BOOT, &b))
    }

    /// Builds the working area from the table on disk; the marker last.
    fn build(&self, d: &Durable, boot: Option<[u8; 16]>) {
        let w = self.words();
        w[W_MARKER].store(0, Ordering::Release);
        for (e, &v) in self.table().iter().zip(&d.table) {
            e.store(v, Ordering::Relaxed);
        }
        for x in self.dirty().iter().chain(self.uncommitted()) {
            x.store(0, Ordering::Relaxed);
        }
        // Entries are d + 1: the largest is the next free block.
        let next = d.table.iter().copied().max().unwrap_or(0);
        self.next_free().store(next, Ordering::Relaxed);
        w[W_SLOTS].store(0, Ordering::Relaxed);
        self.refresh_committed(d);
        let pair = |at: usize, v: [u8; 16]| {
            w[at].store(
                u64::from_le_bytes(v[..8].try_into().unwrap()),
                Ordering::Relaxed,
            );
            w[at + 1].store(
                u64::from_le_bytes(v[8..].try_into().unwrap()),
                Ordering::Relaxed,
            );
        };
        pair(W_UUID, self.header.uuid);
        pair(W_BOOT, boot.unwrap_or_default());
        w[W_MARKER].store(MARKER, Ordering::Release);
    }

    /// Takes the committed state (sequence, page versions, journal, hash)
    /// from disk.
    fn refresh_committed(&self, d: &Durable) {
        let w = self.words();
        for (m, &v) in self.page_meta().iter().zip(&d.pages) {
            m.store(v, Ordering::Relaxed);
        }
        for (m, &v) in self.journaled().iter().zip(&d.journaled) {
            m.store(v, Ordering::Relaxed);
        }
        w[W_JOURNAL].store(d.journal as u64, Ordering::Relaxed);
        for (i, chunk) in d.hash.chunks(8).enumerate() {
            w[W_HASH + i].store(
                u64::from_le_bytes(chunk.try_into().unwrap()),
                Ordering::Relaxed,
            );
        }
        w[W_COMMITTED].store(d.committed, Ordering::Release);
        w[W_COMMITTING].store(d.committed, Ordering::Release);
    }

    /// Whether the working area's last commit is the one on disk `d`: the
    /// same sequence, journal and page hash, or the commit a flush
    /// announced and died (or failed) right after writing.
    fn agrees_with(&self, d: &Durable) -> bool {
        let w = self.words();
        let committed = w[W_COMMITTED].load(Ordering::Acquire);
        let committing = w[W_COMMITTING].load(Ordering::Acquire);
        let hash = d.hash.chunks(8).enumerate().all(|(i, c)| {
            w[W_HASH + i].load(Ordering::Acquire) == u64::from_le_bytes(c.try_into().unwrap())
        });
        (d.committed == committed
            && w[W_JOURNAL].load(Ordering::Acquire) == d.journal as u64
            && hash)
            || (committing == committed.wrapping_add(1) && d.committed == committing)
    }

    /// Writes zeroes over the table slots at `offsets` (a torn erase is a
    /// torn slot: ignored). Durable with the next flush's first sync, so
    /// before its commit record.
    fn erase(&self, offsets: &[u64]) -> io::Result<()> {
        for &at in offsets {
            self.store.write_at(&[0u8; PAGE], at)?;
        }
        Ok(())
    }

    /// If a checkpoint wrote table slots and never committed (`W_SLOTS`
    /// above the last commit), erases them: they carry the sequence this
    /// flush takes. They lie in their pages' other slots (a checkpoint
    /// never writes the committed one). Returns whether it looked.
    fn erase_dead_checkpoint(&self) -> io::Result<bool> {
        let committed = self.words()[W_COMMITTED].load(Ordering::Acquire);
        if self.words()[W_SLOTS].load(Ordering::Acquire) <= committed {
            return Ok(false);
        }
        let mut stale = Vec::new();
        for p in 0..self.header.table_pages {
            let other = 1 - (self.page_meta()[p as usize].load(Ordering::Acquire) & 1) as u32;
            let at = self.header.slot_offset(p, other);
            let mut b = [0u8; PAGE];
            self.store.read_at(&mut b, at)?;
            if decode_page(&b, p).is_some_and(|(seq, _)| seq > committed) {
                stale.push(at);
            }
        }
        self.erase(&stale)?;
        Ok(true)
    }

    /// Checks an existing working area against the table on disk: every
    /// committed mapping is there unchanged, every mapping points at its
    /// own block below the allocation mark. Marks the pages that hold
    /// uncommitted mappings dirty; returns how many such mappings there are.
    fn check(&self, d: &Durable) -> Result<u64, String> {
        // Other servers may be allocating and mapping meanwhile: mappings
        // only ever appear, each below the mark when it appears, so the mark
        // read after the scan bounds every mapping the scan saw.
        let mut seen = std::collections::HashSet::new();
        let mut pending = 0;
        let mut highest = None;
        for (b, (w, &e)) in self.table().iter().zip(&d.table).enumerate() {
            let v = w.load(Ordering::Acquire);
            if e != 0 && v != e {
                return Err(format!(
                    "block {b} is mapped to {} on disk, {v} in the working table",
                    e - 1
                ));
            }
            if v == 0 {
                continue;
            }
            let blk = v - 1;
            if !seen.insert(blk) {
                return Err(format!("delta block {blk} is mapped twice"));
            }
            highest = highest.max(Some((blk, b)));
            if e == 0 {
                pending += 1;
                self.mark_uncommitted(b);
            }
        }
        let next = self.next_free().load(Ordering::Acquire);
        if let Some((blk, b)) = highest.filter(|(blk, _)| *blk >= next) {
            return Err(format!(
                "block {b} maps delta block {blk}, past the allocation mark {next}"
            ));
        }
        if self.header.block_offset(next).is_none() {
            return Err(format!("allocation mark {next} past the largest delta"));
        }
        Ok(pending)
    }

    /// Makes this process's flushes checkpoint once `pages` journal pages
    /// are in use (at most the delta's journal): tests make checkpoints
    /// come sooner with it.
    pub fn limit_journal(&mut self, pages: u32) {
        self.journal_limit = pages.min(self.header.journal_pages());
    }

    /// Stops this server: commits everything it and any other server
    /// acknowledged, and, if it is the delta's last server, removes the
    /// working area (the table then says all it held). It first makes sure
    /// it is the last one: once it is, no other server can write (a
    /// starting one waits), so the flush after it commits every write
    /// acknowledged before the area goes. (Flushing first, a server's first
    /// write acknowledged after that flush, its server then killed, lived
    /// only in the area removed.)
    pub fn stop(&self) -> io::Result<()> {
        let last = self.store.lock_sole()?;
        self.flush()?;
        if last {
            self.store.remove_working(&self.header.uuid)?;
        }
        Ok(())
    }

    /// Marks the delta as being merged (durably), before the base changes.
    pub fn mark_merging(&mut self) -> io::Result<()> {
        self.header.flags |= format::FLAG_MERGING;
        self.store.write_at(&self.header.encode(), 0)?;
        self.sync_store()
    }

    /// Makes what was written to the delta durable; after one failure,
    /// every later call fails (Linux dropped what it could not write).
    fn sync_store(&self) -> io::Result<()> {
        self.synced.sync(|| self.store.sync())
    }

    /// Where the delta lives.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The base.
    pub fn base(&self) -> &B {
        &self.base
    }

    /// The delta's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// How many mappings an adopted working area held that were not yet
    /// committed (None: the working area was built from the table).
    pub fn adopted(&self) -> Option<u64> {
        self.adopted
    }

    /// Whether virtual block `b` is in the delta.
    pub fn is_mapped(&self, b: u64) -> bool {
        self.table()[b as usize].load(Ordering::Acquire) != 0
    }

    /// Blocks the working table maps.
    pub fn mapped_blocks(&self) -> u64 {
        self.table()
            .iter()
            .filter(|e| e.load(Ordering::Relaxed) != 0)
            .count() as u64
    }

    fn bs(&self) -> u64 {
        self.header.block_size as u64
    }

    /// Byte offset of the delta block a table entry `e` (non-zero) names.
    fn data_at(&self, e: u64) -> io::Result<u64> {
        self.header
            .block_offset(e - 1)
            .ok_or_else(|| corrupt(format!("table entry {e} outside the data area")))
    }

    /// Calls `f(block, offset in block, range in the request)` for each
    /// block piece of `len` bytes at `offset`.
    fn pieces(
        &self,
        offset: u64,
        len: u64,
        f: impl FnMut(u64, u64, std::ops::Range<usize>) -> io::Result<()>,
    ) -> io::Result<()> {
        crate::backend::pieces(offset, len, self.header.virtual_size, self.bs(), f)
    }

    /// Reads `buf` at virtual `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.pieces(offset, buf.len() as u64, |block, inner, r| {
            match self.table()[block as usize].load(Ordering::Acquire) {
                // The virtual size is the base's, rounded down: inside it.
                0 => self.base.read_at(&mut buf[r], block * self.bs() + inner),
                e => self.store.read_at(&mut buf[r], self.data_at(e)? + inner),
            }
        })
    }

    /// Where `len` bytes at virtual `offset` lie in one piece: the base at
    /// the same offset (every block unmapped) or the delta (mapped to
    /// consecutive delta blocks). None: split between them, or scattered.
    /// Stays true while a READ that asked is in flight, except for writes
    /// racing it: a mapped block never moves, the base never changes.
    pub fn locate(&self, offset: u64, len: u64) -> Option<(Source, u64)> {
        let end = offset.checked_add(len)?;
        if len == 0 || end > self.header.virtual_size {
            return None;
        }
        let (first, last) = (offset / self.bs(), (end - 1) / self.bs());
        let table = self.table();
        let e0 = table[first as usize].load(Ordering::Acquire);
        let expect = |i: u64| if e0 == 0 { 0 } else { e0 + i };
        if (first + 1..=last)
            .any(|b| table[b as usize].load(Ordering::Acquire) != expect(b - first))
        {
            return None;
        }
        match e0 {
            0 => Some((Source::Base, offset)),
            e => Some((Source::Delta, self.data_at(e).ok()? + offset % self.bs())),
        }
    }

    /// Whether a write of `len` bytes at `offset` needs nothing of the
    /// base: each block it reaches is mapped, or it covers the block whole.
    pub fn writes_in_place(&self, offset: u64, len: u64) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        if len == 0 || end > self.header.virtual_size {
            return false;
        }
        let table = self.table();
        (offset / self.bs()..=(end - 1) / self.bs()).all(|b| {
            let whole = b * self.bs() >= offset && (b + 1) * self.bs() <= end;
            whole || table[b as usize].load(Ordering::Acquire) != 0
        })
    }

    /// Writes `data` at virtual `offset` (durably, with `fua`).
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.pieces(offset, data.len() as u64, |block, inner, r| {
            self.write_piece(block, inner, Piece::Data(&data[r]))
        })?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeroes; whole blocks are
    /// deallocated in the delta (`unmap`) rather than written.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.pieces(offset, len, |block, inner, r| {
            let n = (r.end - r.start) as u64;
            if unmap && inner == 0 && n == self.bs() {
                self.write_piece(block, 0, Piece::Hole)
            } else {
                self.write_piece(block, inner, Piece::Data(&vec![0u8; n as usize]))
            }
        })
    }

    fn write_piece(&self, block: u64, inner: u64, piece: Piece) -> io::Result<()> {
        let entry = &self.table()[block as usize];
        let in_place = |e: u64| -> io::Result<()> {
            let at = self.data_at(e)?;
            match piece {
                Piece::Data(data) => self.store.write_at(data, at + inner),
                Piece::Hole => self.store.punch(at, self.bs()),
            }
        };
        let mapped = entry.load(Ordering::Acquire);
        if mapped != 0 {
            return in_place(mapped);
        }
        // This process's threads, then other processes.
        let stripe = block as usize % STRIPES;
        let _local = self.stripes[stripe]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let _shared = lock_byte(&self.store, LOCK_BASE + stripe as u64)?;
        // Another writer may have copied it while we waited.
        let mapped = entry.load(Ordering::Acquire);
        if mapped != 0 {
            return in_place(mapped);
        }
        // First write: base ∪ data (or a hole) into a fresh block, then map
        // it (readers see the base or the complete new block, never a mix).
        let d = self.allocate()?;
        let at = self.data_at(d + 1)?;
        self.cover(at + self.bs())?;
        match piece {
            // A whole block needs nothing of the base, nor a copy.
            Piece::Data(data) if data.len() as u64 == self.bs() => self.store.write_at(data, at)?,
            Piece::Data(data) => {
                let mut full = vec![0u8; self.bs() as usize];
                self.base.read_at(&mut full, block * self.bs())?;
                full[inner as usize..inner as usize + data.len()].copy_from_slice(data);
                self.store.write_at(&full, at)?;
            }
            Piece::Hole => {
                // The block reads as zeroes (one allocated before a crash,
                // or by a killed server, may hold old data).
                self.store.punch(at, self.bs())?;
            }
        }
        self.publish(block, d);
        Ok(())
    }

    /// Makes the file hold at least `end` bytes, growing it by a chunk of
    /// zeroes when it does not. Only ever called for a block that is ours
    /// and not yet written, so the zeroes overwrite nobody's data: every
    /// block past the file's end is one whose writer is still here.
    fn cover(&self, end: u64) -> io::Result<()> {
        if self.filled.load(Ordering::Acquire) >= end {
            return Ok(());
        }
        let _local = self.grow_lock.lock().unwrap_or_else(|e| e.into_inner());
        let _shared = lock_byte(&self.store, GROW_LOCK)?;
        let len = self.store.size()?;
        let target = if len >= end {
            len
        } else {
            let chunk = GROW_CHUNK.max(4 * self.bs());
            let target = end.saturating_add(chunk).next_multiple_of(self.bs());
            crate::backend::fill_zeroes(|b, at| self.store.write_at(b, at), len, target - len)?;
            target
        };
        self.filled.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    /// Takes the next free delta block.
    fn allocate(&self) -> io::Result<u64> {
        let h = &self.header;
        self.next_free()
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                h.block_offset(n).map(|_| n + 1)
            })
            .map_err(|_| {
                corrupt("the delta has no room for another block (its allocation mark is damaged)")
            })
    }

    /// Maps `block` to delta block `d` and marks its table page dirty. The
    /// data is written (in the page cache) before: a flush that sees the
    /// mapping makes the data durable before the page.
    fn publish(&self, block: u64, d: u64) {
        self.table()[block as usize].store(d + 1, Ordering::Release);
        self.mark_uncommitted(block as usize);
    }

    /// Makes every acknowledged write durable: the data, then what changed
    /// in the table, then a commit record naming it. The changes go to the
    /// journal, one write, while it has room: the uncommitted mappings as
    /// records (version 4), or the pages that hold them (version 3). Else
    /// every page changed since the journal was last emptied goes to its
    /// own other slot (a checkpoint), and the journal starts over. One flush
    /// commits the first writes of every server of this delta.
    pub fn flush(&self) -> io::Result<()> {
        let _local = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let _shared = lock_byte(&self.store, PAGE_LOCK)?;
        self.catch_up()?;
        let erased = self.erase_dead_checkpoint()?;
        // Snapshot what is uncommitted: every mapping seen here points at
        // data written before it.
        let dirty: Vec<(usize, u64)> = self
            .dirty()
            .iter()
            .enumerate()
            .map(|(p, d)| (p, d.load(Ordering::Acquire)))
            .filter(|&(_, v)| v != 0)
            .collect();
        let (records, taken) = self.uncommitted_records(&dirty);
        if dirty.is_empty() || (self.entry_journal() && records.is_empty()) {
            // Nothing to commit (a page's count may outlive its records,
            // which a flush racing the first write took).
            self.clear_dirty(&dirty);
            self.sync_store()?;
            if erased {
                // The dead checkpoint's slots are durably gone.
                let w = self.words();
                w[W_SLOTS].store(w[W_COMMITTED].load(Ordering::Acquire), Ordering::Release);
            }
            return Ok(());
        }
        let w = self.words();
        let seq = w[W_COMMITTED].load(Ordering::Acquire) + 1;
        let used = w[W_JOURNAL].load(Ordering::Acquire) as u32;
        let need = if self.entry_journal() {
            records.len().div_ceil(RECORDS_PER_PAGE)
        } else {
            dirty.len()
        };
        let journal = used as usize + need <= self.journal_limit as usize;
        // A checkpoint also writes the pages with changes in the journal,
        // which it empties.
        let pages: Vec<usize> = if journal {
            dirty.iter().map(|&(p, _)| p).collect()
        } else {
            (0..self.pages())
                .filter(|&p| {
                    self.dirty()[p].load(Ordering::Acquire) != 0
                        || self.journaled()[p].load(Ordering::Acquire) != 0
                })
                .collect()
        };
        let mut hash = [0u8; 32];
        for (i, chunk) in hash.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&w[W_HASH + i].load(Ordering::Acquire).to_le_bytes());
        }
        let mut bytes = Vec::with_capacity(need * PAGE);
        if !journal {
            // Announced before any slot is written: should this flush not
            // commit, the next one erases what it wrote.
            w[W_SLOTS].store(seq, Ordering::Release);
        }
        if journal && self.entry_journal() {
            // Records leave the pages, and so the hash, as they are.
            for chunk in records.chunks(RECORDS_PER_PAGE) {
                bytes.extend_from_slice(&encode_records(seq, chunk));
            }
        } else {
            for &p in &pages {
                let page = encode_page(seq, p as u32, &self.page_entries(p));
                xor_into(&mut hash, &page_hash(p as u32, self.hashed_seq(p)));
                xor_into(&mut hash, &page_hash(p as u32, seq));
                if journal {
                    bytes.extend_from_slice(&page);
                } else {
                    let slot = (self.page_meta()[p].load(Ordering::Acquire) & 1) as u32;
                    self.store
                        .write_at(&page, self.header.slot_offset(p as u32, 1 - slot))?;
                }
            }
        }
        if journal {
            self.store
                .write_at(&bytes, self.header.journal_offset(used))?;
        }
        // The new versions count for nothing until a commit record names
        // them, so one sync makes the data and the table's changes durable
        // together, and only then is the commit written (two syncs a flush).
        self.sync_store()?;
        let now_used = if journal { used + need as u32 } else { 0 };
        let commit = Commit {
            seq,
            pages: hash,
            journal: now_used,
        };
        w[W_COMMITTING].store(seq, Ordering::Release);
        self.store
            .write_at(&commit.encode(self.header.version), Commit::slot(seq))?;
        self.sync_store()?;
        // Committed: record it (a server dying here is caught up by the
        // next flush, `catch_up`), and clear what was committed unless it
        // changed again meanwhile.
        for &p in &pages {
            if journal {
                self.journaled()[p].store(seq, Ordering::Release);
            } else {
                let meta = self.page_meta()[p].load(Ordering::Acquire);
                self.page_meta()[p].store(seq << 1 | (1 - (meta & 1)), Ordering::Release);
                self.journaled()[p].store(0, Ordering::Release);
            }
        }
        for (word, bits) in taken {
            self.uncommitted()[word].fetch_and(!bits, Ordering::AcqRel);
        }
        self.clear_dirty(&dirty);
        for (i, chunk) in hash.chunks(8).enumerate() {
            w[W_HASH + i].store(
                u64::from_le_bytes(chunk.try_into().unwrap()),
                Ordering::Release,
            );
        }
        w[W_JOURNAL].store(now_used as u64, Ordering::Release);
        w[W_COMMITTED].store(seq, Ordering::Release);
        Ok(())
    }

    /// Version 4: the uncommitted mappings of the `dirty` pages as journal
    /// records (block, entry), and the bits that name them (word, bits), to
    /// clear once they are committed. Empty before version 4.
    #[allow(clippy::type_complexity)]
    fn uncommitted_records(&self, dirty: &[(usize, u64)]) -> (Vec<(u64, u64)>, Vec<(usize, u64)>) {
        let (bits, table) = (self.uncommitted(), self.table());
        let (mut records, mut taken) = (Vec::new(), Vec::new());
        if bits.is_empty() {
            return (records, taken);
        }
        let nblocks = self.header.nblocks();
        for &(p, _) in dirty {
            let first = (p * ENTRIES_PER_PAGE) as u64;
            let end = (first + ENTRIES_PER_PAGE as u64).min(nblocks);
            let mut b = first;
            while b < end {
                // The bits of blocks b..end in b's word (pages share words).
                let word = (b / 64) as usize;
                let (lo, hi) = (b % 64, (end - word as u64 * 64).min(64));
                let mask = (u64::MAX >> (64 - hi)) & (u64::MAX << lo);
                let set = bits[word].load(Ordering::Acquire) & mask;
                if set != 0 {
                    taken.push((word, set));
                    let mut rest = set;
                    while rest != 0 {
                        let block = word as u64 * 64 + rest.trailing_zeros() as u64;
                        rest &= rest - 1;
                        records.push((block, table[block as usize].load(Ordering::Acquire)));
                    }
                }
                b = word as u64 * 64 + hi;
            }
        }
        (records, taken)
    }

    /// Clears the dirty counts a flush snapshot took, unless a page changed
    /// again meanwhile.
    fn clear_dirty(&self, dirty: &[(usize, u64)]) {
        for &(p, v) in dirty {
            let _ = self.dirty()[p].compare_exchange(v, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// A flusher that died between its commit record and recording it in
    /// the working area left the committed state behind: take it from disk.
    /// Only then is the commit record read: a flush's own syncs are its
    /// cost, not rereading what the working area already says.
    fn catch_up(&self) -> io::Result<()> {
        let w = self.words();
        let committed = w[W_COMMITTED].load(Ordering::Acquire);
        if w[W_COMMITTING].load(Ordering::Acquire) == committed {
            return Ok(());
        }
        let on_disk = read_commit(&self.store, &self.header)
            .map_err(corrupt)?
            .map_or(0, |c| c.seq);
        if on_disk != committed {
            let d = read_durable(&self.store, &self.header).map_err(|e| match e {
                DeltaError::Io(e) => e,
                other => corrupt(other),
            })?;
            self.erase(&d.stale)?;
            self.refresh_committed(&d);
        } else {
            // The record was never written (or failed): nothing to take.
            w[W_COMMITTING].store(committed, Ordering::Release);
        }
        Ok(())
    }

    /// The working table's entries of page `p`, padded to a full page.
    fn page_entries(&self, p: usize) -> [u64; ENTRIES_PER_PAGE] {
        let first = p * ENTRIES_PER_PAGE;
        let mut entries = [0u64; ENTRIES_PER_PAGE];
        let table = self.table();
        let n = (table.len() - first).min(ENTRIES_PER_PAGE);
        for (e, t) in entries[..n].iter_mut().zip(&table[first..first + n]) {
            *e = t.load(Ordering::Acquire);
        }
        entries
    }
}

/// Which file holds a range of the device (`Delta::locate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The base, at the same offset (no block of the range is mapped).
    Base,
    /// The delta (every block of the range is mapped, consecutively).
    Delta,
}

/// What a first write puts in a block.
#[derive(Clone, Copy)]
enum Piece<'a> {
    Data(&'a [u8]),
    /// Zeroes, deallocated.
    Hole,
}

/// 16 random bytes, to name a new delta.
fn random_uuid() -> io::Result<[u8; 16]> {
    use std::io::Read;
    let mut u = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut u)?;
    Ok(u)
}

/// The latest commit record, if any was written (a damaged one is an error).
fn read_commit<S: Storage>(store: &S, h: &Header) -> Result<Option<Commit>, DeltaError> {
    let mut best: Option<Commit> = None;
    for slot in 0..2u32 {
        let mut b = [0u8; PAGE];
        store.read_at(&mut b, format::COMMIT_OFFSET + slot as u64 * PAGE as u64)?;
        if let Some(c) = Commit::decode(&b, slot, h)? {
            if best.is_none_or(|x| c.seq > x.seq) {
                best = Some(c);
            }
        }
    }
    Ok(best)
}

/// Reads the committed table: for each page, the intact slot with the
/// highest sequence number not above the last commit (a slot that is torn,
/// or written by a flush that did not commit, is ignored). The versions
/// found must hash to what the commit record says, else a committed page
/// was damaged: that is refused, never rolled back. Every mapping must
/// point inside the data area, at a block of its own, within the file.
fn read_durable<S: Storage>(store: &S, h: &Header) -> Result<Durable, DeltaError> {
    let commit = read_commit(store, h)?;
    let committed = commit.map_or(0, |c| c.seq);
    let journal = commit.map_or(0, |c| c.journal);
    // The journal's pages in use were all durable before the commit that
    // counts them was written: one that is not intact, or names a page (a
    // block) the delta does not have or a later flush, is damage.
    let nblocks = h.nblocks();
    let mut in_journal: std::collections::HashMap<u32, (u64, [u64; ENTRIES_PER_PAGE])> =
        std::collections::HashMap::new();
    let mut records: Vec<(u64, u64, u64)> = Vec::new();
    for i in 0..journal {
        let mut b = [0u8; PAGE];
        store.read_at(&mut b, h.journal_offset(i))?;
        if h.version >= ENTRY_JOURNAL {
            // Flushes append in order: sequences never go down.
            let last = records.last().map_or(1, |r| r.0);
            match decode_records(&b) {
                Some((seq, recs))
                    if (last..=committed).contains(&seq)
                        && recs.iter().all(|&(blk, e)| blk < nblocks && e != 0) =>
                {
                    records.extend(recs.into_iter().map(|(blk, e)| (seq, blk, e)));
                }
                _ => return Err(FormatError::TableCorrupt.into()),
            }
            continue;
        }
        match decode_any_page(&b) {
            Some((seq, p, e)) if p < h.table_pages && seq <= committed => {
                if in_journal.get(&p).is_none_or(|(s, _)| seq > *s) {
                    in_journal.insert(p, (seq, e));
                }
            }
            _ => return Err(FormatError::TableCorrupt.into()),
        }
    }
    let mut pages = Vec::with_capacity(h.table_pages as usize);
    let mut journaled = Vec::with_capacity(h.table_pages as usize);
    let mut table = Vec::with_capacity(nblocks as usize);
    let mut hash = [0u8; 32];
    let mut stale = Vec::new();
    for p in 0..h.table_pages {
        let mut found: Option<(u64, u32, [u64; ENTRIES_PER_PAGE])> = None;
        for slot in 0..2 {
            let mut b = [0u8; PAGE];
            store.read_at(&mut b, h.slot_offset(p, slot))?;
            if let Some((seq, e)) = decode_page(&b, p) {
                if seq > committed {
                    stale.push(h.slot_offset(p, slot));
                } else if found.as_ref().is_none_or(|(s, _, _)| seq > *s) {
                    found = Some((seq, slot, e));
                }
            }
        }
        // Never committed: every block of the page unmapped (slot B is
        // "current", so the first write goes to slot A).
        let (seq, slot, entries) = found.unwrap_or((0, 1, [0; ENTRIES_PER_PAGE]));
        pages.push(seq << 1 | slot as u64);
        let (seq, entries) = match in_journal.remove(&p) {
            Some((js, je)) if js > seq => {
                journaled.push(js);
                (js, je)
            }
            _ => {
                journaled.push(0);
                (seq, entries)
            }
        };
        xor_into(&mut hash, &page_hash(p, seq));
        let first = p as u64 * ENTRIES_PER_PAGE as u64;
        let n = (nblocks - first).min(ENTRIES_PER_PAGE as u64) as usize;
        if entries[n..].iter().any(|&e| e != 0) {
            return Err(FormatError::TableCorrupt.into());
        }
        table.extend_from_slice(&entries[..n]);
    }
    let want = match commit {
        Some(c) => c.pages,
        None => {
            let mut empty = [0u8; 32];
            for p in 0..h.table_pages {
                xor_into(&mut empty, &page_hash(p, 0));
            }
            empty
        }
    };
    if hash != want {
        return Err(FormatError::TableCorrupt.into());
    }
    // Version 4: the journal's records, newer than the page's slot (a
    // checkpoint empties the journal), map a block that is unmapped there
    // or already so (a mapping a checkpoint took before its record).
    for (seq, blk, e) in records {
        let p = (blk / ENTRIES_PER_PAGE as u64) as usize;
        let t = &mut table[blk as usize];
        if seq <= pages[p] >> 1 || (*t != 0 && *t != e) {
            return Err(FormatError::TableCorrupt.into());
        }
        *t = e;
        journaled[p] = seq;
    }
    // The length is read after the table: a running server may have grown
    // the delta meanwhile, and its data precedes the page that maps it.
    let len = store.size()?;
    let mut seen = std::collections::HashSet::with_capacity(table.len());
    for (b, &e) in table.iter().enumerate() {
        if e == 0 {
            continue;
        }
        let d = e - 1;
        let in_file = h
            .block_offset(d)
            .and_then(|off| off.checked_add(h.block_size as u64))
            .is_some_and(|end| end <= len);
        if !in_file {
            return Err(FormatError::EntryOutOfRange { block: b as u64 }.into());
        }
        if !seen.insert(d) {
            let other = table.iter().position(|&x| x == e).unwrap_or(0) as u64;
            return Err(FormatError::EntryShared(other, b as u64).into());
        }
    }
    Ok(Durable {
        committed,
        pages,
        journaled,
        journal,
        hash,
        table,
        stale,
    })
}
