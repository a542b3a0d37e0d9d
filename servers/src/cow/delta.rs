//! A delta over a base: block remapping, first-write copies and the flush
//! protocol of docs/cow-format.md. Safe to use from many threads at once.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::format::{self, decode_page, encode_page, FormatError, Header, ENTRIES_PER_PAGE, PAGE};
use super::storage::{Shared, Storage};

/// Why a delta could not be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("wrong base: the delta was made over a base of {want} bytes, this one has {got}")]
    BaseSize { want: u64, got: u64 },
    #[error("wrong base, or the base changed since the delta was made (its contents differ)")]
    BaseDigest,
}

/// The working area: the next free delta block and the working table.
/// Shared between processes through a mapping of the delta, or private.
struct Working {
    map: Option<memmap2::MmapMut>,
    local: Vec<AtomicU64>,
}

impl Working {
    /// u64 0: the next free block; then one entry per block.
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

/// Lock stripes for first writes: writes to different parts of one block
/// that is not yet copied must not both copy it.
const STRIPES: usize = 64;

/// A cow device's state.
pub struct Delta<S: Shared, B: Storage> {
    header: Header,
    store: S,
    base: B,
    /// The next free block and the working table (0 = unmapped, d + 1 =
    /// delta block d), possibly shared with other serving processes.
    work: Working,
    stripes: Vec<Mutex<()>>,
    /// Serialises this process's table page updates (the OFD lock on
    /// `PAGE_LOCK` does it between processes).
    page_lock: Mutex<()>,
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

impl<S: Shared, B: Storage> Delta<S, B> {
    /// Makes a new, empty delta in `store` (which must be empty) over `base`.
    pub fn create(store: S, base: B, block_size: u32, base_path: &str) -> Result<Self, DeltaError> {
        let base_size = base.size()?;
        let virtual_size = base_size - base_size % block_size as u64;
        let digest = format::digest(|off, buf| base.read_at(buf, off), base_size)?;
        let header = Header::new(block_size, virtual_size, base_size, digest, base_path)?;
        store.write_at(&header.encode(), 0)?;
        // The table slots are all zero: never written, every block unmapped.
        store.write_at(&[0], header.data_offset - 1)?;
        store.sync()?;
        Self::open(store, base)
    }

    /// Opens a delta as its first (or only) server: checks the header, the
    /// base's identity and the table, and fills the working area from the
    /// table.
    pub fn open(store: S, base: B) -> Result<Self, DeltaError> {
        Self::open_with(store, base, true, false)
    }

    /// Opens a delta that another server already serves: the working area
    /// is live and is used as it is.
    pub fn join(store: S, base: B) -> Result<Self, DeltaError> {
        Self::open_with(store, base, false, false)
    }

    /// Opens a delta to merge it into its base: a merge that was
    /// interrupted left the base partly written, so its digest is not
    /// checked then (the merge is finished instead).
    pub fn open_for_merge(store: S, base: B) -> Result<Self, DeltaError> {
        Self::open_with(store, base, true, true)
    }

    fn open_with(store: S, base: B, init: bool, merging: bool) -> Result<Self, DeltaError> {
        let mut hb = [0u8; PAGE];
        let len = store.size()?;
        if len < PAGE as u64 {
            return Err(FormatError::Truncated(len, PAGE as u64).into());
        }
        store.read_at(&mut hb, 0)?;
        let header = Header::decode(&hb)?;
        if len < header.data_offset {
            return Err(FormatError::Truncated(len, header.data_offset).into());
        }
        let interrupted = header.flags & format::FLAG_MERGING != 0;
        if interrupted && !merging {
            return Err(FormatError::Merging.into());
        }
        let got = base.size()?;
        if got != header.base_size {
            return Err(DeltaError::BaseSize {
                want: header.base_size,
                got,
            });
        }
        if !interrupted
            && format::digest(|off, buf| base.read_at(buf, off), got)? != header.base_digest
        {
            return Err(DeltaError::BaseDigest);
        }
        let nblocks = header.nblocks();
        let mut table: Vec<u64> = Vec::with_capacity(nblocks as usize);
        for p in 0..header.table_pages {
            let (_, _, entries) = read_page(&store, &header, p)?;
            let first = p as u64 * ENTRIES_PER_PAGE as u64;
            let n = (nblocks - first).min(ENTRIES_PER_PAGE as u64) as usize;
            table.extend_from_slice(&entries[..n]);
        }
        // Every mapping must point inside the file, and at its own block.
        // The length is read after the table: a running server may have
        // grown the delta meanwhile, and its data precedes the page that
        // maps it.
        let len = store.size()?;
        let mut owner = std::collections::HashMap::new();
        let mut next_free = 0;
        for (b, &e) in table.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let d = e - 1;
            if header.block_offset(d) + header.block_size as u64 > len {
                return Err(FormatError::EntryOutOfRange { block: b as u64 }.into());
            }
            if let Some(other) = owner.insert(d, b as u64) {
                return Err(FormatError::EntryShared(other, b as u64).into());
            }
            next_free = next_free.max(d + 1);
        }
        let map = store.map_shared(header.work_offset(), header.work_len())?;
        let local = if map.is_some() {
            Vec::new()
        } else {
            (0..1 + nblocks).map(|_| AtomicU64::new(0)).collect()
        };
        let delta = Delta {
            header,
            store,
            base,
            work: Working { map, local },
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            page_lock: Mutex::new(()),
        };
        if init || delta.work.map.is_none() {
            delta.work.words()[0].store(next_free, Ordering::Relaxed);
            for (w, &e) in delta.table().iter().zip(&table) {
                w.store(e, Ordering::Relaxed);
            }
        }
        Ok(delta)
    }

    /// The working table.
    fn table(&self) -> &[AtomicU64] {
        &self.work.words()[1..1 + self.header.nblocks() as usize]
    }

    fn next_free(&self) -> &AtomicU64 {
        &self.work.words()[0]
    }

    /// Marks the delta as being merged (durably), before the base changes.
    pub fn mark_merging(&mut self) -> io::Result<()> {
        self.header.flags |= format::FLAG_MERGING;
        self.store.write_at(&self.header.encode(), 0)?;
        self.store.sync()
    }

    /// Where the delta lives.
    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn header(&self) -> &Header {
        &self.header
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

    /// Calls `f(block, offset in block, range in buf)` for each block piece.
    fn pieces(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, u64, std::ops::Range<usize>) -> io::Result<()>,
    ) -> io::Result<()> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.header.virtual_size)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "beyond the end of the device",
            ));
        }
        let mut done = 0;
        while done < len {
            let at = offset + done as u64;
            let (block, inner) = (at / self.bs(), at % self.bs());
            let n = ((self.bs() - inner) as usize).min(len - done);
            f(block, inner, done..done + n)?;
            done += n;
        }
        Ok(())
    }

    fn read_base(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // The virtual size is the base's, rounded down: always inside it.
        self.base.read_at(buf, offset)
    }

    /// Reads `buf` at virtual `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.pieces(offset, buf.len(), |block, inner, r| {
            match self.table()[block as usize].load(Ordering::Acquire) {
                0 => self.read_base(&mut buf[r], block * self.bs() + inner),
                e => self
                    .store
                    .read_at(&mut buf[r], self.header.block_offset(e - 1) + inner),
            }
        })
    }

    /// Writes `data` at virtual `offset` (durably, with `fua`).
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.pieces(offset, data.len(), |block, inner, r| {
            self.write_piece(block, inner, &data[r])
        })?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_piece(&self, block: u64, inner: u64, data: &[u8]) -> io::Result<()> {
        let entry = &self.table()[block as usize];
        let in_place = |mapped: u64| {
            self.store
                .write_at(data, self.header.block_offset(mapped - 1) + inner)
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
        // First write: base ∪ data into a fresh block, then map it (readers
        // see the base or the complete new block, never a mix).
        let mut full = vec![0u8; self.bs() as usize];
        if data.len() as u64 != self.bs() {
            self.read_base(&mut full, block * self.bs())?;
        }
        full[inner as usize..inner as usize + data.len()].copy_from_slice(data);
        let d = self.next_free().fetch_add(1, Ordering::Relaxed);
        self.store.write_at(&full, self.header.block_offset(d))?;
        entry.store(d + 1, Ordering::Release);
        // The working table is memory that dies with the servers: make the
        // mapping durable now, so that a server killed after acknowledging
        // the write loses nothing (in-place rewrites are in the page cache
        // and survive the process).
        self.persist_block(block)
    }

    /// Makes every completed write durable, table included. (Every mapping
    /// an acknowledged write made is on disk already: see `persist_block`.)
    pub fn flush(&self) -> io::Result<()> {
        self.store.sync()
    }

    /// Makes the table page holding `block` durable, with everything the
    /// working table maps in it (this or another server's first writes):
    /// data first, then the page, into its other slot.
    fn persist_block(&self, block: u64) -> io::Result<()> {
        let p = (block / ENTRIES_PER_PAGE as u64) as u32;
        let _local = self.page_lock.lock().unwrap_or_else(|e| e.into_inner());
        let _shared = lock_byte(&self.store, PAGE_LOCK)?;
        let entries = self.page_entries(p as usize);
        self.store.sync()?;
        let (seq, slot, on_disk) =
            read_page(&self.store, &self.header, p).map_err(|e| match e {
                DeltaError::Io(e) => e,
                other => io::Error::other(other.to_string()),
            })?;
        if entries[..] == on_disk[..] {
            return Ok(());
        }
        let bytes = encode_page(seq + 1, p, &entries);
        self.store
            .write_at(&bytes, self.header.slot_offset(p, 1 - slot))?;
        self.store.sync()
    }

    /// The working table's entries of page `p`, padded to a full page.
    fn page_entries(&self, p: usize) -> Vec<u64> {
        let first = p * ENTRIES_PER_PAGE;
        let mut entries = vec![0u64; ENTRIES_PER_PAGE];
        let table = self.table();
        let n = (table.len() - first).min(ENTRIES_PER_PAGE);
        for (e, t) in entries[..n].iter_mut().zip(&table[first..first + n]) {
            *e = t.load(Ordering::Acquire);
        }
        entries
    }
}

/// Reads table page `p`: the intact slot with the higher sequence number.
fn read_page<S: Storage>(
    store: &S,
    h: &Header,
    p: u32,
) -> Result<(u64, u32, [u64; ENTRIES_PER_PAGE]), DeltaError> {
    let mut best: Option<(u64, u32, [u64; ENTRIES_PER_PAGE])> = None;
    let mut torn = 0;
    for slot in 0..2 {
        let mut b = [0u8; PAGE];
        store.read_at(&mut b, h.slot_offset(p, slot))?;
        match decode_page(&b, p) {
            Some((seq, e)) if best.is_none_or(|(s, _, _)| seq > s) => best = Some((seq, slot, e)),
            Some(_) => {}
            None if b.iter().all(|&x| x == 0) => {}
            None => torn += 1,
        }
    }
    match best {
        Some(found) => Ok(found),
        // Never written: every block of the page is unmapped. (The first
        // write of slot A may have been torn: its mapping was not durable.)
        None if torn < 2 => Ok((0, 1, [0; ENTRIES_PER_PAGE])),
        None => Err(FormatError::TablePage(p).into()),
    }
}
