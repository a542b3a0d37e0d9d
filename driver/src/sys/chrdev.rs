// SPDX-License-Identifier: GPL-2.0
//! A range of character devices with nodes in /dev (6.12's Rust has no
//! miscdevice or cdev abstraction).

use super::PollTable;
use core::marker::PhantomData;
use kernel::{bindings, error::from_err_ptr, prelude::*, str::CStr};

/// What a file of the region does. One `Data` per open file.
pub(crate) trait FileOps: 'static {
    /// Per-open state, kept in `file->private_data`.
    type Data: Send + Sync;
    /// Opens minor `minor`.
    fn open(minor: u32) -> Result<KBox<Self::Data>>;
    /// The file is released (last close).
    fn release(data: KBox<Self::Data>);
    /// `unlocked_ioctl`.
    fn ioctl(data: &Self::Data, cmd: u32, arg: usize) -> Result<isize>;
    /// `poll`: registers on wait queues through `table`, returns the events.
    fn poll(data: &Self::Data, table: &PollTable) -> u32;
}

const MINORBITS: u32 = 20;

/// `MKDEV(major, minor)`.
pub(crate) const fn mkdev(major: u32, minor: u32) -> u32 {
    (major << MINORBITS) | minor
}

/// `MAJOR(dev)`.
pub(crate) const fn major(dev: u32) -> u32 {
    dev >> MINORBITS
}

/// `new_encode_dev`: dev_t as user space (glibc `makedev`) encodes it.
pub(crate) const fn encode_dev(dev: u32) -> u64 {
    let (major, minor) = (dev >> MINORBITS, dev & ((1 << MINORBITS) - 1));
    ((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)) as u64
}

struct VTable<T>(PhantomData<T>);

impl<T: FileOps> VTable<T> {
    const FOPS: bindings::file_operations = bindings::file_operations {
        owner: &raw mut bindings::__this_module,
        open: Some(Self::open),
        release: Some(Self::release),
        unlocked_ioctl: Some(Self::ioctl),
        compat_ioctl: Self::COMPAT_IOCTL,
        poll: Some(Self::poll),
        // SAFETY: all-zero is the C default for the remaining members
        // (no callback, no flags).
        ..unsafe { core::mem::zeroed() }
    };

    /// # Safety
    /// Called by the VFS with a valid inode and a file being opened.
    unsafe extern "C" fn open(inode: *mut bindings::inode, file: *mut bindings::file) -> i32 {
        // SAFETY: `inode` is valid for the call (caller contract).
        let minor = unsafe { (*inode).i_rdev } & ((1 << MINORBITS) - 1);
        match T::open(minor) {
            Ok(data) => {
                // SAFETY: `file` is valid and not yet shared; private_data is
                // ours until release.
                unsafe { (*file).private_data = KBox::into_raw(data).cast() };
                0
            }
            Err(e) => e.to_errno(),
        }
    }

    /// # Safety
    /// Called once per file by the VFS, after the last user is gone.
    unsafe extern "C" fn release(_inode: *mut bindings::inode, file: *mut bindings::file) -> i32 {
        // SAFETY: `private_data` was set by `open` from `KBox::into_raw`, and
        // release is its last use.
        let data = unsafe { KBox::from_raw((*file).private_data.cast::<T::Data>()) };
        T::release(data);
        0
    }

    /// # Safety
    /// Called by the VFS on an open file of this region.
    unsafe extern "C" fn ioctl(file: *mut bindings::file, cmd: u32, arg: usize) -> isize {
        // SAFETY: the file is open, so `private_data` holds the `T::Data`
        // from `open`, alive until `release`, which cannot run concurrently.
        let data = unsafe { &*(*file).private_data.cast::<T::Data>() };
        T::ioctl(data, cmd, arg).unwrap_or_else(|e| e.to_errno() as isize)
    }

    /// Offered where `compat_ptr` is a zero-extension; elsewhere 32-bit
    /// callers get ENOTTY rather than a wrong conversion.
    const COMPAT_IOCTL: Option<unsafe extern "C" fn(*mut bindings::file, u32, usize) -> isize> =
        if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) { Some(Self::compat_ioctl) } else { None };

    /// A 32-bit caller's ioctl (`compat_ptr_ioctl`). The uapi structs have
    /// the same layout for 32-bit callers (fixed-size fields, no padding: a
    /// host test compiles the C header with -m32), so only the argument
    /// pointer needs converting: `compat_ptr` zero-extends it on x86_64 and
    /// arm64, the architectures this driver builds for.
    ///
    /// # Safety
    /// Called by the VFS on an open file of this region.
    unsafe extern "C" fn compat_ioctl(file: *mut bindings::file, cmd: u32, arg: usize) -> isize {
        // SAFETY: the caller's contract is `ioctl`'s.
        unsafe { Self::ioctl(file, cmd, arg as u32 as usize) }
    }

    /// # Safety
    /// Called by the VFS on an open file of this region.
    unsafe extern "C" fn poll(file: *mut bindings::file, table: *mut bindings::poll_table_struct) -> u32 {
        // SAFETY: as in `ioctl`.
        let data = unsafe { &*(*file).private_data.cast::<T::Data>() };
        T::poll(data, &PollTable { file, table })
    }
}

/// A registered range of character device numbers, their class and nodes.
pub(crate) struct Chrdev<T: FileOps> {
    major: u32,
    count: u32,
    name: &'static CStr,
    class: *mut bindings::class,
    _ops: PhantomData<T>,
}

// SAFETY: the class pointer is only used to create and destroy devices,
// which the driver core serialises itself.
unsafe impl<T: FileOps> Send for Chrdev<T> {}
// SAFETY: as above.
unsafe impl<T: FileOps> Sync for Chrdev<T> {}

impl<T: FileOps> Chrdev<T> {
    /// Registers `count` minors under a dynamic major, and a class `name`.
    pub(crate) fn register(name: &'static CStr, count: u32) -> Result<Self> {
        // SAFETY: `name` and the vtable are 'static; a dynamic major is asked.
        let major = unsafe {
            bindings::__register_chrdev(0, 0, count, name.as_char_ptr(), &VTable::<T>::FOPS)
        };
        if major < 0 {
            return Err(Error::from_errno(major));
        }
        let major = major as u32;
        // SAFETY: `name` is a valid C string that outlives the class.
        let class = from_err_ptr(unsafe { bindings::class_create(name.as_char_ptr()) });
        let class = match class {
            Ok(c) => c,
            Err(e) => {
                // SAFETY: undoes the registration just made.
                unsafe { bindings::__unregister_chrdev(major, 0, count, name.as_char_ptr()) };
                return Err(e);
            }
        };
        Ok(Self { major, count, name, class, _ops: PhantomData })
    }

    /// Creates the node `/dev/<prefix><minor>` for `minor` (mode 0600).
    pub(crate) fn create_node(&self, minor: u32, prefix: &'static CStr) -> Result {
        if minor >= self.count {
            return Err(EINVAL);
        }
        // SAFETY: the class is live; the format takes one C string and one
        // unsigned int, which is what is passed.
        let dev = from_err_ptr(unsafe {
            bindings::device_create(
                self.class,
                core::ptr::null_mut(),
                mkdev(self.major, minor),
                core::ptr::null_mut(),
                c"%s%u".as_ptr().cast(),
                prefix.as_char_ptr(),
                minor as core::ffi::c_uint,
            )
        })?;
        let _ = dev;
        Ok(())
    }
}

impl<T: FileOps> Drop for Chrdev<T> {
    fn drop(&mut self) {
        for minor in 0..self.count {
            // SAFETY: the class is live; destroying a node that was never
            // created is a no-op.
            unsafe { bindings::device_destroy(self.class, mkdev(self.major, minor)) };
        }
        // SAFETY: `class` came from `class_create` and has no devices left.
        unsafe { bindings::class_destroy(self.class) };
        // SAFETY: undoes `register`; no file can be open (the fops pin the
        // module, and we are unloading it).
        unsafe { bindings::__unregister_chrdev(self.major, 0, self.count, self.name.as_char_ptr()) };
    }
}
