//! What KVM's `virt/kvm/kvm_main.c` does between the host's mmu_notifier and
//! the arch MMUs (`kvm_mmu_notifier_invalidate_range_start/end`): the
//! [`SecondaryMmu`] trait every MMU (TDP, shadow, nested) implements, and
//! [`KvmMmuNotifier`], the [`InvalidationSubscriber`] that turns
//! `invalidate_range_start/end` into locked, yielding zaps of every MMU of
//! one [`MmuContext`].
//!
//! Each MMU implements [`SecondaryMmu`] next to its zapper
//! ([`crate::tdp::TdpMmu`] in `tdp/zap.rs`, [`crate::shadow::ShadowMmu`] in
//! `shadow/zap.rs`), as KVM's `kvm_unmap_gfn_range` calls into
//! `tdp_mmu.c` and `mmu.c`: this file knows only the trait.

use crate::context::MmuContext;
use crate::lock::MmuWriteGuard;
use crate::memslot::Memslot;
use crate::yielder::{YieldPolicy, YieldReport, Yielder};
use notifier::{Invalidation, InvalidationSubscriber};
use parking_lot::{Mutex, RwLock};
use std::cell::Cell;
use std::sync::Arc;

/// A secondary MMU that can drop its translations of a gfn range
/// (`kvm_unmap_gfn_range` for one MMU flavour).
pub trait SecondaryMmu: Send + Sync {
    /// Zap every translation of gfns `[start, end)` of `slot`. Called with
    /// `mmu_lock` held for write through `guard`, after the range was added
    /// to the invalidation sequence. Yield only through `yielder`, flushing
    /// first if a flush is pending (`flush` in, or own zaps). Returns
    /// whether a TLB flush is still pending (KVM's `flush` chaining).
    fn unmap_gfn_range(
        &self,
        guard: &mut MmuWriteGuard<'_>,
        slot: &Memslot,
        start: u64,
        end: u64,
        yielder: &mut Yielder<'_>,
        flush: bool,
    ) -> bool;
}

/// `kvm_mmu_notifier_invalidate_range_start/end` for the MMUs of one
/// address space.
pub struct KvmMmuNotifier {
    ctx: Arc<MmuContext>,
    /// Copy-on-write list: an invalidation takes a reference (one atomic
    /// increment), `add_mmu` publishes a new list.
    mmus: RwLock<Arc<[Arc<dyn SecondaryMmu>]>>,
    policy: YieldPolicy,
    last_report: Mutex<Option<YieldReport>>,
}

impl KvmMmuNotifier {
    pub fn new(ctx: Arc<MmuContext>, policy: YieldPolicy) -> Self {
        Self {
            ctx,
            mmus: RwLock::new(Arc::from(Vec::new())),
            policy,
            last_report: Mutex::new(None),
        }
    }

    pub fn add_mmu(&self, mmu: Arc<dyn SecondaryMmu>) {
        let mut list = self.mmus.write();
        let mut next = list.to_vec();
        next.push(mmu);
        *list = Arc::from(next);
    }

    pub fn context(&self) -> &Arc<MmuContext> {
        &self.ctx
    }

    /// What the last `invalidate_range_start` that took the lock did.
    pub fn last_report(&self) -> Option<YieldReport> {
        *self.last_report.lock()
    }

    /// The start half; returns the yield report if any memslot overlapped.
    ///
    /// If a zap panics, the unwind marks the context bugged (faults are
    /// refused from then on: the MMUs may still map part of the range) and
    /// ends the invalidation, so that nothing waits for an `end` that the
    /// unwinding caller will never call: neither memslot updates
    /// ([`MmuContext::set_memslots`]) nor faults retrying on an in-progress
    /// range forever.
    pub fn start(&self, inv: &Invalidation) -> Option<YieldReport> {
        let ctx = &*self.ctx;
        ctx.active_invalidation_start();
        let unwinding = BuggedOnUnwind {
            ctx,
            begun: Cell::new(false),
        };
        let report = self.zap_start(inv, &unwinding.begun);
        unwinding.disarm();
        report
    }

    /// [`Self::start`] after `mn_active_invalidate_count++`; `begun` is
    /// set once the range is in the invalidation sequence.
    fn zap_start(&self, inv: &Invalidation, begun: &Cell<bool>) -> Option<YieldReport> {
        let ctx = &*self.ctx;
        let slots = ctx.memslots();
        let ranges: Vec<_> = slots.hva_range_to_gfn_ranges(inv.range).collect();
        if ranges.is_empty() {
            // No memslot overlaps: mmu_lock is never taken.
            return None;
        }
        let mmus = Arc::clone(&self.mmus.read());
        let mut guard = ctx.mmu_lock.write();
        ctx.seq.begin();
        begun.set(true);
        for r in &ranges {
            ctx.seq.range_add(r.start, r.end);
        }
        // !blockable (OOM reaper): zap everything without yielding.
        let policy = if inv.blockable {
            self.policy
        } else {
            YieldPolicy::never()
        };
        let mut yielder = Yielder::new(policy, &ctx.mmu_lock, &ctx.stats);
        let mut flush = false;
        for r in &ranges {
            for mmu in mmus.iter() {
                flush =
                    mmu.unmap_gfn_range(&mut guard, r.slot, r.start, r.end, &mut yielder, flush);
            }
        }
        if flush {
            ctx.tlb.flush(&ctx.stats);
        }
        drop(guard);
        let report = yielder.finish();
        *self.last_report.lock() = Some(report);
        Some(report)
    }

    /// The end half.
    pub fn end(&self, inv: &Invalidation) {
        let ctx = &*self.ctx;
        let slots = ctx.memslots();
        if slots.hva_range_to_gfn_ranges(inv.range).next().is_some() {
            let _guard = ctx.mmu_lock.write();
            let balanced = ctx.seq.end();
            debug_assert!(balanced, "invalidate_range_end without start");
        }
        ctx.active_invalidation_end();
    }
}

/// Armed across the zaps of [`KvmMmuNotifier::start`]; dropped armed only
/// by a panic's unwind (see there).
struct BuggedOnUnwind<'a> {
    ctx: &'a MmuContext,
    /// `mmu_invalidate_begin` ran (the sequence must be ended too).
    begun: Cell<bool>,
}

impl BuggedOnUnwind<'_> {
    /// The start half completed: the caller's `end` balances it.
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for BuggedOnUnwind<'_> {
    fn drop(&mut self) {
        self.ctx.mark_bugged();
        if self.begun.get() {
            // The lock guard of the zap is gone by now (declared later,
            // dropped first in the unwind).
            let _guard = self.ctx.mmu_lock.write();
            self.ctx.seq.end();
        }
        self.ctx.active_invalidation_end();
    }
}

impl InvalidationSubscriber for KvmMmuNotifier {
    fn invalidate_range_start(&self, inv: &Invalidation) {
        self.start(inv);
    }

    fn invalidate_range_end(&self, inv: &Invalidation) {
        self.end(inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memslot::Memslots;
    use crate::tdp::{FaultOutcome, HostPage, ResolveError, TdpMmu};
    use crate::RemoteTlb;
    use notifier::PageSize;
    use notifier::{Delivery, HvaRange, MmuNotifyEvent};
    use std::time::Duration;

    const HVA0: u64 = 0x7000_0000_0000;
    const HVA1: u64 = 0x7100_0000_0000;

    fn setup(policy: YieldPolicy) -> (Arc<MmuContext>, Arc<TdpMmu>, KvmMmuNotifier) {
        let slots = Memslots::new(
            vec![
                Memslot::new(0, 0, 4096, HVA0, PageSize::Size4K).unwrap(),
                // Aliases the second half of slot 0's hvas.
                Memslot::new(1, 1 << 20, 2048, HVA0 + 2048 * 4096, PageSize::Size4K).unwrap(),
                Memslot::new(2, 1 << 21, 4096, HVA1, PageSize::Size2M).unwrap(),
            ],
            0,
        )
        .unwrap();
        let ctx = MmuContext::new(slots, RemoteTlb::default());
        let tdp = Arc::new(TdpMmu::new(ctx.clone()));
        let n = KvmMmuNotifier::new(ctx.clone(), policy);
        n.add_mmu(tdp.clone());
        (ctx, tdp, n)
    }

    fn map_all(ctx: &MmuContext, tdp: &TdpMmu) {
        let r = |s: &Memslot, gfn: u64, _: u64, _: bool| -> Result<HostPage, ResolveError> {
            Ok(HostPage {
                pfn: gfn + (1 << 30),
                level: s.backing,
                writable: true,
            })
        };
        for s in ctx.memslots().iter() {
            for gfn in s.base_gfn..s.gfn_end() {
                assert_ne!(tdp.page_fault(gfn, false, &r).unwrap(), FaultOutcome::Retry);
            }
        }
    }

    fn inv(start: u64, end: u64, blockable: bool) -> Invalidation {
        Invalidation {
            range: HvaRange::new(start, end),
            event: MmuNotifyEvent::Unmap,
            blockable,
            delivery: Delivery::Before,
        }
    }

    #[test]
    fn start_zaps_every_aliasing_slot_and_flushes_once() {
        // No yield (no waiter, a slice that never runs out): exactly one flush.
        let (ctx, tdp, n) = setup(YieldPolicy::default().with_slice(Duration::from_secs(60)));
        map_all(&ctx, &tdp);
        let i = inv(HVA0 + 2000 * 4096, HVA0 + 3000 * 4096, true);
        let flushes = ctx.stats.snapshot().remote_tlb_flush_requests;
        n.invalidate_range_start(&i);
        assert!(tdp.leaves_in(2000, 3000).is_empty());
        assert!(
            tdp.leaves_in(1 << 20, (1 << 20) + 952).is_empty(),
            "aliased slot zapped too"
        );
        assert_eq!(tdp.leaves_in(0, 2000).len(), 2000);
        assert_eq!(ctx.stats.snapshot().remote_tlb_flush_requests, flushes + 1);
        assert_eq!(ctx.seq.in_progress_range(), Some((2000, (1 << 20) + 952)));
        n.invalidate_range_end(&i);
        assert_eq!(ctx.seq.in_progress(), 0);
        assert_eq!(ctx.seq.seq(), 1);
    }

    #[test]
    fn no_overlapping_slot_takes_no_lock_and_bumps_nothing() {
        let (ctx, _tdp, n) = setup(YieldPolicy::default());
        let i = inv(0x1000, 0x2000, true);
        let _reader = ctx.mmu_lock.read(); // start would deadlock if it locked
        assert_eq!(n.start(&i), None);
        n.end(&i);
        assert_eq!(ctx.seq.seq(), 0);
    }

    #[test]
    fn blockable_yields_and_non_blockable_does_not() {
        let policy = YieldPolicy::default()
            .with_max_units(64)
            .with_slice(Duration::from_secs(60));
        let (ctx, tdp, n) = setup(policy);
        map_all(&ctx, &tdp);
        let i = inv(HVA0, HVA0 + 4096 * 4096, true);
        let r = n.start(&i).unwrap();
        n.end(&i);
        assert!(r.yields > 0 && r.longest.units <= 64, "{r:?}");
        map_all(&ctx, &tdp);
        let i = inv(HVA0, HVA0 + 4096 * 4096, false);
        let r = n.start(&i).unwrap();
        n.end(&i);
        assert_eq!(r.yields, 0);
        assert_eq!(r.longest.units, r.units);
        assert!(tdp.leaves_in(0, 4096).is_empty());
    }

    /// An MMU whose zap panics.
    struct PanickingZap;

    impl SecondaryMmu for PanickingZap {
        fn unmap_gfn_range(
            &self,
            _: &mut MmuWriteGuard<'_>,
            _: &Memslot,
            _: u64,
            _: u64,
            _: &mut Yielder<'_>,
            _: bool,
        ) -> bool {
            panic!("zap failed");
        }
    }

    /// A zap that panics must not leave the range in progress forever (the
    /// fault path would retry without end, a memslot update would wait
    /// forever): the unwind ends the invalidation and marks the context
    /// bugged, and faults are refused instead of mapping what the
    /// unfinished zap may have left.
    #[test]
    fn a_panicking_zap_leaves_the_context_bugged_not_in_progress() {
        let (ctx, tdp, n) = setup(YieldPolicy::default());
        map_all(&ctx, &tdp);
        n.add_mmu(Arc::new(PanickingZap));
        let i = inv(HVA0, HVA0 + 16 * 4096, true);
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| n.start(&i)));
        assert!(unwound.is_err());
        assert!(ctx.is_bugged());
        assert_eq!(ctx.seq.in_progress(), 0);
        assert_eq!(ctx.seq.in_progress_range(), None);
        // Would block forever if the active count stayed raised.
        ctx.set_memslots(Memslots::new(Vec::new(), 0).unwrap());
        let r = |s: &Memslot, gfn: u64, _: u64, _: bool| -> Result<HostPage, ResolveError> {
            Ok(HostPage {
                pfn: gfn,
                level: s.backing,
                writable: true,
            })
        };
        assert_eq!(
            tdp.page_fault(0, false, &r),
            Err(crate::tdp::FaultError::VmBugged)
        );
    }

    #[test]
    fn memslot_update_waits_for_end() {
        let (ctx, _tdp, n) = setup(YieldPolicy::default());
        let n = Arc::new(n);
        let i = inv(HVA0, HVA0 + 4096, true);
        n.start(&i);
        let ctx2 = ctx.clone();
        let t = std::thread::spawn(move || ctx2.set_memslots(Memslots::default()));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "memslots changed between start and end");
        n.end(&i);
        t.join().unwrap();
        assert!(ctx.memslots().is_empty());
    }
}
