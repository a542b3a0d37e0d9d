//! The cow backend: copy-on-write over a read-only base (docs/cow-format.md).

pub mod delta;
pub mod format;
pub mod storage;
