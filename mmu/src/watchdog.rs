//! The soft-lockup watchdog: a stand-in for the kernel's soft-lockup
//! detector (`kernel/watchdog.c`), which cannot tell a CPU stuck in a long
//! non-preemptible stretch until it next gets to run. Here a thread needs
//! `mmu_lock` every `period` while a zap runs and records how long it
//! waited, and how much zap work (rmap heads) went by meanwhile: without
//! yielding (KVM before 6.12) its wait is the whole zap; with yielding it
//! is at most one stretch.

use crate::context::MmuContext;
use crate::shadow::ZapProgress;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What the watchdog saw.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct WatchdogReport {
    pub worst_wait_ns: u64,
    /// Most rmap heads the zapper visited during one wait.
    pub worst_wait_entries: u64,
    /// The same, not counting the one-head stretches between releases the
    /// watchdog missed (it had registered as a waiter but was not parked
    /// yet, or was descheduled, when the zapper released): the zap work the
    /// watchdog was really held off by.
    pub worst_wait_work: u64,
    pub acquisitions: u64,
}

/// The soft-lockup detector's stand-in: once the zap publishes that it
/// started, need `mmu_lock` every `period` until the zap is done; report
/// the worst wait.
pub fn watchdog(ctx: &MmuContext, progress: &ZapProgress, period: Duration) -> WatchdogReport {
    watchdog_until(ctx, progress, period, || {
        progress.done.load(Ordering::Acquire)
    })
}

/// [`watchdog`] over an operation that may zap several times (one zap per
/// notifier range): from the first zap's start until `over()` says the
/// operation is over. A zap that starts while the watchdog waits counts
/// its work from its own start.
pub fn watchdog_until(
    ctx: &MmuContext,
    progress: &ZapProgress,
    period: Duration,
    over: impl Fn() -> bool,
) -> WatchdogReport {
    let lock = &ctx.mmu_lock;
    let mut r = WatchdogReport::default();
    while !progress.started.load(Ordering::Acquire) && !over() {
        std::hint::spin_loop();
    }
    loop {
        let done = over();
        let (u0, y0) = (
            progress.heads_visited.load(Ordering::Acquire),
            progress.yields.load(Ordering::Acquire),
        );
        let t0 = Instant::now();
        let g = lock.read();
        let waited = notifier::convert::duration_ns(t0.elapsed());
        let (u1, y1) = (
            progress.heads_visited.load(Ordering::Acquire),
            progress.yields.load(Ordering::Acquire),
        );
        drop(g);
        r.acquisitions += 1;
        r.worst_wait_ns = r.worst_wait_ns.max(waited);
        // (A new zap restarted the counters: its own work.)
        let entries = if u1 >= u0 { u1 - u0 } else { u1 };
        let yields = if y1 >= y0 { y1 - y0 } else { y1 };
        r.worst_wait_entries = r.worst_wait_entries.max(entries);
        r.worst_wait_work = r.worst_wait_work.max(entries.saturating_sub(yields));
        if done {
            return r;
        }
        std::thread::sleep(period);
    }
}
