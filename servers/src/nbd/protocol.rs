//! The NBD protocol, client side (github.com/NetworkBlockDevice/nbd,
//! doc/proto.md): the fixed-newstyle handshake (NBD_OPT_GO, falling back to
//! NBD_OPT_EXPORT_NAME for old servers) and simple replies. Requests are
//! pipelined: a connection's reading caller (in `super`) takes the replies in any
//! order, by cookie.

use std::io::{self, Read, Write};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const INFO_EXPORT: u16 = 0;

// Transmission flags.
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands and their flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// What the server said about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn send_option(s: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg)
}

/// Negotiates export `name` on a fresh connection.
pub fn handshake<S: Read + Write>(s: &mut S, name: &str) -> io::Result<Export> {
    negotiate(s, name).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => io::Error::new(
            e.kind(),
            "the server closed the connection during the handshake",
        ),
        _ => e,
    })
}

fn negotiate<S: Read + Write>(s: &mut S, name: &str) -> io::Result<Export> {
    if read_u64(s)? != NBDMAGIC {
        return Err(bad("not an NBD server (no NBDMAGIC)"));
    }
    if read_u64(s)? != IHAVEOPT {
        return Err(bad(
            "the NBD server speaks only the old style handshake, which this client does not",
        ));
    }
    let server_flags = read_u16(s)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad("the NBD server does not speak fixed newstyle"));
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 });
    s.write_all(&client_flags.to_be_bytes())?;
    let name_bytes = name.as_bytes();
    if name_bytes.len() > 4096 {
        return Err(bad("export name longer than 4096 bytes"));
    }
    let mut go = Vec::new();
    go.extend_from_slice(&(name_bytes.len() as u32).to_be_bytes());
    go.extend_from_slice(name_bytes);
    go.extend_from_slice(&0u16.to_be_bytes());
    send_option(s, OPT_GO, &go)?;
    let mut export = None;
    loop {
        if read_u64(s)? != REPLY_MAGIC {
            return Err(bad("bad option reply magic"));
        }
        let _option = read_u32(s)?;
        let kind = read_u32(s)?;
        let len = read_u32(s)? as usize;
        if len > 64 * 1024 {
            return Err(bad(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0; len];
        s.read_exact(&mut data)?;
        match kind {
            REP_INFO
                if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
            {
                let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                let flags = u16::from_be_bytes([data[10], data[11]]);
                export = Some(Export { size, flags });
            }
            REP_INFO => {}
            REP_ACK => {
                return export.ok_or_else(|| bad("NBD_OPT_GO acknowledged without export info"));
            }
            REP_ERR_UNSUP => return export_name(s, name_bytes, no_zeroes),
            e if e & (1 << 31) != 0 => {
                let msg = String::from_utf8_lossy(&data).into_owned();
                let what = match e & !(1 << 31) {
                    2 => "the server's policy refuses it",
                    6 => "no such export",
                    _ => "the server refused it",
                };
                let _ = send_option(s, OPT_ABORT, &[]);
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "export '{name}': {what} (reply {e:#x}){}",
                        if msg.is_empty() {
                            String::new()
                        } else {
                            format!(": {msg}")
                        }
                    ),
                ));
            }
            other => return Err(bad(format!("unexpected option reply {other:#x}"))),
        }
    }
}

/// NBD_OPT_EXPORT_NAME, for servers without NBD_OPT_GO.
fn export_name<S: Read + Write>(s: &mut S, name: &[u8], no_zeroes: bool) -> io::Result<Export> {
    send_option(s, OPT_EXPORT_NAME, name)?;
    let size = read_u64(s)?;
    let flags = read_u16(s)?;
    if !no_zeroes {
        let mut zeroes = [0; 124];
        s.read_exact(&mut zeroes)?;
    }
    Ok(Export { size, flags })
}

/// A request's header fields (the cookie aside).
#[derive(Clone, Copy, Debug)]
pub struct Command {
    pub cmd: u16,
    pub flags: u16,
    pub offset: u64,
    pub len: u32,
}

/// A request's header (28 bytes): `c` with `cookie`.
pub fn request_header(cookie: u64, c: Command) -> [u8; 28] {
    let mut hdr = [0u8; 28];
    hdr[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    hdr[4..6].copy_from_slice(&c.flags.to_be_bytes());
    hdr[6..8].copy_from_slice(&c.cmd.to_be_bytes());
    hdr[8..16].copy_from_slice(&cookie.to_be_bytes());
    hdr[16..24].copy_from_slice(&c.offset.to_be_bytes());
    hdr[24..28].copy_from_slice(&c.len.to_be_bytes());
    hdr
}

/// Sends one request: the header and a WRITE's data.
pub fn send_request<S: Write>(s: &mut S, cookie: u64, c: Command, write: &[u8]) -> io::Result<()> {
    let hdr = request_header(cookie, c);
    if c.cmd == CMD_WRITE {
        // One buffer, one syscall (a 4 KiB write is one message).
        let mut msg = Vec::with_capacity(28 + write.len());
        msg.extend_from_slice(&hdr);
        msg.extend_from_slice(write);
        s.write_all(&msg)?;
    } else {
        s.write_all(&hdr)?;
    }
    s.flush()
}

/// A simple reply's header: its error and cookie. Anything but a simple
/// reply (a structured one nobody negotiated, garbage) is the connection's
/// failure.
pub fn read_reply_header<S: Read>(s: &mut S) -> io::Result<(u32, u64)> {
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply)?;
    let magic = u32::from_be_bytes(reply[0..4].try_into().expect("4 bytes"));
    let error = u32::from_be_bytes(reply[4..8].try_into().expect("4 bytes"));
    let cookie = u64::from_be_bytes(reply[8..16].try_into().expect("8 bytes"));
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(bad(format!("bad reply magic {magic:#x} (cookie {cookie})")));
    }
    Ok((error, cookie))
}

/// One request and its reply, alone on the connection (the re-send of the
/// log on a new connection): the header (and a WRITE's data), then the
/// simple reply. An error the server reports is its errno; anything else
/// wrong is the connection's.
pub fn request<S: Read + Write>(
    s: &mut S,
    cookie: u64,
    c: Command,
    write: &[u8],
) -> Result<(), Failed> {
    send_request(s, cookie, c, write).map_err(Failed::Connection)?;
    let (error, got) = read_reply_header(s).map_err(Failed::Connection)?;
    if got != cookie {
        return Err(Failed::Connection(bad(format!(
            "a reply for cookie {got}, not {cookie}"
        ))));
    }
    if error != 0 {
        return Err(Failed::Server(error as i32));
    }
    if c.cmd == CMD_READ {
        // Never sent alone: a READ needs the reader's buffer.
        return Err(Failed::Connection(bad("a READ sent alone")));
    }
    Ok(())
}

/// Why a request failed.
#[derive(Debug)]
pub enum Failed {
    /// The server answered with this errno (NBD errors are Linux errnos).
    Server(i32),
    /// The connection broke or spoke nonsense: reconnect and retry.
    Connection(io::Error),
}

/// Tells the server this connection is done (NBD_CMD_DISC: no reply).
pub fn disconnect(s: &mut impl Write) {
    let _ = s.write_all(&request_header(
        0,
        Command {
            cmd: CMD_DISC,
            flags: 0,
            offset: 0,
            len: 0,
        },
    ));
}
