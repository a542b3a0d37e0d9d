//! The nbd backend against a hostile NBD server: one that breaks the
//! protocol in the handshake (wrong magic, oldstyle, no fixed newstyle, bad
//! option replies, export info too short or too long, absurd sizes, any
//! flags, option replies of huge lengths, the NBD_OPT_EXPORT_NAME fallback
//! with zeroes wrong, junk after the handshake, any export name) and in
//! transmission (wrong magic, wrong, duplicate and unsolicited cookies, any
//! error code, simple replies with too little or too much data, structured
//! replies nobody negotiated, with huge lengths, replies cut short,
//! connections closed mid-reply, hostile handshakes on the reconnections
//! all this causes, faults in the writes re-sent there). Whatever it does,
//! the client serves the data the server really has or returns a clear
//! error: never a panic, never garbage taken for data, never a huge reply
//! read into memory, never a hang that is not one by design.
//!
//! Every client call runs in a thread with a deadline (`bounded`); one that
//! misses it fails the test, saying whether the client was still
//! reconnecting (a client retries for ever, by design, while the server
//! refuses it: `nbd_a_server_that_fails_every_request_is_retried_with_a_backoff`
//! shows it does so with its backoff and never takes the garbage) or stuck
//! on one connection (by design only for a server that stops mid-reply:
//! `nbd_a_stalled_reply_waits_for_the_server`).
//!
//! Then each fault found, as a test of its own, and the late write: a
//! server that does a write received on a connection the client gave up
//! on, after newer writes to the same place.
//!
//! NBD_HOSTILE_CASES=N runs N cases per property (96 by default).

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
    /// Answers only once this many requests are in flight on a connection,
    /// in the reverse order (0: each as it comes).
    gather: usize,
    /// The first reply of the next gathered round with an unknown cookie
    /// (in place of one in flight).
    gather_unknown_cookie: bool,
    /// Most requests seen in flight at once on one connection.
    most_in_flight: usize,
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
        if sh.lock().gather > 0 {
            return gathered(sh, s, flags, first);
        }
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

/// `State::gather`: takes requests until that many are in flight, does
/// them, then answers them last first, and again. A client with one
/// request in flight at a time waits for ever.
fn gathered(
    sh: &Shared,
    s: &mut UnixStream,
    flags: u16,
    mut first: Option<[u8; 28]>,
) -> io::Result<bool> {
    loop {
        let n = sh.lock().gather;
        let mut round = Vec::new();
        while round.len() < n {
            let hdr = match first.take() {
                Some(h) => h,
                None => rd::<28>(s)?,
            };
            let (rflags, cmd) = (be16(&hdr[4..]), be16(&hdr[6..]));
            let (cookie, off, len) = (be64(&hdr[8..]), be64(&hdr[16..]), be32(&hdr[24..]));
            if be32(&hdr) != REQUEST_MAGIC || cmd == CMD_DISC {
                return Ok(false);
            }
            if let Some(v) = check_request(flags, cmd, rflags) {
                sh.violation(v);
            }
            let mut payload = Vec::new();
            if cmd == CMD_WRITE {
                payload = vec![0; len as usize];
                s.read_exact(&mut payload)?;
            }
            round.push((cmd, cookie, off, len, payload));
            let mut st = sh.lock();
            st.most_in_flight = st.most_in_flight.max(round.len());
        }
        let unknown = std::mem::take(&mut sh.lock().gather_unknown_cookie);
        for (cmd, cookie, off, len, payload) in round.into_iter().rev() {
            let (error, data) = sh.lock().execute(flags, cmd, off, len, &payload);
            let cookie = if unknown { cookie ^ (1 << 63) } else { cookie };
            let mut r = simple_reply(SIMPLE_MAGIC, error, cookie);
            if error == 0 {
                r.extend_from_slice(&data);
            }
            s.write_all(&r)?;
            if unknown {
                // The client must give the connection up: nothing more.
                let mut b = [0; 1];
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.read(&mut b);
                return Ok(false);
            }
        }
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
// Handshakes

#[derive(Clone, Debug)]
enum Greeting {
    /// NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE (and NO_ZEROES if asked, and any
    /// other bits the client must ignore).
    Good {
        no_zeroes: bool,
        other: u16,
    },
    BadMagic(u64),
    /// An oldstyle server (this client does not speak it).
    OldStyle {
        size: u64,
    },
    BadOptMagic(u64),
    /// Newstyle, not fixed.
    NotFixed {
        no_zeroes: bool,
        other: u16,
    },
    /// A good greeting's first n bytes.
    Cut(u8),
}

#[derive(Clone, Debug)]
enum InfoShape {
    Exact,
    /// n bytes short of the 12.
    Short(u8),
    /// With bytes after the 12.
    Long(Vec<u8>),
}

/// A reply to the client's NBD_OPT_GO.
#[derive(Clone, Debug)]
enum Rep {
    Info {
        size: u64,
        flags: u16,
        shape: InfoShape,
    },
    OtherInfo {
        kind: u16,
        body: Vec<u8>,
    },
    Ack,
    /// An ACK for another option.
    WrongOptionAck(u32),
    /// NBD_REP_ERR_UNSUP: the client falls back to NBD_OPT_EXPORT_NAME,
    /// answered so.
    Unsup(NameReply),
    Refuse {
        code: u32,
        msg: String,
    },
    Unknown(u32),
    BadMagic(u64),
    /// A reply that says it is this long (over 64 KiB), then junk for as
    /// long as the client reads.
    Huge(u32),
    /// A reply that says it is `declared` bytes long, then `sent`.
    Cut {
        declared: u32,
        sent: u32,
    },
}

/// The answer to NBD_OPT_EXPORT_NAME.
#[derive(Clone, Debug)]
enum NameReply {
    Good {
        size: u64,
        flags: u16,
    },
    /// The 124 zeroes sent where they were not due, or left out where they
    /// were.
    ZeroesWrong {
        size: u64,
        flags: u16,
    },
    /// The first n of its 10 bytes.
    Cut(u8),
}

/// What a handshake must come to.
#[derive(Clone, Copy, Debug)]
enum Expect {
    Ok(u64, u16),
    Err,
    /// Ok with this export, or an error: the server did something a
    /// strict client may refuse and a lenient one may let pass.
    Lenient(u64, u16),
}

/// The server's bytes for a handshake, what the client must make of it,
/// and what the server does after.
fn script(g: &Greeting, reps: &[Rep], name: &str, junk: &[u8]) -> (Vec<u8>, Expect, After) {
    let mut b;
    let no_zeroes = match *g {
        Greeting::Good { no_zeroes, other } => {
            b = greeting_bytes(
                NBDMAGIC,
                IHAVEOPT,
                1 | (no_zeroes as u16) << 1 | (other & !3),
            );
            no_zeroes
        }
        Greeting::BadMagic(m) => {
            return (greeting_bytes(m, IHAVEOPT, 3), Expect::Err, After::Close)
        }
        Greeting::OldStyle { size } => {
            let mut b = NBDMAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&CLISERV_MAGIC.to_be_bytes());
            b.extend_from_slice(&size.to_be_bytes());
            b.extend_from_slice(&3u32.to_be_bytes());
            b.extend_from_slice(&[0; 124]);
            return (b, Expect::Err, After::Close);
        }
        Greeting::BadOptMagic(m) => {
            return (greeting_bytes(NBDMAGIC, m, 3), Expect::Err, After::Close)
        }
        Greeting::NotFixed { no_zeroes, other } => {
            let flags = (no_zeroes as u16) << 1 | (other & !3);
            return (
                greeting_bytes(NBDMAGIC, IHAVEOPT, flags),
                Expect::Err,
                After::Close,
            );
        }
        Greeting::Cut(n) => {
            let mut b = greeting_bytes(NBDMAGIC, IHAVEOPT, 3);
            b.truncate(n as usize);
            return (b, Expect::Err, After::Close);
        }
    };
    if name.len() > 4096 {
        return (b, Expect::Err, After::Close);
    }
    let mut export = None;
    let mut lenient = false;
    let done = |b: Vec<u8>, export: Option<(u64, u16)>, lenient: bool| match export {
        Some((size, flags)) => {
            let mut b = b;
            b.extend_from_slice(junk);
            let e = if lenient {
                Expect::Lenient(size, flags)
            } else {
                Expect::Ok(size, flags)
            };
            (b, e, After::Serve)
        }
        None => (b, Expect::Err, After::Close),
    };
    for r in reps {
        match r {
            Rep::Info { size, flags, shape } => {
                let mut body = info_export(*size, *flags);
                match shape {
                    InfoShape::Exact => export = Some((*size, *flags)),
                    InfoShape::Short(n) => {
                        body.truncate(12 - (*n as usize).min(12));
                        lenient = true;
                    }
                    InfoShape::Long(more) => {
                        body.extend_from_slice(more);
                        export = Some((*size, *flags));
                        lenient = true;
                    }
                }
                b.extend(opt_reply(
                    OPT_REPLY_MAGIC,
                    OPT_GO,
                    REP_INFO,
                    body.len() as u32,
                    &body,
                ));
            }
            Rep::OtherInfo { kind, body } => {
                let mut d = kind.to_be_bytes().to_vec();
                d.extend_from_slice(body);
                b.extend(opt_reply(
                    OPT_REPLY_MAGIC,
                    OPT_GO,
                    REP_INFO,
                    d.len() as u32,
                    &d,
                ));
            }
            Rep::Ack => {
                b.extend(opt_reply(OPT_REPLY_MAGIC, OPT_GO, REP_ACK, 0, &[]));
                return done(b, export, lenient);
            }
            Rep::WrongOptionAck(opt) => {
                b.extend(opt_reply(OPT_REPLY_MAGIC, *opt, REP_ACK, 0, &[]));
                return done(b, export, true);
            }
            Rep::Unsup(reply) => {
                b.extend(opt_reply(OPT_REPLY_MAGIC, OPT_GO, REP_ERR_UNSUP, 0, &[]));
                let (size, flags, zeroes, whole) = match *reply {
                    NameReply::Good { size, flags } => (size, flags, !no_zeroes, true),
                    NameReply::ZeroesWrong { size, flags } => (size, flags, no_zeroes, no_zeroes),
                    NameReply::Cut(n) => {
                        b.extend_from_slice(&[0u8; 10][..(n as usize).min(9)]);
                        return (b, Expect::Err, After::Close);
                    }
                };
                b.extend_from_slice(&size.to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
                if zeroes {
                    b.extend_from_slice(&[0; 124]);
                }
                return if whole {
                    done(b, Some((size, flags)), lenient)
                } else {
                    (b, Expect::Err, After::Close)
                };
            }
            Rep::Refuse { code, msg } => {
                b.extend(opt_reply(
                    OPT_REPLY_MAGIC,
                    OPT_GO,
                    *code,
                    msg.len() as u32,
                    msg.as_bytes(),
                ));
                return (b, Expect::Err, After::Close);
            }
            Rep::Unknown(kind) => {
                b.extend(opt_reply(OPT_REPLY_MAGIC, OPT_GO, *kind, 0, &[]));
                return (b, Expect::Err, After::Close);
            }
            Rep::BadMagic(m) => {
                b.extend(opt_reply(*m, OPT_GO, REP_ACK, 0, &[]));
                return (b, Expect::Err, After::Close);
            }
            Rep::Huge(len) => {
                b.extend(opt_reply(OPT_REPLY_MAGIC, OPT_GO, REP_INFO, *len, &[]));
                return (b, Expect::Err, After::Flood);
            }
            Rep::Cut { declared, sent } => {
                let body = pattern(7, *sent as usize);
                b.extend(opt_reply(
                    OPT_REPLY_MAGIC,
                    OPT_GO,
                    REP_INFO,
                    *declared,
                    &body,
                ));
                return (b, Expect::Err, After::Close);
            }
        }
    }
    // No final reply: the server closes.
    (b, Expect::Err, After::Close)
}

/// Cases per property: 96, or $NBD_HOSTILE_CASES for a longer hunt.
fn cases() -> u32 {
    std::env::var("NBD_HOSTILE_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(96)
}

fn size_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(511),
        Just(4096),
        Just(DISK),
        Just(u64::MAX),
        Just(1 << 63),
        Just(i64::MAX as u64),
        1u64..(1 << 20),
        any::<u64>(),
    ]
}

fn greeting_strategy() -> impl Strategy<Value = Greeting> {
    prop_oneof![
        8 => (any::<bool>(), any::<u16>()).prop_map(|(no_zeroes, other)| Greeting::Good { no_zeroes, other }),
        1 => any::<u64>().prop_filter("bad", |m| *m != NBDMAGIC).prop_map(Greeting::BadMagic),
        1 => size_strategy().prop_map(|size| Greeting::OldStyle { size }),
        1 => any::<u64>().prop_filter("bad", |m| *m != IHAVEOPT).prop_map(Greeting::BadOptMagic),
        1 => (any::<bool>(), any::<u16>()).prop_map(|(no_zeroes, other)| Greeting::NotFixed { no_zeroes, other }),
        1 => (0u8..18).prop_map(Greeting::Cut),
    ]
}

fn rep_strategy() -> impl Strategy<Value = Rep> {
    let shape = prop_oneof![
        4 => Just(InfoShape::Exact),
        1 => (1u8..=12).prop_map(InfoShape::Short),
        1 => prop::collection::vec(any::<u8>(), 1..8).prop_map(InfoShape::Long),
    ];
    let name_reply = prop_oneof![
        2 => (size_strategy(), any::<u16>()).prop_map(|(size, flags)| NameReply::Good { size, flags }),
        1 => (size_strategy(), any::<u16>()).prop_map(|(size, flags)| NameReply::ZeroesWrong { size, flags }),
        1 => (0u8..10).prop_map(NameReply::Cut),
    ];
    prop_oneof![
        5 => (size_strategy(), any::<u16>(), shape).prop_map(|(size, flags, shape)| Rep::Info { size, flags, shape }),
        1 => (1u16.., prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(kind, body)| Rep::OtherInfo { kind, body }),
        4 => Just(Rep::Ack),
        1 => any::<u32>().prop_filter("another option", |o| *o != OPT_GO).prop_map(Rep::WrongOptionAck),
        1 => name_reply.prop_map(Rep::Unsup),
        1 => (any::<u32>().prop_map(|c| c | 1 << 31).prop_filter("not UNSUP", |c| *c != REP_ERR_UNSUP), "\\PC{0,30}")
            .prop_map(|(code, msg)| Rep::Refuse { code, msg }),
        1 => any::<u32>().prop_filter("unknown", |k| k & 1 << 31 == 0 && *k != REP_ACK && *k != REP_INFO).prop_map(Rep::Unknown),
        1 => any::<u64>().prop_filter("bad", |m| *m != OPT_REPLY_MAGIC).prop_map(Rep::BadMagic),
        1 => ((64u32 << 10) + 1..=u32::MAX).prop_map(Rep::Huge),
        1 => (1u32..200).prop_flat_map(|d| (Just(d), 0..d)).prop_map(|(declared, sent)| Rep::Cut { declared, sent }),
    ]
}

fn name_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(String::new()),
        2 => "[a-z0-9/?=.-]{1,20}",
        1 => "\\PC{1,12}",
        1 => Just("x".repeat(4096)),
        1 => Just("x".repeat(4097)),
    ]
}

fn features_of(flags: u16) -> u32 {
    let mut f = 0;
    if flags & TF_FLUSH != 0 {
        f |= ABUSE_FLAG_FLUSH;
        if flags & TF_FUA != 0 {
            f |= ABUSE_FLAG_FUA;
        }
    }
    if flags & TF_TRIM != 0 {
        f |= ABUSE_FLAG_DISCARD;
    }
    if flags & TF_WRITE_ZEROES != 0 {
        f |= ABUSE_FLAG_WRITE_ZEROES;
    }
    f
}

fn handshake_case(g: Greeting, reps: Vec<Rep>, name: String, junk: Vec<u8>) {
    let (bytes, expect, after) = script(&g, &reps, &name, &junk);
    let server = Server::start(0, 0);
    let export = match expect {
        Expect::Ok(size, flags) | Expect::Lenient(size, flags) => {
            // Reconnections (after junk) find the export the client took.
            let mut st = server.st();
            st.size = size;
            st.flags = flags;
            st.disk = vec![0; size.min(DISK) as usize];
            Some((size, flags))
        }
        Expect::Err => None,
    };
    server.st().handshakes.push_back(Script {
        bytes,
        after,
        flags: export.map_or(0, |e| e.1),
    });
    let addr = server.addr(&name);
    let shown = addr.to_string();
    let res = bounded(&server, "connect", move || Nbd::connect(addr));
    let nbd = match (res, expect) {
        (Err(e), Expect::Err | Expect::Lenient(..)) => {
            // Clear: it names the server and says what went wrong (not
            // only std's words for a short read).
            let msg = e.to_string();
            let what = msg.strip_prefix(&format!("{shown}: ")).unwrap_or("");
            assert!(
                what.len() > 10 && !what.starts_with("failed to fill whole buffer"),
                "an unclear error: {msg}"
            );
            None
        }
        (Ok(_), Expect::Err) => panic!("a broken handshake was taken"),
        (Err(e), Expect::Ok(..)) => panic!("a good handshake was refused: {e}"),
        (Ok(nbd), Expect::Ok(..) | Expect::Lenient(..)) => Some(Arc::new(nbd)),
    };
    if let (Some(nbd), Some((size, flags))) = (nbd, export) {
        assert_eq!(nbd.size(), size);
        assert_eq!(nbd.read_only(), flags & TF_READ_ONLY != 0);
        assert_eq!(nbd.features(), features_of(flags));
        let conns = if flags & TF_MULTI_CONN != 0 { 4 } else { 1 };
        assert_eq!(nbd.connections(), conns);
        if size >= BLOCK as u64 {
            let data = pattern(size ^ flags as u64, BLOCK);
            let w = write_at(&server, &nbd, 0, data.clone());
            let back = read_at(&server, &nbd, 0, BLOCK).unwrap();
            if flags & TF_READ_ONLY != 0 {
                assert_eq!(w.unwrap_err().raw_os_error(), Some(1), "read-only: EPERM");
                assert!(back.iter().all(|&b| b == 0));
            } else {
                w.unwrap();
                assert!(back == data, "read back other data");
            }
        } else {
            let back = read_at(&server, &nbd, 0, size as usize).unwrap();
            assert!(back.iter().all(|&b| b == 0));
        }
        if size <= u64::MAX - 512 {
            let e = read_at(&server, &nbd, size, 512).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(22), "{e}");
        }
        let f = flush(&server, &nbd);
        if flags & TF_FLUSH != 0 {
            f.unwrap();
        } else {
            assert_eq!(f.unwrap_err().kind(), io::ErrorKind::Unsupported);
        }
    }
    // A huge option reply is refused unread, not read into memory.
    let flooded = server.st().flooded;
    assert!(
        flooded < 4 << 20,
        "the client read {flooded} bytes of a huge reply"
    );
    for n in &server.st().names {
        assert!(n == name.as_bytes(), "asked for export {n:?}, not {name:?}");
    }
    assert_eq!(server.violations(), Vec::<String>::new());
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    })]

    /// Hostile handshakes: the client connects to what is right (and then
    /// reads and writes it), refuses what is not with a clear error, and
    /// neither panics, hangs, nor reads a huge reply.
    #[test]
    fn nbd_hostile_handshakes(
        g in greeting_strategy(),
        reps in prop::collection::vec(rep_strategy(), 0..5),
        name in name_strategy(),
        junk in prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(any::<u8>(), 1..40)],
    ) {
        handshake_case(g, reps, name, junk);
    }
}

// ---------------------------------------------------------------------
// Transmission

#[derive(Clone, Debug)]
enum Op {
    Write {
        block: usize,
        blocks: usize,
        seed: u64,
        fua: bool,
    },
    Read {
        block: usize,
        blocks: usize,
    },
    Flush,
    Trim {
        block: usize,
        blocks: usize,
    },
    Zero {
        block: usize,
        blocks: usize,
        unmap: bool,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let range = (0..BLOCKS, 1usize..=3).prop_map(|(b, n)| (b, n.min(BLOCKS - b)));
    prop_oneof![
        4 => (range.clone(), any::<u64>(), any::<bool>())
            .prop_map(|((block, blocks), seed, fua)| Op::Write { block, blocks, seed, fua }),
        4 => range.clone().prop_map(|(block, blocks)| Op::Read { block, blocks }),
        2 => Just(Op::Flush),
        1 => range.clone().prop_map(|(block, blocks)| Op::Trim { block, blocks }),
        1 => (range, any::<bool>()).prop_map(|((block, blocks), unmap)| Op::Zero { block, blocks, unmap }),
    ]
}

fn error_code_strategy() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(ESHUTDOWN),
        Just(1u32),
        Just(5),
        Just(12),
        Just(22),
        Just(28),
        Just(75),
        Just(95),
        Just(u32::MAX),
        Just(1 << 31),
        1u32..,
    ]
}

fn fault_strategy() -> impl Strategy<Value = Fault> {
    prop_oneof![
        3 => any::<bool>().prop_map(|applied| Fault::Drop { applied }),
        1 => prop_oneof![Just(STRUCTURED_MAGIC), Just(0u32), Just(REQUEST_MAGIC), any::<u32>()]
            .prop_filter("bad", |m| *m != SIMPLE_MAGIC)
            .prop_map(Fault::Magic),
        1 => (1u64..).prop_map(Fault::Cookie),
        1 => Just(Fault::Twice),
        1 => any::<u64>().prop_map(Fault::Unsolicited),
        3 => (error_code_strategy(), any::<bool>()).prop_map(|(code, payload)| Fault::Error { code, payload }),
        2 => (prop::option::of(any::<u32>()), 0u16..64).prop_map(|(cut, extra)| Fault::Payload { cut, extra }),
        1 => (1u8..16).prop_map(Fault::CutHeader),
        1 => (any::<u16>(), any::<u16>(), prop_oneof![Just(u32::MAX), 0u32..64, any::<u32>()], 0u16..64, any::<bool>())
            .prop_map(|(flags, kind, len, sent, close)| Fault::Structured { flags, kind, len, sent, close }),
    ]
}

/// A hostile handshake on a reconnection.
#[derive(Clone, Debug)]
enum HsFault {
    Cut(u8),
    BadMagic,
    Refuse,
    /// Another size: the client must not take it.
    OtherSize(u64),
    /// The export without these flags.
    LostFlags(u16),
    /// NBD_OPT_GO unsupported, NBD_OPT_EXPORT_NAME answered right.
    Fallback,
}

fn hs_fault_strategy() -> impl Strategy<Value = HsFault> {
    prop_oneof![
        (0u8..60).prop_map(HsFault::Cut),
        Just(HsFault::BadMagic),
        Just(HsFault::Refuse),
        size_strategy()
            .prop_filter("other", |s| *s != DISK)
            .prop_map(HsFault::OtherSize),
        prop_oneof![
            Just(TF_FLUSH),
            Just(TF_FUA),
            Just(TF_TRIM),
            Just(TF_WRITE_ZEROES),
            Just(TF_MULTI_CONN)
        ]
        .prop_map(HsFault::LostFlags),
        Just(HsFault::Fallback),
    ]
}

fn hs_script(f: &HsFault, size: u64, flags: u16) -> Script {
    let s = |bytes, after, flags| Script {
        bytes,
        after,
        flags,
    };
    match *f {
        HsFault::Cut(n) => {
            let mut b = good_handshake(size, flags);
            b.truncate(n as usize);
            s(b, After::Close, flags)
        }
        HsFault::BadMagic => s(greeting_bytes(0x1234, IHAVEOPT, 3), After::Close, flags),
        HsFault::Refuse => {
            let mut b = greeting_bytes(NBDMAGIC, IHAVEOPT, 3);
            b.extend(opt_reply(
                OPT_REPLY_MAGIC,
                OPT_GO,
                (1 << 31) | 2,
                6,
                b"policy",
            ));
            s(b, After::Close, flags)
        }
        HsFault::OtherSize(other) => s(good_handshake(other, flags), After::Serve, flags),
        HsFault::LostFlags(lost) => s(
            good_handshake(size, flags & !lost),
            After::Serve,
            flags & !lost,
        ),
        HsFault::Fallback => {
            let mut b = greeting_bytes(NBDMAGIC, IHAVEOPT, 3);
            b.extend(opt_reply(OPT_REPLY_MAGIC, OPT_GO, REP_ERR_UNSUP, 0, &[]));
            b.extend_from_slice(&size.to_be_bytes());
            b.extend_from_slice(&flags.to_be_bytes());
            s(b, After::Serve, flags)
        }
    }
}

/// What each block may hold: one content, or several after a write that
/// failed (done or not).
struct Model(Vec<Vec<Vec<u8>>>);

impl Model {
    fn set(&mut self, block: usize, data: &[u8], done: bool) {
        for (i, d) in data.chunks(BLOCK).enumerate() {
            let c = &mut self.0[block + i];
            if done {
                *c = vec![d.to_vec()];
            } else if !c.iter().any(|x| x == d) {
                c.push(d.to_vec());
            }
        }
    }

    /// `data` read from `block`: each block must be one it may hold (and
    /// is that one from now on).
    fn check(&mut self, block: usize, data: &[u8]) -> Result<(), String> {
        for (i, d) in data.chunks(BLOCK).enumerate() {
            let c = &mut self.0[block + i];
            if !c.iter().any(|x| x == d) {
                return Err(format!(
                    "block {} holds neither of its {} possible contents",
                    block + i,
                    c.len()
                ));
            }
            *c = vec![d.to_vec()];
        }
        Ok(())
    }
}

fn assert_nbd_error(what: &str, e: &io::Error, unsupported: bool) {
    if unsupported {
        assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{what}: {e}");
    } else {
        assert!(
            e.raw_os_error().is_some_and(|n| NBD_ERRNOS.contains(&n)),
            "{what}: not an NBD error: {e}"
        );
    }
}

fn transmission_case(tflags: u16, ops: Vec<Op>, faults: Vec<Option<Fault>>, hs: Vec<HsFault>) {
    let flags = TF_HAS_FLAGS | tflags;
    let server = Server::start(DISK, flags);
    let nbd = server.connect();
    {
        let mut st = server.st();
        st.faults = faults.into();
        st.handshakes = hs.iter().map(|f| hs_script(f, DISK, flags)).collect();
    }
    let mut model = Model(vec![vec![vec![0; BLOCK]]; BLOCKS]);
    for (i, op) in ops.into_iter().enumerate() {
        let what = format!("op {i} {op:?}");
        match op {
            Op::Write {
                block,
                blocks,
                seed,
                fua,
            } => {
                let data = pattern(seed, blocks * BLOCK);
                let fua = fua && flags & TF_FLUSH != 0;
                let n = nbd.clone();
                let d = data.clone();
                let r = bounded(&server, &what, move || {
                    n.write((block * BLOCK) as u64, &d, fua)
                });
                if let Err(e) = &r {
                    assert_nbd_error(&what, e, false);
                }
                model.set(block, &data, r.is_ok());
            }
            Op::Read { block, blocks } => {
                match read_at(&server, &nbd, (block * BLOCK) as u64, blocks * BLOCK) {
                    Ok(data) => {
                        if let Err(e) = model.check(block, &data) {
                            panic!("{what}: {e}: the client took garbage for data");
                        }
                    }
                    Err(e) => assert_nbd_error(&what, &e, false),
                }
            }
            Op::Flush => {
                if let Err(e) = flush(&server, &nbd) {
                    assert_nbd_error(&what, &e, flags & TF_FLUSH == 0);
                }
            }
            Op::Trim { block, blocks } | Op::Zero { block, blocks, .. } => {
                let zero = matches!(op, Op::Zero { .. });
                let unmap = matches!(op, Op::Zero { unmap: true, .. });
                let n = nbd.clone();
                let (off, len) = ((block * BLOCK) as u64, (blocks * BLOCK) as u64);
                let r = bounded(&server, &what, move || {
                    if zero {
                        n.write_zeroes(off, len, unmap)
                    } else {
                        n.discard(off, len)
                    }
                });
                let feature = if zero { TF_WRITE_ZEROES } else { TF_TRIM };
                if let Err(e) = &r {
                    assert_nbd_error(&what, e, flags & feature == 0);
                }
                model.set(block, &vec![0; blocks * BLOCK], r.is_ok());
            }
        }
    }
    drop(nbd);
    let disk = server.st().disk.clone();
    if let Err(e) = model.check(0, &disk) {
        panic!("at the end: {e}");
    }
    assert_eq!(server.violations(), Vec::<String>::new());
}

fn tflags_strategy() -> impl Strategy<Value = u16> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(flush, fua, trim, zeroes, multi)| {
            (if flush { TF_FLUSH } else { 0 })
                | (if fua { TF_FUA } else { 0 })
                | (if trim { TF_TRIM } else { 0 })
                | (if zeroes { TF_WRITE_ZEROES } else { 0 })
                | (if multi { TF_MULTI_CONN } else { 0 })
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    })]

    /// Hostile replies (and hostile handshakes on the reconnections they
    /// cause): every read returns what the server really holds, every
    /// error is an NBD errno, and what the server ends up with is what the
    /// calls that succeeded wrote.
    #[test]
    fn nbd_hostile_replies(
        tflags in tflags_strategy(),
        ops in prop::collection::vec(op_strategy(), 1..14),
        faults in prop::collection::vec(prop::option::weighted(0.5, fault_strategy()), 0..24),
        hs in prop::collection::vec(hs_fault_strategy(), 0..3),
    ) {
        transmission_case(tflags, ops, faults, hs);
    }
}

// ---------------------------------------------------------------------
// Faults found, a test each

/// NBD_ESHUTDOWN ends the connection with a soft disconnect, as the spec
/// says the client MUST ("If the client receives an ESHUTDOWN error it MUST
/// initiate a soft disconnect"): NBD_CMD_DISC, then a new connection for
/// the request. The client used to drop the socket without it; so also
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

/// A server that takes connections but not requests (it answers each with
/// garbage, or NBD_ESHUTDOWN, or closes the connection): the client retries
/// forever, as for any dead connection, and never takes the garbage; but
/// with its backoff. It used to reconnect at once every time a connection
/// it had just made failed: hundreds of connections a second, for as long
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

/// A reconnection finds the export without a feature the device was
/// promised at the start (FLUSH, FUA, TRIM, WRITE_ZEROES), or without
/// CAN_MULTI_CONN, with which a FLUSH through one connection no longer
/// covers the writes through the others: it is another export, as one of
/// another size is, and the client waits for the right one. It used to
/// take it, and send it FLUSH, FUA, TRIM and WRITE_ZEROES it never offered
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

/// A re-send of the log cut short on one connection (of several: an
/// export with CAN_MULTI_CONN) puts an older write back over a newer one
/// it did not get to: A, B to the same place, A re-sent, then the
/// connection breaks. The other connections used to go on serving (reads
/// of A, and a FLUSH would have dropped the log, for good); now they are
/// closed with it, and nothing is served until a whole re-send has put B
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

/// A server that closes the connection in the middle of the handshake:
/// the error says so (it used to say only std's "failed to fill whole
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

// ---------------------------------------------------------------------
// By design

/// Not a fault: a server that stops in the middle of a reply and keeps
/// the connection open holds the request until the connection breaks. The
/// client cannot tell it from a slow server (a FLUSH may take minutes), so
/// it has no timeout of its own; the device's timeout is what ends a stall
/// (it fences the server process; `timeout=0` waits for ever). Meanwhile
/// it takes nothing for data, and once the connection breaks it
/// reconnects and reads the data whole.
#[test]
fn nbd_a_stalled_reply_waits_for_the_server() {
    let server = Server::start(DISK, TF_HAS_FLAGS | TF_FLUSH);
    let nbd = server.connect();
    write_at(&server, &nbd, 0, pattern(3, BLOCK)).unwrap();
    server
        .st()
        .faults
        .push_back(Some(Fault::Stall { sent: 100 }));
    let n = nbd.clone();
    let rx = start(move || {
        let mut b = vec![0; BLOCK];
        n.read(0, &mut b).map(|()| b)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(rx.try_recv().is_err(), "answered from half a reply");
    assert_eq!(server.accepted(), 1, "it waits on its connection");
    server.cut_all();
    let back = rx.recv_timeout(LIMIT).unwrap().unwrap();
    assert!(back == pattern(3, BLOCK));
    assert_eq!(nbd.reconnects(), 1);
}

// ---------------------------------------------------------------------
// The late write

/// The late-write scenario, up to the FLUSH: WRITE A at 0 reaches the
/// server, which keeps it (not done) and breaks the connection as `how`
/// says; the client gives that connection up, makes a new one and sends A
/// again there; then WRITE B at 0, and a FLUSH, both acknowledged on the
/// new connection. Returns A and B.
fn late_write(server: &Server, nbd: &Arc<Nbd>, how: HoldHow) -> (Vec<u8>, Vec<u8>) {
    let (a, b) = (pattern(10, BLOCK), pattern(11, BLOCK));
    server.st().faults.push_back(Some(Fault::Hold(how)));
    write_at(server, nbd, 0, a.clone()).unwrap();
    write_at(server, nbd, 0, b.clone()).unwrap();
    flush(server, nbd).unwrap();
    // What the client did: on the new connection (1), A sent again first,
    // before anything newer, then B, then the FLUSH.
    let st = server.st();
    let on = |conn| -> Vec<(u16, Vec<u8>)> {
        st.log
            .iter()
            .filter(|s| s.conn == conn && s.cmd != CMD_DISC)
            .map(|s| (s.cmd, s.data.clone()))
            .collect()
    };
    assert_eq!(on(0), [(CMD_WRITE, a.clone())]);
    assert_eq!(
        on(1),
        [
            (CMD_WRITE, a.clone()),
            (CMD_WRITE, b.clone()),
            (CMD_FLUSH, vec![])
        ]
    );
    assert!(st.log.iter().all(|s| s.offset == 0));
    if matches!(how, HoldHow::Garbage) {
        // And the connection it gave up on, it had closed before it made
        // the new one.
        assert_eq!(st.parked_closed_at_accept, [true, true]);
    }
    (a, b)
}

/// A write the server received on a connection the client gave up on, and
/// does only when the next connection comes in (as a server that finishes
/// a closed connection's requests before it serves a new one): the client
/// sends it again first on the new connection, so the newer write that
/// follows is the one that stays. After the FLUSH acknowledged on the new
/// connection, the newest acknowledged data is what reads back.
#[test]
fn nbd_a_late_write_before_the_new_connection_is_overwritten() {
    for how in [HoldHow::Close, HoldHow::Garbage] {
        let server = Server::start(DISK, TF_HAS_FLAGS | TF_FLUSH);
        let nbd = server.connect();
        server.st().apply_held_on_accept = true;
        let (_, b) = late_write(&server, &nbd, how);
        assert!(
            read_at(&server, &nbd, 0, BLOCK).unwrap() == b,
            "{how:?}: not the newest acknowledged data"
        );
        assert!(server.st().disk[..BLOCK] == b[..]);
        assert_eq!(server.violations(), Vec::<String>::new());
    }
}

/// A write the server received on a connection the client gave up on, and
/// does late: after the client wrote newer data to the same place on its
/// new connection and a FLUSH there was acknowledged. The property the
/// project wants (after a FLUSH acknowledged on the new connection, the
/// newest acknowledged data is what reads back) holds when the FLUSH is
/// acknowledged, and the server breaks it afterwards. The NBD protocol
/// cannot rule this out: a FLUSH covers only writes whose reply was
/// received ("A client ... MUST NOT issue an NBD_CMD_FLUSH request until
/// it has received the reply for all write commands which it expects to be
/// covered by the flush"), and nothing fences the requests of a connection
/// that is gone (no generation number, no lease, no way to ask whether
/// that connection's requests are done). No client can tell this server
/// from an honest one.
///
/// What the client does to narrow it (asserted in `late_write`): it never
/// takes a write as done without its reply, so the device is still waiting
/// for A while it is in doubt; it closes the connection it gives up on
/// before it makes a new one (a server that drops, or finishes, a closed
/// connection's requests before it serves the next one never lands them
/// late: `nbd_a_late_write_before_the_new_connection_is_overwritten`); and
/// it sends A again first on the new connection, before anything newer, so
/// a late copy of A landing before B is harmless. What is left is a server
/// that keeps doing a dead connection's requests while it serves newer
/// ones: that server's fault, which this test pins down.
#[test]
fn nbd_a_late_write_after_the_flush_is_beyond_the_protocol() {
    for how in [HoldHow::Close, HoldHow::Garbage] {
        let server = Server::start(DISK, TF_HAS_FLAGS | TF_FLUSH);
        let nbd = server.connect();
        let (a, b) = late_write(&server, &nbd, how);
        // When the FLUSH is acknowledged, B is what reads back.
        assert!(read_at(&server, &nbd, 0, BLOCK).unwrap() == b);
        // Then the server does the write it kept from the dead connection.
        server.st().apply_held();
        // The client reads what the server now holds: the stale A. Nothing
        // it can see tells it so.
        assert!(
            read_at(&server, &nbd, 0, BLOCK).unwrap() == a,
            "{how:?}: B survived a late A: then the client can fence, and this test should say so"
        );
        assert_eq!(nbd.reconnects(), 1);
        assert_eq!(server.violations(), Vec::<String>::new());
    }
}

/// Pipelining: a server that answers only once 8 requests are in flight on
/// its one connection, and then last first. A client with one request at a
/// time waits for ever (the bound fails it); a pipelined one gets each reply
/// to its own request, writes and reads alike. Then a reply with a cookie
/// no request has, among 8 in flight: the connection is given up, and all
/// 8 are retried on a new one, none completed by another's reply.
#[test]
fn nbd_requests_are_pipelined_and_replies_taken_in_any_order() {
    const N: usize = 8;
    // No FLUSH: no log to re-send one at a time on the new connection.
    let server = Server::start(DISK, TF_HAS_FLAGS);
    server.st().gather = N;
    let nbd = server.connect();
    assert_eq!(nbd.connections(), 1);
    let all = |reads: bool| {
        let rxs: Vec<_> = (0..N)
            .map(|i| {
                let n = nbd.clone();
                start(move || {
                    let off = (i * BLOCK) as u64;
                    if reads {
                        let mut b = vec![0; BLOCK];
                        n.read(off, &mut b).map(|()| b)
                    } else {
                        n.write(off, &pattern(40 + i as u64, BLOCK), false)
                            .map(|()| Vec::new())
                    }
                })
            })
            .collect();
        rxs.into_iter()
            .map(|rx| {
                rx.recv_timeout(LIMIT)
                    .expect("no answer: requests are not pipelined")
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    all(false);
    for (i, b) in all(true).into_iter().enumerate() {
        assert!(
            b == pattern(40 + i as u64, BLOCK),
            "block {i}: another's reply"
        );
    }
    assert_eq!(server.st().most_in_flight, N);
    assert_eq!(nbd.reconnects(), 0);
    // An unknown cookie among 8 in flight.
    server.st().gather_unknown_cookie = true;
    for (i, b) in all(true).into_iter().enumerate() {
        assert!(
            b == pattern(40 + i as u64, BLOCK),
            "block {i}: another's reply"
        );
    }
    assert_eq!(nbd.reconnects(), 1);
    let disk = server.st().disk.clone();
    for i in 0..N {
        assert!(disk[i * BLOCK..(i + 1) * BLOCK] == pattern(40 + i as u64, BLOCK)[..]);
    }
    assert_eq!(server.violations(), Vec::<String>::new());
}

/// Hostile replies while many requests are in flight on each connection:
/// 8 callers, each writing its own block and reading it back, through 4
/// connections, with faults sprinkled over the requests (closed
/// connections, unknown and repeated cookies, wrong magics, errors, data
/// too long, cut headers). Each read returns its caller's last successful
/// write (or a failed one after it, which an attempt whose reply was lost
/// may have done), never another's data; every error is an NBD errno;
/// the disk ends up with what the successful writes wrote.
#[test]
fn nbd_hostile_replies_with_many_requests_in_flight() {
    const CALLERS: usize = 8;
    let server = Server::start(DISK, TF_HAS_FLAGS | TF_FLUSH | TF_MULTI_CONN);
    let nbd = server.connect();
    let mix = [
        None,
        Some(Fault::Drop { applied: true }),
        None,
        // No request in flight has it (a cookie another request in
        // flight has is that request's reply: nothing tells them apart).
        Some(Fault::Cookie(1 << 40)),
        Some(Fault::Magic(0)),
        None,
        Some(Fault::Twice),
        Some(Fault::Unsolicited(1 << 62)),
        Some(Fault::Error {
            code: 5,
            payload: false,
        }),
        None,
        Some(Fault::Payload {
            cut: None,
            extra: 3,
        }),
        Some(Fault::CutHeader(7)),
        Some(Fault::Drop { applied: false }),
        None,
    ];
    server.st().faults = mix.iter().cycle().take(120).cloned().collect();
    let rxs: Vec<_> = (0..CALLERS)
        .map(|i| {
            let n = nbd.clone();
            start(move || -> Result<(Vec<u8>, Option<Vec<u8>>), String> {
                let off = (i * BLOCK) as u64;
                // What the block holds: `last`, or (after a write that
                // failed, which may have been done on an attempt whose
                // reply was lost) `maybe`.
                let mut last = vec![0; BLOCK];
                let mut maybe: Option<Vec<u8>> = None;
                for round in 0..12u64 {
                    let data = pattern(1000 * i as u64 + round, BLOCK);
                    match n.write(off, &data, false) {
                        Ok(()) => (last, maybe) = (data, None),
                        Err(e) if e.raw_os_error() == Some(5) => maybe = Some(data),
                        Err(e) => return Err(format!("caller {i}: write: {e}")),
                    }
                    let mut b = vec![0; BLOCK];
                    match n.read(off, &mut b) {
                        Ok(()) if b == last => {}
                        Ok(()) if maybe.as_ref() == Some(&b) => (last, maybe) = (b, None),
                        Ok(()) => {
                            let whose = (0..8u64)
                                .flat_map(|c| (0..12).map(move |r| (c, r)))
                                .find(|(c, r)| b == pattern(1000 * c + r, BLOCK));
                            return Err(format!(
                                "caller {i} round {round}: wrong data (the write of caller, round: {whose:?})"
                            ));
                        }
                        Err(e) if e.raw_os_error() == Some(5) => {}
                        Err(e) => return Err(format!("caller {i}: read: {e}")),
                    }
                    if round % 4 == 3 {
                        match n.flush() {
                            Ok(()) => {}
                            Err(e) if e.raw_os_error() == Some(5) => {}
                            Err(e) => return Err(format!("caller {i}: flush: {e}")),
                        }
                    }
                }
                Ok((last, maybe))
            })
        })
        .collect();
    let lasts: Vec<_> = rxs
        .into_iter()
        .enumerate()
        .map(|(i, rx)| match rx.recv_timeout(4 * LIMIT) {
            Ok(r) => r.unwrap(),
            Err(e) => {
                server.release();
                panic!("caller {i}: no answer ({e:?})")
            }
        })
        .collect();
    drop(nbd);
    let disk = server.st().disk.clone();
    for (i, (last, maybe)) in lasts.iter().enumerate() {
        let got = &disk[i * BLOCK..(i + 1) * BLOCK];
        assert!(
            got == &last[..] || maybe.as_deref() == Some(got),
            "block {i} is not its last successful write"
        );
    }
    assert!(server.st().faults.is_empty(), "the faults were not all met");
    assert_eq!(server.violations(), Vec::<String>::new());
}

// ---------------------------------------------------------------------
// Pipelining and a blocked writer

/// A fake server of its own for the tests below: each connection is
/// handshaken (the export `size`, `flags`) then given to `serve` with its
/// index (0 for the first).
fn fake_server(
    size: u64,
    flags: u16,
    serve: impl Fn(usize, UnixStream) -> io::Result<()> + Send + Sync + 'static,
) -> (tempfile::TempDir, Address) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for (i, conn) in listener.incoming().enumerate() {
            let Ok(mut s) = conn else { return };
            let serve = serve.clone();
            std::thread::spawn(move || -> io::Result<()> {
                s.write_all(&good_handshake(size, flags))?;
                let _client_flags = rd::<4>(&mut s)?;
                let opt = rd::<16>(&mut s)?;
                let mut data = vec![0; be32(&opt[12..]) as usize];
                s.read_exact(&mut data)?;
                serve(i, s)
            });
        }
    });
    let addr = Address::Unix {
        path: path.to_str().unwrap().into(),
        export: String::new(),
    };
    (dir, addr)
}

/// Answers every request as it comes: writes taken, reads all zeroes.
fn serve_honestly(s: &mut UnixStream) -> io::Result<()> {
    loop {
        let hdr = rd::<28>(s)?;
        let (cmd, cookie, len) = (be16(&hdr[6..]), be64(&hdr[8..]), be32(&hdr[24..]));
        if cmd == CMD_DISC {
            return Ok(());
        }
        if cmd == CMD_WRITE {
            let mut payload = vec![0; len as usize];
            s.read_exact(&mut payload)?;
        }
        let mut r = simple_reply(SIMPLE_MAGIC, 0, cookie);
        if cmd == CMD_READ {
            r.resize(16 + len as usize, 0);
        }
        s.write_all(&r)?;
    }
}

/// Waits for every call of `rxs` for at most `LIMIT` in all.
fn all_within<T>(rxs: Vec<mpsc::Receiver<T>>, hang: &str) -> Vec<T> {
    let deadline = std::time::Instant::now() + LIMIT;
    rxs.into_iter()
        .map(|rx| {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            rx.recv_timeout(left)
                .unwrap_or_else(|_| panic!("no answer in {LIMIT:?}: {hang}"))
        })
        .collect()
}

/// The reader's hand-off, with a server that (like qemu-nbd with its
/// requests in flight at their limit, or any server that reads a request
/// only once it has written the replies before it) stops reading while a
/// reply is not taken: reader A gets its own reply, and a large READ X
/// (sent) and 7 large WRITEs (one half written, the others waiting for the
/// writer's lock) are in flight. The reading must go to X, whose reply the
/// server is writing; handed to a writer, blocked until the server reads,
/// nobody reads X's reply and the server never reads again: a deadlock.
/// (Which waiter got it was a HashMap's order: 7 in 8 a writer; 4 rounds.)
#[test]
fn nbd_the_reading_is_never_handed_to_a_caller_still_writing() {
    const BIG: usize = 8 << 20;
    const WRITERS: usize = 7;
    for round in 0..4 {
        let (tx, rx) = mpsc::channel::<()>();
        let tx = Mutex::new(tx);
        let (_dir, addr) = fake_server(16 << 20, TF_HAS_FLAGS, move |_, mut s| {
            let tx = tx.lock().unwrap().clone();
            let a = rd::<28>(&mut s)?;
            let _ = tx.send(());
            let x = rd::<28>(&mut s)?;
            let _ = tx.send(());
            // The writers start, the first half writes, the others wait.
            std::thread::sleep(Duration::from_millis(300));
            let mut r = simple_reply(SIMPLE_MAGIC, 0, be64(&a[8..]));
            r.resize(16 + BLOCK, 0);
            s.write_all(&r)?;
            // Blocks until the client reads it.
            let mut r = simple_reply(SIMPLE_MAGIC, 0, be64(&x[8..]));
            r.resize(16 + BIG, 0);
            s.write_all(&r)?;
            serve_honestly(&mut s)
        });
        let nbd = Arc::new(Nbd::connect(addr).unwrap());
        assert_eq!(nbd.connections(), 1);
        let read = |len: usize| {
            let n = nbd.clone();
            start(move || {
                let mut b = vec![1; len];
                n.read(0, &mut b).map(|()| b.iter().all(|&x| x == 0))
            })
        };
        let mut rxs = vec![read(BLOCK)];
        rx.recv_timeout(LIMIT).unwrap();
        rxs.push(read(BIG));
        rx.recv_timeout(LIMIT).unwrap();
        for i in 0..WRITERS {
            let n = nbd.clone();
            rxs.push(start(move || {
                n.write((i << 20) as u64, &vec![7; 1 << 20], false)
                    .map(|()| true)
            }));
        }
        let hang = format!(
            "round {round}: the reading was handed to a caller still writing its request, and nobody reads"
        );
        for r in all_within(rxs, &hang) {
            assert!(r.unwrap(), "round {round}: a read returned something else");
        }
        assert_eq!(nbd.reconnects(), 0);
    }
}

/// NBD_ESHUTDOWN while another caller is writing a large request to a
/// server that no longer reads: the soft disconnect cannot wait for the
/// writer's lock (the writer waits for the server, for ever); the
/// connection is closed, and both requests are retried on a new one.
#[test]
fn nbd_eshutdown_while_a_request_is_half_written_does_not_hang() {
    let (tx, rx) = mpsc::channel::<()>();
    let tx = Mutex::new(tx);
    let (_dir, addr) = fake_server(16 << 20, TF_HAS_FLAGS, move |i, mut s| {
        if i > 0 {
            return serve_honestly(&mut s);
        }
        let tx = tx.lock().unwrap().clone();
        let a = rd::<28>(&mut s)?;
        let _ = tx.send(());
        // The write starts, and stops half written.
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(&simple_reply(SIMPLE_MAGIC, ESHUTDOWN, be64(&a[8..])))?;
        // Reads nothing more; keeps the connection open.
        std::thread::sleep(Duration::from_secs(30));
        Ok(())
    });
    let nbd = Arc::new(Nbd::connect(addr).unwrap());
    let n = nbd.clone();
    let reader = start(move || {
        let mut b = vec![1; BLOCK];
        n.read(0, &mut b).map(|()| b.iter().all(|&x| x == 0))
    });
    rx.recv_timeout(LIMIT).unwrap();
    let n = nbd.clone();
    let writer = start(move || n.write(0, &vec![7; 4 << 20], false).map(|()| true));
    for r in all_within(
        vec![reader, writer],
        "the soft disconnect waits for a writer blocked on the server",
    ) {
        assert!(r.unwrap());
    }
    assert!(nbd.reconnects() >= 1);
}
