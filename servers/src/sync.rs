//! Group commit: callers that need everything they wrote so far durable
//! share syncs. A caller waits for a sync that started after it asked (a
//! sync already under way may have missed its writes); one sync serves
//! every caller that asked before it started.
//!
//! And the rule every backend keeps: **after a failed sync, every later one
//! fails until the file is reopened.** Linux drops the pages a failed
//! writeback could not write and marks them clean, so the next fsync
//! succeeds without them: it proves nothing about writes acknowledged
//! before the failure ([`SyncLatch`]).

use std::io;
use std::sync::{Condvar, Mutex};

/// A sticky failed-sync flag: once a sync failed, every later sync (and
/// every FLUSH) fails, naming the first failure, until the backend is
/// reopened (a new server).
#[derive(Default)]
pub struct SyncLatch {
    failed: Mutex<Option<String>>,
}

impl SyncLatch {
    /// An error if a sync failed before.
    pub fn check(&self) -> io::Result<()> {
        match &*self.failed.lock().unwrap_or_else(|e| e.into_inner()) {
            None => Ok(()),
            Some(first) => Err(after_failure(first)),
        }
    }

    /// Records that a sync failed with `e` (the first failure is kept).
    pub fn trip(&self, e: &io::Error) {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert_with(|| e.to_string());
    }

    /// Runs `sync` unless one failed before; a failure trips the latch.
    pub fn sync(&self, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        self.check()?;
        let r = sync();
        if let Err(e) = &r {
            self.trip(e);
        }
        r
    }
}

/// The error every sync gets after the first failed one.
fn after_failure(first: &str) -> io::Error {
    io::Error::other(format!(
        "an earlier sync failed ({first}): writes acknowledged before it may be lost, so every FLUSH fails until the server is restarted"
    ))
}

#[derive(Default)]
struct State {
    started: u64,
    completed: u64,
    running: bool,
    /// The first sync that failed, and how: it and every later one fail.
    failed: Option<(u64, io::ErrorKind, String)>,
}

/// Shares syncs among the callers that need one (group commit).
#[derive(Default)]
pub struct GroupSync {
    state: Mutex<State>,
    done: Condvar,
}

impl GroupSync {
    /// Returns once a call of `sync` that started after this call began
    /// has completed (running it if none is under way), with its result.
    pub fn sync(&self, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let target = s.started + 1;
        let mut sync = Some(sync);
        loop {
            match &s.failed {
                // A failed sync may have dropped the pages it could not
                // write: every caller it was to serve hears of it, and so
                // does every later one (a later sync proves nothing).
                Some((g, kind, msg)) if *g >= target => {
                    return Err(io::Error::new(*kind, msg.clone()))
                }
                Some((_, _, msg)) => return Err(after_failure(msg)),
                None if s.completed >= target => return Ok(()),
                None => {}
            }
            if !s.running {
                s.running = true;
                s.started += 1;
                let g = s.started;
                drop(s);
                let r = (sync.take().expect("one sync per caller"))();
                s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                s.running = false;
                s.completed = g;
                if let Err(e) = &r {
                    s.failed.get_or_insert_with(|| (g, e.kind(), e.to_string()));
                }
                self.done.notify_all();
                continue;
            }
            s = self.done.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn callers_share_syncs_and_hear_of_failures() {
        let g = Arc::new(GroupSync::default());
        let calls = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (g, calls) = (g.clone(), calls.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        g.sync(|| {
                            calls.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_micros(200));
                            Ok(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = calls.load(Ordering::SeqCst);
        assert!(n < 400, "{n} syncs for 400 callers: none shared");
        assert!(g.sync(|| Err(io::Error::other("disk gone"))).is_err());
        let later = g.sync(|| Ok(()));
        assert!(
            later.is_err_and(|e| e.to_string().contains("disk gone")),
            "a sync after a failed one succeeded"
        );
    }

    #[test]
    fn a_latch_fails_every_sync_after_a_failed_one() {
        let l = SyncLatch::default();
        assert!(l.sync(|| Ok(())).is_ok());
        assert!(l.sync(|| Err(io::Error::from_raw_os_error(5))).is_err());
        let mut ran = false;
        let later = l.sync(|| {
            ran = true;
            Ok(())
        });
        assert!(
            later.is_err() && !ran,
            "a sync after a failed one ran or succeeded"
        );
        assert!(l.check().is_err());
    }
}
