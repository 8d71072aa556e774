//! What KVM's `virt/kvm/kvm_main.c` does between the host's mmu_notifier and
//! the arch MMUs: the per-VM MMU context (`mmu_lock`, the invalidation
//! sequence, stats, TLB hook, memslots), the [`SecondaryMmu`] trait every
//! MMU (TDP, shadow, nested) implements, and [`KvmMmuNotifier`], the
//! [`InvalidationSubscriber`] that turns `invalidate_range_start/end` into
//! locked, yielding zaps.

use crate::lock::{MmuLock, MmuWriteGuard};
use crate::memslot::{Memslot, Memslots};
use crate::stats::MmuStats;
use crate::tdp::TdpMmu;
use crate::tlb::RemoteTlb;
use crate::yielder::{YieldPolicy, YieldReport, Yielder};
use notifier::{Invalidation, InvalidationSeq, InvalidationSubscriber};
use parking_lot::{Condvar, Mutex, RwLock};
use std::sync::Arc;

/// The MMU half of `struct kvm`: shared by every MMU of one address space.
#[derive(Debug, Default)]
pub struct MmuContext {
    pub mmu_lock: MmuLock,
    pub seq: InvalidationSeq,
    pub stats: MmuStats,
    pub tlb: RemoteTlb,
    memslots: RwLock<Arc<Memslots>>,
    /// `mn_active_invalidate_count`: memslot updates wait for zero so that
    /// `start` and `end` of one invalidation see the same memslots.
    active_invalidations: Mutex<u64>,
    no_invalidations: Condvar,
}

impl MmuContext {
    pub fn new(memslots: Memslots, tlb: RemoteTlb) -> Arc<Self> {
        Arc::new(Self {
            memslots: RwLock::new(Arc::new(memslots)),
            tlb,
            ..Self::default()
        })
    }

    /// The current memslots (`kvm_memslots`).
    pub fn memslots(&self) -> Arc<Memslots> {
        self.memslots.read().clone()
    }

    /// Replace the memslots once no invalidation is between start and end
    /// (`kvm_swap_active_memslots` waiting on `mn_memslots_update_rcuwait`).
    /// Zapping what a deleted or moved slot mapped is the caller's job.
    pub fn set_memslots(&self, memslots: Memslots) {
        let mut active = self.active_invalidations.lock();
        while *active != 0 {
            self.no_invalidations.wait(&mut active);
        }
        *self.memslots.write() = Arc::new(memslots);
    }
}

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

impl SecondaryMmu for TdpMmu {
    fn unmap_gfn_range(
        &self,
        guard: &mut MmuWriteGuard<'_>,
        _slot: &Memslot,
        start: u64,
        end: u64,
        yielder: &mut Yielder<'_>,
        flush: bool,
    ) -> bool {
        self.zap_gfn_range(guard, start, end, yielder, flush)
    }
}

/// `kvm_mmu_notifier_invalidate_range_start/end` for the MMUs of one
/// address space.
pub struct KvmMmuNotifier {
    ctx: Arc<MmuContext>,
    mmus: RwLock<Vec<Arc<dyn SecondaryMmu>>>,
    policy: YieldPolicy,
    last_report: Mutex<Option<YieldReport>>,
}

impl KvmMmuNotifier {
    pub fn new(ctx: Arc<MmuContext>, policy: YieldPolicy) -> Self {
        Self {
            ctx,
            mmus: RwLock::new(Vec::new()),
            policy,
            last_report: Mutex::new(None),
        }
    }

    pub fn add_mmu(&self, mmu: Arc<dyn SecondaryMmu>) {
        self.mmus.write().push(mmu);
    }

    pub fn context(&self) -> &Arc<MmuContext> {
        &self.ctx
    }

    /// What the last `invalidate_range_start` that took the lock did.
    pub fn last_report(&self) -> Option<YieldReport> {
        *self.last_report.lock()
    }

    /// The start half; returns the yield report if any memslot overlapped.
    pub fn start(&self, inv: &Invalidation) -> Option<YieldReport> {
        let ctx = &*self.ctx;
        *ctx.active_invalidations.lock() += 1;
        let slots = ctx.memslots();
        let ranges: Vec<_> = slots.hva_range_to_gfn_ranges(inv.range).collect();
        if ranges.is_empty() {
            // No memslot overlaps: mmu_lock is never taken.
            return None;
        }
        let mmus = self.mmus.read().clone();
        let mut guard = ctx.mmu_lock.write();
        ctx.seq.begin();
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
            for mmu in &mmus {
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
        let mut active = ctx.active_invalidations.lock();
        *active = active.saturating_sub(1);
        if *active == 0 {
            self.ctx.no_invalidations.notify_all();
        }
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
