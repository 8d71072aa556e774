//! Zapping an L1 gfn range through the rmaps, with yielding
//! (`kvm_unmap_gfn_range` -> `__kvm_rmap_zap_gfn_range` ->
//! `__walk_slot_rmaps`, as fixed in 6.12, with one difference: the yield
//! check runs at EVERY rmap head visited, empty ones included; KVM's
//! iterator skips empty heads inside `slot_rmap_walk_next()` without one).
//!
//! Two walk modes:
//! - [`WalkMode::Blind`]: every head position of every level in the range
//!   (KVM's cost: O(gfns) even when nothing is mapped - the reproduction).
//! - [`WalkMode::Summary`]: only heads the populated summary
//!   ([`crate::populated`]) marks non-empty; empty runs cost O(log).
//!
//! Yielding uses [`Yielder`]: one `need_yield()` per head visited; on yes,
//! flush the TLB if anything was zapped since the last flush, drop the state
//! and `mmu_lock` ([`MmuLock::yield_write`]), take them back, resume at the
//! next head. At the end: one flush if anything is pending. In
//! [`YieldMode::NeverYield`](crate::YieldMode) the whole range is one stretch
//! (KVM's mmu_notifier path before 6.12).
//!
//! Also here: [`ShadowMmu::zap_all`] (`kvm_mmu_zap_all`, no yielding) and
//! the [`SecondaryMmu`] impl through which host invalidations zap.

use super::{GuestPaging, ShadowMmu};
use crate::lock::MmuWriteGuard;
use crate::memslot::Memslot;
use crate::mmu_notifier::SecondaryMmu;
use crate::yielder::YieldReport;
use crate::{MmuLock, YieldPolicy, Yielder};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WalkMode {
    /// Visit every rmap head position.
    Blind,
    /// Visit only heads the populated summary marks.
    Summary,
}

/// Where a zap is, for observers on other threads (a watchdog): published
/// when the zap starts (lock held), at every yield and at the end.
#[derive(Debug, Default)]
pub struct ZapProgress {
    /// Set once the zap holds `mmu_lock`.
    pub started: AtomicBool,
    pub done: AtomicBool,
    /// Rmap heads visited so far: published every [`PROGRESS_EVERY`] heads,
    /// at every yield and at the end.
    pub heads_visited: AtomicU64,
    /// Times the zap released the lock so far (published before releasing).
    pub yields: AtomicU64,
    /// Zaps started on this progress (one per notifier range of an
    /// operation): tells an observer that the counters restarted.
    pub zaps: AtomicU64,
    /// 0 while nobody asks; set to [`RELEASE_WANTED`] by an observer about
    /// to wait for the lock; the zap's first release after that (a yield or
    /// its end) replaces it with 1 + the rmap heads visited by then
    /// ([`Self::want_release`], [`Self::take_release`]).
    pub released_at: AtomicU64,
    /// [`Self::zaps`] at that release: which zap's heads they are.
    pub released_zap: AtomicU64,
    /// Measurement gate: once it holds `mmu_lock`, the zap waits (at most
    /// [`GATE_TIMEOUT`]) until someone is blocked on the lock before it
    /// starts, so an observer's first wait covers the zap from its start.
    pub hold_until_contended: bool,
}

/// [`ZapProgress::released_at`] while an observer waits for a release.
pub const RELEASE_WANTED: u64 = u64::MAX;

impl ZapProgress {
    /// An observer is about to wait for `mmu_lock`: the zap's next release
    /// records where it was.
    pub fn want_release(&self) {
        self.released_at.store(RELEASE_WANTED, Ordering::SeqCst);
    }

    /// The rmap heads visited at the first release since
    /// [`Self::want_release`] and the zap ([`Self::zaps`]) they belong to,
    /// or None if no zap has released since. Call with `mmu_lock` held.
    pub fn take_release(&self) -> Option<(u64, u64)> {
        match self.released_at.swap(0, Ordering::SeqCst) {
            0 | RELEASE_WANTED => None,
            h => Some((h - 1, self.released_zap.load(Ordering::SeqCst))),
        }
    }

    /// Before a release of `mmu_lock`: answer a pending
    /// [`Self::want_release`] (only the first release after it).
    fn released(&self, heads: u64) {
        if self
            .released_at
            .compare_exchange(
                RELEASE_WANTED,
                heads.saturating_add(1).min(RELEASE_WANTED - 1),
                Ordering::SeqCst,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            // Read by the observer once it holds the lock this zap is
            // about to release: ordered by the lock.
            self.released_zap
                .store(self.zaps.load(Ordering::SeqCst), Ordering::SeqCst);
        }
    }
}

/// Reports of notifier-started zaps kept for [`ShadowMmu::take_notifier_reports`].
pub const MAX_NOTIFIER_REPORTS: usize = 64;

/// Heads between two publications of [`ZapProgress::heads_visited`].
pub const PROGRESS_EVERY: u64 = 64;

/// Longest wait of the [`ZapProgress::hold_until_contended`] gate.
pub const GATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How the zaps of host invalidations run ([`ShadowMmu::set_notifier_zap`]);
/// their yield policy is the [`crate::KvmMmuNotifier`]'s (never yielding
/// for non-blockable invalidations).
#[derive(Debug, Clone)]
pub struct NotifierZap {
    pub mode: WalkMode,
    pub progress: Option<std::sync::Arc<ZapProgress>>,
}

impl Default for NotifierZap {
    fn default() -> Self {
        Self {
            mode: WalkMode::Summary,
            progress: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ZapOptions<'a> {
    pub policy: YieldPolicy,
    pub mode: WalkMode,
    pub progress: Option<&'a ZapProgress>,
}

impl Default for ZapOptions<'_> {
    fn default() -> Self {
        Self {
            policy: YieldPolicy::default(),
            mode: WalkMode::Summary,
            progress: None,
        }
    }
}

/// What one zap did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ZapReport {
    pub yields: YieldReport,
    /// Rmap heads visited (yield-checked), empty ones included.
    pub rmap_heads_visited: u64,
    /// Heads that held SPTEs.
    pub rmap_heads_populated: u64,
    pub sptes_zapped: u64,
    /// Shadow pages of guest tables in the range visited (yield-checked)...
    pub shadow_pages_visited: u64,
    /// ...and zapped, with the children they orphaned.
    pub shadow_pages_zapped: u64,
    pub tlb_flushes: u64,
}

/// Publish that a zap holds `mmu_lock`, then (if asked) wait until someone
/// is blocked on it.
fn progress_start(p: &ZapProgress, lock: &MmuLock) {
    p.heads_visited.store(0, Ordering::Relaxed);
    p.yields.store(0, Ordering::Relaxed);
    p.zaps.fetch_add(1, Ordering::SeqCst);
    p.started.store(true, Ordering::Release);
    let t = std::time::Instant::now();
    while p.hold_until_contended && !lock.contended() && t.elapsed() < GATE_TIMEOUT {
        std::hint::spin_loop();
    }
}

fn progress_done(p: &ZapProgress, rep: &ZapReport) {
    p.heads_visited
        .store(rep.rmap_heads_visited, Ordering::Release);
    p.released(rep.rmap_heads_visited);
    p.done.store(true, Ordering::Release);
}

impl<P: GuestPaging> ShadowMmu<P> {
    /// Zap every SPTE mapping a gfn in `start..end` in any memslot, and the
    /// shadow pages of guest tables that live there: takes `mmu_lock`,
    /// yields per `opts.policy`, flushes before every yield and at the end.
    pub fn zap_gfn_range(&self, start: u64, end: u64, opts: &ZapOptions<'_>) -> ZapReport {
        let ctx = &*self.ctx;
        let mut g = ctx.mmu_lock.write();
        if let Some(p) = opts.progress {
            progress_start(p, &ctx.mmu_lock);
        }
        let mut y = Yielder::new(opts.policy, &ctx.mmu_lock, &ctx.stats);
        let mut rep = ZapReport::default();
        let pending = self.zap_locked(
            &mut g,
            &mut y,
            None,
            start,
            end,
            opts.mode,
            opts.progress,
            false,
            &mut rep,
        );
        if pending {
            ctx.tlb.flush(&ctx.stats);
            rep.tlb_flushes += 1;
        }
        rep.yields = y.finish();
        if let Some(p) = opts.progress {
            progress_done(p, &rep);
        }
        drop(g);
        rep
    }

    /// Zap everything (`kvm_mmu_zap_all`).
    pub fn zap_all(&self) -> u64 {
        let ctx = &*self.ctx;
        let _g = ctx.mmu_lock.write();
        let mut st = self.synced_state();
        let ids: Vec<u32> = st.hash.values().copied().collect();
        let n: u64 = ids.into_iter().map(|id| st.zap_sp(id, &ctx.stats)).sum();
        ctx.tlb.flush(&ctx.stats);
        n
    }

    /// The zap under `mmu_lock` (held through `g`): the rmap heads of gfns
    /// `start..end` in memslot `slot_id` (every memslot if `None`), then
    /// the shadow pages of guest tables there. One `need_yield()` per head
    /// visited and per shadow page; before yielding, flush if a flush is
    /// pending (`flush` in, or own zaps). Returns whether one still is.
    #[allow(clippy::too_many_arguments)]
    fn zap_locked(
        &self,
        g: &mut MmuWriteGuard<'_>,
        y: &mut Yielder<'_>,
        slot_id: Option<u32>,
        start: u64,
        end: u64,
        mode: WalkMode,
        progress: Option<&ZapProgress>,
        flush: bool,
        rep: &mut ZapReport,
    ) -> bool {
        let ctx = &*self.ctx;
        let stats = &ctx.stats;
        let mut st = self.synced_state();
        let mut pending = flush;
        // Flush what is pending, publish progress, drop the state and
        // `mmu_lock`, take them back.
        macro_rules! yield_point {
            () => {
                if pending {
                    ctx.tlb.flush(stats);
                    rep.tlb_flushes += 1;
                    pending = false;
                }
                if let Some(p) = progress {
                    p.heads_visited
                        .store(rep.rmap_heads_visited, Ordering::Release);
                    p.yields.fetch_add(1, Ordering::Release);
                    p.released(rep.rmap_heads_visited);
                }
                drop(st);
                MmuLock::yield_write(g);
                y.yielded();
                st = self.state.lock();
            };
        }
        let nslots = st.slots.len();
        for s in 0..nslots {
            let (lo, hi) = {
                let slot = &st.slots[s].slot;
                if slot_id.is_some_and(|id| id != slot.id) {
                    continue;
                }
                (start.max(slot.base_gfn), end.min(slot.gfn_end()))
            };
            if lo >= hi {
                continue;
            }
            for level in 1..=3u8 {
                let (first, last) = (
                    st.slots[s].index(level, lo),
                    st.slots[s].index(level, hi - 1),
                );
                let mut idx = first;
                while idx <= last {
                    if mode == WalkMode::Blind {
                        // A run of empty heads, counted and yield-checked in
                        // one step exactly as one by one: the run stops
                        // before the head at which the yielder decides or
                        // progress is published, which takes the path
                        // below.
                        let room = y
                            .free_units()
                            .min(PROGRESS_EVERY - 1 - rep.rmap_heads_visited % PROGRESS_EVERY)
                            .min(last + 1 - idx);
                        let k = st.slots[s].rmap[level as usize - 1].empty_run(idx, idx + room);
                        if k > 0 {
                            rep.rmap_heads_visited += k;
                            y.skip(k);
                            idx += k;
                            continue;
                        }
                    }
                    if mode == WalkMode::Summary {
                        match st.slots[s].populated[level as usize - 1].next_set(idx, last + 1) {
                            Some(next) => idx = next,
                            None => break,
                        }
                    }
                    rep.rmap_heads_visited += 1;
                    if let Some(p) =
                        progress.filter(|_| rep.rmap_heads_visited.is_multiple_of(PROGRESS_EVERY))
                    {
                        p.heads_visited
                            .store(rep.rmap_heads_visited, Ordering::Release);
                    }
                    if y.need_yield() {
                        yield_point!();
                    }
                    if !st.slots[s].rmap[level as usize - 1].get(idx).is_empty() {
                        rep.rmap_heads_populated += 1;
                        rep.sptes_zapped += st.zap_rmap_head(s, level, idx, stats);
                        pending = true;
                    }
                    idx += 1;
                }
            }
        }
        // Guest page tables in the range: their shadow pages derive from
        // memory the host is taking away.
        // (Beyond KVM, which leaves them to write tracking.) One yield
        // check per shadow page.
        let mut next = start;
        while let Some((gfn, id)) = st.first_shadowed(next, end) {
            rep.shadow_pages_visited += 1;
            rep.shadow_pages_zapped += st.zap_sp(id, stats);
            pending = true;
            next = gfn;
            if y.need_yield() {
                yield_point!();
            }
        }
        pending
    }
}

impl<P: GuestPaging> SecondaryMmu for ShadowMmu<P> {
    /// `kvm_unmap_gfn_range` for the shadow MMU: the rmap zap of one
    /// memslot's gfns (walk mode and progress from [`NotifierZap`]); its
    /// [`ZapReport`] (yields: see [`crate::KvmMmuNotifier::last_report`])
    /// is kept for [`ShadowMmu::take_notifier_reports`].
    fn unmap_gfn_range(
        &self,
        guard: &mut MmuWriteGuard<'_>,
        slot: &Memslot,
        start: u64,
        end: u64,
        yielder: &mut Yielder<'_>,
        flush: bool,
    ) -> bool {
        let z = &self.notifier_zap;
        let progress = z.progress.as_deref();
        if let Some(p) = progress {
            progress_start(p, &self.ctx.mmu_lock);
            // The gate's wait is not zap work (the direct path starts its
            // yielder after it).
            yielder.restart_if_idle();
        }
        let mut rep = ZapReport::default();
        let pending = self.zap_locked(
            guard,
            yielder,
            Some(slot.id),
            start,
            end,
            z.mode,
            progress,
            flush,
            &mut rep,
        );
        if let Some(p) = progress {
            progress_done(p, &rep);
        }
        let mut reports = self.notifier_reports.lock();
        if reports.len() >= MAX_NOTIFIER_REPORTS {
            reports.remove(0);
        }
        reports.push(rep);
        pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wanted_release_records_the_first_release_and_its_zap() {
        let p = ZapProgress::default();
        p.zaps.store(3, Ordering::SeqCst);
        // Not wanted: a release records nothing.
        p.released(10);
        assert_eq!(p.take_release(), None);
        p.want_release();
        assert_eq!(p.take_release(), None, "no release since the want");
        p.want_release();
        p.released(20);
        p.zaps.store(4, Ordering::SeqCst);
        p.released(5); // a later release (of the next zap) does not overwrite
        assert_eq!(p.take_release(), Some((20, 3)));
        assert_eq!(p.take_release(), None, "taken once");
    }
}
