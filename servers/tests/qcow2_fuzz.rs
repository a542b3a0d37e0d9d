//! Hostile qcow2 images. Valid images `qemu-img create` made (versions 2
//! and 3, clusters of 512 bytes to 64 KiB, alone or over a raw or qcow2
//! backing file, with data, partial, compressed and zeroed clusters written
//! by qemu-io, or by this backend where qemu-io is missing) are damaged:
//! their header fields, the entries of their L1, L2 and refcount tables
//! (random values, reserved bits, the COPIED, compressed and zero flags,
//! offsets past the end, inside a cluster, or at the image's metadata) and
//! their length. Every such image is refused with an error that says why,
//! or served: every cluster reads (or fails alone, with a message), writes
//! read back, before and after a flush, a stop and a reopen, and nothing
//! else changes; nothing panics or hangs.
//!
//! Faults found are kept as tests of their own, below the fuzzing.
//! `PROPTEST_CASES=n` fuzzes longer (n cases a test, 400 by default);
//! `QCOW2_FUZZ_STATS=1` prints what each case came to.

mod common;
use common::{pattern, qemu_img};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use abuse_servers::qcow2::Qcow2;
use abuse_servers::Backend;
use proptest::prelude::*;

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// How long one case may take before it is called a hang (debug build, a
/// loaded machine).
const HANG: Duration = Duration::from_secs(30);
/// Of a (damaged) virtual size, the clusters in the first this many bytes
/// and in the last MiB are read.
const READ_HEAD: u64 = 16 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The `N` bytes at `at`, if the image has them.
fn bytes<const N: usize>(b: &[u8], at: u64) -> Option<[u8; N]> {
    let at = usize::try_from(at).ok()?;
    b.get(at..at.checked_add(N)?).map(|x| x.try_into().unwrap())
}

fn be32(b: &[u8], at: u64) -> u64 {
    bytes(b, at).map_or(0, |x| u32::from_be_bytes(x) as u64)
}

fn be64(b: &[u8], at: u64) -> u64 {
    bytes(b, at).map_or(0, u64::from_be_bytes)
}

/// A fork holds a copy of every descriptor of the process until it execs,
/// and with them an image's QEMU locks: a test that reopens an image it
/// has just closed finds it "in use" if another one spawned qemu-img in
/// between. Processes are spawned only while no image is open.
static FORKS: RwLock<()> = RwLock::new(());

fn spawning() -> RwLockWriteGuard<'static, ()> {
    FORKS.write().unwrap_or_else(|e| e.into_inner())
}

fn serving() -> RwLockReadGuard<'static, ()> {
    FORKS.read().unwrap_or_else(|e| e.into_inner())
}

/// A scratch directory, in memory where there is one (the backend syncs
/// at every allocation).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("qcow2-fuzz")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

/// A valid image to damage: its bytes, and its backing file's (by the
/// name the image gives it, relative to its directory).
struct Template {
    what: String,
    image: Vec<u8>,
    backing: Option<(&'static str, Vec<u8>)>,
}

/// (cluster size, virtual size): several L2 tables where the clusters are
/// small.
const GEOMETRIES: [(u64, u64); 5] = [
    (512, 1 << 20),
    (1024, 2 << 20),
    (4096, 4 << 20),
    (16384, 4 << 20),
    (65536, 4 << 20),
];
const COMPATS: [&str; 2] = ["1.1", "0.10"];
const BACKINGS: [Option<&str>; 3] = [None, Some("raw"), Some("qcow2")];
/// The last template has outgrown a refcount table of one cluster (of
/// 512 bytes: 8 MiB), for the table to move when that is cut back.
const TEMPLATES: usize = GEOMETRIES.len() * COMPATS.len() * BACKINGS.len() + 1;
const GROWN: usize = TEMPLATES - 1;

fn have_qemu_io() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| {
        Command::new("qemu-io")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// A write a template is made with.
enum Put {
    Data(u8, u64, u64),
    Compressed(u8, u64, u64),
    Zeroes(u64, u64),
}

/// Writes `puts` to the qcow2 image `img`: with qemu-io, or with this
/// backend (no compressed clusters then) where qemu-io is missing.
fn put_all(img: &Path, puts: &[Put]) {
    if have_qemu_io() {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "qcow2"]);
        for p in puts {
            cmd.arg("-c").arg(match *p {
                Put::Data(v, off, len) => format!("write -P {v} {off} {len}"),
                Put::Compressed(v, off, len) => format!("write -c -P {v} {off} {len}"),
                Put::Zeroes(off, len) => format!("write -z {off} {len}"),
            });
        }
        let out = cmd.arg(img).output().expect("qemu-io");
        assert!(
            out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
            "qemu-io: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        let b = Qcow2::open(img, false).unwrap();
        for p in puts {
            match *p {
                Put::Data(v, off, len) | Put::Compressed(v, off, len) => {
                    b.write(off, &vec![v; len as usize], false).unwrap()
                }
                Put::Zeroes(off, len) => b.write_zeroes(off, len, false).unwrap(),
            }
        }
        b.stop().unwrap();
    }
}

fn build_template(i: usize) -> Template {
    let (cs, size) = match i {
        GROWN => (512, 10 << 20),
        _ => GEOMETRIES[i % GEOMETRIES.len()],
    };
    let compat = COMPATS[i / GEOMETRIES.len() % COMPATS.len()];
    let backing = BACKINGS
        .get(i / (GEOMETRIES.len() * COMPATS.len()))
        .copied()
        .flatten();
    let d = scratch();
    let dir = d.path();
    let img = dir.join("a.qcow2");
    let opts = format!("compat={compat},cluster_size={cs}");
    let sz = size.to_string();
    let base = match backing {
        None => {
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, s(&img), &sz]);
            None
        }
        Some(fmt) => {
            let name = if fmt == "raw" {
                "base.raw"
            } else {
                "base.qcow2"
            };
            let path = dir.join(name);
            if fmt == "raw" {
                // Shorter than the image: what lies past it reads as zeroes.
                std::fs::write(&path, pattern(i as u64, (size * 3 / 4) as usize)).unwrap();
            } else {
                qemu_img(&["create", "-q", "-f", "qcow2", s(&path), &sz]);
                put_all(
                    &path,
                    &[
                        Put::Data(0x61, 0, size / 2),
                        Put::Data(0x62, size - 8192, 8192),
                    ],
                );
            }
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &opts,
                "-b",
                name,
                "-F",
                fmt,
                s(&img),
                &sz,
            ]);
            Some((name, path))
        }
    };
    let mut puts = match i {
        GROWN => vec![Put::Data(0x21, 1 << 20, 8 << 20)],
        _ => vec![],
    };
    puts.extend([
        Put::Data(0x11, 0, cs),
        Put::Data(0x12, 3 * cs + 512, 1024),
        Put::Compressed(0x13, 11 * cs, cs),
        Put::Data(0x14, 7 * cs, cs),
        Put::Zeroes(7 * cs, cs),
        Put::Zeroes(9 * cs, cs),
        Put::Data(0x15, size / 2 + cs, 2 * cs),
        Put::Data(0x16, size - cs, cs),
    ]);
    put_all(&img, &puts);
    Template {
        what: format!("cluster_size={cs},compat={compat},backing={backing:?}"),
        image: std::fs::read(&img).unwrap(),
        backing: base.map(|(name, path)| (name, std::fs::read(path).unwrap())),
    }
}

/// The templates, all made at the first use: no test runs qemu-img or
/// qemu-io (forks) while another serves an image, as a fork holds the
/// image's descriptor, and with it its locks, until it execs.
fn template(i: usize) -> &'static Template {
    static ALL: OnceLock<Vec<Template>> = OnceLock::new();
    &ALL.get_or_init(|| {
        let _g = spawning();
        (0..TEMPLATES).map(build_template).collect()
    })[i % TEMPLATES]
}

/// Where a template's metadata and data are, for the mutations to aim at.
#[derive(Debug, Default)]
struct Layout {
    cs: u64,
    len: u64,
    l1_offset: u64,
    l1_size: u64,
    /// L2 tables: offset, and the indices of their entries in use.
    l2: Vec<(u64, Vec<u64>)>,
    reftable_offset: u64,
    reftable_entries: u64,
    /// Refcount blocks: offset, and the indices of their counts in use.
    blocks: Vec<(u64, Vec<u64>)>,
    /// Host offsets of data clusters.
    data: Vec<u64>,
    /// Virtual clusters with an L2 entry.
    used: Vec<u64>,
    /// Where a backing file's name may be written: where the image has
    /// one, else past the header extensions.
    name_at: u64,
}

fn layout(img: &[u8]) -> Layout {
    let cb = be32(img, 20) as u32;
    let cs = 1u64 << cb;
    let len = img.len() as u64;
    let mut l = Layout {
        cs,
        len,
        l1_offset: be64(img, 40),
        l1_size: be32(img, 36),
        reftable_offset: be64(img, 48),
        reftable_entries: be32(img, 56) * cs / 8,
        ..Default::default()
    };
    let per = cs / 8;
    for i in 0..l.l1_size {
        let t = be64(img, l.l1_offset + i * 8) & OFFSET_MASK;
        if t == 0 {
            continue;
        }
        let mut used = Vec::new();
        for j in 0..per {
            let e = be64(img, t + j * 8);
            if e == 0 {
                continue;
            }
            used.push(j);
            l.used.push(i * per + j);
            if e & COMPRESSED == 0 && e & OFFSET_MASK != 0 {
                l.data.push(e & OFFSET_MASK);
            }
        }
        l.l2.push((t, used));
    }
    l.name_at = match be64(img, 8) {
        0 => {
            let mut at = if be32(img, 4) >= 3 {
                be32(img, 100)
            } else {
                72
            };
            while be32(img, at) != 0 && at < cs {
                at += 8 + be32(img, at + 4).next_multiple_of(8);
            }
            at + 8
        }
        at => at,
    };
    for i in 0..l.reftable_entries {
        let b = be64(img, l.reftable_offset + i * 8) & OFFSET_MASK;
        if b != 0 {
            let used = (0..cs / 2)
                .filter(|&k| get(img, b + k * 2, 2) != 0)
                .collect();
            l.blocks.push((b, used));
        }
    }
    l
}

/// Something in an image an offset may be made to point at.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// Offset 0 (in a table entry: none).
    Header,
    L1,
    RefTable,
    RefBlock(usize),
    L2(usize),
    Data(usize),
    /// This many clusters past the end of the file.
    PastEnd(u64),
    /// 1 << this (huge offsets).
    Far(u32),
}

impl Target {
    fn at(self, l: &Layout) -> u64 {
        let pick = |v: Vec<u64>, n: usize| {
            if v.is_empty() {
                l.len
            } else {
                v[n % v.len()]
            }
        };
        match self {
            Target::Header => 0,
            Target::L1 => l.l1_offset,
            Target::RefTable => l.reftable_offset,
            Target::RefBlock(n) => pick(l.blocks.iter().map(|b| b.0).collect(), n),
            Target::L2(n) => pick(l.l2.iter().map(|t| t.0).collect(), n),
            Target::Data(n) => pick(l.data.clone(), n),
            Target::PastEnd(k) => l.len.next_multiple_of(l.cs) + k * l.cs,
            Target::Far(bits) => 1 << bits,
        }
    }
}

fn target() -> BoxedStrategy<Target> {
    prop_oneof![
        2 => Just(Target::Header),
        1 => Just(Target::L1),
        1 => Just(Target::RefTable),
        1 => any::<usize>().prop_map(Target::RefBlock),
        3 => any::<usize>().prop_map(Target::L2),
        3 => any::<usize>().prop_map(Target::Data),
        2 => (0u64..4).prop_map(Target::PastEnd),
        1 => (30u32..63).prop_map(Target::Far),
    ]
    .boxed()
}

/// A new value for a field or a table entry.
#[derive(Clone, Copy, Debug)]
enum Val {
    Set(u64),
    Add(i64),
    Xor(u64),
    /// The offset of something, plus a skew (an unaligned one if not 0).
    To(Target, u64),
}

impl Val {
    fn apply(self, old: u64, l: &Layout) -> u64 {
        match self {
            Val::Set(v) => v,
            Val::Add(d) => old.wrapping_add(d as u64),
            Val::Xor(x) => old ^ x,
            Val::To(t, skew) => t.at(l).wrapping_add(skew),
        }
    }
}

fn skew() -> BoxedStrategy<u64> {
    prop_oneof![6 => Just(0u64), 1 => Just(512u64), 1 => 1u64..65536].boxed()
}

fn val() -> BoxedStrategy<Val> {
    prop_oneof![
        1 => any::<u64>().prop_map(Val::Set),
        1 => prop_oneof![
            Just(0u64),
            Just(1),
            Just(u64::MAX),
            Just(u32::MAX as u64),
            Just(i32::MAX as u64),
            Just(1 << 63),
            Just(1 << 62),
            (0u64..130),
        ]
        .prop_map(Val::Set),
        1 => (-9i64..=9).prop_map(Val::Add),
        1 => (0u32..64).prop_map(|k| Val::Xor(1 << k)),
        2 => (target(), skew()).prop_map(|(t, k)| Val::To(t, k)),
    ]
    .boxed()
}

/// A header field: where, and how wide.
#[derive(Clone, Copy, Debug)]
enum Field {
    Magic,
    Version,
    BackingFileOffset,
    BackingFileSize,
    ClusterBits,
    Size,
    CryptMethod,
    L1Size,
    L1TableOffset,
    RefcountTableOffset,
    RefcountTableClusters,
    NbSnapshots,
    SnapshotsOffset,
    IncompatibleFeatures,
    CompatibleFeatures,
    AutoclearFeatures,
    RefcountOrder,
    HeaderLength,
    CompressionType,
}

impl Field {
    fn at(self) -> (u64, u64) {
        match self {
            Field::Magic => (0, 4),
            Field::Version => (4, 4),
            Field::BackingFileOffset => (8, 8),
            Field::BackingFileSize => (16, 4),
            Field::ClusterBits => (20, 4),
            Field::Size => (24, 8),
            Field::CryptMethod => (32, 4),
            Field::L1Size => (36, 4),
            Field::L1TableOffset => (40, 8),
            Field::RefcountTableOffset => (48, 8),
            Field::RefcountTableClusters => (56, 4),
            Field::NbSnapshots => (60, 4),
            Field::SnapshotsOffset => (64, 8),
            Field::IncompatibleFeatures => (72, 8),
            Field::CompatibleFeatures => (80, 8),
            Field::AutoclearFeatures => (88, 8),
            Field::RefcountOrder => (96, 4),
            Field::HeaderLength => (100, 4),
            Field::CompressionType => (104, 1),
        }
    }
}

fn field() -> BoxedStrategy<Field> {
    use Field::*;
    prop_oneof![
        1 => Just(Magic),
        3 => Just(Version),
        3 => Just(BackingFileOffset),
        3 => Just(BackingFileSize),
        3 => Just(ClusterBits),
        4 => Just(Size),
        1 => Just(CryptMethod),
        4 => Just(L1Size),
        4 => Just(L1TableOffset),
        4 => Just(RefcountTableOffset),
        4 => Just(RefcountTableClusters),
        2 => Just(NbSnapshots),
        2 => Just(SnapshotsOffset),
        3 => Just(IncompatibleFeatures),
        2 => Just(CompatibleFeatures),
        2 => Just(AutoclearFeatures),
        3 => Just(RefcountOrder),
        3 => Just(HeaderLength),
        2 => Just(CompressionType),
    ]
    .boxed()
}

/// A new L1, L2 or refcount table entry.
#[derive(Clone, Copy, Debug)]
enum Entry {
    Val(Val),
    /// An offset (skewed) with flags.
    Point(Target, u64, u64),
    /// A compressed cluster's descriptor: offset (skewed), sectors.
    Compressed(Target, u64, u64),
}

fn flags() -> BoxedStrategy<u64> {
    prop_oneof![
        4 => Just(COPIED),
        2 => Just(0),
        1 => Just(COPIED | ZERO),
        1 => Just(ZERO),
        1 => Just(COMPRESSED),
        1 => Just(COPIED | COMPRESSED),
        1 => (1u32..9).prop_map(|k| COPIED | 1 << k),
        1 => (56u32..62).prop_map(|k| COPIED | 1 << k),
    ]
    .boxed()
}

fn entry() -> BoxedStrategy<Entry> {
    prop_oneof![
        2 => val().prop_map(Entry::Val),
        3 => (target(), skew(), flags()).prop_map(|(t, k, f)| Entry::Point(t, k, f)),
        1 => (target(), skew(), 1u64..300).prop_map(|(t, k, n)| Entry::Compressed(t, k, n)),
    ]
    .boxed()
}

impl Entry {
    fn apply(self, old: u64, l: &Layout) -> u64 {
        match self {
            Entry::Val(v) => v.apply(old, l),
            Entry::Point(t, k, f) => (t.at(l).wrapping_add(k) & OFFSET_MASK) | f,
            Entry::Compressed(t, k, n) => {
                let x = 62 - (l.cs.trailing_zeros() - 8);
                let off = t.at(l).wrapping_add(k) & ((1 << x) - 1);
                COMPRESSED | off | ((n - 1) << x & ((1 << 62) - 1))
            }
        }
    }
}

/// Which entry of a table: one in use, or any.
#[derive(Clone, Copy, Debug)]
enum Pick {
    Used(usize),
    Any(usize),
}

fn pick() -> BoxedStrategy<Pick> {
    prop_oneof![
        3 => any::<usize>().prop_map(Pick::Used),
        1 => any::<usize>().prop_map(Pick::Any)
    ]
    .boxed()
}

impl Pick {
    fn of(self, used: &[u64], all: u64) -> u64 {
        match self {
            Pick::Used(n) if !used.is_empty() => used[n % used.len()],
            Pick::Used(n) | Pick::Any(n) => n as u64 % all.max(1),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Mutation {
    Header(Field, Val),
    L1(Pick, Entry),
    /// L2 table (by its order in the L1 table), entry.
    L2(usize, Pick, Entry),
    RefTable(Pick, Entry),
    /// Refcount block (by its order in the table), count.
    Refcount(usize, Pick, u16),
    /// A byte of the header cluster (extensions, the backing file's name).
    Byte(u16, u8),
    /// The file cut to this many thousandths of its length (on a cluster
    /// boundary if set).
    Truncate(u16, bool),
    /// The dirty bit set (version 3: the image is repaired when opened for
    /// writing, every table walked).
    Dirty,
    /// The backing file named so.
    Backing(&'static str),
}

/// Backing file names: the image itself, its directory, files that are
/// there or not.
const NAMES: [&str; 9] = [
    "a.qcow2",
    "./a.qcow2",
    ".",
    "..",
    "base.raw",
    "base.qcow2",
    "missing",
    "/dev/null",
    "a.qcow2/x",
];

fn header_mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![
        12 => (field(), val()).prop_map(|(f, v)| Mutation::Header(f, v)),
        1 => proptest::sample::select(&NAMES[..]).prop_map(Mutation::Backing),
        1 => Just(Mutation::Dirty),
        1 => (72u16..1024, any::<u8>()).prop_map(|(at, v)| Mutation::Byte(at, v)),
    ]
    .boxed()
}

fn table_mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![
        2 => (pick(), entry()).prop_map(|(p, e)| Mutation::L1(p, e)),
        5 => (any::<usize>(), pick(), entry()).prop_map(|(t, p, e)| Mutation::L2(t, p, e)),
        1 => (pick(), entry()).prop_map(|(p, e)| Mutation::RefTable(p, e)),
        1 => Just(Mutation::Dirty),
        2 => (
            any::<usize>(),
            pick(),
            prop_oneof![Just(0u16), Just(1), Just(2), Just(u16::MAX), any::<u16>()]
        )
            .prop_map(|(b, p, v)| Mutation::Refcount(b, p, v)),
    ]
    .boxed()
}

fn truncation() -> BoxedStrategy<Mutation> {
    (0u16..1000, any::<bool>())
        .prop_map(|(f, a)| Mutation::Truncate(f, a))
        .boxed()
}

fn any_mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![
        3 => header_mutation(),
        5 => table_mutation(),
        1 => truncation(),
    ]
    .boxed()
}

fn put(img: &mut [u8], at: u64, width: u64, v: u64) {
    let bytes = v.to_be_bytes();
    if at
        .checked_add(width)
        .is_some_and(|end| end <= img.len() as u64)
    {
        let at = at as usize;
        img[at..at + width as usize].copy_from_slice(&bytes[8 - width as usize..]);
    }
}

fn get(img: &[u8], at: u64, width: u64) -> u64 {
    match width {
        1 => bytes(img, at).map_or(0, |x: [u8; 1]| x[0] as u64),
        2 => bytes(img, at).map_or(0, |x| u16::from_be_bytes(x) as u64),
        4 => be32(img, at),
        _ => be64(img, at),
    }
}

/// Applies the mutations to a copy of the template (whose layout is `l`).
fn mutate(image: &[u8], l: &Layout, muts: &[Mutation]) -> Vec<u8> {
    let mut img = image.to_vec();
    let entry = |img: &mut Vec<u8>, at: u64, e: Entry| {
        let old = be64(img, at);
        put(img, at, 8, e.apply(old, l));
    };
    for m in muts {
        match *m {
            Mutation::Header(f, v) => {
                let (at, w) = f.at();
                let old = get(&img, at, w);
                put(&mut img, at, w, v.apply(old, l));
            }
            Mutation::L1(p, e) => {
                let used: Vec<u64> = (0..l.l1_size)
                    .filter(|&i| be64(image, l.l1_offset + i * 8) != 0)
                    .collect();
                entry(&mut img, l.l1_offset + p.of(&used, l.l1_size) * 8, e);
            }
            Mutation::L2(t, p, e) => {
                if let Some((off, used)) = l.l2.get(t % l.l2.len().max(1)) {
                    entry(&mut img, off + p.of(used, l.cs / 8) * 8, e);
                }
            }
            Mutation::RefTable(p, e) => {
                let used: Vec<u64> = (0..l.reftable_entries)
                    .filter(|&i| be64(image, l.reftable_offset + i * 8) != 0)
                    .collect();
                let i = p.of(&used, l.reftable_entries);
                entry(&mut img, l.reftable_offset + i * 8, e);
            }
            Mutation::Refcount(b, p, v) => {
                if let Some((off, used)) = l.blocks.get(b % l.blocks.len().max(1)) {
                    put(&mut img, off + p.of(used, l.cs / 2) * 2, 2, v as u64);
                }
            }
            Mutation::Byte(at, v) => put(&mut img, at as u64, 1, v as u64),
            Mutation::Dirty => {
                let v = be64(&img, 72);
                put(&mut img, 72, 8, v | 1);
            }
            Mutation::Backing(name) => {
                let end = l.name_at + name.len() as u64;
                if end <= l.cs && end <= img.len() as u64 {
                    put(&mut img, 8, 8, l.name_at);
                    put(&mut img, 16, 4, name.len() as u64);
                    let at = l.name_at as usize;
                    img[at..at + name.len()].copy_from_slice(name.as_bytes());
                }
            }
            Mutation::Truncate(f, aligned) => {
                let mut n = img.len() as u64 * f as u64 / 1000;
                if aligned {
                    n -= n % l.cs;
                }
                img.truncate(n as usize);
            }
        }
    }
    img
}

/// The virtual clusters that share a host cluster with another one that
/// is written in place (COPIED data, or a zero cluster that kept its
/// cluster): damage nobody can see without reading every table, which
/// qemu does not look for either; writing one changes the others.
fn aliased(img: &[u8]) -> HashSet<u64> {
    let cb = be32(img, 20);
    if !(9..=21).contains(&cb) {
        return HashSet::new();
    }
    let cs = 1u64 << cb;
    let v3 = be32(img, 4) >= 3;
    let (l1, l1_size) = (be64(img, 40), be32(img, 36).min(img.len() as u64 / 8));
    let per = cs / 8;
    // Host cluster: (virtual clusters there, one of them written in place).
    let mut host: HashMap<u64, (Vec<u64>, bool)> = HashMap::new();
    for i in 0..l1_size {
        let t = be64(img, l1.wrapping_add(i * 8)) & OFFSET_MASK;
        if t == 0 || t.saturating_add(cs) > img.len() as u64 {
            continue;
        }
        for j in 0..per {
            let e = be64(img, t + j * 8);
            let vc = i * per + j;
            if e & COMPRESSED != 0 {
                let x = 62 - (cb - 8);
                let off = e & ((1 << x) - 1);
                let len = (((e & ((1 << 62) - 1)) >> x) + 1) * 512 - off % 512;
                for c in off / cs..=(off + len - 1) / cs {
                    host.entry(c).or_default().0.push(vc);
                }
                continue;
            }
            let off = e & OFFSET_MASK;
            if e & L2_RESERVED != 0 || off == 0 || !off.is_multiple_of(cs) {
                continue;
            }
            let in_place = e & COPIED != 0 || (v3 && e & ZERO != 0);
            let h = host.entry(off / cs).or_default();
            h.0.push(vc);
            h.1 |= in_place;
        }
    }
    host.into_values()
        .filter(|(vcs, in_place)| *in_place && vcs.len() > 1)
        .flat_map(|(vcs, _)| vcs)
        .collect()
}

/// A write to the device.
#[derive(Clone, Copy, Debug)]
enum OpKind {
    Write(u64),
    Zeroes,
    Discard,
}

#[derive(Clone, Copy, Debug)]
struct Op {
    kind: OpKind,
    cluster: Pick,
    /// Sectors into the cluster, and sectors long (0: the whole cluster).
    skew: u32,
    sectors: u32,
}

fn ops() -> BoxedStrategy<Vec<Op>> {
    let kind = prop_oneof![
        6 => any::<u64>().prop_map(OpKind::Write),
        1 => Just(OpKind::Zeroes),
        1 => Just(OpKind::Discard),
    ];
    proptest::collection::vec(
        (kind, pick(), 0u32..256, prop_oneof![Just(0u32), 1u32..300]).prop_map(
            |(kind, cluster, skew, sectors)| Op {
                kind,
                cluster,
                skew,
                sectors,
            },
        ),
        1..6,
    )
    .boxed()
}

/// The clusters of the device read: all of a small one; the first
/// READ_HEAD bytes and the last MiB of a large one.
fn sampled(size: u64, cs: u64) -> Vec<u64> {
    let n = size.div_ceil(cs);
    let head = READ_HEAD / cs;
    let tail = ((1 << 20) / cs).max(1);
    if n <= head + tail {
        (0..n).collect()
    } else {
        (0..head).chain(n - tail..n).collect()
    }
}

type Contents = BTreeMap<u64, Result<Vec<u8>, String>>;

fn msg(e: std::io::Error) -> String {
    let m = e.to_string();
    if m.is_empty() {
        // An error must say why.
        format!("an error without a message: {e:?}")
    } else {
        m
    }
}

/// Reads the clusters `vcs` (their part below the device's end), a MiB at
/// a time; where that fails, cluster by cluster. Holes read as zeroes.
fn read_clusters(b: &Qcow2, cs: u64, vcs: &[u64]) -> Contents {
    let size = b.size();
    let mut out = BTreeMap::new();
    let per_run = ((1 << 20) / cs).max(1) as usize;
    let mut runs: Vec<Vec<u64>> = Vec::new();
    for &vc in vcs {
        match runs.last_mut() {
            Some(r) if r.len() < per_run && *r.last().unwrap() + 1 == vc => r.push(vc),
            _ => runs.push(vec![vc]),
        }
    }
    for run in runs {
        let start = run[0] * cs;
        let end = ((run[run.len() - 1] + 1) * cs).min(size);
        let mut buf = vec![0xa5u8; (end - start) as usize];
        match b.read_or_hole(start, &mut buf) {
            Ok(hole) => {
                if hole {
                    buf.fill(0);
                }
                for (k, c) in buf.chunks(cs as usize).enumerate() {
                    out.insert(run[k], Ok(c.to_vec()));
                }
            }
            Err(_) => {
                for &vc in &run {
                    let at = vc * cs;
                    let mut c = vec![0u8; (cs.min(size - at)) as usize];
                    out.insert(vc, b.read(at, &mut c).map(|()| c).map_err(msg));
                }
            }
        }
    }
    out
}

fn err_said(r: Result<(), std::io::Error>) -> Result<bool, String> {
    match r {
        Ok(()) => Ok(true),
        Err(e) => {
            let m = msg(e);
            if m.starts_with("an error without") {
                Err(m)
            } else {
                Ok(false)
            }
        }
    }
}

macro_rules! ensure {
    ($c:expr, $($f:tt)*) => {
        if !$c {
            return Err(format!($($f)*));
        }
    };
}

/// Differences between what reads and what should, for the report.
fn diff(got: &Contents, want: &BTreeMap<u64, Vec<u8>>) -> Option<String> {
    for (vc, w) in want {
        match got.get(vc) {
            Some(Ok(g)) if g == w => {}
            Some(Ok(g)) => {
                let at = g.iter().zip(w).position(|(a, b)| a != b).unwrap_or(0);
                return Some(format!(
                    "cluster {vc} reads {:#x} at byte {at}, not {:#x}",
                    g[at], w[at]
                ));
            }
            Some(Err(e)) => return Some(format!("cluster {vc} does not read: {e}")),
            None => return Some(format!("cluster {vc} was not read")),
        }
    }
    None
}

/// With QCOW2_FUZZ_STATS set, what each case came to is printed (`grep
/// ^outcome | sort | uniq -c` tells how much of it the fuzzing reaches).
fn note(what: impl std::fmt::Display) {
    if std::env::var_os("QCOW2_FUZZ_STATS").is_some() {
        // Numbers (offsets, clusters) out, so that like outcomes count
        // together.
        let what: String = what
            .to_string()
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .collect();
        eprintln!("outcome: {what}");
    }
}

/// One damaged image, served: Ok, or what went wrong.
fn serve(path: &Path, ops: &[Op], aliased: &HashSet<u64>, used: &[u64]) -> Result<(), String> {
    let open = |ro: bool| -> Result<Option<Qcow2>, String> {
        match Qcow2::open(path, ro) {
            Ok(b) => Ok(Some(b)),
            Err(e) => {
                let m = e.to_string();
                ensure!(!m.is_empty(), "an open error without a message: {e:?}");
                note(format_args!("open (read-only: {ro}) refused: {m}"));
                Ok(None)
            }
        }
    };
    // Read-only: every cluster reads, or fails alone.
    let ro = open(true)?;
    let before = ro.as_ref().map(|b| {
        let cs = b.header().cluster_size();
        read_clusters(b, cs, &sampled(b.size(), cs))
    });
    drop(ro);
    let Some(b) = open(false)? else {
        return Ok(());
    };
    note("served for writing");
    let cs = b.header().cluster_size();
    let size = b.size();
    let vcs = sampled(size, cs);
    let now = read_clusters(&b, cs, &vcs);
    if let Some(before) = &before {
        for (vc, r) in &now {
            if let (Some(Ok(x)), Ok(y)) = (before.get(vc), r) {
                ensure!(x == y, "cluster {vc} reads otherwise read-only");
            }
        }
    }
    // What each cluster holds, where that is known.
    let mut model: BTreeMap<u64, Vec<u8>> = now
        .iter()
        .filter(|(vc, _)| !aliased.contains(vc))
        .filter_map(|(&vc, r)| r.as_ref().ok().map(|d| (vc, d.clone())))
        .collect();
    let clusters = size.div_ceil(cs);
    for op in ops.iter().filter(|_| !vcs.is_empty()) {
        let vc = match op.cluster {
            Pick::Used(n) if !used.is_empty() && used[n % used.len()] < clusters => {
                used[n % used.len()]
            }
            Pick::Used(n) | Pick::Any(n) => vcs[n % vcs.len()],
        };
        let at = vc * cs + (op.skew as u64 * 512) % cs;
        let len = match op.sectors {
            0 => cs,
            n => n as u64 * 512,
        }
        .min(size.saturating_sub(at));
        if len == 0 {
            continue;
        }
        let data = match op.kind {
            OpKind::Write(seed) => pattern(seed, len as usize),
            _ => vec![0; len as usize],
        };
        let r = match op.kind {
            OpKind::Write(_) => b.write(at, &data, false),
            OpKind::Zeroes => b.write_zeroes(at, len, false),
            OpKind::Discard => b.discard(at, len),
        };
        if let Err(e) = &r {
            let kind = format!("{:?}", op.kind);
            note(format_args!(
                "{} failed: {e}",
                &kind[..kind.find('(').unwrap_or(kind.len())]
            ));
        } else {
            note("an op done");
        }
        let ok = err_said(r)?;
        // The clusters written, and what of them.
        let mut done = 0;
        while done < len {
            let (c, inner) = ((at + done) / cs, (at + done) % cs);
            let n = (cs - inner).min(len - done);
            let whole = inner == 0 && (n == cs || at + done + n == size);
            if !ok || aliased.contains(&c) {
                model.remove(&c);
            } else if let Some(m) = model.get_mut(&c) {
                m[inner as usize..(inner + n) as usize]
                    .copy_from_slice(&data[done as usize..(done + n) as usize]);
            } else if whole {
                model.insert(c, data[done as usize..(done + n) as usize].to_vec());
            }
            done += n;
        }
    }
    b.flush().map_err(|e| format!("flush: {e}"))?;
    if let Some(d) = diff(&read_clusters(&b, cs, &vcs), &model) {
        return Err(format!("after the writes: {d}"));
    }
    let stopped = b.stop();
    if let Err(e) = &stopped {
        note(format_args!("stop failed: {e}"));
    }
    let stopped = err_said(stopped)?;
    drop(b);
    // Reopened (read-only: a failed stop leaves it dirty, and a damaged
    // dirty image is refused for writing), it reads the same.
    let b = Qcow2::open(path, true).map_err(|e| format!("reopen: {e}"))?;
    if let Some(d) = diff(&read_clusters(&b, cs, &vcs), &model) {
        return Err(format!("reopened: {d}"));
    }
    drop(b);
    if stopped {
        let b = Qcow2::open(path, false).map_err(|e| format!("reopen after a clean stop: {e}"))?;
        if let Some(d) = diff(&read_clusters(&b, cs, &vcs), &model) {
            return Err(format!("reopened for writing: {d}"));
        }
    }
    Ok(())
}

/// Runs one case: the template damaged by `muts`, served with `ops`, in a
/// thread of its own (a panic is caught, a hang timed out).
fn case(t: usize, muts: &[Mutation], ops: &[Op]) -> Result<(), String> {
    let t = template(t);
    let l = layout(&t.image);
    let img = mutate(&t.image, &l, muts);
    let d = scratch();
    let path = d.path().join("a.qcow2");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(&img))
        .unwrap();
    if let Some((name, bytes)) = &t.backing {
        std::fs::write(d.path().join(name), bytes).unwrap();
    }
    let aliased = aliased(&img);
    let used = l.used.clone();
    let ops = ops.to_vec();
    let (tx, rx) = mpsc::channel();
    let p: PathBuf = path.clone();
    let started = Instant::now();
    let _s = serving();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(|| serve(&p, &ops, &aliased, &used));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(HANG) {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(format!("{}: {e}", t.what)),
        Ok(Err(p)) => {
            let m = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("{}: panicked: {m}", t.what))
        }
        Err(_) => {
            // The thread is left behind; the directory with it.
            std::mem::forget(d);
            Err(format!(
                "{}: hangs (no answer in {:?})",
                t.what,
                started.elapsed()
            ))
        }
    }
}

/// The cases of each fuzzing test: PROPTEST_CASES if set (to fuzz for
/// longer), else what keeps the file's run short. Failures are kept as
/// tests of their own, not in a file of seeds.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(400),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Header fields and the header cluster's bytes.
    #[test]
    fn damaged_headers(
        t in 0..TEMPLATES,
        muts in proptest::collection::vec(header_mutation(), 1..4),
        ops in ops(),
    ) {
        let r = case(t, &muts, &ops);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    /// Entries of the L1, L2 and refcount tables, and refcounts.
    #[test]
    fn damaged_tables(
        t in 0..TEMPLATES,
        muts in proptest::collection::vec(table_mutation(), 1..5),
        ops in ops(),
    ) {
        let r = case(t, &muts, &ops);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    /// Any of them, and a file cut short.
    #[test]
    fn damaged_anything(
        t in 0..TEMPLATES,
        muts in proptest::collection::vec(any_mutation(), 1..6),
        ops in ops(),
    ) {
        let r = case(t, &muts, &ops);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: config().cases / 10, ..config() })]

    /// The refcount table of an image that outgrew one cluster of it cut
    /// back to one: the first allocation past what it covers moves it.
    #[test]
    fn damaged_grown_images(
        muts in proptest::collection::vec(table_mutation(), 0..3),
        at in 0u64..2000,
        ops in ops(),
    ) {
        let mut all = vec![Mutation::Header(Field::RefcountTableClusters, Val::Set(1))];
        all.extend(muts);
        // An allocating write (past the template's data, at 9 MiB).
        let grow = Op {
            kind: OpKind::Write(at),
            cluster: Pick::Any(18432 + at as usize),
            skew: 0,
            sectors: 0,
        };
        let ops: Vec<Op> = std::iter::once(grow).chain(ops).collect();
        let r = case(GROWN, &all, &ops);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

/// Every template, undamaged, serves and round-trips (the fuzzing's own
/// check: what it calls a fault is one).
#[test]
fn undamaged_templates_pass() {
    let ops = [Op {
        kind: OpKind::Write(7),
        cluster: Pick::Used(1),
        skew: 1,
        sectors: 3,
    }];
    for t in 0..TEMPLATES {
        let img = &template(t).image;
        assert!(aliased(img).is_empty(), "{}", template(t).what);
        case(t, &[], &ops).unwrap();
    }
}

/// Faults the fuzzing found, each a test of its own.
mod found {
    use super::common::{pattern, qemu_img};
    use super::{serving, spawning};

    use std::os::unix::fs::FileExt;
    use std::path::Path;

    use abuse_servers::qcow2::Qcow2;
    use abuse_servers::Backend;

    const COPIED: u64 = 1 << 63;
    const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    fn peek(img: &Path, at: u64) -> u64 {
        let mut b = [0u8; 8];
        std::fs::File::open(img)
            .unwrap()
            .read_exact_at(&mut b, at)
            .unwrap();
        u64::from_be_bytes(b)
    }

    fn poke(img: &Path, at: u64, v: u64) {
        let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
        f.write_all_at(&v.to_be_bytes(), at).unwrap();
    }

    /// Where `img` keeps its tables: the L1 table, the refcount table, the
    /// first refcount block, the L2 table of L1 entry 0.
    struct Tables {
        l1: u64,
        reftable: u64,
        block: u64,
        l2: u64,
    }

    fn tables(img: &Path) -> Tables {
        let (l1, reftable) = (peek(img, 40), peek(img, 48));
        Tables {
            l1,
            reftable,
            block: peek(img, reftable) & OFFSET_MASK,
            l2: peek(img, l1) & OFFSET_MASK,
        }
    }

    /// An 8 MiB image of `cs`-byte clusters whose cluster 0 holds
    /// pattern 1 (written by this backend, which stops cleanly).
    fn image(dir: &Path, cs: u64) -> std::path::PathBuf {
        let img = dir.join("a.qcow2");
        let opts = format!("cluster_size={cs}");
        let g = spawning();
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, s(&img), "8M"]);
        drop(g);
        let _s = serving();
        let b = Qcow2::open(&img, false).unwrap();
        b.write(0, &pattern(1, cs as usize), false).unwrap();
        b.stop().unwrap();
        img
    }

    /// An L2 entry that points at the image's own metadata (COPIED: to be
    /// written in place) was served: a write there overwrote a table or a
    /// refcount block. It is damage now, that cluster's alone: its reads
    /// and writes fail and say why, and nothing else is touched.
    #[test]
    fn an_l2_entry_into_the_metadata_is_damage_not_written_over() {
        let cs = 65536u64;
        for what in [
            "the L1 table",
            "the refcount table",
            "a refcount block",
            "an L2 table",
        ] {
            let d = tempfile::tempdir().unwrap();
            let img = image(d.path(), cs);
            let _s = serving();
            let t = tables(&img);
            let at = match what {
                "the L1 table" => t.l1,
                "the refcount table" => t.reftable,
                "a refcount block" => t.block,
                _ => t.l2,
            };
            poke(&img, t.l2 + 8, at | COPIED);
            let before = std::fs::read(&img).unwrap();
            let b = Qcow2::open(&img, false).unwrap();
            let e = b.write(cs, &pattern(2, cs as usize), false).unwrap_err();
            assert!(
                e.to_string().contains(&format!("points into {what}")),
                "{what}: {e}"
            );
            let e = b.read(cs, &mut vec![0u8; cs as usize]).unwrap_err();
            assert!(e.to_string().contains("points into"), "{what}: {e}");
            let mut back = vec![0u8; cs as usize];
            b.read(0, &mut back).unwrap();
            assert_eq!(back, pattern(1, cs as usize), "{what}");
            b.stop().unwrap();
            drop(b);
            let after = std::fs::read(&img).unwrap();
            let c = at as usize..(at + cs) as usize;
            assert!(before[c.clone()] == after[c], "{what} was written over");
            let b = Qcow2::open(&img, false).expect(what);
            b.read(0, &mut back).unwrap();
            assert_eq!(back, pattern(1, cs as usize), "{what}");
        }
    }

    /// Two pieces of metadata in one cluster (an L2 table that is the L1
    /// table, the refcount table or another L2 table; a refcount block
    /// that is the L1 table, another block or an L2 table) were served: writing one corrupted the other. Such an
    /// image is refused when opened.
    #[test]
    fn metadata_sharing_a_cluster_is_refused_when_opened() {
        // 4 KiB clusters: the L1 table of an 8 MiB image has 4 entries.
        let cs = 4096u64;
        for (what, overlaps) in [
            ("L1 entry 1 at the L1 table", "overlaps the L1 table"),
            ("L1 entry 1 at L1 entry 0's table", "overlaps an L2 table"),
            (
                "L1 entry 1 at the refcount table",
                "overlaps the refcount table",
            ),
            ("refcount block 1 at the L1 table", "overlaps the L1 table"),
            ("refcount block 1 at block 0", "overlaps a refcount block"),
            (
                "refcount block 1 at an L2 table",
                "overlaps a refcount block",
            ),
        ] {
            let d = tempfile::tempdir().unwrap();
            let img = image(d.path(), cs);
            let _s = serving();
            let t = tables(&img);
            match what {
                "L1 entry 1 at the L1 table" => poke(&img, t.l1 + 8, t.l1 | COPIED),
                "L1 entry 1 at L1 entry 0's table" => poke(&img, t.l1 + 8, t.l2 | COPIED),
                "L1 entry 1 at the refcount table" => poke(&img, t.l1 + 8, t.reftable | COPIED),
                "refcount block 1 at an L2 table" => poke(&img, t.reftable + 8, t.l2),
                "refcount block 1 at the L1 table" => poke(&img, t.reftable + 8, t.l1),
                _ => poke(&img, t.reftable + 8, t.block),
            }
            for ro in [true, false] {
                let e = Qcow2::open(&img, ro)
                    .err()
                    .unwrap_or_else(|| panic!("{what}: opened"));
                assert!(e.to_string().contains(overlaps), "{what}: {e}");
            }
        }
    }

    /// An L2 entry that points past the end of the file read as zeroes,
    /// and was written in place there: the next cluster allocated (at the
    /// end) was the same one, and two virtual clusters shared it. It is
    /// damage now, and stays so while the image grows.
    #[test]
    fn an_l2_entry_past_the_end_is_damage_not_shared_with_the_next_allocation() {
        let cs = 65536u64;
        let d = tempfile::tempdir().unwrap();
        let img = image(d.path(), cs);
        let _s = serving();
        let t = tables(&img);
        for (i, flags) in [COPIED, 0].into_iter().enumerate() {
            let end = std::fs::metadata(&img).unwrap().len().next_multiple_of(cs);
            poke(&img, t.l2 + 8, end | flags);
            let b = Qcow2::open(&img, false).unwrap();
            let mut back = vec![0u8; cs as usize];
            let e = b.read(cs, &mut back).unwrap_err();
            assert!(e.to_string().contains("past the image's end"), "{e}");
            if flags == COPIED {
                let e = b.write(cs, &pattern(2, 512), false).unwrap_err();
                assert!(e.to_string().contains("past the image's end"), "{e}");
            }
            // The next allocations take the clusters at the end.
            b.write((2 + i as u64) * cs, &pattern(3, cs as usize), false)
                .unwrap();
            let e = b.read(cs, &mut back).unwrap_err();
            assert!(e.to_string().contains("past the image's end"), "{e}");
            b.read((2 + i as u64) * cs, &mut back).unwrap();
            assert_eq!(back, pattern(3, cs as usize));
            b.stop().unwrap();
        }
    }

    /// An image that names itself as its raw backing file was served for
    /// writing: its unallocated clusters read its own bytes, which its
    /// writes changed. A raw backing file takes QEMU's reader lock now, as
    /// QEMU does, which the image's own writer lock refuses; read-only,
    /// it is served.
    #[test]
    fn an_image_that_is_its_own_raw_backing_file_is_not_written() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("a.qcow2");
        std::fs::write(d.path().join("base.raw"), pattern(4, 1 << 20)).unwrap();
        let g = spawning();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&img),
            "8M",
        ]);
        drop(g);
        let _s = serving();
        // The name, "base.raw", becomes "a.qcow2".
        let at = peek(&img, 8);
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(b"a.qcow2", at).unwrap();
        f.write_all_at(&7u32.to_be_bytes(), 16).unwrap();
        let e = Qcow2::open(&img, false).err().expect("opened for writing");
        assert!(e.to_string().contains("in use"), "{e}");
        let b = Qcow2::open(&img, true).unwrap();
        let mut back = vec![0u8; 4];
        b.read(0, &mut back).unwrap();
        assert_eq!(back, *b"QFI\xfb", "the image's own bytes");
    }
}
