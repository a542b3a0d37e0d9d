//! The nbd backend against a hostile NBD server: one that breaks the
//! protocol in the handshake (wrong magic, bad option replies, export
//! info too short or too long, absurd sizes and flags) and in transmission
//! (wrong magic, wrong or extra cookies, any error code, replies of the
//! wrong length, structured replies nobody negotiated, replies cut short,
//! connections closed mid-reply). Whatever it does, the client serves the
//! data it really has or returns a clear error: never a panic, never
//! garbage taken for data, never an unbounded allocation, and never a hang
//! that is not one by design (see `nbd_a_stalled_reply_waits_for_the_server`).
//! Every client call runs in a thread with a deadline; one that misses it
//! fails the test, saying whether the client was still reconnecting or
//! stuck on one connection.
//!
//! Then the late write: a server that applies a write received on a
//! connection the client gave up on after newer writes to the same place.

// Until the fuzzers, not every part of the server is used.
#![allow(dead_code, unused_imports)]

mod common;
use common::pattern;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use abuse_servers::nbd::{Address, Nbd};
use abuse_servers::Backend;
use abuse_sys::uapi::*;
use proptest::prelude::*;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;

const TF_HAS_FLAGS: u16 = 1;
const TF_READ_ONLY: u16 = 1 << 1;
const TF_FLUSH: u16 = 1 << 2;
const TF_FUA: u16 = 1 << 3;
const TF_TRIM: u16 = 1 << 5;
const TF_WRITE_ZEROES: u16 = 1 << 6;
const TF_MULTI_CONN: u16 = 1 << 8;
const TF_ALL: u16 = TF_HAS_FLAGS | TF_FLUSH | TF_FUA | TF_TRIM | TF_WRITE_ZEROES | TF_MULTI_CONN;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_NO_HOLE: u16 = 2;

const ESHUTDOWN: u32 = 108;
/// The errnos an NBD error can reach the caller as.
const NBD_ERRNOS: [i32; 7] = [1, 5, 12, 22, 28, 75, 95];

const BLOCK: usize = 4096;
const BLOCKS: usize = 16;
/// The most a test server holds (an export may claim more: past this,
/// reads are zeroes and writes go nowhere).
const DISK: u64 = (BLOCK * BLOCKS) as u64;
/// How long one client call may take before the test calls it a hang.
const LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------
// The server

/// What a server does to one request instead of answering it right.
#[derive(Clone, Debug)]
enum Fault {
    /// Closes the connection unanswered, after doing the request or not.
    Drop { applied: bool },
    /// The reply with this magic instead of the simple reply's.
    Magic(u32),
    /// The reply with the request's cookie xor this (never 0).
    Cookie(u64),
    /// The right reply, twice (a duplicate cookie).
    Twice,
    /// A reply to a request never made, then the right one.
    Unsolicited(u64),
    /// This error (never 0), the request not done; with `payload`, a
    /// READ's data follows anyway.
    Error { code: u32, payload: bool },
    /// The right header, then: for a READ, `cut` of its data and the
    /// connection closed, or all its data and `extra` bytes more; for
    /// anything else, `extra` bytes of data it has no business sending.
    Payload { cut: Option<u32>, extra: u16 },
    /// The first `n` (1..16) bytes of the right reply, then closed.
    CutHeader(u8),
    /// A structured reply chunk (never negotiated) of this flags, type and
    /// declared length, `sent` bytes of payload, then closed or not.
    Structured {
        flags: u16,
        kind: u16,
        len: u32,
        sent: u16,
        close: bool,
    },
    /// The right header and `sent` bytes of a READ's data, then nothing
    /// (the connection stays open) until the test cuts it.
    Stall { sent: usize },
    /// A WRITE received and kept, not done yet (`Server::apply_held` does
    /// it), and its connection broken as `how` says.
    Hold(HoldHow),
}

#[derive(Clone, Copy, Debug)]
enum HoldHow {
    /// The server closes the connection.
    Close,
    /// A reply the client cannot take (bad magic): it gives the connection
    /// up; the server keeps its end open.
    Garbage,
}

/// What a scripted handshake does once its bytes are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    /// Closes the connection (once the client has).
    Close,
    /// Takes the client's options, then serves requests honestly.
    Serve,
    /// Sends junk until the client goes away.
    Flood,
}

/// A handshake as a script: bytes the server sends whatever the client
/// says.
#[derive(Clone, Debug)]
struct Script {
    bytes: Vec<u8>,
    after: After,
    /// The transmission flags it gave (the client must use no other).
    flags: u16,
}

/// A request the server received.
#[derive(Clone, Debug)]
struct Seen {
    conn: u64,
    cmd: u16,
    offset: u64,
    data: Vec<u8>,
}

#[derive(Default)]
struct State {
    /// What an honest handshake offers.
    size: u64,
    flags: u16,
    disk: Vec<u8>,
    /// Scripts for the next connections, in turn (then honest ones).
    handshakes: VecDeque<Script>,
    /// Faults for the next requests, in turn (None: answered right).
    faults: VecDeque<Option<Fault>>,
    /// The fault for every request once `faults` is empty.
    forever: Option<Fault>,
    /// The fault for the first WRITE of this data (before `faults`).
    on_write_of: Option<(Vec<u8>, Fault)>,
    /// Honest from now on (`Server::release`).
    released: bool,
    log: Vec<Seen>,
    /// Export names the client asked for.
    names: Vec<Vec<u8>>,
    /// What the client did wrong.
    violations: Vec<String>,
    /// Every connection, to cut them all.
    streams: Vec<UnixStream>,
    /// WRITEs received and kept back (`Fault::Hold`): offset, data.
    held: Vec<(u64, Vec<u8>)>,
    /// Do them when the next connection comes in.
    apply_held_on_accept: bool,
    /// Bytes of a huge option reply (`After::Flood`) the client took.
    flooded: u64,
    /// Connections the client gave up on, that the server keeps open.
    parked: Vec<UnixStream>,
    /// For each connection made: whether the client had closed every
    /// parked connection by then.
    parked_closed_at_accept: Vec<bool>,
}

impl State {
    fn apply_held(&mut self) {
        for (off, data) in std::mem::take(&mut self.held) {
            self.store(off, &data);
        }
    }

    /// Writes `data` at `off`, as far as the disk goes.
    fn store(&mut self, off: u64, data: &[u8]) {
        let end = (off.saturating_add(data.len() as u64)).min(self.disk.len() as u64);
        if off < end {
            let n = (end - off) as usize;
            self.disk[off as usize..end as usize].copy_from_slice(&data[..n]);
        }
    }

    /// Does a request honestly: its error, and a READ's data.
    fn execute(
        &mut self,
        flags: u16,
        cmd: u16,
        off: u64,
        len: u32,
        payload: &[u8],
    ) -> (u32, Vec<u8>) {
        if cmd != CMD_FLUSH && off.checked_add(len as u64).is_none_or(|e| e > self.size) {
            return (22, Vec::new());
        }
        if flags & TF_READ_ONLY != 0 && matches!(cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
            return (1, Vec::new());
        }
        match cmd {
            CMD_READ => {
                let mut out = vec![0; len as usize];
                let end = (off + len as u64).min(self.disk.len() as u64);
                if off < end {
                    out[..(end - off) as usize]
                        .copy_from_slice(&self.disk[off as usize..end as usize]);
                }
                (0, out)
            }
            CMD_WRITE => {
                self.store(off, payload);
                (0, Vec::new())
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                self.store(off, &vec![0; len as usize]);
                (0, Vec::new())
            }
            CMD_FLUSH => (0, Vec::new()),
            _ => (22, Vec::new()),
        }
    }
}

struct Shared {
    st: Mutex<State>,
    accepted: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn violation(&self, what: String) {
        self.lock().violations.push(what);
    }
}

/// An NBD server on a unix socket whose every connection follows the
/// script, faults and flags the test gives it.
struct Server {
    path: PathBuf,
    shared: Arc<Shared>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(size: u64, flags: u16) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let shared = Arc::new(Shared {
            st: Mutex::new(State {
                size,
                flags,
                disk: vec![0; size.min(DISK) as usize],
                ..State::default()
            }),
            accepted: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { return };
                let id = sh.accepted.fetch_add(1, Ordering::SeqCst);
                {
                    let mut st = sh.lock();
                    let closed = st.parked.iter().all(closed_by_peer);
                    st.parked_closed_at_accept.push(closed);
                    if st.apply_held_on_accept {
                        st.apply_held();
                    }
                    if let Ok(c) = conn.try_clone() {
                        st.streams.push(c);
                    }
                }
                let sh = sh.clone();
                std::thread::spawn(move || serve(&sh, id, conn));
            }
        });
        Server {
            path,
            shared,
            _dir: dir,
        }
    }

    fn addr(&self, export: &str) -> Address {
        Address::Unix {
            path: self.path.to_str().unwrap().into(),
            export: export.into(),
        }
    }

    fn connect(&self) -> Arc<Nbd> {
        let addr = self.addr("");
        Arc::new(bounded(self, "connect", move || Nbd::connect(addr)).unwrap())
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Breaks every connection.
    fn cut_all(&self) {
        for s in self.st().streams.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Honest from now on, and every connection broken: a client stuck on
    /// one is let go.
    fn release(&self) {
        {
            let mut st = self.st();
            st.released = true;
            st.faults.clear();
            st.handshakes.clear();
            st.forever = None;
            st.on_write_of = None;
            st.apply_held();
            for s in st.parked.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        self.cut_all();
    }

    fn violations(&self) -> Vec<String> {
        self.st().violations.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.release();
        // Wakes the accept.
        let _ = UnixStream::connect(&self.path);
    }
}

/// Whether the client closed its end of `s` (a unix socket whose peer
/// is gone polls as POLLHUP).
fn closed_by_peer(s: &UnixStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok()
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP))
}

fn rd<const N: usize>(s: &mut UnixStream) -> io::Result<[u8; N]> {
    let mut b = [0; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn serve(sh: &Shared, id: u64, mut s: UnixStream) {
    let keep =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve_conn(sh, id, &mut s)));
    let keep = match keep {
        Ok(k) => k.unwrap_or(false),
        Err(p) => {
            sh.violation(format!("the test server panicked: {}", panic_text(&*p)));
            false
        }
    };
    if !keep {
        let _ = s.shutdown(Shutdown::Both);
    }
}

/// Serves one connection; Ok(true): it is parked, not to be closed.
fn serve_conn(sh: &Shared, id: u64, s: &mut UnixStream) -> io::Result<bool> {
    let script = {
        let mut st = sh.lock();
        if st.released {
            None
        } else {
            st.handshakes.pop_front()
        }
    };
    let (flags, first) = match script {
        None => (honest_handshake(sh, s)?, None),
        Some(script) => {
            let _ = s.write_all(&script.bytes);
            match script.after {
                After::Close => {
                    let _ = s.shutdown(Shutdown::Write);
                    drain(s);
                    return Ok(false);
                }
                After::Flood => {
                    // As much as the client takes (the socket's buffer, if
                    // it takes none), up to 64 MiB.
                    let junk = pattern(99, 64 << 10);
                    for _ in 0..1024 {
                        if s.write_all(&junk).is_err() {
                            break;
                        }
                        sh.lock().flooded += junk.len() as u64;
                    }
                    return Ok(false);
                }
                After::Serve => {}
            }
            match client_side(sh, s)? {
                Some(first) => (script.flags, Some(first)),
                None => return Ok(false),
            }
        }
    };
    transmission(sh, id, s, flags, first)
}

/// Reads what the client sends until it goes away (at most 5 s).
fn drain(s: &mut UnixStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0; 4096];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

fn record_name(sh: &Shared, opt: u32, data: &[u8]) {
    let name = match opt {
        OPT_GO => {
            let n = if data.len() >= 4 {
                be32(data) as usize
            } else {
                usize::MAX
            };
            let Some(name) = data.get(4..4usize.saturating_add(n)) else {
                sh.violation(format!("malformed NBD_OPT_GO: {data:?}"));
                return;
            };
            let rest = &data[4 + n..];
            if rest.len() < 2 || rest.len() != 2 + 2 * be16(rest) as usize {
                sh.violation(format!("malformed NBD_OPT_GO info requests: {rest:?}"));
            }
            name.to_vec()
        }
        OPT_EXPORT_NAME => data.to_vec(),
        _ => return,
    };
    sh.lock().names.push(name);
}

/// The client's side of a scripted handshake: its flags, then options
/// until the first request (returned) or until it goes away (None).
fn client_side(sh: &Shared, s: &mut UnixStream) -> io::Result<Option<[u8; 28]>> {
    let _flags = rd::<4>(s)?;
    loop {
        let head = rd::<4>(s)?;
        if be32(&head) == REQUEST_MAGIC {
            let rest = rd::<24>(s)?;
            let mut h = [0; 28];
            h[..4].copy_from_slice(&head);
            h[4..].copy_from_slice(&rest);
            return Ok(Some(h));
        }
        let rest = rd::<12>(s)?;
        let (opt, len) = (be32(&rest[4..]), be32(&rest[8..]));
        if len > 1 << 20 {
            sh.violation(format!("an option of {len} bytes"));
            return Ok(None);
        }
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data)?;
        record_name(sh, opt, &data);
        if opt == OPT_ABORT {
            return Ok(None);
        }
    }
}

fn opt_reply(magic: u64, option: u32, kind: u32, len: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(20 + body.len());
    m.extend_from_slice(&magic.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = vec![0, 0];
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

fn greeting_bytes(magic: u64, second: u64, flags: u16) -> Vec<u8> {
    let mut b = magic.to_be_bytes().to_vec();
    b.extend_from_slice(&second.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// A right handshake as a script (fixed newstyle with NO_ZEROES, the GO
/// answered with the export's info and an ACK).
fn good_handshake(size: u64, flags: u16) -> Vec<u8> {
    let mut b = greeting_bytes(NBDMAGIC, IHAVEOPT, 3);
    let info = info_export(size, flags);
    b.extend(opt_reply(OPT_REPLY_MAGIC, OPT_GO, REP_INFO, 12, &info));
    b.extend(opt_reply(OPT_REPLY_MAGIC, OPT_GO, REP_ACK, 0, &[]));
    b
}

/// Fixed newstyle, as the spec has it; the transmission flags it gave.
fn honest_handshake(sh: &Shared, s: &mut UnixStream) -> io::Result<u16> {
    s.write_all(&greeting_bytes(NBDMAGIC, IHAVEOPT, 3))?;
    let cflags = be32(&rd::<4>(s)?);
    if cflags & !3 != 0 || cflags & 1 == 0 {
        sh.violation(format!("client flags {cflags:#x}"));
    }
    let (size, flags) = {
        let st = sh.lock();
        (st.size, st.flags)
    };
    loop {
        let hdr = rd::<16>(s)?;
        if be64(&hdr) != IHAVEOPT {
            sh.violation(format!("option magic {:#x}", be64(&hdr)));
            return Err(io::ErrorKind::InvalidData.into());
        }
        let (opt, len) = (be32(&hdr[8..]), be32(&hdr[12..]));
        if len > 1 << 20 {
            sh.violation(format!("an option of {len} bytes"));
            return Err(io::ErrorKind::InvalidData.into());
        }
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data)?;
        record_name(sh, opt, &data);
        match opt {
            OPT_GO => {
                let info = info_export(size, flags);
                s.write_all(&opt_reply(OPT_REPLY_MAGIC, opt, REP_INFO, 12, &info))?;
                s.write_all(&opt_reply(OPT_REPLY_MAGIC, opt, REP_ACK, 0, &[]))?;
                return Ok(flags);
            }
            OPT_EXPORT_NAME => {
                s.write_all(&size.to_be_bytes())?;
                s.write_all(&flags.to_be_bytes())?;
                if cflags & 2 == 0 {
                    s.write_all(&[0; 124])?;
                }
                return Ok(flags);
            }
            OPT_ABORT => {
                let _ = s.write_all(&opt_reply(OPT_REPLY_MAGIC, opt, REP_ACK, 0, &[]));
                return Err(io::ErrorKind::ConnectionAborted.into());
            }
            _ => s.write_all(&opt_reply(OPT_REPLY_MAGIC, opt, REP_ERR_UNSUP, 0, &[]))?,
        }
    }
}

/// Replaces the data after a simple reply's header with junk.
fn junk_data(r: &mut [u8]) {
    let n = r.len() - 16;
    r[16..].copy_from_slice(&pattern(0x6a75_6e6b, n));
}

fn simple_reply(magic: u32, error: u32, cookie: u64) -> Vec<u8> {
    let mut r = magic.to_be_bytes().to_vec();
    r.extend_from_slice(&error.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r
}

/// What the client must not send on a connection that gave `flags`.
fn check_request(flags: u16, cmd: u16, rflags: u16) -> Option<String> {
    let known = match cmd {
        CMD_READ => 0,
        CMD_WRITE => CMD_FLAG_FUA,
        CMD_FLUSH if flags & TF_FLUSH != 0 => 0,
        CMD_TRIM if flags & TF_TRIM != 0 => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES if flags & TF_WRITE_ZEROES != 0 => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => return Some(format!("command {cmd} on an export with flags {flags:#x}")),
    };
    if rflags & !known != 0 || (rflags & CMD_FLAG_FUA != 0 && flags & TF_FUA == 0) {
        return Some(format!(
            "command {cmd} with flags {rflags:#x} on an export with flags {flags:#x}"
        ));
    }
    None
}

fn transmission(
    sh: &Shared,
    id: u64,
    s: &mut UnixStream,
    flags: u16,
    mut first: Option<[u8; 28]>,
) -> io::Result<bool> {
    // Whether every reply so far was exactly one reply: once not, the
    // client reads something else where a later reply is.
    let mut in_sync = true;
    loop {
        let hdr = match first.take() {
            Some(h) => h,
            None => rd::<28>(s)?,
        };
        let (magic, rflags, cmd) = (be32(&hdr), be16(&hdr[4..]), be16(&hdr[6..]));
        let (cookie, off, len) = (be64(&hdr[8..]), be64(&hdr[16..]), be32(&hdr[24..]));
        if magic != REQUEST_MAGIC {
            sh.violation(format!("request magic {magic:#x}"));
            return Ok(false);
        }
        let mut payload = Vec::new();
        if cmd == CMD_WRITE {
            if len > 64 << 20 {
                sh.violation(format!("a WRITE of {len} bytes"));
                return Ok(false);
            }
            payload = vec![0; len as usize];
            s.read_exact(&mut payload)?;
        }
        let fault = {
            let mut st = sh.lock();
            st.log.push(Seen {
                conn: id,
                cmd,
                offset: off,
                data: payload.clone(),
            });
            if cmd == CMD_DISC {
                return Ok(false);
            }
            if let Some(v) = check_request(flags, cmd, rflags) {
                st.violations.push(v);
            }
            let targeted = st
                .on_write_of
                .as_ref()
                .is_some_and(|(d, _)| cmd == CMD_WRITE && *d == payload);
            if st.released {
                None
            } else if targeted {
                st.on_write_of.take().map(|(_, f)| f)
            } else {
                match st.faults.pop_front() {
                    Some(f) => f,
                    None => st.forever.clone(),
                }
            }
        };
        let exact = match &fault {
            None => true,
            Some(Fault::Error { payload: with, .. }) => !with || cmd != CMD_READ,
            _ => false,
        };
        let exec = || sh.lock().execute(flags, cmd, off, len, &payload);
        let good = |(error, data): &(u32, Vec<u8>)| {
            let mut r = simple_reply(SIMPLE_MAGIC, *error, cookie);
            if *error == 0 {
                r.extend_from_slice(data);
            }
            r
        };
        match fault {
            None => s.write_all(&good(&exec()))?,
            Some(Fault::Drop { applied }) => {
                if applied {
                    exec();
                }
                return Ok(false);
            }
            // Not this request's reply, so not its data either: a client
            // that took it would read junk.
            Some(Fault::Magic(m)) => {
                let mut r = good(&exec());
                r[..4].copy_from_slice(&m.to_be_bytes());
                junk_data(&mut r);
                s.write_all(&r)?;
            }
            Some(Fault::Cookie(x)) => {
                let mut r = good(&exec());
                r[8..16].copy_from_slice(&(cookie ^ x).to_be_bytes());
                junk_data(&mut r);
                s.write_all(&r)?;
            }
            Some(Fault::Twice) => {
                let r = good(&exec());
                s.write_all(&r)?;
                s.write_all(&r)?;
            }
            Some(Fault::Unsolicited(other)) => {
                let r = good(&exec());
                s.write_all(&simple_reply(SIMPLE_MAGIC, 0, other))?;
                s.write_all(&r)?;
            }
            Some(Fault::Error {
                code,
                payload: with,
            }) => {
                let mut r = simple_reply(SIMPLE_MAGIC, code, cookie);
                if with && cmd == CMD_READ {
                    // The data, as the request was not done: read only.
                    r.extend(sh.lock().execute(flags, CMD_READ, off, len, &[]).1);
                }
                s.write_all(&r)?;
                if code == ESHUTDOWN {
                    // "If the client receives an ESHUTDOWN error it MUST
                    // initiate a soft disconnect" (NBD_CMD_DISC); if the
                    // stream was in step, it did receive it.
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    match rd::<28>(s) {
                        Ok(h) if be32(&h) == REQUEST_MAGIC && be16(&h[6..]) == CMD_DISC => {}
                        _ if !in_sync => {}
                        other => sh.violation(format!(
                            "after NBD_ESHUTDOWN, no NBD_CMD_DISC but {:?}",
                            other.map(|h| be16(&h[6..]))
                        )),
                    }
                    return Ok(false);
                }
            }
            Some(Fault::Payload { cut, extra }) => {
                let (error, data) = exec();
                let mut r = simple_reply(SIMPLE_MAGIC, error, cookie);
                if cmd == CMD_READ && error == 0 {
                    match cut {
                        Some(c) if len > 0 => {
                            r.extend_from_slice(&data[..(c % len) as usize]);
                            let _ = s.write_all(&r);
                            return Ok(false);
                        }
                        _ => r.extend_from_slice(&data),
                    }
                }
                r.extend(pattern(extra as u64, extra as usize));
                s.write_all(&r)?;
            }
            Some(Fault::CutHeader(n)) => {
                let r = good(&exec());
                let _ = s.write_all(&r[..n as usize]);
                return Ok(false);
            }
            Some(Fault::Structured {
                flags: f,
                kind,
                len: l,
                sent,
                close,
            }) => {
                exec();
                let mut r = STRUCTURED_MAGIC.to_be_bytes().to_vec();
                r.extend_from_slice(&f.to_be_bytes());
                r.extend_from_slice(&kind.to_be_bytes());
                r.extend_from_slice(&cookie.to_be_bytes());
                r.extend_from_slice(&l.to_be_bytes());
                r.extend(pattern(sent as u64, sent as usize));
                s.write_all(&r)?;
                if close {
                    return Ok(false);
                }
            }
            Some(Fault::Stall { sent }) => {
                let r = good(&exec());
                s.write_all(&r[..(16 + sent).min(r.len())])?;
                // Until the test cuts the connection.
                let mut b = [0; 1];
                let _ = s.read(&mut b);
                return Ok(false);
            }
            Some(Fault::Hold(how)) if cmd == CMD_WRITE => {
                sh.lock().held.push((off, payload.clone()));
                match how {
                    HoldHow::Close => return Ok(false),
                    HoldHow::Garbage => {
                        let _ = s.write_all(&simple_reply(0xdead_beef, 0, cookie));
                        sh.lock().parked.push(s.try_clone()?);
                        return Ok(true);
                    }
                }
            }
            Some(Fault::Hold(_)) => s.write_all(&good(&exec()))?,
        }
        in_sync &= exact;
    }
}

// ---------------------------------------------------------------------
// Bounded client calls

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "?".into())
}

/// Runs the client call `f` in a thread, for at most `LIMIT`. One that
/// panics, or does not return in time, fails the test: a call still
/// unanswered is told apart as still reconnecting (the server sees new
/// connections) or stuck on one connection; the server is then released
/// (honest, every connection cut) so that the thread ends.
fn bounded<T: Send + 'static>(
    server: &Server,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(RecvTimeoutError::Disconnected) => {
            let p = h.join().err().map(|p| panic_text(&*p)).unwrap_or_default();
            panic!("{what}: the client panicked: {p}");
        }
        Err(RecvTimeoutError::Timeout) => {
            let before = server.accepted();
            // Longer than the client's longest backoff.
            std::thread::sleep(Duration::from_millis(1500));
            let retrying = server.accepted() > before;
            server.release();
            let freed = rx.recv_timeout(LIMIT).is_ok();
            panic!(
                "{what}: no answer in {LIMIT:?}: {}; {}",
                if retrying {
                    "the client keeps reconnecting"
                } else {
                    "the client is stuck on one connection"
                },
                if freed {
                    "it answered once the server was honest and every connection cut"
                } else {
                    "it stays stuck even with every connection cut"
                }
            );
        }
    }
}

/// Starts a client call without waiting for it.
fn start<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

fn read_at(server: &Server, nbd: &Arc<Nbd>, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let nbd = nbd.clone();
    bounded(server, &format!("read at {offset}"), move || {
        let mut buf = vec![0; len];
        nbd.read(offset, &mut buf).map(|()| buf)
    })
}

fn write_at(server: &Server, nbd: &Arc<Nbd>, offset: u64, data: Vec<u8>) -> io::Result<()> {
    let nbd = nbd.clone();
    bounded(server, &format!("write at {offset}"), move || {
        nbd.write(offset, &data, false)
    })
}

fn flush(server: &Server, nbd: &Arc<Nbd>) -> io::Result<()> {
    let nbd = nbd.clone();
    bounded(server, "flush", move || nbd.flush())
}

// ---------------------------------------------------------------------
// Faults found, a test each

/// when a write re-sent on a new connection gets NBD_ESHUTDOWN.
#[test]
fn nbd_eshutdown_ends_the_connection_with_a_soft_disconnect() {
    let server = Server::start(DISK, TF_HAS_FLAGS | TF_FLUSH);
    let nbd = server.connect();
    write_at(&server, &nbd, 0, pattern(1, BLOCK)).unwrap();
    let shutdown = || {
        Some(Fault::Error {
            code: ESHUTDOWN,
            payload: false,
        })
    };
    // A read answered NBD_ESHUTDOWN.
    server.st().faults.push_back(shutdown());
    assert!(read_at(&server, &nbd, 0, BLOCK).unwrap() == pattern(1, BLOCK));
    assert_eq!(nbd.reconnects(), 1);
    // The write re-sent on a new connection answered NBD_ESHUTDOWN.
    write_at(&server, &nbd, BLOCK as u64, pattern(2, BLOCK)).unwrap();
    server
        .st()
        .faults
        .extend([Some(Fault::Drop { applied: false }), shutdown()]);
    assert!(read_at(&server, &nbd, BLOCK as u64, BLOCK).unwrap() == pattern(2, BLOCK));
    assert_eq!(nbd.reconnects(), 3);
    assert_eq!(server.violations(), Vec::<String>::new());
}

/// as the server kept it up.
#[test]
fn nbd_a_server_that_fails_every_request_is_retried_with_a_backoff() {
    for forever in [
        Fault::Magic(0xdead_beef),
        Fault::Error {
            code: ESHUTDOWN,
            payload: false,
        },
        Fault::Drop { applied: false },
    ] {
        let server = Server::start(DISK, TF_HAS_FLAGS | TF_FLUSH);
        let nbd = server.connect();
        write_at(&server, &nbd, 0, pattern(2, BLOCK)).unwrap();
        // Flushed: no write to re-send, whose failure would back off.
        flush(&server, &nbd).unwrap();
        server.st().forever = Some(forever.clone());
        let before = server.accepted();
        let n = nbd.clone();
        let rx = start(move || {
            let mut b = vec![0; BLOCK];
            n.read(0, &mut b).map(|()| b)
        });
        std::thread::sleep(Duration::from_millis(800));
        assert!(
            rx.try_recv().is_err(),
            "{forever:?}: the client answered from a server that answers nothing"
        );
        // 10 + 20 + ... + 320 ms: 7 connections in 800 ms, give or take.
        let made = server.accepted() - before;
        assert!(
            (2..=15).contains(&made),
            "{forever:?}: {made} connections in 800 ms"
        );
        server.st().forever = None;
        let back = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("no answer once the server answers")
            .unwrap();
        assert!(back == pattern(2, BLOCK));
        assert_eq!(server.violations(), Vec::<String>::new());
    }
}

/// (or FLUSH one connection of several, silently covering nothing).
#[test]
fn nbd_a_reconnection_to_an_export_that_lost_a_feature_waits_for_it() {
    let server = Server::start(DISK, TF_ALL);
    let nbd = server.connect();
    for lost in [TF_FLUSH, TF_FUA, TF_TRIM, TF_WRITE_ZEROES, TF_MULTI_CONN] {
        server.st().flags = TF_ALL & !lost;
        server.cut_all();
        let before = server.accepted();
        let n = nbd.clone();
        let rx = start(move || {
            n.write(0, &pattern(lost as u64, BLOCK), true)?;
            n.discard(BLOCK as u64, BLOCK as u64)?;
            n.write_zeroes(2 * BLOCK as u64, BLOCK as u64, false)?;
            n.flush()
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            rx.try_recv().is_err(),
            "the export lost {lost:#x}, and the client used it"
        );
        assert!(server.accepted() > before, "lost {lost:#x}: no retry");
        server.st().flags = TF_ALL;
        rx.recv_timeout(Duration::from_secs(5))
            .expect("no answer once the export is back")
            .unwrap();
    }
    // Gaining a feature is no reason to wait (nor is becoming read-only:
    // the server then fails writes with EPERM, a clear error).
    server.st().flags = TF_ALL | TF_READ_ONLY | (1 << 7);
    server.cut_all();
    let e = write_at(&server, &nbd, 0, pattern(9, BLOCK)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(1), "{e}");
    assert_eq!(server.violations(), Vec::<String>::new());
}

/// back.
#[test]
fn nbd_a_resend_cut_short_serves_no_older_data() {
    let server = Server::start(DISK, TF_HAS_FLAGS | TF_FLUSH | TF_MULTI_CONN);
    let nbd = server.connect();
    // Every connection made (reads: nothing to re-send yet).
    while server.accepted() < 4 {
        read_at(&server, &nbd, 0, BLOCK).unwrap();
    }
    let (a, b) = (pattern(20, BLOCK), pattern(21, BLOCK));
    write_at(&server, &nbd, 0, a.clone()).unwrap();
    write_at(&server, &nbd, 0, b.clone()).unwrap();
    // One connection breaks; when it is remade, A is re-sent, done, and
    // the connection breaks before B is.
    server.st().on_write_of = Some((a.clone(), Fault::Drop { applied: true }));
    server
        .st()
        .faults
        .push_back(Some(Fault::Drop { applied: false }));
    for i in 0..8 {
        let back = read_at(&server, &nbd, 0, BLOCK).unwrap();
        assert!(back == b, "read {i}: older data than the client wrote last");
    }
    assert!(server.st().on_write_of.is_none(), "A was not re-sent");
    flush(&server, &nbd).unwrap();
    assert!(server.st().disk[..BLOCK] == b[..]);
    assert_eq!(server.violations(), Vec::<String>::new());
}

/// buffer").
#[test]
fn nbd_a_handshake_cut_short_is_a_clear_error() {
    let server = Server::start(DISK, TF_ALL);
    let whole = good_handshake(DISK, TF_ALL);
    for n in [0, 8, 17, 30, whole.len() - 1] {
        server.st().handshakes.push_back(Script {
            bytes: whole[..n].to_vec(),
            after: After::Close,
            flags: 0,
        });
        let addr = server.addr("");
        let e = bounded(&server, "connect", move || Nbd::connect(addr))
            .err()
            .expect("connected through half a handshake");
        assert!(
            e.to_string().contains("closed the connection"),
            "cut at {n}: {e}"
        );
    }
}
