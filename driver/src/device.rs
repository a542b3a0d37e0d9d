// SPDX-License-Identifier: GPL-2.0
//! One ABUSE device: /dev/abuseN, its queue, and its configuration.

use crate::queue::Live;
use crate::requests::Requests;
use crate::sys::{
    blk::{BlockDevice, DiskConfig, Limits},
    chrdev::encode_dev,
    capable_sys_admin, current_fsuid, msecs_to_jiffies, online_cpus, possible_cpus, ModuleRef, PollTable,
};
use crate::uapi::*;
use core::sync::atomic::{AtomicU64, Ordering};
use kernel::{new_mutex, prelude::*, sync::{Arc, Mutex}};

/// Marks `Device::access` as delegated (uid 0 is a uid like any other).
const DELEGATE: u64 = 1 << 32;
/// Where `Device::access` keeps the configuration's generation.
const GEN_SHIFT: u32 = 33;
/// The generation bits an ioctl is pinned to (31).
const GEN_MASK: u64 = (1 << 31) - 1;

/// Who may serve the device, and under which configuration: an ioctl
/// reads both at once when it starts, and is pinned to that generation.
fn access_word(generation: u64, delegate: Option<u32>) -> u64 {
    ((generation & GEN_MASK) << GEN_SHIFT) | delegate.map_or(0, |uid| DELEGATE | uid as u64)
}

/// blk-mq's timer period when requests never time out (it must tick anyway).
const IDLE_TIMER_MS: u32 = 30_000;

/// What SET_STATUS configured.
#[derive(Clone, Copy)]
struct Config {
    size: u64,
    block_size: u32,
    queue_depth: u32,
    queues: u32,
    flags: u32,
    timeout_ms: u32,
    owner_uid: u32,
    owner_gid: u32,
}

struct Setup {
    config: Option<Config>,
    /// Changes on every configure and RESET (reported by GET_STATUS).
    generation: u64,
    /// A configured device keeps the module loaded.
    _pin: Option<ModuleRef>,
}

/// /dev/abuseN with its queue.
#[pin_data]
pub(crate) struct Device {
    index: u32,
    partitions: bool,
    requests: Arc<Requests>,
    disk: BlockDevice<Requests>,
    /// The configuration's generation (low 31 bits) and, while the device
    /// is delegated to `uid`, `DELEGATE | uid` (see `access_word`): read
    /// without a lock at the start of every ioctl.
    access: AtomicU64,
    /// Serialises SET_STATUS and RESET (they sleep: queue freezes, limits).
    #[pin]
    setup: Mutex<Setup>,
}

/// Whether a SET_STATUS's flags and reserved fields are acceptable: only
/// settable flags, besides those GET_STATUS reports (ignored, so that a
/// GET_STATUS result can be passed back).
fn known_fields(st: &AbuseStatus) -> bool {
    let owner_ok = st.flags & ABUSE_FLAG_DELEGATED != 0 || (st.owner_uid, st.owner_gid) == (0, 0);
    st.reserved == [0; 5] && st.flags & !(ABUSE_FLAG_SETTABLE | ABUSE_FLAG_REPORTED) == 0 && owner_ok
}

/// One hardware queue per online CPU, at most `max`.
fn default_queues(max: u32) -> u32 {
    online_cpus().clamp(1, max)
}

/// A request timeout: 0 (never) or at least the minimum.
fn valid_timeout(ms: u32) -> bool {
    ms == 0 || ms >= ABUSE_MIN_TIMEOUT_MS
}

/// What the data path needs of a configuration.
fn live(cfg: &Config, generation: u64) -> Live {
    Live {
        generation: (generation & GEN_MASK) as u32,
        flags: cfg.flags,
        sectors: cfg.size >> ABUSE_SECTOR_SHIFT,
        timeout_ms: cfg.timeout_ms,
        timeout_jiffies: msecs_to_jiffies(cfg.timeout_ms),
        depth: cfg.queue_depth,
    }
}

/// Checks a SET_STATUS request for a fresh setup of a device that can have
/// up to `max_queues` hardware queues.
fn validate(st: &AbuseStatus, max_queues: u32) -> Result {
    let bs = st.block_size;
    let ok = known_fields(st)
        && bs.is_power_of_two()
        && (ABUSE_MIN_BLOCK_SIZE..=ABUSE_MAX_BLOCK_SIZE).contains(&bs)
        && st.size > 0
        && st.size <= ABUSE_MAX_SIZE
        && st.size % bs as u64 == 0
        && (1..=ABUSE_MAX_QUEUE_DEPTH).contains(&st.queue_depth)
        && valid_timeout(st.timeout_ms)
        && st.queues <= max_queues
        // FUA means "write through the cache": it needs one (FLUSH).
        && (st.flags & ABUSE_FLAG_FUA == 0 || st.flags & ABUSE_FLAG_FLUSH != 0);
    if ok { Ok(()) } else { Err(EINVAL) }
}

impl Device {
    /// Creates /dev/abuseN (capacity 0) for device `index`.
    pub(crate) fn new(index: u32, major: u32, minors: u32) -> Result<Arc<Self>> {
        let max = possible_cpus().clamp(1, ABUSE_MAX_QUEUES);
        let active = default_queues(max);
        let requests = Arc::new(Requests::new(index, max, active, ABUSE_MAX_QUEUE_DEPTH)?, GFP_KERNEL)?;
        let cfg = DiskConfig {
            major,
            minors,
            hw_queues: active,
            queue_depth: ABUSE_MAX_QUEUE_DEPTH,
            max_bytes: ABUSE_MAX_BIO_BYTES,
        };
        let disk = BlockDevice::new(&cfg, "abuse", index, requests.clone())?;
        Arc::pin_init(
            try_pin_init!(Self {
                index,
                partitions: minors > 1,
                requests,
                disk,
                access: AtomicU64::new(0),
                setup <- new_mutex!(Setup { config: None, generation: 0, _pin: None }, "abuse_setup"),
            }),
            GFP_KERNEL,
        )
    }

    pub(crate) fn requests(&self) -> &Requests {
        &self.requests
    }

    /// The block major of every ABUSE device.
    pub(crate) fn major(&self) -> u32 {
        crate::sys::chrdev::major(self.disk.devt())
    }

    /// Whether the device is delegated to the (global) user `uid`.
    pub(crate) fn delegated_to(&self, uid: u32) -> bool {
        self.access.load(Ordering::Acquire) & (DELEGATE | u32::MAX as u64) == DELEGATE | uid as u64
    }

    /// Checks that the caller may serve the device (`serving`: fetch,
    /// complete, status) or do anything with it, and returns the
    /// configuration generation it is pinned to: it never touches a
    /// request of a later configuration. The delegation is checked first,
    /// so a delegated server is never an audited `capable()` denial.
    pub(crate) fn pin(&self, serving: bool) -> Result<u32> {
        let access = self.access.load(Ordering::Acquire);
        let gen = ((access >> GEN_SHIFT) & GEN_MASK) as u32;
        let delegated = access & (DELEGATE | u32::MAX as u64) == DELEGATE | current_fsuid() as u64;
        if (serving && delegated) || capable_sys_admin() {
            Ok(gen)
        } else {
            Err(EPERM)
        }
    }

    /// ABUSE_GET_STATUS.
    pub(crate) fn status(&self) -> AbuseStatus {
        let (cfg, generation) = {
            let setup = self.setup.lock();
            (setup.config, setup.generation)
        };
        let (pending, in_flight, c) = self.requests.snapshot();
        let mut st = AbuseStatus {
            block_size: ABUSE_MIN_BLOCK_SIZE,
            index: self.index,
            max_bytes: ABUSE_MAX_BIO_BYTES,
            dev: encode_dev(self.disk.devt()),
            max_batch: ABUSE_MAX_BATCH,
            version: ABUSE_VERSION,
            pending,
            in_flight,
            completed: c.completed,
            errors: c.errors,
            requeues: c.requeues,
            timeouts: c.timeouts,
            generation,
            queues: self.disk.hw_queues(),
            max_queues: self.requests.max(),
            ..Default::default()
        };
        if let Some(cfg) = cfg {
            st.size = cfg.size;
            st.block_size = cfg.block_size;
            st.queue_depth = cfg.queue_depth;
            st.flags = cfg.flags | ABUSE_FLAG_CONFIGURED;
            st.timeout_ms = cfg.timeout_ms;
            st.owner_uid = cfg.owner_uid;
            st.owner_gid = cfg.owner_gid;
        }
        st
    }

    /// ABUSE_SET_STATUS.
    pub(crate) fn set_status(&self, st: &AbuseStatus) -> Result {
        let mut setup = self.setup.lock();
        if let Some(cur) = setup.config {
            return self.reconnect(&mut setup, cur, st);
        }
        validate(st, self.requests.max())?;
        if self.disk.openers() > 0 {
            // Held open from the previous configuration (a filesystem
            // mounted across RESET): it must not see the new one.
            return Err(EBUSY);
        }
        let pin = ModuleRef::get().ok_or(ENODEV)?;
        let flags = st.flags & !(ABUSE_FLAG_RECONNECT | ABUSE_FLAG_REPORTED);
        // Unconfigured, so nothing is in flight: the freeze is immediate.
        let queues = if st.queues == 0 { default_queues(self.requests.max()) } else { st.queues };
        self.disk.set_hw_queues(queues);
        self.requests.set_active(self.disk.hw_queues());
        self.disk.set_limits(&Limits {
            block_size: st.block_size,
            max_bytes: ABUSE_MAX_BIO_BYTES,
            write_cache: flags & ABUSE_FLAG_FLUSH != 0,
            fua: flags & ABUSE_FLAG_FUA != 0,
            discard: flags & ABUSE_FLAG_DISCARD != 0,
            write_zeroes: flags & ABUSE_FLAG_WRITE_ZEROES != 0,
        })?;
        let timer_ms = if st.timeout_ms == 0 { IDLE_TIMER_MS } else { (st.timeout_ms / 2).max(1) };
        self.disk.set_timeout(msecs_to_jiffies(timer_ms) as u32);
        self.disk.set_read_only(flags & ABUSE_FLAG_READ_ONLY != 0);
        let cfg = Config {
            size: st.size,
            block_size: st.block_size,
            queue_depth: st.queue_depth,
            queues: self.disk.hw_queues(),
            flags,
            timeout_ms: st.timeout_ms,
            owner_uid: st.owner_uid,
            owner_gid: st.owner_gid,
        };
        let generation = setup.generation + 1;
        self.requests.set_live(Some(live(&cfg, generation)));
        let delegate = (flags & ABUSE_FLAG_DELEGATED != 0).then_some(st.owner_uid);
        self.access.store(access_word(generation, delegate), Ordering::Release);
        let sectors = st.size >> ABUSE_SECTOR_SHIFT;
        // A new medium, as loop does on configure: new disk sequence number,
        // media-change event, nothing cached from before.
        self.disk.media_changed();
        self.disk.set_capacity(sectors);
        if self.partitions {
            // Scanned on the next open: reading the table needs a server.
            self.disk.request_partition_scan();
        }
        self.disk.uevent_change();
        setup.config = Some(cfg);
        setup.generation = generation;
        setup._pin = Some(pin);
        Ok(())
    }

    /// SET_STATUS on a configured device: with RECONNECT, only read-only and
    /// the queue depth change; every other field must be 0 or unchanged. A
    /// smaller depth than the requests held applies as they complete.
    fn reconnect(&self, setup: &mut Setup, cur: Config, st: &AbuseStatus) -> Result {
        if st.flags & ABUSE_FLAG_RECONNECT == 0 {
            return Err(EBUSY);
        }
        let same = |new: u64, old: u64| new == 0 || new == old;
        let fixed = ABUSE_FLAG_SETTABLE & !(ABUSE_FLAG_READ_ONLY | ABUSE_FLAG_RECONNECT);
        let ok = known_fields(st)
            && same(st.size, cur.size)
            && same(st.block_size.into(), cur.block_size.into())
            && same(st.timeout_ms.into(), cur.timeout_ms.into())
            && same(st.queues.into(), cur.queues.into())
            && same(st.owner_uid.into(), cur.owner_uid.into())
            && same(st.owner_gid.into(), cur.owner_gid.into())
            && st.flags & fixed == cur.flags & fixed
            && st.queue_depth <= ABUSE_MAX_QUEUE_DEPTH;
        if !ok {
            return Err(EINVAL);
        }
        let depth = if st.queue_depth == 0 { cur.queue_depth } else { st.queue_depth };
        let flags = (cur.flags & !ABUSE_FLAG_READ_ONLY) | (st.flags & ABUSE_FLAG_READ_ONLY);
        self.disk.set_read_only(flags & ABUSE_FLAG_READ_ONLY != 0);
        let cfg = Config { queue_depth: depth, flags, ..cur };
        self.requests.set_live(Some(live(&cfg, setup.generation)));
        setup.config = Some(cfg);
        Ok(())
    }

    /// ABUSE_RESET: fail everything, unconfigure. Harmless when
    /// unconfigured. Cannot fail, and waits for no server: what servers
    /// hold is failed where it is (see `queue`).
    pub(crate) fn reset(&self) {
        let mut setup = self.setup.lock();
        if setup.config.is_none() {
            return;
        }
        // The delegated user loses the device, and every ioctl started
        // under this configuration its pin, first; then nothing new
        // arrives while failing.
        self.access.store(access_word(setup.generation + 1, None), Ordering::Release);
        self.requests.set_live(None);
        self.requests.fail_all(None);
        // Nothing of this configuration stays visible (as loop's clear):
        // page cache dropped and capacity 0, udev told, a filesystem still
        // mounted shut down (its writes fail: the queue is not live), the
        // partitions dropped.
        self.disk.invalidate();
        self.disk.set_read_only(false);
        self.disk.uevent_change();
        self.disk.media_changed();
        if self.partitions {
            // Capacity is 0: dropping the partitions reads nothing. Fails
            // (EBUSY) while a partition is open; the stale partition then
            // reads nothing past capacity 0, and the next setup rescans.
            let _ = self.disk.rescan_partitions();
        }
        setup.config = None;
        setup.generation += 1;
        setup._pin = None;
    }

    /// `poll()`.
    pub(crate) fn poll(&self, table: &PollTable) -> u32 {
        self.requests.poll(table)
    }
}
