//! ABUSE's VM test suite, guest side: scenarios that drive the real module
//! in the real kernel, and the runner that executes them.

pub mod guest;
pub mod hostile;
pub mod scenarios;
pub mod server;
