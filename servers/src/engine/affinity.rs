//! Where and how each worker runs.
//!
//! On the CPUs whose requests its hardware queue takes (as ublk's servers
//! do): a request submitted on CPU n lands on queue n's FIFO and wakes
//! queue n's worker, which then runs where the submitter runs, with no
//! cross-CPU wakeup (an IPI, and a halted CPU to wake: the bulk of a QD1
//! request's latency otherwise).
//!
//! Under SCHED_BATCH: a worker woken by a new request does not preempt the
//! task that queued it, which goes on queueing until it waits for a
//! completion; the worker then fetches what it queued in one call, where
//! under the normal policy it would preempt at once to fetch one request.

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

/// Puts the calling thread under SCHED_BATCH (the normal policy's
/// priorities, without wake-up preemption). Best effort: where it is not
/// allowed, the worker runs under the policy it has.
pub fn batch_policy() -> bool {
    let param = nix::libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that the call only reads; pid
    // 0 names the calling thread.
    let rc = unsafe { nix::libc::sched_setscheduler(0, nix::libc::SCHED_BATCH, &param) };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::parse_cpu_list;

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
