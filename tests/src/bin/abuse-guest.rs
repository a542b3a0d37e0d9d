//! Runs the VM scenarios inside the guest: all of them, or those named on
//! the command line (or in $ABUSE_SCENARIO). Prints one line per scenario
//! and a final `N passed, N failed` line; exits non-zero on any failure.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use abuse_tests::guest::{ensure_unloaded, Scenario};
use abuse_tests::scenarios::ALL;

/// A scenario still running after this is reported failed; the host-side
/// timeout bounds the whole run if it never returns.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(300);

fn main() {
    let mut wanted: Vec<String> = std::env::args().skip(1).collect();
    if wanted.is_empty() {
        if let Ok(s) = std::env::var("ABUSE_SCENARIO") {
            wanted = s
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
        }
    }
    let unknown: Vec<&String> = wanted
        .iter()
        .filter(|w| !ALL.iter().any(|s| s.name == w.as_str()))
        .collect();
    if !unknown.is_empty() {
        let names: Vec<&str> = ALL.iter().map(|s| s.name).collect();
        println!(
            "abuse-guest: unknown scenario(s) {unknown:?}; known: {}",
            names.join(" ")
        );
        println!("0 passed, 1 failed");
        std::process::exit(1);
    }
    let selected: Vec<&Scenario> = ALL
        .iter()
        .filter(|s| wanted.is_empty() || wanted.iter().any(|w| w == s.name))
        .collect();

    let (mut passed, mut failed) = (0, 0);
    for s in selected {
        ensure_unloaded();
        let start = Instant::now();
        let (tx, rx) = mpsc::channel();
        let run = s.run;
        std::thread::spawn(move || {
            let _ = tx.send(run());
        });
        let outcome = rx
            .recv_timeout(SCENARIO_TIMEOUT)
            .unwrap_or_else(|_| Err("timed out".into()));
        let secs = start.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => {
                passed += 1;
                println!("PASS {} ({secs:.1}s)", s.name);
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {} ({secs:.1}s): {e}", s.name);
            }
        }
    }
    ensure_unloaded();
    println!("{passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
