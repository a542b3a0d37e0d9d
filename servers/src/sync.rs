//! Group commit: callers that need everything they wrote so far durable
//! share syncs. A caller waits for a sync that started after it asked (a
//! sync already under way may have missed its writes); one sync serves
//! every caller that asked before it started.

use std::io;
use std::sync::{Condvar, Mutex};

#[derive(Default)]
struct State {
    started: u64,
    completed: u64,
    running: bool,
    /// The last sync that failed, and how.
    failed: Option<(u64, io::ErrorKind, String)>,
}

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
            if s.completed >= target {
                return match &s.failed {
                    // A failed sync may have dropped the pages it could not
                    // write: every caller it was to serve hears of it.
                    Some((g, kind, msg)) if *g >= target => Err(io::Error::new(*kind, msg.clone())),
                    _ => Ok(()),
                };
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
                    s.failed = Some((g, e.kind(), e.to_string()));
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
        assert!(g.sync(|| Ok(())).is_ok(), "a later sync succeeds again");
    }
}
