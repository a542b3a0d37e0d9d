//! A delta over a base: block remapping, first-write copies and the flush
//! protocol of docs/cow-format.md. Safe to use from many threads at once.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::format::{self, decode_page, encode_page, FormatError, Header, ENTRIES_PER_PAGE, PAGE};
use super::storage::Storage;

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

/// What the last completed flush made durable, per table page.
struct Durable {
    /// (sequence, slot holding it, entries) per page.
    pages: Vec<(u64, u32, Vec<u64>)>,
}

/// Lock stripes for first writes: writes to different parts of one block
/// that is not yet copied must not both copy it.
const STRIPES: usize = 64;

/// A cow device's state.
pub struct Delta<S: Storage, B: Storage> {
    header: Header,
    store: S,
    base: B,
    /// Working table: 0 = unmapped, d + 1 = delta block d.
    table: Vec<AtomicU64>,
    next_free: AtomicU64,
    stripes: Vec<Mutex<()>>,
    durable: Mutex<Durable>,
}

impl<S: Storage, B: Storage> Delta<S, B> {
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

    /// Opens a delta: checks the header, the base's identity and the table.
    pub fn open(store: S, base: B) -> Result<Self, DeltaError> {
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
        let got = base.size()?;
        if got != header.base_size {
            return Err(DeltaError::BaseSize {
                want: header.base_size,
                got,
            });
        }
        if format::digest(|off, buf| base.read_at(buf, off), got)? != header.base_digest {
            return Err(DeltaError::BaseDigest);
        }
        let nblocks = header.nblocks();
        let mut table = Vec::with_capacity(nblocks as usize);
        let mut pages = Vec::with_capacity(header.table_pages as usize);
        for p in 0..header.table_pages {
            let (seq, slot, entries) = read_page(&store, &header, p)?;
            let first = p as u64 * ENTRIES_PER_PAGE as u64;
            let n = (nblocks - first).min(ENTRIES_PER_PAGE as u64) as usize;
            table.extend(entries[..n].iter().map(|&e| AtomicU64::new(e)));
            pages.push((seq, slot, entries.to_vec()));
        }
        // Every mapping must point inside the file, and at its own block.
        let mut owner = std::collections::HashMap::new();
        let mut next_free = 0;
        for (b, e) in table.iter().enumerate() {
            let e = e.load(Ordering::Relaxed);
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
        Ok(Delta {
            header,
            store,
            base,
            table,
            next_free: AtomicU64::new(next_free),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            durable: Mutex::new(Durable { pages }),
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Whether virtual block `b` is in the delta.
    pub fn is_mapped(&self, b: u64) -> bool {
        self.table[b as usize].load(Ordering::Acquire) != 0
    }

    /// Blocks the working table maps.
    pub fn mapped_blocks(&self) -> u64 {
        self.table
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
            match self.table[block as usize].load(Ordering::Acquire) {
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
        let entry = &self.table[block as usize];
        let mapped = entry.load(Ordering::Acquire);
        if mapped != 0 {
            return self
                .store
                .write_at(data, self.header.block_offset(mapped - 1) + inner);
        }
        let _stripe = self.stripes[block as usize % STRIPES]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Another writer may have copied it while we waited.
        let mapped = entry.load(Ordering::Acquire);
        if mapped != 0 {
            return self
                .store
                .write_at(data, self.header.block_offset(mapped - 1) + inner);
        }
        // First write: base ∪ data into a fresh block, then map it (readers
        // see the base or the complete new block, never a mix).
        let mut full = vec![0u8; self.bs() as usize];
        if data.len() as u64 != self.bs() {
            self.read_base(&mut full, block * self.bs())?;
        }
        full[inner as usize..inner as usize + data.len()].copy_from_slice(data);
        let d = self.next_free.fetch_add(1, Ordering::Relaxed);
        self.store.write_at(&full, self.header.block_offset(d))?;
        entry.store(d + 1, Ordering::Release);
        // The mapping lives only in this process until a flush writes it
        // out: make it durable now, so that a server killed after
        // acknowledging the write loses nothing (in-place rewrites are in
        // the page cache and survive the process).
        self.persist_block(block)
    }

    /// Makes every completed write durable, table included.
    pub fn flush(&self) -> io::Result<()> {
        let mut durable = self.durable.lock().unwrap_or_else(|e| e.into_inner());
        // 1. Snapshot: each mapping in it was made after its data was written.
        let pages: Vec<Vec<u64>> = (0..durable.pages.len())
            .map(|p| self.page_entries(p))
            .collect();
        // 2. That data is durable before 3. any table page that points at it.
        self.store.sync()?;
        let mut wrote = false;
        for (p, entries) in pages.into_iter().enumerate() {
            wrote |= self.write_page(&mut durable, p, entries)?;
        }
        if wrote {
            self.store.sync()?;
        }
        Ok(())
    }

    /// Makes the table page holding `block` durable (the flush protocol for
    /// one page): what a first write needs before it is acknowledged.
    fn persist_block(&self, block: u64) -> io::Result<()> {
        let p = (block / ENTRIES_PER_PAGE as u64) as usize;
        let mut durable = self.durable.lock().unwrap_or_else(|e| e.into_inner());
        let entries = self.page_entries(p);
        self.store.sync()?;
        if self.write_page(&mut durable, p, entries)? {
            self.store.sync()?;
        }
        Ok(())
    }

    /// The working table's entries of page `p`, padded to a full page.
    fn page_entries(&self, p: usize) -> Vec<u64> {
        let first = p * ENTRIES_PER_PAGE;
        let mut entries = vec![0u64; ENTRIES_PER_PAGE];
        let n = (self.table.len() - first).min(ENTRIES_PER_PAGE);
        for (e, t) in entries[..n].iter_mut().zip(&self.table[first..first + n]) {
            *e = t.load(Ordering::Acquire);
        }
        entries
    }

    /// Writes page `p` into its other slot if it changed; true if it did.
    fn write_page(&self, durable: &mut Durable, p: usize, entries: Vec<u64>) -> io::Result<bool> {
        let page = &mut durable.pages[p];
        if entries == page.2 {
            return Ok(false);
        }
        // Into the other slot, so a torn write leaves the old version.
        let (seq, slot) = (page.0 + 1, 1 - page.1);
        let bytes = encode_page(seq, p as u32, &entries);
        self.store
            .write_at(&bytes, self.header.slot_offset(p as u32, slot))?;
        *page = (seq, slot, entries);
        Ok(true)
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
