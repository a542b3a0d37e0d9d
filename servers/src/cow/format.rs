//! The delta's on-disk structures (docs/cow-format.md): header and table
//! pages, with their checksums.

use rayon::prelude::*;
use sha2::{Digest, Sha256};

/// The magic at the start of a delta's header.
pub const MAGIC: &[u8; 8] = b"ABUSECOW";
/// The version `create` writes (a journal of table entries); versions 2
/// (no journal) and 3 (a journal of whole table pages) are still read and
/// served.
pub const VERSION: u32 = 4;
/// The first version whose journal holds table entries, not pages.
pub const ENTRY_JOURNAL: u32 = 4;
/// Pages in a delta's journal (version 3 on): 16 per table page (so that
/// flushes checkpoint rarely), from 64 to 1024.
pub fn journal_pages(table_pages: u32) -> u32 {
    table_pages.saturating_mul(16).clamp(64, 1024)
}
/// The size of a metadata page: header, commit record, journal or table page.
pub const PAGE: usize = 4096;
/// Table entries per page (after the 16-byte page header).
pub const ENTRIES_PER_PAGE: usize = (PAGE - 16) / 8;
/// (block, entry) records per page of a version 4 journal.
pub const RECORDS_PER_PAGE: usize = (PAGE - 16) / 16;
/// The smallest block size.
pub const MIN_BLOCK: u32 = 4096;
/// The largest block size.
pub const MAX_BLOCK: u32 = 1 << 20;
/// The largest virtual size: every offset fits an i64 with room to spare.
pub const MAX_SIZE: u64 = 1 << 60;
const UUID_AT: usize = 96;
const DATA_OFFSET_AT: usize = 112;
const TABLE_PAGES_AT: usize = 120;
const FLAGS_AT: usize = 124;
const PATH_AT: usize = 128;
const PATH_LEN: usize = 256;
const HEADER_CRC_AT: usize = PATH_AT + PATH_LEN;
/// `Header::flags`: a merge into the base started and did not finish.
pub const FLAG_MERGING: u32 = 1;
/// Offset of the two commit slots (A, B), one page each.
pub const COMMIT_OFFSET: u64 = PAGE as u64;
/// Offset of the journal (version 3), or the table (version 2).
pub const JOURNAL_OFFSET: u64 = 3 * PAGE as u64;
const COMMIT_MAGIC: &[u8; 8] = b"ABUSECMT";

/// Why a delta cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// The file does not start with [`MAGIC`].
    #[error("not an ABUSE cow delta (bad magic)")]
    Magic,
    /// A version this build does not read.
    #[error("unsupported delta version {0} (this build reads versions 2 to {VERSION})")]
    Version(u32),
    /// The header's checksum does not match.
    #[error("the delta header is corrupt (checksum mismatch)")]
    HeaderChecksum,
    /// The header's fields contradict each other.
    #[error("the delta header is inconsistent: {0}")]
    Inconsistent(String),
    /// The file is shorter than its table needs: its size, and the size needed.
    #[error("the delta is truncated: {0} bytes, its table needs {1}")]
    Truncated(u64, u64),
    /// A merge into the base was interrupted ([`FLAG_MERGING`]).
    #[error("a merge into the base was interrupted: run `abusectl cow merge` again to finish it")]
    Merging,
    /// A commit record (in the slot given) is corrupt.
    #[error("the delta's commit record (slot {0}) is corrupt")]
    CommitRecord(u32),
    /// The table pages the last commit names are not all on disk.
    #[error("the delta's table is corrupt: the committed versions of its pages are not all there (a page was damaged after it was committed)")]
    TableCorrupt,
    /// A table entry points outside the data area.
    #[error("table entry for block {block} points outside the delta's data area")]
    EntryOutOfRange {
        /// The virtual block whose entry it is.
        block: u64,
    },
    /// Two blocks' table entries point at the same delta block.
    #[error("table entries for blocks {0} and {1} point at the same delta block")]
    EntryShared(u64, u64),
}

/// The delta's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 (no journal), 3 (a journal of pages) or 4 (of entries).
    pub version: u32,
    /// The size of a block in bytes: the unit the delta copies and maps.
    pub block_size: u32,
    /// The size of the device in bytes (whole blocks).
    pub virtual_size: u64,
    /// The size of the base in bytes.
    pub base_size: u64,
    /// SHA-256 over the base's size and samples of it: checked at every open.
    pub base_sample: [u8; 32],
    /// SHA-256 over the whole base (see [`digest`]), taken at create:
    /// checked on request (`cow info --verify`).
    pub base_digest: [u8; 32],
    /// Names this delta: the working area records whose it is.
    pub uuid: [u8; 16],
    /// Byte offset of the data area (the delta's blocks).
    pub data_offset: u64,
    /// Pages in the table.
    pub table_pages: u32,
    /// The base's path, as the delta records it.
    pub base_path: String,
    /// `FLAG_*`.
    pub flags: u32,
}

/// A base's identity, as a delta records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseId {
    /// The base's size in bytes.
    pub size: u64,
    /// SHA-256 over the base's size and samples of it
    /// ([`Header::base_sample`]).
    pub sample: [u8; 32],
    /// SHA-256 over the whole base ([`Header::base_digest`]).
    pub digest: [u8; 32],
}

impl Header {
    /// A header for a delta over `base` in blocks of `block_size`: its
    /// virtual size is the base's, rounded down to a whole block.
    pub fn new(
        block_size: u32,
        base: &BaseId,
        uuid: [u8; 16],
        base_path: &str,
    ) -> Result<Self, FormatError> {
        let virtual_size = base.size - base.size % block_size.max(1) as u64;
        Self::with_geometry(VERSION, block_size, virtual_size, base, uuid, base_path)
    }

    fn with_geometry(
        version: u32,
        block_size: u32,
        virtual_size: u64,
        base: &BaseId,
        uuid: [u8; 16],
        base_path: &str,
    ) -> Result<Self, FormatError> {
        let bad = |why: String| Err(FormatError::Inconsistent(why));
        if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
            return bad(format!(
                "block size {block_size} is not a power of two from 4 KiB to 1 MiB"
            ));
        }
        if virtual_size == 0
            || virtual_size > MAX_SIZE
            || !virtual_size.is_multiple_of(block_size as u64)
        {
            return bad(format!(
                "size {virtual_size} is not a positive multiple of the block size {block_size} up to {MAX_SIZE}"
            ));
        }
        // The virtual size is the base's, rounded down to a whole block.
        if base
            .size
            .checked_sub(virtual_size)
            .is_none_or(|d| d >= block_size as u64)
        {
            return bad(format!(
                "size {virtual_size} is not the base's {} rounded down to the block size {block_size}",
                base.size
            ));
        }
        let nblocks = virtual_size / block_size as u64;
        let table_pages: u32 = nblocks
            .div_ceil(ENTRIES_PER_PAGE as u64)
            .try_into()
            .map_err(|_| FormatError::Inconsistent("too many blocks".into()))?;
        if base_path.len() >= PATH_LEN {
            return bad(format!("base path longer than {} bytes", PATH_LEN - 1));
        }
        let mut h = Header {
            version,
            block_size,
            virtual_size,
            base_size: base.size,
            base_sample: base.sample,
            base_digest: base.digest,
            uuid,
            data_offset: 0,
            table_pages,
            base_path: base_path.into(),
            flags: 0,
        };
        // No overflow: nblocks <= 2^48, so every term is far below 2^64.
        // Version 2 kept its working area in the file, before the data.
        let table_end = h.table_offset() + 2 * PAGE as u64 * table_pages as u64;
        h.data_offset = match version {
            2 => table_end + (PAGE as u64 + 8 * (2 * table_pages as u64 + nblocks)),
            _ => table_end,
        }
        .next_multiple_of(PAGE as u64)
        .next_multiple_of(block_size as u64);
        Ok(h)
    }

    /// The device's size in blocks.
    pub fn nblocks(&self) -> u64 {
        self.virtual_size / self.block_size as u64
    }

    /// Pages in the journal (0: version 2 has none).
    pub fn journal_pages(&self) -> u32 {
        if self.version >= 3 {
            journal_pages(self.table_pages)
        } else {
            0
        }
    }

    /// Byte offset of journal page `i`.
    pub fn journal_offset(&self, i: u32) -> u64 {
        JOURNAL_OFFSET + i as u64 * PAGE as u64
    }

    fn table_offset(&self) -> u64 {
        self.journal_offset(self.journal_pages())
    }

    /// Where the metadata ends (the data area starts at or after it).
    pub fn metadata_end(&self) -> u64 {
        self.table_offset() + 2 * PAGE as u64 * self.table_pages as u64
    }

    /// The size of the working area (see `delta::Working`, which lives in
    /// shared memory): a page of control words, then three words per table
    /// page, then one word per block (the working table), then (version 4)
    /// a bit per block: its mapping is not yet committed.
    pub fn work_len(&self) -> u64 {
        let bits = if self.version >= ENTRY_JOURNAL {
            self.nblocks().div_ceil(64)
        } else {
            0
        };
        (PAGE as u64 + 8 * (3 * self.table_pages as u64 + self.nblocks() + bits))
            .next_multiple_of(PAGE as u64)
    }

    /// Byte offset of delta block `d`, if the block fits an `off_t`. There
    /// is no other bound: a block a killed server allocated but never
    /// mapped is lost (until a merge starts a fresh delta), so a delta may
    /// hold more blocks than the device has; a table entry must still point
    /// within the file.
    pub fn block_offset(&self, d: u64) -> Option<u64> {
        d.checked_mul(self.block_size as u64)
            .and_then(|o| o.checked_add(self.data_offset))
            .filter(|o| {
                o.checked_add(self.block_size as u64)
                    .is_some_and(|end| end <= i64::MAX as u64)
            })
    }

    /// Byte offset of slot `slot` (0 = A, 1 = B) of table page `page`.
    pub fn slot_offset(&self, page: u32, slot: u32) -> u64 {
        self.table_offset() + (2 * page as u64 + slot as u64) * PAGE as u64
    }

    /// The identity of the base the delta was made over.
    pub fn base_id(&self) -> BaseId {
        BaseId {
            size: self.base_size,
            sample: self.base_sample,
            digest: self.base_digest,
        }
    }

    /// The header page, with its checksum.
    pub fn encode(&self) -> [u8; PAGE] {
        let mut b = [0u8; PAGE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.virtual_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.base_size.to_le_bytes());
        b[32..64].copy_from_slice(&self.base_sample);
        b[64..96].copy_from_slice(&self.base_digest);
        b[UUID_AT..UUID_AT + 16].copy_from_slice(&self.uuid);
        b[DATA_OFFSET_AT..DATA_OFFSET_AT + 8].copy_from_slice(&self.data_offset.to_le_bytes());
        b[TABLE_PAGES_AT..TABLE_PAGES_AT + 4].copy_from_slice(&self.table_pages.to_le_bytes());
        b[FLAGS_AT..FLAGS_AT + 4].copy_from_slice(&self.flags.to_le_bytes());
        b[PATH_AT..PATH_AT + self.base_path.len()].copy_from_slice(self.base_path.as_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_CRC_AT]);
        b[HEADER_CRC_AT..HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header page, checking its magic, checksum, version and
    /// geometry.
    pub fn decode(b: &[u8; PAGE]) -> Result<Self, FormatError> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        if &b[0..8] != MAGIC {
            return Err(FormatError::Magic);
        }
        if crc32c::crc32c(&b[..HEADER_CRC_AT]) != u32_at(HEADER_CRC_AT) {
            return Err(FormatError::HeaderChecksum);
        }
        let version = u32_at(8);
        if !(2..=VERSION).contains(&version) {
            return Err(FormatError::Version(version));
        }
        let path_bytes = &b[PATH_AT..PATH_AT + PATH_LEN];
        let end = path_bytes
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(path_bytes.len());
        let path = String::from_utf8_lossy(&path_bytes[..end]).into_owned();
        let base = BaseId {
            size: u64_at(24),
            sample: b[32..64].try_into().unwrap(),
            digest: b[64..96].try_into().unwrap(),
        };
        let mut h = Header::with_geometry(
            version,
            u32_at(12),
            u64_at(16),
            &base,
            b[UUID_AT..UUID_AT + 16].try_into().unwrap(),
            &path,
        )?;
        h.flags = u32_at(FLAGS_AT);
        if h.flags & !FLAG_MERGING != 0 {
            return Err(FormatError::Inconsistent(format!(
                "unknown flags {:#x}",
                h.flags
            )));
        }
        if h.data_offset != u64_at(DATA_OFFSET_AT) || h.table_pages != u32_at(TABLE_PAGES_AT) {
            return Err(FormatError::Inconsistent(
                "table geometry does not match the sizes".into(),
            ));
        }
        Ok(h)
    }
}

/// A commit record: flush `seq` made durable the table pages whose
/// committed versions hash to `pages`, some of them in the first `journal`
/// pages of the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    /// The flush that made this commit.
    pub seq: u64,
    /// The XOR of every table page's [`page_hash`], for the flush that
    /// committed it.
    pub pages: [u8; 32],
    /// Journal pages in use (always 0 in version 2).
    pub journal: u32,
}

/// Where a commit record's checksum lies: version 2's records end at the
/// hash, version 3's hold the journal's length after it.
fn commit_crc_at(version: u32) -> usize {
    if version >= 3 {
        52
    } else {
        48
    }
}

impl Commit {
    /// Its slot: commits alternate, so the previous one survives a crash
    /// while this one is written.
    pub fn slot(seq: u64) -> u64 {
        COMMIT_OFFSET + (seq % 2) * PAGE as u64
    }

    /// The record's page, in the form of delta version `version`.
    pub fn encode(&self, version: u32) -> [u8; PAGE] {
        let mut b = [0u8; PAGE];
        b[0..8].copy_from_slice(COMMIT_MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..48].copy_from_slice(&self.pages);
        let at = commit_crc_at(version);
        if version >= 3 {
            b[48..52].copy_from_slice(&self.journal.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..at]);
        b[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `Ok(None)`: never written (all zero). The record lies in one
    /// 512-byte sector, which a disk writes whole or not at all, so a bad
    /// checksum is damage, not a torn write.
    /// A journal longer than the delta's is damage too.
    pub fn decode(b: &[u8; PAGE], slot: u32, h: &Header) -> Result<Option<Commit>, FormatError> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let at = commit_crc_at(h.version);
        let crc = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        if &b[0..8] != COMMIT_MAGIC || crc != crc32c::crc32c(&b[..at]) {
            return Err(FormatError::CommitRecord(slot));
        }
        let seq = u64::from_le_bytes(b[8..16].try_into().unwrap());
        let journal = if h.version >= 3 {
            u32::from_le_bytes(b[48..52].try_into().unwrap())
        } else {
            0
        };
        if seq == 0
            || Commit::slot(seq) != COMMIT_OFFSET + slot as u64 * PAGE as u64
            || journal > h.journal_pages()
        {
            return Err(FormatError::CommitRecord(slot));
        }
        Ok(Some(Commit {
            seq,
            pages: b[16..48].try_into().unwrap(),
            journal,
        }))
    }
}

/// One page's share of a commit's page hash: pages combine by XOR, so a
/// flush updates the hash for the pages it wrote alone.
pub fn page_hash(index: u32, seq: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(index.to_le_bytes());
    h.update(seq.to_le_bytes());
    h.finalize().into()
}

/// XORs `h` into `acc` (how page hashes combine).
pub fn xor_into(acc: &mut [u8; 32], h: &[u8; 32]) {
    for (a, b) in acc.iter_mut().zip(h) {
        *a ^= b;
    }
}

/// Encodes one table page slot.
pub fn encode_page(seq: u64, index: u32, entries: &[u64]) -> [u8; PAGE] {
    let mut b = [0u8; PAGE];
    b[0..8].copy_from_slice(&seq.to_le_bytes());
    b[8..12].copy_from_slice(&index.to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        b[16 + 8 * i..24 + 8 * i].copy_from_slice(&e.to_le_bytes());
    }
    let crc = page_crc(&b);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Encodes one page of a version 4 journal: up to [`RECORDS_PER_PAGE`]
/// (block, entry) records of flush `seq`, after a header of the table
/// page's form (the count where a page has its index).
pub fn encode_records(seq: u64, records: &[(u64, u64)]) -> [u8; PAGE] {
    debug_assert!(!records.is_empty() && records.len() <= RECORDS_PER_PAGE);
    let mut b = [0u8; PAGE];
    b[0..8].copy_from_slice(&seq.to_le_bytes());
    b[8..12].copy_from_slice(&(records.len() as u32).to_le_bytes());
    for (i, (block, entry)) in records.iter().enumerate() {
        b[16 + 16 * i..24 + 16 * i].copy_from_slice(&block.to_le_bytes());
        b[24 + 16 * i..32 + 16 * i].copy_from_slice(&entry.to_le_bytes());
    }
    let crc = page_crc(&b);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a version 4 journal page: Some((seq, records)) if it is
/// written, intact and holds 1 to [`RECORDS_PER_PAGE`] records.
pub fn decode_records(b: &[u8; PAGE]) -> Option<(u64, Vec<(u64, u64)>)> {
    let seq = u64::from_le_bytes(b[0..8].try_into().unwrap());
    let n = u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(b[12..16].try_into().unwrap());
    if seq == 0 || n == 0 || n > RECORDS_PER_PAGE || crc != page_crc(b) {
        return None;
    }
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let records = (0..n)
        .map(|i| (u64_at(16 + 16 * i), u64_at(24 + 16 * i)))
        .collect();
    Some((seq, records))
}

fn page_crc(b: &[u8; PAGE]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&b[0..12]), &b[16..])
}

/// Decodes a slot: Some((seq, entries)) if it is written and intact.
pub fn decode_page(b: &[u8; PAGE], index: u32) -> Option<(u64, [u64; ENTRIES_PER_PAGE])> {
    decode_any_page(b).and_then(|(seq, idx, e)| (idx == index).then_some((seq, e)))
}

/// Decodes a page of any index (a journal page): Some((seq, index,
/// entries)) if it is written and intact.
pub fn decode_any_page(b: &[u8; PAGE]) -> Option<(u64, u32, [u64; ENTRIES_PER_PAGE])> {
    let seq = u64::from_le_bytes(b[0..8].try_into().unwrap());
    let idx = u32::from_le_bytes(b[8..12].try_into().unwrap());
    let crc = u32::from_le_bytes(b[12..16].try_into().unwrap());
    if seq == 0 || crc != page_crc(b) {
        return None;
    }
    let mut e = [0u64; ENTRIES_PER_PAGE];
    for (i, x) in e.iter_mut().enumerate() {
        *x = u64::from_le_bytes(b[16 + 8 * i..24 + 8 * i].try_into().unwrap());
    }
    Some((seq, idx, e))
}

/// The base's full identity: SHA-256 over the SHA-256s of its 1 MiB
/// chunks, which are hashed in parallel; `progress` is told the bytes done.
pub fn digest(
    read_chunk: impl Fn(u64, &mut [u8]) -> std::io::Result<()> + Sync,
    size: u64,
    progress: &(dyn Fn(u64) + Sync),
) -> std::io::Result<[u8; 32]> {
    const CHUNK: u64 = 1 << 20;
    let chunks = size.div_ceil(CHUNK);
    let hashes: Vec<[u8; 32]> = (0..chunks)
        .into_par_iter()
        .map(|i| {
            let len = CHUNK.min(size - i * CHUNK) as usize;
            let mut buf = vec![0u8; len];
            read_chunk(i * CHUNK, &mut buf)?;
            progress(len as u64);
            Ok(Sha256::digest(&buf).into())
        })
        .collect::<std::io::Result<_>>()?;
    let mut top = Sha256::new();
    top.update(size.to_le_bytes());
    for h in &hashes {
        top.update(h);
    }
    Ok(top.finalize().into())
}

/// The base's cheap identity, checked at every open: SHA-256 over its size
/// and `SAMPLES` pieces of 64 KiB spread evenly over it (the first and the
/// last included): 4 MiB read whatever the base's size, enough to tell
/// another image or a rewritten one from the base (`cow info --verify`
/// compares every byte).
pub fn sample(
    read_chunk: impl Fn(u64, &mut [u8]) -> std::io::Result<()>,
    size: u64,
) -> std::io::Result<[u8; 32]> {
    const SAMPLES: u64 = 64;
    const PIECE: u64 = 64 << 10;
    let mut h = Sha256::new();
    h.update(size.to_le_bytes());
    if size <= SAMPLES * PIECE {
        // Small enough to take whole.
        let mut buf = vec![0u8; PIECE as usize];
        let mut at = 0;
        while at < size {
            let n = PIECE.min(size - at) as usize;
            read_chunk(at, &mut buf[..n])?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        return Ok(h.finalize().into());
    }
    let mut buf = vec![0u8; PIECE as usize];
    for i in 0..SAMPLES {
        // Evenly spaced starts from 0 to size - PIECE.
        let at = (size - PIECE) as u128 * i as u128 / (SAMPLES - 1) as u128;
        read_chunk(at as u64, &mut buf)?;
        h.update(&buf);
    }
    Ok(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(size: u64) -> BaseId {
        BaseId {
            size,
            sample: [7; 32],
            digest: [8; 32],
        }
    }

    fn header() -> Header {
        Header::new(65536, &base(64 << 20), [9; 16], "/base.img").unwrap()
    }

    #[test]
    fn header_roundtrip() {
        let h = header();
        assert_eq!(Header::decode(&h.encode()), Ok(h.clone()));
        assert_eq!(h.nblocks(), 1024);
        assert_eq!(h.table_pages, 3);
        assert_eq!(h.version, VERSION);
        assert_eq!(h.data_offset % 65536, 0);
        assert!(h.data_offset >= h.metadata_end());
        assert_eq!(
            h.slot_offset(0, 0),
            3 * 4096 + 64 * 4096,
            "after the journal"
        );
        // Small blocks: the data area starts right after the table.
        let small = Header::new(4096, &base(96 << 10), [0; 16], "").unwrap();
        assert_eq!(small.data_offset, small.metadata_end());
        // Version 2: no journal, the old working area before the data.
        let v2 = Header::with_geometry(2, 4096, 96 << 10, &base(96 << 10), [0; 16], "").unwrap();
        assert_eq!(v2.journal_pages(), 0);
        assert_eq!(v2.slot_offset(0, 0), 3 * 4096);
        // Header, commits, one page's two slots, the old working area.
        assert_eq!(v2.data_offset, 7 * 4096);
        assert_eq!(Header::decode(&v2.encode()), Ok(v2.clone()));
        // A base that is not a whole number of blocks: rounded down.
        let odd = Header::new(65536, &base((64 << 20) + 1000), [0; 16], "").unwrap();
        assert_eq!(odd.virtual_size, 64 << 20);
        assert!(
            odd.block_offset(odd.nblocks()).is_some(),
            "leaked blocks need room past nblocks"
        );
        assert_eq!(odd.block_offset(u64::MAX / 2), None, "past an off_t");
    }

    #[test]
    fn header_rejects_corruption() {
        let b = header().encode();
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(Header::decode(&bad), Err(FormatError::Magic));
        for at in [9, 13, 20, 40, 70, 100, 130, 383] {
            let mut bad = b;
            bad[at] ^= 1;
            assert_eq!(
                Header::decode(&bad),
                Err(FormatError::HeaderChecksum),
                "flip at {at}"
            );
        }
    }

    #[test]
    fn header_rejects_bad_geometry() {
        assert!(Header::new(1000, &base(1 << 20), [0; 16], "").is_err());
        assert!(Header::new(2048, &base(1 << 20), [0; 16], "").is_err());
        assert!(Header::new(2 << 20, &base(4 << 20), [0; 16], "").is_err());
        assert!(Header::new(4096, &base(100), [0; 16], "").is_err());
        assert!(Header::new(4096, &base(1 << 62), [0; 16], "").is_err());
        // A virtual size that is not the base's, rounded down.
        assert!(Header::with_geometry(3, 4096, 8192, &base(1 << 20), [0; 16], "").is_err());
        assert!(Header::with_geometry(3, 4096, 2 << 20, &base(1 << 20), [0; 16], "").is_err());
    }

    #[test]
    fn commit_records_tell_damage_from_never_written() {
        let h = header();
        let c = Commit {
            seq: 7,
            pages: [3; 32],
            journal: 12,
        };
        let b = c.encode(3);
        assert_eq!(Commit::decode(&b, 1, &h), Ok(Some(c)));
        assert_eq!(Commit::decode(&[0; PAGE], 0, &h), Ok(None));
        assert_eq!(
            Commit::decode(&b, 0, &h),
            Err(FormatError::CommitRecord(0)),
            "seq 7 lives in slot 1"
        );
        let mut bad = b;
        bad[20] ^= 1;
        assert_eq!(
            Commit::decode(&bad, 1, &h),
            Err(FormatError::CommitRecord(1))
        );
        let long = Commit { journal: 65, ..c };
        assert_eq!(
            Commit::decode(&long.encode(3), 1, &h),
            Err(FormatError::CommitRecord(1)),
            "a journal longer than the delta's"
        );
    }

    #[test]
    fn page_roundtrip_and_torn_slots() {
        let entries: Vec<u64> = (0..ENTRIES_PER_PAGE as u64).map(|i| i * 3).collect();
        let b = encode_page(5, 2, &entries);
        let (seq, e) = decode_page(&b, 2).unwrap();
        assert_eq!((seq, e.to_vec()), (5, entries));
        assert!(decode_page(&b, 3).is_none(), "a slot of another page");
        let mut torn = b;
        torn[2000..].fill(0);
        assert!(decode_page(&torn, 2).is_none(), "a torn slot");
        assert!(
            decode_page(&[0u8; PAGE], 0).is_none(),
            "a never-written slot"
        );
    }

    #[test]
    fn records_roundtrip_and_torn_pages() {
        let records: Vec<(u64, u64)> = (0..RECORDS_PER_PAGE as u64)
            .map(|i| (i * 7, i + 1))
            .collect();
        let b = encode_records(9, &records);
        assert_eq!(decode_records(&b), Some((9, records.clone())));
        let one = encode_records(3, &records[..1]);
        assert_eq!(decode_records(&one), Some((3, records[..1].to_vec())));
        let mut torn = b;
        torn[2000..].fill(0);
        assert!(decode_records(&torn).is_none(), "a torn page");
        let mut padding = one;
        padding[4000] = 1;
        assert!(
            decode_records(&padding).is_none(),
            "damage past the records"
        );
        assert!(
            decode_records(&[0u8; PAGE]).is_none(),
            "a never-written page"
        );
    }

    #[test]
    fn digest_depends_on_every_byte_and_the_size() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
        let read = |d: &Vec<u8>| {
            let d = d.clone();
            move |off: u64, buf: &mut [u8]| {
                buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
                Ok(())
            }
        };
        let none = |_| {};
        let a = digest(read(&data), data.len() as u64, &none).unwrap();
        let mut changed = data.clone();
        changed[2_500_000] ^= 1;
        assert_ne!(
            a,
            digest(read(&changed), changed.len() as u64, &none).unwrap()
        );
        assert_ne!(
            a,
            digest(read(&data), data.len() as u64 - 1, &none).unwrap()
        );
        assert_eq!(a, digest(read(&data), data.len() as u64, &none).unwrap());
        let done = std::sync::atomic::AtomicU64::new(0);
        let count = |n| {
            done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        };
        digest(read(&data), data.len() as u64, &count).unwrap();
        assert_eq!(
            done.into_inner(),
            data.len() as u64,
            "progress covers the base"
        );
        // The sample sees the size, the first and last bytes.
        let s = sample(read(&data), data.len() as u64).unwrap();
        assert_eq!(s, sample(read(&data), data.len() as u64).unwrap());
        let mut last = data.clone();
        *last.last_mut().unwrap() ^= 1;
        assert_ne!(s, sample(read(&last), last.len() as u64).unwrap());
        let mut first = data.clone();
        first[0] ^= 1;
        assert_ne!(s, sample(read(&first), first.len() as u64).unwrap());
    }
}
