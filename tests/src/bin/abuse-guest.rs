//! Runs the VM scenarios inside the guest: all of them, or those named on
//! the command line (or in $ABUSE_SCENARIO). Prints one line per scenario
//! and a final `N passed, N failed` line; exits non-zero on any failure.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use abuse_tests::guest::{ensure_unloaded, Scenario};
use abuse_tests::scenarios::{ALL, POWER_CUT};

/// A scenario still running after this is reported failed; the host-side
/// timeout bounds the whole run if it never returns.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(300);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        let result =
            abuse_tests::server::Opts::parse(&args[1..]).and_then(abuse_tests::server::serve);
        if let Err(e) = result {
            eprintln!("abuse-guest serve: {e}");
            std::process::exit(1);
        }
        return;
    }
    if args.first().map(String::as_str) == Some("hostile") {
        // A hostile server for the scenarios of scenarios/hostile.rs.
        std::process::exit(abuse_tests::hostile::main(&args[1..]));
    }
    if args.first().map(String::as_str) == Some("ioctl-fd3") {
        // For non_root_refused: every ioctl on the inherited fd 3 must be EPERM.
        std::process::exit(abuse_tests::scenarios::ioctls_on_fd3());
    }
    let mut wanted = args;
    if wanted.is_empty() {
        if let Ok(s) = std::env::var("ABUSE_SCENARIO") {
            wanted = s
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
        }
    }
    let known = || ALL.iter().chain(POWER_CUT);
    let unknown: Vec<&String> = wanted
        .iter()
        .filter(|w| !known().any(|s| s.name == w.as_str()))
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
    // The power-cut phases run only when named.
    let selected: Vec<&Scenario> = if wanted.is_empty() {
        ALL.iter().collect()
    } else {
        known()
            .filter(|s| wanted.iter().any(|w| w == s.name))
            .collect()
    };

    let (mut passed, mut failed) = (0, 0);
    let mut hung: Option<&str> = None;
    for s in selected {
        if let Some(h) = hung {
            failed += 1;
            println!("FAIL {}: not run: {h} hung", s.name);
            continue;
        }
        ensure_unloaded();
        let start = Instant::now();
        let (tx, rx) = mpsc::channel();
        let run = s.run;
        std::thread::spawn(move || {
            let _ = tx.send(run());
        });
        let outcome = rx.recv_timeout(SCENARIO_TIMEOUT).unwrap_or_else(|_| {
            // Its thread is stuck, probably in the kernel: the rest would
            // only wait on the same thing.
            hung = Some(s.name);
            Err("timed out".into())
        });
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
