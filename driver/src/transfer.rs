// SPDX-License-Identifier: GPL-2.0
//! GET_BIO, PUT_BIO and SERVE: moving requests and their data between the
//! queues and a server's memory, in the server's process context. Data is
//! copied once, between the request's pages and the server's buffer;
//! nothing is allocated per call (requests move in fixed chunks).

use crate::queue::{split_id, Batch, PutError, CHUNK};
use crate::requests::Requests;
use crate::sys::{blk::Status, msecs_to_jiffies, Process, ENOMSG, ESTALE};
use crate::uapi::*;
use core::mem::size_of;
use kernel::{prelude::*, uaccess::UserSlice};

/// Reads and checks a GET_BIO/PUT_BIO header at `arg`.
fn read_xfer(arg: usize) -> Result<AbuseXfer> {
    let x: AbuseXfer = UserSlice::new(arg, size_of::<AbuseXfer>()).reader().read()?;
    if x.flags != 0 || x.reserved != [0; 4] || x.count == 0 || x.count > ABUSE_MAX_BATCH {
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
}

/// What a fetch got.
struct Fetched {
    n: u32,
    /// It stopped because the next payload did not fit the buffer.
    no_room: bool,
}

/// Fetches pending requests, from queue `hint` first, into `dst`. A copy
/// that fails puts its chunk back, first in line; what was fetched before
/// it stays fetched and is reported (the fault comes back on the next call).
fn fetch(reqs: &Requests, opener: u64, hint: u32, dst: &Dest) -> Result<Fetched> {
    let mut process = None;
    let (mut n, mut used) = (0u32, 0u64);
    for q in reqs.from_hint(hint) {
        loop {
            let want = (dst.count - n) as usize;
            if want == 0 {
                return Ok(Fetched { n, no_room: false });
            }
            let mut batch = Batch::new();
            let no_room = q.take_pending(dst.data_len, &mut used, want, &mut batch);
            let got = batch.len();
            if got > 0 {
                let at = dst.bios + n as u64 * size_of::<AbuseBio>() as u64;
                match hand_out(at, dst.data, &batch) {
                    Ok(()) => {
                        let process = process.get_or_insert_with(Process::current);
                        q.fetched(batch, opener, process);
                        n += got as u32;
                    }
                    Err(e) => {
                        q.unfetch(batch);
                        reqs.wake_for(q.hw());
                        return if n > 0 { Ok(Fetched { n, no_room: false }) } else { Err(e) };
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

/// Copies WRITE payloads into the data buffer and the descriptors to
/// `bios`.
fn hand_out(bios: u64, data: u64, batch: &Batch) -> Result {
    let mut descs = UserSlice::new(bios as usize, batch.len() * size_of::<AbuseBio>()).writer();
    for t in batch.items() {
        let mut bio = t.bio;
        let has_data = matches!(bio.cmd, ABUSE_CMD_READ | ABUSE_CMD_WRITE) && bio.len > 0;
        if has_data {
            // `addr` holds the payload's offset in the buffer.
            bio.addr = data.checked_add(bio.addr).ok_or(EFAULT)?;
            if bio.cmd == ABUSE_CMD_WRITE {
                let mut dst = UserSlice::new(bio.addr as usize, bio.len as usize).writer();
                t.rq.copy_to_user(&mut dst)?;
            }
        }
        descs.write(&bio)?;
    }
    Ok(())
}

/// ABUSE_GET_BIO: fetches pending requests for the server.
pub(crate) fn get_bio(reqs: &Requests, opener: u64, arg: usize) -> Result<isize> {
    let mut x = read_xfer(arg)?;
    // The header must take the count back: checked before anything is
    // fetched, so that fetched requests are never left unreported.
    write_back(arg, &x)?;
    let dst = Dest { bios: x.bios, data: x.data, data_len: x.data_len, count: x.count };
    let got = fetch(reqs, opener, opener as u32, &dst)?;
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
pub(crate) fn put_bio(reqs: &Requests, arg: usize) -> Result<isize> {
    let mut x = read_xfer(arg)?;
    let (done, result) = complete(reqs, x.bios, x.count);
    x.count = done;
    let written = write_back(arg, &x);
    result.and(written).map(|()| 0)
}

/// ABUSE_SERVE: completes a batch, then fetches the next, sleeping when
/// none is pending.
pub(crate) fn serve(reqs: &Requests, opener: u64, arg: usize) -> Result<isize> {
    let mut x: AbuseServe = UserSlice::new(arg, size_of::<AbuseServe>()).reader().read()?;
    let valid = x.flags == 0
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
    let (done, result) = complete(reqs, x.bios, x.put);
    x.put = done;
    let fetched = result.and_then(|()| {
        let dst = Dest { bios: x.bios, data: x.data, data_len: x.data_len, count: x.count };
        let mut got = fetch(reqs, opener, x.queue, &dst)?;
        if got.n == 0 && !got.no_room && x.wait_ms > 0 {
            reqs.sleep(x.queue, msecs_to_jiffies(x.wait_ms));
            got = fetch(reqs, opener, x.queue, &dst)?;
        }
        if got.n == 0 && got.no_room {
            // The next request's payload does not fit the buffer at all.
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
fn complete(reqs: &Requests, bios: u64, count: u32) -> (u32, Result) {
    let mut reader = UserSlice::new(bios as usize, count as usize * size_of::<AbuseBio>()).reader();
    let mut done = 0u32;
    while done < count {
        let bio: AbuseBio = match reader.read() {
            Ok(bio) => bio,
            Err(e) => return (done, Err(e)),
        };
        if let Err(e) = put_one(reqs, &bio) {
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
/// ZEROES other than on a successful READ).
fn status_of(bio: &AbuseBio) -> Option<Status> {
    let with_errno = bio.flags & ABUSE_BIO_ERRNO != 0;
    if bio.flags & ABUSE_BIO_ZEROES != 0 && (bio.cmd != ABUSE_CMD_READ || bio.result != ABUSE_RESULT_OKAY) {
        return None;
    }
    match (bio.result, with_errno) {
        (ABUSE_RESULT_OKAY, false) if bio.error == 0 => Some(Status::Ok),
        (ABUSE_RESULT_MEDIA_FAILURE | ABUSE_RESULT_DEVICE_FAILURE, false) if bio.error == 0 => Some(Status::IoErr),
        (ABUSE_RESULT_MEDIA_FAILURE | ABUSE_RESULT_DEVICE_FAILURE, true)
            if (1..=ABUSE_MAX_ERRNO).contains(&bio.error) =>
        {
            Some(Status::Errno(bio.error))
        }
        _ => None,
    }
}

fn put_one(reqs: &Requests, bio: &AbuseBio) -> Result {
    // Checked before the request is touched: a bad entry changes nothing.
    let status = status_of(bio).ok_or(EINVAL)?;
    let (gen, hw, tag) = split_id(bio.id);
    let q = reqs.get(hw).ok_or_else(ESTALE)?;
    let refused = |e| match e {
        PutError::Stale => ESTALE(),
        PutError::Mismatch => EINVAL,
    };
    if bio.result == ABUSE_RESULT_OKAY && bio.cmd == ABUSE_CMD_READ && bio.len > 0 && bio.flags & ABUSE_BIO_ZEROES != 0 {
        // Out of the slot while it is filled (not under the lock: up to
        // max_bytes of memset); nothing is read from user memory.
        let t = q.take_fetched(bio, gen, tag).map_err(refused)?;
        t.rq.zero_fill();
        q.complete(t, Status::Ok);
        return Ok(());
    }
    if bio.result == ABUSE_RESULT_OKAY && bio.cmd == ABUSE_CMD_READ && bio.len > 0 {
        // Out of the slot while its data is copied from user memory (which
        // may fault and sleep): a RESET meanwhile only marks it.
        let t = q.take_fetched(bio, gen, tag).map_err(refused)?;
        let mut src = UserSlice::new(bio.addr as usize, bio.len as usize).reader();
        if let Err(e) = t.rq.copy_from_user(&mut src) {
            // Still fetched: a correct PUT can complete it.
            if q.untake(t) {
                reqs.wake_for(hw);
            }
            return Err(e);
        }
        q.complete(t, Status::Ok);
        return Ok(());
    }
    q.complete_fetched(bio, gen, tag, status).map_err(refused)?;
    if bio.result == ABUSE_RESULT_DEVICE_FAILURE {
        reqs.fail_all()?;
    }
    Ok(())
}
