//! qcow2 refcounts (16-bit): the refcount table, its blocks, allocation at
//! the end of the image, and the leak repair of a dirty image.

use std::collections::HashMap;
use std::io;

use super::image::ImageIo;
use super::{Header, Qcow2Error, OFFSET_MASK};

/// Makes what was written so far durable (the image's group sync, which
/// remembers a failure).
pub type Sync<'a> = &'a dyn Fn() -> io::Result<()>;

/// The header fields that place the refcount table (offset, then clusters:
/// one write of 12 bytes).
const REFCOUNT_TABLE_AT: u64 = 48;
/// qemu's cap on the refcount table (QCOW_MAX_REFTABLE_SIZE).
const MAX_TABLE_BYTES: u64 = 8 << 20;

pub struct Refcounts {
    /// Byte offsets of the refcount blocks (0: none yet).
    table: Vec<u64>,
    table_offset: u64,
    cs: u64,
    /// The next cluster to hand out: clusters are allocated at the end of
    /// the image and never reused while it is served.
    next_free: u64,
}

impl Refcounts {
    pub fn load(file: &dyn ImageIo, h: &Header, len: u64) -> Result<Refcounts, Qcow2Error> {
        let cs = h.cluster_size();
        let mut raw = vec![0u8; (h.refcount_table_clusters as u64 * cs) as usize];
        file.pread_exact(&mut raw, h.refcount_table_offset)?;
        let table: Vec<u64> = raw
            .chunks(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()) & OFFSET_MASK)
            .collect();
        let end = len.next_multiple_of(cs);
        if let Some(i) = table.iter().position(|&b| b % cs != 0 || b + cs > end) {
            return Err(Qcow2Error::Damaged(format!(
                "refcount table entry {i} points outside the image"
            )));
        }
        Ok(Refcounts {
            table,
            table_offset: h.refcount_table_offset,
            cs,
            next_free: end / cs,
        })
    }

    fn per_block(&self) -> u64 {
        self.cs / 2
    }

    /// Where the refcount table is: byte offset and length.
    pub fn table_extent(&self) -> (u64, u64) {
        (self.table_offset, self.table.len() as u64 * 8)
    }

    /// The refcount blocks' offsets.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.table.iter().copied().filter(|&b| b != 0)
    }

    pub fn get(&self, file: &dyn ImageIo, cluster: u64) -> io::Result<u16> {
        let b = match self.table.get((cluster / self.per_block()) as usize) {
            Some(&b) if b != 0 => b,
            _ => return Ok(0),
        };
        let mut v = [0u8; 2];
        file.pread_exact(&mut v, b + (cluster % self.per_block()) * 2)?;
        Ok(u16::from_be_bytes(v))
    }

    /// Sets `cluster`'s refcount, making its refcount block (and growing
    /// the refcount table) if need be.
    pub fn set(&mut self, file: &dyn ImageIo, sync: Sync, cluster: u64, v: u16) -> io::Result<()> {
        let i = (cluster / self.per_block()) as usize;
        if i >= self.table.len() {
            self.grow(file, sync, i)?;
        }
        if self.table[i] == 0 {
            self.new_block(file, sync, i)?;
        }
        file.pwrite_all(
            &v.to_be_bytes(),
            self.table[i] + (cluster % self.per_block()) * 2,
        )
    }

    /// Makes refcount block `i` in the next free cluster; it counts itself
    /// if it covers itself, else its own block counts it.
    fn new_block(&mut self, file: &dyn ImageIo, sync: Sync, i: usize) -> io::Result<()> {
        let b = self.next_free;
        self.next_free += 1;
        let mut block = vec![0u8; self.cs as usize];
        if b / self.per_block() == i as u64 {
            let at = ((b % self.per_block()) * 2) as usize;
            block[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
        } else {
            self.set(file, sync, b, 1)?;
        }
        file.pwrite_all(&block, b * self.cs)?;
        // The block is on disk before the table points at it: a power cut
        // between the two would leave an entry past the end of the file,
        // and an image that no longer opens.
        sync()?;
        file.pwrite_all(
            &(b * self.cs).to_be_bytes(),
            self.table_offset + i as u64 * 8,
        )?;
        self.table[i] = b * self.cs;
        Ok(())
    }

    /// Moves the refcount table to a larger one at the end of the image,
    /// covering block `need`, as qemu does: the new table and the blocks
    /// counting it are written and synced, then the header is switched to
    /// it in one write and synced, then the old table's clusters are freed
    /// (never reused while served). A power cut before the switch leaves
    /// the old table in force, with at most unreferenced clusters past it.
    fn grow(&mut self, file: &dyn ImageIo, sync: Sync, need: usize) -> io::Result<()> {
        let per_cluster = self.cs / 8;
        let old_clusters = (self.table.len() as u64).div_ceil(per_cluster);
        let mut n = (old_clusters * 2).max(1);
        // Enough for `need`, and for the blocks that count the new table
        // itself (and a few more made meanwhile).
        while n * per_cluster <= (need as u64).max((self.next_free + n + 8) / self.per_block()) {
            n *= 2;
        }
        if n * self.cs > MAX_TABLE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "the image has grown past what a refcount table of qemu's largest size (8 MiB) covers with {} byte clusters",
                    self.cs
                ),
            ));
        }
        let start = self.next_free;
        self.next_free += n;
        let (old_offset, old_table) = (self.table_offset, self.table.clone());
        self.table.resize((n * per_cluster) as usize, 0);
        self.table_offset = start * self.cs;
        let written = (|| {
            for c in start..start + n {
                self.set(file, sync, c, 1)?;
            }
            let raw: Vec<u8> = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
            file.pwrite_all(&raw, self.table_offset)?;
            sync()?;
            let mut hdr = [0u8; 12];
            hdr[..8].copy_from_slice(&self.table_offset.to_be_bytes());
            hdr[8..].copy_from_slice(&(n as u32).to_be_bytes());
            file.pwrite_all(&hdr, REFCOUNT_TABLE_AT)?;
            sync()
        })();
        if let Err(e) = written {
            // The header may or may not have been switched: this server
            // goes on with neither (its next allocation fails the same
            // way); a reopen reads whichever the header names.
            self.table = old_table;
            self.table_offset = old_offset;
            return Err(e);
        }
        for c in old_offset / self.cs..old_offset / self.cs + old_clusters {
            self.set(file, sync, c, 0)?;
        }
        Ok(())
    }

    /// Takes a free cluster at the end of the image, refcount 1; returns
    /// its byte offset.
    pub fn allocate(&mut self, file: &dyn ImageIo, sync: Sync) -> io::Result<u64> {
        loop {
            let c = self.next_free;
            self.next_free += 1;
            if self.get(file, c)? == 0 {
                self.set(file, sync, c, 1)?;
                return Ok(c * self.cs);
            }
        }
    }

    /// Every cluster whose refcount differs from how often it is
    /// referenced, as (cluster, refcount, references). Every refcount block
    /// is read whole, so a cluster counted past the image's end (one a
    /// killed writer took before it wrote there) is found too.
    fn mismatches(
        &self,
        file: &dyn ImageIo,
        referenced: &HashMap<u64, u64>,
    ) -> Result<Vec<(u64, u64, u64)>, Qcow2Error> {
        let per = self.per_block();
        let mut out = Vec::new();
        let mut block = vec![0u8; self.cs as usize];
        for (i, &b) in self.table.iter().enumerate() {
            if b == 0 {
                continue;
            }
            file.pread_exact(&mut block, b)?;
            for (k, v) in block.chunks(2).enumerate() {
                let c = i as u64 * per + k as u64;
                let have = u16::from_be_bytes([v[0], v[1]]) as u64;
                let want = referenced.get(&c).copied().unwrap_or(0);
                if have != want {
                    out.push((c, have, want));
                }
            }
        }
        // Referenced clusters no refcount block covers count 0.
        for (&c, &want) in referenced {
            let covered = self.table.get((c / per) as usize).is_some_and(|&b| b != 0);
            if !covered {
                out.push((c, 0, want));
            }
        }
        Ok(out)
    }

    /// Compares the refcounts with how often each cluster is referenced:
    /// (clusters counted too low: corruption, clusters counted too high:
    /// leaks).
    pub fn compare(
        &self,
        file: &dyn ImageIo,
        referenced: &HashMap<u64, u64>,
    ) -> Result<(u64, u64), Qcow2Error> {
        let m = self.mismatches(file, referenced)?;
        let low = m.iter().filter(|(_, have, want)| have < want).count() as u64;
        Ok((low, m.len() as u64 - low))
    }

    /// Fixes leaks (refcounts above the references, as a killed writer
    /// leaves them); refuses refcounts below them (that is damage).
    pub fn repair(
        &mut self,
        file: &dyn ImageIo,
        sync: Sync,
        referenced: &HashMap<u64, u64>,
    ) -> Result<u64, Qcow2Error> {
        let m = self.mismatches(file, referenced)?;
        if let Some((c, have, want)) = m.iter().find(|(_, have, want)| have < want) {
            return Err(Qcow2Error::Damaged(format!(
                "cluster {c} is referenced {want} times but counted {have} times"
            )));
        }
        for &(c, _, want) in &m {
            self.set(file, sync, c, want as u16)?;
        }
        Ok(m.len() as u64)
    }
}
