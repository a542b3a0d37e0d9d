//! qemu's qcow2 header (docs/interop/qcow2.txt in qemu): the fields this
//! backend reads, the feature bits it honours, and the backing file.

use std::io;

/// The magic that starts an image.
pub const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// The image is marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// The guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Compressed clusters use the compression type the header names, not
/// zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Autoclear bit: persistent bitmaps are consistent with the image.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Where the incompatible and autoclear features live (version 3).
pub const INCOMPAT_AT: u64 = 72;
/// Byte offset of the autoclear feature bits.
pub const AUTOCLEAR_AT: u64 = 88;
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Why an image cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// Not a qcow2 image.
    #[error("not a qcow2 image (bad magic)")]
    Magic,
    /// A version other than 2 or 3.
    #[error("qcow2 version {0} is not supported (2 and 3 are)")]
    Version(u32),
    /// The header's fields are out of range or contradict each other.
    #[error("the qcow2 header is inconsistent: {0}")]
    Header(String),
    /// The image uses something this backend does not handle.
    #[error("{0} is not supported")]
    Unsupported(String),
    /// The image has the corrupt bit set.
    #[error("the image is marked corrupt: repair it with `qemu-img check -r all`")]
    MarkedCorrupt,
    /// The image's metadata is damaged.
    #[error("the image's metadata is damaged: {0} (try `qemu-img check -r all`)")]
    Damaged(String),
    /// I/O on the image failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The header fields this backend uses (all integers are big-endian).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// The size of the device in bytes.
    pub size: u64,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// Byte offset of the L1 table.
    pub l1_table_offset: u64,
    /// Byte offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Incompatible feature bits (`INCOMPAT_*`; 0 in version 2).
    pub incompatible: u64,
    /// Autoclear feature bits (0 in version 2).
    pub autoclear: u64,
    /// log2 of a refcount's width in bits (4 in version 2).
    pub refcount_order: u32,
    /// The backing file's name, if the image has one.
    pub backing_file: Option<String>,
    /// The backing file's format, if the header says ("raw", "qcow2").
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

impl Header {
    /// Parses the header from the image's first cluster (or its first 64
    /// KiB, whichever is smaller: the header and its extensions lie there).
    pub fn parse(b: &[u8]) -> Result<Header, Qcow2Error> {
        let bad = |why: &str| Qcow2Error::Header(why.into());
        if b.len() < 72 || be32(b, 0) != MAGIC {
            return Err(Qcow2Error::Magic);
        }
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Version(version));
        }
        let cluster_bits = be32(b, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad("cluster size out of range"));
        }
        if be32(b, 32) != 0 {
            return Err(Qcow2Error::Unsupported("an encrypted image".into()));
        }
        let (incompatible, autoclear, refcount_order, header_len) = if version == 3 {
            if b.len() < 104 {
                return Err(bad("truncated"));
            }
            let len = be32(b, 100) as usize;
            // As qemu: at least the version 3 fields, within the first
            // cluster, a multiple of 8.
            if len < 104
                || len > b.len()
                || len as u64 > 1 << cluster_bits
                || !len.is_multiple_of(8)
            {
                return Err(bad("header length out of range"));
            }
            (be64(b, 72), be64(b, 88), be32(b, 96), len)
        } else {
            (0, 0, 4, 72)
        };
        // The compression type (byte 104, where the header has it) is zlib
        // (0) unless the incompatible bit says otherwise.
        if header_len > 104 && b[104] != 0 && incompatible & INCOMPAT_COMPRESSION == 0 {
            return Err(bad(
                "a compression type without its incompatible feature bit",
            ));
        }
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(Qcow2Error::MarkedCorrupt);
        }
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
        for (bit, what) in [
            (INCOMPAT_DATA_FILE, "an external data file"),
            (INCOMPAT_COMPRESSION, "a compression type other than zlib"),
            (INCOMPAT_EXTL2, "extended L2 entries (subclusters)"),
        ] {
            if incompatible & bit != 0 {
                return Err(Qcow2Error::Unsupported(what.into()));
            }
        }
        if incompatible & !(known | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2) != 0
        {
            return Err(Qcow2Error::Unsupported(format!(
                "incompatible features {incompatible:#x}"
            )));
        }
        if refcount_order != 4 {
            return Err(Qcow2Error::Unsupported(format!(
                "{}-bit refcounts (16-bit ones are)",
                1u64 << refcount_order.min(63)
            )));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(b, 24),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            incompatible,
            autoclear,
            refcount_order,
            backing_file: None,
            backing_format: None,
        };
        let cs = h.cluster_size();
        // Every table must start on a cluster and the L1 table cover the size.
        if !h.l1_table_offset.is_multiple_of(cs) || !h.refcount_table_offset.is_multiple_of(cs) {
            return Err(bad("a table is not cluster-aligned"));
        }
        let per_l2 = cs / 8;
        let need = h.size.div_ceil(cs).div_ceil(per_l2);
        if (h.l1_size as u64) < need {
            return Err(bad("the L1 table does not cover the virtual size"));
        }
        // qemu's own caps: an L1 table of at most 32 MiB, a refcount table
        // of at most 8 MiB (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE).
        if h.size > (1 << 62) || h.l1_size as u64 * 8 > (32 << 20) {
            return Err(bad("virtual size out of range"));
        }
        if h.refcount_table_clusters == 0
            || (h.refcount_table_clusters as u64) << cluster_bits > 8 << 20
        {
            return Err(bad("refcount table size out of range"));
        }
        // Header extensions, each padded to 8 bytes, up to the end marker.
        let mut at = header_len;
        while at + 8 <= b.len() {
            let (kind, len) = (be32(b, at), be32(b, at + 4) as usize);
            let data = at + 8;
            if kind == EXT_END {
                break;
            }
            if data + len > b.len() {
                return Err(bad("a header extension runs past the header"));
            }
            if kind == EXT_BACKING_FORMAT {
                h.backing_format = Some(String::from_utf8_lossy(&b[data..data + len]).into());
            }
            at = data + len.next_multiple_of(8);
        }
        let (off, len) = (be64(b, 8), be32(b, 16) as u64);
        if off != 0 {
            if len == 0 || len > 1023 || off.checked_add(len).is_none_or(|end| end > b.len() as u64)
            {
                return Err(bad("backing file name out of range"));
            }
            let (off, len) = (off as usize, len as usize);
            h.backing_file = Some(String::from_utf8_lossy(&b[off..off + len]).into());
        }
        Ok(h)
    }

    /// The size of a cluster in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 3 header as `qemu-img create -f qcow2` writes it for 1 GiB
    /// with 64 KiB clusters and a backing file.
    fn sample() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        b[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[116..120].copy_from_slice(&3u32.to_be_bytes());
        b[120..123].copy_from_slice(b"raw");
        let name = b"base.img";
        b[8..16].copy_from_slice(&200u64.to_be_bytes());
        b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        b[200..200 + name.len()].copy_from_slice(name);
        b
    }

    #[test]
    fn parses_fields_extensions_and_backing() {
        let h = Header::parse(&sample()).unwrap();
        assert_eq!((h.version, h.cluster_size(), h.size), (3, 65536, 1 << 30));
        assert_eq!(h.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
    }

    #[test]
    fn refuses_what_it_cannot_serve() {
        let with = |at: usize, v: &[u8]| {
            let mut b = sample();
            b[at..at + v.len()].copy_from_slice(v);
            Header::parse(&b).expect_err("accepted").to_string()
        };
        assert!(with(0, b"QFI\0").contains("not a qcow2"));
        assert!(with(4, &4u32.to_be_bytes()).contains("version 4"));
        assert!(with(32, &1u32.to_be_bytes()).contains("encrypted"));
        assert!(with(72, &INCOMPAT_CORRUPT.to_be_bytes()).contains("marked corrupt"));
        assert!(with(72, &INCOMPAT_EXTL2.to_be_bytes()).contains("extended L2"));
        assert!(with(72, &(1u64 << 40).to_be_bytes()).contains("incompatible"));
        assert!(with(96, &5u32.to_be_bytes()).contains("32-bit refcounts"));
        assert!(with(20, &30u32.to_be_bytes()).contains("cluster size"));
        assert!(with(36, &0u32.to_be_bytes()).contains("L1 table"));
        assert!(with(40, &1000u64.to_be_bytes()).contains("aligned"));
        assert!(with(16, &5000u32.to_be_bytes()).contains("backing file"));
        assert!(with(116, &70000u32.to_be_bytes()).contains("extension"));
        // Found by fuzzing: an offset that overflows (was a panic), qemu's
        // caps on the tables, the header length and compression type.
        assert!(with(8, &u64::MAX.to_be_bytes()).contains("backing file"));
        assert!(with(8, &(u64::MAX - 3).to_be_bytes()).contains("backing file"));
        assert!(with(56, &129u32.to_be_bytes()).contains("refcount table size"));
        assert!(with(36, &(4u32 << 20 | 1).to_be_bytes()).contains("virtual size"));
        assert!(with(100, &105u32.to_be_bytes()).contains("header length"));
        assert!(with(104, &[1]).contains("compression type"));
    }
}
