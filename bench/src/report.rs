//! Medians over runs, each ABUSE device's ratios to the peers it ran
//! interleaved with (per boot, then the median; with the spread of the
//! single pairs), and the table people read.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::results::{peers, Result, JOBS};
use crate::targets::{paired, Paired, QCOW2_CONDS};

/// One (job, condition, device): the median over every run of it (boots x
/// repetitions).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub job: String,
    pub cond: String,
    pub device: String,
    /// How many runs the medians are over.
    pub runs: usize,
    pub iops: f64,
    pub mib_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// The headline figure (IOPS, MiB/s, or p50 latency for QD1) against
    /// each peer the device ran interleaved with, same job and condition.
    pub vs: Vec<Versus>,
}

/// A row's ratio to one peer.
#[derive(Clone, Debug, Serialize)]
pub struct Versus {
    pub peer: String,
    pub median: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    #[serde(flatten)]
    pub paired: Paired,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians of every figure over `runs`, per (job, cond, device), with
/// ratios.
pub fn rows(runs: &[Vec<Result>]) -> Vec<Row> {
    type Key = (String, String, String);
    let mut by: BTreeMap<Key, Vec<&Result>> = BTreeMap::new();
    for r in runs.iter().flatten() {
        by.entry((r.job.clone(), r.cond.clone(), r.device.clone()))
            .or_default()
            .push(r);
    }
    let med = |rs: &[&Result], f: fn(&Result) -> f64| median(rs.iter().map(|r| f(r)).collect());
    let mut rows: Vec<Row> = by
        .iter()
        .map(|((job, cond, device), rs)| Row {
            job: job.clone(),
            cond: cond.clone(),
            device: device.clone(),
            runs: rs.len(),
            iops: med(rs, |r| r.iops),
            mib_s: med(rs, |r| r.mib_s),
            p50_us: med(rs, |r| r.p50_us),
            p99_us: med(rs, |r| r.p99_us),
            vs: peers(device)
                .iter()
                .filter_map(|peer| {
                    let p = paired(runs, (device, job), (peer, job), cond);
                    let spread = p.spread();
                    (!p.per_boot.is_empty()).then(|| Versus {
                        peer: peer.to_string(),
                        median: p.median(),
                        min: spread.map(|s| s.0),
                        max: spread.map(|s| s.1),
                        paired: p,
                    })
                })
                .collect(),
        })
        .collect();
    rows.sort_by_key(|r| {
        (
            JOBS.iter()
                .position(|(j, _)| *j == r.job)
                .unwrap_or(usize::MAX),
            cond_order(&r.cond),
            order(&r.device),
        )
    });
    rows
}

/// No condition first, then bench.sh's qcow2 conditions in its order, then
/// any other.
fn cond_order(cond: &str) -> (usize, String) {
    let rank = if cond.is_empty() {
        0
    } else {
        QCOW2_CONDS
            .iter()
            .position(|c| *c == cond)
            .map_or(usize::MAX, |i| i + 1)
    };
    (rank, cond.to_string())
}

/// By group (bench.sh's: null, file, nbd, qcow2), the peers first in each.
fn order(device: &str) -> (usize, String) {
    const ORDER: &[&str] = &[
        "null_blk",
        "ublk-null",
        "abuse-null",
        "loop",
        "ublk-loop",
        "abuse-file",
        "abuse-cow",
        "nbd-memory",
        "abuse-nbd",
        "ublk-qcow2",
        "abuse-qcow2",
    ];
    let rank = ORDER.iter().position(|d| *d == device);
    (rank.unwrap_or(ORDER.len()), device.to_string())
}

/// A job's title, with its condition.
pub fn title(job: &str, cond: &str) -> String {
    let t = JOBS.iter().find(|(j, _)| *j == job).map_or(job, |(_, t)| t);
    if cond.is_empty() {
        t.to_string()
    } else {
        format!("{t} [{cond}]")
    }
}

/// The table: a title line per (job, condition), then one line per device.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "  {:<14} {:>9} {:>8} {:>8} {:>8} {:>4}  vs peer: median of boots [min-max of single pairs]",
        "device", "IOPS", "MiB/s", "p50 us", "p99 us", "runs"
    );
    let mut last = String::new();
    for r in rows {
        let t = title(&r.job, &r.cond);
        if t != last {
            let _ = writeln!(s, "{t}");
            last = t;
        }
        let vs: Vec<String> =
            r.vs.iter()
                .map(|v| format!("{} {}", v.paired.show(), v.peer))
                .collect();
        let _ = writeln!(
            s,
            "  {:<14} {:>9.0} {:>8.1} {:>8.0} {:>8.0} {:>4}  {}",
            r.device,
            r.iops,
            r.mib_s,
            r.p50_us,
            r.p99_us,
            r.runs,
            vs.join(", ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(device: &str, job: &str, cond: &str, rep: u32, iops: f64, p50: f64) -> Result {
        Result {
            device: device.into(),
            job: job.into(),
            cond: cond.into(),
            rep,
            iops,
            mib_s: iops / 256.0,
            p50_us: p50,
            p99_us: p50 * 3.0,
        }
    }

    #[test]
    fn medians_and_ratios() {
        let boot = |nb: f64, u: f64, a: f64| {
            vec![
                r("null_blk", "randread", "", 1, nb, 0.0),
                r("ublk-null", "randread", "", 1, u, 0.0),
                r("abuse-null", "randread", "", 1, a, 0.0),
            ]
        };
        let mut runs = vec![
            boot(100.0, 40.0, 30.0),
            boot(120.0, 60.0, 50.0),
            boot(110.0, 50.0, 70.0),
        ];
        runs.push(vec![
            r("abuse-null", "qd1", "", 1, 1.0, 20.0),
            r("ublk-null", "qd1", "", 1, 1.0, 30.0),
        ]);
        let rows = rows(&runs);
        let a = rows
            .iter()
            .find(|x| x.device == "abuse-null" && x.job == "randread")
            .unwrap();
        assert_eq!((a.runs, a.iops), (3, 50.0));
        // Per boot 0.75, 0.83, 1.40 of ublk; 0.30, 0.42, 0.64 of null_blk.
        let v = |peer: &str| a.vs.iter().find(|v| v.peer == peer).unwrap();
        assert!((v("ublk-null").median.unwrap() - 50.0 / 60.0).abs() < 1e-9);
        assert!((v("null_blk").median.unwrap() - 50.0 / 120.0).abs() < 1e-9);
        assert_eq!(
            (v("ublk-null").min, v("ublk-null").max),
            (Some(0.75), Some(1.4))
        );
        // Latency: lower is better, so 20 us against ublk's 30 is 1.5x.
        let l = rows
            .iter()
            .find(|x| x.device == "abuse-null" && x.job == "qd1")
            .unwrap();
        assert!((l.vs[0].median.unwrap() - 1.5).abs() < 1e-9);
        let t = table(&rows);
        assert!(
            t.contains("4k randread QD32x2") && t.contains("0.83x [0.75-1.40] ublk-null"),
            "{t}"
        );
        // Peers come first within a job; peers have no ratios of their own.
        let pos = |d: &str| t.find(d).unwrap();
        assert!(pos("null_blk") < pos("  ublk-null") && pos("  ublk-null") < pos("abuse-null"));
        assert!(rows
            .iter()
            .filter(|r| r.device == "ublk-null")
            .all(|r| r.vs.is_empty()));
    }

    #[test]
    fn conditions_are_rows_of_their_own_paired_only_with_their_own() {
        let runs = vec![vec![
            r("abuse-qcow2", "randwrite", "1G-4K-virtio", 1, 90.0, 0.0),
            r("ublk-qcow2", "randwrite", "1G-4K-virtio", 1, 100.0, 0.0),
            r("abuse-qcow2", "randwrite", "256M-64K-alone", 1, 300.0, 0.0),
            r("ublk-qcow2", "randwrite", "256M-64K-alone", 1, 100.0, 0.0),
            // No condition: an older log; nothing to pair with.
            r("abuse-qcow2", "randwrite", "", 1, 70.0, 0.0),
        ]];
        let rows = rows(&runs);
        let conds: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r.cond.as_str(), r.device.as_str()))
            .collect();
        assert_eq!(
            conds,
            [
                ("", "abuse-qcow2"),
                ("256M-64K-alone", "ublk-qcow2"),
                ("256M-64K-alone", "abuse-qcow2"),
                ("1G-4K-virtio", "ublk-qcow2"),
                ("1G-4K-virtio", "abuse-qcow2"),
            ]
        );
        assert!(rows[0].vs.is_empty());
        assert_eq!(rows[2].vs[0].median, Some(3.0));
        assert_eq!(rows[4].vs[0].median, Some(0.9));
        let t = table(&rows);
        assert!(t.contains("4k randwrite QD32x2 [1G-4K-virtio]"), "{t}");
    }
}
