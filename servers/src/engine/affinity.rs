//! Where and how each worker runs.
//!
//! On the CPUs whose requests its hardware queue takes (as ublk's servers
//! do): a request submitted on CPU n lands on queue n's FIFO and wakes
//! queue n's worker, which then runs where the submitter runs, with no
//! cross-CPU wakeup (an IPI, and a halted CPU to wake: the bulk of a QD1
//! request's latency otherwise).
//!
//! Under SCHED_BATCH while requests come several at a time: a worker woken
//! by a new request does not preempt the task that queued it, which goes
//! on queueing until it waits for a completion; the worker then fetches
//! what it queued in one call, where under the normal policy it would
//! preempt at once to fetch one request. Under the normal policy while they
//! come one at a time: a lone request's submitter waits for it, and the
//! wake-up preemption is its latency (fio 4k QD1 p50: 8 us normal, 69 us
//! SCHED_BATCH).

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// The CPUs of `cpu_list` ("0-3, 8, 10-11"), or None if it does not parse.
pub fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// Pins the calling thread to the CPUs blk-mq maps to hardware queue
/// `queue` of /dev/abuse`index` (sysfs `mq/Q/cpu_list`). Best effort: a
/// server that cannot read the map or is not allowed those CPUs (a
/// container's cpuset) runs unpinned, which is only slower.
pub fn pin_to_queue(index: u32, queue: u32) -> bool {
    let path = format!("/sys/block/abuse{index}/mq/{queue}/cpu_list");
    let Some(cpus) = std::fs::read_to_string(path)
        .ok()
        .and_then(|l| parse_cpu_list(&l))
    else {
        return false;
    };
    let mut set = CpuSet::new();
    for cpu in cpus {
        if set.set(cpu).is_err() {
            return false;
        }
    }
    sched_setaffinity(Pid::from_raw(0), &set).is_ok()
}

/// Consecutive single-request fetches after which a worker under
/// SCHED_BATCH goes back to the normal policy.
const SINGLES: u32 = 8;

/// A worker's scheduling policy, following the size of its fetches.
pub struct Policy {
    /// Switch at all (false: `--no-sched-batch`, or not allowed here).
    enabled: bool,
    batch: bool,
    /// Single-request fetches in a row.
    singles: u32,
}

impl Policy {
    /// Starts under the calling thread's policy (the normal one).
    pub fn new(enabled: bool) -> Self {
        Policy {
            enabled,
            batch: false,
            singles: 0,
        }
    }

    /// The worker fetched `n` requests (n > 0): SCHED_BATCH when several
    /// came at once, the normal policy after [`SINGLES`] lone ones.
    pub fn fetched(&mut self, n: usize) {
        if !self.enabled {
            return;
        }
        if n >= 2 {
            self.singles = 0;
            if !self.batch {
                self.batch = true;
                self.set(nix::libc::SCHED_BATCH);
            }
        } else {
            // Saturating: a worker may fetch lone requests for ever.
            self.singles = self.singles.saturating_add(1);
            if self.batch && self.singles >= SINGLES {
                self.batch = false;
                self.set(nix::libc::SCHED_OTHER);
            }
        }
    }

    /// Best effort: where it is not allowed, the worker stays as it is
    /// and stops trying.
    fn set(&mut self, policy: i32) {
        let param = nix::libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param that the call only reads;
        // pid 0 names the calling thread.
        if unsafe { nix::libc::sched_setscheduler(0, policy, &param) } != 0 {
            self.enabled = false;
        }
    }
}

/// The calling thread's scheduling policy (the tests' check of [`Policy`]).
#[cfg(test)]
pub(crate) fn current_policy() -> i32 {
    // SAFETY: no arguments but the calling thread (pid 0).
    unsafe { nix::libc::sched_getscheduler(0) }
}

#[cfg(test)]
mod tests {
    use super::{current_policy as policy, parse_cpu_list, Policy, SINGLES};

    #[test]
    fn the_policy_follows_the_fetches() {
        std::thread::spawn(|| {
            let mut p = Policy::new(true);
            p.fetched(1);
            assert_eq!(policy(), nix::libc::SCHED_OTHER, "a lone request");
            p.fetched(3);
            assert_eq!(policy(), nix::libc::SCHED_BATCH, "several at once");
            for _ in 1..SINGLES {
                p.fetched(1);
            }
            p.fetched(2);
            assert_eq!(policy(), nix::libc::SCHED_BATCH, "a few lone ones");
            for _ in 0..SINGLES {
                p.fetched(1);
            }
            assert_eq!(policy(), nix::libc::SCHED_OTHER, "lone ones in a row");
            let mut off = Policy::new(false);
            off.fetched(5);
            assert_eq!(policy(), nix::libc::SCHED_OTHER, "--no-sched-batch");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0\n"), Some(vec![0]));
        assert_eq!(
            parse_cpu_list("0-3, 8, 10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }
}
