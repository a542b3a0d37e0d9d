//! The engine's counters, one set per thread: a worker or I/O thread counts
//! in its own cache line (no line bouncing between CPUs on the fast path),
//! and a reader sums the sets.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// One thread's counts.
        #[derive(Default, Debug)]
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// Every thread's counts, summed.
        #[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
        pub struct Totals {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Totals {
            fn add(&mut self, c: &Counters) {
                $(self.$name += c.$name.load(Ordering::Relaxed);)*
            }

            /// Each count with its name (for a stats file).
            pub fn named(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

counters! {
    /// READs completed.
    reads,
    /// READs of those completed as zeroes (ABUSE_BIO_ZEROES).
    holes,
    /// READs and WRITEs whose data the kernel moved between the request
    /// and the backend's file (ABUSE_BIO_FILE).
    file_io,
    /// WRITEs completed.
    writes,
    /// FLUSHes completed.
    flushes,
    /// WRITEs of those with FUA.
    fua,
    /// DISCARDs completed.
    discards,
    /// WRITE_ZEROES completed.
    write_zeroes,
    /// Bytes READ.
    bytes_read,
    /// Bytes written.
    bytes_written,
    /// Requests that failed.
    errors,
    /// Requests fetched before, by a server that died or timed out
    /// (ABUSE_BIO_REQUEUED).
    requeued,
    /// Completions the kernel refused as stale (the device was reset, or
    /// failed), skipped.
    stale,
    /// Fetches that brought requests.
    batches,
    /// Backend calls retried after a transient error.
    retries,
    /// Backend calls that panicked (each failed its request).
    panics,
}

impl Totals {
    /// Requests completed successfully.
    pub fn requests(&self) -> u64 {
        self.reads + self.writes + self.flushes + self.discards + self.write_zeroes
    }
}

/// Sets of counters: threads beyond this many share sets (still correct,
/// only no longer alone in their cache line).
const SETS: usize = 32;

static NEXT_SET: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's set, the same in every [`Stats`].
    static SET: Cell<usize> = Cell::new(NEXT_SET.fetch_add(1, Ordering::Relaxed) % SETS);
}

/// An engine's counters (each process has its own).
#[derive(Debug)]
pub struct Stats {
    sets: Box<[CachePadded<Counters>]>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            sets: (0..SETS).map(|_| CachePadded::default()).collect(),
        }
    }
}

impl Stats {
    /// The calling thread's counters.
    pub fn mine(&self) -> &Counters {
        &self.sets[SET.with(Cell::get)]
    }

    /// Every thread's counts, summed.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for set in self.sets.iter() {
            t.add(set);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_totals_sum_every_threads_counts() {
        let stats = Stats::default();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let stats = &stats;
                    s.spawn(move || {
                        for _ in 0..1000 {
                            stats.mine().reads.fetch_add(1, Ordering::Relaxed);
                        }
                        stats.mine().bytes_read.fetch_add(i, Ordering::Relaxed);
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        });
        let t = stats.totals();
        assert_eq!((t.reads, t.bytes_read, t.requests()), (4000, 6, 4000));
        assert!(t.named().contains(&("reads", 4000)));
    }
}
