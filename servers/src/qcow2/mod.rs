//! The qcow2 backend: qemu's image format, read and written in place, with
//! a backing chain (raw or qcow2 images, read-only).
//!
//! Clusters are allocated at the end of the image and never reused while
//! it is served, so data a reader or writer located stays where it is. An
//! allocating write puts the refcount and the data in the file, waits for a
//! sync that covers them (shared by every allocation in flight: a group
//! commit), and only then links the cluster into its L2 table (and a new
//! L2 table into the L1 table): after a power cut no table points at a
//! cluster whose refcount or contents did not reach the disk, so `qemu-img
//! check` finds at most leaked clusters. The link is written before the
//! write is acknowledged, so a killed server loses nothing. While served,
//! a version 3 image carries qemu's dirty bit; opening a dirty image
//! repairs its leaks (the refcounts a killed server left too high).

mod chain;
pub mod header;
pub mod image;
mod qemu_lock;
mod refcount;

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::backend::{Backend, ALL_FEATURES};
use crate::sync::GroupSync;
use chain::Backing;
pub use header::{Header, Qcow2Error};
use image::ImageIo;
use refcount::Refcounts;

/// L1 and L2 entry bits.
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The bits of a standard L2 entry that must be zero (1-8 and 56-61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// The mutable metadata, under one lock.
struct Meta {
    l1: Vec<u64>,
    /// L2 tables read so far (or made), by L1 index.
    l2: HashMap<usize, Box<[u64]>>,
    refs: Refcounts,
    /// Virtual clusters whose allocation is under way.
    allocating: HashSet<u64>,
    /// L2 tables made but not yet linked into the L1 table (the first
    /// allocation in their range links them, after its sync).
    unlinked: HashMap<usize, u64>,
    /// Virtual clusters whose L2 entry, as read from the file, points past
    /// its end or into its metadata: why (they are damage, neither read
    /// nor written).
    bad: HashMap<u64, String>,
}

/// A qcow2 image (the top of a chain), open for reading and writing.
pub struct Qcow2 {
    file: Box<dyn ImageIo>,
    path: PathBuf,
    h: Header,
    read_only: bool,
    /// The clusters of the metadata when the image was opened (header, L1
    /// and refcount tables, refcount blocks, L2 tables), and the first
    /// cluster past the file's end then: what an L2 entry read from the
    /// file may not point at (what this server makes lies past that end).
    metadata: HashMap<u64, &'static str>,
    end: u64,
    meta: Mutex<Meta>,
    done: Condvar,
    backing: Option<Backing>,
    sync: GroupSync,
    /// Compressed clusters were overwritten: their space (shared with
    /// other compressed clusters) is given back when the server stops.
    leaked: AtomicBool,
    /// The next allocation panics (`panic_next_allocation_for_tests`).
    panic_next_allocation: AtomicBool,
}

/// What a virtual cluster is, from its L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cluster {
    /// Not in this image: the backing file's (or zeroes).
    Unallocated,
    /// Reads as zeroes; `Some(host)`: a cluster of its own stays allocated.
    Zero(Option<u64>),
    /// Stored at this host offset; `true`: its refcount is 1 (writable).
    Data(u64, bool),
    /// Compressed: host offset and compressed length in bytes.
    Compressed(u64, u64),
}

fn damaged(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, Qcow2Error::Damaged(why.into()))
}

/// Records that the clusters of `len` bytes at `off` hold `what`; an
/// overlap with other metadata is damage (writing one would corrupt the
/// other).
fn claim(
    metadata: &mut HashMap<u64, &'static str>,
    cs: u64,
    off: u64,
    len: u64,
    what: &'static str,
) -> Result<(), Qcow2Error> {
    for c in off / cs..(off + len).div_ceil(cs) {
        if let Some(other) = metadata.insert(c, what) {
            return Err(Qcow2Error::Damaged(format!(
                "{what} at {off:#x} overlaps {other}"
            )));
        }
    }
    Ok(())
}

impl Qcow2 {
    /// Opens `path` to serve it (read-only if `read_only`), with its
    /// backing chain, every file of which lies in the image's directory.
    pub fn open(path: &Path, read_only: bool) -> Result<Qcow2, Qcow2Error> {
        Self::open_with(path, read_only, false)
    }

    /// As [`Qcow2::open`]; with `backing_anywhere`, the chain's files may
    /// lie anywhere the image names (the user trusts the image).
    pub fn open_with(
        path: &Path,
        read_only: bool,
        backing_anywhere: bool,
    ) -> Result<Qcow2, Qcow2Error> {
        let within = if backing_anywhere {
            None
        } else {
            let dir = path
                .canonicalize()?
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| "/".into());
            Some(dir)
        };
        Self::open_chain(path, read_only, 0, within.as_deref(), &|f| Box::new(f))
    }

    /// As [`Qcow2::open`], with the image's I/O going through `wrap` (the
    /// tests' recorder of writes and syncs, for power cuts).
    #[doc(hidden)]
    pub fn open_through(
        path: &Path,
        wrap: &dyn Fn(File) -> Box<dyn ImageIo>,
    ) -> Result<Qcow2, Qcow2Error> {
        let dir = path
            .canonicalize()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| "/".into());
        Self::open_chain(path, false, 0, Some(&dir), wrap)
    }

    /// Opens an image `depth` levels down a backing chain, whose files lie
    /// in `within` (if given).
    fn open_chain(
        path: &Path,
        read_only: bool,
        depth: u32,
        within: Option<&Path>,
        wrap: &dyn Fn(File) -> Box<dyn ImageIo>,
    ) -> Result<Qcow2, Qcow2Error> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        // QEMU's own locks: one writer at a time (an ABUSE server, a VM,
        // qemu-img), and no writer while it is read. They last as long as
        // the file, which `wrap` keeps.
        qemu_lock::lock(&file, !read_only)?;
        let file = wrap(file);
        let mut first = vec![0u8; 65536];
        let n = file.pread_full(&mut first, 0)?;
        let h = Header::parse(&first[..n])?;
        if !read_only && h.nb_snapshots != 0 {
            return Err(Qcow2Error::Unsupported(
                "writing an image with internal snapshots (serve it read-only)".into(),
            ));
        }
        if !read_only && h.autoclear & header::AUTOCLEAR_BITMAPS != 0 {
            return Err(Qcow2Error::Unsupported(
                "writing an image with persistent bitmaps (serve it read-only)".into(),
            ));
        }
        let backing = match &h.backing_file {
            Some(name) => Some(Backing::open(
                path,
                name,
                h.backing_format.as_deref(),
                depth,
                within,
            )?),
            None => None,
        };
        let cs = h.cluster_size();
        let len = file.size()?;
        for (what, off, n) in [
            ("L1", h.l1_table_offset, h.l1_size as u64 * 8),
            (
                "refcount",
                h.refcount_table_offset,
                h.refcount_table_clusters as u64 * cs,
            ),
        ] {
            if off.checked_add(n).is_none_or(|end| end > len) {
                return Err(Qcow2Error::Damaged(format!(
                    "the image is truncated: its {what} table lies past its end"
                )));
            }
        }
        let mut l1 = vec![0u8; h.l1_size as usize * 8];
        file.pread_exact(&mut l1, h.l1_table_offset)?;
        let l1: Vec<u64> = l1
            .chunks(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        for (i, &e) in l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off != 0 && (!off.is_multiple_of(cs) || off + cs > len.next_multiple_of(cs)) {
                return Err(Qcow2Error::Damaged(format!(
                    "L1 entry {i} points outside the image"
                )));
            }
        }
        let refs = Refcounts::load(&*file, &h, len)?;
        // No two pieces of metadata share a cluster.
        let mut metadata = HashMap::new();
        claim(&mut metadata, cs, 0, cs, "the header")?;
        let l1_len = h.l1_size as u64 * 8;
        claim(&mut metadata, cs, h.l1_table_offset, l1_len, "the L1 table")?;
        let (table, table_len) = refs.table_extent();
        claim(&mut metadata, cs, table, table_len, "the refcount table")?;
        for b in refs.blocks() {
            claim(&mut metadata, cs, b, cs, "a refcount block")?;
        }
        for &e in &l1 {
            if e & OFFSET_MASK != 0 {
                claim(&mut metadata, cs, e & OFFSET_MASK, cs, "an L2 table")?;
            }
        }
        let q = Qcow2 {
            path: path.to_path_buf(),
            read_only,
            meta: Mutex::new(Meta {
                l1,
                l2: HashMap::new(),
                refs,
                allocating: HashSet::new(),
                unlinked: HashMap::new(),
                bad: HashMap::new(),
            }),
            done: Condvar::new(),
            backing,
            sync: GroupSync::default(),
            leaked: AtomicBool::new(false),
            panic_next_allocation: AtomicBool::new(false),
            file,
            h,
            metadata,
            end: len.div_ceil(cs),
        };
        if !read_only {
            q.start_writing()?;
        }
        Ok(q)
    }

    /// Before the first change: a dirty image (a server or qemu was killed
    /// while writing it) gets its leaked clusters back; the image is then
    /// marked dirty (version 3) and bits this backend does not maintain
    /// are cleared, as the format asks of writers.
    fn start_writing(&self) -> Result<(), Qcow2Error> {
        if self.h.version < 3 {
            return Ok(());
        }
        if self.h.incompatible & header::INCOMPAT_DIRTY != 0 {
            self.repair()?;
        }
        self.set_incompatible(self.h.incompatible | header::INCOMPAT_DIRTY)?;
        if self.h.autoclear != 0 {
            self.file
                .pwrite_all(&0u64.to_be_bytes(), header::AUTOCLEAR_AT)?;
        }
        self.sync_file()?;
        Ok(())
    }

    /// Gives back leaked clusters (counted, referenced by nothing).
    fn repair(&self) -> Result<u64, Qcow2Error> {
        let mut m = self.lock();
        let referenced = self.references(&mut m)?;
        let fixed = m
            .refs
            .repair(&*self.file, &|| self.sync_file(), &referenced)?;
        self.sync_file()?;
        Ok(fixed)
    }

    /// Takes a cluster and links it nowhere, as a writer killed in between
    /// leaves one (for the tests of the repair).
    #[doc(hidden)]
    pub fn leak_one_for_tests(&self) -> io::Result<()> {
        self.lock()
            .refs
            .allocate(&*self.file, &|| self.sync_file())?;
        self.sync_file()
    }

    fn set_incompatible(&self, bits: u64) -> io::Result<()> {
        self.file
            .pwrite_all(&bits.to_be_bytes(), header::INCOMPAT_AT)
    }

    /// A sync of the image, shared with every allocation in flight (and
    /// failing for ever after one failed).
    fn sync_file(&self) -> io::Result<()> {
        self.sync.sync(|| self.file.sync())
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The image's header.
    pub fn header(&self) -> &Header {
        &self.h
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cs(&self) -> u64 {
        self.h.cluster_size()
    }

    /// The L2 table for L1 index `i` (read on first use); None if the L1
    /// entry is empty.
    fn l2<'m>(&self, m: &'m mut Meta, i: usize) -> io::Result<Option<&'m mut Box<[u64]>>> {
        if !m.l2.contains_key(&i) {
            let off = m.l1[i] & OFFSET_MASK;
            if off == 0 {
                return Ok(None);
            }
            let mut b = vec![0u8; self.cs() as usize];
            self.file.pread_exact(&mut b, off)?;
            let t: Box<[u64]> = b
                .chunks(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect();
            let per = t.len() as u64;
            for (j, &e) in t.iter().enumerate() {
                if let Some(why) = self.misplaced(e) {
                    let vc = i as u64 * per + j as u64;
                    m.bad
                        .insert(vc, format!("the L2 entry of cluster {vc} points {why}"));
                }
            }
            m.l2.insert(i, t);
        }
        Ok(m.l2.get_mut(&i))
    }

    /// Where an L2 entry read from the file points that no cluster of its
    /// own may be (past the file's end, into the metadata), if it does.
    fn misplaced(&self, e: u64) -> Option<String> {
        let cs = self.cs();
        let off = match self.decode(e) {
            Ok(Cluster::Data(off, _) | Cluster::Zero(Some(off))) => off,
            _ => return None,
        };
        if off / cs >= self.end {
            return Some(format!("past the image's end ({off:#x})"));
        }
        let what = self.metadata.get(&(off / cs))?;
        Some(format!("into {what} ({off:#x})"))
    }

    /// What virtual cluster `vc` is.
    fn lookup(&self, m: &mut Meta, vc: u64) -> io::Result<Cluster> {
        let per = self.cs() / 8;
        let (i, j) = ((vc / per) as usize, (vc % per) as usize);
        let e = match self.l2(m, i)? {
            Some(t) => t[j],
            None => return Ok(Cluster::Unallocated),
        };
        if let Some(why) = m.bad.get(&vc) {
            return Err(damaged(why.clone()));
        }
        self.decode(e)
    }

    fn decode(&self, e: u64) -> io::Result<Cluster> {
        let cs = self.cs();
        if e & COMPRESSED != 0 {
            let x = 62 - (self.h.cluster_bits - 8);
            let off = e & ((1 << x) - 1);
            let sectors = ((e & ((1 << 62) - 1)) >> x) + 1;
            return Ok(Cluster::Compressed(off, sectors * 512 - (off % 512)));
        }
        if e & L2_RESERVED != 0 {
            return Err(damaged(format!(
                "an L2 entry ({e:#x}) has reserved bits set"
            )));
        }
        let off = e & OFFSET_MASK;
        if !off.is_multiple_of(cs) {
            return Err(damaged(format!(
                "an L2 entry points at {off:#x}, inside a cluster"
            )));
        }
        Ok(match (e & ZERO != 0 && self.h.version >= 3, off) {
            (true, 0) => Cluster::Zero(None),
            (true, o) => Cluster::Zero(Some(o)),
            (false, 0) => Cluster::Unallocated,
            (false, o) => Cluster::Data(o, e & COPIED != 0),
        })
    }

    /// Reads `buf.len()` bytes at `inner` of virtual cluster `vc`, whose
    /// entry says `c`.
    fn read_cluster(&self, vc: u64, c: Cluster, inner: u64, buf: &mut [u8]) -> io::Result<()> {
        match c {
            Cluster::Unallocated => match &self.backing {
                Some(b) => b.read(vc * self.cs() + inner, buf),
                None => {
                    buf.fill(0);
                    Ok(())
                }
            },
            Cluster::Zero(_) => {
                buf.fill(0);
                Ok(())
            }
            Cluster::Data(off, _) => self.file.pread_or_zeroes(buf, off + inner),
            Cluster::Compressed(off, len) => {
                let whole = chain::inflate(&*self.file, off, len, self.cs())?;
                buf.copy_from_slice(&whole[inner as usize..inner as usize + buf.len()]);
                Ok(())
            }
        }
    }

    /// Calls `f(virtual cluster, offset in it, range in the request)` for
    /// each cluster piece of `len` bytes at `offset`.
    fn pieces(
        &self,
        offset: u64,
        len: u64,
        f: impl FnMut(u64, u64, std::ops::Range<usize>) -> io::Result<()>,
    ) -> io::Result<()> {
        crate::backend::pieces(offset, len, self.h.size, self.cs(), f)
    }

    /// Writes `data` (None: zeroes, deallocating where it can) at `inner`
    /// of virtual cluster `vc`.
    fn write_cluster(&self, vc: u64, inner: u64, data: Option<&[u8]>, len: u64) -> io::Result<()> {
        let cs = self.cs();
        let whole = inner == 0 && len == cs;
        let mut m = self.lock();
        loop {
            if m.allocating.contains(&vc) {
                m = self.done.wait(m).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let c = self.lookup(&mut m, vc)?;
            match (c, data) {
                // Written in place: the cluster is ours alone.
                (Cluster::Data(off, true), Some(d)) => {
                    drop(m);
                    return self.file.pwrite_all(d, off + inner);
                }
                (Cluster::Data(off, true), None) if whole && self.h.version >= 3 => {
                    // Zero flag, cluster kept (nothing is freed while
                    // served), its space given back to the file system.
                    self.set_entry(&mut m, vc, off | COPIED | ZERO)?;
                    drop(m);
                    return self.file.punch(off, cs);
                }
                (Cluster::Data(off, true), None) => {
                    drop(m);
                    return crate::backend::fill_zeroes(
                        |b, at| self.file.pwrite_all(b, at),
                        off + inner,
                        len,
                    );
                }
                (Cluster::Zero(_), None) => return Ok(()),
                (Cluster::Unallocated, None) if self.backing.is_none() => return Ok(()),
                // With an L2 table: the zero flag alone (else allocate as
                // for data, below).
                (Cluster::Unallocated, None)
                    if whole
                        && self.h.version >= 3
                        && self.l2(&mut m, self.l1_index(vc))?.is_some() =>
                {
                    return self.set_entry(&mut m, vc, ZERO);
                }
                // COPIED clear: the cluster may be shared (its refcount
                // above 1), so it is copied on write, as qemu does; the old
                // one's count is set right by the repair at the next stop.
                _ => {}
            }
            m.allocating.insert(vc);
            break;
        }
        // Allocate: the new contents are the old ones with the write merged.
        // The cluster's marker goes whatever happens, a panic too (the
        // engine fails that request alone and goes on: a marker left set
        // would block every later write of the cluster).
        struct Unmark<'a>(&'a Qcow2, u64);
        impl Drop for Unmark<'_> {
            fn drop(&mut self) {
                self.0.lock().allocating.remove(&self.1);
                self.0.done.notify_all();
            }
        }
        let _unmark = Unmark(self, vc);
        self.allocate(m, vc, inner, data, len)
    }

    /// Makes the next allocation panic, as a bug would (for the tests).
    #[doc(hidden)]
    pub fn panic_next_allocation_for_tests(&self) {
        self.panic_next_allocation.store(true, Ordering::SeqCst);
    }

    fn l1_index(&self, vc: u64) -> usize {
        (vc / (self.cs() / 8)) as usize
    }

    /// Where the L2 table of L1 index `i` is, linked or not yet.
    fn l2_offset(m: &Meta, i: usize) -> Option<u64> {
        match m.l1[i] & OFFSET_MASK {
            0 => m.unlinked.get(&i).copied(),
            off => Some(off),
        }
    }

    /// Sets virtual cluster `vc`'s L2 entry (its table exists) in memory and
    /// in the file.
    fn set_entry(&self, m: &mut Meta, vc: u64, e: u64) -> io::Result<()> {
        let per = self.cs() / 8;
        let (i, j) = (self.l1_index(vc), (vc % per) as usize);
        let l2_off = Self::l2_offset(m, i)
            .ok_or_else(|| damaged(format!("no L2 table for cluster {vc}")))?;
        self.file
            .pwrite_all(&e.to_be_bytes(), l2_off + j as u64 * 8)?;
        if let Some(t) = self.l2(m, i)? {
            t[j] = e;
        }
        Ok(())
    }

    /// The allocating write of virtual cluster `vc` (marked as allocating;
    /// `m` is released while the data is written and synced).
    fn allocate(
        &self,
        mut m: MutexGuard<'_, Meta>,
        vc: u64,
        inner: u64,
        data: Option<&[u8]>,
        len: u64,
    ) -> io::Result<()> {
        let cs = self.cs();
        let old = self.lookup(&mut m, vc)?;
        let i = self.l1_index(vc);
        // A new L2 table: zeroed in the file now, linked after a sync.
        if Self::l2_offset(&m, i).is_none() {
            let off = m.refs.allocate(&*self.file, &|| self.sync_file())?;
            self.file.pwrite_all(&vec![0u8; cs as usize], off)?;
            m.l2.insert(i, vec![0u64; (cs / 8) as usize].into_boxed_slice());
            m.unlinked.insert(i, off);
        }
        let host = match old {
            // A zeroed cluster that kept its own: reuse it.
            Cluster::Zero(Some(off)) => off,
            Cluster::Compressed(..) | Cluster::Data(_, false) => {
                self.leaked.store(true, Ordering::Relaxed);
                m.refs.allocate(&*self.file, &|| self.sync_file())?
            }
            _ => m.refs.allocate(&*self.file, &|| self.sync_file())?,
        };
        drop(m);
        if self.panic_next_allocation.swap(false, Ordering::SeqCst) {
            panic!("an allocation panics (a test's fault)");
        }
        // A new cluster (past the end of the file when it was taken, so it
        // reads as zeroes) whose old contents are zeroes needs only the
        // write itself, and the cluster's end written so that the file
        // holds all of it; merging would write a whole cluster (16 times a
        // 4 KiB write with qemu's 64 KiB clusters).
        let zeroes_before = match old {
            Cluster::Zero(None) => true,
            Cluster::Unallocated => self.backing.is_none(),
            _ => false,
        };
        if zeroes_before && len != cs {
            if let Some(d) = data {
                self.file.pwrite_all(d, host + inner)?;
            }
            if inner + len < cs {
                self.file.pwrite_all(&[0u8; 512], host + cs - 512)?;
            }
        } else {
            let mut buf = vec![0u8; cs as usize];
            if len != cs {
                self.read_cluster(vc, old, 0, &mut buf)?;
            }
            match data {
                Some(d) => buf[inner as usize..(inner + len) as usize].copy_from_slice(d),
                None => buf[inner as usize..(inner + len) as usize].fill(0),
            }
            self.file.pwrite_all(&buf, host)?;
        }
        // The refcounts, the new L2 table and the data must be durable
        // before anything points at them.
        self.sync.sync(|| self.file.sync())?;
        let mut m = self.lock();
        // The table was made before this allocation's sync began, so the
        // sync made it durable: it may be linked now, by whichever
        // allocation in its range gets here first.
        if let Some(l2_off) = m.unlinked.remove(&i) {
            self.file.pwrite_all(
                &(l2_off | COPIED).to_be_bytes(),
                self.h.l1_table_offset + i as u64 * 8,
            )?;
            m.l1[i] = l2_off | COPIED;
        }
        self.set_entry(&mut m, vc, host | COPIED)
    }

    /// Every cluster the image's metadata references, with how often: the
    /// header, the L1 and refcount tables, the refcount blocks, the L2
    /// tables and their clusters.
    fn references(&self, m: &mut Meta) -> Result<HashMap<u64, u64>, Qcow2Error> {
        let cs = self.cs();
        let mut refs: HashMap<u64, u64> = HashMap::new();
        let mut add = |off: u64, len: u64| {
            let mut c = off / cs;
            while c * cs < off + len {
                *refs.entry(c).or_default() += 1;
                c += 1;
            }
        };
        add(0, cs);
        add(self.h.l1_table_offset, self.h.l1_size as u64 * 8);
        let (table, table_len) = m.refs.table_extent();
        add(table, table_len);
        for b in m.refs.blocks() {
            add(b, cs);
        }
        for i in 0..m.l1.len() {
            let l2_off = m.l1[i] & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            add(l2_off, cs);
            let entries: Vec<u64> = self.l2(m, i)?.map(|t| t.to_vec()).unwrap_or_default();
            for (j, e) in entries.into_iter().enumerate() {
                let vc = (i * (cs / 8) as usize + j) as u64;
                if let Some(why) = m.bad.get(&vc) {
                    return Err(Qcow2Error::Damaged(why.clone()));
                }
                match self.decode(e)? {
                    Cluster::Data(off, _) | Cluster::Zero(Some(off)) => add(off, cs),
                    Cluster::Compressed(off, len) => add(off, len),
                    _ => {}
                }
            }
        }
        Ok(refs)
    }

    /// How many clusters the image's metadata references that its
    /// refcounts do not count, and how many leaked ones it counts
    /// (`qemu-img check`'s corruptions and leaks, for the tests).
    pub fn check(&self) -> Result<(u64, u64), Qcow2Error> {
        let mut m = self.lock();
        let referenced = self.references(&mut m)?;
        m.refs.compare(&*self.file, &referenced)
    }
}

impl Backend for Qcow2 {
    fn size(&self) -> u64 {
        self.h.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn features(&self) -> u32 {
        if self.read_only {
            0
        } else {
            ALL_FEATURES
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.read_or_hole(offset, buf)? {
            buf.fill(0);
        }
        Ok(())
    }

    /// Holes: zero clusters, and unallocated ones over no backing image or
    /// over its holes. Each cluster is looked up once; the holes among data
    /// are filled with zeroes only when the range is not all holes.
    fn read_or_hole(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        let cs = self.cs();
        let mut holes = Vec::new();
        let mut all_holes = true;
        self.pieces(offset, buf.len() as u64, |vc, inner, r| {
            let c = self.lookup(&mut self.lock(), vc)?;
            let piece = &mut buf[r.clone()];
            let hole = match (&c, &self.backing) {
                (Cluster::Zero(_), _) | (Cluster::Unallocated, None) => true,
                (Cluster::Unallocated, Some(b)) => b.read_or_hole(vc * cs + inner, piece)?,
                _ => {
                    self.read_cluster(vc, c, inner, piece)?;
                    false
                }
            };
            if hole {
                holes.push(r);
            } else {
                all_holes = false;
            }
            Ok(())
        })?;
        if !all_holes {
            for r in holes {
                buf[r].fill(0);
            }
        }
        Ok(all_holes)
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.pieces(offset, buf.len() as u64, |vc, inner, r| {
            let n = (r.end - r.start) as u64;
            self.write_cluster(vc, inner, Some(&buf[r]), n)
        })?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.sync_file()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.pieces(offset, len, |vc, inner, r| {
            self.write_cluster(vc, inner, None, (r.end - r.start) as u64)
        })
    }

    /// A clean stop: everything durable, then the dirty bit cleared.
    fn stop(&self) -> io::Result<()> {
        if self.read_only || self.h.version < 3 {
            return Ok(());
        }
        self.flush()?;
        if self.leaked.load(Ordering::Relaxed) {
            self.repair().map_err(io::Error::other)?;
        }
        self.set_incompatible(self.h.incompatible & !header::INCOMPAT_DIRTY)?;
        self.sync_file()
    }
}
