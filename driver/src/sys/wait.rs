// SPDX-License-Identifier: GPL-2.0
//! A wait queue that `poll()` can register on (6.12's `CondVar` keeps its
//! queue private and has no poll support).

use super::PollTable;
use kernel::{bindings, prelude::*, sync::LockClassKey, types::Opaque};

/// A `wait_queue_head_t`.
#[pin_data]
pub(crate) struct WaitQueue {
    #[pin]
    head: Opaque<bindings::wait_queue_head>,
}

// SAFETY: a wait queue head is designed to be used from any thread; all access
// goes through the kernel's own locking.
unsafe impl Send for WaitQueue {}
// SAFETY: as above.
unsafe impl Sync for WaitQueue {}

impl WaitQueue {
    /// Initialises a wait queue in place.
    pub(crate) fn new(name: &'static kernel::str::CStr, key: &'static LockClassKey) -> impl PinInit<Self> {
        pin_init!(Self {
            // SAFETY: `__init_waitqueue_head` initialises the head at `slot`,
            // which is pinned, so it may hold pointers to itself.
            head <- unsafe {
                Opaque::ffi_init(|slot| {
                    bindings::__init_waitqueue_head(slot, name.as_char_ptr(), super::lock_class_ptr(key))
                })
            },
        })
    }

    /// Whether any task waits here (`waitqueue_active`). Call after a full
    /// barrier that orders the caller's preceding store (a queued request)
    /// before the check, pairing with the barrier a sleeper has between
    /// registering and checking for work: one of the two sees the other.
    pub(crate) fn has_waiters(&self) -> bool {
        let head = self.head.get();
        // SAFETY: `head` is initialised; reading the list's first pointer
        // without the lock is what C's `waitqueue_active` does (READ_ONCE).
        let (first, list) = unsafe { (core::ptr::read_volatile(&raw const (*head).head.next), &raw mut (*head).head) };
        !core::ptr::eq(first, list)
    }

    /// Wakes every non-exclusive waiter (pollers) and one exclusive sleeper;
    /// returns whether a sleeper was woken.
    pub(crate) fn wake_one(&self) -> bool {
        // SAFETY: `head` was initialised by `new` and lives as long as `self`.
        let woken = unsafe {
            bindings::__wake_up(self.head.get(), bindings::TASK_INTERRUPTIBLE, 1, core::ptr::null_mut())
        };
        woken > 0
    }

    /// Sleeps (interruptibly, as an exclusive waiter: one wake-up wakes one
    /// sleeper) until woken, a signal, `timeout` jiffies pass, or `ready()`
    /// holds when checked after registering.
    pub(crate) fn sleep_exclusive(&self, timeout: u64, ready: impl Fn() -> bool) {
        let entry = Opaque::<bindings::wait_queue_entry>::uninit();
        let e = entry.get();
        // SAFETY: `e` points to a local entry; `init_wait_entry` fills it
        // (autoremove: a wake-up takes it off the queue, so the next wake-up
        // goes to the next sleeper). It does not move before `finish_wait`
        // takes it off the queue, below, on every path.
        unsafe { bindings::init_wait_entry(e, 0) };
        // SAFETY: `head` is live; `e` initialised above. This sets the task
        // state with a full barrier, so `ready()` below cannot miss a
        // request queued before a waker's `has_waiters()` check.
        unsafe { bindings::prepare_to_wait_exclusive(self.head.get(), e, bindings::TASK_INTERRUPTIBLE as i32) };
        if !ready() && !kernel::current!().signal_pending() {
            let t = timeout.min(isize::MAX as u64 - 1) as isize;
            // SAFETY: sleeping is allowed here: ioctl context, no lock held.
            unsafe { bindings::schedule_timeout(t) };
        }
        // SAFETY: `e` was added by `prepare_to_wait_exclusive` (or removed
        // by a wake-up): `finish_wait` handles both and sets TASK_RUNNING.
        unsafe { bindings::finish_wait(self.head.get(), e) };
    }

    /// Wakes every interruptible waiter (pollers and sleepers).
    pub(crate) fn wake_all(&self) {
        // SAFETY: `head` was initialised by `new` and lives as long as `self`.
        unsafe {
            bindings::__wake_up(self.head.get(), bindings::TASK_INTERRUPTIBLE, 0, core::ptr::null_mut())
        };
    }

    /// `poll_wait()`: registers the polling task on this queue.
    pub(crate) fn register(&self, table: &PollTable) {
        table.wait_on(self.head.get());
    }
}
