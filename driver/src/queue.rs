// SPDX-License-Identifier: GPL-2.0
//! One hardware queue's requests: a FIFO of pending ones and a table,
//! indexed by tag, of every request the driver holds on it, with its
//! generation and who fetched it, under the queue's own lock, with the
//! queue's own wait queue.
//!
//! Every request is in exactly one place: in its slot (pending, fetched, or
//! being moved to or from a server's file), or out of it in the hands of
//! one GET/PUT (`Busy`) for work that cannot sleep: a copy with page faults
//! disabled, a copy between kernel pages, a zero fill. Whoever takes a
//! request out puts it back or ends it; a RESET or DEVICE_FAILURE meanwhile
//! only marks the slot `abort`, and the holder then fails it. Anything that
//! may sleep (faulting the server's memory in, file I/O) happens with the
//! request in its slot, where RESET fails it and the timeout fences it. So
//! no request is lost or completed twice, no path waits on user space while
//! holding the lock, and no server action makes RESET or the timeout wait.
//!
//! A fetched request is never handed to another server while the process
//! that fetched it (or is moving its data) may still write it: a stalled
//! server may still perform the write it holds, and it must not land over
//! newer data. So the timeout fences: it kills that process's thread group
//! and keeps the request; the request is requeued when the file that
//! fetched it is released. A READ or FLUSH (harmless however late) is also
//! requeued if another process still holds that file open (fork,
//! SCM_RIGHTS) once the killed group has exited, and failed if the process
//! outlives its SIGKILL by a further timeout period (it is in a wait it
//! cannot leave, its own I/O queued behind the request it holds on a
//! filesystem stacked on this device): that ends the cycle. A WRITE,
//! DISCARD or WRITE_ZEROES waits for the release or RESET: RESET ends
//! every wait.

use crate::sys::blk::{NewRequest, Op, Request, Status};
use crate::sys::{jiffies, msecs_to_jiffies, wait::WaitQueue, Process};
use crate::uapi::*;
use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use kernel::sync::lock::{spinlock::SpinLockBackend, Guard};
use kernel::{c_str, new_spinlock, prelude::*, sync::SpinLock};

/// Where a slot's request is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Where {
    Free,
    Pending,
    /// Fetched: see the slot's `owner`, `fetcher` and `since`.
    Fetched,
    /// Fetched, and a PUT (`mover`) is moving its data to or from a file
    /// through pages of its own: the request itself stays here.
    Moving,
    /// Out of the slot, held by a GET or PUT for work that cannot sleep.
    Busy,
    /// Failed by RESET or DEVICE_FAILURE, to be ended by it (a chunk at a
    /// time): no one else's any more.
    Failing,
}

struct Slot {
    rq: Option<Request>,
    at: Where,
    gen: u32,
    /// The request as GET_BIO describes it (id and addr aside).
    sector: u64,
    len: u32,
    cmd: u16,
    flags: u16,
    /// The open file that fetched it (0: not fetched). Kept while a PUT
    /// holds it (`Busy`), so that a release meanwhile can mark it.
    owner: u64,
    /// The process that fetched it: killed if it holds it past the timeout.
    fetcher: Option<Process>,
    /// While `Moving`: the process whose PUT moves its data (the one the
    /// timeout fences then).
    mover: Option<Process>,
    /// When it was fetched (jiffies); a move's time is not counted.
    since: u64,
    /// While `Moving`: when the move began.
    moved_at: u64,
    /// Time spent in moves by processes other than the fetcher since it was
    /// fetched: such a mover's deadline counts it, so a chain of moves that
    /// each stop short of the timeout cannot hold the request for ever.
    moved_total: u64,
    /// RESET or DEVICE_FAILURE failed it while it was `Busy`.
    abort: bool,
    /// Its owner's file was released while a PUT held it: if that PUT gives
    /// it back, it is requeued rather than left fetched by a closed file.
    orphaned: bool,
    /// When it passed the timeout and its fetcher (or mover) was killed.
    fenced: Option<u64>,
}

impl Slot {
    /// Whether `mover` is the process that fetched the request.
    fn moved_by_fetcher(&self, mover: Option<&Process>) -> bool {
        mover.zip(self.fetcher.as_ref()).is_some_and(|(m, f)| m.same(f))
    }
}

/// A request id: generation (32 bits), hardware queue (16), tag (16).
pub(crate) fn make_id(gen: u32, queue: u32, tag: u32) -> u64 {
    ((gen as u64) << 32) | ((queue as u64 & 0xffff) << 16) | (tag as u64 & 0xffff)
}

/// (generation, hardware queue, tag) of an id.
pub(crate) fn split_id(id: u64) -> (u32, u32, u32) {
    ((id >> 32) as u32, ((id >> 16) & 0xffff) as u32, (id & 0xffff) as u32)
}

/// The configuration the data path needs.
#[derive(Clone, Copy)]
pub(crate) struct Live {
    pub(crate) flags: u32,
    /// Capacity in 512-byte sectors: requests past it fail.
    pub(crate) sectors: u64,
    /// The configuration's generation (low 31 bits): an ioctl pinned to
    /// another one touches no request.
    pub(crate) generation: u32,
    /// 0: fetched requests never time out.
    pub(crate) timeout_ms: u32,
    pub(crate) timeout_jiffies: u64,
    /// Requests held at once (pending or fetched); more wait in blk-mq.
    pub(crate) depth: u32,
}

/// Counters reported by GET_STATUS.
#[derive(Clone, Copy, Default)]
pub(crate) struct Counters {
    pub(crate) completed: u64,
    pub(crate) errors: u64,
    pub(crate) requeues: u64,
    pub(crate) timeouts: u64,
}

/// The last fenced process logged, and when any fence was last logged: one
/// line per fenced process, and at most one every interval across every
/// device (unkillable servers alternating cannot flood the log).
static FENCE_LOG_PID: AtomicI32 = AtomicI32::new(0);
static FENCE_LOG_AT: AtomicU64 = AtomicU64::new(0);

/// Between two fencing messages.
const FENCE_LOG_INTERVAL_MS: u32 = 5_000;

/// Whether to log a fence of process `pid` now.
/// (`once`: not if it was the last process logged.)
fn fence_log_allowed(pid: i32, once: bool) -> bool {
    let now = jiffies();
    let last = FENCE_LOG_AT.load(Ordering::Relaxed);
    let recent = last != 0 && now.wrapping_sub(last) < msecs_to_jiffies(FENCE_LOG_INTERVAL_MS);
    if recent || (once && FENCE_LOG_PID.load(Ordering::Relaxed) == pid) {
        return false;
    }
    if FENCE_LOG_AT.compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_err() {
        return false;
    }
    FENCE_LOG_PID.store(pid, Ordering::Relaxed);
    true
}

/// The least time a fenced process gets to exit before its request is
/// failed: a large process takes a while to tear down.
const FENCE_GRACE_MS: u32 = 5_000;

struct State {
    live: Option<Live>,
    slots: KVec<Slot>,
    /// FIFO of pending tags: a ring of `slots.len()` entries.
    ring: KVec<u32>,
    head: usize,
    pending: usize,
    /// Slots not free: what `Live::depth` bounds.
    used: u32,
    counters: Counters,
}

impl State {
    fn push_back(&mut self, tag: u32) {
        let n = self.ring.len();
        let i = (self.head + self.pending) % n;
        self.ring[i] = tag;
        self.pending += 1;
    }

    fn push_front(&mut self, tag: u32) {
        let n = self.ring.len();
        self.head = (self.head + n - 1) % n;
        self.ring[self.head] = tag;
        self.pending += 1;
    }

    /// Reverses the order of the first `k` pending tags.
    fn reverse_front(&mut self, k: usize) {
        let n = self.ring.len();
        let (mut i, mut j) = (0, k);
        while i + 1 < j {
            j -= 1;
            self.ring.swap((self.head + i) % n, (self.head + j) % n);
            i += 1;
        }
    }

    fn front(&self) -> Option<u32> {
        (self.pending > 0).then(|| self.ring[self.head])
    }

    fn pop_front(&mut self) {
        self.head = (self.head + 1) % self.ring.len();
        self.pending -= 1;
    }

    /// Frees a slot whose request has ended or is about to.
    fn free(&mut self, tag: u32) {
        self.slots[tag as usize].at = Where::Free;
        self.used -= 1;
    }

    /// Whether the configuration is still the one generation `pin`.
    fn pinned(&self, pin: u32) -> bool {
        self.live.is_some_and(|l| l.generation == pin)
    }

    /// The slot of the fetched request a PUT entry names: the configuration
    /// must be the one the PUT was pinned to, the request's generation
    /// current, and the entry's fields the request's. A request another
    /// PUT is moving or copying is busy.
    fn fetched_slot(&mut self, pin: u32, bio: &AbuseBio, gen: u32, tag: u32) -> Result<&mut Slot, PutError> {
        if !self.pinned(pin) {
            return Err(PutError::Stale);
        }
        let slot = self.slots.get_mut(tag as usize).ok_or(PutError::Stale)?;
        if slot.gen != gen {
            return Err(PutError::Stale);
        }
        match slot.at {
            Where::Fetched => {}
            Where::Moving | Where::Busy => return Err(PutError::Busy),
            Where::Free | Where::Pending | Where::Failing => return Err(PutError::Stale),
        }
        if slot.sector != bio.sector || slot.len != bio.len || slot.cmd != bio.cmd {
            return Err(PutError::Mismatch);
        }
        Ok(slot)
    }

    /// Frees the slot of a request being completed (its id goes stale) and
    /// counts it with `status` (None: already counted). Returns its fetcher,
    /// to be dropped outside the lock.
    fn retire(&mut self, tag: u32, status: Option<Status>) -> Option<Process> {
        let slot = &mut self.slots[tag as usize];
        slot.gen = slot.gen.wrapping_add(1);
        slot.owner = 0;
        slot.orphaned = false;
        slot.mover = None;
        let fetcher = slot.fetcher.take();
        self.free(tag);
        if let Some(status) = status {
            self.counters.completed += 1;
            if status.is_err() {
                self.counters.errors += 1;
            }
        }
        fetcher
    }

    /// Hands a fetched request out again (new generation, REQUEUED).
    fn requeue(&mut self, tag: u32) {
        let slot = &mut self.slots[tag as usize];
        slot.at = Where::Pending;
        slot.gen = slot.gen.wrapping_add(1);
        slot.flags |= ABUSE_BIO_REQUEUED;
        slot.owner = 0;
        slot.fetcher = None;
        slot.mover = None;
        slot.orphaned = false;
        slot.fenced = None;
        slot.moved_total = 0;
        self.counters.requeues += 1;
        self.push_front(tag);
    }
}

/// A request taken out of its slot by a GET or PUT.
pub(crate) struct Taken {
    pub(crate) tag: u32,
    pub(crate) rq: Request,
    /// The descriptor GET_BIO reports (`addr` filled in by the caller).
    pub(crate) bio: AbuseBio,
}

/// Requests one GET takes out at a time: a fixed chunk, so that fetching
/// allocates nothing (a GET takes several chunks for a large batch).
pub(crate) const CHUNK: usize = 16;

/// Requests a GET holds while copying.
pub(crate) struct Batch {
    items: [Option<Taken>; CHUNK],
    len: usize,
}

impl Batch {
    pub(crate) fn new() -> Self {
        Self { items: core::array::from_fn(|_| None), len: 0 }
    }

    pub(crate) fn items(&self) -> impl Iterator<Item = &Taken> {
        self.items[..self.len].iter().flatten()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, t: Taken) {
        self.items[self.len] = Some(t);
        self.len += 1;
    }
}

/// Why a PUT entry was refused.
pub(crate) enum PutError {
    /// No such request in this generation: completed, requeued or reset.
    Stale,
    /// The request exists but the entry does not describe it.
    Mismatch,
    /// Another PUT is moving or copying its data.
    Busy,
}

/// What the timeout did to a request.
pub(crate) enum Timeout {
    /// Nothing, or it fenced the request's holder: the request stays.
    Kept,
    /// The fenced holder has exited: the request is pending again.
    Requeued,
    /// The fenced holder outlived its SIGKILL: the request was failed.
    Failed,
}

/// One hardware queue of a device.
#[pin_data]
pub(crate) struct Queue {
    /// N of /dev/abuseN, for the log.
    index: u32,
    /// Which hardware queue (in request ids).
    hw: u32,
    #[pin]
    state: SpinLock<State>,
    /// How many requests are pending, as of the last unlock of `state`:
    /// read without the lock, so that servers looking for work (and going
    /// to sleep) leave the locks of empty queues alone.
    queued: AtomicU32,
    #[pin]
    waiters: WaitQueue,
}

/// The locked state of a queue; unlocking publishes its pending count.
struct Locked<'a> {
    st: Guard<'a, State, SpinLockBackend>,
    queued: &'a AtomicU32,
}

impl core::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.st
    }
}

impl core::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.st
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // Still under the lock: stores are published in lock order. A
        // waker's full barrier (`Requests::wake_for`) orders this store
        // before its check for sleepers.
        self.queued.store(self.st.pending as u32, Ordering::Relaxed);
    }
}

fn cmd_of(op: Op) -> Option<u16> {
    Some(match op {
        Op::Read => ABUSE_CMD_READ,
        Op::Write => ABUSE_CMD_WRITE,
        Op::Flush => ABUSE_CMD_FLUSH,
        Op::Discard => ABUSE_CMD_DISCARD,
        Op::WriteZeroes => ABUSE_CMD_WRITE_ZEROES,
        Op::Other(_) => return None,
    })
}

/// Whether a configured device accepts `cmd` (defence in depth: the block
/// layer already keeps away what the limits don't advertise).
fn accepts(live: &Live, cmd: u16) -> bool {
    let ro = live.flags & ABUSE_FLAG_READ_ONLY != 0;
    match cmd {
        ABUSE_CMD_READ => true,
        ABUSE_CMD_WRITE => !ro,
        ABUSE_CMD_FLUSH => live.flags & ABUSE_FLAG_FLUSH != 0,
        ABUSE_CMD_DISCARD => !ro && live.flags & ABUSE_FLAG_DISCARD != 0,
        ABUSE_CMD_WRITE_ZEROES => !ro && live.flags & ABUSE_FLAG_WRITE_ZEROES != 0,
        _ => false,
    }
}

impl Queue {
    /// Hardware queue `hw` of device `index`, with room for `depth` tags.
    pub(crate) fn new(index: u32, hw: u32, depth: u32) -> Result<impl PinInit<Self, Error>> {
        let mut slots = KVec::with_capacity(depth as usize, GFP_KERNEL)?;
        let mut ring = KVec::with_capacity(depth as usize, GFP_KERNEL)?;
        for _ in 0..depth {
            let slot = Slot {
                rq: None,
                at: Where::Free,
                gen: 1,
                sector: 0,
                len: 0,
                cmd: 0,
                flags: 0,
                owner: 0,
                fetcher: None,
                mover: None,
                since: 0,
                moved_at: 0,
                moved_total: 0,
                abort: false,
                orphaned: false,
                fenced: None,
            };
            slots.push(slot, GFP_KERNEL)?;
            ring.push(0, GFP_KERNEL)?;
        }
        let state = State {
            live: None,
            slots,
            ring,
            head: 0,
            pending: 0,
            used: 0,
            counters: Counters::default(),
        };
        Ok(try_pin_init!(Self {
            index,
            hw,
            state <- new_spinlock!(state, "abuse_queue"),
            queued: AtomicU32::new(0),
            waiters <- WaitQueue::new(c_str!("abuse_waiters"), kernel::static_lock_class!()),
        }))
    }

    /// Starts accepting requests (SET_STATUS) or changes what is accepted.
    pub(crate) fn set_live(&self, live: Option<Live>) {
        self.lock().live = live;
        self.waiters.wake_all();
    }

    /// (pending, in flight) and the counters.
    pub(crate) fn snapshot(&self) -> (u32, u32, Counters) {
        let st = self.lock();
        let in_flight = st.slots.iter().filter(|s| matches!(s.at, Where::Fetched | Where::Moving | Where::Busy)).count();
        (st.pending as u32, in_flight as u32, st.counters)
    }

    /// Takes up to `max` (at most [`CHUNK`]) pending requests, oldest
    /// first, into `batch`, whose payloads fit one after the other, each
    /// aligned to ABUSE_DATA_ALIGN, from offset `*used` of a `data_len`
    /// bytes buffer. Each `bio.addr` is the payload's offset into that
    /// buffer; `*used` ends past the last payload.
    ///
    /// Returns true if it stopped because the next payload did not fit.
    /// Nothing is taken unless the configuration is still generation
    /// `pin`.
    pub(crate) fn take_pending(&self, pin: u32, data_len: u64, used: &mut u64, max: usize, batch: &mut Batch) -> bool {
        let mut st = self.lock();
        if !st.pinned(pin) {
            return false;
        }
        while batch.len < max.min(CHUNK) {
            let Some(tag) = st.front() else { break };
            let slot = &mut st.slots[tag as usize];
            if slot.at != Where::Pending {
                // Cannot be (the ring holds pending tags only), but a
                // request is never handed out from any other state.
                st.pop_front();
                continue;
            }
            let need = if matches!(slot.cmd, ABUSE_CMD_READ | ABUSE_CMD_WRITE) { slot.len as u64 } else { 0 };
            let off = used.next_multiple_of(ABUSE_DATA_ALIGN as u64);
            if need > 0 && off.checked_add(need).is_none_or(|end| end > data_len) {
                return true;
            }
            let Some(rq) = slot.rq.take() else { break };
            slot.at = Where::Busy;
            slot.owner = 0;
            slot.fetcher = None;
            let bio = AbuseBio {
                id: make_id(slot.gen, self.hw, tag),
                sector: slot.sector,
                addr: if need > 0 { off } else { 0 },
                len: slot.len,
                cmd: slot.cmd,
                flags: slot.flags,
                result: 0,
                error: 0,
            };
            if need > 0 {
                *used = off + need;
            }
            st.pop_front();
            batch.push(Taken { tag, rq, bio });
        }
        false
    }

    /// Locks the queue's state (unlocking publishes its pending count).
    fn lock(&self) -> Locked<'_> {
        Locked { st: self.state.lock(), queued: &self.queued }
    }

    /// Whether any request is pending (as of the last unlock: a sleeper
    /// checks after a full barrier, which pairs with the waker's).
    pub(crate) fn has_pending(&self) -> bool {
        self.queued.load(Ordering::Relaxed) > 0
    }

    /// A GET's copies succeeded: the requests are now fetched through the
    /// file `opener` by `process`.
    pub(crate) fn fetched(&self, batch: Batch, opener: u64, process: &Process) {
        self.put_back(batch, Some((opener, process)));
    }

    /// A GET failed: its requests are pending again, first in line, in a new
    /// generation (user space may have seen their ids).
    pub(crate) fn unfetch(&self, batch: Batch) {
        self.put_back(batch, None);
    }

    /// Returns taken requests to their slots: fetched by `to`, or (None)
    /// pending again in a new generation. Those a RESET aborted meanwhile
    /// are failed.
    fn put_back(&self, batch: Batch, to: Option<(u64, &Process)>) {
        let mut failed: [Option<Request>; CHUNK] = core::array::from_fn(|_| None);
        let now = jiffies();
        let mut st = self.lock();
        let mut requeued = 0;
        for (i, t) in batch.items.into_iter().flatten().enumerate() {
            let slot = &mut st.slots[t.tag as usize];
            if core::mem::replace(&mut slot.abort, false) {
                st.free(t.tag);
                failed[i] = Some(t.rq);
                continue;
            }
            slot.rq = Some(t.rq);
            match to {
                Some((opener, process)) => {
                    slot.at = Where::Fetched;
                    slot.owner = opener;
                    slot.fetcher = Some(process.clone());
                    slot.since = now;
                    slot.moved_total = 0;
                    slot.fenced = None;
                }
                None => {
                    slot.at = Where::Pending;
                    slot.gen = slot.gen.wrapping_add(1);
                    st.push_front(t.tag);
                    requeued += 1;
                }
            }
        }
        // They went to the front one by one: restore their order.
        st.reverse_front(requeued);
        drop(st);
        for rq in failed.into_iter().flatten() {
            rq.end(Status::IoErr);
        }
    }

    /// Takes the fetched request `bio` names (by its `gen` and `tag`) for a
    /// PUT pinned to configuration `pin`, for work that cannot sleep.
    pub(crate) fn take_fetched(&self, pin: u32, bio: &AbuseBio, gen: u32, tag: u32) -> Result<Taken, PutError> {
        let mut st = self.lock();
        let slot = st.fetched_slot(pin, bio, gen, tag)?;
        let rq = slot.rq.take().ok_or(PutError::Stale)?;
        slot.at = Where::Busy;
        Ok(Taken { tag, rq, bio: *bio })
    }

    /// Completes the fetched request `bio` names when there is nothing to
    /// copy (not a successful READ): checked, freed and counted in one pass
    /// under the lock.
    pub(crate) fn complete_fetched(&self, pin: u32, bio: &AbuseBio, gen: u32, tag: u32, status: Status) -> Result<(), PutError> {
        self.retire_fetched(pin, bio, gen, tag, status)?.end(status);
        Ok(())
    }

    /// Checks, frees and counts the fetched request `bio` names, which
    /// will end with `status`, in one pass under the lock, and gives it to
    /// the caller to end: once its slot is free it is no one else's (no
    /// RESET or timeout finds it, and blk-mq hands its tag out again only
    /// after it ends), so what cannot fail may still be done to its pages.
    pub(crate) fn retire_fetched(&self, pin: u32, bio: &AbuseBio, gen: u32, tag: u32, status: Status) -> Result<Request, PutError> {
        let mut st = self.lock();
        let rq = st.fetched_slot(pin, bio, gen, tag)?.rq.take().ok_or(PutError::Stale)?;
        let fetcher = st.retire(tag, Some(status));
        drop(st);
        drop(fetcher);
        Ok(rq)
    }

    /// A PUT's work on a request it took could not be done (a copy that
    /// faulted, say): the request is fetched again as it was, or, if its
    /// owner's file was released meanwhile, handed out again (returns true:
    /// a server must be woken). One a RESET aborted meanwhile is failed.
    pub(crate) fn untake(&self, t: Taken) -> bool {
        let mut st = self.lock();
        let slot = &mut st.slots[t.tag as usize];
        if core::mem::replace(&mut slot.abort, false) {
            st.free(t.tag);
            drop(st);
            t.rq.end(Status::IoErr);
            return false;
        }
        slot.rq = Some(t.rq);
        slot.at = Where::Fetched;
        if slot.orphaned {
            st.requeue(t.tag);
            return true;
        }
        false
    }

    /// Completes a request taken by `take_fetched`.
    pub(crate) fn complete(&self, t: Taken, status: Status) {
        let mut st = self.lock();
        let aborted = core::mem::replace(&mut st.slots[t.tag as usize].abort, false);
        // An aborted request was counted when RESET or DEVICE_FAILURE failed it.
        let fetcher = st.retire(t.tag, (!aborted).then_some(status));
        drop(st);
        drop(fetcher);
        t.rq.end(if aborted { Status::IoErr } else { status });
    }

    /// The fetched request `bio` names is to be moved from a file by the
    /// current process (`mover`): it stays in its slot, `Moving`, where
    /// RESET can fail it and the timeout fences the mover.
    pub(crate) fn start_move(&self, pin: u32, bio: &AbuseBio, gen: u32, tag: u32, mover: &Process) -> Result<(), PutError> {
        let mut st = self.lock();
        let slot = st.fetched_slot(pin, bio, gen, tag)?;
        slot.at = Where::Moving;
        slot.mover = Some(mover.clone());
        slot.moved_at = jiffies();
        // A fence is the fenced holder's: the mover gets its own.
        slot.fenced = None;
        Ok(())
    }

    /// A request taken by `take_fetched`, whose data has been copied out,
    /// goes back to its slot to be moved to a file by `mover` (as
    /// `start_move`). One a RESET aborted meanwhile is failed instead
    /// (Stale: there is nothing left to move).
    pub(crate) fn take_to_move(&self, t: Taken, mover: &Process) -> Result<(), PutError> {
        let mut st = self.lock();
        let slot = &mut st.slots[t.tag as usize];
        if core::mem::replace(&mut slot.abort, false) {
            st.free(t.tag);
            drop(st);
            t.rq.end(Status::IoErr);
            return Err(PutError::Stale);
        }
        slot.rq = Some(t.rq);
        slot.at = Where::Moving;
        slot.mover = Some(mover.clone());
        slot.moved_at = jiffies();
        // A fence is the fenced holder's: the mover gets its own.
        slot.fenced = None;
        Ok(())
    }

    /// The move of request (`gen`, `tag`) was refused or cut short: it is
    /// fetched again as it was, or handed out again if its owner's file was
    /// released meanwhile (returns true: a server must be woken). Nothing,
    /// if RESET or the timeout ended it meanwhile.
    pub(crate) fn stop_move(&self, gen: u32, tag: u32) -> bool {
        let mut st = self.lock();
        let slot = &mut st.slots[tag as usize];
        if slot.gen != gen || slot.at != Where::Moving {
            return false;
        }
        slot.at = Where::Fetched;
        let mover = slot.mover.take();
        // The fence was the mover's. A move by the fetcher ran on its own
        // clock. Another process's move stopped the fetcher's clock (its
        // stall must not make the fetcher look stale) and counts against
        // the next such mover's deadline (`moved_total`): moves that keep
        // stopping short cannot hold the request for ever.
        slot.fenced = None;
        if !slot.moved_by_fetcher(mover.as_ref()) {
            let took = jiffies().wrapping_sub(slot.moved_at);
            slot.moved_total = slot.moved_total.wrapping_add(took);
            slot.since = slot.since.wrapping_add(took);
        }
        let requeue = slot.orphaned;
        if requeue {
            st.requeue(tag);
        }
        drop(st);
        drop(mover);
        requeue
    }

    /// The move of request (`gen`, `tag`) is done and it ends with
    /// `status`: freed and counted under the lock, and given to the caller
    /// to fill (from the mover's pages, which cannot fail) and end. None if
    /// RESET or the timeout ended it meanwhile: the late result changes
    /// nothing.
    pub(crate) fn finish_move(&self, gen: u32, tag: u32, status: Status) -> Option<Request> {
        let mut st = self.lock();
        let slot = &mut st.slots[tag as usize];
        if slot.gen != gen || slot.at != Where::Moving {
            return None;
        }
        let rq = slot.rq.take()?;
        let mover = slot.mover.take();
        let fetcher = st.retire(tag, Some(status));
        drop(st);
        drop((mover, fetcher));
        Some(rq)
    }

    /// Fails every pending, fetched and moving request (RESET, and
    /// DEVICE_FAILURE from a call pinned to configuration `pin`: none if
    /// the configuration changed); requests held by a GET/PUT for a copy
    /// are failed by their holder, which returns them without sleeping.
    /// Allocates nothing, so it cannot fail: one pass under the lock makes
    /// them all `Failing` (no one else's from then on: stale to a PUT,
    /// invisible to the timeout, out of the pending ring), then they are
    /// ended a chunk at a time.
    pub(crate) fn fail_all(&self, pin: Option<u32>) {
        let mut st = self.lock();
        if pin.is_some_and(|p| !st.pinned(p)) {
            return;
        }
        let mut counted = 0u64;
        for slot in st.slots.iter_mut() {
            match slot.at {
                Where::Free | Where::Failing => continue,
                Where::Busy if slot.abort => continue,
                Where::Busy => slot.abort = true,
                Where::Pending | Where::Fetched | Where::Moving => slot.at = Where::Failing,
            }
            slot.gen = slot.gen.wrapping_add(1);
            counted += 1;
        }
        st.head = 0;
        st.pending = 0;
        st.counters.completed += counted;
        st.counters.errors += counted;
        drop(st);
        loop {
            let mut failed: [Option<Request>; CHUNK] = core::array::from_fn(|_| None);
            let mut holders: [Option<Process>; CHUNK] = core::array::from_fn(|_| None);
            let mut movers: [Option<Process>; CHUNK] = core::array::from_fn(|_| None);
            let mut n = 0usize;
            let mut st = self.lock();
            for tag in 0..st.slots.len() as u32 {
                if n == CHUNK {
                    break;
                }
                let slot = &mut st.slots[tag as usize];
                if slot.at != Where::Failing {
                    continue;
                }
                slot.owner = 0;
                slot.orphaned = false;
                slot.fenced = None;
                holders[n] = slot.fetcher.take();
                movers[n] = slot.mover.take();
                failed[n] = slot.rq.take();
                st.free(tag);
                n += 1;
            }
            drop(st);
            drop((holders, movers));
            for rq in failed.into_iter().flatten() {
                rq.end(Status::IoErr);
            }
            if n < CHUNK {
                break;
            }
        }
        self.waiters.wake_all();
    }

    /// The open file `opener` is gone (its process exited, or was killed by
    /// the timeout): what it fetched goes to the next server. A request of
    /// its that a PUT is copying or moving is marked, and requeued if that
    /// PUT gives it back. Returns whether any was requeued.
    pub(crate) fn release(&self, opener: u64) -> bool {
        let mut st = self.lock();
        let mut any = false;
        for tag in 0..st.slots.len() as u32 {
            let slot = &mut st.slots[tag as usize];
            if slot.owner != opener {
                continue;
            }
            match slot.at {
                Where::Busy | Where::Moving => slot.orphaned = true,
                Where::Fetched => {
                    st.requeue(tag);
                    any = true;
                }
                Where::Free | Where::Pending | Where::Failing => {}
            }
        }
        any
    }

    /// `poll()`: readable while requests are pending.
    /// Which hardware queue this is.
    pub(crate) fn hw(&self) -> u32 {
        self.hw
    }

    /// The queue's wait queue: servers sleep on it, pollers register on it.
    pub(crate) fn waiters(&self) -> &WaitQueue {
        &self.waiters
    }
}

impl Queue {
    /// Takes a new request: ends it at once if the device refuses it, gives
    /// it back if the queue holds `depth` requests already, else queues it.
    /// Returns whether it was queued (a server must be woken).
    pub(crate) fn queue_rq(&self, rq: NewRequest) -> Result<bool, NewRequest> {
        let cmd = cmd_of(rq.op());
        let mut st = self.lock();
        // Unconfigured (a race with RESET) or a write to a read-only
        // device: I/O error. An operation the server did not advertise:
        // not supported.
        // Past the capacity (a stale partition table, a race with a
        // reconfiguration): I/O error, whatever the block layer let through.
        let (sector, len) = (rq.sector(), rq.bytes());
        let past_end = |live: &Live| sector.checked_add((len >> ABUSE_SECTOR_SHIFT) as u64).is_none_or(|end| end > live.sectors);
        let refuse = match (&st.live, cmd) {
            (None, _) => Some(Status::IoErr),
            (Some(_), None) => Some(Status::NotSupp),
            (Some(live), Some(cmd)) if !accepts(live, cmd) => {
                let ro = live.flags & ABUSE_FLAG_READ_ONLY != 0;
                Some(if ro && cmd != ABUSE_CMD_FLUSH { Status::IoErr } else { Status::NotSupp })
            }
            (Some(live), Some(cmd)) if cmd != ABUSE_CMD_FLUSH && past_end(live) => Some(Status::IoErr),
            _ => None,
        };
        if let Some(status) = refuse {
            st.counters.completed += 1;
            st.counters.errors += 1;
            drop(st);
            rq.start().end(status);
            return Ok(false);
        }
        if st.live.is_some_and(|live| st.used >= live.depth) {
            return Err(rq);
        }
        let tag = rq.tag();
        let mut flags = 0;
        if rq.is_fua() {
            flags |= ABUSE_BIO_FUA;
        }
        if rq.is_nounmap() {
            flags |= ABUSE_BIO_NOUNMAP;
        }
        let Some(slot) = st.slots.get_mut(tag as usize) else {
            drop(st);
            rq.start().end(Status::IoErr);
            return Ok(false);
        };
        if slot.at != Where::Free {
            // blk-mq never reuses a tag the driver still holds.
            drop(st);
            rq.start().end(Status::IoErr);
            return Ok(false);
        }
        slot.gen = slot.gen.wrapping_add(1);
        slot.at = Where::Pending;
        slot.sector = sector;
        slot.len = if cmd == Some(ABUSE_CMD_FLUSH) { 0 } else { len };
        slot.cmd = cmd.unwrap_or(0);
        slot.flags = flags;
        slot.abort = false;
        slot.orphaned = false;
        slot.fenced = None;
        slot.owner = 0;
        slot.mover = None;
        slot.rq = Some(rq.start());
        st.used += 1;
        st.push_back(tag);
        Ok(true)
    }

    /// blk-mq's timer fired for the request with `tag`. A request fetched
    /// (or being moved) for longer than the timeout fences its holder: the
    /// holder's thread group is killed and the request kept. At the next
    /// firings:
    /// - a READ or FLUSH (which changes nothing, however late its server
    ///   is) is pending again once that group has exited (its file may live
    ///   on in another process), and failed if the group outlives its
    ///   SIGKILL by max(timeout, 5 s): that ends a wait it may be part of;
    /// - a WRITE, DISCARD or WRITE_ZEROES stays until its file is released
    ///   or RESET: a process that still holds the file, or a holder stuck
    ///   in a write, may yet perform it, and it must not land over newer
    ///   data that a failure or a second server let the filesystem write.
    pub(crate) fn timeout(&self, tag: u32) -> Timeout {
        let mut st = self.lock();
        let Some(live) = st.live else { return Timeout::Kept };
        if live.timeout_jiffies == 0 {
            return Timeout::Kept;
        }
        let now = jiffies();
        let Some(slot) = st.slots.get_mut(tag as usize) else { return Timeout::Kept };
        let (moving, from) = match slot.at {
            Where::Fetched => (false, slot.since),
            Where::Moving if slot.moved_by_fetcher(slot.mover.as_ref()) => (true, slot.since),
            Where::Moving => (true, slot.moved_at.wrapping_sub(slot.moved_total)),
            _ => return Timeout::Kept,
        };
        if now.wrapping_sub(from) < live.timeout_jiffies {
            return Timeout::Kept;
        }
        let holder = if moving { slot.mover.clone() } else { slot.fetcher.clone() };
        let Some(holder) = holder else { return Timeout::Kept };
        let (gen, cmd, sector) = (slot.gen, slot.cmd, slot.sector);
        let Some(fenced_at) = slot.fenced else {
            // First time: fence.
            slot.fenced = Some(now);
            st.counters.timeouts += 1;
            drop(st);
            self.log_fence(&holder, cmd, sector, live.timeout_ms, false);
            holder.kill();
            return Timeout::Kept;
        };
        drop(st);
        // Out of the lock: looks the process up (takes and drops a task
        // reference).
        let exited = holder.exited();
        let grace = live.timeout_jiffies.max(msecs_to_jiffies(FENCE_GRACE_MS));
        let harmless = matches!(cmd, ABUSE_CMD_READ | ABUSE_CMD_FLUSH);
        if !exited && now.wrapping_sub(fenced_at) < grace {
            // Still dying, or SIGKILL has not reached a thread yet.
            holder.kill();
            return Timeout::Kept;
        }
        if !harmless || (exited && moving) {
            // A write waits for its file's release or RESET; a move's PUT
            // returns its request as the killed mover unwinds.
            if !exited {
                holder.kill();
            }
            return Timeout::Kept;
        }
        let mut st = self.lock();
        let slot = &mut st.slots[tag as usize];
        // Still the request, the state, the fence and the holder that were
        // judged above (the lock was dropped meanwhile).
        let same_holder = if moving { slot.mover.as_ref() } else { slot.fetcher.as_ref() }.is_some_and(|p| p.same(&holder));
        let same_state = if moving { slot.at == Where::Moving } else { slot.at == Where::Fetched };
        if slot.gen != gen || !same_state || slot.fenced != Some(fenced_at) || !same_holder {
            return Timeout::Kept;
        }
        if exited {
            // The fence is complete: the group runs no more code, and its
            // file is held open by another process (or is about to be
            // released, which would requeue it the same way).
            st.requeue(tag);
            return Timeout::Requeued;
        }
        // Unkillable: fail the request, which ends the wait it may be part
        // of. A late PUT finds it gone.
        let Some(rq) = slot.rq.take() else { return Timeout::Kept };
        let fetcher = st.retire(tag, Some(Status::IoErr));
        drop(st);
        drop(fetcher);
        self.log_fence(&holder, cmd, sector, live.timeout_ms, true);
        rq.end(Status::IoErr);
        Timeout::Failed
    }

    fn log_fence(&self, holder: &Process, cmd: u16, sector: u64, timeout_ms: u32, failed: bool) {
        let pid = holder.pid();
        if !fence_log_allowed(pid, !failed) {
            return;
        }
        let comm = holder.comm();
        let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
        let name = core::str::from_utf8(&comm[..len]).unwrap_or("?");
        if failed {
            pr_warn!(
                "abuse{}: server pid {} ({}) did not exit after SIGKILL: failing its request (cmd {}, sector {})\n",
                self.index, pid, name, cmd, sector
            );
        } else {
            pr_warn!(
                "abuse{}: server pid {} ({}) held a request (cmd {}, sector {}) past the {} ms timeout: killing it; its requests go to the next server once it has exited\n",
                self.index, pid, name, cmd, sector, timeout_ms
            );
        }
    }
}
