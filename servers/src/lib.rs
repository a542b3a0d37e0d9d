//! ABUSE's server engine and its backends.
//!
//! [`engine`] runs worker threads that fetch batches of requests from a
//! control node, execute them on a [`Backend`], and complete them. Any
//! number of engines, in any number of processes, may serve one device.
//! The backends `abusectl server` offers ([`null`], [`file`](mod@file), [`cow`],
//! [`qcow2`], [`nbd`], [`rbd`]) and its [`filter`]s are built on it, and so
//! can a server of your own: implement [`Backend`], hand it to a
//! [`Server`].
//!
//! # Tutorial: a server of your own
//!
//! Add the crate (`abuse-servers`, with `abuse-sys` for the protocol's
//! constants) to a program; load the module (`insmod abuse.ko`), which
//! makes /dev/abctl0 and /dev/abuse0 (root, or a delegated device:
//! README, "Delegation"). The complete programs are in
//! `servers/examples/` (`cargo run --example ramdisk -- /dev/abctl0
//! /dev/shm/ram 64`).
//!
//! ## 1. A backend: a ramdisk
//!
//! A [`Backend`] has a size, the features it handles (`ABUSE_FLAG_FLUSH`,
//! `_FUA`, `_DISCARD`, `_WRITE_ZEROES`: the device advertises exactly
//! these, so a backend that handles none is never asked for them), and
//! calls for each request. The engine calls them from several threads at
//! once (hence `Send + Sync`, and interior mutability), for requests that
//! may overlap, always within the device's size.
//!
//! ```
//! use std::io;
//! use std::sync::RwLock;
//! use abuse_servers::backend::{unsupported, Backend};
//!
//! struct Ram(RwLock<Vec<u8>>);
//!
//! impl Backend for Ram {
//!     fn size(&self) -> u64 {
//!         self.0.read().unwrap().len() as u64
//!     }
//!     fn features(&self) -> u32 {
//!         0 // every write is in memory once it completes: nothing to flush
//!     }
//!     fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
//!         let at = offset as usize;
//!         buf.copy_from_slice(&self.0.read().unwrap()[at..at + buf.len()]);
//!         Ok(())
//!     }
//!     fn write(&self, offset: u64, buf: &[u8], _fua: bool) -> io::Result<()> {
//!         let at = offset as usize;
//!         self.0.write().unwrap()[at..at + buf.len()].copy_from_slice(buf);
//!         Ok(())
//!     }
//!     fn flush(&self) -> io::Result<()> {
//!         Ok(())
//!     }
//!     fn discard(&self, _: u64, _: u64) -> io::Result<()> {
//!         Err(unsupported()) // not advertised: never called
//!     }
//!     fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
//!         Err(unsupported())
//!     }
//!     fn io_threads(&self) -> usize {
//!         0 // quick calls: run them in the workers, no I/O thread pool
//!     }
//! }
//!
//! // A backend is plain Rust: test it without a device.
//! let ram = Ram(RwLock::new(vec![0; 1 << 20]));
//! ram.write(4096, b"hello", false).unwrap();
//! let mut buf = [0; 5];
//! ram.read(4096, &mut buf).unwrap();
//! assert_eq!(&buf, b"hello");
//! ```
//!
//! An error a call returns completes that request with its errno (the
//! kernel passes on a whitelist, EIO for the rest; EINTR, EAGAIN and
//! ENOMEM are retried a few times first); a call that panics fails its
//! request with EIO and the engine carries on.
//!
//! ## 2. Serving it
//!
//! [`Server`] sets the device up for the backend ([`Server::setup`]: its
//! size and features, 4096-byte blocks; a device already configured, by
//! `abusectl setup` or by a server before a crash, is taken over as it is)
//! and serves it until SIGINT or SIGTERM, completing every request it
//! fetched before [`Server::run`] returns:
//!
//! ```no_run
//! # use abuse_servers::null::Null as Ram;
//! use abuse_servers::Server;
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let ram = Ram::new(64 << 20);
//!     let server = Server::new("/dev/abctl0", ram).setup()?;
//!     println!("serving /dev/abuse0");
//!     server.run()?;
//!     Ok(())
//! }
//! ```
//!
//! Then, in a shell: `mkfs.ext4 /dev/abuse0 && mount /dev/abuse0 /mnt`.
//!
//! The engine's settings (worker threads, batch size, I/O threads, ...)
//! are [`EngineConfig`]'s, through [`Server::config`]; `abusectl server`
//! runs the same [`Server`] with its options. A device set up some other
//! way (a queue count, a timeout, read-only): [`Server::setup_with`] and
//! [`default_status`], or `abusectl setup` before the server starts.
//!
//! Memory dies with the process: if the server is killed, a server
//! started afterwards serves the device on (the kernel hands it whatever
//! the dead one had fetched), but with a `Vec` it would serve zeroes. The
//! ramdisk example keeps its bytes in a /dev/shm file mapped shared
//! instead, so a restarted server finds them; the rule is the one every
//! backend keeps: what it acknowledged must survive the server.
//!
//! ## 3. A wrapper: a backend over a backend
//!
//! A backend may hold another and pass calls on, changing what it likes:
//! log them (`examples/logging.rs`), delay or fail them (the [`filter`]s),
//! or transform the data (`examples/xor.rs`). Two rules for a wrapper:
//!
//! - the trait's optional calls have defaults; pass on the ones that say
//!   something about the inner backend (`read_only`, `check_block_size`,
//!   `io_threads`, `may_block`, `stop`), or the engine takes the defaults;
//! - `data_file`, `read_from_file` and `write_to_file` let the kernel move
//!   READ and WRITE data to and from the backend's file itself, past
//!   `read` and `write`: a wrapper that must see the data (or transform
//!   it) does not pass them on.
//!
//! ```
//! use std::io;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use abuse_servers::{null::Null, Backend};
//!
//! /// Counts the bytes written through it.
//! struct Counted<B> {
//!     inner: B,
//!     written: AtomicU64,
//! }
//!
//! impl<B: Backend> Backend for Counted<B> {
//!     fn size(&self) -> u64 {
//!         self.inner.size()
//!     }
//!     fn read_only(&self) -> bool {
//!         self.inner.read_only()
//!     }
//!     fn features(&self) -> u32 {
//!         self.inner.features()
//!     }
//!     fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
//!         self.inner.read(offset, buf)
//!     }
//!     fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
//!         self.written.fetch_add(buf.len() as u64, Ordering::Relaxed);
//!         self.inner.write(offset, buf, fua)
//!     }
//!     fn flush(&self) -> io::Result<()> {
//!         self.inner.flush()
//!     }
//!     fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
//!         self.inner.discard(offset, len)
//!     }
//!     fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
//!         self.inner.write_zeroes(offset, len, unmap)
//!     }
//!     fn io_threads(&self) -> usize {
//!         self.inner.io_threads()
//!     }
//!     fn may_block(&self, cmd: u16, offset: u64, len: u64, fua: bool) -> bool {
//!         self.inner.may_block(cmd, offset, len, fua)
//!     }
//!     fn stop(&self) -> io::Result<()> {
//!         self.inner.stop()
//!     }
//! }
//!
//! let counted = Counted { inner: Null::new(1 << 30), written: AtomicU64::new(0) };
//! counted.write(0, &[1; 4096], false).unwrap();
//! assert_eq!(counted.written.load(Ordering::Relaxed), 4096);
//! // Served like any other: Server::new("/dev/abctl0", counted).setup()?.run()?
//! ```
//!
//! ## 4. Stopping cleanly, and threads of your own
//!
//! [`Server::run`] blocks SIGINT and SIGTERM and waits for them in a
//! thread of its own. A process-wide signal goes to any thread that does
//! not block it, with its default action: if the backend starts threads
//! before `run` (a connection, a thread pool), block the signals first
//! thing in `main` with [`StopSignals::block`], so every thread inherits
//! the mask, and hand [`StopSignals::watch`]'s flag to
//! [`Server::stop_on`] (any `Arc<AtomicBool>` will do, for a program that
//! decides itself when to stop):
//!
//! ```no_run
//! use abuse_servers::file::{FileBackend, FileOptions};
//! use abuse_servers::{Server, StopSignals};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let signals = StopSignals::block()?;
//!     let file = FileBackend::open("disk.img".as_ref(), FileOptions::default())?;
//!     let server = Server::new("/dev/abctl0", file).setup()?;
//!     server.stop_on(signals.watch()).run()?;
//!     Ok(())
//! }
//! ```
//!
//! Once stopped, `run` calls [`Backend::stop`] (its error is
//! [`EngineError::Stop`]). The lower-level [`serve`] runs the engine alone:
//! no setup, no signals, no `stop`.

#![deny(missing_docs)]

pub mod backend;
pub mod blkdev;
pub mod cow;
pub mod engine;
pub mod file;
pub mod filter;
pub mod nbd;
pub mod null;
pub mod qcow2;
pub mod rbd;
pub mod sync;

pub use backend::Backend;
pub use engine::{
    default_status, device_status, serve, EngineConfig, EngineError, Server, Stats, StopSignals,
};
