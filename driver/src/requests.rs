// SPDX-License-Identifier: GPL-2.0
//! A device's hardware queues, and the rule that wakes servers for them.
//!
//! blk-mq queues a request on the hardware queue of the submitting CPU;
//! each queue has its own lock, FIFO and wait queue, so CPUs queueing and
//! servers fetching on different queues share nothing. Any server may
//! still fetch from any queue: its queue index is a hint for locality.
//!
//! Wake-one without loss: a new request wakes one exclusive sleeper of its
//! own queue, or, if that queue has none, of the next queue that has one.
//! A sleeper registers on its queue before it checks every queue for work
//! (their pending counts, read without their locks), and a waker checks
//! for sleepers after queueing (with full barriers on both sides), so a
//! request queued while a server goes to sleep is either seen by the server
//! or wakes it.

use crate::queue::{Counters, Live, Queue, Timeout};
use crate::sys::blk::{NewRequest, QueueOps};
use crate::sys::{poll_events, PollTable};
use core::sync::atomic::{fence, AtomicU32, Ordering};
use kernel::prelude::*;

/// Every hardware queue a device can have, of which `active` are in use.
pub(crate) struct Requests {
    queues: KVec<Pin<KBox<Queue>>>,
    /// How many hardware queues blk-mq uses (changed only while the device
    /// is unconfigured and idle).
    active: AtomicU32,
}

impl Requests {
    /// `max` hardware queues of `depth` tags for device `index`, `active`
    /// of them in use.
    pub(crate) fn new(index: u32, max: u32, active: u32, depth: u32) -> Result<Self> {
        let mut queues = KVec::with_capacity(max as usize, GFP_KERNEL)?;
        for hw in 0..max {
            queues.push(KBox::pin_init(Queue::new(index, hw, depth)?, GFP_KERNEL)?, GFP_KERNEL)?;
        }
        Ok(Self { queues, active: AtomicU32::new(active.clamp(1, max)) })
    }

    /// The most hardware queues this device can use.
    pub(crate) fn max(&self) -> u32 {
        self.queues.len() as u32
    }

    /// The hardware queues in use.
    pub(crate) fn active(&self) -> &[Pin<KBox<Queue>>] {
        let n = self.active.load(Ordering::Acquire) as usize;
        &self.queues[..n.clamp(1, self.queues.len())]
    }

    /// Records how many hardware queues blk-mq now uses.
    pub(crate) fn set_active(&self, n: u32) {
        self.active.store(n.clamp(1, self.max()), Ordering::Release);
    }

    /// Hardware queue `hw`, in use or not (a stale id may name one).
    pub(crate) fn get(&self, hw: u32) -> Option<&Queue> {
        self.queues.get(hw as usize).map(|q| &**q)
    }

    /// The queues in use, starting at `hint` (modulo their number).
    pub(crate) fn from_hint(&self, hint: u32) -> impl Iterator<Item = &Queue> {
        let qs = self.active();
        // `max(1)`: never empty, and the compiler can see it (no
        // division-by-zero panic path, which objtool cannot follow).
        let n = qs.len().max(1);
        let start = hint as usize % n;
        (0..n).map(move |i| &*qs[(start + i) % n])
    }

    /// Starts accepting requests (SET_STATUS) or changes what is accepted,
    /// on every queue.
    pub(crate) fn set_live(&self, live: Option<Live>) {
        for q in self.queues.iter() {
            q.set_live(live);
        }
    }

    /// (pending, in flight) and the counters, summed over the queues.
    pub(crate) fn snapshot(&self) -> (u32, u32, Counters) {
        let (mut pending, mut in_flight, mut sum) = (0, 0, Counters::default());
        for q in self.queues.iter() {
            let (p, f, c) = q.snapshot();
            pending += p;
            in_flight += f;
            sum.completed += c.completed;
            sum.errors += c.errors;
            sum.requeues += c.requeues;
            sum.timeouts += c.timeouts;
        }
        (pending, in_flight, sum)
    }

    /// Whether any queue in use has a pending request.
    pub(crate) fn any_pending(&self) -> bool {
        self.active().iter().any(|q| q.has_pending())
    }

    /// A request became pending on queue `hw`: wakes one sleeping server,
    /// of that queue if it has one, else of another (and the pollers of the
    /// queue it wakes).
    pub(crate) fn wake_for(&self, hw: u32) {
        // Pairs with the barrier in `WaitQueue::sleep_exclusive`.
        fence(Ordering::SeqCst);
        for q in self.from_hint(hw) {
            if q.waiters().has_waiters() && q.waiters().wake_one() {
                return;
            }
        }
    }

    /// Sleeps on queue `hint`'s wait queue for up to `jiffies`, unless a
    /// request is pending on any queue.
    pub(crate) fn sleep(&self, hint: u32, jiffies: u64) {
        let qs = self.active();
        let q = &qs[hint as usize % qs.len().max(1)];
        q.waiters().sleep_exclusive(jiffies, || self.any_pending());
    }

    /// Fails every pending, fetched and moving request (RESET: `pin`
    /// None; DEVICE_FAILURE from a call pinned to configuration `pin`).
    /// Cannot fail.
    pub(crate) fn fail_all(&self, pin: Option<u32>) {
        for q in self.queues.iter() {
            q.fail_all(pin);
        }
    }

    /// The open file `opener` is gone: what it fetched is handed out again.
    pub(crate) fn release(&self, opener: u64) {
        for (hw, q) in self.queues.iter().enumerate() {
            if q.release(opener) {
                self.wake_for(hw as u32);
            }
        }
    }

    /// `poll()`: readable while a request is pending on any queue.
    pub(crate) fn poll(&self, table: &PollTable) -> u32 {
        use poll_events::*;
        for q in self.active() {
            q.waiters().register(table);
        }
        // Pairs with the barrier in `wake_for`: registered before checking.
        fence(Ordering::SeqCst);
        if self.any_pending() { IN | RDNORM | MSG } else { 0 }
    }
}

impl QueueOps for Requests {
    fn queue_rq(&self, hw: u32, rq: NewRequest) -> Result<(), NewRequest> {
        let Some(q) = self.get(hw) else {
            drop(rq);
            return Ok(());
        };
        if q.queue_rq(rq)? {
            self.wake_for(hw);
        }
        Ok(())
    }

    fn timeout(&self, hw: u32, tag: u32) -> bool {
        let Some(q) = self.get(hw) else { return false };
        match q.timeout(tag) {
            Timeout::Kept => false,
            Timeout::Requeued => {
                self.wake_for(hw);
                false
            }
            Timeout::Failed => true,
        }
    }
}
