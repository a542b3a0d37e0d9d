//! `abusectl setup` options: `size=1G,bs=4096,qs=128,ro,timeout=30,...`,
//! comma- or space-separated.

use abuse_sys::uapi::*;

/// A parsed setup request, before it becomes an `AbuseStatus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupOpts {
    /// Bytes; None: the caller decides (a server uses its backend's size).
    pub size: Option<u64>,
    pub block_size: u32,
    pub queue_depth: u32,
    pub flags: u32,
    pub timeout_ms: u32,
}

impl Default for SetupOpts {
    fn default() -> Self {
        SetupOpts {
            size: None,
            block_size: 4096,
            queue_depth: ABUSE_DEFAULT_QUEUE_DEPTH,
            flags: 0,
            timeout_ms: ABUSE_DEFAULT_TIMEOUT_MS,
        }
    }
}

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
                "bs" | "block_size" => o.block_size = parse_size(need()?)?.try_into().map_err(|_| "bs too large".to_string())?,
                "qs" | "queue_depth" => o.queue_depth = parse_u32(key, need()?)?,
                "timeout" => o.timeout_ms = parse_u32(key, need()?)?.checked_mul(1000).ok_or("timeout too large")?,
                "ro" if val.is_none() => o.flags |= ABUSE_FLAG_READ_ONLY,
                "rw" if val.is_none() => o.flags &= !ABUSE_FLAG_READ_ONLY,
                "reconnect" if val.is_none() => o.flags |= ABUSE_FLAG_RECONNECT,
                _ => match FEATURES.iter().find(|(n, _)| *n == key) {
                    Some((_, f)) if val.is_none() => o.flags |= f,
                    _ => {
                        return Err(format!(
                            "unknown option '{item}' (known: size=, bs=, qs=, timeout=, ro, rw, reconnect, flush, fua, discard, write_zeroes)"
                        ))
                    }
                },
            }
        }
        o.check()?;
        Ok(o)
    }

    /// The checks the driver makes, with messages a person can act on.
    pub fn check(&self) -> Result<(), String> {
        let bs = self.block_size;
        if !(ABUSE_MIN_BLOCK_SIZE..=ABUSE_MAX_BLOCK_SIZE).contains(&bs) || !bs.is_power_of_two() {
            return Err(format!("bs={bs}: must be a power of two from 512 to 4096"));
        }
        if let Some(size) = self.size {
            if size == 0 {
                return Err("size=0: a device needs a size".into());
            }
            if size % bs as u64 != 0 {
                return Err(format!("size={size} is not a multiple of bs={bs}"));
            }
        }
        if !(1..=ABUSE_MAX_QUEUE_DEPTH).contains(&self.queue_depth) {
            return Err(format!(
                "qs={}: must be 1 to {ABUSE_MAX_QUEUE_DEPTH}",
                self.queue_depth
            ));
        }
        if self.flags & ABUSE_FLAG_FUA != 0 && self.flags & ABUSE_FLAG_FLUSH == 0 {
            return Err("fua needs flush (FUA writes through a cache the server flushes)".into());
        }
        Ok(())
    }

    /// The SET_STATUS argument, with `size` (required by then).
    pub fn to_status(&self, size: u64) -> AbuseStatus {
        AbuseStatus {
            size,
            block_size: self.block_size,
            queue_depth: self.queue_depth,
            flags: self.flags,
            timeout_ms: self.timeout_ms,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            (o.block_size, o.queue_depth, o.timeout_ms),
            (512, 64, 10_000)
        );
        assert_eq!(
            o.flags,
            ABUSE_FLAG_READ_ONLY | ABUSE_FLAG_FLUSH | ABUSE_FLAG_FUA | ABUSE_FLAG_DISCARD
        );
    }

    #[test]
    fn comma_or_space_separated() {
        let a = SetupOpts::parse(&["size=64M", "bs=4096", "write_zeroes"]).unwrap();
        let b = SetupOpts::parse(&["size=64M bs=4096,write_zeroes"]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.flags, ABUSE_FLAG_WRITE_ZEROES);
    }

    #[test]
    fn defaults() {
        let o = SetupOpts::parse::<&str>(&[]).unwrap();
        assert_eq!(o, SetupOpts::default());
        assert_eq!(o.timeout_ms, 30_000);
    }

    #[test]
    fn clear_errors() {
        let err = |s: &str| SetupOpts::parse(&[s]).unwrap_err();
        assert!(err("colour=blue").contains("unknown option 'colour=blue'"));
        assert!(err("size=1000,bs=4096").contains("not a multiple of bs=4096"));
        assert!(err("size=0").contains("needs a size"));
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
        assert_eq!(
            SetupOpts::parse(&["ro,rw"]).unwrap().flags & ABUSE_FLAG_READ_ONLY,
            0
        );
    }
}
