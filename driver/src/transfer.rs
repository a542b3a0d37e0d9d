// SPDX-License-Identifier: GPL-2.0
//! GET_BIO and PUT_BIO: moving requests and their data between the queue
//! and a server's memory, in the server's process context.

use crate::queue::{Batch, PutError, Queue};
use crate::sys::{blk::Status, Process, ENOMSG, ESTALE};
use crate::uapi::*;
use core::mem::size_of;
use kernel::{prelude::*, uaccess::UserSlice};

/// Reads and checks the batch header at `arg`.
fn read_xfer(arg: usize) -> Result<(AbuseXfer, kernel::uaccess::UserSliceWriter)> {
    let (mut r, w) = UserSlice::new(arg, size_of::<AbuseXfer>()).reader_writer();
    let x: AbuseXfer = r.read()?;
    if x.flags != 0 || x.reserved != [0; 4] || x.count == 0 || x.count > ABUSE_MAX_BATCH {
        return Err(EINVAL);
    }
    Ok((x, w))
}

/// ABUSE_GET_BIO: fetches pending requests for the server.
pub(crate) fn get_bio(queue: &Queue, opener: u64, arg: usize) -> Result<isize> {
    let (mut x, mut hdr) = read_xfer(arg)?;
    let mut batch = Batch::new(x.count as usize)?;
    let no_room = queue.take_pending(x.data_len, &mut batch);
    if batch.is_empty() {
        // The next request's payload does not fit the buffer at all.
        return Err(if no_room { EINVAL } else { ENOMSG() });
    }
    match hand_out(&mut x, &batch).and_then(|()| hdr.write(&x)) {
        Ok(()) => {
            queue.fetched(batch, opener, &Process::current());
            Ok(0)
        }
        Err(e) => {
            // Nothing is lost: the requests go back, first in line.
            queue.unfetch(batch);
            Err(e)
        }
    }
}

/// Copies WRITE payloads into the data buffer and the descriptors into the
/// array; sets `x.count`.
fn hand_out(x: &mut AbuseXfer, batch: &Batch) -> Result {
    let n = batch.items().len();
    let mut descs = UserSlice::new(x.bios as usize, n * size_of::<AbuseBio>()).writer();
    for t in batch.items() {
        let mut bio = t.bio;
        let has_data = matches!(bio.cmd, ABUSE_CMD_READ | ABUSE_CMD_WRITE) && bio.len > 0;
        if has_data {
            // `addr` holds the payload's offset in the buffer.
            bio.addr = x.data.checked_add(bio.addr).ok_or(EFAULT)?;
            if bio.cmd == ABUSE_CMD_WRITE {
                let mut dst = UserSlice::new(bio.addr as usize, bio.len as usize).writer();
                t.rq.copy_to_user(&mut dst)?;
            }
        }
        descs.write(&bio)?;
    }
    x.count = n as u32;
    Ok(())
}

/// ABUSE_PUT_BIO: completes fetched requests, in order, stopping at the
/// first entry that fails; writes back how many completed.
pub(crate) fn put_bio(queue: &Queue, arg: usize) -> Result<isize> {
    let (mut x, mut hdr) = read_xfer(arg)?;
    let n = x.count as usize;
    let mut reader = UserSlice::new(x.bios as usize, n * size_of::<AbuseBio>()).reader();
    let mut entries = KVec::with_capacity(n, GFP_KERNEL)?;
    for _ in 0..n {
        entries.push(reader.read::<AbuseBio>()?, GFP_KERNEL)?;
    }
    let mut done = 0u32;
    let mut result = Ok(0);
    for bio in entries.iter() {
        if let Err(e) = put_one(queue, bio) {
            result = Err(e);
            break;
        }
        done += 1;
        if bio.result == ABUSE_RESULT_DEVICE_FAILURE {
            // Everything else outstanding has just been failed.
            break;
        }
    }
    x.count = done;
    let written = hdr.write(&x);
    result.and_then(|r| written.map(|()| r))
}

/// The status a PUT entry asks for: `None` if the entry is malformed (an
/// errno without a failure result, out of range, or set without the flag).
fn status_of(bio: &AbuseBio) -> Option<Status> {
    let with_errno = bio.flags & ABUSE_BIO_ERRNO != 0;
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

fn put_one(queue: &Queue, bio: &AbuseBio) -> Result {
    // Checked before the request is touched: a bad entry changes nothing.
    let status = status_of(bio).ok_or(EINVAL)?;
    let t = queue.take_fetched(bio).map_err(|e| match e {
        PutError::Stale => ESTALE(),
        PutError::Mismatch => EINVAL,
    })?;
    match bio.result {
        ABUSE_RESULT_OKAY => {
            if bio.cmd == ABUSE_CMD_READ && bio.len > 0 {
                let mut src = UserSlice::new(bio.addr as usize, bio.len as usize).reader();
                if let Err(e) = t.rq.copy_from_user(&mut src) {
                    // Still fetched: a correct PUT can complete it.
                    queue.untake(t);
                    return Err(e);
                }
            }
            queue.complete(t, Status::Ok);
        }
        ABUSE_RESULT_MEDIA_FAILURE => queue.complete(t, status),
        _ => {
            queue.complete(t, status);
            queue.fail_all()?;
        }
    }
    Ok(())
}
