//! Medians over runs, ratios to the peers (per boot, then the median), and
//! the table people read.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::results::{ublk_peer, Result, JOBS};
use crate::targets::paired;

/// One (device, job): the median over the runs that produced it.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub job: String,
    pub device: String,
    pub runs: usize,
    pub iops: f64,
    pub mib_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// The headline figure (IOPS, MiB/s, or p50 latency for QD1) over
    /// null_blk's, and over the matching ublk target's.
    pub vs_null_blk: Option<f64>,
    pub vs_ublk: Option<f64>,
    pub ublk_peer: Option<String>,
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

/// Medians of every figure over `runs`, per (job, device), with ratios.
pub fn rows(runs: &[Vec<Result>]) -> Vec<Row> {
    let mut by: BTreeMap<(String, String), Vec<&Result>> = BTreeMap::new();
    for r in runs.iter().flatten() {
        by.entry((r.job.clone(), r.device.clone()))
            .or_default()
            .push(r);
    }
    let med = |rs: &[&Result], f: fn(&Result) -> f64| median(rs.iter().map(|r| f(r)).collect());
    let mut rows: Vec<Row> = by
        .iter()
        .map(|((job, device), rs)| Row {
            job: job.clone(),
            device: device.clone(),
            runs: rs.len(),
            iops: med(rs, |r| r.iops),
            mib_s: med(rs, |r| r.mib_s),
            p50_us: med(rs, |r| r.p50_us),
            p99_us: med(rs, |r| r.p99_us),
            vs_null_blk: None,
            vs_ublk: None,
            ublk_peer: None,
        })
        .collect();
    // Ratios are taken within each boot, then the median over boots: the
    // peers ran minutes apart in the same boot, while boots differ by up
    // to ±40%.
    let ratio = |r: &Row, peer: &str| {
        let v = paired(runs, (&r.device, &r.job), (peer, &r.job));
        (!v.is_empty()).then(|| median(v))
    };
    for r in &mut rows {
        r.vs_null_blk = ratio(r, "null_blk");
        if let Some(peer) = ublk_peer(&r.device) {
            r.ublk_peer = Some(peer.to_string());
            r.vs_ublk = ratio(r, peer);
        }
    }
    rows.sort_by_key(|r| {
        (
            JOBS.iter()
                .position(|(j, _)| *j == r.job)
                .unwrap_or(usize::MAX),
            order(&r.device),
        )
    });
    rows
}

/// Peers first, then ABUSE's servers.
fn order(device: &str) -> (u8, String) {
    let rank = match device {
        "null_blk" => 0,
        d if d.starts_with("ublk") => 1,
        "loop" => 2,
        d if d.starts_with("nbd") => 3,
        _ => 4,
    };
    (rank, device.to_string())
}

/// The table: one line per (job, device).
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<40} {:<12} {:>10} {:>9} {:>9} {:>9} {:>8} {:>14}",
        "job", "device", "IOPS", "MiB/s", "p50 us", "p99 us", "/null_blk", "/ublk"
    );
    let mut last = "";
    for r in rows {
        let title = JOBS
            .iter()
            .find(|(j, _)| *j == r.job)
            .map_or(r.job.as_str(), |(_, t)| t);
        let job = if title == last { "" } else { title };
        last = title;
        let ratio = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}x"));
        let ublk = match (&r.ublk_peer, r.vs_ublk) {
            (Some(p), Some(x)) => format!("{x:.2}x {}", p.trim_start_matches("ublk-")),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "{:<40} {:<12} {:>10.0} {:>9.1} {:>9.0} {:>9.0} {:>8} {:>14}",
            job,
            r.device,
            r.iops,
            r.mib_s,
            r.p50_us,
            r.p99_us,
            ratio(r.vs_null_blk),
            ublk
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(device: &str, job: &str, iops: f64, p50: f64) -> Result {
        Result {
            device: device.into(),
            job: job.into(),
            iops,
            mib_s: iops / 256.0,
            p50_us: p50,
            p99_us: p50 * 3.0,
        }
    }

    #[test]
    fn medians_and_ratios() {
        let runs = vec![
            vec![
                r("null_blk", "randread", 100.0, 0.0),
                r("ublk-null", "randread", 40.0, 0.0),
                r("abuse-null", "randread", 30.0, 0.0),
            ],
            vec![
                r("null_blk", "randread", 120.0, 0.0),
                r("ublk-null", "randread", 60.0, 0.0),
                r("abuse-null", "randread", 50.0, 0.0),
            ],
            vec![
                r("null_blk", "randread", 110.0, 0.0),
                r("ublk-null", "randread", 50.0, 0.0),
                r("abuse-null", "randread", 70.0, 0.0),
            ],
            vec![
                r("abuse-null", "qd1", 1.0, 20.0),
                r("ublk-null", "qd1", 1.0, 30.0),
            ],
        ];
        let rows = rows(&runs);
        let a = rows
            .iter()
            .find(|x| x.device == "abuse-null" && x.job == "randread")
            .unwrap();
        assert_eq!((a.runs, a.iops), (3, 50.0));
        // Per boot 0.30, 0.42, 0.64 of null_blk; 0.75, 0.83, 1.40 of ublk.
        assert!((a.vs_null_blk.unwrap() - 50.0 / 120.0).abs() < 1e-9);
        assert!((a.vs_ublk.unwrap() - 50.0 / 60.0).abs() < 1e-9);
        // Latency: lower is better, so 20 us against ublk's 30 is 1.5x.
        let l = rows
            .iter()
            .find(|x| x.device == "abuse-null" && x.job == "qd1")
            .unwrap();
        assert!((l.vs_ublk.unwrap() - 1.5).abs() < 1e-9);
        let t = table(&rows);
        assert!(
            t.contains("4k randread QD32x2") && t.contains("0.83x null"),
            "{t}"
        );
        // Peers come first within a job.
        let pos = |d: &str| t.find(d).unwrap();
        assert!(pos("null_blk") < pos("ublk-null") && pos("ublk-null") < pos("abuse-null"));
    }
}
