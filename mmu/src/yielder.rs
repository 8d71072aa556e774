//! The yield mechanism every zap uses (invariant 4).
//!
//! A zap calls [`Yielder::need_yield`] once per unit of work - every leaf
//! SPTE visited (TDP), every rmap head visited, empty ones included
//! (shadow / nested). The check is cheap: a unit counter and the lock's
//! waiter count every time, the clock every [`CLOCK_EVERY`] units. When it
//! says yes, the caller flushes what it zapped, calls
//! [`MmuLock::yield_write`](crate::MmuLock::yield_write) and then
//! [`Yielder::yielded`], and resumes where it stopped.
//!
//! A *stretch* is the work done between two yields (or from the start of the
//! zap to its first yield, or from its last yield to its end): the time the
//! zapper held `mmu_lock` without letting anyone in. The longest stretch is
//! recorded in time and in units and published as `max_zap_stretch_ns` /
//! `max_zap_stretch_leaves`.

use crate::lock::MmuLock;
use crate::stats::MmuStats;
use std::time::{Duration, Instant};

/// The clock is read every this many units (a power of two).
pub const CLOCK_EVERY: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum YieldMode {
    /// Yield when the slice is spent, the unit budget is spent, or someone
    /// waits for the lock.
    Yield,
    /// Never yield: KVM's rmap zap on the mmu_notifier path before 6.12.
    NeverYield,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct YieldPolicy {
    pub mode: YieldMode,
    /// Longest time to hold the lock without a check that can yield.
    pub slice: Duration,
    /// Most units (leaves / rmap entries) in one stretch.
    pub max_units: u64,
}

impl Default for YieldPolicy {
    fn default() -> Self {
        Self {
            mode: YieldMode::Yield,
            slice: Duration::from_micros(20),
            max_units: u64::MAX,
        }
    }
}

impl YieldPolicy {
    pub fn never() -> Self {
        Self {
            mode: YieldMode::NeverYield,
            ..Self::default()
        }
    }

    pub fn with_max_units(mut self, units: u64) -> Self {
        self.max_units = units.max(1);
        self
    }

    pub fn with_slice(mut self, slice: Duration) -> Self {
        self.slice = slice;
        self
    }
}

/// One stretch of work under the lock.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stretch {
    pub ns: u64,
    pub units: u64,
}

impl Stretch {
    fn max(self, other: Stretch) -> Stretch {
        Stretch {
            ns: self.ns.max(other.ns),
            units: self.units.max(other.units),
        }
    }
}

/// What one zap did, for reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct YieldReport {
    pub units: u64,
    pub yields: u64,
    pub longest: Stretch,
    pub total_ns: u64,
}

/// Per-zap yield state. See the module docs for the protocol.
pub struct Yielder<'a> {
    policy: YieldPolicy,
    lock: &'a MmuLock,
    stats: &'a MmuStats,
    started: Instant,
    stretch_start: Instant,
    stretch_units: u64,
    report: YieldReport,
}

impl<'a> Yielder<'a> {
    pub fn new(policy: YieldPolicy, lock: &'a MmuLock, stats: &'a MmuStats) -> Self {
        let now = Instant::now();
        Self {
            policy,
            lock,
            stats,
            started: now,
            stretch_start: now,
            stretch_units: 0,
            report: YieldReport::default(),
        }
    }

    pub fn policy(&self) -> YieldPolicy {
        self.policy
    }

    /// Count one unit of work and say whether the caller must yield now.
    #[inline]
    pub fn need_yield(&mut self) -> bool {
        self.stretch_units += 1;
        if self.policy.mode == YieldMode::NeverYield {
            return false;
        }
        if self.stretch_units >= self.policy.max_units || self.lock.contended() {
            return true;
        }
        self.stretch_units % CLOCK_EVERY == 0 && self.stretch_start.elapsed() >= self.policy.slice
    }

    /// The caller has flushed, dropped and re-taken the lock: close the
    /// stretch and open the next one.
    pub fn yielded(&mut self) {
        self.close_stretch();
        self.report.yields += 1;
        MmuStats::inc(&self.stats.zap_yields);
        self.stretch_start = Instant::now();
    }

    /// End of the zap: close the last stretch, publish the peaks.
    pub fn finish(mut self) -> YieldReport {
        self.close_stretch();
        self.report.total_ns = nanos(self.started.elapsed());
        MmuStats::peak(&self.stats.max_zap_stretch_ns, self.report.longest.ns);
        MmuStats::peak(
            &self.stats.max_zap_stretch_leaves,
            self.report.longest.units,
        );
        self.report
    }

    fn close_stretch(&mut self) {
        let s = Stretch {
            ns: nanos(self.stretch_start.elapsed()),
            units: self.stretch_units,
        };
        self.report.longest = self.report.longest.max(s);
        self.report.units += self.stretch_units;
        self.stretch_units = 0;
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: YieldPolicy, units: u64) -> YieldReport {
        let lock = MmuLock::new();
        let stats = MmuStats::default();
        let mut guard = lock.write();
        let mut y = Yielder::new(policy, &lock, &stats);
        for _ in 0..units {
            if y.need_yield() {
                MmuLock::yield_write(&mut guard);
                y.yielded();
            }
        }
        let r = y.finish();
        assert_eq!(stats.snapshot().max_zap_stretch_leaves, r.longest.units);
        assert_eq!(stats.snapshot().zap_yields, r.yields);
        r
    }

    #[test]
    fn unit_budget_bounds_every_stretch() {
        let r = run(
            YieldPolicy::default()
                .with_max_units(100)
                .with_slice(Duration::from_secs(60)),
            10_000,
        );
        assert_eq!(r.units, 10_000);
        assert!(r.longest.units <= 100, "{r:?}");
        assert_eq!(r.yields, 100);
    }

    #[test]
    fn never_yield_is_one_stretch() {
        let r = run(YieldPolicy::never().with_max_units(100), 10_000);
        assert_eq!(r.yields, 0);
        assert_eq!(r.longest.units, 10_000);
    }
}
