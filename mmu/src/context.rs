//! The per-VM MMU context: the MMU half of KVM's `struct kvm` (`mmu_lock`,
//! the invalidation sequence `mmu_invalidate_seq` with its in-progress
//! ranges, the stats, the remote TLB flush hook, the memslots and
//! `mn_active_invalidate_count`), shared by every MMU of one address space
//! (TDP, shadow, nested) and by the [`KvmMmuNotifier`](crate::KvmMmuNotifier)
//! that drives them.

use crate::lock::MmuLock;
use crate::memslot::Memslots;
use crate::stats::MmuStats;
use crate::tlb::RemoteTlb;
use notifier::InvalidationSeq;
use parking_lot::{Condvar, Mutex, RwLock};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// `kvm->vm_bugged`: set when an invalidation did not complete (a zap
    /// panicked). What the MMUs map may then outlive the host pages, so
    /// every later fault is refused ([`Self::is_bugged`]) instead of mapping
    /// more, as KVM's `KVM_BUG_ON` makes a VM dead.
    bugged: AtomicBool,
}

impl MmuContext {
    pub fn new(memslots: Memslots, tlb: RemoteTlb) -> Arc<Self> {
        // Never calibrate the clock inside a zap, under mmu_lock.
        crate::clock::calibrate_once();
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

    /// `kvm_vm_bugged`: no more faults on this context.
    pub fn mark_bugged(&self) {
        self.bugged.store(true, Ordering::Release);
    }

    /// Whether an invalidation failed to complete ([`Self::mark_bugged`]).
    pub fn is_bugged(&self) -> bool {
        self.bugged.load(Ordering::Acquire)
    }

    /// `mn_active_invalidate_count++` (`invalidate_range_start`, before
    /// the memslots are read).
    pub(crate) fn active_invalidation_start(&self) {
        *self.active_invalidations.lock() += 1;
    }

    /// `mn_active_invalidate_count--` (`invalidate_range_end`); the last one
    /// wakes memslot updates waiting in [`Self::set_memslots`].
    pub(crate) fn active_invalidation_end(&self) {
        let mut active = self.active_invalidations.lock();
        *active = active.saturating_sub(1);
        if *active == 0 {
            self.no_invalidations.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_is_created_with_the_clock_calibrated() {
        // The yielder converts its slice to ticks under mmu_lock: the
        // ~1 ms calibration must have happened before any zap.
        let _ = MmuContext::new(Memslots::new(Vec::new(), 1).unwrap(), RemoteTlb::new(None));
        assert!(crate::clock::calibrated());
    }
}
