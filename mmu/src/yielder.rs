//! The yield mechanism every zap uses (invariant 4).
//!
//! A zap calls [`Yielder::need_yield`] once per unit of work - every leaf
//! SPTE visited (TDP), every rmap head visited, empty ones included
//! (shadow / nested). Each call counts the unit against the stretch's unit
//! budget; every [`CLOCK_EVERY`] units it also reads the TSC and the lock's
//! waiter count (64 units of zap work are well under a microsecond, so the
//! slice is honoured to within that). When it says yes, the caller flushes
//! what it zapped, calls [`MmuLock::yield_write`](crate::MmuLock::yield_write)
//! and then [`Yielder::yielded`], and resumes where it stopped.
//!
//! A zap yields when its slice is spent, when its unit budget is spent, or
//! when someone waits for the lock and the zap has held it for at least
//! `min_hold` - without that floor a constantly faulting vCPU turns every
//! check into a yield (each a context switch), the storm KVM's
//! `rwlock_needbreak()` avoids by ignoring contention on non-preemptible
//! kernels.
//!
//! A *stretch* is the work done between two yields (or from the start of the
//! zap to its first yield, or from its last yield to its end): the time the
//! zapper held `mmu_lock` without letting anyone in. The longest stretch is
//! recorded in time and in units and published as `max_zap_stretch_ns` /
//! `max_zap_stretch_leaves`.

use crate::clock::{self, Ticks};
use crate::lock::MmuLock;
use crate::stats::MmuStats;
use std::time::Duration;

/// The clock and the waiter count are sampled every this many units.
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
    /// Least time to hold the lock before yielding to a waiter.
    pub min_hold: Duration,
}

impl Default for YieldPolicy {
    fn default() -> Self {
        Self {
            mode: YieldMode::Yield,
            slice: Duration::from_micros(20),
            max_units: u64::MAX,
            min_hold: Duration::from_micros(5),
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
        self.min_hold = self.min_hold.min(slice);
        self
    }

    pub fn with_min_hold(mut self, min_hold: Duration) -> Self {
        self.min_hold = min_hold.min(self.slice);
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
    slice_ticks: Ticks,
    min_hold_ticks: Ticks,
    started: Ticks,
    stretch_start: Ticks,
    /// Units of the current stretch counted before the current window.
    stretch_units: u64,
    /// The hot path only counts down; the window ends at a clock sample or
    /// at the unit budget, whichever comes first.
    window: u64,
    countdown: u64,
    report: YieldReport,
}

impl<'a> Yielder<'a> {
    pub fn new(policy: YieldPolicy, lock: &'a MmuLock, stats: &'a MmuStats) -> Self {
        let now = clock::now();
        let mut y = Self {
            policy,
            lock,
            stats,
            slice_ticks: clock::ticks(policy.slice),
            min_hold_ticks: clock::ticks(policy.min_hold),
            started: now,
            stretch_start: now,
            stretch_units: 0,
            window: 0,
            countdown: 0,
            report: YieldReport::default(),
        };
        y.open_window();
        y
    }

    pub fn policy(&self) -> YieldPolicy {
        self.policy
    }

    /// The caller waited under the lock before doing any zap work, for a
    /// reason that is not zap work (a measurement gate): start the clocks
    /// now. No effect once a unit was counted.
    pub fn restart_if_idle(&mut self) {
        if self.units_in_stretch() == 0 && self.report.units == 0 && self.report.yields == 0 {
            let now = clock::now();
            self.started = now;
            self.stretch_start = now;
        }
    }

    /// Count one unit of work and say whether the caller must yield now.
    #[inline]
    pub fn need_yield(&mut self) -> bool {
        self.countdown -= 1;
        self.countdown == 0 && self.window_done()
    }

    /// Units the caller may count at once with [`Self::skip`]: each of them
    /// would answer no (the next decision falls on the unit after them).
    #[inline]
    pub fn free_units(&self) -> u64 {
        self.countdown.saturating_sub(1)
    }

    /// Count `n` (at most [`Self::free_units`]) units at once: the same as
    /// `n` calls of [`Self::need_yield`], which would all answer no.
    #[inline]
    pub fn skip(&mut self, n: u64) {
        debug_assert!(n <= self.free_units());
        self.countdown -= n.min(self.free_units());
    }

    /// End of a counting window: account it, sample the clock and the
    /// waiters, decide.
    #[cold]
    fn window_done(&mut self) -> bool {
        self.stretch_units += self.window;
        let yield_now = self.stretch_units >= self.policy.max_units || {
            let held = clock::now().wrapping_sub(self.stretch_start);
            held >= self.slice_ticks || (held >= self.min_hold_ticks && self.lock.contended())
        };
        if yield_now {
            // Until the caller yields, every further unit says yes again.
            self.window = 1;
            self.countdown = 1;
        } else {
            self.open_window();
        }
        yield_now
    }

    fn open_window(&mut self) {
        self.window = match self.policy.mode {
            YieldMode::NeverYield => u64::MAX,
            YieldMode::Yield => CLOCK_EVERY
                .min(self.policy.max_units.saturating_sub(self.stretch_units))
                .max(1),
        };
        self.countdown = self.window;
    }

    fn units_in_stretch(&self) -> u64 {
        self.stretch_units + (self.window - self.countdown)
    }

    /// The caller has flushed, dropped and re-taken the lock: close the
    /// stretch and open the next one.
    pub fn yielded(&mut self) {
        self.close_stretch();
        self.report.yields += 1;
        MmuStats::inc(&self.stats.zap_yields);
        self.stretch_start = clock::now();
    }

    /// End of the zap: close the last stretch, publish the peaks.
    pub fn finish(mut self) -> YieldReport {
        self.close_stretch();
        self.report.total_ns = clock::nanos(clock::now().wrapping_sub(self.started));
        MmuStats::peak(&self.stats.max_zap_stretch_ns, self.report.longest.ns);
        MmuStats::peak(
            &self.stats.max_zap_stretch_leaves,
            self.report.longest.units,
        );
        self.report
    }

    fn close_stretch(&mut self) {
        let s = Stretch {
            ns: clock::nanos(clock::now().wrapping_sub(self.stretch_start)),
            units: self.units_in_stretch(),
        };
        self.report.longest = self.report.longest.max(s);
        self.report.units += s.units;
        self.stretch_units = 0;
        self.open_window();
    }
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
    fn skipping_free_units_yields_where_counting_one_by_one_does() {
        let policy = YieldPolicy::default()
            .with_max_units(100)
            .with_slice(Duration::from_secs(60));
        let lock = MmuLock::new();
        let stats = MmuStats::default();
        let mut guard = lock.write();
        let mut y = Yielder::new(policy, &lock, &stats);
        let (mut done, mut yields_at) = (0u64, Vec::new());
        while done < 1_000 {
            // Bulk-count 7 units at a time where allowed.
            let k = y.free_units().min(7).min(1_000 - done);
            if k > 0 {
                y.skip(k);
                done += k;
                continue;
            }
            done += 1;
            if y.need_yield() {
                yields_at.push(done);
                MmuLock::yield_write(&mut guard);
                y.yielded();
            }
        }
        let r = y.finish();
        assert_eq!(r.units, 1_000);
        assert_eq!(r.longest.units, 100, "{r:?}");
        // A yield after every 100th unit, as in `unit_budget_bounds_every_stretch`.
        assert_eq!(yields_at, (1..=10).map(|i| i * 100).collect::<Vec<_>>());
    }

    #[test]
    fn never_yield_is_one_stretch() {
        let r = run(YieldPolicy::never().with_max_units(100), 10_000);
        assert_eq!(r.yields, 0);
        assert_eq!(r.longest.units, 10_000);
    }
}
