//! The rbd backend: a Ceph RBD image through librbd, loaded at run time
//! (so that abusectl needs librbd only where it serves rbd). Each request
//! is one asynchronous librbd operation; the engine's I/O threads keep a
//! batch's requests in flight together.

#[allow(unsafe_op_in_unsafe_fn)]
mod bindings;

use std::ffi::{c_int, CString};
use std::io;
use std::ptr;
use std::sync::OnceLock;

use crate::backend::{Backend, ALL_FEATURES};
use bindings::{rados_ioctx_t, rados_t, rbd_completion_t, rbd_image_t, Librbd};

/// The library, loaded once (or why it could not be).
fn lib() -> io::Result<&'static Librbd> {
    static LIB: OnceLock<Result<Librbd, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        // SAFETY: librbd's initialisers only set up its own state; the
        // symbols are checked below before any is called.
        let l = unsafe { Librbd::new("librbd.so.1") }.map_err(|e| {
            format!("cannot load librbd ({e}): install it (Debian: apt install librbd1)")
        })?;
        // Each symbol this backend calls, by its own name.
        macro_rules! symbols {
            ($($name:ident),* $(,)?) => {
                [$((stringify!($name), l.$name.is_err())),*]
            };
        }
        let missing = symbols![
            rados_create,
            rados_conf_read_file,
            rados_conf_set,
            rados_connect,
            rados_shutdown,
            rados_ioctx_create,
            rados_ioctx_destroy,
            rbd_open,
            rbd_open_read_only,
            rbd_close,
            rbd_get_size,
            rbd_aio_create_completion,
            rbd_aio_read,
            rbd_aio_write,
            rbd_aio_flush,
            rbd_aio_write_zeroes,
            rbd_aio_wait_for_complete,
            rbd_aio_get_return_value,
            rbd_aio_release,
        ];
        match missing.iter().find(|(_, m)| *m) {
            Some((name, _)) => Err(format!("librbd has no {name} (too old a Ceph?)")),
            None => Ok(l),
        }
    })
    .as_ref()
    .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.clone()))
}

/// A librbd return value as a result (librbd returns -errno).
fn check(what: &str, r: c_int) -> io::Result<c_int> {
    if r < 0 {
        let e = io::Error::from_raw_os_error(-r);
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(r)
    }
}

fn cstring(what: &str, s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// Where to find the image and how to reach the cluster.
#[derive(Clone, Debug, Default)]
pub struct RbdSpec {
    /// The pool that holds the image.
    pub pool: String,
    /// The image's name.
    pub image: String,
    /// ceph.conf; None: librados' default search (CEPH_CONF,
    /// /etc/ceph/ceph.conf, ...).
    pub conf: Option<std::path::PathBuf>,
    /// The client id (`admin` for client.admin); None: librados' default.
    pub id: Option<String>,
    /// Open the image read-only: a read-only device.
    pub read_only: bool,
}

impl RbdSpec {
    /// Parses `POOL/IMAGE`.
    pub fn parse(s: &str) -> Result<RbdSpec, String> {
        match s.split_once('/') {
            Some((pool, image))
                if !pool.is_empty() && !image.is_empty() && !image.contains('/') =>
            {
                Ok(RbdSpec {
                    pool: pool.into(),
                    image: image.into(),
                    ..Default::default()
                })
            }
            _ => Err(format!("'{s}': an rbd image is POOL/IMAGE")),
        }
    }
}

/// An open RBD image.
pub struct Rbd {
    lib: &'static Librbd,
    cluster: rados_t,
    ioctx: rados_ioctx_t,
    image: rbd_image_t,
    size: u64,
    read_only: bool,
}

// SAFETY: librados handles and librbd image handles may be used from any
// thread, and concurrently (librbd serialises what it must internally);
// they are only closed in Drop, when no call can be in progress.
unsafe impl Send for Rbd {}
// SAFETY: as above: every method takes &self and librbd is thread-safe.
unsafe impl Sync for Rbd {}

impl Rbd {
    /// Connects to the cluster and opens the image.
    pub fn open(spec: &RbdSpec) -> io::Result<Rbd> {
        let lib = lib()?;
        let id = spec.id.as_deref().map(|i| cstring("--id", i)).transpose()?;
        let conf = match &spec.conf {
            Some(p) => Some(cstring("--conf", &p.to_string_lossy())?),
            None => None,
        };
        let pool = cstring("the pool", &spec.pool)?;
        let name = cstring("the image", &spec.image)?;
        let mut cluster: rados_t = ptr::null_mut();
        // SAFETY: `cluster` is a valid out pointer; `id` is NULL or a C string.
        check("rados_create", unsafe {
            lib.rados_create(
                &mut cluster,
                id.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            )
        })?;
        // From here on Drop releases whatever was made.
        let mut me = Rbd {
            lib,
            cluster,
            ioctx: ptr::null_mut(),
            image: ptr::null_mut(),
            size: 0,
            read_only: spec.read_only,
        };
        // SAFETY: `cluster` is a created, unconnected handle; `conf` is NULL
        // (the default search) or a C string.
        check("reading the Ceph configuration", unsafe {
            lib.rados_conf_read_file(
                me.cluster,
                conf.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            )
        })?;
        // librbd's cache keeps acknowledged writes in this process until a
        // flush: a FLUSH through another server (or the one that takes over
        // from this one, killed) would not cover them. Off, whatever the
        // configuration says: every write is in the cluster when it is
        // acknowledged, and a FLUSH from any server covers it.
        // SAFETY: a created, unconnected handle; two C strings.
        check("turning librbd's cache off", unsafe {
            lib.rados_conf_set(me.cluster, c"rbd_cache".as_ptr(), c"false".as_ptr())
        })?;
        // SAFETY: a configured cluster handle.
        check("connecting to the Ceph cluster", unsafe {
            lib.rados_connect(me.cluster)
        })?;
        // SAFETY: a connected cluster; `pool` is a C string; out pointer valid.
        check(&format!("opening pool {}", spec.pool), unsafe {
            lib.rados_ioctx_create(me.cluster, pool.as_ptr(), &mut me.ioctx)
        })?;
        // SAFETY: a valid ioctx; `name` a C string; no snapshot (NULL).
        check(
            &format!("opening image {}/{}", spec.pool, spec.image),
            unsafe {
                if spec.read_only {
                    lib.rbd_open_read_only(me.ioctx, name.as_ptr(), &mut me.image, ptr::null())
                } else {
                    lib.rbd_open(me.ioctx, name.as_ptr(), &mut me.image, ptr::null())
                }
            },
        )?;
        // SAFETY: an open image; `size` a valid out pointer.
        check("rbd_get_size", unsafe {
            lib.rbd_get_size(me.image, &mut me.size)
        })?;
        Ok(me)
    }

    /// Runs one asynchronous operation `op` (given its completion) and
    /// waits for it; returns its result.
    fn aio(&self, what: &str, op: impl FnOnce(rbd_completion_t) -> c_int) -> io::Result<isize> {
        let mut c: rbd_completion_t = ptr::null_mut();
        // SAFETY: no callback, so no argument; `c` a valid out pointer.
        check("rbd_aio_create_completion", unsafe {
            self.lib
                .rbd_aio_create_completion(ptr::null_mut(), None, &mut c)
        })?;
        let submitted = op(c);
        let r = if submitted < 0 {
            submitted as isize
        } else {
            // SAFETY: `c` was submitted with an operation that completes it.
            unsafe {
                self.lib.rbd_aio_wait_for_complete(c);
                self.lib.rbd_aio_get_return_value(c)
            }
        };
        // SAFETY: the operation is complete (or never started): nothing
        // uses `c` any more.
        unsafe { self.lib.rbd_aio_release(c) };
        if r < 0 {
            check(what, r as c_int)?;
        }
        Ok(r)
    }
}

impl Drop for Rbd {
    fn drop(&mut self) {
        // SAFETY: each handle is closed once, if it was made, in the order
        // librbd requires (image, ioctx, cluster); no call is in progress
        // since `self` is being dropped.
        unsafe {
            if !self.image.is_null() {
                self.lib.rbd_close(self.image);
            }
            if !self.ioctx.is_null() {
                self.lib.rados_ioctx_destroy(self.ioctx);
            }
            self.lib.rados_shutdown(self.cluster);
        }
    }
}

impl Backend for Rbd {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn features(&self) -> u32 {
        if self.read_only {
            0
        } else {
            ALL_FEATURES
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len();
        // SAFETY: `buf` is valid for `len` bytes and outlives the
        // operation, which `aio` waits for.
        let n = self.aio("rbd read", |c| unsafe {
            self.lib
                .rbd_aio_read(self.image, offset, len, buf.as_mut_ptr().cast(), c)
        })?;
        if n as usize != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("rbd read of {len} bytes at {offset} returned {n}"),
            ));
        }
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        // SAFETY: `buf` is valid for its length and outlives the operation.
        self.aio("rbd write", |c| unsafe {
            self.lib
                .rbd_aio_write(self.image, offset, buf.len(), buf.as_ptr().cast(), c)
        })?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        // SAFETY: an open image and a fresh completion.
        self.aio("rbd flush", |c| unsafe {
            self.lib.rbd_aio_flush(self.image, c)
        })
        .map(drop)
    }

    /// librbd skips the parts of a discard that do not cover whole objects
    /// (rbd_skip_partial_discard), so they would not read zero: a discard is
    /// a write of zeroes, which librbd turns into deallocation where it can.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: an open image and a fresh completion; no flags.
        self.aio("rbd write_zeroes", |c| unsafe {
            self.lib
                .rbd_aio_write_zeroes(self.image, offset, len, c, 0, 0)
        })
        .map(drop)
    }

    /// Each request is a network round trip: many at once.
    fn io_threads(&self) -> usize {
        32
    }
}
