//! qcow2 refcounts (16-bit): the refcount table, its blocks, allocation at
//! the end of the image, and the leak repair of a dirty image.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::{Header, Qcow2Error, OFFSET_MASK};

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
    pub fn load(file: &File, h: &Header, len: u64) -> Result<Refcounts, Qcow2Error> {
        let cs = h.cluster_size();
        let mut raw = vec![0u8; (h.refcount_table_clusters as u64 * cs) as usize];
        file.read_exact_at(&mut raw, h.refcount_table_offset)?;
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

    /// The refcount blocks' offsets.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.table.iter().copied().filter(|&b| b != 0)
    }

    pub fn get(&self, file: &File, cluster: u64) -> io::Result<u16> {
        let b = match self.table.get((cluster / self.per_block()) as usize) {
            Some(&b) if b != 0 => b,
            _ => return Ok(0),
        };
        let mut v = [0u8; 2];
        file.read_exact_at(&mut v, b + (cluster % self.per_block()) * 2)?;
        Ok(u16::from_be_bytes(v))
    }

    /// Sets `cluster`'s refcount, making its refcount block if need be.
    pub fn set(&mut self, file: &File, cluster: u64, v: u16) -> io::Result<()> {
        let i = (cluster / self.per_block()) as usize;
        if i >= self.table.len() {
            return Err(io::Error::other(
                "the image has grown past what its refcount table covers (`qemu-img amend` or a larger cluster size would help)",
            ));
        }
        if self.table[i] == 0 {
            // The new block lives in the next free cluster; it counts
            // itself if it covers itself, else its own block counts it.
            let b = self.next_free;
            self.next_free += 1;
            let mut block = vec![0u8; self.cs as usize];
            if b / self.per_block() == i as u64 {
                let at = ((b % self.per_block()) * 2) as usize;
                block[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
            } else {
                self.set(file, b, 1)?;
            }
            file.write_all_at(&block, b * self.cs)?;
            file.write_all_at(
                &(b * self.cs).to_be_bytes(),
                self.table_offset + i as u64 * 8,
            )?;
            self.table[i] = b * self.cs;
        }
        file.write_all_at(
            &v.to_be_bytes(),
            self.table[i] + (cluster % self.per_block()) * 2,
        )
    }

    /// Takes a free cluster at the end of the image, refcount 1; returns
    /// its byte offset.
    pub fn allocate(&mut self, file: &File) -> io::Result<u64> {
        loop {
            let c = self.next_free;
            self.next_free += 1;
            if self.get(file, c)? == 0 {
                self.set(file, c, 1)?;
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
        file: &File,
        referenced: &HashMap<u64, u64>,
    ) -> Result<Vec<(u64, u64, u64)>, Qcow2Error> {
        let per = self.per_block();
        let mut out = Vec::new();
        let mut block = vec![0u8; self.cs as usize];
        for (i, &b) in self.table.iter().enumerate() {
            if b == 0 {
                continue;
            }
            file.read_exact_at(&mut block, b)?;
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
        file: &File,
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
        file: &File,
        referenced: &HashMap<u64, u64>,
    ) -> Result<u64, Qcow2Error> {
        let m = self.mismatches(file, referenced)?;
        if let Some((c, have, want)) = m.iter().find(|(_, have, want)| have < want) {
            return Err(Qcow2Error::Damaged(format!(
                "cluster {c} is referenced {want} times but counted {have} times"
            )));
        }
        for &(c, _, want) in &m {
            self.set(file, c, want as u16)?;
        }
        Ok(m.len() as u64)
    }
}
