//! The nbd backend: a client of any NBD server (nbdkit, qemu-nbd, a remote
//! nbd-server). FLUSH, FUA, DISCARD (trim) and WRITE_ZEROES are used as
//! the server advertises them. Connections: one per I/O thread where the
//! server allows several (CAN_MULTI_CONN: a flush on one covers writes
//! completed on all), else one shared. A dropped connection is
//! reconnected with a backoff and the request retried, so the device sees
//! no error while the NBD server restarts (a write retried after a drop is
//! the same write: NBD writes are idempotent).

mod protocol;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use abuse_sys::uapi::*;

use crate::backend::{unsupported, Backend};
use protocol::*;

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Unix {
        path: String,
        export: String,
    },
    Tcp {
        host: String,
        port: u16,
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

/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Connections to a server that allows several.
const MULTI_CONN: usize = 4;

/// An NBD export served as a device.
pub struct Nbd {
    addr: Address,
    export: Export,
    /// Each slot holds one connection (made on first use, remade after a
    /// drop); a call takes a free one, else the next round-robin.
    conns: Vec<Mutex<Option<Stream>>>,
    next: AtomicUsize,
    cookie: AtomicU64,
    /// Reconnections made (for messages and tests).
    reconnects: AtomicU64,
}

impl Nbd {
    /// Connects to `addr` and negotiates its export.
    pub fn connect(addr: Address) -> io::Result<Self> {
        let mut first = addr
            .connect()
            .map_err(|e| io::Error::new(e.kind(), format!("{addr}: cannot connect: {e}")))?;
        let export = handshake(&mut first, addr.export())
            .map_err(|e| io::Error::new(e.kind(), format!("{addr}: {e}")))?;
        let n = if export.flags & TF_CAN_MULTI_CONN != 0 {
            MULTI_CONN
        } else {
            1
        };
        let mut conns = vec![Mutex::new(Some(first))];
        conns.extend((1..n).map(|_| Mutex::new(None)));
        Ok(Nbd {
            addr,
            export,
            conns,
            next: AtomicUsize::new(0),
            cookie: AtomicU64::new(1),
            reconnects: AtomicU64::new(0),
        })
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
    /// fails; a server error is returned as its errno.
    fn call(&self, c: Command, write: &[u8], read: &mut [u8]) -> io::Result<()> {
        // A free connection if there is one (round-robin alone would queue
        // requests behind a busy one while another idles), else the next in
        // turn.
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut slot = (0..n)
            .find_map(|k| self.conns[(start + k) % n].try_lock().ok())
            .unwrap_or_else(|| {
                self.conns[start % n]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
            });
        let mut delay = Duration::from_millis(10);
        let mut told = false;
        loop {
            if slot.is_none() {
                match self.reconnect() {
                    Ok(s) => {
                        if told {
                            eprintln!("abuse server: nbd: {}: reconnected", self.addr);
                        }
                        *slot = Some(s);
                    }
                    Err(e) => {
                        if !told {
                            eprintln!("abuse server: nbd: {}: {e}; retrying", self.addr);
                            told = true;
                        }
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            let stream = slot.as_mut().expect("connected above");
            let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
            match request(stream, cookie, c, write, read) {
                Ok(()) => return Ok(()),
                Err(Failed::Server(errno)) => return Err(io::Error::from_raw_os_error(errno)),
                Err(Failed::Connection(e)) => {
                    if !told {
                        eprintln!(
                            "abuse server: nbd: {}: connection lost ({e}); reconnecting",
                            self.addr
                        );
                        told = true;
                    }
                    *slot = None;
                }
            }
        }
    }

    /// A new connection to the same export, which must not have changed.
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
            if let Some(s) = c.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                disconnect(s);
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
        if fua && !self.has(TF_SEND_FUA) {
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
        // Each I/O thread can keep a request in flight on its own
        // connection (with one connection they take turns).
        self.conns.len()
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
