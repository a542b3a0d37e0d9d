//! What the engine needs of a control node, as a trait: the real
//! [`Control`] in production, a fake device in the host tests.

use std::time::Duration;

use abuse_sys::{AbuseBio, AbuseStatus, Control};

/// A control node the engine serves.
pub trait ControlDevice: Send + 'static {
    /// ABUSE_GET_STATUS.
    fn status(&self) -> abuse_sys::Result<AbuseStatus>;
    /// ABUSE_GET_BIO: how many were fetched (0: nothing pending).
    fn get_bios(&self, bios: &mut [AbuseBio], data: &mut [u8]) -> abuse_sys::Result<usize>;
    /// ABUSE_PUT_BIO: how many completed.
    fn put_bios(&self, bios: &[AbuseBio]) -> abuse_sys::Result<usize>;
    /// Waits until requests are pending or `timeout` passes.
    fn wait(&self, timeout: Duration) -> abuse_sys::Result<()>;
    /// The node's path, for messages.
    fn path(&self) -> &std::path::Path;
}

impl ControlDevice for Control {
    fn status(&self) -> abuse_sys::Result<AbuseStatus> {
        Control::status(self)
    }

    fn get_bios(&self, bios: &mut [AbuseBio], data: &mut [u8]) -> abuse_sys::Result<usize> {
        Control::get_bios(self, bios, data)
    }

    fn put_bios(&self, bios: &[AbuseBio]) -> abuse_sys::Result<usize> {
        Control::put_bios(self, bios)
    }

    fn wait(&self, timeout: Duration) -> abuse_sys::Result<()> {
        Control::poll(self, Some(timeout)).map(|_| ())
    }

    fn path(&self) -> &std::path::Path {
        Control::path(self)
    }
}
