//! `abuse-bench LOG... [--json FILE] [--png FILE]`: reads the console logs
//! of one or more `make bench` boots and prints one table of medians, with
//! every result also as a ratio to null_blk and to the matching ublk
//! target; writes the rows as JSON and draws a bar chart.

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
        "Medians of {} run(s); ratios (each boot's, then their median) above 1 mean faster (or lower latency) than the peer.",
        runs.len()
    );
    print!("{}", report::table(&rows));
    let goals = targets::outcomes(&runs);
    print!("{}", targets::summary(&goals));
    let stats: Vec<results::ServerStats> = logs
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|s| results::parse_stats(&s))
        .collect();
    for s in &stats {
        println!(
            "{}: {} requests in {} batches: {:.1} requests per batch (per ABUSE_SERVE call)",
            s.device,
            s.requests,
            s.batches,
            s.per_batch()
        );
    }
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
