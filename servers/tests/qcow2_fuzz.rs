//! Hostile qcow2 images: the faults found in them, each a test of its
//! own.

mod common;

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

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
