// SPDX-License-Identifier: GPL-2.0
//! One ABUSE device: the block device /dev/abuseN and the state its control
//! node /dev/abctlN works on.

use crate::sys::{
    blk::{BlockDevice, DiskConfig, QueueOps, Request, Status},
    chrdev::encode_dev,
    wait::WaitQueue,
    PollTable,
};
use crate::uapi::*;
use kernel::{c_str, new_spinlock, prelude::*, sync::{Arc, SpinLock}};

/// What SET_STATUS configured (all zero while unconfigured).
#[derive(Clone, Copy, Default)]
pub struct Config {
    pub size: u64,
    pub block_size: u32,
    pub queue_depth: u32,
    pub flags: u32,
    pub timeout_ms: u32,
}

/// Counters reported by GET_STATUS.
#[derive(Clone, Copy, Default)]
struct Counters {
    completed: u64,
    errors: u64,
    requeues: u64,
    timeouts: u64,
}

struct State {
    config: Option<Config>,
    counters: Counters,
}

/// The part of a device the block layer calls into (its queue data).
#[pin_data]
pub struct Queue {
    #[pin]
    state: SpinLock<State>,
    #[pin]
    waiters: WaitQueue,
}

impl Queue {
    fn new() -> impl PinInit<Self, Error> {
        try_pin_init!(Self {
            state <- new_spinlock!(State { config: None, counters: Counters::default() }, "abuse_state"),
            waiters <- WaitQueue::new(c_str!("abuse_waiters"), kernel::static_lock_class!()),
        })
    }
}

impl QueueOps for Queue {
    fn queue_rq(&self, rq: Request) {
        // Requests reach an unconfigured device only in a race with RESET
        // (its capacity is 0); they fail.
        let mut state = self.state.lock();
        state.counters.completed += 1;
        state.counters.errors += 1;
        drop(state);
        rq.end(Status::IoErr);
    }

    fn timeout(&self, _tag: u32) {}
}

/// /dev/abuseN with its queue.
pub struct Device {
    index: u32,
    queue: Arc<Queue>,
    disk: BlockDevice<Queue>,
}

impl Device {
    /// Creates /dev/abuseN (capacity 0) for device `index`.
    pub fn new(index: u32, major: u32, minors: u32) -> Result<Arc<Self>> {
        let queue = Arc::pin_init(Queue::new(), GFP_KERNEL)?;
        let cfg = DiskConfig {
            major,
            minors,
            queue_depth: ABUSE_MAX_QUEUE_DEPTH,
            max_bytes: ABUSE_MAX_BIO_BYTES,
        };
        let disk = BlockDevice::new(&cfg, "abuse", index, queue.clone())?;
        Ok(Arc::new(Self { index, queue, disk }, GFP_KERNEL)?)
    }

    /// ABUSE_GET_STATUS.
    pub fn status(&self) -> AbuseStatus {
        let state = self.queue.state.lock();
        let cfg = state.config.unwrap_or_default();
        let c = state.counters;
        drop(state);
        AbuseStatus {
            size: cfg.size,
            block_size: if cfg.block_size == 0 { ABUSE_MIN_BLOCK_SIZE } else { cfg.block_size },
            queue_depth: cfg.queue_depth,
            flags: cfg.flags | if cfg.size != 0 { ABUSE_FLAG_CONFIGURED } else { 0 },
            timeout_ms: cfg.timeout_ms,
            index: self.index,
            max_bytes: ABUSE_MAX_BIO_BYTES,
            dev: encode_dev(self.disk.devt()),
            max_batch: ABUSE_MAX_BATCH,
            version: ABUSE_VERSION,
            pending: 0,
            in_flight: 0,
            completed: c.completed,
            errors: c.errors,
            requeues: c.requeues,
            timeouts: c.timeouts,
            reserved: [0; 8],
        }
    }

    /// `poll()`: readable while requests are pending.
    pub fn poll(&self, table: &PollTable) -> u32 {
        self.queue.waiters.register(table);
        0
    }
}
