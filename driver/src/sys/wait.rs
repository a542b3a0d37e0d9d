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
