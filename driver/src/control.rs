// SPDX-License-Identifier: GPL-2.0
//! The control node /dev/abctlN: the stateless ioctl protocol.

use crate::device::Device;
use crate::sys::{capable_sys_admin, chrdev::FileOps, current_fsuid, PollTable};
use crate::transfer::{self, Call};
use crate::uapi::*;
use crate::DEVICES;
use core::sync::atomic::{AtomicU64, Ordering};
use kernel::{prelude::*, sync::Arc, uaccess::UserSlice};

/// Names each open file, so that what it fetched can be handed out again
/// when it is released.
static NEXT_OPENER: AtomicU64 = AtomicU64::new(1);

/// An open control file: which device, and an identity. No session.
pub(crate) struct OpenControl {
    device: Arc<Device>,
    opener: u64,
}

pub(crate) struct Control;

impl FileOps for Control {
    type Data = OpenControl;

    fn open(minor: u32) -> Result<KBox<OpenControl>> {
        let devices = DEVICES.get().ok_or(ENODEV)?;
        let device = devices.get(minor as usize).ok_or(ENXIO)?.clone();
        // The delegation first: a delegated server is no audited denial.
        if !device.delegated_to(current_fsuid()) && !capable_sys_admin() {
            return Err(EPERM);
        }
        let opener = NEXT_OPENER.fetch_add(1, Ordering::Relaxed);
        Ok(KBox::new(OpenControl { device, opener }, GFP_KERNEL)?)
    }

    fn release(data: KBox<OpenControl>) {
        // A crashed or exiting server's fetched requests go to the next one.
        data.device.requests().release(data.opener);
    }

    fn ioctl(data: &OpenControl, cmd: u32, arg: usize) -> Result<isize> {
        let dev = &data.device;
        // Root may do anything; the user the device is delegated to may
        // serve it, nothing else (and nothing once a RESET ends it). The
        // call is pinned to the configuration it started under.
        let serving = matches!(cmd, ABUSE_GET_STATUS | ABUSE_GET_BIO | ABUSE_PUT_BIO | ABUSE_SERVE);
        let pin = dev.pin(serving)?;
        match cmd {
            ABUSE_GET_STATUS => {
                let mut out = UserSlice::new(arg, core::mem::size_of::<AbuseStatus>()).writer();
                out.write(&dev.status())?;
                Ok(0)
            }
            ABUSE_SET_STATUS => {
                let st: AbuseStatus = UserSlice::new(arg, core::mem::size_of::<AbuseStatus>()).reader().read()?;
                dev.set_status(&st)?;
                Ok(0)
            }
            ABUSE_RESET => {
                dev.reset();
                Ok(0)
            }
            ABUSE_GET_BIO => transfer::get_bio(&Call::new(dev, pin, data.opener), arg),
            ABUSE_PUT_BIO => transfer::put_bio(&Call::new(dev, pin, data.opener), arg),
            ABUSE_SERVE => transfer::serve(&Call::new(dev, pin, data.opener), arg),
            _ => Err(ENOTTY),
        }
    }

    fn poll(data: &OpenControl, table: &PollTable) -> u32 {
        data.device.poll(table)
    }
}
