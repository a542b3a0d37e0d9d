//! The nbd backend: a client of any NBD server (nbdkit, qemu-nbd, a remote
//! nbd-server). FLUSH, FUA, DISCARD (trim) and WRITE_ZEROES are used as
//! the server advertises them. Connections: 4 where the server allows
//! several (CAN_MULTI_CONN: a flush on one covers writes completed on
//! all), else one. Each is pipelined (`Conn`): many requests in flight,
//! their replies taken in any order by whichever waiting caller reads the
//! connection now, and handed to their callers by cookie. A FLUSH covers what was acknowledged
//! before it was sent (the engine sends one only once the writes it covers
//! are acknowledged). A dropped connection is
//! reconnected with a backoff and the request retried, so the device sees
//! no error while the NBD server restarts (a write retried after a drop is
//! the same write: NBD writes are idempotent).
//!
//! A server that restarted lost what it had acknowledged but not flushed.
//! So the writes (and trims, zeroes) acknowledged since the last FLUSH the
//! server completed are kept, and re-sent in order on every new connection
//! before it carries anything else, with no other request in flight
//! (`Replay`): a FLUSH through the new connection then vouches for them
//! too. Never a successful FLUSH over a lost write. A re-send cut short
//! closes the other connections too: it may have put an older write back
//! over a newer one, and nothing is served until a whole re-send is done. The log is bounded: past
//! `REPLAY_MAX_BYTES` a write flushes it first.

mod protocol;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use abuse_sys::uapi::*;

use crate::backend::{unsupported, Backend};
use protocol::*;

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A Unix socket.
    Unix {
        /// The socket's path.
        path: String,
        /// The export's name (empty: the server's default).
        export: String,
    },
    /// A TCP address.
    Tcp {
        /// The host's name or address.
        host: String,
        /// The port (10809 unless given).
        port: u16,
        /// The export's name (empty: the server's default).
        export: String,
    },
}

/// The default NBD TCP port.
const NBD_PORT: u16 = 10809;

impl Address {
    /// `unix:PATH`, `nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST[:PORT][/EXPORT]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let usage = || {
            format!("'{s}': expected unix:PATH, nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT][/EXPORT]")
        };
        if let Some(path) = s.strip_prefix("unix:").filter(|p| !p.starts_with("//")) {
            if path.is_empty() {
                return Err(usage());
            }
            return Ok(Address::Unix {
                path: path.into(),
                export: String::new(),
            });
        }
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (export, query) = rest.split_once('?').ok_or_else(usage)?;
            let path = query
                .strip_prefix("socket=")
                .filter(|p| !p.is_empty())
                .ok_or_else(usage)?;
            let export = export.strip_prefix('/').unwrap_or(export);
            return Ok(Address::Unix {
                path: path.into(),
                export: export.into(),
            });
        }
        if let Some(rest) = s.strip_prefix("nbd://") {
            let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                    (h, p.parse().map_err(|_| format!("'{s}': bad port '{p}'"))?)
                }
                _ => (hostport, NBD_PORT),
            };
            if host.is_empty() {
                return Err(usage());
            }
            let host = host.trim_start_matches('[').trim_end_matches(']');
            return Ok(Address::Tcp {
                host: host.into(),
                port,
                export: export.into(),
            });
        }
        Err(usage())
    }

    fn export(&self) -> &str {
        match self {
            Address::Unix { export, .. } | Address::Tcp { export, .. } => export,
        }
    }

    fn connect(&self) -> io::Result<Stream> {
        match self {
            Address::Unix { path, .. } => UnixStream::connect(path).map(Stream::Unix),
            Address::Tcp { host, port, .. } => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                // Requests are one header and one payload: send them now.
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix { path, export } if export.is_empty() => write!(f, "unix:{path}"),
            Address::Unix { path, export } => write!(f, "nbd+unix:///{export}?socket={path}"),
            Address::Tcp { host, port, export } => write!(f, "nbd://{host}:{port}/{export}"),
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a request's caller gets: a READ's data (None: read into its
/// buffer by the caller itself, or no data), or why not.
type Reply = Result<Option<Vec<u8>>, Failed>;

/// Where a request's caller waits.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    cv: Condvar,
}

#[derive(Default)]
enum SlotState {
    #[default]
    Waiting,
    /// Its reply (or why none).
    Done(Reply),
    /// The connection's replies are its to read (the reader before it
    /// got its own).
    Lead,
}

impl Slot {
    fn set(&self, s: SlotState) {
        *lock(&self.state) = s;
        self.cv.notify_one();
    }
}

/// A request in flight, waiting for its reply.
struct Waiter {
    /// Bytes of data its reply carries (a READ's length, else 0).
    len: usize,
    slot: Arc<Slot>,
    /// Its request is written whole: its caller waits on its slot, free to
    /// read. One still writing (perhaps blocked on a server that reads no
    /// more until its replies are taken) is never handed the reading.
    sent: bool,
}

#[derive(Default)]
struct Pending {
    /// By cookie.
    waiters: HashMap<u64, Waiter>,
    /// Whether a caller reads the replies now.
    reading: bool,
    /// Why the connection is done (no request may start on it).
    broken: Option<(io::ErrorKind, String)>,
}

/// One connection, pipelined: callers write their requests one at a time
/// (the writer's lock) and wait for their replies, which come in any
/// order. One of the waiting callers reads them (leader and followers: no
/// thread of its own, and a request alone on the connection reads its own
/// reply, with no hand-off): it hands each to its request by cookie until
/// its own comes, then passes the reading on to a caller still waiting. A
/// reply nobody waits for (an unknown or repeated cookie), a wrong magic,
/// a cut: the connection is broken, and every request in flight on it
/// fails with a connection error (to be retried on a new one), never with
/// another's reply.
struct Conn {
    writer: Mutex<Stream>,
    /// The read side, used by the caller that reads.
    reader: Mutex<io::BufReader<Stream>>,
    /// The socket, to shut it down without the writer's lock (a writer may
    /// be blocked on a server that stopped reading).
    ctl: Stream,
    pending: Mutex<Pending>,
    /// Requests in flight (to spread them over the connections).
    inflight: AtomicUsize,
}

impl Conn {
    /// Starts serving `s` (handshake done).
    fn start(s: Stream) -> io::Result<Arc<Conn>> {
        // Replies come in bursts under load: many per read(2).
        let reader = io::BufReader::with_capacity(256 << 10, s.try_clone()?);
        let ctl = s.try_clone()?;
        Ok(Arc::new(Conn {
            writer: Mutex::new(s),
            reader: Mutex::new(reader),
            ctl,
            pending: Mutex::default(),
            inflight: AtomicUsize::new(0),
        }))
    }

    /// Sends a request and waits for its reply.
    fn call(&self, cookie: u64, c: Command, write: &[u8], read: &mut [u8]) -> Reply {
        let slot = Arc::new(Slot::default());
        {
            let mut p = lock(&self.pending);
            if let Some((kind, why)) = &p.broken {
                return Err(Failed::Connection(io::Error::new(*kind, why.clone())));
            }
            let len = if c.cmd == CMD_READ { c.len as usize } else { 0 };
            p.waiters.insert(
                cookie,
                Waiter {
                    len,
                    slot: slot.clone(),
                    sent: false,
                },
            );
        }
        let sent = send_request(&mut *lock(&self.writer), cookie, c, write);
        if let Err(e) = sent {
            // Ours fails with the others in flight.
            self.fail(e);
        }
        loop {
            {
                let mut p = lock(&self.pending);
                if let Some(w) = p.waiters.get_mut(&cookie) {
                    w.sent = true;
                }
                if !p.reading && p.waiters.contains_key(&cookie) && p.broken.is_none() {
                    // Nobody reads: we do.
                    p.reading = true;
                    drop(p);
                    self.lead(cookie, read);
                    continue;
                }
            }
            let mut st = lock(&slot.state);
            loop {
                match std::mem::take(&mut *st) {
                    SlotState::Done(r) => return r,
                    SlotState::Lead => {
                        drop(st);
                        self.lead(cookie, read);
                        break;
                    }
                    SlotState::Waiting => {
                        st = slot.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                }
            }
        }
    }

    /// Reads replies, handing each to its request, until the one for
    /// `mine` (left in its slot) or the connection breaks; then passes the
    /// reading on to a request still waiting.
    fn lead(&self, mine: u64, buf: &mut [u8]) {
        const ESHUTDOWN: u32 = 108;
        let mut r = lock(&self.reader);
        let why = loop {
            let (error, cookie) = match read_reply_header(&mut *r) {
                Ok(h) => h,
                Err(e) => break Some(e),
            };
            let Some(w) = lock(&self.pending).waiters.remove(&cookie) else {
                break Some(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a reply for cookie {cookie}, which no request in flight has"),
                ));
            };
            if error == ESHUTDOWN {
                // "If the client receives an ESHUTDOWN error it MUST
                // initiate a soft disconnect" (before the caller, told,
                // gives the connection up). What else is in flight is
                // retried on a new connection.
                drop(r);
                self.disconnect();
                w.slot
                    .set(SlotState::Done(Err(Failed::Server(error as i32))));
                return;
            }
            let reply = if error != 0 {
                Err(Failed::Server(error as i32))
            } else {
                // Ours straight into the caller's buffer.
                let mut data = Vec::new();
                let direct = cookie == mine && w.len == buf.len();
                let into = if direct {
                    &mut buf[..]
                } else {
                    data.resize(w.len, 0);
                    &mut data[..]
                };
                match r.read_exact(into) {
                    Ok(()) => Ok((!direct && w.len > 0).then_some(data)),
                    Err(e) => {
                        w.slot
                            .set(SlotState::Done(Err(Failed::Connection(io::Error::new(
                                e.kind(),
                                e.to_string(),
                            )))));
                        break Some(e);
                    }
                }
            };
            if cookie == mine {
                // Ours: nobody waits on the slot but us (no wake-up).
                *lock(&w.slot.state) = SlotState::Done(reply);
                break None;
            }
            w.slot.set(SlotState::Done(reply));
        };
        drop(r);
        if let Some(e) = why {
            self.fail(e);
        }
        let mut p = lock(&self.pending);
        p.reading = false;
        if p.broken.is_none() {
            // Only to one whose request is written (one still writing takes
            // the reading itself once done, if nobody reads by then).
            if let Some(next) = p.waiters.values().find(|w| w.sent).map(|w| w.slot.clone()) {
                p.reading = true;
                next.set(SlotState::Lead);
            }
        }
    }

    /// The connection is done: no request starts on it, every one in
    /// flight fails with a connection error, the socket is shut down.
    fn fail(&self, e: io::Error) {
        let waiters = {
            let mut p = lock(&self.pending);
            if p.broken.is_none() {
                p.broken = Some((e.kind(), e.to_string()));
            }
            std::mem::take(&mut p.waiters)
        };
        let (kind, why) = (e.kind(), e.to_string());
        for (_, w) in waiters {
            w.slot
                .set(SlotState::Done(Err(Failed::Connection(io::Error::new(
                    kind,
                    why.clone(),
                )))));
        }
        self.ctl.shutdown();
    }

    /// Tells the server this connection is done (NBD_CMD_DISC), then
    /// closes it.
    fn disconnect(&self) {
        {
            let mut p = lock(&self.pending);
            if p.broken.is_none() {
                p.broken = Some((io::ErrorKind::ConnectionAborted, "disconnected".into()));
            }
        }
        // Not if a request is being written: its writer may be blocked on a
        // server that reads no more, for ever; the close below frees it.
        match self.writer.try_lock() {
            Ok(mut w) => disconnect(&mut *w),
            Err(std::sync::TryLockError::Poisoned(p)) => disconnect(&mut *p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
        self.fail(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "disconnected",
        ));
    }
}

/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Connections to a server that allows several.
const MULTI_CONN: usize = 4;
/// Requests in flight at once (the engine's I/O threads, each waiting on
/// one), over all connections.
const IO_THREADS: usize = 32;
/// Most bytes of acknowledged, unflushed writes kept for re-sending: a
/// write past it flushes the server. Re-sending is one request at a time
/// with all other I/O held back, so it must stay short: 8 MiB is 2048 round
/// trips at 4 KiB, well inside a device's timeout even under emulation.
const REPLAY_MAX_BYTES: usize = 8 << 20;

/// The requests that changed data, acknowledged since the last FLUSH the
/// server completed, in the order they were acknowledged.
#[derive(Default)]
struct Replay {
    ops: VecDeque<(Command, Vec<u8>)>,
    bytes: usize,
    /// How many ops were ever logged before `ops[0]`.
    base: u64,
}

impl Replay {
    fn push(&mut self, c: Command, payload: &[u8]) {
        self.bytes += payload.len();
        self.ops.push_back((c, payload.to_vec()));
    }

    /// The position after the last logged op.
    fn end(&self) -> u64 {
        self.base + self.ops.len() as u64
    }

    /// A FLUSH sent when the log ended at `upto` completed: what was
    /// logged before it is durable.
    fn flushed(&mut self, upto: u64) {
        while self.base < upto {
            let Some((_, d)) = self.ops.pop_front() else {
                break;
            };
            self.bytes -= d.len();
            self.base += 1;
        }
    }
}

/// This machine's lock on serving one export (see `serve_alone`). Its
/// file is removed when it is released, so none is left behind.
struct ExportLock {
    path: std::path::PathBuf,
    lock: nix::fcntl::Flock<std::fs::File>,
}

impl Drop for ExportLock {
    fn drop(&mut self) {
        // Removed while still held: one that opened it meanwhile finds, once
        // it holds it, that the path names another file (or none), and
        // starts over (`serve_alone`). Only if the path still names the file
        // held: one removed by someone else (a /tmp cleaner) may have been
        // replaced by another holder's, which is not ours to remove.
        if is_current(&self.lock, &self.path).unwrap_or(false) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Takes this machine's lock on serving `addr` (an export without
/// CAN_MULTI_CONN, whose FLUSH on one connection covers only that
/// connection's writes): a second server process would acknowledge writes
/// that the first one's FLUSHes do not cover.
fn serve_alone(addr: &Address) -> io::Result<ExportLock> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    addr.to_string().hash(&mut h);
    let dir = std::path::Path::new("/run/lock");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("abuse-nbd-{:016x}.lock", h.finish()));
    // A file system whose inode numbers differ between the path and the open
    // file (old overlayfs) would never match: give up rather than spin.
    for _ in 0..100 {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        match lock_if_current(f, &path) {
            Ok(Some(lock)) => return Ok(ExportLock { path, lock }),
            // Its last holder removed it between our open and our lock.
            Ok(None) => continue,
            Err(nix::errno::Errno::EWOULDBLOCK) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{addr}: another server on this machine already serves this export, which allows one connection at a time (no CAN_MULTI_CONN): a FLUSH through one connection would not cover the other's writes; serve it from one process (--threads)"
                    ),
                ))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::other(format!(
        "{}: cannot take the lock on serving {addr}: the file there keeps changing under it",
        path.display()
    )))
}

/// Locks `f`, opened at `path`, if it is still the file there: None if its
/// last holder removed it meanwhile (the lock is then of a file nobody else
/// will lock, and a new one may be held at `path`).
fn lock_if_current(
    f: std::fs::File,
    path: &std::path::Path,
) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, nix::errno::Errno> {
    let locked = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)?;
    Ok(is_current(&locked, path)
        .map_err(io_errno)?
        .then_some(locked))
}

/// Whether `path` names the file `f` (same device and inode, and not
/// removed).
fn is_current(f: &std::fs::File, path: &std::path::Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let held = f.metadata()?;
    match std::fs::metadata(path) {
        Ok(now) => Ok(held.nlink() > 0 && (now.dev(), now.ino()) == (held.dev(), held.ino())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn io_errno(e: io::Error) -> nix::errno::Errno {
    nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(nix::errno::Errno::EIO as i32))
}

/// The errno for an NBD error code: the errors the protocol defines as
/// themselves, anything else (a server's own, or garbage) EIO. None for
/// NBD_ESHUTDOWN: the server is going away, which is a reconnection, not
/// the request's failure.
fn nbd_errno(code: i32) -> Option<i32> {
    const ESHUTDOWN: i32 = 108;
    const DEFINED: [i32; 7] = [1, 5, 12, 22, 28, 75, 95];
    match code {
        ESHUTDOWN => None,
        c if DEFINED.contains(&c) => Some(c),
        _ => Some(5),
    }
}

/// An NBD export served as a device.
pub struct Nbd {
    addr: Address,
    export: Export,
    /// Each slot holds one connection (made on first use, remade after a
    /// drop); a call takes the one with the fewest requests in flight.
    conns: Vec<Mutex<Option<Arc<Conn>>>>,
    next: AtomicUsize,
    cookie: AtomicU64,
    /// Reconnections made (for messages and tests).
    reconnects: AtomicU64,
    /// Writes to re-send on a new connection (only if the server flushes:
    /// one that does not has no volatile cache to lose).
    replay: Mutex<Replay>,
    /// Held shared by every request, exclusively while a new connection is
    /// made and the log re-sent on it: nothing overtakes the re-sent
    /// writes.
    gate: RwLock<()>,
    /// Writes re-sent (for tests).
    replayed: AtomicU64,
    /// Held while this process is the export's one client on this machine
    /// (a server without CAN_MULTI_CONN).
    _alone: Option<ExportLock>,
}

impl Nbd {
    /// Connects to `addr` and negotiates its export.
    pub fn connect(addr: Address) -> io::Result<Self> {
        let mut first = addr
            .connect()
            .map_err(|e| io::Error::new(e.kind(), format!("{addr}: cannot connect: {e}")))?;
        let export = handshake(&mut first, addr.export())
            .map_err(|e| io::Error::new(e.kind(), format!("{addr}: {e}")))?;
        let multi = export.flags & TF_CAN_MULTI_CONN != 0;
        let n = if multi { MULTI_CONN } else { 1 };
        let alone = if multi {
            None
        } else {
            Some(serve_alone(&addr)?)
        };
        let mut conns = vec![Mutex::new(Some(Conn::start(first)?))];
        conns.extend((1..n).map(|_| Mutex::new(None)));
        Ok(Nbd {
            addr,
            export,
            conns,
            next: AtomicUsize::new(0),
            cookie: AtomicU64::new(1),
            reconnects: AtomicU64::new(0),
            replay: Mutex::default(),
            gate: RwLock::new(()),
            replayed: AtomicU64::new(0),
            _alone: alone,
        })
    }

    /// How many logged writes were re-sent on new connections.
    pub fn replayed(&self) -> u64 {
        self.replayed.load(Ordering::Relaxed)
    }

    /// How many connections it uses.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// How many times a dropped connection was remade.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Sends one request, reconnecting and retrying while the connection
    /// fails; a server error is returned as its errno. A request that
    /// changed data is logged for re-sending until a FLUSH covers it; a
    /// FLUSH that completes drops what it covers. Many calls are in flight
    /// at once on each connection.
    fn call(&self, c: Command, write: &[u8], read: &mut [u8]) -> io::Result<()> {
        let mut delay = Duration::from_millis(10);
        let mut told = false;
        let mut lost_before = false;
        loop {
            let gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
            let (k, conn) = self.pick();
            let Some(conn) = conn else {
                drop(gate);
                match self.reconnect_slot(k) {
                    Ok(true) if told => eprintln!("abuse server: nbd: {}: reconnected", self.addr),
                    Ok(_) => {}
                    Err(e) => {
                        if !told {
                            eprintln!("abuse server: nbd: {}: {e}; retrying", self.addr);
                            told = true;
                        }
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(MAX_BACKOFF);
                    }
                }
                continue;
            };
            let logged =
                self.has(TF_SEND_FLUSH) && matches!(c.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
            // Before the FLUSH is sent: it covers what was acknowledged
            // (and so logged) by now, not what is acknowledged after.
            let upto = (c.cmd == CMD_FLUSH).then(|| lock(&self.replay).end());
            let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
            conn.inflight.fetch_add(1, Ordering::Relaxed);
            let res = conn.call(cookie, c, write, read);
            conn.inflight.fetch_sub(1, Ordering::Relaxed);
            let lost = match res {
                Ok(None) => None,
                Ok(Some(data)) => {
                    if data.len() != read.len() {
                        // Cannot be (the reader reads what was asked).
                        Some(io::Error::other("a reply of the wrong length"))
                    } else {
                        read.copy_from_slice(&data);
                        None
                    }
                }
                Err(Failed::Server(code)) => match nbd_errno(code) {
                    Some(errno) => return Err(io::Error::from_raw_os_error(errno)),
                    // NBD_ESHUTDOWN: the reader made the soft disconnect.
                    None => Some(io::Error::other(
                        "the server is shutting down (NBD_ESHUTDOWN)",
                    )),
                },
                Err(Failed::Connection(e)) => Some(e),
            };
            if let Some(e) = lost {
                if !told {
                    eprintln!(
                        "abuse server: nbd: {}: connection lost ({e}); reconnecting",
                        self.addr
                    );
                    told = true;
                }
                self.drop_conn(k, &conn, e);
                drop(gate);
                if lost_before {
                    // A connection remade for this request failed too: the
                    // server takes connections but not requests (garbage,
                    // NBD_ESHUTDOWN, a close). Back off as for a refused
                    // connection rather than spin.
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
                lost_before = true;
                continue;
            }
            // Still under the gate: a re-send cannot start between the
            // reply and the log.
            let mut replay = lock(&self.replay);
            if logged {
                replay.push(c, write);
            }
            if let Some(upto) = upto {
                replay.flushed(upto);
            }
            return Ok(());
        }
    }

    /// The connection for a request: a slot not yet (or no longer)
    /// connected if there is one (it is made for this request), else an
    /// idle one, else the one with the fewest requests in flight.
    fn pick(&self) -> (usize, Option<Arc<Conn>>) {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, Arc<Conn>, usize)> = None;
        for j in 0..n {
            let k = (start + j) % n;
            let Some(c) = lock(&self.conns[k]).clone() else {
                return (k, None);
            };
            let load = c.inflight.load(Ordering::Relaxed);
            if load == 0 {
                return (k, Some(c));
            }
            if best.as_ref().is_none_or(|b| load < b.2) {
                best = Some((k, c, load));
            }
        }
        let (k, c, _) = best.expect("at least one connection");
        (k, Some(c))
    }

    /// Gives up connection `conn` in slot `k` (unless already replaced).
    fn drop_conn(&self, k: usize, conn: &Arc<Conn>, e: io::Error) {
        let mut slot = lock(&self.conns[k]);
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *slot = None;
        }
        drop(slot);
        conn.fail(e);
    }

    /// Makes connection `k` anew if it is still gone, and re-sends the log
    /// on it, with no other request in flight. Ok(true): reconnected.
    fn reconnect_slot(&self, k: usize) -> io::Result<bool> {
        let _excl = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let mut slot = lock(&self.conns[k]);
        if slot.is_some() {
            // Another caller remade it meanwhile.
            return Ok(false);
        }
        let mut s = self.reconnect()?;
        let mut replay = lock(&self.replay);
        if let Err(e) = self.resend(&mut s, &mut replay) {
            if !replay.ops.is_empty() {
                // Cut short, the re-send may have put an older write back
                // over a newer one it did not get to: no connection may
                // serve anything until a whole re-send has put the newer
                // ones back. (No request is in flight: the gate is ours.)
                for (j, c) in self.conns.iter().enumerate() {
                    if j == k {
                        continue;
                    }
                    if let Some(o) = lock(c).take() {
                        o.disconnect();
                    }
                }
            }
            return Err(e);
        }
        *slot = Some(Conn::start(s)?);
        Ok(true)
    }

    /// Re-sends the log on the new connection `s`, in order, one request
    /// at a time, then flushes it there.
    fn resend(&self, s: &mut Stream, replay: &mut Replay) -> io::Result<()> {
        // One request on `s`; a server's refusal ends the connection (the
        // export is not what it was, or it is shutting down: keep trying,
        // as for a changed size), described by `refused`.
        let send = |s: &mut Stream, c: Command, payload: &[u8], refused: &dyn Fn(i32) -> String| {
            let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
            match request(s, cookie, c, payload) {
                Ok(()) => Ok(()),
                Err(Failed::Server(code)) => {
                    disconnect(s);
                    Err(io::Error::other(refused(code)))
                }
                Err(Failed::Connection(e)) => Err(e),
            }
        };
        for (c, payload) in replay.ops.iter() {
            send(s, *c, payload, &|code| {
                format!("the server refuses a write it had acknowledged (error {code}) when it is sent again")
            })?;
        }
        self.replayed
            .fetch_add(replay.ops.len() as u64, Ordering::Relaxed);
        if !replay.ops.is_empty() {
            // Flushed once here, they are the server's: the other
            // connections, remade next, have nothing left to re-send.
            send(s, cmd(CMD_FLUSH, 0, 0, 0), &[], &|code| {
                format!("the server fails the FLUSH of the writes sent again (error {code})")
            })?;
            let end = replay.end();
            replay.flushed(end);
        }
        Ok(())
    }

    /// A new connection to the same export, which must not have changed:
    /// neither its size nor the features in use.
    fn reconnect(&self) -> io::Result<Stream> {
        let mut s = self.addr.connect()?;
        let export = handshake(&mut s, self.addr.export())?;
        if export.size != self.export.size {
            // Another export now: retrying would write into it. Keep
            // trying until the right one is back.
            return Err(io::Error::other(format!(
                "the export is now {} bytes, not {}",
                export.size, self.export.size
            )));
        }
        // Nor lost a feature the device was promised, or CAN_MULTI_CONN
        // (a FLUSH through one connection would no longer cover the
        // writes through the others).
        let relied =
            TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_CAN_MULTI_CONN;
        let lost = self.export.flags & relied & !export.flags;
        if lost != 0 {
            return Err(io::Error::other(format!(
                "the export no longer has transmission flags {lost:#x} (they are {:#x}, were {:#x})",
                export.flags, self.export.flags
            )));
        }
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        Ok(s)
    }

    fn has(&self, flag: u16) -> bool {
        self.export.flags & flag != 0
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        for c in &self.conns {
            if let Some(c) = lock(c).take() {
                c.disconnect();
            }
        }
    }
}

impl Backend for Nbd {
    fn size(&self) -> u64 {
        self.export.size
    }

    fn read_only(&self) -> bool {
        self.has(TF_READ_ONLY)
    }

    fn features(&self) -> u32 {
        let mut f = 0;
        if self.has(TF_SEND_FLUSH) {
            f |= ABUSE_FLAG_FLUSH;
            if self.has(TF_SEND_FUA) {
                f |= ABUSE_FLAG_FUA;
            }
        }
        if self.has(TF_SEND_TRIM) {
            f |= ABUSE_FLAG_DISCARD;
        }
        if self.has(TF_SEND_WRITE_ZEROES) {
            f |= ABUSE_FLAG_WRITE_ZEROES;
        }
        f
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.call(cmd(CMD_READ, 0, offset, buf.len() as u32), &[], buf)
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        let flags = if fua && self.has(TF_SEND_FUA) {
            CMD_FLAG_FUA
        } else {
            0
        };
        self.call(
            cmd(CMD_WRITE, flags, offset, buf.len() as u32),
            buf,
            &mut [],
        )?;
        let full = self.replay.lock().unwrap_or_else(|p| p.into_inner()).bytes > REPLAY_MAX_BYTES;
        if (fua && !self.has(TF_SEND_FUA)) || full {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if !self.has(TF_SEND_FLUSH) {
            return Err(unsupported());
        }
        self.call(cmd(CMD_FLUSH, 0, 0, 0), &[], &mut [])
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.has(TF_SEND_TRIM) {
            return Err(unsupported());
        }
        for (at, n) in chunks(offset, len) {
            self.call(cmd(CMD_TRIM, 0, at, n), &[], &mut [])?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if !self.has(TF_SEND_WRITE_ZEROES) {
            return Err(unsupported());
        }
        let flags = if unmap { 0 } else { CMD_FLAG_NO_HOLE };
        for (at, n) in chunks(offset, len) {
            self.call(cmd(CMD_WRITE_ZEROES, flags, at, n), &[], &mut [])?;
        }
        Ok(())
    }

    fn io_threads(&self) -> usize {
        // Each I/O thread keeps one request in flight; the connections
        // carry many at once (pipelined), so many threads.
        IO_THREADS
    }
}

fn cmd(cmd: u16, flags: u16, offset: u64, len: u32) -> Command {
    Command {
        cmd,
        flags,
        offset,
        len,
    }
}

/// A range cut into NBD lengths (u32).
fn chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
    const MAX: u64 = 1 << 30;
    (0..len.div_ceil(MAX)).map(move |i| (offset + i * MAX, (len - i * MAX).min(MAX) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let unix = |p: &str, e: &str| Address::Unix {
            path: p.into(),
            export: e.into(),
        };
        let tcp = |h: &str, p, e: &str| Address::Tcp {
            host: h.into(),
            port: p,
            export: e.into(),
        };
        assert_eq!(
            Address::parse("unix:/run/x.sock"),
            Ok(unix("/run/x.sock", ""))
        );
        assert_eq!(
            Address::parse("nbd+unix:///disk?socket=/tmp/s"),
            Ok(unix("/tmp/s", "disk"))
        );
        assert_eq!(
            Address::parse("nbd://example.com"),
            Ok(tcp("example.com", 10809, ""))
        );
        assert_eq!(
            Address::parse("nbd://10.0.0.1:2000/vm1"),
            Ok(tcp("10.0.0.1", 2000, "vm1"))
        );
        assert_eq!(
            Address::parse("nbd://[::1]:2000/e"),
            Ok(tcp("::1", 2000, "e"))
        );
        for bad in [
            "",
            "unix:",
            "/tmp/x",
            "nbd://",
            "nbd://h:notaport",
            "nbd+unix:///e",
            "http://x",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(unix("/s", "").to_string(), "unix:/s");
    }

    /// An address of its own for a lock test (its lock file is per address).
    fn lock_test_address(tag: &str) -> Address {
        Address::parse(&format!(
            "unix:/nonexistent/{tag}-{}-{:?}.sock",
            std::process::id(),
            std::time::Instant::now()
        ))
        .unwrap()
    }

    #[test]
    fn a_lock_file_removed_by_its_last_holder_is_not_locked() {
        let addr = lock_test_address("stale-lock");
        let first = serve_alone(&addr).unwrap();
        let path = first.path.clone();
        // Opened while the first holds it, locked only after it let go (and
        // removed it) and a second took a new file there.
        let stale = std::fs::File::open(&path).unwrap();
        drop(first);
        let second = serve_alone(&addr).unwrap();
        assert!(
            lock_if_current(stale, &path).unwrap().is_none(),
            "locked the removed file while another holds the one at the path"
        );
        drop(second);
    }

    #[test]
    fn a_release_removes_only_its_own_lock_file() {
        let addr = lock_test_address("foreign-rm");
        let first = serve_alone(&addr).unwrap();
        let path = first.path.clone();
        // Removed by someone else (a cleaner), and a second holder's file
        // is there now: the first's release must leave it.
        std::fs::remove_file(&path).unwrap();
        let second = serve_alone(&addr).unwrap();
        drop(first);
        assert!(
            path.exists(),
            "the first holder's release removed the second's file"
        );
        let third = serve_alone(&addr).err().expect("a third holder was let in");
        assert_eq!(third.kind(), io::ErrorKind::AddrInUse, "{third}");
        drop(second);
        assert!(!path.exists());
    }

    #[test]
    fn the_export_lock_is_exclusive_and_leaves_no_file_behind() {
        let addr = lock_test_address("lock-test");
        let first = serve_alone(&addr).unwrap();
        let path = first.path.clone();
        assert!(path.exists());
        let second = serve_alone(&addr)
            .err()
            .expect("a second holder was let in");
        assert_eq!(second.kind(), io::ErrorKind::AddrInUse, "{second}");
        drop(first);
        assert!(!path.exists(), "{} was left behind", path.display());
        // Taken again (a new file), and again released.
        drop(serve_alone(&addr).unwrap());
        assert!(!path.exists());
        // Racing takers: at every moment at most one holds it.
        let holders = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        if let Ok(lock) = serve_alone(&addr) {
                            let n = holders.fetch_add(1, Ordering::SeqCst);
                            assert_eq!(n, 0, "two held the export's lock at once");
                            std::thread::sleep(Duration::from_micros(200));
                            holders.fetch_sub(1, Ordering::SeqCst);
                            drop(lock);
                        }
                    }
                });
            }
        });
        assert!(!path.exists());
    }

    #[test]
    fn ranges_cut_to_nbd_lengths() {
        let c: Vec<_> = chunks(10, 3 << 30).collect();
        assert_eq!(
            c,
            [
                (10, 1 << 30),
                (10 + (1 << 30), 1 << 30),
                (10 + (2 << 30), 1 << 30)
            ]
        );
        assert_eq!(chunks(0, 0).count(), 0);
    }
}
