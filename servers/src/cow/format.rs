//! The delta's on-disk structures (docs/cow-format.md): header and table
//! pages, with their checksums.

use rayon::prelude::*;
use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"ABUSECOW";
pub const VERSION: u32 = 1;
pub const PAGE: usize = 4096;
/// Table entries per page (after the 16-byte page header).
pub const ENTRIES_PER_PAGE: usize = (PAGE - 16) / 8;
pub const MIN_BLOCK: u32 = 4096;
pub const MAX_BLOCK: u32 = 1 << 20;
const HEADER_CRC_AT: usize = 332;
const PATH_AT: usize = 76;
const FLAGS_AT: usize = 328;
/// `Header::flags`: a merge into the base started and did not finish.
pub const FLAG_MERGING: u32 = 1;

/// Why a delta cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not an ABUSE cow delta (bad magic)")]
    Magic,
    #[error("unsupported delta version {0} (this is version {VERSION})")]
    Version(u32),
    #[error("the delta header is corrupt (checksum mismatch)")]
    HeaderChecksum,
    #[error("the delta header is inconsistent: {0}")]
    Inconsistent(String),
    #[error("the delta is truncated: {0} bytes, its table needs {1}")]
    Truncated(u64, u64),
    #[error("a merge into the base was interrupted: run `abusectl cow merge` again to finish it")]
    Merging,
    #[error("table page {0} is corrupt in both slots")]
    TablePage(u32),
    #[error("table entry for block {block} points past the end of the delta")]
    EntryOutOfRange { block: u64 },
    #[error("table entries for blocks {0} and {1} point at the same delta block")]
    EntryShared(u64, u64),
}

/// The delta's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub block_size: u32,
    pub virtual_size: u64,
    pub base_size: u64,
    pub base_digest: [u8; 32],
    pub data_offset: u64,
    pub table_pages: u32,
    pub base_path: String,
    /// `FLAG_*`.
    pub flags: u32,
}

impl Header {
    /// A header for a delta of `virtual_size` bytes in blocks of `block_size`.
    pub fn new(
        block_size: u32,
        virtual_size: u64,
        base_size: u64,
        base_digest: [u8; 32],
        base_path: &str,
    ) -> Result<Self, FormatError> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
            return Err(FormatError::Inconsistent(format!(
                "block size {block_size} is not a power of two from 4 KiB to 1 MiB"
            )));
        }
        if virtual_size == 0 || !virtual_size.is_multiple_of(block_size as u64) {
            return Err(FormatError::Inconsistent(format!(
                "size {virtual_size} is not a positive multiple of the block size {block_size}"
            )));
        }
        let nblocks = virtual_size / block_size as u64;
        let table_pages = nblocks.div_ceil(ENTRIES_PER_PAGE as u64);
        let table_pages: u32 = table_pages
            .try_into()
            .map_err(|_| FormatError::Inconsistent("too many blocks".into()))?;
        let work_offset = PAGE as u64 + 2 * PAGE as u64 * table_pages as u64;
        let data_offset =
            (work_offset + Self::work_len_for(nblocks)).next_multiple_of(block_size as u64);
        if base_path.len() >= FLAGS_AT - PATH_AT {
            return Err(FormatError::Inconsistent(
                "base path longer than 251 bytes".into(),
            ));
        }
        Ok(Header {
            block_size,
            virtual_size,
            base_size,
            base_digest,
            data_offset,
            table_pages,
            base_path: base_path.into(),
            flags: 0,
        })
    }

    pub fn nblocks(&self) -> u64 {
        self.virtual_size / self.block_size as u64
    }

    fn work_len_for(nblocks: u64) -> u64 {
        (PAGE as u64 + 8 * nblocks).next_multiple_of(PAGE as u64)
    }

    /// The working area: a page (the next free delta block, a u64) and the
    /// working table (a u64 per block), shared by the serving processes.
    pub fn work_offset(&self) -> u64 {
        PAGE as u64 + 2 * PAGE as u64 * self.table_pages as u64
    }

    pub fn work_len(&self) -> u64 {
        Self::work_len_for(self.nblocks())
    }

    /// Byte offset of delta block `d`.
    pub fn block_offset(&self, d: u64) -> u64 {
        self.data_offset + d * self.block_size as u64
    }

    /// Byte offset of slot `slot` (0 = A, 1 = B) of table page `page`.
    pub fn slot_offset(&self, page: u32, slot: u32) -> u64 {
        PAGE as u64 + (2 * page as u64 + slot as u64) * PAGE as u64
    }

    pub fn encode(&self) -> [u8; PAGE] {
        let mut b = [0u8; PAGE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.virtual_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.base_size.to_le_bytes());
        b[32..64].copy_from_slice(&self.base_digest);
        b[64..72].copy_from_slice(&self.data_offset.to_le_bytes());
        b[72..76].copy_from_slice(&self.table_pages.to_le_bytes());
        b[PATH_AT..PATH_AT + self.base_path.len()].copy_from_slice(self.base_path.as_bytes());
        b[FLAGS_AT..FLAGS_AT + 4].copy_from_slice(&self.flags.to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_CRC_AT]);
        b[HEADER_CRC_AT..HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; PAGE]) -> Result<Self, FormatError> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        if &b[0..8] != MAGIC {
            return Err(FormatError::Magic);
        }
        if crc32c::crc32c(&b[..HEADER_CRC_AT]) != u32_at(HEADER_CRC_AT) {
            return Err(FormatError::HeaderChecksum);
        }
        if u32_at(8) != VERSION {
            return Err(FormatError::Version(u32_at(8)));
        }
        let path_bytes = &b[PATH_AT..FLAGS_AT];
        let end = path_bytes
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(path_bytes.len());
        let path = String::from_utf8_lossy(&path_bytes[..end]).into_owned();
        let mut h = Header::new(
            u32_at(12),
            u64_at(16),
            u64_at(24),
            b[32..64].try_into().unwrap(),
            &path,
        )?;
        h.flags = u32_at(FLAGS_AT);
        if h.flags & !FLAG_MERGING != 0 {
            return Err(FormatError::Inconsistent(format!(
                "unknown flags {:#x}",
                h.flags
            )));
        }
        if h.data_offset != u64_at(64) || h.table_pages != u32_at(72) {
            return Err(FormatError::Inconsistent(
                "table geometry does not match the sizes".into(),
            ));
        }
        Ok(h)
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

fn page_crc(b: &[u8; PAGE]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&b[0..12]), &b[16..])
}

/// Decodes a slot: Some((seq, entries)) if it is written and intact.
pub fn decode_page(b: &[u8; PAGE], index: u32) -> Option<(u64, [u64; ENTRIES_PER_PAGE])> {
    let seq = u64::from_le_bytes(b[0..8].try_into().unwrap());
    let idx = u32::from_le_bytes(b[8..12].try_into().unwrap());
    let crc = u32::from_le_bytes(b[12..16].try_into().unwrap());
    if seq == 0 || idx != index || crc != page_crc(b) {
        return None;
    }
    let mut e = [0u64; ENTRIES_PER_PAGE];
    for (i, x) in e.iter_mut().enumerate() {
        *x = u64::from_le_bytes(b[16 + 8 * i..24 + 8 * i].try_into().unwrap());
    }
    Some((seq, e))
}

/// The base's identity: SHA-256 over the SHA-256s of its 1 MiB chunks,
/// which are hashed in parallel.
pub fn digest(
    read_chunk: impl Fn(u64, &mut [u8]) -> std::io::Result<()> + Sync,
    size: u64,
) -> std::io::Result<[u8; 32]> {
    const CHUNK: u64 = 1 << 20;
    let chunks = size.div_ceil(CHUNK);
    let hashes: Vec<[u8; 32]> = (0..chunks)
        .into_par_iter()
        .map(|i| {
            let len = CHUNK.min(size - i * CHUNK) as usize;
            let mut buf = vec![0u8; len];
            read_chunk(i * CHUNK, &mut buf)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header::new(65536, 64 << 20, 64 << 20, [7; 32], "/base.img").unwrap()
    }

    #[test]
    fn header_roundtrip() {
        let h = header();
        assert_eq!(Header::decode(&h.encode()), Ok(h.clone()));
        assert_eq!(h.nblocks(), 1024);
        assert_eq!(h.table_pages, 3);
        assert_eq!(h.data_offset % 65536, 0);
        assert!(h.data_offset >= h.work_offset() + h.work_len());
        // Small blocks: the data area starts right after the working area.
        let small = Header::new(4096, 96 << 10, 96 << 10, [0; 32], "").unwrap();
        assert_eq!(small.data_offset, small.work_offset() + small.work_len());
        assert_eq!(h.work_offset(), 4096 + 6 * 4096);
    }

    #[test]
    fn header_rejects_corruption() {
        let b = header().encode();
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(Header::decode(&bad), Err(FormatError::Magic));
        for at in [9, 13, 20, 40, 70, 100, 331] {
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
        assert!(Header::new(1000, 1 << 20, 0, [0; 32], "").is_err());
        assert!(Header::new(2048, 1 << 20, 0, [0; 32], "").is_err());
        assert!(Header::new(2 << 20, 4 << 20, 0, [0; 32], "").is_err());
        assert!(Header::new(4096, 4097, 0, [0; 32], "").is_err());
        assert!(Header::new(4096, 0, 0, [0; 32], "").is_err());
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
    fn digest_depends_on_every_byte_and_the_size() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
        let read = |d: &Vec<u8>| {
            let d = d.clone();
            move |off: u64, buf: &mut [u8]| {
                buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
                Ok(())
            }
        };
        let a = digest(read(&data), data.len() as u64).unwrap();
        let mut changed = data.clone();
        changed[2_500_000] ^= 1;
        assert_ne!(a, digest(read(&changed), changed.len() as u64).unwrap());
        assert_ne!(a, digest(read(&data), data.len() as u64 - 1).unwrap());
        assert_eq!(a, digest(read(&data), data.len() as u64).unwrap());
    }
}
