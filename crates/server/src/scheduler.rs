//! Placement: the node with the most free memory that fits the sandbox.

use crate::model::Resources;

/// What a node has left after the reservations of the sandboxes placed on it.
#[derive(Clone, Debug, PartialEq)]
pub struct Free {
    pub cpus: f64,
    pub memory_mb: i64,
    pub disk_mb: i64,
    /// The largest sandbox the node runs, if it said.
    pub per_sandbox: Option<Resources>,
}

/// Whether one sandbox's resources fit a node's per-sandbox maximum: its memory
/// and disk together (the disk lives in memory), its cpus and its pids.
pub fn within(want: &Resources, max: &Resources) -> bool {
    want.memory_mb.saturating_add(want.disk_mb) <= max.memory_mb
        && want.cpus <= max.cpus + 1e-9
        && want.pids <= max.pids
}

impl Free {
    pub fn of(capacity: &Resources, per_sandbox: Option<&Resources>) -> Self {
        Free {
            cpus: capacity.cpus,
            memory_mb: i64::try_from(capacity.memory_mb).unwrap_or(i64::MAX),
            disk_mb: i64::try_from(capacity.disk_mb).unwrap_or(i64::MAX),
            per_sandbox: per_sandbox.cloned(),
        }
    }

    pub fn reserve(&mut self, want: &Resources) {
        self.cpus -= want.cpus;
        self.memory_mb =
            self.memory_mb.saturating_sub(i64::try_from(want.memory_mb).unwrap_or(i64::MAX));
        self.disk_mb = self.disk_mb.saturating_sub(i64::try_from(want.disk_mb).unwrap_or(i64::MAX));
    }

    pub fn fits(&self, want: &Resources) -> bool {
        // A small epsilon keeps 10 × 0.1 cpus on a 1-cpu node from failing
        // on floating-point error.
        self.cpus + 1e-9 >= want.cpus
            && self.memory_mb >= i64::try_from(want.memory_mb).unwrap_or(i64::MAX)
            && self.disk_mb >= i64::try_from(want.disk_mb).unwrap_or(i64::MAX)
            && self.per_sandbox.as_ref().is_none_or(|max| within(want, max))
    }
}

/// Picks the node with the most free memory among those that fit `want`;
/// ties go to the first in iteration order, so placement is deterministic.
pub fn pick<'a, I>(nodes: I, want: &Resources) -> Option<&'a str>
where
    I: IntoIterator<Item = (&'a str, &'a Free)>,
{
    let mut best: Option<(&str, i64)> = None;
    for (id, free) in nodes {
        if !free.fits(want) {
            continue;
        }
        if best.is_none_or(|(_, memory)| free.memory_mb > memory) {
            best = Some((id, free.memory_mb));
        }
    }
    best.map(|(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(cpus: f64, memory_mb: u64) -> Resources {
        Resources { cpus, memory_mb, disk_mb: 0, pids: 1 }
    }

    #[test]
    fn picks_most_free_memory_that_fits() {
        let a = Free::of(&res(1.0, 4096), None);
        let b = Free::of(&res(8.0, 2048), None);
        let nodes = [("a", &a), ("b", &b)];
        assert_eq!(pick(nodes, &res(1.0, 512)), Some("a"));
        assert_eq!(pick(nodes, &res(2.0, 512)), Some("b"));
        assert_eq!(pick(nodes, &res(16.0, 512)), None);
    }

    #[test]
    fn a_node_takes_no_sandbox_larger_than_its_per_sandbox_maximum() {
        let max = Resources { cpus: 2.0, memory_mb: 1024, disk_mb: 0, pids: 100 };
        let capacity =
            Resources { cpus: 128.0, memory_mb: 1 << 20, disk_mb: 1 << 20, pids: 1 << 20 };
        let node = Free::of(&capacity, Some(&max));
        let want = |cpus, memory_mb, disk_mb, pids| Resources { cpus, memory_mb, disk_mb, pids };
        assert!(node.fits(&want(2.0, 512, 512, 100)));
        assert!(!node.fits(&want(2.0, 512, 513, 100)), "memory and disk share memory");
        assert!(!node.fits(&want(2.5, 16, 1, 1)));
        assert!(!node.fits(&want(1.0, 16, 1, 101)));
    }

    #[test]
    fn reservations_reduce_what_fits() {
        let mut free = Free::of(&res(1.0, 1024), None);
        for _ in 0..10 {
            assert!(free.fits(&res(0.1, 100)));
            free.reserve(&res(0.1, 100));
        }
        assert!(!free.fits(&res(0.1, 100)));
    }
}
