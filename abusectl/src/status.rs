//! Rendering a device's status for people (text) and programs (JSON).

use std::fmt::Write;
use std::path::{Path, PathBuf};

use abuse_sys::uapi::*;
use abuse_sys::Control;
use serde::Serialize;

/// One device's status, as `info` and `list` print it.
#[derive(Serialize)]
pub struct Info {
    pub control: PathBuf,
    pub block_device: String,
    pub index: u32,
    pub dev: u64,
    pub major: u64,
    pub minor: u64,
    pub configured: bool,
    pub size: u64,
    pub block_size: u32,
    pub queue_depth: u32,
    pub queues: u32,
    /// `uid:gid` of the user the device is delegated to.
    pub owner: Option<String>,
    pub flags: Vec<&'static str>,
    pub timeout_ms: u32,
    pub pending: u32,
    pub in_flight: u32,
    pub completed: u64,
    pub errors: u64,
    pub requeues: u64,
    pub timeouts: u64,
    pub generation: u64,
    pub max_bytes: u32,
    pub max_batch: u32,
    pub version: u32,
}

const FLAG_NAMES: &[(u32, &str)] = &[
    (ABUSE_FLAG_READ_ONLY, "ro"),
    (ABUSE_FLAG_RECONNECT, "reconnect"),
    (ABUSE_FLAG_FLUSH, "flush"),
    (ABUSE_FLAG_FUA, "fua"),
    (ABUSE_FLAG_DISCARD, "discard"),
    (ABUSE_FLAG_WRITE_ZEROES, "write_zeroes"),
];

impl Info {
    pub fn new(ctl: &Path, st: &AbuseStatus) -> Self {
        Info {
            control: ctl.to_path_buf(),
            block_device: format!("/dev/abuse{}", st.index),
            index: st.index,
            dev: st.dev,
            major: nix::sys::stat::major(st.dev),
            minor: nix::sys::stat::minor(st.dev),
            configured: st.flags & ABUSE_FLAG_CONFIGURED != 0,
            size: st.size,
            block_size: st.block_size,
            queue_depth: st.queue_depth,
            queues: st.queues,
            owner: (st.flags & ABUSE_FLAG_DELEGATED != 0)
                .then(|| format!("{}:{}", st.owner_uid, st.owner_gid)),
            flags: FLAG_NAMES
                .iter()
                .filter(|(f, _)| st.flags & f != 0)
                .map(|(_, n)| *n)
                .collect(),
            timeout_ms: st.timeout_ms,
            pending: st.pending,
            in_flight: st.in_flight,
            completed: st.completed,
            errors: st.errors,
            requeues: st.requeues,
            timeouts: st.timeouts,
            generation: st.generation,
            max_bytes: st.max_bytes,
            max_batch: st.max_batch,
            version: st.version,
        }
    }

    /// The text `abusectl info` prints.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let state = if self.configured {
            "configured"
        } else {
            "unconfigured"
        };
        let _ = writeln!(
            s,
            "{} -> {} ({}:{})",
            self.control.display(),
            self.block_device,
            self.major,
            self.minor
        );
        let _ = writeln!(s, "  state:       {state} (generation {})", self.generation);
        let _ = writeln!(
            s,
            "  size:        {} ({} bytes)",
            human_size(self.size),
            self.size
        );
        let _ = writeln!(s, "  block size:  {}", self.block_size);
        let _ = writeln!(
            s,
            "  queues:      {} x depth {}",
            self.queues, self.queue_depth
        );
        if let Some(o) = &self.owner {
            let _ = writeln!(s, "  delegated:   to {o} (may serve it without root)");
        }
        let flags = if self.flags.is_empty() {
            "-".to_string()
        } else {
            self.flags.join(",")
        };
        let _ = writeln!(s, "  flags:       {flags}");
        let timeout = if self.timeout_ms == 0 {
            "never".to_string()
        } else {
            format!("{} ms", self.timeout_ms)
        };
        let _ = writeln!(s, "  timeout:     {timeout}");
        let _ = writeln!(
            s,
            "  requests:    {} pending, {} in flight",
            self.pending, self.in_flight
        );
        let _ = writeln!(
            s,
            "  counters:    {} completed, {} errors, {} requeued, {} timed out (server killed)",
            self.completed, self.errors, self.requeues, self.timeouts
        );
        let _ = writeln!(
            s,
            "  limits:      {} per request, {} per batch",
            human_size(self.max_bytes as u64),
            self.max_batch
        );
        let _ = writeln!(s, "  protocol:    version {}", self.version);
        s
    }
}

/// 1536 -> "1.5K"; exact multiples print without a fraction.
pub fn human_size(bytes: u64) -> String {
    const UNITS: &[(u64, &str)] = &[
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for &(unit, name) in UNITS {
        if bytes >= unit {
            return if bytes.is_multiple_of(unit) {
                format!("{}{name}", bytes / unit)
            } else {
                format!("{:.1}{name}", bytes as f64 / unit as f64)
            };
        }
    }
    format!("{bytes}B")
}

/// Every /dev/abctlN, in index order.
pub fn list() -> Result<Vec<Info>, abuse_sys::Error> {
    let mut nodes: Vec<(u32, PathBuf)> = std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let n = name.strip_prefix("abctl")?.parse().ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    nodes.sort();
    nodes
        .into_iter()
        .map(|(_, p)| Control::open(&p)?.status().map(|st| Info::new(&p, &st)))
        .collect()
}

/// The table `abusectl list` prints: one line per device, as `losetup -l`
/// does for loop devices. STATE is `-` when unconfigured, `ro` or `rw`;
/// QUEUES is hardware queues x depth; OWNER the user it is delegated to.
pub fn table(infos: &[Info]) -> String {
    let mut s = format!(
        "{:<12} {:<12} {:>6} {:>8} {:>5} {:>9} {:<12} {:>7} {:>8} {:>10} {:>6} {:>8}\n",
        "CONTROL",
        "DEVICE",
        "STATE",
        "SIZE",
        "BS",
        "QUEUES",
        "OWNER",
        "PENDING",
        "INFLIGHT",
        "COMPLETED",
        "ERRORS",
        "REQUEUES"
    );
    for i in infos {
        let (state, size, bs, queues) = if i.configured {
            let ro = if i.flags.contains(&"ro") { "ro" } else { "rw" };
            (
                ro,
                human_size(i.size),
                i.block_size.to_string(),
                format!("{}x{}", i.queues, i.queue_depth),
            )
        } else {
            ("-", "-".into(), "-".into(), "-".into())
        };
        let _ = writeln!(
            s,
            "{:<12} {:<12} {:>6} {:>8} {:>5} {:>9} {:<12} {:>7} {:>8} {:>10} {:>6} {:>8}",
            i.control.display(),
            i.block_device,
            state,
            size,
            bs,
            queues,
            i.owner.as_deref().unwrap_or("root"),
            i.pending,
            i.in_flight,
            i.completed,
            i.errors,
            i.requeues
        );
    }
    if infos.is_empty() {
        s.push_str("(no ABUSE devices: is the abuse module loaded?)\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(1536), "1.5K");
        assert_eq!(human_size(1 << 30), "1G");
        assert_eq!(human_size(3 << 40), "3T");
    }

    #[test]
    fn info_decodes_flags_and_dev() {
        let st = AbuseStatus {
            size: 1 << 30,
            block_size: 4096,
            flags: ABUSE_FLAG_CONFIGURED | ABUSE_FLAG_READ_ONLY | ABUSE_FLAG_DISCARD,
            index: 3,
            dev: nix::sys::stat::makedev(254, 3),
            ..Default::default()
        };
        let info = Info::new(Path::new("/dev/abctl3"), &st);
        assert!(info.configured);
        assert_eq!(info.flags, vec!["ro", "discard"]);
        assert_eq!((info.major, info.minor), (254, 3));
        assert_eq!(info.block_device, "/dev/abuse3");
        assert!(info.human().contains("configured"));
    }
}
