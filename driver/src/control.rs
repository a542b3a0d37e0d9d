// SPDX-License-Identifier: GPL-2.0
//! The control node /dev/abctlN: the stateless ioctl protocol.

use crate::device::Device;
use crate::sys::{capable_sys_admin, chrdev::FileOps, PollTable};
use crate::uapi::*;
use crate::DEVICES;
use kernel::{prelude::*, sync::Arc, uaccess::UserSlice};

/// An open control file. Carries no session: only which device it names.
pub struct OpenControl {
    device: Arc<Device>,
}

pub struct Control;

impl FileOps for Control {
    type Data = OpenControl;

    fn open(minor: u32) -> Result<KBox<OpenControl>> {
        if !capable_sys_admin() {
            return Err(EPERM);
        }
        let devices = DEVICES.get().ok_or(ENODEV)?;
        let device = devices.get(minor as usize).ok_or(ENXIO)?.clone();
        Ok(KBox::new(OpenControl { device }, GFP_KERNEL)?)
    }

    fn release(_data: KBox<OpenControl>) {}

    fn ioctl(data: &OpenControl, cmd: u32, arg: usize) -> Result<isize> {
        if !capable_sys_admin() {
            return Err(EPERM);
        }
        match cmd {
            ABUSE_GET_STATUS => {
                let status = data.device.status();
                let mut out = UserSlice::new(arg as _, core::mem::size_of::<AbuseStatus>()).writer();
                out.write(&status)?;
                Ok(0)
            }
            _ => Err(ENOTTY),
        }
    }

    fn poll(data: &OpenControl, table: &PollTable) -> u32 {
        data.device.poll(table)
    }
}
