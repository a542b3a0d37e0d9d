//! The issues' targets, and the pairing every ratio comes from. A ratio is
//! only ever taken between two devices bench.sh ran in the same boot, in
//! the same condition, interleaved A B B A (TCG figures move ±40% between
//! boots, and drift within one): per boot the sums over the repetitions
//! both sides have (so a linear drift cancels), then the median over boots.
//! The spread printed next to it is the min..max of every single pair's
//! ratio (boots x repetitions). A target with several conditions (qcow2:
//! sizes, cluster sizes, other servers alive, the virtio disk) is judged on
//! its worst one, and one never measured counts as missed.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::report::median;
use crate::results::{headline, Result};

/// One target: `device`'s `job` against `peer`'s `peer_job`, in each of
/// `conds` (bench.sh's `cond=` tags; `""` for the jobs without).
pub struct Goal {
    pub what: &'static str,
    pub device: &'static str,
    pub job: &'static str,
    pub peer: &'static str,
    pub peer_job: &'static str,
    pub conds: &'static [&'static str],
    pub at_least: f64,
}

const NONE: &[&str] = &[""];

/// bench.sh's qcow2 conditions: SIZE-CLUSTER-WHERE, in the order it runs
/// them; "alone" (tmpfs, no other server alive), "others" (an ABUSE null
/// and file server alive and idle), "virtio" (the virtio disk, cache=none).
pub const QCOW2_CONDS: &[&str] = &[
    "256M-64K-alone",
    "1G-64K-alone",
    "256M-4K-alone",
    "1G-4K-alone",
    "256M-64K-others",
    "1G-64K-others",
    "256M-4K-others",
    "1G-4K-others",
    "256M-64K-virtio",
    "1G-64K-virtio",
    "256M-4K-virtio",
    "1G-4K-virtio",
];

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
        conds: NONE,
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
        1.1,
    ),
    goal(
        "file randwrite vs loop",
        ("abuse-file", "randwrite"),
        ("loop", "randwrite"),
        1.1,
    ),
    goal(
        "null QD1 p50 vs ublk null",
        ("abuse-null", "qd1"),
        ("ublk-null", "qd1"),
        1.0,
    ),
    Goal {
        conds: QCOW2_CONDS,
        ..goal(
            "qcow2 randwrite vs rublk qcow2",
            ("abuse-qcow2", "randwrite"),
            ("ublk-qcow2", "randwrite"),
            1.0,
        )
    },
    goal(
        "cow first writes vs cow rewrites",
        ("abuse-cow", "first-writes"),
        ("abuse-cow", "rewrites"),
        0.6,
    ),
    goal(
        "cow rewrites vs file rewrites",
        ("abuse-cow", "rewrites"),
        ("abuse-file", "rewrites"),
        0.9,
    ),
];

/// `mine` over `theirs` by the job's headline figure, so that above 1 is
/// better (for QD1 latency, theirs over mine).
pub fn ratio(job: &str, mine: f64, theirs: f64) -> f64 {
    if job == "qd1" {
        theirs / mine
    } else {
        mine / theirs
    }
}

/// One pair of (device, job)s in one condition, over every boot.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Paired {
    /// Per boot that measured both: the ratio of the sums over the
    /// repetitions both have (rep 1 ran A B, rep 2 B A: drift cancels).
    pub per_boot: Vec<f64>,
    /// Every repetition's own ratio, over all boots.
    pub pairs: Vec<f64>,
}

impl Paired {
    /// The median over boots.
    pub fn median(&self) -> Option<f64> {
        (!self.per_boot.is_empty()).then(|| median(self.per_boot.clone()))
    }

    /// The lowest and highest single pair.
    pub fn spread(&self) -> Option<(f64, f64)> {
        let lo = self.pairs.iter().copied().reduce(f64::min)?;
        let hi = self.pairs.iter().copied().reduce(f64::max)?;
        Some((lo, hi))
    }

    /// `1.06x [0.97-1.15]`, or `-`.
    pub fn show(&self) -> String {
        match (self.median(), self.spread()) {
            (Some(m), Some((lo, hi))) => format!("{m:.2}x [{lo:.2}-{hi:.2}]"),
            _ => "-".into(),
        }
    }
}

/// `a` over `b` in `cond`, paired by repetition within each boot (where
/// both figures are nonzero).
pub fn paired(runs: &[Vec<Result>], a: (&str, &str), b: (&str, &str), cond: &str) -> Paired {
    let reps = |run: &[Result], (device, job): (&str, &str)| -> Vec<(u32, f64)> {
        let mut v: Vec<(u32, f64)> = run
            .iter()
            .filter(|r| r.device == device && r.job == job && r.cond == cond)
            .map(|r| (r.rep, headline(r)))
            .filter(|&(_, x)| x > 0.0)
            .collect();
        v.sort_by_key(|&(rep, _)| rep);
        v.dedup_by_key(|&mut (rep, _)| rep);
        v
    };
    let mut out = Paired::default();
    for run in runs {
        let theirs = reps(run, b);
        let both: Vec<(f64, f64)> = reps(run, a)
            .into_iter()
            .filter_map(|(rep, x)| Some((x, theirs.iter().find(|t| t.0 == rep)?.1)))
            .collect();
        if both.is_empty() {
            continue;
        }
        out.pairs
            .extend(both.iter().map(|&(x, y)| ratio(a.1, x, y)));
        let (x, y) = both
            .iter()
            .fold((0.0, 0.0), |(x, y), &(p, q)| (x + p, y + q));
        out.per_boot.push(ratio(a.1, x, y));
    }
    out
}

/// One condition of a target.
#[derive(Clone, Debug, Serialize)]
pub struct CondOutcome {
    pub cond: String,
    pub median: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    #[serde(flatten)]
    pub paired: Paired,
}

/// A target's outcome: every condition's, and the verdict on the worst.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub what: String,
    pub at_least: f64,
    pub conds: Vec<CondOutcome>,
    /// The condition judged: the first never measured, else the lowest
    /// median.
    pub worst: Option<String>,
    /// The worst condition's median (none if it was never measured).
    pub median: Option<f64>,
    pub met: bool,
}

impl Outcome {
    fn worst(&self) -> Option<&CondOutcome> {
        let w = self.worst.as_deref()?;
        self.conds.iter().find(|c| c.cond == w)
    }
}

/// The conditions a goal is judged in: those it names and any other the
/// logs have for either side.
fn conds_of(runs: &[Vec<Result>], g: &Goal) -> Vec<String> {
    let mut extra: BTreeSet<&str> = BTreeSet::new();
    for r in runs.iter().flatten() {
        if (r.device == g.device && r.job == g.job) || (r.device == g.peer && r.job == g.peer_job) {
            extra.insert(&r.cond);
        }
    }
    let mut v: Vec<String> = g.conds.iter().map(|c| c.to_string()).collect();
    v.extend(
        extra
            .into_iter()
            .filter(|c| !g.conds.contains(c))
            .map(String::from),
    );
    v
}

pub fn outcomes(runs: &[Vec<Result>]) -> Vec<Outcome> {
    GOALS
        .iter()
        .map(|g| {
            let conds: Vec<CondOutcome> = conds_of(runs, g)
                .into_iter()
                .map(|cond| {
                    let p = paired(runs, (g.device, g.job), (g.peer, g.peer_job), &cond);
                    let spread = p.spread();
                    CondOutcome {
                        median: p.median(),
                        min: spread.map(|s| s.0),
                        max: spread.map(|s| s.1),
                        paired: p,
                        cond,
                    }
                })
                .collect();
            let worst = conds.iter().find(|c| c.median.is_none()).or_else(|| {
                conds
                    .iter()
                    .min_by(|a, b| a.median.partial_cmp(&b.median).unwrap())
            });
            let median = worst.and_then(|c| c.median);
            Outcome {
                what: g.what.to_string(),
                at_least: g.at_least,
                worst: worst.map(|c| c.cond.clone()),
                met: median.is_some_and(|m| m >= g.at_least),
                median,
                conds,
            }
        })
        .collect()
}

/// One line per target: the worst condition's median and spread, the goal,
/// the verdict (naming the worst condition when there are several), each
/// boot's ratio; then one line per condition for the targets with several.
pub fn summary(outcomes: &[Outcome]) -> String {
    let mut s = String::from(
        "Targets (per boot the A B B A ratio, then the median over boots; [min-max] of every single pair; above 1 is better; \
         a target with conditions is judged on its worst):\n",
    );
    let boots = |p: &Paired| {
        p.per_boot
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for o in outcomes {
        let w = o.worst();
        let several = o.conds.len() > 1;
        let verdict = match (o.median, &o.worst) {
            (None, Some(c)) if several => format!("NOT MET: {c} not measured"),
            (None, _) => "not measured".to_string(),
            (Some(_), Some(c)) if several && o.met => format!("met (worst: {c})"),
            (Some(_), Some(c)) if several => format!("NOT MET in {c}"),
            (Some(_), _) if o.met => "met".to_string(),
            (Some(_), _) => "NOT MET".to_string(),
        };
        s += &format!(
            "  {:<34} {:>20} (goal >= {:.2})  {:<28} boots: {}\n",
            o.what,
            w.map_or("-".into(), |c| c.paired.show()),
            o.at_least,
            verdict,
            w.map_or(String::new(), |c| boots(&c.paired))
        );
        if several {
            for c in &o.conds {
                s += &format!(
                    "      {:<30} {:>20}  boots: {}\n",
                    c.cond,
                    c.paired.show(),
                    boots(&c.paired)
                );
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(device: &str, job: &str, iops: f64, p50: f64) -> Result {
        rc(device, job, "", 1, iops, p50)
    }

    fn rc(device: &str, job: &str, cond: &str, rep: u32, iops: f64, p50: f64) -> Result {
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

    fn get<'a>(o: &'a [Outcome], what: &str) -> &'a Outcome {
        o.iter().find(|x| x.what == what).unwrap()
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
        let rr = get(&o, "null randread vs ublk null");
        assert_eq!(rr.conds[0].paired.per_boot.len(), 3);
        assert!((rr.median.unwrap() - 1.3).abs() < 1e-9 && rr.met);
        // Latency: 20 us against 30 is 1.5x, better.
        let l = get(&o, "null QD1 p50 vs ublk null");
        assert!((l.median.unwrap() - 1.5).abs() < 1e-9 && l.met);
        let missing = get(&o, "cow first writes vs cow rewrites");
        assert!(missing.median.is_none() && !missing.met);
        let s = summary(&o);
        assert!(
            s.contains("1.30x [1.30-1.30]") && s.contains("not measured"),
            "{s}"
        );
        // Below the goal is said so.
        let slow = vec![vec![
            r("abuse-null", "randwrite", 5.0, 0.0),
            r("null_blk", "randwrite", 20.0, 0.0),
        ]];
        let o = outcomes(&slow);
        let w = get(&o, "null randwrite vs null_blk");
        assert!(!w.met && summary(&o).contains("NOT MET"));
    }

    #[test]
    fn a_drift_cancels_over_a_b_b_a_and_the_spread_shows_it() {
        // Everything gets faster through the boot: 10, 12, 14, 16 in the
        // order A B B A for two devices that are in fact equal.
        let runs = vec![vec![
            r("abuse-file", "randwrite", 10.0, 0.0),
            rc("loop", "randwrite", "", 1, 12.0, 0.0),
            rc("loop", "randwrite", "", 2, 14.0, 0.0),
            rc("abuse-file", "randwrite", "", 2, 16.0, 0.0),
        ]];
        let p = paired(
            &runs,
            ("abuse-file", "randwrite"),
            ("loop", "randwrite"),
            "",
        );
        assert_eq!(p.per_boot, vec![1.0]);
        let (lo, hi) = p.spread().unwrap();
        assert!((lo - 10.0 / 12.0).abs() < 1e-9 && (hi - 16.0 / 14.0).abs() < 1e-9);
        assert_eq!(p.show(), "1.00x [0.83-1.14]");
        // 1.0 is not the 1.1 file now has to reach.
        let o = outcomes(&runs);
        assert!(!get(&o, "file randwrite vs loop").met);
        // A repetition one side lacks is left out of the boot's sums.
        let mut lopsided = runs.clone();
        lopsided[0].remove(2);
        let p = paired(
            &lopsided,
            ("abuse-file", "randwrite"),
            ("loop", "randwrite"),
            "",
        );
        assert_eq!((p.per_boot.clone(), p.pairs.len()), (vec![10.0 / 12.0], 1));
    }

    #[test]
    fn a_target_with_conditions_is_judged_on_its_worst() {
        let all_at = |ratio_of: &dyn Fn(&str) -> f64| -> Vec<Vec<Result>> {
            let boot = QCOW2_CONDS
                .iter()
                .flat_map(|c| {
                    let x = ratio_of(c);
                    [1, 2].into_iter().flat_map(move |rep| {
                        [
                            rc("abuse-qcow2", "randwrite", c, rep, 100.0 * x, 0.0),
                            rc("ublk-qcow2", "randwrite", c, rep, 100.0, 0.0),
                        ]
                    })
                })
                .collect();
            vec![boot]
        };
        let what = "qcow2 randwrite vs rublk qcow2";
        // Best in most, 0.97x on the virtio disk with 1 GiB 4 KiB clusters.
        let o = outcomes(&all_at(&|c| if c == "1G-4K-virtio" { 0.97 } else { 1.5 }));
        let q = get(&o, what);
        assert_eq!(q.conds.len(), QCOW2_CONDS.len());
        assert!(!q.met && q.worst.as_deref() == Some("1G-4K-virtio"));
        assert!((q.median.unwrap() - 0.97).abs() < 1e-9);
        let s = summary(&o);
        assert!(s.contains("NOT MET in 1G-4K-virtio"), "{s}");
        // Every one at or above: met, the worst still named.
        let o = outcomes(&all_at(&|c| if c == "256M-4K-others" { 1.0 } else { 1.2 }));
        let q = get(&o, what);
        assert!(q.met);
        assert!(summary(&o).contains("met (worst: 256M-4K-others)"));
        // One condition never measured (skipped, or rublk failed) cannot
        // be met however good the others are.
        let mut runs = all_at(&|_| 2.0);
        runs[0].retain(|r| !(r.cond == "256M-64K-virtio" && r.device == "ublk-qcow2"));
        let o = outcomes(&runs);
        let q = get(&o, what);
        assert!(!q.met && q.worst.as_deref() == Some("256M-64K-virtio"));
        assert!(summary(&o).contains("NOT MET: 256M-64K-virtio not measured"));
        // A condition the goal does not name, found in the logs, counts too.
        let mut runs = all_at(&|_| 2.0);
        runs[0].push(rc("abuse-qcow2", "randwrite", "2G-64K-alone", 1, 50.0, 0.0));
        runs[0].push(rc("ublk-qcow2", "randwrite", "2G-64K-alone", 1, 100.0, 0.0));
        let q = get(&outcomes(&runs), what).clone();
        assert!(!q.met && q.worst.as_deref() == Some("2G-64K-alone"));
    }
}
