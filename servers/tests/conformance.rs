//! One conformance suite every backend runs: file, cow, qcow2 and nbd (against an
//! in-process NBD server). A new backend gets a `#[test]` that calls
//! [`conformance`] on it and is checked the same way: read-after-write at
//! odd offsets and lengths, flush, discard and write-zeroes reading zero,
//! concurrent overlapping writes never torn inside a block, and I/O past
//! the end failing cleanly.

mod common;
use common::{check_clean, pattern, qcow2_over};

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use abuse_servers::cow::Cow;
use abuse_servers::file::{FileBackend, FileOptions};
use abuse_servers::nbd::{Address, Nbd};
use abuse_servers::Backend;
use abuse_sys::uapi::*;

const SIZE: u64 = 4 << 20;

/// The checks every backend passes.
fn conformance(b: &(dyn Backend + Sync)) {
    assert!(b.size() >= SIZE, "backend smaller than the test");
    // Read-after-write, at block, sector and odd offsets.
    for (i, &(off, len)) in [
        (0, 4096),
        (8192, 65536),
        (512 * 3, 512),
        (SIZE - 4096, 4096),
        (1 << 20, 1 << 20),
    ]
    .iter()
    .enumerate()
    {
        let data = pattern(i as u64, len);
        b.write(off, &data, false).unwrap();
        let mut back = vec![0; len];
        b.read(off, &mut back).unwrap();
        assert_eq!(back, data, "read-after-write at {off}+{len}");
    }
    // FUA writes and FLUSH, when advertised.
    if b.features() & ABUSE_FLAG_FLUSH != 0 {
        b.write(4096, &pattern(99, 4096), b.features() & ABUSE_FLAG_FUA != 0)
            .unwrap();
        b.flush().unwrap();
        let mut back = vec![0; 4096];
        b.read(4096, &mut back).unwrap();
        assert_eq!(back, pattern(99, 4096), "after flush");
    } else {
        assert!(b.flush().is_err(), "flush not advertised but accepted");
    }
    // WRITE_ZEROES and DISCARD read back as zeroes.
    for (what, feature) in [
        ("write_zeroes", ABUSE_FLAG_WRITE_ZEROES),
        ("discard", ABUSE_FLAG_DISCARD),
    ] {
        if b.features() & feature == 0 {
            continue;
        }
        let off = 2 << 20;
        b.write(off, &pattern(7, 65536), false).unwrap();
        if feature == ABUSE_FLAG_DISCARD {
            b.discard(off + 4096, 32768).unwrap();
        } else {
            b.write_zeroes(off + 4096, 32768, false).unwrap();
        }
        let mut back = vec![1; 65536];
        b.read(off, &mut back).unwrap();
        let want: Vec<u8> = pattern(7, 65536)
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                if (4096..4096 + 32768).contains(&i) {
                    0
                } else {
                    v
                }
            })
            .collect();
        assert!(
            back == want,
            "{what}: the range does not read zero, or more was cleared"
        );
    }
    // Concurrent overlapping writes: every block ends up one writer's.
    let region = 3 << 20;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                for round in 0..20 {
                    let _ = round;
                    b.write(region, &pattern(1000 + t, 16384), false).unwrap();
                }
            });
        }
    });
    let mut back = vec![0; 16384];
    b.read(region, &mut back).unwrap();
    for blk in 0..4 {
        let got = &back[blk * 4096..(blk + 1) * 4096];
        assert!(
            (0..4u64).any(|t| got == &pattern(1000 + t, 16384)[blk * 4096..(blk + 1) * 4096]),
            "block {blk} of a contended region is torn"
        );
    }
    // Past the end: an error, not a panic or a short read taken as data.
    let mut buf = vec![0; 8192];
    assert!(
        b.read(b.size() - 4096, &mut buf).is_err(),
        "read past the end succeeded"
    );
}

#[test]
fn file_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    let b = FileBackend::open(&path, FileOptions::default()).unwrap();
    conformance(&b);
}

#[test]
fn cow_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    std::fs::write(&base, pattern(5, SIZE as usize)).unwrap();
    let delta = dir.path().join("d.cow");
    let b = Cow::create(&base, &delta, 4096, &|_| {}).unwrap();
    conformance(&b);
    // Untouched blocks still read the base.
    let mut back = vec![0; 4096];
    b.read(SIZE - 8192, &mut back).unwrap();
    assert_eq!(
        back,
        pattern(5, SIZE as usize)[(SIZE - 8192) as usize..][..4096]
    );
    // The last server's stop: no working area left in /dev/shm.
    b.stop().unwrap();
}

#[test]
fn qcow2_backend_conforms() {
    // Over a backing file, with 4 KiB clusters (so the 16 KiB contended
    // region spans four allocating writes), then checked by qemu-img.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    std::fs::write(&base, pattern(5, SIZE as usize)).unwrap();
    let img = dir.path().join("top.qcow2");
    qcow2_over(
        &img,
        base.to_str().unwrap(),
        "raw",
        Some("cluster_size=4096"),
    );
    let b = abuse_servers::qcow2::Qcow2::open(&img, false).unwrap();
    conformance(&b);
    let mut back = vec![0; 4096];
    b.read(SIZE - 8192, &mut back).unwrap();
    assert_eq!(
        back,
        pattern(5, SIZE as usize)[(SIZE - 8192) as usize..][..4096]
    );
    b.stop().unwrap();
    drop(b);
    check_clean(&img);
}

#[test]
fn nbd_backend_conforms() {
    let server = FakeNbd::start(SIZE, true);
    let b =
        Nbd::connect(Address::parse(&format!("unix:{}", server.path.display())).unwrap()).unwrap();
    assert_eq!(
        b.connections(),
        4,
        "multi-conn server: one connection per I/O thread"
    );
    conformance(&b);
}

#[test]
fn nbd_single_connection_conforms() {
    let server = FakeNbd::start(SIZE, false);
    let b =
        Nbd::connect(Address::parse(&format!("unix:{}", server.path.display())).unwrap()).unwrap();
    assert_eq!(b.connections(), 1);
    conformance(&b);
}

/// A dropped connection is remade and the request retried: the caller
/// sees no error and no data is lost.
#[test]
fn nbd_reconnects_after_a_drop() {
    let server = FakeNbd::start(SIZE, false);
    let b =
        Nbd::connect(Address::parse(&format!("unix:{}", server.path.display())).unwrap()).unwrap();
    b.write(0, &pattern(1, 4096), false).unwrap();
    server.drop_next.store(true, Ordering::SeqCst);
    b.write(4096, &pattern(2, 4096), false).unwrap();
    server.drop_next.store(true, Ordering::SeqCst);
    let mut back = vec![0; 8192];
    b.read(0, &mut back).unwrap();
    assert_eq!(&back[..4096], &pattern(1, 4096)[..]);
    assert_eq!(&back[4096..], &pattern(2, 4096)[..]);
    assert_eq!(b.reconnects(), 2);
}

/// An error the server reports is the request's errno, not a reconnect.
#[test]
fn nbd_server_errors_are_errnos() {
    let server = FakeNbd::start(SIZE, false);
    let b =
        Nbd::connect(Address::parse(&format!("unix:{}", server.path.display())).unwrap()).unwrap();
    let mut buf = vec![0; 4096];
    let e = b.read(SIZE, &mut buf).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(22), "{e}");
    assert_eq!(b.reconnects(), 0);
}

/// An NBD server that restarts loses what it acknowledged but had not
/// flushed; the client re-sends it on the new connection before anything
/// else, so the FLUSH that follows vouches for writes the server really
/// has, and reads see them.
#[test]
fn nbd_restart_loses_no_acknowledged_write() {
    let server = FakeNbd::start_with(SIZE, false, true);
    let b =
        Nbd::connect(Address::parse(&format!("unix:{}", server.path.display())).unwrap()).unwrap();
    b.write(0, &pattern(1, 4096), false).unwrap();
    b.flush().unwrap();
    b.write(4096, &pattern(2, 4096), false).unwrap();
    b.write_zeroes(0, 512, true).unwrap();
    b.write(8192, &pattern(3, 4096), true).unwrap();
    server.restart_next.store(true, Ordering::SeqCst);
    b.flush().unwrap();
    let mut back = vec![0; 12288];
    b.read(0, &mut back).unwrap();
    let mut want = pattern(1, 4096);
    want[..512].fill(0);
    want.extend_from_slice(&pattern(2, 4096));
    want.extend_from_slice(&pattern(3, 4096));
    assert!(
        back == want,
        "acknowledged writes lost across the server's restart"
    );
    assert_eq!(b.reconnects(), 1);
    assert_eq!(
        b.replayed(),
        3,
        "the writes since the last FLUSH, and only they, are re-sent"
    );
    // Flushed: nothing is re-sent after the next restart.
    server.restart_next.store(true, Ordering::SeqCst);
    b.read(0, &mut back[..4096]).unwrap();
    assert_eq!(b.replayed(), 3);
}

/// NBD error codes are the protocol's: the ones it defines reach the
/// device as themselves, any other (a server's own, garbage) as EIO, and
/// NBD_ESHUTDOWN is the server going away: a reconnection, not an error.
#[test]
fn nbd_error_codes_are_the_protocols() {
    let server = FakeNbd::start(SIZE, false);
    let b =
        Nbd::connect(Address::parse(&format!("unix:{}", server.path.display())).unwrap()).unwrap();
    let mut buf = vec![0; 4096];
    for (code, want) in [(28, 28), (95, 95), (4, 5), (5000, 5), (u32::MAX, 5)] {
        server.error_next.store(code, Ordering::SeqCst);
        let e = b.read(0, &mut buf).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(want), "NBD error {code}: {e}");
    }
    server.error_next.store(108, Ordering::SeqCst);
    b.read(0, &mut buf).unwrap();
    assert_eq!(b.reconnects(), 1, "NBD_ESHUTDOWN did not reconnect");
}

/// An export that allows one connection at a time (no CAN_MULTI_CONN) has
/// one server process on this machine: a second one's writes would not be
/// covered by the first one's FLUSHes. One that allows several is shared.
#[test]
fn nbd_single_connection_export_has_one_server() {
    let single = FakeNbd::start(SIZE, false);
    let addr = Address::parse(&format!("unix:{}", single.path.display())).unwrap();
    let first = Nbd::connect(addr.clone()).unwrap();
    let second = Nbd::connect(addr.clone())
        .err()
        .expect("a second server was let in");
    assert!(second.to_string().contains("CAN_MULTI_CONN"), "{second}");
    drop(first);
    Nbd::connect(addr).expect("once the first is gone, another may serve");
    let multi = FakeNbd::start(SIZE, true);
    let addr = Address::parse(&format!("unix:{}", multi.path.display())).unwrap();
    let _a = Nbd::connect(addr.clone()).unwrap();
    let _b = Nbd::connect(addr).unwrap();
}

#[test]
fn nbd_unknown_export_is_a_clear_error() {
    let server = FakeNbd::start(SIZE, false);
    let addr = format!("nbd+unix:///nosuch?socket={}", server.path.display());
    let e = Nbd::connect(Address::parse(&addr).unwrap())
        .err()
        .expect("connected to a missing export");
    assert!(e.to_string().contains("no such export"), "{e}");
}

/// A minimal NBD server: fixed newstyle, NBD_OPT_GO for the export "",
/// simple replies, READ/WRITE/FLUSH/TRIM/WRITE_ZEROES over memory.
struct FakeNbd {
    path: PathBuf,
    /// The next request finds the connection broken, unanswered.
    drop_next: Arc<AtomicBool>,
    /// The next request finds the server restarted: the connection broken
    /// and, for a volatile server, every unflushed write gone.
    restart_next: Arc<AtomicBool>,
    /// The next request is answered with this NBD error code (0: none).
    error_next: Arc<AtomicU32>,
    _dir: tempfile::TempDir,
}

/// A fake server's disk: what its clients see, and (for a server with a
/// volatile cache) what a FLUSH made durable, which a restart falls back
/// to.
struct FakeDisk {
    visible: Vec<u8>,
    durable: Vec<u8>,
    volatile: bool,
}

impl FakeNbd {
    fn start(size: u64, multi_conn: bool) -> FakeNbd {
        Self::start_with(size, multi_conn, false)
    }

    /// With `volatile`, writes stay in a cache until a FLUSH, and a
    /// restart drops the cache (as a real server's page cache or
    /// write-back cache dies with it).
    fn start_with(size: u64, multi_conn: bool, volatile: bool) -> FakeNbd {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let disk = Arc::new(Mutex::new(FakeDisk {
            visible: vec![0u8; size as usize],
            durable: vec![0u8; size as usize],
            volatile,
        }));
        let faults = Faults {
            drop_next: Arc::new(AtomicBool::new(false)),
            restart_next: Arc::new(AtomicBool::new(false)),
            error_next: Arc::new(AtomicU32::new(0)),
        };
        let requests = Arc::new(AtomicU64::new(0));
        {
            let faults = faults.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { return };
                    let (disk, faults, requests) = (disk.clone(), faults.clone(), requests.clone());
                    std::thread::spawn(move || {
                        let _ = serve_conn(conn, &disk, multi_conn, &faults, &requests);
                    });
                }
            });
        }
        FakeNbd {
            path,
            drop_next: faults.drop_next,
            restart_next: faults.restart_next,
            error_next: faults.error_next,
            _dir: dir,
        }
    }
}

#[derive(Clone)]
struct Faults {
    drop_next: Arc<AtomicBool>,
    restart_next: Arc<AtomicBool>,
    error_next: Arc<AtomicU32>,
}

fn rd<const N: usize>(s: &mut UnixStream) -> io::Result<[u8; N]> {
    let mut b = [0; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn serve_conn(
    mut s: UnixStream,
    disk: &Mutex<FakeDisk>,
    multi_conn: bool,
    faults: &Faults,
    requests: &AtomicU64,
) -> io::Result<()> {
    s.write_all(&0x4e42_444d_4147_4943u64.to_be_bytes())?;
    s.write_all(&0x4948_4156_454f_5054u64.to_be_bytes())?;
    s.write_all(&3u16.to_be_bytes())?;
    let _client_flags = rd::<4>(&mut s)?;
    let _magic = rd::<8>(&mut s)?;
    let opt = u32::from_be_bytes(rd::<4>(&mut s)?);
    let len = u32::from_be_bytes(rd::<4>(&mut s)?) as usize;
    let mut data = vec![0; len];
    s.read_exact(&mut data)?;
    assert_eq!(opt, 7, "the client asks with NBD_OPT_GO");
    let name_len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
    let name = &data[4..4 + name_len];
    let reply = |s: &mut UnixStream, kind: u32, body: &[u8]| -> io::Result<()> {
        s.write_all(&0x0003_e889_0455_65a9u64.to_be_bytes())?;
        s.write_all(&7u32.to_be_bytes())?;
        s.write_all(&kind.to_be_bytes())?;
        s.write_all(&(body.len() as u32).to_be_bytes())?;
        s.write_all(body)
    };
    if !name.is_empty() {
        return reply(&mut s, (1 << 31) | 6, b"unknown export");
    }
    let size = disk.lock().unwrap().visible.len() as u64;
    // HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES [| CAN_MULTI_CONN]
    let flags: u16 = 1 | 4 | 8 | 32 | 64 | if multi_conn { 256 } else { 0 };
    let mut info = vec![0, 0];
    info.extend_from_slice(&size.to_be_bytes());
    info.extend_from_slice(&flags.to_be_bytes());
    reply(&mut s, 3, &info)?;
    reply(&mut s, 1, &[])?;
    loop {
        let hdr = rd::<28>(&mut s)?;
        if faults.drop_next.swap(false, Ordering::SeqCst) {
            // The connection breaks with the request unanswered.
            return Ok(());
        }
        if faults.restart_next.swap(false, Ordering::SeqCst) {
            // The server restarts: what it had not flushed is gone.
            let mut d = disk.lock().unwrap();
            if d.volatile {
                d.visible = d.durable.clone();
            }
            return Ok(());
        }
        let forced = faults.error_next.swap(0, Ordering::SeqCst);
        requests.fetch_add(1, Ordering::Relaxed);
        let cmd = u16::from_be_bytes([hdr[6], hdr[7]]);
        let cookie = &hdr[8..16];
        let off = u64::from_be_bytes(hdr[16..24].try_into().unwrap());
        let len = u32::from_be_bytes(hdr[24..28].try_into().unwrap()) as u64;
        let mut payload = vec![0; if cmd == 1 { len as usize } else { 0 }];
        s.read_exact(&mut payload)?;
        if cmd == 2 {
            return Ok(());
        }
        let in_range = off.checked_add(len).is_some_and(|e| e <= size);
        let mut out = Vec::new();
        let error: u32 = if forced != 0 {
            forced
        } else if !in_range && cmd != 3 {
            22
        } else {
            let mut d = disk.lock().unwrap();
            let r = off as usize..(off + len) as usize;
            match cmd {
                0 => out.extend_from_slice(&d.visible[r]),
                1 => d.visible[r].copy_from_slice(&payload),
                3 => d.durable = d.visible.clone(),
                4 | 6 => d.visible[r].fill(0),
                _ => {}
            }
            if !d.volatile {
                d.durable = d.visible.clone();
            }
            0
        };
        let mut rep = Vec::with_capacity(16 + out.len());
        rep.extend_from_slice(&0x6744_6698u32.to_be_bytes());
        rep.extend_from_slice(&error.to_be_bytes());
        rep.extend_from_slice(cookie);
        if error == 0 {
            rep.extend_from_slice(&out);
        }
        s.write_all(&rep)?;
    }
}

/// The Ceph cluster `make rbd-test` brings up, and a fresh image in it.
fn rbd_image(name: &str, size: &str) -> (String, abuse_servers::rbd::RbdSpec) {
    let conf = std::env::var("ABUSE_RBD_CONF")
        .expect("ABUSE_RBD_CONF: run these through `make rbd-test`, which starts a cluster");
    let image = format!("{name}-{}", std::process::id());
    let ok = std::process::Command::new("rbd")
        .args([
            "-c",
            &conf,
            "create",
            &format!("rbd/{image}"),
            "--size",
            size,
        ])
        .status()
        .expect("rbd (make rbd-deps installs it)");
    assert!(ok.success(), "rbd create");
    let spec = abuse_servers::rbd::RbdSpec {
        conf: Some(conf.clone().into()),
        ..abuse_servers::rbd::RbdSpec::parse(&format!("rbd/{image}")).unwrap()
    };
    (conf, spec)
}

#[test]
#[ignore = "needs a Ceph cluster: make rbd-test"]
fn rbd_backend_conforms() {
    let (_, spec) = rbd_image("conform", "8M");
    let b = abuse_servers::rbd::Rbd::open(&spec).unwrap();
    assert_eq!(b.size(), 8 << 20);
    conformance(&b);
}

/// Many writers at once, each over its own region in pieces of mixed
/// sizes, with flushes between; everything read back and compared.
#[test]
#[ignore = "needs a Ceph cluster: make rbd-test"]
fn rbd_stress_verified() {
    let (_, spec) = rbd_image("stress", "64M");
    let b = abuse_servers::rbd::Rbd::open(&spec).unwrap();
    let region = 4u64 << 20;
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let b = &b;
            s.spawn(move || {
                let mut model = vec![0u8; region as usize];
                let mut x = t + 1;
                for i in 0..200u64 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let len = 4096 * (1 + (x >> 60)) as usize;
                    let off = (x >> 20) % (region - len as u64) / 512 * 512;
                    let data = pattern(t * 1000 + i, len);
                    b.write(t * region + off, &data, i % 50 == 49).unwrap();
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                    if i % 64 == 0 {
                        b.flush().unwrap();
                    }
                }
                let mut back = vec![0u8; region as usize];
                b.read(t * region, &mut back).unwrap();
                assert!(back == model, "writer {t}: its region reads back wrong");
            });
        }
    });
}

#[test]
#[ignore = "needs a Ceph cluster: make rbd-test"]
fn rbd_failures_are_clear_errors() {
    let (conf, spec) = rbd_image("fail", "4M");
    let open = |pool: &str, image: &str| {
        abuse_servers::rbd::Rbd::open(&abuse_servers::rbd::RbdSpec {
            pool: pool.into(),
            image: image.into(),
            ..spec.clone()
        })
        .err()
        .expect("opened")
        .to_string()
    };
    let msg = open("rbd", "no-such-image");
    assert!(msg.contains("opening image rbd/no-such-image"), "{msg}");
    let msg = open("no-such-pool", "x");
    assert!(msg.contains("opening pool no-such-pool"), "{msg}");
    let msg = abuse_servers::rbd::Rbd::open(&abuse_servers::rbd::RbdSpec {
        conf: Some("/nonexistent/ceph.conf".into()),
        ..spec.clone()
    })
    .err()
    .expect("opened")
    .to_string();
    assert!(msg.contains("Ceph configuration"), "{msg}");
    // Read-only: no features, and a write is refused by librbd.
    let ro = abuse_servers::rbd::Rbd::open(&abuse_servers::rbd::RbdSpec {
        read_only: true,
        ..spec.clone()
    })
    .unwrap();
    assert_eq!(ro.features(), 0);
    assert!(ro.write(0, &[1; 4096], false).is_err());
    assert!(abuse_servers::rbd::RbdSpec::parse("nopool").is_err());
    let _ = conf;
}

/// For rbd_killed_server_loses_no_acknowledged_write, in a process of its
/// own: writes to the image, has the write acknowledged, and is killed.
#[test]
#[ignore = "a helper: rbd_killed_server_loses_no_acknowledged_write runs it"]
fn rbd_helper_writes_then_is_killed() {
    let Ok(image) = std::env::var("ABUSE_RBD_HELPER_IMAGE") else {
        return;
    };
    let conf = std::env::var("ABUSE_RBD_CONF").unwrap();
    let spec = abuse_servers::rbd::RbdSpec {
        conf: Some(conf.into()),
        ..abuse_servers::rbd::RbdSpec::parse(&image).unwrap()
    };
    let b = abuse_servers::rbd::Rbd::open(&spec).unwrap();
    b.write(0, &pattern(1, 4096), false).unwrap();
    // librbd's cache is write-through until it sees a flush, write-back
    // after one.
    b.flush().unwrap();
    b.write(4096, &pattern(2, 65536), false).unwrap();
    println!("acknowledged");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
}

/// A server killed after acknowledging a write, then a FLUSH through
/// another: the write is in the image (librbd's per-process cache would
/// have died with the first server while the second's FLUSH succeeded),
/// as `rbd export` shows too.
#[test]
#[ignore = "needs a Ceph cluster: make rbd-test"]
fn rbd_killed_server_loses_no_acknowledged_write() {
    let (conf, spec) = rbd_image("killed", "8M");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "rbd_helper_writes_then_is_killed",
            "--ignored",
            "--nocapture",
        ])
        .env(
            "ABUSE_RBD_HELPER_IMAGE",
            format!("{}/{}", spec.pool, spec.image),
        )
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("acknowledged")
            && std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(9),
        "the helper: {:?}\n{said}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let next = abuse_servers::rbd::Rbd::open(&spec).unwrap();
    next.flush().unwrap();
    let mut back = vec![0; 4096 + 65536];
    next.read(0, &mut back).unwrap();
    let mut want = pattern(1, 4096);
    want.extend_from_slice(&pattern(2, 65536));
    assert!(
        back == want,
        "an acknowledged write died with the server that took it"
    );
    drop(next);
    let dir = tempfile::tempdir().unwrap();
    let exported = dir.path().join("image");
    let ok = std::process::Command::new("rbd")
        .args([
            "-c",
            &conf,
            "export",
            &format!("{}/{}", spec.pool, spec.image),
        ])
        .arg(&exported)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "rbd export: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let image = std::fs::read(&exported).unwrap();
    assert!(
        image[..want.len()] == want[..],
        "rbd export differs from what was acknowledged"
    );
}

/// Two servers (two librbd clients) of one image, writing in turn and at
/// once: librbd's exclusive lock moves between them, and each reads what
/// the other wrote.
#[test]
#[ignore = "needs a Ceph cluster: make rbd-test"]
fn rbd_two_servers_share_an_image() {
    let (_, spec) = rbd_image("shared", "4M");
    let a = abuse_servers::rbd::Rbd::open(&spec).unwrap();
    let b = abuse_servers::rbd::Rbd::open(&spec).unwrap();
    std::thread::scope(|s| {
        for (t, srv) in [(0u64, &a), (1, &b)] {
            s.spawn(move || {
                for i in 0..20u64 {
                    let off = (i * 2 + t) * 65536;
                    srv.write(off, &pattern(t * 100 + i, 65536), false).unwrap();
                }
                srv.flush().unwrap();
            });
        }
    });
    for (t, srv) in [(0u64, &b), (1, &a)] {
        for i in 0..20u64 {
            let mut back = vec![0u8; 65536];
            srv.read((i * 2 + t) * 65536, &mut back).unwrap();
            assert!(
                back == pattern(t * 100 + i, 65536),
                "block {i} of writer {t}"
            );
        }
    }
}

/// qemu-nbd (a real server) stopped with SIGTERM and restarted under
/// concurrent writes and flushes: every call completes, and what was
/// written last reads back.
#[test]
fn nbd_qemu_nbd_restart_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.qcow2");
    let sock = dir.path().join("q.sock");
    let ok = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M")
        .status()
        .unwrap();
    assert!(ok.success());
    let start = || {
        let _ = std::fs::remove_file(&sock);
        let c = std::process::Command::new("qemu-nbd")
            .arg("-k")
            .arg(&sock)
            .args(["-f", "qcow2", "-e", "8", "--cache=writeback"])
            .arg(&img)
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        c
    };
    let mut q = start();
    let nbd = Arc::new(
        Nbd::connect(Address::parse(&format!("unix:{}", sock.display())).unwrap()).unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8u64)
        .map(|t| {
            let (nbd, stop) = (nbd.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // fio --verify's way: many writes, no FLUSH.
                    let off = (t * 32 + i % 32) * 65536;
                    nbd.write(off, &pattern(t * 1000 + i, 65536), false)
                        .unwrap();
                    i += 1;
                }
                i
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(3000));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(q.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    q.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    q = start();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let n: Vec<u64> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        let _ = tx.send(n);
    });
    let done = rx.recv_timeout(std::time::Duration::from_secs(30));
    let _ = q.kill();
    assert!(done.is_ok(), "calls hang after qemu-nbd restarted");
    assert!(nbd.reconnects() > 0);
    // What was re-sent was flushed on the first new connection: the
    // others had nothing left to re-send.
    assert!(
        nbd.replayed() <= 8 * 32,
        "re-sent {} writes for at most 256 acknowledged since the last flush",
        nbd.replayed()
    );
}

/// The backend a crash helper serves: `kind` in a directory made by
/// [`crash_fixture`].
fn crash_backend(kind: &str, dir: &std::path::Path) -> Box<dyn Backend + Sync> {
    match kind {
        "file" => {
            Box::new(FileBackend::open(&dir.join("disk.img"), FileOptions::default()).unwrap())
        }
        "cow" => Box::new(Cow::open(&dir.join("d.cow"), Some(&dir.join("base.img"))).unwrap()),
        "qcow2" => {
            Box::new(abuse_servers::qcow2::Qcow2::open(&dir.join("top.qcow2"), false).unwrap())
        }
        _ => unreachable!("{kind}"),
    }
}

/// A fresh image of `kind` in `dir` (over a patterned base for cow and
/// qcow2).
fn crash_fixture(kind: &str, dir: &std::path::Path) {
    let base = dir.join("base.img");
    std::fs::write(&base, pattern(5, SIZE as usize)).unwrap();
    match kind {
        "file" => std::fs::copy(&base, dir.join("disk.img"))
            .map(|_| ())
            .unwrap(),
        "cow" => Cow::create(&base, &dir.join("d.cow"), 4096, &|_| {})
            .unwrap()
            .stop()
            .unwrap(),
        "qcow2" => qcow2_over(
            &dir.join("top.qcow2"),
            base.to_str().unwrap(),
            "raw",
            Some("cluster_size=4096"),
        ),
        _ => unreachable!("{kind}"),
    }
}

/// The writes of round `round` of the crash test: (offset, seed, len).
fn crash_writes(round: u64) -> Vec<(u64, u64, usize)> {
    (0..24u64)
        .map(|i| {
            // Clusters new and rewritten, partial and whole.
            let off = ((i * 37 + round * 11) % 900) * 4096 + (i % 3) * 512;
            (off, round * 100 + i, 4096 + (i as usize % 4) * 8192)
        })
        .collect()
}

/// Applies writes to a model of the device.
fn apply(model: &mut [u8], writes: &[(u64, u64, usize)]) {
    for &(off, seed, len) in writes {
        model[off as usize..][..len].copy_from_slice(&pattern(seed, len));
    }
}

/// A crash helper (run by the test below in a process of its own): serves
/// the image, writes round N (flushing after half of it), prints
/// "acknowledged" and is killed.
#[test]
#[ignore = "a helper: every_backend_serves_on_after_a_killed_server runs it"]
fn crash_helper_writes_then_is_killed() {
    let (Ok(kind), Ok(dir), Ok(round)) = (
        std::env::var("ABUSE_CRASH_KIND"),
        std::env::var("ABUSE_CRASH_DIR"),
        std::env::var("ABUSE_CRASH_ROUND"),
    ) else {
        return;
    };
    let b = crash_backend(&kind, std::path::Path::new(&dir));
    let writes = crash_writes(round.parse().unwrap());
    for (i, &(off, seed, len)) in writes.iter().enumerate() {
        b.write(off, &pattern(seed, len), false).unwrap();
        if i == writes.len() / 2 {
            b.flush().unwrap();
        }
    }
    println!("acknowledged");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
}

/// Crash, reopen, keep writing, flush, reopen, for every backend: a server
/// killed with writes acknowledged (some flushed, some not) loses none of
/// them (they are in the page cache or the working area: a killed process
/// is not a power cut); the next server writes on and flushes, and a
/// third, after a clean stop, reads exactly what was acknowledged; qcow2
/// images stay `qemu-img check` clean.
#[test]
fn every_backend_serves_on_after_a_killed_server() {
    for kind in ["file", "cow", "qcow2"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        crash_fixture(kind, dir);
        let mut model = pattern(5, SIZE as usize);
        for round in 1..=2u64 {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--ignored",
                    "--exact",
                    "crash_helper_writes_then_is_killed",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("ABUSE_CRASH_KIND", kind)
                .env("ABUSE_CRASH_DIR", dir)
                .env("ABUSE_CRASH_ROUND", round.to_string())
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                said.contains("acknowledged"),
                "{kind}: the helper did not get its writes acknowledged: {said}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            apply(&mut model, &crash_writes(round));
            // The next server: everything acknowledged is there; it writes
            // on and flushes.
            let b = crash_backend(kind, dir);
            let mut back = vec![0u8; SIZE as usize];
            b.read(0, &mut back).unwrap();
            assert!(
                back == model,
                "{kind}: round {round}: acknowledged writes lost by a killed server"
            );
            let more = crash_writes(round + 10);
            for &(off, seed, len) in &more {
                b.write(off, &pattern(seed, len), false).unwrap();
            }
            b.flush().unwrap();
            apply(&mut model, &more);
            b.stop().unwrap();
        }
        let b = crash_backend(kind, dir);
        let mut back = vec![0u8; SIZE as usize];
        b.read(0, &mut back).unwrap();
        assert!(
            back == model,
            "{kind}: after a clean stop the image differs"
        );
        b.stop().unwrap();
        drop(b);
        if kind == "qcow2" {
            check_clean(&dir.join("top.qcow2"));
        }
    }
}
