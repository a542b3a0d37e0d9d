//! Progress of long operations (cow create, merge, verify): a bar on a
//! terminal, plain lines (every 10%) when stderr is not one.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

/// Reports progress towards `total` bytes of `what`.
pub struct Progress {
    what: String,
    total: u64,
    done: AtomicU64,
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(what: &str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            b.set_message(what.to_string());
            b
        });
        Progress {
            what: what.into(),
            total,
            done: AtomicU64::new(0),
            bar,
        }
    }

    /// `n` more bytes done (from any thread).
    pub fn add(&self, n: u64) {
        let before = self.done.fetch_add(n, Ordering::Relaxed);
        match &self.bar {
            Some(b) => b.inc(n),
            None if self.total > 0 => {
                let tenth = |x: u64| x.saturating_mul(10) / self.total;
                if tenth(before + n) > tenth(before) {
                    eprintln!("{}: {}%", self.what, tenth(before + n).min(10) * 10);
                }
            }
            None => {}
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
