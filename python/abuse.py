# SPDX-License-Identifier: GPL-2.0 OR MIT
"""ABUSE (A Block device in User SpacE) for Python servers.

The user-space API of abuse-sys/include/abuse.h with the standard library
alone: ctypes structures with the header's layout, its constants, the ioctl
numbers computed as the kernel's _IOR/_IOW/_IOWR macros compute them, and
a Control class issuing them with fcntl.ioctl. A host test
(abuse-sys/tests/python_layout.rs) checks every size, offset, constant and
ioctl number against the C header.

    import abuse
    ctl = abuse.Control("/dev/abctl0")
    bios = (abuse.Bio * 16)()
    data = abuse.Buffer(16 * (abuse.ABUSE_MAX_BIO_BYTES + abuse.ABUSE_DATA_ALIGN))
    held = 0
    while True:
        n = ctl.serve(bios, held, data)     # complete `held`, fetch up to 16
        for b in bios[:n]:
            ...                             # data at b.addr; set b.result
        held = n

fcntl.ioctl releases the GIL while the driver sleeps in SERVE, so threads
can serve one device side by side (python/ramdisk.py does).
"""

import ctypes
import errno as _errno
import fcntl
import mmap
import os
import select

if os.uname().machine.startswith(("ppc", "powerpc", "mips", "sparc")):
    raise ImportError("ABUSE's uapi assumes the asm-generic _IOC layout, "
                      "which this architecture does not use")

ABUSE_VERSION = 5

# struct abuse_status.flags
ABUSE_FLAG_READ_ONLY = 1 << 0
ABUSE_FLAG_RECONNECT = 1 << 1
ABUSE_FLAG_FLUSH = 1 << 2
ABUSE_FLAG_FUA = 1 << 3
ABUSE_FLAG_DISCARD = 1 << 4
ABUSE_FLAG_WRITE_ZEROES = 1 << 5
ABUSE_FLAG_DELEGATED = 1 << 6
ABUSE_FLAG_SETTABLE = 0x7F
ABUSE_FLAG_CONFIGURED = 1 << 16
ABUSE_FLAG_REPORTED = ABUSE_FLAG_CONFIGURED

# struct abuse_bio.cmd
ABUSE_CMD_READ = 0
ABUSE_CMD_WRITE = 1
ABUSE_CMD_FLUSH = 2
ABUSE_CMD_DISCARD = 3
ABUSE_CMD_WRITE_ZEROES = 4

# struct abuse_bio.flags
ABUSE_BIO_FUA = 1 << 0
ABUSE_BIO_REQUEUED = 1 << 1
ABUSE_BIO_NOUNMAP = 1 << 2
ABUSE_BIO_ERRNO = 1 << 3
ABUSE_BIO_ZEROES = 1 << 4
ABUSE_BIO_FILE = 1 << 5

# struct abuse_xfer.flags, struct abuse_serve.flags
ABUSE_XFER_DESCRIPTORS = 1 << 0

# struct abuse_bio.result
ABUSE_RESULT_OKAY = 0
ABUSE_RESULT_MEDIA_FAILURE = 1
ABUSE_RESULT_DEVICE_FAILURE = 2

ABUSE_MIN_BLOCK_SIZE = 512
ABUSE_MAX_BLOCK_SIZE = 4096
ABUSE_DEFAULT_QUEUE_DEPTH = 128
ABUSE_MAX_QUEUE_DEPTH = 1024
ABUSE_MAX_QUEUES = 32
ABUSE_MAX_BATCH = 256
ABUSE_MAX_BIO_BYTES = 1 << 20
ABUSE_DATA_ALIGN = 4096
ABUSE_DEFAULT_TIMEOUT_MS = 30000
ABUSE_MIN_TIMEOUT_MS = 1000
ABUSE_MAX_SIZE = 0x7FFFFFFFFFFFF000
ABUSE_MAX_ERRNO = 4095
ABUSE_SECTOR_SHIFT = 9

_u16, _u32, _u64 = ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class Status(ctypes.Structure):
    """struct abuse_status: GET_STATUS / SET_STATUS."""
    _fields_ = [
        ("size", _u64), ("block_size", _u32), ("queue_depth", _u32),
        ("flags", _u32), ("timeout_ms", _u32), ("index", _u32),
        ("max_bytes", _u32), ("dev", _u64), ("max_batch", _u32),
        ("version", _u32), ("pending", _u32), ("in_flight", _u32),
        ("completed", _u64), ("errors", _u64), ("requeues", _u64),
        ("timeouts", _u64), ("generation", _u64), ("queues", _u32),
        ("max_queues", _u32), ("owner_uid", _u32), ("owner_gid", _u32),
        ("reserved", _u64 * 5),
    ]


class Bio(ctypes.Structure):
    """struct abuse_bio: one request."""
    _fields_ = [
        ("id", _u64), ("sector", _u64), ("addr", _u64), ("len", _u32),
        ("cmd", _u16), ("flags", _u16), ("result", _u32), ("error", _u32),
    ]


class Xfer(ctypes.Structure):
    """struct abuse_xfer: GET_BIO / PUT_BIO."""
    _fields_ = [
        ("bios", _u64), ("data", _u64), ("data_len", _u64), ("count", _u32),
        ("flags", _u32), ("reserved", _u64 * 4),
    ]


class Serve(ctypes.Structure):
    """struct abuse_serve: SERVE."""
    _fields_ = [
        ("bios", _u64), ("data", _u64), ("data_len", _u64), ("put", _u32),
        ("count", _u32), ("queue", _u32), ("wait_ms", _u32), ("flags", _u32),
        ("reserved0", _u32), ("reserved", _u64 * 2),
    ]


# The C name of each structure.
STRUCTS = {"abuse_status": Status, "abuse_bio": Bio, "abuse_xfer": Xfer, "abuse_serve": Serve}

# The asm-generic _IOC encoding (include/uapi/asm-generic/ioctl.h).
_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction, kind, nr, size):
    assert size < (1 << 14)
    return (direction << _IOC_DIRSHIFT) | (ord(kind) << _IOC_TYPESHIFT) \
        | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IO(kind, nr):
    return _IOC(_IOC_NONE, kind, nr, 0)


def _IOR(kind, nr, struct):
    return _IOC(_IOC_READ, kind, nr, ctypes.sizeof(struct))


def _IOW(kind, nr, struct):
    return _IOC(_IOC_WRITE, kind, nr, ctypes.sizeof(struct))


def _IOWR(kind, nr, struct):
    return _IOC(_IOC_READ | _IOC_WRITE, kind, nr, ctypes.sizeof(struct))


ABUSE_GET_STATUS = _IOR("A", 0x20, Status)
ABUSE_SET_STATUS = _IOW("A", 0x21, Status)
ABUSE_RESET = _IO("A", 0x23)
ABUSE_GET_BIO = _IOWR("A", 0x24, Xfer)
ABUSE_PUT_BIO = _IOWR("A", 0x25, Xfer)
ABUSE_SERVE = _IOWR("A", 0x26, Serve)


class Error(OSError):
    """A failed ioctl: `errno`, a message naming the device and the call, and
    `done`, how many entries a PUT_BIO or SERVE completed before it."""

    def __init__(self, path, call, err, done=0):
        why = _HINTS.get((call, err), os.strerror(err))
        super().__init__(err, f"{path}: {call}: {why}")
        self.done = done


_HINTS = {
    ("open", _errno.ENOENT): "no such device (is the abuse module loaded?)",
    ("open", _errno.EACCES): "permission denied (serving needs root, or a device delegated to you)",
    ("open", _errno.EPERM): "permission denied (serving needs root, or a device delegated to you)",
    ("SET_STATUS", _errno.EBUSY): "device is busy: already configured, or still open from "
                                  "its previous configuration",
    ("SET_STATUS", _errno.EINVAL): "invalid configuration (size a non-zero multiple of a "
                                   "block size that is a power of two in 512-4096?)",
}


def address(buf):
    """The address of a writable buffer (an mmap, a bytearray, a ctypes
    object), for the `addr`, `bios` and `data` fields."""
    if isinstance(buf, (ctypes.Array, ctypes.Structure)):
        return ctypes.addressof(buf)
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class Buffer:
    """A page-aligned anonymous mapping: room for fetched payloads."""

    def __init__(self, size):
        self.mem = mmap.mmap(-1, size)
        self.addr = address(self.mem)
        self.len = size


class Control:
    """An open control node /dev/abctlN. Every call is stateless: any number
    of Control objects, threads and processes may serve one device."""

    def __init__(self, path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise Error(path, "open", e.errno) from None

    def close(self):
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def fileno(self):
        return self.fd

    def _ioctl(self, call, request, arg=0, done=lambda: 0):
        try:
            # Structures of at most 1 KiB: fcntl copies them in and back
            # (also on failure) and releases the GIL meanwhile.
            return fcntl.ioctl(self.fd, request, arg, True)
        except OSError as e:
            raise Error(self.path, call, e.errno, done()) from None

    def status(self):
        """GET_STATUS."""
        st = Status()
        self._ioctl("GET_STATUS", ABUSE_GET_STATUS, st)
        return st

    def set_status(self, st):
        """SET_STATUS with a Status."""
        self._ioctl("SET_STATUS", ABUSE_SET_STATUS, st)

    def setup(self, size, block_size=4096, flags=0, queue_depth=ABUSE_DEFAULT_QUEUE_DEPTH,
              queues=0, timeout_ms=ABUSE_DEFAULT_TIMEOUT_MS):
        """Configures the device (SET_STATUS); returns its new status."""
        self.set_status(Status(size=size, block_size=block_size, flags=flags,
                               queue_depth=queue_depth, queues=queues, timeout_ms=timeout_ms))
        return self.status()

    def reset(self):
        """RESET: fails everything outstanding, unconfigures the device."""
        self._ioctl("RESET", ABUSE_RESET)

    def get_bio(self, bios, data=None, flags=0):
        """GET_BIO: fetches up to len(bios) pending requests (payloads in the
        Buffer `data`); returns how many (0: none pending)."""
        x = Xfer(bios=address(bios), data=data.addr if data else 0,
                 data_len=data.len if data else 0, count=len(bios), flags=flags)
        try:
            self._ioctl("GET_BIO", ABUSE_GET_BIO, x)
        except Error as e:
            if e.errno == _errno.ENOMSG:
                return 0
            raise
        return x.count

    def put_bio(self, bios, count=None):
        """PUT_BIO: completes bios[:count] in order; returns how many. On
        failure, Error.done tells how many completed."""
        x = Xfer(bios=address(bios), count=len(bios) if count is None else count)
        self._ioctl("PUT_BIO", ABUSE_PUT_BIO, x, lambda: x.count)
        return x.count

    def serve(self, bios, put, data=None, queue=0, wait_ms=1000, flags=0):
        """SERVE: completes bios[:put], then fetches up to len(bios) requests
        (from hardware queue `queue` first), sleeping up to wait_ms when none
        is pending; returns how many were fetched. On failure nothing was
        fetched and Error.done tells how many of the `put` completed."""
        x = Serve(bios=address(bios), data=data.addr if data else 0,
                  data_len=data.len if data else 0, put=put, count=len(bios),
                  queue=queue, wait_ms=wait_ms, flags=flags)
        self._ioctl("SERVE", ABUSE_SERVE, x, lambda: min(x.put, put))
        return x.count

    def poll(self, timeout_ms=None):
        """Whether requests are pending (waits up to timeout_ms; None: forever)."""
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return bool(p.poll(timeout_ms))
