// SPDX-License-Identifier: GPL-2.0
//! Safe wrappers over the kernel's C API that 6.12's `rust/kernel` lacks.
//!
//! Every `unsafe` block and raw `bindings::` call of the driver lives under
//! this module, the way the kernel's own abstractions are written; the rest
//! of the driver is safe Rust.

pub(crate) mod blk;
pub(crate) mod chrdev;
pub(crate) mod file;
pub(crate) mod param;
mod kabi;
pub(crate) mod user;
pub(crate) mod bounce;
pub(crate) mod wait;

use kernel::bindings;

/// ENOMSG: no request pending (not in `kernel::error::code` in 6.12).
#[allow(non_snake_case)]
pub(crate) fn ENOMSG() -> kernel::error::Error {
    kernel::error::Error::from_errno(-(bindings::ENOMSG as i32))
}

/// ESTALE: a request id from another generation.
#[allow(non_snake_case)]
pub(crate) fn ESTALE() -> kernel::error::Error {
    kernel::error::Error::from_errno(-(bindings::ESTALE as i32))
}

/// A process (thread group) that fetched or is moving requests, held by
/// its thread-group `struct pid`: the timeout fences the whole group
/// (`kill_pid`, as `kill(2)` does), which reaches it even when its leader
/// thread has exited (a signal sent to an exited leader task is dropped).
/// Holding it keeps only the `struct pid`, not the process.
pub(crate) struct Process(core::ptr::NonNull<bindings::pid>);

// SAFETY: a `struct pid` reference may be used and dropped from any thread.
unsafe impl Send for Process {}
// SAFETY: the methods only read fields fixed for the pid's life, or call
// functions that lock what they need.
unsafe impl Sync for Process {}

impl Process {
    /// The process the current thread belongs to.
    pub(crate) fn current() -> Self {
        let task = kernel::current!();
        // `Task` is `#[repr(transparent)]` over `Opaque<task_struct>`.
        let ptr = (&*task as *const kernel::task::Task).cast_mut().cast::<bindings::task_struct>();
        // SAFETY: `ptr` is the running task; `get_task_pid` takes a counted
        // reference on its thread group's pid, which a running task has.
        let pid = unsafe { bindings::get_task_pid(ptr, bindings::pid_type_PIDTYPE_TGID) };
        // A running task always has its thread group's pid.
        Self(core::ptr::NonNull::new(pid).expect("a running task has a pid"))
    }

    /// Its pid (the thread group id) in the initial namespace (`pid_nr`).
    pub(crate) fn pid(&self) -> i32 {
        // SAFETY: we hold a reference; `numbers[0]` is the initial
        // namespace's number, fixed at allocation.
        unsafe { (*(*self.0.as_ptr()).numbers.as_ptr()).nr }
    }

    /// The thread group's leader task, if the group still has one.
    fn task(&self) -> Option<kernel::types::ARef<kernel::task::Task>> {
        // SAFETY: `get_pid_task` looks the task up under RCU and returns it
        // with a reference taken, or NULL.
        let t = unsafe { bindings::get_pid_task(self.0.as_ptr(), bindings::pid_type_PIDTYPE_TGID) };
        let t = core::ptr::NonNull::new(t.cast::<kernel::task::Task>())?;
        // SAFETY: `t` carries the reference `get_pid_task` took, which the
        // `ARef` now owns (`Task` is transparent over `task_struct`).
        Some(unsafe { kernel::types::ARef::from_raw(t) })
    }

    /// Its command name, NUL-padded (empty once it is gone).
    pub(crate) fn comm(&self) -> [u8; 16] {
        let mut buf = [0u8; 16];
        if let Some(task) = self.task() {
            let ptr = (&*task as *const kernel::task::Task).cast_mut().cast::<bindings::task_struct>();
            // SAFETY: `__get_task_comm` copies at most `buf.len()` bytes,
            // NUL terminated, under the task's lock; our reference keeps
            // the task struct alive.
            unsafe { bindings::__get_task_comm(buf.as_mut_ptr().cast(), buf.len(), ptr) };
        }
        buf
    }

    /// Sends SIGKILL to the thread group: any of its live threads takes
    /// it, and a fatal signal ends them all. Does not sleep.
    pub(crate) fn kill(&self) {
        // SAFETY: a live `struct pid` (our reference); `kill_pid` looks the
        // task up under RCU and copes with a group that is exiting or gone.
        unsafe { kabi::kill_pid(self.0.as_ptr(), bindings::SIGKILL as i32, 1) };
    }

    /// Whether both are the same thread group (the same `struct pid`: a
    /// reference keeps it, so its address is not reused meanwhile).
    pub(crate) fn same(&self, other: &Process) -> bool {
        self.0 == other.0
    }

    /// Whether every thread of the group has entered `do_exit` (or the
    /// group is gone): it runs no more user code, so it issues no more
    /// writes, even if one of its files is still open in another process.
    pub(crate) fn exited(&self) -> bool {
        let Some(task) = self.task() else { return true };
        let ptr = (&*task as *const kernel::task::Task).cast::<bindings::task_struct>();
        // SAFETY: our reference keeps the task, and with it its
        // `signal_struct`, alive; `live` is an `atomic_t` that only falls
        // (`atomic_read` is a plain read of it).
        let live = unsafe {
            core::sync::atomic::AtomicI32::from_ptr(&raw mut (*(*ptr).signal).live.counter)
        };
        live.load(core::sync::atomic::Ordering::Acquire) <= 0
    }
}

impl Clone for Process {
    fn clone(&self) -> Self {
        // SAFETY: `count` is the pid's `refcount_t` (an `atomic_t`); we hold
        // a reference, so it is at least 1 and the pid lives: adding one is
        // `get_pid`'s `refcount_inc` (an inline function bindgen cannot
        // call).
        let count = unsafe { core::sync::atomic::AtomicI32::from_ptr(&raw mut (*self.0.as_ptr()).count.refs.counter) };
        count.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        Self(self.0)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: gives back the reference taken by `current` or `clone`.
        unsafe { bindings::put_pid(self.0.as_ptr()) };
    }
}

/// While it lives, the current task's allocations do no I/O and its
/// writes are throttled only against the device they go to (what loop's
/// worker sets, `PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE`): a server moving a
/// request's data never waits for memory or dirty pages only its own
/// device could clean.
pub(crate) struct NoIoScope {
    saved: u32,
}

const NOIO_FLAGS: u32 = bindings::PF_MEMALLOC_NOIO | bindings::PF_LOCAL_THROTTLE;

fn current_task_ptr() -> *mut bindings::task_struct {
    let task = kernel::current!();
    // `Task` is `#[repr(transparent)]` over `Opaque<task_struct>`.
    (&*task as *const kernel::task::Task).cast_mut().cast()
}

impl NoIoScope {
    pub(crate) fn enter() -> Self {
        let task = current_task_ptr();
        // SAFETY: a task's `flags` are changed only by the task itself (as
        // `memalloc_noio_save` does): we are that task.
        let saved = unsafe {
            let old = (*task).flags;
            (*task).flags = old | NOIO_FLAGS;
            old & NOIO_FLAGS
        };
        Self { saved }
    }
}

impl Drop for NoIoScope {
    fn drop(&mut self) {
        let task = current_task_ptr();
        // SAFETY: as in `enter`; restores what was set before it.
        unsafe { (*task).flags = ((*task).flags & !NOIO_FLAGS) | self.saved };
    }
}

/// The number of online CPUs (`num_online_cpus`).
pub(crate) fn online_cpus() -> u32 {
    // SAFETY: `__num_online_cpus` is an `atomic_t` the CPU hotplug code
    // updates; an atomic read of it is what `num_online_cpus()` does.
    let n = unsafe { core::sync::atomic::AtomicI32::from_ptr(&raw mut bindings::__num_online_cpus.counter) };
    n.load(core::sync::atomic::Ordering::Relaxed).max(1) as u32
}

/// The number of possible CPU ids (`nr_cpu_ids`): blk-mq's most hardware
/// queues.
pub(crate) fn possible_cpus() -> u32 {
    // SAFETY: `nr_cpu_ids` is set during boot and never changes after.
    unsafe { bindings::nr_cpu_ids }
}

/// The current task's filesystem uid, as a global uid (the initial user
/// namespace's: `kuid_t`'s value).
pub(crate) fn current_fsuid() -> u32 {
    let task = kernel::current!();
    // `Task` is `#[repr(transparent)]` over `Opaque<task_struct>`.
    let ptr = (&*task as *const kernel::task::Task).cast::<bindings::task_struct>();
    // SAFETY: a task's own credentials (`current_cred()`) stay valid while
    // it runs: only the task itself replaces them.
    unsafe { (*(*ptr).cred).fsuid.val }
}

/// `capable(CAP_SYS_ADMIN)` for the current task.
pub(crate) fn capable_sys_admin() -> bool {
    // SAFETY: `capable` only inspects the current task's credentials.
    unsafe { bindings::capable(bindings::CAP_SYS_ADMIN as i32) }
}

/// A reference on this module: while one exists, rmmod fails with EBUSY.
pub(crate) struct ModuleRef(());

impl ModuleRef {
    /// Takes a reference; `None` if the module is being unloaded.
    pub(crate) fn get() -> Option<Self> {
        // SAFETY: `__this_module` is this module's own descriptor, valid for
        // as long as its code runs.
        unsafe { bindings::try_module_get(&raw mut bindings::__this_module) }.then_some(Self(()))
    }
}

impl Drop for ModuleRef {
    fn drop(&mut self) {
        // SAFETY: `self` owns one reference taken by `try_module_get`. The
        // caller of drop is module code that a file or device still pins, so
        // it cannot be unloaded under us.
        unsafe { bindings::module_put(&raw mut bindings::__this_module) };
    }
}

/// The C `lock_class_key` behind a lockdep class.
pub(crate) fn lock_class_ptr(key: &'static kernel::sync::LockClassKey) -> *mut bindings::lock_class_key {
    // `LockClassKey` is `#[repr(transparent)]` over `Opaque<lock_class_key>`,
    // which is itself transparent, so the addresses coincide (its own
    // `as_ptr` is crate-private).
    (key as *const kernel::sync::LockClassKey).cast_mut().cast()
}

// SAFETY: the uapi structs are `#[repr(C)]` with only integer fields and no
// padding (uapi.rs asserts their sizes, the host test every offset), so every
// byte is initialised and every bit pattern is valid.
unsafe impl kernel::types::AsBytes for crate::uapi::AbuseStatus {}
// SAFETY: as above.
unsafe impl kernel::types::FromBytes for crate::uapi::AbuseStatus {}
// SAFETY: as above.
unsafe impl kernel::types::AsBytes for crate::uapi::AbuseBio {}
// SAFETY: as above.
unsafe impl kernel::types::FromBytes for crate::uapi::AbuseBio {}
// SAFETY: as above.
unsafe impl kernel::types::AsBytes for crate::uapi::AbuseXfer {}
// SAFETY: as above.
unsafe impl kernel::types::FromBytes for crate::uapi::AbuseXfer {}
// SAFETY: as above.
unsafe impl kernel::types::AsBytes for crate::uapi::AbuseServe {}
// SAFETY: as above.
unsafe impl kernel::types::FromBytes for crate::uapi::AbuseServe {}

/// The current value of `jiffies`.
pub(crate) fn jiffies() -> u64 {
    // SAFETY: `jiffies` is a word-sized counter the timer interrupt updates;
    // a volatile read of it is how C's `READ_ONCE(jiffies)` reads it too.
    unsafe { core::ptr::read_volatile(&raw const bindings::jiffies) as u64 }
}

/// Milliseconds to jiffies, rounded up.
pub(crate) fn msecs_to_jiffies(ms: u32) -> u64 {
    // SAFETY: a pure conversion.
    unsafe { bindings::__msecs_to_jiffies(ms) as u64 }
}

/// The `poll_table` a `poll()` call passes (possibly none).
pub(crate) struct PollTable {
    file: *mut bindings::file,
    table: *mut bindings::poll_table_struct,
}

impl PollTable {
    /// `poll_wait()`: adds the polling task to the wait queue at `head`.
    fn wait_on(&self, head: *mut bindings::wait_queue_head) {
        if self.table.is_null() {
            return;
        }
        // SAFETY: `table` is the non-null poll table of the ongoing `poll()`
        // call (see `PollTable` construction in `chrdev`), a `poll_table`
        // as `kabi::PollTable` declares it (checked at build time).
        let qproc = unsafe { (*self.table.cast::<kabi::PollTable>()).qproc };
        if let Some(qproc) = qproc {
            // SAFETY: `file` is the file being polled, `head` a live wait
            // queue that outlives the file (the file pins its device), and
            // `table` the caller's table: the arguments `poll_wait` passes.
            unsafe { qproc(self.file, head, self.table) };
        }
    }
}

/// The `poll()` event bits the control node reports.
pub(crate) mod poll_events {
    use super::kabi;
    pub(crate) const IN: u32 = kabi::EPOLLIN;
    pub(crate) const RDNORM: u32 = kabi::EPOLLRDNORM;
    pub(crate) const MSG: u32 = kabi::EPOLLMSG;
}

/// A value published by module init for the module's file operations to
/// find (the VFS gives `open` only an inode).
pub(crate) struct ModuleGlobal<T>(core::sync::atomic::AtomicPtr<T>);

impl<T: Send + Sync + 'static> ModuleGlobal<T> {
    /// An empty slot.
    pub(crate) const fn new() -> Self {
        Self(core::sync::atomic::AtomicPtr::new(core::ptr::null_mut()))
    }

    /// Publishes `value` until the returned guard is dropped (module exit).
    pub(crate) fn publish(&'static self, value: kernel::sync::Arc<T>) -> Published<T> {
        use kernel::types::ForeignOwnable;
        let ptr = value.into_foreign() as *mut T;
        self.0.store(ptr, core::sync::atomic::Ordering::Release);
        Published(self)
    }

    /// The published value. Call only from a file operation of this module:
    /// the VFS pins the module (`fops.owner`) for those, so module exit, and
    /// with it the guard's drop, cannot run concurrently.
    pub(crate) fn get(&self) -> Option<kernel::sync::Arc<T>> {
        use kernel::types::ForeignOwnable;
        let ptr = self.0.load(core::sync::atomic::Ordering::Acquire);
        if ptr.is_null() {
            return None;
        }
        // SAFETY: `ptr` came from `into_foreign` in `publish` and is released
        // only by `Published::drop`, which cannot run now (see above).
        let borrowed = unsafe { kernel::sync::Arc::<T>::borrow(ptr as *const _) };
        Some(borrowed.into())
    }
}

/// Keeps a [`ModuleGlobal`] published.
pub(crate) struct Published<T: Send + Sync + 'static>(&'static ModuleGlobal<T>);

impl<T: Send + Sync + 'static> Drop for Published<T> {
    fn drop(&mut self) {
        use kernel::types::ForeignOwnable;
        let ptr = self.0 .0.swap(core::ptr::null_mut(), core::sync::atomic::Ordering::AcqRel);
        if !ptr.is_null() {
            // SAFETY: `ptr` came from `into_foreign` in `publish`; it is now
            // unpublished and no file operation can hold a borrow of it.
            drop(unsafe { kernel::sync::Arc::<T>::from_foreign(ptr as *const _) });
        }
    }
}
