//! Running each worker on the CPUs whose requests its hardware queue takes
//! (as ublk's servers do): a request submitted on CPU n lands on queue
//! n's FIFO and wakes queue n's worker, which then runs where the submitter
//! runs, with no cross-CPU wakeup (an IPI, and a halted CPU to wake: the
//! bulk of a QD1 request's latency otherwise).

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
