// SPDX-License-Identifier: GPL-2.0
//! Module parameters: the 6.12 `module!` macro has none, so this emits the
//! same `__param` and `.modinfo` entries C's `module_param()` does.

use core::cell::UnsafeCell;
use kernel::bindings;

/// A read-only (0444) `uint` module parameter.
pub(crate) struct UintParam(UnsafeCell<u32>);

// SAFETY: the kernel writes the value only while parsing parameters at load,
// before `init` runs; the permissions are 0444, so sysfs never writes it.
// Afterwards it is only read.
unsafe impl Sync for UintParam {}

impl UintParam {
    /// A parameter with its default value.
    pub(crate) const fn new(default: u32) -> Self {
        Self(UnsafeCell::new(default))
    }

    /// The value given at load (or the default).
    pub(crate) fn get(&self) -> u32 {
        // SAFETY: see `impl Sync`: no writer runs once the module is live.
        unsafe { core::ptr::read_volatile(self.0.get()) }
    }
}

/// One `struct kernel_param` entry of the `__param` section.
#[repr(transparent)]
pub(crate) struct KernelParam(bindings::kernel_param);

// SAFETY: the entry is immutable; the kernel only reads it (and writes the
// value it points at, which `UintParam` accounts for).
unsafe impl Sync for KernelParam {}

impl KernelParam {
    /// The entry for `param`, named by the NUL-terminated `name`.
    pub(crate) const fn uint(name: &'static [u8], param: &'static UintParam) -> Self {
        assert!(!name.is_empty() && name[name.len() - 1] == 0);
        Self(bindings::kernel_param {
            name: name.as_ptr().cast(),
            mod_: &raw mut bindings::__this_module,
            ops: &raw const bindings::param_ops_uint,
            perm: 0o444,
            level: -1,
            flags: 0,
            __bindgen_anon_1: bindings::kernel_param__bindgen_ty_1 {
                arg: param.0.get().cast(),
            },
        })
    }
}

/// Copies a string into a fixed-size array (for `.modinfo` entries).
pub(crate) const fn modinfo<const N: usize>(s: &str) -> [u8; N] {
    let bytes = s.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < bytes.len() {
        out[i] = bytes[i];
        i += 1;
    }
    out
}

/// Declares a read-only `uint` module parameter: a static `$static` of type
/// [`UintParam`] registered as `$name` with a description for `modinfo`.
#[macro_export]
macro_rules! module_param_uint {
    ($static:ident, $name:literal, $default:expr, $desc:literal) => {
        static $static: $crate::sys::param::UintParam = $crate::sys::param::UintParam::new($default);
        const _: () = {
            #[link_section = "__param"]
            #[used(compiler)]
            static PARAM: $crate::sys::param::KernelParam =
                $crate::sys::param::KernelParam::uint(concat!($name, "\0").as_bytes(), &$static);
            const TYPE: &str = concat!("parmtype=", $name, ":uint\0");
            const DESC: &str = concat!("parm=", $name, ":", $desc, "\0");
            #[link_section = ".modinfo"]
            #[used(compiler)]
            static MODINFO_TYPE: [u8; TYPE.len()] = $crate::sys::param::modinfo(TYPE);
            #[link_section = ".modinfo"]
            #[used(compiler)]
            static MODINFO_DESC: [u8; DESC.len()] = $crate::sys::param::modinfo(DESC);
        };
    };
}
