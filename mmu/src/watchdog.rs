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
    /// Most rmap heads the zapper visited from the moment the watchdog
    /// wanted the lock to the zapper's first release of it after that: the
    /// zap work the watchdog was held off by, whether or not it was on a CPU
    /// to take the lock at that release (a watchdog descheduled while it
    /// queues - 2 shared cores, an emulated host's vCPU - misses handovers
    /// the zapper did offer). At most one stretch (+ [`PROGRESS_EVERY`]: the
    /// start is the last published count) when the zap yields; the whole
    /// zap when it never does.
    ///
    /// [`PROGRESS_EVERY`]: crate::shadow::zap::PROGRESS_EVERY
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
        // Wanted first, then where the zap is: a release in between counts
        // as no work (it did come after the want); never the other way
        // round, where a watchdog descheduled between the two would count
        // the stretches it slept through.
        progress.want_release();
        let zap0 = progress.zaps.load(Ordering::SeqCst);
        let u0 = progress.heads_visited.load(Ordering::SeqCst);
        let t0 = Instant::now();
        let g = lock.read();
        let waited = notifier::convert::duration_ns(t0.elapsed());
        let released = progress.take_release();
        let at_acquire = (
            progress.heads_visited.load(Ordering::Acquire),
            progress.zaps.load(Ordering::SeqCst),
        );
        drop(g);
        r.acquisitions += 1;
        r.worst_wait_ns = r.worst_wait_ns.max(waited);
        // Heads of zap work since the want, up to a point of zap `zap`
        // (a zap started meanwhile restarted the counters: all its own).
        let since = |(heads, zap): (u64, u64)| {
            if zap == zap0 {
                heads.saturating_sub(u0)
            } else {
                heads
            }
        };
        r.worst_wait_entries = r.worst_wait_entries.max(since(at_acquire));
        r.worst_wait_work = r.worst_wait_work.max(since(released.unwrap_or(at_acquire)));
        if done {
            return r;
        }
        std::thread::sleep(period);
    }
}
