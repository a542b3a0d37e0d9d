//! What the engine needs of a control node, as a trait: the real
//! [`Control`] in production, a fake device in the host tests.

use std::time::Duration;

use abuse_sys::{AbuseBio, AbuseStatus, Control};

/// A control node the engine serves. The I/O threads complete requests
/// through their worker's node, hence `Sync`.
pub trait ControlDevice: Send + Sync + 'static {
    /// ABUSE_GET_STATUS.
    fn status(&self) -> abuse_sys::Result<AbuseStatus>;
    /// ABUSE_GET_BIO: how many were fetched (0: nothing pending), with
    /// their payloads in `data`, or descriptors only (None:
    /// ABUSE_XFER_DESCRIPTORS).
    fn get_bios(&self, bios: &mut [AbuseBio], data: Option<&mut [u8]>) -> abuse_sys::Result<usize>;
    /// ABUSE_PUT_BIO: how many completed.
    fn put_bios(&self, bios: &[AbuseBio]) -> abuse_sys::Result<usize>;
    /// Waits until requests are pending or `timeout` passes.
    fn wait(&self, timeout: Duration) -> abuse_sys::Result<()>;
    /// ABUSE_SERVE: completes `bios[..put]`, then fetches into `bios`
    /// (hardware queue `queue` first), waiting up to `wait` if none is
    /// pending; how many were fetched. By default (kernels before protocol
    /// version 3, the host tests' fake) PUT_BIO, GET_BIO and poll.
    fn serve(
        &self,
        bios: &mut [AbuseBio],
        put: usize,
        data: Option<&mut [u8]>,
        _queue: u32,
        wait: Duration,
    ) -> abuse_sys::Result<usize> {
        serve_compat(self, bios, put, data, wait)
    }
    /// The node's path, for messages.
    fn path(&self) -> &std::path::Path;
}

impl ControlDevice for Control {
    fn status(&self) -> abuse_sys::Result<AbuseStatus> {
        Control::status(self)
    }

    fn get_bios(&self, bios: &mut [AbuseBio], data: Option<&mut [u8]>) -> abuse_sys::Result<usize> {
        match data {
            Some(data) => Control::get_bios(self, bios, data),
            None => Control::get_descriptors(self, bios),
        }
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

    fn serve(
        &self,
        bios: &mut [AbuseBio],
        put: usize,
        data: Option<&mut [u8]>,
        queue: u32,
        wait: Duration,
    ) -> abuse_sys::Result<usize> {
        match data {
            Some(data) => Control::serve(self, bios, put, data, queue, wait),
            None => Control::serve_descriptors(self, bios, put, queue, wait),
        }
    }
}

/// ABUSE_SERVE's work in three calls: PUT_BIO, GET_BIO, and, if nothing
/// was pending, poll and GET_BIO again.
pub fn serve_compat<C: ControlDevice + ?Sized>(
    ctl: &C,
    bios: &mut [AbuseBio],
    put: usize,
    mut data: Option<&mut [u8]>,
    wait: Duration,
) -> abuse_sys::Result<usize> {
    if put > 0 {
        ctl.put_bios(&bios[..put])?;
    }
    let n = ctl.get_bios(bios, data.as_deref_mut())?;
    if n > 0 || wait.is_zero() {
        return Ok(n);
    }
    ctl.wait(wait)?;
    ctl.get_bios(bios, data)
}
