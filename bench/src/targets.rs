//! The issues' targets, each judged on ratios taken within one boot (TCG
//! figures move ±40% between boots, much less between two devices measured
//! minutes apart in the same boot) and then the median over boots.

use serde::Serialize;

use crate::report::median;
use crate::results::{headline, Result};

/// One target: `device`'s `job` against `peer`'s `peer_job`.
pub struct Goal {
    pub what: &'static str,
    pub device: &'static str,
    pub job: &'static str,
    pub peer: &'static str,
    pub peer_job: &'static str,
    pub at_least: f64,
}

const fn goal(
    what: &'static str,
    (device, job): (&'static str, &'static str),
    (peer, peer_job): (&'static str, &'static str),
    at_least: f64,
) -> Goal {
    Goal {
        what,
        device,
        job,
        peer,
        peer_job,
        at_least,
    }
}

pub const GOALS: &[Goal] = &[
    goal(
        "null randread vs ublk null",
        ("abuse-null", "randread"),
        ("ublk-null", "randread"),
        1.2,
    ),
    goal(
        "null randwrite vs ublk null",
        ("abuse-null", "randwrite"),
        ("ublk-null", "randwrite"),
        1.2,
    ),
    goal(
        "null randread vs null_blk",
        ("abuse-null", "randread"),
        ("null_blk", "randread"),
        0.5,
    ),
    goal(
        "null randwrite vs null_blk",
        ("abuse-null", "randwrite"),
        ("null_blk", "randwrite"),
        0.5,
    ),
    goal(
        "file randread vs loop",
        ("abuse-file", "randread"),
        ("loop", "randread"),
        1.0,
    ),
    goal(
        "file randwrite vs loop",
        ("abuse-file", "randwrite"),
        ("loop", "randwrite"),
        1.0,
    ),
    goal(
        "null QD1 p50 vs ublk null",
        ("abuse-null", "qd1"),
        ("ublk-null", "qd1"),
        1.0,
    ),
    goal(
        "cow first writes vs cow rewrites",
        ("abuse-cow", "first-writes"),
        ("abuse-cow", "rewrites"),
        0.5,
    ),
    goal(
        "cow rewrites vs file rewrites",
        ("abuse-cow", "rewrites"),
        ("abuse-file", "rewrites"),
        0.9,
    ),
];

/// A target's outcome: the ratio in each boot that measured both sides
/// (above 1 is better: latency ratios are the peer's over ours) and their
/// median.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub what: String,
    pub at_least: f64,
    pub per_boot: Vec<f64>,
    pub median: Option<f64>,
    pub met: bool,
}

/// `mine` over `theirs` by the job's headline figure, so that above 1 is
/// better (for QD1 latency, theirs over mine).
pub fn ratio(job: &str, mine: f64, theirs: f64) -> f64 {
    if job == "qd1" {
        theirs / mine
    } else {
        mine / theirs
    }
}

/// Per boot, `a` over `b` where that boot measured both (and both are
/// nonzero).
pub fn paired(runs: &[Vec<Result>], a: (&str, &str), b: (&str, &str)) -> Vec<f64> {
    let find = |run: &[Result], (device, job): (&str, &str)| {
        run.iter()
            .find(|r| r.device == device && r.job == job)
            .map(headline)
            .filter(|&x| x > 0.0)
    };
    runs.iter()
        .filter_map(|run| Some(ratio(a.1, find(run, a)?, find(run, b)?)))
        .collect()
}

pub fn outcomes(runs: &[Vec<Result>]) -> Vec<Outcome> {
    GOALS
        .iter()
        .map(|g| {
            let per_boot = paired(runs, (g.device, g.job), (g.peer, g.peer_job));
            let median = (!per_boot.is_empty()).then(|| median(per_boot.clone()));
            Outcome {
                what: g.what.to_string(),
                at_least: g.at_least,
                met: median.is_some_and(|m| m >= g.at_least),
                per_boot,
                median,
            }
        })
        .collect()
}

/// One line per target: the median, the goal, each boot's ratio.
pub fn summary(outcomes: &[Outcome]) -> String {
    let mut s = String::from("Targets (median of per-boot ratios; above 1 is better):\n");
    for o in outcomes {
        let boots: Vec<String> = o.per_boot.iter().map(|x| format!("{x:.2}")).collect();
        let verdict = match o.median {
            None => "not measured".to_string(),
            Some(_) if o.met => "met".to_string(),
            Some(_) => "MISSED".to_string(),
        };
        s += &format!(
            "  {:<36} {:>6} (goal >= {:.2}) {:<12} boots: {}\n",
            o.what,
            o.median.map_or("-".into(), |m| format!("{m:.2}x")),
            o.at_least,
            verdict,
            boots.join(" ")
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
    fn ratios_are_paired_within_a_boot() {
        // A slow boot and a fast one: ours is 1.3x ublk's in each, although
        // our median is below ublk's median-of-boots' upper half.
        let runs = vec![
            vec![
                r("abuse-null", "randread", 13.0, 0.0),
                r("ublk-null", "randread", 10.0, 0.0),
            ],
            vec![
                r("abuse-null", "randread", 26.0, 0.0),
                r("ublk-null", "randread", 20.0, 0.0),
            ],
            vec![
                r("abuse-null", "randread", 39.0, 0.0),
                r("ublk-null", "randread", 30.0, 0.0),
            ],
            // A boot without the peer counts for nothing.
            vec![r("abuse-null", "randread", 1.0, 0.0)],
            vec![
                r("abuse-null", "qd1", 1.0, 20.0),
                r("ublk-null", "qd1", 1.0, 30.0),
            ],
        ];
        let o = outcomes(&runs);
        let get = |w: &str| o.iter().find(|x| x.what == w).unwrap();
        let rr = get("null randread vs ublk null");
        assert_eq!(rr.per_boot.len(), 3);
        assert!((rr.median.unwrap() - 1.3).abs() < 1e-9 && rr.met);
        // Latency: 20 us against 30 is 1.5x, better.
        let l = get("null QD1 p50 vs ublk null");
        assert!((l.median.unwrap() - 1.5).abs() < 1e-9 && l.met);
        let missing = get("cow first writes vs cow rewrites");
        assert!(missing.median.is_none() && !missing.met);
        let s = summary(&o);
        assert!(s.contains("1.30x") && s.contains("not measured"), "{s}");
        // Below the goal is said so.
        let slow = vec![vec![
            r("abuse-null", "randwrite", 5.0, 0.0),
            r("null_blk", "randwrite", 20.0, 0.0),
        ]];
        let o = outcomes(&slow);
        let w = o
            .iter()
            .find(|x| x.what == "null randwrite vs null_blk")
            .unwrap();
        assert!(!w.met && summary(&o).contains("MISSED"));
    }
}
