// SPDX-License-Identifier: GPL-2.0
//! Pages of the driver's own that a file's data is moved through.
//!
//! File I/O may sleep for as long as the file wants (a file on a hung
//! network mount, or on a filesystem stacked on this very device), and a
//! request whose pages were being read or written meanwhile could be
//! neither failed by RESET nor fenced by the timeout: its pages would be
//! handed back to their owner while the I/O still used them. So the I/O
//! goes to or from these pages, which belong to the PUT doing it, while
//! the request stays in its slot where RESET and the timeout can end it;
//! the data crosses between these pages and the request's in a copy that
//! cannot sleep.

use super::file::File;
use kernel::{bindings, page::Page, prelude::*};

const PAGE: usize = bindings::PAGE_SIZE;

/// `len` bytes in pages of their own.
pub(crate) struct Bounce {
    pages: KVec<Page>,
    len: usize,
}

impl Bounce {
    /// Room for `len` bytes (ENOMEM if the pages cannot be had).
    pub(crate) fn new(len: usize) -> Result<Self> {
        let n = len.div_ceil(PAGE);
        // Charged to the server's memory cgroup, and quiet when it fails:
        // the server asked for it, the server gets ENOMEM.
        let gfp = GFP_KERNEL_ACCOUNT | __GFP_NOWARN;
        let mut pages = KVec::with_capacity(n, gfp)?;
        for _ in 0..n {
            pages.push(Page::alloc_page(gfp)?, gfp)?;
        }
        Ok(Self { pages, len })
    }

    /// Copies `src` into the pages from byte `at` on.
    pub(crate) fn write_at(&mut self, mut at: usize, mut src: &[u8]) {
        while !src.is_empty() && at < self.len {
            let (page, off) = (at / PAGE, at % PAGE);
            let n = src.len().min(PAGE - off).min(self.len - at);
            // SAFETY: `src` holds `n` readable bytes; `off + n <= PAGE`.
            let _ = unsafe { self.pages[page].write_raw(src.as_ptr(), off, n) };
            at += n;
            src = &src[n..];
        }
    }

    /// Copies the pages from byte `at` on into `dst`.
    pub(crate) fn read_at(&self, mut at: usize, mut dst: &mut [u8]) {
        while !dst.is_empty() && at < self.len {
            let (page, off) = (at / PAGE, at % PAGE);
            let n = dst.len().min(PAGE - off).min(self.len - at);
            // SAFETY: `dst` has room for `n` bytes; `off + n <= PAGE`.
            let _ = unsafe { self.pages[page].read_raw(dst.as_mut_ptr(), off, n) };
            at += n;
            dst = &mut core::mem::take(&mut dst)[n..];
        }
    }

    /// Reads the file at byte `pos` into the pages (`write` false), or
    /// writes the pages to it (`vfs_iter_read`/`vfs_iter_write` over a bvec
    /// iterator, as loop does). Returns the bytes moved (fewer at the
    /// file's end) and any error. May sleep.
    pub(crate) fn file_io(&self, file: &File, pos: u64, write: bool) -> (usize, Result) {
        let mut vecs = match KVec::with_capacity(self.pages.len(), GFP_KERNEL) {
            Ok(v) => v,
            Err(e) => return (0, Err(e.into())),
        };
        let mut left = self.len;
        for page in self.pages.iter() {
            let bv = bindings::bio_vec { bv_page: page.as_ptr(), bv_len: left.min(PAGE) as u32, bv_offset: 0 };
            left -= bv.bv_len as usize;
            // Within the capacity reserved above: cannot fail.
            let _ = vecs.push(bv, GFP_KERNEL);
        }
        let (mut moved, mut pos) = (0usize, pos as i64);
        while moved < self.len {
            // SAFETY: all-zero is a valid (empty) iterator for
            // `iov_iter_bvec` to initialise.
            let mut iter: bindings::iov_iter = unsafe { core::mem::zeroed() };
            let dir = if write { bindings::ITER_SOURCE } else { bindings::ITER_DEST };
            // SAFETY: `vecs` describes our own pages, alive until `self`
            // is dropped, which cannot happen during this call.
            unsafe { bindings::iov_iter_bvec(&mut iter, dir, vecs.as_ptr(), vecs.len() as _, self.len) };
            // SAFETY: advancing within the iterator's own `len` bytes.
            unsafe { bindings::iov_iter_advance(&mut iter, moved) };
            let ret = if write {
                // SAFETY: a live file and an iterator over live pages; the
                // call may sleep (the caller holds no lock).
                unsafe { bindings::vfs_iter_write(file.as_ptr(), &mut iter, &mut pos, 0) }
            } else {
                // SAFETY: as above.
                unsafe { bindings::vfs_iter_read(file.as_ptr(), &mut iter, &mut pos, 0) }
            };
            if ret < 0 {
                return (moved, Err(Error::from_errno(ret as i32)));
            }
            if ret == 0 {
                break;
            }
            moved += ret as usize;
        }
        (moved, Ok(()))
    }
}
