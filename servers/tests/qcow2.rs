//! The qcow2 backend against qemu's own tools: images `qemu-img` made
//! (versions 2 and 3, several cluster sizes, backing chains, compressed
//! clusters) serve correctly, and what ABUSE wrote `qemu-img check` finds
//! clean and `qemu-img compare` finds equal to the same writes done to a
//! raw image.

mod common;
use common::{check_clean, pattern, qcow2_over, qemu_img};

use std::path::{Path, PathBuf};

use abuse_servers::qcow2::Qcow2;
use abuse_servers::Backend;

const SIZE: u64 = 8 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes, partial and whole clusters, across clusters, zeroes and
/// discards, to the backend and to `model` alike.
fn workload(b: &dyn Backend, model: &mut [u8]) {
    let mut put = |b: &dyn Backend, off: u64, data: Vec<u8>| {
        b.write(off, &data, false).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    };
    put(b, 0, pattern(1, 4096));
    put(b, 70_000, pattern(2, 100_000));
    put(b, 512 * 7, pattern(3, 512));
    put(b, SIZE - 65536, pattern(4, 65536));
    put(b, 3 << 20, pattern(5, 1 << 20));
    put(b, (3 << 20) + 4096, pattern(6, 8192)); // a rewrite
    b.write_zeroes(1 << 20, 200_000, false).unwrap();
    model[1 << 20..(1 << 20) + 200_000].fill(0);
    b.discard(3 << 20, 1 << 19).unwrap();
    model[3 << 20..(3 << 20) + (1 << 19)].fill(0);
    b.flush().unwrap();
}

fn compare(img: &Path, model: &[u8], dir: &Path) {
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(img), s(&raw)]);
}

fn read_all(b: &dyn Backend) -> Vec<u8> {
    let mut got = vec![0u8; b.size() as usize];
    b.read(0, &mut got).unwrap();
    got
}

/// Reads `model`'s length with `read_or_hole`, whole (holes among data are
/// zeroes in the buffer) and block by block: what the backend calls a hole
/// is left unread (the buffer untouched) and is zeroes in `model`; the rest
/// reads as `model`. Returns how many 4 KiB blocks were holes.
fn holes_are_zeroes(b: &dyn Backend, model: &[u8]) -> usize {
    let mut whole = vec![0xaa; model.len()];
    if b.read_or_hole(0, &mut whole).unwrap() {
        assert!(model.iter().all(|&x| x == 0), "all called a hole");
    } else {
        assert!(whole == model, "the whole device reads wrong");
    }
    let mut holes = 0;
    for (i, block) in model.chunks(4096).enumerate() {
        let mut buf = vec![0xaa; block.len()];
        if b.read_or_hole(i as u64 * 4096, &mut buf).unwrap() {
            assert!(
                buf.iter().all(|&x| x == 0xaa),
                "block {i}: a hole was written"
            );
            assert!(
                block.iter().all(|&x| x == 0),
                "block {i} is called a hole but holds data"
            );
            holes += 1;
        } else {
            assert!(buf == block, "block {i} reads wrong");
        }
    }
    holes
}

/// Serves an image through the workload, stops cleanly, and lets qemu-img
/// judge the result.
fn round_trip(img: &Path, mut model: Vec<u8>, dir: &Path) {
    let b = Qcow2::open(img, false).unwrap();
    assert_eq!(read_all(&b), model, "the image as made reads wrong");
    if model.iter().all(|&x| x == 0) {
        let mut buf = vec![0xaa; SIZE as usize];
        assert!(
            b.read_or_hole(0, &mut buf).unwrap(),
            "a blank image is not all holes"
        );
    }
    holes_are_zeroes(&b, &model);
    workload(&b, &mut model);
    assert_eq!(read_all(&b), model);
    // The workload's zeroed and discarded ranges (whole clusters of them)
    // are holes now.
    assert!(holes_are_zeroes(&b, &model) > 0, "no holes after zeroing");
    b.stop().unwrap();
    drop(b);
    check_clean(img);
    compare(img, &model, dir);
    // And reopened, it reads the same.
    let b = Qcow2::open(img, true).unwrap();
    assert_eq!(read_all(&b), model);
}

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().to_path_buf();
    (d, p)
}

#[test]
fn empty_images_of_each_version_and_cluster_size() {
    for (compat, cluster) in [
        ("1.1", "65536"),
        ("1.1", "4096"),
        ("0.10", "65536"),
        ("1.1", "2M"),
    ] {
        let (_d, dir) = tmp();
        let img = dir.join("a.qcow2");
        let opts = format!("compat={compat},cluster_size={cluster}");
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, s(&img), "8M"]);
        round_trip(&img, vec![0; SIZE as usize], &dir);
    }
}

#[test]
fn converted_and_compressed_images_serve_their_contents() {
    let (_d, dir) = tmp();
    let raw = dir.join("src.raw");
    let mut data = pattern(9, SIZE as usize);
    data[2 << 20..3 << 20].fill(0); // a hole qemu-img leaves unallocated
    std::fs::write(&raw, &data).unwrap();
    for (name, extra) in [("plain.qcow2", None), ("packed.qcow2", Some("-c"))] {
        let img = dir.join(name);
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2"];
        args.extend(extra);
        args.extend([s(&raw), s(&img)]);
        qemu_img(&args);
        // Writing over compressed clusters gives their space back when
        // the server stops (they share clusters with each other).
        round_trip(&img, data.clone(), &dir);
    }
}

#[test]
fn backing_chains_raw_and_qcow2() {
    let (_d, dir) = tmp();
    let base = dir.join("base.raw");
    let base_data = pattern(11, SIZE as usize);
    std::fs::write(&base, &base_data).unwrap();
    // raw <- mid.qcow2 (with writes of its own) <- top.qcow2, relative names.
    let mid = dir.join("mid.qcow2");
    qcow2_over(&mid, "base.raw", "raw", None);
    let mut model = base_data.clone();
    {
        let b = Qcow2::open(&mid, false).unwrap();
        workload(&b, &mut model);
        b.stop().unwrap();
    }
    check_clean(&mid);
    let top = dir.join("top.qcow2");
    qcow2_over(&top, "mid.qcow2", "qcow2", None);
    round_trip(&top, model, &dir);
    // The lower images are untouched by writes to the top.
    assert_eq!(std::fs::read(&base).unwrap(), base_data);
    check_clean(&mid);
}

#[test]
fn a_killed_server_leaves_a_dirty_image_the_next_open_repairs() {
    let (_d, dir) = tmp();
    let img = dir.join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    let mut model = vec![0u8; SIZE as usize];
    {
        let b = Qcow2::open(&img, false).unwrap();
        workload(&b, &mut model);
        // Dropped without stop(): as if killed. Everything acknowledged is
        // in the file; the image says it is dirty.
    }
    let info = qemu_img(&["info", "--output=json", s(&img)]);
    assert!(info.contains("\"dirty-flag\": true"), "{info}");
    // A leak a writer killed between taking a cluster and linking it
    // leaves: a refcount of 1 that nothing references.
    {
        let b = Qcow2::open(&img, false).unwrap();
        assert_eq!(read_all(&b), model, "lost writes of the killed server");
        b.leak_one_for_tests().unwrap();
    }
    let b = Qcow2::open(&img, false).unwrap();
    assert_eq!(b.check().unwrap(), (0, 0), "the leak was not repaired");
    assert_eq!(read_all(&b), model);
    b.stop().unwrap();
    drop(b);
    check_clean(&img);
    compare(&img, &model, &dir);
}

#[test]
fn what_it_cannot_serve_is_refused_clearly() {
    let (_d, dir) = tmp();
    let err = |p: &Path, ro: bool| Qcow2::open(p, ro).err().expect("opened").to_string();
    let raw = dir.join("x.raw");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    assert!(
        err(&raw, true).contains("not a qcow2"),
        "{}",
        err(&raw, true)
    );
    let snap = dir.join("snap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&snap), "8M"]);
    qemu_img(&["snapshot", "-c", "s1", s(&snap)]);
    assert!(err(&snap, false).contains("snapshots"));
    assert!(
        Qcow2::open(&snap, true).is_ok(),
        "read-only serving of a snapshotted image"
    );
    let missing = dir.join("orphan.qcow2");
    qcow2_over(&missing, s(&raw), "raw", None);
    std::fs::remove_file(&raw).unwrap();
    assert!(err(&missing, false).contains("backing file"));
    // One server at a time.
    let a = dir.join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&a), "8M"]);
    let held = Qcow2::open(&a, false).unwrap();
    assert!(err(&a, false).contains("in use"));
    drop(held);
    // A truncated image: its tables point past the end.
    let t = dir.join("t.qcow2");
    qemu_img(&["convert", "-q", "-O", "qcow2", s(&a), s(&t)]);
    let f = std::fs::OpenOptions::new().write(true).open(&t).unwrap();
    f.set_len(65536).unwrap();
    let msg = err(&t, false);
    assert!(msg.contains("truncated"), "{msg}");
}

/// Allocating writes racing in one L2 table that does not exist yet (the
/// first makes it, any may link it) and in one cluster: every write is
/// there, and qemu-img finds the image clean.
#[test]
fn concurrent_allocations_in_a_new_l2_table() {
    let (_d, dir) = tmp();
    let img = dir.join("a.qcow2");
    let raw = dir.join("base.raw");
    std::fs::write(&raw, pattern(3, SIZE as usize)).unwrap();
    qcow2_over(&img, s(&raw), "raw", None);
    let b = Qcow2::open(&img, false).unwrap();
    let mut model = pattern(3, SIZE as usize);
    let writes: Vec<(u64, Vec<u8>)> = (0..64u64)
        .map(|i| {
            // Spread over clusters, several per cluster, odd offsets.
            let off = (i * 37 % 90) * 65536 + (i % 5) * 4096 + 512;
            (off, pattern(100 + i, 2048))
        })
        .collect();
    std::thread::scope(|sc| {
        for t in 0..8 {
            let (b, writes) = (&b, &writes);
            sc.spawn(move || {
                for (off, data) in writes.iter().skip(t).step_by(8) {
                    b.write(*off, data, false).unwrap();
                }
            });
        }
    });
    for (off, data) in &writes {
        model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    assert_eq!(read_all(&b), model);
    b.stop().unwrap();
    drop(b);
    check_clean(&img);
    compare(&img, &model, &dir);
}

/// QEMU and a server never write one image at once: they take QEMU's own
/// image locks (OFD byte-range locks; the flock the server took before
/// did not conflict with them). While a server writes the image,
/// `qemu-img info` and `snapshot` are refused (`-U` still reads it); while
/// one reads it, QEMU may read but not write; while qemu-nbd writes it,
/// no server opens it.
#[test]
fn qemu_and_a_server_never_write_one_image() {
    let (_d, dir) = tmp();
    let img = dir.join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    let run = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let served = Qcow2::open(&img, false).unwrap();
    let (ok, err) = run(&["info", s(&img)]);
    assert!(
        !ok && err.contains("lock"),
        "qemu-img info of a served image: {err}"
    );
    let (ok, err) = run(&["snapshot", "-c", "s1", s(&img)]);
    assert!(
        !ok && err.contains("lock"),
        "qemu-img snapshot of a served image: {err}"
    );
    assert!(run(&["info", "-U", s(&img)]).0, "qemu-img info -U");
    drop(served);
    let read = Qcow2::open(&img, true).unwrap();
    assert!(
        run(&["info", s(&img)]).0,
        "qemu-img info of an image served read-only"
    );
    let (ok, err) = run(&["snapshot", "-c", "s1", s(&img)]);
    assert!(
        !ok && err.contains("lock"),
        "qemu-img snapshot of an image served read-only: {err}"
    );
    drop(read);
    let sock = dir.join("nbd.sock");
    let mut nbd = std::process::Command::new("qemu-nbd")
        .args(["-k", s(&sock), "-f", "qcow2", s(&img)])
        .spawn()
        .expect("qemu-nbd (qemu-utils)");
    let up = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(25));
        sock.exists()
    });
    let refused = [false, true].map(|ro| Qcow2::open(&img, ro).err().map(|e| e.to_string()));
    let _ = nbd.kill();
    let _ = nbd.wait();
    assert!(up, "qemu-nbd did not start");
    for (ro, e) in [false, true].iter().zip(refused) {
        let e = e.unwrap_or_else(|| panic!("opened (read-only: {ro}) an image qemu-nbd writes"));
        assert!(e.contains("in use by another program"), "{e}");
    }
    Qcow2::open(&img, false).expect("once qemu-nbd is gone");
}

/// The L2 entry of virtual cluster 0 of `img` (64 KiB clusters): where it
/// is in the file.
fn first_l2_entry_at(img: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(img).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 40).unwrap();
    let l1 = u64::from_be_bytes(b);
    f.read_exact_at(&mut b, l1).unwrap();
    u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00
}

/// A cluster whose COPIED flag is clear (qemu's "may be shared") is copied
/// on write, as qemu does, not refused with EIO; the image stays clean.
/// An L2 entry with reserved bits set is damage, refused, not served.
#[test]
fn copied_clear_is_copy_on_write_and_reserved_bits_are_damage() {
    use std::os::unix::fs::FileExt;
    let (_d, dir) = tmp();
    let img = dir.join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    let mut model = vec![0u8; SIZE as usize];
    {
        let b = Qcow2::open(&img, false).unwrap();
        b.write(0, &pattern(1, 65536), false).unwrap();
        model[..65536].copy_from_slice(&pattern(1, 65536));
        b.stop().unwrap();
    }
    let at = first_l2_entry_at(&img);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, at).unwrap();
    let entry = u64::from_be_bytes(e);
    f.write_all_at(&(entry & !(1 << 63)).to_be_bytes(), at)
        .unwrap();
    {
        let b = Qcow2::open(&img, false).unwrap();
        b.write(512, &pattern(2, 1024), false).unwrap();
        model[512..1536].copy_from_slice(&pattern(2, 1024));
        assert_eq!(read_all(&b), model);
        b.stop().unwrap();
    }
    check_clean(&img);
    compare(&img, &model, &dir);
    let at = first_l2_entry_at(&img);
    f.read_exact_at(&mut e, at).unwrap();
    let entry = u64::from_be_bytes(e);
    f.write_all_at(&(entry | 1 << 4).to_be_bytes(), at).unwrap();
    let b = Qcow2::open(&img, true).unwrap();
    let e = b.read(0, &mut [0u8; 512]).unwrap_err();
    assert!(e.to_string().contains("reserved bits"), "{e}");
}

/// An image that outgrows what its refcount table covers (512-byte
/// clusters: 8 MiB per table cluster) gets a larger table, as qemu moves
/// it; qemu-img finds it clean and reads what was written.
#[test]
fn the_refcount_table_grows() {
    let (_d, dir) = tmp();
    let img = dir.join("small.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        s(&img),
        "64M",
    ]);
    let info = qemu_img(&["info", "--output=json", s(&img)]);
    assert!(info.contains("\"cluster-size\": 512"), "{info}");
    let size = 12u64 << 20;
    let mut model = vec![0u8; size as usize];
    {
        let b = Qcow2::open(&img, false).unwrap();
        for (k, at) in (0..size).step_by(1 << 20).enumerate() {
            let d = pattern(k as u64 + 1, 1 << 20);
            b.write(at, &d, false).unwrap();
            model[at as usize..(at + (1 << 20)) as usize].copy_from_slice(&d);
        }
        let mut back = vec![0u8; size as usize];
        b.read(0, &mut back).unwrap();
        assert!(back == model, "read back after the table grew");
        b.stop().unwrap();
    }
    check_clean(&img);
    let raw = dir.join("back.raw");
    qemu_img(&["convert", "-q", "-O", "raw", s(&img), s(&raw)]);
    let back = std::fs::read(&raw).unwrap();
    assert!(
        back[..size as usize] == model[..],
        "qemu-img reads other data"
    );
}

/// An image is untrusted input: its backing chain may name only files in
/// the image's own directory (links resolved), unless the user says
/// otherwise; a server run by root must not read any host file an image
/// names.
#[test]
fn backing_files_outside_the_images_directory_are_refused() {
    let (_d, dir) = tmp();
    let (_o, outside) = tmp();
    let secret = outside.join("secret.raw");
    std::fs::write(&secret, pattern(9, 65536)).unwrap();
    let img = dir.join("a.qcow2");
    qcow2_over(&img, s(&secret), "raw", None);
    let e = Qcow2::open(&img, true)
        .err()
        .expect("served a backing file elsewhere")
        .to_string();
    assert!(e.contains("outside the image's directory"), "{e}");
    // Through a link in the image's directory, or a relative name: the same.
    std::os::unix::fs::symlink(&secret, dir.join("link.raw")).unwrap();
    let via_link = dir.join("b.qcow2");
    qcow2_over(&via_link, "link.raw", "raw", None);
    assert!(
        Qcow2::open(&via_link, true).is_err(),
        "served through a link"
    );
    let rel = format!(
        "../{}/secret.raw",
        outside.file_name().unwrap().to_str().unwrap()
    );
    let relative = dir.join("c.qcow2");
    qcow2_over(&relative, &rel, "raw", None);
    assert!(Qcow2::open(&relative, true).is_err(), "served through ..");
    // Trusted: served.
    let b = Qcow2::open_with(&img, true, true).unwrap();
    let mut back = vec![0u8; 65536];
    b.read(0, &mut back).unwrap();
    assert_eq!(back, pattern(9, 65536));
}

/// A write whose allocation panics fails alone: the next write to that
/// cluster is not blocked behind a marker the panic left set.
#[test]
fn a_panic_in_an_allocation_does_not_block_the_cluster() {
    let (_d, dir) = tmp();
    let img = dir.join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    let b = std::sync::Arc::new(Qcow2::open(&img, false).unwrap());
    b.panic_next_allocation_for_tests();
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        b.write(0, &pattern(1, 4096), false)
    }));
    assert!(failed.is_err(), "the allocation did not panic");
    let (tx, rx) = std::sync::mpsc::channel();
    let b2 = b.clone();
    std::thread::spawn(move || tx.send(b2.write(0, &pattern(2, 4096), false).is_ok()));
    let done = rx.recv_timeout(std::time::Duration::from_secs(10));
    assert_eq!(
        done,
        Ok(true),
        "the next write of the cluster hangs or fails"
    );
    let mut back = vec![0u8; 4096];
    b.read(0, &mut back).unwrap();
    assert_eq!(back, pattern(2, 4096));
}
