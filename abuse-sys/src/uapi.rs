//! The ABUSE user-space API: every struct, constant and ioctl number shared by
//! the kernel driver and its servers.
//!
//! This file is the single source of truth. It is `no_std`-clean and free of
//! dependencies so that the driver can include it with
//! `#[path = "../../abuse-sys/src/uapi.rs"] mod uapi;`, and the C header
//! `include/abuse.h` mirrors it (a host test checks the layouts match).
//!
//! Growth: every struct carries reserved fields that must be zero; a later
//! version gives them a meaning where zero keeps the old behaviour.

/// The ioctl type byte, `'A'`, as the original ABUSE registered it.
pub const ABUSE_IOC_TYPE: u32 = b'A' as u32;
/// Protocol version reported in [`AbuseStatus::version`]. 2: configuration
/// generations, errnos on PUT_BIO, fencing timeouts. 3: several hardware
/// queues, a per-queue depth, ABUSE_SERVE, delegation. 4: READs completed
/// as zeroes ([`ABUSE_BIO_ZEROES`]). 5: data moved by the driver between a
/// request and a server's file ([`ABUSE_BIO_FILE`], [`ABUSE_XFER_DESCRIPTORS`]).
pub const ABUSE_VERSION: u32 = 5;

// The ioctl numbers below use the asm-generic `_IOC` layout (x86, arm64,
// riscv, ...). Architectures with another layout would get numbers the
// kernel does not decode the same way: refuse to build there.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "mips32r6",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64",
))]
compile_error!(
    "ABUSE's uapi assumes the asm-generic _IOC layout, which this architecture does not use"
);

// Device flags: [`AbuseStatus::flags`].
/// Writes are refused by the kernel and never reach a server.
pub const ABUSE_FLAG_READ_ONLY: u32 = 1 << 0;
/// SET_STATUS on a configured device: change read-only and queue depth only.
pub const ABUSE_FLAG_RECONNECT: u32 = 1 << 1;
/// The server handles FLUSH requests (a volatile write cache).
pub const ABUSE_FLAG_FLUSH: u32 = 1 << 2;
/// The server honours FUA on writes.
pub const ABUSE_FLAG_FUA: u32 = 1 << 3;
/// The server handles DISCARD requests.
pub const ABUSE_FLAG_DISCARD: u32 = 1 << 4;
/// The server handles WRITE_ZEROES requests.
pub const ABUSE_FLAG_WRITE_ZEROES: u32 = 1 << 5;
/// The device is delegated to the user `owner_uid`: that user may serve it
/// (GET_STATUS, GET_BIO, PUT_BIO, SERVE, poll) without CAP_SYS_ADMIN.
/// Configuring and resetting stay root's; RESET ends the delegation.
pub const ABUSE_FLAG_DELEGATED: u32 = 1 << 6;
/// Flags SET_STATUS accepts.
pub const ABUSE_FLAG_SETTABLE: u32 = ABUSE_FLAG_READ_ONLY
    | ABUSE_FLAG_RECONNECT
    | ABUSE_FLAG_FLUSH
    | ABUSE_FLAG_FUA
    | ABUSE_FLAG_DISCARD
    | ABUSE_FLAG_WRITE_ZEROES
    | ABUSE_FLAG_DELEGATED;
/// Reported by GET_STATUS: the device is configured (SET_STATUS succeeded).
/// SET_STATUS ignores it, so a GET_STATUS result can be passed back.
pub const ABUSE_FLAG_CONFIGURED: u32 = 1 << 16;
/// Flags only GET_STATUS reports; SET_STATUS ignores them.
pub const ABUSE_FLAG_REPORTED: u32 = ABUSE_FLAG_CONFIGURED;

// Request commands: [`AbuseBio::cmd`].
pub const ABUSE_CMD_READ: u16 = 0;
pub const ABUSE_CMD_WRITE: u16 = 1;
pub const ABUSE_CMD_FLUSH: u16 = 2;
pub const ABUSE_CMD_DISCARD: u16 = 3;
pub const ABUSE_CMD_WRITE_ZEROES: u16 = 4;

// Request flags: [`AbuseBio::flags`].
/// The write must be durable before it is completed.
pub const ABUSE_BIO_FUA: u16 = 1 << 0;
/// The request was fetched before, by a server that died or timed out.
pub const ABUSE_BIO_REQUEUED: u16 = 1 << 1;
/// WRITE_ZEROES: the server must not deallocate the range.
pub const ABUSE_BIO_NOUNMAP: u16 = 1 << 2;
/// PUT_BIO: a failure result carries a positive errno in [`AbuseBio::error`]
/// (ENOSPC, EOPNOTSUPP, ENODATA, ...), which the filesystem above sees as
/// the matching block status. Without it a failure is an I/O error.
pub const ABUSE_BIO_ERRNO: u16 = 1 << 3;
/// PUT_BIO of a successful READ: its data is all zeroes (a hole). The
/// driver fills the request with zeroes and reads nothing from `addr`, so
/// the server neither writes the zeroes nor has them copied (as an NBD
/// server answers a hole without sending it). Only with READ and OKAY;
/// since protocol version 4.
pub const ABUSE_BIO_ZEROES: u16 = 1 << 4;
/// PUT_BIO of a successful READ or WRITE: the driver moves the data itself
/// between the request and the server's file descriptor [`AbuseBio::error`]
/// at byte offset [`AbuseBio::addr`] (read from the file into a READ,
/// written from a WRITE to it, as loop does with its backing file; a FUA
/// WRITE is synced), in the caller's context: one copy, none through the
/// server's memory. A READ past the file's end reads zeroes; a failing
/// file operation completes the request with its errno. Refused, the
/// request staying fetched: an fd that is not open (EBADF) or not for the
/// direction (EBADF), a file the operation is invalid on or that is an
/// ABUSE device (EINVAL). Only with READ or WRITE and OKAY; since protocol
/// version 5.
pub const ABUSE_BIO_FILE: u16 = 1 << 5;

// Fetch flags: [`AbuseXfer::flags`] of GET_BIO, [`AbuseServe::flags`].
/// Fetch descriptors only: no payload is placed in the data buffer and
/// every `addr` is 0; a WRITE's data stays in the request until a PUT
/// moves it with [`ABUSE_BIO_FILE`] (or fails it). For servers whose
/// storage is a file the driver can reach. Since protocol version 5.
pub const ABUSE_XFER_DESCRIPTORS: u32 = 1 << 0;

// Request results: [`AbuseBio::result`] in PUT_BIO.
/// The request succeeded.
pub const ABUSE_RESULT_OKAY: u32 = 0;
/// The request failed with an I/O error; the device carries on.
pub const ABUSE_RESULT_MEDIA_FAILURE: u32 = 1;
/// The device is broken: every outstanding request fails.
pub const ABUSE_RESULT_DEVICE_FAILURE: u32 = 2;

// Limits.
pub const ABUSE_MIN_BLOCK_SIZE: u32 = 512;
pub const ABUSE_MAX_BLOCK_SIZE: u32 = 4096;
pub const ABUSE_DEFAULT_QUEUE_DEPTH: u32 = 128;
/// The largest queue depth (per hardware queue).
pub const ABUSE_MAX_QUEUE_DEPTH: u32 = 1024;
/// The most hardware queues a device can have (also at most the kernel's
/// possible CPUs: GET_STATUS reports the limit in `max_queues`).
pub const ABUSE_MAX_QUEUES: u32 = 32;
/// Largest number of requests one GET_BIO or PUT_BIO handles.
pub const ABUSE_MAX_BATCH: u32 = 256;
/// Largest data payload of one request.
pub const ABUSE_MAX_BIO_BYTES: u32 = 1 << 20;
/// GET_BIO places each payload at an offset of the data buffer aligned to
/// this, so a server with a page-aligned buffer can use O_DIRECT.
pub const ABUSE_DATA_ALIGN: u32 = 4096;
/// The request timeout abusectl uses when none is given (0 means never).
pub const ABUSE_DEFAULT_TIMEOUT_MS: u32 = 30_000;
/// The shortest request timeout SET_STATUS accepts (other than 0).
pub const ABUSE_MIN_TIMEOUT_MS: u32 = 1000;
/// The largest device: every byte offset, and offset + length, fits an
/// `off_t` (i64), so no sector arithmetic in the kernel or a server overflows.
pub const ABUSE_MAX_SIZE: u64 = (i64::MAX as u64) & !(ABUSE_MAX_BLOCK_SIZE as u64 - 1);
/// Largest errno a PUT_BIO may carry (the kernel's MAX_ERRNO).
pub const ABUSE_MAX_ERRNO: u32 = 4095;
/// Device sectors are always 512 bytes, whatever the block size.
pub const ABUSE_SECTOR_SHIFT: u32 = 9;

/// GET_STATUS / SET_STATUS argument.
///
/// SET_STATUS reads `size`, `block_size`, `queue_depth`, `flags` and
/// `timeout_ms`, ignores the fields and flags GET_STATUS reports (so a
/// GET_STATUS result with RECONNECT added is a valid SET_STATUS), and
/// requires `reserved` to be zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AbuseStatus {
    /// Capacity in bytes; a multiple of `block_size`.
    pub size: u64,
    /// Logical block size: 512..=4096, a power of two.
    pub block_size: u32,
    /// Requests the kernel lets be outstanding at once on each hardware
    /// queue (pending or fetched); more wait in the block layer.
    pub queue_depth: u32,
    /// `ABUSE_FLAG_*`.
    pub flags: u32,
    /// A fetched request not completed within this gets the process that
    /// fetched it killed (its requests are handed out again once its file is
    /// released); 0 = never, else at least [`ABUSE_MIN_TIMEOUT_MS`].
    pub timeout_ms: u32,
    /// Reported: the device index N of /dev/abuseN and /dev/abctlN.
    pub index: u32,
    /// Reported: the largest request payload in bytes.
    pub max_bytes: u32,
    /// Reported: dev_t of /dev/abuseN (glibc `makedev` encoding).
    pub dev: u64,
    /// Reported: the largest `count` of one GET_BIO/PUT_BIO.
    pub max_batch: u32,
    /// Reported: [`ABUSE_VERSION`].
    pub version: u32,
    /// Reported: requests queued, not yet fetched.
    pub pending: u32,
    /// Reported: requests fetched, not yet completed.
    pub in_flight: u32,
    /// Reported: requests completed since setup (any result).
    pub completed: u64,
    /// Reported: requests completed with an error (failure results, RESET).
    pub errors: u64,
    /// Reported: requests handed out again (their file was released).
    pub requeues: u64,
    /// Reported: fetched requests that passed the timeout (their fetching
    /// process was killed).
    pub timeouts: u64,
    /// Reported: the configuration's generation. It changes on every
    /// SET_STATUS that configures the device and on every RESET, so a server
    /// can tell that the device was reset or reconfigured under it.
    pub generation: u64,
    /// Hardware queues (blk-mq): each has its own lock, pending FIFO and
    /// wait queue, and takes the requests of some CPUs. SET_STATUS: 0 means
    /// one per online CPU (at most `max_queues`).
    pub queues: u32,
    /// Reported: the most `queues` SET_STATUS accepts.
    pub max_queues: u32,
    /// With [`ABUSE_FLAG_DELEGATED`]: the user (a uid of the initial user
    /// namespace) who may serve the device; else zero.
    pub owner_uid: u32,
    /// With [`ABUSE_FLAG_DELEGATED`]: the group abusectl gives the control
    /// node (the driver checks the uid only); else zero.
    pub owner_gid: u32,
    /// Must be zero.
    pub reserved: [u64; 5],
}

/// One request, as GET_BIO hands it out and PUT_BIO completes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AbuseBio {
    /// Opaque id: names this request in this generation only.
    pub id: u64,
    /// First sector (512 bytes each).
    pub sector: u64,
    /// User address of the payload. GET_BIO sets it inside the data buffer:
    /// a WRITE's data was copied there, a READ's space is reserved there.
    /// PUT_BIO copies a READ's data from it.
    pub addr: u64,
    /// Length in bytes (0 for FLUSH).
    pub len: u32,
    /// `ABUSE_CMD_*`.
    pub cmd: u16,
    /// `ABUSE_BIO_*`.
    pub flags: u16,
    /// PUT_BIO: `ABUSE_RESULT_*`.
    pub result: u32,
    /// PUT_BIO with [`ABUSE_BIO_ERRNO`] and a failure result: a positive
    /// errno (1..=[`ABUSE_MAX_ERRNO`]); with [`ABUSE_BIO_FILE`]: the file
    /// descriptor. Otherwise zero.
    pub error: u32,
}

/// GET_BIO / PUT_BIO argument: a batch of requests.
///
/// GET_BIO fetches up to `count` pending requests into `bios`, copying WRITE
/// payloads into `data`; it stops early when the next payload does not fit.
/// PUT_BIO completes `bios[0..count]` in order and stops at the first entry
/// that fails. Both write back in `count` how many they handled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AbuseXfer {
    /// User address of an array of [`AbuseBio`].
    pub bios: u64,
    /// GET_BIO: user address of the data buffer. PUT_BIO: unused.
    pub data: u64,
    /// GET_BIO: size of the data buffer in bytes. PUT_BIO: unused.
    pub data_len: u64,
    /// In: entries in `bios`. Out: requests fetched or completed.
    pub count: u32,
    /// GET_BIO: 0 or [`ABUSE_XFER_DESCRIPTORS`]. PUT_BIO: zero.
    pub flags: u32,
    /// Must be zero.
    pub reserved: [u64; 4],
}

/// ABUSE_SERVE argument: completes a batch and fetches the next in one call.
///
/// First completes `bios[0..put]` in order as PUT_BIO does (stopping at the
/// first entry that fails), then fetches up to `count` pending requests into
/// `bios` (from `queue`'s FIFO first, then the others), as GET_BIO does.
/// When none is pending it sleeps up to `wait_ms`, woken (one sleeper per
/// new request) when one is queued; a signal or the timeout ends the sleep
/// with none fetched, which is not an error. If the first pending
/// request's payload cannot fit `data` at all, it fails with EINVAL and
/// wakes another sleeper for that request. It writes back in `put` how
/// many completed and in `count` how many it fetched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AbuseServe {
    /// User address of an array of [`AbuseBio`] of `count` entries.
    pub bios: u64,
    /// User address of the data buffer.
    pub data: u64,
    /// Size of the data buffer in bytes.
    pub data_len: u64,
    /// In: entries of `bios` to complete. Out: how many completed.
    pub put: u32,
    /// In: room in `bios` for fetched requests. Out: how many fetched.
    pub count: u32,
    /// The hardware queue to fetch from first and to sleep on (taken
    /// modulo the device's queues): a locality hint, never a session.
    pub queue: u32,
    /// How long to sleep when nothing is pending (0: do not sleep).
    pub wait_ms: u32,
    /// 0 or [`ABUSE_XFER_DESCRIPTORS`] (for the fetch).
    pub flags: u32,
    /// Must be zero.
    pub reserved0: u32,
    /// Must be zero.
    pub reserved: [u64; 2],
}

// The Linux ioctl encoding (asm-generic, as on x86 and arm64).
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (ABUSE_IOC_TYPE << 8) | nr
}

/// Read the device's configuration and counters.
pub const ABUSE_GET_STATUS: u32 = ioc(IOC_READ, 0x20, core::mem::size_of::<AbuseStatus>());
/// Configure the device.
pub const ABUSE_SET_STATUS: u32 = ioc(IOC_WRITE, 0x21, core::mem::size_of::<AbuseStatus>());
/// Fail everything outstanding and unconfigure the device.
pub const ABUSE_RESET: u32 = ioc(IOC_NONE, 0x23, 0);
/// Fetch a batch of pending requests (non-blocking; ENOMSG when none).
pub const ABUSE_GET_BIO: u32 = ioc(
    IOC_READ | IOC_WRITE,
    0x24,
    core::mem::size_of::<AbuseXfer>(),
);
/// Complete a batch of fetched requests.
pub const ABUSE_PUT_BIO: u32 = ioc(
    IOC_READ | IOC_WRITE,
    0x25,
    core::mem::size_of::<AbuseXfer>(),
);

/// Complete a batch and fetch the next, sleeping if none is pending.
pub const ABUSE_SERVE: u32 = ioc(
    IOC_READ | IOC_WRITE,
    0x26,
    core::mem::size_of::<AbuseServe>(),
);

// Layout is ABI: a change here must be a deliberate version bump.
const _: () = assert!(core::mem::size_of::<AbuseStatus>() == 152);
const _: () = assert!(core::mem::size_of::<AbuseBio>() == 40);
const _: () = assert!(core::mem::size_of::<AbuseXfer>() == 64);
const _: () = assert!(core::mem::size_of::<AbuseServe>() == 64);
