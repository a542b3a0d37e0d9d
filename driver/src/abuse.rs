// SPDX-License-Identifier: GPL-2.0
//! ABUSE: A Block device in User SpacE.
//!
//! Creates `max_abuse` pairs of a block device /dev/abuseN and a control
//! node /dev/abctlN. User-space servers fetch and complete the block
//! device's requests through stateless ioctls on the control node.

use kernel::{c_str, prelude::*, sync::Arc};

mod control;
mod device;
mod queue;
mod requests;
mod sys;
mod transfer;
#[allow(dead_code, unreachable_pub)]
#[path = "../../abuse-sys/src/uapi.rs"]
mod uapi;

use device::Device;
use sys::{blk::BlkMajor, chrdev::Chrdev, ModuleGlobal, Published};

module! {
    type: AbuseModule,
    name: "abuse",
    author: "ABUSE developers",
    description: "A Block device in User SpacE",
    license: "GPL",
}

module_param_uint!(MAX_ABUSE, "max_abuse", 8, "Number of ABUSE devices created at load (default 8)");
module_param_uint!(MAX_PART, "max_part", 0, "Partitions per ABUSE device (default 0)");

/// Most devices one module creates.
const MAX_DEVICES: u32 = 1024;
/// The minor space of a block major.
const MAX_MINORS: u32 = 1 << 20;
/// Most partitions a disk can have (the block layer's DISK_MAX_PARTS, less
/// the whole disk).
const MAX_PARTITIONS: u32 = 255;

/// Every device, by index, for the control node's `open` to find.
pub(crate) static DEVICES: ModuleGlobal<KVec<Arc<Device>>> = ModuleGlobal::new();

struct AbuseModule {
    // Field order is drop order: unpublish, then the control nodes, then
    // the disks, then the block major.
    _published: Published<KVec<Arc<Device>>>,
    _control: Chrdev<control::Control>,
    _devices: KVec<Arc<Device>>,
    _major: BlkMajor,
}

impl kernel::Module for AbuseModule {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let count = MAX_ABUSE.get();
        let max_part = MAX_PART.get();
        if count == 0 || count > MAX_DEVICES {
            pr_err!("max_abuse={count} is out of range 1..={MAX_DEVICES}\n");
            return Err(EINVAL);
        }
        if max_part > MAX_PARTITIONS {
            pr_err!("max_part={max_part} is out of range 0..={MAX_PARTITIONS}\n");
            return Err(EINVAL);
        }
        let minors = max_part.checked_add(1).filter(|m| m.checked_mul(count).is_some_and(|t| t <= MAX_MINORS));
        let Some(minors) = minors else {
            pr_err!("max_part={max_part} with max_abuse={count} exceeds the {MAX_MINORS} minors of a major\n");
            return Err(EINVAL);
        };

        let major = BlkMajor::register(c_str!("abuse"))?;
        let mut devices = KVec::with_capacity(count as usize, GFP_KERNEL)?;
        for index in 0..count {
            devices.push(Device::new(index, major.major(), minors)?, GFP_KERNEL)?;
        }
        let mut list = KVec::with_capacity(count as usize, GFP_KERNEL)?;
        for d in devices.iter() {
            list.push(d.clone(), GFP_KERNEL)?;
        }
        // Publish before the nodes exist, so every open finds its device.
        let published = DEVICES.publish(Arc::new(list, GFP_KERNEL)?);
        let control = Chrdev::<control::Control>::register(c_str!("abctl"), count)?;
        for index in 0..count {
            control.create_node(index, c_str!("abctl"))?;
        }
        pr_info!("{count} devices (max_part={max_part})\n");
        Ok(AbuseModule { _published: published, _control: control, _devices: devices, _major: major })
    }
}
