// SPDX-License-Identifier: GPL-2.0
//! One ABUSE device: /dev/abuseN, its queue, and its configuration.

use crate::queue::{Live, Queue};
use crate::sys::{
    blk::{BlockDevice, DiskConfig, Limits},
    chrdev::encode_dev,
    msecs_to_jiffies, ModuleRef, PollTable,
};
use crate::uapi::*;
use kernel::{new_mutex, prelude::*, sync::{Arc, Mutex}};

/// How long SET_STATUS(RECONNECT) waits for in-flight requests before a
/// queue-depth change gives up with EBUSY.
const DEPTH_CHANGE_WAIT_MS: u32 = 1000;
/// blk-mq's timer period when requests never time out (it must tick anyway).
const IDLE_TIMER_MS: u32 = 30_000;

/// What SET_STATUS configured.
#[derive(Clone, Copy)]
struct Config {
    size: u64,
    block_size: u32,
    queue_depth: u32,
    flags: u32,
    timeout_ms: u32,
}

struct Setup {
    config: Option<Config>,
    /// A configured device keeps the module loaded.
    _pin: Option<ModuleRef>,
}

/// /dev/abuseN with its queue.
#[pin_data]
pub(crate) struct Device {
    index: u32,
    partitions: bool,
    queue: Arc<Queue>,
    disk: BlockDevice<Queue>,
    /// Serialises SET_STATUS and RESET (they sleep: queue freezes, limits).
    #[pin]
    setup: Mutex<Setup>,
}

/// Checks a SET_STATUS request for a fresh setup.
fn validate(st: &AbuseStatus) -> Result {
    let bs = st.block_size;
    let ok = st.reserved == [0; 8]
        && st.flags & !ABUSE_FLAG_SETTABLE == 0
        && bs.is_power_of_two()
        && (ABUSE_MIN_BLOCK_SIZE..=ABUSE_MAX_BLOCK_SIZE).contains(&bs)
        && st.size > 0
        && st.size % bs as u64 == 0
        && (1..=ABUSE_MAX_QUEUE_DEPTH).contains(&st.queue_depth)
        // FUA means "write through the cache": it needs one (FLUSH).
        && (st.flags & ABUSE_FLAG_FUA == 0 || st.flags & ABUSE_FLAG_FLUSH != 0);
    if ok { Ok(()) } else { Err(EINVAL) }
}

impl Device {
    /// Creates /dev/abuseN (capacity 0) for device `index`.
    pub(crate) fn new(index: u32, major: u32, minors: u32) -> Result<Arc<Self>> {
        let queue = Arc::pin_init(Queue::new(ABUSE_MAX_QUEUE_DEPTH)?, GFP_KERNEL)?;
        let cfg = DiskConfig { major, minors, queue_depth: ABUSE_MAX_QUEUE_DEPTH, max_bytes: ABUSE_MAX_BIO_BYTES };
        let disk = BlockDevice::new(&cfg, "abuse", index, queue.clone())?;
        Arc::pin_init(
            try_pin_init!(Self {
                index,
                partitions: minors > 1,
                queue,
                disk,
                setup <- new_mutex!(Setup { config: None, _pin: None }, "abuse_setup"),
            }),
            GFP_KERNEL,
        )
    }

    pub(crate) fn queue(&self) -> &Queue {
        &self.queue
    }

    /// ABUSE_GET_STATUS.
    pub(crate) fn status(&self) -> AbuseStatus {
        let cfg = self.setup.lock().config;
        let (pending, in_flight, c) = self.queue.snapshot();
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
            ..Default::default()
        };
        if let Some(cfg) = cfg {
            st.size = cfg.size;
            st.block_size = cfg.block_size;
            st.queue_depth = cfg.queue_depth;
            st.flags = cfg.flags | ABUSE_FLAG_CONFIGURED;
            st.timeout_ms = cfg.timeout_ms;
        }
        st
    }

    /// ABUSE_SET_STATUS.
    pub(crate) fn set_status(&self, st: &AbuseStatus) -> Result {
        let mut setup = self.setup.lock();
        if let Some(cur) = setup.config {
            return self.reconnect(&mut setup, cur, st);
        }
        validate(st)?;
        let pin = ModuleRef::get().ok_or(ENODEV)?;
        let flags = st.flags & !ABUSE_FLAG_RECONNECT;
        self.disk.set_depth(st.queue_depth, msecs_to_jiffies(DEPTH_CHANGE_WAIT_MS))?;
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
        self.queue.set_live(Some(Live { flags, timeout_jiffies: msecs_to_jiffies(st.timeout_ms) }));
        self.disk.set_capacity(st.size >> ABUSE_SECTOR_SHIFT);
        if self.partitions {
            // Scanned on the next open: reading the table needs a server.
            self.disk.request_partition_scan();
        }
        setup.config = Some(Config {
            size: st.size,
            block_size: st.block_size,
            queue_depth: st.queue_depth,
            flags,
            timeout_ms: st.timeout_ms,
        });
        setup._pin = Some(pin);
        Ok(())
    }

    /// SET_STATUS on a configured device: with RECONNECT, only read-only and
    /// the queue depth change; every other field must be 0 or unchanged.
    fn reconnect(&self, setup: &mut Setup, cur: Config, st: &AbuseStatus) -> Result {
        if st.flags & ABUSE_FLAG_RECONNECT == 0 {
            return Err(EBUSY);
        }
        let same = |new: u64, old: u64| new == 0 || new == old;
        let fixed = ABUSE_FLAG_SETTABLE & !(ABUSE_FLAG_READ_ONLY | ABUSE_FLAG_RECONNECT);
        let ok = st.reserved == [0; 8]
            && st.flags & !ABUSE_FLAG_SETTABLE == 0
            && same(st.size, cur.size)
            && same(st.block_size.into(), cur.block_size.into())
            && same(st.timeout_ms.into(), cur.timeout_ms.into())
            && st.flags & fixed == cur.flags & fixed
            && st.queue_depth <= ABUSE_MAX_QUEUE_DEPTH;
        if !ok {
            return Err(EINVAL);
        }
        let depth = if st.queue_depth == 0 { cur.queue_depth } else { st.queue_depth };
        if depth != cur.queue_depth {
            self.disk.set_depth(depth, msecs_to_jiffies(DEPTH_CHANGE_WAIT_MS))?;
        }
        let flags = (cur.flags & !ABUSE_FLAG_READ_ONLY) | (st.flags & ABUSE_FLAG_READ_ONLY);
        self.disk.set_read_only(flags & ABUSE_FLAG_READ_ONLY != 0);
        self.queue.set_live(Some(Live { flags, timeout_jiffies: msecs_to_jiffies(cur.timeout_ms) }));
        setup.config = Some(Config { queue_depth: depth, flags, ..cur });
        Ok(())
    }

    /// ABUSE_RESET: fail everything, unconfigure. Harmless when unconfigured.
    pub(crate) fn reset(&self) -> Result {
        let mut setup = self.setup.lock();
        if setup.config.is_none() {
            return Ok(());
        }
        // Stop accepting first, so nothing new arrives while failing.
        self.queue.set_live(None);
        self.queue.fail_all()?;
        self.disk.set_capacity(0);
        self.disk.set_read_only(false);
        if self.partitions {
            // Capacity is 0: dropping the partitions reads nothing.
            let _ = self.disk.rescan_partitions();
        }
        setup.config = None;
        setup._pin = None;
        Ok(())
    }

    /// `poll()`.
    pub(crate) fn poll(&self, table: &PollTable) -> u32 {
        self.queue.poll(table)
    }
}
