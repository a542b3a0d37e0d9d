//! The results of one `make bench` boot: fio's JSON for each (device, job,
//! condition, repetition), as tests/vm/bench.sh prints it between
//! `==== bench DEVICE JOB [cond=COND] [rep=N]` and `==== end` lines of the
//! console log.

use std::collections::HashMap;

use serde::Serialize;

/// One fio job on one device.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Result {
    pub device: String,
    pub job: String,
    /// The condition the job ran in (qcow2: image size, cluster size, and
    /// where: `256M-64K-alone`); empty for the jobs that have one only.
    pub cond: String,
    /// Which run of (device, job, cond) in its boot this is, from 1: runs
    /// with the same repetition on two devices are a pair (bench.sh runs
    /// them A B B A, so rep 1 has one device first and rep 2 the other).
    pub rep: u32,
    pub iops: f64,
    pub mib_s: f64,
    /// Completion latency percentiles, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
}

/// The jobs, in the order tables and charts show them.
pub const JOBS: &[(&str, &str)] = &[
    ("randread", "4k randread QD32x2"),
    ("randwrite", "4k randwrite QD32x2"),
    ("qd1", "4k randread QD1"),
    ("seqread", "128k read"),
    ("seqwrite", "128k write"),
    ("first-writes", "cow first writes (4k, fsync/32, virtio)"),
    ("rewrites", "rewrites, same order (4k, fsync/32, virtio)"),
    (
        "rewrites-other-order",
        "rewrites, other order (4k, fsync/32, virtio)",
    ),
];

/// Parses the results out of a console log. A job whose JSON is missing or
/// unreadable (a peer that would not start) is left out. Tags after DEVICE
/// JOB are `key=value`; unknown ones are ignored, and a log without `rep=`
/// (an older bench.sh) numbers the runs of each (device, job, cond) in the
/// order they come.
pub fn parse(log: &str) -> Vec<Result> {
    let mut out = Vec::new();
    let mut seen: HashMap<(String, String, String), u32> = HashMap::new();
    let mut current: Option<(Header, String)> = None;
    for line in log.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("==== bench ") {
            current = header(rest, &mut seen).map(|h| (h, String::new()));
        } else if line == "==== end" {
            if let Some((h, json)) = current.take() {
                if let Some(r) = from_fio(h, &json) {
                    out.push(r);
                }
            }
        } else if let Some((_, json)) = current.as_mut() {
            // Kernel messages on the console may land between fio's lines.
            if is_kernel_line(line) {
                continue;
            }
            json.push_str(line);
            json.push('\n');
        }
    }
    out
}

/// A `==== bench` line's device, job, condition and repetition.
struct Header {
    device: String,
    job: String,
    cond: String,
    rep: u32,
}

fn header(rest: &str, seen: &mut HashMap<(String, String, String), u32>) -> Option<Header> {
    let mut it = rest.split_whitespace();
    let (device, job) = (it.next()?.to_string(), it.next()?.to_string());
    let (mut cond, mut rep) = (String::new(), None);
    for tag in it {
        match tag.split_once('=') {
            Some(("cond", c)) => cond = c.to_string(),
            Some(("rep", n)) => rep = n.parse().ok(),
            _ => {}
        }
    }
    let count = seen
        .entry((device.clone(), job.clone(), cond.clone()))
        .or_default();
    *count += 1;
    Some(Header {
        rep: rep.unwrap_or(*count),
        device,
        job,
        cond,
    })
}

/// How long the guest's bench took (`bench: done in N s`), if it finished.
pub fn parse_elapsed(log: &str) -> Option<u64> {
    log.lines().find_map(|l| {
        l.trim_end_matches('\r')
            .strip_prefix("bench: done in ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// An ABUSE server's counters over a whole device's jobs, as bench.sh
/// prints its stats file between `==== stats DEVICE` and `==== end`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServerStats {
    pub device: String,
    pub requests: u64,
    /// Batches run: each fetched by one ABUSE_SERVE call, which also
    /// completed the batch before it.
    pub batches: u64,
}

impl ServerStats {
    /// Requests per batch, so per system call on the fast path.
    pub fn per_batch(&self) -> f64 {
        self.requests as f64 / self.batches.max(1) as f64
    }
}

/// The server counters in a console log.
pub fn parse_stats(log: &str) -> Vec<ServerStats> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in log.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(dev) = line.strip_prefix("==== stats ") {
            current = Some((dev.trim().to_string(), String::new()));
        } else if line.starts_with("==== ") {
            if let Some((device, json)) = current.take() {
                let v: Option<serde_json::Value> = serde_json::from_str(json.trim()).ok();
                let get = |k: &str| v.as_ref().and_then(|v| v[k].as_u64());
                if let (Some(requests), Some(batches)) = (get("requests"), get("batches")) {
                    out.push(ServerStats {
                        device,
                        requests,
                        batches,
                    });
                }
            }
        } else if let Some((_, json)) = current.as_mut() {
            if !is_kernel_line(line) {
                json.push_str(line);
            }
        }
    }
    out
}

/// `[   12.345678] ...`: a kernel message.
fn is_kernel_line(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .is_some_and(|(t, _)| {
            !t.trim().is_empty() && t.trim().chars().all(|c| c.is_ascii_digit() || c == '.')
        })
}

/// One result from fio's `--output-format=json` (with group_reporting:
/// one job); reads or writes, whichever the job did.
fn from_fio(h: Header, json: &str) -> Option<Result> {
    // fio may print notes before the JSON.
    let start = json.find('{')?;
    let v: serde_json::Value = serde_json::from_str(&json[start..]).ok()?;
    let j = v.get("jobs")?.get(0)?;
    let side = ["read", "write"].iter().map(|s| &j[*s]).max_by(|a, b| {
        a["io_bytes"]
            .as_f64()
            .partial_cmp(&b["io_bytes"].as_f64())
            .unwrap()
    })?;
    let pct = |p: &str| side["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    let iops = side["iops"].as_f64()?;
    if iops <= 0.0 {
        return None;
    }
    Some(Result {
        device: h.device,
        job: h.job,
        cond: h.cond,
        rep: h.rep,
        iops,
        mib_s: side["bw"].as_f64().unwrap_or(0.0) / 1024.0,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    })
}

/// The devices an ABUSE device is compared with: the peers bench.sh runs
/// in the same group (set up together, jobs interleaved), the first the one
/// its targets name.
pub fn peers(device: &str) -> &'static [&'static str] {
    match device {
        "abuse-null" => &["ublk-null", "null_blk"],
        "abuse-file" => &["loop", "ublk-loop"],
        // The file group's peers for the random jobs; the file server for
        // the virtio passes.
        "abuse-cow" => &["loop", "ublk-loop", "abuse-file"],
        "abuse-qcow2" => &["ublk-qcow2"],
        "abuse-nbd" => &["nbd-memory"],
        _ => &[],
    }
}

/// The figure a job is judged by: latency for QD1, throughput otherwise.
pub fn headline(r: &Result) -> f64 {
    match r.job.as_str() {
        "qd1" => r.p50_us,
        "seqread" | "seqwrite" => r.mib_s,
        _ => r.iops,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIO: &str = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{
  "jobs" : [ { "jobname" : "b",
      "read" : { "io_bytes" : 409600, "bw" : 40960, "iops" : 10240.5,
                 "clat_ns" : { "percentile" : { "50.000000" : 12000, "99.000000" : 85000 } } },
      "write" : { "io_bytes" : 0, "bw" : 0, "iops" : 0.0, "clat_ns" : { } } } ]
}"#;

    #[test]
    fn server_stats_give_requests_per_batch() {
        let log = "==== stats abuse-null\n{\"requests\": 120, \"batches\": 10}\n==== end\n==== stats x\nnot json\n==== end\n";
        let s = parse_stats(log);
        assert_eq!(s.len(), 1);
        assert_eq!(
            (s[0].device.as_str(), s[0].per_batch()),
            ("abuse-null", 12.0)
        );
    }

    #[test]
    fn parses_the_jobs_between_markers() {
        let log = format!(
            "boot noise\n==== bench abuse-null randread\n[   3.14] nbd: a kernel line\n{FIO}\n==== end\n\
             ==== bench ublk-null randread\nfio: failed\n{{}}\n==== end\n[  1.0] kernel line\n"
        );
        let r = parse(&log);
        assert_eq!(r.len(), 1, "the failed peer is left out: {r:?}");
        let a = &r[0];
        assert_eq!(
            (a.device.as_str(), a.job.as_str()),
            ("abuse-null", "randread")
        );
        assert_eq!(a.iops, 10240.5);
        assert_eq!(a.mib_s, 40.0);
        assert_eq!((a.p50_us, a.p99_us), (12.0, 85.0));
        assert_eq!(headline(a), 10240.5);
    }

    #[test]
    fn writes_are_read_from_the_write_side() {
        let w = FIO
            .replace("\"io_bytes\" : 409600", "\"io_bytes\" : 0")
            .replace(
                "\"write\" : { \"io_bytes\" : 0, \"bw\" : 0, \"iops\" : 0.0",
                "\"write\" : { \"io_bytes\" : 5, \"bw\" : 2048, \"iops\" : 512.0",
            );
        let r = parse(&format!("==== bench loop randwrite\n{w}\n==== end\n"));
        assert_eq!(r[0].iops, 512.0);
        assert_eq!(r[0].mib_s, 2.0);
    }

    #[test]
    fn every_abuse_device_has_a_peer() {
        for d in [
            "abuse-null",
            "abuse-file",
            "abuse-cow",
            "abuse-qcow2",
            "abuse-nbd",
        ] {
            assert!(!peers(d).is_empty(), "{d}");
        }
    }

    #[test]
    fn conditions_and_repetitions_come_from_the_tags() {
        let log = format!(
            "==== bench abuse-qcow2 randwrite cond=256M-4K-alone rep=2 extra=ignored\n{FIO}\n==== end\n\
             ==== bench abuse-qcow2 randwrite cond=1G-4K-virtio\n{FIO}\n==== end\n\
             ==== bench abuse-null randread\n{FIO}\n==== end\n\
             ==== bench abuse-null randread\n{FIO}\n==== end\n\
             bench: done in 1234 s (fio runtime 8 s)\n"
        );
        let r = parse(&log);
        let got: Vec<(&str, &str, u32)> = r
            .iter()
            .map(|r| (r.device.as_str(), r.cond.as_str(), r.rep))
            .collect();
        assert_eq!(
            got,
            [
                ("abuse-qcow2", "256M-4K-alone", 2),
                ("abuse-qcow2", "1G-4K-virtio", 1),
                // Untagged (an older log): numbered in order.
                ("abuse-null", "", 1),
                ("abuse-null", "", 2),
            ]
        );
        assert_eq!(parse_elapsed(&log), Some(1234));
        assert_eq!(parse_elapsed("bench: qcow2 at 5 s"), None);
    }

    #[test]
    fn a_header_without_a_job_is_no_result() {
        let log = format!("==== bench abuse-null\n{FIO}\n==== end\n");
        assert!(parse(&log).is_empty());
    }
}
