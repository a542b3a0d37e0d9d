//! ABUSE's server engine and its backends.
//!
//! [`engine`] runs worker threads that fetch batches of requests from a
//! control node, execute them on a [`Backend`], and complete them. Any
//! number of engines, in any number of processes, may serve one device.

pub mod backend;
pub mod blkdev;
pub mod cow;
pub mod engine;
pub mod file;
pub mod filter;
pub mod nbd;
pub mod null;
pub mod qcow2;
pub mod rbd;
pub mod sync;

pub use backend::Backend;
pub use engine::{serve, EngineConfig, Stats};
