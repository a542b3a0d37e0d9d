//! `abuse-bench LOG... [--json FILE] [--png FILE]`: reads the console logs
//! of one or more `make bench` boots and prints one table of medians, with
//! every ABUSE result also as a ratio to each peer it ran interleaved with
//! (median over boots and the spread of the single pairs), then the targets
//! (judged on their worst condition); writes the rows as JSON and draws a
//! bar chart.

mod chart;
mod report;
mod results;
mod targets;

use std::path::PathBuf;
use std::process::ExitCode;

fn run() -> Result<(), String> {
    let mut logs = Vec::new();
    let (mut json, mut png) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = Some(PathBuf::from(args.next().ok_or("--json needs a file")?)),
            "--png" => png = Some(PathBuf::from(args.next().ok_or("--png needs a file")?)),
            _ => logs.push(PathBuf::from(a)),
        }
    }
    if logs.is_empty() {
        return Err("usage: abuse-bench LOG... [--json FILE] [--png FILE]".into());
    }
    let runs: Vec<Vec<results::Result>> = logs
        .iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .map(|s| results::parse(&s))
                .map_err(|e| format!("{}: {e}", p.display()))
        })
        .collect::<Result<_, _>>()?;
    if runs.iter().all(|r| r.is_empty()) {
        return Err("no benchmark results in the logs".into());
    }
    let rows = report::rows(&runs);
    println!(
        "{} boot(s); figures are medians over every run (boots x repetitions). Ratios above 1 mean faster (or lower \
         latency) than the peer: per boot over the A B B A repetitions, then the median over boots; [min-max] over \
         every single pair.",
        runs.len()
    );
    print!("{}", report::table(&rows));
    let goals = targets::outcomes(&runs);
    print!("{}", targets::summary(&goals));
    let texts: Vec<String> = logs
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    // Per device over every boot (qcow2 has a server per run).
    let mut stats: Vec<results::ServerStats> = Vec::new();
    for s in texts.iter().flat_map(|t| results::parse_stats(t)) {
        match stats.iter_mut().find(|x| x.device == s.device) {
            Some(x) => {
                x.requests += s.requests;
                x.batches += s.batches;
            }
            None => stats.push(s),
        }
    }
    for s in &stats {
        println!(
            "{}: {} requests in {} batches: {:.1} requests per batch (per ABUSE_SERVE call)",
            s.device,
            s.requests,
            s.batches,
            s.per_batch()
        );
    }
    let took: Vec<String> = texts
        .iter()
        .map(|t| results::parse_elapsed(t).map_or("unfinished".into(), |s| format!("{s} s")))
        .collect();
    println!("bench time in the guest, per boot: {}", took.join(", "));
    if let Some(p) = json {
        let v = serde_json::json!({ "runs": runs.len(), "rows": rows, "targets": goals, "raw": runs, "servers": stats });
        std::fs::write(&p, serde_json::to_string_pretty(&v).expect("serialisable"))
            .map_err(|e| format!("{}: {e}", p.display()))?;
        println!("JSON: {}", p.display());
    }
    if let Some(p) = png {
        chart::draw(&rows, &p)?;
        println!("chart: {}", p.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("abuse-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
