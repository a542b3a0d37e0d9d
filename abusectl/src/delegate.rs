//! Delegation: a device delegated to a user has its control node owned by
//! that user (mode 0600), so the user can open it; the driver checks the
//! uid on every ioctl. Otherwise the node is root's.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use abuse_sys::uapi::*;
use abuse_sys::AbuseStatus;
use nix::unistd::{chown, Gid, Uid};

/// Gives `ctl` the owner `st` names (root when not delegated).
pub fn node_owner(ctl: &Path, st: &AbuseStatus) -> Result<(), String> {
    let (uid, gid) = if st.flags & ABUSE_FLAG_DELEGATED != 0 {
        (st.owner_uid, st.owner_gid)
    } else {
        (0, 0)
    };
    let meta = std::fs::metadata(ctl).map_err(|e| format!("{}: {e}", ctl.display()))?;
    if !meta.file_type().is_char_device() {
        return Err(format!("{}: not a control node", ctl.display()));
    }
    chown(ctl, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(|e| {
        format!(
            "{}: cannot give the node to {uid}:{gid}: {}",
            ctl.display(),
            e.desc()
        )
    })?;
    std::fs::set_permissions(ctl, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", ctl.display()))
}
