//! `abusectl setup` options: `size=1G,bs=4096,qs=128,queues=2,ro,timeout=30,...`,
//! comma- or space-separated.

use abuse_sys::uapi::*;

/// A parsed setup request: what was given, nothing more (so that a
/// `reconnect` changes only that), before it becomes an `AbuseStatus`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetupOpts {
    /// Bytes; None: the caller decides (a server uses its backend's size).
    pub size: Option<u64>,
    pub block_size: Option<u32>,
    pub queue_depth: Option<u32>,
    /// Hardware queues; None: one per online CPU.
    pub queues: Option<u32>,
    /// `owner=UID[:GID]`: the user (and group) the device is delegated to.
    pub owner: Option<(u32, u32)>,
    pub timeout_ms: Option<u32>,
    /// `ro` or `rw`, if given.
    pub read_only: Option<bool>,
    /// The features given (`flush`, `fua`, `discard`, `write_zeroes`).
    pub features: u32,
    pub reconnect: bool,
}

/// Block size of a new device unless given.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

/// Parses `1G`, `512K`, `4096`, `2T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "bad size '{s}': unknown suffix '{c}' (use K, M, G or T)"
                    ))
                }
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size '{s}': not a number"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("bad size '{s}': too large"))
}

/// `UID[:GID]`, each a number or a name; the group defaults to the user's.
fn parse_owner(v: &str) -> Result<(u32, u32), String> {
    use nix::unistd::{Group, User};
    let (user, group) = match v.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (v, None),
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(uid) => (
            uid,
            User::from_uid(uid.into())
                .ok()
                .flatten()
                .map(|u| u.gid.as_raw()),
        ),
        Err(_) => match User::from_name(user) {
            Ok(Some(u)) => (u.uid.as_raw(), Some(u.gid.as_raw())),
            _ => return Err(format!("owner={v}: no such user '{user}'")),
        },
    };
    let gid = match group {
        None => primary.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => match Group::from_name(g) {
                Ok(Some(gr)) => gr.gid.as_raw(),
                _ => return Err(format!("owner={v}: no such group '{g}'")),
            },
        },
    };
    Ok((uid, gid))
}

fn parse_u32(key: &str, v: &str) -> Result<u32, String> {
    v.parse()
        .map_err(|_| format!("bad value for {key}: '{v}' is not a number"))
}

const FEATURES: &[(&str, u32)] = &[
    ("flush", ABUSE_FLAG_FLUSH),
    ("fua", ABUSE_FLAG_FUA),
    ("discard", ABUSE_FLAG_DISCARD),
    ("write_zeroes", ABUSE_FLAG_WRITE_ZEROES),
];

impl SetupOpts {
    /// Parses the option words (each may hold several, comma-separated).
    pub fn parse<S: AsRef<str>>(words: &[S]) -> Result<Self, String> {
        let mut o = SetupOpts::default();
        for item in words
            .iter()
            .flat_map(|w| w.as_ref().split([',', ' ']))
            .filter(|s| !s.is_empty())
        {
            let (key, val) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (item.trim(), None),
            };
            let need = || val.ok_or_else(|| format!("{key} needs a value ({key}=...)"));
            match key {
                "size" => o.size = Some(parse_size(need()?)?),
                "bs" | "block_size" => {
                    o.block_size = Some(
                        parse_size(need()?)?
                            .try_into()
                            .map_err(|_| "bs too large".to_string())?,
                    )
                }
                "qs" | "queue_depth" => o.queue_depth = Some(parse_u32(key, need()?)?),
                "queues" => o.queues = Some(parse_u32(key, need()?)?),
                "owner" => o.owner = Some(parse_owner(need()?)?),
                "timeout" => {
                    o.timeout_ms = Some(
                        parse_u32(key, need()?)?
                            .checked_mul(1000)
                            .ok_or("timeout too large")?,
                    )
                }
                "ro" if val.is_none() => o.read_only = Some(true),
                "rw" if val.is_none() => o.read_only = Some(false),
                "reconnect" if val.is_none() => o.reconnect = true,
                _ => match FEATURES.iter().find(|(n, _)| *n == key) {
                    Some((_, f)) if val.is_none() => o.features |= f,
                    _ => {
                        return Err(format!(
                            "unknown option '{item}' (known: size=, bs=, qs=, queues=, owner=, timeout=, ro, rw, reconnect, flush, fua, discard, write_zeroes)"
                        ))
                    }
                },
            }
        }
        o.check()?;
        Ok(o)
    }

    fn bs(&self) -> u32 {
        self.block_size.unwrap_or(DEFAULT_BLOCK_SIZE)
    }

    /// The checks the driver makes, with messages a person can act on.
    pub fn check(&self) -> Result<(), String> {
        let bs = self.bs();
        if !(ABUSE_MIN_BLOCK_SIZE..=ABUSE_MAX_BLOCK_SIZE).contains(&bs) || !bs.is_power_of_two() {
            return Err(format!("bs={bs}: must be a power of two from 512 to 4096"));
        }
        if let Some(size) = self.size {
            if size == 0 {
                return Err("size=0: a device needs a size".into());
            }
            if size > ABUSE_MAX_SIZE {
                return Err(format!(
                    "size={size}: the largest device is {ABUSE_MAX_SIZE} bytes"
                ));
            }
            if size % bs as u64 != 0 {
                return Err(format!("size={size} is not a multiple of bs={bs}"));
            }
        }
        if let Some(qs) = self.queue_depth {
            if !(1..=ABUSE_MAX_QUEUE_DEPTH).contains(&qs) {
                return Err(format!("qs={qs}: must be 1 to {ABUSE_MAX_QUEUE_DEPTH}"));
            }
        }
        if let Some(q) = self.queues {
            if !(1..=ABUSE_MAX_QUEUES).contains(&q) {
                return Err(format!("queues={q}: must be 1 to {ABUSE_MAX_QUEUES}"));
            }
        }
        if self.features & ABUSE_FLAG_FUA != 0 && self.features & ABUSE_FLAG_FLUSH == 0 {
            return Err("fua needs flush (FUA writes through a cache the server flushes)".into());
        }
        Ok(())
    }

    /// The SET_STATUS argument for a new configuration of `size` bytes,
    /// with the defaults for what was not given.
    pub fn to_status(&self, size: u64) -> AbuseStatus {
        let ro = if self.read_only == Some(true) {
            ABUSE_FLAG_READ_ONLY
        } else {
            0
        };
        AbuseStatus {
            size,
            block_size: self.bs(),
            queue_depth: self.queue_depth.unwrap_or(ABUSE_DEFAULT_QUEUE_DEPTH),
            queues: self.queues.unwrap_or(0),
            flags: self.features
                | ro
                | if self.owner.is_some() {
                    ABUSE_FLAG_DELEGATED
                } else {
                    0
                },
            owner_uid: self.owner.map_or(0, |o| o.0),
            owner_gid: self.owner.map_or(0, |o| o.1),
            timeout_ms: self.timeout_ms.unwrap_or(ABUSE_DEFAULT_TIMEOUT_MS),
            ..Default::default()
        }
    }

    /// The SET_STATUS(RECONNECT) argument for the configured device `cur`:
    /// `cur` with only what was given changed. Only ro/rw and qs may
    /// change; anything else given must match the device.
    pub fn reconnect_status(&self, cur: &AbuseStatus) -> Result<AbuseStatus, String> {
        if cur.flags & ABUSE_FLAG_CONFIGURED == 0 {
            return Err(
                "reconnect: the device is not configured (set it up without reconnect)".into(),
            );
        }
        let fixed = |name: &str, given: Option<u64>, have: u64| match given {
            Some(v) if v != have => Err(format!(
                "reconnect changes only ro/rw and qs: {name}={v} differs from the device's {have}"
            )),
            _ => Ok(()),
        };
        fixed("size", self.size, cur.size)?;
        fixed("bs", self.block_size.map(u64::from), cur.block_size.into())?;
        fixed("queues", self.queues.map(u64::from), cur.queues.into())?;
        if let Some((uid, gid)) = self.owner {
            let have =
                (cur.flags & ABUSE_FLAG_DELEGATED != 0).then_some((cur.owner_uid, cur.owner_gid));
            if have != Some((uid, gid)) {
                return Err(format!(
                    "reconnect changes only ro/rw and qs: owner={uid}:{gid} differs from the device's {}",
                    have.map_or("(not delegated)".to_string(), |(u, g)| format!("{u}:{g}"))
                ));
            }
        }
        fixed(
            "timeout (ms)",
            self.timeout_ms.map(u64::from),
            cur.timeout_ms.into(),
        )?;
        let settable_features =
            ABUSE_FLAG_FLUSH | ABUSE_FLAG_FUA | ABUSE_FLAG_DISCARD | ABUSE_FLAG_WRITE_ZEROES;
        if self.features & !cur.flags != 0 {
            return Err("reconnect changes only ro/rw and qs: the device's features stay as they were set up".into());
        }
        let mut flags = cur.flags & (settable_features | ABUSE_FLAG_DELEGATED);
        let ro = self
            .read_only
            .unwrap_or(cur.flags & ABUSE_FLAG_READ_ONLY != 0);
        if ro {
            flags |= ABUSE_FLAG_READ_ONLY;
        }
        Ok(AbuseStatus {
            size: cur.size,
            block_size: cur.block_size,
            queue_depth: self.queue_depth.unwrap_or(cur.queue_depth),
            flags: flags | ABUSE_FLAG_RECONNECT,
            timeout_ms: cur.timeout_ms,
            owner_uid: cur.owner_uid,
            owner_gid: cur.owner_gid,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_delegates() {
        let o = SetupOpts::parse(&["size=1M,owner=1000:100"]).unwrap();
        let st = o.to_status(1 << 20);
        assert_eq!((st.owner_uid, st.owner_gid), (1000, 100));
        assert_ne!(st.flags & ABUSE_FLAG_DELEGATED, 0);
        let root = SetupOpts::parse(&["size=1M,owner=root"]).unwrap();
        assert_eq!(root.owner, Some((0, 0)));
        assert_eq!(
            SetupOpts::parse(&["size=1M"])
                .unwrap()
                .to_status(1 << 20)
                .flags
                & ABUSE_FLAG_DELEGATED,
            0
        );
        for bad in [
            "owner=nosuchuser-xyz",
            "owner=1000:nosuchgroup-xyz",
            "owner=",
        ] {
            assert!(SetupOpts::parse(&["size=1M", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("3T"), Ok(3 << 40));
        assert!(parse_size("1X").unwrap_err().contains("unknown suffix"));
        assert!(parse_size("G").unwrap_err().contains("not a number"));
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn full_option_string() {
        let o =
            SetupOpts::parse(&["size=1G,bs=512,qs=64,ro,timeout=10,flush,fua,discard"]).unwrap();
        assert_eq!(o.size, Some(1 << 30));
        let st = o.to_status(1 << 30);
        assert_eq!(
            (st.block_size, st.queue_depth, st.timeout_ms),
            (512, 64, 10_000)
        );
        assert_eq!(
            st.flags,
            ABUSE_FLAG_READ_ONLY | ABUSE_FLAG_FLUSH | ABUSE_FLAG_FUA | ABUSE_FLAG_DISCARD
        );
    }

    #[test]
    fn comma_or_space_separated() {
        let a = SetupOpts::parse(&["size=64M", "bs=4096", "write_zeroes"]).unwrap();
        let b = SetupOpts::parse(&["size=64M bs=4096,write_zeroes"]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.features, ABUSE_FLAG_WRITE_ZEROES);
    }

    #[test]
    fn defaults() {
        let o = SetupOpts::parse::<&str>(&[]).unwrap();
        assert_eq!(o, SetupOpts::default());
        let st = o.to_status(1 << 20);
        assert_eq!(
            (st.block_size, st.queue_depth, st.timeout_ms, st.flags),
            (4096, 128, 30_000, 0)
        );
    }

    #[test]
    fn clear_errors() {
        let err = |s: &str| SetupOpts::parse(&[s]).unwrap_err();
        assert!(err("colour=blue").contains("unknown option 'colour=blue'"));
        assert!(err("size=1000,bs=4096").contains("not a multiple of bs=4096"));
        assert!(err("size=0").contains("needs a size"));
        assert!(err("size=9000000T").contains("largest device"));
        assert!(err("bs=1000").contains("power of two"));
        assert!(err("bs=8K").contains("power of two"));
        assert!(err("qs=0").contains("qs=0"));
        assert!(err("qs=abc").contains("not a number"));
        assert!(err("size").contains("needs a value"));
        assert!(err("fua").contains("fua needs flush"));
        assert!(err("ro=1").contains("unknown option"));
    }

    #[test]
    fn rw_after_ro_wins() {
        assert_eq!(SetupOpts::parse(&["ro,rw"]).unwrap().read_only, Some(false));
    }

    /// A configured device as GET_STATUS reports it.
    fn configured() -> AbuseStatus {
        AbuseStatus {
            size: 64 << 20,
            block_size: 512,
            queue_depth: 32,
            flags: ABUSE_FLAG_CONFIGURED | ABUSE_FLAG_FLUSH | ABUSE_FLAG_READ_ONLY,
            timeout_ms: 5000,
            generation: 3,
            ..Default::default()
        }
    }

    #[test]
    fn reconnect_changes_only_what_is_given() {
        let cur = configured();
        let qs = SetupOpts::parse(&["reconnect qs=64"])
            .unwrap()
            .reconnect_status(&cur)
            .unwrap();
        assert_eq!(
            (qs.size, qs.block_size, qs.queue_depth, qs.timeout_ms),
            (64 << 20, 512, 64, 5000)
        );
        // Still read-only (not given), still FLUSH; nothing reported passed on.
        assert_eq!(
            qs.flags,
            ABUSE_FLAG_FLUSH | ABUSE_FLAG_READ_ONLY | ABUSE_FLAG_RECONNECT
        );
        let rw = SetupOpts::parse(&["reconnect,rw"])
            .unwrap()
            .reconnect_status(&cur)
            .unwrap();
        assert_eq!(
            (rw.queue_depth, rw.flags),
            (32, ABUSE_FLAG_FLUSH | ABUSE_FLAG_RECONNECT)
        );
    }

    #[test]
    fn reconnect_refuses_changes_it_cannot_make() {
        let cur = configured();
        let err = |s: &str| {
            SetupOpts::parse(&[s])
                .unwrap()
                .reconnect_status(&cur)
                .unwrap_err()
        };
        assert!(err("reconnect size=1G").contains("size=1073741824 differs"));
        assert!(err("reconnect bs=4096").contains("bs=4096 differs"));
        assert!(err("reconnect discard").contains("features"));
        // Given and equal is fine.
        let same = SetupOpts::parse(&["reconnect size=64M bs=512 flush"]).unwrap();
        assert!(same.reconnect_status(&cur).is_ok());
        let unconfigured = AbuseStatus::default();
        assert!(SetupOpts::parse(&["reconnect"])
            .unwrap()
            .reconnect_status(&unconfigured)
            .unwrap_err()
            .contains("not configured"));
    }
}
