// SPDX-License-Identifier: GPL-2.0
//! blk-mq block devices whose requests are handed to the driver as owned
//! [`Request`]s. 6.12's `kernel::block::mq` cannot change a disk's capacity,
//! has no timeout callback and no request accessors, hence this module.

use super::kabi;
use core::{marker::PhantomData, ptr::NonNull};
use kernel::{
    bindings,
    error::{from_err_ptr, to_result},
    prelude::*,
    static_lock_class,
    str::{CStr, CString},
    sync::Arc,
    fmt,
    types::Opaque,
};

/// A registered block major number.
pub(crate) struct BlkMajor {
    major: u32,
    name: &'static CStr,
}

impl BlkMajor {
    /// Registers a dynamic block major called `name`.
    pub(crate) fn register(name: &'static CStr) -> Result<Self> {
        // SAFETY: `name` is 'static; no probe callback.
        let major = unsafe { bindings::__register_blkdev(0, name.as_char_ptr(), None) };
        if major < 0 {
            return Err(Error::from_errno(major));
        }
        Ok(Self { major: major as u32, name })
    }

    /// The major number.
    pub(crate) fn major(&self) -> u32 {
        self.major
    }
}

impl Drop for BlkMajor {
    fn drop(&mut self) {
        // SAFETY: undoes `register`; the disks using it are gone by now
        // (they are dropped before the major, see the module's field order).
        unsafe { bindings::unregister_blkdev(self.major, self.name.as_char_ptr()) };
    }
}

/// Completion status of a request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Status {
    Ok,
    IoErr,
    NotSupp,
    /// The block status for a positive errno from a server, as loop maps
    /// its backing file's errors (`errno_to_blk_status`). Only through
    /// [`Status::from_errno`], which keeps it to the statuses a device may
    /// report.
    Errno(u32),
}

/// The errnos a server may fail a request with, as their block statuses:
/// what a disk reports. The statuses the block layer keeps for itself
/// (AGAIN for nowait I/O, the RESOURCE ones that requeue, DM_REQUEUE, the
/// zone ones, OFFLINE) are never a server's to give.
const SERVER_ERRNOS: [u32; 8] = [
    bindings::EIO,
    bindings::ENOSPC,
    bindings::EOPNOTSUPP,
    bindings::ENODATA,
    bindings::EILSEQ,
    bindings::ETIMEDOUT,
    bindings::ENOLINK,
    bindings::EREMOTEIO,
];

impl Status {
    /// The status for a server's (positive) errno: its own for those in
    /// the whitelist, an I/O error for every other.
    pub(crate) fn from_errno(errno: u32) -> Status {
        if SERVER_ERRNOS.contains(&errno) { Status::Errno(errno) } else { Status::IoErr }
    }

    fn raw(self) -> bindings::blk_status_t {
        match self {
            Status::Ok => bindings::BLK_STS_OK as bindings::blk_status_t,
            Status::IoErr => kabi::BLK_STS_IOERR,
            Status::NotSupp => kabi::BLK_STS_NOTSUPP,
            // SAFETY: a pure table lookup; any int is accepted.
            Status::Errno(e) => unsafe { bindings::errno_to_blk_status(-(e as i32)) },
        }
    }

    /// Whether the request failed.
    pub(crate) fn is_err(self) -> bool {
        self.raw() != bindings::BLK_STS_OK as bindings::blk_status_t
    }
}

/// The operation of a request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    Other(u32),
}

/// A request blk-mq hands to `queue_rq`, not yet started: the driver either
/// starts it (taking ownership) or gives it back for later.
pub(crate) struct NewRequest {
    rq: NonNull<bindings::request>,
}

impl NewRequest {
    fn raw(&self) -> &bindings::request {
        // SAFETY: `rq` is the request of the ongoing `queue_rq` call, valid
        // for as long as it lasts (type invariant).
        unsafe { self.rq.as_ref() }
    }

    /// The blk-mq tag: unique among the requests outstanding on its
    /// hardware queue.
    pub(crate) fn tag(&self) -> u32 {
        self.raw().tag as u32
    }

    /// First sector (`blk_rq_pos`).
    pub(crate) fn sector(&self) -> u64 {
        self.raw().__sector
    }

    /// Length in bytes (`blk_rq_bytes`).
    pub(crate) fn bytes(&self) -> u32 {
        self.raw().__data_len
    }

    /// The operation (`req_op`).
    pub(crate) fn op(&self) -> Op {
        let op = self.raw().cmd_flags & kabi::REQ_OP_MASK;
        match op {
            bindings::req_op_REQ_OP_READ => Op::Read,
            bindings::req_op_REQ_OP_WRITE => Op::Write,
            bindings::req_op_REQ_OP_FLUSH => Op::Flush,
            bindings::req_op_REQ_OP_DISCARD => Op::Discard,
            bindings::req_op_REQ_OP_WRITE_ZEROES => Op::WriteZeroes,
            other => Op::Other(other),
        }
    }

    /// Forced unit access.
    pub(crate) fn is_fua(&self) -> bool {
        self.raw().cmd_flags & kabi::REQ_FUA != 0
    }

    /// WRITE_ZEROES that must not deallocate.
    pub(crate) fn is_nounmap(&self) -> bool {
        self.raw().cmd_flags & kabi::REQ_NOUNMAP != 0
    }

    /// Starts the request (its timer runs from now): the driver owns it.
    pub(crate) fn start(self) -> Request {
        let rq = self.rq;
        core::mem::forget(self);
        // SAFETY: `rq` is valid and not started; starting it makes it ours
        // to end.
        unsafe { bindings::blk_mq_start_request(rq.as_ptr()) };
        // INVARIANT: started, and owned by the new handle alone.
        Request { rq }
    }
}

impl Drop for NewRequest {
    fn drop(&mut self) {
        // Neither started nor given back: it must still end.
        Request { rq: self.rq }.end(Status::IoErr);
    }
}

/// A started request the driver owns: it must be ended exactly once.
/// Dropping it ends it with an I/O error, so none is ever leaked.
pub(crate) struct Request {
    rq: NonNull<bindings::request>,
}

// SAFETY: a started request may be completed from any context and thread.
unsafe impl Send for Request {}
// SAFETY: the accessors only read fields fixed while the driver owns it.
unsafe impl Sync for Request {}

impl Request {
    fn raw(&self) -> &bindings::request {
        // SAFETY: `rq` is a started request owned by `self` (type invariant),
        // valid until it is ended.
        unsafe { self.rq.as_ref() }
    }

    /// Forced unit access.
    pub(crate) fn is_fua(&self) -> bool {
        self.raw().cmd_flags & kabi::REQ_FUA != 0
    }

    /// Copies the request's data (a WRITE's payload) to user address
    /// `addr`, without sleeping: EFAULT if the destination is not mapped
    /// for writing now (see `super::user`).
    pub(crate) fn copy_to_user_nofault(&self, mut addr: usize) -> Result {
        self.for_each_chunk(|chunk, len| {
            // SAFETY: `for_each_chunk` passes a mapped range of `len` bytes
            // of the request's pages; nothing else writes them while the
            // driver owns the request.
            super::user::write_nofault(addr, unsafe { core::slice::from_raw_parts(chunk, len) })?;
            addr += len;
            Ok(())
        })
    }

    /// Fills the request's data (a READ's result) from user address `addr`,
    /// without sleeping: EFAULT if the source is not mapped now.
    pub(crate) fn copy_from_user_nofault(&self, mut addr: usize) -> Result {
        self.for_each_chunk(|chunk, len| {
            // SAFETY: as in `copy_to_user_nofault`; the pages are the
            // request's own until it is ended, and no one else accesses them.
            super::user::read_nofault(unsafe { core::slice::from_raw_parts_mut(chunk, len) }, addr)?;
            addr += len;
            Ok(())
        })
    }

    /// Copies the request's data into `bounce` (a WRITE's payload, before
    /// it is written to a file).
    pub(crate) fn copy_to_bounce(&self, bounce: &mut super::bounce::Bounce) {
        let mut at = 0usize;
        let _ = self.for_each_chunk(|chunk, len| {
            // SAFETY: as in `copy_to_user_nofault`.
            bounce.write_at(at, unsafe { core::slice::from_raw_parts(chunk, len) });
            at += len;
            Ok(())
        });
    }

    /// Fills the first `n` bytes of the request's data from `bounce` and
    /// the rest with zeroes (a READ, `n` bytes of it read from a file).
    pub(crate) fn copy_from_bounce(&self, bounce: &super::bounce::Bounce, n: usize) {
        let mut at = 0usize;
        let _ = self.for_each_chunk(|chunk, len| {
            let from_file = n.saturating_sub(at).min(len);
            // SAFETY: as in `copy_from_user_nofault`; `from_file <= len`.
            let dst = unsafe { core::slice::from_raw_parts_mut(chunk, len) };
            bounce.read_at(at, &mut dst[..from_file]);
            dst[from_file..].fill(0);
            at += len;
            Ok(())
        });
    }

    /// Fills the request's data with zeroes from byte `from` on (a READ of
    /// a hole: from 0).
    pub(crate) fn zero_fill(&self, from: usize) {
        let mut at = 0usize;
        let _ = self.for_each_chunk(|chunk, len| {
            let skip = from.saturating_sub(at).min(len);
            at += len;
            // SAFETY: as in `copy_from_user`: `len` mapped bytes of the
            // request's own pages, which no one else accesses meanwhile;
            // `skip <= len`.
            unsafe { core::ptr::write_bytes(chunk.add(skip), 0, len - skip) };
            Ok(())
        });
    }

    /// Calls `f` on every piece of the request's data, one page at a time
    /// (`rq_for_each_segment`, split to pages for `kmap_local_page`).
    fn for_each_chunk(&self, mut f: impl FnMut(*mut u8, usize) -> Result) -> Result {
        const PAGE: u32 = bindings::PAGE_SIZE as u32;
        let mut bio = self.raw().bio;
        while !bio.is_null() {
            // SAFETY: the bios of a request the driver owns are live and
            // not modified until it is ended.
            let b = unsafe { &*bio };
            let (mut idx, mut done, mut left) = (b.bi_iter.bi_idx, b.bi_iter.bi_bvec_done, b.bi_iter.bi_size);
            while left > 0 {
                // SAFETY: `bi_iter` describes `bi_size` bytes of `bi_io_vec`,
                // so `idx` stays within the vector while bytes are left.
                let bv = unsafe { &*b.bi_io_vec.add(idx as usize) };
                let seg = (bv.bv_len - done).min(left);
                let (mut off, mut rem) = (bv.bv_offset + done, seg);
                while rem > 0 {
                    // Multi-page bvecs: `bv_page + n` is the n-th page
                    // (`nth_page` with SPARSEMEM_VMEMMAP, as x86_64 has).
                    // SAFETY: `off` lies within the bvec, whose pages are
                    // physically contiguous.
                    let page = unsafe { bv.bv_page.add((off / PAGE) as usize) };
                    let (poff, n) = (off % PAGE, rem.min(PAGE - off % PAGE));
                    // SAFETY: `page` is a valid page of the request.
                    let addr = unsafe { bindings::kmap_local_page(page) }.cast::<u8>();
                    // SAFETY: `poff + n <= PAGE_SIZE`: within the mapping.
                    let res = f(unsafe { addr.add(poff as usize) }, n as usize);
                    // SAFETY: unmaps what was mapped just above, in order.
                    unsafe { bindings::kunmap_local(addr.cast()) };
                    res?;
                    off += n;
                    rem -= n;
                }
                left -= seg;
                done = 0;
                idx += 1;
            }
            bio = b.bi_next;
        }
        Ok(())
    }

    /// Completes the request.
    pub(crate) fn end(self, status: Status) {
        let rq = self.rq.as_ptr();
        core::mem::forget(self);
        // SAFETY: `rq` is a started request we own; forgetting `self` makes
        // this its only completion.
        unsafe { bindings::blk_mq_end_request(rq, status.raw()) };
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        // SAFETY: as in `end`: dropping is the owner's last use.
        unsafe { bindings::blk_mq_end_request(self.rq.as_ptr(), Status::IoErr.raw()) };
    }
}

/// What the driver does with its requests.
pub(crate) trait QueueOps: Send + Sync + Sized + 'static {
    /// Takes a new request on hardware queue `hw`; must not sleep (atomic
    /// context). Giving it back (`Err`) means "no room now": blk-mq keeps
    /// it and dispatches it again when one of the queue's requests ends.
    fn queue_rq(&self, hw: u32, rq: NewRequest) -> Result<(), NewRequest>;
    /// blk-mq's timer fired for the request with `tag` on hardware queue
    /// `hw`. Returns true if the driver ended the request; otherwise it
    /// stays the driver's and its timer is re-armed.
    fn timeout(&self, hw: u32, tag: u32) -> bool;
}

struct OpsTable<T>(PhantomData<T>);

impl<T: QueueOps> OpsTable<T> {
    const OPS: bindings::blk_mq_ops = bindings::blk_mq_ops {
        queue_rq: Some(Self::queue_rq),
        timeout: Some(Self::timeout),
        // SAFETY: all-zero is "no callback" for the remaining members.
        ..unsafe { core::mem::zeroed() }
    };

    /// # Safety
    /// Called by blk-mq with a live hardware context and queue data.
    unsafe extern "C" fn queue_rq(
        hctx: *mut bindings::blk_mq_hw_ctx,
        bd: *const bindings::blk_mq_queue_data,
    ) -> bindings::blk_status_t {
        // SAFETY: `hctx` and its queue are live during the call; `queuedata`
        // is the `T` that `BlockDevice::new` stored, alive until the disk is
        // deleted, which waits for all dispatch to finish.
        let data = unsafe { &*(*(*hctx).queue).queuedata.cast::<T>() };
        // SAFETY: `bd->rq` is a request handed to us for dispatch; `hctx`
        // is live.
        let (rq, hw) = unsafe { ((*bd).rq, (*hctx).queue_num) };
        // INVARIANT: the request is valid for the call and not started.
        // SAFETY: blk-mq never passes a null request.
        let new = NewRequest { rq: unsafe { NonNull::new_unchecked(rq) } };
        match data.queue_rq(hw, new) {
            Ok(()) => bindings::BLK_STS_OK as bindings::blk_status_t,
            Err(back) => {
                // Not started: blk-mq keeps it and dispatches it again when
                // one of this queue's requests ends (SCHED_RESTART).
                core::mem::forget(back);
                kabi::BLK_STS_DEV_RESOURCE
            }
        }
    }

    /// # Safety
    /// Called by blk-mq's timeout work with a started request of this queue.
    unsafe extern "C" fn timeout(rq: *mut bindings::request) -> bindings::blk_eh_timer_return {
        // SAFETY: `rq`, its queue and hardware context are live while the
        // handler runs.
        let (data, hw, tag) =
            unsafe { (&*(*(*rq).q).queuedata.cast::<T>(), (*(*rq).mq_hctx).queue_num, (*rq).tag as u32) };
        if data.timeout(hw, tag) {
            // Ended by the handler: blk-mq must not re-arm it.
            bindings::blk_eh_timer_return_BLK_EH_DONE
        } else {
            bindings::blk_eh_timer_return_BLK_EH_RESET_TIMER
        }
    }
}

/// Block-device operations: only `owner`, so an open disk pins the module.
const DISK_OPS: bindings::block_device_operations = bindings::block_device_operations {
    owner: &raw mut bindings::__this_module,
    // SAFETY: all-zero is "no callback" for the remaining members.
    ..unsafe { core::mem::zeroed() }
};

/// What a configured device advertises to the block layer.
pub(crate) struct Limits {
    pub(crate) block_size: u32,
    pub(crate) max_bytes: u32,
    pub(crate) write_cache: bool,
    pub(crate) fua: bool,
    pub(crate) discard: bool,
    pub(crate) write_zeroes: bool,
}

/// How a [`BlockDevice`] is laid out.
pub(crate) struct DiskConfig {
    pub(crate) major: u32,
    /// 1 disables partitions.
    pub(crate) minors: u32,
    /// Hardware queues at creation (see `set_hw_queues`).
    pub(crate) hw_queues: u32,
    /// Tags per hardware queue.
    pub(crate) queue_depth: u32,
    pub(crate) max_bytes: u32,
}

/// A gendisk on its own tag set, with queue data `T` (kept alive by an
/// `Arc` the disk holds). Dropping it deletes the disk.
pub(crate) struct BlockDevice<T: QueueOps> {
    disk: NonNull<bindings::gendisk>,
    tag_set: KBox<Opaque<bindings::blk_mq_tag_set>>,
    data: *const T,
}

// SAFETY: the gendisk and tag set are used through functions that lock
// internally; `T` is Send + Sync.
unsafe impl<T: QueueOps> Send for BlockDevice<T> {}
// SAFETY: as above.
unsafe impl<T: QueueOps> Sync for BlockDevice<T> {}

impl<T: QueueOps> BlockDevice<T> {
    /// Allocates a tag set and a disk named `<prefix><index>`, with
    /// capacity 0, and adds it.
    pub(crate) fn new(cfg: &DiskConfig, prefix: &str, index: u32, data: Arc<T>) -> Result<Self> {
        let name = CString::try_from_fmt(fmt!("{prefix}{index}"))?;
        if name.as_bytes_with_nul().len() > bindings::DISK_NAME_LEN as usize {
            return Err(EINVAL);
        }
        let tag_set = KBox::new(Opaque::<bindings::blk_mq_tag_set>::uninit(), GFP_KERNEL)?;
        let set = tag_set.get();
        // SAFETY: `set` is ours, not yet shared; zero is a valid start for
        // every field, as in C's `memset(set, 0, ...)`.
        unsafe {
            set.write(core::mem::zeroed());
            (*set).ops = &OpsTable::<T>::OPS;
            (*set).nr_hw_queues = cfg.hw_queues;
            (*set).nr_maps = 1;
            (*set).queue_depth = cfg.queue_depth;
            (*set).numa_node = bindings::NUMA_NO_NODE;
            // No I/O scheduler unless asked for: the servers do their own
            // ordering, and a scheduler only adds a lock and a hop.
            (*set).flags = bindings::BLK_MQ_F_SHOULD_MERGE | bindings::BLK_MQ_F_NO_SCHED_BY_DEFAULT;
        }
        // SAFETY: `set` is initialised above and lives in a box that does
        // not move until `Drop` frees the tag set.
        to_result(unsafe { bindings::blk_mq_alloc_tag_set(set) })?;
        let free_set = kernel::types::ScopeGuard::new(|| {
            // SAFETY: allocated just above and not used by any queue.
            unsafe { bindings::blk_mq_free_tag_set(set) }
        });

        // SAFETY: all-zero queue limits mean "defaults".
        let mut lim: bindings::queue_limits = unsafe { core::mem::zeroed() };
        lim.logical_block_size = 512;
        lim.physical_block_size = 512;
        lim.max_hw_sectors = cfg.max_bytes >> 9;
        // Data is copied page by page, never DMA'd: segments cost nothing,
        // so a request is not split for their sake.
        lim.max_segments = u16::MAX;
        lim.max_segment_size = u32::MAX;
        let data = Arc::into_raw(data);
        // SAFETY: the tag set is allocated; `lim` is a valid limits struct;
        // `data` stays valid until `from_raw` in `Drop` (or below).
        let disk = from_err_ptr(unsafe {
            bindings::__blk_mq_alloc_disk(set, &mut lim, data as *mut _, super::lock_class_ptr(static_lock_class!()))
        });
        let disk = match disk {
            Ok(d) => d,
            Err(e) => {
                // SAFETY: `data` came from `into_raw` above, unused.
                drop(unsafe { Arc::<T>::from_raw(data) });
                return Err(e);
            }
        };
        // SAFETY: the disk is allocated and not yet visible, so we may fill it.
        let res = unsafe {
            (*disk).major = cfg.major as i32;
            (*disk).first_minor = (index * cfg.minors) as i32;
            (*disk).minors = cfg.minors as i32;
            (*disk).fops = &DISK_OPS;
            if cfg.minors == 1 {
                (*disk).flags |= bindings::GENHD_FL_NO_PART as core::ffi::c_int;
            }
            let dst = &mut (*disk).disk_name;
            for (d, s) in dst.iter_mut().zip(name.as_bytes_with_nul()) {
                *d = *s as _;
            }
            bindings::set_capacity(disk, 0);
            bindings::device_add_disk(core::ptr::null_mut(), disk, core::ptr::null_mut())
        };
        if let Err(e) = to_result(res) {
            // SAFETY: not added: put_disk releases it (and its queue).
            unsafe { bindings::put_disk(disk) };
            // SAFETY: the queue is gone, so is every user of `data`.
            drop(unsafe { Arc::<T>::from_raw(data) });
            return Err(e);
        }
        free_set.dismiss();
        Ok(Self {
            // SAFETY: `from_err_ptr` succeeded, so `disk` is non-null.
            disk: unsafe { NonNull::new_unchecked(disk) },
            tag_set,
            data,
        })
    }

    /// dev_t of the whole disk (kernel encoding).
    pub(crate) fn devt(&self) -> u32 {
        // SAFETY: the disk is live (type invariant); `major`/`first_minor`
        // never change after it is added.
        let d = unsafe { self.disk.as_ref() };
        super::chrdev::mkdev(d.major as u32, d.first_minor as u32)
    }

    fn queue(&self) -> *mut bindings::request_queue {
        // SAFETY: the disk is live and its queue is set for its lifetime.
        unsafe { self.disk.as_ref().queue }
    }

    /// Applies block size and the features the server advertised.
    pub(crate) fn set_limits(&self, l: &Limits) -> Result {
        let q = self.queue();
        // SAFETY: `queue_limits_start_update` (inline in C): the limits are
        // read under `limits_lock`, which `queue_limits_commit_update` drops.
        let mut lim = unsafe {
            bindings::mutex_lock(&raw mut (*q).limits_lock);
            (*q).limits
        };
        lim.logical_block_size = l.block_size;
        lim.physical_block_size = l.block_size;
        lim.io_min = l.block_size;
        lim.features &= !(kabi::BLK_FEAT_WRITE_CACHE | kabi::BLK_FEAT_FUA);
        if l.write_cache {
            lim.features |= kabi::BLK_FEAT_WRITE_CACHE;
            if l.fua {
                lim.features |= kabi::BLK_FEAT_FUA;
            }
        }
        let max = l.max_bytes >> 9;
        lim.max_hw_discard_sectors = if l.discard { max } else { 0 };
        lim.discard_granularity = if l.discard { l.block_size } else { 0 };
        lim.max_write_zeroes_sectors = if l.write_zeroes { max } else { 0 };
        // SAFETY: `lim_lock` is held (taken above); commit validates, applies
        // and unlocks.
        to_result(unsafe { bindings::queue_limits_commit_update(q, &mut lim) })
    }

    /// Sets how long blk-mq waits before calling `QueueOps::timeout`.
    pub(crate) fn set_timeout(&self, jiffies: u32) {
        // SAFETY: a plain store into the live queue.
        unsafe { bindings::blk_queue_rq_timeout(self.queue(), jiffies.max(1)) };
    }

    /// The number of hardware queues.
    pub(crate) fn hw_queues(&self) -> u32 {
        // SAFETY: the tag set lives as long as `self`; the count changes
        // only in `set_hw_queues`, which the caller serialises.
        unsafe { (*self.tag_set.get()).nr_hw_queues }
    }

    /// Changes the number of hardware queues (`blk_mq_update_nr_hw_queues`:
    /// freezes the queue, waits for requests in flight, remaps the CPUs).
    /// Call without requests held by the driver (an unconfigured device),
    /// since the freeze waits for them.
    pub(crate) fn set_hw_queues(&self, n: u32) {
        if n != self.hw_queues() {
            // SAFETY: the tag set is live and used by this disk's queue only.
            unsafe { bindings::blk_mq_update_nr_hw_queues(self.tag_set.get(), n as i32) };
        }
    }

    /// Marks the disk read-only or writable.
    pub(crate) fn set_read_only(&self, ro: bool) {
        // SAFETY: the disk is live.
        unsafe { bindings::set_disk_ro(self.disk.as_ptr(), ro) };
    }

    /// Has the partition table read at the next open of the disk.
    pub(crate) fn request_partition_scan(&self) {
        // SAFETY: `state` is the disk's atomic flag word; an atomic OR is
        // what C's `set_bit(GD_NEED_PART_SCAN, &disk->state)` does.
        let state = unsafe { core::sync::atomic::AtomicUsize::from_ptr((&raw mut (*self.disk.as_ptr()).state).cast()) };
        state.fetch_or(1 << bindings::GD_NEED_PART_SCAN, core::sync::atomic::Ordering::SeqCst);
    }

    /// Re-reads the partition table now (drops partitions at capacity 0).
    pub(crate) fn rescan_partitions(&self) -> Result {
        let disk = self.disk.as_ptr();
        // SAFETY: `bdev_disk_changed` requires `open_mutex` held, which is
        // taken and released around it.
        let res = unsafe {
            bindings::mutex_lock(&raw mut (*disk).open_mutex);
            let r = bindings::bdev_disk_changed(disk, false);
            bindings::mutex_unlock(&raw mut (*disk).open_mutex);
            r
        };
        to_result(res)
    }

    /// How many opens the disk and its partitions have.
    pub(crate) fn openers(&self) -> u32 {
        // SAFETY: `part0` lives as long as the disk; `bd_openers` is an
        // `atomic_t` (what `disk_openers()` reads with `atomic_read`).
        let n = unsafe {
            let bdev = (*self.disk.as_ptr()).part0;
            core::sync::atomic::AtomicI32::from_ptr(&raw mut (*bdev).bd_openers.counter)
        };
        n.load(core::sync::atomic::Ordering::Relaxed).max(0) as u32
    }

    /// Drops the disk's page cache and sets its capacity to 0
    /// (`invalidate_disk`, as loop does when it is cleared).
    pub(crate) fn invalidate(&self) {
        // SAFETY: the disk is live.
        unsafe { bindings::invalidate_disk(self.disk.as_ptr()) };
    }

    /// Tells the system the medium changed: a new disk sequence number, a
    /// media-change event, and any filesystem still mounted from the old
    /// medium is shut down (`disk_force_media_change`).
    pub(crate) fn media_changed(&self) {
        // SAFETY: the disk is live; the caller holds no lock the block
        // layer's holders could need.
        unsafe { bindings::disk_force_media_change(self.disk.as_ptr()) };
    }

    /// Sends udev a KOBJ_CHANGE for the disk (as loop does on configure
    /// and clear), so it probes the device again.
    pub(crate) fn uevent_change(&self) {
        // SAFETY: `disk_to_dev(disk)` is `&disk->part0->bd_device`, live as
        // long as the disk.
        unsafe {
            let dev = &raw mut (*(*self.disk.as_ptr()).part0).bd_device;
            bindings::kobject_uevent(&raw mut (*dev).kobj, bindings::kobject_action_KOBJ_CHANGE);
        }
    }

    /// Sets the capacity in 512-byte sectors and tells user space.
    pub(crate) fn set_capacity(&self, sectors: u64) {
        // SAFETY: the disk is live; the function locks internally.
        unsafe { bindings::set_capacity_and_notify(self.disk.as_ptr(), sectors) };
    }
}

impl<T: QueueOps> Drop for BlockDevice<T> {
    fn drop(&mut self) {
        // SAFETY: the disk was added in `new`; deleting it drains and stops
        // the queue (no more `queue_rq` or timeouts), then the last reference
        // is put, which releases the queue.
        unsafe {
            bindings::del_gendisk(self.disk.as_ptr());
            bindings::put_disk(self.disk.as_ptr());
            bindings::blk_mq_free_tag_set(self.tag_set.get());
        }
        // SAFETY: `data` came from `into_raw` in `new`; the queue that
        // used it is gone.
        drop(unsafe { Arc::<T>::from_raw(self.data) });
    }
}
