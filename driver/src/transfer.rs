// SPDX-License-Identifier: GPL-2.0
//! GET_BIO, PUT_BIO and SERVE: moving requests and their data between the
//! queues and a server's memory, in the server's process context. Data is
//! copied once between the request's pages and the server's buffer, with
//! page faults disabled (a fault puts the request back, faults the memory
//! in with nothing held, and tries again); or moved between a file the
//! server names (ABUSE_BIO_FILE) and pages of the PUT's own, the request
//! staying in its slot meanwhile (see `sys::bounce`). Fetching allocates
//! nothing (requests move in fixed chunks).

use crate::device::Device;
use crate::queue::{split_id, Batch, PutError, CHUNK};
use crate::requests::Requests;
use crate::sys::{bounce::Bounce, blk::Status, file::File, msecs_to_jiffies, user, NoIoScope, Process, ENOMSG, ESTALE};
use crate::uapi::*;
use core::mem::size_of;
use kernel::{prelude::*, uaccess::UserSlice};

/// How often a copy that faults is retried (the memory faulted in each
/// time) before the call fails with EFAULT, the requests left as they were.
const FAULT_RETRIES: u32 = 8;

/// One GET/PUT/SERVE call: the device's queues, the driver's block major
/// (no file a request's data is moved to may live on one of its disks), the
/// configuration generation the call is pinned to, and the open file.
pub(crate) struct Call<'a> {
    reqs: &'a Requests,
    major: u32,
    pin: u32,
    opener: u64,
}

impl<'a> Call<'a> {
    pub(crate) fn new(dev: &'a Device, pin: u32, opener: u64) -> Self {
        Call { reqs: dev.requests(), major: dev.major(), pin, opener }
    }
}

/// Reads and checks a GET_BIO/PUT_BIO header at `arg`, whose flags may be
/// `flags`.
fn read_xfer(arg: usize, flags: u32) -> Result<AbuseXfer> {
    let x: AbuseXfer = UserSlice::new(arg, size_of::<AbuseXfer>()).reader().read()?;
    if x.flags & !flags != 0 || x.reserved != [0; 4] || x.count == 0 || x.count > ABUSE_MAX_BATCH {
        return Err(EINVAL);
    }
    Ok(x)
}

/// Writes a header back to `arg`.
fn write_back<T: kernel::types::AsBytes>(arg: usize, x: &T) -> Result {
    UserSlice::new(arg, size_of::<T>()).writer().write(x)
}

/// Where fetched requests go in the server's memory.
struct Dest {
    /// User address of the descriptor array.
    bios: u64,
    /// User address and size of the data buffer.
    data: u64,
    data_len: u64,
    /// Room in the descriptor array.
    count: u32,
    /// Descriptors only (ABUSE_XFER_DESCRIPTORS): no payload is copied.
    descriptors: bool,
}

impl Dest {
    fn new(bios: u64, data: u64, data_len: u64, count: u32, flags: u32) -> Self {
        let descriptors = flags & ABUSE_XFER_DESCRIPTORS != 0;
        // Without payloads, the buffer's room bounds nothing.
        let data_len = if descriptors { u64::MAX } else { data_len };
        Dest { bios, data, data_len, count, descriptors }
    }
}

/// What a fetch got.
struct Fetched {
    n: u32,
    /// It stopped because the next payload did not fit the buffer.
    no_room: bool,
}

/// Fetches pending requests, from queue `hint` first, into `dst`. A copy
/// that faults puts its chunk back, first in line, faults the server's
/// memory in and tries again; what was fetched before it stays fetched and
/// is reported.
fn fetch(call: &Call<'_>, hint: u32, dst: &Dest) -> Result<Fetched> {
    let mut process = None;
    let (mut n, mut used) = (0u32, 0u64);
    let mut faults = 0;
    for q in call.reqs.from_hint(hint) {
        // An empty queue's lock is left alone (a request queued meanwhile
        // is found by the check before sleeping, or wakes a sleeper).
        if !q.has_pending() {
            continue;
        }
        loop {
            let want = (dst.count - n) as usize;
            if want == 0 {
                return Ok(Fetched { n, no_room: false });
            }
            let mut batch = Batch::new();
            let start = used;
            let no_room = q.take_pending(call.pin, dst.data_len, &mut used, want, &mut batch);
            let got = batch.len();
            if got > 0 {
                let at = dst.bios + n as u64 * size_of::<AbuseBio>() as u64;
                match hand_out(at, dst, &batch) {
                    Ok(()) => {
                        let process = process.get_or_insert_with(Process::current);
                        q.fetched(batch, call.opener, process);
                        n += got as u32;
                    }
                    Err(e) => {
                        q.unfetch(batch);
                        call.reqs.wake_for(q.hw());
                        if n > 0 {
                            return Ok(Fetched { n, no_room: false });
                        }
                        faults += 1;
                        if faults > FAULT_RETRIES {
                            return Err(e);
                        }
                        // Nothing held: fault in where this chunk goes
                        // (descriptors, and the payloads' part of the
                        // buffer), then take it again.
                        let descs = got * size_of::<AbuseBio>();
                        user::fault_in_writeable(at as usize, descs)?;
                        if !dst.descriptors && used > start {
                            let from = dst.data.checked_add(start).ok_or(EFAULT)?;
                            user::fault_in_writeable(from as usize, (used - start) as usize)?;
                        }
                        used = start;
                        continue;
                    }
                }
            }
            if no_room {
                return Ok(Fetched { n, no_room: true });
            }
            if got < want.min(CHUNK) {
                // This queue is drained: on to the next.
                break;
            }
        }
    }
    Ok(Fetched { n, no_room: false })
}

/// Copies WRITE payloads into the data buffer (unless `dst` takes
/// descriptors only) and the descriptors to `bios`, with page faults
/// disabled (the requests are held: no sleeping).
fn hand_out(bios: u64, dst: &Dest, batch: &Batch) -> Result {
    let mut at = bios as usize;
    for t in batch.items() {
        let mut bio = t.bio;
        let has_data = matches!(bio.cmd, ABUSE_CMD_READ | ABUSE_CMD_WRITE) && bio.len > 0;
        if dst.descriptors {
            bio.addr = 0;
        } else if has_data {
            // `addr` holds the payload's offset in the buffer.
            bio.addr = dst.data.checked_add(bio.addr).ok_or(EFAULT)?;
            if bio.cmd == ABUSE_CMD_WRITE {
                t.rq.copy_to_user_nofault(bio.addr as usize)?;
            }
        }
        user::write_value_nofault(at, &bio)?;
        at += size_of::<AbuseBio>();
    }
    Ok(())
}

/// ABUSE_GET_BIO: fetches pending requests for the server.
pub(crate) fn get_bio(call: &Call<'_>, arg: usize) -> Result<isize> {
    let mut x = read_xfer(arg, ABUSE_XFER_DESCRIPTORS)?;
    // The header must take the count back: checked before anything is
    // fetched, so that fetched requests are never left unreported.
    write_back(arg, &x)?;
    let dst = Dest::new(x.bios, x.data, x.data_len, x.count, x.flags);
    let got = fetch(call, call.opener as u32, &dst)?;
    if got.n == 0 {
        // The next request's payload does not fit the buffer at all.
        return Err(if got.no_room { EINVAL } else { ENOMSG() });
    }
    x.count = got.n;
    write_back(arg, &x)?;
    Ok(0)
}

/// ABUSE_PUT_BIO: completes fetched requests, in order, stopping at the
/// first entry that fails; writes back how many completed.
pub(crate) fn put_bio(call: &Call<'_>, arg: usize) -> Result<isize> {
    let mut x = read_xfer(arg, 0)?;
    let (done, result) = complete(call, x.bios, x.count);
    x.count = done;
    let written = write_back(arg, &x);
    result.and(written).map(|()| 0)
}

/// ABUSE_SERVE: completes a batch, then fetches the next, sleeping when
/// none is pending.
pub(crate) fn serve(call: &Call<'_>, arg: usize) -> Result<isize> {
    let reqs = call.reqs;
    let mut x: AbuseServe = UserSlice::new(arg, size_of::<AbuseServe>()).reader().read()?;
    let valid = x.flags & !ABUSE_XFER_DESCRIPTORS == 0
        && x.reserved0 == 0
        && x.reserved == [0; 2]
        && x.count <= ABUSE_MAX_BATCH
        && x.put <= x.count
        && x.count > 0;
    if !valid {
        return Err(EINVAL);
    }
    // As in GET_BIO: the counts must be able to go back.
    write_back(arg, &x)?;
    let (done, result) = complete(call, x.bios, x.put);
    x.put = done;
    let fetched = result.and_then(|()| {
        let dst = Dest::new(x.bios, x.data, x.data_len, x.count, x.flags);
        let mut got = fetch(call, x.queue, &dst)?;
        if got.n == 0 && !got.no_room && x.wait_ms > 0 {
            reqs.sleep(x.queue, msecs_to_jiffies(x.wait_ms));
            got = fetch(call, x.queue, &dst)?;
        }
        if got.n == 0 && got.no_room {
            // The next request's payload does not fit the buffer at all;
            // another server's may (and this one may have had the wake-up).
            reqs.wake_for(x.queue);
            return Err(EINVAL);
        }
        Ok(got.n)
    });
    x.count = *fetched.as_ref().unwrap_or(&0);
    write_back(arg, &x)?;
    fetched.map(|_| 0)
}

/// Completes the `count` entries at `bios` in order, stopping at the first
/// that fails: how many completed, and the failure.
fn complete(call: &Call<'_>, bios: u64, count: u32) -> (u32, Result) {
    let mut reader = UserSlice::new(bios as usize, count as usize * size_of::<AbuseBio>()).reader();
    let mut done = 0u32;
    while done < count {
        let bio: AbuseBio = match reader.read() {
            Ok(bio) => bio,
            Err(e) => return (done, Err(e)),
        };
        if let Err(e) = put_one(call, &bio) {
            return (done, Err(e));
        }
        done += 1;
        if bio.result == ABUSE_RESULT_DEVICE_FAILURE {
            // Everything else outstanding has just been failed.
            break;
        }
    }
    (done, Ok(()))
}

/// The status a PUT entry asks for: `None` if the entry is malformed (an
/// errno without a failure result, out of range, or set without the flag;
/// ZEROES other than on a successful READ; FILE other than on a successful
/// READ or WRITE, with another data flag, or with an offset past `off_t`).
fn status_of(bio: &AbuseBio) -> Option<Status> {
    let with_errno = bio.flags & ABUSE_BIO_ERRNO != 0;
    let ok = bio.result == ABUSE_RESULT_OKAY;
    if bio.flags & ABUSE_BIO_ZEROES != 0 && (bio.cmd != ABUSE_CMD_READ || !ok) {
        return None;
    }
    if bio.flags & ABUSE_BIO_FILE != 0 {
        let fits = bio.addr.checked_add(bio.len as u64).is_some_and(|end| end <= i64::MAX as u64);
        let data_op = matches!(bio.cmd, ABUSE_CMD_READ | ABUSE_CMD_WRITE);
        return (data_op && ok && fits && bio.flags & (ABUSE_BIO_ZEROES | ABUSE_BIO_ERRNO) == 0).then_some(Status::Ok);
    }
    match (bio.result, with_errno) {
        (ABUSE_RESULT_OKAY, false) if bio.error == 0 => Some(Status::Ok),
        (ABUSE_RESULT_MEDIA_FAILURE | ABUSE_RESULT_DEVICE_FAILURE, false) if bio.error == 0 => Some(Status::IoErr),
        (ABUSE_RESULT_MEDIA_FAILURE | ABUSE_RESULT_DEVICE_FAILURE, true)
            if (1..=ABUSE_MAX_ERRNO).contains(&bio.error) =>
        {
            Some(Status::from_errno(bio.error))
        }
        _ => None,
    }
}

/// Why a PUT entry was refused, as its errno.
fn refused(e: PutError) -> Error {
    match e {
        PutError::Stale => ESTALE(),
        PutError::Mismatch => EINVAL,
        PutError::Busy => EBUSY,
    }
}

fn put_one(call: &Call<'_>, bio: &AbuseBio) -> Result {
    // Checked before the request is touched: a bad entry changes nothing.
    let status = status_of(bio).ok_or(EINVAL)?;
    let (gen, hw, tag) = split_id(bio.id);
    let q = call.reqs.get(hw).ok_or_else(ESTALE)?;
    if bio.flags & ABUSE_BIO_FILE != 0 && bio.len > 0 {
        return put_file(call, bio);
    }
    if bio.result == ABUSE_RESULT_OKAY && bio.cmd == ABUSE_CMD_READ && bio.len > 0 && bio.flags & ABUSE_BIO_ZEROES != 0 {
        // Nothing is read from user memory, so nothing can fail: retired
        // first (one pass under the lock), then filled out of the lock (up
        // to max_bytes of memset) and ended.
        let rq = q.retire_fetched(call.pin, bio, gen, tag, Status::Ok).map_err(refused)?;
        rq.zero_fill(0);
        rq.end(Status::Ok);
        return Ok(());
    }
    if bio.result == ABUSE_RESULT_OKAY && bio.cmd == ABUSE_CMD_READ && bio.len > 0 {
        // Out of the slot while its data is copied from user memory, with
        // page faults disabled; a fault puts it back and is taken with
        // nothing held.
        let mut faults = 0;
        loop {
            let t = q.take_fetched(call.pin, bio, gen, tag).map_err(refused)?;
            match t.rq.copy_from_user_nofault(bio.addr as usize) {
                Ok(()) => {
                    q.complete(t, Status::Ok);
                    return Ok(());
                }
                Err(e) => {
                    // Still fetched: a correct PUT can complete it.
                    if q.untake(t) {
                        call.reqs.wake_for(hw);
                    }
                    faults += 1;
                    if faults > FAULT_RETRIES {
                        return Err(e);
                    }
                    user::fault_in_readable(bio.addr as usize, bio.len as usize)?;
                }
            }
        }
    }
    q.complete_fetched(call.pin, bio, gen, tag, status).map_err(refused)?;
    if bio.result == ABUSE_RESULT_DEVICE_FAILURE {
        call.reqs.fail_all(Some(call.pin));
    }
    Ok(())
}

/// A READ or WRITE completed with ABUSE_BIO_FILE: the driver moves its data
/// between the request and the file `bio.error` names, at byte `bio.addr`.
/// The file I/O goes through pages of this call's own while the request
/// stays in its slot (`Moving`): RESET fails it there, the timeout fences
/// this process, and a result that comes too late changes nothing.
fn put_file(call: &Call<'_>, bio: &AbuseBio) -> Result {
    let (gen, hw, tag) = split_id(bio.id);
    let q = call.reqs.get(hw).ok_or_else(ESTALE)?;
    let write = bio.cmd == ABUSE_CMD_WRITE;
    // No request is larger: a forged length allocates nothing.
    if bio.len == 0 || bio.len > ABUSE_MAX_BIO_BYTES {
        return Err(EINVAL);
    }
    let file = File::get(bio.error)?;
    // What loop accepts, and never a file whose data lives on one of this
    // driver's disks: its I/O could queue behind the very request it is
    // for. The kind of file first: it is what is wrong with a pipe, whatever
    // its direction.
    if !file.is_regular_or_block() || file.lives_on_major(call.major) {
        return Err(EINVAL);
    }
    if !file.opened_for(write) {
        return Err(EBADF);
    }
    let len = bio.len as usize;
    // Everything from here on, the bounce pages too, allocates without
    // I/O: reclaim writing back to this device would wait for this server.
    let _noio = NoIoScope::enter();
    let mut bounce = Bounce::new(len)?;
    let mover = Process::current();
    let mut fua = false;
    if write {
        // The payload is copied out while the request is held (no sleep),
        // then the request goes back to its slot for the write.
        let t = q.take_fetched(call.pin, bio, gen, tag).map_err(refused)?;
        t.rq.copy_to_bounce(&mut bounce);
        fua = t.rq.is_fua();
        q.take_to_move(t, &mover).map_err(refused)?;
    } else {
        q.start_move(call.pin, bio, gen, tag, &mover).map_err(refused)?;
    }
    let (moved, res) = {
        let (moved, res) = bounce.file_io(&file, bio.addr, write);
        // The request's own FUA, whatever the entry says.
        let sync = fua && res.is_ok() && moved == len;
        (moved, if sync { file.sync_range(bio.addr, len as u64) } else { res })
    };
    let short = res.is_err() || moved < len;
    let refusal = match res {
        // A signal cut the I/O short (the server is being killed, say):
        // the request is the next server's to do whole, not a failure.
        _ if short && kernel::current!().signal_pending() => Some(EINTR),
        // The file refused the operation before doing any (no such
        // operation, misaligned O_DIRECT): a bad PUT.
        Err(e) if moved == 0 && (e == EBADF || e == EINVAL) => Some(e),
        _ => None,
    };
    if let Some(e) = refusal {
        if q.stop_move(gen, tag) {
            call.reqs.wake_for(hw);
        }
        return Err(e);
    }
    let status = match res {
        Err(e) => Status::from_errno(e.to_errno().unsigned_abs()),
        // A WRITE that came up short, as loop takes it.
        Ok(()) if write && moved < len => Status::IoErr,
        Ok(()) => Status::Ok,
    };
    // Gone meanwhile (RESET, the timeout): nothing changes.
    let rq = q.finish_move(gen, tag, status).ok_or_else(ESTALE)?;
    if !write && status == Status::Ok {
        // Past the file's end a READ reads zeroes.
        rq.copy_from_bounce(&bounce, moved);
    }
    rq.end(status);
    Ok(())
}
